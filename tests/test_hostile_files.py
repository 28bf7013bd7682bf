"""Hostile files: what ``load`` is given may be no regular file at all (a FIFO, a
directory, a device), or a file that changes under the load. Each gives an ElfError naming
the path (FileNotFoundError for a missing one), never a hang, a raw OSError or a SIGBUS,
and leaves nothing mapped.

Loads that could hang or die run in a forked child under ``run_isolated``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from loader_support import sim_factory

from loader import load
from loader.elf import READ_WINDOW, FileBytes
from loader.errors import ElfFileError
from loader.explain import Step
from loader.isolate import run_isolated
from loader.libc import LibcMmap, read_maps
from loader.symbols import StubResolver
from vmsim.fuzz.elfwriter import ElfSpec, Reloc, Segment, Symbol, build

HOST_BASE = 0x3E0000000000


def _image(rel: bool = False) -> bytes:
    """A small object: a writable segment from the file with a RELATIVE word and an
    import's GLOB_DAT slot (so the resolver runs during relocation)."""
    spec = ElfSpec(segments=(Segment("rw", data=bytes(64)),),
                   symbols=(Symbol("imported"), Symbol("x", segment=0, offset=0)),
                   relocs=(Reloc("RELATIVE", segment=0, offset=8, target=(0, 0)),
                           Reloc("GLOB_DAT", segment=0, offset=16, symbol="imported")),
                   rel_format="rel" if rel else "rela")
    return build(spec).data


def _sim_error(path: Path, **kwargs: Any) -> tuple[str, str, list[str]]:
    """Load ``path`` on a fresh simulator in a child: (error type, message, maps left)."""
    def child() -> tuple[str, str, list[str]]:
        space = sim_factory()()
        try:
            load(path, space, **kwargs)
        except Exception as exc:  # the error is the result
            return type(exc).__name__, str(exc), [str(r) for r in space.maps()]
        return "loaded", "", []
    done = run_isolated(child, timeout=10, max_rss=512 << 20)
    assert done.status == "ok", done
    result: tuple[str, str, list[str]] = done.value
    return result


def _host_error(path: Path, **kwargs: Any) -> tuple[str, str, list[str]]:
    """Load ``path`` on the host at HOST_BASE in a child: (error type, message, regions
    left in the GiB from HOST_BASE or mapping the file)."""
    def child() -> tuple[str, str, list[str]]:
        try:
            load(path, LibcMmap(), base=HOST_BASE, **kwargs)
        except Exception as exc:  # the error is the result
            left = [str(r) for r in read_maps()
                    if (r.start < HOST_BASE + (1 << 30) and r.end > HOST_BASE)
                    or r.path == str(path)]
            return type(exc).__name__, str(exc), left
        return "loaded", "", []
    done = run_isolated(child, timeout=10, max_rss=512 << 20)
    assert done.status == "ok", done
    result: tuple[str, str, list[str]] = done.value
    return result


# ---------------------------------------------------------------------------------------------
# Not a regular file


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    """A FIFO with no writer blocked ``load`` forever in open(2): it is refused from its
    stat, before any open, naming the path and what it is."""
    fifo = tmp_path / "lib.so"
    os.mkfifo(fifo)
    kind, message, left = _sim_error(fifo)
    assert kind == "ElfFileError" and str(fifo) in message and "a FIFO" in message
    assert left == []


def test_a_symlink_to_a_fifo_is_refused_too(tmp_path: Path) -> None:
    """stat follows the link: what matters is what would be opened."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "lib.so"
    link.symlink_to(fifo)
    kind, message, _ = _sim_error(link)
    assert kind == "ElfFileError" and "a FIFO" in message


def test_a_directory_is_an_elf_error_not_a_raw_oserror(tmp_path: Path) -> None:
    """A directory gave IsADirectoryError from deep inside; now an ElfFileError naming it."""
    kind, message, left = _sim_error(tmp_path)
    assert kind == "ElfFileError" and str(tmp_path) in message and "a directory" in message
    assert left == []


def test_a_character_device_is_refused() -> None:
    """/dev/null (a character device) is not read as an empty ELF file."""
    kind, message, _ = _sim_error(Path("/dev/null"))
    assert kind == "ElfFileError" and "/dev/null" in message and "character device" in message
    kind, message, left = _host_error(Path("/dev/null"))
    assert kind == "ElfFileError" and left == []


def test_a_missing_file_stays_file_not_found(tmp_path: Path) -> None:
    """A path that does not exist: FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match=r"nothing\.so"):
        load(tmp_path / "nothing.so", sim_factory()())


# ---------------------------------------------------------------------------------------------
# A file that changes during the load


def _truncate_at(phase: str, path: Path) -> Any:
    """An explain hook that truncates ``path`` to nothing at the first step of ``phase``."""
    def hook(step: Step) -> None:
        if step.phase == phase and path.stat().st_size:
            os.truncate(path, 0)
    return hook


@pytest.mark.parametrize("rel", [False, True])
def test_truncation_after_parsing_cannot_sigbus_the_parser(tmp_path: Path, rel: bool) -> None:
    """The file was parsed through numpy views over its mmap: truncated after the header
    was read, the next table read killed Python with SIGBUS. The bytes are read once now;
    the change is noticed after mapping (ElfFileError naming the file), all unmapped."""
    path = tmp_path / "lib.so"
    path.write_bytes(_image(rel))
    kind, message, left = _sim_error(path, explain=_truncate_at("parse", path))
    assert kind == "ElfFileError" and str(path) in message and "truncated" in message
    assert left == []


def test_truncation_during_relocation_is_a_clean_error_on_the_simulator(tmp_path: Path
                                                                        ) -> None:
    """Truncated after the post-mapping check (here: by a resolver hook, mid-relocation),
    the simulator raises SIGBUS (a Fault) for the vanished file page. The loader unmaps
    everything and, seeing the file changed, turns it into an ElfFileError from the Fault:
    bad input, not a loader bug."""
    path = tmp_path / "lib.so"
    path.write_bytes(_image())

    def hook(name: str, version: str | None) -> int | None:
        os.truncate(path, 0)
        return None

    def child() -> tuple[str, str, str, list[str]]:
        space = sim_factory()()
        try:
            load(path, space, resolver=StubResolver(pre_find=[hook]))
        except Exception as exc:  # the error is the result
            cause = type(exc.__cause__).__name__ + ": " + str(exc.__cause__)
            return type(exc).__name__, str(exc), cause, [str(r) for r in space.maps()]
        return "loaded", "", "", []
    done = run_isolated(child, timeout=10, max_rss=512 << 20)
    assert done.status == "ok", done
    kind, message, cause, left = done.value
    assert kind == "ElfFileError" and str(path) in message
    assert cause.startswith("Fault: SIGBUS")
    assert left == []


@pytest.mark.parametrize("backend", ["sim", "host"])
def test_a_file_that_grows_after_reading_is_noticed_after_mapping(tmp_path: Path,
                                                                  backend: str) -> None:
    """The fstat re-check after mapping: bytes appended while segments were being mapped
    (no page vanishes, so even the host survives) make an ElfFileError, all unmapped."""
    path = tmp_path / "lib.so"
    path.write_bytes(_image())

    def grow(step: Step) -> None:
        if step.phase == "map" and path.stat().st_size == len(_image()):
            with path.open("ab") as f:
                f.write(b"\0" * 4096)
    run = _sim_error if backend == "sim" else _host_error
    kind, message, left = run(path, explain=grow)
    assert kind == "ElfFileError" and str(path) in message and left == []


def test_a_file_that_shrinks_or_grows_while_being_read(tmp_path: Path) -> None:
    """The read itself: fewer bytes than fstat said is an ElfFileError naming the file and
    the size. (The parser reads only where it looks: a file that grows is noticed by the
    size and mtime checks, as below.)"""
    path = tmp_path / "lib.so"
    path.write_bytes(b"\x7fELF" + bytes(100))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert bytes(FileBytes(fd, 104, str(path)).read(0, 104)) == b"\x7fELF" + bytes(100)
        with pytest.raises(ElfFileError, match="shrank") as err:
            FileBytes(fd, 200, str(path)).read(150, 8)
        assert str(path) in str(err.value)
    finally:
        os.close(fd)


LIBZ = Path("/usr/lib/x86_64-linux-gnu/libz.so.1")


def _change(path: Path, change: str) -> None:
    """Append a page, truncate to one window, or overwrite all after it with 0xff (the
    mtime set a second on, so the change is seen however coarse the clock)."""
    size = path.stat().st_size
    if change == "grow":
        with path.open("ab") as f:
            f.write(b"\0" * 4096)
    elif change == "truncate":
        os.truncate(path, READ_WINDOW)
    else:
        with path.open("r+b") as f:
            f.seek(READ_WINDOW)
            f.write(b"\xff" * (size - READ_WINDOW))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("change", ["grow", "truncate", "rewrite"])
def test_a_file_that_changes_while_being_parsed(tmp_path: Path, change: str) -> None:
    """libz, changed after its headers were read and before its tables were (the parser
    reads the file as it goes): an ElfFileError naming the file, whether the parser met
    the change (a short read; garbage tables) or the checks after it did; nothing mapped."""
    path = tmp_path / "libz.so"
    path.write_bytes(LIBZ.read_bytes())
    assert path.stat().st_size > 2 * READ_WINDOW
    original = FileBytes.read

    def read(self: FileBytes, offset: int, length: int) -> memoryview:
        if any(self.filled) and path.stat().st_size == LIBZ.stat().st_size:
            _change(path, change)
        return original(self, offset, length)

    def child() -> tuple[str, str, list[str]]:
        FileBytes.read = read  # type: ignore[method-assign]
        return _sim_error_here(path)
    done = run_isolated(child, timeout=10, max_rss=512 << 20)
    assert done.status == "ok", done
    kind, message, left = done.value
    assert kind == "ElfFileError" and str(path) in message and left == []


def _sim_error_here(path: Path) -> tuple[str, str, list[str]]:
    """Load ``path`` on a fresh simulator in this process: (error type, message, maps)."""
    space = sim_factory()()
    try:
        load(path, space)
    except Exception as exc:  # the error is the result
        return type(exc).__name__, str(exc), [str(r) for r in space.maps()]
    return "loaded", "", []


def test_the_bytes_read_are_a_private_copy(tmp_path: Path) -> None:
    """Parsing holds the file's bytes, not a view of the file: rewriting the file after a
    load changes nothing the loaded object parsed (its image data)."""
    path = tmp_path / "lib.so"
    data = _image()
    path.write_bytes(data)
    space = sim_factory()()
    obj = load(path, space)
    path.write_bytes(bytes(len(data)))
    assert bytes(obj.image.read(0, 4)) == b"\x7fELF"
    obj.unload()
    assert space.maps() == []
