"""vmsim.Process.exec: gcc-built programs (static-pie, and dynamically linked through this
machine's own ld.so running on the simulated CPU) against their real runs under
``setarch -R`` (same stdout, same exit status); the initial stack as binfmt_elf builds it;
faults and the time limit; the syscalls exec'ed programs need (access, readlink, ioctl,
fstat of stdio)."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from test_process_syscalls import syscall

import vmsim
from loader.errors import ElfError
from loader.mmap import Region
from loader.pages import page_round_up
from vmsim.execve import AT, build_stack

REPORT = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/auxv.h>
int main(int argc, char **argv, char **envp) {
    void *brk = sbrk(0);   /* where Linux put the break, without randomization */
    size_t total = 0;
    for (int i = 0; i < argc; i++) total += strlen(argv[i]);
    char *copy = malloc(total + 1000);
    copy[0] = 0;
    for (int i = 1; i < argc; i++) strcat(strcat(copy, argv[i]), "+");
    printf("argc=%d joined=%s\n", argc, copy);
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    for (char **e = envp; *e; e++) printf("env %s\n", *e);
    printf("brk=%p interp=%d\n", brk, getauxval(AT_BASE) != 0);
    printf("pagesz=%lu phent=%lu phnum=%lu secure=%lu uid=%lu egid=%lu clktck=%lu\n",
           getauxval(AT_PAGESZ), getauxval(AT_PHENT), getauxval(AT_PHNUM),
           getauxval(AT_SECURE), getauxval(AT_UID), getauxval(AT_EGID), getauxval(AT_CLKTCK));
    printf("platform=%s execfn=%s\n", (char *)getauxval(AT_PLATFORM),
           (char *)getauxval(AT_EXECFN));
    printf("entry-phdr=%ld\n", (long)(getauxval(AT_ENTRY) - getauxval(AT_PHDR)));
    char *big = malloc(1 << 20);   /* past the brk heap's first step: mmap or brk grows */
    memset(big, 7, 1 << 20);
    printf("big=%d\n", big[12345]);
    free(big);
    free(copy);
    return argc + 40;
}
"""
LOOP = "int main(void) { for (volatile int i = 0; ; i++) ; }\n"
WRITE_RODATA = r"""
const char message[] = "read-only";
int main(void) { *(volatile char *)&message[2] = 'X'; return 0; }
"""
PRINT_MAPS = r"""
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    char *p = malloc(100);
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    if (!f) return 3;
    while (fgets(line, sizeof line, f)) fputs(line, stdout);
    fclose(f);
    free(p);
    return 0;
}
"""
CPP = r"""
#include <iostream>
#include <string>
#include <vector>
int main(int argc, char **argv) {
    std::vector<std::string> args(argv, argv + argc);
    for (const auto &a : args) std::cout << a.size() << " [" << a << "]\n";
    return 5;
}
"""
ARGV = ["one", "two three", ""]
ENV = {"X": "1", "LANG": "C", "EMPTY": ""}


def _gcc(source: str, out: Path, *flags: str, compiler: str = "gcc") -> Path:
    """``source`` compiled by gcc (or ``compiler``) into ``out``."""
    src = out.with_suffix(".cc" if compiler == "g++" else ".c")
    src.write_text(source)
    subprocess.run([compiler, "-O1", *flags, "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The programs, built once per module: the report as static-pie, dynamically linked
    PIE, static (ET_EXEC) and dynamically linked ET_EXEC (-no-pie); the infinite loop, the
    write to .rodata and the maps printer as static-pie (the printer also dynamic)."""
    where = tmp_path_factory.mktemp("exec_programs")
    return {"static-pie": _gcc(REPORT, where / "report_spie", "-static-pie"),
            "dynamic": _gcc(REPORT, where / "report_dyn"),
            "static": _gcc(REPORT, where / "report_static", "-static"),
            "no-pie": _gcc(REPORT, where / "report_nopie", "-no-pie"),
            "c++": _gcc(CPP, where / "cpp", compiler="g++"),
            "loop": _gcc(LOOP, where / "loop", "-static-pie"),
            "maps static-pie": _gcc(PRINT_MAPS, where / "maps_spie", "-static-pie"),
            "maps dynamic": _gcc(PRINT_MAPS, where / "maps_dyn"),
            "rodata": _gcc(WRITE_RODATA, where / "rodata", "-static-pie")}


def _real(path: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The program run by this machine's kernel without address randomization."""
    return subprocess.run(["setarch", "-R", str(path), *argv[1:]], env=env,
                          capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("kind", ["static-pie", "dynamic", "static", "no-pie"])
def test_exec_matches_the_real_run(programs: dict[str, Path], kind: str) -> None:
    path = programs[kind]
    argv = [str(path), *ARGV]
    real = _real(path, argv, ENV)
    with vmsim.Process(timeout=60) as proc:
        status = proc.exec(path, argv=argv, env=ENV)
        assert (proc.stdout, proc.stderr) == (real.stdout, real.stderr)
        assert status == real.returncode == len(argv) + 40
        assert proc.exit_status == status
        assert b"interp=%d" % (kind in ("dynamic", "no-pie")) in proc.stdout
        assert proc.stats.syscalls["exit_group"] == 1


def test_a_cplusplus_program_with_libstdcxx_matches_the_real_run(
        programs: dict[str, Path]) -> None:
    """libstdc++, libm, libgcc_s and libc loaded by ld.so; pthread_once's futex wake."""
    path = programs["c++"]
    argv = [str(path), *ARGV]
    real = _real(path, argv, ENV)
    with vmsim.Process(timeout=60) as proc:
        assert proc.exec(path, argv=argv, env=ENV) == real.returncode == 5
        assert proc.stdout == real.stdout
        paths = {os.path.basename(r.path) for r in proc.space.maps()}
        assert {"libm.so.6", "libgcc_s.so.1", "libc.so.6"} <= paths
        assert any(name.startswith("libstdc++.so.6") for name in paths)   # the real file


def test_dynamic_program_runs_through_ld_so_which_maps_libc(programs: dict[str, Path]) -> None:
    with vmsim.Process(timeout=60) as proc:
        proc.exec(programs["dynamic"], argv=["report"])
        assert proc.image is not None and proc.image.interp is not None
        assert proc.image.start == proc.image.interp.entry
        assert proc.image.program.interp == "/lib64/ld-linux-x86-64.so.2"
        calls = proc.stats.syscalls
        assert calls["openat"] >= 2 and calls["mmap"] >= 4     # ld.so.cache, libc.so.6
        libc = [r for r in proc.space.maps() if r.path.endswith("libc.so.6")]
        assert any("x" in r.perms for r in libc)
        assert proc.space.maps()[0].start == 0x5555_5555_4000     # as setarch -R shows it


def _by_object(maps: bytes) -> dict[str, list[tuple[int, int, str, int]]]:
    """A /proc/self/maps text's file-backed regions by path, each as (start, end) relative
    to the object's lowest address, its permissions and its file offset."""
    regions = [Region.parse(line) for line in maps.decode().splitlines()]
    out: dict[str, list[tuple[int, int, str, int]]] = {}
    for r in regions:
        if r.path.startswith("/"):
            out.setdefault(r.path, []).append((r.start, r.end, r.perms, r.offset))
    return {path: [(a - rows[0][0], b - rows[0][0], perms, offset)
                   for a, b, perms, offset in rows] for path, rows in out.items()}


def _heap(maps: bytes, start: int) -> list[tuple[int, int]]:
    """The anonymous regions of a maps text that start at ``start`` (the break's)."""
    return [(r.start, r.end) for r in map(Region.parse, maps.decode().splitlines())
            if r.start == start and not r.path.startswith("/")]


@pytest.mark.parametrize("kind", ["static-pie", "dynamic"])
def test_maps_at_exit_equal_the_real_process(programs: dict[str, Path], kind: str) -> None:
    """The program prints its own /proc/self/maps before it exits: the simulator's (served
    by the syscall layer) against the kernel's under setarch -R, region by region relative
    to each object's base (the program, ld.so, libc), and the heap at the same address.
    (Anonymous regions other than the heap are left out: without a vDSO, ld.so allocates
    its link maps in a different order, and the kernel's [vvar]/[vdso] are missing.)"""
    path = programs[f"maps {kind}"]
    real = _real(path, [str(path)], {})
    assert real.returncode == 0
    with vmsim.Process(timeout=60) as proc:
        assert proc.exec(path) == 0
        expected = _by_object(real.stdout)
        assert _by_object(proc.stdout) == expected
        assert len(expected) == (1 if kind == "static-pie" else 3)
        heap = _heap(real.stdout, proc.kernel.brk_base)
        assert heap and _heap(proc.stdout, proc.kernel.brk_base) == heap


def test_the_hosts_proc_files_are_refused_and_maps_is_the_simulators() -> None:
    with vmsim.Process() as proc:
        for name in (b"/proc/self/mem", b"/proc/%d/mem" % os.getpid(), b"/proc/self/environ",
                     b"/proc/thread-self/mem", b"/proc/self/task/%d/mem" % os.getpid()):
            path = proc.alloc(name + b"\0")
            assert syscall(proc, 257, -100, path, os.O_RDONLY, 0) == -errno.EACCES, name
        buf = proc.alloc(bytes(1 << 16))
        fd = syscall(proc, 257, -100, proc.alloc(b"/proc/self/maps\0"), os.O_RDONLY, 0)
        at_open = [str(r) for r in proc.space.maps()]
        n = syscall(proc, 0, fd, buf, 1 << 16)
        assert proc.space.read(buf, n).decode().splitlines() == at_open


def test_a_static_pie_is_not_relocated_by_the_loader(programs: dict[str, Path]) -> None:
    """The program relocates itself (its RELATIVE and IRELATIVE slots are its own work):
    stopped at its entry (a budget of one instruction), its writable PT_LOAD holds the
    file's bytes."""
    path = programs["static-pie"]
    with vmsim.Process(budget=1) as proc:
        with pytest.raises(TimeoutError):
            proc.exec(path)
        assert proc.image is not None and proc.image.interp is None
        obj = proc.image.program.obj
        seg = next(s for s in obj.image.loads if s.p_flags & 2)   # PF_W
        on_file = path.read_bytes()[seg.p_offset: seg.p_offset + seg.p_filesz]
        assert proc.space.read(seg.p_vaddr + obj.load_bias, seg.p_filesz) == on_file


def test_brk_starts_where_linux_puts_it(programs: dict[str, Path]) -> None:
    """A dynamically linked program's break at the page after its end; a static-pie's at
    the page after ELF_ET_DYN_BASE (Linux 6.10+; the real runs print sbrk(0) at main)."""
    for kind, expected in (("dynamic", None), ("static-pie", 0x5555_5555_5000)):
        with vmsim.Process(budget=1) as proc:
            with pytest.raises(TimeoutError):
                proc.exec(programs[kind])
            assert proc.image is not None
            start = expected or page_round_up(proc.image.program.end, 4096)
            assert proc.kernel.brk == proc.kernel.brk_base == start


def test_an_infinite_loop_stops_at_the_time_limit(programs: dict[str, Path]) -> None:
    with vmsim.Process(timeout=1.0) as proc, pytest.raises(TimeoutError):
        proc.exec(programs["loop"])
    with vmsim.Process(budget=200_000) as proc, pytest.raises(TimeoutError):
        proc.exec(programs["loop"])
    assert proc.exit_status is None


def test_a_write_to_rodata_is_a_fault_at_its_instruction(programs: dict[str, Path]) -> None:
    path = programs["rodata"]
    assert _real(path, [str(path)], {}).returncode == -11    # SIGSEGV on the real kernel
    with vmsim.Process() as proc, pytest.raises(vmsim.Fault) as caught:
        proc.exec(path)
    fault = caught.value
    assert proc.image is not None
    obj = proc.image.program.obj
    nm = subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout
    symbols = {line.split()[2]: int(line.split()[0], 16) for line in nm.splitlines()
               if len(line.split()) == 3}
    assert (fault.signal, fault.code, fault.access) == ("SIGSEGV", "SEGV_ACCERR", "w")
    assert fault.addr == obj.load_bias + symbols["message"] + 2
    assert fault.pc is not None
    code = [(s.p_vaddr, s.p_vaddr + s.p_filesz) for s in obj.image.loads if s.p_flags & 1]
    assert any(lo <= fault.pc - obj.load_bias < hi for lo, hi in code)
    assert symbols["main"] <= fault.pc - obj.load_bias < symbols["main"] + 16


def test_the_initial_stack_is_laid_out_as_linux_does() -> None:
    with vmsim.Process() as proc:
        top = proc.stack_top
        aux = [(AT.PAGESZ, 4096), (AT.BASE, 0)]
        stack = build_stack(proc.space, top, [b"prog", b"a"], [b"K=v"], b"/bin/prog", aux,
                            bytes(range(16)))
        sp = stack.sp
        assert sp % 16 == 0

        def word(at: int) -> int:
            return int.from_bytes(proc.space.read(at, 8), "little")

        def string(at: int) -> bytes:
            return proc.space.read(at, min(64, top - at)).split(b"\0")[0]

        assert word(sp) == 2
        assert [string(word(sp + 8)), string(word(sp + 16)), word(sp + 24)] == \
            [b"prog", b"a", 0]
        assert [string(word(sp + 32)), word(sp + 40)] == [b"K=v", 0]
        pairs = [struct.unpack("<QQ", proc.space.read(sp + 48 + 16 * k, 16))
                 for k in range(len(stack.auxv))]
        assert pairs == stack.auxv and pairs[-1] == (AT.NULL, 0)
        found = dict(pairs)
        assert proc.space.read(found[AT.RANDOM], 16) == bytes(range(16))
        assert string(found[AT.PLATFORM]) == b"x86_64"
        assert string(found[AT.EXECFN]) == b"/bin/prog"
        assert found[AT.PAGESZ] == 4096 and found[AT.HWCAP2] == 0
        # the strings: argv's first and lowest, then envp's, execfn, a zero word at the top
        assert word(sp + 8) < word(sp + 16) < word(sp + 32) < found[AT.EXECFN]
        assert found[AT.EXECFN] + len(b"/bin/prog\0") == top - 8 and word(top - 8) == 0


# ---- the syscalls exec'ed programs make

def test_access_answers_from_the_host_read_only(tmp_path: Path) -> None:
    present = tmp_path / "f"
    present.write_bytes(b"x")
    with vmsim.Process() as proc:
        name = proc.alloc(os.fsencode(present) + b"\0")
        missing = proc.alloc(os.fsencode(tmp_path / "none") + b"\0")
        assert syscall(proc, 21, name, os.R_OK) == 0
        assert syscall(proc, 21, name, os.F_OK) == 0
        assert syscall(proc, 21, name, os.W_OK) == -errno.EACCES
        assert syscall(proc, 21, missing, os.R_OK) == -errno.ENOENT
        assert syscall(proc, 21, name, 0x40) == -errno.EINVAL
        assert syscall(proc, 269, -100, name, os.R_OK) == 0          # faccessat
        assert "access" not in proc.stats.enosys


def test_readlink_of_proc_self_exe_is_the_program(tmp_path: Path,
                                                  programs: dict[str, Path]) -> None:
    link = tmp_path / "link"
    link.symlink_to("target/of/it")
    with vmsim.Process() as proc:
        exe = proc.alloc(b"/proc/self/exe\0")
        buf = proc.alloc(bytes(256))
        assert syscall(proc, 89, exe, buf, 256) == -errno.ENOENT      # nothing exec'ed
        proc.kernel.exe = str(programs["loop"])
        n = syscall(proc, 89, exe, buf, 256)
        assert proc.space.read(buf, n) == os.fsencode(programs["loop"])
        assert syscall(proc, 89, exe, buf, 5) == 5                     # truncated, no NUL
        name = proc.alloc(os.fsencode(link) + b"\0")
        assert syscall(proc, 267, -100, name, buf, 256) == len(b"target/of/it")
        assert proc.space.read(buf, 12) == b"target/of/it"
        assert syscall(proc, 89, name, buf, 0) == -errno.EINVAL


def test_futex_of_a_lone_thread() -> None:
    wait, wake, private = 0, 1, 128
    with vmsim.Process() as proc:
        word = proc.alloc((7).to_bytes(4, "little"))
        assert syscall(proc, 202, word, wake | private, 2**31 - 1, 0, 0, 0) == 0
        assert syscall(proc, 202, word, wait | private, 6, 0, 0, 0) == -errno.EAGAIN
        assert syscall(proc, 202, word, wait, 7, 0, 0, 0) == -errno.EINTR
        assert syscall(proc, 202, word, wait, 7, proc.alloc(bytes(16)), 0, 0) == \
            -errno.ETIMEDOUT
        assert syscall(proc, 202, 8, wait, 7, 0, 0, 0) == -errno.EFAULT
        assert syscall(proc, 202, word, 3, 0, 0, 0, 0) == -errno.ENOSYS   # FUTEX_REQUEUE
        assert proc.stats.syscalls["futex"] == 6 and "futex" not in proc.stats.enosys


def test_ioctl_is_enotty_and_stdio_are_pipes(tmp_path: Path) -> None:
    tcgets = 0x5401
    with vmsim.Process() as proc:
        assert syscall(proc, 16, 1, tcgets, proc.alloc(bytes(64))) == -errno.ENOTTY
        assert syscall(proc, 16, 9, tcgets, 0) == -errno.EBADF
        buf = proc.alloc(bytes(144))
        for fd in (0, 1, 2):
            assert syscall(proc, 5, fd, buf) == 0
            mode = int.from_bytes(proc.space.read(buf + 24, 4), "little")
            assert stat.S_ISFIFO(mode)
        assert syscall(proc, 5, 7, buf) == -errno.EBADF


def test_argv_past_arg_max_is_e2big_with_nothing_mapped(programs: dict[str, Path]) -> None:
    with vmsim.Process(stack_size=1 << 20) as proc:
        before = proc.space.maps()
        with pytest.raises(OSError) as caught:
            proc.exec(programs["loop"], argv=["x" * (1 << 19)])
        assert caught.value.errno == errno.E2BIG
        assert proc.space.maps() == before and proc.image is None


def test_exec_runs_once_on_a_fresh_process(programs: dict[str, Path]) -> None:
    with vmsim.Process(timeout=60) as proc:
        assert proc.exec(programs["static-pie"]) == 41
        with pytest.raises(RuntimeError):
            proc.exec(programs["static-pie"])


def test_a_missing_interpreter_or_a_file_no_elf_is_refused_before_running(
        tmp_path: Path) -> None:
    program = _gcc(LOOP, tmp_path / "orphan", "-Wl,--dynamic-linker=/nonexistent/ld.so")
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    with vmsim.Process() as proc, pytest.raises(FileNotFoundError):
        proc.exec(program)
    with vmsim.Process() as proc, pytest.raises(ElfError):
        proc.exec(script)
    assert proc.stats.syscalls == {}
    long = _gcc(LOOP, tmp_path / "long", "-Wl,--dynamic-linker=/" + "d" * 5000)
    with vmsim.Process() as proc:
        with pytest.raises(ElfError, match="PT_INTERP"):
            proc.exec(long)              # Linux: ENOEXEC past PATH_MAX
        assert proc.image is None and not any(r.path == str(long) for r in proc.space.maps())


def test_devices_fifos_and_sockets_are_refused_harmless_devices_read(tmp_path: Path) -> None:
    """A program may open regular files, directories and /dev/null, /dev/zero, /dev/urandom;
    a device that could show host memory (/dev/mem, /dev/port) or a FIFO (whose open would
    block the host) is EACCES, and the open never blocks."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with vmsim.Process() as proc:
        for name in (b"/dev/mem", b"/dev/port", str(fifo).encode()):
            if not os.path.exists(name):
                continue
            path = proc.alloc(name + b"\0")
            assert syscall(proc, 257, -100, path, os.O_RDONLY, 0) == -errno.EACCES, name
        fd = syscall(proc, 257, -100, proc.alloc(b"/dev/zero\0"), os.O_RDONLY, 0)
        buf = proc.alloc(b"\xff" * 16)
        assert fd >= 3 and syscall(proc, 0, fd, buf, 16) == 16
        assert proc.space.read(buf, 16) == bytes(16)
