"""The malformed-input campaign with every mutation kind, on both backends, counted: on the
simulator each input runs in the campaign's supervised worker under the memory and time bound;
on the host, in forked children (batches, each under the same bounds).

Three counts must be 0: exceptions other than ElfError/MmapError, mappings left behind, inputs
past a bound (memory, time) or killing their process. The number of inputs comes from
``VMSIM_FUZZ_CAMPAIGN_INPUTS`` (default 300, part of the default run); the 100,000-input
campaign is the ``slow`` one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsim.fuzz import BOUND_CLASSES, CampaignStats, run_campaign

INPUTS = int(os.environ.get("VMSIM_FUZZ_CAMPAIGN_INPUTS", "300"))


def counts(stats: CampaignStats) -> dict[str, int]:
    """The three counts that must be 0, from a campaign's classes of failures and findings."""
    bounds = sum(n for cls, n in stats.classes.items()
                 if cls in BOUND_CLASSES or cls.startswith("SIG") or cls == "stalled")
    leaks = stats.classes.get("leaked-mapping", 0)
    return {"exceptions": sum(stats.classes.values()) - bounds - leaks, "leaked": leaks,
            "over the bound": bounds}


def _campaign(inputs: int, out: Path) -> CampaignStats:
    stats = run_campaign(3600 + inputs / 5, kind="malformed", backend="both", out_dir=out,
                         max_examples=inputs, host_batch=min(500, max(50, inputs // 6)),
                         shrink_seconds=5)
    print(f"{stats.line()}; classes {stats.classes}")
    for line in stats.failures + [f.line() for f in stats.findings]:
        print(" ", line)
    return stats


def _check(stats: CampaignStats, inputs: int) -> None:
    assert stats.examples >= inputs
    assert stats.host_examples >= inputs - len(stats.findings)
    assert counts(stats) == {"exceptions": 0, "leaked": 0, "over the bound": 0}, (
        stats.failures, [f.line() for f in stats.findings])


def test_malformed_campaign_counts_nothing_bad(tmp_path: Path) -> None:
    _check(_campaign(INPUTS, tmp_path), INPUTS)


@pytest.mark.slow
def test_malformed_campaign_of_100000_inputs_counts_nothing_bad(tmp_path: Path) -> None:
    _check(_campaign(100_000, tmp_path), 100_000)
