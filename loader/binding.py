"""Binding one object of a process image: its references looked up over its scope.

Part of the ``loader`` layer (imports ``loader.scope``, ``loader.symbols``, ``loader.tls``
through a callable). ``ScopeResolver`` is the ``Resolver`` a ``LinkMap`` gives the
relocation pass of each object: every symbol a relocation references is looked up as glibc
does (``loader.scope``: the reference decides first, then the objects of the scope in
order), and what each symbol bound to is kept (``found``) for ``LinkMap.bindings``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress

import numpy as np
import numpy.typing as npt

from loader.elfdefs import MASK64, SHN, STB, STT, st_bind, st_type, versym_index
from loader.mmap import Mmap
from loader.reloc import TlsLayout
from loader.scope import (
    STV_DEFAULT,
    STV_HIDDEN,
    STV_INTERNAL,
    STV_PROTECTED,
    Definition,
    Definitions,
    Scope,
    ScopeIndex,
    visibility,
)
from loader.symbols import Finder, Resolution, Resolver, TlsDefinitions, names_of
from loader.tables import DynamicTables

__all__ = ["Classes", "ScopeResolver"]

TlsOf = Callable[[Definitions], "TlsLayout | None"]
"""The TLS module a process image gave an object (None: the object has no PT_TLS)."""


@dataclass(frozen=True, slots=True)
class Classes:
    """Per symbol of the referencing object, how its relocations look it up: ``plt`` (every
    reference is of the PLT class: JUMP_SLOT and the TLS kinds), ``copy`` (a COPY: the
    program is skipped), ``lazy`` (only lazy JUMP_SLOTs reference it: not binding it yet is
    no error)."""

    plt: npt.NDArray[np.bool_]
    copy: npt.NDArray[np.bool_]
    lazy: npt.NDArray[np.bool_]


@dataclass
class _Bound:
    """What ``resolve`` fills, per symbol of the referencing object."""

    n: int
    addr: npt.NDArray[np.uint64] = field(init=False)
    bound: npt.NDArray[np.bool_] = field(init=False)
    ifunc: npt.NDArray[np.bool_] = field(init=False)
    sizes: npt.NDArray[np.uint64] = field(init=False)
    tls: TlsDefinitions = field(init=False)

    def __post_init__(self) -> None:
        self.addr = np.zeros(self.n, dtype=np.uint64)
        self.bound = np.zeros(self.n, dtype=bool)
        self.ifunc = np.zeros(self.n, dtype=bool)
        self.sizes = np.zeros(self.n, dtype=np.uint64)
        self.tls = TlsDefinitions(np.zeros(self.n, dtype=np.uint64),
                                  np.full(self.n, -1, dtype=np.int64),
                                  np.zeros(self.n, dtype=np.uint64))


def _versions_of(tables: DynamicTables, idx: npt.NDArray[np.int64]) -> list[bytes | None]:
    """The version each symbol of ``idx`` references (None: unversioned)."""
    if tables.versym is None:
        return [None] * len(idx)
    versions = {k: v.encode("utf-8", "surrogateescape") for k, v in tables.versions.items()}
    return [versions.get(v) if v > 1 else None
            for v in versym_index(tables.versym[idx]).tolist()]


class ScopeResolver(Resolver):
    """Bind ``me``'s references over ``scope`` (module docstring). ``tls_of`` gives the TLS
    module of a defining object; ``classes`` says how each symbol is looked up; ``real``
    that the bindings are real code (the backend runs code: init functions may run); the
    keyword arguments are explained where they are kept. After ``resolve``, ``found`` maps
    each bound symbol index to its Definition (absent: weak undefined, a hooked symbol, or
    a lazy slot nobody defines)."""

    def __init__(self, me: Definitions, scope: Scope, tls_of: TlsOf, classes: Classes,
                 *, real: bool, index: ScopeIndex | None = None,
                 overrides: dict[bytes, int] | None = None,
                 hooks: Resolver | None = None,
                 unique: dict[bytes, Definition] | None = None) -> None:
        super().__init__(hooks.pre_find if hooks else (), hooks.post_find if hooks else ())
        self.me, self.tls_of, self.classes = me, tls_of, classes
        self.real = real
        self._hits: dict[int, Definition] = {}
        """What the symbols looked up one by one bound to."""
        self._settled_hits: list[tuple[Definitions, npt.NDArray[np.int64],
                                       npt.NDArray[np.int64]]] = []
        """Those bound in bulk: (defining object, our symbols, its symbols)."""
        self._found: dict[int, Definition] | None = None
        self.hooked: dict[int, int] = {}
        """Symbols a user's hook bound (``pre_find`` before the scope, ``post_find`` after
        it found nothing), and to what."""
        self.index = ScopeIndex(scope) if index is None else index
        """The scope ready for lookups (objects loaded together share it, and its answers)."""
        self.unique = {} if unique is None else unique
        """The process's STB_GNU_UNIQUE definitions by name: the first one bound wins for
        every later reference (glibc's unique symbol table)."""
        self.overrides = overrides or {}
        """Names bound to a given address instead of the scope's definition (on the host,
        ``__tls_get_addr`` when objects of ours have TLS: ``loader.hosttls``)."""

    @property
    def found(self) -> dict[int, Definition]:
        """Each bound symbol index -> its Definition (built on first use: most loads never
        ask)."""
        if self._found is None:
            self._found = {}
            for defs, mine, theirs in self._settled_hits:
                self._found.update(zip(mine.tolist(), [Definition(defs, i)
                                                       for i in theirs.tolist()], strict=True))
            self._found.update(self._hits)
        return self._found

    def _one(self, i: int, name: bytes, version: bytes | None, plt: bool, copy: bool
             ) -> Definition | None:
        """What symbol ``i`` of ``me`` binds to (None: nobody defines it); ``plt``, ``copy``:
        its ``classes``."""
        me = self.me
        defined = me.shndx[i] != SHN.UNDEF
        seen_as = visibility(me.other[i])
        if st_bind(me.info[i]) == STB.LOCAL or seen_as in (STV_HIDDEN, STV_INTERNAL):
            return Definition(me, i) if defined else None
        found = self.index.lookup(name, version, plt=plt, copy=copy)
        if defined and seen_as == STV_PROTECTED and found is not None and found.obj is not me:
            again = found if plt else self.index.lookup(name, version, plt=True, copy=copy)
            if again is not None and again.obj is not self.me:
                return Definition(self.me, i)
        if found is not None and st_bind(found.obj.info[found.index]) == STB.GNU_UNIQUE:
            return self.unique.setdefault(name, found)
        return found

    def resolve(self, tables: DynamicTables, needed: npt.NDArray[np.int64], bias: int,
                mm: Mmap, near: int,
                not_self: npt.NDArray[np.int64] | None = None) -> Resolution:
        """Look every symbol of ``needed`` up; weak undefined ones bind to 0, lazy-only ones
        stay unbound, the rest are listed unresolved. The references the scope settles at
        once (``ScopeIndex.settled``) are bound in bulk, the others one by one."""
        out = _Bound(tables.nsyms)
        names = names_of(tables, needed)
        versions = _versions_of(tables, needed)
        where, symbol = self.index.settled(names, versions, self._plain(needed, names))
        settled = where >= 0
        for at in np.unique(where[settled]).tolist():
            here = where == at
            self._settled_hits.append((self.index.objects[at], needed[here], symbol[here]))
            self._bind_to(out, *self._settled_hits[-1])
        rest = (~settled).tolist()
        hits, unresolved = self._each(out, needed[~settled], list(compress(names, rest)),
                                      list(compress(versions, rest)))
        self._bind(out, hits)
        return Resolution(out.addr, out.bound, unresolved, ifunc=out.ifunc, tls=out.tls,
                          sizes=out.sizes)

    def _plain(self, needed: npt.NDArray[np.int64], names: list[bytes]
               ) -> npt.NDArray[np.bool_]:
        """The symbols of ``needed`` that bind to what the scope finds and nothing else:
        not bound locally, not protected (``_one`` decides those), not a COPY's, not a name
        a user's hook or an override may take."""
        if self.pre_find:
            return np.zeros(len(needed), dtype=bool)
        syms = self.me.obj.tables.symtab[needed]
        plain: npt.NDArray[np.bool_] = (st_bind(syms["st_info"]) != int(STB.LOCAL)) & \
            ((syms["st_other"] & 3) == STV_DEFAULT) & \
            ~self.classes.copy[needed]
        if self.overrides:
            plain &= np.array([name not in self.overrides for name in names], dtype=bool)
        return plain

    def _each(self, out: _Bound, needed: npt.NDArray[np.int64], names: list[bytes],
              versions: list[bytes | None]) -> tuple[dict[int, Definition], list[str]]:
        """Look the symbols of ``needed`` up one by one (overrides, hooks, ``_one``): what
        each bound to, and the labels of those nobody defines."""
        unresolved: list[str] = []
        hits: dict[int, Definition] = {}
        weak = (st_bind(self.me.obj.tables.symtab["st_info"][needed]) == int(STB.WEAK)).tolist()
        plt, copy = self.classes.plt[needed].tolist(), self.classes.copy[needed].tolist()
        for i, name, version, is_weak, is_plt, is_copy in zip(
                needed.tolist(), names, versions, weak, plt, copy, strict=True):
            if name in self.overrides:
                out.addr[i], out.bound[i] = self.overrides[name], True
                continue
            hooked = self._ask(self.pre_find, name, version)
            found = self._one(i, name, version, is_plt, is_copy) if hooked is None else None
            if hooked is None and found is None:
                hooked = self._ask(self.post_find, name, version)
            if hooked is not None:
                out.addr[i], out.bound[i] = hooked, True
                self.hooked[i] = hooked
            elif found is not None:
                hits[i] = found
            elif is_weak:
                out.bound[i] = True
            elif not self.classes.lazy[i]:
                label = name.decode("utf-8", "surrogateescape")
                unresolved.append(f"{label}@{version.decode()}" if version else label)
        return hits, unresolved

    @staticmethod
    def _ask(hooks: list[Finder], name: bytes, version: bytes | None) -> int | None:
        """The first answer of the user's ``hooks`` (``LinkMap(resolver=...)``), or None."""
        if not hooks:
            return None
        text = name.decode("utf-8", "surrogateescape")
        wanted = version.decode("utf-8", "surrogateescape") if version else None
        for hook in hooks:
            found = hook(text, wanted)
            if found is not None:
                return found
        return None

    def _bind(self, out: _Bound, hits: dict[int, Definition]) -> None:
        """Record each symbol of ``hits`` bound to its definition: one gather per defining
        object (``_bind_to``)."""
        self._hits.update(hits)
        self._found = None
        groups: dict[int, tuple[Definitions, list[int], list[int]]] = {}
        for i, found in hits.items():
            group = groups.setdefault(id(found.obj), (found.obj, [], []))
            group[1].append(i)
            group[2].append(found.index)
        for defs, mine, theirs in groups.values():
            self._bind_to(out, defs, np.array(mine, dtype=np.int64),
                          np.array(theirs, dtype=np.int64))

    def _bind_to(self, out: _Bound, defs: Definitions, mine: npt.NDArray[np.int64],
                 theirs: npt.NDArray[np.int64]) -> None:
        """Symbols ``mine`` bound to symbols ``theirs`` of ``defs``: the address (load bias
        + st_value; for STT_TLS the offset in its module's block, and the module), IFUNC
        mark and size, as ``Definition`` gives them one by one."""
        syms = defs.obj.tables.symtab[theirs]
        kind = st_type(syms["st_info"])
        value = syms["st_value"].astype(np.uint64)
        tls = kind == int(STT.TLS)
        out.addr[mine] = np.where(tls, value, value + np.uint64(defs.obj.load_bias & MASK64))
        out.bound[mine] = True
        out.ifunc[mine] = kind == int(STT.GNU_IFUNC)
        out.sizes[mine] = syms["st_size"]
        layout = self.tls_of(defs) if tls.any() else None
        if layout is not None:
            out.tls.module[mine[tls]] = layout.module_id
            out.tls.offset[mine[tls]] = -1 if layout.tp_offset is None else layout.tp_offset
            out.tls.value[mine[tls]] = value[tls]
