"""Support for tests/test_loader_*.py: gcc-built fixtures across DESIGN.md's link-flag matrix,
the machine's libraries, glibc's view of a dlopen, and backend factories.

Fixtures are compiled at test time into a session temp dir (never committed), once per session.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loader.libc import LibcMmap
from loader.mmap import Mmap

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
SYSTEM_LIBS = {
    "libz": LIBDIR / "libz.so.1",
    "libzstd": LIBDIR / "libzstd.so.1",
    "libsqlite3": LIBDIR / "libsqlite3.so.0",
    "libcrypto": LIBDIR / "libcrypto.so.3",
}

LIB_SOURCE = r"""
#include <string.h>
#include <stdlib.h>
int counter = 5;
static int table[] = {10, 20, 30};
int *ptrs[] = {&counter, &table[1], &table[2]};
const char *message = "hello from the fixture";
char bss_buf[40000];
int init_ran;
extern int weak_missing(void) __attribute__((weak));
int add(int a, int b) { return a + b; }
int get_counter(void) { return counter + (weak_missing ? weak_missing() : 0); }
int (*fn_ptr)(int, int) = add;
size_t fixture_len(const char *s) { return strlen(s); }
int deref(int i) { return *ptrs[i]; }
int call_ptr(int a, int b) { return fn_ptr(a, b); }
int bss_sum(void) { int s = 0; for (int i = 0; i < 40000; i++) s += bss_buf[i]; return s; }
void *fixture_alloc(size_t n) { return malloc(n); }
__attribute__((constructor)) static void on_load(void) { init_ran = 1; }
"""

VERSION_SCRIPT = """
VERS_1.0 { global: add; get_counter; local: *; };
VERS_2.0 { global: deref; call_ptr; fixture_len; bss_sum; fixture_alloc; counter; message;
           ptrs; fn_ptr; bss_buf; init_ran; } VERS_1.0;
"""

TEXTREL_SOURCE = r"""
int target_value = 42;
int get_target(void) { return target_value; }
/* An absolute pointer in .text: the linker can only resolve it at load time, in a
   read-only segment, hence DT_TEXTREL. */
__asm__(".text\n.globl text_ptr\n.type text_ptr,@object\ntext_ptr:\n.quad target_value\n");
"""

PIE_SOURCE = r"""
#include <stdio.h>
extern char **environ;
int global_in_exe = 7;
int main(void) { printf("%d %p\n", global_in_exe, (void *)environ); return 0; }
"""

INITFINI_SOURCE = r"""
char log_[16];
int n_;
char *trail;       /* the caller may point it at a buffer that outlives the library */
static void mark(char c) { log_[n_++] = c; if (trail) *trail++ = c; }
__attribute__((constructor(101))) static void c1(void) { mark('A'); }
__attribute__((constructor(102))) static void c2(void) { mark('B'); }
__attribute__((destructor(101))) static void d1(void) { mark('y'); }
__attribute__((destructor(102))) static void d2(void) { mark('x'); }
void init_hook(void) { mark('I'); }
void fini_hook(void) { mark('F'); }
"""

INITFINI_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    lib = ctypes.CDLL(sys.argv[1])
    inits = ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(lib, "log_"))).decode()
    out = ctypes.create_string_buffer(16)
    ctypes.c_void_p.in_dll(lib, "trail").value = ctypes.addressof(out)
    libc = ctypes.CDLL(None)
    libc.dlclose.argtypes = [ctypes.c_void_p]
    assert libc.dlclose(lib._handle) == 0
    print(json.dumps([inits, out.value.decode()]))
""")


def glibc_init_fini(path: Path) -> tuple[str, str]:
    """The order glibc runs the initfini fixture's functions: (on dlopen, on dlclose)."""
    done = subprocess.run([sys.executable, "-c", INITFINI_PROBE, str(path)],
                          capture_output=True, text=True, check=True)
    inits, finis = json.loads(done.stdout)
    return str(inits), str(finis)


FLAG_MATRIX: dict[str, list[str]] = {
    "relro": ["-Wl,-z,relro"],
    "norelro": ["-Wl,-z,norelro"],
    "now": ["-Wl,-z,relro,-z,now"],
    "lazy": ["-Wl,-z,lazy"],
    "separate-code": ["-Wl,-z,separate-code"],
    "noseparate-code": ["-Wl,-z,noseparate-code"],
    "max-page-64k": ["-Wl,-z,max-page-size=0x10000"],
    "relr": ["-Wl,-z,pack-relative-relocs"],
    "fno-plt": ["-fno-plt"],
    "sysv-hash": ["-Wl,--hash-style=sysv"],
    "both-hash": ["-Wl,--hash-style=both"],
    "versioned": ["VERSIONED"],
}
"""Link-flag point -> extra gcc flags for LIB_SOURCE as a shared library."""


TLSDESC_SOURCE = """
__thread int counter = 7;
__thread char buffer[64];
int *counter_addr(void) { return &counter; }
char *buffer_addr(void) { return buffer; }
"""
"""Thread-local variables reached through TLS descriptors (gcc -mtls-dialect=gnu2)."""


def _gcc(args: list[str], cwd: Path) -> None:
    """Run gcc; fail the test session with its output when it fails."""
    done = subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"gcc {' '.join(args)} failed:\n{done.stderr}")


def build_fixtures(where: Path) -> dict[str, Path]:
    """Compile every fixture into ``where``; returns name -> path."""
    (where / "lib.c").write_text(LIB_SOURCE)
    (where / "textrel.c").write_text(TEXTREL_SOURCE)
    (where / "pie.c").write_text(PIE_SOURCE)
    (where / "vers.map").write_text(VERSION_SCRIPT)
    out: dict[str, Path] = {}
    for name, flags in FLAG_MATRIX.items():
        if flags == ["VERSIONED"]:
            flags = [f"-Wl,--version-script={where / 'vers.map'}"]
        target = where / f"lib_{name}.so"
        _gcc(["-O1", "-fPIC", "-shared", *flags, "-o", str(target), "lib.c"], where)
        out[name] = target
    _gcc(["-O1", "-fPIC", "-shared", "-o", str(where / "lib_textrel.so"), "textrel.c"], where)
    out["textrel"] = where / "lib_textrel.so"
    _gcc(["-O1", "-fPIE", "-pie", "-o", str(where / "pie"), "pie.c"], where)
    out["pie"] = where / "pie"
    _gcc(["-O1", "-fno-pie", "-no-pie", "-o", str(where / "exec"), "pie.c"], where)
    out["exec"] = where / "exec"
    (where / "initfini.c").write_text(INITFINI_SOURCE)
    _gcc(["-O1", "-fPIC", "-shared", "-Wl,-init,init_hook,-fini,fini_hook", "-o",
          str(where / "lib_initfini.so"), "initfini.c"], where)
    out["initfini"] = where / "lib_initfini.so"
    (where / "tlsdesc.c").write_text(TLSDESC_SOURCE)
    _gcc(["-O1", "-fPIC", "-shared", "-mtls-dialect=gnu2", "-o", str(where / "lib_tlsdesc.so"),
          "tlsdesc.c"], where)
    out["tlsdesc"] = where / "lib_tlsdesc.so"
    return out


@pytest.fixture(scope="session", name="fixture_libs")
def fixture_libs_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The gcc-built fixtures, compiled once per session."""
    return build_fixtures(tmp_path_factory.mktemp("loader_fixtures"))


GLIBC_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    lib = ctypes.CDLL(sys.argv[1])
    class LinkMap(ctypes.Structure):
        _fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p)]
    lm = ctypes.POINTER(LinkMap)()
    libdl = ctypes.CDLL(None)
    assert libdl.dlinfo(ctypes.c_void_p(lib._handle), 2, ctypes.byref(lm)) == 0  # RTLD_DI_LINKMAP
    print(json.dumps({"bias": lm.contents.l_addr,
                      "maps": open("/proc/self/maps").read()}))
""")


def glibc_maps(path: Path) -> tuple[int, str]:
    """dlopen ``path`` in a fresh Python process; its load bias and /proc/self/maps text."""
    done = subprocess.run([sys.executable, "-c", GLIBC_PROBE, str(path)], capture_output=True,
                          text=True, check=True)
    got = json.loads(done.stdout)
    return int(got["bias"]), str(got["maps"])


def sim_factory() -> Callable[[], Mmap]:
    """A constructor of fresh simulator backends."""
    from vmsim import AddressSpace

    return AddressSpace


def machine_elf_libraries() -> list[str]:
    """Every ELF shared object file (not a symlink) in /usr/lib/x86_64-linux-gnu, sorted."""
    import glob
    import os

    found = []
    for path in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")):
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            if f.read(4) == b"\x7fELF":
                found.append(path)
    return found


def host_mm() -> Mmap:
    """A fresh host backend."""
    return LibcMmap()


def cfunc(addr: int, restype: Any, *argtypes: Any) -> Any:
    """A ctypes function at ``addr``."""
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)
