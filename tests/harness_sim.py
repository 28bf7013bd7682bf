"""The simulator's harness for the kernel ground-truth tests (tests/test_kernel_*.py).

conftest.py merges :data:`HARNESSES` into ``harness.BACKENDS`` when ``vmsim.AddressSpace``
exists, so every backend-parametrised test body also runs on the simulator, unchanged. The
simulator is built with this machine's limits (protection keys, mmap_min_addr, privilege,
vm.max_map_count) so that its answers must equal the kernel's here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import BackendHarness

from loader.libc import host_has_pkeys
from vmsim import AddressSpace, Fault
from vmsim.fuzz.isolate import Isolated

__all__ = ["HARNESSES", "SimHarness", "host_like_space"]


def host_like_space() -> AddressSpace:
    """An AddressSpace with this machine's kernel settings."""
    return AddressSpace(
        exec_only=host_has_pkeys(),
        max_map_count=int(Path("/proc/sys/vm/max_map_count").read_text()),
        mmap_min_addr=int(Path("/proc/sys/vm/mmap_min_addr").read_text()),
        privileged=os.geteuid() == 0,
    )


class SimHarness(BackendHarness):
    """The simulator: faults are Fault exceptions, so "isolated" runs happen in place."""

    name = "sim"

    def __init__(self, arena_pages: int = 256) -> None:
        mm = host_like_space()
        super().__init__(mm, mm.page_size, arena_pages)
        self.space = mm
        self.max_map_count = mm.max_map_count
        self.has_pkeys = mm.exec_only

    def map_count(self) -> int:
        """The simulator's VMA count (no [vsyscall] line to discount)."""
        return self.space.map_count

    def probe(self, addr: int, access: str) -> str:
        """See BackendHarness.probe: the simulator answers without touching anything. Like
        loader.isolate's probe, "w" loads the byte before storing it back."""
        fault = self.space.check_access(addr, 1, "r" if access == "w" else access)
        if fault is None and access == "w":
            fault = self.space.check_access(addr, 1, "w")
        return "ok" if fault is None else fault.signal

    def isolated(self, fn: Callable[..., Any], *args: Any) -> Isolated:
        """See BackendHarness.isolated: in place; a Fault becomes its signal's name."""
        try:
            return Isolated("ok", fn(*args))
        except Fault as fault:
            return Isolated(fault.signal, None)

    def with_read_implies_exec(self, fn: Callable[[], Any]) -> Any:
        """See BackendHarness.with_read_implies_exec: the simulator's personality knob."""
        self.space.read_implies_exec = True
        try:
            return fn()
        finally:
            self.space.read_implies_exec = False


HARNESSES: dict[str, Callable[..., BackendHarness]] = {"sim": SimHarness}
