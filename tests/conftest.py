"""Shared test set-up: hypothesis profiles, the backend-parametrised harness, temp files.

Profiles: "ci" (hypothesis' built-in: derandomised, no deadline, no database), "dev" (fast),
"fuzz" (long, database on). "ci" is loaded when $CI is set, else "dev";
$VMSIM_HYPOTHESIS_PROFILE overrides both.

Backends: the ``backend`` fixture runs a test once per entry of ``harness.BACKENDS``: "libc"
(the real kernel) and "sim" (the simulator, tests/harness_sim.py's ``HARNESSES``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import BACKENDS, BackendHarness, FileFd, OpenFile
from harness_sim import HARNESSES as SIM_HARNESSES
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import InvalidArgument


def _register_profiles() -> None:
    """Register "dev" and "fuzz" (and "ci" if this hypothesis lacks it), then load one."""
    base = settings.get_profile("default")
    try:
        settings.get_profile("ci")
    except InvalidArgument:
        settings.register_profile("ci", base, derandomize=True, deadline=None,
                                  max_examples=100, database=None, print_blob=True)
    settings.register_profile("dev", base, max_examples=20, deadline=None)
    settings.register_profile("fuzz", base, max_examples=100_000, deadline=None,
                              database=DirectoryBasedExampleDatabase(".hypothesis/examples"))
    default = "ci" if os.environ.get("CI") else "dev"
    settings.load_profile(os.environ.get("VMSIM_HYPOTHESIS_PROFILE") or default)


_register_profiles()
BACKENDS.update(SIM_HARNESSES)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[BackendHarness]:
    """A harness with a fresh 256-page arena, once per backend; closed afterwards."""
    harness = BACKENDS[request.param]()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[[int], BackendHarness]]:
    """A factory ``make(arena_pages)`` of harnesses of one backend (per param); all closed."""
    made: list[BackendHarness] = []

    def make(arena_pages: int) -> BackendHarness:
        made.append(BACKENDS[request.param](arena_pages=arena_pages))
        return made[-1]

    try:
        yield make
    finally:
        for harness in made:
            harness.close()


@pytest.fixture
def file_fd(tmp_path: Path) -> Iterator[FileFd]:
    """A factory ``file_fd(content=b"", *, size=None, flags=os.O_RDWR, path=None)``.

    Writes ``content`` to a new temp file (then truncates or extends it to ``size`` if given)
    and opens it with ``flags``; with ``path`` it opens that existing file instead. Every fd
    it returns is closed at teardown.
    """
    fds: list[int] = []

    def make(content: bytes = b"", *, size: int | None = None, flags: int = os.O_RDWR,
             path: str | None = None) -> OpenFile:
        if path is None:
            fd_new, path = tempfile.mkstemp(dir=tmp_path)
            os.write(fd_new, content)
            if size is not None:
                os.ftruncate(fd_new, size)
            os.close(fd_new)
        fds.append(os.open(path, flags))
        return OpenFile(fds[-1], os.path.realpath(path))

    try:
        yield make
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _try_mount_noexec(where: Path) -> bool:
    """Mount a small tmpfs with noexec at ``where``; False when this host cannot."""
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=1m", "tmpfs", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def noexec_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a fresh noexec tmpfs (needs root; skipped when mount fails), unmounted
    at teardown."""
    where = tmp_path / "noexec"
    where.mkdir()
    if not _try_mount_noexec(where):
        pytest.skip("cannot mount a noexec tmpfs here (needs root and mount(8))")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
