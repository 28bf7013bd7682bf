"""vmsim: a simulated virtual-memory testbed for ELF loading.

``AddressSpace`` is the simulated ``Mmap`` backend (a Linux-like kernel memory manager over a
software MMU); ``Fault`` is what a bad access raises; ``Stats`` its counters.
"""

from vmsim.fault import Fault, Stats
from vmsim.space import AddressSpace

__all__ = ["AddressSpace", "Fault", "Stats"]
