"""The build graph: vertices and the edges between them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._cache import CacheManager

__all__ = ["Edge", "Vertex", "VertexOptions"]


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
