"""Progress per job: every job sees the events of every vertex it uses.

Every active vertex keeps the events it emitted (so a job that joins a shared
vertex late still sees what happened before it came) and forwards new ones to
every job that uses it, including jobs that reach it through a nested build or a
merge. A job reads its events with ``Job.status()``; this module holds each job's
buffer.

Events are kept as *records*: plain tuples of the event's fields, in
:class:`~solver.ProgressEvent`'s order, made into events only when a job reads
them. A tuple of strings, numbers and bytes is one the cyclic collector stops
tracking the first time it looks at it, while an event object (a slotted
dataclass) is tracked for as long as it lives; a cold build keeps two events per
vertex in its job's buffer and the vertex's history until the job is
discarded, and every full collection walked them (``docs/performance.md``, "Issue
13: the cold build's objects"). A record whose event carries an error message
holds a string like every other field; nothing else goes in one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

import anyio

from .._progress import ProgressEvent

__all__ = ["EventRecord", "JobProgress", "event_record"]

# (vertex, name, status, timestamp, error, data, stream, cache_source)
EventRecord = tuple[str, str, str, float, str | None, bytes, int, str | None]


def event_record(
    vertex: str,
    name: str,
    status: str,
    error: BaseException | str | None = None,
    data: bytes = b"",
    stream: int = 0,
    cache_source: str | None = None,
) -> EventRecord:
    """The record of an event that happens now, in :class:`ProgressEvent`'s field
    order (an exception becomes its message, or its type's name)."""
    text = None if error is None else (str(error) or type(error).__name__)
    return (vertex, name, status, time.time(), text, data, stream, cache_source)


class JobProgress:
    """The event buffer of one job; read it with :meth:`events`."""

    __slots__ = ("_buffer", "_closed", "_wakeup", "watching")

    def __init__(self) -> None:
        # the keys of the vertex states that forward their events here
        self.watching: set[str] = set()
        self._buffer: list[EventRecord] = []
        self._closed = False
        self._wakeup: anyio.Event | None = None

    def put(self, record: EventRecord) -> None:
        if self._closed:
            return
        self._buffer.append(record)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    @staticmethod
    def fan_out(watchers: Iterable[JobProgress], record: EventRecord) -> None:
        """``put`` ``record`` into each of ``watchers`` (one loop, no call per
        watcher: K jobs watching one graph receive every event of it)."""
        for w in watchers:
            if not w._closed:
                w._buffer.append(record)
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
        """Every event so far, then new ones until the job is discarded (each
        event made from its record as it is read)."""
        pos = 0
        while True:
            while pos < len(self._buffer):
                yield ProgressEvent(*self._buffer[pos])
                pos += 1
            if self._closed:
                return
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            await self._wakeup.wait()
