"""Run something that may crash in a forked child, and report how it ended.

A test helper for the host backend (``loader.libc``): a read of unmapped or PROT_NONE memory
kills the process that does it, so tests do such accesses in a child made with fork(2), which
shares this process's address space as a private copy. The parent gets back either the
child's result or the name of the signal that killed it. Imports nothing from the project.
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

__all__ = ["ChildError", "Isolated", "probe", "run_isolated"]

_ACCESSES = ("r", "w", "x")


class Isolated(NamedTuple):
    """How a child ended: ``status`` is ``"ok"`` (``value`` is what it returned) or the name of
    the signal that killed it (``"SIGSEGV"``, ``"SIGBUS"``, ...; ``value`` is None)."""

    status: str
    value: Any


class ChildError(RuntimeError):
    """The child raised an exception that could not be sent back, or exited on its own."""


def _child(write_fd: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In the child: make faults fatal and silent, run fn, send the pickled outcome, _exit.

    Never returns and never runs the parent's atexit handlers or flushes its buffers.
    """
    code = 0
    try:
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


def _pickled_exception(exc: BaseException, text: str) -> bytes:
    """The message for an exception: the exception pickled on its own (it may fail to pickle
    here or to unpickle in the parent) and its traceback text, which always travels."""
    try:
        blob: bytes | None = pickle.dumps(exc)
    except Exception:
        blob = None
    return pickle.dumps(("raised", (blob, text)))


def _collect(read_fd: int, pid: int, timeout: float) -> bytes:
    """Read the child's whole message (until EOF) within ``timeout`` seconds.

    Kills the child and raises TimeoutError naming the limit when it takes longer.
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([read_fd], [], [], max(left, 0.0))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"isolated child {pid} still running after timeout={timeout}s")
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Isolated:
    """Run ``fn(*args)`` in a forked child and report how it ended.

    Returns Isolated("ok", result) or Isolated(<signal name>, None). An exception in the child
    is re-raised here (ChildError with the child's traceback if it cannot be pickled). Raises
    TimeoutError after killing the child when it runs past ``timeout`` seconds. Changes the
    child makes to memory are lost with it (shared mappings excepted).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, fn, args)
    os.close(write_fd)
    try:
        payload = _collect(read_fd, pid, timeout)
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
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
