"""Hypothesis strategies for valid ELF files (their corruptions are in ``vmsim.fuzz.malformed``).

Part of the fuzz kit (``vmsim.fuzz``); public as ``loader.strategies``. It imports only
``vmsim.fuzz.elfwriter`` (which writes the images), ``loader.pages`` and hypothesis. Public API
in the style of ``hypothesis.extra.numpy``: noun names, core arguments positional, knobs
keyword-only, every argument a value or a strategy, and argument errors (``InvalidArgument``)
that say what was given and what is allowed.

What they generate:

* :func:`elf_specs` draws an :class:`~vmsim.fuzz.elfwriter.ElfSpec` (segments, symbols, relocations,
  RELRO, .bss, hash tables...); :func:`elf_images` builds it into an
  :class:`~vmsim.fuzz.elfwriter.ElfImage`. An image is not bare bytes, so that a property can check
  what a loader did against what the writer predicts: ``image.data`` is the file,
  ``image.spec`` the description, ``image.symbol_vaddr(name)`` and ``image.expected_words()``
  the predictions, ``image.phdrs``/``image.tables`` the layout.
* :func:`~vmsim.fuzz.malformed.malformed_elf` (in ``vmsim.fuzz.malformed``) corrupts them.

>>> from hypothesis import given
>>> @given(elf_images(segments=2, relro=True))
... def test_loads(image):
...     assert image.data[:4] == b"\\x7fELF"
>>> test_loads()
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection, Sequence
from typing import Any, cast

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from loader.pages import HOST_PAGE_SIZE
from vmsim.fuzz import elfwriter as ew
from vmsim.fuzz.elfwriter import ElfImage, ElfSpec, Reloc, Segment, Symbol
from vmsim.fuzz.knobs import (
    ValueOrStrategy,
    check_choice,
    check_range,
    check_subset,
    check_type,
)

__all__ = [
    "RELOCATION_TYPES",
    "elf_images",
    "elf_specs",
]

_BOOLEANS = st.booleans()
_SEGMENT_COUNTS = st.integers(1, 4)
_HASH_STYLES = st.sampled_from(["both", "gnu", "sysv"])
_LINK_BASES = st.sampled_from([0, 0x200000])

RELOCATION_TYPES: tuple[str, ...] = ("RELATIVE", "64", "GLOB_DAT", "JUMP_SLOT", "COPY")
"""Every relocation kind :func:`elf_specs` can emit (psABI names without ``R_X86_64_``)."""

_WORD = 8
_PAGE = HOST_PAGE_SIZE


def _check_align(value: Any) -> None:
    """InvalidArgument unless ``value`` is a strategy or a power of two >= the page size."""
    check_type(value, "max_page_size", (int,), "a power of two")
    if isinstance(value, int) and (value < HOST_PAGE_SIZE or value & (value - 1)):
        raise InvalidArgument(f"max_page_size={value!r}: expected a power of two >= "
                              f"{HOST_PAGE_SIZE:#x} (this machine's page size)")


# --------------------------------------------------------------------------------------------
# Valid images.


def elf_specs(
    *,
    segments: ValueOrStrategy[int] = _SEGMENT_COUNTS,
    max_page_size: ValueOrStrategy[int] = HOST_PAGE_SIZE,
    relocation_types: ValueOrStrategy[Collection[str]] = RELOCATION_TYPES,
    max_relocations: ValueOrStrategy[int] = 12,
    max_symbols: ValueOrStrategy[int] = 6,
    relro: ValueOrStrategy[bool] = _BOOLEANS,
    textrel: ValueOrStrategy[bool] = False,
    bss: ValueOrStrategy[bool] = _BOOLEANS,
    relr: ValueOrStrategy[bool] = _BOOLEANS,
    rel_format: ValueOrStrategy[str] = "rela",
    hash: ValueOrStrategy[str] = _HASH_STYLES,
    kind: ValueOrStrategy[str] = "dyn",
    sections: ValueOrStrategy[bool] = _BOOLEANS,
    max_segment_pages: ValueOrStrategy[int] = 3,
    link_base: ValueOrStrategy[int] = _LINK_BASES,
    imports: ValueOrStrategy[int] = 0,
    init_arrays: ValueOrStrategy[bool] = False,
) -> st.SearchStrategy[ElfSpec]:
    """Descriptions of valid ELF64 x86-64 objects, for :func:`vmsim.fuzz.elfwriter.build`.

    ``segments``: how many PT_LOADs of the user's (the writer adds a read-only headers segment
    in front and a read-write ``.dynamic`` one behind), 0 to 8 (default: 1 to 4, drawn as a
    list, so shrinking removes any of them). ``max_page_size``: every
    PT_LOAD's p_align, a power of two >= the page size. ``relocation_types``: which kinds to
    emit, from :data:`RELOCATION_TYPES` (against the object's own symbols, so the result is
    predictable). ``relro``: give one writable segment a PT_GNU_RELRO prefix (of any length,
    not always whole pages). ``textrel``: also relocate read-only segments (DT_TEXTREL).
    ``bss``: writable segments may have memsz > filesz. ``relr``: RELATIVE relocations as
    DT_RELR. ``rel_format``: "rela" or "rel". ``hash``: "gnu", "sysv" or "both". ``kind``:
    "dyn" (shared object) or "exec" (ET_EXEC at 0x400000). ``sections``: write section headers.
    ``max_segment_pages``: the largest segment's file size in pages. ``max_relocations``,
    ``max_symbols``: upper bounds of those lists. ``link_base``: the
    lowest vaddr of a shared object (0 as ``ld`` links them; a prelinked one has another; a
    loader that confuses the mapped base with the load bias shows only then), page-aligned.
    ``imports``: at most this many undefined symbols (0 to 16: libc's, some versioned), which
    symbolic relocations may name, and ``COPY`` relocations copy (their values depend on the
    resolver, so no word is predicted for them). ``init_arrays``: a DT_INIT_ARRAY and a
    DT_FINI_ARRAY of one entry each, pointing at a ``ret`` at the start of an executable
    segment (when there is one, and room in a writable one).

    >>> spec = elf_specs(segments=2, relro=True, bss=False).example()
    >>> len(spec.segments), any(s.relro for s in spec.segments)
    (2, True)
    """
    knobs = {
        "segments": segments, "max_page_size": max_page_size,
        "relocation_types": relocation_types, "max_relocations": max_relocations,
        "max_symbols": max_symbols, "relro": relro, "textrel": textrel, "bss": bss,
        "relr": relr, "rel_format": rel_format, "hash": hash, "kind": kind,
        "sections": sections, "max_segment_pages": max_segment_pages,
        "link_base": link_base, "imports": imports, "init_arrays": init_arrays,
    }
    _check_knobs(knobs)
    return _elf_specs(knobs)


def _check_knobs(k: dict[str, Any]) -> None:
    """InvalidArgument naming the first knob of :func:`elf_specs` that is out of range."""
    check_range(k["segments"], "segments", 0, 8)
    _check_align(k["max_page_size"])
    check_subset(k["relocation_types"], "relocation_types", RELOCATION_TYPES, non_empty=False)
    check_range(k["max_relocations"], "max_relocations", 0, 1000)
    check_range(k["max_symbols"], "max_symbols", 0, 1000)
    check_range(k["max_segment_pages"], "max_segment_pages", 1, 64)
    check_range(k["imports"], "imports", 0, len(_IMPORTS))
    check_type(k["init_arrays"], "init_arrays", (bool,), "a bool")
    _check_link_base(k["link_base"])
    for name in ("relro", "textrel", "bss", "relr", "sections"):
        check_type(k[name], name, (bool,), "a bool")
    check_choice(k["rel_format"], "rel_format", ("rela", "rel"))
    check_choice(k["hash"], "hash", ("gnu", "sysv", "both"))
    check_choice(k["kind"], "kind", ("dyn", "exec"))


def elf_images(**knobs: Any) -> st.SearchStrategy[ElfImage]:
    """Valid ELF images: :func:`elf_specs` (same keyword-only knobs) built by the writer.

    Each is an :class:`~vmsim.fuzz.elfwriter.ElfImage`: ``.data`` is the file's bytes, ``.spec``
    the description, ``.symbol_vaddr(name)`` and ``.expected_words()`` what a correct loader
    produces (link-time vaddrs; relocated words as ``load_bias + delta``).

    >>> image = elf_images(segments=1, relocation_types=["RELATIVE"]).example()
    >>> image.data[:4], len(image.load_segments)
    (b'\\x7fELF', 3)
    """
    return elf_specs(**knobs).map(ew.build)


@st.composite
def _elf_specs(draw: st.DrawFn, knobs: dict[str, Any]) -> ElfSpec:
    """Draw the knobs given as (non-default) strategies, then one blob of bytes that decodes
    to the default knobs, the segments, symbols and relocations (see :class:`_Blob`)."""
    k = dict(knobs)
    drawn = [name for name, v in knobs.items() if isinstance(v, st.SearchStrategy)
             and name not in _BLOB_KNOBS.get(id(v), ())]
    for name in drawn:
        k[name] = draw(knobs[name])
    if drawn:  # values from a user's strategy: InvalidArgument, as for values given
        _check_knobs(k)
    counted = knobs["segments"] is _SEGMENT_COUNTS
    nsegs = 4 if counted else k["segments"]
    blob = _Blob(draw(_blobs(_blob_size(nsegs, k["max_symbols"], k["max_relocations"],
                                        k["imports"]))))
    blob.knobs(k)
    lo, hi = (1, 4) if counted else (nsegs, nsegs)
    segs = _segments(blob, lo, hi, nsegs, k["max_segment_pages"], k["bss"])
    writable = [i for i, s in enumerate(segs) if "w" in s.flags]
    if k["relro"] and segs:
        if not writable:
            segs[0] = Segment("rw", segs[0].data, segs[0].bss, gap=segs[0].gap)
            writable = [0]
        at = writable[blob.relro_at % len(writable)]
        seg = segs[at]
        if not seg.memsz:
            seg = Segment(seg.flags, bytes(_WORD), gap=seg.gap)
        length = 1 + blob.relro_length % seg.memsz
        segs[at] = Segment(seg.flags, seg.data, seg.bss, relro=length, gap=seg.gap)
    if k["init_arrays"]:
        segs = _with_ret(segs)
    symbols = _symbols(blob, segs, k["max_symbols"]) + _imports(blob, k["imports"])
    relocs = _relocs(blob, segs, symbols, sorted(k["relocation_types"]), k)
    arrays = _init_arrays(segs, relocs, k) if k["init_arrays"] else ((), ())
    relocs += [Reloc("RELATIVE", *slot, target=_ret_target(segs))
               for array in arrays for slot in array]
    return ElfSpec(
        segments=tuple(segs), symbols=tuple(symbols), relocs=tuple(relocs), kind=k["kind"],
        base=0x400000 if k["kind"] == "exec" else k["link_base"], align=k["max_page_size"],
        rel_format=k["rel_format"], relr=k["relr"], hash=k["hash"],
        textrel=k["textrel"] and any(r.segment not in writable for r in relocs),
        sections=k["sections"], init_array=arrays[0], fini_array=arrays[1],
    )


# One blob of bytes describes a whole spec: hypothesis' cost is per choice, and a fixed-size
# bytes choice costs about what one integer does, so this is many times cheaper than drawing
# each field. Shrinking stays good: hypothesis shrinks each byte towards 0, and every field
# decodes so that 0 is the simplest value (no .bss, a read-only segment without a gap, no
# RELRO, a record that is absent, a count of 0). Layout: a header, then fixed-size records.
_HEAD = 12
"""Header bytes: knob bits, hash style, segment count, symbol and relocation counts (each the
smaller of two bytes, so small counts are common), RELRO place (1) and length (3), spare."""
_SEG_RECORD, _SYM_RECORD, _REL_RECORD = 5, 4, 9
_BLOB_KNOBS: dict[int, tuple[str, ...]] = {
    id(_BOOLEANS): ("relro", "textrel", "bss", "relr", "sections", "init_arrays"),
    id(_HASH_STYLES): ("hash",),
    id(_LINK_BASES): ("link_base",),
    id(_SEGMENT_COUNTS): ("segments",),
}
"""Default knob strategies (by identity) that the blob's header decodes instead of a draw, and
the knobs they may stand for."""
_KNOB_BITS = {"relro": 0, "textrel": 1, "bss": 2, "relr": 3, "sections": 4, "link_base": 5,
              "init_arrays": 6}
_HASH_ORDER = ("both", "gnu", "sysv")
_LINK_ORDER = (0, 0x200000)


@functools.lru_cache(maxsize=64)
def _blobs(size: int) -> st.SearchStrategy[bytes]:
    """Blobs of exactly ``size`` bytes (one hypothesis choice), cached by size."""
    return st.binary(min_size=size, max_size=size)


def _blob_size(segments: int, max_symbols: int, max_relocations: int, imports: int = 0
               ) -> int:
    """The bytes a spec with these maxima needs."""
    return (_HEAD + _SEG_RECORD * segments + _SYM_RECORD * max_symbols
            + _REL_RECORD * max_relocations + imports)


class _Blob:
    """Reads a drawn blob: the header, then records in order (segments, symbols,
    relocations), each field a big-endian unsigned number (its high bytes shrink first)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = _HEAD
        self.relro_at = data[6]
        self.relro_length = int.from_bytes(data[7:10], "big")

    def knobs(self, k: dict[str, Any]) -> None:
        """Give the knobs left as default strategies their value from the header."""
        bits, data = self.data[0], self.data
        for name, value in list(k.items()):
            if not isinstance(value, st.SearchStrategy):
                continue
            if name in _KNOB_BITS and name != "link_base":
                k[name] = bool(bits >> _KNOB_BITS[name] & 1)
            elif name == "link_base":
                k[name] = _LINK_ORDER[bits >> _KNOB_BITS[name] & 1]
            elif name == "hash":
                k[name] = _HASH_ORDER[data[1] % len(_HASH_ORDER)]
            elif name == "segments":
                k[name] = 1 + data[2] % 4

    def count(self, index: int, other: int, most: int) -> int:
        """A count in ``[0, most]``: the smaller of header bytes ``index`` and ``other``."""
        return min(self.data[index] % (most + 1), self.data[other] % (most + 1))

    def record(self, sizes: tuple[int, ...]) -> list[int]:
        """The next record: one number per field, of ``sizes`` bytes each."""
        out = []
        for size in sizes:
            out.append(int.from_bytes(self.data[self.at:self.at + size], "big"))
            self.at += size
        return out

    def skip_to(self, at: int) -> None:
        """Continue reading at byte ``at`` (the next table of records)."""
        self.at = at


_FLAGS: tuple[ew.Flags, ...] = ("r", "rw", "rx")
_SYMBOL_STYLES = [(version, bind) for version in (None, "VMSIM_1", "VMSIM_2")
                  for bind in ("global", "weak")]


def _segments(blob: _Blob, lo: int, hi: int, room: int, max_pages: int,
              bss: bool) -> list[Segment]:
    """``lo`` to ``hi`` user segments (``room`` records in the blob; the count from the
    header). Each: flags and a gap of address space before it (one field: they shrink
    together to a read-only segment with no gap), a pseudo-random payload seeded by its size,
    and for a writable one maybe .bss."""
    count = lo + blob.data[2] % (hi - lo + 1)
    max_words = max_pages * _PAGE // _WORD
    out = []
    for _ in range(count):
        style, words, extra = blob.record((1, 2, 2))
        style %= 3 * len(_FLAGS)
        flags, gap = _FLAGS[style % len(_FLAGS)], style // len(_FLAGS)
        size = _skewed(words, 2, max_words) * _WORD
        out.append(Segment(flags, _payload(size), _skewed(extra, 3, 3 * _PAGE)
                           if bss and "w" in flags else 0, gap=gap))
    blob.skip_to(_HEAD + _SEG_RECORD * room)
    return out


def _skewed(raw: int, power: int, most: int) -> int:
    """A 16-bit ``raw`` mapped onto ``[0, most]``, monotonically, with small values more
    likely (the fraction raised to ``power``): sizes near the maximum are rare."""
    return int(most * raw**power // 0xFFFF**power)


@functools.lru_cache(maxsize=512)
def _payload(size: int) -> bytes:
    """A pseudo-random payload of ``size`` bytes, the same for the same size (cached)."""
    return random.Random(size).randbytes(size)


def _pick_word(raw: int, segs: Sequence[Segment], where: Sequence[int],
               in_file: bool = False) -> tuple[int, int] | None:
    """The word-aligned (segment, offset) number ``raw`` (modulo the count) among segments
    ``where`` (within the file bytes with ``in_file``, else within memsz); None if no room."""
    sizes = [(len(segs[i].data) if in_file else segs[i].memsz) // _WORD for i in where]
    total = sum(sizes)
    if not total:
        return None
    n = raw % total
    for i, words in zip(where, sizes, strict=True):
        if n < words:
            return i, n * _WORD
        n -= words
    raise AssertionError("unreachable")


def _symbols(blob: _Blob, segs: Sequence[Segment], max_symbols: int) -> list[Symbol]:
    """Defined symbols at word-aligned places of the segments, some versioned, some weak.
    A record whose style byte is 0 is absent (so shrinking can drop any one)."""
    start = blob.at
    everywhere = range(len(segs))
    out: list[Symbol] = []
    if any(s.memsz >= _WORD for s in segs):
        for _ in range(blob.count(3, 5, max_symbols)):
            style, raw = blob.record((1, 3))
            if not style:
                continue
            place = _pick_word(raw, segs, everywhere)
            assert place is not None
            version, bind = _SYMBOL_STYLES[(style - 1) % len(_SYMBOL_STYLES)]
            kind = "func" if "x" in segs[place[0]].flags else "object"
            out.append(Symbol(f"vmsim_sym{len(out)}", segment=place[0], offset=place[1],
                              type=cast(Any, kind), bind=cast(Any, bind), version=version))
    blob.skip_to(start + _SYM_RECORD * max_symbols)
    return out


def _relocs(blob: _Blob, segs: Sequence[Segment], symbols: Sequence[Symbol],
            types: Sequence[str], k: dict[str, Any]) -> list[Reloc]:
    """Relocations at distinct word-aligned sites of writable segments (any segment with
    ``textrel``), each of a kind from ``types``; symbolic ones need a symbol to name. Sites
    whose addend lives in the file (REL, RELR) are kept inside the file bytes. A record whose
    kind byte is 0 is absent."""
    copyable = [s for s in symbols if s.segment is None and s.type == "object"]
    kinds = [t for t in types if t == "RELATIVE" or (symbols and t != "COPY")
             or (t == "COPY" and copyable)]
    sites = [i for i, s in enumerate(segs) if k["textrel"] or "w" in s.flags]
    writable = [i for i, s in enumerate(segs) if "w" in s.flags]
    if not kinds or not sites:
        return []
    used: set[tuple[int, int]] = set()
    out = []
    for _ in range(blob.count(4, 10, k["max_relocations"])):
        kind_at, site_raw, target_raw, sym_raw, addend = blob.record((1, 3, 3, 1, 1))
        if not kind_at:
            continue
        rtype = kinds[(kind_at - 1) % len(kinds)]
        in_file = k["rel_format"] == "rel" or (k["relr"] and rtype == "RELATIVE")
        site = _pick_word(site_raw, segs, writable if rtype == "COPY" else sites, in_file)
        if site is None or site in used:
            continue
        used.add(site)
        if rtype == "RELATIVE":
            target = _pick_word(target_raw, segs, range(len(segs)))
            assert target is not None
            out.append(Reloc("RELATIVE", *site, target=target))
        elif rtype == "COPY":
            sym = copyable[sym_raw % len(copyable)].name
            out.append(Reloc("COPY", *site, symbol=sym))
        else:
            sym = symbols[sym_raw % len(symbols)].name
            addend %= 129
            out.append(Reloc(cast(Any, rtype), *site, symbol=sym,
                             addend=addend - 64 if rtype == "64" else 0))
    return out


_IMPORTS: tuple[tuple[str, str], ...] = (
    ("environ", "object"), ("stdout", "object"), ("stderr", "object"), ("getpid", "func"),
    ("malloc", "func"), ("free", "func"), ("strlen", "func"), ("memcpy", "func"),
    ("optind", "object"), ("opterr", "object"), ("getenv", "func"), ("abort", "func"),
    ("stdin", "object"), ("close", "func"), ("read", "func"), ("write", "func"),
)
"""Symbols an image may import: libc's, so that glibc (and the host backend) resolve them;
objects are 8 bytes or an int (optind, opterr: 4)."""
_LIBC_BASE = "libc.so.6:GLIBC_2.2.5"


def _imports(blob: _Blob, most: int) -> list[Symbol]:
    """Up to ``most`` imports (the count from the header; their bytes end the blob), one byte
    each: 0 is absent, else the name and whether it is versioned; each name once."""
    out: list[Symbol] = []
    seen: set[str] = set()
    count = blob.data[11] % (most + 1)
    for raw in blob.data[len(blob.data) - most:len(blob.data) - most + count]:
        if not raw:
            continue
        name, kind = _IMPORTS[(raw - 1) % len(_IMPORTS)]
        if name in seen:
            continue
        seen.add(name)
        size = 4 if name in ("optind", "opterr") else 8
        version = _LIBC_BASE if (raw - 1) // len(_IMPORTS) % 2 else None
        out.append(Symbol(name, size=size if kind == "object" else 0, type=cast(Any, kind),
                          version=version))
    return out


_RET = b"\xc3"


def _with_ret(segs: list[Segment]) -> list[Segment]:
    """The segments, the first executable one with data starting with a ``ret`` (what the
    init and fini arrays point at: a loader that runs them returns at once)."""
    out = list(segs)
    for i, seg in enumerate(out):
        if "x" in seg.flags and seg.data:
            out[i] = Segment(seg.flags, _RET + seg.data[1:], seg.bss, seg.relro, seg.gap)
            break
    return out


def _ret_target(segs: Sequence[Segment]) -> tuple[int, int]:
    """(segment, 0) of the first executable segment with data."""
    return next((i, 0) for i, s in enumerate(segs) if "x" in s.flags and s.data)


def _init_arrays(segs: Sequence[Segment], relocs: Sequence[Reloc], k: dict[str, Any]
                 ) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """(init_array, fini_array) slots: the first two free words of the writable segments'
    file bytes (REL and RELR keep the addend there), one entry each; none without code to
    point at or without room."""
    if not any("x" in s.flags and s.data for s in segs):
        return (), ()
    used = {(r.segment, r.offset) for r in relocs}
    free = [(i, off) for i, s in enumerate(segs) if "w" in s.flags
            for off in range(0, len(s.data) - _WORD + 1, _WORD) if (i, off) not in used]
    if len(free) < 2:
        return (), ()
    return (free[0],), (free[1],)


def _check_link_base(value: Any) -> None:
    """InvalidArgument unless ``value`` is a strategy or a page-aligned int in [0, 2**40]."""
    check_range(value, "link_base", 0, 2**40)
    if isinstance(value, int) and value % _PAGE:
        raise InvalidArgument(f"link_base={value:#x}: expected a multiple of the page size "
                              f"{_PAGE:#x}")


def _register_type_strategies() -> None:
    """Hypothesis entry point: ``st.from_type(ElfSpec)``/``(ElfImage)`` draw from these
    strategies."""
    st.register_type_strategy(ElfSpec, elf_specs())
    st.register_type_strategy(ElfImage, elf_images())


_register_type_strategies()
