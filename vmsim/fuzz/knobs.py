"""Knobs of the fuzz kit's public hypothesis strategies (``vmsim.fuzz.images``,
``vmsim.fuzz.malformed``, ``vmsim.fuzz.ops``), in the style of ``hypothesis.extra.numpy``: every
knob is a value or a strategy, and a bad value raises ``InvalidArgument`` saying what was given
and what is allowed. Also the two small helpers the strategies share (:func:`as_strategy`,
:func:`ints`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any, TypeAlias, TypeVar

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

__all__ = [
    "ValueOrStrategy",
    "as_strategy",
    "check_choice",
    "check_range",
    "check_subset",
    "check_type",
    "ints",
]

T = TypeVar("T")
ValueOrStrategy: TypeAlias = T | st.SearchStrategy[T]
"""An argument that is either a value or a strategy drawing such values."""


def check_type(value: Any, name: str, types: tuple[type, ...], allowed: str) -> None:
    """InvalidArgument naming ``name``, ``value`` and what is ``allowed`` unless ``value`` is a
    strategy or an instance of ``types`` (a bool is no int unless ``bool`` is listed)."""
    if isinstance(value, st.SearchStrategy) or (isinstance(value, types)
                                                 and not (isinstance(value, bool)
                                                          and bool not in types)):
        return
    raise InvalidArgument(f"{name}={value!r}: expected {allowed} or a strategy of them")


def check_range(value: Any, name: str, lo: int, hi: int) -> None:
    """InvalidArgument unless ``value`` is a strategy or an int in ``[lo, hi]``."""
    check_type(value, name, (int,), f"an int in [{lo}, {hi}]")
    if isinstance(value, int) and not lo <= value <= hi:
        raise InvalidArgument(f"{name}={value!r}: expected an int in [{lo}, {hi}]")


def check_choice(value: Any, name: str, choices: Collection[Any]) -> None:
    """InvalidArgument unless ``value`` is a strategy or one of ``choices``."""
    if isinstance(value, st.SearchStrategy):
        return
    if value not in choices:
        raise InvalidArgument(f"{name}={value!r}: expected one of {sorted(choices)!r} "
                              "or a strategy")


def check_subset(value: Any, name: str, allowed: tuple[str, ...], *,
                 non_empty: bool = True) -> None:
    """InvalidArgument unless ``value`` is a strategy or a collection drawn from ``allowed``
    (and not empty, when ``non_empty``)."""
    if isinstance(value, st.SearchStrategy):
        return
    if isinstance(value, str) or not isinstance(value, Collection) or (non_empty and not value):
        what = "a non-empty collection" if non_empty else "a collection"
        raise InvalidArgument(f"{name}={value!r}: expected {what} drawn from {allowed!r}")
    unknown = set(value) - set(allowed)
    if unknown:
        raise InvalidArgument(f"{name}={value!r}: {sorted(unknown)!r} unknown; allowed: "
                              f"{allowed!r}")


@functools.lru_cache(maxsize=4096)
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """``st.integers(lo, hi)``, cached here: the composites ask for the same bounds again and
    again, and hypothesis' own cache costs more than this one."""
    return st.integers(lo, hi)


def as_strategy(value: Any) -> st.SearchStrategy[Any]:
    """``value`` if it is a strategy, else ``st.just(value)``."""
    return value if isinstance(value, st.SearchStrategy) else st.just(value)
