"""Ctrl-C for the commands that build: ``run_interruptible(main)`` is
``anyio.run(main)`` where SIGINT cancels ``main`` and raises
:class:`KeyboardInterrupt` once it has stopped (exit status 130, the cache kept).

Why not the event loop's own SIGINT handling: asyncio's runner installs a
Python-level handler, which runs only in the main thread and only when that
thread runs Python. The kernel may deliver a process's SIGINT to any thread
that does not block it (the threads that wait for worker-thread calls or for
child processes); the main thread, asleep in ``epoll_wait`` while a step runs
for minutes without output, then does not wake, and the build goes on (seen in
CI: a build that outlived its SIGINT by 120 s; shown by sending SIGINT to
another thread of a build, ``tests/test_cli_errors.py``). A signal receiver
(:func:`anyio.open_signal_receiver`) makes the loop's wake-up pipe the
signal's wake-up file descriptor, which whichever thread takes the signal
writes to, so the loop wakes at once.

Only the first SIGINT is handled here; a second one, while the build stops,
finds the default handler back and interrupts at once. Windows has no signal
receiver, and only the main thread may set one up: there the loop's own
handling stays.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

__all__ = ["run_interruptible"]

T = TypeVar("T")


def run_interruptible(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` in a new event loop; SIGINT cancels it, and once it has stopped
    :class:`KeyboardInterrupt` is raised."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        return anyio.run(main)  # no signal receiver there (signals reach the main thread)
    interrupted = False

    async def guarded() -> T:
        nonlocal interrupted
        outcome: list[T] = []
        failure: list[Exception] = []
        async with anyio.create_task_group() as tg:

            async def on_sigint() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT) as signals:
                    async for _ in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            async def body() -> None:
                try:
                    outcome.append(await main())
                except Exception as exc:  # raised as it is below, not in a group
                    failure.append(exc)
                tg.cancel_scope.cancel()  # done: stop listening

            tg.start_soon(on_sigint)
            tg.start_soon(body)
        if interrupted and not outcome:
            raise KeyboardInterrupt  # what stopping raised on the way out is moot
        if failure:
            raise failure[0]
        return outcome[0]

    return anyio.run(guarded)
