"""The ``vmsim`` command: ``load`` with no arguments works, ``--json`` is exactly DESIGN.md's
object, ``--backend libc`` and ``--base`` do what they say, ``diff`` exits 0 on equal outcomes,
bad input is one line and exit 2, ``--help`` teaches.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from loader_support import SYSTEM_LIBS

from vmsim.cli import main

KEYS = ["path", "backend", "load_bias", "span", "regions", "relro", "relocations", "calls"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would (the console script's module)."""
    return subprocess.run([sys.executable, "-m", "vmsim.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _check_report(report: dict[str, Any], backend: str) -> None:
    assert list(report) == KEYS
    assert report["backend"] == backend
    start, end = report["span"]
    assert report["load_bias"] == start         # libz's lowest vaddr is 0
    assert report["regions"] and all(start <= r["start"] < r["end"] <= end
                                     for r in report["regions"])
    assert all(list(r) == ["start", "end", "perms", "offset", "path"]
               for r in report["regions"])
    assert report["relro"] is not None and start <= report["relro"][0] < report["relro"][1]
    rel = report["relocations"]
    assert list(rel) == ["applied", "by_type", "unresolved"]
    assert rel["applied"] == sum(rel["by_type"].values()) > 0
    assert rel["by_type"]["R_X86_64_RELATIVE"] > 0
    assert report["calls"][0]["op"] == "mmap_reserve"
    assert report["calls"][0]["addr"] is None and report["calls"][0]["result"] == start
    assert "libz.so" in report["path"]


def test_load_without_arguments_works() -> None:
    done = _run("load")
    assert done.returncode == 0, done.stderr
    assert "libz.so" in done.stdout and "RELRO" in done.stdout


@pytest.mark.parametrize("backend", ["sim", "libc"])
def test_load_json_is_the_design_object(backend: str) -> None:
    done = _run("load", "--backend", backend, "--json")
    assert done.returncode == 0, done.stderr
    _check_report(json.loads(done.stdout), backend)


def test_base_is_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", str(SYSTEM_LIBS["libz"]), "--base", "0x7e0000000000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["span"][0] == report["load_bias"] == 0x7E0000000000


def test_diff_equal_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(SYSTEM_LIBS["libz"])]) == 0
    assert "identical" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "not-elf.so"
    bogus.write_bytes(b"#!/bin/sh\n" * 10)
    done = _run("load", str(bogus), "--backend", "libc")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "e_ident[EI_MAG]" in done.stderr


def test_help_teaches() -> None:
    done = _run("--help")
    assert done.returncode == 0
    assert "load" in done.stdout and "diff" in done.stdout and "examples" in done.stdout
    sub = _run("load", "--help")
    assert "--backend" in sub.stdout and "--base" in sub.stdout and "libz" in sub.stdout


def test_fuzz_verb_dispatches() -> None:
    done = _run("fuzz", "--help")
    assert done.returncode == 0
    assert "vmsim fuzz" in done.stdout and "--time" in done.stdout
