"""Outcomes: what a load left behind, in a form two backends' loads can be compared by.

Part of the ``loader`` layer (imports ``loader.mmap``, ``loader.trace``). docs/DESIGN.md
"Outcomes": the regions inside the span (relative to its start: length, perms, file-backed or
anonymous, file offset), the bytes of every readable page (a SHA-1 per page; ``diff`` names
the pages that differ; with ``keep_bytes`` the bytes are kept too and ``diff`` shows the first
differing word), the RELRO range, and the trace of Mmap calls. An Outcome is plain data: it
pickles (out of a forked child).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from loader.mmap import Region

if TYPE_CHECKING:
    from loader.pipeline import LoadedObject

__all__ = ["Outcome", "RegionRecord", "regions_in", "take_outcome"]


@dataclass(frozen=True, slots=True)
class RegionRecord:
    """One region inside the span, relative to the span start."""

    start: int
    length: int
    perms: str
    file_backed: bool
    offset: int


@dataclass(frozen=True)
class Outcome:
    """The comparable result of a load. ``pages`` maps each readable page's offset in the
    span to the SHA-1 of its bytes; ``calls`` is the trace (fd numbers shown as "fd").
    ``irelative`` lists (place, resolver) of every IRELATIVE or IFUNC-bound slot, relative to
    the span; ``ran_resolvers`` says whether the slots hold what the resolvers chose (host)
    or the resolvers' own addresses (simulator)."""

    span_length: int
    regions: tuple[RegionRecord, ...]
    pages: dict[int, str]
    relro: tuple[int, int] | None
    calls: tuple[tuple[tuple[str, Any], ...], ...]
    extern: dict[str, int] = field(default_factory=dict)
    irelative: tuple[tuple[int, int], ...] = ()
    inits: tuple[int, ...] = ()
    raw: dict[int, bytes] | None = field(default=None, compare=False, repr=False)
    ran_resolvers: bool = field(default=False, compare=False)

    def diff(self, other: Outcome) -> list[str]:
        """Readable differences between two outcomes, empty when they are equal."""
        out: list[str] = []
        if self.span_length != other.span_length:
            out.append(f"span length {self.span_length:#x} != {other.span_length:#x}")
        if self.regions != other.regions:
            out += _diff_lists("region", [_region_text(r) for r in self.regions],
                               [_region_text(r) for r in other.regions])
        if self.relro != other.relro:
            out.append(f"relro {_range(self.relro)} != {_range(other.relro)}")
        ifunc_slots = {p for p, _ in self.irelative} | {p for p, _ in other.irelative}
        for off in sorted(set(self.pages) | set(other.pages)):
            a, b = self.pages.get(off, "unreadable"), other.pages.get(off, "unreadable")
            if a != b and not _only_slots_differ(self.raw, other.raw, off, ifunc_slots):
                out.append(f"page +{off:#x}: sha1 {a[:12]} != {b[:12]}"
                           + _first_byte_diff(self.raw, other.raw, off))
        if self.calls != other.calls:
            out += _diff_lists("call", [_call_text(c) for c in self.calls],
                               [_call_text(c) for c in other.calls])
        for name in ("extern", "irelative", "inits"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name}: {getattr(self, name)} != {getattr(other, name)}")
        return out

    def page_perms(self, page_size: int) -> list[str]:
        """The perms of each page of the span (``"---p"`` where nothing is mapped)."""
        perms = ["---p"] * (self.span_length // page_size)
        for r in self.regions:
            for off in range(r.start, r.start + r.length, page_size):
                perms[off // page_size] = r.perms
        return perms


def _only_slots_differ(a: dict[int, bytes] | None, b: dict[int, bytes] | None, off: int,
                       slots: set[int]) -> bool:
    """True when both kept page ``off``'s bytes and every differing 8-byte word is one of
    ``slots``: IRELATIVE/IFUNC places, which hold the resolver's choice where resolvers ran
    (host) and the resolver's address where they cannot (simulator). Those are expected."""
    if not slots or not a or not b or off not in a or off not in b:
        return False
    x = np.frombuffer(a[off], dtype="<u8")
    y = np.frombuffer(b[off], dtype="<u8")
    if len(x) != len(y):
        return False
    differ = (np.flatnonzero(x != y) * 8 + off).tolist()
    return all(p in slots for p in differ)


def _first_byte_diff(a: dict[int, bytes] | None, b: dict[int, bytes] | None, off: int) -> str:
    """``", first at +0x...: 0x.. != 0x.."`` when both outcomes kept the page's bytes."""
    if not a or not b or off not in a or off not in b:
        return ""
    x, y = a[off], b[off]
    at = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), None)
    if at is None:
        return ""
    word = at & ~7
    return (f", first at +{off + at:#x}: word {x[word:word + 8].hex()} != "
            f"{y[word:word + 8].hex()}")


def _range(r: tuple[int, int] | None) -> str:
    """``+0x1000-+0x2000`` or ``None``."""
    return "None" if r is None else f"+{r[0]:#x}-+{r[1]:#x}"


def _region_text(r: RegionRecord) -> str:
    """One region as a maps-like line relative to the span."""
    kind = f"file@{r.offset:#x}" if r.file_backed else "anon"
    return f"+{r.start:#x}-+{r.start + r.length:#x} {r.perms} {kind}"


def _call_text(call: tuple[tuple[str, Any], ...]) -> str:
    """One call as ``op(arg=..., ...) -> result``."""
    d = dict(call)
    op = d.pop("op")
    res = d.pop("result", d.pop("errno", None))
    args = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool)
                     else f"{k}={v}" for k, v in d.items())
    return f"{op}({args}) -> {res:#x}" if isinstance(res, int) else f"{op}({args}) -> {res}"


def _diff_lists(what: str, a: list[str], b: list[str]) -> list[str]:
    """Line-by-line differences of two lists, numbered."""
    out = []
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else "(none)"
        y = b[i] if i < len(b) else "(none)"
        if x != y:
            out.append(f"{what} {i}: {x}  !=  {y}")
    return out


def regions_in(maps: list[Region], start: int, end: int) -> list[Region]:
    """The regions overlapping ``[start, end)``, clipped to it."""
    out = []
    for r in maps:
        if r.end <= start or r.start >= end:
            continue
        lo, hi = max(r.start, start), min(r.end, end)
        off = r.offset + (lo - r.start) if _file_backed(r) else 0
        out.append(Region(lo, hi, r.prot, r.shared, off, r.dev, r.inode, r.path))
    return out


def _file_backed(r: Region) -> bool:
    """True for a mapping of a file (an inode, or a path that is not a [label])."""
    return bool(r.inode) or bool(r.path and not r.path.startswith("["))


def _page_hashes(obj: LoadedObject, regions: list[Region], page: int,
                 keep: dict[int, bytes] | None) -> dict[int, str]:
    """SHA-1 of every readable page in the span, keyed by offset from the span start; the
    bytes go into ``keep`` too when it is given."""
    out = {}
    for r in regions:
        if not r.perms.startswith("r"):
            continue
        raw = obj.mm.inner.read(r.start, r.end - r.start)
        for off in range(0, len(raw), page):
            key = r.start - obj.span[0] + off
            out[key] = hashlib.sha1(raw[off: off + page]).hexdigest()
            if keep is not None:
                keep[key] = raw[off: off + page]
    return out


def _calls(obj: LoadedObject) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """The trace with fd numbers replaced by "fd" (they differ between processes)."""
    out = []
    for c in obj.mm.calls:
        d = c.as_dict()
        if d.get("fd") is not None:
            d["fd"] = "fd"
        out.append(tuple(d.items()))
    return tuple(out)


def take_outcome(obj: LoadedObject, keep_bytes: bool = False) -> Outcome:
    """Read ``obj``'s outcome from its backend now (with the page bytes if ``keep_bytes``)."""
    start, end = obj.span
    regions = regions_in(obj.mm.inner.maps(), start, end)
    records = tuple(RegionRecord(r.start - start, r.end - r.start, r.perms, _file_backed(r),
                                 r.offset) for r in regions)
    relro = None if obj.relro is None else (obj.relro[0] - start, obj.relro[1] - start)
    raw: dict[int, bytes] | None = {} if keep_bytes else None
    hashes = _page_hashes(obj, regions, obj.plan.page_size, raw)
    irelative = tuple((p - start, r - start) for p, r in obj.relocations.irelative)
    return Outcome(end - start, records, hashes, relro, _calls(obj),
                   dict(obj.relocations.extern), irelative, tuple(obj.inits), raw,
                   obj.relocations.ran_resolvers)
