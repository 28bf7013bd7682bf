"""The rseq system call of a simulated process: restartable sequences, registered as Linux 6.x
checks them.

Part of ``vmsim``'s process layer (``vmsim.syscalls`` dispatches to it). A thread registers one
``struct rseq`` area; the kernel writes the CPU it runs on there and aborts the thread's
critical sections when it is preempted. The simulated process has one thread on one CPU that
nothing preempts, so the area gets CPU 0 and no critical section is ever aborted.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from vmsim.execve import RSEQ_ALIGN, RSEQ_FEATURE_SIZE
from vmsim.space import AddressSpace

__all__ = ["Rseq"]

RSEQ_FLAG_UNREGISTER = 1
ORIG_RSEQ_SIZE = 32
CPU_ID_UNINITIALIZED = 0xFFFF_FFFF   # -1


@dataclass
class Rseq:
    """The thread's registered area: (address, length, signature), or None."""

    area: tuple[int, int, int] | None = None

    def call(self, space: AddressSpace, area: int, length: int, flags: int, sig: int) -> int:
        """rseq(2): register the thread's area (once: the same one again is EBUSY, another
        EINVAL, a wrong signature EPERM) or, with RSEQ_FLAG_UNREGISTER, unregister it. A
        registered area gets cpu_id_start, cpu_id, node_id and mm_cid (all 0: one CPU); an
        unregistered one cpu_id -1. (Linux sends SIGSEGV when the area cannot be written;
        here that is -EFAULT.)"""
        length, sig, flags = length & 0xFFFF_FFFF, sig & 0xFFFF_FFFF, flags & 0xFFFF_FFFF
        if flags & RSEQ_FLAG_UNREGISTER:
            if flags != RSEQ_FLAG_UNREGISTER or self.area is None or \
                    self.area[:2] != (area, length):
                return -errno.EINVAL
            if self.area[2] != sig:
                return -errno.EPERM
            _update(space, area, cpu=CPU_ID_UNINITIALIZED)
            self.area = None
            return 0
        if flags:
            return -errno.EINVAL
        if self.area is not None:
            if self.area[:2] != (area, length):
                return -errno.EINVAL
            return -errno.EPERM if self.area[2] != sig else -errno.EBUSY
        if not _fits(area, length):
            return -errno.EINVAL
        if area + length > space.task_size:
            return -errno.EFAULT
        _update(space, area, cpu=0)
        self.area = (area, length, sig)
        return 0


def _update(space: AddressSpace, area: int, cpu: int) -> None:
    """What Linux writes into an area it registers (on the way back to user space) or
    unregisters: cpu_id_start 0, cpu_id ``cpu``, node_id and mm_cid 0."""
    space.write(area, struct.pack("<II", 0, cpu))
    space.write(area + 20, struct.pack("<II", 0, 0))


def _fits(area: int, length: int) -> bool:
    """Linux's check of a new area: the original 32 bytes aligned to 32, or at least the
    features this kernel knows (AT_RSEQ_FEATURE_SIZE) aligned to AT_RSEQ_ALIGN."""
    if length == ORIG_RSEQ_SIZE:
        return area % ORIG_RSEQ_SIZE == 0
    return length >= RSEQ_FEATURE_SIZE and area % RSEQ_ALIGN == 0
