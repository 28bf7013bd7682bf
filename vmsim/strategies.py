"""The hypothesis strategies for address-space operations, under their public name (users'
tests and the hypothesis entry point import it). They live in the fuzz kit:
:mod:`vmsim.fuzz.ops`; see :mod:`vmsim.fuzz` for the map."""

from vmsim.fuzz.ops import (
    OP_KINDS,
    PLACEMENTS,
    MmapOp,
    MprotectOp,
    MunmapOp,
    Op,
    ReadOp,
    WriteOp,
    apply_op,
    op_sequences,
    ops,
)

__all__ = [
    "OP_KINDS",
    "PLACEMENTS",
    "MmapOp",
    "MprotectOp",
    "MunmapOp",
    "Op",
    "ReadOp",
    "WriteOp",
    "apply_op",
    "op_sequences",
    "ops",
]
