"""mremap made by code running in a vmsim.Process: a gcc-built program (static-pie, and
dynamically linked through this machine's ld.so) grows a mapping with MREMAP_MAYMOVE, checks
its data, shrinks it, swaps two pages with MREMAP_FIXED and moves one away with
MREMAP_DONTUNMAP (a stale TLB entry would show the old page), and lets glibc's realloc of a
1 MiB (mmapped) block to 4 MiB go through mremap; stdout and exit status equal the real
run's under ``setarch -R``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import vmsim

PROGRAM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void grow_and_shrink(long page) {
    char *p = mmap(NULL, 5 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(p + 4 * page, page, PROT_READ);          /* no room to grow in place */
    for (long i = 0; i < 4 * page; i++) p[i] = (char)(i * 7);
    char *q = mremap(p, 4 * page, 64 * page, 0);
    printf("without maymove: %s errno=%d\n", q == MAP_FAILED ? "failed" : "ok", errno);
    q = mremap(p, 4 * page, 64 * page, MREMAP_MAYMOVE);
    int kept = 1;
    long sum = 0;
    for (long i = 0; i < 4 * page; i++) kept &= q[i] == (char)(i * 7);
    for (long i = 4 * page; i < 64 * page; i++) sum += q[i];
    q[64 * page - 1] = 1;
    printf("moved=%d kept=%d zeros=%ld\n", q != p, kept, sum);
    char *r = mremap(q, 64 * page, 2 * page, 0);
    printf("shrunk in place=%d data=%d\n", r == q, r[page + 5] == (char)((page + 5) * 7));
    r = mremap(r, 2 * page, 3 * page, 0);            /* the page above is free again */
    printf("grown in place=%d new page=%d\n", r == q, r[2 * page + 9]);
}

static void swap_pages(long page) {
    char *a = mmap(NULL, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    a[0] = 'A';
    a[page] = 'B';
    munmap(a + 2 * page, page);
    volatile char seen = a[0] + a[page];               /* both pages in the TLB */
    (void)seen;
    mremap(a, page, page, MREMAP_MAYMOVE | MREMAP_FIXED, a + 2 * page);
    mremap(a + page, page, page, MREMAP_MAYMOVE | MREMAP_FIXED, a);
    mremap(a + 2 * page, page, page, MREMAP_MAYMOVE | MREMAP_FIXED, a + page);
    printf("swapped=%c%c\n", a[0], a[page]);
    char *d = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    d[0] = 'D';
    seen = d[0];                                       /* in the TLB */
    char *e = mremap(d, page, page, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, NULL);
    printf("dontunmap: old=%d new=%c\n", d[0], e[0]);  /* the old page is empty now */
}

static void big_realloc(void) {
    char *m = malloc(1 << 20);
    memset(m, 0x5a, 1 << 20);
    char *m2 = realloc(m, 4 << 20);
    int kept = 1;
    for (int i = 0; i < 1 << 20; i++) kept &= m2[i] == 0x5a;
    memset(m2 + (1 << 20), 1, 3 << 20);
    printf("realloc kept=%d last=%d\n", kept, m2[(4 << 20) - 1]);
    free(m2);
}

int main(void) {
    long page = sysconf(_SC_PAGESIZE);
    grow_and_shrink(page);
    swap_pages(page);
    big_realloc();
    return 17;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The program built as static-pie and as a dynamically linked PIE."""
    where = tmp_path_factory.mktemp("mremap_programs")
    src = where / "remap.c"
    src.write_text(PROGRAM)
    built = {}
    for kind, flags in (("static-pie", ["-static-pie"]), ("dynamic", [])):
        out = where / f"remap-{kind}"
        subprocess.run(["gcc", "-O1", *flags, "-o", str(out), str(src)], check=True)
        built[kind] = out
    return built


@pytest.mark.parametrize("kind", ["static-pie", "dynamic"])
def test_a_program_calling_mremap_matches_the_real_run(programs: dict[str, Path],
                                                        kind: str) -> None:
    path = programs[kind]
    real = subprocess.run(["setarch", "-R", str(path)], capture_output=True, timeout=60,
                          check=False)
    assert b"swapped=BA" in real.stdout and b"dontunmap: old=0 new=D" in real.stdout
    assert b"realloc kept=1" in real.stdout
    with vmsim.Process(timeout=60) as proc:
        status = proc.exec(path, argv=[str(path)], env={})
        assert (proc.stdout, proc.stderr) == (real.stdout, real.stderr)
        assert status == real.returncode == 17
        stats = proc.stats
        assert stats.syscalls["mremap"] >= 9     # realloc's own among them
        assert "mremap" not in stats.enosys
