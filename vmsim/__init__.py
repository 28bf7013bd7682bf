"""vmsim: a simulated virtual-memory testbed for ELF loading.

``AddressSpace`` is the simulated ``Mmap`` backend (a Linux-like kernel memory manager,
``vmsim.kernel``, over a software MMU, ``vmsim.mmu``); ``Fault`` is what a bad access raises;
``Access`` names the kinds of access; ``Stats`` holds the counters; ``Process`` runs x86-64
code on a CPU whose MMU is the simulator (``vmsim.process``).
"""

from vmsim.fault import Access, Fault, Stats
from vmsim.process import Process
from vmsim.space import AddressSpace

__all__ = ["Access", "AddressSpace", "Fault", "Process", "Stats"]
