"""What a campaign counts: :class:`CampaignStats` and the :class:`Finding` s in it.

Part of the fuzz kit (``vmsim.fuzz``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["BOUND_CLASSES", "CampaignStats", "Finding"]

BOUND_CLASSES = ("over-memory", "timeout")
"""Finding classes that mean an input went past a bound (the others are signal names)."""


@dataclass
class Finding:
    """An input that took its worker down. ``cls``: "over-memory", "timeout", "stalled" or
    the signal's name; ``backend``: "sim" or "host"; ``path``: the exact bytes; ``shrunk``:
    the reproducer hypothesis shrank it to (None when shrinking was off or did not reproduce);
    ``note``: what the input was (the mutation, for a malformed image)."""

    cls: str
    backend: str
    path: str | None
    shrunk: str | None = None
    note: str = ""

    def line(self) -> str:
        """One line for the summary."""
        where = self.path or "(no input in flight)"
        shrunk = f", shrunk: {self.shrunk}" if self.shrunk else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.cls} on {self.backend}: {where}{shrunk}{note}"


@dataclass
class CampaignStats:
    """Counts of one campaign: ``examples`` run, their ``outcomes`` (``"loaded"`` or an
    ElfError class name), ``host_examples`` checked in forked children, ``failures`` (property
    failures, shrunk by hypothesis, one line each), ``findings`` (inputs that took a worker
    down), ``classes`` (both, counted by class: "leaked-mapping", "violation", an exception's
    name, "over-memory", "timeout", a signal), ``repeats`` (how many more times each failure
    was found again), ``workers`` forked, ``interrupted`` by Ctrl-C."""

    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    host_examples: int = 0
    host_outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    workers: int = 0
    interrupted: bool = False
    seconds: float = 0.0

    def rate(self) -> float:
        """Examples per second."""
        return self.examples / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        """The progress line (the host's count only once the host has checked some)."""
        host = f", {self.host_examples} also on the host" if self.host_examples else ""
        return (f"{self.examples} examples, {self.rate():.0f}/s{host}, "
                f"failures {len(self.failures)}, findings {len(self.findings)}")

    def new_failure(self, text: str) -> bool:
        """Whether a property failure (its text, whose first line says what failed) is new;
        a repeat (each hypothesis round finds the same bug again, at other addresses) is
        counted, not kept. Two failures are the same when their first lines, up to a list
        of regions and at most 60 characters, differ only in numbers."""
        first = re.sub(r"0x[0-9a-f]+|\d+", "#", text.split("\n", 1)[0].split("[", 1)[0])[:60]
        if first in self.repeats:
            self.repeats[first] += 1
            return False
        self.repeats[first] = 0
        return True

    def count(self, cls: str) -> None:
        """Count one failure or finding of class ``cls``."""
        self.classes[cls] = self.classes.get(cls, 0) + 1
