"""What a bad access raises (:class:`Fault`) and the simulator's counters (:class:`Stats`).

Part of ``vmsim``, below ``vmsim.space``; imports nothing from the project.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Fault", "Stats"]


class Fault(Exception):
    """A user-mode access the kernel would answer with a fatal signal, as its siginfo says.

    ``addr`` is the faulting address, ``access`` ``"r"``, ``"w"`` or ``"x"``, ``signal``
    ``"SIGSEGV"`` or ``"SIGBUS"``, ``code`` ``"SEGV_MAPERR"`` (nothing mapped there),
    ``"SEGV_ACCERR"`` (mapped, access not allowed), ``"BUS_ADRERR"`` (file page past EOF) or
    ``"SI_KERNEL"`` (a non-canonical address: x86 raises #GP, the kernel sends SIGSEGV with
    si_code SI_KERNEL).
    """

    def __init__(self, addr: int, access: str, signal: str, code: str) -> None:
        self.addr = addr
        self.access = access
        self.signal = signal
        self.code = code
        kind = {"r": "read", "w": "write", "x": "fetch"}.get(access, access)
        super().__init__(f"{signal} ({code}): {kind} at {addr:#x}")

    def __reduce__(self) -> tuple[type[Fault], tuple[int, str, str, str]]:
        return (Fault, (self.addr, self.access, self.signal, self.code))


class Stats(NamedTuple):
    """Counters of hidden work. ``minor_faults``: PTEs filled on demand; ``cow_copies``:
    private pages copied from a shared frame (the zero page or a file's page) on a write;
    ``resident_pages``: pages whose PTE holds a frame (RSS, zero page excluded);
    ``frames``: frames allocated in the pool (anonymous, copies and page cache);
    ``page_tables``: page-table pages allocated."""

    minor_faults: int
    cow_copies: int
    resident_pages: int
    frames: int
    page_tables: int
