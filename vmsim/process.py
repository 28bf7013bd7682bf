"""A simulated process: code runs on a CPU (``vmsim.cpu``) whose MMU is the simulator, with
the simulator as its kernel (``vmsim.syscalls``).

Part of ``vmsim``'s process layer, the top of it. A :class:`Process` owns an
:class:`~vmsim.AddressSpace` holding a stack (with a PROT_NONE guard page below it), a trap
page (``proc.call`` returns there) and whatever ``dlopen`` and ``alloc`` put in it. Every
access the code makes is translated by the space's MMU, so it sees the space as Linux would
show it to the program: page faults fill it on demand, copy-on-write copies, a denied access is
a :class:`~vmsim.Fault` with the instruction's address (``pc``).

Libraries are loaded by ``loader.LinkMap`` on the process's space, with the process as a
backend that runs code (``loader.mmap.code_runner``: its ``call``): IFUNC resolvers and init
functions run on this CPU, and a lazily bound PLT call reaches GOT[2]'s int3 page, a service
of the simulator (``Cpu.services``) that binds the slot through ``LinkMap.lazy_resolve`` and
goes on to the function. A symbol nobody defines ends the program as glibc's does: "symbol
lookup error" on stderr, exit status 127. The FS base is the LinkMap's thread pointer, so
%fs-relative TLS and the stack protector's %fs:0x28 read the thread area LinkMap built.

``exec`` runs a whole program instead (``vmsim.execve``): its PT_LOADs and its PT_INTERP
mapped as binfmt_elf maps them, the initial stack built on the process's stack, and the run
from the entry (glibc's own ld.so, for a dynamically linked program: it opens, reads and
maps libc through the syscall layer) until exit_group. No vDSO is mapped (glibc then makes
the real syscalls), so ld.so's own allocations come in another order than on Linux.

Known differences from a Linux process: a page-cache page is refreshed from its file when the
CPU's TLB is filled, not at every access, and a store by code to a shared file mapping stays
in the page cache (the file is not written; the syscalls open files read-only, so only a
mapping made from the host side can be one); everything not listed in ``vmsim.syscalls``
is -ENOSYS; one thread; signal dispositions are kept but no handler ever runs
(``vmsim.signals``: a fault ends the call, a signal the program sends itself acts by its
default action).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from loader.errors import ElfSymbolError
from vmsim.cpu import CPU_PAGE_SIZE, Cpu, Stop
from vmsim.fault import Stats
from vmsim.signals import Killed
from vmsim.space import AddressSpace
from vmsim.syscall_args import MAP_ANON, MAP_PRIVATE, PROT_EXEC, PROT_READ, PROT_WRITE
from vmsim.syscalls import Syscalls

if TYPE_CHECKING:
    from loader.linkmap import ImageObject, LinkMap
    from vmsim.execve import Loaded

__all__ = ["Exited", "Process", "ProcessStats"]

STACK_SIZE = 8 << 20
BRK_BASE = 0x5555_5600_0000
"""Where the program break starts until ``exec`` places it after the program."""
_HLT = b"\xf4"
_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_WORD = (1 << 64) - 1
_RED_ZONE = 128 + 64   # the System V red zone, and a margin: what a nested call must not touch
_CALLER_FRAME = 64
"""Stack left above a call's return address, as a real caller's frame would be: a callee may
read argument slots it was not given (libc's ``syscall`` always loads its seventh)."""
_START_ZEROED = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15", "fs_base", "gs_base")
"""The registers Linux's ELF_PLAT_INIT and start_thread leave zero at a program's entry
(rdx, the atexit function a static program's _start registers, among them)."""


class Exited(Exception):
    """The program called exit or exit_group during a ``call``: ``status`` (0-255)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the program exited with status {status}")
        self.status = status


class ProcessStats(NamedTuple):
    """A process's counters: ``tlb_fills`` (Unicorn's TLB misses), ``page_faults`` taken in
    them by kind (``demand``, ``cow``, ``fatal``), ``syscalls`` by name, ``enosys`` (the
    unimplemented ones by name) and ``memory``, the space's :class:`~vmsim.Stats`."""

    tlb_fills: int
    page_faults: dict[str, int]
    syscalls: dict[str, int]
    enosys: dict[str, int]
    memory: Stats


class Process:
    """An x86-64 process on the simulator: ``space`` its AddressSpace, ``stdout`` and
    ``stderr`` what it wrote to fds 1 and 2. One ``call`` stops with TimeoutError after
    ``timeout`` seconds (a watchdog thread: code runs at full speed) and, when ``budget`` is
    given, after ``budget`` instructions (exact and reproducible, but Unicorn then counts
    every instruction, which makes code run several times slower). A call that makes the
    space hold more than ``memory`` bytes of frames stops with MemoryError.

    The code runs at Unicorn's privilege level 0: privileged instructions (mov to a control
    register, wrmsr, hlt) act on the emulated CPU where Linux would send SIGSEGV (they reach
    nothing of the host; hlt halts until the timeout); in and out are SIGSEGV."""

    def __init__(self, *, budget: int | None = None, timeout: float = 10.0,
                 memory: int = 4 << 30, stack_size: int = STACK_SIZE) -> None:
        if budget is not None and budget <= 0:
            raise ValueError(f"budget={budget}: a positive instruction count, or None")
        self.space = AddressSpace(page_size=CPU_PAGE_SIZE)
        self.budget = budget
        self.timeout = timeout
        self.cpu = Cpu(self.space.mmu, memory // CPU_PAGE_SIZE)
        self.kernel = Syscalls(self.space, BRK_BASE)
        self.cpu.syscall = self.kernel
        self.exit_status: int | None = None
        self.linkmap: LinkMap | None = None
        self._nested_sp: int | None = None   # a service's call runs below the caller's stack
        self.lazy_binds = 0
        """How many times the lazy resolver (GOT[2]) was entered."""
        self.image: Loaded | None = None
        """What ``exec`` mapped and built (the program, its interpreter, the stack)."""
        page = CPU_PAGE_SIZE
        guard = self.space.kernel.mmap(0, stack_size + page, 0, MAP_PRIVATE | MAP_ANON, 0, -1)
        self.space.kernel.mprotect(guard + page, stack_size, PROT_READ | PROT_WRITE)
        self.stack_guard, self.stack_top = guard, guard + page + stack_size
        trap_page = self._anon(page, PROT_READ | PROT_WRITE)
        self.space.write(trap_page, _HLT * page)
        self.space.kernel.mprotect(trap_page, page, PROT_READ | PROT_EXEC)
        self.trap = trap_page + page // 2  # Unicorn fetches the bytes before its end address

    def _anon(self, length: int, prot: int) -> int:
        """A new private anonymous mapping of ``length`` bytes."""
        return self.space.kernel.mmap(0, length, prot, MAP_PRIVATE | MAP_ANON, 0, -1)

    @property
    def stdout(self) -> bytes:
        """What the program wrote to fd 1."""
        return bytes(self.kernel.stdout)

    @property
    def stderr(self) -> bytes:
        """What the program wrote to fd 2."""
        return bytes(self.kernel.stderr)

    @property
    def stats(self) -> ProcessStats:
        """The counters (see :class:`ProcessStats`)."""
        cpu = self.cpu.stats
        kinds = {k: cpu[f"page_faults.{k}"] for k in ("demand", "cow", "fatal")}
        return ProcessStats(cpu["tlb_fills"], kinds, dict(self.kernel.counts),
                            dict(self.kernel.enosys), self.space.stats)

    def alloc(self, data: bytes) -> int:
        """Copy ``data`` into new private anonymous memory (read-write); its address."""
        addr = self._anon(max(len(data), 1), PROT_READ | PROT_WRITE)
        if data:
            self.space.write(addr, data)
        return addr

    def call(self, addr: int, *args: int) -> int:
        """Call the function at ``addr`` as the System V ABI says, with integer or pointer
        ``args`` (the first six in registers, the rest on the stack), returning to the trap
        page; its rax (unsigned). Raises Fault on a fault or trap (``pc`` set), TimeoutError
        past the budget or timeout, MemoryError past ``memory``, :class:`Exited` when the
        program exits, :class:`~vmsim.signals.Killed` when it sends itself a signal that
        ends it (``abort``)."""
        if self.linkmap is not None and self.linkmap.thread is not None:
            self.cpu.set_reg("fs_base", self.linkmap.thread.tp)
        extra = [a & _WORD for a in args[len(_ARG_REGS):]]
        top = self.stack_top - _CALLER_FRAME if self._nested_sp is None else self._nested_sp
        sp = (top - 8 * len(extra)) & ~15
        frame = b"".join(a.to_bytes(8, "little") for a in [self.trap, *extra])
        self.space.write(sp - 8, frame)
        for reg, value in zip(_ARG_REGS, args, strict=False):
            self.cpu.set_reg(reg, value)
        self.cpu.set_reg("rsp", sp - 8)
        try:
            self.cpu.run(addr, self.trap, self.budget, self.timeout)
        except Killed:
            raise
        except Stop as stop:
            assert stop.status is not None
            self.exit_status = stop.status
            raise Exited(stop.status) from None
        return self.cpu.reg("rax")

    def dlopen(self, path: str | os.PathLike[str],
               bind: Literal["now", "lazy"] = "now") -> ImageObject:
        """Load ``path`` (a file or a soname) and its closure with ``loader.LinkMap`` into the
        process's space, their IFUNC resolvers and init functions run on this CPU (see the
        module docstring); its handle."""
        from loader.linkmap import LinkMap  # the process image layer sits above vmsim's core
        if self.linkmap is None:
            self.linkmap = LinkMap(_Running(self))
        handle = self.linkmap.dlopen(path, bind=bind)
        resolver = self.linkmap.lazy_resolver_address
        if resolver is not None:
            self.cpu.services[resolver] = self._lazy_binding
        if self.linkmap.thread is not None:
            self.cpu.set_reg("fs_base", self.linkmap.thread.tp)
        return handle

    def _lazy_binding(self) -> tuple[int, int]:
        """GOT[2]'s service: PLT0 pushed GOT[1] and the PLT entry the relocation's index;
        the LinkMap binds the slot (an IFUNC's resolver runs on this CPU, on the stack below
        the caller's, past its red zone); the run jumps to the function, the two words
        popped, the caller's return address on top as the PLT left it."""
        assert self.linkmap is not None
        sp = self.cpu.reg("rsp")
        got1, index = (int.from_bytes(self.space.read(sp + k, 8), "little") for k in (0, 8))
        self._nested_sp = (sp - _RED_ZONE) & ~15
        try:
            target = self.linkmap.lazy_resolve(got1, index)
        except ElfSymbolError as exc:   # glibc: "symbol lookup error", _exit(127)
            self.kernel.stderr += f"symbol lookup error: {exc}\n".encode()
            raise Stop(status=127) from exc
        finally:
            self._nested_sp = None
        self.lazy_binds += 1
        return target, 16

    def exec(self, path: str | os.PathLike[str], argv: list[str] | None = None,
             env: dict[str, str] | None = None) -> int:
        """execve(``path``, ``argv``, ``env``) as Linux's binfmt_elf does it (see
        ``vmsim.execve``: the program and its PT_INTERP mapped, the break just past the
        program, the initial stack with argv, envp and the auxiliary vector), then run from
        the entry (the interpreter's, when there is one) until the program exits; its exit
        status. ``argv`` defaults to ``[path]``. For a fresh Process (nothing dlopen'ed).
        Raises Fault on a fault (``pc`` set), Killed when the program's own signal ends it,
        TimeoutError past the budget or timeout, MemoryError past ``memory``, an ElfError
        kind for a file the loader refuses,
        OSError(E2BIG) when argv and env take more than a quarter of the stack."""
        from vmsim.execve import brk_start, load_program
        if self.linkmap is not None or self.image is not None:
            raise RuntimeError("exec needs a fresh Process")
        argv = [os.fspath(path)] if argv is None else list(argv)
        self.image = load_program(self.space, self.stack_top, path, argv, dict(env or {}),
                                  arg_max=(self.stack_top - self.stack_guard) // 4)
        self.kernel.exe = os.fspath(path)
        self.kernel.brk_base = self.kernel.brk = brk_start(self.image.program,
                                                           self.space.page_size)
        for reg in _START_ZEROED:
            self.cpu.set_reg(reg, 0)
        self.cpu.set_reg("rsp", self.image.stack.sp)
        try:
            self.cpu.run(self.image.start, self.trap, self.budget, self.timeout)
        except Killed:
            raise
        except Stop as stop:
            assert stop.status is not None
            self.exit_status = stop.status
            return stop.status
        raise RuntimeError("the program returned into the trap page")

    def dlsym(self, handle: ImageObject | None, name: str) -> int:
        """The address of ``name`` as ``dlsym(handle, name)`` finds it (KeyError if none)."""
        assert self.linkmap is not None, "dlsym before any dlopen"
        return self.linkmap.dlsym(handle, name)

    def close(self) -> None:
        """Close the program's host files and the space."""
        self.kernel.close_all()
        self.space.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Running:
    """The process's space as the loader's backend, with the capability to run code: IFUNC
    resolvers and init functions run on the process's CPU (``call``), not in the host."""

    runs_code = True

    def __init__(self, proc: Process) -> None:
        self.inner = proc.space
        self.call = proc.call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
