"""vmsim.Process calling into this machine's libz, loaded with its closure (libc included)
by loader.LinkMap: results equal Python's zlib; code writing RELRO faults."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
from elftools.elf.elffile import ELFFile
from process_support import load_code

import vmsim

MIB = 1 << 20


@pytest.fixture(scope="module")
def libz() -> Iterator[vmsim.Process]:
    with vmsim.Process() as proc:
        proc.dlopen("libz.so.1")
        yield proc


@pytest.fixture(scope="module")
def buffer(libz: vmsim.Process) -> tuple[int, bytes]:
    data = bytes((k * 7 + (k >> 11)) & 0xFF for k in range(MIB))
    return libz.alloc(data), data


def test_crc32_of_a_mebibyte_equals_zlibs(libz: vmsim.Process,
                                          buffer: tuple[int, bytes]) -> None:
    addr, data = buffer
    crc32 = libz.dlsym(libz.dlopen("libz.so.1"), "crc32")
    assert libz.call(crc32, 0, addr, len(data)) == zlib.crc32(data)
    assert libz.call(crc32, 0, addr + 1, 1000) == zlib.crc32(data[1:1001])


def test_adler32_of_a_mebibyte_equals_zlibs(libz: vmsim.Process,
                                            buffer: tuple[int, bytes]) -> None:
    addr, data = buffer
    adler32 = libz.dlsym(libz.dlopen("libz.so.1"), "adler32")
    assert libz.call(adler32, 1, addr, len(data)) == zlib.adler32(data)


def test_the_fs_base_is_the_link_maps_thread_pointer(libz: vmsim.Process) -> None:
    """%fs:0 holds the TCB's self pointer in the thread area LinkMap built."""
    read, _ = load_code(libz, "mov rax, fs:[0]\n ret")
    canary, _ = load_code(libz, "mov rax, fs:[0x28]\n ret")  # what -fstack-protector reads
    assert libz.linkmap is not None and libz.linkmap.thread is not None
    assert libz.cpu.reg("fs_base") == libz.linkmap.thread.tp
    tp = libz.linkmap.thread.tp
    assert libz.call(read) == int.from_bytes(libz.space.read(tp, 8), "little") == tp
    assert libz.call(canary) == int.from_bytes(libz.space.read(tp + 0x28, 8), "little")


def test_code_writing_libz_relro_faults_at_its_store(libz: vmsim.Process) -> None:
    assert libz.linkmap is not None
    obj = next(o for o in libz.linkmap.objects if o.name == "libz.so.1")
    with open(obj.path, "rb") as f:
        relro = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_GNU_RELRO")
    where = obj.load_bias + relro["p_vaddr"]
    before = libz.space.read(where, 8)
    store, labels = load_code(libz, "store:\n mov [rdi], rsi\n ret")
    with pytest.raises(vmsim.Fault) as info:
        libz.call(store, where, 0xDEAD)
    assert (info.value.access, info.value.signal, info.value.code, info.value.pc) == (
        "w", "SIGSEGV", "SEGV_ACCERR", labels["store"])
    assert info.value.addr == where
    assert libz.space.read(where, 8) == before
