"""The simulator's own surface, where the kernel cannot be asked directly or where the
simulator shows what the kernel hides: Fault codes, execute-only memory on a CPU with
protection keys, PTE words, counters, memory in proportion to pages touched, bulk accesses,
write_words, peek/poke, placement.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from loader.mmap import MapFlags, MmapError, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import AddressSpace, Fault
from vmsim.mmu import PTE_FILE, PTE_NX, PTE_P, PTE_PKEY_SHIFT, PTE_PROTNONE, PTE_U, PTE_W

P = HOST_PAGE_SIZE
NONE, R, W, X = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, SHARED, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_FIXED
BASE = 0x5555_0000_0000


def anon(space: AddressSpace, page: int, n: int, prot: ProtFlags,
         flags: MapFlags = PRIV) -> int:
    return space.mmap_anonymous(BASE + page * P, n * P, prot, flags | FIXED)


def fault_of(fn, *args) -> tuple[str, str, int]:  # type: ignore[no-untyped-def]
    with pytest.raises(Fault) as info:
        fn(*args)
    return info.value.signal, info.value.code, info.value.addr


@pytest.fixture
def space() -> AddressSpace:
    return AddressSpace()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    where = tmp_path / "data"
    where.write_bytes(bytes(range(256)) * (3 * P // 256) + b"end")
    return where


def test_fault_codes(space: AddressSpace, path: Path) -> None:
    anon(space, 0, 1, R)
    anon(space, 1, 1, NONE)
    fd = os.open(path, os.O_RDONLY)
    space.mmap(BASE + 4 * P, 8 * P, R, PRIV | FIXED, 0, fd)
    os.close(fd)
    assert fault_of(space.read, BASE + 2 * P + 5, 1) == ("SIGSEGV", "SEGV_MAPERR", BASE + 2 * P + 5)
    assert fault_of(space.read, BASE + P - 2, 4) == ("SIGSEGV", "SEGV_ACCERR", BASE + P)
    assert fault_of(space.write, BASE, b"x")[:2] == ("SIGSEGV", "SEGV_ACCERR")
    assert fault_of(space.fetch, BASE, 1)[:2] == ("SIGSEGV", "SEGV_ACCERR")
    assert fault_of(space.read, BASE + 8 * P, 1) == ("SIGBUS", "BUS_ADRERR", BASE + 8 * P)
    assert space.read(BASE + 7 * P, 5) == b"end\0\0"
    assert fault_of(space.read, 1 << 50, 1)[:2] == ("SIGSEGV", "SI_KERNEL")
    assert fault_of(space.read, -8, 1)[:2] == ("SIGSEGV", "SEGV_MAPERR")


@pytest.mark.parametrize("exec_only", [True, False])
def test_exec_only_memory(exec_only: bool) -> None:
    space = AddressSpace(exec_only=exec_only)
    anon(space, 0, 1, R | W)
    space.write(BASE, b"\xc3")
    space.mprotect(BASE, P, X)
    assert space.fetch(BASE, 1) == b"\xc3"
    if exec_only:
        assert fault_of(space.read, BASE, 1)[:2] == ("SIGSEGV", "SEGV_ACCERR")
        assert space.pte(BASE) >> PTE_PKEY_SHIFT & 0xF == 1
    else:
        assert space.read(BASE, 1) == b"\xc3"
    assert space.peek(BASE, 1) == b"\xc3"


def test_pte_words_follow_protection(space: AddressSpace) -> None:
    anon(space, 0, 2, R | W)
    assert space.pte(BASE) == 0  # nothing until touched
    space.write(BASE, b"x")
    pte = space.pte(BASE)
    assert pte & (PTE_P | PTE_W | PTE_U | PTE_NX) == PTE_P | PTE_W | PTE_U | PTE_NX
    frame = pte >> 12 & ((1 << 40) - 1)
    assert frame != 0
    space.mprotect(BASE, P, R | X)
    assert space.pte(BASE) & (PTE_P | PTE_W | PTE_NX) == PTE_P
    space.mprotect(BASE, P, NONE)
    pte = space.pte(BASE)
    assert pte & PTE_P == 0 and pte & PTE_PROTNONE and pte >> 12 & ((1 << 40) - 1) == frame
    space.mprotect(BASE, P, R)
    assert space.read(BASE, 1) == b"x"
    assert space.read(BASE + P, 1) == b"\0"  # the zero page, read-only
    assert space.pte(BASE + P) >> 12 & ((1 << 40) - 1) == 0
    assert space.pte(BASE + P) & PTE_W == 0


def test_counters(space: AddressSpace, path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    space.mmap(BASE, 3 * P, R | W, PRIV | FIXED, 0, fd)
    assert space.stats.minor_faults == 0 and space.stats.resident_pages == 0
    assert space.read(BASE + P, 2) == bytes([0, 1])
    assert space.pte(BASE + P) & PTE_FILE
    space.write(BASE + P, b"!")
    space.write(BASE + 2 * P, b"!")
    stats = space.stats
    assert stats.cow_copies == 2 and stats.resident_pages == 2
    assert os.pread(fd, 1, P) == b"\0"  # private: the file never changes
    os.close(fd)


def test_reservation_of_64_tib_costs_almost_nothing() -> None:
    space = AddressSpace()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    addr = space.mmap_reserve(None, 64 << 40, True)
    space.mprotect(addr + (1 << 40), P, R | W)
    space.write(addr + (1 << 40), b"one page")
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert space.stats.resident_pages == 1
    assert used < 64 << 10, used
    space.munmap(addr, 64 << 40)
    assert space.maps() == [] and space.stats.resident_pages == 0


def test_large_private_file_copies_nothing_until_written(space: AddressSpace,
                                                        tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as out:
        out.truncate(100 << 20)
    fd = os.open(big, os.O_RDONLY)
    addr = space.mmap(None, 100 << 20, R | W, PRIV, 0, fd).addr
    os.close(fd)
    assert space.stats.frames == 0
    space.write(addr + (50 << 20), b"x")
    assert space.stats.frames == 2  # the page-cache page and its private copy
    assert space.read(addr + (50 << 20), 2) == b"x\0"


def test_bulk_round_trip_across_leaves_and_scattered_frames(space: AddressSpace) -> None:
    rng = np.random.default_rng(1)
    anon(space, 0, 1100, R | W)
    anon(space, 2000, 4, R | W)
    for page in range(0, 1100, 7):  # scatter the frame numbers
        space.write(BASE + page * P, b"s")
        space.write(BASE + 2000 * P + (page % 4) * P, b"t")
    data = rng.integers(0, 256, 1100 * P - 300, dtype=np.uint8).tobytes()
    space.write(BASE + 100, data)
    assert space.read(BASE + 100, len(data)) == data
    assert space.read(BASE, 100) == b"s" + bytes(99)


def test_write_words_scatter_and_fault_prefix(space: AddressSpace) -> None:
    anon(space, 0, 2, R | W)
    anon(space, 2, 1, R)
    where = np.array([BASE + 8, BASE + P - 4, BASE + 3 * 8, BASE + P + 13], dtype=np.uint64)
    values = np.array([1, 0x1122334455667788, 3, 2**64 - 1], dtype=np.uint64)
    space.write_words(where, values)
    for addr, value in zip(where.tolist(), values.tolist(), strict=True):
        assert space.read(addr, 8) == value.to_bytes(8, "little")
    bad = np.array([BASE + 64, BASE + 2 * P + 8, BASE + 72], dtype=np.uint64)
    assert fault_of(space.write_words, bad, np.array([7, 8, 9], dtype=np.uint64)) == \
        ("SIGSEGV", "SEGV_ACCERR", BASE + 2 * P + 8)
    assert space.read(BASE + 64, 16) == (7).to_bytes(8, "little") + bytes(8)


def test_poke_and_peek(space: AddressSpace, path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    space.mmap(BASE, P, R | X, PRIV | FIXED, 0, fd)
    space.mmap(BASE + P, P, R, SHARED | FIXED, 0, fd)
    anon(space, 2, 1, NONE)
    space.poke(BASE, b"\xcc")  # a breakpoint in read-only code: a private copy
    assert space.read(BASE, 2) == b"\xcc\x01"
    assert os.pread(fd, 1, 0) == b"\0"
    assert space.read(BASE + P, 1) == b"\0"
    assert fault_of(space.poke, BASE + P, b"x")[:2] == ("SIGSEGV", "SEGV_ACCERR")
    assert space.peek(BASE + 2 * P, 4) == bytes(4)
    assert fault_of(space.peek, BASE + 3 * P, 1)[:2] == ("SIGSEGV", "SEGV_MAPERR")
    os.close(fd)


def test_placement_top_down_hint_and_32bit(space: AddressSpace) -> None:
    first = space.mmap_anonymous(0, P, R, PRIV)
    second = space.mmap_anonymous(0, P, R | W, PRIV)
    assert first == space.mmap_base - P and second == first - P
    assert space.mmap_anonymous(BASE + 5, P, R, PRIV) == BASE
    low = space.mmap_anonymous(0, P, R, PRIV | MapFlags.MAP_32BIT)
    assert 0x4000_0000 <= low < 0x8000_0000
    huge = space.mmap_anonymous(0, 4 << 20, R, PRIV)
    assert huge % (2 << 20) == 0
    with pytest.raises(MmapError):
        space.mmap_anonymous(0, 1 << 47, R, PRIV)


def test_placement_stays_flat_with_many_regions(space: AddressSpace) -> None:
    for k in range(3000):
        space.mmap_anonymous(0, P, R if k % 2 else R | W, PRIV)
    assert space.map_count == 3000
    addr = space.mmap_anonymous(0, P, R, PRIV)
    assert addr == space.mmap_base - 3001 * P
    space.munmap(space.mmap_base - 1500 * P, P)
    assert space.mmap_anonymous(0, P, R | X, PRIV) == space.mmap_base - 1500 * P
    space.check()


def test_close_releases_the_file_dups(path: Path) -> None:
    import gc
    gc.collect()  # earlier tests' garbage may still hold dups; count from a settled state
    fd = os.open(path, os.O_RDONLY)
    before = len(os.listdir("/proc/self/fd"))
    space = AddressSpace()
    space.mmap(BASE, P, R, PRIV | FIXED, 0, fd)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    space.close()
    assert len(os.listdir("/proc/self/fd")) == before and space.maps() == []
    space.mmap(BASE, P, R, PRIV | FIXED, 0, fd)
    del space
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(fd)


@pytest.mark.parametrize("page", [16384, 65536])
def test_other_page_sizes(page: int, tmp_path: Path) -> None:
    space = AddressSpace(page_size=page)
    assert space.page_size == page
    addr = space.mmap_anonymous(0, 3 * page - 5, R | W, PRIV)
    assert addr % page == 0 and space.maps()[0].length == 3 * page
    space.write(addr + page - 2, b"span")
    assert space.read(addr + page - 2, 4) == b"span"
    space.mprotect(addr + page, page, R)
    assert [r.perms for r in space.maps()] == ["rw-p", "r--p", "rw-p"]
    assert fault_of(space.write, addr + page, b"x")[:2] == ("SIGSEGV", "SEGV_ACCERR")
    with pytest.raises(MmapError):
        space.munmap(addr + 4096, page)  # a host page is not a simulated page
    where = tmp_path / "f"
    where.write_bytes(b"q" * (page + 10))
    fd = os.open(where, os.O_RDONLY)
    got = space.mmap(None, 3 * page, R, PRIV, page, fd).addr
    os.close(fd)
    assert space.read(got + 9, 2) == b"q\0"
    assert fault_of(space.read, got + page, 1)[:2] == ("SIGBUS", "BUS_ADRERR")
    space.check()
