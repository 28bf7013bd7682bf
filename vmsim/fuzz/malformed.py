"""Hypothesis strategies for malformed ELF files: a valid image with one field-aware corruption.

Part of the fuzz kit (``vmsim.fuzz``); public as ``loader.strategies``. :func:`malformed_elf`
draws a :class:`MalformedImage`: a valid image (``vmsim.fuzz.images``) with one corruption that
knows which field it hit (``.mutation`` says it in words), or a truncation, or raw byte flips.
``.data`` is the corrupted file. Each kind of :data:`MUTATION_KINDS` is one mutator in the
table ``_MUTATORS``; the program-header kind is itself a table of mutations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from loader.pages import HOST_PAGE_SIZE
from vmsim.fuzz import elfwriter as ew
from vmsim.fuzz.elfwriter import ElfImage
from vmsim.fuzz.knobs import ValueOrStrategy, as_strategy, check_subset, ints

__all__ = ["MUTATION_KINDS", "MalformedImage", "malformed_elf"]

_PAGE = HOST_PAGE_SIZE

MUTATION_KINDS: tuple[str, ...] = (
    "header", "phdr", "dynamic", "reloc", "symbol", "hash", "version", "truncate", "flip",
    "import", "verchain", "hash_chain", "init", "relr", "copy",
)
"""What :func:`malformed_elf` can corrupt: ELF header fields, program header fields, dynamic
tags, relocation entries, symbols, hash tables, version tables; or cut the file short, or flip
raw bytes; and the fields of imported symbols, the links and counts of verdef/verneed chains,
the buckets and chains of both hash tables, the init/fini arrays, the RELR bitmaps and COPY
relocations."""

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

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a drawn image: its ``repr`` (see ``ElfImage``)."""
        printer.text(repr(self))


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
        images = _default_images()
    if not isinstance(images, st.SearchStrategy | ElfImage):
        raise InvalidArgument(f"images={images!r}: expected an ElfImage or a strategy of them")
    check_subset(kinds, "kinds", MUTATION_KINDS)
    return _malformed(as_strategy(images), as_strategy(kinds))


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


@dataclass
class _Phdr:
    """The program header a phdr mutation corrupts: entry ``i`` (a PT_LOAD that maps
    something, among ``loads``) of ``image``, at file offset ``at`` of ``data``."""

    draw: st.DrawFn
    image: ElfImage
    data: bytearray
    loads: list[int]
    i: int

    @property
    def at(self) -> int:
        return self.image.phoff + self.i * ew.PHDR.itemsize

    def get(self, name: str) -> int:
        return int(self.image.phdrs[self.i][name])

    def set(self, name: str, value: int) -> None:
        _set(self.data, self.at, ew.PHDR, name, value)

    def other(self) -> int:
        """Another PT_LOAD (drawn)."""
        return int(self.draw(st.sampled_from([x for x in self.loads if x != self.i])))


def _phdr_offset_past_eof(p: _Phdr) -> str | None:
    if not p.get("p_filesz"):
        return None  # no file bytes: the offset is never used
    value = p.draw(st.sampled_from([len(p.data) + _PAGE, 2**40, _U64 & ~0xFFF]))
    value += p.get("p_vaddr") % _PAGE
    p.set("p_offset", value)
    return f"phdr[{p.i}].p_offset = {value:#x} (past EOF at {len(p.data):#x})"


def _phdr_filesz_past_eof(p: _Phdr) -> str:
    value = len(p.data) + p.draw(ints(1, 4 * _PAGE))
    p.set("p_filesz", value)
    p.set("p_memsz", max(value, p.get("p_memsz")))
    return f"phdr[{p.i}].p_filesz = {value:#x} (past EOF at {len(p.data):#x})"


def _phdr_filesz_gt_memsz(p: _Phdr) -> str:
    value = p.get("p_memsz") + p.draw(ints(1, _PAGE))
    p.set("p_filesz", value)
    return f"phdr[{p.i}].p_filesz = {value:#x} > p_memsz {p.get('p_memsz'):#x}"


def _phdr_vaddr_overflow(p: _Phdr) -> str:
    value = 2**64 - p.get("p_vaddr") + p.draw(ints(0, _PAGE))
    p.set("p_memsz", value)
    p.set("p_filesz", min(p.get("p_filesz"), value))
    return f"phdr[{p.i}].p_memsz = {value:#x} (p_vaddr + p_memsz overflows)"


def _phdr_misaligned(p: _Phdr) -> str:
    vaddr = p.get("p_vaddr") + p.draw(ints(1, _PAGE - 1))
    p.set("p_vaddr", vaddr)
    return f"phdr[{p.i}].p_vaddr = {vaddr:#x} (not congruent to p_offset)"


def _phdr_absurd_memsz(p: _Phdr) -> str:
    value = p.draw(st.sampled_from([2**47, 2**56, 2**63]))
    p.set("p_memsz", value)
    return f"phdr[{p.i}].p_memsz = {value:#x}"


def _phdr_align(p: _Phdr) -> str:
    value = p.draw(st.sampled_from([3, 0x1001, 0x1800, 0xFFFF]))
    p.set("p_align", value)
    return f"phdr[{p.i}].p_align = {value:#x} (not a power of two)"


def _phdr_swap(p: _Phdr, j: int) -> str:
    """Swap PT_LOADs ``i`` and ``j``: out of order."""
    a, b = sorted((p.i, j))
    pa, pb = p.image.phoff + a * ew.PHDR.itemsize, p.image.phoff + b * ew.PHDR.itemsize
    size = ew.PHDR.itemsize
    rec_a, rec_b = bytes(p.data[pa:pa + size]), bytes(p.data[pb:pb + size])
    p.data[pa:pa + size], p.data[pb:pb + size] = rec_b, rec_a
    return f"phdr[{a}] and phdr[{b}] swapped (PT_LOADs out of order)"


def _phdr_unsorted(p: _Phdr) -> str | None:
    return _phdr_swap(p, p.other()) if len(p.loads) > 1 else None


def _phdr_overlap(p: _Phdr) -> str | None:
    """The same page offset as before (still congruent), bytes shared with another PT_LOAD;
    when that cannot be, the two swapped."""
    if len(p.loads) < 2:
        return None
    j = p.other()
    other = p.image.phdrs[j]
    lo, hi = int(other["p_vaddr"]), int(other["p_vaddr"] + other["p_memsz"])
    new = lo - lo % _PAGE + p.get("p_vaddr") % _PAGE
    if new + p.get("p_memsz") <= lo:
        new += _PAGE
    if new >= hi:
        return _phdr_swap(p, j)
    p.set("p_vaddr", new)
    return f"phdr[{p.i}].p_vaddr = {new:#x} (overlaps phdr[{j}])"


def _phdr_outside(ptype: int, what: str) -> Callable[[_Phdr], str | None]:
    """A mutation moving the (first) header of type ``ptype`` outside every segment."""
    def mutate(p: _Phdr) -> str | None:
        found = [x for x, t in enumerate(p.image.phdrs["p_type"].tolist()) if t == ptype]
        if not found:
            return None
        far = _far_values(p.draw, p.image) & ~0xF
        _set(p.data, p.image.phoff + found[0] * ew.PHDR.itemsize, ew.PHDR, "p_vaddr", far)
        return f"phdr[{found[0]}].p_vaddr = {far:#x} ({what} outside every segment)"
    return mutate


def _phdr_shared_page(p: _Phdr) -> str | None:
    return _share_page(p.draw, p.image, p.data, p.loads, p.i) if len(p.loads) > 1 else None


_PHDR_MUTATIONS: dict[str, Callable[[_Phdr], str | None]] = {
    "offset_past_eof": _phdr_offset_past_eof,
    "filesz_past_eof": _phdr_filesz_past_eof,
    "filesz_gt_memsz": _phdr_filesz_gt_memsz,
    "vaddr_overflow": _phdr_vaddr_overflow,
    "misaligned": _phdr_misaligned,
    "overlap": _phdr_overlap,
    "unsorted": _phdr_unsorted,
    "absurd_memsz": _phdr_absurd_memsz,
    "align_not_power_of_two": _phdr_align,
    "relro_outside": _phdr_outside(ew.PT_GNU_RELRO, "relro"),
    "dynamic_outside": _phdr_outside(ew.PT_DYNAMIC, "dynamic"),
    "shared_page": _phdr_shared_page,
}
"""The ways :func:`_mutate_phdr` breaks a program header. A mutation returns what it did, or
None when this image gives it nothing to break; then its fallback below is tried."""

_PHDR_FALLBACKS = {
    "overlap": "offset_past_eof", "unsorted": "offset_past_eof",
    "relro_outside": "offset_past_eof", "dynamic_outside": "offset_past_eof",
    "offset_past_eof": "filesz_past_eof", "shared_page": "align_not_power_of_two",
}


def _mutate_phdr(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """Corrupt one program header field (or the order of two) so that the file is invalid:
    a mutation drawn from :data:`_PHDR_MUTATIONS`, or the fallback it names."""
    loads = _load_indices(image)
    target = _Phdr(draw, image, data, loads, draw(st.sampled_from(loads)))
    how: str | None = draw(st.sampled_from(list(_PHDR_MUTATIONS)))
    while how is not None:
        done = _PHDR_MUTATIONS[how](target)
        if done is not None:
            return done
        how = _PHDR_FALLBACKS.get(how)
    raise AssertionError("every fallback chain ends in a mutation that always applies")


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
    i = draw(ints(0, count - 1))
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
    i = draw(ints(1, count - 1))
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
        i = draw(ints(1, count - 1)) if count > 1 else 0
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
    cut = draw(ints(0, len(data) - 1))
    del data[cut:]
    return f"truncated to {cut:#x} bytes of {len(image.data):#x}"


def _mutate_flip(draw: st.DrawFn, image: ElfImage, data: bytearray) -> str:
    """XOR a few random bytes, mostly in the headers and tables (where they matter); each
    byte at most once, so that two flips never cancel out."""
    count = draw(ints(1, 8))
    hot = image.tables["dynamic"].offset + image.tables["dynamic"].size
    flips: dict[int, int] = {}
    for _ in range(count):
        limit = hot if draw(ints(0, 3)) else len(data)
        at = draw(ints(0, limit - 1))
        mask = draw(ints(1, 255))
        if at not in flips:
            data[at] ^= mask
            flips[at] = mask
    return "flipped " + ", ".join(f"{at:#x}^{mask:#04x}" for at, mask in flips.items())


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


_CHAIN_LIMIT = 4096
"""The most entries (aux entries included) :func:`_chain` walks: a real file's version chains
have a few dozen; a longer one is a loop or a lie (``vmsim.fuzz.realfiles`` reads real files)."""


def _chain(image: ElfImage, name: str) -> list[tuple[int, list[int]]]:
    """The verdef or verneed chain of the valid image: (file offset of each entry, file
    offsets of its aux entries). ValueError when it leaves the file or runs past
    :data:`_CHAIN_LIMIT` entries."""
    dtype, aux_dtype = (ew.VERDEF, ew.VERDAUX) if name == "verdef" else (ew.VERNEED,
                                                                          ew.VERNAUX)
    prefix = "vd" if name == "verdef" else "vn"
    at, out, walked = image.tables[name].offset, [], 0
    while True:
        entry = np.frombuffer(image.data, dtype, 1, at)[0]
        aux, auxes = at + int(entry[f"{prefix}_aux"]), []
        walked += 1 + int(entry[f"{prefix}_cnt"])
        if walked > _CHAIN_LIMIT:
            raise ValueError(f"{name} chain longer than {_CHAIN_LIMIT} entries")
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
    k = draw(ints(0, len(chain) - 1))
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
            b = draw(ints(0, nbucket - 1))
            value = draw(st.sampled_from([nchain, nchain + 100, 2**32 - 1]))
            _put(data, at + 8 + 4 * b, 4, value)
            return f"hash.bucket[{b}] = {value:#x} (nchain {nchain})"
        if nchain < 2:
            how = "chain_past"  # chain[0] (the null symbol) is 0 already: no loop to make
        i = draw(ints(1, nchain - 1)) if nchain > 1 else 0
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
    b = draw(ints(0, nbuckets - 1))
    if how == "bucket_low" and symoffset > 1:
        value = draw(ints(1, symoffset - 1))
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
        run = draw(ints(1, max(1, count - 1))) if count > 1 else 0
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

@functools.cache
def _default_images() -> st.SearchStrategy[ElfImage]:
    """The default images :func:`malformed_elf` corrupts: with imports (so with COPY
    relocations too) and sometimes init/fini arrays, so that every kind finds its target.
    (Imported when first asked for: hypothesis imports this module through its entry point
    while a user's ``import vmsim.fuzz.images`` may still be half done.)"""
    from vmsim.fuzz.images import _BOOLEANS, elf_images

    return elf_images(imports=4, init_arrays=_BOOLEANS)  # the default knob: the fast path


def _register_type_strategies() -> None:
    """Hypothesis entry point: ``st.from_type(MalformedImage)`` draws from
    :func:`malformed_elf`."""
    st.register_type_strategy(MalformedImage, st.deferred(malformed_elf))


_register_type_strategies()
