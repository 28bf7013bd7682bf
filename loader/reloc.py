"""Relocate: the x86-64 relocation table and the generic kinds that apply it.

Part of the ``loader`` layer (imports ``loader.tables``, ``loader.symbols``, ``loader.mmap``).
As musl does it, an architecture is a table from type number to (kind, width, addend rule);
one function per kind does the work, with the ABI's letters: S (symbol address), A (addend),
P (place), B (load bias). RELATIVE entries and RELR are one numpy scatter; the symbolic
word-sized kinds are a second one. ``check_relocations`` validates every target before any
memory is touched.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from loader.elf import PF_W, PF_X, ElfImage
from loader.errors import ElfRelocationError, ElfSymbolError
from loader.mmap import Mmap
from loader.symbols import STT_GNU_IFUNC, STT_TLS, Resolution, Resolver
from loader.tables import DynamicTables, RelocTable

__all__ = [
    "Kind",
    "RelocOutcome",
    "Rule",
    "TlsLayout",
    "X86_64",
    "check_relocations",
    "relocate",
    "type_name",
]


class Kind(enum.Enum):
    """The generic relocation kinds; an architecture maps its numbers onto these."""

    NONE = "none"
    RELATIVE = "relative"      # B + A
    ABSOLUTE = "absolute"      # S + A (or S)
    PCREL = "pcrel"            # S + A - P
    COPY = "copy"              # copy st_size bytes from S to P
    IRELATIVE = "irelative"    # resolver(B + A)()
    TLS_MODULE = "tls_module"  # module id of the defining object
    TLS_DTPOFF = "tls_dtpoff"  # S.st_value + A (offset in its TLS block)
    TLS_TPOFF = "tls_tpoff"    # S.st_value + A - tls offset (static TLS, variant II)
    TLS_DESC = "tls_desc"      # a (function, argument) pair; static TLS: argument = TPOFF


class Rule(NamedTuple):
    """One type: its name, kind, width in bytes, whether the addend is used (S+A vs S)."""

    name: str
    kind: Kind
    width: int
    addend: bool


X86_64: dict[int, Rule] = {
    0: Rule("R_X86_64_NONE", Kind.NONE, 0, False),
    1: Rule("R_X86_64_64", Kind.ABSOLUTE, 8, True),
    2: Rule("R_X86_64_PC32", Kind.PCREL, 4, True),
    5: Rule("R_X86_64_COPY", Kind.COPY, 0, False),
    6: Rule("R_X86_64_GLOB_DAT", Kind.ABSOLUTE, 8, False),
    7: Rule("R_X86_64_JUMP_SLOT", Kind.ABSOLUTE, 8, False),
    8: Rule("R_X86_64_RELATIVE", Kind.RELATIVE, 8, True),
    10: Rule("R_X86_64_32", Kind.ABSOLUTE, 4, True),
    11: Rule("R_X86_64_32S", Kind.ABSOLUTE, 4, True),
    16: Rule("R_X86_64_DTPMOD64", Kind.TLS_MODULE, 8, False),
    17: Rule("R_X86_64_DTPOFF64", Kind.TLS_DTPOFF, 8, True),
    18: Rule("R_X86_64_TPOFF64", Kind.TLS_TPOFF, 8, True),
    24: Rule("R_X86_64_PC64", Kind.PCREL, 8, True),
    37: Rule("R_X86_64_IRELATIVE", Kind.IRELATIVE, 8, True),
    36: Rule("R_X86_64_TLSDESC", Kind.TLS_DESC, 16, True),
    38: Rule("R_X86_64_RELATIVE64", Kind.RELATIVE, 8, True),
}
_TYPES = np.array(sorted(X86_64), dtype=np.uint32)
_WIDTH = np.zeros(64, dtype=np.uint64)   # by type; unknown types clip to 63 -> 0
_WIDTH[_TYPES] = [X86_64[t].width for t in _TYPES.tolist()]
_SYMBOLIC = {Kind.ABSOLUTE, Kind.PCREL, Kind.COPY, Kind.TLS_MODULE, Kind.TLS_DTPOFF,
             Kind.TLS_TPOFF, Kind.TLS_DESC}
_MASK64 = 0xFFFFFFFFFFFFFFFF


def type_name(r_type: int) -> str:
    """``R_X86_64_...`` for a known type, else ``"type N"``."""
    rule = X86_64.get(r_type)
    return rule.name if rule else f"type {r_type}"


_KINDS = list(Kind)
_BIT_WORD, _BIT_ADDEND, _BIT_KNOWN = 1 << 16, 1 << 17, 1 << 18
_LUT_SIZE = 64     # x86-64 types are below 64; entry 63 stays 0 (unknown)
_LUT = np.zeros(_LUT_SIZE, dtype=np.uint32)
for _t, _r in X86_64.items():
    _LUT[_t] = ((1 << _KINDS.index(_r.kind)) | _BIT_KNOWN
                | (_BIT_WORD if _r.kind is Kind.ABSOLUTE and _r.width == 8 else 0)
                | (_BIT_ADDEND if _r.addend else 0))


def _codes(r_type: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Per entry, the bit set of its type: a bit per Kind, plus 8-byte-ABSOLUTE, uses-addend
    and known bits. One table lookup instead of a membership test per kind."""
    # Types past the table clip to its last entry, which is 0 (unknown): one pass.
    codes: npt.NDArray[np.uint32] = np.take(_LUT, r_type, mode="clip")
    return codes


_CODE_CACHE: dict[int, tuple[RelocTable, npt.NDArray[np.uint32]]] = {}


def _table_codes(table: RelocTable) -> npt.NDArray[np.uint32]:
    """``_codes`` of a whole table, computed once per table (kept while the table lives in
    a small identity cache)."""
    hit = _CODE_CACHE.get(id(table))
    if hit is not None and hit[0] is table:
        return hit[1]
    if len(_CODE_CACHE) >= 64:
        _CODE_CACHE.clear()
    codes = _codes(table.r_type)
    _CODE_CACHE[id(table)] = (table, codes)
    return codes


@functools.cache
def _bits(kinds: frozenset[Kind]) -> int:
    """The code bits of ``kinds``."""
    return sum(1 << _KINDS.index(k) for k in kinds)


def _kind_mask(table: RelocTable, kinds: set[Kind], width: int | None = None
               ) -> npt.NDArray[np.bool_]:
    """Which entries of ``table`` have one of ``kinds`` (``width`` 8: 8-byte ABSOLUTE only)."""
    bits = _BIT_WORD if width == 8 else _bits(frozenset(kinds))
    mask: npt.NDArray[np.bool_] = (_table_codes(table) & bits) != 0
    return mask


@dataclass(frozen=True, slots=True)
class TlsLayout:
    """Where the object's TLS block sits in the simulated static TLS (glibc's variant II:
    blocks below the thread pointer). ``module_id`` is what DTPMOD64 stores; ``tp_offset``
    is the block's distance below the thread pointer."""

    module_id: int
    tp_offset: int

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


def _segment_arrays(image: ElfImage, textrel: bool
                    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Starts and ends of the segments relocations may write (writable, or all with TEXTREL)."""
    segs = [s for s in image.loads if textrel or s.p_flags & PF_W]
    return (np.array([s.p_vaddr for s in segs], dtype=np.uint64),
            np.array([s.end for s in segs], dtype=np.uint64))


def _check_targets(name: str, offs: npt.NDArray[np.uint64], widths: npt.NDArray[np.uint64],
                   starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64]) -> None:
    """Every ``[off, off+width)`` with width > 0 inside one writable segment, else
    ElfRelocationError naming the first bad offset. Fast path: all inside one segment."""
    if len(offs) == 0:
        return
    live = widths > 0
    tops = offs + widths
    lo, hi = int(offs[live].min(initial=_MASK64)), int(tops[live].max(initial=0))
    if any(s <= lo and hi <= e for s, e in zip(starts.tolist(), ends.tolist(), strict=True)) \
            and not (tops < offs).any():
        return
    seg = np.searchsorted(starts, offs, side="right").astype(np.int64) - 1
    ok = seg >= 0
    if len(ends):
        ok &= (tops >= offs) & (tops <= ends[np.clip(seg, 0, len(ends) - 1)])
    else:
        ok[:] = False
    ok |= ~live
    if not ok.all():
        bad = int(offs[~ok][0])
        raise ElfRelocationError(f"{name} r_offset", bad,
                                 "inside a writable PT_LOAD (or any PT_LOAD with TEXTREL)")


def check_relocations(image: ElfImage, tables: DynamicTables, textrel: bool) -> None:
    """Every type known, every target inside a writable segment, every COPY source sized,
    before any memory is touched. Raises ElfRelocationError / ElfSymbolError."""
    starts, ends = _segment_arrays(image, textrel)
    for table in tables.relocs:
        codes = _table_codes(table)
        known = (codes & _BIT_KNOWN) != 0
        if not known.all():
            bad = int(table.r_type[~known][0])
            raise ElfRelocationError(f"{table.name} r_type", bad,
                                     "a supported x86-64 type " + str(_TYPES.tolist()))
        widths = np.take(_WIDTH, table.r_type, mode="clip")
        copy = (codes & _bits(frozenset({Kind.COPY}))) != 0
        if copy.any():
            if (table.r_sym[copy] == 0).any():
                bad_at = int(table.r_offset[copy & (table.r_sym == 0)][0])
                raise ElfSymbolError(f"{table.name} r_sym", 0,
                                     f"a symbol for the COPY relocation at {bad_at:#x}")
            widths[copy] = tables.symtab["st_size"][table.r_sym[copy]]
        _check_targets(table.name, table.r_offset, widths, starts, ends)
    _check_targets("DT_RELR", tables.relr, np.full(len(tables.relr), 8, np.uint64),
                   starts, ends)
    _check_ifunc_resolvers(image, tables)
    _check_definitions(image, tables)


SHN_ABS = 0xFFF1


def _check_definitions(image: ElfImage, tables: DynamicTables) -> None:
    """A symbol the object defines and its relocations use (so it may bind to itself) must
    point inside the object's PT_LOADs (SHN_ABS and TLS symbols excepted): otherwise a GOT
    slot would send a call into some other mapping."""
    needed = _needed_symbols(tables)
    syms = tables.symtab
    shndx = syms["st_shndx"][needed]
    own = (shndx != 0) & (shndx != SHN_ABS) & ((syms["st_info"][needed] & 0xF) != STT_TLS)
    values = syms["st_value"][needed[own]]
    if not len(values):
        return
    ok = np.zeros(len(values), dtype=bool)
    for seg in image.loads:
        ok |= (values >= seg.p_vaddr) & (values <= seg.end)
    if not ok.all():
        bad = int(needed[own][~ok][0])
        raise ElfSymbolError(f"symbol {bad} st_value", int(values[~ok][0]),
                             "inside a PT_LOAD (the object defines it)")


def _check_ifunc_resolvers(image: ElfImage, tables: DynamicTables) -> None:
    """IRELATIVE resolvers (B + A) must be the object's own code: on the host they are
    called, and a call into data or nowhere must be an ElfRelocationError, not a crash."""
    code = [(s.p_vaddr, s.end) for s in image.loads if s.p_flags & PF_X]
    for table in tables.relocs:
        mask = _kind_mask(table, {Kind.IRELATIVE})
        if not mask.any():
            continue
        a = _addends(image, table, mask)
        ok = np.zeros(len(a), dtype=bool)
        for lo, hi in code:
            ok |= (a >= lo) & (a < hi)
        if not ok.all():
            raise ElfRelocationError(f"{table.name} R_X86_64_IRELATIVE resolver",
                                     int(a[~ok][0]), "inside an executable PT_LOAD")


def _file_words(image: ElfImage, vaddrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The 64-bit words the file holds at ``vaddrs`` (0 past a segment's file bytes): the
    implicit addends of REL and RELR, read from the file, so no memory read is needed."""
    out = np.zeros(len(vaddrs), dtype=np.uint64)
    raw = np.frombuffer(image.data, dtype=np.uint8)
    for seg in image.loads:
        inside = (vaddrs >= seg.p_vaddr) & (vaddrs + 8 <= seg.p_vaddr + seg.p_filesz)
        if not inside.any():
            continue
        offs = (vaddrs[inside] - np.uint64(seg.p_vaddr) + np.uint64(seg.p_offset)).astype(
            np.int64)
        bytes8 = raw[offs[:, None] + np.arange(8)]
        out[inside] = bytes8.copy().view("<u8").ravel()
    return out


@dataclass(slots=True)
class RelocOutcome:
    """What relocation did: counts per type, unresolved symbols, what only the host can do."""

    applied: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    unresolved: list[str] = field(default_factory=list)
    irelative: list[tuple[int, int]] = field(default_factory=list)   # (place, resolver)
    ran_resolvers: bool = False     # True: the places hold what the resolvers chose (host)
    tlsdesc: list[int] = field(default_factory=list)   # places whose function word is 0
    extern: dict[str, int] = field(default_factory=dict)
    extern_range: tuple[int, int] | None = None
    tls: TlsLayout | None = None


def _addends(image: ElfImage, table: RelocTable, mask: npt.NDArray[np.bool_]
             ) -> npt.NDArray[np.uint64]:
    """A (as uint64, two's complement) of the masked entries: explicit, or read from the file."""
    if table.implicit:
        return _file_words(image, table.r_offset[mask])
    return table.r_addend[mask].view(np.uint64)


Words = list[npt.NDArray[np.uint64]]


def _relative_words(image: ElfImage, tables: DynamicTables, bias: int, out: RelocOutcome,
                    places: Words, values: Words) -> None:
    """Every RELATIVE entry and every RELR target, B + A, appended to the scatter lists."""
    b = np.uint64(bias & _MASK64)
    for table in tables.relocs:
        mask = _kind_mask(table, {Kind.RELATIVE})
        if mask.any():
            places.append(table.r_offset[mask] + b)
            values.append(_addends(image, table, mask) + b)
            out.by_type["R_X86_64_RELATIVE"] += int(mask.sum())
    if len(tables.relr):
        places.append(tables.relr + b)
        values.append(_file_words(image, tables.relr) + b)
        out.by_type["R_X86_64_RELATIVE"] += len(tables.relr)


def _needed_symbols(tables: DynamicTables) -> npt.NDArray[np.int64]:
    """Unique nonzero symbol indices referenced by symbolic relocations (a mark array, O(n))."""
    mark = np.zeros(tables.nsyms, dtype=bool)
    for t in tables.relocs:
        mark[t.r_sym[_kind_mask(t, _SYMBOLIC)]] = True
    if len(mark):
        mark[0] = False
    idx: npt.NDArray[np.int64] = np.flatnonzero(mark).astype(np.int64)
    return idx


def _call_ifunc(resolver_addr: int) -> int:
    """Run an IFUNC resolver in this process (host only) and return what it selects."""
    return int(ctypes.CFUNCTYPE(ctypes.c_uint64)(resolver_addr)())


def _apply_ifunc_symbols(tables: DynamicTables, res: Resolution, runs_code: bool
                         ) -> dict[int, int]:
    """Symbols of type STT_GNU_IFUNC the object defines: on the host call the resolver and
    bind to what it selects; on the simulator stay bound to the resolver's address. Returns
    {symbol index: resolver address} so the slots can be recorded."""
    syms = tables.symtab
    own_ifunc = np.flatnonzero(res.bound & ((syms["st_info"] & 0xF) == STT_GNU_IFUNC)
                               & (syms["st_shndx"] != 0))
    resolvers = {i: int(res.addr[i]) for i in own_ifunc.tolist()}
    if runs_code:
        for i, resolver in resolvers.items():
            res.addr[i] = _call_ifunc(resolver)
    return resolvers


def _symbol_words(image: ElfImage, tables: DynamicTables, res: Resolution, bias: int,
                  out: RelocOutcome, places: Words, values: Words,
                  ifuncs: dict[int, int]) -> None:
    """The 8-byte ABSOLUTE kinds (64, GLOB_DAT, JUMP_SLOT): S (+ A), appended to the lists."""
    b = np.uint64(bias & _MASK64)
    for table in tables.relocs:
        mask = _kind_mask(table, {Kind.ABSOLUTE}, 8)
        if not mask.any():
            continue
        sym = table.r_sym[mask]
        s = res.addr[sym]
        with_addend = (_table_codes(table)[mask] & _BIT_ADDEND) != 0
        a = np.where(with_addend, _addends(image, table, mask), np.uint64(0))
        places.append(table.r_offset[mask] + b)
        values.append(s + a)
        if ifuncs:
            for place, i in zip(places[-1].tolist(), sym.tolist(), strict=True):
                if i in ifuncs:
                    out.irelative.append((place, ifuncs[i]))
        counts = np.bincount(np.minimum(table.r_type[mask], _LUT_SIZE - 1), minlength=_LUT_SIZE)
        for t in np.flatnonzero(counts).tolist():
            out.by_type[type_name(t)] += int(counts[t])


def _scatter(mm: Mmap, places: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
    """One write_words, in address order (a stable sort: where two entries hit one place,
    the later still wins). Tables are sorted runs already, so the sort is nearly free, and
    backends walk their pages in order."""
    order = np.argsort(places, kind="stable")
    mm.write_words(places[order], values[order])


def _one(tables: DynamicTables, table: RelocTable, k: int, a: int, rule: Rule,
         res: Resolution, bias: int, mm: Mmap, runs_code: bool, out: RelocOutcome,
         words: dict[int, int]) -> None:
    """Apply entry ``k`` (addend ``a``) of one of the rare kinds (PCREL, 4-byte, COPY,
    IRELATIVE, TLS). 8-byte results go into ``words`` (place -> value) for one scatter."""
    place = (int(table.r_offset[k]) + bias) & _MASK64
    sym = int(table.r_sym[k])
    a = a - (1 << 64) if a >> 63 else a
    if table.implicit and rule.width == 4:
        a = int.from_bytes(mm.read(place, 4), "little", signed=True)
    s = int(res.addr[sym]) if sym else 0
    st_value = int(tables.symtab[sym]["st_value"]) if sym else 0
    if rule.kind is Kind.COPY:
        size = int(tables.symtab[sym]["st_size"])
        mm.write(place, mm.read(s, size) if size else b"")
        return
    if rule.kind is Kind.IRELATIVE:
        target = (bias + a) & _MASK64
        value = _call_ifunc(target) if runs_code else target
        out.irelative.append((place, target))
    elif rule.kind is Kind.PCREL:
        value = s + a - place
    elif rule.kind is Kind.ABSOLUTE:
        value = s + (a if rule.addend else 0)
    else:
        kind = Kind.TLS_TPOFF if rule.kind is Kind.TLS_DESC else rule.kind
        value = _tls_value(kind, tables, sym, st_value, a, out.tls)
        if kind is Kind.TLS_TPOFF and sym in res.tls_tpoff:
            value = res.tls_tpoff[sym] + a
        if rule.kind is Kind.TLS_DESC:
            # glibc's static-TLS descriptor: (_dl_tlsdesc_return, TPOFF). That function
            # lives in ld.so, which the simulator has not got: 0 there, and recorded.
            words[place] = 0
            words[(place + 8) & _MASK64] = value & _MASK64
            out.tlsdesc.append(place)
            return
    if rule.width == 8:
        words[place] = value & _MASK64
    else:
        _store(mm, place, value, rule, table.name)


def _tls_value(kind: Kind, tables: DynamicTables, sym: int, st_value: int, a: int,
               tls: TlsLayout | None) -> int:
    """DTPMOD64 / DTPOFF64 / TPOFF64 against the object's own static TLS block.

    A TLS symbol the object does not define itself has no block here: it gets module 0,
    offset 0 (the resolver listed it as unresolved unless its scope knew its TPOFF)."""
    own = sym == 0 or (int(tables.symtab[sym]["st_shndx"]) != 0 and
                       int(tables.symtab[sym]["st_info"]) & 0xF == STT_TLS)
    if tls is None or not own:
        return 0
    if kind is Kind.TLS_MODULE:
        return tls.module_id
    if kind is Kind.TLS_DTPOFF:
        return st_value + a
    return st_value + a - tls.tp_offset


def _store(mm: Mmap, place: int, value: int, rule: Rule, table: str) -> None:
    """Write ``value`` in 4 bytes; it must fit (signed for PC32 and 32S)."""
    signed = rule.kind is Kind.PCREL or rule.name.endswith("32S")
    lo, hi = (-(1 << 31), (1 << 31) - 1) if signed else (0, (1 << 32) - 1)
    if not lo <= value <= hi:
        raise ElfRelocationError(f"{table} {rule.name} value at {place:#x}", value,
                                 f"within [{lo:#x}, {hi:#x}]")
    mm.write(place, (value & 0xFFFFFFFF).to_bytes(4, "little"))


def _apply_rare(image: ElfImage, tables: DynamicTables, res: Resolution, bias: int,
                mm: Mmap, runs_code: bool, out: RelocOutcome) -> None:
    """Every entry that is not RELATIVE, NONE or an 8-byte ABSOLUTE, computed in table order
    (IRELATIVE resolvers run in that order on the host); the 8-byte results are stored by
    one more scatter at the end, the 4-byte ones and COPY as they come."""
    common = _bits(frozenset({Kind.RELATIVE, Kind.NONE})) | _BIT_WORD
    words: dict[int, int] = {}
    for table in tables.relocs:
        mask = (_table_codes(table) & common) == 0
        addends = _addends(image, table, mask).tolist()
        for k, a in zip(np.flatnonzero(mask).tolist(), addends, strict=True):
            rule = X86_64[int(table.r_type[k])]
            _one(tables, table, k, a, rule, res, bias, mm, runs_code, out, words)
            out.by_type[rule.name] += 1
    if words:
        _scatter(mm, np.fromiter(words, dtype=np.uint64, count=len(words)),
                 np.fromiter(words.values(), dtype=np.uint64, count=len(words)))


def relocate(image: ElfImage, tables: DynamicTables, bias: int, mm: Mmap,
             resolver: Resolver, runs_code: bool, near: int,
             out: RelocOutcome | None = None) -> RelocOutcome:
    """Apply every relocation (targets were checked by ``check_relocations``).

    Order: RELATIVE and RELR, then symbolic words (all in one scatter), then the rare kinds
    in table order (IRELATIVE last in practice, as linkers put them last). ``runs_code``: the
    backend is this process, so IFUNC resolvers may be called. ``out`` is filled as work
    is done (so a caller cleaning up after a failure sees any extern mapping made).
    """
    out = out if out is not None else RelocOutcome()
    out.tls = TlsLayout.first_static(image)
    places: Words = []
    values: Words = []
    _relative_words(image, tables, bias, out, places, values)
    needed = _needed_symbols(tables)
    copies = [t.r_sym[_kind_mask(t, {Kind.COPY})] for t in tables.relocs]
    not_self = np.concatenate(copies).astype(np.int64) if copies else None
    res = resolver.resolve(tables, needed, bias, mm, near, not_self) if len(needed) else \
        Resolution(np.zeros(tables.nsyms, np.uint64), np.zeros(tables.nsyms, bool))
    out.unresolved, out.extern, out.extern_range = res.unresolved, res.extern, res.extern_range
    ifuncs = _apply_ifunc_symbols(tables, res, runs_code)
    out.ran_resolvers = runs_code
    _symbol_words(image, tables, res, bias, out, places, values, ifuncs)
    if places:     # RELATIVE, RELR and the symbolic words: ONE scatter, relative ones first
        _scatter(mm, np.concatenate(places), np.concatenate(values))
    _apply_rare(image, tables, res, bias, mm, runs_code, out)
    out.by_type.pop("R_X86_64_NONE", None)
    out.applied = sum(out.by_type.values())
    return out
