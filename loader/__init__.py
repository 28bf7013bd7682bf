"""loader: an ELF loader written against the small ``Mmap`` interface (``loader.mmap``).

It runs on any backend: the simulator (``vmsim.AddressSpace``) or the real kernel
(``loader.libc.LibcMmap``). ``loader.elfdefs`` names every ELF constant, record layout and
bit-field helper. The pipeline: ``loader.elf`` and ``loader.tables`` parse and
validate, ``loader.plan`` plans, ``loader.mapper`` maps, ``loader.reloc`` and
``loader.symbols`` relocate, ``loader.pipeline`` protects, runs init and ties it together;
``loader.outcome`` makes loads comparable and ``loader.trace`` records the calls.
``loader.LinkMap`` is a whole process image: ``loader.search`` finds the closure,
``loader.scope`` and ``loader.binding`` bind it as ld.so does, ``loader.tls`` lays out its
TLS; on the host ``loader.resident``, ``loader.lazy``, ``loader.hosttls`` and
``loader.ehframe`` do what glibc would do for the objects it does not know.
"""

from loader.errors import (
    ElfCacheError,
    ElfDependencyError,
    ElfDynamicError,
    ElfError,
    ElfFileError,
    ElfHeaderError,
    ElfRelocationError,
    ElfSegmentError,
    ElfSymbolError,
    ElfUnsupportedError,
)
from loader.linkmap import Binding, LinkMap, Why
from loader.mmap import MapFlags, Mapping, Mmap, MmapDefaults, MmapError, ProtFlags, Region
from loader.outcome import Outcome
from loader.pipeline import LoadedObject, load, runs_code
from loader.plan import LoadPlan
from loader.symbols import HostResolver, Resolver, StubResolver
from loader.trace import CopyingMmap, TracingMmap

__all__ = [
    "Binding",
    "CopyingMmap",
    "ElfCacheError",
    "ElfDependencyError",
    "ElfDynamicError",
    "ElfError",
    "ElfFileError",
    "ElfHeaderError",
    "ElfRelocationError",
    "ElfSegmentError",
    "ElfSymbolError",
    "ElfUnsupportedError",
    "HostResolver",
    "LinkMap",
    "LoadPlan",
    "LoadedObject",
    "MapFlags",
    "Mapping",
    "Mmap",
    "MmapDefaults",
    "MmapError",
    "Outcome",
    "ProtFlags",
    "Region",
    "Resolver",
    "StubResolver",
    "TracingMmap",
    "Why",
    "load",
    "runs_code",
]
