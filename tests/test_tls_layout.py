"""loader.tls (TlsState, build_thread_area) against glibc 2.36's ld.so on this machine.

The oracle is tests/tls_oracle/main.c, linked against gcc-built TLS libraries
(tests/tls_oracle/tlsmod.c) of several sizes and alignments, libstdc++ and libc: it prints,
per object in link-map order, the TLS module id and tp - dlpi_tls_data, the static TLS size
and alignment, and its thread's DTV, at startup, after each dlopen/dlclose and from a new
thread. loader.tls computes the same from the same files (PT_TLS read with loader.elf) in the
same order, and the thread area it builds on the simulator holds what glibc's holds.
Everything is compiled at test time, once per session.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from hypothesis import given
from hypothesis import strategies as st

import loader
import loader.libc
from loader.elf import Segment, parse_image
from loader.errors import ElfRelocationError, ElfSegmentError
from loader.pages import HOST_PAGE_SIZE
from loader.tls import (
    TLS_DTV_UNALLOCATED,
    TLS_TCB_SIZE,
    TcbHead,
    ThreadArea,
    TlsObject,
    TlsState,
    build_thread_area,
    static_offsets,
    static_surplus,
)
from vmsim import AddressSpace, Fault

ORACLE_DIR = Path(__file__).parent / "tls_oracle"

# name: (initialised bytes, zero bytes after them, alignment, fill byte, extra gcc flags)
MODULES: dict[str, tuple[int, int, int, int, list[str]]] = {
    "t1": (1, 0, 1, 0x11, []),
    "t100": (40, 60, 64, 0x22, []),
    "t1b": (1, 0, 1, 0x33, []),
    "t24": (8, 16, 8, 0x44, []),
    "tmis": (24, 16, 8, 0x55, []),          # p_align raised so that p_vaddr is unaligned
    "t4k": (16, 4080, 4096, 0x66, []),
    "dgd": (8, 8, 8, 0x77, []),             # general dynamic: dynamic TLS when dlopen'ed
    "dgd2": (16, 16, 16, 0x78, []),
    "die": (8, 24, 8, 0x79, ["-ftls-model=initial-exec"]),     # DF_STATIC_TLS, TPOFF64
    "ddesc": (32, 32, 16, 0x7A, ["-mtls-dialect=gnu2"]),        # TLSDESC: optional static
    "ddescbig": (8, 600, 8, 0x7B, ["-mtls-dialect=gnu2"]),      # past the optional 512
    "dbig": (8, 16000, 8, 0x7C, ["-ftls-model=initial-exec"]),  # past the whole surplus
    "die2": (16, 32, 16, 0x7D, ["-ftls-model=initial-exec"]),
    "dpair": (1, 0, 1, 0x7E, []),           # needs die and die2: one dlopen, three modules
    "diemis": (8, 40, 8, 0x7F, ["-ftls-model=initial-exec"]),  # static, p_vaddr unaligned
}
RAISED_ALIGN = ("tmis", "diemis")
NEEDS = {"dpair": ["die", "die2"]}
LINK_ORDERS = {
    "forward": ["t1", "t100", "t1b", "t24", "tmis", "t4k", "stdc++"],
    "reverse": ["stdc++", "t4k", "tmis", "t24", "t1b", "t100", "t1"],
    "plain": [],              # the program and libc: blocks aligned 16 at most, area 64
}
R_X86_64_TPOFF64, R_X86_64_TLSDESC = 18, 36
DF_STATIC_TLS = 0x10


@dataclass(frozen=True)
class Oracle:
    """The built oracle: library name -> path, link order -> program."""

    libs: dict[str, Path]
    programs: dict[str, Path]

    def run(self, order: str, *commands: str, env: dict[str, str] | None = None
            ) -> list[dict[str, Any]]:
        """Run the program of ``order`` with ``commands``; its reports, one per step."""
        done = subprocess.run([str(self.programs[order]), *commands], capture_output=True,
                              text=True, check=True, env={**os.environ, **(env or {})})
        return [json.loads(line) for line in done.stdout.splitlines()]


def _gcc(args: list[str], cwd: Path) -> None:
    """Run gcc; fail with its output when it fails."""
    done = subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"gcc {' '.join(args)} failed:\n{done.stderr}")


def _raise_tls_align(path: Path) -> None:
    """Rewrite PT_TLS's p_align to 4 x the lowest set bit of its p_vaddr, so that p_vaddr is
    not a multiple of it (what glibc's firstbyte rule is for). Accesses stay right: the
    block's first byte keeps its congruence with p_vaddr."""
    data = bytearray(path.read_bytes())
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        at = e_phoff + i * e_phentsize
        if struct.unpack_from("<I", data, at)[0] == 7:          # PT_TLS
            p_vaddr, = struct.unpack_from("<Q", data, at + 16)
            struct.pack_into("<Q", data, at + 48, (p_vaddr & -p_vaddr) * 4)
    path.write_bytes(bytes(data))


def build_oracle(where: Path) -> Oracle:
    """Compile the TLS libraries and one oracle program per link order into ``where``."""
    libs = {}
    for name, (head, tail, align, fill, flags) in MODULES.items():
        libs[name] = where / f"lib{name}.so"
        _gcc(["-O1", "-fPIC", "-shared", f"-DNAME={name}", f"-DHEAD={head}", f"-DTAIL={tail}",
              f"-DALIGN={align}", f"-DFILL={fill}", *flags, "-o", str(libs[name]),
              str(ORACLE_DIR / "tlsmod.c"), f"-L{where}", f"-Wl,-rpath,{where}",
              "-Wl,--no-as-needed", *[f"-l{n}" for n in NEEDS.get(name, [])]], where)
    for name in RAISED_ALIGN:
        _raise_tls_align(libs[name])
    programs = {}
    for order, names in LINK_ORDERS.items():
        programs[order] = where / f"oracle_{order}"
        _gcc(["-O1", "-o", str(programs[order]), str(ORACLE_DIR / "main.c"), f"-L{where}",
              f"-Wl,-rpath,{where}", "-Wl,--no-as-needed", *[f"-l{n}" for n in names],
              "-lpthread"], where)
    return Oracle(libs, programs)


@pytest.fixture(scope="session", name="oracle")
def oracle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    """The oracle, compiled once per session."""
    return build_oracle(tmp_path_factory.mktemp("tls_oracle"))


# ---------------------------------------------------------------------------------------------
# The model's side: the same files, in the order glibc reported


def tls_object(path: str) -> TlsObject:
    """``path``'s name (its path) and PT_TLS; the vDSO (no file) has no TLS."""
    if not path.startswith("/"):
        return TlsObject(path, None)
    return TlsObject(path, parse_image(Path(path).read_bytes(), HOST_PAGE_SIZE).tls)


def startup_state(report: dict[str, Any], **tunables: int) -> TlsState:
    """A TlsState given the startup objects of ``report`` in its (link-map) order."""
    state = TlsState(**tunables)
    state.add_startup([tls_object(o["path"]) for o in report["objects"]])
    return state


def static_requests(path: Path) -> list[tuple[str, bool]]:
    """The static TLS ``path``'s relocations ask for its own module, in table order:
    (path, False) per R_X86_64_TPOFF64, (path, True) per R_X86_64_TLSDESC."""
    wanted = {R_X86_64_TPOFF64: False, R_X86_64_TLSDESC: True}
    found = []
    with path.open("rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, RelocationSection):
                found += [(str(path), wanted[r["r_info_type"]]) for r in section.iter_relocations()
                          if r["r_info_type"] in wanted]
    return found


def replay(state: TlsState, commands: Sequence[str], reports: Sequence[dict[str, Any]]
           ) -> Iterator[str | None]:
    """Apply the oracle's commands to ``state``, one per report after the startup one;
    yields per step the error loader.tls raised (None when it succeeded). A dlopen's objects
    are the ones its report adds (link-map order, the load order), else (it failed) the one
    named; glibc relocates them in reverse (each after its dependencies), and so asks for
    their static TLS. A dlclose removes the objects its report no longer has."""
    words = iter(commands)
    for before, report in itertools.pairwise(reports):
        verb, error = next(words), None
        old = [o["path"] for o in before["objects"]]
        new = [o["path"] for o in report["objects"]]
        if verb == "open":
            path = next(words)
            added = [p for p in new if p not in old] or [path]
            requests = [r for p in reversed(added) for r in static_requests(Path(p))]
            try:
                state.add_dlopen([tls_object(p) for p in added], static=requests)
            except ElfRelocationError as e:
                error = str(e)
        elif verb == "close":
            next(words)
            state.remove([p for p in old if p not in new])
        elif verb == "touch":
            next(words), next(words)
        yield error


def dt_flags(path: Path) -> int:
    """``path``'s DT_FLAGS (0 without one)."""
    with path.open("rb") as f:
        dynamic = ELFFile(f).get_section_by_name(".dynamic")
        assert isinstance(dynamic, DynamicSection)
        tags = [t for t in dynamic.iter_tags() if t.entry.d_tag == "DT_FLAGS"]
        return int(tags[0].entry.d_val) if tags else 0


def glibc_offsets(report: dict[str, Any]) -> dict[str, tuple[int, int | None]]:
    """Per object with a TLS module: (module id, tp offset or None) as glibc reported."""
    return {o["path"]: (o["modid"], o["tp_offset"]) for o in report["objects"] if o["modid"]}


def model_offsets(state: TlsState) -> dict[str, tuple[int, int | None]]:
    """The same, from the model."""
    return {m.name: (m.module_id, m.tp_offset) for m in state.modules}


# ---------------------------------------------------------------------------------------------
# Startup: ids, offsets, size, alignment


@pytest.mark.parametrize("order", sorted(LINK_ORDERS))
def test_startup_layout_equals_glibc(oracle: Oracle, order: str) -> None:
    """Every startup object's module id and static offset, the static TLS size (which holds
    the surplus and the TCB) and its alignment equal ld.so's."""
    report, = oracle.run(order)
    state = startup_state(report)
    assert model_offsets(state) == glibc_offsets(report)
    assert (state.static_size, state.static_align) == (report["static_size"],
                                                        report["static_align"])
    names = {Path(p).name.split(".")[0] for p in glibc_offsets(report)}
    assert "libc" in names and (order == "plain" or {"libstdc++", "libtmis"} <= names)


def test_oracle_exercises_the_rules(oracle: Oracle) -> None:
    """The fixtures do what they are for: tmis's p_vaddr is not a multiple of its p_align;
    a 1-byte block lands in a gap left below an aligned one; die is DF_STATIC_TLS."""
    for name in RAISED_ALIGN:
        tls = parse_image(oracle.libs[name].read_bytes(), HOST_PAGE_SIZE).tls
        assert tls is not None and tls.p_vaddr % tls.p_align
    report, = oracle.run("forward")
    ids = glibc_offsets(report)
    _, in_gap = ids[str(oracle.libs["t1b"])]
    _, above_gap = ids[str(oracle.libs["t100"])]
    assert in_gap is not None and above_gap is not None and in_gap < above_gap
    assert dt_flags(oracle.libs["die"]) & DF_STATIC_TLS
    assert not dt_flags(oracle.libs["dgd"]) & DF_STATIC_TLS


def test_surplus_and_tunables_equal_glibc(oracle: Oracle) -> None:
    """With GLIBC_TUNABLES rtld.nns=2 and rtld.optional_static_tls=32 the static size
    follows the surplus formula, and a TLSDESC module no longer fits the optional part."""
    env = {"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.rtld.optional_static_tls=32"}
    ddesc = str(oracle.libs["ddesc"])
    reports = oracle.run("forward", "open", ddesc, "thread", env=env)
    state = startup_state(reports[0], nns=2, optional_static_tls=32)
    assert static_surplus() == 1664 and state.surplus == 1664 - 2 * 288 - 480
    assert state.static_size == reports[0]["static_size"]
    list(replay(state, ["open", ddesc, "thread"], reports))
    assert glibc_offsets(reports[-1])[ddesc] == (state.module(ddesc).module_id, None)
    assert model_offsets(state) == glibc_offsets(reports[-1])


# ---------------------------------------------------------------------------------------------
# dlopen and dlclose: ids reused, dynamic TLS, static TLS from the surplus, errors


DLOPEN_SCRIPT = ["open", "dgd", "touch", "dgd", "dgd_addr", "open", "die", "open", "ddesc",
                 "open", "ddescbig", "open", "diemis", "thread", "close", "dgd", "open", "dgd2",
                 "close", "die", "open", "die", "thread", "open", "dbig", "thread",
                 "close", "die", "open", "die", "thread", "close", "die", "open", "dpair",
                 "thread", "close", "dpair", "open", "die2", "thread"]


def script(oracle: Oracle) -> list[str]:
    """DLOPEN_SCRIPT with library names replaced by their paths."""
    return [str(oracle.libs[w]) if w in oracle.libs else w for w in DLOPEN_SCRIPT]


def test_dlopen_script_equals_glibc(oracle: Oracle) -> None:
    """After each step of a dlopen/dlclose script: the module ids equal glibc's (dlclose's
    ids reused lowest first); from a new thread (where ld.so's DTV is fresh) each static
    offset, each dynamic module (no block), the DTV's length and generation; a dlopen whose
    initial-exec TLS does not fit fails in both, and nothing else moves."""
    commands = script(oracle)
    reports = oracle.run("forward", *commands)
    state = startup_state(reports[0])
    steps = replay(state, commands, reports)
    for report, error in zip(reports[1:], steps, strict=True):
        assert (error is None) == ("error" not in report), report["step"]
        glibc = glibc_offsets(report)
        assert {n: i for n, (i, _) in model_offsets(state).items()} == \
            {n: i for n, (i, _) in glibc.items()}, report["step"]
        if report["step"] == "touch":     # dynamic TLS: allocated on use, outside the area
            _, offset = glibc[str(oracle.libs["dgd"])]
            assert offset is not None and not 0 < offset <= state.static_size - TLS_TCB_SIZE
        if report["step"] == "thread":
            assert model_offsets(state) == glibc
            assert (state.dtv_length, state.dtv_generation) == (report["dtv_len"],
                                                                report["dtv_gen"])


# ---------------------------------------------------------------------------------------------
# One thread's area on the simulator: what glibc's thread holds, word for word


def load_tls_objects(mm: Any, state: TlsState) -> list[Any]:
    """Load every object of ``state`` that has a module onto ``mm`` with its layout, and
    record its load bias; returns the loaded objects (the caller unloads them)."""
    objs = []
    for mod in state.modules:
        objs.append(loader.load(mod.name, mm, tls=mod.layout))
        state.set_load_bias(mod.name, objs[-1].load_bias)
    return objs


def area_report(mm: Any, area: ThreadArea) -> dict[str, Any]:
    """The area's TCB and DTV in the oracle's terms: TCB self pointers as offsets from tp,
    the DTV's length, generation and entries (tp - pointer, "unallocated" or None)."""
    def word(addr: int) -> int:
        return int.from_bytes(mm.read(addr, 8), "little")

    tp, dtv = area.tp, word(area.tp + TcbHead.DTV)
    assert dtv == area.dtv
    entries: list[int | str | None] = []
    for module_id in range(1, word(area.dtv_entry(-1)) + 1):
        val = word(area.dtv_entry(module_id))
        entries.append("unallocated" if val == TLS_DTV_UNALLOCATED else
                       None if val == 0 else tp - val)
    return {"tcb": [word(tp + TcbHead.TCB) - tp, word(tp + TcbHead.SELF) - tp],
            "dtv_len": word(area.dtv_entry(-1)), "dtv_gen": word(dtv), "dtv": entries}


def check_area(mm: Any, area: ThreadArea, state: TlsState, report: dict[str, Any],
               fixtures: set[str]) -> None:
    """``area`` against glibc's ``report`` of a thread: TCB, DTV and, for the fixtures'
    blocks (which no code changed), every byte; every block also equals its init image."""
    assert area_report(mm, area) == {k: report[k] for k in ("tcb", "dtv_len", "dtv_gen", "dtv")}
    for mod in state.modules:
        if mod.tp_offset is None:
            assert mod.name not in area.blocks
            continue
        block = mm.read(area.blocks[mod.name], mod.memsz)
        image = mm.read(mod.image_vaddr + mod.load_bias, mod.filesz)
        assert block == image + bytes(mod.memsz - mod.filesz), mod.name
        glibc = {o["path"]: o for o in report["objects"]}[mod.name]
        if Path(mod.name).name in fixtures:
            assert block.hex() == glibc["block"], mod.name


def fixture_names(oracle: Oracle) -> set[str]:
    """File names of the objects whose TLS blocks no code touches before the report."""
    return {p.name for p in [*oracle.libs.values(), *oracle.programs.values()]}


@pytest.mark.parametrize("order", sorted(LINK_ORDERS))
def test_startup_thread_area_equals_glibc(oracle: Oracle, order: str) -> None:
    """The area build_thread_area writes on the simulator for the startup objects (libc
    and libstdc++ loaded there too) holds what ld.so gave the main thread: tcb and self at
    tp, the DTV (length, generation, one pointer per block) and the fixtures' blocks."""
    report, = oracle.run(order)
    state = startup_state(report)
    mm = AddressSpace()
    objs = load_tls_objects(mm, state)
    area = build_thread_area(mm, state, stack_guard=0x1122334455667700, pointer_guard=7)
    check_area(mm, area, state, report, fixture_names(oracle))
    guards = mm.read(area.tp + TcbHead.STACK_GUARD, 16)
    assert guards == struct.pack("<QQ", 0x1122334455667700, 7)
    area.close()
    assert not any(r.start <= area.tp < r.end for r in mm.maps())
    for obj in objs:
        obj.unload()


def test_dlopen_thread_area_equals_glibc(oracle: Oracle) -> None:
    """After dlopen of a general-dynamic, an initial-exec and a TLSDESC library (and a
    dlclose), a new thread's area equals glibc's: static blocks for the last two, the
    unallocated marker for the first, 0 for the freed id."""
    commands = [w if w not in oracle.libs else str(oracle.libs[w]) for w in
                ["open", "dgd2", "open", "dgd", "open", "die", "open", "ddesc", "close", "dgd2",
                 "thread"]]
    reports = oracle.run("forward", *commands)
    state = startup_state(reports[0])
    list(replay(state, commands, reports))
    mm = AddressSpace()
    objs = load_tls_objects(mm, state)
    area = build_thread_area(mm, state)
    assert None in area_report(mm, area)["dtv"][:state.dtv_length - 14]
    check_area(mm, area, state, reports[-1], fixture_names(oracle))
    area.close()
    for obj in objs:
        obj.unload()


def test_thread_area_on_the_host(oracle: Oracle) -> None:
    """build_thread_area works on any Mmap: on the host (our loader's copies of two
    fixtures, dlopen'ed, one in static TLS) the block holds the init image and the DTV
    points at it."""
    mm = loader.libc.LibcMmap()
    state = TlsState()
    state.add_startup([])
    die, dgd = str(oracle.libs["die"]), str(oracle.libs["dgd"])
    state.add_dlopen([tls_object(die), tls_object(dgd)], static=[(die, False)])
    objs = load_tls_objects(mm, state)
    area = build_thread_area(mm, state)
    try:
        report = area_report(mm, area)
        assert report["dtv"][:2] == [state.module(die).tp_offset, "unallocated"]
        assert mm.read(area.blocks[die], 1) == b"\xa5"
    finally:
        area.close()
        for obj in objs:
            obj.unload()


# ---------------------------------------------------------------------------------------------
# The rules by hand (cases the oracle cannot force glibc into, or that read clearer so)


def tls_segment(memsz: int, align: int, vaddr: int = 0, filesz: int = 0) -> Segment:
    """A PT_TLS header with these fields."""
    return Segment(p_type=7, p_flags=4, p_offset=vaddr, p_vaddr=vaddr, p_filesz=filesz,
                   p_memsz=memsz, p_align=align)


def test_static_offsets_by_hand() -> None:
    """A 1-byte block, a 100-byte block aligned 64 (leaving a 27-byte gap below it) and
    another 1-byte block, which goes in the gap; the firstbyte rule for an unaligned p_vaddr."""
    assert static_offsets([(1, 1, 0), (100, 64, 0), (1, 1, 0)]) == ([1, 128, 2], 128, 64)
    offsets, used, align = static_offsets([(24, 32, 0x10)])
    assert offsets == [48] and -48 % 32 == 0x10 and (used, align) == (48, 64)
    assert static_offsets([(16, 4096, 0)]) == ([4096], 4096, 4096)


@given(st.lists(st.tuples(st.integers(1, 5000), st.sampled_from([1, 2, 8, 16, 64, 4096]),
                          st.integers(0, 1 << 20)), max_size=12))
def test_static_offsets_properties(blocks: list[tuple[int, int, int]]) -> None:
    """Whatever the blocks: each lies in [tp - used, tp), keeps p_vaddr's congruence
    modulo p_align (tp is aligned to the area's alignment), and no two overlap."""
    offsets, used, align = static_offsets(blocks)
    spans = sorted((off - memsz, off) for off, (memsz, _, _) in zip(offsets, blocks, strict=True))
    for off, (memsz, p_align, vaddr) in zip(offsets, blocks, strict=True):
        assert memsz <= off <= used and align % p_align == 0
        assert -off % p_align == vaddr % p_align
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_surplus_formula() -> None:
    """1664 by default; (nns - 1) * 144 + nns * 144 + optional + 144 otherwise; audit modules
    count as namespaces, and more than the free namespaces is refused as ld.so refuses."""
    assert static_surplus() == 1664
    assert static_surplus(nns=1, optional_static_tls=0) == 144 + 144
    assert static_surplus(nns=2, naudit=1) == static_surplus(nns=3)
    assert static_surplus(nns=99) == static_surplus(nns=16)
    with pytest.raises(ValueError, match="naudit"):
        static_surplus(nns=15, naudit=2)


def dlopen_state(*blocks: tuple[str, int, int]) -> TlsState:
    """A state with one 16-byte startup block, then one dlopen per (name, memsz, align)."""
    state = TlsState()
    state.add_startup([TlsObject("prog", tls_segment(16, 16))])
    for name, memsz, align in blocks:
        state.add_dlopen([TlsObject(name, tls_segment(memsz, align))])
    return state


def test_module_ids_reuse_the_lowest_free() -> None:
    """dlopen'ed modules get the lowest id no loaded module holds, as after dlclose."""
    state = dlopen_state(("a", 8, 8), ("b", 8, 8), ("c", 8, 8))
    assert [m.module_id for m in state.modules] == [1, 2, 3, 4]
    state.remove(["b"])
    state.add_dlopen([TlsObject("d", tls_segment(8, 8)), TlsObject("no-tls", None),
                      TlsObject("empty", tls_segment(0, 8)), TlsObject("e", tls_segment(8, 8))])
    assert {m.name: m.module_id for m in state.modules} == {"prog": 1, "a": 2, "d": 3, "c": 4,
                                                            "e": 5}
    assert state.layout("no-tls") is None and state.layout("d") == state.module("d").layout


def test_static_tls_for_dlopen_and_its_reclaim() -> None:
    """Static TLS from the surplus: the optional part shrinks for TLSDESC and is not given
    back; a freed block is reclaimed only at the top of what is used, and a block freed
    before its upper neighbour stays lost, as in glibc."""
    state = dlopen_state(("a", 40, 8), ("b", 24, 8))
    start = state.static_used
    a = state.use_static("a", optional=True)
    assert a is not None and a.tp_offset == start + 40 and state.optional_left == 512 - 40
    b = state.use_static("b")
    assert b is not None and b.tp_offset == start + 64 and state.optional_left == 472
    state.remove(["a"])
    assert state.static_used == start + 64           # not at the top: kept
    state.remove(["b"])
    assert state.static_used == start + 40           # b's block back; a's stays lost
    both = dlopen_state(("a", 40, 8), ("b", 24, 8))
    both.use_static("a"), both.use_static("b")
    both.remove(["b", "a"])
    assert both.static_used == start and both.optional_left == 512


def test_static_tls_that_does_not_fit() -> None:
    """Past the surplus or above the area's alignment: TPOFF64 is an ElfRelocationError
    naming the object, TLSDESC stays dynamic; a failed dlopen leaves nothing behind."""
    state = dlopen_state(("big", 4000, 8), ("aligned", 8, 128))
    assert state.use_static("big", optional=True) is None
    with pytest.raises(ElfRelocationError, match=r"big.*cannot allocate memory in static TLS"):
        state.use_static("big")
    with pytest.raises(ElfRelocationError, match="aligned"):
        state.use_static("aligned")
    before = (state.table(), state.static_used, state.generation)
    with pytest.raises(ElfRelocationError, match="huge"):
        state.add_dlopen([TlsObject("huge", tls_segment(1 << 20, 8))], static=[("huge", False)])
    assert (state.table(), state.static_used) == before[:2]
    assert state.generation == before[2] + 1         # glibc's dlclose of the failed dlopen


def test_state_misuse_and_hostile_headers() -> None:
    """add_startup once; startup modules are never removed; names are unique; PT_TLS sizes
    past the address space are ElfSegmentErrors; p_align 0 counts as 1."""
    state = dlopen_state()
    with pytest.raises(ValueError, match="already"):
        state.add_startup([])
    with pytest.raises(ValueError, match="startup"):
        state.remove(["prog"])
    with pytest.raises(ValueError, match="already loaded"):
        state.add_dlopen([TlsObject("prog", tls_segment(8, 8))])
    for memsz, align in ((1 << 47, 8), (8, 1 << 47)):
        with pytest.raises(ElfSegmentError, match="PT_TLS"):
            TlsState().add_startup([TlsObject("x", tls_segment(memsz, align))])
    zero = TlsState()
    zero.add_startup([TlsObject("x", tls_segment(3, 0, vaddr=5))])
    assert zero.module("x").align == 1 and zero.module("x").tp_offset == 3
    assert zero.table() == [{"name": "x", "module_id": 1, "size": 3, "align": 1,
                             "static_offset": 3}]


def test_thread_area_failures_leave_nothing_mapped() -> None:
    """Before add_startup there is no area to build; an init image that cannot be read
    (here: the object was never loaded) is the backend's fault, and the area is unmapped."""
    mm = AddressSpace()
    with pytest.raises(ValueError, match="add_startup"):
        build_thread_area(mm, TlsState())
    state = TlsState()
    state.add_startup([TlsObject("ghost", tls_segment(64, 8, vaddr=0x5000, filesz=8),
                                 load_bias=0x10000000)])
    with pytest.raises(Fault):
        build_thread_area(mm, state)
    assert mm.maps() == []
