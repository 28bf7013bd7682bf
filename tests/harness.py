"""Backend harnesses for the kernel ground-truth tests (tests/test_kernel_*.py).

A harness wraps one ``Mmap`` backend and gives the tests a private arena to work in, a view of
the maps inside it relative to its start, and a way to try accesses that may fault. The test
bodies use only this interface, so the same bodies hold the simulator to what the real kernel
does. The host harness is here; the simulator's lives in tests/harness_sim.py, which exposes
``HARNESSES = {"sim": <factory>}``; conftest.py merges it into :data:`BACKENDS`.

A factory is called as ``factory(arena_pages=256)`` and returns a :class:`BackendHarness`;
the fixture calls :meth:`BackendHarness.close` afterwards.

Adding a backend (what tests/harness_sim.py must provide; no test body changes):
- subclass :class:`BackendHarness`, call ``super().__init__(mm, page, arena_pages)``; set
  ``name``, ``max_map_count`` (may be smaller than the host's 65530 to keep the limit test
  quick) and ``has_pkeys`` (configure it like the host: ``loader.libc.host_has_pkeys()``);
- ``mm.maps()`` must name a file mapping by the fd's canonical path (what
  ``os.path.realpath(f"/proc/self/fd/{fd}")`` gives) and shared anonymous memory
  ``/dev/zero (deleted)``; the tests pass real host file descriptors (regular files, a
  directory, a pipe, a file on a noexec tmpfs) and change files under the mapping with
  ``os.pwrite``/``os.ftruncate``;
- :meth:`probe` must not change the backend (the host probes in a forked child);
  :meth:`isolated` turns a fault into ``Isolated(signal, None)``; :meth:`map_count` counts
  what vm.max_map_count limits; :meth:`with_read_implies_exec` runs a callable under the
  READ_IMPLIES_EXEC personality.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from errno import errorcode
from pathlib import Path
from typing import Any, NamedTuple

from loader.libc import LibcMmap, host_has_pkeys
from loader.mmap import MapFlags, Mmap, MmapError, ProtFlags, Region
from vmsim.fuzz.isolate import Isolated, probe, run_isolated

__all__ = [
    "BACKENDS",
    "READ_IMPLIES_EXEC",
    "BackendHarness",
    "FileFd",
    "LibcHarness",
    "OpenFile",
    "RelRegion",
    "expect_errno",
]

READ_IMPLIES_EXEC = 0x0400000
"""The personality(2) flag that makes PROT_READ imply PROT_EXEC."""


class OpenFile(NamedTuple):
    """An open file descriptor and the canonical path it was opened from."""

    fd: int
    path: str


FileFd = Callable[..., OpenFile]
"""The ``file_fd`` fixture: ``file_fd(content=b"", *, size=None, flags=os.O_RDWR, path=None)``."""


class RelRegion(NamedTuple):
    """A maps line inside the arena: offsets from the arena start, ``kind`` is the mapped
    file's path, ``"anon"`` for private anonymous memory (shared anonymous memory shows the
    kernel's ``"/dev/zero (deleted)"``)."""

    start: int
    end: int
    perms: str
    offset: int
    kind: str


class BackendHarness:
    """A backend plus a private arena: ``arena_pages`` PROT_NONE pages at ``arena``, made first.

    Every MAP_FIXED, munmap and mprotect of a test happens inside ``[arena, arena_end)``. The
    arena is fenced by one shared anonymous PROT_NONE page at each side, which never merges
    with anything, so what happens inside cannot merge with the process's other mappings; an
    unmapped page above the upper fence stops a runaway mprotect.

    Subclasses set ``name``, ``max_map_count``, ``has_pkeys`` and implement :meth:`probe`,
    :meth:`isolated` and :meth:`with_read_implies_exec`.
    """

    name = "?"
    max_map_count: int
    has_pkeys: bool

    def __init__(self, mm: Mmap, page: int, arena_pages: int = 256) -> None:
        self.mm = mm
        self.page = page
        self.arena_size = arena_pages * page
        fenced = self.arena_size + 2 * page
        base = mm.mmap_reserve(None, fenced + page, True)
        # An unmapped page above the upper fence: an mprotect with a huge length walks up
        # through every contiguous mapping before it meets a hole (it is not atomic), so the
        # hole keeps such a call from changing the process's own mappings above the arena.
        mm.munmap(base + fenced, page)
        fence = ProtFlags.PROT_NONE
        shared_fixed = MapFlags.MAP_SHARED | MapFlags.MAP_FIXED
        mm.mmap_anonymous(base, page, fence, shared_fixed)
        mm.mmap_anonymous(base + fenced - page, page, fence, shared_fixed)
        self._fenced = (base, fenced + page)
        self.arena = base + page
        self._elsewhere: list[tuple[int, int]] = []

    @property
    def arena_end(self) -> int:
        """The first address past the arena."""
        return self.arena + self.arena_size

    def at(self, pages: int) -> int:
        """The address ``pages`` pages into the arena."""
        return self.arena + pages * self.page

    def rel_maps(self) -> list[RelRegion]:
        """The backend's maps lines that overlap the arena, clipped to it, relative to it."""
        rows = []
        for r in self.mm.maps():
            start, end = max(r.start, self.arena), min(r.end, self.arena_end)
            if start < end:
                offset = r.offset + (start - r.start) if r.path else r.offset
                rows.append(RelRegion(start - self.arena, end - self.arena, r.perms, offset,
                                      r.path or "anon"))
        return rows

    def region_at(self, addr: int) -> Region | None:
        """The backend's Region containing ``addr``, or None."""
        return next((r for r in self.mm.maps() if r.start <= addr < r.end), None)

    def map_count(self) -> int:
        """How many mappings the backend has in all (what vm.max_map_count limits)."""
        return len(self.mm.maps())

    def unmap_later(self, addr: int, length: int) -> None:
        """Remember a mapping a test made outside the arena; :meth:`close` unmaps it."""
        self._elsewhere.append((addr, length))

    def load(self, addr: int, n: int) -> bytes | str:
        """``n`` bytes read at ``addr``, or the fatal signal's name if the read faults."""
        got = self.isolated(self.mm.read, addr, n)
        return got.value if got.status == "ok" else got.status

    def close(self) -> None:
        """Unmap the arena, its fences and whatever :meth:`unmap_later` recorded."""
        for addr, length in [*self._elsewhere, self._fenced]:
            self.mm.munmap(addr, length)
        self._elsewhere.clear()

    def probe(self, addr: int, access: str) -> str:
        """Try one user-mode access ("r", "w" or "x") at ``addr``: "ok", "SIGSEGV" or "SIGBUS".
        Must leave the backend exactly as it was (no byte, page or merge state changes)."""
        raise NotImplementedError

    def isolated(self, fn: Callable[..., Any], *args: Any) -> Isolated:
        """Run ``fn(*args)`` so that a fault ends it cleanly: Isolated("ok", result) or
        Isolated(signal name, None). The host runs it in a forked child (its changes are lost
        with the child); a simulator may run it in place."""
        raise NotImplementedError

    def with_read_implies_exec(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` with the READ_IMPLIES_EXEC personality and return its result; the
        personality does not outlive the call."""
        raise NotImplementedError


def raw_load(addr: int, n: int) -> bytes:
    """``n`` bytes at ``addr`` through a raw pointer, as compiled code loads them: a bad
    address kills the process with the kernel's signal (run it in a forked child)."""
    buf = ctypes.create_string_buffer(n)
    ctypes.memmove(buf, addr, n)
    return buf.raw


def _personality_then(fn: Callable[[], Any]) -> Any:
    """In a forked child: switch on READ_IMPLIES_EXEC, then run fn."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.personality.argtypes = [ctypes.c_ulong]
    if libc.personality(READ_IMPLIES_EXEC) == -1:
        raise OSError(ctypes.get_errno(), "personality(READ_IMPLIES_EXEC)")
    return fn()


class LibcHarness(BackendHarness):
    """The real kernel through :class:`loader.libc.LibcMmap`; faults run in forked children."""

    name = "libc"

    def __init__(self, arena_pages: int = 256) -> None:
        mm = LibcMmap()
        super().__init__(mm, mm.page_size, arena_pages)
        self.max_map_count = int(Path("/proc/sys/vm/max_map_count").read_text())
        self.has_pkeys = host_has_pkeys()

    def map_count(self) -> int:
        """The kernel's mm->map_count: the maps lines minus the [vsyscall] gate area, which
        /proc/self/maps shows but vm.max_map_count does not count."""
        with open("/proc/self/maps") as maps:
            return sum(1 for line in maps if not line.rstrip().endswith("[vsyscall]"))

    def probe(self, addr: int, access: str) -> str:
        """See :meth:`BackendHarness.probe`: done in a forked child."""
        return probe(addr, access)

    def load(self, addr: int, n: int) -> bytes | str:
        """See :meth:`BackendHarness.load`: a raw load in a forked child, so the kernel's own
        signal is seen (LibcMmap.read turns it into MmapError(EFAULT), which names none)."""
        got = self.isolated(raw_load, addr, n)
        return got.value if got.status == "ok" else got.status

    def isolated(self, fn: Callable[..., Any], *args: Any) -> Isolated:
        """See :meth:`BackendHarness.isolated`: a forked child (loader.isolate)."""
        return run_isolated(fn, *args, timeout=60.0)

    def with_read_implies_exec(self, fn: Callable[[], Any]) -> Any:
        """See :meth:`BackendHarness.with_read_implies_exec`: in a forked child."""
        got = run_isolated(_personality_then, fn)
        if got.status != "ok":
            raise AssertionError(f"READ_IMPLIES_EXEC child died of {got.status}")
        return got.value


BACKENDS: dict[str, Callable[..., BackendHarness]] = {"libc": LibcHarness}
"""Backend name -> harness factory; conftest.py adds the simulator's when it exists."""


def expect_errno(backend: BackendHarness, code: int, fn: Callable[..., Any], *args: Any) -> None:
    """Assert ``fn(*args)`` raises MmapError with errno ``code`` and leaves the arena's maps
    exactly as they were."""
    before = backend.rel_maps()
    try:
        fn(*args)
    except MmapError as exc:
        assert exc.errno == code, f"expected {errorcode[code]}, got {exc}"
    else:
        raise AssertionError(f"expected MmapError {errorcode[code]}, the call succeeded")
    assert backend.rel_maps() == before
