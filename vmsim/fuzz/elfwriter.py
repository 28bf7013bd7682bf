"""Write ELF64 x86-64 shared objects and executables from a small description.

Part of the fuzz kit (``vmsim.fuzz``), importing only numpy and ``loader.pages``. The
fuzzing strategies (``vmsim.fuzz.images``) build their images with it, the tests feed its output
to ``readelf``, pyelftools and glibc's ``dlopen`` to prove it valid, and it teaches: the records
below are the spec's own structures, and :func:`smallest_shared_object` builds the smallest
shared object glibc will ``dlopen``, one field at a time.

Two levels:

* **records**: numpy structured dtypes for each ELF structure (``EHDR``, ``PHDR``, ``SHDR``,
  ``DYN``, ``SYM``, ``RELA``, ``REL``, ``VERDEF``...) and :func:`pack`, which fills one record by
  field name. Nothing is hidden: a record is its bytes.
* **descriptions**: :class:`ElfSpec` (segments, symbols, relocations, knobs) and :func:`build`,
  which lays it out as ``ld`` would (a read-only headers segment with every dynamic table, the
  user's segments, a writable segment holding ``.dynamic``) and returns an :class:`ElfImage`:
  the bytes, where every table and field landed, and what a correct loader must produce
  (symbol addresses, relocated words as ``load_bias + delta``).

>>> spec = ElfSpec(
...     segments=(Segment("rw", data=bytes(16), bss=100, relro=8),),
...     symbols=(Symbol("answer", segment=0, offset=8),),
...     relocs=(Reloc("RELATIVE", segment=0, offset=0, target=(0, 8)),),
... )
>>> image = build(spec)
>>> image.data[:4]
b'\\x7fELF'
>>> image.symbol_vaddr("answer") == image.segment_vaddr(0) + 8
True
>>> [(hex(va), hex(delta)) for va, delta in image.expected_words().items()] == [
...     (hex(image.segment_vaddr(0)), hex(image.segment_vaddr(0) + 8))]
True
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from loader.pages import page_round_up

__all__ = [
    "DYN",
    "EHDR",
    "PHDR",
    "REL",
    "RELA",
    "SHDR",
    "SYM",
    "VERDAUX",
    "VERDEF",
    "VERNAUX",
    "VERNEED",
    "ElfImage",
    "ElfSpec",
    "Reloc",
    "Segment",
    "Symbol",
    "TableInfo",
    "build",
    "elf_hash",
    "gnu_hash",
    "pack",
    "smallest_shared_object",
]

# --------------------------------------------------------------------------------------------
# Constants, with the spec's names (only those this writer emits). Written here from the spec,
# not imported from loader.elfdefs, on purpose: the writer is an oracle for the loader (it says
# what a correct load must produce), and a wrong constant shared by both would hide itself.

ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_PHDR = 1, 2, 3, 6
PT_GNU_STACK, PT_GNU_RELRO = 0x6474E551, 0x6474E552
PF_X, PF_W, PF_R = 1, 2, 4
SHT_PROGBITS, SHT_STRTAB, SHT_RELA, SHT_HASH, SHT_DYNAMIC = 1, 3, 4, 5, 6
SHT_NOBITS, SHT_REL, SHT_DYNSYM = 8, 9, 11
SHT_RELR = 19
SHT_GNU_HASH, SHT_GNU_VERDEF, SHT_GNU_VERNEED, SHT_GNU_VERSYM = (
    0x6FFFFFF6, 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF)
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR, SHF_INFO_LINK = 1, 2, 4, 0x40
STB_GLOBAL, STB_WEAK = 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2
SHN_UNDEF = 0

DT_NULL, DT_NEEDED, DT_PLTRELSZ, DT_PLTGOT, DT_HASH, DT_STRTAB, DT_SYMTAB = 0, 1, 2, 3, 4, 5, 6
DT_RELA, DT_RELASZ, DT_RELAENT, DT_STRSZ, DT_SYMENT = 7, 8, 9, 10, 11
DT_SONAME, DT_REL, DT_RELSZ, DT_RELENT, DT_PLTREL = 14, 17, 18, 19, 20
DT_DEBUG, DT_TEXTREL, DT_JMPREL, DT_FLAGS = 21, 22, 23, 30
DT_RELRSZ, DT_RELR, DT_RELRENT = 35, 36, 37
DT_GNU_HASH = 0x6FFFFEF5
DT_VERSYM, DT_RELACOUNT, DT_RELCOUNT, DT_FLAGS_1 = 0x6FFFFFF0, 0x6FFFFFF9, 0x6FFFFFFA, 0x6FFFFFFB
DT_VERDEF, DT_VERDEFNUM, DT_VERNEED, DT_VERNEEDNUM = 0x6FFFFFFC, 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF
DF_TEXTREL, DF_BIND_NOW = 0x4, 0x8
DF_1_NOW, DF_1_PIE = 0x1, 0x08000000
VER_FLG_BASE = 1

R_X86_64_64, R_X86_64_COPY, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT = 1, 5, 6, 7
R_X86_64_RELATIVE = 8
DT_INIT_ARRAY, DT_FINI_ARRAY, DT_INIT_ARRAYSZ, DT_FINI_ARRAYSZ = 25, 26, 27, 28
RELOC_TYPES: dict[str, int] = {
    "64": R_X86_64_64,
    "COPY": R_X86_64_COPY,
    "GLOB_DAT": R_X86_64_GLOB_DAT,
    "JUMP_SLOT": R_X86_64_JUMP_SLOT,
    "RELATIVE": R_X86_64_RELATIVE,
}
"""The relocation kinds this writer emits, by their psABI name without ``R_X86_64_``."""

# --------------------------------------------------------------------------------------------
# Records: each ELF structure as a numpy structured dtype, little-endian, spec field names.

EHDR = np.dtype([
    ("e_ident", "u1", 16), ("e_type", "<u2"), ("e_machine", "<u2"), ("e_version", "<u4"),
    ("e_entry", "<u8"), ("e_phoff", "<u8"), ("e_shoff", "<u8"), ("e_flags", "<u4"),
    ("e_ehsize", "<u2"), ("e_phentsize", "<u2"), ("e_phnum", "<u2"),
    ("e_shentsize", "<u2"), ("e_shnum", "<u2"), ("e_shstrndx", "<u2"),
])
PHDR = np.dtype([
    ("p_type", "<u4"), ("p_flags", "<u4"), ("p_offset", "<u8"), ("p_vaddr", "<u8"),
    ("p_paddr", "<u8"), ("p_filesz", "<u8"), ("p_memsz", "<u8"), ("p_align", "<u8"),
])
SHDR = np.dtype([
    ("sh_name", "<u4"), ("sh_type", "<u4"), ("sh_flags", "<u8"), ("sh_addr", "<u8"),
    ("sh_offset", "<u8"), ("sh_size", "<u8"), ("sh_link", "<u4"), ("sh_info", "<u4"),
    ("sh_addralign", "<u8"), ("sh_entsize", "<u8"),
])
DYN = np.dtype([("d_tag", "<i8"), ("d_val", "<u8")])
SYM = np.dtype([
    ("st_name", "<u4"), ("st_info", "u1"), ("st_other", "u1"), ("st_shndx", "<u2"),
    ("st_value", "<u8"), ("st_size", "<u8"),
])
RELA = np.dtype([("r_offset", "<u8"), ("r_info", "<u8"), ("r_addend", "<i8")])
REL = np.dtype([("r_offset", "<u8"), ("r_info", "<u8")])
VERDEF = np.dtype([
    ("vd_version", "<u2"), ("vd_flags", "<u2"), ("vd_ndx", "<u2"), ("vd_cnt", "<u2"),
    ("vd_hash", "<u4"), ("vd_aux", "<u4"), ("vd_next", "<u4"),
])
VERDAUX = np.dtype([("vda_name", "<u4"), ("vda_next", "<u4")])
VERNEED = np.dtype([
    ("vn_version", "<u2"), ("vn_cnt", "<u2"), ("vn_file", "<u4"), ("vn_aux", "<u4"),
    ("vn_next", "<u4"),
])
VERNAUX = np.dtype([
    ("vna_hash", "<u4"), ("vna_flags", "<u2"), ("vna_other", "<u2"), ("vna_name", "<u4"),
    ("vna_next", "<u4"),
])

ELF_IDENT = bytes([0x7F, ord("E"), ord("L"), ord("F"), 2, 1, 1, 0]) + bytes(8)
"""e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV, padding."""


def pack(dtype: np.dtype[Any], **fields: int | bytes) -> bytes:
    """One record of ``dtype`` with the named fields set (the rest zero), as bytes.

    >>> len(pack(PHDR, p_type=PT_LOAD, p_flags=PF_R))
    56
    """
    layout, names = _struct_of(dtype)
    return layout.pack(*[fields.get(name, 0) for name in names])


def pack_rows(dtype: np.dtype[Any], rows: Sequence[Mapping[str, int]]) -> bytes:
    """A table of ``dtype`` records, one per mapping of field names to values."""
    layout, names = _struct_of(dtype)
    return b"".join([layout.pack(*[row.get(name, 0) for name in names]) for row in rows])


_STRUCT_CODES = {"u1": "B", "<u2": "H", "<u4": "I", "<u8": "Q", "<i8": "q"}
_STRUCTS: dict[np.dtype[Any], tuple[struct.Struct, tuple[str, ...]]] = {}


def _struct_of(dtype: np.dtype[Any]) -> tuple[struct.Struct, tuple[str, ...]]:
    """A ``struct.Struct`` with the same layout as the record ``dtype`` (packing a record
    with it is many times cheaper than through numpy), and its field names; cached."""
    cached = _STRUCTS.get(dtype)
    if cached is None:
        codes = []
        for name in dtype.names or ():
            sub = dtype.fields[name][0]  # type: ignore[index]
            if sub.shape:
                codes.append(f"{sub.shape[0]}s")
            else:
                codes.append(_STRUCT_CODES[sub.str.replace("|", "")])
        layout = struct.Struct("<" + "".join(codes))
        assert layout.size == dtype.itemsize, dtype
        cached = _STRUCTS[dtype] = (layout, tuple(dtype.names or ()))
    return cached


def r_info(sym: int, rtype: int) -> int:
    """ELF64_R_INFO: the symbol index in the high 32 bits, the type in the low 32."""
    return (sym << 32) | rtype


@functools.lru_cache(maxsize=4096)
def elf_hash(name: bytes) -> int:
    """The SysV ``DT_HASH`` hash of a symbol name (the gABI's ``elf_hash``)."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


@functools.lru_cache(maxsize=4096)
def gnu_hash(name: bytes) -> int:
    """The ``DT_GNU_HASH`` hash of a symbol name: djb2 (h*33 + c) modulo 2**32."""
    h = 5381
    for c in name:
        h = (h * 33 + c) & 0xFFFFFFFF
    return h


def smallest_shared_object() -> bytes:
    """The smallest shared object glibc's ``dlopen`` accepts, built one field at a time.

    One PT_LOAD maps the whole 297-byte file read-write at vaddr 0; PT_DYNAMIC points at the
    dynamic section inside it. ``ld.so`` needs only three things from that section: where the
    string table is (``DT_STRTAB``), where the symbol table is (``DT_SYMTAB``), and a hash
    table (``DT_HASH``) to look symbols up in. Our symbol table holds only the null symbol;
    the hash table has one empty bucket.

    >>> so = smallest_shared_object()
    >>> len(so), so[:4]
    (297, b'\\x7fELF')
    """
    ehsize, phentsize, phnum = EHDR.itemsize, PHDR.itemsize, 2
    # The file, in order: ELF header, 2 program headers, .dynamic (5 entries), .dynsym (the
    # null symbol), .hash (nbucket=1, nchain=1, bucket[0]=0, chain[0]=0), .dynstr ("\0").
    dynamic_at = ehsize + phnum * phentsize                 # 176
    dynsym_at = dynamic_at + 5 * DYN.itemsize               # 256
    hash_at = dynsym_at + SYM.itemsize                      # 280
    dynstr_at = hash_at + 4 * 4                             # 296
    size = dynstr_at + 1                                    # 297 bytes in all
    header = pack(
        EHDR, e_ident=ELF_IDENT, e_type=ET_DYN, e_machine=EM_X86_64, e_version=1,
        e_phoff=ehsize, e_ehsize=ehsize, e_phentsize=phentsize, e_phnum=phnum,
        e_shentsize=SHDR.itemsize,
    )
    load = pack(PHDR, p_type=PT_LOAD, p_flags=PF_R | PF_W, p_offset=0, p_vaddr=0, p_paddr=0,
                p_filesz=size, p_memsz=size, p_align=0x1000)
    dynamic = pack(PHDR, p_type=PT_DYNAMIC, p_flags=PF_R | PF_W, p_offset=dynamic_at,
                   p_vaddr=dynamic_at, p_paddr=dynamic_at, p_filesz=5 * DYN.itemsize,
                   p_memsz=5 * DYN.itemsize, p_align=8)
    entries = pack_rows(DYN, [
        {"d_tag": DT_HASH, "d_val": hash_at},
        {"d_tag": DT_STRTAB, "d_val": dynstr_at},
        {"d_tag": DT_SYMTAB, "d_val": dynsym_at},
        {"d_tag": DT_STRSZ, "d_val": 1},
        {"d_tag": DT_NULL, "d_val": 0},
    ])
    null_symbol = pack(SYM)
    sysv_hash = np.array([1, 1, 0, 0], dtype="<u4").tobytes()
    dynstr = b"\0"
    return header + load + dynamic + entries + null_symbol + sysv_hash + dynstr


# --------------------------------------------------------------------------------------------
# Descriptions.

Flags = Literal["r", "rw", "rx", "rwx"]
Ref = tuple[int, int]
"""(segment index, byte offset in that segment): a place the description talks about."""


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD of the user's: ``data`` from the file, then ``bss`` zero bytes.

    ``relro``: bytes at the segment's start that are RELRO (read-only after relocation), 0 for
    none; at most one segment may have it. ``gap``: extra ``align``-sized holes of address
    space before the segment (its vaddr then differs from its file offset by more, and stays
    congruent to it).
    """

    flags: Flags
    data: bytes = b""
    bss: int = 0
    relro: int = 0
    gap: int = 0

    @property
    def memsz(self) -> int:
        """Bytes the segment occupies in memory: data plus .bss."""
        return len(self.data) + self.bss

    def __repr__(self) -> str:
        extras = "".join(f", {k}={v}" for k, v in (("bss", self.bss), ("relro", self.relro),
                                                    ("gap", self.gap)) if v)
        return f"Segment({self.flags!r}, data=<{len(self.data)} bytes>{extras})"


@dataclass(frozen=True)
class Symbol:
    """A dynamic symbol: defined at ``segment``/``offset`` or, with ``segment`` None, undefined.

    ``version``: a version this object defines (``VERDEF``) for a defined symbol, or for an
    undefined one ``"LIB:VERSION"`` naming a needed library and one of its versions (VERNEED).
    """

    name: str
    segment: int | None = None
    offset: int = 0
    size: int = 8
    type: Literal["object", "func", "notype"] = "object"
    bind: Literal["global", "weak"] = "global"
    version: str | None = None


@dataclass(frozen=True)
class Reloc:
    """A dynamic relocation at ``segment``/``offset``.

    ``RELATIVE``: the word becomes B + vaddr(``target``) + ``addend``. ``64``: S + ``addend``.
    ``GLOB_DAT`` and ``JUMP_SLOT``: S. (B is the load bias, S the symbol's address.)
    ``COPY``: the symbol's ``size`` bytes copied from its definition in another object (the
    symbol must be an import). ``JUMP_SLOT`` entries go to ``DT_JMPREL``, the others to
    ``DT_RELA``/``DT_REL``; with ``ElfSpec.relr`` the RELATIVE ones go to ``DT_RELR``
    instead.
    """

    type: Literal["RELATIVE", "64", "GLOB_DAT", "JUMP_SLOT", "COPY"]
    segment: int
    offset: int
    symbol: str | None = None
    target: Ref | None = None
    addend: int = 0


@dataclass(frozen=True)
class ElfSpec:
    """What to write. Every knob has a default that gives a plain ``-shared`` object.

    ``kind``: "dyn" (a shared object, or a PIE with ``pie``) or "exec" (ET_EXEC at ``base``).
    ``align``: p_align of every PT_LOAD, the "max page size" (a power of two, at least a page).
    ``rel_format``: "rela" (what x86-64 uses) or "rel" (addends in place). ``relr``: pack the
    RELATIVE relocations as ``DT_RELR``. ``hash``: which hash tables. ``textrel``: allow
    relocations in read-only segments and say so (DT_TEXTREL). ``sections``: emit section
    headers. ``pad_segments``: start every segment at a page boundary of the file too.
    ``entry``: where e_entry points. ``init_array``/``fini_array``: the slots (consecutive
    words of a writable segment, each holding a RELATIVE relocation whose target is in an
    executable segment) that ``DT_INIT_ARRAY``/``DT_FINI_ARRAY`` point at.
    """

    segments: tuple[Segment, ...] = ()
    symbols: tuple[Symbol, ...] = ()
    relocs: tuple[Reloc, ...] = ()
    kind: Literal["dyn", "exec"] = "dyn"
    pie: bool = False
    base: int = 0
    align: int = 0x1000
    rel_format: Literal["rela", "rel"] = "rela"
    relr: bool = False
    relcount: bool = True
    hash: Literal["gnu", "sysv", "both"] = "both"
    textrel: bool = False
    bind_now: bool = True
    sections: bool = True
    pad_segments: bool = False
    soname: str | None = "libvmsim-synthetic.so"
    needed: tuple[str, ...] = ()
    interp: str | None = None
    gnu_stack: bool = True
    entry: Ref | None = None
    init_array: tuple[Ref, ...] = ()
    fini_array: tuple[Ref, ...] = ()


@dataclass(frozen=True)
class TableInfo:
    """Where one table landed: file ``offset``, ``vaddr``, ``size`` in bytes, entry size and
    alignment."""

    offset: int
    vaddr: int
    size: int
    entsize: int = 0
    align: int = 8


@dataclass
class ElfImage:
    """A built image: ``data`` (the file's bytes), the ``spec`` it came from, and the layout.

    ``phdrs`` are the program headers as written (a numpy record array) at file offset
    ``phoff``; ``tables`` maps table names (``"dynsym"``, ``"dynstr"``, ``"hash"``,
    ``"gnu_hash"``, ``"versym"``, ``"verdef"``, ``"verneed"``, ``"rela"``, ``"rel"``,
    ``"jmprel"``, ``"relr"``, ``"dynamic"``, ``"shdrs"``) to where they are; ``dynamic_tags``
    maps each tag in ``.dynamic`` to its entry index. ``segments`` lists, per user segment,
    its (offset, vaddr).
    """

    data: bytes
    spec: ElfSpec
    phoff: int
    phdrs: npt.NDArray[Any]
    tables: dict[str, TableInfo]
    dynamic_tags: dict[int, int]
    segments: list[tuple[int, int]]
    symbol_index: dict[str, int]
    words: dict[int, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ElfImage(<{len(self.data)} bytes>, spec={self.spec!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a drawn image: its ``repr`` (hypothesis' printer would
        otherwise list a dataclass field by field, the file's bytes included)."""
        printer.text(repr(self))

    def segment_vaddr(self, index: int) -> int:
        """The link-time vaddr of user segment ``index``."""
        return self.segments[index][1]

    def symbol_vaddr(self, name: str) -> int:
        """The link-time vaddr (st_value) of defined symbol ``name``; KeyError if absent."""
        sym = next(s for s in self.spec.symbols if s.name == name and s.segment is not None)
        assert sym.segment is not None
        return self.segment_vaddr(sym.segment) + sym.offset

    def expected_words(self) -> dict[int, int]:
        """The 64-bit words a correct loader writes: link vaddr -> value minus the load bias.

        Only relocations against defined symbols are predicted (they all come out as
        ``load_bias + delta``); those against undefined symbols depend on the resolver.
        """
        return dict(self.words)

    @property
    def load_segments(self) -> npt.NDArray[Any]:
        """The PT_LOAD program headers, in file order."""
        loads: npt.NDArray[Any] = self.phdrs[self.phdrs["p_type"] == PT_LOAD]
        return loads


# --------------------------------------------------------------------------------------------
# Layout: from a description to bytes.

_SECTION_NAMES = {"r": ".rodata", "rx": ".text", "rw": ".data", "rwx": ".rwx"}


def _pf(flags: str) -> int:
    """PF_R|PF_W|PF_X from ``"rwx"`` letters."""
    return ((PF_R if "r" in flags else 0) | (PF_W if "w" in flags else 0)
            | (PF_X if "x" in flags else 0))


class _Strtab:
    """A string table under construction: ``add`` returns each name's offset, deduplicated."""

    def __init__(self) -> None:
        self.blob = bytearray(b"\0")
        self.index: dict[str, int] = {"": 0}

    def add(self, name: str) -> int:
        if name not in self.index:
            self.index[name] = len(self.blob)
            self.blob += name.encode() + b"\0"
        return self.index[name]


def check_spec(spec: ElfSpec) -> None:
    """Raise ValueError naming the field and value when ``spec`` cannot be laid out validly."""
    if spec.align < 0x1000 or spec.align & (spec.align - 1):
        raise ValueError(f"align={spec.align:#x}: must be a power of two >= 0x1000")
    if sum(1 for s in spec.segments if s.relro) > 1:
        raise ValueError("relro: at most one segment may have a RELRO prefix")
    names = [s.name for s in spec.symbols]
    if len(set(names)) != len(names):
        raise ValueError(f"symbols: duplicate names in {names}")
    for i, seg in enumerate(spec.segments):
        if not 0 <= seg.relro <= seg.memsz:
            raise ValueError(f"segments[{i}].relro={seg.relro}: must be in [0, {seg.memsz}]")
    for name in ("init_array", "fini_array"):
        _check_array(spec, name, getattr(spec, name))
    sites = set()
    for rel in spec.relocs:
        _check_reloc(spec, rel)
        site = (rel.segment, rel.offset)
        if site in sites:
            raise ValueError(f"relocs: two relocations at segment {rel.segment} "
                             f"offset {rel.offset:#x}")
        sites.add(site)


def _check_array(spec: ElfSpec, name: str, slots: tuple[Ref, ...]) -> None:
    """Raise ValueError unless ``slots`` are consecutive words each relocated (RELATIVE) to
    code: glibc calls every entry of DT_INIT_ARRAY/DT_FINI_ARRAY."""
    targets = {(r.segment, r.offset): r.target for r in spec.relocs if r.type == "RELATIVE"}
    for k, slot in enumerate(slots):
        if slot != (slots[0][0], slots[0][1] + 8 * k):
            raise ValueError(f"{name}[{k}]={slot}: the slots must be consecutive words")
        target = targets.get(slot)
        if target is None or "x" not in spec.segments[target[0]].flags:
            raise ValueError(f"{name}[{k}]={slot}: needs a RELATIVE relocation to code there")


def _check_reloc(spec: ElfSpec, rel: Reloc) -> None:
    """Raise ValueError when ``rel`` points outside its segment or names nothing it may."""
    if rel.type not in RELOC_TYPES:
        raise ValueError(f"reloc type {rel.type!r}: must be one of {sorted(RELOC_TYPES)}")
    if not 0 <= rel.segment < len(spec.segments):
        raise ValueError(f"reloc segment={rel.segment}: only {len(spec.segments)} segments")
    seg = spec.segments[rel.segment]
    in_place = spec.rel_format == "rel" or (spec.relr and rel.type == "RELATIVE")
    limit = len(seg.data) if in_place else seg.memsz
    if not 0 <= rel.offset <= limit - 8:
        raise ValueError(f"reloc offset={rel.offset:#x}: the word must lie in [0, {limit:#x})")
    if "w" not in seg.flags and not spec.textrel:
        raise ValueError(f"reloc in segment {rel.segment} ({seg.flags!r}) needs textrel=True")
    if (rel.type == "RELATIVE") != (rel.symbol is None):
        raise ValueError(f"reloc {rel.type}: symbol={rel.symbol!r} (RELATIVE takes none, "
                         "the others need one)")
    if rel.symbol is not None and rel.symbol not in {s.name for s in spec.symbols}:
        raise ValueError(f"reloc symbol {rel.symbol!r} is not among the symbols")
    if rel.type == "COPY":
        sym = next(s for s in spec.symbols if s.name == rel.symbol)
        if sym.segment is not None:
            raise ValueError(f"COPY of {sym.name!r}: the symbol must be an import")
        if rel.offset + sym.size > seg.memsz or "w" not in seg.flags:
            raise ValueError(f"COPY of {sym.name!r} ({sym.size} bytes) at {rel.offset:#x}: "
                             "must fit in a writable segment")
    if spec.relr and rel.type == "RELATIVE" and rel.offset % 8:
        raise ValueError(f"reloc offset={rel.offset:#x}: RELR needs 8-byte alignment")


def build(spec: ElfSpec) -> ElfImage:
    """Lay ``spec`` out and return the image; ValueError (from :func:`check_spec`) if it can't.

    File order: ELF header, program headers, the dynamic tables (hash tables, dynsym, dynstr,
    version tables, relocation tables), the user's segments, ``.dynamic``, section headers.
    The first two go in a read-only PT_LOAD at ``spec.base``; ``.dynamic`` in a final
    read-write one. Each PT_LOAD starts on a fresh ``align`` boundary of address space at
    the same offset within it as in the file.
    """
    check_spec(spec)
    return _Builder(spec).run()


class _Builder:
    """The state of one layout: the file being written and what was placed where."""

    def __init__(self, spec: ElfSpec) -> None:
        self.spec = spec
        self.dynstr = _Strtab()
        self.shstrtab = _Strtab()
        self.tables: dict[str, TableInfo] = {}
        self.seg_places: list[tuple[int, int]] = []
        self.ordered = self._order_symbols()
        self.symbol_index = {s.name: i + 1 for i, s in enumerate(self.ordered)}
        self.version_index = self._version_indices()
        self.fixed: list[tuple[str, bytes, int, int]] | None = None

    # -- symbols and versions ----------------------------------------------------------------

    def _order_symbols(self) -> list[Symbol]:
        """Undefined symbols first, then defined ones sorted by GNU hash bucket (DT_GNU_HASH
        requires every bucket's symbols to be contiguous, after ``symoffset``)."""
        undef = [s for s in self.spec.symbols if s.segment is None]
        defined = [s for s in self.spec.symbols if s.segment is not None]
        nbuckets = self._gnu_nbuckets(len(defined))
        defined.sort(key=lambda s: gnu_hash(s.name.encode()) % nbuckets)
        return undef + defined

    @staticmethod
    def _gnu_nbuckets(ndefined: int) -> int:
        """A bucket count for the GNU hash table: about one bucket per two symbols."""
        return max(1, ndefined // 2)

    def _version_indices(self) -> dict[str, int]:
        """Version name -> versym index: defined versions from 2, then needed ones."""
        defined = sorted({s.version for s in self.spec.symbols
                          if s.version is not None and s.segment is not None})
        needed = sorted({s.version for s in self.spec.symbols
                         if s.version is not None and s.segment is None})
        extra = [v for v in self._extra_needed_versions() if v not in needed]
        names = defined + needed + extra
        return {name: i + 2 for i, name in enumerate(names)}

    def _extra_needed_versions(self) -> list[str]:
        """glibc insists that an object using DT_RELR needs ``GLIBC_ABI_DT_RELR`` from libc."""
        relr = self.spec.relr and any(r.type == "RELATIVE" for r in self.spec.relocs)
        return ["libc.so.6:GLIBC_ABI_DT_RELR"] if relr else []

    def needed_libs(self) -> list[str]:
        """DT_NEEDED entries: the spec's, plus any library a needed version names."""
        libs = list(self.spec.needed)
        for name in self.version_index:
            if ":" in name and name.split(":", 1)[0] not in libs:
                libs.append(name.split(":", 1)[0])
        return libs

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> ElfImage:
        """Place everything, then write the bytes.

        Table sizes hardly depend on addresses (only DT_RELR's, whose bitmaps depend on the
        distances between relocated words), so: place with the sizes computed so far, rebuild
        the tables at the new addresses, and repeat until no table grew. Sizes only grow, so
        this ends; a RELR table that came out smaller than its room is padded with empty
        bitmaps.
        """
        spec = self.spec
        self.phoff = EHDR.itemsize
        for name in self.needed_libs():
            self.dynstr.add(name)
        if spec.soname:
            self.dynstr.add(spec.soname)
        room: dict[str, int] = {}
        while True:
            tables = self._dynamic_tables()
            grown = {name: max(len(blob), room.get(name, 0)) for name, blob, _a, _e in tables}
            if grown == room:
                break
            room = grown
            self._place(tables, room)
        dynamic = self._dynamic_section()
        self.tables["dynamic"] = TableInfo(self.dyn_offset, self.dyn_vaddr, len(dynamic),
                                           DYN.itemsize)
        out = bytearray(self.dyn_offset + len(dynamic))
        for name, blob, _align, _ent in tables:
            info = self.tables[name]
            padding = np.ones((info.size - len(blob)) // 8, dtype="<u8").tobytes()
            out[info.offset:info.offset + info.size] = blob + padding
        for (off, _va), seg in zip(self.seg_places, spec.segments, strict=True):
            out[off:off + len(seg.data)] = seg.data
        words = self._apply_in_place(out)
        out[self.dyn_offset:self.dyn_offset + len(dynamic)] = dynamic
        shoff = shnum = shstrndx = 0
        if spec.sections:
            shoff, shnum, shstrndx = self._append_sections(out)
        phdrs = self._phdrs()
        out[self.phoff:self.phoff + phdrs.nbytes] = phdrs.tobytes()
        out[:EHDR.itemsize] = self._ehdr(len(phdrs), shoff, shnum, shstrndx)
        return ElfImage(bytes(out), spec, self.phoff, phdrs, self.tables, self.tag_index,
                        list(self.seg_places), dict(self.symbol_index), words)

    def _place(self, tables: list[tuple[str, bytes, int, int]], room: dict[str, int]) -> None:
        """Give every table its file offset and vaddr (``room[name]`` bytes each), then every
        user segment, then ``.dynamic``: each segment at the next ``align`` boundary of
        address space plus its file offset modulo ``align``."""
        spec = self.spec
        cursor = self.phoff + self._phdr_count() * PHDR.itemsize
        self.tables = {}
        for name, _blob, align, entsize in tables:
            cursor = page_round_up(cursor, align)
            self.tables[name] = TableInfo(cursor, spec.base + cursor, room[name], entsize, align)
            cursor += room[name]
        self.head_end = cursor
        vaddr_end = spec.base + cursor
        self.seg_places = []
        for seg in spec.segments:
            cursor = page_round_up(cursor, spec.align if spec.pad_segments else 16)
            vaddr = (page_round_up(vaddr_end, spec.align) + seg.gap * spec.align
                     + cursor % spec.align)
            self.seg_places.append((cursor, vaddr))
            cursor += len(seg.data)
            vaddr_end = vaddr + seg.memsz
        cursor = page_round_up(cursor, spec.align if spec.pad_segments else 16)
        self.dyn_offset = cursor
        self.dyn_vaddr = page_round_up(vaddr_end, spec.align) + cursor % spec.align

    def _phdr_count(self) -> int:
        """How many program headers ``_phdrs`` will write."""
        spec = self.spec
        extra = (spec.kind == "exec" or spec.pie) + (spec.interp is not None)
        extra += bool(any(s.relro for s in spec.segments)) + spec.gnu_stack
        return 2 + len(spec.segments) + 1 + extra

    def _ehdr(self, phnum: int, shoff: int, shnum: int, shstrndx: int) -> bytes:
        """The ELF header."""
        spec = self.spec
        entry = 0
        if spec.entry is not None:
            entry = self.seg_places[spec.entry[0]][1] + spec.entry[1]
        return pack(
            EHDR, e_ident=ELF_IDENT, e_type=ET_EXEC if spec.kind == "exec" else ET_DYN,
            e_machine=EM_X86_64, e_version=1, e_entry=entry, e_phoff=self.phoff,
            e_shoff=shoff, e_ehsize=EHDR.itemsize, e_phentsize=PHDR.itemsize, e_phnum=phnum,
            e_shentsize=SHDR.itemsize, e_shnum=shnum, e_shstrndx=shstrndx,
        )

    def _phdrs(self) -> npt.NDArray[Any]:
        """The program header table: PHDR, INTERP, LOADs, DYNAMIC, GNU_RELRO, GNU_STACK."""
        spec = self.spec
        rows: list[dict[str, int]] = []
        nphdr = self._phdr_count()
        if spec.kind == "exec" or spec.pie:
            size = nphdr * PHDR.itemsize
            rows.append(dict(p_type=PT_PHDR, p_flags=PF_R, p_offset=self.phoff,
                             p_vaddr=spec.base + self.phoff, p_filesz=size, p_memsz=size,
                             p_align=8))
        if spec.interp is not None:
            info = self.tables["interp"]
            rows.append(dict(p_type=PT_INTERP, p_flags=PF_R, p_offset=info.offset,
                             p_vaddr=info.vaddr, p_filesz=info.size, p_memsz=info.size,
                             p_align=1))
        rows.append(dict(p_type=PT_LOAD, p_flags=PF_R, p_offset=0, p_vaddr=spec.base,
                         p_filesz=self.head_end, p_memsz=self.head_end, p_align=spec.align))
        for (off, va), seg in zip(self.seg_places, spec.segments, strict=True):
            rows.append(dict(p_type=PT_LOAD, p_flags=_pf(seg.flags), p_offset=off,
                             p_vaddr=va, p_filesz=len(seg.data), p_memsz=seg.memsz,
                             p_align=spec.align))
        dyn = self.tables["dynamic"]
        rows.append(dict(p_type=PT_LOAD, p_flags=PF_R | PF_W, p_offset=dyn.offset,
                         p_vaddr=dyn.vaddr, p_filesz=dyn.size, p_memsz=dyn.size,
                         p_align=spec.align))
        rows.append(dict(p_type=PT_DYNAMIC, p_flags=PF_R | PF_W, p_offset=dyn.offset,
                         p_vaddr=dyn.vaddr, p_filesz=dyn.size, p_memsz=dyn.size, p_align=8))
        for (off, va), seg in zip(self.seg_places, spec.segments, strict=True):
            if seg.relro:
                rows.append(dict(p_type=PT_GNU_RELRO, p_flags=PF_R, p_offset=off, p_vaddr=va,
                                 p_filesz=min(seg.relro, len(seg.data)), p_memsz=seg.relro,
                                 p_align=1))
        if spec.gnu_stack:
            rows.append(dict(p_type=PT_GNU_STACK, p_flags=PF_R | PF_W, p_align=16))
        for row in rows:
            row["p_paddr"] = row.get("p_vaddr", 0)
        assert len(rows) == nphdr
        table: npt.NDArray[Any] = np.frombuffer(pack_rows(PHDR, rows), dtype=PHDR).copy()
        return table

    # -- dynamic tables ----------------------------------------------------------------------

    def _vaddr_of(self, ref: Ref) -> int:
        """Link-time vaddr of a (segment, offset) reference (0 before layout)."""
        if not self.seg_places:
            return 0
        return self.seg_places[ref[0]][1] + ref[1]

    def _dynamic_tables(self) -> list[tuple[str, bytes, int, int]]:
        """(name, bytes, alignment, entry size) for every table of the headers segment.

        Only the symbol and relocation tables hold addresses; the others (hashes, strings,
        versions) are written once and reused by the later passes of :meth:`run`."""
        fixed = self._fixed_tables()
        out = [t for t in fixed if t[0] in ("interp", "hash", "gnu_hash")]
        out.append(("dynsym", self._dynsym(), 8, SYM.itemsize))
        out.extend(t for t in fixed if t[0] not in ("interp", "hash", "gnu_hash"))
        out.extend(self._reloc_tables())
        return out

    def _fixed_tables(self) -> list[tuple[str, bytes, int, int]]:
        """The tables that hold no address, in file order (interp, hashes, dynstr, versions);
        computed on the first call. The dynamic string table is complete only after every
        symbol name and the version tables' names were added."""
        if self.fixed is None:
            spec = self.spec
            out: list[tuple[str, bytes, int, int]] = []
            if spec.interp is not None:
                out.append(("interp", spec.interp.encode() + b"\0", 1, 0))
            if spec.hash in ("sysv", "both"):
                out.append(("hash", self._sysv_hash(), 8, 4))
            if spec.hash in ("gnu", "both"):
                out.append(("gnu_hash", self._gnu_hash(), 8, 0))
            for sym in self.ordered:
                self.dynstr.add(sym.name)
            versions = self._version_tables()
            out.append(("dynstr", bytes(self.dynstr.blob), 1, 0))
            self.fixed = out + versions
        return self.fixed

    def _symbol_value(self, sym: Symbol) -> int:
        """st_value: the symbol's link-time vaddr, 0 when undefined."""
        return 0 if sym.segment is None else self._vaddr_of((sym.segment, sym.offset))

    def _dynsym(self) -> bytes:
        """The dynamic symbol table: the null symbol, then ``self.ordered``."""
        types = {"object": STT_OBJECT, "func": STT_FUNC, "notype": STT_NOTYPE}
        binds = {"global": STB_GLOBAL, "weak": STB_WEAK}
        sections = {name: i for i, name in enumerate(self._section_list())}
        rows: list[dict[str, int]] = [{}]
        for sym in self.ordered:
            rows.append(dict(
                st_name=self.dynstr.add(sym.name),
                st_info=(binds[sym.bind] << 4) | types[sym.type],
                st_shndx=SHN_UNDEF if sym.segment is None else self._shndx(sym, sections),
                st_value=self._symbol_value(sym), st_size=sym.size,
            ))
        return pack_rows(SYM, rows)

    def _section_list(self) -> list[str]:
        """Section names in header order (index 0 is the null section)."""
        names = [""] + [n for n in ("interp", "hash", "gnu_hash", "dynsym", "dynstr", "versym",
                                    "verdef", "verneed", "rela", "rel", "jmprel", "relr")
                        if self._has_table(n)]
        for i, seg in enumerate(self.spec.segments):
            if seg.data:
                names.append(f"seg{i}")
            if seg.bss:
                names.append(f"bss{i}")
        return [*names, "dynamic", "shstrtab"]

    def _has_table(self, name: str) -> bool:
        """Whether the headers segment holds table ``name`` (known after the first pass)."""
        return name in self.tables or (not self.tables and name in ("dynsym", "dynstr"))

    def _shndx(self, sym: Symbol, sections: dict[str, int]) -> int:
        """st_shndx for a symbol defined in a user segment: its section's index in
        ``sections`` (:meth:`_section_list` by name; used even without section headers: only
        SHN_UNDEF and SHN_ABS mean something to ld.so)."""
        assert sym.segment is not None
        in_data = sym.offset < len(self.spec.segments[sym.segment].data)
        return sections[f"seg{sym.segment}" if in_data else f"bss{sym.segment}"]

    def _sysv_hash(self) -> bytes:
        """DT_HASH: nbucket, nchain, bucket[], chain[]; every symbol chained into its bucket."""
        nsyms = len(self.ordered) + 1
        nbucket = max(1, nsyms // 2)
        bucket = np.zeros(nbucket, dtype="<u4")
        chain = np.zeros(nsyms, dtype="<u4")
        for i, sym in enumerate(self.ordered, start=1):
            b = elf_hash(sym.name.encode()) % nbucket
            chain[i] = bucket[b]
            bucket[b] = i
        head = np.array([nbucket, nsyms], dtype="<u4")
        return head.tobytes() + bucket.tobytes() + chain.tobytes()

    def _gnu_hash(self) -> bytes:
        """DT_GNU_HASH: header, bloom filter, buckets, and hash chains of defined symbols."""
        symoffset = 1 + sum(1 for s in self.ordered if s.segment is None)
        defined = self.ordered[symoffset - 1:]
        nbuckets = self._gnu_nbuckets(len(defined))
        bloom_size, bloom_shift = 1, 6
        while bloom_size * 64 < 2 * max(1, len(defined)):
            bloom_size *= 2
        hashes = [gnu_hash(s.name.encode()) for s in defined]
        bloom = np.zeros(bloom_size, dtype="<u8")
        buckets = np.zeros(nbuckets, dtype="<u4")
        chain = np.zeros(len(defined), dtype="<u4")
        for i, h in enumerate(hashes):
            word = (h // 64) % bloom_size
            bloom[word] |= np.uint64((1 << (h % 64)) | (1 << ((h >> bloom_shift) % 64)))
            b = h % nbuckets
            if buckets[b] == 0:
                buckets[b] = symoffset + i
            last = i + 1 == len(hashes) or hashes[i + 1] % nbuckets != b
            chain[i] = (h & ~1) | int(last)
        head = np.array([nbuckets, symoffset, bloom_size, bloom_shift], dtype="<u4")
        return head.tobytes() + bloom.tobytes() + buckets.tobytes() + chain.tobytes()

    def _version_tables(self) -> list[tuple[str, bytes, int, int]]:
        """versym (one u16 per symbol), verdef (base + each defined version), verneed."""
        if not self.version_index:
            return []
        versym = [0] + [self._versym(s) for s in self.ordered]
        out = [("versym", np.array(versym, dtype="<u2").tobytes(), 2, 2)]
        defined = [n for n in self.version_index if ":" not in n]
        if defined:
            out.append(("verdef", self._verdef(defined), 8, 0))
        needed = [n for n in self.version_index if ":" in n]
        if needed:
            out.append(("verneed", self._verneed(needed), 8, 0))
        return out

    def _versym(self, sym: Symbol) -> int:
        """A symbol's versym entry: its version's index, else 1 (global) or 0 (undefined)."""
        if sym.version is not None:
            return self.version_index[sym.version]
        return 0 if sym.segment is None else 1

    def _verdef(self, names: list[str]) -> bytes:
        """Verdef entries: the base version (the soname) and one per defined version."""
        base = self.spec.soname or "synthetic"
        entries = [(base, 1, VER_FLG_BASE)] + [(n, self.version_index[n], 0) for n in names]
        blob = b""
        for k, (name, ndx, flags) in enumerate(entries):
            nxt = 0 if k + 1 == len(entries) else VERDEF.itemsize + VERDAUX.itemsize
            blob += pack(VERDEF, vd_version=1, vd_flags=flags, vd_ndx=ndx, vd_cnt=1,
                         vd_hash=elf_hash(name.encode()), vd_aux=VERDEF.itemsize,
                         vd_next=nxt)
            blob += pack(VERDAUX, vda_name=self.dynstr.add(name), vda_next=0)
        return blob

    def _verneed(self, names: list[str]) -> bytes:
        """Verneed entries, one per needed library, each with its Vernaux versions."""
        by_lib: dict[str, list[str]] = {}
        for n in names:
            lib, version = n.split(":", 1)
            by_lib.setdefault(lib, []).append(n)
        blob = b""
        for k, (lib, versions) in enumerate(by_lib.items()):
            size = VERNEED.itemsize + len(versions) * VERNAUX.itemsize
            blob += pack(VERNEED, vn_version=1, vn_cnt=len(versions),
                         vn_file=self.dynstr.add(lib), vn_aux=VERNEED.itemsize,
                         vn_next=0 if k + 1 == len(by_lib) else size)
            for j, full in enumerate(versions):
                version = full.split(":", 1)[1]
                blob += pack(VERNAUX, vna_hash=elf_hash(version.encode()), vna_flags=0,
                             vna_other=self.version_index[full],
                             vna_name=self.dynstr.add(version),
                             vna_next=0 if j + 1 == len(versions) else VERNAUX.itemsize)
        return blob

    # -- relocations -------------------------------------------------------------------------

    def _split_relocs(self) -> tuple[list[Reloc], list[Reloc], list[Reloc]]:
        """(relative-in-RELR, dynamic, plt): dynamic has RELATIVE first (for DT_RELACOUNT)."""
        relocs = self.spec.relocs
        relative = [r for r in relocs if r.type == "RELATIVE"]
        relr = relative if self.spec.relr else []
        dyn = [] if self.spec.relr else list(relative)
        dyn += [r for r in relocs if r.type in ("64", "GLOB_DAT", "COPY")]
        plt = [r for r in relocs if r.type == "JUMP_SLOT"]
        return relr, dyn, plt

    def _addend(self, rel: Reloc) -> int:
        """A of the relocation: vaddr(target)+addend for RELATIVE, ``addend`` otherwise."""
        if rel.type == "RELATIVE":
            target = rel.target if rel.target is not None else (rel.segment, 0)
            return self._vaddr_of(target) + rel.addend
        return 0 if rel.type in ("GLOB_DAT", "JUMP_SLOT", "COPY") else rel.addend

    def _reloc_rows(self, relocs: list[Reloc]) -> list[dict[str, int]]:
        """r_offset/r_info/r_addend rows for ``relocs``."""
        rows = []
        for rel in relocs:
            sym = 0 if rel.symbol is None else self.symbol_index[rel.symbol]
            rows.append(dict(r_offset=self._vaddr_of((rel.segment, rel.offset)),
                             r_info=r_info(sym, RELOC_TYPES[rel.type]),
                             r_addend=self._addend(rel)))
        return rows

    def _reloc_tables(self) -> list[tuple[str, bytes, int, int]]:
        """The RELA (or REL), JMPREL and RELR tables that have entries."""
        relr, dyn, plt = self._split_relocs()
        dtype = RELA if self.spec.rel_format == "rela" else REL
        name: str = self.spec.rel_format
        out: list[tuple[str, bytes, int, int]] = []
        if dyn:
            out.append((name, pack_rows(dtype, self._reloc_rows(dyn)), 8, dtype.itemsize))
        if plt:
            out.append(("jmprel", pack_rows(dtype, self._reloc_rows(plt)), 8, dtype.itemsize))
        if relr:
            addrs = sorted(self._vaddr_of((r.segment, r.offset)) for r in relr)
            out.append(("relr", encode_relr(addrs).tobytes(), 8, 8))
        return out

    def _apply_in_place(self, out: bytearray) -> dict[int, int]:
        """Write in-place addends (REL, RELR) into ``out``; return the predicted words."""
        relr, dyn, plt = self._split_relocs()
        in_place = set(map(id, relr)) | (set(map(id, dyn + plt))
                                         if self.spec.rel_format == "rel" else set())
        words: dict[int, int] = {}
        for rel in self.spec.relocs:
            vaddr = self._vaddr_of((rel.segment, rel.offset))
            addend = self._addend(rel)
            if id(rel) in in_place:
                off = self.seg_places[rel.segment][0] + rel.offset
                out[off:off + 8] = (addend & (2**64 - 1)).to_bytes(8, "little")
            predicted = self._predict(rel, addend)
            if predicted is not None:
                words[vaddr] = predicted
        return words

    def _predict(self, rel: Reloc, addend: int) -> int | None:
        """The relocated word minus the load bias, or None when it depends on the resolver."""
        if rel.type == "RELATIVE":
            return addend
        sym = next(s for s in self.spec.symbols if s.name == rel.symbol)
        if sym.segment is None:
            return None
        return self._symbol_value(sym) + (addend if rel.type == "64" else 0)

    # -- .dynamic and sections ---------------------------------------------------------------

    def _dynamic_section(self) -> bytes:
        """The dynamic section, every tag pointing at the tables placed by the first pass."""
        spec, t = self.spec, self.tables
        entries: list[tuple[int, int]] = [(DT_NEEDED, self.dynstr.add(n))
                                          for n in self.needed_libs()]
        if spec.soname:
            entries.append((DT_SONAME, self.dynstr.add(spec.soname)))
        for name, tag in (("hash", DT_HASH), ("gnu_hash", DT_GNU_HASH)):
            if name in t:
                entries.append((tag, t[name].vaddr))
        entries += [(DT_STRTAB, t["dynstr"].vaddr), (DT_SYMTAB, t["dynsym"].vaddr),
                    (DT_STRSZ, t["dynstr"].size), (DT_SYMENT, SYM.itemsize)]
        _relr, dyn, _plt = self._split_relocs()
        nrelative = sum(1 for r in dyn if r.type == "RELATIVE")
        if "rela" in t:
            entries += [(DT_RELA, t["rela"].vaddr), (DT_RELASZ, t["rela"].size),
                        (DT_RELAENT, RELA.itemsize)]
            if spec.relcount and nrelative:
                entries.append((DT_RELACOUNT, nrelative))
        if "rel" in t:
            entries += [(DT_REL, t["rel"].vaddr), (DT_RELSZ, t["rel"].size),
                        (DT_RELENT, REL.itemsize)]
            if spec.relcount and nrelative:
                entries.append((DT_RELCOUNT, nrelative))
        if "jmprel" in t:
            entries += [(DT_JMPREL, t["jmprel"].vaddr), (DT_PLTRELSZ, t["jmprel"].size),
                        (DT_PLTREL, DT_RELA if spec.rel_format == "rela" else DT_REL)]
        if "relr" in t:
            entries += [(DT_RELR, t["relr"].vaddr), (DT_RELRSZ, t["relr"].size),
                        (DT_RELRENT, 8)]
        for tag, size_tag, slots in ((DT_INIT_ARRAY, DT_INIT_ARRAYSZ, spec.init_array),
                                     (DT_FINI_ARRAY, DT_FINI_ARRAYSZ, spec.fini_array)):
            if slots:
                entries += [(tag, self._vaddr_of(slots[0])), (size_tag, 8 * len(slots))]
        if "versym" in t:
            entries.append((DT_VERSYM, t["versym"].vaddr))
        if "verdef" in t:
            ndef = sum(1 for n in self.version_index if ":" not in n) + 1
            entries += [(DT_VERDEF, t["verdef"].vaddr), (DT_VERDEFNUM, ndef)]
        if "verneed" in t:
            nlibs = len({n.split(":", 1)[0] for n in self.version_index if ":" in n})
            entries += [(DT_VERNEED, t["verneed"].vaddr), (DT_VERNEEDNUM, nlibs)]
        flags = (DF_TEXTREL if spec.textrel else 0) | (DF_BIND_NOW if spec.bind_now else 0)
        if spec.textrel:
            entries.append((DT_TEXTREL, 0))
        if flags:
            entries.append((DT_FLAGS, flags))
        flags_1 = (DF_1_NOW if spec.bind_now else 0) | (DF_1_PIE if spec.pie else 0)
        if flags_1:
            entries.append((DT_FLAGS_1, flags_1))
        if spec.kind == "exec" or spec.pie:
            entries.append((DT_DEBUG, 0))
        entries.append((DT_NULL, 0))
        self.tag_index = {tag: i for i, (tag, _v) in reversed(list(enumerate(entries)))}
        return pack_rows(DYN, [{"d_tag": tag, "d_val": val} for tag, val in entries])

    def _append_sections(self, out: bytearray) -> tuple[int, int, int]:
        """Append .shstrtab and the section header table; return (shoff, shnum, shstrndx)."""
        names = self._section_list()
        index = {n: i for i, n in enumerate(names)}
        kinds = {
            "interp": (".interp", SHT_PROGBITS, SHF_ALLOC, 0, 0),
            "hash": (".hash", SHT_HASH, SHF_ALLOC, index["dynsym"], 0),
            "gnu_hash": (".gnu.hash", SHT_GNU_HASH, SHF_ALLOC, index["dynsym"], 0),
            "dynsym": (".dynsym", SHT_DYNSYM, SHF_ALLOC, index["dynstr"], 1),
            "dynstr": (".dynstr", SHT_STRTAB, SHF_ALLOC, 0, 0),
            "versym": (".gnu.version", SHT_GNU_VERSYM, SHF_ALLOC, index["dynsym"], 0),
            "verdef": (".gnu.version_d", SHT_GNU_VERDEF, SHF_ALLOC, index["dynstr"],
                       sum(1 for n in self.version_index if ":" not in n) + 1),
            "verneed": (".gnu.version_r", SHT_GNU_VERNEED, SHF_ALLOC, index["dynstr"],
                        len({n.split(":", 1)[0] for n in self.version_index if ":" in n})),
            "rela": (".rela.dyn", SHT_RELA, SHF_ALLOC, index["dynsym"], 0),
            "rel": (".rel.dyn", SHT_REL, SHF_ALLOC, index["dynsym"], 0),
            "jmprel": (".rela.plt" if self.spec.rel_format == "rela" else ".rel.plt",
                       SHT_RELA if self.spec.rel_format == "rela" else SHT_REL, SHF_ALLOC,
                       index["dynsym"], 0),
            "relr": (".relr.dyn", SHT_RELR, SHF_ALLOC, 0, 0),
        }
        rows: list[dict[str, int]] = [{}]
        for name in names[1:]:
            rows.append(self._section_row(name, kinds, index))
        shstr_off = len(out)
        out += bytes(self.shstrtab.blob)
        rows[-1].update(sh_offset=shstr_off, sh_size=len(self.shstrtab.blob))
        shoff = page_round_up(len(out), 8)
        out += bytes(shoff - len(out))
        out += pack_rows(SHDR, rows)
        self.tables["shdrs"] = TableInfo(shoff, 0, len(rows) * SHDR.itemsize, SHDR.itemsize)
        return shoff, len(rows), index["shstrtab"]

    def _section_row(self, name: str, kinds: dict[str, tuple[str, int, int, int, int]],
                     index: dict[str, int]) -> dict[str, int]:
        """One section header row for section ``name`` of :meth:`_section_list`."""
        if name in kinds:
            title, sh_type, flags, link, info = kinds[name]
            t = self.tables[name]
            return dict(sh_name=self.shstrtab.add(title), sh_type=sh_type, sh_flags=flags,
                        sh_addr=t.vaddr, sh_offset=t.offset, sh_size=t.size, sh_link=link,
                        sh_info=info, sh_addralign=t.align,
                        sh_entsize=t.entsize)
        if name == "dynamic":
            t = self.tables["dynamic"]
            return dict(sh_name=self.shstrtab.add(".dynamic"), sh_type=SHT_DYNAMIC,
                        sh_flags=SHF_ALLOC | SHF_WRITE, sh_addr=t.vaddr, sh_offset=t.offset,
                        sh_size=t.size, sh_link=index["dynstr"], sh_addralign=8,
                        sh_entsize=DYN.itemsize)
        if name == "shstrtab":
            return dict(sh_name=self.shstrtab.add(".shstrtab"), sh_type=SHT_STRTAB,
                        sh_addralign=1)
        i = int(name[3:])
        seg = self.spec.segments[i]
        off, va = self.seg_places[i]
        flags = SHF_ALLOC | (SHF_WRITE if "w" in seg.flags else 0)
        flags |= SHF_EXECINSTR if "x" in seg.flags else 0
        if name.startswith("seg"):
            title = f"{_SECTION_NAMES[seg.flags]}.{i}"
            return dict(sh_name=self.shstrtab.add(title), sh_type=SHT_PROGBITS,
                        sh_flags=flags, sh_addr=va, sh_offset=off, sh_size=len(seg.data),
                        sh_addralign=16)
        return dict(sh_name=self.shstrtab.add(f".bss.{i}"), sh_type=SHT_NOBITS,
                    sh_flags=flags, sh_addr=va + len(seg.data),
                    sh_offset=off + len(seg.data), sh_size=seg.bss, sh_addralign=1)


def encode_relr(addrs: Iterable[int]) -> npt.NDArray[np.uint64]:
    """Encode sorted, 8-aligned addresses as a DT_RELR table.

    An even entry is an address (relocate it, then the 63 words after it are described by
    the bitmaps that follow); an odd entry is a bitmap whose bit k (1..63) relocates the
    (k-1)-th word after the current base, which then advances by 63 words.

    >>> [hex(x) for x in encode_relr([0x1000, 0x1008, 0x1018, 0x2000])]
    ['0x1000', '0xb', '0x2000']
    """
    todo = list(addrs)
    out: list[int] = []
    i = 0
    while i < len(todo):
        out.append(todo[i])
        base = todo[i] + 8
        i += 1
        while True:
            bitmap = 0
            while i < len(todo) and todo[i] - base < 63 * 8:
                bitmap |= 1 << ((todo[i] - base) // 8 + 1)
                i += 1
            if not bitmap:
                break
            out.append(bitmap | 1)
            base += 63 * 8
    return np.array(out, dtype="<u8")

