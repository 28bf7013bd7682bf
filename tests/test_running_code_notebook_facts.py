"""The facts notebooks/08-running-code.ipynb shows, as tests: libz's crc32 on a vmsim.Process
equals zlib's and brings libz's pages in by demand faults; code writing a private file page
takes a copy-on-write; a lazy JUMP_SLOT is bound by its first call; faults by code (RELRO, a
non-executable page, the stack's guard page) carry the signal and the pc; a loop that never
returns stops at the timeout."""

from __future__ import annotations

import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from process_support import assemble

import vmsim
from loader.linkmap import ImageObject
from loader.mmap import MapFlags, ProtFlags
from vmsim.viz import PageState, page_states

PAGE = 4096
R, RW, RX = (ProtFlags.from_rwx(p) for p in ("r--", "rw-", "r-x"))
PUSH_FOREVER = bytes([0x50, 0xEB, 0xFD])   # the notebook's: again: push rax; jmp again
SPIN = bytes([0xEB, 0xFE])                 # the notebook's: again: jmp again
DATA = bytes(range(256)) * 256

LEAF_C = "int leaf(int x) { return 3 * x + 1; }\n"
MID_C = """
#include <string.h>
int leaf(int x);
int mid(int x) { return leaf(x) + 1; }
size_t count(const char *s) { return strlen(s); }
"""


@pytest.fixture(scope="module", name="proc")
def proc_fixture() -> Iterator[vmsim.Process]:
    """A process with libz and its closure loaded, shared by the tests that need no fresh one."""
    with vmsim.Process(timeout=10.0) as proc:
        proc.dlopen("libz.so.1")
        yield proc


@pytest.fixture(scope="module", name="libmid")
def libmid_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The notebook's libmid.so (-z lazy, calls leaf and strlen through its PLT) and libleaf.so."""
    where = tmp_path_factory.mktemp("running_code")
    (where / "leaf.c").write_text(LEAF_C)
    (where / "mid.c").write_text(MID_C)
    for args in (["-o", "libleaf.so", "leaf.c"],
                 ["-Wl,-z,lazy", "-o", "libmid.so", "mid.c", "-L.", "-lleaf",
                  "-Wl,-rpath,$ORIGIN"]):
        subprocess.run(["gcc", "-O1", "-fPIC", "-shared", *args], cwd=where, check=True)
    return where / "libmid.so"


def _object(proc: vmsim.Process, name: str) -> ImageObject:
    assert proc.linkmap is not None
    return next(obj for obj in proc.linkmap.objects if obj.name == name)


def _inside(proc: vmsim.Process, name: str, addr: int) -> bool:
    lo, hi = _object(proc, name).span
    return lo <= addr < hi


def _code(proc: vmsim.Process, code: bytes) -> int:
    """``code`` copied into a new r-x page of ``proc``: its address."""
    addr = proc.alloc(code)
    proc.space.mprotect(addr, PAGE, RX)
    return addr


def _fault_of(proc: vmsim.Process, addr: int, *args: int) -> vmsim.Fault:
    with pytest.raises(vmsim.Fault) as info:
        proc.call(addr, *args)
    return info.value


def test_the_hand_written_bytes_are_the_instructions_the_notebook_names() -> None:
    assert assemble("again:\n push rax\n jmp again")[0] == PUSH_FOREVER
    assert assemble("again:\n jmp again")[0] == SPIN


def test_crc32_equals_zlibs_and_its_first_call_brings_in_libz_pages() -> None:
    """The first call's demand faults are exactly the libz pages it brought in (code and
    .rodata, from the page cache); the second call needs no TLB fill and no fault."""
    with vmsim.Process(timeout=10.0) as proc:
        libz = proc.dlopen("libz.so.1")
        crc32, buf = proc.dlsym(libz, "crc32"), proc.alloc(DATA)
        span = _object(proc, "libz.so.1").span
        pages_before, before = page_states(proc.space, *span), proc.stats
        assert proc.call(crc32, 0, buf, len(DATA)) == zlib.crc32(DATA)
        first = proc.stats
        brought_in = [(old, new) for old, new in zip(pages_before, page_states(proc.space, *span),
                                                     strict=True) if old != new]
        assert brought_in and set(brought_in) == {(PageState.NOT_PRESENT, PageState.FILE)}
        assert first.page_faults["demand"] - before.page_faults["demand"] == len(brought_in)
        assert first.tlb_fills - before.tlb_fills >= len(DATA) // PAGE + len(brought_in)
        assert proc.call(crc32, 0, buf, len(DATA)) == zlib.crc32(DATA)
        assert proc.stats.tlb_fills == first.tlb_fills
        assert proc.stats.page_faults == first.page_faults


def test_code_writing_a_private_file_page_takes_a_copy_on_write(proc: vmsim.Process,
                                                                tmp_path: Path) -> None:
    """strlen reads page 0 (the page cache's frame), memset writes it (a copy: cow + 1), then
    writes page 2, never read (copied straight from the page cache: cow + 1); the file keeps
    its bytes."""
    note = tmp_path / "note.txt"
    note.write_bytes(b"hello from the page cache\n\0".ljust(3 * PAGE, b"."))
    with open(note, "rb") as f:
        area = proc.space.mmap(None, 3 * PAGE, RW, MapFlags.MAP_PRIVATE, 0, f.fileno()).addr
    libz = proc.dlopen("libz.so.1")
    strlen, memset = proc.dlsym(libz, "strlen"), proc.dlsym(libz, "memset")

    def pages() -> list[PageState]:
        return page_states(proc.space, area, area + 3 * PAGE)

    def cows() -> int:
        return proc.stats.page_faults["cow"]

    N, F, P = PageState.NOT_PRESENT, PageState.FILE, PageState.PRIVATE
    assert pages() == [N, N, N]
    cow0 = cows()
    assert proc.call(strlen, area) == 26
    assert (pages(), cows()) == ([F, N, N], cow0)
    proc.call(memset, area, ord("H"), 1)
    assert (pages(), cows()) == ([P, N, N], cow0 + 1)
    proc.call(memset, area + 2 * PAGE, ord("!"), 1)
    assert (pages(), cows()) == ([P, N, P], cow0 + 2)
    assert proc.space.read(area, 26) == b"Hello from the page cache\n"
    assert note.read_bytes()[:26] == b"hello from the page cache\n"


def _slot(proc: vmsim.Process, symbol: str) -> tuple[int, bool, str | None]:
    assert proc.linkmap is not None
    (b,) = [b for b in proc.linkmap.bindings() if b.object == "libmid.so" and
            b.type == "R_X86_64_JUMP_SLOT" and b.symbol == symbol]
    return b.value, b.pending, b.target


def test_a_lazy_slot_is_bound_by_its_first_call(proc: vmsim.Process, libmid: Path) -> None:
    """Before: each slot holds an address in libmid's own PLT, pending. mid(5) binds leaf
    (the resolver entered once), count binds strlen (libc's IFUNC, resolved on the CPU), a
    second mid goes straight through its slot."""
    mid_lib = proc.dlopen(libmid, bind="lazy")
    entered = proc.lazy_binds
    for symbol, target in (("leaf", "libleaf.so"), ("strlen", "libc.so.6")):
        value, pending, bound_to = _slot(proc, symbol)
        assert pending and bound_to == target and _inside(proc, "libmid.so", value)
    mid = proc.dlsym(mid_lib, "mid")
    assert proc.call(mid, 5) == 17 and proc.lazy_binds == entered + 1
    assert _slot(proc, "leaf")[:2] == (proc.dlsym(mid_lib, "leaf"), False)
    assert _slot(proc, "strlen")[1]
    text = proc.alloc(b"lazy binding\0")
    assert proc.call(proc.dlsym(mid_lib, "count"), text) == 12
    assert proc.call(mid, 6) == 20 and proc.lazy_binds == entered + 2
    assert _slot(proc, "strlen")[:2] == (proc.dlsym(mid_lib, "strlen"), False)
    assert _inside(proc, "libc.so.6", _slot(proc, "strlen")[0])


def test_memset_over_relro_faults_inside_libc(proc: vmsim.Process) -> None:
    z = _object(proc, "libz.so.1")
    with open(z.path, "rb") as f:
        relro = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_GNU_RELRO")
    start = z.load_bias + relro["p_vaddr"]
    before = proc.space.read(start, 16)
    fault = _fault_of(proc, proc.dlsym(proc.dlopen("libz.so.1"), "memset"), start, 0, 16)
    assert (fault.addr, fault.access, fault.signal, fault.code) == (
        start, "w", "SIGSEGV", "SEGV_ACCERR")
    assert fault.pc is not None and _inside(proc, "libc.so.6", fault.pc)
    assert proc.space.read(start, 16) == before


def test_calling_into_a_page_made_non_executable_faults_at_the_function(
        proc: vmsim.Process) -> None:
    crc32 = proc.dlsym(proc.dlopen("libz.so.1"), "crc32")
    buf = proc.alloc(DATA)
    proc.space.mprotect(crc32 & -PAGE, PAGE, R)
    try:
        fault = _fault_of(proc, crc32, 0, buf, len(DATA))
    finally:
        proc.space.mprotect(crc32 & -PAGE, PAGE, RX)
    assert (fault.addr, fault.pc, fault.access, fault.signal, fault.code) == (
        crc32, crc32, "x", "SIGSEGV", "SEGV_ACCERR")
    assert _inside(proc, "libz.so.1", fault.pc)
    assert proc.call(crc32, 0, buf, len(DATA)) == zlib.crc32(DATA)


def test_pushing_forever_faults_at_the_stacks_guard_page(proc: vmsim.Process) -> None:
    """Every stack page is demand-faulted on the way down; the push into the guard page
    faults at its last word, pc on the push."""
    pusher = _code(proc, PUSH_FOREVER)
    fault = _fault_of(proc, pusher)
    assert (fault.addr, fault.pc, fault.access, fault.signal, fault.code) == (
        proc.stack_guard + PAGE - 8, pusher, "w", "SIGSEGV", "SEGV_ACCERR")
    assert page_states(proc.space, proc.stack_guard + PAGE, proc.stack_top) == (
        [PageState.DIRTY] * ((proc.stack_top - proc.stack_guard) // PAGE - 1))


def test_a_loop_that_never_returns_stops_at_the_timeout() -> None:
    with vmsim.Process(timeout=0.2) as spinner:
        with pytest.raises(TimeoutError, match=r"0\.2 s"):
            spinner.call(_code(spinner, SPIN))
        assert spinner.call(_code(spinner, b"\xb8\x05\x00\x00\x00\xc3")) == 5  # mov eax, 5; ret
