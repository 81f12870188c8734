"""The live edge index: BuildKit's solver/index_test.go, ported with the same steps.

The index only reads ``ignore_cache`` from the edges it stores, so plain objects
stand in for active edges. Where the Go test compares the edge returned by
``LoadOrStore`` with ``require.Equal`` (which cannot tell two empty ``edge``
structs apart), these tests check identity, which is what the Go test means.
"""

from __future__ import annotations

from typing import Any

from solver import CacheKey, CacheKeyWithSelector, ExportableCacheKey, digest_of
from solver.engine._index import EdgeIndex


class FakeEdge:
    """Stands in for an active edge: the index reads only ``ignore_cache``."""

    ignore_cache = False

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<FakeEdge {self.name}>"


def dgst(s: str) -> str:
    return digest_of(s.encode())


def key(digest: str, output: int = 0) -> CacheKey:
    """A key without deps (Go: ``NewCacheKey(digest, "", output)``)."""
    return CacheKey(digest, "", output)


def key_with_deps(digest: str, output: int, deps: list[list[CacheKeyWithSelector]]) -> CacheKey:
    """Go: ``testCacheKeyWithDeps``."""
    return CacheKey(digest, "", output, deps)


def dep(k: CacheKey, selector: str | None = None) -> CacheKeyWithSelector:
    """One alternative of an input (Go: ``{CacheKey: expKey(k), Selector: selector}``)."""
    return CacheKeyWithSelector(ExportableCacheKey(k), selector)


def store(idx: EdgeIndex, k: CacheKey, edge: FakeEdge) -> Any:
    """``load_or_store``, then check the index's invariants."""
    found = idx.load_or_store(k, edge)  # type: ignore[arg-type]
    idx._check()
    return found


def release(idx: EdgeIndex, edge: FakeEdge) -> None:
    idx.release(edge)  # type: ignore[arg-type]
    idx._check()


def check_empty(idx: EdgeIndex) -> None:
    """Go: ``checkEmpty`` (no items, no back references)."""
    assert len(idx) == 0
    idx._check()


def test_index_simple() -> None:
    """Port of BuildKit's TestIndexSimple."""
    idx = EdgeIndex()
    e1, e2, e3 = FakeEdge("e1"), FakeEdge("e2"), FakeEdge("e3")

    assert store(idx, key(dgst("foo")), e1) is None
    assert store(idx, key(dgst("bar")), e2) is None

    assert store(idx, key(dgst("bar")), e3) is e2
    assert store(idx, key(dgst("bar")), e3) is e2
    assert store(idx, key(dgst("foo")), e3) is e1

    release(idx, e1)
    release(idx, e2)
    check_empty(idx)


def test_index_multi_level_simple() -> None:
    """Port of BuildKit's TestIndexMultiLevelSimple."""
    idx = EdgeIndex()
    e1, e2, e3 = FakeEdge("e1"), FakeEdge("e2"), FakeEdge("e3")

    k1 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0"))], [dep(key("s0"), dgst("s0"))]],
    )
    assert store(idx, k1, e1) is None

    k2 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0"))], [dep(key("s0"), dgst("s0"))]],
    )
    assert store(idx, k2, e2) is e1

    k2 = key_with_deps(dgst("foo"), 1, k1.deps)
    assert store(idx, k2, e2) is e1

    assert store(idx, k1, e2) is e1

    # update selector: no longer the same key
    k2 = key_with_deps(dgst("foo"), 1, [[dep(key("f0"))], [dep(key("s0"))]])
    assert store(idx, k2, e2) is None

    # add one dep to e1
    k2 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0"))], [dep(key("s0"), dgst("s0")), dep(key("s1", 1))]],
    )
    assert store(idx, k2, e2) is e1

    # recheck with only the new dep key
    k2 = key_with_deps(dgst("foo"), 1, [[dep(key("f0"))], [dep(key("s1", 1))]])
    assert store(idx, k2, e2) is e1

    # combine e1 and e2
    k2 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0"))], [dep(key("s0")), dep(key("s1", 1))]],
    )
    assert store(idx, k2, e2) is e1

    # initial e2 now points to e1
    k2 = key_with_deps(dgst("foo"), 1, [[dep(key("f0"))], [dep(key("s0"))]])
    assert store(idx, k2, e2) is e1

    release(idx, e1)

    # e2 still remains after e1 is gone
    k2 = key_with_deps(dgst("foo"), 1, [[dep(key("f0"))], [dep(key("s0"))]])
    assert store(idx, k2, e3) is e2

    release(idx, e2)
    check_empty(idx)


def test_index_three_levels() -> None:
    """Port of BuildKit's TestIndexThreeLevels."""
    idx = EdgeIndex()
    e1, e2, e3 = FakeEdge("e1"), FakeEdge("e2"), FakeEdge("e3")

    k1 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0"))], [dep(key("s0"), dgst("s0"))]],
    )
    assert store(idx, k1, e1) is None
    assert store(idx, k1, e2) is e1

    k2 = key_with_deps(dgst("bar"), 0, [[dep(key("f0"))], [dep(k1)]])
    assert store(idx, k2, e2) is None

    k2 = key_with_deps(
        dgst("bar"),
        0,
        [[dep(key("f0"))], [dep(k1), dep(key("alt"))]],
    )
    assert store(idx, k2, e2) is None

    k2 = key_with_deps(dgst("bar"), 0, [[dep(key("f0"))], [dep(key("alt"))]])
    assert store(idx, k2, e3) is e2

    # change dep in a low key
    k1 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0")), dep(key("f0_"))], [dep(key("s0"), dgst("s0"))]],
    )
    k2 = key_with_deps(dgst("bar"), 0, [[dep(key("f0"))], [dep(k1)]])
    assert store(idx, k2, e3) is e2

    # reload with only f0_ still matches
    k1 = key_with_deps(
        dgst("foo"),
        1,
        [[dep(key("f0_"))], [dep(key("s0"), dgst("s0"))]],
    )
    k2 = key_with_deps(dgst("bar"), 0, [[dep(key("f0"))], [dep(k1)]])
    assert store(idx, k2, e3) is e2

    release(idx, e1)
    release(idx, e2)
    check_empty(idx)
