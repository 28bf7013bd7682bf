"""Benchmark: the simulator (vmsim.AddressSpace) against the real kernel, in one run.

Prints medians of repeats and their ratios:
  1. an mmap+munmap pair of one anonymous page with 0, 1,000 and 10,000 other regions
     mapped: the simulator's mmap_anonymous+munmap against a raw mmap+munmap syscall pair
     through ctypes in this process (libc's own functions, no wrapper), medians of
     interleaved rounds; target: simulator <= 2x the kernel, and flat as regions grow;
  2. bulk write and read of 100 MiB of anonymous memory (first touch and warm; target:
     >= 2 GiB/s, with the ratio to a numpy copy of the same size);
  3. memory used: a 64 TiB PROT_NONE reservation, and a 100 MiB private file mapping before
     and after touching it (tracemalloc of the Python heap and numpy, plus the simulator's
     frame count).

Run: python bench/bench_mm.py  (a script, not a test); --pairs prints section 1 only
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from loader.mmap import MapFlags, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import AddressSpace

P = HOST_PAGE_SIZE
R, RW = ProtFlags.PROT_READ, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
PRIV = MapFlags.MAP_PRIVATE
MIB = 1 << 20


def median_time(fn: Callable[[], object], number: int, repeats: int = 7) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs of ``number`` calls."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t0) / number)
    return statistics.median(runs)


def add_regions(mm: AddressSpace, count: int) -> tuple[int, int]:
    """Make ``count`` separate regions: a read-write span with every other page read-only.
    Returns the span to unmap afterwards."""
    if not count:
        return 0, 0
    length = 2 * count * P
    base = mm.mmap_anonymous(0, length, RW, PRIV)
    for k in range(count):
        mm.mprotect(base + 2 * k * P, P, R)
    return base, length


def raw_libc() -> Callable[[], None]:
    """A raw mmap+munmap syscall pair of one anonymous page through ctypes (no wrapper)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    prot, flags = int(RW), int(PRIV | MapFlags.MAP_ANONYMOUS)

    def pair() -> None:
        libc.munmap(libc.mmap(None, P, prot, flags, -1, 0), P)
    return pair


def interleaved(fns: list[Callable[[], object]], number: int, rounds: int) -> list[float]:
    """Median seconds per call of each of ``fns``, timed in alternating rounds of
    ``number`` calls (so that the machine's load falls on all of them alike)."""
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, times in zip(fns, runs, strict=True):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number)
    return [statistics.median(times) for times in runs]


def bench_pairs() -> None:
    print("mmap+munmap of one anonymous page (medians of 15 interleaved rounds of 2000 pairs)")
    print(f"  {'regions':>8} {'kernel us':>10} {'sim us':>8} {'sim/kernel':>10}")
    kernel = raw_libc()
    for count in (0, 1000, 10000):
        space = AddressSpace()
        add_regions(space, count)

        def pair(mm: AddressSpace = space) -> None:
            mm.munmap(mm.mmap_anonymous(0, P, RW, PRIV), P)

        t_kernel, t_sim = interleaved([kernel, pair], 2000, 15)
        print(f"  {count:>8} {t_kernel * 1e6:>10.2f} {t_sim * 1e6:>8.2f} "
              f"{t_sim / t_kernel:>10.2f}")


def bench_bulk() -> None:
    size = 100 * MIB
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    dst = np.empty(size, dtype=np.uint8)
    src = np.frombuffer(data, dtype=np.uint8)
    t_copy = median_time(lambda: np.copyto(dst, src), 1, 5)
    space = AddressSpace()
    addr = space.mmap_anonymous(0, size, RW, PRIV)
    t0 = time.perf_counter()
    space.write(addr, data)
    t_first = time.perf_counter() - t0
    t_write = median_time(lambda: space.write(addr, data), 1, 5)
    t_read = median_time(lambda: space.read(addr, size), 1, 5)
    t_into = median_time(lambda: space.read_into(addr, dst), 1, 5)
    t_tobytes = median_time(src.tobytes, 1, 5)
    assert space.read(addr, size) == data
    gib = size / (1 << 30)
    print("bulk 100 MiB anonymous (median of 5)")
    print(f"  numpy copy into a warm array   {gib / t_copy:6.2f} GiB/s")
    print(f"  numpy tobytes (a new bytes)    {gib / t_tobytes:6.2f} GiB/s")
    for name, t in (("sim write, first touch", t_first), ("sim write, warm", t_write),
                    ("sim read (new bytes)", t_read), ("sim read_into (warm array)", t_into)):
        print(f"  {name:<30} {gib / t:6.2f} GiB/s  ({t_copy / t:.2f}x numpy copy, "
              f"{t_tobytes / t:.2f}x tobytes)")


def heap_delta(fn: Callable[[], object]) -> int:
    """Bytes tracemalloc sees allocated (net) while ``fn`` runs."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before


def bench_memory() -> None:
    print("memory")
    space = AddressSpace()
    got: list[int] = []
    used = heap_delta(lambda: got.append(space.mmap_reserve(None, 64 << 40, True)))
    print(f"  64 TiB PROT_NONE reservation: {used / 1024:.1f} KiB heap, "
          f"{space.stats.frames} frames, {space.stats.page_tables} page tables")
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(100 * MIB)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        space = AddressSpace()
        used = heap_delta(lambda: got.append(space.mmap(None, 100 * MIB, RW, PRIV, 0, fd).addr))
        print(f"  100 MiB private file, mapped: {used / 1024:.1f} KiB heap, "
              f"{space.stats.frames} frames")
        addr = got[-1]
        used = heap_delta(lambda: space.read(addr, 100 * MIB))
        print(f"  ... after reading it all:    {used / MIB:.1f} MiB heap, "
              f"{space.stats.frames} frames ({space.stats.frames * P / MIB:.0f} MiB, page cache),"
              f" cow copies {space.stats.cow_copies}")
        used = heap_delta(lambda: space.write(addr, bytes(100 * MIB)))
        print(f"  ... after writing it all:    {used / MIB:.1f} MiB heap, "
              f"{space.stats.frames} frames ({space.stats.frames * P / MIB:.0f} MiB), "
              f"cow copies {space.stats.cow_copies}")
        os.close(fd)


def main() -> int:
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, page {P}")
    bench_pairs()
    if "--pairs" in sys.argv[1:]:
        return 0
    bench_bulk()
    bench_memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
