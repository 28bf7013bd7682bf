"""Real files, mutated field-aware, and the property for them (``vmsim fuzz PATH ...``).

Part of the fuzz kit (``vmsim.fuzz``). :func:`read_elf_paths` checks the paths a campaign is
given and reads each once; :func:`mutated_files` draws one of those files, either unchanged or
with one corruption found through the file's own headers (a :class:`MutatedFile`: ``.kind``
says which field family, ``.mutation`` which field became what); :func:`check_file_load` is
the property for one drawn file.

The field-aware corruptions reuse ``vmsim.fuzz.malformed``'s mutators: the file's layout is
read (bounded: every count is checked against the file's size before anything is iterated)
into the shape those mutators read, an :class:`~vmsim.fuzz.elfwriter.ElfImage` without a spec;
a table whose headers lie is left out, so its kinds are not drawn. Besides those, every kind
can overwrite one field of one entry of its tables with a boundary value (0, 1, all-ones, off
by one, a page, past EOF, the address of another table): :func:`_field_tables` lists them.

The unchanged file is judged by an oracle that does not use the loader's parser: pyelftools
reads the program headers and dynamic tags and maps addresses to file offsets; numpy reads
the relocation tables (``loader.elfdefs``' record layouts) and compares the memory.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_D_TAG, ENUM_P_TYPE_BASE, ENUM_RELOC_TYPE_x64
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from loader import elfdefs as ed
from loader.mmap import Mmap
from loader.pages import HOST_PAGE_SIZE, page_round_up
from vmsim.fuzz import malformed as mf
from vmsim.fuzz.checking import CheckingMmap, Violation
from vmsim.fuzz.contract import LoaderUnderTest, attempt_load, drop
from vmsim.fuzz.elfwriter import ElfImage, ElfSpec, TableInfo
from vmsim.fuzz.knobs import ValueOrStrategy, as_strategy, check_subset, ints
from vmsim.fuzz.properties import check_bias, check_headers_predict_map, check_malformed_load

__all__ = [
    "FILE_MUTATION_KINDS",
    "MAX_FILE_SIZE",
    "MutatedFile",
    "check_file_load",
    "mutated_files",
    "read_elf_paths",
]

MAX_FILE_SIZE = 256 << 20
"""The largest file :func:`read_elf_paths` accepts (every draw copies it once)."""

FILE_MUTATION_KINDS: tuple[str, ...] = (
    "none", "header", "phdr", "dynamic", "reloc", "relr", "symbol", "hash", "version",
    "init", "truncate", "flip",
)
"""What :func:`mutated_files` can do to a file: leave it unchanged ("none"); corrupt a field
of the ELF header, a program header, a dynamic entry (tag or value), a DT_RELA/DT_JMPREL
relocation (r_offset, its symbol, its type, r_addend), a DT_RELR entry, a symbol that a
relocation references (st_name, st_info, st_shndx, st_value, st_size), the hash tables (GNU and
SysV: counts, bloom words, buckets, chains), the version tables (versym entries, verdef/verneed
counts and links) or the init/fini arrays (entries, sizes); cut the file short; flip bytes."""

_UNCHANGED_SHARE = 8
"""One draw in this many leaves the file unchanged (when "none" is among the kinds)."""

_PAGE = HOST_PAGE_SIZE


# --------------------------------------------------------------------------------------------
# Reading the paths.


@dataclass(frozen=True)
class MutatedFile:
    """One drawn file: ``data`` (the bytes to load), the ``path`` it came from, ``kind`` (one
    of :data:`FILE_MUTATION_KINDS`; "none" when unchanged) and ``mutation`` (one line: which
    field of which entry became what)."""

    data: bytes
    path: str
    kind: str
    mutation: str

    def __repr__(self) -> str:
        return f"MutatedFile({os.path.basename(self.path)}, {self.kind}: {self.mutation})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a drawn file (its printer would list the bytes otherwise)."""
        printer.text(repr(self))


_READ: dict[str, tuple[tuple[int, int], bytes]] = {}
"""path -> ((size, mtime_ns), bytes): each file is read once per process."""


def read_elf_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
                   ) -> dict[str, bytes]:
    """path -> bytes of every path (or of the one path), each an ELF64 x86-64 file of at
    most :data:`MAX_FILE_SIZE` bytes; ValueError (one line naming the path) for a missing
    file, a directory, a file that is not ELF, not ELF64 x86-64, or too large. Each file is
    read once per process (again only if its size or mtime changed)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    return {os.fspath(p): _read_elf(os.fspath(p)) for p in paths}


def _read_elf(path: str) -> bytes:
    """The bytes of ``path``, checked (see :func:`read_elf_paths`); cached per process."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: a directory, not an ELF file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_size > MAX_FILE_SIZE:
        raise ValueError(f"{path}: {info.st_size} bytes, more than the "
                         f"{MAX_FILE_SIZE >> 20} MiB this campaign reads")
    key = (info.st_size, info.st_mtime_ns)
    if path in _READ and _READ[path][0] == key:
        return _READ[path][1]
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    _check_elf64_x86_64(path, data)
    _READ[path] = (key, data)
    return data


def _check_elf64_x86_64(path: str, data: bytes) -> None:
    """ValueError unless ``data`` is an ELF64 little-endian x86-64 file of a bounded size."""
    if len(data) > MAX_FILE_SIZE:
        raise ValueError(f"{path}: more than the {MAX_FILE_SIZE >> 20} MiB this campaign reads")
    if data[:4] != ed.ELFMAG:
        raise ValueError(f"{path}: not an ELF file (it starts with {data[:4]!r})")
    if len(data) < ed.EHDR_DTYPE.itemsize:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than an ELF header")
    ehdr = np.frombuffer(data, ed.EHDR_DTYPE, 1)[0]
    klass, order, machine = data[4], data[5], int(ehdr["e_machine"])
    if (klass, order, machine) != (ed.ELFCLASS64, ed.ELFDATA2LSB, ed.EM_X86_64):
        raise ValueError(f"{path}: not an ELF64 little-endian x86-64 file (class {klass}, "
                         f"data {order}, machine {machine})")


# --------------------------------------------------------------------------------------------
# The layout of a real file, bounded.

Field = tuple[str, int, int]
"""A field of a record: (name, offset inside the record, width in bytes); "" for a word."""


def _fields(dtype: np.dtype[Any], *skip: str) -> tuple[Field, ...]:
    """Every field of ``dtype`` but ``skip``, as :data:`Field` s."""
    return tuple((name, *mf._field(dtype, name)) for name in dtype.names or ()
                 if name not in skip)


_R_INFO = mf._field(ed.RELA_DTYPE, "r_info")[0]
_RELA_FIELDS: tuple[Field, ...] = (  # r_info's low word is the type, its high word the symbol
    *_fields(ed.RELA_DTYPE, "r_info", "r_addend"), ("r_info.type", _R_INFO, ed.WORD_SIZE),
    ("r_info.sym", _R_INFO + ed.WORD_SIZE, ed.WORD_SIZE), *_fields(ed.RELA_DTYPE, "r_offset",
                                                                    "r_info"))
_SYM_FIELDS = _fields(ed.SYM_DTYPE, "st_other")
_WORD8: tuple[Field, ...] = (("", 0, ed.ADDR_SIZE),)
_WORD4: tuple[Field, ...] = (("", 0, ed.WORD_SIZE),)
_VERSYM: tuple[Field, ...] = (("", 0, 2),)


@dataclass(frozen=True)
class _Table:
    """``count`` records of ``stride`` bytes at file offset ``offset``, named ``name`` in
    mutation lines; ``fields`` the ones worth corrupting, ``indices`` the records (all when
    empty); a ``header`` is one record, named without an index."""

    name: str
    offset: int
    stride: int
    count: int
    fields: tuple[Field, ...]
    indices: tuple[int, ...] = ()
    header: bool = False

    def label(self, i: int, field: str) -> str:
        """``name[i].field`` (``name.field`` for a header, ``name[i]`` for a word)."""
        entry = self.name if self.header else f"{self.name}[{i}]"
        return f"{entry}.{field}" if field else entry


Mutator = Callable[[st.DrawFn, ElfImage, bytearray], str]


@dataclass(frozen=True)
class _Layout:
    """A real file read for mutation: ``view`` (its layout in the shape ``malformed``'s
    mutators read) and, per kind, the mutators that apply to it."""

    view: ElfImage
    options: dict[str, list[Mutator]]

    def __repr__(self) -> str:  # hypothesis shows the strategy's arguments: keep it short
        return f"<layout of {len(self.view.data)} bytes>"


def _phdr_table(data: bytes) -> tuple[int, npt.NDArray[Any]]:
    """(e_phoff, the program headers); no headers when the table does not fit the file."""
    ehdr = np.frombuffer(data, ed.EHDR_DTYPE, 1)[0]
    phoff, count = int(ehdr["e_phoff"]), int(ehdr["e_phnum"])
    if int(ehdr["e_phentsize"]) != ed.PHDR_DTYPE.itemsize or \
            phoff + count * ed.PHDR_DTYPE.itemsize > len(data):
        return phoff, np.zeros(0, ed.PHDR_DTYPE)
    return phoff, np.frombuffer(data, ed.PHDR_DTYPE, count, phoff)


def _file_offset(phdrs: npt.NDArray[Any], vaddr: int, size: int, file_size: int) -> int | None:
    """The file offset of ``[vaddr, vaddr+size)`` if one PT_LOAD's file bytes hold it and it
    lies inside the file; else None."""
    loads = phdrs[phdrs["p_type"] == ed.PT.LOAD]
    if not len(loads) or not 0 <= vaddr <= ed.MASK64:
        return None
    at = np.uint64(vaddr)
    rel = at - np.minimum(loads["p_vaddr"], at)
    hit = np.flatnonzero((loads["p_vaddr"] <= at) & (rel <= loads["p_filesz"])
                         & (loads["p_filesz"] - rel >= np.uint64(min(size, ed.MASK64))))
    if not len(hit):
        return None
    offset = int(loads["p_offset"][hit[0]]) + int(rel[hit[0]])
    return offset if offset + size <= file_size else None


_KNOWN_TAGS = np.array([int(t) for t in ed.DT], dtype=np.int64)


def _dynamic(data: bytes, phdrs: npt.NDArray[Any]) -> tuple[TableInfo | None, dict[int, int]]:
    """The dynamic table (up to its first DT_NULL, inside the file) and, for each tag
    ``loader.elfdefs.DT`` names, the index of its first entry."""
    dyn = phdrs[phdrs["p_type"] == ed.PT.DYNAMIC]
    if not len(dyn) or int(dyn["p_offset"][0]) >= len(data):
        return None, {}
    offset = int(dyn["p_offset"][0])
    count = min(int(dyn["p_filesz"][0]), len(data) - offset) // ed.DYN_DTYPE.itemsize
    entries = np.frombuffer(data, ed.DYN_DTYPE, count, offset)
    nulls = np.flatnonzero(entries["d_tag"] == ed.DT.NULL)
    if len(nulls):
        entries = entries[:int(nulls[0]) + 1]
    known = np.flatnonzero(np.isin(entries["d_tag"], _KNOWN_TAGS))
    tags, first = np.unique(entries["d_tag"][known], return_index=True)
    table = TableInfo(offset, int(dyn["p_vaddr"][0]), len(entries) * ed.DYN_DTYPE.itemsize,
                      ed.DYN_DTYPE.itemsize)
    return table, dict(zip(tags.tolist(), known[first].tolist(), strict=True))


class _Reader:
    """Locates tables through the dynamic tags of one file (``data``, ``phdrs``)."""

    def __init__(self, data: bytes, phdrs: npt.NDArray[Any], dyn: TableInfo,
                 tags: dict[int, int]) -> None:
        self.data, self.phdrs = data, phdrs
        entries = np.frombuffer(data, ed.DYN_DTYPE, dyn.size // dyn.entsize, dyn.offset)
        self.values = {tag: int(entries["d_val"][i]) for tag, i in tags.items()}

    def table(self, addr_tag: int, size: int, entsize: int = 1) -> TableInfo | None:
        """The table at the address of ``addr_tag``, ``size`` bytes (rounded down to
        ``entsize``), if the file holds it."""
        vaddr = self.values.get(addr_tag)
        size -= size % entsize
        if vaddr is None or size <= 0:
            return None
        offset = _file_offset(self.phdrs, vaddr, size, len(self.data))
        return None if offset is None else TableInfo(offset, vaddr, size, entsize)

    def sized(self, addr_tag: int, size_tag: int, entsize: int = 1) -> TableInfo | None:
        """The table of ``addr_tag`` whose size is the value of ``size_tag``."""
        return self.table(addr_tag, min(self.values.get(size_tag, 0), len(self.data)), entsize)

    def words(self, addr_tag: int, count: int) -> npt.NDArray[np.uint32] | None:
        """The first ``count`` 32-bit words at the address of ``addr_tag`` (a hash table's
        header), if the file holds them."""
        head = self.table(addr_tag, 4 * count)
        return None if head is None else np.frombuffer(self.data, "<u4", count, head.offset)

    def sysv_hash(self) -> tuple[TableInfo | None, int]:
        """The SysV hash table (with at least one bucket) and its nchain (symbol count)."""
        head = self.words(ed.DT.HASH, 2)
        if head is None or not head[0]:
            return None, 0
        nbucket, nchain = int(head[0]), int(head[1])
        return self.table(ed.DT.HASH, 4 * (2 + nbucket + nchain)), nchain

    def gnu_hash(self) -> tuple[TableInfo | None, int]:
        """The GNU hash table (with buckets and bloom words) and the symbol count it implies:
        one past the end of the chain of the highest bucket."""
        head = self.words(ed.DT.GNU_HASH, 4)
        if head is None or not head[0] or not head[2]:
            return None, 0
        nbuckets, symoffset, bloom = int(head[0]), int(head[1]), int(head[2])
        fixed = 16 + ed.ADDR_SIZE * bloom + 4 * nbuckets
        top = self.table(ed.DT.GNU_HASH, fixed)
        if top is None:
            return None, 0
        highest = int(np.frombuffer(self.data, "<u4", nbuckets, top.offset + fixed - 4 *
                                    nbuckets).max())
        if highest < symoffset:
            return top, symoffset
        start = top.offset + fixed + 4 * (highest - symoffset)
        if start >= len(self.data):
            return None, 0
        chain = np.frombuffer(self.data, "<u4", (len(self.data) - start) // 4, start)
        ends = np.flatnonzero(chain & 1)
        if not len(ends):
            return None, 0
        nsyms = highest + int(ends[0]) + 1
        return self.table(ed.DT.GNU_HASH, fixed + 4 * (nsyms - symoffset)), nsyms


def _tables(reader: _Reader) -> dict[str, TableInfo]:
    """Every table the dynamic tags describe and the file holds, by ``malformed``'s names."""
    sysv, nchain = reader.sysv_hash()
    gnu, nsyms = reader.gnu_hash()
    nsyms = nchain if sysv is not None else nsyms
    dt, found = ed.DT, {"hash": sysv, "gnu_hash": gnu}
    found["dynstr"] = reader.sized(dt.STRTAB, dt.STRSZ)
    found["rela"] = reader.sized(dt.RELA, dt.RELASZ, ed.RELA_DTYPE.itemsize)
    if reader.values.get(dt.PLTREL) == dt.RELA:
        found["jmprel"] = reader.sized(dt.JMPREL, dt.PLTRELSZ, ed.RELA_DTYPE.itemsize)
    found["relr"] = reader.sized(dt.RELR, dt.RELRSZ, ed.ADDR_SIZE)
    found["init_array"] = reader.sized(dt.INIT_ARRAY, dt.INIT_ARRAYSZ, ed.ADDR_SIZE)
    found["fini_array"] = reader.sized(dt.FINI_ARRAY, dt.FINI_ARRAYSZ, ed.ADDR_SIZE)
    if nsyms:
        found["dynsym"] = reader.table(dt.SYMTAB, nsyms * ed.SYM_DTYPE.itemsize,
                                       ed.SYM_DTYPE.itemsize)
        found["versym"] = reader.table(dt.VERSYM, 2 * nsyms, 2)
    for name, tag, num in (("verdef", dt.VERDEF, dt.VERDEFNUM),
                           ("verneed", dt.VERNEED, dt.VERNEEDNUM)):
        if num in reader.values:
            found[name] = reader.table(tag, 16)
    return {name: info for name, info in found.items() if info is not None}


_NO_SPEC = ElfSpec()
"""The spec of a real file's view: none (the mutators that need one are not used on it)."""


def _view(data: bytes) -> ElfImage:
    """The layout of a real file in the shape ``malformed``'s mutators read: its program
    headers, dynamic tags and tables (those the file really holds; a version chain that
    leaves the file or runs on without end is left out)."""
    phoff, phdrs = _phdr_table(data)
    dyn, tags = _dynamic(data, phdrs)
    tables = {} if dyn is None else _tables(_Reader(data, phdrs, dyn, tags))
    if dyn is not None:
        tables["dynamic"] = dyn
    view = ElfImage(data, _NO_SPEC, phoff, phdrs, tables, tags, [], {})
    for name in ("verdef", "verneed"):
        if name in tables:
            try:
                mf._chain(view, name)
            except (ValueError, IndexError):
                del tables[name]
    return view


# --------------------------------------------------------------------------------------------
# The field tables: one field of one entry set to a boundary value.


def _records(view: ElfImage, name: str, fields: tuple[Field, ...], *,
             label: str = "", skip: int = 0, count: int | None = None,
             indices: tuple[int, ...] = (), header: bool = False) -> list[_Table]:
    """The table ``name`` of ``view`` as records of ``fields`` (from byte ``skip`` on, at
    most ``count`` records; one ``header``), or nothing when the file has no such table."""
    info = view.tables.get(name)
    stride = max(off + width for _n, off, width in fields)
    if info is None:
        return []
    total = 1 if header else (info.size - skip) // stride if count is None else count
    return [_Table(label or name, info.offset + skip, stride, total, fields, indices,
                   header)] if total > 0 else []


def _hash_tables(view: ElfImage) -> list[_Table]:
    """The SysV and GNU hash tables as header fields, bloom words, buckets and chains."""
    out: list[_Table] = []
    if "hash" in view.tables:
        nbucket, nchain = np.frombuffer(view.data, "<u4", 2, view.tables["hash"].offset)
        out += _records(view, "hash", (("nbucket", 0, 4), ("nchain", 4, 4)), header=True)
        out += _records(view, "hash", _WORD4, label="hash.bucket", skip=8, count=int(nbucket))
        out += _records(view, "hash", _WORD4, label="hash.chain", skip=8 + 4 * int(nbucket),
                        count=int(nchain))
    if "gnu_hash" in view.tables:
        nbuckets, _sym, bloom, _shift = np.frombuffer(view.data, "<u4", 4,
                                                      view.tables["gnu_hash"].offset)
        head = (("nbuckets", 0, 4), ("symoffset", 4, 4), ("bloom_size", 8, 4),
                ("bloom_shift", 12, 4))
        out += _records(view, "gnu_hash", head, header=True)
        out += _records(view, "gnu_hash", _WORD8, label="gnu_hash.bloom", skip=16,
                        count=int(bloom))
        out += _records(view, "gnu_hash", _WORD4, label="gnu_hash.bucket",
                        skip=16 + 8 * int(bloom), count=int(nbuckets))
        out += _records(view, "gnu_hash", _WORD4, label="gnu_hash.chain",
                        skip=16 + 8 * int(bloom) + 4 * int(nbuckets))
    return out


def _referenced_symbols(view: ElfImage) -> tuple[int, ...]:
    """The dynsym indices (never 0) that DT_RELA/DT_JMPREL relocations name."""
    if "dynsym" not in view.tables:
        return ()
    nsyms = view.tables["dynsym"].size // ed.SYM_DTYPE.itemsize
    found = [np.frombuffer(view.data, ed.RELA_DTYPE, info.size // ed.RELA_DTYPE.itemsize,
                           info.offset)["r_info"] >> np.uint64(32)
             for name, info in view.tables.items() if name in ("rela", "jmprel")]
    used = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    return tuple(used[(used > 0) & (used < nsyms)].tolist())


def _field_tables(view: ElfImage) -> dict[str, list[_Table]]:
    """Per kind, the tables whose fields :func:`_mutate_field` corrupts."""
    phdrs = _Table("phdr", view.phoff, ed.PHDR_DTYPE.itemsize, len(view.phdrs),
                   _fields(ed.PHDR_DTYPE))
    symbols = _referenced_symbols(view)
    return {
        "header": [_Table("ehdr", 0, ed.EHDR_DTYPE.itemsize, 1,
                          _fields(ed.EHDR_DTYPE, "e_ident"), header=True)],
        "phdr": [phdrs] if len(view.phdrs) else [],
        "dynamic": _records(view, "dynamic", _fields(ed.DYN_DTYPE)),
        "reloc": _records(view, "rela", _RELA_FIELDS) + _records(view, "jmprel", _RELA_FIELDS),
        "relr": _records(view, "relr", _WORD8),
        "symbol": _records(view, "dynsym", _SYM_FIELDS, indices=symbols) if symbols else [],
        "hash": _hash_tables(view),
        "version": _records(view, "versym", _VERSYM),
        "init": _records(view, "init_array", _WORD8) + _records(view, "fini_array", _WORD8),
    }


def _boundary_values(draw: st.DrawFn, view: ElfImage, width: int, old: int) -> list[int]:
    """What a hostile file puts in a field of ``width`` bytes that held ``old``: 0, 1,
    all-ones, half of that, off by one, a page (and ``old`` plus one), the file's size and past
    it; an 8-byte field also gets ``malformed``'s far values and the address of another table
    (a value pointing at other fields)."""
    top = (1 << (8 * width)) - 1
    size = len(view.data)
    values = [0, 1, top, top >> 1, old + 1, old - 1, _PAGE, old + _PAGE, size, size + _PAGE]
    if width == ed.ADDR_SIZE:
        if len(view.load_segments):
            values.append(mf._far_values(draw, view))
        values += [info.vaddr for info in view.tables.values()]
    return [v for v in dict.fromkeys(v & top for v in values) if v != old]


def _mutate_field(tables: tuple[_Table, ...], draw: st.DrawFn, view: ElfImage,
                  data: bytearray) -> str:
    """Set one field of one record of one of ``tables`` to a boundary value; says which
    field of which entry became what."""
    table = draw(st.sampled_from(tables))
    i = draw(st.sampled_from(table.indices) if table.indices else ints(0, table.count - 1))
    name, offset, width = draw(st.sampled_from(table.fields))
    at = table.offset + i * table.stride + offset
    old = int.from_bytes(data[at:at + width], "little")
    new = draw(st.sampled_from(_boundary_values(draw, view, width, old)))
    mf._put(data, at, width, new)
    return f"{table.label(i, name)} {old:#x} -> {new:#x}"


# --------------------------------------------------------------------------------------------
# Which mutators apply to a file.


def _has(*names: str) -> Callable[[ElfImage], bool]:
    """A condition: the view has every table of ``names``."""
    return lambda view: all(n in view.tables for n in names)


def _any(*names: str) -> Callable[[ElfImage], bool]:
    """A condition: the view has one of the tables ``names``."""
    return lambda view: any(n in view.tables for n in names)


def _hashed(view: ElfImage) -> bool:
    """Whether the file has a symbol table and a hash table."""
    return _has("dynsym")(view) and _any("hash", "gnu_hash")(view)


def _init_tags(view: ElfImage) -> bool:
    """Whether the file has an init or fini array, each with its size tag."""
    pairs = [(t, size) for t, (_n, size, _s) in mf._ARRAY_TAGS.items()]
    present = [size in view.dynamic_tags for t, size in pairs if t in view.dynamic_tags]
    return bool(present) and all(present)


_MALFORMED: dict[str, list[tuple[Mutator, Callable[[ElfImage], bool]]]] = {
    "header": [(mf._mutate_header, lambda view: True)],
    "phdr": [(mf._mutate_phdr, lambda view: bool(mf._load_indices(view)))],
    "dynamic": [(mf._mutate_dynamic, lambda view: "dynamic" in view.tables
                 and bool(len(view.load_segments)) and ed.DT.NULL in view.dynamic_tags
                 and any(t in view.dynamic_tags for t in mf._DYN_POINTERS))],
    "reloc": [(mf._mutate_reloc, lambda view: _has("dynsym")(view)
               and _any("rela", "jmprel")(view))],
    "relr": [(mf._mutate_relr_bitmap, _has("relr", "dynsym"))],
    "hash": [(mf._mutate_hash, _hashed), (mf._mutate_hash_chain, _hashed)],
    "version": [(mf._mutate_version, _any("versym", "verdef", "verneed")),
                (mf._mutate_verchain, _any("verdef", "verneed"))],
    "init": [(mf._mutate_init, lambda view: _init_tags(view)
              and bool(len(view.load_segments)))],
    "truncate": [(mf._mutate_truncate, lambda view: True)],
    "flip": [(mf._mutate_flip, _has("dynamic"))],
}
"""Per kind, ``malformed``'s mutators that work on a real file's view, each with the
condition under which it does (the hash mutators need a table and the symbol count)."""


def _layout(data: bytes) -> _Layout:
    """The view of ``data`` and, per kind, the mutators that apply to it: ``malformed``'s
    (when their condition holds) and one field of one of the kind's tables."""
    view = _view(data)
    options: dict[str, list[Mutator]] = {}
    fields = _field_tables(view)
    for kind in FILE_MUTATION_KINDS[1:]:
        found = [m for m, applies in _MALFORMED.get(kind, []) if applies(view)]
        if fields.get(kind):
            found.append(functools.partial(_mutate_field, tuple(fields[kind])))
        options[kind] = found
    return _Layout(view, options)


# --------------------------------------------------------------------------------------------
# The strategy.


def mutated_files(
    paths: str | os.PathLike[str] | Collection[str | os.PathLike[str]],
    *,
    kinds: ValueOrStrategy[Collection[str]] = FILE_MUTATION_KINDS,
) -> st.SearchStrategy[MutatedFile]:
    """One of the ELF files ``paths`` (read now, once: see :func:`read_elf_paths`), unchanged
    or with one corruption of a kind from ``kinds`` (a subset of
    :data:`FILE_MUTATION_KINDS`).

    With "none" among the kinds, one draw in eight is the file unchanged (and a failing
    example shrinks towards it; hypothesis does not repeat an input, so a run checks each
    unchanged file about once). A corruption is found through the file's own headers:
    ``malformed``'s mutators on the file's layout (see :func:`~vmsim.fuzz.malformed.malformed_elf`
    for what each kind does), or one field of one entry of the kind's tables set to a boundary
    value. A kind the file gives nothing to corrupt falls back to "truncate".

    >>> bad = mutated_files("/usr/lib/x86_64-linux-gnu/libz.so.1", kinds=["phdr"]).example()
    >>> bad.kind, bad.mutation.startswith("phdr[")
    ('phdr', True)
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not isinstance(paths, Collection) or not paths:
        raise InvalidArgument(f"paths={paths!r}: expected a path or a non-empty collection "
                              "of paths")
    check_subset(kinds, "kinds", FILE_MUTATION_KINDS)
    try:
        files = read_elf_paths(paths)
    except ValueError as exc:
        raise InvalidArgument(f"paths: {exc}") from None
    layouts = {path: _layout(data) for path, data in files.items()}
    return _mutated(layouts, as_strategy(kinds))


@st.composite
def _mutated(draw: st.DrawFn, layouts: dict[str, _Layout],
             kinds: st.SearchStrategy[Collection[str]]) -> MutatedFile:
    """Draw a file, then leave it unchanged or let one mutator of a drawn kind corrupt a
    copy."""
    path = draw(st.sampled_from(sorted(layouts)))
    layout = layouts[path]
    allowed = draw(kinds)
    check_subset(allowed, "kinds", FILE_MUTATION_KINDS)
    if "none" in allowed and (len(allowed) == 1 or not draw(ints(0, _UNCHANGED_SHARE - 1))):
        return MutatedFile(layout.view.data, path, "none", "unchanged")
    usable = [k for k in FILE_MUTATION_KINDS if k in allowed and layout.options.get(k)]
    kind = draw(st.sampled_from(usable or ["truncate"]))
    mutate = draw(st.sampled_from(layout.options[kind]))
    data = bytearray(layout.view.data)
    mutation = mutate(draw, layout.view, data)
    return MutatedFile(bytes(data), path, kind, mutation)


# --------------------------------------------------------------------------------------------
# The oracle for an unchanged file: pyelftools and numpy, not the loader's parser.


@dataclass(frozen=True)
class _Words:
    """Relocated words of a file: link vaddrs ``at`` and the values a correct loader writes
    there minus the load bias (``value``), named ``what`` in messages."""

    what: str
    at: npt.NDArray[np.uint64]
    value: npt.NDArray[np.uint64]


@dataclass(frozen=True)
class _Expected:
    """What loading an unchanged file must produce, from pyelftools' reading of it:
    ``phdrs`` (a PHDR_DTYPE table of its program headers), the byte ranges relocations write
    (``written_at``, ``written_len``) and the words whose value is known (RELATIVE, RELR)."""

    phdrs: npt.NDArray[Any]
    written_at: npt.NDArray[np.uint64]
    written_len: npt.NDArray[np.int64]
    words: tuple[_Words, ...]


def _program_headers(elf: ELFFile) -> npt.NDArray[Any]:
    """The program headers as a ``loader.elfdefs.PHDR_DTYPE`` table (p_type numbered by
    pyelftools' own table)."""
    rows = []
    for seg in elf.iter_segments():
        h = seg.header
        ptype = h["p_type"] if isinstance(h["p_type"], int) else \
            ENUM_P_TYPE_BASE.get(h["p_type"], ENUM_P_TYPE_BASE["PT_NULL"])
        rows.append((ptype, h["p_flags"], h["p_offset"], h["p_vaddr"], h["p_paddr"],
                     h["p_filesz"], h["p_memsz"], h["p_align"]))
    return np.array(rows, dtype=ed.PHDR_DTYPE)


def _dynamic_table(data: bytes, dyn: Any, addr_tag: str, size_tag: str,
                   dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """The table ``addr_tag`` of ``dtype`` records, ``size_tag`` bytes long (empty when
    absent), found through pyelftools' address-to-offset mapping."""
    _vaddr, offset = dyn.get_table_offset(addr_tag)
    sizes = [t["d_val"] for t in dyn.iter_tags(size_tag)]
    if offset is None or not sizes:
        return np.zeros(0, dtype)
    return np.frombuffer(data, dtype, int(sizes[0]) // dtype.itemsize, offset)


def _relr_targets(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The addresses a DT_RELR table encodes (psABI: an even entry is an address, each odd one
    a bitmap of the 63 words after the previous ones), without a loop over the entries."""
    is_addr = (words & np.uint64(1)) == 0
    starts = np.flatnonzero(is_addr)
    owner = np.cumsum(is_addr) - 1
    bitmaps = np.flatnonzero(~is_addr & (owner >= 0))
    steps = (bitmaps - starts[owner[bitmaps]] - 1).astype(np.uint64)
    word = np.uint64(ed.ADDR_SIZE)
    base = words[starts[owner[bitmaps]]] + word + steps * np.uint64(63) * word
    bits = (words[bitmaps, None] >> np.arange(1, 64, dtype=np.uint64)) & np.uint64(1)
    row, col = np.nonzero(bits)
    return np.concatenate([words[starts], base[row] + col.astype(np.uint64) * word])


def _gather(buf: npt.NDArray[np.uint8], at: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """The little-endian 64-bit words at byte offsets ``at`` of ``buf`` (any alignment)."""
    idx = np.asarray(at, dtype=np.int64)[:, None] + np.arange(ed.ADDR_SIZE)
    words: npt.NDArray[np.uint64] = np.ascontiguousarray(buf[idx]).view("<u8").reshape(-1)
    return words


def _stored_words(data: bytes, phdrs: npt.NDArray[Any],
                  at: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The words the file stores at link vaddrs ``at`` (0 in .bss): RELR's addends."""
    buf = np.frombuffer(data, np.uint8)
    out = np.zeros(len(at), np.uint64)
    for ph in phdrs[phdrs["p_type"] == ENUM_P_TYPE_BASE["PT_LOAD"]]:
        vaddr, filesz = ph["p_vaddr"], ph["p_filesz"]
        inside = (at >= vaddr) & (at + np.uint64(ed.ADDR_SIZE) <= vaddr + filesz)
        out[inside] = _gather(buf, (at[inside] - vaddr + ph["p_offset"]).astype(np.int64))
    return out


def _written_lengths(dyn: Any, relocs: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """How many bytes each relocation writes: a word, or its symbol's st_size for COPY."""
    lengths = np.full(len(relocs), ed.ADDR_SIZE, dtype=np.int64)
    copies = np.flatnonzero(relocs["r_info"] & np.uint64(ed.MASK32) == _R_COPY)
    for k in copies.tolist():  # only COPY relocations: a handful in an executable
        symbol = dyn.get_symbol(int(relocs["r_info"][k]) >> 32)
        lengths[k] = max(ed.ADDR_SIZE, int(symbol["st_size"]))
    return lengths


_R_RELATIVE = ENUM_RELOC_TYPE_x64["R_X86_64_RELATIVE"]
_R_COPY = ENUM_RELOC_TYPE_x64["R_X86_64_COPY"]
_EMPTY_WORDS = np.zeros(0, np.uint64)


def _expected(data: bytes) -> _Expected:
    """What loading the unchanged file ``data`` must produce, as pyelftools reads it."""
    elf = ELFFile(io.BytesIO(data))
    phdrs = _program_headers(elf)
    dyn = next((s for s in elf.iter_segments() if isinstance(s, DynamicSegment)), None)
    if dyn is None:
        empty = np.zeros(0, np.int64)
        return _Expected(phdrs, _EMPTY_WORDS, empty, ())
    rela = _dynamic_table(data, dyn, "DT_RELA", "DT_RELASZ", ed.RELA_DTYPE)
    jmprel = np.zeros(0, ed.RELA_DTYPE)
    if [t["d_val"] for t in dyn.iter_tags("DT_PLTREL")] == [ENUM_D_TAG["DT_RELA"]]:
        jmprel = _dynamic_table(data, dyn, "DT_JMPREL", "DT_PLTRELSZ", ed.RELA_DTYPE)
    relr_at = _relr_targets(_dynamic_table(data, dyn, "DT_RELR", "DT_RELRSZ",
                                           np.dtype("<u8")))
    relocs = np.concatenate([rela, jmprel])
    relative = rela[rela["r_info"] & np.uint64(ed.MASK32) == _R_RELATIVE]
    return _Expected(
        phdrs,
        np.concatenate([relocs["r_offset"], relr_at]),
        np.concatenate([_written_lengths(dyn, relocs),
                        np.full(len(relr_at), ed.ADDR_SIZE, np.int64)]),
        (_Words("R_X86_64_RELATIVE", relative["r_offset"],
                relative["r_addend"].astype(np.uint64)),
         _Words("DT_RELR", relr_at, _stored_words(data, phdrs, relr_at))))


_EXPECTED: dict[str, tuple[bytes, _Expected]] = {}
"""path -> (its bytes, what loading them must produce): computed once per file."""


def _expected_for(path: str, data: bytes) -> _Expected:
    """:func:`_expected` of ``data`` (the unchanged file ``path``), cached."""
    cached = _EXPECTED.get(path)
    if cached is None or not (cached[0] is data or cached[0] == data):
        cached = _EXPECTED[path] = (data, _expected(data))
    return cached[1]


# --------------------------------------------------------------------------------------------
# The property.


def check_file_load(value: MutatedFile, mm: Mmap, *,
                    loader: LoaderUnderTest | None = None) -> str:
    """The property for one drawn file; returns the outcome ("loaded" or the refusal's class
    name). ``loader``: the loader under test (default: the project's; see
    ``vmsim.fuzz.contract``).

    A corrupted file: :func:`~vmsim.fuzz.properties.check_malformed_load` (it loads or is
    refused, the loader stays inside what it reserved and writes only pages it made writable,
    nothing it obtained is left mapped). The unchanged file must load, and then (an oracle
    that reads the file with pyelftools, not with the loader's parser): the span's final
    per-page permissions are what the program headers predict with glibc's RELRO rounding;
    every PT_LOAD holds the file's bytes except the words relocations write, zeros in .bss
    and up to the end of its last page; every R_X86_64_RELATIVE word is load_bias + r_addend
    and every DT_RELR word load_bias + the word the file stores there; once the space is
    dropped, nothing is left mapped. A difference raises
    :class:`~vmsim.fuzz.checking.Violation` naming the first one.
    """
    if value.kind != "none":
        return check_malformed_load(value.data, mm, loader=loader)
    want = _expected_for(value.path, value.data)
    cm = CheckingMmap(mm)
    attempt = attempt_load(loader, value.data, cm)
    if attempt.bias is None:
        raise Violation(f"{value.path} (unchanged) was refused: {attempt.refusal}: "
                        f"{attempt.reason}")
    check_bias(want.phdrs, attempt.bias, cm)
    loads = want.phdrs[want.phdrs["p_type"] == ENUM_P_TYPE_BASE["PT_LOAD"]]
    for i, ph in enumerate(loads):
        if int(ph["p_memsz"]):
            _check_segment(value.data, want, mm, attempt.bias, i, loads)
    check_headers_predict_map(want.phdrs, attempt.bias, mm)
    drop(attempt, cm)
    return "loaded"


def _written_mask(want: _Expected, vaddr: int, size: int) -> npt.NDArray[np.bool_]:
    """Which bytes of ``[vaddr, vaddr+size)`` relocations write."""
    inside = (want.written_at >= np.uint64(vaddr)) & (want.written_at < np.uint64(vaddr + size))
    starts = (want.written_at[inside] - np.uint64(vaddr)).astype(np.int64)
    ends = np.minimum(starts + want.written_len[inside], size)
    edges = np.zeros(size + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    mask: npt.NDArray[np.bool_] = np.cumsum(edges[:-1]) > 0
    return mask


def _check_segment(data: bytes, want: _Expected, mm: Mmap, bias: int, i: int,
                   loads: npt.NDArray[Any]) -> None:
    """PT_LOAD ``i`` of ``loads`` in memory: the file's bytes but for relocated words,
    zeros after them (.bss, the tail of the last file page, and :func:`_check_tail`), and
    every known word's value."""
    ph = loads[i]
    vaddr, memsz, filesz = int(ph["p_vaddr"]), int(ph["p_memsz"]), int(ph["p_filesz"])
    got = np.frombuffer(mm.read((bias + vaddr) & ed.MASK64, memsz), np.uint8)
    expect = np.zeros(memsz, np.uint8)
    expect[:filesz] = np.frombuffer(data, np.uint8, min(filesz, memsz), int(ph["p_offset"]))
    bad = np.flatnonzero((got != expect) & ~_written_mask(want, vaddr, memsz))
    if len(bad):
        at = int(bad[0])
        raise Violation(f"PT_LOAD {i} byte +{at:#x} (vaddr {vaddr + at:#x}) is "
                        f"{got[at]:#04x}, the file says {expect[at]:#04x} "
                        f"({'bss' if at >= filesz else 'file'}; {len(bad)} bytes differ)")
    for words in want.words:
        inside = (words.at >= np.uint64(vaddr)) & \
            (words.at + np.uint64(ed.ADDR_SIZE) <= np.uint64(vaddr + memsz))
        seen = _gather(got, words.at[inside] - np.uint64(vaddr))
        wanted = words.value[inside] + np.uint64(bias & ed.MASK64)
        wrong = np.flatnonzero(seen != wanted)
        if len(wrong):
            k = int(wrong[0])
            raise Violation(f"{words.what} word at vaddr {int(words.at[inside][k]):#x} is "
                            f"{int(seen[k]):#x}, expected load_bias + "
                            f"{int(words.value[inside][k]):#x} = {int(wanted[k]):#x} "
                            f"({len(wrong)} words wrong)")
    _check_tail(mm, bias, vaddr + filesz, vaddr + memsz, loads)


def _check_tail(mm: Mmap, bias: int, file_end: int, end: int,
                loads: npt.NDArray[Any]) -> None:
    """After a segment whose .bss runs past its last file page (link vaddrs: ``file_end``
    of its file bytes, ``end`` of its memory): zeros up to the end of ``end``'s page, which
    is anonymous memory, unless another PT_LOAD starts there. (glibc zeroes the last file
    page only up to ``end``: what follows there is the file's.)"""
    page = mm.page_size
    page_end = page_round_up(end, page)
    later = (loads["p_vaddr"] >= np.uint64(end)) & (loads["p_vaddr"] < np.uint64(page_end))
    if end <= page_round_up(file_end, page) or page_end == end or later.any():
        return
    tail = np.frombuffer(mm.read(bias + end, page_end - end), np.uint8)
    bad = np.flatnonzero(tail)
    if len(bad):
        raise Violation(f"byte at vaddr {end + int(bad[0]):#x}, after .bss in its last page, "
                        f"is {int(tail[bad[0]]):#04x}, not 0")
