"""Hostile input to the parser, one test per class of problem: every count and size read from
the file is checked against the bytes that hold it before anything is allocated or walked.

Each hostile image is a small valid one (``vmsim.fuzz.elfwriter``) with bytes changed at known
offsets. Each load runs in the supervisor (``run_isolated``: 10 s, 512 MiB over what the child
inherited) on a traced simulator; a refusal must be an ElfError kind naming the field, raised
before any Mmap call.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import vmsim.fuzz.elfwriter as ew
from loader import (
    ElfDynamicError,
    ElfError,
    ElfRelocationError,
    ElfSymbolError,
    StubResolver,
    TracingMmap,
    load,
)
from loader.elf import USER_LIMIT, parse_image
from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.pages import HOST_PAGE_SIZE
from loader.tables import DT as T
from loader.tables import VERNAUX, VERNEED, decode_relr, parse_tables, relr_count
from vmsim import AddressSpace

BIG = 1 << 20
"""Bytes of the crafted-data segment: hostile tables of about 1 MiB live there."""

Outcome = tuple[str, str, str, int, int]
"""(error class or "loaded", field, message, Mmap calls made, mappings left after unload)."""


def _spec(*, big: bool = False, **knobs: Any) -> ew.ElfSpec:
    """A small shared object: text, data, a defined and two imported symbols (one versioned
    function, one data object), RELATIVE, GLOB_DAT, JUMP_SLOT and 64 relocations. ``big``
    adds a read-only segment of BIG zero bytes (segment 2) for crafted tables."""
    segments = [ew.Segment("rx", data=b"\xc3" * 64), ew.Segment("rw", data=bytes(256))]
    if big:
        segments.append(ew.Segment("r", data=bytes(BIG)))
    symbols = (
        ew.Symbol("exported", segment=1, offset=0, size=8),
        ew.Symbol("imported_fn", type="func", size=0, version="libc.so.6:GLIBC_2.2.5"),
        ew.Symbol("imported_data", size=64),
    )
    relocs = (
        ew.Reloc("RELATIVE", 1, 16, target=(1, 0)),
        ew.Reloc("RELATIVE", 1, 24, target=(0, 0)),
        ew.Reloc("GLOB_DAT", 1, 32, symbol="imported_data"),
        ew.Reloc("JUMP_SLOT", 1, 40, symbol="imported_fn"),
        ew.Reloc("64", 1, 48, symbol="exported", addend=8),
    )
    return replace(ew.ElfSpec(segments=tuple(segments), symbols=symbols, relocs=relocs),
                   **knobs)


def _image(**knobs: Any) -> ew.ElfImage:
    return ew.build(_spec(**knobs))


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, offset, value)


def _tag_at(image: ew.ElfImage, tag: int) -> int:
    """File offset of dynamic tag ``tag``'s d_val."""
    return image.tables["dynamic"].offset + image.dynamic_tags[tag] * ew.DYN.itemsize + 8


def _with_tag(image: ew.ElfImage, tag: int, value: int) -> bytes:
    data = bytearray(image.data)
    _put(data, _tag_at(image, tag), "<Q", value)
    return bytes(data)


def _big_place(image: ew.ElfImage) -> tuple[int, int]:
    """(file offset, vaddr) of the crafted-data segment."""
    return image.segments[2]


def _attempt(data: bytes) -> Outcome:
    """Load ``data`` on a traced simulator (in the supervised child)."""
    space = AddressSpace()
    traced = TracingMmap(space)
    try:
        obj = load(data, traced)
    except ElfError as exc:
        return type(exc).__name__, exc.field, str(exc), len(traced.calls), len(space.maps())
    calls = len(traced.calls)
    obj.unload()
    return "loaded", "", "", calls, len(space.maps())


def _supervised(data: bytes) -> Outcome:
    done = run_isolated(_attempt, data, timeout=10.0, max_rss=512 << 20)
    assert done.status == "ok", done.status
    result: Outcome = done.value
    return result


def _refused(data: bytes, kind: type[ElfError], field: str) -> str:
    """Assert the load is refused by ``kind`` naming ``field``, before any Mmap call."""
    name, got_field, message, calls, left = _supervised(data)
    assert (name, calls, left) == (kind.__name__, 0, 0), message
    assert field in got_field, message
    return message


def _loads(data: bytes) -> None:
    """Assert the load works (within the supervisor's bounds) and unloads to nothing."""
    name, _, message, _, left = _supervised(data)
    assert (name, left) == ("loaded", 0), message


# ---------------------------------------------------------------------------------------------
# The symbol count: taken from every reader, bounded by the bytes at DT_SYMTAB.


def test_symbol_count_gnu_hash_covering_no_symbol_is_ignored() -> None:
    # All buckets empty and symoffset absurd: the hash covers nothing and says nothing about
    # the table's size (a -no-pie executable's looks like this); the relocations do.
    image = _image(hash="gnu")
    data = bytearray(image.data)
    at = image.tables["gnu_hash"].offset
    nbuckets, _, bloom_size, _ = struct.unpack_from("<4I", data, at)
    _put(data, at + 4, "<I", 2**31)
    data[at + 16 + 8 * bloom_size: at + 16 + 8 * bloom_size + 4 * nbuckets] = bytes(4 * nbuckets)
    _loads(bytes(data))
    tables = parse_tables(parse_image(bytes(data), HOST_PAGE_SIZE))
    assert tables.nsyms == len(image.spec.symbols) + 1


@pytest.mark.parametrize("r_sym", [5, 2**16, 2**31, 2**32 - 1])
def test_symbol_count_r_sym_past_the_table(r_sym: int) -> None:
    # symbol index 5 is the first past the 4 real symbols: DT_STRTAB follows DT_SYMTAB.
    image = _image(hash="gnu")
    data = bytearray(image.data)
    rela = image.tables["rela"]
    info = struct.unpack_from("<Q", data, rela.offset + 24 * 2 + 8)[0]
    _put(data, rela.offset + 24 * 2 + 8, "<Q", (r_sym << 32) | (info & 0xFFFFFFFF))
    message = _refused(bytes(data), ElfSymbolError, "DT_RELA r_sym")
    assert "holds" in message and f"{r_sym:#x}" in message


@pytest.mark.parametrize("field, offset, value", [
    ("nchain", 4, 2**32 - 1), ("nchain", 4, 2**20), ("nbucket", 0, 2**32 - 1)])
def test_symbol_count_sysv_hash_counts_past_the_bytes(field: str, offset: int,
                                                      value: int) -> None:
    image = _image(hash="sysv")
    data = bytearray(image.data)
    _put(data, image.tables["hash"].offset + offset, "<I", value)
    name, got_field, message, calls, _ = _supervised(bytes(data))
    assert name in ("ElfSymbolError", "ElfDynamicError") and calls == 0, message
    assert "DT_HASH" in got_field, message


@pytest.mark.parametrize("field, offset, value", [
    ("nbuckets", 0, 2**32 - 1), ("bloom_size", 8, 2**32 - 1), ("bloom_size", 8, 2**28),
    ("symoffset", 4, 2**31)])
def test_symbol_count_gnu_hash_counts_past_the_bytes(field: str, offset: int,
                                                     value: int) -> None:
    image = _image(hash="gnu")
    data = bytearray(image.data)
    _put(data, image.tables["gnu_hash"].offset + offset, "<I", value)
    name, got_field, message, calls, _ = _supervised(bytes(data))
    assert name in ("ElfSymbolError", "ElfDynamicError") and calls == 0, message
    assert "DT_GNU_HASH" in got_field, message


def test_symbol_count_gnu_hash_chain_without_end_marker() -> None:
    # DT_GNU_HASH moved to the crafted segment: one bucket, whose chain of zero words runs to
    # the end of the segment's file bytes without an end marker (low bit).
    image = _image(hash="gnu", big=True)
    data = bytearray(image.data)
    offset, vaddr = _big_place(image)
    struct.pack_into("<4I", data, offset, 1, 1, 1, 6)        # nbuckets symoffset bloom shift
    struct.pack_into("<I", data, offset + 16 + 8, 1)          # bucket[0] = symbol 1
    _put(data, _tag_at(image, T.GNU_HASH), "<Q", vaddr)
    _refused(bytes(data), ElfDynamicError, "DT_GNU_HASH chain")


def test_symbol_count_broken_sysv_hash_beside_gnu_hash_is_ignored_as_glibc_does() -> None:
    # glibc reads DT_HASH only when there is no DT_GNU_HASH: a broken one beside a good GNU
    # hash changes nothing.
    image = _image(hash="both")
    data = bytearray(image.data)
    _put(data, image.tables["hash"].offset + 4, "<I", 2**32 - 1)
    _loads(bytes(data))
    tables = parse_tables(parse_image(bytes(data), HOST_PAGE_SIZE))
    assert tables.sysv_hash is None and tables.gnu_hash is not None


@pytest.mark.parametrize("value", [2**40, 2**64 - 8])
def test_symbol_count_symtab_outside_file_bytes(value: int) -> None:
    _refused(_with_tag(_image(), T.SYMTAB, value), ElfDynamicError, "DT_SYMTAB")


# ---------------------------------------------------------------------------------------------
# Imports' st_size: reserved, never written; absurd ones refused by name.


def _import_size(image: ew.ElfImage, size: int) -> bytes:
    data = bytearray(image.data)
    i = image.symbol_index["imported_data"]
    _put(data, image.tables["dynsym"].offset + i * ew.SYM.itemsize + 16, "<Q", size)
    return bytes(data)


def _stub_load_on_host(data: bytes) -> tuple[int, int]:
    """Load with the stub resolver on the real kernel (in the supervised child): the extern
    mapping's length and the bytes the loader wrote into it."""
    traced = TracingMmap(LibcMmap())
    obj = load(data, traced, resolver=StubResolver())
    lo, hi = obj.relocations.extern_range or (0, 0)
    written = sum(dict(c.args)["length"] for c in traced.calls
                  if c.op == "write" and lo <= dict(c.args)["addr"] < hi)
    obj.unload()
    return hi - lo, written


def test_import_st_size_huge_costs_no_memory() -> None:
    # 3 GiB (the example: a 1.4 KB file asked for 3 GB): a reservation, not written bytes.
    data = _import_size(_image(), 3 << 30)
    _loads(data)
    done = run_isolated(_stub_load_on_host, data, timeout=10.0, max_rss=512 << 20)
    assert done.status == "ok"
    length, written = done.value
    assert length > 3 << 30 and written <= HOST_PAGE_SIZE


@pytest.mark.parametrize("size", [2**63, 2**64 - 1, USER_LIMIT])
def test_import_st_size_past_the_address_space(size: int) -> None:
    message = _refused(_import_size(_image(), size), ElfSymbolError, "imported_data")
    assert f"{size:#x}" in message


def test_import_st_size_sum_past_the_address_space() -> None:
    spec = _spec()
    many = tuple(ew.Symbol(f"blob{k}", size=USER_LIMIT // 3) for k in range(4))
    uses = tuple(ew.Reloc("GLOB_DAT", 1, 64 + 8 * k, symbol=f"blob{k}") for k in range(4))
    image = ew.build(replace(spec, symbols=spec.symbols + many, relocs=spec.relocs + uses))
    message = _refused(image.data, ElfSymbolError, "st_size of import")
    assert "blob" in message


# ---------------------------------------------------------------------------------------------
# Version chains: every walk bounded by the records the bytes hold; revisits refused.


def _shared_aux_chains(image: ew.ElfImage) -> bytes:
    """DT_VERNEED moved into the crafted segment: N Verneed records, each pointing at one
    shared chain of N Vernaux records: N*N steps (2**28 here) from about 1 MiB."""
    data = bytearray(image.data)
    offset, vaddr = _big_place(image)
    n = BIG // 2 // VERNEED.size
    aux_at = offset + n * VERNEED.size
    for k in range(n):
        at = offset + k * VERNEED.size
        VERNEED.pack_into(data, at, 1, n, 1, aux_at - at, VERNEED.size if k < n - 1 else 0)
        VERNAUX.pack_into(data, aux_at + k * VERNAUX.size, 0, 0, 2, 1,
                          VERNAUX.size if k < n - 1 else 0)
    _put(data, _tag_at(image, T.VERNEED), "<Q", vaddr)
    _put(data, _tag_at(image, T.VERNEEDNUM), "<Q", n)
    return bytes(data)


def test_version_chains_sharing_aux_entries() -> None:
    _refused(_shared_aux_chains(_image(big=True)), ElfDynamicError, "vn_aux")


@pytest.mark.parametrize("tag, name", [(T.VERNEEDNUM, "DT_VERNEEDNUM"),
                                       (T.VERDEFNUM, "DT_VERDEFNUM")])
@pytest.mark.parametrize("value", [2**16, 2**32, 2**64 - 1])
def test_version_counts_past_the_bytes(tag: int, name: str, value: int) -> None:
    spec = _spec()
    versioned = replace(spec.symbols[0], version="V1")
    image = ew.build(replace(spec, symbols=(versioned, *spec.symbols[1:])))
    _refused(_with_tag(image, tag, value), ElfDynamicError, name)


@pytest.mark.parametrize("table, link, offset", [
    ("verneed", "vn_next", 12), ("verneed", "vn_aux", 8), ("verdef", "vd_next", 16),
    ("verdef", "vd_aux", 12)])
@pytest.mark.parametrize("value", [2**31, 2**32 - 1])
def test_version_links_past_the_bytes(table: str, link: str, offset: int, value: int) -> None:
    spec = _spec()
    versioned = replace(spec.symbols[0], version="V1")
    image = ew.build(replace(spec, symbols=(versioned, *spec.symbols[1:])))
    data = bytearray(image.data)
    _put(data, image.tables[table].offset + offset, "<I", value)
    _refused(bytes(data), ElfDynamicError, link)


LOOPS: dict[str, tuple[list[tuple[int, struct.Struct, tuple[int, ...]]], str]] = {
    # (records written at offsets of the crafted segment, the link that must be named)
    "vn_aux onto its own Verneed": ([(0, VERNEED, (1, 1, 1, 0, 0))], "vn_aux"),
    "vn_next onto its own Vernaux": ([(0, VERNEED, (1, 1, 1, 16, 16)),
                                      (16, VERNAUX, (0, 0, 2, 1, 0))], "vn_next"),
    "vna_next onto another chain's Vernaux": ([
        (0, VERNEED, (1, 1, 1, 64, 16)), (64, VERNAUX, (0, 0, 2, 1, 0)),
        (16, VERNEED, (1, 2, 1, 32, 0)), (48, VERNAUX, (0, 0, 3, 1, 16))], "vna_next"),
}


@pytest.mark.parametrize("case", sorted(LOOPS))
def test_version_chain_revisiting_a_record(case: str) -> None:
    records, link = LOOPS[case]
    image = _image(big=True)
    data = bytearray(image.data)
    offset, vaddr = _big_place(image)
    for at, layout, values in records:
        layout.pack_into(data, offset + at, *values)
    _put(data, _tag_at(image, T.VERNEED), "<Q", vaddr)
    _refused(bytes(data), ElfDynamicError, link)


def test_version_chain_read_once_loads() -> None:
    # The same records without the revisit load: the walk itself is fine.
    image = _image(big=True)
    data = bytearray(image.data)
    offset, vaddr = _big_place(image)
    VERNEED.pack_into(data, offset, 1, 1, 1, 64, 16)
    VERNAUX.pack_into(data, offset + 64, 0, 0, 2, 1, 0)
    VERNEED.pack_into(data, offset + 16, 1, 1, 1, 32, 0)
    VERNAUX.pack_into(data, offset + 48, 0, 0, 3, 1, 0)
    _put(data, _tag_at(image, T.VERNEED), "<Q", vaddr)
    _loads(bytes(data))


# ---------------------------------------------------------------------------------------------
# Names: the bytes a load cuts from the string table are counted before any is cut.


def _long_string_table(image: ew.ElfImage, data: bytearray) -> int:
    """DT_STRTAB moved to the second half of the crafted segment: the old names, then one
    name of ~512 KiB. Returns the long name's offset."""
    offset, vaddr = _big_place(image)
    half = BIG // 2
    old = image.data[image.tables["dynstr"].offset:][:image.tables["dynstr"].size]
    data[offset + half: offset + BIG] = old + b"A" * (half - len(old) - 1) + b"\0"
    _put(data, _tag_at(image, T.STRTAB), "<Q", vaddr + half)
    _put(data, _tag_at(image, T.STRSZ), "<Q", half)
    return len(old)


def test_names_overlapping_version_names() -> None:
    # 32 thousand needed versions, each named by a different suffix of one 512 KiB name:
    # 8 GB of names from 1 MiB.
    image = _image(big=True)
    data = bytearray(image.data)
    offset, vaddr = _big_place(image)
    long_at = _long_string_table(image, data)
    n = (BIG // 2 - 32) // VERNAUX.size
    VERNEED.pack_into(data, offset, 1, n, 1, VERNEED.size, 0)
    for k in range(n):
        VERNAUX.pack_into(data, offset + 16 + 16 * k, 0, 0, 2 + k % 30000, long_at + k,
                          16 if k < n - 1 else 0)
    _put(data, _tag_at(image, T.VERNEED), "<Q", vaddr)
    _refused(bytes(data), ElfSymbolError, "name bytes")


def test_names_overlapping_symbol_names() -> None:
    # 2000 imports, each named by a different suffix of one 512 KiB name.
    n = 2000
    spec = _spec(big=True)
    segments = (spec.segments[0], ew.Segment("rw", data=bytes(8 * n)), spec.segments[2])
    imports = tuple(ew.Symbol(f"i{k}") for k in range(n))
    uses = tuple(ew.Reloc("GLOB_DAT", 1, 8 * k, symbol=f"i{k}") for k in range(n))
    image = ew.build(replace(spec, segments=segments, symbols=imports, relocs=uses))
    data = bytearray(image.data)
    long_at = _long_string_table(image, data)
    for k in range(n):
        i = image.symbol_index[f"i{k}"]
        _put(data, image.tables["dynsym"].offset + i * ew.SYM.itemsize, "<I", long_at + k)
    _refused(bytes(data), ElfSymbolError, "name bytes")


# ---------------------------------------------------------------------------------------------
# RELR: the target count bounded before decoding; every target checked.


def _relr_words(image: ew.ElfImage, words: np.ndarray[Any, Any]) -> bytes:
    """DT_RELR moved into the crafted segment, holding ``words``."""
    data = bytearray(image.data)
    offset, vaddr = _big_place(image)
    raw = words.astype("<u8").tobytes()
    data[offset: offset + len(raw)] = raw
    _put(data, _tag_at(image, T.RELR), "<Q", vaddr)
    _put(data, _tag_at(image, T.RELRSZ), "<Q", len(raw))
    return bytes(data)


def test_relr_bitmaps_expanding_past_the_writable_span() -> None:
    # 1 MiB of all-ones bitmaps after one address: 8 million targets, for a 256-byte segment.
    image = _image(big=True, relr=True)
    rw = image.segment_vaddr(1)
    words = np.full(BIG // 8, 2**64 - 1, dtype=np.uint64)
    words[0] = rw
    message = _refused(_relr_words(image, words), ElfDynamicError, "DT_RELR target count")
    assert f"{relr_count(words):#x}" in message


@pytest.mark.parametrize("where", ["read-only", "far", "past the segment"])
def test_relr_target_outside_writable_segments(where: str) -> None:
    image = _image(big=True, relr=True)
    rw = image.segment_vaddr(1)
    first = {"read-only": image.segment_vaddr(0), "far": 2**46, "past the segment": rw}[where]
    bitmap = 1 if where != "past the segment" else (1 << 63) | 1   # bit 63: rw + 62*8
    words = np.array([first, bitmap], dtype=np.uint64)
    _refused(_relr_words(image, words), ElfRelocationError, "DT_RELR target")


def test_relr_target_relocated_twice() -> None:
    image = _image(big=True, relr=True)
    rw = image.segment_vaddr(1)
    _refused(_relr_words(image, np.array([rw, rw + 8, rw], dtype=np.uint64)),
             ElfRelocationError, "DT_RELR target")


@pytest.mark.parametrize("size", [2**62, 2**64 - 8, BIG * 64])
def test_relr_size_past_the_file(size: int) -> None:
    image = _image(relr=True)
    _refused(_with_tag(image, T.RELRSZ, size), ElfDynamicError, "DT_RELR")


def test_relr_decoder_agrees_with_the_count() -> None:
    rng = np.random.default_rng(9)
    words = rng.integers(0, 2**63, size=5000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    words[::50] = np.arange(0, 100, dtype=np.uint64) * np.uint64(1 << 20)
    targets = decode_relr(words)
    assert len(targets) == relr_count(words)
    reference = []
    for w in words.tolist():
        if w & 1 == 0:
            reference.append(w)
            base = w + 8
        else:
            reference += [base + 8 * (i - 1) for i in range(1, 64) if w >> i & 1]
            base += 63 * 8
    assert targets.tolist() == reference


# ---------------------------------------------------------------------------------------------
# Other counts and sizes read from the dynamic section.


ABSURD: dict[str, tuple[int, int, type[ElfError], str]] = {
    "DT_RELACOUNT": (T.RELACOUNT, 2**40, ElfDynamicError, "DT_RELACOUNT"),
    "DT_RELACOUNT one past": (T.RELACOUNT, 5, ElfDynamicError, "DT_RELACOUNT"),
    "DT_STRSZ": (T.STRSZ, 2**40, ElfDynamicError, "DT_STRTAB"),
    "DT_STRSZ max": (T.STRSZ, 2**64 - 1, ElfDynamicError, "DT_STRTAB"),
    "DT_RELASZ": (T.RELASZ, 2**63, ElfDynamicError, "DT_RELA"),
    "DT_PLTRELSZ": (T.PLTRELSZ, 2**40 * 24, ElfDynamicError, "DT_JMPREL"),
    "DT_SYMENT": (T.SYMENT, 2**32, ElfDynamicError, "DT_SYMENT"),
    "DT_RELAENT": (T.RELAENT, 0, ElfDynamicError, "DT_RELAENT"),
    "DT_STRTAB": (T.STRTAB, 2**64 - 1, ElfDynamicError, "DT_STRTAB"),
    "DT_RELA": (T.RELA, 2**45, ElfDynamicError, "DT_RELA"),
    "DT_VERSYM": (T.VERSYM, 2**45, ElfDynamicError, "DT_VERSYM"),
    "DT_GNU_HASH": (T.GNU_HASH, 2**63, ElfDynamicError, "DT_GNU_HASH"),
    "DT_NEEDED": (ew.DT_NEEDED, 2**32, ElfSymbolError, "DT_NEEDED"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_dynamic_counts_checked_against_their_bytes(case: str) -> None:
    tag, value, kind, field = ABSURD[case]
    image = _image()
    # DT_RELA holds 4 entries here (2 RELATIVE, GLOB_DAT, 64): 5 is one past.
    assert image.tables["rela"].size == 4 * ew.RELA.itemsize
    _refused(_with_tag(image, tag, value), kind, field)


def test_dynamic_relacount_of_the_table_size_loads() -> None:
    image = _image()
    assert parse_tables(parse_image(image.data, HOST_PAGE_SIZE)).tags[T.RELACOUNT] == 2
    _loads(image.data)


def _no_null() -> bytes:
    """PT_DYNAMIC stretched over the crafted segment, whose tags are all DT_DEBUG."""
    image = _image(big=True)
    data = bytearray(image.data)
    offset, _ = _big_place(image)
    data[offset: offset + BIG] = np.tile(np.array([ew.DT_DEBUG, 0], dtype="<u8"),
                                         BIG // 16).tobytes()
    phdrs = image.phoff
    for i, ph in enumerate(image.phdrs):
        if ph["p_type"] == ew.PT_DYNAMIC:
            base = phdrs + i * ew.PHDR.itemsize
            _, vaddr = _big_place(image)
            _put(data, base + 8, "<Q", offset)
            _put(data, base + 16, "<Q", vaddr)
            _put(data, base + 32, "<Q", BIG)
            _put(data, base + 40, "<Q", BIG)
    return bytes(data)


def test_dynamic_section_without_terminator() -> None:
    _refused(_no_null(), ElfDynamicError, "PT_DYNAMIC")
