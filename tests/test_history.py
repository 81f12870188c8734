"""The build history: one record per build, pruned by policy; traces and
comparisons made from the records."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from frontend_support import Ops, text
from persistence_support import SnapOps, chain
from test_solve_checkpoints import cancel_at_suspension, every_suspension

from solver import (
    CacheMap,
    Definition,
    OpContext,
    OpKindRegistry,
    Result,
    SolveError,
    Solver,
    digest_of,
    log_output,
    node,
)
from solver.insight import (
    BuildHistory,
    BuildSummary,
    HistoryError,
    HistoryPolicy,
    OpRecord,
    chrome_trace,
    compare_builds,
)
from solver.testing import HandleTracker
from solver.worker import Worker

pytestmark = pytest.mark.anyio


class _LoudFail:
    """Writes three lines, then fails."""

    def __init__(self, ctx: OpContext) -> None:
        self.message = str(ctx.payload["message"])

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(f"loud:{self.message}".encode()), []), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        log_output(b"line 1\nline 2\n")
        log_output(b"line 3\n", 2)
        raise RuntimeError(self.message)


def registry(ops: Ops) -> OpKindRegistry:
    kinds = ops.registry()
    kinds.register("test.loud", _LoudFail)
    return kinds


async def test_one_record_per_solve_done_or_failed(tmp_path: Path) -> None:
    ops = Ops()
    history = BuildHistory(tmp_path / "history")
    async with Solver(op_kinds=registry(ops), history=history) as s:
        async with await s.solve(text("a", "b")) as res:
            first = res.summary
        async with await s.solve(text("a", "b")):
            pass
        loud = Definition.of(node("test.loud", {"message": "boom"}, name="loud"))
        with pytest.raises(SolveError, match="boom"):
            await s.solve(loud)
    assert ops.execs == ["a", "b"]
    entries = history.entries()  # newest first
    assert [(e.executed, e.cached, e.failed) for e in entries] == [(0, 0, 1), (0, 2, 0), (2, 0, 0)]
    assert len(list(tmp_path.joinpath("history").iterdir())) == 3
    cold = history.get(entries[-1].id)
    assert first is not None
    assert cold.summary.build == first.build == text("a", "b").to_vertices(None).vertex.digest
    assert [(op.state, op.duration) for op in cold.summary.ops] == [
        (op.state, op.duration) for op in first.ops
    ]
    assert cold.summary.ops[1].inputs == (cold.summary.ops[0].digest,)
    failed = history.get("last").summary.ops[0]
    assert (failed.name, failed.state) == ("loud", "failed")
    assert failed.error is not None
    assert "boom" in failed.error
    assert failed.log_tail == "line 1\nline 2\nline 3"
    assert failed.reason is None  # until the engine says why an op ran
    assert history.last is not None
    assert history.last.id == entries[0].id


async def test_history_true_uses_the_workers_store(tmp_path: Path) -> None:
    with pytest.raises(SolveError, match="has no worker: pass a BuildHistory"):
        Solver(op_kinds=Ops().registry(), history=True)
    ops = SnapOps()
    async with Worker(tmp_path / "store") as worker:
        ops.register(worker)
        async with Solver(worker=worker, history=True) as s:
            assert s.history is not None
            assert s.history.directory == tmp_path / "store" / "history"
            async with await s.solve(chain("a")):
                pass
        assert [e.executed for e in s.history.entries()] == [1]
    # off by default
    async with Solver(op_kinds=Ops().registry()) as s2:
        assert s2.history is None


def test_records_are_pruned_by_count_and_age(tmp_path: Path) -> None:
    history = BuildHistory(tmp_path, HistoryPolicy(keep_records=3, keep_duration=None))
    ids = [history.add(BuildSummary(f"b{i}", 1000.0 + i, 1001.0 + i, ())).id for i in range(5)]
    # each add applied the policy: the 3 newest are left
    assert [e.id for e in history.entries()] == ids[:1:-1]
    assert [e.build for e in history.entries()] == ["b4", "b3", "b2"]
    # by age: builds started before now - 3.5s (1002.5) go
    deleted = history.prune(HistoryPolicy(keep_records=None, keep_duration=3.5), now=1006.0)
    assert deleted == [ids[2]]
    assert history.prune(HistoryPolicy(keep_records=0, keep_duration=None)) == ids[3:]
    assert history.entries() == []
    # a crashed writer's .tmp is removed once old
    (tmp_path / "123-x.tmp").write_text("half")
    history.prune()
    assert (tmp_path / "123-x.tmp").exists()  # maybe another writer's, in progress
    os.utime(tmp_path / "123-x.tmp", (time.time() - 3700, time.time() - 3700))
    history.prune()
    assert not (tmp_path / "123-x.tmp").exists()
    with pytest.raises(ValueError, match="keep_records"):
        HistoryPolicy(keep_records=-1)


def test_ids_prefixes_and_errors(tmp_path: Path) -> None:
    history = BuildHistory(tmp_path / "h", HistoryPolicy(keep_duration=None))
    with pytest.raises(HistoryError, match="is empty"):
        history.get("last")
    a = history.add(BuildSummary("x", 1.0, 2.0, (OpRecord("d", "n", "executed", 1.0, 2.0),)))
    got = history.get(a.id[:4])
    assert got.summary.ops == a.summary.ops
    with pytest.raises(HistoryError, match="no build 'zz'"):
        history.get("zz")
    path = next((tmp_path / "h").iterdir())
    path.write_text("{not json")
    with pytest.raises(HistoryError, match="is damaged"):
        history.get(a.id)


def op(digest: str, state: str, start: float | None, end: float | None, *inputs: str,
       name: str | None = None, source: str | None = None) -> OpRecord:
    return OpRecord(digest, name or digest, state, start, end, source, inputs=inputs)


def test_chrome_trace_tracks_never_overlap_and_durations_agree() -> None:
    ops = (
        op("a", "executed", 0.0, 1.0),
        op("b", "executed", 0.5, 2.0),
        op("c", "executed", 1.0, 1.5, "a"),  # starts when a ends: a's slot again
        op("d", "executed", 0.7, 0.9),
        op("e", "cached", None, 2.1, source="local"),
        op("f", "failed", 2.0, 3.25, "b", "c"),
        op("g", "not run", None, None, "f"),
    )
    s = BuildSummary("f", 0.0, 3.5, ops)
    doc = json.loads(json.dumps(chrome_trace(s)))
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in slices) == list("abcdefg")  # one per op
    by = {e["name"]: e for e in slices}
    for o in ops:
        assert by[o.digest]["dur"] == pytest.approx(o.duration * 1e6, abs=1)
        assert by[o.digest]["cat"] == o.state
    assert by["e"]["args"]["cache_source"] == "local"
    tracks: dict[int, list[tuple[int, int]]] = {}
    for e in slices:
        tracks.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in tracks.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end
    # three ran at once at most (a, b, d): three slots, plus the instants' track
    assert len(tracks) == 4
    assert by["c"]["tid"] == by["a"]["tid"]
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"
             and e["name"] == "thread_name"}
    assert names[by["g"]["tid"]] == "cached / not run"
    assert by["g"]["ts"] == 3_500_000


def test_compare_lists_exactly_the_ops_that_changed() -> None:
    a = BuildSummary("x", 0.0, 1.0, (
        op("s1", "cached", None, 0.1, name="sources", source="local"),
        op("c1", "cached", None, 0.1, "s1", name="compile", source="local"),
        op("t1", "executed", 0.1, 0.3, "c1", name="test"),
        op("l1", "cached", None, 0.1, name="lint", source="unneeded"),
        op("o1", "executed", 0.1, 0.2, name="old"),
    ))
    b = BuildSummary("y", 0.0, 2.0, (
        op("s2", "executed", 0.0, 0.1, name="sources"),  # changed: new digest, ran
        op("c2", "executed", 0.1, 1.1, "s2", name="compile"),
        op("t2", "executed", 1.1, 1.9, "c2", name="test"),
        op("l1", "executed", 0.0, 0.05, name="lint"),  # same digest, was cached
        op("n2", "executed", 0.0, 0.01, name="new"),
    ))
    cmp = compare_builds(a, b)
    assert [(c.b.name, c.same_digest) for c in cmp.ran_instead_of_cached] == [
        ("sources", False), ("compile", False), ("lint", True),
    ]
    assert [o.name for o in cmp.new] == ["new"]
    assert [o.name for o in cmp.gone] == ["old"]
    assert [(c.b.name, round(c.time_change, 3)) for c in cmp.time_changes] == [("test", 0.6)]
    lines = cmp.lines()
    assert lines[0] == "Ran in B, cached in A: 3"
    assert "  test: 0.200s -> 0.800s (+0.600s)" in lines
    # a build against itself: nothing changed
    same = compare_builds(a, a)
    assert (same.ran_instead_of_cached, same.new, same.gone) == ((), (), ())
    # a step the shared cache restored in B has a start but did not run
    restored = BuildSummary("z", 0.0, 1.0, (
        op("s1", "cached", 0.0, 0.1, name="sources", source="shared"),
    ))
    assert restored.ran() == []
    assert compare_builds(a, restored).ran_instead_of_cached == ()


async def test_history_solve_cancelled_at_each_suspension(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    runs = 0

    async def run(n: int) -> bool:
        nonlocal runs
        runs += 1
        ops = Ops()
        history = BuildHistory(tmp_path / f"h{n}")
        with anyio.fail_after(10):
            async with Solver(op_kinds=ops.registry(), history=history) as s:
                result, count = await cancel_at_suspension(n, lambda: s.solve(text("a", "b")))
                if result is not None:
                    assert result.summary is not None
                    assert result.summary.executed == len(ops.execs) == 2
                    await result.release()
        for value in ops.results:
            assert value.live_count == 0, value
            assert value.release_count == value._shared.handles, value
        # a solve cancelled after its build began is recorded too, once
        assert len(history.entries()) == 1
        return count < n

    last = await every_suspension(run)
    assert last > 3


def test_a_record_reads_back_exactly(tmp_path: Path) -> None:
    """Every field survives the record's hand-written encoding: quotes, control
    characters and non-ASCII text, missing values, times, inputs by position."""
    history = BuildHistory(tmp_path, HistoryPolicy(keep_duration=None))
    ops = (
        OpRecord("sha256:" + "a" * 64, 'say "hi"\tnow ✓', "cached", None, 1.5, "local"),
        OpRecord("sha256:" + "b" * 64, "b\\c", "failed", 1.25, 2.0000001, None,
                 "exit 1:\nline\x00two\r\n", "tail ✗\n\x1b[31mred", "input changed",
                 ("sha256:" + "a" * 64, "sha256:" + "z" * 64)),
        OpRecord("sha256:" + "c" * 64, "", "not run"),
    )
    record = history.add(BuildSummary("sha256:" + "b" * 64, 1.0, 3.0, ops))
    back = history.get(record.id).summary
    # an input that is not an op of the record (a nested build's) is not kept
    assert back.ops[1].inputs == ("sha256:" + "a" * 64,)
    assert back.ops[0] == ops[0]
    assert back.ops[1]._replace(inputs=ops[1].inputs) == ops[1]
    assert back.ops[2] == ops[2]
    assert (back.build, back.started, back.ended) == (record.summary.build, 1.0, 3.0)


def test_builds_started_at_once_list_in_the_order_written(tmp_path: Path) -> None:
    history = BuildHistory(tmp_path, HistoryPolicy(keep_duration=None))
    ids = []
    for n in range(5):
        ids.append(history.add(BuildSummary(f"b{n}", 5.0, 6.0, ())).id)
        # a later write, even within the file system's time resolution
        path = next(p for p in tmp_path.iterdir() if ids[-1] in p.name)
        os.utime(path, ns=(n * 10**9, n * 10**9))
    assert [e.id for e in history.entries()] == ids[::-1]
    assert history.get("last").id == ids[-1]
