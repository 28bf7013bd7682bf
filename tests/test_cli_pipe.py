"""A reader that stops early (``vmsim load --json | head -1``) ends the command quietly with
exit 141, what a shell reports for a tool killed by SIGPIPE: no BrokenPipeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_support import ROOT
from loader_support import SYSTEM_LIBS

from vmsim.cli import EXIT

LIBZ = str(SYSTEM_LIBS["libz"])
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("argv", [
    ["load", "--json"], ["load", "--backend", "libc"], ["trace"], ["maps", "--color", "always"],
    ["explain"], ["diff", LIBZ],
], ids=lambda a: "-".join(a[:2]).replace("/", "_"))
def test_stdout_closed_before_the_first_write_is_quiet_141(argv: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vmsim.cli", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()                 # the only reader is gone: every write is EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT["pipe"] == 141
    assert err == b""


def test_shell_pipeline_into_head() -> None:
    cmd = (f"set -o pipefail; {sys.executable} -m vmsim.cli trace {LIBZ} | head -1; "
           "echo status=$?")
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120)
    assert done.stdout.splitlines()[-1] in ("status=141", "status=0")  # 0: head was late
    assert "libz.so" in done.stdout.splitlines()[0]
    assert done.stderr == ""
