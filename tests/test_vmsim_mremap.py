"""AddressSpace.mremap against this machine's kernel: the same scenario on both sides, the
same results after every step (address or errno, maps, bytes or the fatal signal).

The kernel's side is this process (real mremap through ctypes' ``syscall``), inside an arena
reserved far below its mmap base and fenced by two shared pages (nothing merges across them);
the simulator's side reserves the same arena. A mapping moved without MREMAP_FIXED lands
outside the arena (each side's own placement): it is compared relative to its new start.
Accesses that may fault on the kernel's side run in a forked child (loader.isolate).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import raw_load
from harness_sim import host_like_space
from test_process_syscalls import syscall

import vmsim
from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.mmap import MapFlags, MmapError, ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE
from vmsim import AddressSpace, Fault
from vmsim.remap import MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE

P = HOST_PAGE_SIZE
PAGES = 24
ARENA_HINT = 0x2400_0000_0000
RW, RO, NONE = ProtFlags(3), ProtFlags(1), ProtFlags(0)
PRIV, SHARED, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_FIXED
ANON = MapFlags.MAP_ANONYMOUS
MAYMOVE, MFIXED, DONTUNMAP = MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP
FILE_BYTES = 3 * P + P // 2  # a file ending mid-page: its fourth page is partly past EOF
_SYS_MREMAP = 25

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long] * 6


def real_mremap(addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> int:
    """The kernel's mremap(2) in this process; MmapError with its errno."""
    got = _libc.syscall(_SYS_MREMAP, addr, old_len, new_len, flags, new_addr)
    if got == -1:
        code = ctypes.get_errno()
        raise MmapError(code, f"mremap: {os.strerror(code)}")
    return got % (1 << 64)


class Side:
    """One side of the comparison: a backend, its arena, its copy of the file, and the
    mapping a move placed outside the arena (``moved``)."""

    def __init__(self, mm: Any, base: int, path: Path, remap: Any, load: Any) -> None:
        self.mm, self.base, self.remap, self.load = mm, base, remap, load
        self.arena = base + P
        self.path = os.path.realpath(path)
        self.fd = os.open(path, os.O_RDWR)
        self.zero = os.open("/dev/zero", os.O_RDWR)
        self.moved = 0
        self.outside: list[tuple[int, int]] = []

    def at(self, loc: int | str | tuple[int, int]) -> int:
        """An arena page number, ``(page, bytes past it)``, or ``"moved"`` (the mapping
        last moved outside the arena)."""
        if isinstance(loc, tuple):
            return self.arena + loc[0] * P + loc[1]
        return self.moved if loc == "moved" else self.arena + int(loc) * P

    def where(self, addr: int, length: int) -> int | str:
        """A returned address as the other side can compare it."""
        if self.arena <= addr < self.arena + PAGES * P:
            return (addr - self.arena) // P
        self.moved = addr
        self.outside.append((addr, length))
        return "moved"

    def maps(self, lo: int, hi: int) -> list[tuple[int, int, str, int, str]]:
        """Maps lines within ``[lo, hi)``, relative to ``lo``, the file named "F"."""
        rows = []
        regions: list[Region] = self.mm.maps()
        for r in regions:
            a, b = max(r.start, lo), min(r.end, hi)
            if a < b:
                kind = "F" if r.path == self.path else (r.path or "anon")
                offset = r.offset + (a - r.start) if r.path else 0
                rows.append((a - lo, b - lo, r.perms, offset, kind))
        return rows


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except MmapError as exc:
        return "errno", errno.errorcode[exc.errno or 0]


def _step(side: Side, op: tuple[Any, ...]) -> Any:
    """Run one step on one side; its comparable result."""
    kind, *args = op
    if kind == "mmap":   # page, pages, prot, flags, file page (None: anonymous; "zero")
        page, n, prot, flags, fpage = args
        fd = None if fpage is None else side.zero if fpage == "zero" else side.fd
        flags = flags | FIXED | (ANON if fpage is None else 0)
        fpage = 0 if fpage == "zero" else fpage
        got = _outcome(side.mm.mmap, side.at(page), n * P, prot, flags,
                       0 if fpage is None else fpage * P, fd)
        return got if got[0] == "errno" else ("ok", side.where(got[1].addr, n * P))
    if kind == "mremap":  # loc, old_len, new_len, flags, new loc (or a raw new_addr)
        loc, old_len, new_len, flags, new = args
        new_addr = 0 if new is None else side.at(new)
        got = _outcome(side.remap, side.at(loc), old_len, new_len, flags, new_addr)
        return got if got[0] == "errno" else ("ok", side.where(got[1], new_len))
    if kind == "write":  # loc, offset, bytes (must not fault)
        loc, offset, data = args
        side.mm.write(side.at(loc) + offset, data)
        return None
    if kind == "read":   # loc, offset, n: bytes or the fatal signal
        loc, offset, n = args
        return side.load(side.mm, side.at(loc) + offset, n)
    if kind == "pwrite":  # file offset, bytes
        os.pwrite(side.fd, args[1], args[0])
        return None
    if kind == "munmap":
        loc, n = args
        return _outcome(side.mm.munmap, side.at(loc), n * P)
    raise AssertionError(op)


def _real_read(_mm: LibcMmap, addr: int, n: int) -> bytes | str:
    """The bytes at ``addr`` as compiled code loads them, or the fatal signal's name."""
    got = run_isolated(raw_load, addr, n)
    return got.value if got.status == "ok" else got.status


def _sim_read(space: AddressSpace, addr: int, n: int) -> bytes | str:
    """The simulator's read, or the signal of its Fault."""
    try:
        return space.read(addr, n)
    except Fault as fault:
        return fault.signal


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    """The kernel's side and the simulator's, arenas at the same address, each with its
    own copy of the file."""
    content = bytes(range(1, 256)) * (FILE_BYTES // 255 + 1)
    k, s = LibcMmap(), host_like_space()
    fenced = (PAGES + 2) * P
    base = k.mmap_anonymous(ARENA_HINT, fenced, NONE, PRIV)
    s.mmap_anonymous(base, fenced, NONE, PRIV | FIXED)
    for mm in (k, s):
        mm.mmap_anonymous(base, P, NONE, SHARED | FIXED | ANON)
        mm.mmap_anonymous(base + fenced - P, P, NONE, SHARED | FIXED | ANON)
    paths = []
    for name in ("k", "s"):
        paths.append(tmp_path / f"file-{name}")
        paths[-1].write_bytes(content[:FILE_BYTES])
    for mm in (k, s):  # the arena's inside is a hole: room to grow in place
        mm.munmap(base + P, PAGES * P)
    kside = Side(k, base, paths[0], real_mremap, _real_read)
    sside = Side(s, base, paths[1], s.mremap, _sim_read)
    try:
        yield kside, sside
    finally:
        for addr, length in kside.outside:
            try:
                k.munmap(addr, length)
            except MmapError:
                pass
        k.munmap(base, fenced)
        s.close()
        for side in (kside, sside):
            os.close(side.fd)
            os.close(side.zero)


def run(sides: tuple[Side, Side], *ops: tuple[Any, ...]) -> list[Any]:
    """Each step on both sides: equal results, equal maps in the arena and around the
    moved mapping. Returns the results."""
    kside, sside = sides
    results = []
    for op in ops:
        got_k, got_s = _step(kside, op), _step(sside, op)
        assert got_k == got_s, op
        assert kside.maps(kside.arena, kside.arena + PAGES * P) == \
            sside.maps(sside.arena, sside.arena + PAGES * P), op
        if kside.moved:  # the moved mapping alone (its neighbours are each side's own)
            span = kside.outside[-1][1]
            assert kside.maps(kside.moved, kside.moved + span) == \
                sside.maps(sside.moved, sside.moved + span), op
        sside.mm.check()
        results.append(got_k)
    return results


# ---------------------------------------------------------------- errno cases

SETUP = (("mmap", 2, 4, RW, PRIV, None), ("mmap", 8, 2, RW, PRIV, None),
         ("mmap", 12, 2, RW, PRIV, 0), ("mmap", 16, 2, RW, SHARED, None))

ERRNO_CASES = {
    "unknown flag": ("mremap", 2, P, 2 * P, 8, None),
    "unaligned old address": ("mremap", (2, 8), P, 2 * P, MAYMOVE, None),
    "new length zero": ("mremap", 2, P, 0, MAYMOVE, None),
    "new length past the user space": ("mremap", 2, P, 1 << 47, MAYMOVE, None),
    "fixed without maymove": ("mremap", 2, P, P, MFIXED, 20),
    "fixed to an unaligned address": ("mremap", 2, P, P, MAYMOVE | MFIXED, (20, 8)),
    "fixed past the user space": ("mremap", 2, P, P, MAYMOVE | MFIXED, (0, 1 << 48)),
    "new_addr is ignored without FIXED": ("mremap", 2, 4 * P, 5 * P, MAYMOVE, (20, 8)),
    "fixed onto itself": ("mremap", 2, 2 * P, 2 * P, MAYMOVE | MFIXED, 3),
    "dontunmap with a resize": ("mremap", 2, P, 2 * P, MAYMOVE | DONTUNMAP, 20),
    "dontunmap without maymove": ("mremap", 2, P, P, DONTUNMAP, 20),
    "nothing mapped": ("mremap", 0, P, 2 * P, MAYMOVE, None),
    "nothing mapped, same size": ("mremap", 0, P, P, 0, None),
    "growth across the mapping's end": ("mremap", 2, 5 * P, 6 * P, MAYMOVE, None),
    "a fixed move across the mapping's end": ("mremap", 8, 3 * P, 3 * P, MAYMOVE | MFIXED, 20),
    "duplicating a private mapping": ("mremap", 2, 0, P, MAYMOVE, None),
    "duplicating a private file mapping": ("mremap", 12, 0, P, MAYMOVE, None),
    "growth blocked, no maymove": ("mremap", 2, 4 * P, 8 * P, 0, None),
    "growth of a non-final part, no maymove": ("mremap", 2, P, 2 * P, 0, None),
    "same size across the end": ("mremap", 8, 5 * P, 5 * P, 0, None),
    "shrink across the end and a hole": ("mremap", 8, 6 * P, P, 0, None),
    "unaligned lengths round up": ("mremap", 8, P + 1, 2 * P - 5, 0, None),
    "grow in place into the gap": ("mremap", 8, 2 * P, 4 * P, 0, None),
    "growth blocked, moved": ("mremap", 8, 2 * P, 4 * P + 1, MAYMOVE, None),
    "fixed replaces the target": ("mremap", 8, 2 * P, 2 * P, MAYMOVE | MFIXED, 3),
    "fixed with a shrink": ("mremap", 2, 4 * P, 2 * P, MAYMOVE | MFIXED, 19),
    "fixed with a shrink across mappings": ("mremap", 3, 6 * P, P, MAYMOVE | MFIXED, 19),
    "fixed with a growth across the end": ("mremap", 3, 4 * P, 5 * P, MAYMOVE | MFIXED, 19),
    "dontunmap across the end": ("mremap", 3, 4 * P, 4 * P, MAYMOVE | DONTUNMAP, None),
    "fixed with a growth": ("mremap", 8, 2 * P, 3 * P, MAYMOVE | MFIXED, 19),
    "duplicating a shared mapping": ("mremap", 16, 0, P, MAYMOVE | MFIXED, 20),
    "dontunmap to a fixed place": ("mremap", 2, 2 * P, 2 * P, MAYMOVE | DONTUNMAP | MFIXED, 19),
}


@pytest.mark.parametrize("name", sorted(ERRNO_CASES))
def test_results_errno_and_maps_equal_the_kernels(sides: tuple[Side, Side], name: str) -> None:
    run(sides, *SETUP, ERRNO_CASES[name], ("read", 2, 0, 8), ("read", 8, 0, 8))


# ---------------------------------------------------------------- moved pages


def test_a_move_carries_the_data_and_leaves_the_old_range_unmapped(
        sides: tuple[Side, Side]) -> None:
    """Grown where the gap above is taken (MREMAP_MAYMOVE): the written pages move, the
    rest reads as zeros, the old range is gone (SIGSEGV)."""
    results = run(sides, ("mmap", 2, 3, RW, PRIV, None), ("mmap", 5, 1, RO, PRIV, None),
                  ("write", 2, 10, b"first page"), ("write", 2, 2 * P, b"third"),
                  ("mremap", 2, 3 * P, 8 * P, MAYMOVE, None),
                  ("read", "moved", 10, 10), ("read", "moved", 2 * P, 5),
                  ("read", "moved", 7 * P, 4), ("read", 2, 0, 1))
    assert results[4] == ("ok", "moved")
    assert results[5:] == [b"first page", b"third", b"\0" * 4, "SIGSEGV"]


def test_copy_on_write_state_and_file_offset_move_with_the_pages(
        sides: tuple[Side, Side]) -> None:
    """A private file mapping moved by MREMAP_FIXED: the page written before the move is
    still the private copy (a later write to the file does not show through it), the others
    still share the page cache (it does), and the maps show the moved part's file offset."""
    results = run(sides, ("mmap", 2, 3, RW, PRIV, 0), ("write", 2, P + 1, b"private"),
                  ("read", 2, 0, 4),
                  ("mremap", 2, 3 * P, 3 * P, MAYMOVE | MFIXED, 10),
                  ("pwrite", 0, b"FILE"), ("pwrite", P, b"file page one"),
                  ("read", 10, 0, 4), ("read", 10, P, 13), ("read", 2, 0, 1),
                  ("mremap", 11, 2 * P, 2 * P, MAYMOVE | MFIXED, 20),
                  ("read", 20, 1, 7))
    assert results[6] == b"FILE" and results[7][1:8] == b"private" and results[8] == "SIGSEGV"
    assert results[10] == b"private"


def test_growing_a_file_mapping_past_its_end_is_sigbus_on_touch(
        sides: tuple[Side, Side]) -> None:
    """Grown in place past the file's end, then moved: the page holding EOF reads (zeros
    past it), pages wholly past it raise SIGBUS, as an mmap of that length does."""
    results = run(sides, ("mmap", 2, 2, RO, PRIV, 0),
                  ("mremap", 2, 2 * P, 6 * P, 0, None),
                  ("read", 2, 3 * P + P // 2 - 2, 4), ("read", 2, 4 * P, 1),
                  ("mremap", 2, 6 * P, 6 * P, MAYMOVE | MFIXED, 12),
                  ("read", 12, 3 * P, 1), ("read", 12, 5 * P, 1))
    assert results[2][2:] == b"\0\0" and results[3] == "SIGBUS"
    assert results[6] == "SIGBUS"


def test_growing_shared_anonymous_memory_is_sigbus_past_its_first_size(
        sides: tuple[Side, Side]) -> None:
    results = run(sides, ("mmap", 2, 1, RW, SHARED, None), ("write", 2, 0, b"shm"),
                  ("mremap", 2, P, 3 * P, 0, None), ("read", 2, 0, 3), ("read", 2, 2 * P, 1))
    assert results[3:] == [b"shm", "SIGBUS"]


def test_shared_memory_keeps_its_pages_when_unmapped_and_mapped_again(
        sides: tuple[Side, Side]) -> None:
    """Shared anonymous memory is a shmem file: a page cut off by a shrink is still there
    when the mapping grows back, a duplicate (old_size 0) shares the pages, and a
    MREMAP_DONTUNMAP source refaults them from the shmem file (not zeros)."""
    results = run(sides, ("mmap", 2, 4, RW, SHARED, None), ("write", 2, 3 * P, b"page 3"),
                  ("mremap", 2, 4 * P, P, 0, None), ("read", 2, 3 * P, 1),
                  ("mremap", 2, P, 4 * P, 0, None), ("read", 2, 3 * P, 6),
                  ("mremap", 2, 0, 4 * P, MAYMOVE | MFIXED, 10), ("read", 10, 3 * P, 6),
                  ("write", 10, 0, b"via the copy"), ("read", 2, 0, 12),
                  ("mremap", 2, 4 * P, 4 * P, MAYMOVE | DONTUNMAP | MFIXED, 16),
                  ("read", 2, 3 * P, 6), ("read", 16, 0, 12))
    assert results[3] == "SIGSEGV" and results[5] == results[7] == b"page 3"
    assert results[9] == b"via the copy" and results[11:] == [b"page 3", b"via the copy"]


def test_dontunmap_moves_the_pages_and_leaves_an_empty_mapping(
        sides: tuple[Side, Side]) -> None:
    results = run(sides, ("mmap", 2, 3, RW, PRIV, None), ("write", 2, P, b"moved data"),
                  ("mremap", 2, 3 * P, 3 * P, MAYMOVE | DONTUNMAP | MFIXED, 10),
                  ("read", 10, P, 10), ("read", 2, P, 10),
                  ("mmap", 5, 1, RW, PRIV, None),          # does the emptied one merge?
                  ("mremap", 10, 2 * P, 2 * P, MAYMOVE | DONTUNMAP, None),
                  ("read", "moved", P, 10), ("read", 11, 0, 10))
    assert results[3:5] == [b"moved data", b"\0" * 10]
    assert results[7:] == [b"moved data", b"\0" * 10]


def test_a_fixed_move_of_several_mappings_keeps_their_gaps(sides: tuple[Side, Side]) -> None:
    """Linux 6.17 and later move every mapping of a MREMAP_FIXED range of unchanged size."""
    results = run(sides, ("mmap", 2, 2, RW, PRIV, None), ("mmap", 4, 1, RO, PRIV, 1),
                  ("mmap", 6, 2, RW, PRIV, None), ("write", 6, 0, b"third"),
                  ("mremap", 2, 7 * P, 7 * P, MAYMOVE | MFIXED, 12),
                  ("read", 16, 0, 5), ("read", 18, 0, 4),
                  ("mremap", 13, 4 * P, 4 * P, MAYMOVE | MFIXED, 2),
                  ("mremap", 15, 4 * P, 4 * P, MAYMOVE | MFIXED, 3))
    assert results[4:7] == [("ok", 12), b"third", "SIGSEGV"]
    assert results[8] == ("errno", "EFAULT")  # a gap at the start of the range


def test_a_private_dev_zero_mapping_stops_a_multi_mapping_move(
        sides: tuple[Side, Side]) -> None:
    """vma_multi_allowed: /dev/zero has its own get_unmapped_area, so a private mapping of
    it moves alone: EFAULT when it comes second (the mappings before it already moved), or
    when the range passes its end."""
    results = run(sides, ("mmap", 2, 1, RW, PRIV, None), ("mmap", 3, 1, RO, PRIV, "zero"),
                  ("mremap", 2, 2 * P, 2 * P, MAYMOVE | MFIXED, 12),
                  ("mremap", 3, 2 * P, 2 * P, MAYMOVE | MFIXED, 16),
                  ("mremap", 3, P, P, MAYMOVE | MFIXED, 16), ("mremap", 12, 1 * P, P,
                                                               MAYMOVE | MFIXED, 17))
    assert results[2:4] == [("errno", "EFAULT")] * 2


def test_merging_after_a_move_follows_the_anon_vma(sides: tuple[Side, Side]) -> None:
    """A never-written anonymous mapping takes its new place's offset and merges with an
    identical neighbour; a written one keeps its old offset and stays apart."""
    run(sides, ("mmap", 2, 2, RW, PRIV, None), ("mmap", 10, 2, RW, PRIV, None),
        ("mremap", 2, 2 * P, 2 * P, MAYMOVE | MFIXED, 12),
        ("mmap", 2, 2, RW, PRIV, None), ("write", 2, 0, b"x"),
        ("mremap", 2, 2 * P, 2 * P, MAYMOVE | MFIXED, 14),
        ("mremap", 14, 2 * P, 2 * P, MAYMOVE | MFIXED, 6),
        ("mremap", 6, 2 * P, 2 * P, MAYMOVE | MFIXED, 14), ("read", 14, 0, 1))


def test_growing_in_place_merges_with_the_next_mapping(sides: tuple[Side, Side]) -> None:
    """vma_merge_extend: grown up to an identical neighbour, the two are one mapping (a
    written neighbour too: one anon_vma between them)."""
    run(sides, ("mmap", 2, 2, RW, PRIV, None), ("mmap", 6, 2, RW, PRIV, None),
        ("mremap", 2, 2 * P, 4 * P, 0, None), ("mmap", 10, 2, RW, PRIV, None),
        ("write", 10, 0, b"x"), ("mmap", 14, 2, RW, PRIV, None),
        ("mremap", 14, 2 * P, 4 * P, 0, None), ("mremap", 8, P, 2 * P, 0, None))


def test_max_map_count_margin_is_enomem_before_anything_changes() -> None:
    """check_mremap_params: a move needs max_map_count - 5 mappings at most."""
    with AddressSpace(max_map_count=8) as space:
        starts = [space.mmap_anonymous(0, P, ProtFlags(p % 2 + 1), PRIV) for p in range(4)]
        with pytest.raises(MmapError) as caught:
            space.mremap(starts[0], P, P, MAYMOVE | MFIXED, starts[0] - 64 * P)
        assert caught.value.errno == errno.ENOMEM
        assert space.map_count == 4


def test_the_syscall_is_served_through_the_same_code() -> None:
    """mremap (syscall 25) on a Process: grows the mapping with its data, no ENOSYS."""
    with vmsim.Process() as proc:
        addr = proc.space.mmap_anonymous(0, 2 * P, RW, PRIV)
        proc.space.write(addr, b"kept")
        proc.space.mprotect(addr + P, P, RO)   # no room to grow in place
        new = syscall(proc, 25, addr, P, 4 * P, MAYMOVE, 0)
        assert new != addr and proc.space.read(new, 4) == b"kept"
        assert syscall(proc, 25, new, 4 * P, P, 0, 0) == new
        assert syscall(proc, 25, new, P, P, 8, 0) == -errno.EINVAL
        assert "mremap" not in proc.stats.enosys

