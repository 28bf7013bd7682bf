"""When neighbouring mappings show as one maps line (shared/linux-mm.md, "How /proc/self/maps
splits and merges"), against every backend: the hidden per-mapping state that decides it."""

from __future__ import annotations

import os

from harness import BackendHarness, FileFd, RelRegion

from loader.mmap import MapFlags, ProtFlags

NONE, R, W, X = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, SHARED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED
FIXED, NORESERVE = MapFlags.MAP_FIXED, MapFlags.MAP_NORESERVE
ZERO = "/dev/zero (deleted)"


def rows(backend: BackendHarness, *spec: tuple[int, int, str, int, str]) -> list[RelRegion]:
    """RelRegions from (start page, end page, perms, offset page, kind) tuples."""
    p = backend.page
    return [RelRegion(a * p, b * p, perms, off * p, kind) for a, b, perms, off, kind in spec]


def inner(backend: BackendHarness) -> list[RelRegion]:
    """The arena's lines without the reservation remnants at its two ends."""
    return backend.rel_maps()[1:-1]


def anon(backend: BackendHarness, page: int, n: int, prot: ProtFlags,
         flags: MapFlags = PRIV) -> int:
    """Map ``n`` anonymous pages at arena page ``page`` with MAP_FIXED."""
    return backend.mm.mmap_anonymous(backend.at(page), n * backend.page, prot, flags | FIXED)


def test_fresh_anonymous_neighbours_merge(backend: BackendHarness) -> None:
    anon(backend, 4, 2, R | W)
    anon(backend, 6, 3, R | W)
    assert inner(backend) == rows(backend, (4, 9, "rw-p", 0, "anon"))


def test_noreserve_does_not_merge_with_reserved(backend: BackendHarness) -> None:
    anon(backend, 4, 2, R | W)
    anon(backend, 6, 2, R | W, PRIV | NORESERVE)
    assert inner(backend) == rows(backend, (4, 6, "rw-p", 0, "anon"), (6, 8, "rw-p", 0, "anon"))


def test_prot_none_fixed_absorbed_into_reservation(backend: BackendHarness) -> None:
    anon(backend, 4, 2, NONE)
    assert backend.rel_maps() == rows(backend, (0, 256, "---p", 0, "anon"))


def test_unwritten_anonymous_loses_account_and_merges(backend: BackendHarness) -> None:
    anon(backend, 4, 2, R)
    anon(backend, 6, 2, R | W)
    backend.mm.mprotect(backend.at(6), 2 * backend.page, R)
    assert inner(backend) == rows(backend, (4, 8, "r--p", 0, "anon"))


def test_unwritten_anonymous_made_prot_none_rejoins_reservation(backend: BackendHarness) -> None:
    anon(backend, 4, 2, R | W)
    backend.mm.mprotect(backend.at(4), 2 * backend.page, NONE)
    assert backend.rel_maps() == rows(backend, (0, 256, "---p", 0, "anon"))


def test_written_anonymous_keeps_account_and_stays_apart(backend: BackendHarness) -> None:
    anon(backend, 4, 2, R)
    anon(backend, 6, 2, R | W)
    backend.mm.write(backend.at(6), b"w")
    backend.mm.mprotect(backend.at(6), 2 * backend.page, R)
    assert inner(backend) == rows(backend, (4, 6, "r--p", 0, "anon"), (6, 8, "r--p", 0, "anon"))


def test_separately_written_regions_do_not_all_merge(backend: BackendHarness) -> None:
    anon(backend, 4, 1, R | W)
    anon(backend, 6, 1, R | W)
    backend.mm.write(backend.at(4), b"a")
    backend.mm.write(backend.at(6), b"c")
    anon(backend, 5, 1, R | W)
    assert inner(backend) == rows(backend, (4, 6, "rw-p", 0, "anon"), (6, 7, "rw-p", 0, "anon"))


def test_unwritten_regions_all_merge(backend: BackendHarness) -> None:
    anon(backend, 4, 1, R | W)
    anon(backend, 6, 1, R | W)
    anon(backend, 5, 1, R | W)
    assert inner(backend) == rows(backend, (4, 7, "rw-p", 0, "anon"))


def test_shared_anonymous_never_merges(backend: BackendHarness) -> None:
    anon(backend, 4, 1, R | W, SHARED)
    anon(backend, 5, 1, R | W, SHARED)
    assert inner(backend) == rows(backend, (4, 5, "rw-s", 0, ZERO), (5, 6, "rw-s", 0, ZERO))


def test_shared_anonymous_partial_unmap_moves_offset(backend: BackendHarness) -> None:
    anon(backend, 4, 4, R | W, SHARED)
    backend.mm.munmap(backend.at(5), backend.page)
    assert inner(backend) == rows(backend, (4, 5, "rw-s", 0, ZERO), (6, 8, "rw-s", 2, ZERO))


def test_file_consecutive_offsets_same_open_merge(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"f" * 4 * p)
    backend.mm.mmap(backend.at(4), p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(5), p, R, PRIV | FIXED, p, f.fd)
    dup = os.dup(f.fd)
    try:
        backend.mm.mmap(backend.at(6), p, R, PRIV | FIXED, 2 * p, dup)
    finally:
        os.close(dup)
    assert inner(backend) == rows(backend, (4, 7, "r--p", 0, f.path))


def test_file_second_open_does_not_merge(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"f" * 4 * p)
    again = file_fd(path=f.path)
    backend.mm.mmap(backend.at(4), p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(5), p, R, PRIV | FIXED, p, again.fd)
    assert inner(backend) == rows(backend, (4, 5, "r--p", 0, f.path), (5, 6, "r--p", 1, f.path))


def test_file_non_consecutive_offsets_do_not_merge(backend: BackendHarness,
                                                   file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"f" * 4 * p)
    backend.mm.mmap(backend.at(4), p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(5), p, R, PRIV | FIXED, 2 * p, f.fd)
    assert inner(backend) == rows(backend, (4, 5, "r--p", 0, f.path), (5, 6, "r--p", 2, f.path))


def test_file_private_and_shared_do_not_merge(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"f" * 4 * p)
    backend.mm.mmap(backend.at(4), p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(5), p, R, SHARED | FIXED, p, f.fd)
    assert inner(backend) == rows(backend, (4, 5, "r--p", 0, f.path), (5, 6, "r--s", 1, f.path))


def test_relro_like_file_mapping_stays_apart(backend: BackendHarness, file_fd: FileFd) -> None:
    # a private file mapping that was ever writable keeps VM_ACCOUNT after mprotect(PROT_READ)
    p = backend.page
    f = file_fd(b"f" * 4 * p)
    backend.mm.mmap(backend.at(4), p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(5), p, R | W, PRIV | FIXED, p, f.fd)
    backend.mm.mprotect(backend.at(5), p, R)
    assert inner(backend) == rows(backend, (4, 5, "r--p", 0, f.path), (5, 6, "r--p", 1, f.path))


def test_file_split_by_mprotect_remerges_when_never_writable(backend: BackendHarness,
                                                             file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"f" * 4 * p)
    backend.mm.mmap(backend.at(4), 2 * p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mprotect(backend.at(5), p, R | X)
    backend.mm.mprotect(backend.at(5), p, R)
    assert inner(backend) == rows(backend, (4, 6, "r--p", 0, f.path))
