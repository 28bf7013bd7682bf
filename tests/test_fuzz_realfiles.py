"""Real files mutated field-aware (vmsim.fuzz.realfiles): the strategy, the property, and the
path checks, on this machine's libraries and gcc-built fixtures.

The unchanged file must pass the property's oracle (pyelftools' reading of the file, not the
loader's); a loader that gets one word, a .bss byte or RELRO wrong must not; every kind of
corruption must be drawn and say which field became what; a file whose headers lie must not
make the strategy allocate or loop without bound.
"""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, find, given, settings
from hypothesis.errors import InvalidArgument
from loader_support import SYSTEM_LIBS, fixture_libs_fixture  # noqa: F401  (a pytest fixture)

from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.mmap import Mmap, ProtFlags
from vmsim import AddressSpace
from vmsim.fuzz.checking import Violation
from vmsim.fuzz.contract import project_loader
from vmsim.fuzz.realfiles import (
    FILE_MUTATION_KINDS,
    MAX_FILE_SIZE,
    MutatedFile,
    _expected_for,  # the oracle, checked against pyelftools
    check_file_load,
    mutated_files,
    read_elf_paths,
)

LIBZ = str(SYSTEM_LIBS["libz"])
LIBCRYPTO = str(SYSTEM_LIBS["libcrypto"])
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"  # packs its RELATIVE relocations as DT_RELR
FIXTURES = ["relro", "norelro", "now", "relr", "max-page-64k", "sysv-hash", "versioned",
            "separate-code", "textrel", "initfini", "pie", "exec"]
SEARCH = settings(max_examples=3000, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))


def _unchanged(path: str) -> MutatedFile:
    return find(mutated_files(path, kinds=["none"]), lambda v: True)


def _elf(path: str) -> tuple[ELFFile, DynamicSegment]:
    elf = ELFFile(io.BytesIO(Path(path).read_bytes()))
    dyn = next(s for s in elf.iter_segments() if isinstance(s, DynamicSegment))
    return elf, dyn


# ---- the unchanged file passes -------------------------------------------------------------


@pytest.mark.parametrize("path", [LIBZ, LIBCRYPTO, LIBC])
def test_a_machine_library_unchanged_passes_on_the_simulator(path: str) -> None:
    assert check_file_load(_unchanged(path), AddressSpace()) == "loaded"


@pytest.mark.parametrize("name", FIXTURES)
def test_a_gcc_fixture_unchanged_passes_on_the_simulator(
        name: str, fixture_libs: dict[str, Path]) -> None:
    assert check_file_load(_unchanged(str(fixture_libs[name])), AddressSpace()) == "loaded"


def _host_check(path: str) -> str:
    return check_file_load(_unchanged(path), LibcMmap())


def test_libz_unchanged_passes_on_the_host() -> None:
    assert run_isolated(_host_check, LIBZ, timeout=60.0).value == "loaded"


# ---- a wrong loader is caught --------------------------------------------------------------


def _first_relative(path: str) -> int:
    """The r_offset of the first R_X86_64_RELATIVE relocation of ``path`` (pyelftools)."""
    _elf_file, dyn = _elf(path)
    table = dyn.get_relocation_tables()["RELA"]
    return next(r["r_offset"] for r in table.iter_relocations() if r["r_info_type"] == 8)


def _poke(mm: Mmap, addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` as a loader would after its load: make the page writable,
    write, give the page its protection back."""
    page = addr - addr % mm.page_size
    prot = next(r.prot for r in mm.maps() if r.start <= page < r.end)
    mm.mprotect(page, mm.page_size, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE)
    mm.write(addr, data)
    mm.mprotect(page, mm.page_size, prot)


def test_a_loader_that_skips_one_relative_word_is_caught() -> None:
    target = _first_relative(LIBZ)

    def skips_one(data: bytes, mm: Mmap) -> int:
        bias = project_loader(data, mm)
        _poke(mm, bias + target, struct.pack("<Q", target))
        return bias

    with pytest.raises(Violation, match=f"R_X86_64_RELATIVE word at vaddr {target:#x}"):
        check_file_load(_unchanged(LIBZ), AddressSpace(), loader=skips_one)


def _relr_targets_by_pyelftools(path: str) -> list[int]:
    _elf_file, dyn = _elf(path)
    return [r["r_offset"] for r in dyn.get_relocation_tables()["RELR"].iter_relocations()]


@pytest.mark.parametrize("path", [LIBC, "relr"])
def test_the_oracle_decodes_relr_as_pyelftools_does(path: str,
                                                    fixture_libs: dict[str, Path]) -> None:
    path = str(fixture_libs[path]) if path in fixture_libs else path
    want = _expected_for(path, Path(path).read_bytes())
    relr = next(w for w in want.words if w.what == "DT_RELR")
    assert sorted(relr.at.tolist()) == sorted(_relr_targets_by_pyelftools(path))


def test_a_loader_that_gets_one_relr_word_wrong_is_caught(
        fixture_libs: dict[str, Path]) -> None:
    path = str(fixture_libs["relr"])
    target = _relr_targets_by_pyelftools(path)[-1]

    def off_by_eight(data: bytes, mm: Mmap) -> int:
        bias = project_loader(data, mm)
        word = struct.unpack("<Q", mm.read(bias + target, 8))[0]
        _poke(mm, bias + target, struct.pack("<Q", word + 8))
        return bias

    with pytest.raises(Violation, match=f"DT_RELR word at vaddr {target:#x}"):
        check_file_load(_unchanged(path), AddressSpace(), loader=off_by_eight)


def test_a_loader_that_leaves_bss_dirty_is_caught(fixture_libs: dict[str, Path]) -> None:
    path = str(fixture_libs["relro"])
    elf, _dyn = _elf(path)
    data_seg = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"][-1]
    bss = data_seg["p_vaddr"] + data_seg["p_filesz"] + 64

    def dirty(data: bytes, mm: Mmap) -> int:
        bias = project_loader(data, mm)
        mm.write(bias + bss, b"\x5a")
        return bias

    with pytest.raises(Violation, match=f"vaddr {bss:#x}.*bss"):
        check_file_load(_unchanged(path), AddressSpace(), loader=dirty)


def test_a_loader_that_leaves_relro_writable_is_caught() -> None:
    elf, _dyn = _elf(LIBZ)
    relro = next(s for s in elf.iter_segments() if s["p_type"] == "PT_GNU_RELRO")

    def writable_relro(data: bytes, mm: Mmap) -> int:
        bias = project_loader(data, mm)
        mm.mprotect(bias + relro["p_vaddr"] - relro["p_vaddr"] % mm.page_size, mm.page_size,
                    ProtFlags.PROT_READ | ProtFlags.PROT_WRITE)
        return bias

    with pytest.raises(Violation, match=r"differs from the program headers .*: rw-p != r--p"):
        check_file_load(_unchanged(LIBZ), AddressSpace(), loader=writable_relro)


# ---- every kind is drawn and names its field ------------------------------------------------


KIND_LINES = {
    "header": r"^(e_|ehdr\.e_)",
    "phdr": r"^phdr\[\d+\]",
    "dynamic": r"^(dynamic\[\d+\]|DT_)",
    "reloc": r"^(rela|jmprel)\[\d+\]",
    "relr": r"^relr\[\d+",
    "symbol": r"^dynsym\[\d+\]\.st_",
    "hash": r"^(hash|gnu_hash)",
    "version": r"^(versym|verdef|verneed)",
    "init": r"^(init_array|fini_array|DT_INIT_ARRAY|DT_FINI_ARRAY)",
    "truncate": r"^truncated to",
    "flip": r"^flipped",
}


@pytest.mark.parametrize("kind", FILE_MUTATION_KINDS[1:])
def test_each_kind_is_drawn_and_names_its_field(kind: str,
                                                fixture_libs: dict[str, Path]) -> None:
    path = str(fixture_libs["relr"]) if kind == "relr" else LIBZ
    original = Path(path).read_bytes()
    got = find(mutated_files(path, kinds=[kind]), lambda v: v.kind == kind, settings=SEARCH)
    assert re.match(KIND_LINES[kind], got.mutation), got.mutation
    assert got.data != original


FIELD_LINES = [
    (LIBZ, "phdr", r"phdr\[\d+\]\.p_filesz 0x[0-9a-f]+ -> 0x[0-9a-f]+$"),
    (LIBZ, "header", r"ehdr\.e_phnum 0x[0-9a-f]+ -> "),
    (LIBZ, "dynamic", r"dynamic\[\d+\]\.d_tag "),
    (LIBZ, "dynamic", r"dynamic\[\d+\]\.d_val "),
    (LIBZ, "reloc", r"rela\[\d+\]\.r_offset "),
    (LIBZ, "reloc", r"jmprel\[\d+\]\.r_info\.sym "),
    (LIBZ, "reloc", r"rela\[\d+\]\.r_info\.type "),
    (LIBZ, "reloc", r"rela\[\d+\]\.r_addend "),
    (LIBZ, "symbol", r"dynsym\[\d+\]\.st_value "),
    (LIBZ, "symbol", r"dynsym\[\d+\]\.st_size "),
    (LIBZ, "symbol", r"dynsym\[\d+\]\.st_info "),
    (LIBZ, "symbol", r"dynsym\[\d+\]\.st_shndx "),
    (LIBZ, "symbol", r"dynsym\[\d+\]\.st_name "),
    (LIBZ, "hash", r"gnu_hash\.nbuckets "),
    (LIBZ, "hash", r"gnu_hash\.bloom\[\d+\] "),
    (LIBZ, "hash", r"gnu_hash\.bucket\[\d+\] "),
    (LIBZ, "hash", r"gnu_hash\.chain\[\d+\] "),
    ("sysv-hash", "hash", r"hash\.nbucket "),
    ("sysv-hash", "hash", r"hash\.chain\[\d+\] "),
    (LIBZ, "version", r"versym\[\d+\] "),
    (LIBZ, "version", r"(verneed|verdef)\[\d+\]\.v[nd]_cnt"),
    (LIBZ, "version", r"(verneed|verdef)\[\d+\]\.v[nd]_next"),
    (LIBZ, "init", r"init_array\[0\] "),
    (LIBZ, "init", r"DT_(INIT|FINI)_ARRAYSZ = "),
    ("relr", "relr", r"relr\[\d+\] 0x[0-9a-f]+ -> "),
]


@pytest.mark.parametrize(("path", "kind", "line"), FIELD_LINES)
def test_the_fields_the_issue_names_are_each_corrupted(
        path: str, kind: str, line: str, fixture_libs: dict[str, Path]) -> None:
    path = str(fixture_libs[path]) if path in fixture_libs else path
    got = find(mutated_files(path, kinds=[kind]), lambda v: bool(re.match(line, v.mutation)),
               settings=SEARCH)
    for old, new in re.findall(r"(0x[0-9a-f]+) -> (0x[0-9a-f]+)", got.mutation):
        assert old != new
    assert got.data != Path(path).read_bytes()


def test_a_field_mutation_changes_only_that_field() -> None:
    original = Path(LIBZ).read_bytes()
    got = find(mutated_files(LIBZ, kinds=["symbol"]),
               lambda v: " -> " in v.mutation and "st_size" in v.mutation, settings=SEARCH)
    differ = [i for i, (a, b) in enumerate(zip(original, got.data, strict=True)) if a != b]
    assert differ and max(differ) - min(differ) < 8, (got.mutation, differ)


def test_unchanged_is_drawn_and_is_where_shrinking_goes() -> None:
    assert find(mutated_files(LIBZ), lambda v: True).kind == "none"
    got = find(mutated_files(LIBZ, kinds=["none", "phdr"]), lambda v: v.kind == "none")
    assert got.data == Path(LIBZ).read_bytes() and got.mutation == "unchanged"
    assert "phdr" not in {v.kind for v in [find(mutated_files(LIBZ, kinds=["phdr"]),
                                                lambda v: v.kind == "phdr")]} - {"phdr"}


def test_repr_is_short() -> None:
    got = find(mutated_files(LIBCRYPTO, kinds=["flip"]), lambda v: True)
    assert len(repr(got)) < 200 and "libcrypto" in repr(got)


# ---- the paths and the knobs ---------------------------------------------------------------


def _elf_header(klass: int, machine: int) -> bytes:
    return (b"\x7fELF" + bytes([klass, 1, 1]) + bytes(9)
            + struct.pack("<HHI", 3, machine, 1) + bytes(40))


BAD_PATHS = {
    "missing": ("missing.so", None, "no such file"),
    "directory": ("adir", None, "a directory"),
    "not ELF": ("text.so", b"hello, world\n" * 10, "not an ELF file"),
    "ELF32": ("elf32.so", _elf_header(1, 62), "not an ELF64 little-endian x86-64"),
    "aarch64": ("arm.so", _elf_header(2, 183), "not an ELF64 little-endian x86-64"),
    "short": ("short.so", b"\x7fELF\x02\x01", "shorter than an ELF header"),
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_read_elf_paths_refuses_each_bad_path_in_one_line(case: str, tmp_path: Path) -> None:
    name, content, message = BAD_PATHS[case]
    path = tmp_path / name
    if case == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        read_elf_paths([LIBZ, path])
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_read_elf_paths_refuses_a_file_over_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "huge.so"
    with open(path, "wb") as f:  # sparse: no disk used
        f.write(Path(LIBZ).read_bytes()[:64])
        f.truncate(MAX_FILE_SIZE + 1)
    with pytest.raises(ValueError, match="MiB"):
        read_elf_paths([path])


def test_read_elf_paths_reads_each_file_once() -> None:
    first = read_elf_paths([LIBZ])[LIBZ]
    assert read_elf_paths([LIBZ, Path(LIBZ)])[LIBZ] is first


def test_the_strategy_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no such file"):
        mutated_files(str(tmp_path / "missing.so"))
    with pytest.raises(InvalidArgument, match="non-empty"):
        mutated_files([])
    with pytest.raises(InvalidArgument, match="kinds"):
        mutated_files(LIBZ, kinds=["pixie"])


# ---- hostile headers: bounded --------------------------------------------------------------


def _patch(data: bytearray, offset: int, fmt: str, *values: int) -> None:
    struct.pack_into(fmt, data, offset, *values)


def _hostile_tables(path: str) -> bytes:
    """libz with every table's count or size absurd: DT_RELASZ/DT_PLTRELSZ/DT_STRSZ near
    2**63, the GNU hash table's bucket and bloom counts near 2**32, version chains with 65535
    aux entries each, PT_DYNAMIC's p_filesz 2**63."""
    data = bytearray(Path(path).read_bytes())
    elf, dyn = _elf(path)
    for i, tag in enumerate(dyn.iter_tags()):
        if tag.entry.d_tag in ("DT_RELASZ", "DT_PLTRELSZ", "DT_STRSZ", "DT_VERNEEDNUM"):
            _patch(data, dyn["p_offset"] + 16 * i + 8, "<Q", 2**63 - 8)
    _patch(data, dyn.get_table_offset("DT_GNU_HASH")[1], "<II", 2**32 - 1, 0)
    _patch(data, dyn.get_table_offset("DT_GNU_HASH")[1] + 8, "<I", 2**31 - 1)
    _patch(data, dyn.get_table_offset("DT_VERNEED")[1] + 2, "<H", 0xFFFF)
    _patch(data, dyn.get_table_offset("DT_VERDEF")[1] + 6, "<H", 0xFFFF)
    index = next(i for i, s in enumerate(elf.iter_segments()) if s["p_type"] == "PT_DYNAMIC")
    _patch(data, elf["e_phoff"] + 56 * index + 32, "<Q", 2**63)
    return bytes(data)


def _hostile_phdrs(path: str) -> bytes:
    """libz claiming 65535 program headers, its table running past EOF."""
    data = bytearray(Path(path).read_bytes())
    _patch(data, 56, "<H", 0xFFFF)
    return bytes(data)


def _draw_many(path: str) -> set[str]:
    """In a child: 200 draws of every kind from ``path``; the kinds drawn."""
    seen: set[str] = set()

    @settings(max_examples=200, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated_files(path))
    def draw(value: MutatedFile) -> None:
        seen.add(value.kind)

    draw()
    return seen


@pytest.mark.parametrize(("make", "lied_about"), [
    (_hostile_tables, {"reloc", "symbol", "hash"}),
    (_hostile_phdrs, {"phdr", "dynamic", "reloc", "symbol", "hash", "version", "init"})])
def test_lying_headers_do_not_make_the_strategy_blow_up(make: object, lied_about: set[str],
                                                         tmp_path: Path) -> None:
    """The draws finish within the bounds, and the tables whose headers lie are left out
    (their kinds are not drawn) rather than read as they claim."""
    assert callable(make)
    path = tmp_path / "hostile.so"
    path.write_bytes(make(LIBZ))
    done = run_isolated(_draw_many, str(path), timeout=60.0, max_rss=512 << 20)
    assert done.status == "ok" and {"none", "header", "truncate"} <= done.value
    assert not done.value & lied_about, done.value


# ---- the property over mutated libz ---------------------------------------------------------


@settings(max_examples=50, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(value=mutated_files(LIBZ))
def test_mutated_libz_loads_or_is_refused_on_the_simulator(value: MutatedFile) -> None:
    outcome = check_file_load(value, AddressSpace())
    assert outcome == "loaded" or outcome.startswith(("Elf", "MmapError")), outcome
    assert value.kind != "none" or outcome == "loaded"


def test_a_path_given_as_pathlike_is_named_as_given() -> None:
    got = find(mutated_files(Path(LIBZ), kinds=["none"]), lambda v: True)
    assert got.path == os.fspath(LIBZ)
