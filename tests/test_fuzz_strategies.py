"""The public strategies (loader.strategies, vmsim.strategies), held to outside judges.

Generated valid images must satisfy readelf, pyelftools and glibc's dlopen (with the symbol
addresses and relocated words the writer predicts, and RELRO pages read-only). Malformed ones
must differ from their source where they say. Op sequences applied to the real kernel (in a
forked child) must stay inside their arena. Argument errors must say what was given.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from test_elfwriter import (
    assert_as_predicted,
    dlopen_report,
    job_for,
    readelf_complaints,
    relro_pages_read_only,
)

from loader.isolate import run_isolated
from loader.libc import LibcMmap, read_maps
from loader.mmap import MapFlags, MmapError, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from loader.strategies import MUTATION_KINDS, MalformedImage, elf_images, elf_specs, malformed_elf
from vmsim import AddressSpace
from vmsim.fuzz.elfwriter import ElfImage, ElfSpec
from vmsim.strategies import (
    MmapOp,
    MprotectOp,
    MunmapOp,
    ReadOp,
    WriteOp,
    apply_op,
    op_sequences,
    ops,
)

PAGE = HOST_PAGE_SIZE
needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
quick = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@needs_readelf
@quick
@given(image=elf_images(textrel=st.booleans(), max_page_size=st.sampled_from([PAGE, 0x10000])))
def test_valid_images_pass_readelf_pyelftools_and_glibc(image: ElfImage, tmp_path_factory:
                                                        pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("img") / "valid.so"
    path.write_bytes(image.data)
    assert readelf_complaints(path) == ""
    elf = ELFFile(io.BytesIO(image.data))
    dynamic = next(s for s in elf.iter_segments() if isinstance(s, DynamicSegment))
    found = {s.name: s["st_value"] for s in dynamic.iter_symbols() if s.name}
    assert found == {s.name: image.symbol_vaddr(s.name) for s in image.spec.symbols}
    [result] = dlopen_report([job_for(image, path)])
    assert_as_predicted(image, result)
    assert relro_pages_read_only(image, result)


@needs_readelf
@quick
@given(image=elf_images(rel_format="rel", kind=st.sampled_from(["dyn", "exec"])))
def test_rel_and_exec_images_pass_readelf(image: ElfImage, tmp_path_factory:
                                          pytest.TempPathFactory) -> None:
    # glibc on x86-64 ignores DT_REL and will not dlopen ET_EXEC: readelf is the judge here.
    path = tmp_path_factory.mktemp("img") / "valid"
    path.write_bytes(image.data)
    assert readelf_complaints(path) == ""


@quick
@given(spec=elf_specs(segments=3, relro=True, bss=True, relocation_types=["RELATIVE"]))
def test_knobs_are_obeyed(spec: ElfSpec) -> None:
    assert len(spec.segments) == 3
    assert sum(1 for s in spec.segments if s.relro) == 1
    assert {r.type for r in spec.relocs} <= {"RELATIVE"}


@quick
@given(bad=malformed_elf())
def test_malformed_images_differ_from_their_source(bad: MalformedImage) -> None:
    assert bad.kind in MUTATION_KINDS
    assert bad.data != bad.image.data, bad
    if bad.kind == "truncate":
        assert len(bad.data) < len(bad.image.data)
    else:
        assert len(bad.data) == len(bad.image.data)


@pytest.mark.parametrize("kind", MUTATION_KINDS)
def test_every_mutation_kind_changes_the_image(kind: str) -> None:
    # Each corruption writes something: never the source image unchanged.
    seen: list[MalformedImage] = []

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(malformed_elf(kinds=[kind]))
    def collect(bad: MalformedImage) -> None:
        assert bad.data != bad.image.data, bad
        seen.append(bad)

    collect()
    assert sum(b.kind == kind for b in seen) >= 3, [b.kind for b in seen]


def test_default_malformed_sources_have_what_the_new_kinds_corrupt() -> None:
    from vmsim.fuzz.elfwriter import DT_INIT_ARRAY
    found: set[str] = set()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(malformed_elf())
    def collect(bad: MalformedImage) -> None:
        spec = bad.image.spec
        found.update(k for k, present in (
            ("import", any(s.segment is None for s in spec.symbols)),
            ("copy", any(r.type == "COPY" for r in spec.relocs)),
            ("init", DT_INIT_ARRAY in bad.image.dynamic_tags),
            ("relr", "relr" in bad.image.tables),
            ("verneed", "verneed" in bad.image.tables)) if present)

    collect()
    assert found == {"import", "copy", "init", "relr", "verneed"}


@pytest.mark.parametrize("kind", MUTATION_KINDS)
def test_every_mutation_kind_can_be_drawn(kind: str) -> None:
    seen: list[MalformedImage] = []

    @settings(max_examples=30, deadline=None, database=None, derandomize=True)
    @given(malformed_elf(kinds=[kind]))
    def collect(bad: MalformedImage) -> None:
        seen.append(bad)

    collect()
    assert any(b.kind == kind for b in seen)
    assert all(b.mutation for b in seen)


@pytest.mark.parametrize("call, message", [
    (lambda: elf_specs(segments=9), "segments=9: expected an int in \\[0, 8\\]"),
    (lambda: elf_specs(max_page_size=0x1800), "max_page_size=6144"),
    (lambda: elf_specs(relocation_types=["PC32"]), "'PC32'.*unknown"),
    (lambda: elf_specs(relro="yes"), "relro='yes': expected a bool"),
    (lambda: elf_specs(hash="md5"), "hash='md5': expected one of"),
    (lambda: malformed_elf(kinds=["zap"]), "'zap'.*unknown"),
    (lambda: malformed_elf(b"\x7fELF"), "expected an ElfImage"),
    (lambda: ops(kinds=["fork"]), "'fork'.*unknown"),
    (lambda: op_sequences(min_size=3, max_size=2), "max_size=2"),
    (lambda: ops(arena_pages=0), "arena_pages=0"),
])
def test_argument_errors_say_what_was_given_and_what_is_allowed(call: Any,
                                                                 message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        call()


def test_strategy_valued_knob_errors_surface_when_drawn() -> None:
    @settings(max_examples=5, database=None)
    @given(elf_specs(segments=st.just(12)))
    def draw(spec: ElfSpec) -> None:
        pass

    with pytest.raises(InvalidArgument, match="segments=12"):
        draw()


def test_entry_points_register_the_types() -> None:
    from importlib.metadata import entry_points

    hooks = {ep.value for ep in entry_points(group="hypothesis")}
    assert "vmsim._hypothesis_plugin:setup" in hooks
    for ep in entry_points(group="hypothesis"):
        if ep.value.endswith("_hypothesis_plugin:setup"):
            ep.load()()

    @settings(max_examples=3, database=None)
    @given(st.from_type(ElfImage), st.from_type(MprotectOp))
    def draw(image: ElfImage, op: MprotectOp) -> None:
        assert image.data[:4] == b"\x7fELF"
        assert isinstance(op, MprotectOp)

    draw()


@pytest.mark.parametrize("first", ["vmsim.strategies", "loader.strategies", "hypothesis",
                                   "vmsim.fuzz.images", "vmsim.fuzz.malformed", "vmsim.fuzz.ops"])
def test_any_import_order_works(first: str) -> None:
    """Hypothesis runs the entry points while it is imported: a user who imports our
    strategies first must not see a circular-import error (a fresh interpreter each time)."""
    import subprocess
    import sys

    code = (f"import {first}\n"
            "from hypothesis import strategies as st\n"
            "from loader.strategies import ElfImage\n"
            "from vmsim.strategies import MunmapOp\n"
            "assert st.from_type(ElfImage).example().data[:4] == b'\\x7fELF'\n"
            "assert isinstance(st.from_type(MunmapOp).example(), MunmapOp)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# Ops on the real kernel.


def _arena_maps(base: int, pages: int) -> list[tuple[int, int, str]]:
    """The host's maps lines overlapping the arena, as page offsets and perms."""
    end = base + pages * PAGE
    return [((r.start - base) // PAGE, (min(r.end, end) - base) // PAGE, r.perms)
            for r in read_maps() if r.end > base and r.start < end]


def test_apply_op_performs_each_call_on_the_host() -> None:
    def child() -> list[Any]:
        mm = LibcMmap()
        base = mm.mmap(None, 8 * PAGE, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE,
                       MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS, 0, None).addr
        seen: list[Any] = []
        apply_op(WriteOp(1, 5, b"hello"), mm, base)
        seen.append(apply_op(ReadOp(1, 5, 5), mm, base))
        apply_op(MprotectOp(2, 3, ProtFlags.PROT_READ), mm, base)
        seen.append(_arena_maps(base, 8))
        seen.append(apply_op(MmapOp(6, 1, ProtFlags.PROT_NONE), mm, base))
        apply_op(MunmapOp(7, 1), mm, base)
        seen.append(_arena_maps(base, 8))
        return seen

    result = run_isolated(child)
    assert result.status == "ok"
    data, after_mprotect, mapped_at, final = result.value
    assert data == b"hello"
    assert after_mprotect == [(0, 2, "rw-p"), (2, 5, "r--p"), (5, 8, "rw-p")]
    assert mapped_at == 6 * PAGE
    assert final == [(0, 2, "rw-p"), (2, 5, "r--p"), (5, 6, "rw-p"), (6, 7, "---p")]


@settings(max_examples=15, deadline=None)
@given(seq=op_sequences(arena_pages=8, max_size=12, kinds=["mmap", "munmap", "mprotect"]))
def test_op_sequences_stay_inside_their_arena_on_the_host(seq: list[Any]) -> None:
    def child() -> tuple[list[Any], list[Any], list[str]]:
        mm = LibcMmap()
        base = mm.mmap(None, 10 * PAGE, ProtFlags.PROT_NONE,
                       MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS, 0, None).addr + PAGE
        outside_before = [r for r in read_maps() if r.end <= base - PAGE
                          or r.start >= base + 9 * PAGE]
        errors = []
        for op in seq:
            try:
                apply_op(op, mm, base)
            except MmapError as e:
                errors.append(e.strerror or "")
        outside_after = [r for r in read_maps() if r.end <= base - PAGE
                         or r.start >= base + 9 * PAGE]
        return outside_before, outside_after, errors

    result = run_isolated(child)
    assert result.status == "ok", result
    before, after, _errors = result.value
    # The child's own heap may grow (anonymous memory, and [heap] through brk): compare the
    # file mappings, which nothing but a runaway op could change.
    def files(regions: list[Any]) -> list[Any]:
        return [r for r in regions if r.path and not r.path.startswith("[")]

    assert files(before) == files(after)


def _write_file(tmp_path: Path, pages: int) -> Path:
    path = tmp_path / "arena-file"
    path.write_bytes(bytes(range(256)) * (pages * PAGE // 256))
    return path


def test_file_ops_need_a_descriptor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fd=None"):
        apply_op(MmapOp(0, 1, ProtFlags.PROT_READ, file_page=0), LibcMmap(), 0)


# ---------------------------------------------------------------------------------------------
# The same op sequence on the kernel and on the simulator (the DatabaseComparison pattern).


def _run_ops(mm: Any, base: int, seq: list[Any], fd: int) -> tuple[list[Any], list[Any]]:
    """Apply ``seq`` in the 8-page arena at ``base``; (per-op result or errno, final regions
    of the arena relative to ``base``)."""
    results: list[Any] = []
    for op in seq:
        try:
            results.append(apply_op(op, mm, base, fd=fd))
        except MmapError as exc:
            results.append(exc.errno)
    regions = [((max(r.start, base) - base) // PAGE, (min(r.end, base + 8 * PAGE) - base) // PAGE,
                r.perms, bool(r.inode) or r.path.startswith("/"))
               for r in mm.maps() if r.end > base and r.start < base + 8 * PAGE]
    return results, regions


@settings(deadline=None)  # example count from the profile (dev 20, ci 100, fuzz 100k)
@given(seq=op_sequences(arena_pages=8, max_size=10, kinds=["mmap", "munmap", "mprotect"],
                        file_pages=4, placements=["fixed", "noreplace"]))
def test_op_sequences_give_the_same_results_on_kernel_and_simulator(
        seq: list[Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = _write_file(tmp_path_factory.mktemp("ops"), 4)
    fd = os.open(path, os.O_RDWR)
    try:
        def child() -> tuple[int, tuple[list[Any], list[Any]]]:
            mm = LibcMmap()
            arena = mm.mmap(None, 10 * PAGE, ProtFlags.PROT_NONE,
                            MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS, 0, None).addr
            mm.munmap(arena, 10 * PAGE)  # a free 10-page hole: the arena is its middle
            return arena + PAGE, _run_ops(mm, arena + PAGE, seq, fd)

        done = run_isolated(child)
        assert done.status == "ok", done
        base, kernel = done.value
        sim = AddressSpace()
        assert _run_ops(sim, base, seq, fd) == kernel
    finally:
        os.close(fd)


@pytest.mark.parametrize("module", ["vmsim.fuzz.elfwriter", "vmsim.fuzz.images",
                                    "vmsim.fuzz.malformed", "vmsim.fuzz.ops"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .example() in docs warns outside a REPL
        result = doctest.testmod(importlib.import_module(module))
    assert result.attempted and not result.failed
