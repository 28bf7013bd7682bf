"""More kernel ground truth the simulator models, beyond shared/linux-mm.md's rows, against
every backend (the ``backend`` fixture of conftest.py: the real kernel and the simulator).

Each test pins down one piece of hidden state or one corner the simulator's code relies on,
so that the simulator is held to what this machine's kernel does, not to our reading of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from harness import BackendHarness, FileFd, RelRegion

from loader.mmap import MapFlags, ProtFlags

NONE, R, W, X = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC
PRIV, SHARED, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_FIXED
ZERO = "/dev/zero (deleted)"


def rows(backend: BackendHarness, *spec: tuple[int, int, str, int, str]) -> list[RelRegion]:
    """RelRegions from (start page, end page, perms, offset page, kind) tuples."""
    p = backend.page
    return [RelRegion(a * p, b * p, perms, off * p, kind) for a, b, perms, off, kind in spec]


def anon(backend: BackendHarness, page: int, n: int, prot: ProtFlags,
         flags: MapFlags = PRIV) -> int:
    """Map ``n`` anonymous pages at arena page ``page`` with MAP_FIXED."""
    return backend.mm.mmap_anonymous(backend.at(page), n * backend.page, prot, flags | FIXED)


def test_written_neighbour_lends_its_anon_vma(backend: BackendHarness) -> None:
    # a page written next to a written neighbour with other permissions reuses its anon_vma
    # (find_mergeable_anon_vma), so once the permissions agree the two merge
    anon(backend, 4, 1, R | W)
    anon(backend, 5, 1, R | W | X)
    backend.mm.write(backend.at(4), b"a")
    backend.mm.write(backend.at(5), b"b")
    backend.mm.mprotect(backend.at(5), backend.page, R | W)
    assert backend.rel_maps()[1:3] == rows(backend, (4, 6, "rw-p", 0, "anon"),
                                           (6, 256, "---p", 0, "anon"))


def test_separately_written_neighbours_never_merge(backend: BackendHarness) -> None:
    anon(backend, 4, 1, R | W)
    anon(backend, 6, 1, R | W | X)
    backend.mm.write(backend.at(4), b"a")
    backend.mm.write(backend.at(6), b"b")
    anon(backend, 5, 1, R | W | X)  # same permissions as the right one only: joins it
    backend.mm.mprotect(backend.at(5), 2 * backend.page, R | W)
    assert backend.rel_maps()[1:3] == rows(backend, (4, 5, "rw-p", 0, "anon"),
                                           (5, 7, "rw-p", 0, "anon"))


def test_shared_anonymous_split_then_restored_merges(backend: BackendHarness) -> None:
    anon(backend, 4, 3, R | W, SHARED)
    backend.mm.mprotect(backend.at(5), backend.page, R)
    assert backend.rel_maps()[1:4] == rows(backend, (4, 5, "rw-s", 0, ZERO),
                                           (5, 6, "r--s", 1, ZERO), (6, 7, "rw-s", 2, ZERO))
    backend.mm.mprotect(backend.at(5), backend.page, R | W)
    assert backend.rel_maps()[1] == RelRegion(4 * backend.page, 7 * backend.page, "rw-s", 0,
                                              ZERO)


def test_map_stack_does_not_merge_with_plain(backend: BackendHarness) -> None:
    anon(backend, 4, 1, R | W)
    anon(backend, 5, 1, R | W, PRIV | MapFlags.MAP_STACK)
    assert backend.rel_maps()[1:3] == rows(backend, (4, 5, "rw-p", 0, "anon"),
                                           (5, 6, "rw-p", 0, "anon"))


def test_map_droppable_is_private_and_apart(backend: BackendHarness) -> None:
    anon(backend, 4, 1, R | W)
    anon(backend, 5, 1, R | W, MapFlags(0x8))
    assert backend.rel_maps()[1:3] == rows(backend, (4, 5, "rw-p", 0, "anon"),
                                           (5, 6, "rw-p", 0, "anon"))


def test_same_file_mapped_twice_at_the_same_place(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"t" * 2 * p)
    backend.mm.mmap(backend.at(4), 2 * p, R, PRIV | FIXED, 0, f.fd)
    backend.mm.mmap(backend.at(4), 2 * p, R, PRIV | FIXED, 0, f.fd)
    assert backend.rel_maps()[1] == RelRegion(4 * p, 6 * p, "r--p", 0, f.path)
    assert backend.mm.read(backend.at(5), 2) == b"tt"


def test_mapping_survives_closing_the_fd(backend: BackendHarness, file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"c" * p)
    backend.mm.mmap(backend.at(4), p, R, SHARED | FIXED, 0, f.fd)
    os.close(f.fd)
    assert backend.mm.read(backend.at(4), 3) == b"ccc"


def test_shared_write_past_eof_stays_in_the_page(backend: BackendHarness, file_fd: FileFd) -> None:
    # bytes stored past EOF in the last page live in the page cache, not in the file
    p = backend.page
    f = file_fd(b"e" * 100)
    backend.mm.mmap(backend.at(4), p, R | W, SHARED | FIXED, 0, f.fd)
    backend.mm.write(backend.at(4) + 98, b"XYZW")
    assert os.pread(f.fd, 200, 0) == b"e" * 98 + b"XY"
    assert backend.mm.read(backend.at(4) + 98, 4) == b"XYZW"


def test_private_page_copied_keeps_data_when_file_changes(backend: BackendHarness,
                                                          file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"o" * 2 * p)
    backend.mm.mmap(backend.at(4), 2 * p, R | W, PRIV | FIXED, 0, f.fd)
    backend.mm.write(backend.at(4), b"M")
    os.pwrite(f.fd, b"NN", 0)
    os.pwrite(f.fd, b"NN", p)
    assert backend.mm.read(backend.at(4), 2) == b"Mo"
    assert backend.mm.read(backend.at(5), 2) == b"NN"


def test_file_shrunk_within_last_page_reads_zero_tail(backend: BackendHarness,
                                                      file_fd: FileFd) -> None:
    p = backend.page
    f = file_fd(b"z" * p)
    backend.mm.mmap(backend.at(4), p, R, SHARED | FIXED, 0, f.fd)
    assert backend.mm.read(backend.at(4) + 10, 2) == b"zz"
    os.ftruncate(f.fd, 10)
    assert backend.load(backend.at(4) + 8, 4) == b"zz\0\0"


def test_populated_private_memory_counts_as_written(backend: BackendHarness) -> None:
    # MAP_POPULATE write-faults private writable memory in: it has an anon_vma, so made
    # read-only it keeps VM_ACCOUNT and stays apart from a never-written read-only neighbour
    anon(backend, 4, 1, R)
    anon(backend, 5, 1, R | W, PRIV | MapFlags.MAP_POPULATE)
    backend.mm.mprotect(backend.at(5), backend.page, R)
    anon(backend, 7, 1, R)
    anon(backend, 8, 1, R | W, PRIV | MapFlags.MAP_POPULATE | MapFlags.MAP_NONBLOCK)
    backend.mm.mprotect(backend.at(8), backend.page, R)
    assert backend.rel_maps()[1:5] == rows(backend, (4, 5, "r--p", 0, "anon"),
                                           (5, 6, "r--p", 0, "anon"),
                                           (6, 7, "---p", 0, "anon"),
                                           (7, 9, "r--p", 0, "anon"))


def test_large_file_mapping_aligned_to_its_offset(backend: BackendHarness, file_fd: FileFd) -> None:
    # on ext4/xfs, file mappings of 2 MiB or more are placed so that address and file offset
    # agree modulo 2 MiB (thp_get_unmapped_area); a hint free for the padded range is kept
    pmd = 2 << 20
    f = file_fd(size=8 << 20)
    aligned = _thp_fs(f.path)
    for offset in (0, backend.page):
        got = backend.mm.mmap(None, 4 << 20, R, PRIV, offset, f.fd).addr
        backend.unmap_later(got, 4 << 20)
        if aligned:
            assert (got - offset) % pmd == 0, hex(got)
    anon_got = backend.mm.mmap_anonymous(0, 4 << 20, R, PRIV)
    backend.unmap_later(anon_got, 4 << 20)
    assert anon_got % pmd == 0


def _thp_fs(path: str) -> bool:
    """True when ``path`` lies on ext4 or xfs (per /proc/self/mountinfo)."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as info:
        for line in info:
            if line.split()[2] == want:
                return line.split(" - ", 1)[1].split()[0] in ("ext4", "xfs")
    return False


def _one_below_the_limit(backend: BackendHarness) -> dict[str, Any]:
    """At max_map_count - 1 mappings, mprotect a page in the middle of a big VMA: the first
    split fits, the second does not. Record what is left."""
    from test_kernel_limits import fill_to_limit, outcome

    mm, p = backend.mm, backend.page
    free, _ = fill_to_limit(backend)
    mm.munmap(backend.at(1), p)  # drop one island: one mapping fewer than the limit
    seen: dict[str, Any] = {"count": backend.map_count() - backend.max_map_count}
    seen["mprotect"] = outcome(mm.mprotect, backend.at(free + 4), p, R)
    seen["after"] = backend.map_count() - backend.max_map_count
    for island in range(3, 3 + 2 * 64, 2):  # room for Python to allocate while reading maps
        mm.munmap(backend.at(island), p)
    region = backend.region_at(backend.at(free + 4))
    if hasattr(backend.mm, "check"):
        backend.mm.check()  # the simulator's invariants allow the unmerged pair
    seen["split at"] = None if region is None else (region.start - backend.at(free + 4),
                                                    region.perms)
    return seen


def test_mprotect_first_split_stays_when_the_second_fails(
        make_backend: Callable[[int], BackendHarness]) -> None:
    limit = make_backend(16).max_map_count
    backend = make_backend(2 * limit + 64)
    got = backend.isolated(_one_below_the_limit, backend)
    assert got.status == "ok"
    # the VMA was split before the page (same flags on both sides, left unmerged), then the
    # split after it failed: ENOMEM with one mapping more than before
    assert got.value == {"count": -1, "mprotect": "ENOMEM", "after": 0, "split at": (0, "---p")}
