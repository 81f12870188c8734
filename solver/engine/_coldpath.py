"""The cold path: a graph nobody else is building, run inputs-first without edges.

When the cached path (``_cachedpath.py``) has resolved a graph's keys and the
root has no record, the edges would rebuild it with about five dispatches, six
pipes and a live-index entry per vertex (``docs/performance.md``, "Where a
vertex's time goes"). Nothing else is live in the solver (the cached path runs
only then), so those steps decide nothing here: each vertex is either *found*
(the pass found its keys: only a consumer that must run needs it, and then it
is loaded) or *missed* (it runs, and so does every consumer: a key built on a
new result cannot be stored yet).

This module runs that plan. Walking down from the root it marks what is needed
(a missed vertex needs its inputs, a found one needs nothing), then, inputs
first, requests each needed vertex's exec (or, for a found one, the load of its
best record) through the vertex's :class:`~solver.engine._sharedop.SharedOp`, as
its edge would: the same single-flight calls, units on the work pool, progress
events and memos. Every request whose inputs are done is made at once, so
independent vertices run together; the pass's task (``_Pass`` in
``_jobs.py``) waits on one event for a batch of answers, saves the batch's exec
results together, each under its commit key (the key its edge would compute:
the cache map's digest over its inputs' result keys; one ``save_many`` per
cache where the cache has it, else one ``save`` each: a save was a quarter of a
cold build, ``docs/performance.md``, "Issue 13: the cold build's cache save"),
and completes each vertex's edge with its result
(:meth:`ActiveEdge.complete <solver.engine._edge.ActiveEdge.complete>`), so that
the solver afterwards holds exactly what the edges would have left: a complete
edge per vertex that ran or was loaded, owning its result until the state is
released.

What it does not handle it leaves to the edges, before it starts (two vertices
with one cache-map digest, which the edges would merge; a found vertex without
records) or when it happens (a load that fails, an exec or a load cancelled by
the engine, a save that fails): it stops, cancels what still runs (as an edge
cancels its inputs' work when it fails), releases the answers it did not take,
and returns False; the edges then find every finished exec memoized and do the
rest as they do. An exec that fails fails the build the same way, with the
exec's error (memoized by the shared op, so a rebuild reports it again). If a
build of another root makes an edge for a vertex meanwhile, that edge is left
alone and gets the same memoized exec; the result made here is then released
at the end.

Cancelling the pass (its last caller left) cancels its outstanding requests (a
call another job waits on goes on) and returns once they have answered; what
answered is released, what was completed stays on its edge, as with the edges.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._cache import CacheExporter, CacheKey, CacheKeyWithSelector, CacheRecord, ExportableCacheKey
from .._errors import SolveError
from .._graph import Vertex
from .._refs import CachedResultWithKeys, SharedCachedResult
from ..cache import MergedExporter
from ._scheduler import Pipe

if TYPE_CHECKING:
    from .._cache import CacheManager
    from .._op import CacheMap
    from ._index import PendingEdge
    from ._jobs import Engine, VertexState
    from ._scheduler import Scheduler

__all__ = ["ColdNode", "needed_nodes", "run_cold"]


_NO_NODES: list[ColdNode] = []  # never written to


class ColdNode:
    """One needed output of one vertex in a cold run."""

    __slots__ = (
        "cache_map",
        "consumers",
        "found_keys",
        "inputs",
        "out",
        "pending",
        "pipe",
        "record",
        "result",
        "run",
        "state",
    )

    def __init__(
        self,
        state: VertexState,
        out: int,
        cache_map: CacheMap,
        found_keys: Sequence[ExportableCacheKey] | None,
    ) -> None:
        self.state = state
        self.out = out
        self.cache_map = cache_map
        # the keys the cached path found (None: a miss, it runs)
        self.found_keys = found_keys
        # for a found vertex that is needed: the record it loads
        self.record: CacheRecord | None = None
        self.inputs: list[ColdNode] = []
        self.consumers: list[ColdNode] = []
        self.pending = 0
        self.pipe: Pipe | None = None
        self.result: SharedCachedResult | None = None
        self.run: _Run | None = None

    def answered(self) -> None:
        """The pipe's ``on_send``: queue this node for the pass's task."""
        run = self.run
        assert run is not None
        run.answers.append(self)
        if run.wake is not None:
            run.wake.set()
            run.wake = None


class _Run:
    __slots__ = ("answers", "error", "failed", "inflight", "own", "wake")

    def __init__(self) -> None:
        self.answers: deque[ColdNode] = deque()
        self.wake: anyio.Event | None = None
        self.inflight = 0
        self.failed = False
        # an exec's error: the build's
        self.error: SolveError | None = None
        # results no edge took (another job's edge was there first)
        self.own: list[SharedCachedResult] = []


def needed_nodes(nodes: dict[tuple[str, int], ColdNode], root: ColdNode) -> list[ColdNode]:
    """Link the nodes ``root`` needs (a missed node needs its inputs) and return
    them, inputs first. O(needed nodes + their inputs)."""
    order: list[ColdNode] = []
    seen: set[int] = {id(root)}
    stack: list[tuple[ColdNode, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        stack.append((node, True))
        if node.found_keys is not None:
            continue
        for inp in node.state.vtx.inputs:
            child = nodes[inp.vertex.digest, inp.index]
            node.inputs.append(child)
            child.consumers.append(node)
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((child, False))
    return order


async def run_cold(solver: Engine, order: list[ColdNode]) -> bool:
    """Run ``order`` (from :func:`needed_nodes`, the root last); True if the root's
    edge was completed, False if the edges must finish the build."""
    run = _Run()
    scheduler = solver._scheduler
    for node in order:
        node.run = run
        node.pending = len(node.inputs)
    try:
        for node in order:
            if not node.pending:
                _request(node, run, scheduler)
        while run.inflight:
            if not run.answers:
                wake = run.wake = anyio.Event()
                try:
                    await wake.wait()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await _cancel(run, order)
                    if scheduler._closed:
                        # the solver is closing (its task group is cancelled): the
                        # build is answered as the scheduler answers open builds
                        raise SolveError("the solver was closed") from None
                    raise
            # The cache saves are not interrupted by the caller's cancellation
            # (as the dispatcher's are not): it takes effect at the next wait.
            with anyio.CancelScope(shield=True):
                taken = await _take_batch(run)
                if run.failed:
                    # An exec failed: the build fails, and what is still running
                    # is not needed, as when an edge fails. A load or a save
                    # failed: the edges finish the build, and the execs running
                    # now are theirs to take (memoized), so they run on rather
                    # than twice.
                    await _cancel(run, order, stop_execs=run.error is not None)
                    continue
                for node, _ in taken:
                    for consumer in node.consumers:
                        consumer.pending -= 1
                        if not consumer.pending:
                            _request(consumer, run, scheduler)
    finally:
        # no reference cycle outlives the run (inputs and consumers point at each
        # other): the nodes go with their last reference, not in a collection
        for node in order:
            node.run = None
            node.result = None
            node.inputs = node.consumers = _NO_NODES
        for result in run.own:
            solver.release_later(result)
    if run.error is not None:
        # the failed exec's error, memoized (each caller gets its own copy)
        raise run.error
    return not run.failed


def _request(node: ColdNode, run: _Run, scheduler: Scheduler) -> None:
    st = node.state
    op = st.op
    assert op is not None
    pipe = node.pipe = Pipe(scheduler, None, None)
    pipe.on_send = node.answered
    run.inflight += 1
    if node.record is not None:
        op.request_load(pipe, node.record)
    else:
        inputs = [inp.result for inp in node.inputs]
        op.request_exec(pipe, inputs)  # type: ignore[arg-type]


async def _cancel(run: _Run, order: list[ColdNode], *, stop_execs: bool = True) -> None:
    """Cancel every outstanding request (loads only, without ``stop_execs``),
    wait for the answers and release them."""
    run.failed = True
    for node in order:
        pipe = node.pipe
        if pipe is not None and not pipe.send_completed and (
            stop_execs or node.record is not None
        ):
            # a shared call goes on for its other waiters
            pipe.cancel()
    while run.inflight:
        while run.answers:
            node = run.answers.popleft()
            run.inflight -= 1
            _drop_answer(node)
        if run.inflight:
            wake = run.wake = anyio.Event()
            await wake.wait()


def _drop_answer(node: ColdNode) -> None:
    pipe = node.pipe
    assert pipe is not None
    node.pipe = None
    pipe.receive()
    if pipe.owned:
        _release_value(node.state, pipe.take())


async def _take_batch(run: _Run) -> list[tuple[ColdNode, Any]]:
    """Take the answers queued now, in order: each a loaded result, or the one
    output of an exec (the others released, as ``ActiveEdge._commit`` does); save
    the exec results together (:func:`_save_batch`), then complete each node's
    edge, in order, and return them. A failure stops the run and the taking (the
    answers after it are left for :func:`_cancel`); the answers before it are
    saved and completed. If the save fails, the loaded ones are completed, the
    exec results released, and the run stops (the edges save again, and report
    the error as they do)."""
    taken: list[tuple[ColdNode, Any]] = []
    execs: list[tuple[ColdNode, Any]] = []
    answers = run.answers
    while answers:
        node = answers.popleft()
        run.inflight -= 1
        pipe = node.pipe
        assert pipe is not None
        node.pipe = None
        pipe.receive()
        err = pipe.err
        if err is not None:
            run.failed = True
            if node.record is None and isinstance(err, SolveError):
                run.error = err
            break
        value = pipe.take()
        if node.record is None:
            outputs: list[Any] = value
            release_later = node.state.solver.release_later
            index = node.out
            for i, r in enumerate(outputs):
                if i != index:
                    release_later(r)
            if len(outputs) <= index:
                # the edges report it, as they do (the shared op memoized it)
                run.failed = True
                break
            value = outputs[index]
            execs.append((node, value))
        taken.append((node, value))
    saved: list[CachedResultWithKeys] | None = None
    if execs:
        try:
            saved = await _save_batch(execs)
        except BaseException as exc:
            run.failed = True
            for node, value in execs:
                node.state.solver.release_later(value)
            if not isinstance(exc, Exception):
                # nothing is held: the loaded results go too, then the exception
                for node, value in taken:
                    if node.record is not None:
                        node.state.solver.release_later(value)
                raise
    pos = 0
    for node, value in taken:
        if node.record is not None:
            _hold(node, value, run)
        elif saved is not None:
            _hold(node, saved[pos], run)
            pos += 1
    return taken


def _hold(node: ColdNode, cached: Any, run: _Run) -> None:
    """Put a loaded or saved result on the node's edge (or its state, which makes
    the edge when first asked for), indexed under its first key."""
    st = node.state
    result = SharedCachedResult(cached)
    node.result = result
    if st.has_edge(node.out):
        run.own.append(result)
        return
    keys: Sequence[ExportableCacheKey]
    # (no ignore-cache vertex comes here: the cached path hands those to the edges)
    if node.found_keys is None and node.record is None:
        # an exec's commit keys alone: the result's own list (never written to;
        # an edge made from it copies it), not a copy of it per vertex
        keys = cached.cache_keys
    else:
        keys = list(node.found_keys or ())
        if node.record is None:
            keys.extend(cached.cache_keys)
    loaded = node.record is not None
    # The state holds the completion and makes the edge when it is first asked
    # for (the root's is, by the build's request); another output's completion
    # held already: this one's edge is made now.
    holder: PendingEdge
    if st.complete_later(node.out, node.cache_map, keys, result, loaded):
        holder = st
    else:
        edge = st.get_edge(node.out)
        edge.complete(node.cache_map, keys, result, loaded)
        holder = edge
    if keys:
        # live, as the edge would be: a later build of an equal key merges with
        # it (nothing else is live, so nothing is found to merge with now, and
        # the index stores it when a later build first looks: store_later)
        st.solver._index.store_later(keys[0].key, holder)


def _release_value(st: VertexState, value: Any) -> None:
    if isinstance(value, list):
        for r in value:
            st.solver.release_later(r)
    elif value is not None:
        st.solver.release_later(value)


def commit_key(node: ColdNode) -> CacheKey:
    """The key an exec result of ``node`` is saved under: its edge's commit key."""
    vtx: Vertex = node.state.vtx
    cache_map = node.cache_map
    if not node.inputs:
        return CacheKey(cache_map.digest, vtx.digest, node.out)
    deps: list[list[CacheKeyWithSelector]] = []
    for inp, dep in zip(node.inputs, cache_map.deps, strict=True):
        result = inp.result
        assert result is not None
        sel = dep.selector
        deps.append([CacheKeyWithSelector(k, sel) for k in result.cache_keys])
    return CacheKey(cache_map.digest, vtx.digest, node.out, deps)


async def _save_batch(execs: list[tuple[ColdNode, Any]]) -> list[CachedResultWithKeys]:
    """Save each exec result of ``execs`` under its node's commit key, with one
    ``save_many`` per cache (the vertices' combined caches: one, unless some have
    their own cache sources) where the cache has it and has more than one result
    to save, else one ``save`` each; the results wrapped with their keys, in
    order. The results stay the caller's."""
    now = time.time()
    if len(execs) == 1:
        # a chain's every batch: one save, in fewer calls than a batch of one
        node, res = execs[0]
        key = commit_key(node)
        one = await node.state.combined_cache().save(key, res, now)
        exporter: CacheExporter = one.exporter if one.exporter is not None else MergedExporter(())
        return [CachedResultWithKeys(res, [ExportableCacheKey(key, exporter)])]
    keys: list[CacheKey] = []
    groups: list[tuple[CacheManager, list[int]]] = []
    for i, (node, _) in enumerate(execs):
        keys.append(commit_key(node))
        cache = node.state.combined_cache()
        for member, positions in groups:
            if member is cache:
                positions.append(i)
                break
        else:
            groups.append((cache, [i]))
    exported: list[ExportableCacheKey | None] = [None] * len(execs)
    for cache, positions in groups:
        save_many = getattr(cache, "save_many", None) if len(positions) > 1 else None
        if save_many is not None:
            batch = [(keys[i], execs[i][1], now) for i in positions]
            for i, saved in zip(positions, await save_many(batch), strict=True):
                exported[i] = saved
        else:
            for i in positions:
                exported[i] = await cache.save(keys[i], execs[i][1], now)
    out: list[CachedResultWithKeys] = []
    for (_, res), key, saved in zip(execs, keys, exported, strict=True):
        assert saved is not None
        # The save's one exporter is the key's exporter (a MergedExporter of one
        # exports exactly what its member does: two GC-tracked objects fewer per
        # vertex, each walked by every full collection while the build is kept).
        exporter = saved.exporter if saved.exporter is not None else MergedExporter(())
        out.append(CachedResultWithKeys(res, [ExportableCacheKey(key, exporter)]))
    return out
