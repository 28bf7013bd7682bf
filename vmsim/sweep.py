"""The corpus sweep: every ELF file of this machine loaded on the simulator, each outcome
classified, and glibc asked about each file the loader refuses.

Part of the ``vmsim`` top layer (imports ``loader`` and ``vmsim.space``); the measuring
instrument behind ``scripts/corpus_sweep.py`` and ``tests/test_corpus_sweep.py``.

Each file is loaded with ``loader.load(path, AddressSpace())`` in a forked child supervised by
``vmsim.fuzz.isolate.run_isolated`` (time and memory bounds), inside a small pool of worker
processes. The outcome is one of ``STATUSES``: ``loaded`` (and the checks after a load held),
``refused`` (an ElfError), or an escape (anything else). glibc is the oracle for refusals:
``ld.so --verify`` maps the file without running any of its code (exit 0: a dynamic program,
2: a shared object, 1: not loadable or not dynamic, then ``ld.so --list`` prints the reason);
for a shared object that ``--verify`` maps but the loader refuses, ``dlopen`` in a fresh,
time-bounded C process is asked too (it does run the library's constructors).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import select
import signal
import stat
import struct
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from dataclasses import field as default
from pathlib import Path
from typing import Any

from loader import ElfError, MmapError, load
from vmsim.fault import Fault
from vmsim.fuzz.isolate import ChildError, OverBound, run_isolated
from vmsim.space import AddressSpace

__all__ = [
    "ACCEPTED",
    "LD_SO",
    "ROOTS",
    "STATUSES",
    "FileResult",
    "GlibcVerdict",
    "SweepReport",
    "describe",
    "find_elf_files",
    "glibc_verdict",
    "iter_results",
    "probe_file",
    "refusal_reason",
    "sweep",
]

ROOTS = ("/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib")
LD_SO = "/lib64/ld-linux-x86-64.so.2"
STATUSES = ("loaded", "refused", "mmap_error", "fault", "exception", "check_failed",
            "over_bound", "timeout", "signal", "child_error")
ACCEPTED = frozenset({"loaded", "refused"})
"""The two outcomes the issue allows; every other status is an escape."""

_ELF_MAGIC = b"\x7fELF"
_ET = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_PT_DYNAMIC, _PT_INTERP = 2, 3
_EM_X86_64 = 62
_DT_FLAGS_1, _DF_1_PIE = 0x6FFFFFFB, 0x08000000
_ORACLE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1
_PROJECT_FRAME = re.compile(r'File ".*/((?:loader|vmsim)/[\w/]+\.py)", line (\d+), in (\w+)')
_DLOPEN_SOURCE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    void *handle = dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL);
    if (!handle) { printf("%s\n", dlerror()); fflush(stdout); _exit(1); }
    _exit(0);  /* no dlclose, no exit handlers: nothing more of the library runs */
}
"""


@dataclass
class GlibcVerdict:
    """What glibc says about one file.

    ``verify_rc``: ``ld.so --verify``'s exit status (negative: killed by that signal).
    ``verdict``: ``"maps"`` (a dynamic program or shared object ld.so maps), ``"static"``
    (mapped, no PT_DYNAMIC: nothing for ld.so to link, the kernel runs it), ``"refuses"``
    (ld.so cannot map it; ``reason`` is its message), ``"crashes"`` (ld.so died on it, e.g.
    SIGBUS reading a truncated file: glibc cannot load it either) or ``"unknown"``.
    ``dlopen``: None when not asked, else ``"ok"``, dlerror()'s text, ``"killed by SIG..."``
    or ``"timeout ..."``.
    """

    verify_rc: int | None
    verdict: str
    reason: str = ""
    dlopen: str | None = None

    @property
    def refuses(self) -> bool:
        """glibc does not load the file: ld.so refuses or crashes, or dlopen fails on it."""
        return self.verdict in ("refuses", "crashes") or self.dlopen not in (None, "ok")

    @property
    def why(self) -> str:
        """glibc's reason for refusing (ld.so's first, then dlopen's), or its verdict."""
        if self.verdict in ("refuses", "crashes"):
            return self.reason
        if self.dlopen not in (None, "ok"):
            return f"dlopen: {self.dlopen}"
        return self.verdict


@dataclass
class FileResult:
    """One file's outcome. ``status`` is one of ``STATUSES``; ``error`` the exception's class,
    ``field``/``value``/``limit`` an ElfError's parts, ``where`` the innermost project frames
    (``"loader/reloc.py:123 relocate"``), ``problems`` what the checks after a load found,
    ``span`` the loaded span's length and ``frames`` the frames the simulator had allocated
    when the load returned (what the load touched: relocated pages, partial bss pages)."""

    path: str
    kind: str
    size: int
    status: str
    error: str = ""
    message: str = ""
    field: str = ""
    value: str = ""
    limit: str = ""
    where: list[str] = default(default_factory=list)
    traceback: str = ""
    problems: list[str] = default(default_factory=list)
    span: int = 0
    frames: int = 0
    seconds: float = 0.0
    glibc: GlibcVerdict | None = None

    @property
    def escaped(self) -> bool:
        """Anything but a load or an ElfError."""
        return self.status not in ACCEPTED

    @property
    def shared(self) -> bool | None:
        """For a refusal: whether glibc refuses the file too (None when not asked)."""
        if self.status != "refused" or self.glibc is None:
            return None
        return self.glibc.refuses

    def to_json(self) -> dict[str, Any]:
        """A plain dict (the verdict's derived ``refuses`` included)."""
        out = asdict(self)
        if self.glibc is not None:
            out["glibc"]["refuses"] = self.glibc.refuses
        out["shared"] = self.shared
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileResult:
        """The inverse of :meth:`to_json`."""
        data = dict(data)
        data.pop("shared", None)
        verdict = data.pop("glibc", None)
        if verdict is not None:
            verdict = dict(verdict)
            verdict.pop("refuses", None)
            data["glibc"] = GlibcVerdict(**verdict)
        return cls(**data)


# ---- finding the files ---------------------------------------------------------------------

def find_elf_files(roots: Iterable[str] = ROOTS) -> list[str]:
    """Every regular file under ``roots`` (recursively, symlinked directories not followed)
    whose first 4 bytes are the ELF magic, each file once: a symlink or a hard link to a file
    already found is skipped (same device and inode; the first path in sorted walk order is
    kept). Unreadable files are skipped."""
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen or not stat.S_ISREG(st.st_mode):
                    continue
                if _has_magic(path):
                    seen.add(key)
                    found.append(path)
    return found


def _has_magic(path: str) -> bool:
    """The file starts with \\x7fELF (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _ELF_MAGIC
    except OSError:
        return False


def describe(path: str) -> str:
    """A short kind for the file from its ELF and program headers, parsed here on their own
    (not by the loader under test): ``elf32``, ``big-endian``, ``other-machine``,
    ``relocatable``, ``core``, ``debug-info`` (PT_DYNAMIC without file bytes: a separate
    debug file), ``executable`` and ``static-executable`` (ET_EXEC with and without
    PT_INTERP), ``pie`` and ``static-pie`` (ET_DYN with DF_1_PIE: glibc will not dlopen them),
    ``shared-object`` (any other ET_DYN, libc.so.6 with its PT_INTERP included),
    ``malformed``."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[4] != 2:
                return "elf32" if len(head) > 4 and head[4] == 1 else "malformed"
            if head[5] != 1:
                return "big-endian"
            e_type, e_machine = struct.unpack_from("<HH", head, 16)
            if e_machine != _EM_X86_64:
                return "other-machine"
            if e_type in (1, 4):
                return "relocatable" if e_type == 1 else "core"
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            return _kind_from_phdrs(f, e_type, table, phentsize, phnum)
    except (OSError, struct.error, ValueError, OverflowError):
        return "malformed"


def _kind_from_phdrs(f: Any, e_type: int, table: bytes, phentsize: int, phnum: int) -> str:
    """The kind of an x86-64 ET_EXEC/ET_DYN from its program headers (and DF_1_PIE)."""
    if phentsize != 56 or len(table) < 56 * phnum:
        return "malformed"
    interp, dynamic = False, None
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", table, 56 * i)
        interp |= p_type == _PT_INTERP
        if p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if e_type == 2:
        return "executable" if interp else "static-executable"
    if e_type != 3:
        return "malformed"
    if dynamic is not None and dynamic[1] == 0:
        return "debug-info"
    if dynamic is None or not _pie_flag(f, *dynamic):
        return "shared-object"
    return "pie" if interp else "static-pie"


def _pie_flag(f: Any, offset: int, size: int) -> bool:
    """DT_FLAGS_1 of the dynamic section at [offset, +size) in the file has DF_1_PIE."""
    f.seek(offset)
    raw = f.read(min(size, 1 << 20))
    for i in range(0, len(raw) - 15, 16):
        tag, val = struct.unpack_from("<qQ", raw, i)
        if tag == 0:
            break
        if tag == _DT_FLAGS_1:
            return bool(val & _DF_1_PIE)
    return False


# ---- loading one file (in the supervised child) --------------------------------------------

def probe_file(path: str) -> dict[str, Any]:
    """Load ``path`` on a fresh ``AddressSpace`` and classify how it went; after a load, check
    ``outcome()``, that every region lies in the span or the extern mapping, and that
    ``unload()`` leaves the space empty; after a failure, that nothing is left mapped (a
    refusal that leaves a region is ``check_failed``). Returns FileResult fields (status,
    error, ...) as a dict; never raises an Exception (meant to run in a forked child)."""
    space = AddressSpace()
    try:
        obj = load(path, space)
    except ElfError as exc:
        return _after_failure(space, {"status": "refused", **_error_fields(exc),
                                      "field": exc.field, "value": _show(exc.value),
                                      "limit": exc.limit})
    except Exception as exc:
        status = ("mmap_error" if isinstance(exc, MmapError) else
                  "fault" if isinstance(exc, Fault) else "exception")
        return _after_failure(space, {"status": status, **_error_fields(exc)})
    cost = {"span": obj.span[1] - obj.span[0], "frames": space.stats.frames}
    try:
        problems = _check_loaded(obj, space)
    except Exception as exc:
        return {"status": "exception", **_error_fields(exc), **cost,
                "problems": ["after the load: " + _one_line(exc)]}
    return {"status": "check_failed" if problems else "loaded", "problems": problems, **cost}


def _after_failure(space: AddressSpace, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` of a failed load, with a problem when the failure left regions mapped (a
    refusal then becomes ``check_failed``: bad input must lose nothing)."""
    try:
        left = space.maps()
    except Exception as exc:
        fields["problems"] = [f"maps() after the failure raised {_one_line(exc)}"]
        left = []
    if left:
        fields["problems"] = [f"the failed load left {len(left)} regions mapped, "
                              f"first {str(left[0]).rstrip()}"]
    if fields.get("problems") and fields["status"] == "refused":
        fields["status"] = "check_failed"
    return fields


def _check_loaded(obj: Any, space: AddressSpace) -> list[str]:
    """The checks after a successful load; each failed one as a sentence."""
    problems: list[str] = []
    try:
        obj.outcome()
    except Exception as exc:
        problems.append(f"outcome() raised {_one_line(exc)}")
    allowed = [obj.span]
    if obj.relocations.extern_range is not None:
        allowed.append(obj.relocations.extern_range)
    for region in space.maps():
        if not any(lo <= region.start and region.end <= hi for lo, hi in allowed):
            problems.append(f"region {region.start:#x}-{region.end:#x} outside the span "
                            f"{obj.span[0]:#x}-{obj.span[1]:#x} and the extern mapping")
    obj.unload()
    left = space.maps()
    if left:
        problems.append(f"unload() left {len(left)} regions, first {left[0]}")
    return problems


def _error_fields(exc: BaseException) -> dict[str, Any]:
    """The class name, one-line message, traceback of ``exc``, and where it happened: the
    innermost three loader frames, then the innermost project frame if it is elsewhere."""
    text = "".join(traceback.format_exception(exc))
    frames = [f"{m[1]}:{m[2]} {m[3]}" for m in _PROJECT_FRAME.finditer(text)]
    where = [f for f in frames if f.startswith("loader/") and "trace.py" not in f][-3:]
    if frames and frames[-1] not in where:
        where.append(frames[-1])
    return {"error": type(exc).__name__, "message": _one_line(exc), "where": where,
            "traceback": "" if isinstance(exc, ElfError) else text}


def _one_line(exc: BaseException) -> str:
    """``Class: message`` cut to 300 characters."""
    return f"{type(exc).__name__}: {exc}"[:300]


def _show(value: object) -> str:
    """Integers in hex, everything else as repr (as ElfError shows them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    return repr(value)[:200]


def refusal_reason(result: FileResult) -> str:
    """The reason of a refusal as a grouping key: class, field and limit, numbers in the
    limit replaced by ``N`` (so one rule is one reason)."""
    limit = re.sub(r"0x[0-9a-fA-F]+|\b\d+\b", "N", result.limit)
    return f"{result.error}: {result.field}: {limit}"


# ---- the glibc oracle ----------------------------------------------------------------------

def glibc_verdict(path: str, *, dlopen_helper: str | None = None) -> GlibcVerdict:
    """Ask glibc's ld.so about ``path`` without running any of its code (``--verify`` maps
    the file alone, no dependencies, no relocation; ``--list`` is asked for the message when
    it fails). With ``dlopen_helper`` (from :func:`dlopen_helper`), a file ld.so maps is also
    dlopened in a fresh process: pass it only for shared objects, as that runs their
    constructors."""
    env = {"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
    try:
        rc = subprocess.run([LD_SO, "--verify", path], env=env, capture_output=True,
                            timeout=_ORACLE_SECONDS, stdin=subprocess.DEVNULL).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        return GlibcVerdict(None, "unknown", f"ld.so --verify: {exc}")
    verdict = GlibcVerdict(rc, "maps")
    if rc == 1:
        verdict.reason = _ld_so_reason(path, env)
        verdict.verdict = "refuses" if verdict.reason else "static"
    elif rc < 0:
        verdict.verdict, verdict.reason = "crashes", f"ld.so killed by {_signal_name(-rc)}"
    elif rc not in (0, 2):
        verdict.verdict = "unknown"
    if dlopen_helper is not None and verdict.verdict == "maps":
        verdict.dlopen = _dlopen(dlopen_helper, path, env)
    return verdict


def _ld_so_reason(path: str, env: dict[str, str]) -> str:
    """ld.so's message for a file it cannot map (``--list`` prints it; empty for a static
    executable, which it maps but has nothing to link)."""
    try:
        done = subprocess.run([LD_SO, "--list", path], env=env, capture_output=True,
                              text=True, errors="replace", timeout=_ORACLE_SECONDS,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ld.so --list: {exc}"
    text = done.stderr.strip()
    marker = f"{path}: "
    return text[text.rindex(marker) + len(marker):] if marker in text else text


def _dlopen(helper: str, path: str, env: dict[str, str]) -> str:
    """dlopen(path, RTLD_LAZY | RTLD_LOCAL) in a fresh process of its own session, no core
    dumps, CPU and time bounded: "ok" or dlerror()'s text (the path prefix removed)."""
    try:
        done = subprocess.run([helper, path], env=env, capture_output=True, text=True,
                              errors="replace", timeout=_ORACLE_SECONDS, cwd=tempfile.gettempdir(),
                              stdin=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=_bound_oracle_child)
    except subprocess.TimeoutExpired:
        return f"timeout after {_ORACLE_SECONDS:g}s"
    except OSError as exc:
        return f"not run: {exc}"
    if done.returncode == 0:
        return "ok"
    if done.returncode < 0:
        return f"killed by {_signal_name(-done.returncode)}"
    text = done.stdout.strip() or f"exit status {done.returncode}"
    return text.removeprefix(f"{path}: ")


def _signal_name(number: int) -> str:
    """"SIGSEGV" for 11; the number itself when it names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _bound_oracle_child() -> None:
    """In the dlopen helper before exec: killed with its parent, no core dumps, a CPU-time
    bound."""
    import resource
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = int(_ORACLE_SECONDS)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


def dlopen_helper(cache: str | None = None) -> str:
    """The path of the dlopen probe (a tiny C program), compiled with gcc once and cached
    under ``cache`` (default: a per-user directory in the temp dir), keyed by its source."""
    where = Path(cache or os.path.join(tempfile.gettempdir(), f"vmsim-sweep-{os.getuid()}"))
    where.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(_DLOPEN_SOURCE.encode()).hexdigest()[:12]
    exe = where / f"dlopen-probe-{digest}"
    if not exe.exists():
        source = where / f"dlopen-probe-{digest}.c"
        source.write_text(_DLOPEN_SOURCE)
        partial = where / f"{exe.name}.{os.getpid()}"
        subprocess.run(["gcc", "-O1", "-o", str(partial), str(source)], check=True,
                       capture_output=True)
        os.replace(partial, exe)
    return str(exe)


# ---- one file, supervised, with glibc's verdict ----------------------------------------------

@dataclass(frozen=True)
class _Options:
    """How each file is swept (sent to the workers)."""

    timeout: float
    max_rss: int
    oracle: bool
    dlopen: str | None


def sweep_one(path: str, options: _Options) -> FileResult:
    """Load ``path`` in a supervised child and, when asked, get glibc's verdict."""
    kind = describe(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    start = time.monotonic()
    fields = _supervised(path, options)
    result = FileResult(path=path, kind=kind, size=size, seconds=0.0, **fields)
    result.seconds = round(time.monotonic() - start, 4)
    if options.oracle:
        ask_dlopen = result.status == "refused" and kind == "shared-object"
        result.glibc = glibc_verdict(path, dlopen_helper=options.dlopen if ask_dlopen else None)
    return result


def _supervised(path: str, options: _Options) -> dict[str, Any]:
    """probe_file(path) under run_isolated; the supervisor's verdicts as statuses."""
    try:
        done = run_isolated(probe_file, path, timeout=options.timeout, max_rss=options.max_rss)
    except OverBound as exc:
        return {"status": "over_bound", "error": "OverBound", "message": str(exc)}
    except TimeoutError as exc:
        return {"status": "timeout", "error": "TimeoutError", "message": str(exc)}
    except ChildError as exc:
        return {"status": "child_error", "error": "ChildError", "message": str(exc)[:300],
                "traceback": str(exc)}
    except Exception as exc:  # probe_file itself failed: still an escape, never a crash here
        return {"status": "exception", **_error_fields(exc)}
    if done.status != "ok":
        return {"status": "signal", "error": done.status, "message": f"killed by {done.status}"}
    value: dict[str, Any] = done.value
    return value


# ---- the pool ------------------------------------------------------------------------------

@dataclass
class _Worker:
    """A worker process: takes paths (JSON lines) on ``tasks``, answers on ``answers``."""

    pid: int
    tasks: int
    answers: int
    path: str | None = None
    buffer: bytes = b""


def _start_worker(options: _Options) -> _Worker:
    """Fork a worker; it sweeps each path it is sent and dies with its parent."""
    task_r, task_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the worker
        code = 0
        try:
            os.close(task_w)
            os.close(ans_r)
            _worker_loop(task_r, ans_w, options)
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(task_r)
    os.close(ans_w)
    return _Worker(pid, task_w, ans_r)


def _worker_loop(task_fd: int, answer_fd: int, options: _Options) -> None:  # pragma: no cover
    """In the worker: ignore Ctrl-C (the parent stops us), sweep each path, answer."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with os.fdopen(task_fd, "rb") as tasks, os.fdopen(answer_fd, "wb") as answers:
        for line in tasks:
            result = sweep_one(json.loads(line), options)
            answers.write(json.dumps(result.to_json()).encode() + b"\n")
            answers.flush()


def _assign(worker: _Worker, pending: Iterator[str]) -> bool:
    """Send the worker its next path; False when none is left."""
    worker.path = next(pending, None)
    if worker.path is None:
        return False
    os.write(worker.tasks, json.dumps(worker.path).encode() + b"\n")
    return True


def _stop(worker: _Worker) -> None:
    """Kill and reap a worker and close its pipes (once: fd numbers are reused)."""
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(worker.pid, signal.SIGKILL)
        os.waitpid(worker.pid, 0)
    for fd in (worker.tasks, worker.answers):
        if fd >= 0:
            os.close(fd)
    worker.tasks = worker.answers = -1


def iter_results(paths: Sequence[str], *, workers: int = 2, timeout: float = 20.0,
                 max_rss: int = 512 << 20, oracle: bool = True,
                 dlopen: bool = True) -> Generator[FileResult, None, None]:
    """Sweep ``paths`` in ``workers`` processes; yield each FileResult as it is done (in
    completion order). ``timeout``/``max_rss``: the bounds of each load's child. ``oracle``:
    ask ld.so about every file; ``dlopen``: also dlopen the refused shared objects. Closing
    the generator (or an exception, Ctrl-C included) kills the workers and their children."""
    helper = dlopen_helper() if oracle and dlopen else None
    options = _Options(timeout, max_rss, oracle, helper)
    pending = iter(paths)
    busy: dict[int, _Worker] = {}
    try:
        for _ in range(max(1, min(workers, len(paths)))):
            worker = _start_worker(options)
            busy[worker.answers] = worker
            if not _assign(worker, pending):
                del busy[worker.answers]
                _stop(worker)
        while busy:
            ready, _, _ = select.select(list(busy), [], [])
            for fd in ready:
                if fd in busy:
                    yield from _drain(busy, busy[fd], pending, options)
    finally:
        for worker in list(busy.values()):
            _stop(worker)


def _drain(busy: dict[int, _Worker], worker: _Worker, pending: Iterator[str],
           options: _Options) -> Iterator[FileResult]:
    """Read what the worker sent: each answer is a result, then the worker gets the next path
    (or is stopped when none is left). A worker that dies mid-file (its answer pipe ends)
    yields a child_error for that file and is replaced. Workers are never told to finish
    by closing their task pipe: later workers inherit its write end."""
    chunk = os.read(worker.answers, 1 << 16)
    if not chunk:
        del busy[worker.answers]
        _stop(worker)
        fresh = _start_worker(options)
        busy[fresh.answers] = fresh
        if not _assign(fresh, pending):
            del busy[fresh.answers]
            _stop(fresh)
        if worker.path is not None:
            yield FileResult(worker.path, describe(worker.path), -1, "child_error",
                             error="ChildError", message="the sweep worker died")
        return
    worker.buffer += chunk
    while b"\n" in worker.buffer:
        line, worker.buffer = worker.buffer.split(b"\n", 1)
        yield FileResult.from_json(json.loads(line))
        if not _assign(worker, pending):  # nothing left for it: stop it now
            del busy[worker.answers]
            _stop(worker)
            return


# ---- the report ----------------------------------------------------------------------------

@dataclass
class SweepReport:
    """The results of a sweep (sorted by path), how long it took, whether it was cut short."""

    roots: list[str]
    results: list[FileResult]
    seconds: float
    interrupted: bool = False
    workers: int = 2

    def counts(self) -> Counter[str]:
        """Files per status."""
        return Counter(r.status for r in self.results)

    def kinds(self) -> dict[str, Counter[str]]:
        """Files per kind, then per status."""
        out: dict[str, Counter[str]] = {}
        for r in self.results:
            out.setdefault(r.kind, Counter())[r.status] += 1
        return out

    def escapes(self) -> list[FileResult]:
        """Every file that neither loaded nor was refused with an ElfError."""
        return [r for r in self.results if r.escaped]

    def unshared(self) -> list[FileResult]:
        """Refusals glibc does not share (it maps and, when asked, dlopens the file)."""
        return [r for r in self.results if r.shared is False]

    def glibc_only(self) -> list[FileResult]:
        """Files glibc refuses but the loader loads."""
        return [r for r in self.results
                if r.status == "loaded" and r.glibc is not None and r.glibc.refuses]

    def reasons(self) -> list[tuple[str, int, Counter[str]]]:
        """Each refusal reason, its count and glibc's verdicts on those files (most first)."""
        groups: dict[str, Counter[str]] = {}
        for r in self.results:
            if r.status == "refused":
                why = r.glibc.why if r.glibc is not None else "not asked"
                groups.setdefault(refusal_reason(r), Counter())[why] += 1
        rows = [(reason, sum(c.values()), c) for reason, c in groups.items()]
        return sorted(rows, key=lambda row: (-row[1], row[0]))

    def heaviest(self, n: int = 5) -> list[FileResult]:
        """The ``n`` loads that left the most simulator frames allocated."""
        return sorted(self.results, key=lambda r: -r.frames)[:n]

    def to_json(self) -> dict[str, Any]:
        """The whole report as plain data (summary first, then every file)."""
        return {
            "roots": self.roots, "files": len(self.results), "seconds": round(self.seconds, 2),
            "workers": self.workers, "interrupted": self.interrupted,
            "counts": dict(self.counts()),
            "kinds": {k: dict(c) for k, c in sorted(self.kinds().items())},
            "reasons": [{"reason": reason, "count": n, "glibc": dict(c)}
                        for reason, n, c in self.reasons()],
            "escapes": [r.path for r in self.escapes()],
            "unshared": [r.path for r in self.unshared()],
            "glibc_only": [r.path for r in self.glibc_only()],
            "results": [r.to_json() for r in self.results],
        }


def sweep(paths: Sequence[str] | None = None, *, roots: Sequence[str] = ROOTS,
          workers: int = 2, timeout: float = 20.0, max_rss: int = 512 << 20,
          oracle: bool = True, dlopen: bool = True,
          progress: Callable[[FileResult], None] | None = None) -> SweepReport:
    """Sweep ``paths`` (default: every ELF file under ``roots``) and return the report.
    ``progress`` hears each result as it comes. Ctrl-C stops the sweep: the workers are
    killed and the partial report comes back with ``interrupted`` set."""
    start = time.monotonic()
    files = list(paths) if paths is not None else find_elf_files(roots)
    results: list[FileResult] = []
    interrupted = False
    stream = iter_results(files, workers=workers, timeout=timeout, max_rss=max_rss,
                          oracle=oracle, dlopen=dlopen)
    try:
        with contextlib.closing(stream):
            for result in stream:
                results.append(result)
                if progress is not None:
                    progress(result)
    except KeyboardInterrupt:
        interrupted = True
    results.sort(key=lambda r: r.path)
    return SweepReport(list(roots), results, time.monotonic() - start, interrupted, workers)
