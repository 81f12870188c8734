"""Remote workers on a Dask cluster: scaling and the cost of one remote op (issue 15).

1. *Scaling*: ``--steps`` (200) independent CPU-bound exec steps of about
   ``--step-ms`` (50) ms each, merged into one tree, built on a ``LocalCluster``
   with 1 worker process and then with 2 (one thread each), each from a fresh
   store. Target: 2 workers take at most 0.6x the time of 1.
2. *Overhead*: ``--noop`` (100) independent no-op steps (``true``), built locally
   (the built-in worker, same sandbox) and on the 2-worker cluster; the difference
   per step is what running an op remotely costs (packing, Dask's round trip,
   unpacking), reported, not judged.

Each step's work is a shell loop calibrated at the start to take ``--step-ms`` on
this machine. Every build is checked: each step ran exactly once, on the cluster
(:func:`solver.remote.worker_stats`). Medians over ``--repeat`` runs. Run::

    python benchmarks/remote.py [--steps 200] [--step-ms 50] [--noop 100]
                                [--repeat 3] [--sandbox bwrap|none] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from solver import Solver
from solver.remote import DaskCluster, worker_stats
from solver.worker import State, Worker, merge, run

TARGET = 0.6
"""The most 2 workers may take against 1 on the scaling run."""


def calibrate(step_ms: float) -> int:
    """Loop iterations of ``/bin/sh`` that take about ``step_ms``."""
    n = 20_000
    while True:
        t = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", _loop(n)], check=True)
        took = (time.perf_counter() - t) * 1000
        if took > 20:
            return max(1, int(n * step_ms / took))
        n *= 4


def _loop(n: int) -> str:
    return f"i=0; while [ $i -lt {n} ]; do i=$((i+1)); done"


def steps(count: int, script: str, tag: str) -> State:
    outs = [
        run(["/bin/sh", "-c", f"{script}; echo {tag}-{i} > out-{i}.txt"], name=f"{tag} {i}")
        for i in range(count)
    ]
    return merge(outs, name=f"{tag} all")


async def build(state: State, cluster_address: str | None, sandbox: Any) -> float:
    with tempfile.TemporaryDirectory() as root:
        async with Worker(root, sandbox=sandbox) as worker:
            if cluster_address is None:
                async with Solver(worker=worker) as s:
                    t = time.perf_counter()
                    async with await s.solve(state.definition()):
                        return time.perf_counter() - t
            async with DaskCluster(cluster_address) as dask, Solver(
                worker=worker, cluster=dask
            ) as s:
                t = time.perf_counter()
                async with await s.solve(state.definition()):
                    return time.perf_counter() - t


def executed(client: Any) -> int:
    return sum(one["executed"] for one in client.run(worker_stats).values())


def on_cluster(workers: int, runs: list[tuple[State, int]], sandbox: Any) -> list[float]:
    """Build each state on a fresh cluster of ``workers`` processes; times."""
    import distributed

    times = []
    with distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=":0", silence_logs=40,
    ) as cluster, distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        client.wait_for_workers(workers, timeout=120)
        for state, count in runs:
            before = executed(client)
            times.append(anyio.run(build, state, cluster.scheduler_address, sandbox))
            ran = executed(client) - before
            if ran != count:
                raise SystemExit(f"expected {count} remote executions, saw {ran}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--noop", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sandbox", choices=("bwrap", "none"), default="bwrap")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    n = calibrate(args.step_ms)
    script = _loop(n)
    t = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script], check=True)
    one_step = time.perf_counter() - t
    print(f"one step: {one_step * 1000:.0f} ms of shell loop ({n} iterations)")

    # a new tag per run: every run executes every step (nothing cached anywhere)
    scaling = [(steps(args.steps, script, f"cpu{r}"), args.steps) for r in range(args.repeat)]
    one = on_cluster(1, scaling, args.sandbox)
    scaling = [(steps(args.steps, script, f"cpu2-{r}"), args.steps) for r in range(args.repeat)]
    two = on_cluster(2, scaling, args.sandbox)
    t1, t2 = statistics.median(one), statistics.median(two)
    ratio = t2 / t1
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"{args.steps} steps of ~{args.step_ms:.0f} ms: 1 worker {t1:.2f} s, "
          f"2 workers {t2:.2f} s: {ratio:.2f}x (target <= {TARGET}x) {verdict}")

    noops = [(steps(args.noop, "true", f"noop{r}"), args.noop) for r in range(args.repeat)]
    remote = on_cluster(2, noops, args.sandbox)
    local = [
        anyio.run(build, steps(args.noop, "true", f"local{r}"), None, args.sandbox)
        for r in range(args.repeat)
    ]
    tr, tl = statistics.median(remote), statistics.median(local)
    per_op = (tr - tl) / args.noop
    print(f"{args.noop} no-op steps: local {tl:.2f} s ({tl / args.noop * 1000:.1f} ms/op), "
          f"on 2 Dask workers {tr:.2f} s ({tr / args.noop * 1000:.1f} ms/op): "
          f"{per_op * 1000:+.1f} ms per remote op")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "steps": args.steps, "step_ms": one_step * 1000, "one_worker_s": one,
            "two_workers_s": two, "ratio": ratio, "target": TARGET,
            "noop_local_s": local, "noop_remote_s": remote, "per_remote_op_ms": per_op * 1000,
        }, indent=2))


if __name__ == "__main__":
    main()
