"""The CacheKeyStorage conformance suite (BuildKit's cachestorage_testsuite.go), run
against every implementation, plus tests of the in-memory stores themselves."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from solver._cache import CacheInfoLink, root_key
from solver._digest import digest_of
from solver.cache._sqlite import SQLiteCacheStorage
from solver.cache._storage import (
    CacheKeyStorage,
    CacheResult,
    InMemoryCacheStorage,
    InMemoryResultStorage,
    NotFoundError,
    ResultStorage,
)
from solver.testing import CountingResult, HandleTracker

StorageFactory = Callable[[Path], Awaitable[CacheKeyStorage]]


async def _in_memory(_: Path) -> CacheKeyStorage:
    return InMemoryCacheStorage()


async def _sqlite(tmp_path: Path) -> CacheKeyStorage:
    return await SQLiteCacheStorage.open(tmp_path / "cache.db")


# Every CacheKeyStorage implementation, by test id; a new store is one more entry.
STORAGE_FACTORIES: dict[str, StorageFactory] = {
    "memory": _in_memory,
    "sqlite": _sqlite,
}


@pytest.fixture(params=list(STORAGE_FACTORIES))
def storage_factory(request: pytest.FixtureRequest) -> StorageFactory:
    return STORAGE_FACTORIES[request.param]


@pytest.fixture
async def storage(
    storage_factory: StorageFactory, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[CacheKeyStorage]:
    st = await storage_factory(tmp_path)
    try:
        yield st
    finally:
        await st.close()


def check(st: CacheKeyStorage) -> None:
    """Assert the implementation's invariants, if it can check them."""
    checker = getattr(st, "_check", None)
    if checker is not None:
        checker()


def dgst(s: str) -> str:
    return digest_of(s.encode())


async def add_result(st: CacheKeyStorage, id: str, result_id: str, created_at: float) -> None:
    await st.add_result(id, CacheResult(result_id, created_at))
    check(st)


async def add_link(st: CacheKeyStorage, id: str, link: CacheInfoLink, target: str) -> None:
    await st.add_link(id, link, target)
    check(st)


async def release(st: CacheKeyStorage, result_id: str) -> None:
    await st.release(result_id)
    check(st)


# -- the conformance suite ---------------------------------------------------------


@pytest.mark.anyio
async def test_results(storage: CacheKeyStorage) -> None:
    await add_result(storage, "foo", "foo0", 1000.0)
    await add_result(storage, "foo", "foo1", 1001.5)
    await add_result(storage, "bar", "bar0", 1002.0)

    foo = {r.id: r for r in await storage.walk_results("foo")}
    assert set(foo) == {"foo0", "foo1"}
    assert foo["foo0"].created_at < foo["foo1"].created_at
    assert foo["foo0"] == CacheResult("foo0", 1000.0)

    bar = await storage.walk_results("bar")
    assert [r.id for r in bar] == ["bar0"]

    assert await storage.walk_results("baz") == []

    assert (await storage.load("foo", "foo1")).id == "foo1"
    with pytest.raises(NotFoundError):
        await storage.load("foo1", "foo1")
    with pytest.raises(NotFoundError):
        await storage.load("foo", "foo2")
    check(storage)


@pytest.mark.anyio
async def test_links(storage: CacheKeyStorage) -> None:
    l0 = CacheInfoLink(input=0, output=1, digest=dgst(">target0"))
    await add_link(storage, "foo", l0, "target0")
    await add_link(storage, "bar", l0, "target0-second")

    assert await storage.walk_links("foo", l0) == ["target0"]

    l1 = CacheInfoLink(input=0, output=1, digest=dgst(">target1"))
    assert await storage.walk_links("foo", l1) == []

    await add_link(storage, "foo", l1, "target1")
    assert await storage.walk_links("foo", l1) == ["target1"]

    await add_link(storage, "foo", l1, "target1-second")
    assert set(await storage.walk_links("foo", l1)) == {"target1", "target1-second"}

    # only the exact link matches: other selector, input or output
    assert await storage.walk_links("foo", CacheInfoLink(0, 1, dgst(">target1"), "sel")) == []
    assert await storage.walk_links("foo", CacheInfoLink(1, 1, dgst(">target1"))) == []
    assert await storage.walk_links("foo", CacheInfoLink(0, 0, dgst(">target1"))) == []

    assert await storage.has_link("foo", l1, "target1-second")
    assert not await storage.has_link("foo", l0, "target1")
    assert not await storage.has_link("nothing", l0, "target0")

    # adding a link twice changes nothing
    await add_link(storage, "foo", l1, "target1")
    assert sorted(await storage.walk_links("foo", l1)) == ["target1", "target1-second"]


@pytest.mark.anyio
async def test_result_release_single_level(storage: CacheKeyStorage) -> None:
    await add_result(storage, "foo", "foo0", 1.0)
    await add_result(storage, "foo", "foo1", 2.0)

    await release(storage, "foo0")
    assert [r.id for r in await storage.walk_results("foo")] == ["foo1"]

    await release(storage, "foo1")
    assert await storage.walk_results("foo") == []
    assert await storage.walk() == []
    assert not await storage.exists("foo")

    # releasing an unknown result is a no-op
    await release(storage, "foo1")


@pytest.mark.anyio
async def test_result_release_multi_level(storage: CacheKeyStorage) -> None:
    await add_result(storage, "foo", "foo-result", 1.0)
    await add_result(storage, "sub0", "sub0-result", 2.0)
    l0 = CacheInfoLink(input=0, output=1, digest=dgst("to-sub0"))
    await add_link(storage, "foo", l0, "sub0")
    await add_result(storage, "sub1", "sub1-result", 3.0)
    await add_link(storage, "foo", l0, "sub1")

    # deleting one sub does not delete the parent
    await release(storage, "sub0-result")
    assert [r.id for r in await storage.walk_results("foo")] == ["foo-result"]
    assert not await storage.exists("sub0")
    assert await storage.walk_links("foo", l0) == ["sub1"]

    # releasing foo's result keeps foo: the chain through it is not broken
    await release(storage, "foo-result")
    assert await storage.exists("foo")
    assert await storage.walk_results("foo") == []
    assert await storage.walk_links("foo", l0) == ["sub1"]

    # releasing sub1 empties foo as well
    await release(storage, "sub1-result")
    assert not await storage.exists("sub1")
    assert not await storage.exists("foo")
    assert await storage.walk() == []


@pytest.mark.anyio
async def test_backlinks(storage: CacheKeyStorage) -> None:
    await add_result(storage, "foo", "foo-result", 1.0)
    await add_result(storage, "sub0", "sub0-result", 2.0)
    link = CacheInfoLink(input=0, output=1, digest=dgst("to-sub0"), selector="sel")
    await add_link(storage, "foo", link, "sub0")

    # given in root-key form: the digest covers the output, which becomes 0
    normalised = CacheInfoLink(
        input=0, output=0, digest=root_key(dgst("to-sub0"), 1), selector="sel"
    )
    assert await storage.walk_backlinks("sub0") == [("foo", normalised)]
    assert await storage.walk_backlinks("foo") == []
    assert await storage.walk_backlinks("nothing") == []


@pytest.mark.anyio
async def test_walk_ids_by_result(storage: CacheKeyStorage) -> None:
    await add_result(storage, "foo", "foo-result", 1.0)
    await add_result(storage, "foo2", "foo-result", 2.0)
    await add_result(storage, "bar", "bar-result", 3.0)

    assert sorted(await storage.walk_ids_by_result("foo-result")) == ["foo", "foo2"]
    assert await storage.walk_ids_by_result("bar-result") == ["bar"]
    assert await storage.walk_ids_by_result("nothing") == []

    # one release removes the result from every key that holds it
    await release(storage, "foo-result")
    assert await storage.walk_ids_by_result("foo-result") == []
    assert sorted(await storage.walk()) == ["bar"]


# -- further contract tests ----------------------------------------------------------


@pytest.mark.anyio
async def test_exists_and_walk_report_keys_with_results_or_links(
    storage: CacheKeyStorage,
) -> None:
    link = CacheInfoLink(0, 0, dgst("op"))
    await add_link(storage, "parent", link, "child")
    await add_result(storage, "other", "r", 1.0)
    # a key that is only a link target holds nothing of its own
    assert await storage.exists("parent")
    assert not await storage.exists("child")
    assert await storage.exists("other")
    assert sorted(await storage.walk()) == ["other", "parent"]


@pytest.mark.anyio
async def test_release_cascades_through_a_diamond(storage: CacheKeyStorage) -> None:
    # top -> left -> bottom, top -> right -> bottom; only bottom holds a result
    link = CacheInfoLink(0, 0, dgst("op"))
    await add_link(storage, "top", link, "left")
    await add_link(storage, "top", link, "right")
    await add_link(storage, "left", link, "bottom")
    await add_link(storage, "right", link, "bottom")
    await add_result(storage, "bottom", "r", 1.0)
    await add_result(storage, "right", "kept", 1.0)

    await release(storage, "r")
    # left emptied (and top's link to it went); right still holds a result
    assert sorted(await storage.walk()) == ["right", "top"]
    assert await storage.walk_links("top", link) == ["right"]
    assert await storage.walk_links("right", link) == []

    await release(storage, "kept")
    assert await storage.walk() == []


@pytest.mark.anyio
async def test_release_cascades_up_a_long_chain(storage: CacheKeyStorage) -> None:
    link = CacheInfoLink(0, 0, dgst("op"))
    depth = 3000  # deeper than the interpreter's recursion limit
    for i in range(depth):
        await storage.add_link(f"k{i}", link, f"k{i + 1}")
    await storage.add_result(f"k{depth}", CacheResult("r", 1.0))
    check(storage)
    await release(storage, "r")
    assert await storage.walk() == []


@pytest.mark.anyio
async def test_random_operations_keep_invariants(storage: CacheKeyStorage) -> None:
    rng = random.Random(1234)
    keys = [f"k{i}" for i in range(12)]
    results = [f"r{i}" for i in range(8)]
    links = [CacheInfoLink(i % 2, 0, dgst(f"op{i}")) for i in range(3)]
    for step in range(600):
        op = rng.random()
        if op < 0.35:
            await add_result(storage, rng.choice(keys), rng.choice(results), float(step))
        elif op < 0.75:
            await add_link(storage, rng.choice(keys), rng.choice(links), rng.choice(keys))
        else:
            result_id = rng.choice(results)
            await release(storage, result_id)
            assert await storage.walk_ids_by_result(result_id) == []
        for id in await storage.walk():
            assert await storage.exists(id)


# -- the in-memory stores --------------------------------------------------------------


@pytest.mark.anyio
async def test_in_memory_storage_never_checkpoints() -> None:
    st = InMemoryCacheStorage()
    link = CacheInfoLink(0, 0, dgst("op"))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await st.add_result("a", CacheResult("r", 1.0))
        await st.add_link("a", link, "b")
        await st.add_result("b", CacheResult("r2", 1.0))
        assert await st.exists("a")
        assert await st.walk() == ["a", "b"]
        assert await st.walk_results("a") == [CacheResult("r", 1.0)]
        assert await st.load("a", "r") == CacheResult("r", 1.0)
        assert await st.walk_ids_by_result("r") == ["a"]
        assert await st.walk_links("a", link) == ["b"]
        assert await st.has_link("a", link, "b")
        assert len(await st.walk_backlinks("b")) == 1
        await st.release("r2")
        await st.close()
    assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_in_memory_storage_close() -> None:
    st = InMemoryCacheStorage()
    await st.add_result("a", CacheResult("r", 1.0))
    await st.close()
    await st.close()
    assert "closed" in repr(st)
    with pytest.raises(anyio.ClosedResourceError):
        await st.walk()


def test_in_memory_storage_check_detects_corruption() -> None:
    st = InMemoryCacheStorage()
    st._by_result["r"] = {}
    with pytest.raises(AssertionError):
        st._check()


@pytest.mark.anyio
async def test_in_memory_result_storage_owns_one_handle_per_result(
    handle_tracker: HandleTracker,
) -> None:
    store: ResultStorage = InMemoryResultStorage()
    res = CountingResult("r0", "value0")
    saved = await store.save(res, 5.0)
    assert saved == CacheResult("r0", 5.0)
    await store.save(res, 6.0)  # the same ID again takes no second handle
    await res.release()
    assert res.live_count == 1
    assert await store.exists("r0")

    loaded = await store.load(saved)
    assert loaded.sys == "value0"
    assert loaded is not res
    assert res.live_count == 2
    await loaded.release()

    with pytest.raises(NotFoundError):
        await store.load(CacheResult("missing", 1.0))

    await store.release("r0")
    assert res.live_count == 0
    assert res.release_count == 3
    assert not await store.exists("r0")
    await store.release("r0")  # unknown: ignored


@pytest.mark.anyio
async def test_in_memory_result_storage_close_releases_each_handle_once(
    handle_tracker: HandleTracker,
) -> None:
    store = InMemoryResultStorage()
    held = [CountingResult(f"r{i}", i) for i in range(3)]
    for res in held:
        await store.save(res, 1.0)
        await res.release()
    with anyio.CancelScope() as scope:
        # a cancelled caller still gets every handle released
        scope.cancel()
        await store.close()
    await store.close()
    assert [res.release_count for res in held] == [2, 2, 2]
    assert [res.live_count for res in held] == [0, 0, 0]
    late = CountingResult("late")
    with pytest.raises(anyio.ClosedResourceError):
        await store.save(late, 1.0)
    assert late.live_count == 1  # a closed store takes no handle
    await late.release()


@pytest.mark.anyio
async def test_in_memory_result_storage_release_is_shielded(
    handle_tracker: HandleTracker,
) -> None:
    store = InMemoryResultStorage()
    res = CountingResult("r")  # its release() is a cancel point
    await store.save(res, 1.0)
    await res.release()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.release("r")
    assert res.release_count == 2
    await store.close()
