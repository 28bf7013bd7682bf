"""The glibc oracle (tests/glibc_oracle.py) is right on its own terms.

Every symbol relocation word glibc left is explained from the files alone (pyelftools): the
address of a definition of the relocation's symbol (plus addend) in the object it normalises
to, or the choice of an IFUNC resolver, or 0 for a weak undefined symbol, or (lazy binding) the
object's own PLT. Object order agrees with ``ldd``; init order puts dependencies first.
libz, libssl and the malloc fixture run by default; libpython, libxml2, libstdc++ are slow.
"""

from __future__ import annotations

import collections
import functools
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from elftools.elf.elffile import ELFFile
from glibc_oracle import (
    INIT_LOG_VARIABLE,
    R_X86_64_JUMP_SLOT,
    VDSO_NAME,
    GlibcImage,
    OracleError,
    Span,
    attribute,
    exec_dumper,
    glibc_dlopen_image,
    glibc_exec_image,
    glibc_init_fini,
    init_order_fixture,
    malloc_fixture,
    objects_in_order,
    read_dump,
    relocation_symbols,
    symbol_relocations,
)

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
STARTUP = [VDSO_NAME, "libc.so.6", "ld-linux-x86-64.so.2"]
"""The dlopen driver's startup objects after itself, in glibc's link-map order."""


@pytest.fixture(scope="session")
def order_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The init/fini order fixture, built once per session."""
    return init_order_fixture(tmp_path_factory.mktemp("oracle_order"))


@pytest.fixture(scope="session")
def malloc_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The exec-mode fixture (programs and the malloc-interposing preload), built once."""
    return malloc_fixture(tmp_path_factory.mktemp("oracle_malloc"))


def _ifunc_owner(image: GlibcImage, name: str) -> str | None:
    """The key of the first object of ``image`` that defines ``name`` as an IFUNC, or None."""
    for obj in image.objects:
        if obj.path is not None and name in _definitions(obj.path)[1]:
            return obj.key
    return None


@functools.cache
def _definitions(path: str) -> tuple[dict[int, set[str]], set[str]]:
    """The defined dynamic symbols of ``path``: value -> names, and the names of IFUNCs."""
    at: dict[int, set[str]] = collections.defaultdict(set)
    ifuncs = set()
    with open(path, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        for symbol in dynsym.iter_symbols():
            if symbol["st_shndx"] != "SHN_UNDEF":
                at[symbol["st_value"]].add(symbol.name)
                if symbol["st_info"]["type"] in ("STT_LOOS", "STT_GNU_IFUNC"):
                    ifuncs.add(symbol.name)
    return at, ifuncs


def _explain(image: GlibcImage, key: str) -> collections.Counter[str]:
    """How each symbol relocation word of object ``key`` is explained: "definition",
    "ifunc" (an IFUNC's choice, in the object defining the IFUNC or in the vDSO), "weak-zero",
    "plt" (a lazy JUMP_SLOT still in the object itself) or "UNEXPLAINED <details>"."""
    obj = image.object(key)
    assert obj.path is not None
    words, names = image.words(obj), relocation_symbols(obj.path)
    paths = {o.key: o.path for o in image.objects}
    counts: collections.Counter[str] = collections.Counter()
    for offset, kind, _, addend in symbol_relocations(obj.path).tolist():
        (target, value), (name, _, weak_undefined) = words[offset], names[offset]
        target_path = paths.get(target) if target is not None else None
        defined_here = target_path is not None and name in _definitions(target_path)[0].get(
            value - addend, set())
        if defined_here:
            counts["definition"] += 1
        elif target is None and value == 0 and weak_undefined:
            counts["weak-zero"] += 1
        elif target is not None and target in (_ifunc_owner(image, name), VDSO_NAME):
            counts["ifunc"] += 1
        elif target == key and kind == R_X86_64_JUMP_SLOT:
            counts["plt"] += 1
        else:
            counts[f"UNEXPLAINED {name} type {kind} -> {target} {value:#x}"] += 1
    return counts


def _assert_all_explained(image: GlibcImage, *, allow_plt: bool) -> int:
    """Every word of every object with a file is explained; returns how many words."""
    total = 0
    for obj in image.objects:
        if obj.path is None:
            continue
        counts = _explain(image, obj.key)
        bad = [reason for reason in counts if reason.startswith("UNEXPLAINED")]
        assert not bad, f"{obj.key}: {bad[:5]}"
        assert allow_plt or not counts["plt"], f"{obj.key}: {counts['plt']} unbound JUMP_SLOTs"
        total += sum(counts.values())
    return total


def _ldd_names(path: Path) -> list[str]:
    """The names this machine's ldd lists for ``path``, in its order (soname, or path)."""
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True)
    return [line.split()[0].rsplit("/", 1)[-1] for line in done.stdout.splitlines()]


def test_libz_words_land_in_libc_or_libz_and_none_is_unexplained() -> None:
    image = glibc_dlopen_image("libz.so.1")
    words = image.words("libz.so.1")
    names = relocation_symbols(str(image.object("libz.so.1").path))
    assert len(words) == len(names) > 40
    for offset, (target, value) in words.items():
        if target is None:
            assert value == 0 and names[offset][2], f"{names[offset]} -> (None, {value:#x})"
        else:
            assert target in ("libc.so.6", "libz.so.1"), names[offset]
    assert _assert_all_explained(image, allow_plt=False) > 100


def test_ifunc_slots_hold_the_chosen_implementation_in_libc() -> None:
    image = glibc_dlopen_image("libz.so.1")
    libc = image.object("libc.so.6")
    at, ifuncs = _definitions(str(libc.path))
    names = relocation_symbols(str(image.object("libz.so.1").path))
    chosen = {names[offset][0]: word for offset, word in image.words("libz.so.1").items()
              if names[offset][0] in ifuncs}
    assert {"memcpy", "memset"} <= set(chosen), sorted(chosen)
    for name, (target, value) in chosen.items():
        assert target == "libc.so.6"
        assert name not in at.get(value, set()), f"{name} holds its resolver, not its choice"


def test_object_order_is_the_driver_its_startup_objects_then_ldds_order() -> None:
    image = glibc_dlopen_image(LIBDIR / "libssl.so.3")
    keys = [obj.key for obj in image.objects]
    assert keys[1:4] == STARTUP and keys[0] == image.objects[0].name
    expected = [name for name in _ldd_names(LIBDIR / "libssl.so.3") if name not in STARTUP]
    assert keys[4:] == ["libssl.so.3", *expected]
    assert [obj.at_startup for obj in image.objects] == [True] * 4 + [False] * (len(keys) - 4)
    assert image.objects[1].is_vdso and image.objects[1].path is None


def test_libssl_words_are_all_explained_and_time_is_the_vdsos() -> None:
    image = glibc_dlopen_image("libssl.so.3", scope="global")
    assert _assert_all_explained(image, allow_plt=False) > 4000
    names = relocation_symbols(str(image.object("libssl.so.3").path))
    words = image.words("libssl.so.3")
    time_slots = [words[offset] for offset, (name, _, _) in names.items() if name == "time"]
    assert time_slots and all(target == VDSO_NAME for target, _ in time_slots)


def test_lazy_dlopen_leaves_jump_slots_at_the_plt_and_agrees_elsewhere() -> None:
    now, lazy = glibc_dlopen_image("libz.so.1"), glibc_dlopen_image("libz.so.1", bind="lazy")
    path = str(now.object("libz.so.1").path)
    kinds = dict(zip(*(symbol_relocations(path)[f].tolist() for f in ("offset", "type")),
                     strict=True))
    now_words, lazy_words = now.words("libz.so.1"), lazy.words("libz.so.1")
    for offset, kind in kinds.items():
        if kind == R_X86_64_JUMP_SLOT:
            assert lazy_words[offset][0] == "libz.so.1"
        else:
            assert lazy_words[offset] == now_words[offset]
    jump_slots = sum(kind == R_X86_64_JUMP_SLOT for kind in kinds.values())
    assert _explain(lazy, "libz.so.1")["plt"] == jump_slots > 40


def test_tls_module_ids_go_to_objects_with_pt_tls() -> None:
    image = glibc_dlopen_image("libstdc++.so.6")
    ids = []
    for obj in image.objects:
        if obj.path is None:
            continue
        with open(obj.path, "rb") as f:
            has_tls = any(seg["p_type"] == "PT_TLS" for seg in ELFFile(f).iter_segments())
        assert (obj.tls_modid != 0) == has_tls, obj.key
        ids += [obj.tls_modid] if has_tls else []
    assert image.object("libc.so.6").tls_modid == 1 and len(set(ids)) == len(ids) >= 2


def test_library_path_reaches_a_library_by_soname(order_libs: dict[str, Path]) -> None:
    image = glibc_dlopen_image("liborder_a.so", library_path=[order_libs["a"].parent])
    new = [obj for obj in image.objects if not obj.at_startup]
    assert [obj.key for obj in new] == [f"liborder_{n}.so" for n in "abcd"]
    assert new[0].name == str(order_libs["a"])
    _assert_all_explained(image, allow_plt=False)


@pytest.mark.parametrize("variant", ["pie", "nopie"])
def test_exec_malloc_slots_land_in_the_preload(malloc_programs: dict[str, Path],
                                               variant: str) -> None:
    preload = malloc_programs["malloc_preload"]
    program = malloc_programs[variant]
    image = glibc_exec_image(program, preload=[preload])
    keys = [obj.key for obj in image.objects]
    assert keys == [str(program), VDSO_NAME, str(preload), str(exec_dumper()), *STARTUP[1:]]
    for key in (str(program), "libc.so.6"):
        obj = image.object(key)
        assert obj.path is not None
        names, words = relocation_symbols(obj.path), image.words(obj)
        malloc = {words[offset] for offset, (name, _, _) in names.items() if name == "malloc"}
        assert {target for target, _ in malloc} == {str(preload)}, key
    _assert_all_explained(image, allow_plt=False)


@pytest.mark.parametrize("variant", ["pie", "nopie"])
def test_exec_stdout_is_copied_into_the_program(malloc_programs: dict[str, Path],
                                                variant: str) -> None:
    program = malloc_programs[variant]
    image = glibc_exec_image(program)
    libc = image.object("libc.so.6")
    assert libc.path is not None
    names, words = relocation_symbols(libc.path), image.words(libc)
    stdout = {words[offset] for offset, (name, _, _) in names.items() if name == "stdout"}
    assert {target for target, _ in stdout} == {str(program)}
    assert (image.objects[0].bias == 0) == (variant == "nopie")


def test_init_order_puts_dependencies_first(order_libs: dict[str, Path]) -> None:
    inits, finis = glibc_init_fini(order_libs["top"])
    order = objects_in_order(inits)
    position = {name: order.index(name) for name in order}
    assert position["d"] < position["b"] < position["a"] and position["c"] < position["a"]
    assert max(position[n] for n in "aeg") < position["top"] == len(order) - 1
    assert inits.index("g:init") + 1 == inits.index("g:init_array")
    assert finis.index("g:fini_array") + 1 == finis.index("g:fini")
    assert objects_in_order(finis) == order[::-1]


def test_exec_init_order_runs_preinit_first_and_the_program_last(
        order_libs: dict[str, Path]) -> None:
    inits, finis = glibc_init_fini(order_libs["prog"], mode="exec")
    dlopen_inits, dlclose_finis = glibc_init_fini(order_libs["top"])
    assert inits == ["prog:preinit_array", *dlopen_inits, "prog:init_array"]
    assert finis == ["prog:fini_array", *dlclose_finis]


def test_the_exec_dumper_runs_after_every_library_init(order_libs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """What glibc_exec_image's docstring says: only the program's own inits have not run."""
    log = tmp_path / "init.log"
    env = dict(os.environ, LD_PRELOAD=str(exec_dumper()), LD_BIND_NOW="1",
               VMSIM_ORACLE_DUMP=str(tmp_path / "image.bin"), **{INIT_LOG_VARIABLE: str(log)})
    subprocess.run([order_libs["prog"]], env=env, check=True)
    inits, _ = glibc_init_fini(order_libs["prog"], mode="exec")
    assert log.read_text().splitlines() == inits[:-1] and inits[-1] == "prog:init_array"
    assert (tmp_path / "image.bin").stat().st_size > 0


def test_lazy_libstdcxx_slots_its_inits_called_are_bound() -> None:
    """With RTLD_LAZY, a JUMP_SLOT an init function called through is bound when glibc's side
    is read: libstdc++'s constructors call malloc and __cxa_atexit."""
    image = glibc_dlopen_image("libstdc++.so.6", bind="lazy")
    obj = image.object("libstdc++.so.6")
    assert obj.path is not None
    names, words = relocation_symbols(obj.path), image.words(obj)
    bound = {names[offset][0] for offset, (target, _) in words.items()
             if names[offset][1] == R_X86_64_JUMP_SLOT and target != obj.key}
    assert {"malloc", "__cxa_atexit"} <= bound
    assert len(bound) < 10


def test_attribute_gives_a_span_end_to_the_object_it_ends() -> None:
    spans = [Span("b", 0x2000, 0x2000, 0x3000), Span("a", 0x1000, 0x1000, 0x1800)]
    values = np.array([0, 0x1000, 0x17FF, 0x1800, 0x1900, 0x2000, 0x3000, 0x3001])
    assert attribute(values, spans) == [
        (None, 0), ("a", 0), ("a", 0x7FF), ("a", 0x800), (None, 0x1900), ("b", 0),
        ("b", 0x1000), (None, 0x3001)]
    touching = [Span("a", 0, 0x1000, 0x2000), Span("b", 0x2000, 0x2000, 0x3000)]
    assert attribute(np.array([0x2000]), touching) == [("b", 0)]
    assert attribute(np.array([5]), []) == [(None, 5)]


def test_a_truncated_or_foreign_dump_is_refused() -> None:
    with pytest.raises(OracleError, match="magic"):
        read_dump(b"ELF\0" * 4, "main")
    with pytest.raises(OracleError, match="truncated"):
        read_dump(b"VMSIMOR1" + (1).to_bytes(8, "little") + (100).to_bytes(8, "little"), "m")


def test_a_failing_dlopen_is_an_error_naming_glibcs_message() -> None:
    with pytest.raises(OracleError, match="libdoes-not-exist"):
        glibc_dlopen_image("libdoes-not-exist.so.9")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["libpython3.11.so.1.0", "libxml2.so.2", "libstdc++.so.6"])
def test_big_libraries_words_are_all_explained(name: str) -> None:
    image = glibc_dlopen_image(name)
    assert _assert_all_explained(image, allow_plt=False) > 4000
    expected = [n for n in _ldd_names(LIBDIR / name) if n not in STARTUP]
    assert [obj.key for obj in image.objects if not obj.at_startup] == [name, *expected]
