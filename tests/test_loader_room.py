"""``loader.reloc._room``: its per-segment branch (few writable segments) and its
binary-search branch (many) both give the bytes from each offset to the end of the segment
holding it, as a plain Python definition does."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from loader import reloc


def _plain(offs: list[int], segs: list[tuple[int, int]]) -> list[int]:
    """The definition, one offset at a time."""
    return [next((end - off for start, end in segs if start <= off < end), 0) for off in offs]


@st.composite
def _case(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int]]]:
    """Sorted disjoint segments (0 to 12 of them, either side of FEW_SEGMENTS) and offsets
    in and around them, up to the top of the 64-bit range."""
    cuts = sorted(draw(st.sets(st.integers(0, 2**64 - 1), max_size=24)))
    segs = [(a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if a < b]
    near = [x + d for a, b in segs for x in (a, b) for d in (-1, 0, 1) if 0 <= x + d < 2**64]
    offs = draw(st.lists(st.sampled_from(near) | st.integers(0, 2**64 - 1)
                         if near else st.integers(0, 2**64 - 1), max_size=40))
    return offs, segs


@given(_case())
def test_room_matches_the_definition(case: tuple[list[int], list[tuple[int, int]]]) -> None:
    offs, segs = case
    starts = np.array([a for a, _ in segs], dtype=np.uint64)
    ends = np.array([b for _, b in segs], dtype=np.uint64)
    got = reloc._room(np.array(offs, dtype=np.uint64), starts, ends)
    assert got.tolist() == _plain(offs, segs)


def test_both_branches_are_exercised() -> None:
    few = reloc.FEW_SEGMENTS
    for count in (1, few, few + 1, 3 * few):
        segs = [(100 * k, 100 * k + 50) for k in range(count)]
        offs = [o for k in range(count) for o in (100 * k - 1, 100 * k, 100 * k + 49,
                                                   100 * k + 50) if o >= 0]
        starts = np.array([a for a, _ in segs], dtype=np.uint64)
        ends = np.array([b for _, b in segs], dtype=np.uint64)
        got = reloc._room(np.array(offs, dtype=np.uint64), starts, ends)
        assert got.tolist() == _plain(offs, segs)
