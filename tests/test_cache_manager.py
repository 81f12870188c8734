"""Cache managers: BuildKit's cache_test.go, ported with the same asserted values, and
the combined (main + imported) cache."""

from __future__ import annotations

import itertools
import secrets

import anyio
import pytest

from solver._cache import (
    CacheKey,
    CacheKeyWithSelector,
    CacheManager,
    CacheRecord,
    ExportableCacheKey,
)
from solver._digest import digest_of
from solver._errors import SolveError
from solver._result import Result
from solver.cache._manager import (
    CombinedCacheManager,
    InMemoryCacheManager,
    KeyedCacheManager,
    best_record,
)
from solver.cache._storage import (
    CacheResult,
    InMemoryCacheStorage,
    InMemoryResultStorage,
    NotFoundError,
)
from solver.testing import CountingResult, HandleTracker

pytestmark = pytest.mark.anyio


def dgst(s: str) -> str:
    return digest_of(s.encode())


def result(value: str) -> CountingResult:
    """A handle on a fresh value with a random ID, like cache_test.go's testResult."""
    return CountingResult(secrets.token_hex(8), value)


def root(digest: str, output: int = 0) -> CacheKey:
    return CacheKey(digest, "", output)


def dep_keys(*keys: ExportableCacheKey) -> list[CacheKeyWithSelector]:
    return [CacheKeyWithSelector(k) for k in keys]


def key_with(digest: str, output: int, *deps: ExportableCacheKey) -> CacheKey:
    """A key whose input i has the one alternative deps[i]."""
    return CacheKey(digest, "", output, [[CacheKeyWithSelector(d)] for d in deps])


def key_with_deps(digest: str, output: int, deps: list[list[CacheKeyWithSelector]]) -> CacheKey:
    return CacheKey(digest, "", output, deps)


def exp(key: CacheKey) -> ExportableCacheKey:
    return ExportableCacheKey(key)


async def save(m: CacheManager, key: CacheKey, value: str) -> ExportableCacheKey:
    """Save a fresh result and drop the test's own handle (the cache keeps one)."""
    res = result(value)
    try:
        return await m.save(key, res, anyio.current_time())
    finally:
        await res.release()


async def load_value(m: CacheManager, record: CacheRecord) -> object:
    res = await m.load(record)
    try:
        return res.sys
    finally:
        await res.release()


def check(m: KeyedCacheManager) -> None:
    assert isinstance(m.storage, InMemoryCacheStorage)
    m.storage._check()


# -- cache_test.go --------------------------------------------------------------------


async def test_in_memory_cache(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager()
    assert isinstance(m, CacheManager)

    cache_foo = await save(m, root(dgst("foo")), "result0")

    keys = await m.query([], 0, dgst("foo"), 0)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 1
    assert await load_value(m, matches[0]) == "result0"

    # another record
    cache_bar = await save(m, root(dgst("bar")), "result1")

    keys = await m.query([], 0, dgst("bar"), 0)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 1
    assert await load_value(m, matches[0]) == "result1"

    # invalid request
    assert await m.query([], 0, dgst("baz"), 0) == []

    # second level
    cache_baz = await save(m, key_with(dgst("baz"), 1, cache_foo, cache_bar), "result2")

    assert await m.query([], 0, dgst("baz"), 0) == []
    assert await m.query(dep_keys(cache_foo), 0, dgst("baz"), 0) == []
    assert await m.query(dep_keys(cache_foo), 1, dgst("baz"), 1) == []

    keys = await m.query(dep_keys(cache_foo), 0, dgst("baz"), 1)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 1
    assert await load_value(m, matches[0]) == "result2"

    keys2 = await m.query(dep_keys(cache_bar), 1, dgst("baz"), 1)
    assert len(keys2) == 1
    assert keys[0].id == keys2[0].id

    await save(m, key_with(dgst("baz"), 1, cache_foo), "result3")

    keys = await m.query(dep_keys(cache_foo), 0, dgst("baz"), 1)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 2

    k = key_with_deps(
        dgst("bax"),
        0,
        [
            [CacheKeyWithSelector(cache_foo), CacheKeyWithSelector(cache_baz)],
            [CacheKeyWithSelector(cache_bar)],
        ],
    )
    await save(m, k, "result4")

    # foo, bar and baz all lead to result4
    keys = await m.query(dep_keys(cache_foo), 0, dgst("bax"), 0)
    assert len(keys) == 1
    id = keys[0].id

    keys = await m.query(dep_keys(cache_bar), 1, dgst("bax"), 0)
    assert len(keys) == 1
    assert keys[0].id == id

    keys = await m.query(dep_keys(cache_baz), 0, dgst("bax"), 0)
    assert len(keys) == 1
    assert keys[0].id == id

    check(m)
    await m.close()


async def test_in_memory_cache_selector(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager()

    cache_foo = await save(m, root(dgst("foo")), "result0")
    await save(
        m,
        key_with_deps(dgst("bar"), 0, [[CacheKeyWithSelector(cache_foo, dgst("sel0"))]]),
        "result1",
    )

    assert await m.query(dep_keys(cache_foo), 0, dgst("bar"), 0) == []
    invalid = [CacheKeyWithSelector(cache_foo, "sel-invalid")]
    assert await m.query(invalid, 0, dgst("bar"), 0) == []

    keys = await m.query([CacheKeyWithSelector(cache_foo, dgst("sel0"))], 0, dgst("bar"), 0)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 1
    assert await load_value(m, matches[0]) == "result1"

    check(m)
    await m.close()


async def test_in_memory_cache_selector_nested(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager()

    cache_foo = await save(m, root(dgst("foo")), "result0")
    await save(
        m,
        key_with_deps(
            dgst("bar"),
            0,
            [
                [
                    CacheKeyWithSelector(cache_foo, dgst("sel0")),
                    CacheKeyWithSelector(exp(root(dgst("second")))),
                ]
            ],
        ),
        "result1",
    )

    keys = await m.query([CacheKeyWithSelector(cache_foo, dgst("sel0"))], 0, dgst("bar"), 0)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 1
    assert await load_value(m, matches[0]) == "result1"

    assert await m.query(dep_keys(cache_foo), 0, dgst("bar"), 0) == []
    wrong = [CacheKeyWithSelector(cache_foo, dgst("bar"))]
    assert await m.query(wrong, 0, dgst("bar"), 0) == []

    keys = await m.query(dep_keys(exp(root(dgst("second")))), 0, dgst("bar"), 0)
    assert len(keys) == 1
    matches = await m.records(keys[0])
    assert len(matches) == 1
    assert await load_value(m, matches[0]) == "result1"

    keys = await m.query(dep_keys(exp(root(dgst("second")))), 0, dgst("bar"), 0)
    assert len(keys) == 1

    check(m)
    await m.close()


async def test_in_memory_cache_release_parent(handle_tracker: HandleTracker) -> None:
    storage = InMemoryCacheStorage()
    results = InMemoryResultStorage()
    m = await KeyedCacheManager.open(secrets.token_hex(16), storage, results)

    res0 = result("result0")
    cache_foo = await m.save(root(dgst("foo")), res0, 1.0)
    res1 = result("result1")
    await m.save(key_with(dgst("bar"), 0, cache_foo), res1, 2.0)

    keys = await m.query([], 0, dgst("foo"), 0)
    assert len(keys) == 1
    assert len(await m.records(keys[0])) == 1

    await storage.release(res0.id)
    storage._check()

    # foo becomes unloadable
    keys = await m.query([], 0, dgst("foo"), 0)
    assert len(keys) == 1
    assert await m.records(keys[0]) == []

    keys = await m.query(dep_keys(exp(keys[0])), 0, dgst("bar"), 0)
    assert len(keys) == 1
    assert len(await m.records(keys[0])) == 1

    # releasing bar releases both foo and bar
    await storage.release(res1.id)
    storage._check()

    assert await m.query([], 0, dgst("foo"), 0) == []
    assert await storage.walk() == []

    await res0.release()
    await res1.release()
    await m.close()


async def test_in_memory_cache_restore_offline_deletion(handle_tracker: HandleTracker) -> None:
    """A result deleted while no manager ran is forgotten when the next one opens."""
    storage = InMemoryCacheStorage()
    results = InMemoryResultStorage()
    m = await KeyedCacheManager.open(secrets.token_hex(16), storage, results)

    res0 = result("result0")
    cache_foo = await m.save(root(dgst("foo")), res0, 1.0)
    res1 = result("result1")
    await m.save(key_with(dgst("bar"), 0, cache_foo), res1, 2.0)

    results2 = InMemoryResultStorage()
    await results2.save(res1, 3.0)  # only bar survives

    m = await KeyedCacheManager.open(secrets.token_hex(16), storage, results2)
    storage._check()

    keys = await m.query([], 0, dgst("foo"), 0)
    assert len(keys) == 1
    assert await m.records(keys[0]) == []

    keys = await m.query(dep_keys(exp(keys[0])), 0, dgst("bar"), 0)
    assert len(keys) == 1
    assert len(await m.records(keys[0])) == 1

    await res0.release()
    await res1.release()
    await results.close()
    await m.close()


async def test_carry_over_from_sublink(handle_tracker: HandleTracker) -> None:
    m = await KeyedCacheManager.open(
        secrets.token_hex(16), InMemoryCacheStorage(), InMemoryResultStorage()
    )

    cache_foo = await save(m, root(dgst("foo")), "resultFoo")
    await save(
        m,
        key_with_deps(
            dgst("res"),
            0,
            [
                [
                    CacheKeyWithSelector(cache_foo, dgst("sel0")),
                    CacheKeyWithSelector(exp(root(dgst("content0")))),
                ]
            ],
        ),
        "result0",
    )
    cache_bar = await save(m, root(dgst("bar")), "resultBar")

    keys = await m.query(
        [
            CacheKeyWithSelector(cache_bar, dgst("sel0")),
            CacheKeyWithSelector(exp(root(dgst("content0")))),
        ],
        0,
        dgst("res"),
        0,
    )
    assert len(keys) == 1

    # the query above linked bar+sel0 to the result found through content0
    keys = await m.query([CacheKeyWithSelector(cache_bar, dgst("sel0"))], 0, dgst("res"), 0)
    assert len(keys) == 1

    check(m)
    await m.close()


# -- KeyedCacheManager details -------------------------------------------------------


async def test_query_returns_keys_resolved_in_this_manager(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager()
    cache_foo = await save(m, root(dgst("foo")), "foo")
    saved = await save(m, key_with(dgst("bar"), 0, cache_foo), "bar")
    stored_id = saved.key.ids[m]

    (root_key,) = await m.query([], 0, dgst("foo"), 0)
    assert root_key.id == cache_foo.id
    assert root_key.ids == {m: cache_foo.id}

    (child,) = await m.query(dep_keys(cache_foo), 0, dgst("bar"), 0)
    assert child.id == stored_id
    assert child.ids == {m: stored_id}
    assert child.digest == dgst("bar")
    assert child.output == 0

    # an equal key built afresh resolves to the same stored ID through the links
    again = key_with(dgst("bar"), 0, exp(root(dgst("foo"))))
    (record,) = await m.records(again)
    assert again.ids[m] == stored_id
    assert await load_value(m, record) == "bar"
    await m.close()


async def test_deep_chain_of_new_keys(handle_tracker: HandleTracker) -> None:
    """Resolving and linking a chain longer than the recursion limit works."""
    m = InMemoryCacheManager()
    key = root(dgst("base"))
    for i in range(2000):
        key = key_with(dgst(f"step{i}"), 0, exp(key))
    await save(m, key, "top")
    check(m)

    # every step is now reachable from the one below
    (found,) = await m.query(dep_keys(exp(root(dgst("base")))), 0, dgst("step0"), 0)
    for i in range(1, 2000):
        (found,) = await m.query(dep_keys(exp(found)), 0, dgst(f"step{i}"), 0)
    (record,) = await m.records(found)
    assert await load_value(m, record) == "top"
    await m.close()


async def test_save_keeps_one_handle_per_result_and_close_releases_it(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager()
    res0 = result("v0")
    res1 = result("v1")
    await m.save(root(dgst("a")), res0, 1.0)
    await m.save(root(dgst("b")), res0, 2.0)  # the same result under a second key
    await m.save(root(dgst("c")), res1, 3.0)
    assert res0.live_count == 2  # the test's handle and the cache's one
    assert res1.live_count == 2
    await res0.release()
    await res1.release()

    (key,) = await m.query([], 0, dgst("b"), 0)
    (record,) = await m.records(key)
    loaded = await m.load(record)
    assert loaded.sys == "v0"
    assert res0.live_count == 2  # the loaded handle is the caller's own
    await loaded.release()

    await m.close()
    assert (res0.live_count, res0.release_count) == (0, 3)
    assert (res1.live_count, res1.release_count) == (0, 2)
    await m.close()  # idempotent: nothing is released twice
    assert (res0.release_count, res1.release_count) == (3, 2)
    with pytest.raises(anyio.ClosedResourceError):
        await m.query([], 0, dgst("a"), 0)


async def test_release_forgets_the_result_everywhere(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager()
    res = result("v")
    cache_a = await m.save(root(dgst("a")), res, 1.0)
    await m.save(key_with(dgst("b"), 0, cache_a), res, 2.0)
    (key,) = await m.query([], 0, dgst("a"), 0)
    (record,) = await m.records(key)

    await m.release(res.id)
    check(m)
    assert res.live_count == 1  # only the test's handle is left
    assert await m.query([], 0, dgst("a"), 0) == []
    with pytest.raises(NotFoundError):
        await m.load(record)
    await res.release()
    await m.close()


async def test_records_drop_results_the_result_storage_lost(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager()
    res0, res1 = result("v0"), result("v1")
    await m.save(root(dgst("a")), res0, 1.0)
    await m.save(root(dgst("a")), res1, 2.0)
    await m.results.release(res0.id)  # as a prune of the worker would

    (key,) = await m.query([], 0, dgst("a"), 0)
    records = await m.records(key)
    assert [r.id for r in records] == [res1.id]
    assert [r.created_at for r in records] == [2.0]
    assert records[0].manager is m
    assert records[0].priority == 0
    # the stale result was released from the key storage on the way
    assert await m.storage.walk_ids_by_result(res0.id) == []
    check(m)

    await res0.release()
    await res1.release()
    await m.close()


async def test_release_unreferenced(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager()
    res0, res1 = result("v0"), result("v1")
    cache_a = await m.save(root(dgst("a")), res0, 1.0)
    await m.save(key_with(dgst("b"), 0, cache_a), res1, 2.0)
    await m.results.release(res0.id)
    await m.results.release(res1.id)

    await m.release_unreferenced()
    check(m)
    assert await m.storage.walk() == []

    await res0.release()
    await res1.release()
    await m.close()


async def test_failed_save_releases_the_handle_it_took(handle_tracker: HandleTracker) -> None:
    class BrokenStorage(InMemoryCacheStorage):
        async def add_result(self, id: str, result: CacheResult) -> None:
            raise OSError("disk full")

    m = KeyedCacheManager("broken", BrokenStorage(), InMemoryResultStorage())
    res = result("v")
    with pytest.raises(OSError, match="disk full"):
        await m.save(root(dgst("a")), res, 1.0)
    assert res.live_count == 1
    assert not await m.results.exists(res.id)
    await res.release()
    await m.close()


async def test_in_memory_manager_lookups_never_checkpoint(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager()
    res = result("v")
    with anyio.CancelScope() as scope:
        scope.cancel()
        cache_a = await m.save(root(dgst("a")), res, 1.0)
        await m.save(key_with(dgst("b"), 0, cache_a), res, 1.0)
        (key,) = await m.query(dep_keys(cache_a), 0, dgst("b"), 0)
        (record,) = await m.records(key)
        loaded = await m.load(record)
    assert not scope.cancelled_caught
    await loaded.release()
    await res.release()
    await m.close()


def test_in_memory_manager_ids() -> None:
    a, b = InMemoryCacheManager(), InMemoryCacheManager()
    assert a.id != b.id
    assert InMemoryCacheManager("named").id == "named"
    assert "named" in repr(InMemoryCacheManager("named"))


# -- CombinedCacheManager ---------------------------------------------------------------


async def test_combined_id_and_membership() -> None:
    main, imp = InMemoryCacheManager("main"), InMemoryCacheManager("import")
    combined = CombinedCacheManager([main, imp], main)
    assert isinstance(combined, CacheManager)
    assert combined.id == digest_of(b"main,import")
    assert combined.main is main
    assert combined.managers == (main, imp)
    with pytest.raises(ValueError, match="main cache"):
        CombinedCacheManager([imp], main)
    await main.close()
    await imp.close()


async def test_combined_query_prefers_main_key(handle_tracker: HandleTracker) -> None:
    main, imp = InMemoryCacheManager("main"), InMemoryCacheManager("import")
    combined = CombinedCacheManager([imp, main], main)
    await save(imp, root(dgst("foo")), "imported")
    await save(main, root(dgst("foo")), "local")
    await save(imp, root(dgst("only-imported")), "imported")

    (key,) = await combined.query([], 0, dgst("foo"), 0)
    assert set(key.ids) == {main}
    (key,) = await combined.query([], 0, dgst("only-imported"), 0)
    assert set(key.ids) == {imp}
    assert await combined.query([], 0, dgst("nothing"), 0) == []

    await main.close()
    await imp.close()


async def test_combined_records_give_main_priority(handle_tracker: HandleTracker) -> None:
    main, imp = InMemoryCacheManager("main"), InMemoryCacheManager("import")
    combined = CombinedCacheManager([main, imp], main)
    key = root(dgst("foo"))
    local, imported, shared = result("local"), result("imported"), result("shared")
    await main.save(key, local, 10.0)
    await imp.save(key, imported, 10.0)
    await main.save(key, shared, 5.0)
    await imp.save(key, shared, 5.0)

    records = {r.id: r for r in await combined.records(key)}
    assert set(records) == {local.id, imported.id, shared.id}
    assert records[local.id].priority == 1
    assert records[local.id].manager is main
    assert records[imported.id].priority == 0
    assert records[imported.id].manager is imp
    # a result both know is reported once, as main's
    assert records[shared.id].manager is main
    assert records[shared.id].priority == 1

    # equally new: the imported (priority 0) record comes first, as in BuildKit
    assert best_record(records.values()) is records[imported.id]

    # a key no member has resolved has no records
    assert await combined.records(root(dgst("foo"))) == []

    for res in (local, imported, shared):
        await res.release()
    await main.close()
    await imp.close()


async def test_combined_load_makes_an_import_local(handle_tracker: HandleTracker) -> None:
    main, imp = InMemoryCacheManager("main"), InMemoryCacheManager("import")
    combined = CombinedCacheManager([main, imp], main)
    base = await save(imp, root(dgst("base")), "base")
    await save(imp, key_with(dgst("step"), 0, base), "step")

    (base_key,) = await combined.query([], 0, dgst("base"), 0)
    (found,) = await combined.query(dep_keys(exp(base_key)), 0, dgst("step"), 0)
    # as the solver's edges do: the key found, with the input keys as its deps
    key = found.clone()
    key.deps = [[CacheKeyWithSelector(exp(base_key))]]
    (record,) = await combined.records(key)
    assert record.manager is imp
    assert record.priority == 0
    assert await main.query([], 0, dgst("base"), 0) == []

    loaded = await combined.load(record)
    assert loaded.sys == "step"

    # the step result is now in main, under a key reached from the base key
    (local_key,) = await main.query(dep_keys(exp(root(dgst("base")))), 0, dgst("step"), 0)
    (local_record,) = await main.records(local_key)
    assert local_record.created_at == record.created_at
    assert await load_value(main, local_record) == "step"
    # the base key is linked (persistent) in main, though no result was copied for it
    (main_base,) = await main.query([], 0, dgst("base"), 0)
    assert await main.records(main_base) == []
    check(main)

    # the caller owns the loaded handle; main keeps a handle of its own
    assert isinstance(loaded, CountingResult)
    assert loaded.live_count == 3  # imp's, main's and the caller's
    await loaded.release()
    await imp.close()
    assert loaded.live_count == 1
    await main.close()
    assert loaded.live_count == 0


async def test_combined_load_from_main_is_not_saved_again(
    handle_tracker: HandleTracker,
) -> None:
    main = InMemoryCacheManager("main")
    combined = CombinedCacheManager([main], main)
    await save(main, root(dgst("foo")), "local")
    (key,) = await combined.query([], 0, dgst("foo"), 0)
    (record,) = await combined.records(key)
    assert record.priority == 1
    loaded = await combined.load(record)
    assert isinstance(loaded, CountingResult)
    assert loaded.live_count == 2
    await loaded.release()
    await main.close()


async def test_combined_load_of_deleted_cache(handle_tracker: HandleTracker) -> None:
    main, imp = InMemoryCacheManager("main"), InMemoryCacheManager("import")
    combined = CombinedCacheManager([main, imp], main)
    await save(imp, root(dgst("foo")), "imported")
    (key,) = await combined.query([], 0, dgst("foo"), 0)
    (record,) = await combined.records(key)
    await imp.release(record.id)

    with pytest.raises(SolveError, match="failed to load deleted cache") as info:
        await combined.load(record)
    assert isinstance(info.value.__cause__, NotFoundError)
    assert await main.query([], 0, dgst("foo"), 0) == []
    await main.close()
    await imp.close()


async def test_combined_load_rejects_records_of_other_managers(
    handle_tracker: HandleTracker,
) -> None:
    main, other = InMemoryCacheManager("main"), InMemoryCacheManager("other")
    combined = CombinedCacheManager([main], main)
    await save(other, root(dgst("foo")), "v")
    (key,) = await other.query([], 0, dgst("foo"), 0)
    (record,) = await other.records(key)
    with pytest.raises(ValueError, match="not a member"):
        await combined.load(record)
    await main.close()
    await other.close()


async def test_combined_asks_members_with_equal_ids(handle_tracker: HandleTracker) -> None:
    """Telling caches apart by ID is the solver's job: every member is asked."""
    first, second = InMemoryCacheManager("same"), InMemoryCacheManager("same")
    combined = CombinedCacheManager([first, second], first)
    assert combined.id == digest_of(b"same,same")
    await save(second, root(dgst("foo")), "v")
    (key,) = await combined.query([], 0, dgst("foo"), 0)
    (record,) = await combined.records(key)
    assert record.manager is second
    await first.close()
    await second.close()


async def test_combined_save_release_and_close(handle_tracker: HandleTracker) -> None:
    main, imp = InMemoryCacheManager("main"), InMemoryCacheManager("import")
    combined = CombinedCacheManager([main, imp], main)
    res = result("v")
    await combined.save(root(dgst("foo")), res, 1.0)
    assert len(await main.query([], 0, dgst("foo"), 0)) == 1
    assert await imp.query([], 0, dgst("foo"), 0) == []

    await combined.close()  # closes nothing
    assert len(await main.query([], 0, dgst("foo"), 0)) == 1

    await combined.release(res.id)
    assert await main.query([], 0, dgst("foo"), 0) == []
    assert res.live_count == 1
    await res.release()
    await main.close()
    await imp.close()


def _record(created_at: float, priority: int, name: str) -> CacheRecord:
    manager = InMemoryCacheManager(name)
    return CacheRecord(name, manager, root(dgst(name)), created_at, priority)


def test_best_record_order() -> None:
    old_main = _record(1.0, 1, "old-main")
    new_import = _record(2.0, 0, "new-import")
    new_main = _record(2.0, 1, "new-main")
    newest_main = _record(3.0, 1, "newest-main")

    assert best_record([]) is None
    for order in itertools.permutations([old_main, new_import, new_main]):
        # newest first; equal times: priority 0 before priority 1
        assert best_record(order) is new_import
    assert best_record([old_main, new_main, newest_main, new_import]) is newest_main
    # fully equal records: the first given wins
    twin = _record(2.0, 0, "twin")
    assert best_record([new_import, twin]) is new_import
    assert best_record([twin, new_import]) is twin


async def test_loaded_handle_is_a_result(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager()
    await save(m, root(dgst("a")), "v")
    (key,) = await m.query([], 0, dgst("a"), 0)
    (record,) = await m.records(key)
    loaded = await m.load(record)
    assert isinstance(loaded, Result)
    await loaded.release()
    await m.close()
