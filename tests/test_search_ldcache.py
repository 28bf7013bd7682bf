"""``loader.ldcache.LdCache`` reads /etc/ld.so.cache as glibc does: the same entries as
``ldconfig -p`` in the same order, on this machine's cache and on caches written here
(glibc-hwcaps entries included, read back by ``ldconfig -p -C``); a hostile cache is an
ElfCacheError naming the field, inside the supervisor's bounds, never a crash.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from loader.errors import ElfCacheError
from loader.isolate import run_isolated
from loader.ldcache import CACHE_FLAGS_X86_64, EXTENSION_MAGIC, HWCAP_EXTENSION, MAGIC, LdCache

LINE = re.compile(r"^\t(\S+) \(([^)]*)\) => (.*)$")
HEADER_SIZE, ENTRY_SIZE = 48, 24


def ldconfig_p(cache: str | None = None) -> list[tuple[str, str, str]]:
    """``ldconfig -p`` (``-C cache``): (name, flags text, path) per entry, in its order."""
    argv = ["ldconfig", "-p", *(["-C", cache] if cache else [])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [(m[1], m[2], m[3]) for m in map(LINE.match, out.splitlines()) if m]


def write_cache(entries: list[tuple[str, str, str | None]], generator: str = "test") -> bytes:
    """A glibc-ld.so.cache1.1 file of (name, path, glibc-hwcaps subdir or None) entries,
    with a generator section and, when a subdir is used, a glibc-hwcaps section."""
    subdirs = sorted({s for _, _, s in entries if s})
    strings, offsets = bytearray(), {}
    start = HEADER_SIZE + ENTRY_SIZE * len(entries)
    for text in [t for n, p, _ in entries for t in (n, p)] + subdirs:
        if text not in offsets:
            offsets[text] = start + len(strings)
            strings += text.encode() + b"\0"
    rows = b"".join(struct.pack("<iIIIQ", CACHE_FLAGS_X86_64, offsets[n], offsets[p], 0,
                                HWCAP_EXTENSION | subdirs.index(s) if s else 0)
                    for n, p, s in entries)
    ext = -(-(start + len(strings)) // 8) * 8
    nsec = 1 + bool(subdirs)
    body_at = ext + 8 + 16 * nsec
    gen = generator.encode()
    hw_at = -(-(body_at + len(gen)) // 4) * 4
    sections = struct.pack("<4I", 0, 0, body_at, len(gen))
    if subdirs:
        sections += struct.pack("<4I", 1, 0, hw_at, 4 * len(subdirs))
    tail = struct.pack("<II", EXTENSION_MAGIC, nsec) + sections + gen
    tail += bytes(hw_at - body_at - len(gen)) + b"".join(
        struct.pack("<I", offsets[s]) for s in subdirs)
    head = MAGIC + struct.pack("<IIB3xI12x", len(entries), len(strings), 2, ext)
    return head + rows + bytes(strings) + bytes(ext - start - len(strings)) + tail


def test_the_system_cache_equals_ldconfig_p() -> None:
    cache = LdCache.system()
    listed = ldconfig_p()
    assert len(listed) == len(cache.entries) > 100
    assert [(n, p) for n, _, p in listed] == [(e.name, e.path) for e in cache.entries]
    assert {f for _, f, _ in listed} == {"libc6,x86-64"}
    assert all(e.flags == CACHE_FLAGS_X86_64 and e.subdir is None for e in cache.entries)


def test_lookup_takes_the_first_entry_of_a_name() -> None:
    cache = LdCache.system()
    first: dict[str, str] = {}
    for name, _, path in ldconfig_p():
        first.setdefault(name, path)
    assert {name: cache.lookup(name) for name in first} == first
    assert cache.lookup("libdoesnotexist.so.7") is None


def test_a_written_cache_with_glibc_hwcaps_reads_as_ldconfig_reads_it(tmp_path: Path) -> None:
    entries = [("libfoo.so.1", "/opt/glibc-hwcaps/x86-64-v3/libfoo.so.1", "x86-64-v3"),
               ("libfoo.so.1", "/opt/glibc-hwcaps/x86-64-v2/libfoo.so.1", "x86-64-v2"),
               ("libfoo.so.1", "/opt/libfoo.so.1", None), ("libbar.so", "/opt/libbar.so", None)]
    path = tmp_path / "ld.so.cache"
    path.write_bytes(write_cache(entries))
    listed = ldconfig_p(str(path))
    assert [(n, p) for n, _, p in listed] == [(n, p) for n, p, _ in entries]
    assert [f for _, f, _ in listed][:2] == ['libc6,x86-64, hwcap: "x86-64-v3"',
                                              'libc6,x86-64, hwcap: "x86-64-v2"']
    cache = LdCache.from_file(str(path))
    assert [e.subdir for e in cache.entries] == ["x86-64-v3", "x86-64-v2", None, None]
    assert cache.lookup("libfoo.so.1", ("x86-64-v4", "x86-64-v3", "x86-64-v2")) == \
        "/opt/glibc-hwcaps/x86-64-v3/libfoo.so.1"
    assert cache.lookup("libfoo.so.1", ("x86-64-v2",)) == entries[1][1]
    assert cache.lookup("libfoo.so.1", ()) == "/opt/libfoo.so.1"


def test_an_absent_cache_is_empty(tmp_path: Path) -> None:
    assert LdCache.from_file(str(tmp_path / "none")).entries == []


GOOD = write_cache([("liba.so", "/x/liba.so", "x86-64-v2"), ("libb.so", "/x/libb.so", None)])


def _set(fmt: str, offset: int, value: int, data: bytes = GOOD) -> bytes:
    """``data`` with the ``fmt`` field at ``offset`` set to ``value``."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _one_long_string(n: int = 100_000, length: int = 1 << 20) -> bytes:
    """n entries whose keys and values all name one ``length``-byte string."""
    start = HEADER_SIZE + ENTRY_SIZE * n
    rows = struct.pack("<iIIIQ", CACHE_FLAGS_X86_64, start, start, 0, 0) * n
    return MAGIC + struct.pack("<IIB3xI12x", n, length + 1, 2, 0) + rows + b"a" * length + b"\0"


EXT = struct.unpack_from("<I", GOOD, 32)[0]
HOSTILE = {
    "short file": (GOOD[:40], "cache size"),
    "bad magic": (b"X" + GOOD[1:], "cache magic"),
    "big-endian flag": (_set("B", 28, 1), "cache flags"),
    "nlibs past the file": (_set("<I", 20, 0xFFFFFFFF), "cache nlibs"),
    "len_strings past the file": (_set("<I", 24, 0xFFFFFFF0), "cache len_strings"),
    "key past the file": (_set("<I", HEADER_SIZE + 4, 0xFFFFFF00), "cache entry strings"),
    "value with no NUL": (_set("<I", HEADER_SIZE + 8, len(GOOD), GOOD + b"xyz"),
                          "cache entry strings"),
    "extension offset unaligned": (_set("<I", 32, EXT + 1), "cache extension_offset"),
    "extension count huge": (_set("<I", EXT + 4, 0x10000000), "cache extension count"),
    "hwcaps section past the file": (_set("<I", EXT + 8 + 16 + 8, 0xFFFFF000),
                                     "cache glibc-hwcaps section"),
    "hwcap index past the names": (_set("<Q", HEADER_SIZE + 16, HWCAP_EXTENSION | 7),
                                   "cache entry hwcap index"),
    "1e5 entries at one 1 MiB string": (_one_long_string(), "cache entry strings bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_cache_is_a_clear_error_within_bounds(case: str) -> None:
    data, field = HOSTILE[case]
    with pytest.raises(ElfCacheError) as caught:
        run_isolated(LdCache.parse, data, timeout=10.0, max_rss=256 << 20)
    assert caught.value.field.startswith(field)


def _every_cut(data: bytes) -> list[str]:
    """Parse every prefix of ``data`` (step 7): what each gave, "ok" or the error's field."""
    seen = []
    for end in range(0, len(data), 7):
        try:
            LdCache.parse(data[:end])
            seen.append("ok")
        except ElfCacheError as exc:
            seen.append(exc.field)
    return seen


def test_every_truncation_of_the_real_cache_parses_or_is_an_elfcacheerror() -> None:
    data = Path("/etc/ld.so.cache").read_bytes()
    seen = run_isolated(_every_cut, data, timeout=60.0, max_rss=256 << 20).value
    assert len(seen) == -(-len(data) // 7) and "cache size" in seen
