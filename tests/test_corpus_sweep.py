"""The corpus sweep (vmsim.sweep, scripts/corpus_sweep.py): this machine's ELF files on the
simulator, each loaded or refused with an ElfError glibc shares; the instrument itself.

The default run sweeps a sample of ~30 real files spanning the kinds (PIE, -no-pie, static,
static-pie, shared objects with RELR/IRELATIVE/TLS/TLSDESC, COPY relocations, ET_REL objects,
ELFCLASS32 and x32, separate debug files), each kind and feature checked here with pyelftools.
The whole machine (about 2,400 files, ~2 minutes on 2 cores) is behind ``-m slow``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

import vmsim.sweep as sweep_mod
from loader import ElfHeaderError, MmapError
from loader.pages import HOST_PAGE_SIZE
from vmsim import Fault
from vmsim.sweep import (
    FileResult,
    SweepReport,
    describe,
    dlopen_helper,
    find_elf_files,
    glibc_verdict,
    sweep,
)

ROOT = Path(__file__).resolve().parent.parent
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
SCAN = ["/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib/gcc", str(LIBDIR),
        "/usr/lib/debug/.build-id/00", "/usr/lib/debug/.build-id/01"]
"""Where the sample's per-kind picks come from (a quick scan, not the whole machine)."""

KINDS = ("pie", "executable", "static-executable", "shared-object", "relocatable", "elf32",
         "debug-info")

R_COPY, R_IRELATIVE, R_TLSDESC = 5, 37, 36

FEATURED: dict[str, tuple[str, Callable[[ELFFile], bool]]] = {}
"""path -> (feature, the check on its ELFFile that it really has it); filled below."""



# ---- feature checks (pyelftools, independent of the loader and of the sweep) -------------

def _relocation_types(elf: ELFFile) -> set[int]:
    """Every r_type in the file's relocation sections."""
    return {r["r_info_type"] for s in elf.iter_sections() if isinstance(s, RelocationSection)
            for r in s.iter_relocations()}


def _dynamic_tags(elf: ELFFile) -> set[str]:
    """The d_tag names of the dynamic section."""
    return {t.entry.d_tag for s in elf.iter_sections() if isinstance(s, DynamicSection)
            for t in s.iter_tags()}


def _segments(elf: ELFFile) -> set[str]:
    """The p_type names of the program headers."""
    return {seg["p_type"] for seg in elf.iter_segments()}


def _empty_gnu_hash(elf: ELFFile) -> bool:
    """A GNU hash table whose buckets are all empty, over a non-empty .dynsym."""
    section = elf.get_section_by_name(".gnu.hash")
    dynsym = elf.get_section_by_name(".dynsym")
    if section is None or dynsym is None:
        return False
    data = section.data()
    nbuckets, _, bloom, _ = (int.from_bytes(data[i: i + 4], "little") for i in range(0, 16, 4))
    at = 16 + 8 * bloom
    buckets = [int.from_bytes(data[at + 4 * i: at + 4 * i + 4], "little")
               for i in range(nbuckets)]
    return not any(buckets) and dynsym.num_symbols() > 1


FEATURED.update({
    "/usr/bin/ss": ("COPY relocations (PIE)", lambda e: R_COPY in _relocation_types(e)),
    "/usr/bin/python3": ("COPY relocations (-no-pie)",
                         lambda e: R_COPY in _relocation_types(e) and e["e_type"] == "ET_EXEC"),
    str(LIBDIR / "libc.so.6"): ("RELR, IRELATIVE, PT_TLS",
                                lambda e: "DT_RELR" in _dynamic_tags(e)
                                and R_IRELATIVE in _relocation_types(e)
                                and "PT_TLS" in _segments(e)),
    str(LIBDIR / "ld-linux-x86-64.so.2"): ("RELR, no DT_NEEDED",
                                           lambda e: "DT_RELR" in _dynamic_tags(e)
                                           and "DT_NEEDED" not in _dynamic_tags(e)),
    str(LIBDIR / "libstdc++.so.6"): ("PT_TLS, C++", lambda e: "PT_TLS" in _segments(e)),
    str(LIBDIR / "libEGL_mesa.so.0"): ("TLSDESC", lambda e: R_TLSDESC in _relocation_types(e)),
    "/usr/libexec/coreutils/libstdbuf.so": ("GNU hash with no hashed symbol", _empty_gnu_hash),
    "/usr/lib/perf-core/perf-read-vdsox32": ("x32: ELFCLASS32 on EM_X86_64",
                                             lambda e: e.elfclass == 32
                                             and e["e_machine"] == "EM_X86_64"),
    "/usr/sbin/ldconfig": ("static-pie", lambda e: e["e_type"] == "ET_DYN"
                           and "PT_INTERP" not in _segments(e)
                           and "PT_DYNAMIC" in _segments(e)),
})


def _elf(path: str) -> ELFFile:
    """An ELFFile over the whole file (read into memory, so no handle stays open)."""
    import io
    with open(path, "rb") as f:
        return ELFFile(io.BytesIO(f.read()))


def _kernel_modules() -> list[str]:
    """Kernel modules (.ko) under the sweep's roots, if this machine has any."""
    return [p for p in find_elf_files(["/usr/lib/modules"]) if p.endswith(".ko")][:1] \
        if os.path.isdir("/usr/lib/modules") else []


@functools.cache
def sample_files() -> dict[str, str]:
    """realpath -> kind: the three smallest files of each kind in SCAN, the featured files,
    any kernel module. Sorted for a stable order."""
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for path in find_elf_files(SCAN):
        by_kind.setdefault(describe(path), []).append((os.path.getsize(path), path))
    picked = {os.path.realpath(p): k for k in KINDS for _, p in sorted(by_kind.get(k, []))[:3]}
    for path in [*FEATURED, *_kernel_modules()]:
        if os.path.exists(path):
            picked[os.path.realpath(path)] = describe(path)
    return dict(sorted(picked.items()))


# ---- the sample sweep ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample() -> dict[str, str]:
    """The sample's files and kinds."""
    return sample_files()


@pytest.fixture(scope="module")
def sample_report(sample: dict[str, str]) -> SweepReport:
    """The sample swept once (2 workers, glibc asked)."""
    return sweep(list(sample), workers=2)


def test_the_sample_spans_the_kinds(sample: dict[str, str]) -> None:
    """Every kind present, at least 25 files, and each featured file has its feature."""
    assert set(KINDS) <= set(sample.values()), set(KINDS) - set(sample.values())
    assert len(sample) >= 25
    for path, (feature, check) in FEATURED.items():
        assert os.path.exists(path), f"{path} ({feature}) not on this machine"
        assert check(_elf(os.path.realpath(path))), f"{path} lacks {feature}"
    for kind in ("executable", "static-executable"):
        path = next(p for p, k in sample.items() if k == kind)
        assert _elf(path)["e_type"] == "ET_EXEC", path


def _params() -> list[Any]:
    """One parameter per sample file, the known bugs marked strict xfail."""
    out = []
    for path in sample_files():
        out.append(pytest.param(path, id=path))
    return out


@pytest.mark.parametrize("path", _params())
def test_sample_file_loads_or_is_refused_as_glibc_refuses(sample_report: SweepReport,
                                                          path: str) -> None:
    """The issue's requirement, file by file: a load whose checks hold (outcome, regions in
    the span, nothing left after unload), or an ElfError for a file glibc refuses too."""
    result = next(r for r in sample_report.results if r.path == path)
    assert result.status in ("loaded", "refused"), \
        f"{result.status}: {result.message} at {result.where} {result.problems}"
    if result.status == "refused":
        assert result.shared, f"we refuse ({result.message}); glibc: {result.glibc}"


def test_sample_loads_touch_at_most_two_frames_per_page(sample_report: SweepReport) -> None:
    """What a load allocates is bounded by its span: at most a page-cache frame and a
    private copy per page (a relocated page), plus the extern page; zero and reserved pages
    cost nothing (the static executables' big bss, the 64 KiB-aligned gaps)."""
    loaded = [r for r in sample_report.results if r.status == "loaded"]
    assert loaded
    for r in loaded:
        assert r.span > 0 and r.frames > 0, r
        assert r.frames * HOST_PAGE_SIZE <= 2 * r.span + 4 * HOST_PAGE_SIZE, r
    static = [r for r in loaded if r.kind == "static-executable"]
    assert static and all(r.frames * HOST_PAGE_SIZE < r.span // 4 for r in static)


def test_sample_refusals_say_what_glibc_says(sample_report: SweepReport) -> None:
    """The reasons line up: ET_REL, ELFCLASS32 and debug files are refused by both loaders,
    each for its own version of the same reason."""
    pairs = {(r.field, r.glibc.reason) for r in sample_report.results
             if r.status == "refused" and r.glibc is not None}
    assert ("e_type", "only ET_DYN and ET_EXEC can be loaded") in pairs
    assert ("e_ident[EI_CLASS]", "wrong ELF class: ELFCLASS32") in pairs
    debug = [r for r in sample_report.results if r.kind == "debug-info"]
    assert debug and all(r.glibc is not None and
                         r.glibc.reason == "object file has no dynamic section" for r in debug)


# ---- the glibc oracle ---------------------------------------------------------------------

def test_ld_so_verify_maps_libraries_and_programs() -> None:
    """--verify: 2 for a shared object, 0 for a dynamic program, both "maps"."""
    lib = glibc_verdict(str(LIBDIR / "libz.so.1"))
    exe = glibc_verdict("/usr/bin/ls")
    assert (lib.verify_rc, lib.verdict, lib.refuses) == (2, "maps", False)
    assert (exe.verify_rc, exe.verdict, exe.refuses) == (0, "maps", False)


def test_ld_so_refuses_a_relocatable_object_and_says_why(tmp_path: Path) -> None:
    """An ET_REL object built here: ld.so exits 1 and --list gives its reason."""
    (tmp_path / "x.c").write_text("int x(void) { return 1; }\n")
    subprocess.run(["gcc", "-c", "-o", "x.o", "x.c"], cwd=tmp_path, check=True)
    verdict = glibc_verdict(str(tmp_path / "x.o"))
    assert (verdict.verify_rc, verdict.verdict) == (1, "refuses")
    assert verdict.reason == "only ET_DYN and ET_EXEC can be loaded"


def test_ld_so_maps_a_static_executable_without_refusing() -> None:
    """A static executable: --verify says 1 (not dynamic), but ld.so maps it with no error."""
    path = next(p for p in find_elf_files(["/usr/libexec/valgrind"])
                if describe(p) == "static-executable")
    verdict = glibc_verdict(path)
    assert (verdict.verify_rc, verdict.verdict, verdict.refuses) == (1, "static", False)


def test_dlopen_probe_opens_a_library_and_refuses_a_pie(tmp_path: Path) -> None:
    """The dlopen helper: "ok" for libz; glibc's own refusal for a PIE executable."""
    helper = dlopen_helper(str(tmp_path))
    assert glibc_verdict(str(LIBDIR / "libz.so.1"), dlopen_helper=helper).dlopen == "ok"
    pie = glibc_verdict("/usr/bin/ls", dlopen_helper=helper)
    assert pie.dlopen == "cannot dynamically load position-independent executable"
    assert pie.refuses
    assert dlopen_helper(str(tmp_path)) == helper  # cached


# ---- crafted refusals: the mapping of our reasons onto glibc's --------------------------------

def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with ``value`` packed at ``offset``."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _phdr(i: int, field: str) -> int:
    """The file offset of program header ``i``'s ``field`` (libz: e_phoff 64, 56 bytes each)."""
    at = {"p_type": 0, "p_offset": 8, "p_vaddr": 16, "p_filesz": 32, "p_memsz": 40}[field]
    return 64 + 56 * i + at


def _no_load(data: bytes) -> bytes:
    """Every PT_LOAD of ``data`` turned into PT_NULL."""
    for i in range(struct.unpack_from("<H", data, 56)[0]):
        if struct.unpack_from("<I", data, _phdr(i, "p_type"))[0] == 1:
            data = _put(data, _phdr(i, "p_type"), "<I", 0)
    return data


CRAFTED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "e_machine": (lambda d: _put(d, 18, "<H", 183),
                  "cannot open shared object file: No such file or directory"),
    "EI_CLASS": (lambda d: _put(d, 4, "<B", 1), "wrong ELF class: ELFCLASS32"),
    "EI_DATA": (lambda d: _put(d, 5, "<B", 2), "ELF file data encoding not little-endian"),
    "EI_VERSION": (lambda d: _put(d, 6, "<B", 0),
                   "ELF file version ident does not match current one"),
    "e_type": (lambda d: _put(d, 16, "<H", 4), "only ET_DYN and ET_EXEC can be loaded"),
    "e_phentsize": (lambda d: _put(d, 54, "<H", 32),
                    "ELF file's phentsize not the expected size"),
    "e_phnum": (lambda d: _put(d, 56, "<H", 0), "object file has no loadable segments"),
    "no PT_LOAD": (_no_load, "object file has no loadable segments"),
    "e_phoff": (lambda d: _put(d, 32, "<Q", 1 << 40), "cannot read file data"),
    "truncated headers": (lambda d: d[:64], "cannot read file data"),
    "truncated segment": (lambda d: d[:1024], "ld.so killed by SIGBUS"),
    "p_offset": (lambda d: _put(d, _phdr(1, "p_offset"), "<Q", 0x3008),
                 "ELF load command address/offset not page-aligned"),
    "PT_DYNAMIC p_filesz": (lambda d: _put(d, _phdr(4, "p_filesz"), "<Q", 0),
                            "object file has no dynamic section"),
}
"""A fault planted in a copy of this machine's libz -> what glibc says of it. Both refuse
each one; ours names the field (the sweep's mapping table, checked on real glibc)."""


@pytest.fixture(scope="module")
def crafted_report(tmp_path_factory: pytest.TempPathFactory) -> SweepReport:
    """The CRAFTED files swept (glibc asked)."""
    base = (LIBDIR / "libz.so.1").read_bytes()
    where = tmp_path_factory.mktemp("crafted")
    layout = (struct.unpack_from("<Q", base, 32)[0],                      # e_phoff
              struct.unpack_from("<I", base, _phdr(1, "p_type"))[0],      # PT_LOAD
              struct.unpack_from("<Q", base, _phdr(1, "p_offset"))[0],
              struct.unpack_from("<I", base, _phdr(4, "p_type"))[0])      # PT_DYNAMIC
    assert layout == (64, 1, 0x3000, 2), f"libz's program headers moved: {layout}"
    paths = []
    for n, (mutate, _) in enumerate(CRAFTED.values()):
        path = where / f"crafted{n:02d}.so"
        path.write_bytes(mutate(base))
        paths.append(str(path))
    return sweep(paths, workers=2)


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_fault_is_refused_by_both_loaders(crafted_report: SweepReport,
                                                  name: str) -> None:
    """Our ElfError and glibc's message for one planted fault."""
    n = list(CRAFTED).index(name)
    result = next(r for r in crafted_report.results if r.path.endswith(f"crafted{n:02d}.so"))
    assert result.status == "refused", f"{result.status}: {result.message}"
    assert result.glibc is not None and result.glibc.refuses
    assert result.glibc.why == CRAFTED[name][1], (result.message, result.glibc)


# ---- the instrument catches every kind of escape ----------------------------------------------
# The workers and the load's child are forked from this process, so a monkeypatched
# vmsim.sweep.load reaches them: each fake load below is one way a load can go wrong.

def _fault(path: str, mm: Any) -> Any:
    raise Fault(0, "r", "SIGSEGV", "SEGV_MAPERR")


def _key_error(path: str, mm: Any) -> Any:
    return {}["missing"]


def _mmap_error(path: str, mm: Any) -> Any:
    raise MmapError(12, "out of memory")


def _elf_error(path: str, mm: Any) -> Any:
    raise ElfHeaderError("e_phnum", 70000, "at most 65535")


def _segfault(path: str, mm: Any) -> Any:
    os.kill(os.getpid(), signal.SIGSEGV)


def _sleep(path: str, mm: Any) -> Any:
    time.sleep(30)


def _hog(path: str, mm: Any) -> Any:
    hog = bytearray(96 << 20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    time.sleep(5)
    return hog


class _Leaky:
    """A 'loaded object' whose unload leaves a region behind, outside its span."""

    def __init__(self, mm: Any) -> None:
        from loader import MapFlags, ProtFlags
        self.mm = mm
        self.span = (0x10000000, 0x10001000)
        self.relocations = type("R", (), {"extern_range": None})()
        mm.mmap(0x20000000, 4096, ProtFlags.PROT_READ,
                MapFlags.MAP_PRIVATE | MapFlags.MAP_ANONYMOUS | MapFlags.MAP_FIXED, 0, None)

    def outcome(self) -> None:
        raise RuntimeError("outcome broke")

    def unload(self) -> None:
        pass


def _leaky(path: str, mm: Any) -> Any:
    return _Leaky(mm)


def _leaky_refusal(path: str, mm: Any) -> Any:
    _Leaky(mm)
    raise ElfHeaderError("e_phnum", 70000, "at most 65535")


@pytest.mark.parametrize(("fake", "status", "error"), [
    (_fault, "fault", "Fault"),
    (_key_error, "exception", "KeyError"),
    (_mmap_error, "mmap_error", "MmapError"),
    (_elf_error, "refused", "ElfHeaderError"),
    (_segfault, "signal", "SIGSEGV"),
    (_sleep, "timeout", "TimeoutError"),
    (_hog, "over_bound", "OverBound"),
    (_leaky, "check_failed", ""),
    (_leaky_refusal, "check_failed", "ElfHeaderError"),
])
def test_each_way_a_load_goes_wrong_is_classified(monkeypatch: pytest.MonkeyPatch,
                                                  fake: Callable[..., Any], status: str,
                                                  error: str) -> None:
    """A fake load that faults, raises, crashes, hangs, eats memory, leaks a region or fails
    leaving one mapped is reported as such, the sweep itself unharmed."""
    monkeypatch.setattr(sweep_mod, "load", fake)
    report = sweep(["/usr/bin/ls"], workers=1, timeout=2.0, max_rss=48 << 20, oracle=False)
    [result] = report.results
    assert (result.status, result.error) == (status, error), result
    assert result.escaped == (status != "refused")
    if status == "refused":
        assert (result.field, result.value, result.limit) == ("e_phnum", "0x11170",
                                                              "at most 65535")
    if status in ("fault", "exception"):
        assert "vmsim/sweep.py" in result.traceback
    if fake is _leaky_refusal:
        assert result.problems == ["the failed load left 1 regions mapped, first "
                                   "20000000-20001000 r--p 00000000 00:00 0"]
    elif status == "check_failed":
        assert any("outcome() raised" in p for p in result.problems)
        assert any("outside the span" in p for p in result.problems)
        assert any("unload() left 1 regions" in p for p in result.problems)


def _children() -> set[int]:
    """This process's live child processes."""
    pid = os.getpid()
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out |= {int(c) for c in f.read().split()}
    return out


def test_ctrl_c_returns_the_partial_report_and_leaves_no_process() -> None:
    """KeyboardInterrupt while results come in: the report so far, marked interrupted, and
    every worker (and its children) gone, every pipe closed."""
    before, fds = _children(), set(os.listdir("/proc/self/fd"))
    seen: list[FileResult] = []

    def interrupt(result: FileResult) -> None:
        seen.append(result)
        if len(seen) == 3:
            raise KeyboardInterrupt

    files = find_elf_files(["/usr/bin"])[:40]
    report = sweep(files, workers=2, oracle=False, progress=interrupt)
    assert report.interrupted
    assert len(report.results) == 3
    assert _children() <= before
    assert set(os.listdir("/proc/self/fd")) == fds


def test_results_survive_json() -> None:
    """A result (with glibc's verdict) round-trips through the JSON report."""
    report = sweep([str(LIBDIR / "libz.so.1"), "/usr/lib/x86_64-linux-gnu/crt1.o"], workers=2)
    data = json.loads(json.dumps(report.to_json()))
    again = [FileResult.from_json(r) for r in data["results"]]
    assert again == report.results
    assert data["counts"] == {"loaded": 1, "refused": 1}
    assert data["reasons"][0]["glibc"] == {"only ET_DYN and ET_EXEC can be loaded": 1}


def test_find_elf_files_counts_each_real_file_once(tmp_path: Path) -> None:
    """Symlinks and hard links to a file already found and non-ELF files are skipped; ELF
    files in subdirectories kept."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.so").write_bytes(b"\x7fELF" + bytes(60))
    (tmp_path / "sub" / "b").write_bytes(b"\x7fELF" + bytes(60))
    (tmp_path / "z-link").symlink_to(tmp_path / "a.so")
    os.link(tmp_path / "a.so", tmp_path / "z-hard")
    (tmp_path / "text").write_text("#!/bin/sh\n")
    found = find_elf_files([str(tmp_path)])
    assert found == [str(tmp_path / "a.so"), str(tmp_path / "sub" / "b")]
    assert describe(found[0]) == "malformed"


def test_script_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    """scripts/corpus_sweep.py on three files: the summary, the JSON, exit status 0."""
    out = tmp_path / "report.json"
    files = [str(LIBDIR / "libz.so.1"), "/usr/bin/ls", "/usr/lib/x86_64-linux-gnu/crt1.o"]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "corpus_sweep.py"), "-q",
                           "--json", str(out), *files], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "corpus sweep: 3 ELF files" in done.stdout
    assert "only ET_DYN and ET_EXEC can be loaded (1)" in done.stdout
    assert "escapes (0):" in done.stdout
    assert json.loads(out.read_text())["counts"] == {"loaded": 2, "refused": 1}


# ---- the whole machine ----------------------------------------------------------------------

@pytest.mark.slow
def test_every_elf_file_of_the_machine_loads_or_is_refused_as_glibc_refuses() -> None:
    """Issue 9: every ELF file under /usr/bin, /usr/sbin, /usr/libexec, /usr/lib loads on the
    simulator or gets an ElfError for a file glibc refuses too; nothing escapes."""
    report = sweep(workers=2)
    assert len(report.results) > 1000
    escapes = [f"{r.status} {r.path}: {r.message} {r.where}" for r in report.escapes()]
    unshared = [f"{r.path}: {r.message}; glibc: {r.glibc}" for r in report.unshared()]
    assert not escapes and not unshared, "\n".join(
        [f"{len(escapes)} escapes:", *escapes, f"{len(unshared)} refusals glibc does not share:",
         *unshared])
    assert all(r.glibc is not None for r in report.results)
