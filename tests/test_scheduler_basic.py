"""The scheduler: BuildKit's ``solver/scheduler_test.go`` tests 1-19, ported with the
same asserted values and cache-map/exec/load counts.

Translation notes:

* Go's "cancel the job's context" is cancelling an :class:`anyio.CancelScope` around
  ``job.build``; Go's ``errors.Is(err, context.Canceled)`` becomes
  ``scope.cancelled_caught``.
* Every build result is a handle the test owns and releases; the ``handle_tracker``
  fixture fails the test if an engine handle leaks or is released twice.
* Go's sleeps that only order things become events and
  ``anyio.wait_all_tasks_blocked``; op delays that are part of a scenario stay.
"""

from __future__ import annotations

import asyncio
import random

import anyio
import pytest

from solver import Edge, InMemoryCacheManager, Job, SlowCacheError, SolveError, Solver
from solver.testing import HandleTracker
from tests.harness import (
    CountedResult,
    Counters,
    Hook,
    TestVertex,
    TrackingCacheManager,
    blocking_function,
    build_value,
    digest_from_result,
    generate_sub_graph,
    resolve_op,
    unwrap,
    unwrap_int,
    vtx,
    vtx_const,
    vtx_sum,
)

# Fail-safe: a deadlock fails the test instead of hanging the run.
TIMEOUT = 10


async def build_int(job: Job, edge: Edge) -> int:
    """Build ``edge`` on ``job``, release the handle and return its integer value."""
    res = await job.build(edge)
    try:
        return unwrap_int(res)
    finally:
        await res.release()


def cancelling_hook(scope: anyio.CancelScope) -> Hook:
    """A pre-hook that cancels the build's scope, waits until the engine cancels the
    op call it runs in, and then returns normally.

    Go's hook is ``cancel(); <-ctx.Done(); return nil`` ("the error should still come
    from the context"): the harness then counts the call, and the op's next
    checkpoint raises the cancellation again, because anyio cancellation is
    level-triggered.
    """

    async def hook() -> None:
        scope.cancel()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return

    return hook


def raising_hook(exc: BaseException) -> Hook:
    """A pre-hook that fails with ``exc``."""

    async def hook() -> None:
        raise exc

    return hook


# 1
@pytest.mark.anyio
async def test_single_level_active_graph(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSingleLevelActiveGraph: an active vertex is shared by digest while
    any job holds it; once every job is gone, the next build runs the op again."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("job0")
            g0 = vtx(name="v0", value="result0")
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            assert c0 == Counters(cache=1, exec=1)

            # the same digest in another job uses the active vertex
            j1 = s.new_job("job1")
            g1 = vtx(name="v0", value="result1")
            c1 = g1.setup_call_counters()
            assert await build_value(j1, Edge(g1)) == "result0"
            assert c0 == Counters(cache=1, exec=1)
            assert c1 == Counters(cache=0, exec=0)

            await j0.discard()

            # after discarding j0, j1 still holds the state
            j2 = s.new_job("job2")
            g2 = vtx(name="v0", value="result2")
            c2 = g2.setup_call_counters()
            assert await build_value(j2, Edge(g2)) == "result0"
            assert c0 == Counters(cache=1, exec=1)
            assert c1 == Counters(cache=0, exec=0)
            assert c2 == Counters(cache=0, exec=0)

            await j1.discard()
            await j2.discard()

            # everything is released now (and the random seed misses the cache)
            j3 = s.new_job("job3")
            g3 = vtx(name="v0", value="result3")
            c3 = g3.setup_call_counters()
            assert await build_value(j3, Edge(g3)) == "result3"
            assert c3 == Counters(cache=1, exec=1)

            await j3.discard()

            # the same, with the two builds running in parallel
            j4 = s.new_job("job4")
            j5 = s.new_job("job5")
            g4 = vtx(name="v0", cache_delay=0.1, value="result4")
            c4 = g4.setup_call_counters()
            values: dict[str, str] = {}

            async def run(job: Job) -> None:
                values[job.id] = await build_value(job, Edge(g4))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, j4)
                tg.start_soon(run, j5)

            assert values == {"job4": "result4", "job5": "result4"}
            assert c4 == Counters(cache=1, exec=1)
            await j4.discard()
            await j5.discard()


# 2
@pytest.mark.anyio
async def test_single_level_cache(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSingleLevelCache: a new vertex with a cached key is not executed."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("job0")
            g0 = vtx(name="v0", cache_key_seed="seed0", value="result0")
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            await j0.discard()

            # a different key does not match
            j1 = s.new_job("job1")
            g1 = vtx(name="v1", cache_key_seed="seed1", value="result1")
            c1 = g1.setup_call_counters()
            assert await build_value(j1, Edge(g1)) == "result1"
            assert c1 == Counters(cache=1, exec=1)
            await j1.discard()

            # the key of the first build matches
            j2 = s.new_job("job2")
            g2 = vtx(name="v2", cache_key_seed="seed0", value="result2")
            c2 = g2.setup_call_counters()
            assert await build_value(j2, Edge(g2)) == "result0"
            assert c0 == Counters(cache=1, exec=1)
            assert c2 == Counters(cache=1, exec=0)
            await j2.discard()


# 3
@pytest.mark.anyio
async def test_single_level_cache_parallel(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSingleLevelCacheParallel: two different vertices whose cache maps
    run at once with equal keys are merged and executed once."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            wait2_ready = blocking_function(2)
            j0 = s.new_job("job0")
            g0 = vtx(name="v0", cache_key_seed="seed0", cache_pre_func=wait2_ready, value="result0")
            c0 = g0.setup_call_counters()
            j1 = s.new_job("job1")
            g1 = vtx(name="v1", cache_key_seed="seed0", cache_pre_func=wait2_ready, value="result0")
            c1 = g1.setup_call_counters()
            values: dict[str, str] = {}

            async def run(job: Job, v: TestVertex) -> None:
                values[job.id] = await build_value(job, Edge(v))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, j0, g0)
                tg.start_soon(run, j1, g1)

            assert values == {"job0": "result0", "job1": "result0"}
            assert c0.cache == 1
            assert c1.cache == 1
            # only one execution ran
            assert c0.exec + c1.exec == 1
            await j0.discard()
            await j1.discard()


# 4
@pytest.mark.anyio
async def test_multi_level_cache_parallel(handle_tracker: HandleTracker) -> None:
    """BuildKit TestMultiLevelCacheParallel: as TestSingleLevelCacheParallel, with a
    child level; each level executes once."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            wait2_ready = blocking_function(2)
            wait2_ready2 = blocking_function(2)
            j0 = s.new_job("job0")
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                cache_pre_func=wait2_ready,
                value="result0",
                inputs=[
                    Edge(
                        vtx(
                            name="v0-c0",
                            cache_key_seed="seed0-c0",
                            cache_pre_func=wait2_ready2,
                            value="result0-c0",
                        )
                    )
                ],
            )
            c0 = g0.setup_call_counters()
            j1 = s.new_job("job1")
            g1 = vtx(
                name="v1",
                cache_key_seed="seed0",  # same as g0
                cache_pre_func=wait2_ready,
                value="result0",
                inputs=[
                    Edge(
                        vtx(
                            name="v1-c0",
                            cache_key_seed="seed0-c0",  # same as g0
                            cache_pre_func=wait2_ready2,
                            value="result0-c",
                        )
                    )
                ],
            )
            c1 = g1.setup_call_counters()
            values: dict[str, str] = {}

            async def run(job: Job, v: TestVertex) -> None:
                values[job.id] = await build_value(job, Edge(v))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, j0, g0)
                tg.start_soon(run, j1, g1)

            assert values == {"job0": "result0", "job1": "result0"}
            assert c0.cache == 2
            assert c1.cache == 2
            assert c0.exec + c1.exec == 2
            await j0.discard()
            await j1.discard()


# 5
@pytest.mark.anyio
async def test_single_cancel_cache(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSingleCancelCache: cancelling the build while its cache map runs
    cancels the build; nothing is executed."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("job0")
            scope = anyio.CancelScope()
            g0 = vtx(name="v0", cache_pre_func=cancelling_hook(scope))
            c0 = g0.setup_call_counters()
            with scope:
                await build_value(j0, Edge(g0))
            assert scope.cancelled_caught
            assert c0 == Counters(cache=1, exec=0)
            await j0.discard()


# 6
@pytest.mark.anyio
async def test_single_cancel_exec(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSingleCancelExec: cancelling the build while its exec runs cancels
    the build."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j1 = s.new_job("job1")
            scope = anyio.CancelScope()
            g1 = vtx(name="v2", exec_pre_func=cancelling_hook(scope))
            c1 = g1.setup_call_counters()
            with scope:
                await build_value(j1, Edge(g1))
            assert scope.cancelled_caught
            assert c1 == Counters(cache=1, exec=1)
            await j1.discard()


# 7
@pytest.mark.anyio
async def test_single_cancel_parallel(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSingleCancelParallel: of two jobs sharing a vertex, cancelling one
    cancels that build only; the shared work goes on for the other."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            first_ready = anyio.Event()
            first_errored = anyio.Event()
            scope2 = anyio.CancelScope()
            outcome: dict[str, object] = {}

            async def cache_pre() -> None:
                first_ready.set()
                # Go sleeps 200 ms here so that job3 joins before job2 is cancelled.
                await anyio.wait_all_tasks_blocked()
                scope2.cancel()
                await first_errored.wait()

            g2 = vtx(name="v2", value="result2", cache_pre_func=cache_pre)
            c2 = g2.setup_call_counters()

            async def run_job2() -> None:
                j = s.new_job("job2")
                try:
                    with scope2:
                        outcome["job2"] = await build_value(j, Edge(g2))
                finally:
                    first_errored.set()
                outcome["job2-cancelled"] = scope2.cancelled_caught
                await j.discard()

            async def run_job3() -> None:
                j = s.new_job("job3")
                g = vtx(name="v2")
                await first_ready.wait()
                outcome["job3"] = await build_value(j, Edge(g))
                await j.discard()

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_job2)
                tg.start_soon(run_job3)

            assert outcome == {"job2-cancelled": True, "job3": "result2"}
            # Not asserted in Go: the cache map job2 started was not cancelled and
            # run again for job3, it went on.
            assert c2 == Counters(cache=1, exec=1)


# 8
@pytest.mark.anyio
async def test_multi_level_calculation(handle_tracker: HandleTracker) -> None:
    """BuildKit TestMultiLevelCalculation: a sum graph computes 42, and a structurally
    equal graph of new vertices gets 42 from the cache."""

    def graph() -> Edge:
        return Edge(
            vtx_sum(
                1,
                inputs=[
                    Edge(vtx_sum(0, inputs=[Edge(vtx_const(7)), Edge(vtx_const(2))])),
                    Edge(vtx_sum(0, inputs=[Edge(vtx_const(7)), Edge(vtx_const(2))])),
                    Edge(vtx_const(2)),
                    Edge(vtx_const(2)),
                    Edge(vtx_const(19)),
                ],
            )
        )

    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            assert await build_int(j0, graph()) == 42  # 1 + 2*(7 + 2) + 2 + 2 + 19
            await j0.discard()

            # repeating the same build with the cache behaves the same
            j1 = s.new_job("j1")
            assert await build_int(j1, graph()) == 42
            await j1.discard()


# 9
@pytest.mark.anyio
async def test_huge_graph(handle_tracker: HandleTracker) -> None:
    """BuildKit TestHugeGraph: a random 1000-vertex graph asks each cache map once, and
    rebuilding it from the cache loads only the root."""
    nodes = 1000
    g, expected = generate_sub_graph(nodes, random.Random(9))
    root = g.vertex
    assert isinstance(root, TestVertex)
    cm = TrackingCacheManager(InMemoryCacheManager())
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            j0 = s.new_job("j0")
            c = root.setup_call_counters()
            assert await build_int(j0, g) == expected
            assert c.cache == nodes
            # exec is not asserted: equal consts merge
            assert cm.load_counter == 0
            await j0.discard()

            j1 = s.new_job("j1")
            c = root.setup_call_counters()
            assert await build_int(j1, g) == expected
            assert c == Counters(cache=nodes, exec=0)
            assert cm.load_counter == 1
            await j1.discard()
        await cm.close()


# 10
@pytest.mark.anyio
async def test_optimized_cache_access(handle_tracker: HandleTracker) -> None:
    """BuildKit TestOptimizedCacheAccess: inputs are not loaded from the cache unless
    they are needed; changing the seed of an input with a content key runs that input
    only, and loads only the root."""
    cm = TrackingCacheManager(InMemoryCacheManager())
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            j0 = s.new_job("j0")
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                inputs=[
                    Edge(vtx(name="v1", cache_key_seed="seed1", value="result1")),
                    Edge(vtx(name="v2", cache_key_seed="seed2", value="result2")),
                ],
                slow_cache_compute={1: digest_from_result},
            )
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            assert c0 == Counters(cache=3, exec=3)
            assert cm.load_counter == 0
            await j0.discard()

            # changing the seed of the input with a content key does not pull result1
            j1 = s.new_job("j1")
            g1 = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0-nocache",
                inputs=[
                    Edge(vtx(name="v1", cache_key_seed="seed1", value="result1-nocache")),
                    Edge(
                        vtx(
                            name="v2-changed",
                            cache_key_seed="seed2-changed",
                            value="result2",  # the same content key as in g0
                        )
                    ),
                ],
                slow_cache_compute={1: digest_from_result},
            )
            c1 = g1.setup_call_counters()
            assert await build_value(j1, Edge(g1)) == "result0"
            assert c1 == Counters(cache=3, exec=1)
            assert cm.load_counter == 1
            await j1.discard()
        await cm.close()


# 11
@pytest.mark.anyio
async def test_optimized_cache_access2(handle_tracker: HandleTracker) -> None:
    """BuildKit TestOptimizedCacheAccess2: inputs that matched by definition are not
    loaded or executed for content keys; when both seeds change, both inputs run and
    still give a content-key hit."""
    cm = TrackingCacheManager(InMemoryCacheManager())

    def graph(value: str, v1_seed: str, v2_name: str, v2_seed: str) -> TestVertex:
        return vtx(
            name="v0",
            cache_key_seed="seed0",
            value=value,
            inputs=[
                Edge(vtx(name="v1", cache_key_seed=v1_seed, value="result1")),
                # value "result2" always gives the content key of the first build
                Edge(vtx(name=v2_name, cache_key_seed=v2_seed, value="result2")),
            ],
            slow_cache_compute={0: digest_from_result, 1: digest_from_result},
        )

    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            j0 = s.new_job("j0")
            g0 = graph("result0", "seed1", "v2", "seed2")
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            assert c0 == Counters(cache=3, exec=3)
            assert cm.load_counter == 0
            await j0.discard()

            # changing the seed of one input with a content key does not pull result1
            j1 = s.new_job("j1")
            g1 = graph("result0-nocache", "seed1", "v2-changed", "seed2-changed")
            c1 = g1.setup_call_counters()
            assert await build_value(j1, Edge(g1)) == "result0"
            assert c1 == Counters(cache=3, exec=1)
            assert cm.load_counter == 1  # v1 is never loaded nor executed
            await j1.discard()

            # both inputs are still used for a content-key hit
            j2 = s.new_job("j2")
            g2 = graph("result0-nocache", "seed1-changed2", "v2-changed", "seed2-changed2")
            c2 = g2.setup_call_counters()
            assert await build_value(j2, Edge(g2)) == "result0"
            assert c2 == Counters(cache=3, exec=2)
            assert cm.load_counter == 2
            await j2.discard()
        await cm.close()


# 12
@pytest.mark.anyio
async def test_slow_cache(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSlowCache: an input of a different definition but equal content
    gives a cache hit through the content key."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                inputs=[Edge(vtx(name="v1", cache_key_seed="seed1", value="result1"))],
                slow_cache_compute={0: digest_from_result},
            )
            assert await build_value(j0, Edge(g0)) == "result0"
            await j0.discard()

            j1 = s.new_job("j1")
            g1 = vtx(
                name="v2",
                cache_key_seed="seed0",
                value="not-cached",
                inputs=[
                    Edge(
                        vtx(
                            name="v3",
                            cache_key_seed="seed3",
                            value="result1",  # used for the content key
                        )
                    )
                ],
                slow_cache_compute={0: digest_from_result},
            )
            assert await build_value(j1, Edge(g1)) == "result0"
            await j1.discard()


# 13
@pytest.mark.anyio
async def test_slow_cache_error_result_clone_release(handle_tracker: HandleTracker) -> None:
    """BuildKit TestSlowCacheErrorResultCloneRelease: the result a SlowCacheError
    carries keeps the input alive after the job is discarded, and releasing it
    releases the input once."""
    counter = [0]
    input_res = CountedResult("input", counter)
    slow_error = RuntimeError("slow cache error")

    async def failing_digest(_res: object) -> str:
        raise slow_error

    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j = s.new_job("j0")
            g = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                inputs=[Edge(vtx(name="v1", cache_key_seed="seed1", result=input_res))],
                slow_cache_compute={0: failing_digest},
            )
            with pytest.raises(SlowCacheError) as exc_info:
                await build_value(j, Edge(g))
            sce = exc_info.value
            assert sce.result is not None
            try:
                assert sce.index == 0
                assert sce.__cause__ is slow_error
                assert unwrap(sce.result) == "input"

                await j.discard()
                # Go: require.Never(releaseCount != 0) for 100 ms
                await anyio.wait_all_tasks_blocked()
                assert input_res.release_count == 0
            finally:
                await sce.result.release()
            # Go: require.Eventually(releaseCount == 1)
            await anyio.wait_all_tasks_blocked()
            assert input_res.release_count == 1
        # Not asserted in Go: the cache's own handle on the input (SPEC §6) is the
        # only other one, released when the solver closes the cache it made.
        assert input_res.release_count == 2


# 14
@pytest.mark.anyio
async def test_parallel_inputs(handle_tracker: HandleTracker) -> None:
    """BuildKit TestParallelInputs: the cache maps and execs of a vertex's inputs run
    concurrently (each pair meets at a two-party barrier)."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            wait2_ready = blocking_function(2)
            wait2_ready2 = blocking_function(2)
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                inputs=[
                    Edge(
                        vtx(
                            name="v1",
                            cache_key_seed="seed1",
                            value="result1",
                            cache_pre_func=wait2_ready,
                            exec_pre_func=wait2_ready2,
                        )
                    ),
                    Edge(
                        vtx(
                            name="v2",
                            cache_key_seed="seed2",
                            value="result2",
                            cache_pre_func=wait2_ready,
                            exec_pre_func=wait2_ready2,
                        )
                    ),
                ],
            )
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            await j0.discard()
            assert c0 == Counters(cache=3, exec=3)


# 15
@pytest.mark.anyio
async def test_error_returns(handle_tracker: HandleTracker) -> None:
    """BuildKit TestErrorReturns: an error from an input's cache map or exec fails the
    build with that error; an op that itself raises a cancellation exception (with
    nothing cancelled) fails the build with it instead of hanging."""

    def graph(v1_hook: Hook | None, v2_seed: str, v2_hook: Hook | None) -> TestVertex:
        return vtx(
            name="v0",
            cache_key_seed="seed0",
            value="result0",
            inputs=[
                Edge(
                    vtx(
                        name="v1",
                        cache_key_seed="seed1",
                        value="result1",
                        cache_pre_func=v1_hook,
                    )
                ),
                Edge(
                    vtx(
                        name="v2",
                        cache_key_seed=v2_seed,
                        value="result2",
                        exec_pre_func=v2_hook,
                    )
                ),
            ],
        )

    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            cache_error = RuntimeError("error-from-test")
            with pytest.raises(SolveError) as exc_info:
                await build_value(j0, Edge(graph(raising_hook(cache_error), "seed2", None)))
            assert "error-from-test" in str(exc_info.value)
            assert exc_info.value.__cause__ is cache_error
            await j0.discard()

            # a cancellation error an op returns is not mixed up with a build cancel
            j1 = s.new_job("j1")
            cancel_error = asyncio.CancelledError()
            with pytest.raises(SolveError) as exc_info:
                await build_value(j1, Edge(graph(raising_hook(cancel_error), "seed2", None)))
            assert exc_info.value.__cause__ is cancel_error
            await j1.discard()

            # an error from exec
            j2 = s.new_job("j2")
            exec_error = RuntimeError("exec-error-from-test")
            with pytest.raises(SolveError) as exc_info:
                await build_value(j2, Edge(graph(None, "seed3", raising_hook(exec_error))))
            assert "exec-error-from-test" in str(exc_info.value)
            assert exc_info.value.__cause__ is exec_error
            await j2.discard()


# 16
@pytest.mark.anyio
async def test_multiple_cache_sources(handle_tracker: HandleTracker) -> None:
    """BuildKit TestMultipleCacheSources: a cache source with the main cache's ID is
    used once; a discarded job can still build, on top of cached results."""
    cm1 = TrackingCacheManager(InMemoryCacheManager())
    cm2 = TrackingCacheManager(InMemoryCacheManager())
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op, default_cache=cm1) as s:
            j0 = s.new_job("j0")
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                inputs=[Edge(vtx(name="v1", cache_key_seed="seed1", value="result1"))],
            )
            assert await build_value(j0, Edge(g0)) == "result0"
            assert cm1.load_counter == 0
            await j0.discard()

            async with Solver(resolve_op=resolve_op, default_cache=cm2):
                # the job is still made on the first solver
                j1 = s.new_job("j1")
                g1 = Edge(
                    vtx(
                        name="v0",
                        cache_key_seed="seed0",
                        value="result0-no-cache",
                        cache_source=cm1,
                        inputs=[
                            Edge(
                                vtx(
                                    name="v1",
                                    cache_key_seed="seed1",
                                    value="result1-no-cache",
                                    cache_source=cm1,
                                )
                            )
                        ],
                    )
                )
                assert await build_value(j1, g1) == "result0"
                assert cm1.load_counter == 1
                assert cm2.load_counter == 0
                await j1.discard()

                # build on top of the old cache, in the discarded job
                g2 = Edge(vtx(name="v2", cache_key_seed="seed2", value="result2", inputs=[g1]))
                assert await build_value(j1, g2) == "result2"
                assert cm1.load_counter == 2
                assert cm2.load_counter == 0
                await j1.discard()
        await cm1.close()
        await cm2.close()


# 17
@pytest.mark.anyio
async def test_repeat_build_with_ignore_cache(handle_tracker: HandleTracker) -> None:
    """BuildKit TestRepeatBuildWithIgnoreCache: ignore-cache vertices run again (their
    cache maps are still asked), and an ignore-cache input makes its parent run."""

    def graph(value: str, child_value: str, *, ignore: bool, child_ignore: bool) -> TestVertex:
        return vtx(
            name="v0",
            cache_key_seed="seed0",
            value=value,
            ignore_cache=ignore,
            inputs=[
                Edge(
                    vtx(
                        name="v1",
                        cache_key_seed="seed1",
                        value=child_value,
                        ignore_cache=child_ignore,
                    )
                )
            ],
        )

    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            g0 = graph("result0", "result1", ignore=False, child_ignore=False)
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            assert c0 == Counters(cache=2, exec=2)
            await j0.discard()

            # a rebuild with ignore-cache evaluates everything again
            j1 = s.new_job("j1")
            g1 = graph("result0-1", "result1-1", ignore=True, child_ignore=True)
            c1 = g1.setup_call_counters()
            assert await build_value(j1, Edge(g1)) == "result0-1"
            assert c1 == Counters(cache=2, exec=2)
            await j1.discard()

            # ignore-cache in the child evaluates the parent again
            j2 = s.new_job("j2")
            g2 = graph("result0-2", "result1-2", ignore=False, child_ignore=True)
            c2 = g2.setup_call_counters()
            assert await build_value(j2, Edge(g2)) == "result0-2"
            assert c2 == Counters(cache=2, exec=2)
            await j2.discard()


# 18
@pytest.mark.anyio
async def test_ignore_cache_resume_from_slow_cache(handle_tracker: HandleTracker) -> None:
    """BuildKit TestIgnoreCacheResumeFromSlowCache: the parent of an ignore-cache input
    resumes from the cache when the input gives the same content key."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                slow_cache_compute={0: digest_from_result},
                inputs=[Edge(vtx(name="v1", cache_key_seed="seed1", value="result1"))],
            )
            c0 = g0.setup_call_counters()
            assert await build_value(j0, Edge(g0)) == "result0"
            assert c0 == Counters(cache=2, exec=2)
            await j0.discard()

            # the rebuild evaluates the child again, but not the parent
            j1 = s.new_job("j1")
            g1 = vtx(
                name="v0-1",
                cache_key_seed="seed0",
                value="result0-no-cache",
                slow_cache_compute={0: digest_from_result},
                inputs=[
                    Edge(
                        vtx(
                            name="v1-1",
                            cache_key_seed="seed1-1",
                            value="result1",  # same as g0
                            ignore_cache=True,
                        )
                    )
                ],
            )
            c1 = g1.setup_call_counters()
            assert await build_value(j1, Edge(g1)) == "result0"
            assert c1 == Counters(cache=2, exec=1)
            await j1.discard()


# 19
@pytest.mark.anyio
async def test_parallel_builds_ignore_cache(handle_tracker: HandleTracker) -> None:
    """BuildKit TestParallelBuildsIgnoreCache: an ignore-cache build never joins a live
    normal run (by digest or by key); ignore-cache builds merge with each other, and a
    normal build may join an ignore-cache run."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("j0")
            g0 = vtx(name="v0", cache_key_seed="seed0", value="result0")
            assert await build_value(j0, Edge(g0)) == "result0"

            # the same digest
            j1 = s.new_job("j1")
            g1 = vtx(name="v0", cache_key_seed="seed1", value="result1", ignore_cache=True)
            assert await build_value(j1, Edge(g1)) == "result1"

            await j0.discard()
            await j1.discard()

            # a new base
            j2 = s.new_job("j2")
            g2 = vtx(name="v2", cache_key_seed="seed2", value="result2")
            assert await build_value(j2, Edge(g2)) == "result2"

            # the same cache key
            j3 = s.new_job("j3")
            g3 = vtx(name="v3", cache_key_seed="seed2", value="result3", ignore_cache=True)
            assert await build_value(j3, Edge(g3)) == "result3"

            # another ignore-cache build merges now
            j4 = s.new_job("j4")
            g4 = vtx(name="v4", cache_key_seed="seed2", value="result4", ignore_cache=True)
            assert await build_value(j4, Edge(g4)) == "result3"

            # and so does a normal one
            j5 = s.new_job("j5")
            g5 = vtx(name="v5", cache_key_seed="seed2", value="result5")
            assert await build_value(j5, Edge(g5)) == "result3"

            for j in (j2, j3, j4, j5):
                await j.discard()
