"""Load one file on the host and on another backend at the same address, and compare.

Part of the ``loader`` layer (imports ``loader.pipeline``, ``loader.isolate``, ``loader.libc``; the
other backend is passed in, so nothing here imports ``vmsim``). The host side runs in forked
children (a loader bug there kills a child, not the caller). Both sides bind imports with the
same ``StubResolver`` at the same extern address, so their bytes can be equal.

Procedure: a first host child loads anywhere to find a free base B and extern address E; a
second host child and then the other backend load at exactly B with the extern area at E.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.mmap import Mmap
from loader.outcome import Outcome
from loader.pipeline import load
from loader.symbols import StubResolver

__all__ = ["Comparison", "compare_backends", "host_outcome"]


class Comparison(NamedTuple):
    """Both outcomes and their readable differences (empty: equal)."""

    base: int
    host: Outcome
    other: Outcome
    differences: list[str]


def _host_child(source: Any, base: int | None, extern: int | None, keep: bool
                ) -> tuple[int, int | None, Outcome]:
    """In a child: load on the host with stubs; (span start, extern start, outcome)."""
    obj = load(source, LibcMmap(), resolver=StubResolver(extern_addr=extern), base=base)
    ext = obj.relocations.extern_range
    return obj.span[0], None if ext is None else ext[0], obj.outcome(keep_bytes=keep)


def host_outcome(source: str | os.PathLike[str] | bytes, base: int | None = None,
                 extern: int | None = None, *, keep_bytes: bool = False
                 ) -> tuple[int, int | None, Outcome]:
    """Load on the host in a forked child; returns (span start, extern start, outcome).

    Raises RuntimeError naming the signal when the child dies.
    """
    status, value = run_isolated(_host_child, source, base, extern, keep_bytes)
    if status != "ok":
        raise RuntimeError(f"the host load of {source!s} died with {status}")
    start, ext, outcome = value
    return int(start), ext, outcome


def compare_backends(source: str | os.PathLike[str] | bytes, other: Mmap) -> Comparison:
    """Load ``source`` on the host and on ``other`` at the same base; compare outcomes."""
    base, extern, _ = host_outcome(source)
    _, _, host = host_outcome(source, base, extern, keep_bytes=True)
    obj = load(source, other, resolver=StubResolver(extern_addr=extern), base=base)
    mine = obj.outcome(keep_bytes=True)
    return Comparison(base, host, mine, host.diff(mine))
