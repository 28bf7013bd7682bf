"""Every verb on files nobody prepared: each ends with a documented exit status, and when it
refuses a file it says why in one line on stderr, prints nothing on stdout, and never shows
a traceback (exit 3 "a load died" or 4 "a bug" would be a failure here)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from cli_support import run_cli, run_command
from loader_support import SYSTEM_LIBS

from vmsim.cli import EXIT

LIBZ = SYSTEM_LIBS["libz"]
E_MACHINE_AT, EI_CLASS_AT = 18, 4


def _patched(tmp: Path, name: str, at: int, value: bytes) -> str:
    data = bytearray(LIBZ.read_bytes())
    data[at: at + len(value)] = value
    path = tmp / name
    path.write_bytes(bytes(data))
    return str(path)


def make_input(kind: str, tmp: Path) -> str:
    """The file of ``kind``, made under ``tmp`` when it is not on the machine already."""
    if kind == "usr-bin-ls":
        return shutil.which("ls") or "/usr/bin/ls"
    if kind == "dev-null":
        return "/dev/null"
    if kind == "directory":
        return str(tmp)
    if kind == "fifo":
        os.mkfifo(tmp / "fifo")
        return str(tmp / "fifo")
    if kind == "text":
        (tmp / "notes.txt").write_text("not an ELF file\n" * 40)
        return str(tmp / "notes.txt")
    if kind == "empty":
        (tmp / "empty.so").write_bytes(b"")
        return str(tmp / "empty.so")
    if kind == "truncated-libz":
        (tmp / "libz-cut.so").write_bytes(LIBZ.read_bytes()[:30000])
        return str(tmp / "libz-cut.so")
    if kind == "header-only":
        (tmp / "header.so").write_bytes(LIBZ.read_bytes()[:64])
        return str(tmp / "header.so")
    if kind == "aarch64":
        return _patched(tmp, "libz-arm.so", E_MACHINE_AT, struct.pack("<H", 183))
    if kind == "elf32":
        return _patched(tmp, "libz-32.so", EI_CLASS_AT, b"\x01")
    if kind == "non-utf8-name":
        path = os.path.join(os.fsencode(tmp), b"libz-\xff\xfe.so")
        shutil.copyfile(LIBZ, path)
        return os.fsdecode(path)
    raise AssertionError(kind)


LOADS = {"usr-bin-ls", "non-utf8-name"}
"""The inputs every verb loads (exit 0); the others are refused (exit 2)."""
REASONS = {
    "dev-null": "not a regular file (character device)", "directory": "a directory",
    "fifo": "not a regular file (FIFO)", "text": "not an ELF file", "empty": "not an ELF file",
    "truncated-libz": "an ELF file the loader refuses",
    "header-only": "an ELF file the loader refuses",
    "aarch64": "an ELF file the loader refuses", "elf32": "an ELF file the loader refuses",
}
KINDS = sorted(LOADS | set(REASONS))
VERBS = [("load", "sim"), ("load", "libc"), ("maps", "sim"), ("trace", "libc"),
         ("explain", "sim"), ("plot", "sim"), ("plot", "libc"), ("diff", None)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("verb", "backend"), VERBS, ids=[f"{v}-{b}" for v, b in VERBS])
def test_every_verb_on_every_unprepared_file(tmp_path: Path, kind: str, verb: str,
                                             backend: str | None) -> None:
    path = make_input(kind, tmp_path)
    argv = [verb, path] + (["--backend", backend] if backend else [])
    if verb == "plot":
        argv += ["-o", str(tmp_path / "map.png")]
    ran = run_cli(*argv, timeout=60)
    if kind in LOADS:
        assert ran.code == EXIT["ok"], ran.err
        assert ran.err == "" and ran.out
        return
    assert ran.code == EXIT["refused"], (ran.code, ran.err)
    line = ran.one_error_line()
    assert REASONS[kind] in line, line
    assert ran.out == ""


def test_a_path_of_raw_bytes_on_the_real_command_line(tmp_path: Path) -> None:
    path = os.fsencode(make_input("non-utf8-name", tmp_path))
    ran = run_command("maps", path, "--backend", "libc")
    assert ran.code == 0, ran.err
    assert "libz-\\xff\\xfe.so" in ran.out
    gone = os.path.join(os.fsencode(tmp_path), b"gone-\xff.so")
    ran = run_command("load", gone)
    assert ran.code == 2 and "gone-\\xff.so: no such file" in ran.one_error_line()
