"""The per-build summary: counts equal the executions the test observes, cache
hits are told apart by source, and the figures (times, critical path) follow
from the op records."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from frontend_support import Ops, text
from persistence_support import SnapOps, chain

from solver import (
    CacheRecord,
    Definition,
    InMemoryCacheManager,
    LocalCacheExport,
    LocalCacheImport,
    ProgressEvent,
    Result,
    Solver,
    SolveRequest,
    node,
)
from solver.bridge import job_events
from solver.insight import BuildHistory, BuildSummary, OpRecord, op_graph, summarize
from solver.testing import HandleTracker
from solver.worker import Worker

pytestmark = pytest.mark.anyio


def diamond(top: str = "d") -> Definition:
    a = node("test.text", {"text": "a"}, name="a")
    b = node("test.text", {"text": "b"}, inputs=[a], name="b")
    c = node("test.text", {"text": "c"}, inputs=[a], name="c")
    return Definition.of(node("test.text", {"text": top}, inputs=[b, c], name=top))


async def test_cold_then_warm_counts_equal_the_executions(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        async with await s.solve(diamond()) as res:
            summary = res.summary
        assert summary is not None
        assert sorted(ops.execs) == ["a", "b", "c", "d"]
        assert (summary.executed, summary.cached, summary.failed) == (4, 0, 0)
        assert len(summary.ops) == 4
        assert {op.state for op in summary.ops} == {"executed"}
        assert all(op.started is not None and op.duration >= 0 for op in summary.ops)
        assert summary.cache_hits == {}

        async with await s.solve(diamond()) as res:
            warm = res.summary
        assert len(ops.execs) == 4  # nothing ran again
        assert warm is not None
        assert (warm.executed, warm.cached, warm.failed) == (0, 4, 0)
        # the top was loaded from the solver's in-memory cache; the rest not needed
        assert warm.cache_hits == {"unneeded": 3, "memory": 1}
        top = warm.ops[-1]
        assert (top.name, top.cache_source) == ("d", "memory")

        # a changed top: exactly the new op runs, its inputs come from the cache
        async with await s.solve(diamond("e")) as res:
            changed = res.summary
        assert ops.execs[4:] == ["e"]
        assert changed is not None
        assert changed.executed == 1
        assert [op.name for op in changed.ran()] == ["e"]
        assert changed.cached == 3
    assert ops.live_values() == []


async def test_local_store_and_imported_cache_are_told_apart(tmp_path: Path) -> None:
    ops = SnapOps()
    async with Worker(tmp_path / "one") as worker:
        ops.register(worker)
        async with Solver(worker=worker) as s:
            req = SolveRequest(
                definition=chain("x", "y"),
                cache_exports=[LocalCacheExport(str(tmp_path / "exported"), mode="max")],
            )
            async with await s.solve(req) as res:
                assert res.summary is not None
                assert res.summary.executed == 2
    assert ops.execs == ["x", "y"]
    # the same store in a new solver: the persistent cache answers
    async with Worker(tmp_path / "one") as worker:
        ops.register(worker)
        async with Solver(worker=worker) as s, await s.solve(chain("x", "y")) as res:
            assert res.summary is not None
            assert res.summary.cache_hits == {"local": 1, "unneeded": 1}
    # an empty store importing the exported cache
    async with Worker(tmp_path / "two") as worker:
        ops.register(worker)
        req = SolveRequest(
            definition=chain("x", "y"),
            cache_imports=[LocalCacheImport(str(tmp_path / "exported"))],
        )
        async with Solver(worker=worker) as s, await s.solve(req) as res:
            assert res.summary is not None
            assert res.summary.cache_hits == {"import": 1, "unneeded": 1}
    assert ops.execs == ["x", "y"]


def ev(vertex: str, status: str, t: float, **kw: object) -> ProgressEvent:
    return ProgressEvent(vertex, vertex.upper(), status, t, **kw)  # type: ignore[arg-type]


def test_times_and_the_critical_path() -> None:
    # a -> b -> d and a -> c -> d; c is the long branch; e is cached
    graph = {"a": (), "b": ("a",), "c": ("a",), "e": (), "d": ("b", "c", "e")}
    events = [
        ev("a", "started", 10.0),
        ev("a", "completed", 11.0),
        ev("b", "started", 11.0),
        ev("c", "started", 11.0),
        ev("b", "completed", 11.5),
        ev("e", "cached", 11.6, cache_source="local"),
        ev("c", "completed", 14.0),
        ev("d", "started", 14.5),
        ev("d", "log", 14.6, data=b"one\ntwo\n", stream=1),
        ev("d", "error", 15.0, error="exit code 1"),
    ]
    s = summarize(events, graph, build="d", started=9.0, ended=15.5)
    assert (s.executed, s.cached, s.failed) == (3, 1, 1)
    assert s.cache_hits == {"local": 1}
    assert s.wall_time == pytest.approx(6.5)
    assert s.op_time == pytest.approx(1 + 0.5 + 3 + 0.5)
    # ops ran during [10, 14] and [14.5, 15]
    assert s.busy_time == pytest.approx(4.5)
    assert s.engine_time == pytest.approx(2.0)
    assert [op.digest for op in s.critical_path] == ["a", "c", "d"]
    assert s.critical_path_time == pytest.approx(4.5)
    failed = s.ops[-1]
    assert (failed.state, failed.error, failed.log_tail) == ("failed", "exit code 1", "one\ntwo")
    assert failed.inputs == ("b", "c", "e")
    doc = s.to_json()
    assert doc["executed"] == 3
    assert doc["cache_hits"] == {"local": 1}
    assert [p["vertex"] for p in doc["critical_path"]] == ["a", "c", "d"]  # type: ignore[attr-defined]
    lines = s.lines()
    assert lines[0] == "Summary: 5 ops: 3 run, 1 cached, 1 failed"
    assert lines[1] == "Cache hits: 1 local"
    assert lines[3].startswith("Critical path (4.500s): A (1.000s) -> C (3.000s) -> D (0.500s)")


def test_ops_without_events_and_events_from_an_earlier_build() -> None:
    graph = {"a": (), "b": ("a",), "c": ("b",)}
    events = [
        ev("a", "started", 1.0),  # an earlier build of the same solver ran it
        ev("a", "completed", 2.0),
        ev("b", "started", 5.0),
        ev("b", "error", 6.0, error="canceled"),
    ]
    s = summarize(events, graph, build="c", started=4.0, ended=7.0, names={"c": "top"})
    states = [(op.digest, op.name, op.state, op.cache_source) for op in s.ops]
    assert states == [
        ("a", "A", "cached", "active"),
        ("b", "B", "canceled", None),
        ("c", "top", "not run", None),
    ]
    assert (s.canceled, s.not_run) == (1, 1)
    assert s.critical_path == (s.ops[1],)


def test_an_op_only_an_earlier_build_of_the_job_had_is_left_out() -> None:
    """Two builds in one job (``solve(..., job=job)``): the second's summary has
    its own graph's ops, not the first's."""
    graph = {"b": ()}
    events = [
        ev("a", "started", 1.0),  # the first build, of another graph
        ev("a", "completed", 2.0),
        ev("b", "started", 5.0),
        ev("b", "completed", 6.0),
    ]
    s = summarize(events, graph, build="b", started=4.0, ended=7.0)
    assert [(op.digest, op.state) for op in s.ops] == [("b", "executed")]
    assert (s.executed, s.cached) == (1, 0)
    # without a graph (a frontend's build) every op the job saw is kept
    s = summarize(events, {}, build="frontend:x", started=4.0, ended=7.0)
    assert [op.digest for op in s.ops] == ["a", "b"]


def test_a_summary_of_nothing() -> None:
    s = BuildSummary("x", 1.0, 1.0, ())
    assert (s.executed, s.cached, s.critical_path, s.engine_time) == (0, 0, (), 0.0)
    assert s.lines()[0] == "Summary: 0 ops: 0 run, 0 cached, 0 failed"
    assert "0 run" in repr(s)
    assert OpRecord("a", "a", "cached").duration == 0.0


async def test_job_events_do_not_wait_for_more() -> None:
    from solver.bridge._summary import job_events

    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        job = s.new_job()
        assert await job_events(job) == []
        with anyio.fail_after(30):
            async with await s.solve(text("a", "b"), job=job):
                pass
            events = await job_events(job)
        assert [e.status for e in events] == ["started", "completed"] * 2
        assert ops.execs == ["a", "b"]
        await job.discard()


class FoldCount:
    """Counts the folds of a build's events into a summary (``summarize`` as
    ``Solver.solve`` calls it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from solver.bridge import _summary

        self.calls = 0
        real = _summary.summarize  # type: ignore[attr-defined]

        def counted(*args: Any, **kwargs: Any) -> BuildSummary:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(_summary, "summarize", counted)


async def test_a_summary_nobody_reads_is_never_folded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A solve without history or tracing folds its summary the first time
    ``SolveResult.summary`` is read (also after the result is released), once,
    and not at all when nobody reads it; what is read is what an eager fold of
    the same events gives."""
    folds = FoldCount(monkeypatch)
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        async with await s.solve(diamond()):
            pass
        assert folds.calls == 0
        async with await s.solve(diamond()) as res:
            pass
        assert folds.calls == 0
        warm = res.summary  # read after the release
        assert folds.calls == 1
        assert res.summary is warm  # kept
        assert folds.calls == 1
        assert warm is not None
        assert (warm.executed, warm.cached, warm.failed) == (0, 4, 0)
        assert warm.cache_hits == {"unneeded": 3, "memory": 1}
        assert warm.build == diamond().to_vertices(None).vertex.digest
        assert len(warm.ops) == 4
        # The same events, folded at once by hand, give the same summary.
        job = s.new_job()
        started = time.time()
        edge = diamond("e").to_vertices(s.op_kinds)
        async with await s.solve(diamond("e"), job=job) as res:
            lazy = res.summary
        events = await job_events(job)
        await job.discard()
        assert folds.calls == 2
        assert lazy is not None
        eager = summarize(events, op_graph(edge), build=lazy.build, started=lazy.started,
                          ended=lazy.ended)
        assert started <= lazy.started
        assert [(op.digest, op.state, op.cache_source, op.inputs) for op in lazy.ops] == [
            (op.digest, op.state, op.cache_source, op.inputs) for op in eager.ops
        ]
        assert (lazy.executed, lazy.cached) == (1, 3)
    assert sorted(ops.execs[:4]) == ["a", "b", "c", "d"]
    assert ops.execs[4:] == ["e"]


async def test_a_recorded_build_is_folded_once_at_the_solve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folds = FoldCount(monkeypatch)
    history = BuildHistory(tmp_path / "history")
    async with Solver(op_kinds=Ops().registry(), history=history) as s:
        async with await s.solve(diamond()) as res:
            assert folds.calls == 1  # recorded before the result was returned
            summary = res.summary
        assert folds.calls == 1
    assert summary is not None
    last = history.get("last").summary
    assert (last.build, last.executed) == (summary.build, summary.executed) == (
        diamond().to_vertices(None).vertex.digest, 4)


class _LoadOrder(InMemoryCacheManager):
    """An in-memory cache whose load of the result ``"v"`` waits until the
    result ``"vc"`` has been loaded (and, with ``hold``, until cancelled), so a
    consumer's ``cached`` event comes first, in every run."""

    def __init__(self, *, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.consumer_loaded = anyio.Event()
        self.input_waiting = anyio.Event()
        self.input_cancelled = False

    async def load(self, record: CacheRecord) -> Result:
        result = await super().load(record)
        if result.sys == "vc":
            self.consumer_loaded.set()
        elif result.sys == "v":
            self.input_waiting.set()
            try:
                await self.consumer_loaded.wait()
                if self.hold:
                    await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.input_cancelled = True
                with anyio.CancelScope(shield=True):
                    await result.release()
                raise
        return result


def consumers_of_v() -> tuple[Definition, Definition]:
    """``C(V)``, then ``T(C(V), D(V))``: C is found, D is new and needs V's result."""
    v = node("test.text", {"text": "v"}, name="V")
    c = node("test.text", {"text": "c"}, inputs=[v], name="C")
    d = node("test.text", {"text": "d"}, inputs=[v], name="D")
    return Definition.of(c), Definition.of(node("test.text", {"text": "t"}, inputs=[c, d],
                                                name="T"))


async def test_an_input_loaded_after_its_found_consumer_says_where_it_came_from(
    handle_tracker: HandleTracker,
) -> None:
    """V is loaded for D after C (also V's consumer) was loaded: C's ``cached``
    event used to mark V cached as ``unneeded`` and V's own event, saying
    ``memory``, was dropped, so the summary said V was never loaded."""
    ops = Ops()
    cache = _LoadOrder()
    async with Solver(op_kinds=ops.registry(), default_cache=cache) as s:
        first, second = consumers_of_v()
        async with await s.solve(first):
            pass
        job = s.new_job()
        async with await s.solve(second, job=job) as res:
            summary = res.summary
            assert res.ref is not None
            assert res.ref.sys == "vcvdt"
        events = await job_events(job)
        await job.discard()
    await cache.close()  # the caller's: it holds the results
    assert ops.execs == ["v", "c", "d", "t"]
    assert cache.consumer_loaded.is_set()
    assert summary is not None
    assert summary.cache_hits == {"memory": 2}
    assert {op.name: (op.state, op.cache_source) for op in summary.ops} == {
        "V": ("cached", "memory"), "C": ("cached", "memory"),
        "D": ("executed", None), "T": ("executed", None),
    }
    # one cached event for V, the load's own
    assert [(e.status, e.cache_source) for e in events if e.name == "V"] == [("cached", "memory")]
    assert ops.live_values() == []


async def test_an_input_whose_load_is_cancelled_after_its_consumer_was_found_is_cached(
    handle_tracker: HandleTracker,
) -> None:
    """When V's load (deferred past C's ``cached`` event) is cancelled, V still
    gets the ``cached`` event C's would have given it, and nothing leaks."""
    ops = Ops()
    cache = _LoadOrder()
    async with Solver(op_kinds=ops.registry(), default_cache=cache) as s:
        first, second = consumers_of_v()
        async with await s.solve(first):
            pass
        cache.hold = True
        job = s.new_job()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(s.solve, second, job=job))
                await cache.input_waiting.wait()
                await cache.consumer_loaded.wait()
                await wait_until(lambda: cache.input_cancelled, scope)
        events = await job_events(job)
        await job.discard()
    await cache.close()  # the caller's: it holds the results
    assert cache.input_cancelled
    assert [(e.status, e.cache_source) for e in events if e.name == "V"] == [("cached", None)]
    assert ops.execs == ["v", "c"]
    assert ops.live_values() == []


async def wait_until(done: Callable[[], bool], scope: anyio.CancelScope) -> None:
    """Let the solve reach V's held load, cancel ``scope``, and wait (shielded)
    until ``done()``."""
    for _ in range(100):
        await anyio.lowlevel.checkpoint()
    scope.cancel()
    with anyio.CancelScope(shield=True):
        for _ in range(1000):
            if done():
                return
            await anyio.sleep(0.001)
