"""ParsedFile: the search's parse of an object, reused by the map only for the same file.

``loader.search.read_object`` keeps the image it parsed (``ObjectInfo.parsed``);
``loader.pipeline.map_object`` reuses it when the file it opens has the same identity
(device, inode, size, mtime) and parses afresh otherwise: a file replaced between the search
and the map is mapped as it is now, never through the old headers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loader.elf import ParsedFile
from loader.pipeline import LoadedObject, map_object
from loader.search import read_object
from loader.trace import TracingMmap
from vmsim import AddressSpace

LIBZ = "/usr/lib/x86_64-linux-gnu/libz.so.1"
LIBM = "/usr/lib/x86_64-linux-gnu/libm.so.6"


def _mapped(path: Path, parsed: ParsedFile | None) -> LoadedObject:
    """The object ``map_object`` maps from ``path`` onto a fresh simulator, file closed."""
    obj = map_object(str(path), TracingMmap(AddressSpace()), parsed=parsed)
    obj.close_file()
    return obj


def test_the_same_file_reuses_the_search_image(tmp_path: Path) -> None:
    """Mapping the file the search read takes its image (no second parse) and reads the
    tables through it exactly as a fresh parse does."""
    lib = tmp_path / "libz.so.1"
    shutil.copyfile(LIBZ, lib)
    info = read_object(str(lib))
    assert info is not None and info.parsed is not None
    reused = _mapped(lib, info.parsed)
    fresh = _mapped(lib, None)
    assert reused.image is info.parsed.image
    assert fresh.image is not info.parsed.image
    assert reused.image.loads == fresh.image.loads
    assert reused.tables.tags == fresh.tables.tags
    assert reused.plan == fresh.plan


def test_a_file_replaced_after_the_search_is_parsed_again(tmp_path: Path) -> None:
    """Another file at the path (a new inode) is parsed afresh: the map shows its headers,
    not the searched ones."""
    lib = tmp_path / "libx.so"
    shutil.copyfile(LIBZ, lib)
    info = read_object(str(lib))
    assert info is not None and info.parsed is not None
    os.unlink(lib)
    shutil.copyfile(LIBM, lib)
    obj = _mapped(lib, info.parsed)
    assert obj.image is not info.parsed.image
    assert obj.name == "libm.so.6"


def test_a_file_rewritten_in_place_is_parsed_again(tmp_path: Path) -> None:
    """The same inode with other contents (size and mtime changed) is parsed afresh."""
    lib = tmp_path / "libx.so"
    shutil.copyfile(LIBZ, lib)
    info = read_object(str(lib))
    assert info is not None and info.parsed is not None
    with open(lib, "r+b") as out, open(LIBM, "rb") as src:
        out.truncate(0)
        out.write(src.read())
    obj = _mapped(lib, info.parsed)
    assert obj.image is not info.parsed.image
    assert obj.name == "libm.so.6"


def test_image_for_wants_the_same_file_and_page_size(tmp_path: Path) -> None:
    """``image_for`` hands the image over (reading from the new fd) only for the file it
    was parsed from and the page size it was parsed at."""
    lib = tmp_path / "libz.so.1"
    shutil.copyfile(LIBZ, lib)
    other = tmp_path / "libm.so.6"
    shutil.copyfile(LIBM, other)
    info = read_object(str(lib))
    assert info is not None and info.parsed is not None
    parsed = info.parsed
    for path, page_size, want in ((other, parsed.image.page_size, False),
                                  (lib, 4 * parsed.image.page_size, False),
                                  (lib, parsed.image.page_size, True)):
        fd = os.open(path, os.O_RDONLY)
        try:
            got = parsed.image_for(fd, os.fstat(fd), str(path), page_size)
            assert (got is parsed.image) is want
            assert got is None or bytes(got.data.read(0, 4)) == b"\x7fELF"
        finally:
            os.close(fd)
