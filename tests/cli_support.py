"""Running the ``vmsim`` command in tests as a user would, with its output captured.

``run_cli`` runs ``main(argv)`` in a supervised forked child (``loader.isolate.run_isolated``),
so a verb that blocked (a FIFO opened) or ran away fails the test by its timeout instead of
hanging the suite. ``run_command`` runs ``python -m vmsim.cli`` as a separate process.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from vmsim.fuzz.isolate import run_isolated

ROOT = Path(__file__).resolve().parent.parent


class Ran(NamedTuple):
    """How the command ended: exit status and what it printed."""

    code: int
    out: str
    err: str

    def one_error_line(self) -> str:
        """The single stderr line (asserting there is exactly one and no traceback)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one stderr line, got {self.err!r}"
        assert "Traceback" not in self.err
        assert lines[0].startswith("vmsim"), lines[0]
        return lines[0]


def _main_captured(argv: list[str]) -> Ran:
    """In the child: main(argv) with stdout and stderr captured."""
    from vmsim.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:      # argparse's usage errors and --help
            code = stop.code if isinstance(stop.code, int) else 2
    return Ran(code, out.getvalue(), err.getvalue())


def run_cli(*argv: str, timeout: float = 60.0) -> Ran:
    """``vmsim ARGV`` through main() in a supervised child (timeout, 1 GiB memory bound)."""
    ran: Ran = run_isolated(_main_captured, list(argv), timeout=timeout,
                            max_rss=1 << 30).value
    return ran


def run_command(*argv: str | bytes, timeout: float = 120.0) -> Ran:
    """``python -m vmsim.cli ARGV`` as its own process (arguments may be bytes)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-m", "vmsim.cli", *argv], capture_output=True,
                          timeout=timeout, env=env, cwd=ROOT)
    return Ran(done.returncode, done.stdout.decode(errors="backslashreplace"),
               done.stderr.decode(errors="backslashreplace"))
