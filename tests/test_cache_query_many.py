"""Batched key lookups (``KeyedCacheManager.query_many`` over a storage's
``walk_links_many``), which the cached path uses for each layer of a graph:
the same keys and the same links as one ``query`` per request, on the in-memory
and the SQLite key storage, in one storage call for the reads and one for the
links they add (``add_many``); a save of a key over found keys writes the
links its walk adds in one call too."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from solver._cache import CacheInfoLink, CacheKey, CacheKeyWithSelector
from solver.cache._manager import KeyedCacheManager
from solver.cache._sqlite import SQLiteCacheStorage
from solver.cache._storage import (
    CacheKeyStorage,
    InMemoryCacheStorage,
    InMemoryResultStorage,
)
from solver.testing import HandleTracker
from tests.cache_support import CountingStorage
from tests.test_cache_manager import dgst, exp, key_with, key_with_deps, root, save

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CountingStorage]:
    inner: CacheKeyStorage
    if request.param == "memory":
        inner = InMemoryCacheStorage()
    else:
        inner = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    yield CountingStorage(inner)
    await inner.close()  # idempotent: the manager closed it already


async def test_the_same_keys_and_links_as_one_query_each(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    """Two roots a and b; c saved once over a and once over b (two stored keys);
    d over c-over-a. A batch asks c from the alternatives [a, b] (both found,
    and each alternative then links to both, as ``query`` links them), d from
    c-over-a, an unknown op from a, and the root key of a: one storage read for
    all the links, and answers equal to ``query``'s."""
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        b = await save(m, root(dgst("b")), "b")
        c_a = await save(m, key_with(dgst("c"), 0, a), "c-a")
        await save(m, key_with(dgst("c"), 0, b), "c-b")
        await save(m, key_with(dgst("d"), 0, c_a), "d")
        alts = [CacheKeyWithSelector(a), CacheKeyWithSelector(b)]
        requests: list[tuple[Sequence[CacheKeyWithSelector], int, str, int]] = [
            (alts, 0, dgst("c"), 0),
            ([CacheKeyWithSelector(c_a)], 0, dgst("d"), 0),
            ([CacheKeyWithSelector(a)], 0, dgst("unknown"), 0),
            ([], 0, dgst("a"), 0),
        ]
        a_id = await m.storage_id(a.key)
        b_id = await m.storage_id(b.key)
        link_c = CacheInfoLink(0, 0, dgst("c"), None)
        assert len(await storage.inner.walk_links(a_id, link_c)) == 1
        storage.calls.clear()

        batched = await m.query_many(requests)
        assert storage.count("walk_links_many") == 1
        assert storage.count("walk_links") == 0
        # the two links it adds (a to c-over-b, b to c-over-a) in one write
        assert (storage.count("add_link"), storage.count("add_many")) == (0, 1)
        assert [len(keys) for keys in batched] == [2, 1, 0, 1]
        # the alternatives now lead to both stored keys of c
        targets = {k.ids[m] for k in batched[0]}
        assert set(await storage.inner.walk_links(a_id, link_c)) == targets
        assert set(await storage.inner.walk_links(b_id, link_c)) == targets

        one_each = [await m.query(*r) for r in requests]
        for got, want in zip(batched, one_each, strict=True):
            assert [(k.ids[m], k.digest, k.output) for k in got] == [
                (k.ids[m], k.digest, k.output) for k in want
            ]
        # a key from the batch is one the manager knows: its records are there
        assert len(await m.records(batched[1][0])) == 1
    finally:
        await m.close()


async def test_an_empty_batch_reads_nothing(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        assert await m.query_many([]) == []
        assert await storage.inner.walk_links_many([]) == []  # type: ignore[attr-defined]
    finally:
        await m.close()


async def test_a_storage_without_batched_reads_is_asked_one_link_at_a_time(
    handle_tracker: HandleTracker,
) -> None:
    """A key storage of the protocol alone (no ``walk_links_many``) answers the
    same batch through ``walk_links``."""

    class Plain:
        def __init__(self) -> None:
            self.inner = InMemoryCacheStorage()
            self.walks = 0

        def __getattr__(self, name: str) -> object:
            if name == "walk_links_many":
                raise AttributeError(name)
            return getattr(self.inner, name)

        async def walk_links(self, id: str, link: CacheInfoLink) -> list[str]:
            self.walks += 1
            return await self.inner.walk_links(id, link)

    st = Plain()
    m = KeyedCacheManager(secrets.token_hex(8), st, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        await save(m, key_with(dgst("c"), 0, a), "c")
        st.walks = 0
        sel = key_with_deps(dgst("c"), 0, [[CacheKeyWithSelector(a)]])
        got = await m.query_many(
            [
                ([CacheKeyWithSelector(exp(sel))], 0, dgst("x"), 0),
                ([CacheKeyWithSelector(a)], 0, dgst("c"), 0),
            ]
        )
        assert [len(k) for k in got] == [0, 1]
        assert st.walks >= 2
        assert isinstance(got[1][0], CacheKey)
    finally:
        await m.close()


async def test_a_save_over_found_keys_adds_only_its_own_links(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    """c found by a query is marked linked below (a stored key is reached only
    through links, added after those below): a save of d over it adds its one
    link and reads none. Found before a release, c is walked again (the release
    may have cut below it), and the walk writes what it adds in one call."""
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        await save(m, key_with(dgst("c"), 0, a), "c")
        (found_c,) = await m.query([CacheKeyWithSelector(a)], 0, dgst("c"), 0)
        found_c.deps = [[CacheKeyWithSelector(a)]]
        storage.calls.clear()
        await save(m, key_with(dgst("d"), 0, exp(found_c)), "d")
        assert (storage.count("add_link"), storage.count("add_many")) == (1, 0)
        assert storage.count("has_link") == 0
        assert len(await m.query([CacheKeyWithSelector(exp(found_c))], 0, dgst("d"), 0)) == 1

        ((c_again,),) = await m.query_many([([CacheKeyWithSelector(a)], 0, dgst("c"), 0)])
        c_again.deps = [[CacheKeyWithSelector(a)]]
        x = await save(m, root(dgst("x")), "x")
        (rec,) = await m.records(x.key)
        await m.release(rec.id)
        storage.calls.clear()
        await save(m, key_with(dgst("e"), 0, exp(c_again)), "e")
        # walked: c's link from a is read (there) and e's from c is missing,
        # then written (one call for what the walk adds)
        assert storage.count("has_link") == 2
        assert storage.count("add_link") + storage.count("add_many") == 1
        assert len(await m.query([CacheKeyWithSelector(exp(c_again))], 0, dgst("e"), 0)) == 1
    finally:
        await m.close()


async def test_a_key_found_while_a_release_ran_is_walked_again(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    """A release that runs while ``query_many`` reads its links (the read is an
    await) may cut below what it finds: the keys it returns are not marked
    linked below, so a save over one walks its links again, as after a release
    before the query."""
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        await save(m, key_with(dgst("c"), 0, a), "c")
        x = await save(m, root(dgst("x")), "x")
        (rec,) = await m.records(x.key)
        read = storage.__getattr__("walk_links_many")

        async def release_while_reading(requests: object) -> object:
            await m.release(rec.id)
            return await read(requests)

        storage.walk_links_many = release_while_reading  # type: ignore[method-assign]
        try:
            ((c_found,),) = await m.query_many([([CacheKeyWithSelector(a)], 0, dgst("c"), 0)])
        finally:
            del storage.walk_links_many
        c_found.deps = [[CacheKeyWithSelector(a)]]
        storage.calls.clear()
        await save(m, key_with(dgst("e"), 0, exp(c_found)), "e")
        assert storage.count("has_link") == 2  # walked: c's link from a, e's from c
        assert len(await m.query([CacheKeyWithSelector(exp(c_found))], 0, dgst("e"), 0)) == 1
    finally:
        await m.close()


async def test_the_root_keys_of_a_batch_are_read_in_one_call(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    """Requests without deps (a graph's leaves: their root keys) in a batch are
    answered by one ``exists_many``, not one ``exists`` each, with the keys
    ``query`` returns: a stored root key, and nothing for an unknown one."""
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        await save(m, root(dgst("b"), 1), "b1")
        await save(m, key_with(dgst("c"), 0, a), "c")
        requests: list[tuple[Sequence[CacheKeyWithSelector], int, str, int]] = [
            ([], 0, dgst("a"), 0),
            ([], 0, dgst("missing"), 0),
            ([CacheKeyWithSelector(a)], 0, dgst("c"), 0),
            ([], 0, dgst("b"), 1),
            ([], 0, dgst("b"), 0),
        ]
        storage.calls.clear()
        batched = await m.query_many(requests)
        assert storage.count("exists_many") == 1
        assert storage.count("exists") == 0
        assert storage.count("walk_links_many") == 1
        assert [len(keys) for keys in batched] == [1, 0, 1, 1, 0]
        one_each = [await m.query(*r) for r in requests]
        assert storage.count("exists") == 4
        for got, want in zip(batched, one_each, strict=True):
            assert [(k.ids[m], k.digest, k.output) for k in got] == [
                (k.ids[m], k.digest, k.output) for k in want
            ]
        assert len(await m.records(batched[3][0])) == 1
        # a batch with no leaf reads no root key
        await m.query_many([([CacheKeyWithSelector(a)], 0, dgst("c"), 0)])
        assert storage.count("exists_many") == 1
        assert await storage.inner.exists_many([]) == []  # type: ignore[attr-defined]
    finally:
        await m.close()


async def test_a_storage_without_batched_root_keys_is_asked_one_at_a_time(
    handle_tracker: HandleTracker,
) -> None:
    """A key storage without ``exists_many`` answers the leaves of a batch
    through ``exists``, one each, with the same keys."""

    class Plain:
        def __init__(self) -> None:
            self.inner = InMemoryCacheStorage()
            self.exists_calls = 0

        def __getattr__(self, name: str) -> object:
            if name == "exists_many":
                raise AttributeError(name)
            return getattr(self.inner, name)

        async def exists(self, id: str) -> bool:
            self.exists_calls += 1
            return await self.inner.exists(id)

    st = Plain()
    m = KeyedCacheManager(secrets.token_hex(8), st, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        await save(m, root(dgst("a")), "a")
        st.exists_calls = 0
        got = await m.query_many([([], 0, dgst("a"), 0), ([], 0, dgst("x"), 0)])
        assert [len(k) for k in got] == [1, 0]
        assert st.exists_calls == 2
    finally:
        await m.close()


async def test_a_closed_storage_refuses_a_batch_of_root_keys(tmp_path: Path) -> None:
    for storage in (InMemoryCacheStorage(), await SQLiteCacheStorage.open(tmp_path / "c.db")):
        await storage.close()
        with pytest.raises(anyio.ClosedResourceError):
            await storage.exists_many(["x"])
        with pytest.raises(anyio.ClosedResourceError):
            await storage.exists_many([])
