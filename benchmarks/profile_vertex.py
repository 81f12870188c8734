"""Where a vertex's time goes: a profile of a cold solve and a warm re-solve.

Builds a lattice of ``N`` no-op vertices (``benchmarks/graphs.py``; default
5,000) and, on each backend, measures two phases of the engine:

* ``cold``: a first solve in a new solver (every cache map and exec runs);
* ``warm``: a re-solve in a new job of the same solver (everything is cached).

For each phase it reports:

* wall time per vertex, unprofiled, the median of ``--repeat`` rounds (after
  ``--warmup`` rounds not kept), next to
  the naive executor (``benchmarks/baselines.py``) timed in the same rounds;
* the cyclic collector's time inside the build (``gc.callbacks``), as a share
  of the build, with the number of collections per generation, and the
  GC-tracked objects the build leaves alive per vertex;
* from cProfile (``--profile-repeat`` profiled builds, the least disturbed one
  kept; the engine's counts are the same in each): function calls per vertex
  (``total_calls / N``; a coroutine's resumption counts as a call), counts per
  vertex of the engine's steps (dispatches: ``ActiveEdge.unpark``; pipes,
  units, cache queries and saves, ...), the inclusive time of each step, the
  top functions by own time (calls and microseconds per vertex), the share of
  own time by module group (each ``solver/engine`` module, ``solver/cache/*``,
  ``solver/_refs.py``, anyio, the backend, ...), and every engine function's
  calls per vertex;
* with ``--trace [VERTEX]``: the calls made for one vertex (default: one of the
  middle layer) in a cold build and a warm re-solve of a 501-vertex lattice, as
  a tree (``sys.setprofile``): the sequence a vertex goes through.

The profiled builds run with the cyclic collector disabled (``gc.disable()``),
so that a collection's pause is not charged to whichever function allocated
when it started; the collector's share comes from the unprofiled rounds
(``--profile-gc`` keeps it enabled). cProfile roughly doubles the time of a
build, more for functions that make many small calls: read its microseconds as
shares, not as wall time. Time spent in C functions (builtins and methods of
built-in types) is shown on its own and also charged to the group of the
Python function that called it (cProfile records the time per caller). As in
``benchmarks/suite.py``, what the process holds before the run is moved to the
permanent generation (``gc.freeze()``).

Needs only the standard library (cProfile, pstats) besides the project; with
``--pyinstrument DIR`` and pyinstrument installed it also writes a sampled call
tree per backend and phase (``DIR/<backend>-<phase>.txt`` and ``.html``).

Run: ``python benchmarks/profile_vertex.py [--vertices 5000] [--backend both]
[--repeat 5] [--warmup 1] [--profile-repeat 3] [--trace [VERTEX]] [--top 25] [--json OUT]
[--pyinstrument DIR]``. About a minute for both backends at the defaults.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from solver import Edge, InMemoryCacheManager, Solver
from solver.engine._edge import ActiveEdge
from solver.engine._jobs import LoadedVertex, VertexState
from solver.engine._sharedop import SharedOp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.baselines import naive
from benchmarks.graphs import (
    Graph,
    NoopVertex,
    exec_counts,
    lattice,
    reset_exec_counts,
    resolve_op,
)
from benchmarks.suite import GcClock, _version, machine_info as suite_machine_info

_Profiler: Any
try:  # optional: only for --pyinstrument
    from pyinstrument import Profiler as _Profiler
except ImportError:
    _Profiler = None

REPO = Path(__file__).resolve().parent.parent

PHASES = ("cold", "warm")
#: The lattice and depth of ``--trace``: a vertex's path does not depend on N.
TRACE_VERTICES = 501
TRACE_DEPTH = 2
#: The group of this script's own frames in a profile (the coroutine that awaits
#: the build, charged for what the profiler saw between its resumptions).
HARNESS = "harness (profile_vertex.py)"

#: Counters read off the profile: label -> "module:Qualified.name" of a function
#: whose calls per vertex are the count.
COUNTERS: dict[str, str] = {
    "states loaded": "solver.engine._jobs:Engine._load_one",
    "edges made": "solver.engine._edge:ActiveEdge.__init__",
    "dispatches": "solver.engine._edge:ActiveEdge.unpark",
    "pipes made": "solver.engine._scheduler:Pipe.__init__",
    "shared calls run": "solver.engine._sharedop:SharedOp._run",
    "op cache_map": "benchmarks.graphs:NoopVertex.cache_map",
    "op exec": "benchmarks.graphs:NoopVertex.exec",
    "cache query": "solver.cache._manager:KeyedCacheManager.query",
    "cache query batch": "solver.cache._manager:KeyedCacheManager.query_many",
    "cache records": "solver.cache._manager:KeyedCacheManager.records",
    "cache save": "solver.cache._manager:InMemoryCacheManager.save",
    "cache save batch": "solver.cache._manager:InMemoryCacheManager.save_many",
    "cache load": "solver.cache._manager:InMemoryCacheManager.load",
    "index load_or_store": "solver.engine._index:EdgeIndex.load_or_store",
    "progress events": "solver.engine._jobs:VertexState.emit",
}

#: Steps of a build, read off the profile's inclusive time (cumtime): label ->
#: "module:Qualified.name". Nested steps are indented in the label; a step's time
#: includes its sub-steps and whatever else it called.
STEPS: dict[str, str] = {
    "Job.build (the whole build, in the caller's task)": "solver.engine._jobs:Job.build",
    "  load: Engine._load": "solver.engine._jobs:Engine._load",
    "  cached path: seed_cached_root": "solver.engine._cachedpath:seed_cached_root",
    "    first pass, every cache map: _cache_maps": "solver.engine._cachedpath:_cache_maps",
    "    second pass, keys layer by layer: _resolve_layer": (
        "solver.engine._cachedpath:_resolve_layer"
    ),
    "    cold path, the batched saves: _save_batch": "solver.engine._coldpath:_save_batch",
    "      cache save batch": "solver.cache._manager:InMemoryCacheManager.save_many",
    "  Scheduler.build (the root's pipe)": "solver.engine._scheduler:Scheduler.build",
    "work pool: WorkPool._serve (dispatches and units)": "solver.engine._workpool:WorkPool._serve",
    "  dispatch: Scheduler._dispatch": "solver.engine._scheduler:Scheduler._dispatch",
    "    ActiveEdge.unpark": "solver.engine._edge:ActiveEdge.unpark",
    "      process_updates": "solver.engine._edge:ActiveEdge.process_updates",
    "        process_dep_req (an input's answer)": "solver.engine._edge:ActiveEdge.process_dep_req",
    "          probe_cache (query per input key)": "solver.engine._edge:ActiveEdge.probe_cache",
    "        recalc_current_state": "solver.engine._edge:ActiveEdge.recalc_current_state",
    "        process_exec_req (exec answer)": "solver.engine._edge:ActiveEdge.process_exec_req",
    "          _commit (save, wrap, hold)": "solver.engine._edge:ActiveEdge._commit",
    "            cache save": "solver.cache._manager:InMemoryCacheManager.save",
    "      _take_cache_map (memoized, inline)": "solver.engine._edge:ActiveEdge._take_cache_map",
    "      respond_to_incoming": "solver.engine._edge:ActiveEdge.respond_to_incoming",
    "      create_input_requests": "solver.engine._edge:ActiveEdge.create_input_requests",
    "      exec_if_possible": "solver.engine._edge:ActiveEdge.exec_if_possible",
    "        index_now (live index, merges)": "solver.engine._scheduler:Scheduler.index_now",
    "  unit: SharedOp._run": "solver.engine._sharedop:SharedOp._run",
    "    cache map: SharedOp._cache_map_work": "solver.engine._sharedop:SharedOp._cache_map_work",
    "    exec: SharedOp._exec_work": "solver.engine._sharedop:SharedOp._exec_work",
    "progress events: VertexState.emit": "solver.engine._jobs:VertexState.emit",
}

FuncKey = tuple[str, int, str]


# -- timing ----------------------------------------------------------------------------
@contextmanager
def _clocked() -> Iterator[tuple[list[float], GcClock]]:
    """Time the block after a ``gc.collect()``: wall seconds in ``[0]`` and the
    collector's time inside it, with its collections per generation."""
    elapsed = [0.0]
    clock = GcClock()
    gc.collect()
    gc.callbacks.append(clock)
    t = time.perf_counter()
    try:
        yield elapsed, clock
    finally:
        elapsed[0] = time.perf_counter() - t
        gc.callbacks.remove(clock)


def _tracked() -> int:
    return len(gc.get_objects())


async def _round(graph: Graph) -> dict[str, dict[str, Any]]:
    """One unprofiled round: the naive executor, then a cold solve and a warm
    re-solve in a new solver; per phase the wall and GC seconds, collections,
    execs and the tracked objects the build left alive."""
    top, every = graph
    out: dict[str, dict[str, Any]] = {}
    with _clocked() as (elapsed, clock):
        await naive(every)
    out["naive"] = {
        "seconds": elapsed[0],
        "gc_seconds": clock.seconds,
        "collections": clock.collections,
    }
    cache = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
        for phase in PHASES:
            reset_exec_counts(graph)
            job = s.new_job()
            gc.collect()
            before = _tracked()
            with _clocked() as (elapsed, clock):
                res = await job.build(Edge(top))
            gc.collect()
            left = _tracked() - before
            out[phase] = {
                "seconds": elapsed[0],
                "gc_seconds": clock.seconds,
                "gc_seconds_by_generation": clock.seconds_by_generation,
                "collections": clock.collections,
                "execs": exec_counts(graph)[0],
                "objects_left": left,
            }
            await res.release()
            await job.discard()
    await cache.close()
    return out


async def _profiled(
    graph: Graph,
    keep_gc: bool,
    make: Callable[[], Any],
    start: Callable[[Any], None],
    stop: Callable[[Any], None],
) -> dict[str, Any]:
    """A cold solve and a warm re-solve in a new solver, each under a profiler
    made by ``make`` (started and stopped around ``job.build`` only)."""
    top = graph.top
    out: dict[str, Any] = {}
    cache = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
        for phase in PHASES:
            job = s.new_job()
            prof = make()
            gc.collect()
            if not keep_gc:
                gc.disable()
            start(prof)
            try:
                res = await job.build(Edge(top))
            finally:
                stop(prof)
                gc.enable()
            out[phase] = prof
            await res.release()
            await job.discard()
    await cache.close()
    return out


# -- analysis --------------------------------------------------------------------------
def _short(filename: str) -> str:
    """A readable path: relative to the repository, the site-packages or the
    standard library; ``~`` for C functions."""
    f = filename.replace("\\", "/")
    if f == "~":
        return "~"
    repo = str(REPO).replace("\\", "/") + "/"
    if f.startswith(repo):
        return f[len(repo) :]
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in f:
            return f.split(marker, 1)[1]
    stdlib = Path(os.__file__).parent.as_posix() + "/"
    if f.startswith(stdlib):
        return f[len(stdlib) :]
    return f


def group_of(filename: str, backend: str) -> str:
    """The module group a function's file belongs to."""
    f = _short(filename)
    if f == "~":
        return "C functions (builtins)"
    if f.startswith("solver/engine/"):
        return f  # one group per engine module
    if f.startswith("solver/cache/"):
        return "solver/cache/*"
    if f == "solver/_refs.py":
        return f
    if f.startswith("solver/"):
        return "solver (other)"
    if f == "benchmarks/profile_vertex.py":
        return HARNESS
    if f.startswith("benchmarks/"):
        return "benchmarks (the no-op ops)"
    if f.startswith("anyio/_backends/"):
        return "anyio/_backends (adapter)"
    if f.startswith("anyio/"):
        return "anyio"
    if backend == "asyncio" and f.startswith("asyncio/"):
        return "backend: asyncio"
    if backend == "trio" and f.split("/", 1)[0] in ("trio", "outcome", "sniffio"):
        return "backend: trio"
    if f == "<string>":
        return "generated code (dataclass __init__)"
    if "/" not in f:
        return "stdlib (other)"
    return "other"


def _label(key: FuncKey) -> str:
    filename, line, name = key
    f = _short(filename)
    if f == "~":
        return name
    return f"{f}:{line}({name})"


def analyse(stats: pstats.Stats, n: int, backend: str, top: int) -> dict[str, Any]:
    """Calls, time and groups per vertex from one phase's stats."""
    raw: dict[FuncKey, tuple[int, int, float, float, dict[FuncKey, tuple[Any, ...]]]]
    raw = stats.stats  # type: ignore[attr-defined]
    total_tt: float = stats.total_tt  # type: ignore[attr-defined]
    total_calls: int = stats.total_calls  # type: ignore[attr-defined]
    us = 1e6 / n

    functions: list[dict[str, Any]] = []
    for key, (_cc, nc, tt, ct, _callers) in raw.items():
        functions.append(
            {
                "function": _label(key),
                "group": group_of(key[0], backend),
                "calls_per_vertex": nc / n,
                "tottime_us_per_vertex": tt * us,
                "cumtime_us_per_vertex": ct * us,
                "tottime_share": tt / total_tt if total_tt else 0.0,
            }
        )
    by_tottime = sorted(functions, key=lambda f: -f["tottime_us_per_vertex"])

    # Own time per group; C functions' time also charged to their callers' group.
    own: dict[str, float] = {}
    with_c: dict[str, float] = {}
    for key, (_cc, _nc, tt, _ct, callers) in raw.items():
        g = group_of(key[0], backend)
        own[g] = own.get(g, 0.0) + tt
        if key[0] != "~":
            with_c[g] = with_c.get(g, 0.0) + tt
            continue
        charged = 0.0
        for caller, info in callers.items():
            cg = group_of(caller[0], backend)
            with_c[cg] = with_c.get(cg, 0.0) + info[2]
            charged += info[2]
        if tt - charged > 1e-12:
            rest = "C functions (no Python caller)"
            with_c[rest] = with_c.get(rest, 0.0) + tt - charged
    groups = [
        {
            "group": g,
            "tottime_us_per_vertex": own.get(g, 0.0) * us,
            "share": own.get(g, 0.0) / total_tt if total_tt else 0.0,
            "with_c_us_per_vertex": with_c.get(g, 0.0) * us,
            "with_c_share": with_c.get(g, 0.0) / total_tt if total_tt else 0.0,
            "calls_per_vertex": sum(v[1] for k, v in raw.items() if group_of(k[0], backend) == g)
            / n,
        }
        for g in sorted(set(own) | set(with_c), key=lambda g: -own.get(g, 0.0))
    ]

    counters = {
        label: (raw[key][1] / n if key in raw else 0.0) for label, key in _counter_keys().items()
    }

    steps = []
    for label, where in STEPS.items():
        key = _func_key(where)
        _cc, nc, _tt, ct, _callers = raw.get(key, (0, 0, 0.0, 0.0, {}))
        steps.append(
            {
                "step": label,
                "calls_per_vertex": nc / n,
                "cum_us_per_vertex": ct * us,
                "share": ct / total_tt if total_tt else 0.0,
            }
        )

    engine = sorted(
        (
            f
            for f in functions
            if f["function"].startswith(("solver/", "benchmarks/"))
            and f["calls_per_vertex"] >= 0.01
        ),
        key=lambda f: (-f["calls_per_vertex"], f["function"]),
    )
    return {
        "calls_per_vertex": total_calls / n,
        "python_calls_per_vertex": sum(v[1] for k, v in raw.items() if k[0] != "~") / n,
        "profiled_us_per_vertex": total_tt * us,
        "counters": counters,
        "top": [f for f in by_tottime if f["group"] != HARNESS][:top],
        "steps": steps,
        "functions": [f for f in by_tottime if f["calls_per_vertex"] >= 0.001],
        "groups": groups,
        "engine_functions": engine,
    }


def _func_key(where: str) -> FuncKey:
    """The profile key (file, first line, name) of ``"module:Qualified.name"``."""
    module, qualname = where.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    code = obj.__code__
    return (code.co_filename, code.co_firstlineno, code.co_name)


def _counter_keys() -> dict[str, FuncKey]:
    """The profile key of each of :data:`COUNTERS`, labelled."""
    return {
        f"{label} ({where.split(':')[1]})": _func_key(where) for label, where in COUNTERS.items()
    }


# -- one vertex's calls ----------------------------------------------------------------
def _vertex_of(obj: object) -> str | None:
    """The name of the vertex ``obj`` works for, if it is one of the engine's
    per-vertex objects (an edge, a shared op, a state, a vertex)."""
    try:
        if isinstance(obj, ActiveEdge):
            return str(obj.edge.vertex.name)
        if isinstance(obj, SharedOp):
            return str(obj.state.vtx.name)
        if isinstance(obj, VertexState):
            return str(obj.vtx.name)
        if isinstance(obj, NoopVertex | LoadedVertex):
            return str(obj.name)
    except AttributeError:  # an object still in its __init__
        return None
    return None


async def trace_vertex(graph: Graph, name: str, depth: int) -> dict[str, Any]:
    """A cold build and a warm re-solve of ``graph`` with ``sys.setprofile``:
    per phase, every Python call made
    on behalf of vertex ``name``, as a tree, cut ``depth`` levels below the
    nearest frame that works for it (a frame works for the vertex if its first or
    second argument is the vertex's edge, shared op, state or vertex), and the
    number of Python calls and frame resumptions under those frames at any depth
    (C functions are not counted)."""
    engine_dir = str(REPO / "solver")
    graphs_py = str(REPO / "benchmarks" / "graphs.py")
    own_code: dict[Any, bool] = {}
    stack: list[tuple[Any, int, int]] = []
    lines: list[tuple[int, str]] = []
    counts = {"calls": 0}

    def mine(frame: Any) -> bool:
        code = frame.f_code
        known = own_code.get(code)
        if known is None:
            known = code.co_filename.startswith(engine_dir) or code.co_filename == graphs_py
            own_code[code] = known
        if not known:
            return False
        loc = frame.f_locals
        for arg in code.co_varnames[: min(2, code.co_argcount)]:
            if _vertex_of(loc.get(arg)) == name:
                return True
        return False

    def hook(frame: Any, event: str, arg: object) -> None:
        # stack entries: (frame, level below the outermost frame of the vertex,
        # levels below the nearest frame of the vertex); -1 outside the vertex
        if event == "call":
            level, cut = stack[-1][1:] if stack else (-1, -1)
            if mine(frame):
                level, cut = level + 1, 0
            elif level >= 0:
                level, cut = level + 1, cut + 1
            stack.append((frame, level, cut))
            if level >= 0:
                counts["calls"] += 1
                if cut <= depth:
                    code = frame.f_code
                    where = _short(code.co_filename)
                    lines.append((level, f"{code.co_qualname}  ({where}:{code.co_firstlineno})"))
        elif event == "return" and stack and stack[-1][0] is frame:
            stack.pop()

    out: dict[str, Any] = {"vertex": name, "depth": depth}
    cache = InMemoryCacheManager()
    async with Solver(resolve_op=resolve_op, default_cache=cache) as s:
        for phase in PHASES:
            stack.clear()
            lines.clear()
            counts["calls"] = 0
            job = s.new_job()
            sys.setprofile(hook)
            try:
                res = await job.build(Edge(graph.top))
            finally:
                sys.setprofile(None)
            await res.release()
            await job.discard()
            out[phase] = {"python_calls": counts["calls"], "tree": _collapse(lines)}
    await cache.close()
    return out


def _collapse(lines: list[tuple[int, str]]) -> list[str]:
    """Indented lines, a run of equal ones as one with a count."""
    tree: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j + 1 < len(lines) and lines[j + 1] == lines[i]:
            j += 1
        level, label = lines[i]
        times = f"  x{j - i + 1}" if j > i else ""
        tree.append(f"{'  ' * level}{label}{times}")
        i = j + 1
    return tree


# -- the run ---------------------------------------------------------------------------
async def run_backend(
    n: int,
    warmup: int,
    repeat: int,
    profile_repeat: int,
    top: int,
    keep_gc: bool,
    pyinstrument_dir: Path | None,
    trace: str | None,
    backend: str,
) -> dict[str, Any]:
    graph = lattice(n)
    count = len(graph.vertices)
    for _ in range(warmup):  # not kept: the first round pays for the allocator's arenas
        await _round(graph)
    rounds = [await _round(graph) for _ in range(repeat)]

    def med(phase: str, field: str) -> float:
        return float(statistics.median(r[phase][field] for r in rounds))

    result: dict[str, Any] = {"vertices": count, "rounds": rounds}
    naive_us = med("naive", "seconds") * 1e6 / count
    result["naive"] = {
        "us_per_vertex": naive_us,
        "samples_us_per_vertex": [r["naive"]["seconds"] * 1e6 / count for r in rounds],
        "gc_share": med("naive", "gc_seconds") / med("naive", "seconds"),
    }

    # Calls are deterministic; times are not on a shared machine: of
    # ``profile_repeat`` profiled builds per phase, keep the one with the least
    # profiled time (the least disturbed).
    best: dict[str, pstats.Stats] = {}
    for _ in range(profile_repeat):
        profs = await _profiled(
            graph, keep_gc, cProfile.Profile, lambda p: p.enable(), lambda p: p.disable()
        )
        for phase in PHASES:
            st = pstats.Stats(profs[phase])
            if phase not in best or st.total_tt < best[phase].total_tt:  # type: ignore[attr-defined]
                best[phase] = st
    for phase in PHASES:
        wall = med(phase, "seconds")
        gc_s = [r[phase]["gc_seconds"] for r in rounds]
        shares = [r[phase]["gc_seconds"] / r[phase]["seconds"] for r in rounds]
        stats = best[phase]
        phase_res = {
            "us_per_vertex": wall * 1e6 / count,
            "samples_us_per_vertex": [r[phase]["seconds"] * 1e6 / count for r in rounds],
            "ratio_to_naive": wall * 1e6 / count / naive_us,
            "gc_us_per_vertex": statistics.median(gc_s) * 1e6 / count,
            "gc_share": statistics.median(shares),
            "gc_share_range": [min(shares), max(shares)],
            "collections": rounds[len(rounds) // 2][phase]["collections"],
            "gc_us_per_vertex_by_generation": [
                statistics.median(r[phase]["gc_seconds_by_generation"][g] for r in rounds)
                * 1e6
                / count
                for g in range(3)
            ],
            "us_per_vertex_without_gc": statistics.median(
                (r[phase]["seconds"] - r[phase]["gc_seconds"]) for r in rounds
            )
            * 1e6
            / count,
            "execs": [r[phase]["execs"] for r in rounds],
            "objects_left_per_vertex": med(phase, "objects_left") / count,
        } | analyse(stats, count, backend, top)
        result[phase] = phase_res

    if trace:
        tgraph = lattice(TRACE_VERTICES)
        layers = (TRACE_VERTICES - 1) // 100
        tname = trace if trace != "auto" else f"l{layers // 2}-50"
        result["trace"] = await trace_vertex(tgraph, tname, TRACE_DEPTH)
        result["trace"]["graph_vertices"] = len(tgraph.vertices)

    if pyinstrument_dir is not None and await _pyinstrument_run(
        graph, keep_gc, backend, pyinstrument_dir
    ):
        result["pyinstrument"] = str(pyinstrument_dir)
    return result


async def _pyinstrument_run(graph: Graph, keep_gc: bool, backend: str, out: Path) -> bool:
    """Sampled call trees of a cold and a warm build, if pyinstrument is there."""
    if _Profiler is None:
        print("pyinstrument is not installed; skipping --pyinstrument", file=sys.stderr)
        return False
    # async_mode "disabled": sample the whole thread (the build runs in the work
    # pool's tasks, not the caller's).
    profs = await _profiled(
        graph,
        keep_gc,
        lambda: _Profiler(async_mode="disabled"),
        lambda p: p.start(),
        lambda p: p.stop(),
    )
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (after the builds)
    for phase, prof in profs.items():
        (out / f"{backend}-{phase}.txt").write_text(
            prof.output_text(unicode=True, color=False, show_all=False)
        )
        (out / f"{backend}-{phase}.html").write_text(prof.output_html())
    return True


# -- report ----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """The suite's machine record, with pyinstrument's version when installed."""
    info = suite_machine_info()
    info["packages"]["pyinstrument"] = _version("pyinstrument")
    return info


def format_backend(backend: str, res: dict[str, Any], top: int, engine_rows: int) -> list[str]:
    n = res["vertices"]
    lines = [f"== {backend}: lattice of {n} no-op vertices =="]
    nv = res["naive"]
    lines.append(
        f"naive executor: {nv['us_per_vertex']:.1f} us/vertex "
        f"({', '.join(f'{x:.1f}' for x in nv['samples_us_per_vertex'])}; "
        f"GC {nv['gc_share']:.0%} of it)"
    )
    for phase in PHASES:
        r = res[phase]
        samples = ", ".join(f"{x:.1f}" for x in r["samples_us_per_vertex"])
        young, middle, full = r["collections"]
        lines += [
            "",
            f"-- {phase} --",
            f"wall: {r['us_per_vertex']:.1f} us/vertex ({samples}), "
            f"{r['ratio_to_naive']:.2f}x naive; without the GC's time "
            f"{r['us_per_vertex_without_gc']:.1f} us/vertex",
            f"cyclic GC: {r['gc_us_per_vertex']:.1f} us/vertex = {r['gc_share']:.0%} of the "
            f"build (rounds {r['gc_share_range'][0]:.0%}-{r['gc_share_range'][1]:.0%}); "
            f"collections young/middle/full {young}/{middle}/{full} taking "
            + "/".join(f"{x:.1f}" for x in r["gc_us_per_vertex_by_generation"])
            + " us/vertex",
            f"GC-tracked objects left alive by the build: {r['objects_left_per_vertex']:.1f} "
            f"per vertex; execs {r['execs']}",
            f"function calls: {r['calls_per_vertex']:.1f} per vertex "
            f"({r['python_calls_per_vertex']:.1f} Python, the rest C); profiled "
            f"{r['profiled_us_per_vertex']:.1f} us/vertex",
            "counts per vertex:",
        ]
        lines += [f"  {v:8.2f}  {k}" for k, v in r["counters"].items()]
        lines += [
            "",
            "steps (inclusive time per vertex, from the profile; nested steps are indented):",
            f"  {'calls':>7} {'cum us':>8} {'share':>6}  step",
        ]
        lines += [
            f"  {st['calls_per_vertex']:7.2f} {st['cum_us_per_vertex']:8.2f} "
            f"{st['share']:6.1%}  {st['step']}"
            for st in r["steps"]
        ]
        lines += [
            "",
            f"top {top} functions by own time (per vertex):",
            f"  {'calls':>7} {'own us':>7} {'cum us':>8} {'share':>6}  function",
        ]
        lines += [
            f"  {f['calls_per_vertex']:7.2f} {f['tottime_us_per_vertex']:7.2f} "
            f"{f['cumtime_us_per_vertex']:8.2f} {f['tottime_share']:6.1%}  {f['function']}"
            for f in r["top"][:top]
        ]
        lines += [
            "",
            "own time by module group (per vertex; 'with C' adds the C functions "
            "each group called):",
            f"  {'calls':>7} {'own us':>7} {'share':>6} {'with C':>7} {'share':>6}  group",
        ]
        lines += [
            f"  {g['calls_per_vertex']:7.1f} {g['tottime_us_per_vertex']:7.2f} "
            f"{g['share']:6.1%} {g['with_c_us_per_vertex']:7.2f} {g['with_c_share']:6.1%}  "
            f"{g['group']}"
            for g in r["groups"]
        ]
        lines += [
            "",
            f"engine functions by calls per vertex (first {engine_rows}):",
            f"  {'calls':>7} {'own us':>7} {'cum us':>8}  function",
        ]
        lines += [
            f"  {f['calls_per_vertex']:7.2f} {f['tottime_us_per_vertex']:7.2f} "
            f"{f['cumtime_us_per_vertex']:8.2f}  {f['function']}"
            for f in r["engine_functions"][:engine_rows]
        ]
    t: dict[str, Any] = res.get("trace") or {}
    for phase in PHASES if t else ():
        lines += [
            "",
            f"-- trace, {phase}: the calls made for vertex {t['vertex']} of a "
            f"{t['graph_vertices']}-vertex lattice ({t[phase]['python_calls']} Python calls "
            f"and resumptions in all; cut {t['depth']} level(s) below the vertex's own "
            "frames; loops over every vertex, such as the cached path's, are not the "
            "vertex's) --",
            *t[phase]["tree"],
        ]
    return lines


def format_report(data: dict[str, Any], top: int, engine_rows: int) -> str:
    m = data["machine"]
    load = m["load_average"]
    lines = [
        f"profile_vertex: commit {m['engine_commit']}"
        f"{' (solver/ modified)' if m['engine_uncommitted'] else ''}, Python {m['python']}, "
        f"{m['cpu_count']} CPUs, load average {load} at start, "
        f"{data['load_average_end']} at end; median of {data['config']['repeat']} rounds "
        f"after {data['config']['warmup']} warm-up; "
        f"profiled with the GC {'on' if data['config']['profile_gc'] else 'off'}",
    ]
    for backend, res in data["backends"].items():
        lines += ["", *format_backend(backend, res, top, engine_rows)]
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=int, default=5000)
    ap.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    ap.add_argument("--repeat", type=int, default=5, help="unprofiled timing rounds")
    ap.add_argument("--warmup", type=int, default=1, help="timing rounds run first and not kept")
    ap.add_argument("--top", type=int, default=25, help="functions listed by own time")
    ap.add_argument(
        "--engine-rows", type=int, default=60, help="engine functions listed by calls per vertex"
    )
    ap.add_argument(
        "--profile-gc",
        action="store_true",
        help="keep the cyclic collector on in the profiled builds",
    )
    ap.add_argument(
        "--pyinstrument",
        type=Path,
        metavar="DIR",
        help="also write pyinstrument call trees to DIR (if installed)",
    )
    ap.add_argument(
        "--profile-repeat",
        type=int,
        default=3,
        help="profiled builds per phase; the least disturbed (least profiled time) is kept",
    )
    ap.add_argument(
        "--trace",
        nargs="?",
        const="auto",
        metavar="VERTEX",
        help=f"also list the calls made for one vertex of a cold {TRACE_VERTICES}-vertex "
        "lattice (default: a vertex of the middle layer)",
    )
    ap.add_argument("--json", type=Path, metavar="OUT", help="write every number to OUT")
    args = ap.parse_args(argv)
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]

    data: dict[str, Any] = {
        "script": "benchmarks/profile_vertex.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "vertices": args.vertices,
            "shape": "lattice",
            "repeat": args.repeat,
            "warmup": args.warmup,
            "profile_repeat": args.profile_repeat,
            "profile_gc": args.profile_gc,
        },
        "backends": {},
    }
    gc.collect()
    gc.freeze()
    try:
        for backend in backends:
            data["backends"][backend] = anyio.run(
                run_backend,
                args.vertices,
                args.warmup,
                args.repeat,
                args.profile_repeat,
                max(args.top, 25),
                args.profile_gc,
                args.pyinstrument,
                args.trace,
                backend,
                backend=backend,
            )
    finally:
        gc.unfreeze()
    data["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(format_report(data, args.top, args.engine_rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
