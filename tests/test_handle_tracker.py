"""``solver.testing`` sees every handle the engine makes on a caller's behalf,
whatever the value's own type (issue 20, point 2).

The values here are a plain ``Result`` class that knows nothing of tracking, as an
application's would be: the tracker must still see the handles a solve hands out,
report each leaked one with where it was made, and pass once they are released.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import anyio
import pytest

from frontends import Attestation, BuildResult, Client
from frontends.forwarder import Forwarder
from solver import (
    CacheMap,
    Definition,
    OpContext,
    OpKindRegistry,
    Result,
    Solver,
    SolveRequest,
    SolveResult,
    digest_of,
    node,
)
from solver.testing import track_handles

pytestmark = pytest.mark.anyio


class PlainValue:
    """An application's result: counts its handles, tells no tracker."""

    def __init__(self, text: str, handles: list[int]) -> None:
        self.text = text
        self.handles = handles
        handles[0] += 1

    @property
    def id(self) -> str:
        return digest_of(self.text.encode())

    @property
    def sys(self) -> str:
        return self.text

    async def release(self) -> None:
        self.handles[0] -= 1
        await anyio.lowlevel.checkpoint()

    def clone(self) -> PlainValue:
        return PlainValue(self.text, self.handles)


class PlainOp:
    def __init__(self, ctx: OpContext, handles: list[int]) -> None:
        self.text = str(ctx.payload["text"])
        self.handles = handles

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(self.text.encode())), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await anyio.lowlevel.checkpoint()
        return [PlainValue(self.text, self.handles)]


def plain_solver(handles: list[int]) -> Solver:
    kinds = OpKindRegistry()
    kinds.register("plain.text", lambda ctx: PlainOp(ctx, handles))

    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=DEFINITION))).ref
        assert ref is not None
        out = BuildResult()
        out.set_ref(ref)
        for key in ("linux/amd64", "linux/386", "linux/arm64"):
            out.add_ref(key, ref)
        out.add_attestation("linux/amd64", Attestation("provenance", ref))
        return out

    return Solver(op_kinds=kinds, frontends={"fw": Forwarder(build)})


DEFINITION = Definition.of(node("plain.text", {"text": "hello"}))


async def test_a_leaked_solve_result_is_reported_with_where_it_was_made() -> None:
    """The leak of issue 20 point 1, made on purpose: a SolveResult dropped
    unreleased. Its 5 handles are clones of a value that tells no tracker."""
    handles = [0]
    with track_handles() as tracker:
        async with plain_solver(handles) as s:
            leaked: SolveResult = await s.solve(SolveRequest(frontend="fw"))
            assert leaked.ref is not None
            assert leaked.ref.sys == "hello"
        with pytest.raises(AssertionError) as info:
            tracker.check()
        assert handles == [5]  # the value itself agrees: five handles still open
        await leaked.release()
        assert handles == [0]
        tracker.check()  # released now: nothing to report
    report = str(info.value)
    assert "5 handle(s) never released:" in report
    lines = [line.strip() for line in report.splitlines()[1:]]
    assert len(lines) == 5
    for line in lines:
        # what it is, the engine function that made it, and the test's frame
        assert re.fullmatch(
            r"CachedResultWithKeys sha256:[0-9a-f]{64}, made in \w+ "
            r"\(solver/bridge/_bridge\.py:\d+\), from "
            r"test_a_leaked_solve_result_is_reported_with_where_it_was_made "
            r"\(tests/test_handle_tracker\.py:\d+\)",
            line,
        ), line


async def test_every_handle_of_a_released_solve_is_seen_released() -> None:
    handles = [0]
    with track_handles() as tracker:
        async with plain_solver(handles) as s:
            async with await s.solve(SolveRequest(frontend="fw")) as res:
                assert len(res.refs) == 3
                assert len(tracker.live) >= 5
            async with await s.solve(DEFINITION) as res:
                assert res.ref is not None
        tracker.check()
    assert handles == [0]


async def test_a_leaked_build_result_is_reported() -> None:
    handles = [0]
    with track_handles() as tracker:
        async with plain_solver(handles) as s:
            job = s.new_job()
            kept = await job.build(DEFINITION.to_vertices(s.op_kinds))
            copy = kept.clone()  # a caller's clone of a build result: a handle too
            await kept.release()
            await job.discard()
        assert [line.split(",")[0] for line in tracker.leaks] == [
            f"CachedResultWithKeys {copy.id}"
        ]
        assert "test_a_leaked_build_result_is_reported" in tracker.leaks[0]
        await copy.release()
        tracker.check()
    assert handles == [0]
