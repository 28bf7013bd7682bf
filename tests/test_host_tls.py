"""loader.hosttls: TLS and C++ exceptions of the objects our loader maps into this process.

Fixtures (tests/hosttls_fixture/) are built with this machine's g++/gcc once per session: a C++
library with thread_local state and exceptions, a C library with a 64-byte-aligned __thread
variable, each in the gnu (``__tls_get_addr``) and gnu2 (TLS descriptor) dialects. libstdc++
is not in this Python process: each child dlopens it through glibc first (RTLD_GLOBAL), so it
is used in place and only the fixture is ours. Every load runs in a forked child
(``run_isolated``): a bug here kills the process.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import loader
from loader.ehframe import EhFrame, _check_terminated, register_eh_frame
from loader.elf import MemoryBytes, parse_image
from loader.elfdefs import STT, st_type
from loader.errors import ElfError, ElfSegmentError, ElfUnsupportedError
from loader.hosttls import (
    CODE,
    MAX_BLOCK,
    MODULE_ID_BASE,
    HostTls,
    check_no_initial_exec,
    glibc_tls_module,
    listing_lines,
)
from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.symbols import Finder, HostResolver, find, thread_pointer
from loader.tables import parse_tables

SOURCES = Path(__file__).parent / "hosttls_fixture"
DIALECTS = {"gnu": [], "gnu2": ["-mtls-dialect=gnu2"]}


def _build(compiler: str, args: list[str]) -> None:
    """Run the compiler; a failure fails the test with its output."""
    done = subprocess.run([compiler, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{compiler} {' '.join(args)} failed:\n{done.stderr}")


@pytest.fixture(scope="session")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> path of each fixture library, built once per session."""
    out = tmp_path_factory.mktemp("hosttls")
    made: dict[str, Path] = {}
    for dialect, flags in DIALECTS.items():
        made[f"cxx-{dialect}"] = out / f"libtlsfix-{dialect}.so"
        _build("g++", ["-O1", "-fPIC", "-shared", *flags, "-o", str(made[f"cxx-{dialect}"]),
                       str(SOURCES / "tlsfix.cpp")])
        made[f"c-{dialect}"] = out / f"libtlsc-{dialect}.so"
        _build("gcc", ["-O1", "-fPIC", "-shared", *flags, "-o", str(made[f"c-{dialect}"]),
                       str(SOURCES / "tlsfix_c.c")])
    made["c-ie"] = out / "libtlsc-ie.so"
    _build("gcc", ["-O1", "-fPIC", "-shared", "-ftls-model=initial-exec", "-o",
                   str(made["c-ie"]), str(SOURCES / "tlsfix_c.c")])
    made["preserve"] = out / "libpreserve.so"
    _build("gcc", ["-shared", "-o", str(made["preserve"]), str(SOURCES / "preserve.S")])
    return made


def _load(path: Path, tls: HostTls, *hooks: Finder) -> loader.LoadedObject:
    """Load ``path`` with its TLS in ``tls`` (placed by the resolver, before init) and
    ``hooks`` after ``tls.find`` in the resolver chain."""
    image = parse_image(MemoryBytes(path.read_bytes()), tls.mm.page_size)
    tables = parse_tables(image)
    layout = tls.add_module(image, tables=tables) if image.tls is not None else None
    resolver = tls.resolver(layout)
    resolver.pre_find.extend(hooks)
    return loader.load(path, tls.mm, resolver=resolver, tls=layout)


LIBSTDCXX = Path("/usr/lib/x86_64-linux-gnu/libstdc++.so.6")
LIBSTDCXX_BY = ("glibc", "ours")
"""Who loads the libstdc++ the C++ fixture binds to: glibc (in place: numpy, imported by
``loader``, brought it in already) or our loader, a second copy beside glibc's that the
fixture binds to first (its own TLS then one of our modules, its .eh_frame registered)."""


def _defined_in(obj: loader.LoadedObject, name: str, version: str | None) -> int | None:
    """A resolver hook: the address of ``obj``'s definition of name[@version], or None.
    TLS variables are passed on to the TLS scope (``HostTls.module_of``)."""
    i = find(obj.tables, f"{name}@{version}" if version else name)
    if i is None or st_type(int(obj.tables.symtab[i]["st_info"])) == STT.TLS:
        return None
    return obj.symbol(f"{name}@{version}" if version else name)


def _cxx_load(path: Path, libstdcxx_by: str) -> tuple[loader.LoadedObject, EhFrame]:
    """The C++ fixture loaded by our loader, its .eh_frame registered, over libstdc++
    loaded by ``libstdcxx_by``."""
    tls = HostTls(LibcMmap())
    if libstdcxx_by == "glibc":
        ctypes.CDLL(str(LIBSTDCXX), mode=ctypes.RTLD_GLOBAL)
        obj = _load(path, tls)
    else:
        ctypes.CDLL("libgcc_s.so.1", mode=ctypes.RTLD_GLOBAL)
        std = _load(LIBSTDCXX, tls)
        register_eh_frame(std)
        obj = _load(path, tls, partial(_defined_in, std))
    return obj, register_eh_frame(obj)


def _function(obj: loader.LoadedObject, name: str, restype: Any, *argtypes: Any) -> Any:
    """The object's function ``name`` as a ctypes function (called without the GIL)."""
    return ctypes.CFUNCTYPE(restype, *argtypes)(obj.symbol(name))


def _in_two_threads(work: Callable[[], Any]) -> list[Any]:
    """``work()`` in two threads alive at the same time (a barrier before and after, so
    neither can reuse the other's thread pointer); their results."""
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(k: int) -> None:
        barrier.wait()
        results[k] = work()
        barrier.wait()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_listing_assembles_to_the_code(tmp_path: Path) -> None:
    """The instructions of the listing, assembled by this machine's ``as``, are the bytes
    beside them."""
    source = tmp_path / "code.s"
    source.write_text(".text\n" + "\n".join(text for _, text in listing_lines()) + "\n")
    _build("as", ["-o", str(tmp_path / "code.o"), str(source)])
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "code.o"),
                    str(tmp_path / "code.bin")], check=True)
    assert (tmp_path / "code.bin").read_bytes() == CODE


def _cxx_threads(path: Path, libstdcxx_by: str) -> dict[str, Any]:
    obj, _ = _cxx_load(path, libstdcxx_by)
    bump = _function(obj, "bump_counter", ctypes.c_int)
    hidden = _function(obj, "bump_hidden", ctypes.c_int)
    tally = _function(obj, "bump_tally", ctypes.c_long)
    where = _function(obj, "counter_address", ctypes.c_void_p)
    main = [bump(), bump()]

    def work() -> tuple[list[int], list[int], list[int], int]:
        return ([bump() for _ in range(300)], [hidden() for _ in range(3)],
                [tally() for _ in range(3)], where())

    results = _in_two_threads(work)
    once = _function(obj, "call_once_twice", ctypes.c_int)()
    native = [_function(obj, "bump_in_std_thread", ctypes.c_int)() for _ in range(2)]
    return {"main": [*main, bump()], "threads": results, "main_at": where(), "once": once,
            "native": native,
            "constructions": _function(obj, "tally_constructions", ctypes.c_int)()}


@pytest.mark.parametrize("libstdcxx_by", LIBSTDCXX_BY)
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_cxx_thread_local_per_thread(libs: dict[str, Path], dialect: str,
                                     libstdcxx_by: str) -> None:
    """Two threads and the main thread each count from the initial values (7, 3, and a
    constructed Tally) in their own blocks, general dynamic and TLS descriptors alike.
    std::call_once reaches libstdc++'s TLS (``__once_call``) through its module id, glibc's
    real one or ours. std::threads the fixture starts (unknown to Python) count from 7."""
    got = run_isolated(_cxx_threads, libs[f"cxx-{dialect}"], libstdcxx_by, timeout=60.0)
    assert got.status == "ok"
    value = got.value
    assert value["main"] == [8, 9, 10]
    addresses = {value["main_at"]}
    for counts, hidden, tally, at in value["threads"]:
        assert counts == list(range(8, 308))
        assert hidden == [5, 7, 9]
        assert tally == [1001, 1002, 1003]
        addresses.add(at)
    assert len(addresses) == 3
    assert value["constructions"] == 2          # one Tally per thread that touched it
    assert value["once"] == 1
    assert value["native"] == [10, 10]          # std::threads: each from 7 again


def _cxx_exceptions(path: Path, libstdcxx_by: str, deregister: bool) -> list[int]:
    obj, eh = _cxx_load(path, libstdcxx_by)
    inside = _function(obj, "throw_inside", ctypes.c_int, ctypes.c_int)
    across = _function(obj, "catch_across", ctypes.c_int, ctypes.c_int)
    if deregister:
        eh.deregister()
    got = [inside(0), inside(3), inside(12), across(0), across(1)]
    return got + _in_two_threads(lambda: across(1) + inside(5))


@pytest.mark.parametrize("libstdcxx_by", LIBSTDCXX_BY)
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_cxx_exceptions_unwind_through_our_code(libs: dict[str, Path], dialect: str,
                                                libstdcxx_by: str) -> None:
    """throw/catch inside the fixture, and a std::runtime_error thrown by an extern "C"
    function and caught by its caller, in the main thread and two others."""
    got = run_isolated(_cxx_exceptions, libs[f"cxx-{dialect}"], libstdcxx_by, False,
                       timeout=60.0)
    assert got.status == "ok"
    assert got.value == [0, 100 + len("boom 3"), 100 + len("boom 12"), 0, 42, 148, 148]


def test_exceptions_need_the_registration(libs: dict[str, Path]) -> None:
    """Once the .eh_frame is deregistered, the unwinder cannot find the fixture's frames:
    the throw ends in std::terminate (abort)."""
    got = run_isolated(_cxx_exceptions, libs["cxx-gnu"], "glibc", True, timeout=60.0)
    assert got.status == "SIGABRT"


def _c_threads(path: Path) -> dict[str, Any]:
    tls = HostTls(LibcMmap())
    obj = _load(path, tls)
    where = _function(obj, "value_address", ctypes.c_void_p)
    bump = _function(obj, "bump_value", ctypes.c_long)
    zeros = _function(obj, "zeros_sum", ctypes.c_int)

    def work() -> tuple[int, list[int], list[int]]:
        return where(), [bump() for _ in range(3)], [zeros() for _ in range(2)]

    threads = _in_two_threads(work)
    return {"threads": threads, "main": work(), "blocks": _blocks_after_exit(tls)}


def _blocks_after_exit(tls: HostTls) -> int:
    """How many threads still hold blocks, once the exited threads' key destructors ran
    (they run after ``join`` returns: waited for, within a generous bound)."""
    for _ in range(1000):
        if tls.threads_with_blocks() <= 1:
            break
        time.sleep(0.01)
    return tls.threads_with_blocks()


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_c_aligned_thread_variable(libs: dict[str, Path], dialect: str) -> None:
    """A 64-byte-aligned __thread long of initial value 0x1234567 and 100 zero bytes: each
    thread's block is aligned, initialised and its own; an exited thread's blocks are
    freed."""
    got = run_isolated(_c_threads, libs[f"c-{dialect}"], timeout=60.0)
    assert got.status == "ok"
    value = got.value
    seen = [*value["threads"], value["main"]]
    for at, bumps, zeros in seen:
        assert at % 64 == 0
        assert bumps == [0x1234568, 0x1234569, 0x123456A]
        assert zeros == [0, 1]
    assert len({at for at, _, _ in seen}) == 3
    assert value["blocks"] == 1                 # only the main thread's are left


def _desc_registers(c_path: Path, preserve: Path) -> tuple[list[int], int, int]:
    tls = HostTls(LibcMmap())
    obj = _load(c_path, tls)
    harness = ctypes.CDLL(str(preserve))
    harness.desc_preserves.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    layout = tls.add_module(obj.image, obj.load_bias)      # a second module, same image
    assert layout.descriptor is not None
    desc = (ctypes.c_uint64 * 2)(*layout.descriptor(layout.module_id, 8))
    out = (ctypes.c_uint64 * 32)()
    harness.desc_preserves(ctypes.addressof(desc), ctypes.addressof(out))
    return list(out), thread_pointer(), tls.block(layout.module_id)


def test_tls_descriptor_keeps_every_register(libs: dict[str, Path]) -> None:
    """The descriptor function returns address - thread pointer in %rax and gives back
    every other general register and every %xmm register as it found them, called with a
    stack that is not 16-byte aligned (the Python callback behind it uses all of them)."""
    got = run_isolated(_desc_registers, libs["c-gnu2"], libs["preserve"], timeout=60.0)
    assert got.status == "ok"
    out, tp, block = got.value
    pattern = 0x0101010101010101
    assert (out[0] + tp) % (1 << 64) == block + 8
    assert out[1:14] == [k * pattern for k in range(1, 14)]
    assert out[16:32] == [0x1000 + k for k in range(16)]


def _glibc_module() -> tuple[tuple[int, int] | None, int, int, int]:
    ctypes.CDLL(str(LIBSTDCXX), mode=ctypes.RTLD_GLOBAL)
    tls = HostTls(LibcMmap())
    found = glibc_tls_module("_ZSt11__once_call")
    assert found is not None
    index = (ctypes.c_uint64 * 2)(*found)
    real = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)
    glibc_addr = HostResolver().scope("__tls_get_addr", None)
    assert glibc_addr is not None
    by_glibc = real(glibc_addr)(ctypes.addressof(index))
    by_ours = real(tls.tls_get_addr)(ctypes.addressof(index))
    dlsym = HostResolver().scope("_ZSt11__once_call", None) or 0
    return found, by_glibc, by_ours, dlsym


def test_glibc_module_lookup_and_forwarding() -> None:
    """libstdc++'s ``std::__once_call`` (a TLS variable of an object glibc loaded): the
    lookup gives its module id and offset; glibc's __tls_get_addr and ours (forwarding an
    id below ours to glibc) both give the address dlsym gives."""
    got = run_isolated(_glibc_module, timeout=60.0)
    assert got.status == "ok"
    found, by_glibc, by_ours, dlsym = got.value
    assert found is not None and 0 < found[0] < MODULE_ID_BASE
    assert by_glibc == by_ours == dlsym != 0


def _unknown_module() -> None:
    tls = HostTls(LibcMmap())
    index = (ctypes.c_uint64 * 2)(MODULE_ID_BASE + 99, 0)
    ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)(tls.tls_get_addr)(
        ctypes.addressof(index))


def test_unknown_module_aborts() -> None:
    """A tls_index naming no module of ours: the process aborts (no wrong address)."""
    assert run_isolated(_unknown_module, timeout=60.0).status == "SIGABRT"


def _initial_exec(path: Path) -> None:
    tls = HostTls(LibcMmap())
    _load(path, tls)


def test_initial_exec_refused(libs: dict[str, Path]) -> None:
    """An object reaching its own TLS through initial-exec: refused by name before the
    load (``check_no_initial_exec``), and by the relocation pass if loaded anyway."""
    path = libs["c-ie"]
    image = parse_image(MemoryBytes(path.read_bytes()), LibcMmap().page_size)
    with pytest.raises(ElfUnsupportedError, match=r"libtlsc-ie\.so.*initial-exec"):
        check_no_initial_exec(parse_tables(image), str(path))
    check_no_initial_exec(parse_tables(parse_image(MemoryBytes(libs["c-gnu"].read_bytes()),
                                                   image.page_size)), "gnu")
    with pytest.raises(ElfError, match="TPOFF64"):
        run_isolated(_initial_exec, path, timeout=60.0)


def _remove_and_close(path: Path) -> tuple[int, int, int, bool]:
    tls = HostTls(LibcMmap())
    obj = _load(path, tls)
    assert obj.relocations.tls is not None
    _function(obj, "bump_value", ctypes.c_long)()
    before = tls.threads_with_blocks()
    tls.remove_module(obj.relocations.tls.module_id)
    after = tls.threads_with_blocks()
    code = tls.code
    tls.close()
    tls.close()
    return before, after, code, any(r.start <= code < r.end for r in tls.mm.maps())


def test_remove_module_and_close(libs: dict[str, Path]) -> None:
    """remove_module frees the module's blocks; close unmaps the native code (twice: once)."""
    got = run_isolated(_remove_and_close, libs["c-gnu"], timeout=60.0)
    assert got.status == "ok"
    before, after, _, still_mapped = got.value
    assert (before, after, still_mapped) == (1, 0, False)


def test_huge_tls_block_refused(libs: dict[str, Path]) -> None:
    """A PT_TLS asking for more than MAX_BLOCK bytes (or alignment) per thread is refused
    before any module is made."""
    image = parse_image(MemoryBytes(libs["c-gnu"].read_bytes()), LibcMmap().page_size)
    assert image.tls is not None
    tls = HostTls(LibcMmap())
    try:
        for field in ("p_memsz", "p_align"):
            huge = replace(image, tls=replace(image.tls, **{field: MAX_BLOCK * 2}))
            with pytest.raises(ElfSegmentError, match="PT_TLS p_memsz, p_align"):
                tls.add_module(huge, 0)
    finally:
        tls.close()


class _FakeObject:
    """What register_eh_frame's helpers read of an object: one PT_LOAD holding ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data, self.path, self.load_bias = data, "fake.so", 0
        self.image = SimpleNamespace(loads=[SimpleNamespace(p_vaddr=0, p_filesz=len(data))])
        self.mm = SimpleNamespace(read=lambda at, n: data[at: at + n])


def test_eh_frame_needs_its_terminator() -> None:
    """libgcc walks .eh_frame to a zero length word: records that run to the end of their
    segment without one are refused; a 64-bit length is stepped over."""
    cie = (20).to_bytes(4, "little") + bytes(20)
    long_record = b"\xff\xff\xff\xff" + (8).to_bytes(8, "little") + bytes(8)
    _check_terminated(_FakeObject(cie + long_record + bytes(4)), 0)      # type: ignore[arg-type]
    with pytest.raises(ElfSegmentError, match="no zero terminator"):
        _check_terminated(_FakeObject(cie + long_record), 0)              # type: ignore[arg-type]
