"""The CPU's watchdog (``vmsim.cpu.Watchdog``): a run stops at its time limit, also in a
forked child of a process whose watchdog thread already ran, and Ctrl-C (SIGINT) stops a run
of code that never returns to Python (no syscall, no TLB miss) at once, as KeyboardInterrupt,
leaving the process usable."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from process_support import load_code

import vmsim
from loader.isolate import run_isolated

LOOP = "loop: jmp loop"


def _loop_stops_at_its_limit() -> float:
    """In the child: seconds an endless loop ran before its 1 s limit stopped it."""
    with vmsim.Process(timeout=1.0) as proc:
        entry, _ = load_code(proc, LOOP)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            proc.call(entry)
        return time.monotonic() - started


def test_the_time_limit_holds_in_a_forked_child() -> None:
    assert _loop_stops_at_its_limit() < 30        # the watchdog thread now runs here
    elapsed = run_isolated(_loop_stops_at_its_limit, timeout=60.0).value
    assert 0.9 < elapsed < 30


def test_ctrl_c_stops_a_loop_at_once_and_the_process_goes_on() -> None:
    with vmsim.Process(timeout=60.0) as proc:
        entry, _ = load_code(proc, LOOP)
        answer, _ = load_code(proc, "mov rax, 42\n ret")
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            proc.call(entry)
        assert time.monotonic() - started < 30    # not the 60 s limit
        assert proc.call(answer) == 42
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
