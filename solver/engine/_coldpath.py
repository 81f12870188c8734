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
independent vertices run together.

A missed vertex that keys an input on its content (``compute_digest``), or
takes an input found here, may still hit: an edit that left the selected files
as they were. Once each of its inputs is a hit or has a result, the content key
of every such input with a result is computed (the shared op's single-flight
call, as the edge's), and its keys are asked of the cache as its edge asks
them (each input's keys, and its content key, linking the definition keys to
what the content key finds; one ``query_many`` for every vertex ready then). A
hit is loaded only when something needs its result (a consumer that runs, the
root); a miss runs. A vertex that takes a result of this run whole (no content
key) cannot hit and is known to run at once, and so, in turn, are its
consumers: the hits it needs are loaded while the rest runs. A content-keyed
input found without a result is asked with its definition keys first and
loaded for its content key only if they find nothing, as the edges do. The
pass's task (``_Pass`` in
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
that may get equal keys, which the edges would merge; a found vertex without
records) or when it happens (a load, a content key, a query or a save that
fails, an exec or a load cancelled by the engine, a hit found here without a
record to load): it stops, cancels what still runs (as an edge
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
from ..cache import FoundKeyExporter, MergedExporter, best_record
from ._scheduler import Pipe

if TYPE_CHECKING:
    from .._cache import CacheManager
    from .._op import CacheMap
    from ._index import PendingEdge
    from ._jobs import Engine, VertexState
    from ._scheduler import Scheduler

__all__ = ["ColdNode", "needed_nodes", "run_cold"]


_NO_NODES: list[ColdNode] = []  # never written to
_NO_CONSUMERS: list[tuple[ColdNode, int]] = []  # never written to

# a content key not asked for yet, and one asked for (the answer is the key, or
# None when the op's compute_digest gave none)
_UNASKED: Any = object()
_ASKED: Any = object()


class ColdNode:
    """One needed output of one vertex in a cold run."""

    __slots__ = (
        "cache_map",
        "consumers",
        "definite",
        "found_keys",
        "inputs",
        "loads",
        "loads_asked",
        "missing",
        "must_run",
        "out",
        "pending",
        "pipe",
        "querying",
        "record",
        "requery",
        "result",
        "run",
        "slow",
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
        # the keys the cached path found, or this run found (a hit); None: not
        # known to hit (yet)
        self.found_keys = found_keys
        # for a hit that is loaded: the record it loads
        self.record: CacheRecord | None = None
        self.inputs: list[ColdNode] = []
        # each consumer with the place it takes this node at (one pair per place)
        self.consumers: list[tuple[ColdNode, int]] = []
        # inputs not resolved yet (neither a hit nor a result)
        self.pending = 0
        # inputs without a result yet (each place an input has counts), and
        # whether the loads of the hits among them were asked for since it
        # must run: a node with many inputs is checked once per input's
        # answer, which must not walk all its inputs each time
        self.missing = 0
        self.loads_asked = False
        self.pipe: Pipe | None = None
        # whether the request on ``pipe`` is a load (else an exec)
        self.loads = False
        self.result: SharedCachedResult | None = None
        self.run: _Run | None = None
        # decided to run (``definite``: no key of it can be stored, so neither
        # can a key of a consumer that takes it whole)
        self.must_run = False
        self.definite = False
        # a query of it is in flight; one is due again once its content keys
        # are in (the first asked without a key its input had no result for)
        self.querying = False
        self.requery = False
        # per input: its content key (see _UNASKED, _ASKED); None without any
        self.slow: list[Any] | None = None

    def answered(self) -> None:
        """The pipe's ``on_send``: queue this node for the pass's task."""
        run = self.run
        assert run is not None
        run.answers.append(self)
        if run.wake is not None:
            run.wake.set()
            run.wake = None


class _Slow:
    """A request for the content key of one input of a node."""

    __slots__ = ("index", "node", "pipe")

    def __init__(self, node: ColdNode, index: int, pipe: Pipe) -> None:
        self.node = node
        self.index = index
        self.pipe = pipe

    def answered(self) -> None:
        run = self.node.run
        assert run is not None
        run.answers.append(self)
        if run.wake is not None:
            run.wake.set()
            run.wake = None


class _Run:
    __slots__ = (
        "answers",
        "error",
        "failed",
        "inflight",
        "own",
        "root",
        "scheduler",
        "slows",
        "to_load",
        "to_query",
        "wake",
    )

    def __init__(self, scheduler: Scheduler, root: ColdNode) -> None:
        self.scheduler = scheduler
        self.root = root
        self.answers: deque[ColdNode | _Slow] = deque()
        self.wake: anyio.Event | None = None
        self.inflight = 0
        self.failed = False
        # an exec's error: the build's
        self.error: SolveError | None = None
        # results no edge took (another job's edge was there first)
        self.own: list[SharedCachedResult] = []
        # the content-key requests outstanding
        self.slows: set[_Slow] = set()
        # nodes whose keys are to be asked of the cache, and hits found here
        # whose records are to be read before their load
        self.to_query: list[ColdNode] = []
        self.to_load: dict[ColdNode, None] = {}


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
        for place, inp in enumerate(node.state.vtx.inputs):
            child = nodes[inp.vertex.digest, inp.index]
            node.inputs.append(child)
            child.consumers.append((node, place))
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((child, False))
    return order


async def run_cold(solver: Engine, order: list[ColdNode]) -> bool:
    """Run ``order`` (from :func:`needed_nodes`, the root last); True if the root's
    edge was completed, False if the edges must finish the build."""
    run = _Run(solver._scheduler, order[-1])
    for node in order:
        node.run = run
        inputs = node.inputs
        node.missing = len(inputs)
        pending = 0
        for inp in inputs:
            if inp.found_keys is None:
                pending += 1
        node.pending = pending
        if node.found_keys is None:
            for dep in node.cache_map.deps:
                if dep.compute_digest is not None:
                    node.slow = [_UNASKED] * len(inputs)
                    break
    try:
        _start(order, run)
        while True:
            if (run.to_query or run.to_load) and not run.failed:
                # The cache calls are not interrupted by the caller's
                # cancellation (as the dispatcher's are not): it takes effect at
                # the next wait.
                with anyio.CancelScope(shield=True):
                    try:
                        await _queries(run)
                        await _records(run)
                    except Exception:
                        # a failing cache, or a hit without a record: the
                        # edges report it or work around it, as they do
                        await _cancel(run, order, stop_execs=False)
                continue
            run.to_query.clear()  # (a stopped run asks nothing more)
            run.to_load.clear()
            if not run.inflight:
                break
            if not run.answers:
                wake = run.wake = anyio.Event()
                try:
                    await wake.wait()
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await _cancel(run, order)
                    if run.scheduler._closed:
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
                    # is not needed, as when an edge fails. A load, a content
                    # key or a save failed: the edges finish the build, and the
                    # execs running now are theirs to take (memoized), so they
                    # run on rather than twice.
                    await _cancel(run, order, stop_execs=run.error is not None)
                    continue
                for node, loaded in taken:
                    _got_result(node, loaded, run)
        if not run.failed and run.root.result is None:
            # nothing left to do and the root has no result: a hit without a
            # record to load (its edge would run it); the edges finish
            run.failed = True
    finally:
        # no reference cycle outlives the run (inputs and consumers point at each
        # other): the nodes go with their last reference, not in a collection
        for node in order:
            node.run = None
            node.result = None
            node.inputs = _NO_NODES
            node.consumers = _NO_CONSUMERS
        for result in run.own:
            solver.release_later(result)
    if run.error is not None:
        # the failed exec's error, memoized (each caller gets its own copy)
        raise run.error
    return not run.failed


def _start(order: list[ColdNode], run: _Run) -> None:
    """The first decisions: a missed node that no input of which is missed and
    that keys no input on its content cannot hit (the cached path asked for
    its keys), so it runs; so does every consumer that takes it whole."""
    for node in order:
        if node.found_keys is not None:
            continue  # (the root is never found here: the cached path seeds it)
        if not node.pending and node.slow is None:
            _decide_run(node, run)
    for node in order:
        if node.found_keys is None and not node.must_run and not node.pending:
            _check(node, run)


def _decide_run(node: ColdNode, run: _Run) -> None:
    """``node`` runs, and no key of it can be stored: neither can a key of a
    consumer that takes it whole (no content key), which runs too."""
    stack = [node]
    while stack:
        n = stack.pop()
        n.must_run = n.definite = True
        n.requery = False
        for c, place in n.consumers:
            if c.definite or c.found_keys is not None:
                continue
            if c.cache_map.deps[place].compute_digest is None:
                stack.append(c)
        _check(n, run)


def _check(node: ColdNode, run: _Run) -> None:
    """Take ``node``'s next step, if it has one now: ask for its inputs' results
    (it runs), their content keys, its keys (it may hit), or its exec."""
    if (
        run.failed
        or node.found_keys is not None
        or node.pipe is not None
        or node.result is not None
        or node.querying
    ):
        return
    if node.must_run:
        # every input's result is needed: ask for the hits' loads once (an
        # input found to hit later is loaded by _hit), then wait for the rest
        if not node.loads_asked:
            node.loads_asked = True
            for inp in node.inputs:
                if inp.result is None and inp.found_keys is not None and inp.pipe is None:
                    _load(inp, run)
        if node.missing or not _ask_content_keys(node, run):
            return
        if node.requery:
            node.requery = False
            node.querying = True
            run.to_query.append(node)
            return
        _exec(node, run)
        return
    if node.pending:
        return
    # every input is a hit or has a result: can this one hit?
    deps = node.cache_map.deps
    for i, inp in enumerate(node.inputs):
        if inp.found_keys is None and deps[i].compute_digest is None:
            # a result of this run taken whole: no stored key leads on from it
            _decide_run(node, run)
            return
    if not _ask_content_keys(node, run):
        return
    node.querying = True
    run.to_query.append(node)


def _ask_content_keys(node: ColdNode, run: _Run) -> bool:
    """Ask for the content key of each input keyed on its content that has a
    result and was not asked yet (as an edge does once such an input is
    complete); True if every key asked for is in."""
    slow = node.slow
    if slow is None:
        return True
    done = True
    deps = node.cache_map.deps
    for i, inp in enumerate(node.inputs):
        key = slow[i]
        if key is _ASKED:
            done = False
        elif key is _UNASKED and inp.result is not None:
            fn = deps[i].compute_digest
            if fn is None:
                slow[i] = None
                continue
            slow[i] = _ASKED
            done = False
            op = node.state.op
            assert op is not None
            pipe = Pipe(run.scheduler, None, None)
            req = _Slow(node, i, pipe)
            pipe.on_send = req.answered
            run.slows.add(req)
            run.inflight += 1
            op.request_slow_cache(pipe, i, fn, inp.result)
    return done


def _load(node: ColdNode, run: _Run) -> None:
    """Load a hit's result: its record now if it has one, else once read."""
    if node.pipe is not None or node.result is not None:
        return
    if node.record is None:
        run.to_load[node] = None
        return
    st = node.state
    op = st.op
    assert op is not None
    pipe = node.pipe = Pipe(run.scheduler, None, None)
    pipe.on_send = node.answered
    node.loads = True
    run.inflight += 1
    op.request_load(pipe, node.record)


def _exec(node: ColdNode, run: _Run) -> None:
    st = node.state
    op = st.op
    assert op is not None
    pipe = node.pipe = Pipe(run.scheduler, None, None)
    pipe.on_send = node.answered
    node.loads = False
    run.inflight += 1
    inputs = [inp.result for inp in node.inputs]
    op.request_exec(pipe, inputs)  # type: ignore[arg-type]


def _got_result(node: ColdNode, loaded: bool, run: _Run) -> None:
    """``node`` has its result: an exec's resolves its consumers' input; a
    load's is what a consumer waited for."""
    for c, _ in node.consumers:
        c.missing -= 1
        if not loaded:
            c.pending -= 1
        _check(c, run)


def _hit(node: ColdNode, run: _Run) -> None:
    """``node`` was found to hit: its consumers may hit too; loaded only if
    something needs its result."""
    if node is run.root:
        _load(node, run)
    for c, _ in node.consumers:
        c.pending -= 1
        if c.must_run:
            _load(node, run)
        _check(c, run)


def _alternatives(node: ColdNode) -> list[list[CacheKeyWithSelector]]:
    """Per input, the keys ``node`` is asked of the cache with (and its commit
    key made of), as its edge lists them: the input's result's keys, else the
    keys it was found under, and the input's content key, if any."""
    deps = node.cache_map.deps
    slow = node.slow
    out: list[list[CacheKeyWithSelector]] = []
    for i, inp in enumerate(node.inputs):
        sel = deps[i].selector
        result = inp.result
        keys = result.cache_keys if result is not None else inp.found_keys
        assert keys is not None
        alts = [CacheKeyWithSelector(k, sel) for k in keys]
        if slow is not None:
            key = slow[i]
            if isinstance(key, ExportableCacheKey):
                alts.append(CacheKeyWithSelector(key))
        out.append(alts)
    return out


async def _queries(run: _Run) -> None:
    """Ask the cache for the keys of every node in ``run.to_query``, in one
    ``query_many`` per cache where it has one (each input's keys, as the
    edges probe them; the keys every input leads to are the node's); a node
    found makes its consumers' next step, one not found runs (or asks again
    once its content keys are in)."""
    nodes, run.to_query = run.to_query, []
    batches: dict[int, tuple[CacheManager, list[tuple[Any, int, str, int]]]] = {}
    asked: list[tuple[ColdNode, CacheManager, int, list[list[CacheKeyWithSelector]]]] = []
    for node in nodes:
        cache = node.state.combined_cache()
        batch = batches.get(id(cache))
        if batch is None:
            batch = batches[id(cache)] = (cache, [])
        requests = batch[1]
        alternatives = _alternatives(node)
        asked.append((node, cache, len(requests), alternatives))
        digest = node.cache_map.digest
        for i, alts in enumerate(alternatives):
            requests.append((alts, i, digest, node.out))
    answers: dict[int, list[list[CacheKey]]] = {}
    for key, (cache, requests) in batches.items():
        query_many = getattr(cache, "query_many", None)
        if query_many is not None:
            answers[key] = await query_many(requests)
        else:
            answers[key] = [await cache.query(*r) for r in requests]
    for node, cache, start, alternatives in asked:
        node.querying = False
        got = answers[id(cache)]
        matched: dict[str, CacheKey] = {}
        for i in range(len(alternatives)):
            reached = {k.id: k for k in got[start + i]}
            matched = reached if i == 0 else {
                kid: k for kid, k in matched.items() if kid in reached
            }
            if not matched:
                break
        if matched:
            vertex = node.state.vtx.digest
            keys: list[ExportableCacheKey] = []
            for k in matched.values():
                k.vertex = vertex
                k.deps = [list(a) for a in alternatives]
                keys.append(ExportableCacheKey(k, FoundKeyExporter(k, cache)))
            node.found_keys = keys
            node.must_run = False
            _hit(node, run)
            continue
        slow = node.slow
        if slow is not None and any(
            k is _UNASKED and node.cache_map.deps[i].compute_digest is not None
            for i, k in enumerate(slow)
        ):
            # asked without the content key of an input that had no result:
            # its result is needed for it, then asked again (as the edges do)
            node.must_run = True
            node.requery = True
            _check(node, run)
        else:
            _decide_run(node, run)


class _NoRecordError(Exception):
    """A hit found during the run has no record left to load."""


async def _records(run: _Run) -> None:
    """Read the records of the hits found here that are to be loaded, then
    load each from its best record; a hit without one stops the run as a
    failing cache call does (its edge runs it)."""
    nodes, run.to_load = run.to_load, {}
    for node in nodes:
        if node.pipe is not None or node.result is not None:
            continue
        cache = node.state.combined_cache()
        records: list[CacheRecord] = []
        for k in node.found_keys or ():
            records.extend(await cache.records(k.key))
        rec = best_record(records)
        if rec is None:
            # the caller cancels what the run asked for, as for a failing call
            raise _NoRecordError
        node.record = rec
        _load(node, run)


async def _cancel(run: _Run, order: list[ColdNode], *, stop_execs: bool = True) -> None:
    """Cancel every outstanding request (loads and content keys only, without
    ``stop_execs``), wait for the answers and release them."""
    run.failed = True
    for node in order:
        pipe = node.pipe
        if pipe is not None and not pipe.send_completed and (stop_execs or node.loads):
            # a shared call goes on for its other waiters
            pipe.cancel()
    for req in run.slows:
        if not req.pipe.send_completed:
            req.pipe.cancel()
    while run.inflight:
        while run.answers:
            answer = run.answers.popleft()
            run.inflight -= 1
            _drop_answer(answer)
        if run.inflight:
            wake = run.wake = anyio.Event()
            await wake.wait()


def _drop_answer(answer: ColdNode | _Slow) -> None:
    if isinstance(answer, _Slow):
        answer.pipe.receive()
        return
    node_pipe = answer.pipe
    assert node_pipe is not None
    answer.pipe = None
    node_pipe.receive()
    if node_pipe.owned:
        _release_value(answer.state, node_pipe.take())


async def _take_batch(run: _Run) -> list[tuple[ColdNode, bool]]:
    """Take the answers queued now, in order: each a content key, a loaded
    result, or the one output of an exec (the others released, as
    ``ActiveEdge._commit`` does); save the exec results together
    (:func:`_save_batch`), then complete each node's edge, in order, and return
    the nodes with a new result (and whether it was loaded). A failure stops
    the run and the taking (the answers after it are left for :func:`_cancel`);
    the answers before it are saved and completed. If the save fails, the
    loaded ones are completed, the exec results released, and the run stops
    (the edges save again, and report the error as they do)."""
    taken: list[tuple[ColdNode, Any]] = []
    execs: list[tuple[ColdNode, Any]] = []
    keyed: list[ColdNode] = []
    answers = run.answers
    while answers:
        answer = answers.popleft()
        run.inflight -= 1
        if isinstance(answer, _Slow):
            slow_pipe = answer.pipe
            slow_pipe.receive()
            run.slows.discard(answer)
            if slow_pipe.err is not None:
                # the edges report it (the shared op memoized it)
                run.failed = True
                break
            digest = slow_pipe.value
            slow = answer.node.slow
            assert slow is not None
            slow[answer.index] = ExportableCacheKey(CacheKey(digest, "", -1)) if digest else None
            keyed.append(answer.node)
            continue
        node = answer
        pipe = node.pipe
        assert pipe is not None
        node.pipe = None
        pipe.receive()
        err = pipe.err
        if err is not None:
            run.failed = True
            if not node.loads and isinstance(err, SolveError):
                run.error = err
            break
        value = pipe.take()
        if not node.loads:
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
                    if node.loads:
                        node.state.solver.release_later(value)
                raise
    pos = 0
    out: list[tuple[ColdNode, bool]] = []
    for node, value in taken:
        if node.loads:
            _hold(node, value, run)
        elif saved is not None:
            _hold(node, saved[pos], run)
            pos += 1
        else:
            continue
        out.append((node, node.loads))
    if not run.failed:
        for node in keyed:
            _check(node, run)
    return out


def _hold(node: ColdNode, cached: Any, run: _Run) -> None:
    """Put a loaded or saved result on the node's edge (or its state, which makes
    the edge when first asked for), indexed under its first key."""
    st = node.state
    result = SharedCachedResult(cached)
    node.result = result
    if st.has_edge(node.out):
        run.own.append(result)
        return
    # (no ignore-cache vertex comes here: the cached path hands those to the edges)
    # An exec's commit keys alone: the result's own list (never written to; an
    # edge made from it copies it), not a copy of it per vertex.
    found = node.found_keys
    keys: Sequence[ExportableCacheKey] = cached.cache_keys if found is None else list(found)
    loaded = node.loads
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
    """The key an exec result of ``node`` is saved under: its edge's commit key
    (each input's result keys, and its content key if it has one)."""
    vtx: Vertex = node.state.vtx
    cache_map = node.cache_map
    if not node.inputs:
        return CacheKey(cache_map.digest, vtx.digest, node.out)
    return CacheKey(cache_map.digest, vtx.digest, node.out, _alternatives(node))


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
