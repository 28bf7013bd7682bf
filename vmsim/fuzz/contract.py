"""The loader under test: any callable ``f(data: bytes, mm: Mmap) -> int`` that returns its
load bias.

Part of the fuzz kit (``vmsim.fuzz``). The testbed judges a loader only by what it did to the
backend it was given: the map it left, the bytes in it, RELRO, the calls it made (through
:class:`~vmsim.fuzz.checking.CheckingMmap`), and what is left when the space is dropped. It
needs nothing else from the loader: no result object, no symbol lookup, no ``unload``. The
project's own loader stands behind the same contract as :func:`project_loader`.

Refusing an input is part of the contract. The project's loader refuses with ``ElfError``
(or ``MmapError`` when the backend cannot give what a well-formed file asks); a loader under
test may refuse with any ``Exception``, except the ones that are bugs whatever the input:

* a :class:`~vmsim.fuzz.checking.Violation` (it stepped outside what it reserved, or wrote a
  page it had not made writable);
* a :class:`vmsim.Fault` (it touched memory it had not mapped: on the host, a crash);
* ``MemoryError`` and ``RecursionError`` (the input cost far more than its size).

Writing your own loader and testing it::

    def my_loader(data: bytes, mm: Mmap) -> int:
        ...                      # reserve, map, relocate, protect
        return load_bias

    vmsim.fuzz.check_loader(my_loader, relocations=["RELATIVE"])
"""

from __future__ import annotations

import errno
import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import loader
from loader.mmap import Mmap
from vmsim.fault import Fault
from vmsim.fuzz.checking import CheckingMmap, Violation
from vmsim.fuzz.elfwriter import RELOC_TYPES

__all__ = [
    "RELOCATION_NAMES",
    "Attempt",
    "LoaderUnderTest",
    "attempt_load",
    "drop",
    "image_knobs",
    "loader_named",
    "project_loader",
]

LoaderUnderTest = Callable[[bytes, Mmap], int]
"""A loader under test: ``f(data, mm)`` loads the ELF file ``data`` through ``mm`` and returns
its load bias (where the object's vaddr 0 is in memory), or raises to refuse the file."""

NEVER_A_REFUSAL: tuple[type[BaseException], ...] = (Violation, Fault, MemoryError,
                                                    RecursionError)
"""Exceptions that are a loader's bug whatever its input (see the module's docstring)."""

RELOCATION_NAMES: tuple[str, ...] = (*RELOC_TYPES, "RELR", "TEXTREL")
"""What ``--relocations`` / ``relocations=`` may name: the relocation types the synthetic
images carry (psABI names without ``R_X86_64_``), plus ``RELR`` (RELATIVE relocations packed
as DT_RELR) and ``TEXTREL`` (relocations in read-only segments, DT_TEXTREL)."""


def project_loader(data: bytes, mm: Mmap) -> int:
    """The project's loader (``loader.load``) behind the contract: load, return the bias."""
    return loader.load(data, mm).load_bias


def loader_named(spec: str) -> LoaderUnderTest:
    """The callable that ``"MODULE:FUNCTION"`` names (``--loader``), imported now.

    ValueError in one line when the text has no colon, the module does not import, or the
    name is missing or not callable."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"loader {spec!r}: expected MODULE:FUNCTION, e.g. mymod:load")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error at import
        raise ValueError(f"loader {spec!r}: cannot import {module_name}: "
                         f"{type(exc).__name__}: {exc}") from None
    found = getattr(module, name, None)
    if not callable(found):
        raise ValueError(f"loader {spec!r}: {module_name} has no callable {name!r}")
    return found  # type: ignore[no-any-return]


@dataclass
class Attempt:
    """One load through the contract: ``bias`` when it loaded, else ``refusal`` (the
    exception's class name, e.g. ``"ElfRelocationError"`` or ``"MmapError(ENOMEM)"``, and
    ``reason``, its message). ``obj`` is the project's loader's result (None for a loader
    under test)."""

    bias: int | None
    refusal: str | None
    obj: loader.LoadedObject | None = None
    reason: str = ""

    @property
    def outcome(self) -> str:
        """``"loaded"`` or the refusal, as campaigns count outcomes."""
        return self.refusal or "loaded"


def _refusal_name(exc: BaseException) -> str:
    """How a refusal is counted: the class name; an MmapError with its errno's name."""
    if isinstance(exc, loader.MmapError):
        return f"MmapError({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    return type(exc).__name__


def attempt_load(load: LoaderUnderTest | None, data: bytes, cm: CheckingMmap,
                 **project_options: Any) -> Attempt:
    """Load ``data`` through ``cm`` with ``load`` (None: the project's loader, which also
    takes ``project_options`` such as ``base``) and say how it went.

    A refusal (see the module's docstring) becomes ``Attempt(None, name)``; anything else
    propagates: it is the loader's bug. A loader under test must return an int."""
    refusals: tuple[type[BaseException], ...] = (
        (loader.ElfError, loader.MmapError) if load is None else (Exception,))
    try:
        if load is None:
            obj = loader.load(data, cm, **project_options)
            return Attempt(obj.load_bias, None, obj)
        bias = load(data, cm)
    except NEVER_A_REFUSAL:
        raise
    except refusals as exc:
        return Attempt(None, _refusal_name(exc), reason=str(exc))
    if not isinstance(bias, int) or isinstance(bias, bool):
        raise Violation(f"the loader returned {bias!r}, not its load bias (an int)")
    return Attempt(bias, None)


def drop(attempt: Attempt, cm: CheckingMmap) -> None:
    """What is left when the space is dropped: the project's object is unloaded; for a loader
    under test (which has no unload) the testbed unmaps what the loader mapped and did not
    unmap itself (never more: on the host, a range it unmapped may already hold someone
    else's memory). Then Violation if anything the loader obtained is still mapped."""
    if attempt.obj is not None:
        attempt.obj.unload()
    elif attempt.bias is not None:
        for lo, hi, _prot in list(cm.prots.items):
            cm.munmap(lo, hi - lo)
    left = cm.leftovers()
    if left:
        raise Violation(f"{attempt.outcome}, but still mapped: {[str(r) for r in left]}")


def image_knobs(relocations: Collection[str] | None) -> dict[str, Any]:
    """The ``elf_images`` knobs that keep synthetic images within ``relocations`` (names from
    :data:`RELOCATION_NAMES`; None: no restriction, the strategies' defaults).

    Only the named types are emitted; RELATIVE relocations are packed as DT_RELR only when
    ``RELR`` is named (which implies RELATIVE), and read-only segments are relocated only when
    ``TEXTREL`` is named. ValueError names an unknown type."""
    if relocations is None:
        return {}
    names = {str(r).upper().removeprefix("R_X86_64_") for r in relocations}
    unknown = sorted(names - set(RELOCATION_NAMES))
    if unknown or not names - {"TEXTREL"}:
        raise ValueError(f"relocations {', '.join(unknown) or 'TEXTREL alone'}: expected "
                         f"some of {', '.join(RELOCATION_NAMES)}")
    if "RELR" in names:
        names.add("RELATIVE")
    types = [t for t in RELOC_TYPES if t in names]
    return {"relocation_types": types, "relr": "RELR" in names,
            "textrel": "TEXTREL" in names}
