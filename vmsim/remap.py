"""mremap(2) for the kernel layer: shrink, grow in place, or move a mapping with its pages.

Part of ``vmsim``'s kernel layer: :meth:`vmsim.kernel.Kernel.mremap` calls :func:`mremap`.
Every change goes through the machinery mmap and munmap use: ``Kernel.munmap`` for the
parts removed, ``VmaMap.insert`` (merging) for the parts added, ``Placement`` for where a
move goes, and ``Mmu.move`` for the pages: a move carries the PTEs (frames, copy-on-write
and page-cache marks) to the new place, so data and dirty state go with them and nothing is
re-read from a file.

Linux 6.18's order of checks (mm/mremap.c), each an MmapError with Linux's errno:
unknown flags, an unaligned ``addr``, a zero or too long ``new_len``; then, when a new
address is implied (MREMAP_FIXED or MREMAP_DONTUNMAP), an unaligned or too high
``new_addr``, no MREMAP_MAYMOVE, a resize with DONTUNMAP, overlapping ranges, and the
max_map_count margin. A pure move (FIXED, equal lengths) moves every VMA of the range,
keeping the gaps between them (6.17 and later); any other call works on the one VMA holding
``addr`` (EFAULT when none, or when a growth or move would cross its end).

Not modelled, as elsewhere in the simulator: mseal (EPERM), hugetlb, userfaultfd,
VM_DONTEXPAND/VM_PFNMAP mappings (the simulator makes none), and the RLIMIT_AS, RLIMIT_DATA
and RLIMIT_MEMLOCK checks of a growth. Of the files with a get_unmapped_area of their own,
only /dev/zero is known to keep a mapping out of a multi-VMA move.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from loader.mmap import MmapError
from loader.pages import page_offset, page_round_up
from vmsim.fault import Access
from vmsim.files import OpenFile, Shmem
from vmsim.syscall_args import M64, MAP_FIXED, MAP_PRIVATE, MAP_SHARED
from vmsim.vma import VM_ACCOUNT, VM_LOCKED, VM_MAYSHARE, VM_SHARED, VM_WRITE, Vma

if TYPE_CHECKING:
    from vmsim.kernel import Kernel

__all__ = ["MREMAP_DONTUNMAP", "MREMAP_FIXED", "MREMAP_MAYMOVE", "mremap"]

MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
_NEW_ADDR = MREMAP_FIXED | MREMAP_DONTUNMAP  # the flags that name a new address


@dataclass(frozen=True)
class Remap:
    """One call's request (Linux's vma_remap_struct): the lengths page-aligned."""

    addr: int
    old_len: int
    new_len: int
    flags: int
    new_addr: int

    @property
    def delta(self) -> int:
        """How much the mapping grows or shrinks."""
        return abs(self.new_len - self.old_len)


def mremap(k: Kernel, addr: int, old_len: int, new_len: int, flags: int,
           new_addr: int) -> int:
    """do_mremap, arguments cast to unsigned longs: returns the mapping's (new) start."""
    page = k.page_size
    r = Remap(addr, page_round_up(old_len, page) & M64, page_round_up(new_len, page) & M64,
              flags, new_addr)
    _check_params(k, r)
    if r.flags & MREMAP_FIXED and r.old_len == r.new_len:
        return _move_each(k, r)
    vma = _lookup(k, r.addr)
    if not _check_vma(k, r, vma):  # neither grows nor moves: mremap_at's shrink or no-op
        return _shrink(k, r) if r.new_len < r.old_len else r.addr
    return _remap_to(k, r) if r.flags & _NEW_ADDR else _expand(k, r, vma)


def _check_params(k: Kernel, r: Remap) -> None:
    """check_mremap_params: the arguments alone, before any VMA is looked at."""
    if r.flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        raise MmapError(errno.EINVAL, f"mremap: flags={r.flags:#x} has unknown bits")
    if page_offset(r.addr, k.page_size):
        raise MmapError(errno.EINVAL, f"mremap: old_address={r.addr:#x} is not page-aligned")
    if not r.new_len:
        raise MmapError(errno.EINVAL, "mremap: new_size=0")
    task = k.task_size
    if r.new_len > task:
        raise MmapError(errno.EINVAL, f"mremap: new_size={r.new_len:#x} exceeds the user "
                        f"space end {task:#x}")
    if not r.flags & _NEW_ADDR:
        return
    if r.new_addr > task - r.new_len or page_offset(r.new_addr, k.page_size):
        raise MmapError(errno.EINVAL, f"mremap: new_address={r.new_addr:#x} is unaligned or "
                        "the new range passes the user space end")
    if not r.flags & MREMAP_MAYMOVE:
        raise MmapError(errno.EINVAL, "mremap: MREMAP_FIXED or MREMAP_DONTUNMAP without "
                        "MREMAP_MAYMOVE")
    if r.flags & MREMAP_DONTUNMAP and r.old_len != r.new_len:
        raise MmapError(errno.EINVAL, "mremap: MREMAP_DONTUNMAP with a new size")
    if r.addr + r.old_len > r.new_addr and r.new_addr + r.new_len > r.addr:
        raise MmapError(errno.EINVAL, f"mremap: {r.new_addr:#x}+{r.new_len:#x} overlaps "
                        f"{r.addr:#x}+{r.old_len:#x}")
    if len(k.vmas) + 2 >= k.vmas.max_map_count - 3:
        raise MmapError(errno.ENOMEM, f"mremap: {len(k.vmas)} mappings leave no room below "
                        f"max_map_count={k.vmas.max_map_count}")


def _lookup(k: Kernel, addr: int) -> Vma:
    """vma_lookup: the VMA holding ``addr``, else EFAULT."""
    _, vma = k.vmas.find(addr)
    if vma is None or vma.start > addr:
        raise MmapError(errno.EFAULT, f"mremap: nothing mapped at {addr:#x}")
    return vma


def _check_vma(k: Kernel, r: Remap, vma: Vma) -> bool:
    """check_prep_vma: whether the call maps new address space (grows, or moves), and if
    so that ``vma`` allows it: EINVAL for duplicating a private mapping (old_len 0) or a
    file offset that wraps, EFAULT for a range crossing the VMA's end (only the part that
    moves counts: Linux 6.18 lets a move that shrinks cut across mappings)."""
    if r.new_len <= r.old_len and not r.flags & _NEW_ADDR:
        return False
    if not r.old_len and not vma.flags & (VM_SHARED | VM_MAYSHARE):
        raise MmapError(errno.EINVAL, "mremap: old_size=0 duplicates only shared mappings")
    moved = min(r.old_len, r.new_len)  # a shrink with a new address cuts the tail first
    if moved > vma.end - r.addr:
        raise MmapError(errno.EFAULT, f"mremap: {r.addr:#x}+{moved:#x} crosses the end "
                        f"of the mapping at {vma.end:#x}")
    pgoff = vma.pgoff + ((r.addr - vma.start) >> k.shift)
    if r.new_len > r.old_len and pgoff + (r.new_len >> k.shift) > M64:
        raise MmapError(errno.EINVAL, "mremap: the file offset of the new end wraps")
    return True


def _shrink(k: Kernel, r: Remap) -> int:
    """shrink_vma: munmap the tail ``[addr+new_len, addr+old_len)``; returns ``addr``."""
    k.munmap(r.addr + r.new_len, r.old_len - r.new_len)
    return r.addr


def _remap_to(k: Kernel, r: Remap) -> int:
    """mremap_to (MREMAP_FIXED or MREMAP_DONTUNMAP): FIXED unmaps the target first; a
    shrink cuts the tail first; then the (rest of the) range moves."""
    if r.flags & MREMAP_FIXED:
        k.munmap(r.new_addr, r.new_len)
    vma = _lookup(k, r.addr)
    if r.new_len < r.old_len:
        _shrink(k, r)
        r = replace(r, old_len=r.new_len)
        vma = _lookup(k, r.addr)
    return _move(k, r, vma, _new_place(k, r, vma))


def _expand(k: Kernel, r: Remap, vma: Vma) -> int:
    """expand_vma: grow in place when the range ends the VMA and the gap above is free,
    else move with MREMAP_MAYMOVE, else ENOMEM."""
    end = vma.end
    if end - r.addr == r.old_len and k.vmas.is_free(end, end + r.delta):
        if vma.flags & VM_ACCOUNT:
            k.charge(r.delta)
        i = k.vmas.first_ending_after(end)
        k.vmas.insert(i, Vma(end, end + r.delta, vma.flags,
                             vma.pgoff + ((end - vma.start) >> k.shift), vma.file, 0))
        _populate_locked(k, vma.flags, end, end + r.delta)
        return r.addr
    if not r.flags & MREMAP_MAYMOVE:
        raise MmapError(errno.ENOMEM, f"mremap: no room to grow {r.addr:#x} in place and "
                        "no MREMAP_MAYMOVE")
    return _move(k, r, vma, _new_place(k, r, vma))


def _new_place(k: Kernel, r: Remap, vma: Vma) -> int:
    """vrm_set_new_addr: get_unmapped_area for the moved mapping (``new_addr`` exactly with
    MREMAP_FIXED, as a hint with DONTUNMAP alone, else none)."""
    pgoff = vma.pgoff + ((r.addr - vma.start) >> k.shift)
    flags = MAP_SHARED if vma.flags & VM_MAYSHARE else MAP_PRIVATE
    flags |= MAP_FIXED if r.flags & MREMAP_FIXED else 0
    file = vma.file if isinstance(vma.file, OpenFile) else None
    hint = r.new_addr if r.flags & _NEW_ADDR else 0
    return k.mmap_address(hint, r.new_len, flags, file, pgoff)


def _move(k: Kernel, r: Remap, vma: Vma, to: int) -> int:
    """move_vma: a copy of the VMA at ``to`` (merged as a new mapping would be), the PTEs
    moved there, then the source unmapped (or, with MREMAP_DONTUNMAP, left empty)."""
    if len(k.vmas) >= k.vmas.max_map_count - 3:
        raise MmapError(errno.ENOMEM, f"mremap: {len(k.vmas)} mappings leave no room below "
                        f"max_map_count={k.vmas.max_map_count}")
    if vma.flags & VM_ACCOUNT:
        k.charge(r.new_len if r.flags & MREMAP_DONTUNMAP else r.delta)
    pgoff = vma.pgoff + ((r.addr - vma.start) >> k.shift)
    if _is_anonymous(vma) and not vma.anon:
        pgoff = to >> k.shift  # copy_vma: never written, it takes its new place's offset
    k.vmas.insert(k.vmas.first_ending_after(to),
                  Vma(to, to + r.new_len, vma.flags, pgoff, vma.file, vma.anon))
    k.mmu.move(r.addr, to, r.old_len)
    if r.flags & MREMAP_DONTUNMAP:
        _dontunmap_complete(k, r)
    elif r.old_len:
        try:
            k.munmap(r.addr, r.old_len)
        except MmapError:
            pass  # unmap_source_vma: a split refused at max_map_count leaves the source
    _populate_locked(k, vma.flags, to + r.old_len, to + r.new_len)
    return to


def _dontunmap_complete(k: Kernel, r: Remap) -> None:
    """MREMAP_DONTUNMAP's source VMA stays, emptied of its pages: it loses VM_LOCKED, and
    its anon_vma when it was moved whole."""
    i = k.vmas.first_ending_after(r.addr)
    old = k.vmas[i]
    old.flags &= ~VM_LOCKED
    if old.start == r.addr and old.end == r.addr + r.old_len:
        old.anon = 0


def _move_each(k: Kernel, r: Remap) -> int:
    """remap_move: MREMAP_FIXED without a resize moves every VMA of the range to the same
    offsets from ``new_addr`` (the gaps between them kept). EFAULT for a gap at the start
    or an empty range. A VMA that cannot join a multi-VMA move (a private /dev/zero
    mapping) moves only alone, under the one-VMA rules (EFAULT past its end); met later,
    it stops the move with EFAULT, the VMAs before it already moved. Returns where the
    first went."""
    start, end = r.addr, r.addr + r.old_len
    first, target, last_end = -1, r.new_addr, 0
    pos = start
    while pos < end:  # the VMAs one by one, as Linux's iterator walks them
        i = k.vmas.first_ending_after(pos)
        if i == len(k.vmas) or k.vmas[i].start >= end:
            break
        vma = k.vmas[i]
        alone = isinstance(vma.file, OpenFile) and vma.file.zero
        if (first < 0 and start < vma.start) or (first >= 0 and alone):
            raise MmapError(errno.EFAULT, f"mremap: a gap, or a mapping that moves alone, "
                            f"in {start:#x}-{end:#x}")
        offset = vma.start - last_end if first >= 0 else 0
        last_end = vma.end
        a = max(vma.start, start)
        n = r.old_len if alone else min(end, vma.end) - a
        piece = replace(r, addr=a, old_len=n, new_len=n, new_addr=target + offset)
        _check_vma(k, piece, vma)
        got = _remap_to(k, piece)
        first = got if first < 0 else first
        target, pos = got + n, a + n
    if first < 0:
        raise MmapError(errno.EFAULT, f"mremap: nothing mapped in {start:#x}-{end:#x}")
    return first


def _is_anonymous(vma: Vma) -> bool:
    """vma_is_anonymous: private anonymous memory (a private /dev/zero mapping too)."""
    file = vma.file
    if isinstance(file, Shmem):
        return False
    return file is None or (file.zero and not vma.flags & VM_MAYSHARE)


def _populate_locked(k: Kernel, flags: int, start: int, end: int) -> None:
    """mm_populate of the part a VM_LOCKED mapping grew by (as mmap populates it)."""
    if flags & VM_LOCKED and end > start:
        write = flags & (VM_WRITE | VM_SHARED) == VM_WRITE
        k.mmu.translate_range(start, end, Access.PTRACE_WRITE if write
                              else Access.PTRACE_READ)
