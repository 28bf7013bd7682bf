"""The loader on the host backend: this machine's libz and libzstd, loaded by our loader (not
dlopen), answer ctypes calls correctly; gcc-built fixtures across the link-flag matrix run.

Every load runs in a forked child (loader.isolate): a loader bug kills the child, not pytest.
"""

from __future__ import annotations

import ctypes
import zlib
from pathlib import Path
from typing import Any

import pytest
from loader_support import SYSTEM_LIBS, cfunc, fixture_libs_fixture  # noqa: F401

from loader import CopyingMmap, ElfUnsupportedError, load
from loader.libc import LibcMmap
from vmsim.fuzz.isolate import run_isolated

DATA = b"vmsim loads libz itself. " * 200


def _zlib_calls(source: Any) -> dict[str, Any]:
    """In the child: load libz with our loader and call it."""
    obj = load(source, LibcMmap())
    crc32 = cfunc(obj.symbol("crc32"), ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p,
                  ctypes.c_uint)
    adler32 = cfunc(obj.symbol("adler32"), ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p,
                    ctypes.c_uint)
    size_t_p = ctypes.POINTER(ctypes.c_ulong)
    compress = cfunc(obj.symbol("compress"), ctypes.c_int, ctypes.c_char_p, size_t_p,
                     ctypes.c_char_p, ctypes.c_ulong)
    uncompress = cfunc(obj.symbol("uncompress"), ctypes.c_int, ctypes.c_char_p, size_t_p,
                       ctypes.c_char_p, ctypes.c_ulong)
    packed = ctypes.create_string_buffer(len(DATA) + 1024)
    packed_len = ctypes.c_ulong(len(packed))
    rc1 = compress(packed, ctypes.byref(packed_len), DATA, len(DATA))
    out = ctypes.create_string_buffer(len(DATA))
    out_len = ctypes.c_ulong(len(out))
    rc2 = uncompress(out, ctypes.byref(out_len), packed.raw[: packed_len.value],
                     packed_len.value)
    result = {"crc32": crc32(0, DATA, len(DATA)), "adler32": adler32(1, DATA, len(DATA)),
              "rc": (rc1, rc2), "packed": packed.raw[: packed_len.value],
              "round_trip": out.raw[: out_len.value],
              "version": ctypes.string_at(cfunc(obj.symbol("zlibVersion"), ctypes.c_void_p)())}
    obj.unload()
    return result


@pytest.mark.parametrize("how", ["path", "bytes"])
def test_libz_answers_ctypes_calls(how: str) -> None:
    path = SYSTEM_LIBS["libz"]
    source = path if how == "path" else path.read_bytes()
    status, got = run_isolated(_zlib_calls, source)
    assert status == "ok"
    assert got["crc32"] == zlib.crc32(DATA)
    assert got["adler32"] == zlib.adler32(DATA)
    assert got["rc"] == (0, 0)
    assert got["round_trip"] == DATA
    assert zlib.decompress(got["packed"]) == DATA
    assert got["version"].decode() == zlib.ZLIB_RUNTIME_VERSION


def _zstd_calls() -> tuple[int, int, bytes]:
    """In the child: load libzstd with our loader; version and a round trip."""
    obj = load(SYSTEM_LIBS["libzstd"], LibcMmap())
    version = cfunc(obj.symbol("ZSTD_versionNumber"), ctypes.c_uint)()
    bound = cfunc(obj.symbol("ZSTD_compressBound"), ctypes.c_size_t, ctypes.c_size_t)
    compress = cfunc(obj.symbol("ZSTD_compress"), ctypes.c_size_t, ctypes.c_char_p,
                     ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
    decompress = cfunc(obj.symbol("ZSTD_decompress"), ctypes.c_size_t, ctypes.c_char_p,
                       ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    dst = ctypes.create_string_buffer(bound(len(DATA)))
    n = compress(dst, len(dst), DATA, len(DATA), 3)
    out = ctypes.create_string_buffer(len(DATA))
    m = decompress(out, len(out), dst.raw[:n], n)
    return version, n, out.raw[:m]


def test_libzstd_answers_ctypes_calls() -> None:
    status, (version, n, back) = run_isolated(_zstd_calls)
    assert status == "ok"
    real = ctypes.CDLL(str(SYSTEM_LIBS["libzstd"]))  # the reference: glibc's dlopen
    assert version == real.ZSTD_versionNumber()
    assert 0 < n < len(DATA)
    assert back == DATA


def _fixture_calls(path: Path, copy: bool) -> list[int]:
    """In the child: load a fixture library and call into it."""
    mm = CopyingMmap(LibcMmap()) if copy else LibcMmap()
    obj = load(path, mm)
    c_int = ctypes.c_int
    calls = [cfunc(obj.symbol("add"), c_int, c_int, c_int)(2, 3),
             cfunc(obj.symbol("deref"), c_int, c_int)(1),
             cfunc(obj.symbol("call_ptr"), c_int, c_int, c_int)(4, 5),
             cfunc(obj.symbol("fixture_len"), ctypes.c_size_t, ctypes.c_char_p)(b"abcd"),
             cfunc(obj.symbol("bss_sum"), c_int)(),
             cfunc(obj.symbol("get_counter"), c_int)(),
             c_int.from_address(obj.symbol("init_ran")).value]
    obj.unload()
    return calls


@pytest.mark.parametrize("copy", [False, True], ids=["use_file", "need_copy"])
@pytest.mark.parametrize("point", ["relro", "norelro", "now", "lazy", "separate-code",
                                   "noseparate-code", "max-page-64k", "relr", "fno-plt",
                                   "sysv-hash", "both-hash", "versioned"])
def test_fixture_runs(fixture_libs: dict[str, Path], point: str, copy: bool) -> None:
    status, calls = run_isolated(_fixture_calls, fixture_libs[point], copy)
    assert status == "ok"
    # add, *ptrs[1], fn_ptr, strlen via PLT/GOT, zeroed .bss, weak undefined = 0, constructor
    assert calls == [5, 20, 9, 4, 0, 5, 1]


def _textrel(path: Path) -> tuple[int, int, int]:
    """In the child: the TEXTREL fixture's pointer in .text is relocated, text sealed again."""
    mm = LibcMmap()
    obj = load(path, mm)
    ptr = ctypes.c_uint64.from_address(obj.symbol("text_ptr")).value
    perms = {r.perms for r in mm.maps() if obj.span[0] <= r.start < obj.span[1]}
    return ptr, obj.symbol("target_value"), int(any("w" in p and "x" in p for p in perms))


def test_textrel_relocated_and_restored(fixture_libs: dict[str, Path]) -> None:
    status, (ptr, target, wx) = run_isolated(_textrel, fixture_libs["textrel"])
    assert status == "ok"
    assert ptr == target
    assert wx == 0


def test_host_refuses_pt_tls() -> None:
    def attempt() -> str:
        try:
            load("/usr/lib/x86_64-linux-gnu/libc.so.6", LibcMmap())
        except ElfUnsupportedError as exc:
            return str(exc)
        return "loaded"

    status, message = run_isolated(attempt)
    assert status == "ok"
    assert message.startswith("PT_TLS")


def _libm_calls() -> tuple[dict[str, float], int, dict[str, int]]:
    """In the child: libm by our loader: IFUNC symbols and IRELATIVE resolvers run on the
    host; log(-1) sets errno through the TPOFF64 relocation against libc's errno."""
    obj = load("/usr/lib/x86_64-linux-gnu/libm.so.6", LibcMmap())
    values = {name: cfunc(obj.symbol(name), ctypes.c_double, ctypes.c_double)(0.7)
              for name in ("cos", "sin", "exp", "log", "floor", "ceil", "atan", "tan")}
    libc = ctypes.CDLL(None)
    libc.__errno_location.restype = ctypes.POINTER(ctypes.c_int)
    errno_p = libc.__errno_location()
    errno_p[0] = 0
    cfunc(obj.symbol("log"), ctypes.c_double, ctypes.c_double)(-1.0)
    return values, errno_p[0], dict(obj.relocations.by_type)


def test_libm_ifunc_irelative_and_tls_on_the_host() -> None:
    import errno
    import math

    status, (values, err, by_type) = run_isolated(_libm_calls)
    assert status == "ok"
    assert values == {name: getattr(math, name)(0.7) for name in values}
    assert by_type["R_X86_64_IRELATIVE"] > 0 and by_type["R_X86_64_TPOFF64"] > 0
    assert err == errno.EDOM
