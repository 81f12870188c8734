"""A hypothesis-driven random frontend, run through the gateway protocol in process.

Each example is a random frontend program: one to three concurrent tasks, each a
random sequence of solve (a definition, or a nested frontend that returns one
reference several times), evaluate, release, duplicate return (one reference
under several keys and in attestations), return of a forged ID, garbage on the
wire, error and cancel. Two solves of the program run at once, each in its own
gateway session. Whatever happens, every handle made is released exactly once
(the handle tracker sees no live handle and no double release), every value an
op produced ends with no live handle, and every failure is a
:class:`~solver.SolveError` with one of the expected messages; a program with no
error, cancel or misuse succeeds with the right values.

``RUNS`` counts the examples that ran to the end with every check passing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import pytest
from gateway_programs.support import Ops, duplicate_build, failing, text
from hypothesis import HealthCheck, given, settings, strategies as st

from frontends import BuildResult, Client, Reference
from frontends.forwarder import Forwarder
from frontends.gateway import GatewayClient, InProcessGateway, RemoteReference
from solver import Attestation, Definition, SolveError, Solver, SolveRequest
from solver.testing import track_handles

DEFINITIONS: list[tuple[Definition | None, str | None]] = [
    (text("a"), "a"),
    (text("a", "b"), "ab"),
    (text("a", "b", "c"), "abc"),
    (text("x", "b"), "xb"),
    (failing("random op failed"), None),
    (None, "ab"),  # the nested frontend: duplicate_build's main ref
]
NESTED = len(DEFINITIONS) - 1


@dataclass(frozen=True)
class Action:
    kind: str  # solve evaluate release return forge garbage raise cancel checkpoint
    arg: int = 0
    times: int = 1


actions = st.one_of(
    st.builds(Action, st.just("solve"), st.integers(0, len(DEFINITIONS) - 1)),
    st.builds(Action, st.just("evaluate"), st.integers(0, 7)),
    st.builds(Action, st.just("release"), st.integers(0, 7)),
    st.builds(Action, st.just("return"), st.integers(0, 7), st.integers(1, 4)),
    st.builds(Action, st.just("checkpoint")),
    st.builds(Action, st.just("forge")),
    st.builds(Action, st.just("garbage")),
    st.builds(Action, st.just("raise")),
    st.builds(Action, st.just("cancel")),
)
programs = st.lists(st.lists(actions, max_size=8), min_size=1, max_size=3)

#: Examples that passed every check, by test name.
RUNS: Counter[str] = Counter()
#: How the solves of those examples ended (ok, error, cancelled).
OUTCOMES: Counter[str] = Counter()

ALLOWED_ERRORS = (
    "random frontend raised",
    "random op failed",
    "was released",
    "released result",
    "unknown reference 'ref-forged'",
    "broke the gateway protocol",
)


def make_build(program: list[list[Action]], cancel: anyio.CancelScope) -> InProcessGateway:
    async def build(client: Client) -> BuildResult:
        assert isinstance(client, GatewayClient)
        refs: list[Reference] = []
        out = BuildResult()
        counter = [0]

        async def run(task: list[Action]) -> None:
            for action in task:
                if action.kind == "solve":
                    definition, _ = DEFINITIONS[action.arg]
                    if definition is None:
                        res = await client.solve(SolveRequest(frontend="nested"))
                    else:
                        res = await client.solve(SolveRequest(definition=definition))
                    assert res.ref is not None
                    refs.append(res.ref)
                elif action.kind == "checkpoint":
                    await anyio.lowlevel.checkpoint()
                elif action.kind == "raise":
                    raise RuntimeError("random frontend raised")
                elif action.kind == "cancel":
                    cancel.cancel()
                    await anyio.lowlevel.checkpoint()
                elif action.kind == "forge":
                    counter[0] += 1
                    out.add_ref(f"forged{counter[0]}", RemoteReference(client, "ref-forged", None))
                elif action.kind == "garbage":
                    await client._stream.send(b"\x00\x00\x00\x03}{!")
                    await anyio.lowlevel.checkpoint()
                elif refs:
                    ref = refs[action.arg % len(refs)]
                    if action.kind == "evaluate":
                        await ref.evaluate()
                    elif action.kind == "release":
                        await ref.release()
                    else:
                        for _ in range(action.times):
                            counter[0] += 1
                            key = f"k{counter[0]}"
                            out.add_ref(key, ref)
                            out.add_attestation(key, Attestation("provenance", ref))
                        out.set_ref(ref)

        if len(program) == 1:
            await run(program[0])
        else:
            async with anyio.create_task_group() as tg:
                for task in program:
                    tg.start_soon(run, task)
        return out

    return InProcessGateway(build)


def expect_success(program: list[list[Action]]) -> bool:
    """Whether a one-task program must succeed: no raise, cancel, forgery or
    garbage, no failing op evaluated or returned, no use of a released reference,
    and no reference in the result released before the return."""
    if len(program) != 1:
        return False
    refs: list[tuple[int, bool]] = []  # (definition, released)
    returned: set[int] = set()
    for action in program[0]:
        if action.kind in ("raise", "cancel", "forge", "garbage"):
            return False
        if action.kind == "solve":
            refs.append((action.arg, False))
        elif action.kind in ("evaluate", "release", "return") and refs:
            i = action.arg % len(refs)
            d, released = refs[i]
            if released or (DEFINITIONS[d][1] is None and action.kind != "release"):
                return False
            if action.kind == "release":
                refs[i] = (d, True)
            if action.kind == "return":
                returned.add(i)
    return not any(refs[i][1] for i in returned)


async def run_program(program: list[list[Action]]) -> None:
    ops = Ops()
    with track_handles() as tracker:
        with anyio.fail_after(30):
            frontends = {"nested": Forwarder(duplicate_build)}
            async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:
                outcomes: list[str] = []
                messages: list[str] = []

                async def one() -> None:
                    with anyio.CancelScope() as scope:
                        name = f"gw{id(scope)}"
                        s.frontends[name] = make_build(program, scope)
                        try:
                            async with await s.solve(SolveRequest(frontend=name)) as res:
                                check_values(res.refs, res.ref)
                                outcomes.append("ok")
                        except SolveError as exc:
                            outcomes.append("error")
                            messages.append(str(exc))
                    if scope.cancelled_caught:
                        outcomes.append("cancelled")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(one)
                    tg.start_soon(one)
                for message in messages:
                    assert any(m in message for m in ALLOWED_ERRORS), message
                # nothing a frontend session made outlives its solve
                live = [line for line in tracker.live if "Proxy" in line]
                assert live == [], live
                if expect_success(program):
                    assert outcomes == ["ok", "ok"], (outcomes, messages)
        tracker.check()
    assert ops.live_values() == []
    OUTCOMES.update(outcomes)


def check_values(refs: dict[str, object], ref: object) -> None:
    values = {str(getattr(r, "sys", None)) for r in refs.values()}
    allowed = {v for _, v in DEFINITIONS if v is not None}
    assert values <= allowed, values
    if refs:
        assert ref is not None


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
def test_random_gateway_frontend_releases_everything_exactly_once(
    backend: str, program: list[list[Action]]
) -> None:
    anyio.run(run_program, program, backend=backend)
    RUNS[f"random-{backend}"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
def test_random_gateway_frontend_many_runs(backend: str, program: list[list[Action]]) -> None:
    anyio.run(run_program, program, backend=backend)
    RUNS[f"many-{backend}"] += 1


def test_report_random_runs() -> None:
    """Prints how many random examples passed in this session (run with ``-s``)."""
    print(f"random gateway frontend runs passed: {dict(RUNS)}; solves: {dict(OUTCOMES)}")
