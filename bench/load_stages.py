"""Where the fixed cost of one small load goes: ``loader.load(data, AddressSpace())`` split
into the pipeline's stages, with Python calls per load beside the time.

Per stage (the pipeline's own functions, so nothing here repeats its logic) it prints the
calls per load, which are deterministic and so comparable across runs and machines, and its
share of the load's time under cProfile. The profiler slows each call by about the same
amount, so the shares lean towards stages that make many small calls; the unprofiled CPU
time of a whole load (fastest of a few repeats) is printed beside them, with the cost of
making and dropping an ``AddressSpace``.

    PYTHONPATH=. python bench/load_stages.py [fuzz|libz|PATH ...]  (a script, not a test)

``fuzz``: 300 images of ``elf_images()`` (a fixed seed), loaded from bytes, as
``vmsim fuzz --property rate`` loads them; ``libz``: the system's libz from its path, as
bench/bench_load.py loads it; a PATH: that file.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import loader
from vmsim import AddressSpace

REPEATS = 5
LIBZ = "/usr/lib/x86_64-linux-gnu/libz.so.1"

STAGES = [
    ("open the source", "pipeline.py", "_open"),
    ("parse headers", "elf.py", "parse_image"),
    ("parse dynamic tables", "tables.py", "parse_tables"),
    ("check relocations", "reloc.py", "check_relocations"),
    ("plan", "plan.py", "make_plan"),
    ("reserve", "mapper.py", "reserve"),
    ("map segments", "mapper.py", "map_plan"),
    ("relocate (binding included)", "reloc.py", "relocate"),
    ("  of which binding", "reloc.py", "_bind"),
    ("init (run or recorded)", "pipeline.py", "LoadedObject.run_init"),
]
"""(label, module file, function): the stages, as the functions that carry them out."""


def fuzz_images(n: int = 300) -> list[bytes]:
    """``n`` images of ``elf_images()``, drawn with a fixed seed."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from vmsim.fuzz.images import elf_images

    out: list[bytes] = []

    @seed(2026)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(elf_images())
    def draw(image: Any) -> None:
        out.append(image.data)

    draw()
    return out


def cpu_per_call(fn: Callable[[], None], n: int) -> float:
    """Seconds of CPU per call: ``fn`` runs ``n`` calls; the fastest of ``REPEATS`` runs."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best / n


def profile_loads(sources: list[Any]) -> pstats.Stats:
    """cProfile of one load of each source, the AddressSpace made outside the profile."""
    profile = cProfile.Profile()
    for source in sources:
        space = AddressSpace()
        profile.enable()
        loader.load(source, space)
        profile.disable()
    return pstats.Stats(profile)


def stage_shares(stats: pstats.Stats) -> list[float]:
    """Per stage, its share of the loads' profiled time (cumulative, as cProfile says)."""
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    total = next(v[3] for (f, _l, name), v in raw.items()
                 if f.endswith("pipeline.py") and name == "load")
    return [sum(v[3] for (f, _l, name), v in raw.items()
                if f.endswith(module) and name == function.split(".")[-1]) / total
            for _label, module, function in STAGES]


def stage_calls(sources: list[Any]) -> list[int]:
    """Per stage, the Python and C calls made while it runs (its own included), counted by
    a profile hook over one load of each source: exact, so comparable across runs."""
    counts = [0] * len(STAGES)
    active: list[int] = []
    codes = {}

    def hook(frame: Any, event: str, _arg: Any) -> None:
        if event not in ("call", "c_call"):
            if event == "return" and active and codes.get(frame.f_code) == active[-1]:
                active.pop()
            return
        for k in set(active):
            counts[k] += 1
        k = codes.get(frame.f_code) if event == "call" else None
        if k is not None:
            counts[k] += 1
            active.append(k)

    for k, (_label, module, function) in enumerate(STAGES):
        codes[_code_of(module, function)] = k
    for source in sources:
        space = AddressSpace()
        sys.setprofile(hook)
        try:
            loader.load(source, space)
        finally:
            sys.setprofile(None)
    return counts


def _code_of(module: str, function: str) -> Any:
    """The code object of ``function`` (``Class.method`` for a method) in ``loader``'s
    ``module`` (its file name)."""
    import importlib

    found: Any = importlib.import_module("loader." + module[:-3])
    for part in function.split("."):
        found = getattr(found, part)
    return found.__code__


def report(name: str, sources: list[Any]) -> None:
    """Print the figures of one set of loads."""
    for source in sources[:3]:
        loader.load(source, AddressSpace())  # warm: imports, caches
    whole = cpu_per_call(lambda: _load_all(sources), len(sources))
    made = cpu_per_call(lambda: _make_spaces(len(sources)), len(sources))
    stats = profile_loads(sources)
    calls = stats.total_calls / len(sources)  # type: ignore[attr-defined]
    print(f"== {name}: {len(sources)} loads; whole load {whole * 1e3:.3f} ms CPU "
          f"(AddressSpace made and dropped: {made * 1e3:.3f} ms); {calls:.0f} calls per load")
    print(f"{'stage':<30} {'calls/load':>10} {'share':>7}")
    counted = stage_calls(sources)
    for (label, _m, _f), n, share in zip(STAGES, counted, stage_shares(stats), strict=True):
        print(f"{label:<30} {n / len(sources):>10.0f} {share:>6.1%}")


def _load_all(sources: list[Any]) -> None:
    for source in sources:
        loader.load(source, AddressSpace())


def _make_spaces(n: int) -> None:
    for _ in range(n):
        AddressSpace()


def main() -> None:
    for name in sys.argv[1:] or ["fuzz", "libz"]:
        sources: list[Any] = (fuzz_images() if name == "fuzz" else
                              [LIBZ] * 100 if name == "libz" else [name] * 100)
        report(name, sources)


if __name__ == "__main__":
    main()
