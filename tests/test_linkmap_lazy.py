"""LinkMap's lazy binding, the facts notebook 07 shows: a lazy JUMP_SLOT holds the address of
its PLT entry's ``push $index`` until its first call and the function after it, the other slots
stay lazy, GOT[1] names the object and GOT[2] is the trampoline's page; bind="now" and a ``-z
now`` object bind every slot at load. Host loads run in a forked child (``run_isolated``);
the oracles are pyelftools (the files' own tables and words), the PLT code in memory and glibc's
own dlsym (ctypes). Fixtures: gcc-built libleaf/libmid, as in the notebook.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path
from typing import Any, Literal

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from loader.elfdefs import DT
from loader.isolate import run_isolated
from loader.lazy import CODE, RESOLVE_OFFSET
from loader.libc import LibcMmap
from loader.linkmap import LinkMap
from loader.mmap import Mmap
from loader.pipeline import LoadedObject
from tests.test_lazy_host import elftools_slots

LEAF_C = r"""
#include <stdlib.h>
int leaf(int x) { return 3 * x + 1; }
int leaf_env(void) { return getenv("LEAF_NEVER_SET") != 0; }   /* getenv@plt, never called */
"""
MID_C = r"""
#include <string.h>
int leaf(int x);
int mid(int x) { return leaf(x) + 1; }
size_t count(const char *s) { return strlen(s); }
"""
JUMP_SLOT = "R_X86_64_JUMP_SLOT"
Bind = Literal["now", "lazy"]
PUSH = 0x68
"""The opcode of ``push $imm32``: what a lazy slot's value points at."""


@pytest.fixture(scope="session")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """libleaf.so (lazy), libmid.so (lazy, needs libleaf) and libmid-now.so (``-z now``)."""
    where = tmp_path_factory.mktemp("plt")
    (where / "leaf.c").write_text(LEAF_C)
    (where / "mid.c").write_text(MID_C)
    deps = ["mid.c", "-L.", "-lleaf", "-Wl,-rpath,$ORIGIN"]
    builds = {"leaf": ["-Wl,-z,lazy", "-o", "libleaf.so", "leaf.c"],
              "mid": ["-Wl,-z,lazy", "-o", "libmid.so", *deps],
              "now": ["-Wl,-z,now", "-o", "libmid-now.so", *deps]}
    for args in builds.values():
        subprocess.run(["gcc", "-O1", "-fPIC", "-shared", *args], cwd=where, check=True,
                       capture_output=True)
    return {"leaf": where / "libleaf.so", "mid": where / "libmid.so",
            "now": where / "libmid-now.so"}


# --- oracles: pyelftools ------------------------------------------------------------------------


def file_slots(path: Path) -> dict[str, tuple[int, int, int]]:
    """Per JUMP_SLOT symbol of ``path``: (index in .rela.plt, r_offset, the word the file holds
    there), read with pyelftools (``tests.test_lazy_host.elftools_slots``)."""
    return {name: (index, off, word) for index, off, name, word in elftools_slots(path)}


def file_word(path: Path, vaddr: int) -> int:
    """The 64-bit word the file holds at ``vaddr``."""
    with path.open("rb") as f:
        f.seek(next(ELFFile(f).address_offsets(vaddr, 8)))
        return int.from_bytes(f.read(8), "little")


def symbol_value(path: Path, name: str) -> int:
    """``st_value`` of the dynamic symbol ``name`` of ``path``."""
    with path.open("rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        assert isinstance(dynsym, SymbolTableSection)
        found = dynsym.get_symbol_by_name(name)
        assert found, name
        return int(found[0]["st_value"])


def glibc_dlsym(name: str) -> int:
    """What glibc's dlsym(RTLD_DEFAULT, name) gives in this process (an IFUNC's choice)."""
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value or 0


# --- in the child ------------------------------------------------------------------------------


def _word(mm: Mmap, addr: int) -> int:
    return int.from_bytes(mm.read(addr, 8), "little")


def _perms(mm: Mmap, addr: int) -> str:
    """The protection of the region holding ``addr`` ("r-xp")."""
    return next(r.perms for r in mm.maps() if r.start <= addr < r.end)


def _state(lm: LinkMap) -> dict[str, Any]:
    """Per object our loader loaded: its bias, GOT[0..2] and the GOT's address, and per JUMP_SLOT
    (value, target, pending, the protection of the slot's page, the 5 bytes at the value when
    it lies in the object)."""
    out: dict[str, Any] = {}
    for obj in lm.objects:
        if not isinstance(obj, LoadedObject) or DT.PLTGOT not in obj.tables.tags:
            continue
        got = obj.tables.tags[DT.PLTGOT] + obj.load_bias
        out[obj.name] = {"bias": obj.load_bias, "got": got,
                         "GOT": [_word(lm.mm, got + 8 * k) for k in range(3)], "slots": {}}
    for b in lm.bindings():
        if b.object in out and b.type == JUMP_SLOT:
            obj = next(o for o in lm.objects if o.name == b.object)
            inside = obj.span[0] <= b.value < obj.span[1]
            out[b.object]["slots"][b.symbol] = {
                "value": b.value, "target": b.target, "pending": b.pending,
                "page": _perms(lm.mm, b.r_offset + obj.load_bias),
                "code": lm.mm.read(b.value, 5) if inside else None}
    return out


def _host_lazy(path: str, bind: Bind, calls: bool) -> dict[str, Any]:
    """In the child: dlopen ``path``; the state at load; with ``calls``, mid(5), the state,
    mid(6), the state, count(...), the state. Also what the trampoline page holds and what
    glibc's dlsym gives for strlen."""
    mm = LibcMmap()
    lm = LinkMap(mm)
    lib = lm.dlopen(path, bind=bind)
    out: dict[str, Any] = {"load": _state(lm), "glibc strlen": glibc_dlsym("strlen")}
    resolver = out["load"][lib.name]["GOT"][2]
    if resolver:
        out["GOT[2] page"] = _perms(mm, resolver)
        out["GOT[2] page start"] = next(r.start for r in mm.maps() if r.start <= resolver < r.end)
        out["GOT[2] code"] = mm.read(resolver, RESOLVE_OFFSET)
    out["leaf"] = lm.dlsym(lib, "leaf")
    mid = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lm.dlsym(lib, "mid"))
    count = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_char_p)(lm.dlsym(lib, "count"))
    if calls:
        out["mid(5)"] = mid(5)
        out["after mid"] = _state(lm)
        out["mid(6)"] = mid(6)
        out["after mid again"] = _state(lm)
        out["count"] = count(b"lazy binding")
        out["after count"] = _state(lm)
    lm.unload()
    return out


def host(path: Path, bind: Bind, calls: bool = True) -> dict[str, Any]:
    """``_host_lazy`` in a forked child; it must end normally."""
    run = run_isolated(_host_lazy, str(path), bind, calls, timeout=30.0, max_rss=512 << 20)
    assert run.status == "ok"
    return dict(run.value)


# --- the host ----------------------------------------------------------------------------------


def test_lazy_slots_point_at_their_push_before_any_call(libs: dict[str, Path]) -> None:
    """Each JUMP_SLOT of a lazy object holds the file's word plus the load bias, where the
    code is ``push $index`` with the slot's index in .rela.plt; pending, its target known."""
    r = host(libs["mid"], "lazy", calls=False)
    mid = r["load"]["libmid.so"]
    want = file_slots(libs["mid"])
    assert sorted(mid["slots"]) == sorted(want) == ["leaf", "strlen"]
    for name, (index, _, word) in want.items():
        slot = mid["slots"][name]
        assert slot["value"] == word + mid["bias"]
        assert slot["code"] == bytes([PUSH]) + index.to_bytes(4, "little")
        assert slot["pending"] and slot["page"] == "rw-p"
    assert (mid["slots"]["leaf"]["target"], mid["slots"]["strlen"]["target"]) == \
        ("libleaf.so", "libc.so.6")


def test_got1_names_the_object_and_got2_is_the_trampoline(libs: dict[str, Path]) -> None:
    """GOT[0] keeps the file's word (the link-time _DYNAMIC); GOT[1] is the GOT's own address
    (the host binder's name for the object); GOT[2] is the start of an r-x page holding the
    trampoline's code, one page for both lazy objects (libmid and libleaf)."""
    r = host(libs["mid"], "lazy", calls=False)
    for name, path in (("libmid.so", libs["mid"]), ("libleaf.so", libs["leaf"])):
        state = r["load"][name]
        got0 = file_word(path, state["got"] - state["bias"])
        assert state["GOT"][:2] == [got0, state["got"]], name
    resolvers = {r["load"][name]["GOT"][2] for name in ("libmid.so", "libleaf.so")}
    assert resolvers == {r["GOT[2] page start"]}
    assert r["GOT[2] page"] == "r-xp"
    assert r["GOT[2] code"] == CODE[:RESOLVE_OFFSET]


def test_first_call_binds_its_slot_and_no_other(libs: dict[str, Path]) -> None:
    """mid(5) binds the leaf slot to leaf in libleaf (bias + st_value, what dlsym gives); the
    strlen slot and libleaf's getenv slot stay lazy; a second call changes nothing."""
    r = host(libs["mid"], "lazy")
    leaf = r["load"]["libleaf.so"]["bias"] + symbol_value(libs["leaf"], "leaf")
    assert (r["mid(5)"], r["mid(6)"], r["leaf"]) == (17, 20, leaf)
    before, after = r["load"], r["after mid"]
    assert after["libmid.so"]["slots"]["leaf"] == {**before["libmid.so"]["slots"]["leaf"],
                                                   "value": leaf, "pending": False, "code": None}
    assert after["libmid.so"]["slots"]["strlen"] == before["libmid.so"]["slots"]["strlen"]
    assert after["libleaf.so"] == before["libleaf.so"]
    assert before["libleaf.so"]["slots"]["getenv"]["pending"]
    assert r["after mid again"] == after


def test_lazy_strlen_binds_to_what_glibc_chooses(libs: dict[str, Path]) -> None:
    """strlen is an IFUNC: its first call binds the slot to the implementation glibc's own
    dlsym gives (the resolver's choice), and count returns the right length."""
    r = host(libs["mid"], "lazy")
    assert r["count"] == len(b"lazy binding")
    slot = r["after count"]["libmid.so"]["slots"]["strlen"]
    assert (slot["value"], slot["pending"], slot["target"]) == \
        (r["glibc strlen"], False, "libc.so.6")


def _bound_at_load(r: dict[str, Any], libs: dict[str, Path], name: str) -> None:
    """Every slot of ``name`` bound at load (leaf: bias + st_value, strlen: glibc's choice),
    none pending, GOT[1] and GOT[2] left 0 as glibc leaves them."""
    state = r["load"][name]
    leaf = r["load"]["libleaf.so"]["bias"] + symbol_value(libs["leaf"], "leaf")
    assert {s: (v["value"], v["pending"]) for s, v in state["slots"].items()} == \
        {"leaf": (leaf, False), "strlen": (r["glibc strlen"], False)}
    assert state["GOT"][1:] == [0, 0]
    assert "GOT[2] page" not in r


def test_bind_now_binds_every_slot_at_load(libs: dict[str, Path]) -> None:
    """dlopen(bind="now") of the lazy-capable object: all bound at load, slots writable."""
    r = host(libs["mid"], "now")
    _bound_at_load(r, libs, "libmid.so")
    assert {v["page"] for v in r["load"]["libmid.so"]["slots"].values()} == {"rw-p"}
    assert r["mid(5)"] == 17 and r["after count"] == r["load"]


def test_z_now_object_ignores_a_lazy_request(libs: dict[str, Path]) -> None:
    """A ``-z now`` object (DF_BIND_NOW, DF_1_NOW) opened with bind="lazy" is bound at load
    as glibc binds it, its slots sealed read-only by RELRO; calls change nothing."""
    r = host(libs["now"], "lazy")
    _bound_at_load(r, libs, "libmid-now.so")
    assert {v["page"] for v in r["load"]["libmid-now.so"]["slots"].values()} == {"r--p"}
    assert r["mid(5)"] == 17 and r["after count"] == r["load"]


# --- the simulator -----------------------------------------------------------------------------


def test_simulator_lazy_image_is_pending(libs: dict[str, Path]) -> None:
    """On the simulator (nothing runs, so no fork is needed) the same lazy image: slots at the
    file's word plus the bias, pending, targets known; GOT[0] the file's; GOT[1] a distinct
    non-zero word per object; GOT[2] one r-x page of int3 for both."""
    import vmsim

    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(str(libs["mid"]), bind="lazy")
    try:
        state = _state(lm)
        want = file_slots(libs["mid"])
        mid = state["libmid.so"]
        assert {s: (v["value"], v["pending"]) for s, v in mid["slots"].items()} == \
            {s: (word + mid["bias"], True) for s, (_, _, word) in want.items()}
        assert mid["slots"]["strlen"]["target"] == "libc.so.6"
        ids = [state[n]["GOT"][1] for n in ("libmid.so", "libleaf.so")]
        assert 0 not in ids and len(set(ids)) == 2
        resolver = {state[n]["GOT"][2] for n in ("libmid.so", "libleaf.so")}
        assert len(resolver) == 1
        page = resolver.pop()
        assert _perms(lm.mm, page) == "r-xp"
        assert lm.mm.read(page, lm.mm.page_size) == b"\xcc" * lm.mm.page_size
        assert mid["GOT"][0] == file_word(libs["mid"], mid["got"] - mid["bias"])
    finally:
        lm.unload()
