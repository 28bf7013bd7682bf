"""The MMU layer (vmsim.mmu.Mmu) on its own terms: ``translate`` is the one entry point of
every access, so a CPU that fetches and stores through it sees what AddressSpace's access
paths see, with the same faults; the PTE bits decide what passes without the kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.mmap import MapFlags, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import Access, AddressSpace, Fault
from vmsim.fault import raise_found

P = HOST_PAGE_SIZE
R, W, X = ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_FIXED
BASE = 0x5555_0000_0000


def byte_via_translate(space: AddressSpace, va: int, access: Access) -> int:
    """What a CPU would load at ``va``: translate, then read the frame."""
    frame = space.mmu.translate(va, access)
    return int(space.mmu.pool.data[frame, va % P])


def test_translate_sees_what_read_sees_and_faults_alike(tmp_path: Path) -> None:
    space = AddressSpace()
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * (P // 256) + b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        space.mmap(BASE, 3 * P, R | W, PRIV | FIXED, 0, fd)
        space.write(BASE + 3, b"!")
        for va in (BASE, BASE + 3, BASE + P + 1):
            assert byte_via_translate(space, va, Access.READ) == space.read(va, 1)[0]
        with pytest.raises(Fault) as read_fault:
            space.read(BASE + 2 * P, 1)  # the page wholly past the file's end
        with pytest.raises(Fault) as mmu_fault:
            space.mmu.translate(BASE + 2 * P, Access.READ)
        assert (mmu_fault.value.signal, mmu_fault.value.code, mmu_fault.value.addr) == \
            (read_fault.value.signal, read_fault.value.code, read_fault.value.addr) == \
            ("SIGBUS", "BUS_ADRERR", BASE + 2 * P)
    finally:
        os.close(fd)


def test_translate_for_execute_and_write_follows_the_ptes() -> None:
    space = AddressSpace(exec_only=True)
    space.mmap_anonymous(BASE, P, R | W, PRIV | FIXED)
    space.write(BASE, b"\xc3")
    space.mprotect(BASE, P, X)
    frame = space.mmu.translate(BASE, Access.EXECUTE)
    assert space.mmu.pool.data[frame, 0] == 0xC3
    for access, code in ((Access.READ, "SEGV_ACCERR"), (Access.WRITE, "SEGV_ACCERR")):
        with pytest.raises(Fault) as info:
            space.mmu.translate(BASE, access)
        assert (info.value.code, info.value.access) == (code, access.letter)
    assert space.mmu.translate(BASE, Access.PTRACE_READ) == frame  # a debugger sees it
    with pytest.raises(Fault) as info:
        space.mmu.translate(1 << 50, Access.READ)
    assert info.value.code == "SI_KERNEL"


def test_a_write_fault_fills_the_pte_then_translate_needs_no_kernel() -> None:
    space = AddressSpace()
    space.mmap_anonymous(BASE, 2 * P, R | W, PRIV | FIXED)
    zero = space.mmu.translate(BASE, Access.READ)
    assert zero == 0  # the zero page, shared
    faults = space.stats.minor_faults
    frame = space.mmu.translate(BASE, Access.WRITE)  # copy-on-write of the zero page
    assert frame != 0 and space.stats.minor_faults == faults + 1
    assert space.mmu.translate(BASE, Access.WRITE) == frame
    assert space.stats.minor_faults == faults + 1


@pytest.mark.parametrize("letter", ["r", "w", "x"])
def test_fault_access_stays_a_letter(letter: str) -> None:
    access = Access(letter)
    fault = Fault(0x1000, access, "SIGSEGV", "SEGV_MAPERR")
    assert fault.access == letter and isinstance(fault.access, str)
    space = AddressSpace()
    checked = space.check_access(0x1000, 1, access)
    assert checked is not None and checked.access == letter
    assert space.check_access(0x1000, 1, letter) is not None


def test_forced_accesses_report_the_read_or_write_they_are() -> None:
    assert Access.PTRACE_READ.letter == "r" and not Access.PTRACE_READ.writes
    assert Access.PTRACE_WRITE.letter == "w" and Access.PTRACE_WRITE.writes
    space = AddressSpace()
    with pytest.raises(Fault) as info:
        space.poke(0x1000, b"x")
    assert info.value.access == "w"
    with pytest.raises(ValueError):
        space.check_access(0x1000, 1, Access.PTRACE_READ)


def _words_space(path: Path) -> AddressSpace:
    """Pages from BASE: 0-1 anonymous rw, 2 read-only, 3 a hole, 4-5 a private rw file
    mapping whose file ends inside page 4 (page 5 is past it: SIGBUS), 6-7 anonymous rw."""
    space = AddressSpace()
    fd = os.open(path, os.O_RDONLY)
    try:
        space.mmap(BASE, 2 * P, R | W, PRIV | FIXED | MapFlags.MAP_ANONYMOUS, 0, -1)
        space.mmap(BASE + 2 * P, P, R, PRIV | FIXED | MapFlags.MAP_ANONYMOUS, 0, -1)
        space.mmap(BASE + 4 * P, 2 * P, R | W, PRIV | FIXED, 0, fd)
        space.mmap(BASE + 6 * P, 2 * P, R | W, PRIV | FIXED | MapFlags.MAP_ANONYMOUS, 0, -1)
    finally:
        os.close(fd)
    space.write(BASE + 7 * P, b"x")  # one page already present and writable
    return space


def _word_by_word(space: AddressSpace, where: list[int], values: list[int]) -> None:
    """The meaning of write_words: each word in array order, stopping at the first one a
    write would fault on (whole: nothing of it stored)."""
    for addr, value in zip(where, values, strict=True):
        raise_found(lambda addr=addr: space.check_access(addr, 8, "w"))  # type: ignore[misc]
        space.write(addr, value.to_bytes(8, "little"))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(slots=st.lists(st.integers(0, 8 * P // 8 - 1), min_size=1, max_size=40, unique=True),
       order=st.sampled_from(["sorted", "shuffled"]), skew=st.sampled_from([0, 0, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_store_words_is_word_by_word_stores_up_to_the_first_fault(
        tmp_path_factory: pytest.TempPathFactory, slots: list[int], order: str, skew: int,
        seed: int) -> None:
    """Aligned words in address order take the one-pass path of Mmu.store_words, the others
    the general one: both store what word-by-word writes would, and fault at the same
    byte (page-straddling words, holes, read-only pages, pages past a file's end)."""
    path = tmp_path_factory.mktemp("words") / "f"
    path.write_bytes(b"f" * 100)
    rng = np.random.default_rng(seed)
    where = [BASE + 8 * k + skew for k in sorted(slots)]
    if order == "shuffled":
        where = [where[k] for k in rng.permutation(len(where))]
    values = rng.integers(0, 2**63, len(where)).tolist()
    got, want = _words_space(path), _words_space(path)
    def words() -> None:
        got.write_words(np.array(where, dtype=np.uint64), np.array(values, dtype=np.uint64))

    faults = []
    for store in (words, lambda: _word_by_word(want, where, values)):
        try:
            store()
            faults.append(None)
        except Fault as fault:
            faults.append((fault.signal, fault.code, fault.addr))
    assert faults[0] == faults[1]
    for page in (0, 1, 2, 4, 6, 7):
        va = BASE + page * P
        assert got.peek(va, P) == want.peek(va, P), f"page {page}"


def test_present_frame_settles_only_what_the_pte_allows() -> None:
    """Mmu.present_frame, the integer fast path of one-page accesses, gives a frame only
    where the PTE lets the access through; every other access still faults as before."""
    space = AddressSpace()
    space.mmap(BASE, 2 * P, R | W, PRIV | FIXED | MapFlags.MAP_ANONYMOUS, 0, -1)
    mmu = space.mmu
    assert mmu.present_frame(BASE, 8, Access.READ) == -1  # nothing mapped in the PTE yet
    space.read(BASE, 8)  # the zero page: readable, not writable
    assert mmu.present_frame(BASE, 8, Access.READ) == 0
    assert mmu.present_frame(BASE, 8, Access.WRITE) == -1
    space.write(BASE + P - 4, b"abcdefgh")  # straddles: both pages get frames
    frame = mmu.present_frame(BASE + 8, 8, Access.WRITE)
    assert frame > 0 and mmu.present_frame(BASE + P - 4, 8, Access.WRITE) == -1
    faults = space.stats.minor_faults
    space.write(BASE + 8, b"12345678")
    assert space.read(BASE + 8, 8) == b"12345678" and space.stats.minor_faults == faults
    space.mprotect(BASE, P, X)  # execute-only: unreadable (exec_only), not writable
    assert mmu.present_frame(BASE + 8, 8, Access.WRITE) == -1
    assert mmu.present_frame(BASE + 8, 8, Access.READ) == -1
    with pytest.raises(Fault) as write_fault:
        space.write(BASE + 8, b"x")
    with pytest.raises(Fault) as read_fault:
        space.read(BASE + 8, 1)
    assert (write_fault.value.code, read_fault.value.code) == ("SEGV_ACCERR", "SEGV_ACCERR")
    space.poke(BASE + 8, b"!")  # a debugger still may (FOLL_FORCE on a private page)
    assert space.peek(BASE + 8, 2) == b"!2"
