"""The rseq syscall of a simulated process, against this machine's kernel: glibc registers
the main thread's area at start-up (through ld.so, or a static program's own start), and a
gcc-built program's further rseq calls (glibc registers 32 bytes; Debian's 2.36 says
``__rseq_size`` 20, the features it uses) (again, another area, a wrong signature, bad flags,
unregistering, a short or misaligned area, a kernel address) get the answers the real run
gets. The CPU number itself is not compared (the host has several; the simulator one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import vmsim

RSEQ = r"""
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/auxv.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#define SIG 0x53053053
static struct rseq area __attribute__((aligned(32)));
static char odd[64] __attribute__((aligned(32)));
static long r(void *a, unsigned len, int flags, unsigned sig) {
    long v = syscall(SYS_rseq, a, len, flags, sig);
    return v < 0 ? -errno : v;
}
int main(void) {   /* one call per statement: the order of evaluation is the test's */
    struct rseq *mine = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    printf("size=%u cpu_ok=%d feature=%lu align=%lu\n", __rseq_size,
           __rseq_size ? (int)mine->cpu_id >= 0 : -1, getauxval(27), getauxval(28));
    printf("again=%ld\n", r(mine, 32, 0, SIG));
    printf("other=%ld\n", r(&area, 32, 0, SIG));
    printf("badsig=%ld\n", r(mine, 32, 0, 1));
    printf("flags=%ld\n", r(mine, 32, 2, SIG));
    printf("unreg_badsig=%ld\n", r(mine, 32, 1, 1));
    printf("unreg_other=%ld\n", r(&area, 32, 1, SIG));
    printf("unreg_flags=%ld\n", r(mine, 32, 3, SIG));
    printf("unreg=%ld\n", r(mine, 32, 1, SIG));
    printf("cpu_after=%d\n", (int)mine->cpu_id);
    printf("unreg_again=%ld\n", r(mine, 32, 1, SIG));
    printf("short=%ld\n", r(&area, 16, 0, SIG));
    printf("misaligned=%ld\n", r(odd + 8, 32, 0, SIG));
    printf("long_misaligned=%ld\n", r(odd + 8, 40, 0, SIG));
    printf("long_short=%ld\n", r(odd, 24, 0, SIG));
    printf("kernel=%ld\n", r((void *)0xffff800000000000, 32, 0, SIG));
    area.cpu_id = 77;
    printf("new=%ld\n", r(&area, 32, 0, SIG));
    printf("new_cpu_ok=%d\n", (int)area.cpu_id >= 0 && area.cpu_id != 77);
    printf("unreg_new=%ld\n", r(&area, 32, 1, SIG));
    printf("long=%ld\n", r(odd, 64, 0, SIG));
    return 0;
}
"""


@pytest.mark.parametrize("flags", [[], ["-static-pie"]], ids=["dynamic", "static-pie"])
def test_rseq_answers_as_the_real_kernel(tmp_path: Path, flags: list[str]) -> None:
    (tmp_path / "rseq.c").write_text(RSEQ)
    program = tmp_path / "rseq"
    subprocess.run(["gcc", "-O1", *flags, "-o", str(program), str(tmp_path / "rseq.c")],
                   check=True)
    real = subprocess.run([str(program)], capture_output=True, check=True, timeout=60)
    assert b"cpu_ok=1" in real.stdout and b"unreg=0" in real.stdout  # glibc had registered
    with vmsim.Process(timeout=60) as proc:
        assert proc.exec(program) == 0
        assert proc.stdout == real.stdout
        assert proc.stats.enosys.get("rseq") is None
