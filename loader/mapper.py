"""Map: carry out a ``LoadPlan`` on any ``Mmap`` backend.

Part of the ``loader`` layer (imports ``loader.plan``, ``loader.mmap``, ``loader.pages``).
Reserve the span, map each PT_LOAD over it with MAP_PRIVATE|MAP_FIXED, honour ``need_copy``
(write the bytes, then mprotect), clear the partial page after the file bytes, map the rest of
.bss anonymously, leave holes PROT_NONE. On any failure the whole reservation is unmapped.
"""

from __future__ import annotations

from collections.abc import Callable

from loader.elf import ElfBytes, ElfImage
from loader.errors import ElfSegmentError
from loader.explain import (
    SILENT,
    Narrator,
    anon_sentence,
    copy_sentence,
    hole_sentence,
    map_sentence,
    reserve_sentence,
    zero_sentence,
)
from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.pages import page_round_down, page_round_up
from loader.plan import LoadPlan, SegmentPlan

__all__ = ["map_plan", "reserve"]

_FIXED = MapFlags.MAP_PRIVATE | MapFlags.MAP_FIXED


def reserve(plan: LoadPlan, mm: Mmap, base: int | None, use_file: bool, *,
            narrator: Narrator = SILENT) -> int:
    """Reserve the span and return its start. ``base`` asks for an exact address (an
    ET_EXEC must be at ``plan.vmin``); otherwise the base is aligned to ``plan.align``
    by over-reserving and trimming, as glibc does for p_align above the page size.

    Raises ElfSegmentError when the exact address is not free (the backend placed it
    elsewhere) and MmapError from the backend. ``narrator`` hears the step.
    """
    narrator.say("reserve", reserve_sentence, plan, base, use_file)
    if plan.fixed and base is not None and base != plan.vmin:
        raise ElfSegmentError("base", base, f"an ET_EXEC loads only at its own address "
                              f"{plan.vmin:#x}")
    want = plan.vmin if plan.fixed else base
    length = plan.span_length
    if want is None and plan.align > plan.page_size:
        extra = plan.align - plan.page_size
        got = mm.mmap_reserve(None, length + extra, use_file)
        start = page_round_up(got, plan.align)
        if start > got:
            mm.munmap(got, start - got)
        if got + extra > start:
            mm.munmap(start + length, got + extra - start)
        return start
    got = mm.mmap_reserve(want, length, use_file)
    if want is not None and got != want:
        mm.munmap(got, length)
        raise ElfSegmentError("load address", want,
                              f"a free range of {length:#x} bytes there (the backend "
                              f"offered {got:#x})")
    return got


def _zero_tail(seg: SegmentPlan, bias: int, mm: Mmap, writable_now: bool) -> None:
    """Clear ``[zero_start, zero_end)``: file bytes past p_filesz in its last file page.
    A read-only segment is made writable for it and restored (as glibc does)."""
    if seg.zero_end <= seg.zero_start:
        return
    page = page_round_down(seg.zero_start + bias, mm.page_size)
    if not writable_now:
        mm.mprotect(page, mm.page_size, seg.prot | ProtFlags.PROT_WRITE)
    mm.write(seg.zero_start + bias, bytes(seg.zero_end - seg.zero_start))
    if not writable_now:
        mm.mprotect(page, mm.page_size, seg.prot)


def _map_segment(seg: SegmentPlan, bias: int, mm: Mmap, fd: int | None, data: ElfBytes,
                 tell: _Tell) -> None:
    """Map one PT_LOAD: the file pages (or a copy), the zeroed tail, the anonymous rest."""
    writable = bool(seg.prot & ProtFlags.PROT_WRITE)
    if seg.map_end > seg.start:
        length = seg.map_end - seg.start
        tell("map")
        got = mm.mmap(seg.start + bias, length, seg.prot, _FIXED, seg.offset, fd)
        if got.need_copy:
            tell("copy")
            # Copy whole pages, as a file mapping would show them (bytes past the segment in
            # its last page included), then clear the tail, then seal.
            mm.write(seg.start + bias,
                     bytes(data.read(seg.offset, min(length, data.size - seg.offset))))
            if seg.zero_end > seg.zero_start:
                mm.write(seg.zero_start + bias, bytes(seg.zero_end - seg.zero_start))
            mm.mprotect(seg.start + bias, length, seg.prot)
        else:
            if seg.zero_end > seg.zero_start:
                tell("zero")
            _zero_tail(seg, bias, mm, writable)
    if seg.anon_end > seg.anon_start:
        tell("anon")
        mm.mmap_anonymous(seg.anon_start + bias, seg.anon_end - seg.anon_start, seg.prot,
                          _FIXED)


_Tell = Callable[[str], None]


def _sentence(what: str, plan: LoadPlan, seg: SegmentPlan, image: ElfImage) -> str:
    """The sentence of one step of a segment ("map", "copy", "zero", "anon")."""
    if what == "map":
        return map_sentence(plan, seg, image.loads[seg.index])
    if what == "copy":
        return copy_sentence(seg)
    return zero_sentence(plan, seg) if what == "zero" else anon_sentence(plan, seg)


def _teller(plan: LoadPlan, seg: SegmentPlan, image: ElfImage | None,
            narrator: Narrator) -> _Tell:
    """A function announcing the steps of one segment ("map", "copy", "zero", "anon"); the
    sentences name the program header, so without ``image`` nothing is said."""
    if image is None:
        return lambda what: None
    header: ElfImage = image

    def tell(what: str) -> None:
        narrator.say("map", _sentence, what, plan, seg, header)
    return tell


def map_plan(plan: LoadPlan, mm: Mmap, start: int, fd: int | None, data: ElfBytes, *,
             narrator: Narrator = SILENT, image: ElfImage | None = None) -> None:
    """Map every segment of ``plan`` into the reservation at ``start`` (= vmin + bias).

    ``fd`` None means no file: the backend answers need_copy and the bytes are copied from
    ``data`` (the file's bytes, ``ElfImage.data``; also when a backend answers need_copy for
    a file). Holes are set PROT_NONE when the reservation may not be (no file). Raises
    MmapError from the backend; the caller unmaps the reservation. ``narrator`` hears each
    step (``image``, the program headers, names the segments in its sentences).
    """
    bias = start - plan.vmin
    for seg in plan.segments:
        _map_segment(seg, bias, mm, fd, data, _teller(plan, seg, image, narrator))
    if fd is None:
        for lo, hi in plan.holes():
            narrator.say("map", hole_sentence, plan, lo, hi)
            mm.mprotect(lo + bias, hi - lo, ProtFlags.PROT_NONE)
