"""The simulator's invariants, asserted by tests after every step
(:meth:`vmsim.AddressSpace.check`): the VMAs sorted, non-overlapping, page-aligned, inside
the user space, never two neighbours Linux would have merged, the gap index in step, and PTEs
only inside VMAs, never more permissive than their VMA.

Part of ``vmsim``; reads both layers, changes nothing.
"""

from __future__ import annotations

from loader.pages import page_offset
from vmsim.kernel import Kernel
from vmsim.pagetable import PTE_NX, PTE_P, PTE_PROTNONE, PTE_W
from vmsim.vma import VM_ACCESS, VM_EXEC, VM_WRITE, mergeable

__all__ = ["check_invariants"]


def check_invariants(kernel: Kernel) -> None:
    """Assert the simulator's invariants (see AddressSpace.check)."""
    vmas, page_size, task_size = kernel.vmas, kernel.page_size, kernel.task_size
    assert vmas.starts_consistent(), "bisect keys out of step"
    edge = 0
    gaps = []
    for k, v in enumerate(vmas):
        assert not page_offset(v.start | v.end, page_size), f"unaligned {v!r}"
        assert edge <= v.start < v.end <= task_size, f"overlap or range: {v!r}"
        if v.start > edge:
            gaps.append((edge, v.start))
        edge = v.end
        if k and not vmas.unmerged_possible:
            p = vmas[k - 1]
            assert not mergeable(p, v, kernel.shift), \
                f"mergeable neighbours left apart: {p!r} {v!r}"
    if edge < task_size:
        gaps.append((edge, task_size))
    indexed = sorted((s, e) for e, s in vmas.gaps.start_of.items())
    assert indexed == gaps, "gap index out of step"
    for va, pte in kernel.mmu.present_ptes():
        i = vmas.first_ending_after(va)
        assert i < len(vmas) and vmas[i].start <= va, f"PTE outside VMAs at {va:#x}"
        flags = vmas[i].flags
        assert not (pte & PTE_W and not flags & VM_WRITE), f"W PTE at {va:#x}"
        assert bool(pte & PTE_NX) == bool(pte & PTE_P and not flags & VM_EXEC), \
            f"NX bit wrong at {va:#x}"
        assert bool(pte & PTE_PROTNONE) == (not flags & VM_ACCESS), \
            f"PROTNONE bit wrong at {va:#x}"
