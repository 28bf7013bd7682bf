"""The host backend itself (loader.libc), the fork-isolated runner (loader.isolate) and the
Region record against this process's real /proc/self/maps."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loader.isolate import ChildError, Isolated, probe, run_isolated
from loader.libc import LibcMmap, host_has_pkeys, read_maps
from loader.mmap import MapFlags, Mapping, Mmap, MmapError, ProtFlags, Region

NONE, R, W = ProtFlags.PROT_NONE, ProtFlags.PROT_READ, ProtFlags.PROT_WRITE
PRIV, FIXED, ANON = MapFlags.MAP_PRIVATE, MapFlags.MAP_FIXED, MapFlags.MAP_ANONYMOUS


@pytest.fixture
def mm() -> LibcMmap:
    return LibcMmap()


@pytest.fixture
def rw_pages(mm: LibcMmap) -> Iterator[int]:
    """Four fresh private read-write pages; unmapped afterwards."""
    length = 4 * mm.page_size
    addr = mm.mmap_anonymous(0, length, R | W, PRIV)
    yield addr
    mm.munmap(addr, length)


def test_region_round_trips_every_maps_line() -> None:
    lines = Path("/proc/self/maps").read_text().splitlines()
    assert len(lines) > 10
    for line in lines:
        assert str(Region.parse(line)) == line


def test_read_maps_parses_own_mappings(mm: LibcMmap, rw_pages: int) -> None:
    regions = read_maps()
    assert [r.start for r in regions] == sorted(r.start for r in regions)
    mine = next(r for r in regions if r.start <= rw_pages < r.end)
    assert mine.perms == "rw-p" and mine.end >= rw_pages + 4 * mm.page_size
    assert any(r.path.endswith(".so.6") or "libc" in r.path for r in regions)
    assert _two_reads_agree(mm)


def _two_reads_agree(mm: LibcMmap, tries: int = 5) -> bool:
    """``mm.maps()`` equals a ``read_maps()`` right after it, in one of a few tries: the
    process's own map may change between the two reads (a pymalloc arena mapped for the
    list of regions, a frame pool freed by the garbage collector), which says nothing about
    the parse."""
    for _ in range(tries):
        gc.collect()
        if mm.maps() == read_maps():
            return True
    return False


def test_libc_mmap_satisfies_the_protocol(mm: LibcMmap) -> None:
    assert isinstance(mm, Mmap)


def test_read_write_round_trip(mm: LibcMmap, rw_pages: int) -> None:
    data = os.urandom(3 * mm.page_size + 17)
    mm.write(rw_pages + 5, data)
    assert mm.read(rw_pages + 5, len(data)) == data
    assert mm.read(rw_pages, 5) == bytes(5)


@pytest.mark.parametrize("stride", [8, 12], ids=["aligned", "unaligned"])
def test_write_words_scatter(mm: LibcMmap, rw_pages: int, stride: int) -> None:
    n = 1000
    offsets = np.random.default_rng(1).permutation(n) * stride + 3 * (stride != 8)
    addrs = (np.uint64(rw_pages) + offsets.astype(np.uint64))
    values = np.arange(n, dtype=np.uint64) * np.uint64(0x0101010101010101)
    mm.write_words(addrs, values)
    got = np.frombuffer(mm.read(rw_pages, 4 * mm.page_size), dtype=np.uint8)
    for off, value in zip(offsets[:50].tolist(), values[:50].tolist(), strict=True):
        assert got[off:off + 8].tobytes() == int(value).to_bytes(8, "little")
    untouched = np.ones(got.size, dtype=bool)
    untouched[(offsets[:, None] + np.arange(8)).ravel()] = False
    assert not got[untouched].any()


def test_write_words_rejects_mismatched_shapes(mm: LibcMmap, rw_pages: int) -> None:
    with pytest.raises(ValueError, match="2 addresses but 1 values"):
        mm.write_words(np.array([rw_pages, rw_pages + 8], dtype=np.uint64),
                       np.array([1], dtype=np.uint64))


def test_mmap_without_fd_or_anonymous_needs_copy(mm: LibcMmap) -> None:
    got = mm.mmap(None, mm.page_size, R, PRIV, 0, None)
    try:
        assert got.need_copy
        mm.write(got.addr, b"copied by the loader")
        assert mm.read(got.addr, 6) == b"copied"
    finally:
        mm.munmap(got.addr, mm.page_size)


def test_file_mmap_does_not_need_copy(mm: LibcMmap, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello" + bytes(mm.page_size))
    fd = os.open(path, os.O_RDONLY)
    try:
        got = mm.mmap(None, mm.page_size, R, PRIV, 0, fd)
        assert got == Mapping(got.addr, False)
        assert mm.read(got.addr, 5) == b"hello"
        mm.munmap(got.addr, mm.page_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("use_file", "perms"), [(True, "---p"), (False, "-w-p")])
def test_mmap_reserve_like_elf_loader(mm: LibcMmap, use_file: bool, perms: str) -> None:
    length = 8 * mm.page_size
    addr = mm.mmap_reserve(None, length, use_file)
    try:
        region = next(r for r in mm.maps() if r.start <= addr < r.end)
        assert region.perms == perms and region.end >= addr + length
    finally:
        mm.munmap(addr, length)


def test_mmap_reserve_hint_is_used_when_free(mm: LibcMmap) -> None:
    length = 8 * mm.page_size
    addr = mm.mmap_reserve(None, 2 * length, True)
    mm.munmap(addr, 2 * length)
    again = mm.mmap_reserve(addr + length, length, True)
    mm.munmap(again, length)
    assert again == addr + length


def test_error_carries_kernel_errno_and_names_the_call(mm: LibcMmap) -> None:
    with pytest.raises(MmapError) as info:
        mm.munmap(12345, mm.page_size)
    assert info.value.errno == errno.EINVAL
    assert "munmap(addr=0x3039" in str(info.value)
    assert isinstance(info.value, OSError)


def test_host_has_pkeys_matches_cpuinfo() -> None:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
    assert host_has_pkeys() == (" pku" in flags + " ")


# loader.isolate

def test_isolated_returns_value() -> None:
    assert run_isolated(lambda a, b: a + b, 2, 3) == Isolated("ok", 5)


def _raw_load(addr: int) -> bytes:
    """One byte through a raw pointer, as compiled code would load it."""
    buf = ctypes.create_string_buffer(1)
    ctypes.memmove(buf, addr, 1)
    return buf.raw


def test_prot_none_read_kills_child_not_parent(mm: LibcMmap) -> None:
    addr = mm.mmap_reserve(None, mm.page_size, True)
    try:
        assert probe(addr, "r") == "SIGSEGV"
        assert probe(addr, "w") == "SIGSEGV"
        assert run_isolated(_raw_load, addr) == Isolated("SIGSEGV", None)
        with pytest.raises(MmapError) as info:  # LibcMmap.read itself is checked
            mm.read(addr, 1)
        assert info.value.errno == errno.EFAULT
    finally:
        mm.munmap(addr, mm.page_size)
    assert os.getpid() > 0  # still here


def test_probe_write_leaves_parent_memory(mm: LibcMmap, rw_pages: int) -> None:
    mm.write(rw_pages, b"\x7f")
    assert probe(rw_pages, "w") == "ok"
    assert run_isolated(mm.write, rw_pages, b"\x01").status == "ok"
    assert mm.read(rw_pages, 1) == b"\x7f"


def test_probe_execute(mm: LibcMmap, rw_pages: int) -> None:
    mm.write(rw_pages, b"\xc3")
    assert probe(rw_pages, "x") == "SIGSEGV"  # rw-: no execute
    mm.mprotect(rw_pages, mm.page_size, R | ProtFlags.PROT_EXEC)
    assert probe(rw_pages, "x") == "ok"


def test_probe_rejects_unknown_access() -> None:
    with pytest.raises(ValueError, match="access='q'"):
        probe(0, "q")


def test_child_exception_reraised() -> None:
    def boom() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside") as info:
        run_isolated(boom)
    assert isinstance(info.value.__cause__, ChildError)
    assert "boom" in str(info.value.__cause__)


def test_child_unpicklable_result_reported() -> None:
    with pytest.raises(ChildError, match="unpicklable"):
        run_isolated(lambda: (lambda: 0))


def test_child_exit_reported() -> None:
    with pytest.raises(ChildError, match="status 3"):
        run_isolated(os._exit, 3)


def test_child_other_signal_named() -> None:
    assert run_isolated(lambda: os.kill(os.getpid(), signal.SIGABRT)).status == "SIGABRT"
    assert run_isolated(lambda: os.kill(os.getpid(), signal.SIGBUS)).status == "SIGBUS"


def test_child_timeout_killed() -> None:
    import time

    with pytest.raises(TimeoutError, match=r"timeout=0\.2s"):
        run_isolated(time.sleep, 30, timeout=0.2)


def test_child_does_not_flush_parent_buffers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("w") as stream:
        stream.write("parent")  # buffered, not yet written
        assert run_isolated(lambda: 1).value == 1
    assert out.read_text() == "parent"  # the child did not flush a second copy


def test_bad_input_errno_via_libc(mm: LibcMmap) -> None:
    with pytest.raises(MmapError) as info:
        mm.mmap(None, -1, R, PRIV | ANON, 0, None)
    assert info.value.errno == errno.ENOMEM
    with pytest.raises(MmapError) as info:
        mm.mmap(None, mm.page_size, R, PRIV, 0, 1 << 40)
    assert info.value.errno == errno.EBADF
    with pytest.raises(MmapError) as info:
        mm.mprotect(1 << 70, mm.page_size, R)
    assert info.value.errno == errno.ENOMEM
    with pytest.raises(MmapError) as info:
        mm.munmap((1 << 70) + 1, mm.page_size)
    assert info.value.errno == errno.EINVAL


class _NeedsTwo(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} {b}")  # pickles, but cannot be rebuilt from its args


def test_child_exception_that_cannot_be_rebuilt_reported() -> None:
    def boom() -> None:
        raise _NeedsTwo(1, 2)

    with pytest.raises(ChildError, match="_NeedsTwo: 1 2"):
        run_isolated(boom)
