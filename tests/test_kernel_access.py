"""Accesses and faults (shared/linux-mm.md, "Access and faults"), against every backend: which
accesses work, which give SIGSEGV or SIGBUS, and what file-backed pages contain."""

from __future__ import annotations

import os

import pytest
from harness import BackendHarness, FileFd, RelRegion

from loader.mmap import MapFlags, ProtFlags

NONE, R, W, X = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, SHARED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED
FIXED = MapFlags.MAP_FIXED
RET = b"\xc3"  # x86-64 `ret`: calling a page holding it returns at once


def probes(backend: BackendHarness, addr: int) -> str:
    """The three probe results at addr as "r/w/x" initials: "ok" -> letter, fault -> "S"/"B"."""
    short = {"ok": None, "SIGSEGV": "S", "SIGBUS": "B"}
    out = ""
    for access in "rwx":
        got = backend.probe(addr, access)
        out += short[got] or access
    return out


def code_page(backend: BackendHarness, page: int, prot: ProtFlags) -> int:
    """Map one anonymous page at arena page ``page`` holding a ``ret``, then set ``prot``."""
    addr = backend.mm.mmap_anonymous(backend.at(page), backend.page, R | W, PRIV | FIXED)
    backend.mm.write(addr, RET)
    backend.mm.mprotect(addr, backend.page, prot)
    return addr


def test_unmapped_address_sigsegv(backend: BackendHarness) -> None:
    backend.mm.munmap(backend.at(4), backend.page)
    assert probes(backend, backend.at(4)) == "SSS"


def test_prot_none_sigsegv(backend: BackendHarness) -> None:
    assert probes(backend, backend.at(4)) == "SSS"


@pytest.mark.parametrize(("prot", "expected"), [
    (R, "rSS"), (R | W, "rwS"), (R | X, "rSx"), (R | W | X, "rwx"),
    (W, "rwS"), (W | X, "rwx"),  # on x86 write implies read
])
def test_access_by_protection(backend: BackendHarness, prot: ProtFlags, expected: str) -> None:
    assert probes(backend, code_page(backend, 4, prot)) == expected


def test_exec_only_readable_without_protection_keys(backend: BackendHarness) -> None:
    # execute-only memory needs protection keys; without them --x pages are readable
    expected = "SSx" if backend.has_pkeys else "rSx"
    assert probes(backend, code_page(backend, 4, X)) == expected


def test_file_tail_zero_and_pages_past_eof_sigbus(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"\xab" * (2 * p + 100))
    backend.mm.mmap(backend.at(4), 4 * p, R | W, PRIV | FIXED, 0, f.fd)
    assert backend.rel_maps()[1] == RelRegion(4 * p, 8 * p, "rw-p", 0, f.path)
    assert backend.load(backend.at(6), p) == b"\xab" * 100 + bytes(p - 100)
    assert probes(backend, backend.at(6) + p - 1)[:2] == "rw"
    assert probes(backend, backend.at(7))[:2] == "BB"


@pytest.mark.parametrize("maptype", [PRIV, SHARED], ids=["private", "shared"])
def test_mapping_past_eof_sigbus(backend: BackendHarness,
                                 file_fd: FileFd, maptype: MapFlags) -> None:
    p = backend.page
    f = file_fd(b"x" * p)
    backend.mm.mmap(backend.at(4), p, R | W, maptype | FIXED, 4 * p, f.fd)
    assert probes(backend, backend.at(4))[:2] == "BB"


def test_empty_file_mapping_sigbus(backend: BackendHarness, file_fd: FileFd) -> None:
    f = file_fd(b"")
    backend.mm.mmap(backend.at(4), 2 * backend.page, R | W, PRIV | FIXED, 0, f.fd)
    assert probes(backend, backend.at(4))[:2] == "BB"
    assert probes(backend, backend.at(5))[:2] == "BB"


@pytest.mark.parametrize("maptype", [PRIV, SHARED], ids=["private", "shared"])
def test_file_shrunk_sigbus_even_on_copied_pages(backend: BackendHarness, file_fd: FileFd,
                                                 maptype: MapFlags) -> None:
    p = backend.page
    f = file_fd(b"s" * 4 * p)
    backend.mm.mmap(backend.at(4), 4 * p, R | W, maptype | FIXED, 0, f.fd)
    backend.mm.write(backend.at(7), b"copied")
    assert backend.load(backend.at(7), 6) == b"copied"
    os.ftruncate(f.fd, p)
    assert probes(backend, backend.at(4))[:2] == "rw"
    assert probes(backend, backend.at(5))[:2] == "BB"
    assert probes(backend, backend.at(7))[:2] == "BB"


def test_file_grown_new_pages_read_zero(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"g" * p)
    backend.mm.mmap(backend.at(4), 3 * p, R, PRIV | FIXED, 0, f.fd)
    assert backend.load(backend.at(5), 1) == "SIGBUS"
    os.ftruncate(f.fd, 3 * p)
    assert backend.load(backend.at(5), 2 * p) == bytes(2 * p)
    assert backend.load(backend.at(4), 1) == b"g"


def test_private_mapping_sees_file_until_written(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"a" * 2 * p)
    backend.mm.mmap(backend.at(4), 2 * p, R | W, PRIV | FIXED, 0, f.fd)
    assert backend.mm.read(backend.at(4), 1) == b"a"
    os.pwrite(f.fd, b"b", 0)
    os.pwrite(f.fd, b"b", p)
    assert backend.mm.read(backend.at(4), 1) == b"b"
    backend.mm.write(backend.at(4) + 1, b"c")  # page 0 gets its own copy here
    os.pwrite(f.fd, b"d", 0)
    os.pwrite(f.fd, b"d", p)
    assert backend.mm.read(backend.at(4), 2) == b"bc"
    assert backend.mm.read(backend.at(5), 1) == b"d"
    assert os.pread(f.fd, 2, 0) == b"da"


def test_read_only_fd_private_writable_never_changes_file(backend: BackendHarness,
                                                          file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"r" * p, flags=os.O_RDONLY)
    backend.mm.mmap(backend.at(4), p, R | W, PRIV | FIXED, 0, f.fd)
    assert backend.rel_maps()[1] == RelRegion(4 * p, 5 * p, "rw-p", 0, f.path)
    backend.mm.write(backend.at(4), b"mine")
    assert backend.mm.read(backend.at(4), 5) == b"miner"
    assert os.pread(f.fd, 5, 0) == b"rrrrr"


def test_shared_writes_reach_file_and_other_mappings(backend: BackendHarness,
                                                     file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"0" * 2 * p)
    other = file_fd(path=f.path)
    backend.mm.mmap(backend.at(4), 2 * p, R | W, SHARED | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(8), 2 * p, R | W, SHARED | FIXED, 0, other.fd)
    backend.mm.mmap(backend.at(12), 2 * p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.write(backend.at(5) + 10, b"shared")
    assert os.pread(f.fd, 6, p + 10) == b"shared"
    assert backend.mm.read(backend.at(9) + 10, 6) == b"shared"
    assert backend.mm.read(backend.at(13) + 10, 6) == b"shared"


def _map_under_read_implies_exec(backend: BackendHarness) -> list[RelRegion]:
    backend.mm.mmap_anonymous(backend.at(4), backend.page, R, PRIV | FIXED)
    backend.mm.mmap_anonymous(backend.at(6), backend.page, R | W, PRIV | FIXED)
    backend.mm.mmap_anonymous(backend.at(8), backend.page, W, PRIV | FIXED)
    return backend.rel_maps()[1:6:2]


def test_read_implies_exec_personality(backend: BackendHarness) -> None:
    p = backend.page
    got = backend.with_read_implies_exec(lambda: _map_under_read_implies_exec(backend))
    assert got == [RelRegion(4 * p, 5 * p, "r-xp", 0, "anon"),
                   RelRegion(6 * p, 7 * p, "rwxp", 0, "anon"),
                   RelRegion(8 * p, 9 * p, "-w-p", 0, "anon")]
