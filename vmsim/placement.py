"""Where a new mapping goes: Linux's get_unmapped_area for x86-64 (top-down below
``mmap_base``, the hint when free, THP alignment, MAP_32BIT, the legacy bottom-up fallback).

Part of ``vmsim``'s kernel layer, used by ``vmsim.kernel``; the searches themselves are
:meth:`vmsim.vma.VmaMap.topdown` and :meth:`~vmsim.vma.VmaMap.bottomup`.
"""

from __future__ import annotations

import errno

from loader.mmap import MmapError
from loader.pages import page_round_down, page_round_up
from vmsim.files import OpenFile
from vmsim.syscall_args import MAP_32BIT, MAP_SHARED, MAP_TYPE, PMD_SIZE
from vmsim.vma import VmaMap

__all__ = ["Placement"]


class Placement:
    """get_unmapped_area over ``vmas``: ``mmap_base`` is where top-down placement starts;
    when it finds nothing, a bottom-up search from a third of the user space (the legacy
    layout's TASK_UNMAPPED_BASE)."""

    def __init__(self, vmas: VmaMap, mmap_base: int, page_size: int) -> None:
        self.vmas = vmas
        self.page_size = page_size
        self.mmap_base = page_round_down(mmap_base, page_size)
        self.legacy_base = page_round_down(vmas.task_size // 3, page_size)

    def get_area(self, addr: int, length: int, flags: int, file: OpenFile | None,
                 pgoff: int) -> int:
        """get_unmapped_area for a non-fixed mapping: THP-aligned for private anonymous
        multiples of 2 MiB without a hint and for files on filesystems that ask for it
        (ext4, xfs), else the plain search; ENOMEM if nowhere."""
        anon = file is None and flags & MAP_TYPE != MAP_SHARED
        if file is not None and file.zero and flags & MAP_SHARED:
            file = None  # get_unmapped_area_zero: shared /dev/zero is placed as shmem
        if (file is not None and file.thp) or (anon and not addr and not length % PMD_SIZE):
            got = self._thp_area(addr, length, flags, pgoff * self.page_size)
            if got >= 0:
                return got
        got = self._area(addr, length, flags)
        if got < 0:
            raise MmapError(errno.ENOMEM, f"mmap: no free range of length={length:#x}")
        return got

    def _area(self, addr: int, length: int, flags: int) -> int:
        """The hint if free, else top-down below mmap_base, else bottom-up (MAP_32BIT: the
        lowest fit in [1 GiB, 2 GiB)); -1 if nowhere."""
        vmas = self.vmas
        if flags & MAP_32BIT:
            return vmas.bottomup(length, 0x4000_0000, 0x8000_0000)
        if addr and vmas.task_size - length >= addr and vmas.is_free(addr, addr + length):
            return addr
        got = vmas.topdown(length, self.page_size, self.mmap_base)
        if got < 0:
            got = vmas.bottomup(length, self.legacy_base, vmas.task_size)
        return got

    def _thp_area(self, addr: int, length: int, flags: int, off: int) -> int:
        """__thp_get_unmapped_area: search with 2 MiB of padding, then place the mapping so
        that file offset and address agree modulo 2 MiB (the hint, if the padded range
        fits there, is kept as is); -1 when the padded search fails or THP cannot apply."""
        size = PMD_SIZE
        off_align = page_round_up(off, size)
        if off + length <= off_align or off + length - off_align < size:
            return -1
        got = self._area(addr, length + size, flags)
        if got < 0 or got == addr:
            return got
        sub = (off - got) & (size - 1)
        return got + (sub if sub else size)
