"""ELF identification bytes glibc refuses are refused here too, for the same reason: the OS ABI,
its ABI version, the padding of e_ident and e_version (glibc's open_verify). Judged by glibc's
own ld.so on the same bytes, not by a list of ours."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import loader
import vmsim

LIBZ = Path("/usr/lib/x86_64-linux-gnu/libz.so.1")
LD_SO = "/lib64/ld-linux-x86-64.so.2"

CASES = [  # (byte offset, new value, our field, glibc's message)
    (7, 9, "e_ident[EI_OSABI]", "ELF file OS ABI invalid"),
    (8, 1, "e_ident[EI_ABIVERSION]", "ELF file ABI version invalid"),
    (12, 1, "e_ident[EI_PAD]", "nonzero padding in e_ident"),
    (15, 0x80, "e_ident[EI_PAD]", "nonzero padding in e_ident"),
    (20, 0, "e_version", "ELF file version does not match current one"),
]


def _glibc_says(path: Path) -> str:
    """What glibc's ld.so prints listing ``path`` (it maps the file; no code of it runs)."""
    done = subprocess.run([LD_SO, "--list", str(path)], capture_output=True, text=True,
                          timeout=30)
    return done.stdout + done.stderr if done.returncode else ""


@pytest.mark.parametrize(("offset", "value", "field", "glibc"), CASES)
def test_identification_glibc_refuses_is_refused(tmp_path: Path, offset: int, value: int,
                                                 field: str, glibc: str) -> None:
    data = bytearray(LIBZ.read_bytes())
    data[offset] = value
    path = tmp_path / "libz-mutated.so"
    path.write_bytes(data)
    assert glibc in _glibc_says(path)
    space = vmsim.AddressSpace()
    with pytest.raises(loader.ElfHeaderError) as info:
        loader.load(path, space)
    assert info.value.field == field
    assert glibc in str(info.value)
    assert space.maps() == []


def test_gnu_os_abi_loads_as_glibc_loads_it(tmp_path: Path) -> None:
    data = bytearray(LIBZ.read_bytes())
    data[7] = 3  # ELFOSABI_GNU, which glibc accepts
    path = tmp_path / "libz-gnu.so"
    path.write_bytes(data)
    assert _glibc_says(path) == ""
    obj = loader.load(path, vmsim.AddressSpace())
    assert obj.symbol("crc32")
