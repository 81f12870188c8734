"""Sub-builds, selectors, slow-cache access, merged edges, cache-load errors and job
bookkeeping: BuildKit's solver/scheduler_test.go (tests 20-22, 25, 26, 31-33 and
35-38 of the reference inventory), ported with the same asserted values and
cache-map/exec/load counts.

Unless a step says otherwise, each build runs in a fresh job and the previous job
has been discarded. Every build result is a handle the test owns and releases.
"""

from __future__ import annotations

import anyio
import pytest

from solver import Edge, InMemoryCacheManager, Job, SolveError, Solver, digest_of
from solver.testing import HandleTracker
from tests.harness import (
    Hook,
    TestVertex,
    TrackingCacheManager,
    digest_from_result,
    new_id,
    resolve_op,
    unwrap,
    unwrap_int,
    vtx,
    vtx_add,
    vtx_const,
    vtx_sub_build,
    vtx_sum,
)

#: Fail-safe against deadlocks: a hung build fails the test instead of hanging it.
TIMEOUT = 10


def dgst(s: str) -> str:
    return digest_of(s.encode())


async def build_value(job: Job, root: TestVertex, index: int = 0) -> str:
    """Build output ``index`` of ``root``, release the result handle and return its
    string value."""
    res = await job.build(Edge(root, index))
    try:
        return unwrap(res)
    finally:
        await res.release()


async def build_int(job: Job, root: TestVertex, index: int = 0) -> int:
    """Build output ``index`` of ``root``, release the result handle and return its
    integer value."""
    res = await job.build(Edge(root, index))
    try:
        return unwrap_int(res)
    finally:
        await res.release()


def tracking_cache() -> TrackingCacheManager:
    return TrackingCacheManager(InMemoryCacheManager())


async def delay_50ms() -> None:
    """The 50 ms pause of the Go tests' pre-hooks (part of the scenario's timing)."""
    await anyio.sleep(0.05)


# -- 20 ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_subbuild(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestSubbuild: a vertex whose exec builds a nested edge."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            g0 = vtx_sum(
                1, inputs=[Edge(vtx_sub_build(Edge(vtx_const(7)), cache_key_seed="seed0"))]
            )

            c = g0.setup_call_counters()
            j0 = s.new_job("j0")
            assert await build_int(j0, g0) == 8
            # the nested const is not part of the counted subgraph
            assert (c.cache, c.exec) == (2, 2)
            await j0.discard()

            c = g0.setup_call_counters()
            j1 = s.new_job("j1")
            assert await build_int(j1, g0) == 8
            assert (c.cache, c.exec) == (2, 0)
            await j1.discard()


# -- 21, 22 -----------------------------------------------------------------------------


def selector_graph(v0_value: str, v1_value: str, selector: str, slow: bool) -> TestVertex:
    """v0 (seed0) <- v1 (seed1), with ``selector`` (and, if ``slow``, a content key)
    on input 0."""
    return vtx(
        name="v0",
        cache_key_seed="seed0",
        value=v0_value,
        inputs=[Edge(vtx(name="v1", cache_key_seed="seed1", value=v1_value))],
        selectors={0: dgst(selector)},
        slow_cache_compute={0: digest_from_result} if slow else {},
    )


@pytest.mark.anyio
async def test_cache_with_selector(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestCacheWithSelector: a selector is part of the link, so
    only an equal selector matches the cached parent."""
    with anyio.fail_after(TIMEOUT):
        cm = tracking_cache()
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            g0 = selector_graph("result0", "result1", "sel0", slow=False)
            c = g0.setup_call_counters()
            j0 = s.new_job("j0")
            assert await build_value(j0, g0) == "result0"
            assert (c.cache, c.exec, cm.load_counter) == (2, 2, 0)
            await j0.discard()

            # repeat, cache is matched
            g1 = selector_graph("result0-no-cache", "result1-no-cache", "sel0", slow=False)
            c = g1.setup_call_counters()
            j1 = s.new_job("j1")
            assert await build_value(j1, g1) == "result0"
            assert (c.cache, c.exec, cm.load_counter) == (2, 0, 1)
            await j1.discard()

            # a different selector does not match: v1 is loaded to feed v0
            g2 = selector_graph("result0-1", "result1-1", "sel1", slow=False)
            c = g2.setup_call_counters()
            j2 = s.new_job("j2")
            assert await build_value(j2, g2) == "result0-1"
            assert (c.cache, c.exec, cm.load_counter) == (2, 1, 2)
            await j2.discard()
        await cm.close()


@pytest.mark.anyio
async def test_cache_slow_with_selector(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestCacheSlowWithSelector: with a different selector, the
    parent still hits through the content key of its input (which has no
    selector)."""
    with anyio.fail_after(TIMEOUT):
        cm = tracking_cache()
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            g0 = selector_graph("result0", "result1", "sel0", slow=True)
            c = g0.setup_call_counters()
            j0 = s.new_job("j0")
            assert await build_value(j0, g0) == "result0"
            assert (c.cache, c.exec, cm.load_counter) == (2, 2, 0)
            await j0.discard()

            # v1 is loaded to compute its content key, then v0 is loaded through it
            g1 = selector_graph("result0-no-cache", "result1-no-cache", "sel1", slow=True)
            c = g1.setup_call_counters()
            j1 = s.new_job("j1")
            assert await build_value(j1, g1) == "result0"
            assert (c.cache, c.exec, cm.load_counter) == (2, 0, 2)
            await j1.discard()
        await cm.close()


# -- 25, 26 -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_slow_cache_avoid_access(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestSlowCacheAvoidAccess: a rebuild loads only the root,
    never an input just to compute its content key."""
    with anyio.fail_after(TIMEOUT):
        cm = tracking_cache()
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            v2 = vtx(name="v2", cache_key_seed="seed2", value="result2")
            v1 = vtx(
                name="v1",
                cache_key_seed="seed1",
                value="result1",
                inputs=[Edge(v2)],
                selectors={0: dgst("sel0")},
                slow_cache_compute={0: digest_from_result},
            )
            g0 = vtx(
                name="v0",
                cache_key_seed="seed0",
                cache_pre_func=delay_50ms,
                value="result0",
                inputs=[Edge(v1)],
            )

            g0.setup_call_counters()
            j0 = s.new_job("j0")
            assert await build_value(j0, g0) == "result0"
            assert cm.load_counter == 0
            await j0.discard()

            # the same objects again
            c = g0.setup_call_counters()
            j1 = s.new_job("j1")
            assert await build_value(j1, g0) == "result0"
            await j1.discard()

            assert (c.cache, c.exec, cm.load_counter) == (3, 0, 1)
        await cm.close()


def avoid_load_graph(v3_seed: str, v1_exec_pre_func: Hook | None) -> TestVertex:
    """vmain <- v0 (content key on input 1) <- [v1 (content key on input 0) <- v3, v2]."""
    v3 = vtx(name="v3", cache_key_seed=v3_seed, value="result3")
    v1 = vtx(
        name="v1",
        cache_key_seed="seed1",
        value="result1",
        inputs=[Edge(v3)],
        exec_pre_func=v1_exec_pre_func,
        slow_cache_compute={0: digest_from_result},
    )
    v2 = vtx(name="v2", cache_key_seed="seed2", value="result2")
    v0 = vtx(
        name="v0",
        cache_key_seed="seed0",
        value="result0",
        inputs=[Edge(v1), Edge(v2)],
        slow_cache_compute={1: digest_from_result},
    )
    return vtx(name="vmain", cache_key_seed="seedmain", value="resultmain", inputs=[Edge(v0)])


@pytest.mark.anyio
async def test_slow_cache_avoid_load_on_cache(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestSlowCacheAvoidLoadOnCache (moby/buildkit#648): an input
    with possible matches and a content key is not checksummed (so not loaded)
    before the other inputs have reached their slow state."""
    with anyio.fail_after(TIMEOUT):
        cm = tracking_cache()
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            g0 = avoid_load_graph("seed3", None)
            g0.setup_call_counters()
            j0 = s.new_job("j0")
            assert await build_value(j0, g0) == "resultmain"
            assert cm.load_counter == 0
            await j0.discard()

            # v3's new key forces it to re-execute; that must not make v2 load for
            # its checksum
            g1 = avoid_load_graph("seed3-new", delay_50ms)
            c = g1.setup_call_counters()
            j1 = s.new_job("j1")
            assert await build_value(j1, g1) == "resultmain"
            await j1.discard()

            assert (c.cache, c.exec, cm.load_counter) == (5, 1, 1)
        await cm.close()


# -- 31, 32, 33 -------------------------------------------------------------------------


def merged_lookup_graph() -> TestVertex:
    """sum(3) <- [sum(0) <- [sum(2) <- const 2, const 0], sum(2) <- const 2] = 11,
    where the two ``sum(2) <- const 2`` subgraphs have equal keys."""
    return vtx_sum(
        3,
        inputs=[
            Edge(
                vtx_sum(
                    0,
                    inputs=[
                        Edge(vtx_sum(2, inputs=[Edge(vtx_const(2))])),
                        Edge(vtx_const(0)),
                    ],
                )
            ),
            Edge(vtx_sum(2, inputs=[Edge(vtx_const(2))])),
        ],
    )


@pytest.mark.anyio
async def test_merged_edges_lookup(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestMergedEdgesLookup (moby/buildkit#434), a race
    regression for the lookup of merged edges; run 20 times like the Go test."""
    for _ in range(20):
        with anyio.fail_after(TIMEOUT):
            cm = tracking_cache()
            async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
                g = merged_lookup_graph()
                c = g.setup_call_counters()
                j0 = s.new_job("j0")
                assert await build_int(j0, g) == 11
                assert (c.cache, cm.load_counter) == (7, 0)
                await j0.discard()
            await cm.close()


@pytest.mark.anyio
async def test_merged_edges_cycle(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestMergedEdgesCycle: merging va->vb on one output and
    vb->va on the other must not make a cycle (or deadlock); run 20 times."""
    for _ in range(20):
        with anyio.fail_after(TIMEOUT):
            cm = tracking_cache()
            async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
                # two different vertices with the same cache key
                va = vtx_add(2, name="va", inputs=[Edge(vtx_const(3)), Edge(vtx_const(4))])
                vb = vtx_add(2, name="vb", inputs=[Edge(vtx_const(3)), Edge(vtx_const(4))])
                # this order tries to merge va[0]->vb[0] and vb[1]->va[1]
                g = vtx_sum(
                    1,
                    inputs=[
                        Edge(va, 1),  # 6
                        Edge(vb, 0),  # 5
                        Edge(va, 0),  # 5
                        Edge(vb, 1),  # 6
                    ],
                )
                g.setup_call_counters()
                j0 = s.new_job("j0")
                assert await build_int(j0, g) == 23
                await j0.discard()
            await cm.close()


def three_output_add(name: str) -> TestVertex:
    """add(2) over const 3, 4 and 5: outputs 5, 6 and 7, equal keys for any name."""
    return vtx_add(
        2, name=name, inputs=[Edge(vtx_const(3)), Edge(vtx_const(4)), Edge(vtx_const(5))]
    )


@pytest.mark.anyio
async def test_merged_edges_cycle_multiple_owners(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestMergedEdgesCycleMultipleOwners: va is merged under two
    owners, then a merge through the first owner must be flipped; run 20 times."""
    for _ in range(20):
        with anyio.fail_after(TIMEOUT):
            cm = tracking_cache()
            async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
                va = three_output_add("va")
                vb = three_output_add("vb")
                vc = three_output_add("vc")
                g = vtx_sum(
                    1,
                    inputs=[
                        # merge va[0]->vb[0] and va[1]->vc[1]: va has two owners
                        Edge(vb, 0),  # 5
                        Edge(va, 0),  # 5
                        Edge(vc, 1),  # 6
                        Edge(va, 1),  # 6
                        # then a merge through the first owner, vb[1]->va[1], which
                        # must be flipped
                        Edge(va, 2),  # 7
                        Edge(vb, 2),  # 7
                    ],
                )
                g.setup_call_counters()
                j0 = s.new_job("j0")
                assert await build_int(j0, g) == 37
                await j0.discard()
            await cm.close()


# -- 35 ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cache_load_error(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestCacheLoadError: when every cache load fails, each
    unique edge tries one load and then executes."""
    with anyio.fail_after(TIMEOUT):
        cm = tracking_cache()
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            g = merged_lookup_graph()

            c = g.setup_call_counters()
            j0 = s.new_job("j0")
            assert await build_int(j0, g) == 11
            # 7 vertices, two of them merged
            assert (c.cache, c.exec, cm.load_counter) == (7, 5, 0)
            await j0.discard()

            # repeat with cache
            c = g.setup_call_counters()
            j1 = s.new_job("j1")
            assert await build_int(j1, g) == 11
            assert (c.cache, c.exec, cm.load_counter) == (7, 0, 1)
            await j1.discard()

            # repeat with cache, but loading now fails (loads are cumulative: +5)
            c = g.setup_call_counters()
            cm.force_fail = True
            j2 = s.new_job("j2")
            assert await build_int(j2, g) == 11
            assert (c.cache, c.exec, cm.load_counter) == (7, 5, 6)
            await j2.discard()
        await cm.close()


# -- 36 ---------------------------------------------------------------------------------


def deadlock_graph(seed0: str, seed1: str, seed2: str, *, slow: bool = False) -> TestVertex:
    """v0 <- [v1, v2] with the given seeds; ``slow`` adds a content key on input 1."""
    return vtx(
        name="v0",
        cache_key_seed=seed0,
        value="result0",
        inputs=[
            Edge(vtx(name="v1", cache_key_seed=seed1, value="result1")),
            Edge(vtx(name="v2", cache_key_seed=seed2, value="result2")),
        ],
        slow_cache_compute={1: digest_from_result} if slow else {},
    )


@pytest.mark.anyio
async def test_input_request_deadlock(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestInputRequestDeadlock: a third build mixing the keys of
    the first two (plus a content key) completes."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("job0")
            await build_value(j0, deadlock_graph("seed0", "seed1", "seed2"))
            await j0.discard()

            j1 = s.new_job("job1")
            await build_value(j1, deadlock_graph("seed0-1", "seed1-1", "seed2-1"))
            await j1.discard()

            j2 = s.new_job("job2")
            await build_value(j2, deadlock_graph("seed0-1", "seed1", "seed2-1", slow=True))
            await j2.discard()


# -- 37 ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_build_id(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestUnknownBuildID: looking up a job that never appears
    fails with "no such job" once the registration wait is over."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            with pytest.raises(SolveError, match="no such job"):
                await s.get_job(new_id(), timeout=0.05)


# -- 38 ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stale_edge_merge(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestStaleEdgeMerge: an edge is never merged into one that
    has left the active vertices, and a merge target keeps the merged job's
    vertices alive (checked through the jobs each active state holds)."""
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            dep0 = vtx_const(1, name="depV0")
            dep1 = vtx_const(1, name="depV1")
            dep2 = vtx_const(1, name="depV2")
            # these all end up merged: equal keys behind different digests
            v0 = vtx_add(2, name="v0", inputs=[Edge(dep0)])
            v1 = vtx_add(2, name="v1", inputs=[Edge(dep1)])
            v2 = vtx_add(2, name="v2", inputs=[Edge(dep2)])

            def jobs(v: TestVertex) -> set[str] | None:
                return s._state_jobs(v.digest)

            j0 = s.new_job("job0")
            res = await j0.build(Edge(v0))
            assert res is not None
            await res.release()
            assert jobs(v0) == {"job0"}
            assert jobs(dep0) == {"job0"}

            # this edge merges into j0's
            j1 = s.new_job("job1")
            res = await j1.build(Edge(v1))
            assert res is not None
            await res.release()
            assert jobs(v0) == {"job0", "job1"}
            assert jobs(dep0) == {"job0", "job1"}
            assert jobs(v1) == {"job1"}
            assert jobs(dep1) == {"job1"}

            # v0 stays active for j1, whose edge was merged into it
            await j0.discard()
            assert jobs(v0) == {"job1"}
            assert jobs(dep0) == {"job1"}
            assert jobs(v1) == {"job1"}
            assert jobs(dep1) == {"job1"}

            # another job can still merge
            j2 = s.new_job("job2")
            res = await j2.build(Edge(v2))
            assert res is not None
            await res.release()
            assert jobs(v0) == {"job1", "job2"}
            assert jobs(dep0) == {"job1", "job2"}
            assert jobs(v1) == {"job1"}
            assert jobs(dep1) == {"job1"}
            assert jobs(v2) == {"job2"}
            assert jobs(dep2) == {"job2"}

            # only the vertices still referenced stay
            await j1.discard()
            assert jobs(v0) == {"job2"}
            assert jobs(dep0) == {"job2"}
            assert jobs(v1) is None
            assert jobs(dep1) is None
            assert jobs(v2) == {"job2"}
            assert jobs(dep2) == {"job2"}

            # the last discard removes everything
            await j2.discard()
            for v in (v0, v1, v2, dep0, dep1, dep2):
                assert jobs(v) is None
