"""Relocate: the x86-64 relocation table and the generic kinds that apply it.

Part of the ``loader`` layer (imports ``loader.elfdefs``, ``loader.tables``,
``loader.symbols``, ``loader.mmap``). As musl does it, an architecture is a table from type
number to (kind, width, addend rule, signedness): ``X86_64``, the one place a type number gets
its meaning (its columns are derived from it as arrays for lookups over whole tables). The
kinds are computed a whole table at a time with numpy, with the ABI's letters: S (symbol
address), A (addend), P (place), B (load bias); ``RelocContext`` says where a pass works.
``check_relocations`` validates every target, every COPY size and every address the loader
may call before any memory is touched.

Every store, whatever its width (8-byte words, 4-byte fields, COPY bytes, 16-byte TLS
descriptors), becomes a "piece" of one aligned 64-bit word; the final value of each word
touched is computed in bulk as sequential application would leave it, and written by ONE
``write_words``. Words only partly covered are read from memory first (once, page by page).
The order is: RELATIVE entries and DT_RELR, then every other entry in table order. Entries
whose value comes out of an IFUNC resolver (IRELATIVE, and slots bound to the object's own
STT_GNU_IFUNC symbols) are written by a second ``write_words``, after the resolvers ran with
everything else in place (as glibc runs them after the relocations before them); their words
still hold what sequential application gives.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from loader.elf import ElfImage
from loader.elfdefs import MASK64, PF, R_X86_64, SHN, STT, st_type
from loader.errors import ElfRelocationError, ElfSymbolError
from loader.mmap import Mmap, ProtFlags, Runner, call_function, code_runner
from loader.symbols import Resolution, Resolver
from loader.tables import DynamicTables, RelocTable

__all__ = [
    "Classified",
    "Kind",
    "RelocContext",
    "RelocOutcome",
    "Rule",
    "TlsLayout",
    "X86_64",
    "check_relocations",
    "classify",
    "first_outside_code",
    "relocate",
    "type_name",
]


class Kind(enum.Enum):
    """The generic relocation kinds; an architecture maps its numbers onto these."""

    NONE = "none"
    RELATIVE = "relative"      # B + A
    ABSOLUTE = "absolute"      # S + A (or S)
    PCREL = "pcrel"            # S + A - P
    COPY = "copy"              # copy min(ref, def) st_size bytes from S to P
    IRELATIVE = "irelative"    # resolver(B + A)()
    TLS_MODULE = "tls_module"  # module id of the defining object
    TLS_DTPOFF = "tls_dtpoff"  # S.st_value + A (offset in its TLS block)
    TLS_TPOFF = "tls_tpoff"    # S.st_value + A - tls offset (static TLS, variant II)
    TLS_DESC = "tls_desc"      # a (function, argument) pair; static TLS: argument = TPOFF


class Rule(NamedTuple):
    """One type: its name, kind, width in bytes, whether the addend is used (S+A vs S), and
    whether a 4-byte value must fit as a signed field (PC32, 32S) rather than unsigned."""

    name: str
    kind: Kind
    width: int
    addend: bool
    signed: bool = False


def _rule(r_type: R_X86_64, kind: Kind, width: int, addend: bool, signed: bool = False
          ) -> tuple[int, Rule]:
    """One row of the table, named as the psABI names the type."""
    return int(r_type), Rule(r_type.psabi_name, kind, width, addend, signed)


X86_64: dict[int, Rule] = dict([
    _rule(R_X86_64.NONE, Kind.NONE, 0, False),
    _rule(R_X86_64.R64, Kind.ABSOLUTE, 8, True),
    _rule(R_X86_64.PC32, Kind.PCREL, 4, True, signed=True),
    _rule(R_X86_64.COPY, Kind.COPY, 0, False),
    _rule(R_X86_64.GLOB_DAT, Kind.ABSOLUTE, 8, False),
    _rule(R_X86_64.JUMP_SLOT, Kind.ABSOLUTE, 8, False),
    _rule(R_X86_64.RELATIVE, Kind.RELATIVE, 8, True),
    _rule(R_X86_64.R32, Kind.ABSOLUTE, 4, True),
    _rule(R_X86_64.R32S, Kind.ABSOLUTE, 4, True, signed=True),
    _rule(R_X86_64.DTPMOD64, Kind.TLS_MODULE, 8, False),
    _rule(R_X86_64.DTPOFF64, Kind.TLS_DTPOFF, 8, True),
    _rule(R_X86_64.TPOFF64, Kind.TLS_TPOFF, 8, True),
    _rule(R_X86_64.PC64, Kind.PCREL, 8, True),
    _rule(R_X86_64.IRELATIVE, Kind.IRELATIVE, 8, True),
    _rule(R_X86_64.TLSDESC, Kind.TLS_DESC, 16, True),
    _rule(R_X86_64.RELATIVE64, Kind.RELATIVE, 8, True),
])
"""The x86-64 relocation table: the one place a type number gets its meaning."""

_SYMBOLIC = (Kind.ABSOLUTE, Kind.PCREL, Kind.COPY, Kind.TLS_MODULE, Kind.TLS_DTPOFF,
             Kind.TLS_TPOFF, Kind.TLS_DESC)
_PLAIN = (Kind.RELATIVE, Kind.NONE, Kind.COPY)     # not computed per entry by _table_pieces
_JUMP_SLOT = int(R_X86_64.JUMP_SLOT)
_U64 = np.uint64


# numpy compares an array with an IntEnum member about five times slower than with a plain
# int (it inspects the member's type on every call): the comparisons over whole tables use
# the numbers as ints.
_SHN_UNDEF, _SHN_ABS = int(SHN.UNDEF), int(SHN.ABS)
_STT_TLS, _STT_GNU_IFUNC = int(STT.TLS), int(STT.GNU_IFUNC)


def type_name(r_type: int) -> str:
    """``R_X86_64_...`` for a known type, else ``"type N"``."""
    rule = X86_64.get(r_type)
    return rule.name if rule else f"type {r_type}"


# The table's columns as arrays indexed by type number, derived from X86_64 for lookups over
# whole tables. The last slot is no type: types past the table clip to it (unknown).
_KINDS = list(Kind)
_UNKNOWN = len(_KINDS)
_TYPE_SLOTS = max(X86_64) + 2


def _column(value: Callable[[Rule], int], fill: int, dtype: Any) -> npt.NDArray[Any]:
    """One column of X86_64 as an array by type number (``fill`` for unknown types)."""
    col = np.full(_TYPE_SLOTS, fill, dtype=dtype)
    for t, rule in X86_64.items():
        col[t] = value(rule)
    return col


_KIND_COLUMN = _column(lambda r: _KINDS.index(r.kind), _UNKNOWN, np.uint8)
_WIDTH_COLUMN = _column(lambda r: r.width, 0, np.uint64)
_ADDEND_COLUMN = _column(lambda r: r.addend, False, np.bool_)
_SIGNED_COLUMN = _column(lambda r: r.signed, False, np.bool_)


def _lookup(column: npt.NDArray[Any], r_type: npt.NDArray[np.uint32]) -> npt.NDArray[Any]:
    """``column``'s value for each type (unknown types: the last slot)."""
    out: npt.NDArray[Any] = np.take(column, r_type, mode="clip")
    return out


def _kinds(table: RelocTable) -> npt.NDArray[np.uint8]:
    """Per entry of ``table``, the position of its kind in ``Kind`` (``_UNKNOWN``: no type
    of the table)."""
    return _lookup(_KIND_COLUMN, table.r_type)


_POSITION = {kind: np.uint8(i) for i, kind in enumerate(_KINDS)}


def is_kind(kinds: npt.NDArray[np.uint8], *wanted: Kind) -> npt.NDArray[np.bool_]:
    """Which of ``kinds`` (a table's classified kinds: ``Classified.kinds_all``) are one of
    ``wanted`` (one comparison per kind: a fraction of a table lookup's cost on a large
    table)."""
    out: npt.NDArray[np.bool_] = kinds == _POSITION[wanted[0]]
    for kind in wanted[1:]:
        out |= kinds == _POSITION[kind]
    return out


Kinds = list[npt.NDArray[np.uint8]]
"""``_kinds`` of each table of ``DynamicTables.relocs``, in order: computed once per pass."""


def _kinds_all(tables: DynamicTables) -> Kinds:
    """``_kinds`` of every relocation table."""
    return [_kinds(table) for table in tables.relocs]


@dataclass(frozen=True, slots=True)
class Classified:
    """The relocations sorted out once per load (``classify``): each table's kinds
    (``_kinds``) and the symbols the symbolic entries use (``_needed_symbols``).
    ``check_relocations`` computes it and ``relocate`` reuses it (through
    ``RelocContext.classified``), so no pass over a large table is made twice for them."""

    kinds_all: Kinds
    needed: npt.NDArray[np.int64]

    def of_kind(self, *wanted: Kind) -> list[npt.NDArray[np.bool_]]:
        """Per table, which entries are one of ``wanted``."""
        return [is_kind(kinds, *wanted) for kinds in self.kinds_all]


def classify(tables: DynamicTables) -> Classified:
    """The kinds of every table's entries and the symbols they use."""
    kinds_all = _kinds_all(tables)
    return Classified(kinds_all, _needed_symbols(tables, kinds_all))


@dataclass(frozen=True, slots=True)
class TlsLayout:
    """Where the object's TLS block sits in the simulated static TLS (glibc's variant II:
    blocks below the thread pointer). ``module_id`` is what DTPMOD64 stores; ``tp_offset``
    is the block's distance below the thread pointer, None for a block in dynamic TLS
    (allocated per thread on first use: initial-exec TPOFF64 cannot reach it).
    ``descriptor``: for a dynamic-TLS block, ``(module id, offset) -> (function, argument)``,
    the words of a TLS descriptor (the host's ``loader.hosttls.HostTls``); None: a TLSDESC
    against the block is refused as TPOFF64 is."""

    module_id: int
    tp_offset: int | None
    descriptor: Callable[[int, int], tuple[int, int]] | None = None

    @classmethod
    def first_static(cls, image: ElfImage, module_id: int = 1) -> TlsLayout | None:
        """The layout glibc gives the first static TLS block: offset rounded up to p_align,
        keeping the block's first byte congruent to p_vaddr (glibc's ``firstbyte``)."""
        tls = image.tls
        if tls is None:
            return None
        align = max(tls.p_align, 1)
        firstbyte = -tls.p_vaddr & (align - 1)
        offset = (tls.p_memsz - firstbyte + align - 1) // align * align + firstbyte
        return cls(module_id, offset)


# ---------------------------------------------------------------------------------------------
# Where things are: segments as sorted arrays, looked up with one searchsorted


def _segment_of(starts: npt.NDArray[np.uint64], vaddrs: npt.NDArray[np.uint64]
                ) -> npt.NDArray[np.int64]:
    """Index of the last segment starting at or below each vaddr (-1: below all). The
    PT_LOADs are sorted and disjoint (parse checked), so that is the only candidate."""
    seg: npt.NDArray[np.int64] = np.searchsorted(starts, vaddrs, side="right").astype(
        np.int64) - 1
    return seg


OWN_CODE = "must lie inside the file bytes of an executable PT_LOAD (the object's own code)"
"""What every address the loader calls must satisfy (the limit of its ElfError)."""


def first_outside_code(image: ElfImage, vaddrs: npt.NDArray[np.uint64] | list[int]
                       ) -> int | None:
    """The first of ``vaddrs`` that is not code the loader may call, or None when all are.

    Callable means inside ``[p_vaddr, p_vaddr + p_filesz)`` of an executable PT_LOAD
    (``ElfImage.code_ranges``). Every address the loader calls (IFUNC resolvers, init and
    fini functions) is checked with this before any call. A list (the few init and fini
    functions, one symbol) is checked in plain Python: for a handful of addresses numpy's
    cost per call is most of the check's; an array (a table's resolvers) with numpy.
    """
    code = image.code_ranges()
    if isinstance(vaddrs, list):
        return next((v for v in vaddrs if not any(lo <= v < hi for lo, hi in code)), None)
    v = np.asarray(vaddrs, dtype=np.uint64)
    inside = np.zeros(len(v), dtype=bool)
    for lo, hi in code:
        inside |= (v >= _U64(lo)) & (v < _U64(hi))
    return None if inside.all() else int(v[~inside][0])


def _segment_arrays(image: ElfImage, textrel: bool
                    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Starts and ends of the segments relocations may write (writable, or all with TEXTREL)."""
    cols = image.columns
    sel = ((cols.flags & int(PF.W)) != 0) | textrel     # int(): see _SHN_UNDEF
    return cols.starts[sel], cols.ends[sel]


FEW_SEGMENTS = 4
"""Up to this many writable segments, ``_room`` compares each offset with each segment
(a few cheap passes); past it, one binary search per offset (a hostile file may have
thousands of PT_LOADs, and a pass per segment would then cost their product)."""


def _room(offs: npt.NDArray[np.uint64], starts: npt.NDArray[np.uint64],
          ends: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Bytes from each offset to the end of the writable segment holding it (0 if none).
    The segments are sorted and disjoint. Real files have one or two writable segments:
    then a comparison pass per segment is four times cheaper than ``np.searchsorted``
    (libcrypto's 18k RELA offsets: 23 against 109 us). With more, the one starting last at
    or below an offset is the only candidate, found by one searchsorted straight into the
    ends with a 0 in front (so an offset below every segment reads end 0, outside)."""
    if len(ends) <= FEW_SEGMENTS:
        room = np.zeros(len(offs), dtype=np.uint64)
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            inside = (offs >= _U64(start)) & (offs < _U64(end))
            np.subtract(_U64(end), offs, out=room, where=inside)
        return room
    end_of = np.concatenate([np.zeros(1, np.uint64), ends])[
        np.searchsorted(starts, offs, side="right")]
    return np.where(offs < end_of, end_of - offs, _U64(0))


def _check_targets(name: str, offs: npt.NDArray[np.uint64], widths: npt.NDArray[np.uint64],
                   starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64]) -> None:
    """Every ``[off, off+width)`` with width > 0 inside one writable segment, else
    ElfRelocationError naming the first bad offset."""
    if len(offs) == 0:
        return
    ok = (widths <= _room(offs, starts, ends)) | (widths == 0)
    if not ok.all():
        bad = int(offs[~ok][0])
        raise ElfRelocationError(f"{name} r_offset", bad,
                                 "inside a writable PT_LOAD (or any PT_LOAD with TEXTREL)")


def _symbol_text(tables: DynamicTables, sym: int) -> str:
    """Symbol ``sym``'s name for an error message (its index when the name is unreadable)."""
    try:
        return repr(tables.name(int(tables.symtab[sym]["st_name"])))
    except ValueError:
        return f"symbol {sym}"


def _check_copies(tables: DynamicTables, table: RelocTable, copy: npt.NDArray[np.bool_],
                  starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64]) -> int:
    """COPY entries: a symbol each, and its st_size within the bytes from r_offset to the end
    of the writable PT_LOAD there (ElfSymbolError naming the symbol). Returns their bytes."""
    syms = table.r_sym[copy]
    offs = table.r_offset[copy]
    if (syms == 0).any():
        raise ElfSymbolError(f"{table.name} r_sym", 0,
                             f"a symbol for the COPY relocation at {int(offs[syms == 0][0]):#x}")
    sizes = tables.symtab["st_size"][syms].astype(np.uint64)
    room = _room(offs, starts, ends)
    bad = (room > 0) & (sizes > room)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ElfSymbolError(
            f"{table.name} R_X86_64_COPY st_size of {_symbol_text(tables, int(syms[k]))}",
            int(sizes[k]), f"at most {int(room[k]):#x}, the bytes from r_offset "
            f"{int(offs[k]):#x} to the end of its writable PT_LOAD")
    return int(sizes[room > 0].astype(object).sum())


def check_relocations(image: ElfImage, tables: DynamicTables, textrel: bool) -> Classified:
    """Every type known, every target inside a writable segment, every COPY sized to fit,
    every resolver the object's own code, before any memory is touched. Raises
    ElfRelocationError / ElfSymbolError. Returns what it classified, for ``relocate``."""
    starts, ends = _segment_arrays(image, textrel)
    copied = 0
    classified = classify(tables)
    kinds_all = classified.kinds_all
    for table, kinds in zip(tables.relocs, kinds_all, strict=True):
        known = kinds != _UNKNOWN
        if not known.all():
            bad = int(table.r_type[~known][0])
            raise ElfRelocationError(f"{table.name} r_type", bad,
                                     "a supported x86-64 type " + str(sorted(X86_64)))
        widths = _lookup(_WIDTH_COLUMN, table.r_type)
        copy = is_kind(kinds, Kind.COPY)
        if copy.any():
            copied += _check_copies(tables, table, copy, starts, ends)
            widths[copy] = tables.symtab["st_size"][table.r_sym[copy]]
        _check_targets(table.name, table.r_offset, widths, starts, ends)
    writable = int((ends - starts).astype(object).sum()) if len(ends) else 0
    if copied > writable:
        raise ElfRelocationError("R_X86_64_COPY total st_size", copied,
                                 f"at most the {writable:#x} bytes of the writable PT_LOADs")
    _check_targets("DT_RELR", tables.relr, np.full(len(tables.relr), 8, np.uint64),
                   starts, ends)
    _check_ifunc_resolvers(image, tables, classified.needed, kinds_all)
    _check_definitions(image, tables, classified.needed)
    return classified


def _check_definitions(image: ElfImage, tables: DynamicTables, needed: npt.NDArray[np.int64]
                       ) -> None:
    """A symbol the object defines and its relocations use (so it may bind to itself) must
    point inside the object's PT_LOADs (SHN_ABS and TLS symbols excepted): otherwise a GOT
    slot would send a call into some other mapping. (Its end counts: ``_end`` points there.)
    ``needed``: the symbols the relocations use (``_needed_symbols``)."""
    syms = tables.symtab
    shndx = syms["st_shndx"][needed]
    own = (shndx != _SHN_UNDEF) & (shndx != _SHN_ABS) \
        & (st_type(syms["st_info"][needed]) != _STT_TLS)
    values = syms["st_value"][needed[own]].astype(np.uint64)
    if not len(values):
        return
    starts, ends = image.columns.starts, image.columns.ends
    seg = _segment_of(starts, values)
    ok = (seg >= 0) & (values <= ends[np.clip(seg, 0, None)])
    if not ok.all():
        bad = int(needed[own][~ok][0])
        raise ElfSymbolError(f"symbol {bad} st_value", int(values[~ok][0]),
                             "inside a PT_LOAD (the object defines it)")


def _own_ifunc(tables: DynamicTables) -> npt.NDArray[np.bool_]:
    """Per symbol: an STT_GNU_IFUNC the object defines (its value is a resolver)."""
    return _own_ifunc_of(tables.symtab)


def _own_ifunc_of(syms: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """``_own_ifunc`` of the symbol table ``syms``."""
    own: npt.NDArray[np.bool_] = ((st_type(syms["st_info"]) == _STT_GNU_IFUNC)
                                  & (syms["st_shndx"] != _SHN_UNDEF))
    return own


def _check_ifunc_resolvers(image: ElfImage, tables: DynamicTables,
                           needed: npt.NDArray[np.int64], kinds_all: Kinds) -> None:
    """Every resolver the host would call must be the object's own code (``first_outside_code``):
    IRELATIVE resolvers (B + A) and the IFUNC symbols the relocations reference. A call
    into data, past a segment's end or into nowhere is an ElfRelocationError, not a crash.
    ``needed``: the symbols the relocations use (``_needed_symbols``)."""
    for table, kinds in zip(tables.relocs, kinds_all, strict=True):
        mask = is_kind(kinds, Kind.IRELATIVE)
        if not mask.any():
            continue
        bad = first_outside_code(image, _addends(image, table, mask))
        if bad is not None:
            raise ElfRelocationError(f"{table.name} R_X86_64_IRELATIVE resolver", bad,
                                     OWN_CODE)
    ifunc = needed[_own_ifunc(tables)[needed]]
    bad = first_outside_code(image, tables.symtab["st_value"][ifunc])
    if bad is not None:
        sym = int(ifunc[tables.symtab["st_value"][ifunc] == bad][0])
        raise ElfRelocationError(f"STT_GNU_IFUNC {_symbol_text(tables, sym)} resolver", bad,
                                 OWN_CODE)


# ---------------------------------------------------------------------------------------------
# Values: the bytes the file holds, addends, and each kind's formula over whole tables


def _file_span(image: ElfImage, offsets: npt.NDArray[np.int64], width: int
               ) -> tuple[npt.NDArray[np.uint8], int]:
    """The file's bytes from the lowest of ``offsets`` to ``width`` past the highest (each
    field inside the file), in one read; and that lowest offset."""
    if not len(offsets):
        return np.zeros(0, dtype=np.uint8), 0
    lo, hi = int(offsets.min()), int(offsets.max()) + width
    return np.frombuffer(image.read(lo, hi - lo), dtype=np.uint8), lo


def _file_value(image: ElfImage, vaddrs: npt.NDArray[np.uint64], width: int
                ) -> npt.NDArray[np.uint64]:
    """The little-endian ``width``-byte (at most 8) values the file holds at ``vaddrs``; a
    byte outside every segment's file part is 0, as memory holds it before relocation.
    Fields wholly inside one segment's file part (all, in practice) are gathered a byte
    column at a time; only the others are looked up byte by byte."""
    starts, file_ends, offsets = (image.columns.starts, image.columns.file_ends,
                                  image.columns.offsets)
    v = vaddrs.astype(np.uint64)
    seg = _segment_of(starts, v)
    at = np.clip(seg, 0, None)
    whole = (seg >= 0) & (v + _U64(width) <= file_ends[at]) & (v + _U64(width) > v)
    out = np.zeros(len(v), dtype=np.uint64)
    first = (v[whole] - starts[at[whole]] + offsets[at[whole]]).astype(np.int64)
    gathered = np.zeros(len(first), dtype=np.uint64)
    raw, lo = _file_span(image, first, width)
    for k in range(width):
        gathered |= raw[first - lo + k].astype(np.uint64) << _U64(8 * k)
    out[whole] = gathered
    rest = np.flatnonzero(~whole)
    if len(rest):
        addr = np.add.outer(v[rest], np.arange(width, dtype=np.uint64), dtype=np.uint64)
        bseg = _segment_of(starts, addr)
        bat = np.clip(bseg, 0, None)
        ok = (bseg >= 0) & (addr < file_ends[bat]) & (addr >= v[rest][:, None])
        part = np.zeros(addr.shape, dtype=np.uint64)
        at_file = (addr[ok] - starts[bat[ok]] + offsets[bat[ok]]).astype(np.int64)
        raw, lo = _file_span(image, at_file, 1)
        part[ok] = raw[at_file - lo]
        out[rest] = (part << (_U64(8) * np.arange(width, dtype=np.uint64))).sum(
            axis=1, dtype=np.uint64)
    return out


def _file_words(image: ElfImage, vaddrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The 64-bit words the file holds at ``vaddrs``: the implicit addends of REL and RELR,
    read from the file (the content before any relocation), so no memory read is needed."""
    return _file_value(image, vaddrs, 8)


def _file_int32(image: ElfImage, vaddrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The signed 32-bit fields the file holds at ``vaddrs``, sign-extended (two's
    complement in uint64): the implicit addends of 4-byte REL entries."""
    fields = _file_value(image, vaddrs, 4).astype(np.uint32).view(np.int32)
    out: npt.NDArray[np.uint64] = fields.astype(np.int64).view(np.uint64)
    return out


def _addends(image: ElfImage, table: RelocTable,
             mask: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """A (as uint64, two's complement) of the entries ``mask`` selects (a mask or positions):
    explicit (RELA), or for REL the file's content at the place, as wide as the field (4-byte
    types: sign-extended)."""
    if not table.implicit:
        return table.r_addend[mask].view(np.uint64)
    offs = table.r_offset[mask]
    narrow = _lookup(_WIDTH_COLUMN, table.r_type[mask]) == 4
    out = np.zeros(len(offs), dtype=np.uint64)
    out[~narrow] = _file_words(image, offs[~narrow])
    out[narrow] = _file_int32(image, offs[narrow])
    return out


def _sorted_unique(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The distinct values, sorted (a sort and a neighbour test: no hashing)."""
    ordered = np.sort(values)
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    out: npt.NDArray[np.uint64] = ordered[keep]
    return out


def _members(values: npt.NDArray[np.uint64], of: npt.NDArray[np.uint64]
             ) -> npt.NDArray[np.bool_]:
    """Which of ``values`` are among ``of``: ``np.isin`` by one searchsorted into ``of``
    sorted (a few deferred words among a table's: a tenth of isin's cost, which sorts
    both together)."""
    keys = _sorted_unique(of)
    if not len(keys):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    found: npt.NDArray[np.bool_] = keys[at] == values
    return found


@dataclass(slots=True)
class RelocOutcome:
    """What relocation did: counts per type, unresolved symbols, what only the host can do.

    ``warnings``: what glibc would print and go on (a COPY whose definition has another size
    than the reference: glibc copies the smaller and says so)."""

    applied: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    unresolved: list[str] = field(default_factory=list)
    irelative: list[tuple[int, int]] = field(default_factory=list)   # (place, resolver)
    ran_resolvers: bool = False     # True: the places hold what the resolvers chose (host)
    tlsdesc: list[int] = field(default_factory=list)   # places whose function word is 0
    extern: dict[str, int] = field(default_factory=dict)
    extern_range: tuple[int, int] | None = None
    tls: TlsLayout | None = None
    warnings: list[str] = field(default_factory=list)


Words = list[npt.NDArray[np.uint64]]


def _relative_words(image: ElfImage, tables: DynamicTables, kinds_all: Kinds, bias: int,
                    out: RelocOutcome, places: Words, values: Words) -> None:
    """Every RELATIVE entry and every RELR target, B + A, appended to the scatter lists."""
    b = _U64(bias & MASK64)
    for table, kinds in zip(tables.relocs, kinds_all, strict=True):
        mask = is_kind(kinds, Kind.RELATIVE)
        if mask.any():
            places.append(table.r_offset[mask] + b)
            values.append(_addends(image, table, mask) + b)
            out.by_type["R_X86_64_RELATIVE"] += int(mask.sum())
    if len(tables.relr):
        places.append(tables.relr + b)
        values.append(_file_words(image, tables.relr) + b)
        out.by_type["R_X86_64_RELATIVE"] += len(tables.relr)


def _needed_symbols(tables: DynamicTables, kinds_all: Kinds) -> npt.NDArray[np.int64]:
    """Unique nonzero symbol indices referenced by symbolic relocations (a mark array, O(n))."""
    mark = np.zeros(tables.nsyms, dtype=bool)
    for t, kinds in zip(tables.relocs, kinds_all, strict=True):
        mark[t.r_sym[is_kind(kinds, *_SYMBOLIC)]] = True
    if len(mark):
        mark[0] = False
    idx: npt.NDArray[np.int64] = np.flatnonzero(mark).astype(np.int64)
    return idx


def call_ifunc(resolver_addr: int, runner: Runner | None = None) -> int:
    """Run an IFUNC resolver (in this process, or on the backend's CPU: ``runner``) and
    return what it selects."""
    return call_function(runner, resolver_addr)


def _run_resolvers(targets: npt.NDArray[np.uint64], runs_code: bool,
                   runner: Runner | None = None) -> npt.NDArray[np.uint64]:
    """What each resolver in ``targets`` selects: on the host, each distinct resolver called
    once; elsewhere the resolver's own address (nothing can run)."""
    if not runs_code or not len(targets):
        return targets.copy()
    distinct, first, back = np.unique(targets, return_index=True, return_inverse=True)
    chosen = np.zeros(len(distinct), dtype=np.uint64)
    for k in np.argsort(first, kind="stable").tolist():     # in table order
        chosen[k] = call_ifunc(int(distinct[k]), runner)
    out: npt.NDArray[np.uint64] = chosen[back.ravel()]
    return out


class _Pieces:
    """Stores in sequence order: ``place``, ``width`` (1..8 bytes), ``value`` (its low
    ``width`` bytes are stored), ``deferred`` (the value comes from a resolver: filled in
    after the first write). ``key`` orders them: entries in table order."""

    def __init__(self) -> None:
        self.parts: list[tuple[npt.NDArray[Any], ...]] = []

    def add(self, key: npt.NDArray[np.int64], place: npt.NDArray[np.uint64],
            width: npt.NDArray[np.uint64], value: npt.NDArray[np.uint64],
            deferred: npt.NDArray[np.bool_]) -> None:
        """Append stores (arrays of one length)."""
        if len(place):
            self.parts.append((key, place, width, value, deferred))

    def arrays(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64],
                              npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        """(place, width, value, deferred), stably sorted by key. Empties the list (the
        parts are not needed twice, and a large table should not be held twice)."""
        parts, self.parts = self.parts, []
        if not parts:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, empty, empty, np.zeros(0, dtype=bool)
        keys = np.concatenate([p[0] for p in parts])
        cols = [np.concatenate([p[i] for p in parts]) for i in range(1, 5)]
        if len(keys) > 1 and not bool((keys[1:] >= keys[:-1]).all()):
            order = np.argsort(keys, kind="stable")
            cols = [col[order] for col in cols]
        return cols[0], cols[1], cols[2], cols[3]


@dataclass(frozen=True, slots=True)
class RelocContext:
    """Where one relocation pass works: the object (``image``, ``tables``), the backend
    ``mm``, the load ``bias``, whether the backend is this process (``runs_code``: IFUNC
    resolvers may be called) and an address ``near`` the object (a stub resolver puts its
    extern mapping there). ``classified``: what ``check_relocations`` returned for these
    tables (None: ``relocate`` classifies them itself)."""

    image: ElfImage
    tables: DynamicTables
    mm: Mmap
    bias: int
    runs_code: bool
    near: int
    classified: Classified | None = None
    lazy: bool = False
    """JUMP_SLOTs keep their lazy value (the PLT address the file holds, plus the bias)."""


@dataclass(slots=True)
class _Context:
    """What computing a table's values needs: where the pass works, what the symbols bound
    to, and what relocation did so far."""

    where: RelocContext
    kinds_all: Kinds
    res: Resolution
    out: RelocOutcome
    syms: npt.NDArray[Any]                 # the symbol table (the null symbol when empty)
    addr: npt.NDArray[np.uint64]           # per symbol: what it is bound to (0: nothing)
    ifunc_bound: npt.NDArray[np.bool_]     # per symbol: bound to its own IFUNC resolver

    @property
    def b(self) -> np.uint64:
        """The load bias B as a uint64 (modulo 2**64)."""
        return _U64(self.where.bias & MASK64)

    @property
    def tables(self) -> DynamicTables:
        """The object's dynamic tables."""
        return self.where.tables


_EntryColumns = tuple[npt.NDArray[Any], ...]
"""key, kinds, r_type, sym, P, A of some entries (``_Entries``' columns, in that order)."""


@dataclass(frozen=True, slots=True)
class _Entries:
    """The entries whose values are computed one by one (not RELATIVE, NONE or COPY), of
    every table at once, in sequence order, column by column: ``key`` (the entry's position
    over all tables), kinds, type numbers, symbols, places P (absolute) and addends A.
    One set of columns for all tables: each numpy call of a pass runs once per load, not
    once per table (the calls, not the entries, are most of the cost). ``names`` and
    ``firsts``: each table's name and first key, to name the table of an entry in an error."""

    key: npt.NDArray[np.int64]
    kinds: npt.NDArray[np.uint8]
    r_type: npt.NDArray[np.uint32]
    sym: npt.NDArray[np.int64]
    p: npt.NDArray[np.uint64]
    a: npt.NDArray[np.uint64]
    names: tuple[str, ...]
    firsts: npt.NDArray[np.int64]

    @classmethod
    def computed(cls, ctx: _Context) -> _Entries:
        """Every table's computed entries (``ctx.kinds_all`` says which), addends included."""
        image, tables = ctx.where.image, ctx.tables
        parts: list[_EntryColumns] = []
        sizes = np.array([len(t) for t in tables.relocs], dtype=np.int64)
        firsts = np.cumsum(sizes) - sizes
        for table, kinds, first in zip(tables.relocs, ctx.kinds_all, firsts.tolist(),
                                       strict=True):
            idx = np.flatnonzero(~is_kind(kinds, *_PLAIN))
            if len(idx):
                parts.append((idx + first, kinds[idx], table.r_type[idx], table.r_sym[idx],
                              table.r_offset[idx] + ctx.b, _addends(image, table, idx)))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            parts.append((empty, empty.astype(np.uint8), empty.astype(np.uint32), empty,
                          empty.astype(np.uint64), empty.astype(np.uint64)))
        cols = parts[0] if len(parts) == 1 else \
            tuple(np.concatenate(col) for col in zip(*parts, strict=True))
        return cls(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5],
                   tuple(t.name for t in tables.relocs), firsts)

    def where(self, sel: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> _Entries:
        """The entries selected by ``sel`` (a mask or positions)."""
        return _Entries(self.key[sel], self.kinds[sel], self.r_type[sel], self.sym[sel],
                        self.p[sel], self.a[sel], self.names, self.firsts)

    def table_name(self, k: int) -> str:
        """The name of the table entry ``k`` comes from."""
        return self.names[int(np.searchsorted(self.firsts, self.key[k], side="right")) - 1]


def _tls_values(ctx: _Context, kind: Kind, sym: npt.NDArray[np.int64],
                a: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """DTPMOD64 / DTPOFF64 / TPOFF64 against the object's own static TLS block; those of a
    TLS symbol defined elsewhere come from the resolver's scope when it knew them.

    A TLS symbol the object does not define itself has no block here: it gets module 0,
    offset 0 (the resolver listed it as unresolved unless its scope knew it)."""
    syms = ctx.syms
    st_value = np.where(sym == 0, _U64(0), syms["st_value"][sym].astype(np.uint64))
    own = _own_tls(ctx, sym)
    tls = ctx.out.tls
    if ctx.res.tls is not None:
        return _scope_tls_values(ctx, kind, sym, a)
    value = np.zeros(len(sym), dtype=np.uint64)
    if tls is not None:
        if kind is Kind.TLS_MODULE:
            value = np.full(len(sym), tls.module_id, dtype=np.uint64)
        elif kind is Kind.TLS_DTPOFF:
            value = st_value + a
        elif own.any():
            value = st_value + a - _U64(_static_offset(tls) & MASK64)
        value = np.where(own, value, _U64(0))
    scope = _scope_tls(ctx.res, kind)
    if scope:
        known = np.zeros(len(syms), dtype=bool)
        found = np.zeros(len(syms), dtype=np.uint64)
        idx = np.fromiter(scope, dtype=np.int64, count=len(scope))
        known[idx] = True
        found[idx] = [v & MASK64 for v in scope.values()]
        value = np.where(known[sym], found[sym] + (0 if kind is Kind.TLS_MODULE else a), value)
    out: npt.NDArray[np.uint64] = value
    return out


def _scope_tls_values(ctx: _Context, kind: Kind, sym: npt.NDArray[np.int64],
                      a: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The TLS kinds when a process image looked every TLS symbol up (``Resolution.tls``):
    symbol 0 (a local-dynamic or own-module entry) is the object's own module."""
    tls, defs = ctx.out.tls, ctx.res.tls
    assert defs is not None
    own = sym == 0
    own_module = tls.module_id if tls is not None else 0
    if kind is Kind.TLS_MODULE:
        out: npt.NDArray[np.uint64] = np.where(own, _U64(own_module), defs.module[sym])
        return out
    if kind is Kind.TLS_DTPOFF:
        out = np.where(own, a, defs.value[sym] + a)
        return out
    offset = defs.offset[sym]
    if own.any():
        offset = np.where(own, -1 if tls is None or tls.tp_offset is None else tls.tp_offset,
                          offset)
    if (offset < 0).any():
        k = int(np.flatnonzero(offset < 0)[0])
        raise ElfRelocationError(f"R_X86_64_TPOFF64 of symbol {int(sym[k])}",
                                 int(defs.module[sym[k]]) if sym[k] else own_module,
                                 "a module in static TLS (initial-exec access cannot reach "
                                 "a module in dynamic TLS)")
    out = np.where(own, a, defs.value[sym] + a) - offset.astype(np.uint64)
    return out


def _scope_tls(res: Resolution, kind: Kind) -> dict[int, int]:
    """What the resolver's scope said of TLS symbols defined elsewhere, for ``kind``:
    thread-pointer offsets (TPOFF), module ids (DTPMOD) or offsets in the block (DTPOFF)."""
    if kind is Kind.TLS_TPOFF:
        return res.tls_tpoff
    part = 0 if kind is Kind.TLS_MODULE else 1
    return {i: pair[part] for i, pair in res.tls_module.items()}


def _own_tls(ctx: _Context, sym: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of ``sym`` name the object's own TLS block: symbol 0 (local-dynamic) or a TLS
    symbol the object defines."""
    syms = ctx.syms
    own: npt.NDArray[np.bool_] = (sym == 0) | ((syms["st_shndx"][sym] != _SHN_UNDEF)
                                               & (st_type(syms["st_info"][sym]) == _STT_TLS))
    return own


def _static_offset(tls: TlsLayout) -> int:
    """The object's static TLS offset, for TPOFF64; ElfRelocationError when its block is
    in dynamic TLS (an initial-exec access cannot reach it)."""
    if tls.tp_offset is None:
        raise ElfRelocationError("R_X86_64_TPOFF64 against the object's own TLS module",
                                 tls.module_id, "a module in static TLS (this one is in "
                                 "dynamic TLS: initial-exec access needs static TLS)")
    return tls.tp_offset


def _exact(s: npt.NDArray[np.uint64], a: npt.NDArray[np.uint64], p: npt.NDArray[np.uint64]
           ) -> npt.NDArray[Any]:
    """S + A - P as exact integers (A signed): int64 where no term can overflow, Python ints
    (an object array) for the rare entries with huge terms."""
    sa = a.view(np.int64)
    limit = 1 << 61
    safe = (s < _U64(limit)) & (p < _U64(limit)) & (sa > -limit) & (sa < limit)
    if safe.all():
        exact: npt.NDArray[Any] = s.astype(np.int64) + sa - p.astype(np.int64)
        return exact
    big: npt.NDArray[Any] = (s.astype(object) + sa.astype(object)) - p.astype(object)
    return big


def _check_fit(e: _Entries, s: npt.NDArray[np.uint64], a: npt.NDArray[np.uint64]) -> None:
    """The 4-byte entries ``e`` (S + A, or S + A - P for PCREL) must fit their field: signed
    where the table says so. ElfRelocationError naming the first that does not."""
    exact = _exact(s, a, np.where(is_kind(e.kinds, Kind.PCREL), e.p, _U64(0)))
    signed = _lookup(_SIGNED_COLUMN, e.r_type)
    lo = np.where(signed, -(1 << 31), 0)
    hi = np.where(signed, (1 << 31) - 1, (1 << 32) - 1)
    ok = np.asarray((exact >= lo) & (exact <= hi), dtype=bool)
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        rule = X86_64[int(e.r_type[k])]
        raise ElfRelocationError(f"{e.table_name(k)} {rule.name} value at {int(e.p[k]):#x}",
                                 int(exact[k]), f"within [{int(lo[k]):#x}, {int(hi[k]):#x}]")


def _symbol_values(e: _Entries, s: npt.NDArray[np.uint64], a: npt.NDArray[np.uint64]
                   ) -> npt.NDArray[np.uint64]:
    """ABSOLUTE (S + A, or S) and PCREL (S + A - P), modulo 2**64."""
    with_a = np.where(_lookup(_ADDEND_COLUMN, e.r_type), a, _U64(0))
    out: npt.NDArray[np.uint64] = s + with_a - np.where(is_kind(e.kinds, Kind.PCREL), e.p, _U64(0))
    return out


def _check_narrow(e: _Entries, width: npt.NDArray[np.uint64], s: npt.NDArray[np.uint64],
                  a: npt.NDArray[np.uint64], skip: npt.NDArray[np.bool_] | None = None) -> None:
    """``_check_fit`` on the 4-byte entries (except those ``skip`` marks)."""
    narrow = (width == 4) if skip is None else (width == 4) & ~skip
    at = np.flatnonzero(narrow)
    if len(at):
        _check_fit(e.where(at), s[at], a[at])


def _computed_values(ctx: _Context, e: _Entries, a: npt.NDArray[np.uint64]
                     ) -> npt.NDArray[np.uint64]:
    """Each entry's value before any resolver runs: the symbolic formula, the TLS kinds, and
    B + A for IRELATIVE (its resolver, run later)."""
    value = _symbol_values(e, ctx.addr[e.sym], a)
    desc_kind = Kind.TLS_DTPOFF if _dynamic_descriptors(ctx) else Kind.TLS_TPOFF
    for kind in (Kind.TLS_MODULE, Kind.TLS_DTPOFF, Kind.TLS_TPOFF):
        sel = is_kind(e.kinds, kind, Kind.TLS_DESC) if kind is desc_kind else is_kind(e.kinds, kind)
        if sel.any():
            value[sel] = _tls_values(ctx, kind, e.sym[sel], a[sel])
    irel = is_kind(e.kinds, Kind.IRELATIVE)
    value[irel] = ctx.b + a[irel]
    return value


def _copy_entries(ctx: _Context) -> list[tuple[npt.NDArray[Any], ...]]:
    """Every table's COPY entries as (key, place, symbol), for the bulk copy."""
    copies: list[tuple[npt.NDArray[Any], ...]] = []
    first = 0
    for table, kinds in zip(ctx.tables.relocs, ctx.kinds_all, strict=True):
        copy = np.flatnonzero(is_kind(kinds, Kind.COPY))
        if len(copy):
            copies.append((copy + first, table.r_offset[copy] + ctx.b,
                           table.r_sym[copy].astype(np.int64)))
        first += len(table)
    return copies


def _computed_pieces(ctx: _Context, e: _Entries, pieces: _Pieces) -> None:
    """The entries ``e`` (every table's that are not RELATIVE, NONE or COPY) as pieces keyed
    by their position over all tables."""
    if not len(e.key):
        return
    a = e.a
    s = ctx.addr[e.sym]
    width = _lookup(_WIDTH_COLUMN, e.r_type)
    value = _computed_values(ctx, e, a)
    irel = is_kind(e.kinds, Kind.IRELATIVE)
    deferred = irel | (is_kind(e.kinds, Kind.ABSOLUTE, Kind.PCREL) & ctx.ifunc_bound[e.sym])
    if ctx.where.lazy:
        slot = e.r_type == _JUMP_SLOT
        value[slot] = _file_words(ctx.where.image, e.p[slot] - ctx.b) + ctx.b
        deferred &= ~slot
    _check_narrow(e, width, s, a, skip=deferred)
    desc = is_kind(e.kinds, Kind.TLS_DESC)
    # A TLS descriptor is two words: glibc's static-TLS (_dl_tlsdesc_return, TPOFF). That
    # function lives in ld.so, which the simulator has not got: 0 there, and recorded.
    # A dynamic block's descriptors come from its layout's ``descriptor`` (the host's).
    function = np.zeros(int(desc.sum()), dtype=np.uint64)
    if _dynamic_descriptors(ctx) and desc.any():
        function, value[desc] = _descriptor_words(ctx, e.where(desc), value[desc])
    pieces.add(e.key[desc], e.p[desc] + _U64(8), np.full(int(desc.sum()), 8, np.uint64),
               value[desc], deferred[desc])
    value[desc] = function
    pieces.add(e.key, e.p, np.minimum(width, _U64(8)), value, deferred)
    _record(ctx, e, width, s, a, deferred)


def _dynamic_descriptors(ctx: _Context) -> bool:
    """The object's TLS block is dynamic and its layout makes its TLS descriptors."""
    tls = ctx.out.tls
    return tls is not None and tls.tp_offset is None and tls.descriptor is not None


def _descriptor_words(ctx: _Context, e: _Entries, offsets: npt.NDArray[np.uint64]
                      ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The (function, argument) words of the TLSDESC entries ``e``, at ``offsets`` in their
    modules' blocks (the object's own, or another's its resolver's scope knew), one
    ``descriptor`` call per distinct (module, offset). ElfRelocationError for a variable
    whose module nobody knew."""
    tls = ctx.out.tls
    assert tls is not None and tls.descriptor is not None
    modules = _tls_values(ctx, Kind.TLS_MODULE, e.sym, e.a)
    if (modules == 0).any():
        k = int(np.flatnonzero(modules == 0)[0])
        raise ElfRelocationError(f"{e.table_name(k)} R_X86_64_TLSDESC symbol at "
                                 f"{int(e.p[k]):#x}", int(e.sym[k]),
                                 "a TLS variable of the object or of a module its "
                                 "resolver's scope knows")
    distinct, where = np.unique(np.stack([modules, offsets], axis=1), axis=0,
                                return_inverse=True)
    words = np.array([tls.descriptor(m, x) for m, x in distinct.tolist()],
                     dtype=np.uint64).reshape(-1, 2)
    return words[where.ravel(), 0], words[where.ravel(), 1]


def _record(ctx: _Context, e: _Entries, width: npt.NDArray[np.uint64],
            s: npt.NDArray[np.uint64], a: npt.NDArray[np.uint64],
            deferred: npt.NDArray[np.bool_]) -> None:
    """Counts per type, TLS descriptor places, and the (place, resolver) of every IRELATIVE
    and IFUNC-bound 8-byte slot, for the outcome."""
    out = ctx.out
    counts = np.bincount(np.minimum(e.r_type, _TYPE_SLOTS - 1), minlength=_TYPE_SLOTS)
    for t in np.flatnonzero(counts).tolist():
        out.by_type[type_name(t)] += int(counts[t])
    out.tlsdesc.extend(e.p[is_kind(e.kinds, Kind.TLS_DESC)].tolist())
    irel = is_kind(e.kinds, Kind.IRELATIVE)
    slot = deferred & ~irel & is_kind(e.kinds, Kind.ABSOLUTE) & (width == 8)
    out.irelative.extend(zip(e.p[slot].tolist(), s[slot].tolist(), strict=True))
    out.irelative.extend(zip(e.p[irel].tolist(), (ctx.b + a[irel]).tolist(), strict=True))


def _deferred_values(ctx: _Context, every: _Entries) -> npt.NDArray[np.uint64]:
    """The values of the deferred entries among ``every`` (sequence order), with resolvers
    run: an IRELATIVE slot gets what its resolver (B + A) selects, a slot bound to an own
    IFUNC symbol is recomputed with S = what that symbol's resolver selects."""
    bound = is_kind(every.kinds, Kind.ABSOLUTE, Kind.PCREL) & ctx.ifunc_bound[every.sym]
    if ctx.where.lazy:          # a lazy JUMP_SLOT keeps its PLT address (_computed_pieces)
        bound &= every.r_type != _JUMP_SLOT
    e = every.where(is_kind(every.kinds, Kind.IRELATIVE) | bound)
    irel = is_kind(e.kinds, Kind.IRELATIVE)
    a = e.a
    resolver = np.where(irel, ctx.b + a, ctx.addr[e.sym])
    chosen = _run_resolvers(resolver, ctx.where.runs_code, code_runner(ctx.where.mm))
    value = np.where(irel, chosen, _symbol_values(e, chosen, a))
    _check_narrow(e, _lookup(_WIDTH_COLUMN, e.r_type), chosen, a)
    out: npt.NDArray[np.uint64] = value
    return out


# ---------------------------------------------------------------------------------------------
# COPY: min(reference, definition) bytes from the definition's readable memory, in bulk


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


_RTLD_DL_SYMENT = 1
_MAX_WARNINGS = 16
_ST_SIZE_OFFSET = 16     # Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size


@functools.cache
def _dladdr1() -> Any:
    """glibc's dladdr1 of this process, declared once."""
    fn = ctypes.CDLL(None).dladdr1
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo), ctypes.POINTER(ctypes.c_void_p),
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _host_definition_size(addr: int) -> int | None:
    """st_size of the symbol this process defines at exactly ``addr`` (dladdr1 with
    RTLD_DL_SYMENT), or None when no loaded object has a symbol starting there."""
    info, sym = _DlInfo(), ctypes.c_void_p()
    if not _dladdr1()(addr, ctypes.byref(info), ctypes.byref(sym), _RTLD_DL_SYMENT):
        return None
    if not sym.value or info.dli_saddr != addr:
        return None
    return int(ctypes.c_uint64.from_address(sym.value + _ST_SIZE_OFFSET).value)


def _readable_runs(mm: Mmap) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Starts and ends of the backend's readable memory, adjacent regions merged."""
    runs: list[list[int]] = []
    for r in mm.maps():
        if not r.prot & ProtFlags.PROT_READ:
            continue
        if runs and runs[-1][1] == r.start:
            runs[-1][1] = r.end
        else:
            runs.append([r.start, r.end])
    return (np.array([r[0] for r in runs], dtype=np.uint64),
            np.array([r[1] for r in runs], dtype=np.uint64))


def _copy_sizes(ctx: _Context, sym: npt.NDArray[np.int64], src: npt.NDArray[np.uint64]
                ) -> npt.NDArray[np.uint64]:
    """How many bytes each COPY copies: min(reference st_size, definition st_size), as
    glibc's memcpy does; the definition's size is known on the host (dladdr1), elsewhere the
    reference's stands. A size mismatch is recorded as glibc's warning."""
    ref = ctx.syms["st_size"][sym].astype(np.uint64)
    if ctx.res.sizes is not None:
        known, defined = np.ones(len(sym), dtype=bool), ctx.res.sizes[sym]
    elif not ctx.where.runs_code or not len(src):
        return ref
    else:
        distinct, back = np.unique(src, return_inverse=True)
        found = [_host_definition_size(int(x)) for x in distinct.tolist()]
        known = np.array([f is not None for f in found])[back.ravel()]
        defined = np.array([f or 0 for f in found], dtype=np.uint64)[back.ravel()]
    size = np.where(known, np.minimum(ref, defined), ref)
    differ = np.flatnonzero(known & (defined != ref) & (src != 0))
    for k in differ[:_MAX_WARNINGS].tolist():
        ctx.out.warnings.append(
            f"R_X86_64_COPY {_symbol_text(ctx.tables, int(sym[k]))}: st_size "
            f"{int(ref[k]):#x} here, {int(defined[k]):#x} in the definition; copied "
            f"{int(size[k]):#x} (glibc: \"has different size in shared object\")")
    if len(differ) > _MAX_WARNINGS:
        ctx.out.warnings.append(f"... and {len(differ) - _MAX_WARNINGS} more COPY size "
                                "differences")
    return size


def _check_sources(ctx: _Context, sym: npt.NDArray[np.int64], src: npt.NDArray[np.uint64],
                   size: npt.NDArray[np.uint64]
                   ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """Keep every copy inside readable memory: a source whose first byte is not readable
    is an ElfRelocationError naming the symbol (never a fault); one whose readable memory
    ends before ``size`` bytes is cut there (a stub, or a definition of unknown size, may be
    smaller than the reference says), with a warning. Returns the readable run holding each
    source and the sizes to copy."""
    starts, ends = _readable_runs(ctx.where.mm)
    run = _segment_of(starts, src)
    at = np.clip(run, 0, None)
    end = ends[at] if len(ends) else np.zeros(len(src), dtype=np.uint64)
    ok = (run >= 0) & (src < end)
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        raise ElfRelocationError(
            f"R_X86_64_COPY source of {_symbol_text(ctx.tables, int(sym[k]))}", int(src[k]),
            f"readable memory there ({int(size[k]):#x} bytes to copy from the definition)")
    cut = np.minimum(size, end - src)
    short = np.flatnonzero(cut < size)
    for k in short[:_MAX_WARNINGS].tolist():
        ctx.out.warnings.append(
            f"R_X86_64_COPY {_symbol_text(ctx.tables, int(sym[k]))}: only {int(cut[k]):#x} of "
            f"{int(size[k]):#x} bytes readable at the definition {int(src[k]):#x}; copied those")
    if len(short) > _MAX_WARNINGS:
        ctx.out.warnings.append(f"... and {len(short) - _MAX_WARNINGS} more short COPY sources")
    return run, cut


def _gather(mm: Mmap, src: npt.NDArray[np.uint64], size: npt.NDArray[np.uint64],
            run: npt.NDArray[np.int64], page: int) -> npt.NDArray[np.uint8]:
    """The bytes of every ``[src, src + size)``, concatenated: ranges in one readable run and
    at most a page apart are read together (one ``read`` per group, never per entry)."""
    order = np.lexsort((src, run))
    s, e, r = src[order], src[order] + size[order], run[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = (r[1:] != r[:-1]) | (s[1:] > reach[:-1] + _U64(page))
    group = np.cumsum(new) - 1
    lo = s[new]
    hi = np.maximum.reduceat(e, np.flatnonzero(new))
    bufs = [np.frombuffer(mm.read(int(x), int(y - x)), dtype=np.uint8)
            for x, y in zip(lo.tolist(), hi.tolist(), strict=True)]
    base = np.concatenate([[0], np.cumsum([len(b) for b in bufs])]).astype(np.int64)
    blob = np.concatenate(bufs) if bufs else np.zeros(0, dtype=np.uint8)
    first = np.empty(len(s), dtype=np.int64)
    first[order] = base[group] + (s - lo[group]).astype(np.int64)
    n = size.astype(np.int64)
    total = int(n.sum())
    starts_out = np.cumsum(n) - n
    index = np.repeat(first - starts_out, n) + np.arange(total, dtype=np.int64)
    out: npt.NDArray[np.uint8] = blob[index]
    return out


def _copy_pieces(ctx: _Context, copies: list[tuple[npt.NDArray[Any], ...]], pieces: _Pieces
                 ) -> None:
    """Every COPY as 8-byte pieces of its destination. A symbol bound to nothing (a weak
    reference no one defines, address 0) copies nothing, as glibc's ``sym == NULL``."""
    if not copies:
        return
    key = np.concatenate([c[0] for c in copies]).astype(np.int64)
    place = np.concatenate([c[1] for c in copies])
    sym = np.concatenate([c[2] for c in copies])
    ctx.out.by_type["R_X86_64_COPY"] += len(key)
    src = ctx.addr[sym]
    size = _copy_sizes(ctx, sym, src)
    live = (src != 0) & (size != 0)
    if not live.any():
        return
    key, place, sym, src, size = key[live], place[live], sym[live], src[live], size[live]
    run, size = _check_sources(ctx, sym, src, size)
    mm = ctx.where.mm
    data = _gather(mm, src, size, run, mm.page_size)
    n = size.astype(np.int64)
    chunks = (n + 7) // 8
    total = int(chunks.sum())
    padded = np.zeros(8 * total, dtype=np.uint8)
    pad_start = 8 * (np.cumsum(chunks) - chunks)
    data_start = np.cumsum(n) - n
    padded[np.repeat(pad_start - data_start, n) + np.arange(len(data), dtype=np.int64)] = data
    nth = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    left = np.repeat(n, chunks) - 8 * nth
    pieces.add(np.repeat(key, chunks), np.repeat(place, chunks) + (8 * nth).astype(np.uint64),
               np.minimum(left, 8).astype(np.uint64), padded.view("<u8").astype(np.uint64),
               np.zeros(total, dtype=bool))


# ---------------------------------------------------------------------------------------------
# Committing: pieces -> the final value of each aligned word -> one write_words


_FULL = _U64(MASK64)
_BYTE_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)


class _WordPieces(NamedTuple):
    """Stores cut at word boundaries: each changes the bytes ``mask`` of the aligned word
    ``word`` to those of ``bits``; ``seq`` is the store's position in sequence order.
    ``whole``: every piece is a whole word and ``seq`` ascends (``_cut`` knows it for the
    usual aligned 8-byte stores; ``_final_words`` then needs no check of its own)."""

    word: npt.NDArray[np.uint64]
    mask: npt.NDArray[np.uint64]
    bits: npt.NDArray[np.uint64]
    seq: npt.NDArray[np.int64]
    whole: bool = False

    def where(self, sel: npt.NDArray[np.bool_]) -> _WordPieces:
        """The pieces selected by ``sel`` (still ``whole`` if these were)."""
        return _WordPieces(self.word[sel], self.mask[sel], self.bits[sel], self.seq[sel],
                           self.whole)


def _cut(place: npt.NDArray[np.uint64], width: npt.NDArray[np.uint64],
         value: npt.NDArray[np.uint64]) -> tuple[_WordPieces, npt.NDArray[np.int64]]:
    """Cut stores into word pieces (an unaligned store spans two words). Returns the pieces
    and, for each, the index of its store. (All aligned whole words, the usual case: each
    store is its own piece.)"""
    seq = np.arange(len(place), dtype=np.int64)
    if bool((width == _U64(8)).all()) and not bool((place & _U64(7)).any()):
        return _WordPieces(place, np.full(len(place), _FULL), value, seq, True), seq
    off = (place & _U64(7)).astype(np.int64)
    word = place - off.astype(np.uint64)
    low = np.minimum(width.astype(np.int64), 8 - off)
    shift = (8 * off).astype(np.uint64)
    mask0 = _BYTE_MASKS[low] << shift
    bits0 = (value << shift) & mask0
    high = width.astype(np.int64) - low
    two = np.flatnonzero(high > 0)
    mask1 = _BYTE_MASKS[high[two]]
    bits1 = (value[two] >> (8 * low[two]).astype(np.uint64)) & mask1
    return (_WordPieces(np.concatenate([word, word[two] + _U64(8)]),
                        np.concatenate([mask0, mask1]), np.concatenate([bits0, bits1]),
                        np.concatenate([seq, two])),
            np.concatenate([seq, two]))


class _Initial:
    """Words as memory held them before relocation (read once, only where a store covers
    part of a word): a sorted lookup table."""

    def __init__(self, mm: Mmap, words: npt.NDArray[np.uint64]) -> None:
        self.addrs = _sorted_unique(words)
        self.values = _read_words(mm, self.addrs)

    def get(self, words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The initial values of ``words`` (each read at construction)."""
        out: npt.NDArray[np.uint64] = self.values[np.searchsorted(self.addrs, words)]
        return out


def _read_words(mm: Mmap, words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Read the aligned ``words`` (sorted, unique): one ``read`` per run of consecutive
    pages they touch, so the cost follows the memory touched, not the entry count."""
    out = np.zeros(len(words), dtype=np.uint64)
    if not len(words):
        return out
    page = _U64(mm.page_size)
    pages = _sorted_unique(words & ~(page - _U64(1)))
    breaks = np.flatnonzero(np.diff(pages) != page) + 1
    for run in np.split(pages, breaks):
        lo, hi = run[0], run[-1] + page
        inside = (words >= lo) & (words < hi)
        buf = np.frombuffer(mm.read(int(lo), int(hi - lo)), dtype="<u8")
        out[inside] = buf[((words[inside] - lo) >> _U64(3)).astype(np.int64)]
    return out


def _final_words(wp: _WordPieces, initial: _Initial
                 ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The aligned words the pieces touch (sorted, unique) and the value each holds after
    applying them in ``seq`` order: for every byte, the last piece covering it wins; bytes no
    piece covers keep their initial value."""
    if not len(wp.word):
        return wp.word, wp.bits
    if wp.whole or (bool((wp.mask == _FULL).all()) and bool((np.diff(wp.seq) > 0).all())):
        order = np.argsort(wp.word, kind="stable")
        word, bits = wp.word[order], wp.bits[order]
        last = np.ones(len(word), dtype=bool)
        last[:-1] = word[1:] != word[:-1]
        return word[last], bits[last]
    order = np.lexsort((wp.seq, wp.word))
    word, mask, bits = wp.word[order], wp.mask[order], wp.bits[order]
    start = np.ones(len(word), dtype=bool)
    start[1:] = word[1:] != word[:-1]
    group = np.cumsum(start) - 1
    firsts = np.flatnonzero(start)
    words = word[firsts]
    covered = np.bitwise_or.reduceat(mask, firsts)
    result = np.zeros(len(words), dtype=np.uint64)
    partial = covered != _FULL
    result[partial] = initial.get(words[partial])
    result_bytes = result.view(np.uint8).reshape(-1, 8)
    mask_bytes = mask.view(np.uint8).reshape(-1, 8)
    bits_bytes = bits.view(np.uint8).reshape(-1, 8)
    for b in range(8):
        cover = np.flatnonzero(mask_bytes[:, b])
        g = group[cover]
        last = np.ones(len(cover), dtype=bool)
        last[:-1] = g[1:] != g[:-1]
        result_bytes[g[last], b] = bits_bytes[cover[last], b]
    return words, result


def _write(mm: Mmap, words: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
    """One write_words (none when there is nothing to write)."""
    if len(words):
        mm.write_words(words, values)


# ---------------------------------------------------------------------------------------------
# The pipeline step


def _bind(where: RelocContext, resolver: Resolver, out: RelocOutcome, classified: Classified
          ) -> Resolution:
    """Run the resolver chain over the symbols the relocations reference."""
    tables = where.tables
    needed, kinds_all = classified.needed, classified.kinds_all
    copies = [t.r_sym[is_kind(kinds, Kind.COPY)]
              for t, kinds in zip(tables.relocs, kinds_all, strict=True)]
    not_self = np.concatenate(copies).astype(np.int64) if copies else None
    res = resolver.resolve(tables, needed, where.bias, where.mm, where.near, not_self) \
        if len(needed) else Resolution(np.zeros(tables.nsyms, np.uint64),
                                       np.zeros(tables.nsyms, bool))
    out.unresolved, out.extern, out.extern_range = res.unresolved, res.extern, res.extern_range
    return res


def _context(where: RelocContext, kinds_all: Kinds, res: Resolution, out: RelocOutcome
             ) -> _Context:
    """The context of one relocation pass. Symbols an own STT_GNU_IFUNC bound to its own
    definition are marked: their value is a resolver to run (one bound elsewhere, by a hook
    or the scope, is taken as it is). An empty symbol table reads as the null symbol."""
    syms, addr = where.tables.symtab, res.addr
    if not len(syms):
        syms, addr = np.zeros(1, dtype=syms.dtype), np.zeros(1, dtype=np.uint64)
    at_home = addr == syms["st_value"].astype(np.uint64) + _U64(where.bias & MASK64)
    if res.ifunc is not None and len(res.ifunc):
        return _Context(where, kinds_all, res, out, syms, addr, res.ifunc)
    own = _own_ifunc_of(syms)
    bound = res.bound if len(res.bound) else np.zeros(1, dtype=bool)
    return _Context(where, kinds_all, res, out, syms, addr, own & bound & at_home)


def _all_pieces(ctx: _Context, computed: _Entries) -> _Pieces:
    """Every store of the pass, in sequence order: RELATIVE and RELR first, then every
    other entry in table order (``computed``: those not RELATIVE, NONE or COPY), COPY
    bytes included."""
    where = ctx.where
    places: Words = []
    values: Words = []
    _relative_words(where.image, where.tables, ctx.kinds_all, where.bias, ctx.out, places,
                    values)
    pieces = _Pieces()
    if places:
        place = np.concatenate(places)
        pieces.add(np.full(len(place), -1, np.int64), place, np.full(len(place), 8, np.uint64),
                   np.concatenate(values), np.zeros(len(place), dtype=bool))
    _computed_pieces(ctx, computed, pieces)
    _copy_pieces(ctx, _copy_entries(ctx), pieces)
    return pieces


def relocate(where: RelocContext, resolver: Resolver, out: RelocOutcome | None = None
             ) -> RelocOutcome:
    """Apply every relocation (targets, sizes and resolvers were checked by
    ``check_relocations``).

    Memory ends as sequential application leaves it, in the order: RELATIVE and RELR, then
    every other entry in table order (module docstring). When ``where.runs_code`` (the
    backend is this process) IFUNC resolvers are called. ``out`` is filled as work is done
    (so a caller cleaning up after a failure sees any extern mapping made). Raises
    ElfRelocationError for a value that does not fit its field or an unreadable COPY
    source, MmapError from the backend.
    """
    out = out if out is not None else RelocOutcome()
    if out.tls is None:     # a process image (LinkMap) sets the layout it chose
        out.tls = TlsLayout.first_static(where.image)
    mm = where.mm
    classified = where.classified or classify(where.tables)
    kinds_all = classified.kinds_all
    ctx = _context(where, kinds_all, _bind(where, resolver, out, classified), out)
    computed = _Entries.computed(ctx)
    place, width, value, deferred = _all_pieces(ctx, computed).arrays()
    wp, store = _cut(place, width, value)
    initial = _Initial(mm, wp.word[wp.mask != _FULL])
    later = bool(deferred.any())
    _write(mm, *_final_words(wp.where(~deferred[store]) if later else wp, initial))
    out.ran_resolvers = where.runs_code
    if later:
        value[deferred] = _deferred_values(ctx, computed)
        wp, store = _cut(place, width, value)
        touched = _members(wp.word, wp.word[deferred[store]])
        _write(mm, *_final_words(wp.where(touched), initial))
    out.by_type.pop(X86_64[R_X86_64.NONE].name, None)
    out.applied = sum(out.by_type.values())
    return out
