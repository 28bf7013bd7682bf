"""Symbols: lookup through the GNU and SysV hash tables with versions, and the resolver chain.

Part of the ``loader`` layer (imports ``loader.tables``, ``loader.mmap``, ``loader.elf``,
``loader.errors``; ctypes for the host's dlsym). ``find`` answers "where does this object
define NAME[@VERSION]"; ``Resolver`` answers "what does each symbol this object references
bind to", in bulk, as numpy arrays.

The chain, in order, as ``elf_loader`` (and close to glibc):
1. ``pre_find`` hooks (callables ``(name, version) -> address | None``), for every symbol;
2. the resolver's scope (``HostResolver``: the running process through dlsym/dlvsym), for the
   symbols the object does not define itself;
3. the object's own definition (load bias + st_value);
4. ``post_find`` hooks, for what is still unbound;
5. weak undefined symbols bind to 0;
6. the resolver's fallback (``StubResolver``: an address in a labelled "extern" mapping).
What is left is reported as unresolved (and written as 0).

Deviation from glibc, deliberate and for speed: glibc would look every symbol up in the global
scope first (so another object could interpose on one this object defines); here the scope is
asked only for undefined symbols. A ``pre_find`` hook restores interposition where wanted.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.elf import USER_LIMIT
from loader.elfdefs import (
    MASK32,
    MASK64,
    SHN,
    STB,
    STT,
    VERSYM_HIDDEN,
    st_bind,
    st_type,
    versym_index,
)
from loader.errors import ElfSymbolError
from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.pages import page_round_up
from loader.tables import STUB_SLOT, DynamicTables, import_slot

__all__ = [
    "Finder",
    "HostResolver",
    "Resolver",
    "Resolution",
    "StubResolver",
    "TlsDefinitions",
    "find",
    "gnu_hash",
    "names_of",
    "split_version",
    "sysv_hash",
]

Finder = Callable[[str, "str | None"], "int | None"]
"""A resolver hook: ``(name, version or None) -> absolute address, or None to pass``."""

_EXPORTED = (STB.GLOBAL, STB.WEAK, STB.GNU_UNIQUE)

# numpy compares an array with an IntEnum member about five times slower than with a plain
# int (it inspects the member's type on every call): the comparisons over arrays use ints.
_SHN_UNDEF, _STB_WEAK, _STT_TLS = int(SHN.UNDEF), int(STB.WEAK), int(STT.TLS)


def gnu_hash(name: bytes) -> int:
    """The DT_GNU_HASH hash of ``name`` (Bernstein's h*33+c, 32 bits)."""
    h = 5381
    for c in name:
        h = (h * 33 + c) & MASK32
    return h


def sysv_hash(name: bytes) -> int:
    """The DT_HASH (SysV ABI) hash of ``name``."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & MASK32
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & MASK32
    return h


def split_version(query: str) -> tuple[str, str | None]:
    """``"memcpy@GLIBC_2.14"`` -> ``("memcpy", "GLIBC_2.14")``; ``"@@"`` works too."""
    name, _, version = query.replace("@@", "@").partition("@")
    return name, version or None


def _matches(tables: DynamicTables, i: int, name: bytes, version: str | None) -> bool:
    """Symbol ``i`` is an exported definition of ``name`` with ``version`` (or default)."""
    sym = tables.symtab[i]
    bind = st_bind(int(sym["st_info"]))
    if int(sym["st_shndx"]) == SHN.UNDEF or bind not in _EXPORTED:
        return False
    st_name = int(sym["st_name"])
    if tables.strtab[st_name: st_name + len(name) + 1] != name + b"\0":
        return False
    if tables.versym is None:
        return version is None
    vs = int(tables.versym[i])
    if version is None:
        return not vs & VERSYM_HIDDEN
    return tables.versions.get(versym_index(vs)) == version


def _find_gnu(tables: DynamicTables, name: bytes, version: str | None) -> int | None:
    """Symbol index through DT_GNU_HASH, or None."""
    gh = tables.gnu_hash
    assert gh is not None
    h = gnu_hash(name)
    i = int(gh.buckets[h % len(gh.buckets)])
    if i == 0:
        return None
    for _ in range(len(gh.chains)):
        j = i - gh.symoffset
        if not 0 <= j < len(gh.chains) or i >= tables.nsyms:
            return None
        ch = int(gh.chains[j])
        if (ch | 1) == (h | 1) and _matches(tables, i, name, version):
            return i
        if ch & 1:
            return None
        i += 1
    return None


def _find_sysv(tables: DynamicTables, name: bytes, version: str | None) -> int | None:
    """Symbol index through DT_HASH, or None."""
    sh = tables.sysv_hash
    assert sh is not None
    i = int(sh.buckets[sysv_hash(name) % len(sh.buckets)]) if len(sh.buckets) else 0
    for _ in range(len(sh.chains)):
        if i == 0 or i >= tables.nsyms:
            return None
        if _matches(tables, i, name, version):
            return i
        i = int(sh.chains[i])
    return None


def find(tables: DynamicTables, query: str) -> int | None:
    """The symbol index defining ``query`` ("name" or "name@VERSION"), through the GNU hash
    when present, else the SysV hash; None when the object does not export it."""
    name, version = split_version(query)
    raw = name.encode("utf-8", "surrogateescape")
    if tables.gnu_hash is not None:
        return _find_gnu(tables, raw, version)
    if tables.sysv_hash is not None:
        return _find_sysv(tables, raw, version)
    return None


@dataclass(slots=True)
class Resolution:
    """What each referenced symbol bound to: ``addr[i]`` for symbol index i where
    ``bound[i]``; ``via`` counts bindings per chain step; ``unresolved`` names the rest."""

    addr: npt.NDArray[np.uint64]
    bound: npt.NDArray[np.bool_]
    unresolved: list[str] = field(default_factory=list)
    extern: dict[str, int] = field(default_factory=dict)
    extern_range: tuple[int, int] | None = None
    tls_tpoff: dict[int, int] = field(default_factory=dict)
    ifunc: npt.NDArray[np.bool_] | None = None
    """Per symbol: bound to an STT_GNU_IFUNC (its value is a resolver to run). None: the
    relocation pass decides (the object's own IFUNCs bound to themselves)."""
    tls: TlsDefinitions | None = None
    sizes: npt.NDArray[np.uint64] | None = None
    """Per symbol: the definition's st_size (what a COPY copies at most), when known."""
    tls_module: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TlsDefinitions:
    """Per symbol, where a process image found its TLS definition: the module id, that
    module's static TLS offset (-1: the module is in dynamic TLS) and st_value in it."""

    module: npt.NDArray[np.uint64]
    offset: npt.NDArray[np.int64]
    value: npt.NDArray[np.uint64]


def names_of(tables: DynamicTables, idx: npt.NDArray[np.int64]) -> list[bytes]:
    """The raw names of symbols ``idx``: each NUL found with one searchsorted, not a scan."""
    starts = tables.symtab["st_name"][idx].astype(np.int64)
    nuls = tables.nuls
    ends = nuls[np.searchsorted(nuls, starts)]
    raw = tables.strtab
    return [raw[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _labels(tables: DynamicTables, idx: npt.NDArray[np.int64]
            ) -> dict[int, tuple[str, str | None]]:
    """(name, version) of every symbol of ``idx``, names cut in bulk (see ``names_of``)."""
    names = [n.decode("utf-8", "surrogateescape") for n in names_of(tables, idx)]
    if tables.versym is None:
        return dict(zip(idx.tolist(), [(n, None) for n in names], strict=True))
    vers = versym_index(tables.versym[idx]).tolist()
    get = tables.versions.get
    return {i: (n, get(v) if v > 1 else None)
            for i, n, v in zip(idx.tolist(), names, vers, strict=True)}


def symbol_label(tables: DynamicTables, i: int) -> tuple[str, str | None]:
    """(name, version) of symbol ``i`` as referenced (version None when unversioned)."""
    name = tables.name(int(tables.symtab[i]["st_name"]))
    if tables.versym is None:
        return name, None
    index = versym_index(int(tables.versym[i]))
    return name, tables.versions.get(index) if index > 1 else None


class Resolver:
    """The resolver chain (module docstring). Subclasses set the scope and the fallback.

    ``pre_find`` and ``post_find`` are plain lists of hooks; append to them. ``real`` says
    the bindings are real code, so init and fini functions may run (False for stubs).
    """

    real = True

    def __init__(self, pre_find: Iterable[Finder] = (), post_find: Iterable[Finder] = ()) -> None:
        self.pre_find: list[Finder] = list(pre_find)
        self.post_find: list[Finder] = list(post_find)

    def scope(self, name: str, version: str | None) -> int | None:
        """Where the scope outside the object defines the symbol, or None (default: none)."""
        return None

    def scope_tls(self, name: str, version: str | None) -> int | None:
        """The thread-pointer offset of a TLS variable defined outside the object (static
        TLS, as TPOFF64 needs), or None (default: none)."""
        return None

    def scope_tls_module(self, name: str, version: str | None) -> tuple[int, int] | None:
        """(module id, offset in its block) of a TLS variable defined outside the object,
        as DTPMOD64 and DTPOFF64 need, or None (default: none)."""
        return None

    def fallback(self, imports: list[tuple[str, str | None, int]], mm: Mmap,
                 near: int) -> tuple[dict[str, int], tuple[int, int] | None]:
        """Bind what is left: ``imports`` lists (name, version, st_size). Returns
        {label: address} and the range of any mapping made (default: binds nothing)."""
        return {}, None

    def resolve(self, tables: DynamicTables, needed: npt.NDArray[np.int64], bias: int,
                mm: Mmap, near: int,
                not_self: npt.NDArray[np.int64] | None = None) -> Resolution:
        """Run the chain over symbol indices ``needed`` (unique, nonzero). Symbols in
        ``not_self`` (the targets of COPY relocations, whose definition in the object is the
        copy itself) skip the object's own definition, as glibc's copy lookups do."""
        syms = tables.symtab
        addr = np.zeros(tables.nsyms, dtype=np.uint64)
        bound = np.zeros(tables.nsyms, dtype=bool)
        defined = syms["st_shndx"][needed] != _SHN_UNDEF
        if not_self is not None and len(not_self):
            defined &= ~np.isin(needed, not_self)
        undefined = needed[~defined]
        labels: dict[int, tuple[str, str | None]] = {}

        def label(i: int) -> tuple[str, str | None]:
            # decoded when first asked (the host's scope takes raw bytes: often never)
            if not labels and len(undefined):
                labels.update(_labels(tables, undefined))
            if i not in labels:
                labels[i] = symbol_label(tables, i)
            return labels[i]

        self._hooks(self.pre_find, needed, addr, bound, label)
        tls_tpoff, tls_module, tls_missing = self._scope_tls_all(
            syms, needed[~defined & ~bound[needed]], bound, label)
        self._scope_all(tables, needed[~defined & ~bound[needed]], addr, bound)
        own = needed[defined & ~bound[needed]]
        addr[own] = (syms["st_value"][own] + np.uint64(bias & MASK64))
        bound[own] = True
        self._hooks(self.post_find, needed[~bound[needed]], addr, bound, label)
        left = needed[~bound[needed]]
        weak = st_bind(syms["st_info"][left]) == _STB_WEAK
        bound[left[weak]] = True            # weak undefined: 0
        extern, extern_range, unresolved = self._fall_back(syms, left[~weak], label, mm, near,
                                                           addr, bound)
        return Resolution(addr, bound, tls_missing + unresolved, extern, extern_range,
                          tls_tpoff, tls_module=tls_module)

    def _fall_back(self, syms: npt.NDArray[Any], left: npt.NDArray[np.int64],
                   label: Callable[[int], tuple[str, str | None]], mm: Mmap, near: int,
                   addr: npt.NDArray[np.uint64], bound: npt.NDArray[np.bool_]
                   ) -> tuple[dict[str, int], tuple[int, int] | None, list[str]]:
        """Offer the symbols ``left`` to :meth:`fallback`; bind what it bound (``addr``,
        ``bound``, in one scatter). Returns its {label: address}, its mapping's range and
        the labels it left unresolved. The st_size column is read once for all (a field of
        a structured array read element by element costs a microsecond each)."""
        if not len(left):
            return {}, None, []
        labels = [label(i) for i in left.tolist()]
        sizes = syms["st_size"][left].tolist()
        imports = [(name, version, size) for (name, version), size
                   in zip(labels, sizes, strict=True)]
        extern, extern_range = self.fallback(imports, mm, near)
        keys = [_label_text(name, version) for name, version in labels]
        hit = [k for k, key in enumerate(keys) if key in extern]
        addr[left[hit]] = np.array([extern[keys[k]] for k in hit], dtype=np.uint64)
        bound[left[hit]] = True
        return extern, extern_range, [key for key in keys if key not in extern]

    def _scope_tls_all(self, syms: npt.NDArray[Any], idx: npt.NDArray[np.int64],
                       bound: npt.NDArray[np.bool_],
                       label: Callable[[int], tuple[str, str | None]]
                       ) -> tuple[dict[int, int], dict[int, tuple[int, int]], list[str]]:
        """Undefined TLS symbols: their thread-pointer offsets from :meth:`scope_tls` and
        their (module, offset) from :meth:`scope_tls_module`; the ones nobody knows are
        listed "(TLS)". All are taken out of the address chain (an address, a stub above
        all, means nothing for a TLS variable)."""
        tls = idx[st_type(syms["st_info"][idx]) == _STT_TLS]
        found: dict[int, int] = {}
        modules: dict[int, tuple[int, int]] = {}
        missing: list[str] = []
        for i in tls.tolist():
            off = self.scope_tls(*label(i))
            module = self.scope_tls_module(*label(i))
            if off is None and module is None:
                missing.append(_label_text(*label(i)) + " (TLS)")
            if off is not None:
                found[i] = off
            if module is not None:
                modules[i] = module
            bound[i] = True
        return found, modules, missing

    def scope_raw(self, name: bytes, version: bytes | None) -> int | None:
        """:meth:`scope` on raw strtab bytes (a backend may override it to skip decoding)."""
        text = None if version is None else version.decode("utf-8", "surrogateescape")
        return self.scope(name.decode("utf-8", "surrogateescape"), text)

    def _scope_all(self, tables: DynamicTables, idx: npt.NDArray[np.int64],
                   addr: npt.NDArray[np.uint64], bound: npt.NDArray[np.bool_]) -> None:
        """Ask the scope about each symbol of ``idx``; names cut from the strtab in bulk."""
        no_scope = (type(self).scope is Resolver.scope
                    and type(self).scope_raw is Resolver.scope_raw)
        if not len(idx) or no_scope:
            return
        versions = {k: v.encode("utf-8", "surrogateescape") for k, v in tables.versions.items()}
        vidx = versym_index(tables.versym[idx]).tolist() if tables.versym is not None else \
            [0] * len(idx)
        for i, name, v in zip(idx.tolist(), names_of(tables, idx), vidx, strict=True):
            found = self.scope_raw(name, versions.get(v) if v > 1 else None)
            if found is not None:
                addr[i], bound[i] = found, True

    @staticmethod
    def _hooks(hooks: list[Finder], idx: npt.NDArray[np.int64], addr: npt.NDArray[np.uint64],
               bound: npt.NDArray[np.bool_],
               label: Callable[[int], tuple[str, str | None]]) -> None:
        """Ask each hook about each unbound index in turn; the first answer wins."""
        if not hooks:
            return
        for i in idx.tolist():
            for hook in hooks:
                found = hook(*label(i))
                if found is not None:
                    addr[i], bound[i] = found, True
                    break


def _label_text(name: str, version: str | None) -> str:
    """``name@version`` or ``name``."""
    return f"{name}@{version}" if version else name


@functools.cache
def _dl_functions() -> tuple[Any, Any]:
    """dlsym and dlvsym of this process, declared once."""
    libc = ctypes.CDLL(None)
    dlsym, dlvsym = libc.dlsym, libc.dlvsym
    dlsym.restype, dlsym.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    dlvsym.restype = ctypes.c_void_p
    dlvsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    return dlsym, dlvsym


_SYS_ARCH_PRCTL, _ARCH_GET_FS = 158, 0x1003


def thread_pointer() -> int:
    """This thread's x86-64 thread pointer (the %fs base), through arch_prctl(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    out = ctypes.c_ulong()
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_FS, ctypes.byref(out)) != 0:
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_FS) failed")
    return int(out.value)


class HostResolver(Resolver):
    """The host default: undefined symbols from the running process (``dlsym`` with
    ``RTLD_DEFAULT``, ``dlvsym`` when the reference is versioned)."""

    def __init__(self, pre_find: Iterable[Finder] = (), post_find: Iterable[Finder] = ()) -> None:
        super().__init__(pre_find, post_find)
        self._dlsym, self._dlvsym = _dl_functions()

    def scope(self, name: str, version: str | None) -> int | None:
        """dlvsym(RTLD_DEFAULT, name, version) or dlsym(RTLD_DEFAULT, name); None if absent."""
        raw = None if version is None else version.encode("utf-8", "surrogateescape")
        return self.scope_raw(name.encode("utf-8", "surrogateescape"), raw)

    def scope_raw(self, name: bytes, version: bytes | None) -> int | None:
        """:meth:`scope` without decoding: the bytes go straight to dlsym/dlvsym."""
        found: Any = self._dlvsym(None, name, version) if version else self._dlsym(None, name)
        return int(found) if found else None

    def scope_tls(self, name: str, version: str | None) -> int | None:
        """dlsym of a TLS variable gives this thread's instance; minus the thread pointer,
        that is its static TLS offset, the same in every thread."""
        addr = self.scope(name, version)
        return None if addr is None else addr - thread_pointer()


STUB_SIZE = STUB_SLOT
STUB_FILL = b"\xcc"   # int3: calling a stub traps instead of running on


def _extern_layout(imports: list[tuple[str, str | None, int]]
                   ) -> tuple[dict[str, int], int, int]:
    """Slots of the extern mapping, one per distinct label: the function stubs (st_size 0)
    first, packed, then the data objects (st_size bytes each, rounded up to a slot).
    Returns ({label: offset}, bytes of stubs, total bytes). ElfSymbolError when the total
    passes the user-space size, naming the import that passed it (parse_tables refuses
    such files already; this guards a resolver used on its own)."""
    sizes: dict[str, int] = {}
    for name, version, size in imports:
        sizes.setdefault(_label_text(name, version), size)
    offsets: dict[str, int] = {}
    stubs = 0
    for key in (k for k, size in sizes.items() if size == 0):
        offsets[key], stubs = stubs, stubs + STUB_SIZE
    total = stubs
    for key in (k for k, size in sizes.items() if size):
        offsets[key], total = total, total + import_slot(sizes[key])
        if total > USER_LIMIT:
            raise ElfSymbolError(f"st_size of import {key!r}", sizes[key],
                                 f"imports' sizes summing below the user-space size "
                                 f"{USER_LIMIT:#x}")
    return offsets, stubs, total


NORESERVE_FROM = 16 << 20
"""Extern areas larger than this (bytes) are mapped MAP_NORESERVE (huge data imports)."""


class StubResolver(Resolver):
    """The simulator default: every import gets its own address in one read-only "extern"
    mapping (functions 16 bytes of int3, data objects st_size zero bytes), so the loaded
    image is complete and each binding is visible. ``extern_addr`` places that mapping
    exactly (MAP_FIXED_NOREPLACE); otherwise it is a hint just past the span. Init and
    fini functions are recorded, never run, even on the host: their calls would hit stubs.

    Only the stubs are written: the data objects' bytes are the mapping's own zeros, so a
    huge st_size reserves address space and costs no memory until something touches it. An
    area past ``NORESERVE_FROM`` bytes is also MAP_NORESERVE, so it is not charged against
    the kernel's overcommit limit; a small one is ordinary anonymous memory, which the kernel
    merges with a neighbouring ``.bss`` of the same permissions (notebook 2 shows it).
    """

    real = False

    def __init__(self, pre_find: Iterable[Finder] = (), post_find: Iterable[Finder] = (),
                 *, extern_addr: int | None = None) -> None:
        super().__init__(pre_find, post_find)
        self.extern_addr = extern_addr

    def fallback(self, imports: list[tuple[str, str | None, int]], mm: Mmap,
                 near: int) -> tuple[dict[str, int], tuple[int, int] | None]:
        """Map the extern area, write the stubs, seal it read-only; one slot per label."""
        page = mm.page_size
        offsets, stubs, total = _extern_layout(imports)
        length = page_round_up(total, page)
        flags = MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS
        if length > NORESERVE_FROM:
            flags |= MapFlags.MAP_NORESERVE
        if self.extern_addr is not None:
            flags |= MapFlags.MAP_FIXED_NOREPLACE
        hint = self.extern_addr if self.extern_addr is not None else near
        rw = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
        base = mm.mmap(hint, length, rw, flags, 0, None).addr
        try:
            if stubs:
                mm.write(base, STUB_FILL * stubs)
            mm.mprotect(base, length, ProtFlags.PROT_READ)
        except BaseException:
            # The loader learns of this mapping only when we return: undo it here.
            mm.munmap(base, length)
            raise
        return {key: base + off for key, off in offsets.items()}, (base, base + length)
