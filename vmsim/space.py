"""The simulated address space: Linux's mmap/munmap/mprotect/mremap over a software MMU.

Top of ``vmsim``'s core: :class:`AddressSpace` is the simulated ``Mmap`` backend, a façade
over the two layers of the simulated machine, as in the kernel:

* **kernel** (``vmsim.kernel.Kernel``): the VMAs (``vmsim.vma``: sorted, bisect on starts,
  with a free-gap index) carry mmap semantics: argument checks in Linux's order
  (``vmsim.syscall_args``), top-down placement (``vmsim.placement``), MAP_FIXED replacement,
  splitting and merging with the hidden state that decides it, vm.max_map_count; the files
  and descriptors mappings hold (``vmsim.files``); the page-fault handler.
* **MMU** (``vmsim.mmu.Mmu``): PTE words in numpy tables and the frames
  (``vmsim.pagetable``), filled on demand. Every access is translated through them
  (``Mmu.translate``); a page whose PTE does not allow it is a page fault, handled by the
  kernel layer: map the zero page, allocate a frame, share the file's page-cache page until
  the first write (copy-on-write), or raise :class:`~vmsim.fault.Fault`.

The façade casts the arguments as the C calls receive them, checks a read whole before it
does any work, and gives a debugger's view (peek, poke, pte, stats).

File pages are read from the caller's file with ``os.pread`` when used: the page cache here
cannot see writes made to the file by others, so a page-cache frame is refreshed from the file
on every access that goes through it (a private page stops doing so once copied).

Known differences from Linux (each a choice, not an accident):

* a file size change made outside the simulator is noticed at the next access to the file; a
  shrink and a regrow between two accesses keep private copies the kernel would have dropped
  (``AddressSpace.ftruncate`` applies a shrink at once, as the kernel does);
* only regular files and ``/dev/zero`` can be mapped (another device gives ENODEV);
* MAP_HUGETLB gives ENOMEM for anonymous memory (no huge pages reserved; Linux maps it with
  MAP_NORESERVE), EINVAL for files and for huge page sizes this machine lacks;
  MAP_LOCKED is not limited by RLIMIT_MEMLOCK; RLIMIT_AS is not checked; overcommit is the
  heuristic mode's single-request limit (MemTotal + SwapTotal);
* MAP_GROWSDOWN mappings never grow and get no stack guard gap in placement;
* a Fault's address is the first faulting byte in address order (a CPU's copy loop may touch
  another page first); overlapping words in one ``write_words`` land in unspecified order;
* page-table pages are not freed by munmap (they are reused while the space lives);
* a mapped file is read through a descriptor of the simulator's own: one dup per open file
  description while another descriptor of the process shares it (to tell a dup'd fd from a
  second open), else one per file; when the host has none left, mmap fails with EMFILE;
* a read is checked whole before it touches a page: one that faults changes nothing (a CPU
  would have faulted in the pages before the bad byte); reads longer than
  ``loader.mmap.MAX_READ`` (4 GiB) are refused with ENOMEM (after that check: a bad byte
  still faults first).
"""

from __future__ import annotations

import errno
import operator
import weakref
from typing import Any

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
from vmsim.fault import Access, Fault, Stats, raise_found
from vmsim.files import close_all
from vmsim.invariants import check_invariants
from vmsim.kernel import Kernel
from vmsim.mmu import Mmu
from vmsim.syscall_args import (
    M64,
    MAP_ANON,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    as_int_arg,
    as_size,
    check_knobs,
)

__all__ = ["AddressSpace"]

_USER_ACCESSES = {"r": Access.READ, "w": Access.WRITE, "x": Access.EXECUTE}


class AddressSpace(MmapDefaults):
    """A simulated process address space: the ``Mmap`` protocol with Linux's semantics.

    ``exec_only``: PROT_EXEC-only memory is unreadable (CPUs with protection keys); pass
    ``loader.libc.host_has_pkeys()`` to compare with this machine's kernel.
    ``max_map_count``, ``mmap_base`` (top-down placement starts below it), ``mmap_min_addr``
    (hints below it are raised to it) and ``privileged`` (may MAP_FIXED below it) are the
    kernel's knobs; the user space ends at ``2**47 - page_size``. ``read_implies_exec`` is the
    personality flag, settable at any time. ``page_size`` is a power of two from 4 KiB to
    64 KiB (the page sizes Linux runs with: x86's 4 KiB, arm64's 16 KiB and 64 KiB); a bad knob
    raises ValueError naming it, before anything is allocated.

    ``kernel`` and ``mmu`` are the two layers (see the module's docstring).
    """

    runs_code = False  # a simulation: nothing it maps can run in this process (loader.Mmap)

    def __init__(self, *, page_size: int = HOST_PAGE_SIZE, exec_only: bool = True,
                 max_map_count: int = 65530, mmap_base: int = 0x7F00_0000_0000,
                 mmap_min_addr: int = 0x10000, privileged: bool = False) -> None:
        check_knobs(page_size, max_map_count, mmap_base, mmap_min_addr)
        self.page_size = page_size
        self.mmu = Mmu(page_size)
        self.kernel = Kernel(self.mmu, exec_only=exec_only, max_map_count=max_map_count,
                             mmap_base=mmap_base, mmap_min_addr=mmap_min_addr,
                             privileged=privileged)
        weakref.finalize(self, close_all, self.kernel.files.owned_fds)

    # ---- the kernel's knobs

    @property
    def read_implies_exec(self) -> bool:
        """The READ_IMPLIES_EXEC personality flag: PROT_READ mappings made executable."""
        return self.kernel.read_implies_exec

    @read_implies_exec.setter
    def read_implies_exec(self, value: bool) -> None:
        self.kernel.read_implies_exec = value

    @property
    def exec_only(self) -> bool:
        """PROT_EXEC-only memory is unreadable (protection keys)."""
        return self.kernel.exec_only

    @property
    def max_map_count(self) -> int:
        """vm.max_map_count: the most VMAs the space may hold."""
        return self.kernel.vmas.max_map_count

    @property
    def task_size(self) -> int:
        """The end of the user address space."""
        return self.kernel.task_size

    @property
    def mmap_base(self) -> int:
        """Where top-down placement starts."""
        return self.kernel.placement.mmap_base

    @property
    def mmap_min_addr(self) -> int:
        """vm.mmap_min_addr: the lowest address a mapping may have (unless privileged)."""
        return self.kernel.mmap_min_addr

    @property
    def privileged(self) -> bool:
        """CAP_SYS_RAWIO: may map below mmap_min_addr."""
        return self.kernel.privileged

    @property
    def commit_limit_pages(self) -> int:
        """The heuristic overcommit limit of one mapping, in pages (RAM + swap)."""
        return self.kernel.commit_limit_pages

    # ---- the Mmap protocol

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """mmap(2), simulated: checks in Linux's order (see shared/linux-mm.md), then maps.

        As loader.libc does, ``fd`` None without MAP_ANONYMOUS maps writable anonymous memory
        and answers ``need_copy=True``. Raises MmapError with Linux's errno.
        """
        # the substitution on ints: making ProtFlags/MapFlags members costs microseconds
        c_flags = as_int_arg(flags)
        need_copy = fd is None and not c_flags & MAP_ANON
        c_fd = -1 if fd is None or not -(1 << 31) <= fd < 1 << 31 else fd
        start = self.kernel.mmap(0 if addr is None else as_size(addr), as_size(length),
                                 PROT_READ | PROT_WRITE if need_copy else as_int_arg(prot),
                                 c_flags | (MAP_ANON if need_copy else 0),
                                 as_size(offset), c_fd)
        return Mapping(start, need_copy)

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """mmap(2) of zero-filled memory: ``flags`` plus MAP_ANONYMOUS, no file."""
        return self.kernel.mmap(as_size(addr), as_size(length), as_int_arg(prot),
                                as_int_arg(flags) | MAP_ANON, 0, -1)

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Reserve as loader.libc does: private anonymous, PROT_NONE when ``use_file``, else
        PROT_WRITE; ``addr`` is a hint."""
        prot = 0 if use_file else 2
        return self.kernel.mmap(0 if addr is None else as_size(addr), as_size(length), prot,
                                MAP_PRIVATE | MAP_ANON, 0, -1)

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2): remove every mapping in the range (holes are fine), splitting at the
        ends. EINVAL for an unaligned, empty, kernel-half or wrapping range; ENOMEM when a
        split in three would pass vm.max_map_count."""
        self.kernel.munmap(as_size(addr), as_size(length))

    def mremap(self, old_addr: int, old_len: int, new_len: int, flags: int = 0,
               new_addr: int = 0) -> int:
        """mremap(2): shrink (the tail unmapped), grow in place when the gap above is free,
        else with MREMAP_MAYMOVE (1) move the pages (their PTEs: data, copy-on-write state
        and file offset go along); MREMAP_FIXED (2) moves to ``new_addr``, unmapping what
        was there; MREMAP_DONTUNMAP (4) leaves the old range mapped and empty. Returns the
        mapping's start. MmapError with Linux 6.18's errno (see ``vmsim.remap``)."""
        return self.kernel.mremap(as_size(old_addr), as_size(old_len), as_size(new_len),
                                  as_size(flags), as_size(new_addr))

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """mprotect(2), not atomic as in Linux: mappings before a hole or a refused one are
        already changed when ENOMEM or EACCES is raised."""
        self.kernel.mprotect(as_size(addr), as_size(length), as_int_arg(prot))

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` as a user-mode load: raises Fault as the kernel would
        signal (SIGSEGV unmapped or not readable, SIGBUS past a file's end) for the first bad
        byte, found before any work is done (nothing proportional to ``n`` is allocated for a
        read that faults). ValueError for a negative ``n``; MmapError(ENOMEM) for a valid
        read longer than :data:`MAX_READ`. Reading untouched anonymous memory allocates no
        frames (the zero page is mapped)."""
        return self._load(addr, n, Access.READ)

    def read_into(self, addr: int, out: Any) -> None:
        """Fill the writable buffer ``out`` (bytearray, numpy array, memoryview) with the bytes
        at ``addr``, checked as :meth:`read`: the bulk path that skips making a bytes object.
        ``out`` is left unchanged when the read faults."""
        dst = np.frombuffer(out, dtype=np.uint8)
        if len(dst):
            addr = int(addr) & M64
            self._precheck(addr, len(dst), Access.READ)
            dst[:] = self.mmu.load(addr, len(dst), Access.READ)

    def fetch(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` as an instruction fetch: needs PROT_EXEC (NX)."""
        return self._load(addr, n, Access.EXECUTE)

    def peek(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr`` as a debugger reads them (ptrace): any protection, PROT_NONE
        included. Still raises Fault for unmapped addresses and file pages past EOF (where
        ptrace fails with EIO), checked before any work, and the limits of :meth:`read`."""
        return self._load(addr, n, Access.PTRACE_READ)

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr`` as user-mode stores: raises Fault like :meth:`read`, after
        storing the bytes before the faulting page (as a copy loop would)."""
        self._store(addr, data, Access.WRITE)

    def poke(self, addr: int, data: bytes) -> None:
        """Store as a debugger does (ptrace POKEDATA, FOLL_FORCE): private mappings are written
        whatever their protection (the page is copied, as a breakpoint is set in read-only
        code); shared mappings only when writable. Raises Fault (SEGV_ACCERR) otherwise, and
        SEGV_MAPERR for unmapped addresses."""
        self._store(addr, data, Access.PTRACE_WRITE)

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Store 64-bit little-endian ``values[i]`` at ``addrs[i]``, with :meth:`write`'s
        checks, as one numpy scatter. On a fault, the words before the first faulting one
        (in array order) are stored, then the Fault is raised. Addresses wrap modulo 2**64
        (a negative one faults in the kernel half). Raises ValueError when the shapes
        differ. Overlapping words: the later one wins."""
        where = as_addresses(addrs)
        words = np.asarray(values, dtype="<u8").ravel()
        if where.shape != words.shape:
            raise ValueError(f"write_words: {where.size} addresses but {words.size} values")
        if where.size and not self.mmu.store_words(where, words):
            super().write_words(where, words)  # shared file pages: the file sees each word

    def maps(self) -> list[Region]:
        """The mappings as ``/proc/self/maps`` shows them (merged lines, file paths with
        `` (deleted)`` once unlinked, shared anonymous memory as ``/dev/zero (deleted)``)."""
        return self.kernel.vmas.regions()

    # ---- a debugger's view

    @property
    def stats(self) -> Stats:
        """The counters (see :class:`~vmsim.fault.Stats`); resident pages are counted now."""
        return Stats(self.kernel.faults, self.kernel.cows, self.mmu.resident_pages(),
                     self.mmu.pool.in_use, self.mmu.pt.count)

    @property
    def map_count(self) -> int:
        """How many VMAs there are (what vm.max_map_count limits)."""
        return len(self.kernel.vmas)

    def check_access(self, addr: int, n: int, access: str | Access) -> Fault | None:
        """The Fault a user-mode access (``"r"``, ``"w"``, ``"x"`` or the same
        :class:`Access`) of ``n`` bytes at ``addr`` would raise, or None; changes nothing
        (only notices file size changes). Costs a walk over the VMAs of the range, whatever
        ``n``. ValueError for another ``access``."""
        mode = _USER_ACCESSES.get(access) if isinstance(access, str) else access
        if mode not in _USER_ACCESSES.values():
            raise ValueError(f"check_access: access={access!r} is not 'r', 'w' or 'x'")
        assert mode is not None
        return self.kernel.first_fault(int(addr) & M64, max(operator.index(n), 1), mode)

    def pte(self, addr: int) -> int:
        """The PTE word for ``addr`` (0 when none), read by a full page-table walk."""
        return self.mmu.pte(addr & M64) if addr & M64 < self.task_size else 0

    def ftruncate(self, fd: int, length: int) -> None:
        """``os.ftruncate(fd, length)``, and what the kernel does at once on a shrink: drop
        the file's pages past the new end from every mapping, private copies included.
        (A size change made elsewhere is noticed at the next access to the file.) The host's
        OSError (bad fd, negative length) is raised as MmapError with its errno."""
        self.kernel.ftruncate(fd, length)

    def check(self) -> None:
        """Assert the simulator's invariants: VMAs sorted, non-overlapping, page-aligned,
        inside the user space, no two neighbours Linux would have merged (once a split has
        failed at max_map_count, Linux can leave such a pair: not checked after that), the
        gap index matching the list, PTEs only inside VMAs and never more permissive than
        their VMA."""
        check_invariants(self.kernel)

    def close(self) -> None:
        """Unmap everything and close the simulator's own dups of mapped files' fds. (An
        AddressSpace dropped without close() closes them when garbage-collected.)"""
        self.munmap(0, self.task_size)
        close_all(self.kernel.files.owned_fds)

    def __enter__(self) -> AddressSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the checked access paths

    def _load(self, addr: int, n: int, access: Access) -> bytes:
        """A checked read (or fetch, or forced read) of ``n`` bytes at ``addr``."""
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"read: n={n} is negative")
        if n == 0:
            return b""
        addr = int(addr) & M64
        self._precheck(addr, n, access)
        return self.mmu.load(addr, n, access).tobytes()

    def _precheck(self, addr: int, n: int, access: Access) -> None:
        """Before a read does any work: the Fault for its first bad byte (a walk over the
        VMAs only), then MmapError(ENOMEM) when it is longer than MAX_READ. A read within
        one page needs neither: its one translation faults before it changes anything."""
        if page_offset(addr, self.page_size) + n <= self.page_size:
            return
        raise_found(lambda: self.kernel.first_fault(addr, n, access))
        if n > MAX_READ:
            raise MmapError(errno.ENOMEM, f"read: n={n:#x} bytes is more than MAX_READ="
                            f"{MAX_READ:#x} (the simulator's largest read)")

    def _store(self, addr: int, data: Any, access: Access) -> None:
        """A checked write (or forced write) of ``data`` at ``addr``; bytes before the
        faulting page are stored when it faults."""
        src = np.frombuffer(bytes(data), dtype=np.uint8)
        if len(src):
            self.mmu.store(int(addr) & M64, src, access)
