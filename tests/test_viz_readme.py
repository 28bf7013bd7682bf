"""scripts/make_readme_figures.py still draws the README pictures (into a temporary directory)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_readme_figures.py"


def _script() -> object:
    spec = importlib.util.spec_from_file_location("make_readme_figures", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_figure_is_drawn(tmp_path: Path) -> None:
    script = _script()
    assert script.main(["--out", str(tmp_path)]) == 0  # type: ignore[attr-defined]
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == sorted(f"{name}.png" for name in script.FIGURES)  # type: ignore[attr-defined]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_committed_readme_figures_exist() -> None:
    script = _script()
    img = SCRIPT.parent.parent / "docs" / "img"
    for name in script.FIGURES:  # type: ignore[attr-defined]
        assert (img / f"{name}.png").is_file(), f"run python {SCRIPT.name} and commit docs/img"


def test_the_load_steps_caption_counts_what_trace_shows() -> None:
    """README's caption of the load-steps picture: its counts are what ``vmsim trace`` lists on
    each backend and what the script draws (the calls that change the map)."""
    import re

    from cli_support import run_cli

    readme = " ".join((SCRIPT.parent.parent / "README.md").read_text().split())
    caption = re.search(r"\*Loading libz on the host: `vmsim trace --backend libc` lists (\d+) "
                        r"`Mmap` calls, and the (\d+) that change the map are drawn.*? On the "
                        r"simulator `vmsim trace` lists (\d+): (\d+) more map, fill and seal",
                        readme)
    assert caption is not None, "the load-steps caption"
    host, drawn, sim, extra = (int(caption[i]) for i in range(1, 5))

    def listed(*argv: str) -> int:
        ran = run_cli("trace", *argv, timeout=120)
        assert ran.code == 0, ran.err
        return len(ran.out.splitlines()) - 1

    assert listed("--backend", "libc") == host
    assert listed() == sim == host + extra
    ran = run_cli("trace", "--backend", "libc", timeout=120)
    changing = [ln for ln in ran.out.splitlines()[1:] if not re.match(r"\s*\d+ write", ln)]
    assert len(changing) == drawn
