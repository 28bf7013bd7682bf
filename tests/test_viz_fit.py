"""vmsim.viz pictures fit their content: the names of anonymous regions (.bss, extern) and the
size of the picture, measured on the rendered PNG (its pixels and its blank share), for real
loads of this machine's files and for synthetic maps of a few and of many regions."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from loader_support import SYSTEM_LIBS
from matplotlib.axes import Axes
from matplotlib.image import imread

import loader
import vmsim
from loader.mmap import ProtFlags, Region
from loader.pages import HOST_PAGE_SIZE as PAGE
from vmsim import viz

DPI = 100
TILE = 16


@pytest.fixture(autouse=True)
def _close_figures() -> object:
    yield
    plt.close("all")


def labels(ax: Axes) -> dict[int, str]:
    """Each region label's text, by the region's start."""
    return {int(t.get_gid().split(":", 1)[1], 16): t.get_text() for t in ax.texts
            if (t.get_gid() or "").startswith("label:")}


def loaded(path: str) -> tuple[object, list[Region]]:
    space = vmsim.AddressSpace()
    obj = loader.load(path, space)
    return obj, space.maps()


def test_bss_and_extern_are_named_not_anon() -> None:
    obj, maps = loaded("/usr/bin/ls")
    ax = viz.plot_loaded(obj)
    text = labels(ax)
    ext = obj.relocations.extern_range  # type: ignore[attr-defined]
    anon = [r for r in maps if not r.path]
    assert anon, "ls has an anonymous .bss page and the extern stubs"
    for r in anon:
        want = "extern" if ext[0] <= r.start < ext[1] else ".bss"
        assert text[r.start].split()[0] == want, (r, text[r.start])
        assert "[anon]" not in text[r.start]


def test_region_names_keep_anon_for_memory_that_is_neither() -> None:
    lone = Region(0x10000, 0x10000 + PAGE, ProtFlags.from_rwx("rw-"))
    after_file = Region(0x30000, 0x31000, ProtFlags.from_rwx("rw-"), path="/lib/x.so",
                        inode=7)
    bss = Region(0x31000, 0x32000, ProtFlags.from_rwx("rw-"))
    guard = Region(0x32000, 0x33000, ProtFlags.from_rwx("---"))
    assert viz.region_names([lone, after_file, bss, guard]) == ["[anon]", "x.so", ".bss",
                                                                "[anon]"]


def render(ax: Axes) -> np.ndarray:
    """The picture as ``vmsim plot`` saves it (tight bounding box), as an RGB array."""
    png = io.BytesIO()
    ax.figure.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
    png.seek(0)
    return imread(png)[:, :, :3]


def blank_share(image: np.ndarray) -> float:
    """The share of the picture in TILE x TILE tiles with nothing drawn (all white)."""
    white = image.min(axis=2) >= 250 / 255
    h, w = (n // TILE * TILE for n in white.shape)
    tiles = white[:h, :w].reshape(h // TILE, TILE, w // TILE, TILE).all(axis=(1, 3))
    return float(tiles.mean())


def synthetic(n: int) -> list[Region]:
    """``n`` regions of one file, 1 to 5 pages each, back to back."""
    out, at = [], 0x7F0000000000
    for i in range(n):
        length = PAGE * (1 + i % 5)
        out.append(Region(at, at + length, ProtFlags.from_rwx(("r--", "r-x", "rw-")[i % 3]),
                          False, i * PAGE, "08:01", 9, "/usr/lib/libsynthetic.so"))
        at += length
    return out


def _inputs() -> dict[str, tuple[list[Region], str]]:
    out = {}
    for name, path in (("libz", str(SYSTEM_LIBS["libz"])), ("ls", "/usr/bin/ls"),
                       ("libc", "/usr/lib/x86_64-linux-gnu/libc.so.6")):
        obj, maps = loaded(path)
        out[name] = (maps, f"{name} loaded at {obj.span[0]:#x} (sim)")  # type: ignore[attr-defined]
    for n in (3, 12, 40):
        out[f"synthetic-{n}"] = (synthetic(n), f"{n} regions")
    return out


INPUTS = _inputs()


@pytest.mark.parametrize("name", list(INPUTS))
def test_picture_size_follows_its_content(name: str) -> None:
    regions, title = INPUTS[name]
    ax = viz.plot_map(regions, title=title)
    image = render(ax)
    height, width = image.shape[:2]
    longest = max(len(t) for t in labels(ax).values())
    # Height: a bounded amount a region (8 layout units at most, the big ones shortened),
    # plus the title and the legend; never less than a line of text a region.
    assert 0.15 * DPI * len(regions) <= height <= DPI * (2.5 + 0.28 * 8 * len(regions)), height
    # Width: the address ticks, the bar, the longest label; nothing more than the legend.
    assert width <= DPI * max(1.4 + 0.067 * (longest + 7) / 0.57 + 0.3, 5.2), (width, longest)
    assert blank_share(image) < 0.62, blank_share(image)


def test_the_plot_of_ls_is_a_third_of_what_it_was() -> None:
    """The issue's picture: /usr/bin/ls was 1033 x 1722 pixels at --dpi 120, mostly blank."""
    regions, title = INPUTS["ls"]
    image = render(viz.plot_map(regions, title=title))
    height, width = image.shape[:2]
    scale = (120 / DPI) ** 2
    assert width * height * scale < 0.5 * 1033 * 1722
    assert blank_share(image) < 0.62


def test_before_after_columns_fit_their_content() -> None:
    regions, _ = INPUTS["libz"]
    axes = viz.plot_before_after(regions, regions)
    image = render(axes[0])
    height, width = image.shape[:2]
    longest = max(len(t) for t in labels(axes[0]).values())
    assert width <= 2 * DPI * max(1.4 + 0.067 * (longest + 7) / 0.57 + 0.3, 5.2)
    assert height <= DPI * (2.5 + 0.28 * 8 * len(regions))
    assert blank_share(image) < 0.62
