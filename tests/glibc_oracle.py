"""The glibc oracle: the process image glibc's own loader builds, read back and normalised.

A test that builds a process image with our loader compares it with what glibc does with the
same files in a fresh C process (tests/oracle/*.c, compiled with gcc on first use into a
temporary directory that lives as long as this Python process; never committed). This module
does not use the loader under test: relocations are read with pyelftools from the files.

Two ways to get an image (each one run of one fresh process):

- ``glibc_dlopen_image(path, bind=, scope=, library_path=)``: a main program linked against libc
  only (tests/oracle/dlopen_driver.c, linked -z now; the dump code is inside it, no extra library
  in its scope) dlopens ``path`` and dumps. ``bind="now"`` also sets LD_BIND_NOW=1, so the
  startup objects (the driver, libc.so.6, ld.so) are bound too; ``bind="lazy"`` leaves them as
  ld.so relocates them by default (lazily), so their JUMP_SLOTs hold whatever the code run so
  far made of them: compare only the dlopen'ed objects (``OracleObject.at_startup`` False) then.
- ``glibc_exec_image(program, preload=, library_path=)``: runs ``program`` with LD_BIND_NOW=1 and
  LD_PRELOAD = ``preload`` followed by the dumper library (``exec_dumper()``,
  tests/oracle/exec_dumper.c). The dumper's constructor dumps and ``_exit(0)``s, so the program's
  own code never runs. **The dumper is part of the image** (last preload): a test that compares
  must give its own loader the same preload list, ``(*preload, exec_dumper())``. The dumper
  defines no dynamic symbol, so it interposes nothing. glibc runs its constructor after those
  of every other library (the program's DT_PREINIT_ARRAY too): only the program's own
  DT_INIT/DT_INIT_ARRAY have not run when it dumps. In dlopen mode every init of the new
  objects has run. (On this machine no symbol relocation word of libz, libssl, libpython3.11,
  libxml2, libstdc++ or the exec fixture is changed by an init: tests/test_glibc_oracle.py.)

Naming: an object's ``key`` is its DT_SONAME when its file has one, else its ``name``: glibc's
l_name (the path as glibc found it, e.g. "/lib/x86_64-linux-gnu/libz.so.1", or as given to
dlopen / LD_PRELOAD), and for the main program (l_name "") the program's path as passed here.
The vDSO is in the list as glibc has it, named and keyed "linux-vdso.so.1" (no file: no words).

Words: ``GlibcImage.words(obj)`` maps the r_offset of every symbol relocation of ``obj``
(R_X86_64_64, GLOB_DAT, JUMP_SLOT with a symbol index other than 0) to the word glibc left at
bias + r_offset, normalised by ``attribute``: (key of the object whose span holds it, value -
that object's bias), or (None, value) for 0 and for values in no object's span. A span is
[bias + lowest PT_LOAD p_vaddr, bias + highest p_vaddr + p_memsz]; a value inside [lo, hi) of an
object belongs to it; a value equal to an object's hi (one past its last byte, like ``_end``) and
inside no other object's [lo, hi) belongs to the object it ends.

Init and fini order: ``init_order_fixture(where)`` builds libraries whose init/fini functions log
"<lib>:<which>" lines; ``glibc_init_fini(path, mode=)`` runs them through glibc.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

SOURCES = Path(__file__).parent / "oracle"
VDSO_NAME = "linux-vdso.so.1"
R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT = 1, 6, 7
SYMBOL_RELOCATION_TYPES = (R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT)
PT_LOAD, PF_W = 1, 2
PHDR = struct.Struct("<IIQQQQQQ")
DUMP_MAGIC = b"VMSIMOR1"
INIT_LOG_VARIABLE = "VMSIM_ORACLE_INIT_LOG"
INIT_KINDS = ("preinit_array", "init", "init_array")
RUN_TIMEOUT = 120.0
RELA = np.dtype([("offset", "<u8"), ("info", "<u8"), ("addend", "<i8")])


class OracleError(RuntimeError):
    """glibc's side could not be obtained (a build or a run failed); the message says why."""


class Span(NamedTuple):
    """One object's loaded span for ``attribute``: [lo, hi] in the process, and its bias."""

    key: str
    bias: int
    lo: int
    hi: int


@dataclass
class OracleObject:
    """One object of glibc's link map, as dl_iterate_phdr reported it.

    ``name``: l_name (the program's path for the main program); ``soname``: DT_SONAME of its
    file (None when it has none); ``loads``: (p_vaddr, p_memsz, p_flags) of each PT_LOAD;
    ``tls_modid``: 0 without TLS; ``path``: the file its relocations are read from (None for
    the vDSO); ``at_startup``: False for objects dlopen added; ``writable``: p_vaddr -> the
    bytes of each PF_W PT_LOAD as glibc left them.
    """

    name: str
    soname: str | None
    bias: int
    loads: list[tuple[int, int, int]]
    tls_modid: int
    path: str | None = None
    at_startup: bool = True
    writable: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """The name tests compare by: the soname when there is one, else ``name``."""
        return self.soname or self.name

    @property
    def span(self) -> Span:
        """[bias + lowest PT_LOAD p_vaddr, bias + highest p_vaddr + p_memsz]."""
        lo = min(vaddr for vaddr, _, _ in self.loads)
        hi = max(vaddr + memsz for vaddr, memsz, _ in self.loads)
        return Span(self.key, self.bias, self.bias + lo, self.bias + hi)

    @property
    def is_vdso(self) -> bool:
        """True for the kernel's vDSO (no file behind it)."""
        return self.name == VDSO_NAME and self.path is None

    def words_at(self, offsets: np.ndarray) -> np.ndarray:
        """The 8-byte words glibc left at bias + each of ``offsets`` (uint64 p_vaddr-relative
        offsets); OracleError naming the offset when one is not inside a writable PT_LOAD."""
        values = np.zeros(len(offsets), dtype=np.uint64)
        found = np.zeros(len(offsets), dtype=bool)
        for vaddr, data in self.writable.items():
            inside = (offsets >= vaddr) & (offsets + 8 <= vaddr + len(data))
            starts = (offsets[inside] - vaddr).astype(np.int64)
            raw = np.frombuffer(data, dtype=np.uint8)[starts[:, None] + np.arange(8)]
            values[inside] = raw.copy().view("<u8").reshape(-1)
            found |= inside
        if not found.all():
            bad = int(offsets[~found][0])
            raise OracleError(f"{self.key}: r_offset {bad:#x} is in no writable PT_LOAD")
        return values


def attribute(values: np.ndarray, spans: Sequence[Span]) -> list[tuple[str | None, int]]:
    """Each value as (key of the span holding it, value - its bias), or (None, value).

    0 is always (None, 0). A value in [lo, hi) of a span belongs to it; otherwise a value
    equal to a span's hi (one past its last byte) belongs to that span; otherwise None.
    ``spans`` must not overlap.
    """
    values = np.asarray(values, dtype=np.uint64)
    ordered = sorted(spans, key=lambda span: span.lo)
    owner = np.full(len(values), -1)
    if ordered:
        los = np.array([span.lo for span in ordered], dtype=np.uint64)
        his = np.array([span.hi for span in ordered], dtype=np.uint64)
        below = np.clip(np.searchsorted(los, values, side="right") - 1, 0, None)
        inside = (values >= los[below]) & (values < his[below])
        ending = np.clip(np.searchsorted(his, values, side="left"), 0, len(ordered) - 1)
        at_end = ~inside & (his[ending] == values)
        owner = np.where(inside, below, np.where(at_end, ending, -1))
    owner[values == 0] = -1
    return [(None, value) if index < 0 else (ordered[index].key, value - ordered[index].bias)
            for value, index in zip(values.tolist(), owner.tolist(), strict=True)]


@dataclass
class GlibcImage:
    """glibc's process image: ``objects`` in link-map order (the vDSO included)."""

    objects: list[OracleObject]

    def object(self, key: str) -> OracleObject:
        """The object whose ``key`` (soname, else name) is ``key``; KeyError if none."""
        for obj in self.objects:
            if obj.key == key:
                return obj
        raise KeyError(f"no object {key!r} in {[o.key for o in self.objects]}")

    def spans(self) -> list[Span]:
        """Every object's span, in link-map order."""
        return [obj.span for obj in self.objects]

    def words(self, obj: OracleObject | str) -> dict[int, tuple[str | None, int]]:
        """r_offset -> normalised word, for every symbol relocation of ``obj`` (an object or
        its key); see the module docstring. Empty for the vDSO."""
        if isinstance(obj, str):
            obj = self.object(obj)
        if obj.path is None:
            return {}
        offsets = symbol_relocations(obj.path)["offset"]
        attributed = attribute(obj.words_at(offsets), self.spans())
        return dict(zip(offsets.tolist(), attributed, strict=True))

    def all_words(self) -> dict[str, dict[int, tuple[str | None, int]]]:
        """key -> ``words`` of that object, for every object."""
        return {obj.key: self.words(obj) for obj in self.objects}


def _dynamic(elf: ELFFile) -> DynamicSegment | None:
    """The PT_DYNAMIC segment of ``elf`` (pyelftools), or None."""
    for segment in elf.iter_segments():
        if isinstance(segment, DynamicSegment):
            return segment
    return None


def _dynamic_tags(elf: ELFFile) -> dict[str, int]:
    """The numeric dynamic tags of ``elf`` (tag name -> value; the first of each)."""
    tags: dict[str, int] = {}
    dynamic = _dynamic(elf)
    for tag in dynamic.iter_tags() if dynamic is not None else ():
        tags.setdefault(tag.entry.d_tag, tag.entry.d_val)
    return tags


def _rela_table(elf: ELFFile, data: bytes, start: int, size: int) -> np.ndarray:
    """The Elf64_Rela entries at virtual address ``start``, ``size`` bytes, of ``elf``."""
    if size == 0:
        return np.zeros(0, dtype=RELA)
    offset = next(elf.address_offsets(start), None)
    if offset is None or offset + size > len(data):
        raise OracleError(f"relocation table at {start:#x} is outside the file")
    return np.frombuffer(data, dtype=RELA, count=size // RELA.itemsize, offset=offset)


@functools.lru_cache(maxsize=64)
def symbol_relocations(path: str) -> np.ndarray:
    """Every R_X86_64_64, GLOB_DAT and JUMP_SLOT relocation with a symbol (index not 0) of the
    file ``path``, in file order (DT_RELA, then DT_JMPREL), as a structured array of
    ("offset", "type", "symbol": the .dynsym index, "addend"), read through pyelftools' view of
    the dynamic segment."""
    data = Path(path).read_bytes()
    with open(path, "rb") as f:
        elf = ELFFile(f)
        tags = _dynamic_tags(elf)
        if "DT_REL" in tags:
            raise OracleError(f"{path}: DT_REL relocations (x86-64 uses DT_RELA)")
        entries = np.concatenate([
            _rela_table(elf, data, tags.get("DT_RELA", 0), tags.get("DT_RELASZ", 0)),
            _rela_table(elf, data, tags.get("DT_JMPREL", 0), tags.get("DT_PLTRELSZ", 0))])
    kinds, symbols = entries["info"] & 0xFFFFFFFF, entries["info"] >> 32
    chosen = np.isin(kinds, SYMBOL_RELOCATION_TYPES) & (symbols != 0)
    out = np.zeros(int(chosen.sum()), dtype=[("offset", "<u8"), ("type", "<u4"),
                                             ("symbol", "<u4"), ("addend", "<i8")])
    out["offset"], out["type"] = entries["offset"][chosen], kinds[chosen]
    out["symbol"], out["addend"] = symbols[chosen], entries["addend"][chosen]
    _, first = np.unique(out["offset"], return_index=True)   # DT_RELA may cover DT_JMPREL
    out = out[np.sort(first)]
    out.flags.writeable = False
    return out


def relocation_symbols(path: str) -> dict[int, tuple[str, int, bool]]:
    """r_offset -> (symbol name, relocation type, whether the symbol is a weak undefined one),
    for every relocation ``symbol_relocations(path)`` lists (names from pyelftools' .dynsym)."""
    with open(path, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        if not isinstance(dynsym, SymbolTableSection):
            raise OracleError(f"{path}: no .dynsym section")
        out = {}
        for offset, kind, index, _ in symbol_relocations(path).tolist():
            symbol = dynsym.get_symbol(index)
            weak_undefined = (symbol["st_shndx"] == "SHN_UNDEF"
                              and symbol["st_info"]["bind"] == "STB_WEAK")
            out[offset] = (symbol.name, kind, weak_undefined)
    return out


def _gcc(where: Path, *args: str) -> None:
    """Run gcc in ``where``; OracleError with its output when it fails."""
    done = subprocess.run(["gcc", "-O1", "-Wall", *args], cwd=where, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise OracleError(f"gcc {' '.join(args)} failed:\n{done.stderr}")


@functools.cache
def _tools() -> dict[str, Path]:
    """The oracle's own C programs, built once per Python process into a temporary directory
    removed at exit: "dlopen_driver", "exec_dumper"."""
    where = Path(tempfile.mkdtemp(prefix="vmsim-glibc-oracle-"))
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    dump, out = str(SOURCES / "dump.c"), {}
    out["dlopen_driver"] = where / "dlopen_driver"
    _gcc(where, "-Wl,-z,now", "-o", "dlopen_driver", str(SOURCES / "dlopen_driver.c"), dump)
    out["exec_dumper"] = where / "libvmsim_oracle_dump.so"
    _gcc(where, "-fPIC", "-shared", "-fvisibility=hidden", "-o", out["exec_dumper"].name,
         str(SOURCES / "exec_dumper.c"), dump)
    return out


def exec_dumper() -> Path:
    """The dumper library ``glibc_exec_image`` puts last in LD_PRELOAD (part of the image)."""
    return _tools()["exec_dumper"]


def dlopen_driver() -> Path:
    """The main program ``glibc_dlopen_image`` runs (the image's first object)."""
    return _tools()["dlopen_driver"]


def _environment(library_path: Sequence[str | os.PathLike[str]], **extra: str) -> dict[str, str]:
    """This process's environment without any LD_* variable, plus LD_LIBRARY_PATH (when
    ``library_path`` is given) and ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("LD_")}
    if library_path:
        env["LD_LIBRARY_PATH"] = ":".join(os.fspath(p) for p in library_path)
    env.update(extra)
    return env


def _run(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Run ``argv`` in a fresh process; OracleError with its stderr unless it exits 0."""
    done = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    if done.returncode:
        raise OracleError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")


class _Reader:
    """Sequential reads from a dump (format: tests/oracle/dump.c)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes; OracleError when the dump ends first."""
        if self.at + n > len(self.data):
            raise OracleError(f"dump truncated at byte {self.at} (wanted {n} more)")
        self.at += n
        return self.data[self.at - n:self.at]

    def u64(self) -> int:
        """The next little-endian 64-bit integer."""
        return int.from_bytes(self.take(8), "little")


def _soname(path: str) -> str | None:
    """DT_SONAME of the file ``path`` (pyelftools), None when it has none."""
    with open(path, "rb") as f:
        dynamic = _dynamic(ELFFile(f))
        for tag in dynamic.iter_tags("DT_SONAME") if dynamic is not None else ():
            return str(tag.soname)
    return None


def _read_object(reader: _Reader, main_path: str, at_startup: bool) -> OracleObject:
    """One object's record of a dump; the main program (l_name "") gets ``main_path``."""
    name = reader.take(reader.u64()).decode()
    bias, phnum, modid = reader.u64(), reader.u64(), reader.u64()
    phdrs = [PHDR.unpack(reader.take(PHDR.size)) for _ in range(phnum)]
    loads = [(vaddr, memsz, flags) for kind, flags, _, vaddr, _, _, memsz, _ in phdrs
             if kind == PT_LOAD]
    writable = {vaddr: reader.take(memsz) for vaddr, memsz, flags in loads if flags & PF_W}
    path: str | None = name or main_path
    if name == VDSO_NAME and not os.path.exists(name):
        path = None
    soname = _soname(path) if path is not None else VDSO_NAME
    return OracleObject(name or main_path, soname, bias, loads, modid, path, at_startup,
                        writable)


def read_dump(data: bytes, main_path: str) -> GlibcImage:
    """The image a dump (tests/oracle/dump.c's format) describes."""
    reader = _Reader(data)
    if reader.take(len(DUMP_MAGIC)) != DUMP_MAGIC:
        raise OracleError("not an oracle dump (bad magic)")
    startup = reader.u64()
    objects: list[OracleObject] = []
    while reader.at < len(data):
        objects.append(_read_object(reader, main_path, len(objects) < startup))
    return GlibcImage(objects)


def glibc_dlopen_image(path: str | os.PathLike[str], *, bind: str = "now",
                       scope: str = "local",
                       library_path: Sequence[str | os.PathLike[str]] = ()) -> GlibcImage:
    """The image after glibc's dlopen(path, RTLD_NOW|RTLD_LAZY, RTLD_LOCAL|RTLD_GLOBAL) in a
    fresh main program linked against libc only; ``library_path`` becomes LD_LIBRARY_PATH.
    ``bind="now"`` runs it with LD_BIND_NOW=1 (module docstring). ``path`` is passed to dlopen
    as given (a name without "/" is searched)."""
    if bind not in ("now", "lazy") or scope not in ("local", "global"):
        raise ValueError(f"bind must be now|lazy and scope local|global, not {bind}, {scope}")
    driver = dlopen_driver()
    with tempfile.TemporaryDirectory(prefix="vmsim-oracle-run-") as where:
        out = Path(where) / "image.bin"
        extra = {"LD_BIND_NOW": "1"} if bind == "now" else {}
        _run([str(driver), "dump", str(out), os.fspath(path), bind, scope],
             _environment(library_path, **extra))
        return read_dump(out.read_bytes(), str(driver))


def glibc_exec_image(program: str | os.PathLike[str], *,
                     preload: Sequence[str | os.PathLike[str]] = (),
                     library_path: Sequence[str | os.PathLike[str]] = ()) -> GlibcImage:
    """The image ld.so builds at startup for ``program`` with LD_BIND_NOW=1 and LD_PRELOAD =
    ``preload`` then ``exec_dumper()`` (which is in the image: module docstring);
    ``library_path`` becomes LD_LIBRARY_PATH. The program's own code does not run."""
    preloads = [os.fspath(p) for p in preload] + [str(exec_dumper())]
    with tempfile.TemporaryDirectory(prefix="vmsim-oracle-run-") as where:
        out = Path(where) / "image.bin"
        _run([os.fspath(program)], _environment(
            library_path, LD_BIND_NOW="1", LD_PRELOAD=":".join(preloads),
            VMSIM_ORACLE_DUMP=str(out)))
        if not out.exists():
            raise OracleError(f"{program} ran without the dumper (not dynamically linked?)")
        return read_dump(out.read_bytes(), os.fspath(program))


INIT_LIBRARIES = {"d": (), "b": ("d",), "c": ("d",), "a": ("b", "c"), "f": (), "e": ("f",),
                  "g": (), "top": ("a", "e", "g")}
"""The init/fini fixture's graph (library -> DT_NEEDED, in order): the diamond a -> {b, c} -> d,
the cycle e <-> f (f's DT_NEEDED on e is added in a second link), g with DT_INIT/DT_FINI as well
as DT_INIT_ARRAY/DT_FINI_ARRAY, and top needing a, e, g. The program "prog" needs top and has a
DT_PREINIT_ARRAY. Each file is liborder_<name>.so with that soname and DT_RUNPATH $ORIGIN (the
prefix keeps "c" from becoming a libc.so)."""


def _init_library(where: Path, name: str, needed: Sequence[str]) -> Path:
    """Build ``where/liborder_<name>.so`` from initlib.c, needing ``needed`` (in that order)."""
    dt_init = ["-DWITH_DT_INIT", "-Wl,-init=oracle_dt_init,-fini=oracle_dt_fini"]
    flags = [*(dt_init if name == "g" else []), f"-Wl,-soname,liborder_{name}.so"]
    _gcc(where, "-fPIC", "-shared", f'-DLIB_NAME="{name}"', *flags, "-o", f"liborder_{name}.so",
         str(SOURCES / "initlib.c"), "-L.", "-Wl,--no-as-needed",
         *(f"-lorder_{dep}" for dep in needed), "-Wl,--enable-new-dtags,-rpath,$ORIGIN")
    return where / f"liborder_{name}.so"


def init_order_fixture(where: Path) -> dict[str, Path]:
    """Build the init/fini fixture (``INIT_LIBRARIES``) into ``where``: name -> path, with
    "a".."g", "top" and "prog"."""
    out = {name: _init_library(where, name, needed) for name, needed in INIT_LIBRARIES.items()}
    out["f"] = _init_library(where, "f", ("e",))     # now that liborder_e.so exists: the cycle
    _gcc(where, '-DLIB_NAME="prog"', "-DPROGRAM", "-o", "prog", str(SOURCES / "initlib.c"),
         "-L.", "-Wl,--no-as-needed", "-lorder_top", "-Wl,--enable-new-dtags,-rpath,$ORIGIN")
    out["prog"] = where / "prog"
    return out


def malloc_fixture(where: Path) -> dict[str, Path]:
    """Build the exec-mode fixture into ``where``: "pie" and "nopie" (malloc_prog.c: malloc,
    free, printf, its own data, libc's ``stdout``: a COPY relocation in "nopie") and
    "malloc_preload" (malloc_preload.c: interposes malloc/free/calloc/realloc)."""
    _gcc(where, "-fPIE", "-pie", "-o", "pie", str(SOURCES / "malloc_prog.c"))
    _gcc(where, "-fno-pie", "-no-pie", "-o", "nopie", str(SOURCES / "malloc_prog.c"))
    _gcc(where, "-fPIC", "-shared", "-o", "libmalloc_preload.so",
         str(SOURCES / "malloc_preload.c"))
    return {"pie": where / "pie", "nopie": where / "nopie",
            "malloc_preload": where / "libmalloc_preload.so"}


def glibc_init_fini(path: str | os.PathLike[str], *, mode: str = "dlopen",
                    library_path: Sequence[str | os.PathLike[str]] = ()
                    ) -> tuple[list[str], list[str]]:
    """The "<lib>:<which>" lines the init_order_fixture objects log under glibc, split into
    (inits: preinit_array, init, init_array; finis: fini_array, fini), each in run order.

    mode "dlopen": a fresh main program linked against libc only (``dlopen_driver()``) dlopens
    ``path`` (RTLD_NOW | RTLD_LOCAL), dlcloses it and _exits. mode "exec": runs the program
    ``path`` to its exit.
    """
    if mode not in ("dlopen", "exec"):
        raise ValueError(f"mode must be dlopen or exec, not {mode!r}")
    argv = [os.fspath(path)] if mode == "exec" else [str(dlopen_driver()), "initfini",
                                                     os.fspath(path)]
    with tempfile.TemporaryDirectory(prefix="vmsim-oracle-run-") as where:
        log = Path(where) / "init.log"
        _run(argv, _environment(library_path, **{INIT_LOG_VARIABLE: str(log)}))
        lines = log.read_text().splitlines() if log.exists() else []
    inits = [line for line in lines if line.split(":")[-1] in INIT_KINDS]
    return inits, [line for line in lines if line.split(":")[-1] not in INIT_KINDS]


def objects_in_order(lines: Sequence[str]) -> list[str]:
    """The library names of ``lines`` ("<lib>:<which>") in order of first appearance."""
    return list(dict.fromkeys(line.split(":")[0] for line in lines))
