"""Hostile arguments, kernel against simulator (every backend): MAP_HUGETLB size bits and
flags of all ones (EINVAL where the kernel checks them, before any other check), the flags
MAP_SHARED_VALIDATE accepts, and mapping /dev/zero (private: anonymous memory that names the
file; shared: shmem sized to the mapping)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BackendHarness, FileFd, RelRegion, expect_errno

from loader.mmap import MapFlags, ProtFlags

NONE, R, W = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE
PRIV, SHARED, VALIDATE = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_SHARED_VALIDATE
FIXED, ANON, HUGETLB = MapFlags.MAP_FIXED, MapFlags.MAP_ANONYMOUS, MapFlags.MAP_HUGETLB
HUGE_SHIFT = 26
HAS_1G = Path("/sys/kernel/mm/hugepages/hugepages-1048576kB").exists()


def huge(log: int) -> MapFlags:
    """MAP_HUGETLB with huge page size 2**log (log 0: the default size)."""
    return HUGETLB | MapFlags(log << HUGE_SHIFT)


@pytest.mark.parametrize("flags", [-1, 0xFFFF_FFFF, 0x7FFF_FFFF], ids=hex)
@pytest.mark.parametrize("fd_kind", ["anon", "file"])
def test_flags_all_ones_einval(backend: BackendHarness, file_fd: FileFd, flags: int,
                               fd_kind: str) -> None:
    # all ones has MAP_ANONYMOUS and MAP_HUGETLB with size bits 63: EINVAL in
    # ksys_mmap_pgoff, before MAP_FIXED, mmap_min_addr or NOREPLACE are looked at
    fd = file_fd(b"x" * backend.page).fd if fd_kind == "file" else None
    for addr in (0, backend.at(1)):
        expect_errno(backend, errno.EINVAL, backend.mm.mmap, addr, backend.page, R | W,
                     MapFlags(flags & 0xFFFF_FFFF), 0, fd)


@pytest.mark.parametrize("log", [1, 12, 16, 20, 22, 29, 31, 63])
def test_hugetlb_unknown_size_einval(backend: BackendHarness, log: int) -> None:
    for maptype in (PRIV, SHARED):
        expect_errno(backend, errno.EINVAL, backend.mm.mmap, None, backend.page, R | W,
                     maptype | ANON | huge(log), 0, None)


@pytest.mark.parametrize("log", [0, 21, *([30] if HAS_1G else [])])
def test_hugetlb_known_size_enomem_without_pages(backend: BackendHarness, log: int) -> None:
    if int(Path("/proc/sys/vm/nr_hugepages").read_text()):
        pytest.fail("this test needs vm.nr_hugepages = 0 (no huge pages reserved)")
    expect_errno(backend, errno.ENOMEM, backend.mm.mmap, None, backend.page, R | W,
                 PRIV | ANON | huge(log), 0, None)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, None, 0, R | W,
                 PRIV | ANON | huge(log), 0, None)
    # a bad map type or MAP_GROWSDOWN: EINVAL before the missing pages count
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, None, backend.page, R | W,
                 MapFlags(0) | ANON | huge(log), 0, None)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, None, backend.page, R | W,
                 PRIV | ANON | MapFlags.MAP_GROWSDOWN | huge(log), 0, None)
    # a MAP_FIXED address not aligned to the huge page: EINVAL
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(1), backend.page, R | W,
                 PRIV | ANON | FIXED | huge(log), 0, None)


@pytest.mark.parametrize("log", [0, 21, 63])
def test_hugetlb_file_einval(backend: BackendHarness, file_fd: FileFd, log: int) -> None:
    f = file_fd(b"x" * backend.page)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, None, backend.page, R, PRIV | huge(log),
                 0, f.fd)


@pytest.mark.parametrize("bit", range(32), ids=lambda b: f"{1 << b:#x}")
def test_shared_validate_accepted_flags(backend: BackendHarness, file_fd: FileFd,
                                        bit: int) -> None:
    # the kernel's LEGACY_MAP_MASK (with MAP_32BIT, MAP_ABOVE4G and the MAP_HUGE_2MB/1GB
    # bits) is accepted, any other bit is EOPNOTSUPP (or the error of what it asks for)
    f = file_fd(b"x" * backend.page)
    flags = VALIDATE | MapFlags(1 << bit)
    got = backend.isolated(_try_map, backend, flags, f.fd).value
    assert got == EXPECTED_VALIDATE.setdefault(bit, got), f"flags {flags:#x}"


EXPECTED_VALIDATE: dict[int, str] = {}
"""The kernel's answer per bit, filled by the first backend (libc runs first)."""


def _try_map(backend: BackendHarness, flags: MapFlags, fd: int) -> str:
    """Map one page of ``fd`` read-only at a free place: "ok" (unmapped again) or the errno."""
    try:
        addr = backend.mm.mmap(None, backend.page, R, flags, 0, fd).addr
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    backend.mm.munmap(addr, backend.page)
    return "ok"


# /dev/zero

@pytest.fixture
def zero_fds() -> Iterator[tuple[int, int]]:
    """/dev/zero opened read-write and read-only."""
    rw, ro = os.open("/dev/zero", os.O_RDWR), os.open("/dev/zero", os.O_RDONLY)
    yield rw, ro
    os.close(rw)
    os.close(ro)


def test_dev_zero_maps_lines_and_merging(backend: BackendHarness,
                                         zero_fds: tuple[int, int]) -> None:
    rw, ro = zero_fds
    p, mm = backend.page, backend.mm
    st = os.stat("/dev/zero")
    mm.mmap(backend.at(0), p, R | W, PRIV | FIXED, 0, rw)
    mm.mmap(backend.at(1), p, R | W, PRIV | FIXED, p, rw)  # consecutive offset: merges
    mm.mmap_anonymous(backend.at(2), p, R | W, PRIV | FIXED)  # anonymous: does not
    mm.mmap(backend.at(3), p, R | W, PRIV | FIXED, 3 * p, rw)
    mm.mmap(backend.at(4), p, R | W, PRIV | FIXED, 0, rw)  # offset not consecutive
    mm.mmap(backend.at(5), p, R | W, SHARED | FIXED, 0, rw)  # shmem: never merges
    mm.mmap(backend.at(6), p, R | W, SHARED | FIXED, 0, rw)
    mm.mmap(backend.at(7), 2 * p, R, SHARED | FIXED, 7 * p, ro)  # read-only fd: not shmem
    mm.mmap(backend.at(9), 2 * p, R | W, SHARED | FIXED, 9 * p, rw)
    rows = backend.rel_maps()
    zero, shm = "/dev/zero", "/dev/zero (deleted)"
    assert rows[:10] == [
        RelRegion(0, 2 * p, "rw-p", 0, zero), RelRegion(2 * p, 3 * p, "rw-p", 0, "anon"),
        RelRegion(3 * p, 4 * p, "rw-p", 3 * p, zero), RelRegion(4 * p, 5 * p, "rw-p", 0, zero),
        RelRegion(5 * p, 6 * p, "rw-s", 0, shm), RelRegion(6 * p, 7 * p, "rw-s", 0, shm),
        RelRegion(7 * p, 9 * p, "r--s", 7 * p, zero), RelRegion(9 * p, 11 * p, "rw-s", 9 * p, shm),
        RelRegion(11 * p, backend.arena_size, "---p", 0, "anon")][:10]
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    private = backend.region_at(backend.at(0))
    shared = backend.region_at(backend.at(5))
    assert private is not None and (private.dev, private.inode) == (dev, st.st_ino)
    assert shared is not None and shared.dev == "00:01" and shared.inode != st.st_ino


def test_dev_zero_contents_private_and_shared(backend: BackendHarness,
                                              zero_fds: tuple[int, int]) -> None:
    rw, _ = zero_fds
    p, mm = backend.page, backend.mm
    mm.mmap(backend.at(0), 2 * p, R | W, PRIV | FIXED, 0, rw)
    mm.mmap(backend.at(2), 2 * p, R | W, SHARED | FIXED, 0, rw)
    assert backend.load(backend.at(0), 2 * p) == bytes(2 * p)
    mm.write(backend.at(0) + 5, b"private")
    mm.write(backend.at(2) + 5, b"shared")
    assert mm.read(backend.at(0), 12) == bytes(5) + b"private"
    assert mm.read(backend.at(2), 11) == bytes(5) + b"shared"
    assert os.pread(rw, 16, 0) == bytes(16)  # nothing reaches the device
    # a second private mapping of the same offset starts from zeros again
    mm.mmap(backend.at(4), p, R | W, PRIV | FIXED, 0, rw)
    assert backend.load(backend.at(4), 16) == bytes(16)


@pytest.mark.parametrize("off_pages", [0, 1, 3, 5])
def test_dev_zero_shared_sigbus_past_its_size(backend: BackendHarness,
                                              zero_fds: tuple[int, int], off_pages: int) -> None:
    # the shmem object behind a shared mapping is as long as the mapping: pages at file
    # offset `length` or beyond are past its end
    rw, _ = zero_fds
    p = backend.page
    backend.mm.mmap(backend.at(0), 4 * p, R | W, SHARED | FIXED, off_pages * p, rw)
    for k in range(4):
        want = "ok" if off_pages + k < 4 else "SIGBUS"
        assert (backend.probe(backend.at(k), "r"), backend.probe(backend.at(k), "w")) == \
            (want, want), f"page {k}"


def test_dev_zero_errors(backend: BackendHarness, zero_fds: tuple[int, int]) -> None:
    rw, ro = zero_fds
    p = backend.page
    expect_errno(backend, errno.EACCES, backend.mm.mmap, backend.at(0), p, R | W,
                 SHARED | FIXED, 0, ro)
    expect_errno(backend, errno.EINVAL, backend.mm.mmap, backend.at(0), p, R | W,
                 PRIV | FIXED | MapFlags.MAP_GROWSDOWN, 0, rw)
    expect_errno(backend, errno.EOPNOTSUPP, backend.mm.mmap, backend.at(0), p, R | W,
                 VALIDATE | FIXED | MapFlags.MAP_SYNC, 0, rw)
    null = os.open("/dev/null", os.O_RDWR)
    try:
        expect_errno(backend, errno.ENODEV, backend.mm.mmap, backend.at(0), p, R, PRIV | FIXED,
                     0, null)
    finally:
        os.close(null)
