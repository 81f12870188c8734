"""Progress: what each vertex is doing, as a stream of events per job.

Every active vertex keeps the events it emitted (so a job that joins a shared
vertex late still sees what happened before it came) and forwards new ones to
every job that uses it, including jobs that reach it through a nested build or a
merge. A job reads its events with ``Job.status()``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

import anyio

__all__ = [
    "CACHED",
    "COMPLETED",
    "ERROR",
    "LOG",
    "STARTED",
    "JobProgress",
    "ProgressEvent",
    "log_output",
]

STARTED: Final = "started"
COMPLETED: Final = "completed"
CACHED: Final = "cached"
ERROR: Final = "error"
LOG: Final = "log"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One thing that happened to one vertex.

    ``status`` is one of ``"started"``, ``"completed"``, ``"cached"`` (the result
    came from a cache), ``"error"`` (``error`` holds the message) or ``"log"``
    (``data`` holds output bytes from ``stream``: 1 for stdout, 2 for stderr).
    ``timestamp`` is ``time.time()`` when it happened.
    """

    vertex: str
    name: str
    status: str
    timestamp: float
    error: str | None = None
    data: bytes = b""
    stream: int = 0


def make_event(
    vertex: str,
    name: str,
    status: str,
    error: BaseException | str | None = None,
    data: bytes = b"",
    stream: int = 0,
) -> ProgressEvent:
    text = None if error is None else (str(error) or type(error).__name__)
    return ProgressEvent(vertex, name, status, time.time(), text, data, stream)


class JobProgress:
    """The event buffer of one job; read it with :meth:`events`."""

    __slots__ = ("_buffer", "_closed", "_wakeup", "watching")

    def __init__(self) -> None:
        # the keys of the vertex states that forward their events here
        self.watching: set[str] = set()
        self._buffer: list[ProgressEvent] = []
        self._closed = False
        self._wakeup: anyio.Event | None = None

    def put(self, event: ProgressEvent) -> None:
        if self._closed:
            return
        self._buffer.append(event)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    @staticmethod
    def fan_out(watchers: Iterable[JobProgress], event: ProgressEvent) -> None:
        """``put`` ``event`` into each of ``watchers`` (one loop, no call per
        watcher: K jobs watching one graph receive every event of it)."""
        for w in watchers:
            if not w._closed:
                w._buffer.append(event)
                wakeup = w._wakeup
                if wakeup is not None:
                    w._wakeup = None
                    wakeup.set()

    def close(self) -> None:
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    @property
    def closed(self) -> bool:
        return self._closed

    async def events(self) -> AsyncIterator[ProgressEvent]:
        """Every event so far, then new ones until the job is discarded."""
        pos = 0
        while True:
            while pos < len(self._buffer):
                yield self._buffer[pos]
                pos += 1
            if self._closed:
                return
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            await self._wakeup.wait()


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
