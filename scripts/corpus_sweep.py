"""Load every ELF file of this machine on the simulator and say how each load ended.

Run: python scripts/corpus_sweep.py [--json report.json] [ROOT ...]

Every ELF file under the roots (default /usr/bin /usr/sbin /usr/libexec /usr/lib, recursively,
each file once: links to a file already found are skipped) is loaded with ``loader.load`` on a
fresh ``vmsim.AddressSpace`` in a supervised child (vmsim.sweep). Prints the files per outcome
and per kind, each refusal reason with glibc's verdict on the same files, the escapes
(anything but a load or an ElfError), the refusals glibc does not share, the files glibc
refuses but the loader loads, the slowest and the heaviest loads. Exit status: 0 when there is
no escape and every refusal is shared by glibc, 1 otherwise, 130 when interrupted (Ctrl-C
prints the partial summary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from vmsim.sweep import ROOTS, FileResult, SweepReport, find_elf_files, refusal_reason, sweep


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="*", default=list(ROOTS),
                        help="directories to sweep recursively, or ELF files "
                             "(default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write the full report there")
    parser.add_argument("--workers", type=int, default=2, help="parallel workers (%(default)s)")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds each load may take (%(default)s)")
    parser.add_argument("--max-rss-mib", type=int, default=512,
                        help="memory each load may add, MiB (%(default)s)")
    parser.add_argument("--limit", type=int, help="sweep only the first N files found")
    parser.add_argument("--no-oracle", action="store_true", help="do not ask glibc")
    parser.add_argument("--no-dlopen", action="store_true",
                        help="never dlopen (by default the refused shared objects that ld.so "
                             "maps are dlopened in a fresh process: their constructors run)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


def gather(roots: Sequence[str]) -> list[str]:
    """The ELF files under the directories in ``roots``; a root that is a file is itself.
    Each file once (by device and inode; the first name kept)."""
    found = [r for r in roots if os.path.isfile(r)]
    found += find_elf_files([r for r in roots if not os.path.isfile(r)])
    seen: set[tuple[int, int]] = set()
    unique = []
    for path in found:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            unique.append(path)
    return unique


class Progress:
    """A one-line counter on stderr, redrawn at most a few times a second."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.done, self.escapes = total, out, 0, 0
        self.start = self.last = time.monotonic()

    def __call__(self, result: FileResult) -> None:
        self.done += 1
        self.escapes += result.escaped
        now = time.monotonic()
        if now - self.last > 0.25 or self.done == self.total:
            self.last = now
            self.out.write(f"\r{self.done}/{self.total} files, {self.escapes} escapes, "
                           f"{now - self.start:.0f} s ")
            self.out.flush()


def summary(report: SweepReport, out: TextIO) -> None:
    """Print the tables and lists of the report."""
    files = len(report.results)
    note = " (INTERRUPTED: partial)" if report.interrupted else ""
    out.write(f"\ncorpus sweep: {files} ELF files, {report.seconds:.1f} s on "
              f"{report.workers} workers{note}\n\n")
    _table(out, ["outcome", "files"], report.counts().most_common())
    rows = [(kind, c["loaded"], c["refused"], sum(c.values()) - c["loaded"] - c["refused"])
            for kind, c in sorted(report.kinds().items())]
    _table(out, ["kind", "loaded", "refused", "escaped"], rows)
    reasons = [(reason, n, "; ".join(f"{why} ({k})" for why, k in glibc.most_common()))
               for reason, n, glibc in report.reasons()]
    _table(out, ["refusal (ours)", "files", "glibc on the same files"], reasons)
    _listing(out, "escapes", report.escapes(), _escape_line)
    _listing(out, "refusals glibc does not share", report.unshared(), _unshared_line)
    _listing(out, "files glibc refuses but the loader loads", report.glibc_only(),
             lambda r: f"{r.path}: glibc: {r.glibc.why if r.glibc else ''}")
    slowest = sorted(report.results, key=lambda r: -r.seconds)[:5]
    _listing(out, "slowest loads", slowest,
             lambda r: f"{r.seconds:.2f} s  {r.size >> 20} MiB file  {r.path}")
    _listing(out, "most frames allocated by a load (what it touched)", report.heaviest(),
             lambda r: f"{r.frames} frames for a {r.span >> 20} MiB span  {r.path}")


def _table(out: TextIO, head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A left-aligned text table (numbers right-aligned), then a blank line."""
    cells = [[str(c) for c in head]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for n, row in enumerate(cells):
        line = "  ".join(c.rjust(w) if n and c.isdigit() else c.ljust(w)
                         for c, w in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    out.write("\n")


def _listing(out: TextIO, title: str, results: Sequence[FileResult],
             line: Callable[[FileResult], str]) -> None:
    """``title (n):`` then one line per result."""
    out.write(f"{title} ({len(results)}):\n")
    for r in results:
        out.write(f"  {line(r)}\n")
    out.write("\n")


def _escape_line(r: FileResult) -> str:
    """status, path, message, where."""
    where = f" [{' < '.join(reversed(r.where))}]" if r.where else ""
    problems = f" {'; '.join(r.problems)}" if r.problems else ""
    return f"{r.status}: {r.path}: {r.message}{problems}{where}"


def _unshared_line(r: FileResult) -> str:
    """path, our reason, what glibc did."""
    g = r.glibc
    said = "" if g is None else f"ld.so --verify {g.verify_rc} ({g.verdict})" + (
        f", dlopen {g.dlopen}" if g.dlopen is not None else "")
    return f"{r.path}: {refusal_reason(r)} [{r.value}]; glibc: {said}"


def main(argv: Sequence[str] | None = None) -> int:
    """Sweep, print the summary, write the JSON; the exit status says whether all is well."""
    args = parse_args(argv)
    started = time.monotonic()
    try:
        files = gather(args.roots)
    except KeyboardInterrupt:
        print("\ninterrupted while looking for files", file=sys.stderr)
        return 130
    if args.limit is not None:
        files = files[: args.limit]
    print(f"{len(files)} ELF files found in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    progress = None if args.quiet else Progress(len(files), sys.stderr)
    report = sweep(files, roots=args.roots, workers=args.workers, timeout=args.timeout,
                   max_rss=args.max_rss_mib << 20, oracle=not args.no_oracle,
                   dlopen=not args.no_dlopen, progress=progress)
    if progress is not None:
        sys.stderr.write("\n")
    summary(report, sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
            f.write("\n")
        print(f"report written to {args.json}")
    if report.interrupted:
        return 130
    return 1 if report.escapes() or report.unshared() else 0


if __name__ == "__main__":
    sys.exit(main())
