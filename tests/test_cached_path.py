"""The cached path (``solver/_cachedpath.py``): a build resolved in two passes
(all cache maps at once, then keys inputs-first) and its root edge seeded.

Two kinds of test. Direct ones prove that the path is taken when it should be (a
warm build leaves the inner vertices without edges), that it gives up when it
must, that cache maps still run concurrently, and what a cancellation does at
each of its awaits. Differential ones run the same builds twice, once in a
solver where the path can run and once where a live job keeps it off (the path
runs only while the live edge index is empty), and require the same values, op
calls, cache loads and progress events: the path must be invisible apart from
its speed.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import pytest

from solver import (
    CacheKey,
    CacheKeyWithSelector,
    CacheManager,
    CacheRecord,
    Edge,
    InMemoryCacheManager,
    Job,
    SolveError,
    Solver,
)
from solver.cache import InMemoryCacheStorage, InMemoryResultStorage, KeyedCacheManager
from solver.engine import _jobs as solver_module
from solver.engine._cachedpath import seed_cached_root
from solver.testing import HandleTracker
from tests.harness import (
    Counters,
    Gate,
    TestVertex,
    TrackingCacheManager,
    build_value,
    digest_from_result,
    generate_sub_graph,
    resolve_op,
    vtx,
)

pytestmark = pytest.mark.anyio

TIMEOUT = 10


def inner_digests(root: TestVertex) -> list[str]:
    """Every vertex digest below ``root``."""
    out: list[str] = []
    seen: set[str] = set()
    stack = [inp.vertex for inp in root.inputs]
    while stack:
        v = stack.pop()
        if v.digest in seen:
            continue
        seen.add(v.digest)
        out.append(v.digest)
        stack.extend(inp.vertex for inp in v.inputs)
    return out


def diamond(prefix: str = "", **leaf: object) -> TestVertex:
    """top <- (left, right) <- base, plus a second leaf under ``right``."""
    base = vtx(name=f"{prefix}base", cache_key_seed=f"{prefix}base", value="base", **leaf)
    other = vtx(name=f"{prefix}other", cache_key_seed=f"{prefix}other", value="other")
    left = vtx(name=f"{prefix}left", cache_key_seed=f"{prefix}left", value="left",
               inputs=[Edge(base)])
    right = vtx(name=f"{prefix}right", cache_key_seed=f"{prefix}right", value="right",
                inputs=[Edge(base), Edge(other)])
    return vtx(name=f"{prefix}top", cache_key_seed=f"{prefix}top", value="top",
               inputs=[Edge(left), Edge(right)])


async def warm_up(s: Solver, top: TestVertex) -> None:
    """Build ``top`` in a job of its own and discard it: it is all cached now."""
    job = s.new_job()
    assert await build_value(job, Edge(top)) == "top"
    await job.discard()


@contextlib.asynccontextmanager
async def solver_with_path(cache: CacheManager, off: bool) -> AsyncIterator[Solver]:
    """A solver over ``cache``; with ``off``, a live job whose edge is in the
    live index keeps the cached path off while it runs."""
    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
        if not off:
            yield s
            return
        job = s.new_job("blocker")
        blocker = vtx(name="blocker", cache_key_seed="blocker", value="blocker")
        assert await build_value(job, Edge(blocker)) == "blocker"
        assert len(s._index), "the blocker's edge must be indexed"
        yield s
        await job.discard()


# -- the path is taken, and what it costs ----------------------------------------------


async def test_warm_build_takes_the_cached_path(handle_tracker: HandleTracker) -> None:
    """A warm build in a new job: one cache map per vertex, no exec, exactly one
    load, and no inner vertex gets an edge (the root's edge was seeded)."""
    with anyio.fail_after(TIMEOUT):
        cache = TrackingCacheManager(InMemoryCacheManager())
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            top = diamond()
            counters = top.setup_call_counters()
            await warm_up(s, top)
            assert counters == Counters(cache=5, exec=5)
            assert cache.load_counter == 0

            j1 = s.new_job()
            assert await build_value(j1, Edge(top)) == "top"
            assert counters == Counters(cache=10, exec=5)
            assert cache.load_counter == 1
            for d in inner_digests(top):
                assert s._actives[d].edges == {}, "an inner vertex got an edge"
            assert list(s._actives[top.digest].edges) == [0]
            await j1.discard()
        await cache.close()


async def test_cold_build_asks_each_cache_map_once(handle_tracker: HandleTracker) -> None:
    """A cold build: the first pass asks every cache map, the edges then find them
    memoized; every op runs once and every vertex gets its edge."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            top = diamond()
            counters = top.setup_call_counters()
            j0 = s.new_job()
            assert await build_value(j0, Edge(top)) == "top"
            assert counters == Counters(cache=5, exec=5)
            for d in inner_digests(top):
                assert s._actives[d].edges, "an inner vertex of a cold build has no edge"
            await j0.discard()


async def test_a_live_job_keeps_the_path_off(handle_tracker: HandleTracker) -> None:
    with anyio.fail_after(TIMEOUT):
        cache = TrackingCacheManager(InMemoryCacheManager())
        async with solver_with_path(cache, off=True) as s:
            top = diamond()
            counters = top.setup_call_counters()
            await warm_up(s, top)
            j1 = s.new_job()
            assert await build_value(j1, Edge(top)) == "top"
            assert counters == Counters(cache=10, exec=5)
            assert cache.load_counter == 1
            assert any(s._actives[d].edges for d in inner_digests(top))
            await j1.discard()
        await cache.close()


async def test_an_ignore_cache_vertex_keeps_the_path_off(
    handle_tracker: HandleTracker,
) -> None:
    """An ignore-cache vertex: the path gives up (inner vertices get edges) and
    the counts are those of a solver where it is kept off. (Content keys are
    the path's: ``test_cached_path_content_keys.py``.)"""

    def graph() -> TestVertex:
        return diamond(ignore_cache=True)

    outcomes = []
    for off in (False, True):
        with anyio.fail_after(TIMEOUT):
            cache = TrackingCacheManager(InMemoryCacheManager())
            async with solver_with_path(cache, off) as s:
                top = graph()
                counters = top.setup_call_counters()
                for _ in range(2):
                    j = s.new_job()
                    assert await build_value(j, Edge(top)) == "top"
                    assert any(s._actives[d].edges for d in inner_digests(top))
                    await j.discard()
                outcomes.append((counters.cache, counters.exec, cache.load_counter))
            await cache.close()
    assert outcomes[0] == outcomes[1]


# -- concurrency and cancellation ---------------------------------------------------------


@dataclass
class Barrier:
    """Callers wait until ``n`` of them have arrived, once armed; pass through
    otherwise."""

    n: int
    armed: bool = False
    arrived: int = 0
    event: anyio.Event = field(default_factory=anyio.Event)

    async def wait(self) -> None:
        if not self.armed:
            return
        self.arrived += 1
        if self.arrived == self.n:
            self.event.set()
        await self.event.wait()


async def test_cache_maps_of_a_warm_build_run_concurrently(
    handle_tracker: HandleTracker,
) -> None:
    """The first pass asks every cache map at once: two cache maps that each wait
    for the other (BuildKit's TestParallelInputs, on a warm build) both finish."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            barrier = Barrier(2)
            a = vtx(name="a", cache_key_seed="a", value="a", cache_pre_func=barrier.wait)
            b = vtx(name="b", cache_key_seed="b", value="b", cache_pre_func=barrier.wait)
            top = vtx(name="top", cache_key_seed="top", value="top",
                      inputs=[Edge(a), Edge(b)])
            counters = top.setup_call_counters()
            await warm_up(s, top)
            barrier.armed = True
            j1 = s.new_job()
            assert await build_value(j1, Edge(top)) == "top"
            assert barrier.arrived == 2
            assert counters == Counters(cache=6, exec=3)
            await j1.discard()


async def test_the_leaves_cache_maps_start_first(handle_tracker: HandleTracker) -> None:
    """The pass asks for the cache maps root first, so that the work pool, which
    runs the units queued newest first, starts the leaves' first: a leaf's is
    the one that blocks (a local source's stat check, in a thread), and it runs
    beside the others instead of after them. Every vertex starts its cache map
    after each of its inputs'."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            started: list[str] = []
            armed = [False]

            def hook(name: str) -> Callable[[], Awaitable[None]]:
                async def note() -> None:
                    if armed[0]:
                        started.append(name)

                return note

            def node(name: str, *inputs: TestVertex) -> TestVertex:
                return vtx(name=name, cache_key_seed=name, value=name,
                           cache_pre_func=hook(name), inputs=[Edge(i) for i in inputs])

            base, other = node("base"), node("other")
            left, right = node("left", base), node("right", base, other)
            top = node("top", left, right)
            await warm_up(s, top)
            armed[0] = True
            job = s.new_job()
            assert await build_value(job, Edge(top)) == "top"
            await job.discard()
            assert sorted(started) == ["base", "left", "other", "right", "top"]
            assert started[0] == "base"
            for consumer, inputs in (("left", ["base"]), ("right", ["base", "other"]),
                                     ("top", ["left", "right"])):
                for inp in inputs:
                    assert started.index(inp) < started.index(consumer), started


async def test_cancelled_while_a_cache_map_runs(handle_tracker: HandleTracker) -> None:
    """Cancelled in the first pass: the cache map it alone waited for is cancelled
    and has stopped when ``build`` raises; nothing is memoized, so the next build
    asks it again and succeeds with a load."""
    with anyio.fail_after(TIMEOUT):
        cache = TrackingCacheManager(InMemoryCacheManager())
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            gate = Gate()
            armed = [False]

            async def hook() -> None:
                if armed[0]:
                    await gate.wait()

            top = diamond(cache_pre_func=hook)
            counters = top.setup_call_counters()
            await warm_up(s, top)

            armed[0] = True
            job = s.new_job("cancelled")
            stopped_at_return: list[int] = []
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def run() -> None:
                        try:
                            await job.build(Edge(top))
                        finally:
                            stopped_at_return.append(gate.running)

                    tg.start_soon(run)
                    await gate.entered.wait()
                    scope.cancel()
            assert stopped_at_return == [0]
            assert gate.cancelled == 1
            await job.discard()

            armed[0] = False
            j2 = s.new_job()
            assert await build_value(j2, Edge(top)) == "top"
            # the cancelled cache map was asked again; the others of j2 too
            assert counters.exec == 5
            assert cache.load_counter == 1
            await j2.discard()
        await cache.close()


class GatedCache(TrackingCacheManager):
    """Blocks ``query`` calls with deps, and batches of them, on a gate while
    ``armed``."""

    def __init__(self) -> None:
        super().__init__(InMemoryCacheManager())
        self.gate = Gate()
        self.armed = False

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        if self.armed and deps:
            await self.gate.wait()
        return await super().query(deps, input, digest, output)

    async def query_many(
        self, requests: Sequence[tuple[Sequence[CacheKeyWithSelector], int, str, int]]
    ) -> list[list[CacheKey]]:
        # the pass's batched queries: one gate per batch with deps
        if self.armed and any(deps for deps, *_ in requests):
            await self.gate.wait()
        return await super().query_many(requests)


async def cancel_while_gated(job: Job, top: TestVertex, gate: Gate) -> None:
    """Build ``top`` in ``job`` and cancel the build once a call waits on
    ``gate``: the build must not return while the call runs, and must raise the
    cancellation once the gate opens and the call returns."""
    done = anyio.Event()
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            with scope:
                try:
                    await job.build(Edge(top))
                finally:
                    done.set()

        tg.start_soon(run)
        await gate.entered.wait()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set(), "build returned during a gated cache call"
        gate.opened.set()
    assert scope.cancelled_caught


async def test_cancelled_during_the_cache_calls_returns_after_them(
    handle_tracker: HandleTracker,
) -> None:
    """Cancelled in the second pass: like the dispatcher's, a cache call is not
    interrupted; ``build`` raises the cancellation once it has returned."""
    with anyio.fail_after(TIMEOUT):
        cache = GatedCache()
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            top = diamond()
            top.setup_call_counters()
            await warm_up(s, top)

            cache.armed = True
            job = s.new_job("cancelled")
            await cancel_while_gated(job, top, cache.gate)
            assert cache.gate.cancelled == 0
            assert cache.load_counter == 0
            await job.discard()

            j2 = s.new_job()
            assert await build_value(j2, Edge(top)) == "top"
            assert cache.load_counter == 1
            await j2.discard()
        await cache.close()


class GatedRootKeys(InMemoryCacheStorage):
    """A key storage whose batched root-key reads (``exists_many``, the leaves
    of a layer) wait on a gate while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.armed = False

    async def exists_many(self, ids: Sequence[str]) -> list[bool]:
        if self.armed:
            await self.gate.wait()
        return await super().exists_many(ids)


async def test_cancelled_while_the_root_keys_are_read_returns_after_them(
    handle_tracker: HandleTracker,
) -> None:
    """Cancelled while the pass reads its leaves' root keys in one batch
    (``exists_many``): the read is not interrupted, ``build`` raises the
    cancellation once it has returned, nothing was loaded or run, and the next
    build loads the root once."""
    with anyio.fail_after(TIMEOUT):
        storage = GatedRootKeys()
        inner = KeyedCacheManager("gated-root-keys", storage, InMemoryResultStorage())
        cache = TrackingCacheManager(inner)
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            top = diamond()
            counters = top.setup_call_counters()
            await warm_up(s, top)
            execs = counters.exec

            storage.armed = True
            job = s.new_job("cancelled")
            await cancel_while_gated(job, top, storage.gate)
            assert storage.gate.calls == 1
            assert storage.gate.cancelled == 0
            assert cache.load_counter == 0
            await job.discard()

            j2 = s.new_job()
            assert await build_value(j2, Edge(top)) == "top"
            assert cache.load_counter == 1
            assert storage.gate.calls == 2
            assert counters.exec == execs
            await j2.discard()
        await cache.close()


async def test_failed_load_of_the_seeded_root_falls_back_to_the_edges(
    handle_tracker: HandleTracker,
) -> None:
    """Every load fails: the seeded root asks its inputs as the edges do, and the
    build runs everything again (the same counts as without the path)."""
    results = []
    for off in (False, True):
        with anyio.fail_after(TIMEOUT):
            cache = TrackingCacheManager(InMemoryCacheManager())
            async with solver_with_path(cache, off) as s:
                top = diamond()
                counters = top.setup_call_counters()
                await warm_up(s, top)
                cache.force_fail = True
                j1 = s.new_job()
                assert await build_value(j1, Edge(top)) == "top"
                await j1.discard()
                results.append((counters.cache, counters.exec, cache.load_counter))
            await cache.close()
    assert results[0] == results[1]
    assert results[0][1] == 10  # every op ran again


# -- differential: the same builds with the path on and off ------------------------------


@dataclass
class Run:
    seeded: int = 0
    values: list[str] = field(default_factory=list)
    calls: list[tuple[int, int]] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)
    events: list[Counter[tuple[str, str]]] = field(default_factory=list)


async def run_builds(
    graphs: Sequence[Callable[[], tuple[Edge, Counters]]],
    blocked: bool,
    monkeypatch: pytest.MonkeyPatch,
    fail_loads_from: int | None = None,
) -> Run:
    """Build each graph in a new job of one solver (each discarded before the
    next); record values, op calls, loads, each job's progress events and how
    many root edges the path seeded. From build ``fail_loads_from`` on, every
    cache load fails."""
    run = Run()

    async def counted(s: Solver, root: Edge) -> bool:
        seeded = await seed_cached_root(s, root)
        run.seeded += seeded
        return seeded

    monkeypatch.setattr(solver_module, "seed_cached_root", counted)
    cache = TrackingCacheManager(InMemoryCacheManager())
    async with solver_with_path(cache, blocked) as s:
        # the blocker's own (cold) build is not one of the graphs
        run.seeded = 0
        for i, make in enumerate(graphs):
            cache.force_fail = fail_loads_from is not None and i >= fail_loads_from
            edge, counters = make()
            job = s.new_job()
            seen: Counter[tuple[str, str]] = Counter()
            async with anyio.create_task_group() as tg:

                async def watch(job: Job = job, seen: Counter[tuple[str, str]] = seen) -> None:
                    async for ev in job.status():
                        if ev.status != "log":
                            # names end with a random part: compare without it
                            seen[ev.name.rsplit("-", 1)[0], ev.status] += 1

                tg.start_soon(watch)
                before = cache.load_counter
                res = await job.build(edge)
                run.values.append(str(await digest_from_result(res)))
                await res.release()
                run.loads.append(cache.load_counter - before)
                await job.discard()
            run.calls.append((counters.cache, counters.exec))
            run.events.append(seen)
    await cache.close()
    return run


def random_graph(seed: int, nodes: int) -> Callable[[], tuple[Edge, Counters]]:
    def make() -> tuple[Edge, Counters]:
        edge, _ = generate_sub_graph(nodes, random.Random(seed))
        vertex = edge.vertex
        assert isinstance(vertex, TestVertex)
        return edge, vertex.setup_call_counters()

    return make


@pytest.mark.parametrize("seed", range(12))
async def test_same_counts_with_the_path_on_and_off(
    seed: int, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random sum/const graphs (equal constants share keys, so the edges merge):
    cold, warm, warm again, then a graph with a different seed on the same cache
    (partly cached), then the first one again. Values, cache-map and exec calls,
    loads and progress events are the same whether the path may run or not."""
    nodes = 20 + seed * 7
    graphs = [
        random_graph(seed, nodes),
        random_graph(seed, nodes),
        random_graph(seed, nodes),
        random_graph(seed + 100, nodes),
        random_graph(seed, nodes),
    ]
    with anyio.fail_after(TIMEOUT * 3):
        on = await run_builds(graphs, False, monkeypatch)
        off = await run_builds(graphs, True, monkeypatch)
    assert on.values == off.values
    assert on.calls == off.calls
    assert on.loads == off.loads
    assert on.events == off.events
    assert on.loads[1] == on.loads[2] == on.loads[4] == 1
    # the warm builds took the path (and the fifth, unless the fourth evicted it)
    assert on.seeded >= 2
    assert off.seeded == 0


async def test_export_after_the_cache_closed_is_the_same_with_the_path_on_and_off(
    handle_tracker: HandleTracker,
) -> None:
    """Keys found by the path read their records only when an export reaches
    them; once the cache is closed they have none, and the export is what it is
    without the path (no error: a closed cache's records are skipped)."""
    from tests.test_cache_export import RecordingTarget, export

    summaries = []
    for off in (False, True):
        with anyio.fail_after(TIMEOUT):
            cache = TrackingCacheManager(InMemoryCacheManager())
            async with solver_with_path(cache, off) as s:
                top = diamond()
                top.setup_call_counters()
                await warm_up(s, top)
                j1 = s.new_job()
                res = await j1.build(Edge(top))
                await j1.discard()
            open_target = RecordingTarget()
            await export(res, open_target, True)
            await cache.close()
            closed_target = RecordingTarget()
            await export(res, closed_target, True)
            await res.release()
            summaries.append((open_target.summary(), closed_target.summary()))
    assert summaries[0] == summaries[1]
    assert len(summaries[0][0]) == 5  # every record of the diamond, cache open


class FailingCache(TrackingCacheManager):
    """``query`` (``kind="query"``) or ``records`` (``kind="records"``) raises
    while ``failing``."""

    def __init__(self, kind: str) -> None:
        super().__init__(InMemoryCacheManager())
        self.kind = kind
        self.failing = False

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        if self.failing and self.kind == "query" and deps:
            raise RuntimeError("query failed")
        return await super().query(deps, input, digest, output)

    async def query_many(
        self, requests: Sequence[tuple[Sequence[CacheKeyWithSelector], int, str, int]]
    ) -> list[list[CacheKey]]:
        if self.failing and self.kind == "query" and any(deps for deps, *_ in requests):
            raise RuntimeError("query failed")
        return await super().query_many(requests)

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        if self.failing and self.kind == "records":
            raise RuntimeError("records failed")
        return await super().records(key)


@pytest.mark.parametrize("kind", ["query", "records"])
async def test_a_failing_cache_is_left_to_the_edges(
    kind: str, handle_tracker: HandleTracker
) -> None:
    """A cache call that raises makes the path give up; the build then ends as it
    does with the path off (the same error text, or the same value and counts
    where the edges work around it)."""
    outcomes = []
    for off in (False, True):
        with anyio.fail_after(TIMEOUT):
            cache = FailingCache(kind)
            async with solver_with_path(cache, off) as s:
                top = diamond()
                counters = top.setup_call_counters()
                await warm_up(s, top)
                cache.failing = True
                j1 = s.new_job()
                try:
                    outcome: object = await build_value(j1, Edge(top))
                except SolveError as exc:
                    outcome = str(exc)
                await j1.discard()
                outcomes.append((outcome, counters.cache, counters.exec, cache.load_counter))
            await cache.close()
    assert outcomes[0] == outcomes[1]
