"""The explain stream and the ``vmsim maps/trace/explain/plot`` verbs, checked against libz's
own program headers and relocation tables as pyelftools reads them, and against the backend's
maps() for a second, independent load at the same address.
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from loader_support import SYSTEM_LIBS, sim_factory
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import loader
from loader.explain import PHASES, Explainer, phases_in_order
from loader.pages import HOST_PAGE_SIZE, page_round_down, page_round_up
from vmsim.cli import main

LIBZ = str(SYSTEM_LIBS["libz"])
BASE = 0x7E0000000000



def _headers() -> tuple[list[Any], Any, dict[str, int], int]:
    """libz per pyelftools: PT_LOAD headers, PT_GNU_RELRO, relocation counts, init count."""
    with open(LIBZ, "rb") as f:
        elf = ELFFile(f)
        loads = [s.header for s in elf.iter_segments() if s.header.p_type == "PT_LOAD"]
        relro = next(s.header for s in elf.iter_segments() if s.header.p_type == "PT_GNU_RELRO")
        counts: dict[str, int] = {}
        for sec in elf.iter_sections():
            if sec.header.sh_type in ("SHT_RELA", "SHT_REL"):
                for rel in sec.iter_relocations():
                    t = rel["r_info_type"]
                    counts[str(t)] = counts.get(str(t), 0) + 1
        dyn = {t.entry.d_tag: t.entry.d_val for t in elf.get_section_by_name(".dynamic")
               .iter_tags()}
    inits = dyn.get("DT_INIT_ARRAYSZ", 0) // 8 + (1 if "DT_INIT" in dyn else 0)
    return loads, relro, counts, inits


def test_explain_names_the_real_plan_of_libz() -> None:
    space = sim_factory()()
    page = space.page_size
    steps = Explainer()
    obj = loader.load(LIBZ, space, base=BASE, explain=steps)
    loads, relro, counts, inits = _headers()
    said = [s.sentence for s in steps.steps]
    vmin = page_round_down(loads[0].p_vaddr, page)
    span = page_round_up(loads[-1].p_vaddr + loads[-1].p_memsz, page) - vmin
    assert any(s.startswith(f"reserve {span:#x} bytes PROT_NONE: the whole span") for s in said)
    calls = obj.mm.calls
    for i, h in enumerate(loads):
        start = page_round_down(h.p_vaddr, page)
        length = page_round_up(h.p_vaddr + h.p_filesz, page) - start
        rwx = "".join(c if h.p_flags & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        want = (f"map {length:#x} bytes {rwx} from file offset "
                f"{page_round_down(h.p_offset, page):#x} at +{start - vmin:#x}: PT_LOAD {i} ")
        step = next(s for s in steps.steps if s.sentence.startswith(want))
        call = calls[step.call_index]       # the step is lined up with the call it caused
        assert (call.op, dict(call.args)["length"], dict(call.args)["offset"]) == (
            "mmap", length, page_round_down(h.p_offset, page))
        if h.p_memsz > h.p_filesz:
            end = h.p_vaddr + h.p_filesz
            tail = min(page_round_up(end, page), h.p_vaddr + h.p_memsz) - end
            assert f"zero {tail:#x} bytes at +{end - vmin:#x}: the tail of the last file " \
                   f"page belongs to .bss (PT_LOAD {i})" in said
    lo, hi = page_round_down(relro.p_vaddr, page), page_round_down(
        relro.p_vaddr + relro.p_memsz, page)
    assert any(s.startswith(f"RELRO: mprotect [+{lo - vmin:#x}, +{hi - vmin:#x}) r--: "
                            f"PT_GNU_RELRO is [{relro.p_vaddr:#x}, ") for s in said)
    relative = counts.get("8", 0)
    slots = counts.get("6", 0) + counts.get("7", 0) + counts.get("1", 0)
    assert f"apply {relative:,} RELATIVE relocations (load bias + addend) and the " \
           f"{slots:,} symbol slots as one scatter of {relative + slots:,} words" in said
    assert any(s.startswith(f"bind {slots:,} GLOB_DAT/JUMP_SLOT slots through the resolver")
               for s in said)
    scatter = next(s for s in steps.steps if s.sentence.startswith("apply "))
    assert calls[scatter.call_index].op == "write_words"
    assert dict(calls[scatter.call_index].args)["count"] == relative + slots
    assert any(s.startswith("record DT_INIT + DT_INIT_ARRAY") and f"({inits} functions)" in s
               and "simulator: not run" in s for s in said)
    phases = [s.phase for s in steps.steps]
    assert phases_in_order(steps.steps)
    assert list(dict.fromkeys(phases)) == [p for p in PHASES if p != "undo"]


def test_interleave_covers_every_call_once() -> None:
    space = sim_factory()()
    steps = Explainer()
    obj = loader.load(LIBZ, space, explain=steps)
    groups = steps.interleave(obj.mm.calls)
    assert [c for _, calls in groups for c in calls] == obj.mm.calls
    assert groups[0][0] is not None and groups[0][0].phase == "parse"


class _NoMprotect:
    """A backend whose mprotect always fails with ENOMEM (as at max_map_count)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.page_size = inner.page_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def mprotect(self, addr: int, length: int, prot: Any) -> None:
        raise loader.MmapError(errno.ENOMEM, "mprotect refused by the test")


def test_a_failed_load_says_undo() -> None:
    space = sim_factory()()
    steps = Explainer()
    with pytest.raises(loader.MmapError):
        loader.load(LIBZ, _NoMprotect(space), explain=steps)
    obj_path = str(Path(LIBZ).resolve())
    last = steps.steps[-1]
    assert last.phase == "undo" and "ENOMEM" in last.sentence
    assert steps.steps[-2].phase == "map"     # the stubs' mprotect failed inside relocation
    # Everything is undone: the span, and the extern stub page the resolver had just made.
    assert all(r.path != obj_path for r in space.maps())
    assert space.maps() == []


def _rows(out: str) -> list[tuple[int, int, str, int, str]]:
    """The table rows of ``vmsim maps``: start, end, perms, offset, path."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+\S+ \S+\s+(\S{4}) ([0-9a-f]{8}) "
                     r"(\S+)\s+(\S*)", line)
        if m:
            path = "" if m[6].startswith("[extern") else m[6]
            rows.append((int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), path))
    return rows


def test_maps_rows_equal_the_backend_maps(capsys: pytest.CaptureFixture[str]) -> None:
    factory = sim_factory()
    assert main(["maps", LIBZ, "--base", hex(BASE), "--color=never"]) == 0
    out = capsys.readouterr().out
    space = factory()
    obj = loader.load(LIBZ, space, base=BASE)
    ext = obj.relocations.extern_range
    want = [(r.start, r.end, r.perms, r.offset, r.path) for r in space.maps()
            if (BASE <= r.start and r.end <= obj.span[1])
            or (ext is not None and ext[0] <= r.start and r.end <= ext[1])]
    assert _rows(out) == want and len(want) >= 5
    assert "\x1b[" not in out and out.rstrip().splitlines()[-1].startswith("legend: code")
    assert "(RELRO)" in out


def test_maps_colours_by_role(capsys: pytest.CaptureFixture[str]) -> None:
    sim_factory()
    assert main(["maps", LIBZ, "--color=always"]) == 0
    lines = capsys.readouterr().out.splitlines()
    code = next(ln for ln in lines if " r-xp " in ln)
    data = next(ln for ln in lines if " rw-p " in ln)
    assert code.startswith("\x1b[31m") and data.startswith("\x1b[35m")


def test_trace_on_the_kernel_lists_every_call() -> None:
    done = subprocess.run([sys.executable, "-m", "vmsim.cli", "trace", LIBZ, "--backend",
                           "libc"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head, *lines = done.stdout.splitlines()
    count = int(re.search(r": (\d+) Mmap calls", head)[1])  # type: ignore[index]
    assert len(lines) == count and all("->" in ln for ln in lines)
    assert lines[0].split()[1].startswith("mmap_reserve(addr=None")
    loads, _, _, _ = _headers()
    offsets = [int(m[1], 16) for ln in lines if (m := re.search(r" mmap\(.*offset=(0x[0-9a-f]+), "
                                                                 r"fd=\d+", ln))]
    assert offsets == [page_round_down(h.p_offset, HOST_PAGE_SIZE) for h in loads]


def test_explain_verb_interleaves(capsys: pytest.CaptureFixture[str]) -> None:
    sim_factory()
    assert main(["explain", LIBZ]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].startswith("[parse] read libz.so")
    reserve = next(i for i, ln in enumerate(lines) if ln.startswith("[reserve]"))
    assert "mmap_reserve(" in lines[reserve + 1]
    numbers = [int(ln.split()[0]) for ln in lines if not ln.startswith("[")]
    assert numbers == list(range(len(numbers)))
    assert lines[-1].startswith("[init] record")


def test_plot_writes_a_png_of_the_regions(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sim_factory()
    drawn: list[Figure] = []
    save = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        drawn.append(self)
        save(self, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", keep)
    out = tmp_path / "libz.png"
    assert main(["plot", LIBZ, "--base", hex(BASE), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    space = sim_factory()()
    obj = loader.load(LIBZ, space, base=BASE)
    want = {f"{r.start:#x}" for r in space.maps() if BASE <= r.start < obj.span[1]}
    ax = drawn[0].axes[0]
    got = {p.get_gid().split(":", 1)[1] for p in ax.patches
           if isinstance(p, Rectangle) and (p.get_gid() or "").startswith("region:")}
    assert want <= got and len(got - want) == 1          # plus the extern stubs
    assert ax.get_legend() is not None


def test_errors_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.so"
    assert main(["maps", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err and "'vmsim load'" in err
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 20)
    assert main(["explain", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"{text}: not an ELF file" in err and "'vmsim load'" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("verb", ["maps", "trace", "explain", "plot"])
def test_help_of_each_view(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "Example: vmsim" in out and "--backend" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert verb in capsys.readouterr().out


def test_explain_from_bytes_copies_and_guards_holes() -> None:
    space = sim_factory()()
    steps = Explainer()
    obj = loader.load(Path(LIBZ).read_bytes(), space, explain=steps)
    loads, _, _, _ = _headers()
    copies = [s for s in steps.steps if s.sentence.startswith("copy ")]
    assert len(copies) == len(loads)      # no file: every PT_LOAD is copied (need_copy)
    for step in copies:
        call = obj.mm.calls[step.call_index]
        assert call.op == "write" and "need_copy" in step.sentence
    assert phases_in_order(steps.steps)


def test_explain_on_the_kernel_runs_init(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", LIBZ, "--backend", "libc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    _, _, _, inits = _headers()
    assert lines[-1] == f"[init] run DT_INIT + DT_INIT_ARRAY ({inits} functions)"
    assert any(ln.startswith("[protect] RELRO: mprotect") for ln in lines)
