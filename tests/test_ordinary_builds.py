"""Ordinary gcc builds load: every executable and library gcc makes by default or with the
common link flags loads on the simulator with the plan's page protections, whatever its hash
tables cover (a -no-pie executable's and a -fvisibility=hidden library's GNU hash covers no
symbol; glibc never needs a symbol count, and neither may we).

The builds are compiled at test time into a session temp dir, once per session.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from loader import load
from loader.elf import parse_image
from loader.pages import HOST_PAGE_SIZE
from loader.tables import parse_tables
from vmsim import AddressSpace

PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int counter = 3;
static const char *greeting = "hello";
char *dup_greeting(void) { return strdup(greeting); }
int main(void) { char *s = dup_greeting(); puts(s); free(s); return counter - 3; }
"""

LIBRARY = r"""
#include <stdlib.h>
#include <string.h>
int counter = 5;
static int table[] = {1, 2, 3};
int *ptrs[] = {&counter, &table[1]};
size_t measure(const char *s) { return strlen(s) + (size_t)*ptrs[1]; }
void *grab(size_t n) { return calloc(n, 1); }
"""

VERSIONS = "VERS_1 { global: measure; grab; counter; ptrs; local: *; };\n"

LINKS: dict[str, list[str]] = {
    "default": [],
    "hash-gnu": ["-Wl,--hash-style=gnu"],
    "hash-sysv": ["-Wl,--hash-style=sysv"],
    "hash-both": ["-Wl,--hash-style=both"],
    "relr": ["-Wl,-z,pack-relative-relocs"],
}
KINDS: dict[str, tuple[str, list[str]]] = {
    "no-pie": ("prog.c", ["-fno-pie", "-no-pie"]),
    "pie": ("prog.c", ["-fPIE", "-pie"]),
    "shared": ("lib.c", ["-fPIC", "-shared"]),
    "shared-hidden": ("lib.c", ["-fPIC", "-shared", "-fvisibility=hidden"]),
    "shared-versioned": ("lib.c", ["-fPIC", "-shared", "-Wl,--version-script=vers.map"]),
    "shared-hidden-versioned": ("lib.c", ["-fPIC", "-shared", "-fvisibility=hidden",
                                          "-Wl,--version-script=vers.map"]),
}
BUILDS = [f"{kind}/{link}" for kind in KINDS for link in LINKS] + ["static-pie"]


def _gcc(where: Path, out: str, args: list[str]) -> Path | None:
    """gcc in ``where``; the output, or None when this toolchain cannot link it."""
    done = subprocess.run(["gcc", "-O1", *args, "-o", out], cwd=where, capture_output=True,
                          text=True)
    return where / out if done.returncode == 0 else None


@pytest.fixture(scope="session")
def ordinary_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | None]:
    """Every build of BUILDS, compiled once per session (None: gcc could not link it)."""
    where = tmp_path_factory.mktemp("ordinary_builds")
    (where / "prog.c").write_text(PROGRAM)
    (where / "lib.c").write_text(LIBRARY)
    (where / "vers.map").write_text(VERSIONS)
    out: dict[str, Path | None] = {}
    for kind, (source, flags) in KINDS.items():
        for link, extra in LINKS.items():
            name = f"{kind}/{link}"
            out[name] = _gcc(where, name.replace("/", "_"), [*flags, *extra, source])
    out["static-pie"] = _gcc(where, "static-pie", ["-static-pie", "prog.c"])
    return out


def _dynsym_count(path: Path) -> int:
    """The number of .dynsym entries, from the section headers (pyelftools)."""
    with path.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(".dynsym")
        return 0 if sec is None else int(sec.num_symbols())


@pytest.mark.parametrize("build", BUILDS)
def test_ordinary_build_loads_with_the_planned_protections(
        ordinary_builds: dict[str, Path | None], build: str) -> None:
    path = ordinary_builds[build]
    if path is None:
        assert build == "static-pie", f"gcc could not link the ordinary build {build}"
        pytest.skip("this toolchain has no static-pie libc")
    mm = AddressSpace()
    obj = load(path, mm)
    assert obj.relocations.unresolved == []
    predicted = [p.rwx + "p" for p in obj.plan.page_prots()]
    assert obj.outcome().page_perms(obj.plan.page_size) == predicted
    # The symbol table read is never larger than the real one, and covers every reference.
    assert obj.tables.nsyms <= _dynsym_count(path)
    top = max((int(t.r_sym.max()) for t in obj.tables.relocs if len(t)), default=0)
    assert top == 0 or obj.tables.nsyms > top
    obj.unload()
    assert mm.maps() == []


def test_gnu_hash_covering_no_symbol_is_not_the_symbol_count(
        ordinary_builds: dict[str, Path | None]) -> None:
    # The -no-pie executable's GNU hash has symoffset 1 and no bucket used, while its
    # relocations name the imports after symbol 0: the count comes from them.
    path = ordinary_builds["no-pie/hash-gnu"]
    assert path is not None
    tables = parse_tables(parse_image(path.read_bytes(), HOST_PAGE_SIZE))
    assert tables.gnu_hash is not None and not tables.gnu_hash.buckets.any()
    assert tables.nsyms == _dynsym_count(path)


def test_libstdbuf_loads() -> None:
    path = Path("/usr/libexec/coreutils/libstdbuf.so")
    mm = AddressSpace()
    obj = load(path, mm)
    predicted = [p.rwx + "p" for p in obj.plan.page_prots()]
    assert obj.outcome().page_perms(obj.plan.page_size) == predicted
    obj.unload()
    assert mm.maps() == []
