"""Symbol lookup across a process image, as glibc 2.36's ld.so does it (elf/dl-lookup.c).

Part of the ``loader`` layer (imports ``loader.tables``, ``loader.symbols``,
``loader.elfdefs``). A *scope* is a list of search lists; each search list is a list of
objects (``Definitions``: an object's definitions by name). A reference is looked up in
every object of every list, in order, and the first object that defines it wins. Which
definition of an object counts (glibc's ``check_match``, then ``do_lookup_x``):

- the symbol must have a value (``st_value`` nonzero, or SHN_ABS, or STT_TLS), a type that
  defines something (NOTYPE, OBJECT, FUNC, COMMON, TLS, GNU_IFUNC) and the name asked for;
- an undefined symbol with a value (an executable's canonical PLT entry) defines a name for
  every reference except those of the PLT class (JUMP_SLOT and the TLS relocations);
- versions: a versioned reference takes the definition of that version, or one whose
  version index names no version (0, or 1 in an object with no DT_VERDEF) unless it is
  hidden. An unversioned reference takes a definition of index 0, 1 or 2 at once, else the
  one non-hidden versioned definition when the object has exactly one (``dlsym``, asking
  for the newest, takes index 2 and up the same way);
- the first definition that matches decides for the object: a hidden or internal one, or a
  local binding, sends the search on to the next object; a global, weak or unique one is
  the answer (weak is not weaker than global: glibc's default, LD_DYNAMIC_WEAK unset).

The reference itself decides first: a symbol bound locally (STB_LOCAL, STV_HIDDEN or
STV_INTERNAL) is the referencing object's own; a protected definition is the object's own
whenever the lookup finds another object's, except for data an executable copied
(the lookup with the PLT class finds the object itself).
COPY relocations look past the executable (the copy is not its own source).

Where ours differs: a symbol referenced by relocations of both classes is looked up once,
with the non-PLT class (they differ only for an executable's canonical PLT entry); a
reference version's "hidden" flag (never set by linkers for needs) is ignored.
STB_GNU_UNIQUE is looked up as global here; ``loader.binding`` then applies glibc's
process-wide table of them (the first definition bound wins everywhere).

Many lookups at once (a dlopen asks about ten thousand): ``ScopeIndex`` knows for each
name the first object of the scope that has it, so a lookup starts there instead of
asking every object before it, and most lookups end at once: when that object's only
candidate of the name is defined, global or weak, visible and of a version the reference
accepts (``Definitions.settled``, read off the symbol table in bulk), it is the answer
whatever the class; ``ScopeIndex.settled`` answers a whole object's references that way,
and only the others walk the scope one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import numpy as np
import numpy.typing as npt

from loader.elf import ElfImage
from loader.elfdefs import (
    MASK64,
    SHN,
    STB,
    STT,
    VERSYM_HIDDEN,
    VERSYM_VERSION,
    st_bind,
    st_type,
)
from loader.symbols import names_of
from loader.tables import DynamicTables

__all__ = ["Definition", "Definitions", "LookupStep", "Scope", "ScopeIndex", "ScopeObject",
           "lookup", "visibility"]

STV_DEFAULT, STV_INTERNAL, STV_HIDDEN, STV_PROTECTED = 0, 1, 2, 3
_DECIDING_BINDS = frozenset((int(STB.GLOBAL), int(STB.WEAK), int(STB.GNU_UNIQUE)))
_SETTLING_BINDS = np.isin(np.arange(16), [int(STB.GLOBAL), int(STB.WEAK)])
"""Per st_bind (4 bits): a binding that settles a lookup by itself (``_settled``)."""
_ALLOWED_TYPES = np.isin(np.arange(16), [int(t) for t in (
    STT.NOTYPE, STT.OBJECT, STT.FUNC, STT.COMMON, STT.TLS, STT.GNU_IFUNC)])
"""Per st_type (4 bits): a type that defines something (``check_match``)."""


def visibility(st_other: int) -> int:
    """The STV_* visibility of a symbol's ``st_other``."""
    return st_other & 3


class ScopeObject(Protocol):
    """What a lookup needs of a loaded object: its name, tables, headers and load bias, and
    whether it is the program (COPY relocations look past it)."""

    @property
    def name(self) -> str: ...

    @property
    def tables(self) -> DynamicTables: ...

    @property
    def image(self) -> ElfImage: ...

    @property
    def load_bias(self) -> int: ...

    @property
    def is_program(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Definition:
    """Where a lookup ended: ``obj`` defines the symbol as its symbol ``index``."""

    obj: Definitions
    index: int

    @property
    def address(self) -> int:
        """Load bias + st_value (for STT_TLS: the offset in its module's block)."""
        cols, i = self.obj, self.index
        if cols.info[i] & 0xF == STT.TLS:
            return cols.value[i]
        return (cols.value[i] + self.obj.obj.load_bias) & MASK64

    @property
    def is_ifunc(self) -> bool:
        """The definition is an STT_GNU_IFUNC: its value is a resolver to run."""
        return self.obj.info[self.index] & 0xF == STT.GNU_IFUNC

    @property
    def is_tls(self) -> bool:
        """The definition is an STT_TLS: its value is an offset in its module's block."""
        return self.obj.info[self.index] & 0xF == STT.TLS

    @property
    def size(self) -> int:
        """The definition's st_size."""
        return self.obj.size[self.index]


@dataclass(frozen=True, slots=True)
class LookupStep:
    """One object a lookup asked (``why``): its name and what it said."""

    obj: str
    said: str


Scope = Sequence[Sequence["Definitions"]]
"""Search lists in order (glibc's l_scope): the global scope first, then a local one."""


class Definitions:
    """One object's candidate definitions by name: every dynamic symbol with a value and a
    defining type (``check_match``'s first tests), found by a dict, in symbol order (the
    order of a GNU hash chain for one name)."""

    def __init__(self, obj: ScopeObject) -> None:
        self.obj = obj
        tables = obj.tables
        syms = tables.symtab
        kind = st_type(syms["st_info"])
        valued = (syms["st_value"] != 0) | (syms["st_shndx"] == int(SHN.ABS)) | \
            (kind == int(STT.TLS))
        keep = _ALLOWED_TYPES[kind] & valued
        if len(keep):
            keep[0] = False
        order = np.flatnonzero(keep).astype(np.int64)
        names, idx = names_of(tables, order), order.tolist()
        self.by_name: dict[bytes, int] = dict(zip(reversed(names), reversed(idx), strict=True))
        """Each name's first candidate (built backwards: the first one is written last)."""
        self.more: dict[bytes, list[int]] = {}
        """Every candidate of each name that has more than one, in symbol order."""
        if len(self.by_name) < len(idx):
            for i, name in zip(idx, names, strict=True):
                if self.by_name[name] != i:
                    self.more.setdefault(name, [self.by_name[name]]).append(i)
        self.versions = {k: v.encode("utf-8", "surrogateescape")
                         for k, v in tables.versions.items()}
        self.versym: list[int] | None = None if tables.versym is None else \
            tables.versym.tolist()
        # the columns a lookup reads, as lists: one element of a structured array costs a
        # microsecond, of a list a few nanoseconds
        self.info: list[int] = syms["st_info"].tolist()
        self.other: list[int] = syms["st_other"].tolist()
        self.shndx: list[int] = syms["st_shndx"].tolist()
        self.value: list[int] = syms["st_value"].tolist()
        self.size: list[int] = syms["st_size"].tolist()
        self.settled = self._settled(order)
        """Per symbol: it alone answers every lookup of its name (but a COPY's) of some
        versions (``settles``)."""

    def _settled(self, order: npt.NDArray[np.int64]) -> list[bool]:
        """``match`` and ``_decides`` read off in bulk for the common case: the candidates
        ``order`` that are their name's only one, defined (the PLT class does not skip
        them), global or weak (not unique: its binding has more to it) and not hidden, their
        version not hidden. Such a symbol is the answer to an unversioned reference and to
        one of its version (of any version when its index names none), and to no other
        (``match``: an unversioned reference takes a lone non-hidden versioned definition)."""
        tables = self.obj.tables
        syms = tables.symtab
        seen_as = syms["st_other"] & 3
        ok = (syms["st_shndx"] != int(SHN.UNDEF)) & (seen_as != STV_HIDDEN) & \
            (seen_as != STV_INTERNAL) & _SETTLING_BINDS[st_bind(syms["st_info"])]
        if tables.versym is not None:
            ok &= (tables.versym & VERSYM_HIDDEN) == 0
        lone = np.zeros(len(syms), dtype=bool)
        lone[order] = True
        lone[[i for many in self.more.values() for i in many]] = False
        settled: list[bool] = (ok & lone).tolist()
        return settled

    def settles(self, i: int, version: bytes | None) -> bool:
        """Candidate ``i`` is what every lookup of its name (but a COPY's) by a reference
        of ``version`` (None: unversioned) finds in this object (``_settled``)."""
        if not self.settled[i]:
            return False
        return version is None or self.versym is None or \
            self.versions.get(self.versym[i] & VERSYM_VERSION) in (None, version)

    def candidates(self, name: bytes) -> list[int]:
        """The symbols that may define ``name``, in symbol order (none: an empty list)."""
        first = self.by_name.get(name)
        return [] if first is None else self.more.get(name) or [first]

    def _version_ok(self, i: int, version: bytes | None, newest: bool,
                    seen: list[int]) -> bool:
        """``check_match``'s version test of symbol ``i``; a versioned definition an
        unversioned reference may take only if it is the object's one is added to
        ``seen`` (and not taken now)."""
        if self.versym is None:
            return True
        vs = self.versym[i]
        ndx = vs & VERSYM_VERSION
        if version is not None:
            defined = self.versions.get(ndx)
            return defined == version or (defined is None and not vs & VERSYM_HIDDEN)
        if ndx < (2 if newest else 3):
            return True
        if not vs & VERSYM_HIDDEN:
            seen.append(i)
        return False

    def match(self, name: bytes, version: bytes | None, *, plt: bool = False,
              newest: bool = False) -> int | None:
        """The symbol index that decides for this object (``do_lookup_x``), or None."""
        seen: list[int] = []
        for i in self.candidates(name):
            if plt and self.shndx[i] == SHN.UNDEF:
                continue
            if self._version_ok(i, version, newest, seen):
                return i
        return seen[0] if len(seen) == 1 else None

    def what(self, name: bytes, version: bytes | None) -> str:
        """What this object has of ``name`` in words (``why``'s account of a miss)."""
        found = self.candidates(name)
        if not found:
            return "does not define it"
        if self.versym is None:
            return "defines it"
        have = [self.versions.get(self.versym[i] & VERSYM_VERSION, "(none)") for i in found]
        shown = ", ".join(v.decode("utf-8", "surrogateescape") if isinstance(v, bytes)
                          else v for v in have)
        want = "(unversioned)" if version is None else version.decode()
        return f"has versions {shown}; wanted {want}"




def _decides(found: Definitions, i: int) -> bool:
    """The definition ``i`` ends the lookup (global, weak or unique, and not hidden)."""
    if visibility(found.other[i]) in (STV_INTERNAL, STV_HIDDEN):
        return False
    return st_bind(found.info[i]) in _DECIDING_BINDS


def _decision(found: Definitions, name: bytes, version: bytes | None, plt: bool, copy: bool
              ) -> int | None:
    """The symbol of ``found`` that ends a lookup of ``name`` (``lookup``'s question), or
    None: the search goes on to the next object."""
    if name not in found.by_name or (copy and found.obj.is_program):
        return None
    i = found.match(name, version, plt=plt)
    return i if i is not None and _decides(found, i) else None


class ScopeIndex:
    """A scope made ready for many lookups (every reference of the objects a dlopen
    relocates): its objects in search order, for each name the first of them that has a
    candidate definition of it (the objects before it cannot answer: ``lookup`` starts
    there), and the answers already given (``memo``: objects sharing the scope ask many
    questions alike). Built once the objects' tables are final; the scope must not change
    while it is used."""

    def __init__(self, scope: Scope) -> None:
        self.objects = [found for search_list in scope for found in search_list]
        self.first: dict[bytes, int] = {}
        for at in range(len(self.objects) - 1, -1, -1):     # the earliest object wins
            self.first.update(dict.fromkeys(self.objects[at].by_name, at))
        self.memo: dict[tuple[bytes, bytes | None, bool, bool], Definition | None] = {}

    def settled(self, names: list[bytes], versions: list[bytes | None],
                asked: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int64],
                                                       npt.NDArray[np.int64]]:
        """The answers to the ``asked`` questions (not a COPY's) that the first object
        with the name settles (``Definitions.settled``), in bulk: per question the
        object's position in ``objects`` and its symbol, both -1 where ``lookup`` must
        be asked (not asked, nobody has the name, or it is not settled)."""
        where = np.array([self.first.get(name, -1) if ask else -1
                          for name, ask in zip(names, asked.tolist(), strict=True)],
                         dtype=np.int64).reshape(-1)
        symbol = np.full(len(names), -1, dtype=np.int64)
        for at in np.unique(where[where >= 0]).tolist():
            mine = np.flatnonzero(where == at)
            obj = self.objects[at]
            first = [obj.by_name[names[k]] for k in mine.tolist()]
            symbol[mine] = [i if obj.settles(i, versions[k]) else -1
                            for i, k in zip(first, mine.tolist(), strict=True)]
        where[symbol < 0] = -1
        return where, symbol

    def lookup(self, name: bytes, version: bytes | None, *, plt: bool = False,
               copy: bool = False) -> Definition | None:
        """``lookup(name, version, scope, plt=plt, copy=copy)``, each question answered
        once."""
        start = self.first.get(name)
        if start is None:
            return None
        obj = self.objects[start]
        if not copy and obj.settles(obj.by_name[name], version):
            return Definition(obj, obj.by_name[name])
        key = (name, version, plt, copy)
        if key in self.memo:
            return self.memo[key]
        found: Definition | None = None
        for obj in islice(self.objects, start, None):
            decided = _decision(obj, name, version, plt, copy)
            if decided is not None:
                found = Definition(obj, decided)
                break
        self.memo[key] = found
        return found


def lookup(name: bytes, version: bytes | None, scope: Scope, *, plt: bool = False,
           copy: bool = False, newest: bool = False,
           steps: list[LookupStep] | None = None) -> Definition | None:
    """The first definition of ``name`` (``version``: the reference's, or None) over
    ``scope``, as ``_dl_lookup_symbol_x``; None when nobody defines it. ``plt``: a
    JUMP_SLOT or TLS relocation; ``copy``: a COPY (the program is skipped); ``newest``:
    dlsym's lookup. ``steps`` collects what each object asked said. An object in two
    search lists is asked twice, as glibc does (its answer is the same both times)."""
    asked: list[Definitions] = []
    for search_list in scope:
        for found in search_list:
            if steps is not None:           # ``why`` lists each object once
                if found in asked:
                    continue
                asked.append(found)
            if name not in found.by_name or (copy and found.obj.is_program):
                if steps is not None:
                    steps.append(LookupStep(found.obj.name, "skipped: the program (a COPY "
                                            "looks past it)" if copy and found.obj.is_program
                                            else "does not define it"))
                continue
            i = found.match(name, version, plt=plt, newest=newest)
            if i is not None and _decides(found, i):
                if steps is not None:
                    steps.append(LookupStep(found.obj.name, "defines it: the definition"))
                return Definition(found, i)
            if steps is not None:
                steps.append(LookupStep(found.obj.name, found.what(name, version)
                                        if i is None else "has it hidden or local"))
    return None


def all_definitions(name: bytes, version: bytes | None, scope: Scope
                    ) -> list[Definition]:
    """Every object of ``scope`` that would define ``name`` (what a winner interposes)."""
    out: list[Definition] = []
    for search_list in scope:
        for found in search_list:
            i = found.match(name, version)
            if i is not None and _decides(found, i) and \
                    all(d.obj is not found for d in out):
                out.append(Definition(found, i))
    return out
