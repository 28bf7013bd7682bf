"""The simulator's API and the host backend under hostile arguments and tight limits: reads
checked before any work, file descriptors shared per open file, a frame pool that grows on
demand, accesses that fail with an error instead of a signal. Each risky case runs under
loader.isolate.run_isolated (bounded time and memory)."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import raw_load
from harness_sim import host_like_space

from loader.libc import LibcMmap, read_maps
from loader.mmap import MAX_READ, MapFlags, Mmap, MmapError, ProtFlags
from vmsim import AddressSpace, Fault
from vmsim.fuzz.isolate import run_isolated

R, RW = ProtFlags.PROT_READ, ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
PRIV = MapFlags.MAP_PRIVATE
ROOT = Path(__file__).resolve().parent.parent
LIBZ = Path("/usr/lib/x86_64-linux-gnu/libz.so.1")


# 1. reads are checked before any work

def _huge_reads() -> list[str]:
    space = AddressSpace()
    addr = space.mmap_anonymous(0, 1 << 30, RW, PRIV)
    reserve = space.mmap_reserve(None, 64 << 30, True)
    got = []
    for call, args in ((space.read, (addr, 1 << 40)), (space.fetch, (addr, 1 << 40)),
                       (space.peek, (addr, 64 << 30)), (space.read, (addr - 1, 1 << 40)),
                       (space.read, (-4096, 1 << 40)), (space.peek, (reserve, 64 << 30)),
                       (space.read, (addr, 1 << 80))):
        try:
            call(*args)
            got.append("ok")
        except Fault as fault:
            got.append(f"{fault.signal} {fault.code} {fault.addr - addr:#x}")
        except MmapError as exc:
            got.append(errno.errorcode[exc.errno or 0])
    out = bytearray(16)
    try:
        space.read_into(addr + (1 << 30) - 8, out)
    except Fault as fault:
        got.append(f"into {fault.addr - addr:#x} {bytes(out) == bytes(16)}")
    got.append(str(space.stats.frames))
    return got


def test_huge_or_partly_unmapped_reads_fault_first() -> None:
    got = run_isolated(_huge_reads, timeout=10, max_rss=512 << 20).value
    end = f"{1 << 30:#x}"
    assert got == [f"SIGSEGV SEGV_MAPERR {end}", "SIGSEGV SEGV_ACCERR 0x0",
                   f"SIGSEGV SEGV_MAPERR {end}", "SIGSEGV SEGV_ACCERR -0x1",
                   got[4], "ENOMEM", f"SIGSEGV SEGV_MAPERR {end}", f"into {end} True", "0"]
    assert got[4].startswith("SIGSEGV")


def _untouched_read() -> tuple[int, int, bool]:
    space = AddressSpace()
    addr = space.mmap_anonymous(0, 64 << 20, RW, PRIV)
    data = space.read(addr, 64 << 20)
    return len(data), space.stats.frames, data == bytes(len(data))


def test_read_of_untouched_anonymous_memory_allocates_no_frames() -> None:
    assert run_isolated(_untouched_read, timeout=10, max_rss=512 << 20).value == \
        (64 << 20, 0, True)


def _read_past_max() -> tuple[str, int, int]:
    space = AddressSpace()
    reserve = space.mmap_reserve(None, MAX_READ + (1 << 20), True)
    try:
        space.peek(reserve, MAX_READ + 1)
    except MmapError as exc:
        return errno.errorcode[exc.errno or 0], space.stats.frames, space.stats.page_tables
    return "ok", space.stats.frames, space.stats.page_tables


def test_max_read_is_documented_and_enforced() -> None:
    assert MAX_READ == 1 << 32
    got = run_isolated(_read_past_max, timeout=10, max_rss=512 << 20).value
    assert got == ("ENOMEM", 0, 1)


# 2. one descriptor per open file, not per mapping

def _many_mappings(backend: str, reopen: bool, path: str) -> tuple[int, int]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    mm: Mmap = LibcMmap() if backend == "libc" else host_like_space()
    page = 4096
    base = mm.mmap_reserve(None, 2 * 5000 * page, True)
    fd = os.open(path, os.O_RDONLY)
    for k in range(5000):
        if reopen:
            os.close(fd)
            fd = os.open(path, os.O_RDONLY)
        # every other page stays PROT_NONE reservation: no two file mappings touch
        mm.mmap(base + 2 * k * page, page, R, PRIV | MapFlags.MAP_FIXED, page * (k % 2), fd)
    os.close(fd)
    inside = [r for r in mm.maps() if base <= r.start < base + 2 * 5000 * page]
    return len(inside), len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("reopen", [False, True], ids=["one-fd", "open-each-time"])
def test_5000_mappings_of_one_file_at_ulimit_n_256(tmp_path: Path, reopen: bool) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    kernel = run_isolated(_many_mappings, "libc", reopen, str(path), timeout=30,
                          max_rss=512 << 20).value
    sim = run_isolated(_many_mappings, "sim", reopen, str(path), timeout=30,
                       max_rss=512 << 20).value
    assert sim[0] == kernel[0]  # the same number of maps lines (merges where the kernel does)
    assert sim[1] < 128


def test_dup_and_second_open_still_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"y" * 4 * 4096)
    for mm in (LibcMmap(), host_like_space()):
        base = mm.mmap_reserve(None, 8 * 4096, True)
        fd = os.open(path, os.O_RDONLY)
        mm.mmap(base, 4096, R, PRIV | MapFlags.MAP_FIXED, 0, fd)
        dup = os.dup(fd)
        os.close(fd)
        mm.mmap(base + 4096, 4096, R, PRIV | MapFlags.MAP_FIXED, 4096, dup)  # merges
        other = os.open(path, os.O_RDONLY)
        mm.mmap(base + 2 * 4096, 4096, R, PRIV | MapFlags.MAP_FIXED, 2 * 4096, other)
        os.close(dup)
        os.close(other)
        lines = [(r.start - base, r.end - base) for r in mm.maps()
                 if base <= r.start < base + 3 * 4096]
        mm.munmap(base, 8 * 4096)
        assert lines == [(0, 2 * 4096), (2 * 4096, 3 * 4096)], type(mm).__name__


def _dup_failure() -> str:
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    space = AddressSpace()
    fds = []
    try:
        while True:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    os.close(fds.pop())
    fd = os.open(__file__, os.O_RDONLY)  # the last free descriptor
    try:
        space.mmap(None, 4096, R, PRIV, 0, fd)
    except MmapError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def test_no_descriptor_left_is_mmap_error_emfile() -> None:
    assert run_isolated(_dup_failure, timeout=10).value == "EMFILE"


# 5. the frame pool grows on demand

def test_address_space_under_ulimit_v_4000000() -> None:
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (4_000_000 * 1024, 4_000_000 * 1024))
import loader
from vmsim import AddressSpace
space = AddressSpace()
obj = loader.load({str(LIBZ)!r}, space)
start, end = obj.span
head = space.read(start, 4)
assert head == b"\\x7fELF", head
page = space.mmap_anonymous(0, 1 << 20, 3, 2)
space.write(page, b"z" * (1 << 20))
assert space.read(page + 5, 3) == b"zzz"
print("ok", space.stats.frames)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def _many_spaces() -> tuple[int, bytes]:
    spaces = [AddressSpace() for _ in range(10_000)]
    last = spaces[-1]
    addr = last.mmap_anonymous(0, 4096, RW, PRIV)
    last.write(addr, b"alive")
    return len(spaces), last.read(addr, 5)


def test_10000_address_spaces_at_once() -> None:
    got = run_isolated(_many_spaces, timeout=60, max_rss=512 << 20).value
    assert got == (10_000, b"alive")


def test_page_size_checked_first() -> None:
    for bad in (1 << 40, 0, -4096, 1024, 2048, 3 * 4096, 1 << 17):
        with pytest.raises(ValueError, match="power of two from 0x1000 to 0x10000"):
            AddressSpace(page_size=bad)
    assert AddressSpace(page_size=1 << 16).page_size == 1 << 16


# 3. write_words with addresses no pointer can hold

def _bad_words(where: list[int]) -> tuple[str, str]:
    try:
        AddressSpace().write_words(np.array(where, dtype=object), np.array([1], dtype=np.uint64))
        sim = "ok"
    except Fault as fault:
        sim = fault.signal
    try:
        LibcMmap().write_words(where, [1])  # type: ignore[arg-type]
        host = "ok"
    except MmapError as exc:
        host = errno.errorcode[exc.errno or 0]
    return sim, host


@pytest.mark.parametrize("where", [[-8], [-(1 << 63)], [1 << 64], [(1 << 47) + 8]])
def test_write_words_bad_address_faults(where: list[int]) -> None:
    got = run_isolated(_bad_words, where, timeout=10, max_rss=512 << 20)
    assert (got.status, got.value) == ("ok", ("SIGSEGV", "EFAULT"))


# 6. the host backend: errors, not signals

def _host_bad_accesses() -> list[str]:
    mm = LibcMmap()
    none = mm.mmap_reserve(None, 4096, True)
    got = []
    for call, args in ((mm.read, (0, 32)), (mm.read, (none, 1)), (mm.write, (0, b"x")),
                       (mm.write, (none, b"x")), (mm.read, (-4096, 8)),
                       (mm.read, (none, 1 << 40))):
        try:
            call(*args)
            got.append("ok")
        except MmapError as exc:
            got.append(errno.errorcode[exc.errno or 0])
    return got


def test_libc_bad_accesses_are_efault_not_signals() -> None:
    got = run_isolated(_host_bad_accesses, timeout=10, max_rss=512 << 20)
    assert got.status == "ok" and got.value == ["EFAULT"] * 6


def _partial_write() -> tuple[str, bool, bytes, str]:
    mm = LibcMmap()
    base = mm.mmap_anonymous(0, 2 * 4096, RW, PRIV)
    mm.mprotect(base + 4096, 4096, R)
    words = mm.mmap_anonymous(0, 2 * 4096, RW, PRIV)
    mm.mprotect(words + 4096, 4096, R)
    try:
        mm.write(base + 4096 - 3, b"abcdef")
        return "ok", False, b"", ""
    except MmapError as exc:
        code, named = errno.errorcode[exc.errno or 0], f"{base + 4096:#x}" in str(exc)
    where = np.array([words, words + 8, words + 4096, words + 16], dtype=np.uint64)
    try:
        mm.write_words(where, np.array([1, 2, 3, 4], dtype=np.uint64))
        stored = "ok"
    except MmapError as exc:  # the words before the bad one are stored, not those after
        stored = f"{errno.errorcode[exc.errno or 0]} {mm.read(words, 24).hex()}"
    return code, named, mm.read(base + 4096 - 3, 6), stored


def test_libc_partial_write_stores_the_prefix() -> None:
    got = run_isolated(_partial_write, timeout=10, max_rss=512 << 20)
    assert got.status == "ok"
    assert got.value == ("EFAULT", True, b"abc\0\0\0",
                         "EFAULT " + (1).to_bytes(8, "little").hex()
                         + (2).to_bytes(8, "little").hex() + bytes(8).hex())


def _maps_with_odd_name(directory: str) -> tuple[bool, bool]:
    name = os.path.join(os.fsencode(directory), b"odd-\xff\xfe-name")
    with open(name, "wb") as f:
        f.write(b"q" * 4096)
    fd = os.open(name, os.O_RDONLY)
    mm = LibcMmap()
    addr = mm.mmap(None, 4096, R, PRIV, 0, fd).addr
    space = AddressSpace()
    sim_addr = space.mmap(None, 4096, R, PRIV, 0, fd).addr
    os.close(fd)
    host = next(r for r in read_maps() if r.start == addr)
    sim = next(r for r in space.maps() if r.start == sim_addr)
    return os.fsencode(host.path) == name, os.fsencode(sim.path) == name


def test_non_utf8_path_in_maps_round_trips(tmp_path: Path) -> None:
    assert run_isolated(_maps_with_odd_name, str(tmp_path), timeout=10).value == (True, True)


def _libc_vs_cpu(prot: int) -> tuple[object, object]:
    mm = LibcMmap()
    page = mm.mmap_anonymous(0, 2 * 4096, RW, PRIV)
    mm.write(page + 4096 - 2, b"wxyz")
    mm.mprotect(page, 2 * 4096, ProtFlags(prot))
    cpu = run_isolated(raw_load, page + 4096 - 2, 4)
    try:
        checked: object = mm.read(page + 4096 - 2, 4)
    except MmapError as exc:
        checked = errno.errorcode[exc.errno or 0]
    return (cpu.value if cpu.status == "ok" else cpu.status), checked


@pytest.mark.parametrize("prot", [ProtFlags.PROT_WRITE, ProtFlags.PROT_EXEC,
                                  ProtFlags.PROT_WRITE | ProtFlags.PROT_EXEC, ProtFlags.PROT_NONE],
                         ids=str)
def test_libc_read_answers_as_the_cpu(prot: ProtFlags) -> None:
    # process_vm_readv wants PROT_READ; the CPU also loads from write-only memory (and from
    # execute-only memory without protection keys): LibcMmap.read follows the CPU
    cpu, checked = run_isolated(_libc_vs_cpu, int(prot), timeout=20).value
    assert checked == (cpu if cpu != "SIGSEGV" else "EFAULT")


def _many_words_bad_page() -> tuple[str, list[int]]:
    mm = LibcMmap()
    base = mm.mmap_anonymous(0, 3 * 4096, RW, PRIV)
    mm.mprotect(base + 4096, 4096, R)
    # a word in every other slot of three pages; the middle page (read-only) comes last
    where = np.array([base + 16 * k for k in range(768)], dtype=np.uint64)
    where = np.concatenate([where[where < base + 4096], where[where >= base + 2 * 4096],
                            where[(where >= base + 4096) & (where < base + 2 * 4096)]])
    try:
        mm.write_words(where, np.arange(1, len(where) + 1, dtype=np.uint64))
        code = "ok"
    except MmapError as exc:
        code = errno.errorcode[exc.errno or 0]
    words = np.frombuffer(mm.read(base, 4096), dtype="<u8").tolist() + \
        np.frombuffer(mm.read(base + 2 * 4096, 4096), dtype="<u8").tolist()
    return code, words


def test_libc_write_words_bulk_stops_at_the_bad_page() -> None:
    code, words = run_isolated(_many_words_bad_page, timeout=20).value
    assert code == "EFAULT"
    stored = [w for w in words if w]
    assert stored == list(range(1, len(stored) + 1)) and len(stored) == 2 * 256


def _merges_after_sweeps(directory: str) -> list[tuple[int, int]]:
    got = []
    for mm in (LibcMmap(), host_like_space()):
        path = os.path.join(directory, "kept")
        with open(path, "wb") as f:
            f.write(b"k" * 4 * 4096)
        base = mm.mmap_reserve(None, 8 * 4096, True)
        kept = os.open(path, os.O_RDONLY)
        mm.mmap(base, 4096, R, PRIV | MapFlags.MAP_FIXED, 0, kept)
        other = os.path.join(directory, "other")
        with open(other, "wb") as f:
            f.write(b"o" * 4096)
        for _ in range(300):  # another file opened 300 times, each fd closed at once
            fd = os.open(other, os.O_RDONLY)
            mm.mmap(None, 4096, R, PRIV, 0, fd)
            os.close(fd)
        dup = os.dup(kept)
        os.close(kept)
        mm.mmap(base + 4096, 4096, R, PRIV | MapFlags.MAP_FIXED, 4096, dup)  # same file: merges
        again = os.open(path, os.O_RDONLY)
        mm.mmap(base + 2 * 4096, 4096, R, PRIV | MapFlags.MAP_FIXED, 2 * 4096, again)
        os.close(dup)
        os.close(again)
        got.append(len([r for r in mm.maps() if base <= r.start < base + 3 * 4096]))
        got.append(len(os.listdir("/proc/self/fd")))
    return got


def test_dup_still_merges_after_descriptors_were_let_go(tmp_path: Path) -> None:
    kernel_lines, kernel_fds, sim_lines, sim_fds = run_isolated(
        _merges_after_sweeps, str(tmp_path), timeout=30).value
    assert (kernel_lines, sim_lines) == (2, 2)
    # the simulator let go of the dups of the 300 closed opens (it keeps one per file)
    assert sim_fds - kernel_fds < 70
