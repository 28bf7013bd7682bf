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
from vmsim.fuzz.contract import RELOCATION_NAMES, LoaderUnderTest, image_knobs, loader_named
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
    p = OneLineParser(prog="vmsim fuzz", description="Run the properties of a correct loader "
                      "as a hypothesis campaign, with a live progress line; on a failure print "
                      "the shrunk example and save its ELF file. Each input runs under a "
                      "memory and a time bound in a supervised worker: an input past a bound "
                      "(or one that kills the worker) is saved, shrunk and reported, and the "
                      "campaign goes on. Exit 0 when no property failed, 1 when one did, 2 on "
                      "a usage error.",
                      epilog="This is the quick campaign, with nothing to install. For long, "
                      "coverage-guided campaigns (hours, many cores or machines, a shared "
                      "example database), run the same properties under HypoFuzz: "
                      "pip install 'vmsim[fuzz]' (HypoFuzz's licence allows non-commercial use "
                      "only), then hypothesis fuzz --no-dashboard -- --pyargs vmsim.fuzz.targets "
                      "(with VMSIM_LOADER=MODULE:FUNCTION for your loader); see "
                      "docs/fuzzing-at-scale.md.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="ELF files to mutate (field-aware) instead of drawing synthetic images")
    p.add_argument("--loader", metavar="MODULE:FUNCTION", default=None,
                   help="the loader under test: any f(data: bytes, mm: Mmap) -> load bias "
                   "(default: the project's loader)")
    p.add_argument("--relocations", metavar="TYPES", default=None,
                   help="keep synthetic images within these relocation types, comma-separated, "
                   f"from {','.join(RELOCATION_NAMES)} (e.g. RELATIVE for a minimal loader)")
    p.add_argument("--time", type=FUZZ_SECONDS, default=60.0, metavar="S",
                   help="seconds the whole campaign runs, shared between its properties "
                   "(default 60)")
    p.add_argument("--backend", choices=["sim", "both"], default="sim",
                   help="sim: the simulator only; both: also the host, in forked children")
    p.add_argument("--property", choices=[*KINDS, "all"], default="all",
                   dest="kind", help="which property to run (default: all: valid and "
                   "malformed images, or the files with PATHs); rate: no property, only "
                   "generate and load valid images on the simulator, to measure images/s")
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


def _choices(p: argparse.ArgumentParser, args: argparse.Namespace
             ) -> tuple[list[str], LoaderUnderTest | None, list[str] | None]:
    """The kinds to run, the loader under test and the relocation types, checked now (a
    usage error, exit 2, names what was wrong)."""
    relocations = None if args.relocations is None else [
        t.strip() for t in args.relocations.split(",") if t.strip()]
    try:
        load = None if args.loader is None else loader_named(args.loader)
        image_knobs(relocations)
    except ValueError as exc:
        p.error(str(exc))
    if not args.paths:
        if args.kind == "files":
            p.error("--property files needs PATHs: the ELF files to mutate")
        return (["valid", "malformed"] if args.kind == "all" else [args.kind]), load, relocations
    if args.kind not in ("all", "files") or relocations is not None:
        p.error("with PATHs the campaign mutates those files: --property and --relocations "
                "apply to synthetic images only")
    from vmsim.fuzz.realfiles import read_elf_paths  # imports hypothesis: only when needed

    try:
        read_elf_paths(args.paths)
    except ValueError as exc:
        p.error(str(exc))
    return ["files"], load, None


def _outcome_line(table: dict[str, int]) -> str:
    """``loaded N; refused: ValueError 3, ...``: how the inputs ended, by the refusal's class."""
    refused = ", ".join(f"{name} {n}" for name, n in sorted(table.items()) if name != "loaded")
    return f"loaded {table.get('loaded', 0)}; refused: {refused or 'none'}"


def _summary(kind: str, stats: CampaignStats) -> None:
    """Print one campaign's summary: the progress line, outcomes, failures, findings."""
    print(f"\r  {stats.line()} in {stats.seconds:.1f}s   ", file=sys.stderr)
    print(f"  {kind} outcomes: {_outcome_line(stats.outcomes)}")
    if stats.host_outcomes:
        print(f"  host outcomes: {_outcome_line(stats.host_outcomes)}")
    for failure in stats.failures:
        print(f"  FAILURE: {failure}")
    again = sum(stats.repeats.values())
    if again:
        print(f"  (the same failures were found again {again} times, in later rounds)")
    for finding in stats.findings:
        print(f"  FINDING: {finding.line()}")


def main(argv: Sequence[str] | None = None) -> int:
    """``vmsim fuzz [PATH ...] [--loader M:F] [--relocations T] [--time S] [--backend ...]``:
    exit 0 when no property failed and no input went past a bound, 1 otherwise, 2 on a usage
    error, 130 on Ctrl-C (after the summary so far, without a traceback)."""
    p = parser()
    args = p.parse_args(argv)
    kinds, load, relocations = _choices(p, args)
    failed = 0

    def progress(stats: CampaignStats) -> None:
        print(f"\r  {stats.line()}   ", end="", file=sys.stderr, flush=True)

    try:
        for kind in kinds:
            seconds = args.time / len(kinds)
            print(f"vmsim fuzz: {kind} on {args.backend} for {seconds:g}s"
                  f"{'' if args.loader is None else ', loader ' + args.loader}",
                  file=sys.stderr)
            stats = run_campaign(seconds, kind=kind, backend=args.backend, out_dir=args.out,
                                 progress=progress, max_rss=int(args.max_rss * (1 << 20)),
                                 input_timeout=args.input_timeout,
                                 shrink_seconds=args.shrink_time, loader=load,
                                 relocations=relocations, paths=args.paths)
            _summary(kind, stats)
            failed += len(stats.failures) + len(stats.findings)
            if stats.interrupted:
                print("vmsim fuzz: interrupted (Ctrl-C)", file=sys.stderr)
                return 130
    except KeyboardInterrupt:
        print("\nvmsim fuzz: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 1 if failed else 0
