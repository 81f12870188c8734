"""A long-lived solver's resident memory (issue 20, point 8).

An application keeps one :class:`~solver.Solver` open with default settings
(``Solver(resolve_op=...)``: the in-memory cache the solver makes for itself, no
worker) and solves small graphs: 3 no-op vertices in a chain, with new digests
every time, each in a new job; the result is released and the job discarded. The
resident set size (RSS) is read after half of the solves and after all of them;
the run passes when the second is within 10 % of the first (``end / half <=
1.10``): the engine must stay flat, not grow with the number of solves.

Each backend runs in a subprocess of its own, so that one's memory does not carry
into the other's RSS. Each child prints one JSON line: its RSS readings, the
ratio, what the cache holds at the end and how many ops ran (3 per solve: every
graph is new). Run::

    python benchmarks/memory_longlived.py [--solves 100000] [--backend both] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.graphs import NoopVertex, resolve_op
from solver import Edge, InMemoryCacheManager, Solver

LIMIT = 1.10
"""The most RSS may grow from half of the solves to all of them."""


def rss_bytes() -> int:
    """The current resident set size (Linux ``/proc/self/statm``); elsewhere the
    peak, from ``getrusage``, which can only overstate growth."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def measured_rss() -> int:
    # Collect first: what is measured is what the engine keeps, not garbage that
    # the next collection would free.
    gc.collect()
    return rss_bytes()


async def run(solves: int) -> dict[str, Any]:
    """Solve ``solves`` 3-vertex graphs in one solver with default settings."""
    half = solves // 2
    readings: dict[str, int] = {}
    execs = 0
    start = time.perf_counter()
    solver = Solver(resolve_op=resolve_op)
    async with solver:
        readings["start"] = measured_rss()
        for i in range(1, solves + 1):
            a = NoopVertex(f"{i}-a", ())
            b = NoopVertex(f"{i}-b", (Edge(a),))
            c = NoopVertex(f"{i}-c", (Edge(b),))
            job = solver.new_job()
            res = await job.build(Edge(c))
            await res.release()
            await job.discard()
            execs += a.execs + b.execs + c.execs
            if i == half:
                readings["half"] = measured_rss()
            if i % max(1, solves // 10) == 0:
                print(f"  {i:>9,} solves, {rss_bytes() / 2**20:7.1f} MiB", file=sys.stderr)
        readings["end"] = measured_rss()
        cache = solver.default_cache
        assert isinstance(cache, InMemoryCacheManager)
        kept = {
            "cache_max_results": cache.max_results,
            "cache_results": cache.result_count,
            "cache_keys": len(await cache.storage.walk()),
            "solver": repr(solver),
        }
    return {
        "solves": solves,
        "half": half,
        "rss_start": readings["start"],
        "rss_half": readings["half"],
        "rss_end": readings["end"],
        "ratio": readings["end"] / readings["half"],
        "execs": execs,
        "seconds": round(time.perf_counter() - start, 1),
        **kept,
    }


def child(backend: str, solves: int) -> int:
    result = anyio.run(run, solves, backend=backend)
    print(json.dumps({"backend": backend, **result}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--solves", type=int, default=100_000, help="solves per backend")
    ap.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", choices=["asyncio", "trio"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.solves < 2:
        ap.error("--solves must be at least 2")
    if args.child:
        return child(args.child, args.solves)

    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    print(
        f"one Solver, default settings: {args.solves:,} solves of 3 new no-op vertices, "
        f"a new job each; RSS at {args.solves // 2:,} and {args.solves:,} solves"
    )
    results = []
    for backend in backends:
        print(f"{backend}:", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", backend, "--solves", str(args.solves)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    mib = 2**20
    print(
        f"{'backend':8} {'start MiB':>10} {'half MiB':>9} {'end MiB':>8} {'end/half':>9}  "
        f"{'seconds':>7}  kept at the end"
    )
    passed = True
    for r in results:
        ok = r["ratio"] <= LIMIT
        passed = passed and ok
        print(
            f"{r['backend']:8} {r['rss_start'] / mib:10.1f} {r['rss_half'] / mib:9.1f} "
            f"{r['rss_end'] / mib:8.1f} {r['ratio']:9.3f}  {r['seconds']:7.1f}  "
            f"cache {r['cache_results']:,} results (bound {r['cache_max_results']}) "
            f"{r['cache_keys']:,} keys; {r['solver']}"
        )
        print(f"{'':8} {'PASS' if ok else 'FAIL'}: end/half {r['ratio']:.3f} <= {LIMIT:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"limit": LIMIT, "backends": results}, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
