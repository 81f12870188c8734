"""The environment variable that names a Dask scheduler: ``--cluster``'s default.

A module of its own so that the command line reads it without importing the
cluster code (``_cluster``, ``_task``): a build without a cluster imports
neither (``docs/performance.md``, "CLI start-up").
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLUSTER_ENV"]

CLUSTER_ENV: Final = "SOLVER_CLUSTER"
"""The environment variable ``solver build`` reads a scheduler address from when
``--cluster`` is not given."""
