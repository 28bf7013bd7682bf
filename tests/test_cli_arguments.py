"""Every numeric argument of every verb is checked the same way (vmsim.cli.Bounded) and a bad
one is a usage error: exit 2, one line naming the argument. Inputs that are not regular files
are named for what they are, and a FIFO never blocks the command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from cli_support import run_cli
from loader_support import SYSTEM_LIBS

from vmsim.arguments import FUZZ_SECONDS
from vmsim.cli import BASE, DPI, EXIT

LIBZ = str(SYSTEM_LIBS["libz"])


@pytest.mark.parametrize(("argv", "named", "why"), [
    (["load", "--base", "0x7f0000001234"], "--base", "multiple of the page size"),
    (["load", "--base", "0x1234"], "--base", "out of range"),
    (["load", "--base", "zz"], "--base", "not an integer"),
    (["load", "--base", "0x800000000000"], "--base", "out of range"),
    (["load", "--base", "-4096"], "--base", "out of range"),
    (["maps", "--base", "1e9"], "--base", "not an integer"),
    (["trace", "--base", "0x7f0000000001"], "--base", "multiple of the page size"),
    (["explain", "--base", "0x1" + "0" * 20], "--base", "out of range"),
    (["plot", "-o", "x.png", "--dpi", "0"], "--dpi", "out of range"),
    (["plot", "-o", "x.png", "--dpi", "6000"], "--dpi", "out of range"),
    (["plot", "-o", "x.png", "--dpi", "12.5"], "--dpi", "not an integer"),
    (["plot", "-o", "out.txt"], "-o/--output", "must end in .png"),
    (["fuzz", "--time", "-5"], "--time", "out of range"),
    (["fuzz", "--time", "0"], "--time", "out of range"),
    (["fuzz", "--time", "nan"], "--time", "not a finite number"),
    (["fuzz", "--time", "inf"], "--time", "not a finite number"),
    (["fuzz", "--time", "1e9"], "--time", "out of range"),
])
def test_bad_numeric_argument_is_a_usage_error_naming_it(argv: list[str], named: str,
                                                          why: str) -> None:
    ran = run_cli(*argv)
    assert ran.code == EXIT["refused"] == 2
    line = ran.one_error_line()
    assert f"argument {named}:" in line and why in line, line
    assert "None" not in line and ran.out == ""


def test_one_checker_for_every_number() -> None:
    assert BASE("0x7f0000000000") == 0x7F0000000000
    assert DPI("300") == 300
    assert FUZZ_SECONDS("0.5") == 0.5
    for checker, bad in ((BASE, 0x7F0000000001), (DPI, 0), (FUZZ_SECONDS, float("nan"))):
        with pytest.raises(argparse.ArgumentTypeError):
            checker.check(bad)


def test_a_good_base_still_loads_there() -> None:
    ran = run_cli("load", LIBZ, "--base", "0x7e0000000000", "--json")
    assert ran.code == 0 and '"load_bias": 138538465099776' in ran.out


def test_base_the_kernel_cannot_give_names_the_argument() -> None:
    # Page-aligned and in range, but the span would cross the top of user space.
    ran = run_cli("load", LIBZ, "--base", hex((1 << 47) - 0x2000), "--backend", "libc")
    assert ran.code == 2
    line = ran.one_error_line()
    assert "argument --base 0x7fffffffe000: " in line and "cannot be loaded there" in line


def test_picture_too_big_for_the_canvas_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "big.png"
    ran = run_cli("plot", LIBZ, "-o", str(out), "--dpi", "1200")
    assert ran.code == 2
    assert "lower --dpi" in ran.one_error_line() and "pixels" in ran.err
    assert not out.exists()


def test_picture_at_a_sane_dpi_is_written(tmp_path: Path) -> None:
    out = tmp_path / "ok.svg"
    ran = run_cli("plot", LIBZ, "-o", str(out), "--dpi", "50")
    assert ran.code == 0 and out.stat().st_size > 0


def test_picture_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    ran = run_cli("plot", LIBZ, "-o", str(tmp_path / "no" / "such.png"))
    assert ran.code == 2 and "No such file or directory" in ran.one_error_line()


@pytest.mark.parametrize(("make", "what"), [
    ("devnull", "not a regular file (character device)"),
    ("fifo", "not a regular file (FIFO)"),
    ("dir", "a directory"),
    ("missing", "no such file"),
    ("below-a-file", "no such file (a component of the path is not a directory)"),
])
@pytest.mark.parametrize("verb", ["load", "diff"])
def test_not_a_regular_file_says_what_it_is(tmp_path: Path, make: str, what: str,
                                            verb: str) -> None:
    path = {"devnull": "/dev/null", "fifo": str(tmp_path / "fifo"), "dir": str(tmp_path),
            "missing": str(tmp_path / "gone.so"),
            "below-a-file": LIBZ + "/x.so"}[make]
    if make == "fifo":
        os.mkfifo(path)          # nobody writes it: opening it for reading would block
    ran = run_cli(verb, path, timeout=20)
    assert ran.code == 2
    assert f"{path}: {what};" in ran.one_error_line()
