"""Lazy binding happening on the simulated process's CPU: a JUMP_SLOT holds its PLT address
until the first call, the call goes through PLT0 to GOT[2] (the lazy resolver's page), the
simulator binds the slot (an IFUNC's resolver running on the CPU) and the call goes on; the
next call goes straight through the slot."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import vmsim

LEAF = "int leaf(int x) { return x * 3; }\n"
MID = """
#include <string.h>
extern int leaf(int);
int mid(int x) { return leaf(x) + 1; }
int count(const char *s) { return (int)strlen(s); }
"""


@pytest.fixture(scope="module", name="lazy_libs")
def lazy_libs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libleaf.so and libmid.so (-z lazy: its calls go through the PLT), built with gcc."""
    d = tmp_path_factory.mktemp("process_lazy")
    (d / "leaf.c").write_text(LEAF)
    (d / "mid.c").write_text(MID)
    for args in (["-o", "libleaf.so", "leaf.c", "-Wl,-soname,libleaf.so"],
                 ["-o", "libmid.so", "mid.c", "-L.", "-lleaf", "-Wl,-z,lazy",
                  "-Wl,-rpath,$ORIGIN"]):
        subprocess.run(["gcc", "-O1", "-fPIC", "-shared", *args], cwd=d, check=True)
    return d / "libmid.so"


def _slot(proc: vmsim.Process, symbol: str) -> tuple[int, bool, str | None]:
    assert proc.linkmap is not None
    (b,) = [b for b in proc.linkmap.bindings() if b.object == "libmid.so" and
            b.symbol == symbol]
    return b.value, b.pending, b.target


def test_first_call_binds_through_the_resolver(lazy_libs: Path) -> None:
    with vmsim.Process(timeout=30.0) as proc:
        h = proc.dlopen(str(lazy_libs), bind="lazy")
        leaf_before, pending, target = _slot(proc, "leaf")
        assert pending and target == "libleaf.so"
        mid = proc.dlsym(h, "mid")
        assert proc.call(mid, 5) == 16
        assert proc.lazy_binds == 1
        leaf_after, pending, _ = _slot(proc, "leaf")
        assert not pending and leaf_after == proc.dlsym(h, "leaf") != leaf_before
        assert _slot(proc, "strlen")[1]                         # not called yet: still lazy
        assert proc.call(mid, 7) == 22 and proc.lazy_binds == 1   # straight through the slot
        text = proc.alloc(b"lazy binding\0")
        assert proc.call(proc.dlsym(h, "count"), text) == 12       # strlen: an IFUNC, bound
        assert proc.lazy_binds == 2 and not _slot(proc, "strlen")[1]


def test_a_lazy_symbol_nobody_defines_ends_the_program_as_glibc(tmp_path: Path) -> None:
    """glibc prints "symbol lookup error" and exits with 127 at the first call of a lazy
    slot whose symbol nobody defines: so does the process."""
    (tmp_path / "miss.c").write_text("int missing(int);\nint callmiss(int x) "
                                     "{ return missing(x) + 1; }\n")
    subprocess.run(["gcc", "-O1", "-fPIC", "-shared", "-Wl,-z,lazy", "-o", "libmiss.so",
                    "miss.c"], cwd=tmp_path, check=True)
    from vmsim.process import Exited

    with vmsim.Process(timeout=30.0) as proc:
        h = proc.dlopen(str(tmp_path / "libmiss.so"), bind="lazy")
        with pytest.raises(Exited) as ended:
            proc.call(proc.dlsym(h, "callmiss"), 1)
        assert ended.value.status == 127
        assert b"symbol lookup error" in proc.stderr and b"missing" in proc.stderr
