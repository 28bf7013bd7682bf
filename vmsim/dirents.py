"""Directory entries for ``getdents64``: a host directory the program opened, read as the
kernel hands it out (``struct linux_dirent64`` records).

Part of ``vmsim``'s process layer (``vmsim.syscalls``). The entries are the host's: "." and
"..", then what ``os.scandir`` lists (the file system's own order, as readdir gives it), each
with its inode number and type. A record is ``d_ino`` (u64), ``d_off`` (the position after it,
here its index + 1), ``d_reclen`` (u16, a multiple of 8), ``d_type`` (u8), the NUL-terminated
name, padding.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator

__all__ = ["Directory"]

_HEAD = struct.Struct("<QqHB")   # d_ino, d_off, d_reclen, d_type; the name follows
_DT = {stat.S_IFIFO: 1, stat.S_IFCHR: 2, stat.S_IFDIR: 4, stat.S_IFBLK: 6, stat.S_IFREG: 8,
       stat.S_IFLNK: 10, stat.S_IFSOCK: 12}
"""d_type by the file type bits of st_mode (DT_UNKNOWN, 0, for anything else)."""


def record(ino: int, position: int, kind: int, name: bytes) -> bytes:
    """One ``linux_dirent64``, padded to 8 bytes."""
    size = (_HEAD.size + len(name) + 1 + 7) & ~7
    return _HEAD.pack(ino, position, size, kind) + name.ljust(size - _HEAD.size, b"\0")


class Directory:
    """The entries of the directory open as host descriptor ``fd``, handed out in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._entries: Iterator[tuple[int, int, bytes]] = iter(())
        self._next: bytes | None = None
        self._position = 0
        self.rewind()

    def rewind(self) -> None:
        """Start again from the first entry (lseek to 0, as rewinddir does)."""
        self._entries = self._scan()
        self._next, self._position = None, 0

    def _scan(self) -> Iterator[tuple[int, int, bytes]]:
        """(inode, d_type, name) of ".", "..", then each entry."""
        for name, st in ((b".", os.stat(self.fd)), (b"..", os.stat("..", dir_fd=self.fd))):
            yield st.st_ino, _DT.get(stat.S_IFMT(st.st_mode), 0), name
        with os.scandir(self.fd) as listing:
            for entry in listing:
                mode = entry.stat(follow_symlinks=False).st_mode
                yield entry.inode(), _DT.get(stat.S_IFMT(mode), 0), os.fsencode(entry.name)

    def read(self, room: int) -> bytes:
        """As many whole records as fit in ``room`` bytes (b"" at the end). ValueError when
        the next one does not fit at all (getdents64 says EINVAL)."""
        out = bytearray()
        while True:
            if self._next is None:
                entry = next(self._entries, None)
                if entry is None:
                    return bytes(out)
                self._position += 1
                ino, kind, name = entry
                self._next = record(ino, self._position, kind, name)
            if len(out) + len(self._next) > room:
                if not out:
                    raise ValueError("the buffer cannot hold one entry")
                return bytes(out)
            out += self._next
            self._next = None
