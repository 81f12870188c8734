"""A completed shared dependency must still advertise its cache keys: BuildKit's
solver/cachemiss_stale_dep_test.go (TestCacheMissStaleCompleteSharedDep and its
subtests), ported with the same steps and asserted values.

The graph of every build is ``base -> step`` (base is the input of step). A1
builds it on an empty cache and is discarded, which removes its step edge from
the live edge index: A2's step can then only reuse A1's step through the
*cache*, from the keys its base input advertises.

- Without a job B, the base is dropped with A1 and A2 loads it afresh: it queries
  the cache and advertises its key, so A2's step hits.
- With a job B holding only the base, A2 reuses the base state, already
  complete. A base that executed (rather than hit the cache) must still
  advertise the keys it committed at completion, or A2's step re-executes.
- An ignore-cache base executes and saves, but must not advertise its keys, so
  A2's step re-executes.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest

from solver import Edge, InMemoryCacheManager, Job, Solver
from solver.testing import HandleTracker
from tests.harness import TestVertex, TrackingCacheManager, resolve_op, unwrap, vtx

#: Fail-safe against deadlocks: a hung build fails the test instead of hanging it.
TIMEOUT = 10


def base_vertex(value: str, ignore_cache: bool) -> TestVertex:
    """The shared leaf: a fixed digest and seed, so one active vertex across builds.
    ``value`` differs per build only to show where a result came from."""
    return vtx(name="base", cache_key_seed="base-seed", value=value, ignore_cache=ignore_cache)


def step_vertex(name: str, value: str, base_value: str, ignore_base: bool) -> TestVertex:
    """``step`` on top of the base. The seed is fixed, so every build's step matches
    A1's saved record; ``name`` (the digest) may equal A1's or not."""
    return vtx(
        name=name,
        cache_key_seed="step-seed",
        value=value,
        inputs=[Edge(base_vertex(base_value, ignore_base))],
    )


@dataclass(frozen=True, slots=True)
class Scenario:
    hold_base_alive: bool = False  # job B keeps the shared base active across A2
    same_step_vertex: bool = False  # A2's step has A1's digest (else a distinct one)
    warm_base: bool = False  # the base's cache record exists before A1
    ignore_base: bool = False  # the base is ignore-cache


async def build_value(job: Job, root: TestVertex) -> str:
    """Build ``root``, release the result handle and return its value."""
    res = await job.build(Edge(root))
    try:
        return unwrap(res)
    finally:
        await res.release()


async def run(scenario: Scenario) -> tuple[int, str]:
    """Run one scenario; return A2's exec count and A2's result value."""
    cm = TrackingCacheManager(InMemoryCacheManager())
    try:
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            if scenario.warm_base:
                # A throwaway build of the base alone saves its record, so A1's base
                # hits the cache instead of executing.
                warm = s.new_job("warmup")
                await build_value(warm, base_vertex("base-result-warmup", scenario.ignore_base))
                await warm.discard()

            # A1: cold, both execute and are saved; warm, only step executes.
            a1 = s.new_job("a1")
            step_a1 = step_vertex("step", "step-result", "base-result", scenario.ignore_base)
            c = step_a1.setup_call_counters()
            assert await build_value(a1, step_a1) == "step-result"
            assert c.exec == (1 if scenario.warm_base else 2)

            # B attaches to the base before A1 is discarded, and reuses A1's
            # completed base: it sees the value that base carries.
            b: Job | None = None
            if scenario.hold_base_alive:
                b = s.new_job("b")
                base_b = base_vertex("base-result-concurrent", scenario.ignore_base)
                want = "base-result-warmup" if scenario.warm_base else "base-result"
                assert await build_value(b, base_b) == want

            # A1's step edge leaves the edge index: A2 cannot merge onto it. The base
            # stays active only if B holds it (the premise of each scenario).
            await a1.discard()
            base_digest = step_a1.inputs[0].vertex.digest
            assert s._state_jobs(base_digest) == ({"b"} if b is not None else None)

            a2 = s.new_job("a2")
            step_name = "step" if scenario.same_step_vertex else "step-second"
            step_a2 = step_vertex(
                step_name, "step-result-uncached", "base-result-uncached", scenario.ignore_base
            )
            c = step_a2.setup_call_counters()
            second_result = await build_value(a2, step_a2)
            second_execs = c.exec

            await a2.discard()
            if b is not None:
                await b.discard()
            return second_execs, second_result
    finally:
        await cm.close()


@pytest.mark.anyio
async def test_fresh_base_hits(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestCacheMissStaleCompleteSharedDep/FreshBaseHits: with the
    base loaded afresh, A2's step reuses A1's cached result (the control case)."""
    with anyio.fail_after(TIMEOUT):
        execs, result = await run(Scenario(same_step_vertex=True))
    assert execs == 0, "A2 step should reuse cache when base is recreated fresh"
    assert result == "step-result", "A2 should return A1's cached result"


@pytest.mark.anyio
async def test_warm_held_base_hits(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's TestCacheMissStaleCompleteSharedDep/WarmHeldBaseHits: a base
    that hit the cache and is held complete by B still advertises its key."""
    with anyio.fail_after(TIMEOUT):
        execs, result = await run(
            Scenario(hold_base_alive=True, same_step_vertex=True, warm_base=True)
        )
    assert execs == 0, "A2 step should reuse cache: a warm held base delivers its key"
    assert result == "step-result", "A2 should return A1's cached result"


@pytest.mark.anyio
async def test_held_complete_base_misses_same_step_vertex(handle_tracker: HandleTracker) -> None:
    """Port of BuildKit's
    TestCacheMissStaleCompleteSharedDep/HeldCompleteBaseMisses/SameStepVertex: a base
    that executed cold and is held complete by B advertises its committed key, so
    A2 (rebuilding the same step vertex) hits."""
    with anyio.fail_after(TIMEOUT):
        execs, result = await run(Scenario(hold_base_alive=True, same_step_vertex=True))
    assert execs == 0, "A2 step re-executed instead of reusing cache (stale complete shared-dep)"
    assert result == "step-result", "A2 should return A1's cached result"


@pytest.mark.anyio
async def test_held_complete_base_misses_distinct_step_vertex(
    handle_tracker: HandleTracker,
) -> None:
    """Port of BuildKit's
    TestCacheMissStaleCompleteSharedDep/HeldCompleteBaseMisses/DistinctStepVertex: as
    SameStepVertex, with A2's step a different vertex (name) with the same seed."""
    with anyio.fail_after(TIMEOUT):
        execs, result = await run(Scenario(hold_base_alive=True))
    assert execs == 0, "A2 step re-executed instead of reusing cache (stale complete shared-dep)"
    assert result == "step-result", "A2 should return A1's cached result"


@pytest.mark.anyio
async def test_held_complete_ignore_cache_base_re_executes(
    handle_tracker: HandleTracker,
) -> None:
    """Port of BuildKit's
    TestCacheMissStaleCompleteSharedDep/HeldCompleteIgnoreCacheBaseReExecutes: an
    ignore-cache base held complete by B must not advertise its keys, so A2's step
    re-executes."""
    with anyio.fail_after(TIMEOUT):
        execs, _ = await run(
            Scenario(hold_base_alive=True, same_step_vertex=True, ignore_base=True)
        )
    assert execs != 0, "A2 step must re-run: base is ignore-cache, so its key must not seed reuse"
