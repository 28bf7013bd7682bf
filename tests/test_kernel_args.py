"""Argument checks of mmap, munmap and mprotect, and their order (shared/linux-mm.md, first
table), against every backend: the errno and an unchanged arena."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from harness import BackendHarness, FileFd, RelRegion, expect_errno

from loader.mmap import MapFlags, ProtFlags

NONE, R, W, X = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, SHARED, VALIDATE = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_SHARED_VALIDATE
FIXED, ANON, NOREPLACE = MapFlags.MAP_FIXED, MapFlags.MAP_ANONYMOUS, MapFlags.MAP_FIXED_NOREPLACE
UNKNOWN_MAP_FLAG = MapFlags(0x400000)  # no MAP_* flag has this bit
PROT_GROWSDOWN, PROT_GROWSUP = 0x01000000, 0x02000000
WORD = 1 << 64


def arena_row(backend: BackendHarness, start: int = 0, end: int | None = None) -> RelRegion:
    """The untouched reservation between page offsets ``start`` and ``end`` (bytes)."""
    return RelRegion(start, backend.arena_size if end is None else end, "---p", 0, "anon")


def test_arena_starts_as_one_prot_none_line(backend: BackendHarness) -> None:
    assert backend.rel_maps() == [arena_row(backend)]


# length 0

def test_mmap_length_zero_einval(backend: BackendHarness, file_fd: FileFd) -> None:
    f = file_fd(b"x" * backend.page)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), 0, R, PRIV | FIXED | ANON,
                 0, None)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), 0, R, PRIV | FIXED, 0,
                 f.fd)


def test_munmap_length_zero_einval(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.munmap, backend.at(1), 0)


@pytest.mark.parametrize("prot", [R, ProtFlags(0x10)], ids=["read", "unknown-bit"])
def test_mprotect_length_zero_succeeds_even_unmapped(backend: BackendHarness, prot: int) -> None:
    backend.mm.munmap(backend.at(4), backend.page)
    before = backend.rel_maps()
    backend.mm.mprotect(backend.at(1), 0, ProtFlags(prot))
    backend.mm.mprotect(backend.at(4), 0, ProtFlags(prot))
    backend.mm.mprotect(0, 0, ProtFlags(prot))
    assert backend.rel_maps() == before


def test_mprotect_length_zero_growsdown_and_growsup_einval(backend: BackendHarness) -> None:
    # this kernel rejects GROWSDOWN|GROWSUP before it looks at the length
    expect_errno(backend, errno.EINVAL, backend.mm.mprotect, backend.at(1), 0,
                 ProtFlags(R | PROT_GROWSDOWN | PROT_GROWSUP))


def test_mprotect_checks_alignment_before_length_zero(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.mprotect, backend.at(1) + 1, 0, R)


# length rounding

def test_length_rounded_up_to_pages(backend: BackendHarness) -> None:
    p = backend.page
    assert backend.mm.mmap_anonymous(backend.at(2), p + 1, R | W, PRIV | FIXED) == backend.at(2)
    assert backend.rel_maps() == [arena_row(backend, 0, 2 * p),
                                  RelRegion(2 * p, 4 * p, "rw-p", 0, "anon"),
                                  arena_row(backend, 4 * p)]
    backend.mm.mprotect(backend.at(2), 1, R)
    assert backend.rel_maps()[1:3] == [RelRegion(2 * p, 3 * p, "r--p", 0, "anon"),
                                       RelRegion(3 * p, 4 * p, "rw-p", 0, "anon")]
    backend.mm.munmap(backend.at(2), p + 1)
    assert backend.rel_maps() == [arena_row(backend, 0, 2 * p), arena_row(backend, 4 * p)]


# unaligned address

@pytest.mark.parametrize("fixed", [FIXED, NOREPLACE], ids=["fixed", "noreplace"])
def test_unaligned_fixed_address_einval(backend: BackendHarness, fixed: MapFlags) -> None:
    backend.mm.munmap(backend.at(8), 4 * backend.page)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(8) + 1, backend.page, R,
                 PRIV | ANON | fixed, 0, None)


def test_unaligned_munmap_einval(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.munmap, backend.at(1) + 8, backend.page)


def test_unaligned_mprotect_einval(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.mprotect, backend.at(1) + 8, backend.page, R)


def test_unaligned_hint_rounded_down(backend: BackendHarness) -> None:
    p = backend.page
    backend.mm.munmap(backend.at(10), 3 * p)
    got = backend.mm.mmap_anonymous(backend.at(10) + 100, p, R, PRIV)
    assert got == backend.at(10)
    assert backend.rel_maps()[1] == RelRegion(10 * p, 11 * p, "r--p", 0, "anon")


# unaligned offset: checked first

@pytest.mark.parametrize("anon", [True, False], ids=["anonymous", "file"])
def test_unaligned_offset_einval_first(backend: BackendHarness,
                                       file_fd: FileFd, anon: bool) -> None:
    f = file_fd(b"x" * backend.page)
    os.close(f.fd)  # a closed fd would give EBADF; the offset is checked before it
    flags = PRIV | FIXED | (ANON if anon else MapFlags(0))
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), backend.page, R, flags,
                 100, None if anon else f.fd)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), 0, R, flags, 100,
                 None if anon else f.fd)


# map type

@pytest.mark.parametrize("maptype", [0x0, 0x4, 0xF])
@pytest.mark.parametrize("anon", [True, False], ids=["anonymous", "file"])
def test_bad_map_type_einval(backend: BackendHarness,
                             file_fd: FileFd, maptype: int, anon: bool) -> None:
    f = file_fd(b"x" * backend.page)
    flags = MapFlags(maptype) | FIXED | (ANON if anon else MapFlags(0))
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), backend.page, R, flags, 0,
                 None if anon else f.fd)


def test_shared_validate_file_succeeds_shared(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"x" * p)
    assert backend.mm.mmap(backend.at(1), p, R | W, VALIDATE | FIXED, 0, f.fd).addr == backend.at(1)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "rw-s", 0, f.path)


def test_shared_validate_anonymous_einval(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), backend.page, R | W,
                 VALIDATE | FIXED | ANON, 0, None)


@pytest.mark.parametrize("extra", [UNKNOWN_MAP_FLAG, NOREPLACE], ids=["unknown", "noreplace"])
def test_shared_validate_with_unknown_flag_eopnotsupp(backend: BackendHarness, file_fd: FileFd,
                                                      extra: MapFlags) -> None:
    f = file_fd(b"x" * backend.page)
    backend.mm.munmap(backend.at(8), backend.page)
    expect_errno(backend, errno.EOPNOTSUPP, backend.mm.mmap, backend.at(8), backend.page, R,
                 VALIDATE | extra, 0, f.fd)


@pytest.mark.parametrize("maptype", [SHARED, PRIV], ids=["shared", "private"])
def test_legacy_map_types_ignore_unknown_flags(backend: BackendHarness, file_fd: FileFd,
                                               maptype: MapFlags) -> None:
    p = backend.page
    f = file_fd(b"x" * p)
    backend.mm.mmap(backend.at(1), p, R, maptype | FIXED | UNKNOWN_MAP_FLAG, 0, f.fd)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "r--" + ("s" if maptype == SHARED else "p"),
                                              0, f.path)


# overflow

@pytest.mark.parametrize("length", [WORD - 1, 1 << 63, WORD - 4096, -1, -4096, WORD, 1 << 80],
                         ids=["2^64-1", "2^63", "2^64-4096", "-1", "-4096", "2^64", "2^80"])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "hint"])
def test_mmap_overflowing_length_enomem(backend: BackendHarness, length: int, fixed: bool) -> None:
    flags = PRIV | ANON | (FIXED if fixed else MapFlags(0))
    expect_errno(backend, errno.ENOMEM, backend.mm.mmap, backend.at(1), length, R, flags, 0, None)


def test_mmap_fixed_at_top_of_address_space_enomem(backend: BackendHarness) -> None:
    p = backend.page
    expect_errno(backend, errno.ENOMEM, backend.mm.mmap, -p, p, R, PRIV | ANON | FIXED, 0, None)
    expect_errno(backend, errno.ENOMEM, backend.mm.mmap, WORD - p, p, R, PRIV | ANON | FIXED, 0,
                 None)


def test_file_offset_overflow_eoverflow(backend: BackendHarness, file_fd: FileFd) -> None:
    f = file_fd(b"x" * backend.page)
    expect_errno(backend, errno.EOVERFLOW, backend.mm.mmap, backend.at(1), backend.page, R,
                 PRIV | FIXED, (1 << 63) - 4096, f.fd)


def test_anonymous_ignores_huge_offset(backend: BackendHarness) -> None:
    p = backend.page
    got = backend.mm.mmap(backend.at(1), p, R | W, PRIV | FIXED | ANON, (1 << 63) - 4096, None)
    assert got.addr == backend.at(1)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "rw-p", 0, "anon")


@pytest.mark.parametrize("where", ["kernel-half", "wrapping", "huge-length", "negative-length"])
def test_munmap_bad_range_einval(backend: BackendHarness, where: str) -> None:
    addr, length = {"kernel-half": (1 << 63, 4096),
                    "wrapping": (backend.arena, WORD - backend.arena + 4096),
                    "huge-length": (backend.arena, 1 << 70),
                    "negative-length": (backend.arena, -4096)}[where]
    expect_errno(backend, errno.EINVAL, backend.mm.munmap, addr, length)


@pytest.mark.parametrize("where", ["kernel-half", "wrapping", "null", "huge-length",
                                   "negative-length"])
def test_mprotect_bad_range_enomem(backend: BackendHarness, where: str) -> None:
    addr, length = {"kernel-half": (1 << 63, 4096),
                    "wrapping": (backend.arena, WORD - backend.arena + 4096),
                    "null": (0, 4096),
                    "huge-length": (backend.arena, 1 << 70),
                    "negative-length": (backend.arena, -4096)}[where]
    expect_errno(backend, errno.ENOMEM, backend.mm.mprotect, addr, length, R)


# file descriptors

def test_closed_fd_ebadf(backend: BackendHarness, file_fd: FileFd) -> None:
    f = file_fd(b"x" * backend.page)
    os.close(f.fd)
    expect_errno(backend, errno.EBADF, backend.mm.mmap, backend.at(1), backend.page, R,
                 PRIV | FIXED, 0, f.fd)


def test_fd_minus_one_without_anonymous_ebadf(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EBADF, backend.mm.mmap, backend.at(1), backend.page, R,
                 PRIV | FIXED, 0, -1)


def test_fd_checked_before_length_zero(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EBADF, backend.mm.mmap, backend.at(1), 0, R, PRIV | FIXED, 0, -1)


def test_anonymous_ignores_fd(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"x" * p)
    os.close(f.fd)
    assert backend.mm.mmap(backend.at(1), p, R, PRIV | FIXED | ANON, 0, f.fd).addr == backend.at(1)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "r--p", 0, "anon")


@pytest.mark.parametrize("prot", [NONE, R, R | W], ids=["none", "r", "rw"])
@pytest.mark.parametrize("maptype", [SHARED, PRIV], ids=["shared", "private"])
def test_write_only_fd_eacces(backend: BackendHarness, file_fd: FileFd, prot: ProtFlags,
                              maptype: MapFlags) -> None:
    f = file_fd(b"x" * backend.page, flags=os.O_WRONLY)
    expect_errno(backend, errno.EACCES, backend.mm.mmap, backend.at(1), backend.page, prot,
                 maptype | FIXED, 0, f.fd)


def test_read_only_fd_shared_write_eacces(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"x" * p, flags=os.O_RDONLY)
    expect_errno(backend, errno.EACCES, backend.mm.mmap, backend.at(1), p, R | W, SHARED | FIXED,
                 0, f.fd)
    backend.mm.mmap(backend.at(1), p, R, SHARED | FIXED, 0, f.fd)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "r--s", 0, f.path)
    expect_errno(backend, errno.EACCES, backend.mm.mprotect, backend.at(1), p, R | W)
    backend.mm.mprotect(backend.at(1), p, R | X)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "r-xs", 0, f.path)


def test_directory_fd_enodev(backend: BackendHarness, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        expect_errno(backend, errno.ENODEV, backend.mm.mmap, backend.at(1), backend.page, R,
                     PRIV | FIXED, 0, fd)
    finally:
        os.close(fd)


def test_pipe_fd_enodev(backend: BackendHarness) -> None:
    rfd, wfd = os.pipe()
    try:
        expect_errno(backend, errno.ENODEV, backend.mm.mmap, backend.at(1), backend.page, R,
                     PRIV | FIXED, 0, rfd)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_noexec_mount(backend: BackendHarness, file_fd: FileFd, noexec_dir: Path) -> None:
    p = backend.page
    path = noexec_dir / "lib"
    path.write_bytes(b"x" * p)
    f = file_fd(path=str(path))
    expect_errno(backend, errno.EPERM, backend.mm.mmap, backend.at(1), p, R | X, PRIV | FIXED, 0,
                 f.fd)
    backend.mm.mmap(backend.at(1), p, R, PRIV | FIXED, 0, f.fd)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "r--p", 0, f.path)
    expect_errno(backend, errno.EACCES, backend.mm.mprotect, backend.at(1), p, R | X)


# MAP_FIXED_NOREPLACE

def test_noreplace_over_mapping_eexist(backend: BackendHarness) -> None:
    p = backend.page
    backend.mm.munmap(backend.at(8), 2 * p)
    # a free page then the reservation: the overlap fails it all
    expect_errno(backend, errno.EEXIST, backend.mm.mmap, backend.at(9), 2 * p, R,
                 PRIV | ANON | NOREPLACE, 0, None)


def test_noreplace_overlap_checked_before_map_type(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EEXIST, backend.mm.mmap, backend.at(1), backend.page, R,
                 ANON | NOREPLACE, 0, None)


def test_noreplace_on_free_range_works(backend: BackendHarness) -> None:
    p = backend.page
    backend.mm.munmap(backend.at(8), 2 * p)
    assert backend.mm.mmap_anonymous(backend.at(8), 2 * p, R, PRIV | NOREPLACE) == backend.at(8)
    assert backend.rel_maps()[1] == RelRegion(8 * p, 10 * p, "r--p", 0, "anon")


# prot bits

@pytest.mark.parametrize("prot", [0x10, PROT_GROWSDOWN | PROT_GROWSUP], ids=["0x10", "both-grows"])
def test_mprotect_bad_prot_einval(backend: BackendHarness, prot: int) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.mprotect, backend.at(1), backend.page,
                 ProtFlags(R | prot))


def test_mmap_ignores_unknown_prot_bits(backend: BackendHarness) -> None:
    p = backend.page
    backend.mm.mmap_anonymous(backend.at(1), p, ProtFlags(R | 0x10), PRIV | FIXED)
    assert backend.rel_maps()[1] == RelRegion(p, 2 * p, "r--p", 0, "anon")


def test_growsdown_on_shared_anonymous_einval(backend: BackendHarness) -> None:
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), backend.page, R | W,
                 SHARED | ANON | FIXED | MapFlags.MAP_GROWSDOWN, 0, None)


@pytest.mark.parametrize("maptype", [SHARED, PRIV], ids=["shared", "private"])
def test_growsdown_on_file_einval(backend: BackendHarness,
                                  file_fd: FileFd, maptype: MapFlags) -> None:
    f = file_fd(b"x" * backend.page)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), backend.page, R,
                 maptype | FIXED | MapFlags.MAP_GROWSDOWN, 0, f.fd)
