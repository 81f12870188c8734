"""The cached path with content keys (``compute_digest``): a warm build of a graph
whose ops key an input on its content is one key pass and one load, as one
without; a build whose root misses runs on the cold path, which computes the
content key of a vertex that may hit once its input has a result and asks the
cache for it (``tests/test_cold_path_content_keys.py``).

Differential: the same builds in a solver where the path may run and in one
where a live job keeps it off give the same values, cache-map, exec and
``compute_digest`` calls, loads and progress events.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import anyio
import pytest

from solver import Edge, InMemoryCacheManager, Result, Solver
from solver.testing import HandleTracker
from tests.harness import (
    Counters,
    TestVertex,
    TrackingCacheManager,
    build_value,
    digest_from_result,
    vtx,
)
from tests.test_cached_path import inner_digests, run_builds

pytestmark = pytest.mark.anyio

TIMEOUT = 10


class ContentCalls:
    """Counts ``compute_digest`` calls (the content keys computed)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, res: Result) -> str:
        self.calls += 1
        return await digest_from_result(res)


def content_dag(
    seed: int, nodes: int, content: ContentCalls, changed_leaf: bool = False
) -> TestVertex:
    """A random DAG with a key per vertex (vertex i takes 0 to 3 inputs among the
    ones before it; the top takes every vertex nobody uses); about half of the
    inputs are keyed on their content. ``changed_leaf`` gives the first leaf
    another definition key with the same value (an edit that leaves the content
    as it was), so a content key above it finds the stored result."""
    rng = random.Random(seed)
    made: list[TestVertex] = []
    used: set[int] = set()
    for i in range(nodes - 1):
        picks = sorted(set(rng.sample(range(i), min(i, rng.randrange(4))))) if i else []
        used.update(picks)
        key = f"v{i}"
        if changed_leaf and not picks and i == 0:
            key = "v0-changed"
        slow = {j: content for j in range(len(picks)) if rng.random() < 0.5}
        made.append(vtx(name=f"c{seed}_{i}", cache_key_seed=key, value=f"v{i}",
                        inputs=[Edge(made[p]) for p in picks], slow_cache_compute=slow))
    tops = [Edge(v) for j, v in enumerate(made) if j not in used]
    slow_top = {j: content for j in range(len(tops)) if rng.random() < 0.5}
    return vtx(name=f"c{seed}_top", cache_key_seed="top", value="top", inputs=tops,
               slow_cache_compute=slow_top)


async def test_a_warm_build_with_content_keys_takes_the_path(
    handle_tracker: HandleTracker,
) -> None:
    """Every input keyed on its content: the warm build computes no content key,
    makes no inner edge and loads one record."""
    with anyio.fail_after(TIMEOUT):
        content = ContentCalls()
        cache = TrackingCacheManager(InMemoryCacheManager())
        async with Solver(resolve_op=lambda v, b: v.sys, default_cache=cache) as s:
            base = vtx(name="base", cache_key_seed="base", value="base")
            mid = vtx(name="mid", cache_key_seed="mid", value="mid", inputs=[Edge(base)],
                      slow_cache_compute={0: content})
            other = vtx(name="other", cache_key_seed="other", value="other")
            top = vtx(name="top", cache_key_seed="top", value="top",
                      inputs=[Edge(mid), Edge(other)], slow_cache_compute={0: content})
            counters = top.setup_call_counters()
            job = s.new_job()
            assert await build_value(job, Edge(top)) == "top"
            await job.discard()
            assert counters == Counters(cache=4, exec=4)
            cold_content = content.calls

            job = s.new_job()
            assert await build_value(job, Edge(top)) == "top"
            assert not any(s._actives[d].edges for d in inner_digests(top))
            assert counters == Counters(cache=8, exec=4)
            assert content.calls == cold_content
            assert cache.load_counter == 1
            await job.discard()
        await cache.close()


def make(seed: int, nodes: int, content: ContentCalls, changed: bool, marks: list[int],
         ) -> Callable[[], tuple[Edge, Counters]]:
    def build() -> tuple[Edge, Counters]:
        marks.append(content.calls)  # the content keys computed before this build
        top = content_dag(seed, nodes, content, changed)
        return Edge(top), top.setup_call_counters()

    return build


@pytest.mark.parametrize("seed", range(8))
async def test_the_same_counts_with_content_keys_on_the_path_and_the_edges(
    seed: int, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random DAGs with content-keyed inputs, built cold, warm, after a leaf's
    definition changed (its content did not), warm again, then the first graph:
    the same values, cache-map and exec calls, loads and progress events with
    the path on and off, and the same content keys computed in every build but
    the third. The warm builds took the path.

    The third build runs on the cold path with the path on: how many content
    keys the edges compute there, and how many inputs they load to compute
    them, depends on the order their answers arrive in (15 or 17 keys and 14
    or 15 loads of seed 4's, from run to run, with the path off; the path's
    are the same every run), so there the path is checked to load no more."""
    nodes = 12 + seed * 7
    outcomes = []
    for blocked in (False, True):
        content = ContentCalls()
        marks: list[int] = []
        graphs = [make(seed, nodes, content, c, marks)
                  for c in (False, False, True, True, False)]
        with anyio.fail_after(TIMEOUT * 3):
            run = await run_builds(graphs, blocked, monkeypatch)
        marks.append(content.calls)
        per_build = [b - a for a, b in itertools.pairwise(marks)]
        outcomes.append((run, per_build))
    (on, on_content), (off, off_content) = outcomes
    assert on.values == off.values
    assert on.calls == off.calls
    # the third build's loads on the edges depend on that order too (14 or 15
    # of seed 4's, from run to run): the cold path loads no more than they do
    assert on.loads[2] <= off.loads[2]
    del on.loads[2], off.loads[2]
    assert on.loads == off.loads
    del on_content[2], off_content[2]
    assert on_content == off_content
    # a warm build computes no content key
    assert on_content[1:] == [0, 0, 0]
    for i, (a, b) in enumerate(zip(on.events, off.events, strict=True)):
        assert a == b, (i, sorted((a - b).items()), sorted((b - a).items()))
    assert on.loads[1] == on.loads[2] == on.loads[3] == 1
    # every build took the path (the cold and the third on the cold path)
    assert on.seeded == 5
    assert off.seeded == 0
