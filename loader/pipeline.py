"""The pipeline: parse and validate -> plan -> map -> relocate -> protect -> init.

Part of the ``loader`` layer, its top: ``load`` is the public entry point. It knows memory only
through ``Mmap``. Whether the backend is this very process (so code may run: IFUNC resolvers,
init and fini functions) is the backend's declared capability ``Mmap.runs_code``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np

from loader.elf import ElfBytes, ElfImage, FileBytes, MemoryBytes, ParsedFile, parse_image
from loader.elfdefs import ADDR_SIZE, DF, DT, ET, MASK64, PF, R_X86_64, STT, st_type
from loader.errors import (
    ElfDynamicError,
    ElfError,
    ElfFileError,
    ElfSymbolError,
    ElfUnsupportedError,
)
from loader.explain import (
    SILENT,
    Narrator,
    Sentences,
    Step,
    bindings,
    init_sentence,
    parse_sentences,
    plan_sentences,
    relocation_sentences,
    relro_sentence,
    textrel_sentence,
    undo_sentence,
)
from loader.mapper import map_plan, reserve
from loader.mmap import Mmap, MmapError, ProtFlags, call_function, code_runner
from loader.outcome import Outcome, take_outcome
from loader.plan import LoadPlan, make_plan
from loader.reloc import (
    OWN_CODE,
    Classified,
    Kind,
    RelocContext,
    RelocOutcome,
    TlsLayout,
    check_relocations,
    first_outside_code,
    relocate,
)
from loader.symbols import HostResolver, Resolver, StubResolver, find
from loader.tables import DynamicTables, parse_tables
from loader.trace import TracingMmap

__all__ = ["LoadedObject", "load", "map_object", "relocate_object", "runs_code"]

_INIT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def runs_code(mm: Mmap) -> bool:
    """True when code ``mm`` maps can be called: in this process (the host), or on a CPU of
    the backend's own (``code_runner``). Wrappers forward their inner backend's."""
    return bool(mm.runs_code)




def _textrel(tables: DynamicTables) -> bool:
    """DT_TEXTREL, or DF_TEXTREL in DT_FLAGS."""
    return DT.TEXTREL in tables.tags or bool(tables.tags.get(DT.FLAGS, 0) & DF.TEXTREL)


def _check_arrays(image: ElfImage, tables: DynamicTables) -> None:
    """DT_INIT_ARRAY and DT_FINI_ARRAY must lie inside one PT_LOAD's file bytes (they are
    read from memory after relocation, so their size is bounded by the file, never by a
    .bss); DT_INIT and DT_FINI must be callable code (``first_outside_code``)."""
    for name, (at, count) in (("DT_INIT_ARRAY", tables.init_array),
                              ("DT_FINI_ARRAY", tables.fini_array)):
        if count and image.file_offset(at, ADDR_SIZE * count) is None:
            raise ElfDynamicError(name, at, f"[{name}, +{ADDR_SIZE * count:#x}) inside one "
                                  "PT_LOAD's file bytes")
    for name, tag in (("DT_INIT", DT.INIT), ("DT_FINI", DT.FINI)):
        at = tables.tags.get(tag, 0)
        if at and first_outside_code(image, [at]) is not None:
            raise ElfDynamicError(name, at, OWN_CODE)


def _check_host_tls(image: ElfImage, tables: DynamicTables, classified: Classified) -> None:
    """On the host, a PT_TLS belongs to this process's glibc; DTPMOD64/DTPOFF64 against
    another module's TLS would need that module's dynamic TLS bookkeeping in this process's
    glibc, and TLSDESC descriptors call into ld.so: all refused before any memory is
    touched. (TPOFF64 works: the offset comes from the thread pointer.) The entries are
    found by the kinds ``check_relocations`` classified (TLS_DESC is only TLSDESC,
    TLS_MODULE and TLS_DTPOFF only DTPMOD64 and DTPOFF64)."""
    if image.tls is not None:
        raise ElfUnsupportedError("PT_TLS", image.tls.p_memsz,
                                  "not on the host backend (its TLS belongs to this "
                                  "process's glibc); load it on the simulator")
    syms = tables.symtab
    descs = classified.of_kind(Kind.TLS_DESC)
    dyns = classified.of_kind(Kind.TLS_MODULE, Kind.TLS_DTPOFF)
    for table, desc, dyn in zip(tables.relocs, descs, dyns, strict=True):
        if desc.any():
            raise ElfUnsupportedError(f"{table.name} r_type", int(R_X86_64.TLSDESC),
                                      "R_X86_64_TLSDESC not on the host backend (its "
                                      "descriptors call into ld.so); use the simulator")
        if not dyn.any():
            continue
        dyn &= table.r_sym != 0
        undefined = syms["st_shndx"][table.r_sym[dyn]] == 0
        if undefined.any():
            sym = int(table.r_sym[dyn][undefined][0])
            raise ElfUnsupportedError(
                f"{table.name} DTPMOD64/DTPOFF64 symbol", tables.name(int(syms[sym]["st_name"])),
                "not on the host backend (dynamic TLS of another module); use the simulator")


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _require_regular(path: str, mode: int) -> None:
    """ElfFileError naming ``path`` and what it is, unless ``mode`` is a regular file's."""
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise ElfFileError(f"file {path}", what, "a regular file (an ELF object is read whole)")


@dataclass(frozen=True, slots=True)
class _Source:
    """What ``load`` reads from: the file's bytes (``FileBytes``: read where the parser
    looks, into memory of its own, so a truncation cannot SIGBUS it; ``MemoryBytes`` for
    bytes given), the open fd (None for bytes), a label, and the (size, mtime) it had when
    opened, to notice a change during the load."""

    data: ElfBytes
    fd: int | None
    label: str
    stamp: tuple[int, int] | None = None
    image: ElfImage | None = None
    """The headers parsed already, from ``data`` (``_reuse``), or None."""


def _stamp(fd: int) -> tuple[int, int]:
    """(size, mtime in ns) of the open file ``fd``."""
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns


def _label(fd: int, path: str) -> str:
    """The absolute path of the file open as ``fd``: what the kernel says it opened (one
    readlink of /proc/self/fd, a tenth of the cost of resolving ``path`` component by
    component), or ``path`` resolved when /proc cannot say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return str(Path(path).resolve())


def _open(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> _Source:
    """Open what ``load`` was given. A path must name a regular file: checked before
    opening (a FIFO would block the open), and again on the open fd (it may have been
    replaced in between); the open never blocks (O_NONBLOCK). Nothing is read yet: the
    parser reads what it needs (``FileBytes``). A missing file is FileNotFoundError;
    anything not a regular file is an ElfFileError naming it."""
    if isinstance(source, bytes | bytearray | memoryview):
        return _Source(MemoryBytes(bytes(source)), None, "<bytes>")
    path = os.fspath(source)
    _require_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        _require_regular(path, st.st_mode)
        label = _label(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return _Source(FileBytes(fd, st.st_size, label), fd, label,
                   (st.st_size, st.st_mtime_ns))


def _reuse(src: _Source, parsed: ParsedFile | None, page_size: int) -> _Source:
    """``src`` reading through ``parsed``'s image (``ParsedFile.image_for``: the same file,
    unchanged) when there is one; else ``src`` itself (``_parse`` parses it)."""
    if parsed is None or src.fd is None:
        return src
    image = parsed.image_for(src.fd, os.fstat(src.fd), src.label, page_size)
    if image is None:
        return src
    return dataclasses.replace(src, data=image.data, image=image)


def _file_change(src: _Source) -> ElfFileError | None:
    """The error to raise when the file is no longer what was read (size or mtime), else
    None. The mapped pages and the parsed tables would disagree. (On the host, a truncation
    after the last check still SIGBUSes the process at its next access to a vanished page,
    exactly as it would under glibc: that cannot be checked away.)"""
    if src.fd is None or src.stamp is None:
        return None
    now = _stamp(src.fd)
    if now == src.stamp:
        return None
    return ElfFileError(f"file {src.label} size", now[0], f"{src.stamp[0]:#x} bytes, "
                        "unchanged during the load (it was truncated or rewritten)")


def _check_unchanged(src: _Source) -> None:
    """Raise ``_file_change``'s error, if any."""
    changed = _file_change(src)
    if changed is not None:
        raise changed


def _nothing() -> None:
    """What ``LoadedObject.close_file`` does when ``load`` closed the file already."""


class LoadedObject:
    """An ELF object loaded by :func:`load`. Addresses are absolute.

    ``name``: its DT_SONAME, else its file name. ``is_program``: the program of a process
    image (``loader.LinkMap.exec``). ``load_bias``: load address minus lowest vaddr.
    ``span``: (start, end) of the reservation. ``relro``: the (start, end) made read-only,
    or None. ``relocations``: what relocation did. ``inits``/``finis``: functions run
    (host) or recorded (simulator).
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
        self.runner = code_runner(mm)
        self.real_bindings = True
        self.inits: list[int] = []
        self.finis: list[int] = []
        self.loaded = True
        self.classified: Classified | None = None
        soname = tables.tags.get(DT.SONAME)
        self.name = tables.name(soname) if soname is not None and soname < len(tables.strtab) \
            else os.path.basename(path)
        self.is_program = False
        self.close_file: Callable[[], None] = _nothing

    def symbol(self, name: str) -> int:
        """The absolute address of exported ``name`` (``"name@VERSION"`` for a version).

        Raises KeyError when the object does not export it.
        """
        i = find(self.tables, name)
        if i is None:
            raise KeyError(name)
        sym = self.tables.symtab[i]
        addr = (int(sym["st_value"]) + self.load_bias) & MASK64
        if st_type(int(sym["st_info"])) == STT.GNU_IFUNC and self.runs_code:
            if first_outside_code(self.image, [int(sym["st_value"])]) is not None:
                raise ElfSymbolError(f"STT_GNU_IFUNC {name!r} resolver",
                                     int(sym["st_value"]),
                                     OWN_CODE)
            addr = call_function(self.runner, addr)
        return addr

    def outcome(self, *, keep_bytes: bool = False) -> Outcome:
        """The comparable outcome (docs/DESIGN.md): regions in the span, a hash of
        each readable page, RELRO, the trace of Mmap calls. ``keep_bytes`` also keeps the
        page bytes, so a difference can be shown byte by byte."""
        return take_outcome(self, keep_bytes)

    def _array(self, at: int, count: int) -> list[int]:
        """The relocated function pointers of an init/fini array (0 and -1 skipped), read
        in one piece (its size is bounded by the file: ``_check_arrays``)."""
        if not count:
            return []
        words = np.frombuffer(self.mm.read(at + self.load_bias, ADDR_SIZE * count), dtype="<u8")
        kept: list[int] = words[(words != 0) & (words != MASK64)].tolist()
        return kept

    def _functions(self, tag: int, array: tuple[int, int], reverse: bool) -> list[int]:
        """DT_INIT then DT_INIT_ARRAY, or DT_FINI_ARRAY reversed then DT_FINI (glibc order)."""
        single = [self.tables.tags[tag] + self.load_bias] if self.tables.tags.get(tag) else []
        listed = self._array(*array)
        return listed[::-1] + single if reverse else single + listed

    def _check_callable(self, funcs: list[int], what: str) -> None:
        """Every function must be the object's own code (``first_outside_code``):
        ElfDynamicError otherwise, before any call, never a jump into data or nowhere."""
        vaddrs = [(fn - self.load_bias) & MASK64 for fn in funcs]
        bad = first_outside_code(self.image, vaddrs)
        if bad is not None:
            raise ElfDynamicError(f"{what} entry", (bad + self.load_bias) & MASK64,
                                  OWN_CODE)

    def _call_all(self, funcs: list[int], what: str) -> None:
        """Call each function as glibc calls initialisers: (argc, argv, envp), here empty;
        all are checked before the first is called."""
        self._check_callable(funcs, what)
        empty = (ctypes.c_void_p * 1)()
        for fn in funcs:
            if self.runner is not None:      # argv and envp: empty, as here
                self.runner(fn, 0, 0, 0)
            else:
                _INIT(fn)(0, ctypes.addressof(empty), ctypes.addressof(empty))

    def run_init(self) -> None:
        """Run (host, shared objects) or record (otherwise) the init functions. Where they
        run, the fini functions are checked now too, so that a load that succeeds can
        always be unloaded."""
        self.inits = self._functions(DT.INIT, self.tables.init_array, reverse=False)
        if self.runs_code and self.runs_init:
            self._check_callable(self._functions(DT.FINI, self.tables.fini_array,
                                                 reverse=True), "fini")
            self._call_all(self.inits, "init")

    @property
    def runs_init(self) -> bool:
        """Init and fini run only for shared objects whose imports are bound to real code:
        an executable's belong to its own start-up code, which this loader does not run."""
        return self.real_bindings and self.image.e_type == ET.DYN and not self.image.interp

    def unload(self, *, fini: bool = True) -> None:
        """Run fini (host; DT_FINI_ARRAY in reverse, then DT_FINI, as glibc) and unmap the
        span and any extern mapping. ``fini=False``: unmap only (an object whose init never
        ran: a process image undoing a failed load). A second call does nothing."""
        if not self.loaded:
            return
        self.loaded = False
        try:
            if fini:
                self.finis = self._functions(DT.FINI, self.tables.fini_array, reverse=True)
            if fini and self.runs_code and self.runs_init:
                self._call_all(self.finis, "fini")
        finally:  # a refused fini (its code rewritten since load) still unmaps everything
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
        if seg.p_flags & PF.W:
            continue
        prot = sp.prot | ProtFlags.PROT_WRITE if writable else sp.prot
        obj.mm.mprotect(sp.start + obj.load_bias, sp.end - sp.start, prot)


def relocate_object(obj: LoadedObject, resolver: Resolver, narrator: Narrator = SILENT,
                    classified: Classified | None = None, *, lazy: bool = False,
                    before_seal: Callable[[LoadedObject], None] | None = None) -> None:
    """Relocate (with TEXTREL pages opened and closed around it) and seal RELRO: the
    second stage of a load, after ``map_object`` (no init; a failure leaves the mapping
    to the caller). ``classified``: what ``check_relocations`` found, reused by
    ``relocate``; ``lazy``: JUMP_SLOTs keep their PLT addresses (lazy binding);
    ``before_seal``: called after relocation, before RELRO is sealed (GOT[1] and GOT[2]
    of a lazy object lie in RELRO, as GNU ld places it)."""
    if obj.plan.textrel:
        narrator.say("relocate", textrel_sentence, True)
        _protect_textrel(obj, True)
    before = len(obj.mm.calls)
    where = RelocContext(obj.image, obj.tables, obj.mm, obj.load_bias, obj.runs_code,
                         obj.span[1], classified or obj.classified, lazy)
    relocate(where, resolver, obj.relocations)
    narrator.say_all("relocate", _relocation_steps, obj, before, type(resolver).__name__)
    if before_seal is not None:
        before_seal(obj)
    if obj.plan.textrel:
        narrator.say("protect", textrel_sentence, False)
        _protect_textrel(obj, False)
    if obj.relro is not None:
        narrator.say("protect", relro_sentence, obj.plan, obj.image.relro)
        obj.mm.mprotect(obj.relro[0], obj.relro[1] - obj.relro[0], ProtFlags.PROT_READ)


def _finish(obj: LoadedObject, resolver: Resolver, narrator: Narrator,
            classified: Classified | None = None) -> None:
    """Relocate and protect (``relocate_object``), then run init."""
    relocate_object(obj, resolver, narrator, classified)
    before = len(obj.mm.calls)
    obj.run_init()
    narrator.say_all("init", _init_steps, obj, before)


def _relocation_steps(obj: LoadedObject, before: int, resolver: str) -> Sentences:
    """Relocation told after the fact, each sentence at the calls it made: binding from
    ``before`` (the extern mapping), the scatter and the rare kinds at the write_words."""
    calls = obj.mm.calls
    scatter = next((i for i in range(before, len(calls)) if calls[i].op == "write_words"), None)
    rel = obj.relocations
    return [(sentence, before if kind == "bind" or scatter is None else scatter)
            for kind, sentence in relocation_sentences(
                dict(rel.by_type), len(rel.extern), len(rel.unresolved), resolver,
                bindings(obj.tables), obj.path.rsplit("/", 1)[-1])]


def _init_steps(obj: LoadedObject, at: int) -> Sentences:
    """What init did: run (host, shared object, real bindings) or only recorded."""
    single = bool(obj.tables.tags.get(DT.INIT))
    ran = obj.runs_code and obj.runs_init
    why = ("simulator" if not obj.runs_code else
           "an executable's init belongs to its start-up code"
           if obj.image.e_type != ET.DYN or obj.image.interp else "imports bound to stubs")
    return [(init_sentence(single, len(obj.inits) - single, ran, why), at)]


def _cleanup(mm: TracingMmap, start: int, length: int, obj: LoadedObject | None) -> None:
    """Unmap the reservation (and the extern mapping, if one was made) after a failure."""
    mm.munmap(start, length)
    ext = obj.relocations.extern_range if obj is not None else None
    if ext is not None:
        mm.munmap(ext[0], ext[1] - ext[0])


def _parse(src: _Source, page_size: int) -> tuple[ElfImage, DynamicTables]:
    """Parse and check the headers and the dynamic tables. The parser reads the file as it
    goes (``FileBytes``), so an error met while the file changed (a table cut short by a
    truncation, say) is the ElfFileError of that change, not a complaint about the bytes."""
    try:
        image = src.image or parse_image(src.data, page_size)
        return image, parse_tables(image)
    except ElfError as exc:
        changed = _file_change(src)
        if changed is not None:
            raise changed from exc
        raise


def load(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview, mm: Mmap, *,
         resolver: Resolver | None = None, base: int | None = None,
         explain: Callable[[Step], None] | None = None,
         tls: TlsLayout | None = None) -> LoadedObject:
    """Load an x86-64 ELF shared object or executable onto ``mm`` and return it.

    ``base``: the address for the span's start (default: the backend chooses; an ET_EXEC
    goes at its own addresses). ``resolver``: the symbol chain (default: HostResolver on the
    host, StubResolver elsewhere). Raises an ElfError kind for bad input (nothing mapped
    then), MmapError from the backend (everything mapped so far unmapped again).
    ``explain``: called with each step of the load as a ``loader.explain.Step`` (a plain
    sentence, what and why), in pipeline order; ``loader.explain.Explainer`` collects them.
    ``tls``: the TLS module the object's PT_TLS block is (module id, static offset or None
    for dynamic TLS), as a process image assigns it; given, the host accepts TLS (the caller
    runs its TLS), else the block is the first static one and the host refuses PT_TLS.
    """
    src = _open(path_or_bytes)
    try:
        traced = TracingMmap(mm)
        narrator = SILENT if explain is None else Narrator(explain, traced.calls)
        parsed = _checked(src, traced, narrator, host_tls=tls is not None)
        if resolver is None:
            resolver = HostResolver() if runs_code(mm) else StubResolver()
        obj = _map(src, parsed, traced, base, narrator)
        obj.real_bindings = resolver.real
        obj.relocations.tls = tls
        try:
            _finish(obj, resolver, narrator, parsed.classified)
        except BaseException as exc:
            _undo(src, obj.mm, obj.span[0], parsed.plan.span_length, obj, narrator, exc)
        return obj
    finally:
        _close(src)


def map_object(source: str | os.PathLike[str] | bytes, mm: TracingMmap, *,
               base: int | None = None, host_tls: bool = False,
               parsed: ParsedFile | None = None) -> LoadedObject:
    """The first stage of a load, for a process image (``loader.LinkMap``) that maps a
    whole closure before it relocates any of it: open, parse and check, plan, reserve and
    map. Nothing is relocated, protected or run. ``host_tls``: the caller runs the TLS of
    this object on the host. ``parsed``: the search's parse of the file (``ObjectInfo``),
    whose headers are reused when the file opened now is the same (``_reuse``). Bad input
    raises an ElfError kind with nothing mapped. The file stays open (relocation reads
    addends from it): ``obj.close_file()`` closes it."""
    src = _open(source)
    try:
        src = _reuse(src, parsed, mm.page_size)
        checked = _checked(src, mm, SILENT, host_tls=host_tls)
        obj = _map(src, checked, mm, base, SILENT)
    except BaseException:
        _close(src)
        raise
    obj.classified = checked.classified
    obj.close_file = functools.partial(_close, src)
    return obj


def _close(src: _Source) -> None:
    """Close what ``_open`` opened."""
    if isinstance(src.data, FileBytes):
        src.data.close()
    if src.fd is not None:
        os.close(src.fd)


class _Parsed(NamedTuple):
    """What was read and checked before any memory is touched: the headers, the tables,
    their relocations classified (``check_relocations``) and the plan."""

    image: ElfImage
    tables: DynamicTables
    classified: Classified
    plan: LoadPlan


def _checked(src: _Source, mm: TracingMmap, narrator: Narrator, *, host_tls: bool
             ) -> _Parsed:
    """Parse and check everything before any memory is touched; plan."""
    image, tables = _parse(src, mm.page_size)
    narrator.say_all("parse", parse_sentences, image, src.label, len(tables.tags))
    textrel = _textrel(tables)
    classified = check_relocations(image, tables, textrel)
    _check_arrays(image, tables)
    if runs_code(mm) and code_runner(mm) is None and not host_tls:
        _check_host_tls(image, tables, classified)     # this very process: glibc's TLS
    plan = make_plan(image, textrel)
    narrator.say_all("plan", plan_sentences, plan)
    return _Parsed(image, tables, classified, plan)


def _map(src: _Source, parsed: _Parsed, mm: TracingMmap, base: int | None,
         narrator: Narrator) -> LoadedObject:
    """Reserve and map; the file is re-checked after mapping (``_check_unchanged``). On any
    failure everything is unmapped and the error re-raised (``_undo``)."""
    image, tables, _, plan = parsed
    start = reserve(plan, mm, base, use_file=src.fd is not None, narrator=narrator)
    try:
        map_plan(plan, mm, start, src.fd, src.data, narrator=narrator, image=image)
        _check_unchanged(src)
    except BaseException as exc:
        _undo(src, mm, start, plan.span_length, None, narrator, exc)
    return LoadedObject(src.label, image, tables, plan, mm, start)


def _undo(src: _Source, mm: TracingMmap, start: int, length: int, obj: LoadedObject | None,
          narrator: Narrator, exc: BaseException) -> NoReturn:
    """Unmap everything after a failure and raise: ``exc`` again, or an ElfFileError when
    the file changed meanwhile. A failure that is neither an ElfError nor
    an MmapError (the simulator's SIGBUS Fault on a page the file no longer has, say) lost a
    race with whoever truncated the file: bad input, not a loader bug. Otherwise it stays
    what it is (a Fault from the simulator is then a loader bug to fix)."""
    narrator.say("undo", undo_sentence, exc)
    _cleanup(mm, start, length, obj)
    changed = None if isinstance(exc, ElfError | MmapError) or \
        not isinstance(exc, Exception) else _file_change(src)
    if changed is not None:
        raise changed from exc
    raise exc
