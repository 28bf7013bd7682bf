"""Loaders under test for the testbed's own tests: a minimal correct one, and copies of it with
one planted bug each, which the properties must catch.

A loader under test is any ``f(data: bytes, mm: Mmap) -> int`` returning its load bias
(``vmsim.fuzz.contract``). ``minimal`` supports what ``--relocations RELATIVE`` images hold:
ET_DYN, PT_LOAD segments, DT_RELA RELATIVE relocations, PT_GNU_RELRO. Each planted bug is a
flag of :class:`Minimal`, so the bug is one line away from the correct code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from loader.mmap import MapFlags, Mmap, ProtFlags

PT_LOAD, PT_DYNAMIC, PT_GNU_RELRO = 1, 2, 0x6474E552
DT_NULL, DT_RELA, DT_RELASZ = 0, 7, 8
R_X86_64_RELATIVE = 8
FIXED = MapFlags.MAP_PRIVATE | MapFlags.MAP_FIXED
RW = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE


def program_headers(data: bytes) -> list[tuple[int, ...]]:
    """(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align) each."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ValueError("not an ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 32)
    entsize, count = struct.unpack_from("<HH", data, 54)
    return [struct.unpack_from("<IIQQQQQQ", data, phoff + i * entsize) for i in range(count)]


def prot_of(p_flags: int) -> ProtFlags:
    """PF_R/PF_W/PF_X as PROT_READ/WRITE/EXEC."""
    return ProtFlags.from_rwx("".join(c if p_flags & b else "-"
                                      for c, b in (("r", 4), ("w", 2), ("x", 1))))


def inside(loads: list[tuple[int, ...]], vaddr: int, size: int, what: str) -> int:
    """``vaddr``, after checking that ``[vaddr, vaddr+size)`` lies in one PT_LOAD's memory
    (ValueError otherwise: a loader must never touch what it did not map)."""
    if not any(p[3] <= vaddr and vaddr + size <= p[3] + p[6] for p in loads):
        raise ValueError(f"{what} at {vaddr:#x} (+{size:#x}) is outside every PT_LOAD")
    return vaddr


@dataclass(frozen=True)
class Minimal:
    """The minimal loader; each flag plants one bug."""

    relro_rounded_up: bool = False     # RELRO's end rounded up (glibc rounds it down)
    bss_not_zeroed: bool = False       # the last file page copied whole: .bss keeps file bytes
    relative_from_base: bool = False   # RELATIVE words = mapped base + addend, not bias + addend
    protect_then_relocate: bool = False  # final protections before relocating: writes to r--
    leak_on_refusal: bool = False      # a refused file keeps its reservation

    def __call__(self, data: bytes, mm: Mmap) -> int:
        page = mm.page_size
        loads = [p for p in program_headers(data) if p[0] == PT_LOAD and p[6]]  # not empty
        lo = min(p[3] for p in loads) & -page
        hi = -(-max(p[3] + p[6] for p in loads) // page) * page
        base = mm.mmap_reserve(None, hi - lo, True)
        try:
            return self._load(data, mm, loads, base, base - lo)
        except Exception:
            if not self.leak_on_refusal:
                mm.munmap(base, hi - lo)
            raise

    def _load(self, data: bytes, mm: Mmap, loads: list[Any], base: int, bias: int) -> int:
        page = mm.page_size
        spans = [(bias + (p[3] & -page), bias + -(-(p[3] + p[6]) // page) * page) for p in loads]
        for start, end in spans:
            mm.mmap_anonymous(start, end - start, RW, FIXED)
        for p in loads:
            if p[5] > p[6] or p[2] + p[5] > len(data):
                raise ValueError("a PT_LOAD's file bytes are past EOF or its memory size")
            size = -(-p[5] // page) * page if self.bss_not_zeroed else p[5]
            mm.write(bias + p[3], data[p[2]:p[2] + min(size, p[6])])
        if self.protect_then_relocate:
            self._protect(data, mm, loads, spans, bias)
        self._relocate(data, mm, loads, bias, base)
        if not self.protect_then_relocate:
            self._protect(data, mm, loads, spans, bias)
        return bias

    def _relocate(self, data: bytes, mm: Mmap, loads: list[Any], bias: int, base: int
                  ) -> None:
        dynamic = [p for p in program_headers(data) if p[0] == PT_DYNAMIC]
        if not dynamic:
            return
        tags, at = {}, dynamic[0][3]
        while True:
            tag, value = struct.unpack("<qQ", mm.read(bias + inside(loads, at, 16, "DT_"), 16))
            if tag == DT_NULL:
                break
            tags[tag], at = value, at + 16
        size = tags.get(DT_RELASZ, 0)
        if not size:
            return
        table = mm.read(bias + inside(loads, tags.get(DT_RELA, 0), size, "DT_RELA"), size)
        for offset, info, addend in struct.iter_unpack("<QQq", table):
            if info & 0xFFFFFFFF != R_X86_64_RELATIVE:
                raise ValueError(f"relocation type {info & 0xFFFFFFFF} not supported")
            inside(loads, offset, 8, "a relocation")
            word = (base if self.relative_from_base else bias) + addend
            mm.write(bias + offset, struct.pack("<Q", word % 2**64))

    def _protect(self, data: bytes, mm: Mmap, loads: list[Any], spans: list[Any],
                 bias: int) -> None:
        page = mm.page_size
        for p, (start, end) in zip(loads, spans, strict=True):
            mm.mprotect(start, end - start, prot_of(p[1]))
        for p in program_headers(data):
            if p[0] == PT_GNU_RELRO:
                inside(loads, p[3], p[6], "PT_GNU_RELRO")
                end = p[3] + p[6] + (page - 1 if self.relro_rounded_up else 0)
                start = bias + (p[3] & -page)
                mm.mprotect(start, bias + (end & -page) - start, ProtFlags.PROT_READ)


minimal = Minimal()
relro_rounded_up = Minimal(relro_rounded_up=True)
bss_not_zeroed = Minimal(bss_not_zeroed=True)
relative_from_base = Minimal(relative_from_base=True)
protect_then_relocate = Minimal(protect_then_relocate=True)
leak_on_refusal = Minimal(leak_on_refusal=True)

PLANTED = {
    "relro_rounded_up": "final map differs",
    "bss_not_zeroed": "bss",
    "relative_from_base": "expected",
    "protect_then_relocate": "never made writable",
    "leak_on_refusal": "still mapped",
}
"""Each planted bug and a phrase of the Violation that must catch it."""
