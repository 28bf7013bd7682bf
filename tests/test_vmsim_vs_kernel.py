"""The simulator against the real kernel, step by step (hypothesis RuleBasedStateMachine).

One machine drives ``vmsim.AddressSpace`` and the kernel (``loader.libc.LibcMmap``, this very
process) with the same random sequence of mmap (anonymous and file; MAP_FIXED,
MAP_FIXED_NOREPLACE and hinted; private and shared; three open files of one path: an fd, its
dup and a second open, plus a read-only open), munmap, mprotect, mremap, reads, writes, probes,
write_words, the debugger's peek and poke (the kernel's are /proc/self/mem reads and writes),
and writes to and truncation of the file. Both work inside an arena reserved at the same address
(the kernel first, far below its mmap base so its own placements never land inside it), each
side on its own copy of the file. After every step: the same return value or errno, the same
maps lines inside the arena (boundaries and merging), the same bytes or fatal signal.
Kernel accesses that may fault run in a forked child (loader.isolate).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from harness import raw_load
from harness_sim import host_like_space
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_vmsim_mremap import real_mremap

from loader.isolate import probe, run_isolated
from loader.libc import LibcMmap
from loader.mmap import MapFlags, MmapError, ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE, page_round_up
from vmsim import AddressSpace, Fault
from vmsim.remap import MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE

P = HOST_PAGE_SIZE
PAGES = int(os.environ.get("VMSIM_VS_KERNEL_PAGES", "12"))  # arena pages
ARENA_HINT = 0x2000_0000_0000
NONE = ProtFlags.PROT_NONE
PRIV, SHARED, FIXED = MapFlags.MAP_PRIVATE, MapFlags.MAP_SHARED, MapFlags.MAP_FIXED
KINDS = {"fixed": FIXED, "noreplace": MapFlags.MAP_FIXED_NOREPLACE, "hint": MapFlags(0)}
FILE_PAGES = 5

REMAP_FLAGS = [0, MREMAP_MAYMOVE, MREMAP_MAYMOVE | MREMAP_FIXED, MREMAP_MAYMOVE | MREMAP_FIXED,
               MREMAP_MAYMOVE | MREMAP_DONTUNMAP, MREMAP_MAYMOVE | MREMAP_DONTUNMAP | MREMAP_FIXED]
"""mremap's flags, the valid combinations (a bad one is EINVAL before anything is looked at:
tests/test_vmsim_mremap.py tries those)."""

prots = st.sampled_from([ProtFlags(p) for p in range(8)])
pages = st.integers(0, PAGES - 1)
counts = st.integers(1, 4)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """("ok", value) or ("errno", name) for a call that may raise MmapError."""
    try:
        return "ok", fn(*args)
    except MmapError as exc:
        return "errno", errno.errorcode[exc.errno or 0]


def _write_in_child(mm: LibcMmap, addr: int, data: bytes) -> None:
    """Store into real memory through a raw pointer (in a forked child: it may fault)."""
    ctypes.memmove(addr, data, len(data))


def _words_in_child(where: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
    """Store each word through a raw pointer (in a forked child: it may fault)."""
    for addr, value in zip(where.tolist(), values.tolist(), strict=True):
        ctypes.memmove(addr, int(value).to_bytes(8, "little"), 8)


def _checked(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or "EFAULT" when LibcMmap refuses the access."""
    try:
        return fn(*args)
    except MmapError as exc:
        assert exc.errno == errno.EFAULT, exc
        return "EFAULT"


class SimVsKernel(RuleBasedStateMachine):
    """The same steps on the simulator and the kernel; equal answers after each."""

    def __init__(self) -> None:
        super().__init__()
        self.k = LibcMmap()
        self.s: AddressSpace = host_like_space()
        fenced = (PAGES + 2) * P
        base = self.k.mmap_anonymous(ARENA_HINT, fenced, NONE, PRIV)
        self.base, self.arena = base, base + P
        self.s.mmap_anonymous(base, fenced, NONE, PRIV | FIXED)
        for mm in (self.k, self.s):
            mm.mmap_anonymous(base, P, NONE, SHARED | FIXED)
            mm.mmap_anonymous(base + fenced - P, P, NONE, SHARED | FIXED)
        self.elsewhere: list[tuple[int, int]] = []
        self.mem = os.open("/proc/self/mem", os.O_RDWR)
        self.steps = -1  # same_maps runs once before the first step
        self.dir = tempfile.mkdtemp(prefix="vmsim-vs-kernel-")
        content = bytes(range(256)) * (FILE_PAGES * P // 256) + b"tail" * 25
        self.paths = {}
        self.fds: dict[str, list[int]] = {}
        for side in ("k", "s"):
            path = os.path.join(self.dir, f"file-{side}")
            with open(path, "wb") as out:
                out.write(content)
            first = os.open(path, os.O_RDWR)
            self.fds[side] = [first, os.dup(first), os.open(path, os.O_RDWR),
                              os.open(path, os.O_RDONLY)]
            self.paths[side] = os.path.realpath(path)

    def teardown(self) -> None:
        log = os.environ.get("VMSIM_VS_KERNEL_LOG")
        if log:
            with open(log, "a") as out:
                out.write(f"{self.steps}\n")
        self.s.close()
        self.k.munmap(self.base, (PAGES + 2) * P)
        for addr, length in self.elsewhere:
            self.k.munmap(addr, length)
        os.close(self.mem)
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def at(self, page: int) -> int:
        return self.arena + page * P

    def clip(self, page: int, n: int) -> int:
        return max(1, min(n, PAGES - page))

    def rel(self, side: str, regions: list[Region]) -> list[tuple[int, int, str, int, str]]:
        """Maps lines inside the arena, relative to it, the file's path named "F"."""
        rows = []
        end = self.arena + PAGES * P
        for r in regions:
            lo, hi = max(r.start, self.arena), min(r.end, end)
            if lo < hi:
                kind = "F" if r.path == self.paths[side] else (r.path or "anon")
                offset = r.offset + (lo - r.start) if r.path else r.offset
                rows.append((lo - self.arena, hi - self.arena, r.perms, offset, kind))
        return rows

    def same_mmap(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags, offset: int,
                  fds: tuple[int | None, int | None]) -> None:
        """mmap on both sides; equal errno, or equal address (inside the arena) or both
        placed outside it (then unmapped again on both sides)."""
        got_k = outcome(self.k.mmap, addr, length, prot, flags, offset, fds[0])
        got_s = outcome(self.s.mmap, addr, length, prot, flags, offset, fds[1])
        if got_k[0] == "ok" and got_s[0] == "ok":
            where_k, where_s = got_k[1].addr, got_s[1].addr
            inside_k = self.base <= where_k < self.arena + (PAGES + 1) * P
            inside_s = self.base <= where_s < self.arena + (PAGES + 1) * P
            assert (inside_k, inside_s) == (True, True) or not (inside_k or inside_s), \
                (hex(where_k), hex(where_s))
            if inside_k:
                assert where_k == where_s
            else:
                self.k.munmap(where_k, length)
                self.s.munmap(where_s, length)
            return
        assert got_k == got_s

    # ------------------------------------------------------------------ rules

    @rule(page=pages, n=counts, prot=prots, kind=st.sampled_from(sorted(KINDS)),
          shared=st.booleans(), noreserve=st.booleans())
    def mmap_anonymous(self, page: int, n: int, prot: ProtFlags, kind: str, shared: bool,
                       noreserve: bool) -> None:
        flags = (SHARED if shared else PRIV) | KINDS[kind] | MapFlags.MAP_ANONYMOUS
        if noreserve:
            flags |= MapFlags.MAP_NORESERVE
        self.same_mmap(self.at(page), self.clip(page, n) * P, prot, flags, 0, (None, None))

    @rule(page=pages, n=counts, prot=prots, kind=st.sampled_from(sorted(KINDS)),
          shared=st.booleans(), which=st.integers(0, 3), offset=st.integers(0, FILE_PAGES + 1))
    def mmap_file(self, page: int, n: int, prot: ProtFlags, kind: str, shared: bool,
                  which: int, offset: int) -> None:
        flags = (SHARED if shared else PRIV) | KINDS[kind]
        self.same_mmap(self.at(page), self.clip(page, n) * P, prot, flags, offset * P,
                       (self.fds["k"][which], self.fds["s"][which]))

    @rule(page=pages, n=counts)
    def munmap(self, page: int, n: int) -> None:
        length = self.clip(page, n) * P
        assert outcome(self.k.munmap, self.at(page), length) == \
            outcome(self.s.munmap, self.at(page), length)

    @rule(page=pages, n=counts, prot=prots)
    def mprotect(self, page: int, n: int, prot: ProtFlags) -> None:
        length = self.clip(page, n) * P
        assert outcome(self.k.mprotect, self.at(page), length, prot) == \
            outcome(self.s.mprotect, self.at(page), length, prot)

    @rule(page=pages, n=st.sampled_from([0, 1, 1, 2, 2, 3, 4]), grow=st.integers(-3, 4),
          flags=st.sampled_from(REMAP_FLAGS), to=pages, odd=st.sampled_from([0, 0, 0, 1, P - 1]))
    def mremap(self, page: int, n: int, grow: int, flags: int, to: int, odd: int) -> None:
        """mremap on both sides: within the arena (a fixed target never passes its end),
        or moved outside it, where the moved mapping's maps and bytes are compared, then it
        is unmapped. ``odd`` bytes make lengths unaligned; ``n`` 0 duplicates (shared
        mappings only); MREMAP_DONTUNMAP keeps the size (else EINVAL)."""
        old_len = self.clip(page, n) * P if n else 0
        new_len = max(0, old_len + (0 if flags & MREMAP_DONTUNMAP else grow * P) - odd)
        if flags & MREMAP_FIXED:
            new_len = min(new_len, (PAGES - to) * P)
        args = (self.at(page), old_len, new_len, flags, self.at(to))
        got_k, got_s = outcome(real_mremap, *args), outcome(self.s.mremap, *args)
        if got_k[0] == "errno" or got_s[0] == "errno":
            assert got_k == got_s
            return
        where_k, where_s = got_k[1], got_s[1]
        inside = [self.arena <= w < self.arena + PAGES * P for w in (where_k, where_s)]
        assert inside[0] == inside[1] and (where_k == where_s or not inside[0])
        if not inside[0]:
            self.same_moved(where_k, where_s, page_round_up(new_len))

    def same_moved(self, where_k: int, where_s: int, length: int) -> None:
        """A mapping moved outside the arena: equal maps lines and bytes (page by page, a
        fault as its signal) relative to each side's start; then both unmapped."""
        def rows(regions: list[Region], start: int) -> list[tuple[int, int, str]]:
            return [(max(r.start, start) - start, min(r.end, start + length) - start, r.perms)
                    for r in regions if r.start < start + length and r.end > start]
        assert rows(self.k.maps(), where_k) == rows(self.s.maps(), where_s)
        for off in range(0, length, P):
            got = run_isolated(raw_load, where_k + off, 16)
            try:
                sim: bytes | str = self.s.read(where_s + off, 16)
            except Fault as fault:
                sim = fault.signal
            assert (got.value if got.status == "ok" else got.status) == sim
        self.k.munmap(where_k, length)
        self.s.munmap(where_s, length)

    @rule(page=pages, offset=st.integers(0, P - 1), n=st.integers(1, 3 * P))
    def read(self, page: int, offset: int, n: int) -> None:
        addr = self.at(page) + offset
        n = min(n, self.arena + PAGES * P - addr)
        got = run_isolated(raw_load, addr, n)
        kernel = got.value if got.status == "ok" else got.status
        try:
            sim: bytes | str = self.s.read(addr, n)
        except Fault as fault:
            sim = fault.signal
        assert kernel == sim
        checked = _checked(self.k.read, addr, n)  # LibcMmap.read: EFAULT, not a signal
        assert checked == (kernel if got.status == "ok" else "EFAULT")

    @rule(page=pages, offset=st.integers(0, P - 1), n=st.integers(1, 64),
          byte=st.integers(0, 255))
    def write(self, page: int, offset: int, n: int, byte: int) -> None:
        addr = self.at(page) + offset
        data = bytes([byte]) * min(n, P - offset)  # within one page: all or nothing
        kernel = run_isolated(_write_in_child, self.k, addr, data).status
        assert _checked(self.k.write, addr, data) == (None if kernel == "ok" else "EFAULT")
        try:
            self.s.write(addr, data)
            sim = "ok"
        except Fault as fault:
            sim = fault.signal
        assert kernel == sim

    @rule(page=pages, offset=st.integers(0, P - 1), access=st.sampled_from("rw"))
    def probe(self, page: int, offset: int, access: str) -> None:
        addr = self.at(page) + offset
        fault = self.s.check_access(addr, 1, "r")  # the probe's "w" loads, then stores
        if fault is None and access == "w":
            fault = self.s.check_access(addr, 1, "w")
        assert probe(addr, access) == ("ok" if fault is None else fault.signal)

    @rule(page=pages, offset=st.integers(0, P - 1), n=st.integers(1, 64))
    def peek(self, page: int, offset: int, n: int) -> None:
        # the debugger's read: the kernel's is /proc/self/mem (FOLL_FORCE), EIO on a fault
        addr = self.at(page) + offset
        n = min(n, P - offset)
        try:
            kernel: bytes | str = os.pread(self.mem, n, addr)
        except OSError as exc:
            kernel = errno.errorcode[exc.errno or 0]
        try:
            sim: bytes | str = self.s.peek(addr, n)
        except Fault:
            sim = "EIO"
        assert kernel == sim

    @rule(page=pages, offset=st.integers(0, P - 1), n=st.integers(1, 16),
          byte=st.integers(0, 255))
    def poke(self, page: int, offset: int, n: int, byte: int) -> None:
        # the debugger's write through /proc/self/mem: private mappings whatever their
        # protection (copy-on-write), shared ones only when writable
        addr = self.at(page) + offset
        data = bytes([byte]) * min(n, P - offset)
        try:
            kernel: int | str = os.pwrite(self.mem, data, addr)
        except OSError as exc:
            kernel = errno.errorcode[exc.errno or 0]
        try:
            self.s.poke(addr, data)
            sim: int | str = len(data)
        except Fault:
            sim = "EIO"
        assert kernel == sim

    @rule(page=pages, slots=st.lists(st.integers(0, 3 * P // 8), min_size=1, max_size=8),
          value=st.integers(0, 2**64 - 1))
    def write_words(self, page: int, slots: list[int], value: int) -> None:
        where = np.array([self.at(page) + 8 * k for k in slots], dtype=np.uint64)
        where = where[where + 8 <= self.arena + PAGES * P]
        values = np.full(len(where), value, dtype=np.uint64)
        if not len(where):
            return
        kernel = run_isolated(_words_in_child, where, values).status
        faults = [self.s.check_access(int(a), 8, "w") for a in where]  # pure stores
        first = next((f for f in faults if f is not None), None)
        assert kernel == ("ok" if first is None else first.signal)
        if first is None:  # the kernel's store order before a fault is unknown: only
            self.k.write_words(where, values)  # calls that complete change memory
            self.s.write_words(where, values)
        else:
            assert run_isolated(_checked, self.k.write_words, where, values).value == "EFAULT"

    @rule(offset=st.integers(0, (FILE_PAGES + 1) * P), n=st.integers(1, 2 * P),
          byte=st.integers(0, 255))
    def write_file(self, offset: int, n: int, byte: int) -> None:
        for side in ("k", "s"):
            os.pwrite(self.fds[side][0], bytes([byte]) * n, offset)

    @rule(size=st.integers(0, (FILE_PAGES + 1) * P))
    def truncate_file(self, size: int) -> None:
        os.ftruncate(self.fds["k"][0], size)
        self.s.ftruncate(self.fds["s"][0], size)

    @invariant()
    def same_maps(self) -> None:
        self.steps += 1
        assert self.rel("k", self.k.maps()) == self.rel("s", self.s.maps())
        self.s.check()


TestSimVsKernel = SimVsKernel.TestCase
TestSimVsKernel.settings = settings(max_examples=50, stateful_step_count=20, deadline=None,
                                    suppress_health_check=list(HealthCheck))


class SimVsKernelLong(SimVsKernel):
    """The same machine for long campaigns (pytest -m slow)."""


TestSimVsKernelLong = pytest.mark.slow(SimVsKernelLong.TestCase)
TestSimVsKernelLong.settings = settings(max_examples=int(os.environ.get("VMSIM_VS_KERNEL_N",
                                                                        "3000")),
                                        stateful_step_count=40, deadline=None,
                                        suppress_health_check=list(HealthCheck))
