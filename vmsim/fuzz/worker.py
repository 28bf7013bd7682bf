"""The campaign's worker: a forked process that runs hypothesis rounds of one kind, publishing
each input in the shared slot before it loads it and sending each outcome through the pipe.

Part of the fuzz kit (``vmsim.fuzz``); its parent is ``vmsim.fuzz.campaign``. Host checks run
in forked children of the worker, in batches, each under the same bounds
(:func:`run_host_batch`); a batch that does not come back whole is rerun input by input to
name the culprits.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import os
import pickle
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmsim import AddressSpace
from vmsim.fuzz.channel import Slot, send
from vmsim.fuzz.contract import LoaderUnderTest
from vmsim.fuzz.kinds import PROJECT, Setup, kind_named
from vmsim.fuzz.properties import check_malformed_load, check_same_on_both, failure_class

__all__ = ["Job", "bounded_run", "run_host_batch", "work"]

Send = Callable[[tuple[Any, ...]], None]

ROUND_EXAMPLES = 200
"""Examples per hypothesis round (each round has its own seed)."""


@dataclass
class Job:
    """What a worker runs: ``kind`` of property on ``backend`` until ``deadline``
    (monotonic) or ``max_examples`` more examples; its hypothesis rounds are numbered from
    ``first_round`` (their seeds). ``scratch``: a file for images loaded by path. ``setup``:
    the loader under test and what the inputs are drawn from."""

    kind: str
    backend: str
    deadline: float
    max_examples: int | None
    first_round: int
    scratch: Path
    host_batch: int
    max_rss: int
    timeout: float
    setup: Setup = PROJECT


def work(job: Job, slot: Slot, fd: int) -> None:
    """In the forked worker: run the job, send ("done",) or ("crash", traceback); _exit.

    Ctrl-C is the parent's to handle (a terminal sends SIGINT to the whole process group):
    ignored here. The worker dies with the parent."""
    code = 0
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        faulthandler.disable()
        gc.freeze()  # what the parent built stays: the collector no longer walks it
        _Rounds(job, slot, lambda message: send(fd, message)).run()
        send(fd, ("done",))
    except BaseException:
        code = 70
        with contextlib.suppress(BaseException):
            send(fd, ("crash", traceback.format_exc()))
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)




class _Rounds:
    """The worker's hypothesis rounds: ``ROUND_EXAMPLES`` examples each, until the job's
    deadline or example count. A property failure (shrunk by hypothesis) is sent as
    ("failure", class, text, data) and the next round goes on."""

    def __init__(self, job: Job, slot: Slot, send: Send) -> None:
        self.job, self.slot, self.send = job, slot, send
        self.kind = kind_named(job.kind)
        how = self.kind.host if job.backend == "both" else None
        self.host: Callable[[Any, bytes], None] | None = None if how is None else {
            "batch": self._queue_for_host, "compare": self._compare_with_host}[how]
        self.pending: list[bytes] = []
        self.last_data, self.last_repr = b"", ""
        self.done = 0

    def run(self) -> None:
        """Every round, then the host batch still pending."""
        from hypothesis import strategies as st

        strategy: st.SearchStrategy[Any] = self.kind.strategy(self.job.setup)
        round_no = self.job.first_round
        while time.monotonic() < self.job.deadline and self._left() > 0:
            round_no += 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # hypothesis' notes on large reprs
                    self._round(strategy, round_no * 7919 + os.getpid())
            except Exception as exc:  # the shrunk failure: report it and go on
                self.send(("failure", failure_class(exc), f"{type(exc).__name__}: {exc}\n"
                           f"  example: {self.last_repr}", self.last_data))
        self._flush_host()

    def _left(self) -> int:
        """Examples this worker may still run."""
        most = self.job.max_examples
        return ROUND_EXAMPLES if most is None else most - self.done

    def _round(self, strategy: Any, seed: int) -> None:
        """One hypothesis round of ``strategy`` with ``seed``."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hseed

        given_any: Any = given
        test: Callable[[], None] = settings(
            max_examples=max(1, min(ROUND_EXAMPLES, self._left())), deadline=None,
            database=None, derandomize=False, phases=[Phase.generate, Phase.shrink],
            report_multiple_bugs=False, verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck))(given_any(strategy)(self.body))
        hseed(seed)(test)()

    def body(self, value: Any) -> None:
        """One example: publish it, check it on the simulator, send the outcome, then the
        host check its kind asks for."""
        from hypothesis.control import current_build_context

        data, note = self.kind.payload(value)
        self.last_data, self.last_repr = data, note or repr(value)
        choices = pickle.dumps(current_build_context().data.choices)
        self.slot.begin(data, choices, note.encode())
        try:
            outcome = self.kind.check(value, self.job.scratch, self.job.setup)
        finally:
            self.slot.end()
        self.done += 1
        self.send(("outcome", "sim", outcome))
        if self.host is not None:
            self.host(value, data)

    def _queue_for_host(self, _value: Any, data: bytes) -> None:
        """Queue the input for the next host batch; run the batch when it is full."""
        self.pending.append(data)
        self.send(("host-pending", data))  # the parent runs it if this worker dies first
        if len(self.pending) >= self.job.host_batch:
            self._flush_host()

    def _flush_host(self) -> None:
        """Run the pending host batch, if any."""
        if self.pending:
            run_host_batch(self.pending, self.job, self.send)
            self.send(("host-done", len(self.pending)))
            self.pending = []

    def _compare_with_host(self, value: Any, _data: bytes) -> None:
        """The valid image on the host (forked children) against the simulator."""
        check_same_on_both(value[0], AddressSpace, loader=self.job.setup.load)
        self.send(("outcome", "host", "loaded"))


def _host_batch(datas: list[bytes], load: LoaderUnderTest | None, run_code: bool = True
                ) -> list[str]:
    """In a forked child: :func:`check_malformed_load` of each input on the host with ``load``
    (None: the project's loader); each result,
    or ``"FAIL <class>: ..."`` for a property failure. ``run_code=False``: the host backend
    declares that it runs no code, so the loader calls none of the input's functions (IFUNC
    resolvers, init, fini) and binds as on the simulator."""
    from loader.libc import LibcMmap

    out = []
    for data in datas:
        mm = LibcMmap()
        mm.runs_code = run_code
        try:
            out.append(check_malformed_load(data, mm, loader=load))
        except Exception as exc:  # a property failure: reported, not raised, to go on
            out.append(f"FAIL {failure_class(exc)}: {type(exc).__name__}: {exc}")
    return out


def bounded_run(fn: Callable[..., Any], *args: Any, max_rss: int, timeout: float
                ) -> tuple[str, Any]:
    """``fn(*args)`` in a forked child under the bounds: ("ok", value), or the class of how it
    ended: ("over-memory" | "timeout" | a signal name | "exception", None)."""
    from loader.isolate import OverBound, run_isolated

    try:
        done = run_isolated(fn, *args, timeout=timeout, max_rss=max_rss)
    except OverBound:
        return "over-memory", None
    except TimeoutError:
        return "timeout", None
    except Exception:  # fn raised: not a bound
        return "exception", None
    return (done.status, done.value if done.status == "ok" else None)


def run_host_batch(datas: list[bytes], job: Job, send: Callable[[tuple[Any, ...]], None]
                   ) -> None:
    """Run a batch on the host in one bounded forked child; if it does not come back whole
    (a signal, a bound), rerun its inputs one by one, each bounded, to name the culprits."""
    batch_timeout = job.timeout + 0.05 * len(datas)
    status, results = bounded_run(_host_batch, list(datas), job.setup.load,
                                  max_rss=job.max_rss, timeout=batch_timeout)
    if status != "ok":
        results = [_host_one(data, job, send) for data in datas]
    for data, result in zip(datas, results, strict=True):
        if result is None:
            continue
        if result.startswith("FAIL"):
            cls = result[5:].split(":", 1)[0]
            send(("failure", cls, f"host: {result[5 + len(cls) + 2:]}", data))
        send(("outcome", "host", "failed" if result.startswith("FAIL") else result))


def _host_one(data: bytes, job: Job, send: Callable[[tuple[Any, ...]], None]) -> str | None:
    """One input on the host, bounded: its result, or None after sending a finding.

    An input killed by a signal is run once more with the backend declaring that it runs no
    code. If it then loads or is refused cleanly, the signal came from the input's own code
    (an init function or IFUNC resolver the loader was right to call: glibc would call it
    too), which is an outcome, ``"own code: SIGSEGV"``; a signal either way is the loader's,
    a finding."""
    how, value = bounded_run(_host_batch, [data], job.setup.load, max_rss=job.max_rss,
                             timeout=job.timeout)
    if how == "ok":
        return str(value[0])
    if how.startswith("SIG"):
        again, value = bounded_run(_host_batch, [data], job.setup.load, False,
                                   max_rss=job.max_rss, timeout=job.timeout)
        if again == "ok":
            return str(value[0]) if value[0].startswith("FAIL") else f"own code: {how}"
    send(("finding", how, "host", data))
    return None
