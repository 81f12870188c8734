"""The build graph: vertices and the edges between them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._cache import CacheManager

__all__ = ["Edge", "Vertex", "VertexOptions", "inputs_first"]


@dataclass(frozen=True, slots=True, eq=False)
class VertexOptions:
    """Options of a vertex. None of them change the vertex digest.

    ``ignore_cache`` forces the vertex to run even when a cached result exists (its
    result is still saved). ``cache_sources`` are extra cache managers to look
    results up in. ``description`` is free-form metadata for progress and errors.
    """

    ignore_cache: bool = False
    cache_sources: Sequence[CacheManager] = ()
    description: Mapping[str, str] = field(default_factory=dict)


DEFAULT_OPTIONS = VertexOptions()


@runtime_checkable
class Vertex(Protocol):
    """One unit of work in a build graph.

    ``digest`` identifies the vertex together with its whole input subgraph: two
    vertices with the same digest are the same work. ``sys`` is the op payload,
    opaque to the scheduler and handed to ``resolve_op``.
    """

    @property
    def digest(self) -> str: ...

    @property
    def inputs(self) -> Sequence[Edge]: ...

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> VertexOptions: ...

    @property
    def sys(self) -> object: ...


@dataclass(frozen=True, slots=True)
class Edge:
    """One output (``index``) of one vertex."""

    vertex: Vertex
    index: int = 0


def inputs_first(root: Edge) -> tuple[list[Vertex], dict[str, list[int]]]:
    """The vertices of ``root``'s graph, every one after its inputs (inputs in
    their order), and the outputs of each (by digest) that the graph uses, in the
    order first met. Iterative: any depth. O(vertices + inputs)."""
    used: dict[str, list[int]] = {root.vertex.digest: [root.index]}
    order: list[Vertex] = []
    visited: set[str] = set()
    stack: list[tuple[Vertex, bool]] = [(root.vertex, False)]
    while stack:
        v, expanded = stack.pop()
        if expanded:
            order.append(v)
            continue
        if v.digest in visited:
            continue
        visited.add(v.digest)
        stack.append((v, True))
        # reversed: the first input is expanded first, so the order follows the
        # definition's input order (deterministic, and what a reader expects)
        for inp in reversed(v.inputs):
            d = inp.vertex.digest
            outs = used.setdefault(d, [])
            if inp.index not in outs:
                outs.append(inp.index)
            if d not in visited:
                stack.append((inp.vertex, False))
    return order, used
