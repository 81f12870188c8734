"""The engine: jobs, active vertices, the scheduler and the work it runs.

After BuildKit's ``solver/`` package. It works on vertices, ops, cache managers
and results, and imports nothing of definitions, the solve layer, the worker,
the command line or frontends. :class:`Engine` is the core of
:class:`~solver.Solver` (which :mod:`solver.bridge` composes from it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._jobs import (
        Engine as Engine,
        Job as Job,
        LoadedVertex as LoadedVertex,
        VertexState as VertexState,
    )

_exports = LazyExports(
    globals(),
    {
        "._jobs": ("Engine", "Job", "LoadedVertex", "VertexState"),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
