"""The host backend: the real kernel's mmap, munmap and mprotect through ctypes on libc.

Sits beside ``vmsim`` just above ``loader.mmap``: it implements the :class:`~loader.mmap.Mmap`
protocol on this very process's address space, so a loaded object's code can be called. It
imports only ``loader.mmap`` and ``loader.pages``. Mistakes here are real: a read of an
unmapped address kills the process (tests that may fault use ``loader.isolate``).

Arguments reach the kernel unchanged, so every errno is the kernel's own. A Python integer
that no C argument can hold is first converted the way C would convert it (a negative length
becomes ``length % 2**64``, as a cast to ``size_t`` does) or, when even that is impossible,
replaced by the nearest value the kernel treats the same way (see :func:`_as_size`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from loader.mmap import MapFlags, Mapping, MmapDefaults, MmapError, ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE, page_offset

__all__ = ["LibcMmap", "host_has_pkeys", "read_maps"]

_WORD = 1 << 64
_MAP_FAILED = _WORD - 1


def _load_libc() -> ctypes.CDLL:
    """Open the C library with errno capture and declare the three memory calls."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.restype = ctypes.c_int
    return libc


_LIBC = _load_libc()


def _as_size(value: int) -> int:
    """``value`` as the kernel's unsigned long sees it.

    Integers in [-2**63, 2**64) wrap modulo 2**64 as a C cast does. Anything beyond cannot be
    passed at all; it becomes the highest page of the address space plus ``value``'s page
    offset: still overflowing, still (un)aligned as given, so the kernel's check of alignment
    and then of range gives the errno the caller would get for "too large".
    """
    if -(1 << 63) <= value < _WORD:
        return value % _WORD
    return (_WORD - HOST_PAGE_SIZE) | page_offset(value)


def _as_cint(value: int) -> int:
    """``value`` cast to a C ``int`` (two's complement wrap to 32 bits), as C would."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _as_off(value: int) -> int:
    """A file offset as the 64-bit signed ``off_t`` argument carries it (wrap, see _as_size)."""
    word = _as_size(value)
    return word - _WORD if word >= 1 << 63 else word


def _fail(call: str, **args: int | None) -> MmapError:
    """The MmapError for a failed libc call: the errno it set, the call and its arguments."""
    code = ctypes.get_errno()
    shown = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and k != "fd" else f"{k}={v}"
                      for k, v in args.items())
    return MmapError(code, f"{call}({shown}): {os.strerror(code)}")


def read_maps(path: str | Path = "/proc/self/maps") -> list[Region]:
    """Parse a ``/proc/<pid>/maps`` file into Regions, in the file's (address) order. Paths
    are decoded with surrogateescape: any file name round-trips through os.fsencode."""
    text = Path(path).read_text(errors="surrogateescape")
    return [Region.parse(line) for line in text.splitlines() if line]


def host_has_pkeys() -> bool:
    """True when this CPU has protection keys (``pku`` in /proc/cpuinfo flags).

    Only then does the kernel make PROT_EXEC-only memory unreadable (execute-only memory via
    a protection key); without them ``--x`` pages can be read.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return "pku" in line.split(":", 1)[1].split()
    return False


class LibcMmap(MmapDefaults):
    """The :class:`~loader.mmap.Mmap` protocol on the real kernel, through libc.

    Each call is one libc call; a failure (MAP_FAILED or -1) raises MmapError with the errno
    libc set. ``read``/``write`` touch real memory and are unchecked: a bad address kills the
    process with SIGSEGV or SIGBUS, as a raw pointer would.
    """

    page_size: int = HOST_PAGE_SIZE

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """mmap(2). With ``fd`` None and no MAP_ANONYMOUS, does what elf_loader's unix backend
        does for a loader without a file: maps writable anonymous memory (PROT_READ|PROT_WRITE,
        MAP_ANONYMOUS added, the other flags kept) and answers ``need_copy=True``, so the
        loader copies the segment's bytes in and mprotects it to ``prot`` afterwards.
        Otherwise the arguments go to the kernel as given; ``need_copy`` is False.
        """
        need_copy = fd is None and not flags & MapFlags.MAP_ANONYMOUS
        if need_copy:
            prot = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
            flags |= MapFlags.MAP_ANONYMOUS
        c_fd = -1 if fd is None else (fd if -(1 << 31) <= fd < 1 << 31 else -1)
        hint = None if addr is None else _as_size(addr)
        got = _LIBC.mmap(hint, _as_size(length), _as_cint(prot), _as_cint(flags), c_fd,
                         _as_off(offset))
        if got is None:
            # the kernel may place a mapping at 0 only with MAP_FIXED(_NOREPLACE) and root
            got = 0
        if got == _MAP_FAILED:
            raise _fail("mmap", addr=addr, length=length, prot=int(prot), flags=int(flags),
                        offset=offset, fd=fd)
        return Mapping(got, need_copy)

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """mmap(2) of zero-filled memory: ``flags`` plus MAP_ANONYMOUS, fd -1, offset 0."""
        return self.mmap(addr, length, prot, flags | MapFlags.MAP_ANONYMOUS, 0, None).addr

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2): raises MmapError with the kernel's errno when it returns -1."""
        if _LIBC.munmap(_as_size(addr), _as_size(length)) != 0:
            raise _fail("munmap", addr=addr, length=length)

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """mprotect(2): raises MmapError with the kernel's errno when it returns -1.
        Not atomic: on failure part of the range may already have changed (as the kernel).
        """
        if _LIBC.mprotect(_as_size(addr), _as_size(length), _as_cint(prot)) != 0:
            raise _fail("mprotect", addr=addr, length=length, prot=int(prot))

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Reserve ``length`` bytes as elf_loader's unix backend does: a private anonymous
        mapping, PROT_NONE when ``use_file`` (segments will be mapped from the file over it)
        and PROT_WRITE otherwise (copied segments are written in place). ``addr`` is only a
        hint (no MAP_FIXED): the kernel uses it when that range is free, else places the
        reservation elsewhere; callers must use the returned address.
        """
        prot = ProtFlags.PROT_NONE if use_file else ProtFlags.PROT_WRITE
        return self.mmap_anonymous(0 if addr is None else addr, length, prot,
                                   MapFlags.MAP_PRIVATE)

    def read(self, addr: int, n: int) -> bytes:
        """Copy ``n`` bytes out of real memory at ``addr`` (unchecked: may kill the process)."""
        if n < 0:
            raise ValueError(f"read: n={n} is negative")
        return ctypes.string_at(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        """Copy ``data`` into real memory at ``addr`` (unchecked: may kill the process)."""
        ctypes.memmove(addr, bytes(data), len(data))

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Store 64-bit little-endian ``values[i]`` at ``addrs[i]``: one numpy scatter through a
        byte view of ``[min(addrs), max(addrs) + 8)``; only the addressed bytes are touched.
        Unchecked like :meth:`write`. Raises ValueError when the arrays' shapes differ.
        """
        where = np.asarray(addrs, dtype=np.uint64).ravel()
        words = np.asarray(values, dtype="<u8").ravel()
        if where.shape != words.shape:
            raise ValueError(f"write_words: {where.size} addresses but {words.size} values")
        if where.size == 0:
            return
        lo = int(where.min())
        span = int(where.max()) - lo + 8
        view = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(lo))
        rel = (where - np.uint64(lo)).astype(np.intp)
        if not (rel & 7).any():
            view[: span - span % 8].view("<u8")[rel >> 3] = words
        else:
            view[rel[:, None] + np.arange(8)] = words.view(np.uint8).reshape(-1, 8)

    def maps(self) -> list[Region]:
        """This process's mappings, read from /proc/self/maps."""
        return read_maps()
