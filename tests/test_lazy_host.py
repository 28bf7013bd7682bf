"""Lazy binding (``loader.lazy``): the trampoline's listing against this machine's assembler,
the lazy GOT against pyelftools (gcc fixtures, plain and IBT PLTs, and the machine's own
libraries), and on the host the PLT at work: each load that runs code does so in a forked
child (``run_isolated``), the fixture built from tests/lazy_fixture/lazy.c at test time.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Section, SymbolTableSection

from loader import HostResolver, LoadedObject, load
from loader.elf import ElfImage, parse_image
from loader.elfdefs import R_X86_64
from loader.errors import ElfDynamicError, ElfError, ElfRelocationError, ElfSymbolError
from loader.isolate import run_isolated
from loader.lazy import (
    CODE,
    FAILED_OFFSET,
    LISTING,
    RESOLVE_OFFSET,
    HostLazyBinder,
    LazyGot,
    LazyTrampoline,
    binds_now,
    lazy_got,
    make_lazy,
    slot_wanted,
)
from loader.libc import LibcMmap
from loader.mmap import Mmap, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from loader.tables import DynamicTables, parse_tables

FIXTURE = Path(__file__).parent / "lazy_fixture" / "lazy.c"
BUILDS = {
    "plain": ["-Wl,-z,lazy"],
    "ibt": ["-fcf-protection=full", "-Wl,-z,lazy,-z,ibtplt"],
    "now": ["-Wl,-z,relro,-z,now"],
}
"""gcc on this machine (Debian 12, gcc 12) emits the plain PLT for ``-z lazy``, even with
``-fcf-protection`` (its crt files carry no IBT property); ``-z ibtplt`` asks for the IBT PLT:
``endbr64`` entries in .plt and the ``jmp *slot`` ones in .plt.sec."""

LAZY_KINDS = ("plain", "ibt")
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")


@pytest.fixture(scope="session")
def lazy_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture built once per session, once per entry of BUILDS."""
    where = tmp_path_factory.mktemp("lazy_fixture")
    out = {}
    for name, flags in BUILDS.items():
        out[name] = where / f"lazy_{name}.so"
        subprocess.run(["gcc", "-O1", "-fPIC", "-shared", *flags, "-o", str(out[name]),
                        str(FIXTURE)], check=True, capture_output=True)
    return out


# --- oracles: pyelftools and the file's own code -----------------------------------------------


def elftools_slots(path: Path) -> list[tuple[int, int, str, int]]:
    """(index in .rela.plt, r_offset, symbol name, the word the file holds there) of every
    JUMP_SLOT, read with pyelftools (section headers: an independent path)."""
    with path.open("rb") as f:
        elf = ELFFile(f)
        rela = elf.get_section_by_name(".rela.plt")
        assert isinstance(rela, RelocationSection)
        syms = elf.get_section(rela["sh_link"])
        assert isinstance(syms, SymbolTableSection)
        out = []
        for i, rel in enumerate(rela.iter_relocations()):
            if rel["r_info_type"] != R_X86_64.JUMP_SLOT:
                continue
            at = next(elf.address_offsets(rel["r_offset"], 8))
            f.seek(at)
            word = int.from_bytes(f.read(8), "little")
            out.append((i, rel["r_offset"], syms.get_symbol(rel["r_info_sym"]).name, word))
        return out


def pushed_index(path: Path, vaddr: int) -> int | None:
    """The immediate of the ``push $imm32`` at ``vaddr`` in the file (after an ``endbr64``
    for an IBT PLT entry), or None when the code there is something else."""
    with path.open("rb") as f:
        elf = ELFFile(f)
        f.seek(next(elf.address_offsets(vaddr, 9)))
        code = f.read(9)
    code = code[4:] if code.startswith(bytes.fromhex("f30f1efa")) else code
    return int.from_bytes(code[1:5], "little") if code[0] == 0x68 else None


def parsed(path: Path) -> tuple[ElfImage, DynamicTables]:
    """The project's ElfImage and DynamicTables of ``path`` (nothing mapped)."""
    image = parse_image(path.read_bytes(), HOST_PAGE_SIZE)
    return image, parse_tables(image)


# --- the listing ---------------------------------------------------------------------------------


def test_listing_assembles_to_the_code(tmp_path: Path) -> None:
    """``as`` turns LISTING into exactly CODE, with its labels where the module says."""
    (tmp_path / "t.s").write_text(LISTING)
    subprocess.run(["as", "-o", "t.o", "t.s"], cwd=tmp_path, check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "t.o", "t.bin"], cwd=tmp_path,
                   check=True)
    assert (tmp_path / "t.bin").read_bytes() == CODE
    nm = subprocess.run(["nm", "t.o"], cwd=tmp_path, check=True, capture_output=True,
                        text=True).stdout.split()
    labels = {nm[k + 2]: int(nm[k], 16) for k in range(0, len(nm), 3)}
    assert labels == {"lazy_trampoline": 0, "lazy_failed": FAILED_OFFSET,
                      "resolve": RESOLVE_OFFSET}
    assert RESOLVE_OFFSET % 8 == 0 and len(CODE) == RESOLVE_OFFSET + 8


def test_trampoline_page_is_read_exec_and_unmapped_by_close() -> None:
    """The page is r-x once made (never writable and executable at once), holds CODE with
    the callback's address in place of the zero word; close unmaps it, twice is harmless."""
    mm = LibcMmap()
    tramp = LazyTrampoline(mm, lambda got1, index: 0)
    region = next(r for r in mm.maps() if r.start <= tramp.address < r.end)
    assert (region.start, region.prot) == (tramp.address, ProtFlags.PROT_READ | ProtFlags.PROT_EXEC)
    page = mm.read(tramp.address, len(CODE))
    assert page[:RESOLVE_OFFSET] == CODE[:RESOLVE_OFFSET]
    assert int.from_bytes(page[RESOLVE_OFFSET:], "little") == \
        ctypes.cast(tramp._callback, ctypes.c_void_p).value
    tramp.close()
    tramp.close()
    assert not any(r.start <= tramp.address < r.end for r in mm.maps())


# --- the lazy GOT, pure --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LAZY_KINDS)
def test_fixture_has_the_plt_kind_asked(lazy_libs: dict[str, Path], kind: str) -> None:
    """The IBT build has .plt.sec and the plain one does not (the fixture is what it claims)."""
    with lazy_libs[kind].open("rb") as f:
        names = {s.name for s in ELFFile(f).iter_sections()}
    assert (".plt.sec" in names) == (kind == "ibt")


@pytest.mark.parametrize("kind", LAZY_KINDS)
def test_lazy_got_equals_pyelftools(lazy_libs: dict[str, Path], kind: str) -> None:
    """Indices, slots, symbols and lazy values (bias added) equal pyelftools' .rela.plt; each
    lazy value is the PLT code that pushes its own index."""
    path = lazy_libs[kind]
    image, tables = parsed(path)
    bias = 0x7F00_0000_0000
    got = lazy_got(image, tables, bias)
    want = elftools_slots(path)
    assert got.index.tolist() == [i for i, _, _, _ in want]
    assert got.slot.tolist() == [off + bias for _, off, _, _ in want]
    assert got.lazy_value.tolist() == [word + bias for _, _, _, word in want]
    assert [slot_wanted(got, tables, i).name for i, _, _, _ in want] == \
        [name for _, _, name, _ in want]
    assert [pushed_index(path, word) for _, _, _, word in want] == [i for i, _, _, _ in want]
    assert got.got == tables.tags[3] + bias and (got.got1, got.got2) == (got.got + 8, got.got + 16)
    assert not binds_now(tables)


def test_slot_wanted_names_symbol_version_and_refuses_other_indices(
        lazy_libs: dict[str, Path]) -> None:
    """The symbol a slot wants, with its version; an index that is not a JUMP_SLOT's (past
    the table, negative, absurd) is an ElfRelocationError naming it."""
    image, tables = parsed(lazy_libs["plain"])
    got = lazy_got(image, tables, 0)
    wanted = {w.name: w for w in (slot_wanted(got, tables, int(i)) for i in got.index)}
    assert (wanted["strlen"].version, wanted["snprintf"].version) == ("GLIBC_2.2.5",) * 2
    assert wanted["fx_mix"].version is None
    for bad in (len(got.index), -1, 1 << 63, (1 << 64) - 1):
        with pytest.raises(ElfRelocationError, match="DT_JMPREL index"):
            slot_wanted(got, tables, bad)


def test_bind_now_object_is_refused_lazily(lazy_libs: dict[str, Path]) -> None:
    """A ``-z now`` object says so, and its slots (sealed by RELRO) cannot be made lazy."""
    image, tables = parsed(lazy_libs["now"])
    assert binds_now(tables)
    with pytest.raises(ElfRelocationError, match="PT_GNU_RELRO"):
        lazy_got(image, tables, 0)


def _section(elf: ELFFile, name: str) -> Section:
    """The section called ``name``, which must be there."""
    found = elf.get_section_by_name(name)
    assert found is not None, name
    return found


def _dynamic_entry(path: Path, tag: str) -> int:
    """The file offset of the first dynamic entry with ``d_tag`` ``tag`` ("DT_PLTGOT"),
    found with pyelftools."""
    with path.open("rb") as f:
        dynamic = ELFFile(f).get_section_by_name(".dynamic")
        assert isinstance(dynamic, DynamicSection)
        for i, entry in enumerate(dynamic.iter_tags()):
            if entry.entry.d_tag == tag:
                return int(dynamic["sh_offset"]) + 16 * i
    raise LookupError(tag)


def _patched(path: Path, at: int, value: int, width: int = 8) -> tuple[ElfImage, DynamicTables]:
    """The project's parse of ``path`` with the ``width`` bytes at file offset ``at`` set to
    ``value``."""
    data = bytearray(path.read_bytes())
    data[at: at + width] = value.to_bytes(width, "little")
    image = parse_image(bytes(data), HOST_PAGE_SIZE)
    return image, parse_tables(image)


def test_lazy_got_refuses_what_it_cannot_make_lazy(lazy_libs: dict[str, Path]) -> None:
    """Each refusal names what it read: no DT_PLTGOT, a GOT in code, a slot that is not
    8-aligned, a lazy value outside the object's code (the first call would jump there)."""
    path = lazy_libs["plain"]
    pltgot = _dynamic_entry(path, "DT_PLTGOT")
    slots = elftools_slots(path)
    with path.open("rb") as f:
        elf = ELFFile(f)
        text = _section(elf, ".text")["sh_addr"]
        rela = _section(elf, ".rela.plt")["sh_offset"]
        slot_at = next(elf.address_offsets(slots[0][1], 8))
    cases = [
        (pltgot, 21, ElfDynamicError, "DT_PLTGOT = 0x0"),           # the tag becomes DT_DEBUG
        (pltgot + 8, text, ElfDynamicError, f"DT_PLTGOT = {text:#x}"),
        (rela, slots[0][1] + 4, ElfRelocationError, r"DT_JMPREL\[0\] JUMP_SLOT r_offset"),
        (slot_at, 0, ElfRelocationError, r"DT_JMPREL\[0\] lazy value = 0x0"),
    ]
    for at, value, error, message in cases:
        image, tables = _patched(path, at, value)
        with pytest.raises(error, match=message):
            lazy_got(image, tables, 0)


class _NoWrites:
    """An Mmap stand-in that fails any write: for calls that must write nothing."""

    def write_words(self, addrs: Any, values: Any) -> None:
        raise AssertionError(f"write_words({addrs}, {values})")


def test_without_jmprel_there_is_no_lazy_state(lazy_libs: dict[str, Path]) -> None:
    """No DT_JMPREL (its tag made DT_DEBUG): no GOT, no slots, and make_lazy writes nothing."""
    path = lazy_libs["plain"]
    image, tables = _patched(path, _dynamic_entry(path, "DT_JMPREL"), 21)
    got = lazy_got(image, tables, 0x1000)
    assert (got.got, len(got.index), len(got.slot), len(got.lazy_value)) == (0, 0, 0, 0)
    make_lazy(cast(Mmap, _NoWrites()), got, 1, 2)


def test_an_unknown_object_is_a_kept_failure() -> None:
    """The binder's callback for a GOT[1] it does not know (KeyError) is kept as a failure
    and answered with the failure path (called from Python here: no native code runs)."""
    binder = HostLazyBinder(LibcMmap())
    try:
        tramp = binder.trampoline
        assert tramp._call(0x1234, 0) == tramp.failed_address == tramp.address + FAILED_OFFSET
        assert [(f.got1, f.reloc_index, type(f.error)) for f in tramp.failures] == \
            [(0x1234, 0, KeyError)]
        with pytest.raises(KeyError):
            tramp.check()
        assert tramp.failures == []
    finally:
        binder.close()


def _lazy_capable(count: int) -> list[Path]:
    """The ``count`` smallest libraries of this machine with a DT_JMPREL that may be bound
    lazily (read by the project's parser)."""
    found = []
    files = sorted((p for p in LIBDIR.glob("lib*.so.*") if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.stat().st_size)
    for path in files:
        try:
            _, tables = parsed(path)
        except ElfError:  # the parser's own tests judge these; not lazy binding's concern
            continue
        if any(t.name == "DT_JMPREL" for t in tables.relocs) and not binds_now(tables):
            found.append(path)
        if len(found) == count:
            break
    return found


def _check_machine_libraries(paths: list[Path]) -> None:
    """The lazy GOT of each equals pyelftools and every lazy value is code pushing its own
    index."""
    for path in paths:
        image, tables = parsed(path)
        got = lazy_got(image, tables, 0)
        want = elftools_slots(path)
        assert got.lazy_value.tolist() == [word for *_, word in want], path
        assert [pushed_index(path, w) for *_, w in want] == got.index.tolist(), path


def test_lazy_got_of_machine_libraries_pushes_each_index() -> None:
    """The 25 smallest of the machine's lazily bindable libraries."""
    paths = _lazy_capable(25)
    assert len(paths) == 25
    _check_machine_libraries(paths)


@pytest.mark.slow
def test_lazy_got_of_every_machine_library() -> None:
    """All of them (157 libraries, 27,269 JUMP_SLOTs on the machine this was written on)."""
    paths = _lazy_capable(1 << 20)
    assert len(paths) > 25
    _check_machine_libraries(paths)


def test_make_lazy_on_the_simulator(lazy_libs: dict[str, Path]) -> None:
    """make_lazy works through any Mmap: on the simulator the slots read back as their lazy
    values, GOT[1] and GOT[2] as given (written before RELRO would seal them). The
    trampoline itself is refused there: nothing can run it."""
    from vmsim import AddressSpace

    mm = AddressSpace()
    obj = load(lazy_libs["plain"], mm)
    got = lazy_got(obj.image, obj.tables, obj.load_bias)
    with _relro_open(obj, mm):
        make_lazy(mm, got, 0x1234, 0x5678)
    assert _words(mm, got.slot) == got.lazy_value.tolist()
    assert _words(mm, [got.got1, got.got2]) == [0x1234, 0x5678]
    with pytest.raises(ValueError, match="does not run code"):
        LazyTrampoline(mm, lambda got1, index: 0)


# --- on the host: the PLT at work, in a forked child --------------------------------------------


class _relro_open:
    """Within: the object's RELRO writable (GOT[1] and GOT[2] lie in it in ld's lazy
    layout; a loader writes them before sealing, a test after)."""

    def __init__(self, obj: LoadedObject, mm: Mmap) -> None:
        self.obj, self.mm = obj, mm

    def _protect(self, prot: ProtFlags) -> None:
        if self.obj.relro is not None:
            lo, hi = self.obj.relro
            self.mm.mprotect(lo, hi - lo, prot)

    def __enter__(self) -> None:
        self._protect(ProtFlags.PROT_READ | ProtFlags.PROT_WRITE)

    def __exit__(self, *exc: object) -> None:
        self._protect(ProtFlags.PROT_READ)


def _words(mm: Mmap, addrs: Any) -> list[int]:
    """The 64-bit words at ``addrs``."""
    return [int.from_bytes(mm.read(int(a), 8), "little") for a in addrs]


Lookup = Callable[[str, "str | None"], "int | None"]


OWN = {"fx_mix": "mix_impl", "fx_count": "al_impl"}
"""The fixture's undefined functions and the fixture functions the tests bind them to."""


def _scope(obj: LoadedObject) -> Lookup:
    """The host's scope (dlvsym), with the fixture's undefined functions bound as ``OWN``
    says; each lookup first does float work, so the callback surely clobbers xmm registers."""
    host = HostResolver()

    def lookup(name: str, version: str | None) -> int | None:
        np.sin(np.arange(64.0) * 0.37).sum()
        return obj.symbol(OWN[name]) if name in OWN else host.scope(name, version)

    return lookup


def _lazy_object(path: str, lookup_of: Callable[[LoadedObject], Lookup]
                 ) -> tuple[LoadedObject, LazyGot, HostLazyBinder, list[int]]:
    """Load ``path`` on the host (bound now), then put it in the lazy state through a
    HostLazyBinder; also returns the slots' words as the eager load wrote them."""
    mm = LibcMmap()
    obj = load(path, mm)
    got = lazy_got(obj.image, obj.tables, obj.load_bias)
    eager = _words(mm, got.slot)
    binder = HostLazyBinder(mm)
    with _relro_open(obj, mm):
        binder.attach(got, obj.tables, lookup_of(obj))
    return obj, got, binder, eager


def _functions(obj: LoadedObject) -> dict[str, Any]:
    """The fixture's functions as ctypes callables."""
    c = ctypes
    return {
        "fx_len": c.CFUNCTYPE(c.c_size_t, c.c_char_p)(obj.symbol("fx_len")),
        "fx_format": c.CFUNCTYPE(c.c_int, c.c_char_p, c.c_size_t, c.c_double, c.c_int)(
            obj.symbol("fx_format")),
        "call_mix": c.CFUNCTYPE(c.c_double)(obj.symbol("call_mix")),
        "call_count": c.CFUNCTYPE(c.c_long)(obj.symbol("call_count")),
    }


def _first_calls(path: str) -> dict[str, Any]:
    """In the child: each slot before and after the first call through it, what the calls
    returned, the binds the callback saw."""
    obj, got, binder, eager = _lazy_object(path, _scope)
    fn, mm = _functions(obj), obj.mm
    names = {int(i): slot_wanted(got, obj.tables, int(i)).name for i in got.index}
    slot_of = {names[int(i)]: int(s) for i, s in zip(got.index, got.slot, strict=True)}
    out: dict[str, Any] = {"lazy": dict(zip(names.values(), got.lazy_value.tolist(), strict=True)),
                           "eager": dict(zip(names.values(), eager, strict=True)),
                           "before": dict(zip(names.values(), _words(mm, got.slot), strict=True)),
                           "after": {}}
    buf = ctypes.create_string_buffer(64)
    calls: dict[str, Callable[[], Any]] = {"strlen": lambda: fn["fx_len"](b"lazy binding"),
             "snprintf": lambda: (fn["fx_format"](buf, 64, 2.718281828459045, -7), buf.value),
             "fx_mix": lambda: (fn["call_mix"](), list((ctypes.c_double * 16).from_address(
                 obj.symbol("seen")))),
             "fx_count": lambda: fn["call_count"](),
             }
    out["results"] = {}
    for name, call in calls.items():
        out["results"][name] = call()
        out["after"][name] = _words(mm, [slot_of[name]])[0]
    out["again"] = fn["fx_len"](b"second call")
    out["bound"] = [(b.reloc_index, b.name, b.version, b.target) for b in binder.bound]
    out["failures"] = [repr(f) for f in binder.trampoline.failures]
    host = HostResolver()
    out["dlvsym"] = {n: host.scope(n, "GLIBC_2.2.5") for n in ("strlen", "snprintf")}
    out["own"] = {name: obj.symbol(impl) for name, impl in OWN.items()}
    return out


@pytest.mark.parametrize("kind", LAZY_KINDS)
def test_first_call_binds_and_patches_the_slot(lazy_libs: dict[str, Path], kind: str) -> None:
    """Before its first call a slot holds its PLT address (plus bias); the first call goes
    through the trampoline to the callback with the slot's DT_JMPREL index, which binds it
    to the libc function (the one the eager load bound); later calls go straight there.
    strlen is a tail call (``jmp strlen@plt``), snprintf varargs with a double (%al = 1),
    fx_mix has 7 integer and 9 double arguments (two on the stack), fx_count is varargs bound
    to code that returns the %al it got."""
    path = lazy_libs[kind]
    got = run_isolated(_first_calls, str(path), timeout=30.0, max_rss=512 << 20)
    assert got.status == "ok"
    r = got.value
    assert r["failures"] == []
    assert r["before"] == r["lazy"]
    assert r["after"] == {**r["dlvsym"], **r["own"]}
    assert {n: r["eager"][n] for n in r["dlvsym"]} == r["dlvsym"]
    assert r["results"]["strlen"] == len(b"lazy binding") and r["again"] == len(b"second call")
    assert r["results"]["snprintf"] == (len("2.7182818284590451 -7"), b"2.7182818284590451 -7")
    assert r["results"]["fx_mix"] == (8.5, [1, 2, 3, 4, 5, 6, 7, .5, 1.5, 2.5, 3.5, 4.5, 5.5,
                                            6.5, 7.5, 8.5])
    assert r["results"]["fx_count"] == 1
    index = {name: i for i, _, name, _ in elftools_slots(path)}
    assert r["bound"] == [(index["strlen"], "strlen", "GLIBC_2.2.5", r["dlvsym"]["strlen"]),
                          (index["snprintf"], "snprintf", "GLIBC_2.2.5",
                           r["dlvsym"]["snprintf"]),
                          (index["fx_mix"], "fx_mix", None, r["own"]["fx_mix"]),
                          (index["fx_count"], "fx_count", None, r["own"]["fx_count"])]


def _two_threads(path: str) -> dict[str, Any]:
    """In the child: two threads make their first call through the same lazy slot at once;
    the strlen lookup returns only once both callbacks are inside (a barrier), so both
    threads are in the trampoline together. Then each makes 500 more calls."""
    gate = threading.Barrier(2, timeout=10.0)

    def lookup_of(obj: LoadedObject) -> Lookup:
        scope = _scope(obj)

        def lookup(name: str, version: str | None) -> int | None:
            if name == "strlen":
                gate.wait()
            return scope(name, version)
        return lookup

    obj, _, binder, _ = _lazy_object(path, lookup_of)
    fx_len = _functions(obj)["fx_len"]
    results: list[list[int]] = [[], []]

    def run(k: int) -> None:
        for n in range(501):
            results[k].append(fx_len(b"t" * (n + k)))

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "bound": [(b.reloc_index, b.name) for b in binder.bound],
            "failures": [repr(f) for f in binder.trampoline.failures]}


def test_two_threads_in_the_trampoline_at_once(lazy_libs: dict[str, Path]) -> None:
    """Both threads bind the same slot (two binds of one index, as under glibc) and every
    call of either returns the right length."""
    path = lazy_libs["plain"]
    got = run_isolated(_two_threads, str(path), timeout=30.0, max_rss=512 << 20)
    assert got.status == "ok"
    r = got.value
    assert r["failures"] == []
    index = {name: i for i, _, name, _ in elftools_slots(path)}["strlen"]
    assert r["bound"] == [(index, "strlen")] * 2
    assert r["results"] == [list(range(501)), list(range(1, 502))]


def _failing_binds(path: str) -> dict[str, Any]:
    """In the child: a lookup that raises, then one that finds nothing, then one that works;
    what each call returned, what was kept, what check() raised."""
    mode = ["raise"]

    def lookup_of(obj: LoadedObject) -> Lookup:
        scope = _scope(obj)

        def lookup(name: str, version: str | None) -> int | None:
            if mode[0] == "raise":
                raise RuntimeError(f"no {name} today")
            return None if mode[0] == "missing" else scope(name, version)
        return lookup

    obj, got, binder, _ = _lazy_object(path, lookup_of)
    fx_len, tramp = _functions(obj)["fx_len"], binder.trampoline
    out: dict[str, Any] = {"lazy": got.lazy_value.tolist()}
    for step in ("raise", "missing"):
        mode[0] = step
        out[step] = fx_len(b"hello")
        out[f"{step} kept"] = [(f.reloc_index, type(f.error).__name__) for f in tramp.failures]
        out[f"{step} slots"] = _words(obj.mm, got.slot)
        try:
            tramp.check()
        except (RuntimeError, ElfSymbolError) as exc:
            out[f"{step} raised"] = (type(exc).__name__, str(exc), exc.__notes__)
        out[f"{step} left"] = len(tramp.failures)
    mode[0] = "works"
    out["works"] = fx_len(b"hello")
    return out


def test_a_failing_resolve_crashes_nothing(lazy_libs: dict[str, Path]) -> None:
    """A lookup that raises, or finds nothing: the call returns 0, the process lives, the
    error is kept with its index, the slot stays lazy; check() raises it (noting the index)
    and forgets it; the next call with a working lookup binds and returns the right value."""
    path = lazy_libs["plain"]
    got = run_isolated(_failing_binds, str(path), timeout=30.0, max_rss=512 << 20)
    assert got.status == "ok"
    r = got.value
    index = {name: i for i, _, name, _ in elftools_slots(path)}["strlen"]
    assert (r["raise"], r["missing"], r["works"]) == (0, 0, 5)
    assert r["raise kept"] == [(index, "RuntimeError")]
    assert r["missing kept"] == [(index, "ElfSymbolError")]
    assert r["raise slots"] == r["missing slots"] == r["lazy"]
    note = f"lazy binding of DT_JMPREL index {index} for GOT[1]="
    kind, text, notes = r["raise raised"]
    assert (kind, text) == ("RuntimeError", "no strlen today") and notes[0].startswith(note)
    kind, text, notes = r["missing raised"]
    assert kind == "ElfSymbolError" and "strlen@GLIBC_2.2.5" in text
    assert r["raise left"] == r["missing left"] == 0
