"""Where an embedded one-`.c`-changed build of a real C library goes (issue 21).

Sets up the library of ``benchmarks/cbuild.py`` (its sdist, its definition: one
content-keyed ``file`` copy and one ``exec`` per ``.c`` file, two merges, an
``ar`` step), builds it once cold with the embedded API, then ``--repeat``
times appends a comment to one unit (``--unit``, default the fourth by name:
``ARC4.c`` of pycryptodome, a 30 ms compile, so that the solver's own time is
most of the build) and builds again. For each build it prints the wall time,
the CPU time of this process (every thread; the compilers are children and are
not in it) and the timeline of the steps that ran (ms from the solve's start,
from the job's progress events); at the end, the median per build of what the
engine and the worker did, counted exactly by wrapping the real methods:
engine dispatches, cache-manager and SQLite calls, worker-thread hops by
function, op history writes.

Counts do not depend on the machine's load; the wall times do (compare two
trees in the same run, alternating). ``docs/performance.md``, "Issue 21: the
one-change build", has the figures and what they showed.

Run: ``python benchmarks/cbuild_changed.py [--library pycryptodome|brotli]
[--repeat 3] [--unit NAME] [--jobs N] [--cache-dir DIR]``. The cache directory
defaults to cbuild's; the work tree is ``DIR/changed/<library>``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cbuild  # the benchmark's own directory

COUNTS: collections.Counter[str] = collections.Counter()


def _counted(owner: Any, name: str, label: str) -> None:
    """Count the calls of the coroutine method ``owner.name`` under ``label``."""
    real = getattr(owner, name)

    @functools.wraps(real)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[label] += 1
        return await real(*args, **kwargs)

    setattr(owner, name, wrapper)


def install_counters() -> None:
    from solver.cache import _manager, _sqlite
    from solver.engine import _scheduler
    from solver.worker import _ophistory

    for name in ("query", "query_many", "records", "load", "save", "save_many"):
        _counted(_manager.KeyedCacheManager, name, f"cache {name}")
    for name in ("walk_links", "walk_links_many", "walk_results", "add_link", "add_many",
                 "has_link", "load"):
        _counted(_sqlite.SQLiteCacheStorage, name, f"sqlite {name}")
    _counted(_ophistory.SQLiteOpHistory, "record_content", "op history record_content")

    dispatch = _scheduler.Scheduler._dispatch

    def counted_dispatch(self: Any, *args: Any) -> Any:
        COUNTS["engine dispatches"] += 1
        return dispatch(self, *args)

    _scheduler.Scheduler._dispatch = counted_dispatch  # type: ignore[method-assign]

    run_sync = anyio.to_thread.run_sync

    async def hop(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        COUNTS["thread hop " + getattr(func, "__qualname__", repr(func))[:40]] += 1
        return await run_sync(func, *args, **kwargs)

    anyio.to_thread.run_sync = hop  # type: ignore[assignment]


def edit(path: Path, i: int) -> None:
    """Append a comment to ``path`` (a new one each time)."""
    with open(path, "a") as f:
        f.write(f"\n/* edit {i} at {time.time_ns()} */\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--library", choices=list(cbuild.LIBRARIES), default="pycryptodome")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--unit", default=None, help="the .c file edited (default: the 4th)")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "solver-engine-cbuild")
    args = ap.parse_args()
    lib = cbuild.LIBRARIES[args.library]
    pristine = cbuild.fetch_sources(lib, args.cache_dir)
    names = cbuild.units(lib, pristine)
    unit = args.unit or sorted(names)[3]
    tree = args.cache_dir / "changed" / lib.name
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(pristine, tree / "src", symlinks=True)
    defn_bytes = cbuild.definition_json(lib, tree / "src", names,
                                        cbuild.textual_includes(pristine))
    install_counters()
    per_build: list[collections.Counter[str]] = []

    async def run() -> None:
        from solver import Definition, Solver
        from solver.bridge import job_events
        from solver.worker import Worker

        async with Worker(tree / "cache", max_parallelism=args.jobs) as worker, \
                Solver(worker=worker) as solver:
            for i in range(args.repeat + 1):
                if i:
                    edit(tree / "src" / unit, i)
                COUNTS.clear()
                job = solver.new_job()
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0, w0 = time.perf_counter(), time.time()
                async with await solver.solve(Definition.from_json(defn_bytes), job=job):
                    pass
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                events = await job_events(job)
                await job.discard()
                what = "cold" if not i else f"{unit} changed"
                print(f"{lib.name}, {what}: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms "
                      "CPU in this process", flush=True)
                if not i:
                    continue
                per_build.append(collections.Counter(COUNTS))
                cached = [e.timestamp - w0 for e in events if e.status == "cached"]
                for e in events:
                    if e.status in ("started", "completed"):
                        print(f"  {(e.timestamp - w0) * 1000:7.1f} {e.status:9} {e.name}")
                if cached:
                    print(f"  {len(cached)} cached, from {min(cached) * 1000:.1f} to "
                          f"{max(cached) * 1000:.1f}")

    anyio.run(run)
    print(f"per one-change build (median of {len(per_build)}):")
    for label in sorted({k for c in per_build for k in c}):
        print(f"  {label:48} {statistics.median(c[label] for c in per_build):8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
