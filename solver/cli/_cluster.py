"""``solver build --cluster ADDRESS``: run the build's ops on a Dask cluster."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..remote import CLUSTER_ENV

if TYPE_CHECKING:
    from ..worker import Worker

__all__ = ["add_cluster_argument", "attached_cluster", "cluster_address"]


def add_cluster_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--cluster ADDRESS`` to ``parser``."""
    parser.add_argument(
        "--cluster",
        metavar="ADDRESS",
        default=None,
        help="run exec and file steps on the Dask cluster whose scheduler is at ADDRESS "
        f"(tcp://HOST:8786; default ${CLUSTER_ENV}, if set); needs the 'cluster' extra "
        "(docs/remote.md)",
    )


def cluster_address(given: str | None) -> str | None:
    """``--cluster``, else ``$SOLVER_CLUSTER`` (empty means none)."""
    if given:
        return given
    return os.environ.get(CLUSTER_ENV) or None


@contextlib.asynccontextmanager
async def attached_cluster(worker: Worker, address: str | None) -> AsyncIterator[None]:
    """The cluster at ``address`` (``None``: no cluster) attached to ``worker``
    (:meth:`DaskCluster.attach`) for the block, then closed."""
    if address is None:
        yield
        return
    from ..remote import DaskCluster  # imports dask: only with a cluster

    async with DaskCluster(address) as cluster:
        cluster.attach(worker)
        yield
