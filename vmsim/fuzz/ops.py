"""Hypothesis strategies for address-space operations, and a way to apply them to any backend.

Part of the fuzz kit (``vmsim.fuzz``); public as ``vmsim.strategies``. Imports only
``loader.mmap``, ``loader.pages`` and hypothesis, so the same sequences drive the simulator
(``vmsim``) and the real kernel (``loader.libc.LibcMmap``) and their results can be compared
step by step, as in the hypothesis docs' ``DatabaseComparison`` pattern.

Operations are small NamedTuples whose ``repr`` reads like the call they make, with addresses
in pages relative to an *arena* (a region the test owns), so a failing sequence prints as
something a person can replay by hand::

    [MmapOp(page=2, pages=3, prot=rw-, shared=False, placement='fixed', file_page=None),
     WriteOp(page=3, offset=16, data=b'\\x01\\x02'),
     MprotectOp(page=2, pages=1, prot=r--)]

:func:`apply_op` performs one on an ``Mmap`` backend given the arena's start (and a file
descriptor for file mappings) and returns what the call returned; errors propagate
(``MmapError`` from the call, the simulator's ``Fault`` from an access).

>>> from hypothesis import given
>>> @given(op_sequences(arena_pages=8, max_size=5))
... def test_ops_stay_in_the_arena(ops):
...     assert all(op.page + getattr(op, "pages", 1) <= 8 for op in ops
...                if getattr(op, "page", None) is not None)
>>> test_ops_stay_in_the_arena()
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, NamedTuple, cast

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from loader.mmap import MapFlags, Mmap, ProtFlags
from loader.pages import HOST_PAGE_SIZE
from vmsim.fuzz.knobs import ValueOrStrategy, check_range, check_subset

__all__ = [
    "OP_KINDS",
    "PLACEMENTS",
    "MmapOp",
    "MprotectOp",
    "MunmapOp",
    "Op",
    "ReadOp",
    "WriteOp",
    "apply_op",
    "op_sequences",
    "ops",
]


OP_KINDS: tuple[str, ...] = ("mmap", "munmap", "mprotect", "read", "write")
"""Every operation :func:`ops` can draw."""

PLACEMENTS: tuple[str, ...] = ("fixed", "noreplace", "hint")
"""How an :class:`MmapOp` places its mapping: MAP_FIXED, MAP_FIXED_NOREPLACE, or ``page`` as
a hint (the kernel may put it elsewhere, even outside the arena)."""

Placement = Literal["fixed", "noreplace", "hint"]


class MmapOp(NamedTuple):
    """``mmap`` of ``pages`` pages at arena page ``page`` (None: no address at all), of the
    arena file from page ``file_page`` (None: anonymous)."""

    page: int | None
    pages: int
    prot: ProtFlags
    shared: bool = False
    placement: Placement = "fixed"
    file_page: int | None = None

    def __repr__(self) -> str:
        return (f"MmapOp(page={self.page}, pages={self.pages}, prot={self.prot.rwx}, "
                f"shared={self.shared}, placement={self.placement!r}, "
                f"file_page={self.file_page})")


class MunmapOp(NamedTuple):
    """``munmap`` of ``pages`` pages at arena page ``page``."""

    page: int
    pages: int


class MprotectOp(NamedTuple):
    """``mprotect`` of ``pages`` pages at arena page ``page`` to ``prot``."""

    page: int
    pages: int
    prot: ProtFlags

    def __repr__(self) -> str:
        return f"MprotectOp(page={self.page}, pages={self.pages}, prot={self.prot.rwx})"


class ReadOp(NamedTuple):
    """A user-mode read of ``n`` bytes at byte ``offset`` of arena page ``page``."""

    page: int
    offset: int
    n: int


class WriteOp(NamedTuple):
    """A user-mode write of ``data`` at byte ``offset`` of arena page ``page``."""

    page: int
    offset: int
    data: bytes


Op = MmapOp | MunmapOp | MprotectOp | ReadOp | WriteOp
"""Any one operation."""


def apply_op(op: Op, mm: Mmap, base: int, *, fd: int | None = None,
             page_size: int = HOST_PAGE_SIZE) -> int | bytes | None:
    """Perform ``op`` on backend ``mm`` for an arena starting at ``base`` and return what the
    call returned: for mmap the mapping's address minus ``base`` (a hinted mapping may land
    outside the arena), for a read the bytes, else None. File mappings use ``fd``
    (ValueError if it is None). Errors propagate (MmapError, the simulator's Fault).
    """
    if isinstance(op, MmapOp):
        return _apply_mmap(op, mm, base, fd, page_size)
    if isinstance(op, MunmapOp):
        mm.munmap(base + op.page * page_size, op.pages * page_size)
        return None
    if isinstance(op, MprotectOp):
        mm.mprotect(base + op.page * page_size, op.pages * page_size, op.prot)
        return None
    if isinstance(op, ReadOp):
        return mm.read(base + op.page * page_size + op.offset, op.n)
    mm.write(base + op.page * page_size + op.offset, op.data)
    return None


def _apply_mmap(op: MmapOp, mm: Mmap, base: int, fd: int | None, page_size: int) -> int:
    """The mmap call ``op`` describes; returns the address relative to ``base``."""
    flags = MapFlags.MAP_SHARED if op.shared else MapFlags.MAP_PRIVATE
    flags |= {"fixed": MapFlags.MAP_FIXED, "noreplace": MapFlags.MAP_FIXED_NOREPLACE,
              "hint": MapFlags(0)}[op.placement]
    addr = None if op.page is None else base + op.page * page_size
    if op.file_page is None:
        flags |= MapFlags.MAP_ANONYMOUS
        mapped = mm.mmap(addr, op.pages * page_size, op.prot, flags, 0, None)
    else:
        if fd is None:
            raise ValueError(f"{op!r} maps the arena file, but fd=None was given")
        mapped = mm.mmap(addr, op.pages * page_size, op.prot, flags,
                         op.file_page * page_size, fd)
    return mapped.addr - base


_PROTS = [ProtFlags(p) for p in range(8)]


def ops(
    *,
    arena_pages: ValueOrStrategy[int] = 16,
    kinds: ValueOrStrategy[Collection[str]] = OP_KINDS,
    placements: ValueOrStrategy[Collection[str]] = ("fixed", "noreplace"),
    file_pages: ValueOrStrategy[int] = 0,
    shared: ValueOrStrategy[bool] = False,
    max_access: ValueOrStrategy[int] = 64,
) -> st.SearchStrategy[Op]:
    """Single operations inside an arena of ``arena_pages`` pages.

    ``kinds``: which operations, from :data:`OP_KINDS`. ``placements``: how mmaps place,
    from :data:`PLACEMENTS` ("hint" may map outside the arena). ``file_pages``: the size of
    the arena file in pages; 0 means anonymous mappings only. ``shared``: also draw
    MAP_SHARED mappings. ``max_access``: the largest read or write, in bytes; accesses may
    cross into the next page.

    >>> op = ops(kinds=["mprotect"], arena_pages=4).example()
    >>> type(op).__name__, 0 <= op.page < 4
    ('MprotectOp', True)
    """
    knobs = dict(arena_pages=arena_pages, kinds=kinds, placements=placements,
                 file_pages=file_pages, shared=shared, max_access=max_access)
    if any(isinstance(v, st.SearchStrategy) for v in knobs.values()):
        return _drawn_first(knobs, ops)
    check_range(arena_pages, "arena_pages", 1, 2**20)
    check_subset(kinds, "kinds", OP_KINDS)
    check_subset(placements, "placements", PLACEMENTS)
    check_range(file_pages, "file_pages", 0, 2**20)
    check_range(max_access, "max_access", 1, 2**20)
    if not isinstance(shared, bool):
        raise InvalidArgument(f"shared={shared!r}: expected a bool")
    return _ops(cast(int, arena_pages), cast(Collection[str], kinds),
                cast(Collection[str], placements), cast(int, file_pages), shared,
                cast(int, max_access))


def _ops(n: int, kinds: Collection[str], placements: Collection[str], file_pages: int,
         shared: bool, max_access: int) -> st.SearchStrategy[Op]:
    """:func:`ops` once its arguments are checked values."""
    prots = st.sampled_from(_PROTS)
    start = st.integers(0, n - 1)
    makers: dict[str, st.SearchStrategy[Op]] = {
        "mmap": _mmap_ops(n, sorted(placements), file_pages, shared),
        "munmap": start.flatmap(lambda p: st.builds(MunmapOp, st.just(p),
                                                    st.integers(1, n - p))),
        "mprotect": start.flatmap(lambda p: st.builds(MprotectOp, st.just(p),
                                                      st.integers(1, n - p), prots)),
        "read": st.builds(ReadOp, start, st.integers(0, HOST_PAGE_SIZE - 1),
                          st.integers(1, max_access)),
        "write": st.builds(WriteOp, start, st.integers(0, HOST_PAGE_SIZE - 1),
                           st.binary(min_size=1, max_size=max_access)),
    }
    return st.one_of([makers[k] for k in OP_KINDS if k in kinds])


def _mmap_ops(n: int, placements: list[str], file_pages: int,
              shared: bool) -> st.SearchStrategy[Op]:
    """MmapOps that fit in an ``n``-page arena (and, for files, in ``file_pages``)."""

    @st.composite
    def draw_mmap(draw: st.DrawFn) -> Op:
        page = draw(st.integers(0, n - 1))
        pages = draw(st.integers(1, n - page))
        file_page = None
        if file_pages and draw(st.booleans()):
            file_page = draw(st.integers(0, file_pages - 1))
        placement = draw(st.sampled_from(placements))
        return MmapOp(page, pages, draw(st.sampled_from(_PROTS)),
                      shared=shared and draw(st.booleans()),
                      placement=cast(Placement, placement),
                      file_page=file_page)

    return draw_mmap()


def op_sequences(
    *,
    min_size: ValueOrStrategy[int] = 1,
    max_size: ValueOrStrategy[int] = 20,
    **knobs: Any,
) -> st.SearchStrategy[list[Op]]:
    """Lists of :func:`ops` (same keyword-only knobs), from ``min_size`` to ``max_size`` long.

    >>> seq = op_sequences(max_size=3, kinds=["mmap", "write"]).example()
    >>> 1 <= len(seq) <= 3
    True
    """
    sizes = dict(min_size=min_size, max_size=max_size)
    if any(isinstance(v, st.SearchStrategy) for v in sizes.values()):
        return _drawn_first(sizes, lambda **drawn: op_sequences(**drawn, **knobs))
    check_range(min_size, "min_size", 0, 10**6)
    check_range(max_size, "max_size", cast(int, min_size), 10**6)
    return st.lists(ops(**knobs), min_size=cast(int, min_size), max_size=cast(int, max_size))


def _drawn_first(knobs: dict[str, Any], make: Any) -> st.SearchStrategy[Any]:
    """Draw the knobs that are strategies, then draw from ``make(**knobs)``."""
    names = list(knobs)
    parts = [v if isinstance(v, st.SearchStrategy) else st.just(v) for v in knobs.values()]
    return st.tuples(*parts).flatmap(lambda values: make(**dict(zip(names, values,
                                                                     strict=True))))


def _register_type_strategies() -> None:
    """Hypothesis entry point: ``st.from_type`` of each op type draws from :func:`ops`."""
    for op_type, kind in ((MmapOp, "mmap"), (MunmapOp, "munmap"), (MprotectOp, "mprotect"),
                          (ReadOp, "read"), (WriteOp, "write")):
        st.register_type_strategy(op_type, ops(kinds=[kind]))


_register_type_strategies()
