"""loader: an ELF loader written against the small ``Mmap`` interface (``loader.mmap``).

It runs on any backend: the simulator (``vmsim.AddressSpace``) or the real kernel
(``loader.libc.LibcMmap``).
"""

from loader.mmap import MapFlags, Mapping, Mmap, MmapDefaults, MmapError, ProtFlags, Region

__all__ = ["MapFlags", "Mapping", "Mmap", "MmapDefaults", "MmapError", "ProtFlags", "Region"]
