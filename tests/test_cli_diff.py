"""``vmsim diff`` (loader.compare): both loads really go at one base even when this process
allocates between them; only the pages that differ keep their bytes; a load that dies is its
own exit status (3) with one line naming the backend and how it died."""

from __future__ import annotations

import mmap
import os
import signal
import time
from typing import Any

import pytest
from cli_support import run_cli
from loader_support import SYSTEM_LIBS

import loader.compare
import vmsim
from loader.compare import MAX_DIFF_PAGES, compare_backends
from loader.libc import LibcMmap
from vmsim.cli import EXIT

LIBZ = str(SYSTEM_LIBS["libz"])
_real_load = loader.compare.load
_real_run_isolated = loader.compare.run_isolated


def test_this_process_allocating_between_the_loads_cannot_take_the_base(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # After each host child this process maps blocks of the sizes a load of libz reserves:
    # the kernel's top-down allocator hands them exactly the range the child had used.
    kept: list[mmap.mmap] = []

    def allocating(*args: Any, **kwargs: Any) -> Any:
        result = _real_run_isolated(*args, **kwargs)
        for size in (0x1F000, 0x20000, 0x21000, 0x22000, 0x23000, 1 << 20):
            kept.append(mmap.mmap(-1, size))
        return result

    monkeypatch.setattr(loader.compare, "run_isolated", allocating)
    result = compare_backends(LIBZ, vmsim.AddressSpace())
    assert result.differences == []
    assert len(kept) >= 12          # the hook ran after both host children


class _Skewed(vmsim.AddressSpace):
    """The simulator, except that byte +0x10 of each span reads back flipped."""

    def __init__(self) -> None:
        super().__init__()
        self.spot: int | None = None

    def mmap_reserve(self, addr: int | None, length: int, use_file: bool) -> int:
        got = int(super().mmap_reserve(addr, length, use_file))
        self.spot = got + 0x10 if self.spot is None else self.spot
        return got

    def read(self, addr: int, n: int) -> bytes:
        data = bytearray(super().read(addr, n))
        if self.spot is not None and addr <= self.spot < addr + n:
            data[self.spot - addr] ^= 0xFF
        return bytes(data)


def test_only_the_differing_page_keeps_its_bytes() -> None:
    result = compare_backends(LIBZ, _Skewed())
    assert len(result.differences) == 1
    assert result.differences[0].startswith("page +0x0: sha1")
    assert "first at +0x10" in result.differences[0]
    assert result.host.raw is not None and result.other.raw is not None
    assert sorted(result.host.raw) == sorted(result.other.raw) == [0]
    assert len(result.host.pages) > 10          # every page still compared by hash
    assert MAX_DIFF_PAGES >= 1


def test_differing_outcomes_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmsim, "AddressSpace", _Skewed)
    ran = run_cli("diff", LIBZ)
    assert ran.code == EXIT["differ"] == 1
    assert "outcomes differ" in ran.out and "page +0x0" in ran.out and ran.err == ""


def _dying_host_load(how: str) -> Any:
    """loader.compare.load, except that a host load (LibcMmap) dies ``how``."""

    def fake(source: Any, mm: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(mm, LibcMmap):
            if how == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif how == "memory":
                block = bytearray(512 << 20)
                block[:: 4096] = b"\1" * len(block[:: 4096])
            elif how == "time":
                time.sleep(60)
        return _real_load(source, mm, *args, **kwargs)

    return fake


@pytest.mark.parametrize(("how", "said"), [
    ("segv", "killed by SIGSEGV"),
    ("memory", "past its memory bound of 64 MiB"),
    ("time", "still running after 1 s"),
])
def test_a_dead_host_child_is_exit_3_naming_backend_and_cause(
        monkeypatch: pytest.MonkeyPatch, how: str, said: str) -> None:
    monkeypatch.setattr(loader.compare, "load", _dying_host_load(how))
    monkeypatch.setattr(loader.compare, "HOST_MAX_RSS", 64 << 20)
    monkeypatch.setattr(loader.compare, "HOST_TIMEOUT", 1.0)
    ran = run_cli("diff", LIBZ, timeout=30)
    assert ran.code == EXIT["died"] == 3
    line = ran.one_error_line()
    assert "the libc load died" in line and said in line, line
    assert ran.out == ""


def test_a_dead_host_child_of_load_is_exit_3_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import vmsim.cli

    def segv(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(vmsim.cli, "load", segv)
    for verb in ("load", "maps", "plot"):
        extra = ["-o", "/tmp/unused.png"] if verb == "plot" else []
        ran = run_cli(verb, LIBZ, "--backend", "libc", *extra)
        assert ran.code == 3
        assert "the libc load died: killed by SIGSEGV" in ran.one_error_line()


def test_help_documents_the_exit_statuses() -> None:
    ran = run_cli("--help")
    assert ran.code == 0
    for status in ("0 ", "1 ", "2 ", "3 ", "4 ", "130", "141"):
        assert f"\n  {status}" in ran.out
    assert "3 when a load died" in " ".join(run_cli("diff", "--help").out.split())
