"""The loader's parts against references nobody here wrote: pyelftools' decoding of the same
tables, readelf-equivalent symbol data, the kernel's final map versus the plan's prediction.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerSymSection
from loader_support import SYSTEM_LIBS, fixture_libs_fixture  # noqa: F401

from loader import StubResolver, TracingMmap, load
from loader.compare import host_outcome
from loader.elf import parse_image
from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.pages import HOST_PAGE_SIZE
from loader.plan import make_plan
from loader.reloc import type_name
from loader.symbols import find, split_version
from loader.tables import DT, DynamicTables, decode_relr, parse_tables

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")


def _tables(path: Path) -> DynamicTables:
    return parse_tables(parse_image(path.read_bytes(), HOST_PAGE_SIZE))


def _elftools_relocs(path: Path, section: str) -> list[tuple[int, int, int, int]]:
    with path.open("rb") as f:
        sec: Any = ELFFile(f).get_section_by_name(section)
        return [(r["r_offset"], r["r_info_type"], r["r_info_sym"], r["r_addend"])
                for r in sec.iter_relocations()]


@pytest.mark.parametrize("lib", ["libcrypto", "libz", "libsqlite3"])
def test_rela_and_jmprel_equal_pyelftools(lib: str) -> None:
    path = SYSTEM_LIBS[lib]
    tables = _tables(path)
    for table, section in zip(tables.relocs, [".rela.dyn", ".rela.plt"], strict=True):
        ours = list(zip(table.r_offset.tolist(), table.r_type.tolist(), table.r_sym.tolist(),
                        table.r_addend.tolist(), strict=True))
        assert ours == _elftools_relocs(path, section)


def test_relr_equals_pyelftools(fixture_libs: dict[str, Path]) -> None:
    for path in (LIBC, fixture_libs["relr"]):
        with path.open("rb") as f:
            sec: Any = ELFFile(f).get_section_by_name(".relr.dyn")
            ref = [r["r_offset"] for r in sec.iter_relocations()]
        assert _tables(path).relr.tolist() == ref


def test_relr_decoder_on_a_hand_made_table() -> None:
    # address 0x1000, then bitmap 0b1011 (bits 1 and 3: 0x1008, 0x1018), then a bitmap that
    # starts 63 words later (bit 1: 0x1008 + 63*8), then a new address 0x5000.
    words = np.array([0x1000, 0b1011, 0b11, 0x5000], dtype=np.uint64)
    got = decode_relr(words).tolist()
    assert got == [0x1000, 0x1008, 0x1018, 0x1008 + 63 * 8, 0x5000]


def _exported(path: Path) -> dict[str, int]:
    """Every defined global/weak dynamic symbol with its default version, from pyelftools."""
    out = {}
    with path.open("rb") as f:
        elf = ELFFile(f)
        dynsym: Any = elf.get_section_by_name(".dynsym")
        versym = next((s for s in elf.iter_sections() if isinstance(s, GNUVerSymSection)), None)
        for i, sym in enumerate(dynsym.iter_symbols()):
            ndx = versym.get_symbol(i)["ndx"] if versym is not None else 0
            hidden = isinstance(ndx, int) and bool(ndx & 0x8000)
            if sym["st_shndx"] != "SHN_UNDEF" and sym.name and not hidden and \
                    sym["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK", "STB_GNU_UNIQUE"):
                out[sym.name] = i
    return out


@pytest.mark.parametrize("point", ["sysv-hash", "relro", "both-hash", "versioned"])
def test_hash_lookup_finds_every_export(fixture_libs: dict[str, Path], point: str) -> None:
    path = fixture_libs[point]
    tables = _tables(path)
    assert (tables.sysv_hash is not None) == (point in ("sysv-hash", "both-hash"))
    for name, index in _exported(path).items():
        assert find(tables, name) == index, name
    assert find(tables, "no_such_symbol") is None


def test_gnu_and_sysv_hash_agree_on_libc() -> None:
    tables = _tables(LIBC)
    exported = _exported(LIBC)
    assert tables.gnu_hash is not None and tables.sysv_hash is not None
    sysv_only = DynamicTables(**{**{f: getattr(tables, f) for f in tables.__dataclass_fields__},
                                 "gnu_hash": None})
    for name in list(exported)[::7]:
        assert find(tables, name) == find(sysv_only, name) == exported[name], name


def test_versions_distinguish_memcpy() -> None:
    tables = _tables(LIBC)
    new, old = find(tables, "memcpy@GLIBC_2.14"), find(tables, "memcpy@GLIBC_2.2.5")
    assert new is not None and old is not None and new != old
    assert find(tables, "memcpy") == new           # the default version
    assert find(tables, "memcpy@GLIBC_9.99") is None
    assert split_version("memcpy@@GLIBC_2.14") == ("memcpy", "GLIBC_2.14")


def test_fixture_version_script(fixture_libs: dict[str, Path]) -> None:
    tables = _tables(fixture_libs["versioned"])
    assert find(tables, "add@VERS_1.0") is not None
    assert find(tables, "add@VERS_2.0") is None
    assert find(tables, "deref@VERS_2.0") is not None
    assert find(tables, "on_load") is None          # local: *


@pytest.mark.parametrize("lib", sorted(SYSTEM_LIBS))
def test_plan_predicts_the_final_map(lib: str) -> None:
    path = SYSTEM_LIBS[lib]
    image = parse_image(path.read_bytes(), HOST_PAGE_SIZE)
    plan = make_plan(image, DT.TEXTREL in parse_tables(image).tags)
    predicted = [p.rwx + "p" for p in plan.page_prots()]
    _, _, outcome = host_outcome(path)
    assert outcome.page_perms(HOST_PAGE_SIZE) == predicted
    assert "LoadPlan" in str(plan) and "RELRO" in str(plan)


def _hooked(path: Path) -> dict[str, Any]:
    """In a child: load with a pre_find hook binding strlen, read the strlen GOT slot."""
    asked: list[tuple[str, str | None]] = []

    def hook(name: str, version: str | None) -> int | None:
        asked.append((name, version))
        return 0x1234 if name == "strlen" else None

    obj = load(path, LibcMmap(), resolver=StubResolver(pre_find=[hook]))
    slots = {}
    for table in obj.tables.relocs:
        for off, sym in zip(table.r_offset.tolist(), table.r_sym.tolist(), strict=True):
            if sym:
                name = obj.tables.name(int(obj.tables.symtab[sym]["st_name"]))
                raw = obj.mm.read(off + obj.load_bias, 8)
                slots[name] = struct.unpack("<Q", raw)[0]
    return {"asked": asked, "slots": slots, "extern": obj.relocations.extern,
            "weak": slots.get("weak_missing")}


def test_resolver_hooks_and_weak_undefined(fixture_libs: dict[str, Path]) -> None:
    status, got = run_isolated(_hooked, fixture_libs["now"])
    assert status == "ok"
    assert ("strlen", "GLIBC_2.2.5") in got["asked"]
    assert got["slots"]["strlen"] == 0x1234
    assert got["weak"] == 0                         # weak undefined binds to 0
    assert "strlen@GLIBC_2.2.5" not in got["extern"]
    assert got["slots"]["malloc"] == got["extern"]["malloc@GLIBC_2.2.5"]


def test_trace_records_calls_and_errno() -> None:
    def attempt() -> list[dict[str, Any]]:
        mm = TracingMmap(LibcMmap())
        try:
            mm.munmap(1, 4096)                      # unaligned: EINVAL
        except OSError:
            pass
        obj = load(SYSTEM_LIBS["libz"], mm)
        obj.unload()
        return [c.as_dict() for c in mm.calls]

    status, calls = run_isolated(attempt)
    assert status == "ok"
    assert calls[0] == {"op": "munmap", "addr": 1, "length": 4096, "errno": 22}
    assert calls[1]["op"] == "mmap_reserve" and calls[-1]["op"] == "munmap"


def test_type_names() -> None:
    assert type_name(8) == "R_X86_64_RELATIVE"
    assert type_name(37) == "R_X86_64_IRELATIVE"
    assert type_name(99) == "type 99"


@pytest.mark.parametrize("rel_format", ["rela", "rel"])
@pytest.mark.parametrize("relr", [False, True])
def test_rel_rela_relr_give_the_writers_words(rel_format: str, relr: bool) -> None:
    """Implicit addends (REL, RELR: read from the file) and explicit ones (RELA) produce the
    words vmsim.fuzz.elfwriter (written independently) says a correct loader must produce."""
    from loader_support import sim_factory

    from vmsim.fuzz.elfwriter import ElfSpec, Reloc, Segment, Symbol, build

    factory = sim_factory()
    spec = ElfSpec(
        segments=(Segment("rw", data=bytes(64), bss=32, relro=16), Segment("rx", data=bytes(32))),
        symbols=(Symbol("answer", segment=0, offset=40), Symbol("fn", segment=1, offset=8,
                                                               type="func")),
        relocs=(Reloc("RELATIVE", segment=0, offset=0, target=(1, 8)),
                Reloc("RELATIVE", segment=0, offset=8, target=(0, 40), addend=3),
                Reloc("64", segment=0, offset=16, symbol="answer", addend=5),
                Reloc("GLOB_DAT", segment=0, offset=24, symbol="fn"),
                Reloc("JUMP_SLOT", segment=0, offset=32, symbol="answer")),
        rel_format=rel_format,  # type: ignore[arg-type]
        relr=relr)
    image = build(spec)
    mm = factory()
    obj = load(image.data, mm)
    for vaddr, delta in image.expected_words().items():
        got = struct.unpack("<Q", mm.read(vaddr + obj.load_bias, 8))[0]
        assert got == (obj.load_bias + delta) & (2**64 - 1), hex(vaddr)
    if relr:
        assert len(obj.tables.relr) == 2
