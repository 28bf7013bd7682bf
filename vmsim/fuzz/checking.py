"""The checking wrapper: an ``Mmap`` that proves the loader stays inside what it obtained.

Part of the fuzz kit (``vmsim.fuzz``): properties 3 and 4 of ``vmsim.fuzz.properties``. A
breach raises :class:`Violation` before the call reaches the wrapped backend, so it works the
same on the simulator and on the host (where the breach itself could crash the process).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.mmap import MapFlags, Mapping, Mmap, ProtFlags, Region
from loader.pages import page_round_down, page_round_up

__all__ = ["CheckingMmap", "Violation"]

_FIXED = MapFlags.MAP_FIXED | MapFlags.MAP_FIXED_NOREPLACE


class Violation(AssertionError):
    """A property does not hold: the message says which, where and what was seen."""


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
        return self.inner.page_size

    runs_code = property(lambda self: self.inner.runs_code, doc="The wrapped backend's.")

    def _span(self, addr: int, length: int) -> tuple[int, int]:
        """``[addr, addr + length)`` rounded out to pages."""
        page = self.page_size
        return page_round_down(addr, page), page_round_up(addr + length, page)

    def _inside(self, op: str, addr: int, length: int) -> None:
        """Violation unless ``[addr, addr+length)`` lies in ranges this wrapper handed out."""
        lo, hi = self._span(addr, length)
        if not self.owned.covers(lo, hi):
            raise Violation(f"{op}({addr:#x}, {length:#x}) outside the loader's reservation "
                            f"({self.owned_text()})")

    def owned_text(self) -> str:
        """The ranges obtained, for a message (``nothing`` when none)."""
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
                            f"reservation ({self.owned_text()})")
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
