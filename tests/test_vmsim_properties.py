"""Properties of the simulator under any sequence of calls, however bad: random integers for
every address, length, protection, flag word, offset and fd.

Nothing but MmapError (with an errno Linux's mmap/munmap/mprotect can give) or Fault may
come out, and after every call the simulator's invariants hold (AddressSpace.check: VMAs
sorted, disjoint, page-aligned, inside the user space, no unmerged mergeable neighbours, the
gap index in step, PTEs only inside VMAs and never more permissive than them).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.mmap import MapFlags, MmapError, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim import AddressSpace, Fault

P = HOST_PAGE_SIZE
BASE = 0x5555_0000_0000
LINUX_ERRNOS = {errno.EINVAL, errno.ENOMEM, errno.EBADF, errno.EACCES, errno.EEXIST,
                errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENODEV, errno.EPERM}

near = st.builds(lambda page, off: BASE + page * P + off, st.integers(0, 40),
                 st.sampled_from([0, 0, 0, 1, 8, P - 1]))
edges = st.sampled_from([0, P, 0x10000, (1 << 47) - P, 1 << 47, (1 << 63), (1 << 64) - P,
                         (1 << 64) - 1, -1, -P, 1 << 64, 1 << 80])
addrs = st.one_of(near, edges, st.integers(-(1 << 70), 1 << 70), st.none())
lengths = st.one_of(st.integers(0, 12 * P), edges, st.integers(-(1 << 70), 1 << 70))
prots = st.one_of(st.integers(0, 7), st.integers(0, 0xFF), st.integers(-(1 << 40), 1 << 40),
                  st.sampled_from([0x01000000, 0x02000000, 0x03000007]))
flags = st.one_of(
    st.builds(lambda t, extra: t | extra, st.sampled_from([1, 2, 3, 0, 4, 8, 0xF]),
              st.sets(st.sampled_from([0x10, 0x20, 0x40, 0x100, 0x2000, 0x4000, 0x8000,
                                       0x20000, 0x40000, 0x100000, 0x400000]))
              .map(sum)),
    st.integers(-(1 << 40), 1 << 40))
offsets = st.one_of(st.integers(0, 8).map(lambda k: k * P), edges,
                    st.integers(-(1 << 70), 1 << 70))

plausible_flags = st.builds(
    lambda t, extra: t | extra, st.sampled_from([1, 2, 2, 3]),
    st.sets(st.sampled_from([0x10, 0x10, 0x20, 0x20, 0x4000, 0x8000, 0x20000, 0x100000]))
    .map(sum))
near_pages = st.integers(0, 40).map(lambda k: BASE + k * P)

ops = st.one_of(
    st.tuples(st.just("mmap"), near_pages, st.integers(1, 8 * P), st.integers(0, 7),
              plausible_flags, st.integers(0, 4).map(lambda k: k * P), st.integers(0, 4)),
    st.tuples(st.just("mprotect"), near_pages, st.integers(1, 8 * P), st.integers(0, 7)),
    st.tuples(st.just("munmap"), near_pages, st.integers(1, 8 * P)),
    st.tuples(st.just("read"), near, st.integers(1, 2 * P)),
    st.tuples(st.just("write"), near, st.integers(1, 2 * P)),
    st.tuples(st.just("mmap"), addrs, lengths, prots, flags, offsets, st.integers(-2, 4)),
    st.tuples(st.just("munmap"), addrs, lengths),
    st.tuples(st.just("mprotect"), addrs, lengths, prots),
    st.tuples(st.just("read"), addrs, st.integers(0, 3 * P)),
    st.tuples(st.just("write"), addrs, st.integers(0, 3 * P)),
    st.tuples(st.just("poke"), addrs, st.integers(0, 64)),
    st.tuples(st.just("words"), st.lists(near, min_size=1, max_size=20)),
    st.tuples(st.just("truncate"), st.integers(0, 6 * P)),
)


def run(space: AddressSpace, op: tuple[Any, ...], fds: list[int]) -> None:
    """One call; fd codes: -2 a closed fd, -1 itself, 0..4 the prepared fds."""
    name, *args = op
    if name == "mmap":
        addr, length, prot, flag, offset, which = args
        fd = {-2: 999, -1: -1}.get(which, fds[which % len(fds)] if which >= 0 else -1)
        space.mmap(addr, length, ProtFlags(prot & 0xFFFF_FFFF) if prot >= 0 else prot,
                   flag, offset, None if which == 4 else fd)
    elif name == "munmap":
        space.munmap(args[0] or 0, args[1])
    elif name == "mprotect":
        space.mprotect(args[0] or 0, args[1], args[2])
    elif name == "read":
        space.read(args[0] or 0, args[1])
    elif name == "write":
        space.write(args[0] or 0, b"w" * args[1])
    elif name == "poke":
        space.poke(args[0] or 0, b"p" * args[1])
    elif name == "words":
        where = np.array(args[0], dtype=np.uint64)
        space.write_words(where, np.arange(len(where), dtype=np.uint64))
    else:
        space.ftruncate(fds[0], args[0])


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(ops, max_size=30))
def test_any_call_sequence_gives_mmaperror_or_fault_and_keeps_invariants(
        tmp_path_factory: pytest.TempPathFactory, sequence: list[tuple[Any, ...]]) -> None:
    where = Path(tmp_path_factory.mktemp("prop")) / "f"
    where.write_bytes(b"d" * (3 * P + 7))
    fds = [os.open(where, os.O_RDWR), os.open(where, os.O_RDONLY),
           os.open(where, os.O_WRONLY), os.open(where.parent, os.O_RDONLY)]
    fds.insert(1, os.dup(fds[0]))
    space = AddressSpace(max_map_count=64)
    space.mmap_anonymous(BASE, 16 * P, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE,
                         MapFlags.MAP_PRIVATE | MapFlags.MAP_FIXED)
    try:
        for op in sequence:
            try:
                run(space, op, fds)
            except MmapError as exc:
                assert exc.errno in LINUX_ERRNOS, exc
            except Fault as fault:
                assert fault.signal in ("SIGSEGV", "SIGBUS")
            space.check()
    finally:
        for fd in fds:
            os.close(fd)
