"""The properties a correct loader satisfies, each a plain function that raises
:class:`~vmsim.fuzz.checking.Violation` (an AssertionError) or lets the loader's own exception
through, so hypothesis can shrink a failure to a small example.

Part of the fuzz kit (``vmsim.fuzz``):

1. :func:`check_valid_load`: a valid image loads; symbols, relocated words and every byte of
   every segment are as the ELF writer predicts; nothing is left mapped after ``unload``.
   With :func:`check_same_on_both` the host (in a forked child) and another backend load
   it at the same address with equal outcomes.
2. :func:`check_malformed_load`: a corrupted image either loads or raises ``ElfError``, never
   anything else, and leaves no mapping behind.
3. :class:`~vmsim.fuzz.checking.CheckingMmap` (used by both): the loader never maps, unmaps or
   protects outside what it reserved itself.
4. ... and never writes to a page it has not made writable (the simulator would fault; the
   wrapper says so on any backend, before the host would crash).
5. :func:`check_plan_predicts_map`: the plan alone (and, independently, the program headers
   with glibc's RELRO rounding) predicts the final map, page by page.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import numpy.typing as npt

import loader
from loader.mmap import Mmap
from loader.pages import page_round_down, page_round_up
from vmsim.fuzz.checking import CheckingMmap, Violation
from vmsim.fuzz.elfwriter import PT_GNU_RELRO, PT_LOAD, ElfImage

__all__ = [
    "check_malformed_load",
    "check_plan_predicts_map",
    "check_same_on_both",
    "check_valid_load",
    "expected_page_perms",
    "failure_class",
]


def expected_page_perms(image: ElfImage | npt.NDArray[Any], page_size: int) -> list[str]:
    """The final perms of every page of the image's span, from its program headers alone
    (``image``: an ElfImage, or a program-header table with ``loader.elfdefs.PHDR_DTYPE``'s
    fields): each PT_LOAD's pages with its flags, holes ``---p``, RELRO ``r--p`` with both
    ends rounded down as glibc does. Independent of the loader's own plan."""
    phdrs = image.phdrs if isinstance(image, ElfImage) else image
    loads = phdrs[phdrs["p_type"] == PT_LOAD]
    vmin = page_round_down(int(loads["p_vaddr"].min()), page_size)
    vmax = page_round_up(int((loads["p_vaddr"] + loads["p_memsz"]).max()), page_size)
    perms = ["---p"] * ((vmax - vmin) // page_size)
    for ph in loads:
        if not int(ph["p_memsz"]):
            continue  # an empty PT_LOAD maps nothing (glibc skips it too)
        flags = int(ph["p_flags"])
        text = ("r" if flags & 4 else "-") + ("w" if flags & 2 else "-") + \
            ("x" if flags & 1 else "-") + "p"
        lo = page_round_down(int(ph["p_vaddr"]), page_size)
        hi = page_round_up(int(ph["p_vaddr"] + ph["p_memsz"]), page_size)
        for va in range(lo, hi, page_size):
            perms[(va - vmin) // page_size] = text
    relro = phdrs[phdrs["p_type"] == PT_GNU_RELRO]
    if len(relro):
        lo = page_round_down(int(relro["p_vaddr"][0]), page_size)
        hi = page_round_down(int(relro["p_vaddr"][0] + relro["p_memsz"][0]), page_size)
        for va in range(lo, hi, page_size):
            perms[(va - vmin) // page_size] = "r--p"
    return perms


def _final_perms(obj: loader.LoadedObject, mm: Mmap) -> list[str]:
    """The perms of every page of ``obj``'s span as ``mm`` reports them (``---p`` where
    nothing is mapped)."""
    page = obj.plan.page_size
    start, end = obj.span
    perms = ["---p"] * ((end - start) // page)
    for r in mm.maps():
        lo, hi = max(r.start, start), min(r.end, end)
        for va in range(lo, hi, page):
            perms[(va - start) // page] = r.perms
    return perms


def check_plan_predicts_map(obj: loader.LoadedObject, image: ElfImage, mm: Mmap) -> None:
    """Property 5: the final per-page perms of the span (as ``mm`` reports them) equal what
    the plan predicts and what the program headers predict (:func:`expected_page_perms`)."""
    page = obj.plan.page_size
    seen = _final_perms(obj, mm)
    planned = [p.rwx + "p" for p in obj.plan.page_prots()]
    expected = expected_page_perms(image, page)
    for name, want in (("the plan", planned), ("the program headers", expected)):
        if seen != want:
            bad = [i for i, (a, b) in enumerate(zip(seen, want, strict=False)) if a != b]
            first = bad[0] if bad else min(len(seen), len(want))
            raise Violation(f"final map differs from {name} at page +{first * page:#x}: "
                            f"{seen[first] if first < len(seen) else 'none'} != "
                            f"{want[first] if first < len(want) else 'none'} "
                            f"({len(bad)} pages differ; span {len(seen)} vs {len(want)} pages)")


def _expected_segment_bytes(image: ElfImage, index: int, bias: int) -> bytes:
    """User segment ``index`` as it must be in memory: file bytes, zeros for .bss, every
    predicted relocation word in place."""
    seg = image.spec.segments[index]
    out = bytearray(seg.data + bytes(seg.bss))
    vaddr = image.segment_vaddr(index)
    for va, delta in image.expected_words().items():
        if vaddr <= va < vaddr + seg.memsz:
            out[va - vaddr:va - vaddr + 8] = ((bias + delta) % 2**64).to_bytes(8, "little")
    return bytes(out)


def _resolver_bytes(image: ElfImage, index: int) -> list[tuple[int, int]]:
    """The byte ranges of user segment ``index`` that relocations against imports write
    (their values are the resolver's to choose): 8 bytes, or the symbol's size for COPY."""
    imports = {s.name: s.size for s in image.spec.symbols if s.segment is None}
    return [(r.offset, r.offset + (imports[r.symbol] if r.type == "COPY" else 8))
            for r in image.spec.relocs
            if r.segment == index and r.symbol is not None and r.symbol in imports]


def check_valid_load(image: ElfImage, mm: Mmap, *, source: Any = None,
                     base: int | None = None) -> None:
    """Property 1 (one backend) with 3, 4 and 5: load ``image`` (or ``source``, e.g. its path)
    on ``mm`` through a :class:`CheckingMmap`; check symbols, every segment's bytes, the final
    map; unload and check nothing is left."""
    cm = CheckingMmap(mm)
    obj = loader.load(image.data if source is None else source, cm, base=base)
    bias = obj.load_bias
    for sym in image.spec.symbols:
        if sym.segment is not None and obj.symbol(sym.name) != bias + image.symbol_vaddr(sym.name):
            raise Violation(f"symbol {sym.name} at {obj.symbol(sym.name):#x}, expected "
                            f"{bias + image.symbol_vaddr(sym.name):#x}")
    for i, seg in enumerate(image.spec.segments):
        if not seg.memsz:
            continue
        got = bytearray(mm.read(bias + image.segment_vaddr(i), seg.memsz))
        want = bytearray(_expected_segment_bytes(image, i, bias))
        for lo, hi in _resolver_bytes(image, i):  # what imports bind: the resolver's choice
            got[lo:hi] = want[lo:hi]
        if got != want:
            at = next(k for k in range(len(want)) if got[k] != want[k])
            raise Violation(f"segment {i} ({seg.flags}) byte +{at:#x} (vaddr "
                            f"{image.segment_vaddr(i) + at:#x}) is {got[at]:#04x}, expected "
                            f"{want[at]:#04x} ({'bss' if at >= len(seg.data) else 'file'})")
    check_plan_predicts_map(obj, image, mm)
    obj.unload()
    left = cm.leftovers()
    if left:
        raise Violation(f"after unload still mapped: {[str(r) for r in left]}")


def check_malformed_load(data: bytes, mm: Mmap) -> str:
    """Property 2 (with 3 and 4): loading ``data`` either works (then unloads cleanly) or
    raises ``ElfError``; anything else propagates. Afterwards nothing the loader obtained is
    still mapped. Returns ``"loaded"`` or the ElfError's class name.

    An ``MmapError`` from the backend (an absurd but well-formed size that this machine cannot
    reserve: ENOMEM) is let through as docs/DESIGN.md says, and returned as ``"MmapError(ENOMEM)"``
    so campaigns count it apart; it must leave nothing behind either.
    """
    cm = CheckingMmap(mm)
    try:
        obj = loader.load(data, cm)
    except loader.ElfError as exc:
        result = type(exc).__name__
    except loader.MmapError as exc:
        result = f"MmapError({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    else:
        obj.unload()
        result = "loaded"
    left = cm.leftovers()
    if left:
        raise Violation(f"{result}, but still mapped: {[str(r) for r in left]}")
    return result


def check_same_on_both(image: ElfImage, make_other: Callable[[], Mmap]) -> None:
    """Property 1 across backends: the host (forked children) and ``make_other()`` load the
    image at the same address with equal outcomes (regions, page bytes, RELRO, calls)."""
    from loader.compare import compare_backends

    result = compare_backends(image.data, make_other())
    if result.differences:
        raise Violation("host and simulator differ: " + "; ".join(result.differences[:6]))


def failure_class(exc: BaseException) -> str:
    """The class a property failure is counted under: "leaked-mapping" (a mapping left
    behind), "violation" (another property), else the exception's type name."""
    if isinstance(exc, Violation):
        return "leaked-mapping" if "still mapped" in str(exc) else "violation"
    return type(exc).__name__
