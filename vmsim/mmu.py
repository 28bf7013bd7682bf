"""The MMU layer: every access to simulated memory is translated here, page by page, through
the page table; what the page table does not allow is a page fault for the kernel layer.

Part of ``vmsim``, above ``vmsim.pagetable`` (the PTE words and frames) and below
``vmsim.kernel``, which it reaches only through the :class:`FaultHandler` it is given.

:meth:`Mmu.translate` (one page) and :meth:`Mmu.translate_range` (a run of pages, in numpy)
are the one entry point of every access: the access paths below (:meth:`Mmu.load`,
:meth:`Mmu.store`, :meth:`Mmu.store_words`) and, later, a CPU's loads, stores and fetches.
An access within one page whose PTE lets it through is settled first by
:meth:`Mmu.present_frame`, with integer tests instead of numpy's per-call cost.
A PTE lets an access through as x86 hardware would (present; writable for a store; not NX for
a fetch; no access-denying protection key for a load). Any other page, and any page the
kernel asked to see (the software bits ``FILE`` and ``SIZED``, see ``vmsim.pagetable``), goes
to :meth:`FaultHandler.page_fault`, which fills the PTE (demand paging, copy-on-write) or
raises :class:`~vmsim.fault.Fault`, as a kernel's page-fault handler sends a signal.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from loader.pages import page_offset, page_round_down, page_round_up
from vmsim.fault import Access, Fault, raise_found
from vmsim.pagetable import (
    ENTRIES,
    PTE_COW,
    PTE_FILE,
    PTE_FRAME,
    PTE_NX,
    PTE_P,
    PTE_PKEY_SHIFT,
    PTE_PROTNONE,
    PTE_SIZED,
    PTE_U,
    PTE_W,
    FramePool,
    PageTable,
    any_set,
    runs,
)

__all__ = ["PTE_COW", "PTE_FILE", "PTE_FRAME", "PTE_NX", "PTE_P", "PTE_PKEY_SHIFT",
           "PTE_PROTNONE", "PTE_SIZED", "PTE_U", "PTE_W", "VA_TOP", "FaultHandler", "Mmu",
           "Translation", "beyond_user_space"]

VA_TOP = 1 << 47
"""The end of the lower canonical half: the user address space of 4-level paging."""
_WORD = 1 << 64

_U64 = np.uint64
_N_HAS = _U64(PTE_P | PTE_PROTNONE)
_N_WATCHED = _U64(PTE_FILE | PTE_SIZED)
_N_FILE = _U64(PTE_FILE)
_N_FRAME = _U64(PTE_FRAME)
_N_SHARED = _U64(PTE_COW | PTE_FILE)
_N_12 = _U64(12)
_N_ZERO = _U64(0)
_PKEY_MASK = 0xF << PTE_PKEY_SHIFT

_ALLOWS: dict[Access, tuple[np.uint64, np.uint64]] = {
    Access.READ: (_U64(PTE_P | _PKEY_MASK), _U64(PTE_P)),
    Access.EXECUTE: (_U64(PTE_P | PTE_NX), _U64(PTE_P)),
    Access.WRITE: (_U64(PTE_P | PTE_W), _U64(PTE_P | PTE_W)),
    Access.PTRACE_WRITE: (_U64(PTE_P | PTE_W), _U64(PTE_P | PTE_W)),
}
"""Per access, the PTE bits that decide it and the value they must have to let it through
without the kernel (a forced read needs only a frame: see :meth:`Mmu.needs_kernel`)."""
_ALLOWS_INT = {access: (int(bits | _N_WATCHED), int(want))
               for access, (bits, want) in _ALLOWS.items()}
"""The same as Python integers, the watched bits included (see :meth:`Mmu.present_frame`)."""


def beyond_user_space(va: int, access: Access) -> Fault:
    """The fault of an access at ``va`` at or above the user space's end: a non-canonical
    address is a #GP, which the kernel reports as SIGSEGV with SI_KERNEL; the kernel half
    has no user pages (SEGV_MAPERR)."""
    noncanonical = VA_TOP <= va < _WORD - VA_TOP
    return Fault(va, access, "SIGSEGV", "SI_KERNEL" if noncanonical else "SEGV_MAPERR")


class FaultHandler(Protocol):
    """What the MMU needs of the kernel layer."""

    def page_fault(self, va: int, ptes: npt.NDArray[np.uint64], need: npt.NDArray[np.bool_],
                   access: Access) -> None:
        """Handle the pages ``need`` of the PTEs ``ptes`` (consecutive pages from ``va``) in
        address order: fill their PTEs in place, or raise the Fault of the first one the
        access may not touch (at its first byte), the earlier ones handled."""

    def first_write(self, va: int) -> int:
        """The PTE word for a user-mode write to the page at ``va``, which has no PTE yet,
        when the page lies in private anonymous memory the write may touch: a new zeroed
        frame, set up and counted as :meth:`page_fault` would; 0 in every other case (which
        then goes through :meth:`page_fault`)."""

    def write_through(self, addr: int, data: npt.NDArray[np.uint8]) -> None:
        """``data`` was just stored at ``addr`` on pages holding page-cache frames."""

    def refused_writes(self, pages: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_] | None:
        """Which of the sorted, distinct page numbers ``pages`` a user-mode write would fault
        on (None when none would)."""

    def first_fault(self, addr: int, n: int, access: Access) -> Fault | None:
        """The Fault the access of ``[addr, addr+n)`` would raise, or None; changes nothing."""


class Translation:
    """What :meth:`Mmu.translate_range` found: the frames of the pages from the first, up to
    the first page that faulted (``fault``, None when all did translate); ``file_backed``
    when the access writes and one of them holds a page-cache frame."""

    __slots__ = ("fault", "file_backed", "frames")

    def __init__(self, frames: npt.NDArray[np.int64], fault: Fault | None,
                 file_backed: bool) -> None:
        self.frames = frames
        self.fault = fault
        self.file_backed = file_backed

    def raise_fault(self) -> None:
        """Raise the fault, if any (letting go of it: see :func:`vmsim.fault.raise_found`)."""
        raise_found(self._take_fault)

    def _take_fault(self) -> Fault | None:
        fault, self.fault = self.fault, None
        return fault


class Mmu:
    """The page table and the frames (physical memory) of one address space, and the
    translation of every access through them. ``kernel`` is the page-fault handler, set by
    the kernel layer when it takes this MMU."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.shift = page_size.bit_length() - 1
        self.pt = PageTable(self.shift)
        self.pool = FramePool(page_size)
        self._kernel: Callable[[], FaultHandler | None] = lambda: None
        self.tlb_flushes: list[Callable[[], None]] = []
        """What to call when translations a CPU may have cached stop holding (a CPU's TLB
        flush, ``vmsim.cpu``): PTEs cleared or changed, a frame replaced by its copy."""

    def flush_tlb(self) -> None:
        """Tell every CPU caching this page table's translations to drop them (a TLB
        shootdown)."""
        for flush in self.tlb_flushes:
            flush()

    @property
    def kernel(self) -> FaultHandler:
        """The page-fault handler (held weakly: the kernel holds this MMU)."""
        handler = self._kernel()
        assert handler is not None, "an MMU needs its kernel's page-fault handler"
        return handler

    @kernel.setter
    def kernel(self, handler: FaultHandler) -> None:
        self._kernel = weakref.ref(handler)

    def needs_kernel(self, ptes: npt.NDArray[np.uint64], access: Access) -> npt.NDArray[np.bool_]:
        """The pages whose PTE does not let ``access`` through, or that the kernel watches."""
        need: npt.NDArray[np.bool_]
        if access is Access.PTRACE_READ:
            need = ((ptes & _N_HAS) == _N_ZERO) | ((ptes & _N_WATCHED) != _N_ZERO)
        else:
            bits, want = _ALLOWS[access]  # a watched bit set makes the PTE differ from want
            need = (ptes & (bits | _N_WATCHED)) != want
        return need

    def present_frame(self, addr: int, n: int, access: Access) -> int:
        """The frame of the one page holding all of ``[addr, addr+n)`` when its PTE lets
        ``access`` through without the kernel, else -1 (the range spans pages, or the page
        needs the kernel: then :meth:`translate_range` decides).

        Why: an access within a page already present is what a CPU's loads and stores (and
        a debugger's peeks) mostly are; checking its one PTE with integer tests costs a dict
        lookup, where the numpy path costs a few microseconds per array operation."""
        allows = _ALLOWS_INT.get(access)
        if allows is None or addr >= VA_TOP or (addr ^ (addr + n - 1)) >> self.shift:
            return -1
        row = self.pt.leaves.get(addr >> self.pt.leaf_shift)
        if row is None:
            return -1
        pte = int(self.pt.tables[row, (addr >> self.shift) & (ENTRIES - 1)])
        if pte & allows[0] != allows[1]:
            return -1
        return (pte & PTE_FRAME) >> 12

    def translate(self, va: int, access: Access) -> int:
        """The frame holding the byte at ``va`` for ``access``, or raise its Fault."""
        frame = self.present_frame(va, 1, access)
        if frame >= 0:
            return frame
        got = self.translate_range(va, va + 1, access)
        got.raise_fault()
        return int(got.frames[0])

    def translate_range(self, addr: int, end: int, access: Access) -> Translation:
        """Translate the pages of ``[addr, end)`` for ``access``, in address order, leaf table
        by leaf table: the pages the PTEs refuse go to the kernel's page-fault handler. Stops
        at the first page that faults (reported at ``addr`` when it holds it)."""
        if addr >= VA_TOP:
            return Translation(np.empty(0, np.int64), beyond_user_space(addr, access), False)
        kernel = self.kernel
        parts, fault, file_backed = [], None, False
        top = min(page_round_up(end, self.page_size), VA_TOP)
        for va, row, i0, i1 in self.pt.chunks(page_round_down(addr, self.page_size), top, True):
            ptes = self.pt.tables[row, i0:i1]  # tables may have grown: look them up again
            need = self.needs_kernel(ptes, access)
            if any_set(need):
                try:
                    kernel.page_fault(va, ptes, need, access)
                except Fault as err:
                    # kept, not raised here: drop the traceback (its frames would hold it)
                    fault = err.at(max(addr, err.addr)).with_traceback(None)
                    ptes = ptes[: (fault.addr - va) >> self.shift]
                if access.writes and not file_backed:
                    file_backed = any_set((ptes & _N_FILE) != _N_ZERO)
            parts.append(((ptes & _N_FRAME) >> _N_12).astype(np.int64))
            if fault is not None:
                break
        if fault is None and end > VA_TOP:
            fault = beyond_user_space(max(addr, VA_TOP), access)
        frames = np.concatenate(parts) if len(parts) != 1 else parts[0]
        return Translation(frames, fault, file_backed)

    def _block(self, frames: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.uint8], bool]:
        """The bytes of ``frames`` in order: a view when they are consecutive (True), else
        a gathered copy (False)."""
        rows = self.pool.rows(frames)
        if rows is not None:
            return rows.reshape(-1), True
        return self.pool.data[frames].reshape(-1), False

    def load(self, addr: int, n: int, access: Access) -> npt.NDArray[np.uint8]:
        """The ``n`` bytes (n > 0) at ``addr`` for a read, fetch or forced read: a view of the
        frames when they are consecutive, else a gathered copy. Raises the Fault of the first
        page that faults."""
        frame = self.present_frame(addr, n, access)
        start = page_offset(addr, self.page_size)
        if frame >= 0:
            return self.pool.data[frame, start: start + n]
        got = self.translate_range(addr, addr + n, access)
        got.raise_fault()
        flat, _ = self._block(got.frames)
        return flat[start: start + n]

    def fresh_frame(self, addr: int, n: int, access: Access) -> int:
        """The frame of the one page holding all of ``[addr, addr+n)`` when ``access`` is a
        user-mode write, the page has no PTE yet and the kernel settles it at once
        (:meth:`FaultHandler.first_write`: private anonymous memory); else -1 (then
        :meth:`translate_range` decides).

        Why: a loader's copy of each segment into fresh anonymous memory is mostly such
        writes, and the general path's numpy steps on arrays of one PTE cost about 20 us a
        page, where this costs a few (as :meth:`present_frame` does for present pages)."""
        if access is not Access.WRITE or addr >= VA_TOP or (addr ^ (addr + n - 1)) >> self.shift:
            return -1
        row = self.pt.leaf(addr, True)
        index = (addr >> self.shift) & (ENTRIES - 1)
        if self.pt.tables[row, index]:
            return -1
        pte = self.kernel.first_write(page_round_down(addr, self.page_size))
        if not pte:
            return -1
        self.pt.tables[row, index] = pte
        return (pte & PTE_FRAME) >> 12

    def store(self, addr: int, src: npt.NDArray[np.uint8], access: Access) -> None:
        """Store ``src`` (non-empty) at ``addr`` for a write or forced write; the bytes before
        the first page that faults are stored, then its Fault is raised."""
        frame = self.present_frame(addr, len(src), access)
        if frame < 0:
            frame = self.fresh_frame(addr, len(src), access)
        if frame >= 0:
            start = page_offset(addr, self.page_size)
            self.pool.data[frame, start: start + len(src)] = src
            return
        got = self.translate_range(addr, addr + len(src), access)
        if len(got.frames):
            start = page_offset(addr, self.page_size)
            stored = min(len(src), (len(got.frames) << self.shift) - start)
            flat, is_view = self._block(got.frames)
            flat[start: start + stored] = src[:stored]
            if not is_view:
                self.pool.data[got.frames] = flat.reshape(len(got.frames), -1)
            if got.file_backed:
                self.kernel.write_through(addr, src[:stored])
        got.raise_fault()

    def store_words(self, where: npt.NDArray[np.uint64], words: npt.NDArray[np.uint64]) -> bool:
        """Store 8-byte ``words`` at the addresses ``where`` (non-empty) as one scatter, the
        pages translated run by run. When a word would fault, the words before the first such
        one (in array order) are stored and its Fault raised. Returns False, storing nothing,
        when a page holds a page-cache frame (the caller then stores word by word, so that
        the file sees each)."""
        kernel = self.kernel
        pages, first, last = self._word_pages(where)
        refused = kernel.refused_writes(pages)
        if refused is not None:
            stop = int(np.argmax(refused[first] | refused[last]))
            if stop and not self.store_words(where[:stop], words[:stop]):
                return False
            word = int(where[stop])  # a store faults whole: the fault of its first bad byte
            raise_found(lambda: kernel.first_fault(word, 8, Access.WRITE))
            raise AssertionError("write_words: the faulting word did not fault")
        frame_of = np.empty(len(pages), dtype=np.int64)
        for k0, k1 in runs(pages):
            lo, hi = int(pages[k0]) << self.shift, (int(pages[k1 - 1]) + 1) << self.shift
            got = self.translate_range(lo, hi, Access.WRITE)
            assert got.fault is None, "write_words: a checked page faulted"
            if got.file_backed:
                return False
            frame_of[k0:k1] = got.frames
        self._scatter(where, words, first, last, frame_of)
        return True

    def _word_pages(self, where: npt.NDArray[np.uint64]) -> tuple[
            npt.NDArray[np.uint64], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """The distinct pages the 8-byte words at ``where`` touch, sorted, and for each word
        the index among them of its first byte's page and of its last byte's (addresses
        past the user space count as its end, which faults). A loader's words come aligned
        and in address order: for them one pass finds the pages, without the sort of
        ``np.unique`` (which was a third of a large library's load)."""
        shift = _U64(self.shift)
        clipped = np.minimum(where, _U64(VA_TOP))
        first = clipped >> shift
        if not (where & _U64(7)).any() and bool((first[1:] >= first[:-1]).all()):
            new = np.empty(len(first), dtype=np.bool_)  # an aligned word has one page
            new[0] = True
            np.not_equal(first[1:], first[:-1], out=new[1:])
            index = np.cumsum(new, dtype=np.intp) - 1
            return first[new], index, index
        last = (clipped + _U64(7)) >> shift
        pages = np.unique(np.concatenate([first, last]))
        return pages, np.searchsorted(pages, first), np.searchsorted(pages, last)

    def _scatter(self, where: npt.NDArray[np.uint64], words: npt.NDArray[np.uint64],
                 first: npt.NDArray[np.intp], last: npt.NDArray[np.intp],
                 frame_of: npt.NDArray[np.int64]) -> None:
        """The stores of :meth:`store_words` once the page of word ``i``'s first byte is
        frame ``frame_of[first[i]]`` and that of its last byte ``frame_of[last[i]]``."""
        shift, pmask = self.shift, _U64(self.page_size - 1)
        flat = self.pool.data.reshape(-1)
        if not (where & _U64(7)).any():  # aligned words never straddle a page
            pos = (frame_of[first] << shift) + (where & pmask).astype(np.int64)
            flat.view("<u8")[pos >> 3] = words  # aligned words: one 8-byte store each
            return
        offset = (where & pmask).astype(np.int64)[:, None] + np.arange(8, dtype=np.int64)
        spill = offset >= self.page_size  # the bytes on the next page
        frame = np.where(spill, frame_of[last][:, None], frame_of[first][:, None])
        flat[(frame << shift) + np.where(spill, offset - self.page_size, offset)] = \
            words.view(np.uint8).reshape(-1, 8)

    # ---- the page-table operations the kernel asks for

    def pte(self, va: int) -> int:
        """The PTE word for ``va`` (0 when none), read by a full page-table walk."""
        return self.pt.walk(va) if va < VA_TOP else 0

    def protect(self, start: int, end: int, bits: int) -> None:
        """change_protection: give the PTEs of ``[start, end)`` that hold something the
        permission bits ``bits`` (copy-on-write frames stay read-only)."""
        rw, ro = _U64(bits), _U64(bits & ~PTE_W)
        keep = _U64(PTE_FRAME | PTE_COW | PTE_FILE | PTE_SIZED)
        if self._no_leaf_under(start, end):
            return
        tables = self.pt.tables
        for _, row, i0, i1 in self.pt.chunks(start, end, False):
            ptes = tables[row, i0:i1]
            has = (ptes & _N_HAS) != _N_ZERO
            if any_set(has):
                perm = np.where((ptes & _U64(PTE_COW)) != _N_ZERO, ro, rw)
                ptes[:] = np.where(has, (ptes & keep) | perm, _N_ZERO)
        self.flush_tlb()

    def _no_leaf_under(self, start: int, end: int) -> bool:
        """True when no leaf table lies under ``[start, end)`` (no page of it was ever
        touched), found without a walk: no leaf at all, or none for a range within one
        leaf's span (one dict lookup). The walk's generator and numpy slices cost
        microseconds, and a fresh mapping's munmap or mprotect (a load's holes) meets none."""
        leaves, ls = self.pt.leaves, self.pt.leaf_shift
        return not leaves or (start >> ls == (end - 1) >> ls and start >> ls not in leaves)

    def unmap(self, start: int, end: int) -> None:
        """Clear the PTEs of ``[start, end)``, freeing the frames they own (not the zero page
        and not page-cache frames).

        Pages never touched have no PTEs (the munmap of an untouched anonymous mapping, the
        usual case), and finding so is made cheap: a range without a leaf table under it
        (none at all, or none for a range within one leaf's span: one dict lookup) is
        skipped before the walk, whose generator and numpy slices cost microseconds; a
        leaf's PTEs are tested with ``np.count_nonzero`` (0.5 us, where ``ndarray.any()``
        costs 2 us a call)."""
        if self._no_leaf_under(start, end):
            return
        tables = self.pt.tables
        for _, row, i0, i1 in self.pt.chunks(start, end, False):
            ptes = tables[row, i0:i1]
            if not np.count_nonzero(ptes):
                continue
            frames = ((ptes & _N_FRAME) >> _N_12).astype(np.int64)
            owned = ((ptes & _N_HAS) != _N_ZERO) & ((ptes & _N_SHARED) == _N_ZERO) & (frames != 0)
            if any_set(owned):
                self.pool.free(frames[owned])
            ptes[:] = 0
        self.flush_tlb()

    def move(self, src: int, dst: int, length: int) -> None:
        """move_page_tables: the PTEs of page-aligned ``[src, src+length)`` go to the same
        places from ``dst`` (which holds none), frames, copy-on-write and file marks with
        them; the source's are cleared. Nothing is freed, copied or re-read."""
        if self._no_leaf_under(src, src + length):
            return
        moved = []
        for va, row, i0, i1 in self.pt.chunks(src, src + length, False):
            ptes = self.pt.tables[row, i0:i1]
            if np.count_nonzero(ptes):
                moved.append((dst + (va - src), ptes.copy()))
                ptes[:] = 0
        for va, words in moved:  # creating tables may grow the array: source views first
            k = 0
            for _, row, i0, i1 in self.pt.chunks(va, va + (len(words) << self.shift), True):
                self.pt.tables[row, i0:i1] = words[k: k + i1 - i0]
                k += i1 - i0
        self.flush_tlb()

    def resident_pages(self) -> int:
        """Pages whose PTE holds a frame (present or PROT_NONE), the zero page excluded."""
        resident = 0
        tables = self.pt.tables
        for row in self.pt.leaves.values():
            ptes = tables[row]
            resident += int(np.count_nonzero(((ptes & _N_HAS) != _N_ZERO)
                                             & ((ptes & _N_FRAME) != _N_ZERO)))
        return resident

    def present_ptes(self) -> list[tuple[int, int]]:
        """Every non-zero PTE as ``(va, pte)`` (for invariant checks)."""
        got = []
        tables = self.pt.tables
        for key, row in self.pt.leaves.items():
            ptes = tables[row]
            for j in np.flatnonzero(ptes).tolist():
                got.append(((key << self.pt.leaf_shift) | (j << self.shift), int(ptes[j])))
        return got
