"""Progress events: what a vertex is doing, and how a running op reports output.

The vocabulary shared by the engine (which emits events and delivers them to
jobs: :mod:`solver.engine`), the ops that log (:func:`log_output`, used by the
built-in worker's ``exec``) and the renderers of the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CACHED",
    "COMPLETED",
    "ERROR",
    "LOG",
    "STARTED",
    "WAITING",
    "ProgressEvent",
    "current_cache_source",
    "current_log",
    "current_wait",
    "log_output",
    "report_cache_source",
    "report_waiting",
]

STARTED: Final = "started"
COMPLETED: Final = "completed"
CACHED: Final = "cached"
ERROR: Final = "error"
LOG: Final = "log"
WAITING: Final = "waiting"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One thing that happened to one vertex.

    ``status`` is one of ``"started"``, ``"completed"``, ``"cached"`` (the result
    came from a cache), ``"error"`` (``error`` holds the message: ``"canceled"``
    for a step that was cancelled because no job wanted it any more) or ``"log"``
    (``data`` holds output bytes from ``stream``: 1 for stdout, 2 for stderr).
    ``timestamp`` is ``time.time()`` when it happened. ``cache_source`` says,
    for a ``"cached"`` event whose result was loaded, which cache it came from:
    ``"memory"`` (an in-memory cache), ``"local"`` (the solver's persistent main
    cache: the worker's store) or ``"import"`` (a cache source, such as an
    imported cache directory); ``None`` for every other event, and for an op
    shown as cached because its result was not needed (a later op's was loaded).
    A ``"completed"`` event has a ``cache_source`` when the op's ``exec`` found
    its outputs in a cache it consults itself rather than running
    (:func:`report_cache_source`): ``"shared"`` for a step the shared cache
    restored (``docs/shared-cache.md``).

    ``"waiting"`` (added in issue 21; consumers that do not know it may ignore
    it) comes before ``"started"`` when the op has to wait for a resource before
    it can start, such as a slot of ``Worker(max_parallelism=N)``
    (:func:`report_waiting`): the step is ready but not running yet. Its
    ``"started"`` comes when it holds the resource.
    """

    vertex: str
    name: str
    status: str
    timestamp: float
    error: str | None = None
    data: bytes = b""
    stream: int = 0
    cache_source: str | None = None


# Set by the engine while an op's exec runs: emits a log event for that vertex.
current_log: ContextVar[Callable[[bytes, int], None] | None] = ContextVar(
    "solver_current_log", default=None
)


def log_output(data: bytes, stream: int = 1) -> None:
    """Report output of the op that is running now (1 = stdout, 2 = stderr).

    Called from inside an op's ``exec``, it becomes a ``"log"`` event of that
    vertex in the status stream of every job that uses it. Elsewhere it does
    nothing. O(jobs watching the vertex)."""
    emit = current_log.get()
    if emit is not None and data:
        emit(data, stream)


# Set by the engine while an op's exec runs: collects what report_cache_source says.
current_cache_source: ContextVar[list[str] | None] = ContextVar(
    "solver_current_cache_source", default=None
)


def report_cache_source(source: str) -> None:
    """Say, from inside an op's ``exec``, that its outputs came from a cache the
    op consults itself (``source``, e.g. ``"shared"``) instead of from running
    it. The op's ``"completed"`` event then carries ``cache_source=source``, and
    a build's summary counts the op as cached from there. Elsewhere it does
    nothing. O(1)."""
    box = current_cache_source.get()
    if box is not None:
        box.append(source)


# Set by the engine while an op's acquire() is entered: emits a "waiting" event
# for that vertex.
current_wait: ContextVar[Callable[[], None] | None] = ContextVar(
    "solver_current_wait", default=None
)


def report_waiting() -> None:
    """Say, from inside an op's ``acquire()`` (``Op`` in the contract), that the
    op must wait for the resource before it can start (every slot of the
    worker's bound is taken). The vertex then has a ``"waiting"`` event in the
    status stream of every job that uses it, before its ``"started"``.
    Elsewhere it does nothing. O(jobs watching the vertex)."""
    emit = current_wait.get()
    if emit is not None:
        emit()
