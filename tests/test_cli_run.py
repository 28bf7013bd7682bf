"""``vmsim run PROGRAM [ARG ...]``: programs of this machine and gcc-built ones run in a
simulated process, their output and exit status against the real runs (the same program run
by this machine's kernel), and the syscalls such programs need (getdents64 for a directory
listing, the clocks, getxattr, closing stdout)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_support import run_cli, run_command

ENV = ["--clean-env", "--env", "LC_ALL=C", "--env", "TZ=UTC"]
REAL_ENV = {"LC_ALL": "C", "TZ": "UTC"}
CRASH = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    printf("before %s\n", argv[1]);
    fflush(stdout);
    if (argv[1][0] == 's') *(volatile int *)16 = 1;   /* a write to an unmapped page */
    return argv[1][0] == 'x' ? 3 : 0;
}
"""


def _real(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, env=REAL_ENV,
                          timeout=60, check=False)


@pytest.fixture(scope="module")
def listing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of 600 files (more than one getdents64 buffer), a symlink, a subdirectory
    and a FIFO."""
    where = tmp_path_factory.mktemp("listing")
    for k in range(600):
        (where / f"file{k:04d}").write_bytes(b"x" * k)
    (where / "sub").mkdir()
    (where / "link").symlink_to("file0001")
    os.mkfifo(where / "fifo")
    return where


@pytest.mark.parametrize("flags", ["-la", "-1U", "-F"])
def test_ls_lists_a_directory_as_the_real_ls(listing: Path, flags: str) -> None:
    ran = run_command("run", *ENV, "/usr/bin/ls", flags, str(listing))
    real = _real("/usr/bin/ls", flags, str(listing))
    assert (ran.code, ran.out) == (real.returncode, real.stdout)
    assert ran.err == real.stderr
    if flags == "-1U":     # unsorted: the directory's own order, "." and ".." left out
        assert sorted(ran.out.split()) == sorted(os.listdir(listing))


def test_echo_closes_stdout_and_exits_zero() -> None:
    """coreutils close stdout at exit and fail on an error: close(1) must succeed."""
    ran = run_command("run", "/usr/bin/echo", "hello", "world")
    assert (ran.code, ran.out, ran.err) == (0, "hello world\n", "")


def test_date_reads_the_hosts_clock() -> None:
    ran = run_command("run", *ENV, "/usr/bin/date", "+%s")
    assert ran.code == 0 and abs(int(ran.out) - time.time()) < 60


def test_stats_name_what_was_not_served() -> None:
    ran = run_command("run", "--stats", "/usr/bin/true")
    assert ran.code == 0
    lines = ran.err.splitlines()
    assert lines[0].startswith("vmsim: TLB fills ") and "page faults: demand" in lines[0]
    assert lines[1].startswith("vmsim: syscalls: ") and "exit_group 1" in lines[1]
    assert lines[2].startswith("vmsim: not served (ENOSYS): ")


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("crash")
    (where / "crash.c").write_text(CRASH)
    subprocess.run(["gcc", "-O1", "-o", str(where / "crash"), str(where / "crash.c")],
                   check=True)
    return where / "crash"


@pytest.mark.parametrize("word", ["ok", "x", "segv"])
def test_exit_status_as_a_shell_reports_it(crash: Path, word: str) -> None:
    """The program's status, or 128 + the signal when it faulted (the real run's
    returncode is -signal), with the fault's pc named in the program's file."""
    ran = run_cli("run", str(crash), word)
    real = _real(str(crash), word)
    expected = real.returncode if real.returncode >= 0 else 128 - real.returncode
    assert (ran.code, ran.out) == (expected, real.stdout)
    if word == "segv":
        assert expected == 128 + signal.SIGSEGV
        line = ran.one_error_line()
        assert "SIGSEGV (SEGV_MAPERR): write at 0x10" in line
        assert f"in {crash}+0x" in line


def test_an_endless_program_stops_at_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "loop.c").write_text("int main(void) { for (volatile int i = 0; ; i++) ; }\n")
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "loop"), str(tmp_path / "loop.c")],
                   check=True)
    ran = run_cli("run", "--timeout", "1", str(tmp_path / "loop"))
    assert ran.code == 124
    assert "still running after 1 s (--timeout): stopped" in ran.one_error_line()


@pytest.mark.parametrize("argv", [["run", "--env", "NOEQUALS", "/usr/bin/true"],
                                  ["run", "--env", "=x", "/usr/bin/true"]])
def test_a_bad_env_is_a_usage_error(argv: list[str]) -> None:
    ran = run_cli(*argv)
    assert ran.code == 2 and "is not NAME=VALUE" in ran.err


def test_a_file_that_is_no_program_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("hello\n")
    ran = run_cli("run", str(tmp_path / "text"))
    assert ran.code == 2 and "not an ELF file" in ran.one_error_line()
