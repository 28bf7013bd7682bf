"""Load one file on the host and on another backend at the same address, and compare.

Part of the ``loader`` layer (imports ``loader.pipeline``, ``loader.isolate``, ``loader.libc``; the
other backend is passed in, so nothing here imports ``vmsim``). The host side runs in forked
children (a loader bug there kills a child, not the caller). Both sides bind imports with the
same ``StubResolver`` at the same extern address, so their bytes can be equal.

Procedure (:func:`compare_backends`):

1. A first host child loads anywhere and reports the sizes: the span, the extern mapping, the
   alignment the loader wants (and, for an ET_EXEC, its fixed address).
2. This process reserves a fresh range for span + extern (PROT_NONE, MAP_NORESERVE: address
   space only, no memory). The kernel chose it, so it is free here; it stays this process's
   until both loads are done, so nothing this process allocates meanwhile (unpickling, the
   other backend's pages) can take it. Reserving the base the first child happened to choose
   would not do: once the child is gone, this process's next large allocation gets exactly
   that address from the same top-down allocator.
3. The other backend loads at the reserved base B, extern mapping at E = B + span; its page
   hashes are kept (not its bytes).
4. A second host child loads at B with extern at E. It inherits the reservation and hands it
   to the loader in place (MAP_FIXED over the placeholder, never a munmap that would open a
   window for the child's own allocations). It compares its page hashes with the other
   side's and sends back the bytes of only the pages that differ (at most ``MAX_DIFF_PAGES``).

Memory: hashes for every page, bytes for at most ``MAX_DIFF_PAGES`` pages per side. A host child
killed by a signal, past its memory bound or its time bound raises :class:`LoadDied` naming the
backend and how it died.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

from loader.libc import LibcMmap
from loader.mmap import MapFlags, Mapping, Mmap, ProtFlags
from loader.outcome import Outcome
from loader.pages import HOST_PAGE_SIZE, page_round_up
from loader.pipeline import LoadedObject, load
from loader.symbols import StubResolver
from vmsim.fuzz.isolate import OverBound, run_isolated

__all__ = ["MAX_DIFF_PAGES", "Comparison", "LoadDied", "compare_backends", "host_outcome",
           "run_host"]

MAX_DIFF_PAGES = 64
"""At most this many differing pages have their bytes kept (per side) to show the first
differing word; the others are reported by hash only."""

HOST_TIMEOUT = 120.0
"""Seconds a host child of ``compare_backends`` may run (a load of libc takes well under 1)."""

HOST_MAX_RSS = 1 << 30
"""Bytes a host child may add to what it inherited before it is killed (OverBound)."""


class LoadDied(RuntimeError):
    """A load ended without an answer: its forked child was killed by a signal, went past its
    memory or time bound (``how`` says which), or the backend faulted. ``backend`` names it."""

    def __init__(self, backend: str, source: object, how: str) -> None:
        super().__init__(f"the {backend} load of {_shown(source)} died: {how}")
        self.backend, self.how = backend, how

    def __reduce__(self) -> tuple[type[LoadDied], tuple[str, str, str]]:
        return (LoadDied, (self.backend, "", self.how))


class Comparison(NamedTuple):
    """Both outcomes and their readable differences (empty: equal)."""

    base: int
    host: Outcome
    other: Outcome
    differences: list[str]


class _Sizes(NamedTuple):
    """What the first host load tells about the layout a second load needs."""

    span: int
    extern: int
    align: int
    fixed_at: int | None


def _shown(source: object) -> str:
    """A source for a message: the path, or ``<N bytes>`` for an image given as bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return str(source)


def run_host(fn: Any, *args: Any, source: object, timeout: float | None = None,
             max_rss: int | None = None) -> Any:
    """``fn(*args)`` in a supervised forked child (``loader.isolate.run_isolated``); its value.

    ``timeout`` and ``max_rss`` default to HOST_TIMEOUT and HOST_MAX_RSS. Raises
    LoadDied("libc", source, how) when the child is killed by a signal, passes ``max_rss`` or
    ``timeout``; exceptions the child raised are re-raised here.
    """
    timeout = HOST_TIMEOUT if timeout is None else timeout
    max_rss = HOST_MAX_RSS if max_rss is None else max_rss
    try:
        status, value = run_isolated(fn, *args, timeout=timeout, max_rss=max_rss)
    except OverBound as exc:
        raise LoadDied("libc", source, f"past its memory bound of {exc.limit >> 20} MiB "
                       "(killed)") from None
    except TimeoutError:
        raise LoadDied("libc", source, f"still running after {timeout:g} s (killed)") from None
    if status != "ok":
        raise LoadDied("libc", source, f"killed by {status}")
    return value


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

    Raises LoadDied naming how the child died (signal, memory or time bound).
    """
    start, ext, outcome = run_host(_host_child, source, base, extern, keep_bytes,
                                   source=source)
    return int(start), ext, outcome


def _sizes_child(source: Any) -> _Sizes:
    """In a child: load anywhere and measure the span, the extern mapping and the alignment."""
    obj = load(source, LibcMmap(), resolver=StubResolver())
    ext = obj.relocations.extern_range
    plan = obj.plan
    return _Sizes(obj.span[1] - obj.span[0], 0 if ext is None else ext[1] - ext[0],
                  plan.align, obj.span[0] if plan.fixed else None)


class _Placeholder:
    """A range of address space held PROT_NONE, MAP_NORESERVE (no memory behind it)."""

    def __init__(self, sizes: _Sizes) -> None:
        self.host = LibcMmap()
        total = page_round_up(sizes.span, HOST_PAGE_SIZE) + sizes.extern
        flags = MapFlags.MAP_PRIVATE | MapFlags.MAP_NORESERVE
        if sizes.fixed_at is not None:
            self.start = self.host.mmap_anonymous(sizes.fixed_at, total, ProtFlags.PROT_NONE,
                                                  flags | MapFlags.MAP_FIXED_NOREPLACE)
            self.held = (self.start, self.start + total)
            self.base = self.start
        else:
            extra = max(sizes.align - HOST_PAGE_SIZE, 0)
            self.start = self.host.mmap_anonymous(0, total + extra, ProtFlags.PROT_NONE,
                                                  flags)
            self.base = page_round_up(self.start, max(sizes.align, HOST_PAGE_SIZE))
            self.held = (self.base, self.base + total)
        self.length = self.held[1] - self.start
        self.extern = self.base + page_round_up(sizes.span, HOST_PAGE_SIZE)

    def release(self) -> None:
        """Give the range back (this process's copy; a child's copy went with the child)."""
        self.host.munmap(self.start, self.length)


class _HandedOver(LibcMmap):
    """LibcMmap in the second host child: a call for an exact range inside the inherited
    placeholder replaces it in place (MAP_FIXED) instead of being moved (a hint) or refused
    (MAP_FIXED_NOREPLACE). The caller's trace shows the calls as the loader made them."""

    def __init__(self, held: tuple[int, int]) -> None:
        self._held = [held]

    def _take(self, addr: int | None, length: int) -> bool:
        """True (and that part no longer held) when [addr, addr+length) is held."""
        if addr is None:
            return False
        for i, (lo, hi) in enumerate(self._held):
            if lo <= addr and addr + length <= hi:
                self._held[i: i + 1] = [r for r in ((lo, addr), (addr + length, hi))
                                        if r[0] < r[1]]
                return True
        return False

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """As LibcMmap (PROT_NONE for a file, PROT_WRITE for copies), at ``addr`` exactly
        when the placeholder holds it."""
        if not self._take(addr, length):
            return super().mmap_reserve(addr, length, use_file)
        prot = ProtFlags.PROT_NONE if use_file else ProtFlags.PROT_WRITE
        assert addr is not None
        return self.mmap_anonymous(addr, length, prot, MapFlags.MAP_PRIVATE | MapFlags.MAP_FIXED)

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """As LibcMmap; MAP_FIXED_NOREPLACE into the placeholder becomes MAP_FIXED."""
        if flags & MapFlags.MAP_FIXED_NOREPLACE and self._take(addr, length):
            flags = (flags & ~MapFlags.MAP_FIXED_NOREPLACE) | MapFlags.MAP_FIXED
        return super().mmap(addr, length, prot, flags, offset, fd)


def _pages_of(obj: LoadedObject, offsets: list[int]) -> dict[int, bytes]:
    """The bytes of the pages at ``offsets`` from the span start (readable pages only)."""
    page = obj.plan.page_size
    return {off: obj.mm.inner.read(obj.span[0] + off, page) for off in offsets}


def _differing(mine: Outcome, theirs: Outcome, page: int) -> list[int]:
    """Offsets of pages both read but hashed differently: every one holding an IRELATIVE or
    IFUNC slot (their bytes show whether only the slots differ, which is expected) and the
    first MAX_DIFF_PAGES others."""
    both = sorted(set(mine.pages) & set(theirs.pages))
    differ = [off for off in both if mine.pages[off] != theirs.pages[off]]
    slots = {p - p % page for p, _ in mine.irelative + theirs.irelative}
    return ([off for off in differ if off in slots]
            + [off for off in differ if off not in slots][:MAX_DIFF_PAGES])


def _second_host_child(source: Any, place: _Placeholder, other: Outcome) -> Outcome:
    """In a child: load at the placeholder; the outcome with bytes of the differing pages."""
    mm = _HandedOver(place.held)
    obj = load(source, mm, resolver=StubResolver(extern_addr=place.extern), base=place.base)
    mine = obj.outcome()
    differ = _differing(mine, other, obj.plan.page_size)
    return dataclasses.replace(mine, raw=_pages_of(obj, differ))


def compare_backends(source: str | os.PathLike[str] | bytes, other: Mmap, *,
                     timeout: float | None = None, max_rss: int | None = None) -> Comparison:
    """Load ``source`` on the host and on ``other`` at one base; compare the outcomes.

    Raises LoadDied when a host child dies (signal, ``max_rss``, ``timeout``: by default
    HOST_MAX_RSS and HOST_TIMEOUT), and what a load raises (ElfError, MmapError, the
    backend's own faults) otherwise.
    """
    sizes: _Sizes = run_host(_sizes_child, source, source=source, timeout=timeout,
                             max_rss=max_rss)
    place = _Placeholder(sizes)
    try:
        obj = load(source, other, resolver=StubResolver(extern_addr=place.extern),
                   base=place.base)
        theirs = obj.outcome()
        host: Outcome = run_host(_second_host_child, source, place, theirs, source=source,
                                 timeout=timeout, max_rss=max_rss)
    finally:
        place.release()
    assert host.raw is not None
    theirs = dataclasses.replace(theirs, raw=_pages_of(obj, sorted(host.raw)))
    return Comparison(place.base, host, theirs, host.diff(theirs))
