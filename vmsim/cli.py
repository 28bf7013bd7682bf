"""The ``vmsim`` command: load an ELF file on a backend and show what happened.

Top layer: imports ``loader`` and ``vmsim``. Verbs:
  vmsim load [PATH] [--backend sim|libc] [--base ADDR] [--json]
  vmsim load --deps PATH   the process image: PATH and its libraries (vmsim.deps)
  vmsim maps [PATH]        a coloured table of the regions, like gef/pwndbg vmmap (--deps too)
  vmsim trace [PATH]       every Mmap call the load made, with result or errno
  vmsim explain [PATH]     the loader's steps in sentences, each with the calls it caused
  vmsim plot [PATH] -o FILE.png   vmsim.viz's map of the loaded object
  vmsim diff PATH
  vmsim ldd PATH           the libraries ld.so would load with PATH, in glibc ldd's format
  vmsim why SYMBOL PATH    how ld.so finds SYMBOL in PATH's image: objects asked, the winner
  vmsim fuzz [...]         (vmsim.fuzz's campaign; see vmsim fuzz --help)
Without PATH, a small library of this machine (libz.so.1) is loaded. Host (libc) loads run in
a forked child; what it saw comes back as a ``Session``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from loader import LoadedObject, Mmap, load
from loader.compare import LoadDied, run_host
from loader.explain import Explainer, Step, bindings, format_call
from loader.libc import LibcMmap
from loader.mmap import Region
from loader.outcome import regions_in
from loader.pages import HOST_PAGE_SIZE
from loader.trace import Call
from vmsim.arguments import Bounded, OneLineParser
from vmsim.deps import (
    Image,
    image_regions,
    image_report,
    image_text,
    object_fields,
    open_image,
    why_lines,
)
from vmsim.runcmd import add_run

__all__ = ["DEFAULT_LIBRARY", "EXIT", "Bounded", "Session", "load_report", "main", "maps_rows",
           "session"]

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
  vmsim load libfoo.so --base 0x7f0000000000 --json   one JSON object (docs/DESIGN.md format)
  vmsim diff /usr/lib/x86_64-linux-gnu/libz.so.1      sim and host at the same address;
                                                      exit 0 when the outcomes are equal
  vmsim maps                          libz's regions as a coloured table (role, perms)
  vmsim trace --backend libc          every mmap/mprotect/munmap the load made on the kernel
  vmsim explain                       each step in a sentence (what and why) with its calls
  vmsim plot -o libz.png              the map as a picture (regions to scale, RELRO hatched)
  vmsim fuzz --time 30                fuzz the loader with generated and broken ELF files
  vmsim ldd /usr/bin/ls               ls's libraries as ldd lists them (found by our search)
  vmsim load --deps /usr/bin/ls       ls and its libraries loaded as ld.so starts it: each
                                      object's base, span and relocations, init order, TLS
  vmsim maps --deps /usr/lib/x86_64-linux-gnu/libssl.so.3   the whole image's regions
  vmsim why malloc /usr/bin/ls        which library's malloc ls uses, and why (--preload
                                      LIB shows interposition)

PATH defaults to libz.so.1 of this machine for load, maps, trace, explain and plot.

exit status:
  0    done (diff: the outcomes are equal)
  1    diff: the outcomes differ (listed on stdout); why: nobody defines the symbol
  2    usage error, or the input refused: not a regular file, not ELF, an ELF file the
       loader refuses, a call the backend refused, an output that cannot be written
  3    a load died: the host (libc) child was killed by a signal or went past its memory
       or time bound, or the simulator faulted (a loader bug); the backend is named
  4    internal error (a bug in vmsim; VMSIM_TRACEBACK=1 shows the traceback)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. | head): stop quietly, as a tool killed by SIGPIPE
Every error is one line on stderr starting with "vmsim:".
"""

EXIT = {"ok": 0, "differ": 1, "undefined": 1, "refused": 2, "died": 3, "bug": 4, "interrupted": 130,
        "pipe": 141}
"""The exit statuses (EPILOG explains each)."""

ANSI: dict[str, str] = {"code": "\x1b[31m", "data": "\x1b[35m", "rodata": "",
                        "guard": "\x1b[36m", "extern": "\x1b[33m"}
"""vmmap's colours by role (vmsim.viz.ROLE_COLORS as terminal colours)."""
WRITE_ONLY_NOTE = ("write-only: reserved by mmap_reserve(use_file=False), which reserves -w- "
                   "memory to copy segments into; no segment covered this page")
"""What a ``-w-p`` region is, wherever a view shows one."""
RESET = "\x1b[0m"
BOLD = "\x1b[1m"


BASE = Bounded(int, 0x10000, (1 << 47) - HOST_PAGE_SIZE, unit="(user space, above "
               "vm.mmap_min_addr's default)", step=HOST_PAGE_SIZE, example="0x7f0000000000")
"""--base: a page-aligned user-space address of the 47-bit x86-64 layout."""
DPI = Bounded(int, 1, 1200, unit="dots per inch", example="120")
"""--dpi of vmsim plot."""

MAX_CANVAS_SIDE = 16384
"""The largest picture side ``vmsim plot`` draws, in pixels."""
MAX_CANVAS_PIXELS = 40_000_000
"""The largest picture ``vmsim plot`` draws, in pixels (about 160 MB of RGBA)."""
PLOT_FORMATS = (".png", ".svg", ".pdf")
"""What ``vmsim plot -o`` can write, by the file name's suffix."""


class UsageError(Exception):
    """A command-line value that cannot be used: exit 2 with this one line."""


def _sim_backend() -> Mmap:
    """A fresh simulator address space."""
    from vmsim import AddressSpace

    return AddressSpace()


def load_report(obj: LoadedObject, backend: str) -> dict[str, Any]:
    """The JSON object of docs/DESIGN.md for a loaded object (absolute addresses)."""
    fields = object_fields(obj, obj.mm.inner.maps())
    return {"path": fields.pop("path"), "backend": backend, **fields,
            "calls": [c.as_dict() for c in obj.mm.calls]}


def _load_on(path: str, backend: str, base: int | None) -> dict[str, Any]:
    """Load and report; run in a forked child for the host backend."""
    mm = LibcMmap() if backend == "libc" else _sim_backend()
    obj = load(path, mm, base=base)
    report = load_report(obj, backend)
    report["_plan"] = str(obj.plan)
    report["_extern"] = len(obj.relocations.extern)
    ext = obj.relocations.extern_range
    report["_extern_regions"] = [] if ext is None else [
        {"start": r.start, "end": r.end, "perms": r.perms, "offset": r.offset, "path": r.path}
        for r in regions_in(obj.mm.inner.maps(), ext[0], ext[1])]
    report["_names"] = _names(maps_rows(obj), ext)
    who = bindings(obj.tables)
    report["_imports"] = {"symbols": who.imports, "weak": who.weak,
                          "host": obj.real_bindings}
    return report


def imports_line(imports: dict[str, Any], extern: int, unresolved: int) -> str:
    """The one line on imports, the same on both backends: how many, and where they went
    (stubs in the extern mapping, or this process through dlsym)."""
    count = imports["symbols"]
    if not count:
        return "imports: none (every symbol the object uses, it defines)"
    weak = f", {imports['weak']} weak (0 when nobody defines them)" if imports["weak"] else ""
    text = f"imports: {count} symbols looked up outside the object{weak}: "
    if extern:
        text += f"{extern} bound to stubs in the extern mapping (StubResolver)"
    elif imports["host"]:
        text += "bound in this process through dlsym (HostResolver)"
    else:
        text += "bound by the resolver"
    return text + (f"; {unresolved} unresolved" if unresolved else "")


def _names(regions: Sequence[Region], extern: tuple[int, int] | None) -> dict[int, str]:
    """What the views call each anonymous region, by start: "[anon:.bss]", "[extern
    stubs]" or "[anon]" (``vmsim.viz.region_names``; files go by their path)."""
    from vmsim.viz import region_names

    shown = {".bss": "[anon:.bss]", "extern": "[extern stubs]"}
    return {r.start: shown.get(name, "[anon]")
            for r, name in zip(regions, region_names(regions, extern=extern), strict=True)
            if not r.path}


def _region_line(r: dict[str, Any], names: dict[int, str]) -> str:
    """One region of the report as a maps line (an anonymous one named by ``names``), with
    a note on a write-only hole."""
    name = r["path"] or names.get(r["start"], "[anon]")
    note = f"  ({WRITE_ONLY_NOTE})" if r["perms"].startswith("-w-") else ""
    return f"  {r['start']:012x}-{r['end']:012x} {r['perms']} {r['offset']:08x} {name}{note}"


def _print_text(report: dict[str, Any]) -> None:
    """The human view: the plan, the regions as maps lines, RELRO, relocations, the trace."""
    print(report["_plan"])
    print(f"\n{report['path']} on {report['backend']}: span {report['span'][0]:#x}-"
          f"{report['span'][1]:#x}, load bias {report['load_bias']:#x}")
    for r in [*report["regions"], *report["_extern_regions"]]:
        print(_region_line(r, report["_names"]))
    relro = report["relro"]
    print("  RELRO " + ("none" if relro is None else f"{relro[0]:#x}-{relro[1]:#x}"))
    rel = report["relocations"]
    kinds = ", ".join(f"{k} {v}" for k, v in rel["by_type"].items())
    print(f"  relocations: {rel['applied']} applied ({kinds})")
    print("  " + imports_line(report["_imports"], report["_extern"], len(rel["unresolved"])))
    if rel["unresolved"]:
        print(f"  unresolved: {', '.join(rel['unresolved'])}")
    print(f"  {len(report['calls'])} Mmap calls (--json lists them)")


def cmd_load(args: argparse.Namespace) -> int:
    """``vmsim load``: one object, or with --deps the whole process image."""
    path = args.path
    if args.deps:
        report = image_report(_image(args))
        print(json.dumps(report) if args.json else "\n".join(image_text(report)))
        return EXIT["ok"]
    _one_object(args)
    if args.backend == "libc":
        report = run_host(_load_on, path, "libc", args.base, source=path)
    else:
        report = _load_on(path, "sim", args.base)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}))
    else:
        _print_text(report)
    return EXIT["ok"]


def cmd_diff(args: argparse.Namespace) -> int:
    """``vmsim diff``: exit 0 when sim and host outcomes are equal, 1 otherwise, 3 when a
    load died (LoadDied, handled in main)."""
    from loader.compare import compare_backends

    result = compare_backends(args.path, _sim_backend())
    if not result.differences:
        print(f"{args.path}: identical outcomes on sim and libc at {result.base:#x} "
              f"({len(result.host.regions)} regions, {len(result.host.pages)} readable pages, "
              f"{len(result.host.calls)} calls)")
        if result.host.irelative:
            print(f"  not compared: {len(result.host.irelative)} IRELATIVE/IFUNC slots (the "
                  "host ran their resolvers; the simulator records the resolvers' addresses)")
        return EXIT["ok"]
    print(f"{args.path}: outcomes differ at base {result.base:#x} (host != sim):")
    for line in result.differences[:200]:
        print("  " + line)
    if len(result.differences) > 200:
        print(f"  ... and {len(result.differences) - 200} more")
    return EXIT["differ"]


@dataclass
class Session:
    """What one load showed, picklable (a host load hands it back from its forked child).

    ``regions``: the backend's maps() inside the span and the extern-stub range.
    """

    path: str
    backend: str
    span: tuple[int, int]
    relro: tuple[int, int] | None
    extern: tuple[int, int] | None
    regions: list[Region]
    calls: list[Call]
    steps: list[Step] = field(default_factory=list)
    relros: list[tuple[int, int]] = field(default_factory=list)
    """Every RELRO range of a process image (``maps --deps``), besides ``relro``."""
    labels: dict[int, str] = field(default_factory=dict)
    """Names of anonymous regions by start, where the views know better than "[anon]"."""

    def in_relro(self, r: Region) -> bool:
        """Whether ``r`` lies inside a RELRO range of the session."""
        ranges = self.relros + ([self.relro] if self.relro else [])
        return any(lo <= r.start and r.end <= hi for lo, hi in ranges)


def maps_rows(obj: LoadedObject) -> list[Region]:
    """The regions of the backend's maps() inside the object's span or its extern mapping."""
    lo, hi = obj.span
    ext = obj.relocations.extern_range
    return [r for r in obj.mm.maps()
            if (lo <= r.start and r.end <= hi)
            or (ext is not None and ext[0] <= r.start and r.end <= ext[1])]


def _session_here(path: str, backend: str, base: int | None) -> Session:
    """Load on ``backend`` in this process, explained, and keep what it showed."""
    mm = LibcMmap() if backend == "libc" else _sim_backend()
    steps = Explainer()
    obj = load(path, mm, base=base, explain=steps)
    return Session(obj.path, backend, obj.span, obj.relro, obj.relocations.extern_range,
                   maps_rows(obj), list(obj.mm.calls), steps.steps)


def session(path: str, backend: str, base: int | None = None) -> Session:
    """Load ``path`` on ``backend`` ("sim" here, "libc" in a supervised forked child) and
    report. Raises LoadDied when the host child dies (signal, memory or time bound)."""
    if backend != "libc":
        return _session_here(path, backend, base)
    out: Session = run_host(_session_here, path, "libc", base, source=path)
    return out


def _use_color(choice: str, stream: TextIO) -> bool:
    """ANSI colours: --color=always, or auto and the stream is a terminal."""
    return choice == "always" or (choice == "auto" and stream.isatty())


def _paint(text: str, code: str, on: bool) -> str:
    """``text`` in ANSI ``code`` when colour is on."""
    return f"{code}{text}{RESET}" if on and code else text


def _maps_lines(sess: Session, color: bool) -> list[str]:
    """The vmmap-like table: start, end, size, perms, offset, role, path; a legend line."""
    from vmsim.viz import format_size, region_role

    head = f"{'start':>14} {'end':>14} {'size':>9} perm {'offset':>8} {'role':<7} path"
    lines = [_paint(head, BOLD, color)]
    names = _names(sess.regions, sess.extern)
    for r in sess.regions:
        role = region_role(r, extern=sess.extern)
        notes = []
        if sess.in_relro(r):
            notes.append("RELRO")
        if r.prot & r.prot.PROT_WRITE and r.prot & r.prot.PROT_EXEC:
            notes.append("W+X!")
        if r.perms.startswith("-w-"):
            notes.append(WRITE_ONLY_NOTE)
        name = r.path or sess.labels.get(r.start) or names.get(r.start, "")
        row = (f"{r.start:#14x} {r.end:#14x} {format_size(r.length):>9} {r.perms} "
               f"{r.offset:08x} {role:<7} {name}" + (f"  ({', '.join(notes)})" if notes else ""))
        lines.append(_paint(row, ANSI[role], color))
    legend = "  ".join(_paint(f"{role}{' (' + what + ')' if what else ''}", ANSI[role], color)
                       for role, what in (("code", "x"), ("data", "w"), ("rodata", "r only"),
                                          ("guard", "---"), ("extern", "stubs")))
    lines.append(f"legend: {legend}; RELRO = sealed read-only after relocation")
    return lines


def cmd_maps(args: argparse.Namespace) -> int:
    """``vmsim maps``: the regions as a coloured table (with --deps: the whole image's)."""
    if args.deps:
        image = _image(args)
        regions, relros, labels = image_regions(image)
        sess = Session(args.path, "sim", (regions[0].start, regions[-1].end), None, None,
                       regions, list(image.lm.mm.calls), relros=relros, labels=labels)
        print(f"{sess.path} and its closure on sim ({image.how}, bind {image.bind}): "
              f"{len(image.lm.objects)} objects, {len(regions)} regions")
    else:
        _one_object(args)
        sess = session(args.path, args.backend, args.base)
        print(f"{sess.path} on {sess.backend}: span {sess.span[0]:#x}-{sess.span[1]:#x}")
    for line in _maps_lines(sess, _use_color(args.color, sys.stdout)):
        print(line)
    return 0


def _preloads(args: argparse.Namespace) -> list[str]:
    """--preload as a list (colon- or space-separated, as LD_PRELOAD)."""
    return [p for p in args.preload.replace(" ", ":").split(":") if p]


def _library_path(args: argparse.Namespace) -> list[str]:
    """--library-path as a list of directories (colon-separated, as LD_LIBRARY_PATH)."""
    return args.library_path.split(":") if args.library_path else []


def _image(args: argparse.Namespace) -> Image:
    """PATH and its closure on the simulator (--deps, and ``why``); UsageError for the
    options only a single-object load takes."""
    if getattr(args, "backend", "sim") != "sim":
        raise UsageError("argument --deps: a process image is built on the simulator only "
                         "(--backend sim) for now")
    if getattr(args, "base", None) is not None:
        raise UsageError("argument --base: not with --deps (the backend places each object "
                         "of the image)")
    _check_preloads(_preloads(args), _library_path(args))
    return open_image(args.path, library_path=_library_path(args), preload=_preloads(args),
                      bind=args.bind)


def _check_preloads(preloads: list[str], library_path: list[str]) -> None:
    """UsageError naming a --preload the search cannot find (ld.so would print an error
    and go on without it; here it is refused, so what is shown is what was asked)."""
    from loader import ElfDependencyError, ElfError
    from loader.search import SearchPath

    search = SearchPath(library_path)
    for name in preloads:
        try:
            search.find(name)
        except ElfError as exc:
            why = "not found in the search path" if isinstance(exc, ElfDependencyError) \
                else f"{type(exc).__name__}: {exc}"
            raise UsageError(f"argument --preload: {name} cannot be preloaded ({why}); "
                             "ld.so would say so and go on without it") from None


def _one_object(args: argparse.Namespace) -> None:
    """UsageError when an option that only a process image takes is given without --deps."""
    given = [name for name, value, default in (
        ("--preload", args.preload, ""), ("--bind", args.bind, None),
        ("--library-path", args.library_path, os.environ.get("LD_LIBRARY_PATH", "")))
        if value != default]
    if given:
        raise UsageError(f"argument {given[0]}: only with --deps (one object alone loads "
                         "no libraries)")


def cmd_why(args: argparse.Namespace) -> int:
    """``vmsim why``: exit 0 when somebody defines SYMBOL, 1 when nobody does."""
    image = _image(args)
    try:
        lines, defined = why_lines(image, args.symbol, args.from_object)
    except KeyError as exc:
        raise UsageError(f"argument --from: {exc.args[0]}") from None
    print("\n".join(lines))
    return EXIT["ok"] if defined else EXIT["undefined"]


def cmd_ldd(args: argparse.Namespace) -> int:
    """``vmsim ldd``: the closure in ldd's format (addresses all zero: nothing is loaded)."""
    from loader import ElfError
    from loader.search import closure, ldd_lines

    try:
        found = closure(args.path, library_path=_library_path(args),
                        preload=_preloads(args), missing="report")
    except ElfError as exc:
        _say(f"ldd {args.path}: {type(exc).__name__}: {exc}")
        return EXIT["refused"]
    if not found[0].info or not found[0].info.dynamic:
        _say(f"{args.path}: not a dynamic executable (no PT_DYNAMIC)")
        return EXIT["refused"]
    loaded = {n for f in found if f.how == "preload" for n in (f.name, *f.aliases)}
    for name in (p for p in _preloads(args) if p not in loaded):
        print(f"ERROR: ld.so: object '{name}' from LD_PRELOAD cannot be preloaded (cannot "
              "open shared object file): ignored.", file=sys.stderr)
    for line in ldd_lines(found):
        print(line)
    return EXIT["ok"]


LDD_HELP = """\
Print the shared objects ld.so would load with PATH, found by the project's own search
(loader.search: DT_RPATH, LD_LIBRARY_PATH, DT_RUNPATH, /etc/ld.so.cache, the system
directories, as glibc 2.36 does), in the format and order of glibc's ldd: a tab, then
"name => path (0xADDRESS)", "name => not found", the vDSO and ld.so lines. Nothing is
loaded and no code runs, so every address is printed as 0x0000000000000000 (ldd prints
where glibc mapped each object). LD_LIBRARY_PATH is read from the environment as ldd does
(--library-path overrides it); LD_PRELOAD is not read (it would preload into this command
itself): give --preload instead. Example: vmsim ldd /usr/bin/ls
"""


WHY_HELP = """\
Load PATH and its closure on the simulator (as 'vmsim load --deps' does) and tell how the
dynamic linker finds SYMBOL: the objects of the scope asked in order, what each said (does
not define it; has versions X, wanted Y; defines it), the definition that wins and the
later definitions it interposes. When the object asking (--from, default the program or
PATH) refers to SYMBOL, its version is the one looked up, and each of its relocations of
SYMBOL is shown with the word it holds now. Exit 0 when somebody defines SYMBOL, 1 when
nobody does. Example: vmsim why malloc /usr/bin/ls --preload ./libmymalloc.so
"""


def cmd_trace(args: argparse.Namespace) -> int:
    """``vmsim trace``: every Mmap call, one per line."""
    sess = session(args.path, args.backend, args.base)
    print(f"{sess.path} on {sess.backend}: {len(sess.calls)} Mmap calls "
          f"({trace_note(sess)})")
    for i, call in enumerate(sess.calls):
        print(f"{i:4} {format_call(call)}")
    return 0


def extern_calls(sess: Session) -> int:
    """How many of the session's calls acted on the extern stub mapping."""
    if sess.extern is None:
        return 0
    lo, hi = sess.extern

    def inside(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and lo <= value < hi

    return sum(1 for c in sess.calls if inside(dict(c.args).get("addr")) or inside(c.result))


def trace_note(sess: Session) -> str:
    """Why the simulator's trace is longer than the host's: the extern stubs' calls."""
    n = extern_calls(sess)
    if n:
        return (f"{n} of them map, fill and seal the extern stubs the resolver gives imports; "
                f"on the host (--backend libc) imports are bound through dlsym and those "
                f"{n} calls are not made")
    if sess.backend == "libc":
        return ("imports bound in this process through dlsym: no extern mapping, so the "
                "simulator's trace has the calls that make one on top of these")
    return "no extern mapping: every import was bound without stubs"


def cmd_explain(args: argparse.Namespace) -> int:
    """``vmsim explain``: each step's sentence, then the calls it caused, indented."""
    sess = session(args.path, args.backend, args.base)
    color = _use_color(args.color, sys.stdout)
    print(f"{sess.path} on {sess.backend}:")
    index = 0
    for step, calls in Explainer(sess.steps).interleave(sess.calls):
        if step is not None:
            print(_paint(f"[{step.phase}] {step.sentence}", BOLD, color))
        for call in calls:
            print(f"    {index:4} {format_call(call)}")
            index += 1
    return 0


def _picture(text: str) -> str:
    """-o of vmsim plot: a file name ending in a format matplotlib writes here."""
    if not text.lower().endswith(PLOT_FORMATS):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the picture's name must end in {', '.join(PLOT_FORMATS)}")
    return text


def _check_canvas(size_inches: Sequence[float], dpi: int) -> None:
    """UsageError when a figure of ``size_inches`` at ``dpi`` passes the canvas bounds."""
    width, height = (math.ceil(x * dpi) for x in size_inches)
    if max(width, height) > MAX_CANVAS_SIDE or width * height > MAX_CANVAS_PIXELS:
        raise UsageError(f"argument --dpi: the picture would be {width} x {height} pixels at "
                         f"--dpi {dpi}, past the limit of {MAX_CANVAS_SIDE} a side and "
                         f"{MAX_CANVAS_PIXELS // 1_000_000} million in all; lower --dpi")


def cmd_plot(args: argparse.Namespace) -> int:
    """``vmsim plot``: vmsim.viz's map of the loaded object, written to a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from vmsim import viz

    sess = session(args.path, args.backend, args.base)
    name = viz.printable(sess.path.rsplit("/", 1)[-1])
    ax = viz.plot_map(sess.regions, relro=sess.relro, extern=sess.extern,
                      title=f"{name} loaded at {sess.span[0]:#x} ({sess.backend})")
    fig = ax.figure
    assert isinstance(fig, Figure)
    try:
        _check_canvas(fig.get_size_inches().tolist(), args.dpi)
        fig.savefig(args.output, dpi=args.dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    print(f"wrote {args.output}: {len(sess.regions)} regions of {name}")
    return EXIT["ok"]


def _common(sub: argparse.ArgumentParser, color: bool = False) -> None:
    """PATH, --backend, --base (and --color) for the verbs that load one file."""
    sub.add_argument("path", nargs="?", metavar="PATH",
                     help=f"ELF shared object or executable (default: {DEFAULT_LIBRARY})")
    sub.add_argument("--backend", choices=["sim", "libc"], default="sim",
                     help="sim: the simulator (the default); libc: the real "
                     "kernel, in a forked child of this command")
    sub.add_argument("--base", type=BASE, metavar="ADDR",
                     help="where the span starts (default: the backend chooses)")
    if color:
        sub.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="ANSI colours: auto (only on a terminal), always, never")


def _search_options(sub: argparse.ArgumentParser) -> None:
    """--library-path and --preload, as ld.so takes LD_LIBRARY_PATH and LD_PRELOAD."""
    sub.add_argument("--library-path", metavar="DIRS",
                     default=os.environ.get("LD_LIBRARY_PATH", ""),
                     help="colon-separated directories searched as LD_LIBRARY_PATH "
                     "(default: $LD_LIBRARY_PATH)")
    sub.add_argument("--preload", metavar="LIBS", default="",
                     help="objects loaded first, as LD_PRELOAD (colon- or space-separated)")


def _image_options(sub: argparse.ArgumentParser, deps: bool = True) -> None:
    """--deps (unless the verb always loads the image), --library-path, --preload, --bind."""
    if deps:
        sub.add_argument("--deps", action="store_true",
                         help="the whole process image: PATH and every library it needs, "
                         "loaded as ld.so does (a program is started, a library dlopen'ed "
                         "by the smallest program, linked against libc only)")
    _search_options(sub)
    sub.add_argument("--bind", choices=["now", "lazy"], default=None,
                     help="bind JUMP_SLOTs now (LD_BIND_NOW, RTLD_NOW) or lazily (at the "
                     "first call); default: lazy for a program, now for a library")


def _add_why(verbs: Any) -> None:
    """The why verb."""
    wy = verbs.add_parser("why", help="which library's definition of SYMBOL wins, and why",
                          description=WHY_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    wy.add_argument("symbol", metavar="SYMBOL", help="a symbol name, or NAME@VERSION")
    wy.add_argument("path", metavar="PATH", help="ELF program or shared object")
    wy.add_argument("--from", dest="from_object", metavar="OBJECT",
                    help="look it up from this object of the image (soname, file name or "
                    "path; default: the program, or PATH itself for a library)")
    _image_options(wy, deps=False)
    wy.set_defaults(func=cmd_why)


def _add_views(verbs: Any) -> None:
    """The maps, trace, explain and plot verbs."""
    mp = verbs.add_parser(
        "maps", help="the loaded object's regions as a coloured table (like vmmap)",
        description="Load PATH and print the backend's regions in its span (and the extern "
        "stub mapping): start, end, size, permissions, file offset, role, path. Colour by "
        "role (code red, data purple, rodata plain, guard cyan, extern stubs yellow), RELRO "
        "and W+X marked. Example: vmsim maps --backend libc", epilog=None)
    _common(mp, color=True)
    _image_options(mp)
    mp.set_defaults(func=cmd_maps)
    tr = verbs.add_parser(
        "trace", help="every Mmap call the load made, with result or errno",
        description="Load PATH and print each call the loader made to the backend "
        "(mmap_reserve, mmap, mmap_anonymous, mprotect, munmap, write, write_words), one per "
        "line, with its arguments and result or errno. Example: vmsim trace --backend libc")
    _common(tr)
    tr.set_defaults(func=cmd_trace)
    ex = verbs.add_parser(
        "explain", help="the loader's steps in plain sentences, with the calls each caused",
        description="Load PATH and print each step the loader took (parse, plan, reserve, "
        "map, relocate, protect, init) as a sentence saying what and why, each followed by "
        "the Mmap calls it caused. Example: vmsim explain /usr/lib/x86_64-linux-gnu/libz.so.1")
    _common(ex, color=True)
    ex.set_defaults(func=cmd_explain)
    pl = verbs.add_parser(
        "plot", help="draw the loaded object's map to a PNG (vmsim.viz)",
        description="Load PATH and draw its map with vmsim.viz: regions to scale, gaps "
        "compressed, coloured by role, RELRO hatched, a legend. Example: vmsim plot -o libz.png")
    _common(pl)
    pl.add_argument("-o", "--output", required=True, metavar="FILE.png", type=_picture,
                    help="the picture to write: .png, .svg or .pdf")
    pl.add_argument("--dpi", type=DPI, default=120,
                    help=f"resolution, {int(DPI.lo)} to {int(DPI.hi)} (default 120); the "
                    f"picture may have at most {MAX_CANVAS_SIDE} pixels a side")
    pl.set_defaults(func=cmd_plot)


def parser() -> argparse.ArgumentParser:
    """The argument parser (``vmsim --help`` teaches from it)."""
    top = OneLineParser(prog="vmsim", description=DESCRIPTION, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = top.add_subparsers(dest="verb", metavar="VERB")
    ld = verbs.add_parser("load", help="load an ELF file and print its map",
                          description="Load PATH (default: libz.so.1 of this machine) with "
                          "the project's loader and print the resulting map, RELRO, "
                          "relocation counts and the Mmap calls made.")
    _common(ld)
    ld.add_argument("--json", action="store_true",
                    help="print one JSON object: path, backend, load_bias, span, regions, "
                    "relro, relocations, calls (with --deps: an \"objects\" list of those "
                    "fields per object, with init_order, tls and the image's calls)")
    _image_options(ld)
    ld.set_defaults(func=cmd_load)
    df = verbs.add_parser("diff", help="load on both backends at one address and compare",
                          description="Load PATH on the host (in a forked child) and on the "
                          "simulator at the same address, imports bound to the same stubs, "
                          "and compare regions, page bytes, RELRO and Mmap calls. Exit 0 when "
                          "equal, 1 with the differences otherwise, 3 when a load died (the "
                          "backend and the signal or bound named on stderr).")
    df.add_argument("path", metavar="PATH", help="ELF shared object or executable")
    df.set_defaults(func=cmd_diff)
    _add_views(verbs)
    dd = verbs.add_parser("ldd", help="the libraries ld.so would load with PATH, as ldd "
                          "prints them", description=LDD_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    dd.add_argument("path", metavar="PATH", help="ELF program or shared object")
    _search_options(dd)
    dd.set_defaults(func=cmd_ldd)
    _add_why(verbs)
    add_run(verbs)
    verbs.add_parser("fuzz", help="run the loader's hypothesis properties as a campaign "
                     "(vmsim fuzz --help)", add_help=False)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmsim`` console script: the exit status (EPILOG lists them).

    Every error is one line on stderr. Ctrl-C prints ``vmsim: interrupted`` (130); a closed
    stdout (``| head``) ends quietly (141).
    """
    try:
        code = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()          # a closed pipe shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT["interrupted"]
    except BrokenPipeError:
        _silence_stdout()
        return EXIT["pipe"]


def _say(message: str) -> None:
    """One line on stderr: ``vmsim: MESSAGE``; line breaks inside MESSAGE become spaces and
    the bytes of a non-UTF-8 file name show as ``\\xff`` (as vmsim.viz.printable)."""
    line = " ".join(message.splitlines())
    line = line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    print(f"vmsim: {line}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _dispatch(argv: list[str]) -> int:
    """Parse, check the input file, run the verb, turn its errors into one line each."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")   # a non-UTF-8 path: its own bytes
    if argv[:1] == ["fuzz"]:
        return _fuzz(argv[1:])
    top = parser()
    args = top.parse_args(argv)
    if args.verb is None:
        top.print_help(sys.stderr)
        return EXIT["refused"]
    if hasattr(args, "path"):
        args.path = args.path or DEFAULT_LIBRARY
        problem = _not_loadable(args.path)
        if problem is not None:
            _say(f"{args.path}: {problem}; give the path of an ELF shared object (try "
                 "'vmsim load' with no arguments for a demo on libz.so.1)")
            return EXIT["refused"]
    return _run_verb(args)


def _run_verb(args: argparse.Namespace) -> int:
    """``args.func(args)`` with each kind of failure as one line and its exit status."""
    from loader import ElfError, MmapError
    from vmsim import Fault

    path: str = args.path
    try:
        code: int = args.func(args)
        return code
    except (ElfError, MmapError) as exc:
        _say(_refusal(args, exc))
    except LoadDied as exc:
        hint = ("" if exc.backend != "libc" or args.verb == "diff" else
                "; try --backend sim, where a loader bug is a clean Fault")
        _say(f"{path}: the {exc.backend} load died: {exc.how}{hint}")
        return EXIT["died"]
    except Fault as exc:
        _say(f"{path}: the sim load faulted (a loader bug): {exc}")
        return EXIT["died"]
    except UsageError as exc:
        print(f"vmsim {args.verb}: {exc}", file=sys.stderr)
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except OSError as exc:
        other = exc.filename is not None and str(exc.filename) != path
        _say(f"cannot write {exc.filename}: {exc.strerror or exc}" if other and
             getattr(args, "output", None) == exc.filename else
             f"{path}: {exc.strerror or exc}" + (f": {exc.filename}" if other else ""))
    except Exception as exc:
        if os.environ.get("VMSIM_TRACEBACK"):
            raise
        _say(f"internal error, a bug in vmsim ({type(exc).__name__}: {str(exc)[:300]}); "
             "VMSIM_TRACEBACK=1 shows where")
        return EXIT["bug"]
    return EXIT["refused"]


def _refusal(args: argparse.Namespace, exc: Exception) -> str:
    """The line for a load refused by the loader (ElfError) or the backend (MmapError): blamed
    on --base when the load address the user gave is what failed, on the file otherwise."""
    from loader import ElfDependencyError, ElfError, ElfSymbolError

    path: str = args.path
    base = getattr(args, "base", None)
    what = f"{type(exc).__name__}: {exc}"
    field = exc.field if isinstance(exc, ElfError) else "load address"
    if base is not None and field in ("base", "load address"):
        return f"argument --base {base:#x}: {path} cannot be loaded there ({what})"
    if isinstance(exc, ElfDependencyError) or \
            (isinstance(exc, ElfSymbolError) and _builds_image(args)):
        return (f"{path}: its process image cannot be built ({what}); 'a <- b' reads "
                "'a, needed by b'")
    if isinstance(exc, ElfError):
        return (f"{path}: {_elf_hint(path)} ({what}); try 'vmsim load' with no arguments "
                "for a demo")
    backend = getattr(args, "backend", None) or "sim or libc"
    return f"{path}: the {backend} backend refused a call ({what})"


def _builds_image(args: argparse.Namespace) -> bool:
    """Whether the verb loads a process image (--deps, why) rather than one object."""
    return bool(getattr(args, "deps", False)) or args.verb == "why"


_FILE_KINDS: dict[Callable[[int], bool], str] = {
    stat.S_ISDIR: "a directory", stat.S_ISCHR: "not a regular file (character device)",
    stat.S_ISBLK: "not a regular file (block device)", stat.S_ISFIFO: "not a regular file "
    "(FIFO)", stat.S_ISSOCK: "not a regular file (socket)"}


def _not_loadable(path: str) -> str | None:
    """What makes ``path`` impossible to load, found without opening it (so a FIFO never
    blocks this command), or None when it is a readable regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a component of the path is not a directory)"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    for test, what in _FILE_KINDS.items():
        if test(mode):
            return what
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _fuzz(argv: list[str]) -> int:
    """``vmsim fuzz``: vmsim.fuzz parses and checks its own arguments."""
    from vmsim.fuzz import main as fuzz_main

    return fuzz_main(argv)


def _elf_hint(path: str) -> str:
    """"not an ELF file" when the magic is missing, else "an ELF file the loader refuses"."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return "cannot be read"
    return "an ELF file the loader refuses" if magic == b"\x7fELF" else "not an ELF file"


if __name__ == "__main__":
    sys.exit(main())
