"""The memory interface the loader is written against.

This is the bottom layer of the project: the loader (``loader``) knows memory only
through the :class:`Mmap` protocol defined here, and two backends provide it:
``loader.libc.LibcMmap`` (the real kernel, through ctypes) and ``vmsim.AddressSpace``
(the simulator). Nothing here imports from either of them.

The protocol is a Python rendering of the Rust ``elf_loader`` 0.14 ``Mmap`` trait: backends are
objects (the simulator is stateful), the ``need_copy`` out-parameter becomes part of the
returned :class:`Mapping`, ``len`` becomes ``length``. Memory access, which a Rust loader does
through raw pointers, is spelled ``read``/``write``.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errno_codes
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from loader.elfdefs import MASK64

__all__ = [
    "MAX_READ",
    "MapFlags",
    "Mapping",
    "Mmap",
    "MmapDefaults",
    "MmapError",
    "ProtFlags",
    "Region",
    "as_addresses",
]

MAX_READ = 1 << 32
"""The largest ``read`` a backend performs (4 GiB): a readable range longer than this raises
MmapError(ENOMEM) instead of allocating its bytes (an unreadable one still faults first)."""



def as_addresses(addrs: object) -> npt.NDArray[np.uint64]:
    """``addrs`` (any array-like of integers) as a flat uint64 array, each wrapped modulo
    2**64 as C's cast to a pointer does: a negative address lands in the kernel half, where
    an access faults, instead of raising OverflowError."""
    try:
        return np.asarray(addrs, dtype=np.uint64).ravel()
    except (OverflowError, TypeError, ValueError):
        items = np.asarray(addrs, dtype=object).ravel().tolist()
        return np.array([int(a) & MASK64 for a in items], dtype=np.uint64)


class ProtFlags(enum.IntFlag):
    """Page protection, as ``mmap(2)``'s ``prot``. ``str()`` gives ``"r-x"``."""

    PROT_NONE = 0
    PROT_READ = 1
    PROT_WRITE = 2
    PROT_EXEC = 4

    @property
    def rwx(self) -> str:
        """The three ``/proc/self/maps`` permission letters, e.g. ``"r-x"``."""
        return "".join(
            letter if self & bit else "-"
            for letter, bit in (("r", ProtFlags.PROT_READ), ("w", ProtFlags.PROT_WRITE),
                                ("x", ProtFlags.PROT_EXEC))
        )

    @classmethod
    def from_rwx(cls, text: str) -> ProtFlags:
        """Parse ``"r-x"`` (or the first three letters of ``"r-xp"``) back into flags.

        Raises ValueError naming the text when it is not of that form.
        """
        if not re.fullmatch(r"[r-][w-][x-][ps]?", text):
            raise ValueError(f"permissions {text!r} are not of the form 'rwx' or 'rwxp'")
        prot = cls.PROT_NONE
        for letter, bit in (("r", cls.PROT_READ), ("w", cls.PROT_WRITE), ("x", cls.PROT_EXEC)):
            if letter in text[:3]:
                prot |= bit
        return prot

    def __str__(self) -> str:
        return self.rwx


class MapFlags(enum.IntFlag):
    """``mmap(2)`` flags with their Linux x86-64 values."""

    MAP_SHARED = 0x1
    MAP_PRIVATE = 0x2
    MAP_SHARED_VALIDATE = 0x3
    MAP_TYPE = 0xF
    MAP_FIXED = 0x10
    MAP_ANONYMOUS = 0x20
    MAP_32BIT = 0x40
    MAP_GROWSDOWN = 0x100
    MAP_DENYWRITE = 0x800
    MAP_EXECUTABLE = 0x1000
    MAP_LOCKED = 0x2000
    MAP_NORESERVE = 0x4000
    MAP_POPULATE = 0x8000
    MAP_NONBLOCK = 0x10000
    MAP_STACK = 0x20000
    MAP_HUGETLB = 0x40000
    MAP_SYNC = 0x80000
    MAP_FIXED_NOREPLACE = 0x100000


class Mapping(NamedTuple):
    """What :meth:`Mmap.mmap` returns.

    ``addr`` is where the mapping starts. ``need_copy`` is the Rust trait's out-parameter:
    True when the backend could not map the file itself (it mapped writable anonymous memory
    instead), so the loader must copy the segment's bytes in and mprotect it afterwards.
    """

    addr: int
    need_copy: bool


class MmapError(OSError):
    """A failed memory call. ``errno`` is exactly the Linux errno the kernel gives.

    >>> MmapError(errno.EINVAL, "mmap: length 0").errno == errno.EINVAL
    True
    """

    def __init__(self, code: int, detail: str = "") -> None:
        name = errno_codes.errorcode.get(code, str(code))
        message = f"{name}: {detail}" if detail else f"{name}: {os.strerror(code)}"
        super().__init__(code, message)
        self.code = code
        self.detail = detail

    def __reduce__(self) -> tuple[type[MmapError], tuple[int, str]]:
        """Pickle as the constructor's own arguments (for errors crossing a fork)."""
        return (type(self), (self.code, self.detail))


_MAPS_LINE = re.compile(
    r"(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>[r-][w-][x-][ps]) "
    r"(?P<offset>[0-9a-f]+) (?P<dev>[0-9a-f]+:[0-9a-f]+) (?P<inode>\d+) ?\s*(?P<path>.*)"
)

# /proc/<pid>/maps pads the fixed part of a line to this width, then one space, then the path
# (fs/proc/task_mmu.c: seq_setwidth(m, 25 + sizeof(void *) * 6 - 1)).
_MAPS_PATH_COLUMN = 25 + 8 * 6 - 1


@dataclass(frozen=True, slots=True)
class Region:
    """One mapping as ``/proc/self/maps`` shows it: ``[start, end)`` with its attributes.

    ``str(region)`` is exactly the kernel's line; :meth:`parse` reads one back.
    """

    start: int
    end: int
    prot: ProtFlags
    shared: bool = False
    offset: int = 0
    dev: str = "00:00"
    inode: int = 0
    path: str = ""

    @property
    def perms(self) -> str:
        """``"r-xp"``: the protection letters plus ``p`` (private) or ``s`` (shared)."""
        return self.prot.rwx + ("s" if self.shared else "p")

    @property
    def length(self) -> int:
        """``end - start`` in bytes."""
        return self.end - self.start

    def __str__(self) -> str:
        head = (f"{self.start:08x}-{self.end:08x} {self.perms} {self.offset:08x} "
                f"{self.dev} {self.inode} ")
        if not self.path:
            return head
        return head.ljust(_MAPS_PATH_COLUMN) + " " + self.path

    @classmethod
    def parse(cls, line: str) -> Region:
        """Read a ``/proc/<pid>/maps`` line back into a Region.

        Raises ValueError quoting the line when it is not of that form.
        """
        m = _MAPS_LINE.fullmatch(line.rstrip("\n"))
        if m is None:
            raise ValueError(f"not a /proc/<pid>/maps line: {line!r}")
        return cls(
            start=int(m["start"], 16),
            end=int(m["end"], 16),
            prot=ProtFlags.from_rwx(m["perms"]),
            shared=m["perms"][3] == "s",
            offset=int(m["offset"], 16),
            dev=m["dev"],
            inode=int(m["inode"]),
            path=m["path"],
        )


@runtime_checkable
class Mmap(Protocol):
    """What a loader needs from memory: the ``elf_loader`` 0.14 ``Mmap`` trait, in Python.

    Every call raises :class:`MmapError` carrying the errno Linux would give, and changes
    nothing when it fails (except ``mprotect``, which, like the kernel, is not atomic).
    Lengths that are not page multiples are rounded up to whole pages.

    Two attributes describe the backend: ``page_size``, the size of its pages (a power of
    two), and ``runs_code``, its declared capability to run what it maps: True only for a
    backend that maps into this very process (the host), so the loader may call IFUNC
    resolvers, init and fini functions; False for a simulator. Wrappers forward both.
    """

    @property
    def page_size(self) -> int:
        """The size of the backend's pages in bytes (a power of two)."""
        ...

    @property
    def runs_code(self) -> bool:
        """True when what the backend maps lives in this process and may be called."""
        ...

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """Map ``length`` bytes of file ``fd`` from ``offset`` (or anonymous memory when ``fd``
        is None and ``flags`` has MAP_ANONYMOUS) and return where.

        A loader calls it once per PT_LOAD segment with MAP_PRIVATE|MAP_FIXED inside its
        reservation. ``addr`` is a hint unless MAP_FIXED (replace what is there) or
        MAP_FIXED_NOREPLACE (fail with EEXIST if anything is there) is given. When the backend
        cannot map files (``fd`` None without MAP_ANONYMOUS), it maps writable anonymous memory
        and answers ``need_copy=True``: the loader then writes the bytes itself.

        errno: EINVAL (length 0, unaligned offset or fixed address, bad map type), EBADF (bad
        fd), EACCES (fd not open for what prot/flags ask), ENODEV (not a mappable file),
        ENOMEM (no room, overflowing length, too many mappings), EEXIST
        (MAP_FIXED_NOREPLACE over a mapping), EOPNOTSUPP (MAP_SHARED_VALIDATE with an
        unknown flag), EOVERFLOW (file offset overflow), EPERM (PROT_EXEC on noexec mount).
        """
        ...

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """Map zero-filled anonymous memory at ``addr`` (with the given flags, which the
        backend completes with MAP_ANONYMOUS) and return where. The loader uses it for the
        part of .bss past the last file page. errno as :meth:`mmap`.
        """
        ...

    def munmap(self, addr: int, length: int) -> None:
        """Remove every mapping in ``[addr, addr+length)``; unmapped parts are no error.

        Splits mappings that straddle the ends. errno: EINVAL (length 0, unaligned addr,
        range in the kernel half or wrapping), ENOMEM (a split would pass vm.max_map_count).
        """
        ...

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """Change the protection of ``[addr, addr+length)``. Loaders use it for RELRO and to
        seal copied segments. Length 0 succeeds and does nothing.

        Not atomic, as in Linux: over a hole after a mapped prefix, the prefix changes and then
        ENOMEM is raised. errno: EINVAL (unaligned addr, unknown prot bit), ENOMEM (a hole,
        kernel-half or wrapping range, map count), EACCES (write to a read-only shared file).
        """
        ...

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Reserve address space for a whole object and return its start.

        The loader then maps each segment over it with MAP_FIXED, so the segments keep their
        relative distances. ``use_file`` says the loader has a file descriptor and will map
        segments from it; without one (``use_file`` False) a backend may reserve writable
        memory so that copied segments can be written in place. Default: an anonymous
        PROT_NONE private mapping (see :class:`MmapDefaults`).
        """
        ...

    def read(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes at ``addr`` as a user-mode load would. A bad address never takes
        the process down: the simulator raises ``vmsim.Fault`` (the signal the kernel would
        send), the host backend MmapError(EFAULT); both before allocating anything for a
        range that is not readable. ValueError for a negative ``n``; MmapError(ENOMEM) for a
        readable range longer than :data:`MAX_READ`."""
        ...

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` as a user-mode store would: the bytes before the first
        bad page are stored, then the error is raised as for :meth:`read`."""
        ...

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Store 64-bit little-endian ``values[i]`` at ``addrs[i]`` for every i, with the same
        checks as :meth:`write`. This is the bulk path for RELATIVE and RELR relocations.
        """
        ...

    def maps(self) -> list[Region]:
        """The backend's mappings in ``/proc/self/maps`` form, sorted by address."""
        ...


class MmapDefaults:
    """Default method bodies a backend may inherit, as the Rust trait has default methods.

    Subclasses provide ``mmap`` and ``write`` and declare ``page_size`` and ``runs_code``;
    this supplies ``mmap_reserve`` (the trait's default: an anonymous PROT_NONE private
    mapping) and a per-word ``write_words``.
    """

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        raise NotImplementedError

    def write(self, addr: int, data: bytes) -> None:
        raise NotImplementedError

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Reserve with an anonymous PROT_NONE private mapping at hint ``addr``."""
        flags = MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS
        return self.mmap(addr, length, ProtFlags.PROT_NONE, flags, 0, None).addr

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Store each 64-bit word with :meth:`write`; backends override it with a bulk path."""
        words = np.asarray(values, dtype="<u8").ravel()
        for addr, word in zip(as_addresses(addrs).tolist(), words, strict=True):
            self.write(int(addr), word.tobytes())


Runner = Callable[..., int]
"""``call(addr, *int_args) -> rax``: a System V call into code a backend runs itself."""


def code_runner(mm: Mmap) -> Runner | None:
    """The backend's own ``call`` when it runs code somewhere else than this process (a
    ``vmsim.Process``: an emulated CPU over a simulated space), found through wrappers'
    ``inner``; None for the host (code runs here, through ctypes) and for a plain simulator."""
    at: object = mm
    while at is not None:
        call = getattr(at, "call", None)
        if callable(call):
            return call  # type: ignore[no-any-return]
        at = getattr(at, "inner", None)
    return None


def call_function(runner: Runner | None, addr: int, *args: int) -> int:
    """Call ``addr`` with integer ``args``: on the backend's CPU (``runner``), or in this
    process through ctypes; rax."""
    if runner is not None:
        return runner(addr, *args)
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, *([ctypes.c_uint64] * len(args)))(addr)
    return int(fn(*args))
