"""Cache export: BuildKit's exporter tests (``solver/scheduler_test.go`` 23, 24,
27-30 and 34), ported.

BuildKit asserts on ``records[i]`` by position in the sequence of ``target.Add``
calls, a sequence that includes repeated adds of one digest (the dependency
recursion and the backlink walks reach records more than once; the Go comments say
the order "isn't really significant"). These ports assert the same numbers per
*record digest* instead: how many unique digests were added, and for each one the
most results and input slots (``len(links)``) any add of it carried. Every digest
is named by its role (``root_key`` of the seed's cache digest), so a count that
lands on the wrong record fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from solver import (
    CachedResult,
    Edge,
    InMemoryCacheManager,
    Result,
    Solver,
    digest_of,
)
from solver._cache import root_key
from solver._cacheexport import (
    CacheExportOptions,
    CacheExportResult,
    CacheLink,
    KeyExporter,
    MergedExporter,
)
from solver._cachestorage import InMemoryCacheStorage
from solver.testing import HandleTracker
from tests.harness import (
    DummyResult,
    TrackingCacheManager,
    digest_from_result,
    resolve_op,
    unwrap,
    unwrap_int,
    vtx,
    vtx_const,
    vtx_sum,
)

pytestmark = pytest.mark.anyio


@dataclass
class Added:
    digest: str
    results: int
    links: int


class RecordingTarget:
    """BuildKit's testExporterTarget: every ``add`` is one new record, no dedupe."""

    def __init__(self) -> None:
        self.records: list[Added] = []

    def add(
        self,
        digest: str,
        links: Sequence[Sequence[CacheLink]],
        results: Sequence[CacheExportResult],
    ) -> Added:
        rec = Added(digest, len(results), len(links))
        self.records.append(rec)
        return rec

    def unique(self) -> int:
        return len({r.digest for r in self.records})

    def summary(self) -> dict[str, tuple[int, int]]:
        """Digest -> (most results, most input slots) over its adds."""
        out: dict[str, tuple[int, int]] = {}
        for r in self.records:
            res, links = out.get(r.digest, (0, 0))
            out[r.digest] = (max(res, r.results), max(links, r.links))
        return out


async def fake_remote(res: Result) -> object:
    """BuildKit's testExporterOpts: one fake remote per dummy result."""
    sys = res.sys
    assert isinstance(sys, DummyResult)
    return ("remote", sys.value, sys.int_value)


def opts(max_mode: bool) -> CacheExportOptions:
    return CacheExportOptions("max" if max_mode else "min", resolve_remote=fake_remote)


async def export(res: CachedResult, target: RecordingTarget, max_mode: bool) -> None:
    exporter = res.cache_keys[0].exporter
    assert exporter is not None
    await exporter.export_to(target, opts(max_mode))


def rec(seed: str, output: int = 0) -> str:
    """The record digest of the op whose cache key seed is ``seed``."""
    return root_key(digest_of(f"seed:{seed}".encode()), output)


def slow(value: str) -> str:
    """The record digest of the content key of a result whose value is ``value``."""
    return root_key(digest_of(value.encode()), -1)


# 23
async def test_cache_exporting(handle_tracker: HandleTracker) -> None:
    cm = TrackingCacheManager(InMemoryCacheManager())
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        g0 = Edge(vtx_sum(1, inputs=[Edge(vtx_const(2)), Edge(vtx_const(3))]))
        expected = {rec("const-2"): (0, 0), rec("const-3"): (0, 0), rec("sum-1-2"): (1, 2)}
        for _ in range(2):  # the second time everything comes from the cache
            j = s.new_job()
            res = await j.build(g0)
            assert unwrap_int(res) == 6
            await j.discard()
            target = RecordingTarget()
            await export(res, target, True)
            await res.release()
            assert target.unique() == 3
            assert target.summary() == expected
    await cm.close()


# 24
async def test_cache_exporting_mode_min(handle_tracker: HandleTracker) -> None:
    cm = TrackingCacheManager(InMemoryCacheManager())
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        g0 = Edge(
            vtx_sum(
                1,
                inputs=[Edge(vtx_sum(2, inputs=[Edge(vtx_const(3))])), Edge(vtx_const(5))],
            )
        )
        # min: only the top record has its result; sum(2) has its one input slot
        minimal = {
            rec("const-3"): (0, 0),
            rec("const-5"): (0, 0),
            rec("sum-2-1"): (0, 1),
            rec("sum-1-2"): (1, 2),
        }
        for max_mode, expected in [
            (False, minimal),  # built
            (False, minimal),  # from the cache
            (True, {**minimal, rec("sum-2-1"): (1, 1)}),  # max: the intermediate too
        ]:
            j = s.new_job()
            res = await j.build(g0)
            assert unwrap_int(res) == 11
            await j.discard()
            target = RecordingTarget()
            await export(res, target, max_mode)
            await res.release()
            assert target.unique() == 4
            assert target.summary() == expected
    await cm.close()


# 27
async def test_cache_multiple_maps(handle_tracker: HandleTracker) -> None:
    cm = TrackingCacheManager(InMemoryCacheManager())
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        j0 = s.new_job()
        g0 = Edge(
            vtx(
                name="v0",
                cache_key_seed="seed0",
                cache_key_seeds=[lambda: "seed1", lambda: "seed2"],
                value="result0",
            )
        )
        res = await j0.build(g0)
        assert unwrap(res) == "result0"
        await j0.discard()
        target = RecordingTarget()
        await export(res, target, True)
        await res.release()
        assert target.unique() == 3
        # three root keys of one op: no results (roots), no links
        assert target.summary() == {rec(f"seed{i}"): (0, 0) for i in range(3)}

        called = []

        def seed3() -> str:
            called.append(True)
            return "seed3"

        j1 = s.new_job()
        g1 = Edge(
            vtx(
                name="v1",
                cache_key_seed="seed1",
                cache_key_seeds=[seed3],
                value="result0-not-cached",
            )
        )
        res = await j1.build(g1)
        assert unwrap(res) == "result0"
        await j1.discard()
        target = RecordingTarget()
        await export(res, target, True)
        await res.release()
        assert target.unique() == 3
        assert not called  # the second map is never asked for after a hit

        def seed2() -> str:
            called.append(True)
            return "seed2"

        j2 = s.new_job()
        g2 = Edge(
            vtx(
                name="v2",
                cache_key_seed="seed3",
                cache_key_seeds=[seed2],
                value="result0-not-cached",
            )
        )
        res = await j2.build(g2)
        assert unwrap(res) == "result0"
        await j2.discard()
        target = RecordingTarget()
        await export(res, target, True)
        await res.release()
        assert target.unique() == 3
        assert called == [True]
        assert set(target.summary()) == {rec(f"seed{i}") for i in range(3)}
    await cm.close()


# 28
async def test_cache_input_multiple_maps(handle_tracker: HandleTracker) -> None:
    cm = TrackingCacheManager(InMemoryCacheManager())
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:

        def graph(v1_seed: str, value: str) -> Edge:
            v1 = vtx(
                name="v1",
                cache_key_seed=v1_seed,
                cache_key_seeds=[lambda: "seed2"],
                value=f"result1{value}",
            )
            return Edge(
                vtx(name="v0", cache_key_seed="seed0", value=f"result0{value}", inputs=[Edge(v1)])
            )

        j0 = s.new_job()
        res = await j0.build(graph("seed1", ""))
        assert unwrap(res) == "result0"
        target = RecordingTarget()
        await export(res, target, True)
        await res.release()
        assert target.unique() == 3
        assert target.summary() == {
            rec("seed1"): (0, 0),
            rec("seed2"): (0, 0),
            rec("seed0"): (1, 1),
        }
        await j0.discard()

        j1 = s.new_job()
        res = await j1.build(graph("seed1.changed", "-no-cache"))
        assert unwrap(res) == "result0"  # through v1's second key
        await export(res, target, True)  # into the same target
        await res.release()
        assert target.unique() == 3
        await j1.discard()
    await cm.close()


# 29
async def test_cache_exporting_partial_selector(handle_tracker: HandleTracker) -> None:
    cm = TrackingCacheManager(InMemoryCacheManager())
    sel0 = digest_of(b"sel0")
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:

        def graph(v1_seed: str) -> Edge:
            return Edge(
                vtx(
                    name="v0",
                    cache_key_seed="seed0",
                    value="result0",
                    inputs=[Edge(vtx(name="v1", cache_key_seed=v1_seed, value="result1"))],
                    selectors={0: sel0},
                    slow_cache_compute={0: digest_from_result},
                )
            )

        first = {rec("seed1"): (0, 0), slow("result1"): (0, 0), rec("seed0"): (1, 1)}
        for g, unique, expected in [
            (graph("seed1"), 3, first),
            (graph("seed1"), 3, first),  # everything from the cache
            # a new input definition with equal content: found through the slow key,
            # and the old input through the backlinks
            (graph("seed1-net"), 4, {**first, rec("seed1-net"): (0, 0)}),
        ]:
            j = s.new_job()
            res = await j.build(g)
            assert unwrap(res) == "result0"
            await j.discard()
            target = RecordingTarget()
            await export(res, target, True)
            await res.release()
            assert target.unique() == unique
            assert target.summary() == expected

        # a wrapper around the last graph adds one record, with its result
        j3 = s.new_job()
        g3 = Edge(
            vtx(name="v2", cache_key_seed="seed2", value="result2", inputs=[graph("seed1-net")])
        )
        res = await j3.build(g3)
        assert unwrap(res) == "result2"
        await j3.discard()
        target = RecordingTarget()
        await export(res, target, True)
        await res.release()
        assert target.unique() == 5
        assert target.summary() == {
            rec("seed1"): (0, 0),
            rec("seed1-net"): (0, 0),
            slow("result1"): (0, 0),
            rec("seed0"): (1, 1),
            rec("seed2"): (1, 1),
        }
    await cm.close()


# 30
async def test_cache_exporting_merged_key(handle_tracker: HandleTracker) -> None:
    cm = TrackingCacheManager(InMemoryCacheManager())
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        j0 = s.new_job()
        g0 = Edge(
            vtx(
                name="v0",
                cache_key_seed="seed0",
                value="result0",
                inputs=[
                    Edge(
                        vtx(
                            name="v1",
                            cache_key_seed="seed1",
                            value="result1",
                            inputs=[
                                Edge(vtx(name="v2", cache_key_seed="seed2", value="result2"))
                            ],
                            slow_cache_compute={0: digest_from_result},
                        )
                    ),
                    Edge(
                        vtx(
                            name="v1-diff",
                            cache_key_seed="seed1",
                            value="result1",
                            inputs=[
                                Edge(vtx(name="v3", cache_key_seed="seed3", value="result2"))
                            ],
                            slow_cache_compute={0: digest_from_result},
                        )
                    ),
                ],
            )
        )
        res = await j0.build(g0)
        assert unwrap(res) == "result0"
        await j0.discard()
        target = RecordingTarget()
        await export(res, target, True)
        await res.release()
        assert target.unique() == 5
        # both inputs of v1 (v2 and, from the merged v1-diff, v3) are exported
        assert target.summary() == {
            rec("seed2"): (0, 0),
            rec("seed3"): (0, 0),
            slow("result2"): (0, 0),
            rec("seed1"): (1, 1),
            rec("seed0"): (1, 2),
        }
    await cm.close()


# 34
async def test_cache_err_not_found(handle_tracker: HandleTracker) -> None:
    inner = InMemoryCacheManager()
    cm = TrackingCacheManager(inner)
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        j0 = s.new_job()
        g0 = Edge(vtx_sum(1, inputs=[Edge(vtx_const(2)), Edge(vtx_const(3))]))
        res = await j0.build(g0)
        assert unwrap_int(res) == 6
        await j0.discard()

        merged = res.cache_keys[0].exporter
        assert isinstance(merged, MergedExporter)
        exporter = merged.exporters[0]
        assert isinstance(exporter, KeyExporter)
        record = exporter.record
        assert record is not None
        # remove the record's result from the key storage behind the exporter's back
        storage = inner.storage
        assert isinstance(storage, InMemoryCacheStorage)
        del storage._by_id[await inner.storage_id(record.key)].results[record.id]

        target = RecordingTarget()
        await exporter.export_to(target, opts(True))  # no error: the record is skipped
        await res.release()
        assert target.summary() == {
            rec("const-2"): (0, 0),
            rec("const-3"): (0, 0),
            rec("sum-1-2"): (0, 2),
        }
    await cm.close()
