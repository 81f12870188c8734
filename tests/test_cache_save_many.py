"""Batched saves (``KeyedCacheManager.save_many`` over a result storage's
``save_many`` and a key storage's ``walk_links_many`` and ``add_many``), which
the cold path uses for the results one pass of a build finished together: the
same IDs, results and links as one ``save`` per key, on the in-memory and the
SQLite key storage, in one call to each storage; a failed batch releases what
it took and keeps what it stored under a key; the in-memory cache's bound is
kept once per batch; the combined cache saves a batch into its main cache."""

from __future__ import annotations

import random
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from solver._cache import CacheInfoLink, CacheKey, CacheKeyWithSelector, ExportableCacheKey
from solver._result import Result
from solver.cache._manager import CombinedCacheManager, InMemoryCacheManager, KeyedCacheManager
from solver.cache._sqlite import SQLiteCacheStorage
from solver.cache._storage import (
    CacheKeyStorage,
    CacheResult,
    InMemoryCacheStorage,
    InMemoryResultStorage,
)
from solver.testing import CountingResult, HandleTracker
from tests.cache_support import CountingStorage
from tests.test_cache_manager import dgst, exp, key_with, load_value, root, save

pytestmark = pytest.mark.anyio


class CountingResults(InMemoryResultStorage):
    """Counts ``save`` and ``save_many`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.saves = 0
        self.batches = 0

    async def save(self, result: Result, created_at: float) -> CacheResult:
        self.saves += 1
        return await super().save(result, created_at)

    async def save_many(self, saves: Sequence[tuple[Result, float]]) -> list[CacheResult]:
        self.batches += 1
        return await super().save_many(saves)


async def _open(kind: str, path: Path) -> CacheKeyStorage:
    if kind == "memory":
        return InMemoryCacheStorage()
    return await SQLiteCacheStorage.open(path)


@pytest.fixture(params=["memory", "sqlite"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CountingStorage]:
    inner = await _open(request.param, tmp_path / "cache.db")
    yield CountingStorage(inner)
    await inner.close()  # idempotent: the manager closed it already


def _value(i: int) -> CountingResult:
    # one result ID per value, so that two managers store the same IDs
    return CountingResult(f"result-{i}", f"v{i}")


def _random_layers(seed: int) -> list[list[tuple[str, list[list[tuple[int, str | None]]]]]]:
    """Layers of keys, each ``(digest, inputs)``: an input is a list of
    alternatives, each ``(index of a key of an earlier layer, selector)``. Some
    keys of a layer are equal (same digest and inputs) on purpose."""
    rng = random.Random(seed)
    layers: list[list[tuple[str, list[list[tuple[int, str | None]]]]]] = []
    count = 0
    for depth in range(5):
        layer: list[tuple[str, list[list[tuple[int, str | None]]]]] = []
        for _ in range(rng.randrange(2, 7)):
            if depth == 0 or rng.random() < 0.15:
                layer.append((dgst(f"root{rng.randrange(4)}"), []))
            else:
                inputs = [
                    [
                        (rng.randrange(count), rng.choice([None, None, "/sel"]))
                        for _ in range(rng.randrange(1, 3))
                    ]
                    for _ in range(rng.randrange(1, 3))
                ]
                layer.append((dgst(f"op{rng.randrange(3)}"), inputs))
            if layer and rng.random() < 0.2:
                layer.append(layer[-1])  # an equal key in the same batch
        count += len(layer)
        layers.append(layer)
    return layers


async def _build(
    m: KeyedCacheManager,
    layers: list[list[tuple[str, list[list[tuple[int, str | None]]]]]],
    batched: bool,
) -> list[ExportableCacheKey]:
    """Save every key of ``layers``, a layer per ``save_many`` or one ``save``
    each; the key of entry ``i`` is built on the saved keys of its inputs."""
    saved: list[ExportableCacheKey] = []
    n = 0
    for layer in layers:
        saves: list[tuple[CacheKey, Result, float]] = []
        for digest, inputs in layer:
            deps = [
                [CacheKeyWithSelector(saved[i], selector) for i, selector in alternatives]
                for alternatives in inputs
            ]
            saves.append((CacheKey(digest, "", 0, deps), _value(n), 1.0 + n))
            n += 1
        if batched:
            saved.extend(await m.save_many(saves))
        else:
            saved.extend([await m.save(*s) for s in saves])
        for _, res, _ in saves:
            await res.release()
    return saved


async def _shape(m: KeyedCacheManager, keys: list[ExportableCacheKey]) -> object:
    """What a reader of the cache sees, without the random IDs: which saved keys
    share an ID, each key's records, and what each key's query finds."""
    ids = [await m.storage_id(k.key) for k in keys]
    names = {id: f"k{ids.index(id)}" for id in ids}
    records = [sorted(r.id for r in await m.records(k.key)) for k in keys]
    found = []
    for k in keys:
        key = k.key
        answers = []
        for i, alternatives in enumerate(key.deps):
            got = await m.query(alternatives, i, key.digest, key.output)
            answers.append(sorted(names.get(g.ids[m], "?") for g in got))
        found.append(answers)
    return [names[i] for i in ids], records, found


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_batch_leaves_what_one_save_each_leaves(
    kind: str, seed: int, tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """Random layered keys (alternatives, selectors, equal keys in one batch,
    roots saved again), saved a layer per batch and one key at a time: the same
    keys share IDs, every key has the same records, and every query finds the
    same keys."""
    layers = _random_layers(seed)
    shapes = []
    for batched in (False, True):
        st = await _open(kind, tmp_path / f"{batched}.db")
        m = KeyedCacheManager(secrets.token_hex(8), st, InMemoryResultStorage())
        try:
            keys = await _build(m, layers, batched)
            shapes.append(await _shape(m, keys))
            if isinstance(st, InMemoryCacheStorage):
                st._check(leads_to_results=True)
            else:
                st._check()
        finally:
            await m.close()
    assert shapes[0] == shapes[1]


async def test_a_batch_over_saved_keys_is_one_call_to_each_storage(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    """Three keys over two saved roots, one of them on a selector: one
    ``save_many`` of the results, one ``walk_links_many``, one ``add_many``, and
    no call one key at a time; then each key is found from its inputs and loads
    its value."""
    results = CountingResults()
    m = KeyedCacheManager(secrets.token_hex(8), storage, results)  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        b = await save(m, root(dgst("b")), "b")
        storage.calls.clear()
        results.saves = 0
        values = [CountingResult(secrets.token_hex(8), f"v{i}") for i in range(3)]
        keys = [
            key_with(dgst("c"), 0, a),
            key_with(dgst("d"), 0, a, b),
            CacheKey(dgst("e"), "", 0, [[CacheKeyWithSelector(b, "/x")]]),
        ]
        saved = await m.save_many([(k, v, 2.0) for k, v in zip(keys, values, strict=True)])
        assert storage.calls == {"walk_links_many": 1, "add_many": 1}
        assert (results.batches, results.saves) == (1, 0)
        assert [s.key for s in saved] == keys
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            assert v.live_count == 2  # the caller's and the cache's
            alternatives = k.deps[0]
            (found,) = await m.query(alternatives, 0, k.digest, 0)
            (record,) = await m.records(found)
            assert await load_value(m, record) == f"v{i}"
            await v.release()
    finally:
        await m.close()


async def test_keys_built_on_keys_of_the_same_batch_are_saved_one_at_a_time(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    """``d`` is built on ``c``, saved in the same batch (its ID is not known before
    the batch): the batch is one save each, with the same outcome."""
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        a = await save(m, root(dgst("a")), "a")
        c = key_with(dgst("c"), 0, a)
        d = key_with(dgst("d"), 0, exp(c))
        vc, vd = CountingResult("rc", "c"), CountingResult("rd", "d")
        storage.calls.clear()
        await m.save_many([(c, vc, 1.0), (d, vd, 1.0)])
        assert "add_many" not in storage.calls
        assert storage.calls["add_result"] == 2
        (found_c,) = await m.query([CacheKeyWithSelector(a)], 0, dgst("c"), 0)
        (found_d,) = await m.query([CacheKeyWithSelector(exp(found_c))], 0, dgst("d"), 0)
        (record,) = await m.records(found_d)
        assert await load_value(m, record) == "d"
        await vc.release()
        await vd.release()
    finally:
        await m.close()


async def test_an_empty_batch_calls_nothing(
    storage: CountingStorage, handle_tracker: HandleTracker
) -> None:
    m = KeyedCacheManager(secrets.token_hex(8), storage, InMemoryResultStorage())  # type: ignore[arg-type]
    try:
        assert await m.save_many([]) == []
        assert storage.calls == {}
        await storage.inner.add_many([], [])  # type: ignore[attr-defined]
    finally:
        await m.close()


async def test_a_failed_batch_releases_what_it_took_and_keeps_what_it_stored(
    handle_tracker: HandleTracker,
) -> None:
    """The key storage fails to store the batch: every result the batch took is
    released again (the caller's handles are untouched), the keys saved before
    are still found, and the error is the storage's."""

    class BrokenStorage(InMemoryCacheStorage):
        async def add_many(
            self,
            results: Sequence[tuple[str, CacheResult]],
            links: Sequence[tuple[str, CacheInfoLink, str]],
        ) -> None:
            raise OSError("disk full")

    m = KeyedCacheManager("broken", BrokenStorage(), InMemoryResultStorage())
    try:
        a = await save(m, root(dgst("a")), "a")
        values = [CountingResult(f"r{i}", f"v{i}") for i in range(3)]
        with pytest.raises(OSError, match="disk full"):
            await m.save_many(
                [(key_with(dgst(f"k{i}"), 0, a), v, 1.0) for i, v in enumerate(values)]
            )
        for v in values:
            assert v.live_count == 1
            assert not await m.results.exists(v.id)
            await v.release()
        (record,) = await m.records(a.key)
        assert await load_value(m, record) == "a"
    finally:
        await m.close()


async def test_a_storage_without_batched_calls_is_called_one_key_at_a_time(
    handle_tracker: HandleTracker,
) -> None:
    """Storages of the protocols alone (no ``save_many``, ``walk_links_many`` or
    ``add_many``) store the same batch through their one-key methods."""

    class Plain:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            if name in ("walk_links_many", "add_many", "save_many"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    results = Plain(InMemoryResultStorage())
    m = KeyedCacheManager(
        "plain", Plain(InMemoryCacheStorage()), results  # type: ignore[arg-type]
    )
    try:
        a = await save(m, root(dgst("a")), "a")
        v = CountingResult("rc", "c")
        (saved,) = await m.save_many([(key_with(dgst("c"), 0, a), v, 1.0)])
        (found,) = await m.query([CacheKeyWithSelector(a)], 0, dgst("c"), 0)
        assert found.ids[m] == saved.key.ids[m]
        assert v.live_count == 2
        await v.release()
    finally:
        await m.close()


async def test_the_in_memory_bound_is_kept_once_per_batch(handle_tracker: HandleTracker) -> None:
    """A cache of 10 holding 9 saves a batch of 3 over them: it evicts once, the
    2 least recently used results, both from before the batch (down to 99 % of
    the bound, here 10), never one of the batch; every handle it released,
    once."""
    m = InMemoryCacheManager(max_results=10)
    try:
        base = await save(m, root(dgst("base")), "base")
        old = [await save(m, key_with(dgst(f"old{i}"), 0, base), f"old{i}") for i in range(8)]
        assert m.result_count == 9
        values = [CountingResult(f"new{i}", f"new{i}") for i in range(3)]
        await m.save_many(
            [(key_with(dgst(f"new{i}"), 0, base), v, 1.0) for i, v in enumerate(values)]
        )
        assert m.result_count == 10
        for v in values:
            assert await m.results.exists(v.id)
            await v.release()
        # the two least recently used went: base's own result and old0
        assert not await m.records(base.key)
        assert not await m.records(old[0].key)
        assert await m.records(old[1].key)
        m._check()
    finally:
        await m.close()


async def test_the_combined_cache_saves_a_batch_into_its_main_cache(
    handle_tracker: HandleTracker,
) -> None:
    """Into the main cache's ``save_many``; a main cache without one is saved
    into one key at a time; the other members get nothing."""

    class OneAtATime:
        def __init__(self) -> None:
            self.inner = InMemoryCacheManager()
            self.saves = 0

        def __getattr__(self, name: str) -> object:
            if name == "save_many":
                raise AttributeError(name)
            return getattr(self.inner, name)

        async def save(self, key: CacheKey, result: Result, at: float) -> ExportableCacheKey:
            self.saves += 1
            return await self.inner.save(key, result, at)

    other = InMemoryCacheManager()
    for main in (InMemoryCacheManager(), OneAtATime()):
        combined = CombinedCacheManager([main, other], main)  # type: ignore[list-item]
        values = [CountingResult(secrets.token_hex(4), f"v{i}") for i in range(2)]
        saved = await combined.save_many(
            [(root(dgst(f"r{i}")), v, 1.0) for i, v in enumerate(values)]
        )
        assert [s.key.digest for s in saved] == [dgst("r0"), dgst("r1")]
        target = main.inner if isinstance(main, OneAtATime) else main
        assert target.result_count == 2
        assert other.result_count == 0
        if isinstance(main, OneAtATime):
            assert main.saves == 2
        for v in values:
            await v.release()
        await target.close()
    await other.close()


async def test_a_batch_never_checkpoints_in_memory(handle_tracker: HandleTracker) -> None:
    """As ``save``: the in-memory manager's batch runs to its end inside a
    cancelled scope (it has no cancel point)."""
    m = InMemoryCacheManager()
    try:
        a = await save(m, root(dgst("a")), "a")
        v = CountingResult("rc", "c")
        with anyio.CancelScope() as scope:
            scope.cancel()
            (saved,) = await m.save_many([(key_with(dgst("c"), 0, a), v, 1.0)])
        assert not scope.cancelled_caught
        assert await m.records(saved.key)
        await v.release()
    finally:
        await m.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_resolved_key_and_an_equal_new_key_in_one_batch_share_its_id(
    kind: str, tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A key whose ID was resolved but never saved (no link leads to it yet) is
    saved in a batch with a new, equal key object after it: the new key gets
    its ID, as a second ``save`` would give it (through the links the first
    adds), and both results are records of that one key."""
    st = await _open(kind, tmp_path / "cache.db")
    m = KeyedCacheManager(secrets.token_hex(8), st, InMemoryResultStorage())
    try:
        a = await save(m, root(dgst("a")), "a")
        c = key_with(dgst("c"), 0, a)
        await m.storage_id(c)  # minted and memoized, nothing stored
        again = key_with(dgst("c"), 0, a)  # equal to c, no ID yet
        v1, v2 = CountingResult("r1", "v1"), CountingResult("r2", "v2")
        await m.save_many([(c, v1, 2.0), (again, v2, 3.0)])
        assert again.ids[m] == c.ids[m]
        assert len(await m.records(again)) == 2
        await v1.release()
        await v2.release()
    finally:
        await m.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_one_key_object_twice_in_a_batch_leaves_the_others_their_ids(
    kind: str, tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """The same key object saved twice in one batch (its first save memoizes its
    ID before the second is reached), then another key: each key gets the ID
    one save after the other gives it, so x's result is a record of x, not of
    k. (The IDs were read by position in the batch's link reads; a key whose
    ID appeared meanwhile was skipped without its reads, and the keys after it
    read their neighbours'.)"""
    st = await _open(kind, tmp_path / "cache.db")
    m = KeyedCacheManager(secrets.token_hex(8), st, InMemoryResultStorage())
    try:
        a = await save(m, root(dgst("a")), "a")
        b = await save(m, root(dgst("b")), "b")
        k = await save(m, key_with(dgst("k"), 0, a), "k")
        x = await save(m, key_with(dgst("x"), 0, b), "x")
        k_id, x_id = k.key.ids[m], x.key.ids[m]
        assert k_id != x_id
        k2 = key_with(dgst("k"), 0, a)  # equal to k, no ID yet
        x2 = key_with(dgst("x"), 0, b)
        values = [CountingResult(f"r{i}", f"v{i}") for i in range(3)]
        try:
            await m.save_many([(k2, values[0], 2.0), (k2, values[1], 3.0), (x2, values[2], 4.0)])
            assert (k2.ids[m], x2.ids[m]) == (k_id, x_id)
            assert len(await m.records(k2)) == 3  # k, then its two new results
            assert len(await m.records(x2)) == 2  # x, then its new one
        finally:
            for v in values:
                await v.release()
    finally:
        await m.close()
