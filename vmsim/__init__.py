"""vmsim: a simulated virtual-memory testbed for ELF loading.

``AddressSpace`` is the simulated ``Mmap`` backend (a Linux-like kernel memory manager,
``vmsim.kernel``, over a software MMU, ``vmsim.mmu``); ``Fault`` is what a bad access raises;
``Access`` names the kinds of access; ``Stats`` holds the counters; ``Process`` runs x86-64
code on a CPU whose MMU is the simulator (``vmsim.process``), ``Killed`` is how a program that
sends itself a deadly signal (``abort``) ends.
"""

from vmsim.fault import Access, Fault, Stats
from vmsim.process import Process
from vmsim.signals import Killed
from vmsim.space import AddressSpace

__all__ = ["Access", "AddressSpace", "Fault", "Killed", "Process", "Stats"]
