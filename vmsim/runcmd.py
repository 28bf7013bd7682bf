"""``vmsim run [OPTIONS] PROGRAM [ARG ...]``: a program run in a simulated process.

Part of the command layer. The program is exec'ed in a :class:`vmsim.Process` (Unicorn as the
CPU, vmsim as its MMU and kernel; a dynamically linked program through this machine's own
ld.so, on the emulated CPU), its output is written out when it stops, and this command exits
as a shell reports a child: the program's exit status, or 128 + the signal's number when it
faulted. The fault is named with the instruction's address and where that lies (the file
and offset of its mapping), the way a core dump would be read.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from loader.mmap import Region

__all__ = ["RUN_HELP", "add_run", "cmd_run"]

RUN_HELP = """\
Run PROGRAM with ARGs in a simulated process: an x86-64 CPU (Unicorn) whose memory is vmsim's
simulated address space and whose kernel is vmsim's syscall layer. A dynamically linked
program runs through this machine's own ld.so, on the emulated CPU. Its stdout and stderr are
captured and written out when it stops. Host files are read-only to it; the syscalls vmsim
does not serve return ENOSYS (--stats counts them).

The exit status is the program's, or 128 + N when it was stopped by signal N (a fault: the
faulting instruction's address and mapping are named on stderr), or 124 past --timeout.
Options go before PROGRAM: everything after it is the program's.

examples:
  vmsim run /usr/bin/true
  vmsim run --stats /usr/bin/echo hello          page faults, TLB fills and syscalls after
  vmsim run --clean-env --env LANG=C ./a.out x   only LANG=C in its environment
"""

TIMED_OUT = 124
"""The exit status past --timeout (as timeout(1))."""


def add_run(verbs: Any) -> None:
    """The run verb."""
    rn = verbs.add_parser("run", help="run a program in a simulated process (Unicorn on "
                          "vmsim's memory and kernel)", description=RUN_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    rn.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", type=_assignment,
                    help="set a variable in the program's environment (repeatable)")
    rn.add_argument("--clean-env", action="store_true",
                    help="start from an empty environment instead of this one")
    rn.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                    help="stop the program after this long (default 60)")
    rn.add_argument("--stats", action="store_true",
                    help="print the process's counters on stderr when it stops")
    rn.add_argument("path", metavar="PROGRAM", help="an x86-64 ELF program")
    rn.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG",
                    help="the program's arguments")
    rn.set_defaults(func=cmd_run)


def _assignment(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` as (name, value); an argparse error otherwise."""
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _environment(args: argparse.Namespace) -> dict[str, str]:
    """The program's environment: this one (or none, --clean-env) with each --env set."""
    env = {} if args.clean_env else dict(os.environ)
    env.update(args.env)
    return env


def cmd_run(args: argparse.Namespace) -> int:
    """Exec the program in a new Process, write its output, say how it stopped; the exit
    status as a shell reports it."""
    from vmsim import Fault, Killed
    from vmsim.process import Process

    env = _environment(args)
    with Process(timeout=args.timeout) as proc:
        try:
            status = proc.exec(args.path, argv=[args.path, *args.args], env=env)
        except Fault as fault:
            status = 128 + signal.Signals[fault.signal].value
            _tell(f"{args.path}: {fault}{_where(proc.space.maps(), fault.pc)}")
        except Killed as killed:
            status = 128 + killed.signum
            _tell(f"{args.path}: killed by {killed.signal} (its own kill, tgkill or abort)")
        except TimeoutError:
            status = TIMED_OUT
            _tell(f"{args.path}: still running after {args.timeout:g} s (--timeout): stopped")
        finally:
            _write(sys.stdout, proc.stdout)
            _write(sys.stderr, proc.stderr)
        if args.stats:
            _print_stats(proc)
    return status


def _write(stream: Any, data: bytes) -> None:
    """The program's bytes onto ``stream`` as they are (a text stream without a byte buffer
    gets them decoded, undecodable bytes kept as surrogates)."""
    stream.flush()
    if hasattr(stream, "buffer"):
        stream.buffer.write(data)
        stream.buffer.flush()
    else:
        stream.write(data.decode("utf-8", "surrogateescape"))


def _tell(message: str) -> None:
    """One line on stderr, after the program's own output."""
    print(f"vmsim: {message}", file=sys.stderr, flush=True)


def _where(regions: list[Region], pc: int | None) -> str:
    """" in FILE+OFFSET" (or the region's name) for the mapping holding ``pc``."""
    if pc is None:
        return ""
    for r in regions:
        if r.start <= pc < r.end:
            if not r.path or r.path.startswith("["):
                return f" in {r.path or 'anonymous memory'}"
            return f" in {r.path}+{pc - r.start + r.offset:#x}"
    return " (pc outside every mapping)"


def _print_stats(proc: Any) -> None:
    """The process's counters, a few lines on stderr."""
    st = proc.stats
    faults = ", ".join(f"{k} {v}" for k, v in st.page_faults.items())
    calls = ", ".join(f"{k} {v}" for k, v in sorted(st.syscalls.items(), key=lambda kv: -kv[1]))
    unserved = ", ".join(f"{k} {v}" for k, v in st.enosys.items())
    lines = [f"TLB fills {st.tlb_fills}; page faults: {faults}",
             f"syscalls: {calls or 'none'}", f"not served (ENOSYS): {unserved or 'none'}"]
    for line in lines:
        _tell(line)
