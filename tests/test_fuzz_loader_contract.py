"""Any loader, tested: a loader under test is ``f(data, mm) -> load bias``, judged only by
what it did to the backend (vmsim.fuzz.contract).

A minimal loader of ours (tests/planted_loaders.py) passes the properties within
``relocations=["RELATIVE"]``; five copies of it, each with one planted bug, are caught, by
``check_loader`` and by ``vmsim fuzz --loader`` (exit 1, the failing property and the saved
example printed); the project's loader behind the same contract passes; usage errors exit 2.
"""

from __future__ import annotations

from pathlib import Path

import planted_loaders
import pytest
from cli_support import run_cli
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from hypothesis import Phase, given, settings
from planted_loaders import PLANTED

from vmsim.fuzz import check_loader, image_knobs, project_loader
from vmsim.fuzz.checking import Violation
from vmsim.fuzz.images import elf_images

QUICK = settings(derandomize=True, database=None, print_blob=False)


def test_the_minimal_loader_passes_within_relative() -> None:
    check_loader(planted_loaders.minimal, relocations=["RELATIVE"], max_examples=200,
                 settings=QUICK)


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_each_planted_bug_is_caught(bug: str) -> None:
    with pytest.raises(Violation, match=PLANTED[bug]):
        check_loader(getattr(planted_loaders, bug), relocations=["RELATIVE"],
                     max_examples=300, settings=QUICK)


def test_the_project_loader_passes_behind_the_contract() -> None:
    check_loader(project_loader, max_examples=150, settings=QUICK)


def test_the_minimal_loader_passes_on_the_host_too() -> None:
    check_loader(planted_loaders.minimal, relocations=["RELATIVE"], backend="both",
                 max_examples=15, settings=QUICK)


def test_a_bug_is_caught_on_the_host_before_it_writes() -> None:
    """Writing a page after making it read-only would crash this process on the host: the
    checking wrapper stops it first, in the forked child, and the Violation comes back."""
    unshrunk = settings(QUICK, phases=[Phase.generate])  # each host example forks: no shrink
    with pytest.raises(Violation, match="never made writable"):
        check_loader(planted_loaders.protect_then_relocate, relocations=["RELATIVE"],
                     backend="both", kinds=["valid"], max_examples=30, settings=unshrunk)


def _relocation_types(data: bytes, tmp: Path) -> set[str]:
    """The relocation types of an ELF file, read by pyelftools (not by our parser)."""
    path = tmp / "image.so"
    path.write_bytes(data)
    with path.open("rb") as f:
        elf = ELFFile(f)
        types = {r["r_info_type"] for s in elf.iter_sections()
                 if isinstance(s, RelocationSection) for r in s.iter_relocations()}
        tags = {t.entry.d_tag for t in elf.get_section_by_name(".dynamic").iter_tags()}
    return {str(t) for t in types} | ({"RELR"} if "DT_RELR" in tags else set())


@settings(max_examples=60, deadline=None, database=None)
@given(elf_images(**image_knobs(["RELATIVE"]), sections=True))
def test_relative_images_hold_only_relative_relocations(tmp_path_factory: pytest.TempPathFactory,
                                                        image: object) -> None:
    data = image.data  # type: ignore[attr-defined]
    assert _relocation_types(data, tmp_path_factory.mktemp("img")) <= {"8"}  # R_X86_64_RELATIVE


def test_knobs_from_relocation_names() -> None:
    assert image_knobs(None) == {}
    assert image_knobs(["RELR"]) == {"relocation_types": ["RELATIVE"], "relr": True,
                                     "textrel": False}
    assert image_knobs(["r_x86_64_64", "TEXTREL"])["relocation_types"] == ["64"]
    with pytest.raises(ValueError, match="FOO"):
        image_knobs(["FOO"])


def _fuzz(tmp_path: Path, loader: str, *more: str, seconds: int = 6) -> tuple[int, str]:
    ran = run_cli("fuzz", "--loader", loader, "--time", str(seconds), "--out", str(tmp_path),
                  "--shrink-time", "0", *more, timeout=120)
    return ran.code, ran.out


@pytest.mark.parametrize("bug", ["relro_rounded_up", "bss_not_zeroed", "relative_from_base",
                                 "protect_then_relocate"])
def test_vmsim_fuzz_catches_each_planted_bug(tmp_path: Path, bug: str) -> None:
    code, out = _fuzz(tmp_path, f"planted_loaders:{bug}", "--relocations", "RELATIVE",
                      "--property", "valid")
    assert code == 1, out
    assert "FAILURE: Violation: " in out and PLANTED[bug] in out
    saved = Path(out.split("saved: ", 1)[1].split()[0])
    assert saved.read_bytes()[:4] == b"\x7fELF"


def test_vmsim_fuzz_catches_a_leak_on_refusal(tmp_path: Path) -> None:
    code, out = _fuzz(tmp_path, "planted_loaders:leak_on_refusal", "--relocations",
                      "RELATIVE", "--property", "malformed")
    assert code == 1 and "still mapped" in out, out


def test_vmsim_fuzz_passes_the_minimal_and_the_project_loader(tmp_path: Path) -> None:
    code, out = _fuzz(tmp_path, "planted_loaders:minimal", "--relocations", "RELATIVE",
                      seconds=4)
    assert code == 0 and "FAILURE" not in out, out
    code, out = _fuzz(tmp_path, "vmsim.fuzz:project_loader", seconds=4)
    assert code == 0 and "FAILURE" not in out, out


@pytest.mark.parametrize("argv, says", [
    (["--loader", "no_such_module_here:load"], "cannot import"),
    (["--loader", "planted_loaders:nothing"], "no callable"),
    (["--loader", "planted_loaders"], "MODULE:FUNCTION"),
    (["--relocations", "RELATIVE,FOO"], "FOO"),
    (["--relocations", "RELATIVE", "/usr/lib/x86_64-linux-gnu/libz.so.1"], "PATHs"),
])
def test_usage_errors_exit_2(argv: list[str], says: str) -> None:
    ran = run_cli("fuzz", *argv, "--time", "1")
    assert ran.code == 2 and says in ran.err, ran


def test_time_is_the_whole_campaign(tmp_path: Path) -> None:
    ran = run_cli("fuzz", "--time", "2", "--out", str(tmp_path), timeout=60)
    assert "valid on sim for 1s" in ran.err and "malformed on sim for 1s" in ran.err, ran.err


def test_vmsim_fuzz_mutates_real_files_on_both_backends(tmp_path: Path) -> None:
    """With PATHs the campaign draws those files, unchanged or corrupted field by field: the
    project's loader only loads or refuses them, on the simulator and on the host."""
    libz = "/usr/lib/x86_64-linux-gnu/libz.so.1"
    ran = run_cli("fuzz", libz, "--time", "4", "--backend", "both", "--out", str(tmp_path),
                  timeout=120)
    assert ran.code == 0 and "files outcomes: loaded" in ran.out, ran
    assert "host outcomes: loaded" in ran.out and "refused: Elf" in ran.out, ran.out


def test_vmsim_fuzz_runs_a_loader_under_test_on_real_files(tmp_path: Path) -> None:
    """The minimal loader knows RELATIVE only: on libz (with GLOB_DAT and JUMP_SLOT) it
    refuses the unchanged file, which the files property reports as a failure."""
    code, out = _fuzz(tmp_path, "planted_loaders:minimal", "/usr/lib/x86_64-linux-gnu/libz.so.1",
                      seconds=4)
    assert code == 1 and "(unchanged) was refused: ValueError: relocation type 6" in out, out
