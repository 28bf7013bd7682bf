"""``vmsim fuzz``: the command line of the campaign (``vmsim.cli`` dispatches here; also
``python -m vmsim.fuzz``).

Part of the fuzz kit (``vmsim.fuzz``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vmsim.arguments import FUZZ_SECONDS, Bounded, OneLineParser
from vmsim.fuzz.campaign import (
    DEFAULT_INPUT_TIMEOUT,
    DEFAULT_MAX_RSS,
    DEFAULT_SHRINK_SECONDS,
    run_campaign,
)
from vmsim.fuzz.kinds import KINDS
from vmsim.fuzz.stats import CampaignStats

__all__ = ["main", "parser"]

MAX_RSS_MIB = Bounded(float, 1.0, float(1 << 20), unit="MiB", example="512")
"""--max-rss of vmsim fuzz."""
INPUT_SECONDS = Bounded(float, 0.0, 3600.0, unit="s", open_lo=True, example="5")
"""--input-timeout of vmsim fuzz."""
SHRINK_SECONDS = Bounded(float, 0.0, 3600.0, unit="s", example="20")
"""--shrink-time of vmsim fuzz (0: save the exact bytes only)."""


def parser() -> argparse.ArgumentParser:
    """``vmsim fuzz`` arguments."""
    p = OneLineParser(prog="vmsim fuzz", description="Run the loader's properties "
                                "as a hypothesis campaign, with a live progress line; on a "
                                "failure print the shrunk example and save its ELF file. Each "
                                "input runs under a memory and a time bound in a supervised "
                                "worker: an input past a bound (or one that kills the worker) "
                                "is saved, shrunk and reported, and the campaign goes on.")
    p.add_argument("--time", type=FUZZ_SECONDS, default=60.0, metavar="S",
                   help="seconds to run each property (default 60)")
    p.add_argument("--backend", choices=["sim", "both"], default="sim",
                   help="sim: the simulator only; both: also the host, in forked children")
    p.add_argument("--property", choices=[*KINDS, "all"], default="all",
                   dest="kind", help="which property to run (default: all); rate: no "
                   "property, only generate and load valid images on the simulator, to "
                   "measure images/s")
    p.add_argument("--out", type=Path, default=Path("vmsim-fuzz-failures"),
                   help="where failing ELF files are saved (default ./vmsim-fuzz-failures)")
    p.add_argument("--max-rss", type=MAX_RSS_MIB, default=DEFAULT_MAX_RSS / (1 << 20),
                   metavar="MIB", help="memory one input may take, in MiB (default "
                   f"{DEFAULT_MAX_RSS >> 20})")
    p.add_argument("--input-timeout", type=INPUT_SECONDS, default=DEFAULT_INPUT_TIMEOUT,
                   metavar="S", help="seconds one input may run (default "
                   f"{DEFAULT_INPUT_TIMEOUT:g})")
    p.add_argument("--shrink-time", type=SHRINK_SECONDS, default=DEFAULT_SHRINK_SECONDS,
                   metavar="S", help="seconds to shrink each input past a bound (default "
                   f"{DEFAULT_SHRINK_SECONDS:g}; 0: save the exact bytes only)")
    return p


def _summary(kind: str, stats: CampaignStats) -> None:
    """Print one campaign's summary: the progress line, outcomes, failures, findings."""
    print(f"\r  {stats.line()} in {stats.seconds:.1f}s   ", file=sys.stderr)
    print(f"  outcomes: {dict(sorted(stats.outcomes.items()))}")
    if stats.host_outcomes:
        print(f"  host outcomes: {dict(sorted(stats.host_outcomes.items()))}")
    for failure in stats.failures:
        print(f"  FAILURE: {failure}")
    for finding in stats.findings:
        print(f"  FINDING: {finding.line()}")


def main(argv: Sequence[str] | None = None) -> int:
    """``vmsim fuzz [--time S] [--backend sim|both] [--property ...]``: exit 0 when no
    property failed and no input went past a bound, 1 otherwise, 130 on Ctrl-C (after the
    summary so far, without a traceback)."""
    args = parser().parse_args(argv)
    kinds = ["valid", "malformed"] if args.kind == "all" else [args.kind]
    failed = 0

    def progress(stats: CampaignStats) -> None:
        print(f"\r  {stats.line()}   ", end="", file=sys.stderr, flush=True)

    try:
        for kind in kinds:
            print(f"vmsim fuzz: {kind} images on {args.backend} for {args.time:g}s",
                  file=sys.stderr)
            stats = run_campaign(args.time, kind=kind, backend=args.backend, out_dir=args.out,
                                 progress=progress, max_rss=int(args.max_rss * (1 << 20)),
                                 input_timeout=args.input_timeout,
                                 shrink_seconds=args.shrink_time)
            _summary(kind, stats)
            failed += len(stats.failures) + len(stats.findings)
            if stats.interrupted:
                print("vmsim fuzz: interrupted (Ctrl-C)", file=sys.stderr)
                return 130
    except KeyboardInterrupt:
        print("\nvmsim fuzz: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 1 if failed else 0
