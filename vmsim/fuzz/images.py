"""Hypothesis strategies for ELF files: valid by construction, and field-aware corruptions.

Place in the layers: on top of the loader, beside ``vmsim.strategies``; it imports only
``loader.elfwriter`` (which writes the images), ``loader.pages`` and hypothesis. Public API in the
style of ``hypothesis.extra.numpy``: noun names, core arguments positional, knobs keyword-only,
every argument a value or a strategy, and argument errors (``InvalidArgument``) that say what was
given and what is allowed.

What they generate:

* :func:`elf_specs` draws an :class:`~loader.elfwriter.ElfSpec` (segments, symbols, relocations,
  RELRO, .bss, hash tables...); :func:`elf_images` builds it into an
  :class:`~loader.elfwriter.ElfImage`. An image is not bare bytes, so that a property can check
  what a loader did against what the writer predicts: ``image.data`` is the file,
  ``image.spec`` the description, ``image.symbol_vaddr(name)`` and ``image.expected_words()``
  the predictions, ``image.phdrs``/``image.tables`` the layout.
* :func:`malformed_elf` draws a :class:`MalformedImage`: a valid image with one corruption
  that knows which field it hit (``.mutation`` says it in words), or a truncation, or raw byte
  flips. ``.data`` is the corrupted file.

>>> from hypothesis import given
>>> @given(elf_images(segments=2, relro=True))
... def test_loads(image):
...     assert image.data[:4] == b"\\x7fELF"
>>> test_loads()
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from loader import elfwriter as ew
from loader.elfwriter import ElfImage, ElfSpec, Reloc, Segment, Symbol
from loader.pages import HOST_PAGE_SIZE
from loader.strategy_args import (
    ValueOrStrategy,
    check_choice,
    check_range,
    check_subset,
    check_type,
)

__all__ = [
    "MUTATION_KINDS",
    "RELOCATION_TYPES",
    "MalformedImage",
    "elf_images",
    "elf_specs",
    "malformed_elf",
]

_BOOLEANS = st.booleans()
_SEGMENT_COUNTS = st.integers(1, 4)
_HASH_STYLES = st.sampled_from(["both", "gnu", "sysv"])
_LINK_BASES = st.sampled_from([0, 0x200000])

RELOCATION_TYPES: tuple[str, ...] = ("RELATIVE", "64", "GLOB_DAT", "JUMP_SLOT", "COPY")
"""Every relocation kind :func:`elf_specs` can emit (psABI names without ``R_X86_64_``)."""

MUTATION_KINDS: tuple[str, ...] = (
    "header", "phdr", "dynamic", "reloc", "symbol", "hash", "version", "truncate", "flip",
    "import", "verchain", "hash_chain", "init", "relr", "copy",
)
"""What :func:`malformed_elf` can corrupt: ELF header fields, program header fields, dynamic
tags, relocation entries, symbols, hash tables, version tables; or cut the file short, or flip
raw bytes; and the fields of imported symbols, the links and counts of verdef/verneed chains,
the buckets and chains of both hash tables, the init/fini arrays, the RELR bitmaps and COPY
relocations."""

_WORD = 8
_PAGE = HOST_PAGE_SIZE


@functools.lru_cache(maxsize=4096)
def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """``st.integers(lo, hi)``, cached here: the composites below ask for the same bounds
    again and again, and hypothesis' own cache costs more than this one."""
    return st.integers(lo, hi)


def _strategy(value: Any, name: str) -> st.SearchStrategy[Any]:
    """``value`` if it is a strategy, else ``st.just(value)``."""
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


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
    """Descriptions of valid ELF64 x86-64 objects, for :func:`loader.elfwriter.build`.

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
    check_range(segments, "segments", 0, 8)
    _check_align(max_page_size)
    check_subset(relocation_types, "relocation_types", RELOCATION_TYPES, non_empty=False)
    check_range(max_relocations, "max_relocations", 0, 1000)
    check_range(max_symbols, "max_symbols", 0, 1000)
    check_range(max_segment_pages, "max_segment_pages", 1, 64)
    check_range(imports, "imports", 0, len(_IMPORTS))
    check_type(init_arrays, "init_arrays", (bool,), "a bool")
    _check_link_base(link_base)
    for name, value in (("relro", relro), ("textrel", textrel), ("bss", bss), ("relr", relr),
                        ("sections", sections)):
        check_type(value, name, (bool,), "a bool")
    check_choice(rel_format, "rel_format", ("rela", "rel"))
    check_choice(hash, "hash", ("gnu", "sysv", "both"))
    check_choice(kind, "kind", ("dyn", "exec"))
    knobs = {
        "segments": segments, "max_page_size": max_page_size,
        "relocation_types": relocation_types, "max_relocations": max_relocations,
        "max_symbols": max_symbols, "relro": relro, "textrel": textrel, "bss": bss,
        "relr": relr, "rel_format": rel_format, "hash": hash, "kind": kind,
        "sections": sections, "max_segment_pages": max_segment_pages,
        "link_base": link_base, "imports": imports, "init_arrays": init_arrays,
    }
    return _elf_specs(knobs)


def elf_images(**knobs: Any) -> st.SearchStrategy[ElfImage]:
    """Valid ELF images: :func:`elf_specs` (same keyword-only knobs) built by the writer.

    Each is an :class:`~loader.elfwriter.ElfImage`: ``.data`` is the file's bytes, ``.spec``
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
    k = {name: draw(v) if isinstance(v, st.SearchStrategy) and name not in _BLOB_KNOBS.get(
        id(v), ()) else v for name, v in knobs.items()}
    counted = knobs["segments"] is _SEGMENT_COUNTS
    nsegs = 4 if counted else k["segments"]
    if not counted:
        check_range(nsegs, "segments", 0, 8)
    blob = _Blob(draw(_blobs(_blob_size(nsegs, k["max_symbols"], k["max_relocations"],
                                        k["imports"]))))
    blob.knobs(k)
    _check_drawn(k)
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


def _check_drawn(k: dict[str, Any]) -> None:
    """Re-check knobs that came from a user's strategy (InvalidArgument, as for values)."""
    check_range(k["segments"], "segments", 0, 8)
    _check_align(k["max_page_size"])
    check_subset(k["relocation_types"], "relocation_types", RELOCATION_TYPES,
                 non_empty=False)
    check_range(k["imports"], "imports", 0, len(_IMPORTS))
    for name in ("relro", "textrel", "bss", "relr", "sections", "init_arrays"):
        check_type(k[name], name, (bool,), "a bool")
    check_choice(k["rel_format"], "rel_format", ("rela", "rel"))
    check_choice(k["hash"], "hash", ("gnu", "sysv", "both"))
    check_choice(k["kind"], "kind", ("dyn", "exec"))
    _check_link_base(k["link_base"])


def _check_link_base(value: Any) -> None:
    """InvalidArgument unless ``value`` is a strategy or a page-aligned int in [0, 2**40]."""
    check_range(value, "link_base", 0, 2**40)
    if isinstance(value, int) and value % _PAGE:
        raise InvalidArgument(f"link_base={value:#x}: expected a multiple of the page size "
                              f"{_PAGE:#x}")


# --------------------------------------------------------------------------------------------
# Malformed images.


@dataclass(frozen=True)
class MalformedImage:
    """A corrupted image: ``data`` (the file), the valid ``image`` it came from, and
    ``mutation``, one line saying which field became what (or how the file was cut/flipped).
    ``kind`` is one of :data:`MUTATION_KINDS`."""

    data: bytes
    image: ElfImage
    kind: str
    mutation: str

    def __repr__(self) -> str:
        return f"MalformedImage({self.kind}: {self.mutation}; {len(self.data)} bytes)"


def malformed_elf(
    images: ValueOrStrategy[ElfImage] | None = None,
    *,
    kinds: ValueOrStrategy[Collection[str]] = MUTATION_KINDS,
) -> st.SearchStrategy[MalformedImage]:
    """Valid images (``images``, default :func:`elf_images()`) with one corruption of a kind
    from ``kinds`` (a subset of :data:`MUTATION_KINDS`).

    Field-aware kinds write an out-of-range value into one named field: header fields (magic,
    class, machine, e_phoff past EOF, e_phentsize, e_phnum), program headers (p_offset past EOF,
    p_filesz > p_memsz, p_vaddr + p_memsz overflowing, p_offset not congruent to p_vaddr, two
    PT_LOADs overlapping or out of order, absurd sizes, PT_GNU_RELRO or PT_DYNAMIC outside
    every segment), dynamic tags (a table address outside the image, absurd sizes, wrong entry
    sizes, no DT_NULL), relocations (target outside the writable segments or outside the
    image, symbol index past the table, unknown type), symbols (name past the string table,
    value outside), hash tables (empty or huge bucket counts, chains past the table), version
    tables (index past the definitions, links outside). "truncate" cuts the file short; "flip"
    xors a few random bytes. "import": an imported symbol's st_size (absurd), st_value or
    st_info (local, TLS, IFUNC, unknown). "verchain": verneed/verdef chains (vn_next/vd_next
    and vna_next/vda_next pointing back into a loop or past the table, huge vn_cnt/vd_cnt,
    aux offsets outside, DT_VERNEEDNUM/DT_VERDEFNUM too large). "hash_chain": SysV chains
    looping or past nchain, buckets past the table, GNU chains without their end bit, buckets
    below symoffset. "init": DT_INIT_ARRAY/DT_FINI_ARRAY outside, their sizes absurd or not a
    multiple of 8. "relr": a bitmap before any address, all-ones bitmaps running past the
    segment, addresses not 8-aligned or in a read-only segment. "copy": a COPY relocation's
    symbol with an absurd or overrunning st_size, of a function, of a defined symbol, or of no
    symbol.

    The default ``images`` are :func:`elf_images` with imports (and so COPY relocations) and
    sometimes init/fini arrays, so that every kind has something to corrupt.

    >>> bad = malformed_elf(kinds=["phdr"]).example()
    >>> bad.kind, bad.mutation.startswith("phdr[")
    ('phdr', True)
    """
    if images is None:
        images = _MALFORMED_BASES
    if not isinstance(images, st.SearchStrategy | ElfImage):
        raise InvalidArgument(f"images={images!r}: expected an ElfImage or a strategy of them")
    check_subset(kinds, "kinds", MUTATION_KINDS)
    return _malformed(_strategy(images, "images"), _strategy(kinds, "kinds"))


@st.composite
def _malformed(draw: st.DrawFn, images: st.SearchStrategy[ElfImage],
               kinds: st.SearchStrategy[Collection[str]]) -> MalformedImage:
    """Draw an image and a kind, then let that kind's mutator corrupt a copy."""
    image = draw(images)
    allowed = draw(kinds)
    check_subset(allowed, "kinds", MUTATION_KINDS)
    usable = [k for k in sorted(allowed) if _MUTATORS[k][1](image)]
    if not usable:
        usable = ["truncate"]
    kind = draw(st.sampled_from(usable))
    data = bytearray(image.data)
    mutation = _MUTATORS[kind][0](draw, image, data)
    return MalformedImage(bytes(data), image, kind, mutation)


# A mutator corrupts ``data`` in place and says what it did.
Mutator = Callable[[st.DrawFn, ElfImage, bytearray], str]

_U64 = 2**64 - 1


def _put(data: bytearray, offset: int, size: int, value: int) -> None:
    """Store ``value`` (wrapped to ``size`` bytes, little-endian) at ``offset``."""
    data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _field(dtype: np.dtype[Any], name: str) -> tuple[int, int]:
    """(offset inside the record, size) of field ``name`` of ``dtype``."""
    fdtype, offset = dtype.fields[name][:2]  # type: ignore[index]
    return int(offset), int(fdtype.itemsize)


def _set(data: bytearray, base: int, dtype: np.dtype[Any], name: str, value: int) -> None:
    """Set field ``name`` of the ``dtype`` record at file offset ``base``."""
    offset, size = _field(dtype, name)
    _put(data, base + offset, size, value)


def _span(image: ElfImage) -> tuple[int, int]:
    """(lowest vaddr, highest vaddr + memsz) over the image's PT_LOADs."""
    loads = image.load_segments
    return int(loads["p_vaddr"].min()), int((loads["p_vaddr"] + loads["p_memsz"]).max())


def _far_values(draw: st.DrawFn, image: ElfImage) -> int:
    """A value far outside the image: past its span, past 2**47, or near 2**64."""
    _lo, hi = _span(image)
    return draw(st.sampled_from([hi + 0x10000, hi + len(image.data) * 4, 2**47, 2**63,
                                 _U64 - 7, _U64 & ~0xFFF]))


def _mutate_header(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt one ELF header field so that no loader may accept the file."""
    size = len(data)
    choices: list[tuple[str, int, int, int]] = [
        ("e_ident[EI_MAG1]", 1, 1, ord("X")),
        ("e_ident[EI_CLASS]", 4, 1, draw(st.sampled_from([0, 1, 3]))),
        ("e_ident[EI_DATA]", 5, 1, draw(st.sampled_from([0, 2, 3]))),
        ("e_ident[EI_VERSION]", 6, 1, draw(st.sampled_from([0, 2]))),
        ("e_type", 16, 2, draw(st.sampled_from([0, 1, 4, 0xFEFF]))),
        ("e_machine", 18, 2, draw(st.sampled_from([0, 3, 183, 0xFFFF]))),
        ("e_phoff", 32, 8, draw(st.sampled_from([size, size - 8, 2**40, _U64 - 3]))),
        ("e_phentsize", 54, 2, draw(st.sampled_from([0, 32, 55, 57, 64]))),
        ("e_phnum", 56, 2, draw(st.sampled_from([0, 0xFFFF, 1000]))),
    ]
    name, offset, width, value = draw(st.sampled_from(choices))
    _put(data, offset, width, value)
    return f"{name} = {value:#x}"


def _load_indices(image: ElfImage) -> list[int]:
    """Indices (in the program header table) of the PT_LOAD entries that map something (an
    empty PT_LOAD is ignored by loaders, so corrupting it proves nothing)."""
    return [i for i, (t, m) in enumerate(zip(image.phdrs["p_type"].tolist(),
                                            image.phdrs["p_memsz"].tolist(), strict=True))
            if t == ew.PT_LOAD and m]


def _mutate_phdr(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt one program header field (or the order of two) so that the file is invalid."""
    loads = _load_indices(image)
    i = draw(st.sampled_from(loads))
    ph = image.phdrs[i]
    at = image.phoff + i * ew.PHDR.itemsize
    vaddr, memsz, filesz = int(ph["p_vaddr"]), int(ph["p_memsz"]), int(ph["p_filesz"])
    size = len(data)
    how = draw(st.sampled_from([
        "offset_past_eof", "filesz_past_eof", "filesz_gt_memsz", "vaddr_overflow",
        "misaligned", "overlap", "unsorted", "absurd_memsz", "align_not_power_of_two",
        "relro_outside", "dynamic_outside", "shared_page",
    ]))
    if how == "shared_page" and len(loads) > 1:
        return _share_page(draw, image, data, loads, i)
    if how in ("overlap", "unsorted") and len(loads) > 1:
        j = draw(st.sampled_from([x for x in loads if x != i]))
        other = image.phdrs[j]
        if how == "overlap":
            # The same page offset as before (still congruent), bytes shared with phdr[j].
            lo, hi = int(other["p_vaddr"]), int(other["p_vaddr"] + other["p_memsz"])
            new = lo - lo % _PAGE + vaddr % _PAGE
            if new + memsz <= lo:
                new += _PAGE
            if new < hi:
                _set(data, at, ew.PHDR, "p_vaddr", new)
                return f"phdr[{i}].p_vaddr = {new:#x} (overlaps phdr[{j}])"
            how = "misaligned"
        a, b = sorted((i, j))
        pa, pb = image.phoff + a * ew.PHDR.itemsize, image.phoff + b * ew.PHDR.itemsize
        rec_a, rec_b = bytes(data[pa:pa + 56]), bytes(data[pb:pb + 56])
        data[pa:pa + 56], data[pb:pb + 56] = rec_b, rec_a
        return f"phdr[{a}] and phdr[{b}] swapped (PT_LOADs out of order)"
    if how == "relro_outside" or how == "dynamic_outside":
        ptype = ew.PT_GNU_RELRO if how == "relro_outside" else ew.PT_DYNAMIC
        found = [x for x, t in enumerate(image.phdrs["p_type"].tolist()) if t == ptype]
        if found:
            k = found[0]
            far = _far_values(draw, image) & ~0xF
            _set(data, image.phoff + k * ew.PHDR.itemsize, ew.PHDR, "p_vaddr", far)
            return f"phdr[{k}].p_vaddr = {far:#x} ({how.split('_')[0]} outside every segment)"
        how = "offset_past_eof"
    if how in ("offset_past_eof", "unsorted", "overlap") and not filesz:
        how = "filesz_past_eof"  # no file bytes: the offset is never used
    if how in ("offset_past_eof", "unsorted", "overlap"):
        value = draw(st.sampled_from([size + _PAGE, 2**40, _U64 & ~0xFFF]))
        value += vaddr % _PAGE
        _set(data, at, ew.PHDR, "p_offset", value)
        return f"phdr[{i}].p_offset = {value:#x} (past EOF at {size:#x})"
    if how == "filesz_past_eof":
        value = size + draw(_ints(1, 4 * _PAGE))
        _set(data, at, ew.PHDR, "p_filesz", value)
        _set(data, at, ew.PHDR, "p_memsz", max(value, memsz))
        return f"phdr[{i}].p_filesz = {value:#x} (past EOF at {size:#x})"
    if how == "filesz_gt_memsz":
        value = memsz + draw(_ints(1, _PAGE))
        _set(data, at, ew.PHDR, "p_filesz", value)
        return f"phdr[{i}].p_filesz = {value:#x} > p_memsz {memsz:#x}"
    if how == "vaddr_overflow":
        value = 2**64 - vaddr + draw(_ints(0, _PAGE))
        _set(data, at, ew.PHDR, "p_memsz", value)
        _set(data, at, ew.PHDR, "p_filesz", min(filesz, value))
        return f"phdr[{i}].p_memsz = {value:#x} (p_vaddr + p_memsz overflows)"
    if how == "misaligned":
        delta = draw(_ints(1, _PAGE - 1))
        _set(data, at, ew.PHDR, "p_vaddr", vaddr + delta)
        return f"phdr[{i}].p_vaddr = {vaddr + delta:#x} (not congruent to p_offset)"
    if how == "absurd_memsz":
        value = draw(st.sampled_from([2**47, 2**56, 2**63]))
        _set(data, at, ew.PHDR, "p_memsz", value)
        return f"phdr[{i}].p_memsz = {value:#x}"
    value = draw(st.sampled_from([3, 0x1001, 0x1800, 0xFFFF]))
    _set(data, at, ew.PHDR, "p_align", value)
    return f"phdr[{i}].p_align = {value:#x} (not a power of two)"


def _share_page(draw: st.DrawFn, image: ElfImage, data: bytearray, loads: list[int],
                i: int) -> str:
    """Move PT_LOAD ``i`` (keeping it congruent) into the last page of the PT_LOAD before it,
    if that has other flags, without sharing a byte: a loader maps the later segment over
    that page, so the earlier one's protection is lost there (glibc then crashes writing its
    relocations). Falls back to an overlapping p_vaddr when there is no such neighbour."""
    ph = image.phdrs[i]
    # The PT_LOAD just before it, so the table stays sorted by p_vaddr.
    before = loads[:loads.index(i)][-1:]
    others = [j for j in before if int(image.phdrs[j]["p_flags"]) != int(ph["p_flags"])]
    for j in others:
        end = int(image.phdrs[j]["p_vaddr"] + image.phdrs[j]["p_memsz"])
        new = end - end % _PAGE + int(ph["p_vaddr"]) % _PAGE
        if new >= end:
            _set(data, image.phoff + i * ew.PHDR.itemsize, ew.PHDR, "p_vaddr", new)
            return (f"phdr[{i}].p_vaddr = {new:#x} (shares page {end - end % _PAGE:#x} with "
                    f"phdr[{j}], other flags)")
    j = next(x for x in loads if x != i)  # overlap another PT_LOAD, never i itself
    start = int(image.phdrs[j]["p_vaddr"])
    value = start - start % _PAGE + int(ph["p_vaddr"]) % _PAGE
    _set(data, image.phoff + i * ew.PHDR.itemsize, ew.PHDR, "p_vaddr", value)
    return f"phdr[{i}].p_vaddr = {value:#x} (overlaps phdr[{j}])"


_DYN_POINTERS = {
    ew.DT_STRTAB: "DT_STRTAB", ew.DT_SYMTAB: "DT_SYMTAB", ew.DT_HASH: "DT_HASH",
    ew.DT_GNU_HASH: "DT_GNU_HASH", ew.DT_RELA: "DT_RELA", ew.DT_REL: "DT_REL",
    ew.DT_JMPREL: "DT_JMPREL", ew.DT_RELR: "DT_RELR", ew.DT_VERSYM: "DT_VERSYM",
    ew.DT_VERDEF: "DT_VERDEF", ew.DT_VERNEED: "DT_VERNEED",
}
_DYN_SIZES = {
    ew.DT_STRSZ: "DT_STRSZ", ew.DT_RELASZ: "DT_RELASZ", ew.DT_RELSZ: "DT_RELSZ",
    ew.DT_PLTRELSZ: "DT_PLTRELSZ", ew.DT_RELRSZ: "DT_RELRSZ",
    ew.DT_RELACOUNT: "DT_RELACOUNT", ew.DT_VERDEFNUM: "DT_VERDEFNUM",
    ew.DT_VERNEEDNUM: "DT_VERNEEDNUM",
}
_DYN_ENTSIZES = {
    ew.DT_SYMENT: "DT_SYMENT", ew.DT_RELAENT: "DT_RELAENT", ew.DT_RELENT: "DT_RELENT",
    ew.DT_RELRENT: "DT_RELRENT", ew.DT_PLTREL: "DT_PLTREL",
}


def _mutate_dynamic(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Point a table tag outside the image, make a size absurd or not a multiple of the entry
    size, give an entry size the wrong value, or remove the terminating DT_NULL."""
    dyn = image.tables["dynamic"]
    tags = image.dynamic_tags
    how = draw(st.sampled_from(["pointer", "size", "entsize", "no_null"]))
    if how == "no_null":
        # Overwrite DT_NULL (the last entry) with a harmless tag: the table runs off its end.
        at = dyn.offset + tags[ew.DT_NULL] * ew.DYN.itemsize
        _put(data, at, 8, ew.DT_DEBUG)
        _put(data, at + 8, 8, 0xDEAD)
        return f"dynamic[{tags[ew.DT_NULL]}] DT_NULL -> DT_DEBUG (no terminator)"
    table = {"pointer": _DYN_POINTERS, "size": _DYN_SIZES, "entsize": _DYN_ENTSIZES}[how]
    present = sorted(t for t in table if t in tags)
    if not present:
        present, table = sorted(t for t in _DYN_POINTERS if t in tags), _DYN_POINTERS
        how = "pointer"
    tag = draw(st.sampled_from(present))
    at = dyn.offset + tags[tag] * ew.DYN.itemsize + 8
    if how == "pointer":
        value = _far_values(draw, image)
    elif how == "size":
        value = draw(st.sampled_from([2**40, _U64, 2**31 + 1, 2**20 + 3]))
    else:
        value = draw(st.sampled_from([0, 1, 7, 16, 23, 25, 100, 2**32]))
    _put(data, at, 8, value)
    return f"dynamic[{tags[tag]}] {table[tag]} = {value:#x}"


def _reloc_tables(image: ElfImage) -> list[str]:
    """Names of the RELA/REL/JMPREL tables the image has (entries with r_offset, r_info)."""
    return [n for n in ("rela", "rel", "jmprel") if n in image.tables]


def _mutate_reloc(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt one relocation entry: its target (into a read-only segment, or outside the
    image), its symbol index (past the table), or its type (unknown)."""
    names = _reloc_tables(image)
    if not names:
        return _mutate_relr(draw, image, data)
    name = draw(st.sampled_from(names))
    info = image.tables[name]
    dtype = ew.RELA if image.spec.rel_format == "rela" else ew.REL
    count = info.size // dtype.itemsize
    i = draw(_ints(0, count - 1))
    at = info.offset + i * dtype.itemsize
    old_info = int.from_bytes(data[at + 8:at + 16], "little")
    how = draw(st.sampled_from(["target_readonly", "target_outside", "symbol", "type"]))
    if how == "target_readonly":
        value = image.tables["dynsym"].vaddr  # in the read-only headers segment
        _set(data, at, dtype, "r_offset", value)
        return f"{name}[{i}].r_offset = {value:#x} (in the read-only headers segment)"
    if how == "target_outside":
        value = _far_values(draw, image)
        _set(data, at, dtype, "r_offset", value)
        return f"{name}[{i}].r_offset = {value:#x} (outside every segment)"
    nsyms = image.tables["dynsym"].size // ew.SYM.itemsize
    if how == "symbol":
        sym = draw(st.sampled_from([nsyms, nsyms + 1, 2**31, 2**32 - 1]))
        _set(data, at, dtype, "r_info", ew.r_info(sym, old_info & 0xFFFFFFFF))
        return f"{name}[{i}].r_info symbol = {sym} (table has {nsyms})"
    rtype = draw(st.sampled_from([43, 200, 0xFFFF, 2**32 - 1]))
    _set(data, at, dtype, "r_info", ((old_info >> 32) << 32) | rtype)
    return f"{name}[{i}].r_info type = {rtype} (unknown)"


def _mutate_relr(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Point a DT_RELR address entry outside the image."""
    info = image.tables["relr"]
    words = np.frombuffer(data[info.offset:info.offset + info.size], dtype="<u8")
    addrs = [k for k, w in enumerate(words.tolist()) if w % 2 == 0]
    k = draw(st.sampled_from(addrs))
    value = _far_values(draw, image) & ~7
    _put(data, info.offset + k * 8, 8, value)
    return f"relr[{k}] = {value:#x} (outside every segment)"


def _mutate_symbol(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Give one symbol a name past the string table, or an absurd value or size."""
    info = image.tables["dynsym"]
    count = info.size // ew.SYM.itemsize
    i = draw(_ints(1, count - 1))
    at = info.offset + i * ew.SYM.itemsize
    strsz = image.tables["dynstr"].size
    if draw(st.booleans()):
        value = draw(st.sampled_from([strsz, strsz + 100, 2**32 - 1]))
        _set(data, at, ew.SYM, "st_name", value)
        return f"dynsym[{i}].st_name = {value:#x} (string table is {strsz:#x} bytes)"
    value = _far_values(draw, image)
    _set(data, at, ew.SYM, "st_value", value)
    return f"dynsym[{i}].st_value = {value:#x} (outside every segment)"


def _mutate_hash(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt a hash table header: no buckets, huge counts, a bloom size that is not a power
    of two, symoffset past the symbol table, or a bucket pointing past it."""
    names = [n for n in ("hash", "gnu_hash") if n in image.tables]
    name = draw(st.sampled_from(names))
    at = image.tables[name].offset
    nsyms = image.tables["dynsym"].size // ew.SYM.itemsize
    if name == "hash":
        field, offset = draw(st.sampled_from([("nbucket", 0), ("nchain", 4), ("bucket[0]", 8)]))
        value = draw(st.sampled_from([0, nsyms + 1, 2**31, 2**32 - 1])
                     if field != "bucket[0]" else st.sampled_from([nsyms, 2**32 - 1]))
        if field == "nbucket" and value == 0:
            value = 2**32 - 1 if draw(st.booleans()) else 0
        _put(data, at + offset, 4, value)
        return f"hash.{field} = {value:#x} ({nsyms} symbols)"
    field, offset = draw(st.sampled_from([("nbuckets", 0), ("symoffset", 4),
                                          ("bloom_size", 8), ("bloom_shift", 12)]))
    value = {
        "nbuckets": draw(st.sampled_from([0, 2**31, 2**32 - 1])),
        "symoffset": draw(st.sampled_from([nsyms + 1, 2**31])),
        "bloom_size": draw(st.sampled_from([0, 3, 2**31])),
        "bloom_shift": draw(st.sampled_from([64, 200, 2**32 - 1])),
    }[field]
    _put(data, at + offset, 4, value)
    return f"gnu_hash.{field} = {value:#x} ({nsyms} symbols)"


def _mutate_version(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Give a symbol a version index no table defines, or send a verdef/verneed link off the
    end of the image."""
    names = [n for n in ("versym", "verdef", "verneed") if n in image.tables]
    name = draw(st.sampled_from(names))
    info = image.tables[name]
    if name == "versym":
        count = info.size // 2
        i = draw(_ints(1, count - 1)) if count > 1 else 0
        value = draw(st.sampled_from([100, 0x7FFF, 0xFFFF]))
        _put(data, info.offset + 2 * i, 2, value)
        return f"versym[{i}] = {value:#x} (no such version)"
    field = "vd_next" if name == "verdef" else "vn_next"
    dtype = ew.VERDEF if name == "verdef" else ew.VERNEED
    value = draw(st.sampled_from([len(data), 2**31, 2**32 - 1]))
    _set(data, info.offset, dtype, field, value)
    return f"{name}[0].{field} = {value:#x} (past the end of the file)"


def _mutate_truncate(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Cut the file short: inside the headers, the tables, or a segment's bytes."""
    cut = draw(_ints(0, len(data) - 1))
    del data[cut:]
    return f"truncated to {cut:#x} bytes of {len(image.data):#x}"


def _mutate_flip(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """XOR a few random bytes, mostly in the headers and tables (where they matter)."""
    count = draw(_ints(1, 8))
    hot = image.tables["dynamic"].offset + image.tables["dynamic"].size
    flips = []
    for _ in range(count):
        limit = hot if draw(_ints(0, 3)) else len(data)
        at = draw(_ints(0, limit - 1))
        mask = draw(_ints(1, 255))
        data[at] ^= mask
        flips.append(f"{at:#x}^{mask:#04x}")
    return "flipped " + ", ".join(flips)


def _always(image: ElfImage) -> bool:
    return True


def _imports_of(image: ElfImage) -> list[int]:
    """dynsym indices of the image's imports."""
    return [image.symbol_index[s.name] for s in image.spec.symbols if s.segment is None]


def _mutate_import(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt one field of an imported symbol: st_size (absurd: a resolver that makes room
    for a data import by its size), st_value (set, for an undefined symbol), or st_info."""
    i = draw(st.sampled_from(_imports_of(image)))
    at = image.tables["dynsym"].offset + i * ew.SYM.itemsize
    field = draw(st.sampled_from(["st_size", "st_value", "st_info"]))
    if field == "st_size":
        value = draw(st.sampled_from([2**31, 2**40, 2**63, _U64, 2**32 + 8]))
    elif field == "st_value":
        value = _far_values(draw, image)
    else:
        old = data[at + 4]
        value = draw(st.sampled_from([
            old & 0xF,               # STB_LOCAL: an import that is local
            (old & 0xF0) | 6,        # STT_TLS
            (old & 0xF0) | 10,       # STT_GNU_IFUNC
            (old & 0xF0) | 0xF,      # a type no ABI defines
            0xF0 | (old & 0xF),      # a binding no ABI defines
        ]))
        if value == old:
            value ^= 0x0F
    _set(data, at, ew.SYM, field, value)
    return f"dynsym[{i}].{field} = {value:#x} (import)"


def _chain(image: ElfImage, name: str) -> list[tuple[int, list[int]]]:
    """The verdef or verneed chain of the valid image: (file offset of each entry, file
    offsets of its aux entries)."""
    dtype, aux_dtype = (ew.VERDEF, ew.VERDAUX) if name == "verdef" else (ew.VERNEED,
                                                                          ew.VERNAUX)
    prefix = "vd" if name == "verdef" else "vn"
    at, out = image.tables[name].offset, []
    while True:
        entry = np.frombuffer(image.data, dtype, 1, at)[0]
        aux, auxes = at + int(entry[f"{prefix}_aux"]), []
        for _ in range(int(entry[f"{prefix}_cnt"])):
            auxes.append(aux)
            step = int(np.frombuffer(image.data, aux_dtype, 1, aux)[0][f"{prefix}a_next"])
            if not step:
                break
            aux += step
        out.append((at, auxes))
        step = int(entry[f"{prefix}_next"])
        if not step:
            return out
        at += step


def _mutate_verchain(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt a verdef/verneed chain: a next link pointing back (a loop, or before the
    table), past the table, a huge count of aux entries, an aux offset outside, or the
    DT_VERNEEDNUM/DT_VERDEFNUM count far larger than the chain."""
    name = draw(st.sampled_from([n for n in ("verdef", "verneed") if n in image.tables]))
    chain = _chain(image, name)
    prefix = "vd" if name == "verdef" else "vn"
    dtype, aux_dtype = (ew.VERDEF, ew.VERDAUX) if name == "verdef" else (ew.VERNEED,
                                                                          ew.VERNAUX)
    k = draw(_ints(0, len(chain) - 1))
    at, auxes = chain[k]
    how = draw(st.sampled_from(["next_back", "next_far", "cnt", "aux_far", "aux_back",
                                "num"]))
    if how == "next_back":  # to the first entry: a loop (to before the table if k == 0)
        value = (chain[0][0] - at - (0 if k else 8)) % 2**32
        _set(data, at, dtype, f"{prefix}_next", value)
        return f"{name}[{k}].{prefix}_next = {value:#x} (back to entry 0: a loop)"
    if how == "next_far":
        value = draw(st.sampled_from([len(data), 2**31, 2**32 - 1]))
        _set(data, at, dtype, f"{prefix}_next", value)
        return f"{name}[{k}].{prefix}_next = {value:#x} (past the table)"
    if how == "cnt":
        value = draw(st.sampled_from([0xFFFF, 0x8000, len(auxes) + 1]))
        _set(data, at, dtype, f"{prefix}_cnt", value)
        return f"{name}[{k}].{prefix}_cnt = {value:#x} ({len(auxes)} aux entries)"
    if how == "aux_far":
        value = draw(st.sampled_from([len(data), 2**31, 2**32 - 4]))
        _set(data, at, dtype, f"{prefix}_aux", value)
        return f"{name}[{k}].{prefix}_aux = {value:#x} (outside the file)"
    if how == "aux_back" and auxes:
        last = auxes[-1]
        value = (auxes[0] - last - (0 if len(auxes) > 1 else aux_dtype.itemsize)) % 2**32
        _set(data, last, aux_dtype, f"{prefix}a_next", value)
        return (f"{name}[{k}] aux[{len(auxes) - 1}].{prefix}a_next = {value:#x} (back: a "
                "loop)")
    tag = ew.DT_VERDEFNUM if name == "verdef" else ew.DT_VERNEEDNUM
    value = draw(st.sampled_from([len(chain) + 1, 0xFFFF, 2**31, _U64]))
    entry = image.tables["dynamic"].offset + image.dynamic_tags[tag] * ew.DYN.itemsize
    _put(data, entry + 8, 8, value)
    return f"{name} count tag = {value:#x} (the chain has {len(chain)})"


def _mutate_hash_chain(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt the body of a hash table: a SysV chain entry pointing at itself (a loop) or
    past nchain, a bucket past the table; a GNU chain whose end bit is cleared (it runs on
    past the symbols), a bucket below symoffset or past the table."""
    name = draw(st.sampled_from([n for n in ("hash", "gnu_hash") if n in image.tables]))
    at = image.tables[name].offset
    words = np.frombuffer(image.data, "<u4", 4, at)
    nsyms = image.tables["dynsym"].size // ew.SYM.itemsize
    if name == "hash":
        nbucket, nchain = int(words[0]), int(words[1])
        how = draw(st.sampled_from(["chain_loop", "chain_past", "bucket_past"]))
        if how == "bucket_past":
            b = draw(_ints(0, nbucket - 1))
            value = draw(st.sampled_from([nchain, nchain + 100, 2**32 - 1]))
            _put(data, at + 8 + 4 * b, 4, value)
            return f"hash.bucket[{b}] = {value:#x} (nchain {nchain})"
        if nchain < 2:
            how = "chain_past"  # chain[0] (the null symbol) is 0 already: no loop to make
        i = draw(_ints(1, nchain - 1)) if nchain > 1 else 0
        value = i if how == "chain_loop" else draw(st.sampled_from([nchain, 2**31]))
        _put(data, at + 8 + 4 * nbucket + 4 * i, 4, value)
        return f"hash.chain[{i}] = {value:#x} ({'itself' if how == 'chain_loop' else 'past'})"
    nbuckets, symoffset, bloom_size = int(words[0]), int(words[1]), int(words[2])
    buckets = at + 16 + 8 * bloom_size
    chain = buckets + 4 * nbuckets
    ndefined = nsyms - symoffset
    how = draw(st.sampled_from(["no_end", "bucket_low", "bucket_past"]))
    if how == "no_end" and ndefined:
        for i in range(ndefined):
            data[chain + 4 * i] &= 0xFE  # no entry ends its chain
        return f"gnu_hash: no chain has its end bit ({ndefined} entries)"
    b = draw(_ints(0, nbuckets - 1))
    if how == "bucket_low" and symoffset > 1:
        value = draw(_ints(1, symoffset - 1))
    else:
        value = draw(st.sampled_from([nsyms, nsyms + 1000, 2**32 - 1]))
    _put(data, buckets + 4 * b, 4, value)
    return f"gnu_hash.bucket[{b}] = {value:#x} (symoffset {symoffset}, {nsyms} symbols)"


_ARRAY_TAGS = {ew.DT_INIT_ARRAY: ("DT_INIT_ARRAY", ew.DT_INIT_ARRAYSZ, "DT_INIT_ARRAYSZ"),
               ew.DT_FINI_ARRAY: ("DT_FINI_ARRAY", ew.DT_FINI_ARRAYSZ, "DT_FINI_ARRAYSZ")}


def _mutate_init(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt DT_INIT_ARRAY/DT_FINI_ARRAY: the address outside every segment, the size
    absurd, not a multiple of 8, or running the array past its segment's end."""
    tag = draw(st.sampled_from([t for t in _ARRAY_TAGS if t in image.dynamic_tags]))
    name, size_tag, size_name = _ARRAY_TAGS[tag]
    dyn = image.tables["dynamic"].offset
    how = draw(st.sampled_from(["address", "size_absurd", "size_odd", "size_past"]))
    if how == "address":
        value = _far_values(draw, image) & ~7
        _put(data, dyn + image.dynamic_tags[tag] * ew.DYN.itemsize + 8, 8, value)
        return f"{name} = {value:#x} (outside every segment)"
    if how == "size_absurd":
        value = draw(st.sampled_from([2**40, 2**61, _U64 & ~7, 2**32 * 8]))
    elif how == "size_odd":
        value = draw(st.sampled_from([1, 7, 12, 8 * 3 + 4]))
    else:
        value = 8 * draw(st.sampled_from([2**12, 2**16, 2**20]))
    _put(data, dyn + image.dynamic_tags[size_tag] * ew.DYN.itemsize + 8, 8, value)
    return f"{size_name} = {value:#x}"


def _mutate_relr_bitmap(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt a DT_RELR table: a bitmap where the first address should be, bitmaps with
    every bit set (63 words each, running past the segment), an address not 8-aligned, or one
    in the read-only headers segment."""
    info = image.tables["relr"]
    count = info.size // 8
    how = draw(st.sampled_from(["bitmap_first", "all_ones", "unaligned", "readonly"]))
    if how == "bitmap_first":
        value = draw(st.sampled_from([_U64, 3, 0x8000000000000001]))
        _put(data, info.offset, 8, value)
        return f"relr[0] = {value:#x} (a bitmap before any address)"
    if how == "all_ones":
        run = draw(_ints(1, max(1, count - 1))) if count > 1 else 0
        first = max(1, count - run) if count > 1 else 0
        for k in range(first, count):
            _put(data, info.offset + 8 * k, 8, _U64)
        if count == 1:
            return f"relr[0] = {_U64:#x} (an all-ones bitmap, no address)"
        return f"relr[{first}:{count}] = all-ones bitmaps (63 words each past the address)"
    k = 0
    old = int.from_bytes(image.data[info.offset:info.offset + 8], "little")
    value = old + 4 if how == "unaligned" else image.tables["dynsym"].vaddr & ~7
    _put(data, info.offset + 8 * k, 8, value)
    what = "not 8-aligned" if how == "unaligned" else "in the read-only headers segment"
    return f"relr[{k}] = {value:#x} ({what})"


def _copy_entries(image: ElfImage) -> list[tuple[str, int]]:
    """(table, index) of every COPY relocation in the RELA/REL tables."""
    dtype = ew.RELA if image.spec.rel_format == "rela" else ew.REL
    out = []
    for name in _reloc_tables(image):
        info = image.tables[name]
        table = np.frombuffer(image.data, dtype, info.size // dtype.itemsize, info.offset)
        out += [(name, i) for i, v in enumerate(table["r_info"].tolist())
                if v & 0xFFFFFFFF == ew.R_X86_64_COPY]
    return out


def _mutate_copy(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt a COPY relocation: its symbol's st_size absurd or running past the segment
    (the copy writes st_size bytes), the symbol a function or a defined one, or none."""
    name, i = draw(st.sampled_from(_copy_entries(image)))
    dtype = ew.RELA if image.spec.rel_format == "rela" else ew.REL
    at = image.tables[name].offset + i * dtype.itemsize
    r_info = int.from_bytes(image.data[at + 8:at + 16], "little")
    sym = r_info >> 32
    sym_at = image.tables["dynsym"].offset + sym * ew.SYM.itemsize
    how = draw(st.sampled_from(["size_absurd", "size_past", "func", "defined", "no_symbol"]))
    if how == "size_absurd":
        value = draw(st.sampled_from([2**40, 2**63, _U64, 2**31]))
        _set(data, sym_at, ew.SYM, "st_size", value)
        return f"dynsym[{sym}].st_size = {value:#x} (COPY source)"
    if how == "size_past":
        value = draw(st.sampled_from([_PAGE * 4, 2**20, 2**24]))
        _set(data, sym_at, ew.SYM, "st_size", value)
        return f"dynsym[{sym}].st_size = {value:#x} (COPY runs past its segment)"
    if how == "func":
        data[sym_at + 4] = (data[sym_at + 4] & 0xF0) | ew.STT_FUNC
        return f"dynsym[{sym}] COPY of a function"
    defined = [image.symbol_index[s.name] for s in image.spec.symbols if s.segment is not None]
    new = defined[0] if how == "defined" and defined else 0
    _set(data, at, dtype, "r_info", ew.r_info(new, ew.R_X86_64_COPY))
    return f"{name}[{i}] COPY of symbol {new} ({'defined here' if new else 'no symbol'})"


_MUTATORS: dict[str, tuple[Mutator, Callable[[ElfImage], bool]]] = {
    "header": (_mutate_header, _always),
    "phdr": (_mutate_phdr, _always),
    "dynamic": (_mutate_dynamic, _always),
    "reloc": (_mutate_reloc, lambda im: bool(_reloc_tables(im)) or "relr" in im.tables),
    "symbol": (_mutate_symbol, lambda im: im.tables["dynsym"].size > ew.SYM.itemsize),
    "hash": (_mutate_hash, _always),
    "version": (_mutate_version,
                lambda im: any(n in im.tables for n in ("versym", "verdef", "verneed"))),
    "truncate": (_mutate_truncate, _always),
    "flip": (_mutate_flip, _always),
    "import": (_mutate_import, lambda im: bool(_imports_of(im))),
    "verchain": (_mutate_verchain, lambda im: "verdef" in im.tables or "verneed" in im.tables),
    "hash_chain": (_mutate_hash_chain, _always),
    "init": (_mutate_init, lambda im: any(t in im.dynamic_tags for t in _ARRAY_TAGS)),
    "relr": (_mutate_relr_bitmap, lambda im: "relr" in im.tables),
    "copy": (_mutate_copy, lambda im: bool(_copy_entries(im))),
}

_MALFORMED_BASES = elf_images(imports=4, init_arrays=_BOOLEANS)
"""The default images :func:`malformed_elf` corrupts: with imports (so with COPY
relocations too) and sometimes init/fini arrays, so that every kind finds its target."""


def _register_type_strategies() -> None:
    """Hypothesis entry point: ``st.from_type(ElfSpec)``/``(ElfImage)``/``(MalformedImage)``
    draw from these strategies."""
    st.register_type_strategy(ElfSpec, elf_specs())
    st.register_type_strategy(ElfImage, elf_images())
    st.register_type_strategy(MalformedImage, malformed_elf())


_register_type_strategies()
