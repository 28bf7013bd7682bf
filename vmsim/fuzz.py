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
import errno
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import loader
from loader.elfwriter import PT_GNU_RELRO, ElfImage
from loader.mmap import MapFlags, Mapping, Mmap, ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE, page_round_down, page_round_up

__all__ = [
    "CampaignStats",
    "CheckingMmap",
    "Violation",
    "check_malformed_load",
    "check_plan_predicts_map",
    "check_same_on_both",
    "check_valid_load",
    "expected_page_perms",
    "main",
    "run_campaign",
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
        got = mm.read(bias + image.segment_vaddr(i), seg.memsz)
        want = _expected_segment_bytes(image, i, bias)
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
    reserve: ENOMEM) is let through as DESIGN.md says, and returned as ``"MmapError(ENOMEM)"``
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
# The campaign.


def sim_backend() -> Mmap:
    """A fresh simulator address space; SystemExit naming the problem when there is none."""
    import vmsim

    cls: Any = getattr(vmsim, "AddressSpace", None)
    if cls is None:
        raise SystemExit("vmsim fuzz: the simulator (vmsim.AddressSpace) is not available")
    mm: Mmap = cls()
    return mm


@dataclass
class CampaignStats:
    """Counts of one campaign: ``examples`` run, their ``outcomes`` (``"loaded"`` or an
    ElfError class name), ``host_examples`` checked in forked children, ``failures``."""

    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    host_examples: int = 0
    host_outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def rate(self) -> float:
        """Examples per second."""
        return self.examples / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        """The progress line."""
        return (f"{self.examples} examples, {self.rate():.0f}/s, host {self.host_examples}, "
                f"failures {len(self.failures)}")


def _host_batch(datas: list[bytes]) -> list[str]:
    """In a forked child: :func:`check_malformed_load` of each input on the host; each result,
    or ``"FAIL: ..."`` for an exception other than ElfError."""
    from loader.libc import LibcMmap

    out = []
    for data in datas:
        try:
            out.append(check_malformed_load(data, LibcMmap()))
        except Exception as exc:  # a property failure: reported, not raised, to go on
            out.append(f"FAIL: {type(exc).__name__}: {exc}")
    return out


def _run_host_batch(datas: list[bytes], stats: CampaignStats, save: Callable[[bytes, str], str]
                    ) -> None:
    """Run a batch on the host in one forked child; if the child dies, rerun one by one to
    name the input that killed it."""
    from loader.isolate import run_isolated

    done = run_isolated(_host_batch, datas, timeout=600)
    results: list[str]
    if done.status == "ok":
        results = done.value
    else:
        results = []
        for data in datas:
            one = run_isolated(_host_batch, [data], timeout=60)
            results += one.value if one.status == "ok" else [f"FAIL: host child {one.status}"]
    for data, result in zip(datas, results, strict=True):
        stats.host_examples += 1
        if result.startswith("FAIL"):
            stats.failures.append(f"host: {result} (saved {save(data, 'host')})")
        else:
            stats.host_outcomes[result] = stats.host_outcomes.get(result, 0) + 1


def run_campaign(seconds: float, *, kind: str = "malformed", backend: str = "sim",
                 out_dir: Path | None = None, host_batch: int = 500,
                 max_examples: int | None = None,
                 progress: Callable[[CampaignStats], None] | None = None) -> CampaignStats:
    """Run one property as a hypothesis campaign for about ``seconds`` (or ``max_examples``).

    ``kind``: "malformed" (property 2 on :func:`~loader.strategies.malformed_elf`), "valid"
    (property 1 on :func:`~loader.strategies.elf_images`) or "rate" (only generate and load
    valid images on the simulator: the throughput figure). ``backend``: "sim", or "both"
    (malformed inputs also run on the host in forked children, ``host_batch`` at a time;
    valid ones are compared host against simulator). On a failure hypothesis shrinks it; the
    shrunk example is recorded in ``failures`` and its ELF file saved in ``out_dir``.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from loader.strategies import elf_images, malformed_elf

    stats = CampaignStats()
    out = Path(out_dir or tempfile.mkdtemp(prefix="vmsim-fuzz-"))
    pending: list[bytes] = []
    last: dict[str, Any] = {}
    started = time.monotonic()
    shown = [started]

    def save(data: bytes, tag: str) -> str:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"failure-{len(stats.failures)}-{tag}.elf"
        path.write_bytes(data)
        return str(path)

    def tick() -> None:
        stats.seconds = time.monotonic() - started
        if progress is not None and time.monotonic() - shown[0] > 0.5:
            shown[0] = time.monotonic()
            progress(stats)

    def one_malformed(bad: Any) -> None:
        last["data"], last["repr"] = bad.data, repr(bad)
        result = check_malformed_load(bad.data, sim_backend())
        stats.examples += 1
        stats.outcomes[result] = stats.outcomes.get(result, 0) + 1
        if backend == "both":
            pending.append(bad.data)
            if len(pending) >= host_batch:
                _run_host_batch(pending[:], stats, save)
                pending.clear()
        tick()

    scratch = Path(tempfile.mkdtemp(prefix="vmsim-fuzz-images-")) / "image.so"

    def one_valid(image: ElfImage, from_file: bool) -> None:
        last["data"], last["repr"] = image.data, f"{image!r}, from_file={from_file}"
        if from_file:
            scratch.write_bytes(image.data)
        check_valid_load(image, sim_backend(), source=str(scratch) if from_file else None)
        if backend == "both":
            check_same_on_both(image, sim_backend)
            stats.host_examples += 1
        stats.examples += 1
        stats.outcomes["loaded"] = stats.outcomes.get("loaded", 0) + 1
        tick()

    def one_load(image: ElfImage) -> None:
        last["data"], last["repr"] = image.data, repr(image)
        loader.load(image.data, sim_backend())
        stats.examples += 1
        stats.outcomes["loaded"] = stats.outcomes.get("loaded", 0) + 1
        tick()

    from hypothesis import strategies as st

    choices: dict[str, list[Any]] = {
        "malformed": [malformed_elf()],
        "valid": [elf_images(textrel=st.booleans()), st.booleans()],
        "rate": [elf_images()],
    }
    strategies = choices[kind]
    bodies: dict[str, Callable[..., None]] = {"malformed": one_malformed, "valid": one_valid,
                                              "rate": one_load}
    body = bodies[kind]
    given_any: Any = given
    chunk, round_no = 200, 0
    while time.monotonic() - started < seconds and (
            max_examples is None or stats.examples < max_examples):
        round_no += 1
        test: Callable[[], None] = settings(
            max_examples=chunk, deadline=None, database=None, derandomize=False,
            phases=[Phase.generate, Phase.shrink], report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck))(given_any(*strategies)(body))
        try:
            seeded: Callable[[], None] = hseed(round_no * 7919 + os.getpid())(test)
            seeded()
        except Exception as exc:  # the shrunk failure: record it and go on
            path = save(last.get("data", b""), "sim")
            stats.failures.append(f"{type(exc).__name__}: {exc}\n  example: "
                                  f"{last.get('repr')}\n  saved: {path}")
    if pending:
        _run_host_batch(pending, stats, save)
    stats.seconds = time.monotonic() - started
    return stats


def parser() -> argparse.ArgumentParser:
    """``vmsim fuzz`` arguments."""
    p = argparse.ArgumentParser(prog="vmsim fuzz", description="Run the loader's properties "
                                "as a hypothesis campaign, with a live progress line; on a "
                                "failure print the shrunk example and save its ELF file.")
    p.add_argument("--time", type=float, default=60.0, metavar="S",
                   help="seconds to run each property (default 60)")
    p.add_argument("--backend", choices=["sim", "both"], default="sim",
                   help="sim: the simulator only; both: also the host, in forked children")
    p.add_argument("--property", choices=["malformed", "valid", "all", "rate"], default="all",
                   dest="kind", help="which property to run (default: all); rate: no "
                   "property, only generate and load valid images on the simulator, to "
                   "measure images/s")
    p.add_argument("--out", type=Path, default=Path("vmsim-fuzz-failures"),
                   help="where failing ELF files are saved (default ./vmsim-fuzz-failures)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``vmsim fuzz [--time S] [--backend sim|both] [--property ...]``: exit 0 when no
    property failed, 1 otherwise."""
    args = parser().parse_args(argv)
    kinds = ["valid", "malformed"] if args.kind == "all" else [args.kind]
    failed = 0

    def progress(stats: CampaignStats) -> None:
        print(f"\r  {stats.line()}   ", end="", file=sys.stderr, flush=True)

    for kind in kinds:
        print(f"vmsim fuzz: {kind} images on {args.backend} for {args.time:.0f}s",
              file=sys.stderr)
        stats = run_campaign(args.time, kind=kind, backend=args.backend, out_dir=args.out,
                             progress=progress)
        print(f"\r  {stats.line()} in {stats.seconds:.1f}s   ", file=sys.stderr)
        print(f"  outcomes: {dict(sorted(stats.outcomes.items()))}")
        if stats.host_outcomes:
            print(f"  host outcomes: {dict(sorted(stats.host_outcomes.items()))}")
        for failure in stats.failures:
            print(f"  FAILURE: {failure}")
        failed += len(stats.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
