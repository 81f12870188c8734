"""An elastic pool of worker tasks for the engine's units of work.

Starting a task costs several times more than running a coroutine that does
not block, and most units of work in a build (a cache map, a no-op exec, a
cache load from memory) do not block. So units are queued, and worker tasks
take them one at a time. The pool keeps this invariant: whenever a unit is
waiting in the queue, some worker is free to take it (idle, or started and not
yet running). A worker that takes a unit while others are queued and no other
worker is free starts one more before it runs its unit. So a unit that blocks
never holds up the ones behind it (each blocked unit ends up with a worker of
its own), and a batch of units that do not block runs on one or two workers.

Units handle their own errors and cancellation (each opens its own cancel
scope); a unit that raises anyway is logged and the worker carries on. Workers
beyond a few idle ones retire.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

__all__ = ["WorkPool"]

logger = logging.getLogger("solver")

_MAX_IDLE = 2


class WorkPool:
    """Runs ``submit``-ted coroutine functions on a few reused tasks."""

    __slots__ = ("_free", "_queue", "_tg", "_wake", "_workers")

    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg
        self._queue: deque[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = deque()
        self._free = 0  # workers idle or started and not yet running a unit
        self._workers = 0
        self._wake: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<WorkPool workers={self._workers} free={self._free} queued={len(self._queue)}>"

    def submit(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Queue ``fn(*args)``; it starts no later than a fresh task would."""
        self._queue.append((fn, args))
        if self._free == 0:
            self._start_worker()
        elif self._wake is not None:
            self._wake.set()
            self._wake = None

    def _start_worker(self) -> None:
        self._free += 1
        self._workers += 1
        self._tg.start_soon(self._worker)

    async def _worker(self) -> None:
        queue = self._queue
        try:
            while True:
                while queue:
                    fn, args = queue.popleft()
                    self._free -= 1
                    if queue and self._free == 0:
                        self._start_worker()
                    try:
                        await fn(*args)
                    except Exception:
                        logger.exception("a unit of work failed in the engine")
                    finally:
                        self._free += 1
                if self._free > _MAX_IDLE:
                    return
                if self._wake is None:
                    self._wake = anyio.Event()
                await self._wake.wait()
        finally:
            self._free -= 1
            self._workers -= 1
