"""``vmsim load --deps``, ``vmsim maps --deps`` and ``vmsim why``: a process image on the
simulator, checked against glibc on this machine.

- the objects and their order equal glibc's link map: a gcc-built program linked against
  libc only dlopens the library (``dl_iterate_phdr``), ``ldd`` for a program;
- every object's file mappings (permissions, offsets) equal those of the real process;
- ``why malloc`` with a gcc-built preload names the preload the winner, interposing libc,
  as the program run with LD_PRELOAD shows;
- a missing dependency (libfoo deleted under libbar under a program) is one error line
  naming the chain, exit 2, for every verb that builds an image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_support import Ran, run_cli
from search_support import real_ldd

from vmsim.cli import EXIT

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
LIBSSL = str(LIBDIR / "libssl.so.3")
SINGLE_OBJECT_FIELDS = ["path", "load_bias", "span", "regions", "relro", "relocations"]
"""The fields of ``vmsim load --json`` that describe one object (docs/DESIGN.md)."""

PROBE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
static int each(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size; (void)data;
    printf("object %s\n", info->dlpi_name);
    return 0;
}
int main(int argc, char **argv) {
    if (argc != 2 || !dlopen(argv[1], RTLD_NOW)) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    dl_iterate_phdr(each, NULL);
    char line[4096];
    FILE *maps = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, maps)) printf("maps %s", line);
    return 0;
}
"""
"""The smallest program (linked against libc only) that dlopens argv[1] and prints its link
map in order, then its /proc/self/maps."""

MY_MALLOC = r"""
#include <stddef.h>
#include <unistd.h>
static char arena[1 << 16];
static size_t used;
void *malloc(size_t n) {
    write(2, "preload malloc\n", 15);
    void *p = arena + used;
    used += (n + 15) & ~(size_t)15;
    return p;
}
void free(void *p) { (void)p; }
"""
PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
int main(void) { char *volatile p = malloc(8); printf("%p\n", (void *)p); free(p); return 0; }
"""
FOO = "int foo(void) { return 1; }\n"
BAR = "extern int foo(void);\nint bar(void) { return foo() + 1; }\n"
USES_BAR = "extern int bar(void);\nint main(void) { return bar(); }\n"


def _gcc(where: Path, *args: str) -> None:
    """Run gcc in ``where``; RuntimeError with its output when it fails."""
    done = subprocess.run(["gcc", "-O1", *args], cwd=where, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"gcc {' '.join(args)} failed:\n{done.stderr}")


def build_fixtures(where: Path) -> dict[str, Path]:
    """probe (PROBE), libmymalloc.so (MY_MALLOC), prog (PROGRAM), and prog_bar -> libbar.so
    -> libfoo.so with libfoo.so deleted after the link."""
    for name, text in (("probe.c", PROBE), ("mymalloc.c", MY_MALLOC), ("prog.c", PROGRAM),
                       ("foo.c", FOO), ("bar.c", BAR), ("prog_bar.c", USES_BAR)):
        (where / name).write_text(text)
    _gcc(where, "-o", "probe", "probe.c")
    _gcc(where, "-fPIC", "-shared", "-o", "libmymalloc.so", "mymalloc.c")
    _gcc(where, "-o", "prog", "prog.c")
    _gcc(where, "-fPIC", "-shared", "-Wl,-soname,libfoo.so", "-o", "libfoo.so", "foo.c")
    _gcc(where, "-fPIC", "-shared", "-Wl,-soname,libbar.so", "-o", "libbar.so", "bar.c",
         "-L.", "-lfoo", "-Wl,-rpath,$ORIGIN")
    _gcc(where, "-o", "prog_bar", "prog_bar.c", "-L.", "-lbar", "-Wl,-rpath,$ORIGIN")
    (where / "libfoo.so").unlink()
    return {p.name: p for p in where.iterdir() if not p.name.endswith(".c")}


@pytest.fixture(scope="session", name="built")
def built_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The gcc-built fixtures, compiled once per session."""
    return build_fixtures(tmp_path_factory.mktemp("cli_deps"))


def _glibc_dlopen(probe: Path, path: str) -> tuple[list[str], list[str]]:
    """glibc's link map (real paths, without the program and the vDSO) and /proc/self/maps
    lines after the smallest program dlopens ``path``."""
    done = subprocess.run([str(probe), path], capture_output=True, text=True, check=True,
                          timeout=60)
    lines = done.stdout.splitlines()
    names = [line.removeprefix("object ") for line in lines if line.startswith("object ")]
    return ([os.path.realpath(n) for n in names if n.startswith("/")],
            [line.removeprefix("maps ") for line in lines if line.startswith("maps ")])


def _json(*argv: str) -> dict[str, Any]:
    """``vmsim load --deps --json ARGV``, exit 0, parsed."""
    ran = run_cli("load", "--deps", "--json", *argv)
    assert ran.code == EXIT["ok"], ran.err
    out: dict[str, Any] = json.loads(ran.out)
    return out


def _file_maps(lines: list[str]) -> dict[str, list[tuple[str, int]]]:
    """(perms, offset) of each file's mappings in /proc/PID/maps order, by real path."""
    out: dict[str, list[tuple[str, int]]] = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            out.setdefault(os.path.realpath(fields[5].strip()), []).append(
                (fields[1], int(fields[2], 16)))
    return out


@pytest.fixture(scope="module", name="libssl")
def libssl_fixture() -> dict[str, Any]:
    """``vmsim load --deps --json`` of libssl.so.3."""
    return _json(LIBSSL)


def test_a_library_loads_in_glibcs_link_map_order(libssl: dict[str, Any],
                                                  built: dict[str, Path]) -> None:
    ours = [os.path.realpath(o["path"]) for o in libssl["objects"]]
    glibc, _ = _glibc_dlopen(built["probe"], LIBSSL)
    assert ours == glibc
    names = [o["name"] for o in libssl["objects"]]
    assert names == ["libc.so.6", "ld-linux-x86-64.so.2", "libssl.so.3", "libcrypto.so.3"]
    assert libssl["how"] == "dlopen" and libssl["bind"] == "now"


def test_the_dlopened_part_is_in_ldds_order(libssl: dict[str, Any]) -> None:
    ldd = [line.split(" => ")[-1].split(" (")[0].strip() for line in real_ldd(LIBSSL)]
    ldd_order = [os.path.realpath(p) for p in ldd if p.startswith("/")]
    ours = [os.path.realpath(o["path"]) for o in libssl["objects"]]
    new = ours[ours.index(os.path.realpath(LIBSSL)):]
    assert new == [os.path.realpath(LIBSSL)] + [p for p in ldd_order if p in new]
    assert set(ours) == {os.path.realpath(LIBSSL), *ldd_order}


def test_each_object_maps_its_file_as_glibc_does(libssl: dict[str, Any],
                                                 built: dict[str, Path]) -> None:
    _, glibc_maps = _glibc_dlopen(built["probe"], LIBSSL)
    real = _file_maps(glibc_maps)
    for o in libssl["objects"]:
        ours = [(r["perms"], r["offset"]) for r in o["regions"] if r["path"]]
        assert ours == real[os.path.realpath(o["path"])], o["name"]


def test_json_carries_the_single_object_fields(libssl: dict[str, Any]) -> None:
    assert list(libssl)[:2] == ["path", "backend"] and libssl["backend"] == "sim"
    for o in libssl["objects"]:
        assert list(o) == ["name", "role", *SINGLE_OBJECT_FIELDS]
        lo, hi = o["span"]
        assert all(lo <= r["start"] < r["end"] <= hi for r in o["regions"])
        assert o["relocations"]["unresolved"] == []
        assert o["relocations"]["applied"] == sum(o["relocations"]["by_type"].values()) > 0
    assert libssl["init_order"] == ["ld-linux-x86-64.so.2", "libc.so.6", "libcrypto.so.3",
                                    "libssl.so.3"]
    assert [(t["name"], t["module_id"]) for t in libssl["tls"]] == [("libc.so.6", 1)]
    assert libssl["calls"] and libssl["bindings"]["symbolic"] > 1000


def test_relocation_counts_equal_the_single_object_load(libssl: dict[str, Any]) -> None:
    crypto = next(o for o in libssl["objects"] if o["name"] == "libcrypto.so.3")
    ran = run_cli("load", "--json", crypto["path"])
    assert ran.code == EXIT["ok"], ran.err
    single = json.loads(ran.out)
    assert list(single) == ["path", "backend", *SINGLE_OBJECT_FIELDS[1:], "calls"]
    assert single["relocations"]["by_type"] == crypto["relocations"]["by_type"]


def test_a_program_is_started_in_ldds_order() -> None:
    report = _json("/usr/bin/ls", "--bind", "lazy")
    assert report["how"] == "exec" and report["objects"][0]["role"] == "the program"
    ours = [os.path.realpath(o["path"]) for o in report["objects"][1:]]
    lines = real_ldd("/usr/bin/ls")
    paths = [re.sub(r" \(0x\)$", "", line.split(" => ")[-1]).strip() for line in lines]
    assert ours == [os.path.realpath(p) for p in paths if p.startswith("/")]
    assert report["bindings"]["pending"] > 0            # lazy JUMP_SLOTs not called yet
    now = _json("/usr/bin/ls", "--bind", "now")
    assert now["bindings"]["pending"] < report["bindings"]["pending"]


def test_text_lists_every_object_with_base_and_counts() -> None:
    ran = run_cli("load", "--deps", LIBSSL)
    assert ran.code == EXIT["ok"], ran.err
    for name in ("libc.so.6", "ld-linux-x86-64.so.2", "libssl.so.3", "libcrypto.so.3"):
        assert re.search(rf"^\s+\d\. {re.escape(name)} \(", ran.out, re.M), name
    assert ran.out.count("load bias 0x") == 4 and ran.out.count("relocations: ") == 4
    assert "init order" in ran.out and "module 1: libc.so.6" in ran.out


def test_maps_deps_shows_every_objects_regions(libssl: dict[str, Any]) -> None:
    ran = run_cli("maps", "--deps", LIBSSL, "--color", "never")
    assert ran.code == EXIT["ok"], ran.err
    for o in libssl["objects"]:
        rows = [line for line in ran.out.splitlines() if line.rstrip().endswith(o["path"])
                or f" {o['path']}  (" in line]
        assert len(rows) == sum(1 for r in o["regions"] if r["path"]), o["name"]
    assert "(RELRO)" in ran.out


def test_why_malloc_with_a_preload(built: dict[str, Path]) -> None:
    real = subprocess.run([str(built["prog"])], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, LD_PRELOAD=str(built["libmymalloc.so"])))
    assert "preload malloc" in real.stderr       # glibc: the preload's malloc is called
    ran = run_cli("why", "malloc", str(built["prog"]), "--preload",
                  str(built["libmymalloc.so"]), "--bind", "now")
    assert ran.code == EXIT["ok"], ran.err
    assert "Winner: libmymalloc.so" in ran.out
    assert "libmymalloc.so interposes libc.so.6" in ran.out
    asked = re.findall(r"^\s+\d+\. (\S+) ", ran.out, re.M)
    assert asked == ["prog", "libmymalloc.so"]
    assert re.search(r"JUMP_SLOT at prog\+0x[0-9a-f]+ holds 0x[0-9a-f]+ = libmymalloc.so "
                     r"\+ 0x[0-9a-f]+", ran.out)


def test_why_without_a_preload_finds_libc(built: dict[str, Path]) -> None:
    ran = run_cli("why", "malloc", str(built["prog"]))
    assert ran.code == EXIT["ok"], ran.err
    assert "refers to malloc@GLIBC_2.2.5" in ran.out and "Winner: libc.so.6" in ran.out
    assert "its own PLT code" in ran.out            # a program binds lazily by default


def test_why_says_which_versions_do_not_match() -> None:
    ran = run_cli("why", "malloc@GLIBC_2.99", "/usr/bin/ls")
    assert ran.code == EXIT["undefined"] == 1
    assert "libc.so.6 defines it, but in version GLIBC_2.2.5, not the one wanted: " \
        "GLIBC_2.99" in ran.out
    assert "Nobody in the scope defines malloc@GLIBC_2.99" in ran.out


def test_why_from_another_object_and_a_name_nobody_defines() -> None:
    ran = run_cli("why", "SSL_new", LIBSSL, "--from", "libc.so.6")
    assert ran.code == EXIT["undefined"]
    assert re.findall(r"^\s+\d+\. (\S+) ", ran.out, re.M) == ["libc.so.6",
                                                            "ld-linux-x86-64.so.2"]
    found = run_cli("why", "SSL_new", LIBSSL)
    assert found.code == EXIT["ok"] and "Winner: libssl.so.3" in found.out


def _refused(ran: Ran) -> str:
    """The one error line of a refused command (exit 2)."""
    assert ran.code == EXIT["refused"], (ran.code, ran.out)
    return ran.one_error_line()


def test_a_missing_dependency_names_the_chain(built: dict[str, Path]) -> None:
    prog = str(built["prog_bar"])
    real = subprocess.run([prog], capture_output=True, text=True, timeout=30)
    assert real.returncode != 0 and "libfoo.so" in real.stderr      # glibc refuses it too
    for argv in (("load", "--deps", prog), ("maps", "--deps", prog),
                 ("why", "foo", prog), ("load", "--deps", str(built["libbar.so"]))):
        line = _refused(run_cli(*argv))
        assert "'libfoo.so'" in line and "libbar.so" in line and "ElfDependencyError" in line
        if argv[-1] == prog:
            assert re.search(r"libbar\.so <- \S*prog_bar", line), line


def test_options_only_one_object_takes_are_refused() -> None:
    assert "--backend sim" in _refused(run_cli("load", "--deps", LIBSSL, "--backend", "libc"))
    assert "--base" in _refused(run_cli("maps", "--deps", LIBSSL, "--base", "0x7f0000000000"))
    line = _refused(run_cli("why", "malloc", "/usr/bin/ls", "--from", "nope"))
    assert "'nope'" in line and "libc.so.6" in line


@pytest.mark.parametrize("kind", ["text", "elf32", "truncated", "empty"])
@pytest.mark.parametrize("argv", [("load", "--deps"), ("maps", "--deps"), ("why", "malloc")])
def test_files_that_are_no_image_are_one_line(tmp_path: Path, kind: str,
                                              argv: tuple[str, ...]) -> None:
    path = tmp_path / kind
    libz = (LIBDIR / "libz.so.1").read_bytes()
    path.write_bytes({"text": b"not an ELF file\n", "elf32": libz[:4] + b"\x01" + libz[5:],
                      "truncated": libz[:200], "empty": b""}[kind])
    line = _refused(run_cli(*argv, str(path)))
    assert str(path) in line
    assert "only with --deps" in _refused(run_cli("load", LIBSSL, "--preload", "libz.so.1"))
    assert "only with --deps" in _refused(run_cli("maps", LIBSSL, "--bind", "now"))


def test_a_preload_that_cannot_be_found_is_refused_by_name() -> None:
    line = _refused(run_cli("why", "malloc", "/usr/bin/ls", "--preload", "libnothere.so.9"))
    assert "--preload: libnothere.so.9 cannot be preloaded (not found" in line


def test_maps_of_a_lazily_bound_program_names_the_resolver_page(built: dict[str, Path]) -> None:
    lazy = run_cli("maps", "--deps", str(built["prog"]), "--color", "never")
    assert lazy.code == EXIT["ok"], lazy.err
    assert re.search(r" r-xp 00000000 code +\[lazy resolver \(GOT\[2\]\)", lazy.out)
    now = run_cli("maps", "--deps", str(built["prog"]), "--bind", "now", "--color", "never")
    assert now.code == EXIT["ok"] and "[lazy resolver" not in now.out
