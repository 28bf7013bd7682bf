"""The supervisor for hostile input: a child past its memory or time bound is killed and
reported, and a child never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vmsim.fuzz.isolate import OverBound, rss_bytes, run_isolated


def _allocate(n: int) -> int:
    block = bytearray(n)  # zero-filled by calloc: touch every page so it is resident
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    return len(block)


def test_child_past_its_memory_bound_is_killed_and_named() -> None:
    with pytest.raises(OverBound, match=r"max_rss=64 MiB") as info:
        run_isolated(_allocate, 1 << 30, max_rss=64 << 20, timeout=20)
    assert info.value.limit == 64 << 20
    assert info.value.rss > 64 << 20


def test_child_within_its_memory_bound_returns() -> None:
    assert run_isolated(_allocate, 8 << 20, max_rss=64 << 20).value == 8 << 20


def test_short_spike_past_the_bound_is_seen_at_exit() -> None:
    # Allocates and frees faster than the poll: wait4's peak RSS still catches it.
    def spike() -> int:
        _allocate(256 << 20)
        return 0

    with pytest.raises(OverBound):
        run_isolated(spike, max_rss=32 << 20)


def test_rss_of_this_process_is_read() -> None:
    rss = rss_bytes()
    assert rss > 1 << 20, rss
    assert rss < 64 << 30, rss


_SPINNER = """
import os
from vmsim.fuzz.isolate import run_isolated
def spin():
    print(os.getpid(), flush=True)
    while True:
        pass
try:
    run_isolated(spin, timeout=60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def _parent_of_a_spinning_child() -> tuple[subprocess.Popen[str], int]:
    """A Python process waiting in run_isolated on a child that spins; (it, the child's pid)."""
    proc = subprocess.Popen([sys.executable, "-c", _SPINNER], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_child_killed_when_the_parent_is_interrupted() -> None:
    # A parent interrupted (Ctrl-C) while it waits kills its child before the exception leaves.
    proc, child = _parent_of_a_spinning_child()
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "interrupted"
    proc.wait(timeout=10)
    assert not _alive(child)


def test_child_dies_with_a_parent_killed_outright() -> None:
    proc, child = _parent_of_a_spinning_child()
    proc.kill()
    proc.wait(timeout=10)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie, waiting up to 5 s for it to go."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(")")[-1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True
