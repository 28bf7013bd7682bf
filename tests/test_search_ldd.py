"""``vmsim ldd`` equals this machine's ``ldd`` (addresses masked), line for line and in order:
on a sample of the machine's programs and libraries and on gcc-built fixture trees that
exercise each step of the search (tests/search_support.py). And ``loader.search.closure``
says how each object was found, loads each once, and names the chain of a missing one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import ROOT
from search_support import masked, real_ldd, tree_fixture  # noqa: F401 (a fixture)

import vmsim.fuzz.elfwriter as ew
from loader import ElfDependencyError, ElfError, ElfHeaderError
from loader.search import DEFAULT_DIRS, GLIBC_HWCAPS, Found, SearchPath, closure, read_object
from vmsim.cli import EXIT, main

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
NAMED = ["/usr/bin/ls", "/usr/bin/python3.11", str(LIBDIR / "libssl.so.3"),
         str(LIBDIR / "libxml2.so.2"), str(LIBDIR / "libstdc++.so.6"),
         str(LIBDIR / "libpython3.11.so.1.0"), str(LIBDIR / "libc.so.6")]
SAMPLE_EACH = 30
"""How many more files are drawn (evenly, from the sorted list) from LIBDIR and /usr/bin."""


def _elf_files() -> list[str]:
    """The ELF regular files (not symlinks) of LIBDIR (*.so*) and /usr/bin, sorted."""
    found = []
    for path in [*sorted(LIBDIR.glob("*.so*")), *sorted(Path("/usr/bin").iterdir())]:
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(str(path))
    return found


def _sample() -> list[str]:
    """NAMED (those present) and SAMPLE_EACH files drawn evenly from the machine's list."""
    files = _elf_files()
    step = max(1, len(files) // SAMPLE_EACH)
    return [p for p in NAMED if os.path.exists(p)] + files[::step][:SAMPLE_EACH]


def _vmsim_ldd(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """``vmsim ldd ARGV`` run in this process: its stdout lines (exit status 0 checked)."""
    assert main(["ldd", *argv]) == EXIT["ok"]
    return masked(capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("path", _sample(), ids=lambda p: Path(p).name)
def test_machine_files_equal_ldd(path: str, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    real = real_ldd(path)
    assert len(real) >= 1
    assert _vmsim_ldd(capsys, path) == real


FIXTURE_CASES = [
    ("prog_rpath", None), ("prog_runpath", None), ("prog_plain", None),
    ("prog_plain", "{d}/lib"), ("prog_both", None), ("cyca", None), ("cycb", None),
    ("miss", None), ("prog_nodeflib", None), ("prog_plain", "{d}/wrong64:{d}/wrong32:{d}/lib"),
    ("prog_rpath", "{d}/other"), ("prog_runpath", "{d}/other"), ("prog_runpath", "{d}/lib2"),
    ("prog_plain", ":{d}/lib"), ("mid", None), ("mid", "{d}/first"), ("prog_slash", None),
    ("prog_abs", None), ("prog_plain", "$ORIGIN/../lib"), ("prog_plain", "${{ORIGIN}}/../other/"),
    ("prog_plain", "{d}/lib//"), ("prog_plain", "{d}/hw"), ("prog_plain", "{d}/legacy"),
    ("prog_dst", None),
]
"""(fixture, LD_LIBRARY_PATH) pairs: each step of the search, alone and against another."""


@pytest.mark.parametrize(("name", "library_path"), FIXTURE_CASES,
                         ids=lambda v: "" if v is None else str(v).replace("{d}/", ""))
def test_fixtures_equal_ldd(tree: dict[str, Path], name: str, library_path: str | None,
                            capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    d = tree["leaf"].parent.parent
    lp = None if library_path is None else library_path.format(d=d)
    monkeypatch.chdir(d)
    if lp is None:
        monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    else:
        monkeypatch.setenv("LD_LIBRARY_PATH", lp)
    relative = str(tree[name].relative_to(d))       # ldd's ./-less relative path
    real = real_ldd(relative, lp)
    assert _vmsim_ldd(capsys, relative) == real
    assert _vmsim_ldd(capsys, str(tree[name])) == real_ldd(tree[name], lp)


def test_preload_comes_first_as_in_ldd(tree: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = tree["leaf"].parent.parent
    real = real_ldd(tree["prog_plain"], f"{d}/lib", preload="libz.so.1")
    ours = _vmsim_ldd(capsys, str(tree["prog_plain"]), "--library-path", f"{d}/lib",
                      "--preload", "libz.so.1")
    assert ours == real
    assert "libz.so.1" in ours[1]


def _how(entries: list[Found], name: str) -> tuple[str, str | None]:
    """(how, path) of the entry asked for as ``name``."""
    found = [e for e in entries if e.name == name]
    assert len(found) == 1, (name, found)
    return found[0].how, found[0].path


def test_closure_says_which_step_found_each(tree: dict[str, Path]) -> None:
    d = tree["leaf"].parent.parent
    rpath = closure(str(tree["prog_rpath"]))
    assert [e.how for e in rpath[:1]] == ["program"]
    assert _how(rpath, "libmid.so") == ("rpath", f"{d}/bin/../lib/libmid.so")
    assert _how(rpath, "libleaf2.so")[0] == "rpath"          # the program's, inherited
    assert _how(rpath, "libc.so.6") == ("cache", "/lib/x86_64-linux-gnu/libc.so.6")
    assert _how(rpath, "/lib64/ld-linux-x86-64.so.2")[0] == "loaded"      # PT_INTERP
    assert rpath[-1].aliases == ["ld-linux-x86-64.so.2"]                   # libc's DT_NEEDED
    runpath = closure(str(tree["prog_runpath"]), missing="report")
    assert _how(runpath, "libmid.so")[0] == "runpath"
    assert _how(runpath, "libleaf.so")[0] == "runpath"       # libmid's own $ORIGIN
    assert _how(runpath, "libleaf2.so") == ("not found", None)   # RUNPATH is not inherited
    lp = closure(str(tree["prog_runpath"]), library_path=[f"{d}/other"], missing="report")
    assert _how(lp, "libleaf.so") == ("library_path", f"{d}/other/libleaf.so")
    needer = next(e for e in rpath if e.name == "libleaf.so").needed_by
    assert needer == f"{d}/bin/../lib/libmid.so"


def test_rpath_is_ignored_when_runpath_is_present(tree: dict[str, Path]) -> None:
    d = tree["leaf"].parent.parent
    found = closure(str(tree["prog_both"]))
    assert found[0].info is not None and found[0].info.rpath is None
    assert _how(found, "libleaf.so") == ("runpath", f"{d}/lib/libleaf.so")


def test_a_cycle_loads_each_object_once(tree: dict[str, Path]) -> None:
    found = closure(str(tree["cyca"]))
    names = [e.info.soname for e in found if e.info is not None]
    assert names[:2] == ["libcyca.so", "libcycb.so"]
    assert len(names) == len(set(names))
    assert [e.name for e in found].count("libcyca.so") == 0     # matched the program by soname


def test_a_missing_dependency_names_the_chain(tree: dict[str, Path]) -> None:
    with pytest.raises(ElfDependencyError) as caught:
        closure(str(tree["miss"]))
    assert caught.value.value == "libnothere.so"
    assert str(tree["miss"]) in str(caught.value)
    chain = [read_object(str(tree["miss2"])), read_object(str(tree["miss"]))]
    with pytest.raises(ElfDependencyError, match=r"libmiss2\.so <- .*libmiss\.so"):
        SearchPath().find("libnothere.so", [info for info in chain if info is not None])


def test_files_of_another_class_or_machine_are_skipped(tree: dict[str, Path]) -> None:
    d = tree["leaf"].parent.parent
    wrong = [f"{d}/wrong64", f"{d}/wrong32"]
    found = closure(str(tree["prog_plain"]), library_path=[*wrong, f"{d}/lib"])
    assert _how(found, "libleaf.so") == ("library_path", f"{d}/lib/libleaf.so")
    with pytest.raises(ElfDependencyError, match=r"skipped .*wrong64/libleaf\.so, .*wrong32"):
        closure(str(tree["prog_plain"]), library_path=wrong)


def test_a_candidate_that_is_not_elf_stops_the_search(tree: dict[str, Path]) -> None:
    d = tree["leaf"].parent.parent
    with pytest.raises(ElfHeaderError, match=r"notelf/libleaf\.so"):
        closure(str(tree["prog_plain"]), library_path=[f"{d}/notelf", f"{d}/lib"])
    real = subprocess.run(["ldd", str(tree["prog_plain"])], capture_output=True, text=True,
                          env=dict(os.environ, LD_LIBRARY_PATH=f"{d}/notelf:{d}/lib"))
    assert real.returncode == 1                              # glibc stops there too
    assert "notelf/libleaf.so: file too short" in real.stdout + real.stderr


def test_the_same_file_under_two_names_is_one_object(
        tree: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d = tree["leaf"].parent.parent
    alias = d / "lib" / "libleaf-alias.so"
    if not alias.exists():
        alias.symlink_to("libleaf.so")
    preload = [str(alias), f"{d}/lib/libleaf.so"]
    found = closure(str(tree["prog_plain"]), preload=preload)
    leaf = [e for e in found if e.info is not None and e.info.soname == "libleaf.so"]
    assert len(leaf) == 1 and leaf[0].how == "preload"
    assert leaf[0].aliases == [f"{d}/lib/libleaf.so", "libleaf.so"]     # identity, soname
    assert _vmsim_ldd(capsys, str(tree["prog_plain"]), "--preload", ":".join(preload)) == \
        real_ldd(tree["prog_plain"], preload=":".join(preload))


def test_an_object_without_needed_is_statically_linked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "libnothing.so"
    path.write_bytes(ew.build(ew.ElfSpec(segments=(ew.Segment("rx", data=b"\xc3" * 64),)))
                     .data)
    assert real_ldd(path) == ["\tstatically linked"]
    assert _vmsim_ldd(capsys, str(path)) == ["\tstatically linked"]


@pytest.mark.parametrize(("path", "wanted"), [("/etc/passwd", "ElfHeaderError"),
                                              ("/nonexistent", "no such file")])
def test_ldd_refuses_in_one_line(path: str, wanted: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ldd", path]) == EXIT["refused"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vmsim:") and wanted in err


def test_ldd_into_a_closed_pipe_is_quiet() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vmsim.cli", "ldd", "/usr/bin/ls"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT["pipe"]
    assert err == b""


def test_closure_refuses_a_program_of_another_machine(tree: dict[str, Path]) -> None:
    with pytest.raises(ElfError, match="ELF64 x86-64"):
        closure(str(tree["wrong64"]))


def _ld_so(option: str) -> str:
    """This machine's ``ld.so OPTION`` output."""
    return subprocess.run(["/lib64/ld-linux-x86-64.so.2", option], capture_output=True,
                          text=True, check=True).stdout


def test_the_search_constants_are_this_machines_ld_so() -> None:
    help_text = _ld_so("--help")
    levels = help_text.split("glibc-hwcaps directories, in priority order:")[1].split("\n\n")[0]
    searched = [ln.split()[0] for ln in levels.splitlines() if "(supported, searched)" in ln]
    assert tuple(searched) == GLIBC_HWCAPS
    system = re.findall(r'path\.system_dirs\[0x[0-9a-f]+\]="([^"]*)"',
                        _ld_so("--list-diagnostics"))
    assert [d.rstrip("/") for d in system] == list(DEFAULT_DIRS)
    assert 'dl_platform="x86_64"' in _ld_so("--list-diagnostics")


def test_a_preload_found_nowhere_is_reported_as_ldd_does() -> None:
    """glibc ignores a preload it cannot find, with an ERROR line on stderr: the same
    line (ldd prints it twice, as ld.so runs twice), and the same listing on stdout."""
    import os
    import subprocess
    import sys

    ours = subprocess.run([sys.executable, "-m", "vmsim.cli", "ldd", "/usr/bin/true",
                           "--preload", "libnothere.so"], capture_output=True, text=True)
    env = {**os.environ, "LD_PRELOAD": "libnothere.so"}
    theirs = subprocess.run(["ldd", "/usr/bin/true"], capture_output=True, text=True, env=env)
    assert ours.returncode == 0
    assert set(ours.stderr.splitlines()) == set(theirs.stderr.splitlines())
    assert "libnothere.so" in ours.stderr
