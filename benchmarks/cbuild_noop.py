"""Where an embedded no-op build of a real C library goes (issue 21).

Sets up the library of ``benchmarks/cbuild.py`` (its sdist, its definition: one
content-keyed ``file`` copy and one ``exec`` per ``.c`` file, a merge, an ``ar``
step), builds it once cold with the embedded API, then times ``--repeat``
no-op builds (nothing changed) against ``make -jN``'s no-op in the same run,
alternating, and profiles ``--profile`` more no-op builds with cProfile. For
the profile it prints the counts per build of the engine's steps (cache maps,
key queries, storage reads, loads, edges, dispatches) and the top functions by
inclusive and own time, per build (the event loop's thread only: the
threads it hands work to, such as the worker's file hashing, are not profiled).

It also times the phases of ``--phases`` no-op builds (reading the definition,
making vertices, the cache maps, the key pass, the load, the summary), each
with the clock around it, without the profiler.

Run: ``python benchmarks/cbuild_noop.py [--library brotli] [--repeat 15]
[--phases 15] [--profile 5] [--jobs N] [--cache-dir DIR] [--top 30]``. The cache directory
defaults to cbuild's; the work tree is ``DIR/noop/<library>``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cbuild  # the benchmark's own directory

# (label, function name as pstats prints it, file suffix)
STEPS = (
    ("solves", "solve", "bridge/_solver.py"),
    ("cached-path passes", "seed_cached_root", "engine/_cachedpath.py"),
    ("cache maps run", "_cache_map_work", "engine/_sharedop.py"),
    ("content keys computed", "_slow_work", "engine/_sharedop.py"),
    ("key queries", "query", "cache/_manager.py"),
    ("record reads", "records", "cache/_manager.py"),
    ("SQLite walk_links", "walk_links", "cache/_sqlite.py"),
    ("SQLite storage calls", "_call", "cache/_sqlite.py"),
    ("cache loads", "load", "cache/_manager.py"),
    ("edges and edge deps made", "__init__", "engine/_edge.py"),
    ("dispatches", "unpark", "engine/_edge.py"),
    ("execs", "_exec_work", "engine/_sharedop.py"),
)


# (label, module, attribute path, async): the phases of one no-op build, each
# timed with the clock around it (after the timed runs; one wrapper call each)
PHASES = (
    ("reading the definition (Definition.from_json)", "solver.definition._definition",
     "Definition.from_json", False),
    ("validating it, making vertices (to_vertices)", "solver.definition._definition",
     "Definition.to_vertices", False),
    ("loading the vertices (Engine._load)", "solver.engine._jobs", "Engine._load", False),
    ("the cache maps, all (awaited by the pass)", "solver.engine._cachedpath", "_cache_maps",
     True),
    ("  of which the local source's (stat check, op history)", "solver.worker._sources",
     "LocalOp.cache_map", True),
    ("the key pass and the seed", "solver.engine._cachedpath", "_resolve_and_seed", True),
    ("the root's load (Scheduler.build)", "solver.engine._scheduler", "Scheduler.build", True),
    ("the summary (Solver._summarize)", "solver.bridge._solver", "Solver._summarize", True),
    ("discarding the job", "solver.engine._jobs", "Job.discard", True),
    ("the whole build", "cbuild", "Embedded._build", True),
)


def _timed_phases(embedded: cbuild.Embedded, defn: bytes, runs: int) -> None:
    """Median wall time of each of :data:`PHASES` over ``runs`` no-op builds."""
    import importlib

    spent: dict[str, list[float]] = {label: [] for label, *_ in PHASES}
    undo: list[tuple[object, str, object]] = []
    for label, module, path, is_async in PHASES:
        owner: object = importlib.import_module(module) if module != "cbuild" else cbuild
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        real = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        func = real.__func__ if isinstance(real, classmethod) else real
        times = spent[label]

        def wrap(func: Any = func, times: list[float] = times, is_async: bool = is_async) -> Any:
            if is_async:
                async def timed_async(*args: Any, **kwargs: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return await func(*args, **kwargs)
                    finally:
                        times.append(time.perf_counter() - t0)
                return timed_async

            def timed_sync(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return func(*args, **kwargs)
                finally:
                    times.append(time.perf_counter() - t0)
            return timed_sync

        wrapped = wrap()
        setattr(owner, name, classmethod(wrapped) if isinstance(real, classmethod) else wrapped)
        undo.append((owner, name, real))
    try:
        for _ in range(runs):
            embedded.build(defn, False)
    finally:
        for owner, name, real in reversed(undo):
            setattr(owner, name, real)
    print(f"phases, median wall time of {runs} no-op builds (the clock around each):")
    for label, *_ in PHASES:
        times = spent[label]
        per_build = len(times) / runs
        value = statistics.median(times) * 1e3 if times else 0.0
        print(f"  {value:7.3f} ms  {label}" + (f" (x{per_build:.0f})" if per_build != 1 else ""))


def _count(stats: pstats.Stats, name: str, suffix: str) -> int:
    total = 0
    for (path, _, func), (_, ncalls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and path.endswith(suffix):
            total += ncalls
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--library", choices=list(cbuild.LIBRARIES), default="brotli")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--profile", type=int, default=5)
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--phases", type=int, default=15,
                    help="no-op builds whose phases are timed (0: none)")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "solver-engine-cbuild")
    args = ap.parse_args()
    lib = cbuild.LIBRARIES[args.library]
    pristine = cbuild.fetch_sources(lib, args.cache_dir)
    names = cbuild.units(lib, pristine)
    textual = cbuild.textual_includes(pristine)
    work = args.cache_dir / "noop" / lib.name
    shutil.rmtree(work, ignore_errors=True)
    make = cbuild.Contender("make", work / "make", work / "make" / "cache")
    emb = cbuild.Contender("embedded", work / "embedded", work / "embedded" / "cache")
    for c in (make, emb):
        shutil.copytree(pristine, c.tree / "src", symlinks=True)
        cbuild.write_makefile(lib, c.tree, names, textual)
        (c.tree / "defn.json").write_bytes(
            cbuild.definition_json(lib, c.tree / "src", names, textual))
    embedded = cbuild.Embedded(emb, args.jobs)
    embedded.reopen()
    defn = (emb.tree / "defn.json").read_bytes()
    try:
        cbuild.run_quiet(["make", f"-j{args.jobs}", "-s"], make.tree)
        embedded.build(defn, False)  # cold
        embedded.build(defn, False)  # the first no-op, not kept
        times: dict[str, list[float]] = {"make": [], "embedded": []}
        for _ in range(args.repeat):
            times["make"].append(cbuild.timed(
                lambda: cbuild.run_quiet(["make", f"-j{args.jobs}", "-s"], make.tree)))
            times["embedded"].append(cbuild.timed(lambda: embedded.build(defn, False)))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{lib.name} {lib.version}: {len(names)} units, no-op build, median of "
              f"{args.repeat}: make {med['make'] * 1e3:.2f} ms, embedded "
              f"{med['embedded'] * 1e3:.2f} ms = {med['embedded'] / med['make']:.2f}x make "
              f"(target <= 2x); load average {os.getloadavg()[0]:.2f}")
        if args.phases:
            _timed_phases(embedded, defn, args.phases)
        if not args.profile:
            return 0
        prof = cProfile.Profile()
        t0 = time.perf_counter()

        async def profiled() -> None:
            # in the event loop's thread, where the solve runs
            prof.enable()
            try:
                await embedded._build(defn, False)
            finally:
                prof.disable()

        for _ in range(args.profile):
            embedded.portal.call(profiled)
        wall = (time.perf_counter() - t0) / args.profile
        stats = pstats.Stats(prof)
        n = args.profile
        print(f"profiled: {wall * 1e3:.2f} ms per build; "
              f"{stats.total_calls / n:.0f} function calls per build")  # type: ignore[attr-defined]
        print("counts per build:")
        for label, name, suffix in STEPS:
            print(f"  {_count(stats, name, suffix) / n:8.1f}  {label} ({suffix}:{name})")
        for key, title in (("cumulative", "inclusive"), ("tottime", "own")):
            print(f"top {args.top} by {title} time (calls and ms per build):")
            stats.sort_stats(key)
            for func in stats.fcn_list[: args.top]:  # type: ignore[attr-defined]
                _cc, nc, tt, ct, _ = stats.stats[func]  # type: ignore[attr-defined]
                path, line, fname = func
                short = "/".join(path.split("/")[-3:])
                print(f"  {nc / n:8.1f} {tt / n * 1e3:8.3f} {ct / n * 1e3:8.3f}  "
                      f"{short}:{line}({fname})")
    finally:
        embedded.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
