"""What ``vmsim explain`` (loader.explain) teaches, checked against the files themselves as
pyelftools reads them: the kind of object (shared object, PIE, ET_EXEC) and its entry point,
PT_INTERP, the load bias and ASLR defined before use, p_offset ≡ p_vaddr and a file page two
PT_LOADs share, who the symbol slots name (own definitions, imports), symbol versions, and a
meaning for every relocation type this machine's files use."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from loader_support import SYSTEM_LIBS, fixture_libs_fixture, machine_elf_libraries  # noqa: F401

import loader
import vmsim
from loader.elf import parse_image
from loader.explain import RELOCATION_MEANINGS, Explainer, bindings
from loader.isolate import run_isolated
from loader.pages import HOST_PAGE_SIZE as PAGE
from loader.reloc import X86_64
from loader.tables import parse_tables
from vmsim.cli import main

LIBZ = str(SYSTEM_LIBS["libz"])
LS = "/usr/bin/ls"


def explained(path: str | Path, backend: object | None = None) -> list[str]:
    """The sentences of one load of ``path`` on the simulator."""
    steps = Explainer()
    loader.load(str(path), backend or vmsim.AddressSpace(), explain=steps)
    return [s.sentence for s in steps.steps]


def headers(path: str | Path) -> tuple[dict[str, int], list[dict[str, int]], str | None]:
    """The ELF header, the PT_LOAD headers and the PT_INTERP path, per pyelftools."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = [dict(s.header) for s in elf.iter_segments() if s.header.p_type == "PT_LOAD"]
        interp = next((s.get_interp_name() for s in elf.iter_segments()
                       if s.header.p_type == "PT_INTERP"), None)
        return dict(elf.header), loads, interp


def test_ls_names_its_interpreter_and_entry_and_says_it_is_not_run() -> None:
    header, _, interp = headers(LS)
    said = explained(LS)
    assert interp is not None
    line = next(s for s in said if s.startswith("PT_INTERP"))
    assert interp in line and "neither runs the interpreter nor jumps to e_entry" in line
    assert "like dlopen" in line
    assert any(f"e_entry = {header['e_entry']:#x}" in s for s in said)
    assert "PT_INTERP" in said[0]
    assert any(s.startswith("ET_DYN with PT_INTERP: a position-independent executable (PIE)")
               for s in said)


def test_pie_and_et_exec_differ_in_their_load_bias(fixture_libs: dict[str, Path]) -> None:
    pie, exe = explained(fixture_libs["pie"]), explained(fixture_libs["exec"])
    assert any("PIE" in s and "load bias is that base minus its lowest p_vaddr" in s
               for s in pie)
    exec_kind = next(s for s in exe if s.startswith("ET_EXEC"))
    assert "load bias is 0" in exec_kind
    header, _, _ = headers(fixture_libs["exec"])
    assert f"e_entry = {header['e_entry']:#x}" in exec_kind
    lib = explained(LIBZ)
    assert any(s.startswith("ET_DYN without PT_INTERP: a shared object") for s in lib)


@pytest.mark.parametrize("path", [LIBZ, LS])
def test_load_bias_and_aslr_are_defined_before_they_are_used(path: str) -> None:
    said = explained(path)
    uses = [i for i, s in enumerate(said) if "load bias" in s or "bias" in s.split()]
    definition = next(i for i, s in enumerate(said) if s.startswith("load bias: "))
    assert uses[0] == definition or (uses[0] < definition and "load bias is" in said[uses[0]]
                                     and "lowest p_vaddr" in said[uses[0]])
    assert "ASLR (address space layout randomisation)" in said[definition]
    assert all("ASLR" not in s for s in said[:definition])


def test_the_command_defines_the_load_bias_before_it_uses_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", LIBZ, "--color", "never"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    first = next(i for i, ln in enumerate(lines) if "load bias" in ln)
    assert lines[first].startswith("[plan] load bias: ")


@pytest.mark.parametrize("path", [LIBZ, LS])
def test_each_map_step_shows_offset_and_vaddr_congruent(path: str) -> None:
    _, loads, _ = headers(path)
    said = explained(path)
    for i, h in enumerate(loads):
        line = next(s for s in said if re.search(rf": PT_LOAD {i} \(", s) and
                    s.startswith("map ") and "anonymous" not in s)
        assert (f"p_offset {h['p_offset']:#x} ≡ p_vaddr {h['p_vaddr']:#x} (mod the page size "
                f"{PAGE:#x}: both {h['p_vaddr'] % PAGE:#x} into a page") in line
        assert h["p_offset"] % PAGE == h["p_vaddr"] % PAGE


def shared_file_pages(loads: list[dict[str, int]]) -> dict[int, int]:
    """PT_LOAD index -> the file page it shares with the PT_LOAD before it."""
    out = {}
    for i in range(1, len(loads)):
        prev, this = loads[i - 1], loads[i]
        last = (prev["p_offset"] + prev["p_filesz"] - 1) // PAGE * PAGE
        first = this["p_offset"] // PAGE * PAGE
        if this["p_filesz"] and prev["p_filesz"] and last == first:
            out[i] = first
    return out


@pytest.mark.parametrize("path", [LIBZ, LS, "/usr/lib/x86_64-linux-gnu/libc.so.6"])
def test_a_file_page_two_segments_share_is_said_to_be_mapped_twice(path: str) -> None:
    _, loads, _ = headers(path)
    said = [s for s in explained(path) if s.startswith("map ") and "anonymous" not in s]
    shared = shared_file_pages(loads)
    for i, line in enumerate(said):
        if i in shared:
            assert (f"file page {shared[i]:#x} is also the last page PT_LOAD {i - 1} maps"
                    in line and "mapped twice" in line), line
        else:
            assert "mapped twice" not in line, line
    if Path(path).resolve() == Path(LIBZ).resolve():
        assert shared, "libz's data segment starts in its rodata's last file page"


def slot_counts(path: str) -> tuple[int, int]:
    """(slots naming an own definition, slots naming an undefined symbol) per pyelftools:
    GLOB_DAT, JUMP_SLOT and 64 relocations with a symbol."""
    own = imported = 0
    with open(path, "rb") as f:
        elf = ELFFile(f)
        dynsym = elf.get_section_by_name(".dynsym")
        for sec in elf.iter_sections():
            if sec.header.sh_type != "SHT_RELA":
                continue
            for rel in sec.iter_relocations():
                if rel["r_info_type"] in (1, 6, 7) and rel["r_info_sym"]:
                    sym = dynsym.get_symbol(rel["r_info_sym"])
                    if sym["st_shndx"] == "SHN_UNDEF":
                        imported += 1
                    else:
                        own += 1
    return own, imported


def test_libz_binding_counts_its_own_functions_and_its_imports() -> None:
    own, imported = slot_counts(LIBZ)
    assert own and imported
    said = explained(LIBZ)
    bind = next(s for s in said if s.startswith("bind "))
    assert f"bind {own + imported:,} " in bind
    assert f"{own:,} name libz.so" in bind and "own definitions" in bind and "PLT" in bind
    assert f"{imported:,} name imports" in bind
    stubs = int(re.search(r"gave (\d+) a stub each", bind)[1])  # type: ignore[index]
    space = vmsim.AddressSpace()
    obj = loader.load(LIBZ, space)
    assert stubs == len(obj.relocations.extern)


def test_symbol_versions_are_explained_with_a_real_example() -> None:
    with open(LIBZ, "rb") as f:
        needed = {v.name for _, vers in ELFFile(f).get_section_by_name(".gnu.version_r")
                  .iter_versions() for v in vers}
    said = explained(LIBZ)
    line = next(s for s in said if s.startswith("symbol versions: "))
    example = re.search(r"e\.g\. (\S+)@(\S+)\. The index", line)
    assert example is not None and example[2] in needed
    assert "DT_VERSYM" in line and "DT_VERNEED" in line and "matches name and version" in line
    image = parse_image(Path(LIBZ).read_bytes(), PAGE)
    who = bindings(parse_tables(image))
    assert f"{who.versioned:,} of the imports carry one" in line


def test_every_relocation_type_the_loader_knows_has_a_meaning() -> None:
    assert {rule.name for rule in X86_64.values()} <= set(RELOCATION_MEANINGS)
    assert all(len(m) > 15 for m in RELOCATION_MEANINGS.values())


def machine_relocation_types() -> dict[int, str]:
    """Every relocation type number in the ELF files of this machine's library directory and
    /usr/bin, each with one file that uses it (read by the loader's own table parser)."""
    paths = machine_elf_libraries() + [p for p in sorted(glob.glob("/usr/bin/*"))
                                       if os.path.isfile(p) and not os.path.islink(p)]
    found: dict[int, str] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    continue
                f.seek(0)
                tables = parse_tables(parse_image(f.read(), PAGE))
        except (loader.ElfError, OSError):
            continue
        for table in tables.relocs:
            for t in np.unique(table.r_type).tolist():
                found.setdefault(int(t), path)
    return found


def test_every_relocation_type_on_this_machine_has_a_meaning_explain_prints() -> None:
    found = machine_relocation_types()
    assert {6, 7, 8} <= set(found)
    for number, path in found.items():
        assert number in X86_64, f"{path} uses type {number}, which the loader refuses"
        assert X86_64[number].name in RELOCATION_MEANINGS
    # And explain prints that meaning for the types a file applies (COPY in ls, TLS in some
    # library of this machine if there is one).
    for number in {5, 16}.intersection(found):
        short = X86_64[number].name.removeprefix("R_X86_64_")
        said = explained(found[number])
        line = next(s for s in said if s.startswith(f"  {short} ("))
        assert RELOCATION_MEANINGS[X86_64[number].name] in line


GLOSSARY = Path(__file__).resolve().parent.parent / "docs" / "glossary.md"


def test_the_glossary_defines_the_jargon_of_the_output() -> None:
    text = GLOSSARY.read_text()
    terms = ["p_offset ≡ p_vaddr (mod p_align)", "A file page mapped twice", "PT_INTERP",
             "Entry point", "PIE", "Load bias", "ASLR", "Symbol version", "`COPY` relocation",
             "IFUNC", "`need_copy`", "use_file", "-w-p", "`StubResolver`, extern stubs",
             "`HostResolver`", "Outcome", "`host N`", ".bss", "RELRO"]
    headings = text.split("**")[1::2]       # what the glossary sets in bold: its terms
    for term in terms:
        assert any(term in h for h in headings), term


def test_the_glossarys_numbers_for_libz_are_this_machines() -> None:
    text = " ".join(GLOSSARY.read_text().split())
    own, imported = slot_counts(LIBZ)
    assert (f"libz binds {own + imported} slots of which {own} name libz's own definitions "
            f"({imported} name imports)") in text
    sim = loader.load(LIBZ, vmsim.AddressSpace()).mm.calls
    host = run_isolated(_host_calls, timeout=60).value
    assert (f"shows {len(sim)} calls for libz on the simulator and {host} on "
            "the host") in text


def _host_calls() -> int:
    """How many Mmap calls a load of libz makes on the host (run in a forked child)."""
    from loader.libc import LibcMmap

    return len(loader.load(LIBZ, LibcMmap()).mm.calls)
