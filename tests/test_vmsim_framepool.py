"""``vmsim.pagetable.FramePool``: the host mapping behind the frames is made at the first
allocation, so a space that never touches a page makes none; before that the zero page
reads as zeros, and afterwards frames behave as they always did (zeroed, numbered from 1,
growing without renumbering)."""

from __future__ import annotations

import numpy as np

from loader.mmap import MapFlags, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import AddressSpace
from vmsim.pagetable import FramePool

P = HOST_PAGE_SIZE
BASE = 0x5555_0000_0000
RW = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
FIXED = MapFlags.MAP_PRIVATE | MapFlags.MAP_FIXED


def test_no_host_mapping_until_the_first_frame() -> None:
    pool = FramePool(P)
    assert pool._map is None
    assert pool.in_use == 0
    assert not pool.data[0].any()  # the zero page
    frames = pool.alloc(3)
    assert frames.tolist() == [1, 2, 3]
    assert pool._map is not None
    assert len(pool.data) >= 16  # the first mapping has the pool's capacity
    assert not pool.data[frames].any()


def test_growth_keeps_frame_numbers_and_contents() -> None:
    pool = FramePool(P, capacity=2)
    first = pool.alloc(1)
    pool.data[first] = 7
    more = pool.alloc(40)
    assert more.tolist() == list(range(2, 42))
    assert (pool.data[first] == 7).all() and not pool.data[more].any()
    pool.free(first)
    again = pool.alloc(1)
    assert again.tolist() == first.tolist() and not pool.data[again].any()


def test_a_space_that_only_reads_untouched_memory_makes_no_host_mapping() -> None:
    space = AddressSpace()
    space.mmap_anonymous(BASE, 4 * P, RW, FIXED)
    assert space.read(BASE, 3 * P) == bytes(3 * P)  # the zero page, three times
    assert space.mmu.pool._map is None
    space.write(BASE + P + 5, b"abc")
    assert space.mmu.pool._map is not None
    assert space.read(BASE + P, 8) == b"\0" * 5 + b"abc"
    assert space.stats.frames == 1
    assert np.array_equal(np.frombuffer(space.read(BASE, P), np.uint8), np.zeros(P, np.uint8))
