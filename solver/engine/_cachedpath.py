"""The cached path: the keys of a build resolved in one pass, without edges.

A build whose result is in the cache ends with one cache load, but the edge state
machine gets there in several dispatches per vertex: every edge asks its inputs
for their keys through pipes, and each answer is one more step (see
``_edge.py``). When nothing else is live in the solver, the same questions can be
asked in two passes instead. First every vertex's first cache map is requested at
once, through its :class:`~solver.engine._sharedop.SharedOp` (the shared calls the edges
make: each runs once, as a unit on the work pool, concurrently with the others,
and is memoized), and the pass waits for all the answers. Then, in one loop,
inputs first, the cache's keys for each vertex from its inputs' keys
(``CacheManager.query``, one call per input, intersected across inputs, as the
edges do) and their records; a vertex with a missed input is missed without a
query (a key built on a result not made yet cannot be stored). If the root has
records, its fresh edge is *seeded*
with exactly what it would know had its inputs answered through pipes
(:meth:`ActiveEdge.seed <solver.engine._edge.ActiveEdge.seed>`); the build then goes
through the scheduler as usual and the root's edge loads its best record at its
first dispatch. Inner vertices get no edge at all. If the root missed, the
needed vertices run on the cold path (``_coldpath.py``), which completes their
edges.

An input with a content key (``compute_digest``) is looked up by its
definition keys, as its edge does first: a warm build whose definition keys all
match computes no content key on the edges either, so it is one key pass and one
load here too. A vertex with a content key that misses here is the cold path's:
it computes the key once the input has a result and may find it stored (an edit
that left the selected files as they were).

The pass gives up, leaving everything to the edges, as soon as a vertex is one
the edges must handle themselves: an ignore-cache vertex, one with cache sources,
one that already has an edge, an op whose cache map is not its only one, fails,
or is being computed by an edge; when two vertices may get equal keys (the
edges would merge them: ``_may_merge``) or a found key that the cold path must
load has no record; and on a cache error (the
edges report it, or work around it, as they do). It runs only while the live edge
index is empty, so no equal live edge is missed that the edges would have
merged with. What it did is not lost when it
gives up: cache maps stay memoized and cache queries only add links.

Counts are those of the edges: one cache map per vertex, one load for a warm
build, one exec per vertex for a cold one. Nothing here holds a handle; a
cancellation while the cache maps run cancels the requests, exactly as a
cancelled edge does. ``Job.build`` runs this in a task of the solver's shared by
every build of the same root (``_Pass`` in ``_jobs.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from .._cache import CacheKey, CacheKeyWithSelector, CacheRecord, ExportableCacheKey
from .._graph import Edge, Vertex, inputs_first
from ..cache import FoundKeyExporter, KeyExporter, best_record
from ._coldpath import ColdNode, needed_nodes, run_cold
from ._scheduler import Pipe
from ._sharedop import SharedOp

if TYPE_CHECKING:
    from .._cache import CacheManager
    from .._op import CacheMap

    # type-only: _jobs calls seed_cached_root with itself
    from ._jobs import Engine, VertexState

__all__ = ["seed_cached_root"]

logger = logging.getLogger("solver")


_NO_INPUTS: list[dict[str, CacheKey]] = []  # never written to


class _Found:
    """What the pass found for one vertex output."""

    __slots__ = ("by_input", "keys", "records")

    def __init__(
        self,
        by_input: list[dict[str, CacheKey]],
        keys: list[ExportableCacheKey],
        records: list[CacheRecord],
    ) -> None:
        # the stored keys each input's keys lead to (the edge's deps' key maps)
        self.by_input = by_input
        # the output's keys, as its edge would list them
        self.keys = keys
        self.records = records


async def seed_cached_root(solver: Engine, root: Edge) -> bool:
    """Resolve ``root``'s keys through its whole graph and, if the cache has a
    record for it, seed its fresh edge so that its first dispatch loads it;
    if not, build it on the cold path, which completes its edge.

    ``root`` is a loaded edge (its vertex and inputs are active). True if the
    edge was seeded or completed; False if the pass gave up (the edges do
    everything). Raises the error of an exec that failed on the cold path."""
    actives = solver._actives
    digest = root.vertex.digest
    root_state = actives.get(digest)
    if root_state is None or root_state.edges or len(solver._index):
        return False
    order, needed = inputs_first(root)
    states: list[VertexState] = []
    for v in order:
        st = actives.get(v.digest)
        if (
            st is None
            or st.edges
            or st.key != v.digest
            or st.sources
            or v.options.ignore_cache
        ):
            return False
        states.append(st)
    maps = await _cache_maps(solver, states)
    if maps is None:
        return False
    # The cache calls are not interrupted by the caller's cancellation (as the
    # dispatcher's are not): it takes effect when they are done, at the next
    # checkpoint. One shield for the whole pass.
    with anyio.CancelScope(shield=True):
        try:
            plan = await _resolve_and_seed(solver, root, root_state, order, needed, states, maps)
        except Exception:
            # A failing cache is the edges' to report (or to work around, as
            # they do for records and root keys): give up and let them.
            logger.debug("the cached path gave up on a cache error", exc_info=True)
            return False
    if plan is None or isinstance(plan, bool):
        return bool(plan)
    return await run_cold(solver, plan)


async def _resolve_and_seed(
    solver: Engine,
    root: Edge,
    root_state: VertexState,
    order: list[Vertex],
    needed: dict[str, list[int]],
    states: list[VertexState],
    maps: list[CacheMap],
) -> bool | list[ColdNode] | None:
    """True if the root was seeded; the cold run's nodes if the root must run;
    None or False if the edges must do the build."""
    found: dict[tuple[str, int], _Found | None] = {}
    top_vertex = root.vertex
    for layer in _layers(order, states, maps):
        await _resolve_layer(layer, needed, found, top_vertex)
    top = found[root.vertex.digest, root.index]
    # The awaits above may have let other builds in: go on only with a fresh
    # edge, only while no live edge could be merged with, and only while no
    # other build is on the edges (one whose cache map still runs may get a key
    # equal to one of this graph's, which the edges merge and this pass would
    # not: the op would run twice).
    if (
        solver._actives.get(root.vertex.digest) is not root_state
        or root_state.edges
        or len(solver._index)
        or solver._scheduler.building()
    ):
        return False
    if top is not None:
        if not top.records:
            return False
        leaf_inputs = [not inp.vertex.inputs for inp in root.vertex.inputs]
        input_keys = [
            found[inp.vertex.digest, inp.index].keys  # type: ignore[union-attr]
            for inp in root.vertex.inputs
        ]
        edge = root_state.get_edge(root.index)
        await edge.seed(maps[-1], top.by_input, input_keys, leaf_inputs, top.keys, top.records)
        return True
    return await _cold_plan(root, order, needed, states, maps, found)


async def _cold_plan(
    root: Edge,
    order: list[Vertex],
    needed: dict[str, list[int]],
    states: list[VertexState],
    maps: list[CacheMap],
    found: dict[tuple[str, int], _Found | None],
) -> list[ColdNode] | None:
    """The nodes of a cold run (``_coldpath.py``), with the record each needed
    found node loads; None if the edges must do it (two vertices whose keys
    may be equal, which they would merge: :func:`_may_merge`; a needed found
    key without a record)."""
    by_digest: dict[str, list[tuple[Vertex, CacheMap]]] = {}
    map_digest: dict[str, str] = {}
    nodes: dict[tuple[str, int], ColdNode] = {}
    for v, st, cache_map in zip(order, states, maps, strict=True):
        map_digest[v.digest] = cache_map.digest
        same = by_digest.setdefault(cache_map.digest, [])
        if len(same) >= _MAX_SHARED_DIGEST:
            # each is compared with the others: bounded, as the edges handle it
            return None
        for other, other_map in same:
            if _may_merge(v, cache_map, other, other_map, map_digest):
                return None
        same.append((v, cache_map))
        for out in needed[v.digest]:
            f = found[v.digest, out]
            nodes[v.digest, out] = ColdNode(st, out, cache_map, None if f is None else f.keys)
    run = needed_nodes(nodes, nodes[root.vertex.digest, root.index])
    for node in run:
        keys = node.found_keys
        if keys is None or not node.consumers:
            continue
        cache = node.state.combined_cache()
        records: list[CacheRecord] = []
        for k in keys:
            records.extend(await cache.records(k.key))
        rec = best_record(records)
        if rec is None:
            return None
        node.record = rec
    return run


# How many vertices of one graph may share a cache-map digest on the cold path
# (each is compared with the ones before it: O(n^2) beyond a few).
_MAX_SHARED_DIGEST = 64


def _may_merge(
    a: Vertex, a_map: CacheMap, b: Vertex, b_map: CacheMap, map_digest: dict[str, str]
) -> bool:
    """Whether two vertices with one cache-map digest may get equal keys (their
    edges would merge): both leaves (one root key), or, at every input place
    both have, inputs with one cache-map digest or a content key (which does
    not depend on the input's vertex). A merge of two objects and a merge of
    59 (``benchmarks/cbuild.py``) share the digest and cannot: an input's key
    is made of its own cache-map digest. Overlapping places are compared, not
    only equal counts: the live index finds a key by intersecting the links
    from its inputs' keys."""
    if not a.inputs or not b.inputs:
        return not a.inputs and not b.inputs
    for i, (x, y) in enumerate(zip(a.inputs, b.inputs, strict=False)):
        if (
            a_map.deps[i].compute_digest is None
            and b_map.deps[i].compute_digest is None
            and map_digest[x.vertex.digest] != map_digest[y.vertex.digest]
        ):
            return False
    return True


class _Answers:
    """Counts the answers to the cache-map requests of one pass."""

    __slots__ = ("done", "left")

    def __init__(self, left: int) -> None:
        self.left = left
        self.done = anyio.Event()

    def answered(self) -> None:
        self.left -= 1
        if not self.left:
            self.done.set()


async def _cache_maps(solver: Engine, states: list[VertexState]) -> list[CacheMap] | None:
    """The first cache map of every state's op, all requested at once; None if
    one failed, was cancelled, is not the op's only cache map or has the wrong
    number of deps."""
    answers = _Answers(len(states))
    pipes: list[Pipe] = []
    scheduler = solver._scheduler
    answered = answers.answered
    # Requested root first: the work pool runs the units queued newest first,
    # so the leaves' cache maps start first. A leaf's is the one that blocks (a
    # local source's stat check runs in a thread), and started first it runs
    # beside the others instead of after them all (brotli: 76 cache maps in
    # 2.9 ms, the local source's 1.5 ms of it, started last; see
    # docs/performance.md, "The embedded no-op build").
    for st in reversed(states):
        op = st.op
        if op is None:
            op = st.op = SharedOp(st)
        p = Pipe(scheduler, None, None)
        p.on_send = answered
        pipes.append(p)
        op.request_cache_map(p, 0)
    pipes.reverse()
    if answers.left:
        try:
            await answers.done.wait()
        except BaseException:
            # As a cancelled edge does: cancel what is still running and return
            # once it has stopped (a call shared with others goes on, and its
            # request here is answered at once).
            for p in pipes:
                if not p.send_completed:
                    p.cancel()
            with anyio.CancelScope(shield=True):
                await answers.done.wait()
            raise
    maps: list[CacheMap] = []
    for st, p in zip(states, pipes, strict=True):
        if p.send_err is not None:
            return None
        cache_map, done = p.send_value
        deps = cache_map.deps
        if not done or len(deps) != len(st.vtx.inputs):
            return None
        maps.append(cache_map)
    return maps


_Layer = list[tuple[Vertex, "VertexState", "CacheMap"]]


def _layers(order: list[Vertex], states: list[VertexState], maps: list[CacheMap]) -> list[_Layer]:
    """The vertices by depth (a leaf is 0, a vertex one more than its deepest
    input): each layer's keys need only the layers below it, so its queries go
    to the cache together."""
    depth: dict[str, int] = {}
    layers: list[_Layer] = []
    for v, st, cache_map in zip(order, states, maps, strict=True):
        d = 0
        for inp in v.inputs:
            di = depth[inp.vertex.digest] + 1
            if di > d:
                d = di
        depth[v.digest] = d
        while len(layers) <= d:
            layers.append([])
        layers[d].append((v, st, cache_map))
    return layers


_Request = tuple[list[CacheKeyWithSelector], int, str, int]


async def _resolve_layer(
    layer: _Layer,
    needed: dict[str, list[int]],
    found: dict[tuple[str, int], _Found | None],
    top_vertex: Vertex,
) -> None:
    """The stored keys of each needed output of the layer's vertices, the way
    their edges find them (``_root_keys``; ``probe_cache`` then
    ``_add_matched_keys``), with every query of the layer asked of the cache in
    one call where it can (``query_many``, as
    :class:`~solver.cache.KeyedCacheManager` has); for the top
    vertex, their records too. Below the top a key's records are read only if
    an export reaches it (:class:`FoundKeyExporter`). A vertex with a missed
    input is missed without a query (a key built on a result not made yet
    cannot be stored); one with an input that leads to no stored key, too."""
    # per cache: the queries, and per output asked, where its answers start
    batches: dict[int, tuple[CacheManager, list[_Request]]] = {}
    asked: list[tuple[Vertex, int, CacheManager, int, list[list[CacheKeyWithSelector]]]] = []
    for v, st, cache_map in layer:
        inputs = v.inputs
        missed = False
        for inp in inputs:
            if found[inp.vertex.digest, inp.index] is None:
                missed = True
                break
        outs = needed[v.digest]
        if missed:
            for out in outs:
                found[v.digest, out] = None
            continue
        cache = st.combined_cache()
        batch = batches.get(id(cache))
        if batch is None:
            batch = batches[id(cache)] = (cache, [])
        requests = batch[1]
        digest = cache_map.digest
        deps = cache_map.deps
        for out in outs:
            alternatives: list[list[CacheKeyWithSelector]] = []
            start = len(requests)
            if not inputs:
                requests.append(([], 0, digest, out))
            for i, inp in enumerate(inputs):
                input_found = found[inp.vertex.digest, inp.index]
                assert input_found is not None
                selector = deps[i].selector
                alts = [CacheKeyWithSelector(k, selector) for k in input_found.keys]
                alternatives.append(alts)
                requests.append((alts, i, digest, out))
            asked.append((v, out, cache, start, alternatives))
    answers: dict[int, list[list[CacheKey]]] = {}
    for key, (cache, requests) in batches.items():
        # a manager that batches (KeyedCacheManager.query_many), or one query each
        query_many = getattr(cache, "query_many", None)
        if query_many is not None:
            answers[key] = await query_many(requests)
        else:
            answers[key] = [await cache.query(*r) for r in requests]
    for v, out, cache, start, alternatives in asked:
        found[v.digest, out] = await _matched(
            cache, v, answers[id(cache)], start, alternatives, v is top_vertex
        )


async def _matched(
    cache: CacheManager,
    v: Vertex,
    answers: list[list[CacheKey]],
    start: int,
    alternatives: list[list[CacheKeyWithSelector]],
    top: bool,
) -> _Found | None:
    """What the answers from ``start`` on (one per input; one for a leaf) say of
    one output of ``v``: the stored keys every input leads to, as its edge would
    list them, with their records for the ``top`` vertex; None if none."""
    vertex = v.digest
    keys: list[ExportableCacheKey] = []
    records: list[CacheRecord] = []
    if not alternatives:
        for k in answers[start]:
            k.vertex = vertex
            keys.append(await _exportable(cache, k, top, records))
        return _Found(_NO_INPUTS, keys, records) if keys else None
    if not top:
        # Below the top only the matched keys are kept: the first input's
        # answer (fresh keys of this pass) narrowed by the others', by ID.
        first = answers[start]
        if not first:
            return None
        matched_keys = first
        for i in range(start + 1, start + len(alternatives)):
            ids = {k.id for k in answers[i]}
            matched_keys = [k for k in matched_keys if k.id in ids]
            if not matched_keys:
                return None
        seen: set[str] = set()
        for k in matched_keys:
            if k.id in seen:
                continue
            seen.add(k.id)
            k.vertex = vertex
            # a fresh key the pass alone holds: given its deps, not copied
            k.deps = alternatives if len(matched_keys) == 1 else [list(a) for a in alternatives]
            keys.append(ExportableCacheKey(k, FoundKeyExporter(k, cache)))
        return _Found(_NO_INPUTS, keys, records)
    # The top: what each input reached is kept for its edge (``ActiveEdge.seed``).
    by_input: list[dict[str, CacheKey]] = []
    matched: dict[str, CacheKey] | None = None
    for i in range(len(alternatives)):
        reached: dict[str, CacheKey] = {}
        for k in answers[start + i]:
            k.vertex = vertex
            if k.id not in reached:
                reached[k.id] = k
        by_input.append(reached)
        if matched is None:
            matched = reached
        else:
            matched = {kid: k for kid, k in matched.items() if kid in reached}
        if not matched:
            return None
    assert matched is not None
    for k in matched.values():
        merged = k.clone()
        merged.deps = [list(alts) for alts in alternatives]
        keys.append(await _exportable(cache, merged, top, records))
    return _Found(by_input, keys, records)


async def _exportable(
    cache: CacheManager, key: CacheKey, top: bool, records: list[CacheRecord]
) -> ExportableCacheKey:
    if not top:
        return ExportableCacheKey(key, FoundKeyExporter(key, cache))
    recs = await cache.records(key)
    records.extend(recs)
    return ExportableCacheKey(key, KeyExporter(key, recs))
