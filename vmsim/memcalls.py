"""The memory system calls of a simulated process: the mmap family, through the same
``vmsim.kernel.Kernel`` calls as the ``Mmap`` methods of :class:`~vmsim.AddressSpace`, and
futex, a wait on a word of memory.

Part of ``vmsim``'s process layer (``vmsim.syscalls`` dispatches to these). Each function
takes the process's space first and returns the syscall's result; a refused call raises
``MmapError``, which the dispatcher turns into ``-errno``.
"""

from __future__ import annotations

import errno

from vmsim.space import AddressSpace
from vmsim.syscall_args import MAP_ANON
from vmsim.syscall_args import as_int_arg as c_int

__all__ = ["futex", "mmap", "mprotect", "mremap", "munmap"]

_FUTEX_CMD = 0x7F   # the operation, without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME
_FUTEX_WAITS, _FUTEX_WAKES = (0, 9), (1, 10)   # WAIT, WAIT_BITSET; WAKE, WAKE_BITSET


def mmap(space: AddressSpace, host: int, addr: int, length: int, prot: int, flags: int,
         off: int) -> int:
    """mmap(2); ``host`` is the host descriptor behind the program's fd (-1: none, EBADF
    for a file mapping)."""
    if not c_int(flags) & MAP_ANON and host < 0:
        return -errno.EBADF
    return space.kernel.mmap(addr, length, c_int(prot), c_int(flags), off,
                             -1 if c_int(flags) & MAP_ANON else host)


def munmap(space: AddressSpace, addr: int, length: int) -> int:
    """munmap(2)."""
    space.kernel.munmap(addr, length)
    return 0


def mprotect(space: AddressSpace, addr: int, length: int, prot: int) -> int:
    """mprotect(2)."""
    space.kernel.mprotect(addr, length, c_int(prot))
    return 0


def mremap(space: AddressSpace, addr: int, old_len: int, new_len: int, flags: int,
           new_addr: int) -> int:
    """mremap(2) (its flags are an unsigned long)."""
    return space.kernel.mremap(addr, old_len, new_len, flags, new_addr)


def futex(space: AddressSpace, uaddr: int, op: int, val: int, timeout: int, _uaddr2: int,
          _val3: int) -> int:
    """futex(2) for the one thread there is: a wake wakes nobody (0); a wait returns EAGAIN
    when the word is no longer ``val``, ETIMEDOUT with a timeout, else EINTR (a lone thread
    would sleep forever: the caller's retry loop runs into the time limit instead); other
    operations ENOSYS."""
    cmd = c_int(op) & _FUTEX_CMD
    if cmd in _FUTEX_WAKES:
        return 0
    if cmd not in _FUTEX_WAITS:
        return -errno.ENOSYS
    word = int.from_bytes(space.read(uaddr, 4), "little")
    if word != val & 0xFFFF_FFFF:
        return -errno.EAGAIN
    return -errno.ETIMEDOUT if timeout else -errno.EINTR
