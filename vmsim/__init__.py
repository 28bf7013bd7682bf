"""vmsim: a simulated virtual-memory testbed for ELF loading.

``AddressSpace`` is the simulated ``Mmap`` backend (a Linux-like kernel memory manager,
``vmsim.kernel``, over a software MMU, ``vmsim.mmu``); ``Fault`` is what a bad access raises;
``Access`` names the kinds of access; ``Stats`` holds the counters.
"""

from vmsim.fault import Access, Fault, Stats
from vmsim.space import AddressSpace

__all__ = ["Access", "AddressSpace", "Fault", "Stats"]
