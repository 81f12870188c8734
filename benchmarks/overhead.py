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
from pathlib import Path

import anyio

from solver import Edge, InMemoryCacheManager, Solver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.baselines import naive
from benchmarks.graphs import lattice, resolve_op


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
