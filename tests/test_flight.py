"""BuildKit's ``util/flightcontrol`` tests, ported to the engine's shared work.

The engine has no standalone flight group: an op's ``exec`` is the shared call,
and concurrent jobs building the same vertex are its waiters. Each test names
the flightcontrol test it ports."""

from __future__ import annotations

import anyio
import pytest
from harness import resolve_op, unwrap, vtx

from solver import Edge, Job, Solver
from solver.testing import HandleTracker

pytestmark = pytest.mark.anyio


async def _build(job: Job, v: object, out: list[str]) -> None:
    res = await job.build(Edge(v))  # type: ignore[arg-type]
    out.append(unwrap(res))
    await res.release()


async def test_no_cancel(handle_tracker: HandleTracker) -> None:
    """TestNoCancel: two callers of one call both get its result; it runs once."""
    gate = anyio.Event()

    async def hold() -> None:
        await gate.wait()

    v = vtx(name="v", exec_pre_func=hold, value="bar")
    counters = v.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(10):
        async with Solver(resolve_op=resolve_op) as s, anyio.create_task_group() as tg:
            tg.start_soon(_build, s.new_job(), v, out)
            tg.start_soon(_build, s.new_job(), v, out)
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert out == ["bar", "bar"]
    assert (counters.cache, counters.exec) == (1, 1)


async def test_cancel_one(handle_tracker: HandleTracker) -> None:
    """TestCancelOne: one caller cancels; the call goes on and the other gets it."""
    gate = anyio.Event()
    cancelled_work: list[bool] = []

    async def hold() -> None:
        try:
            await gate.wait()
        except BaseException:
            cancelled_work.append(True)
            raise

    v = vtx(name="v", exec_pre_func=hold, value="bar")
    counters = v.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(10):
        async with Solver(resolve_op=resolve_op) as s, anyio.create_task_group() as tg:
            first = anyio.CancelScope()
            tg.start_soon(_build, s.new_job(), v, out)

            async def cancelled_caller() -> None:
                with first:
                    await _build(s.new_job(), v, out)

            tg.start_soon(cancelled_caller)
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            await anyio.wait_all_tasks_blocked()
            assert not cancelled_work
            gate.set()
    assert out == ["bar"]
    assert first.cancelled_caught
    assert (counters.cache, counters.exec) == (1, 1)


async def test_cancel_race(handle_tracker: HandleTracker) -> None:
    """TestCancelRace: a caller that arrives while a cancelled call is still winding
    down waits for it to end and then gets a clean run of its own."""
    started = anyio.Event()
    winding_down = anyio.Event()
    finish_wind_down = anyio.Event()
    runs = [0]

    async def work() -> None:
        runs[0] += 1
        if runs[0] > 1:
            return
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                winding_down.set()
                await finish_wind_down.wait()

    v = vtx(name="v", exec_pre_func=work, value="bar")
    counters = v.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(10):
        async with Solver(resolve_op=resolve_op) as s, anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def first() -> None:
                with scope:
                    await _build(s.new_job(), v, out)

            tg.start_soon(first)
            await started.wait()
            scope.cancel()
            await winding_down.wait()
            tg.start_soon(_build, s.new_job(), v, out)
            await anyio.wait_all_tasks_blocked()
            assert out == []  # the late caller waits for the cancelled call to end
            finish_wind_down.set()
    assert scope.cancelled_caught
    assert out == ["bar"]
    assert runs[0] == 2  # cancelled once, then one clean run
    assert counters.exec == 1  # only the clean run got past its hook


async def test_cancel_both(handle_tracker: HandleTracker) -> None:
    """TestCancelBoth: when every caller cancels, the call is cancelled; a later
    caller runs it again (the cancellation was not remembered)."""
    started = anyio.Event()
    cancelled_work: list[bool] = []
    runs = [0]

    async def hold() -> None:
        runs[0] += 1
        if runs[0] > 1:
            return
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled_work.append(True)

    v = vtx(name="v", exec_pre_func=hold, value="bar")
    counters = v.setup_call_counters()
    with anyio.fail_after(10):
        async with Solver(resolve_op=resolve_op) as s:
            scopes = [anyio.CancelScope(), anyio.CancelScope()]
            async with anyio.create_task_group() as tg:
                for scope in scopes:

                    async def caller(scope: anyio.CancelScope = scope) -> None:
                        with scope:
                            await _build(s.new_job(), v, [])

                    tg.start_soon(caller)
                await started.wait()
                await anyio.wait_all_tasks_blocked()
                scopes[0].cancel()
                await anyio.wait_all_tasks_blocked()
                assert not cancelled_work
                scopes[1].cancel()
            assert cancelled_work == [True]
            assert all(sc.cancelled_caught for sc in scopes)

            # the jobs are still alive, so this joins the same active vertex and op
            out: list[str] = []
            await _build(s.new_job(), v, out)
            assert out == ["bar"]
    assert runs[0] == 2
    assert (counters.cache, counters.exec) == (1, 1)


@pytest.mark.parametrize("callers", [100, 1000])
async def test_contention(callers: int, handle_tracker: HandleTracker) -> None:
    """TestContention / TestMassiveParallel: many concurrent callers, one run."""
    v = vtx(name="v", value="bar", exec_delay=0.01)
    counters = v.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(30):
        async with Solver(resolve_op=resolve_op) as s, anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(_build, s.new_job(), v, out)
    assert out == ["bar"] * callers
    assert (counters.cache, counters.exec) == (1, 1)
