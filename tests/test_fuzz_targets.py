"""vmsim.fuzz.targets, the properties as a pytest module for HypoFuzz: a failure found by one
run is saved in the shared directory database and replays in a plain pytest run elsewhere.

Each run is a fresh ``python -m pytest --pyargs vmsim.fuzz.targets`` in a subprocess (the
module makes its settings hypothesis' default profile, so it runs on its own), in a directory
of its own (none of this repository's pytest options apply), with the database in a temporary
directory: what the second run replays can only have come from that directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLANTED = "planted_loaders:bss_not_zeroed"
PROJECT = "vmsim.fuzz.contract:project_loader"


def run_targets(db: Path, cwd: Path, loader: str, *, replay: bool
                ) -> subprocess.CompletedProcess[str]:
    """Plain pytest on the targets' ``test_named_valid`` for ``loader`` (RELATIVE images) with
    the directory database ``db``; ``replay``: the database's examples only. No
    ``--hypothesis-seed``: hypothesis neither saves nor replays examples under a fixed seed."""
    env = {**os.environ, "VMSIM_FUZZ_DB": str(db), "VMSIM_LOADER": loader,
           "VMSIM_RELOCATIONS": "RELATIVE",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("VMSIM_FUZZ_REDIS", None)
    env["VMSIM_FUZZ_REPLAY"] = "1" if replay else ""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
         "vmsim.fuzz.targets", "-k", "test_named_valid", "--tb=line"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def violation_line(output: str) -> str:
    """The Violation of the failing test, as pytest's ``--tb=line`` prints it."""
    found = re.search(r"^\S+:\d+: (vmsim\.fuzz\.checking\.Violation: .*)$", output, re.M)
    assert found, output[-3000:]
    return found.group(1)


def test_a_saved_failure_replays_with_plain_pytest(tmp_path: Path) -> None:
    """A planted bug (the .bss tail keeps file bytes) is found and saved by one run; a fresh
    run with only the database's examples fails at once with the same Violation; an empty
    database replays nothing; the project's loader passes on the same saved example."""
    db = tmp_path / "db"
    found = run_targets(db, tmp_path, PLANTED, replay=False)
    assert found.returncode == 1, found.stdout[-3000:] + found.stderr[-3000:]
    message = violation_line(found.stdout)
    assert "bss" in message
    assert any((db / "loader-planted_loaders-bss_not_zeroed").iterdir())

    replayed = run_targets(db, tmp_path, PLANTED, replay=True)
    assert replayed.returncode == 1, replayed.stdout[-3000:]
    assert violation_line(replayed.stdout) == message

    nothing = run_targets(tmp_path / "empty", tmp_path, PLANTED, replay=True)
    assert nothing.returncode == 0, nothing.stdout[-3000:]

    shutil.copytree(db / "loader-planted_loaders-bss_not_zeroed",
                    db / "loader-vmsim.fuzz.contract-project_loader")
    project = run_targets(db, tmp_path, PROJECT, replay=True)
    assert project.returncode == 0, project.stdout[-3000:]
    assert "1 passed" in project.stdout
