"""vm.max_map_count (shared/linux-mm.md: "a split that would exceed vm.max_map_count"), against
every backend. The process is driven to exactly the limit inside a big arena; on the host this
runs in a forked child, so the test process itself never sits at the limit."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from harness import BackendHarness

from loader.mmap import MapFlags, MmapError, ProtFlags

NONE, R, W = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE
PRIV, SHARED, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_FIXED


def outcome(fn: Callable[..., Any], *args: Any) -> str:
    """"ok" or the errno name of the MmapError that ``fn(*args)`` raised."""
    try:
        fn(*args)
    except MmapError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def fill_to_limit(backend: BackendHarness) -> tuple[int, int]:
    """Split the arena with one-page r-- islands until the backend holds exactly
    max_map_count mappings; return the first arena page past the islands and the end
    address of the PROT_NONE vma that starts there."""
    mm, p = backend.mm, backend.page
    island = 1
    need = backend.max_map_count - backend.map_count()
    while need >= 2:
        mm.mprotect(backend.at(island), p, R)  # one vma becomes three
        island += 2
        need -= 2
        if need < 64:
            need = backend.max_map_count - backend.map_count()
    if need == 1:  # split off the arena's last page: its upper neighbour is a fence
        mm.mprotect(backend.arena_end - p, p, R)
        return island + 1, backend.arena_end - p
    return island + 1, backend.arena_end


def at_the_limit(backend: BackendHarness) -> dict[str, Any]:
    """Drive ``backend`` to the limit and record what each call then does."""
    mm, p = backend.mm, backend.page
    free, rest_end = fill_to_limit(backend)  # (reading all maps may not fit at the limit)
    seen: dict[str, Any] = {"count": backend.map_count() - backend.max_map_count}
    seen["munmap splitting a vma in three"] = outcome(mm.munmap, backend.at(free + 1), p)
    seen["mprotect splitting a vma in three"] = outcome(mm.mprotect, backend.at(free + 1), p, R)
    seen["mprotect splitting a vma in two"] = outcome(mm.mprotect, backend.at(free), p, R)
    seen["MAP_FIXED splitting a vma in three"] = outcome(
        mm.mmap_anonymous, backend.at(free + 1), p, R | W, PRIV | FIXED)
    seen["unchanged"] = backend.map_count() - backend.max_map_count
    seen["munmap of a vma's upper part"] = outcome(mm.munmap, backend.at(free + 2),
                                                   rest_end - backend.at(free + 2))
    seen["new vma at the limit"] = outcome(mm.mmap_anonymous, backend.at(free + 2), p, R,
                                           SHARED | FIXED)
    seen["over the limit"] = backend.map_count() - backend.max_map_count
    seen["new vma over the limit"] = outcome(mm.mmap_anonymous, backend.at(free + 4), p, R,
                                             SHARED | FIXED)
    seen["munmap of a whole vma over the limit"] = outcome(mm.munmap, backend.at(1), p)
    seen["after"] = backend.map_count() - backend.max_map_count
    return seen


def test_max_map_count(make_backend: Callable[[int], BackendHarness]) -> None:
    limit = make_backend(16).max_map_count
    backend = make_backend(2 * limit + 64)
    got = backend.isolated(at_the_limit, backend)
    assert got.status == "ok"
    assert got.value == {
        "count": 0,
        "munmap splitting a vma in three": "ENOMEM",
        "mprotect splitting a vma in three": "ENOMEM",
        "mprotect splitting a vma in two": "ENOMEM",
        "MAP_FIXED splitting a vma in three": "ENOMEM",
        "unchanged": 0,
        "munmap of a vma's upper part": "ok",
        # this kernel checks map_count > max (not >=) before a new mapping: one more fits
        "new vma at the limit": "ok",
        "over the limit": 1,
        "new vma over the limit": "ENOMEM",
        "munmap of a whole vma over the limit": "ok",
        "after": 0,
    }
