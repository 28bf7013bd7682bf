"""Kernel-side records of the simulator: VMAs, open files, inodes and the free-gap index.

Part of ``vmsim``, used by ``vmsim.space``; imports only the standard library.

A :class:`Vma` carries what Linux's ``vm_area_struct`` carries that decides merging: the
``vm_flags`` word (protection, shared, VM_ACCOUNT, VM_NORESERVE, ...), the file (the *open
file*, not the path: a dup'd fd is the same :class:`OpenFile`, a second open() is not), the
page offset, and the ``anon_vma`` (the history of private pages written, an integer token).
"""

from __future__ import annotations

import ctypes
import os
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator

__all__ = ["VM_ACCESS", "VM_ACCOUNT", "VM_DROPPABLE", "VM_EXEC", "VM_GROWSDOWN", "VM_LOCKED",
           "VM_MAYEXEC", "VM_MAYREAD", "VM_MAYSHARE", "VM_MAYWRITE", "VM_NOHUGEPAGE",
           "VM_NORESERVE", "VM_READ", "VM_SHARED", "VM_WRITE", "GapIndex", "Inode",
           "OpenFile", "Shmem", "Vma", "VmaList", "same_open_file"]

# vm_flags bits, with the kernel's values (include/linux/mm.h)
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_MAYREAD = 0x10
VM_MAYWRITE = 0x20
VM_MAYEXEC = 0x40
VM_MAYSHARE = 0x80
VM_GROWSDOWN = 0x100
VM_LOCKED = 0x2000
VM_ACCOUNT = 0x100000
VM_NORESERVE = 0x200000
VM_NOHUGEPAGE = 0x40000000
VM_DROPPABLE = 1 << 40
VM_ACCESS = VM_READ | VM_WRITE | VM_EXEC


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
    ``/dev/zero``, which is the same thing): never shared with another mapping, so such
    mappings never merge with each other. Its size is the mapping's length (``pages``): a
    page at file offset ``pages`` or beyond (a /dev/zero mapping at a non-zero offset) is
    past its end, and an access there raises SIGBUS, as in Linux."""

    __slots__ = ("ino", "pages", "users")
    dev = "00:01"
    path = "/dev/zero (deleted)"

    def __init__(self, ino: int, pages: int) -> None:
        self.ino = ino
        self.pages = pages
        self.users = 0


class Vma:
    """One mapping ``[start, end)``: ``flags`` (vm_flags), ``pgoff`` (file page of ``start``;
    for private anonymous memory ``start >> page_shift`` as Linux sets it), ``file``
    (OpenFile, Shmem or None) and ``anon`` (anon_vma token, 0 when never written)."""

    __slots__ = ("anon", "end", "file", "flags", "pgoff", "start")

    def __init__(self, start: int, end: int, flags: int, pgoff: int,
                 file: OpenFile | Shmem | None, anon: int) -> None:
        self.start = start
        self.end = end
        self.flags = flags
        self.pgoff = pgoff
        self.file = file
        self.anon = anon

    def __repr__(self) -> str:
        return (f"Vma({self.start:#x}-{self.end:#x} flags={self.flags:#x} pgoff={self.pgoff:#x}"
                f" file={type(self.file).__name__} anon={self.anon})")


class GapIndex:
    """The free gaps between VMAs, bucketed by size class (floor(log2(size))), each bucket a
    sorted list of gap end addresses. Top-down placement asks each non-empty bucket that can
    hold the length for its highest gap below a limit: O(buckets * log n), flat in the
    number of mappings (Linux keeps the largest gap per subtree of its maple tree instead).
    """

    def __init__(self) -> None:
        self.ends: list[list[int]] = [[] for _ in range(65)]
        self.start_of: dict[int, int] = {}
        self.mask = 0

    def add(self, start: int, end: int) -> None:
        """Record the free gap ``[start, end)`` (ignored when empty)."""
        if end > start:
            k = (end - start).bit_length() - 1
            insort(self.ends[k], end)
            self.start_of[end] = start
            self.mask |= 1 << k

    def remove(self, start: int, end: int) -> None:
        """Forget the free gap ``[start, end)``, which must have been added."""
        if end > start:
            k = (end - start).bit_length() - 1
            bucket = self.ends[k]
            del bucket[bisect_left(bucket, end)]
            del self.start_of[end]
            if not bucket:
                self.mask &= ~(1 << k)

    def highest(self, length: int, low: int, high: int) -> int:
        """The highest gap end ``e <= high`` of a gap holding ``length`` bytes above ``low``,
        or -1. Gaps that straddle ``high`` are the caller's business."""
        best = -1
        mask = self.mask >> (length.bit_length() - 1) << (length.bit_length() - 1)
        start_of = self.start_of
        while mask:
            bit = mask & -mask
            mask ^= bit
            k = bit.bit_length() - 1
            bucket = self.ends[k]
            j = bisect_right(bucket, high) - 1
            while j >= 0 and bucket[j] > best:
                end = bucket[j]
                start = start_of[end]
                if end - max(start, low) >= length:
                    best = end
                    break
                if bit >= length or start < low:
                    break  # lower gaps of this bucket fit no better
                j -= 1
        return best


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


class VmaList:
    """VMAs in address order, indexed ``0..len-1`` from the lowest.

    Stored highest first (with a parallel list of negated starts for bisect), so that top-down
    placement, which puts each new VMA below all others, appends to the end of the Python
    lists instead of inserting at their front: an mmap+munmap pair stays O(log n) as regions
    grow, as with Linux's maple tree. Negative indices are not supported.
    """

    __slots__ = ("_neg", "_store")

    def __init__(self) -> None:
        self._store: list[Vma] = []
        self._neg: list[int] = []

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i: int) -> Vma:
        return self._store[len(self._store) - 1 - i]

    def __iter__(self) -> Iterator[Vma]:
        return reversed(self._store)

    def count_le(self, addr: int) -> int:
        """How many VMAs start at or below ``addr`` (bisect_right on the starts)."""
        return len(self._neg) - bisect_left(self._neg, -addr)

    def count_lt(self, addr: int) -> int:
        """How many VMAs start below ``addr`` (bisect_left on the starts)."""
        return len(self._neg) - bisect_right(self._neg, -addr)

    def slice(self, i0: int, i1: int) -> list[Vma]:
        """``vmas[i0:i1]`` in address order."""
        n = len(self._store)
        return self._store[n - i1: n - i0][::-1]

    def replace(self, i0: int, i1: int, new: list[Vma]) -> None:
        """``vmas[i0:i1] = new`` (``new`` in address order)."""
        n = len(self._store)
        self._store[n - i1: n - i0] = new[::-1]
        self._neg[n - i1: n - i0] = [-v.start for v in reversed(new)]

    def starts_consistent(self) -> bool:
        """True when the bisect keys match the VMAs (for invariant checks)."""
        return self._neg == [-v.start for v in self._store]
