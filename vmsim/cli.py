"""The ``vmsim`` command: load an ELF file on a backend and show what happened.

Top layer: imports ``loader`` and ``vmsim``. Verbs:
  vmsim load [PATH] [--backend sim|libc] [--base ADDR] [--json]
  vmsim diff PATH
  vmsim fuzz [...]         (vmsim.fuzz's campaign; see vmsim fuzz --help)
Without PATH, ``load`` loads a small library of this machine (libz.so.1).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from loader import LoadedObject, Mmap, load
from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.outcome import regions_in

__all__ = ["DEFAULT_LIBRARY", "load_report", "main"]

DEFAULT_LIBRARY = "/usr/lib/x86_64-linux-gnu/libz.so.1"
"""What ``vmsim load`` loads when no PATH is given: small, present on every Debian system."""

DESCRIPTION = """\
vmsim: one ELF loader, two memories. The loader maps an x86-64 shared object or executable
onto a backend: 'sim' (the simulator: a software MMU and a Linux-like kernel, where a loader
bug is a clean Fault) or 'libc' (the real kernel, in a forked child of this command).
"""

EPILOG = """\
examples:
  vmsim load                          load libz.so.1 on the simulator, print its map
  vmsim load /usr/lib/x86_64-linux-gnu/libzstd.so.1 --backend libc
  vmsim load libfoo.so --base 0x7f0000000000 --json   one JSON object (DESIGN.md format)
  vmsim diff /usr/lib/x86_64-linux-gnu/libz.so.1      sim and host at the same address;
                                                      exit 0 when the outcomes are equal
  vmsim fuzz --time 30                fuzz the loader with generated and broken ELF files
"""


def _int(text: str) -> int:
    """An address on the command line: decimal or 0x-prefixed hex."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an address: {text!r} (try 0x7f0000000000)") from None


def _has_sim() -> bool:
    """True when vmsim provides the simulator (AddressSpace)."""
    import vmsim

    return getattr(vmsim, "AddressSpace", None) is not None


def _sim_backend() -> Mmap:
    """A fresh simulator address space (exits with a message if vmsim has none yet)."""
    import vmsim

    cls: Any = getattr(vmsim, "AddressSpace", None)
    if cls is None:
        raise SystemExit("vmsim: the simulator (vmsim.AddressSpace) is not available")
    mm: Mmap = cls()
    return mm


def load_report(obj: LoadedObject, backend: str) -> dict[str, Any]:
    """The JSON object of DESIGN.md for a loaded object (absolute addresses)."""
    start, end = obj.span
    regions = regions_in(obj.mm.inner.maps(), start, end)
    rel = obj.relocations
    return {
        "path": obj.path,
        "backend": backend,
        "load_bias": obj.load_bias,
        "span": [start, end],
        "regions": [{"start": r.start, "end": r.end, "perms": r.perms, "offset": r.offset,
                     "path": r.path} for r in regions],
        "relro": None if obj.relro is None else list(obj.relro),
        "relocations": {"applied": rel.applied, "by_type": dict(sorted(rel.by_type.items())),
                        "unresolved": list(rel.unresolved)},
        "calls": [c.as_dict() for c in obj.mm.calls],
    }


def _load_on(path: str, backend: str, base: int | None) -> dict[str, Any]:
    """Load and report; run in a forked child for the host backend."""
    mm = LibcMmap() if backend == "libc" else _sim_backend()
    obj = load(path, mm, base=base)
    report = load_report(obj, backend)
    report["_plan"] = str(obj.plan)
    report["_extern"] = len(obj.relocations.extern)
    return report


def _print_text(report: dict[str, Any]) -> None:
    """The human view: the plan, the regions as maps lines, RELRO, relocations, the trace."""
    print(report["_plan"])
    print(f"\n{report['path']} on {report['backend']}: span {report['span'][0]:#x}-"
          f"{report['span'][1]:#x}, load bias {report['load_bias']:#x}")
    for r in report["regions"]:
        print(f"  {r['start']:012x}-{r['end']:012x} {r['perms']} {r['offset']:08x} {r['path']}")
    relro = report["relro"]
    print("  RELRO " + ("none" if relro is None else f"{relro[0]:#x}-{relro[1]:#x}"))
    rel = report["relocations"]
    kinds = ", ".join(f"{k} {v}" for k, v in rel["by_type"].items())
    print(f"  relocations: {rel['applied']} applied ({kinds})")
    if report["_extern"]:
        print(f"  imports bound to stubs in the extern mapping: {report['_extern']}")
    if rel["unresolved"]:
        print(f"  unresolved: {', '.join(rel['unresolved'])}")
    print(f"  {len(report['calls'])} Mmap calls (--json lists them)")


def cmd_load(args: argparse.Namespace) -> int:
    """``vmsim load``."""
    path = args.path or DEFAULT_LIBRARY
    if args.backend is None:
        args.backend = "sim" if _has_sim() else "libc"
        if args.backend == "libc":
            print("vmsim: the simulator is not available; using the host backend",
                  file=sys.stderr)
    if args.backend == "libc":
        status, report = run_isolated(_load_on, path, "libc", args.base)
        if status != "ok":
            print(f"vmsim: the host load of {path} died with {status}", file=sys.stderr)
            return 2
    else:
        report = _load_on(path, "sim", args.base)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}))
    else:
        _print_text(report)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """``vmsim diff``: exit 0 when sim and host outcomes are equal, 1 otherwise."""
    from loader.compare import compare_backends

    result = compare_backends(args.path, _sim_backend())
    if not result.differences:
        print(f"{args.path}: identical outcomes on sim and libc at {result.base:#x} "
              f"({len(result.host.regions)} regions, {len(result.host.pages)} readable pages, "
              f"{len(result.host.calls)} calls)")
        if result.host.irelative:
            print(f"  not compared: {len(result.host.irelative)} IRELATIVE/IFUNC slots (the "
                  "host ran their resolvers; the simulator records the resolvers' addresses)")
        return 0
    print(f"{args.path}: outcomes differ at base {result.base:#x} (host != sim):")
    for line in result.differences[:200]:
        print("  " + line)
    return 1


def parser() -> argparse.ArgumentParser:
    """The argument parser (``vmsim --help`` teaches from it)."""
    top = argparse.ArgumentParser(prog="vmsim", description=DESCRIPTION, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = top.add_subparsers(dest="verb", metavar="VERB")
    ld = verbs.add_parser("load", help="load an ELF file and print its map",
                          description="Load PATH (default: libz.so.1 of this machine) with "
                          "the project's loader and print the resulting map, RELRO, "
                          "relocation counts and the Mmap calls made.")
    ld.add_argument("path", nargs="?", metavar="PATH",
                    help=f"ELF shared object or executable (default: {DEFAULT_LIBRARY})")
    ld.add_argument("--backend", choices=["sim", "libc"], default=None,
                    help="sim: the simulator (the default when available); libc: the real "
                    "kernel, in a forked child of this command")
    ld.add_argument("--base", type=_int, metavar="ADDR",
                    help="where the span starts (default: the backend chooses)")
    ld.add_argument("--json", action="store_true",
                    help="print one JSON object: path, backend, load_bias, span, regions, "
                    "relro, relocations, calls")
    ld.set_defaults(func=cmd_load)
    df = verbs.add_parser("diff", help="load on both backends at one address and compare",
                          description="Load PATH on the host (in a forked child) and on the "
                          "simulator at the same address, imports bound to the same stubs, "
                          "and compare regions, page bytes, RELRO and Mmap calls. Exit 0 when "
                          "equal, 1 with the differences otherwise.")
    df.add_argument("path", metavar="PATH", help="ELF shared object or executable")
    df.set_defaults(func=cmd_diff)
    verbs.add_parser("fuzz", help="run the loader's hypothesis properties as a campaign "
                     "(vmsim fuzz --help)", add_help=False)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsim`` console script. ElfError prints as one line, exit 2."""
    from loader import ElfError, MmapError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fuzz"]:
        from vmsim.fuzz import main as fuzz_main

        return fuzz_main(argv[1:])
    args = parser().parse_args(argv)
    if args.verb is None:
        parser().print_help()
        return 2
    try:
        code: int = args.func(args)
    except (ElfError, MmapError, OSError) as exc:
        print(f"vmsim: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
