"""Code on vmsim.Process against bare Unicorn: libz's crc32 over a buffer, and the cost of one
``proc.call``, measured in the same run, printed as ratios.

The peer is Unicorn with its own flat memory (its default TLB, no hooks): every mapping of
the Process's space (libz and its closure as LinkMap loaded them, the buffer, the stack, the
trap page) copied byte for byte into ``mem_map`` regions at the same addresses, so both run
the same instructions on the same bytes. The Process runs with its default timeout (full
speed) and, as a second Process, with an instruction budget (Unicorn's ``count``, which
instruments every instruction); the peer is measured without and with such a count, so each
mode meets its like. Instructions per second: the instruction count of one crc32 (counted
once on the peer, block by block) over the medians of wall times, ``--runs`` interleaved
rounds.

    python bench/bench_cpu.py [--runs 7] [--mib 4] [--calls 2000]

Targets: the Process's crc32 >= 50% of bare Unicorn's instructions per second; proc.call's
overhead <= 200 us; proc.dlopen of libz with libc <= 100 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

import unicorn as uc
from unicorn import unicorn_const as ucc
from unicorn import x86_const as x86

import vmsim
from vmsim.fault import Fault

_PERMS = {"r": ucc.UC_PROT_READ, "w": ucc.UC_PROT_WRITE, "x": ucc.UC_PROT_EXEC}


def bare_copy(proc: vmsim.Process) -> Any:
    """A bare Unicorn holding a copy of every mapping of ``proc``'s space."""
    cpu = uc.Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
    for region in proc.space.maps():
        perms = sum(_PERMS[c] for c in region.perms[:3] if c in _PERMS)
        cpu.mem_map(region.start, region.end - region.start, perms)
        for page in range(region.start, region.end, 4096):
            try:
                cpu.mem_write(page, proc.space.peek(page, 4096))
            except Fault:
                pass  # past a file's end: the peer keeps zeros
    return cpu


def bare_call(cpu: Any, proc: vmsim.Process, addr: int, args: tuple[int, ...],
              count: int = 0) -> int:
    """``proc.call``'s System V call, on the bare copy (Unicorn counting ``count``
    instructions when non-zero: its counter is compiled into the blocks, so the blocks are
    translated again when it is switched on)."""
    if count:
        cpu.ctl_flush_tb()
    sp = proc.stack_top - 16
    cpu.mem_write(sp - 8, proc.trap.to_bytes(8, "little"))
    for reg, value in zip((x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDX), args,
                          strict=False):
        cpu.reg_write(reg, value)
    cpu.reg_write(x86.UC_X86_REG_RSP, sp - 8)
    cpu.emu_start(addr, proc.trap, count=count)
    value: int = cpu.reg_read(x86.UC_X86_REG_RAX)
    return value


def count_instructions(cpu: Any, proc: vmsim.Process, addr: int, args: tuple[int, ...]) -> int:
    """Instructions one call runs on the bare copy (each block's count, from its cache)."""
    total = [0]
    sizes: dict[int, int] = {}

    def block(engine: Any, start: int, _size: int, _data: Any) -> None:
        if start not in sizes:
            sizes[start] = engine.ctl_request_cache(start)[1]
        total[0] += sizes[start]

    cpu.ctl_flush_tb()  # hooks are compiled into blocks: translate again with this one
    hook = cpu.hook_add(ucc.UC_HOOK_BLOCK, block)
    bare_call(cpu, proc, addr, args)
    cpu.hook_del(hook)
    cpu.ctl_flush_tb()
    return total[0]


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dlopen_time(name: str) -> float:
    """Wall seconds of ``proc.dlopen(name)`` on a fresh Process."""
    with vmsim.Process() as fresh:
        return timed(lambda: fresh.dlopen(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    opts = parser.parse_args(argv)
    data = bytes((k * 7 + (k >> 11)) & 0xFF for k in range(opts.mib << 20))
    proc, counted = vmsim.Process(timeout=600.0), vmsim.Process(budget=10**10)
    crc32 = proc.dlsym(proc.dlopen("libz.so.1"), "crc32")
    buf = proc.alloc(data)
    assert counted.dlsym(counted.dlopen("libz.so.1"), "crc32") == crc32
    assert counted.alloc(data) == buf
    nop = proc.alloc(b"\xc3")
    proc.space.mprotect(nop, 4096, 5)
    args = (0, buf, len(data))
    assert proc.call(crc32, *args) == zlib.crc32(data)
    bare = bare_copy(proc)
    assert bare_call(bare, proc, crc32, args) == zlib.crc32(data)
    instructions = count_instructions(bare, proc, crc32, args)
    times: dict[str, list[float]] = {"proc": [], "proc+budget": [], "bare": [],
                                     "bare+count": [], "call": [], "bare call": [],
                                     "dlopen": []}
    for _ in range(opts.runs):
        times["dlopen"].append(dlopen_time("libz.so.1"))
        times["proc"].append(timed(lambda: proc.call(crc32, *args)))
        times["proc+budget"].append(timed(lambda: counted.call(crc32, *args)))
        times["bare"].append(timed(lambda: bare_call(bare, proc, crc32, args)))
        times["bare+count"].append(timed(lambda: bare_call(bare, proc, crc32, args, 10**10)))
        times["call"].append(timed(lambda: [proc.call(nop) for _ in range(opts.calls)])
                             / opts.calls)
        times["bare call"].append(timed(lambda: [bare_call(bare, proc, nop, ())
                                                 for _ in range(opts.calls)]) / opts.calls)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"crc32 of {opts.mib} MiB: {instructions:,} instructions, "
          f"{proc.stats.tlb_fills} TLB fills so far")
    for name in ("proc", "bare", "proc+budget", "bare+count"):
        print(f"  {name:11s} {med[name] * 1e3:8.1f} ms  {instructions / med[name] / 1e6:7.1f} "
              "M instructions/s")
    print(f"Process (timeout) / bare Unicorn, instructions per second: "
          f"{med['bare'] / med['proc']:.2f} (target >= 0.5)")
    print(f"Process (instruction budget) / bare Unicorn: {med['bare'] / med['proc+budget']:.2f}; "
          f"/ bare Unicorn counting instructions: {med['bare+count'] / med['proc+budget']:.2f}")
    print(f"proc.call overhead (a call of a lone ret): {med['call'] * 1e6:.1f} us "
          "(target <= 200 us); "
          f"bare emu_start: {med['bare call'] * 1e6:.1f} us; "
          f"ratio {med['call'] / med['bare call']:.1f}x")
    print(f"proc.dlopen('libz.so.1') with libc, on a fresh Process: {med['dlopen'] * 1e3:.1f} ms "
          "(target <= 100 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
