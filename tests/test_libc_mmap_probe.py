"""LibcMmap.write_words' bulk path: one probe store per page (process_vm_writev), then a
numpy scatter. A bad page anywhere must give the same memory and the same EFAULT as the
ordered vectored write would: the words before the first bad one stored, none after, and
never a signal. Every case runs in a supervised child (the host backend writes this
process's own memory)."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

from loader.isolate import run_isolated
from loader.libc import _SCATTER_MIN, LibcMmap
from loader.mmap import MapFlags, MmapError, ProtFlags

PAGE = LibcMmap.page_size
RW = ProtFlags.PROT_READ | ProtFlags.PROT_WRITE
PRIV = MapFlags.MAP_PRIVATE
N_WORDS = 4 * _SCATTER_MIN      # well past the bulk threshold, in every case


def _store(mm: LibcMmap, where: np.ndarray, base: int, pages: int) -> tuple[str, list[int]]:
    """write_words(where, 1..n), then the words of the ``pages`` pages at ``base`` (0 for
    a page that cannot be read)."""
    try:
        mm.write_words(where, np.arange(1, len(where) + 1, dtype=np.uint64))
        code = "ok"
    except MmapError as exc:
        code = errno.errorcode[exc.errno or 0]
    words: list[int] = []
    for k in range(pages):
        try:
            words += np.frombuffer(mm.read(base + k * PAGE, PAGE), dtype="<u8").tolist()
        except MmapError:
            words += [0] * (PAGE // 8)
    return code, words


def _sorted_words(stride: int, offset: int, bad: str) -> tuple[str, list[int], list[int]]:
    """Words every ``stride`` bytes from ``offset`` across three pages, ascending; the middle
    page read-only (``bad="ro"``), all writable (``"none"``). Returns the outcome, the words
    of the three pages, and the word offsets written."""
    mm = LibcMmap()
    base = mm.mmap_anonymous(0, 3 * PAGE, RW, PRIV)
    if bad == "ro":
        mm.mprotect(base + PAGE, PAGE, ProtFlags.PROT_READ)
    offs = list(range(offset, 3 * PAGE - 8, stride))
    where = np.array([base + o for o in offs], dtype=np.uint64)
    code, words = _store(mm, where, base, 3)
    return code, words, offs


def test_sorted_words_all_good_are_stored() -> None:
    code, words, offs = run_isolated(_sorted_words, 16, 0, "none", timeout=20).value
    assert code == "ok" and len(offs) >= N_WORDS
    assert [words[o // 8] for o in offs] == list(range(1, len(offs) + 1))


def test_sorted_words_stop_before_a_read_only_page() -> None:
    code, words, offs = run_isolated(_sorted_words, 16, 0, "ro", timeout=20).value
    assert code == "EFAULT"
    before = [o for o in offs if o < PAGE]
    assert [w for w in words if w] == list(range(1, len(before) + 1))


def test_a_word_straddling_into_a_read_only_page_stops_there() -> None:
    # stride 24 from 4: the word at PAGE - 4 crosses into the read-only page
    code, words, offs = run_isolated(_sorted_words, 24, 4, "ro", timeout=20).value
    assert code == "EFAULT"
    first_bad = next(i for i, o in enumerate(offs) if o + 8 > PAGE)
    raw = np.array(words, dtype="<u8").view(np.uint8)
    stored = [int.from_bytes(raw[o:o + 8].tobytes(), "little") for o in offs[:first_bad]]
    assert stored == list(range(1, first_bad + 1))
    assert not raw[PAGE:].any()


def _past_end_of_file(directory: str) -> tuple[str, list[int]]:
    """A private file mapping of two pages over a one-page file: the second page is past
    the end (a store there is SIGBUS for the CPU). Words ascending over both pages."""
    path = os.path.join(directory, "one-page")
    with open(path, "wb") as f:
        f.write(bytes(PAGE))
    fd = os.open(path, os.O_RDONLY)
    mm = LibcMmap()
    base = mm.mmap(None, 2 * PAGE, RW, PRIV, 0, fd).addr
    where = np.array([base + 16 * k for k in range(2 * PAGE // 16)], dtype=np.uint64)
    return _store(mm, where, base, 2)


def test_sorted_words_stop_before_a_page_past_the_end_of_the_file() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = run_isolated(_past_end_of_file, tmp, timeout=20)
    assert got.status == "ok"
    code, words = got.value
    assert code == "EFAULT"
    assert [w for w in words if w] == list(range(1, PAGE // 16 + 1))
