"""Pictures of address spaces: maps, page states, before/after, and a trace of Mmap calls.

This module sits on top of the layers: it reads only ``loader.mmap.Region`` lists (what any
backend's ``maps()`` returns) and plain sequences, so it draws the simulator and the real kernel
alike. It imports matplotlib but never picks a backend; pyplot is touched only to make a figure
when the caller passes no ``ax``. Every plotting function takes an ``ax`` and returns it.

Colours follow gef/pwndbg ``vmmap``: by role first (code red, data purple, rodata plain,
guard cyan, extern stubs orange), then flags drawn on top (RELRO hatched, W+X hatched red).
Regions are drawn to scale among themselves; gaps between them are compressed to one band that
states their size. Anonymous regions are named by what they are (``.bss``, ``extern``: see
:func:`region_names`), and a picture sizes itself to what it holds (its labels, legend and
title across, its regions down). Tests find what was drawn through each artist's ``gid`` (see
``GIDS``).

Inputs: :class:`MapsRecorder` wraps any backend and keeps the maps after every call (the frames
of :func:`plot_trace` and :func:`animate_trace`); :func:`page_states` reads a simulator's page
table for :func:`plot_pages`.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import textwrap
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from matplotlib.collections import PolyCollection
from matplotlib.patches import Patch, Rectangle

from loader.mmap import MapFlags, Mmap, ProtFlags, Region
from loader.mmap import Mapping as MmapResult
from loader.pages import HOST_PAGE_SIZE

if TYPE_CHECKING:
    from matplotlib.animation import FuncAnimation
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "EXTERN_PATHS",
    "GIDS",
    "MapsRecorder",
    "PAGE_COLORS",
    "ROLE_COLORS",
    "ROLE_LEGEND",
    "PageState",
    "TraceStep",
    "animate_trace",
    "annotate_address",
    "changed_regions",
    "format_call",
    "format_size",
    "host_page_states",
    "page_states",
    "plot_before_after",
    "plot_loaded",
    "plot_map",
    "plot_pages",
    "plot_trace",
    "printable",
    "region_names",
    "region_role",
    "relative",
    "trace_frames",
]

# ---------------------------------------------------------------------------------------------
# Roles and colours

EXTERN_PATHS: tuple[str, ...] = ("[extern]",)
"""Paths that mark the loader's mapping of stubs for unresolved/extern symbols."""

ROLE_COLORS: dict[str, str] = {
    "code": "#e8554e",     # red, as vmmap prints executable mappings
    "data": "#9b6fd0",     # purple: writable
    "rodata": "#f4f4f4",   # plain: read-only
    "guard": "#5fd3e0",    # cyan: PROT_NONE (reservations, guard pages)
    "extern": "#f5a623",   # orange: the loader's extern stubs
}
ROLE_LEGEND: dict[str, str] = {
    "code": "code (x)",
    "data": "data (w)",
    "rodata": "rodata (r only)",
    "guard": "guard / reserved (---)",
    "extern": "extern stubs",
}
RELRO_HATCH = "///"
WX_HATCH = "xxx"
WX_COLOR = "#b00000"
CHANGED_COLOR = "#f2c200"

GIDS: dict[str, str] = {
    "region": "region:<start hex>: one Rectangle per region, facecolor = its role",
    "relro": "relro:<start hex>: hatched overlay on the part of a region inside RELRO",
    "wx": "wx:<start hex>: red hatched overlay on a writable+executable region",
    "changed": "changed:<start hex>: thick yellow outline on a region that differs",
    "gap": "gap:<start hex>: the compressed band for an unmapped gap (its Text has the size)",
    "unmapped": "unmapped:<start hex>: a band this map leaves empty beyond its own regions",
    "label": "label:<start hex>: the Text naming a region",
    "header": "header: the column titles above the labels",
    "shortened": "shortened:<start hex>: the zigzag on a region drawn shorter than to scale",
    "touched": "touched: the bar (Line2D) beside the range a traced call acted on",
    "annotation": "annotation:<addr hex>: the line and Text of annotate_address",
    "pages": "pages: the PolyCollection of page cells in plot_pages",
    "cell": "cell:<index>: the Text written in page cell <index> (cell_text)",
}
"""How tests and users find what a picture contains: each artist's ``gid``."""


def region_role(region: Region, *, extern_paths: Iterable[str] = EXTERN_PATHS,
                extern: tuple[int, int] | None = None) -> str:
    """The role of a region: "extern", "guard", "code", "data" or "rodata".

    "extern" when the path is one of ``extern_paths`` or the region lies inside the
    ``extern`` range (the loader's stub mapping is anonymous: pass
    ``obj.relocations.extern_range``); otherwise the permissions decide, x before w.
    """
    if region.path in tuple(extern_paths):
        return "extern"
    if extern is not None and extern[0] <= region.start and region.end <= extern[1]:
        return "extern"
    if region.prot == ProtFlags.PROT_NONE:
        return "guard"
    if region.prot & ProtFlags.PROT_EXEC:
        return "code"
    if region.prot & ProtFlags.PROT_WRITE:
        return "data"
    return "rodata"


def _is_wx(region: Region) -> bool:
    both = ProtFlags.PROT_WRITE | ProtFlags.PROT_EXEC
    return (region.prot & both) == both


def format_size(nbytes: int) -> str:
    """``nbytes`` in binary units with at most one decimal: "4 KiB", "1.9 GiB", "12 B"."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def printable(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (surrogate escapes) as ``\\xff``: what
    a font can draw."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _object_name(region: Region) -> str:
    if not region.path:
        return "[anon]"
    return printable(region.path.rsplit("/", 1)[-1])


def region_names(regions: Sequence[Region], *, extern: tuple[int, int] | None = None,
                 extern_paths: Iterable[str] = EXTERN_PATHS) -> list[str]:
    """The name each view gives each region of ``regions`` (in address order): the file's
    name; "extern" for the loader's stub mapping (:func:`region_role`); ".bss" for anonymous
    writable memory right after a file mapping (the part of a segment's .bss past its last
    file page, which the loader maps anonymously); "[anon]" for other anonymous memory."""
    names = []
    previous: Region | None = None
    for region in regions:
        if region_role(region, extern_paths=extern_paths, extern=extern) == "extern":
            names.append("extern")
        elif region.path:
            names.append(_object_name(region))
        elif (previous is not None and previous.end == region.start and _file_backed(previous)
              and region.prot & ProtFlags.PROT_WRITE and region.prot & ProtFlags.PROT_READ):
            names.append(".bss")
        else:
            names.append("[anon]")
        previous = region
    return names


def _file_backed(region: Region) -> bool:
    return bool(region.inode) or region.path.startswith("/")


def _region_label(region: Region, name_width: int = 0, offset_width: int = 0,
                  name: str | None = None) -> str:
    offset = f"{region.offset:#x}" if _file_backed(region) else "-"
    shown = _object_name(region) if name is None else name
    return (f"{shown:<{name_width}}  {region.perms}  {offset:>{offset_width}}  "
            f"{format_size(region.length)}")


def _key(region: Region) -> tuple[int, int, int, bool, int, str]:
    return (region.start, region.end, int(region.prot), region.shared, region.offset,
            region.path)


def relative(regions: Iterable[Region], base: int, end: int | None = None) -> list[Region]:
    """The regions inside ``[base, end)`` (all from ``base`` up when ``end`` is None) with
    addresses made relative to ``base``: to draw two backends' maps on one scale."""
    return [dataclasses.replace(r, start=r.start - base, end=r.end - base)
            for r in sorted(regions, key=lambda r: r.start)
            if base <= r.start and (end is None or r.end <= end)]


def changed_regions(before: Sequence[Region], after: Sequence[Region]) -> list[Region]:
    """The regions of ``after`` that do not appear identically (same range, perms, offset,
    path) in ``before``: what a step created or changed."""
    old = {_key(r) for r in before}
    return [r for r in after if _key(r) not in old]


# ---------------------------------------------------------------------------------------------
# Layout: addresses -> drawing height (regions to scale, gaps compressed)

@dataclass(frozen=True)
class _Layout:
    """A monotone piecewise-linear map from address to y (downwards, like a maps listing)."""

    bounds: npt.NDArray[np.float64]
    ys: npt.NDArray[np.float64]
    gaps: list[tuple[int, int]] = field(default_factory=list)
    shortened: list[tuple[int, int]] = field(default_factory=list)

    def y(self, addr: int) -> float:
        return float(np.interp(float(addr), self.bounds, self.ys))

    @property
    def height(self) -> float:
        return float(self.ys[-1]) if len(self.ys) else 1.0


def _layout(maps: Sequence[Sequence[Region]], *, min_height: float, max_height: float,
            gap_height: float, median_height: float) -> _Layout:
    """Lay out the union of several maps, so one address sits at one height in all of them.

    Each covered piece between consecutive boundaries gets a height proportional to its
    length (at least ``min_height``, at most ``max_height``: longer ones are drawn shortened);
    each uncovered piece (a gap) gets ``gap_height``. The median covered piece gets
    ``median_height``, which sets the scale.
    """
    regions = [r for m in maps for r in m]
    if not regions:
        return _Layout(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    edge_ints = sorted({a for r in regions for a in (r.start, r.end)})
    edges = np.array(edge_ints, dtype=np.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    covered = _coverage(regions, mids) > 0
    lengths = np.diff(edges)
    unit = max(float(np.median(lengths[covered])) / median_height, 1.0)
    heights = np.where(covered, np.clip(lengths / unit, min_height, max_height), gap_height)
    ys = np.concatenate([[0.0], np.cumsum(heights)])
    pieces = list(itertools.pairwise(edge_ints))
    flags = [bool(c) for c in covered]
    sizes: list[float] = lengths.tolist()
    gaps = [p for p, c in zip(pieces, flags, strict=True) if not c]
    short = [p for p, c, ln in zip(pieces, flags, sizes, strict=True)
             if c and ln / unit > max_height]
    return _Layout(edges, ys, gaps, short)


def _coverage(regions: Sequence[Region], points: npt.NDArray[np.float64]
              ) -> npt.NDArray[np.int64]:
    """How many of ``regions`` contain each of ``points`` (start <= p < end), in
    O((n + m) log n): the regions started at p minus those already ended at p."""
    starts = np.sort(np.array([r.start for r in regions], dtype=np.float64))
    ends = np.sort(np.array([r.end for r in regions], dtype=np.float64))
    started = np.searchsorted(starts, points, side="right")
    ended = np.searchsorted(ends, points, side="right")
    return np.asarray(started - ended, dtype=np.int64)


def _layout_for(maps: Sequence[Sequence[Region]]) -> _Layout:
    return _layout(maps, min_height=0.55, max_height=8.0, gap_height=0.9, median_height=1.0)


INCH_PER_UNIT = 0.28
"""Inches of picture per unit of layout height (a region of the median length is one unit,
the smallest 0.55: room for one line of 8-point text)."""
_MONO_EM = 0.602
"""The advance of one character of a monospace font, in ems (DejaVu Sans Mono)."""
_LEGEND_INCHES = 4.4
"""The width two columns of the legend take at 8 points."""
_TICKS_INCHES = 1.4
"""The address ticks and the axis label left of the bar, at 8 points."""


def _text_inches(chars: int, fontsize: float, em: float = _MONO_EM) -> float:
    """The width of ``chars`` characters at ``fontsize`` points, in inches."""
    return chars * fontsize * em / 72.0


def _fit_width(maps: Sequence[Sequence[Region]], fontsize: float,
               title: str | None = None) -> float:
    """The width of one map's picture, in inches, from what it holds: the bar and the
    longest label (the labels take the axes' right ``1 - _TEXT_X``), the legend, the title."""
    longest = 0
    for regions in maps:
        ordered = sorted(regions, key=lambda r: r.start)
        names = region_names(ordered)
        width = max([len("object")] + [len(n) for n in names])
        offsets = max([len("offset")] + [len(f"{r.offset:#x}") for r in ordered])
        longest = max([longest] + [len(_region_label(r, width, offsets, n) + "  RELRO")
                                   for r, n in zip(ordered, names, strict=True)])
    labels = _text_inches(longest, fontsize) / (1.0 - _TEXT_X)
    heading = max((len(line) for line in (title or "").splitlines()), default=0)
    return max(_TICKS_INCHES + labels, _LEGEND_INCHES * fontsize / 8.0,
               _text_inches(heading, fontsize + 2, em=0.55) + _TICKS_INCHES, 3.0)


def _new_axes(layout: _Layout, ncols: int = 1, width: float = 8.5) -> list[Axes]:
    """A figure sized to its content: ``width`` inches a column, ``INCH_PER_UNIT`` per unit
    of the layout's height plus room for the title and the legend."""
    import matplotlib.pyplot as plt

    height = min(max(INCH_PER_UNIT * layout.height + 1.6, 2.5), 40.0)
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False,
                             layout="constrained")
    del fig
    return list(axes[0])


# ---------------------------------------------------------------------------------------------
# Maps

_BAR = (0.0, 0.40)      # x extent of the bars; labels start at _TEXT_X
_TEXT_X = 0.43
MAX_LABELS = 150
"""At most about this many texts in one column of a map (region labels, address ticks, gap
sizes): a map with more regions labels only those spaced apart enough to be read, and its
legend says how many went unlabelled. Keeps a picture of thousands of regions linear in cost."""


def _spaced(ys: Sequence[float], height: float, limit: int = MAX_LABELS) -> list[int]:
    """Indices of ``ys`` (ascending heights) to write text at: all of them when there are at
    most ``limit``, else a greedy pick in one pass keeping those at least ``height / limit``
    below the last one kept (no pairwise overlap checks)."""
    if len(ys) <= limit:
        return list(range(len(ys)))
    spacing = height / limit
    kept: list[int] = []
    last = -math.inf
    for i, y in enumerate(ys):
        if y - last >= spacing:
            kept.append(i)
            last = y
    return kept


@dataclass
class _MapStyle:
    relro: tuple[int, int] | None = None
    labels: Mapping[int, str] | Sequence[str] | None = None
    extern_paths: tuple[str, ...] = EXTERN_PATHS
    extern: tuple[int, int] | None = None
    role_of: Callable[[Region], str] | None = None
    changed: set[tuple[int, int, int, bool, int, str]] = field(default_factory=set)
    changed_word: str = "changed"
    changed_legend: str | None = None
    touched: tuple[int, int] | None = None
    fontsize: float = 8.0
    name_width: int = 0
    offset_width: int = 0
    names: dict[int, str] = field(default_factory=dict)
    roles_seen: set[str] = field(default_factory=set)
    flags_seen: set[str] = field(default_factory=set)
    unlabelled: set[int] = field(default_factory=set)


def _label_for(style: _MapStyle, index: int, region: Region) -> str:
    default = _region_label(region, style.name_width, style.offset_width,
                            style.names.get(region.start))
    if style.labels is None:
        return default
    if isinstance(style.labels, Mapping):
        return style.labels.get(region.start, default)
    return style.labels[index]


def _add_bar(ax: Axes, patch: Rectangle) -> None:
    """Add a bar's patch without matplotlib's per-patch data-limit update (the map sets its
    own limits) and out of the layout computations (it lies inside the axes): linear in the
    number of regions, where add_patch's update and tight-bbox passes dominated."""
    patch.set_in_layout(False)
    ax.add_artist(patch)


def _draw_region(ax: Axes, index: int, region: Region, layout: _Layout,
                 style: _MapStyle) -> None:
    top, bottom = layout.y(region.start), layout.y(region.end)
    role = style.role_of(region) if style.role_of else region_role(
        region, extern_paths=style.extern_paths, extern=style.extern)
    style.roles_seen.add(role)
    x0, x1 = _BAR
    tag = f"{region.start:#x}"
    _add_bar(ax, Rectangle((x0, top), x1 - x0, bottom - top, facecolor=ROLE_COLORS[role],
                           edgecolor="#333333", linewidth=0.8, gid=f"region:{tag}"))
    if _is_wx(region):
        style.flags_seen.add("wx")
        _add_bar(ax, Rectangle((x0, top), x1 - x0, bottom - top, facecolor="none",
                               edgecolor=WX_COLOR, hatch=WX_HATCH, linewidth=2.0,
                               gid=f"wx:{tag}"))
    in_relro = False
    if style.relro is not None:
        lo, hi = max(region.start, style.relro[0]), min(region.end, style.relro[1])
        if lo < hi:
            in_relro = True
            style.flags_seen.add("relro")
            _add_bar(ax, Rectangle((x0, layout.y(lo)), x1 - x0, layout.y(hi) - layout.y(lo),
                                   facecolor="none", edgecolor="#222222", hatch=RELRO_HATCH,
                                   linewidth=0.0, gid=f"relro:{tag}"))
    text = _label_for(style, index, region) + ("  RELRO" if in_relro else "")
    if _key(region) in style.changed:
        style.flags_seen.add("changed")
        _add_bar(ax, Rectangle((x0, top), x1 - x0, bottom - top, facecolor="none",
                               edgecolor=CHANGED_COLOR, linewidth=3.0, gid=f"changed:{tag}"))
        text += f"  ◀ {style.changed_word}"
    if _is_wx(region):
        text += "  W+X!"
    if index in style.unlabelled:
        return
    ax.text(_TEXT_X, (top + bottom) / 2, text, va="center", ha="left",
            fontsize=style.fontsize, family="monospace", gid=f"label:{tag}",
            color=WX_COLOR if _is_wx(region) else "black")


def _uncovered_runs(regions: Sequence[Region], layout: _Layout) -> list[tuple[int, int]]:
    """The address runs of the layout that no region of this map covers, merged."""
    edges = [int(b) for b in layout.bounds.tolist()] if regions else []
    if len(edges) < 2:
        return []
    mids = (layout.bounds[:-1] + layout.bounds[1:]) / 2
    empty = (_coverage(regions, mids) == 0).tolist()
    runs: list[tuple[int, int]] = []
    for (lo, hi), free in zip(itertools.pairwise(edges), empty, strict=True):
        if not free:
            continue
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def _draw_gaps(ax: Axes, regions: Sequence[Region], layout: _Layout, fontsize: float) -> bool:
    """Draw each unmapped run as a dashed band stating its size: "gap" between this map's
    regions, "unmapped" beyond them (where another frame or side has something). Returns
    whether any band was drawn."""
    x0, x1 = _BAR
    hull = (regions[0].start, max(r.end for r in regions)) if regions else (0, 0)
    runs = _uncovered_runs(regions, layout)
    written = set(_spaced([(layout.y(lo) + layout.y(hi)) / 2 for lo, hi in runs],
                          layout.height))
    for i, (lo, hi) in enumerate(runs):
        top, bottom = layout.y(lo), layout.y(hi)
        kind = "gap" if hull[0] <= lo and hi <= hull[1] else "unmapped"
        _add_bar(ax, Rectangle((x0, top), x1 - x0, bottom - top, facecolor="none",
                               edgecolor="#aaaaaa", linestyle=(0, (2, 2)), linewidth=0.8,
                               gid=f"{kind}:{lo:#x}"))
        if i not in written:
            continue
        ax.text((x0 + x1) / 2, (top + bottom) / 2, f"{kind} {format_size(hi - lo)}",
                ha="center", va="center", fontsize=fontsize, style="italic",
                color="#555555", gid=f"{kind}:{lo:#x}")
    return bool(runs)


def _draw_shortened(ax: Axes, regions: Sequence[Region], layout: _Layout) -> bool:
    """Mark this map's pieces drawn shorter than to scale with a white zigzag across the bar.
    Returns whether there was any."""
    x0, x1 = _BAR
    pieces = layout.shortened
    mids = np.array([(lo + hi) / 2 for lo, hi in pieces], dtype=np.float64)
    inside = _coverage(regions, mids) > 0 if pieces and regions else np.zeros(len(pieces), bool)
    mine = [piece for piece, drawn in zip(pieces, inside.tolist(), strict=True) if drawn]
    for lo, hi in mine:
        mid = (layout.y(lo) + layout.y(hi)) / 2
        xs = np.linspace(x0, x1, 9)
        zig = mid + np.where(np.arange(9) % 2 == 0, -0.12, 0.12)
        ax.plot(xs, zig, color="white", linewidth=3.0, gid=f"shortened:{lo:#x}")
        ax.plot(xs, zig, color="#333333", linewidth=0.8)
    return bool(mine)


def _legend_handles(style: _MapStyle, has_gap: bool, has_short: bool) -> list[Patch]:
    roles = [r for r in ROLE_COLORS if r in style.roles_seen] or list(ROLE_COLORS)
    handles = [Patch(facecolor=ROLE_COLORS[r], edgecolor="#333333", label=ROLE_LEGEND[r])
               for r in roles]
    if "relro" in style.flags_seen:
        handles.append(Patch(facecolor="white", edgecolor="#222222", hatch=RELRO_HATCH,
                             label="RELRO (read-only after relocation)"))
    if "wx" in style.flags_seen:
        handles.append(Patch(facecolor="white", edgecolor=WX_COLOR, hatch=WX_HATCH,
                             label="W+X: writable and executable!"))
    if "changed" in style.flags_seen:
        handles.append(Patch(facecolor="white", edgecolor=CHANGED_COLOR, linewidth=3.0,
                             label=style.changed_legend or style.changed_word))
    if "touched" in style.flags_seen:
        handles.append(Patch(facecolor="black", edgecolor="black",
                             label="range this call acted on"))
    if has_gap:
        handles.append(Patch(facecolor="white", edgecolor="#aaaaaa", linestyle=(0, (2, 2)),
                             label="unmapped (gaps not to scale)"))
    if has_short:
        handles.append(Patch(facecolor="#dddddd", edgecolor="#333333",
                             label="≈ big region drawn shortened"))
    if style.unlabelled:
        handles.append(Patch(facecolor="none", edgecolor="none",
                             label=f"+{len(style.unlabelled)} more regions not labelled "
                             "(too many to read)"))
    return handles


def _address_ticks(ax: Axes, regions: Sequence[Region], layout: _Layout,
                   fontsize: float) -> None:
    ends_of_runs = [a.end for a, b in itertools.pairwise(regions) if a.end != b.start]
    marks = sorted({r.start for r in regions} | set(ends_of_runs)
                   | ({regions[-1].end} if regions else set()))
    ys = [layout.y(a) for a in marks]
    kept = _spaced(ys, layout.height)
    ax.set_yticks([ys[i] for i in kept], [f"{marks[i]:#014x}" for i in kept],
                  fontsize=fontsize, family="monospace")


_LAYOUTS: weakref.WeakKeyDictionary[Axes, _Layout] = weakref.WeakKeyDictionary()
"""The layout each map was drawn with, so :func:`annotate_address` can find an address."""


def _draw_map(ax: Axes, regions: Sequence[Region], layout: _Layout, style: _MapStyle,
              title: str | None) -> Axes:
    regions = sorted(regions, key=lambda r: r.start)
    _LAYOUTS[ax] = layout
    style.names = dict(zip([r.start for r in regions],
                           region_names(regions, extern=style.extern,
                                        extern_paths=style.extern_paths), strict=True))
    style.name_width = max([len("object")] + [len(n) for n in style.names.values()])
    style.offset_width = max([len("offset")] + [len(f"{r.offset:#x}") for r in regions])
    if style.labels is None and regions:
        header = (f"{'object':<{style.name_width}}  perm  {'offset':>{style.offset_width}}  "
                  "size")
        ax.text(_TEXT_X, 0.0, header, va="bottom", ha="left", fontsize=style.fontsize,
                family="monospace", color="#555555", gid="header")
    centres = [(layout.y(r.start) + layout.y(r.end)) / 2 for r in regions]
    style.unlabelled = set(range(len(regions))) - set(_spaced(centres, layout.height))
    for index, region in enumerate(regions):
        _draw_region(ax, index, region, layout, style)
    has_gap = _draw_gaps(ax, regions, layout, style.fontsize)
    if style.touched is not None:
        style.flags_seen.add("touched")
        lo, hi = style.touched
        x = _BAR[1] + 0.006
        ax.plot([x, x], [layout.y(lo), layout.y(hi)], color="black", linewidth=4.0,
                solid_capstyle="butt", marker="<", markevery=[0], markersize=8,
                gid="touched")
    has_short = _draw_shortened(ax, regions, layout)
    _address_ticks(ax, regions, layout, style.fontsize)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(layout.height, 0.0)
    ax.set_xticks([])
    ax.set_ylabel("address (lowest at the top)", fontsize=style.fontsize)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    handles = _legend_handles(style, has_gap, has_short)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2,
              fontsize=style.fontsize, frameon=False)
    if title is not None:
        ax.set_title(title, fontsize=style.fontsize + 2, loc="left", pad=14)
    return ax


def annotate_address(ax: Axes, addr: int, text: str, *, color: str = "#c00000",
                     fontsize: float = 7.5) -> Axes:
    """Mark ``addr`` on a map this module drew on ``ax``: a line across the bar at its height
    and ``text`` on it (a fault, a symbol). ValueError when ``ax`` holds no such map."""
    layout = _LAYOUTS.get(ax)
    if layout is None:
        raise ValueError("annotate_address: draw a map on this ax first (plot_map, "
                         "plot_before_after, plot_trace)")
    y = layout.y(addr)
    ax.plot(list(_BAR), [y, y], color=color, linewidth=1.6, gid=f"annotation:{addr:#x}")
    count = sum(1 for t in ax.texts if (t.get_gid() or "").startswith("annotation:"))
    ax.text(_BAR[0] + 0.008, y, textwrap.fill(text, 30), ha="left",
            va="bottom" if count % 2 == 0 else "top", fontsize=fontsize, color=color,
            gid=f"annotation:{addr:#x}",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0})
    return ax


def plot_map(regions: Sequence[Region], ax: Axes | None = None, *,
             relro: tuple[int, int] | None = None,
             extern: tuple[int, int] | None = None,
             labels: Mapping[int, str] | Sequence[str] | None = None,
             extern_paths: Iterable[str] = EXTERN_PATHS,
             role_of: Callable[[Region], str] | None = None,
             title: str | None = None, fontsize: float = 8.0) -> Axes:
    """Draw a map of an address space, lowest address at the top as ``/proc/self/maps`` lists it.

    ``regions``: what a backend's ``maps()`` returns. ``relro``: an absolute (start, end) drawn
    hatched. ``extern``: the loader's stub range (``obj.relocations.extern_range``).
    ``labels``: per-region text (by start address, or a list in address order) in place of
    "name perms offset size". ``role_of`` overrides :func:`region_role`. Returns ``ax``.
    """
    regions = sorted(regions, key=lambda r: r.start)
    layout = _layout_for([regions])
    ax = ax if ax is not None else _new_axes(layout, width=_fit_width([regions], fontsize,
                                                                      title))[0]
    style = _MapStyle(relro=relro, labels=labels, extern_paths=tuple(extern_paths),
                      extern=extern, role_of=role_of, fontsize=fontsize)
    return _draw_map(ax, regions, layout, style, title)


def plot_loaded(obj: Any, ax: Axes | None = None, *, title: str | None = None,
                fontsize: float = 8.0) -> Axes:
    """Draw the map of an object ``loader.load`` returned: the regions of its span and of its
    extern-stub mapping, RELRO hatched, stubs in their colour. Returns ``ax``."""
    lo, hi = obj.span
    extern = getattr(obj.relocations, "extern_range", None)
    regions = [r for r in obj.mm.maps()
               if (lo <= r.start and r.end <= hi)
               or (extern is not None and extern[0] <= r.start and r.end <= extern[1])]
    name = str(obj.path).rsplit("/", 1)[-1]
    return plot_map(regions, ax, relro=obj.relro, extern=extern, fontsize=fontsize,
                    title=title if title is not None else f"{name} loaded at {lo:#x}")


def plot_before_after(before: Sequence[Region], after: Sequence[Region],
                      axes: Sequence[Axes] | None = None, *,
                      relro: tuple[int, int] | None = None,
                      relro_before: tuple[int, int] | None = None,
                      extern: tuple[int, int] | None = None,
                      titles: tuple[str, str] = ("before", "after"),
                      marks: tuple[str, str] = ("removed/changed", "new/changed"),
                      extern_paths: Iterable[str] = EXTERN_PATHS,
                      fontsize: float = 8.0) -> Sequence[Axes]:
    """Draw two maps side by side on one address scale; regions that differ are outlined.

    On the left, regions the step removed or changed; on the right, the ones it created or
    changed (``marks`` names them; to compare two backends, pass e.g. ("differs", "differs")).
    ``relro`` is hatched on the right, ``relro_before`` on the left. Returns the two axes.
    """
    before = sorted(before, key=lambda r: r.start)
    after = sorted(after, key=lambda r: r.start)
    layout = _layout_for([before, after])
    pair = list(axes) if axes is not None else _new_axes(
        layout, ncols=2, width=max(_fit_width([side], fontsize, title)
                                   for side, title in zip((before, after), titles, strict=True)))
    if len(pair) != 2:
        raise ValueError(f"axes: need exactly 2 axes, got {len(pair)}")
    common = {"extern_paths": tuple(extern_paths), "extern": extern, "fontsize": fontsize}
    left = _MapStyle(relro=relro_before,
                     changed={_key(r) for r in changed_regions(after, before)},
                     changed_word=marks[0], **common)  # type: ignore[arg-type]
    right = _MapStyle(relro=relro, changed={_key(r) for r in changed_regions(before, after)},
                      changed_word=marks[1], **common)  # type: ignore[arg-type]
    _draw_map(pair[0], before, layout, left, titles[0])
    _draw_map(pair[1], after, layout, right, titles[1])
    return pair


# ---------------------------------------------------------------------------------------------
# Page states

class PageState(enum.Enum):
    """What backs one page of a mapping, as the MMU and the kernel see it."""

    NOT_PRESENT = "not present"        # no page-table entry yet: first access will fault
    ZERO = "zero page"                 # anonymous, read but never written: the shared zero frame
    FILE = "shared file page"          # file page read (not written): the page cache's frame
    PRIVATE = "private copy"           # file page written: copied off the file (copy-on-write)
    DIRTY = "dirty"                    # anonymous page written: its own frame

    @classmethod
    def parse(cls, value: PageState | str) -> PageState:
        """Accept a PageState, its value ("zero page") or its name ("ZERO", "zero")."""
        if isinstance(value, PageState):
            return value
        for state in cls:
            if value in (state.value, state.name) or value.upper() == state.name:
                return state
        allowed = ", ".join(repr(s.value) for s in cls)
        raise ValueError(f"page state {value!r} is not one of {allowed}")


def page_states(space: Any, start: int, end: int) -> list[PageState]:
    """The state of each page of ``[start, end)`` in a ``vmsim.AddressSpace``, read from its
    page table (``space.pte``) and its maps; changes nothing. Addresses must be page-aligned.
    One page-table walk per page: meant for a region, not the whole 47-bit space.
    """
    from vmsim.mmu import PTE_COW, PTE_FILE, PTE_FRAME, PTE_P, PTE_PROTNONE

    page = int(space.page_size)
    if start % page or end % page or end < start:
        raise ValueError(f"page_states: [{start:#x}, {end:#x}) must be page-aligned, "
                         f"start <= end (page size {page:#x})")
    file_backed = [(r.start, r.end) for r in space.maps() if _file_backed(r)]
    states = []
    for va in range(start, end, page):
        pte = int(space.pte(va))
        if not pte & (PTE_P | PTE_PROTNONE):
            states.append(PageState.NOT_PRESENT)
        elif pte & PTE_FILE:
            states.append(PageState.FILE)
        elif pte & PTE_COW or not pte & PTE_FRAME:
            states.append(PageState.ZERO)
        elif any(lo <= va < hi for lo, hi in file_backed):
            states.append(PageState.PRIVATE)
        else:
            states.append(PageState.DIRTY)
    return states


_PM_PRESENT, _PM_FILE, _PM_EXCLUSIVE = 1 << 63, 1 << 61, 1 << 56
_PM_PFN = (1 << 55) - 1


def host_page_states(start: int, end: int, *, page_size: int = HOST_PAGE_SIZE) -> list[PageState]:
    """The state of each page of ``[start, end)`` in this very process, from the kernel's
    ``/proc/self/pagemap`` (present, file-or-shared, exclusive bits and, for root, the frame
    number) and ``/proc/self/maps``. A present anonymous page that is not exclusively mapped is
    the zero page (frame numbers, when visible, confirm it). Addresses must be page-aligned.
    """
    from loader.libc import read_maps

    if start % page_size or end % page_size or end < start:
        raise ValueError(f"host_page_states: [{start:#x}, {end:#x}) must be page-aligned, "
                         f"start <= end (page size {page_size:#x})")
    file_backed = [(r.start, r.end) for r in read_maps() if _file_backed(r)]
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(start // page_size * 8)
        words = np.frombuffer(pagemap.read((end - start) // page_size * 8), dtype="<u8")
    states = []
    for i, word in enumerate(words.tolist()):
        va = start + i * page_size
        if not word & _PM_PRESENT:
            states.append(PageState.NOT_PRESENT)
        elif word & _PM_FILE:
            states.append(PageState.FILE)
        elif any(lo <= va < hi for lo, hi in file_backed):
            states.append(PageState.PRIVATE)
        elif not word & _PM_EXCLUSIVE:
            states.append(PageState.ZERO)
        else:
            states.append(PageState.DIRTY)
    return states


PAGE_COLORS: dict[PageState, str] = {
    PageState.NOT_PRESENT: "#ffffff",
    PageState.ZERO: "#c9ddf0",
    PageState.FILE: "#7cc47f",
    PageState.PRIVATE: "#fdb56e",
    PageState.DIRTY: "#d9480f",
}


def plot_pages(states: Sequence[PageState | str], ax: Axes | None = None, *,
               start: int | None = None, page_size: int = HOST_PAGE_SIZE,
               columns: int | None = None, title: str | None = None,
               cell_text: Sequence[str] | None = None, fontsize: float = 8.0) -> Axes:
    """Draw one cell per page of a region, coloured by its state, ``columns`` cells a row.

    ``states``: one PageState (or its name) per page, in address order. ``start``: the
    region's first address, used to label each row. ``cell_text``: a short text per page
    written in its cell (e.g. its permissions, "r-x"). Returns ``ax``.
    """
    order = list(PageState)
    codes = np.array([order.index(PageState.parse(s)) for s in states], dtype=np.int64)
    ncols = columns or max(1, min(len(codes), 32))
    nrows = max(1, math.ceil(len(codes) / ncols))
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(max(4.0, 0.28 * ncols + 3.0), 0.3 * nrows + 1.8),
                             layout="constrained")
    idx = np.arange(len(codes))
    x, y = (idx % ncols).astype(np.float64), (idx // ncols).astype(np.float64)
    corners = np.array([[0.05, 0.05], [0.95, 0.05], [0.95, 0.95], [0.05, 0.95]])
    verts = np.stack([x, y], axis=1)[:, None, :] + corners[None, :, :]
    palette = [PAGE_COLORS[s] for s in order]
    cells = PolyCollection(list(verts), facecolors=[palette[c] for c in codes.tolist()],
                           edgecolors="#888888", linewidths=0.6)
    cells.set_gid("pages")
    ax.add_collection(cells)
    if cell_text is not None:
        if len(cell_text) != len(codes):
            raise ValueError(f"cell_text: {len(cell_text)} texts for {len(codes)} pages")
        for i, text in enumerate(cell_text):
            ax.text(x[i] + 0.5, y[i] + 0.5, text, ha="center", va="center",
                    fontsize=fontsize - 2.5, family="monospace", color="#333333",
                    gid=f"cell:{i}")
    ax.set_xlim(0.0, ncols)
    ax.set_ylim(nrows, 0.0)
    ax.set_aspect("equal")
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(ncols) + 0.5, [f"+{i}" if i % 4 == 0 else "" for i in range(ncols)],
                  fontsize=fontsize)
    ax.set_xlabel("page within the row", fontsize=fontsize)
    ax.xaxis.set_label_position("top")
    row_names = [f"{start + r * ncols * page_size:#x}" if start is not None else f"page {r * ncols}"
                 for r in range(nrows)]
    ax.set_yticks(np.arange(nrows) + 0.5, row_names, fontsize=fontsize, family="monospace")
    counts = np.bincount(codes, minlength=len(order))
    handles = [Patch(facecolor=PAGE_COLORS[s], edgecolor="#888888",
                     label=f"{s.value} ({counts[i]})") for i, s in enumerate(order)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3,
              fontsize=fontsize, frameon=False)
    ax.set_title(title or f"{len(codes)} pages, {format_size(len(codes) * page_size)}",
                 fontsize=fontsize + 2, loc="left", pad=6)
    return ax


# ---------------------------------------------------------------------------------------------
# Traces

@dataclass(frozen=True)
class TraceStep:
    """One recorded Mmap call: its name, arguments, result (or error), and the maps after it."""

    op: str
    args: dict[str, Any]
    result: Any
    maps: list[Region]
    error: str | None = None


class MapsRecorder:
    """An Mmap wrapper that records every call with the maps after it: one frame per call.

    Pass it where a backend goes (``loader.load(path, MapsRecorder(space))``); read
    ``frames`` afterwards. Calls are recorded by ``loader.trace.TracingMmap`` underneath
    (``inner``), so page size and backend detection see through it.
    """

    def __init__(self, inner: Mmap) -> None:
        from loader.trace import TracingMmap

        self.inner = TracingMmap(inner)
        self.frames: list[TraceStep] = []

    @property
    def page_size(self) -> int:
        """The wrapped backend's page size."""
        return self.inner.page_size

    runs_code = property(lambda self: self.inner.runs_code, doc="The wrapped backend's.")

    def _frame(self) -> None:
        self.frames.append(_as_step(self.inner.calls[-1], self.inner.maps()))

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> MmapResult:
        """Forward, then record the call and the maps after it (also when it fails)."""
        try:
            return self.inner.mmap(addr, length, prot, flags, offset, fd)
        finally:
            self._frame()

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """Forward and record, as :meth:`mmap`."""
        try:
            return self.inner.mmap_anonymous(addr, length, prot, flags)
        finally:
            self._frame()

    def munmap(self, addr: int, length: int) -> None:
        """Forward and record, as :meth:`mmap`."""
        try:
            self.inner.munmap(addr, length)
        finally:
            self._frame()

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """Forward and record, as :meth:`mmap`."""
        try:
            self.inner.mprotect(addr, length, prot)
        finally:
            self._frame()

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Forward and record, as :meth:`mmap`."""
        try:
            return self.inner.mmap_reserve(addr, length, use_file)
        finally:
            self._frame()

    def read(self, addr: int, n: int) -> bytes:
        """Forward (not recorded: reads change nothing)."""
        return self.inner.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        """Forward and record, as :meth:`mmap`."""
        try:
            self.inner.write(addr, data)
        finally:
            self._frame()

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Forward and record, as :meth:`mmap`."""
        try:
            self.inner.write_words(addrs, values)
        finally:
            self._frame()

    def maps(self) -> list[Region]:
        """Forward (not recorded)."""
        return self.inner.maps()


_RECORD_KEYS = ("op", "result", "maps", "error", "errno", "args")


def _errno_text(code: Any) -> str | None:
    import errno as errno_codes

    if code is None:
        return None
    return errno_codes.errorcode.get(int(code), str(code))


def _as_step(call: Any, maps: Any = None) -> TraceStep:
    """Accept a TraceStep, a dict (args nested under "args" or flat, as the JSON "calls"
    lists them), or a record with ``op``/``args``/``result`` (``loader.trace.Call``);
    ``maps`` (the maps after the call) from the record or given."""
    if isinstance(call, TraceStep):
        return call
    if isinstance(call, Mapping):
        args = dict(call.get("args") or {k: v for k, v in call.items() if k not in _RECORD_KEYS})
        maps = call.get("maps", maps)
        result = call.get("result")
        error = call.get("error") or _errno_text(call.get("errno"))
        op = call["op"]
    else:
        op, args = call.op, dict(getattr(call, "args", ()) or ())
        maps = getattr(call, "maps", maps)
        result = getattr(call, "result", None)
        error = getattr(call, "error", None) or _errno_text(getattr(call, "errno", None))
    if maps is None:
        raise ValueError(f"trace record for {op!r} has no maps-after; record the calls with "
                         "vmsim.viz.MapsRecorder(backend)")
    return TraceStep(str(op), args, result, [_as_region(r) for r in maps],
                     None if error is None else str(error))


def _as_region(region: Region | str | Mapping[str, Any]) -> Region:
    if isinstance(region, Region):
        return region
    if isinstance(region, str):
        return Region.parse(region)
    return Region(start=int(region["start"]), end=int(region["end"]),
                  prot=ProtFlags.from_rwx(str(region["perms"])),
                  shared=str(region["perms"]).endswith("s"),
                  offset=int(region.get("offset", 0)), path=str(region.get("path", "")))


def _touched(step: TraceStep) -> tuple[int, int] | None:
    """The address range a call acted on, from its arguments and result."""
    addr = step.args.get("addr")
    if step.op in ("mmap", "mmap_anonymous", "mmap_reserve") and isinstance(step.result, int):
        addr = step.result
    end = step.args.get("end")
    length = step.args.get("length")
    if not isinstance(addr, int):
        return None
    if isinstance(end, int):
        return addr, end
    return (addr, addr + length) if isinstance(length, int) and length > 0 else None


def trace_frames(calls: Iterable[Any], *, only_touched: bool = True) -> list[TraceStep]:
    """One frame per recorded call, in order: the call and the maps after it.

    Each call may be a TraceStep (as MapsRecorder makes), a dict or a record object; each map
    entry a Region, a ``/proc/self/maps`` line or a dict with start/end/perms/offset/path.
    ``only_touched`` keeps only regions overlapping an address range some call acted on, so
    a trace taken on the host does not show the whole process.
    """
    frames = [_as_step(c) for c in calls]
    if not only_touched:
        return frames
    ranges = [r for r in (_touched(f) for f in frames) if r is not None]
    if not ranges:
        return frames

    def keep(region: Region) -> bool:
        return any(region.start < hi and lo < region.end for lo, hi in ranges)

    return [TraceStep(f.op, f.args, f.result, [r for r in f.maps if keep(r)], f.error)
            for f in frames]


def _format_value(name: str, value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value)
    if name == "prot":
        return ProtFlags(int(value)).rwx
    if name == "flags" and isinstance(value, int):
        return "|".join(f.name or "" for f in MapFlags if f.value and f in MapFlags(value)
                        and f not in (MapFlags.MAP_TYPE, MapFlags.MAP_SHARED_VALIDATE)
                        ) or hex(value)
    if isinstance(value, int) and name not in ("fd", "count"):
        return hex(value)
    return repr(value) if isinstance(value, str) else str(value)


def format_call(step: TraceStep) -> str:
    """``mmap(addr=0x7f.., length=0x5000, prot=r-x, ...) -> 0x7f..`` for a frame title."""
    args = ", ".join(f"{k}={_format_value(k, v)}" for k, v in step.args.items()
                     if k != "need_copy")
    result = step.result.addr if hasattr(step.result, "addr") else step.result
    outcome = f"error {step.error}" if step.error else _format_value("result", result)
    if step.args.get("need_copy"):
        outcome += " (need_copy: the loader copies the bytes)"
    return f"{step.op}({args}) -> {outcome}"


@dataclass(frozen=True)
class _TraceView:
    frames: list[TraceStep]
    layout: _Layout
    relro: tuple[int, int] | None
    extern: tuple[int, int] | None
    extern_paths: tuple[str, ...]
    fontsize: float


def _trace_view(calls: Iterable[Any], relro: tuple[int, int] | None,
                extern: tuple[int, int] | None, extern_paths: Iterable[str],
                fontsize: float, only_touched: bool) -> _TraceView:
    frames = trace_frames(calls, only_touched=only_touched)
    if not frames:
        raise ValueError("calls: the trace is empty; record at least one Mmap call")
    layout = _layout_for([f.maps for f in frames])
    return _TraceView(frames, layout, relro, extern, tuple(extern_paths), fontsize)


_CALL_WIDTH = 72
"""A traced call is written in lines of at most this many characters above its frame."""


def _trace_width(view: _TraceView) -> float:
    """The width of a trace's frames: its maps' labels ("◀ new/changed" included) and the
    call written above them."""
    return _fit_width([f.maps for f in view.frames], view.fontsize, "x" * (_CALL_WIDTH + 4)) \
        + _text_inches(len("  ◀ new/changed"), view.fontsize)


def plot_trace(calls: Iterable[Any], ax: Axes | None = None, *, step: int = -1,
               relro: tuple[int, int] | None = None, extern: tuple[int, int] | None = None,
               extern_paths: Iterable[str] = EXTERN_PATHS, fontsize: float = 8.0,
               only_touched: bool = True) -> Axes:
    """Draw frame ``step`` of a trace: the maps after that call, what it changed outlined,
    the call itself as the title. All frames share one address scale. Returns ``ax``.
    ``relro`` is hatched from the first mprotect that makes it read-only onwards."""
    view = _trace_view(calls, relro, extern, extern_paths, fontsize, only_touched)
    index = range(len(view.frames))[step]
    ax = ax if ax is not None else _new_axes(view.layout, width=_trace_width(view))[0]
    _draw_frame(ax, view, index)
    return ax


def _relro_done(view: _TraceView, index: int) -> bool:
    """True once a call up to ``index`` made the RELRO range read-only."""
    if view.relro is None:
        return False
    return any(f.op == "mprotect" and f.args.get("addr") == view.relro[0]
               and f.args.get("prot") == int(ProtFlags.PROT_READ)
               for f in view.frames[: index + 1])


def _draw_frame(ax: Axes, view: _TraceView, index: int) -> None:
    frame = view.frames[index]
    before = view.frames[index - 1].maps if index else []
    style = _MapStyle(relro=view.relro if _relro_done(view, index) else None,
                      extern=view.extern, extern_paths=view.extern_paths,
                      fontsize=view.fontsize,
                      changed={_key(r) for r in changed_regions(before, frame.maps)},
                      changed_word="new/changed", touched=_touched(frame),
                      changed_legend="new/changed by this call")
    call = textwrap.fill(format_call(frame), width=_CALL_WIDTH, subsequent_indent="    ")
    title = f"step {index + 1}/{len(view.frames)}\n{call}"
    _draw_map(ax, frame.maps, view.layout, style, title)


def animate_trace(calls: Iterable[Any], fig: Figure | None = None, *, interval: int = 900,
                  relro: tuple[int, int] | None = None, extern: tuple[int, int] | None = None,
                  extern_paths: Iterable[str] = EXTERN_PATHS, fontsize: float = 8.0,
                  only_touched: bool = True) -> FuncAnimation:
    """An animation with one frame per call; in a notebook show it with ``.to_jshtml()``.

    Every frame is drawn on one address scale so regions do not jump between frames.
    """
    from matplotlib.animation import FuncAnimation

    view = _trace_view(calls, relro, extern, extern_paths, fontsize, only_touched)
    if fig is None:
        ax = _new_axes(view.layout, width=_trace_width(view))[0]
        fig = ax.get_figure()  # type: ignore[assignment]
        assert fig is not None
    else:
        ax = fig.axes[0] if fig.axes else fig.add_subplot()

    def draw(i: int) -> list[Any]:
        ax.clear()
        _draw_frame(ax, view, i)
        return []

    return FuncAnimation(fig, draw, frames=len(view.frames), interval=interval, repeat=False)
