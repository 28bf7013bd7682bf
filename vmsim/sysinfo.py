"""System calls that read the host's clocks and file attributes for a simulated process.

Part of ``vmsim``'s process layer (``vmsim.syscalls`` dispatches to them). Nothing here
reaches the host's memory or changes anything: the clocks are the host's (without a vDSO,
glibc asks the kernel for the time, so these are what ``time()``, ``gettimeofday`` and
``clock_gettime`` return), and the extended attributes, the file systems' statistics and
the machine's memory and load figures are read from the host, as the read-only ``stat`` calls
are. Each function takes the process's space first and returns
the syscall's result (``-errno`` on failure).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections.abc import Callable

from vmsim.space import AddressSpace

__all__ = ["CLOCKS", "clock_gettime", "clock_nanosleep", "fstatfs", "getrandom", "getxattr",
           "gettimeofday", "sysinfo", "time_call", "uname"]

CLOCKS = {0: time.CLOCK_REALTIME, 1: time.CLOCK_MONOTONIC, 2: time.CLOCK_PROCESS_CPUTIME_ID,
          3: time.CLOCK_THREAD_CPUTIME_ID, 4: time.CLOCK_MONOTONIC_RAW, 5: 5, 6: 6,
          7: time.CLOCK_BOOTTIME}
"""The clock ids a process may read: REALTIME, MONOTONIC, the two CPU-time clocks (the host
process's: the emulation's cost, not the program's), MONOTONIC_RAW, the two COARSE ones,
BOOTTIME."""
_LIBC = ctypes.CDLL(None, use_errno=True)
_STATFS_SIZE = 120    # sizeof(struct statfs), x86-64
_SYSINFO_SIZE = 112   # sizeof(struct sysinfo), x86-64
_XATTR_NAME_MAX = 255
_XATTR_MAX = 65536
_TIMER_ABSTIME = 1
_NAP = 0.05
"""A sleep is taken in naps this long (seconds), so a time limit or Ctrl-C ends it soon."""
"""XATTR_SIZE_MAX: the longest value Linux hands out."""


def _nanoseconds(clock: int) -> int:
    """The host's ``clock`` now, in nanoseconds."""
    return time.clock_gettime_ns(clock)


def clock_gettime(space: AddressSpace, clock: int, ts: int) -> int:
    """clock_gettime(2): a struct timespec from the host's clock; EINVAL for another id."""
    host = CLOCKS.get(clock)
    if host is None:
        return -errno.EINVAL
    seconds, nanoseconds = divmod(_nanoseconds(host), 1_000_000_000)
    space.write(ts, struct.pack("<qq", seconds, nanoseconds))
    return 0


def gettimeofday(space: AddressSpace, tv: int, _tz: int) -> int:
    """gettimeofday(2): a struct timeval of the real-time clock (when ``tv`` is not NULL)."""
    if tv:
        seconds, nanoseconds = divmod(_nanoseconds(time.CLOCK_REALTIME), 1_000_000_000)
        space.write(tv, struct.pack("<qq", seconds, nanoseconds // 1000))
    return 0


def time_call(space: AddressSpace, where: int) -> int:
    """time(2): seconds since the epoch, also stored at ``where`` unless it is NULL."""
    now = _nanoseconds(time.CLOCK_REALTIME) // 1_000_000_000
    if where:
        space.write(where, struct.pack("<q", now))
    return now


def getxattr(space: AddressSpace, path: str, key: str, value: int, size: int, *,
             follow: bool) -> int:
    """getxattr(2) (``follow``) or lgetxattr(2) of a host file: the value's length, the
    value copied when ``size`` is not 0 (ERANGE when it is too small, or the name longer
    than XATTR_NAME_MAX); the host's errno (ENODATA: no such attribute)."""
    if len(os.fsencode(key)) > _XATTR_NAME_MAX:
        return -errno.ERANGE
    data = os.getxattr(path, key, follow_symlinks=follow)[:_XATTR_MAX]
    if size & 0xFFFF_FFFF_FFFF_FFFF:
        if len(data) > size:
            return -errno.ERANGE
        space.write(value, data)
    return len(data)


def fstatfs(space: AddressSpace, host: int, buf: int) -> int:
    """fstatfs(2) of the file system holding the host's descriptor ``host``: the host
    kernel's struct statfs (its type, block counts, name length), copied."""
    out = ctypes.create_string_buffer(_STATFS_SIZE)
    if _LIBC.fstatfs(host, out) != 0:
        return -ctypes.get_errno()
    space.write(buf, out.raw)
    return 0


def sysinfo(space: AddressSpace, buf: int) -> int:
    """sysinfo(2): the host's uptime, load, memory and process counts, copied."""
    out = ctypes.create_string_buffer(_SYSINFO_SIZE)
    if _LIBC.sysinfo(out) != 0:
        return -ctypes.get_errno()
    space.write(buf, out.raw)
    return 0


def uname(space: AddressSpace, buf: int) -> int:
    """struct utsname: the host's, with the node name "vmsim"."""
    host = os.uname()
    fields = (host.sysname, "vmsim", host.release, host.version, host.machine, "(none)")
    space.write(buf, b"".join(f.encode()[:64].ljust(65, b"\0") for f in fields))
    return 0


def getrandom(space: AddressSpace, limit: int, buf: int, count: int, _flags: int) -> int:
    """Random bytes from the host (at most ``limit`` a call)."""
    count = min(count, limit)
    space.write(buf, os.urandom(count))
    return count


def clock_nanosleep(space: AddressSpace, stopping: Callable[[], bool], clock: int,
                    flags: int, request: int, remain: int) -> int:
    """clock_nanosleep(2), and nanosleep (CLOCK_MONOTONIC, as Linux): the host sleeps, in
    short naps; when the run must stop (``stopping``: its time limit, Ctrl-C) the sleep ends
    early with EINTR and, for a relative sleep, the time left in ``remain``. EINVAL for a
    bad clock or timespec."""
    host = CLOCKS.get(clock)
    seconds, nanoseconds = struct.unpack("<qq", space.read(request, 16))
    if host is None or seconds < 0 or not 0 <= nanoseconds < 1_000_000_000:
        return -errno.EINVAL
    wanted = seconds * 1_000_000_000 + nanoseconds
    deadline = wanted if flags & _TIMER_ABSTIME else _nanoseconds(host) + wanted
    while (left := deadline - _nanoseconds(host)) > 0:
        if stopping():
            if remain and not flags & _TIMER_ABSTIME:
                space.write(remain, struct.pack("<qq", *divmod(left, 1_000_000_000)))
            return -errno.EINTR
        time.sleep(min(left / 1e9, _NAP))
    return 0
