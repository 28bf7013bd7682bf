"""Support for tests/test_search_*.py: gcc-built fixture trees for the library search, and
the comparison with this machine's real ``ldd`` (addresses masked).

The tree (under one temporary directory D, built once per session):
  lib/libleaf.so, other/libleaf.so   two files of one soname, told apart by their directory
  lib/libmid.so      needs libleaf.so; DT_RUNPATH $ORIGIN
  lib2/libleaf2.so; lib/libmid2.so needs libleaf2.so (no path of its own)
  bin/prog_rpath     needs libmid.so, libmid2.so; DT_RPATH $ORIGIN/../lib:${ORIGIN}/../lib2
  bin/prog_runpath   the same with DT_RUNPATH (which libmid2's libleaf2.so does not inherit)
  bin/prog_plain     needs libleaf.so, no path (found through LD_LIBRARY_PATH or not at all)
  bin/prog_both      DT_RPATH D/first:D/lib and DT_RUNPATH D/lib (a DT_DEBUG turned
                     DT_RUNPATH, pointing into the RPATH string): the RPATH must be ignored
  first/libleaf.so   a valid libleaf.so that only the (ignored) RPATH of prog_both reaches
  cycle/libcyca.so <-> cycle/libcycb.so   each needs the other (DT_RUNPATH $ORIGIN)
  miss/libmiss.so    needs libnothere.so, which exists nowhere; miss/libmiss2.so needs it too
  wrong64/libleaf.so an aarch64 (e_machine 183) copy; wrong32/libleaf.so an ELFCLASS32 copy
  notelf/libleaf.so  text: glibc stops the search there with "invalid ELF header"
  bin/prog_nodeflib  needs libleaf.so and libc.so.6, linked -z nodefaultlib
  hw/libleaf.so, hw/glibc-hwcaps/x86-64-v2/libleaf.so   a glibc-hwcaps subdirectory
  legacy/libleaf.so, legacy/x86_64/libleaf.so   a legacy hwcap (AT_PLATFORM) subdirectory
  bin/prog_dst       needs libleaf.so, libleaf2.so; DT_RPATH $ORIGIN/../dst/$LIB:
                     ${ORIGIN}/../dst/${PLATFORM}, which hold one each
  bin/prog_slash, bin/prog_abs   need lib/libns.so (no soname) by the path given to gcc:
                     ./lib/libns.so (relative to the current directory) and D/lib/libns.so
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from loader.elf import parse_image
from loader.pages import HOST_PAGE_SIZE
from loader.tables import read_dynamic

LEAF = "int leaf(void) { return 1; }\n"
USE = "extern int {fn}(void);\nint {name}(void) {{ return {fn}() + 1; }}\n"
MAIN = "extern int {fn}(void);\nint main(void) {{ return {fn}(); }}\n"


def _gcc(cwd: Path, *args: str) -> None:
    """Run gcc in ``cwd``; RuntimeError with its output when it fails."""
    done = subprocess.run(["gcc", "-O1", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"gcc {' '.join(args)} failed:\n{done.stderr}")


def _lib(where: Path, name: str, source: str, *flags: str) -> Path:
    """Compile ``source`` into ``where/name`` (soname ``name``), with ``flags`` last."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.c").write_text(source)
    _gcc(where, "-fPIC", "-shared", f"-Wl,-soname,{name}", "-o", name, f"{name}.c",
         "-Wl,--no-as-needed", *flags)
    return where / name


def _prog(where: Path, name: str, fn: str, *flags: str) -> Path:
    """A PIE ``where/name`` whose main calls ``fn`` (from the libraries in ``flags``)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.c").write_text(MAIN.format(fn=fn))
    _gcc(where, "-fPIE", "-pie", "-o", name, f"{name}.c", "-Wl,--no-as-needed", *flags)
    return where / name


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite the ``fmt`` field at ``offset`` of the file ``path``."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _rpath_and_runpath(prog: Path, skip: int) -> None:
    """Turn ``prog``'s DT_DEBUG into a DT_RUNPATH naming its DT_RPATH string from byte
    ``skip`` on (so the file has both, the RUNPATH a suffix of the RPATH)."""
    data = prog.read_bytes()
    image = parse_image(data, HOST_PAGE_SIZE)
    tags, _ = read_dynamic(image)
    assert image.dynamic is not None
    dyn = image.dynamic.p_offset
    for at in range(dyn, dyn + image.dynamic.p_filesz, 16):
        tag, _ = struct.unpack_from("<qQ", data, at)
        if tag == 21:                               # DT_DEBUG
            _patch(prog, at, "<q", 29)              # DT_RUNPATH
            _patch(prog, at + 8, "<Q", tags[15] + skip)
            return
    raise AssertionError(f"{prog}: no DT_DEBUG to turn into DT_RUNPATH")


def build_tree(d: Path) -> dict[str, Path]:
    """Build the fixture tree of the module docstring in ``d``; name -> path."""
    lib, bin_ = d / "lib", d / "bin"
    out = {"leaf": _lib(lib, "libleaf.so", LEAF), "other_leaf": _lib(d / "other", "libleaf.so",
                                                                        LEAF),
           "first_leaf": _lib(d / "first", "libleaf.so", LEAF),
           "leaf2": _lib(d / "lib2", "libleaf2.so", LEAF.replace("leaf", "leaf2"))}
    out["mid"] = _lib(lib, "libmid.so", USE.format(fn="leaf", name="mid"), f"-L{lib}",
                      "-lleaf", "-Wl,--enable-new-dtags,-rpath,$ORIGIN")
    out["mid2"] = _lib(lib, "libmid2.so", USE.format(fn="leaf2", name="mid2"),
                       f"-L{d / 'lib2'}", "-lleaf2")
    libs = (f"-L{lib}", "-lmid", "-lmid2")
    out["prog_rpath"] = _prog(bin_, "prog_rpath", "mid", *libs, "-Wl,--disable-new-dtags,"
                              "-rpath,$ORIGIN/../lib:${ORIGIN}/../lib2")
    out["prog_runpath"] = _prog(bin_, "prog_runpath", "mid", *libs, "-Wl,--enable-new-dtags,"
                                "-rpath,$ORIGIN/../lib:${ORIGIN}/../lib2")
    out["prog_plain"] = _prog(bin_, "prog_plain", "leaf", f"-L{lib}", "-lleaf")
    first = f"{d}/first:"
    out["prog_both"] = _prog(bin_, "prog_both", "leaf", f"-L{lib}", "-lleaf",
                             f"-Wl,--disable-new-dtags,-rpath,{first}{lib}")
    _rpath_and_runpath(out["prog_both"], len(first))
    _cycle(d / "cycle", out)
    _missing(d / "miss", out)
    _wrong(d, out)
    out["prog_nodeflib"] = _prog(bin_, "prog_nodeflib", "leaf", f"-L{lib}", "-lleaf",
                                 "-Wl,-z,nodefaultlib")
    (lib / "ns.c").write_text(LEAF.replace("leaf", "ns"))
    _gcc(d, "-fPIC", "-shared", "-o", "lib/libns.so", "lib/ns.c")
    out["prog_slash"] = _prog(bin_, "prog_slash", "ns", "../lib/libns.so")
    _rename_needed(out["prog_slash"], "../lib/libns.so", "./lib/libns.so")
    out["prog_abs"] = _prog(bin_, "prog_abs", "ns", str(lib / "libns.so"))
    out["prog_dst"] = _prog(bin_, "prog_dst", "leaf", f"-L{lib}", "-lleaf",
                            f"-L{d / 'lib2'}", "-lleaf2", "-Wl,--disable-new-dtags,-rpath,"
                            "$ORIGIN/../dst/$LIB:${ORIGIN}/../dst/${PLATFORM}")
    for sub, name in (("dst/lib/x86_64-linux-gnu", "leaf"), ("dst/x86_64", "leaf2")):
        (d / sub).mkdir(parents=True)
        shutil.copy(out[name], d / sub)
    for sub in ("hw", "hw/glibc-hwcaps/x86-64-v2", "legacy", "legacy/x86_64"):
        (d / sub).mkdir(parents=True)
        shutil.copy(out["leaf"], d / sub / "libleaf.so")
    return out


def _rename_needed(prog: Path, old: str, new: str) -> None:
    """Rewrite a DT_NEEDED string in place (``new`` no longer than ``old``)."""
    data = prog.read_bytes()
    assert len(new) <= len(old) and data.count(old.encode() + b"\0") == 1
    prog.write_bytes(data.replace(old.encode() + b"\0",
                                  new.encode() + bytes(len(old) - len(new) + 1)))


def _cycle(where: Path, out: dict[str, Path]) -> None:
    """libcyca.so and libcycb.so, each needing the other (b first built against a stub a)."""
    _lib(where, "libcyca.so", LEAF.replace("leaf", "cyca"))
    out["cycb"] = _lib(where, "libcycb.so", USE.format(fn="cyca", name="cycb"), f"-L{where}",
                       "-lcyca", "-Wl,--enable-new-dtags,-rpath,$ORIGIN")
    out["cyca"] = _lib(where, "libcyca.so", LEAF.replace("leaf", "cyca"), f"-L{where}",
                       "-lcycb", "-Wl,--enable-new-dtags,-rpath,$ORIGIN")


def _missing(where: Path, out: dict[str, Path]) -> None:
    """libmiss.so needs libnothere.so and libmiss2.so, which needs libnothere.so too."""
    _lib(where, "libnothere.so", LEAF.replace("leaf", "nothere"))
    out["miss2"] = _lib(where, "libmiss2.so", USE.format(fn="nothere", name="miss2"),
                        f"-L{where}", "-lnothere")
    out["miss"] = _lib(where, "libmiss.so", USE.format(fn="miss2", name="miss"), f"-L{where}",
                       "-lnothere", "-lmiss2", "-Wl,--enable-new-dtags,-rpath,$ORIGIN")
    (where / "libnothere.so").unlink()


def _wrong(d: Path, out: dict[str, Path]) -> None:
    """libleaf.so copies glibc must skip (another machine, another class) or stop at (text)."""
    for sub, offset, fmt, value in (("wrong64", 18, "<H", 183), ("wrong32", 4, "B", 1)):
        (d / sub).mkdir()
        out[sub] = Path(shutil.copy(out["leaf"], d / sub / "libleaf.so"))
        _patch(out[sub], offset, fmt, value)
    (d / "notelf").mkdir()
    out["notelf"] = d / "notelf" / "libleaf.so"
    out["notelf"].write_text("not an ELF file\n")


@pytest.fixture(scope="session", name="tree")
def tree_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture tree, built once per session."""
    return build_tree(tmp_path_factory.mktemp("search_tree"))


ADDRESS = re.compile(r"\(0x[0-9a-f]+\)")


def masked(lines: list[str]) -> list[str]:
    """ldd lines with every ``(0x...)`` address replaced by ``(0x)``."""
    return [ADDRESS.sub("(0x)", line) for line in lines]


def real_ldd(path: str | Path, library_path: str | None = None,
             preload: str | None = None) -> list[str]:
    """This machine's ``ldd PATH`` (with LD_LIBRARY_PATH/LD_PRELOAD as given), masked."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    env.update({k: v for k, v in (("LD_LIBRARY_PATH", library_path), ("LD_PRELOAD", preload))
                if v is not None})
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env,
                          timeout=60)
    return masked(done.stdout.splitlines())
