"""What mmap, munmap and mprotect do to the map (shared/linux-mm.md, "What the calls do"),
against every backend: exact maps lines relative to the arena."""

from __future__ import annotations

import errno
import os

from harness import BackendHarness, FileFd, RelRegion, expect_errno

from loader.mmap import MapFlags, MmapError, ProtFlags

NONE, R, W, X = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, SHARED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED
FIXED, ANON = MapFlags.MAP_FIXED, MapFlags.MAP_ANONYMOUS


def rows(backend: BackendHarness, *spec: tuple[int, int, str, int, str]) -> list[RelRegion]:
    """RelRegions from (start page, end page, perms, offset page, kind) tuples."""
    p = backend.page
    return [RelRegion(a * p, b * p, perms, off * p, kind) for a, b, perms, off, kind in spec]


def test_hint_on_free_range_used_exactly(backend: BackendHarness) -> None:
    backend.mm.munmap(backend.at(10), 4 * backend.page)
    assert backend.mm.mmap_anonymous(backend.at(11), 2 * backend.page, R, PRIV) == backend.at(11)
    assert backend.rel_maps() == rows(backend, (0, 10, "---p", 0, "anon"),
                                      (11, 13, "r--p", 0, "anon"), (14, 256, "---p", 0, "anon"))


def test_hint_on_occupied_range_placed_elsewhere(backend: BackendHarness) -> None:
    before = backend.rel_maps()
    got = backend.mm.mmap_anonymous(backend.at(3), backend.page, R, PRIV)
    backend.unmap_later(got, backend.page)
    assert not backend.arena - backend.page <= got < backend.arena_end + backend.page
    assert backend.rel_maps() == before


def test_hint_on_too_small_hole_placed_elsewhere(backend: BackendHarness) -> None:
    backend.mm.munmap(backend.at(10), 2 * backend.page)
    before = backend.rel_maps()
    got = backend.mm.mmap_anonymous(backend.at(10), 3 * backend.page, R, PRIV)
    backend.unmap_later(got, 3 * backend.page)
    assert not backend.arena - backend.page <= got < backend.arena_end + backend.page
    assert backend.rel_maps() == before


def test_reservation_then_fixed_inside(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(bytes(range(256)) * (4 * p // 256))
    backend.mm.mmap(backend.at(4), 2 * p, R | X, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(6), 2 * p, R | W, PRIV | FIXED, 2 * p, f.fd)
    backend.mm.mmap_anonymous(backend.at(8), p, R | W, PRIV | FIXED)
    assert backend.rel_maps() == rows(backend, (0, 4, "---p", 0, "anon"),
                                      (4, 6, "r-xp", 0, f.path), (6, 8, "rw-p", 2, f.path),
                                      (8, 9, "rw-p", 0, "anon"), (9, 256, "---p", 0, "anon"))
    assert backend.mm.read(backend.at(6), 4) == bytes(range(4))


def test_fixed_replaces_across_mappings_and_holes(backend: BackendHarness) -> None:
    mm = backend.mm
    mm.mmap_anonymous(backend.at(2), 3 * backend.page, R, PRIV | FIXED)
    mm.munmap(backend.at(5), backend.page)
    mm.mmap_anonymous(backend.at(6), 2 * backend.page, R | X, PRIV | FIXED)
    mm.munmap(backend.at(8), backend.page)
    mm.mmap_anonymous(backend.at(3), 5 * backend.page, R | W, PRIV | FIXED)
    assert backend.rel_maps() == rows(backend, (0, 2, "---p", 0, "anon"),
                                      (2, 3, "r--p", 0, "anon"), (3, 8, "rw-p", 0, "anon"),
                                      (9, 256, "---p", 0, "anon"))


def test_failed_fixed_leaves_old_mappings(backend: BackendHarness, file_fd: FileFd) -> None:
    mm = backend.mm
    mm.mmap_anonymous(backend.at(2), 3 * backend.page, R, PRIV | FIXED)
    f = file_fd(b"x" * backend.page, flags=os.O_WRONLY)
    expect_errno(backend, errno.EACCES, mm.mmap, backend.at(1), 3 * backend.page, R,
                 PRIV | FIXED, 0, f.fd)


def test_munmap_of_unmapped_range_succeeds(backend: BackendHarness) -> None:
    backend.mm.munmap(backend.at(10), 5 * backend.page)
    before = backend.rel_maps()
    backend.mm.munmap(backend.at(11), 2 * backend.page)
    assert backend.rel_maps() == before


def test_partial_munmap_moves_upper_offset(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"y" * 6 * p)
    backend.mm.mmap(backend.at(4), 6 * p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.munmap(backend.at(6), p)
    assert backend.rel_maps() == rows(backend, (0, 4, "---p", 0, "anon"),
                                      (4, 6, "r--p", 0, f.path), (7, 10, "r--p", 3, f.path),
                                      (10, 256, "---p", 0, "anon"))
    backend.mm.munmap(backend.at(7), p)
    assert backend.rel_maps()[2] == RelRegion(8 * p, 10 * p, "r--p", 4 * p, f.path)


def test_mprotect_hole_at_start_changes_nothing(backend: BackendHarness) -> None:
    backend.mm.munmap(backend.at(4), backend.page)
    expect_errno(backend, errno.ENOMEM, backend.mm.mprotect, backend.at(4), 3 * backend.page, R)


def test_mprotect_hole_after_prefix_changes_prefix(backend: BackendHarness) -> None:
    backend.mm.munmap(backend.at(6), backend.page)
    try:
        backend.mm.mprotect(backend.at(4), 4 * backend.page, R)
    except MmapError as exc:
        assert exc.errno == errno.ENOMEM
    else:
        raise AssertionError("mprotect over a hole succeeded")
    assert backend.rel_maps() == rows(backend, (0, 4, "---p", 0, "anon"),
                                      (4, 6, "r--p", 0, "anon"), (7, 256, "---p", 0, "anon"))


def test_mprotect_eacces_in_second_mapping_changes_first(backend: BackendHarness,
                                                         file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"z" * p, flags=os.O_RDONLY)
    backend.mm.mmap_anonymous(backend.at(4), p, R, PRIV | FIXED)
    backend.mm.mmap(backend.at(5), p, R, SHARED | FIXED, 0, f.fd)
    try:
        backend.mm.mprotect(backend.at(4), 2 * p, R | W)
    except MmapError as exc:
        assert exc.errno == errno.EACCES
    else:
        raise AssertionError("mprotect(+W) of a read-only shared file succeeded")
    assert backend.rel_maps()[1:3] == rows(backend, (4, 5, "rw-p", 0, "anon"),
                                           (5, 6, "r--s", 0, f.path))


def test_mprotect_split_then_restore_merges(backend: BackendHarness) -> None:
    backend.mm.mmap_anonymous(backend.at(4), 6 * backend.page, R | W, PRIV | FIXED)
    backend.mm.mprotect(backend.at(6), 2 * backend.page, R)
    assert backend.rel_maps()[1:4] == rows(backend, (4, 6, "rw-p", 0, "anon"),
                                           (6, 8, "r--p", 0, "anon"), (8, 10, "rw-p", 0, "anon"))
    backend.mm.mprotect(backend.at(6), 2 * backend.page, R | W)
    assert backend.rel_maps() == rows(backend, (0, 4, "---p", 0, "anon"),
                                      (4, 10, "rw-p", 0, "anon"), (10, 256, "---p", 0, "anon"))


def test_mprotect_split_then_restore_merges_file(backend: BackendHarness, file_fd: FileFd) -> None:
    f = file_fd(b"q" * 6 * backend.page)
    backend.mm.mmap(backend.at(4), 6 * backend.page, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mprotect(backend.at(6), 2 * backend.page, R | X)
    assert backend.rel_maps()[1:4] == rows(backend, (4, 6, "r--p", 0, f.path),
                                           (6, 8, "r-xp", 2, f.path), (8, 10, "r--p", 4, f.path))
    backend.mm.mprotect(backend.at(6), 2 * backend.page, R)
    assert backend.rel_maps()[1:3] == rows(backend, (4, 10, "r--p", 0, f.path),
                                           (10, 256, "---p", 0, "anon"))
