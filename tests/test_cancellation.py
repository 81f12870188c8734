"""Cancelling the caller of ``job.build`` at every await on the build path.

SPEC §5: "Cancelling the task that awaits job.build cancels that caller only; shared
work goes on while any other job still waits for it, and is cancelled when none does;
then the last caller's build raises the cancellation only once that work has stopped.
A cancellation is never remembered as the op's outcome."

In the manner of httpcore's ``tests/test_cancellations.py``: each test suspends a
build at one await, cancels the caller there, and then checks that everything is
clean: the build raised the cancellation, the work it was suspended in was cancelled
and had stopped before ``build`` returned, no handle leaked (the ``handle_tracker``
fixture, at teardown), and the same solver then solves the same graph in a new job,
running the cancelled work again exactly once.

The awaits covered (``POINTS``):

* op work, run once per active vertex as shared work (``solver/_sharedop.py``):
  ``cache_map`` of the root and of a child, ``exec`` of the root and of a child, an
  op's ``acquire()``, a ``compute_digest`` (content key), a cache ``load``, and a
  nested ``builder.build`` suspended in the inner vertex's ``cache_map`` or ``exec``;
* cache calls the dispatcher awaits inline (``solver/_edge.py``): ``query`` for a
  root vertex and for an input's keys, ``records`` of a root key and of a key with
  deps, and ``save``.

Every op result is a :class:`~solver.testing.CountingResult`, so a leaked op output
(not only a leaked engine wrapper) fails the test. A hook suspends the work on an
:class:`anyio.Event` that tells the test it got there; nothing sleeps to "let things
settle" (``anyio.wait_all_tasks_blocked`` is the only way of waiting for quiet).

Besides one cancelled caller per point (three ways of cancelling: by the test, and
from inside the suspended work by ``cancel()`` or by an expired deadline), there are
a cancellation before the build's first checkpoint (``move_on_after(0)``), two jobs
sharing the suspended work (one cancelled, then both), and a loop that cancels a
graph having every kind of await after each of its k hook calls.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from solver import (
    Builder,
    CacheKey,
    CacheKeyWithSelector,
    CacheMap,
    CacheRecord,
    Edge,
    ExportableCacheKey,
    InMemoryCacheManager,
    Job,
    Result,
    SolveError,
    Solver,
)
from solver.testing import CountingResult, HandleTracker, track_handles
from tests.harness import (
    DummyResult,
    Hook,
    TestVertex,
    VtxOpt,
    build_and_discard,
    build_value,
    digest_from_result,
    new_id,
    unwrap,
)

# Fail-safe: a hang fails the test instead of the run.
TIMEOUT = 10


# -- instruments -------------------------------------------------------------------------


class Gate:
    """A hook that suspends its first ``block`` calls until the test opens it.

    ``entered`` is set when a call is suspended, then ``on_enter`` (if any) runs
    synchronously, before the call's first checkpoint (the tests use it to cancel
    the caller from inside the work). A suspended call that is cancelled counts in
    ``cancelled``; every suspended call that ends, however, counts in ``stopped``
    (from its ``finally``), so a test can tell whether the work had stopped when
    ``build`` returned. Later calls pass with one checkpoint.
    """

    def __init__(self, block: int = 1) -> None:
        self.block = block
        self.calls = 0
        self.cancelled = 0
        self.stopped = 0
        self.entered = anyio.Event()
        self.opened = anyio.Event()
        self.on_enter: Callable[[], None] | None = None

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls > self.block:
            await anyio.lowlevel.checkpoint()
            return
        try:
            self.entered.set()
            if self.on_enter is not None:
                self.on_enter()
            await self.opened.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.stopped += 1


class TrackedVertex(TestVertex):
    """A harness vertex that counts its completed ``cache_map`` and ``exec`` calls
    (``maps``, ``execs``), how many of them are running (``active``), and whose
    exec returns a fresh :class:`CountingResult` (tracked by the handle tracker)."""

    def __init__(self, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.maps = 0
        self.execs = 0
        self.active = 0

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        self.active += 1
        try:
            out = await super().cache_map(index)
        finally:
            self.active -= 1
        self.maps += 1
        return out

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.active += 1
        try:
            out = await self.run(inputs)
        finally:
            self.active -= 1
        self.execs += 1
        return out

    async def run(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        return [CountingResult(new_id(), DummyResult(self.opt.value))]


class AcquireVertex(TrackedVertex):
    """A vertex whose op has an ``acquire()`` context manager that awaits ``gate``;
    ``acquired`` and ``exits`` count completed entries and exits."""

    def __init__(self, gate: Hook, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.gate = gate
        self.acquired = 0
        self.exits = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        self.active += 1
        try:
            await self.gate()
        finally:
            self.active -= 1
        self.acquired += 1
        try:
            yield
        finally:
            self.exits += 1


class NestedVertex(TrackedVertex):
    """A vertex whose exec builds ``inner`` with its builder (a nested build) and
    returns that result."""

    def __init__(self, inner: Edge, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.inner = inner

    async def run(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        assert self.builder is not None
        return [await self.builder.build(self.inner)]


def resolve_tracked(v: Any, b: Builder) -> TrackedVertex:
    op = v.sys
    assert isinstance(op, TrackedVertex)
    op.builder = b  # a new active vertex gets a new builder
    return op


def tv(name: str, **kw: Any) -> TrackedVertex:
    """A tracked vertex whose value is its name."""
    return TrackedVertex(VtxOpt(name=name, value=name, **kw))


CacheHook = Callable[[str, tuple[Any, ...]], Awaitable[None]]


class HookedCacheManager:
    """An in-memory cache manager that counts the calls of each method that returned
    (``done``) and that are running (``running``), and awaits ``hook(method, args)``
    before each query, records, load and save."""

    def __init__(self) -> None:
        self.inner = InMemoryCacheManager()
        self.hook: CacheHook | None = None
        self.done: Counter[str] = Counter()
        self.running: Counter[str] = Counter()

    @property
    def id(self) -> str:
        return self.inner.id

    @contextlib.asynccontextmanager
    async def _call(self, method: str, *args: Any) -> AsyncIterator[None]:
        self.running[method] += 1
        try:
            if self.hook is not None:
                await self.hook(method, args)
            yield
        finally:
            self.running[method] -= 1
        self.done[method] += 1

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        async with self._call("query", deps, input, digest, output):
            return await self.inner.query(deps, input, digest, output)

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        async with self._call("records", key):
            return await self.inner.records(key)

    async def load(self, record: CacheRecord) -> Result:
        async with self._call("load", record):
            return await self.inner.load(record)

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        async with self._call("save", key, result, created_at):
            return await self.inner.save(key, result, created_at)

    async def release(self, result_id: str) -> None:
        await self.inner.release(result_id)

    async def close(self) -> None:
        await self.inner.close()


def gate_cache_call(
    gate: Gate, method: str, when: Callable[[tuple[Any, ...]], bool] = lambda args: True
) -> CacheHook:
    """A cache hook that sends the calls of ``method`` matching ``when`` to ``gate``."""

    async def hook(name: str, args: tuple[Any, ...]) -> None:
        if name == method and when(args):
            await gate()
        else:
            await anyio.lowlevel.checkpoint()

    return hook


class Caller:
    """The task that awaits ``job.build(edge)`` inside ``scope``.

    Records what the build did (``value``, ``error``, ``cancelled``) and how many of
    ``gate``'s suspended calls had stopped at the moment it returned."""

    def __init__(self, job: Job, edge: Edge, gate: Gate) -> None:
        self.job = job
        self.edge = edge
        self.gate = gate
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.value: str | None = None
        self.error: SolveError | None = None
        self.stopped_at_return: int | None = None

    @property
    def cancelled(self) -> bool:
        return self.scope.cancelled_caught

    async def run(self) -> None:
        try:
            with self.scope:
                res = await self.job.build(self.edge)
                try:
                    self.value = unwrap(res)
                finally:
                    await res.release()
        except SolveError as exc:
            self.error = exc
        finally:
            self.stopped_at_return = self.gate.stopped
            self.done.set()

    def check_cancelled(self) -> None:
        assert self.error is None, f"build failed instead of being cancelled: {self.error!r}"
        assert self.value is None, "build returned a result although it was cancelled"
        assert self.cancelled, "build did not raise the cancellation"


# -- the points ---------------------------------------------------------------------------


@dataclass
class Scenario:
    """A graph whose build suspends at one await (in ``gate``), with the exact counts
    expected after the cancellation and after the rebuild in a new job (with the
    cancelled job kept alive or discarded first)."""

    edge: Edge
    value: str
    gate: Gate
    cache: HookedCacheManager
    vertices: Mapping[str, TrackedVertex]
    after_cancel: Mapping[str, int]
    rebuilt_kept: Mapping[str, int]
    rebuilt_discarded: Mapping[str, int]
    # the await is in the dispatcher (a cache call), not in op work
    on_dispatcher: bool = False
    # a build (then a discard) that must happen before the one that is cancelled
    prepare: Callable[[Solver], Awaitable[None]] | None = None
    # counts that depend on task scheduling when the caller is cancelled from the
    # hook itself (other work may or may not have finished by then)
    racy: frozenset[str] = field(default_factory=frozenset)

    def metrics(self) -> dict[str, int]:
        m = {"gate_calls": self.gate.calls, "gate_cancelled": self.gate.cancelled}
        for name, v in self.vertices.items():
            m[f"{name}_maps"] = v.maps
            m[f"{name}_execs"] = v.execs
            if isinstance(v, AcquireVertex):
                m[f"{name}_acquired"] = v.acquired
                m[f"{name}_exits"] = v.exits
        m["loads"] = self.cache.done["load"]
        return m


def check_metrics(
    sc: Scenario, expected: Mapping[str, int], skip: frozenset[str] = frozenset()
) -> None:
    got = sc.metrics()
    want = {k: v for k, v in expected.items() if k not in skip}
    assert {k: got[k] for k in want} == want


def _root_cache_map() -> Scenario:
    gate = Gate()
    root = tv("root", cache_pre_func=gate)
    return Scenario(
        Edge(root),
        "root",
        gate,
        HookedCacheManager(),
        {"root": root},
        after_cancel=dict(gate_calls=1, gate_cancelled=1, root_maps=0, root_execs=0),
        rebuilt_kept=dict(gate_calls=2, gate_cancelled=1, root_maps=1, root_execs=1),
        rebuilt_discarded=dict(gate_calls=2, root_maps=1, root_execs=1),
    )


def _child_cache_map() -> Scenario:
    gate = Gate()
    child = tv("child", cache_pre_func=gate)
    root = tv("root", inputs=[Edge(child)])
    return Scenario(
        Edge(root),
        "root",
        gate,
        HookedCacheManager(),
        {"root": root, "child": child},
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=1,
            child_maps=0,
            child_execs=0,
            root_maps=1,
            root_execs=0,
        ),
        rebuilt_kept=dict(
            gate_calls=2,
            gate_cancelled=1,
            child_maps=1,
            child_execs=1,
            root_maps=1,
            root_execs=1,
        ),
        rebuilt_discarded=dict(
            gate_calls=2,
            child_maps=1,
            child_execs=1,
            root_maps=2,
            root_execs=1,
        ),
        racy=frozenset({"root_maps"}),
    )


def _root_exec() -> Scenario:
    gate = Gate()
    root = tv("root", exec_pre_func=gate)
    return Scenario(
        Edge(root),
        "root",
        gate,
        HookedCacheManager(),
        {"root": root},
        after_cancel=dict(gate_calls=1, gate_cancelled=1, root_maps=1, root_execs=0),
        rebuilt_kept=dict(gate_calls=2, gate_cancelled=1, root_maps=1, root_execs=1),
        rebuilt_discarded=dict(gate_calls=2, root_maps=2, root_execs=1),
    )


def _child_exec() -> Scenario:
    gate = Gate()
    child = tv("child", exec_pre_func=gate)
    root = tv("root", inputs=[Edge(child)])
    return Scenario(
        Edge(root),
        "root",
        gate,
        HookedCacheManager(),
        {"root": root, "child": child},
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=1,
            child_maps=1,
            child_execs=0,
            root_maps=1,
            root_execs=0,
        ),
        rebuilt_kept=dict(
            gate_calls=2,
            gate_cancelled=1,
            child_maps=1,
            child_execs=1,
            root_maps=1,
            root_execs=1,
        ),
        rebuilt_discarded=dict(
            gate_calls=2,
            child_maps=2,
            child_execs=1,
            root_maps=2,
            root_execs=1,
        ),
    )


def _acquire() -> Scenario:
    gate = Gate()
    root = AcquireVertex(gate, VtxOpt(name="root", value="root"))
    return Scenario(
        Edge(root),
        "root",
        gate,
        HookedCacheManager(),
        {"root": root},
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=1,
            root_maps=1,
            root_acquired=0,
            root_exits=0,
            root_execs=0,
        ),
        rebuilt_kept=dict(
            gate_calls=2,
            gate_cancelled=1,
            root_maps=1,
            root_acquired=1,
            root_exits=1,
            root_execs=1,
        ),
        rebuilt_discarded=dict(
            gate_calls=2,
            root_maps=2,
            root_acquired=1,
            root_exits=1,
            root_execs=1,
        ),
    )


def _compute_digest() -> Scenario:
    gate = Gate()

    async def content_key(res: Result) -> str:
        await gate()
        return await digest_from_result(res)

    child = tv("child")
    root = tv("root", inputs=[Edge(child)], slow_cache_compute={0: content_key})
    return Scenario(
        Edge(root),
        "root",
        gate,
        HookedCacheManager(),
        {"root": root, "child": child},
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=1,
            child_maps=1,
            child_execs=1,
            root_maps=1,
            root_execs=0,
            loads=0,
        ),
        rebuilt_kept=dict(
            gate_calls=2,
            gate_cancelled=1,
            child_maps=1,
            child_execs=1,
            root_maps=1,
            root_execs=1,
            loads=0,
        ),
        # the child's state went with the job: its result comes from the cache
        rebuilt_discarded=dict(
            gate_calls=2,
            child_maps=2,
            child_execs=1,
            root_maps=2,
            root_execs=1,
            loads=1,
        ),
    )


def _cache_load() -> Scenario:
    gate = Gate()
    root = tv("root")
    cache = HookedCacheManager()
    cache.hook = gate_cache_call(gate, "load")
    edge = Edge(root)
    return Scenario(
        edge,
        "root",
        gate,
        cache,
        {"root": root},
        prepare=lambda s: build_and_discard(s, edge),
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=1,
            root_maps=2,
            root_execs=1,
            loads=0,
        ),
        rebuilt_kept=dict(
            gate_calls=2,
            gate_cancelled=1,
            root_maps=2,
            root_execs=1,
            loads=1,
        ),
        rebuilt_discarded=dict(gate_calls=2, root_maps=3, root_execs=1, loads=1),
    )


def _nested(where: str) -> Callable[[], Scenario]:
    def make() -> Scenario:
        gate = Gate()
        hook = {"cache_pre_func": gate} if where == "cache_map" else {"exec_pre_func": gate}
        inner = tv("inner", **hook)
        outer = NestedVertex(Edge(inner), VtxOpt(name="outer", value="outer"))
        blocked_maps = 0 if where == "cache_map" else 1
        return Scenario(
            Edge(outer),
            "inner",
            gate,
            HookedCacheManager(),
            {"outer": outer, "inner": inner},
            after_cancel=dict(
                gate_calls=1,
                gate_cancelled=1,
                inner_maps=blocked_maps,
                inner_execs=0,
                outer_maps=1,
                outer_execs=0,
            ),
            rebuilt_kept=dict(
                gate_calls=2,
                gate_cancelled=1,
                inner_maps=1,
                inner_execs=1,
                outer_maps=1,
                outer_execs=1,
            ),
            # the inner vertex belonged to the outer one, which went with the job
            rebuilt_discarded=dict(
                gate_calls=2,
                inner_maps=blocked_maps + 1,
                inner_execs=1,
                outer_maps=2,
                outer_execs=1,
            ),
        )

    return make


def _dispatcher_query_root() -> Scenario:
    gate = Gate()
    root = tv("root")
    cache = HookedCacheManager()
    cache.hook = gate_cache_call(gate, "query", lambda args: not args[0])
    return Scenario(
        Edge(root),
        "root",
        gate,
        cache,
        {"root": root},
        on_dispatcher=True,
        after_cancel=dict(gate_calls=1, gate_cancelled=0, root_maps=1, root_execs=0),
        rebuilt_kept=dict(gate_cancelled=0, root_maps=1, root_execs=1, loads=0),
        rebuilt_discarded=dict(gate_cancelled=0, root_maps=2, root_execs=1, loads=0),
    )


async def _keep_the_cold_path_off(s: Solver) -> None:
    """A live job whose edge is in the live index: builds go to the edges (the
    cold path, which asks no input's keys of a graph that misses, stays off)."""
    await build_value(s.new_job("blocker"), Edge(tv("blocker")))
    assert len(s._index)


def _dispatcher_query_dep() -> Scenario:
    gate = Gate()
    child = tv("child")
    root = tv("root", inputs=[Edge(child)])
    cache = HookedCacheManager()
    cache.hook = gate_cache_call(gate, "query", lambda args: bool(args[0]))
    return Scenario(
        Edge(root),
        "root",
        gate,
        cache,
        {"root": root, "child": child},
        on_dispatcher=True,
        # an edge's query of an input's keys: the edges must build
        prepare=_keep_the_cold_path_off,
        # an input's keys are queried once it has some: here, once it has run
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=0,
            child_maps=1,
            child_execs=1,
            root_maps=1,
            root_execs=0,
        ),
        rebuilt_kept=dict(
            gate_cancelled=0,
            child_maps=1,
            child_execs=1,
            root_maps=1,
            root_execs=1,
            loads=0,
        ),
        rebuilt_discarded=dict(
            gate_cancelled=0,
            child_maps=2,
            child_execs=1,
            root_maps=2,
            root_execs=1,
            loads=1,
        ),
    )


def _dispatcher_records_root() -> Scenario:
    gate = Gate()
    root = tv("root")
    cache = HookedCacheManager()
    cache.hook = gate_cache_call(gate, "records")
    edge = Edge(root)
    return Scenario(
        edge,
        "root",
        gate,
        cache,
        {"root": root},
        on_dispatcher=True,
        prepare=lambda s: build_and_discard(s, edge),
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=0,
            root_maps=2,
            root_execs=1,
            loads=0,
        ),
        rebuilt_kept=dict(gate_cancelled=0, root_maps=2, root_execs=1, loads=1),
        rebuilt_discarded=dict(gate_cancelled=0, root_maps=3, root_execs=1, loads=1),
    )


def _dispatcher_records_dep() -> Scenario:
    gate = Gate()
    child = tv("child")
    root = tv("root", inputs=[Edge(child)])
    cache = HookedCacheManager()
    edge = Edge(root)

    async def prepare(s: Solver) -> None:
        await build_and_discard(s, edge)
        cache.hook = gate_cache_call(gate, "records", lambda args: bool(args[0].deps))

    return Scenario(
        edge,
        "root",
        gate,
        cache,
        {"root": root, "child": child},
        on_dispatcher=True,
        prepare=prepare,
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=0,
            child_maps=2,
            child_execs=1,
            root_maps=2,
            root_execs=1,
            loads=0,
        ),
        # the root's record is loaded: its input is not needed
        rebuilt_kept=dict(
            gate_cancelled=0,
            child_maps=2,
            child_execs=1,
            root_maps=2,
            root_execs=1,
            loads=1,
        ),
        rebuilt_discarded=dict(
            gate_cancelled=0,
            child_maps=3,
            child_execs=1,
            root_maps=3,
            root_execs=1,
            loads=1,
        ),
    )


def _dispatcher_save() -> Scenario:
    gate = Gate()
    root = tv("root")
    cache = HookedCacheManager()
    cache.hook = gate_cache_call(gate, "save")
    return Scenario(
        Edge(root),
        "root",
        gate,
        cache,
        {"root": root},
        on_dispatcher=True,
        after_cancel=dict(
            gate_calls=1,
            gate_cancelled=0,
            root_maps=1,
            root_execs=1,
            loads=0,
        ),
        # the saved result stays with the kept job's edge, or comes from the cache
        rebuilt_kept=dict(gate_cancelled=0, root_maps=1, root_execs=1, loads=0),
        rebuilt_discarded=dict(gate_cancelled=0, root_maps=2, root_execs=1, loads=1),
    )


OP_POINTS: dict[str, Callable[[], Scenario]] = {
    "root-cache_map": _root_cache_map,
    "child-cache_map": _child_cache_map,
    "root-exec": _root_exec,
    "child-exec": _child_exec,
    "acquire": _acquire,
    "compute_digest": _compute_digest,
    "cache-load": _cache_load,
    "nested-cache_map": _nested("cache_map"),
    "nested-exec": _nested("exec"),
}
DISPATCHER_POINTS: dict[str, Callable[[], Scenario]] = {
    "dispatcher-query-root": _dispatcher_query_root,
    "dispatcher-query-dep": _dispatcher_query_dep,
    "dispatcher-records-root": _dispatcher_records_root,
    "dispatcher-records-dep": _dispatcher_records_dep,
    "dispatcher-save": _dispatcher_save,
}
POINTS = {**OP_POINTS, **DISPATCHER_POINTS}

# How the caller is cancelled once the build is suspended at the point:
# "task": by the test, once everything else is blocked; "hook": by the suspended work
# itself, synchronously, before its first checkpoint (scope.cancel()); "deadline": the
# same, by moving the caller's deadline to now (what move_on_after(0) does).
MODES = ["task", "hook", "deadline"]


async def run_in_solver(
    cache: HookedCacheManager, body: Callable[[Solver], Awaitable[None]]
) -> None:
    """Run ``body`` with a new solver on ``cache``, then close the cache.

    Fail-safe: a cancelled ``build`` waits, shielded, until the work it cancelled has
    stopped, so a test's ``fail_after`` cannot interrupt a build stuck there. The
    body therefore runs in a task of its own while this task waits for it: when the
    test's ``fail_after`` expires, this task leaves the solver, which answers every
    open request, so even a stuck build returns and the test fails instead of
    hanging. An exception of the body is raised here, as itself.
    """
    finished = anyio.Event()
    errors: list[Exception] = []

    async def run(s: Solver) -> None:
        try:
            await body(s)
        except Exception as exc:
            errors.append(exc)
        finally:
            finished.set()

    try:
        # the solver is left (closed) before the task group waits for the body
        async with (
            anyio.create_task_group() as tg,
            Solver(resolve_op=resolve_tracked, default_cache=cache) as s,
        ):
            tg.start_soon(run, s)
            await finished.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await cache.close()
    if errors:
        raise errors[0]


# -- one caller, cancelled at each point ---------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("keep_job", [True, False], ids=["job-kept", "job-discarded"])
@pytest.mark.parametrize("point", list(POINTS))
async def test_cancel_caller_suspended_at(
    point: str, keep_job: bool, mode: str, handle_tracker: HandleTracker
) -> None:
    """Covers every await of POINTS: the caller of ``job.build`` is cancelled while
    the build is suspended there. The build raises the cancellation; op work is
    cancelled (no other job waits for it) and has stopped before ``build`` returns;
    a cache call the dispatcher awaits is not interrupted (it serves every job) and
    ``build`` returns only once it has finished. The same solver then builds the same
    graph in a new job, with the cancelled job still alive or discarded first: the
    value is right and the cancelled work ran again exactly once."""
    sc = POINTS[point]()

    async def body(s: Solver) -> None:
        if sc.prepare is not None:
            await sc.prepare(s)
        job = s.new_job("cancelled")
        caller = Caller(job, sc.edge, sc.gate)
        if mode == "hook":
            sc.gate.on_enter = caller.scope.cancel
        elif mode == "deadline":

            def expire() -> None:
                caller.scope.deadline = anyio.current_time()

            sc.gate.on_enter = expire
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller.run)
            await sc.gate.entered.wait()
            await anyio.wait_all_tasks_blocked()
            if mode == "task":
                caller.scope.cancel()
                await anyio.wait_all_tasks_blocked()
            if sc.on_dispatcher:
                assert not caller.done.is_set(), (
                    "build returned while the dispatcher was still in a cache call"
                )
                sc.gate.opened.set()
        caller.check_cancelled()
        # the suspended call had ended (cancelled, or for the dispatcher, finished)
        # before build returned
        assert caller.stopped_at_return == 1
        skip = sc.racy if mode != "task" else frozenset()
        check_metrics(sc, sc.after_cancel, skip)

        if not keep_job:
            await job.discard()
        again = s.new_job("again")
        assert await build_value(again, sc.edge) == sc.value
        check_metrics(sc, sc.rebuilt_kept if keep_job else sc.rebuilt_discarded, skip)
        await again.discard()
        await job.discard()

    with anyio.fail_after(TIMEOUT):
        await run_in_solver(sc.cache, body)


@pytest.mark.anyio
@pytest.mark.parametrize("point", list(POINTS))
async def test_cancel_caller_before_first_checkpoint(
    point: str, handle_tracker: HandleTracker
) -> None:
    """Covers the first await of ``job.build`` (the wait for the answer in
    ``Scheduler.build``), for every graph of POINTS: the build runs in a scope
    whose deadline has already passed (``move_on_after(0)``), so it is cancelled
    before its first checkpoint. The build raises the cancellation; op work it got
    to start (the dispatcher may run first) was cancelled and had stopped when it
    returned; then a new job of the same solver, the cancelled job still alive,
    builds the graph with exactly the counts of an uncancelled build in a fresh
    solver: nothing the cancelled build began is remembered or done twice."""
    reference = POINTS[point]()
    reference.gate.opened.set()

    async def reference_body(s: Solver) -> None:
        if reference.prepare is not None:
            await reference.prepare(s)
        job = s.new_job()
        assert await build_value(job, reference.edge) == reference.value
        await job.discard()

    sc = POINTS[point]()
    if sc.on_dispatcher:
        sc.gate.opened.set()  # nothing cancels the dispatcher's cache calls

    async def body(s: Solver) -> None:
        if sc.prepare is not None:
            await sc.prepare(s)
        job = s.new_job("cancelled")
        caller = Caller(job, sc.edge, sc.gate)
        caller.scope = anyio.move_on_after(0)
        await caller.run()
        caller.check_cancelled()
        if not sc.on_dispatcher:
            # op work that reached the gate was cancelled there, and had stopped
            # before build returned
            assert sc.gate.calls in (0, 1)
            assert sc.gate.cancelled == sc.gate.calls
            assert caller.stopped_at_return == sc.gate.calls
        sc.gate.opened.set()

        again = s.new_job("again")
        assert await build_value(again, sc.edge) == sc.value
        got = sc.metrics()
        # a call cancelled at the gate is the one call made again
        got["gate_calls"] -= got["gate_cancelled"]
        expected["gate_calls"] -= expected["gate_cancelled"]
        if sc.on_dispatcher:  # cache calls may be repeated: not counted
            del got["gate_calls"], expected["gate_calls"]
        del got["gate_cancelled"], expected["gate_cancelled"]
        assert got == expected
        await again.discard()
        await job.discard()

    with anyio.fail_after(TIMEOUT):
        await run_in_solver(reference.cache, reference_body)
        expected = reference.metrics()
        await run_in_solver(sc.cache, body)


# -- two jobs sharing the suspended work -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("point", list(OP_POINTS))
async def test_shared_work_goes_on_for_the_other_job(
    point: str, handle_tracker: HandleTracker
) -> None:
    """Covers the op-work awaits of OP_POINTS with two jobs waiting for the same
    suspended work: cancelling one caller returns from its build at once while the
    work goes on (not cancelled, not restarted); the other job gets the right value
    and the work ran once."""
    sc = OP_POINTS[point]()

    async def body(s: Solver) -> None:
        if sc.prepare is not None:
            await sc.prepare(s)
        before = sc.metrics()
        first = Caller(s.new_job("first"), sc.edge, sc.gate)
        second = Caller(s.new_job("second"), sc.edge, sc.gate)
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.run)
            await sc.gate.entered.wait()
            tg.start_soon(second.run)
            await anyio.wait_all_tasks_blocked()
            first.scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert first.done.is_set(), "a cancelled caller waited for shared work"
            first.check_cancelled()
            assert first.stopped_at_return == 0
            assert sc.gate.stopped == 0, "the shared work stopped"
            assert not second.done.is_set()
            sc.gate.opened.set()
        assert second.error is None
        assert second.value == sc.value
        assert sc.gate.calls == 1
        assert sc.gate.cancelled == 0
        # every vertex executed once in all (the cached one before), and the cached
        # one was loaded once, for both jobs
        m = sc.metrics()
        assert {n: m[f"{n}_execs"] for n in sc.vertices} == dict.fromkeys(sc.vertices, 1)
        assert m["loads"] - before["loads"] == (1 if point == "cache-load" else 0)
        await first.job.discard()
        await second.job.discard()

    with anyio.fail_after(TIMEOUT):
        await run_in_solver(sc.cache, body)


@pytest.mark.anyio
@pytest.mark.parametrize("point", list(OP_POINTS))
async def test_shared_work_cancelled_when_every_job_cancels(
    point: str, handle_tracker: HandleTracker
) -> None:
    """Covers the op-work awaits of OP_POINTS with two jobs waiting for the same
    suspended work, both cancelled one after the other: the first returns at once and
    the work goes on; the second (the last caller) cancels the work, and its build
    raises only after the work has stopped. A third job (the others still alive)
    then runs the work again, once."""
    sc = OP_POINTS[point]()

    async def body(s: Solver) -> None:
        if sc.prepare is not None:
            await sc.prepare(s)
        first = Caller(s.new_job("first"), sc.edge, sc.gate)
        second = Caller(s.new_job("second"), sc.edge, sc.gate)
        async with anyio.create_task_group() as tg:
            tg.start_soon(first.run)
            await sc.gate.entered.wait()
            tg.start_soon(second.run)
            await anyio.wait_all_tasks_blocked()
            first.scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert first.done.is_set(), "a cancelled caller waited for shared work"
            assert sc.gate.stopped == 0, "the shared work stopped"
            second.scope.cancel()
        first.check_cancelled()
        second.check_cancelled()
        assert first.stopped_at_return == 0
        assert second.stopped_at_return == 1, (
            "the last caller's build returned before the work had stopped"
        )
        check_metrics(sc, sc.after_cancel)

        third = s.new_job("third")
        assert await build_value(third, sc.edge) == sc.value
        check_metrics(sc, sc.rebuilt_kept)
        for job in (first.job, second.job, third):
            await job.discard()

    with anyio.fail_after(TIMEOUT):
        await run_in_solver(sc.cache, body)


# -- cancellation after k hook calls ------------------------------------------------------------


class Ticker:
    """Counts every hook call of a graph; at the ``cancel_at``-th one it cancels
    ``scope`` (synchronously, before the hook's checkpoint).

    From then on, an op hook (``op_tick``: cache map, exec, acquire, content key,
    cache load) suspends until the engine cancels the work it runs in: work that is
    not cancelled although no job waits for it any more hangs the test. Cache calls
    of the dispatcher (``tick``) are never suspended (nothing may cancel them)."""

    def __init__(self) -> None:
        self.ticks = 0
        self.cancel_at: int | None = None
        self.scope: anyio.CancelScope | None = None
        self.cancelling = False
        self.active = 0

    async def tick(self) -> None:
        self.ticks += 1
        if self.ticks == self.cancel_at:
            assert self.scope is not None
            self.cancelling = True
            self.scope.cancel()
        await anyio.lowlevel.checkpoint()

    async def op_tick(self) -> None:
        self.active += 1
        try:
            await self.tick()
            if self.cancelling:
                await anyio.sleep_forever()
        finally:
            self.active -= 1

    async def content_key(self, res: Result) -> str:
        await self.op_tick()
        return await digest_from_result(res)

    async def cache_hook(self, method: str, args: tuple[Any, ...]) -> None:
        if method == "load":  # a load runs in a task of its own, like op work
            await self.op_tick()
        else:
            await self.tick()


@dataclass
class TickGraph:
    edge: Edge
    value: str
    vertices: dict[str, TrackedVertex]
    cache: HookedCacheManager
    ticker: Ticker
    cached: TrackedVertex | None

    def op_work_active(self) -> int:
        running = sum(v.active for v in self.vertices.values())
        return running + self.ticker.active + self.cache.running["load"]


def tick_graph(with_cache: bool) -> TickGraph:
    """root (acquire) <- [mid (content key of a) <- a, nested -> inner, (cached)]."""
    t = Ticker()

    def opt(name: str, **kw: Any) -> VtxOpt:
        return VtxOpt(
            name=name, value=name, cache_pre_func=t.op_tick, exec_pre_func=t.op_tick, **kw
        )

    a = TrackedVertex(opt("a"))
    mid = TrackedVertex(opt("mid", inputs=[Edge(a)], slow_cache_compute={0: t.content_key}))
    inner = TrackedVertex(opt("inner"))
    nested = NestedVertex(Edge(inner), opt("nested"))
    vertices: dict[str, TrackedVertex] = {"a": a, "mid": mid, "inner": inner, "nested": nested}
    cached = TrackedVertex(opt("cached")) if with_cache else None
    if cached is not None:
        vertices["cached"] = cached
    root = AcquireVertex(t.op_tick, opt("root", inputs=[Edge(v) for v in vertices.values()]))
    vertices["root"] = root
    return TickGraph(Edge(root), "root", vertices, HookedCacheManager(), t, cached)


async def tick_run(cancel_at: int | None, with_cache: bool) -> int:
    """In one solver: build the graph, cancelling the caller at hook call
    ``cancel_at`` (0: before the build starts; None: never), check, then build it
    again in new jobs. Returns the number of hook calls of the first build."""
    g = tick_graph(with_cache)

    async def body(s: Solver) -> None:
        if g.cached is not None:
            await build_and_discard(s, Edge(g.cached))
        g.cache.hook = g.ticker.cache_hook
        g.ticker.ticks = 0
        g.ticker.cancel_at = cancel_at
        job = s.new_job("cancelled")
        scope = g.ticker.scope = anyio.CancelScope()
        if cancel_at == 0:
            scope.cancel()
        value: str | None = None
        with scope:
            try:
                value = await build_value(job, g.edge)
            finally:
                active_at_return = g.op_work_active()
                g.ticker.cancel_at = None
                g.ticker.cancelling = False
        ticks.append(g.ticker.ticks)
        cancelled = cancel_at is not None and cancel_at <= ticks[0]
        assert scope.cancelled_caught == cancelled
        assert value == (None if cancelled else g.value)
        assert active_at_return == 0, "build returned while op work was still running"

        # the cancelled job is still alive: nothing it started may be remembered as
        # cancelled, and nothing that completed may run again
        again = s.new_job("again")
        assert await build_value(again, g.edge) == g.value
        assert {n: v.execs for n, v in g.vertices.items()} == dict.fromkeys(g.vertices, 1)
        await job.discard()
        await again.discard()

        last = s.new_job("last")
        assert await build_value(last, g.edge) == g.value
        await last.discard()

    ticks: list[int] = []
    await run_in_solver(g.cache, body)
    return ticks[0]


@pytest.mark.anyio
@pytest.mark.parametrize("with_cache", [False, True], ids=["executed", "with-cache-load"])
async def test_cancel_after_each_hook_call(with_cache: bool, handle_tracker: HandleTracker) -> None:
    """Covers every await of one graph that has them all (cache maps, execs, an
    ``acquire()``, a content key, a nested build, the dispatcher's cache calls, and
    with a cached input a cache load): for k = 0 .. N+1, the caller is cancelled at
    the k-th hook call (k = 0: before the build; N: the hook calls of an
    uncancelled build). Each time the build raises the cancellation (unless k > N),
    every op call still running or started later is cancelled (or the test hangs),
    none is running when build returns, no handle leaks, and the same solver then
    builds the graph in a new job with every op executed exactly once overall."""
    with anyio.fail_after(TIMEOUT):
        total = await tick_run(None, with_cache)
    assert total > 10
    for k in range(total + 2):
        try:
            with anyio.fail_after(TIMEOUT), track_handles() as tracker:
                await tick_run(k, with_cache)
            tracker.check()
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"cancelled at hook call {k} of {total}: {exc!r}") from exc


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancelling_the_scope_around_the_whole_solver(backend: str) -> None:
    """A scope holding the whole ``async with Solver()`` is cancelled while a solve
    runs: the op is cancelled, the solve and the solver exit, nothing leaks.

    The engine's workers used to die with that scope, leaving the caller waiting
    (shielded) for work nobody would finish: a hang that no timeout could end,
    so the check runs in a child process with a deadline of its own."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tests)!r})
        import anyio
        from frontend_support import Ops, text
        from solver import Solver
        from solver.testing import track_handles

        async def main():
            ops = Ops()
            with track_handles() as tracker:
                with anyio.CancelScope() as scope:
                    async with Solver(op_kinds=ops.registry()) as s:
                        async def cancel_when_started():
                            await ops.start_signal("g").wait()
                            scope.cancel()
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(cancel_when_started)
                            await s.solve(text("a", "g", kind="test.gate"))
                tracker.check()
            assert scope.cancelled_caught
            print("cancelled", ops.cancelled, "live", ops.live_values())

        anyio.run(main, backend={backend!r})
    """)
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cancelled ['g'] live []"
