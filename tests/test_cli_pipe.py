"""A reader that stops early (``vmsim load --json | head -1``) ends the command quietly with
exit 141, what a shell reports for a tool killed by SIGPIPE: no BrokenPipeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import ROOT
from loader_support import SYSTEM_LIBS

from vmsim.cli import EXIT

LIBZ = str(SYSTEM_LIBS["libz"])
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


EVERY_PRINTING_COMMAND = [
    ["load", "--json"], ["load", "--backend", "libc"], ["trace"], ["maps", "--color", "always"],
    ["explain"], ["diff", LIBZ],
    ["load"], ["load", "--json", "--backend", "libc"], ["maps", "--backend", "libc"],
    ["trace", "--backend", "libc"], ["explain", "--backend", "libc"], ["load", "/usr/bin/ls"],
    ["plot", "-o", "PICTURE"],
]
"""Every verb that writes to stdout, on both backends where it has a choice."""
HELPS = [["--help"], ["load", "--help"], ["maps", "--help"], ["trace", "--help"],
         ["explain", "--help"], ["plot", "--help"], ["diff", "--help"], ["fuzz", "--help"],
         ["run", "--help"]]


@pytest.mark.parametrize("argv", EVERY_PRINTING_COMMAND,
                         ids=lambda a: "-".join(a[:4]).replace("/", "_"))
def test_stdout_closed_before_the_first_write_is_quiet_141(argv: list[str],
                                                           tmp_path: Path) -> None:
    argv = [str(tmp_path / "x.png") if a == "PICTURE" else a for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "vmsim.cli", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()                 # the only reader is gone: every write is EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT["pipe"] == 141
    assert err == b""


@pytest.mark.parametrize("verb", ["load --json", "load --json --backend libc", "explain",
                                  "load /usr/bin/ls"])
def test_a_long_output_into_head_is_quiet(verb: str) -> None:
    """``| head -c 10`` closes the pipe after the command began writing (the JSON line and
    explain's output are longer than a pipe's buffer only with a slow reader: the writer
    is blocked, then EPIPE), as the issue's ``vmsim load --json | head``."""
    cmd = (f"set -o pipefail; {sys.executable} -m vmsim.cli {verb} | (head -c 10 >/dev/null); "
           "echo status=$?")
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120)
    assert done.stdout.splitlines()[-1] in ("status=141", "status=0")
    assert done.stderr == ""


@pytest.mark.parametrize("argv", HELPS, ids=lambda a: "-".join(a))
def test_help_into_a_closed_stdout_is_quiet(argv: list[str]) -> None:
    """argparse prints help and exits 0, swallowing the write error itself: quiet, 0 or
    141, never a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "vmsim.cli", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, EXIT["pipe"])
    assert err == b""


def test_shell_pipeline_into_head() -> None:
    cmd = (f"set -o pipefail; {sys.executable} -m vmsim.cli trace {LIBZ} | head -1; "
           "echo status=$?")
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120)
    assert done.stdout.splitlines()[-1] in ("status=141", "status=0")  # 0: head was late
    assert "libz.so" in done.stdout.splitlines()[0]
    assert done.stderr == ""
