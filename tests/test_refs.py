"""Tests of the refcount core (solver._refs) and of solver.testing."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from solver import _refs
from solver._cache import CacheKey, ExportableCacheKey
from solver._digest import digest_of
from solver._errors import DoubleReleaseError, SolveError
from solver._refs import (
    CachedResultWithKeys,
    ResultProxyHalf,
    SharedCachedResult,
    SharedCachedResultHandle,
    SharedResult,
    SharedResultHandle,
    split_result_proxy,
)
from solver._result import CachedResult, Result, ResultProxy
from solver.testing import CountingResult, HandleTracker, _handle_tracker, track_handles

# -- test doubles ------------------------------------------------------------------


class CountingProxy:
    """A ResultProxy that counts evaluations and releases."""

    def __init__(self, id: str, definition: object = None) -> None:
        self._id = id
        self._definition = definition
        self.value = CachedResultWithKeys(CountingResult(id + "-value"), ())
        self.result_calls = 0
        self.release_count = 0

    @property
    def id(self) -> str:
        return self._id

    @property
    def definition(self) -> Any:
        return self._definition

    async def result(self) -> CachedResult:
        self.result_calls += 1
        await anyio.lowlevel.checkpoint()
        return self.value

    async def release(self) -> None:
        self.release_count += 1
        await self.value.release()


class GatedResult:
    """A Result whose release signals ``started`` and then waits for ``proceed``."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.proceed = anyio.Event()
        self.release_count = 0

    @property
    def id(self) -> str:
        return "gated"

    @property
    def sys(self) -> object:
        return None

    async def release(self) -> None:
        self.started.set()
        await self.proceed.wait()
        self.release_count += 1

    def clone(self) -> Result:
        raise NotImplementedError


class FailingResult(CountingResult):
    """A CountingResult whose release raises after counting."""

    __slots__ = ()

    async def release(self) -> None:
        await super().release()
        raise RuntimeError("release failed")


def keys() -> list[ExportableCacheKey]:
    return [ExportableCacheKey(CacheKey(digest_of(b"op"), digest_of(b"vertex"), 0))]


def installed_tracker() -> object:
    return _refs._tracker


def drop(held: list[Any]) -> None:
    """Drop the only references to some handles and collect them."""
    held.clear()
    gc.collect()


def solver_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "solver" and r.levelno == logging.ERROR]


# -- SharedResult ------------------------------------------------------------------


@pytest.mark.anyio
async def test_shared_result_releases_value_once_after_owner_and_handles() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    a = owner.clone()
    b = owner.clone()
    c = a._share()
    assert owner._count.live == 4
    for handle in (owner, a, b):
        await handle.release()
        assert value.release_count == 0
    assert owner._count.live == 1
    await c.release()
    assert value.release_count == 1
    assert value.released
    assert owner._count.live == 0


@pytest.mark.anyio
async def test_owner_released_last_releases_value() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    handle = owner.clone()
    await handle.release()
    assert value.release_count == 0
    await owner.release()
    assert value.release_count == 1


@pytest.mark.anyio
async def test_owner_without_clones_releases_value() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    await owner.release()
    assert value.release_count == 1


def make_owner_pair() -> tuple[CountingResult, Any, Any]:
    value = CountingResult("r1")
    owner = SharedResult(value)
    return value, owner, owner.clone()


def make_handle_pair() -> tuple[CountingResult, Any, Any]:
    value, owner, handle = make_owner_pair()
    return value, handle, owner


def make_half_pair() -> tuple[CountingProxy, Any, Any]:
    proxy = CountingProxy("r1")
    a, b = split_result_proxy(proxy)
    return proxy, a, b


@pytest.mark.anyio
@pytest.mark.parametrize("make", [make_owner_pair, make_handle_pair, make_half_pair])
async def test_double_release_raises_logs_and_changes_no_count(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="solver")
    value, first, second = make()
    await first.release()
    assert solver_errors(caplog) == []
    with pytest.raises(DoubleReleaseError, match="releasing already released reference r1"):
        await first.release()
    records = solver_errors(caplog)
    assert len(records) == 1
    assert "releasing already released reference r1" in records[0].getMessage()
    assert first._count.live == 1
    assert value.release_count == 0
    await second.release()
    assert value.release_count == 1
    with pytest.raises(DoubleReleaseError):
        await second.release()
    assert value.release_count == 1
    assert first._count.live == 0
    assert len(solver_errors(caplog)) == 2


@pytest.mark.anyio
async def test_clone_or_share_after_release_raises_and_changes_no_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="solver")
    value, owner, handle = make_owner_pair()
    await owner.release()
    with pytest.raises(DoubleReleaseError, match="cloning already released reference r1"):
        owner.clone()
    with pytest.raises(DoubleReleaseError, match="sharing already released reference r1"):
        owner._share()
    assert owner._count.live == 1
    await handle.release()
    assert value.release_count == 1
    with pytest.raises(DoubleReleaseError, match="cloning already released"):
        handle.clone()
    with pytest.raises(DoubleReleaseError, match="sharing already released"):
        handle._share()
    assert owner._count.live == 0
    assert value.release_count == 1
    assert value.live_count == 0
    assert len(solver_errors(caplog)) == 4


@pytest.mark.anyio
async def test_share_adds_a_handle_without_consuming() -> None:
    value, owner, handle = make_owner_pair()
    shared = handle._share()
    assert type(shared) is SharedResultHandle
    assert shared._count is owner._count
    assert not handle.released
    assert owner._count.live == 3
    for h in (owner, handle, shared):
        assert value.release_count == 0
        await h.release()
    assert value.release_count == 1


@pytest.mark.anyio
async def test_shared_handle_clone_is_independent() -> None:
    value = CountingResult("r1", "payload")
    owner = SharedResult(value)
    handle = owner.clone()
    independent = handle.clone()
    assert isinstance(independent, CountingResult)
    assert independent is not value
    assert owner._count.live == 2  # the clone is not counted by the SharedResult
    assert value.live_count == 2  # it keeps the value alive by itself
    assert independent.sys == "payload"

    await owner.release()
    await handle.release()
    assert value.release_count == 1  # the wrapped handle, once
    assert value.live_count == 1  # the independent clone is still alive
    assert not independent.released

    await independent.release()
    assert value.release_count == 2
    assert value.live_count == 0


@pytest.mark.anyio
async def test_id_and_sys_pass_through() -> None:
    value = CountingResult("r1", {"snapshot": 1})
    owner = SharedResult(value)
    handle = owner.clone()
    cached = CachedResultWithKeys(CountingResult("c1", "cached-payload"), keys())
    cached_owner = SharedCachedResult(cached)
    cached_handle = cached_owner.clone()
    proxy = CountingProxy("p1", definition="defn")
    a, b = split_result_proxy(proxy)
    assert owner.id == handle.id == "r1"
    assert owner.sys is handle.sys is value.sys
    assert cached.id == cached_owner.id == cached_handle.id == "c1"
    assert cached.sys == cached_owner.sys == cached_handle.sys == "cached-payload"
    assert a.id == b.id == "p1"
    assert a.definition == b.definition == "defn"
    for h in (owner, handle, cached_owner, cached_handle, a, b):
        await h.release()
    assert value.release_count == 1
    assert cached.result.release_count == 1  # type: ignore[attr-defined]
    assert proxy.release_count == 1


def test_handles_implement_the_protocols() -> None:
    owner = SharedResult(CountingResult("r1"))
    cached_owner = SharedCachedResult(CachedResultWithKeys(CountingResult("c1"), keys()))
    half, _ = split_result_proxy(CountingProxy("p1"))
    assert isinstance(owner, Result)
    assert isinstance(owner.clone(), Result)
    assert isinstance(cached_owner, CachedResult)
    assert isinstance(cached_owner.clone(), CachedResult)
    assert isinstance(cached_owner.clone().clone(), CachedResult)
    assert isinstance(half, ResultProxy)


# -- cached results --------------------------------------------------------------------


@pytest.mark.anyio
async def test_cached_result_with_keys_passes_release_and_clone_through() -> None:
    value = CountingResult("r1", "payload")
    ks = keys()
    cached = CachedResultWithKeys(value, ks)
    assert cached.cache_keys is ks
    assert cached.result is value
    clone = cached.clone()
    assert isinstance(clone, CachedResultWithKeys)
    assert clone.cache_keys is ks
    assert clone.result is not value
    assert value.live_count == 2
    await cached.release()
    assert value.release_count == 1
    with pytest.raises(DoubleReleaseError):
        await cached.release()  # detected by the wrapped result
    await clone.release()
    assert value.release_count == 2


@pytest.mark.anyio
async def test_shared_cached_result_handles_are_cached_results() -> None:
    ks = keys()
    value = CountingResult("c1")
    owner = SharedCachedResult(CachedResultWithKeys(value, ks))
    assert owner.cache_keys is ks
    handle = owner.clone()
    assert type(handle) is SharedCachedResultHandle
    assert handle.cache_keys is ks
    assert handle._count is owner._count
    shared = handle._share()
    assert type(shared) is SharedCachedResultHandle
    assert shared.cache_keys is ks
    from_owner = owner._share()
    assert type(from_owner) is SharedCachedResultHandle

    independent = handle.clone()
    assert isinstance(independent, CachedResultWithKeys)
    assert independent.cache_keys is ks
    assert isinstance(independent.result, CountingResult)
    assert owner._count.live == 4
    assert value.live_count == 2

    for h in (owner, handle, shared):
        await h.release()
    assert value.release_count == 0
    await from_owner.release()
    assert value.release_count == 1
    assert value.live_count == 1
    await independent.release()
    assert value.release_count == 2
    assert value.live_count == 0


@pytest.mark.anyio
async def test_shared_cached_result_releases_once() -> None:
    value = CountingResult("c1")
    owner = SharedCachedResult(CachedResultWithKeys(value, keys()))
    handles = [owner.clone() for _ in range(3)]
    independent = handles[0].clone()
    await owner.release()
    for h in handles:
        await h.release()
    assert value.release_count == 1
    await independent.release()
    assert value.release_count == 2
    assert value.live_count == 0


# -- split_result_proxy ----------------------------------------------------------------


@pytest.mark.anyio
async def test_split_releases_proxy_once_after_both_halves() -> None:
    proxy = CountingProxy("p1")
    a, b = split_result_proxy(proxy)
    assert type(a) is ResultProxyHalf
    assert a._count is b._count
    assert a._count.live == 2
    await a.release()
    assert proxy.release_count == 0
    await b.release()
    assert proxy.release_count == 1


@pytest.mark.anyio
async def test_split_consumes_the_half_it_is_given(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="solver")
    proxy = CountingProxy("p1")
    a, b = split_result_proxy(proxy)
    c, d = split_result_proxy(a)
    assert a.released
    assert a._count.live == 3  # net +1: a consumed, c and d added
    with pytest.raises(DoubleReleaseError, match="reference p1 that split_result_proxy consumed"):
        await a.release()
    with pytest.raises(DoubleReleaseError, match="splitting reference p1"):
        split_result_proxy(a)
    with pytest.raises(SolveError, match="accessing released result p1"):
        await a.result()
    assert a._count.live == 3
    assert len(solver_errors(caplog)) == 2
    for h in (b, c):
        await h.release()
    assert proxy.release_count == 0
    await d.release()
    assert proxy.release_count == 1
    with pytest.raises(DoubleReleaseError, match="splitting already released reference p1"):
        split_result_proxy(d)
    assert proxy.release_count == 1


@pytest.mark.anyio
async def test_splitting_a_half_again_shares_one_counter() -> None:
    proxy = CountingProxy("p1")
    a, b = split_result_proxy(proxy)
    c, d = split_result_proxy(b)
    e, f = split_result_proxy(d)
    g = e._share()
    halves = (a, c, e, f, g)
    for h in halves:
        assert h._count is a._count
        assert h._count.value is proxy  # no chain of wrappers
    assert a._count.live == 5
    for h in halves[:-1]:
        await h.release()
    assert proxy.release_count == 0
    await g.release()
    assert proxy.release_count == 1


@pytest.mark.anyio
async def test_half_result_passes_through_each_time() -> None:
    proxy = CountingProxy("p1")
    a, b = split_result_proxy(proxy)
    assert await a.result() is proxy.value
    assert await b.result() is proxy.value
    assert await a.result() is proxy.value
    assert proxy.result_calls == 3
    await a.release()
    with pytest.raises(SolveError, match="accessing released result p1") as info:
        await a.result()
    assert not isinstance(info.value, DoubleReleaseError)
    assert proxy.result_calls == 3
    assert await b.result() is proxy.value
    await b.release()
    assert proxy.release_count == 1


# -- cancellation and concurrency ------------------------------------------------------


@pytest.mark.anyio
async def test_release_in_a_cancelled_scope_completes_and_does_not_raise() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    handle = owner.clone()
    reached = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle.release()  # not the last: still no cancel point
        reached.append("handle")
        await owner.release()  # the last: CountingResult.release is a cancel point
        reached.append("owner")
    assert reached == ["handle", "owner"]
    assert value.release_count == 1


@pytest.mark.anyio
async def test_release_cancelled_midway_still_releases_once() -> None:
    value = CountingResult("r1", release_delay=0.05)
    owner = SharedResult(value)
    with anyio.move_on_after(0.01) as scope:
        await owner.release()
    assert scope.cancel_called
    assert value.release_count == 1


@pytest.mark.anyio
async def test_unshielded_release_would_lose_the_count() -> None:
    # The control for the test above: without the shield the count is lost.
    value = CountingResult("r1", release_delay=0.05)
    with anyio.move_on_after(0.01):
        await value.release()
    assert value.release_count == 0


@pytest.mark.anyio
async def test_release_cancelled_while_the_value_releases() -> None:
    value = GatedResult()
    owner = SharedResult(value)
    scope = anyio.CancelScope()
    finished = []

    async def release() -> None:
        with scope:
            await owner.release()
            finished.append(value.release_count)

    async with anyio.create_task_group() as tg:
        tg.start_soon(release)
        await value.started.wait()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert value.release_count == 0
        value.proceed.set()
    assert finished == [1]
    assert value.release_count == 1


@pytest.mark.anyio
async def test_failing_value_release_propagates_and_handle_stays_released() -> None:
    value = FailingResult("r1")
    owner = SharedResult(value)
    with pytest.raises(RuntimeError, match="release failed"):
        await owner.release()
    assert owner.released
    assert value.release_count == 1
    with pytest.raises(DoubleReleaseError):
        await owner.release()
    assert value.release_count == 1


@pytest.mark.anyio
async def test_concurrent_releases_from_50_tasks() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    handles = [owner, *(owner.clone() for _ in range(49))]
    errors: list[BaseException] = []

    async def release(handle: Any) -> None:
        try:
            await handle.release()
        except DoubleReleaseError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for handle in handles:
            tg.start_soon(release, handle)
            tg.start_soon(release, handle)  # each handle twice: one must fail
    assert len(errors) == 50
    assert value.release_count == 1
    assert owner._count.live == 0


@pytest.mark.anyio
async def test_releases_from_worker_threads_and_tasks() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    handles = [owner, *(owner.clone() for _ in range(39))]
    from_threads = handles[::2]
    # every thread-released handle is released by two threads at once
    barrier = threading.Barrier(2 * len(from_threads), timeout=10)
    errors: list[BaseException] = []
    successes = []

    def release_in_thread(handle: Any) -> None:
        barrier.wait()
        try:
            anyio.from_thread.run(handle.release)
        except DoubleReleaseError as exc:
            errors.append(exc)
        else:
            successes.append(handle)

    async with anyio.create_task_group() as tg:
        for handle in handles[1::2]:
            tg.start_soon(handle.release)
        for handle in from_threads:
            for _ in range(2):
                tg.start_soon(anyio.to_thread.run_sync, release_in_thread, handle)
    assert len(errors) == len(from_threads)
    assert sorted(map(id, successes)) == sorted(map(id, from_threads))
    assert value.release_count == 1
    assert owner._count.live == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_releases_from_threads_running_their_own_event_loops(backend: str) -> None:
    # Through anyio.from_thread every release runs on one loop thread; here each
    # thread runs its own loop, so the counter's lock is contended for real.
    value = CountingResult("r1")
    owner = SharedResult(value)
    handles = [owner, *(owner.clone() for _ in range(799))]
    chunks = [handles[i::8] for i in range(8)]
    barrier = threading.Barrier(len(chunks), timeout=10)

    async def release_all(chunk: list[Any]) -> None:
        for handle in chunk:
            await handle.release()

    def run(chunk: list[Any]) -> None:
        barrier.wait()
        anyio.run(release_all, chunk, backend=backend)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert owner._count.live == 0
    assert value.release_count == 1


# -- repr and __del__ ------------------------------------------------------------------


@pytest.mark.anyio
async def test_repr_shows_id_state_and_live_count() -> None:
    owner = SharedResult(CountingResult("r1"))
    handle = owner.clone()
    assert repr(owner) == "<SharedResult r1 live=2>"
    assert repr(handle) == "<SharedResultHandle r1 live=2>"
    await owner.release()
    assert repr(owner) == "<SharedResult r1 released live=1>"
    a, b = split_result_proxy(CountingProxy("p1"))
    split_result_proxy(a)
    assert repr(a) == "<ResultProxyHalf p1 consumed live=3>"
    assert repr(b) == "<ResultProxyHalf p1 live=3>"
    cached = CachedResultWithKeys(handle, keys())
    assert repr(cached) == "<CachedResultWithKeys keys=1 of <SharedResultHandle r1 live=1>>"


def test_del_never_releases_and_is_silent_without_a_tracker() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    handle = owner.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del handle
        gc.collect()
    assert caught == []
    assert owner._count.live == 2
    assert value.release_count == 0


def test_del_warns_while_tracking_and_the_leak_is_reported() -> None:
    value = CountingResult("r1")
    owner = SharedResult(value)
    with track_handles() as tracker:
        held = [owner.clone()]
        with pytest.warns(ResourceWarning, match="SharedResultHandle r1 was never released"):
            drop(held)
        assert value.release_count == 0
        assert tracker.live == ["SharedResultHandle r1"]
        with pytest.raises(AssertionError, match=r"1 handle\(s\) never released"):
            tracker.check()


# -- solver.testing --------------------------------------------------------------------


@pytest.mark.anyio
async def test_tracker_counts_created_released_and_double_released() -> None:
    assert installed_tracker() is None
    with track_handles() as tracker:
        assert installed_tracker() is tracker
        value = CountingResult("r1")
        owner = SharedResult(value)
        handle = owner.clone()
        assert tracker.created_count == 3
        assert sorted(tracker.live) == [
            "CountingResult r1",
            "SharedResult r1",
            "SharedResultHandle r1",
        ]
        await owner.release()
        with pytest.raises(DoubleReleaseError):
            await owner.release()
        await handle.release()
        assert tracker.released_count == 3  # owner, handle, and the value itself
        assert tracker.live == []
        assert tracker.double_releases == ["<SharedResult r1 released live=1>"]
        with pytest.raises(AssertionError, match=r"1 double release\(s\)"):
            tracker.check()
    assert installed_tracker() is None


@pytest.mark.anyio
async def test_tracker_sees_split_consumption_as_a_release() -> None:
    with track_handles() as tracker:
        a, b = split_result_proxy(CountingProxy("p1"))
        c, d = split_result_proxy(a)
        # the proxy's value (a CountingResult paired with keys) and four halves
        assert tracker.created_count == 6
        assert tracker.released_count == 1
        assert sorted(tracker.live) == [
            "CachedResultWithKeys p1-value",
            "CountingResult p1-value",
            *["ResultProxyHalf p1"] * 3,
        ]
        for h in (b, c, d):
            await h.release()
        tracker.check()


def test_nested_trackers_forward_and_restore() -> None:
    with track_handles() as outer:
        owner = SharedResult(CountingResult("r1"))
        with track_handles() as inner:
            assert installed_tracker() is inner
            handle = owner.clone()
            anyio.run(owner.release)
        assert installed_tracker() is outer
        anyio.run(handle.release)
        assert inner.created_count == 1
        assert inner.released_count == 1  # the owner; the handle went after it left
        assert inner.live == ["SharedResultHandle r1"]
        assert outer.created_count == 3
        assert outer.released_count == 3
        outer.check()
    assert installed_tracker() is None


def test_tracker_reports_a_reused_id_as_a_leak() -> None:
    tracker = HandleTracker()
    marker = object()
    tracker.created(marker)
    tracker.created(marker)  # as if the first was collected and its id reused
    assert tracker.live == ["object ?", "object ?"]


def test_tracker_records_stacks_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLVER_TRACK_STACKS", "1")
    with track_handles() as tracker:
        owner = SharedResult(CountingResult("r1"))
        (line,) = [entry for entry in tracker.live if entry.startswith("SharedResult ")]
        assert "created at:" in line
        assert "test_tracker_records_stacks_when_asked" in line
        anyio.run(owner.release)
        tracker.check()


def test_tracker_without_stacks_stores_only_type_and_id() -> None:
    with track_handles() as tracker:
        owner = SharedResult(CountingResult("r1"))
        assert sorted(tracker.live) == ["CountingResult r1", "SharedResult r1"]
        anyio.run(owner.release)
    assert "HandleTracker live=0 created=2 released=2 double=0" in repr(tracker)


@pytest.mark.anyio
async def test_handle_tracker_fixture_is_installed(handle_tracker: HandleTracker) -> None:
    assert installed_tracker() is handle_tracker
    owner = SharedResult(CountingResult("r1"))
    await owner.clone().release()
    await owner.release()
    assert handle_tracker.released_count == 3


def test_handle_tracker_fixture_fails_teardown_on_a_leak() -> None:
    fixture = _handle_tracker()
    tracker = next(fixture)
    leaked = SharedResult(CountingResult("r1"))
    with pytest.raises(AssertionError, match=r"2 handle\(s\) never released"):
        next(fixture)
    assert installed_tracker() is None
    assert tracker.created_count == 2
    anyio.run(leaked.release)


@pytest.mark.anyio
async def test_counting_result_clones_share_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="solver")
    value = CountingResult("r1", 42)
    clone = value.clone()
    assert clone.id == "r1"
    assert clone.sys == 42
    assert value.live_count == 2
    await value.release()
    assert clone.release_count == 1
    with pytest.raises(DoubleReleaseError, match="releasing already released reference r1"):
        await value.release()
    with pytest.raises(DoubleReleaseError, match="cloning already released reference r1"):
        value.clone()
    assert value.release_count == 1
    assert value.live_count == 1
    assert len(solver_errors(caplog)) == 2
    await clone.release()
    assert value.release_count == 2
    assert repr(value) == "<CountingResult r1 released live=0 releases=2>"


# -- stateful: random splits, clones, shares and releases -----------------------------


@dataclass(eq=False)
class Root:
    """A CountingResult value and all its CountingResult handles."""

    counting: CountingResult


@dataclass(eq=False)
class Group:
    """One shared counter: the handles on it and what it wraps."""

    count: Any
    live: int
    inner: Entry | None = None  # the owned leaf of a SharedResult
    proxy: CountingProxy | None = None


@dataclass(eq=False)
class Entry:
    obj: Any
    kind: str  # "leaf", "owner", "handle", "half"
    group: Group | None = None
    root: Root | None = None
    released: bool = False
    owned: bool = False  # a leaf wrapped by a SharedResult: released only by it


class RefcountMachine(RuleBasedStateMachine):
    backend: ClassVar[str] = "asyncio"
    threaded: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.groups: list[Group] = []
        self.roots: list[Root] = []
        self.misuses = 0
        self.serial = 0
        self.keys = keys()
        self.stack = contextlib.ExitStack()
        self.portal = self.stack.enter_context(
            anyio.from_thread.start_blocking_portal(self.backend)
        )
        self.tracker = self.stack.enter_context(track_handles())

    # -- helpers --

    def name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def add(self, entry: Entry) -> Entry:
        self.entries.append(entry)
        return entry

    def snapshot(self) -> tuple[object, ...]:
        return (
            tuple(g.count.live for g in self.groups),
            tuple((r.counting.release_count, r.counting.live_count) for r in self.roots),
            tuple(g.proxy.release_count for g in self.groups if g.proxy is not None),
            self.tracker.created_count,
            self.tracker.released_count,
        )

    def expect_misuse(self, action: Any) -> None:
        before = self.snapshot()
        with pytest.raises(DoubleReleaseError):
            action()
        assert self.snapshot() == before
        self.misuses += 1

    def releasable(self) -> list[Entry]:
        return [e for e in self.entries if not e.owned]

    def mark_released(self, entry: Entry) -> None:
        entry.released = True
        group = entry.group
        if group is not None:
            group.live -= 1
            if group.live == 0 and group.inner is not None:
                group.inner.released = True

    # -- rules --

    @initialize(cached=st.booleans())
    def start_with_a_result_and_a_proxy(self, cached: bool) -> None:
        self.new_shared_result(cached)
        self.new_split_proxy()

    @rule(cached=st.booleans())
    def new_shared_result(self, cached: bool) -> None:
        counting = CountingResult(self.name("r"))
        root = Root(counting)
        self.roots.append(root)
        leaf_obj: Any = CachedResultWithKeys(counting, self.keys) if cached else counting
        leaf = self.add(Entry(leaf_obj, "leaf", root=root, owned=True))
        self.wrap(leaf)

    def wrap(self, leaf: Entry) -> None:
        owner: Any
        if isinstance(leaf.obj, CachedResultWithKeys):
            owner = SharedCachedResult(leaf.obj)
        else:
            owner = SharedResult(leaf.obj)
        leaf.owned = True
        group = Group(owner._count, 1, inner=leaf)
        self.groups.append(group)
        self.add(Entry(owner, "owner", group=group))

    @rule()
    def new_split_proxy(self) -> None:
        proxy = CountingProxy(self.name("p"))
        a, b = split_result_proxy(proxy)
        group = Group(a._count, 2, proxy=proxy)
        self.groups.append(group)
        self.add(Entry(a, "half", group=group))
        self.add(Entry(b, "half", group=group))

    @precondition(lambda self: any(e.kind == "leaf" and not e.owned for e in self.entries))
    @rule(data=st.data())
    def wrap_free_leaf(self, data: st.DataObject) -> None:
        leaves = [e for e in self.entries if e.kind == "leaf" and not e.owned]
        leaf = data.draw(st.sampled_from(leaves))
        if leaf.released:
            return
        self.wrap(leaf)

    @precondition(lambda self: any(e.kind == "owner" for e in self.entries))
    @rule(data=st.data())
    def clone_owner(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from([e for e in self.entries if e.kind == "owner"]))
        if owner.released:
            self.expect_misuse(owner.obj.clone)
            return
        handle = owner.obj.clone()
        assert handle._count is owner.obj._count
        if isinstance(owner.obj, SharedCachedResult):
            assert handle.cache_keys is self.keys
        assert owner.group is not None
        owner.group.live += 1
        self.add(Entry(handle, "handle", group=owner.group))

    @precondition(lambda self: any(e.kind != "leaf" for e in self.entries))
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from([e for e in self.entries if e.kind != "leaf"]))
        if entry.released:
            self.expect_misuse(entry.obj._share)
            return
        new = entry.obj._share()
        assert new._count is entry.obj._count
        assert entry.group is not None
        entry.group.live += 1
        self.add(Entry(new, "half" if entry.kind == "half" else "handle", group=entry.group))

    @precondition(
        lambda self: any(
            e.kind == "handle" or (e.kind == "leaf" and not e.owned) for e in self.entries
        )
    )
    @rule(data=st.data())
    def independent_clone(self, data: st.DataObject) -> None:
        candidates = [
            e for e in self.entries if e.kind == "handle" or (e.kind == "leaf" and not e.owned)
        ]
        entry = data.draw(st.sampled_from(candidates))
        if entry.released:
            self.expect_misuse(entry.obj.clone)
            return
        before = entry.group.count.live if entry.group is not None else None
        clone = entry.obj.clone()
        if entry.group is not None:
            assert entry.group.count.live == before  # never shares the counter
            assert entry.group.inner is not None
            root = entry.group.inner.root
        else:
            root = entry.root
        assert root is not None
        if isinstance(entry.obj, SharedCachedResultHandle | CachedResultWithKeys):
            assert isinstance(clone, CachedResultWithKeys)
            assert clone.cache_keys is self.keys
        self.add(Entry(clone, "leaf", root=root))

    @precondition(lambda self: any(e.kind == "half" for e in self.entries))
    @rule(data=st.data())
    def split_half(self, data: st.DataObject) -> None:
        half = data.draw(st.sampled_from([e for e in self.entries if e.kind == "half"]))
        if half.released:
            self.expect_misuse(lambda: split_result_proxy(half.obj))
            return
        a, b = split_result_proxy(half.obj)
        assert a._count is half.obj._count
        half.released = True  # consumed: net +1 on the group
        assert half.group is not None
        half.group.live += 1
        self.add(Entry(a, "half", group=half.group))
        self.add(Entry(b, "half", group=half.group))

    @precondition(lambda self: bool(self.releasable()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        entry = data.draw(st.sampled_from(self.releasable()))
        if entry.released:
            self.expect_misuse(lambda: self.portal.call(entry.obj.release))
            return
        self.portal.call(entry.obj.release)
        self.mark_released(entry)

    def release_from_threads(self, data: st.DataObject) -> None:
        chosen = data.draw(
            st.lists(st.sampled_from(self.releasable()), min_size=2, max_size=6), label="chosen"
        )
        # Some threads go through the portal's event loop, others run their own loop,
        # so the counter's lock really is contended from several threads.
        own_loop = data.draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
        barrier = threading.Barrier(len(chosen), timeout=10)
        outcomes: list[tuple[Entry, bool]] = []
        lock = threading.Lock()

        def run(entry: Entry, separate: bool) -> None:
            barrier.wait()
            try:
                if separate:
                    anyio.run(entry.obj.release, backend=self.backend)
                else:
                    self.portal.call(entry.obj.release)
            except DoubleReleaseError:
                ok = False
            else:
                ok = True
            with lock:
                outcomes.append((entry, ok))

        threads = [
            threading.Thread(target=run, args=(entry, separate))
            for entry, separate in zip(chosen, own_loop, strict=True)
        ]
        was_released = {id(e): e.released for e in chosen}
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(outcomes) == len(chosen)
        for entry in {id(e): e for e in chosen}.values():
            wins = sum(ok for e, ok in outcomes if e is entry)
            tries = sum(1 for e, _ in outcomes if e is entry)
            assert wins == (0 if was_released[id(entry)] else 1)
            self.misuses += tries - wins
            if wins:
                self.mark_released(entry)

    # -- invariants --

    @invariant()
    def counts_match_the_model(self) -> None:
        for group in self.groups:
            assert group.count.live == group.live
            if group.proxy is not None:
                # released exactly once, and only after the last handle
                assert group.proxy.release_count == (1 if group.live == 0 else 0)
        for root in self.roots:
            leaves = [e for e in self.entries if e.kind == "leaf" and e.root is root]
            assert root.counting.release_count == sum(e.released for e in leaves)
            assert root.counting.live_count == sum(not e.released for e in leaves)
        assert len(self.tracker.double_releases) == self.misuses
        # every unreleased entry, and the value of every proxy not yet released
        # (a CountingResult paired with keys: two handles)
        proxies_alive = 2 * sum(g.proxy is not None and g.live > 0 for g in self.groups)
        # (a cached leaf is a pair over a CountingResult: two handles)
        unreleased = sum(
            (2 if isinstance(e.obj, CachedResultWithKeys) else 1)
            for e in self.entries
            if not e.released
        )
        assert len(self.tracker.live) == unreleased + proxies_alive

    def teardown(self) -> None:
        try:
            for entry in self.entries:
                if not entry.owned and not entry.released:
                    self.portal.call(entry.obj.release)
                    self.mark_released(entry)
            for group in self.groups:
                assert group.count.live == 0
                if group.proxy is not None:
                    assert group.proxy.release_count == 1
            for root in self.roots:
                assert root.counting.live_count == 0
            assert self.tracker.live == []
            assert len(self.tracker.double_releases) == self.misuses
        finally:
            self.stack.close()


class ThreadedRefcountMachine(RefcountMachine):
    """The same machine plus releases from several threads at once."""

    @precondition(lambda self: bool(self.releasable()))
    @rule(data=st.data())
    def release_concurrently(self, data: st.DataObject) -> None:
        self.release_from_threads(data)


_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None)


class AsyncioRefcountMachine(RefcountMachine):
    backend = "asyncio"


class TrioRefcountMachine(RefcountMachine):
    backend = "trio"


class AsyncioThreadedRefcountMachine(ThreadedRefcountMachine):
    backend = "asyncio"


class TrioThreadedRefcountMachine(ThreadedRefcountMachine):
    backend = "trio"


TestRefcountAsyncio = AsyncioRefcountMachine.TestCase
TestRefcountAsyncio.settings = _SETTINGS
TestRefcountTrio = TrioRefcountMachine.TestCase
TestRefcountTrio.settings = _SETTINGS
TestRefcountThreadedAsyncio = AsyncioThreadedRefcountMachine.TestCase
TestRefcountThreadedAsyncio.settings = _SETTINGS
TestRefcountThreadedTrio = TrioThreadedRefcountMachine.TestCase
TestRefcountThreadedTrio.settings = _SETTINGS
