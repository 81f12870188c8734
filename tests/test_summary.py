"""The per-build summary: counts equal the executions the test observes, cache
hits are told apart by source, and the figures (times, critical path) follow
from the op records."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from frontend_support import Ops, text
from persistence_support import SnapOps, chain

from solver import (
    Definition,
    LocalCacheExport,
    LocalCacheImport,
    ProgressEvent,
    Solver,
    SolveRequest,
    node,
)
from solver.insight import BuildSummary, OpRecord, summarize
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
