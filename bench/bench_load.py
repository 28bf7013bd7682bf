"""Load time of real libraries: our loader on the simulator and on the host, beside glibc's
dlopen of the same file in a minimal C process, measured in the same run, printed as ratios.

The peer is a tiny C program this script compiles with gcc into a temporary directory: it
times ``dlopen(path, RTLD_NOW)`` with ``clock_gettime(CLOCK_MONOTONIC)`` and prints the
seconds. One fresh process per load (a Python process's larger global scope would make glibc
look slower than it is). Every timed load, ours and glibc's, reads a fresh copy of the library
(copied to a new temporary path first), so no cache keyed by path or inode helps anyone.

Every load applies every relocation and loads no dependency our loader would not (glibc's
dlopen finds libc already loaded by the helper). ``--runs`` interleaved rounds: per round one
glibc load, one simulator load (fresh AddressSpace), one host load (in a forked child);
medians of times and of the per-round ratios.

    python bench/bench_load.py [--runs 21] [--libs libz libcrypto]

Targets (issue 10): libcrypto simulator <= 4x glibc, host <= 2.5x; libz simulator <= 8x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from loader import load
from loader.isolate import run_isolated
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
    if (argc != 2) return 2;
    clock_gettime(CLOCK_MONOTONIC, &a);
    void *h = dlopen(argv[1], RTLD_NOW);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    printf("%.9f\n", (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


class Bench:
    """The temporary directory holding the compiled helper and the fresh copies."""

    def __init__(self, where: Path) -> None:
        self.where = where
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
        done = subprocess.run([str(self.helper), copy], capture_output=True, text=True,
                              check=True)
        os.unlink(copy)
        return float(done.stdout)

    def sim(self, path: str) -> float:
        """Seconds of our load of a fresh copy onto a fresh simulator (made before timing)."""
        from vmsim import AddressSpace

        copy = self.fresh_copy(path)
        mm = AddressSpace()
        t = time.perf_counter()
        load(copy, mm)
        took = time.perf_counter() - t
        os.unlink(copy)
        return took

    def host(self, path: str) -> float:
        """Seconds of our load of a fresh copy on the host backend, in a forked child (which
        first loads another fresh copy, untimed: the fork's copy-on-write faults on Python's
        own heap are not the loader's cost)."""
        warm, copy = self.fresh_copy(path), self.fresh_copy(path)
        status, value = run_isolated(_host_load, warm, copy, timeout=300, max_rss=2 << 30)
        os.unlink(warm)
        os.unlink(copy)
        if status != "ok":
            raise RuntimeError(f"host load of {path} died with {status}")
        return float(value)


def _host_load(warm: str, path: str) -> float:
    """In the forked child: load ``warm`` untimed, then the seconds of loading ``path`` on
    the host backend."""
    mm = LibcMmap()
    load(warm, mm).unload()
    t = time.perf_counter()
    obj = load(path, mm)
    took = time.perf_counter() - t
    obj.unload()
    return took


def measure(bench: Bench, path: str, rounds: int) -> dict[str, float]:
    """Interleaved rounds (glibc, sim, host each round, so the machine's other work hits all
    three alike); medians of the times and of the per-round ratios."""
    bench.sim(path)                       # warm: imports, page cache
    bench.host(path)
    g: list[float] = []
    s: list[float] = []
    h: list[float] = []
    for _ in range(rounds):
        g.append(bench.glibc(path))
        s.append(bench.sim(path))
        h.append(bench.host(path))
    med = statistics.median
    return {"glibc_ms": med(g) * 1e3, "sim_ms": med(s) * 1e3, "host_ms": med(h) * 1e3,
            "sim_ratio": med([b / a for a, b in zip(g, s, strict=True)]),
            "host_ratio": med([b / a for a, b in zip(g, h, strict=True)])}


def main() -> None:
    """Measure and print one line per library, then JSON of all figures."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--libs", nargs="+", default=["libz", "libcrypto"], choices=list(LIBS))
    args = ap.parse_args()
    rows: dict[str, Any] = {}
    print(f"{'library':<12} {'glibc ms':>9} {'sim ms':>8} {'host ms':>8} {'sim/glibc':>10} "
          f"{'host/glibc':>11}")
    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        bench = Bench(Path(tmp))
        for name in args.libs:
            row = rows[name] = measure(bench, LIBS[name], args.runs)
            print(f"{name:<12} {row['glibc_ms']:>9.3f} {row['sim_ms']:>8.2f} "
                  f"{row['host_ms']:>8.2f} {row['sim_ratio']:>9.2f}x {row['host_ratio']:>10.2f}x",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
