"""Decode a big RELA table: pyelftools (the peer) beside loader.tables' numpy path, same run.

DESIGN.md: pyelftools takes about 130-240 ms for libcrypto's ~18k-entry .rela.dyn, numpy about
0.08 ms. Both decodes below produce every entry's offset, type, symbol and addend, and the
script checks they agree before timing.

    python bench/bench_tables.py [--lib /usr/lib/x86_64-linux-gnu/libcrypto.so.3] [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from elftools.elf.elffile import ELFFile

from loader.elf import parse_image
from loader.pages import HOST_PAGE_SIZE
from loader.tables import parse_tables


def with_pyelftools(path: str) -> list[tuple[int, int, int, int]]:
    """Every dynamic RELA entry through pyelftools' relocation objects."""
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(".rela.dyn")
        return [(r["r_offset"], r["r_info_type"], r["r_info_sym"], r["r_addend"])
                for r in section.iter_relocations()]


def with_numpy(data: bytes) -> Any:
    """The loader's own path: parse the header and program headers, find the tables through
    the dynamic tags, read them as numpy column views (the first table is DT_RELA)."""
    return parse_tables(parse_image(data, HOST_PAGE_SIZE)).relocs[0]


def median_seconds(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``runs`` calls of ``fn``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default="/usr/lib/x86_64-linux-gnu/libcrypto.so.3")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    data = open(args.lib, "rb").read()

    peer = with_pyelftools(args.lib)
    ours = with_numpy(data)
    mine = list(zip(ours.r_offset.tolist(), ours.r_type.tolist(), ours.r_sym.tolist(),
                    ours.r_addend.tolist(), strict=True))
    assert mine == peer, "the numpy decode disagrees with pyelftools"
    assert isinstance(ours.r_offset, np.ndarray)

    t_peer = median_seconds(lambda: with_pyelftools(args.lib), max(1, args.runs // 2))
    t_ours = median_seconds(lambda: with_numpy(data), args.runs * 20)
    print(f"{args.lib}: {len(peer)} RELA entries, decodes agree")
    print(f"  pyelftools            {t_peer * 1e3:9.2f} ms")
    print(f"  loader (numpy, whole parse_tables incl. symbols and hashes) "
          f"{t_ours * 1e3:9.3f} ms")
    print(f"  ratio pyelftools / ours: {t_peer / t_ours:.0f}x")


if __name__ == "__main__":
    main()
