"""The kinds of campaign, as a table: each kind's strategy, its property, its host check.

Part of the fuzz kit (``vmsim.fuzz``). A campaign of one kind draws from :attr:`Kind.strategy`,
publishes :attr:`Kind.payload` (the file's bytes and a note) before each load, runs
:attr:`Kind.check` on a fresh simulator, and with ``backend="both"`` also checks the input on
the host the way :attr:`Kind.host` says. Hypothesis is imported only when a strategy is built
(in the worker, or when a finding is shrunk), so the parent and ``vmsim --help`` never need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import loader
from vmsim import AddressSpace
from vmsim.fuzz.properties import check_malformed_load, check_valid_load

__all__ = ["KINDS", "Kind", "kind_named"]


@dataclass(frozen=True)
class Kind:
    """One kind of campaign. ``strategy()`` builds the hypothesis strategy (the parent replays
    a finding's choices against the same one); ``payload(value)`` is (the file's bytes, a
    one-line note); ``check(value, scratch)`` runs the property once on a fresh simulator and
    returns the outcome ("loaded" or the ElfError's name), a failing property raises; ``host``:
    how ``backend="both"`` checks it on the host: "batch" (the same property in forked
    batches), "compare" (host against simulator) or None."""

    name: str
    strategy: Callable[[], Any]
    payload: Callable[[Any], tuple[bytes, str]]
    check: Callable[[Any, Path], str]
    host: Literal["batch", "compare"] | None


def _malformed_strategy() -> Any:
    from vmsim.fuzz.malformed import malformed_elf

    return malformed_elf()


def _valid_strategy() -> Any:
    from hypothesis import strategies as st

    from vmsim.fuzz.images import elf_images

    return st.tuples(elf_images(textrel=st.booleans()), st.booleans())


def _rate_strategy() -> Any:
    from vmsim.fuzz.images import elf_images

    return elf_images()


def _check_malformed(value: Any, _scratch: Path) -> str:
    """Property 2 on the corrupted file."""
    return check_malformed_load(value.data, AddressSpace())


def _check_valid(value: Any, scratch: Path) -> str:
    """Property 1 on the image, from its bytes or (when drawn so) from a file."""
    image, from_file = value
    if from_file:
        scratch.write_bytes(image.data)
    check_valid_load(image, AddressSpace(), source=str(scratch) if from_file else None)
    return "loaded"


def _only_load(value: Any, _scratch: Path) -> str:
    """No property: the load alone (the throughput figure)."""
    loader.load(value.data, AddressSpace())
    return "loaded"


KINDS: dict[str, Kind] = {
    "malformed": Kind("malformed", _malformed_strategy,
                      lambda v: (v.data, f"{v.kind}: {v.mutation}"), _check_malformed, "batch"),
    "valid": Kind("valid", _valid_strategy, lambda v: (v[0].data, ""), _check_valid,
                  "compare"),
    "rate": Kind("rate", _rate_strategy, lambda v: (v.data, ""), _only_load, None),
}
"""Every kind a campaign can run: "malformed" (property 2 on ``malformed_elf``), "valid"
(property 1 on ``elf_images``, host against simulator with ``backend="both"``), "rate" (only
generate and load valid images on the simulator: the throughput figure)."""


def kind_named(name: str) -> Kind:
    """The kind called ``name``; ValueError naming the choices otherwise."""
    if name not in KINDS:
        raise ValueError(f"kind={name!r}: expected one of {', '.join(map(repr, KINDS))}")
    return KINDS[name]
