"""A process image never takes the process down: a closure whose dependency (or root) is a
corrupted real file either loads or fails with an ElfError naming an object of the closure
(the corrupted one and the chain that needed it, or the one that missed a symbol it lost),
and leaves the space as it was (on the simulator; every load in a supervised child, bounded in
memory and time, so a hang or a blow-up fails the test instead of the run)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import vmsim
from loader.errors import ElfError
from loader.isolate import run_isolated
from loader.linkmap import LinkMap
from loader.mmap import MmapError
from vmsim.fuzz.realfiles import MutatedFile, mutated_files

DEP = "int dep_value = 7;\nint dep(void) { return dep_value; }\n"
TOP = "extern int dep(void);\nint top(void) { return dep() + 1; }\n"


def _build(d: Path) -> dict[str, Path]:
    """libdep.so and libtop.so (needing it, DT_RUNPATH $ORIGIN), built with gcc in ``d``."""
    (d / "dep.c").write_text(DEP)
    (d / "top.c").write_text(TOP)
    for args in (["-o", "libdep.so", "dep.c", "-Wl,-soname,libdep.so"],
                 ["-o", "libtop.so", "top.c", "-L.", "-ldep", "-Wl,-soname,libtop.so",
                  "-Wl,--enable-new-dtags,-rpath,$ORIGIN"]):
        subprocess.run(["gcc", "-O1", "-fPIC", "-shared", *args], cwd=d, check=True)
    return {"dep": d / "libdep.so", "top": d / "libtop.so"}


@pytest.fixture(scope="module", name="closure")
def closure_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _build(tmp_path_factory.mktemp("hostile_closure"))


def _load_mutated(root: Path, victim: str, data: bytes, where: Path) -> tuple[str, str, bool]:
    """In a fresh copy of the closure with ``victim`` replaced by ``data``: dlopen the root
    on a new simulator. Returns (outcome, message, the space as before the dlopen)."""
    for f in root.parent.glob("lib*.so"):
        shutil.copy(f, where / f.name)
    (where / victim).write_bytes(data)
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen("libc.so.6")
    before = [(r.start, r.end, r.prot) for r in lm.mm.maps()]
    try:
        lm.dlopen(str(where / root.name))
    except (ElfError, MmapError) as exc:     # bad input, or the backend refusing its sizes
        after = [(r.start, r.end, r.prot) for r in lm.mm.maps()]
        return "refused", " ".join([str(exc), *getattr(exc, "__notes__", [])]), after == before
    lm.unload()
    return "loaded", "", True


@pytest.mark.parametrize("victim", ["libdep.so", "libtop.so"])
def test_a_corrupted_member_of_a_closure_is_refused_cleanly(
        closure: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, victim: str) -> None:
    strategy = mutated_files(str(closure["dep" if victim == "libdep.so" else "top"]))

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(strategy)
    def check(mutated: MutatedFile) -> None:
        where = tmp_path_factory.mktemp("mutated")
        done = run_isolated(_load_mutated, closure["top"], victim, mutated.data, where,
                            timeout=20.0, max_rss=512 << 20)
        assert done.status == "ok", (mutated, done)
        outcome, message, clean = done.value
        assert clean, (mutated, message)
        if outcome == "refused":    # the corrupted file, or who missed what it lost
            assert "libdep.so" in message or "libtop.so" in message, (mutated, message)

    check()


def test_a_backend_refusal_names_the_object(closure: dict[str, Path], tmp_path: Path) -> None:
    """A PT_LOAD too big for the simulated machine (the kernel's ENOMEM): the MmapError keeps
    its errno and carries a note naming the object and its chain; nothing stays mapped."""
    import struct

    data = bytearray(closure["dep"].read_bytes())
    phoff = struct.unpack_from("<Q", data, 32)[0]
    loads = [phoff + 56 * k for k in range(struct.unpack_from("<H", data, 56)[0])
             if struct.unpack_from("<I", data, phoff + 56 * k)[0] == 1]
    struct.pack_into("<Q", data, loads[-1] + 40, 1 << 40)     # the last PT_LOAD's p_memsz
    done = run_isolated(_load_mutated, closure["top"], "libdep.so", bytes(data), tmp_path,
                        timeout=20.0, max_rss=512 << 20)
    assert done.status == "ok"
    outcome, message, clean = done.value
    assert clean and outcome == "refused"
    assert "libdep.so" in message and "libtop.so" in message
