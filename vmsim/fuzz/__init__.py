"""The fuzzer: everything that generates ELF files and address-space operations, checks what a
loader does with them, and runs it as a supervised campaign (``vmsim fuzz``).

A map of the package, from the bottom up:

=====================  ========================================================================
``elfwriter``          writes ELF64 x86-64 objects from a small description (:class:`ElfSpec`
                       -> :class:`ElfImage`: the bytes and what a correct loader must produce)
``knobs``              argument checks shared by the public strategies (value or strategy)
``images``             hypothesis strategies for valid images: ``elf_specs``, ``elf_images``
``malformed``          ``malformed_elf``: a valid image with one field-aware corruption; a
                       table of mutators, one per kind of ``MUTATION_KINDS``
``realfiles``          ``mutated_files``: real ELF files with one field-aware corruption, and
                       ``check_file_load``, their property (an oracle read by pyelftools)
``ops``                strategies for address-space operations (``ops``, ``op_sequences``)
                       and ``apply_op``, which runs one on any ``Mmap`` backend
``checking``           :class:`CheckingMmap`: a wrapper proving the loader stays inside what it
                       obtained and writes only pages it made writable (:class:`Violation`)
``properties``         the properties: ``check_valid_load``, ``check_malformed_load``,
                       ``check_same_on_both``, ``check_plan_predicts_map``
``contract``           the loader under test: any ``f(data, mm) -> load bias``;
                       :func:`project_loader` (ours behind it), refusals, ``--loader`` names
``suite``              :func:`check_loader`: the properties as one hypothesis test, for a
                       student's own pytest file
``targets``            the properties as a pytest module for HypoFuzz (``hypothesis fuzz``)
                       with a shared example database; not imported by the package
``kinds``              the table of campaign kinds: each kind's strategy, property, host check
``channel``            the slot (shared memory) and pipe between a worker and its parent
``worker``             the forked worker: hypothesis rounds, host batches
``stats``              :class:`CampaignStats` and :class:`Finding`
``campaign``           :func:`run_campaign`: the parent, which bounds each input, saves and
                       shrinks findings, and forks a new worker when one dies
``command``            ``vmsim fuzz``'s arguments and summary (``python -m vmsim.fuzz``)
=====================  ========================================================================

The strategies keep their public names: ``loader.strategies`` (images) and
``vmsim.strategies`` (operations) re-export them, and the hypothesis entry point
``vmsim._hypothesis_plugin`` registers their types. Hypothesis is imported only by the
strategy modules and inside the worker, so importing this package does not need it. The
supervisor that bounds each input, ``loader.isolate.run_isolated`` (a function in a forked
child under a memory and a time bound), lives beside the loader, whose ``loader.compare`` runs
host loads with it.
"""

from vmsim.fuzz.campaign import run_campaign, shrink_finding
from vmsim.fuzz.checking import CheckingMmap, Violation
from vmsim.fuzz.command import main
from vmsim.fuzz.contract import LoaderUnderTest, image_knobs, loader_named, project_loader
from vmsim.fuzz.elfwriter import ElfImage, ElfSpec
from vmsim.fuzz.properties import (
    check_malformed_load,
    check_plan_predicts_map,
    check_same_on_both,
    check_valid_load,
    expected_page_perms,
    failure_class,
)
from vmsim.fuzz.stats import BOUND_CLASSES, CampaignStats, Finding
from vmsim.fuzz.suite import check_loader

__all__ = [
    "BOUND_CLASSES",
    "CampaignStats",
    "CheckingMmap",
    "ElfImage",
    "ElfSpec",
    "Finding",
    "LoaderUnderTest",
    "Violation",
    "check_loader",
    "check_malformed_load",
    "check_plan_predicts_map",
    "check_same_on_both",
    "check_valid_load",
    "expected_page_perms",
    "failure_class",
    "image_knobs",
    "loader_named",
    "main",
    "project_loader",
    "run_campaign",
    "shrink_finding",
]
