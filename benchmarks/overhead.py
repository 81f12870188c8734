"""Per-vertex overhead of the engine next to a naive anyio executor.

Builds a lattice of no-op ops (each vertex depends on two vertices of the layer
below) and times, in the same run and on the same graph:

* ``naive``: one task and one event per vertex, no cache, no dedupe: the least a
  correct async executor does;
* ``cold``: a first solve (every cache map and exec runs);
* ``warm``: a second solve in a new job (everything is cached: one load).

It prints microseconds per vertex and the ratio to the naive executor, for each
backend. Run: ``python benchmarks/overhead.py [--vertices 5000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence

import anyio

from solver import (
    Builder,
    CacheMap,
    CacheMapDep,
    Edge,
    InMemoryCacheManager,
    Result,
    Solver,
    VertexOptions,
    digest_of,
)

_OPTIONS = VertexOptions()


class NoopResult:
    __slots__ = ("_id",)

    def __init__(self, id: str) -> None:
        self._id = id

    @property
    def id(self) -> str:
        return self._id

    @property
    def sys(self) -> object:
        return self

    async def release(self) -> None:
        pass

    def clone(self) -> NoopResult:
        return self


class NoopVertex:
    """A vertex that is its own op and does nothing."""

    __slots__ = ("_cache_map", "_inputs", "digest", "loads", "name")

    def __init__(self, name: str, inputs: Sequence[Edge]) -> None:
        self.name = name
        self._inputs = tuple(inputs)
        parts = [name, *(e.vertex.digest for e in inputs)]
        self.digest = digest_of("|".join(parts).encode())
        self._cache_map = CacheMap(
            digest_of(f"seed:{name}".encode()), [CacheMapDep() for _ in inputs]
        )

    @property
    def inputs(self) -> Sequence[Edge]:
        return self._inputs

    @property
    def options(self) -> VertexOptions:
        return _OPTIONS

    @property
    def sys(self) -> NoopVertex:
        return self

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return self._cache_map, True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        return [NoopResult(self.name)]


def resolve_op(v: object, b: Builder) -> NoopVertex:
    op = v.sys  # type: ignore[attr-defined]
    assert isinstance(op, NoopVertex)
    return op


def lattice(n: int, width: int = 100) -> tuple[NoopVertex, list[NoopVertex]]:
    """About ``n`` vertices in layers of ``width``; returns the top and all vertices."""
    layers = max(1, (n - 1) // width)
    prev = [NoopVertex(f"l0-{i}", ()) for i in range(width)]
    every = list(prev)
    for layer in range(1, layers):
        cur = [
            NoopVertex(
                f"l{layer}-{i}", (Edge(prev[i]), Edge(prev[(i + 1) % width]))
            )
            for i in range(width)
        ]
        every.extend(cur)
        prev = cur
    top = NoopVertex("top", [Edge(v) for v in prev])
    every.append(top)
    return top, every


async def naive(every: list[NoopVertex]) -> None:
    """One task and one event per vertex; inputs first; no cache."""
    events = {id(v): anyio.Event() for v in every}
    results: dict[int, Result] = {}

    async def run(v: NoopVertex) -> None:
        for e in v.inputs:
            await events[id(e.vertex)].wait()
        await v.cache_map(0)
        out = await v.exec([results[id(e.vertex)] for e in v.inputs])
        results[id(v)] = out[0]
        events[id(v)].set()

    async with anyio.create_task_group() as tg:
        for v in every:
            tg.start_soon(run, v)


async def measure(n: int, repeat: int) -> dict[str, float]:
    top, every = lattice(n)
    count = len(every)
    times: dict[str, list[float]] = {"naive": [], "cold": [], "warm": []}
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        await naive(every)
        times["naive"].append(time.perf_counter() - t)

        cache = InMemoryCacheManager()
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            gc.collect()
            job = s.new_job()
            t = time.perf_counter()
            res = await job.build(Edge(top))
            times["cold"].append(time.perf_counter() - t)
            await res.release()
            await job.discard()

            gc.collect()
            job = s.new_job()
            t = time.perf_counter()
            res = await job.build(Edge(top))
            times["warm"].append(time.perf_counter() - t)
            await res.release()
            await job.discard()
        await cache.close()
    return {k: statistics.median(v) * 1e6 / count for k, v in times.items()} | {
        "vertices": float(count)
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    args = ap.parse_args(argv)
    sys.setrecursionlimit(10_000)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    print(f"lattice of ~{args.vertices} no-op vertices, median of {args.repeat} runs")
    print(f"{'backend':8} {'naive us/v':>11} {'cold us/v':>10} {'warm us/v':>10} "
          f"{'cold/naive':>11} {'warm/naive':>11}")
    for backend in backends:
        r = anyio.run(measure, args.vertices, args.repeat, backend=backend)
        print(
            f"{backend:8} {r['naive']:11.1f} {r['cold']:10.1f} {r['warm']:10.1f} "
            f"{r['cold'] / r['naive']:11.2f} {r['warm'] / r['naive']:11.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
