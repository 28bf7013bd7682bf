"""Finding a program's libraries as glibc's ld.so does: the search path and the closure.

Part of the ``loader`` layer (imports nothing from vmsim); the first piece of the process
image (issue 11): which files a LinkMap will load, in which order, and why each one.

How ld.so (glibc 2.36, x86-64 Debian) finds a DT_NEEDED ``name`` of object L:
  0. A name with a slash is a path, opened as it is (relative to the current directory);
     no search. Otherwise an object already loaded whose soname, file name or a name it was
     already found by equals ``name`` is reused.
  1. DT_RPATH of L, then of the object that loaded L, and so up to the program (then the
     program's own, if it was not in that chain); all skipped when L has a DT_RUNPATH (and
     an object with a DT_RUNPATH has no DT_RPATH at all).
  2. ``library_path`` (LD_LIBRARY_PATH; $ORIGIN in it is the program's).
  3. DT_RUNPATH of L (only L's: RUNPATH does not reach its dependencies' dependencies).
  4. /etc/ld.so.cache (``loader.ldcache``): an entry of the best glibc-hwcaps level the CPU
     supports, else the plain entry.
  5. The system directories /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib,
     /usr/lib. Steps 4 and 5 are skipped when L has DF_1_NODEFLIB.
In each directory of steps 1-3 and 5, ``HWCAP_SUBDIRS`` are tried first: glibc-hwcaps/
x86-64-v4 ... v2 as far as the CPU supports them, then the legacy tls/ and x86_64/ ones
(what ``ld.so --list-diagnostics`` lists as searched here). In RPATH and RUNPATH,
``$ORIGIN`` is the directory of L's file name as it was opened (the current directory
joined in front of a relative one, nothing normalised), ``$LIB`` is lib/x86_64-linux-gnu,
``$PLATFORM`` x86_64 (AT_PLATFORM here), ``${NAME}`` alike; any other ``$NAME`` stays as
written; an empty element is the current directory (the path is then ``name`` alone). A
candidate that is ELF of another class or machine is skipped and the search goes on; one
that is not ELF at all stops it with an error (as ld.so's open_verify). A file found is
compared by identity (st_dev, st_ino) with the objects loaded: the same file under another
name is the same object.

The closure (``closure``), breadth-first as ld.so's _dl_map_object_deps: the program, then
each preload (LD_PRELOAD, searched as the program's needs), then the program's DT_NEEDED in
order, then the first preload's, then each dependency's, in the order the objects were
first met. Every object appears once, where first needed, so cycles (a needs b needs a)
end. ld.so is one of them when something needs it (libc.so.6 does): already loaded, it is
matched by its soname ld-linux-x86-64.so.2 or the program's PT_INTERP path. With
``missing="report"`` (what ldd shows) a name found nowhere becomes an entry with no path
and no dependencies, met again as a new entry each time it is needed (glibc's faked objects
match no name). ldd lists ld.so's chain (``ldd_lines``): the program, the vDSO, the objects
in load order, except that ld.so sits right after the found object that precedes it.

Where ours differs: nothing is opened to be mapped (a file is read for its headers only);
secure-mode (setuid) rules, audit modules, DT_AUXILIARY/DT_FILTER and legacy hwcap-bit
cache entries are not modelled; only regular files are candidates; a corrupt cache is an
error (glibc ignores it); with ``missing="error"`` a preload found nowhere is an error
(glibc ignores it with a message).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from loader.elf import ElfImage, FileBytes, ParsedFile, file_identity, parse_image
from loader.elfdefs import DT
from loader.errors import ElfDependencyError, ElfDynamicError, ElfError, ElfHeaderError
from loader.ldcache import LdCache
from loader.pages import HOST_PAGE_SIZE
from loader.tables import name_budget, read_dynamic, read_strtab

__all__ = ["DEFAULT_DIRS", "GLIBC_HWCAPS", "HWCAP_SUBDIRS", "RTLD", "Found", "Hit", "ObjectInfo",
           "SearchPath", "closure", "extend_closure", "ldd_lines", "read_object",
           "supported_glibc_hwcaps"]

DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib")
"""The system search path (``ld.so --list-diagnostics``: path.system_dirs)."""

ISA_LEVELS = {
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"},
}
"""The CPU flags (/proc/cpuinfo names) each glibc-hwcaps level needs, on top of the levels
below it (the x86-64 psABI's micro-architecture levels; abm is LZCNT)."""


def supported_glibc_hwcaps(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The glibc-hwcaps subdirectory names this CPU supports, best first (what
    ``ld.so --list-diagnostics`` marks "supported, searched")."""
    try:
        with open(cpuinfo) as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ()
    flags = set(line.partition(":")[2].split())
    levels = list(ISA_LEVELS)
    return tuple(name for i, name in enumerate(levels)
                 if all(ISA_LEVELS[n] <= flags for n in levels[i:]))


GLIBC_HWCAPS = supported_glibc_hwcaps()
"""This CPU's glibc-hwcaps names, best first."""

LEGACY_SUBDIRS = ("tls/x86_64/x86_64/", "tls/x86_64/", "tls/", "x86_64/x86_64/", "x86_64/")
"""glibc 2.36's legacy hwcap subdirectories on x86-64 (AT_PLATFORM x86_64 and the x86_64
hwcap, under tls/ and not; LD_DEBUG=libs shows tls/x86_64/ and x86_64/ twice, once per
reason: the second try finds nothing new, so it is left out)."""

HWCAP_SUBDIRS = (*(f"glibc-hwcaps/{name}/" for name in GLIBC_HWCAPS), *LEGACY_SUBDIRS, "")
"""Tried in each directory of the search, in this order."""

DST = {"ORIGIN": None, "LIB": "lib/x86_64-linux-gnu", "PLATFORM": "x86_64"}
"""Dynamic string tokens: $LIB and $PLATFORM as this machine's ld.so expands them."""

RTLD = "/lib64/ld-linux-x86-64.so.2"
"""ld.so's name when the program has no PT_INTERP (the path ldd runs)."""

_DF_1_NODEFLIB = 0x800
_ELFCLASS64, _ELFDATA2LSB, _EM_X86_64 = 2, 1, 62
_DST_RE = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")

How = Literal["program", "preload", "path", "loaded", "rpath", "library_path", "runpath",
              "cache", "default", "not found"]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the search needs of one ELF object: its file name as opened (``path``, glibc's
    l_name), ``origin`` ($ORIGIN), DT_SONAME, DT_NEEDED in order, DT_RPATH (None when absent
    or overridden by a DT_RUNPATH), DT_RUNPATH, DF_1_NODEFLIB, PT_INTERP and file identity."""

    path: str
    origin: str
    soname: str | None
    needed: tuple[str, ...]
    rpath: str | None
    runpath: str | None
    nodeflib: bool
    interp: str | None
    file_id: tuple[int, int]
    dynamic: bool = True
    parsed: ParsedFile | None = field(default=None, compare=False, repr=False)
    """The image the search parsed, for the map to reuse (``ParsedFile``)."""


@dataclass(slots=True)
class Found:
    """One entry of the closure: ``name`` as it was asked for (a DT_NEEDED string, or the
    path given), ``path`` as found (None: not found), ``how`` (the search step that found
    it), ``needed_by`` (the path of the object whose DT_NEEDED loaded it; None for the
    program and preloads) and ``info`` (None when not found)."""

    name: str
    path: str | None
    how: How
    needed_by: str | None
    info: ObjectInfo | None
    aliases: list[str] = field(default_factory=list)


def _origin(path: str) -> str:
    """$ORIGIN of a file opened as ``path``: glibc joins the current directory in front of
    a relative name and drops the last component; nothing else is normalised."""
    full = path if path.startswith("/") else os.getcwd().rstrip("/") + "/" + path
    return full[: full.rindex("/")] or "/"


def _probe(fd: int, path: str) -> bool:
    """Whether the open file is an ELF64 x86-64 candidate. False (skip it, search on) for
    another ELF class or machine; ElfHeaderError (stop) for a file that is not ELF at all
    or too short, as glibc's open_verify."""
    head = os.pread(fd, 20, 0)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ElfHeaderError(f"{path}: e_ident[EI_MAG]", head[:4],
                             "b'\\x7fELF' (glibc: invalid ELF header / file too short)")
    if head[4] != _ELFCLASS64:
        return False
    if head[5] != _ELFDATA2LSB:
        raise ElfHeaderError(f"{path}: e_ident[EI_DATA]", head[5], "ELFDATA2LSB (1)")
    return int.from_bytes(head[18:20], "little") == _EM_X86_64


def _names(strtab: bytes, offsets: Sequence[int], what: str) -> list[str]:
    """The strings at ``offsets``, each inside the table, their bytes in all within
    ``name_budget`` (a hostile file could point 10^5 entries at one long string)."""
    offs = np.asarray(offsets, dtype=np.int64)
    if len(offs) and int(offs.max()) >= len(strtab):
        raise ElfDynamicError(what, int(offs.max()), f"below DT_STRSZ {len(strtab):#x}")
    nuls = np.flatnonzero(np.frombuffer(strtab, np.uint8) == 0)
    total = int((nuls[np.searchsorted(nuls, offs)] - offs).sum()) if len(offs) else 0
    if total > name_budget(strtab):
        raise ElfDynamicError(f"{what} name bytes", total, f"at most "
                              f"{name_budget(strtab):#x} (8 x DT_STRSZ + 1 MiB)")
    text: dict[int, str] = {}
    for off in set(offs.tolist()):
        text[off] = strtab[off: strtab.index(b"\0", off)].decode("utf-8", "surrogateescape")
    return [text[off] for off in offs.tolist()]


def _interp(image: ElfImage) -> str | None:
    """PT_INTERP's string (bounded by the file), or None."""
    seg = image.interp
    if seg is None:
        return None
    if seg.p_offset + seg.p_filesz > image.size:
        raise ElfHeaderError("PT_INTERP p_offset + p_filesz", seg.p_offset + seg.p_filesz,
                             f"within the file size {image.size:#x}")
    raw = bytes(image.read(seg.p_offset, seg.p_filesz))
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _info(image: ElfImage, path: str, identity: tuple[int, int, int, int]) -> ObjectInfo:
    """The search's view of a parsed image, read from the file of ``identity``
    (``file_identity``)."""
    tags, needed = read_dynamic(image)
    strtab = read_strtab(image, tags)
    one = [t for t in (DT.SONAME, DT.RPATH, DT.RUNPATH) if t in tags]
    names = _names(strtab, [*needed, *(tags[t] for t in one)], "DT_NEEDED/SONAME/RPATH")
    single = dict(zip(one, names[len(needed):], strict=True))
    runpath = single.get(DT.RUNPATH)
    return ObjectInfo(path=path, origin=_origin(path), soname=single.get(DT.SONAME),
                      needed=tuple(names[: len(needed)]),
                      rpath=None if runpath is not None else single.get(DT.RPATH),
                      runpath=runpath, nodeflib=bool(tags.get(DT.FLAGS_1, 0) & _DF_1_NODEFLIB),
                      interp=_interp(image), file_id=identity[:2],
                      dynamic=image.dynamic is not None,
                      parsed=ParsedFile(image, identity))


def read_object(path: str) -> ObjectInfo | None:
    """Open ``path`` as ld.so would: OSError when it cannot be opened or is not a regular
    file; None when it is ELF of another class or machine (skip it); an ElfError kind
    when it is not usable ELF; else its ``ObjectInfo``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"{path}: not a regular file")
        if not _probe(fd, path):
            return None
        data = FileBytes(fd, st.st_size, path)
        info = _info(parse_image(data, HOST_PAGE_SIZE), path, file_identity(st))
        data.close()
        return info
    finally:
        os.close(fd)


def expand(element: str, origin: str) -> str:
    """One RPATH/RUNPATH element with $ORIGIN, $LIB, $PLATFORM (and ${...}) replaced."""
    def token(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        value = DST[name]
        return origin if value is None else value
    return _DST_RE.sub(token, element)


def directories(path_list: str | Sequence[str], origin: str | None) -> list[str]:
    """A colon-separated list (or a sequence) as directory prefixes, each ending in '/'
    (the empty element is "": the current directory), DSTs expanded when ``origin`` given."""
    elements = path_list.split(":") if isinstance(path_list, str) else list(path_list)
    dirs: list[str] = []
    for element in elements:
        d = expand(element, origin) if origin is not None else element
        d = d.rstrip("/") or ("/" if d.startswith("/") else "")
        d = d if d in ("", "/") else d + "/"
        if d not in dirs:
            dirs.append(d)
    return dirs


@dataclass(frozen=True, slots=True)
class Hit:
    """A search's result: the file name as found, the step that found it, what it holds."""

    path: str
    how: How
    info: ObjectInfo


class SearchPath:
    """ld.so's search for DT_NEEDED names: ``library_path`` plays LD_LIBRARY_PATH (DSTs in
    it expand with the program's $ORIGIN), ``cache`` /etc/ld.so.cache, ``default_dirs`` and
    ``hwcap_subdirs`` this machine's. Remembers which directories do not exist (as ld.so
    does), so a name missing everywhere costs one open per existing directory."""

    def __init__(self, library_path: str | Sequence[str] = (), cache: LdCache | None = None,
                 *, default_dirs: Sequence[str] = DEFAULT_DIRS,
                 hwcap_subdirs: Sequence[str] = HWCAP_SUBDIRS) -> None:
        self.library_path = library_path
        self.cache = LdCache.system() if cache is None else cache
        self.default_dirs = directories(default_dirs, None)
        self.hwcap_subdirs = tuple(hwcap_subdirs)
        self._absent: dict[str, bool] = {}

    def _missing_dir(self, directory: str) -> bool:
        """Whether ``directory`` (a prefix ending in '/', or "") does not exist."""
        if directory not in self._absent:
            self._absent[directory] = not os.path.isdir(directory or ".")
        return self._absent[directory]

    def _try(self, path: str, skipped: list[str]) -> ObjectInfo | None:
        """``read_object`` with the misses (cannot open, other class/machine) as None; a
        file that is not ELF at all stops the search (as ld.so's open_verify), its error
        naming the file."""
        try:
            info = read_object(path)
        except OSError:
            return None
        except ElfError as exc:
            if path in str(exc):
                raise
            raise type(exc)(f"{path}: {exc.field}", exc.value, exc.limit) from exc
        if info is None:
            skipped.append(path)
        return info

    def _in_dirs(self, name: str, dirs: list[str], how: How, skipped: list[str]
                 ) -> Hit | None:
        """The first usable ``dir/subdir/name`` over ``dirs`` (each with every subdir)."""
        for d in dirs:
            for sub in self.hwcap_subdirs:
                if self._missing_dir(d + sub):
                    continue
                info = self._try(d + sub + name, skipped)
                if info is not None:
                    return Hit(d + sub + name, how, info)
        return None

    def _rpaths(self, chain: Sequence[ObjectInfo]) -> list[str]:
        """Step 1's directories: DT_RPATH of the loading object and up its loader chain,
        then of the program (last in the chain); none when the loader has a DT_RUNPATH."""
        if chain and chain[0].runpath is not None:
            return []
        dirs: list[str] = []
        for obj in chain:
            if obj.rpath is not None:
                dirs += [d for d in directories(obj.rpath, obj.origin) if d not in dirs]
        return dirs

    def _steps(self, name: str, chain: Sequence[ObjectInfo], skipped: list[str]
               ) -> Hit | None:
        """Steps 1-5 for a name without a slash; None when no step finds it."""
        loader = chain[0] if chain else None
        origin = chain[-1].origin if chain else os.getcwd()
        lists: list[tuple[list[str], How]] = [
            (self._rpaths(chain), "rpath"),
            (directories(self.library_path, origin), "library_path"),
            (directories(loader.runpath, loader.origin) if loader and loader.runpath
             is not None else [], "runpath")]
        for dirs, how in lists:
            hit = self._in_dirs(name, dirs, how, skipped)
            if hit is not None:
                return hit
        if loader is not None and loader.nodeflib:
            return None
        cached = self.cache.lookup(name, GLIBC_HWCAPS)
        info = self._try(cached, skipped) if cached is not None else None
        if cached is not None and info is not None:
            return Hit(cached, "cache", info)
        return self._in_dirs(name, self.default_dirs, "default", skipped)

    def find(self, name: str, chain: Sequence[ObjectInfo] = ()) -> Hit:
        """Where ld.so finds ``name`` needed by ``chain[0]`` (loaded by chain[1], ... up to
        the program, last). ElfDependencyError naming the chain when nowhere; an ElfError
        kind when a candidate is not ELF (glibc stops there too)."""
        skipped: list[str] = []
        needers = " <- ".join(obj.path for obj in chain) or "(the command line)"
        try:
            if "/" in name:
                info = self._try(name, skipped)
                hit = Hit(name, "path", info) if info is not None else None
            else:
                hit = self._steps(name, chain, skipped)
        except ElfError as exc:     # a candidate that is no ELF object: say who needed it
            if isinstance(exc, ElfDependencyError) or not chain:
                raise
            raise type(exc)(f"{exc.field} (needed by {needers})", exc.value,
                            exc.limit) from exc
        if hit is not None:
            return hit
        other = f"; skipped (another ELF class or machine): {', '.join(skipped)}" \
            if skipped else ""
        raise ElfDependencyError(f"DT_NEEDED of {needers}", name,
                                 f"a file of that name in the search path{other}")


class _Closure:
    """The breadth-first walk: ``entries`` in load order, ``loader`` (who loaded each),
    names and file identities already loaded, and ld.so waiting to be needed."""

    def __init__(self, search: SearchPath, missing: Literal["error", "report"]) -> None:
        self.search, self.missing = search, missing
        self.entries: list[Found] = []
        self.loader: list[int | None] = []
        self.by_name: dict[str, int] = {}
        self.by_id: dict[tuple[int, int], int] = {}
        self.rtld: Found | None = None

    def add(self, found: Found, loader: int | None) -> int:
        """Append ``found`` and register its names (asked, as found, soname) and identity."""
        self.entries.append(found)
        self.loader.append(loader)
        index = len(self.entries) - 1
        if found.info is not None:
            names = (found.name, found.path, found.info.soname)
            self.by_name.update({n: index for n in names if n is not None})
            self.by_id[found.info.file_id] = index
        return index

    def chain(self, index: int) -> list[ObjectInfo]:
        """The loading object, its loader, ... up to the program (DT_RPATH's chain)."""
        out: list[ObjectInfo] = []
        at: int | None = index
        while at is not None:
            info = self.entries[at].info
            if info is not None:
                out.append(info)
            at = self.loader[at]
        return out

    def known(self, name: str, file_id: tuple[int, int] | None = None) -> bool:
        """Whether ``name`` (or the file ``file_id``) is loaded already; ld.so is added to
        the entries when first met this way (it was loaded before everything)."""
        rtld = self.rtld
        if rtld is not None and rtld.info is not None and (
                name in (rtld.name, rtld.info.soname) or file_id == rtld.info.file_id):
            self.rtld = None
            self.add(rtld, None)
        index = self.by_name.get(name)
        if index is None and file_id is not None:
            index = self.by_id.get(file_id)
        if index is not None:
            self.by_name.setdefault(name, index)
            if name != self.entries[index].name:
                self.entries[index].aliases.append(name)
        return index is not None

    def need(self, name: str, parent: int, how: How | None = None) -> None:
        """Load ``name`` for entries[parent] unless it is loaded (``how``: preload)."""
        if self.known(name):
            return
        needer = self.entries[parent]
        try:
            hit = self.search.find(name, self.chain(parent))
        except ElfDependencyError:
            if self.missing == "error":
                raise
            if how is None:     # glibc ignores a preload it cannot find (with a message)
                self.add(Found(name, None, "not found", needer.path, None), parent)
            return
        if not self.known(name, hit.info.file_id):
            self.add(Found(name, hit.path, how or hit.how,
                           None if how else needer.path, hit.info), parent)


def _rtld(program: ObjectInfo) -> Found | None:
    """ld.so as the program's loader: its PT_INTERP (or RTLD), as loaded before all."""
    name = program.interp or RTLD
    try:
        info = read_object(name)
    except OSError:
        return None
    return Found(name, name, "loaded", None, info) if info is not None else None


def closure(path: str, *, library_path: str | Sequence[str] = (),
            preload: Sequence[str] = (), search: SearchPath | None = None,
            missing: Literal["error", "report"] = "error") -> list[Found]:
    """The program (or library) ``path`` and every object ld.so loads with it, in its
    breadth-first load order (the module docstring). ``missing="error"`` raises
    ElfDependencyError naming the chain at the first name found nowhere; ``"report"`` keeps
    it as a ``how="not found"`` entry, as ldd does. ElfHeaderError when ``path`` is not an
    x86-64 ELF64 file; OSError when it cannot be opened."""
    walk = _Closure(search or SearchPath(library_path), missing)
    program = read_object(path)
    if program is None:
        raise ElfHeaderError(f"{path}: e_ident[EI_CLASS]/e_machine", path,
                             "an ELF64 x86-64 file")
    walk.add(Found(path, path, "program", None, program), None)
    walk.rtld = _rtld(program)
    for name in preload:
        walk.need(name, 0, "preload")
    at = 0
    while at < len(walk.entries):
        info = walk.entries[at].info
        for name in info.needed if info is not None else ():
            walk.need(name, at)
        at += 1
    return walk.entries


def extend_closure(known: Sequence[Found], name: str, *, search: SearchPath | None = None
                   ) -> tuple[Found, list[Found]]:
    """What a dlopen of ``name`` adds to a process whose objects are ``known`` (their
    entries, in load order): the root's entry (a known one when ``name`` names a loaded
    object: by soname, a name it was asked by, its path or its file identity) and the new
    entries in load order, root first (empty when nothing is new). Breadth-first from the
    root as ``closure``; a name without a slash is searched as the program's needs are
    (glibc searches with the caller's DT_RPATH/RUNPATH: the program here)."""
    walk = _Closure(search or SearchPath(), "error")
    for found in known:
        walk.add(found, None)
    first = len(walk.entries)
    program = [known[0].info] if known and known[0].info is not None else []
    if not walk.known(name):
        hit = walk.search.find(name, program)
        if not walk.known(name, hit.info.file_id):
            walk.add(Found(name, hit.path, hit.how, None, hit.info), None)
    if len(walk.entries) == first:
        return walk.entries[walk.by_name[name]], []
    at = first
    while at < len(walk.entries):
        info = walk.entries[at].info
        for needed in info.needed if info is not None else ():
            walk.need(needed, at)
        at += 1
    return walk.entries[first], walk.entries[first:]


VDSO = "linux-vdso.so.1"


def ldd_lines(entries: list[Found], address: int = 0) -> list[str]:
    """ldd's lines for a closure (``missing="report"``) in ld.so's list order, each with
    ``address``: the vDSO (ld.so adds it right after the program), then the objects in load
    order, but ld.so itself moves to just after the found object that precedes it in the
    closure (the program: before the vDSO; faked not-found entries are not in its search
    list). "statically linked" for an object with no DT_NEEDED."""
    program, rest = entries[0], entries[1:]
    if program.info is not None and not program.info.needed and len(rest) == 0:
        return ["\tstatically linked"]
    vdso = Found(VDSO, VDSO, "loaded", None, None)
    order = [vdso, *(e for e in rest if e.how != "loaded")]
    for rtld in (e for e in rest if e.how == "loaded"):
        before = [e for e in rest[: rest.index(rtld)] if e.how not in ("loaded", "not found")]
        order.insert(order.index(before[-1]) + 1 if before else 0, rtld)
    lines = []
    for e in order:
        if e.path is None:
            lines.append(f"\t{e.name} => not found")
        elif e.path == e.name:
            lines.append(f"\t{e.name} (0x{address:016x})")
        else:
            lines.append(f"\t{e.name} => {e.path} (0x{address:016x})")
    return lines
