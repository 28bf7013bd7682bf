"""Loader features checked against glibc and the ABI: init/fini order (vs glibc's dlopen and
dlclose of the same file), ET_EXEC at its fixed address, COPY relocations, IRELATIVE and TLS
on the simulator (glibc's own libc.so.6: RELR, IRELATIVE, TLS), symbol versions in a loaded
libc, the extern mapping of the stub resolver.
"""

from __future__ import annotations

import ctypes
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from loader_support import (  # noqa: F401  (fixture_libs_fixture is a pytest fixture)
    fixture_libs_fixture,
    glibc_init_fini,
    machine_elf_libraries,
    sim_factory,
)

from loader import ElfSegmentError, load
from loader.libc import LibcMmap
from loader.reloc import X86_64, Kind
from vmsim.fuzz.isolate import run_isolated

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")


def _sim() -> Any:
    return sim_factory()()


def _relocation_type_names(path: Path) -> list[str]:
    """The dynamic relocation types in ``path``, one per entry, as readelf prints them."""
    done = subprocess.run(["readelf", "-rW", str(path)], capture_output=True, text=True,
                          check=True)
    return [m.group(1) for m in re.finditer(r"^\s*[0-9a-f]+\s+[0-9a-f]+\s+(R_X86_64_\w+)",
                                             done.stdout, re.M)]


def _host_init_fini(path: Path) -> tuple[str, str, list[int], list[int]]:
    """In a child: load, read the init log, point trail at a buffer, unload, read it."""
    obj = load(path, LibcMmap())
    log = ctypes.string_at(obj.symbol("log_")).decode()
    out = ctypes.create_string_buffer(16)
    ctypes.c_void_p.from_address(obj.symbol("trail")).value = ctypes.addressof(out)
    obj.unload()
    bias = obj.load_bias
    return log, out.value.decode(), [a - bias for a in obj.inits], [a - bias for a in obj.finis]


def test_init_and_fini_order_match_glibc(fixture_libs: dict[str, Path]) -> None:
    path = fixture_libs["initfini"]
    status, (inits, finis, init_addrs, fini_addrs) = run_isolated(_host_init_fini, path)
    assert status == "ok"
    assert (inits, finis) == glibc_init_fini(path) == ("IAB", "xyF")
    # The simulator records the same functions in the same order, and runs none.
    mm = _sim()
    obj = load(path, mm)
    assert [a - obj.load_bias for a in obj.inits] == init_addrs
    assert mm.read(obj.symbol("log_"), 1) == b"\0"
    assert init_addrs[0] == obj.symbol("init_hook") - obj.load_bias
    obj.unload()
    assert [a - obj.load_bias for a in obj.finis] == fini_addrs
    assert fini_addrs[-1] == obj.symbol("fini_hook") - obj.load_bias
    assert mm.maps() == []


def test_et_exec_at_its_fixed_address_on_the_simulator(fixture_libs: dict[str, Path]) -> None:
    mm = _sim()
    obj = load(fixture_libs["exec"], mm)
    assert obj.load_bias == 0
    assert obj.span[0] == 0x400000
    assert obj.span[0] <= obj.image.e_entry < obj.span[1]
    with pytest.raises(ElfSegmentError, match="load address"):
        load(fixture_libs["exec"], mm)      # the range is taken now: a clear error
    with pytest.raises(ElfSegmentError, match="base"):
        load(fixture_libs["exec"], _sim(), base=0x800000)
    obj.unload()


def _host_exec(path: Path) -> tuple[str, int, int]:
    """In a child: ET_EXEC on the host, where 0x400000 is free or not."""
    try:
        obj = load(path, LibcMmap())
    except ElfSegmentError as exc:
        return "refused", 0, len(str(exc))
    table = next(t for t in obj.tables.relocs if (t.r_type == 5).any())   # R_X86_64_COPY
    place = table.r_offset[table.r_type == 5][0] + obj.load_bias
    copied = struct.unpack("<Q", obj.mm.read(int(place), 8))[0]
    dlvsym = ctypes.CDLL(None).dlvsym
    dlvsym.restype = ctypes.c_void_p
    dlvsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    source = dlvsym(None, b"__environ", b"GLIBC_2.2.5")     # S: the definition in scope
    return "loaded", copied, ctypes.c_void_p.from_address(source).value or 0


def test_et_exec_on_the_host_and_copy_relocation(fixture_libs: dict[str, Path]) -> None:
    status, (how, copied, environ) = run_isolated(_host_exec, fixture_libs["exec"])
    assert status == "ok"
    if how == "loaded":
        assert copied == environ != 0     # COPY brought st_size bytes over from S
    else:
        assert copied == 0                # the refusal named the load address


def test_libc_on_the_simulator_irelative_tls_relr() -> None:
    mm = _sim()
    obj = load(LIBC, mm)
    rel = obj.relocations
    assert rel.by_type["R_X86_64_IRELATIVE"] == len(rel.irelative) > 0
    assert rel.by_type["R_X86_64_RELATIVE"] >= len(obj.tables.relr) > 0
    assert rel.tls is not None and rel.tls.module_id == 1
    tpoff = [t for t, r in X86_64.items() if r.kind is Kind.TLS_TPOFF]
    for table in obj.tables.relocs:
        for off in table.r_offset[(table.r_type == tpoff[0])].tolist():
            value = struct.unpack("<q", mm.read(off + obj.load_bias, 8))[0]
            assert -rel.tls.tp_offset <= value < 0      # variant II: below the thread pointer
    # An IRELATIVE place holds the resolver's address (recorded, not run).
    place, resolver = rel.irelative[0]
    assert struct.unpack("<Q", mm.read(place, 8))[0] == resolver
    assert obj.symbol("memcpy@GLIBC_2.14") != obj.symbol("memcpy@GLIBC_2.2.5")
    with pytest.raises(KeyError):
        obj.symbol("no_such_function")


def test_stub_resolver_extern_mapping(fixture_libs: dict[str, Path]) -> None:
    mm = _sim()
    obj = load(fixture_libs["now"], mm)
    rel = obj.relocations
    assert rel.extern_range is not None and rel.unresolved == []
    lo, hi = rel.extern_range
    assert "strlen@GLIBC_2.2.5" in rel.extern
    assert all(lo <= a < hi for a in rel.extern.values())
    assert [r.perms for r in mm.maps() if r.start == lo] == ["r--p"]
    assert "weak_missing" not in " ".join(rel.extern)
    assert obj.outcome().extern == rel.extern


def test_every_library_of_this_machine_loads_on_the_simulator() -> None:
    """Every ELF shared object in /usr/lib/x86_64-linux-gnu loads (no dependency, stubs for
    imports) with the plan's predicted protections, and unloads to an empty address space."""
    count = 0
    for path in machine_elf_libraries():
        mm = _sim()
        obj = load(path, mm)
        count += 1
        predicted = [p.rwx + "p" for p in obj.plan.page_prots()]
        assert obj.outcome().page_perms(obj.plan.page_size) == predicted, path
        obj.unload()
        assert mm.maps() == [], path
    assert count > 100


def test_tlsdesc_on_the_simulator(fixture_libs: dict[str, Path]) -> None:
    """R_X86_64_TLSDESC (gcc -mtls-dialect=gnu2; Mesa's libEGL uses it): the descriptor's
    argument is the static TLS offset, below the thread pointer; its function word (ld.so's,
    absent) is 0 and recorded."""
    path = fixture_libs["tlsdesc"]
    kinds = _relocation_type_names(path)
    assert "R_X86_64_TLSDESC" in kinds, kinds  # the judge: readelf's view of the file
    mm = _sim()
    obj = load(path, mm)
    rel = obj.relocations
    assert rel.by_type["R_X86_64_TLSDESC"] == len(rel.tlsdesc) == kinds.count("R_X86_64_TLSDESC")
    assert rel.tls is not None
    for place in rel.tlsdesc:
        func, arg = struct.unpack("<Qq", mm.read(place, 16))
        assert func == 0
        assert -rel.tls.tp_offset <= arg < 0
