"""The simulated machine's hardware data: a radix page table of x86-64 PTE words and a pool
of page frames (its physical memory).

Bottom of the simulator (``vmsim``): it knows nothing of mappings, files or errno. The kernel
layer (``vmsim.kernel``) decides what each PTE holds; the MMU layer (``vmsim.mmu``) walks them
for every access.

PTE word (x86-64 layout, one ``uint64`` per page)::

    63   62..59  58..52  51..12         11     10    9    8         2  1  0
    NX   pkey    -       frame number   SIZED  FILE  COW  PROTNONE  U  W  P

``P`` present, ``W`` writable, ``U`` user, ``NX`` no-execute, ``pkey`` the protection key
(execute-only memory uses one that denies data access). ``PROTNONE`` is Linux's marker for a
PROT_NONE page that keeps its frame while not present. Bits 9 to 11 are free for software on
x86; the simulator uses them: ``COW`` marks a frame shared read-only (the zero page, or a
file's page-cache page in a private mapping) that a write must copy; ``FILE`` marks a
page-cache frame, which the kernel refreshes from the file before use; ``SIZED`` marks a
private copy of a file's page, whose access the kernel still checks against the file's end.
The MMU hands every access to a ``FILE`` or ``SIZED`` page to the kernel.

Tables are 512-entry ``uint64`` rows of one numpy array, allocated on demand; an upper-level
entry holds the row number of the next table in its frame field. Enough levels are used to
cover a 47-bit user address space for the configured page size (4 for 4 KiB pages).
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.pages import page_offset

__all__ = ["ENTRIES", "PTE_COW", "PTE_FILE", "PTE_FRAME", "PTE_NX", "PTE_P", "PTE_PKEY_SHIFT",
           "PTE_PROTNONE", "PTE_SIZED", "PTE_U", "PTE_W", "FramePool", "PageTable", "any_set",
           "runs", "set_indices"]

PTE_P = 1 << 0
PTE_W = 1 << 1
PTE_U = 1 << 2
PTE_PROTNONE = 1 << 8
PTE_COW = 1 << 9
PTE_FILE = 1 << 10
PTE_SIZED = 1 << 11
PTE_PKEY_SHIFT = 59
PTE_NX = 1 << 63
PTE_FRAME = ((1 << 52) - 1) & ~((1 << 12) - 1)
"""Mask of the frame-number field (bits 12-51)."""

ENTRIES = 512
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_POPULATE_MIN = 16  # frames: below this, the host's own page faults are as cheap
_TABLE_LINK = PTE_P | PTE_W | PTE_U


def any_set(mask: npt.NDArray[np.bool_]) -> bool:
    """``mask.any()``, counted instead: ``np.count_nonzero`` costs 0.4 us where
    ``ndarray.any()`` costs 1.5 us (it goes through numpy's Python-level reduction wrapper),
    and every access that misses the MMU's scalar path asks a few times, on arrays of one or
    a few PTEs."""
    return bool(np.count_nonzero(mask))


def set_indices(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    """``np.flatnonzero(mask)`` for a one-dimensional ``mask``, without its ravel and
    dispatch wrappers (0.3 us instead of 1.7 us: see :func:`any_set`)."""
    return mask.nonzero()[0]


def runs(numbers: npt.NDArray[Any]) -> Iterator[tuple[int, int]]:
    """The runs of consecutive values in sorted ``numbers`` (page or frame numbers), as
    index ranges ``(k0, k1)``."""
    if len(numbers) < 2 or int(numbers[-1]) - int(numbers[0]) == len(numbers) - 1:
        yield 0, len(numbers)  # one run (numbers are sorted and distinct)
        return
    edges = [0, *(np.flatnonzero(np.diff(numbers) != 1) + 1).tolist(), len(numbers)]
    yield from itertools.pairwise(edges)


class FramePool:
    """Page frames as rows of one ``uint8`` numpy array over an anonymous host mapping.

    The host mapping is made at the first allocation (until then only the zero page exists,
    in memory of numpy's own: a space that never touches a page, like one whose load is
    refused while parsing, costs no host mmap and munmap, a third of its construction and
    teardown). It starts small (``capacity`` frames) and grows on demand, doubling, with
    mremap (nothing copied; a copy only when a view of the old array is still alive): frame
    numbers never change, only the array's base. It is made with MAP_NORESERVE, so the host
    commits memory only for frames actually written (as the simulated kernel does); an idle
    pool costs little address space, so many spaces can exist at once and the simulator runs
    under a small ``ulimit -v``.
    Frame 0 is the zero page: always zeros, never handed out. Freed frames are reused first.
    """

    def __init__(self, page_size: int, capacity: int = 16) -> None:
        self.page_size = page_size
        self._capacity = max(capacity, 2)
        self._map: mmap.mmap | None = None
        self.data: npt.NDArray[np.uint8] = np.zeros((1, page_size), dtype=np.uint8)
        self._next = 1
        self._free: list[int] = []

    def _reserve(self, frames: int) -> mmap.mmap:
        """A zero-filled, lazily committed host mapping for ``frames`` frames."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
        return mmap.mmap(-1, frames * self.page_size, flags=flags)

    def _host_mapping(self, frames: int) -> mmap.mmap:
        """``_reserve``, the host's refusal raised as MemoryError."""
        try:
            return self._reserve(frames)
        except OSError as err:
            raise MemoryError(f"frame pool: cannot grow to {frames} frames: {err}") from err

    def _view(self, host: mmap.mmap, frames: int) -> npt.NDArray[np.uint8]:
        """The host mapping as a (frames, page_size) array."""
        return np.frombuffer(host, dtype=np.uint8).reshape(frames, self.page_size)

    def _grow(self, frames: int) -> None:
        """Make room for ``frames`` frames: resize the host mapping (mremap moves its pages,
        nothing is copied) when no view of it is alive, else copy the frames in use to a new
        mapping. Frame numbers never change. Raises MemoryError when the host refuses
        (address space exhausted)."""
        if self._map is None:  # the first allocation: no frame but the zero page yet
            self._map = self._host_mapping(frames)
            self.data = self._view(self._map, frames)
            return
        old = self.data
        self.data = np.empty((0, self.page_size), dtype=np.uint8)
        del old  # our own export of the mapping: mremap needs none left
        try:
            self._map.resize(frames * self.page_size)
            self.data = self._view(self._map, frames)
            return
        except (BufferError, OSError, SystemError, ValueError):
            pass  # a caller still holds a view (or no mremap): copy instead
        current = self._view(self._map, len(self._map) // self.page_size)
        try:
            host = self._host_mapping(frames)
        except MemoryError:
            self.data = current
            raise
        grown = self._view(host, frames)
        grown[: self._next] = current[: self._next]
        self._map, self.data = host, grown

    @property
    def in_use(self) -> int:
        """Frames handed out and not yet freed (the zero page excluded)."""
        return self._next - 1 - len(self._free)

    def alloc(self, n: int) -> npt.NDArray[np.int64]:
        """``n`` zero-filled frames, as an array of frame numbers (ascending when fresh)."""
        reused = self._free[-n:] if n and self._free else []
        if reused:
            del self._free[-len(reused):]
        fresh = n - len(reused)
        if self._next + fresh > len(self.data):
            self._grow(max(2 * len(self.data), self._next + fresh, self._capacity))
        got = np.empty(n, dtype=np.int64)
        got[: len(reused)] = reused
        got[len(reused):] = np.arange(self._next, self._next + fresh)
        if fresh >= _POPULATE_MIN:
            self._populate(self._next, fresh)
        self._next += fresh
        if reused:
            self.data[got[: len(reused)]] = 0
        return got

    def _populate(self, first: int, n: int) -> None:
        """Ask the host to back frames ``[first, first+n)`` now, in one call
        (MADV_POPULATE_WRITE): faster than taking the host's page faults one by one. Only a
        speed-up; ignored where the host cannot."""
        start, length = first * self.page_size, n * self.page_size
        if self._map is None or page_offset(start) or page_offset(length):
            return  # no host mapping yet, or not in host pages (madvise wants them)
        try:
            self._map.madvise(_MADV_POPULATE_WRITE, start, length)
        except (OSError, ValueError):
            pass

    def rows(self, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8] | None:
        """The frames ``frames`` as a (len, page_size) view when they are consecutive (as
        fresh frames are), else None: a view is copied into or read into with one memcpy,
        where a fancy index gathers or scatters page by page through a temporary."""
        f0, k = int(frames[0]), len(frames)
        if int(frames[-1]) - f0 == k - 1 and (k < 3 or bool((np.diff(frames) == 1).all())):
            return self.data[f0: f0 + k]
        return None

    def copy(self, dst: npt.NDArray[np.int64], src: npt.NDArray[np.int64]) -> None:
        """Copy frame ``src[k]`` into frame ``dst[k]`` (copy-on-write), distinct frames."""
        to, of = self.rows(dst), self.rows(src)
        if to is not None and of is not None:
            to[:] = of
        else:
            self.data[dst] = self.data[src]

    def free(self, frames: npt.NDArray[np.int64]) -> None:
        """Return frames to the pool. The zero page (0) must not be among them."""
        self._free.extend(frames.tolist())


class PageTable:
    """A radix page table of PTE words, tables allocated on demand, row 0 the root.

    ``leaf(va)`` gives the row of the last-level table covering ``va`` (512 pages); a dict
    remembers leaf rows by ``va >> leaf_shift`` so repeated walks are one lookup (what a
    paging-structure cache does in hardware).
    """

    def __init__(self, page_shift: int, va_bits: int = 47) -> None:
        self.page_shift = page_shift
        self.leaf_shift = page_shift + 9
        self.levels = max(1, -(-(va_bits - page_shift) // 9))
        # room for one walk's tables (root to leaf) and a few more before the first growth
        self.tables: npt.NDArray[np.uint64] = np.zeros((2 * self.levels, ENTRIES), dtype=np.uint64)
        self.count = 1
        self.leaves: dict[int, int] = {}

    def _new_table(self) -> int:
        """Allocate a zeroed table row and return its number."""
        if self.count == len(self.tables):
            grown = np.zeros((2 * self.count, ENTRIES), dtype=np.uint64)
            grown[: self.count] = self.tables
            self.tables = grown
        self.count += 1
        return self.count - 1

    def leaf(self, va: int, create: bool) -> int:
        """The row of the leaf table for ``va``, walking from the root; -1 if absent and not
        ``create``."""
        key = va >> self.leaf_shift
        row = self.leaves.get(key)
        if row is not None:
            return row
        if not create:
            return -1
        row = 0
        for level in range(self.levels - 1, 0, -1):
            index = (va >> (self.page_shift + 9 * level)) & (ENTRIES - 1)
            entry = int(self.tables[row, index])
            if entry & PTE_P:
                row = (entry & PTE_FRAME) >> 12
            else:
                child = self._new_table()
                self.tables[row, index] = (child << 12) | _TABLE_LINK
                row = child
        self.leaves[key] = row
        return row

    def walk(self, va: int) -> int:
        """The PTE word for ``va`` (0 when no table covers it): the full 4-level walk."""
        row = 0
        for level in range(self.levels - 1, 0, -1):
            entry = int(self.tables[row, (va >> (self.page_shift + 9 * level)) & (ENTRIES - 1)])
            if not entry & PTE_P:
                return 0
            row = (entry & PTE_FRAME) >> 12
        return int(self.tables[row, (va >> self.page_shift) & (ENTRIES - 1)])

    def chunks(self, va0: int, va1: int, create: bool) -> Iterator[tuple[int, int, int, int]]:
        """Split page-aligned ``[va0, va1)`` at leaf boundaries: yield ``(va, row, i0, i1)``
        with PTEs ``tables[row, i0:i1]`` covering the pages from ``va``. Without ``create``,
        leaves that do not exist are skipped, visiting only existing ones for huge ranges."""
        shift, ls = self.page_shift, self.leaf_shift
        first, last = va0 >> ls, (va1 - 1) >> ls
        if create or last - first < 4 * len(self.leaves) + 8:
            keys: list[int] | range = range(first, last + 1)
        else:
            keys = sorted(k for k in self.leaves if first <= k <= last)
        for key in keys:
            row = self.leaf(key << ls, create) if create else self.leaves.get(key, -1)
            if row < 0:
                continue
            lo = max(va0, key << ls)
            hi = min(va1, (key + 1) << ls)
            i0 = (lo >> shift) & (ENTRIES - 1)
            yield lo, row, i0, i0 + ((hi - lo) >> shift)
