"""A bound on how many ``exec`` steps of one worker run at once (``make -jN``).

Without a bound every step whose inputs are ready starts at once: issue 21 saw
19 to 31 compilers on 2 cores, whose context switches and cache misses made a
cold build 1.5x CPU/wall against ninja's 1.97x. :class:`StepSlots` is the
worker's bound, ``Worker(max_parallelism=N)`` (default ``os.cpu_count()``),
handed to every ``exec`` op it makes, which offers it to the engine as the
op's ``acquire()`` (``Op`` in the contract: an async context manager entered
around ``exec``). So a step that waits for a slot has not started: it reports a
``waiting`` progress event (:func:`solver.report_waiting`) when every slot is
taken, the engine emits its ``started`` event only when it holds one, and
progress shows it as waiting (not running) until then, and its time as its run
time.

One slot is one step: its mounts placed, its process run, its outputs
committed. Only ``exec`` takes slots; the file ops, sources and merges are
short file-system work in worker threads, which anyio bounds on its own.

Each acquisition borrows on behalf of a fresh token, not the current task, so
one engine task may hold several slots (the engine's work pool runs units in
whichever of its tasks is free), and a cancelled wait holds nothing. The
``anyio.CapacityLimiter`` belongs to one event loop, so the worker makes a new
one each time it is opened (:meth:`StepSlots.reset`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import anyio

from .._progress import report_waiting

__all__ = ["StepSlots", "default_parallelism"]


def default_parallelism() -> int:
    """The default bound: the number of CPUs (``os.cpu_count()``, 1 when unknown)."""
    return os.cpu_count() or 1


class StepSlots:
    """At most ``total`` holders at once; ``total`` is an integer >= 1."""

    __slots__ = ("_limiter", "total")

    def __init__(self, total: int) -> None:
        if type(total) is not int or total < 1:
            raise ValueError(f"max_parallelism must be an integer >= 1, got {total!r}")
        self.total = total
        self._limiter: anyio.CapacityLimiter | None = None

    def reset(self) -> None:
        """Start with every slot free, on the event loop that uses it next (called
        when the worker opens; nothing may hold a slot then)."""
        self._limiter = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body; waits (cancellably) while all are taken."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.total)
        limiter = self._limiter
        token = object()
        if limiter.available_tokens < 1 or limiter.statistics().tasks_waiting:
            report_waiting()  # the step's "waiting" progress event
        await limiter.acquire_on_behalf_of(token)
        try:
            yield
        finally:
            limiter.release_on_behalf_of(token)

    @property
    def running(self) -> int:
        """How many slots are held now."""
        return 0 if self._limiter is None else int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        """How many steps wait for a slot now."""
        if self._limiter is None:
            return 0
        return int(self._limiter.statistics().tasks_waiting)

    def __repr__(self) -> str:
        return f"<StepSlots {self.running}/{self.total} running, {self.waiting} waiting>"
