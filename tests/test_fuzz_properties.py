"""The fuzzing properties (vmsim.fuzz) on our loader, on each backend, and deliberately broken
loader variants that the properties must catch with a shrunk example.

Host runs happen in forked children (loader.isolate): a loader bug there kills a child, not
pytest. The simulator runs in-process: a loader bug there is a ``Fault``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import loader
import loader.mapper
import loader.plan
import loader.reloc
from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.pages import HOST_PAGE_SIZE, page_round_down, page_round_up
from loader.strategies import MalformedImage, elf_images, malformed_elf
from vmsim import AddressSpace
from vmsim.fuzz import (
    CheckingMmap,
    Violation,
    check_malformed_load,
    check_same_on_both,
    check_valid_load,
    expected_page_perms,
)
from vmsim.fuzz.elfwriter import ElfImage

PAGE = HOST_PAGE_SIZE
PIPELINE = sys.modules[loader.load.__module__]
"""The module holding ``load`` and its steps (its name is the loader's business)."""


BACKENDS = ["libc", "sim"]
quick = settings(max_examples=30, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


def _on(backend: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(mm, *args)`` on a fresh backend: the host in a forked child (re-raising what
    the child raised), the simulator here."""
    if backend == "sim":
        return fn(AddressSpace(), *args)

    def child() -> tuple[str, Any]:
        try:
            return "ok", fn(LibcMmap(), *args)
        except Exception as exc:
            return "raised", exc

    done = run_isolated(child)
    if done.status != "ok":
        raise Violation(f"host child died with {done.status}")
    status, value = done.value
    if status == "raised":
        raise value
    return value


def _valid(mm: Mmap, image: ElfImage, path: str | None) -> None:
    check_valid_load(image, mm, source=path)


def _malformed(mm: Mmap, data: bytes) -> str:
    return check_malformed_load(data, mm)


@pytest.fixture
def image_file(tmp_path: Path) -> Iterator[Callable[[ElfImage], str]]:
    """Writes an image to a file and returns its path (so the loader maps from an fd)."""
    def write(image: ElfImage) -> str:
        path = tmp_path / "image.so"
        path.write_bytes(image.data)
        return str(path)
    yield write


# ---------------------------------------------------------------------------------------------
# Properties on our loader.


@pytest.mark.parametrize("backend", BACKENDS)
@quick
@given(image=elf_images(textrel=st.booleans(), kind=st.sampled_from(["dyn", "dyn", "exec"]),
                        max_page_size=st.sampled_from([PAGE, 0x10000])),
       from_file=st.booleans())
def test_valid_images_load_as_predicted(backend: str, image: ElfImage, from_file: bool,
                                        image_file: Callable[[ElfImage], str]) -> None:
    # Properties 1 (one backend), 3, 4 and 5: see vmsim.fuzz.check_valid_load.
    _on(backend, _valid, image, image_file(image) if from_file else None)


@quick
@given(image=elf_images(max_page_size=0x10000, relro=True, bss=True), from_file=st.booleans())
def test_valid_images_load_as_predicted_with_64k_pages(
        image: ElfImage, from_file: bool, image_file: Callable[[ElfImage], str]) -> None:
    # The simulator's page size is a knob: the same properties hold on a 64 KiB-page machine.
    mm = AddressSpace(page_size=0x10000)
    check_valid_load(image, mm, source=image_file(image) if from_file else None)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(quick, max_examples=60)
@given(bad=malformed_elf())
def test_malformed_images_raise_only_elferror_and_leave_nothing(backend: str,
                                                                bad: MalformedImage) -> None:
    # Property 2 (with 3 and 4).
    _on(backend, _malformed, bad.data)


@settings(quick, max_examples=15)
@given(image=elf_images(textrel=st.booleans()))
def test_host_and_simulator_give_identical_outcomes(image: ElfImage) -> None:
    check_same_on_both(image, AddressSpace)


# ---------------------------------------------------------------------------------------------
# The checking wrapper itself can fail.


def _checked_arena(mm: Mmap) -> tuple[CheckingMmap, int]:
    cm = CheckingMmap(mm)
    base = cm.mmap_reserve(None, 4 * PAGE, True)
    return cm, base


@pytest.mark.parametrize("backend", BACKENDS)
def test_checking_mmap_refuses_calls_outside_the_reservation(backend: str) -> None:
    def body(mm: Mmap) -> list[str]:
        cm, base = _checked_arena(mm)
        caught = []
        rw = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
        fixed = MapFlags.MAP_PRIVATE | MapFlags.MAP_FIXED
        calls: list[Callable[[], object]] = [
            lambda: cm.mmap_anonymous(base + 4 * PAGE, PAGE, rw, fixed),
            lambda: cm.mprotect(base - PAGE, 2 * PAGE, rw),
            lambda: cm.munmap(base + 3 * PAGE, 2 * PAGE),
            lambda: cm.write(base, b"x"),  # inside, but still PROT_NONE
        ]
        for call in calls:
            try:
                call()
            except Violation as exc:
                caught.append(str(exc))
        cm.mprotect(base, PAGE, rw)
        cm.write(base + 8, b"ok")  # now allowed
        cm.munmap(base, 4 * PAGE)
        return caught

    caught = _on(backend, body)
    assert len(caught) == 4
    assert "outside the loader's reservation" in caught[0]
    assert "never made writable" in caught[3]


def test_expected_page_perms_follow_glibc_relro_rounding() -> None:
    from vmsim.fuzz.elfwriter import ElfSpec, Segment, build
    image = build(ElfSpec(segments=(Segment("rw", data=bytes(3 * PAGE), relro=PAGE + 100),)))
    perms = expected_page_perms(image, PAGE)
    seg = page_round_down(image.segment_vaddr(0), PAGE) // PAGE
    assert perms[seg] == "r--p"          # the whole first page is RELRO
    assert perms[seg + 1] == "rw-p"      # the partial second page stays writable (glibc)
    assert perms[0] == "r--p" and perms[-1] == "rw-p"


# ---------------------------------------------------------------------------------------------
# Broken loader variants: each must be caught, and the example hypothesis shrinks to is small.


def _relro_end_rounded_up(image: Any) -> tuple[int, int] | None:
    """loader.plan._relro as elf_loader does it: the end rounded UP (seals live data)."""
    seg = image.relro
    if seg is None:
        return None
    start = page_round_down(seg.p_vaddr, image.page_size)
    end = page_round_up(seg.end, image.page_size)
    return (start, end) if end > start else None


def _no_zero_tail(*args: Any, **kwargs: Any) -> None:
    """loader.mapper._zero_tail that forgets to clear the .bss tail of the last file page."""


_real_relative_words = loader.reloc._relative_words


def _relative_from_mapped_base(image: Any, tables: Any, bias: int, out: Any, places: list[Any],
                               values: list[Any]) -> None:
    """loader.reloc._relative_words computing B' + A with B' the mapped start of the span,
    not the load bias (CLE's bug): wrong exactly when the lowest vaddr is not 0."""
    before = len(values)
    _real_relative_words(image, tables, bias, out, places, values)
    vmin = page_round_down(min(s.p_vaddr for s in image.loads), image.page_size)
    for i in range(before, len(values)):
        values[i] = values[i] + np.uint64(vmin)


def _no_textrel_unprotect(obj: Any, writable: bool) -> None:
    """loader.load._protect_textrel that forgets to make text writable: relocation then
    writes to pages it never made writable."""


BROKEN: dict[str, tuple[Any, str, Any, dict[str, Any]]] = {
    "relro-end-rounded-up": (loader.plan, "_relro", _relro_end_rounded_up,
                             {"relro": True}),
    "bss-tail-not-zeroed": (loader.mapper, "_zero_tail", _no_zero_tail, {"bss": True}),
    "relative-from-mapped-base": (loader.reloc, "_relative_words", _relative_from_mapped_base,
                                  {"relocation_types": ["RELATIVE"]}),
    "write-before-mprotect": (PIPELINE, "_protect_textrel", _no_textrel_unprotect,
                              {"textrel": True}),
}


def _fails(backend: str, image: ElfImage, path: str) -> bool:
    """Whether the valid-load property fails for ``image`` (loaded from ``path``)."""
    try:
        _on(backend, _valid, image, path)
    except Exception:  # Violation, the simulator's Fault, or whatever the broken loader raises
        return True
    return False


def _variant_cases() -> list[Any]:
    """(variant, backend) pairs: every variant on every backend; on the host (a fork per
    example, slow to shrink) only the .bss one is in the default run, the others are marked
    slow."""
    cases = []
    for variant in sorted(BROKEN):
        for backend in BACKENDS:
            slow = backend == "libc" and variant != "bss-tail-not-zeroed"
            cases.append(pytest.param(variant, backend, marks=[pytest.mark.slow] if slow
                                      else [], id=f"{variant}-{backend}"))
    return cases


@pytest.mark.parametrize("variant, backend", _variant_cases())
def test_broken_loader_is_caught_with_a_shrunk_example(
        variant: str, backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module, name, broken, knobs = BROKEN[variant]
    path = str(tmp_path / "image.so")

    def failing(image: ElfImage) -> bool:
        Path(path).write_bytes(image.data)
        return _fails(backend, image, path)

    with monkeypatch.context() as patch:
        patch.setattr(module, name, broken)
        try:
            shrunk = find(elf_images(**knobs), failing,
                          settings=settings(max_examples=300, deadline=None, database=None,
                                            derandomize=True,
                                            suppress_health_check=list(HealthCheck)))
        except NoSuchExample:
            pytest.fail(f"the properties did not catch the broken variant {variant}")
    # The shrunk example is small: a few segments holding a few words, few relocations.
    spec = shrunk.spec
    print(f"{variant} on {backend}: shrunk to {spec}")
    assert len(spec.segments) <= 3, spec
    assert sum(len(s.data) for s in spec.segments) <= 64, spec
    assert len(spec.relocs) <= 2 and len(spec.symbols) <= 1, spec
    # ... and with the real loader back, the same image passes.
    Path(path).write_bytes(shrunk.data)
    assert not _fails(backend, shrunk, path)


# ---------------------------------------------------------------------------------------------
# The campaign (vmsim fuzz).


def test_campaign_reports_and_saves_the_shrunk_failure(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    from vmsim.fuzz import run_campaign
    monkeypatch.setattr(loader.plan, "_relro", _relro_end_rounded_up)
    stats = run_campaign(60, kind="valid", out_dir=tmp_path, max_examples=150)
    assert stats.failures, "the campaign missed the RELRO-rounded-up loader"
    text = stats.failures[0]
    assert "Violation" in text and "relro=" in text
    saved = sorted(tmp_path.glob("failure-*.elf"))
    assert saved and saved[0].read_bytes()[:4] == b"\x7fELF"


def test_vmsim_fuzz_command_runs_a_short_clean_campaign(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from vmsim.fuzz import main
    code = main(["--time", "1", "--property", "malformed", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out
    assert "outcomes:" in out.out and "examples" in out.err


def _page_sharing_image() -> bytes:
    """A read-write PT_LOAD with a RELATIVE relocation, then a read-only PT_LOAD moved (still
    congruent, no byte in common) into the same page: found by the malformed campaign."""
    from vmsim.fuzz.elfwriter import PHDR, PT_LOAD, ElfSpec, Reloc, Segment, build
    image = build(ElfSpec(segments=(Segment("rw", data=bytes(8)), Segment("r", data=bytes(8))),
                          relocs=(Reloc("RELATIVE", 0, 0, target=(1, 0)),), sections=False))
    data = bytearray(image.data)
    i = [k for k, t in enumerate(image.phdrs["p_type"].tolist()) if t == PT_LOAD][2]
    rw_vaddr, r_vaddr = image.segment_vaddr(0), image.segment_vaddr(1)
    moved = page_round_down(rw_vaddr, PAGE) + r_vaddr % PAGE
    at = image.phoff + i * PHDR.itemsize + 16  # p_vaddr
    data[at:at + 8] = moved.to_bytes(8, "little")
    return bytes(data)


def test_glibc_crashes_on_pt_loads_sharing_a_page(tmp_path: Path) -> None:
    # The judge for the test below: glibc maps the read-only segment over the page, then its
    # relocation write faults. A loader should refuse such a file.
    import subprocess
    path = tmp_path / "shared-page.so"
    path.write_bytes(_page_sharing_image())
    done = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(path)!r})"],
                          capture_output=True, check=False)
    assert done.returncode == -11  # SIGSEGV


@pytest.mark.parametrize("backend", BACKENDS)
def test_pt_loads_sharing_a_page_are_refused(backend: str) -> None:
    # Found by the malformed campaign (the loader mapped the later segment over the page and
    # its relocation then wrote to a read-only page); the loader now refuses the file.
    assert _on(backend, _malformed, _page_sharing_image()) == "ElfSegmentError"


@pytest.mark.slow
def test_malformed_campaign_on_both_backends_finds_nothing(tmp_path: Path) -> None:
    # A campaign of 20,000 corrupted files on the simulator and (in forked children, 500 at
    # a time) on the host: only ElfError (or a backend's ENOMEM), nothing left mapped.
    from vmsim.fuzz import run_campaign
    stats = run_campaign(3600, kind="malformed", backend="both", out_dir=tmp_path,
                         max_examples=20_000)
    assert stats.failures == []
    assert stats.examples >= 20_000 and stats.host_examples == stats.examples
    assert stats.host_outcomes == stats.outcomes  # the same verdict on both backends
