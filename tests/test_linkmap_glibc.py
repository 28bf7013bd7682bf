"""A process image on the simulator equals glibc's, word for word.

glibc's side (tests/glibc_oracle.py): the same dlopen (or exec with preloads) in a fresh C
process, its writable segments read back. Ours: ``LinkMap`` on a ``vmsim.AddressSpace``. Every
symbol relocation word (64, GLOB_DAT, JUMP_SLOT) of every object both images hold is
normalised to (object, offset from its load bias) on each side and compared:

- a word our image binds for good must equal glibc's exactly;
- a word bound to an IFUNC stays pending on the simulator (the resolver cannot run there):
  it holds the resolver, and glibc's choice must lie in the same object, except for the
  resolvers that choose the vDSO (libc's time and gettimeofday): the simulator has no vDSO.

Objects, their order and the init order are compared too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vmsim
from loader.elfdefs import DT, R_X86_64
from loader.linkmap import LinkMap
from loader.pipeline import LoadedObject
from tests.glibc_oracle import (
    VDSO_NAME,
    GlibcImage,
    Span,
    attribute,
    exec_dumper,
    glibc_dlopen_image,
    glibc_exec_image,
    glibc_init_fini,
    init_order_fixture,
    malloc_fixture,
    objects_in_order,
)

LIBRARIES = ["libssl.so.3", "libpython3.11.so.1.0", "libxml2.so.2", "libstdc++.so.6"]
SYMBOLIC = ("R_X86_64_64", "R_X86_64_GLOB_DAT", "R_X86_64_JUMP_SLOT")
VDSO_CHOOSERS = {"time", "gettimeofday"}


def _key(obj: LoadedObject) -> str:
    """The oracle's key of one of our objects: its soname, else its path."""
    return obj.name if DT.SONAME in obj.tables.tags else obj.path


def _spans(lm: LinkMap) -> list[Span]:
    """Our objects' spans as the oracle measures them (lowest to highest PT_LOAD byte)."""
    out = []
    for obj in lm.objects:
        lo = min(s.p_vaddr for s in obj.image.loads)
        hi = max(s.p_vaddr + s.p_memsz for s in obj.image.loads)
        out.append(Span(_key(obj), obj.load_bias, obj.load_bias + lo, obj.load_bias + hi))
    return out


def _our_words(lm: LinkMap) -> dict[str, dict[int, tuple[tuple[str | None, int], bool, str]]]:
    """key -> r_offset -> (normalised word, pending, symbol), for the symbolic types."""
    spans = _spans(lm)
    names = {obj.name: _key(obj) for obj in lm.objects}
    rows = [b for b in lm.bindings() if b.type in SYMBOLIC]
    norm = attribute(np.array([b.value for b in rows], dtype=np.uint64), spans)
    out: dict[str, dict[int, tuple[tuple[str | None, int], bool, str]]] = {}
    for b, word in zip(rows, norm, strict=True):
        out.setdefault(names[b.object], {})[b.r_offset] = (word, b.pending, b.symbol)
    return out


def _compare(lm: LinkMap, glibc: GlibcImage, keys: list[str]) -> int:
    """Assert every word of ``keys`` equals glibc's (module docstring); the count compared."""
    ours = _our_words(lm)
    compared = 0
    for key in keys:
        theirs = glibc.words(key)
        mine = ours.get(key, {})
        assert set(mine) == set(theirs), key
        for off, (word, pending, symbol) in mine.items():
            want = theirs[off]
            if pending:
                same = want[0] == word[0] or (want[0] == VDSO_NAME and symbol in
                                              VDSO_CHOOSERS and word[0] == "libc.so.6")
                assert same, (key, hex(off), symbol, word, want)
            else:
                assert word == want, (key, hex(off), symbol, word, want)
            compared += 1
    return compared


def _glibc_keys(glibc: GlibcImage, main: str | None = None) -> list[str]:
    """glibc's objects in link-map order, without the vDSO and the dlopen driver."""
    return [o.key for o in glibc.objects
            if o.key != VDSO_NAME and (main is not None or o.name != glibc.objects[0].name)]


@pytest.mark.parametrize("library", LIBRARIES)
def test_dlopen_equals_glibc_word_for_word(library: str) -> None:
    glibc = glibc_dlopen_image(library, bind="now")
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(library, bind="now")
    keys = _glibc_keys(glibc)
    assert [_key(o) for o in lm.objects] == keys
    assert _compare(lm, glibc, keys) == sum(len(glibc.words(k)) for k in keys)
    lm.unload()


def test_lazy_dlopen_keeps_plt_addresses_as_glibc(tmp_path: Path) -> None:
    """RTLD_LAZY: libz's JUMP_SLOTs hold their PLT addresses (plus bias) on both sides."""
    glibc = glibc_dlopen_image("libz.so.1", bind="lazy")
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen("libz.so.1", bind="lazy")
    lazy = [b for b in lm.bindings() if b.object == "libz.so.1" and b.pending]
    assert lazy and all(b.type == "R_X86_64_JUMP_SLOT" for b in lazy)
    assert _compare(lm, glibc, ["libz.so.1"]) == len(glibc.words("libz.so.1"))


@pytest.mark.parametrize("variant", ["pie", "nopie"])
def test_exec_with_a_malloc_preload_equals_glibc(tmp_path: Path, variant: str) -> None:
    """A gcc program run with a preload that interposes malloc: every object's words equal
    glibc's (the COPY of stdout in the program included), malloc bound to the preload."""
    fixture = malloc_fixture(tmp_path)
    preload = (str(fixture["malloc_preload"]), str(exec_dumper()))
    glibc = glibc_exec_image(fixture[variant], preload=preload[:1])
    lm = LinkMap(vmsim.AddressSpace(), preload=preload)
    lm.exec(str(fixture[variant]), bind="now")
    keys = _glibc_keys(glibc, main=str(fixture[variant]))
    assert [_key(o) for o in lm.objects] == keys
    _compare(lm, glibc, keys)
    libc_malloc = [b for b in lm.bindings() if b.object == "libc.so.6" and b.symbol == "malloc"]
    assert libc_malloc and {b.target for b in libc_malloc} == {"libmalloc_preload.so"}


def test_init_and_fini_order_equal_glibc(tmp_path: Path) -> None:
    fixture = init_order_fixture(tmp_path)
    inits, finis = glibc_init_fini(fixture["top"], mode="dlopen")
    lm = LinkMap(vmsim.AddressSpace())
    h = lm.dlopen(str(fixture["top"]))
    lm.dlclose(h)
    fixture_names = {Path(p).name for p in fixture.values()}
    ours_init = [n for n in lm.init_order if n in fixture_names]
    ours_fini = [n for n in lm.fini_order if n in fixture_names]
    assert ours_init == [Path(str(fixture[x])).name for x in objects_in_order(inits)]
    assert ours_fini == [Path(str(fixture[x])).name for x in objects_in_order(finis)]


TLS_TYPES = {int(R_X86_64.DTPMOD64): "module", int(R_X86_64.TPOFF64): "offset",
             int(R_X86_64.DTPOFF64): "offset"}


def _tls_words(lm: LinkMap, glibc: GlibcImage, key: str) -> tuple[list[object], list[object]]:
    """Every DTPMOD64 / DTPOFF64 / TPOFF64 word of ``key`` on both sides: module ids as the
    key of the module they name, offsets as they are."""
    obj = next(o for o in lm.objects if _key(o) == key)
    theirs = glibc.object(key)
    offs, kinds = [], []
    for table in obj.tables.relocs:
        for off, typ in zip(table.r_offset.tolist(), table.r_type.tolist(), strict=True):
            if typ in TLS_TYPES:
                offs.append(off)
                kinds.append(TLS_TYPES[typ])
    ours = [int.from_bytes(obj.mm.read(off + obj.load_bias, 8), "little") for off in offs]
    glibc_words = theirs.words_at(np.array(offs, dtype=np.uint64)).tolist()
    our_ids = {int(row["module_id"]): str(row["name"]) for row in lm.tls}
    glibc_ids = {o.tls_modid: o.key for o in glibc.objects if o.tls_modid}

    def named(words: list[int], ids: dict[int, str]) -> list[object]:
        return [ids.get(w, w) if kind == "module" else w
                for w, kind in zip(words, kinds, strict=True)]

    return named(ours, our_ids), named(glibc_words, glibc_ids)


@pytest.mark.parametrize(("library", "key"), [("libstdc++.so.6", "libstdc++.so.6"),
                                              ("libz.so.1", "libc.so.6")])
def test_tls_words_equal_glibc(library: str, key: str) -> None:
    """DTPMOD64 names the same module, DTPOFF64 and TPOFF64 (libc's initial-exec TLS,
    against the static layout of a program linked against libc only) are the same words."""
    glibc = glibc_dlopen_image(library, bind="now")
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(library)
    ours, theirs = _tls_words(lm, glibc, key)
    assert ours and ours == theirs


def _machine_libraries() -> list[str]:
    """Every regular shared library file of /usr/lib/x86_64-linux-gnu (no symlinks), but
    ld.so itself: glibc's dlopen of it by its file name maps a second copy (its own map has
    no file identity to match), which a process image does not model."""
    import glob
    import os

    return sorted(p for p in glob.glob("/usr/lib/x86_64-linux-gnu/*.so.*")
                  if not os.path.islink(p) and "ld-linux" not in p)


def _written_by_init(lm: LinkMap, word: tuple[str | None, int], symbol: str) -> bool:
    """glibc's word names an object that does not define ``symbol`` there, or points
    outside every object (into the heap): an init function wrote it after relocation
    (libgnutls sets libgmp's allocation hooks, libapt-private libc's ``stderr``)."""
    target, offset = word
    obj = next((o for o in lm.objects if _key(o) == target), None)
    if obj is None:
        return target is None and offset != 0
    try:
        return obj.symbol(symbol) - obj.load_bias != offset
    except KeyError:
        return True


def _compare_but_init(lm: LinkMap, glibc: GlibcImage, library: str) -> tuple[int, int]:
    """``_compare`` for every object, except words an init function rewrote in glibc's
    process (``_written_by_init``): (words compared, words left out)."""
    keys = _glibc_keys(glibc)
    assert [_key(o) for o in lm.objects] == keys, library
    compared = written = 0
    ours = _our_words(lm)
    for key in keys:
        theirs = glibc.words(key)
        for off, (word, pending, symbol) in ours.get(key, {}).items():
            want = theirs[off]
            if word != want and not pending and _written_by_init(lm, want, symbol):
                written += 1
                continue
            if not pending:
                assert word == want, (library, key, hex(off), symbol, word, want)
            compared += 1
    return compared, written


@pytest.mark.slow
def test_every_library_of_the_machine_equals_glibc() -> None:
    """The word-for-word comparison over every library glibc can dlopen here (words an init
    function rewrote in glibc's process are counted apart: nothing runs on the simulator)."""
    compared = written = 0
    for library in _machine_libraries():
        try:
            glibc = glibc_dlopen_image(library, bind="now")
        except Exception:       # glibc refuses it too (e.g. a library that needs a program)
            continue
        lm = LinkMap(vmsim.AddressSpace())
        lm.dlopen(library, bind="now")
        done, left = _compare_but_init(lm, glibc, library)
        compared, written = compared + done, written + left
        lm.unload()
    assert compared > 100_000 and written < compared // 1000


def test_gnu_unique_symbols_bind_as_glibc() -> None:
    """libapt-private and libapt-pkg both define C++ template statics (STB_GNU_UNIQUE):
    glibc's process-wide table binds libapt-private's references to the definition bound
    first, which its scope alone would not give."""
    library = "/usr/lib/x86_64-linux-gnu/libapt-private.so.0.0"
    glibc = glibc_dlopen_image(library, bind="now")
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(library)
    compared, written = _compare_but_init(lm, glibc, library)
    assert compared > 5_000 and written < 10
    unique = [b for b in lm.bindings() if b.object == "libapt-private.so.0.0"
              and "__to_chars_10_impl" in b.symbol]
    assert unique and {b.target for b in unique} == {"libapt-pkg.so.6.0"}


UNIQUE_SOURCE = """
inline int &counter() { static int c = 0; return c; }
extern "C" int bump_%s() { return ++counter(); }
"""


def test_gnu_unique_in_two_libraries_binds_as_glibc(tmp_path: Path) -> None:
    """A C++ inline function's static (STB_GNU_UNIQUE) defined in two libraries of one
    closure: both references bind to the first definition met (the root's), as in
    glibc's process."""
    import subprocess

    link_b = ["-L.", "-Wl,--no-as-needed", "-luniqb", "-Wl,-rpath,$ORIGIN"]
    for name, needs in (("b", []), ("a", link_b)):
        (tmp_path / f"{name}.cpp").write_text(UNIQUE_SOURCE % name)
        subprocess.run(["g++", "-O1", "-fPIC", "-shared", "-o", f"libuniq{name}.so",
                        f"{name}.cpp", *needs], cwd=tmp_path, check=True)
    root = str(tmp_path / "libuniqa.so")
    glibc = glibc_dlopen_image(root, bind="now")
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(root)
    unique = [b for b in lm.bindings() if b.symbol == "_ZZ7countervE1c"]
    assert {b.target for b in unique} == {"libuniqa.so"} and len(unique) == 2
    keys = _glibc_keys(glibc)
    assert _compare(lm, glibc, keys) == sum(len(glibc.words(k)) for k in keys)
