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

from ._cluster import (
    CLUSTER_ENV as CLUSTER_ENV,
    HELD_FUTURES as HELD_FUTURES,
    DaskCluster as DaskCluster,
    RemoteClusterError as RemoteClusterError,
)
from ._ops import RemoteOp as RemoteOp, attach_cluster as attach_cluster
from ._task import (
    HELD_SNAPSHOTS as HELD_SNAPSHOTS,
    RemoteOpError as RemoteOpError,
    RemoteOutcome as RemoteOutcome,
    RemoteTask as RemoteTask,
    run_op as run_op,
    worker_stats as worker_stats,
)

__all__ = [
    "CLUSTER_ENV",
    "HELD_FUTURES",
    "HELD_SNAPSHOTS",
    "DaskCluster",
    "RemoteClusterError",
    "RemoteOp",
    "RemoteOpError",
    "RemoteOutcome",
    "RemoteTask",
    "attach_cluster",
    "run_op",
    "worker_stats",
]
