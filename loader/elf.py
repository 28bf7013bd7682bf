"""Parse and validate step 1 of 2: the ELF header and the program headers.

Part of the ``loader`` layer (imports only ``loader.errors``/``loader.pages`` and pyelftools).
pyelftools' construct structs read the header and each program header; everything is checked
here, before any memory is touched: a bad file raises an ``ElfError`` kind naming the field.
The dynamic section and the bulk tables it points at are read by ``loader.tables``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from elftools.elf.structs import ELFStructs

from loader.errors import ElfHeaderError, ElfSegmentError, ElfUnsupportedError
from loader.pages import page_offset, page_round_down, page_round_up

__all__ = ["ElfImage", "Segment", "USER_LIMIT", "parse_image"]

EHDR_SIZE = 64
PHDR_SIZE = 56
USER_LIMIT = 1 << 47
"""The end of x86-64 user space (47-bit): no segment may reach past it."""

PF_X, PF_W, PF_R = 1, 2, 4
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP, _PT_TLS = "PT_LOAD", "PT_DYNAMIC", "PT_INTERP", "PT_TLS"
_PT_RELRO = "PT_GNU_RELRO"


@dataclass(frozen=True, slots=True)
class Segment:
    """A program header, in the spec's field names (``p_flags`` holds PF_R/PF_W/PF_X)."""

    p_type: str
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


@dataclass(frozen=True, slots=True)
class ElfImage:
    """A checked ELF file: header facts, PT_LOADs sorted and disjoint, the special headers.

    ``data`` is the whole file (bytes, or a read-only mmap of it); ``size`` its length.
    """

    data: Any
    size: int
    e_type: str
    e_entry: int
    loads: tuple[Segment, ...]
    dynamic: Segment | None
    relro: Segment | None
    tls: Segment | None
    interp: bool
    page_size: int

    def file_offset(self, vaddr: int, length: int) -> int | None:
        """The file offset holding ``[vaddr, vaddr+length)``, or None when that range is not
        wholly inside one PT_LOAD's file-backed part."""
        for seg in self.loads:
            if seg.p_vaddr <= vaddr and vaddr + length <= seg.p_vaddr + seg.p_filesz:
                return seg.p_offset + (vaddr - seg.p_vaddr)
        return None


@cache
def _structs(e_type: str) -> ELFStructs:
    """pyelftools' construct structs for little-endian ELF64 x86-64, built once per e_type."""
    structs = ELFStructs(little_endian=True, elfclass=64)
    structs.create_basic_structs()
    if e_type:
        structs.create_advanced_structs(e_type, "EM_X86_64", "ELFOSABI_SYSV")
    return structs


def _parse_header(data: Any, size: int) -> Any:
    """Check the identification bytes and parse the ELF header with pyelftools."""
    if size < EHDR_SIZE:
        raise ElfHeaderError("file size", size, f"at least {EHDR_SIZE} bytes (an ELF64 header)")
    ident = bytes(data[:16])
    if ident[:4] != b"\x7fELF":
        raise ElfHeaderError("e_ident[EI_MAG]", ident[:4], "must be b'\\x7fELF'")
    if ident[4] != 2:
        raise ElfUnsupportedError("e_ident[EI_CLASS]", ident[4], "only ELFCLASS64 (2)")
    if ident[5] != 1:
        raise ElfUnsupportedError("e_ident[EI_DATA]", ident[5], "only ELFDATA2LSB (1)")
    if ident[6] != 1:
        raise ElfHeaderError("e_ident[EI_VERSION]", ident[6], "must be EV_CURRENT (1)")
    try:
        return _structs("").Elf_Ehdr.parse(bytes(data[:EHDR_SIZE]))
    except Exception as exc:  # pyelftools' construct errors
        raise ElfHeaderError("ELF header", type(exc).__name__, str(exc)) from exc


_EI_PAD = slice(9, 16)
_OSABIS = ("ELFOSABI_SYSV", "ELFOSABI_LINUX")  # glibc: ELFOSABI_GNU is ELFOSABI_LINUX (3)


def _check_ident(ident: bytes, hdr: Any) -> None:
    """The identification bytes glibc's open_verify checks beyond class and data: the OS ABI
    (System V or GNU), its ABI version (0 for System V), zero padding, and e_version."""
    osabi = hdr.e_ident["EI_OSABI"]
    if osabi not in _OSABIS:
        raise ElfHeaderError("e_ident[EI_OSABI]", osabi, "ELFOSABI_SYSV or ELFOSABI_GNU "
                             "(glibc: ELF file OS ABI invalid)")
    if osabi == "ELFOSABI_SYSV" and hdr.e_ident["EI_ABIVERSION"] != 0:
        raise ElfHeaderError("e_ident[EI_ABIVERSION]", hdr.e_ident["EI_ABIVERSION"],
                             "0 for ELFOSABI_SYSV (glibc: ELF file ABI version invalid)")
    if any(ident[_EI_PAD]):
        raise ElfHeaderError("e_ident[EI_PAD]", ident[_EI_PAD].hex(),
                             "all zero (glibc: nonzero padding in e_ident)")
    if hdr.e_version != "EV_CURRENT":
        raise ElfHeaderError("e_version", hdr.e_version, "EV_CURRENT (1) (glibc: ELF file "
                             "version does not match current one)")


def _check_header(hdr: Any, size: int) -> None:
    """e_type, e_machine and the program header table's place in the file."""
    if hdr.e_machine != "EM_X86_64":
        raise ElfUnsupportedError("e_machine", hdr.e_machine, "only EM_X86_64")
    if hdr.e_type not in ("ET_DYN", "ET_EXEC"):
        raise ElfUnsupportedError("e_type", hdr.e_type, "only ET_DYN and ET_EXEC")
    if hdr.e_phentsize != PHDR_SIZE:
        raise ElfHeaderError("e_phentsize", hdr.e_phentsize, f"must be {PHDR_SIZE}")
    if hdr.e_phnum == 0:
        raise ElfHeaderError("e_phnum", 0, "at least 1 (a PT_LOAD)")
    end = hdr.e_phoff + hdr.e_phnum * PHDR_SIZE
    if end > size:
        raise ElfHeaderError("e_phoff + e_phnum * e_phentsize", end,
                             f"within the file size {size:#x} (truncated file?)")


def _parse_phdrs(data: Any, hdr: Any) -> list[Segment]:
    """Every program header, through pyelftools' Elf_Phdr struct."""
    phdr = _structs(hdr.e_type).Elf_Phdr
    raw = bytes(data[hdr.e_phoff: hdr.e_phoff + hdr.e_phnum * PHDR_SIZE])
    out = []
    try:
        for i in range(hdr.e_phnum):
            p = phdr.parse(raw[i * PHDR_SIZE: (i + 1) * PHDR_SIZE])
            out.append(Segment(str(p.p_type), p.p_flags, p.p_offset, p.p_vaddr, p.p_filesz,
                               p.p_memsz, p.p_align))
    except Exception as exc:  # pyelftools' construct errors
        raise ElfHeaderError("program header", type(exc).__name__, str(exc)) from exc
    return out


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


def _inside_loads(seg: Segment, loads: list[Segment]) -> bool:
    """True when ``[p_vaddr, p_vaddr+p_memsz)`` lies inside one PT_LOAD."""
    return any(ld.p_vaddr <= seg.p_vaddr and seg.end <= ld.end for ld in loads)


def _check_special(relro: Segment | None, dyn: Segment | None, tls: Segment | None,
                   loads: list[Segment]) -> None:
    """PT_GNU_RELRO, PT_DYNAMIC and PT_TLS must each lie inside one PT_LOAD."""
    for name, seg in (("PT_GNU_RELRO", relro), ("PT_DYNAMIC", dyn), ("PT_TLS", tls)):
        if seg is None:
            continue
        if seg.end > USER_LIMIT or not _inside_loads(seg, loads):
            raise ElfSegmentError(f"{name}.p_vaddr", seg.p_vaddr,
                                  f"[p_vaddr, p_vaddr + p_memsz {seg.p_memsz:#x}) inside one "
                                  "PT_LOAD")
    if tls is not None:
        if tls.p_filesz > tls.p_memsz:
            raise ElfSegmentError("PT_TLS.p_filesz", tls.p_filesz,
                                  f"at most p_memsz {tls.p_memsz:#x}")
        if tls.p_align & (tls.p_align - 1):
            raise ElfSegmentError("PT_TLS.p_align", tls.p_align, "a power of two")


def _first(segs: list[Segment], p_type: str) -> Segment | None:
    """The first program header of ``p_type``, or None."""
    return next((s for s in segs if s.p_type == p_type), None)


def parse_image(data: Any, page_size: int) -> ElfImage:
    """Parse and check the header and program headers of the ELF file ``data``.

    ``data`` is bytes-like (bytes, memoryview or a read-only mmap). Raises an ElfError kind
    naming the field, its value and the limit; nothing else escapes.
    """
    size = len(data)
    hdr = _parse_header(data, size)
    _check_ident(bytes(data[:16]), hdr)
    _check_header(hdr, size)
    segs = _parse_phdrs(data, hdr)
    # glibc ignores PT_LOADs with p_memsz 0; so do we.
    loads = [s for s in segs if s.p_type == _PT_LOAD and s.p_memsz]
    _check_loads(loads, size, page_size)
    relro, dyn, tls = _first(segs, _PT_RELRO), _first(segs, _PT_DYNAMIC), _first(segs, _PT_TLS)
    _check_special(relro, dyn, tls, loads)
    return ElfImage(data=data, size=size, e_type=hdr.e_type, e_entry=hdr.e_entry,
                    loads=tuple(loads), dynamic=dyn, relro=relro, tls=tls,
                    interp=_first(segs, _PT_INTERP) is not None, page_size=page_size)
