"""The MMU layer (vmsim.mmu.Mmu) on its own terms: ``translate`` is the one entry point of
every access, so a CPU that fetches and stores through it sees what AddressSpace's access
paths see, with the same faults; the PTE bits decide what passes without the kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loader.mmap import MapFlags, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import Access, AddressSpace, Fault

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
