"""The campaign: a supervised worker runs many inputs, the parent bounds each one.

Part of the fuzz kit (``vmsim.fuzz``): :func:`run_campaign` is ``vmsim fuzz``'s engine.

Forking per input is too slow for the rate a campaign needs, and one hostile input (a flipped
byte that makes a loader allocate 24 GB) must not take the campaign down. So the parent forks
one worker (``vmsim.fuzz.worker``) that runs hypothesis rounds. Before each load the worker
puts the input (its bytes, its hypothesis choices, a one-line note) into memory shared with the
parent (``vmsim.fuzz.channel``), and after it sends the outcome through a pipe. The parent polls
the worker's RSS and the time the input in flight has been running; past either bound, or when
a signal kills the worker, the parent saves that input as a finding, replays and shrinks it
with hypothesis (each candidate in a bounded child), and forks a new worker for the rest of the
campaign.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pickle
import select
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loader.isolate import rss_bytes
from vmsim.fuzz.channel import LOADING, Inbox, Slot
from vmsim.fuzz.contract import LoaderUnderTest
from vmsim.fuzz.kinds import PROJECT, Setup, kind_named
from vmsim.fuzz.stats import CampaignStats, Finding
from vmsim.fuzz.worker import Job, bounded_run, run_host_batch, work

__all__ = [
    "DEFAULT_INPUT_TIMEOUT",
    "DEFAULT_MAX_RSS",
    "DEFAULT_SHRINK_SECONDS",
    "run_campaign",
    "shrink_finding",
]

DEFAULT_MAX_RSS = 512 << 20
"""Memory (bytes) a worker may add to what it inherited before it is killed."""
DEFAULT_INPUT_TIMEOUT = 5.0
"""Seconds one input may run before its worker is killed."""
DEFAULT_SHRINK_SECONDS = 20.0
"""Seconds spent shrinking each finding (0: save the exact bytes only)."""

_POLL_SECONDS = 0.01
_IDLE_SECONDS = 600.0
"""A worker that sends nothing for this long between inputs is stuck: killed as "stalled"."""


class _Campaign:
    """The parent's side: forks workers, reads their messages, enforces the bounds, saves
    and shrinks findings."""

    def __init__(self, stats: CampaignStats, job: Job, out: Callable[[], Path],
                 shrink_seconds: float, progress: Callable[[CampaignStats], None] | None,
                 started: float) -> None:
        self.stats, self.job, self.out = stats, job, out
        self.shrink_seconds = shrink_seconds
        self.progress, self.started = progress, started
        self.shown = started
        self.slot = Slot()
        self.worker: int | None = None
        self.read_fd: int | None = None
        self.finished = False
        self.host_pending: list[bytes] = []

    def close(self) -> None:
        """Kill a worker still running, close the pipe, unmap the slot."""
        self._kill()
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None
        self.slot.close()

    def run(self) -> None:
        """Workers until the job is finished or its time is up."""
        while not self.finished and time.monotonic() < self.job.deadline and (
                self.job.max_examples is None or self.stats.examples < self.job.max_examples):
            self._spawn()
            ended = self._watch()
            if ended != "done":
                self._found(ended)
                self._host_leftovers()

    def _host_leftovers(self) -> None:
        """The host batch a dead worker had not run yet: run it from here (no worker runs
        now), so that every input is checked on the host too."""
        if self.host_pending:
            leftovers, self.host_pending = self.host_pending, []
            run_host_batch(leftovers, self.job, self._handle)

    def _spawn(self) -> None:
        """Fork a worker for what is left of the job; its memory cap counts from here."""
        left = None if self.job.max_examples is None else \
            self.job.max_examples - self.stats.examples
        job = dataclasses.replace(self.job, max_examples=left,
                                  first_round=self.job.first_round + 1000 * self.stats.workers)
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, 1031, 1 << 20)  # F_SETPIPE_SZ: room for bursts
        self.cap = rss_bytes() + self.job.max_rss
        self.slot.end()  # the last worker may have died loading: this one has not begun
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            work(job, self.slot, write_fd)
        os.close(write_fd)
        self.worker, self.read_fd = pid, read_fd
        self.stats.workers += 1

    def _watch(self) -> str:
        """Read messages and poll the bounds until the worker ends: "done", or how it was
        ended ("over-memory", "timeout", "stalled", a signal name, "crash")."""
        assert self.read_fd is not None and self.worker is not None
        inbox, seen, quiet_since = Inbox(), (-1, -1.0), time.monotonic()
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], _POLL_SECONDS)
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    return self._reaped()
                for message in inbox.feed(chunk):
                    self._handle(message)
                quiet_since = time.monotonic()
            verdict = self._over_bound(seen, quiet_since)
            if verdict:
                self._kill()
                self._drain(inbox)
                return verdict
            started, seq, state = self.slot.header()
            seen = (seq, started) if state == LOADING else (-1, -1.0)

    def _over_bound(self, seen: tuple[int, float], quiet_since: float) -> str | None:
        """Which bound the worker is past, if any: its RSS over the cap, the input in flight
        (the same one as at the last poll) past the timeout, or silent far too long."""
        assert self.worker is not None
        if rss_bytes(self.worker) > self.cap:
            return "over-memory"
        started, seq, state = self.slot.header()
        now = time.monotonic()
        if state == LOADING and (seq, started) == seen and now - started > self.job.timeout:
            return "timeout"
        if state != LOADING and now - quiet_since > _IDLE_SECONDS:
            return "stalled"
        return None

    def _drain(self, inbox: Inbox) -> None:
        """After a kill: the messages the worker sent before it died (until EOF, or a second
        if a grandchild still holds the pipe)."""
        assert self.read_fd is not None
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            ready, _, _ = select.select([self.read_fd], [], [], 0.05)
            if not ready:
                continue
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                break
            for message in inbox.feed(chunk):
                self._handle(message)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def _reaped(self) -> str:
        """The worker closed its pipe: wait for it and say how it ended."""
        assert self.worker is not None
        _pid, status = os.waitpid(self.worker, 0)
        self.worker = None
        self._close_pipe()
        if os.WIFSIGNALED(status):
            return signal.Signals(os.WTERMSIG(status)).name
        return "done" if self.finished else "crash"

    def _kill(self) -> None:
        """SIGKILL the worker (if any) and reap it."""
        if self.worker is None:
            return
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.worker, signal.SIGKILL)
            os.waitpid(self.worker, 0)
        self.worker = None

    def _handle(self, message: tuple[Any, ...]) -> None:
        """Count one message from the worker."""
        stats, what = self.stats, message[0]
        if what == "outcome":
            _what, backend, outcome = message
            table = stats.outcomes if backend == "sim" else stats.host_outcomes
            table[outcome] = table.get(outcome, 0) + 1
            if backend == "sim":
                stats.examples += 1
            else:
                stats.host_examples += 1
        elif what == "failure":
            _what, cls, text, data = message
            stats.count(cls)
            if stats.new_failure(text):
                stats.failures.append(f"{text}\n  saved: {self._save(data, 'failure')}")
        elif what == "finding":
            _what, cls, backend, data = message
            stats.count(cls)
            stats.findings.append(Finding(cls, backend, self._save(data, cls)))
        elif what == "host-pending":
            self.host_pending.append(message[1])
        elif what == "host-done":
            del self.host_pending[:message[1]]
        elif what == "done":
            self.finished = True
        elif what == "crash":
            stats.failures.append(f"worker crashed:\n{message[1]}")
            stats.count("worker-crash")
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        self.stats.seconds = now - self.started
        if self.progress is not None and now - self.shown > 0.5:
            self.shown = now
            self.progress(self.stats)

    def _save(self, data: bytes, tag: str) -> str:
        """Write ``data`` to the out directory as ``<tag>-<n>.elf``; its path."""
        out = self.out()
        n = len(self.stats.failures) + len(self.stats.findings)
        path = out / f"{tag}-{n}.elf"
        path.write_bytes(data)
        return str(path)

    def _found(self, cls: str) -> None:
        """The worker was ended (``cls``): save the input in flight, shrink it."""
        state, data, choices, note = self.slot.contents()
        if cls == "crash" or state != LOADING:
            if cls != "crash":
                self.stats.count(cls)
                self.stats.findings.append(Finding(cls, "sim", None, note="between inputs"))
            return
        self.stats.examples += 1
        self.stats.outcomes[cls] = self.stats.outcomes.get(cls, 0) + 1
        self.stats.count(cls)
        finding = Finding(cls, "sim", self._save(data, cls), note=note)
        self.stats.findings.append(finding)
        if self.shrink_seconds > 0 and choices:
            shrunk = shrink_finding(self.job.kind, cls, pickle.loads(choices),
                                    seconds=self.shrink_seconds, max_rss=self.job.max_rss,
                                    timeout=self.job.timeout, scratch=self.job.scratch,
                                    setup=self.job.setup)
            if shrunk is not None and finding.path is not None:
                shrunk_data, shrunk_note = shrunk
                finding.shrunk = finding.path[:-len(".elf")] + "-shrunk.elf"
                Path(finding.shrunk).write_bytes(shrunk_data)
                finding.note = shrunk_note or finding.note
        self._tick()


def _check_once(kind: str, value: Any, scratch: Path, setup: Setup) -> str:
    """The ``kind`` property once on a drawn value (in a bounded child, when shrinking)."""
    return kind_named(kind).check(value, scratch, setup)


def shrink_finding(kind: str, cls: str, choices: Sequence[Any], *, seconds: float,
                   max_rss: int, timeout: float, scratch: Path, setup: Setup = PROJECT
                   ) -> tuple[bytes, str] | None:
    """Replay a finding's hypothesis ``choices`` (drawn with ``setup``) and shrink it for at
    most ``seconds``: each candidate runs in a bounded child and counts as failing when it
    ends the same way (``cls``). The smallest reproducer's (bytes, note), or None if it does
    not reproduce."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.database import InMemoryExampleDatabase, choices_to_bytes

    key = b"vmsim-fuzz-finding"
    db = InMemoryExampleDatabase()
    db.save(key, choices_to_bytes(choices))
    deadline = time.monotonic() + seconds

    def same_end(value: Any) -> bool:
        if time.monotonic() > deadline:
            return False
        ended, _v = bounded_run(_check_once, kind, value, scratch, setup, max_rss=max_rss,
                                timeout=timeout)
        return ended == cls

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hypothesis' notes on large reprs
            value = find(kind_named(kind).strategy(setup), same_end, database_key=key,
                         settings=settings(database=db, phases=[Phase.reuse, Phase.shrink],
                                           deadline=None, max_examples=10_000,
                                           verbosity=Verbosity.quiet,
                                           suppress_health_check=list(HealthCheck)))
    except Exception:  # NoSuchExample: the replay did not end the same way
        return None
    return kind_named(kind).payload(value)


class _OutDir:
    """Where findings are saved: ``path``, or a fresh temporary directory made on first use
    (so a clean campaign makes none)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self) -> Path:
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix="vmsim-fuzz-"))
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path


def run_campaign(seconds: float, *, kind: str = "malformed", backend: str = "sim",
                 out_dir: Path | None = None, host_batch: int = 500,
                 max_examples: int | None = None,
                 progress: Callable[[CampaignStats], None] | None = None,
                 max_rss: int = DEFAULT_MAX_RSS, input_timeout: float = DEFAULT_INPUT_TIMEOUT,
                 shrink_seconds: float = DEFAULT_SHRINK_SECONDS,
                 loader: LoaderUnderTest | None = None,
                 relocations: Sequence[str] | None = None,
                 paths: Sequence[str] = ()) -> CampaignStats:
    """Run one property as a hypothesis campaign for about ``seconds`` (or ``max_examples``),
    in a supervised worker: each input may add ``max_rss`` bytes to the worker's memory and
    run ``input_timeout`` seconds; past either, or killed by a signal, it becomes a finding
    (saved, then shrunk for up to ``shrink_seconds``) and a new worker goes on.

    ``kind``: one of :data:`~vmsim.fuzz.kinds.KINDS`: "malformed" (property 2 on
    ``malformed_elf``), "valid" (property 1 on ``elf_images``) or "rate" (only generate and
    load valid images on the simulator: the throughput figure). ``backend``: "sim", or "both"
    (malformed inputs also run on the host in forked children, ``host_batch`` at a time,
    under the same bounds; valid ones are compared host against simulator). A property
    failure is shrunk by hypothesis in the worker and recorded in ``failures``; files go to
    ``out_dir`` (a fresh temporary directory, made only when something is saved, if None).
    Ctrl-C ends the campaign: the stats so far come back with ``interrupted`` set. Nothing
    is left behind: no worker, no scratch directory.

    ``loader``: the loader under test (``vmsim.fuzz.contract``; None: the project's).
    ``relocations``: keep synthetic images within these types (``image_knobs``). ``paths``:
    the real files the "files" kind mutates.
    """
    kind_named(kind)  # ValueError now, not in the worker
    setup = Setup(loader, None if relocations is None else tuple(relocations), tuple(paths))
    setup.knobs()  # ValueError now for an unknown relocation type
    stats = CampaignStats()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmsim-fuzz-images-") as scratch:
        job = Job(kind, backend, started + seconds, max_examples, 0,
                  Path(scratch) / "image.so", host_batch, max_rss, input_timeout, setup)
        campaign = _Campaign(stats, job, _OutDir(out_dir), shrink_seconds, progress, started)
        try:
            campaign.run()
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            campaign.close()
    stats.seconds = time.monotonic() - started
    return stats
