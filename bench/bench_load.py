"""Load time of real libraries: our loader on the simulator and on the host, beside glibc's
dlopen of the same file in a fresh process, measured in the same run, printed as ratios.

Every load applies every relocation and loads no dependency (glibc's dlopen finds libc
already loaded, so it loads none either). --runs interleaved rounds (glibc in a fresh process,
then 3 host loads in a forked child, then 3 simulator loads); medians of times and of the
per-round ratios.

    python bench/bench_load.py [--runs 15] [--libs libz libsqlite3 libcrypto]

Targets (DESIGN.md) on libcrypto: simulator <= 5x glibc, host <= 3x glibc.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from loader import load
from loader.libc import LibcMmap
from vmsim.fuzz.isolate import run_isolated

LIBS = {
    "libz": "/usr/lib/x86_64-linux-gnu/libz.so.1",
    "libsqlite3": "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
    "libcrypto": "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
}

GLIBC_PROBE = """
import ctypes, sys, time
t = time.perf_counter()
ctypes.CDLL(sys.argv[1])
print(time.perf_counter() - t)
"""


def glibc_dlopen(path: str) -> float:
    """Seconds of one ctypes.CDLL (dlopen, RTLD_NOW as ctypes asks) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", GLIBC_PROBE, path], capture_output=True,
                          text=True, check=True)
    return float(done.stdout)


def _host_loads(path: str, runs: int) -> float:
    """In a forked child: median seconds of load (all relocations) on the host backend."""
    mm = LibcMmap()
    load(path, mm).unload()            # warm: imports, page cache
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        obj = load(path, mm)
        times.append(time.perf_counter() - t)
        obj.unload()
    return statistics.median(times)


def host(path: str, runs: int) -> float:
    """Median seconds on the host backend (measured in a forked child)."""
    status, value = run_isolated(_host_loads, path, runs, timeout=300)
    if status != "ok":
        raise RuntimeError(f"host load of {path} died with {status}")
    return float(value)


def sim(path: str, runs: int) -> float | None:
    """Median seconds on a fresh simulator each time; None without vmsim.AddressSpace."""
    import vmsim

    cls: Any = getattr(vmsim, "AddressSpace", None)
    if cls is None:
        return None
    load(path, cls())
    times = []
    for _ in range(runs):
        mm = cls()
        t = time.perf_counter()
        load(path, mm)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(path: str, rounds: int) -> dict[str, float | None]:
    """Interleaved rounds (glibc, host, sim each round, so load from the other work on the
    machine hits all three alike); medians of the times and of the per-round ratios."""
    g, h, s, hr, sr = [], [], [], [], []
    for _ in range(rounds):
        gt, ht, st = glibc_dlopen(path), host(path, 3), sim(path, 3)
        g.append(gt)
        h.append(ht)
        hr.append(ht / gt)
        if st is not None:
            s.append(st)
            sr.append(st / gt)
    med = statistics.median
    return {"glibc_ms": med(g) * 1e3, "host_ms": med(h) * 1e3,
            "sim_ms": med(s) * 1e3 if s else None, "host_ratio": med(hr),
            "sim_ratio": med(sr) if sr else None}


def main() -> None:
    """Measure and print one line per library, then JSON of all figures."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    args = ap.parse_args()
    rows = {}
    print(f"{'library':<12} {'glibc ms':>9} {'host ms':>8} {'sim ms':>8} {'host/glibc':>11} "
          f"{'sim/glibc':>10}")
    for name in args.libs:
        row = rows[name] = measure(LIBS[name], args.runs)
        sim_ms = "n/a" if row["sim_ms"] is None else f"{row['sim_ms']:.2f}"
        sim_ratio = "n/a" if row["sim_ratio"] is None else f"{row['sim_ratio']:.2f}x"
        print(f"{name:<12} {row['glibc_ms']:>9.2f} {row['host_ms']:>8.2f} {sim_ms:>8} "
              f"{row['host_ratio']:>10.2f}x {sim_ratio:>10}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
