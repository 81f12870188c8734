"""What a warm ``Solver.solve`` spends on its build summary when nobody reads it.

Solves the no-op lattice of ``benchmarks/history_cost.py`` (``--vertices`` ops,
no history, no tracing) once cold, then ``--repeat`` times warm (everything
cached, a new job each time), timing each warm solve in CPU time
(``time.process_time``: the machine is shared) and counting the folds of the
summary (calls of ``summarize`` by ``solver.bridge._summary``). Half of the warm
solves read ``SolveResult.summary`` and half do not, alternating, so both are
measured in the same run. Prints the medians and the folds per solve of each.
Run: ``python benchmarks/summary_fold.py [--vertices 10000] [--repeat 10]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from history_cost import kinds, lattice_definition  # the benchmark's own directory

from solver import Solver
from solver.bridge import _summary


async def run(vertices: int, repeat: int) -> None:
    defn = lattice_definition(vertices)
    folds = 0
    real = _summary.summarize  # type: ignore[attr-defined]

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal folds
        folds += 1
        return real(*args, **kwargs)

    _summary.summarize = counted  # type: ignore[attr-defined]
    times: dict[bool, list[float]] = {True: [], False: []}
    count: dict[bool, int] = {True: 0, False: 0}
    try:
        async with Solver(op_kinds=kinds()) as s:
            async with await s.solve(defn):
                pass
            for i in range(2 * repeat):
                read = i % 2 == 0
                gc.collect()
                before = folds
                t = time.process_time()
                async with await s.solve(defn) as res:
                    if read:
                        assert res.summary is not None
                        assert res.summary.cached == len(defn.ops)
                times[read].append(time.process_time() - t)
                count[read] += folds - before
    finally:
        _summary.summarize = real  # type: ignore[attr-defined]
    for read in (False, True):
        label = "summary read    " if read else "summary not read"
        print(f"{label}: warm solve {statistics.median(times[read]) * 1000:7.1f} ms CPU "
              f"(median of {repeat}), folds per solve {count[read] / repeat:.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--vertices", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    anyio.run(run, args.vertices, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
