"""The system calls of a simulated process: the simulator is its kernel.

Part of ``vmsim``'s process layer: :class:`Syscalls` serves the ``syscall`` instructions of
a :class:`~vmsim.cpu.Cpu` (``vmsim.process`` wires them), reading its registers as Linux's
x86-64 entry does (number in rax, arguments in rdi, rsi, rdx, r10, r8, r9, result in rax,
``-errno`` on failure). Memory calls (``vmsim.memcalls``: mmap, munmap, mprotect, mremap; brk
here) go through the same ``vmsim.kernel.Kernel`` calls as the ``Mmap`` methods of
:class:`~vmsim.AddressSpace`; the program's own memory is read and written as user-mode
accesses (a fault is ``-EFAULT``). The host's clocks and file-system figures come from
``vmsim.sysinfo``, signal dispositions from ``vmsim.signals``, rseq from ``vmsim.rseq``.

Host files are reachable read-only and only through descriptors of the program's own table:
openat refuses any write access (EACCES) but to /dev/null, whose writes go nowhere;
read/pread64/lseek/fstat/newfstatat/getdents64/close work on what openat returned; fds 0, 1
and 2 are a closed stdin and two captured outputs (pipes to fstat, ENOTTY to ioctl). Relative
paths start at the process's own working directory (chdir, fchdir), never the host's. The
host's /proc is refused (EACCES: its processes' memory is there) but for the process's own
``/proc/self/maps``, which the simulator writes. access and readlink answer from the host's
files (write access: EACCES), /proc/self/exe is the program ``exec`` ran. Anything else
returns ``-ENOSYS`` and is counted by name.
"""
from __future__ import annotations

import errno
import functools
import inspect
import itertools
import os
import resource
import stat
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from loader.mmap import MmapError
from loader.pages import page_round_up
from vmsim import memcalls, sysinfo
from vmsim.cpu import Cpu, Stop
from vmsim.dirents import Directory
from vmsim.fault import Fault
from vmsim.rseq import Rseq
from vmsim.signals import SignalState
from vmsim.space import AddressSpace
from vmsim.syscall_args import MAP_ANON, MAP_NOREPLACE, MAP_PRIVATE, PROT_READ, PROT_WRITE
from vmsim.syscall_args import as_int_arg as c_int

__all__ = ["MAX_IO", "MAX_OUTPUT", "SYSCALL_NAMES", "Syscalls"]

MAX_IO = 1 << 20
"""The most bytes one read, write or getrandom moves (a shorter count is legal)."""
MAX_OUTPUT = 64 << 20
"""The most bytes fds 1 and 2 capture each; a write past it is ENOSPC (a program writing in a
loop cannot fill the host's memory)."""
_PATH_MAX = 4096
_AT_FDCWD = c_int(-100)   # as a register holds it: -100 sign-extended
_AT_EMPTY_PATH, _AT_SYMLINK_NOFOLLOW = 0x1000, 0x100
_ARCH_SET_GS, _ARCH_SET_FS, _ARCH_GET_FS, _ARCH_GET_GS = 0x1001, 0x1002, 0x1003, 0x1004
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_STAT = struct.Struct("<QQQIIIIQqqqqqqqqq24x")  # struct stat, x86-64
_RLIMITS = {0: "RLIMIT_CPU", 1: "RLIMIT_FSIZE", 2: "RLIMIT_DATA", 3: "RLIMIT_STACK",
            4: "RLIMIT_CORE", 5: "RLIMIT_RSS", 6: "RLIMIT_NPROC", 7: "RLIMIT_NOFILE",
            8: "RLIMIT_MEMLOCK", 9: "RLIMIT_AS"}
_STDIO = (0, 1, 2)
_NULL_DEVICE = os.makedev(1, 3)
_CLOCK_MONOTONIC = 1
_CREAT_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_TRUNC   # creat(2) is this openat
_FD_LIMIT = 1 << 20   # fs.nr_open's default: no descriptor number reaches it
_F_DUPFD, _F_GETFD, _F_SETFD, _F_GETFL, _F_DUPFD_CLOEXEC = 0, 1, 2, 3, 1030
PID = 1000
"""The simulated process's pid (and its one thread's tid)."""
_PROC_SELF_EXE = "/proc/self/exe"
_PROC_MAPS = ("/proc/self/maps", f"/proc/{PID}/maps", "/proc/thread-self/maps")

SYSCALL_NAMES = {
    0: "read", 1: "write", 2: "open", 3: "close", 4: "stat", 5: "fstat", 6: "lstat", 7: "poll",
    8: "lseek", 9: "mmap", 10: "mprotect", 11: "munmap", 12: "brk", 13: "rt_sigaction",
    14: "rt_sigprocmask", 15: "rt_sigreturn", 16: "ioctl", 17: "pread64", 18: "pwrite64",
    19: "readv", 20: "writev", 21: "access", 22: "pipe", 24: "sched_yield", 25: "mremap",
    28: "madvise", 32: "dup", 33: "dup2", 35: "nanosleep", 39: "getpid", 41: "socket",
    56: "clone", 57: "fork", 58: "vfork", 59: "execve", 60: "exit", 61: "wait4", 62: "kill",
    63: "uname", 72: "fcntl", 79: "getcwd", 80: "chdir", 81: "fchdir", 85: "creat",
    89: "readlink", 96: "gettimeofday", 97: "getrlimit", 99: "sysinfo", 102: "getuid",
    104: "getgid", 107: "geteuid", 108: "getegid", 110: "getppid", 131: "sigaltstack",
    137: "statfs", 138: "fstatfs", 158: "arch_prctl", 186: "gettid", 191: "getxattr",
    192: "lgetxattr", 200: "tkill", 201: "time", 202: "futex", 204: "sched_getaffinity",
    217: "getdents64", 218: "set_tid_address", 228: "clock_gettime", 230: "clock_nanosleep",
    231: "exit_group", 234: "tgkill", 257: "openat", 262: "newfstatat", 267: "readlinkat",
    273: "set_robust_list", 293: "pipe2", 302: "prlimit64", 318: "getrandom", 332: "statx",
    334: "rseq", 435: "clone3", 439: "faccessat2"}
"""x86-64 syscall numbers, for the names calls are counted by (others: ``syscall_<nr>``)."""
_ARGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


class Syscalls:
    """The kernel entry of one process: its descriptor table, brk, captured output and
    counters (``counts``: calls by name; ``enosys``: the unimplemented ones by name)."""

    def __init__(self, space: AddressSpace, brk_base: int) -> None:
        self.space = space
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.counts: Counter[str] = Counter()
        self.enosys: Counter[str] = Counter()
        self.fds: dict[int, int] = {}  # the program's fd -> the host's (read-only)
        self.stdio = set(_STDIO)
        """Which of fds 0, 1 and 2 the program has not closed."""
        self.sinks: set[int] = set()
        """The program's descriptors of /dev/null opened for writing."""
        self.cloexec: set[int] = set()
        """The program's descriptors with FD_CLOEXEC (kept for F_GETFD: nothing is exec'ed)."""
        self.dirs: dict[int, Directory] = {}
        """The directories the program reads with getdents64, by its fd."""
        self.cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        """The program's working directory (a host directory descriptor): it starts as the
        host's; chdir and fchdir move it, never the host process's own."""
        self.signals = SignalState()
        self.rseq = Rseq()
        self.brk_base = self.brk = brk_base
        self.exe: str | None = None
        """The program ``exec`` ran (what readlink of /proc/self/exe gives), or None."""
        self.cpu: Cpu | None = None
        self.handlers = {nr: (h, _positional(h)) for nr, h in self._handlers().items()}

    def _handlers(self) -> dict[int, Callable[..., int]]:
        """What serves each syscall number (the arguments are its registers, in order)."""
        space, at_cwd = self.space, _AT_FDCWD
        return {
            # memory
            9: lambda addr, length, prot, flags, fd, off: memcalls.mmap(
                space, self.fds.get(c_int(fd), -1), addr, length, prot, flags, off),
            10: functools.partial(memcalls.mprotect, space),
            11: functools.partial(memcalls.munmap, space), 12: self.brk_call,
            25: functools.partial(memcalls.mremap, space),
            202: functools.partial(memcalls.futex, space),
            # files and directories, read-only
            0: self.read, 1: self.write, 2: lambda path, flags, mode: self.openat(
                at_cwd, path, flags, mode), 3: self.close, 5: self.fstat, 8: self.lseek,
            16: self.ioctl, 17: self.pread64, 20: self.writev, 21: self.access,
            72: self.fcntl, 79: self.getcwd, 80: self.chdir, 81: self.fchdir,
            85: lambda path, mode: self.openat(at_cwd, path, _CREAT_FLAGS, mode),
            89: self.readlink, 137: self.statfs,
            138: lambda fd, buf: sysinfo.fstatfs(space, self._any_fd(fd), buf),
            191: functools.partial(self.getxattr, follow=True),
            192: functools.partial(self.getxattr, follow=False),
            217: self.getdents64, 221: self.fadvise64, 257: self.openat, 262: self.newfstatat,
            267: self.readlinkat, 269: self.faccessat,
            # the process, its thread and its signals
            13: functools.partial(self.signals.rt_sigaction, space),
            14: functools.partial(self.signals.rt_sigprocmask, space),
            131: functools.partial(self.signals.sigaltstack, space),
            39: lambda: PID, 60: self.exit, 62: self.kill, 110: lambda: 1, 186: lambda: PID,
            200: lambda tid, sig: self.kill(tid, sig),
            234: lambda tgid, tid, sig: self.kill(tid, sig) if c_int(tgid) == PID
            else -errno.ESRCH,
            102: os.getuid, 104: os.getgid, 107: os.geteuid, 108: os.getegid,
            158: self.arch_prctl, 218: lambda _tidptr: PID, 231: self.exit,
            273: lambda _head, _len: 0, 302: self.prlimit64,
            334: functools.partial(self.rseq.call, space),
            # the machine
            63: functools.partial(sysinfo.uname, space),
            96: functools.partial(sysinfo.gettimeofday, space),
            99: functools.partial(sysinfo.sysinfo, space),
            201: functools.partial(sysinfo.time_call, space),
            228: functools.partial(sysinfo.clock_gettime, space),
            35: lambda request, remain: sysinfo.clock_nanosleep(
                space, self._stopping, _CLOCK_MONOTONIC, 0, request, remain),
            230: functools.partial(sysinfo.clock_nanosleep, space, self._stopping),
            318: functools.partial(sysinfo.getrandom, space, MAX_IO)}

    def _stopping(self) -> bool:
        """The CPU's run must stop (time limit, Ctrl-C): a waiting syscall gives up."""
        return self.cpu is not None and self.cpu.stopping

    def close_all(self) -> None:
        """Close the host descriptors the program still holds."""
        for host in [*self.fds.values(), self.cwd]:
            os.close(host)
        self.fds.clear()

    # ---- the entry

    def __call__(self, cpu: Cpu) -> None:
        """One ``syscall`` instruction on ``cpu``: dispatch on rax, result into rax."""
        self.cpu = cpu
        nr = cpu.reg("rax")
        name = SYSCALL_NAMES.get(nr, f"syscall_{nr}")
        self.counts[name] += 1
        entry = self.handlers.get(nr)
        if entry is None:
            self.enosys[name] += 1
            cpu.set_reg("rax", -errno.ENOSYS)
            return
        handler, nargs = entry
        try:
            result = handler(*(cpu.reg(r) for r in _ARGS[:nargs]))
        except MmapError as err:
            result = -err.code
        except Fault:
            result = -errno.EFAULT
        except OSError as err:
            result = -(err.errno or errno.EIO)
        except (OverflowError, ValueError):  # a value the host call cannot take
            result = -errno.EINVAL
        cpu.set_reg("rax", result)

    # ---- process

    def exit(self, status: int) -> int:
        """exit / exit_group: the CPU stops with the status (its low byte, as wait sees)."""
        raise Stop(status & 0xFF)

    def arch_prctl(self, code: int, addr: int) -> int:
        """ARCH_SET_FS/GS set the segment base; ARCH_GET_FS/GS store it at ``addr``."""
        assert self.cpu is not None
        reg = "fs_base" if code in (_ARCH_SET_FS, _ARCH_GET_FS) else "gs_base"
        if code in (_ARCH_SET_FS, _ARCH_SET_GS):
            if addr >= self.space.task_size:
                return -errno.EPERM
            self.cpu.set_reg(reg, addr)
            return 0
        if code in (_ARCH_GET_FS, _ARCH_GET_GS):
            self.space.write(addr, self.cpu.reg(reg).to_bytes(8, "little"))
            return 0
        return -errno.EINVAL

    def prlimit64(self, pid: int, res: int, new: int, old: int) -> int:
        """Read a limit (the host's); setting one is refused (EPERM)."""
        if pid not in (0, PID):
            return -errno.ESRCH
        if res not in _RLIMITS:
            return -errno.EINVAL
        if new:
            return -errno.EPERM
        if old:
            soft, hard = resource.getrlimit(getattr(resource, _RLIMITS[res]))
            self.space.write(old, struct.pack("<qq", soft, hard))
        return 0

    # ---- memory

    def brk_call(self, addr: int) -> int:
        """brk(2): move the program break (anonymous memory from ``brk_base``); returns the
        break, unchanged when the move is refused, as Linux does."""
        page = self.space.page_size
        old, new = page_round_up(self.brk, page), page_round_up(addr, page)
        if addr < self.brk_base:
            return self.brk
        try:
            if new > old:
                self.space.kernel.mmap(old, new - old, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANON | MAP_NOREPLACE, 0, -1)
            elif new < old:
                self.space.kernel.munmap(new, old - new)
        except MmapError:
            return self.brk
        self.brk = addr
        return addr

    # ---- files (host files, read-only)

    def _path(self, addr: int) -> str:
        """The NUL-terminated path at ``addr`` (ENAMETOOLONG past PATH_MAX)."""
        out = b""
        while len(out) < _PATH_MAX:
            chunk = self.space.read(addr + len(out), 1 + (-(addr + len(out) + 1)) % 256)
            end = chunk.find(b"\0")
            if end >= 0:
                return os.fsdecode(out + chunk[:end])
            out += chunk
        raise OSError(errno.ENAMETOOLONG, "path too long")

    def _host_fd(self, fd: int) -> int:
        """The host descriptor behind the program's ``fd`` (EBADF when none)."""
        host = self.fds.get(c_int(fd))
        if host is None:
            raise OSError(errno.EBADF, "bad file descriptor")
        return host

    def _dir_fd(self, dirfd: int, name: str) -> int | None:
        """The host directory descriptor a relative ``name`` is looked up from: the
        program's working directory for AT_FDCWD, else its ``dirfd`` (None for an absolute
        name)."""
        if name.startswith("/"):
            return None
        return self.cwd if c_int(dirfd) == _AT_FDCWD else self._host_fd(dirfd)

    def _any_fd(self, fd: int) -> int:
        """The host descriptor behind the program's ``fd``, stdio's included (the host's
        own: pipes to fstatfs)."""
        return c_int(fd) if c_int(fd) in self.stdio else self._host_fd(fd)

    def openat(self, dirfd: int, path: int, flags: int, _mode: int) -> int:
        """Open a host file read-only (relative paths from the host's working directory when
        ``dirfd`` is AT_FDCWD, else from the program's directory descriptor). The process's
        own ``/proc/self/maps`` is the simulator's (:meth:`_maps_file`); any other file of
        the host's /proc (its processes' memory, maps, fds) is EACCES, and so is anything
        but a regular file, a directory or one of ``_HARMLESS_DEVICES`` (a device could read
        the host's memory or block; the open itself never blocks: O_NONBLOCK)."""
        flags = c_int(flags)
        name = self._path(path)
        if flags & _WRITE_FLAGS and not self._is_null(dirfd, name):
            return -errno.EACCES
        if name in _PROC_MAPS:
            return self._install(self._maps_file())
        base = self._dir_fd(dirfd, name)
        host = os.open(name, (flags & (os.O_DIRECTORY | os.O_NOFOLLOW)) | os.O_RDONLY
                       | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=base)
        if _on_host_proc(host) or not _harmless(host):
            os.close(host)
            return -errno.EACCES
        fd = self._install(host)
        if flags & _WRITE_FLAGS:
            self.sinks.add(fd)
        return fd

    def _is_null(self, dirfd: int, name: str) -> bool:
        """``name`` is the null device (writes to it go nowhere: the one host file a
        program may open for writing)."""
        try:
            st = os.stat(name, dir_fd=self._dir_fd(dirfd, name))
        except OSError:
            return False
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == _NULL_DEVICE

    def _install(self, host: int, lowest: int = 0) -> int:
        """The program's lowest free descriptor from ``lowest`` for the host's ``host`` (3,
        unless the program closed one of 0, 1 and 2)."""
        taken = self.fds.keys() | self.stdio
        fd = next(n for n in itertools.count(lowest) if n not in taken)
        self.fds[fd] = host
        return fd

    def _maps_file(self) -> int:
        """A host memory file holding the space's ``/proc/self/maps`` as it is now."""
        text = "".join(f"{region}\n" for region in self.space.maps()).encode()
        host = os.memfd_create("maps", os.MFD_CLOEXEC)
        view = memoryview(text)
        while view:
            view = view[os.write(host, view):]
        os.lseek(host, 0, os.SEEK_SET)
        return host

    def close(self, fd: int) -> int:
        """close(2) of one of the program's descriptors (stdio's too: then they are gone)."""
        if c_int(fd) in self.stdio:
            self.stdio.discard(c_int(fd))
            return 0
        host = self._host_fd(fd)
        del self.fds[c_int(fd)]
        self.dirs.pop(c_int(fd), None)
        self.cloexec.discard(c_int(fd))
        self.sinks.discard(c_int(fd))
        os.close(host)
        return 0

    def read(self, fd: int, buf: int, count: int) -> int:
        """read(2): fd 0 is at its end; others are the program's host files."""
        if c_int(fd) == 0 and 0 in self.stdio:
            return 0
        data = os.read(self._host_fd(fd), min(count, MAX_IO))
        self.space.write(buf, data)
        return len(data)

    def pread64(self, fd: int, buf: int, count: int, offset: int) -> int:
        """pread64(2) on one of the program's host files."""
        data = os.pread(self._host_fd(fd), min(count, MAX_IO), offset)
        self.space.write(buf, data)
        return len(data)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        """lseek(2) on one of the program's host files (on a directory it reads: back to its
        first entry, as rewinddir asks, when the offset is 0)."""
        if c_int(fd) in self.dirs and offset == 0:
            self.dirs[c_int(fd)].rewind()
        return os.lseek(self._host_fd(fd), offset - (offset >> 63 << 64), c_int(whence))

    def kill(self, pid: int, signum: int) -> int:
        """kill(2), tkill and tgkill, to the process itself (its pid, 0, or -1: there is no
        other); ESRCH for any other (``vmsim.signals``: a terminating signal stops the run)."""
        if c_int(pid) not in (PID, 0, c_int(-1)):
            return -errno.ESRCH
        return self.signals.send_self(signum)

    def getcwd(self, buf: int, size: int) -> int:
        """getcwd(2): the host's working directory (relative paths are resolved from it);
        ERANGE when it does not fit in ``size`` bytes."""
        cwd = os.fsencode(self._cwd_path()) + b"\0"
        if len(cwd) > size:
            return -errno.ERANGE
        self.space.write(buf, cwd)
        return len(cwd)

    def _cwd_path(self) -> str:
        """The working directory's path (the host's own record of the descriptor)."""
        return os.readlink(f"/proc/self/fd/{self.cwd}")

    def chdir(self, path: int) -> int:
        """chdir(2): the program's working directory moves (ENOENT, ENOTDIR, EACCES as the
        host says)."""
        name = self._path(path)
        self._move_cwd(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                               dir_fd=self._dir_fd(_AT_FDCWD, name)))
        return 0

    def fchdir(self, fd: int) -> int:
        """fchdir(2) to a directory the program opened (ENOTDIR for another file)."""
        host = self._host_fd(fd)
        if not stat.S_ISDIR(os.fstat(host).st_mode):
            return -errno.ENOTDIR
        self._move_cwd(os.dup(host))
        return 0

    def _move_cwd(self, host: int) -> None:
        """The working directory is now the host directory ``host`` (the old one closed)."""
        os.close(self.cwd)
        self.cwd = host

    def statfs(self, path: int, buf: int) -> int:
        """statfs(2) of the file system holding a host path (``vmsim.sysinfo``)."""
        name = self._path(path)
        host = os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=self._dir_fd(_AT_FDCWD, name))
        try:
            return sysinfo.fstatfs(self.space, host, buf)
        finally:
            os.close(host)

    def fcntl(self, fd: int, cmd: int, arg: int) -> int:
        """fcntl(2): F_GETFD/F_SETFD (FD_CLOEXEC), F_GETFL (how it was opened: read-only for
        a host file, stdin a pipe's read end, stdout and stderr write ends), F_DUPFD and
        F_DUPFD_CLOEXEC of a host file; other commands EINVAL."""
        fd = c_int(fd)
        if fd not in self.stdio:
            self._host_fd(fd)
        cmd = c_int(cmd)
        if cmd == _F_GETFD:
            return int(fd in self.cloexec)
        if cmd == _F_SETFD:
            (self.cloexec.add if arg & 1 else self.cloexec.discard)(fd)
            return 0
        if cmd == _F_GETFL:
            return os.O_WRONLY if fd in (1, 2) and fd in self.stdio else os.O_RDONLY
        if cmd in (_F_DUPFD, _F_DUPFD_CLOEXEC) and fd not in self.stdio:
            if not 0 <= c_int(arg) < _FD_LIMIT:
                return -errno.EINVAL
            new = self._install(os.dup(self._host_fd(fd)), lowest=c_int(arg))
            if cmd == _F_DUPFD_CLOEXEC:
                self.cloexec.add(new)
            return new
        return -errno.EINVAL

    def fadvise64(self, fd: int, _offset: int, _length: int, advice: int) -> int:
        """fadvise64(2): advice about a host file, taken (nothing to do); EINVAL for an
        unknown advice, ESPIPE for stdio's pipes."""
        if c_int(fd) in self.stdio:
            return -errno.ESPIPE
        self._host_fd(fd)
        return 0 if 0 <= c_int(advice) <= 5 else -errno.EINVAL

    def getxattr(self, path: int, name: int, value: int, size: int, *, follow: bool) -> int:
        """getxattr(2) and lgetxattr(2): an extended attribute of a host file, read-only
        (``vmsim.sysinfo``)."""
        file = os.path.join(self._cwd_path(), self._path(path))
        return sysinfo.getxattr(self.space, file, self._path(name), value, size,
                                follow=follow)

    def getdents64(self, fd: int, dirp: int, count: int) -> int:
        """getdents64(2) on a directory the program opened: the host's entries
        (``vmsim.dirents``), as many as fit in ``count`` bytes (at most MAX_IO); ENOTDIR for
        another file, EINVAL when not one entry fits."""
        host = self._host_fd(fd)
        directory = self.dirs.get(c_int(fd))
        if directory is None:
            if not stat.S_ISDIR(os.fstat(host).st_mode):
                return -errno.ENOTDIR
            directory = self.dirs[c_int(fd)] = Directory(host)
        data = directory.read(min(count & 0xFFFF_FFFF, MAX_IO))
        self.space.write(dirp, data)
        return len(data)

    def fstat(self, fd: int, buf: int) -> int:
        """fstat(2) on one of the program's host files; fds 0, 1 and 2 are pipes (as under
        ``subprocess.run(..., capture_output=True)``: a program's stdio is fully buffered)."""
        st = _PIPE_STAT if c_int(fd) in self.stdio else _stat_bytes(os.fstat(self._host_fd(fd)))
        self.space.write(buf, st)
        return 0

    def ioctl(self, fd: int, _request: int, _arg: int) -> int:
        """ioctl(2): no descriptor of the program is a terminal or a device, so every
        request (TCGETS, isatty's) is ENOTTY; EBADF for a descriptor it does not have."""
        if c_int(fd) not in self.stdio:
            self._host_fd(fd)
        return -errno.ENOTTY

    def access(self, path: int, mode: int) -> int:
        """access(2): :meth:`faccessat` from the working directory."""
        return self.faccessat(_AT_FDCWD, path, mode)

    def faccessat(self, dirfd: int, path: int, mode: int) -> int:
        """faccessat(2) (no flags): ENOENT and the like as the host's lookup says; asking
        for write access is EACCES (host files are read-only to the program), else the
        host's answer for read and execute."""
        name = self._path(path)
        base = self._dir_fd(dirfd, name)
        os.stat(name, dir_fd=base)
        mode = c_int(mode)
        if mode & ~(os.R_OK | os.W_OK | os.X_OK):
            return -errno.EINVAL
        if mode & os.W_OK or not os.access(name, mode, dir_fd=base):
            return -errno.EACCES
        return 0

    def readlink(self, path: int, buf: int, size: int) -> int:
        """readlink(2): :meth:`readlinkat` from the working directory."""
        return self.readlinkat(_AT_FDCWD, path, buf, size)

    def readlinkat(self, dirfd: int, path: int, buf: int, size: int) -> int:
        """readlinkat(2): /proc/self/exe is the exec'ed program's absolute path (ENOENT
        without one); another host path is the host's link (truncated to ``size``, no NUL
        added, as Linux does)."""
        if not 0 < c_int(size):
            return -errno.EINVAL
        name = self._path(path)
        if name == _PROC_SELF_EXE:
            if self.exe is None:
                return -errno.ENOENT
            target = os.fsencode(os.path.abspath(self.exe))
        else:
            base = self._dir_fd(dirfd, name)
            target = os.fsencode(os.readlink(name, dir_fd=base))
        data = target[:min(c_int(size), _PATH_MAX)]
        self.space.write(buf, data)
        return len(data)

    def newfstatat(self, dirfd: int, path: int, buf: int, flags: int) -> int:
        """newfstatat(2): fstat with AT_EMPTY_PATH and "", else a host stat of the path."""
        name = self._path(path)
        if not name and c_int(flags) & _AT_EMPTY_PATH:
            return self.fstat(dirfd, buf)
        base = self._dir_fd(dirfd, name)
        st = os.stat(name, dir_fd=base, follow_symlinks=not c_int(flags) & _AT_SYMLINK_NOFOLLOW)
        self.space.write(buf, _stat_bytes(st))
        return 0

    # ---- output

    def write(self, fd: int, buf: int, count: int) -> int:
        """write(2) to fd 1 or 2 (captured, up to MAX_OUTPUT) or to /dev/null (all taken,
        nothing kept); other descriptors are read-only (EBADF)."""
        if c_int(fd) in self.sinks:
            return count
        out = {1: self.stdout, 2: self.stderr}.get(c_int(fd)) if c_int(fd) in self.stdio \
            else None
        if out is None:
            return -errno.EBADF
        room = MAX_OUTPUT - len(out)
        if count and room <= 0:
            return -errno.ENOSPC
        data = self.space.read(buf, min(count, MAX_IO, room))
        out += data
        return len(data)

    def writev(self, fd: int, iov: int, count: int) -> int:
        """writev(2) to fd 1 or 2: each iovec in turn (at most 1024)."""
        if not 0 <= c_int(count) <= 1024:
            return -errno.EINVAL
        total = 0
        for k in range(c_int(count)):
            base, length = struct.unpack("<QQ", self.space.read(iov + 16 * k, 16))
            wrote = self.write(fd, base, length)
            if wrote < 0:
                return wrote
            total += wrote
        return total


_HARMLESS_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"})
"""Character devices a program may read (nothing of the host's memory, never blocking)."""


def _harmless(host: int) -> bool:
    """Whether the open ``host`` descriptor is a regular file, a directory, or a harmless
    device (not /dev/mem, a FIFO, a socket or a terminal)."""
    mode = os.fstat(host).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return True
    try:
        return stat.S_ISCHR(mode) and os.readlink(f"/proc/self/fd/{host}") in _HARMLESS_DEVICES
    except OSError:
        return False


def _on_host_proc(host: int) -> bool:
    """Whether the open ``host`` descriptor is a file of the host's /proc (where the host's
    processes, this one among them, show their memory)."""
    try:
        return os.readlink(f"/proc/self/fd/{host}").startswith("/proc/")
    except OSError:
        return True


_PIPE_STAT = _STAT.pack(0, 0, 1, stat.S_IFIFO | 0o600, os.getuid(), os.getgid(), 0, 0, 0, 4096,
                       0, 0, 0, 0, 0, 0, 0)
"""fstat of fds 0, 1 and 2: an anonymous pipe's (no device, no inode, no times)."""


def _stat_bytes(st: Any) -> bytes:
    """``os.stat_result`` as x86-64's struct stat."""
    return _STAT.pack(st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0,
                      st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
                      int(st.st_atime), st.st_atime_ns % 10**9, int(st.st_mtime),
                      st.st_mtime_ns % 10**9, int(st.st_ctime), st.st_ctime_ns % 10**9)



def _positional(handler: Callable[..., int]) -> int:
    """How many register arguments ``handler`` takes (its keyword-only ones are bound)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(handler).parameters.values())
