"""Cancellation at every checkpoint of ``Solver.solve``: nothing leaks.

The way httpcore tests its pool, made exhaustive: :func:`cancel_at_suspension`
drives the ``solve`` coroutine itself and cancels the caller's scope just before
its n-th suspension (the n-th time it yields to the event loop, on asyncio or
trio alike). Each test runs n = 1, 2, 3, ... until a solve completes before its
n-th suspension, so every await on the path is a cancel point that is tried.
Whatever the outcome, every underlying value the ops produced must end released
exactly once, and the handle tracker must see no live handle and no double
release.

The frontend solve is the one of issue 20: a forwarder evaluates one ref and
returns it as ``ref``, under 3 keys and in 1 attestation (5 handles on one value).
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import anyio
import pytest
from frontend_support import Ops, text

from frontends import Attestation, BuildResult, Client
from frontends.forwarder import Forwarder
from solver import Solver, SolveRequest, SolveResult
from solver.testing import CountingResult, HandleTracker

pytestmark = pytest.mark.anyio

T = TypeVar("T")

#: A solve path with more suspensions than this is a runaway (a loop that never
#: completes when cancelled); the tests fail instead of running forever.
MAX_SUSPENSIONS = 400


@types.coroutine
def _counting(
    coro: Coroutine[Any, Any, T], on_suspend: Callable[[], None]
) -> Generator[Any, Any, T]:
    """Run ``coro``, calling ``on_suspend()`` each time it is about to suspend."""
    send: Any = None
    throw: BaseException | None = None
    while True:
        try:
            yielded = coro.throw(throw) if throw is not None else coro.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        on_suspend()
        try:
            send, throw = (yield yielded), None
        except BaseException as exc:  # handed to the coroutine
            send, throw = None, exc


async def cancel_at_suspension(
    n: int, make: Callable[[], Coroutine[Any, Any, T]]
) -> tuple[T | None, int]:
    """Await ``make()`` in a scope cancelled just before its ``n``-th suspension.

    Returns (its value or None if it was cancelled, the suspensions counted)."""
    count = 0
    with anyio.CancelScope() as scope:

        def on_suspend() -> None:
            nonlocal count
            count += 1
            if count == n:
                scope.cancel()

        return await _counting(make(), on_suspend), count
    return None, count


async def every_suspension(
    run: Callable[[int], Awaitable[bool]],
) -> int:
    """``run(n)`` for n = 1, 2, ... until it reports that the solve completed
    before being cancelled; returns the last n."""
    for n in range(1, MAX_SUSPENSIONS):
        if await run(n):
            return n
    raise AssertionError(f"the solve never completed within {MAX_SUSPENSIONS} suspensions")


def duplicates_build(ops: Ops) -> Callable[[Client], Awaitable[BuildResult]]:
    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a", "b")))).ref
        assert ref is not None
        await ref.evaluate()
        out = BuildResult()
        out.set_ref(ref)
        for key in ("linux/amd64", "linux/386", "linux/arm64"):
            out.add_ref(key, ref)
        out.add_attestation("linux/amd64", Attestation("provenance", ref))
        return out

    return build


def assert_all_released(ops: Ops) -> None:
    for value in ops.results:
        assert value.live_count == 0, value
        # every handle ever made on the value released exactly once
        assert value.release_count == value._shared.handles, value


async def check_result(result: SolveResult | None, keys: int) -> None:
    if result is None:
        return
    assert result.ref is not None
    assert result.ref.sys == "ab"
    assert len(result.refs) == keys
    await result.release()


async def test_frontend_solve_cancelled_at_each_suspension(
    handle_tracker: HandleTracker,
) -> None:
    async def run(n: int) -> bool:
        ops = Ops()
        with anyio.fail_after(10):
            async with Solver(op_kinds=ops.registry()) as s:
                s.frontends["fw"] = Forwarder(duplicates_build(ops))
                result, count = await cancel_at_suspension(
                    n, lambda: s.solve(SolveRequest(frontend="fw"))
                )
                await check_result(result, keys=3)
        assert_all_released(ops)
        return count < n

    last = await every_suspension(run)
    assert last > 5  # the path really has checkpoints to try
    # (the last run completed, so its op ran and its values were checked)


async def test_definition_solve_cancelled_at_each_suspension(
    handle_tracker: HandleTracker,
) -> None:
    async def run(n: int) -> bool:
        ops = Ops()
        with anyio.fail_after(10):
            async with Solver(op_kinds=ops.registry()) as s:
                result, count = await cancel_at_suspension(n, lambda: s.solve(text("a", "b")))
                await check_result(result, keys=0)
        assert_all_released(ops)
        return count < n

    await every_suspension(run)


async def test_warm_frontend_solve_cancelled_at_each_suspension(
    handle_tracker: HandleTracker,
) -> None:
    """The same with every op cached by an earlier solve in the same Solver."""

    async def run(n: int) -> bool:
        ops = Ops()
        with anyio.fail_after(10):
            async with Solver(op_kinds=ops.registry()) as s:
                s.frontends["fw"] = Forwarder(duplicates_build(ops))
                async with await s.solve(SolveRequest(frontend="fw")):
                    pass
                result, count = await cancel_at_suspension(
                    n, lambda: s.solve(SolveRequest(frontend="fw"))
                )
                await check_result(result, keys=3)
                assert ops.execs == ["a", "b"]
        assert_all_released(ops)
        return count < n

    await every_suspension(run)


async def test_clone_that_cancels_the_caller_at_each_call(
    handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the solver makes the result's handles (issue 20, point 1):
    the n-th ``clone()`` of an op's value cancels the caller's scope."""
    original = CountingResult.clone
    calls = 0
    at = 0
    scope = anyio.CancelScope()

    def clone(self: CountingResult) -> CountingResult:
        nonlocal calls
        calls += 1
        if calls == at:
            scope.cancel()
        return original(self)

    monkeypatch.setattr(CountingResult, "clone", clone)
    for at in range(1, MAX_SUSPENSIONS):  # clone() reads `at`
        calls = 0
        ops = Ops()
        with anyio.fail_after(10):
            async with Solver(op_kinds=ops.registry()) as s:
                s.frontends["fw"] = Forwarder(duplicates_build(ops))
                result: SolveResult | None = None
                with anyio.CancelScope() as scope:
                    result = await s.solve(SolveRequest(frontend="fw"))
                await check_result(result, keys=3)
        assert_all_released(ops)
        if calls < at:
            break
    assert calls >= 5  # at least one clone per occurrence was tried
