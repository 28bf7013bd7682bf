"""The kernel layer's files: inodes and their page cache, open files, and the descriptors the
simulator holds so that a mapping outlives the caller's ``close``.

Part of ``vmsim``'s kernel layer, used by ``vmsim.kernel``; imports ``loader.mmap`` (MmapError)
and ``vmsim.pagetable`` (the frame pool that holds the page cache).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.mmap import MmapError
from loader.pages import page_offset
from vmsim.pagetable import FramePool, runs

__all__ = ["FileTable", "Inode", "OpenFile", "Shmem", "host_call", "is_paged", "is_sized",
           "same_open_file"]


class Inode:
    """A file as the page cache sees it: ``(st_dev, st_ino)``, the size last seen, and the
    page-cache frames by page index. ``io_fd`` (-1 when none) is a descriptor of the file the
    simulator keeps for the I/O of open files whose own dup it let go (see
    :meth:`OpenFile.io`); ``io_writable`` says whether it was opened for writing."""

    __slots__ = ("cache", "dev", "ino", "io_fd", "io_writable", "key", "opens", "size")

    def __init__(self, dev: int, ino: int, size: int) -> None:
        self.key = (dev, ino)
        self.dev = f"{os.major(dev):02x}:{os.minor(dev):02x}"
        self.ino = ino
        self.size = size
        self.cache: dict[int, int] = {}
        self.opens = 0
        self.io_fd = -1
        self.io_writable = False


class OpenFile:
    """An open file description (Linux's ``struct file``) the simulator holds through its own
    dup of the caller's fd, so the mapping outlives the caller's ``close``.

    ``fd`` is that dup while the description may still be reached through another fd of the
    process (so a later mmap of such an fd can be told to be the same open file); once no
    other fd refers to it, the simulator closes the dup (``fd`` -1) and does the file's I/O
    through its inode's ``io_fd``: one descriptor per file, not one per open. ``zero`` marks
    ``/dev/zero``, whose private mappings are anonymous memory that still names the file."""

    __slots__ = ("fd", "inode", "noexec", "readable", "thp", "users", "writable", "zero")

    def __init__(self, fd: int, inode: Inode, readable: bool, writable: bool,
                 noexec: bool) -> None:
        self.fd = fd
        self.inode = inode
        self.readable = readable
        self.writable = writable
        self.noexec = noexec
        self.thp = False
        self.users = 0
        self.zero = False

    def io(self) -> int:
        """The descriptor to read, write and stat the file through."""
        return self.fd if self.fd >= 0 else self.inode.io_fd

    def path(self) -> str:
        """The path ``/proc/self/maps`` shows now (with `` (deleted)`` once unlinked), kept
        as bytes decoded with surrogateescape so that any name round-trips."""
        try:
            return os.fsdecode(os.readlink(os.fsencode(f"/proc/self/fd/{self.io()}")))
        except OSError:
            return "?"


class Shmem:
    """The hidden shmem file behind a shared anonymous mapping (or a shared mapping of
    ``/dev/zero``, which is the same thing): no other mmap shares it, so such mappings never
    merge with each other (only mremap's pieces and copies of one refer to it). Its size is
    the mapping's length (``pages``): a page at file offset ``pages`` or beyond (a /dev/zero
    mapping at a non-zero offset, or an mremap growth) is past its end, and an access there
    raises SIGBUS, as in Linux. ``cache`` holds its pages (page -> frame), kept while a VMA
    uses it, as a file's page cache: a page unmapped and mapped again by mremap keeps its
    data."""

    __slots__ = ("cache", "ino", "pages", "users")
    dev = "00:01"
    path = "/dev/zero (deleted)"

    def __init__(self, ino: int, pages: int) -> None:
        self.ino = ino
        self.pages = pages
        self.users = 0
        self.cache: dict[int, int] = {}


def is_paged(file: OpenFile | Shmem | None) -> bool:
    """True when a VMA's pages come from a file's page cache (not /dev/zero, not shmem)."""
    return isinstance(file, OpenFile) and not file.zero


def is_sized(file: OpenFile | Shmem | None) -> bool:
    """True when a VMA's pages have an end (a file's or shmem's size) past which an access
    raises SIGBUS."""
    return isinstance(file, Shmem) or is_paged(file)


def host_call(call: Any, *args: Any) -> Any:
    """``call(*args)`` on a host descriptor, its OSError turned into MmapError."""
    try:
        return call(*args)
    except OSError as err:
        raise MmapError(err.errno or errno.EIO, f"{call.__name__}: {err.strerror}") from err


_SYS_KCMP = 312
_KCMP_FILE = 0
_LIBC = ctypes.CDLL(None, use_errno=True)


def same_open_file(fd1: int, fd2: int) -> bool:
    """True when two fds of this process share one open file description (kcmp(2));
    without kcmp, by moving one's file position and watching the other's."""
    pid = os.getpid()
    got = _LIBC.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, fd1, fd2)
    if got >= 0:
        return bool(got == 0)
    pos1, pos2 = os.lseek(fd1, 0, os.SEEK_CUR), os.lseek(fd2, 0, os.SEEK_CUR)
    if pos1 != pos2:
        return False
    os.lseek(fd1, pos1 + 1, os.SEEK_SET)
    moved = os.lseek(fd2, 0, os.SEEK_CUR) == pos1 + 1
    os.lseek(fd1, pos1, os.SEEK_SET)
    return moved


_THP_FILESYSTEMS = frozenset({"ext4", "xfs"})
"""Filesystems whose get_unmapped_area is thp_get_unmapped_area (file mappings of 2 MiB and
more are aligned to their file offset modulo 2 MiB; verified on ext4 here)."""
_FS_TYPES: dict[int, str] = {}


def _fs_type(dev: int) -> str:
    """The filesystem type mounted on device ``dev`` (from /proc/self/mountinfo), or ""."""
    if dev not in _FS_TYPES:
        want = f"{os.major(dev)}:{os.minor(dev)}"
        try:
            with open("/proc/self/mountinfo") as info:
                for line in info:
                    fields = line.split()
                    if fields[2] == want and " - " in line:
                        _FS_TYPES[dev] = line.split(" - ", 1)[1].split()[0]
                        break
        except OSError:
            pass
    return _FS_TYPES.get(dev, "")


_DEV_ZERO = os.makedev(1, 5)
"""The device number of /dev/zero (drivers/char/mem.c), the one character device that maps."""
_SWEEP_MIN = 64
"""How many descriptors a FileTable holds before it first looks for dups to let go."""


def _other_fds_by_inode(owned: set[int]) -> dict[tuple[int, int], list[int]]:
    """This process's descriptors not in ``owned``, grouped by ``(st_dev, st_ino)``."""
    got: dict[tuple[int, int], list[int]] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return got
    for name in names:
        fd = int(name)
        if fd in owned:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # listdir's own descriptor, or closed meanwhile
        got.setdefault((st.st_dev, st.st_ino), []).append(fd)
    return got


def close_all(fds: set[int]) -> None:
    """Close the fds a FileTable still holds (its owner's finalizer)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _is_dev_zero(st: os.stat_result) -> bool:
    """True when ``st`` is /dev/zero's (the one character device that maps)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_ZERO


def _open_file_of(fd: int, st: os.stat_result, fl: int, inode: Inode) -> OpenFile:
    """A new OpenFile for ``fd`` (its fstat ``st`` and status flags ``fl``) on ``inode``."""
    try:
        noexec = bool(os.fstatvfs(fd).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = False
    acc = fl & os.O_ACCMODE
    opened = OpenFile(fd, inode, acc in (os.O_RDONLY, os.O_RDWR),
                      acc in (os.O_WRONLY, os.O_RDWR), noexec)
    opened.zero = _is_dev_zero(st)
    opened.thp = opened.zero or _fs_type(st.st_dev) in _THP_FILESYSTEMS
    return opened


class FileTable:
    """The files the mappings of one address space use: open files by inode, inodes with
    their page cache (frames of ``pool``), and the descriptors the simulator owns.

    A VMA holds a *use* of its file (:meth:`use`, :meth:`unuse`); the first use of an open
    file takes a dup of the caller's fd, the last closes it, and the page cache of an inode
    is dropped when no open file of it is used any more.
    """

    def __init__(self, pool: FramePool) -> None:
        self.pool = pool
        self.shift = pool.page_size.bit_length() - 1
        self.files: dict[tuple[int, int], list[OpenFile]] = {}
        self.inodes: dict[tuple[int, int], Inode] = {}
        self.owned_fds: set[int] = set()
        self.sweep_at = _SWEEP_MIN

    def open_file(self, fd: int) -> OpenFile:
        """The OpenFile for ``fd``: an existing one when fd shares its open file description
        (a dup), else a new, not yet used one. EBADF for a bad or O_PATH fd."""
        try:
            st = os.fstat(fd) if fd >= 0 else None
            fl = fcntl.fcntl(fd, fcntl.F_GETFL) if st else 0
        except OSError:
            st = None
        if st is None or fl & getattr(os, "O_PATH", 0o10000000):
            raise MmapError(errno.EBADF, f"mmap: fd={fd} is not an open file")
        key = (st.st_dev, st.st_ino)
        for known in self.files.get(key, ()):
            if known.fd >= 0 and same_open_file(known.fd, fd):
                return known
        inode = self.inodes.get(key)
        if inode is None:
            inode = Inode(st.st_dev, st.st_ino, st.st_size)
            if not stat.S_ISREG(st.st_mode) and not _is_dev_zero(st):
                inode.key = (-1, st.st_ino)  # mmap of it fails with ENODEV
        return _open_file_of(fd, st, fl, inode)

    def use(self, file: OpenFile | Shmem) -> None:
        """One more VMA uses ``file``; the first use of an OpenFile takes our own dup
        (MmapError EMFILE/ENFILE when the host has no descriptor left even after
        :meth:`release_orphans`)."""
        if file.users == 0 and isinstance(file, OpenFile):
            file.fd = self._dup(file.fd)
        file.users += 1
        if file.users == 1 and isinstance(file, OpenFile):
            inode = file.inode
            if inode.opens == 0:
                self.inodes[inode.key] = inode
            inode.opens += 1
            self.files.setdefault(inode.key, []).append(file)

    def unuse(self, file: OpenFile | Shmem) -> None:
        """One VMA fewer uses ``file``; the last closes our dup (and drops the inode's page
        cache when no open file of it is left)."""
        file.users -= 1
        if file.users == 0 and isinstance(file, Shmem):
            self.pool.free(np.array(list(file.cache.values()), dtype=np.int64))
            file.cache.clear()
        if file.users == 0 and isinstance(file, OpenFile):
            self._close(file.fd)
            file.fd = -1
            inode = file.inode
            self.files[inode.key].remove(file)
            if not self.files[inode.key]:
                del self.files[inode.key]
            inode.opens -= 1
            if inode.opens == 0:
                self._close(inode.io_fd)
                inode.io_fd = -1
                del self.inodes[inode.key]
                self.pool.free(np.array(list(inode.cache.values()), dtype=np.int64))
                inode.cache.clear()

    def _dup(self, fd: int) -> int:
        """Our own dup of ``fd``. Every so many dups (and whenever the host says EMFILE or
        ENFILE) first let go of the dups no other descriptor shares (see
        :meth:`release_orphans`), so mapping one file thousands of times through fds the
        caller closes holds a few descriptors, not thousands."""
        if len(self.owned_fds) >= self.sweep_at:
            self.release_orphans()
        try:
            got = os.dup(fd)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE):
                raise MmapError(err.errno or errno.EBADF,
                                f"mmap: dup(fd={fd}): {err.strerror}") from err
            self.release_orphans()
            try:
                got = os.dup(fd)
            except OSError as again:
                raise MmapError(again.errno or errno.EMFILE, f"mmap: fd={fd}: the simulator "
                                f"needs a descriptor of its own and the host has none left "
                                f"({again.strerror})") from again
        self.owned_fds.add(got)
        return got

    def _close(self, fd: int) -> None:
        """Close one of our own descriptors (-1: none)."""
        if fd >= 0:
            self.owned_fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def release_orphans(self) -> None:
        """Close the dups of open files that no other descriptor of this process refers to
        (no later mmap can name such an open file again, so its identity needs no fd): their
        I/O goes through one descriptor per inode (``Inode.io_fd``, the first such dup,
        or a writable one when one comes). Then the next sweep waits until we hold twice as
        many descriptors as are left."""
        held = [f for files in self.files.values() for f in files if f.fd >= 0]
        others = _other_fds_by_inode(self.owned_fds)
        for file in held:
            if any(same_open_file(file.fd, fd) for fd in others.get(file.inode.key, ())):
                continue
            inode = file.inode
            if inode.io_fd < 0 or (file.writable and not inode.io_writable):
                self._close(inode.io_fd)
                inode.io_fd, inode.io_writable = file.fd, file.writable
            else:
                self._close(file.fd)
            file.fd = -1
        self.sweep_at = max(_SWEEP_MIN, 2 * len(self.owned_fds))

    def cache_frames(self, inode: Inode | Shmem,
                     pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The page-cache frames of the file (or shmem) pages ``pages``, allocated (zeroed)
        as needed."""
        cache = inode.cache
        wanted = pages.tolist()
        missing = [p for p in wanted if p not in cache]
        if missing:
            for p, f in zip(missing, self.pool.alloc(len(missing)).tolist(), strict=True):
                cache[p] = f
        return np.array([cache[p] for p in wanted], dtype=np.int64)

    def pread_into(self, file: OpenFile, pages: npt.NDArray[np.int64],
                   frames: npt.NDArray[np.int64]) -> None:
        """Refresh frames from the file: page ``pages[k]`` into ``frames[k]`` (bytes past EOF
        in a partial last page keep what the frame holds, as the page cache does). One
        ``pread`` per run of consecutive pages, straight into the frames when they are
        consecutive too (no bytes object to copy)."""
        if not len(pages):
            return
        shift, data = self.shift, self.pool.data
        for k0, k1 in runs(pages):
            rows = self.pool.rows(frames[k0:k1])
            if rows is not None:
                host_call(os.preadv, file.io(), [rows], int(pages[k0]) << shift)
                continue
            got = host_call(os.pread, file.io(), (k1 - k0) << shift, int(pages[k0]) << shift)
            full, rest = len(got) >> shift, page_offset(len(got), self.pool.page_size)
            buf = np.frombuffer(got, dtype=np.uint8)
            if full:
                data[frames[k0: k0 + full]] = buf[: full << shift].reshape(full, -1)
            if rest:
                data[frames[k0 + full], :rest] = buf[full << shift:]
