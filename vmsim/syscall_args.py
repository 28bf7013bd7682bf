"""The kernel layer's argument handling: how the syscalls receive their C arguments, the flag
values they test, and do_mmap's checks of the map type and flags (anonymous, file, hugetlb)
in Linux's order, each raising MmapError with Linux's errno.

Part of ``vmsim``'s kernel layer, used by ``vmsim.kernel``; imports ``loader.mmap`` and
``vmsim.vma`` (the vm_flags bits) and ``vmsim.files``.
"""

from __future__ import annotations

import errno
import functools
import os

from loader.mmap import MmapError
from loader.pages import HOST_PAGE_SIZE
from vmsim.files import OpenFile
from vmsim.vma import (
    VM_ACCESS,
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
    VM_SHARED,
    VM_WRITE,
)

WORD = 1 << 64
M64 = WORD - 1

# mmap(2) flag values as plain ints (the hot path avoids enum arithmetic)
MAP_SHARED, MAP_PRIVATE, MAP_VALIDATE, MAP_DROPPABLE, MAP_TYPE = 0x1, 0x2, 0x3, 0x8, 0xF
MAP_FIXED, MAP_ANON, MAP_32BIT, MAP_GROWSDOWN = 0x10, 0x20, 0x40, 0x100
MAP_LOCKED, MAP_NORESERVE, MAP_POPULATE, MAP_STACK = 0x2000, 0x4000, 0x8000, 0x20000
MAP_NONBLOCK = 0x10000
MAP_HUGETLB, MAP_NOREPLACE = 0x40000, 0x100000
MAP_HUGE_SHIFT, MAP_HUGE_MASK = 26, 0x3F
LEGACY_MAP_MASK = (0x1 | 0x2 | 0x10 | 0x20 | 0x800 | 0x1000 | 0x4000000 | 0x100 | 0x2000
                   | 0x4000 | 0x8000 | 0x10000 | 0x20000 | 0x40000
                   | 0x40 | 0x80 | (21 << MAP_HUGE_SHIFT) | (30 << MAP_HUGE_SHIFT))
"""include/linux/mman.h: the flags MAP_SHARED_VALIDATE accepts for any file, with x86's
MAP_32BIT and MAP_ABOVE4G (0x80) and the MAP_HUGE_2MB and MAP_HUGE_1GB size bits."""
PROT_READ, PROT_WRITE, PROT_EXEC, PROT_SEM = 0x1, 0x2, 0x4, 0x8
PROT_GROWSDOWN, PROT_GROWSUP = 0x01000000, 0x02000000
PMD_SIZE = 2 << 20

MIN_PAGE_SIZE = 1 << 12
MAX_PAGE_SIZE = 1 << 16
USER_TOP = 1 << 47


def as_size(value: int) -> int:
    """``value`` as the kernel's unsigned long sees it (the same cast as loader.libc)."""
    if -(1 << 63) <= value < WORD:
        return value % WORD
    return (WORD - HOST_PAGE_SIZE) | (value & (HOST_PAGE_SIZE - 1))


def as_int_arg(value: int) -> int:
    """A C ``int`` argument (prot, flags) as the kernel's unsigned long receives it:
    truncated to 32 bits, then sign-extended."""
    value = int(value) & 0xFFFF_FFFF
    return (value - (1 << 32)) & M64 if value >= 1 << 31 else value


@functools.cache
def meminfo_pages(page_size: int) -> int:
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


def check_knobs(page_size: int, max_map_count: int, mmap_base: int, mmap_min_addr: int) -> None:
    """ValueError naming the first constructor knob out of range: page_size must be a power
    of two in [MIN_PAGE_SIZE, MAX_PAGE_SIZE], max_map_count non-negative, mmap_min_addr and
    mmap_base inside the 47-bit user space."""
    if (not isinstance(page_size, int) or page_size & (page_size - 1)
            or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE):
        raise ValueError(f"page_size={page_size!r}: must be a power of two from "
                         f"{MIN_PAGE_SIZE:#x} to {MAX_PAGE_SIZE:#x} (4 KiB to 64 KiB)")
    if max_map_count < 0:
        raise ValueError(f"max_map_count={max_map_count}: must be >= 0")
    if not 0 <= mmap_min_addr < USER_TOP:
        raise ValueError(f"mmap_min_addr={mmap_min_addr:#x}: must be in [0, {USER_TOP:#x})")
    if not 0 < mmap_base <= USER_TOP:
        raise ValueError(f"mmap_base={mmap_base:#x}: must be in (0, {USER_TOP:#x}]")


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


def refuse_hugetlb_anon(addr: int, length: int, flags: int) -> None:
    """Anonymous MAP_HUGETLB, as ksys_mmap_pgoff and do_mmap treat it on a machine with
    no huge pages reserved: EINVAL for a huge page size the kernel lacks (bits 26-31,
    0 for the default), a zero length, a map type a file mapping refuses, MAP_GROWSDOWN
    or a MAP_FIXED address not aligned to the huge page; else ENOMEM. (Linux maps it
    with MAP_NORESERVE, faulting with SIGBUS later: not simulated, ENOMEM too.)"""
    log = (flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK
    if log and log not in _huge_page_logs():
        raise MmapError(errno.EINVAL, f"mmap: MAP_HUGETLB size bits {log} (2**{log} bytes): "
                        f"no such huge page size here ({sorted(_huge_page_logs())})")
    huge = 1 << (log or 21)
    if not length:
        raise MmapError(errno.EINVAL, "mmap: length=0")
    maptype = flags & MAP_TYPE
    if maptype not in (MAP_SHARED, MAP_PRIVATE, MAP_VALIDATE):
        raise MmapError(errno.EINVAL, f"mmap: map type {maptype:#x} with MAP_HUGETLB")
    if maptype == MAP_VALIDATE and flags & ~LEGACY_MAP_MASK:
        raise MmapError(errno.EOPNOTSUPP, f"mmap: MAP_SHARED_VALIDATE with flags={flags:#x}")
    if flags & MAP_GROWSDOWN:
        raise MmapError(errno.EINVAL, "mmap: MAP_GROWSDOWN with MAP_HUGETLB")
    if flags & (MAP_FIXED | MAP_NOREPLACE) and addr & (huge - 1):
        raise MmapError(errno.EINVAL, f"mmap: MAP_HUGETLB at addr={addr:#x}, not aligned to "
                        f"its huge page size {huge:#x}")
    raise MmapError(errno.ENOMEM, "mmap: MAP_HUGETLB: no huge pages reserved")


def new_vma_flags(prot: int, flags: int, file: OpenFile | None, pgoff: int, length: int,
                  addr: int, page_shift: int) -> tuple[int, int]:
    """do_mmap's vm_flags and page offset for a new VMA, after the map type checks of a file
    (:func:`file_flags`) or of anonymous memory (:func:`anon_flags`)."""
    vm_flags = (prot & VM_ACCESS) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if flags & (MAP_GROWSDOWN | MAP_LOCKED | MAP_STACK):
        vm_flags |= ((VM_GROWSDOWN if flags & MAP_GROWSDOWN else 0)
                     | (VM_LOCKED if flags & MAP_LOCKED else 0)
                     | (VM_NOHUGEPAGE if flags & MAP_STACK else 0))
    if file is not None:
        vm_flags = file_flags(file, vm_flags, flags, prot, pgoff, length, page_shift)
    else:
        vm_flags, pgoff = anon_flags(vm_flags, flags, addr, page_shift)
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE
    return vm_flags, pgoff


def anon_flags(vm_flags: int, flags: int, addr: int, page_shift: int) -> tuple[int, int]:
    """The anonymous half of do_mmap's map-type checks (EINVAL for a bad type or
    combination); returns vm_flags and the page offset Linux gives (``addr``'s page for
    private memory, 0 for shared)."""
    maptype = flags & MAP_TYPE
    if maptype == MAP_PRIVATE:
        pgoff = addr >> page_shift
    elif maptype == MAP_SHARED:
        if vm_flags & VM_GROWSDOWN:
            raise MmapError(errno.EINVAL, "mmap: MAP_GROWSDOWN on shared anonymous memory")
        pgoff = 0
        vm_flags |= VM_SHARED | VM_MAYSHARE
    elif maptype == MAP_DROPPABLE:
        if flags & (MAP_LOCKED | MAP_HUGETLB) or vm_flags & VM_GROWSDOWN:
            raise MmapError(errno.EINVAL, f"mmap: MAP_DROPPABLE with flags={flags:#x}")
        vm_flags |= VM_DROPPABLE | VM_NORESERVE
        pgoff = addr >> page_shift
    else:
        raise MmapError(errno.EINVAL, f"mmap: map type {maptype:#x} is not MAP_SHARED or "
                        "MAP_PRIVATE")
    return vm_flags, pgoff


def file_flags(file: OpenFile, vm_flags: int, flags: int, prot: int, pgoff: int,
               length: int, page_shift: int) -> int:
    """The file half of do_mmap's checks (EOVERFLOW, EOPNOTSUPP, EACCES, EPERM, ENODEV,
    EINVAL in that order); returns vm_flags with VM_SHARED/VM_MAY* settled."""
    maxsize = (1 << 63) - 1
    if length > maxsize or pgoff > (maxsize - length) >> page_shift:
        raise MmapError(errno.EOVERFLOW, f"mmap: offset page {pgoff:#x} + length {length:#x}"
                        " passes the largest file size")
    maptype = flags & MAP_TYPE
    if maptype in (MAP_SHARED, MAP_VALIDATE):
        if maptype == MAP_SHARED:
            flags &= LEGACY_MAP_MASK
        if flags & ~LEGACY_MAP_MASK:
            raise MmapError(errno.EOPNOTSUPP,
                            f"mmap: MAP_SHARED_VALIDATE with flags={flags:#x}")
        if prot & VM_WRITE and not file.writable:
            raise MmapError(errno.EACCES,
                            "mmap: shared PROT_WRITE of a file not open for writing")
        vm_flags |= VM_SHARED | VM_MAYSHARE
        if not file.writable:
            vm_flags &= ~(VM_MAYWRITE | VM_SHARED)
    elif maptype != MAP_PRIVATE:
        raise MmapError(errno.EINVAL, f"mmap: map type {maptype:#x} is not MAP_SHARED or "
                        "MAP_PRIVATE")
    if not file.readable:
        raise MmapError(errno.EACCES, "mmap: file not open for reading")
    if file.noexec:
        if vm_flags & VM_EXEC:
            raise MmapError(errno.EPERM, "mmap: PROT_EXEC of a file on a noexec mount")
        vm_flags &= ~VM_MAYEXEC
    if file.inode.key[0] < 0:
        raise MmapError(errno.ENODEV, "mmap: not a regular file")
    if vm_flags & VM_GROWSDOWN:
        raise MmapError(errno.EINVAL, "mmap: MAP_GROWSDOWN on a file")
    return vm_flags
