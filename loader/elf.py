"""Parse and validate step 1 of 2: the ELF header and the program headers.

Part of the ``loader`` layer (imports ``loader.elfdefs``, ``loader.errors``, ``loader.pages``).
numpy reads the header and the program header table (``loader.elfdefs`` has their dtypes);
everything is checked here, before any memory is touched: a bad file raises an ``ElfError``
kind naming the field.
The dynamic section and the bulk tables it points at are read by ``loader.tables``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from loader.elfdefs import (
    EHDR_DTYPE,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    ELFOSABI,
    EM_X86_64,
    ET,
    EV_CURRENT,
    PF,
    PHDR_DTYPE,
    PT,
)
from loader.errors import ElfFileError, ElfHeaderError, ElfSegmentError, ElfUnsupportedError
from loader.pages import page_offset, page_round_down, page_round_up

__all__ = ["ElfBytes", "ElfImage", "FileBytes", "LoadColumns", "MemoryBytes", "Segment",
           "USER_LIMIT", "parse_image"]

EHDR_SIZE = EHDR_DTYPE.itemsize
PHDR_SIZE = PHDR_DTYPE.itemsize
USER_LIMIT = 1 << 47
"""The end of x86-64 user space (47-bit): no segment may reach past it."""

PF_X, PF_W, PF_R = PF.X, PF.W, PF.R


class ElfBytes(Protocol):
    """Where the loader reads the file's bytes: ``size`` of them, ``read(offset, length)``
    a read-only view of ``[offset, offset+length)``, which must lie inside the file."""

    size: int

    def read(self, offset: int, length: int) -> memoryview: ...


class MemoryBytes:
    """An ELF file given as bytes: every range is a view of them."""

    def __init__(self, data: Any) -> None:
        self.view = memoryview(data).toreadonly()
        self.size = len(self.view)

    def read(self, offset: int, length: int) -> memoryview:
        """The bytes ``[offset, offset+length)`` (inside the file: the parser checked)."""
        return self.view[offset: offset + length]


READ_WINDOW = 1 << 14
"""FileBytes reads whole aligned windows of this many bytes, so the small records read one
by one (version entries, the dynamic section) share one pread."""


class FileBytes:
    """An ELF file read from its open ``fd`` only where the loader looks, into one buffer of
    the file's size that the process owns (never a view of a mapping of the file, which a
    truncation would turn into SIGBUS).

    Why not read it whole: most of a library is code the loader never reads (libcrypto: 2.6
    of 4.6 MB are text); copying it all cost more than parsing all its tables. The buffer
    is still allocated whole, once (memory as for a whole read, and the allocator recycles
    it from load to load instead of page-faulting fresh pieces in). Each window is read at
    most once, so bytes already checked never change under a parsed table. A read that finds
    fewer bytes than ``size`` (fstat's at open) is an ElfFileError naming the file; any
    other change is for the caller's size and mtime checks. After ``close`` only windows
    already read can be served."""

    def __init__(self, fd: int, size: int, label: str) -> None:
        self.fd: int | None = fd
        self.size, self.label = size, label
        self.buffer = np.empty(size, dtype=np.uint8)      # no zero-fill: pread fills it
        self.view = memoryview(self.buffer.data).toreadonly()
        self.filled = bytearray(-(-size // READ_WINDOW))   # per window: read yet?

    def read(self, offset: int, length: int) -> memoryview:
        """The bytes ``[offset, offset+length)``; the windows not read yet are read now."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read [{offset:#x}, +{length:#x}) outside the file's "
                             f"{self.size:#x} bytes")
        first, last = offset // READ_WINDOW, -(-(offset + length) // READ_WINDOW)
        hole = self.filled.find(0, first, last)
        while hole >= 0:
            end = self.filled.find(1, hole, last)
            end = last if end < 0 else end
            self._pread(hole * READ_WINDOW, min(end * READ_WINDOW, self.size))
            self.filled[hole:end] = b"\1" * (end - hole)
            hole = self.filled.find(0, end, last)
        return self.view[offset: offset + length]

    def _pread(self, start: int, end: int) -> None:
        """Fill ``buffer[start:end]`` from the file, all of it, or ElfFileError (it shrank)."""
        if self.fd is None:
            raise ValueError(f"file {self.label} closed: [{start:#x}, {end:#x}) was never "
                             "read")
        view = self.buffer.data
        while start < end:
            n = os.preadv(self.fd, [view[start:end]], start)
            if n == 0:
                raise ElfFileError(f"file {self.label} size", start,
                                   f"{self.size:#x} bytes, as fstat said when it was opened "
                                   "(it shrank while being read)")
            start += n

    def close(self) -> None:
        """Forget the fd (its owner closes it): no read touches the file from now on."""
        self.fd = None

    def reopen(self, fd: int, label: str) -> None:
        """Read from ``fd`` (the same file opened again, as ``label``: the caller checked
        that it is, ``file_identity``) where no window was read yet."""
        self.fd, self.label = fd, label


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(st_dev, st_ino, st_size, st_mtime_ns): the same file, unchanged, has the same."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True, slots=True)
class Segment:
    """A program header, in the spec's field names (``p_flags`` holds PF_R/PF_W/PF_X)."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_filesz: int
    p_memsz: int
    p_align: int

    @property
    def end(self) -> int:
        """``p_vaddr + p_memsz``: the first vaddr past the segment."""
        return self.p_vaddr + self.p_memsz


class LoadColumns(NamedTuple):
    """The PT_LOADs as arrays, one entry per segment in p_vaddr order: what lookups over
    whole tables (``np.searchsorted`` on ``starts``) need, built once per file."""

    starts: npt.NDArray[np.uint64]       # p_vaddr
    ends: npt.NDArray[np.uint64]         # p_vaddr + p_memsz
    file_ends: npt.NDArray[np.uint64]    # p_vaddr + p_filesz
    offsets: npt.NDArray[np.uint64]      # p_offset
    flags: npt.NDArray[np.uint32]        # p_flags

    @classmethod
    def of(cls, loads: list[Segment]) -> LoadColumns:
        """The columns of ``loads``."""
        def col(values: list[int], dtype: Any = np.uint64) -> npt.NDArray[Any]:
            return np.array(values, dtype=dtype)
        return cls(col([s.p_vaddr for s in loads]), col([s.end for s in loads]),
                   col([s.p_vaddr + s.p_filesz for s in loads]),
                   col([s.p_offset for s in loads]), col([s.p_flags for s in loads], np.uint32))


@dataclass(frozen=True, slots=True)
class ElfImage:
    """A checked ELF file: header facts, PT_LOADs sorted and disjoint, the special headers.

    ``data`` gives the file's bytes (``read``); ``size`` is its length. ``interp`` is the
    PT_INTERP header (the program interpreter's path, an executable's), or None.
    """

    data: ElfBytes
    size: int
    e_type: ET
    e_entry: int
    loads: tuple[Segment, ...]
    dynamic: Segment | None
    relro: Segment | None
    tls: Segment | None
    interp: Segment | None
    page_size: int
    columns: LoadColumns

    def read(self, offset: int, length: int) -> memoryview:
        """The file bytes ``[offset, offset+length)``, which must lie inside the file."""
        return self.data.read(offset, length)

    def code_ranges(self) -> list[tuple[int, int]]:
        """``[p_vaddr, p_vaddr + p_filesz)`` of each executable PT_LOAD: the only places
        the loader may call (their .bss tails hold no code)."""
        code = int(PF_X)        # a plain int: an IntFlag's & goes through enum machinery
        return [(s.p_vaddr, s.p_vaddr + s.p_filesz) for s in self.loads if s.p_flags & code]

    def file_offset(self, vaddr: int, length: int) -> int | None:
        """The file offset holding ``[vaddr, vaddr+length)``, or None when that range is not
        wholly inside one PT_LOAD's file-backed part."""
        for seg in self.loads:
            if seg.p_vaddr <= vaddr and vaddr + length <= seg.p_vaddr + seg.p_filesz:
                return seg.p_offset + (vaddr - seg.p_vaddr)
        return None


@dataclass(frozen=True, slots=True)
class ParsedFile:
    """An ``ElfImage`` parsed from a file (its ``FileBytes`` closed since) and the file's
    ``file_identity`` when it was opened. ``loader.search`` keeps one per object it finds,
    so that mapping the object (``loader.pipeline.map_object``) parses no header twice: it
    reuses the image when the file it opens has the same identity."""

    image: ElfImage
    identity: tuple[int, int, int, int]

    def image_for(self, fd: int, st: os.stat_result, label: str,
                  page_size: int) -> ElfImage | None:
        """The image, reading from ``fd`` (``st`` its fstat, opened as ``label``) from now
        on, when it was parsed from that very file (same ``file_identity``) at
        ``page_size``; else None (parse it afresh)."""
        data = self.image.data
        if self.identity != file_identity(st) or self.image.page_size != page_size or \
                not isinstance(data, FileBytes):
            return None
        data.reopen(fd, label)
        return self.image


def _parse_header(data: ElfBytes) -> dict[str, Any]:
    """Check the identification bytes and read the ELF header (a dict of its fields)."""
    if data.size < EHDR_SIZE:
        raise ElfHeaderError("file size", data.size, f"at least {EHDR_SIZE} bytes (an ELF64 "
                             "header)")
    ident = bytes(data.read(0, 16))
    if ident[:4] != ELFMAG:
        raise ElfHeaderError("e_ident[EI_MAG]", ident[:4], "must be b'\\x7fELF'")
    if ident[4] != ELFCLASS64:
        raise ElfUnsupportedError("e_ident[EI_CLASS]", ident[4], "only ELFCLASS64 (2)")
    if ident[5] != ELFDATA2LSB:
        raise ElfUnsupportedError("e_ident[EI_DATA]", ident[5], "only ELFDATA2LSB (1)")
    if ident[6] != EV_CURRENT:
        raise ElfHeaderError("e_ident[EI_VERSION]", ident[6], "must be EV_CURRENT (1)")
    row = np.frombuffer(data.read(0, EHDR_SIZE), dtype=EHDR_DTYPE, count=1)[0]
    return dict(zip(EHDR_DTYPE.names or (), row.tolist(), strict=True))   # Python ints


_EI_OSABI, _EI_ABIVERSION = 7, 8
_EI_PAD = slice(9, 16)


def _name(enum_type: Any, value: int) -> str | int:
    """``value``'s name in ``enum_type`` with the gABI prefix (``ET_DYN``), else the number."""
    try:
        return f"{enum_type.__name__}_{enum_type(value).name}"
    except ValueError:
        return value


def _check_ident(ident: bytes, hdr: dict[str, Any]) -> None:
    """The identification bytes glibc's open_verify checks beyond class and data: the OS ABI
    (System V or GNU), its ABI version (0 for System V), zero padding, and e_version."""
    osabi = ident[_EI_OSABI]
    if osabi not in (ELFOSABI.SYSV, ELFOSABI.GNU):
        raise ElfHeaderError("e_ident[EI_OSABI]", osabi, "ELFOSABI_SYSV or ELFOSABI_GNU "
                             "(glibc: ELF file OS ABI invalid)")
    if osabi == ELFOSABI.SYSV and ident[_EI_ABIVERSION] != 0:
        raise ElfHeaderError("e_ident[EI_ABIVERSION]", ident[_EI_ABIVERSION],
                             "0 for ELFOSABI_SYSV (glibc: ELF file ABI version invalid)")
    if any(ident[_EI_PAD]):
        raise ElfHeaderError("e_ident[EI_PAD]", ident[_EI_PAD].hex(),
                             "all zero (glibc: nonzero padding in e_ident)")
    if hdr["e_version"] != EV_CURRENT:
        raise ElfHeaderError("e_version", hdr["e_version"], "EV_CURRENT (1) (glibc: ELF file "
                             "version does not match current one)")


def _check_header(hdr: dict[str, Any], size: int) -> None:
    """e_type, e_machine and the program header table's place in the file."""
    if hdr["e_machine"] != EM_X86_64:
        raise ElfUnsupportedError("e_machine", hdr["e_machine"], f"only EM_X86_64 ({EM_X86_64})")
    if hdr["e_type"] not in (ET.DYN, ET.EXEC):
        raise ElfUnsupportedError("e_type", _name(ET, hdr["e_type"]), "only ET_DYN and ET_EXEC")
    if hdr["e_phentsize"] != PHDR_SIZE:
        raise ElfHeaderError("e_phentsize", hdr["e_phentsize"], f"must be {PHDR_SIZE}")
    if hdr["e_phnum"] == 0:
        raise ElfHeaderError("e_phnum", 0, "at least 1 (a PT_LOAD)")
    end = hdr["e_phoff"] + hdr["e_phnum"] * PHDR_SIZE
    if end > size:
        raise ElfHeaderError("e_phoff + e_phnum * e_phentsize", end,
                             f"within the file size {size:#x} (truncated file?)")


def _parse_phdrs(data: ElfBytes, hdr: dict[str, Any]) -> list[Segment]:
    """Every program header (``_check_header`` bounded the table by the file), one numpy
    read of the whole table."""
    table = data.read(hdr["e_phoff"], hdr["e_phnum"] * PHDR_SIZE)
    rows = np.frombuffer(table, dtype=PHDR_DTYPE).tolist()
    return [Segment(p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align)
            for p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, p_align in rows]


def _check_load(seg: Segment, i: int, size: int, page_size: int) -> None:
    """One PT_LOAD on its own: sizes, file bounds, address bounds, alignment."""
    name = f"PT_LOAD[{i}]"
    if seg.p_filesz > seg.p_memsz:
        raise ElfSegmentError(f"{name}.p_filesz", seg.p_filesz,
                              f"at most p_memsz {seg.p_memsz:#x}")
    if seg.p_offset + seg.p_filesz > size:
        raise ElfSegmentError(f"{name}.p_offset + p_filesz", seg.p_offset + seg.p_filesz,
                              f"within the file size {size:#x}")
    if seg.end > USER_LIMIT:
        raise ElfSegmentError(f"{name}.p_vaddr + p_memsz", seg.end,
                              f"below the user-space limit {USER_LIMIT:#x}")
    if page_offset(seg.p_vaddr, page_size) != page_offset(seg.p_offset, page_size):
        raise ElfSegmentError(f"{name}.p_offset", seg.p_offset,
                              f"congruent to p_vaddr {seg.p_vaddr:#x} modulo the page size "
                              f"{page_size:#x}")
    align = seg.p_align
    if align > 1 and (align & (align - 1) or align % page_size):
        raise ElfSegmentError(f"{name}.p_align", align,
                              f"a power of two and a multiple of the page size {page_size:#x}")
    if align > 1 and (seg.p_vaddr - seg.p_offset) % align:
        raise ElfSegmentError(f"{name}.p_vaddr - p_offset", seg.p_vaddr - seg.p_offset,
                              f"a multiple of p_align {align:#x}")


def _check_loads(loads: list[Segment], size: int, page_size: int) -> None:
    """All PT_LOADs: each valid, sorted by p_vaddr, no two overlapping (glibc requires it)."""
    if not loads:
        raise ElfSegmentError("PT_LOAD count", 0, "at least 1")
    for i, seg in enumerate(loads):
        _check_load(seg, i, size, page_size)
        if i and seg.p_vaddr < loads[i - 1].p_vaddr:
            raise ElfSegmentError(f"PT_LOAD[{i}].p_vaddr", seg.p_vaddr,
                                  f"at least the previous PT_LOAD's {loads[i - 1].p_vaddr:#x} "
                                  "(unsorted)")
        if i and seg.p_vaddr < loads[i - 1].end:
            raise ElfSegmentError(f"PT_LOAD[{i}].p_vaddr", seg.p_vaddr,
                                  f"at least the previous PT_LOAD's end {loads[i - 1].end:#x} "
                                  "(overlapping)")
        # Two segments in one page: the later mapping sets the whole page's protection, so
        # the earlier one's bytes would silently change protection (glibc then crashes
        # relocating into a page it has just made read-only). Refused unless flags agree.
        if i and page_round_down(seg.p_vaddr, page_size) < page_round_up(loads[i - 1].end,
                                                                          page_size) \
                and seg.p_flags != loads[i - 1].p_flags:
            raise ElfSegmentError(f"PT_LOAD[{i}].p_vaddr", seg.p_vaddr,
                                  f"in a page of its own: PT_LOAD[{i - 1}] (other flags) ends "
                                  f"at {loads[i - 1].end:#x} in the same page")
    span = page_round_up(loads[-1].end, page_size) - page_round_down(loads[0].p_vaddr, page_size)
    if span > USER_LIMIT:
        raise ElfSegmentError("span", span, f"at most the user-space size {USER_LIMIT:#x}")


def _inside_loads(start: int, end: int, loads: list[Segment]) -> bool:
    """True when ``[start, end)`` lies inside one PT_LOAD."""
    return any(ld.p_vaddr <= start and end <= ld.end for ld in loads)


def _check_special(relro: Segment | None, dyn: Segment | None, tls: Segment | None,
                   loads: list[Segment]) -> None:
    """PT_GNU_RELRO, PT_DYNAMIC and PT_TLS's init image must each lie inside one PT_LOAD
    (PT_TLS's p_memsz is the per-thread block's size: its .tbss tail takes no room in the
    object, and a large one runs past the PT_LOAD)."""
    for name, seg in (("PT_GNU_RELRO", relro), ("PT_DYNAMIC", dyn), ("PT_TLS", tls)):
        if seg is None:
            continue
        size, size_name = (seg.p_filesz, "p_filesz") if seg is tls else (seg.p_memsz, "p_memsz")
        if seg.end > USER_LIMIT or not _inside_loads(seg.p_vaddr, seg.p_vaddr + size, loads):
            raise ElfSegmentError(f"{name}.p_vaddr", seg.p_vaddr,
                                  f"[p_vaddr, p_vaddr + {size_name} {size:#x}) inside one "
                                  "PT_LOAD")
    if tls is not None:
        if tls.p_filesz > tls.p_memsz:
            raise ElfSegmentError("PT_TLS.p_filesz", tls.p_filesz,
                                  f"at most p_memsz {tls.p_memsz:#x}")
        if tls.p_align & (tls.p_align - 1):
            raise ElfSegmentError("PT_TLS.p_align", tls.p_align, "a power of two")


def _first(segs: list[Segment], p_type: PT) -> Segment | None:
    """The first program header of ``p_type``, or None."""
    return next((s for s in segs if s.p_type == p_type), None)


def parse_image(data: Any, page_size: int) -> ElfImage:
    """Parse and check the header and program headers of the ELF file ``data``.

    ``data`` is bytes-like (bytes, memoryview) or an ``ElfBytes`` (``FileBytes``: the
    pipeline reads a file where it looks). Raises an ElfError kind naming the field, its value
    and the limit; nothing else escapes (but ElfFileError from a file that shrank).
    """
    if not isinstance(data, FileBytes | MemoryBytes):
        data = MemoryBytes(data)
    size = data.size
    hdr = _parse_header(data)
    _check_ident(bytes(data.read(0, 16)), hdr)
    _check_header(hdr, size)
    segs = _parse_phdrs(data, hdr)
    # glibc ignores PT_LOADs with p_memsz 0; so do we.
    loads = [s for s in segs if s.p_type == PT.LOAD and s.p_memsz]
    _check_loads(loads, size, page_size)
    relro, dyn, tls = _first(segs, PT.GNU_RELRO), _first(segs, PT.DYNAMIC), _first(segs, PT.TLS)
    _check_special(relro, dyn, tls, loads)
    return ElfImage(data=data, size=size, e_type=ET(hdr["e_type"]), e_entry=hdr["e_entry"],
                    loads=tuple(loads), dynamic=dyn, relro=relro, tls=tls,
                    interp=_first(segs, PT.INTERP), page_size=page_size,
                    columns=LoadColumns.of(loads))
