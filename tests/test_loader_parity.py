"""Identical outcomes on both backends (DESIGN.md "Outcomes"): loaded at the same address with
the same stub bindings, the simulator and the host give equal regions (relative to the span,
perms, file or anonymous, offsets), equal bytes in every readable page, equal RELRO and the
same list of Mmap calls. The host side runs in forked children (loader.compare).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from loader_support import (  # noqa: F401
    SYSTEM_LIBS,
    fixture_libs_fixture,
    machine_elf_libraries,
    sim_factory,
)

from loader import CopyingMmap, load
from loader.compare import compare_backends, host_outcome
from loader.symbols import StubResolver

FIXTURE_POINTS = ["relro", "norelro", "now", "lazy", "separate-code", "noseparate-code",
                  "max-page-64k", "relr", "fno-plt", "sysv-hash", "versioned", "textrel",
                  "pie"]


def _sim() -> Any:
    return sim_factory()()


def _check(path: Path) -> None:
    result = compare_backends(path, _sim())
    assert result.differences == []
    assert result.host.regions and result.host.pages and result.host.calls


@pytest.mark.parametrize("lib", sorted(SYSTEM_LIBS))
def test_system_library_identical(lib: str) -> None:
    _check(SYSTEM_LIBS[lib])


@pytest.mark.parametrize("point", FIXTURE_POINTS)
def test_fixture_identical(fixture_libs: dict[str, Path], point: str) -> None:
    _check(fixture_libs[point])


@pytest.mark.parametrize("point", ["relro", "max-page-64k", "textrel"])
def test_need_copy_path_identical(fixture_libs: dict[str, Path], point: str) -> None:
    """The copy path (bytes input: no fd, the backend answers need_copy) on both backends;
    holes are sealed PROT_NONE even though the reservation was writable."""
    data = fixture_libs[point].read_bytes()
    base, extern, _ = host_outcome(data)
    _, _, host = host_outcome(data, base, extern)
    obj = load(data, _sim(), resolver=StubResolver(extern_addr=extern), base=base)
    assert host.diff(obj.outcome()) == []
    assert any(dict(c).get("need_copy") for c in host.calls)


def test_copying_wrapper_forces_need_copy(fixture_libs: dict[str, Path]) -> None:
    """CopyingMmap over the simulator: same final protections as the use_file path."""
    path = fixture_libs["relro"]
    plain = load(path, _sim()).outcome()
    copied = load(path, CopyingMmap(_sim())).outcome()
    assert copied.page_perms(4096) == plain.page_perms(4096)
    assert copied.pages == plain.pages
    assert all(not r.file_backed for r in copied.regions)


def test_a_difference_is_reported(fixture_libs: dict[str, Path]) -> None:
    """The comparison can fail: a different library at the same place differs, and a page
    that differs is shown down to its first differing word."""
    a = load(fixture_libs["relro"], _sim(), base=0x10000000).outcome(keep_bytes=True)
    b = load(fixture_libs["norelro"], _sim(), base=0x10000000).outcome(keep_bytes=True)
    lines = a.diff(b)
    assert any(line.startswith("relro") for line in lines)
    assert any(line.startswith("page") and "first at" in line for line in lines)


@pytest.mark.slow
def test_every_library_of_this_machine_identical() -> None:
    """Every ELF shared object of /usr/lib/x86_64-linux-gnu: identical outcomes, except
    (a) the host refuses it (PT_TLS, dynamic TLS of other modules: ElfUnsupportedError), or
    (b) it has IRELATIVE/IFUNC resolvers, which run on the host and may write memory there
    (ld.so and libatomic initialise CPU-feature data); ~30 s."""
    from loader import ElfUnsupportedError

    equal = 0
    unexplained = []
    for path in machine_elf_libraries():
        try:
            result = compare_backends(path, _sim())
        except ElfUnsupportedError:
            continue
        if not result.differences:
            equal += 1
        elif not result.host.irelative:
            unexplained.append((path, result.differences[:3]))
    assert unexplained == []
    assert equal > 100
