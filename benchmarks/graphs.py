"""Graphs of no-op vertices for the benchmarks, built without recursion.

Every benchmark drives the engine with :class:`NoopVertex`: a vertex that is its
own op, answers one precomputed cache map and returns a :class:`NoopResult`, so
what is timed is the engine's own work per vertex. Each vertex counts its
``exec`` calls (a plain int on the vertex: no shared counter on the hot path), so
a run can check that every op ran exactly once.

A :class:`Graph` is ``(top, vertices)`` with ``vertices`` in inputs-first order
(every vertex after its inputs), so ``top, every = lattice(n)`` unpacks it. All
builders are iterative: a 100k-vertex chain or tree is built (and walked) without
touching the recursion limit.

Shapes (each takes the number of vertices ``n`` and makes exactly ``n``):

* :func:`chain`: ``v0 <- v1 <- ... <- v(n-1)``, the deepest graph;
* :func:`fan`: one root, ``n - 2`` vertices on it, one top on all of them (the
  widest vertex: ``n - 2`` inputs);
* :func:`lattice`: layers of ``width`` vertices, each on two vertices of the layer
  below, and one top on the last layer;
* :func:`random_graph`: the shape of BuildKit's ``generateSubGraph`` (the random
  sum/const tree of its scheduler tests, ``tests/harness.py``), drawn with the same
  random calls in the same order, so a seed gives the same tree as
  ``generate_sub_graph(n, random.Random(seed))``. The values are dropped and every
  vertex gets its own cache key, so each op is distinct work, as it is for the
  baselines (BuildKit's keys make equal consts share a key, which would turn part
  of the graph into merges and cache loads).

:func:`with_leaf_changed` rebuilds a graph with one leaf replaced by a new vertex
and says how many vertices that makes dirty (the leaf and its dependants) and
how many unchanged results a warm re-solve of it has to load.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from solver import Builder, CacheMap, CacheMapDep, Edge, VertexOptions, digest_of

__all__ = [
    "SHAPES",
    "Graph",
    "LeafChange",
    "NoopResult",
    "NoopVertex",
    "chain",
    "exec_counts",
    "fan",
    "lattice",
    "random_graph",
    "reset_exec_counts",
    "resolve_op",
    "with_leaf_changed",
]

_OPTIONS = VertexOptions()
_result_ids = itertools.count()


class NoopResult:
    """The result of a no-op: a unique ID and nothing to release."""

    __slots__ = ("_id",)

    def __init__(self, id: str) -> None:
        self._id = id

    @property
    def id(self) -> str:
        return self._id

    @property
    def sys(self) -> object:
        return self

    async def release(self) -> None:
        pass

    def clone(self) -> NoopResult:
        return self


class NoopVertex:
    """A vertex that is its own op and does nothing but count its execs.

    ``digest`` covers the name and the inputs' digests; the cache map's digest
    covers the name, so the cache key covers the name and the inputs' keys.
    """

    __slots__ = ("_cache_map", "_inputs", "digest", "execs", "name")

    def __init__(self, name: str, inputs: Sequence[Edge]) -> None:
        self.name = name
        self._inputs = tuple(inputs)
        self.digest = digest_of("|".join([name, *(e.vertex.digest for e in inputs)]).encode())
        self._cache_map = CacheMap(
            digest_of(f"seed:{name}".encode()),
            [CacheMapDep() for _ in inputs],
        )
        self.execs = 0

    def __repr__(self) -> str:
        return f"<NoopVertex {self.name} inputs={len(self._inputs)} execs={self.execs}>"

    @property
    def inputs(self) -> Sequence[Edge]:
        return self._inputs

    @property
    def options(self) -> VertexOptions:
        return _OPTIONS

    @property
    def sys(self) -> NoopVertex:
        return self

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return self._cache_map, True

    async def exec(self, inputs: Sequence[object]) -> Sequence[NoopResult]:
        self.execs += 1
        return [NoopResult(str(next(_result_ids)))]


def resolve_op(v: object, b: Builder) -> NoopVertex:
    """The ``resolve_op`` for graphs of :class:`NoopVertex`: the vertex is the op."""
    op = getattr(v, "sys", None)
    if not isinstance(op, NoopVertex):
        raise TypeError(f"not a NoopVertex: {v!r}")
    return op


class Graph(NamedTuple):
    """A graph of no-op vertices: its top and every vertex, inputs first."""

    top: NoopVertex
    vertices: list[NoopVertex]


def reset_exec_counts(graph: Graph) -> None:
    for v in graph.vertices:
        v.execs = 0


def exec_counts(graph: Graph) -> tuple[int, int]:
    """``(total execs, execs of the vertex that ran most)``."""
    total = most = 0
    for v in graph.vertices:
        total += v.execs
        most = max(most, v.execs)
    return total, most


def chain(n: int) -> Graph:
    """``n`` vertices, each on the one before."""
    if n < 1:
        raise ValueError("a graph needs at least 1 vertex")
    prev = NoopVertex("c0", ())
    every = [prev]
    for i in range(1, n):
        prev = NoopVertex(f"c{i}", (Edge(prev),))
        every.append(prev)
    return Graph(prev, every)


def fan(n: int) -> Graph:
    """One root, ``n - 2`` vertices on the root, and a top on all of those."""
    if n < 3:
        raise ValueError("a fan needs at least 3 vertices")
    root = NoopVertex("f-root", ())
    middle = [NoopVertex(f"f{i}", (Edge(root),)) for i in range(n - 2)]
    top = NoopVertex("f-top", [Edge(v) for v in middle])
    return Graph(top, [root, *middle, top])


def lattice(n: int, width: int = 100) -> Graph:
    """Layers of ``width`` vertices, each on vertices ``i`` and ``i + 1`` (mod
    ``width``) of the layer below, then one top on the last layer: ``n`` vertices
    when ``n - 1`` is a multiple of ``width``, otherwise the last layer is partial."""
    if n < 2:
        raise ValueError("a lattice needs at least 2 vertices")
    width = min(width, n - 1)
    prev = [NoopVertex(f"l0-{i}", ()) for i in range(width)]
    every = list(prev)
    layer = 0
    while len(every) < n - 1:
        layer += 1
        count = min(width, n - 1 - len(every))
        below = len(prev)
        cur = [
            NoopVertex(f"l{layer}-{i}", (Edge(prev[i % below]), Edge(prev[(i + 1) % below])))
            for i in range(count)
        ]
        every.extend(cur)
        prev = cur
    top = NoopVertex("l-top", [Edge(v) for v in prev])
    every.append(top)
    return Graph(top, every)


@dataclass(slots=True, eq=False)
class _SubGraph:
    """A pending call ``generateSubGraph(nodes)`` on the explicit stack."""

    nodes: int
    inc: int = 0
    added: int = 0
    started: bool = False
    inputs: list[Edge] = field(default_factory=list)


def random_graph(n: int, seed: int = 0) -> Graph:
    """BuildKit's random sum/const tree of ``n`` vertices (see the module docstring).

    Each call of ``generateSubGraph(nodes)`` with ``nodes > 1`` makes a sum vertex
    over 2 to 6 sub-graphs that share ``nodes - 1`` vertices; ``nodes == 1`` is a
    const leaf. The recursion is run on an explicit stack.
    """
    if n < 1:
        raise ValueError("a graph needs at least 1 vertex")
    rng = random.Random(seed)
    names = itertools.count()
    every: list[NoopVertex] = []
    stack = [_SubGraph(n)]
    top: NoopVertex | None = None
    while stack:
        call = stack[-1]
        done: NoopVertex | None = None
        if call.nodes == 1:
            rng.randrange(500)  # the const's value
            done = NoopVertex(f"const{next(names)}", ())
        elif not call.started:
            call.started = True
            spread = rng.randrange(5) + 2
            call.inc = min(-(-call.nodes // spread), call.nodes)
            call.added = 1
        if done is None:
            if call.added < call.nodes:
                if call.added + call.inc > call.nodes:
                    call.inc = call.nodes - call.added
                call.added += call.inc
                stack.append(_SubGraph(call.inc))
                continue
            rng.randrange(500)  # the sum's extra value
            done = NoopVertex(f"sum{next(names)}", call.inputs)
        every.append(done)
        stack.pop()
        if stack:
            stack[-1].inputs.append(Edge(done))
        else:
            top = done
    assert top is not None
    return Graph(top, every)


SHAPES: dict[str, Callable[[int], Graph]] = {
    "chain": chain,
    "fan": fan,
    "lattice": lattice,
    "random": random_graph,
}


class LeafChange(NamedTuple):
    """A graph with one leaf replaced.

    ``dirty`` counts the new leaf and every vertex that depends on it: what a
    warm re-solve must run. ``clean_inputs`` counts the unchanged vertices that
    are inputs of dirty ones: the cache loads it needs.
    """

    graph: Graph
    leaf: NoopVertex
    dirty: int
    clean_inputs: int


def with_leaf_changed(graph: Graph, leaf_index: int = 0) -> LeafChange:
    """``graph`` with its ``leaf_index``-th leaf (in ``graph.vertices`` order)
    replaced by a new vertex with another name and cache key.

    Every dependant of the leaf is rebuilt with the same name (so the same cache
    map digest) on the new inputs, so its digest and cache key change too; the
    rest of the graph is shared with ``graph``. Iterative, O(vertices).
    """
    leaves = [v for v in graph.vertices if not v.inputs]
    old = leaves[leaf_index]
    new_leaf = NoopVertex(f"{old.name}-changed", ())
    replaced: dict[int, NoopVertex] = {id(old): new_leaf}
    clean_inputs: set[int] = set()
    every: list[NoopVertex] = []
    for v in graph.vertices:
        if v is old:
            every.append(new_leaf)
            continue
        if any(id(e.vertex) in replaced for e in v.inputs):
            clean_inputs.update(id(e.vertex) for e in v.inputs if id(e.vertex) not in replaced)
            inputs = [Edge(replaced.get(id(e.vertex), e.vertex), e.index) for e in v.inputs]
            nv = NoopVertex(v.name, inputs)
            replaced[id(v)] = nv
            every.append(nv)
        else:
            every.append(v)
    top = replaced.get(id(graph.top), graph.top)
    return LeafChange(Graph(top, every), new_leaf, len(replaced), len(clean_inputs))
