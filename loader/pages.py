"""Page arithmetic, in tiny named helpers that take the page size (xv6's PGROUNDDOWN).

Used by every layer; no literal page size appears in logic elsewhere.
"""

from __future__ import annotations

import mmap as _host_mmap

__all__ = ["HOST_PAGE_SIZE", "page_offset", "page_round_down", "page_round_up", "pages_in"]

HOST_PAGE_SIZE: int = _host_mmap.PAGESIZE
"""The page size of the machine this process runs on."""


def page_round_down(va: int, page_size: int = HOST_PAGE_SIZE) -> int:
    """The start of the page holding ``va``. page_size must be a power of two."""
    return va & ~(page_size - 1)


def page_round_up(va: int, page_size: int = HOST_PAGE_SIZE) -> int:
    """The first page boundary at or above ``va``. page_size must be a power of two."""
    return (va + page_size - 1) & ~(page_size - 1)


def page_offset(va: int, page_size: int = HOST_PAGE_SIZE) -> int:
    """``va``'s offset within its page."""
    return va & (page_size - 1)


def pages_in(length: int, page_size: int = HOST_PAGE_SIZE) -> int:
    """How many whole pages ``length`` bytes occupy once rounded up."""
    return (length + page_size - 1) // page_size
