"""Fuzzing a loader: the properties, a checking backend wrapper, and the ``vmsim fuzz`` campaign.

Place in the layers: the top, beside ``vmsim.cli`` (which dispatches ``vmsim fuzz`` here); it
uses ``loader`` (the loader under test), ``loader.strategies`` (the ELF images),
``loader.libc``/``loader.isolate`` (the host, in forked children) and the simulator.

The properties, each a plain function that raises :class:`Violation` (an AssertionError) or lets
the loader's own exception through, so hypothesis can shrink a failure to a small example:

1. :func:`check_valid_load`: a valid image loads; symbols, relocated words and every byte of
   every segment are as the ELF writer predicts; nothing is left mapped after ``unload``.
   With :func:`check_same_on_both` the host (in a forked child) and another backend load
   it at the same address with equal outcomes.
2. :func:`check_malformed_load`: a corrupted image either loads or raises ``ElfError``, never
   anything else, and leaves no mapping behind.
3. :class:`CheckingMmap` (used by both): the loader never maps, unmaps or protects outside
   what it reserved itself.
4. ... and never writes to a page it has not made writable (the simulator would fault; the
   wrapper says so on any backend, before the host would crash).
5. :func:`check_plan_predicts_map`: the plan alone (and, independently, the program headers
   with glibc's RELRO rounding) predicts the final map, page by page.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import dataclasses
import errno
import faulthandler
import fcntl
import gc
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import loader
from loader.elfwriter import PT_GNU_RELRO, ElfImage
from loader.isolate import rss_bytes
from loader.mmap import MapFlags, Mapping, Mmap, ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE, page_round_down, page_round_up
from vmsim.arguments import FUZZ_SECONDS, Bounded, OneLineParser

__all__ = [
    "BOUND_CLASSES",
    "CampaignStats",
    "CheckingMmap",
    "Finding",
    "Violation",
    "check_malformed_load",
    "check_plan_predicts_map",
    "check_same_on_both",
    "check_valid_load",
    "failure_class",
    "expected_page_perms",
    "main",
    "run_campaign",
    "shrink_finding",
]

_FIXED = MapFlags.MAP_FIXED | MapFlags.MAP_FIXED_NOREPLACE


class Violation(AssertionError):
    """A property does not hold: the message says which, where and what was seen."""


# --------------------------------------------------------------------------------------------
# Property 3 and 4: the checking wrapper.


class _Intervals:
    """Disjoint half-open ranges, each with a value; ``set`` overwrites a range."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.items: list[tuple[int, int, Any]] = []

    def set(self, lo: int, hi: int, value: Any) -> None:
        """Give ``[lo, hi)`` the value ``value`` (None removes it), splitting neighbours."""
        kept: list[tuple[int, int, Any]] = []
        for a, b, v in self.items:
            if b <= lo or a >= hi:
                kept.append((a, b, v))
                continue
            if a < lo:
                kept.append((a, lo, v))
            if b > hi:
                kept.append((hi, b, v))
        if value is not None:
            kept.append((lo, hi, value))
        kept.sort()
        self.items = kept
        self.starts = [a for a, _b, _v in kept]

    def covers(self, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` lies wholly inside the ranges."""
        at = lo
        i = max(0, bisect.bisect_right(self.starts, at) - 1)
        while at < hi and i < len(self.items):
            a, b, _v = self.items[i]
            if a > at:
                return False
            at = max(at, b)
            i += 1
        return at >= hi

    def values(self, lo: int, hi: int) -> list[tuple[int, int, Any]]:
        """The ranges overlapping ``[lo, hi)`` (clipped), with their values."""
        return [(max(a, lo), min(b, hi), v) for a, b, v in self.items if a < hi and b > lo]


@dataclass
class CheckingMmap:
    """An ``Mmap`` wrapper that proves two properties of whatever drives it:

    * every fixed-address mmap, every munmap and mprotect lies inside ranges it obtained
      itself (from ``mmap_reserve`` or an mmap without a fixed address);
    * every write lands on pages that its own calls left writable.

    A breach raises :class:`Violation` before the call reaches ``inner``. ``owned`` lists the
    ranges obtained, ``prots`` what the calls left mapped there and with which protection;
    :meth:`leftovers` says what of that is still mapped in ``inner``.
    """

    inner: Mmap
    owned: _Intervals = field(default_factory=_Intervals)
    prots: _Intervals = field(default_factory=_Intervals)

    @property
    def page_size(self) -> int:
        """The wrapped backend's page size."""
        return int(getattr(self.inner, "page_size", HOST_PAGE_SIZE))

    def _span(self, addr: int, length: int) -> tuple[int, int]:
        """``[addr, addr + length)`` rounded out to pages."""
        page = self.page_size
        return page_round_down(addr, page), page_round_up(addr + length, page)

    def _inside(self, op: str, addr: int, length: int) -> None:
        """Violation unless ``[addr, addr+length)`` lies in ranges this wrapper handed out."""
        lo, hi = self._span(addr, length)
        if not self.owned.covers(lo, hi):
            raise Violation(f"{op}({addr:#x}, {length:#x}) outside the loader's reservation "
                            f"({self._owned_text()})")

    def _owned_text(self) -> str:
        return ", ".join(f"{a:#x}-{b:#x}" for a, b, _v in self.owned.items) or "nothing"

    def _obtained(self, addr: int, length: int, prot: ProtFlags) -> None:
        lo, hi = self._span(addr, length)
        self.owned.set(lo, hi, True)
        self.prots.set(lo, hi, prot)

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """Check a fixed mapping lies inside; a free one becomes owned."""
        fixed = bool(flags & _FIXED)
        if fixed:
            self._inside("mmap", addr or 0, length)
        got = self.inner.mmap(addr, length, prot, flags, offset, fd)
        writable = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
        actual = prot | writable if got.need_copy else prot
        if fixed:
            lo, hi = self._span(got.addr, length)
            self.prots.set(lo, hi, actual)
        else:
            self._obtained(got.addr, length, actual)
        return got

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """Check it lies inside (with MAP_FIXED) and record its protection."""
        if flags & _FIXED:
            self._inside("mmap_anonymous", addr, length)
        got = self.inner.mmap_anonymous(addr, length, prot, flags)
        if flags & _FIXED:
            self.prots.set(*self._span(got, length), prot)
        else:
            self._obtained(got, length, prot)
        return got

    def munmap(self, addr: int, length: int) -> None:
        """Check it lies inside; the pages become unmapped (still owned)."""
        self._inside("munmap", addr, length)
        self.inner.munmap(addr, length)
        self.prots.set(*self._span(addr, length), None)

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """Check it lies inside and record the new protection."""
        if length == 0:
            self.inner.mprotect(addr, length, prot)
            return
        self._inside("mprotect", addr, length)
        self.inner.mprotect(addr, length, prot)
        self.prots.set(*self._span(addr, length), prot)

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """A reservation: the range becomes owned, PROT_NONE (or writable without a file,
        when the backend's reservation is; the wrapper asks ``maps`` which)."""
        got = self.inner.mmap_reserve(addr, length, use_file)
        prot = ProtFlags.PROT_NONE
        for region in self.inner.maps():
            if region.start <= got < region.end:
                prot = region.prot
        self._obtained(got, length, prot)
        return got

    def _writable(self, addr: int, length: int) -> None:
        """Violation unless every page of ``[addr, addr+length)`` was left writable."""
        lo, hi = self._span(addr, max(length, 1))
        if not self.owned.covers(lo, hi):
            raise Violation(f"write of {length:#x} bytes at {addr:#x} outside the loader's "
                            f"reservation ({self._owned_text()})")
        if not self.prots.covers(lo, hi):
            raise Violation(f"write of {length:#x} bytes at {addr:#x}: the loader unmapped "
                            "(part of) it")
        for a, _b, prot in self.prots.values(lo, hi):
            if not prot & ProtFlags.PROT_WRITE:
                raise Violation(f"write of {length:#x} bytes at {addr:#x}: page {a:#x} is "
                                f"{ProtFlags(prot).rwx} (never made writable)")

    def read(self, addr: int, n: int) -> bytes:
        """Forward (reads change nothing; the backend checks them)."""
        return self.inner.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        """Check the pages are writable, then forward."""
        self._writable(addr, len(data))
        self.inner.write(addr, data)

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Check the page of every word is writable, then forward."""
        if len(addrs):
            page = self.page_size
            pages = np.unique(np.asarray(addrs, dtype=np.uint64) // np.uint64(page))
            ends = np.asarray(addrs, dtype=np.uint64) + np.uint64(7)
            pages = np.union1d(pages, np.unique(ends // np.uint64(page)))
            for p in pages.tolist():
                self._writable(int(p) * page, 1)
        self.inner.write_words(addrs, values)

    def maps(self) -> list[Region]:
        """Forward."""
        return self.inner.maps()

    def leftovers(self) -> list[Region]:
        """The inner backend's mappings overlapping ranges the loader mapped and never
        unmapped. (Ranges it did unmap are not looked at: on the host, this process's own
        allocator may already have reused them.)"""
        return [r for r in self.inner.maps()
                if any(a < r.end and r.start < b for a, b, _v in self.prots.items)]


# --------------------------------------------------------------------------------------------
# Properties 1, 2 and 5.


def expected_page_perms(image: ElfImage, page_size: int) -> list[str]:
    """The final perms of every page of the image's span, from its program headers alone:
    each PT_LOAD's pages with its flags, holes ``---p``, RELRO ``r--p`` with both ends rounded
    down as glibc does. Independent of the loader's own plan."""
    loads = image.load_segments
    vmin = page_round_down(int(loads["p_vaddr"].min()), page_size)
    vmax = page_round_up(int((loads["p_vaddr"] + loads["p_memsz"]).max()), page_size)
    perms = ["---p"] * ((vmax - vmin) // page_size)
    for ph in loads:
        if not int(ph["p_memsz"]):
            continue  # an empty PT_LOAD maps nothing (glibc skips it too)
        flags = int(ph["p_flags"])
        text = ("r" if flags & 4 else "-") + ("w" if flags & 2 else "-") + \
            ("x" if flags & 1 else "-") + "p"
        lo = page_round_down(int(ph["p_vaddr"]), page_size)
        hi = page_round_up(int(ph["p_vaddr"] + ph["p_memsz"]), page_size)
        for va in range(lo, hi, page_size):
            perms[(va - vmin) // page_size] = text
    relro = image.phdrs[image.phdrs["p_type"] == PT_GNU_RELRO]
    if len(relro):
        lo = page_round_down(int(relro["p_vaddr"][0]), page_size)
        hi = page_round_down(int(relro["p_vaddr"][0] + relro["p_memsz"][0]), page_size)
        for va in range(lo, hi, page_size):
            perms[(va - vmin) // page_size] = "r--p"
    return perms


def _final_perms(obj: loader.LoadedObject, mm: Mmap) -> list[str]:
    """The perms of every page of ``obj``'s span as ``mm`` reports them (``---p`` where
    nothing is mapped)."""
    page = obj.plan.page_size
    start, end = obj.span
    perms = ["---p"] * ((end - start) // page)
    for r in mm.maps():
        lo, hi = max(r.start, start), min(r.end, end)
        for va in range(lo, hi, page):
            perms[(va - start) // page] = r.perms
    return perms


def check_plan_predicts_map(obj: loader.LoadedObject, image: ElfImage, mm: Mmap) -> None:
    """Property 5: the final per-page perms of the span (as ``mm`` reports them) equal what
    the plan predicts and what the program headers predict (:func:`expected_page_perms`)."""
    page = obj.plan.page_size
    seen = _final_perms(obj, mm)
    planned = [p.rwx + "p" for p in obj.plan.page_prots()]
    expected = expected_page_perms(image, page)
    for name, want in (("the plan", planned), ("the program headers", expected)):
        if seen != want:
            bad = [i for i, (a, b) in enumerate(zip(seen, want, strict=False)) if a != b]
            first = bad[0] if bad else min(len(seen), len(want))
            raise Violation(f"final map differs from {name} at page +{first * page:#x}: "
                            f"{seen[first] if first < len(seen) else 'none'} != "
                            f"{want[first] if first < len(want) else 'none'} "
                            f"({len(bad)} pages differ; span {len(seen)} vs {len(want)} pages)")


def _expected_segment_bytes(image: ElfImage, index: int, bias: int) -> bytes:
    """User segment ``index`` as it must be in memory: file bytes, zeros for .bss, every
    predicted relocation word in place."""
    seg = image.spec.segments[index]
    out = bytearray(seg.data + bytes(seg.bss))
    vaddr = image.segment_vaddr(index)
    for va, delta in image.expected_words().items():
        if vaddr <= va < vaddr + seg.memsz:
            out[va - vaddr:va - vaddr + 8] = ((bias + delta) % 2**64).to_bytes(8, "little")
    return bytes(out)


def _resolver_bytes(image: ElfImage, index: int) -> list[tuple[int, int]]:
    """The byte ranges of user segment ``index`` that relocations against imports write
    (their values are the resolver's to choose): 8 bytes, or the symbol's size for COPY."""
    imports = {s.name: s.size for s in image.spec.symbols if s.segment is None}
    return [(r.offset, r.offset + (imports[r.symbol] if r.type == "COPY" else 8))
            for r in image.spec.relocs
            if r.segment == index and r.symbol is not None and r.symbol in imports]


def check_valid_load(image: ElfImage, mm: Mmap, *, source: Any = None,
                     base: int | None = None) -> None:
    """Property 1 (one backend) with 3, 4 and 5: load ``image`` (or ``source``, e.g. its path)
    on ``mm`` through a :class:`CheckingMmap`; check symbols, every segment's bytes, the final
    map; unload and check nothing is left."""
    cm = CheckingMmap(mm)
    obj = loader.load(image.data if source is None else source, cm, base=base)
    bias = obj.load_bias
    for sym in image.spec.symbols:
        if sym.segment is not None and obj.symbol(sym.name) != bias + image.symbol_vaddr(sym.name):
            raise Violation(f"symbol {sym.name} at {obj.symbol(sym.name):#x}, expected "
                            f"{bias + image.symbol_vaddr(sym.name):#x}")
    for i, seg in enumerate(image.spec.segments):
        if not seg.memsz:
            continue
        got = bytearray(mm.read(bias + image.segment_vaddr(i), seg.memsz))
        want = bytearray(_expected_segment_bytes(image, i, bias))
        for lo, hi in _resolver_bytes(image, i):  # what imports bind: the resolver's choice
            got[lo:hi] = want[lo:hi]
        if got != want:
            at = next(k for k in range(len(want)) if got[k] != want[k])
            raise Violation(f"segment {i} ({seg.flags}) byte +{at:#x} (vaddr "
                            f"{image.segment_vaddr(i) + at:#x}) is {got[at]:#04x}, expected "
                            f"{want[at]:#04x} ({'bss' if at >= len(seg.data) else 'file'})")
    check_plan_predicts_map(obj, image, mm)
    obj.unload()
    left = cm.leftovers()
    if left:
        raise Violation(f"after unload still mapped: {[str(r) for r in left]}")


def check_malformed_load(data: bytes, mm: Mmap) -> str:
    """Property 2 (with 3 and 4): loading ``data`` either works (then unloads cleanly) or
    raises ``ElfError``; anything else propagates. Afterwards nothing the loader obtained is
    still mapped. Returns ``"loaded"`` or the ElfError's class name.

    An ``MmapError`` from the backend (an absurd but well-formed size that this machine cannot
    reserve: ENOMEM) is let through as docs/DESIGN.md says, and returned as ``"MmapError(ENOMEM)"``
    so campaigns count it apart; it must leave nothing behind either.
    """
    cm = CheckingMmap(mm)
    try:
        obj = loader.load(data, cm)
    except loader.ElfError as exc:
        result = type(exc).__name__
    except loader.MmapError as exc:
        result = f"MmapError({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    else:
        obj.unload()
        result = "loaded"
    left = cm.leftovers()
    if left:
        raise Violation(f"{result}, but still mapped: {[str(r) for r in left]}")
    return result


def check_same_on_both(image: ElfImage, make_other: Callable[[], Mmap]) -> None:
    """Property 1 across backends: the host (forked children) and ``make_other()`` load the
    image at the same address with equal outcomes (regions, page bytes, RELRO, calls)."""
    from loader.compare import compare_backends

    result = compare_backends(image.data, make_other())
    if result.differences:
        raise Violation("host and simulator differ: " + "; ".join(result.differences[:6]))


# --------------------------------------------------------------------------------------------
# The campaign: a supervised worker runs many inputs, the parent bounds each one.
#
# Forking per input is too slow for the rate a campaign needs, and one hostile input (a flipped
# byte that makes a loader allocate 24 GB) must not take the campaign down. So the parent forks
# one worker that runs hypothesis rounds. Before each load the worker puts the input (its bytes,
# its hypothesis choices, a one-line note) into memory shared with the parent, and after it
# sends the outcome through a pipe. The parent polls the worker's RSS and the time the input in
# flight has been running; past either bound, or when a signal kills the worker, the parent
# saves that input as a finding, replays and shrinks it with hypothesis (each candidate in a
# bounded child), and forks a new worker for the rest of the campaign.

DEFAULT_MAX_RSS = 512 << 20
"""Memory (bytes) a worker may add to what it inherited before it is killed."""
DEFAULT_INPUT_TIMEOUT = 5.0
"""Seconds one input may run before its worker is killed."""
DEFAULT_SHRINK_SECONDS = 20.0
"""Seconds spent shrinking each finding (0: save the exact bytes only)."""

_POLL_SECONDS = 0.01
_IDLE_SECONDS = 600.0
"""A worker that sends nothing for this long between inputs is stuck: killed as "stalled"."""
_SLOT_BYTES = 64 << 20
_HEADER = struct.Struct("<dQQQQQ")
"""The shared slot's header: started (monotonic), data, choices and note lengths, sequence
number, state (1 while a load runs). seq and state come last: the worker writes them last."""
_IDLE, _LOADING = 0, 1
BOUND_CLASSES = ("over-memory", "timeout")
"""Finding classes that mean an input went past a bound (the others are signal names)."""


def sim_backend() -> Mmap:
    """A fresh simulator address space; SystemExit naming the problem when there is none."""
    import vmsim

    cls: Any = getattr(vmsim, "AddressSpace", None)
    if cls is None:
        raise SystemExit("vmsim fuzz: the simulator (vmsim.AddressSpace) is not available")
    mm: Mmap = cls()
    return mm


@dataclass
class Finding:
    """An input that took its worker down. ``cls``: "over-memory", "timeout", "stalled" or
    the signal's name; ``backend``: "sim" or "host"; ``path``: the exact bytes; ``shrunk``:
    the reproducer hypothesis shrank it to (None when shrinking was off or did not reproduce);
    ``note``: what the input was (the mutation, for a malformed image)."""

    cls: str
    backend: str
    path: str | None
    shrunk: str | None = None
    note: str = ""

    def line(self) -> str:
        """One line for the summary."""
        where = self.path or "(no input in flight)"
        shrunk = f", shrunk: {self.shrunk}" if self.shrunk else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.cls} on {self.backend}: {where}{shrunk}{note}"


@dataclass
class CampaignStats:
    """Counts of one campaign: ``examples`` run, their ``outcomes`` (``"loaded"`` or an
    ElfError class name), ``host_examples`` checked in forked children, ``failures`` (property
    failures, shrunk by hypothesis, one line each), ``findings`` (inputs that took a worker
    down), ``classes`` (both, counted by class: "leaked-mapping", "violation", an exception's
    name, "over-memory", "timeout", a signal), ``workers`` forked, ``interrupted`` by Ctrl-C."""

    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    host_examples: int = 0
    host_outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    workers: int = 0
    interrupted: bool = False
    seconds: float = 0.0

    def rate(self) -> float:
        """Examples per second."""
        return self.examples / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        """The progress line."""
        return (f"{self.examples} examples, {self.rate():.0f}/s, host {self.host_examples}, "
                f"failures {len(self.failures)}, findings {len(self.findings)}")

    def count(self, cls: str) -> None:
        """Count one failure or finding of class ``cls``."""
        self.classes[cls] = self.classes.get(cls, 0) + 1


def failure_class(exc: BaseException) -> str:
    """The class a property failure is counted under: "leaked-mapping" (a mapping left
    behind), "violation" (another property), else the exception's type name."""
    if isinstance(exc, Violation):
        return "leaked-mapping" if "still mapped" in str(exc) else "violation"
    return type(exc).__name__


# -- the shared slot and the pipe ------------------------------------------------------------


class _Slot:
    """The worker's input in flight, in an anonymous MAP_SHARED mapping made before the fork
    (pages never touched cost nothing): what the parent saves when it must kill the worker."""

    def __init__(self, size: int = _SLOT_BYTES) -> None:
        self.mem = mmap.mmap(-1, size)
        self.seq = 0

    def close(self) -> None:
        """Unmap it."""
        self.mem.close()

    def begin(self, data: bytes, choices: bytes, note: bytes) -> None:
        """Publish the input about to be loaded (the bytes cut to fit, choices and note then
        dropped: the exact bytes matter most) and mark a load as running since now."""
        room = len(self.mem) - _HEADER.size
        if len(data) + len(choices) + len(note) > room:
            data, choices, note = data[:room], b"", b""
        at = _HEADER.size
        for blob in (data, choices, note):
            self.mem[at:at + len(blob)] = blob
            at += len(blob)
        self.seq += 1
        _HEADER.pack_into(self.mem, 0, time.monotonic(), len(data), len(choices), len(note),
                          self.seq, _LOADING)

    def end(self) -> None:
        """Mark the load as finished."""
        struct.pack_into("<Q", self.mem, _HEADER.size - 8, _IDLE)

    def header(self) -> tuple[float, int, int]:
        """(started, seq, state) as the worker last wrote them."""
        started, _d, _c, _n, seq, state = _HEADER.unpack_from(self.mem, 0)
        return started, seq, state

    def contents(self) -> tuple[int, bytes, bytes, str]:
        """(state, data, choices, note) of the last input published."""
        _t, nd, nc, nn, _seq, state = _HEADER.unpack_from(self.mem, 0)
        at = _HEADER.size
        data = bytes(self.mem[at:at + nd])
        choices = bytes(self.mem[at + nd:at + nd + nc])
        note = bytes(self.mem[at + nd + nc:at + nd + nc + nn]).decode(errors="replace")
        return state, data, choices, note


_LENGTH = struct.Struct("<I")


def _send(fd: int, message: tuple[Any, ...]) -> None:
    """Write one length-prefixed pickled message to the pipe."""
    blob = pickle.dumps(message)
    view = memoryview(_LENGTH.pack(len(blob)) + blob)
    while view:
        view = view[os.write(fd, view):]


class _Inbox:
    """Reassembles the worker's messages from whatever chunks the pipe returns."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[Any, ...]]:
        """Add ``chunk``; return the messages now complete."""
        self.buffer += chunk
        out = []
        while len(self.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < _LENGTH.size + size:
                break
            out.append(pickle.loads(self.buffer[_LENGTH.size:_LENGTH.size + size]))
            self.buffer = self.buffer[_LENGTH.size + size:]
        return out


# -- the worker ------------------------------------------------------------------------------


@dataclass
class _Job:
    """What a worker runs: ``kind`` of property on ``backend`` until ``deadline``
    (monotonic) or ``max_examples`` more examples; its hypothesis rounds are numbered from
    ``first_round`` (their seeds). ``scratch``: a file for images loaded by path."""

    kind: str
    backend: str
    deadline: float
    max_examples: int | None
    first_round: int
    scratch: Path
    host_batch: int
    max_rss: int
    timeout: float


def campaign_strategy(kind: str) -> Any:
    """The one hypothesis strategy a campaign of ``kind`` draws from (the parent replays a
    finding's choices against the same one): "malformed" draws a MalformedImage, "valid" an
    (image, from_file) pair, "rate" an image."""
    from hypothesis import strategies as st

    from loader.strategies import elf_images, malformed_elf

    if kind == "malformed":
        return malformed_elf()
    if kind == "valid":
        return st.tuples(elf_images(textrel=st.booleans()), st.booleans())
    if kind == "rate":
        return elf_images()
    raise ValueError(f"kind={kind!r}: expected 'malformed', 'valid' or 'rate'")


def _payload(kind: str, value: Any) -> tuple[bytes, str]:
    """(the file's bytes, a one-line note) of a drawn value."""
    if kind == "malformed":
        return value.data, f"{value.kind}: {value.mutation}"
    if kind == "valid":
        return value[0].data, ""
    return value.data, ""


def run_one(kind: str, value: Any, scratch: Path) -> str:
    """Run the ``kind`` property once on a drawn value on a fresh simulator: the outcome
    ("loaded" or the ElfError's name); a failing property raises."""
    if kind == "malformed":
        return check_malformed_load(value.data, sim_backend())
    if kind == "valid":
        image, from_file = value
        if from_file:
            scratch.write_bytes(image.data)
        check_valid_load(image, sim_backend(), source=str(scratch) if from_file else None)
        return "loaded"
    loader.load(value.data, sim_backend())
    return "loaded"


def _worker(job: _Job, slot: _Slot, fd: int) -> None:
    """In the forked worker: run the job, send ("done",) or ("crash", traceback); _exit.

    Ctrl-C is the parent's to handle (a terminal sends SIGINT to the whole process group):
    ignored here. The worker dies with the parent."""
    code = 0
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        faulthandler.disable()
        gc.freeze()  # what the parent built stays: the collector no longer walks it
        _run_rounds(job, slot, lambda message: _send(fd, message))
        _send(fd, ("done",))
    except BaseException:
        code = 70
        with contextlib.suppress(BaseException):
            _send(fd, ("crash", traceback.format_exc()))
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def _run_rounds(job: _Job, slot: _Slot, send: Callable[[tuple[Any, ...]], None]) -> None:
    """Hypothesis rounds of 200 examples until the job's deadline or example count; a
    property failure (shrunk by hypothesis) is sent as ("failure", class, text, data)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis.control import current_build_context

    strategy = campaign_strategy(job.kind)
    pending: list[bytes] = []
    last: dict[str, Any] = {}
    done = [0]

    def body(value: Any) -> None:
        data, note = _payload(job.kind, value)
        last["data"], last["repr"] = data, note or repr(value)
        choices = pickle.dumps(current_build_context().data.choices)
        slot.begin(data, choices, note.encode())
        try:
            outcome = run_one(job.kind, value, job.scratch)
        finally:
            slot.end()
        done[0] += 1
        send(("outcome", "sim", outcome))
        if job.backend == "both" and job.kind == "malformed":
            pending.append(data)
            send(("host-pending", data))  # the parent runs it if this worker dies first
            if len(pending) >= job.host_batch:
                _run_host_batch(pending, job, send)
                send(("host-done", len(pending)))
                pending.clear()
        elif job.backend == "both" and job.kind == "valid":
            check_same_on_both(value[0], sim_backend)
            send(("outcome", "host", "loaded"))

    given_any: Any = given
    round_no = job.first_round
    while time.monotonic() < job.deadline and (
            job.max_examples is None or done[0] < job.max_examples):
        round_no += 1
        chunk = 200 if job.max_examples is None else max(1, min(200, job.max_examples - done[0]))
        test: Callable[[], None] = settings(
            max_examples=chunk, deadline=None, database=None, derandomize=False,
            phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False,
            verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck))(given_any(strategy)(body))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # hypothesis' notes on large reprs
                hseed(round_no * 7919 + os.getpid())(test)()
        except Exception as exc:  # the shrunk failure: report it and go on
            send(("failure", failure_class(exc), f"{type(exc).__name__}: {exc}\n  example: "
                  f"{last.get('repr')}", last.get("data", b"")))
    if pending:
        _run_host_batch(pending, job, send)
        send(("host-done", len(pending)))


def _host_batch(datas: list[bytes]) -> list[str]:
    """In a forked child: :func:`check_malformed_load` of each input on the host; each result,
    or ``"FAIL <class>: ..."`` for a property failure."""
    from loader.libc import LibcMmap

    out = []
    for data in datas:
        try:
            out.append(check_malformed_load(data, LibcMmap()))
        except Exception as exc:  # a property failure: reported, not raised, to go on
            out.append(f"FAIL {failure_class(exc)}: {type(exc).__name__}: {exc}")
    return out


def bounded_run(fn: Callable[..., Any], *args: Any, max_rss: int, timeout: float
                ) -> tuple[str, Any]:
    """``fn(*args)`` in a forked child under the bounds: ("ok", value), or the class of how it
    ended: ("over-memory" | "timeout" | a signal name | "exception", None)."""
    from loader.isolate import OverBound, run_isolated

    try:
        done = run_isolated(fn, *args, timeout=timeout, max_rss=max_rss)
    except OverBound:
        return "over-memory", None
    except TimeoutError:
        return "timeout", None
    except Exception:  # fn raised: not a bound
        return "exception", None
    return (done.status, done.value if done.status == "ok" else None)


def _run_host_batch(datas: list[bytes], job: _Job, send: Callable[[tuple[Any, ...]], None]
                    ) -> None:
    """Run a batch on the host in one bounded forked child; if it does not come back whole
    (a signal, a bound), rerun its inputs one by one, each bounded, to name the culprits."""
    batch_timeout = job.timeout + 0.05 * len(datas)
    status, results = bounded_run(_host_batch, list(datas), max_rss=job.max_rss,
                                  timeout=batch_timeout)
    if status != "ok":
        results = []
        for data in datas:
            one, value = bounded_run(_host_batch, [data], max_rss=job.max_rss,
                                     timeout=job.timeout)
            if one != "ok":
                send(("finding", one, "host", data))
                value = [None]
            results += value
    for data, result in zip(datas, results, strict=True):
        if result is None:
            continue
        if result.startswith("FAIL"):
            cls = result[5:].split(":", 1)[0]
            send(("failure", cls, f"host: {result[5 + len(cls) + 2:]}", data))
        send(("outcome", "host", "failed" if result.startswith("FAIL") else result))


# -- the parent ------------------------------------------------------------------------------


class _Campaign:
    """The parent's side: forks workers, reads their messages, enforces the bounds, saves
    and shrinks findings."""

    def __init__(self, stats: CampaignStats, job: _Job, out: Callable[[], Path],
                 shrink_seconds: float, progress: Callable[[CampaignStats], None] | None,
                 started: float) -> None:
        self.stats, self.job, self.out = stats, job, out
        self.shrink_seconds = shrink_seconds
        self.progress, self.started = progress, started
        self.shown = started
        self.slot = _Slot()
        self.worker: int | None = None
        self.read_fd: int | None = None
        self.finished = False
        self.host_pending: list[bytes] = []

    def close(self) -> None:
        """Kill a worker still running, close the pipe, unmap the slot."""
        self._kill()
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None
        self.slot.close()

    def run(self) -> None:
        """Workers until the job is finished or its time is up."""
        while not self.finished and time.monotonic() < self.job.deadline and (
                self.job.max_examples is None or self.stats.examples < self.job.max_examples):
            self._spawn()
            ended = self._watch()
            if ended != "done":
                self._found(ended)
                self._host_leftovers()

    def _host_leftovers(self) -> None:
        """The host batch a dead worker had not run yet: run it from here (no worker runs
        now), so that every input is checked on the host too."""
        if self.host_pending:
            leftovers, self.host_pending = self.host_pending, []
            _run_host_batch(leftovers, self.job, self._handle)

    def _spawn(self) -> None:
        """Fork a worker for what is left of the job; its memory cap counts from here."""
        left = None if self.job.max_examples is None else \
            self.job.max_examples - self.stats.examples
        job = dataclasses.replace(self.job, max_examples=left,
                                  first_round=self.job.first_round + 1000 * self.stats.workers)
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, 1031, 1 << 20)  # F_SETPIPE_SZ: room for bursts
        self.cap = rss_bytes() + self.job.max_rss
        self.slot.end()  # the last worker may have died loading: this one has not begun
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _worker(job, self.slot, write_fd)
        os.close(write_fd)
        self.worker, self.read_fd = pid, read_fd
        self.stats.workers += 1

    def _watch(self) -> str:
        """Read messages and poll the bounds until the worker ends: "done", or how it was
        ended ("over-memory", "timeout", "stalled", a signal name, "crash")."""
        assert self.read_fd is not None and self.worker is not None
        inbox, seen, quiet_since = _Inbox(), (-1, -1.0), time.monotonic()
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], _POLL_SECONDS)
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    return self._reaped()
                for message in inbox.feed(chunk):
                    self._handle(message)
                quiet_since = time.monotonic()
            verdict = self._over_bound(seen, quiet_since)
            if verdict:
                self._kill()
                self._drain(inbox)
                return verdict
            started, seq, state = self.slot.header()
            seen = (seq, started) if state == _LOADING else (-1, -1.0)

    def _over_bound(self, seen: tuple[int, float], quiet_since: float) -> str | None:
        """Which bound the worker is past, if any: its RSS over the cap, the input in flight
        (the same one as at the last poll) past the timeout, or silent far too long."""
        assert self.worker is not None
        if rss_bytes(self.worker) > self.cap:
            return "over-memory"
        started, seq, state = self.slot.header()
        now = time.monotonic()
        if state == _LOADING and (seq, started) == seen and now - started > self.job.timeout:
            return "timeout"
        if state != _LOADING and now - quiet_since > _IDLE_SECONDS:
            return "stalled"
        return None

    def _drain(self, inbox: _Inbox) -> None:
        """After a kill: the messages the worker sent before it died (until EOF, or a second
        if a grandchild still holds the pipe)."""
        assert self.read_fd is not None
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            ready, _, _ = select.select([self.read_fd], [], [], 0.05)
            if not ready:
                continue
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                break
            for message in inbox.feed(chunk):
                self._handle(message)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def _reaped(self) -> str:
        """The worker closed its pipe: wait for it and say how it ended."""
        assert self.worker is not None
        _pid, status = os.waitpid(self.worker, 0)
        self.worker = None
        self._close_pipe()
        if os.WIFSIGNALED(status):
            return signal.Signals(os.WTERMSIG(status)).name
        return "done" if self.finished else "crash"

    def _kill(self) -> None:
        """SIGKILL the worker (if any) and reap it."""
        if self.worker is None:
            return
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.worker, signal.SIGKILL)
            os.waitpid(self.worker, 0)
        self.worker = None

    def _handle(self, message: tuple[Any, ...]) -> None:
        """Count one message from the worker."""
        stats, what = self.stats, message[0]
        if what == "outcome":
            _what, backend, outcome = message
            table = stats.outcomes if backend == "sim" else stats.host_outcomes
            table[outcome] = table.get(outcome, 0) + 1
            if backend == "sim":
                stats.examples += 1
            else:
                stats.host_examples += 1
        elif what == "failure":
            _what, cls, text, data = message
            stats.count(cls)
            stats.failures.append(f"{text}\n  saved: {self._save(data, 'failure')}")
        elif what == "finding":
            _what, cls, backend, data = message
            stats.count(cls)
            stats.findings.append(Finding(cls, backend, self._save(data, cls)))
        elif what == "host-pending":
            self.host_pending.append(message[1])
        elif what == "host-done":
            del self.host_pending[:message[1]]
        elif what == "done":
            self.finished = True
        elif what == "crash":
            stats.failures.append(f"worker crashed:\n{message[1]}")
            stats.count("worker-crash")
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        self.stats.seconds = now - self.started
        if self.progress is not None and now - self.shown > 0.5:
            self.shown = now
            self.progress(self.stats)

    def _save(self, data: bytes, tag: str) -> str:
        """Write ``data`` to the out directory as ``<tag>-<n>.elf``; its path."""
        out = self.out()
        n = len(self.stats.failures) + len(self.stats.findings)
        path = out / f"{tag}-{n}.elf"
        path.write_bytes(data)
        return str(path)

    def _found(self, cls: str) -> None:
        """The worker was ended (``cls``): save the input in flight, shrink it."""
        state, data, choices, note = self.slot.contents()
        if cls == "crash" or state != _LOADING:
            if cls != "crash":
                self.stats.count(cls)
                self.stats.findings.append(Finding(cls, "sim", None, note="between inputs"))
            return
        self.stats.examples += 1
        self.stats.outcomes[cls] = self.stats.outcomes.get(cls, 0) + 1
        self.stats.count(cls)
        finding = Finding(cls, "sim", self._save(data, cls), note=note)
        self.stats.findings.append(finding)
        if self.shrink_seconds > 0 and choices:
            shrunk = shrink_finding(self.job.kind, cls, pickle.loads(choices),
                                    seconds=self.shrink_seconds, max_rss=self.job.max_rss,
                                    timeout=self.job.timeout, scratch=self.job.scratch)
            if shrunk is not None and finding.path is not None:
                shrunk_data, shrunk_note = shrunk
                finding.shrunk = finding.path[:-len(".elf")] + "-shrunk.elf"
                Path(finding.shrunk).write_bytes(shrunk_data)
                finding.note = shrunk_note or finding.note
        self._tick()


def shrink_finding(kind: str, cls: str, choices: Sequence[Any], *, seconds: float,
                   max_rss: int, timeout: float, scratch: Path) -> tuple[bytes, str] | None:
    """Replay a finding's hypothesis ``choices`` and shrink it for at most ``seconds``: each
    candidate runs in a bounded child and counts as failing when it ends the same way
    (``cls``). The smallest reproducer's (bytes, note), or None if it does not reproduce."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.database import InMemoryExampleDatabase, choices_to_bytes

    key = b"vmsim-fuzz-finding"
    db = InMemoryExampleDatabase()
    db.save(key, choices_to_bytes(choices))
    deadline = time.monotonic() + seconds

    def same_end(value: Any) -> bool:
        if time.monotonic() > deadline:
            return False
        ended, _v = bounded_run(run_one, kind, value, scratch, max_rss=max_rss,
                                timeout=timeout)
        return ended == cls

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hypothesis' notes on large reprs
            value = find(campaign_strategy(kind), same_end, database_key=key,
                         settings=settings(database=db, phases=[Phase.reuse, Phase.shrink],
                                           deadline=None, max_examples=10_000,
                                           verbosity=Verbosity.quiet,
                                           suppress_health_check=list(HealthCheck)))
    except Exception:  # NoSuchExample: the replay did not end the same way
        return None
    return _payload(kind, value)


def run_campaign(seconds: float, *, kind: str = "malformed", backend: str = "sim",
                 out_dir: Path | None = None, host_batch: int = 500,
                 max_examples: int | None = None,
                 progress: Callable[[CampaignStats], None] | None = None,
                 max_rss: int = DEFAULT_MAX_RSS, input_timeout: float = DEFAULT_INPUT_TIMEOUT,
                 shrink_seconds: float = DEFAULT_SHRINK_SECONDS) -> CampaignStats:
    """Run one property as a hypothesis campaign for about ``seconds`` (or ``max_examples``),
    in a supervised worker: each input may add ``max_rss`` bytes to the worker's memory and
    run ``input_timeout`` seconds; past either, or killed by a signal, it becomes a finding
    (saved, then shrunk for up to ``shrink_seconds``) and a new worker goes on.

    ``kind``: "malformed" (property 2 on :func:`~loader.strategies.malformed_elf`), "valid"
    (property 1 on :func:`~loader.strategies.elf_images`) or "rate" (only generate and load
    valid images on the simulator: the throughput figure). ``backend``: "sim", or "both"
    (malformed inputs also run on the host in forked children, ``host_batch`` at a time,
    under the same bounds; valid ones are compared host against simulator). A property
    failure is shrunk by hypothesis in the worker and recorded in ``failures``; files go to
    ``out_dir`` (a fresh temporary directory, made only when something is saved, if None).
    Ctrl-C ends the campaign: the stats so far come back with ``interrupted`` set. Nothing
    is left behind: no worker, no scratch directory.
    """
    stats = CampaignStats()
    started = time.monotonic()
    made: list[Path] = []

    def out() -> Path:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            return out_dir
        if not made:
            made.append(Path(tempfile.mkdtemp(prefix="vmsim-fuzz-")))
        return made[0]

    with tempfile.TemporaryDirectory(prefix="vmsim-fuzz-images-") as scratch:
        job = _Job(kind, backend, started + seconds, max_examples, 0,
                   Path(scratch) / "image.so", host_batch, max_rss, input_timeout)
        campaign = _Campaign(stats, job, out, shrink_seconds, progress, started)
        try:
            campaign.run()
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            campaign.close()
    stats.seconds = time.monotonic() - started
    return stats


MAX_RSS_MIB = Bounded(float, 1.0, float(1 << 20), unit="MiB", example="512")
"""--max-rss of vmsim fuzz."""
INPUT_SECONDS = Bounded(float, 0.0, 3600.0, unit="s", open_lo=True, example="5")
"""--input-timeout of vmsim fuzz."""
SHRINK_SECONDS = Bounded(float, 0.0, 3600.0, unit="s", example="20")
"""--shrink-time of vmsim fuzz (0: save the exact bytes only)."""


def parser() -> argparse.ArgumentParser:
    """``vmsim fuzz`` arguments."""
    p = OneLineParser(prog="vmsim fuzz", description="Run the loader's properties "
                                "as a hypothesis campaign, with a live progress line; on a "
                                "failure print the shrunk example and save its ELF file. Each "
                                "input runs under a memory and a time bound in a supervised "
                                "worker: an input past a bound (or one that kills the worker) "
                                "is saved, shrunk and reported, and the campaign goes on.")
    p.add_argument("--time", type=FUZZ_SECONDS, default=60.0, metavar="S",
                   help="seconds to run each property (default 60)")
    p.add_argument("--backend", choices=["sim", "both"], default="sim",
                   help="sim: the simulator only; both: also the host, in forked children")
    p.add_argument("--property", choices=["malformed", "valid", "all", "rate"], default="all",
                   dest="kind", help="which property to run (default: all); rate: no "
                   "property, only generate and load valid images on the simulator, to "
                   "measure images/s")
    p.add_argument("--out", type=Path, default=Path("vmsim-fuzz-failures"),
                   help="where failing ELF files are saved (default ./vmsim-fuzz-failures)")
    p.add_argument("--max-rss", type=MAX_RSS_MIB, default=DEFAULT_MAX_RSS / (1 << 20),
                   metavar="MIB", help="memory one input may take, in MiB (default "
                   f"{DEFAULT_MAX_RSS >> 20})")
    p.add_argument("--input-timeout", type=INPUT_SECONDS, default=DEFAULT_INPUT_TIMEOUT,
                   metavar="S", help="seconds one input may run (default "
                   f"{DEFAULT_INPUT_TIMEOUT:g})")
    p.add_argument("--shrink-time", type=SHRINK_SECONDS, default=DEFAULT_SHRINK_SECONDS,
                   metavar="S", help="seconds to shrink each input past a bound (default "
                   f"{DEFAULT_SHRINK_SECONDS:g}; 0: save the exact bytes only)")
    return p


def _summary(kind: str, stats: CampaignStats) -> None:
    """Print one campaign's summary: the progress line, outcomes, failures, findings."""
    print(f"\r  {stats.line()} in {stats.seconds:.1f}s   ", file=sys.stderr)
    print(f"  outcomes: {dict(sorted(stats.outcomes.items()))}")
    if stats.host_outcomes:
        print(f"  host outcomes: {dict(sorted(stats.host_outcomes.items()))}")
    for failure in stats.failures:
        print(f"  FAILURE: {failure}")
    for finding in stats.findings:
        print(f"  FINDING: {finding.line()}")


def main(argv: Sequence[str] | None = None) -> int:
    """``vmsim fuzz [--time S] [--backend sim|both] [--property ...]``: exit 0 when no
    property failed and no input went past a bound, 1 otherwise, 130 on Ctrl-C (after the
    summary so far, without a traceback)."""
    args = parser().parse_args(argv)
    kinds = ["valid", "malformed"] if args.kind == "all" else [args.kind]
    failed = 0

    def progress(stats: CampaignStats) -> None:
        print(f"\r  {stats.line()}   ", end="", file=sys.stderr, flush=True)

    try:
        for kind in kinds:
            print(f"vmsim fuzz: {kind} images on {args.backend} for {args.time:g}s",
                  file=sys.stderr)
            stats = run_campaign(args.time, kind=kind, backend=args.backend, out_dir=args.out,
                                 progress=progress, max_rss=int(args.max_rss * (1 << 20)),
                                 input_timeout=args.input_timeout,
                                 shrink_seconds=args.shrink_time)
            _summary(kind, stats)
            failed += len(stats.failures) + len(stats.findings)
            if stats.interrupted:
                print("vmsim fuzz: interrupted (Ctrl-C)", file=sys.stderr)
                return 130
    except KeyboardInterrupt:
        print("\nvmsim fuzz: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
