"""The properties as one hypothesis test, for a loader under test: :func:`check_loader`.

Part of the fuzz kit (``vmsim.fuzz``). A student writes a loader against the ``Mmap``
interface (``f(data, mm) -> load bias``, see ``vmsim.fuzz.contract``) and tests it from an
ordinary pytest file::

    from vmsim.fuzz import check_loader

    def test_my_loader():
        check_loader(my_loader, relocations=["RELATIVE"])

Each example is either a valid synthetic image (property 1: the map, the bytes, RELRO, the
calls) or a malformed one (property 2: load or refuse, never leak). A failure is the shrunk
example hypothesis found, raised as the test's failure.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from vmsim.fuzz.contract import LoaderUnderTest, image_knobs
from vmsim.fuzz.kinds import malformed_images
from vmsim.fuzz.properties import check_malformed_load, check_same_on_both, check_valid_load

__all__ = ["CASE_KINDS", "check_case", "check_loader", "loader_cases"]

CASE_KINDS = ("valid", "malformed")
"""The kinds of example :func:`loader_cases` draws."""


def loader_cases(relocations: Collection[str] | None = None,
                 kinds: Collection[str] = CASE_KINDS) -> Any:
    """A strategy of ``(kind, image)``: ``("valid", ElfImage)`` or ``("malformed",
    MalformedImage)``, both kept within ``relocations`` (see
    :func:`vmsim.fuzz.contract.image_knobs`)."""
    from hypothesis import strategies as st

    from vmsim.fuzz.images import elf_images

    unknown = sorted(set(kinds) - set(CASE_KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds {unknown or '(none)'}: expected some of {CASE_KINDS}")
    knobs = image_knobs(relocations)
    options = []
    if "valid" in kinds:
        options.append(st.tuples(st.just("valid"), elf_images(**knobs)))
    if "malformed" in kinds:
        options.append(st.tuples(st.just("malformed"), malformed_images(knobs)))
    return st.one_of(options)


def check_case(case: tuple[str, Any], load: LoaderUnderTest | None,
               backend: Literal["sim", "both"] = "sim") -> str:
    """One example of :func:`loader_cases` checked with ``load`` on a fresh simulator (and,
    with ``backend="both"``, on the host in forked children); the outcome."""
    from loader.compare import run_host
    from loader.libc import LibcMmap
    from vmsim import AddressSpace

    kind, image = case
    if kind == "valid":
        if backend == "both":
            check_same_on_both(image, AddressSpace, loader=load)
        else:
            check_valid_load(image, AddressSpace(), loader=load)
        return "loaded"
    outcome = check_malformed_load(image.data, AddressSpace(), loader=load)
    if backend == "both":
        run_host(lambda: check_malformed_load(image.data, LibcMmap(), loader=load),
                 source=image.data)
    return outcome


def check_loader(load: LoaderUnderTest, *, relocations: Collection[str] | None = None,
                 backend: Literal["sim", "both"] = "sim", max_examples: int = 200,
                 kinds: Collection[str] = CASE_KINDS, settings: Any = None) -> None:
    """Run the properties against ``load`` as one hypothesis test of ``max_examples``
    examples; a failure raises hypothesis' shrunk example (a ``Violation`` says which property
    and where). ``relocations`` keeps the synthetic images within what the loader supports
    (e.g. ``["RELATIVE"]``); ``backend="both"`` also runs every example on the host, in forked
    children; ``kinds`` picks valid and/or malformed images; ``settings`` (a
    ``hypothesis.settings``) is the base for the test's settings (its database, its
    verbosity...), else the active profile."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as Settings

    strategy = loader_cases(relocations, kinds)

    @Settings(settings, max_examples=max_examples, deadline=None, report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def properties_hold(case: tuple[str, Any]) -> None:
        check_case(case, load, backend)

    properties_hold()
