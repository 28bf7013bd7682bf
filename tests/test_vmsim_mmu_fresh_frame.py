"""``Mmu.fresh_frame``, the MMU's fast path for a user-mode write to a never-touched page
(with ``Kernel.first_write``): whatever the memory under the write, a space that takes the
fast path ends exactly as one that takes the general page-fault path (``translate_range``
and ``Kernel.page_fault``): the same PTEs, frames in use, counters, bytes, maps and faults.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loader.mmap import MapFlags, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import Access, AddressSpace, Fault

P = HOST_PAGE_SIZE
R, W = ProtFlags.PROT_READ, ProtFlags.PROT_WRITE
PRIV, SHARED, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_FIXED
BASE = 0x5555_0000_0000

Setup = Callable[[AddressSpace, int], None]
"""Maps something at BASE in a space (``int``: an open fd of a 3-page file)."""


def _anon(prot: ProtFlags, flags: MapFlags = PRIV) -> Setup:
    return lambda space, _fd: space.mmap_anonymous(BASE, 4 * P, prot, flags | FIXED) and None


def _file(prot: ProtFlags, flags: MapFlags = PRIV) -> Setup:
    return lambda space, fd: space.mmap(BASE, 4 * P, prot, flags | FIXED, 0, fd) and None


def _touched_by_read(space: AddressSpace, _fd: int) -> None:
    """Anonymous memory whose first page was read (the zero page, copy-on-write)."""
    space.mmap_anonymous(BASE, 4 * P, R | W, PRIV | FIXED)
    space.read(BASE, 1)


def _next_to_written(space: AddressSpace, _fd: int) -> None:
    """Two anonymous mappings side by side, the lower one written (an anon_vma to share)."""
    space.mmap_anonymous(BASE - P, P, R | W, PRIV | FIXED)
    space.write(BASE - P, b"x")
    space.mmap_anonymous(BASE, 4 * P, R | W, PRIV | FIXED)


def _copy_on_load(space: AddressSpace, _fd: int) -> None:
    """What the loader does with bytes: writable anonymous memory from mmap(fd=None)."""
    space.mmap(BASE, 4 * P, R, PRIV | FIXED, 0, None)


SETUPS: dict[str, Setup] = {
    "anon rw": _anon(R | W),
    "anon r": _anon(R),
    "anon none": _anon(ProtFlags.PROT_NONE),
    "shared anon rw": _anon(R | W, SHARED),
    "file private rw": _file(R | W),
    "file shared rw": _file(R | W, SHARED),
    "file private r": _file(R),
    "unmapped": lambda _space, _fd: None,
    "read first": _touched_by_read,
    "beside a written mapping": _next_to_written,
    "loader copy": _copy_on_load,
}


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "f"
    path.write_bytes(b"\xab" * (2 * P + 100))
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def _general_path_only(space: AddressSpace) -> AddressSpace:
    """``space`` with the fast path turned off: every write goes through page_fault."""
    space.mmu.fresh_frame = lambda _addr, _n, _access: -1  # type: ignore[method-assign]
    return space


def _state(space: AddressSpace) -> tuple[object, ...]:
    """Everything a write may change, as comparable values."""
    vmas = [(v.start, v.end, v.flags, v.pgoff, v.anon) for v in space.kernel.vmas]
    ptes = [space.pte(BASE + k * P) for k in range(-1, 5)]
    readable = [space.peek(BASE + k * P, 8) if space.check_access(BASE + k * P, 8, "r") is None
                else None for k in range(4)]
    return (space.stats, vmas, ptes, readable, [str(r) for r in space.maps()])


def _write(space: AddressSpace, addr: int, data: bytes) -> object:
    """The write's outcome: None, or the fault's fields."""
    try:
        space.write(addr, data)
    except Fault as fault:
        return (fault.addr, fault.access, fault.signal, fault.code)
    return None


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("where", [0, 100, P - 8, P + 7])
@pytest.mark.parametrize("size", [1, 8, 200])
def test_fast_and_general_paths_agree(name: str, where: int, size: int, fd: int) -> None:
    fast, general = AddressSpace(), _general_path_only(AddressSpace())
    results = []
    for space in (fast, general):
        SETUPS[name](space, fd)
        first = _write(space, BASE + where, bytes(range(1, size + 1)))
        again = _write(space, BASE + where + size, b"\x07")  # the page is now touched
        results.append((first, again, _state(space)))
    assert results[0] == results[1]


def test_fast_path_is_taken_for_a_loader_copy() -> None:
    """The case it exists for: one fault counted, a fresh frame, the PTE writable."""
    space = AddressSpace()
    space.mmap(BASE, 2 * P, R, PRIV | FIXED, 0, None)
    assert space.mmu.fresh_frame(BASE + 5, 10, Access.WRITE) >= 0
    assert space.stats.minor_faults == 1
    assert space.pte(BASE) & 2  # PTE_W
    assert space.mmu.fresh_frame(BASE + 5, 10, Access.WRITE) == -1  # has a PTE now


def test_dev_zero_private_takes_the_general_path() -> None:
    """/dev/zero's private mapping is anonymous memory with a file: left to page_fault."""
    zero = os.open("/dev/zero", os.O_RDWR)
    try:
        space = AddressSpace()
        space.mmap(BASE, P, R | W, PRIV | FIXED, 0, zero)
        assert space.kernel.first_write(BASE) == 0
        space.write(BASE, b"z")
        assert space.read(BASE, 1) == b"z"
        assert space.stats.minor_faults == 1
    finally:
        os.close(zero)
