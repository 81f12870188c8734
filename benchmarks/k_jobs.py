"""What K identical concurrent solves cost per job, in counts (issue 13).

Builds one lattice of ``N`` no-op vertices (default 1,000) in ``K`` jobs of a
fresh solver at once, as ``benchmarks/suite.py``'s concurrency benchmark does,
for K = 1 and each ``--k``, on each backend, and reports for each K:

* function calls (cProfile, the cyclic collector off) for the whole K-job
  build, and the calls each job after the first adds:
  ``(calls(K) - calls(1)) / (K - 1)``, per vertex of the graph: what the
  suite's K = 64 ratio is made of, without the shared machine's noise;
* the per-vertex registrations the build leaves: the sum over active vertex
  states of the holders that keep it active (a job, or one hold that stands
  for every job that joined one root's build: ``_Hold`` in ``solver/engine/_jobs.py``);
* the progress records the build leaves: the sum over job buffers and shared
  event logs of the records kept (each job sees every event either way);
* the wall time of an unprofiled build, median of ``--repeat`` (noisy on a
  shared machine: read the counts).

Run: ``python benchmarks/k_jobs.py [--vertices 1000] [--k 8,64] [--backend both]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from benchmarks.graphs import Graph, exec_counts, lattice, reset_exec_counts, resolve_op
from solver import Edge, InMemoryCacheManager, Solver


def _kept(s: Solver) -> tuple[int, int]:
    """(registrations on active states, progress records kept) in ``s`` now."""
    regs = sum(len(st.jobs) for st in s._actives.values())
    logs: dict[int, Any] = {}
    for job in s._jobs.values():
        logs[id(job._progress)] = job._progress
        for log in getattr(job._progress, "shared", ()):
            logs[id(log)] = log
    return regs, sum(len(log._buffer) for log in logs.values())


async def _run(graph: Graph, k: int, profile: cProfile.Profile | None) -> dict[str, Any]:
    reset_exec_counts(graph)
    cache = InMemoryCacheManager(max_results=None)
    try:
        async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
            jobs = [s.new_job() for _ in range(k)]
            results: list[Any] = [None] * k

            async def build(i: int) -> None:
                results[i] = await jobs[i].build(Edge(graph.top))

            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                async with anyio.create_task_group() as tg:
                    for i in range(k):
                        tg.start_soon(build, i)
            finally:
                if profile is not None:
                    profile.disable()
                seconds = time.perf_counter() - t0
                gc.enable()
            regs, records = _kept(s)
            execs, most = exec_counts(graph)
            for r in results:
                await r.release()
            for job in jobs:
                await job.discard()
    finally:
        await cache.close()
    return {"seconds": seconds, "regs": regs, "records": records, "execs": execs, "most": most}


def _calls(graph: Graph, k: int, backend: str) -> int:
    prof = cProfile.Profile()
    anyio.run(_run, graph, k, prof, backend=backend)
    return int(pstats.Stats(prof).total_calls)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vertices", type=int, default=1000)
    ap.add_argument("--k", default="8,64", help="K values besides 1, e.g. 8,64")
    ap.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    graph = lattice(args.vertices)
    n = len(graph.vertices)
    ks = [1, *(int(x) for x in args.k.split(",") if x)]
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    for backend in backends:
        print(f"== {backend}, lattice {n}")
        print(
            f"{'K':>4} {'calls':>10} {'calls/v/job+':>13} {'regs/v':>7} {'records/v':>10}"
            f" {'ms':>8} {'vs K=1':>7} {'execs':>6} {'most':>5}"
        )
        base_calls = _calls(graph, 1, backend)
        base_s: float | None = None
        for k in ks:
            calls = base_calls if k == 1 else _calls(graph, k, backend)
            runs = [anyio.run(_run, graph, k, None, backend=backend) for _ in range(args.repeat)]
            secs = statistics.median(r["seconds"] for r in runs)
            if k == 1:
                base_s = secs
            assert base_s is not None
            per_job = (calls - base_calls) / (k - 1) / n if k > 1 else 0.0
            last = runs[-1]
            print(
                f"{k:>4} {calls:>10} {per_job:>13.2f} {last['regs'] / n:>7.2f}"
                f" {last['records'] / n:>10.2f} {secs * 1e3:>8.1f} {secs / base_s:>6.2f}x"
                f" {last['execs']:>6} {last['most']:>5}"
            )


if __name__ == "__main__":
    main()
