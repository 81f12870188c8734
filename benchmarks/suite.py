"""The benchmark suite: the engine next to a naive executor and dask, on no-op graphs.

Run from the repository root (``docs/performance.md`` explains every number)::

    python benchmarks/suite.py [--quick] [--backend asyncio|trio|both]
                               [--out benchmarks/results/<name>.json]
                               [--sizes 1000,10000] [--shapes chain,fan,lattice,random]
                               [--large-sizes 100000] [--large-shapes chain,lattice,random]
                               [--repeat 3] [--once-above 1000] [--no-dask]
                               [--concurrency 1,8,64,128] [--concurrency-size 1000]
                               [--memory-shapes lattice,random] [--memory-size 10000]

For each backend, in one process, on graphs of :class:`~benchmarks.graphs.NoopVertex`:

1. *shapes*: for each shape and size, the median over ``--repeat`` runs (graphs
   above ``--once-above`` vertices run once) of: the naive executor, ``dask.get``
   on the same graph, a cold solve, a warm re-solve in a new job (everything
   cached: one load), the discard of the cold job, and, for the lattice and
   random shapes, a warm re-solve of the graph with one leaf replaced (only its
   dependants run); then the same without the leaf change for each of
   ``--large-shapes`` at each of ``--large-sizes`` (by default chain, lattice
   and random at 100,000 vertices, once: the growth target's largest size, so
   that the default run checks every target of issue 13);
2. *concurrency*: K jobs building the same graph at once in a fresh solver;
3. *memory*: a separate pass under ``tracemalloc``: peak bytes traced during a
   cold solve, per active vertex (timings never run under tracemalloc).

Each op counts its execs and a :class:`CountingCacheManager` counts cache loads,
so every run also checks what ran: each op once per cold solve, exactly one
load per warm re-solve, only the dirty vertices after a leaf change.

It prints tables (µs per vertex, ratios with PASS/FAIL against the targets,
counts) and writes a JSON results file with the machine's description. A FAIL
never fails the process; the exit status is 1 only if a count was wrong or a
case raised (the error is recorded and the suite goes on).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from benchmarks.baselines import dask_get, dask_graph, naive, run_dask
from benchmarks.graphs import (
    SHAPES,
    Graph,
    exec_counts,
    reset_exec_counts,
    resolve_op,
    with_leaf_changed,
)
from solver import (
    CacheKey,
    CacheKeyWithSelector,
    CacheManager,
    CacheRecord,
    Edge,
    ExportableCacheKey,
    InMemoryCacheManager,
    Job,
    Result,
    Solver,
)

__all__ = ["Config", "CountingCacheManager", "main", "run_suite"]

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "latest.json"

# The targets of issue 13, "Fast builds" (tighter than those of the first
# benchmark issue: 1.5x, 0.5x, 2x, 1.5x, 12x, 4 KiB).
COLD_VS_NAIVE = 1.0  # cold solve ≤ 1.0x the naive executor
COLD_VS_DASK = 1.0  # cold solve ≤ 1.0x dask.get
WARM_VS_NAIVE = 0.3  # warm re-solve ≤ 0.3x the naive executor
WARM_VS_DASK = 3.0  # warm re-solve ≥ 3x faster than dask.get
CONCURRENT_K = 64
CONCURRENT_VS_ONE = 1.2  # K=64 identical solves ≤ 1.2x one solve
GROWTH_SLACK = 1.1  # 10x the vertices ≤ 11x the time
MEMORY_PER_VERTEX = 2048  # peak bytes per active vertex
GC_SHARE = 0.10  # the cyclic collector under 10 % of a cold build (gc.callbacks)

_NO_DASK = "dask is not installed (pip install -e '.[bench]')"

# A guard against a hung solve, not a target: a phase may take 10 ms a vertex.
PHASE_SECONDS_PER_VERTEX = 0.01
PHASE_SECONDS_MIN = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    """What to run. :meth:`full` is the default run, :meth:`quick` the smoke test."""

    sizes: tuple[int, ...] = (1_000, 10_000)
    shapes: tuple[str, ...] = ("chain", "fan", "lattice", "random")
    # After ``sizes``, each of ``large_shapes`` (those also in ``shapes``) at each
    # of ``large_sizes``, once (above ``once_above``) and without the leaf-changed
    # rebuild: what the 100k growth target needs, in the default run.
    large_sizes: tuple[int, ...] = (100_000,)
    large_shapes: tuple[str, ...] = ("chain", "lattice", "random")
    repeat: int = 5
    leaf_shapes: tuple[str, ...] = ("lattice", "random")
    concurrency: tuple[int, ...] = (1, 8, 64, 128)
    concurrency_shape: str = "lattice"
    concurrency_size: int = 1_000
    memory_shapes: tuple[str, ...] = ("lattice", "random")
    memory_size: int = 10_000
    dask: bool = True
    once_above: int = 1_000  # larger graphs are measured once whatever ``repeat`` says
    gc_off: bool = False  # a diagnostic: no cyclic GC inside timed sections

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        # Seconds, not minutes. Depth is the full run's business: a 200-vertex
        # chain stays below the default recursion limit even for code that
        # recurses once per level.
        return cls(
            sizes=(20, 200), large_sizes=(), repeat=1, concurrency_size=100, memory_size=200
        )

    def repeats(self, n: int) -> int:
        return 1 if n > self.once_above else self.repeat


# -- a cache manager that counts -----------------------------------------------------------
class CountingCacheManager:
    """Wraps a :class:`~solver.CacheManager` and counts the calls the solver makes."""

    __slots__ = ("inner", "loads", "queries", "saves")

    def __init__(self, inner: CacheManager) -> None:
        self.inner = inner
        self.loads = 0
        self.saves = 0
        self.queries = 0

    def reset(self) -> None:
        self.loads = self.saves = self.queries = 0

    @property
    def id(self) -> str:
        return self.inner.id

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        self.queries += 1
        return await self.inner.query(deps, input, digest, output)

    async def query_many(
        self, requests: Sequence[tuple[Sequence[CacheKeyWithSelector], int, str, int]]
    ) -> list[list[CacheKey]]:
        # the cached path's batched lookups: counted per query, forwarded as a batch
        # so the engine is measured as it runs over its own cache
        self.queries += len(requests)
        query_many = getattr(self.inner, "query_many", None)
        if query_many is None:
            return [await self.inner.query(*r) for r in requests]
        return await query_many(requests)  # type: ignore[no-any-return]

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        return await self.inner.records(key)

    async def load(self, record: CacheRecord) -> Result:
        self.loads += 1
        return await self.inner.load(record)

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        self.saves += 1
        return await self.inner.save(key, result, created_at)

    async def save_many(
        self, saves: Sequence[tuple[CacheKey, Result, float]]
    ) -> list[ExportableCacheKey]:
        # the cold path's batched saves: counted per result, forwarded as a batch
        self.saves += len(saves)
        save_many = getattr(self.inner, "save_many", None)
        if save_many is None:
            return [await self.inner.save(*s) for s in saves]
        return await save_many(saves)  # type: ignore[no-any-return]

    async def release(self, result_id: str) -> None:
        await self.inner.release(result_id)

    async def close(self) -> None:
        await self.inner.close()


# -- results ---------------------------------------------------------------------------
@dataclass(slots=True)
class Counts:
    """What one kind of run executed and loaded (the last repeat's counts)."""

    execs: int = 0
    max_execs: int = 0  # execs of the vertex that ran most
    loads: int = 0
    saves: int = 0


@dataclass(slots=True)
class ShapeResult:
    shape: str
    vertices: int
    repeats: int
    # median µs per vertex; None if not measured
    naive_us: float | None = None
    dask_us: float | None = None
    cold_us: float | None = None
    # the cyclic collector's share of the cold builds' time (gc.callbacks)
    cold_gc_share: float | None = None
    warm_us: float | None = None
    discard_us: float | None = None
    cold: Counts = field(default_factory=Counts)
    warm: Counts = field(default_factory=Counts)
    # the warm re-solve after one leaf changed (lattice and random only)
    leaf_dirty: int | None = None
    leaf_expected_loads: int | None = None
    leaf_us: float | None = None  # per vertex of the whole graph
    leaf: Counts | None = None
    problems: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class ConcurrencyResult:
    shape: str
    vertices: int
    k: int
    repeats: int
    seconds: float | None = None  # median wall time until all K builds returned
    samples: list[float] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    same_result: bool | None = None  # every job got a handle on one value
    problems: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class MemoryResult:
    shape: str
    vertices: int
    peak_per_vertex: float | None = None  # engine: peak traced bytes during the solve
    held_per_vertex: float | None = None  # engine: traced bytes still held after it
    naive_peak_per_vertex: float | None = None
    error: str | None = None


@dataclass(slots=True)
class BackendResults:
    shapes: list[ShapeResult] = field(default_factory=list)
    concurrency: list[ConcurrencyResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    backend: str
    name: str
    case: str
    measured: str
    passed: bool


# -- measuring -------------------------------------------------------------------------
def _phase_limit(n: int) -> float:
    return max(PHASE_SECONDS_MIN, n * PHASE_SECONDS_PER_VERTEX)


def _median_us(samples: list[float], n: int) -> float | None:
    return statistics.median(samples) * 1e6 / n if samples else None


def _describe(exc: BaseException, phase: str) -> str:
    """One line: the exception, the phase, and the innermost engine frame."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    where = ""
    for frame in reversed(traceback.extract_tb(root.__traceback__)):
        path = Path(frame.filename)
        if path.parent.name == "solver":
            where = f" at solver/{path.name}:{frame.lineno} ({frame.name})"
            break
    kind = type(root).__name__
    if root is not exc:
        kind = f"{type(exc).__name__} from {kind}"
    message = str(root).splitlines()[0][:160] if str(root) else ""
    return f"{kind} in {phase}{where}: {message}"


class GcClock:
    """Time spent in the cyclic collector while active (a ``gc.callbacks`` hook)."""

    __slots__ = ("_started", "collections", "seconds", "seconds_by_generation")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.seconds_by_generation = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self.seconds += took
            self.seconds_by_generation[info["generation"]] += took
            self.collections[info["generation"]] += 1
            self._started = None


@contextlib.contextmanager
def _stopwatch(gc_off: bool) -> Iterator[list[float]]:
    """Time the block, after a ``gc.collect()``; the seconds are in ``[0]`` after
    it, the collector's seconds inside it in ``[1]``. With ``gc_off`` the cyclic
    collector is disabled inside the block."""
    elapsed = [0.0, 0.0]
    gc.collect()
    if gc_off:
        gc.disable()
    clock = GcClock()
    gc.callbacks.append(clock)
    t = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - t
        gc.callbacks.remove(clock)
        elapsed[1] = clock.seconds
        if gc_off:
            gc.enable()


async def _timed(gc_off: bool, fn: Callable[..., Awaitable[T]], *args: Any) -> tuple[float, T]:
    """``fn(*args)`` under :func:`_stopwatch`: (seconds, what it returned)."""
    seconds, _, out = await _timed_gc(gc_off, fn, *args)
    return seconds, out


async def _timed_gc(
    gc_off: bool, fn: Callable[..., Awaitable[T]], *args: Any
) -> tuple[float, float, T]:
    """``fn(*args)`` under :func:`_stopwatch`: (seconds, the collector's seconds,
    what it returned)."""
    with _stopwatch(gc_off) as elapsed:
        out = await fn(*args)
    return elapsed[0], elapsed[1], out


class _Recorder:
    """Times and counts of one case, each kept as soon as it is taken, so that a
    case that raises half-way still reports what it measured before."""

    __slots__ = ("counts", "gc_off", "phase", "times")

    def __init__(self, gc_off: bool) -> None:
        self.gc_off = gc_off
        self.phase = "setup"
        self.times: dict[str, list[float]] = {}
        self.counts: dict[str, Counts] = {}

    def add(self, label: str, seconds: float) -> None:
        self.times.setdefault(label, []).append(seconds)

    def median_us(self, label: str, n: int) -> float | None:
        return _median_us(self.times.get(label, []), n)

    async def solve(self, s: Solver, cache: CountingCacheManager, label: str, graph: Graph) -> None:
        """Build ``graph`` in a new job of ``s`` (whose cache is ``cache``), then
        discard the job. The build's time and counts are kept under ``label``,
        the discard's time under ``label + " discard"``."""
        reset_exec_counts(graph)
        cache.reset()
        job = s.new_job()
        self.phase = f"{label} build"
        build_s, gc_s, res = await _timed_gc(self.gc_off, job.build, Edge(graph.top))
        self.add(label, build_s)
        self.add(f"{label} gc", gc_s)
        self.counts[label] = _take_counts(graph, cache)
        await res.release()
        self.phase = f"discard after {label}"
        discard_s, _ = await _timed(self.gc_off, job.discard)
        self.add(f"{label} discard", discard_s)


def _take_counts(graph: Graph, cache: CountingCacheManager) -> Counts:
    execs, most = exec_counts(graph)
    return Counts(execs, most, cache.loads, cache.saves)


def _check(problems: list[str], what: str, got: int, want: int) -> None:
    if got != want:
        problems.append(f"{what}: {got}, expected {want}")


async def _measure_shape(
    cfg: Config, shape: str, n: int, *, leaf_change: bool = True
) -> ShapeResult:
    graph = SHAPES[shape](n)
    n = len(graph.vertices)
    out = ShapeResult(shape, n, cfg.repeats(n))
    changed = with_leaf_changed(graph) if leaf_change and shape in cfg.leaf_shapes else None
    dsk = dask_graph(graph) if cfg.dask and dask_get is not None else None
    rec = _Recorder(cfg.gc_off)
    try:
        with anyio.fail_after(_phase_limit(n) * 6 * out.repeats):
            for _ in range(out.repeats):
                rec.phase = "naive"
                rec.add("naive", (await _timed(cfg.gc_off, naive, graph.vertices))[0])
                if dsk is not None:
                    rec.phase = "dask"
                    with _stopwatch(cfg.gc_off) as elapsed:
                        run_dask(*dsk)
                    rec.add("dask", elapsed[0])

                cache = CountingCacheManager(InMemoryCacheManager(max_results=None))
                try:
                    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
                        await rec.solve(s, cache, "cold", graph)
                        await rec.solve(s, cache, "warm", graph)
                        if changed is not None:
                            await rec.solve(s, cache, "leaf-changed", changed.graph)
                        rec.phase = "solver exit"
                finally:
                    await cache.close()
    except Exception as exc:  # also fail_after's TimeoutError
        out.error = _describe(exc, rec.phase)

    out.naive_us = rec.median_us("naive", n)
    out.dask_us = rec.median_us("dask", n)
    out.cold_us = rec.median_us("cold", n)
    cold_s, cold_gc_s = rec.times.get("cold", []), rec.times.get("cold gc", [])
    if cold_s and sum(cold_s) > 0 and not cfg.gc_off:  # --gc-off: nothing to measure
        out.cold_gc_share = sum(cold_gc_s) / sum(cold_s)
    out.discard_us = rec.median_us("cold discard", n)
    out.warm_us = rec.median_us("warm", n)
    cold, warm = rec.counts.get("cold"), rec.counts.get("warm")
    if cold is not None:
        out.cold = cold
        _check(out.problems, "cold execs", cold.execs, n)
        _check(out.problems, "cold: most execs of one op", cold.max_execs, 1)
        _check(out.problems, "cold loads", cold.loads, 0)
    if warm is not None:
        out.warm = warm
        _check(out.problems, "warm execs", warm.execs, 0)
        _check(out.problems, "warm loads", warm.loads, 1)
    if changed is not None:
        out.leaf_dirty = changed.dirty
        out.leaf_expected_loads = changed.clean_inputs
        out.leaf_us = rec.median_us("leaf-changed", n)
        out.leaf = leaf = rec.counts.get("leaf-changed")
        if leaf is not None:
            _check(out.problems, "leaf-changed execs", leaf.execs, changed.dirty)
            _check(out.problems, "leaf-changed: most execs of one op", leaf.max_execs, 1)
    return out


async def _build_all(jobs: list[Job], graph: Graph, results: list[Any]) -> None:
    """Build ``graph`` in every job at once; ``results[i]`` is job ``i``'s handle."""

    async def build(i: int) -> None:
        results[i] = await jobs[i].build(Edge(graph.top))

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(build, i)


async def _measure_concurrency(
    cfg: Config, graph: Graph, k: int, out: ConcurrencyResult
) -> None:
    """One more sample of K concurrent builds into ``out`` (the suite takes the
    samples of every K in turn, round-robin, so that a slow spell of the machine
    does not fall on one K only)."""
    n = len(graph.vertices)
    samples = out.samples
    phase = "setup"
    try:
        with anyio.fail_after(_phase_limit(n) * 4):
            for _ in range(1):
                reset_exec_counts(graph)
                cache = CountingCacheManager(InMemoryCacheManager(max_results=None))
                try:
                    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
                        jobs = [s.new_job() for _ in range(k)]
                        results: list[Any] = [None] * k
                        phase = f"{k} concurrent builds"
                        build_s, _ = await _timed(cfg.gc_off, _build_all, jobs, graph, results)
                        samples.append(build_s)
                        out.counts = _take_counts(graph, cache)
                        out.same_result = len({id(r.sys) for r in results}) == 1
                        phase = "release and discard"
                        for r in results:
                            await r.release()
                        for job in jobs:
                            await job.discard()
                        phase = "solver exit"
                finally:
                    await cache.close()
    except Exception as exc:
        out.error = _describe(exc, phase)
    out.seconds = statistics.median(samples) if samples else None
    if samples:
        problems: list[str] = []
        _check(problems, f"K={k} execs", out.counts.execs, n)
        _check(problems, f"K={k}: most execs of one op", out.counts.max_execs, 1)
        _check(problems, f"K={k} loads", out.counts.loads, 0)
        if not out.same_result:
            problems.append(f"K={k}: the jobs got different results")
        out.problems.extend(p for p in problems if p not in out.problems)


def by_k_order(cfg: Config) -> tuple[int, ...]:
    """The K values of the concurrency benchmark, each once, in the given order."""
    return tuple(dict.fromkeys(cfg.concurrency))


async def _measure_memory(shape: str, n: int) -> MemoryResult:
    graph = SHAPES[shape](n)
    n = len(graph.vertices)
    out = MemoryResult(shape, n)
    phase = "naive"
    try:
        with anyio.fail_after(_phase_limit(n) * 10):
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                await naive(graph.vertices)
                out.naive_peak_per_vertex = (tracemalloc.get_traced_memory()[1] - base) / n
            finally:
                tracemalloc.stop()

            phase = "engine cold build"
            gc.collect()
            tracemalloc.start()
            cache = CountingCacheManager(InMemoryCacheManager(max_results=None))
            try:
                async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
                    job = s.new_job()
                    gc.collect()
                    base = tracemalloc.get_traced_memory()[0]
                    tracemalloc.reset_peak()
                    res = await job.build(Edge(graph.top))
                    current, peak = tracemalloc.get_traced_memory()
                    out.peak_per_vertex = (peak - base) / n
                    out.held_per_vertex = (current - base) / n
                    await res.release()
                    phase = "discard"
                    await job.discard()
                    phase = "solver exit"
            finally:
                tracemalloc.stop()
                await cache.close()
    except Exception as exc:
        out.error = _describe(exc, phase)
    return out


_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


async def run_backend(cfg: Config, backend: str) -> BackendResults:
    """Every benchmark of ``cfg`` on the running backend."""
    out = BackendResults()
    for n in cfg.sizes:
        for shape in cfg.shapes:
            r = await _measure_shape(cfg, shape, n)
            out.shapes.append(r)
            _progress(
                f"  {backend} {shape} {r.vertices}: cold {_fmt(r.cold_us)} µs/v"
                f"{'  ' + r.error if r.error else ''}"
            )
    for n in cfg.large_sizes:
        for shape in cfg.large_shapes:
            if shape not in cfg.shapes:
                continue
            r = await _measure_shape(cfg, shape, n, leaf_change=False)
            out.shapes.append(r)
            _progress(
                f"  {backend} {shape} {r.vertices}: cold {_fmt(r.cold_us)} µs/v"
                f"{'  ' + r.error if r.error else ''}"
            )
    if cfg.concurrency:
        graph = SHAPES[cfg.concurrency_shape](cfg.concurrency_size)
        n = len(graph.vertices)
        by_k = {
            k: ConcurrencyResult(cfg.concurrency_shape, n, k, cfg.repeats(n))
            for k in by_k_order(cfg)
        }
        for _ in range(cfg.repeats(n)):
            for k, c in by_k.items():
                if c.error is None:
                    await _measure_concurrency(cfg, graph, k, c)
        for c in by_k.values():
            out.concurrency.append(c)
            k = c.k
            _progress(
                f"  {backend} K={k}: {_fmt(c.seconds, 1000)} ms{'  ' + c.error if c.error else ''}"
            )
    for shape in cfg.memory_shapes:
        m = await _measure_memory(shape, cfg.memory_size)
        out.memory.append(m)
        _progress(
            f"  {backend} memory {shape}: {_fmt(m.peak_per_vertex)} B/v"
            f"{'  ' + m.error if m.error else ''}"
        )
    return out


# -- targets ---------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def evaluate(backend: str, res: BackendResults) -> list[Target]:
    """Every target of the issue that this run measured, PASS or FAIL."""
    targets: list[Target] = []

    def add(name: str, case: str, measured: str, passed: bool) -> None:
        targets.append(Target(backend, name, case, measured, passed))

    for r in res.shapes:
        case = f"{r.shape} {r.vertices}"
        cold = _ratio(r.cold_us, r.naive_us)
        if cold is not None:
            add(f"cold ≤ {COLD_VS_NAIVE}x naive", case, f"{cold:.2f}x", cold <= COLD_VS_NAIVE)
        cold_dask = _ratio(r.cold_us, r.dask_us)
        if cold_dask is not None:
            add(
                f"cold ≤ {COLD_VS_DASK}x dask",
                case,
                f"{cold_dask:.2f}x",
                cold_dask <= COLD_VS_DASK,
            )
        if r.cold_gc_share is not None:
            add(
                f"cyclic GC < {GC_SHARE:.0%} of a cold build",
                case,
                f"{r.cold_gc_share:.1%}",
                r.cold_gc_share < GC_SHARE,
            )
        warm = _ratio(r.warm_us, r.naive_us)
        if warm is not None:
            add(f"warm ≤ {WARM_VS_NAIVE}x naive", case, f"{warm:.2f}x", warm <= WARM_VS_NAIVE)
            add("warm: exactly 1 cache load", case, f"{r.warm.loads}", r.warm.loads == 1)
        vs_dask = _ratio(r.dask_us, r.warm_us)
        if vs_dask is not None:
            add(
                f"warm ≥ {WARM_VS_DASK}x faster than dask",
                case,
                f"{vs_dask:.2f}x",
                vs_dask >= WARM_VS_DASK,
            )

        if r.leaf_dirty is not None and r.leaf is not None and r.leaf_us is not None:
            add(
                "one leaf changed: only its path re-runs",
                case,
                f"{r.leaf.execs} execs of {r.leaf_dirty} dirty, most {r.leaf.max_execs}",
                r.leaf.execs == r.leaf_dirty and r.leaf.max_execs == 1,
            )

    by_k = {c.k: c for c in res.concurrency}
    one, many = by_k.get(1), by_k.get(CONCURRENT_K)
    if many is not None:
        case = f"{many.shape} {many.vertices}"
        ratio = _ratio(many.seconds, one.seconds if one else None)
        if ratio is not None:
            add(
                f"K={CONCURRENT_K} ≤ {CONCURRENT_VS_ONE}x one solve",
                case,
                f"{ratio:.2f}x",
                ratio <= CONCURRENT_VS_ONE,
            )
        if many.seconds is not None:
            add(
                f"K={CONCURRENT_K}: each op executed once",
                case,
                f"{many.counts.execs} execs, most {many.counts.max_execs}",
                many.counts.execs == many.vertices and many.counts.max_execs == 1,
            )

    for shape, small, big in _growth_pairs(res):
        step = big.vertices / small.vertices
        growth = _growth(small.cold_us, big.cold_us, step)
        if growth is not None:
            limit = GROWTH_SLACK * step
            add(
                f"linear growth (≤ {limit:.0f}x time for {step:.0f}x vertices)",
                f"{shape} {small.vertices}→{big.vertices}",
                f"{growth:.1f}x (naive {_fmt(_growth(small.naive_us, big.naive_us, step))}x)",
                growth <= limit,
            )

    chains = [r for r in res.shapes if r.shape == "chain"]
    if chains:
        deepest = max(chains, key=lambda r: r.vertices)
        if deepest.error is None:
            outcome = "ok"
        elif "RecursionError" in deepest.error:
            outcome = "RecursionError"
        else:
            outcome = "another error"
        add(
            "deep chain without RecursionError",
            f"chain {deepest.vertices}",
            outcome,
            deepest.error is None,
        )

    for m in res.memory:
        if m.peak_per_vertex is not None:
            add(
                f"≤ {MEMORY_PER_VERTEX // 1024} KiB per active vertex",
                f"{m.shape} {m.vertices}",
                f"{m.peak_per_vertex / 1024:.2f} KiB",
                m.peak_per_vertex <= MEMORY_PER_VERTEX,
            )
    return targets


def _growth(small_us: float | None, big_us: float | None, step: float) -> float | None:
    """How many times longer the bigger graph took (from µs per vertex)."""
    ratio = _ratio(big_us, small_us)
    return None if ratio is None else ratio * step


def _growth_pairs(res: BackendResults) -> Iterator[tuple[str, ShapeResult, ShapeResult]]:
    """For each shape, its two largest sizes with a cold time."""
    by_shape: dict[str, list[ShapeResult]] = {}
    for r in res.shapes:
        if r.cold_us is not None:
            by_shape.setdefault(r.shape, []).append(r)
    for shape, rs in by_shape.items():
        rs.sort(key=lambda r: r.vertices)
        if len(rs) >= 2:
            yield shape, rs[-2], rs[-1]


# -- reporting -------------------------------------------------------------------------
def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _ratio_cell(ratio: float | None, passed: bool | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x {_verdict(bool(passed))}"


def format_backend(backend: str, res: BackendResults) -> list[str]:
    lines = [f"== {backend}: µs per vertex (median); ratios with the targets; counts", ""]
    head = (
        f"{'shape':8} {'vertices':>8} {'naive':>7} {'dask':>7} {'cold':>8} {'warm':>8} "
        f"{'discard':>8}  {'cold/naive':>12}  {'cold/dask':>12}  {'warm/naive':>12}  "
        f"{'dask/warm':>12}  {'cold GC':>11}  {'cold execs':>10} {'warm loads':>10}"
    )
    lines += [head, "-" * len(head)]
    for r in res.shapes:
        cold = _ratio(r.cold_us, r.naive_us)
        warm = _ratio(r.warm_us, r.naive_us)
        vs_dask = _ratio(r.dask_us, r.warm_us)
        cold_dask = _ratio(r.cold_us, r.dask_us)
        share = r.cold_gc_share
        gc_cell = "-" if share is None else f"{share:.0%} {_verdict(share < GC_SHARE)}"
        execs = f"{r.cold.execs}" if r.cold_us is not None else "-"
        loads = f"{r.warm.loads}" if r.warm_us is not None else "-"
        lines.append(
            f"{r.shape:8} {r.vertices:8d} {_fmt(r.naive_us):>7} {_fmt(r.dask_us):>7} "
            f"{_fmt(r.cold_us):>8} {_fmt(r.warm_us):>8} {_fmt(r.discard_us):>8}  "
            f"{_ratio_cell(cold, cold is not None and cold <= COLD_VS_NAIVE):>12}  "
            f"{_ratio_cell(cold_dask, cold_dask is not None and cold_dask <= COLD_VS_DASK):>12}  "
            f"{_ratio_cell(warm, warm is not None and warm <= WARM_VS_NAIVE):>12}  "
            f"{_ratio_cell(vs_dask, vs_dask is not None and vs_dask >= WARM_VS_DASK):>12}  "
            f"{gc_cell:>11}  {execs:>10} {loads:>10}"
        )
    for r in res.shapes:
        for p in r.problems:
            lines.append(f"  COUNT {r.shape} {r.vertices}: {p}")
        if r.error:
            lines.append(f"  ERROR {r.shape} {r.vertices}: {r.error}")

    leafs = [r for r in res.shapes if r.leaf_dirty is not None]
    if leafs:
        lines += ["", "one leaf changed, warm re-solve (µs per vertex of the whole graph)"]
        head = (
            f"{'shape':8} {'vertices':>8} {'µs/v':>8} {'warm µs/v':>10} {'dirty':>7} "
            f"{'execs':>7} {'loads':>7} {'expected loads':>15}"
        )
        lines += [head, "-" * len(head)]
        for r in leafs:
            leaf = r.leaf
            lines.append(
                f"{r.shape:8} {r.vertices:8d} {_fmt(r.leaf_us):>8} {_fmt(r.warm_us):>10} "
                f"{r.leaf_dirty:7d} {leaf.execs if leaf else '-':>7} "
                f"{leaf.loads if leaf else '-':>7} {r.leaf_expected_loads:>15}"
            )

    if res.concurrency:
        c0 = res.concurrency[0]
        lines += [
            "",
            f"K concurrent identical solves of {c0.shape} {c0.vertices} (a fresh solver each)",
        ]
        head = (
            f"{'K':>4} {'ms':>9} {'µs/v':>8} {'vs K=1':>13} {'execs':>7} {'most':>5} "
            f"{'loads':>6} {'one result':>11}"
        )
        lines += [head, "-" * len(head)]
        base = next((c.seconds for c in res.concurrency if c.k == 1), None)
        for c in res.concurrency:
            ratio = _ratio(c.seconds, base)
            if c.k == CONCURRENT_K:
                cell = _ratio_cell(ratio, ratio is not None and ratio <= CONCURRENT_VS_ONE)
            else:
                cell = "-" if ratio is None else f"{ratio:.2f}x"
            lines.append(
                f"{c.k:4d} {_fmt(c.seconds, 1000):>9} "
                f"{_fmt(c.seconds * 1e6 / c.vertices if c.seconds else None):>8} {cell:>13} "
                f"{c.counts.execs:7d} {c.counts.max_execs:5d} {c.counts.loads:6d} "
                f"{'yes' if c.same_result else 'no' if c.same_result is not None else '-':>11}"
            )
            for p in c.problems:
                lines.append(f"  COUNT K={c.k}: {p}")
            if c.error:
                lines.append(f"  ERROR K={c.k}: {c.error}")

    pairs = list(_growth_pairs(res))
    if pairs:
        lines += ["", "growth of the time with the graph (the baselines for comparison)"]
        head = (
            f"{'shape':8} {'vertices':>14} {'cold':>12} {'limit':>6} {'warm':>6} "
            f"{'naive':>6} {'dask':>6}"
        )
        lines += [head, "-" * len(head)]
        for shape, small, big in pairs:
            step = big.vertices / small.vertices
            cold = _growth(small.cold_us, big.cold_us, step)
            if cold is None:
                continue
            limit = GROWTH_SLACK * step
            others = [
                _fmt(_growth(a, b, step))
                for a, b in (
                    (small.warm_us, big.warm_us),
                    (small.naive_us, big.naive_us),
                    (small.dask_us, big.dask_us),
                )
            ]
            lines.append(
                f"{shape:8} {f'{small.vertices}→{big.vertices}':>14} "
                f"{f'{cold:.1f}x {_verdict(cold <= limit)}':>12} {limit:5.0f}x "
                + " ".join(f"{o + 'x' if o != '-' else o:>6}" for o in others)
            )

    if res.memory:
        lines += ["", "memory (tracemalloc, a separate run): bytes per active vertex"]
        head = (
            f"{'shape':8} {'vertices':>8} {'peak':>9} {'held':>9} {'naive peak':>11}  "
            f"≤ {MEMORY_PER_VERTEX} B"
        )
        lines += [head, "-" * len(head)]
        for m in res.memory:
            verdict = (
                _verdict(m.peak_per_vertex <= MEMORY_PER_VERTEX)
                if m.peak_per_vertex is not None
                else "-"
            )
            lines.append(
                f"{m.shape:8} {m.vertices:8d} {_fmt(m.peak_per_vertex, digits=0):>9} "
                f"{_fmt(m.held_per_vertex, digits=0):>9} "
                f"{_fmt(m.naive_peak_per_vertex, digits=0):>11}  {verdict}"
            )
            if m.error:
                lines.append(f"  ERROR memory {m.shape} {m.vertices}: {m.error}")
    return lines


def format_targets(targets: list[Target]) -> list[str]:
    lines = ["== targets (a FAIL does not fail the run)", ""]
    names: dict[str, None] = dict.fromkeys(t.name for t in targets)
    backends: dict[str, None] = dict.fromkeys(t.backend for t in targets)
    for name in names:
        for backend in backends:
            ts = [t for t in targets if t.name == name and t.backend == backend]
            if not ts:
                continue
            passed = sum(t.passed for t in ts)
            cases = ", ".join(f"{t.case}: {t.measured}" for t in ts)
            verdict = "PASS" if passed == len(ts) else "FAIL"
            lines.append(f"{verdict} {name} [{backend}] {passed}/{len(ts)}  ({cases})")
    return lines


# -- machine ---------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--", "solver")
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": {p: _version(p) for p in ("anyio", "trio", "dask", "sortedcontainers")},
        "engine_commit": _git("rev-parse", "HEAD"),
        "engine_uncommitted": None if dirty is None else bool(dirty),
    }


# -- entry points ----------------------------------------------------------------------
def run_suite(cfg: Config, backends: Sequence[str]) -> dict[str, Any]:
    """Run every benchmark on each backend; the results as a JSON-ready dict.

    ``results["problems"]`` lists every wrong count and every case that raised.
    """
    started = time.perf_counter()
    info = machine_info()
    per_backend: dict[str, BackendResults] = {}
    targets: list[Target] = []
    # What the process held before the suite (a test session, say) goes to the
    # permanent generation: each gc.collect() and the collector's own passes
    # during a timed section walk only the benchmark's objects.
    gc.collect()
    gc.freeze()
    try:
        for backend in backends:
            _progress(f"{backend}:")
            res = anyio.run(run_backend, cfg, backend, backend=backend)
            per_backend[backend] = res
            targets += evaluate(backend, res)
    finally:
        gc.unfreeze()
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    problems: list[str] = []
    for backend, res in per_backend.items():
        for r in res.shapes:
            problems += [f"{backend} {r.shape} {r.vertices}: {p}" for p in r.problems]
            if r.error:
                problems.append(f"{backend} {r.shape} {r.vertices}: {r.error}")
        for c in res.concurrency:
            problems += [f"{backend} K={c.k}: {p}" for p in c.problems]
            if c.error:
                problems.append(f"{backend} K={c.k}: {c.error}")
        for m in res.memory:
            if m.error:
                problems.append(f"{backend} memory {m.shape} {m.vertices}: {m.error}")
    return {
        "suite": "benchmarks/suite.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": info,
        "config": asdict(cfg) | {"dask": cfg.dask and dask_get is not None},
        "dask_skipped": None if dask_get is not None or not cfg.dask else _NO_DASK,
        "backends": {b: asdict(r) for b, r in per_backend.items()},
        "targets": [asdict(t) for t in targets],
        "problems": problems,
    }


def format_report(cfg: Config, results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"solver benchmark suite: sizes {', '.join(map(str, cfg.sizes))}"
        f"{_large_sizes(cfg)}; median of "
        f"{cfg.repeat} runs (sizes above {cfg.once_above}: 1 run); {results['seconds']} s"
        f"{'; cyclic GC OFF in timed sections' if cfg.gc_off else ''}",
        f"{m['implementation']} {m['python']} on {m['platform']}, {m['cpu_count']} CPUs, "
        f"load average {m['load_average']} → {m['load_average_end']}",
        f"engine {m['engine_commit'] or '?'}"
        f"{' with uncommitted changes in solver/' if m['engine_uncommitted'] else ''}",
        results["dask_skipped"] or f"dask {m['packages']['dask']}: dask.get (synchronous)",
        "",
    ]
    for backend, raw in results["backends"].items():
        lines += [*format_backend(backend, _backend_from_dict(raw)), ""]
    lines += format_targets([Target(**t) for t in results["targets"]])
    if results["problems"]:
        lines += ["", "== problems (wrong counts, errors)"]
        lines += [f"  {p}" for p in results["problems"]]
    return "\n".join(lines)


def _large_sizes(cfg: Config) -> str:
    shapes = [s for s in cfg.large_shapes if s in cfg.shapes]
    if not cfg.large_sizes or not shapes:
        return ""
    return f", then {', '.join(map(str, cfg.large_sizes))} ({', '.join(shapes)})"


def _backend_from_dict(raw: dict[str, Any]) -> BackendResults:
    def counts(d: dict[str, Any] | None) -> Counts | None:
        return None if d is None else Counts(**d)

    shapes = []
    for d in raw["shapes"]:
        d = dict(d)
        d["cold"], d["warm"], d["leaf"] = counts(d["cold"]), counts(d["warm"]), counts(d["leaf"])
        shapes.append(ShapeResult(**d))
    conc = []
    for d in raw["concurrency"]:
        d = dict(d)
        d["counts"] = counts(d["counts"])
        conc.append(ConcurrencyResult(**d))
    return BackendResults(shapes, conc, [MemoryResult(**d) for d in raw["memory"]])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "")) for x in text.split(",") if x)


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    unknown = [x for x in names if x not in SHAPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    return names


def parse_args(argv: Sequence[str] | None) -> tuple[Config, list[str], Path]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    ap.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON results file")
    ap.add_argument("--sizes", type=_int_list, help="vertices per graph, e.g. 1000,10000")
    ap.add_argument(
        "--large-sizes",
        type=_int_list,
        help="then the large shapes at these sizes, once (default 100000; '' skips; "
        "skipped by --quick, and by --sizes unless given)",
    )
    ap.add_argument(
        "--large-shapes", type=_name_list, help="shapes at the large sizes (chain,lattice,random)"
    )
    ap.add_argument("--shapes", type=_name_list, help=f"a subset of {','.join(SHAPES)}")
    ap.add_argument("--repeat", type=int, help="runs per measurement (median)")
    ap.add_argument("--once-above", type=int, help="graphs larger than this run once")
    ap.add_argument("--concurrency", type=_int_list, help="K jobs at once, e.g. 1,64 ('' skips)")
    ap.add_argument("--concurrency-size", type=int, help="vertices of the K-jobs graph")
    ap.add_argument("--memory-shapes", type=_name_list, help="shapes for tracemalloc ('' skips)")
    ap.add_argument("--memory-size", type=int, help="vertices of the memory graphs")
    ap.add_argument("--no-dask", action="store_true", help="skip the dask column")
    ap.add_argument(
        "--gc-off",
        action="store_true",
        help="disable the cyclic GC inside timed sections (a diagnostic)",
    )
    args = ap.parse_args(argv)
    cfg = Config.quick() if args.quick else Config.full()
    overrides: dict[str, Any] = {
        "sizes": args.sizes,
        "large_sizes": args.large_sizes,
        "large_shapes": args.large_shapes,
        "shapes": args.shapes,
        "repeat": args.repeat,
        "once_above": args.once_above,
        "concurrency": args.concurrency,
        "concurrency_size": args.concurrency_size,
        "memory_shapes": args.memory_shapes,
        "memory_size": args.memory_size,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.sizes is not None and args.large_sizes is None:
        # the sizes asked for, and no others
        changes["large_sizes"] = ()
    if args.no_dask:
        changes["dask"] = False
    if args.gc_off:
        changes["gc_off"] = True
    if args.shapes is not None:
        changes["leaf_shapes"] = tuple(s for s in cfg.leaf_shapes if s in args.shapes)
        if args.memory_shapes is None:
            changes["memory_shapes"] = tuple(s for s in cfg.memory_shapes if s in args.shapes)
    cfg = replace(cfg, **changes)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    return cfg, backends, args.out


def main(argv: Sequence[str] | None = None) -> int:
    cfg, backends, out = parse_args(argv)
    if cfg.dask and dask_get is None:
        print(f"{_NO_DASK}: the dask column is skipped", flush=True)
    results = run_suite(cfg, backends)
    print(format_report(cfg, results), flush=True)
    _write_json(out, results)
    print(f"\nresults written to {out}", flush=True)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
