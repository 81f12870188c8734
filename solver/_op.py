"""Ops: what a vertex does, and how its cache key is computed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._graph import Edge, Vertex

if TYPE_CHECKING:
    from ._result import CachedResult, Result

__all__ = ["Builder", "CacheMap", "CacheMapDep", "ComputeDigest", "Op", "ResolveOp"]

ComputeDigest = Callable[["Result"], Awaitable[str]]
"""A content ("slow") cache key function: the digest of an evaluated input."""


@dataclass(frozen=True, slots=True)
class CacheMapDep:
    """How one input takes part in the cache key.

    ``selector`` is a digest mixed into the link from that input's key (which part
    of the input matters). ``compute_digest`` computes a content key from the
    input's evaluated result; it is called at most once per active vertex and input.
    """

    selector: str | None = None
    compute_digest: ComputeDigest | None = None


@dataclass(frozen=True, slots=True, eq=False)
class CacheMap:
    """The op's own cache digest and one :class:`CacheMapDep` per input."""

    digest: str
    deps: Sequence[CacheMapDep] = ()


@runtime_checkable
class Op(Protocol):
    """The work behind one vertex.

    ``cache_map(index)`` is asked with 0, 1, 2, ... until it answers ``done=True``;
    only an op without inputs may answer more than one map. ``exec`` returns one
    result per output and runs once per active vertex. An op may also define
    ``acquire()``, an async context manager entered around ``exec`` to limit
    parallelism.
    """

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]: ...

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]: ...


@runtime_checkable
class Builder(Protocol):
    """What an op may use to solve a nested edge; the result belongs to the op."""

    async def build(self, edge: Edge) -> CachedResult: ...


ResolveOp = Callable[[Vertex, Builder], Op]
"""Turns a vertex into its op; called once per active vertex."""
