"""Load time of real libraries: our loader on the simulator and on the host, beside glibc's
dlopen of the same file in a minimal C process, measured in the same run, printed as ratios.

The peer is a tiny C program this script compiles with gcc into a temporary directory: it
times ``dlopen(path, RTLD_NOW)`` with ``clock_gettime`` and prints the seconds, one fresh
process per load (a Python process's larger global scope would make glibc look slower than it
is). Our loads run in two worker processes started by this script (one per backend, each a
fresh interpreter that loads a few copies untimed first), so a host load never touches the
bench's own memory and no fork's copy-on-write faults are counted as loading. Every timed
load, ours and glibc's, reads a fresh copy of the library (copied to a new temporary path
first), so no cache keyed by path or inode helps anyone.

The clock is each process's CPU time by default (``CLOCK_PROCESS_CPUTIME_ID``;
``time.process_time`` for ours: user and kernel time, page faults included), so other work on
a shared machine does not count; ``--clock wall`` takes ``CLOCK_MONOTONIC`` /
``time.perf_counter`` instead.

Every load applies every relocation and loads no dependency our loader would not (glibc's
dlopen finds libc already loaded by the helper). ``--runs`` interleaved rounds: per round one
glibc load, one simulator load (onto a fresh AddressSpace, made before the clock starts), one
host load (unloaded after the clock stops); medians of times and of the per-round ratios.

    python bench/bench_load.py [--runs 21] [--libs libz libcrypto] [--clock cpu|wall]

Targets: libcrypto simulator <= 4x glibc, host <= 2.5x; libz simulator <= 8x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loader import load
from loader.libc import LibcMmap

LIBS = {
    "libz": "/usr/lib/x86_64-linux-gnu/libz.so.1",
    "libsqlite3": "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
    "libcrypto": "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
}

HELPER_C = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>
int main(int argc, char **argv) {
    struct timespec a, b;
    if (argc != 3) return 2;
    clockid_t clock = argv[2][0] == 'w' ? CLOCK_MONOTONIC : CLOCK_PROCESS_CPUTIME_ID;
    clock_gettime(clock, &a);
    void *h = dlopen(argv[1], RTLD_NOW);
    clock_gettime(clock, &b);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    printf("%.9f\n", (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


class Bench:
    """The temporary directory holding the compiled helper and the fresh copies."""

    def __init__(self, where: Path, clock: str) -> None:
        self.where, self.clock = where, clock
        self.helper = where / "dlopen_time"
        (where / "dlopen_time.c").write_text(HELPER_C)
        subprocess.run(["gcc", "-O2", "-o", str(self.helper), str(where / "dlopen_time.c"),
                        "-ldl"], check=True)
        self.copies = 0

    def fresh_copy(self, path: str) -> str:
        """A new copy of ``path`` under a name never used before (a new inode too)."""
        self.copies += 1
        dest = self.where / f"copy{self.copies}-{Path(path).name}"
        shutil.copyfile(path, dest)
        return str(dest)

    def glibc(self, path: str) -> float:
        """Seconds of dlopen(RTLD_NOW) of a fresh copy, in a fresh minimal C process."""
        copy = self.fresh_copy(path)
        done = subprocess.run([str(self.helper), copy, self.clock], capture_output=True,
                              text=True, check=True)
        os.unlink(copy)
        return float(done.stdout)

    def ours(self, worker: subprocess.Popen[str], path: str) -> float:
        """Seconds of our load of a fresh copy, in ``worker`` (``_serve``)."""
        copy = self.fresh_copy(path)
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(copy + "\n")
        worker.stdin.flush()
        took = float(worker.stdout.readline())
        os.unlink(copy)
        return took

    def worker(self, backend: str, path: str) -> subprocess.Popen[str]:
        """A worker process for ``backend``, warmed on three fresh copies of ``path``."""
        worker = subprocess.Popen([sys.executable, __file__, "--serve", backend,
                                   "--clock", self.clock], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        for _ in range(3):
            self.ours(worker, path)
        return worker


_CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _serve(backend: str, clock: Callable[[], float]) -> None:
    """The worker: for each path on stdin, load it on ``backend`` ("sim": a fresh
    AddressSpace each time; "host": LibcMmap, unloaded after) and print the seconds."""
    from vmsim import AddressSpace

    for line in sys.stdin:
        mm: Any = AddressSpace() if backend == "sim" else LibcMmap()
        t = clock()
        obj = load(line.rstrip("\n"), mm)
        took = clock() - t
        if backend == "host":
            obj.unload()
        del obj, mm    # the teardown happens here, off the clock (not at the next assignment)
        print(took, flush=True)


def interleaved(rounds: int, takers: dict[str, Callable[[], float]]) -> dict[str, float]:
    """``rounds`` rounds, each taking one time from every taker in turn ("glibc" first, so
    the machine's other work hits all alike): medians of the times (ms) and of the per-round
    ratios to glibc's."""
    times: dict[str, list[float]] = {name: [] for name in takers}
    for _ in range(rounds):
        for name, take in takers.items():
            times[name].append(take())
    med = statistics.median
    g = times["glibc"]
    out = {f"{name}_ms": med(t) * 1e3 for name, t in times.items()}
    out.update({f"{name}_ratio": med([b / a for a, b in zip(g, t, strict=True)])
                for name, t in times.items() if name != "glibc"})
    return out


def stop(workers: dict[str, subprocess.Popen[str]]) -> None:
    """Close the workers' input and wait for them."""
    for worker in workers.values():
        assert worker.stdin is not None
        worker.stdin.close()
        worker.wait()


def measure(bench: Bench, path: str, rounds: int) -> dict[str, float]:
    """Interleaved rounds of glibc, sim and host loads (``interleaved``)."""
    workers = {backend: bench.worker(backend, path) for backend in ("sim", "host")}
    try:
        return interleaved(rounds, {"glibc": lambda: bench.glibc(path),
                                    "sim": lambda: bench.ours(workers["sim"], path),
                                    "host": lambda: bench.ours(workers["host"], path)})
    finally:
        stop(workers)


def main() -> None:
    """Measure and print one line per library, then JSON of all figures."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--libs", nargs="+", default=["libz", "libcrypto"], choices=list(LIBS))
    ap.add_argument("--clock", default="cpu", choices=list(_CLOCKS))
    ap.add_argument("--serve", choices=["sim", "host"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, _CLOCKS[args.clock])
        return
    rows: dict[str, Any] = {}
    print(f"{'library':<12} {'glibc ms':>9} {'sim ms':>8} {'host ms':>8} {'sim/glibc':>10} "
          f"{'host/glibc':>11}")
    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        bench = Bench(Path(tmp), args.clock)
        for name in args.libs:
            row = rows[name] = measure(bench, LIBS[name], args.runs)
            print(f"{name:<12} {row['glibc_ms']:>9.3f} {row['sim_ms']:>8.2f} "
                  f"{row['host_ms']:>8.2f} {row['sim_ratio']:>9.2f}x {row['host_ratio']:>10.2f}x",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
