"""Plan: a pure, printable description of a load, computed from the checked ELF image alone.

Part of the ``loader`` layer (imports ``loader.elf``, ``loader.pages``, ``loader.mmap``).
No memory is touched here. The plan says what to reserve, where each PT_LOAD goes (page range,
protection, file offset, bytes to copy, bytes to zero, anonymous .bss pages), where RELRO is,
and ``prot_ranges`` / ``page_prots`` predict the final protection of every page of the span.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from loader.elf import ElfImage, Segment
from loader.elfdefs import ET, PF
from loader.mmap import ProtFlags
from loader.pages import page_round_down, page_round_up

__all__ = ["LoadPlan", "SegmentPlan", "make_plan", "prot_of"]


def _prot_of_bits(p_flags: int) -> ProtFlags:
    """PF_R/PF_W/PF_X -> PROT_READ/PROT_WRITE/PROT_EXEC, flag by flag."""
    prot = ProtFlags.PROT_NONE
    for pf, bit in ((PF.R, ProtFlags.PROT_READ), (PF.W, ProtFlags.PROT_WRITE),
                    (PF.X, ProtFlags.PROT_EXEC)):
        if p_flags & pf:
            prot |= bit
    return prot


_PF_RWX = int(PF.R | PF.W | PF.X)
"""The three permission flags as a plain int: masking an int with an IntFlag makes an enum
member (a microsecond each time), masking with an int does not."""
_PROT_OF = [_prot_of_bits(flags) for flags in range(_PF_RWX + 1)]
"""``_prot_of_bits`` of every combination of the three flags, built once (enum arithmetic
costs microseconds a step, and every load asks for each of its segments)."""


def prot_of(p_flags: int) -> ProtFlags:
    """PF_R/PF_W/PF_X -> PROT_READ/PROT_WRITE/PROT_EXEC (other bits ignored)."""
    return _PROT_OF[p_flags & _PF_RWX]


@dataclass(frozen=True, slots=True)
class SegmentPlan:
    """One PT_LOAD, in vaddr terms (add the load bias for addresses).

    ``[start, map_end)`` comes from the file at ``offset`` (``content`` bytes of it are the
    segment's; a backend that cannot map files gets them copied). ``[zero_start, zero_end)``
    is the tail of the last file page to clear; ``[anon_start, anon_end)`` is the rest of
    .bss, mapped anonymously.
    """

    index: int
    start: int
    map_end: int
    offset: int
    content: int
    prot: ProtFlags
    zero_start: int
    zero_end: int
    anon_start: int
    anon_end: int

    @property
    def end(self) -> int:
        """The page-rounded end of the whole segment."""
        return max(self.map_end, self.anon_end)

    def __str__(self) -> str:
        text = (f"  LOAD[{self.index}] {self.start:#010x}-{self.map_end:#010x} "
                f"{self.prot.rwx} file@{self.offset:#x} copy {self.content:#x}")
        if self.zero_end > self.zero_start:
            text += f", zero {self.zero_start:#x}-{self.zero_end:#x}"
        if self.anon_end > self.anon_start:
            text += f", anon {self.anon_start:#x}-{self.anon_end:#x}"
        return text


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """The whole load, from the image alone: the span, the segments, RELRO, TEXTREL.

    ``fixed`` (ET_EXEC): the span must go exactly at ``vmin``. ``align`` is the largest
    p_align (the base is aligned to it when above the page size, as glibc 2.35+ does).
    """

    page_size: int
    fixed: bool
    vmin: int
    vmax: int
    align: int
    segments: tuple[SegmentPlan, ...]
    relro: tuple[int, int] | None
    textrel: bool

    @property
    def span_length(self) -> int:
        """Bytes to reserve."""
        return self.vmax - self.vmin

    def holes(self) -> list[tuple[int, int]]:
        """Page ranges of the span no segment covers (vaddr terms); they stay PROT_NONE."""
        out, at = [], self.vmin
        for seg in self.segments:
            if seg.start > at:
                out.append((at, seg.start))
            at = max(at, seg.end)
        return out

    def prot_ranges(self) -> list[tuple[int, int, ProtFlags]]:
        """The predicted final protection of the span as (start, end, prot) vaddr runs, RELRO
        applied, holes PROT_NONE: one run per change, never one per page (a .bss of
        terabytes costs nothing here)."""
        cuts = [(seg.start, seg.end, seg.prot) for seg in self.segments]
        if self.relro:
            cuts.append((self.relro[0], self.relro[1], ProtFlags.PROT_READ))
        edges = sorted({self.vmin, self.vmax, *(a for a, _, _ in cuts),
                        *(b for _, b, _ in cuts)})
        out: list[tuple[int, int, ProtFlags]] = []
        for lo, hi in itertools.pairwise(edges):
            prot = ProtFlags.PROT_NONE
            for a, b, p in cuts:          # later cuts win: segments in order, RELRO last
                if a <= lo and hi <= b:
                    prot = p
            if out and out[-1][1] == lo and out[-1][2] == prot:
                out[-1] = (out[-1][0], hi, prot)
            else:
                out.append((lo, hi, prot))
        return out

    def page_prots(self) -> list[ProtFlags]:
        """The predicted final protection of each page of the span, RELRO applied (one entry
        a page: for small spans; ``prot_ranges`` for any)."""
        prots: list[ProtFlags] = []
        for lo, hi, prot in self.prot_ranges():
            prots += [prot] * ((hi - lo) // self.page_size)
        return prots

    def __str__(self) -> str:
        where = f"at {self.vmin:#x} (fixed)" if self.fixed else "anywhere"
        lines = [f"LoadPlan: reserve {self.span_length:#x} bytes {where}, "
                 f"page {self.page_size:#x}, align {self.align:#x}"]
        lines += [str(seg) for seg in self.segments]
        lines += [f"  hole {a:#x}-{b:#x} ---" for a, b in self.holes()]
        if self.relro:
            lines.append(f"  RELRO {self.relro[0]:#x}-{self.relro[1]:#x} r-- (glibc rounding)")
        if self.textrel:
            lines.append("  TEXTREL: read-only segments made writable while relocating")
        return "\n".join(lines)


def _segment_plan(i: int, seg: Segment, page: int) -> SegmentPlan:
    """Where one PT_LOAD goes, as glibc places it: the file pages up to the page holding the
    last file byte, the tail of that page zeroed, anonymous pages for the rest of .bss."""
    start = page_round_down(seg.p_vaddr, page)
    file_end = seg.p_vaddr + seg.p_filesz
    map_end = page_round_up(file_end, page)
    offset = page_round_down(seg.p_offset, page)
    zero_end = min(map_end, seg.end) if seg.p_memsz > seg.p_filesz else file_end
    anon_end = max(page_round_up(seg.end, page), map_end)
    return SegmentPlan(i, start, map_end, offset, seg.p_offset - offset + seg.p_filesz,
                       prot_of(seg.p_flags), file_end, zero_end, map_end, anon_end)


def _relro(image: ElfImage) -> tuple[int, int] | None:
    """PT_GNU_RELRO rounded as glibc rounds it: both ends down to a page (``elf_loader``
    rounds the end up, which would seal the page holding the first writable data)."""
    seg = image.relro
    if seg is None:
        return None
    start = page_round_down(seg.p_vaddr, image.page_size)
    end = page_round_down(seg.end, image.page_size)
    return (start, end) if end > start else None


def make_plan(image: ElfImage, textrel: bool) -> LoadPlan:
    """The plan for ``image``; pure: no memory, no backend. ``textrel``: DT_TEXTREL seen."""
    page = image.page_size
    segments = tuple(_segment_plan(i, seg, page) for i, seg in enumerate(image.loads))
    vmin = page_round_down(image.loads[0].p_vaddr, page)
    vmax = page_round_up(image.loads[-1].end, page)
    align = max([page] + [s.p_align for s in image.loads])
    return LoadPlan(page, image.e_type == ET.EXEC, vmin, vmax, align, segments,
                    _relro(image), textrel)
