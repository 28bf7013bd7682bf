"""Generate the README pictures into docs/img/ (run: python scripts/make_readme_figures.py).

Each figure is drawn by vmsim.viz from a real source: this process's /proc/self/maps after
ctypes.CDLL, and, when the loader and the simulator are present, the same library loaded into
vmsim.AddressSpace. Nothing is drawn by hand; rerun the script after changing vmsim.viz.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from elftools.elf.elffile import ELFFile

from loader.mmap import Region
from loader.pages import page_round_down
from vmsim import viz

LIBZ = "libz.so.1"
OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


def host_regions(soname: str) -> list[Region]:
    """Open ``soname`` with ctypes (glibc's ld.so maps it) and return its /proc/self/maps lines."""
    ctypes.CDLL(soname)
    with open("/proc/self/maps") as f:
        regions = [Region.parse(line) for line in f]
    mine = [r for r in regions if re.search(rf"/{re.escape(soname)}[.\d]*$", r.path)]
    if not mine:
        raise SystemExit(f"{soname}: opened, but not found in /proc/self/maps")
    return mine


def relro_of(path: str, load_bias: int) -> tuple[int, int] | None:
    """PT_GNU_RELRO as glibc protects it: both ends rounded down to a page, absolute."""
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_GNU_RELRO":
                start = load_bias + seg["p_vaddr"]
                return page_round_down(start), page_round_down(start + seg["p_memsz"])
    return None


def fig_host_libz(out: Path) -> Path:
    """libz as glibc's ld.so mapped it into this very process."""
    regions = host_regions(LIBZ)
    relro = relro_of(regions[0].path, regions[0].start)
    ax = viz.plot_map(regions, relro=relro,
                      title=f"{LIBZ} in a real process (/proc/self/maps, glibc ld.so)")
    return _save(ax.figure, out / "libz-host.png")


def fig_sim_libz(out: Path) -> Path:
    """libz loaded by this project's loader into the simulator, beside the same library as
    glibc's ld.so mapped it into this process; both drawn relative to their start."""
    import loader
    import vmsim

    host = host_regions(LIBZ)
    space = vmsim.AddressSpace()
    obj = loader.load(host[0].path, space)
    lo, hi = obj.span
    assert obj.relro is not None
    host_relro = relro_of(host[0].path, host[0].start)
    sim_relro = (obj.relro[0] - lo, obj.relro[1] - lo)
    viz.plot_before_after(
        viz.relative(space.maps(), lo, hi), viz.relative(host, host[0].start),
        titles=(f"{LIBZ} in the simulator (loader.load on vmsim)",
                f"{LIBZ} in this process (glibc ld.so, kernel)"),
        marks=("differs", "differs"), relro_before=sim_relro,
        relro=None if host_relro is None else (host_relro[0] - host[0].start,
                                                host_relro[1] - host[0].start))
    return _save(plt.gcf(), out / "libz-sim-vs-host.png")


def fig_page_states(out: Path) -> Path:
    """Every page of libz's span in the simulator after the load, by what backs it."""
    import loader
    import vmsim

    space = vmsim.AddressSpace()
    obj = loader.load(host_regions(LIBZ)[0].path, space)
    lo, hi = obj.span
    space.fetch(obj.symbol("crc32"), 16)
    perms = [next(r.prot.rwx for r in space.maps() if r.start <= va < r.end)
             for va in range(lo, hi, space.page_size)]
    ax = viz.plot_pages(viz.page_states(space, lo, hi), start=lo, columns=16, cell_text=perms,
                        title=f"{LIBZ} in the simulator: pages after loading and one call of crc32")
    return _save(ax.figure, out / "libz-pages.png")


def fig_load_steps(out: Path) -> Path:
    """Each Mmap call of this project's loader loading libz, one small map per call (the
    writes, which change no mapping, are left out)."""
    import loader
    from loader.libc import LibcMmap

    rec = viz.MapsRecorder(LibcMmap())
    obj = loader.load(host_regions(LIBZ)[0].path, rec)
    try:
        frames = [f for f in rec.frames if f.op not in ("write", "write_words")]
        ncols = 3
        nrows = -(-len(frames) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(18, 5.5 * nrows), layout="constrained",
                                 squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i < len(frames):
                viz.plot_trace(frames, ax, step=i, relro=obj.relro, fontsize=7)
            else:
                ax.set_axis_off()
        fig.suptitle(f"loader.load({LIBZ!r}, MapsRecorder(LibcMmap())): one frame per Mmap call",
                     fontsize=12)
    finally:
        obj.unload()
    return _save(fig, out / "libz-load-steps.png")


def _save(fig: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


FIGURES: dict[str, Callable[[Path], Path]] = {
    "libz-host": fig_host_libz,
    "libz-sim-vs-host": fig_sim_libz,
    "libz-load-steps": fig_load_steps,
    "libz-pages": fig_page_states,
}


def main(argv: list[str] | None = None) -> int:
    """Draw every figure (or those named) into --out; say which could not be drawn and why."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"figures to draw: {', '.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory (default {OUT})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    failed = 0
    for name in args.names or FIGURES:
        try:
            print(f"{name}: wrote {FIGURES[name](args.out)}")
        except (ImportError, AttributeError) as exc:
            failed += 1
            print(f"{name}: not drawn, a part is missing ({exc})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
