"""Wrappers around any ``Mmap``: ``TracingMmap`` records every call, ``CopyingMmap`` forces
the ``need_copy`` path.

Part of the ``loader`` layer (imports only ``loader.mmap``). A trace is the list of calls
a load made, with arguments and result or errno; two backends loading the same file at the
same address must give equal traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from loader.mmap import MapFlags, Mapping, Mmap, MmapError, ProtFlags, Region

__all__ = ["Call", "CopyingMmap", "TracingMmap"]


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded call: ``op``, its arguments (ints, None, bools), and ``result`` (an int
    address, None) or ``errno`` when it failed."""

    op: str
    args: tuple[tuple[str, Any], ...]
    result: Any = None
    errno: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"op": ..., <args>..., "result": ...}`` (``"errno"`` on failure)."""
        out: dict[str, Any] = {"op": self.op, **dict(self.args)}
        if self.errno is not None:
            out["errno"] = self.errno
        else:
            out["result"] = self.result
        return out


@dataclass
class TracingMmap:
    """An Mmap that forwards every call to ``inner`` and appends a :class:`Call` to ``calls``.

    Reads are not recorded (they change nothing); writes record address and length only.
    """

    inner: Mmap
    calls: list[Call] = field(default_factory=list)

    @property
    def page_size(self) -> int:
        """The wrapped backend's page size."""
        return self.inner.page_size

    @property
    def runs_code(self) -> bool:
        """The wrapped backend's capability to run what it maps."""
        return self.inner.runs_code

    def _run(self, op: str, args: dict[str, Any], fn: Any, *call_args: Any) -> Any:
        """Call ``fn`` and record it; MmapError is recorded and re-raised."""
        try:
            result = fn(*call_args)
        except MmapError as exc:
            self.calls.append(Call(op, tuple(args.items()), errno=exc.errno))
            raise
        shown = result.addr if isinstance(result, Mapping) else result
        if isinstance(result, Mapping):
            args = {**args, "need_copy": result.need_copy}
        self.calls.append(Call(op, tuple(args.items()), shown))
        return result

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """Forward and record mmap."""
        args = {"addr": addr, "length": length, "prot": int(prot), "flags": int(flags),
                "offset": offset, "fd": fd}
        result: Mapping = self._run("mmap", args, self.inner.mmap, addr, length, prot, flags,
                                    offset, fd)
        return result

    def mmap_anonymous(self, addr: int, length: int, prot: ProtFlags, flags: MapFlags) -> int:
        """Forward and record mmap_anonymous."""
        args = {"addr": addr, "length": length, "prot": int(prot), "flags": int(flags)}
        return int(self._run("mmap_anonymous", args, self.inner.mmap_anonymous, addr, length,
                             prot, flags))

    def munmap(self, addr: int, length: int) -> None:
        """Forward and record munmap."""
        self._run("munmap", {"addr": addr, "length": length}, self.inner.munmap, addr, length)

    def mprotect(self, addr: int, length: int, prot: ProtFlags) -> None:
        """Forward and record mprotect."""
        self._run("mprotect", {"addr": addr, "length": length, "prot": int(prot)},
                  self.inner.mprotect, addr, length, prot)

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        """Forward and record mmap_reserve."""
        return int(self._run("mmap_reserve", {"addr": addr, "length": length,
                                              "use_file": use_file},
                             self.inner.mmap_reserve, addr, length, use_file))

    def read(self, addr: int, n: int) -> bytes:
        """Forward read (not recorded)."""
        return self.inner.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        """Forward and record write (address and length, not the bytes)."""
        self._run("write", {"addr": addr, "length": len(data)}, self.inner.write, addr, data)

    def write_words(self, addrs: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Forward and record write_words (count and address range)."""
        lo = int(addrs.min()) if len(addrs) else 0
        hi = int(addrs.max()) + 8 if len(addrs) else 0
        self._run("write_words", {"addr": lo, "end": hi, "count": len(addrs)},
                  self.inner.write_words, addrs, values)

    def maps(self) -> list[Region]:
        """Forward maps (not recorded)."""
        return self.inner.maps()


@dataclass
class CopyingMmap(TracingMmap):
    """A TracingMmap that refuses to map files: every file mmap becomes writable anonymous
    memory answered with ``need_copy=True``, as a backend without files would. It exercises
    the loader's copy path on any backend."""

    def mmap(self, addr: int | None, length: int, prot: ProtFlags, flags: MapFlags,
             offset: int, fd: int | None) -> Mapping:
        """File mappings become anonymous read-write ones with need_copy; others pass."""
        if fd is None or flags & MapFlags.MAP_ANONYMOUS:
            return super().mmap(addr, length, prot, flags, offset, fd)
        anon = (flags & ~MapFlags.MAP_SHARED_VALIDATE) | MapFlags.MAP_PRIVATE | \
            MapFlags.MAP_ANONYMOUS
        got = super().mmap(addr, length, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE, anon,
                           0, None)
        return Mapping(got.addr, True)
