"""The command's views agree with each other: ``load`` says what ``maps`` shows (the extern
mapping, .bss), the same lines on both backends (imports), ``trace`` says why the simulator
makes more calls than the host, a write-only hole is explained wherever it is shown, and a bad
``--base`` is one line naming the value and every reason."""

from __future__ import annotations

import re

import pytest
from cli_support import run_cli
from loader_support import SYSTEM_LIBS

from loader.mmap import ProtFlags, Region
from vmsim.cli import WRITE_ONLY_NOTE, Session, _maps_lines, main

LIBZ = str(SYSTEM_LIBS["libz"])


def out_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_load_prints_the_same_lines_on_both_backends(capsys: pytest.CaptureFixture[str]) -> None:
    sim = out_of(["load", LIBZ], capsys)
    host = out_of(["load", LIBZ, "--backend", "libc"], capsys)

    def kinds(lines: list[str]) -> list[str]:
        """Each line that is not a region, numbers and the backend's name taken out."""
        return [re.sub(r"0x[0-9a-f]+|\d+| on (sim|libc)", "N", ln.strip()).split(":")[0]
                for ln in lines if not re.match(r"\s+[0-9a-f]{12}-", ln)]

    assert kinds(sim) == kinds(host)
    sim_imports = next(ln for ln in sim if ln.strip().startswith("imports:"))
    host_imports = next(ln for ln in host if ln.strip().startswith("imports:"))
    assert sim_imports.split(":")[1] == host_imports.split(":")[1]   # the same count, weak
    assert "stubs in the extern mapping" in sim_imports and "dlsym" in host_imports


def test_load_shows_the_extern_mapping_maps_shows(capsys: pytest.CaptureFixture[str]) -> None:
    load = out_of(["load", LIBZ, "--base", "0x7e0000000000"], capsys)
    maps = out_of(["maps", LIBZ, "--base", "0x7e0000000000", "--color", "never"], capsys)
    ext_load = [ln for ln in load if ln.endswith("[extern stubs]")]
    ext_maps = [ln for ln in maps if "[extern stubs]" in ln]
    assert len(ext_load) == len(ext_maps) == 1
    start = int(ext_load[0].split("-")[0], 16)
    assert int(ext_maps[0].split()[0], 16) == start
    regions = [ln for ln in load if re.match(r"\s+[0-9a-f]{12}-", ln)]
    rows = [ln for ln in maps if re.match(r"\s*0x[0-9a-f]+ ", ln)]
    assert len(regions) == len(rows)


def test_bss_is_named_in_load_and_maps(capsys: pytest.CaptureFixture[str]) -> None:
    load = out_of(["load", "/usr/bin/ls"], capsys)
    maps = out_of(["maps", "/usr/bin/ls", "--color", "never"], capsys)
    assert any(ln.endswith("rw-p 00000000 [anon:.bss]") for ln in load)
    assert any(ln.endswith(" data    [anon:.bss]") for ln in maps)


def test_trace_says_why_the_simulator_makes_more_calls(
        capsys: pytest.CaptureFixture[str]) -> None:
    sim = out_of(["trace", LIBZ], capsys)
    host = out_of(["trace", LIBZ, "--backend", "libc"], capsys)
    nsim = int(re.search(r": (\d+) Mmap calls", sim[0])[1])  # type: ignore[index]
    nhost = int(re.search(r": (\d+) Mmap calls", host[0])[1])  # type: ignore[index]
    assert (nsim, nhost) == (len(sim) - 1, len(host) - 1)
    extra = int(re.search(r"\((\d+) of them map, fill and seal the extern stubs", sim[0])[1])  # type: ignore[index]
    assert nsim - extra == nhost
    assert "dlsym" in host[0]


def test_a_write_only_hole_is_explained_where_maps_shows_it() -> None:
    hole = Region(0x7F0000001000, 0x7F0000002000, ProtFlags.PROT_WRITE)
    code = Region(0x7F0000000000, 0x7F0000001000, ProtFlags.from_rwx("r-x"), path="/x.so",
                  inode=1)
    sess = Session("/x.so", "sim", (code.start, hole.end), None, None, [code, hole], [])
    lines = _maps_lines(sess, color=False)
    row = next(ln for ln in lines if " -w-p " in ln)
    assert WRITE_ONLY_NOTE in row and "mmap_reserve(use_file=False)" in row


def test_an_unaligned_low_base_names_the_value_and_both_reasons() -> None:
    ran = run_cli("load", "--base", "0x1234")
    assert ran.code == 2
    line = ran.one_error_line()
    assert "0x1234" in line and "out of range" in line and "not page aligned" in line
    assert "None" not in line
