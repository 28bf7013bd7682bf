"""LinkMap on bad process images: cycles load once, and a missing dependency, a version
nobody defines, an undefined symbol or a file of another architecture is a clear error
naming the object and the chain that needed it, with nothing left mapped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import vmsim
from loader.errors import ElfDependencyError, ElfSymbolError
from loader.linkmap import LinkMap
from tests.search_support import tree_fixture  # noqa: F401  (the gcc-built fixture tree)


def _gcc(cwd: Path, *args: str) -> None:
    done = subprocess.run(["gcc", "-O1", "-fPIC", *args], cwd=cwd, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module", name="versions")
def versions_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """libver.so built first with versions VER_1 and VER_2 (libuser.so links against
    VER_2's ``ver``), then rebuilt with VER_1 only: libuser.so needs a version nobody
    defines. libundef.so calls a function no library defines."""
    d = tmp_path_factory.mktemp("versions")
    (d / "ver.c").write_text("int ver(void) { return 2; }\n")
    (d / "both.map").write_text("VER_1 { local: *; };\nVER_2 { global: ver; } VER_1;\n")
    (d / "one.map").write_text("VER_1 { global: ver; local: *; };\n")
    _gcc(d, "-shared", "-Wl,-soname,libver.so", "-Wl,--version-script=both.map",
         "-o", "libver.so", "ver.c")
    (d / "user.c").write_text("extern int ver(void);\nint user(void) { return ver(); }\n")
    _gcc(d, "-shared", "-Wl,-soname,libuser.so", "-o", "libuser.so", "user.c", "-L.",
         "-lver", "-Wl,-rpath,$ORIGIN")
    _gcc(d, "-shared", "-Wl,-soname,libver.so", "-Wl,--version-script=one.map",
         "-o", "libver.so", "ver.c")
    (d / "undef.c").write_text("extern int nowhere(void);\nint *nowhere_p = 0;\n"
                               "int undef(void) { return nowhere(); }\n")
    _gcc(d, "-shared", "-Wl,-z,lazy", "-o", "libundef.so", "undef.c")
    (d / "undefdata.c").write_text("extern int nowhere_data;\n"
                                   "int undefdata(void) { return nowhere_data; }\n")
    _gcc(d, "-shared", "-o", "libundefdata.so", "undefdata.c")
    return {"user": d / "libuser.so", "undef": d / "libundef.so",
            "undefdata": d / "libundefdata.so"}


def _booted() -> tuple[LinkMap, list[tuple[int, int]]]:
    """A LinkMap on the simulator with libc and ld.so loaded, and its regions then."""
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen("libc.so.6")
    return lm, [(r.start, r.end) for r in lm.mm.maps()]


def _regions(lm: LinkMap) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in lm.mm.maps()]


def test_a_cycle_loads_each_object_once(tree: dict[str, Path]) -> None:
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(str(tree["cyca"]))
    names = [o.name for o in lm.objects]
    assert names.count("libcyca.so") == 1 and names.count("libcycb.so") == 1
    assert {b.target for b in lm.bindings() if b.symbol == "cyca"} == {"libcyca.so"}


def test_a_missing_dependency_names_it_and_the_chain(tree: dict[str, Path]) -> None:
    lm, before = _booted()
    with pytest.raises(ElfDependencyError) as caught:
        lm.dlopen(str(tree["miss"]))
    assert "libnothere.so" in str(caught.value) and "libmiss.so" in str(caught.value)
    assert _regions(lm) == before
    assert [o.name for o in lm.objects] == ["libc.so.6", "ld-linux-x86-64.so.2"]


def test_another_architecture_is_skipped_and_named(tree: dict[str, Path]) -> None:
    lm = LinkMap(vmsim.AddressSpace(), library_path=[str(tree["wrong64"].parent)])
    lm.dlopen("libc.so.6")
    before = _regions(lm)
    with pytest.raises(ElfDependencyError) as caught:
        lm.dlopen("libleaf.so")
    assert str(tree["wrong64"]) in str(caught.value)
    assert _regions(lm) == before


def test_a_version_nobody_defines_names_the_version_and_chain(
        versions: dict[str, Path]) -> None:
    lm, before = _booted()
    with pytest.raises(ElfDependencyError) as caught:
        lm.dlopen(str(versions["user"]))
    message = str(caught.value)
    assert "VER_2" in message and "libver.so" in message and "libuser.so" in message
    assert _regions(lm) == before


def test_an_undefined_function_fails_now_and_waits_when_lazy(
        versions: dict[str, Path]) -> None:
    lm, before = _booted()
    with pytest.raises(ElfSymbolError) as caught:
        lm.dlopen(str(versions["undef"]), bind="now")
    assert "nowhere" in str(caught.value) and "libundef.so" in str(caught.value)
    assert _regions(lm) == before
    lm.dlopen(str(versions["undef"]), bind="lazy")
    slot = [b for b in lm.bindings() if b.symbol == "nowhere"]
    assert slot and all(b.pending and b.target is None for b in slot)


def test_undefined_data_fails_even_when_lazy(versions: dict[str, Path]) -> None:
    lm, before = _booted()
    with pytest.raises(ElfSymbolError, match="nowhere_data"):
        lm.dlopen(str(versions["undefdata"]), bind="lazy")
    assert _regions(lm) == before


def test_dlclose_unmaps_what_only_it_held(tree: dict[str, Path]) -> None:
    lm, before = _booted()
    h = lm.dlopen(str(tree["mid"]))
    again = lm.dlopen("libmid.so")
    assert again is h
    lm.dlclose(h)
    assert "libmid.so" in [o.name for o in lm.objects]
    lm.dlclose(h)
    assert [o.name for o in lm.objects] == ["libc.so.6", "ld-linux-x86-64.so.2"]
    assert _regions(lm) == before
    assert lm.fini_order[-2:] == ["libmid.so", "libleaf.so"]
    lm.unload()
    assert _regions(lm) == []


def test_resolver_hooks_come_before_and_after_the_scope(versions: dict[str, Path]) -> None:
    """LinkMap(resolver=...): a pre_find hook wins over the scope; a post_find hook binds
    what nobody defines (the undefined ``nowhere`` loads then)."""
    from loader import Resolver
    from loader.linkmap import HOOKED

    hooks = Resolver(pre_find=[lambda name, version: 0x1000 if name == "malloc" else None],
                     post_find=[lambda name, version: 0x2000 if name == "nowhere" else None])
    lm = LinkMap(vmsim.AddressSpace(), resolver=hooks)
    lm.dlopen(str(versions["undef"]), bind="now")
    got = {b.symbol: (b.target, b.value) for b in lm.bindings() if b.object == "libundef.so"}
    assert got["nowhere"] == (HOOKED, 0x2000)
    libc_malloc = {(b.target, b.value) for b in lm.bindings()
                   if b.object == "libc.so.6" and b.symbol == "malloc"}
    assert libc_malloc == {(HOOKED, 0x1000)}
