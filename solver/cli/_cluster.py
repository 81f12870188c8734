"""``solver build --cluster ADDRESS``: run the build's ops on a Dask cluster."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

from ..remote import CLUSTER_ENV, DaskCluster

__all__ = ["add_cluster_argument", "cluster_address", "open_cluster"]


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
async def open_cluster(address: str | None) -> AsyncIterator[DaskCluster | None]:
    """The open cluster at ``address`` (``None``: no cluster), closed after."""
    if address is None:
        yield None
        return
    async with DaskCluster(address) as cluster:
        yield cluster
