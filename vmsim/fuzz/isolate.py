"""Run something that may crash in a forked child, and report how it ended.

A test helper for the host backend (``loader.libc``): a read of unmapped or PROT_NONE memory
kills the process that does it, so tests do such accesses in a child made with fork(2), which
shares this process's address space as a private copy. The parent gets back either the
child's result or the name of the signal that killed it. Imports nothing from the project.

It is also the supervisor for hostile input: ``max_rss`` bounds the memory the child may add to
what it inherited (read from ``/proc/PID/status`` while it runs, and from ``wait4``'s peak RSS
when it ends), ``timeout`` bounds its time, and the child never outlives the parent (it gets
SIGKILL when the parent dies, and the parent kills it when interrupted, Ctrl-C included).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import pickle
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["ChildError", "Isolated", "OverBound", "probe", "rss_bytes", "run_isolated"]

_ACCESSES = ("r", "w", "x")
_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.02


class Isolated(NamedTuple):
    """How a child ended: ``status`` is ``"ok"`` (``value`` is what it returned) or the name of
    the signal that killed it (``"SIGSEGV"``, ``"SIGBUS"``, ...; ``value`` is None)."""

    status: str
    value: Any


class ChildError(RuntimeError):
    """The child raised an exception that could not be sent back, or exited on its own."""


class OverBound(RuntimeError):
    """The child went past its memory bound (``max_rss``) and was killed.

    ``rss`` is the memory it had added (bytes) when it was seen, ``limit`` the bound.
    """

    def __init__(self, pid: int, rss: int, limit: int) -> None:
        super().__init__(f"isolated child {pid} used {rss >> 20} MiB more than it inherited, "
                         f"past max_rss={limit >> 20} MiB; killed")
        self.rss, self.limit = rss, limit

    def __reduce__(self) -> tuple[type[OverBound], tuple[int, int, int]]:
        return (OverBound, (0, self.rss, self.limit))


def rss_bytes(pid: int | str = "self") -> int:
    """The resident set size of process ``pid`` in bytes (VmRSS); 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) << 10
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _child(write_fd: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In the child: make faults fatal and silent, run fn, send the pickled outcome, _exit.

    Never returns and never runs the parent's atexit handlers or flushes its buffers.
    """
    code = 0
    try:
        _die_with_parent()
        faulthandler.disable()
        for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE):
            signal.signal(sig, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            value = fn(*args)
        except BaseException as exc:  # every exception goes to the parent
            payload = _pickled_exception(exc, traceback.format_exc())
        else:
            try:
                payload = pickle.dumps(("ok", value))
            except Exception:  # an unpicklable result
                payload = pickle.dumps(("unpicklable", f"unpicklable result {value!r}"))
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this (child) process when its parent dies, so a parent
    killed outright never leaves a child running (reparented to init) behind it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _pickled_exception(exc: BaseException, text: str) -> bytes:
    """The message for an exception: the exception pickled on its own (it may fail to pickle
    here or to unpickle in the parent) and its traceback text, which always travels."""
    try:
        blob: bytes | None = pickle.dumps(exc)
    except Exception:
        blob = None
    return pickle.dumps(("raised", (blob, text)))


def _kill(pid: int) -> None:
    """SIGKILL the child and reap it (it may have exited already)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def _collect(read_fd: int, pid: int, timeout: float, rss_cap: int | None,
             inherited: int) -> bytes:
    """Read the child's whole message (until EOF) within ``timeout`` seconds, checking its
    RSS against ``rss_cap`` (absolute bytes) every few milliseconds when a cap is given.

    Kills the child and raises TimeoutError naming the limit when it takes longer, or
    OverBound when its RSS passes the cap.
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        wait = max(left, 0.0) if rss_cap is None else min(max(left, 0.0), _POLL_SECONDS)
        ready, _, _ = select.select([read_fd], [], [], wait)
        if rss_cap is not None:
            rss = rss_bytes(pid)
            if rss > rss_cap:
                _kill(pid)
                raise OverBound(pid, rss - inherited, rss_cap - inherited)
        if not ready:
            if time.monotonic() < deadline:
                continue
            _kill(pid)
            raise TimeoutError(f"isolated child {pid} still running after timeout={timeout}s")
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = 30.0,
                 max_rss: int | None = None) -> Isolated:
    """Run ``fn(*args)`` in a forked child and report how it ended.

    Returns Isolated("ok", result) or Isolated(<signal name>, None). An exception in the child
    is re-raised here (ChildError with the child's traceback if it cannot be pickled). Raises
    TimeoutError after killing the child when it runs past ``timeout`` seconds, and OverBound
    when ``max_rss`` is given and the child's resident memory grows by more than that many
    bytes over what it inherited from this process. Changes the child makes to memory are lost
    with it (shared mappings excepted). An exception here (KeyboardInterrupt included) kills
    the child before it propagates.
    """
    inherited = rss_bytes()
    rss_cap = None if max_rss is None else inherited + max_rss
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, fn, args)
    os.close(write_fd)
    try:
        payload = _collect(read_fd, pid, timeout, rss_cap, inherited)
    except BaseException:
        _kill(pid)
        raise
    finally:
        os.close(read_fd)
    _, status, usage = os.wait4(pid, 0)
    if rss_cap is not None and (usage.ru_maxrss << 10) > rss_cap:
        raise OverBound(pid, (usage.ru_maxrss << 10) - inherited, max_rss or 0)
    if os.WIFSIGNALED(status):
        return Isolated(signal.Signals(os.WTERMSIG(status)).name, None)
    if os.WEXITSTATUS(status) != 0 or not payload:
        raise ChildError(f"isolated child {pid} exited with status {os.WEXITSTATUS(status)}"
                         " without a result")
    kind, value = pickle.loads(payload)
    if kind == "raised":
        blob, text = value
        cause = ChildError(f"raised in the isolated child:\n{text}")
        try:
            exc = pickle.loads(blob) if blob is not None else None
        except Exception:  # the exception cannot be rebuilt here
            exc = None
        if not isinstance(exc, BaseException):
            raise cause
        raise exc from cause
    if kind == "unpicklable":
        raise ChildError(f"isolated child failed:\n{value}")
    return Isolated("ok", value)


def _access(addr: int, access: str) -> None:
    """Do one user-mode access at ``addr``: ``"r"`` loads a byte; ``"w"`` loads it and stores it
    back (on x86 every writable page is readable, so the load faults only where the store
    would, and shared mappings keep their bytes); ``"x"`` calls ``addr`` as a C function
    taking and returning nothing (put a ``ret`` there first).
    """
    if access == "r":
        ctypes.string_at(addr, 1)
    elif access == "w":
        ctypes.memmove(addr, ctypes.string_at(addr, 1), 1)
    else:
        ctypes.CFUNCTYPE(None)(addr)()


def probe(addr: int, access: str, *, timeout: float = 10.0) -> str:
    """Try one ``access`` (``"r"``, ``"w"`` or ``"x"``) at ``addr`` in a forked child.

    Returns ``"ok"`` or the fatal signal's name (``"SIGSEGV"``, ``"SIGBUS"``). The parent's
    memory is never changed. Raises ValueError for another access letter.
    """
    if access not in _ACCESSES:
        raise ValueError(f"probe: access={access!r}, expected one of {_ACCESSES}")
    return run_isolated(_access, addr, access, timeout=timeout).status
