"""The properties a correct loader satisfies, each a plain function that raises
:class:`~vmsim.fuzz.checking.Violation` (an AssertionError) or lets the loader's own exception
through, so hypothesis can shrink a failure to a small example.

Part of the fuzz kit (``vmsim.fuzz``). Each property takes ``loader=``: a loader under test
(any ``f(data, mm) -> load bias``, see ``vmsim.fuzz.contract``), or None for the project's
loader, which gets the extra checks its result object allows (symbols, the plan, ``unload``).

1. :func:`check_valid_load`: a valid image loads; relocated words and every byte of every
   segment are as the ELF writer predicts, the final map is what the program headers
   predict, and nothing is left mapped once the space is dropped. With
   :func:`check_same_on_both` the host (in a forked child) and another backend give equal
   outcomes.
2. :func:`check_malformed_load`: a corrupted image either loads or is refused (the project's
   loader: with ``ElfError`` only), and leaves no mapping behind.
3. :class:`~vmsim.fuzz.checking.CheckingMmap` (used by both): the loader never maps, unmaps or
   protects outside what it reserved itself.
4. ... and never writes to a page it has not made writable (the simulator would fault; the
   wrapper says so on any backend, before the host would crash).
5. :func:`check_headers_predict_map` (any loader) and :func:`check_plan_predicts_map` (the
   project's: its plan too) predict the final map page by page, with glibc's RELRO rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy.typing as npt

import loader
from loader.mmap import Mmap
from loader.pages import page_round_down, page_round_up
from vmsim.fuzz.checking import CheckingMmap, Violation
from vmsim.fuzz.contract import LoaderUnderTest, attempt_load, drop
from vmsim.fuzz.elfwriter import PT_GNU_RELRO, PT_LOAD, ElfImage

__all__ = [
    "check_bias",
    "check_headers_predict_map",
    "check_malformed_load",
    "check_plan_predicts_map",
    "check_same_on_both",
    "check_segment_bytes",
    "check_valid_load",
    "expected_page_perms",
    "failure_class",
    "image_span",
]


Headers = ElfImage | npt.NDArray[Any]
"""What the checks below read the program headers from: an ElfImage, or a program-header table
with ``loader.elfdefs.PHDR_DTYPE``'s fields (a real file's, as ``vmsim.fuzz.realfiles`` reads)."""


def _phdrs(image: Headers) -> npt.NDArray[Any]:
    """The program-header table of ``image``."""
    return image.phdrs if isinstance(image, ElfImage) else image


def expected_page_perms(image: Headers, page_size: int) -> list[str]:
    """The final perms of every page of the image's span, from its program headers alone:
    each PT_LOAD's pages with its flags, holes ``---p``, RELRO ``r--p`` with both ends rounded
    down as glibc does. Independent of the loader's own plan."""
    phdrs = _phdrs(image)
    loads = phdrs[phdrs["p_type"] == PT_LOAD]
    vmin, vmax = image_span(image, 0, page_size)
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


def _final_perms(start: int, end: int, page: int, mm: Mmap) -> list[str]:
    """The perms of every page of ``[start, end)`` as ``mm`` reports them (``---p`` where
    nothing is mapped)."""
    perms = ["---p"] * ((end - start) // page)
    for r in mm.maps():
        lo, hi = max(r.start, start), min(r.end, end)
        for va in range(lo, hi, page):
            perms[(va - start) // page] = r.perms
    return perms


def _first_difference(seen: list[str], want: list[str], name: str, page: int) -> None:
    """Violation naming the first page where ``seen`` differs from ``want`` (``name``)."""
    if seen != want:
        bad = [i for i, (a, b) in enumerate(zip(seen, want, strict=False)) if a != b]
        first = bad[0] if bad else min(len(seen), len(want))
        raise Violation(f"final map differs from {name} at page +{first * page:#x}: "
                        f"{seen[first] if first < len(seen) else 'none'} != "
                        f"{want[first] if first < len(want) else 'none'} "
                        f"({len(bad)} pages differ; span {len(seen)} vs {len(want)} pages)")


def image_span(image: Headers, bias: int, page: int) -> tuple[int, int]:
    """Where the image lies in memory when loaded at ``bias``: its PT_LOADs' pages."""
    phdrs = _phdrs(image)
    loads = phdrs[phdrs["p_type"] == PT_LOAD]
    lo = page_round_down(int(loads["p_vaddr"].min()), page)
    hi = page_round_up(int((loads["p_vaddr"] + loads["p_memsz"]).max()), page)
    return bias + lo, bias + hi


def check_headers_predict_map(image: Headers, bias: int, mm: Mmap) -> None:
    """The final per-page perms of the image's span at ``bias`` (as ``mm`` reports them) equal
    what the program headers predict (:func:`expected_page_perms`). Needs nothing from the
    loader but its bias: the map check of any loader under test."""
    page = mm.page_size
    start, end = image_span(image, bias, page)
    _first_difference(_final_perms(start, end, page, mm), expected_page_perms(image, page),
                      "the program headers", page)


def check_plan_predicts_map(obj: loader.LoadedObject, image: ElfImage, mm: Mmap) -> None:
    """Property 5: the final per-page perms of the span (as ``mm`` reports them) equal what
    the plan predicts and what the program headers predict (:func:`expected_page_perms`)."""
    page = obj.plan.page_size
    seen = _final_perms(*obj.span, page, mm)
    _first_difference(seen, [p.rwx + "p" for p in obj.plan.page_prots()], "the plan", page)
    check_headers_predict_map(image, obj.load_bias, mm)


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


def _check_symbols(obj: loader.LoadedObject, image: ElfImage) -> None:
    """The project's loader only (a loader under test has no symbol lookup): every defined
    symbol at the load bias plus its vaddr."""
    bias = obj.load_bias
    for sym in image.spec.symbols:
        if sym.segment is not None and obj.symbol(sym.name) != bias + image.symbol_vaddr(sym.name):
            raise Violation(f"symbol {sym.name} at {obj.symbol(sym.name):#x}, expected "
                            f"{bias + image.symbol_vaddr(sym.name):#x}")


def check_bias(image: Headers, bias: int, cm: CheckingMmap) -> None:
    """Violation unless the image's span at ``bias`` lies inside what the loader obtained (a
    bias that points elsewhere would make every other check read memory it never mapped)."""
    start, end = image_span(image, bias, cm.page_size)
    if bias % cm.page_size or not cm.owned.covers(start, end):
        raise Violation(f"the load bias {bias:#x} puts the image at {start:#x}-{end:#x}, "
                        f"outside what the loader mapped ({cm.owned_text()})")


def check_segment_bytes(image: ElfImage, bias: int, mm: Mmap) -> None:
    """Every byte of every user segment at ``bias`` is as the writer predicts: file bytes,
    zeros for .bss, each relocated word; the words imports bind are the resolver's choice."""
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


def check_valid_load(image: ElfImage, mm: Mmap, *, loader: LoaderUnderTest | None = None,
                     source: Any = None, base: int | None = None) -> None:
    """Property 1 (one backend) with 3, 4 and 5: ``loader`` (default: the project's; see
    ``vmsim.fuzz.contract``) loads ``image`` on ``mm`` through a :class:`CheckingMmap`; check
    every segment's bytes and the final map against the program headers, then drop what it
    left and check nothing remains. For the project's loader also: it may load ``source``
    (e.g. the image's path) and at ``base``; its symbols and its plan are checked too."""
    if loader is not None and (source is not None or base is not None):
        raise TypeError("source= and base= are the project's loader's options; a loader under "
                        "test takes the file's bytes only")
    cm = CheckingMmap(mm)
    data = image.data if source is None else source
    attempt = attempt_load(loader, data, cm, **({} if base is None else {"base": base}))
    if attempt.bias is None:
        raise Violation(f"a valid image was refused: {attempt.refusal}: {attempt.reason}")
    check_bias(image, attempt.bias, cm)
    if attempt.obj is not None:
        _check_symbols(attempt.obj, image)
    check_segment_bytes(image, attempt.bias, mm)
    if attempt.obj is not None:
        check_plan_predicts_map(attempt.obj, image, mm)
    else:
        check_headers_predict_map(image, attempt.bias, mm)
    drop(attempt, cm)


def check_malformed_load(data: bytes, mm: Mmap, *, loader: LoaderUnderTest | None = None
                         ) -> str:
    """Property 2 (with 3 and 4): ``loader`` (default: the project's) either loads ``data``
    or refuses it; either way nothing it obtained is left mapped once the space is dropped.
    Returns ``"loaded"`` or the refusal's class name.

    The project's loader refuses with ``ElfError`` only, or ``MmapError`` (an absurd but
    well-formed size that this machine cannot reserve: ENOMEM, counted apart as
    ``"MmapError(ENOMEM)"``, as docs/DESIGN.md says); a loader under test with any Exception
    but those ``vmsim.fuzz.contract`` calls bugs. Anything else propagates.
    """
    cm = CheckingMmap(mm)
    attempt = attempt_load(loader, data, cm)
    drop(attempt, cm)
    return attempt.outcome


def _host_valid_load(image: ElfImage, load: LoaderUnderTest) -> str:
    """In a forked child: :func:`check_valid_load` of ``load`` on the host."""
    from loader.libc import LibcMmap

    check_valid_load(image, LibcMmap(), loader=load)
    return "loaded"


def check_same_on_both(image: ElfImage, make_other: Callable[[], Mmap], *,
                       loader: LoaderUnderTest | None = None) -> None:
    """Property 1 across backends: the host (forked children) and ``make_other()`` load the
    image with equal outcomes. The project's loader: both at the same address, their outcomes
    compared (regions, page bytes, RELRO, calls). A loader under test: on each backend its
    map and bytes equal the same prediction (:func:`check_valid_load`)."""
    from loader.compare import compare_backends, run_host

    if loader is not None:
        check_valid_load(image, make_other(), loader=loader)
        run_host(_host_valid_load, image, loader, source=image.data)
        return
    result = compare_backends(image.data, make_other())
    if result.differences:
        raise Violation("host and simulator differ: " + "; ".join(result.differences[:6]))


def failure_class(exc: BaseException) -> str:
    """The class a property failure is counted under: "leaked-mapping" (a mapping left
    behind), "violation" (another property), else the exception's type name."""
    if isinstance(exc, Violation):
        return "leaked-mapping" if "still mapped" in str(exc) else "violation"
    return type(exc).__name__
