"""ELF64 x86-64 constants, record layouts and the small helpers over them, in one place.

Part of the ``loader`` layer (imports only numpy). Numbers from the System V gABI and the
x86-64 psABI, as named enums: ``PT.LOAD``, ``PF.W``, ``DT.RELA``, ``R_X86_64.RELATIVE``...
(an ``IntEnum`` member is its number, so it compares, indexes and hashes as one). The
numpy dtypes read the bulk tables straight from a file's bytes. No other module of
``loader`` writes an ELF number in its logic: it names it here.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

_Ints = TypeVar("_Ints", int, npt.NDArray[Any])

__all__ = [
    "ADDR_SIZE",
    "DF",
    "DF_1",
    "DT",
    "DYN_DTYPE",
    "EHDR_DTYPE",
    "ELFCLASS64",
    "ELFDATA2LSB",
    "ELFMAG",
    "ELFOSABI",
    "EM_X86_64",
    "ET",
    "EV_CURRENT",
    "MASK32",
    "MASK64",
    "PF",
    "PHDR_DTYPE",
    "PT",
    "RELA_DTYPE",
    "REL_DTYPE",
    "R_X86_64",
    "SHN",
    "STB",
    "STT",
    "SYM_DTYPE",
    "VERSYM_HIDDEN",
    "VERSYM_VERSION",
    "VER_FLG_BASE",
    "VER_FLG_WEAK",
    "WORD_SIZE",
    "st_bind",
    "st_type",
    "versym_index",
]

MASK64 = (1 << 64) - 1
"""All 64 bits: addresses and words wrap modulo 2**64, as C's uint64_t does."""
MASK32 = (1 << 32) - 1
"""All 32 bits: the hash functions' words wrap modulo 2**32 (Elf32_Word)."""
ADDR_SIZE = 8
"""Bytes of an Elf64_Addr / Elf64_Xword: a RELR word, an init array entry, a GOT slot."""
WORD_SIZE = 4
"""Bytes of an Elf64_Word: a hash table's buckets and chains."""

# --- identification (e_ident) ----------------------------------------------------------------

ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
EM_X86_64 = 62


class ELFOSABI(enum.IntEnum):
    """``e_ident[EI_OSABI]`` values glibc accepts (GNU is also called LINUX)."""

    SYSV = 0
    GNU = 3


class ET(enum.IntEnum):
    """``e_type``: the object's kind."""

    NONE = 0
    REL = 1
    EXEC = 2
    DYN = 3
    CORE = 4


# --- program headers -------------------------------------------------------------------------


class PT(enum.IntEnum):
    """``p_type``: what a program header describes."""

    NULL = 0
    LOAD = 1
    DYNAMIC = 2
    INTERP = 3
    NOTE = 4
    SHLIB = 5
    PHDR = 6
    TLS = 7
    GNU_EH_FRAME = 0x6474E550
    GNU_STACK = 0x6474E551
    GNU_RELRO = 0x6474E552
    GNU_PROPERTY = 0x6474E553


class PF(enum.IntFlag):
    """``p_flags``: the segment's permissions."""

    X = 1
    W = 2
    R = 4


# --- the dynamic section ---------------------------------------------------------------------


class DT(enum.IntEnum):
    """Dynamic tag numbers (``d_tag``) this loader reads."""

    NULL = 0
    NEEDED = 1
    PLTRELSZ = 2
    PLTGOT = 3
    HASH = 4
    STRTAB = 5
    SYMTAB = 6
    RELA = 7
    RELASZ = 8
    RELAENT = 9
    STRSZ = 10
    SYMENT = 11
    INIT = 12
    FINI = 13
    SONAME = 14
    RPATH = 15
    SYMBOLIC = 16
    REL = 17
    RELSZ = 18
    RELENT = 19
    PLTREL = 20
    DEBUG = 21
    TEXTREL = 22
    JMPREL = 23
    BIND_NOW = 24
    INIT_ARRAY = 25
    FINI_ARRAY = 26
    INIT_ARRAYSZ = 27
    FINI_ARRAYSZ = 28
    RUNPATH = 29
    FLAGS = 30
    PREINIT_ARRAY = 32
    PREINIT_ARRAYSZ = 33
    RELRSZ = 35
    RELR = 36
    RELRENT = 37
    GNU_HASH = 0x6FFFFEF5
    VERSYM = 0x6FFFFFF0
    RELACOUNT = 0x6FFFFFF9
    RELCOUNT = 0x6FFFFFFA
    FLAGS_1 = 0x6FFFFFFB
    VERDEF = 0x6FFFFFFC
    VERDEFNUM = 0x6FFFFFFD
    VERNEED = 0x6FFFFFFE
    VERNEEDNUM = 0x6FFFFFFF


class DF(enum.IntFlag):
    """``DT_FLAGS`` bits."""

    ORIGIN = 0x1
    SYMBOLIC = 0x2
    TEXTREL = 0x4
    BIND_NOW = 0x8
    STATIC_TLS = 0x10


class DF_1(enum.IntFlag):
    """``DT_FLAGS_1`` bits."""

    NOW = 0x1


# --- symbols ---------------------------------------------------------------------------------


class SHN(enum.IntEnum):
    """Special ``st_shndx`` values."""

    UNDEF = 0
    ABS = 0xFFF1
    COMMON = 0xFFF2


class STB(enum.IntEnum):
    """Symbol binding: ``st_info >> 4``."""

    LOCAL = 0
    GLOBAL = 1
    WEAK = 2
    GNU_UNIQUE = 10


class STT(enum.IntEnum):
    """Symbol type: ``st_info & 0xF``."""

    NOTYPE = 0
    OBJECT = 1
    FUNC = 2
    SECTION = 3
    FILE = 4
    COMMON = 5
    TLS = 6
    GNU_IFUNC = 10


_ST_TYPE_BITS = 4


def st_bind(info: _Ints) -> _Ints:
    """The binding (``STB``) of ``st_info`` (an int, or an array of them)."""
    return info >> _ST_TYPE_BITS


def st_type(info: _Ints) -> _Ints:
    """The type (``STT``) of ``st_info`` (an int, or an array of them)."""
    return info & ((1 << _ST_TYPE_BITS) - 1)


# --- symbol versions -------------------------------------------------------------------------

VERSYM_VERSION = 0x7FFF
"""The version index bits of a versym entry (and of vd_ndx, vna_other)."""
VERSYM_HIDDEN = 0x8000
"""The versym bit marking a definition not to bind by default (``sym@VER``, not ``@@``)."""
VER_FLG_BASE = 0x1
"""vd_flags: the file's own base version (its soname), not a real version."""
VER_FLG_WEAK = 0x2
"""vna_flags: a weak need (a missing version is no error)."""


def versym_index(versym: _Ints) -> _Ints:
    """The version index of a versym entry (or array of them): the hidden bit dropped."""
    return versym & VERSYM_VERSION


# --- relocations -----------------------------------------------------------------------------


class R_X86_64(enum.IntEnum):
    """x86-64 relocation type numbers (psABI table 4.9) this loader knows."""

    NONE = 0
    R64 = 1
    PC32 = 2
    COPY = 5
    GLOB_DAT = 6
    JUMP_SLOT = 7
    RELATIVE = 8
    R32 = 10
    R32S = 11
    DTPMOD64 = 16
    DTPOFF64 = 17
    TPOFF64 = 18
    PC64 = 24
    TLSDESC = 36
    IRELATIVE = 37
    RELATIVE64 = 38

    @property
    def psabi_name(self) -> str:
        """The psABI's spelling: ``R_X86_64_64`` for R64, ``R_X86_64_32S`` for R32S."""
        short = self.name[1:] if self.name[0] == "R" and self.name[1].isdigit() else self.name
        return f"R_X86_64_{short}"


# --- record layouts (little-endian ELF64) ----------------------------------------------------

EHDR_DTYPE = np.dtype([
    ("e_ident", "u1", (16,)), ("e_type", "<u2"), ("e_machine", "<u2"), ("e_version", "<u4"),
    ("e_entry", "<u8"), ("e_phoff", "<u8"), ("e_shoff", "<u8"), ("e_flags", "<u4"),
    ("e_ehsize", "<u2"), ("e_phentsize", "<u2"), ("e_phnum", "<u2"), ("e_shentsize", "<u2"),
    ("e_shnum", "<u2"), ("e_shstrndx", "<u2")])
PHDR_DTYPE = np.dtype([
    ("p_type", "<u4"), ("p_flags", "<u4"), ("p_offset", "<u8"), ("p_vaddr", "<u8"),
    ("p_paddr", "<u8"), ("p_filesz", "<u8"), ("p_memsz", "<u8"), ("p_align", "<u8")])
DYN_DTYPE = np.dtype([("d_tag", "<i8"), ("d_val", "<u8")])
RELA_DTYPE = np.dtype([("r_offset", "<u8"), ("r_info", "<u8"), ("r_addend", "<i8")])
REL_DTYPE = np.dtype([("r_offset", "<u8"), ("r_info", "<u8")])
SYM_DTYPE = np.dtype([("st_name", "<u4"), ("st_info", "u1"), ("st_other", "u1"),
                      ("st_shndx", "<u2"), ("st_value", "<u8"), ("st_size", "<u8")])
