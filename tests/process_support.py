"""Hand-written x86-64 code for vmsim.Process tests, assembled at test time with this
machine's ``as`` (Intel syntax): no committed binaries."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

import vmsim

PROT_RX = 5


@functools.cache
def assemble(source: str) -> tuple[bytes, dict[str, int]]:
    """The bytes of ``source``'s .text and the offsets of its labels."""
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        (where / "t.s").write_text(".intel_syntax noprefix\n.text\n" + source + "\n")
        subprocess.run(["as", "--64", "-o", "t.o", "t.s"], cwd=where, check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "t.o", "t.bin"], cwd=where,
                       check=True)
        nm = subprocess.run(["nm", "t.o"], cwd=where, check=True, capture_output=True,
                            text=True).stdout.split()
        labels = {nm[k + 2]: int(nm[k], 16) for k in range(0, len(nm), 3)}
        return (where / "t.bin").read_bytes(), labels


def load_code(proc: vmsim.Process, source: str) -> tuple[int, dict[str, int]]:
    """``source`` assembled into a new r-x mapping of ``proc``: its address and the
    addresses of its labels."""
    code, labels = assemble(source)
    addr = proc.alloc(code)
    proc.space.mprotect(addr, len(code), PROT_RX)
    return addr, {name: addr + offset for name, offset in labels.items()}
