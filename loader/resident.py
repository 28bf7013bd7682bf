"""The objects this process already has, for a process image on the host backend.

Part of the ``loader`` layer (ctypes; imports ``loader.elf``, ``loader.tables``,
``loader.search``). On the host a ``LinkMap`` lives in this very process: libc, ld.so and
whatever else glibc loaded are used where they are, never loaded twice. ``process_objects``
lists them as glibc's link map does (``dl_iterate_phdr``: name, load bias, TLS module);
``Resident`` is one of them as a LinkMap member: its dynamic tables read from its file (for
symbol lookup), its load bias taken from glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.elf import ElfImage, FileBytes, ParsedFile, parse_image
from loader.elfdefs import PHDR_DTYPE, PT
from loader.pages import HOST_PAGE_SIZE, page_round_up
from loader.reloc import RelocOutcome, TlsLayout
from loader.symbols import thread_pointer
from loader.tables import DynamicTables, parse_tables

__all__ = ["ProcessObject", "Resident", "process_objects"]


class _PhdrInfo(ctypes.Structure):
    """struct dl_phdr_info (glibc's <link.h>), the fields up to dlpi_tls_data."""

    _fields_ = [("dlpi_addr", ctypes.c_uint64), ("dlpi_name", ctypes.c_char_p),
                ("dlpi_phdr", ctypes.c_void_p), ("dlpi_phnum", ctypes.c_uint16),
                ("dlpi_adds", ctypes.c_ulonglong), ("dlpi_subs", ctypes.c_ulonglong),
                ("dlpi_tls_modid", ctypes.c_size_t), ("dlpi_tls_data", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t,
                             ctypes.c_void_p)


@dataclass(frozen=True, slots=True)
class ProcessObject:
    """One object of this process's link map: its file name (the program's is
    /proc/self/exe's target; the vDSO's is its name, with no file), load bias, span of its
    PT_LOADs, TLS module id (0: none), this thread's TLS block of it (0: none yet) and the
    block's size."""

    path: str
    bias: int
    span: tuple[int, int]
    tls_modid: int
    tls_data: int
    tls_memsz: int = 0


def _phdrs(info: _PhdrInfo) -> npt.NDArray[Any]:
    """The object's program headers, as glibc has them in memory."""
    table = ctypes.string_at(info.dlpi_phdr or 0, info.dlpi_phnum * PHDR_DTYPE.itemsize)
    return np.frombuffer(table, dtype=PHDR_DTYPE)


def _span(info: _PhdrInfo, phdrs: npt.NDArray[Any]) -> tuple[int, int]:
    """Lowest and highest address of the object's PT_LOADs (page-rounded end)."""
    loads = phdrs[phdrs["p_type"] == int(PT.LOAD)]
    if not len(loads):
        return info.dlpi_addr, info.dlpi_addr
    start = info.dlpi_addr + int(loads["p_vaddr"].min())
    end = info.dlpi_addr + int((loads["p_vaddr"] + loads["p_memsz"]).max())
    return start, page_round_up(end, HOST_PAGE_SIZE)


def _tls_memsz(phdrs: npt.NDArray[Any]) -> int:
    """p_memsz of the object's PT_TLS (0 without one)."""
    hit = np.flatnonzero(phdrs["p_type"] == int(PT.TLS))
    return int(phdrs["p_memsz"][hit[0]]) if len(hit) else 0


def process_objects() -> list[ProcessObject]:
    """This process's objects in link-map order (``ProcessObject``)."""
    out: list[ProcessObject] = []

    def visit(info: Any, size: int, data: Any) -> int:
        row = info.contents
        name = (row.dlpi_name or b"").decode("utf-8", "surrogateescape")
        path = os.readlink("/proc/self/exe") if not out and not name else name
        phdrs = _phdrs(row)
        out.append(ProcessObject(path, int(row.dlpi_addr), _span(row, phdrs),
                                 int(row.dlpi_tls_modid), int(row.dlpi_tls_data or 0),
                                 _tls_memsz(phdrs)))
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(_CALLBACK(visit), None)
    return out


class Resident:
    """An object this process already has, as a LinkMap member: never mapped, relocated,
    initialised or unmapped by us. Its tables are read from its file when first asked
    (a symbol lookup that reaches it)."""

    runs_code = True
    classified = None

    def __init__(self, row: ProcessObject, name: str, parsed: ParsedFile | None = None) -> None:
        self.path, self.name = row.path, name
        self.parsed = parsed
        self.load_bias, self.span = row.bias, row.span
        self.tls_modid = row.tls_modid
        self.tls_offset: int | None = None
        self.is_program = False
        self.loaded = True
        self.relocations = RelocOutcome()
        self.inits: list[int] = []
        self.finis: list[int] = []

    @functools.cached_property
    def _parsed(self) -> tuple[ElfImage, DynamicTables]:
        """Its headers and tables, read from its file now: the headers the search parsed
        (``parsed``) when the file is still that one (``ParsedFile.image_for``)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            image = None if self.parsed is None else \
                self.parsed.image_for(fd, st, self.path, HOST_PAGE_SIZE)
            data = FileBytes(fd, st.st_size, self.path) if image is None else image.data
            try:
                image = image or parse_image(data, HOST_PAGE_SIZE)
                return image, parse_tables(image)
            finally:
                if isinstance(data, FileBytes):
                    data.close()
        finally:
            os.close(fd)

    @property
    def image(self) -> ElfImage:
        """Its headers, from its file."""
        return self._parsed[0]

    @property
    def tables(self) -> DynamicTables:
        """Its dynamic tables, from its file."""
        return self._parsed[1]

    def tls_layout(self) -> TlsLayout | None:
        """Its TLS module as glibc set it up: the id, and the static offset when it is a
        startup object (``in_static_tls``), else None (dynamic TLS)."""
        return TlsLayout(self.tls_modid, self.tls_offset) if self.tls_modid else None

    def in_static_tls(self, row: ProcessObject) -> None:
        """Mark it a startup object: its TLS block sits at a fixed distance below the
        thread pointer, the same in every thread (thread pointer - this thread's block)."""
        if self.tls_modid and row.tls_data:
            self.tls_offset = thread_pointer() - row.tls_data

    def run_init(self) -> None:
        """glibc ran its init already."""

    def unload(self, *, fini: bool = True) -> None:
        """Never unmapped by us: glibc owns it."""

    def close_file(self) -> None:
        """Nothing open."""

    def __repr__(self) -> str:
        return f"<Resident {self.path} bias={self.load_bias:#x}>"
