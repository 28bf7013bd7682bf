"""A whole closure: ``LinkMap.dlopen`` of libcurl (32 objects, about 12,000 symbol
relocations) on the simulator and on the host, beside glibc's dlopen of it in a minimal C
process, measured in the same run, printed as ratios.

The peer is bench_load.py's helper: a tiny C program (linked against libc only) that times
``dlopen(name, RTLD_NOW)`` with ``clock_gettime``, one fresh process per load, so glibc maps,
relocates and initialises the whole closure each time. Ours run in two worker processes (one
per backend, each a fresh interpreter warmed by three untimed loads): each request makes a
new ``LinkMap`` (on a fresh ``AddressSpace``, or on ``LibcMmap`` in this process, where the
process's own libc and friends are used in place) and times its ``dlopen``; the image is
unloaded off the clock. The host worker forks for each load, so every load starts from the
same process (nothing our previous load mapped is still there). The clock is CPU time by
default (as bench_load.py); ``--runs`` interleaved rounds, medians of times and ratios.

    python bench/bench_linkmap.py [--runs 11] [--library libcurl.so.4] [--clock cpu|wall]

Targets: simulator <= 5x glibc, host <= 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_load import _CLOCKS, Bench, interleaved, stop

from loader.libc import LibcMmap
from loader.linkmap import LinkMap


def _load_once(backend: str, name: str, clock: Callable[[], float]) -> float:
    """Seconds of one ``LinkMap.dlopen(name)`` on ``backend``, the image unloaded after."""
    from vmsim import AddressSpace

    lm = LinkMap(AddressSpace() if backend == "sim" else LibcMmap())
    t = clock()
    lm.dlopen(name)
    took = clock() - t
    lm.unload()
    return took


def _serve(backend: str, clock: Callable[[], float]) -> None:
    """The worker: for each name on stdin, print the seconds of one load (host: in a forked
    child, its figure sent back through a pipe)."""
    for line in sys.stdin:
        name = line.rstrip("\n")
        if backend == "sim":
            print(_load_once(backend, name, clock), flush=True)
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, repr(_load_once(backend, name, clock)).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as got:
            took = got.read()
        os.waitpid(pid, 0)
        print(took, flush=True)


def _worker(backend: str, clock: str, name: str) -> subprocess.Popen[str]:
    """A worker for ``backend``, warmed with three loads."""
    worker = subprocess.Popen([sys.executable, __file__, "--serve", backend, "--clock", clock],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        _ask(worker, name)
    return worker


def _ask(worker: subprocess.Popen[str], name: str) -> float:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(name + "\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def _glibc(bench: Bench, name: str) -> float:
    done = subprocess.run([str(bench.helper), name, bench.clock], capture_output=True,
                          text=True, check=True)
    return float(done.stdout)


def measure(bench: Bench, name: str, rounds: int) -> dict[str, float]:
    """Interleaved rounds: glibc, simulator, host (bench_load's ``interleaved``)."""
    workers = {b: _worker(b, bench.clock, name) for b in ("sim", "host")}
    try:
        return interleaved(rounds, {"glibc": lambda: _glibc(bench, name),
                                    "sim": lambda: _ask(workers["sim"], name),
                                    "host": lambda: _ask(workers["host"], name)})
    finally:
        stop(workers)


def main() -> None:
    """Measure and print one line, then its JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--library", default="libcurl.so.4")
    ap.add_argument("--clock", default="cpu", choices=list(_CLOCKS))
    ap.add_argument("--serve", choices=["sim", "host"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, _CLOCKS[args.clock])
        return
    with tempfile.TemporaryDirectory(prefix="bench_linkmap-") as tmp:
        row: dict[str, Any] = measure(Bench(Path(tmp), args.clock), args.library, args.runs)
    print(f"{args.library}: glibc {row['glibc_ms']:.2f} ms, simulator {row['sim_ms']:.1f} ms "
          f"({row['sim_ratio']:.1f}x), host {row['host_ms']:.1f} ms ({row['host_ratio']:.1f}x)")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
