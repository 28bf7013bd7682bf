"""vmsim.Process running hand-written code: faults with their pc, the instruction budget,
the TLB kept coherent with the simulator's page table, the frame pool growing under a run,
and what code cannot reach."""

from __future__ import annotations

import pytest
from process_support import load_code

import vmsim

PROT_R, PROT_RW = 1, 3

LOAD = "load:\n mov rax, [rdi]\n ret"
STORE = "store:\n mov [rdi], rsi\n ret"
JUMP = "jump:\n jmp rdi"


def test_a_call_returns_rax_and_passes_seven_arguments() -> None:
    """The first six arguments in registers, the seventh on the stack (System V)."""
    with vmsim.Process() as proc:
        addr, _ = load_code(proc, "lea rax, [rdi + rsi]\n add rax, r9\n add rax, [rsp + 8]\n ret")
        assert proc.call(addr, 1, 2, 3, 4, 5, 6, 7) == 1 + 2 + 6 + 7
        assert proc.call(addr, -1, 0, 0, 0, 0, 0, 0) == (1 << 64) - 1


def test_a_load_from_a_guard_page_is_a_fault_with_the_instructions_pc() -> None:
    with vmsim.Process() as proc:
        addr, labels = load_code(proc, LOAD)
        with pytest.raises(vmsim.Fault) as info:
            proc.call(addr, proc.stack_guard + 8)
        fault = info.value
        assert (fault.addr, fault.access, fault.signal, fault.code, fault.pc) == (
            proc.stack_guard + 8, "r", "SIGSEGV", "SEGV_ACCERR", labels["load"])
        assert proc.stats.page_faults["fatal"] == 1


@pytest.mark.parametrize("offset", [-4, 0, 0xFF8])
def test_a_store_into_a_read_only_page_faults_at_its_first_byte_there(offset: int) -> None:
    """As Linux's si_addr: the first byte of the access in the refused page, also for a
    store that starts on the writable page before it."""
    with vmsim.Process() as proc:
        addr, labels = load_code(proc, STORE)
        area = proc.space.kernel.mmap(0, 8192, PROT_RW, 0x22, 0, -1)
        proc.space.mprotect(area + 4096, 4096, PROT_R)
        with pytest.raises(vmsim.Fault) as info:
            proc.call(addr, area + 4096 + offset, 1)
        assert (info.value.addr, info.value.pc) == (area + 4096 + max(offset, 0),
                                                    labels["store"])
        assert proc.space.read(area + 4092, 4) == bytes(4)  # nothing stored


def test_a_jump_into_a_non_executable_page_faults_at_the_target() -> None:
    with vmsim.Process() as proc:
        addr, _ = load_code(proc, JUMP)
        data = proc.alloc(b"\xc3")  # a ret, on a read-write page
        with pytest.raises(vmsim.Fault) as info:
            proc.call(addr, data)
        assert (info.value.addr, info.value.access, info.value.code, info.value.pc) == (
            data, "x", "SEGV_ACCERR", data)


def test_an_infinite_loop_stops_at_the_budget() -> None:
    with vmsim.Process(budget=100_000) as proc:
        addr, _ = load_code(proc, "spin:\n jmp spin")
        with pytest.raises(TimeoutError, match="100000 instructions"):
            proc.call(addr)


def test_an_infinite_loop_stops_at_the_timeout_without_a_budget() -> None:
    with vmsim.Process(budget=None, timeout=0.05) as proc:
        addr, _ = load_code(proc, "spin:\n jmp spin")
        with pytest.raises(TimeoutError, match=r"0\.05 s"):
            proc.call(addr)
        assert proc.call(load_code(proc, "mov eax, 5\n ret")[0]) == 5


@pytest.mark.parametrize("where", ["pool", "kernel half", "low", "noncanonical"])
def test_code_cannot_reach_host_memory(where: str) -> None:
    """Every address code uses is one of the space's: the frame pool's own host address, an
    address in no mapping, the kernel half: each a Fault, never a host access."""
    with vmsim.Process() as proc:
        addr, labels = load_code(proc, STORE)
        target = {"pool": proc.space.mmu.pool.data.ctypes.data, "low": 0x1000,
                  "kernel half": 0xFFFF_8000_0000_0000,
                  "noncanonical": 0x0000_8000_0000_0000}[where]
        with pytest.raises(vmsim.Fault) as info:
            proc.call(addr, target, 0x4141414141414141)
        assert info.value.addr == target and info.value.pc == labels["store"]
        assert info.value.code == ("SI_KERNEL" if where == "noncanonical" else "SEGV_MAPERR")
        assert not (proc.space.mmu.pool.data.view("<u8") == 0x4141414141414141).any()


def test_the_cpu_sees_a_copy_on_write_made_behind_it() -> None:
    """The CPU reads an untouched page (the zero page), the host writes it (a copy replaces
    the zero page): the CPU's next read sees the copy, not the zero page it had cached."""
    with vmsim.Process() as proc:
        addr, _ = load_code(proc, LOAD)
        page = proc.alloc(b"")
        assert proc.call(addr, page + 64) == 0
        proc.space.write(page + 64, (1234).to_bytes(8, "little"))
        assert proc.call(addr, page + 64) == 1234


def test_mprotect_and_munmap_reach_the_cpu() -> None:
    with vmsim.Process() as proc:
        store, _ = load_code(proc, STORE)
        load, _ = load_code(proc, LOAD)
        page = proc.alloc(b"x" * 8)
        proc.call(store, page, 7)
        proc.space.mprotect(page, 4096, PROT_R)
        with pytest.raises(vmsim.Fault, match="SEGV_ACCERR"):
            proc.call(store, page, 8)
        assert proc.call(load, page) == 7
        proc.space.munmap(page, 4096)
        with pytest.raises(vmsim.Fault, match="SEGV_MAPERR"):
            proc.call(load, page)


def test_writes_by_code_are_demand_paged_and_copy_on_write() -> None:
    """Code writing a page it has only read takes the simulator's copy-on-write."""
    with vmsim.Process() as proc:
        load, _ = load_code(proc, LOAD)
        store, _ = load_code(proc, STORE)
        page = proc.alloc(b"")
        proc.call(load, page)
        proc.call(store, page, 99)
        assert proc.space.read(page, 8) == (99).to_bytes(8, "little")
        assert proc.stats.page_faults["cow"] == 1


def test_the_frame_pool_growing_during_a_run_keeps_every_write() -> None:
    """2048 pages written by one call: the pool grows (doubling) under the running CPU."""
    pages = 2048
    with vmsim.Process() as proc:
        area = proc.space.kernel.mmap(0, pages * 4096, PROT_RW, 0x22, 0, -1)
        fill, _ = load_code(proc, """
            xor ecx, ecx
        again:
            mov rax, rcx
            shl rax, 12
            mov [rdi + rax], rcx
            inc rcx
            cmp rcx, rsi
            jne again
            ret""")
        proc.call(fill, area, pages)
        for k in (0, 1, 17, 1000, pages - 1):
            assert proc.space.read(area + k * 4096, 8) == k.to_bytes(8, "little")
        assert proc.space.stats.frames >= pages


def test_touching_memory_past_the_limit_stops_the_run() -> None:
    with vmsim.Process(memory=256 << 12) as proc:
        area = proc.space.kernel.mmap(0, 1024 * 4096, PROT_RW, 0x22, 0, -1)
        fill, _ = load_code(proc, """
            xor ecx, ecx
        again:
            mov [rdi + rcx], rcx
            add rcx, 4096
            jmp again""")
        with pytest.raises(MemoryError, match="256 frames"):
            proc.call(fill, area)
        assert proc.space.stats.frames <= 257


@pytest.mark.parametrize(("source", "signal", "code"), [
    ("xor ecx, ecx\n xor edx, edx\n mov eax, 1\nbad:\n div ecx\n ret", "SIGFPE", "FPE_INTDIV"),
    ("nop\nbad:\n ud2\n ret", "SIGILL", "ILL_ILLOPN"),
    ("nop\nbad:\n in al, dx\n ret", "SIGSEGV", "SI_KERNEL"),
    ("int3\nbad:\n ret", "SIGTRAP", "SI_KERNEL"),  # reported after the int3, as Linux does
])
def test_traps_are_the_signals_linux_sends(source: str, signal: str, code: str) -> None:
    with vmsim.Process() as proc:
        addr, labels = load_code(proc, source)
        with pytest.raises(vmsim.Fault) as info:
            proc.call(addr)
        assert (info.value.signal, info.value.code, info.value.pc) == (signal, code,
                                                                       labels["bad"])
        assert proc.call(load_code(proc, "mov eax, 3\n ret")[0]) == 3  # the CPU goes on


def test_hlt_is_sigsegv_as_in_a_user_process() -> None:
    """``hlt`` is privileged: Linux sends the user program SIGSEGV (glibc's abort ends in
    one), reported at the hlt's address, never as a time-out."""
    import vmsim as _vmsim

    with _vmsim.Process(timeout=5.0) as proc:
        code = proc.alloc(b"\x90\xf4\x90")            # nop; hlt; nop
        proc.space.mprotect(code & ~0xFFF, 0x1000, 5)   # r-x
        with pytest.raises(_vmsim.Fault) as caught:
            proc.call(code)
        assert caught.value.signal == "SIGSEGV" and caught.value.pc == code + 1
