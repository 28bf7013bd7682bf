"""The host backend: the real kernel's mmap, munmap and mprotect through ctypes on libc.

Sits beside ``vmsim`` just above ``loader.mmap``: it implements the :class:`~loader.mmap.Mmap`
protocol on this very process's address space, so a loaded object's code can be called. It
imports only ``loader.mmap`` and ``loader.pages``. Memory accesses (``read``, ``write``,
``write_words``) go through ``process_vm_readv``/``process_vm_writev`` on this very process, so
a bad address (unmapped, not readable or writable, a file page past EOF) raises
MmapError(EFAULT) instead of killing the process: the host backend is used by fuzzing.

Arguments reach the kernel unchanged, so every errno is the kernel's own. A Python integer
that no C argument can hold is first converted the way C would convert it (a negative length
becomes ``length % 2**64``, as a cast to ``size_t`` does) or, when even that is impossible,
replaced by the nearest value the kernel treats the same way (see :func:`_as_size`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import operator
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from loader.mmap import (
    MAX_READ,
    MapFlags,
    Mapping,
    MmapDefaults,
    MmapError,
    ProtFlags,
    Region,
    as_addresses,
)
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
    for call in (libc.process_vm_readv, libc.process_vm_writev):
        call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                         ctypes.c_ulong, ctypes.c_ulong]
        call.restype = ctypes.c_ssize_t
    return libc


_LIBC = _load_libc()
_IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])
"""struct iovec as a numpy record: one row per piece of a vectored transfer."""
_IOV_MAX = 1024
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_new_bytes.restype = ctypes.py_object
_bytes_data = ctypes.pythonapi.PyBytes_AsString
_bytes_data.argtypes = [ctypes.py_object]
_bytes_data.restype = ctypes.c_void_p


def _transfer(write: bool, local: npt.NDArray[np.void], remote: npt.NDArray[np.void]) -> int:
    """Copy between this process's own buffers (``local``) and the addresses ``remote``
    (iovec arrays, the same total length) with process_vm_readv/writev: the kernel checks
    each page as a user access would and stops at the first bad one instead of signalling.
    Returns the bytes moved (fewer than asked when it stopped; -errno when nothing moved)."""
    call = _LIBC.process_vm_writev if write else _LIBC.process_vm_readv
    pid = os.getpid()
    done = 0
    li = ri = 0
    while ri < len(remote):
        # split both lists at the same byte: the remote pieces decide, the local one is a run
        n_r = min(_IOV_MAX, len(remote) - ri)
        want = int(remote["len"][ri: ri + n_r].sum())
        got: int = call(pid, local[li:].ctypes.data, min(_IOV_MAX, len(local) - li),
                        remote[ri:].ctypes.data, n_r, 0)
        if got < 0:
            return done if done else -ctypes.get_errno()
        done += got
        if got < want:
            return done
        ri += n_r
        li = _advance(local, li, got)
    return done


def _advance(local: npt.NDArray[np.void], li: int, moved: int) -> int:
    """Consume ``moved`` bytes from the iovecs ``local[li:]`` (splitting one when needed);
    returns the index of the first iovec with bytes left."""
    lens = local["len"]
    while moved:
        step = min(moved, int(lens[li]))
        local["base"][li] += step
        lens[li] -= step
        moved -= step
        if not lens[li]:
            li += 1
    return li


def _iov(base: int, length: int) -> npt.NDArray[np.void]:
    """A one-piece iovec array."""
    vec = np.empty(1, dtype=_IOVEC)
    vec["base"], vec["len"] = base, length
    return vec


_SCATTER_MIN = 64
"""From this many words on, write_words probes each page once (``_probe_pages``) and
scatters with numpy instead of moving each word (or run of words) through
process_vm_writev. Counted in words, not runs: finding the runs is itself a pass over
every address, wasted when the scatter follows."""


def _region_of(addr: int) -> tuple[int, bytes] | None:
    """The end and permission letters of the mapping holding ``addr``, or None."""
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            span, perms = line.split(b" ", 2)[:2]
            lo, hi = span.split(b"-")
            if int(lo, 16) <= addr < int(hi, 16):
                return int(hi, 16), perms
    return None


def _cpu_reads(perms: bytes) -> bool:
    """Whether the CPU can load from a mapping with these permission letters: x86 reads
    write-only memory, and execute-only memory unless protection keys guard it (where
    process_vm_readv refuses both: it wants VM_READ)."""
    return perms[:2] != b"--" or (perms[2:3] == b"x" and not host_has_pkeys())


def _read_rest(start: int, out: bytes, got: int) -> int:
    """Finish a read that process_vm_readv stopped at ``start + got``: pages the CPU can
    load although they lack PROT_READ are read through /proc/self/mem (which also answers
    for the rest). Returns the bytes read in all (fewer than asked: a real fault there)."""
    n = len(out)
    mem = -1
    try:
        while got < n:
            region = _region_of(start + got)
            if region is None or not _cpu_reads(region[1]):
                break
            if mem < 0:
                mem = os.open("/proc/self/mem", os.O_RDONLY)
            want = min(n, region[0] - start) - got
            try:
                chunk = os.pread(mem, want, start + got)
            except OSError:
                break
            ctypes.memmove(_bytes_data(out) + got, chunk, len(chunk))
            got += len(chunk)
            if len(chunk) < want:
                break
    finally:
        if mem >= 0:
            os.close(mem)
    return got


def _page_probes(where: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp] | None:
    """The indices, in order, of the words that are the first to touch a page (an 8-byte word
    may touch two), for addresses in ascending order (relocations' always are; None
    otherwise). No address may be above 2**64 - 8."""
    if not bool((where[1:] >= where[:-1]).all()):
        return None
    mask = np.uint64(~(HOST_PAGE_SIZE - 1) & _MAP_FAILED)
    last_page = (where + np.uint64(7)) & mask
    probes: npt.NDArray[np.intp] = np.flatnonzero(
        np.concatenate([[True], last_page[1:] != last_page[:-1]]))
    return probes


def _probe_pages(where: npt.NDArray[np.uint64], words: npt.NDArray[np.uint64]) -> bool:
    """Store the first word of each page (``_page_probes``) through process_vm_writev,
    which checks each page as a user store would (mapped, writable, not past a file's end)
    and faults it in. True when all were stored: every page the words touch is then known
    good, and the rest may be scattered by plain stores. False for unsorted addresses or
    when a probe stopped: the probes stored are all before the first bad word, so the
    ordered vectored write that follows leaves memory as it alone would.

    Why not read /proc/self/maps: the kernel's answer costs a walk of every mapping per load
    (half a millisecond in a Python process), and a probe store asks the same kernel the
    exact question (can this page take a store?) for the pages concerned only."""
    probes = _page_probes(where)
    if probes is None:
        return False
    remote = np.empty(len(probes), dtype=_IOVEC)
    remote["base"], remote["len"] = where[probes], 8
    firsts = np.ascontiguousarray(words[probes])
    return _transfer(True, _iov(firsts.ctypes.data, 8 * len(probes)), remote) == 8 * len(probes)


def _scatter(where: npt.NDArray[np.uint64], words: npt.NDArray[np.uint64]) -> None:
    """Store the words through a byte view of ``[where[0], where[-1] + 8)``: only the
    addressed bytes are touched. The addresses must be in ascending order and their pages
    checked (``_probe_pages`` made sure of both)."""
    lo = int(where[0])
    span = int(where[-1]) - lo + 8
    view = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(lo))
    rel = (where - np.uint64(lo)).astype(np.intp)
    if not (rel & 7).any():
        view[: span - span % 8].view("<u8")[rel >> 3] = words
    else:
        view[rel[:, None] + np.arange(8)] = words.view(np.uint8).reshape(-1, 8)


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
    value = int(value) & 0xFFFF_FFFF     # int() first: ProtFlags' & is enum arithmetic
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


def _bad_access(call: str, start: int, n: int, moved: int) -> MmapError:
    """The EFAULT for an access of ``n`` bytes at ``start`` that stopped after ``moved``
    bytes (a negative ``moved`` is the -errno of a transfer that moved nothing)."""
    where = start + max(moved, 0)
    return MmapError(errno.EFAULT, f"{call}: addr={start:#x} n={n:#x}: no access at "
                     f"{where & _MAP_FAILED:#x} (unmapped, protected or past a file's end)")


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
    libc set. ``read``/``write``/``write_words`` touch real memory through process_vm_readv
    and process_vm_writev: a bad address raises MmapError(EFAULT) where a raw pointer would
    have killed the process with SIGSEGV or SIGBUS.
    """

    page_size: int = HOST_PAGE_SIZE
    runs_code: bool = True
    """The host backend maps into this very process: what it maps can be called."""

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
        """Copy ``n`` bytes out of real memory at ``addr``, as a user-mode load sees them.
        Raises MmapError(EFAULT) naming the first byte that could not be read (unmapped, not
        readable, a file page past EOF) instead of taking a signal; ValueError for a
        negative ``n``; MmapError(ENOMEM) for a readable range longer than MAX_READ."""
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"read: n={n} is negative")
        if n == 0:
            return b""
        start = int(addr) & _MAP_FAILED
        if n > MAX_READ:
            self._check_readable(start, n)
            raise MmapError(errno.ENOMEM, f"read: n={n:#x} bytes is more than MAX_READ="
                            f"{MAX_READ:#x}")
        try:
            out = _new_bytes(None, n)
        except MemoryError as err:
            raise MmapError(errno.ENOMEM, f"read: no memory for n={n:#x} bytes") from err
        got = _transfer(False, _iov(_bytes_data(out), n), _iov(start, n))
        if got != n:
            got = _read_rest(start, out, max(got, 0))
        if got != n:
            raise _bad_access("read", start, n, got)
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        """Copy ``data`` into real memory at ``addr``, as user-mode stores: the bytes before
        the first bad page are stored, then MmapError(EFAULT) names the first byte not
        written (unmapped, read-only, a file page past EOF)."""
        src = bytes(data)
        if not src:
            return
        start = int(addr) & _MAP_FAILED
        got = _transfer(True, _iov(_bytes_data(src), len(src)), _iov(start, len(src)))
        if got != len(src):
            raise _bad_access("write", start, len(src), got)

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Store 64-bit little-endian ``values[i]`` at ``addrs[i]`` in one vectored
        process_vm_writev (runs of consecutive words become one piece); ``_SCATTER_MIN``
        words or more are one numpy scatter once a probe store to each page they touch
        went through (``_probe_pages``). Checked like :meth:`write`: on a bad address the words
        before it are stored, then MmapError(EFAULT) names it. Addresses wrap modulo 2**64
        as C's would (a negative one is in the kernel half). Raises ValueError when the
        arrays' shapes differ. (A munmap by another thread between the probe and the
        scatter can still fault.)"""
        where = as_addresses(addrs)
        words = np.ascontiguousarray(np.asarray(values, dtype="<u8").ravel())
        if where.shape != words.shape:
            raise ValueError(f"write_words: {where.size} addresses but {words.size} values")
        if where.size == 0:
            return
        if where.size >= _SCATTER_MIN and int(where.max()) <= _MAP_FAILED - 8:
            if _probe_pages(where, words):
                _scatter(where, words)
                return
        firsts = np.concatenate([[0], np.flatnonzero(np.diff(where) != np.uint64(8)) + 1])
        remote = np.empty(len(firsts), dtype=_IOVEC)
        remote["base"] = where[firsts]
        remote["len"] = np.diff(np.append(firsts, where.size)).astype(np.uint64) * np.uint64(8)
        local = _iov(words.ctypes.data, 8 * words.size)
        got = _transfer(True, local, remote)
        if got != 8 * words.size:
            k = max(got, 0) // 8
            raise _bad_access("write_words", int(where[k]), 8, max(got, 0) - 8 * k)

    def _check_readable(self, start: int, n: int) -> None:
        """MmapError(EFAULT) for the first byte of ``[start, start+n)`` that /proc/self/maps
        shows unmapped or unreadable (the check a huge read gets before being refused)."""
        pos = start
        for region in read_maps():
            if region.end <= pos:
                continue
            if region.start > pos or not region.prot & ProtFlags.PROT_READ:
                break
            pos = region.end
            if pos >= start + n:
                return
        raise _bad_access("read", start, n, pos - start)

    def maps(self) -> list[Region]:
        """This process's mappings, read from /proc/self/maps (paths that are not UTF-8 are
        decoded with surrogateescape, so ``os.fsencode(region.path)`` gives the bytes)."""
        return read_maps()
