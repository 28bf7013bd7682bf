"""A process image: a program or library with its whole closure, as glibc's ld.so builds it.

Part of the ``loader`` layer, on top of ``loader.pipeline`` (one object), ``loader.search``
(which files, in which order), ``loader.scope`` and ``loader.binding`` (what each reference
binds to) and ``loader.tls`` (module ids and the static TLS layout).

How a ``LinkMap`` loads, as ld.so (glibc 2.36) does at startup (``exec``) and in ``dlopen``:
1. the closure, breadth-first (``loader.search.closure``); objects already loaded are reused;
2. every new object mapped (``map_object``) before any is relocated; the versions each needs
   checked against the objects that define them (DT_VERNEED, as _dl_check_map_versions);
3. TLS modules: ids in load order; startup objects in static TLS, dlopen'ed ones dynamic;
4. the scope of each new object: the global scope (the program's search list: the program,
   its preloads, then their dependencies breadth-first, plus what was dlopen'ed with
   scope="global"), then for a dlopen'ed object the dlopen'ed root's own search list;
5. relocation, dependencies first (the reverse of the init order), each object's references
   looked up over its scope (``ScopeResolver``), then RELRO sealed; with bind="lazy" the
   JUMP_SLOTs keep their PLT addresses, GOT[1] names the object, GOT[2] the lazy resolver;
6. init, in glibc's order (``_dl_sort_maps``' depth-first sort of the new root's search list:
   dependencies first; DT_INIT before DT_INIT_ARRAY): run where code runs (the host),
   recorded elsewhere (a program's own init functions, DT_PREINIT_ARRAY included, belong to
   its start-up code and are neither). fini is the reverse sort at dlclose and unload.

A LinkMap that has not ``exec``'d a program starts as the smallest real process does: a
program linked against libc only, so the preloads, libc.so.6 and ld-linux-x86-64.so.2 are
the global scope ahead of any dlopen'ed closure (on the simulator they are loaded on the
first dlopen; the program itself, having no file, is not among ``objects``). On the host
that process is this one: its own objects are used where they are (``loader.resident``),
the objects we load get their TLS from ``loader.hosttls``, their .eh_frame registered
(``loader.ehframe``) and lazy binding through ``loader.lazy``'s trampoline.

Where code runs (the host, or a ``vmsim.Process``, whose ``call`` runs it on its emulated CPU:
``loader.mmap.code_runner``), IFUNC resolvers, init functions and lazy resolution run. On a
backend that runs no code (the simulator alone) they are recorded as pending
(``bindings()`` says which). Any failure unmaps everything the failed
call mapped and names the object and the chain that needed it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from loader.binding import Classes, ScopeResolver
from loader.ehframe import EhFrame, register_eh_frame
from loader.elfdefs import DT, MASK64, R_X86_64
from loader.errors import ElfDependencyError, ElfError, ElfSymbolError, ElfUnsupportedError
from loader.hosttls import HostTls, check_no_initial_exec
from loader.lazy import HostLazyBinder, LazyGot, binds_now, lazy_got, make_lazy, slot_wanted
from loader.mmap import MapFlags, Mmap, MmapError, ProtFlags, code_runner
from loader.pipeline import LoadedObject, map_object, relocate_object, runs_code
from loader.reloc import Kind, TlsLayout, call_ifunc, is_kind, type_name
from loader.resident import ProcessObject, Resident, process_objects
from loader.rtld_start import RtldStart
from loader.scope import (
    Definition,
    Definitions,
    LookupStep,
    Scope,
    ScopeIndex,
    all_definitions,
    lookup,
)
from loader.search import RTLD, Found, SearchPath, closure, extend_closure, read_object
from loader.symbols import HostResolver, Resolver, split_version, symbol_label
from loader.tls import ThreadArea, TlsObject, TlsState, build_thread_area
from loader.trace import TracingMmap

__all__ = ["Binding", "LinkMap", "Why"]

Bind = Literal["now", "lazy"]
ImageObject = LoadedObject | Resident
"""An object of a process image: loaded by us, or (host) one the process already had."""
ScopeKind = Literal["local", "global"]
SMALLEST_PROGRAM_NEEDS = "libc.so.6"
"""What the smallest real program needs: a LinkMap with no ``exec`` starts from it."""
_PLT_KINDS = (Kind.TLS_MODULE, Kind.TLS_DTPOFF, Kind.TLS_TPOFF, Kind.TLS_DESC)


HOOKED = "(a resolver hook)"
"""``Binding.target`` of a symbol a hook of ``LinkMap(resolver=...)`` bound."""


class Binding(NamedTuple):
    """One symbol relocation of a process image (``LinkMap.bindings``): the ``object`` it
    belongs to and its ``r_offset``, ``type`` and ``symbol``/``version``; the ``target``
    object that defines the symbol (None: unbound, e.g. weak undefined), the ``value`` in
    memory now, and ``pending``: what glibc would have done is not done yet (a lazy slot
    not yet called, an IFUNC resolver not run on a backend that runs no code)."""

    object: str
    r_offset: int
    type: str
    symbol: str
    version: str | None
    target: str | None
    value: int
    pending: bool


@dataclass(frozen=True, slots=True)
class Why:
    """``LinkMap.why``: the objects asked in order and what each said, the definition that
    wins (object name, or None) and the later definitions it interposes."""

    symbol: str
    version: str | None
    steps: tuple[LookupStep, ...]
    winner: str | None
    interposed: tuple[str, ...]


class _Member:
    """One object of the image and its bookkeeping: the search entry that found it, its
    definitions by name, direct dependencies (DT_NEEDED order), scope, lazy state, how many
    dlopens hold it, whether it belongs to the startup set (never unloaded)."""

    def __init__(self, obj: LoadedObject | Resident, found: Found) -> None:
        self.obj, self.found = obj, found
        self.deps: list[_Member] = []
        self.searchlist: list[_Member] = []
        self.scope: Scope = []
        self.resolver: ScopeResolver | None = None
        self.lazy = False
        self.lazy_values: dict[int, int] = {}     # r_offset -> PLT address + bias
        self.lazy_got = 0
        self.lazy_info: LazyGot | None = None
        self.opens = 0
        self.startup = False
        self.init_called = False

    @property
    def name(self) -> str:
        """The object's name (its soname, else its file name)."""
        return self.obj.name

    @property
    def loaded(self) -> LoadedObject:
        """The object as our loader loaded it (never a resident: they are not relocated
        here)."""
        assert isinstance(self.obj, LoadedObject), self.obj
        return self.obj

    @functools.cached_property
    def defs(self) -> Definitions:
        """Its definitions by name (read when a lookup first reaches it)."""
        return Definitions(self.obj)


class LinkMap:
    """One process image on one backend (module docstring). ``library_path`` plays
    LD_LIBRARY_PATH, ``preload`` LD_PRELOAD; ``resolver``: a ``loader.Resolver`` whose
    ``pre_find`` hooks are asked before the scope for every symbol and whose ``post_find``
    hooks after the scope found nothing (a binding they make has target ``HOOKED``)."""

    def __init__(self, mm: Mmap, *, library_path: str | Sequence[str] = (),
                 preload: Sequence[str] = (), resolver: Resolver | None = None) -> None:
        self.mm = TracingMmap(mm)
        self.search = SearchPath(library_path)
        self.preload = tuple(preload)
        self.resolver = resolver
        self.runs_code = runs_code(mm)
        self.runner = code_runner(mm)
        self.host = self.runs_code and self.runner is None
        """The backend is this very process (not a simulated one with a CPU of its own)."""
        self._members: list[_Member] = []
        self._global: list[_Member] = []
        self._global_defs: list[Definitions] = []     # the same, as the lookup reads it
        self._tls = _ImageTls(self.mm, self.host)
        self._eh_frames: dict[str, EhFrame] = {}
        self._unique: dict[bytes, Definition] = {}
        """STB_GNU_UNIQUE symbols: the first definition bound wins process-wide."""
        self._lazy_stub: tuple[int, int] | None = None
        self._binder: HostLazyBinder | None = None
        self.init_order: list[str] = []
        self.fini_order: list[str] = []
        self.program: LoadedObject | None = None
        self.rtld_start = RtldStart(self.mm, self.runner) if self.runner else None
        """On a backend that runs code (not the host): what ld.so's start-up would have left
        for libc, written by this LinkMap (``loader.rtld_start``)."""

    # --- what the image holds -------------------------------------------------------------

    @property
    def objects(self) -> list[ImageObject]:
        """Every object in link-map order."""
        return [m.obj for m in self._members]

    @property
    def tls(self) -> list[dict[str, object]]:
        """Per TLS module: name, id, block size and alignment, static offset or dynamic."""
        return self._tls.table()

    @property
    def thread(self) -> ThreadArea | None:
        """The main thread's TLS on the simulator (static blocks, TCB, DTV), once built."""
        return self._tls.thread

    def _member(self, obj: ImageObject) -> _Member:
        for m in self._members:
            if m.obj is obj:
                return m
        raise ValueError(f"{obj!r} is not an object of this LinkMap (closed already?)")

    # --- exec and dlopen ------------------------------------------------------------------

    def exec(self, path: str | os.PathLike[str], *, bind: Bind = "lazy") -> LoadedObject:
        """Load the program ``path``, its preloads and its closure, as ld.so does at
        startup (``bind``: "lazy" as ld.so by default, "now" as LD_BIND_NOW). No code of the
        program runs. Only one program per LinkMap, before any dlopen."""
        if self.host:
            raise ElfUnsupportedError("exec of " + os.fspath(path), "the host backend",
                                      "the simulator (this process has its program already: "
                                      "dlopen into it instead)")
        if self._members:
            raise ElfDependencyError("exec of " + os.fspath(path), "a LinkMap that has "
                                     "objects already", "exec first, on an empty LinkMap")
        entries = closure(os.fspath(path), search=self.search, preload=self.preload)
        new = self._load(entries, bind=bind, startup=True)
        self.program = new[0].loaded
        new[0].obj.is_program = True
        return self.program

    def _boot(self) -> None:
        """The smallest real process: the preloads, then libc.so.6 and its closure (ld.so),
        as startup objects in the global scope (the program linked against libc only has no
        file here). A preload's own dependencies come right after it (glibc loads them after
        libc: the order differs only for a preload that needs more than libc)."""
        if self._members:
            return
        if self.host:
            self._adopt_process()
            return
        entries: list[Found] = []
        for name in (*self.preload, SMALLEST_PROGRAM_NEEDS):
            entries += extend_closure(entries, name, search=self.search)[1]
        self._load(entries, bind="now", startup=True)

    def _adopt_process(self) -> None:
        """On the host: this process's own objects, used where they are (``Resident``), in
        its link-map order; the program's closure is the global scope, as glibc's."""
        rows: dict[_Member, ProcessObject] = {}
        for row in process_objects():
            if not os.path.exists(row.path):
                continue        # the vDSO: no file to read symbols from
            info = read_object(row.path)
            if info is None:
                continue
            m = _Member(Resident(row, info.soname or os.path.basename(row.path), info.parsed),
                        Found(row.path, row.path, "loaded", None, info))
            m.startup = True
            self._members.append(m)
            rows[m] = row
        by_name = self._names()
        for m in self._members:
            m.deps = _deps(m, by_name)
        if self._members:
            self._members[0].obj.is_program = True
            self._make_global(_closure_of(self._members[0]))
        for m in self._global:
            assert isinstance(m.obj, Resident)
            m.obj.in_static_tls(rows[m])

    def dlopen(self, path_or_soname: str | os.PathLike[str], *, bind: Bind = "now",
               scope: ScopeKind = "local") -> ImageObject:
        """Load an object and its closure as glibc's dlopen (RTLD_NOW or RTLD_LAZY,
        RTLD_LOCAL or RTLD_GLOBAL); an object already loaded is only counted again (and
        made global when asked). Returns the handle: the object itself."""
        self._boot()
        name = os.fspath(path_or_soname)
        known = [m.found for m in self._members]
        root_found, entries = extend_closure(known, name, search=self.search)
        if entries:
            root = self._load(entries, bind=bind, startup=False)[0]
        else:
            root = next(m for m in self._members if m.found is root_found)
        root.opens += 1
        if scope == "global":
            self._make_global(root.searchlist)
        return root.obj

    def _make_global(self, searchlist: list[_Member]) -> None:
        """RTLD_GLOBAL, or startup: a search list joins the global scope (each object once)."""
        for m in searchlist:
            if m not in self._global:
                self._global.append(m)
                self._global_defs.append(m.defs)

    # --- the load -------------------------------------------------------------------------

    def _load(self, entries: list[Found], *, bind: Bind, startup: bool) -> list[_Member]:
        """Map, check, lay out TLS, scope, relocate and init the new ``entries`` (the first
        is the root); on any failure unmap all of them and re-raise."""
        new: list[_Member] = []
        try:
            for found in entries:
                new.append(self._map(found, startup))
            self._link(new, startup)
            self._check_versions(new)
            for m in new:
                m.lazy = bind == "lazy" and _may_be_lazy(m.loaded) and not _is_rtld(m)
            order = _dfs_sort(new[0].searchlist if startup else
                                 _closure_of(new[0]))
            relocation_order = [m for m in reversed(order) if m in new]
            self._tls.assign(new, relocation_order, startup, self._members)
            self._relocate(relocation_order)
            self._tls.initialise(new, startup)
            if startup:
                self._start_libc(new)
            self._register_eh_frames(new)
            self._init([m for m in reversed(order) if m in new and not m.init_called])
        except BaseException:
            self._drop(new)
            if startup:
                self._tls.reset()
            raise
        finally:
            for m in new:
                m.obj.close_file()
        return new

    def _map(self, found: Found, startup: bool) -> _Member:
        """Map one object (not relocated) and enter it in the link map."""
        assert found.path is not None
        with _about(found, self._members):
            obj = map_object(found.path, self.mm, host_tls=self.host,
                             parsed=found.info.parsed if found.info else None)
        obj.name = found.info.soname if found.info and found.info.soname else \
            os.path.basename(found.path)
        member = _Member(obj, found)
        member.startup = startup
        self._members.append(member)
        return member

    def _link(self, new: list[_Member], startup: bool) -> None:
        """Dependencies, search lists and scopes of the new objects."""
        by_name = self._names()
        for m in new:
            m.deps = _deps(m, by_name)
        root = new[0]
        root.searchlist = list(new) if startup else _closure_of(root)
        if startup:
            self._make_global(root.searchlist)
        local = [m.defs for m in root.searchlist]
        scope = [self._global_defs] if startup else [self._global_defs, local]
        for m in new:
            m.scope = scope

    def _names(self) -> dict[str, _Member]:
        """Every name an object is known by (as asked, as found, soname, aliases)."""
        out: dict[str, _Member] = {}
        for m in self._members:
            f = m.found
            for n in (f.name, f.path, m.name, *f.aliases):
                if n is not None:
                    out.setdefault(n, m)
        return out

    def _check_versions(self, new: list[_Member]) -> None:
        """Every version a new object needs (DT_VERNEED, not weak) is defined by the object
        of that name: ElfDependencyError naming the version, the file and the chain."""
        by_name = self._names()
        defined: dict[int, set[str]] = {}       # per target (by id), read once
        for m in new:
            for file, version, weak in m.obj.tables.version_needs:
                target = by_name.get(file)
                if target is None or weak:
                    continue
                if id(target) not in defined:
                    tables = target.obj.tables
                    defined[id(target)] = {tables.versions[k] for k in tables.default_versions
                                           if k in tables.versions}
                if version not in defined[id(target)]:
                    raise ElfDependencyError(
                        f"version {version} of {file}", target.found.path,
                        f"defined by it (required by {_chain(m, self._members)})")

    def _relocate(self, order: list[_Member]) -> None:
        """Relocate each object over its scope (dependencies first); an undefined symbol is
        an ElfSymbolError naming the object and its chain."""
        indexes: dict[int, ScopeIndex] = {}
        for m in order:
            if id(m.scope) not in indexes:
                indexes[id(m.scope)] = ScopeIndex(m.scope)
            classes = _classes(m)
            m.resolver = ScopeResolver(m.defs, m.scope, self._tls.of, classes,
                                       real=self.runs_code,
                                       index=indexes[id(m.scope)],
                                       overrides=self._tls.overrides(), hooks=self.resolver,
                                       unique=self._unique)
            m.obj.relocations.tls = self._tls.layout(m.name)
            m.loaded.real_bindings = self.runs_code
            with _about(m.found, self._members):
                relocate_object(m.loaded, m.resolver, lazy=m.lazy,
                                before_seal=self._before_seal(m))
            if m.obj.relocations.unresolved:
                raise ElfSymbolError(
                    f"undefined symbol {m.obj.relocations.unresolved[0]} of {m.obj.path}",
                    len(m.obj.relocations.unresolved),
                    f"defined in its scope (needed by {_chain(m, self._members)})")

    def _before_seal(self, m: _Member) -> Callable[[LoadedObject], None] | None:
        """What is written into ``m`` after relocation, before its RELRO is sealed: the lazy
        GOT, or, for ld.so at startup where code runs, the TLS sizes libc reads from it."""
        if m.lazy:
            return functools.partial(self._make_lazy, m)
        start = self.rtld_start
        if start is None or not m.startup or not _is_rtld(m):
            return None
        ro = lookup(b"_rtld_global_ro", None, [[m.defs]], newest=True)
        size = ro.size if ro is not None else 0
        return lambda _obj: start.seed_rtld(_symbol_in(m), size, self._tls.state)

    def _start_libc(self, new: list[_Member]) -> None:
        """Where code runs (not the host), the rest of ld.so's start-up for a libc loaded at
        startup: the main thread in libc's eyes, then ``__libc_early_init``."""
        libc = next((m for m in new if m.name == SMALLEST_PROGRAM_NEEDS), None)
        rtld = next((m for m in new if _is_rtld(m)), None)
        thread = self._tls.thread
        if self.rtld_start is None or libc is None or rtld is None or thread is None:
            return
        glob = lookup(b"_rtld_global", None, [[rtld.defs]], newest=True)
        self.rtld_start.start_thread(_symbol_in(libc), _symbol_in(rtld),
                                     glob.size if glob is not None else 0, thread.tp)
        self.rtld_start.early_init(_symbol_in(libc))

    def _register_eh_frames(self, new: list[_Member]) -> None:
        """On the host, each new object's .eh_frame is registered with libgcc (after
        relocation, before init: an initialiser may throw and catch), so exceptions unwind
        through code glibc does not know of (``loader.ehframe``)."""
        if not self.host:
            return
        for m in new:
            finder = _ScopeFinder(m.scope)
            if finder.scope("__register_frame", None) is None:
                continue        # no unwinder in this process or the image: nothing unwinds
            with _about(m.found, self._members):
                self._eh_frames[m.name] = register_eh_frame(m.loaded, finder)

    def _make_lazy(self, m: _Member, obj: LoadedObject) -> None:
        """Put ``m`` in the lazy state before RELRO is sealed (GNU ld puts GOT[0..2] inside
        it): every JUMP_SLOT its PLT address, GOT[1] what names the object (its GOT's own
        address: unique while it is loaded, as glibc's link_map pointer), GOT[2] the lazy
        resolver: on the host the native trampoline that calls back into ``_lazy_lookup``,
        on the simulator an int3 page (nothing runs there yet)."""
        got = lazy_got(obj.image, obj.tables, obj.load_bias)
        if not got.got:
            return
        if self.host:
            if self._binder is None:
                self._binder = HostLazyBinder(self.mm)
            self._binder.attach(got, obj.tables, functools.partial(self._lazy_lookup, m))
        else:
            make_lazy(self.mm, got, got.got, self._lazy_resolver())
        m.lazy_got, m.lazy_info = got.got, got
        m.lazy_values = dict(zip((got.slot - np.uint64(obj.load_bias & MASK64)).tolist(),
                                 got.lazy_value.tolist(), strict=True))

    @property
    def lazy_resolver_address(self) -> int | None:
        """Where GOT[2] of a lazy object points on a backend that is not this process (the
        int3 page a simulated CPU turns into a call of ``lazy_resolve``); None until one."""
        return None if self._lazy_stub is None else self._lazy_stub[0]

    def lazy_resolve(self, got1: int, index: int) -> int:
        """What GOT[2]'s resolver does at a lazy slot's first call: bind slot ``index`` (its
        position in DT_JMPREL) of the object whose GOT[1] is ``got1``, write the slot, and
        return the target. ElfSymbolError when the object or the symbol is unknown."""
        m = next((x for x in self._members if x.lazy_got == got1 and x.lazy_info), None)
        if m is None or m.lazy_info is None:
            raise ElfSymbolError("GOT[1] of a lazy call", got1, "the GOT of a lazy object")
        want = slot_wanted(m.lazy_info, m.loaded.tables, index)
        target = self._lazy_lookup(m, want.name, want.version)
        if not target:
            shown = want.name + (f"@{want.version}" if want.version else "")
            raise ElfSymbolError(f"lazy symbol of {m.name}", shown, "defined in its scope")
        self.mm.write(want.slot, (target & MASK64).to_bytes(8, "little"))
        return target

    def _lazy_lookup(self, m: _Member, name: str, version: str | None) -> int | None:
        """What a lazy slot of ``m`` binds to at its first call (host): the symbol looked up
        over ``m``'s scope with the PLT class, an IFUNC's resolver run."""
        found = lookup(name.encode("utf-8", "surrogateescape"),
                       version.encode() if version else None, m.scope, plt=True)
        if found is None:
            return None
        if found.is_ifunc:
            return call_ifunc(found.address, self.runner)
        return found.address

    def _lazy_resolver(self) -> int:
        """The address GOT[2] holds: one read+exec page of int3 (a trap, until code runs on
        the simulator), mapped once per LinkMap."""
        if self._lazy_stub is None:
            page = self.mm.page_size
            addr = self.mm.mmap(None, page, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE,
                                MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS, 0, None).addr
            self.mm.write(addr, b"\xcc" * page)
            self.mm.mprotect(addr, page, ProtFlags.PROT_READ | ProtFlags.PROT_EXEC)
            self._lazy_stub = (addr, addr + page)
        return self._lazy_stub[0]

    def _init(self, order: list[_Member]) -> None:
        """Run (host) or record (elsewhere) each object's init functions, in ``order``; a
        program's DT_PREINIT_ARRAY is recorded first (its start-up code runs it)."""
        for m in order:
            m.init_called = True
            m.obj.run_init()
            self.init_order.append(m.name)

    # --- lookups --------------------------------------------------------------------------

    def dlsym(self, handle: ImageObject | None, name: str, version: str | None = None) -> int:
        """The address of ``name`` as dlsym/dlvsym finds it: in ``handle``'s search list (its
        closure, breadth-first), or the global scope for None (RTLD_DEFAULT). Unversioned, the
        default (newest) version wins. An IFUNC gives what its resolver chooses where code
        runs (the host, a ``vmsim.Process``), the resolver itself on the simulator alone.
        KeyError when nobody defines it."""
        if version is None:
            name, version = split_version(name)
        scope = [self._global_defs] if handle is None else \
            [[m.defs for m in self._member(handle).searchlist or [self._member(handle)]]]
        raw = version.encode() if version else None
        found = lookup(name.encode(), raw, scope, newest=raw is None)
        if found is None:
            raise KeyError(name if version is None else f"{name}@{version}")
        if found.is_ifunc and self.runs_code:
            return call_ifunc(found.address, self.runner)
        return found.address

    def scope_of(self, obj: ImageObject | None = None) -> list[str]:
        """The names of the objects a lookup from ``obj`` asks, in order, each once (None:
        the global scope, what dlsym(RTLD_DEFAULT) searches)."""
        scope = self._member(obj).scope if obj is not None else [self._global_defs]
        names: list[str] = []
        for search_list in scope:
            names += [d.obj.name for d in search_list if d.obj.name not in names]
        return names

    def why(self, symbol: str, obj: ImageObject | None = None) -> Why:
        """How ``symbol`` ("name" or "name@VERSION") is looked up from ``obj``'s scope
        (default: the program's, or the global scope): each object asked and what it said,
        the winner, and the later definitions it interposes."""
        name, version = split_version(symbol)
        scope = self._member(obj).scope if obj is not None else [self._global_defs]
        raw = version.encode() if version else None
        steps: list[LookupStep] = []
        found = lookup(name.encode(), raw, scope, steps=steps)
        others = all_definitions(name.encode(), raw, scope)
        interposed = tuple(d.obj.obj.name for d in others if found and d.obj is not found.obj)
        return Why(name, version, tuple(steps), found.obj.obj.name if found else None,
                   interposed)

    def bindings(self) -> list[Binding]:
        """One record per symbol relocation of every object, in link-map order (see
        ``Binding``); values read from memory now."""
        out: list[Binding] = []
        for m in self._members:
            out.extend(_bindings_of(m, self.runs_code))
        return out

    # --- closing --------------------------------------------------------------------------

    def dlclose(self, handle: ImageObject) -> None:
        """Drop one dlopen of ``handle``; objects no open handle and no startup object needs
        any more are finalised (fini recorded, or run on the host) and unmapped."""
        m = self._member(handle)
        if m.opens <= 0:
            raise ValueError(f"{handle!r} is not open (dlclose without dlopen)")
        m.opens -= 1
        keep = _reachable([x for x in self._members if x.startup or x.opens > 0])
        gone = [x for x in _dfs_sort(self._members) if x not in keep]
        self._finalise(gone)

    def unload(self) -> None:
        """Finalise every object (fini in glibc's exit order) and unmap the whole image."""
        for m in self._members:
            m.startup = False           # an unload takes everything, startup objects too
        self._finalise(_dfs_sort(self._members))
        self._tls.close()
        if self._lazy_stub is not None:
            self.mm.munmap(self._lazy_stub[0], self._lazy_stub[1] - self._lazy_stub[0])
            self._lazy_stub = None
        if self._binder is not None:
            self._binder.close()
            self._binder = None
        self._global.clear()
        self._global_defs.clear()

    def _finalise(self, order: list[_Member]) -> None:
        """Fini (recorded, or run) for each object of ``order`` whose init was called, then
        unmap them all."""
        try:
            for m in order:
                if m.init_called:
                    self.fini_order.append(m.name)
        finally:
            self._drop(order)

    def _drop(self, members: list[_Member]) -> None:
        """Unmap ``members`` (``unload``: fini where it runs) and forget them."""
        for m in members:
            if self._binder is not None and m.lazy_got:
                self._binder.detach(m.lazy_got)
            frame = self._eh_frames.pop(m.name, None)
            if frame is not None:
                frame.deregister()
            try:
                m.obj.unload(fini=m.init_called)
            finally:
                if m in self._members:
                    self._members.remove(m)
                if m in self._global:
                    self._global.remove(m)
                    self._global_defs.remove(m.defs)
        self._tls.drop(members)
        gone = {id(m.defs) for m in members if "defs" in m.__dict__}
        self._unique = {k: d for k, d in self._unique.items() if id(d.obj) not in gone}


class _ImageTls:
    """The TLS of a process image (``loader.tls`` on the simulator, ``loader.hosttls`` for
    our objects on the host): module ids, static offsets, the main thread's area."""

    def __init__(self, mm: TracingMmap, host: bool) -> None:
        self.mm, self.host_side = mm, host
        self.state = TlsState()
        self.host: HostTls | None = None
        self.host_layouts: dict[str, TlsLayout] = {}
        self.host_rows: dict[str, dict[str, object]] = {}
        self.thread: ThreadArea | None = None

    def table(self) -> list[dict[str, object]]:
        """``LinkMap.tls``: one row per module (the host's modules are ours only)."""
        if self.host_side:
            return list(self.host_rows.values())
        return self.state.table()

    def layout(self, name: str) -> TlsLayout | None:
        """The TLS module of our object ``name`` (the host's, or the simulated process's)."""
        if self.host_side:
            return self.host_layouts.get(name)
        return self.state.layout(name)

    def of(self, defs: Definitions) -> TlsLayout | None:
        """The TLS module of the object behind ``defs`` (a resident's: as glibc set it)."""
        if isinstance(defs.obj, Resident):
            return defs.obj.tls_layout()
        return self.layout(defs.obj.name)

    def overrides(self) -> dict[bytes, int]:
        """Symbols our objects bind to something else than the scope's definition: on the
        host with TLS of ours, ``__tls_get_addr`` is ``loader.hosttls``'s (which hands
        glibc's module ids on to glibc's own)."""
        return {} if self.host is None else {b"__tls_get_addr": self.host.tls_get_addr}

    def assign(self, new: list[_Member], relocation_order: list[_Member], startup: bool,
               members: list[_Member]) -> None:
        """Module ids and static offsets (``loader.tls``): startup objects in static TLS;
        a dlopen's objects dynamic, except the modules its TPOFF64 (must) and TLSDESC
        (may, within the optional surplus) relocations reach, asked for in relocation
        order, as glibc's relocation does. On the host: ``assign_host``."""
        if self.host_side:
            self.assign_host(new, members)
            return
        objects = [TlsObject(m.name, m.loaded.image.tls, m.obj.load_bias) for m in new]
        if startup:
            self.state.add_startup(objects)
        else:
            static = [want for m in relocation_order for want in _static_wants(m)]
            self.state.add_dlopen(objects, static=list(dict.fromkeys(static)))

    def assign_host(self, new: list[_Member], members: list[_Member]) -> None:
        """On the host, each new object with TLS is a module of ``loader.hosttls`` (ids glibc
        never uses, dynamic TLS, our ``__tls_get_addr`` and descriptor function); an
        initial-exec access to it is refused by name (glibc's static TLS is not ours)."""
        for m in new:
            tls = m.loaded.image.tls
            if tls is None or tls.p_memsz == 0:
                continue
            with _about(m.found, members):
                check_no_initial_exec(m.loaded.tables, m.name)
            if self.host is None:
                self.host = HostTls(self.mm)
            layout = self.host.add_module(m.loaded.image, m.obj.load_bias,
                                          tables=m.loaded.tables)
            self.host_layouts[m.name] = layout
            self.host_rows[m.name] = {"name": m.name, "module_id": layout.module_id,
                                      "size": tls.p_memsz, "align": max(tls.p_align, 1),
                                      "static_offset": "dynamic"}

    def initialise(self, new: list[_Member], startup: bool) -> None:
        """On the simulator: after startup relocation, the main thread's area (static blocks
        from their init images, TCB, DTV: ``loader.tls.build_thread_area``); after a
        dlopen, the static blocks it was given are initialised in that area, as glibc's
        _dl_init_static_tls does in every thread."""
        if self.host_side:
            return
        if startup:
            self.thread = build_thread_area(self.mm, self.state)
            return
        for m in new:
            mod, tls = self.state.layout(m.name), m.loaded.image.tls
            if self.thread is None or mod is None or mod.tp_offset is None or tls is None:
                continue
            image = self.mm.read(tls.p_vaddr + m.obj.load_bias, tls.p_filesz)
            self.mm.write(self.thread.tp - mod.tp_offset,
                          bytes(image) + bytes(tls.p_memsz - tls.p_filesz))

    def drop(self, members: list[_Member]) -> None:
        """Forget the modules of ``members`` (a dlclose, or a failed load undone)."""
        for m in members:
            self.host_rows.pop(m.name, None)
            layout = self.host_layouts.pop(m.name, None)
            if layout is not None and self.host is not None:
                self.host.remove_module(layout.module_id)
        kept = {mod.name for mod in self.state.modules if mod.startup}
        self.state.remove([m.name for m in members if m.name not in kept])

    def reset(self) -> None:
        """A failed startup: no module is left."""
        self.state = TlsState()

    def close(self) -> None:
        """``unload``: the thread area unmapped, the host's code and blocks freed."""
        self.reset()
        if self.thread is not None:
            self.thread.close()
            self.thread = None
        if self.host is not None:
            self.host.close()
            self.host = None
        self.host_layouts.clear()
        self.host_rows.clear()


def _static_wants(m: _Member) -> list[tuple[str, bool]]:
    """(module, optional) for each TLS module ``m``'s TPOFF64 (optional False) and TLSDESC
    (True) relocations reach: symbol 0 is ``m`` itself, others are looked up over its
    scope."""
    out: list[tuple[str, bool]] = []
    obj = m.loaded
    if obj.classified is None:
        return out
    for table, kinds in zip(obj.tables.relocs, obj.classified.kinds_all, strict=True):
        desc = is_kind(kinds, Kind.TLS_DESC)
        for k in np.flatnonzero(desc | is_kind(kinds, Kind.TLS_TPOFF)).tolist():
            target = _tls_target(m, int(table.r_sym[k]))
            if target is not None:
                out.append((target, bool(desc[k])))
    return out


def _tls_target(m: _Member, sym: int) -> str | None:
    """The name of the object whose TLS symbol ``sym`` of ``m`` reaches (None: none)."""
    if sym == 0:
        return m.name
    name, version = symbol_label(m.obj.tables, sym)
    found = lookup(name.encode("utf-8", "surrogateescape"),
                   version.encode() if version else None, m.scope, plt=True)
    return found.obj.obj.name if found is not None else None


class _ScopeFinder(HostResolver):
    """A name looked up over a member's scope first, then this process's global scope
    (dlsym): where ``loader.ehframe`` finds libgcc's ``__register_frame``."""

    def __init__(self, scope: Scope) -> None:
        super().__init__()
        self.search_lists = scope

    def scope(self, name: str, version: str | None) -> int | None:
        found = lookup(name.encode(), version.encode() if version else None,
                       self.search_lists)
        return found.address if found is not None else super().scope(name, version)


def _may_be_lazy(obj: LoadedObject) -> bool:
    """Whether ``obj`` binds its JUMP_SLOTs lazily under RTLD_LAZY: it has a DT_JMPREL and
    no DT_BIND_NOW, DF_BIND_NOW or DF_1_NOW (``loader.lazy.binds_now``)."""
    return DT.JMPREL in obj.tables.tags and not binds_now(obj.tables)


def _symbol_in(m: _Member) -> Callable[[str], int | None]:
    """The address of a name ``m`` itself defines (default version), or None."""
    def symbol(name: str) -> int | None:
        found = lookup(name.encode(), None, [[m.defs]], newest=True)
        return found.address if found is not None else None
    return symbol


def _is_rtld(m: _Member) -> bool:
    """``m`` is ld.so, which glibc always relocates "now" (rtld.c: its own map is relocated
    with lazy 0; its .got.plt lies inside its RELRO)."""
    return m.name == os.path.basename(RTLD)


def _deps(m: _Member, by_name: dict[str, _Member]) -> list[_Member]:
    """``m``'s direct dependencies in DT_NEEDED order, each once (l_initfini)."""
    info = m.found.info
    needed = info.needed if info is not None else ()
    return _unique([by_name[n] for n in needed if n in by_name and by_name[n] is not m])


def _unique(members: list[_Member]) -> list[_Member]:
    """``members`` without repeats, first occurrence kept."""
    out: list[_Member] = []
    for m in members:
        if m not in out:
            out.append(m)
    return out


def _closure_of(root: _Member) -> list[_Member]:
    """``root``'s search list: it and its dependencies, breadth-first, each once."""
    out = [root]
    at = 0
    while at < len(out):
        out.extend(d for d in out[at].deps if d not in out)
        at += 1
    return out


def _reachable(roots: list[_Member]) -> set[_Member]:
    """Every member reachable from ``roots`` through dependencies."""
    seen: set[_Member] = set()
    stack = list(roots)
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(m.deps)
    return seen


def _dfs_sort(maps: list[_Member]) -> list[_Member]:
    """glibc's _dl_sort_maps_dfs: from the last map to the first, a depth-first walk over
    each object's dependencies (in DT_NEEDED order) places an object after it has placed
    all it reaches, filling the result from its end: a reverse post-order, so every object
    comes before its dependencies (cycles broken where the walk first closes them). The
    program is never reached through a dependency."""
    inside = set(maps)
    visited: set[_Member] = set()
    placed: list[_Member] = []

    def walk(m: _Member) -> None:
        visited.add(m)
        for dep in m.deps:
            if dep not in visited and dep in inside and not dep.obj.is_program:
                walk(dep)
        placed.append(m)

    for m in reversed(maps):
        if m not in visited:
            walk(m)
    return placed[::-1]


def _chain(m: _Member | Found, members: list[_Member]) -> str:
    """Who needed ``m``: its path, the object whose DT_NEEDED loaded it, and so up."""
    found = m.found if isinstance(m, _Member) else m
    by_path = {x.found.path: x for x in members}
    chain = [found.path or found.name]
    at = found.needed_by
    while at is not None and at not in chain and len(chain) < len(members) + 1:
        chain.append(at)
        up = by_path.get(at)
        at = up.found.needed_by if up is not None else None
    return " <- ".join(str(c) for c in chain)


@contextlib.contextmanager
def _about(found: Found, members: list[_Member]) -> Iterator[None]:
    """Name the object and the chain that needed it in any ElfError raised inside (the
    same kind of error, its field prefixed), unless the message names the file already; an
    MmapError keeps its errno and gets a note naming them."""
    try:
        yield
    except ElfError as exc:
        if found.path is not None and found.path in str(exc):
            raise
        raise type(exc)(f"{_chain(found, members)}: {exc.field}", exc.value,
                        exc.limit) from exc
    except MmapError as exc:    # the backend's refusal (its errno kept): say whose load it was
        exc.add_note(f"while loading {_chain(found, members)}")
        raise


def _classes(m: _Member) -> Classes:
    """How each symbol of ``m`` is looked up (``Classes``) from its relocations' types."""
    tables, classified = m.obj.tables, m.obj.classified
    n = max(tables.nsyms, 1)
    any_plt, any_other = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    copy, lazy_ok = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if classified is None:
        return Classes(any_plt, copy, lazy_ok)
    for table, kinds in zip(tables.relocs, classified.kinds_all, strict=True):
        slot = table.r_type == int(R_X86_64.JUMP_SLOT)
        plt = slot | is_kind(kinds, *_PLT_KINDS)
        any_plt[table.r_sym[plt]] = True
        any_other[table.r_sym[~plt]] = True
        copy[table.r_sym[table.r_type == int(R_X86_64.COPY)]] = True
        lazy_ok[table.r_sym[slot]] = True
    lazy = lazy_ok & ~any_other if m.lazy else np.zeros(n, dtype=bool)
    return Classes(any_plt & ~any_other, copy, lazy)


def _bindings_of(m: _Member, runs: bool) -> list[Binding]:
    """``Binding`` records of one object (see ``LinkMap.bindings``)."""
    obj, resolver = m.obj, m.resolver
    if resolver is None or obj.classified is None:
        return []
    tables = obj.tables
    out: list[Binding] = []
    for table, kinds in zip(tables.relocs, obj.classified.kinds_all, strict=True):
        symbolic = (table.r_sym != 0) & ~is_kind(kinds, Kind.RELATIVE, Kind.NONE)
        for k in np.flatnonzero(symbolic).tolist():
            out.append(_binding(m, int(table.r_offset[k]), int(table.r_type[k]),
                                int(table.r_sym[k]), runs))
    return out


def _binding(m: _Member, r_offset: int, r_type: int, sym: int, runs: bool) -> Binding:
    """One ``Binding``: the word now in memory, what the symbol bound to, pending or not."""
    obj = m.loaded
    assert m.resolver is not None
    name, version = symbol_label(obj.tables, sym)
    found = m.resolver.found.get(sym)
    value = int.from_bytes(obj.mm.read(r_offset + obj.load_bias, 8), "little") & MASK64
    lazy_slot = m.lazy and r_type == int(R_X86_64.JUMP_SLOT) and \
        value == m.lazy_values.get(r_offset)
    pending = lazy_slot or (found is not None and found.is_ifunc and not runs)
    target = found.obj.obj.name if found is not None else \
        HOOKED if sym in m.resolver.hooked else None
    return Binding(obj.name, r_offset, type_name(r_type), name, version, target, value,
                   pending)
