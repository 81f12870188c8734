"""What the engine is measured against, on the same graphs of no-op vertices.

* :func:`naive`: the least a correct async executor does: one task and one
  ``anyio.Event`` per vertex, each task waits for its inputs' events, asks the op
  for its cache map and runs it. No cache, no dedupe, no reference counting.
* :func:`run_dask`: dask's synchronous scheduler (``dask.get``) on the equivalent
  dask graph (:func:`dask_graph`): one task of a no-op function per vertex. dask
  is optional (the ``bench`` extra); :func:`dask_get` is ``None`` without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio

from benchmarks.graphs import Graph, NoopVertex

__all__ = ["DaskGraph", "dask_get", "dask_graph", "naive", "run_dask"]

DaskGraph = dict[str, tuple[Any, ...]]


async def naive(every: Sequence[NoopVertex]) -> None:
    """Run every vertex once, inputs first: one task and one event per vertex."""
    events = {id(v): anyio.Event() for v in every}
    results: dict[int, object] = {}

    async def run(v: NoopVertex) -> None:
        for e in v.inputs:
            await events[id(e.vertex)].wait()
        await v.cache_map(0)
        out = await v.exec([results[id(e.vertex)] for e in v.inputs])
        results[id(v)] = out[0]
        events[id(v)].set()

    async with anyio.create_task_group() as tg:
        for v in every:
            tg.start_soon(run, v)


def _load_dask_get() -> Callable[..., Any] | None:
    try:
        from dask.local import get_sync
    except ImportError:
        return None
    get: Callable[..., Any] = get_sync
    return get


#: ``dask.get`` (``dask.local.get_sync``, the synchronous scheduler), or ``None``
#: if dask is not installed.
dask_get = _load_dask_get()


def _noop(*inputs: object) -> None:
    return None


def dask_graph(graph: Graph) -> tuple[DaskGraph, str]:
    """The dask graph of ``graph`` (one ``(noop, *input keys)`` task per vertex,
    keyed by vertex name) and the key of its top."""
    dsk: DaskGraph = {v.name: (_noop, *(e.vertex.name for e in v.inputs)) for v in graph.vertices}
    return dsk, graph.top.name


def run_dask(dsk: DaskGraph, key: str) -> None:
    """Compute ``key`` of ``dsk`` with dask's synchronous scheduler."""
    if dask_get is None:
        raise RuntimeError("dask is not installed: pip install -e '.[bench]'")
    dask_get(dsk, key)
