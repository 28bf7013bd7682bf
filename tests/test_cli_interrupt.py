"""Ctrl-C anywhere in ``vmsim`` is one line, ``vmsim: interrupted``, exit 130 (as shells
expect), and leaves no forked child behind: the command really runs, receives a real SIGINT
while a load waits (a hook makes it wait), and the waiting child must be gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_support import ROOT
from loader_support import SYSTEM_LIBS

LIBZ = str(SYSTEM_LIBS["libz"])

HOOKS = {
    # vmsim.cli's own load: in the forked child for --backend libc, in this process for sim.
    "cli": "import vmsim.cli as where",
    # loader.compare's load: the host children and the simulator side of diff.
    "compare": "import loader.compare as where",
}


def _start(hook: str, argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """Run ``vmsim ARGV`` with the hooked load printing its pid and waiting; (process, pid of
    the waiting load)."""
    script = tmp_path / "slow_vmsim.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        {HOOKS[hook]}
        from vmsim.cli import main
        def waiting(*args, **kwargs):
            print(os.getpid(), flush=True)
            time.sleep(600)
        where.load = waiting
        sys.exit(main({argv!r}))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            start_new_session=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie, waiting up to 5 s for it to go."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[-1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("group", [False, True], ids=["to-vmsim", "to-its-group"])
@pytest.mark.parametrize(("hook", "argv"), [
    ("cli", ["load", LIBZ, "--backend", "libc"]),
    ("cli", ["load", LIBZ, "--backend", "sim"]),
    ("cli", ["maps", LIBZ, "--backend", "libc"]),
    ("compare", ["diff", LIBZ]),
], ids=["load-libc", "load-sim", "maps-libc", "diff"])
def test_ctrl_c_is_one_line_exit_130_and_no_child_left(tmp_path: Path, hook: str,
                                                       argv: list[str], group: bool) -> None:
    proc, waiting = _start(hook, argv, tmp_path)
    if group:           # what a terminal's Ctrl-C does: the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:               # only the command itself (kill -INT)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err == "vmsim: interrupted\n"
    assert not _alive(waiting)
