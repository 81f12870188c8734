"""The bridge's lazy proxies: evaluated once on first use, shared by concurrent
callers and split halves, released cleanly during an evaluation."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest
from frontend_support import Ops, failing, text

from solver import (
    DoubleReleaseError,
    ResultProxy,
    SolveError,
    Solver,
    SolveRequest,
    split_result_proxy,
)
from solver.bridge._bridge import _NEW, DefinitionProxy, SolverBridge
from solver.testing import HandleTracker

pytestmark = pytest.mark.anyio


async def proxy_of(s: Solver, definition: object) -> DefinitionProxy:
    bridge = SolverBridge(s, s.new_job())
    res = await bridge.solve(SolveRequest(definition=definition))  # type: ignore[arg-type]
    assert isinstance(res.ref, DefinitionProxy)
    assert isinstance(res.ref, ResultProxy)
    return res.ref


async def test_lazy_and_evaluated_once_for_concurrent_callers(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("a", "g", kind="test.gate"))
        assert proxy.definition == text("a", "g", kind="test.gate")
        await anyio.lowlevel.checkpoint()
        assert ops.execs == []  # nothing runs before the first result()
        got: list[object] = []

        async def ask() -> None:
            got.append((await proxy.result()).sys)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(ask)
            await ops.start_signal("g").wait()
            ops.gate("g").set()
        assert got == ["ag"] * 10
        assert (await proxy.result()).sys == "ag"  # stored
        assert ops.execs == ["a", "g"]
        await proxy.release()
        with pytest.raises(SolveError, match=f"accessing released result {proxy.id}"):
            await proxy.result()


async def test_halves_share_one_evaluation(handle_tracker: HandleTracker) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("a"))
        h1, h2 = split_result_proxy(proxy)
        h3, h4 = split_result_proxy(h2)
        assert {h.id for h in (h1, h3, h4)} == {proxy.id}
        values = [await h.result() for h in (h1, h3, h4)]
        assert values[0] is values[1] is values[2]
        assert ops.execs == ["a"]
        for h in (h1, h3):
            await h.release()
        assert not proxy.released
        await h4.release()
        assert proxy.released


async def test_release_during_evaluation_cancels_it_and_fails_waiters(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("g", kind="test.gate"))
        errors: list[str] = []

        async def ask() -> None:
            try:
                await proxy.result()
            except SolveError as exc:
                errors.append(str(exc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            tg.start_soon(ask)
            await ops.start_signal("g").wait()
            await proxy.release()
        assert errors == [f"evaluating released result {proxy.id}"] * 2
        assert ops.cancelled == ["g"]
        assert ops.execs == []


async def test_release_as_evaluation_finishes_releases_the_value(
    handle_tracker: HandleTracker,
) -> None:
    """The build completes just as the proxy is released: the fresh value is
    released, not leaked."""
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("g", kind="test.gate"))
        outcome: list[str] = []

        async def ask() -> None:
            try:
                outcome.append(str((await proxy.result()).sys))
            except SolveError as exc:
                outcome.append(str(exc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await ops.start_signal("g").wait()
            ops.gate("g").set()  # the exec can now finish ...
            await proxy.release()  # ... while we release
        assert outcome in (["g"], [f"evaluating released result {proxy.id}"])
    assert ops.live_values() == []


async def test_release_before_evaluation_starts(handle_tracker: HandleTracker) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("a"))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    with pytest.raises(SolveError, match="evaluating released result"):
                        await proxy.result()

                tg.start_soon(ask)
                while proxy._state == _NEW:  # until ask() has started the evaluation
                    await anyio.lowlevel.checkpoint()
                await proxy.release()  # the evaluation task may not even have run yet
        assert not scope.cancelled_caught
    assert ops.live_values() == []


async def test_double_release_raises_and_is_logged(
    handle_tracker: HandleTracker, caplog: pytest.LogCaptureFixture
) -> None:
    async with Solver(op_kinds=Ops().registry()) as s:
        proxy = await proxy_of(s, text("a"))
        await proxy.release()
        double = pytest.raises(DoubleReleaseError, match="releasing already released reference")
        with caplog.at_level(logging.ERROR, logger="solver"), double:
            await proxy.release()
        assert "releasing already released reference" in caplog.text
        assert len(handle_tracker.double_releases) == 1
        handle_tracker._double.clear()


async def test_failure_is_stored_and_copied_per_caller(handle_tracker: HandleTracker) -> None:
    async with Solver(op_kinds=Ops().registry()) as s:
        proxy = await proxy_of(s, failing("it broke"))
        errors = []
        for _ in range(2):
            with pytest.raises(SolveError, match="it broke") as info:
                await proxy.result()
            errors.append(info.value)
        assert errors[0] is not errors[1]
        assert isinstance(errors[0].__cause__, RuntimeError)
        await proxy.release()


async def test_waiter_cancelled_evaluation_goes_on(handle_tracker: HandleTracker) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("g", kind="test.gate"))
        # the waiter is cancelled once the evaluation runs (a 50 ms timer could
        # fire before it started, and the test then proved nothing)
        with anyio.fail_after(10), anyio.CancelScope() as waiter:

            async def cancel_the_waiter_once_running() -> None:
                await ops.start_signal("g").wait()
                waiter.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_the_waiter_once_running)
                await proxy.result()
        assert waiter.cancelled_caught
        assert ops.cancelled == []
        ops.gate("g").set()
        assert (await proxy.result()).sys == "g"
        assert ops.execs == ["g"]
        await proxy.release()


async def test_solver_closing_during_evaluation(
    handle_tracker: HandleTracker, caplog: pytest.LogCaptureFixture
) -> None:
    ops = Ops()
    errors: list[str] = []

    async def ask(proxy: DefinitionProxy) -> None:
        try:
            await proxy.result()
        except SolveError as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg, Solver(op_kinds=ops.registry()) as s:
        proxy = await proxy_of(s, text("g", kind="test.gate"))
        tg.start_soon(ask, proxy)
        await ops.start_signal("g").wait()
        # the solver left with the evaluation in flight
    assert ops.cancelled == ["g"]
    assert errors == ["the solver was closed"]
    assert "InternalError" not in caplog.text  # a late answer after close is dropped
    await proxy.release()


async def test_bridge_errors(handle_tracker: HandleTracker) -> None:
    async with Solver(op_kinds=Ops().registry()) as s:
        bridge = SolverBridge(s, s.new_job())
        with pytest.raises(SolveError, match="needs a definition or a frontend"):
            await bridge.solve(SolveRequest())
        with pytest.raises(SolveError, match="unknown frontend 'x'; frontends given to this"):
            await bridge.solve(SolveRequest(frontend="x"))

        class Wrong:
            async def solve(self, bridge, opts, inputs):  # type: ignore[no-untyped-def]
                return "nope"

        s.frontends["wrong"] = Wrong()
        with pytest.raises(SolveError, match="returned a str, not a FrontendResult"):
            await bridge.solve(SolveRequest(frontend="wrong"))
        with pytest.raises(SolveError, match="returned a str, not a FrontendResult"):
            await s.solve(SolveRequest(frontend="wrong"))


async def test_a_split_consumes_the_bridge_proxy(
    handle_tracker: HandleTracker, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC section 4 (issue 20, point 3): releasing the proxy a split consumed
    raises DoubleReleaseError, logs, changes no count, and the solve still ends
    with every value released exactly once."""
    ops = Ops()

    class Splitting:
        async def solve(self, bridge, opts, inputs):  # type: ignore[no-untyped-def]
            res = await bridge.solve(SolveRequest(definition=text("a")))
            proxy = res.ref
            keep, out = split_result_proxy(proxy)
            assert isinstance(proxy, DefinitionProxy)
            with (
                caplog.at_level(logging.ERROR, logger="solver"),
                pytest.raises(
                    DoubleReleaseError,
                    match=f"releasing reference {proxy.id} that split_result_proxy consumed",
                ),
            ):
                await proxy.release()
            assert "split_result_proxy consumed" in caplog.text
            assert not proxy.released  # the halves still hold it
            with pytest.raises(DoubleReleaseError, match="splitting reference"):
                split_result_proxy(proxy)
            with pytest.raises(SolveError, match="accessing released result"):
                await proxy.result()
            assert (await keep.result()).sys == "a"
            await keep.release()
            res.set_ref(out)
            return res

    async with Solver(op_kinds=ops.registry(), frontends={"split": Splitting()}) as s:
        async with await s.solve(SolveRequest(frontend="split")) as solved:
            assert solved.ref is not None
            assert solved.ref.sys == "a"
        # the tracker saw the consumption as the proxy's release, and one misuse
        assert len(handle_tracker.double_releases) == 2
        handle_tracker._double.clear()  # both misuses were deliberate
    assert ops.live_values() == []
    assert ops.execs == ["a"]
