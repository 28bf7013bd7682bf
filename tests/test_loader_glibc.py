"""Agreement with glibc: the per-page protections our loader leaves inside the span, RELRO
included, equal what glibc's dlopen leaves in /proc/self/maps of a fresh process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from loader_support import (  # noqa: F401
    SYSTEM_LIBS,
    fixture_libs_fixture,
    glibc_maps,
    sim_factory,
)

from loader import load
from loader.compare import host_outcome
from loader.elf import parse_image
from loader.mmap import Region
from loader.pages import HOST_PAGE_SIZE
from loader.plan import make_plan
from loader.tables import DT, parse_tables

PAGE = HOST_PAGE_SIZE
FIXTURE_POINTS = ["relro", "norelro", "now", "lazy", "separate-code", "noseparate-code",
                  "max-page-64k", "relr", "fno-plt", "sysv-hash", "versioned", "textrel"]


def _glibc_page_perms(path: Path) -> list[str]:
    """Per-page perms glibc leaves over the object's span after dlopen in a fresh process."""
    bias, text = glibc_maps(path)
    image = parse_image(path.read_bytes(), PAGE)
    tables = parse_tables(image)
    plan = make_plan(image, DT.TEXTREL in tables.tags)
    start, end = bias + plan.vmin, bias + plan.vmax
    perms = ["---p"] * ((end - start) // PAGE)
    for line in text.splitlines():
        r = Region.parse(line)
        for va in range(max(r.start, start), min(r.end, end), PAGE):
            perms[(va - start) // PAGE] = r.perms
    return perms


def _ours(path: Path, backend: str) -> list[str]:
    """Per-page perms our loader leaves over the span on ``backend``."""
    if backend == "libc":
        _, _, outcome = host_outcome(path)
    else:
        outcome = load(path, sim_factory()()).outcome()
    return outcome.page_perms(PAGE)


def _compare(ours: list[str], theirs: list[str]) -> list[str]:
    """Page indices (as text) where the perms differ."""
    assert len(ours) == len(theirs)
    return [f"page {i:#x}: ours {a} glibc {b}" for i, (a, b) in enumerate(zip(ours, theirs,
                                                                           strict=True))
            if a[:3] != b[:3]]


@pytest.mark.parametrize("backend", ["libc", "sim"])
@pytest.mark.parametrize("lib", sorted(SYSTEM_LIBS))
def test_system_library_matches_glibc(lib: str, backend: str) -> None:
    path = SYSTEM_LIBS[lib]
    assert _compare(_ours(path, backend), _glibc_page_perms(path)) == []


@pytest.mark.parametrize("backend", ["libc", "sim"])
@pytest.mark.parametrize("point", FIXTURE_POINTS)
def test_fixture_matches_glibc(fixture_libs: dict[str, Path], point: str, backend: str) -> None:
    path = fixture_libs[point]
    assert _compare(_ours(path, backend), _glibc_page_perms(path)) == []
