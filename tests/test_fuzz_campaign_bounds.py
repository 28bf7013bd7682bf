"""vmsim fuzz under hostile input: each input runs under a memory and a time bound in a
supervised worker; an input past a bound, or one that kills the worker, becomes a saved (and
shrunk) finding and the campaign goes on. Nothing is left behind, Ctrl-C included.

The hostile inputs are planted: ``loader.load`` is wrapped (before the worker is forked, which
inherits it) so that inputs whose CRC falls in a class hog memory, hang or crash the process.
The planted predicate is a function of the bytes, so a saved finding can be checked to be the
exact input in flight.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import loader
from loader.libc import LibcMmap
from vmsim import fuzz

HOG, HANG, CRASH = 0, 1, 2
MODULUS = 5


def _planted(data: bytes) -> int:
    """Which planted class an input falls in (HOG, HANG, CRASH, or something else)."""
    return zlib.crc32(data) % MODULUS


def _hog() -> None:
    """Take 256 MiB of resident memory at once (MAP_POPULATE: no page-by-page faulting)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    mmap.mmap(-1, 256 << 20, flags=flags).close()


def _hostile_load(real: Any, planted: tuple[int, ...], host_only: bool = False) -> Any:
    """``real`` (loader.load), except that inputs of the ``planted`` classes hog memory, hang
    or crash first (with ``host_only``, only on the host backend)."""
    def load(data: Any, mm: Any, **kwargs: Any) -> Any:
        on_host = isinstance(getattr(mm, "inner", mm), LibcMmap)
        cls = _planted(bytes(data)) if isinstance(data, bytes | bytearray) else -1
        if cls in planted and (on_host or not host_only):
            if cls == HOG:
                _hog()
            elif cls == HANG:
                time.sleep(3600)
            else:
                os.kill(os.getpid(), signal.SIGSEGV)
        return real(data, mm, **kwargs)
    return load


@pytest.mark.parametrize("planted, timeout", [((HOG, CRASH), 5.0), ((HANG, CRASH), 0.2)],
                         ids=["memory", "time"])
def test_hostile_inputs_become_findings_and_the_campaign_goes_on(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, planted: tuple[int, ...],
        timeout: float) -> None:
    monkeypatch.setattr(loader, "load", _hostile_load(loader.load, planted))
    stats = fuzz.run_campaign(120, kind="malformed", out_dir=tmp_path, max_examples=60,
                              max_rss=64 << 20, input_timeout=timeout, shrink_seconds=0)
    assert stats.failures == []
    names = {HOG: "over-memory", HANG: "timeout", CRASH: "SIGSEGV"}
    assert set(stats.classes) == {names[c] for c in planted}, stats.classes
    # A new worker after each finding (none needed after one that ends the campaign).
    assert stats.examples >= 60
    assert len(stats.findings) <= stats.workers <= len(stats.findings) + 1
    classes = {name: c for c, name in names.items()}
    for finding in stats.findings:
        assert finding.path is not None and finding.backend == "sim"
        # The exact input in flight was saved: it is in the planted class that ended it.
        assert _planted(Path(finding.path).read_bytes()) == classes[finding.cls], finding
        assert finding.note  # the mutation, in words
    # Every finding is counted as an example with its class as the outcome.
    for name, count in stats.classes.items():
        assert stats.outcomes[name] == count


def test_a_finding_is_shrunk_by_hypothesis_in_bounded_children(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(loader, "load", _hostile_load(loader.load, (HOG,)))
    stats = fuzz.run_campaign(120, kind="malformed", out_dir=tmp_path, max_examples=30,
                              max_rss=64 << 20, input_timeout=5, shrink_seconds=3)
    hogs = [f for f in stats.findings if f.cls == "over-memory"]
    assert hogs, stats.classes
    shrunk = [f for f in hogs if f.shrunk]
    assert shrunk, [f.line() for f in hogs]
    for finding in shrunk:
        assert finding.shrunk is not None and finding.path is not None
        small, original = Path(finding.shrunk).read_bytes(), Path(finding.path).read_bytes()
        assert _planted(small) == HOG
        assert len(small) <= len(original)


def test_host_batches_run_under_the_same_bounds(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setattr(loader, "load", _hostile_load(loader.load, (HOG, HANG, CRASH),
                                                      host_only=True))
    stats = fuzz.run_campaign(120, kind="malformed", backend="both", out_dir=tmp_path,
                              max_examples=40, host_batch=20, max_rss=64 << 20,
                              input_timeout=0.6, shrink_seconds=0)
    assert stats.examples >= 40 and stats.failures == []
    host = [f for f in stats.findings if f.backend == "host"]
    assert {f.cls for f in host} == {"over-memory", "timeout", "SIGSEGV"}, [
        f.line() for f in host]
    for finding in host:
        assert finding.path is not None
        assert _planted(Path(finding.path).read_bytes()) in (HOG, HANG, CRASH)
    assert not [f for f in stats.findings if f.backend == "sim"]
    assert stats.host_examples + len(host) == stats.examples


def test_a_host_crash_in_the_inputs_own_code_is_an_outcome_not_a_finding(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Planted: CRASH inputs die only where the loader may call their code (the host backend
    declaring runs_code), as an init function whose bytes a flip corrupted would. Rerun with
    the backend declaring it runs no code, they load: the input's code crashed, not the
    loader, and the campaign counts an outcome. (A crash either way stays a finding: above.)"""
    real = loader.load

    def load(data: Any, mm: Any, **kwargs: Any) -> Any:
        if mm.runs_code and _planted(bytes(data)) == CRASH:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(data, mm, **kwargs)
    monkeypatch.setattr(loader, "load", load)
    stats = fuzz.run_campaign(120, kind="malformed", backend="both", out_dir=tmp_path,
                              max_examples=40, host_batch=20, shrink_seconds=0)
    assert stats.findings == [] and stats.failures == []
    assert stats.host_outcomes.get("own code: SIGSEGV", 0) >= 1, stats.host_outcomes
    assert stats.host_examples == stats.examples


def test_nothing_is_left_behind_after_a_clean_campaign(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stats = fuzz.run_campaign(30, kind="valid", max_examples=20)
    assert stats.examples >= 20 and not stats.failures and not stats.findings
    assert list(tmp_path.iterdir()) == []  # no scratch directory, no empty failures directory


@pytest.mark.parametrize("option", ["--max-rss=0", "--input-timeout=-1", "--time=nan",
                                    "--shrink-time=x"])
def test_bound_options_are_checked(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        fuzz.main([option])
    assert exit_.value.code == 2
    assert option.split("=")[0] in capsys.readouterr().err


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_ends_the_campaign_with_its_summary_and_exit_130(tmp_path: Path) -> None:
    # A real SIGINT to the whole process group, as a terminal sends it on Ctrl-C.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmsim.cli", "fuzz", "--time", "120", "--property", "malformed",
         "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")),
                              daemon=True) if proc.stderr else None
    assert reader is not None
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("examples" in line for line in err):
        time.sleep(0.1)
    assert any("examples" in line for line in err), err
    assert list(scratch.glob("vmsim-fuzz-images-*"))  # the campaign's scratch, while it runs
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=30)
    reader.join(timeout=5)
    out = proc.stdout.read() if proc.stdout else ""
    text = "".join(err)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert [line for line in text.splitlines() if "interrupted" in line] == [
        "vmsim fuzz: interrupted (Ctrl-C)"]
    assert "outcomes:" in out  # the summary so far
    assert list(scratch.iterdir()) == []  # the scratch directory went with it
    for _ in range(50):
        if not _alive(proc.pid):
            break
        time.sleep(0.1)
    assert not _alive(proc.pid), "a worker outlived the campaign"
