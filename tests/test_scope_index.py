"""ScopeIndex: the bulk answers (``settled``) and the fast path of ``lookup`` equal the
plain walk of ``loader.scope.lookup`` over the same scope, for every reference of a real
closure (libcurl's and libxml2's: thousands of names, versioned and not, in every
class)."""

from __future__ import annotations

import numpy as np
import pytest

import vmsim
from loader.linkmap import LinkMap
from loader.scope import Definitions, ScopeIndex, lookup
from loader.symbols import _labels

LIBRARIES = ["libcurl.so.4", "libxml2.so.2"]


def _questions(lm: LinkMap) -> list[tuple[bytes, bytes | None]]:
    """Every (name, version) an object of ``lm`` references (its undefined symbols), and
    each name again with a version nobody defines (only an unversioned definition takes
    it)."""
    out: set[tuple[bytes, bytes | None]] = set()
    for obj in lm.objects:
        syms = obj.tables.symtab
        undefined = np.flatnonzero(syms["st_shndx"] == 0)[1:].astype(np.int64)
        for name, version in _labels(obj.tables, undefined).values():
            out.add((name.encode(), version.encode() if version else None))
            out.add((name.encode(), b"VMSIM_NO_SUCH_1.0"))
    return sorted(out, key=lambda q: (q[0], q[1] or b""))


@pytest.mark.parametrize("library", LIBRARIES)
def test_settled_answers_and_lookup_equal_the_walk(library: str) -> None:
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen(library)
    scope = [[Definitions(obj) for obj in lm.objects]]
    index = ScopeIndex(scope)
    questions = _questions(lm)
    names = [q[0] for q in questions]
    versions = [q[1] for q in questions]
    where, symbol = index.settled(names, versions, np.ones(len(names), dtype=bool))
    assert len(questions) > 600 and (where >= 0).sum() > len(questions) // 3
    for k, (name, version) in enumerate(questions):
        for plt in (False, True):
            walked = lookup(name, version, scope, plt=plt)
            assert index.lookup(name, version, plt=plt) == walked, (name, version, plt)
            if where[k] >= 0:
                assert walked is not None and walked.obj is index.objects[where[k]] and \
                    walked.index == symbol[k], (name, version)
    lm.unload()


def test_settled_asks_nothing_it_was_not_asked() -> None:
    lm = LinkMap(vmsim.AddressSpace())
    lm.dlopen("libz.so.1")
    index = ScopeIndex([[Definitions(obj) for obj in lm.objects]])
    where, symbol = index.settled([b"malloc", b"malloc"], [None, None],
                                  np.array([False, True]))
    assert where.tolist()[0] == -1 and symbol.tolist()[0] == -1
    assert where.tolist()[1] >= 0 and symbol.tolist()[1] > 0
    lm.unload()
