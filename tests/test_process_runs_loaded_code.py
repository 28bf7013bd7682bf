"""Loaded code runs on the simulated process's CPU: IFUNC resolvers and init functions of a
LinkMap on ``vmsim.Process`` run on the emulated CPU (the backend's ``call``), so real
libraries answer as they do natively (against Python's hashlib and sqlite3 modules)."""

from __future__ import annotations

import hashlib
import sqlite3

import vmsim


def test_libcrypto_hashes_as_hashlib() -> None:
    """libcrypto's init (OPENSSL_cpuid_setup: cpuid on the emulated CPU) runs at dlopen;
    SHA256_Init/Update/Final over 64 KiB then equal hashlib's digest."""
    with vmsim.Process(timeout=30.0) as proc:
        h = proc.dlopen("libcrypto.so.3")
        assert proc.linkmap is not None and proc.linkmap.init_order[-1] == "libcrypto.so.3"
        data = bytes(range(256)) * 256
        ctx, buf, out = proc.alloc(bytes(256)), proc.alloc(data), proc.alloc(bytes(32))
        assert proc.call(proc.dlsym(h, "SHA256_Init"), ctx) == 1
        assert proc.call(proc.dlsym(h, "SHA256_Update"), ctx, buf, len(data)) == 1
        assert proc.call(proc.dlsym(h, "SHA256_Final"), out, ctx) == 1
        assert proc.space.read(out, 32) == hashlib.sha256(data).digest()


def test_libsqlite3_version_as_python_sqlite3() -> None:
    with vmsim.Process(timeout=30.0) as proc:
        h = proc.dlopen("libsqlite3.so.0")
        text = proc.space.read(proc.call(proc.dlsym(h, "sqlite3_libversion")), 32)
        assert text.split(b"\0")[0].decode() == sqlite3.sqlite_version


def test_libc_ifuncs_are_chosen_on_the_cpu() -> None:
    """libc's strlen, memcpy and snprintf through their IFUNC resolvers, run on the emulated
    CPU: the bindings are no longer pending, each slot holds the chosen implementation (not
    the resolver) inside libc, and the functions work."""
    with vmsim.Process(timeout=30.0) as proc:
        libc = proc.dlopen("libc.so.6")
        assert proc.linkmap is not None
        ifunc = [b for b in proc.linkmap.bindings()
                 if b.object == "libc.so.6" and b.type == "R_X86_64_JUMP_SLOT"]
        assert ifunc and not any(b.pending for b in ifunc)
        text = proc.alloc(b"hello, simulated world\0")
        assert proc.call(proc.dlsym(libc, "strlen"), text) == 22
        copy = proc.alloc(bytes(32))
        proc.call(proc.dlsym(libc, "memcpy"), copy, text, 22)
        assert proc.space.read(copy, 22) == b"hello, simulated world"
        fmt, out = proc.alloc(b"%d-%s\0"), proc.alloc(bytes(64))
        assert proc.call(proc.dlsym(libc, "snprintf"), out, 64, fmt, 42, text) == 25
        assert proc.space.read(out, 25) == b"42-hello, simulated world"
