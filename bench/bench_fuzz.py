"""Benchmark: hypothesis-generated ELF images loaded on the simulator, in one run.

Prints, per example (medians of repeats, milliseconds):
  1. hypothesis' bare draw cost: a trivial strategy drawing as many primitive choices as an
     ``elf_images()`` example does on average, through the same ``@given`` machinery;
  2. our generation cost: ``@given(elf_images())`` with an empty body (it includes 1), and
     what it costs beyond the bare draws (the strategies' own code and the ELF writer);
  3. the load cost: ``loader.load(image.data, AddressSpace())`` on images generated
     beforehand, split into the simulator's AddressSpace construction and teardown and the
     loader's own work;
  4. images/s: generation + load under ``@given``, and the same through the supervised
     worker of ``vmsim fuzz --property rate`` (target: >= 500 images/s);
  5. the worker's time per image split into those parts.

Times are CPU seconds of this process (``time.process_time``; for the supervised worker, its
CPU time from ``getrusage(RUSAGE_CHILDREN)``), the fastest of a few repeats: the machine is
shared, and wall-clock figures swing by 2x with the neighbours' load. The wall-clock rate of
the supervised campaign is printed beside its CPU rate.

Run: PYTHONPATH=. python bench/bench_fuzz.py [EXAMPLES]  (a script, not a test)
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.control import current_build_context

import loader
from vmsim import AddressSpace
from vmsim.fuzz import run_campaign
from vmsim.fuzz.elfwriter import ElfImage
from vmsim.fuzz.images import _blob_size, elf_images

REPEATS = 3


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def run_given(strategy: st.SearchStrategy[Any], body: Callable[[Any], None], n: int) -> float:
    """Seconds per example of ``n`` examples of ``strategy`` through ``@given``."""
    test = _settings(n)(given(strategy)(body))
    t0 = time.process_time()
    test()
    return (time.process_time() - t0) / n


def fastest(fn: Callable[[], float]) -> float:
    """The least of ``REPEATS`` calls of ``fn`` (the one the neighbours disturbed least)."""
    return min(fn() for _ in range(REPEATS))


def choices_per_example(n: int) -> tuple[float, list[ElfImage]]:
    """The mean number of primitive choices an ``elf_images()`` example makes, and the images
    drawn while counting."""
    counts: list[int] = []
    images: list[ElfImage] = []

    def body(image: ElfImage) -> None:
        counts.append(len(current_build_context().data.choices))
        images.append(image)

    run_given(elf_images(), body, n)
    return statistics.mean(counts), images


def load_costs(images: list[ElfImage]) -> tuple[float, float, float]:
    """Seconds per image: AddressSpace() construction + teardown alone, and a whole load
    (construction, load, teardown), over ``images``."""
    def spaces() -> float:
        t0 = time.process_time()
        for _ in images:
            space = AddressSpace()
            del space
        return (time.process_time() - t0) / len(images)

    def loads() -> float:
        t0 = time.process_time()
        for image in images:
            loader.load(image.data, AddressSpace())
        return (time.process_time() - t0) / len(images)

    space, whole = fastest(spaces), fastest(loads)
    return space, whole, whole - space


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    gc.collect()
    gc.freeze()  # as the campaign's worker does: the collector skips what exists now
    choices, images = choices_per_example(n)
    k = max(1, round(choices))
    bare = fastest(lambda: run_given(st.tuples(*[st.integers(0, 2**20)] * k),
                                     lambda _v: None, n))
    size = _blob_size(4, 6, 12)  # the default knobs
    bare_blob = fastest(lambda: run_given(st.binary(min_size=size, max_size=size),
                                          lambda _v: None, n))
    gen = fastest(lambda: run_given(elf_images(), lambda _v: None, n))
    space, whole, own = load_costs(images)
    def load(image: ElfImage) -> None:
        loader.load(image.data, AddressSpace())

    both = fastest(lambda: run_given(elf_images(), load, n))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = run_campaign(max(5.0, 10 * n * both), kind="rate", max_examples=n)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    ms = 1e3
    print(f"examples per figure: {n}, CPU time, fastest of {REPEATS}")
    print(f"primitive choices per elf_images() example: {choices:.1f}")
    print(f"1. hypothesis bare draw ({k} integer choices): {bare * ms:.3f} ms/example; "
          f"one {size}-byte blob (what elf_images draws): {bare_blob * ms:.3f} ms/example")
    print(f"2. our generation (elf_images, empty body):  {gen * ms:.3f} ms/example "
          f"({(gen - bare) * ms:.3f} ms beyond the bare draw)")
    print(f"3. load on the simulator:                     {whole * ms:.3f} ms/image "
          f"(AddressSpace construction+teardown {space * ms:.3f}, loader {own * ms:.3f})")
    print(f"4. generation + load under @given:            {1 / both:.0f} images/s "
          f"({both * ms:.3f} ms/image)")
    per_image = worker_cpu / stats.examples
    print(f"   vmsim fuzz --property rate (supervised):   {1 / per_image:.0f} "
          f"images/s of worker CPU ({stats.rate():.0f}/s wall clock, {stats.examples} in "
          f"{stats.seconds:.2f}s; target >= 500/s)")
    print(f"5. per image in the worker: {per_image * ms:.3f} ms = hypothesis' bare draw "
          f"{bare_blob * ms:.3f} + our generation {(gen - bare_blob) * ms:.3f} + load "
          f"{whole * ms:.3f} + the rest {(per_image - gen - whole) * ms:.3f} (the property "
          "loop, and what loading inside @given costs beyond loading in a plain loop)")


if __name__ == "__main__":
    main()
