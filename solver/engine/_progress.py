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
    """The event buffer of one job; read it with :meth:`events`.

    A job that joined another job's build of the same root as a whole (a hold:
    ``_Hold`` in ``_jobs.py``) reads that hold's buffer too, one *shared log*
    for all of them, each reader with its own cursor: K jobs building one graph
    keep its events once, not K times. A vertex's events go to exactly one of a
    job's buffers (its own, or a log it reads: ``VertexState.watch`` asks
    :meth:`sees`), so each vertex's events reach the job once and in order.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_skips",
        "_waiters",
        "_wakeup",
        "mixed",
        "shared",
        "watching",
    )

    def __init__(self) -> None:
        # the keys of the vertex states that forward their events here
        self.watching: set[str] = set()
        # the shared logs this job reads besides its own buffer (holds' buffers)
        self.shared: tuple[JobProgress, ...] = ()
        self._buffer: list[EventRecord] = []
        self._closed = False
        self._wakeup: anyio.Event | None = None
        # the wake-ups of readers of *other* buffers that read this one as a
        # shared log and wait for a new record (None: nobody waits)
        self._waiters: set[anyio.Event] | None = None
        # as a shared log: its readers that also watch some vertex themselves
        # (a member that built another graph after joining; None: none do)
        self.mixed: set[JobProgress] | None = None
        # as a reader: ranges of a shared log not to read (records it read in
        # its own buffer first: see ``take_over``)
        self._skips: dict[JobProgress, list[tuple[int, int]]] | None = None

    def sees(self, key: str) -> bool:
        """Whether the events of the vertex state ``key`` reach this buffer's
        reader: forwarded here, or to a shared log it reads. O(logs)."""
        if key in self.watching:
            return True
        return any(key in log.watching for log in self.shared)

    def read_also(self, log: JobProgress) -> None:
        """Read ``log`` (a hold's buffer) too, from its first record."""
        if log not in self.shared:
            self.shared = (*self.shared, log)

    def watches_itself(self) -> None:
        """This reader of shared logs now watches a vertex itself: its logs keep
        it among their mixed readers (see :meth:`readers_watching`)."""
        for log in self.shared:
            if log.mixed is None:
                log.mixed = set()
            log.mixed.add(self)

    def readers_watching(self, key: str) -> list[JobProgress]:
        """As a shared log about to forward the vertex state ``key``'s events:
        its readers that watch ``key`` themselves (empty unless a member built
        another graph after joining, and a merge adds a vertex of it to the
        hold). O(mixed readers)."""
        return [r for r in self.mixed or () if key in r.watching]

    def take_over(self, key: str, log: JobProgress, start: int, end: int) -> None:
        """``log``, which this buffer's reader reads, forwards ``key``'s events
        from now on and holds the history this reader had already read here at
        ``log``'s records ``[start, end)``: stop watching ``key`` here and skip
        those records there, so that each event is read once."""
        self.watching.discard(key)
        if start < end:
            if self._skips is None:
                self._skips = {}
            self._skips.setdefault(log, []).append((start, end))

    def put(self, record: EventRecord) -> None:
        if self._closed:
            return
        self._buffer.append(record)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        if self._waiters is not None:
            self._wake_readers()

    def _wake_readers(self) -> None:
        waiters = self._waiters
        self._waiters = None
        for event in waiters or ():
            event.set()

    @staticmethod
    def fan_out(watchers: Iterable[JobProgress], record: EventRecord) -> None:
        """``put`` ``record`` into each of ``watchers`` (one loop, no call per
        watcher: several jobs watching one graph receive every event of it)."""
        for w in watchers:
            if not w._closed:
                w._buffer.append(record)
                wakeup = w._wakeup
                if wakeup is not None:
                    w._wakeup = None
                    wakeup.set()
                if w._waiters is not None:
                    w._wake_readers()

    def close(self) -> None:
        self._closed = True
        for log in self.shared:
            if log.mixed is not None:
                log.mixed.discard(self)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        if self._waiters is not None:
            self._wake_readers()

    @property
    def closed(self) -> bool:
        return self._closed

    def kept(self) -> int:
        """How many records this buffer keeps (its own, not its shared logs')."""
        return len(self._buffer)

    async def events(self) -> AsyncIterator[ProgressEvent]:
        """Every event so far, then new ones until the job is discarded (each
        event made from its record as it is read): this buffer's, then each
        shared log's from its own cursor, in turn, as records arrive."""
        pos = 0
        cursors: list[int] = []
        while True:
            while pos < len(self._buffer):
                yield ProgressEvent(*self._buffer[pos])
                pos += 1
            shared = self.shared
            ready = False
            for i, log in enumerate(shared):
                if i == len(cursors):
                    cursors.append(0)
                buffer = log._buffer
                while cursors[i] < len(buffer):
                    skips = self._skips
                    if skips is not None and log in skips:
                        at = cursors[i]
                        end = next((e for b, e in skips[log] if b <= at < e), None)
                        if end is not None:
                            cursors[i] = end
                            continue
                    yield ProgressEvent(*buffer[cursors[i]])
                    cursors[i] += 1
                    ready = True
            if ready or pos < len(self._buffer) or len(cursors) < len(self.shared):
                continue  # something came while yielding: read again first
            if self._closed:
                return
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            wakeup = self._wakeup
            for log in shared:
                if log._waiters is None:
                    log._waiters = {wakeup}
                else:
                    # a set: K readers of one log wait and leave in O(1) each
                    log._waiters.add(wakeup)
            try:
                await wakeup.wait()
            finally:
                if self._wakeup is wakeup and wakeup.is_set():
                    self._wakeup = None  # set by a shared log: wait anew next time
                for log in shared:
                    waiters = log._waiters
                    if waiters is not None:
                        waiters.discard(wakeup)
