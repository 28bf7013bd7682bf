"""Ordinary programs in a ``vmsim.Process``: this machine's own tools and a gcc-built program
that exercises the working directory, descriptor flags, file-system statistics and signal
dispositions, each against the same program run natively (same stdout, same exit status).
vmsim's own working directory never moves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import vmsim

SYSCALLS = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/vfs.h>
static void on_usr1(int sig) { (void)sig; }
int main(int argc, char **argv) {
    char cwd[4096];
    if (chdir(argv[1]) != 0) return 10;
    printf("cwd ends %s\n", strrchr(getcwd(cwd, sizeof cwd), '/'));
    int fd = open("data.txt", O_RDONLY);                    /* relative: from the new cwd */
    char text[6] = {0};
    printf("read %zd %s\n", read(fd, text, 5), text);
    printf("getfd %d getfl %d\n", fcntl(fd, F_GETFD), fcntl(fd, F_GETFL) & O_ACCMODE);
    printf("setfd %d getfd %d\n", fcntl(fd, F_SETFD, FD_CLOEXEC), fcntl(fd, F_GETFD));
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 10);
    printf("dup %d cloexec %d stdout getfl %d\n", dup, fcntl(dup, F_GETFD),
           fcntl(1, F_GETFL) & O_ACCMODE);
    printf("bad fcntl %d errno %d\n", fcntl(99, F_GETFD), errno);
    int dir = open("..", O_RDONLY | O_DIRECTORY);
    printf("fchdir %d cwd ends %s\n", fchdir(dir), strrchr(getcwd(cwd, sizeof cwd), '/'));
    printf("fchdir to a file %d errno %d\n", fchdir(fd), errno);
    printf("chdir nowhere %d errno %d\n", chdir("no/such/dir"), errno);
    struct statfs a, b;
    printf("statfs same type %d\n", statfs(".", &a) == 0 && fstatfs(fd, &b) == 0
           && a.f_type == b.f_type && a.f_bsize > 0);
    struct sigaction act = {0}, old;
    act.sa_handler = on_usr1;
    sigaction(SIGUSR1, &act, NULL);
    sigaction(SIGUSR1, NULL, &old);
    printf("handler kept %d, kill 0: %d\n", old.sa_handler == on_usr1, kill(getpid(), 0));
    printf("sigaction SIGKILL %d errno %d\n", sigaction(SIGKILL, &act, NULL), errno);
    sigset_t set, was;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGKILL);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigprocmask(SIG_BLOCK, NULL, &was);
    printf("usr2 blocked %d kill blocked %d\n", sigismember(&was, SIGUSR2),
           sigismember(&was, SIGKILL));
    printf("raise blocked usr2 %d\n", raise(SIGUSR2));
    signal(SIGTERM, SIG_IGN);
    printf("raise ignored term %d\n", raise(SIGTERM));
    stack_t small = {.ss_sp = malloc(64), .ss_size = 64, .ss_flags = 0};
    printf("small altstack %d errno %d\n", sigaltstack(&small, NULL), errno);
    stack_t now;
    sigaltstack(NULL, &now);
    printf("altstack disabled %d\n", now.ss_flags == SS_DISABLE);
    fflush(stdout);
    if (argc > 2) abort();
    return 7;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The program, and a directory holding data.txt for it to chdir into."""
    where = tmp_path_factory.mktemp("programs")
    (where / "syscalls.c").write_text(SYSCALLS)
    subprocess.run(["gcc", "-O1", "-o", str(where / "syscalls"), str(where / "syscalls.c")],
                   check=True)
    (where / "inner").mkdir()
    (where / "inner" / "data.txt").write_text("hello, world\n")
    return where / "syscalls", where / "inner"


@pytest.mark.parametrize("aborts", [False, True])
def test_a_program_using_cwd_fcntl_statfs_and_signals_runs_as_natively(
        program: tuple[Path, Path], aborts: bool) -> None:
    path, inner = program
    argv = [str(path), str(inner), *(["abort"] if aborts else [])]
    real = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert b"read 5 hello" in real.stdout and b"handler kept 1" in real.stdout
    before = os.getcwd()
    with vmsim.Process(timeout=60) as proc:
        if aborts:
            with pytest.raises(vmsim.Killed) as killed:
                proc.exec(path, argv=argv)
            assert -killed.value.signum == real.returncode
            assert killed.value.signal == "SIGABRT"
        else:
            assert proc.exec(path, argv=argv) == real.returncode == 7
        assert proc.stdout == real.stdout
    assert os.getcwd() == before


@pytest.mark.parametrize("argv", [
    ["/usr/bin/sort", "-r", "lines.txt"],
    ["/usr/bin/find", ".", "-name", "*.txt"],
    ["/usr/bin/sha256sum", "lines.txt"],
    ["/usr/bin/grep", "-c", "b", "lines.txt"],
    ["/usr/bin/python3", "-c", "import os, sys; print(sorted(os.listdir('.')), sys.argv)"],
    ["/usr/bin/stat", "-f", "-c", "%T %b", "."],
], ids=["sort", "find", "sha256sum", "grep", "python3", "stat-f"])
def test_tools_of_this_machine_with_relative_paths(tmp_path: Path, argv: list[str]) -> None:
    """Relative paths go from the working directory the program starts in (the host's)."""
    (tmp_path / "lines.txt").write_text("b\na\nc\nab\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.txt").write_text("x\n")
    env = {"LC_ALL": "C"}
    real = subprocess.run(argv, capture_output=True, cwd=tmp_path, env=env, timeout=60,
                          check=False)
    assert real.returncode == 0
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        with vmsim.Process(timeout=120) as proc:
            status = proc.exec(argv[0], argv=argv, env=env)
            assert (status, proc.stdout) == (real.returncode, real.stdout)
    finally:
        os.chdir(before)


SLEEP_AND_NULL = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    struct timespec a, b, nap = {0, 100 * 1000 * 1000};
    clock_gettime(CLOCK_MONOTONIC, &a);
    int slept = nanosleep(&nap, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
    printf("nanosleep %d at least 100 ms %d\n", slept, ms >= 100);
    struct timespec bad = {0, 2000000000L};
    printf("bad timespec %d\n", nanosleep(&bad, NULL));
    int null = open("/dev/null", O_WRONLY);
    printf("null open %d write %zd\n", null >= 0, write(null, "gone", 4));
    return 0;
}
"""


def test_sleeping_and_writing_to_dev_null_as_natively(tmp_path: Path) -> None:
    (tmp_path / "t.c").write_text(SLEEP_AND_NULL)
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")],
                   check=True)
    real = subprocess.run([str(tmp_path / "t")], capture_output=True, timeout=60, check=True)
    assert b"at least 100 ms 1" in real.stdout and b"write 4" in real.stdout
    with vmsim.Process(timeout=60) as proc:
        assert proc.exec(tmp_path / "t") == 0
        assert proc.stdout == real.stdout


def test_git_opens_dev_null_for_writing() -> None:
    """git refuses to start when /dev/null cannot be opened read-write."""
    real = subprocess.run(["/usr/bin/git", "--version"], capture_output=True, timeout=60,
                          check=True)
    with vmsim.Process(timeout=60) as proc:
        assert proc.exec("/usr/bin/git", argv=["git", "--version"]) == 0
        assert proc.stdout == real.stdout


def test_a_long_sleep_ends_at_the_time_limit() -> None:
    with vmsim.Process(timeout=1.0) as proc:
        with pytest.raises(TimeoutError):
            proc.exec("/usr/bin/sleep", argv=["sleep", "30"])
