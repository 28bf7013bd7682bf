"""What a campaign's worker and its parent share: the slot holding the input in flight (memory
shared across the fork) and the pipe of length-prefixed pickled messages.

Part of the fuzz kit (``vmsim.fuzz``), used by ``vmsim.fuzz.worker`` (which writes) and
``vmsim.fuzz.campaign`` (which reads). Before each load the worker publishes the input (its
bytes, its hypothesis choices, a one-line note) in the slot; if the parent must kill the
worker, the slot still holds what it was running.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import time
from typing import Any

__all__ = ["IDLE", "LOADING", "Inbox", "Slot", "send"]

_SLOT_BYTES = 64 << 20
_HEADER = struct.Struct("<dQQQQQ")
"""The shared slot's header: started (monotonic), data, choices and note lengths, sequence
number, state (1 while a load runs). seq and state come last: the worker writes them last."""
IDLE, LOADING = 0, 1


class Slot:
    """The worker's input in flight, in an anonymous MAP_SHARED mapping made before the fork
    (pages never touched cost nothing): what the parent saves when it must kill the worker."""

    def __init__(self, size: int = _SLOT_BYTES) -> None:
        self.mem = mmap.mmap(-1, size)
        self.seq = 0

    def close(self) -> None:
        """Unmap it."""
        self.mem.close()

    def begin(self, data: bytes, choices: bytes, note: bytes) -> None:
        """Publish the input about to be loaded (the bytes cut to fit, choices and note then
        dropped: the exact bytes matter most) and mark a load as running since now."""
        room = len(self.mem) - _HEADER.size
        if len(data) + len(choices) + len(note) > room:
            data, choices, note = data[:room], b"", b""
        at = _HEADER.size
        for blob in (data, choices, note):
            self.mem[at:at + len(blob)] = blob
            at += len(blob)
        self.seq += 1
        _HEADER.pack_into(self.mem, 0, time.monotonic(), len(data), len(choices), len(note),
                          self.seq, LOADING)

    def end(self) -> None:
        """Mark the load as finished."""
        struct.pack_into("<Q", self.mem, _HEADER.size - 8, IDLE)

    def header(self) -> tuple[float, int, int]:
        """(started, seq, state) as the worker last wrote them."""
        started, _d, _c, _n, seq, state = _HEADER.unpack_from(self.mem, 0)
        return started, seq, state

    def contents(self) -> tuple[int, bytes, bytes, str]:
        """(state, data, choices, note) of the last input published."""
        _t, nd, nc, nn, _seq, state = _HEADER.unpack_from(self.mem, 0)
        at = _HEADER.size
        data = bytes(self.mem[at:at + nd])
        choices = bytes(self.mem[at + nd:at + nd + nc])
        note = bytes(self.mem[at + nd + nc:at + nd + nc + nn]).decode(errors="replace")
        return state, data, choices, note


_LENGTH = struct.Struct("<I")


def send(fd: int, message: tuple[Any, ...]) -> None:
    """Write one length-prefixed pickled message to the pipe."""
    blob = pickle.dumps(message)
    view = memoryview(_LENGTH.pack(len(blob)) + blob)
    while view:
        view = view[os.write(fd, view):]


class Inbox:
    """Reassembles the worker's messages from whatever chunks the pipe returns."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[Any, ...]]:
        """Add ``chunk``; return the messages now complete."""
        self.buffer += chunk
        out = []
        while len(self.buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < _LENGTH.size + size:
                break
            out.append(pickle.loads(self.buffer[_LENGTH.size:_LENGTH.size + size]))
            self.buffer = self.buffer[_LENGTH.size + size:]
        return out
