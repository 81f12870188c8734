"""What a cold build leaves for the cyclic collector: objects, memory, collections.

Builds a graph of no-op vertices (``benchmarks/graphs.py``; default a lattice of
10,000) cold, in a new solver with an ``InMemoryCacheManager``, and reports per
vertex:

* the GC-tracked objects the build leaves alive (``len(gc.get_objects())``
  after the build, after a ``gc.collect()``, minus before it), with the 15
  types that grew most (``--types``);
* the peak of ``tracemalloc``-traced memory during the build, and what is
  still traced when it returns, per active vertex (a separate build: timings
  never run under tracemalloc);
* the time of the build and the collector's time in it, by generation
  (``gc.callbacks``), with the number of collections per generation.

As in ``benchmarks/suite.py``, what the process holds before the run is moved to
the permanent generation (``gc.freeze()``) so that collections walk only the
benchmark's objects.

Run: ``python benchmarks/cold_objects.py [--shape lattice] [--vertices 10000]
[--backend asyncio] [--repeat 3] [--types] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

from solver import Edge, InMemoryCacheManager, Solver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.graphs import SHAPES, Graph, exec_counts, reset_exec_counts, resolve_op
from benchmarks.suite import GcClock


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )


async def objects_left(graph: Graph, types: bool) -> dict[str, Any]:
    """Tracked objects a cold build leaves alive, per vertex (and by type)."""
    n = len(graph.vertices)
    reset_exec_counts(graph)
    cache = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
        job = s.new_job()
        gc.collect()
        before_types = _type_counts() if types else None
        before = len(gc.get_objects())
        res = await job.build(Edge(graph.top))
        gc.collect()
        left = len(gc.get_objects()) - before
        out: dict[str, Any] = {"objects_per_vertex": left / n}
        if before_types is not None:
            grew = _type_counts()
            grew.subtract(before_types)
            out["by_type"] = {k: round(v / n, 3) for k, v in grew.most_common(15)}
        assert exec_counts(graph)[0] == n, "each op runs once"
        await res.release()
        await job.discard()
    await cache.close()
    return out


async def memory(graph: Graph) -> dict[str, float]:
    """Peak and held traced KiB per active vertex during a cold build."""
    n = len(graph.vertices)
    reset_exec_counts(graph)
    gc.collect()
    tracemalloc.start()
    cache = InMemoryCacheManager(max_results=None)
    try:
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            job = s.new_job()
            gc.collect()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            res = await job.build(Edge(graph.top))
            current, peak = tracemalloc.get_traced_memory()
            await res.release()
            await job.discard()
    finally:
        tracemalloc.stop()
        await cache.close()
    return {"peak_kib": (peak - base) / n / 1024, "held_kib": (current - base) / n / 1024}


async def timed(graph: Graph) -> dict[str, Any]:
    """One cold build: wall seconds and the collector's seconds by generation."""
    n = len(graph.vertices)
    reset_exec_counts(graph)
    cache = InMemoryCacheManager()
    clock = GcClock()
    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
        job = s.new_job()
        gc.collect()
        gc.callbacks.append(clock)
        t = time.perf_counter()
        try:
            res = await job.build(Edge(graph.top))
        finally:
            took = time.perf_counter() - t
            gc.callbacks.remove(clock)
        await res.release()
        await job.discard()
    await cache.close()
    return {
        "us_per_vertex": took / n * 1e6,
        "gc_share": clock.seconds / took,
        "gc_ms_by_generation": [round(x * 1e3, 1) for x in clock.seconds_by_generation],
        "collections": clock.collections,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    graph = SHAPES[args.shape](args.vertices)
    out: dict[str, Any] = {"shape": args.shape, "vertices": len(graph.vertices)}
    out.update(await objects_left(graph, args.types))
    out.update(await memory(graph))
    rounds = [await timed(graph) for _ in range(args.repeat)]
    best = sorted(rounds, key=lambda r: r["us_per_vertex"])[len(rounds) // 2]
    out["us_per_vertex"] = statistics.median(r["us_per_vertex"] for r in rounds)
    out["gc_share"] = statistics.median(r["gc_share"] for r in rounds)
    out["median_round"] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="lattice", choices=sorted(SHAPES))
    p.add_argument("--vertices", type=int, default=10_000)
    p.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--types", action="store_true", help="the types that grew most")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    gc.collect()
    gc.freeze()
    try:
        out = anyio.run(run, args, backend=args.backend)
    finally:
        gc.unfreeze()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
