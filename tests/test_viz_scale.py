"""vmsim.viz on maps of thousands of regions: the cost is linear in the regions (no pairwise
checks, a bounded number of texts), and the picture keeps what small maps have: one patch per
region coloured by role, labels that name their region, a legend saying what went unlabelled."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
import pytest

matplotlib.use("Agg")

from loader.isolate import run_isolated
from loader.mmap import ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE as PAGE
from vmsim import viz

PERMS = [ProtFlags.from_rwx(p) for p in ("r--", "r-x", "rw-", "---")]


def many_regions(n: int) -> list[Region]:
    """``n`` regions of one file, sizes 1..13 pages, a gap after every tenth."""
    out, at = [], 0x7F0000000000
    for i in range(n):
        length = PAGE * (1 + (i * 7) % 13)
        out.append(Region(at, at + length, PERMS[i % 4], False, i * PAGE, "08:01", 42,
                          "/usr/lib/libmany.so"))
        at += length + (3 * PAGE if i % 10 == 9 else 0)
    return out


def _draw_and_save(regions: list[Region]) -> dict[str, Any]:
    """In a child: plot, render a PNG, and hand back what the picture contains."""
    import matplotlib.pyplot as plt

    ax = viz.plot_map(regions, relro=(regions[10].start, regions[12].end), title="many")
    png = io.BytesIO()
    ax.figure.savefig(png, format="png", dpi=100, bbox_inches="tight")
    legend = ax.get_legend()
    out = {
        "patches": {p.get_gid(): p.get_facecolor() for p in ax.patches
                    if (p.get_gid() or "").startswith("region:")},
        "relro": [p.get_gid() for p in ax.patches if (p.get_gid() or "").startswith("relro:")],
        "labels": {t.get_gid(): t.get_text() for t in ax.texts
                   if (t.get_gid() or "").startswith("label:")},
        "ticks": len(ax.get_yticks()),
        "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
        "png": len(png.getvalue()),
    }
    plt.close("all")
    return out


def test_three_thousand_regions_plot_with_bounded_labels() -> None:
    regions = many_regions(3000)
    drawn = run_isolated(_draw_and_save, regions, timeout=20, max_rss=1 << 30).value
    assert sorted(drawn["patches"]) == sorted(f"region:{r.start:#x}" for r in regions)
    by_start = {f"{r.start:#x}": r for r in regions}
    colours = {"r--p": viz.ROLE_COLORS["rodata"], "r-xp": viz.ROLE_COLORS["code"],
               "rw-p": viz.ROLE_COLORS["data"], "---p": viz.ROLE_COLORS["guard"]}
    for gid, face in drawn["patches"].items():
        want = matplotlib.colors.to_rgba(colours[by_start[gid.split(":", 1)[1]].perms])
        assert tuple(face) == want, gid
    assert drawn["relro"], "RELRO still hatched"
    labels = drawn["labels"]
    assert 20 <= len(labels) <= viz.MAX_LABELS + 1
    for gid, text in labels.items():
        r = by_start[gid.split(":", 1)[1]]
        assert "libmany.so" in text and r.perms in text and viz.format_size(r.length) in text
    assert 0 < drawn["ticks"] <= viz.MAX_LABELS + 1
    more = [t for t in drawn["legend"] if t.startswith("+")]
    assert more == [f"+{3000 - len(labels)} more regions not labelled (too many to read)"]
    assert drawn["png"] > 0


def test_a_small_map_labels_every_region_and_says_nothing_more() -> None:
    regions = many_regions(40)
    drawn = run_isolated(_draw_and_save, regions, timeout=20).value
    assert len(drawn["labels"]) == len(drawn["patches"]) == 40
    assert not [t for t in drawn["legend"] if t.startswith("+")]


@pytest.mark.slow
def test_vmsim_plot_of_an_elf_file_with_3000_segments(tmp_path: Path) -> None:
    from cli_support import run_cli

    from vmsim.fuzz.elfwriter import ElfSpec, Segment, build

    segments = tuple(Segment(("r", "rx", "rw")[i % 3], data=b"\x01" * 64) for i in range(3000))
    path = tmp_path / "many.so"
    path.write_bytes(build(ElfSpec(segments=segments)).data)
    ran = run_cli("plot", str(path), "-o", str(tmp_path / "many.png"), timeout=120)
    assert ran.code == 0, ran.err
    assert ran.out.startswith("wrote ") and "regions of many.so" in ran.out
    assert (tmp_path / "many.png").stat().st_size > 0
