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

from vmsim import AddressSpace
from vmsim.fuzz.contract import LoaderUnderTest, image_knobs, project_loader
from vmsim.fuzz.properties import check_malformed_load, check_valid_load

__all__ = ["KINDS", "PROJECT", "Kind", "Setup", "kind_named", "malformed_images"]


@dataclass(frozen=True)
class Setup:
    """What a campaign tests and draws from: ``load``, the loader under test (None: the
    project's, with its extra checks); ``relocations``, the relocation types synthetic images
    keep to (None: all; see ``vmsim.fuzz.contract.image_knobs``); ``paths``, the real files
    the "files" kind mutates."""

    load: LoaderUnderTest | None = None
    relocations: tuple[str, ...] | None = None
    paths: tuple[str, ...] = ()

    def knobs(self) -> dict[str, Any]:
        """The ``elf_images`` knobs for ``relocations``."""
        return image_knobs(self.relocations)


PROJECT = Setup()
"""The default setup: the project's loader on unrestricted synthetic images."""


@dataclass(frozen=True)
class Kind:
    """One kind of campaign. ``strategy(setup)`` builds the hypothesis strategy (the parent
    replays a finding's choices against the same one); ``payload(value)`` is (the file's
    bytes, a one-line note); ``check(value, scratch, setup)`` runs the property once on a
    fresh simulator with the setup's loader and returns the outcome ("loaded" or the
    refusal's name), a failing property raises; ``host``:
    how ``backend="both"`` checks it on the host: "batch" (the same property in forked
    batches), "compare" (host against simulator) or None."""

    name: str
    strategy: Callable[[Setup], Any]
    payload: Callable[[Any], tuple[bytes, str]]
    check: Callable[[Any, Path, Setup], str]
    host: Literal["batch", "compare"] | None


def malformed_images(knobs: dict[str, Any]) -> Any:
    """``malformed_elf`` over images drawn with ``knobs`` (none: its own default images,
    which carry imports and init arrays so that every mutation kind finds its target)."""
    from vmsim.fuzz.images import elf_images
    from vmsim.fuzz.malformed import malformed_elf

    return malformed_elf(elf_images(**knobs) if knobs else None)


def _malformed_strategy(setup: Setup) -> Any:
    return malformed_images(setup.knobs())


def _valid_strategy(setup: Setup) -> Any:
    """Images, and whether the project's loader reads this one from a file (a loader under
    test takes bytes only)."""
    from hypothesis import strategies as st

    from vmsim.fuzz.images import elf_images

    knobs = setup.knobs() or {"textrel": st.booleans()}
    return st.tuples(elf_images(**knobs), st.booleans() if setup.load is None else st.just(False))


def _rate_strategy(setup: Setup) -> Any:
    from vmsim.fuzz.images import elf_images

    return elf_images(**setup.knobs())


def _files_strategy(setup: Setup) -> Any:
    from vmsim.fuzz.realfiles import mutated_files

    return mutated_files(setup.paths)


def _check_file(value: Any, _scratch: Path, setup: Setup) -> str:
    """A real file, unchanged (property 1 with an oracle read by pyelftools) or mutated
    (property 2)."""
    from vmsim.fuzz.realfiles import check_file_load

    return check_file_load(value, AddressSpace(), loader=setup.load)


def _check_malformed(value: Any, _scratch: Path, setup: Setup) -> str:
    """Property 2 on the corrupted file."""
    return check_malformed_load(value.data, AddressSpace(), loader=setup.load)


def _check_valid(value: Any, scratch: Path, setup: Setup) -> str:
    """Property 1 on the image, from its bytes or (when drawn so) from a file."""
    image, from_file = value
    if from_file:
        scratch.write_bytes(image.data)
    check_valid_load(image, AddressSpace(), loader=setup.load,
                     source=str(scratch) if from_file else None)
    return "loaded"


def _only_load(value: Any, _scratch: Path, setup: Setup) -> str:
    """No property: the load alone (the throughput figure)."""
    (setup.load or project_loader)(value.data, AddressSpace())
    return "loaded"


KINDS: dict[str, Kind] = {
    "malformed": Kind("malformed", _malformed_strategy,
                      lambda v: (v.data, f"{v.kind}: {v.mutation}"), _check_malformed, "batch"),
    "valid": Kind("valid", _valid_strategy, lambda v: (v[0].data, ""), _check_valid,
                  "compare"),
    "files": Kind("files", _files_strategy, lambda v: (v.data, f"{v.kind}: {v.mutation}"),
                  _check_file, "batch"),
    "rate": Kind("rate", _rate_strategy, lambda v: (v.data, ""), _only_load, None),
}
"""Every kind a campaign can run: "malformed" (property 2 on ``malformed_elf``), "valid"
(property 1 on ``elf_images``, host against simulator with ``backend="both"``), "files" (the
real files of ``Setup.paths``, unchanged or with one field-aware corruption:
``vmsim.fuzz.realfiles``), "rate" (only
generate and load valid images on the simulator: the throughput figure)."""


def kind_named(name: str) -> Kind:
    """The kind called ``name``; ValueError naming the choices otherwise."""
    if name not in KINDS:
        raise ValueError(f"kind={name!r}: expected one of {', '.join(map(repr, KINDS))}")
    return KINDS[name]
