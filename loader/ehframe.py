"""C++ exceptions through the objects our loader maps into this very process.

Part of the host backend (beside ``loader.hosttls``; imports ``loader.elf``, ``loader.elfdefs``,
``loader.mmap``, ``loader.symbols``). libgcc's unwinder finds the FDE of a return address
through glibc's list of objects (``_dl_find_object``, ``dl_iterate_phdr``), which does not
know ours, and first through the objects registered with ``__register_frame``. Ours are
registered there (``register_eh_frame``): their ``.eh_frame`` found through
PT_GNU_EH_FRAME's ``eh_frame_ptr``, after relocation (its pointers are relocated), checked
to end with the zero word libgcc walks to; ``EhFrame.deregister`` before unmapping.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from loader.elf import ElfImage
from loader.elfdefs import EHDR_DTYPE, PHDR_DTYPE, PT
from loader.errors import ElfSegmentError, ElfUnsupportedError
from loader.mmap import Mmap
from loader.symbols import HostResolver

__all__ = ["EhFrame", "register_eh_frame"]

_DW_EH_PE_PCREL = 0x10
_DW_EH_PE_FORMATS = {0x03: ("<u4", 4), 0x0B: ("<i4", 4), 0x04: ("<u8", 8), 0x0C: ("<i8", 8)}
_EH_HDR_VERSION = 1
_FRAME_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Mapped(Protocol):
    """What ``register_eh_frame`` needs of a loaded object (``loader.LoadedObject`` has it)."""

    @property
    def image(self) -> ElfImage: ...
    @property
    def load_bias(self) -> int: ...
    @property
    def mm(self) -> Mmap: ...
    @property
    def path(self) -> str: ...


def _program_headers(obj: _Mapped) -> np.ndarray[Any, Any]:
    """The program header table as mapped (the first PT_LOAD maps the file's first page):
    ElfSegmentError when the table is not inside that segment's file bytes."""
    first = next((seg for seg in obj.image.loads if seg.p_offset == 0), None)
    if first is None or first.p_filesz < EHDR_DTYPE.itemsize:
        raise ElfSegmentError(f"{obj.path}: PT_LOAD with p_offset 0", None,
                              "one mapping the ELF header")
    at = obj.load_bias + first.p_vaddr
    ehdr = np.frombuffer(obj.mm.read(at, EHDR_DTYPE.itemsize), dtype=EHDR_DTYPE)[0]
    phoff, phnum = int(ehdr["e_phoff"]), int(ehdr["e_phnum"])
    if phoff + phnum * PHDR_DTYPE.itemsize > first.p_filesz:
        raise ElfSegmentError(f"{obj.path}: e_phoff + e_phnum * e_phentsize",
                              phoff + phnum * PHDR_DTYPE.itemsize,
                              f"within the first PT_LOAD's {first.p_filesz:#x} file bytes")
    return np.frombuffer(obj.mm.read(at + phoff, phnum * PHDR_DTYPE.itemsize), PHDR_DTYPE)


def _eh_frame_start(obj: _Mapped) -> int | None:
    """The absolute address of ``.eh_frame``, from PT_GNU_EH_FRAME's ``eh_frame_ptr``;
    None without PT_GNU_EH_FRAME. ElfUnsupportedError for an encoding other than
    (pc-relative or absolute) 4- or 8-byte."""
    phdrs = _program_headers(obj)
    hit = np.flatnonzero(phdrs["p_type"] == int(PT.GNU_EH_FRAME))
    if not len(hit):
        return None
    hdr, size = obj.load_bias + int(phdrs["p_vaddr"][hit[0]]), int(phdrs["p_memsz"][hit[0]])
    version, enc = obj.mm.read(hdr, 2) if size >= 2 else (0, 0)
    fmt = _DW_EH_PE_FORMATS.get(enc & 0x0F)
    if version != _EH_HDR_VERSION or fmt is None or enc & 0xF0 not in (0, _DW_EH_PE_PCREL):
        raise ElfUnsupportedError(f"{obj.path}: .eh_frame_hdr version, eh_frame_ptr_enc",
                                  (version, hex(enc)), "version 1, a 4- or 8-byte pointer, "
                                  "absolute or pc-relative")
    if size < 4 + fmt[1]:
        raise ElfSegmentError(f"{obj.path}: PT_GNU_EH_FRAME p_memsz", size,
                              f"at least {4 + fmt[1]} (the header up to eh_frame_ptr)")
    value = int(np.frombuffer(obj.mm.read(hdr + 4, fmt[1]), dtype=fmt[0])[0])
    return (hdr + 4 + value if enc & _DW_EH_PE_PCREL else value) & ((1 << 64) - 1)


def _check_terminated(obj: _Mapped, start: int) -> None:
    """The records from ``start`` must end with a zero length word inside the PT_LOAD that
    holds ``start`` (libgcc walks them to that word): ElfSegmentError otherwise."""
    vaddr = start - obj.load_bias
    seg = next((s for s in obj.image.loads if s.p_vaddr <= vaddr < s.p_vaddr + s.p_filesz),
               None)
    if seg is None:
        raise ElfSegmentError(f"{obj.path}: eh_frame_ptr", hex(vaddr),
                              "inside a PT_LOAD's file bytes")
    data = obj.mm.read(start, seg.p_vaddr + seg.p_filesz - vaddr)
    at = 0
    while at + 4 <= len(data):          # one step per CIE or FDE: a chain, not a table
        length = int.from_bytes(data[at: at + 4], "little")
        if length == 0:
            return
        if length == 0xFFFFFFFF:
            length = 8 + int.from_bytes(data[at + 4: at + 12], "little")
        at += 4 + length
    raise ElfSegmentError(f"{obj.path}: .eh_frame at {vaddr:#x}", "no zero terminator",
                          "a zero length word inside its PT_LOAD")


@dataclass(slots=True)
class EhFrame:
    """A registration of one object's .eh_frame with libgcc's unwinder (``begin``: its
    address; 0 when the object has none). ``deregister()`` undoes it, once."""

    begin: int
    _deregister: int

    def deregister(self) -> None:
        """``__deregister_frame(begin)``; a second call does nothing. Call it before the
        object is unmapped."""
        if self.begin:
            _FRAME_FUNCTION(self._deregister)(self.begin)
            self.begin = 0


def register_eh_frame(obj: _Mapped, resolver: HostResolver | None = None) -> EhFrame:
    """Register ``obj``'s .eh_frame (after relocation: its pointers are relocated) with the
    ``__register_frame`` that ``resolver``'s scope gives (default: this process's, libgcc_s),
    so that exceptions unwind through its code. ElfUnsupportedError when this process has
    no ``__register_frame`` (no libgcc_s: load libstdc++ or libgcc_s first)."""
    scope = resolver if resolver is not None else HostResolver()
    functions = [scope.scope(name, None) for name in ("__register_frame",
                                                      "__deregister_frame")]
    if None in functions:
        raise ElfUnsupportedError("__register_frame, __deregister_frame", None,
                                  "defined in this process (libgcc_s.so.1)")
    register, deregister = (int(f or 0) for f in functions)
    begin = _eh_frame_start(obj)
    if begin is None or int.from_bytes(obj.mm.read(begin, 4), "little") == 0:
        return EhFrame(0, deregister)           # nothing to unwind through
    _check_terminated(obj, begin)
    _FRAME_FUNCTION(register)(begin)
    return EhFrame(begin, deregister)
