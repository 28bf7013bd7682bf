"""Hostile dynamic sections met by ``loader.search`` (issue 9's rule: every count and size read
from a file is bounded before anything is allocated or walked): string offsets past
DT_STRSZ, 100,000 DT_NEEDED entries (missing, repeated, all naming one long string), a
PT_INTERP past the file. Each runs in the supervisor (``run_isolated``) and must end as an
ElfError kind naming the field, or as a closure of the expected size, within its bounds.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import vmsim.fuzz.elfwriter as ew
from loader.errors import ElfDependencyError, ElfDynamicError, ElfError
from loader.isolate import run_isolated
from loader.search import closure, read_object
from loader.tables import DT

MANY = 100_000
TEXT = ew.Segment("rx", data=b"\xc3" * 64)


def _build(**spec: Any) -> tuple[bytearray, npt.NDArray[Any]]:
    """An elfwriter shared object (``spec`` knobs): its bytes and a writable view of its
    dynamic section (d_tag, d_val rows) over them."""
    image = ew.build(ew.ElfSpec(segments=(TEXT,), **spec))
    data = bytearray(image.data)
    dyn = image.tables["dynamic"]
    rows = np.frombuffer(data, ew.DYN, count=dyn.size // ew.DYN.itemsize, offset=dyn.offset)
    return data, rows


def _save(tmp_path: Path, data: bytearray) -> str:
    """Write ``data`` as tmp_path/libhostile.so; its path."""
    path = tmp_path / "libhostile.so"
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("tag", [DT.NEEDED, DT.SONAME, DT.RUNPATH, DT.RPATH])
def test_a_string_offset_past_the_table_is_refused(tmp_path: Path, tag: int) -> None:
    data, rows = _build(needed=("libc.so.6",))
    strsz = int(rows["d_val"][rows["d_tag"] == DT.STRSZ][0])
    victim = DT.NEEDED if tag == DT.NEEDED else DT.SONAME
    at = np.flatnonzero(rows["d_tag"] == victim)[0]
    rows[at] = (tag, strsz + 0x1000_0000)
    with pytest.raises(ElfDynamicError) as caught:
        run_isolated(read_object, _save(tmp_path, data), timeout=10.0, max_rss=256 << 20)
    assert caught.value.field == "DT_NEEDED/SONAME/RPATH"
    assert caught.value.value == strsz + 0x1000_0000


def test_100000_missing_needed_stay_within_bounds(tmp_path: Path) -> None:
    data, _ = _build(needed=tuple(f"libmissing{i}.so" for i in range(MANY)))
    path = _save(tmp_path, data)
    with pytest.raises(ElfDependencyError) as caught:
        run_isolated(closure, path, timeout=30.0, max_rss=512 << 20)
    assert caught.value.value == "libmissing0.so"
    found = run_isolated(_count, path, timeout=60.0, max_rss=512 << 20).value
    assert found == MANY + 1


def _count(path: str) -> int:
    """How many entries the closure of ``path`` has, missing ones reported."""
    return len(closure(path, missing="report"))


def _names(path: str) -> list[str]:
    """The names of the closure of ``path``, in order."""
    return [e.name for e in closure(path)]


def test_100000_needed_of_one_name_load_it_once(tmp_path: Path) -> None:
    data, _ = _build(needed=("libz.so.1",) * MANY)
    names = run_isolated(_names, _save(tmp_path, data), timeout=30.0,
                         max_rss=512 << 20).value
    assert names[1:] == ["libz.so.1", "libc.so.6", "/lib64/ld-linux-x86-64.so.2"]


def test_100000_needed_at_one_long_string_are_refused_before_decoding(tmp_path: Path) -> None:
    """10^5 names of 64 KiB each would be 6.5 GB of strings: the byte budget refuses them."""
    long_name = "l" * (1 << 16) + ".so"
    data, rows = _build(needed=(long_name, *(f"n{i}" for i in range(MANY))))
    needed = rows["d_tag"] == DT.NEEDED
    rows["d_val"][needed] = rows["d_val"][needed][0]
    with pytest.raises(ElfDynamicError) as caught:
        run_isolated(read_object, _save(tmp_path, data), timeout=10.0, max_rss=256 << 20)
    assert caught.value.field == "DT_NEEDED/SONAME/RPATH name bytes"


def test_a_pt_interp_past_the_file_is_refused(tmp_path: Path) -> None:
    image = ew.build(ew.ElfSpec(segments=(TEXT,), interp="/lib64/ld-linux-x86-64.so.2"))
    data = bytearray(image.data)
    interp = next(i for i, p in enumerate(image.phdrs) if p["p_type"] == 3)
    struct.pack_into("<Q", data, image.phoff + 56 * interp + 32, 1 << 40)     # p_filesz
    with pytest.raises(ElfError) as caught:
        run_isolated(read_object, _save(tmp_path, data), timeout=10.0, max_rss=256 << 20)
    assert "PT_INTERP" in caught.value.field
