"""vmsim.Process's system calls, made by hand-written code: output captured, memory calls
on the simulator's kernel, exit, read-only host files, -ENOSYS counted by name."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from process_support import load_code

import vmsim
from vmsim.process import BRK_BASE, Exited

SYSCALL = "mov rax, rdi\n mov rdi, rsi\n mov rsi, rdx\n mov rdx, rcx\n mov r10, r8\n" \
    " mov r8, r9\n mov r9, [rsp + 8]\n syscall\n ret"
"""syscall(nr, a1..a6): the number and arguments moved from the System V registers."""
M64 = (1 << 64) - 1


def syscall(proc: vmsim.Process, nr: int, *args: int) -> int:
    """The syscall made by code; its rax as a signed value."""
    addr, _ = load_code(proc, SYSCALL)
    rax = proc.call(addr, nr, *args, *[0] * (6 - len(args)))
    return rax - (1 << 64) if rax >> 63 else rax


def test_write_to_stdout_and_stderr_is_captured() -> None:
    with vmsim.Process() as proc:
        text = proc.alloc(b"hello, world\n")
        assert syscall(proc, 1, 1, text, 13) == 13
        assert syscall(proc, 1, 2, text, 5) == 5
        assert syscall(proc, 1, 7, text, 5) == -errno.EBADF
        assert (proc.stdout, proc.stderr) == (b"hello, world\n", b"hello")
        assert proc.stats.syscalls["write"] == 3


def test_captured_output_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmsim.syscalls.MAX_OUTPUT", 10)
    with vmsim.Process() as proc:
        text = proc.alloc(b"0123456789abcdef")
        assert syscall(proc, 1, 1, text, 6) == 6
        assert syscall(proc, 1, 1, text, 6) == 4
        assert syscall(proc, 1, 1, text, 6) == -errno.ENOSPC
        assert proc.stdout == b"0123450123"


def test_a_write_from_a_bad_buffer_is_efault() -> None:
    with vmsim.Process() as proc:
        assert syscall(proc, 1, 1, 0x1000, 4) == -errno.EFAULT
        assert proc.stdout == b""


def test_an_unknown_syscall_is_enosys_and_counted_by_name() -> None:
    with vmsim.Process() as proc:
        assert syscall(proc, 56) == -errno.ENOSYS  # clone: one thread
        assert syscall(proc, 56) == -errno.ENOSYS
        assert syscall(proc, 5000) == -errno.ENOSYS
        assert proc.stats.enosys == {"clone": 2, "syscall_5000": 1}


def test_exit_group_stops_the_call_with_its_status() -> None:
    with vmsim.Process() as proc:
        with pytest.raises(Exited) as info:
            syscall(proc, 231, 300)
        assert info.value.status == 300 & 0xFF and proc.exit_status == 44


def test_mmap_munmap_and_mprotect_go_through_the_simulators_kernel() -> None:
    with vmsim.Process() as proc:
        addr = syscall(proc, 9, 0, 8192, 3, 0x22, M64, 0)
        assert addr > 0 and any(r.start == addr for r in proc.space.maps())
        assert syscall(proc, 10, addr, 4096, 1) == 0
        assert proc.space.check_access(addr, 1, "w") is not None
        assert syscall(proc, 10, addr + 1, 4096, 1) == -errno.EINVAL
        assert syscall(proc, 11, addr, 8192) == 0
        assert not any(r.start <= addr < r.end for r in proc.space.maps())
        assert syscall(proc, 9, 0, 4096, 1, 0x02, 99, 0) == -errno.EBADF


def test_mprotect_and_munmap_made_by_code_reach_its_own_tlb() -> None:
    """Code writes a page, makes it read-only, writes again: the second write faults (the
    TLB entry the first write filled was flushed); after munmap a load faults too."""
    with vmsim.Process() as proc:
        addr, labels = load_code(proc, """
            mov r12, rdi
            mov qword ptr [r12], 1
            mov rax, 10
            mov rsi, 4096
            mov rdx, 1
            syscall
            mov rbx, rax
        again:
            mov qword ptr [r12], 2
            ret""")
        page = proc.alloc(bytes(8))
        with pytest.raises(vmsim.Fault) as info:
            proc.call(addr, page)
        assert (info.value.addr, info.value.access, info.value.pc) == (page, "w",
                                                                       labels["again"])
        assert proc.cpu.reg("rbx") == 0 and proc.space.read(page, 8) == (1).to_bytes(8, "little")
        load, _ = load_code(proc, "mov rax, [rdi]\n ret")
        assert proc.call(load, page) == 1
        assert syscall(proc, 11, page, 4096) == 0
        with pytest.raises(vmsim.Fault, match="SEGV_MAPERR"):
            proc.call(load, page)


def test_brk_grows_the_break_with_anonymous_memory() -> None:
    with vmsim.Process() as proc:
        assert syscall(proc, 12, 0) == BRK_BASE
        assert syscall(proc, 12, BRK_BASE + 10_000) == BRK_BASE + 10_000
        proc.space.write(BRK_BASE + 9_999, b"x")
        assert syscall(proc, 12, BRK_BASE) == BRK_BASE
        assert proc.space.check_access(BRK_BASE, 1, "r") is not None


def test_arch_prctl_sets_and_gets_the_fs_base() -> None:
    with vmsim.Process() as proc:
        out = proc.alloc(bytes(8))
        assert syscall(proc, 158, 0x1002, 0x1234000) == 0
        assert syscall(proc, 158, 0x1003, out) == 0
        assert int.from_bytes(proc.space.read(out, 8), "little") == 0x1234000
        read_fs, _ = load_code(proc, "mov rax, fs:[8]\n ret")
        with pytest.raises(vmsim.Fault) as info:  # %fs:8 lies at 0x1234008: nothing there
            proc.call(read_fs)
        assert info.value.addr == 0x1234008


def test_uname_getrandom_and_prlimit() -> None:
    with vmsim.Process() as proc:
        buf = proc.alloc(bytes(390))
        assert syscall(proc, 63, buf) == 0
        assert proc.space.read(buf, 6) == b"Linux\0" and proc.space.read(buf + 65, 6) == b"vmsim\0"
        assert syscall(proc, 318, buf, 64, 0) == 64
        assert proc.space.read(buf, 64) != bytes(64)
        assert syscall(proc, 302, 0, 3, 0, buf) == 0  # RLIMIT_STACK
        import resource
        soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
        assert int.from_bytes(proc.space.read(buf, 8), "little", signed=True) == soft
        assert syscall(proc, 218, buf) == syscall(proc, 186) > 0
        assert syscall(proc, 273, buf, 24) == 0
        assert syscall(proc, 334, buf, 32, 0, 0) == 0  # rseq (test_process_rseq: as Linux)
        assert syscall(proc, 57) == -errno.ENOSYS  # fork


def test_host_files_are_readable_and_never_writable(tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    target.write_bytes(b"0123456789" * 100)
    with vmsim.Process() as proc:
        path = proc.alloc(os.fsencode(target) + b"\0")
        buf = proc.alloc(bytes(4096))
        assert syscall(proc, 257, -100 & M64, path, os.O_WRONLY, 0) == -errno.EACCES
        fd = syscall(proc, 257, -100 & M64, path, os.O_RDONLY, 0)
        assert fd == 3
        assert syscall(proc, 0, fd, buf, 15) == 15
        assert syscall(proc, 17, fd, buf + 100, 5, 995) == 5
        assert proc.space.read(buf, 15) == b"012345678901234"
        assert proc.space.read(buf + 100, 5) == b"56789"
        assert syscall(proc, 8, fd, -10 & M64, 2) == 990  # lseek(fd, -10, SEEK_END)
        assert syscall(proc, 5, fd, buf) == 0
        assert int.from_bytes(proc.space.read(buf + 48, 8), "little") == 1000  # st_size
        assert syscall(proc, 262, -100 & M64, path, buf, 0) == 0
        assert int.from_bytes(proc.space.read(buf + 48, 8), "little") == 1000
        assert syscall(proc, 17, fd, buf, 1, M64) == -errno.EINVAL  # no host offset that far
        assert syscall(proc, 1, fd, buf, 1) == -errno.EBADF
        assert syscall(proc, 3, fd) == 0
        assert syscall(proc, 0, fd, buf, 1) == -errno.EBADF
        assert syscall(proc, 0, 7, buf, 1) == -errno.EBADF  # never a host descriptor
        assert target.read_bytes() == b"0123456789" * 100


def test_mmap_of_an_opened_file_is_the_files_pages(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"page" * 2048)
    with vmsim.Process() as proc:
        path = proc.alloc(os.fsencode(target) + b"\0")
        fd = syscall(proc, 257, -100 & M64, path, os.O_RDONLY, 0)
        addr = syscall(proc, 9, 0, 8192, 1, 0x02, fd, 0)
        load, _ = load_code(proc, "mov rax, [rdi]\n ret")
        assert proc.call(load, addr + 4096).to_bytes(8, "little") == b"pagepage"
        assert syscall(proc, 9, 0, 8192, 3, 0x01, fd, 0) == -errno.EACCES  # shared, writable


def test_code_past_a_files_end_is_sigbus_and_its_writes_copy_on_write(tmp_path: Path) -> None:
    """A private file mapping: code's store copies the page (the file keeps its bytes); a
    load from a page wholly past the file's end is SIGBUS, as Linux delivers it."""
    target = tmp_path / "short.bin"
    target.write_bytes(b"A" * 4096)
    with vmsim.Process() as proc:
        path = proc.alloc(os.fsencode(target) + b"\0")
        fd = syscall(proc, 257, -100 & M64, path, os.O_RDONLY, 0)
        addr = syscall(proc, 9, 0, 8192, 3, 0x02, fd, 0)
        store, _ = load_code(proc, "mov [rdi], rsi\n ret")
        load, labels = load_code(proc, "load:\n mov rax, [rdi]\n ret")
        proc.call(store, addr, 0x4242)
        assert proc.call(load, addr) == 0x4242 and target.read_bytes() == b"A" * 4096
        assert proc.stats.page_faults["cow"] == 1
        with pytest.raises(vmsim.Fault) as info:
            proc.call(load, addr + 4096)
        assert (info.value.signal, info.value.code, info.value.pc) == (
            "SIGBUS", "BUS_ADRERR", labels["load"])
