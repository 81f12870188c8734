"""Remote workers: the built-in worker's ops run on a Dask distributed cluster.

::

    async with Worker(root) as worker, DaskCluster("tcp://scheduler:8786") as cluster:
        async with Solver(worker=worker, cluster=cluster) as solver:
            async with await solver.solve(defn) as result:
                ...

The engine keeps scheduling, cache keys and single-flight in this process; each
``exec`` and ``file`` op runs on a Dask worker, its inputs moved by content digest
and its outputs brought back into the local store (``docs/remote.md``). Needs the
``cluster`` extra: ``pip install 'solver-engine[cluster]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._cluster import (
        HELD_FUTURES as HELD_FUTURES,
        DaskCluster as DaskCluster,
        RemoteClusterError as RemoteClusterError,
    )
    from ._env import CLUSTER_ENV as CLUSTER_ENV
    from ._ops import RemoteOp as RemoteOp, attach_cluster as attach_cluster
    from ._task import (
        HELD_SNAPSHOTS as HELD_SNAPSHOTS,
        RemoteOpError as RemoteOpError,
        RemoteOutcome as RemoteOutcome,
        RemoteTask as RemoteTask,
        run_op as run_op,
        worker_stats as worker_stats,
    )

_exports = LazyExports(
    globals(),
    {
        "._cluster": ("HELD_FUTURES", "DaskCluster", "RemoteClusterError"),
        "._env": ("CLUSTER_ENV",),
        "._ops": ("RemoteOp", "attach_cluster"),
        "._task": (
            "HELD_SNAPSHOTS", "RemoteOpError", "RemoteOutcome", "RemoteTask", "run_op",
            "worker_stats",
        ),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
