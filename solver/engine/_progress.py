"""Progress per job: every job sees the events of every vertex it uses.

Every active vertex keeps the events it emitted (so a job that joins a shared
vertex late still sees what happened before it came) and forwards new ones to
every job that uses it, including jobs that reach it through a nested build or a
merge. A job reads its events with ``Job.status()``; this module holds each job's
buffer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import anyio

from .._progress import ProgressEvent

__all__ = ["JobProgress"]


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
