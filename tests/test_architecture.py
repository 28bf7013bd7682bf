"""The architecture of docs/DESIGN.md holds in the code: every module belongs to one named part,
parts import each other without circles, the loader under test imports nothing of the testbed,
and scripts/make_architecture_figure.py draws the picture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_architecture_figure.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_architecture_figure", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_module_is_in_one_part_and_parts_form_no_circle(script: ModuleType) -> None:
    parts = script.architecture()
    placed = sorted(m for p in parts.values() for m in p.modules)
    assert placed == sorted(m for m in script.modules() if m not in script.PACKAGES)
    for part in parts.values():
        assert all(parts[u].band < part.band for u in part.imports), part.name


def test_the_loader_under_test_imports_nothing_of_the_testbed(script: ModuleType) -> None:
    parts = script.architecture()
    for part in parts.values():
        if part.package == "loader":
            assert {parts[u].package for u in part.imports} <= {"loader"}, (
                part.name, sorted(part.imports))


def test_a_module_in_no_part_stops_the_script(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match=r"vmsim\.nowhere: belongs to no part"):
        script.part_of("vmsim.nowhere")


def test_a_circle_between_parts_is_named(script: ModuleType) -> None:
    parts = {n: script.Part(n, "") for n in ("a", "b", "c")}
    parts["a"].imports, parts["b"].imports, parts["c"].imports = {"b"}, {"c"}, {"a"}
    with pytest.raises(SystemExit, match="in a circle: a -> b -> c -> a"):
        script._assign_bands(parts)


def test_the_picture_is_drawn(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "architecture.png"
    assert script.main(["-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
