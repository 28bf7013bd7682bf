"""Draw the architecture picture of docs/DESIGN.md: python scripts/make_architecture_figure.py

Nothing in the picture is placed by hand except the grouping of modules into named parts
(``PARTS`` below). The script reads every module of ``loader/`` and ``vmsim/`` with ``ast``,
finds who imports whom, and lays the parts out in bands: a part sits one band above the highest
part it imports, so every arrow points down, to what it uses. The script fails, and names the
module, when a module belongs to no part or to two, or when parts import each other in a
circle: the picture cannot drift from the code.

    python scripts/make_architecture_figure.py [-o docs/img/architecture.png]
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import textwrap
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "architecture.png"
PACKAGES = ("loader", "vmsim")

# (part, what it is, module patterns). A module belongs to the part whose pattern it matches;
# package __init__ modules are entry points that re-export and belong to no part.
PARTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("interface", "the Mmap protocol, pages, errors, ELF definitions",
     ("loader.mmap", "loader.pages", "loader.errors", "loader.elfdefs")),
    ("parsing", "ELF header, segments, dynamic tables",
     ("loader.elf", "loader.tables")),
    ("plan", "segments to a span: the page-aligned mappings",
     ("loader.plan",)),
    ("narration", "a load told step by step (a null narrator by default)",
     ("loader.explain", "loader.narrat*")),
    ("pipeline", "reserve, map, relocate, bind, protect",
     ("loader.mapper", "loader.reloc", "loader.symbols", "loader.lazy", "loader.pipeline")),
    ("records", "the calls a load made, its comparable outcome",
     ("loader.outcome", "loader.trace")),
    ("compare", "one load on two backends, outcome against outcome",
     ("loader.compare",)),
    ("host backend", "mmap/mprotect/munmap of this process",
     ("loader.libc",)),
    ("host process", "this process's own objects; dynamic TLS and .eh_frame for ours",
     ("loader.resident", "loader.hosttls", "loader.ehframe")),
    ("library search", "DT_NEEDED names to files as ld.so finds them; ld.so.cache",
     ("loader.search", "loader.ldcache")),
    ("process image", "a closure as ld.so builds it: scope, bindings, TLS, init, start-up",
     ("loader.linkmap", "loader.scope", "loader.binding", "loader.tls", "loader.rtld_start")),
    ("supervisor", "run a function in a forked child, under bounds",
     ("loader.isolate",)),
    ("MMU layer", "page table, frames, translate(va, access), the access paths",
     ("vmsim.mmu", "vmsim.pagetable", "vmsim.fault")),
    ("kernel layer", "VMAs, mmap semantics, placement, files, the page-fault handler",
     ("vmsim.kernel", "vmsim.remap", "vmsim.vma", "vmsim.files", "vmsim.placement",
      "vmsim.syscall_args", "vmsim.invariants")),
    ("AddressSpace", "the simulator's façade: the Mmap protocol and a debugger's view",
     ("vmsim.space",)),
    ("CPU", "vmsim.Process: Unicorn with vmsim as its MMU, the simulator as its kernel",
     ("vmsim.cpu", "vmsim.syscalls", "vmsim.sysinfo", "vmsim.dirents", "vmsim.signals",
      "vmsim.rseq", "vmsim.memcalls", "vmsim.process", "vmsim.execve")),
    ("fuzzing kit", "ELF writer, strategies, properties, campaign",
     ("vmsim.fuzz", "vmsim.fuzz.*", "vmsim.strategies", "loader.strategies",
      "vmsim._hypothesis_plugin")),
    ("arguments", "bounded command-line values, one-line errors",
     ("vmsim.arguments",)),
    ("corpus sweep", "every ELF file of the machine",
     ("vmsim.sweep",)),
    ("pictures", "maps and page states in matplotlib",
     ("vmsim.viz",)),
    ("command", "vmsim load/maps/ldd/why/diff/plot/run/fuzz",
     ("vmsim.cli", "vmsim.deps", "vmsim.runcmd", "vmsim.__main__")),
)

EVERYONE_USES = "interface"   # its arrows are left out of the picture: nearly every part has one
PACKAGE_COLOURS = {"loader": "#dbe9f6", "vmsim": "#fde3c8"}


@dataclass
class Part:
    """One named part of the code: its modules, the parts it imports, and its band."""

    name: str
    what: str
    modules: list[str] = field(default_factory=list)
    imports: set[str] = field(default_factory=set)
    band: int = 0

    @property
    def package(self) -> str:
        """The package most of its modules live in."""
        tops = Counter(m.split(".")[0] for m in sorted(self.modules))
        return tops.most_common(1)[0][0]


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (``loader.reloc``; ``vmsim`` for __init__)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the packages that module ``name`` imports (``from p import m`` counts m
    when m is a module, else p)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            subs = {f"{base}.{alias.name}" for alias in node.names}
            out.update(subs & known.keys() or ({base} & known.keys()))
    out.discard(name)
    return out


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for type
    annotations only, not dependencies at run time)."""
    skipped = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
               and "TYPE_CHECKING" in ast.unparse(stmt.test) for b in stmt.body
               for n in ast.walk(b)}
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module an ``ImportFrom`` names (resolving leading dots)."""
    if not node.level:
        return node.module or ""
    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def part_of(module: str) -> str | None:
    """The name of the part ``module`` belongs to; None for a package's __init__ entry point.

    Raises SystemExit naming the module when it matches no part or more than one."""
    owners = [name for name, _, patterns in PARTS
              if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    if len(owners) == 1:
        return owners[0]
    if not owners and module in PACKAGES:
        return None
    raise SystemExit(f"{module}: belongs to {owners or 'no part'}; edit PARTS in {__file__}")


def architecture() -> dict[str, Part]:
    """The parts with their modules, the parts each imports (through __init__ re-exports too),
    and their bands. Raises SystemExit on an unplaced module or a circle between parts."""
    known = modules()
    parts = {name: Part(name, what) for name, what, _ in PARTS}
    owner = {m: part_of(m) for m in known}
    for module, path in known.items():
        if owner[module] is None:
            continue
        parts[owner[module]].modules.append(module)
        for used in _through_entry_points(imported_modules(module, path, known), known):
            if owner.get(used) not in (None, owner[module]):
                parts[owner[module]].imports.add(str(owner[used]))
    _assign_bands(parts)
    return {n: p for n, p in parts.items() if p.modules}


def _through_entry_points(used: set[str], known: dict[str, Path]) -> set[str]:
    """``used`` with each package entry point replaced by the modules it re-exports from."""
    out = {m for m in used if m not in PACKAGES}
    for package in used & set(PACKAGES):
        out |= imported_modules(package, known[package], known) - set(PACKAGES)
    return out


def _assign_bands(parts: dict[str, Part]) -> None:
    """Band = 1 + the highest band among the parts imported (0 for none). Raises SystemExit
    naming the parts when they import each other in a circle."""
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise SystemExit("parts import each other in a circle: "
                             + " -> ".join([*path[path.index(name):], name]))
        part = parts[name]
        if name not in done:
            part.band = 1 + max((visit(u, (*path, name)) for u in part.imports), default=-1)
            done.add(name)
        return part.band

    for name in parts:
        visit(name, ())


def direct_arrows(parts: dict[str, Part]) -> list[tuple[str, str]]:
    """Import arrows between parts, leaving out an arrow a->c when a->b->...->c says it."""
    def reach(start: str, skip: str) -> set[str]:
        seen, todo = set(), [u for u in parts[start].imports if u != skip]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(parts[name].imports)
        return seen

    return sorted((a, b) for a, part in parts.items() for b in part.imports
                  if b in parts and b != EVERYONE_USES and b not in reach(a, b))


def draw(parts: dict[str, Part], out: Path) -> Path:
    """Draw the bands bottom up, loader's parts left and vmsim's right, and save to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Patch

    rows = _rows(parts)
    width = max(len(r) for r in rows.values())
    fig, ax = plt.subplots(figsize=(3.1 * width, 1.55 * len(rows)))
    centre: dict[str, tuple[float, float]] = {}
    for band, names in rows.items():
        for i, name in enumerate(names):
            x, y = (i + 0.5) * width / len(names) * 3.1, band * 1.55
            centre[name] = (x, y)
            part = parts[name]
            ax.add_patch(FancyBboxPatch((x - 1.35, y - 0.5), 2.7, 1.0,
                                        boxstyle="round,pad=0.02",
                                        fc=PACKAGE_COLOURS[part.package], ec="#555555"))
            ax.text(x, y + 0.3, name, ha="center", va="center", weight="bold", fontsize=9)
            ax.text(x, y + 0.06, textwrap.fill(part.what, 38), ha="center", va="center",
                    fontsize=6.5, style="italic")
            listing = ", ".join(_listing(part))
            ax.text(x, y - 0.25, textwrap.fill(listing, 48), ha="center", va="center",
                    fontsize=6, family="monospace")
    for a, b in direct_arrows(parts):
        (xa, ya), (xb, yb) = centre[a], centre[b]
        ax.annotate("", xy=(xb, yb + 0.5), xytext=(xa, ya - 0.5),
                    arrowprops={"arrowstyle": "-|>", "color": "#444444", "lw": 0.8,
                                "shrinkA": 1, "shrinkB": 1})
    ax.legend(handles=[Patch(fc=c, ec="#555555", label=f"{p}/") for p, c in
                       PACKAGE_COLOURS.items()], loc="upper left", fontsize=8, frameon=False)
    ax.set_title("vmsim: each part imports only parts below it\n(arrows: direct imports;"
                 f" nearly every part imports the {EVERYONE_USES}, those arrows are left out)",
                 fontsize=10)
    ax.set_xlim(-0.1, width * 3.1 + 0.1)
    ax.set_ylim(-0.7, (len(rows) - 1) * 1.55 + 0.9)
    ax.axis("off")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _listing(part: Part) -> list[str]:
    """How a part's modules are named in its box: without the part's package, a subpackage
    as one entry (``fuzz/ (15 modules)``), a module of the other package in full."""
    names: dict[str, int] = {}
    for module in sorted(part.modules):
        package, _, rest = module.partition(".")
        top = rest.split(".")[0]
        is_package = any(m.startswith(f"{package}.{top}.") for m in part.modules)
        name = module if package != part.package else f"{top}/" if is_package else rest
        names[name] = names.get(name, 0) + 1
    return [f"{n} ({k} modules)" if n.endswith("/") else n for n, k in names.items()]


def _rows(parts: dict[str, Part]) -> dict[int, list[str]]:
    """Part names by band, bottom up. Band 0 in the order of PARTS; each band above ordered by
    the mean position of the parts it imports, which keeps arrows short and mostly uncrossed."""
    order = {name: i for i, (name, _, _) in enumerate(PARTS)}
    rows: dict[int, list[str]] = {}
    for name in sorted(parts, key=order.__getitem__):
        rows.setdefault(parts[name].band, []).append(name)
    place: dict[str, float] = {}
    for band in sorted(rows):
        if band:
            rows[band].sort(key=lambda n: _mean(place[u] for u in parts[n].imports))
        for i, name in enumerate(rows[band]):
            place[name] = (i + 0.5) / len(rows[band])
    return dict(sorted(rows.items()))


def _mean(values: Iterable[float]) -> float:
    """The mean of ``values`` (0.5, the middle, for none)."""
    numbers = list(values)
    return sum(numbers) / len(numbers) if numbers else 0.5


def main(argv: list[str] | None = None) -> int:
    """Compute the architecture from the code and draw it."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=OUT, help="PNG to write")
    args = parser.parse_args(argv)
    print(draw(architecture(), args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
