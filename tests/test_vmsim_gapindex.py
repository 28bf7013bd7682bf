"""vmsim.vma.GapIndex, through the VmaMap that keeps it: after any sequence of mmaps and
munmaps, its buckets hold exactly the free gaps (each under its size class, sorted), and
top-down placement answers what a scan of the VMAs answers (the gap straddling the limit
included, which GapIndex.highest finds itself).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from loader.mmap import MapFlags, MmapError, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import AddressSpace
from vmsim.vma import VmaMap

P = HOST_PAGE_SIZE
BASE = 0x10_0000_0000
RW = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
PRIV = MapFlags.MAP_PRIVATE


def scan_topdown(vmas: VmaMap, length: int, low: int, high: int) -> int:
    """The start of the highest free range of ``length`` in ``[low, high)`` by walking every
    free gap (the reference), or -1."""
    best, edge = -1, 0
    for v in [*vmas, None]:
        gap_end = v.start if v is not None else vmas.task_size
        top = min(gap_end, high)
        if top - max(edge, low) >= length:
            best = top - length
        edge = v.end if v is not None else edge
    return best


def assert_buckets(vmas: VmaMap) -> None:
    """Every gap under its size class, each bucket sorted, the mask naming the non-empty."""
    gaps = vmas.gaps
    held = sorted((k, end) for k, bucket in gaps.ends.items() for end in bucket)
    assert held == sorted(((end - start).bit_length() - 1, end)
                          for end, start in gaps.start_of.items())
    assert all(bucket == sorted(bucket) for bucket in gaps.ends.values())
    assert gaps.mask == sum(1 << k for k, bucket in gaps.ends.items() if bucket)


ops = st.lists(st.tuples(st.sampled_from(["map", "fixed", "unmap"]),
                         st.integers(-64, 64), st.integers(1, 24)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops, st.sampled_from([BASE, BASE + 3 * P]))
def test_gaps_and_topdown_match_a_scan(steps: list[tuple[str, int, int]], base: int) -> None:
    space = AddressSpace(mmap_base=base)
    vmas = space.kernel.vmas
    for kind, page, pages in steps:
        addr, length = base + page * P, pages * P
        try:
            if kind == "map":
                space.mmap_anonymous(0, length, RW, PRIV)
            elif kind == "fixed":
                space.mmap_anonymous(addr, length, RW, PRIV | MapFlags.MAP_FIXED)
            else:
                space.munmap(addr, length)
        except MmapError:
            pass
        space.check()
        assert_buckets(vmas)
        for want in (P, 5 * P, 1 << 30):
            for low, high in ((P, base), (base - 40 * P, base), (P, base + 9 * P)):
                assert vmas.topdown(want, low, high) == scan_topdown(vmas, want, low, high)
