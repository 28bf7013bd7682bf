"""The pipeline: parse and validate -> plan -> map -> relocate -> protect -> init.

Part of the ``loader`` layer, its top: ``load`` is the public entry point. It knows memory only
through ``Mmap``. Whether the backend is this very process (so code may run: IFUNC resolvers,
init and fini functions) is decided at run time by ``runs_code``: a backend may say so with a
``runs_code`` attribute; otherwise it is true exactly for ``loader.libc.LibcMmap`` (imported
lazily, so the loader does not depend on it), looking through wrappers' ``inner``.
"""

from __future__ import annotations

import ctypes
import mmap as host_mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loader.elf import PF_W, PF_X, ElfImage, parse_image
from loader.errors import ElfDynamicError, ElfUnsupportedError
from loader.explain import (
    Narrator,
    Step,
    init_sentence,
    parse_sentence,
    plan_sentence,
    relocation_sentences,
    relro_sentence,
    textrel_sentence,
    undo_sentence,
)
from loader.mapper import map_plan, reserve
from loader.mmap import Mmap, ProtFlags
from loader.outcome import Outcome, take_outcome
from loader.pages import HOST_PAGE_SIZE
from loader.plan import LoadPlan, make_plan
from loader.reloc import RelocOutcome, check_relocations, relocate
from loader.symbols import STT_GNU_IFUNC, HostResolver, Resolver, StubResolver, find
from loader.tables import DT, DynamicTables, parse_tables
from loader.trace import TracingMmap, unwrap

__all__ = ["LoadedObject", "load", "runs_code"]

_INIT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_MASK64 = 0xFFFFFFFFFFFFFFFF


def runs_code(mm: Any) -> bool:
    """True when ``mm`` maps into this process, so loaded code can be called."""
    inner = unwrap(mm)
    flag = getattr(inner, "runs_code", None)
    if flag is not None:
        return bool(flag)
    try:
        from loader.libc import LibcMmap
    except ImportError:  # pragma: no cover - the host backend always ships
        return False
    return isinstance(inner, LibcMmap)


def _textrel(tables: DynamicTables) -> bool:
    """DT_TEXTREL, or DF_TEXTREL in DT_FLAGS."""
    return DT.TEXTREL in tables.tags or bool(tables.tags.get(DT.FLAGS, 0) & DT.DF_TEXTREL)


def _check_arrays(image: ElfImage, tables: DynamicTables) -> None:
    """DT_INIT_ARRAY and DT_FINI_ARRAY must lie inside a PT_LOAD (they are read from memory)."""
    for name, (at, count) in (("DT_INIT_ARRAY", tables.init_array),
                              ("DT_FINI_ARRAY", tables.fini_array)):
        if count and not any(s.p_vaddr <= at and at + 8 * count <= s.end for s in image.loads):
            raise ElfDynamicError(name, at, f"[{name}, +{8 * count:#x}) inside one PT_LOAD")
    for name, tag in (("DT_INIT", DT.INIT), ("DT_FINI", DT.FINI)):
        at = tables.tags.get(tag, 0)
        if at and not _in_code(image, at):
            raise ElfDynamicError(name, at, "inside an executable PT_LOAD")


def _in_code(image: ElfImage, vaddr: int) -> bool:
    """``vaddr`` lies inside an executable PT_LOAD."""
    return any(s.p_vaddr <= vaddr < s.end and s.p_flags & PF_X for s in image.loads)


def _check_host_tls(tables: DynamicTables) -> None:
    """On the host, DTPMOD64/DTPOFF64 against another module's TLS would need that module's
    dynamic TLS bookkeeping in this process's glibc, and TLSDESC descriptors call into
    ld.so: both refused before any memory is touched. (TPOFF64 works: the offset comes from
    the thread pointer.)"""
    syms = tables.symtab
    for table in tables.relocs:
        if (table.r_type == 36).any():
            raise ElfUnsupportedError(f"{table.name} r_type", 36, "R_X86_64_TLSDESC not on "
                                      "the host backend (its descriptors call into ld.so); "
                                      "use the simulator")
        dyn = ((table.r_type == 16) | (table.r_type == 17)) & (table.r_sym != 0)
        undefined = syms["st_shndx"][table.r_sym[dyn]] == 0
        if undefined.any():
            sym = int(table.r_sym[dyn][undefined][0])
            raise ElfUnsupportedError(
                f"{table.name} DTPMOD64/DTPOFF64 symbol", tables.name(int(syms[sym]["st_name"])),
                "not on the host backend (dynamic TLS of another module); use the simulator")


def _open(source: str | os.PathLike[str] | bytes | bytearray | memoryview
          ) -> tuple[Any, int | None, str]:
    """The file's bytes (a read-only mmap for a path), its fd (None for bytes), a label."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), None, "<bytes>"
    path = os.fspath(source)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data: Any = host_mmap.mmap(fd, size, prot=host_mmap.PROT_READ) if size else b""
    except BaseException:
        os.close(fd)
        raise
    return data, fd, str(Path(path).resolve())


class LoadedObject:
    """An ELF object loaded by :func:`load`. Addresses are absolute.

    ``load_bias``: load address minus lowest vaddr. ``span``: (start, end) of the
    reservation. ``relro``: the (start, end) made read-only, or None. ``relocations``: what
    relocation did. ``inits``/``finis``: functions run (host) or recorded (simulator).
    """

    def __init__(self, path: str, image: ElfImage, tables: DynamicTables, plan: LoadPlan,
                 mm: TracingMmap, start: int) -> None:
        self.path, self.image, self.tables, self.plan, self.mm = path, image, tables, plan, mm
        self.load_bias = start - plan.vmin
        self.span = (start, start + plan.span_length)
        self.relro = (None if plan.relro is None else
                      (plan.relro[0] + self.load_bias, plan.relro[1] + self.load_bias))
        self.relocations = RelocOutcome()
        self.runs_code = runs_code(mm)
        self.real_bindings = True
        self.inits: list[int] = []
        self.finis: list[int] = []
        self.loaded = True

    def symbol(self, name: str) -> int:
        """The absolute address of exported ``name`` (``"name@VERSION"`` for a version).

        Raises KeyError when the object does not export it.
        """
        i = find(self.tables, name)
        if i is None:
            raise KeyError(name)
        sym = self.tables.symtab[i]
        addr = (int(sym["st_value"]) + self.load_bias) & _MASK64
        if int(sym["st_info"]) & 0xF == STT_GNU_IFUNC and self.runs_code:
            addr = int(ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)())
        return addr

    def outcome(self, *, keep_bytes: bool = False) -> Outcome:
        """The comparable outcome (DESIGN.md "Outcomes"): regions in the span, a hash of
        each readable page, RELRO, the trace of Mmap calls. ``keep_bytes`` also keeps the
        page bytes, so a difference can be shown byte by byte."""
        return take_outcome(self, keep_bytes)

    def _array(self, at: int, count: int) -> list[int]:
        """The relocated function pointers of an init/fini array (0 and -1 skipped)."""
        if not count:
            return []
        raw = self.mm.read(at + self.load_bias, 8 * count)
        words = [int.from_bytes(raw[i: i + 8], "little") for i in range(0, 8 * count, 8)]
        return [w for w in words if w not in (0, _MASK64)]

    def _functions(self, tag: int, array: tuple[int, int], reverse: bool) -> list[int]:
        """DT_INIT then DT_INIT_ARRAY, or DT_FINI_ARRAY reversed then DT_FINI (glibc order)."""
        single = [self.tables.tags[tag] + self.load_bias] if self.tables.tags.get(tag) else []
        listed = self._array(*array)
        return listed[::-1] + single if reverse else single + listed

    def _call_all(self, funcs: list[int], what: str) -> None:
        """Call each function as glibc calls initialisers: (argc, argv, envp), here empty.
        Each must lie in the object's own code (ElfDynamicError otherwise: never a jump
        into data or into nowhere)."""
        for fn in funcs:
            if not _in_code(self.image, fn - self.load_bias):
                raise ElfDynamicError(f"{what} entry", fn, "inside an executable PT_LOAD")
        empty = (ctypes.c_void_p * 1)()
        for fn in funcs:
            _INIT(fn)(0, ctypes.addressof(empty), ctypes.addressof(empty))

    def run_init(self) -> None:
        """Run (host, shared objects) or record (otherwise) the init functions."""
        self.inits = self._functions(DT.INIT, self.tables.init_array, reverse=False)
        if self.runs_code and self.runs_init:
            self._call_all(self.inits, "init")

    @property
    def runs_init(self) -> bool:
        """Init and fini run only for shared objects whose imports are bound to real code:
        an executable's belong to its own start-up code, which this loader does not run."""
        return self.real_bindings and self.image.e_type == "ET_DYN" and not self.image.interp

    def unload(self) -> None:
        """Run fini (host; DT_FINI_ARRAY in reverse, then DT_FINI, as glibc) and unmap the
        span and any extern mapping. A second call does nothing."""
        if not self.loaded:
            return
        self.loaded = False
        self.finis = self._functions(DT.FINI, self.tables.fini_array, reverse=True)
        if self.runs_code and self.runs_init:
            self._call_all(self.finis, "fini")
        self.mm.munmap(self.span[0], self.span[1] - self.span[0])
        ext = self.relocations.extern_range
        if ext is not None:
            self.mm.munmap(ext[0], ext[1] - ext[0])

    def __repr__(self) -> str:
        return (f"<LoadedObject {self.path} span={self.span[0]:#x}-{self.span[1]:#x} "
                f"bias={self.load_bias:#x}>")


def _protect_textrel(obj: LoadedObject, writable: bool) -> None:
    """TEXTREL: make every read-only PT_LOAD writable (``writable``) or restore it."""
    for seg, sp in zip(obj.image.loads, obj.plan.segments, strict=True):
        if seg.p_flags & PF_W:
            continue
        prot = sp.prot | ProtFlags.PROT_WRITE if writable else sp.prot
        obj.mm.mprotect(sp.start + obj.load_bias, sp.end - sp.start, prot)


def _finish(obj: LoadedObject, resolver: Resolver, narrator: Narrator | None) -> None:
    """Relocate (with TEXTREL pages opened and closed around it), seal RELRO, run init."""
    if obj.plan.textrel:
        if narrator is not None:
            narrator.say("relocate", textrel_sentence(True))
        _protect_textrel(obj, True)
    before = len(obj.mm.calls)
    relocate(obj.image, obj.tables, obj.load_bias, obj.mm, resolver, obj.runs_code,
             obj.span[1], obj.relocations)
    if narrator is not None:
        _say_relocation(obj, narrator, before, type(resolver).__name__)
    if obj.plan.textrel:
        if narrator is not None:
            narrator.say("protect", textrel_sentence(False))
        _protect_textrel(obj, False)
    if obj.relro is not None:
        if narrator is not None:
            narrator.say("protect", relro_sentence(obj.plan, obj.image.relro))
        obj.mm.mprotect(obj.relro[0], obj.relro[1] - obj.relro[0], ProtFlags.PROT_READ)
    before = len(obj.mm.calls)
    obj.run_init()
    if narrator is not None:
        _say_init(obj, narrator, before)


def _say_relocation(obj: LoadedObject, narrator: Narrator, before: int, resolver: str) -> None:
    """Announce relocation after the fact, each sentence at the calls it made: binding from
    ``before`` (the extern mapping), the scatter at its write_words, the rare kinds after."""
    calls = obj.mm.calls
    scatter = next((i for i in range(before, len(calls)) if calls[i].op == "write_words"), None)
    rel = obj.relocations
    for kind, sentence in relocation_sentences(dict(rel.by_type), len(rel.extern),
                                               len(rel.unresolved), resolver):
        at = before if kind == "bind" or scatter is None else scatter + (kind == "rare")
        narrator.say("relocate", sentence, at=at)


def _say_init(obj: LoadedObject, narrator: Narrator, at: int) -> None:
    """Announce what init did: run (host, shared object, real bindings) or only recorded."""
    single = bool(obj.tables.tags.get(DT.INIT))
    ran = obj.runs_code and obj.runs_init
    why = ("simulator" if not obj.runs_code else
           "an executable's init belongs to its start-up code"
           if obj.image.e_type != "ET_DYN" or obj.image.interp else "imports bound to stubs")
    narrator.say("init", init_sentence(single, len(obj.inits) - single, ran, why), at=at)


def _cleanup(mm: TracingMmap, start: int, length: int, obj: LoadedObject | None) -> None:
    """Unmap the reservation (and the extern mapping, if one was made) after a failure."""
    mm.munmap(start, length)
    ext = obj.relocations.extern_range if obj is not None else None
    if ext is not None:
        mm.munmap(ext[0], ext[1] - ext[0])


def load(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview, mm: Mmap, *,
         resolver: Resolver | None = None, base: int | None = None,
         explain: Callable[[Step], None] | None = None) -> LoadedObject:
    """Load an x86-64 ELF shared object or executable onto ``mm`` and return it.

    ``base``: the address for the span's start (default: the backend chooses; an ET_EXEC
    goes at its own addresses). ``resolver``: the symbol chain (default: HostResolver on the
    host, StubResolver elsewhere). Raises an ElfError kind for bad input (nothing mapped
    then), MmapError from the backend (everything mapped so far unmapped again).
    ``explain``: called with each step of the load as a ``loader.explain.Step`` (a plain
    sentence, what and why), in pipeline order; ``loader.explain.Explainer`` collects them.
    """
    data, fd, label = _open(path_or_bytes)
    try:
        traced = TracingMmap(mm)
        narrator = None if explain is None else Narrator(explain, traced.calls)
        page = int(getattr(unwrap(mm), "page_size", HOST_PAGE_SIZE))
        image = parse_image(data, page)
        tables = parse_tables(image)
        if narrator is not None:
            narrator.say("parse", parse_sentence(image, label, len(tables.tags)))
        textrel = _textrel(tables)
        check_relocations(image, tables, textrel)
        _check_arrays(image, tables)
        host = runs_code(mm)
        if host and image.tls is not None:
            raise ElfUnsupportedError("PT_TLS", image.tls.p_memsz,
                                      "not on the host backend (its TLS belongs to this "
                                      "process's glibc); load it on the simulator")
        if host:
            _check_host_tls(tables)
        plan = make_plan(image, textrel)
        if narrator is not None:
            narrator.say("plan", plan_sentence(plan))
        if resolver is None:
            resolver = HostResolver() if host else StubResolver()
        return _map_and_finish(label, image, tables, plan, traced, fd, data, resolver, base,
                               narrator)
    finally:
        if fd is not None:
            os.close(fd)


def _map_and_finish(label: str, image: ElfImage, tables: DynamicTables, plan: LoadPlan,
                    mm: TracingMmap, fd: int | None, data: Any, resolver: Resolver,
                    base: int | None, narrator: Narrator | None = None) -> LoadedObject:
    """Reserve, map, relocate, protect, init; on any failure unmap everything and re-raise."""
    start = reserve(plan, mm, base, use_file=fd is not None, narrator=narrator)
    obj: LoadedObject | None = None
    try:
        map_plan(plan, mm, start, fd, data, narrator=narrator, image=image)
        obj = LoadedObject(label, image, tables, plan, mm, start)
        obj.real_bindings = resolver.real
        _finish(obj, resolver, narrator)
        return obj
    except BaseException as exc:
        if narrator is not None:
            narrator.say("undo", undo_sentence(exc))
        _cleanup(mm, start, plan.span_length, obj)
        raise

