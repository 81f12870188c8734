"""The cold path with content keys (``compute_digest``): a build whose root
misses runs on the cold path even where a vertex that must run keys an input on
its content. Once that input has a result its content key is computed, the
vertex's keys are asked of the cache (one batched query for all that are ready),
and a hit is loaded only if something needs its result; a miss runs.

The shape is ``benchmarks/cbuild.py``'s in miniature: a source tree, one ``file``
step per unit keyed on the unit's part of the tree, one compile per unit, two
merges that share a cache-map digest (the objects, and the result), an archive.
After an edit of one unit only that unit's steps and what takes them whole run,
with no edge dispatched but the root's, and the counts, values and progress
events are the edges' (the same builds with the path kept off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from solver import Edge, InMemoryCacheManager, Result, Solver
from solver._digest import digest_of
from solver.testing import HandleTracker
from tests.harness import Counters, Gate, TestVertex, TrackingCacheManager, unwrap, vtx
from tests.test_cached_path import run_builds
from tests.test_cold_path import count_unparks

pytestmark = pytest.mark.anyio

TIMEOUT = 10
UNITS = ("a", "b", "c", "d")


class UnitContent:
    """A content key of one unit's part of the source tree (``a=1;b=1;...``),
    counting the keys computed; ``gate`` (when set) holds each computation."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: Gate | None = None

    def of(self, unit: str) -> Callable[[Result], object]:
        async def compute(res: Result) -> str:
            self.calls += 1
            if self.gate is not None:
                await self.gate.wait()
            parts = dict(p.split("=") for p in unwrap(res).split(";"))
            return digest_of(f"{unit}={parts[unit]}".encode())

        return compute


def tree(version: dict[str, int], content: UnitContent) -> TestVertex:
    """The graph of a build of sources at ``version`` (a number per unit)."""
    text = ";".join(f"{u}={version[u]}" for u in UNITS)
    src = vtx(name="src", cache_key_seed=f"src:{text}", value=text)
    objects = []
    for u in UNITS:
        sel = vtx(name=f"sources of {u}", cache_key_seed=f"file {u}", value=f"{u}.c",
                  inputs=[Edge(src)], slow_cache_compute={0: content.of(u)})
        # a compile's output depends on its unit's content, as cc's does
        objects.append(vtx(name=f"cc {u}", cache_key_seed=f"cc {u}",
                           value=f"{u}.o@{version[u]}", inputs=[Edge(sel)]))
    merged = vtx(name="objects", cache_key_seed="merge", value="objects",
                 inputs=[Edge(o) for o in objects])
    archive = vtx(name="ar", cache_key_seed="ar", value="lib.a", inputs=[Edge(merged)])
    # the result is a merge too: one cache-map digest with "objects", two inputs
    return vtx(name="result", cache_key_seed="merge", value="result",
               inputs=[Edge(merged), Edge(archive)])


async def test_an_edit_of_one_unit_runs_its_path_on_the_cold_path(
    handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit ``a`` edited: the source, ``a``'s file step and compile, both merges
    and the archive run; the other units' file steps hit on their content keys
    and are not loaded, their compiles hit and are loaded (the merge takes
    them); one content key per file step; only the root's edge is dispatched."""
    with anyio.fail_after(TIMEOUT):
        content = UnitContent()
        cache = TrackingCacheManager(InMemoryCacheManager())
        async with Solver(resolve_op=lambda v, b: v.sys, default_cache=cache) as s:
            version = dict.fromkeys(UNITS, 1)
            top = tree(version, content)
            counters = top.setup_call_counters()
            unparks = count_unparks(monkeypatch)
            job = s.new_job()
            res = await job.build(Edge(top))
            assert unwrap(res) == "result"
            await res.release()
            await job.discard()
            # cold: everything ran on the cold path, the root's edge alone dispatched
            assert counters.exec == 1 + 2 * len(UNITS) + 3
            assert unparks == ["result"]
            assert content.calls == len(UNITS)

            version["a"] = 2
            top = tree(version, content)
            counters = top.setup_call_counters()
            unparks.clear()
            content.calls = 0
            loads = cache.load_counter
            job = s.new_job()
            seen: dict[str, list[str]] = {}

            async def watch() -> None:
                async for ev in job.status():
                    if ev.status != "log":
                        seen.setdefault(ev.name, []).append(ev.status)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                res = await job.build(Edge(top))
                assert unwrap(res) == "result"
                await res.release()
                await job.discard()
            assert counters == Counters(cache=1 + 2 * len(UNITS) + 3, exec=6)
            assert cache.load_counter - loads == len(UNITS) - 1
            assert content.calls == len(UNITS)
            assert unparks == ["result"]
            for u in UNITS[1:]:
                assert seen[f"sources of {u}"] == ["cached"]
                assert seen[f"cc {u}"] == ["cached"]
            for name in ("src", "sources of a", "cc a", "objects", "ar", "result"):
                assert seen[name] == ["started", "completed"], name

            # nothing changed: one load, no content key (the definition keys match)
            content.calls = 0
            loads = cache.load_counter
            job = s.new_job()
            res = await job.build(Edge(tree(version, content)))
            assert unwrap(res) == "result"
            await res.release()
            await job.discard()
            assert cache.load_counter - loads == 1
            assert content.calls == 0
        await cache.close()


def builds(content: UnitContent) -> list[Callable[[], tuple[Edge, Counters]]]:
    """Cold, ``a`` edited, ``b`` and ``c`` edited, ``a`` back as it was (its
    content keys find the first build's results), nothing changed."""
    versions = [
        {"a": 1, "b": 1, "c": 1, "d": 1},
        {"a": 2, "b": 1, "c": 1, "d": 1},
        {"a": 2, "b": 2, "c": 2, "d": 1},
        {"a": 1, "b": 2, "c": 2, "d": 1},
        {"a": 1, "b": 2, "c": 2, "d": 1},
    ]

    def make(version: dict[str, int]) -> Callable[[], tuple[Edge, Counters]]:
        def build() -> tuple[Edge, Counters]:
            top = tree(version, content)
            return Edge(top), top.setup_call_counters()

        return build

    return [make(v) for v in versions]


async def test_the_same_counts_and_events_as_the_edges(
    handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builds of :func:`builds` in a solver where the path may run and in
    one where a live job keeps it off: the same values, cache-map and exec
    calls, loads and progress events, and the same content keys computed; every
    build took the path."""
    outcomes = []
    for blocked in (False, True):
        content = UnitContent()
        with anyio.fail_after(TIMEOUT * 3):
            run = await run_builds(builds(content), blocked, monkeypatch)
        outcomes.append((run, content.calls))
    (on, on_content), (off, off_content) = outcomes
    assert on.values == off.values
    assert on.calls == off.calls
    assert on.loads == off.loads
    assert on_content == off_content
    for i, (a, b) in enumerate(zip(on.events, off.events, strict=True)):
        assert a == b, (i, sorted((a - b).items()), sorted((b - a).items()))
    # a: the source, its file step and compile, the merges and the archive;
    # b and c: two of each; a back as it was: its compile is found by content,
    # so the source and what takes a new set of objects run
    assert [c[1] for c in on.calls] == [12, 6, 8, 4, 0]
    assert on.seeded == 5
    assert off.seeded == 0


async def test_cancelled_while_a_content_key_is_computed_on_the_cold_path(
    handle_tracker: HandleTracker,
) -> None:
    """The caller is cancelled while the file steps' content keys are computed
    (after the source ran): the computations are cancelled and have stopped
    when ``build`` raises, every handle is released once (the tracker checks),
    nothing is in use once the job is discarded, and the next build is right:
    it computes the content keys again (first asking the cache with the found
    source's definition keys, as the edges do) and runs what the edit needs."""
    with anyio.fail_after(TIMEOUT):
        content = UnitContent()
        cache = TrackingCacheManager(InMemoryCacheManager())
        async with Solver(resolve_op=lambda v, b: v.sys, default_cache=cache) as s:
            version = dict.fromkeys(UNITS, 1)
            job = s.new_job()
            res = await job.build(Edge(tree(version, content)))
            await res.release()
            await job.discard()

            version["b"] = 2
            gate = content.gate = Gate()
            top = tree(version, content)
            counters = top.setup_call_counters()
            job = s.new_job()
            returned_with: list[int] = []
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def run() -> None:
                        try:
                            await job.build(Edge(top))
                        finally:
                            returned_with.append(gate.running)

                    tg.start_soon(run)
                    await gate.entered.wait()
                    await anyio.wait_all_tasks_blocked()
                    assert gate.running == len(UNITS)
                    scope.cancel()
            assert scope.cancelled_caught
            assert returned_with == [0]
            assert gate.cancelled == len(UNITS)
            assert counters.exec == 1  # the source only
            await job.discard()
            assert not s._actives

            content.gate = None
            content.calls = 0
            top = tree(version, content)
            counters = top.setup_call_counters()
            loads = cache.load_counter
            job = s.new_job()
            res = await job.build(Edge(top))
            assert unwrap(res) == "result"
            await res.release()
            await job.discard()
            assert content.calls == len(UNITS)
            # The source ran and was saved before the cancellation: it is found,
            # and loaded for its content keys (its definition keys lead the file
            # steps nowhere). b's file step and compile, the merges and the
            # archive run; the other compiles are loaded for the merge.
            assert counters.exec == 5
            assert cache.load_counter - loads == 1 + len(UNITS) - 1
        await cache.close()


class GatedQueries(TrackingCacheManager):
    """Holds the second ``query_many`` call (and those after it) on ``gate``,
    when set: the first is the key pass's."""

    def __init__(self) -> None:
        super().__init__(InMemoryCacheManager())
        self.gate: Gate | None = None
        self.calls = 0

    async def query_many(self, requests: Any) -> Any:
        if self.gate is not None:
            self.calls += 1
            if self.calls >= 2:
                await self.gate.wait()
        return await super().query_many(requests)


async def test_cancelled_while_the_cold_path_asks_the_cache(
    handle_tracker: HandleTracker,
) -> None:
    """The caller is cancelled while the cold path asks the cache for the keys
    of the file steps whose content keys are in: the cache call is shielded (as
    the dispatcher's are) and finishes, the cancellation takes effect at the
    next wait and stops what runs; every handle is released once (the tracker
    checks), nothing is in use once the job is discarded, and the next build
    runs what the edit still needs and no more (not the source, saved before
    the cancellation; a step cancelled mid-run runs again, so the two builds'
    execs are bounded per build, not summed to exactly the edit's)."""
    with anyio.fail_after(TIMEOUT):
        content = UnitContent()
        cache = GatedQueries()
        async with Solver(resolve_op=lambda v, b: v.sys, default_cache=cache) as s:
            version = dict.fromkeys(UNITS, 1)
            job = s.new_job()
            res = await job.build(Edge(tree(version, content)))
            await res.release()
            await job.discard()
            content.calls = 0

            version["c"] = 2
            gate = cache.gate = Gate()
            top = tree(version, content)
            counters = top.setup_call_counters()
            job = s.new_job()
            held: list[tuple[int, int]] = []

            async def opener() -> None:
                # the key pass's query_many went through; the cold path's first
                # is held: once the cancelled build waits there, open it
                await gate.entered.wait()
                await anyio.wait_all_tasks_blocked()
                held.append((gate.running, gate.cancelled))
                gate.opened.set()

            async with anyio.create_task_group() as outer:
                outer.start_soon(opener)
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(job.build, Edge(top))
                        await gate.entered.wait()
                        assert content.calls >= 1  # the keys it asks about
                        scope.cancel()
            # shielded: the cache call was still running, not cancelled
            assert held == [(1, 0)]
            assert scope.cancelled_caught
            # the source, and what the answers queued before the cancellation
            # took effect (at the pass's next wait) started: c's path
            ran_before = counters.exec
            assert 1 <= ran_before <= 6
            await job.discard()
            assert not s._actives

            cache.gate = None
            top = tree(version, content)
            counters = top.setup_call_counters()
            job = s.new_job()
            res = await job.build(Edge(top))
            assert unwrap(res) == "result"
            await res.release()
            await job.discard()
            # the source was saved before the cancellation: at most c's file
            # step and compile, the merges and the archive run, and every one of
            # them ran in one of the two builds
            assert counters.exec <= 5
            assert ran_before + counters.exec >= 6
        await cache.close()


class FailingQueries(TrackingCacheManager):
    """The second ``query_many`` call (the cold path's first) raises, once."""

    def __init__(self) -> None:
        super().__init__(InMemoryCacheManager())
        self.armed = False
        self.calls = 0

    async def query_many(self, requests: Any) -> Any:
        if self.armed:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("the cache is down")
        return await super().query_many(requests)


async def test_a_failing_query_on_the_cold_path_leaves_the_build_to_the_edges(
    handle_tracker: HandleTracker,
) -> None:
    """The cold path's query fails: it stops, and the edges finish the build
    (asking the cache one query at a time, as they do) with what ran memoized:
    the right result, each step of the edit's path run once."""
    with anyio.fail_after(TIMEOUT):
        content = UnitContent()
        cache = FailingQueries()
        async with Solver(resolve_op=lambda v, b: v.sys, default_cache=cache) as s:
            version = dict.fromkeys(UNITS, 1)
            job = s.new_job()
            res = await job.build(Edge(tree(version, content)))
            await res.release()
            await job.discard()

            version["d"] = 2
            cache.armed = True
            top = tree(version, content)
            counters = top.setup_call_counters()
            job = s.new_job()
            res = await job.build(Edge(top))
            assert unwrap(res) == "result"
            await res.release()
            await job.discard()
            assert cache.calls >= 2
            assert counters.exec == 6
            assert not s._actives
        await cache.close()


class RecordlessOnce(TrackingCacheManager):
    """Once armed, the first ``records`` call finds nothing (a hit whose record
    went between the query and the load), then the cache answers as it is."""

    def __init__(self) -> None:
        super().__init__(InMemoryCacheManager())
        self.armed = False
        self.emptied = 0

    async def records(self, key: Any) -> Any:
        if self.armed:
            self.armed = False
            self.emptied += 1
            return []
        return await super().records(key)


async def test_a_hit_found_without_a_record_leaves_the_build_to_the_edges(
    handle_tracker: HandleTracker,
) -> None:
    """A hit the cold path found has no record when it is to be loaded: the
    run stops (what it asked for is cancelled or taken, and released) and the
    edges finish the build: the right result, nothing held afterwards, every
    handle released once (the tracker checks)."""
    with anyio.fail_after(TIMEOUT):
        content = UnitContent()
        cache = RecordlessOnce()
        async with Solver(resolve_op=lambda v, b: v.sys, default_cache=cache) as s:
            version = dict.fromkeys(UNITS, 1)
            job = s.new_job()
            res = await job.build(Edge(tree(version, content)))
            await res.release()
            await job.discard()

            version["d"] = 2
            cache.armed = True
            top = tree(version, content)
            counters = top.setup_call_counters()
            job = s.new_job()
            res = await job.build(Edge(top))
            assert unwrap(res) == "result"
            await res.release()
            await job.discard()
            assert cache.emptied == 1
            # d's path ran; the hit whose record was missing may have run on the
            # edges in its place, nothing more
            assert 6 <= counters.exec <= 7
            assert not s._actives
        await cache.close()
