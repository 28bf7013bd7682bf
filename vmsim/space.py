"""The simulated address space: Linux's mmap/munmap/mprotect over a software MMU.

Top of ``vmsim``'s core: :class:`AddressSpace` is the simulated ``Mmap`` backend. It imports
only ``loader.mmap`` and ``loader.pages`` from the project, plus its own ``vmsim.mmu`` (page
table, frames), ``vmsim.vma`` (VMAs, files, gaps) and ``vmsim.fault``.

Two layers, as in the kernel:

* **kernel**: a sorted list of :class:`~vmsim.vma.Vma` (bisect on starts) and a free-gap
  index carry mmap semantics: argument checks in Linux's order, top-down placement, MAP_FIXED
  replacement, splitting and merging with the hidden state that decides it, vm.max_map_count.
* **MMU**: PTE words in numpy tables, filled on demand. An access walks them; a page that is
  not present (or not writable, for a write) is a page fault, handled by the kernel layer:
  map the zero page, allocate a frame, share the file's page-cache page until the first write
  (copy-on-write), or raise :class:`~vmsim.fault.Fault`.

File pages are read from the caller's file with ``os.pread`` when used: the page cache here
cannot see writes made to the file by others, so a page-cache frame is refreshed from the file
on every access that goes through it (a private page stops doing so once copied).

Known differences from Linux (each a choice, not an accident):

* a file size change made outside the simulator is noticed at the next access to the file; a
  shrink and a regrow between two accesses keep private copies the kernel would have dropped
  (``AddressSpace.ftruncate`` applies a shrink at once, as the kernel does);
* only regular files and ``/dev/zero`` can be mapped (another device gives ENODEV);
* MAP_HUGETLB gives ENOMEM for anonymous memory (no huge pages reserved; Linux maps it with
  MAP_NORESERVE), EINVAL for files and for huge page sizes this machine lacks;
  MAP_LOCKED is not limited by RLIMIT_MEMLOCK; RLIMIT_AS is not checked; overcommit is the
  heuristic mode's single-request limit (MemTotal + SwapTotal);
* MAP_GROWSDOWN mappings never grow and get no stack guard gap in placement;
* a Fault's address is the first faulting byte in address order (a CPU's copy loop may touch
  another page first); overlapping words in one ``write_words`` land in unspecified order;
* page-table pages are not freed by munmap (they are reused while the space lives);
* a mapped file is read through a descriptor of the simulator's own: one dup per open file
  description while another descriptor of the process shares it (to tell a dup'd fd from a
  second open), else one per file; when the host has none left, mmap fails with EMFILE;
* a read is checked whole before it touches a page: one that faults changes nothing (a CPU
  would have faulted in the pages before the bad byte); reads longer than
  ``loader.mmap.MAX_READ`` (4 GiB) are refused with ENOMEM (after that check: a bad byte
  still faults first).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import operator
import os
import stat
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.mmap import (
    MAX_READ,
    MapFlags,
    Mapping,
    MmapDefaults,
    MmapError,
    ProtFlags,
    Region,
    as_addresses,
)
from loader.pages import HOST_PAGE_SIZE
from vmsim.fault import Fault, Stats
from vmsim.mmu import (
    PTE_COW,
    PTE_FILE,
    PTE_FRAME,
    PTE_NX,
    PTE_P,
    PTE_PKEY_SHIFT,
    PTE_PROTNONE,
    PTE_U,
    PTE_W,
    FramePool,
    PageTable,
)
from vmsim.vma import (
    VM_ACCESS,
    VM_ACCOUNT,
    VM_DROPPABLE,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_NORESERVE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    GapIndex,
    Inode,
    OpenFile,
    Shmem,
    Vma,
    VmaList,
    same_open_file,
)

__all__ = ["AddressSpace"]

_WORD = 1 << 64
_M64 = _WORD - 1

# mmap(2) flag values as plain ints (the hot path avoids enum arithmetic)
_MAP_SHARED, _MAP_PRIVATE, _MAP_VALIDATE, _MAP_DROPPABLE, _MAP_TYPE = 0x1, 0x2, 0x3, 0x8, 0xF
_MAP_FIXED, _MAP_ANON, _MAP_32BIT, _MAP_GROWSDOWN = 0x10, 0x20, 0x40, 0x100
_MAP_LOCKED, _MAP_NORESERVE, _MAP_POPULATE, _MAP_STACK = 0x2000, 0x4000, 0x8000, 0x20000
_MAP_NONBLOCK = 0x10000
_MAP_HUGETLB, _MAP_NOREPLACE = 0x40000, 0x100000
_MAP_HUGE_SHIFT, _MAP_HUGE_MASK = 26, 0x3F
_LEGACY_MAP_MASK = (0x1 | 0x2 | 0x10 | 0x20 | 0x800 | 0x1000 | 0x4000000 | 0x100 | 0x2000
                    | 0x4000 | 0x8000 | 0x10000 | 0x20000 | 0x40000
                    | 0x40 | 0x80 | (21 << _MAP_HUGE_SHIFT) | (30 << _MAP_HUGE_SHIFT))
"""include/linux/mman.h: the flags MAP_SHARED_VALIDATE accepts for any file, with x86's
MAP_32BIT and MAP_ABOVE4G (0x80) and the MAP_HUGE_2MB and MAP_HUGE_1GB size bits."""
_PROT_READ, _PROT_EXEC, _PROT_SEM = 0x1, 0x4, 0x8
_PROT_GROWSDOWN, _PROT_GROWSUP = 0x01000000, 0x02000000
_PMD_SIZE = 2 << 20
_EXEC_ONLY_PKEY = 1
_PROTS = [ProtFlags(p) for p in range(8)]

_U64 = np.uint64
_N_P, _N_W, _N_PW = _U64(PTE_P), _U64(PTE_W), _U64(PTE_P | PTE_W)
_N_HAS = _U64(PTE_P | PTE_PROTNONE)
_N_COW, _N_FILE, _N_SHARED = _U64(PTE_COW), _U64(PTE_FILE), _U64(PTE_COW | PTE_FILE)
_N_KEEP = _U64(PTE_FRAME | PTE_COW | PTE_FILE)
_N_FRAME = _U64(PTE_FRAME)
_N_12 = _U64(12)


def _as_size(value: int) -> int:
    """``value`` as the kernel's unsigned long sees it (the same cast as loader.libc)."""
    if -(1 << 63) <= value < _WORD:
        return value % _WORD
    return (_WORD - HOST_PAGE_SIZE) | (value & (HOST_PAGE_SIZE - 1))


def _as_int_arg(value: int) -> int:
    """A C ``int`` argument (prot, flags) as the kernel's unsigned long receives it:
    truncated to 32 bits, then sign-extended."""
    value = int(value) & 0xFFFF_FFFF
    return (value - (1 << 32)) & _M64 if value >= 1 << 31 else value


@functools.cache
def _meminfo_pages(page_size: int) -> int:
    """MemTotal + SwapTotal in pages: the heuristic overcommit limit for one mapping."""
    total = 0
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith(("MemTotal:", "SwapTotal:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 1 << 40
    return total // page_size or 1 << 40


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


MIN_PAGE_SIZE = 1 << 12
MAX_PAGE_SIZE = 1 << 16
_USER_TOP = 1 << 47


def _check_knobs(page_size: int, max_map_count: int, mmap_base: int, mmap_min_addr: int) -> None:
    """ValueError naming the first constructor knob out of range: page_size must be a power
    of two in [MIN_PAGE_SIZE, MAX_PAGE_SIZE], max_map_count non-negative, mmap_min_addr and
    mmap_base inside the 47-bit user space."""
    if (not isinstance(page_size, int) or page_size & (page_size - 1)
            or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE):
        raise ValueError(f"page_size={page_size!r}: must be a power of two from "
                         f"{MIN_PAGE_SIZE:#x} to {MAX_PAGE_SIZE:#x} (4 KiB to 64 KiB)")
    if max_map_count < 0:
        raise ValueError(f"max_map_count={max_map_count}: must be >= 0")
    if not 0 <= mmap_min_addr < _USER_TOP:
        raise ValueError(f"mmap_min_addr={mmap_min_addr:#x}: must be in [0, {_USER_TOP:#x})")
    if not 0 < mmap_base <= _USER_TOP:
        raise ValueError(f"mmap_base={mmap_base:#x}: must be in (0, {_USER_TOP:#x}]")


_DEV_ZERO = os.makedev(1, 5)
"""The device number of /dev/zero (drivers/char/mem.c), the one character device that maps."""


def _paged(file: OpenFile | Shmem | None) -> bool:
    """True when a VMA's pages come from a file's page cache (not /dev/zero, not shmem)."""
    return isinstance(file, OpenFile) and not file.zero


_SWEEP_MIN = 64
"""How many descriptors an AddressSpace holds before it first looks for dups to let go."""


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


def _sized(file: OpenFile | Shmem | None) -> bool:
    """True when a VMA's pages have an end (a file's or shmem's size) past which an access
    raises SIGBUS."""
    return isinstance(file, Shmem) or _paged(file)


@functools.cache
def _huge_page_logs() -> frozenset[int]:
    """log2 of the huge page sizes this machine's kernel has (its hstates, from
    /sys/kernel/mm/hugepages); x86-64's 2 MiB when that cannot be read."""
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return frozenset({21})
    logs = {(int(n.removeprefix("hugepages-").removesuffix("kB")) << 10).bit_length() - 1
            for n in names if n.startswith("hugepages-") and n.endswith("kB")}
    return frozenset(logs) or frozenset({21})


def _close_all(fds: set[int]) -> None:
    """Close the fds an AddressSpace still holds (its finalizer)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _fail(code: int, detail: str) -> MmapError:
    """An MmapError with ``code`` and a message naming the call, field and value."""
    return MmapError(code, detail)


class AddressSpace(MmapDefaults):
    """A simulated process address space: the ``Mmap`` protocol with Linux's semantics.

    ``exec_only``: PROT_EXEC-only memory is unreadable (CPUs with protection keys); pass
    ``loader.libc.host_has_pkeys()`` to compare with this machine's kernel.
    ``max_map_count``, ``mmap_base`` (top-down placement starts below it), ``mmap_min_addr``
    (hints below it are raised to it) and ``privileged`` (may MAP_FIXED below it) are the
    kernel's knobs; the user space ends at ``2**47 - page_size``. ``read_implies_exec`` is the
    personality flag, settable at any time. ``page_size`` is a power of two from 4 KiB to
    64 KiB (the page sizes Linux runs with: x86's 4 KiB, arm64's 16 KiB and 64 KiB); a bad knob
    raises ValueError naming it, before anything is allocated.
    """

    runs_code = False  # a simulation: nothing it maps can run in this process (loader.Mmap)

    def __init__(self, *, page_size: int = HOST_PAGE_SIZE, exec_only: bool = True,
                 max_map_count: int = 65530, mmap_base: int = 0x7F00_0000_0000,
                 mmap_min_addr: int = 0x10000, privileged: bool = False) -> None:
        _check_knobs(page_size, max_map_count, mmap_base, mmap_min_addr)
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1
        self._pmask = page_size - 1
        self.exec_only = exec_only
        self.read_implies_exec = False
        self.max_map_count = max_map_count
        self.task_size = (1 << 47) - page_size
        self.mmap_base = mmap_base & ~self._pmask
        self.mmap_min_addr = mmap_min_addr
        self.privileged = privileged
        self.commit_limit_pages = _meminfo_pages(page_size)
        self._legacy_base = (self.task_size // 3) & ~self._pmask
        self._vmas = VmaList()
        self._gaps = GapIndex()
        self._gaps.add(0, self.task_size)
        self._pt = PageTable(self._shift)
        self._pool = FramePool(page_size)
        self._files: dict[tuple[int, int], list[OpenFile]] = {}
        self._inodes: dict[tuple[int, int], Inode] = {}
        self._anon_seq = 0
        self._shmem_seq = 0
        self._faults = 0
        self._cows = 0
        self._owned_fds: set[int] = set()
        self._sweep_at = _SWEEP_MIN
        self._unmerged_possible = False
        weakref.finalize(self, _close_all, self._owned_fds)

    # ---------------------------------------------------------------- the Mmap protocol

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """mmap(2), simulated: checks in Linux's order (see shared/linux-mm.md), then maps.

        As loader.libc does, ``fd`` None without MAP_ANONYMOUS maps writable anonymous memory
        and answers ``need_copy=True``. Raises MmapError with Linux's errno.
        """
        need_copy = fd is None and not flags & _MAP_ANON
        if need_copy:
            prot, flags = ProtFlags(3), flags | MapFlags.MAP_ANONYMOUS
        c_fd = -1 if fd is None or not -(1 << 31) <= fd < 1 << 31 else fd
        start = self._do_mmap(0 if addr is None else _as_size(addr), _as_size(length),
                              _as_int_arg(prot), _as_int_arg(flags), _as_size(offset), c_fd)
        return Mapping(start, need_copy)

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """mmap(2) of zero-filled memory: ``flags`` plus MAP_ANONYMOUS, no file."""
        return self._do_mmap(_as_size(addr), _as_size(length), _as_int_arg(prot),
                             _as_int_arg(flags) | _MAP_ANON, 0, -1)

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Reserve as loader.libc does: private anonymous, PROT_NONE when ``use_file``, else
        PROT_WRITE; ``addr`` is a hint."""
        prot = 0 if use_file else 2
        return self._do_mmap(0 if addr is None else _as_size(addr), _as_size(length), prot,
                             _MAP_PRIVATE | _MAP_ANON, 0, -1)

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2): remove every mapping in the range (holes are fine), splitting at the
        ends. EINVAL for an unaligned, empty, kernel-half or wrapping range; ENOMEM when a
        split in three would pass vm.max_map_count."""
        start, length = _as_size(addr), _as_size(length)
        task = self.task_size
        if start & self._pmask or start > task or length > task - start:
            raise _fail(errno.EINVAL, f"munmap: addr={addr:#x} length={length:#x} is unaligned"
                        f" or not below the user space end {task:#x}")
        end = start + ((length + self._pmask) & ~self._pmask)
        if end == start:
            raise _fail(errno.EINVAL, "munmap: length=0")
        i = self._first_ending_after(start)
        vmas = self._vmas
        if i == len(vmas) or vmas[i].start >= end:
            return
        vma = vmas[i]
        if vma.start < start and vma.end > end and len(vmas) >= self.max_map_count:
            raise _fail(errno.ENOMEM, f"munmap: splitting {vma.start:#x}-{vma.end:#x} in three"
                        f" would pass max_map_count={self.max_map_count}")
        self._zap(start, end)
        self._cut(start, end)

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """mprotect(2), not atomic as in Linux: mappings before a hole or a refused one are
        already changed when ENOMEM or EACCES is raised."""
        start, length, uprot = _as_size(addr), _as_size(length), _as_int_arg(prot)
        grows = uprot & (_PROT_GROWSDOWN | _PROT_GROWSUP)
        uprot &= ~grows
        if grows == _PROT_GROWSDOWN | _PROT_GROWSUP:
            raise _fail(errno.EINVAL, f"mprotect: prot={uprot | grows:#x} has both GROWS bits")
        if start & self._pmask:
            raise _fail(errno.EINVAL, f"mprotect: addr={start:#x} is not page-aligned")
        if not length:
            return
        end = (start + ((length + self._pmask) & ~self._pmask)) & _M64
        if end <= start:
            raise _fail(errno.ENOMEM, f"mprotect: addr={start:#x} length={length:#x} wraps")
        if uprot & ~(VM_ACCESS | _PROT_SEM):
            raise _fail(errno.EINVAL, f"mprotect: prot={uprot:#x} has unknown bits")
        self._mprotect(start, end, uprot, grows)

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` as a user-mode load: raises Fault as the kernel would
        signal (SIGSEGV unmapped or not readable, SIGBUS past a file's end) for the first bad
        byte, found before any work is done (nothing proportional to ``n`` is allocated for a
        read that faults). ValueError for a negative ``n``; MmapError(ENOMEM) for a valid
        read longer than :data:`MAX_READ`. Reading untouched anonymous memory allocates no
        frames (the zero page is mapped)."""
        return self._load(addr, n, "r")

    def read_into(self, addr: int, out: Any) -> None:
        """Fill the writable buffer ``out`` (bytearray, numpy array, memoryview) with the bytes
        at ``addr``, checked as :meth:`read`: the bulk path that skips making a bytes object.
        ``out`` is left unchanged when the read faults."""
        dst = np.frombuffer(out, dtype=np.uint8)
        if not len(dst):
            return
        addr = int(addr) & _M64
        self._precheck(addr, len(dst), "r")
        dst[:] = self._gather(addr, len(dst), "r")

    def fetch(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` as an instruction fetch: needs PROT_EXEC (NX)."""
        return self._load(addr, n, "x")

    def peek(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` as a debugger reads them (ptrace): any protection, PROT_NONE
        included. Still raises Fault for unmapped addresses and file pages past EOF (where
        ptrace fails with EIO), checked before any work, and the limits of :meth:`read`."""
        return self._load(addr, n, "p")

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr`` as user-mode stores: raises Fault like :meth:`read`, after
        storing the bytes before the faulting page (as a copy loop would)."""
        self._store(addr, data, "w")

    def poke(self, addr: int, data: bytes) -> None:
        """Store as a debugger does (ptrace POKEDATA, FOLL_FORCE): private mappings are written
        whatever their protection (the page is copied, as a breakpoint is set in read-only
        code); shared mappings only when writable. Raises Fault (SEGV_ACCERR) otherwise, and
        SEGV_MAPERR for unmapped addresses."""
        self._store(addr, data, "P")

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Store 64-bit little-endian ``values[i]`` at ``addrs[i]``, with :meth:`write`'s
        checks, as one numpy scatter. On a fault, the words before the first faulting one
        (in array order) are stored, then the Fault is raised. Addresses wrap modulo 2**64
        (a negative one faults in the kernel half). Raises ValueError when the shapes
        differ. Overlapping words: the later one wins."""
        where = as_addresses(addrs)
        words = np.asarray(values, dtype="<u8").ravel()
        if where.shape != words.shape:
            raise ValueError(f"write_words: {where.size} addresses but {words.size} values")
        if where.size:
            self._write_words(where, words)

    def maps(self) -> list[Region]:
        """The mappings as ``/proc/self/maps`` shows them (merged lines, file paths with
        `` (deleted)`` once unlinked, shared anonymous memory as ``/dev/zero (deleted)``)."""
        paths: dict[int, str] = {}
        out = []
        shift = self._shift
        for v in self._vmas:
            f = v.file
            prot, shared = _PROTS[v.flags & VM_ACCESS], bool(v.flags & VM_MAYSHARE)
            if f is None:
                out.append(Region(v.start, v.end, prot, shared))
            elif isinstance(f, Shmem):
                out.append(Region(v.start, v.end, prot, shared, v.pgoff << shift, f.dev, f.ino,
                                  f.path))
            else:
                path = paths.get(id(f))
                if path is None:
                    path = paths[id(f)] = f.path()
                out.append(Region(v.start, v.end, prot, shared, v.pgoff << shift, f.inode.dev,
                                  f.inode.ino, path))
        return out

    @property
    def stats(self) -> Stats:
        """The counters (see :class:`~vmsim.fault.Stats`); resident pages are counted now."""
        resident = 0
        tables = self._pt.tables
        for row in self._pt.leaves.values():
            ptes = tables[row]
            resident += int(np.count_nonzero(((ptes & _N_HAS) != 0) & ((ptes & _N_FRAME) != 0)))
        return Stats(self._faults, self._cows, resident, self._pool.in_use, self._pt.count)

    @property
    def map_count(self) -> int:
        """How many VMAs there are (what vm.max_map_count limits)."""
        return len(self._vmas)

    def check_access(self, addr: int, n: int, access: str) -> Fault | None:
        """The Fault a user-mode access (``"r"``, ``"w"``, ``"x"``) of ``n`` bytes at ``addr``
        would raise, or None; changes nothing (only notices file size changes). Costs a walk
        over the VMAs of the range, whatever ``n``. ValueError for another ``access``."""
        if access not in ("r", "w", "x"):
            raise ValueError(f"check_access: access={access!r} is not 'r', 'w' or 'x'")
        return self._first_fault(int(addr) & _M64, max(operator.index(n), 1), access)

    def _first_fault(self, addr: int, n: int, access: str) -> Fault | None:
        """The Fault of the first byte of ``[addr, addr+n)`` that ``access`` (any mode of
        :meth:`_allowed`) cannot touch, or None."""
        acc = "w" if access == "P" else ("r" if access == "p" else access)
        try:
            for i, a, b in self._segments(addr, n, access):
                stop = self._eof_check(i, a, b, acc)
                if stop < b:
                    return Fault(stop, acc, "SIGBUS", "BUS_ADRERR")
        except Fault as fault:
            return fault
        return None

    def pte(self, addr: int) -> int:
        """The PTE word for ``addr`` (0 when none), read by a full page-table walk."""
        return self._pt.walk(addr & _M64) if addr & _M64 < self.task_size else 0

    def ftruncate(self, fd: int, length: int) -> None:
        """``os.ftruncate(fd, length)``, and what the kernel does at once on a shrink: drop
        the file's pages past the new end from every mapping, private copies included.
        (A size change made elsewhere is noticed at the next access to the file.) The host's
        OSError (bad fd, negative length) is raised as MmapError with its errno."""
        self._host(os.ftruncate, fd, length)
        st = self._host(os.fstat, fd)
        inode = self._inodes.get((st.st_dev, st.st_ino))
        if inode is not None:
            self._resize(inode, st.st_size)

    def close(self) -> None:
        """Unmap everything and close the simulator's own dups of mapped files' fds. (An
        AddressSpace dropped without close() closes them when garbage-collected.)"""
        self.munmap(0, self.task_size)
        _close_all(self._owned_fds)

    def __enter__(self) -> AddressSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- kernel: mmap

    def _do_mmap(self, addr: int, length: int, prot: int, flags: int, off: int,
                 fd: int) -> int:
        """The syscall body: Linux's checks in order, placement, then the new VMA."""
        pmask = self._pmask
        if off & pmask:
            raise _fail(errno.EINVAL, f"mmap: offset={off:#x} is not page-aligned")
        file: OpenFile | None = None
        if not flags & _MAP_ANON:
            file = self._open_file(fd)
            if flags & _MAP_HUGETLB:
                raise _fail(errno.EINVAL, "mmap: MAP_HUGETLB on a file not on hugetlbfs")
        elif flags & _MAP_HUGETLB:
            self._hugetlb_anon(addr, length, flags)
        if not length:
            raise _fail(errno.EINVAL, "mmap: length=0")
        if prot & _PROT_READ and self.read_implies_exec and not (file and file.noexec):
            prot |= _PROT_EXEC
        if flags & _MAP_NOREPLACE:
            flags |= _MAP_FIXED
        if not flags & _MAP_FIXED:
            addr &= ~pmask
            if addr and addr < self.mmap_min_addr:
                addr = (self.mmap_min_addr + pmask) & ~pmask
        length = (length + pmask) & ~pmask & _M64
        if not length:
            raise _fail(errno.ENOMEM, "mmap: length rounds past the end of the address space")
        pgoff = off >> self._shift
        if len(self._vmas) > self.max_map_count:
            raise _fail(errno.ENOMEM, f"mmap: {len(self._vmas)} mappings exceed "
                        f"max_map_count={self.max_map_count}")
        task = self.task_size
        if length > task:
            raise _fail(errno.ENOMEM, f"mmap: length={length:#x} exceeds the user space")
        if not flags & _MAP_FIXED:
            addr = self._get_area(addr, length, flags, file, pgoff)
        if addr > task - length:
            raise _fail(errno.ENOMEM, f"mmap: {addr:#x}+{length:#x} passes the user space end")
        if addr & pmask:
            raise _fail(errno.EINVAL, f"mmap: MAP_FIXED addr={addr:#x} is not page-aligned")
        if addr < self.mmap_min_addr and not self.privileged:
            raise _fail(errno.EPERM, f"mmap: addr={addr:#x} below mmap_min_addr")
        if flags & _MAP_NOREPLACE and self._overlaps(addr, addr + length):
            raise _fail(errno.EEXIST, f"mmap: MAP_FIXED_NOREPLACE over a mapping at {addr:#x}")
        vm_flags = (prot & VM_ACCESS) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
        if flags & (_MAP_GROWSDOWN | _MAP_LOCKED | _MAP_STACK):
            vm_flags |= ((VM_GROWSDOWN if flags & _MAP_GROWSDOWN else 0)
                         | (VM_LOCKED if flags & _MAP_LOCKED else 0)
                         | (VM_NOHUGEPAGE if flags & _MAP_STACK else 0))
        if file is not None:
            vm_flags = self._file_flags(file, vm_flags, flags, prot, pgoff, length)
        else:
            vm_flags, pgoff = self._anon_flags(vm_flags, flags, addr)
        if flags & _MAP_NORESERVE:
            vm_flags |= VM_NORESERVE
        return self._map_region(addr, length, vm_flags, file, pgoff, flags)

    def _hugetlb_anon(self, addr: int, length: int, flags: int) -> None:
        """Anonymous MAP_HUGETLB, as ksys_mmap_pgoff and do_mmap treat it on a machine with
        no huge pages reserved: EINVAL for a huge page size the kernel lacks (bits 26-31,
        0 for the default), a zero length, a map type a file mapping refuses, MAP_GROWSDOWN
        or a MAP_FIXED address not aligned to the huge page; else ENOMEM. (Linux maps it
        with MAP_NORESERVE, faulting with SIGBUS later: not simulated, ENOMEM too.)"""
        log = (flags >> _MAP_HUGE_SHIFT) & _MAP_HUGE_MASK
        if log and log not in _huge_page_logs():
            raise _fail(errno.EINVAL, f"mmap: MAP_HUGETLB size bits {log} (2**{log} bytes): "
                        f"no such huge page size here ({sorted(_huge_page_logs())})")
        huge = 1 << (log or 21)
        if not length:
            raise _fail(errno.EINVAL, "mmap: length=0")
        maptype = flags & _MAP_TYPE
        if maptype not in (_MAP_SHARED, _MAP_PRIVATE, _MAP_VALIDATE):
            raise _fail(errno.EINVAL, f"mmap: map type {maptype:#x} with MAP_HUGETLB")
        if maptype == _MAP_VALIDATE and flags & ~_LEGACY_MAP_MASK:
            raise _fail(errno.EOPNOTSUPP, f"mmap: MAP_SHARED_VALIDATE with flags={flags:#x}")
        if flags & _MAP_GROWSDOWN:
            raise _fail(errno.EINVAL, "mmap: MAP_GROWSDOWN with MAP_HUGETLB")
        if flags & (_MAP_FIXED | _MAP_NOREPLACE) and addr & (huge - 1):
            raise _fail(errno.EINVAL, f"mmap: MAP_HUGETLB at addr={addr:#x}, not aligned to "
                        f"its huge page size {huge:#x}")
        raise _fail(errno.ENOMEM, "mmap: MAP_HUGETLB: no huge pages reserved")

    def _anon_flags(self, vm_flags: int, flags: int, addr: int) -> tuple[int, int]:
        """The anonymous half of do_mmap's map-type checks (EINVAL for a bad type or
        combination; ENOMEM for MAP_HUGETLB: no huge pages here); returns vm_flags and the
        page offset Linux gives (``addr``'s page for private memory, 0 for shared)."""
        maptype = flags & _MAP_TYPE
        if maptype == _MAP_PRIVATE:
            pgoff = addr >> self._shift
        elif maptype == _MAP_SHARED:
            if vm_flags & VM_GROWSDOWN:
                raise _fail(errno.EINVAL, "mmap: MAP_GROWSDOWN on shared anonymous memory")
            pgoff = 0
            vm_flags |= VM_SHARED | VM_MAYSHARE
        elif maptype == _MAP_DROPPABLE:
            if flags & (_MAP_LOCKED | _MAP_HUGETLB) or vm_flags & VM_GROWSDOWN:
                raise _fail(errno.EINVAL, f"mmap: MAP_DROPPABLE with flags={flags:#x}")
            vm_flags |= VM_DROPPABLE | VM_NORESERVE
            pgoff = addr >> self._shift
        else:
            raise _fail(errno.EINVAL, f"mmap: map type {maptype:#x} is not MAP_SHARED or "
                        "MAP_PRIVATE")
        return vm_flags, pgoff

    def _file_flags(self, file: OpenFile, vm_flags: int, flags: int, prot: int, pgoff: int,
                    length: int) -> int:
        """The file half of do_mmap's checks (EOVERFLOW, EOPNOTSUPP, EACCES, EPERM, ENODEV,
        EINVAL in that order); returns vm_flags with VM_SHARED/VM_MAY* settled."""
        maxsize = (1 << 63) - 1
        if length > maxsize or pgoff > (maxsize - length) >> self._shift:
            raise _fail(errno.EOVERFLOW, f"mmap: offset page {pgoff:#x} + length {length:#x}"
                        " passes the largest file size")
        maptype = flags & _MAP_TYPE
        if maptype in (_MAP_SHARED, _MAP_VALIDATE):
            if maptype == _MAP_SHARED:
                flags &= _LEGACY_MAP_MASK
            if flags & ~_LEGACY_MAP_MASK:
                raise _fail(errno.EOPNOTSUPP, f"mmap: MAP_SHARED_VALIDATE with flags={flags:#x}")
            if prot & VM_WRITE and not file.writable:
                raise _fail(errno.EACCES, "mmap: shared PROT_WRITE of a file not open for writing")
            vm_flags |= VM_SHARED | VM_MAYSHARE
            if not file.writable:
                vm_flags &= ~(VM_MAYWRITE | VM_SHARED)
        elif maptype != _MAP_PRIVATE:
            raise _fail(errno.EINVAL, f"mmap: map type {maptype:#x} is not MAP_SHARED or "
                        "MAP_PRIVATE")
        if not file.readable:
            raise _fail(errno.EACCES, "mmap: file not open for reading")
        if file.noexec:
            if vm_flags & VM_EXEC:
                raise _fail(errno.EPERM, "mmap: PROT_EXEC of a file on a noexec mount")
            vm_flags &= ~VM_MAYEXEC
        if file.inode.key[0] < 0:
            raise _fail(errno.ENODEV, "mmap: not a regular file")
        if vm_flags & VM_GROWSDOWN:
            raise _fail(errno.EINVAL, "mmap: MAP_GROWSDOWN on a file")
        return vm_flags

    def _open_file(self, fd: int) -> OpenFile:
        """The OpenFile for ``fd``: an existing one when fd shares its open file description
        (a dup), else a new, not yet registered one. EBADF for a bad or O_PATH fd."""
        try:
            st = os.fstat(fd) if fd >= 0 else None
            fl = fcntl.fcntl(fd, fcntl.F_GETFL) if st else 0
        except OSError:
            st = None
        if st is None or fl & getattr(os, "O_PATH", 0o10000000):
            raise _fail(errno.EBADF, f"mmap: fd={fd} is not an open file")
        key = (st.st_dev, st.st_ino)
        for known in self._files.get(key, ()):
            if known.fd >= 0 and same_open_file(known.fd, fd):
                return known
        zero = stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_ZERO
        inode = self._inodes.get(key)
        if inode is None:
            inode = Inode(st.st_dev, st.st_ino, st.st_size)
            if not stat.S_ISREG(st.st_mode) and not zero:
                inode.key = (-1, st.st_ino)
        try:
            noexec = bool(os.fstatvfs(fd).f_flag & os.ST_NOEXEC)
        except OSError:
            noexec = False
        acc = fl & os.O_ACCMODE
        opened = OpenFile(fd, inode, acc in (os.O_RDONLY, os.O_RDWR),
                          acc in (os.O_WRONLY, os.O_RDWR), noexec)
        opened.zero = zero
        opened.thp = zero or _fs_type(st.st_dev) in _THP_FILESYSTEMS
        return opened

    def _get_area(self, addr: int, length: int, flags: int, file: OpenFile | None,
                  pgoff: int) -> int:
        """get_unmapped_area for a non-fixed mapping: THP-aligned for private anonymous
        multiples of 2 MiB without a hint and for files on filesystems that ask for it
        (ext4, xfs), else the plain search; ENOMEM if nowhere."""
        anon = file is None and flags & _MAP_TYPE != _MAP_SHARED
        if file is not None and file.zero and flags & _MAP_SHARED:
            file = None  # get_unmapped_area_zero: shared /dev/zero is placed as shmem
        if (file is not None and file.thp) or (anon and not addr and not length % _PMD_SIZE):
            got = self._thp_area(addr, length, flags, pgoff << self._shift)
            if got >= 0:
                return got
        got = self._area(addr, length, flags)
        if got < 0:
            raise _fail(errno.ENOMEM, f"mmap: no free range of length={length:#x}")
        return got

    def _area(self, addr: int, length: int, flags: int) -> int:
        """The hint if free, else top-down below mmap_base, else bottom-up (MAP_32BIT: the
        lowest fit in [1 GiB, 2 GiB)); -1 if nowhere."""
        if flags & _MAP_32BIT:
            return self._bottomup(length, 0x4000_0000, 0x8000_0000)
        if addr and self.task_size - length >= addr and self._is_free(addr, addr + length):
            return addr
        got = self._topdown(length, self.page_size, self.mmap_base)
        if got < 0:
            got = self._bottomup(length, self._legacy_base, self.task_size)
        return got

    def _thp_area(self, addr: int, length: int, flags: int, off: int) -> int:
        """__thp_get_unmapped_area: search with 2 MiB of padding, then place the mapping so
        that file offset and address agree modulo 2 MiB (the hint, if the padded range
        fits there, is kept as is); -1 when the padded search fails or THP cannot apply."""
        size = _PMD_SIZE
        off_align = (off + size - 1) & ~(size - 1)
        if off + length <= off_align or off + length - off_align < size:
            return -1
        got = self._area(addr, length + size, flags)
        if got < 0 or got == addr:
            return got
        sub = (off - got) & (size - 1)
        return got + (sub if sub else size)

    def _topdown(self, length: int, low: int, high: int) -> int:
        """Start of the highest free range of ``length`` in ``[low, high)``, or -1."""
        i = self._vmas.count_lt(high)
        gap_start = self._vmas[i - 1].end if i else 0
        gap_end = self._vmas[i].start if i < len(self._vmas) else self.task_size
        if gap_start < high <= gap_end and high - max(gap_start, low) >= length:
            return high - length
        end = self._gaps.highest(length, low, high)
        return end - length if end >= 0 else -1

    def _bottomup(self, length: int, low: int, high: int) -> int:
        """Start of the lowest free range of ``length`` in ``[low, high)``, or -1 (a scan:
        only used when top-down placement fails or for MAP_32BIT)."""
        vmas = self._vmas
        edge = low
        for i in range(self._first_ending_after(low), len(vmas) + 1):
            nxt = vmas[i].start if i < len(vmas) else self.task_size
            if min(nxt, high) - edge >= length:
                return edge
            if nxt >= high:
                return -1
            edge = max(edge, vmas[i].end)
        return -1

    def _map_region(self, addr: int, length: int, vm_flags: int, file: OpenFile | None,
                    pgoff: int, flags: int) -> int:
        """mmap_region: replace what lies in the range, account, insert (merging)."""
        end = addr + length
        vmas = self._vmas
        i = self._first_ending_after(addr)
        if i < len(vmas) and vmas[i].start < end:
            vma = vmas[i]
            if vma.start < addr and vma.end > end and len(vmas) >= self.max_map_count:
                raise _fail(errno.ENOMEM, f"mmap: MAP_FIXED splitting {vma.start:#x}-"
                            f"{vma.end:#x} would pass max_map_count={self.max_map_count}")
        if vm_flags & (VM_NORESERVE | VM_SHARED | VM_WRITE) == VM_WRITE:
            self._charge(length)
            vm_flags |= VM_ACCOUNT
        vfile: OpenFile | Shmem | None = file
        if vm_flags & VM_SHARED and (file is None or file.zero):
            self._shmem_seq += 1  # shmem_zero_setup: /dev/zero's shared mappings are shmem
            vfile = Shmem(self._shmem_seq, length >> self._shift)
        if vfile is not None:
            self._use(vfile)  # the call's own reference: replacing the file's other
        try:                  # mappings must not close it
            if i < len(vmas) and vmas[i].start < end:
                self._zap(addr, end)
                i = self._cut(addr, end)
            self._insert(i, Vma(addr, end, vm_flags, pgoff, vfile, 0))
        finally:
            if vfile is not None:
                self._unuse(vfile)
        populate = (vm_flags & VM_LOCKED
                    or flags & (_MAP_POPULATE | _MAP_NONBLOCK) == _MAP_POPULATE)
        if populate and vm_flags & VM_ACCESS:
            self._populate(addr, end, vm_flags & (VM_WRITE | VM_SHARED) == VM_WRITE)
        return addr

    def _charge(self, length: int) -> None:
        """Heuristic overcommit: one request larger than RAM plus swap is refused."""
        if length >> self._shift > self.commit_limit_pages:
            raise _fail(errno.ENOMEM, f"length={length:#x} exceeds RAM+swap "
                        f"({self.commit_limit_pages} pages)")

    def _populate(self, start: int, end: int, with_write: bool) -> None:
        """MAP_POPULATE (and MAP_LOCKED): fault the pages in, as writes for private writable
        mappings (copy-on-write done, anon_vma made), else as reads; pages past a file's end
        are left alone."""
        try:
            if with_write:
                self._fault_in(start, end, "w")
            else:
                self._fault_in(start, end, "p")
        except Fault:
            pass

    # ---------------------------------------------------------------- kernel: mprotect

    def _mprotect(self, start: int, end: int, prot: int, grows: int) -> None:
        """The per-VMA loop of do_mprotect_pkey (checks already done)."""
        vmas = self._vmas
        i = self._first_ending_after(start)
        if i == len(vmas) or vmas[i].start >= end:
            raise _fail(errno.ENOMEM, f"mprotect: nothing mapped at {start:#x}")
        vma = vmas[i]
        if grows & _PROT_GROWSDOWN:
            start = vma.start
            if not vma.flags & VM_GROWSDOWN:
                raise _fail(errno.EINVAL, "mprotect: PROT_GROWSDOWN on a mapping without it")
        elif vma.start > start:
            raise _fail(errno.ENOMEM, f"mprotect: nothing mapped at {start:#x}")
        elif grows & _PROT_GROWSUP:
            raise _fail(errno.EINVAL, "mprotect: PROT_GROWSUP (no VM_GROWSUP on x86)")
        rier = self.read_implies_exec and prot & _PROT_READ
        tmp, nstart = vma.start, start
        while i < len(vmas) and vmas[i].start < end:
            vma = vmas[i]
            want = prot | _PROT_EXEC if rier and vma.flags & VM_MAYEXEC else prot
            if vma.start != tmp:
                break
            newflags = (want & VM_ACCESS) | (vma.flags & ~VM_ACCESS)
            if (newflags & ~(newflags >> 4)) & VM_ACCESS:
                raise _fail(errno.EACCES, f"mprotect: prot={want:#x} not allowed on "
                            f"{vma.start:#x}-{vma.end:#x} (file's open mode or mount)")
            tmp = min(vma.end, end)
            i = self._fixup(i, nstart, tmp, newflags)
            tmp = nstart = vmas[i].end
            i += 1
        if tmp < end:
            raise _fail(errno.ENOMEM, f"mprotect: hole at {tmp:#x} in the range")

    def _fixup(self, i: int, start: int, end: int, newflags: int) -> int:
        """mprotect_fixup on ``vmas[i]`` for ``[start, end)``: VM_ACCOUNT bookkeeping, then
        merge or split, then the PTEs. Returns the index of the VMA now covering the range."""
        vma = self._vmas[i]
        old = vma.flags
        if newflags == old:
            return i
        if newflags & VM_WRITE:
            if not old & (VM_ACCOUNT | VM_WRITE | VM_SHARED | VM_NORESERVE):
                self._charge(end - start)
                newflags |= VM_ACCOUNT
        elif old & VM_ACCOUNT and vma.file is None and not vma.anon:
            newflags &= ~VM_ACCOUNT
        i = self._modify(i, start, end, newflags)
        self._protect_ptes(start, end, self._vmas[i].flags)
        return i

    def _modify(self, i: int, start: int, end: int, newflags: int) -> int:
        """vma_modify: give ``[start, end)`` of ``vmas[i]`` the flags ``newflags``, merging
        with a neighbour when Linux would, else splitting (ENOMEM at max_map_count; a first
        split stays done). Returns the index of the VMA covering the range."""
        vmas = self._vmas
        vma = vmas[i]
        shift = self._shift
        prev = vmas[i - 1] if i and vmas[i - 1].end == vma.start else None
        nxt = vmas[i + 1] if i + 1 < len(vmas) and vmas[i + 1].start == vma.end else None
        pgoff = vma.pgoff + ((start - vma.start) >> shift)
        anon, file = vma.anon, vma.file
        left = (start == vma.start and prev is not None and prev.flags == newflags
                and prev.file is file and prev.pgoff + ((prev.end - prev.start) >> shift) == pgoff
                and (not prev.anon or not anon or prev.anon == anon))
        right = (end == vma.end and nxt is not None and nxt.flags == newflags
                 and nxt.file is file and pgoff + ((end - start) >> shift) == nxt.pgoff
                 and (not nxt.anon or not anon or nxt.anon == anon))
        if left and right and prev and nxt and prev.anon and nxt.anon and prev.anon != nxt.anon:
            right = False
        if left and prev:
            high = nxt.end if right and nxt else end
            merged = Vma(prev.start, high, newflags, prev.pgoff, file,
                         prev.anon or (nxt.anon if right and nxt else 0) or anon)
            rest = [] if end == vma.end else [self._clone(vma, end, vma.end)]
            self._replace(i - 1, i + (2 if right else 1), [merged, *rest])
            return i - 1
        if right and nxt:
            merged = Vma(start, nxt.end, newflags, pgoff, file, nxt.anon or anon)
            rest = [] if start == vma.start else [self._clone(vma, vma.start, start)]
            self._replace(i, i + 2, [*rest, merged])
            return i + len(rest)
        if start > vma.start:
            self._check_split(vma)
            self._replace(i, i + 1, [self._clone(vma, vma.start, start),
                                     self._clone(vma, start, vma.end)])
            i += 1
            vma = vmas[i]
        if end < vma.end:
            self._check_split(vma)
            self._replace(i, i + 1, [self._clone(vma, vma.start, end),
                                     self._clone(vma, end, vma.end)])
        vmas[i].flags = newflags
        return i

    def _check_split(self, vma: Vma) -> None:
        """split_vma's limit: ENOMEM when the map already holds max_map_count VMAs."""
        if len(self._vmas) >= self.max_map_count:
            self._unmerged_possible = True  # an earlier split of this call stays done
            raise _fail(errno.ENOMEM, f"splitting {vma.start:#x}-{vma.end:#x} would pass "
                        f"max_map_count={self.max_map_count}")

    # ---------------------------------------------------------------- kernel: the VMA list

    def _first_ending_after(self, addr: int) -> int:
        """Index of the first VMA with ``end > addr`` (len when none)."""
        i = self._vmas.count_le(addr) - 1
        if i < 0 or self._vmas[i].end <= addr:
            i += 1
        return i

    def _overlaps(self, start: int, end: int) -> bool:
        """True when any VMA intersects ``[start, end)``."""
        i = self._first_ending_after(start)
        return i < len(self._vmas) and self._vmas[i].start < end

    def _is_free(self, start: int, end: int) -> bool:
        """True when ``[start, end)`` is inside the user space and intersects no VMA."""
        return end <= self.task_size and not self._overlaps(start, end)

    def _clone(self, vma: Vma, start: int, end: int) -> Vma:
        """A copy of ``vma`` cut to ``[start, end)`` with its page offset moved along."""
        return Vma(start, end, vma.flags, vma.pgoff + ((start - vma.start) >> self._shift),
                   vma.file, vma.anon)

    def _cut(self, start: int, end: int) -> int:
        """Remove ``[start, end)`` from the VMA list (PTEs already zapped), keeping the parts
        of straddling VMAs outside it. Returns the index where ``start`` would go."""
        vmas = self._vmas
        i0 = self._first_ending_after(start)
        i1 = self._vmas.count_lt(end)
        if i0 >= i1:
            return i0
        first, last = vmas[i0], vmas[i1 - 1]
        rest = []
        if first.start < start:
            rest.append(self._clone(first, first.start, start))
        if last.end > end:
            rest.append(self._clone(last, end, last.end))
        self._replace(i0, i1, rest)
        return i0 + (first.start < start)

    def _insert(self, i: int, new: Vma) -> None:
        """Put a new VMA at index ``i``, merged with its neighbours as vma_merge_new_range
        would: same flags and open file, consecutive offsets, compatible anon_vmas."""
        vmas = self._vmas
        shift = self._shift
        prev = vmas[i - 1] if i and vmas[i - 1].end == new.start else None
        nxt = vmas[i] if i < len(vmas) and vmas[i].start == new.end else None
        left = (prev is not None and prev.flags == new.flags and prev.file is new.file
                and prev.pgoff + ((prev.end - prev.start) >> shift) == new.pgoff)
        right = (nxt is not None and nxt.flags == new.flags and nxt.file is new.file
                 and new.pgoff + ((new.end - new.start) >> shift) == nxt.pgoff)
        if left and right and prev and nxt and prev.anon and nxt.anon and prev.anon != nxt.anon:
            right = False
        if left and prev:
            high, anon = (nxt.end, prev.anon or nxt.anon) if right and nxt else (new.end,
                                                                                  prev.anon)
            self._replace(i - 1, i + (1 if right else 0),
                          [Vma(prev.start, high, new.flags, prev.pgoff, new.file, anon)])
        elif right and nxt:
            self._replace(i, i + 1, [Vma(new.start, nxt.end, new.flags, new.pgoff, new.file,
                                         nxt.anon)])
        else:
            self._replace(i, i, [new])

    def _replace(self, i0: int, i1: int, new: list[Vma]) -> None:
        """Replace ``vmas[i0:i1]`` by ``new`` (sorted, within the same span), keeping the gap
        index and the open files' user counts right. Every VMA list change goes here."""
        vmas, gaps = self._vmas, self._gaps
        low = vmas[i0 - 1].end if i0 else 0
        high = vmas[i1].start if i1 < len(vmas) else self.task_size
        old = vmas.slice(i0, i1)
        edge = low
        for v in old:
            gaps.remove(edge, v.start)
            edge = v.end
        gaps.remove(edge, high)
        edge = low
        for v in new:
            gaps.add(edge, v.start)
            edge = v.end
            if v.file is not None:
                self._use(v.file)
        gaps.add(edge, high)
        for v in old:
            if v.file is not None:
                self._unuse(v.file)
        vmas.replace(i0, i1, new)

    def _use(self, file: OpenFile | Shmem) -> None:
        """One more VMA uses ``file``; the first use of an OpenFile takes our own dup
        (MmapError EMFILE/ENFILE when the host has no descriptor left even after
        :meth:`_release_orphans`)."""
        if file.users == 0 and isinstance(file, OpenFile):
            file.fd = self._dup(file.fd)
        file.users += 1
        if file.users == 1 and isinstance(file, OpenFile):
            inode = file.inode
            if inode.opens == 0:
                self._inodes[inode.key] = inode
            inode.opens += 1
            self._files.setdefault(inode.key, []).append(file)

    def _unuse(self, file: OpenFile | Shmem) -> None:
        """One VMA fewer uses ``file``; the last closes our dup (and drops the inode's page
        cache when no open file of it is left)."""
        file.users -= 1
        if file.users == 0 and isinstance(file, OpenFile):
            self._close(file.fd)
            file.fd = -1
            inode = file.inode
            self._files[inode.key].remove(file)
            if not self._files[inode.key]:
                del self._files[inode.key]
            inode.opens -= 1
            if inode.opens == 0:
                self._close(inode.io_fd)
                inode.io_fd = -1
                del self._inodes[inode.key]
                self._pool.free(np.array(list(inode.cache.values()), dtype=np.int64))
                inode.cache.clear()

    # ---------------------------------------------------------------- kernel: descriptors

    def _dup(self, fd: int) -> int:
        """Our own dup of ``fd``. Every so many dups (and whenever the host says EMFILE or
        ENFILE) first let go of the dups no other descriptor shares (see
        :meth:`_release_orphans`), so mapping one file thousands of times through fds the
        caller closes holds a few descriptors, not thousands."""
        if len(self._owned_fds) >= self._sweep_at:
            self._release_orphans()
        try:
            got = os.dup(fd)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE):
                raise _fail(err.errno or errno.EBADF, f"mmap: dup(fd={fd}): {err.strerror}") \
                    from err
            self._release_orphans()
            try:
                got = os.dup(fd)
            except OSError as again:
                raise _fail(again.errno or errno.EMFILE, f"mmap: fd={fd}: the simulator needs "
                            f"a descriptor of its own and the host has none left "
                            f"({again.strerror})") from again
        self._owned_fds.add(got)
        return got

    def _close(self, fd: int) -> None:
        """Close one of our own descriptors (-1: none)."""
        if fd >= 0:
            self._owned_fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def _release_orphans(self) -> None:
        """Close the dups of open files that no other descriptor of this process refers to
        (no later mmap can name such an open file again, so its identity needs no fd): their
        I/O goes through one descriptor per inode (``Inode.io_fd``, the first such dup,
        or a writable one when one comes). Then the next sweep waits until we hold twice as
        many descriptors as are left."""
        held = [f for files in self._files.values() for f in files if f.fd >= 0]
        others = _other_fds_by_inode(self._owned_fds)
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
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._owned_fds))

    def _host(self, call: Any, *args: Any) -> Any:
        """``call(*args)`` on a host descriptor, its OSError turned into MmapError."""
        try:
            return call(*args)
        except OSError as err:
            raise _fail(err.errno or errno.EIO, f"{call.__name__}: {err.strerror}") from err

    # ---------------------------------------------------------------- MMU: PTE upkeep

    def _pte_bits(self, flags: int) -> int:
        """The PTE permission bits for a VMA's flags: P|U, W, NX, the execute-only pkey; or
        Linux's PROTNONE marker for PROT_NONE."""
        prot = flags & VM_ACCESS
        if not prot:
            return PTE_PROTNONE
        bits = PTE_P | PTE_U
        if prot & VM_WRITE:
            bits |= PTE_W
        if not prot & VM_EXEC:
            bits |= PTE_NX
        elif prot == VM_EXEC and self.exec_only:
            bits |= _EXEC_ONLY_PKEY << PTE_PKEY_SHIFT
        return bits

    def _protect_ptes(self, start: int, end: int, flags: int) -> None:
        """change_protection: rewrite the permission bits of the PTEs in the range."""
        bits = self._pte_bits(flags)
        rw, ro = _U64(bits), _U64(bits & ~PTE_W)
        tables = self._pt.tables
        for _, row, i0, i1 in self._pt.chunks(start, end, False):
            ptes = tables[row, i0:i1]
            has = (ptes & _N_HAS) != 0
            if has.any():
                perm = np.where((ptes & _N_COW) != 0, ro, rw)
                ptes[:] = np.where(has, (ptes & _N_KEEP) | perm, _U64(0))

    def _zap(self, start: int, end: int) -> None:
        """Clear the PTEs of ``[start, end)``, freeing the frames they own (not the zero page
        and not page-cache frames)."""
        if not self._pt.leaves:
            return
        tables = self._pt.tables
        for _, row, i0, i1 in self._pt.chunks(start, end, False):
            ptes = tables[row, i0:i1]
            if not ptes.any():
                continue
            frames = ((ptes & _N_FRAME) >> _N_12).astype(np.int64)
            owned = ((ptes & _N_HAS) != 0) & ((ptes & _N_SHARED) == 0) & (frames != 0)
            if owned.any():
                self._pool.free(frames[owned])
            ptes[:] = 0

    # ---------------------------------------------------------------- kernel: page faults

    def _anon_prepare(self, i: int) -> None:
        """anon_vma_prepare for ``vmas[i]``: reuse a compatible neighbour's anon_vma (next
        first, then prev: adjacent, same file and non-access flags, consecutive offsets),
        else a new one."""
        vmas, shift = self._vmas, self._shift
        vma = vmas[i]
        if vma.anon:
            return
        for a, b, old in ((vma, vmas[i + 1] if i + 1 < len(vmas) else None, 1),
                          (vmas[i - 1] if i else None, vma, 0)):
            other = b if old else a
            if (a is not None and b is not None and other is not None and other.anon
                    and a.end == b.start and a.file is b.file
                    and not (a.flags ^ b.flags) & ~VM_ACCESS
                    and b.pgoff == a.pgoff + ((a.end - a.start) >> shift)):
                vma.anon = other.anon
                return
        self._anon_seq += 1
        vma.anon = self._anon_seq

    def _cache_frames(self, inode: Inode, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The page-cache frames of the file pages ``pages``, allocated (zeroed) as needed."""
        cache = inode.cache
        missing = [p for p in pages.tolist() if p not in cache]
        if missing:
            for p, f in zip(missing, self._pool.alloc(len(missing)).tolist(), strict=True):
                cache[p] = f
        return np.array([cache[p] for p in pages.tolist()], dtype=np.int64)

    def _pread_into(self, file: OpenFile, pages: npt.NDArray[np.int64],
                    frames: npt.NDArray[np.int64]) -> None:
        """Refresh frames from the file: page ``pages[k]`` into ``frames[k]`` (bytes past EOF
        in a partial last page keep what the frame holds, as the page cache does)."""
        if not len(pages):
            return
        shift, data = self._shift, self._pool.data
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(np.arange(len(pages)), breaks):
            first = int(pages[run[0]])
            got = self._host(os.pread, file.io(), len(run) << shift, first << shift)
            full, rest = len(got) >> shift, len(got) & self._pmask
            buf = np.frombuffer(got, dtype=np.uint8)
            if full:
                data[frames[run[:full]]] = buf[: full << shift].reshape(full, -1)
            if rest:
                data[frames[run[full]], :rest] = buf[full << shift:]

    def _fault(self, i: int, va: int, ptes: npt.NDArray[np.uint64],
               need: npt.NDArray[np.bool_], write: bool) -> None:
        """Handle page faults for the pages ``need`` of one leaf chunk of ``vmas[i]`` starting
        at ``va``: fill their PTEs in place (zero page, new frame, page-cache page, or a
        copy-on-write copy)."""
        vma = self._vmas[i]
        idx = np.flatnonzero(need)
        n = len(idx)
        self._faults += n
        bits = self._pte_bits(vma.flags)
        file = vma.file
        pool = self._pool
        if file is None or isinstance(file, Shmem) or file.zero:
            if write or isinstance(file, Shmem):
                if not isinstance(file, Shmem):
                    self._anon_prepare(i)
                    self._cows += int(np.count_nonzero(ptes[idx] & _N_COW))
                frames = pool.alloc(n)
                ptes[idx] = (frames.astype(np.uint64) << _N_12) | _U64(bits)
            else:
                ptes[idx] = _U64(PTE_COW | (bits & ~PTE_W))  # the zero page, frame 0
            return
        pages = vma.pgoff + ((va - vma.start) >> self._shift) + idx.astype(np.int64)
        cache = self._cache_frames(file.inode, pages)
        if vma.flags & VM_MAYSHARE:
            ptes[idx] = (cache.astype(np.uint64) << _N_12) | _U64(PTE_FILE | bits)
        elif not write:
            ptes[idx] = (cache.astype(np.uint64) << _N_12) | _U64(PTE_FILE | PTE_COW
                                                                  | (bits & ~PTE_W))
        else:
            self._anon_prepare(i)
            self._pread_into(file, pages, cache)
            frames = pool.alloc(n)
            pool.data[frames] = pool.data[cache]
            self._cows += n
            ptes[idx] = (frames.astype(np.uint64) << _N_12) | _U64(bits)

    def _file_limit(self, vma: Vma) -> int:
        """The first address of ``vma`` wholly past its file's end (noticing a size change
        made outside the simulator); may lie outside the VMA."""
        if isinstance(vma.file, Shmem):
            return vma.start + ((vma.file.pages - vma.pgoff) << self._shift)
        assert isinstance(vma.file, OpenFile)
        inode = vma.file.inode
        size: int = self._host(os.fstat, vma.file.io()).st_size
        if size != inode.size:
            self._resize(inode, size)
        pages = (size + self._pmask) >> self._shift
        return vma.start + ((pages - vma.pgoff) << self._shift)

    def _resize(self, inode: Inode, size: int) -> None:
        """The file changed size. On a shrink, do what truncation does: unmap its pages past
        the new end from every mapping (private copies too), drop them from the page cache,
        and zero the cached last page past the end."""
        if size < inode.size:
            keep = (size + self._pmask) >> self._shift
            for vma in self._vmas:
                f = vma.file
                if isinstance(f, OpenFile) and f.inode is inode:
                    low = vma.start + ((keep - vma.pgoff) << self._shift)
                    if low < vma.end:
                        self._zap(max(low, vma.start), vma.end)
            dropped = [p for p in inode.cache if p >= keep]
            self._pool.free(np.array([inode.cache.pop(p) for p in dropped], dtype=np.int64))
            last = inode.cache.get(size >> self._shift)
            if last is not None and size & self._pmask:
                self._pool.data[last, size & self._pmask:] = 0
        inode.size = size

    # ---------------------------------------------------------------- MMU: accesses

    def _allowed(self, flags: int, access: str) -> bool:
        """Whether a VMA with ``flags`` permits the access: x86 rules (write implies read,
        execute-only readable unless ``exec_only``), ptrace's for peek ("p") and poke ("P")."""
        if access == "r":
            return bool(flags & (VM_READ | VM_WRITE)
                        or (flags & VM_EXEC and not self.exec_only))
        if access == "w":
            return bool(flags & VM_WRITE)
        if access == "x":
            return bool(flags & VM_EXEC)
        if access == "P":
            return bool(flags & VM_WRITE or flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE)
        return True

    def _segments(self, addr: int, n: int, access: str) -> Iterator[tuple[int, int, int]]:
        """Walk ``[addr, addr+n)`` through the VMAs in address order: yield ``(index, a, b)``
        per VMA piece, raising the Fault for the first unmapped or forbidden byte when the
        walk reaches it (so a caller's work on earlier pieces is already done)."""
        end = addr + n
        vmas = self._vmas
        acc = "w" if access == "P" else ("r" if access == "p" else access)
        i = self._first_ending_after(addr)
        pos = addr
        while pos < end:
            if pos >= self.task_size:
                noncanonical = 1 << 47 <= pos < _WORD - (1 << 47)
                raise Fault(pos, acc, "SIGSEGV", "SI_KERNEL" if noncanonical else "SEGV_MAPERR")
            if i >= len(vmas) or vmas[i].start > pos:
                raise Fault(pos, acc, "SIGSEGV", "SEGV_MAPERR")
            vma = vmas[i]
            if not self._allowed(vma.flags, access):
                raise Fault(pos, acc, "SIGSEGV", "SEGV_ACCERR")
            b = min(end, vma.end)
            yield i, pos, b
            pos = b
            i += 1

    def _fill(self, i: int, va: int, row: int, i0: int, i1: int,
              access: str) -> npt.NDArray[np.int64]:
        """The MMU part of an access to one leaf chunk of ``vmas[i]``: find the PTEs that do
        not allow it, fault them in, refresh page-cache frames for reads; return the frames."""
        ptes = self._pt.tables[row, i0:i1]
        if access in "wP":
            if access == "w":
                need = (ptes & _N_PW) != _N_PW
            else:
                need = ((ptes & _N_HAS) == 0) | ((ptes & _N_COW) != 0)
        elif access == "p":
            need = (ptes & _N_HAS) == 0
        else:
            need = (ptes & _N_P) == 0
        if need.any():
            self._fault(i, va, ptes, need, access in "wP")
        frames = ((ptes & _N_FRAME) >> _N_12).astype(np.int64)
        vma = self._vmas[i]
        if _paged(vma.file) and access not in "wP":
            assert isinstance(vma.file, OpenFile)
            cached = (ptes & _N_FILE) != 0
            if cached.any():
                pages = vma.pgoff + ((va - vma.start) >> self._shift) + np.flatnonzero(cached)
                self._pread_into(vma.file, pages, frames[cached])
        return frames

    def _block(self, frames: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], bool]:
        """The bytes of ``frames`` in order: a view when they are consecutive (True), else
        a gathered copy (False)."""
        data = self._pool.data
        f0, k = int(frames[0]), len(frames)
        if int(frames[-1]) - f0 == k - 1 and (k < 3 or bool((np.diff(frames) == 1).all())):
            return data[f0: f0 + k].reshape(-1), True
        return data[frames].reshape(-1), False

    def _eof_check(self, i: int, a: int, b: int, acc: str) -> int:
        """For a file VMA, where the access must stop: the first byte of the first page
        wholly past EOF (b when none). Raises the SIGBUS Fault when ``a`` is already past."""
        vma = self._vmas[i]
        if not _sized(vma.file):
            return b
        limit = self._file_limit(vma)
        if a >= limit:
            raise Fault(a, acc, "SIGBUS", "BUS_ADRERR")
        return min(b, limit)

    def _load(self, addr: int, n: int, access: str) -> bytes:
        """A checked (or, for "p", forced) read of ``n`` bytes at ``addr``."""
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"read: n={n} is negative")
        if n == 0:
            return b""
        addr = int(addr) & _M64
        self._precheck(addr, n, access)
        return self._gather(addr, n, access).tobytes()

    def _precheck(self, addr: int, n: int, access: str) -> None:
        """Before a read does any work: the Fault for its first bad byte (a walk over the
        VMAs only), then MmapError(ENOMEM) when it is longer than MAX_READ."""
        fault = self._first_fault(addr, n, access)
        if fault is not None:
            raise fault
        if n > MAX_READ:
            raise _fail(errno.ENOMEM, f"read: n={n:#x} bytes is more than MAX_READ="
                        f"{MAX_READ:#x} (the simulator's largest read)")

    def _gather(self, addr: int, n: int, access: str) -> npt.NDArray[np.uint8]:
        """The ``n`` bytes at ``addr`` (n > 0) after a checked or forced read: a view of the
        frames when they are consecutive, else a gathered copy."""
        got: list[npt.NDArray[np.int64]] = []
        pmask, acc = self._pmask, "r" if access == "p" else access
        for i, a, b in self._segments(addr, n, access):
            stop = self._eof_check(i, a, b, acc)
            if stop < b:
                raise Fault(stop, acc, "SIGBUS", "BUS_ADRERR")
            for va, row, i0, i1 in self._pt.chunks(a & ~pmask, (b + pmask) & ~pmask, True):
                got.append(self._fill(i, va, row, i0, i1, access))
        flat, _ = self._block(np.concatenate(got) if len(got) > 1 else got[0])
        return flat[addr & pmask: (addr & pmask) + n]

    def _store(self, addr: int, data: Any, access: str) -> None:
        """A checked (or, for "P", forced) write of ``data`` at ``addr``; bytes before the
        faulting page are stored when it faults."""
        src = np.frombuffer(bytes(data), dtype=np.uint8)
        if not len(src):
            return
        addr &= _M64
        pmask = self._pmask
        for i, a, b in self._segments(addr, len(src), access):
            stop = self._eof_check(i, a, b, "w")
            if stop > a:
                for va, row, i0, i1 in self._pt.chunks(a & ~pmask, (stop + pmask) & ~pmask,
                                                       True):
                    frames = self._fill(i, va, row, i0, i1, access)
                    lo = max(a, va)
                    hi = min(stop, va + ((i1 - i0) << self._shift))
                    self._put(frames, lo - va, src[lo - addr: hi - addr])
                self._write_through(i, a, stop, src[a - addr: stop - addr])
            if stop < b:
                raise Fault(stop, "w", "SIGBUS", "BUS_ADRERR")

    def _put(self, frames: npt.NDArray[np.int64], offset: int,
             src: npt.NDArray[np.uint8]) -> None:
        """Copy ``src`` into the frames' bytes from ``offset``."""
        flat, is_view = self._block(frames)
        flat[offset: offset + len(src)] = src
        if not is_view:
            self._pool.data[frames] = flat.reshape(len(frames), -1)

    def _write_through(self, i: int, a: int, b: int, src: npt.NDArray[np.uint8]) -> None:
        """For a shared file mapping, send the bytes stored at ``[a, b)`` to the file (the
        part before EOF; bytes past it stay in the page cache only, as in Linux)."""
        vma = self._vmas[i]
        file = vma.file
        if not isinstance(file, OpenFile) or file.zero or not vma.flags & VM_MAYSHARE:
            return
        start_off = (vma.pgoff << self._shift) + (a - vma.start)
        room = file.inode.size - start_off
        if room > 0:
            self._host(os.pwrite, file.io(), src[:room].tobytes(), start_off)

    def _fault_in(self, start: int, end: int, access: str) -> None:
        """Fault every page of ``[start, end)`` in for ``access`` without copying bytes."""
        pmask = self._pmask
        for i, a, b in self._segments(start, end - start, access):
            stop = self._eof_check(i, a, b, "r")
            for va, row, i0, i1 in self._pt.chunks(a & ~pmask, (stop + pmask) & ~pmask, True):
                self._fill(i, va, row, i0, i1, "P" if access == "w" else "p")

    def _write_words(self, where: npt.NDArray[np.uint64], words: npt.NDArray[np.uint64]) -> None:
        """write_words' body: validate the pages, fault them in, one scatter."""
        shift, pmask = self._shift, self._pmask
        top = _U64(self.task_size)
        first = np.minimum(where, top) >> _U64(shift)
        last = (np.minimum(where, top) + _U64(7)) >> _U64(shift)
        pages = np.unique(np.concatenate([first, last]))
        bad = self._unwritable(pages)
        if bad is not None:
            stop = int(np.argmax(np.isin(first, bad) | np.isin(last, bad)))
            if stop:
                self._write_words(where[:stop], words[:stop])
            fault = self.check_access(int(where[stop]), 8, "w")  # a store faults whole
            assert fault is not None, "write_words: the faulting word did not fault"
            raise fault
        frame_of = np.empty(len(pages), dtype=np.int64)
        slow = False
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(np.arange(len(pages)), breaks):
            lo = int(pages[run[0]]) << shift
            hi = (int(pages[run[-1]]) + 1) << shift
            got: list[npt.NDArray[np.int64]] = []
            for i, a, b in self._segments(lo, hi - lo, "w"):
                vma = self._vmas[i]
                slow |= _paged(vma.file) and bool(vma.flags & VM_MAYSHARE)
                for va, row, i0, i1 in self._pt.chunks(a, b, True):
                    got.append(self._fill(i, va, row, i0, i1, "w"))
            frame_of[run] = np.concatenate(got)
        if slow:
            super().write_words(where, words)
            return
        flat = self._pool.data.reshape(-1)
        if not (where & _U64(7)).any():  # aligned words never straddle a page
            base = frame_of[np.searchsorted(pages, first)] << shift
            pos = base + (where & _U64(pmask)).astype(np.int64)
            flat.view("<u8")[pos >> 3] = words
            return
        byte = (where[:, None] + np.arange(8, dtype=np.uint64)).astype(np.uint64)
        page_of = np.searchsorted(pages, byte >> _U64(shift))
        pos = (frame_of[page_of] << shift) + (byte & _U64(pmask)).astype(np.int64)
        flat[pos] = words.view(np.uint8).reshape(-1, 8)

    def _unwritable(self, pages: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64] | None:
        """The pages (numbers) a user-mode write would fault on, or None when all are fine."""
        shift = self._shift
        bad = []
        vmas = self._vmas
        for page in pages.tolist():
            va = page << shift
            i = self._first_ending_after(va)
            if (va >= self.task_size or i == len(vmas) or vmas[i].start > va
                    or not vmas[i].flags & VM_WRITE
                    or (_sized(vmas[i].file) and self._file_limit(vmas[i]) <= va)):
                bad.append(page)
        return np.array(bad, dtype=np.uint64) if bad else None

    # ---------------------------------------------------------------- checks for tests

    def check(self) -> None:
        """Assert the simulator's invariants: VMAs sorted, non-overlapping, page-aligned,
        inside the user space, no two neighbours Linux would have merged (once a split has
        failed at max_map_count, Linux can leave such a pair: not checked after that), the gap index
        matching the list, PTEs only inside VMAs and never more permissive than their VMA."""
        vmas, pmask, shift = self._vmas, self._pmask, self._shift
        assert vmas.starts_consistent(), "bisect keys out of step"
        edge = 0
        gaps = []
        for k, v in enumerate(vmas):
            assert not (v.start | v.end) & pmask, f"unaligned {v!r}"
            assert edge <= v.start < v.end <= self.task_size, f"overlap or range: {v!r}"
            if v.start > edge:
                gaps.append((edge, v.start))
            edge = v.end
            if k and not self._unmerged_possible:
                p = vmas[k - 1]
                assert not (p.end == v.start and p.flags == v.flags and p.file is v.file
                            and p.pgoff + ((p.end - p.start) >> shift) == v.pgoff
                            and (not p.anon or not v.anon or p.anon == v.anon)), \
                    f"mergeable neighbours left apart: {p!r} {v!r}"
        if edge < self.task_size:
            gaps.append((edge, self.task_size))
        indexed = sorted((s, e) for e, s in self._gaps.start_of.items())
        assert indexed == gaps, "gap index out of step"
        tables = self._pt.tables
        for key, row in self._pt.leaves.items():
            ptes = tables[row]
            for j in np.flatnonzero(ptes).tolist():
                va = (key << self._pt.leaf_shift) | (j << shift)
                i = self._first_ending_after(va)
                assert i < len(vmas) and vmas[i].start <= va, f"PTE outside VMAs at {va:#x}"
                pte = int(ptes[j])
                flags = vmas[i].flags
                assert not (pte & PTE_W and not flags & VM_WRITE), f"W PTE at {va:#x}"
                assert bool(pte & PTE_NX) == bool(pte & PTE_P and not flags & VM_EXEC), \
                    f"NX bit wrong at {va:#x}"
                assert bool(pte & PTE_PROTNONE) == (not flags & VM_ACCESS), \
                    f"PROTNONE bit wrong at {va:#x}"
