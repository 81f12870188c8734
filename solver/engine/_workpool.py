"""An elastic pool of worker tasks that runs the dispatcher and the units of work.

Starting a task, or switching to one, costs several times more than running a
coroutine that does not block, and most units of work in a build (a cache map,
a no-op exec, a cache load from memory) do not block. So there is no task per
unit and no task for the dispatcher: a few reused worker tasks take turns at
two kinds of work.

* *Dispatching*: at most one worker at a time holds the dispatcher's role and
  runs :meth:`Dispatcher.drain` (the scheduler's loop over signalled edges)
  until no edge is left. Only the dispatcher mutates edge state.
* *Units*: ``submit``-ted coroutine functions, taken one at a time, in
  batches: every unit queued when the batch starts, newest first.

A worker prefers dispatching (the edges it dispatches batch the answers of the
units that ran before), then units, then sleeps. A build whose units never block
therefore runs on one worker with no task switch at all: the dispatcher queues a
unit, runs it, and dispatches what it answered, in the same task.

The pool keeps this invariant: whenever work is queued (a unit, or an edge with
no dispatcher running), some worker is free to take it: idle, or started and
not yet busy. A worker that starts a unit or a dispatch while work is queued
and no other worker is free starts one more first, and queueing work when no
worker is free starts one. So a unit that blocks never holds up the work behind
it (each blocked unit ends up with a worker of its own), and neither does a
dispatcher that awaits a slow cache query, for units.

The one worker that does everything never waits, so it yields to the event loop
now and then (every ``_SLICE`` seconds of work), or a large build would hold the
loop for its whole duration.

Units handle their own errors and cancellation: each runs in a cancel scope of
its own (:attr:`WorkPool.unit_scope`), which it may cancel to stop itself only.
Entering a cancel scope costs more than a no-op unit, so a worker keeps one scope
for every unit it runs and enters a new one only after a unit cancelled it. A
unit that raises anyway is logged and the worker carries on. Workers beyond a
few idle ones retire.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

__all__ = ["Dispatcher", "WorkPool"]

logger = logging.getLogger("solver")

_MAX_IDLE = 2
# Longest run of work between two yields to the event loop, in seconds.
_SLICE = 0.005


class Dispatcher(Protocol):
    """What the pool needs of the scheduler."""

    def pending(self) -> bool:
        """Whether an edge is waiting to be dispatched."""
        ...

    async def drain(self) -> None:
        """Dispatch edges until none is waiting."""
        ...


class WorkPool:
    """Runs the dispatcher and ``submit``-ted coroutine functions on a few reused
    tasks of ``tg``. With a ``dispatcher``, call :meth:`notify` when it has work.

    ``dispatching`` says whether a worker holds the dispatcher's role (it drains
    every edge signalled meanwhile, so a signal then needs no :meth:`notify`).

    A unit may read :attr:`unit_scope` when it starts (before it first awaits):
    the cancel scope it runs in, its own. Cancelling it cancels that unit only.
    A worker keeps one scope for all the units it runs until one of them is
    cancelled (entering a cancel scope costs more than a no-op unit).
    """

    __slots__ = (
        "_closed",
        "_dispatcher",
        "_free",
        "_queue",
        "_shields",
        "_tg",
        "_wake",
        "_workers",
        "dispatching",
        "unit_scope",
    )

    def __init__(self, tg: TaskGroup, dispatcher: Dispatcher | None = None) -> None:
        self._tg = tg
        self._dispatcher = dispatcher
        self.dispatching = False
        self.unit_scope: anyio.CancelScope | None = None
        self._queue: deque[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = deque()
        self._free = 0  # workers idle or started and not yet busy
        self._workers = 0
        self._wake: anyio.Event | None = None
        # One shielded scope per worker: see _worker. close() cancels them.
        self._shields: set[anyio.CancelScope] = set()
        self._closed = False
        if dispatcher is not None:
            self._start_worker()

    def __repr__(self) -> str:
        return (
            f"<WorkPool workers={self._workers} free={self._free} queued={len(self._queue)}"
            f"{' dispatching' if self.dispatching else ''}>"
        )

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Queue ``fn(*args)``; it starts no later than a fresh task would."""
        self._queue.append((fn, args))
        self.notify()

    def notify(self) -> None:
        """Work was queued: wake a free worker, or start one if none is free."""
        if self._free == 0:
            self._start_worker()
        elif self._wake is not None:
            self._wake.set()
            self._wake = None

    def _start_worker(self) -> None:
        self._free += 1
        self._workers += 1
        self._tg.start_soon(self._worker)

    def _more_queued(self) -> bool:
        d = self._dispatcher
        return bool(self._queue) or (d is not None and not self.dispatching and d.pending())

    def close(self) -> None:
        """Stop every worker (the engine is closing): the units they run are
        cancelled, and workers started from now on stop at once."""
        self._closed = True
        for shield in self._shields:
            shield.cancel()

    async def _worker(self) -> None:
        # Workers are shielded from a cancellation of the scope around the engine:
        # the engine decides when work stops (when no job wants it any more, or at
        # close()). Otherwise cancelling a scope that holds the whole engine kills
        # the workers with work half done, and a caller waiting, shielded, for that
        # work to stop (Scheduler.build) waits forever.
        shield = anyio.CancelScope(shield=True)
        if self._closed:
            shield.cancel()
        self._shields.add(shield)
        try:
            with shield:
                while True:
                    with anyio.CancelScope() as scope:
                        if not await self._serve(scope):
                            return
        finally:
            self._shields.discard(shield)
            self._free -= 1
            self._workers -= 1

    async def _serve(self, scope: anyio.CancelScope) -> bool:
        """Work in ``scope`` until a unit cancels it (True: serve again in a fresh
        scope) or the worker retires (False)."""
        queue = self._queue
        dispatcher = self._dispatcher
        clock = time.perf_counter
        since = clock()
        while True:
            if dispatcher is not None and not self.dispatching and dispatcher.pending():
                self.dispatching = True
                self._free -= 1
                if self._free == 0 and queue:
                    self._start_worker()
                try:
                    await dispatcher.drain()
                finally:
                    self.dispatching = False
                    self._free += 1
            elif queue:
                # Every unit queued now, before dispatching again, so that the
                # answers of a batch are dispatched together; newest first: a
                # build queues its units top-down, and answering the inputs
                # first lets an edge take its own answer and its inputs' in
                # one dispatch.
                for _ in range(len(queue)):
                    if not queue:
                        break
                    fn, args = queue.pop()
                    self._free -= 1
                    if self._free == 0 and self._more_queued():
                        self._start_worker()
                    self.unit_scope = scope
                    try:
                        await fn(*args)
                    except Exception:
                        logger.exception("a unit of work failed in the engine")
                    finally:
                        self._free += 1
                    # what the unit referred to must not outlive it
                    del fn, args
                    if scope.cancel_called:
                        return True
            else:
                if self._free > _MAX_IDLE:
                    return False
                if self._wake is None:
                    self._wake = anyio.Event()
                await self._wake.wait()
                since = clock()
                continue
            if clock() - since > _SLICE:
                await anyio.lowlevel.checkpoint()
                since = clock()
