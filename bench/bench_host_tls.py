"""Benchmark: a thread_local access and a C++ throw in an object our loader loaded on the host,
against the same object loaded by glibc (dlopen), in one run.

Builds tests/hosttls_fixture/tlsfix.cpp with g++ (gnu and gnu2 TLS dialects) into a temp dir,
loads each twice into this process (ours, with ``loader.hosttls.HostTls``; glibc's, with
ctypes.CDLL), and prints per call (median of repeats, nanoseconds, ctypes' own call cost
included on both sides) and the ratio ours / glibc:
  - ``bump_counter``: one general-dynamic (or TLS descriptor) access to a thread_local;
  - ``throw_inside``: a std::runtime_error thrown and caught inside the library.
Ours goes through a Python callback on every access of our module (no native fast path),
so its TLS access is expected to cost microseconds.

Run: PYTHONPATH=. python bench/bench_host_tls.py  (a script, not a test)
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import loader
from loader.ehframe import register_eh_frame
from loader.elf import MemoryBytes, parse_image
from loader.hosttls import HostTls
from loader.libc import LibcMmap
from loader.tables import parse_tables

SOURCE = Path(__file__).parent.parent / "tests" / "hosttls_fixture" / "tlsfix.cpp"
CALLS, REPEATS = 20_000, 7


def per_call(fn: Callable[[], Any]) -> float:
    """Median nanoseconds per call of ``fn`` over ``REPEATS`` runs of ``CALLS`` calls."""
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        runs.append((time.perf_counter() - t0) / CALLS * 1e9)
    return statistics.median(runs)


def ours(path: Path, tls: HostTls) -> loader.LoadedObject:
    """``path`` loaded by our loader, its TLS in ``tls``, its .eh_frame registered."""
    image = parse_image(MemoryBytes(path.read_bytes()), tls.mm.page_size)
    layout = tls.add_module(image, tables=parse_tables(image))
    obj = loader.load(path, tls.mm, resolver=tls.resolver(layout), tls=layout)
    register_eh_frame(obj)
    return obj


def main() -> None:
    """Build, load, time, print."""
    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    tls = HostTls(LibcMmap())
    with tempfile.TemporaryDirectory() as where:
        for dialect, flags in (("gnu", []), ("gnu2", ["-mtls-dialect=gnu2"])):
            path = Path(where) / f"libtlsfix-{dialect}.so"
            subprocess.run(["g++", "-O1", "-fPIC", "-shared", *flags, "-o", str(path),
                            str(SOURCE)], check=True)
            obj, lib = ours(path, tls), ctypes.CDLL(str(path))
            for name, args in (("bump_counter", ()), ("throw_inside", (3,))):
                mine = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_int] * len(args))(
                    obj.symbol(name))
                theirs = getattr(lib, name)
                a, b = per_call(partial(mine, *args)), per_call(partial(theirs, *args))
                print(f"{dialect:5} {name:13} ours {a:8.0f} ns  glibc {b:8.0f} ns  "
                      f"ratio {a / b:5.1f}")


if __name__ == "__main__":
    main()
