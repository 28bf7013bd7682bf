"""The hypothesis strategies for ELF images, under their public name (users' tests and the
hypothesis entry point import it). They live in the fuzz kit: :mod:`vmsim.fuzz.images` (valid
images) and :mod:`vmsim.fuzz.malformed` (corrupted ones); see :mod:`vmsim.fuzz` for the map."""

from vmsim.fuzz.elfwriter import ElfImage, ElfSpec, Reloc, Segment, Symbol
from vmsim.fuzz.images import RELOCATION_TYPES, elf_images, elf_specs
from vmsim.fuzz.malformed import MUTATION_KINDS, MalformedImage, malformed_elf

__all__ = [
    "MUTATION_KINDS",
    "RELOCATION_TYPES",
    "ElfImage",
    "ElfSpec",
    "MalformedImage",
    "Reloc",
    "Segment",
    "Symbol",
    "elf_images",
    "elf_specs",
    "malformed_elf",
]
