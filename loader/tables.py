"""Parse and validate step 2 of 2: the dynamic section and the bulk tables it points at.

Part of the ``loader`` layer, above ``loader.elf``. Tables are found through the dynamic tags
(never the section headers, which a loader must not trust) and read with ``np.frombuffer`` over
structured dtypes: RELA, REL, RELR, JMPREL, the symbol table, versym, the hash tables. Every
table is bounds-checked against the PT_LOAD that holds it.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.elf import USER_LIMIT, ElfImage
from loader.elfdefs import (
    ADDR_SIZE,
    DF,
    DT,
    DYN_DTYPE,
    PF,
    REL_DTYPE,
    RELA_DTYPE,
    SHN,
    SYM_DTYPE,
    VER_FLG_BASE,
    VER_FLG_WEAK,
    VERSYM_VERSION,
    WORD_SIZE,
    versym_index,
)
from loader.errors import ElfDynamicError, ElfRelocationError, ElfSymbolError

__all__ = [
    "DT",
    "DynamicTables",
    "GnuHash",
    "RelocTable",
    "SYM_DTYPE",
    "SysvHash",
    "decode_relr",
    "relr_count",
    "parse_tables",
    "read_dynamic",
    "read_strtab",
]


MAX_VERSIONS = VERSYM_VERSION + 1
"""Version indices are 15 bits (bit 15 of a versym entry is the 'hidden' flag)."""


@dataclass(frozen=True, slots=True)
class RelocTable:
    """One relocation table, as parallel arrays; ``name`` is the tag that found it.

    ``implicit`` (REL) means the addend is the word already at the target.
    """

    name: str
    r_offset: npt.NDArray[np.uint64]
    r_type: npt.NDArray[np.uint32]
    r_sym: npt.NDArray[np.intp]
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
    version_needs: tuple[tuple[str, str, bool], ...] = ()
    """DT_VERNEED as (file, version, weak): what a process image checks its objects define."""

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
    return image.read(off, length)


def read_dynamic(image: ElfImage) -> tuple[dict[int, int], tuple[int, ...]]:
    """The dynamic tags up to DT_NULL, read through PT_DYNAMIC's p_vaddr (as glibc does)."""
    dyn = image.dynamic
    if dyn is None:
        return {}, ()
    n = min(dyn.p_filesz, dyn.p_memsz) // DYN_DTYPE.itemsize
    raw = np.frombuffer(_table(image, dyn.p_vaddr, n * DYN_DTYPE.itemsize, "PT_DYNAMIC"),
                        dtype=DYN_DTYPE)
    ends = np.flatnonzero(raw["d_tag"] == int(DT.NULL))   # int(): see _check_import_sizes
    if len(ends) == 0:
        raise ElfDynamicError("PT_DYNAMIC", dyn.p_vaddr, f"a DT_NULL within {n} entries")
    raw = raw[: ends[0]]
    tags = dict(zip(raw["d_tag"].tolist(), raw["d_val"].tolist(), strict=True))
    needed = tuple(raw["d_val"][raw["d_tag"] == int(DT.NEEDED)].tolist())
    return tags, needed


def _entsize(tags: dict[int, int], tag: int, name: str, want: int) -> None:
    """An entry-size tag, when present, must be the ELF64 size."""
    if tag in tags and tags[tag] != want:
        raise ElfDynamicError(name, tags[tag], f"must be {want}")


def _reloc_table(image: ElfImage, name: str, vaddr: int, size: int,
                 implicit: bool) -> RelocTable:
    """Read a RELA (or REL when ``implicit``) table into parallel arrays (r_info's low word
    is the type, its high word the symbol). Each column is copied out of the file's rows
    once, contiguous, and ``r_sym`` widened to ``intp``: every later pass (a dozen over a
    large table) then reads dense memory, and indexing the symbol table by ``r_sym`` needs
    no conversion each time (numpy converts a uint32 index on every use)."""
    dtype = REL_DTYPE if implicit else RELA_DTYPE
    if size % dtype.itemsize:
        raise ElfDynamicError(f"{name} size", size, f"a multiple of {dtype.itemsize}")
    raw = _table(image, vaddr, size, name)
    words = dtype.itemsize // ADDR_SIZE
    u64 = np.frombuffer(raw, dtype="<u8").reshape(-1, words)
    u32 = np.frombuffer(raw, dtype="<u4").reshape(-1, 2 * words)
    addend = (np.zeros(len(u64), dtype=np.int64) if implicit
              else np.ascontiguousarray(np.frombuffer(raw, dtype="<i8").reshape(-1, words)[:, 2]))
    # r_info = sym << 32 | type (ELF64_R_INFO): little-endian, its low half is the type
    return RelocTable(name, np.ascontiguousarray(u64[:, 0]), np.ascontiguousarray(u32[:, 2]),
                      u32[:, 3].astype(np.intp), addend, implicit)


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


_RELR_CHUNK = 1 << 13
"""RELR words decoded per step: the bit matrix of one step stays small (64 bytes a word)."""


def _popcount64(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The number of set bits of each word (SWAR, for numpy without ``bitwise_count``)."""
    w = words - ((words >> np.uint64(1)) & np.uint64(0x5555555555555555))
    w = (w & np.uint64(0x3333333333333333)) + ((w >> np.uint64(2)) & np.uint64(0x3333333333333333))
    w = (w + (w >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    counts: npt.NDArray[np.uint64] = (w * np.uint64(0x0101010101010101)) >> np.uint64(56)
    return counts


def relr_count(words: npt.NDArray[np.uint64]) -> int:
    """How many targets a RELR table encodes, without decoding it: one per address word, one
    per set bit 1..63 of each bitmap word (so at most 63 per bitmap word)."""
    bitmaps = words[(words & np.uint64(1)) == 1]
    return len(words) - len(bitmaps) + int(_popcount64(bitmaps >> np.uint64(1)).sum())


def _relr_rows(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Per word, the vaddr its bit 0 stands for: an address word is its own target; bit i
    (1..63) of a bitmap stands for ``row + 8*i``, where ``row`` is 8 below the first word
    the bitmap covers (its address + 8, plus 63 words for each earlier bitmap of the run)."""
    is_addr = (words & np.uint64(1)) == 0
    run = np.cumsum(is_addr) - 1                 # which address word each word follows
    first = np.flatnonzero(is_addr)[run]
    nth = (np.arange(len(words)) - first - 1).astype(np.uint64)   # 0: first bitmap of a run
    rows: npt.NDArray[np.uint64] = words[first] + nth * np.uint64(63 * 8)
    rows[is_addr] = words[is_addr]
    return rows


def _relr_bits(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """The (n, 64) bit matrix of the target slots of ``words``: an address word has only bit
    0 (itself), a bitmap word its bits 1..63."""
    is_addr = (words & np.uint64(1)) == 0
    bits = np.unpackbits(words.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1,
                         bitorder="little")
    bits[:, 0] = is_addr
    bits[is_addr, 1:] = 0
    return bits


def decode_relr(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The target vaddrs a RELR table encodes, in table order, without a per-entry loop.

    An even word is an address (the next target); an odd word is a bitmap: bit i (1..63)
    relocates ``base + (i-1)*8``, where base moves by 63 words after each bitmap. Memory:
    the result (counted first, by ``relr_count``) plus a bit matrix of a few thousand words.
    """
    words = np.asarray(words, dtype=np.uint64)
    if len(words) == 0:
        return np.zeros(0, dtype=np.uint64)
    if words[0] & np.uint64(1):
        raise ElfDynamicError("DT_RELR[0]", int(words[0]), "an address (even), not a bitmap")
    rows = _relr_rows(words)
    out = np.empty(relr_count(words), dtype=np.uint64)
    at = 0
    for lo in range(0, len(words), _RELR_CHUNK):
        r, c = np.nonzero(_relr_bits(words[lo: lo + _RELR_CHUNK]))   # row-major: table order
        out[at: at + len(r)] = rows[lo + r] + c.astype(np.uint64) * np.uint64(8)
        at += len(r)
    return out


def _relocatable(image: ElfImage, tags: dict[int, int]) -> list[tuple[int, int]]:
    """The [start, end) vaddr ranges relocations may write: writable PT_LOADs, or every
    PT_LOAD with DT_TEXTREL / DF_TEXTREL."""
    textrel = DT.TEXTREL in tags or bool(tags.get(DT.FLAGS, 0) & DF.TEXTREL)
    return [(s.p_vaddr, s.end) for s in image.loads if textrel or s.p_flags & PF.W]


def _check_relr_targets(targets: npt.NDArray[np.uint64], ranges: list[tuple[int, int]]
                        ) -> None:
    """Each RELR target word inside one relocatable segment, and relocated once (glibc would
    add the bias twice to a repeated word). ElfRelocationError names the first bad target."""
    ok = np.zeros(len(targets), dtype=bool)
    for start, end in ranges:
        ok |= (targets >= np.uint64(start)) & (targets <= np.uint64(max(end - ADDR_SIZE, 0))) \
            & (end >= start + ADDR_SIZE)
    if not ok.all():
        raise ElfRelocationError("DT_RELR target", int(targets[~ok][0]),
                              "inside a writable PT_LOAD (or any PT_LOAD with TEXTREL)")
    if len(targets) > 1 and not (targets[1:] > targets[:-1]).all():
        ordered = np.sort(targets)
        twice = ordered[1:] == ordered[:-1]
        if twice.any():
            raise ElfRelocationError("DT_RELR target", int(ordered[1:][twice][0]),
                                  "relocated once (it appears twice in the table)")


def _relr(image: ElfImage, tags: dict[int, int]) -> npt.NDArray[np.uint64]:
    """The decoded DT_RELR targets (vaddrs), empty without DT_RELR.

    The size is checked against the file first; the target count (one per address word, up
    to 63 per bitmap word) against the words the relocatable segments hold, before anything
    the size of the decoded table is allocated; then every target is checked."""
    if DT.RELR not in tags:
        return np.zeros(0, dtype=np.uint64)
    _entsize(tags, DT.RELRENT, "DT_RELRENT", ADDR_SIZE)
    size = tags.get(DT.RELRSZ, 0)
    if size % ADDR_SIZE:
        raise ElfDynamicError("DT_RELRSZ", size, f"a multiple of {ADDR_SIZE}")
    words = np.frombuffer(_table(image, tags[DT.RELR], size, "DT_RELR"), dtype="<u8")
    ranges = _relocatable(image, tags)
    room = sum((end - start) // ADDR_SIZE + 1 for start, end in ranges)
    count = relr_count(words)
    if count > room:
        raise ElfDynamicError("DT_RELR target count", count,
                              f"at most {room:#x}: the distinct words the relocatable "
                              "PT_LOADs hold")
    targets = decode_relr(words)
    _check_relr_targets(targets, ranges)
    return targets


def _file_bytes_from(image: ElfImage, vaddr: int) -> int:
    """How many file bytes the PT_LOAD holding ``vaddr`` has from there on (0 if none)."""
    for seg in image.loads:
        if seg.p_vaddr <= vaddr < seg.p_vaddr + seg.p_filesz:
            return seg.p_vaddr + seg.p_filesz - vaddr
    return 0


def _u32s(image: ElfImage, vaddr: int, count: int, tag: str) -> npt.NDArray[np.uint32]:
    """``count`` little-endian 32-bit words at ``vaddr``."""
    if count < 0 or count * WORD_SIZE > image.size:
        raise ElfDynamicError(f"{tag} count", count,
                              f"at most {image.size // WORD_SIZE:#x} words")
    return np.frombuffer(_table(image, vaddr, count * WORD_SIZE, tag),
                         dtype="<u4").astype(np.uint32)


_GNU_HASH_HEADER = 4     # words: nbuckets, symoffset, bloom_size, bloom_shift
_SYSV_HASH_HEADER = 2    # words: nbucket, nchain


def _gnu_hash(image: ElfImage, vaddr: int) -> tuple[GnuHash, int]:
    """The GNU hash table (nbuckets, shift, bloom, buckets, chains) and how many symbols it
    covers (the last hashed one's index + 1; 0 when every bucket is empty)."""
    header = _u32s(image, vaddr, _GNU_HASH_HEADER, "DT_GNU_HASH")
    nbuckets, symoffset, bloom_size, shift = header.tolist()
    if bloom_size == 0 or nbuckets == 0:
        raise ElfDynamicError("DT_GNU_HASH nbuckets/bloom_size", min(nbuckets, bloom_size),
                              "at least 1")
    bloom_at = vaddr + _GNU_HASH_HEADER * WORD_SIZE
    bloom = np.frombuffer(_table(image, bloom_at, bloom_size * ADDR_SIZE, "DT_GNU_HASH bloom"),
                          dtype="<u8").astype(np.uint64)
    buckets_at = bloom_at + bloom_size * ADDR_SIZE
    buckets = _u32s(image, buckets_at, nbuckets, "DT_GNU_HASH buckets")
    chains_at = buckets_at + nbuckets * WORD_SIZE
    top = int(buckets.max())
    if top == 0:    # no symbol is hashed: symoffset says nothing about the table's size
        return GnuHash(symoffset, shift, bloom, buckets, np.zeros(0, np.uint32)), 0
    if top < symoffset:
        raise ElfDynamicError("DT_GNU_HASH bucket", top, f"at least symoffset {symoffset}")
    # The chain of the highest bucket ends the table: find its end marker (low bit set),
    # reading windows that grow fourfold so a long chain costs O(n) and a short one little.
    # A chain that runs to the end of its PT_LOAD's file bytes without one is refused.
    avail = _file_bytes_from(image, chains_at) // WORD_SIZE
    done = top - symoffset
    window = 64
    while True:
        count = min(done + window, avail)
        if count <= done:
            raise ElfDynamicError("DT_GNU_HASH chain", top,
                                  "an end marker (low bit set) inside its PT_LOAD's file bytes")
        tail = _u32s(image, chains_at + done * WORD_SIZE, count - done, "DT_GNU_HASH chains")
        ends = np.flatnonzero(tail & 1)
        if len(ends):
            break
        done, window = count, window * 4
    nchains = done + int(ends[0]) + 1
    chains = _u32s(image, chains_at, nchains, "DT_GNU_HASH chains")
    return GnuHash(symoffset, shift, bloom, buckets, chains), symoffset + nchains


def _sysv_hash(image: ElfImage, vaddr: int) -> tuple[SysvHash, int]:
    """The SysV hash table (buckets, chains) and the symbol count (nchain)."""
    nbucket, nchain = _u32s(image, vaddr, _SYSV_HASH_HEADER, "DT_HASH").tolist()
    words = _u32s(image, vaddr + _SYSV_HASH_HEADER * WORD_SIZE, nbucket + nchain, "DT_HASH")
    buckets, chains = words[:nbucket], words[nbucket:]
    if len(words) and int(words.max()) >= max(nchain, 1):
        raise ElfDynamicError("DT_HASH entry", int(words.max()), f"below nchain {nchain}")
    return SysvHash(buckets, chains), nchain


# Version records are few and linked by byte offsets: struct reads them one at a time.
VERDEF = struct.Struct("<HHHHIII")     # vd_version vd_flags vd_ndx vd_cnt vd_hash vd_aux vd_next
VERDAUX = struct.Struct("<II")         # vda_name vda_next
VERNEED = struct.Struct("<HHIII")      # vn_version vn_cnt vn_file vn_aux vn_next
VERNAUX = struct.Struct("<IHHII")      # vna_hash vna_flags vna_other vna_name vna_next


_CLAIMS_CHUNK = 2048
"""Bytes of a version table read at once: its records lie together (tens of bytes each)."""


class _Claims:
    """The bytes of one version table (from its tag to the end of its PT_LOAD's file bytes)
    already read. Every chained record is read once: a link that leads outside those bytes,
    or onto a record already read (a loop, or two chains sharing entries), is an
    ElfDynamicError naming the link. So the walks cost at most one step per record the bytes
    can hold (plus one shared leaf per definition).

    The bytes are read a chunk at a time (``_CLAIMS_CHUNK`` from the record reached), and
    the claimed records are kept as sorted [start, end) offsets: the span runs on over the
    relocation tables (half a megabyte in libcrypto), which neither a whole read nor a
    byte map of it should cost."""

    def __init__(self, image: ElfImage, start: int, tag: str) -> None:
        self.image, self.start, self.tag = image, start, tag
        self.room = _file_bytes_from(image, start)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.chunk_at, self.chunk = 0, memoryview(b"")

    def _bytes(self, off: int, size: int, link: str) -> memoryview:
        """The record bytes ``[off, off+size)`` of the span (inside it: checked), from the
        chunk read last, or from a new chunk starting there."""
        if not self.chunk_at <= off <= self.chunk_at + len(self.chunk) - size:
            length = min(self.room - off, max(size, _CLAIMS_CHUNK))
            self.chunk_at, self.chunk = off, _table(self.image, self.start + off, length, link)
        return self.chunk[off - self.chunk_at: off - self.chunk_at + size]

    def _claim(self, off: int, size: int, link: str, vaddr: int) -> None:
        """Mark ``[off, off+size)`` read; ElfDynamicError when it overlaps a claimed record."""
        i = bisect.bisect_right(self.starts, off)
        if (i and self.ends[i - 1] > off) or (i < len(self.starts) and
                                              self.starts[i] < off + size):
            raise ElfDynamicError(link, vaddr, "a record not read before (this link "
                                  "loops back, or shares or overlaps another record)")
        self.starts.insert(i, off)
        self.ends.insert(i, off + size)

    def read(self, vaddr: int, layout: struct.Struct, link: str, *,
             shared: bool = False) -> tuple[int, ...]:
        """The record of ``layout`` at ``vaddr``, reached through the field ``link``.
        ``shared``: a leaf record that several others may point at (a Verdaux: linkers share
        one between definitions of the same name); it is read, not claimed."""
        off = vaddr - self.start
        if not 0 <= off <= self.room - layout.size:
            raise ElfDynamicError(link, vaddr, f"[{link}, +{layout.size}) inside the "
                                  f"{self.room:#x} file bytes from {self.tag} "
                                  f"{self.start:#x}")
        if not shared:
            self._claim(off, layout.size, link, vaddr)
        return layout.unpack(self._bytes(off, layout.size, link))


def _check_version_count(image: ElfImage, tags: dict[int, int], tag: int, num_tag: int,
                         layout: struct.Struct, names: tuple[str, str]) -> None:
    """DT_VERDEFNUM / DT_VERNEEDNUM, when present, at most the records the file bytes from
    the table's tag can hold (glibc never reads the count: it follows the links)."""
    if tag not in tags or num_tag not in tags:
        return
    room = _file_bytes_from(image, tags[tag]) // layout.size
    if tags[num_tag] > room:
        raise ElfDynamicError(names[1], tags[num_tag],
                              f"at most {room}: the {layout.size}-byte records the file bytes "
                              f"from {names[0]} {tags[tag]:#x} hold")


def _check_record_version(value: int, field: str) -> None:
    """vd_version / vn_version must be 1 (glibc refuses others: "unsupported version")."""
    if value != 1:
        raise ElfDynamicError(field, value, "must be 1 (VER_DEF_CURRENT / VER_NEED_CURRENT)")


class _Names:
    """Names from the string table by offset: checked when met (``check``: the offset is
    inside the table, which ends with a NUL), decoded later, each offset once."""

    def __init__(self, strtab: bytes) -> None:
        self.strtab = strtab
        self.known: dict[int, str] = {}

    def check(self, off: int, what: str) -> int:
        """``off`` itself, once it is known to start a name; ElfSymbolError naming ``what``."""
        if off >= len(self.strtab):
            raise ElfSymbolError(what, off, f"below DT_STRSZ {len(self.strtab):#x}")
        return off

    def __call__(self, off: int, what: str) -> str:
        """The NUL-terminated name at ``off``, or ElfSymbolError naming ``what``."""
        name = self.known.get(off)
        if name is None:
            end = self.strtab.index(b"\0", self.check(off, what))
            name = self.known[off] = self.strtab[off:end].decode("utf-8", "surrogateescape")
        return name


def _verdefs(image: ElfImage, tags: dict[int, int], names: _Names,
             out: dict[int, int]) -> set[int]:
    """Fill ``out`` with DT_VERDEF's index -> name offset; return the indices defined here.

    As glibc, the chain is followed by vd_next to a 0 (DT_VERDEFNUM is only checked), and
    only each definition's first Verdaux (its own name) is read."""
    _check_version_count(image, tags, DT.VERDEF, DT.VERDEFNUM, VERDEF,
                         ("DT_VERDEF", "DT_VERDEFNUM"))
    defined: set[int] = set()
    if DT.VERDEF not in tags:
        return defined
    claims = _Claims(image, tags[DT.VERDEF], "DT_VERDEF")
    at, link = tags[DT.VERDEF], "DT_VERDEF"
    while True:
        version, flags, ndx, _, _, aux, nxt = claims.read(at, VERDEF, link)
        _check_record_version(version, "vd_version")
        name_off, _ = claims.read(at + aux, VERDAUX, "vd_aux", shared=True)
        out[ndx & VERSYM_VERSION] = names.check(name_off, "vda_name")
        if not flags & VER_FLG_BASE:
            defined.add(ndx & VERSYM_VERSION)
        if not nxt:
            return defined
        at, link = at + nxt, "vd_next"


def _verneeds(image: ElfImage, tags: dict[int, int], names: _Names,
              out: dict[int, int]) -> list[tuple[int, int, bool]]:
    """Fill ``out`` with DT_VERNEED's index (vna_other) -> name offset; return every need
    as (vn_file offset, vna_name offset, VER_FLG_WEAK set).

    As glibc, each chain is followed to a 0 link (vn_next, vna_next); DT_VERNEEDNUM and
    vn_cnt are not trusted for the walk."""
    _check_version_count(image, tags, DT.VERNEED, DT.VERNEEDNUM, VERNEED,
                         ("DT_VERNEED", "DT_VERNEEDNUM"))
    needs: list[tuple[int, int, bool]] = []
    if DT.VERNEED not in tags:
        return needs
    claims = _Claims(image, tags[DT.VERNEED], "DT_VERNEED")
    at, link = tags[DT.VERNEED], "DT_VERNEED"
    while True:
        version, _, file_off, aux, nxt = claims.read(at, VERNEED, link)
        _check_record_version(version, "vn_version")
        names.check(file_off, "vn_file")
        aux_at, aux_link = at + aux, "vn_aux"
        while True:
            _, flags, other, name_off, aux_next = claims.read(aux_at, VERNAUX, aux_link)
            out[other & VERSYM_VERSION] = names.check(name_off, "vna_name")
            needs.append((file_off, name_off, bool(flags & VER_FLG_WEAK)))
            if not aux_next:
                break
            aux_at, aux_link = aux_at + aux_next, "vna_next"
        if not nxt:
            return needs
        at, link = at + nxt, "vn_next"


_TABLE_TAGS = {
    DT.STRTAB: "DT_STRTAB", DT.HASH: "DT_HASH", DT.GNU_HASH: "DT_GNU_HASH",
    DT.VERSYM: "DT_VERSYM", DT.VERDEF: "DT_VERDEF", DT.VERNEED: "DT_VERNEED",
    DT.RELA: "DT_RELA", DT.REL: "DT_REL", DT.JMPREL: "DT_JMPREL", DT.RELR: "DT_RELR",
}
"""Tables the dynamic section points at; none overlaps another (linkers never do)."""


def _symtab_room(image: ElfImage, tags: dict[int, int]) -> tuple[int, str]:
    """How many symbols DT_SYMTAB can hold, and what bounds it: the file bytes of its
    PT_LOAD from there on, cut at the first other table that starts after it."""
    at = tags[DT.SYMTAB]
    end, bound = at + _file_bytes_from(image, at), "the end of its PT_LOAD's file bytes"
    others = [(v, name) for tag, name in _TABLE_TAGS.items() if (v := tags.get(tag)) is not None]
    if image.dynamic is not None:
        others.append((image.dynamic.p_vaddr, "PT_DYNAMIC"))
    for vaddr, name in others:
        if at < vaddr < end:
            end, bound = vaddr, f"{name} at {vaddr:#x}"
    return (end - at) // SYM_DTYPE.itemsize, bound


def _sysv_beside_gnu(image: ElfImage, vaddr: int, room: int) -> SysvHash | None:
    """DT_HASH when DT_GNU_HASH is there too: glibc never reads it then, so a broken one
    (out of the file, entries past nchain, nchain past the symbol table's room) is dropped
    (None), not refused."""
    try:
        sysv, nchain = _sysv_hash(image, vaddr)
    except ElfDynamicError:
        return None
    return sysv if nchain <= room else None


def _symbol_count(image: ElfImage, tags: dict[int, int], relocs: tuple[RelocTable, ...]
                  ) -> tuple[int, GnuHash | None, SysvHash | None]:
    """How many symbols of DT_SYMTAB this object uses, the way a robust loader must find it
    (glibc never needs the count): the most any reader needs, the GNU hash (symoffset +
    chains, 0 when no bucket is used), else the SysV hash (nchain), and every relocation's
    r_sym; each must fit in the bytes at DT_SYMTAB (``_symtab_room``)."""
    room, bound = _symtab_room(image, tags)
    gnu = sysv = None
    demands: list[tuple[str, int, int]] = []      # (field, value, symbols it needs)
    if DT.GNU_HASH in tags:
        gnu, n = _gnu_hash(image, tags[DT.GNU_HASH])
        demands.append(("DT_GNU_HASH symoffset + chain length", n, n))
    if DT.HASH in tags and gnu is not None:
        sysv = _sysv_beside_gnu(image, tags[DT.HASH], room)
    elif DT.HASH in tags:
        sysv, n = _sysv_hash(image, tags[DT.HASH])
        demands.append(("DT_HASH nchain", n, n))
    for table in relocs:
        if len(table):
            top = int(table.r_sym.max())
            demands.append((f"{table.name} r_sym", top, top + 1))   # 0: the null symbol
    if room == 0 and any(need for _, _, need in demands):
        raise ElfDynamicError("DT_SYMTAB", tags[DT.SYMTAB],
                              f"inside one PT_LOAD's file bytes, holding a symbol ({bound})")
    for field_name, value, need in demands:
        if need > room:
            raise ElfSymbolError(field_name, value,
                                 f"at most {room - 1 if field_name.endswith('r_sym') else room}"
                                 f": DT_SYMTAB {tags[DT.SYMTAB]:#x} holds {room} symbols "
                                 f"before {bound}")
    return max((need for _, _, need in demands), default=0), gnu, sysv


def read_strtab(image: ElfImage, tags: dict[int, int]) -> bytes:
    """DT_STRTAB's DT_STRSZ bytes (inside one PT_LOAD's file bytes), ending with a NUL."""
    strsz = tags.get(DT.STRSZ, 0)
    strtab = bytes(_table(image, tags[DT.STRTAB], strsz, "DT_STRTAB")) \
        if DT.STRTAB in tags else b""
    if strtab and strtab[-1] != 0:
        raise ElfDynamicError("DT_STRTAB last byte", strtab[-1], "must be NUL")
    return strtab


def _symbols(image: ElfImage, tags: dict[int, int], strtab: bytes,
             relocs: tuple[RelocTable, ...]
             ) -> tuple[npt.NDArray[Any], GnuHash | None, SysvHash | None]:
    """The dynamic symbol table (as many symbols as ``_symbol_count`` finds), each name
    checked to be inside the string table."""
    if DT.SYMTAB not in tags:
        for table in relocs:
            if len(table) and table.r_sym.any():
                raise ElfSymbolError(f"{table.name} r_sym", int(table.r_sym.max()),
                                     "0: the object has no DT_SYMTAB")
        # Relocations still name symbol 0, the null symbol (STN_UNDEF): it always exists.
        return np.zeros(int(any(len(t) for t in relocs)), dtype=SYM_DTYPE), None, None
    _entsize(tags, DT.SYMENT, "DT_SYMENT", SYM_DTYPE.itemsize)
    nsyms, gnu, sysv = _symbol_count(image, tags, relocs)
    syms = np.frombuffer(_table(image, tags[DT.SYMTAB], nsyms * SYM_DTYPE.itemsize,
                                "DT_SYMTAB"), dtype=SYM_DTYPE)
    names = syms["st_name"][1:]           # the null symbol's st_name is never read
    if len(names) and int(names.max()) >= len(strtab):
        bad = 1 + int(np.argmax(names >= len(strtab)))
        raise ElfSymbolError(f"symbol {bad} st_name", int(syms["st_name"][bad]),
                             f"below DT_STRSZ {len(strtab):#x}")
    return syms, gnu, sysv


def _versym(image: ElfImage, tags: dict[int, int], nsyms: int,
            versions: dict[int, str]) -> npt.NDArray[np.uint16] | None:
    """DT_VERSYM (one 16-bit index per symbol), each index checked against the versions."""
    if DT.VERSYM not in tags or nsyms == 0:
        return None
    vs = np.frombuffer(_table(image, tags[DT.VERSYM], nsyms * 2, "DT_VERSYM"), dtype="<u2")
    idx = versym_index(vs)
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
    if n % ADDR_SIZE:
        raise ElfDynamicError(f"{name}SZ", n, f"a multiple of {ADDR_SIZE}")
    return (tags[at], n // ADDR_SIZE)


def _check_needed(strtab: bytes, needed: tuple[int, ...]) -> None:
    """Every DT_NEEDED name starts inside the string table (which ends with a NUL, so each
    is terminated): one comparison per entry, no name is cut here."""
    for off in needed:
        if off >= len(strtab):
            raise ElfSymbolError("DT_NEEDED", off, f"below DT_STRSZ {len(strtab):#x}")


def _check_relative_count(tags: dict[int, int], relocs: tuple[RelocTable, ...]) -> None:
    """DT_RELACOUNT / DT_RELCOUNT at most the entries of their table: glibc applies that many
    leading entries as RELATIVE without a bound, so an absurd count walks it past the table.
    (This loader applies each entry by its own type and needs no count.)"""
    for count_tag, name, table_name in ((DT.RELACOUNT, "DT_RELACOUNT", "DT_RELA"),
                                        (DT.RELCOUNT, "DT_RELCOUNT", "DT_REL")):
        if count_tag not in tags:
            continue
        table = next((t for t in relocs if t.name == table_name), None)
        size = len(table) if table is not None else 0
        if tags[count_tag] > size:
            raise ElfDynamicError(name, tags[count_tag],
                                  f"at most the {size} entries of {table_name}")


STUB_SLOT = 16
"""The extern mapping's slot granule (``loader.symbols.StubResolver``): st_size rounded up."""


def import_slot(st_size: int) -> int:
    """The bytes an import of ``st_size`` takes in the extern mapping (at least one slot)."""
    return max(STUB_SLOT, -(-st_size // STUB_SLOT) * STUB_SLOT)


def _relocated_symbols(nsyms: int, relocs: tuple[RelocTable, ...]) -> npt.NDArray[np.bool_]:
    """Per symbol: some relocation uses it (the null symbol never counts)."""
    used = np.zeros(nsyms, dtype=bool)
    for table in relocs:
        used[table.r_sym] = True
    used[:1] = False
    return used


def _check_import_sizes(syms: npt.NDArray[Any], strtab: bytes,
                        used: npt.NDArray[np.bool_]) -> None:
    """The undefined symbols relocations use: each st_size, and their sum, below the
    user-space size (a stub resolver reserves st_size bytes for each; only a hostile file
    asks for more than an address space). ElfSymbolError names the symbol. ``used``: the
    symbols relocations use (``_relocated_symbols``)."""
    # int(): numpy compares an array with an IntEnum member five times slower than with an int
    idx = np.flatnonzero(used & (syms["st_shndx"] == int(SHN.UNDEF)))
    sizes = syms["st_size"][idx]
    # float64 sums are exact enough to find where the total crosses 2**47.
    total = np.cumsum(np.minimum(sizes, USER_LIMIT).astype(np.float64) + STUB_SLOT)
    over = np.flatnonzero((sizes >= USER_LIMIT) | (total > USER_LIMIT))
    if len(over):
        i = int(idx[over[0]])
        name = _Names(strtab)(int(syms["st_name"][i]), "st_name")
        raise ElfSymbolError(f"st_size of import {name!r} (symbol {i})", int(syms["st_size"][i]),
                             f"imports' sizes summing below the user-space size "
                             f"{USER_LIMIT:#x}")


def name_budget(strtab: bytes) -> int:
    """The most name bytes a load may cut from ``strtab``: 8 times its size, plus 1 MiB.
    Linkers write each name once (sharing only suffixes), so real files use about the table's
    size; names that overlap one another in a hostile table could cost its size squared."""
    return 8 * len(strtab) + (1 << 20)


def _check_name_bytes(syms: npt.NDArray[Any], strtab: bytes, nuls: npt.NDArray[np.intp],
                      used: npt.NDArray[np.bool_], versions: dict[int, int]) -> None:
    """The names a load cuts (the versions', and those of the symbols relocations use:
    ``used``) add up to at most ``name_budget`` bytes, counted before any is cut. No name is
    longer than the longest run between two NULs, so when that many bytes for every name fit
    the budget (real files: by far), the exact sum (a search per name) is not needed."""
    starts = np.concatenate([syms["st_name"][used].astype(np.int64),
                             np.fromiter(set(versions.values()), dtype=np.int64)])
    if not len(starts):
        return
    longest = int(np.diff(nuls, prepend=-1).max()) if len(nuls) else 0
    if len(starts) * longest <= name_budget(strtab):
        return
    total = int((nuls[np.searchsorted(nuls, starts)] - starts).sum())
    if total > name_budget(strtab):
        raise ElfSymbolError("name bytes of versions and relocated symbols", total,
                             f"at most {name_budget(strtab):#x} (8 x DT_STRSZ + 1 MiB): the "
                             "names overlap in the string table as no linker writes them")


def parse_tables(image: ElfImage) -> DynamicTables:
    """Read and check every table the dynamic section points at.

    Every count and size read from the file is checked against the bytes that hold it before
    anything is allocated or walked. Raises an ElfError kind (never anything else) naming
    the tag or field and the bad value.
    """
    tags, needed = read_dynamic(image)
    strtab = read_strtab(image, tags)
    relocs = _relocs(image, tags)
    syms, gnu, sysv = _symbols(image, tags, strtab, relocs)
    names = _Names(strtab)
    name_offsets: dict[int, int] = {}
    defined = _verdefs(image, tags, names, name_offsets)
    needs = _verneeds(image, tags, names, name_offsets)
    nuls = np.flatnonzero(np.frombuffer(strtab, dtype=np.uint8) == 0)
    used = _relocated_symbols(len(syms), relocs)
    _check_name_bytes(syms, strtab, nuls, used, name_offsets)
    versions = {ndx: names(off, "version name") for ndx, off in name_offsets.items()}
    _check_needed(strtab, needed)
    _check_relative_count(tags, relocs)
    _check_import_sizes(syms, strtab, used)
    return DynamicTables(
        tags=tags, needed=needed, relocs=relocs, relr=_relr(image, tags), symtab=syms,
        strtab=strtab, versym=_versym(image, tags, len(syms), versions), versions=versions,
        default_versions=frozenset(defined), gnu_hash=gnu, sysv_hash=sysv,
        init_array=_array_tag(tags, DT.INIT_ARRAY, DT.INIT_ARRAYSZ, "DT_INIT_ARRAY"),
        fini_array=_array_tag(tags, DT.FINI_ARRAY, DT.FINI_ARRAYSZ, "DT_FINI_ARRAY"),
        nuls=nuls, version_needs=tuple((names(f, "vn_file"), names(v, "vna_name"), weak)
                                       for f, v, weak in needs))
