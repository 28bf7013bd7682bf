"""The kernel layer: Linux's mmap, munmap and mprotect over the VMAs (mremap in
``vmsim.remap``), and the page-fault handler the MMU calls.

Part of ``vmsim``: above ``vmsim.mmu`` (it fills PTEs through the page table the MMU walks)
and below ``vmsim.space``, whose :class:`~vmsim.space.AddressSpace` is the façade users see.
Its parts: ``vmsim.vma`` (the sorted VMAs, splitting and merging), ``vmsim.placement``
(where a new mapping goes), ``vmsim.files`` (open files, descriptors, the page cache),
``vmsim.syscall_args`` (argument casts and do_mmap's flag checks).

The syscalls check their arguments in Linux's order and raise MmapError with Linux's errno;
the page-fault handler decides, for each page the MMU could not translate, what the kernel
would: map the zero page, allocate a frame, share the file's page-cache page until the first
write (copy-on-write), or deliver the signal (:class:`~vmsim.fault.Fault`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from loader.mmap import MmapError
from loader.pages import page_offset, page_round_down, page_round_up, pages_in
from vmsim import remap
from vmsim.fault import Access, Fault
from vmsim.files import FileTable, Inode, OpenFile, Shmem, host_call, is_paged, is_sized
from vmsim.mmu import VA_TOP, Mmu, beyond_user_space
from vmsim.pagetable import (
    PTE_COW,
    PTE_FILE,
    PTE_FRAME,
    PTE_NX,
    PTE_P,
    PTE_PKEY_SHIFT,
    PTE_PROTNONE,
    PTE_SIZED,
    PTE_U,
    PTE_W,
    any_set,
    set_indices,
)
from vmsim.placement import Placement
from vmsim.syscall_args import (
    M64,
    MAP_ANON,
    MAP_FIXED,
    MAP_HUGETLB,
    MAP_NONBLOCK,
    MAP_NOREPLACE,
    MAP_POPULATE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_READ,
    PROT_SEM,
    meminfo_pages,
    new_vma_flags,
    refuse_hugetlb_anon,
)
from vmsim.vma import (
    VM_ACCESS,
    VM_ACCOUNT,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NORESERVE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
    VmaMap,
)

__all__ = ["Kernel"]

_EXEC_ONLY_PKEY = 1
_U64 = np.uint64
_N_P, _N_PW = _U64(PTE_P), _U64(PTE_P | PTE_W)
_N_HAS = _U64(PTE_P | PTE_PROTNONE)
_N_COW, _N_FILE = _U64(PTE_COW), _U64(PTE_FILE)
_N_FRAME = _U64(PTE_FRAME)
_N_12 = _U64(12)
_N_ZERO = _U64(0)


class Kernel:
    """One process's memory manager: the VMAs, the files they map, the syscalls that change
    them and the page-fault handler of ``mmu``. The knobs are the constructor's of
    :class:`~vmsim.space.AddressSpace`; ``task_size`` is the end of the user space."""

    def __init__(self, mmu: Mmu, *, exec_only: bool, max_map_count: int, mmap_base: int,
                 mmap_min_addr: int, privileged: bool) -> None:
        self.mmu = mmu
        mmu.kernel = self
        self.page_size = mmu.page_size
        self.shift = mmu.shift
        self.exec_only = exec_only
        self.read_implies_exec = False
        self.mmap_min_addr = mmap_min_addr
        self.privileged = privileged
        self.task_size = VA_TOP - self.page_size
        self.commit_limit_pages = meminfo_pages(self.page_size)
        self.files = FileTable(mmu.pool)
        self.vmas = VmaMap(self.shift, self.task_size, self.files, max_map_count)
        self.placement = Placement(self.vmas, mmap_base, self.page_size)
        self.anon_seq = 0
        self.shmem_seq = 0
        self.faults = 0
        self.cows = 0

    # ---- mmap

    def mmap(self, addr: int, length: int, prot: int, flags: int, off: int, fd: int) -> int:
        """do_mmap, arguments already cast to the kernel's types: Linux's checks in order,
        placement, then the new VMA. Returns its start."""
        page = self.page_size
        if page_offset(off, page):
            raise MmapError(errno.EINVAL, f"mmap: offset={off:#x} is not page-aligned")
        file: OpenFile | None = None
        if not flags & MAP_ANON:
            file = self.files.open_file(fd)
            if flags & MAP_HUGETLB:
                raise MmapError(errno.EINVAL, "mmap: MAP_HUGETLB on a file not on hugetlbfs")
        elif flags & MAP_HUGETLB:
            refuse_hugetlb_anon(addr, length, flags)
        if not length:
            raise MmapError(errno.EINVAL, "mmap: length=0")
        if prot & PROT_READ and self.read_implies_exec and not (file and file.noexec):
            prot |= PROT_EXEC
        if flags & MAP_NOREPLACE:
            flags |= MAP_FIXED
        if not flags & MAP_FIXED:
            addr = page_round_down(addr, page)
            if addr and addr < self.mmap_min_addr:
                addr = page_round_up(self.mmap_min_addr, page)
        length = page_round_up(length, page) & M64
        if not length:
            raise MmapError(errno.ENOMEM, "mmap: length rounds past the end of the address space")
        addr = self.mmap_address(addr, length, flags, file, off >> self.shift)
        vm_flags, pgoff = new_vma_flags(prot, flags, file, off >> self.shift, length, addr,
                                        self.shift)
        return self._map_region(addr, length, vm_flags, file, pgoff, flags)

    def mmap_address(self, addr: int, length: int, flags: int, file: OpenFile | None,
                      pgoff: int) -> int:
        """do_mmap's limits and placement (get_unmapped_area; mremap's moves too): ENOMEM
        past max_map_count or the user space, EINVAL for an unaligned MAP_FIXED, EPERM below
        mmap_min_addr, EEXIST for MAP_FIXED_NOREPLACE over a mapping. Returns the address."""
        vmas, task = self.vmas, self.task_size
        if len(vmas) > vmas.max_map_count:
            raise MmapError(errno.ENOMEM, f"mmap: {len(vmas)} mappings exceed "
                            f"max_map_count={vmas.max_map_count}")
        if length > task:
            raise MmapError(errno.ENOMEM, f"mmap: length={length:#x} exceeds the user space")
        if not flags & MAP_FIXED:
            addr = self.placement.get_area(addr, length, flags, file, pgoff)
        if addr > task - length:
            raise MmapError(errno.ENOMEM, f"mmap: {addr:#x}+{length:#x} passes the user "
                            "space end")
        if page_offset(addr, self.page_size):
            raise MmapError(errno.EINVAL, f"mmap: MAP_FIXED addr={addr:#x} is not page-aligned")
        if addr < self.mmap_min_addr and not self.privileged:
            raise MmapError(errno.EPERM, f"mmap: addr={addr:#x} below mmap_min_addr")
        if flags & MAP_NOREPLACE and vmas.overlaps(addr, addr + length):
            raise MmapError(errno.EEXIST, f"mmap: MAP_FIXED_NOREPLACE over a mapping at "
                            f"{addr:#x}")
        return addr

    def _map_region(self, addr: int, length: int, vm_flags: int, file: OpenFile | None,
                    pgoff: int, flags: int) -> int:
        """mmap_region: replace what lies in the range, account, insert (merging)."""
        end = addr + length
        vmas = self.vmas
        i, vma = vmas.find(addr)
        covered = vma is not None and vma.start < end
        if vma is not None and covered and vma.start < addr and vma.end > end:
            self._check_three_way_split(vma, "mmap: MAP_FIXED")
        if vm_flags & (VM_NORESERVE | VM_SHARED | VM_WRITE) == VM_WRITE:
            self.charge(length)
            vm_flags |= VM_ACCOUNT
        vfile: OpenFile | Shmem | None = file
        if vm_flags & VM_SHARED and (file is None or file.zero):
            self.shmem_seq += 1  # shmem_zero_setup: /dev/zero's shared mappings are shmem
            vfile = Shmem(self.shmem_seq, length >> self.shift)
        if vfile is not None:
            self.files.use(vfile)  # the call's own reference: replacing the file's other
        try:                       # mappings must not close it
            if covered:
                self.mmu.unmap(addr, end)
                i = vmas.cut(addr, end, i)
            vmas.insert(i, Vma(addr, end, vm_flags, pgoff, vfile, 0))
        finally:
            if vfile is not None:
                self.files.unuse(vfile)
        populate = (vm_flags & VM_LOCKED
                    or flags & (MAP_POPULATE | MAP_NONBLOCK) == MAP_POPULATE)
        if populate and vm_flags & VM_ACCESS:
            with_write = vm_flags & (VM_WRITE | VM_SHARED) == VM_WRITE
            # MAP_POPULATE faults the pages in (as writes for private writable memory,
            # so copies are made and an anon_vma too); it stops quietly at a file's end
            self.mmu.translate_range(addr, end, Access.PTRACE_WRITE if with_write
                                     else Access.PTRACE_READ)
        return addr

    def _check_three_way_split(self, vma: Vma, call: str) -> None:
        """ENOMEM when cutting a hole in ``vma`` would pass vm.max_map_count."""
        if len(self.vmas) >= self.vmas.max_map_count:
            raise MmapError(errno.ENOMEM, f"{call}: splitting {vma.start:#x}-{vma.end:#x} in "
                            f"three would pass max_map_count={self.vmas.max_map_count}")

    def charge(self, length: int) -> None:
        """Heuristic overcommit: one request larger than RAM plus swap is refused."""
        if length >> self.shift > self.commit_limit_pages:
            raise MmapError(errno.ENOMEM, f"length={length:#x} exceeds RAM+swap "
                            f"({self.commit_limit_pages} pages)")

    # ---- munmap, mprotect

    def munmap(self, start: int, length: int) -> None:
        """munmap(2), arguments cast: remove every mapping in the range (holes are fine),
        splitting at the ends. EINVAL for an unaligned, empty, kernel-half or wrapping range;
        ENOMEM when a split in three would pass vm.max_map_count."""
        task = self.task_size
        if page_offset(start, self.page_size) or start > task or length > task - start:
            raise MmapError(errno.EINVAL, f"munmap: addr={start:#x} length={length:#x} is "
                            f"unaligned or not below the user space end {task:#x}")
        end = start + page_round_up(length, self.page_size)
        if end == start:
            raise MmapError(errno.EINVAL, "munmap: length=0")
        i, vma = self.vmas.find(start)
        if vma is None or vma.start >= end:
            return
        if vma.start < start and vma.end > end:
            self._check_three_way_split(vma, "munmap")
        self.mmu.unmap(start, end)
        self.vmas.cut(start, end, i)

    def mremap(self, addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> int:
        """mremap(2), arguments cast: :func:`vmsim.remap.mremap`. Returns the new start."""
        return remap.mremap(self, addr, old_len, new_len, flags, new_addr)

    def mprotect(self, start: int, length: int, prot: int) -> None:
        """mprotect(2), arguments cast; not atomic as in Linux: mappings before a hole or a
        refused one are already changed when ENOMEM or EACCES is raised."""
        grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
        prot &= ~grows
        if grows == PROT_GROWSDOWN | PROT_GROWSUP:
            raise MmapError(errno.EINVAL, f"mprotect: prot={prot | grows:#x} has both GROWS "
                            "bits")
        if page_offset(start, self.page_size):
            raise MmapError(errno.EINVAL, f"mprotect: addr={start:#x} is not page-aligned")
        if not length:
            return
        end = (start + page_round_up(length, self.page_size)) & M64
        if end <= start:
            raise MmapError(errno.ENOMEM, f"mprotect: addr={start:#x} length={length:#x} wraps")
        if prot & ~(VM_ACCESS | PROT_SEM):
            raise MmapError(errno.EINVAL, f"mprotect: prot={prot:#x} has unknown bits")
        self._mprotect(start, end, prot, grows)

    def _mprotect(self, start: int, end: int, prot: int, grows: int) -> None:
        """The per-VMA loop of do_mprotect_pkey (checks already done)."""
        vmas = self.vmas
        i = vmas.first_ending_after(start)
        if i == len(vmas) or vmas[i].start >= end:
            raise MmapError(errno.ENOMEM, f"mprotect: nothing mapped at {start:#x}")
        vma = vmas[i]
        if grows & PROT_GROWSDOWN:
            start = vma.start
            if not vma.flags & VM_GROWSDOWN:
                raise MmapError(errno.EINVAL, "mprotect: PROT_GROWSDOWN on a mapping without it")
        elif vma.start > start:
            raise MmapError(errno.ENOMEM, f"mprotect: nothing mapped at {start:#x}")
        elif grows & PROT_GROWSUP:
            raise MmapError(errno.EINVAL, "mprotect: PROT_GROWSUP (no VM_GROWSUP on x86)")
        rier = self.read_implies_exec and prot & PROT_READ
        tmp, nstart = vma.start, start
        while i < len(vmas) and vmas[i].start < end:
            vma = vmas[i]
            want = prot | PROT_EXEC if rier and vma.flags & VM_MAYEXEC else prot
            if vma.start != tmp:
                break
            newflags = (want & VM_ACCESS) | (vma.flags & ~VM_ACCESS)
            if (newflags & ~(newflags >> 4)) & VM_ACCESS:
                raise MmapError(errno.EACCES, f"mprotect: prot={want:#x} not allowed on "
                                f"{vma.start:#x}-{vma.end:#x} (file's open mode or mount)")
            tmp = min(vma.end, end)
            i = self._fixup(i, nstart, tmp, newflags)
            tmp = nstart = vmas[i].end
            i += 1
        if tmp < end:
            raise MmapError(errno.ENOMEM, f"mprotect: hole at {tmp:#x} in the range")

    def _fixup(self, i: int, start: int, end: int, newflags: int) -> int:
        """mprotect_fixup on ``vmas[i]`` for ``[start, end)``: VM_ACCOUNT bookkeeping, then
        merge or split, then the PTEs. Returns the index of the VMA now covering the range."""
        vma = self.vmas[i]
        old = vma.flags
        if newflags == old:
            return i
        if newflags & VM_WRITE:
            if not old & (VM_ACCOUNT | VM_WRITE | VM_SHARED | VM_NORESERVE):
                self.charge(end - start)
                newflags |= VM_ACCOUNT
        elif old & VM_ACCOUNT and vma.file is None and not vma.anon:
            newflags &= ~VM_ACCOUNT
        i = self.vmas.modify(i, start, end, newflags)
        self.mmu.protect(start, end, self.pte_bits(self.vmas[i].flags))
        return i

    def pte_bits(self, flags: int) -> int:
        """vm_get_page_prot: the PTE permission bits for a VMA's flags: P|U, W, NX, the
        execute-only pkey; or Linux's PROTNONE marker for PROT_NONE."""
        prot = flags & VM_ACCESS
        if not prot:
            return PTE_PROTNONE
        bits = PTE_P | PTE_U
        if prot & VM_WRITE:
            bits |= PTE_W
        if not prot & VM_EXEC:
            bits |= PTE_NX
        elif prot == VM_EXEC and self.exec_only:
            bits |= _EXEC_ONLY_PKEY << PTE_PKEY_SHIFT
        return bits

    # ---- access checks: what the page-fault handler would decide, from the VMAs alone

    def allowed(self, flags: int, access: Access) -> bool:
        """Whether a VMA with ``flags`` permits the access: x86 rules (write implies read,
        execute-only readable unless ``exec_only``), ptrace's for forced accesses."""
        if access is Access.READ:
            return bool(flags & (VM_READ | VM_WRITE)
                        or (flags & VM_EXEC and not self.exec_only))
        if access is Access.WRITE:
            return bool(flags & VM_WRITE)
        if access is Access.EXECUTE:
            return bool(flags & VM_EXEC)
        if access is Access.PTRACE_WRITE:
            return bool(flags & VM_WRITE or flags & (VM_SHARED | VM_MAYWRITE) == VM_MAYWRITE)
        return True

    def segments(self, addr: int, n: int, access: Access) -> Iterator[tuple[int, int, int]]:
        """Walk ``[addr, addr+n)`` through the VMAs in address order: yield ``(index, a, b)``
        per VMA piece, raising the Fault for the first unmapped or forbidden byte when the
        walk reaches it (so a caller's work on earlier pieces is already done)."""
        end = addr + n
        vmas = self.vmas
        i = vmas.first_ending_after(addr)
        pos = addr
        while pos < end:
            if pos >= self.task_size:
                raise beyond_user_space(pos, access) if pos >= VA_TOP else \
                    Fault(pos, access, "SIGSEGV", "SEGV_MAPERR")
            if i >= len(vmas) or vmas[i].start > pos:
                raise Fault(pos, access, "SIGSEGV", "SEGV_MAPERR")
            vma = vmas[i]
            if not self.allowed(vma.flags, access):
                raise Fault(pos, access, "SIGSEGV", "SEGV_ACCERR")
            b = min(end, vma.end)
            yield i, pos, b
            pos = b
            i += 1

    def file_end(self, vma: Vma) -> int:
        """The first address of a sized ``vma`` wholly past its file's end (noticing a size
        change made outside the simulator); may lie outside the VMA."""
        if isinstance(vma.file, Shmem):
            return vma.start + ((vma.file.pages - vma.pgoff) << self.shift)
        assert isinstance(vma.file, OpenFile)
        inode = vma.file.inode
        size: int = host_call(os.fstat, vma.file.io()).st_size
        if size != inode.size:
            self._resize(inode, size)
        return vma.start + ((pages_in(size, self.page_size) - vma.pgoff) << self.shift)

    def _eof_stop(self, i: int, a: int, b: int, access: Access) -> int:
        """For a piece ``[a, b)`` of ``vmas[i]``, where an access must stop: the first byte
        of the first page wholly past its file's end (b when none). Raises the SIGBUS Fault
        when ``a`` is already past."""
        vma = self.vmas[i]
        if not is_sized(vma.file):
            return b
        limit = self.file_end(vma)
        if a >= limit:
            raise Fault(a, access, "SIGBUS", "BUS_ADRERR")
        return min(b, limit)

    def first_fault(self, addr: int, n: int, access: Access) -> Fault | None:
        """The Fault of the first byte of ``[addr, addr+n)`` that ``access`` cannot touch, or
        None; changes nothing (only notices file size changes)."""
        try:
            for i, a, b in self.segments(addr, n, access):
                stop = self._eof_stop(i, a, b, access)
                if stop < b:
                    return Fault(stop, access, "SIGBUS", "BUS_ADRERR")
        except Fault as fault:
            return fault.with_traceback(None)  # a traceback's frames would hold the fault
        return None

    def refused_writes(self, pages: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_] | None:
        """Which of the sorted, distinct page numbers ``pages`` a user-mode write would fault
        on (None when none would). One step per VMA the pages reach, its pages found by
        bisection (a scatter's hundreds of pages lie in one or two VMAs)."""
        refused = np.zeros(len(pages), dtype=np.bool_)
        vmas, shift = self.vmas, self.shift

        def index(va: int) -> int:  # of the first page at or above va
            return int(pages.searchsorted(_U64(max(va, 0) >> shift)))

        k = 0
        while k < len(pages):
            va = int(pages[k]) << shift
            i = vmas.first_ending_after(va)
            if va >= self.task_size or i == len(vmas):
                refused[k:] = True
                break
            vma = vmas[i]
            k0, k1, k = k, max(k, index(vma.start)), index(vma.end)
            refused[k0:k1] = True  # a hole below the VMA
            if not vma.flags & VM_WRITE:
                refused[k1:k] = True
            elif is_sized(vma.file):  # pages wholly past the file's end: SIGBUS
                refused[max(k1, index(self.file_end(vma))):k] = True
        return refused if any_set(refused) else None

    # ---- the page-fault handler

    def page_fault(self, va: int, ptes: npt.NDArray[np.uint64], need: npt.NDArray[np.bool_],
                   access: Access) -> None:
        """The MMU's page fault for the pages ``need`` of ``ptes`` (consecutive pages from
        ``va``): check the VMAs and the files' ends, then fill the PTEs (or refresh the
        page-cache frames a read goes through); raises the Fault of the first page refused,
        the pages before it handled."""
        first, last = 0, len(need) - 1
        if last:
            idx = set_indices(need)
            first, last = int(idx[0]), int(idx[-1])
        lo, hi = va + (first << self.shift), va + ((last + 1) << self.shift)
        for i, a, b in self.segments(lo, hi - lo, access):
            stop = self._eof_stop(i, a, b, access)
            j0, j1 = (a - va) >> self.shift, (stop - va) >> self.shift
            self._fill(i, a, ptes[j0:j1], access)
            if stop < b:
                raise Fault(stop, access, "SIGBUS", "BUS_ADRERR")

    def first_write(self, va: int) -> int:
        """The MMU's fast path for a user-mode write to the never-touched page at ``va``
        (see ``Mmu.fresh_frame``): in private anonymous memory that allows writes, the
        page gets a new zeroed frame, exactly as :meth:`_fault` gives it (one fault, the
        VMA's anon_vma prepared), and its PTE word is returned; 0 for any other VMA, or
        none, left to :meth:`page_fault`."""
        i, vma = self.vmas.find(va)
        if vma is None or vma.start > va or vma.file is not None or not vma.flags & VM_WRITE:
            return 0
        self._anon_prepare(i)
        self.faults += 1
        return (int(self.mmu.pool.alloc(1)[0]) << 12) | self.pte_bits(vma.flags)

    def _fill(self, i: int, va: int, ptes: npt.NDArray[np.uint64], access: Access) -> None:
        """The pages of ``vmas[i]`` from ``va``: fault in those whose PTE does not allow the
        access, then refresh the page-cache frames a read goes through. (A page the MMU let
        through needs neither: its PTE allows the access and holds no page-cache frame.)"""
        if access is Access.WRITE:
            need = (ptes & _N_PW) != _N_PW
        elif access is Access.PTRACE_WRITE:
            need = ((ptes & _N_HAS) == _N_ZERO) | ((ptes & _N_COW) != _N_ZERO)
        elif access is Access.PTRACE_READ:
            need = (ptes & _N_HAS) == _N_ZERO
        else:
            need = (ptes & _N_P) == _N_ZERO
        if any_set(need):
            self._fault(i, va, ptes, need, access.writes)
        file = self.vmas[i].file
        if is_paged(file) and not access.writes:
            assert isinstance(file, OpenFile)
            cached = (ptes & _N_FILE) != _N_ZERO
            if any_set(cached):
                vma = self.vmas[i]
                pages = vma.pgoff + ((va - vma.start) >> self.shift) + set_indices(cached)
                frames = ((ptes[cached] & _N_FRAME) >> _N_12).astype(np.int64)
                self.files.pread_into(file, pages, frames)

    def _fault(self, i: int, va: int, ptes: npt.NDArray[np.uint64],
               need: npt.NDArray[np.bool_], write: bool) -> None:
        """Fill the PTEs ``need`` of ``vmas[i]`` from ``va`` in place: the zero page, a new
        frame, the file's (or shmem's) page-cache page, or a copy-on-write copy."""
        vma = self.vmas[i]
        idx = set_indices(need)
        n = len(idx)
        self.faults += n
        if write and self.mmu.tlb_flushes and np.count_nonzero(ptes[idx] & _N_HAS):
            self.mmu.flush_tlb()  # a shared frame is about to be replaced by a copy
        bits = self.pte_bits(vma.flags)
        file = vma.file
        pool = self.mmu.pool
        if file is None or (isinstance(file, OpenFile) and file.zero):
            if write:
                self._anon_prepare(i)
                self.cows += int(np.count_nonzero(ptes[idx] & _N_COW))
                frames = pool.alloc(n)
                ptes[idx] = (frames.astype(np.uint64) << _N_12) | _U64(bits)
            else:
                ptes[idx] = _U64(PTE_COW | (bits & ~PTE_W))  # the zero page, frame 0
            return
        pages = vma.pgoff + ((va - vma.start) >> self.shift) + idx.astype(np.int64)
        cache = self.files.cache_frames(file if isinstance(file, Shmem) else file.inode, pages)
        if vma.flags & VM_MAYSHARE or isinstance(file, Shmem):  # shmem: always shared
            ptes[idx] = (cache.astype(np.uint64) << _N_12) | _U64(PTE_FILE | bits)
        elif not write:
            ptes[idx] = (cache.astype(np.uint64) << _N_12) | _U64(PTE_FILE | PTE_COW
                                                                  | (bits & ~PTE_W))
        else:
            self._anon_prepare(i)
            self.files.pread_into(file, pages, cache)
            frames = pool.alloc(n)
            pool.copy(frames, cache)
            self.cows += n
            ptes[idx] = (frames.astype(np.uint64) << _N_12) | _U64(PTE_SIZED | bits)

    def _anon_prepare(self, i: int) -> None:
        """anon_vma_prepare for ``vmas[i]``: reuse a compatible neighbour's anon_vma (next
        first, then prev: adjacent, same file and non-access flags, consecutive offsets),
        else a new one."""
        vmas, shift = self.vmas, self.shift
        vma = vmas[i]
        if vma.anon:
            return
        for a, b, old in ((vma, vmas[i + 1] if i + 1 < len(vmas) else None, 1),
                          (vmas[i - 1] if i else None, vma, 0)):
            other = b if old else a
            if (a is not None and b is not None and other is not None and other.anon
                    and a.end == b.start and a.file is b.file
                    and not (a.flags ^ b.flags) & ~VM_ACCESS
                    and b.pgoff == a.pgoff + ((a.end - a.start) >> shift)):
                vma.anon = other.anon
                return
        self.anon_seq += 1
        vma.anon = self.anon_seq

    def write_through(self, addr: int, data: npt.NDArray[np.uint8]) -> None:
        """After a store of ``data`` at ``addr``: send the bytes stored in shared file
        mappings to the file (the part before EOF; bytes past it stay in the page cache
        only, as in Linux)."""
        for i, a, b in self.segments(addr, len(data), Access.PTRACE_READ):
            vma = self.vmas[i]
            file = vma.file
            if not isinstance(file, OpenFile) or file.zero or not vma.flags & VM_MAYSHARE:
                continue
            start_off = (vma.pgoff << self.shift) + (a - vma.start)
            room = min(b - a, file.inode.size - start_off)
            if room > 0:
                host_call(os.pwrite, file.io(), data[a - addr: a - addr + room].tobytes(),
                          start_off)

    # ---- files

    def ftruncate(self, fd: int, length: int) -> None:
        """``os.ftruncate(fd, length)``, and what the kernel does at once on a shrink."""
        host_call(os.ftruncate, fd, length)
        st = host_call(os.fstat, fd)
        inode = self.files.inodes.get((st.st_dev, st.st_ino))
        if inode is not None:
            self._resize(inode, st.st_size)

    def _resize(self, inode: Inode, size: int) -> None:
        """The file changed size. On a shrink, do what truncation does: unmap its pages past
        the new end from every mapping (private copies too), drop them from the page cache,
        and zero the cached last page past the end."""
        if size < inode.size:
            keep = pages_in(size, self.page_size)
            for vma in self.vmas:
                f = vma.file
                if isinstance(f, OpenFile) and f.inode is inode:
                    low = vma.start + ((keep - vma.pgoff) << self.shift)
                    if low < vma.end:
                        self.mmu.unmap(max(low, vma.start), vma.end)
            dropped = [p for p in inode.cache if p >= keep]
            pool = self.mmu.pool
            pool.free(np.array([inode.cache.pop(p) for p in dropped], dtype=np.int64))
            last = inode.cache.get(size >> self.shift)
            tail = page_offset(size, self.page_size)
            if last is not None and tail:
                pool.data[last, tail:] = 0
        inode.size = size
