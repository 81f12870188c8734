"""Cache imports and exports around one solve.

A :class:`~solver.SolveRequest` may name cache directories to import
(:class:`~solver.LocalCacheImport`, opened for the solve and closed after it) and
to export the result's cache to (:class:`~solver.LocalCacheExport`). This module
opens the imports, adds them as cache sources of every vertex of the graph (as
BuildKit's ``llbsolver.Load`` does), and runs the exports once the result is
built. The directory format itself is :mod:`solver.cache`'s; the codec that packs
a result into a blob defaults to the built-in worker's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import anyio

from .._cache import CacheManager
from .._errors import SolveError
from .._graph import Edge, Vertex, VertexOptions

# The directory format (and the worker's blob codec, and tarfile) is imported by
# a solve that imports or exports a cache, not by every solve: a command-line
# build pays for each module it imports (docs/performance.md, "CLI start-up").
if TYPE_CHECKING:
    from .._cache import ExportableCacheKey
    from .._result import CachedResult
    from ..cache import (
        CacheBlobCodec,
        LocalCacheExport,
        LocalCacheExportStats,
        LocalCacheImport,
        LocalCacheSource,
    )
    from ..engine import Job

__all__ = [
    "build_with_caches",
    "default_codec",
    "opened_imports",
    "run_exports",
    "with_cache_sources",
]


def default_codec(worker: object | None, what: str) -> CacheBlobCodec:
    """The codec of a solver's built-in ``worker`` (:class:`~solver.worker.Worker`);
    :class:`~solver.SolveError` naming ``what`` if there is none."""
    store = getattr(worker, "store", None)
    if store is None:
        raise SolveError(f"{what} needs a codec: this solver has no built-in worker")
    from ..worker import SnapshotBlobCodec

    return SnapshotBlobCodec(store)


@contextlib.asynccontextmanager
async def opened_imports(
    imports: Sequence[LocalCacheImport | CacheManager], worker: object | None
) -> AsyncIterator[list[CacheManager]]:
    """The cache managers of ``imports`` for one solve: a :class:`LocalCacheImport`
    is opened here and closed on exit; a manager given as is stays the caller's."""
    managers: list[CacheManager] = []
    opened: list[LocalCacheSource] = []
    try:
        for spec in imports:
            from ..cache import LocalCacheImport, open_local_cache

            if isinstance(spec, LocalCacheImport):
                codec = spec.codec or default_codec(worker, f"importing {spec.src}")
                source = await open_local_cache(spec.src, codec)
                opened.append(source)
                managers.append(source)
            else:
                managers.append(spec)
        yield managers
    finally:
        with anyio.CancelScope(shield=True):
            for source in opened:
                await source.close()


async def run_exports(
    result: CachedResult | Sequence[CachedResult],
    exports: Sequence[LocalCacheExport],
    worker: object | None,
) -> list[LocalCacheExportStats]:
    """Run each export of a solve request on its result (or on all the results of
    a frontend's solve: their records go into one index per export)."""
    if isinstance(result, Sequence):
        source: CachedResult | list[ExportableCacheKey] = [
            key for r in result for key in r.cache_keys
        ]
    else:
        source = result
    stats = []
    for spec in exports:
        from ..cache import export_local_cache

        codec = spec.codec or default_codec(worker, f"exporting to {spec.dest}")
        stats.append(
            await export_local_cache(
                source, spec.dest, codec, mode=spec.mode, export_roots=spec.export_roots
            )
        )
    return stats


@dataclass(frozen=True, slots=True, eq=False)
class _SourcedVertex:
    # a vertex with extra cache sources; everything else is the original's
    orig: Vertex
    inputs: tuple[Edge, ...]
    options: VertexOptions

    @property
    def digest(self) -> str:
        return self.orig.digest

    @property
    def name(self) -> str:
        return self.orig.name

    @property
    def sys(self) -> object:
        return self.orig.sys

    def __repr__(self) -> str:
        caches = len(self.options.cache_sources)
        return f"<Vertex {self.name!r} {self.digest[:19]} with {caches} cache source(s)>"


def with_cache_sources(edge: Edge, sources: Sequence[CacheManager]) -> Edge:
    """``edge`` with ``sources`` added to the ``cache_sources`` of every vertex of
    its graph (as BuildKit's ``llbsolver.Load`` does with cache imports). Digests,
    names, ops and other options are unchanged. Without recursion; O(vertices +
    inputs)."""
    if not sources:
        return edge
    extra = tuple(sources)
    memo: dict[int, Vertex] = {}
    stack: list[tuple[Vertex, bool]] = [(edge.vertex, False)]
    while stack:
        v, expanded = stack.pop()
        if id(v) in memo:
            continue
        if not expanded:
            stack.append((v, True))
            stack.extend((e.vertex, False) for e in v.inputs if id(e.vertex) not in memo)
            continue
        options = replace(v.options, cache_sources=(*v.options.cache_sources, *extra))
        inputs = tuple(Edge(memo[id(e.vertex)], e.index) for e in v.inputs)
        memo[id(v)] = _SourcedVertex(v, inputs, options)
    return Edge(memo[id(edge.vertex)], edge.index)


async def build_with_caches(
    job: Job,
    edge: Edge,
    imports: Sequence[LocalCacheImport | CacheManager],
    exports: Sequence[LocalCacheExport],
    worker: object | None,
) -> CachedResult:
    """``job.build(edge)`` with ``imports`` as cache sources of every vertex, then
    ``exports`` run on the result (while the imports are still open: an imported
    record is exported by copying its blob). The result is the caller's; if an
    export fails it is released and the error raised."""
    result: CachedResult | None = None
    try:
        async with opened_imports(imports, worker) as sources:
            result = await job.build(with_cache_sources(edge, sources))
            await run_exports(result, exports, worker)
    except BaseException:
        # an export, or closing the imports, failed or was cancelled
        if result is not None:
            with anyio.CancelScope(shield=True):
                await result.release()
        raise
    return result
