"""The bound on the default in-memory cache (issue 20, point 8): at most
``max_results`` results, least recently used evicted first, every evicted handle
released exactly once, the key graph shrinking with the results, and a result a job
holds never touched by the eviction of its record."""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Sequence

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from solver import (
    Builder,
    CacheMap,
    CacheMapDep,
    Edge,
    InMemoryCacheManager,
    Solver,
    VertexOptions,
)
from solver._cache import CacheKey, CacheKeyWithSelector, ExportableCacheKey
from solver._digest import digest_of
from solver._result import Result
from solver.cache import NotFoundError
from solver.testing import CountingResult, HandleTracker, track_handles


def dgst(s: str) -> str:
    return digest_of(s.encode())


def root(name: str) -> CacheKey:
    return CacheKey(dgst(name), "", 0)


def key_on(name: str, *deps: CacheKey) -> CacheKey:
    """A key whose input i has the one alternative ``deps[i]``."""
    alternatives = [[CacheKeyWithSelector(ExportableCacheKey(d))] for d in deps]
    return CacheKey(dgst(name), "", 0, alternatives)


async def save(m: InMemoryCacheManager, key: CacheKey, rid: str, value: object = None) -> None:
    """Save a fresh value under ``key`` and drop the test's own handle."""
    res = CountingResult(rid, value)
    await m.save(key, res, 1.0)
    await res.release()


def stored_ids(m: InMemoryCacheManager) -> set[str]:
    return set(m._memory_results._ids())


async def find(m: InMemoryCacheManager, key: CacheKey) -> list[str]:
    """The result IDs ``records`` gives for ``key``."""
    return [r.id for r in await m.records(key)]


# -- the bound and the order -----------------------------------------------------------


@pytest.mark.anyio
async def test_bound_is_respected_after_n_plus_k_saves(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager(max_results=5)
    values = [CountingResult(f"r{i}", i) for i in range(8)]
    for i, v in enumerate(values):
        await m.save(root(f"k{i}"), v, float(i))
        await v.release()
        m._check()
    assert stored_ids(m) == {f"r{i}" for i in range(3, 8)}
    for i in range(3):
        # gone from both storages, and each handle released exactly once
        assert await m.query([], 0, dgst(f"k{i}"), 0) == []
        assert (values[i].live_count, values[i].release_count) == (0, 2)
    for i in range(3, 8):
        (key,) = await m.query([], 0, dgst(f"k{i}"), 0)
        assert await find(m, key) == [f"r{i}"]
        assert values[i].live_count == 1  # the cache's handle
    await m.close()
    assert all(v.live_count == 0 for v in values)


@pytest.mark.anyio
async def test_a_full_cache_evicts_one_percent_at_once(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager(max_results=200)
    for i in range(200):
        await save(m, root(f"k{i}"), f"r{i}")
    assert m.result_count == 200
    await save(m, root("k200"), "r200")  # over the bound: down to 99 % of it
    assert m.result_count == 198
    assert stored_ids(m) == {f"r{i}" for i in range(3, 201)}
    await save(m, root("k201"), "r201")
    await save(m, root("k202"), "r202")
    assert m.result_count == 200
    m._check()
    await m.close()


def test_default_bound_and_validation() -> None:
    assert InMemoryCacheManager.DEFAULT_MAX_RESULTS == 10_000
    assert InMemoryCacheManager().max_results == 10_000
    assert InMemoryCacheManager(max_results=None).max_results is None
    assert "max_results=3" in repr(InMemoryCacheManager("named", max_results=3))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_results must be at least 1"):
            InMemoryCacheManager(max_results=bad)
    # the cache a solver makes for itself is the bounded default
    s = Solver(resolve_op=lambda v, b: Vx.op_of(v, b))
    assert isinstance(s.default_cache, InMemoryCacheManager)
    assert s.default_cache.max_results == InMemoryCacheManager.DEFAULT_MAX_RESULTS


@pytest.mark.anyio
async def test_unbounded_keeps_everything(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager(max_results=None)
    for i in range(50):
        await save(m, root(f"k{i}"), f"r{i}")
    m._check()
    assert len(stored_ids(m)) == 50
    await m.close()


@pytest.mark.anyio
async def test_a_loaded_record_survives_and_the_least_recent_goes(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager(max_results=3)
    for name in "abc":
        await save(m, root(name), name)
    (key,) = await m.query([], 0, dgst("a"), 0)
    (record,) = await m.records(key)
    loaded = await m.load(record)  # a is now the most recently used
    await loaded.release()
    await save(m, root("d"), "d")
    assert stored_ids(m) == {"a", "c", "d"}
    # a save of a stored result ID moves it too, and takes no second handle
    res = CountingResult("c")
    await m.save(root("c2"), res, 2.0)
    assert res.live_count == 1
    await res.release()
    await save(m, root("e"), "e")
    assert stored_ids(m) == {"c", "d", "e"}
    m._check()
    await m.close()


@pytest.mark.anyio
async def test_release_and_close_forget_the_order(handle_tracker: HandleTracker) -> None:
    m = InMemoryCacheManager(max_results=2)
    await save(m, root("a"), "a")
    await save(m, root("b"), "b")
    await m.release("a")
    m._check()
    await save(m, root("c"), "c")  # room left by the release: nothing evicted
    assert stored_ids(m) == {"b", "c"}
    await m.close()
    m._check()
    await m.close()


# -- what an eviction releases --------------------------------------------------------


@pytest.mark.anyio
async def test_eviction_releases_the_handle_once_even_when_cancelled(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager(max_results=1)
    # the release of the evicted handle takes time: it must still complete
    old = CountingResult("old", release_delay=0.01)
    await m.save(root("old"), old, 1.0)
    await old.release()
    new = CountingResult("new")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await m.save(root("new"), new, 2.0)  # evicts old
    assert not scope.cancelled_caught  # a save is never a cancel point
    assert (old.live_count, old.release_count) == (0, 2)
    await new.release()
    await m.close()
    assert (new.live_count, new.release_count) == (0, 2)


class FailingRelease(CountingResult):
    """A CountingResult whose release raises after counting."""

    __slots__ = ()

    async def release(self) -> None:
        await super().release()
        raise RuntimeError("release failed")

    def clone(self) -> CountingResult:
        # the clone the cache keeps fails its release too
        clone = super().clone()
        clone.__class__ = FailingRelease
        return clone


@pytest.mark.anyio
async def test_an_evicted_handle_that_fails_to_release_does_not_fail_the_save(
    handle_tracker: HandleTracker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="solver")
    m = InMemoryCacheManager(max_results=1)
    bad = CountingResult("bad")
    stored = FailingRelease("bad")
    await m.save(root("bad"), stored, 1.0)
    await bad.release()
    with pytest.raises(RuntimeError):
        await stored.release()
    await save(m, root("next"), "next")
    assert "releasing evicted cached result bad failed" in caplog.text
    assert stored.live_count == 0
    assert stored_ids(m) == {"next"}
    await m.close()


@pytest.mark.anyio
async def test_a_record_evicted_before_its_load_is_not_found(
    handle_tracker: HandleTracker,
) -> None:
    m = InMemoryCacheManager(max_results=1)
    await save(m, root("a"), "a")
    (key,) = await m.query([], 0, dgst("a"), 0)
    (record,) = await m.records(key)
    await save(m, root("b"), "b")
    with pytest.raises(NotFoundError):
        await m.load(record)
    await m.close()


# -- the key graph shrinks with the results -------------------------------------------


@pytest.mark.anyio
async def test_keys_and_links_of_evicted_results_are_dropped(
    handle_tracker: HandleTracker,
) -> None:
    """Chains of 3 keys with new digests each time, as a long-lived solver saves
    them: the key storage holds the keys of the kept results and no more."""
    m = InMemoryCacheManager(max_results=6)
    for i in range(50):
        a = root(f"{i}-a")
        b = key_on(f"{i}-b", a)
        c = key_on(f"{i}-c", b)
        for key, part in ((a, "a"), (b, "b"), (c, "c")):
            await save(m, key, f"{i}-{part}")
            m._check()
        assert len(await m.storage.walk()) == min(6, 3 * (i + 1))
    assert m.storage._by_id.keys() == set(await m.storage.walk())  # type: ignore[attr-defined]
    # the last two chains are still found from their roots
    for i in (48, 49):
        (a,) = await m.query([], 0, dgst(f"{i}-a"), 0)
        (b,) = await m.query([CacheKeyWithSelector(ExportableCacheKey(a))], 0, dgst(f"{i}-b"), 0)
        (c,) = await m.query([CacheKeyWithSelector(ExportableCacheKey(b))], 0, dgst(f"{i}-c"), 0)
        assert await find(m, c) == [f"{i}-c"]
    await m.close()


@pytest.mark.anyio
async def test_a_key_saved_after_its_input_was_evicted_is_still_reachable(
    handle_tracker: HandleTracker,
) -> None:
    """A wide build past the bound: an input's record (and its key, which had no
    link yet) is evicted before the op above it saves. That save must link the
    input's key again from below, not trust that it still is linked."""
    m = InMemoryCacheManager(max_results=3)
    r = root("r")
    mid = key_on("mid", r)
    await save(m, r, "r")
    await save(m, mid, "mid")
    for i in range(3):  # evicts r, then mid: mid's key goes, and the link r -> mid
        await save(m, root(f"x{i}"), f"x{i}")
    assert not await m.storage.exists(r.id)
    await save(m, key_on("top", mid), "top")
    m._check()
    # a later build, with keys of its own, finds top through r and mid
    (r2,) = await m.query([], 0, dgst("r"), 0)
    (mid2,) = await m.query([CacheKeyWithSelector(ExportableCacheKey(r2))], 0, dgst("mid"), 0)
    assert await find(m, mid2) == []
    (top2,) = await m.query([CacheKeyWithSelector(ExportableCacheKey(mid2))], 0, dgst("top"), 0)
    assert await find(m, top2) == ["top"]
    await m.close()


# -- random operations against a model -------------------------------------------------

_NAMES = ["a", "b", "c"]


def _pool() -> list[CacheKey]:
    """Fresh key objects (as each job has its own): three roots, keys on them,
    and keys on those."""
    roots = [root(n) for n in _NAMES]
    mids = [key_on(f"m{i}", roots[i]) for i in range(3)] + [key_on("m01", roots[0], roots[1])]
    tops = [key_on("t0", mids[0]), key_on("t3", mids[3], roots[2])]
    return [*roots, *mids, *tops]


_op = st.one_of(
    st.tuples(st.just("save"), st.integers(0, 8), st.integers(0, 9)),
    st.tuples(st.just("load"), st.integers(0, 8), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 9), st.just(0)),
)


async def _random_ops(bound: int, ops: list[tuple[str, int, int]]) -> None:
    m = InMemoryCacheManager(max_results=bound)
    lru: OrderedDict[str, set[int]] = OrderedDict()  # result ID -> keys it is under
    values: list[CountingResult] = []
    for op, k, r in ops:
        pool = _pool()
        if op == "save":
            rid = f"r{r}"
            value = CountingResult(rid)
            values.append(value)
            await m.save(pool[k], value, 1.0)
            await value.release()
            lru.setdefault(rid, set()).add(k)
            lru.move_to_end(rid)
            while len(lru) > bound:
                lru.popitem(last=False)
        elif op == "load":
            records = await m.records(pool[k])
            assert {rec.id for rec in records} == {rid for rid, ks in lru.items() if k in ks}
            if records:
                loaded = await m.load(records[0])
                assert loaded.id == records[0].id
                await loaded.release()
                lru.move_to_end(records[0].id)
        else:
            await m.release(f"r{k}")
            lru.pop(f"r{k}", None)
        m._check()
        assert stored_ids(m) == set(lru)
    await m.close()
    assert all(v.live_count == 0 for v in values)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(bound=st.integers(1, 6), ops=st.lists(_op, max_size=40))
def test_random_operations_keep_the_invariants(
    backend: str, bound: int, ops: list[tuple[str, int, int]]
) -> None:
    with track_handles() as tracker:
        anyio.run(_random_ops, bound, ops, backend=backend)
    tracker.check()


# -- through the solver ---------------------------------------------------------------

_OPTIONS = VertexOptions()


class Vx:
    """A vertex that is its own op: counts its execs and returns a new
    CountingResult each time, remembered in ``made``."""

    def __init__(self, name: str, *inputs: Vx) -> None:
        self.name = name
        self._inputs = tuple(Edge(v) for v in inputs)
        self.digest = dgst("|".join([name, *(v.digest for v in inputs)]))
        self._map = CacheMap(dgst(f"map:{name}"), [CacheMapDep() for _ in inputs])
        self.execs = 0
        self.made: list[CountingResult] = []

    @staticmethod
    def op_of(v: object, b: Builder) -> Vx:
        op = getattr(v, "sys", None)
        assert isinstance(op, Vx)
        return op

    @property
    def inputs(self) -> Sequence[Edge]:
        return self._inputs

    @property
    def options(self) -> VertexOptions:
        return _OPTIONS

    @property
    def sys(self) -> Vx:
        return self

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return self._map, True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.execs += 1
        value = CountingResult(f"{self.name}#{self.execs}-{secrets.token_hex(4)}", self.name)
        self.made.append(value)
        return [value]


async def build(s: Solver, v: Vx) -> object:
    job = s.new_job()
    res = await job.build(Edge(v))
    try:
        return res.sys
    finally:
        await res.release()
        await job.discard()


@pytest.mark.anyio
async def test_a_job_keeps_using_a_result_whose_record_is_evicted(
    handle_tracker: HandleTracker,
) -> None:
    cache = InMemoryCacheManager(max_results=1)
    async with Solver(resolve_op=Vx.op_of, default_cache=cache) as s:
        a = Vx("a")
        job = s.new_job()
        held = await job.build(Edge(a))
        (value,) = a.made
        assert await cache.results.exists(value.id)
        releases = value.release_count

        assert await build(s, Vx("b")) == "b"  # its save evicts a's record
        assert not await cache.results.exists(value.id)
        assert value.release_count == releases + 1  # the cache's own handle, once
        assert value.live_count > 0  # the job's handles are untouched
        assert held.sys == "a"

        await held.release()
        await job.discard()
        assert value.live_count == 0  # released with the job's last handle
    await cache.close()


@pytest.mark.anyio
async def test_an_evicted_result_is_built_again_and_a_kept_one_is_loaded(
    handle_tracker: HandleTracker,
) -> None:
    cache = InMemoryCacheManager(max_results=2)
    async with Solver(resolve_op=Vx.op_of, default_cache=cache) as s:
        x0 = Vx("x0")
        x1 = Vx("x1", x0)
        y0 = Vx("y0")
        y1 = Vx("y1", y0)
        assert await build(s, x1) == "x1"
        assert await build(s, y1) == "y1"  # evicts x0 and x1
        assert (x0.execs, x1.execs, y0.execs, y1.execs) == (1, 1, 1, 1)

        assert await build(s, y1) == "y1"  # kept: loaded, nothing runs
        assert (y0.execs, y1.execs) == (1, 1)
        assert await build(s, x1) == "x1"  # evicted: runs again
        assert (x0.execs, x1.execs) == (2, 2)
        cache._check()
    await cache.close()
    for v in (x0, x1, y0, y1):
        assert all(r.live_count == 0 for r in v.made)


@pytest.mark.anyio
async def test_the_default_cache_stays_bounded(handle_tracker: HandleTracker) -> None:
    """A solver with default settings, many small graphs: the cache it made never
    holds more than its bound (made small here through the class default)."""
    s = Solver(resolve_op=Vx.op_of)
    cache = s.default_cache
    assert isinstance(cache, InMemoryCacheManager)
    cache._max_results = 5  # the default's behaviour, at a size a test can reach
    async with s:
        for i in range(10):
            c = Vx(f"{i}-c", Vx(f"{i}-b", Vx(f"{i}-a")))
            assert await build(s, c) == f"{i}-c"
            cache._check()
            # the keys of the 5 kept results, and at most the 2 keys that lead
            # to the oldest of them from the root of its graph
            assert len(await cache.storage.walk()) <= 5 + 2
