"""Malformed input: each case raises an ElfError kind naming the field and the value, before
any Mmap call (so nothing is mapped and nothing written, on either backend); a backend failure
in the middle of a load unmaps everything already mapped.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from loader_support import SYSTEM_LIBS, sim_factory

from loader import (
    ElfDynamicError,
    ElfError,
    ElfHeaderError,
    ElfRelocationError,
    ElfSegmentError,
    ElfSymbolError,
    MmapError,
    TracingMmap,
    load,
)
from loader.elf import PHDR_SIZE, parse_image
from loader.libc import LibcMmap
from loader.mmap import MapFlags, Mapping, Mmap, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from loader.tables import DT, parse_tables
from vmsim.fuzz.isolate import run_isolated

LIBZ = SYSTEM_LIBS["libz"].read_bytes()
_IMAGE = parse_image(LIBZ, HOST_PAGE_SIZE)
_TABLES = parse_tables(_IMAGE)
PHOFF = struct.unpack_from("<Q", LIBZ, 0x20)[0]
PHNUM = struct.unpack_from("<H", LIBZ, 0x38)[0]


def _phdr_index(p_type: int, nth: int = 0) -> int:
    """Index of the nth program header of ``p_type``."""
    found = [i for i in range(PHNUM)
             if struct.unpack_from("<I", LIBZ, PHOFF + i * PHDR_SIZE)[0] == p_type]
    return found[nth]


def _set(data: bytearray, off: int, fmt: str, value: int) -> bytearray:
    """Overwrite one field."""
    struct.pack_into(fmt, data, off, value)
    return data


def _phdr_field(i: int, name: str) -> tuple[int, str]:
    """File offset and struct format of field ``name`` of program header ``i``."""
    layout = {"p_type": (0, "<I"), "p_flags": (4, "<I"), "p_offset": (8, "<Q"),
              "p_vaddr": (16, "<Q"), "p_filesz": (32, "<Q"), "p_memsz": (40, "<Q"),
              "p_align": (48, "<Q")}
    rel, fmt = layout[name]
    return PHOFF + i * PHDR_SIZE + rel, fmt


def _phdr(i: int, name: str, value: Callable[[int], int]) -> bytes:
    """libz with one program header field changed by ``value(old)``."""
    data = bytearray(LIBZ)
    off, fmt = _phdr_field(i, name)
    return bytes(_set(data, off, fmt, value(struct.unpack_from(fmt, data, off)[0])))


def _dyn_tag_offset(tag: int) -> int:
    """File offset of the d_val of dynamic tag ``tag`` in libz."""
    dyn = _IMAGE.dynamic
    assert dyn is not None
    for k in range(dyn.p_filesz // 16):
        if struct.unpack_from("<q", LIBZ, dyn.p_offset + 16 * k)[0] == tag:
            return dyn.p_offset + 16 * k + 8
    raise KeyError(tag)


def _table_offset(tag: int) -> int:
    """File offset of the table dynamic tag ``tag`` points at."""
    off = _IMAGE.file_offset(_TABLES.tags[tag], 1)
    assert off is not None
    return off


def _swap_loads() -> bytes:
    """PT_LOAD 1 and 2 swapped in the program header table."""
    data = bytearray(LIBZ)
    a, b = PHOFF + _phdr_index(1, 1) * PHDR_SIZE, PHOFF + _phdr_index(1, 2) * PHDR_SIZE
    data[a:a + PHDR_SIZE], data[b:b + PHDR_SIZE] = LIBZ[b:b + PHDR_SIZE], LIBZ[a:a + PHDR_SIZE]
    return bytes(data)


def _rela(entry: int, field: int, fmt: str, value: int) -> bytes:
    """libz with field ``field`` (byte offset in the entry) of RELA entry ``entry`` set."""
    return bytes(_set(bytearray(LIBZ), _table_offset(DT.RELA) + 24 * entry + field, fmt,
                      value))


def _sym_name(index: int, value: int) -> bytes:
    """libz with symbol ``index``'s st_name set."""
    return bytes(_set(bytearray(LIBZ), _table_offset(DT.SYMTAB) + 24 * index, "<I", value))


def _tag(tag: int, value: int) -> bytes:
    """libz with dynamic tag ``tag``'s value set."""
    return bytes(_set(bytearray(LIBZ), _dyn_tag_offset(tag), "<Q", value))


LOAD = 1
RELRO = 0x6474E552
CASES: dict[str, tuple[Callable[[], bytes], type[ElfError], str]] = {
    "empty": (lambda: b"", ElfHeaderError, "file size"),
    "truncated header": (lambda: LIBZ[:40], ElfHeaderError, "file size"),
    "truncated phdrs": (lambda: LIBZ[:PHOFF + 100], ElfHeaderError, "e_phoff"),
    "truncated half": (lambda: LIBZ[: len(LIBZ) // 2], ElfSegmentError, "p_offset + p_filesz"),
    "bad magic": (lambda: b"\x7fELG" + LIBZ[4:], ElfHeaderError, "EI_MAG"),
    "unsorted loads": (_swap_loads, ElfSegmentError, "unsorted"),
    "overlapping loads": (lambda: _phdr(_phdr_index(LOAD, 0), "p_memsz", lambda v: v + 0x2000),
                          ElfSegmentError, "overlapping"),
    "filesz > memsz": (lambda: _phdr(_phdr_index(LOAD, 3), "p_filesz", lambda v: v + 0x100),
                       ElfSegmentError, "p_filesz"),
    "offset past EOF": (lambda: _phdr(_phdr_index(LOAD, 2), "p_offset",
                                      lambda v: v + 0x100000),
                        ElfSegmentError, "p_offset + p_filesz"),
    "vaddr+memsz overflow": (lambda: _phdr(_phdr_index(LOAD, 3), "p_memsz",
                                           lambda v: 2**64 - 0x1000),
                             ElfSegmentError, "p_vaddr + p_memsz"),
    "misaligned offset": (lambda: _phdr(_phdr_index(LOAD, 1), "p_offset", lambda v: v + 8),
                          ElfSegmentError, "p_offset"),
    "reloc target read-only": (lambda: _rela(0, 0, "<Q", 0x100), ElfRelocationError,
                               "r_offset"),
    "reloc target past span": (lambda: _rela(0, 0, "<Q", 2**40), ElfRelocationError,
                               "r_offset"),
    "unknown reloc type": (lambda: _rela(0, 8, "<I", 0x7777), ElfRelocationError, "r_type"),
    "symbol index past table": (lambda: _rela(_first_symbolic(), 12, "<I", 100000),
                                ElfSymbolError, "r_sym"),
    "name past strtab": (lambda: _sym_name(3, 0x7FFFFFF), ElfSymbolError, "st_name"),
    "relro outside segments": (lambda: _phdr(_phdr_index(RELRO), "p_vaddr",
                                             lambda v: v + 0x100000),
                               ElfSegmentError, "PT_GNU_RELRO"),
    "absurd RELASZ": (lambda: _tag(DT.RELASZ, 2**62), ElfDynamicError, "DT_RELA size"),
    "absurd e_phnum": (lambda: bytes(_set(bytearray(LIBZ), 0x38, "<H", 0xFFFF)),
                       ElfHeaderError, "e_phoff"),
    "RELASZ not entry multiple": (lambda: _tag(DT.RELASZ, 25), ElfDynamicError, "DT_RELA size"),
    "strtab outside segments": (lambda: _tag(DT.STRTAB, 2**45), ElfDynamicError, "DT_STRTAB"),
    "IRELATIVE resolver in data": (lambda: _rela(_first_relative(), 8, "<I", 37),
                                   ElfRelocationError, "IRELATIVE resolver"),
    "DT_INIT in data": (lambda: _tag(DT.INIT, 0x100), ElfDynamicError, "DT_INIT"),
    "loads sharing a page": (lambda: _phdr(_phdr_index(LOAD, 3), "p_vaddr",
                                           lambda v: v - 0x1000),
                             ElfSegmentError, "page of its own"),
    "definition outside the object": (lambda: _sym_value(_self_bound(), 2**40),
                                      ElfSymbolError, "st_value"),
}


def _self_bound() -> int:
    """A symbol libz defines and its relocations reference (it binds to itself)."""
    refs = {s for t in _TABLES.relocs for s in t.r_sym.tolist() if s}
    return int(next(i for i in sorted(refs) if _TABLES.symtab["st_shndx"][i] != 0))


def _sym_value(index: int, value: int) -> bytes:
    """libz with symbol ``index``'s st_value set."""
    return bytes(_set(bytearray(LIBZ), _table_offset(DT.SYMTAB) + 24 * index + 8, "<Q",
                      value))


def _first_relative() -> int:
    """Index of the first R_X86_64_RELATIVE entry of DT_RELA whose addend points at data."""
    table = _TABLES.relocs[0]
    code = [(s.p_vaddr, s.end) for s in _IMAGE.loads if s.p_flags & 1]
    in_code = [any(lo <= a < hi for lo, hi in code) for a in table.r_addend.tolist()]
    return next(i for i, t in enumerate(table.r_type.tolist()) if t == 8 and not in_code[i])


def _first_symbolic() -> int:
    """Index of the first RELA entry with a symbol."""
    table = _TABLES.relocs[0]
    return int((table.r_sym != 0).argmax())


def _attempt(data: bytes, mm: Mmap) -> tuple[str, str, str, int]:
    """Load ``data``; (error class, field, message, number of Mmap calls made)."""
    traced = TracingMmap(mm)
    try:
        load(data, traced)
    except ElfError as exc:
        return type(exc).__name__, exc.field, str(exc), len(traced.calls)
    return "loaded", "", "", len(traced.calls)


@pytest.mark.parametrize("backend", ["libc", "sim"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_raises_before_any_call(case: str, backend: str) -> None:
    make, kind, field = CASES[case]
    data = make()
    if backend == "libc":
        status, got = run_isolated(_attempt, data, LibcMmap())
        assert status == "ok"
    else:
        factory = sim_factory()
        mm = factory()
        got = _attempt(data, mm)
        assert mm.maps() == []
    name, _field, message, calls = got
    assert name == kind.__name__, message
    assert field in message, message
    assert "=" in message and ":" in message        # field = value: limit
    assert calls == 0


class FailingMmap(TracingMmap):
    """Fails the ``fail_at``-th mapping call (mmap, mmap_anonymous, mprotect) with ENOMEM."""

    def __init__(self, inner: Mmap, fail_at: int) -> None:
        super().__init__(inner)
        self.fail_at, self.count = fail_at, 0

    def _tick(self, what: str) -> None:
        self.count += 1
        if self.count == self.fail_at:
            raise MmapError(errno.ENOMEM, f"{what}: injected failure")

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        self._tick("mmap")
        return super().mmap(addr, length, prot, flags, offset, fd)

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        self._tick("mmap_anonymous")
        return super().mmap_anonymous(addr, length, prot, flags)

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        self._tick("mprotect")
        super().mprotect(addr, length, prot)


def _fail_midway(path: Path, fail_at: int, mm: Mmap) -> tuple[bool, list[str]]:
    """Load with the nth call failing; (raised MmapError, maps lines left in the span)."""
    wrapped = FailingMmap(mm, fail_at)
    try:
        load(path, wrapped)
    except MmapError:
        reserve = next(c for c in wrapped.calls if c.op == "mmap_reserve")
        start = int(reserve.result)
        length = int(dict(reserve.args)["length"])
        left = [str(r) for r in mm.maps() if r.start < start + length and r.end > start]
        return True, left
    return False, []


@pytest.mark.parametrize("backend", ["libc", "sim"])
@pytest.mark.parametrize("fail_at", range(1, 6))  # libz: 4 mmap + RELRO
def test_backend_failure_unmaps_everything(fail_at: int, backend: str) -> None:
    path = SYSTEM_LIBS["libz"]
    if backend == "libc":
        status, (raised, left) = run_isolated(_fail_midway, path, fail_at, LibcMmap())
        assert status == "ok"
    else:
        factory = sim_factory()
        mm = factory()
        raised, left = _fail_midway(path, fail_at, mm)
        assert mm.maps() == []
    assert raised
    assert left == []
