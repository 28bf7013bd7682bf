"""ld.so's start-up state for libc, written by the LinkMap of a ``vmsim.Process``
(``loader.rtld_start``): what glibc's ld.so would have left for libc is there, so libc behaves
as in a real process. Checked against glibc itself: the same calls made natively (through
ctypes in this process, or in a gcc-built program linked against libc only)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import vmsim
from loader.rtld_start import thread_db_field
from vmsim.process import Process

TLS_STATIC_INFO = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(void) {
    void (*info)(size_t *, size_t *) = dlsym(RTLD_DEFAULT, "_dl_get_tls_static_info");
    size_t size, align;
    info(&size, &align);
    printf("%zu %zu\n", size, align);
    return 0;
}
"""


def _libc_process() -> Process:
    proc = vmsim.Process(timeout=30.0)
    proc.dlopen("libc.so.6")
    return proc


def test_every_step_of_the_start_up_is_done() -> None:
    with _libc_process() as proc:
        assert proc.linkmap is not None and proc.linkmap.rtld_start is not None
        start = proc.linkmap.rtld_start
        assert start.skipped == []
        assert [step.split(":")[0].split("(")[0] for step in start.done] == \
            ["_rtld_global_ro", "struct pthread", "_rtld_global", "__libc_early_init"]


def test_openssl_one_shot_sha256_equals_hashlib() -> None:
    """OpenSSL's one-shot SHA256() takes a write lock in its first use: with the main
    thread's tid at 0 glibc said EDEADLK and the lock was never made (a fault at 0x18)."""
    with vmsim.Process(timeout=30.0) as proc:
        h = proc.dlopen("libcrypto.so.3")
        data = bytes(range(256)) * 64
        buf, out = proc.alloc(data), proc.alloc(bytes(32))
        assert proc.call(proc.dlsym(h, "SHA256"), buf, len(data), out) == out
        assert proc.space.read(out, 32) == hashlib.sha256(data).digest()


def test_libc_sees_the_static_tls_glibc_gives_a_program_linked_against_libc_only(
        tmp_path: Path) -> None:
    """``_dl_get_tls_static_info`` (ld.so's own accessor) answers in the Process what it
    answers in a real program that has only libc: the sizes the LinkMap laid out."""
    (tmp_path / "info.c").write_text(TLS_STATIC_INFO)
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "info"), str(tmp_path / "info.c")],
                   check=True)
    real = subprocess.run([str(tmp_path / "info")], capture_output=True, text=True,
                          check=True).stdout.split()
    with _libc_process() as proc:
        out = proc.alloc(bytes(16))
        proc.call(proc.dlsym(None, "_dl_get_tls_static_info"), out, out + 8)
        got = [int.from_bytes(proc.space.read(out + k, 8), "little") for k in (0, 8)]
    assert got == [int(v) for v in real]


def _mutex_story(fn: Callable[..., int], lock: int, native_tid: int) -> list[int]:
    """An error-checking mutex locked, locked again, unlocked, then a write lock: glibc's
    answers, and whether the mutex's owner is the thread's tid."""
    answers = [fn("pthread_mutexattr_init", lock + 64), fn("pthread_mutexattr_settype",
               lock + 64, 2), fn("pthread_mutex_init", lock, lock + 64),
               fn("pthread_mutex_lock", lock)]
    owner = fn("owner", lock)
    answers += [int(owner == native_tid), fn("pthread_mutex_lock", lock),
                fn("pthread_mutex_unlock", lock), fn("pthread_rwlock_wrlock", lock + 128),
                fn("pthread_rwlock_unlock", lock + 128)]
    return answers


def test_the_main_thread_owns_its_locks_as_in_a_real_process() -> None:
    """glibc identifies a lock's owner by the thread's tid: in the Process the same calls
    give the same answers as natively (0, 0, 0, 0, owner is me, EDEADLK, 0, 0, 0)."""
    libc = ctypes.CDLL(None)
    native = ctypes.create_string_buffer(512)
    base = ctypes.addressof(native)

    def here(name: str, *args: int) -> int:
        if name == "owner":
            return ctypes.c_int.from_address(args[0] + 8).value   # __data.__owner
        fn = getattr(libc, name)
        fn.argtypes = [ctypes.c_void_p] * len(args)
        return int(fn(*args))
    expected = _mutex_story(here, base, threading.get_native_id())
    assert expected == [0, 0, 0, 0, 1, errno.EDEADLK, 0, 0, 0]
    with _libc_process() as proc:
        lock = proc.alloc(bytes(512))

        def there(name: str, *args: int) -> int:
            if name == "owner":
                return int.from_bytes(proc.space.read(args[0] + 8, 4), "little")
            return proc.call(proc.dlsym(None, name), *args) & 0xFFFF_FFFF
        tid = proc.call(proc.dlsym(None, "gettid"))
        assert _mutex_story(there, lock, tid) == expected


def test_libc_early_init_ran() -> None:
    """``__libc_early_init(true)``: the ctype tables are set (isalpha, toupper work) and the
    initial namespace is single-threaded, as in a real process before its first thread."""
    with _libc_process() as proc:
        assert proc.call(proc.dlsym(None, "isalpha"), ord("a")) != 0
        assert proc.call(proc.dlsym(None, "isalpha"), ord("1")) == 0
        assert proc.call(proc.dlsym(None, "toupper"), ord("q")) == ord("Q")
        assert proc.space.read(proc.dlsym(None, "__libc_single_threaded"), 1) == b"\x01"


def test_a_descriptor_that_does_not_describe_one_field_is_not_used() -> None:
    """libthread_db descriptors are read, not trusted: a size or count other than the
    field's gives no offset. The one for the tid names where the thread's tid now is."""
    with _libc_process() as proc:
        assert proc.linkmap is not None and proc.linkmap.thread is not None
        tid = proc.dlsym(None, "_thread_db_pthread_tid")
        offset = thread_db_field(proc.space, tid, 32)
        assert offset is not None
        assert int.from_bytes(proc.space.read(proc.linkmap.thread.tp + offset, 4), "little") \
            == proc.call(proc.dlsym(None, "gettid"))
        assert thread_db_field(proc.space, tid, 64) is None
        assert thread_db_field(proc.space, None, 32) is None


@pytest.mark.parametrize("name", ["_rtld_global_ro", "_rtld_global"])
def test_nothing_is_left_tagged(name: str) -> None:
    """The tags the TLS fields were found with are all gone from ld.so's structs."""
    with _libc_process() as proc:
        addr = proc.dlsym(None, name)
        words = proc.space.read(addr, 896)
        tags = [int.from_bytes(words[k:k + 8], "little") >> 24 for k in range(0, 896, 8)]
        assert 0x7A6C64 not in tags
