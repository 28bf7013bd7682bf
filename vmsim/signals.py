"""Signal dispositions of a simulated process: kept as Linux keeps them, never delivered.

Part of ``vmsim``'s process layer (``vmsim.syscalls`` dispatches to it). ``rt_sigaction``,
``rt_sigprocmask`` and ``sigaltstack`` store and report what the program asks, with Linux's
checks (the signal's number, SIGKILL and SIGSTOP untouchable, the sigset's size, the
alternate stack's size), so a program that installs handlers runs on. What is not modelled:
a handler never runs. A fault ends the program (``vmsim.Fault``) even when it installed a
SIGSEGV handler, and a signal the program sends itself (``kill``, ``tgkill``: ``raise``,
``abort``) acts only by its default action: it terminates the program (:class:`Killed`), or
is ignored when the program ignores it, blocks it or gave it a handler (which would have run).
"""

from __future__ import annotations

import errno
import signal
import struct
from dataclasses import dataclass, field

from vmsim.cpu import Stop
from vmsim.space import AddressSpace

__all__ = ["Killed", "SignalState", "signal_name"]

NSIG = 64
SIGSET_SIZE = 8
_SIGACTION = struct.Struct("<QQQQ")   # handler, flags, restorer, mask
_STACK = struct.Struct("<QIIQ")       # ss_sp, ss_flags, (padding), ss_size
SIG_DFL, SIG_IGN = 0, 1
SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
MINSIGSTKSZ = 2048
_UNTOUCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_IGNORED_BY_DEFAULT = (signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                       signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
"""Signals whose default action does not end the process (ignore, or stop/continue, which a
lone simulated process does as nothing)."""


class Killed(Stop):
    """The program sent itself a signal whose action is to terminate it: ``signal`` (its
    name) and ``signum``. The CPU stops as for an exit."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signal = signal_name(signum)
        self.signum = signum
        self.args = (f"killed by {self.signal}",)


@dataclass
class SignalState:
    """The process's signal actions (handler, flags, restorer, mask by signal number), its
    blocked mask and its alternate stack (sp, flags, size)."""

    actions: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    blocked: int = 0
    altstack: tuple[int, int, int] = (0, SS_DISABLE, 0)

    def rt_sigaction(self, space: AddressSpace, signum: int, act: int, oact: int,
                     size: int) -> int:
        """rt_sigaction(2): the old action to ``oact``, the new one from ``act``."""
        signum &= 0xFFFF_FFFF
        if size != SIGSET_SIZE or not 1 <= signum <= NSIG or \
                (act and signum in _UNTOUCHABLE):
            return -errno.EINVAL
        new = _SIGACTION.unpack(space.read(act, _SIGACTION.size)) if act else None
        if oact:
            space.write(oact, _SIGACTION.pack(*self.actions.get(signum, (SIG_DFL, 0, 0, 0))))
        if new is not None:
            self.actions[signum] = new
        return 0

    def rt_sigprocmask(self, space: AddressSpace, how: int, new: int, old: int,
                       size: int) -> int:
        """rt_sigprocmask(2): SIG_BLOCK, SIG_UNBLOCK or SIG_SETMASK; SIGKILL and SIGSTOP
        are never blocked."""
        if size != SIGSET_SIZE:
            return -errno.EINVAL
        mask = struct.unpack("<Q", space.read(new, 8))[0] if new else None
        if mask is not None and how & 0xFFFF_FFFF not in (0, 1, 2):
            return -errno.EINVAL
        if old:
            space.write(old, struct.pack("<Q", self.blocked))
        if mask is not None:
            blocked = {0: self.blocked | mask, 1: self.blocked & ~mask, 2: mask}[how & 0xFFFF_FFFF]
            self.blocked = blocked & ~_bits(_UNTOUCHABLE)
        return 0

    def sigaltstack(self, space: AddressSpace, new: int, old: int) -> int:
        """sigaltstack(2): the old stack to ``old``, the new one from ``new`` (flags 0,
        SS_ONSTACK or SS_DISABLE, with SS_AUTODISARM or not; ENOMEM below MINSIGSTKSZ)."""
        stack = _STACK.unpack(space.read(new, _STACK.size)) if new else None
        if stack is not None:
            _sp, flags, _pad, size = stack
            if flags & ~SS_AUTODISARM & 0xFFFF_FFFF not in (0, SS_ONSTACK, SS_DISABLE):
                return -errno.EINVAL
            if not flags & SS_DISABLE and size < MINSIGSTKSZ:
                return -errno.ENOMEM
        if old:
            sp0, flags0, size0 = self.altstack
            space.write(old, _STACK.pack(sp0, flags0, 0, size0))
        if stack is not None:
            self.altstack = (0, SS_DISABLE, 0) if stack[1] & SS_DISABLE else \
                (stack[0], stack[1] & SS_AUTODISARM, stack[3])
        return 0

    def send_self(self, signum: int) -> int:
        """A signal the program sends itself: raises :class:`Killed` when its default
        action terminates the process and nothing keeps it off (not ignored, not blocked,
        no handler); else 0. Signal 0 only checks that the process exists."""
        signum &= 0xFFFF_FFFF
        if not 0 <= signum <= NSIG:
            return -errno.EINVAL
        if signum == 0:
            return 0
        handler = self.actions.get(signum, (SIG_DFL,))[0]
        kept_off = handler != SIG_DFL or (self.blocked >> (signum - 1)) & 1
        if signum == signal.SIGKILL or not (kept_off or signum in _IGNORED_BY_DEFAULT):
            raise Killed(signum)
        return 0


def signal_name(signum: int) -> str:
    """"SIGABRT" for 6; "SIG40" for a number Python's ``signal`` has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def _bits(signums: tuple[int, ...]) -> int:
    """A sigset with ``signums``."""
    out = 0
    for n in signums:
        out |= 1 << (n - 1)
    return out
