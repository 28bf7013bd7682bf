"""The loader's errors: ``ElfError`` (a ValueError) and its kinds, one per pipeline stage.

Part of the ``loader`` layer; imports nothing from the project. Every message names the
field, the value found and the limit it broke, so a fuzzer's shrunk example explains itself.
"""

from __future__ import annotations

__all__ = [
    "ElfError",
    "ElfHeaderError",
    "ElfSegmentError",
    "ElfDynamicError",
    "ElfRelocationError",
    "ElfSymbolError",
    "ElfUnsupportedError",
]


def _show(value: object) -> str:
    """Integers in hex (addresses and sizes read better so), everything else as repr."""
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    return repr(value)


class ElfError(ValueError):
    """Bad or unsupported ELF input. ``field``, ``value`` and ``limit`` say what and why.

    >>> str(ElfError("e_phnum", 70000, "at most 65535"))
    'e_phnum = 0x11170: at most 65535'
    """

    def __init__(self, field: str, value: object, limit: str) -> None:
        self.field = field
        self.value = value
        self.limit = limit
        super().__init__(f"{field} = {_show(value)}: {limit}")

    def __reduce__(self) -> tuple[type[ElfError], tuple[str, object, str]]:
        """Pickle by the three parts (so the error crosses from a forked child intact)."""
        return (type(self), (self.field, self.value, self.limit))


class ElfHeaderError(ElfError):
    """The ELF header or the file as a whole: magic, class, machine, truncation."""


class ElfSegmentError(ElfError):
    """Program headers: PT_LOAD order, overlap, sizes, offsets, alignment, RELRO."""


class ElfDynamicError(ElfError):
    """The dynamic section and the tables its tags point at (bounds, entry sizes)."""


class ElfRelocationError(ElfError):
    """A relocation: unknown type, target outside every writable segment."""


class ElfSymbolError(ElfError):
    """Symbols: index past the table, name past the string table, bad version index."""


class ElfUnsupportedError(ElfError):
    """Valid ELF this loader or this backend does not handle (e.g. PT_TLS on the host)."""


class ElfFileError(ElfError):
    """The file as a whole, before or around parsing: not a regular file (a FIFO, a
    directory, a device), or changed (truncated, rewritten) while it was being loaded."""


__all__.append("ElfFileError")


class ElfCacheError(ElfError):
    """/etc/ld.so.cache (or a file given as one) that breaks the glibc-ld.so.cache1.1
    layout: bad magic, counts or string offsets past the file."""


class ElfDependencyError(ElfError):
    """A dependency that cannot be found (no directory of the search holds an x86-64 ELF64
    file of that name), or found but refused; the message names the chain that needed it."""


__all__ += ["ElfCacheError", "ElfDependencyError"]
