"""The CPU: an x86-64 Unicorn engine whose MMU is the simulator's.

Part of ``vmsim``'s process layer (``vmsim.process`` runs code on it), above ``vmsim.mmu``.
Unicorn 2.1 runs in virtual-TLB mode: it walks no page table of its own; every miss of its
TLB calls :meth:`Cpu._fill`, which asks :meth:`vmsim.mmu.Mmu.translate` for the frame (taking
the simulator's page fault on the way: zero fill, copy-on-write, SIGBUS past a file's end) and
hands Unicorn the frame's physical address with the permissions its PTE gives. A translation
the simulator refuses stops the CPU; :meth:`Cpu.run` raises its :class:`~vmsim.fault.Fault`
with ``pc``, the address of the instruction that made the access.

Physical memory is the frame pool's array, frame ``f`` at physical address ``f * page_size``,
mapped into Unicorn once with ``mem_map_ptr``: the CPU touches nothing else, so code cannot
reach host memory. The pool may grow (``FramePool._grow``); the CPU holds a reference to the
array it mapped, so a growth copies the frames to a new host mapping instead of moving the old
one under Unicorn's feet (mremap). When the pool's array changed, the CPU stops at the next
TLB fill or syscall, maps the new array in place of the old (dropping its reference: the old
mapping is freed), flushes its TLB and translation cache, and resumes at the same instruction.

The MMU calls :meth:`Cpu.flush_tlb` (``Mmu.tlb_flushes``) whenever cached translations stop
holding: munmap, mprotect, a copy-on-write copy replacing a shared frame.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import unicorn as uc
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

from vmsim.fault import Access, Fault
from vmsim.mmu import Mmu
from vmsim.pagetable import PTE_NX, PTE_P, PTE_PKEY_SHIFT, PTE_W

__all__ = ["CPU_PAGE_SIZE", "WATCHDOG", "Cpu", "Stop", "Watchdog"]

CPU_PAGE_SIZE = 4096
"""The page size of Unicorn's x86-64 TLB: a Process's space must use it."""
_ACCESS = {ucc.UC_MEM_READ: Access.READ, ucc.UC_MEM_WRITE: Access.WRITE,
           ucc.UC_MEM_FETCH: Access.EXECUTE}
TCG_BUFFER = 64 << 20
"""Unicorn's buffer of translated code (its default is 1 GiB of address space per CPU)."""
_SCRATCH = 1 << 40
"""The physical address of the scratch pages of :meth:`Cpu._exact` (far above any frame)."""
_READ, _WRITE, _EXEC = int(ucc.UC_PROT_READ), int(ucc.UC_PROT_WRITE), int(ucc.UC_PROT_EXEC)
_TRAPS = {0: ("SIGFPE", "FPE_INTDIV"), 1: ("SIGTRAP", "TRAP_TRACE"),
          3: ("SIGTRAP", "SI_KERNEL"), 4: ("SIGSEGV", "SI_KERNEL"),
          6: ("SIGILL", "ILL_ILLOPN"), 13: ("SIGSEGV", "SI_KERNEL")}
"""x86 exception vectors as the kernel reports them to a user program (signal, si_code);
any other vector is a SIGSEGV with SI_KERNEL."""


Service = Callable[[], "tuple[int, int]"]
"""A kernel service behind an int3 (``Cpu.services``): called outside the run, it returns
(where the run goes on, how many bytes to pop off the stack first)."""


class _ServiceCall(Exception):
    """The run reached the int3 of a service at ``addr``."""

    def __init__(self, addr: int) -> None:
        super().__init__(f"service at {addr:#x}")
        self.addr = addr


class Stop(Exception):
    """Why the CPU stopped before its end address, when not for a fault: ``status`` of an
    exit (``exit``/``exit_group``), or ``moved`` when the frame pool's array changed (the
    run resumes by itself)."""

    def __init__(self, status: int | None = None, moved: bool = False) -> None:
        super().__init__(f"exit({status})" if status is not None else "frame pool moved")
        self.status = status
        self.moved = moved


def pte_perms(pte: int) -> int:
    """Unicorn's permissions for a PTE: what x86 hardware would let through without a page
    fault (present; readable unless an access-denying protection key; W; not NX)."""
    if not pte & PTE_P:
        return 0
    perms = 0 if (pte >> PTE_PKEY_SHIFT) & 0xF else _READ
    if pte & PTE_W:
        perms |= _WRITE
    if not pte & PTE_NX:
        perms |= _EXEC
    return perms


class Cpu:
    """An x86-64 CPU translating through ``mmu``; a run stops with MemoryError once the
    space holds more than ``frame_limit`` frames. ``syscall`` is called for each
    ``syscall`` instruction (the kernel's entry: it reads and writes the registers).
    ``stats``: ``tlb_fills`` and, taken in fills, ``page_faults`` by kind (``demand``:
    zero fill or a file's page, ``cow``: copy-on-write copies, ``fatal``: refused)."""

    def __init__(self, mmu: Mmu, frame_limit: int = 1 << 20) -> None:
        if mmu.page_size != CPU_PAGE_SIZE:
            raise ValueError(f"a CPU needs {CPU_PAGE_SIZE}-byte pages, not {mmu.page_size}")
        self.mmu = mmu
        self.frame_limit = frame_limit
        self.uc = uc.Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
        self.uc.ctl_set_tcg_buffer_size(TCG_BUFFER)  # before anything makes Unicorn set up
        self.uc.ctl_set_tlb_mode(ucc.UC_TLB_VIRTUAL)
        self.syscall: Callable[[Cpu], None] = lambda cpu: None
        self.services: dict[int, Service] = {}
        """int3 addresses that are calls into the simulator, not traps (the lazy resolver
        GOT[2] points at): the run stops there, the service runs (it may call code of the
        process itself), and the run goes on where it says."""
        self.stats: Counter[str] = Counter()
        self._stop: BaseException | None = None
        self._phys: npt.NDArray[np.uint8] | None = None  # held: see the module docstring
        self._remapping = False
        self._probing: int | None = None  # the page :meth:`_exact` watches
        self._timed_out = False
        self._interrupted = False
        self.uc.mem_map(_SCRATCH, 2 * CPU_PAGE_SIZE, ucc.UC_PROT_ALL)
        self.uc.hook_add(ucc.UC_HOOK_TLB_FILL, self._fill)
        self.uc.hook_add(ucc.UC_HOOK_INTR, self._interrupt)
        self.uc.hook_add(ucc.UC_HOOK_INSN, self._syscall, aux1=x86.UC_X86_INS_SYSCALL)
        for port_io in (x86.UC_X86_INS_IN, x86.UC_X86_INS_OUT):
            self.uc.hook_add(ucc.UC_HOOK_INSN, self._port_io, aux1=port_io)
        mmu.tlb_flushes.append(self.flush_tlb)

    # ---- registers

    def reg(self, name: str) -> int:
        """The register ``name`` ("rax", "rip", "fs_base", ...)."""
        value: int = self.uc.reg_read(_REGS[name])
        return value

    def set_reg(self, name: str, value: int) -> None:
        """Set the register ``name`` to ``value`` (modulo 2**64)."""
        self.uc.reg_write(_REGS[name], value & ((1 << 64) - 1))

    # ---- memory

    def flush_tlb(self) -> None:
        """Drop every cached translation (and the jump cache with them)."""
        self.uc.ctl(ucc.UC_CTL_TLB_FLUSH, ucc.UC_CTL_IO_WRITE)

    def _map_physical(self) -> None:
        """Map the frame pool's current array as physical memory, in place of the one mapped
        before (outside a run: Unicorn cannot remap under running code)."""
        data = self.mmu.pool.data
        if self._phys is data:
            return
        self._remapping = True  # uc_mem_unmap flushes through the fill hook
        try:
            if self._phys is not None:
                self.uc.mem_unmap(0, self._phys.nbytes)
            self.uc.mem_map_ptr(0, data.nbytes, ucc.UC_PROT_ALL, data.ctypes.data)
            self._phys = data
        finally:
            self._remapping = False
        self.flush_tlb()
        self.uc.ctl_flush_tb()

    def _moved(self) -> bool:
        """True when the pool's array is no longer the one mapped: the CPU must stop."""
        if self._phys is self.mmu.pool.data:
            return False
        self._stop = Stop(moved=True)
        return True

    def _out_of_memory(self) -> bool:
        """True when the frames in use pass ``frame_limit``: the CPU must stop (the OOM
        killer's part: a program touching memory in a loop cannot fill the host's)."""
        if self.mmu.pool.in_use <= self.frame_limit:
            return False
        self._stop = MemoryError(f"the process uses more than {self.frame_limit} frames")
        return True

    def _fill(self, _uc: Any, va: int, kind: int, entry: Any, _data: Any) -> bool:
        """Unicorn's TLB miss at page ``va``: translate through the simulator's MMU."""
        if self._remapping:
            entry.paddr, entry.perms = va, ucc.UC_PROT_NONE
            return True
        if self._probing is not None and kind != ucc.UC_MEM_FETCH:
            other = va != self._probing  # the faulting page, or another
            entry.paddr, entry.perms = _SCRATCH + other * CPU_PAGE_SIZE, _READ | _WRITE
            return True
        self.stats["tlb_fills"] += 1
        kernel = self.mmu.kernel
        faults, cows = getattr(kernel, "faults", 0), getattr(kernel, "cows", 0)
        try:
            frame = self.mmu.translate(va, _ACCESS.get(kind, Access.READ))
        except Fault as fault:
            self.stats["page_faults.fatal"] += 1
            self._stop = fault.with_traceback(None)  # its frames would hold it
            return False
        cow = getattr(kernel, "cows", 0) - cows
        self.stats["page_faults.cow"] += cow
        self.stats["page_faults.demand"] += getattr(kernel, "faults", 0) - faults - cow
        if self._moved() or self._out_of_memory():
            return False
        entry.paddr = frame * CPU_PAGE_SIZE
        entry.perms = pte_perms(self.mmu.pte(va))
        return True

    def _fresh_blocks(self) -> None:
        """Drop cached translations and translated blocks (hooks are compiled into them)."""
        self.flush_tlb()
        self.uc.ctl_flush_tb()

    def _exact(self, pc: int, fault: Fault) -> Fault:
        """``fault`` (found by a fill, which is told only the page) at the first byte the
        instruction at ``pc`` touches in that page, as Linux's si_addr. A fetch: ``pc`` when
        the instruction starts in the page. Data: the instruction runs once more from a
        saved context, every data page translated to a scratch page and its accesses
        watched; then the context, the TLB and the translated blocks are restored. (The
        watch is told physical addresses: the faulting page's scratch page is the first of
        two, every other page's the second.)"""
        page = fault.addr & -CPU_PAGE_SIZE
        if fault.access == "x":
            return fault.at(max(page, pc))
        hits: list[int] = []

        def watch(engine: Any, _kind: int, paddr: int, size: int, _value: int,
                  _data: Any) -> bool:
            offset = paddr - _SCRATCH
            if not hits and 0 <= offset < 2 * CPU_PAGE_SIZE:
                if offset < CPU_PAGE_SIZE:
                    hits.append(page + offset)
                elif offset + size > 2 * CPU_PAGE_SIZE:  # from the page before, into it
                    hits.append(page)
            if hits:
                engine.emu_stop()
            return True

        saved = self.uc.context_save()
        hook = self.uc.hook_add(ucc.UC_HOOK_MEM_READ | ucc.UC_HOOK_MEM_WRITE, watch)
        self._probing = page
        self._fresh_blocks()
        try:
            self.uc.emu_start(pc, 0, count=1)
        except uc.UcError:
            pass  # the scratch page's bytes may make it trap: its accesses are what counts
        finally:
            self._probing = None
            self.uc.hook_del(hook)
            self.uc.context_restore(saved)
            self._fresh_blocks()
        return fault.at(hits[0]) if hits else fault

    # ---- traps

    def _interrupt(self, _uc: Any, vector: int, _data: Any) -> None:
        """An exception the CPU raised: a page fault the fill refused (already recorded), or
        a trap the kernel would turn into a signal."""
        if self._stop is None and self._probing is None:
            pc = self.reg("rip")
            if vector == 3 and pc - 1 in self.services:
                self._stop = _ServiceCall(pc - 1)
            else:
                signal, code = _TRAPS.get(vector, ("SIGSEGV", "SI_KERNEL"))
                self._stop = Fault(pc, Access.EXECUTE, signal, code, pc)
        self.uc.emu_stop()

    def _port_io(self, _uc: Any, _port: int, _size: int, *_rest: Any) -> int:
        """in/out: no I/O permission in a user process (#GP: SIGSEGV, SI_KERNEL)."""
        if self._stop is None:
            pc = self.reg("rip")
            self._stop = Fault(pc, Access.EXECUTE, "SIGSEGV", "SI_KERNEL", pc)
        self.uc.emu_stop()
        return 0

    def _syscall(self, _uc: Any, _data: Any) -> None:
        """The ``syscall`` instruction: the kernel's entry."""
        try:
            self.syscall(self)
        except Stop as stop:
            self._stop = stop
        if self._stop is not None or self._moved():
            self.uc.emu_stop()

    # ---- running

    @property
    def stopping(self) -> bool:
        """The run passed its time limit or was interrupted (Ctrl-C) and stops at the next
        chance: a syscall that waits asks this to stop waiting."""
        return self._timed_out or self._interrupted

    def _time_up(self, interrupted: bool) -> None:
        """The watchdog's stop: the run passed its time limit, or Ctrl-C came."""
        if interrupted:
            self._interrupted = True
        else:
            self._timed_out = True
        self.uc.emu_stop()

    def _halted(self, pc: int) -> bool:
        """The run stopped just past a ``hlt`` (Unicorn ends a run there; Linux sends a user
        program that runs one SIGSEGV), not at its limit. (A run stopped by an instruction
        budget right after an instruction whose last byte is 0xf4 would read as one too.)"""
        try:
            return bytes(self.mmu.load(pc - 1, 1, Access.EXECUTE)) == b"\xf4"
        except Fault:
            return False

    def _serve(self, addr: int) -> int:
        """Run the service at ``addr`` with this run's registers saved around it (it may run
        code of the process); pop what it says; where the run goes on."""
        saved = self.uc.context_save()
        target, pop = self.services[addr]()
        self.uc.context_restore(saved)
        self.set_reg("rsp", self.reg("rsp") + pop)
        return target

    def _start(self, pc: int, end: int, budget: int | None, timeout: float) -> uc.UcError | None:
        """One emu_start under the watchdog; the error Unicorn stopped with, if any. In the
        main thread a Ctrl-C during it stops the CPU: SIGINT's handler is ours (it records
        the interrupt instead of raising inside one of Unicorn's callbacks) and its wakeup
        fd the watchdog's (Python runs no handler while Unicorn runs code without hooks).
        A process that ignores SIGINT keeps ignoring it."""
        main = threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        if main:
            handler = signal.signal(signal.SIGINT, self._on_interrupt)
            wakeup = signal.set_wakeup_fd(WATCHDOG.wakeup_fd, warn_on_full_buffer=False)
        token = WATCHDOG.arm(self._time_up, timeout)
        try:
            self.uc.emu_start(pc, end, count=budget or 0)
            return None
        except uc.UcError as err:
            return err
        finally:
            WATCHDOG.disarm(token)
            if main:
                signal.set_wakeup_fd(wakeup)
                signal.signal(signal.SIGINT, handler)

    def _on_interrupt(self, _signum: int, _frame: Any) -> None:
        """SIGINT while the CPU runs: stop it; :meth:`run` raises KeyboardInterrupt."""
        self._time_up(True)

    def run(self, pc: int, end: int, budget: int | None, timeout: float | None = None) -> None:
        """Run from ``pc`` until the CPU reaches ``end``. Raises the Fault of a refused
        access or a trap (``pc`` set), :class:`Stop` when the program exits, MemoryError past
        the frame limit, TimeoutError
        after ``budget`` instructions (Unicorn counts each: several times slower) or
        ``timeout`` seconds (a watchdog thread: full speed) without reaching ``end``, and
        KeyboardInterrupt on Ctrl-C. Both limits count from the last
        resume: after the frame pool grew (at most once per doubling)
        or a service ran (at most once per lazy slot)."""
        while True:
            self._map_physical()
            self._stop = None
            self._timed_out = self._interrupted = False
            error = self._start(pc, end, budget, math.inf if timeout is None else timeout)
            if self._interrupted:
                raise KeyboardInterrupt
            stop, self._stop = self._stop, None
            pc = self.reg("rip")
            if isinstance(stop, Stop) and stop.moved:
                continue
            if isinstance(stop, _ServiceCall):
                pc = self._serve(stop.addr)
                continue
            if isinstance(stop, Fault):
                raise stop if stop.pc is not None else self._exact(pc, stop).on_cpu(pc)
            if stop is not None:
                raise stop
            if error is not None:
                raise _error_fault(error, pc)
            if pc != end and not self._timed_out and self._halted(pc):   # hlt: #GP in user mode
                raise Fault(pc - 1, Access.EXECUTE, "SIGSEGV", "SI_KERNEL", pc - 1)
            if pc != end:
                limit = f"{budget} instructions" if budget else f"{timeout} s"
                raise TimeoutError(f"no return after {limit} (at {pc:#x})")
            return


class Watchdog:
    """Stops runs that pass their deadline, or on Ctrl-C: one thread for every CPU, started at
    the first :meth:`arm`, sleeping until the nearest deadline (Unicorn runs without Python's
    lock held, so the thread gets to run). It sleeps on a pipe: :meth:`arm` writes a zero
    byte to wake it, and a running main thread makes the pipe Python's signal wakeup fd, so a
    Ctrl-C writes SIGINT's number there even while the main thread runs no Python code. A
    deadline passed is ``stop(False)``, a Ctrl-C ``stop(True)`` for every armed run. It holds
    a run's ``stop`` only while the run is armed. (Unicorn's own ``timeout`` starts and joins
    a thread per run: a quarter of a millisecond a call.)"""

    def __init__(self) -> None:
        self._tokens = itertools.count()
        self._start_afresh()
        os.register_at_fork(after_in_child=self._start_afresh)

    def _start_afresh(self) -> None:
        """No runs, no thread yet, a pipe of its own (also in a forked child, which has not
        the parent's thread and must not read the parent's pipe)."""
        for inherited in (getattr(self, "_wake_read", None), getattr(self, "wakeup_fd", None)):
            if inherited is not None:
                os.close(inherited)
        self._lock = threading.Lock()
        self._runs: dict[int, tuple[float, Callable[[bool], None]]] = {}
        self._thread: threading.Thread | None = None
        self._sleeping_until = math.inf   # the deadline the thread sleeps toward
        self._wake_read, self.wakeup_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def arm(self, stop: Callable[[bool], None], seconds: float) -> int:
        """Call ``stop`` unless :meth:`disarm` comes within ``seconds``; the run's token."""
        with self._lock:
            token = next(self._tokens)
            deadline = time.monotonic() + seconds
            self._runs[token] = (deadline, stop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="vmsim-cpu-watchdog")
                self._thread.start()
            sooner = deadline < self._sleeping_until
        if sooner:     # the thread sleeps past this deadline: wake it to sleep less
            os.write(self.wakeup_fd, b"\0")
        return token

    def disarm(self, token: int) -> None:
        """The run ``token`` ended."""
        with self._lock:
            self._runs.pop(token, None)

    def _watch(self) -> None:
        """The thread: sleep until the nearest deadline or a byte on the pipe; stop the runs
        past their deadline, or all of them when the bytes hold SIGINT."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._stop_until(now, interrupted=False)
                nearest = min((d for d, _ in self._runs.values()), default=math.inf)
                self._sleeping_until = nearest
            select.select([self._wake_read], [], [], None if nearest == math.inf
                          else max(nearest - now, 0.0))
            try:
                woken = os.read(self._wake_read, 4096)
            except BlockingIOError:
                continue
            if signal.SIGINT in woken:
                with self._lock:
                    self._stop_until(math.inf, interrupted=True)

    def _stop_until(self, until: float, *, interrupted: bool) -> None:
        """Stop (and forget) each armed run whose deadline is ``until`` or earlier."""
        for token, (deadline, stop) in list(self._runs.items()):
            if deadline <= until:
                del self._runs[token]
                stop(interrupted)


WATCHDOG = Watchdog()


def _error_fault(error: uc.UcError, pc: int) -> Fault:
    """The Fault for an error Unicorn stopped with on its own."""
    if error.errno == ucc.UC_ERR_INSN_INVALID:
        return Fault(pc, Access.EXECUTE, "SIGILL", "ILL_ILLOPN", pc)
    return Fault(pc, Access.EXECUTE, "SIGSEGV", "SI_KERNEL", pc)


_REGS = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "eflags", "fs_base", "gs_base")}
