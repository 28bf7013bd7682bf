"""A process image on the host: the objects this process has are used in place, the rest
loaded by our loader, with their TLS (``loader.hosttls``), exceptions (``loader.ehframe``),
init and fini. Every load runs in a forked child (a bug here would kill the test run)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest

from loader.isolate import run_isolated
from loader.libc import LibcMmap
from loader.linkmap import LinkMap
from loader.pipeline import LoadedObject
from loader.resident import Resident
from tests.test_host_tls import DIALECTS, _in_two_threads, libs  # noqa: F401  (fixture)


def _function(lm: LinkMap, handle: Any, name: str, restype: Any, *argtypes: Any) -> Any:
    return ctypes.CFUNCTYPE(restype, *argtypes)(lm.dlsym(handle, name))


def _cxx_in_linkmap(path: Path) -> dict[str, Any]:
    """dlopen the C++ fixture into a host LinkMap; count in two threads, throw and catch."""
    lm = LinkMap(LibcMmap())
    h = lm.dlopen(str(path))
    bump = _function(lm, h, "bump_counter", ctypes.c_int)
    tally = _function(lm, h, "bump_tally", ctypes.c_long)
    inside = _function(lm, h, "throw_inside", ctypes.c_int, ctypes.c_int)
    across = _function(lm, h, "catch_across", ctypes.c_int, ctypes.c_int)
    main = [bump(), bump()]
    threads = _in_two_threads(lambda: ([bump() for _ in range(100)],
                                       [tally() for _ in range(2)], across(1) + inside(5)))
    ours = [o.name for o in lm.objects if isinstance(o, LoadedObject)]
    libstdcxx = [type(o).__name__ for o in lm.objects if o.name == "libstdc++.so.6"]
    lm.unload()
    return {"main": main, "threads": threads, "ours": ours, "libstdcxx": libstdcxx}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_cxx_thread_local_and_exceptions_through_a_linkmap(libs: dict[str, Path],  # noqa: F811
                                                            dialect: str) -> None:
    """thread_local counts per thread from the initial value, a constructed thread_local
    object per thread, exceptions thrown and caught through our code in two threads;
    libstdc++ is the process's own, only the fixture is ours."""
    got = run_isolated(_cxx_in_linkmap, libs[f"cxx-{dialect}"], timeout=60.0)
    assert got.status == "ok"
    value = got.value
    assert value["main"] == [8, 9]
    for counts, tallies, thrown in value["threads"]:
        assert counts == list(range(8, 108))
        assert tallies == [1001, 1002]
        assert thrown == 148
    assert value["ours"] == [libs[f"cxx-{dialect}"].name]
    assert value["libstdcxx"] == [Resident.__name__]


def _curl_in_linkmap() -> tuple[bytes, bytes, int, list[str], list[str]]:
    """libcurl's closure through a host LinkMap: curl_version() equals glibc's answer."""
    lm = LinkMap(LibcMmap())
    h = lm.dlopen("libcurl.so.4")
    ours = _function(lm, h, "curl_version", ctypes.c_char_p)()
    glibc = ctypes.CDLL("libcurl.so.4").curl_version
    glibc.restype = ctypes.c_char_p
    loaded = len([o for o in lm.objects if isinstance(o, LoadedObject)])
    inits = list(lm.init_order)
    lm.unload()
    return ours, glibc(), loaded, inits, list(lm.fini_order)


def test_libcurl_closure_runs_on_the_host() -> None:
    """Every object of libcurl's closure the process lacks is loaded by us, inits run in
    glibc's order (dependencies first) and finis in the reverse at unload; the function
    answers as glibc's own copy does."""
    got = run_isolated(_curl_in_linkmap, timeout=120.0)
    assert got.status == "ok"
    ours, glibc, loaded, inits, finis = got.value
    assert ours == glibc and ours.startswith(b"libcurl/")
    assert loaded == len(inits) and inits[-1] == "libcurl.so.4"
    assert sorted(finis) == sorted(inits) and finis[0] == "libcurl.so.4"
