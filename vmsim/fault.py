"""What an access is (:class:`Access`), what a bad one raises (:class:`Fault`) and the
simulator's counters (:class:`Stats`).

Part of ``vmsim``, below every layer of the simulated machine; imports nothing from the
project.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Access", "Fault", "Stats", "raise_found"]


class Access(enum.Enum):
    """What an access to memory is for: the MMU checks each one against the page table.

    ``READ``, ``WRITE`` and ``EXECUTE`` are a user-mode program's loads, stores and
    instruction fetches. ``PTRACE_READ`` and ``PTRACE_WRITE`` are a debugger's accesses
    (ptrace PEEKDATA/POKEDATA, which the kernel makes with FOLL_FORCE): a forced read sees
    any mapped page, PROT_NONE included; a forced write may write a private mapping whatever
    its protection (copying the page), a shared one only when it is writable.
    """

    READ = "r"
    WRITE = "w"
    EXECUTE = "x"
    PTRACE_READ = "ptrace-r"
    PTRACE_WRITE = "ptrace-w"

    __hash__ = object.__hash__  # members are singletons: hash by identity, in C (every
                                # access looks its mode up)

    @property
    def letter(self) -> str:
        """The access as a Fault reports it: ``"r"``, ``"w"`` or ``"x"`` (a forced access
        faults as the read or write it is)."""
        return self._value_[-1]

    @property
    def writes(self) -> bool:
        """True for a store (user-mode or forced)."""
        return self._value_[-1] == "w"


class Fault(Exception):
    """A user-mode access the kernel would answer with a fatal signal, as its siginfo says.

    ``addr`` is the faulting address, ``access`` ``"r"``, ``"w"`` or ``"x"`` (a string, also
    when built from an :class:`Access`), ``signal`` ``"SIGSEGV"`` or ``"SIGBUS"``, ``code``
    ``"SEGV_MAPERR"`` (nothing mapped there), ``"SEGV_ACCERR"`` (mapped, access not allowed),
    ``"BUS_ADRERR"`` (file page past EOF) or ``"SI_KERNEL"`` (a non-canonical address: x86
    raises #GP, the kernel sends SIGSEGV with si_code SI_KERNEL). ``pc`` is the address of
    the instruction that faulted when code running on a CPU (``vmsim.Process``) made the
    access, else None.
    """

    def __init__(self, addr: int, access: str | Access, signal: str, code: str,
                 pc: int | None = None) -> None:
        self.addr = addr
        self.access = access.letter if isinstance(access, Access) else access
        self.signal = signal
        self.code = code
        self.pc = pc
        kind = {"r": "read", "w": "write", "x": "fetch"}.get(self.access, self.access)
        where = "" if pc is None else f" (pc {pc:#x})"
        super().__init__(f"{signal} ({code}): {kind} at {addr:#x}{where}")

    def __reduce__(self) -> tuple[type[Fault], tuple[int, str, str, str, int | None]]:
        return (Fault, (self.addr, self.access, self.signal, self.code, self.pc))

    def at(self, addr: int) -> Fault:
        """The same fault reported at ``addr`` (the first byte of the access in the page)."""
        return self if addr == self.addr else Fault(addr, self.access, self.signal, self.code,
                                                    self.pc)

    def on_cpu(self, pc: int) -> Fault:
        """The same fault, made by the instruction at ``pc``."""
        return Fault(self.addr, self.access, self.signal, self.code, pc)


def raise_found(find: Callable[[], Fault | None]) -> None:
    """Raise the Fault ``find()`` returns, if any, in a way no frame keeps it: a frame of a
    traceback that holds its own exception makes a reference cycle, which would keep the
    whole address space (and its host memory) alive until the garbage collector runs."""
    fault = find()
    if fault is not None:
        try:
            raise fault
        finally:
            del fault


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
