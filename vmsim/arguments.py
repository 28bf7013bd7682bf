"""Command-line arguments checked the same way in every verb of ``vmsim``.

Part of the testbed's command layer: ``vmsim.cli`` and ``vmsim.fuzz`` both parse with
:class:`OneLineParser` (a usage error is one line, exit 2) and check every number with
:class:`Bounded`. Imports nothing from the project.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import NoReturn

__all__ = ["FUZZ_SECONDS", "USAGE_EXIT", "Bounded", "OneLineParser"]

USAGE_EXIT = 2
"""The exit status of a usage error (as argparse and most tools use)."""


@dataclass(frozen=True)
class Bounded:
    """One numeric command-line value: parsed (``int`` takes decimal or 0x-hex, ``float``
    decimal), then checked finite, within ``[lo, hi]`` (``lo`` itself excluded when
    ``open_lo``) and a multiple of ``step``. Used as an argparse ``type`` (the error names the
    argument) and by :meth:`check` for values parsed elsewhere. Every numeric argument of
    every verb goes through this one class."""

    kind: type[int] | type[float]
    lo: float
    hi: float
    unit: str = ""
    step: int = 1
    open_lo: bool = False
    example: str = ""

    def __call__(self, text: str) -> int | float:
        """Parse and check ``text``; argparse.ArgumentTypeError saying what is wrong."""
        try:
            value: int | float = int(text, 0) if self.kind is int else float(text)
        except ValueError:
            want = "an integer (decimal or 0x-hex)" if self.kind is int else "a number"
            hint = f", e.g. {self.example}" if self.example else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}{hint}") from None
        return self.check(value)

    def check(self, value: int | float) -> int | float:
        """``value`` when it is within bounds; argparse.ArgumentTypeError otherwise."""
        shown = self._show(value)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{shown} is not a finite number")
        low_ok = value > self.lo if self.open_lo else value >= self.lo
        problems = [] if low_ok and value <= self.hi else [f"out of range: {self._range()}"]
        if self.step > 1 and int(value) % self.step:
            problems.append(f"not a multiple of the page size {self.step:#x} (not page "
                            f"aligned)")
        if problems:
            raise argparse.ArgumentTypeError(f"{shown} is {'; and '.join(problems)}")
        return value

    def _show(self, value: float) -> str:
        """The value as the user would write it (hex for addresses)."""
        return f"{int(value):#x}" if self.step > 1 and math.isfinite(value) else f"{value:g}"

    def _range(self) -> str:
        """``must be > 0 and <= 604800 s`` / ``must be in [0x10000, 0x7fffffffffff]``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.step > 1:
            return f"must be in [{int(self.lo):#x}, {int(self.hi):#x}]{unit}"
        if self.open_lo:
            return f"must be > {self.lo:g} and <= {self.hi:g}{unit}"
        return f"must be in [{self.lo:g}, {self.hi:g}]{unit}"


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as one line on stderr (exit 2), naming the argument."""

    def error(self, message: str) -> NoReturn:
        """Print ``vmsim VERB: MESSAGE (see vmsim VERB --help)`` and exit 2."""
        self.exit(USAGE_EXIT, f"{self.prog}: {message} (see '{self.prog} --help')\n")



FUZZ_SECONDS = Bounded(float, 0.0, 7 * 24 * 3600.0, unit="s", open_lo=True, example="30")
"""--time of vmsim fuzz: the whole campaign's time."""
