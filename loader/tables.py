"""Parse and validate step 2 of 2: the dynamic section and the bulk tables it points at.

Part of the ``loader`` layer, above ``loader.elf``. Tables are found through the dynamic tags
(never the section headers, which a loader must not trust) and read with ``np.frombuffer`` over
structured dtypes: RELA, REL, RELR, JMPREL, the symbol table, versym, the hash tables. Every
table is bounds-checked against the PT_LOAD that holds it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.elf import ElfImage
from loader.errors import ElfDynamicError, ElfSymbolError

__all__ = [
    "DT",
    "DynamicTables",
    "GnuHash",
    "RelocTable",
    "SYM_DTYPE",
    "SysvHash",
    "decode_relr",
    "parse_tables",
]


class DT:
    """Dynamic tag numbers (``d_tag``) and flag bits this loader reads."""

    NULL, NEEDED, PLTRELSZ, PLTGOT, HASH, STRTAB, SYMTAB, RELA, RELASZ, RELAENT = range(10)
    STRSZ, SYMENT, INIT, FINI, SONAME, RPATH, SYMBOLIC, REL, RELSZ, RELENT = range(10, 20)
    PLTREL, DEBUG, TEXTREL, JMPREL, BIND_NOW, INIT_ARRAY, FINI_ARRAY = range(20, 27)
    INIT_ARRAYSZ, FINI_ARRAYSZ, RUNPATH, FLAGS = range(27, 31)
    PREINIT_ARRAY, PREINIT_ARRAYSZ = 32, 33
    RELRSZ, RELR, RELRENT = 35, 36, 37
    GNU_HASH = 0x6FFFFEF5
    VERSYM = 0x6FFFFFF0
    RELACOUNT = 0x6FFFFFF9
    FLAGS_1 = 0x6FFFFFFB
    VERDEF, VERDEFNUM, VERNEED, VERNEEDNUM = 0x6FFFFFFC, 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF
    DF_SYMBOLIC, DF_TEXTREL, DF_BIND_NOW, DF_STATIC_TLS = 0x2, 0x4, 0x8, 0x10
    DF_1_NOW = 0x1


DYN_DTYPE = np.dtype([("d_tag", "<i8"), ("d_val", "<u8")])
RELA_DTYPE = np.dtype([("r_offset", "<u8"), ("r_info", "<u8"), ("r_addend", "<i8")])
REL_DTYPE = np.dtype([("r_offset", "<u8"), ("r_info", "<u8")])
SYM_DTYPE = np.dtype([("st_name", "<u4"), ("st_info", "u1"), ("st_other", "u1"),
                      ("st_shndx", "<u2"), ("st_value", "<u8"), ("st_size", "<u8")])
MAX_VERSIONS = 1 << 15
"""Version indices are 15 bits (bit 15 of a versym entry is the 'hidden' flag)."""


@dataclass(frozen=True, slots=True)
class RelocTable:
    """One relocation table, as parallel arrays; ``name`` is the tag that found it.

    ``implicit`` (REL) means the addend is the word already at the target.
    """

    name: str
    r_offset: npt.NDArray[np.uint64]
    r_type: npt.NDArray[np.uint32]
    r_sym: npt.NDArray[np.uint32]
    r_addend: npt.NDArray[np.int64]
    implicit: bool

    def __len__(self) -> int:
        return len(self.r_offset)


@dataclass(frozen=True, slots=True)
class GnuHash:
    """DT_GNU_HASH: bloom filter words, buckets and the chain words from ``symoffset`` on."""

    symoffset: int
    shift: int
    bloom: npt.NDArray[np.uint64]
    buckets: npt.NDArray[np.uint32]
    chains: npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class SysvHash:
    """DT_HASH: buckets and chains (``len(chains)`` is the symbol count)."""

    buckets: npt.NDArray[np.uint32]
    chains: npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class DynamicTables:
    """Everything the dynamic section describes, read and checked.

    ``tags`` maps each d_tag to its (last) value; ``relr`` holds decoded RELR target vaddrs.
    ``versions`` maps a version index to its name (definitions and needs alike).
    """

    tags: dict[int, int]
    needed: tuple[int, ...]
    relocs: tuple[RelocTable, ...]
    relr: npt.NDArray[np.uint64]
    symtab: npt.NDArray[Any]
    strtab: bytes
    versym: npt.NDArray[np.uint16] | None
    versions: dict[int, str]
    default_versions: frozenset[int]
    gnu_hash: GnuHash | None = None
    sysv_hash: SysvHash | None = None
    init_array: tuple[int, int] = (0, 0)
    fini_array: tuple[int, int] = (0, 0)
    nuls: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    """Where the string table's NUL bytes are: the end of every name, by one searchsorted."""

    @property
    def nsyms(self) -> int:
        """How many entries the dynamic symbol table holds."""
        return len(self.symtab)

    def name(self, st_name: int) -> str:
        """The NUL-terminated string at ``st_name`` in the string table.

        Raises ElfSymbolError when it starts past the table (parse checked every symbol's).
        """
        if st_name >= len(self.strtab):
            raise ElfSymbolError("st_name", st_name, f"below DT_STRSZ {len(self.strtab):#x}")
        end = self.strtab.index(b"\0", st_name)
        return self.strtab[st_name:end].decode("utf-8", "surrogateescape")


def _table(image: ElfImage, vaddr: int, length: int, tag: str) -> memoryview:
    """The file bytes of ``[vaddr, vaddr+length)``, which must lie in one PT_LOAD's file part."""
    if length < 0 or length > image.size:
        raise ElfDynamicError(f"{tag} size", length, f"at most the file size {image.size:#x}")
    off = image.file_offset(vaddr, length)
    if off is None:
        raise ElfDynamicError(tag, vaddr, f"[{tag}, +{length:#x}) inside one PT_LOAD's file "
                              "bytes")
    return memoryview(image.data)[off: off + length]


def _read_dynamic(image: ElfImage) -> tuple[dict[int, int], tuple[int, ...]]:
    """The dynamic tags up to DT_NULL, read through PT_DYNAMIC's p_vaddr (as glibc does)."""
    dyn = image.dynamic
    if dyn is None:
        return {}, ()
    n = min(dyn.p_filesz, dyn.p_memsz) // DYN_DTYPE.itemsize
    raw = np.frombuffer(_table(image, dyn.p_vaddr, n * DYN_DTYPE.itemsize, "PT_DYNAMIC"),
                        dtype=DYN_DTYPE)
    ends = np.flatnonzero(raw["d_tag"] == DT.NULL)
    if len(ends) == 0:
        raise ElfDynamicError("PT_DYNAMIC", dyn.p_vaddr, f"a DT_NULL within {n} entries")
    raw = raw[: ends[0]]
    tags = dict(zip(raw["d_tag"].tolist(), raw["d_val"].tolist(), strict=True))
    needed = tuple(raw["d_val"][raw["d_tag"] == DT.NEEDED].tolist())
    return tags, needed


def _entsize(tags: dict[int, int], tag: int, name: str, want: int) -> None:
    """An entry-size tag, when present, must be the ELF64 size."""
    if tag in tags and tags[tag] != want:
        raise ElfDynamicError(name, tags[tag], f"must be {want}")


def _reloc_table(image: ElfImage, name: str, vaddr: int, size: int,
                 implicit: bool) -> RelocTable:
    """Read a RELA (or REL when ``implicit``) table into parallel arrays: column views of
    the file's bytes, no copy (r_info's low word is the type, its high word the symbol)."""
    dtype = REL_DTYPE if implicit else RELA_DTYPE
    if size % dtype.itemsize:
        raise ElfDynamicError(f"{name} size", size, f"a multiple of {dtype.itemsize}")
    raw = _table(image, vaddr, size, name)
    words = dtype.itemsize // 8
    u64 = np.frombuffer(raw, dtype="<u8").reshape(-1, words)
    u32 = np.frombuffer(raw, dtype="<u4").reshape(-1, 2 * words)
    addend = (np.zeros(len(u64), dtype=np.int64) if implicit
              else np.frombuffer(raw, dtype="<i8").reshape(-1, words)[:, 2])
    return RelocTable(name, u64[:, 0], u32[:, 2], u32[:, 3], addend, implicit)


def _relocs(image: ElfImage, tags: dict[int, int]) -> tuple[RelocTable, ...]:
    """DT_RELA/DT_REL then DT_JMPREL, in the order glibc applies them.

    Old linkers let DT_RELASZ cover .rela.plt too; that tail is trimmed so no entry runs twice.
    """
    _entsize(tags, DT.RELAENT, "DT_RELAENT", RELA_DTYPE.itemsize)
    _entsize(tags, DT.RELENT, "DT_RELENT", REL_DTYPE.itemsize)
    jmp = tags.get(DT.JMPREL)
    pltrel = tags.get(DT.PLTREL, DT.RELA)
    if jmp is not None and pltrel not in (DT.RELA, DT.REL):
        raise ElfDynamicError("DT_PLTREL", pltrel, f"DT_RELA ({DT.RELA}) or DT_REL ({DT.REL})")
    out = []
    for tag, size_tag, name, implicit in ((DT.RELA, DT.RELASZ, "DT_RELA", False),
                                          (DT.REL, DT.RELSZ, "DT_REL", True)):
        if tag not in tags:
            continue
        start, size = tags[tag], tags.get(size_tag, 0)
        if (jmp is not None and start <= jmp and implicit == (pltrel == DT.REL)
                and start + size == jmp + tags.get(DT.PLTRELSZ, 0)):
            size = jmp - start
        out.append(_reloc_table(image, name, start, size, implicit))
    if jmp is not None:
        out.append(_reloc_table(image, "DT_JMPREL", jmp, tags.get(DT.PLTRELSZ, 0),
                                pltrel == DT.REL))
    return tuple(out)


def decode_relr(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The target vaddrs a RELR table encodes, without a per-entry Python loop.

    An even word is an address (the next target); an odd word is a bitmap: bit i (1..63)
    relocates ``base + (i-1)*8``, where base moves by 63 words after each bitmap.
    """
    if len(words) == 0:
        return np.zeros(0, dtype=np.uint64)
    is_addr = (words & 1) == 0
    run = np.cumsum(is_addr) - 1          # which address entry each word follows
    if not is_addr[0]:
        raise ElfDynamicError("DT_RELR[0]", int(words[0]), "an address (even), not a bitmap")
    addr_of_run = words[is_addr]
    idx = np.arange(len(words))
    first_of_run = np.flatnonzero(is_addr)[run]
    nth_bitmap = idx - first_of_run - 1     # 0 for the first bitmap after an address
    bm = ~is_addr
    bits = ((words[bm][:, None] >> np.arange(1, 64, dtype=np.uint64)) & 1).astype(bool)
    base = addr_of_run[run[bm]] + 8 + nth_bitmap[bm].astype(np.uint64) * (63 * 8)
    offs = base[:, None] + np.arange(63, dtype=np.uint64) * 8
    # Targets in table order: each address, then the bits of its bitmaps.
    order_key = np.concatenate([idx[is_addr] * 64, (idx[bm][:, None] * 64 + np.arange(1, 64))
                                [bits]])
    targets = np.concatenate([addr_of_run, offs[bits]])
    return targets[np.argsort(order_key, kind="stable")].astype(np.uint64)


def _relr(image: ElfImage, tags: dict[int, int]) -> npt.NDArray[np.uint64]:
    """The decoded DT_RELR targets (vaddrs), empty without DT_RELR."""
    if DT.RELR not in tags:
        return np.zeros(0, dtype=np.uint64)
    _entsize(tags, DT.RELRENT, "DT_RELRENT", 8)
    size = tags.get(DT.RELRSZ, 0)
    if size % 8:
        raise ElfDynamicError("DT_RELRSZ", size, "a multiple of 8")
    words = np.frombuffer(_table(image, tags[DT.RELR], size, "DT_RELR"), dtype="<u8")
    return decode_relr(words.astype(np.uint64))


def _file_bytes_from(image: ElfImage, vaddr: int) -> int:
    """How many file bytes the PT_LOAD holding ``vaddr`` has from there on (0 if none)."""
    for seg in image.loads:
        if seg.p_vaddr <= vaddr < seg.p_vaddr + seg.p_filesz:
            return seg.p_vaddr + seg.p_filesz - vaddr
    return 0


def _u32s(image: ElfImage, vaddr: int, count: int, tag: str) -> npt.NDArray[np.uint32]:
    """``count`` little-endian 32-bit words at ``vaddr``."""
    if count < 0 or count * 4 > image.size:
        raise ElfDynamicError(f"{tag} count", count, f"at most {image.size // 4:#x} words")
    return np.frombuffer(_table(image, vaddr, count * 4, tag), dtype="<u4").astype(np.uint32)


def _gnu_hash(image: ElfImage, vaddr: int) -> tuple[GnuHash, int]:
    """The GNU hash table (nbuckets, shift, bloom, buckets, chains) and the symbol count."""
    nbuckets, symoffset, bloom_size, shift = _u32s(image, vaddr, 4, "DT_GNU_HASH").tolist()
    if bloom_size == 0 or nbuckets == 0:
        raise ElfDynamicError("DT_GNU_HASH nbuckets/bloom_size", min(nbuckets, bloom_size),
                              "at least 1")
    bloom_at = vaddr + 16
    bloom = np.frombuffer(_table(image, bloom_at, bloom_size * 8, "DT_GNU_HASH bloom"),
                          dtype="<u8").astype(np.uint64)
    buckets_at = bloom_at + bloom_size * 8
    buckets = _u32s(image, buckets_at, nbuckets, "DT_GNU_HASH buckets")
    chains_at = buckets_at + nbuckets * 4
    top = int(buckets.max())
    if top == 0:
        return GnuHash(symoffset, shift, bloom, buckets, np.zeros(0, np.uint32)), symoffset
    if top < symoffset:
        raise ElfDynamicError("DT_GNU_HASH bucket", top, f"at least symoffset {symoffset}")
    # The chain of the highest bucket ends the table: find its end marker (low bit set),
    # reading windows that grow fourfold so a long chain costs O(n) and a short one little.
    avail = _file_bytes_from(image, chains_at) // 4
    first, window = top - symoffset, 64
    while True:
        count = min(first + window, avail)
        if count <= first:
            raise ElfDynamicError("DT_GNU_HASH chain", top, "an end marker inside the file")
        tail = _u32s(image, chains_at + first * 4, count - first, "DT_GNU_HASH chains")
        ends = np.flatnonzero(tail & 1)
        if len(ends):
            break
        window *= 4
    nchains = first + int(ends[0]) + 1
    chains = _u32s(image, chains_at, nchains, "DT_GNU_HASH chains")
    return GnuHash(symoffset, shift, bloom, buckets, chains), symoffset + nchains


def _sysv_hash(image: ElfImage, vaddr: int) -> tuple[SysvHash, int]:
    """The SysV hash table (buckets, chains) and the symbol count (nchain)."""
    nbucket, nchain = _u32s(image, vaddr, 2, "DT_HASH").tolist()
    words = _u32s(image, vaddr + 8, nbucket + nchain, "DT_HASH")
    buckets, chains = words[:nbucket], words[nbucket:]
    if len(words) and int(words.max()) >= max(nchain, 1):
        raise ElfDynamicError("DT_HASH entry", int(words.max()), f"below nchain {nchain}")
    return SysvHash(buckets, chains), nchain


# Version records are few and linked by byte offsets: struct reads them one at a time.
VERDEF = struct.Struct("<HHHHIII")     # vd_version vd_flags vd_ndx vd_cnt vd_hash vd_aux vd_next
VERDAUX = struct.Struct("<II")         # vda_name vda_next
VERNEED = struct.Struct("<HHIII")      # vn_version vn_cnt vn_file vn_aux vn_next
VERNAUX = struct.Struct("<IHHII")      # vna_hash vna_flags vna_other vna_name vna_next
VER_FLG_BASE = 0x1


def _record(image: ElfImage, vaddr: int, layout: struct.Struct, tag: str) -> tuple[int, ...]:
    """One version record at ``vaddr``, bounds-checked."""
    return layout.unpack_from(_table(image, vaddr, layout.size, tag))


def _strtab_name(strtab: bytes, off: int, what: str) -> str:
    """A NUL-terminated name in the string table, or ElfSymbolError."""
    end = strtab.find(b"\0", off)
    if off >= len(strtab) or end < 0:
        raise ElfSymbolError(what, off, f"below DT_STRSZ {len(strtab):#x}, NUL-terminated")
    return strtab[off:end].decode("utf-8", "surrogateescape")


def _verdefs(image: ElfImage, tags: dict[int, int], strtab: bytes,
             out: dict[int, str]) -> set[int]:
    """Fill ``out`` with DT_VERDEF's index -> name; return the indices defined here."""
    defined: set[int] = set()
    at, count = tags.get(DT.VERDEF), tags.get(DT.VERDEFNUM, 0)
    for _ in range(min(count, MAX_VERSIONS) if at is not None else 0):
        assert at is not None
        _, flags, ndx, _, _, aux, nxt = _record(image, at, VERDEF, "DT_VERDEF")
        name_off, _ = _record(image, at + aux, VERDAUX, "DT_VERDEF aux")
        out[ndx & 0x7FFF] = _strtab_name(strtab, name_off, "vda_name")
        if not flags & VER_FLG_BASE:
            defined.add(ndx & 0x7FFF)
        if not nxt:
            break
        at += nxt
    return defined


def _verneeds(image: ElfImage, tags: dict[int, int], strtab: bytes,
              out: dict[int, str]) -> None:
    """Fill ``out`` with DT_VERNEED's index (vna_other) -> name."""
    at, count = tags.get(DT.VERNEED), tags.get(DT.VERNEEDNUM, 0)
    for _ in range(min(count, MAX_VERSIONS) if at is not None else 0):
        assert at is not None
        _, cnt, _, aux, nxt = _record(image, at, VERNEED, "DT_VERNEED")
        aux_at = at + aux
        for _ in range(min(cnt, MAX_VERSIONS)):
            _, _, other, name_off, aux_next = _record(image, aux_at, VERNAUX, "DT_VERNEED aux")
            out[other & 0x7FFF] = _strtab_name(strtab, name_off, "vna_name")
            if not aux_next:
                break
            aux_at += aux_next
        if not nxt:
            break
        at += nxt


def _symbol_count(image: ElfImage, tags: dict[int, int]
                  ) -> tuple[int, GnuHash | None, SysvHash | None]:
    """How many symbols DT_SYMTAB holds: from the GNU hash, else the SysV hash, else the
    usual layout (DT_STRTAB right after DT_SYMTAB)."""
    gnu = sysv = None
    counts = []
    if DT.GNU_HASH in tags:
        gnu, n = _gnu_hash(image, tags[DT.GNU_HASH])
        counts.append(n)
    if DT.HASH in tags:
        sysv, n = _sysv_hash(image, tags[DT.HASH])
        counts.append(n)
    if counts:
        return max(counts), gnu, sysv
    symtab, strtab = tags[DT.SYMTAB], tags.get(DT.STRTAB, 0)
    if strtab <= symtab:
        raise ElfDynamicError("DT_SYMTAB", symtab, "a hash table, or DT_STRTAB after it")
    return (strtab - symtab) // SYM_DTYPE.itemsize, gnu, sysv


def _symbols(image: ElfImage, tags: dict[int, int]
             ) -> tuple[npt.NDArray[Any], bytes, GnuHash | None, SysvHash | None]:
    """The dynamic symbol table and string table, each name checked to be inside it."""
    strsz = tags.get(DT.STRSZ, 0)
    strtab = bytes(_table(image, tags[DT.STRTAB], strsz, "DT_STRTAB")) \
        if DT.STRTAB in tags else b""
    if strtab and strtab[-1] != 0:
        raise ElfDynamicError("DT_STRTAB last byte", strtab[-1], "must be NUL")
    if DT.SYMTAB not in tags:
        return np.zeros(0, dtype=SYM_DTYPE), strtab, None, None
    _entsize(tags, DT.SYMENT, "DT_SYMENT", SYM_DTYPE.itemsize)
    nsyms, gnu, sysv = _symbol_count(image, tags)
    syms = np.frombuffer(_table(image, tags[DT.SYMTAB], nsyms * SYM_DTYPE.itemsize,
                                "DT_SYMTAB"), dtype=SYM_DTYPE)
    if nsyms and int(syms["st_name"].max()) >= max(len(strtab), 1):
        bad = int(syms["st_name"].max())
        raise ElfSymbolError("st_name", bad, f"below DT_STRSZ {len(strtab):#x}")
    return syms, strtab, gnu, sysv


def _versym(image: ElfImage, tags: dict[int, int], nsyms: int,
            versions: dict[int, str]) -> npt.NDArray[np.uint16] | None:
    """DT_VERSYM (one 16-bit index per symbol), each index checked against the versions."""
    if DT.VERSYM not in tags or nsyms == 0:
        return None
    vs = np.frombuffer(_table(image, tags[DT.VERSYM], nsyms * 2, "DT_VERSYM"), dtype="<u2")
    idx = vs & 0x7FFF
    known = np.zeros(MAX_VERSIONS, dtype=bool)
    known[[0, 1, *versions]] = True
    bad = ~known[idx]
    if bad.any():
        raise ElfSymbolError("versym entry", int(idx[bad][0]),
                             f"a defined or needed version index {sorted({0, 1, *versions})}")
    return vs.astype(np.uint16)


def _array_tag(tags: dict[int, int], at: int, size: int, name: str) -> tuple[int, int]:
    """(vaddr, count) of an init/fini array tag pair."""
    if at not in tags:
        return (0, 0)
    n = tags.get(size, 0)
    if n % 8:
        raise ElfDynamicError(f"{name}SZ", n, "a multiple of 8")
    return (tags[at], n // 8)


def parse_tables(image: ElfImage) -> DynamicTables:
    """Read and check every table the dynamic section points at.

    Raises an ElfError kind (never anything else) naming the tag and the bad value.
    """
    tags, needed = _read_dynamic(image)
    syms, strtab, gnu, sysv = _symbols(image, tags)
    versions: dict[int, str] = {}
    defined = _verdefs(image, tags, strtab, versions)
    _verneeds(image, tags, strtab, versions)
    for off in needed:
        _strtab_name(strtab, off, "DT_NEEDED")
    relocs = _relocs(image, tags)
    for table in relocs:
        if len(table) and int(table.r_sym.max()) >= len(syms) and int(table.r_sym.max()):
            raise ElfSymbolError(f"{table.name} r_sym", int(table.r_sym.max()),
                                 f"below the symbol count {len(syms)}")
    return DynamicTables(
        tags=tags, needed=needed, relocs=relocs, relr=_relr(image, tags), symtab=syms,
        strtab=strtab, versym=_versym(image, tags, len(syms), versions), versions=versions,
        default_versions=frozenset(defined), gnu_hash=gnu, sysv_hash=sysv,
        init_array=_array_tag(tags, DT.INIT_ARRAY, DT.INIT_ARRAYSZ, "DT_INIT_ARRAY"),
        fini_array=_array_tag(tags, DT.FINI_ARRAY, DT.FINI_ARRAYSZ, "DT_FINI_ARRAY"),
        nuls=np.flatnonzero(np.frombuffer(strtab, dtype=np.uint8) == 0))
