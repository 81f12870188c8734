"""``Solver.solve``: definitions in, a ``SolveResult`` that owns its handles out."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from harness import resolve_op, unwrap, vtx

from solver import (
    CacheMap,
    CacheMapDep,
    Definition,
    DefinitionError,
    Edge,
    OpContext,
    OpKindRegistry,
    Result,
    SolveError,
    Solver,
    SolveRequest,
    digest_of,
    node,
)
from solver.testing import CountingResult, HandleTracker

pytestmark = pytest.mark.anyio


class TextOp:
    """``test.text`` joins its inputs' text with its own ``text`` payload."""

    def __init__(self, ctx: OpContext, execs: list[str]) -> None:
        self.text = str(ctx.payload["text"])
        self.inputs = ctx.inputs
        self.execs = execs

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        deps = [CacheMapDep() for _ in range(self.inputs)]
        return CacheMap(digest_of(f"text:{self.text}".encode()), deps), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.execs.append(self.text)
        joined = "".join(str(r.sys) for r in inputs) + self.text
        return [CountingResult(id=digest_of(joined.encode()), value=joined)]


def registry(execs: list[str]) -> OpKindRegistry:
    kinds = OpKindRegistry()
    kinds.register("test.text", lambda ctx: TextOp(ctx, execs))
    return kinds


def graph(leaf: str = "a") -> Definition:
    a = node("test.text", {"text": leaf}, name=f"leaf {leaf}")
    b = node("test.text", {"text": "b"}, inputs=[a])
    return Definition.of(node("test.text", {"text": "c"}, inputs=[b]))


async def test_solve_then_solve_again_from_cache(handle_tracker: HandleTracker) -> None:
    execs: list[str] = []
    with anyio.fail_after(10):
        async with Solver(op_kinds=registry(execs)) as s:
            async with await s.solve(graph()) as result:
                assert result.ref is not None
                assert result.ref.sys == "abc"
            assert execs == ["a", "b", "c"]
            # the round trip through JSON is the same work: all from cache
            again = Definition.from_json(graph().to_json())
            async with await s.solve(SolveRequest(definition=again)) as result:
                assert result.ref is not None
                assert result.ref.sys == "abc"
            assert execs == ["a", "b", "c"]
            # a changed leaf re-runs the leaf and what depends on it
            async with await s.solve(graph("x")) as result:
                assert result.ref is not None
                assert result.ref.sys == "xbc"
            assert execs == ["a", "b", "c", "x", "b", "c"]


async def test_release_is_idempotent(handle_tracker: HandleTracker) -> None:
    async with Solver(op_kinds=registry([])) as s:
        result = await s.solve(graph())
        await result.release()
        await result.release()
        assert result.released


async def test_invalid_definition_fails_before_anything_runs(
    handle_tracker: HandleTracker,
) -> None:
    execs: list[str] = []
    bad = Definition.of(node("test.unknown", {}, inputs=[node("test.text", {"text": "a"})]))
    async with Solver(op_kinds=registry(execs)) as s:
        with pytest.raises(DefinitionError, match=r"unknown op kind .test\.unknown."):
            await s.solve(bad)
    assert execs == []


async def test_frontend_requests_need_a_known_frontend() -> None:
    async with Solver(op_kinds=registry([])) as s:
        with pytest.raises(SolveError, match="unknown frontend 'nope'"):
            await s.solve(SolveRequest(frontend="nope"))
        with pytest.raises(SolveError, match="needs a definition"):
            await s.solve(SolveRequest())


async def test_definitions_and_own_vertices_share_one_solver(
    handle_tracker: HandleTracker,
) -> None:
    """A solver with both a resolve_op and op kinds serves both kinds of vertex."""
    async with Solver(resolve_op=resolve_op, op_kinds=registry([])) as s:
        res = await s.new_job().build(Edge(vtx(value="own")))
        assert unwrap(res) == "own"
        await res.release()
        async with await s.solve(graph()) as result:
            assert result.ref is not None
            assert result.ref.sys == "abc"


async def test_own_vertices_need_resolve_op(handle_tracker: HandleTracker) -> None:
    async with Solver(op_kinds=registry([])) as s:
        with pytest.raises(SolveError, match="given no resolve_op"):
            await s.new_job().build(Edge(vtx()))


async def test_ignore_cache_reruns_the_op_and_its_direct_consumers(
    handle_tracker: HandleTracker,
) -> None:
    """What docs/definition-format.md says of ``ignore_cache``: the op runs again,
    so do the ops that consume it directly (it offers no key); those offer their
    usual keys, so ops further up come from the cache, as does an op beside it."""
    from frontend_support import Ops

    ops = Ops()

    def graph(ignore: bool) -> Definition:
        a = node("test.text", {"text": "a"}, ignore_cache=ignore)
        b = node("test.text", {"text": "b"}, inputs=[a])
        c = node("test.text", {"text": "c"}, inputs=[b])
        side = node("test.text", {"text": "s"})
        return Definition.of(node("test.text", {"text": "!"}, inputs=[c, side]))

    async with Solver(op_kinds=ops.registry()) as s:
        async with await s.solve(graph(False)) as res:
            assert res.ref is not None
            assert res.ref.sys == "abcs!"
        assert sorted(ops.execs) == ["!", "a", "b", "c", "s"]
        ops.execs.clear()
        async with await s.solve(graph(False)):
            pass
        assert ops.execs == []
        async with await s.solve(graph(True)) as res:
            assert res.ref is not None
            assert res.ref.sys == "abcs!"
        assert sorted(ops.execs) == ["a", "b"]  # not "c", "!" above b, nor "s"


async def test_a_cancelled_step_reports_canceled_in_progress(
    handle_tracker: HandleTracker,
) -> None:
    """A step cancelled because its sibling failed ends with an error event that
    says "canceled", not the backend's text about cancel scopes."""
    from frontend_support import Ops

    ops = Ops()
    gate = node("test.gate", {"text": "g"})
    fail = node("test.fail", {"message": "boom"})
    defn = Definition.of(node("test.text", {"text": "top"}, inputs=[gate, fail]))
    async with Solver(op_kinds=ops.registry()) as s:
        job = s.new_job()
        with pytest.raises(SolveError, match="boom"):
            await s.solve(defn, job=job)
        await job.discard()
        events = [ev async for ev in job.status()]
    assert ops.cancelled == ["g"]
    errors = {ev.error for ev in events if ev.status == "error"}
    assert "canceled" in errors, errors
    assert not any("cancel scope" in (e or "") for e in errors), errors


async def test_a_definition_is_validated_once_per_solve(
    handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``solve`` validates the definition once (it was twice: once in ``solve``,
    once in ``to_vertices``), and still before it makes a job: a bad definition
    raises and leaves no job behind."""
    validations = [0]
    validate = Definition.validate

    def counted(self: Definition, kinds: OpKindRegistry | None = None) -> None:
        validations[0] += 1
        validate(self, kinds)

    monkeypatch.setattr(Definition, "validate", counted)
    execs: list[str] = []
    async with Solver(op_kinds=registry(execs)) as s:
        async with await s.solve(graph()) as res:
            assert res.ref is not None
            assert res.ref.sys == "abc"
        assert validations[0] == 1
        bad = Definition.of(node("test.unknown", {}))
        with pytest.raises(DefinitionError):
            await s.solve(bad)
        assert validations[0] == 2
        assert not s._jobs
