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

import hashlib
import inspect
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from frontends import BuildResult, Client
from frontends.forwarder import Forwarder
from solver import (
    CachedResult,
    Definition,
    Edge,
    InMemoryCacheManager,
    LocalCacheExport,
    LocalCacheImport,
    ProgressEvent,
    Result,
    SolveError,
    Solver,
    SolveRequest,
    digest_of,
)
from solver._cache import CacheExportOptions, CacheExportResult, CacheLink, root_key
from solver.bridge._caches import with_cache_sources
from solver.cache._directory import (
    CacheImportError,
    LocalCacheExportStats,
    LocalCacheSource,
    export_local_cache,
    open_local_cache,
)
from solver.cache._export import KeyExporter, MergedExporter, export_cache
from solver.cache._storage import InMemoryCacheStorage
from solver.cli import main
from solver.cli._cacheopts import parse_export_cache, parse_import_cache
from solver.testing import HandleTracker
from solver.worker import SnapshotView, State, Worker, merge, run
from tests.harness import (
    DummyResult,
    TestVertex,
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

        # the save's exporter (the cold path gives the key the save's one
        # exporter; the edges' commit wraps the saves' exporters in a merged one)
        exporter = res.cache_keys[0].exporter
        if isinstance(exporter, MergedExporter):
            exporter = exporter.exporters[0]
        assert isinstance(exporter, KeyExporter)
        record = exporter.record
        assert record is not None
        # remove the record's result from the key storage behind the exporter's back
        storage = inner.storage
        assert isinstance(storage, InMemoryCacheStorage)
        storage._lose_result(await inner.storage_id(record.key), record.id)

        target = RecordingTarget()
        await exporter.export_to(target, opts(True))  # no error: the record is skipped
        await res.release()
        assert target.summary() == {
            rec("const-2"): (0, 0),
            rec("const-3"): (0, 0),
            rec("sum-1-2"): (0, 2),
        }
    await cm.close()


# -- the local cache format, with the test harness's results -----------------------------


class DummyCodec:
    """Packs a DummyResult as JSON; counts unpacks."""

    media_type = "application/x-dummy-result"

    def __init__(self) -> None:
        self.packed = 0
        self.unpacked = 0

    async def pack(self, result: Result, path: Path) -> str | None:
        sys = result.sys
        if not isinstance(sys, DummyResult):
            return None
        data = json.dumps([sys.value, sys.int_value]).encode()
        await anyio.Path(path).write_bytes(data)
        self.packed += 1
        return "sha256:" + hashlib.sha256(data).hexdigest()

    async def unpack(self, path: Path) -> Result:
        value, int_value = json.loads(await anyio.Path(path).read_bytes())
        self.unpacked += 1
        return DummyResult(value, int_value)


def sum_graph(leaf: int = 5) -> tuple[Edge, TestVertex]:
    """Test 24's graph, sum(1) <- [sum(2) <- const 3, const leaf]: new vertex objects
    (new names) with the same cache keys each call."""
    top = vtx_sum(1, inputs=[Edge(vtx_sum(2, inputs=[Edge(vtx_const(3))])), Edge(vtx_const(leaf))])
    return Edge(top), top


async def build_and_export(dest: Path, mode: Literal["min", "max"]) -> LocalCacheExportStats:
    codec = DummyCodec()
    cm = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        edge, _ = sum_graph()
        j = s.new_job()
        res = await j.build(edge)
        assert unwrap_int(res) == 11
        stats = await export_local_cache(res, dest, codec, mode=mode)
        await res.release()
        await j.discard()
    await cm.close()
    assert codec.packed == stats.packed
    return stats


async def build_imported(
    src: Path, edge: Edge, codec: DummyCodec | None = None
) -> tuple[int, LocalCacheSource]:
    """Build ``edge`` on an empty cache with ``src`` imported; its value, and the
    (closed) source."""
    codec = codec or DummyCodec()
    cm = InMemoryCacheManager()
    source = await open_local_cache(src, codec)
    try:
        async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
            j = s.new_job()
            res = await j.build(with_cache_sources(edge, [source]))
            value = unwrap_int(res)
            await res.release()
            await j.discard()
    finally:
        await source.close()
        await cm.close()
    return value, source


def index_of(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((path / "index.json").read_text())
    return doc


def blob_files(path: Path) -> set[str]:
    return {p.name for p in (path / "blobs" / "sha256").iterdir()}


@pytest.mark.parametrize("mode", ["min", "max"])
async def test_local_export_then_import_hits_every_step(
    tmp_path: Path, mode: Literal["min", "max"], handle_tracker: HandleTracker
) -> None:
    stats = await build_and_export(tmp_path / "cache", mode)
    # min: the top's result only; max: sum(2)'s too. Roots export no results.
    results = 1 if mode == "min" else 2
    assert (stats.records, stats.results, stats.blobs) == (4, results, results)
    doc = index_of(tmp_path / "cache")
    assert doc["version"] == 1
    assert len(doc["records"]) == 4
    assert blob_files(tmp_path / "cache") == {
        b["digest"].removeprefix("sha256:") for b in doc["blobs"]
    }

    edge, top = sum_graph()
    counters = top.setup_call_counters()
    value, source = await build_imported(tmp_path / "cache", edge)
    assert value == 11
    assert counters.exec == 0
    assert counters.cache == 4
    assert source.unpacked == 1  # only the top record was loaded


@pytest.mark.parametrize(("mode", "execs", "unpacked"), [("min", 4, 0), ("max", 2, 1)])
async def test_local_import_changed_leaf_reruns_its_dependants(
    tmp_path: Path, mode: Literal["min", "max"], execs: int, unpacked: int
) -> None:
    await build_and_export(tmp_path / "cache", mode)
    edge, top = sum_graph(leaf=6)
    counters = top.setup_call_counters()
    value, source = await build_imported(tmp_path / "cache", edge)
    assert value == 12
    # max: const 6 and the top run, sum(2) is loaded from the import; min has no
    # intermediate results, so its whole branch runs too
    assert counters.exec == execs
    assert source.unpacked == unpacked


async def test_local_export_replaces_the_index_and_drops_stale_blobs(tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    first = await build_and_export(dest, "max")
    before = blob_files(dest)
    assert len(before) == 2
    (dest / "blobs" / "sha256" / ".tmp-leftover").write_bytes(b"debris")
    # a new build exported in min mode over it: its top result has the same
    # content, so the same blob; sum(2)'s blob and the debris go
    second = await build_and_export(dest, "min")
    after = blob_files(dest)
    assert len(after) == 1
    assert after < before
    assert (first.removed, second.removed) == (0, 2)
    assert index_of(dest)["blobs"][0]["digest"].removeprefix("sha256:") in after


async def test_local_reexport_of_an_imported_result_copies_its_blob(tmp_path: Path) -> None:
    await build_and_export(tmp_path / "a", "min")
    codec = DummyCodec()
    cm = InMemoryCacheManager()
    source = await open_local_cache(tmp_path / "a", codec)
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        edge, _ = sum_graph()
        j = s.new_job()
        res = await j.build(with_cache_sources(edge, [source]))
        stats = await export_local_cache(res, tmp_path / "b", codec, mode="min")
        await res.release()
        await j.discard()
    await source.close()
    await cm.close()
    assert codec.unpacked == 1
    # the main cache took the imported result: it is the best record now, and
    # packed from there, gives the same bytes
    assert stats.results == 1
    assert index_of(tmp_path / "b")["blobs"] == index_of(tmp_path / "a")["blobs"]
    assert blob_files(tmp_path / "b") == blob_files(tmp_path / "a")


async def test_local_import_missing_blob_is_a_clean_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await build_and_export(tmp_path / "cache", "max")
    top_blob = index_of(tmp_path / "cache")["records"][-1]["results"][0]["blob"]
    (tmp_path / "cache" / "blobs" / "sha256" / top_blob.removeprefix("sha256:")).unlink()
    edge, top = sum_graph()
    counters = top.setup_call_counters()
    with caplog.at_level(logging.WARNING, logger="solver"):
        value, source = await build_imported(tmp_path / "cache", edge)
    assert value == 11
    assert counters.exec == 2  # the top ran, on sum(2) loaded from the import
    assert counters.cache == 4
    assert source.unpacked == 1
    assert "1 blob(s) named by the index are missing" in caplog.text


async def test_local_import_corrupt_blob_runs_the_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await build_and_export(tmp_path / "cache", "min")
    top_blob = index_of(tmp_path / "cache")["records"][-1]["results"][0]["blob"]
    path = tmp_path / "cache" / "blobs" / "sha256" / top_blob.removeprefix("sha256:")
    path.write_bytes(b'["tampered", 99]')
    edge, top = sum_graph()
    counters = top.setup_call_counters()
    with caplog.at_level(logging.WARNING, logger="solver"):
        value, source = await build_imported(tmp_path / "cache", edge)
    assert value == 11  # not 99: the tampered blob was never unpacked
    assert counters.exec == 4
    assert source.unpacked == 0
    assert f"blob {top_blob} is corrupt: its content has digest" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no cache to import at"),
        (b"{not json", "is corrupt: it is not JSON"),
        (b'{"version": 2, "blobs": [], "records": []}', "this library reads version 1"),
        (b'{"version": 1, "blobs": [], "records": [], "x": 1}', "unknown field(s) x"),
        (b'{"version": 1, "blobs": []}', "lacks field(s) records"),
        (
            b'{"version": 1, "blobs": [], "records": [{"digest": "sha256:'
            + b"a" * 64
            + b'", "inputs": [[{"record": 0}]]}]}',
            "records[0].inputs[0][0].record must be the position of an earlier record",
        ),
        (
            b'{"version": 1, "blobs": [], "records": [{"digest": "sha256:'
            + b"a" * 64
            + b'", "results": [{"blob": "sha256:'
            + b"b" * 64
            + b'", "created_at": 1}]}]}',
            "records[0].results[0].blob sha256:" + "b" * 64 + " is not in 'blobs'",
        ),
        (b'{"version": 1, "blobs": [], "records": [{"digest": "md5:x"}]}', "records[0].digest"),
    ],
)
async def test_local_import_bad_index(tmp_path: Path, content: bytes | None, message: str) -> None:
    tmp_path.joinpath("cache").mkdir()
    if content is not None:
        tmp_path.joinpath("cache", "index.json").write_bytes(content)
    with pytest.raises(CacheImportError, match=re.escape(message)):
        await open_local_cache(tmp_path / "cache", DummyCodec())


async def test_local_import_closed_source_is_a_miss(tmp_path: Path) -> None:
    await build_and_export(tmp_path / "cache", "min")
    source = await open_local_cache(tmp_path / "cache", DummyCodec())
    await source.close()
    await source.close()  # idempotent
    edge, top = sum_graph()
    counters = top.setup_call_counters()
    cm = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        j = s.new_job()
        res = await j.build(with_cache_sources(edge, [source]))
        assert unwrap_int(res) == 11
        await res.release()
        await j.discard()
    await cm.close()
    assert counters.exec == 4


async def test_export_of_a_deep_chain_does_not_recurse(tmp_path: Path) -> None:
    depth = 400
    cm = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cm) as s:
        edge = Edge(vtx_const(0))
        for i in range(depth):
            edge = Edge(vtx_sum(1, inputs=[edge], cache_key_seed=f"chain-{i}"))
        j = s.new_job()
        res = await j.build(edge)
        assert unwrap_int(res) == depth
        # Leave the exports fewer frames than the chain is deep: a walk that
        # recursed (at least one frame per level) would raise RecursionError.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(len(inspect.stack()) + depth // 2)
        try:
            target = RecordingTarget()
            await export_cache(res.cache_keys, target, opts(True))
            stats = await export_local_cache(res, tmp_path / "cache", DummyCodec(), mode="min")
        finally:
            sys.setrecursionlimit(limit)
        assert target.unique() == depth + 1
        assert (stats.records, stats.results) == (depth + 1, 1)
        await res.release()
        await j.discard()
    await cm.close()


# -- with the built-in worker -----------------------------------------------------------

PY = sys.executable


def worker_graph(log: Path, other: str = "one") -> Definition:
    """merge([twice <- upper <- inline a.txt, bang <- inline x.txt]); every exec
    appends its name to ``log``."""

    def step(name: str, script: str, root: State) -> State:
        code = f"import pathlib; open({str(log)!r}, 'a').write({name!r} + '\\n'); {script}"
        return run([PY, "-c", code], root=root, name=name)

    src = State.inline({"a.txt": "hello\n"}).with_name("src")
    upper = step(
        "upper", "pathlib.Path('b.txt').write_text(pathlib.Path('a.txt').read_text().upper())", src
    )
    twice = step(
        "twice", "pathlib.Path('c.txt').write_text(pathlib.Path('b.txt').read_text() * 2)", upper
    )
    leaf = State.inline({"x.txt": other}).with_name("leaf")
    bang = step(
        "bang", "pathlib.Path('d.txt').write_text(pathlib.Path('x.txt').read_text() + '!')", leaf
    )
    return merge([twice, bang], name="all").definition()


def execs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


async def solve_watched(
    solver: Solver, request: SolveRequest
) -> tuple[dict[str, bytes], list[ProgressEvent]]:
    """Solve ``request`` in a job whose progress is collected; the files c.txt and
    d.txt of the result, and the events."""
    events: list[ProgressEvent] = []
    job = solver.new_job()

    async def collect() -> None:
        async for ev in job.status():
            events.append(ev)

    async with anyio.create_task_group() as tg:
        tg.start_soon(collect)
        try:
            async with await solver.solve(request, job=job) as result:
                assert result.ref is not None
                view = result.ref.sys
                assert isinstance(view, SnapshotView)
                files = {name: await view.read_bytes(name) for name in ("c.txt", "d.txt")}
        finally:
            await job.discard()
    return files, events


EXPECTED_FILES = {"c.txt": b"HELLO\nHELLO\n", "d.txt": b"one!"}


async def export_from_a_worker(tmp_path: Path) -> Path:
    """Build the graph once, exporting it to tmp_path/min and tmp_path/max."""
    log = tmp_path / "execs.log"
    async with (
        Worker(tmp_path / "first", sandbox="none") as worker,
        Solver(worker=worker) as solver,
    ):
        request = SolveRequest(
            definition=worker_graph(log),
            cache_exports=[
                LocalCacheExport(tmp_path / "min", "min"),
                LocalCacheExport(tmp_path / "max", "max"),
            ],
        )
        files, _ = await solve_watched(solver, request)
    assert files == EXPECTED_FILES
    assert sorted(execs(log)) == ["bang", "twice", "upper"]
    return log


@pytest.mark.parametrize("mode", ["min", "max"])
async def test_worker_export_then_import_on_an_empty_cache_hits_every_step(
    tmp_path: Path, mode: str, handle_tracker: HandleTracker
) -> None:
    log = await export_from_a_worker(tmp_path)
    # the index names one blob (min: the merge) or four (max: the three execs too)
    assert len(index_of(tmp_path / mode)["blobs"]) == (1 if mode == "min" else 4)
    fresh = tmp_path / "fresh"
    async with Worker(fresh, sandbox="none") as worker, Solver(worker=worker) as solver:
        request = SolveRequest(
            definition=worker_graph(log), cache_imports=[LocalCacheImport(tmp_path / mode)]
        )
        files, events = await solve_watched(solver, request)
        assert files == EXPECTED_FILES
        assert len(execs(log)) == 3  # nothing ran
        assert [e.name for e in events if e.status == "started"] == []
        assert [e.name for e in events if e.status == "cached"][-1] == "all"
        # only the top result was unpacked: the store holds that one snapshot
        usage = await worker.store.usage()
        assert [u.description.get("kind") for u in usage] == ["cache-import"]

        # the import became local: without it, the same solve still runs nothing
        files, events = await solve_watched(solver, SolveRequest(definition=worker_graph(log)))
        assert files == EXPECTED_FILES
        assert len(execs(log)) == 3
        assert len(await worker.store.usage()) == 1


@pytest.mark.parametrize(("mode", "ran"), [("min", ["bang", "twice", "upper"]), ("max", ["bang"])])
async def test_worker_import_changed_leaf_reruns_only_its_dependants(
    tmp_path: Path, mode: str, ran: list[str]
) -> None:
    log = await export_from_a_worker(tmp_path)
    async with (
        Worker(tmp_path / "fresh", sandbox="none") as worker,
        Solver(worker=worker) as solver,
    ):
        request = SolveRequest(
            definition=worker_graph(log, other="two"),
            cache_imports=[LocalCacheImport(tmp_path / mode)],
        )
        files, _ = await solve_watched(solver, request)
    assert files == {"c.txt": b"HELLO\nHELLO\n", "d.txt": b"two!"}
    # max: twice comes from the import; only the changed branch and the merge run
    assert sorted(execs(log)[3:]) == ran


async def test_worker_import_refuses_a_blob_that_leaves_the_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = await export_from_a_worker(tmp_path)
    cache = tmp_path / "min"
    # swap the one blob for a tar whose member climbs out of the snapshot
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    data = evil.getvalue()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    doc = index_of(cache)
    old = doc["blobs"][0]["digest"]
    (cache / "blobs" / "sha256" / old.removeprefix("sha256:")).unlink()
    (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    doc["blobs"][0] = {**doc["blobs"][0], "digest": digest, "size": len(data)}
    for record in doc["records"]:
        for result in record.get("results", []):
            result["blob"] = digest
    (cache / "index.json").write_text(json.dumps(doc))

    async with (
        Worker(tmp_path / "fresh", sandbox="none") as worker,
        Solver(worker=worker) as solver,
    ):
        with caplog.at_level(logging.WARNING, logger="solver"):
            files, _ = await solve_watched(
                solver,
                SolveRequest(definition=worker_graph(log), cache_imports=[LocalCacheImport(cache)]),
            )
    assert files == EXPECTED_FILES
    assert len(execs(log)) == 6  # the blob was refused: everything ran
    assert "cannot be unpacked" in caplog.text
    assert not await anyio.to_thread.run_sync(lambda: list(tmp_path.rglob("escaped.txt")))


class NoFrontend:
    async def solve(self, bridge: object, opts: object, inputs: object) -> object:
        raise AssertionError("never called")


async def test_solve_request_cache_options(tmp_path: Path) -> None:
    cm = InMemoryCacheManager()
    frontends: Any = {"x": NoFrontend()}
    async with Solver(resolve_op=resolve_op, default_cache=cm, frontends=frontends) as solver:
        # no built-in worker: a local cache needs a codec
        with pytest.raises(SolveError, match="needs a codec: this solver has no built-in worker"):
            await solver.solve(
                SolveRequest(
                    definition=worker_graph(tmp_path / "log"),
                    cache_imports=[LocalCacheImport(tmp_path)],
                )
            )
        with pytest.raises(SolveError, match="needs a codec: this solver has no built-in worker"):
            await solver.solve(
                SolveRequest(frontend="x", cache_imports=[LocalCacheImport(tmp_path)])
            )
    await cm.close()
    with pytest.raises(ValueError, match="'min' or 'max'"):
        LocalCacheExport(tmp_path, "all")  # type: ignore[arg-type]


async def test_frontend_solve_exports_and_imports_every_result(tmp_path: Path) -> None:
    """A frontend's results (one value under two keys) go into one export; a
    frontend solve on an empty cache directory importing it runs nothing."""
    log = tmp_path / "execs.log"

    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=worker_graph(log)))).ref
        assert ref is not None
        out = BuildResult()
        out.add_ref("linux/amd64", ref)
        out.add_ref("linux/386", ref)
        return out

    cache = tmp_path / "exported"
    frontends: Any = {"fw": Forwarder(build)}
    export = SolveRequest(frontend="fw", cache_exports=[LocalCacheExport(cache, "max")])
    async with (
        Worker(tmp_path / "one", sandbox="none") as worker,
        Solver(worker=worker, frontends=frontends) as s,
        await s.solve(export) as res,
    ):
        assert set(res.refs) == {"linux/amd64", "linux/386"}
    ran = len(execs(log))
    assert ran == 3
    assert (cache / "index.json").is_file()

    imported = SolveRequest(frontend="fw", cache_imports=[LocalCacheImport(cache)])
    async with (
        Worker(tmp_path / "two", sandbox="none") as worker,
        Solver(worker=worker, frontends=frontends) as s,
        await s.solve(imported) as res,
    ):
        for ref in res.refs.values():
            view = ref.sys
            assert isinstance(view, SnapshotView)
            assert await view.read_bytes("c.txt") == b"HELLO\nHELLO\n"
    assert len(execs(log)) == ran  # every step came from the imported cache


# -- the command line ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [PY, "-m", "solver", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_export_then_import_on_an_empty_cache_dir(tmp_path: Path) -> None:
    log = tmp_path / "execs.log"
    defn = tmp_path / "graph.json"
    defn.write_text(worker_graph(log).to_json())
    cache = tmp_path / "exported"
    r = cli(
        "build", str(defn), "--progress", "plain", "--sandbox", "none",
        "--cache-dir", str(tmp_path / "one"),
        "--export-cache", f"type=local,dest={cache},mode=max",
    )
    assert r.returncode == 0, r.stderr
    assert f"exported the cache to {cache} (mode=max): " in r.stderr
    assert "4 results, 4 blobs" in r.stderr
    assert len(execs(log)) == 3

    out = tmp_path / "out"
    r = cli(
        "build", str(defn), "--progress", "plain", "--sandbox", "none",
        "--cache-dir", str(tmp_path / "two"),
        "--import-cache", f"src={tmp_path / 'nothing-here'}",
        "--import-cache", f"type=local,src={cache}",
        "--output", str(out),
    )
    assert r.returncode == 0, r.stderr
    assert f"warning: no cache to import at {tmp_path / 'nothing-here'}" in r.stderr
    assert len(execs(log)) == 3  # every step came from the imported cache
    assert (out / "c.txt").read_text() == "HELLO\nHELLO\n"
    assert (out / "d.txt").read_text() == "one!"

    # a corrupt index is an error, not a silent miss
    (cache / "index.json").write_text('{"version": 1, "records": []}')
    r = cli(
        "build", str(defn), "--progress", "plain", "--sandbox", "none",
        "--cache-dir", str(tmp_path / "three"),
        "--import-cache", f"type=local,src={cache}",
    )
    assert r.returncode == 1
    assert "error: the cache index" in r.stderr
    assert "is corrupt: the index lacks field(s) blobs" in r.stderr
    assert len(execs(log)) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--export-cache", "type=registry,ref=x"], "unknown --export-cache type 'registry'"),
        (["--export-cache", "dest=x,mode=all"], "--export-cache mode must be min or max"),
        (["--export-cache", "type=local"], "--export-cache needs dest=DIR"),
        (["--export-cache", "dest"], "bad --export-cache field 'dest': expected key=value"),
        (["--export-cache", "dest=a,dest=b"], "--export-cache field 'dest' given twice"),
        (["--import-cache", "type=local"], "--import-cache needs src=DIR"),
        (["--import-cache", "src=a,mode=max"], "unknown --import-cache field(s): mode"),
    ],
)
def test_cli_bad_cache_specs(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", "graph.json", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_cli_cache_spec_parsing() -> None:
    assert parse_export_cache("type=local,dest=d,mode=max") == LocalCacheExport("d", "max")
    assert parse_export_cache("dest=d") == LocalCacheExport("d", "min")
    assert parse_import_cache("src=s") == LocalCacheImport("s")
