"""The worker's kinds derive an op's parsed payload and cache digest once per op
digest (``solver/worker/_opmemo.py``), not once per build: a definition read
again from JSON resolves its ops without parsing or encoding their payloads
again; another payload is derived anew; a bad payload still fails with its
error every time; and what depends on the files (a local source's content)
stays per build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from solver import (
    Definition,
    DefinitionError,
    OpContext,
    OpDef,
    OpKindRegistry,
    OutputRef,
    Solver,
)
from solver.testing import HandleTracker
from solver.worker import State, Worker, _exec, _fileops, merge, run
from solver.worker._opmemo import MAX_OPS, OpMemo

pytestmark = pytest.mark.anyio


def graph(tree: Path, units: int, tag: str = "") -> State:
    src = State.local(tree)
    steps = [
        run(["/bin/sh", "-c", f"cat src/u{i} > out{tag}"], root=State.scratch(),
            mounts={"src": State.scratch().copy(src, "/", "/", include=[f"u{i}"])},
            readonly=["src"], name=f"step {i}")
        for i in range(units)
    ]
    return merge(steps)


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls = [0]
    real: Callable[..., Any] = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


async def test_a_definition_read_again_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handle_tracker: HandleTracker
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(4):
        (tree / f"u{i}").write_text(f"unit {i}\n")
    text = graph(tree, 3).definition().to_json()
    exec_digests = counting(monkeypatch, _exec, "cache_digest")
    file_keys = counting(monkeypatch, _fileops, "file_keys")
    async with (
        Worker(tmp_path / "store", sandbox="none") as worker,
        Solver(worker=worker) as solver,
    ):
        for build in range(3):
            if build == 2:  # the host files change: the content is per build
                (tree / "u1").write_text("unit one\n")
            defn = Definition.from_json(text)  # new payload objects each build
            async with await solver.solve(defn) as result:
                assert result.ref is not None
                merged = result.ref.sys
                out = await merged.read_bytes("out")  # type: ignore[attr-defined]
                assert out == b"unit 2\n"  # the last input wins
                executed = result.summary.executed if result.summary else -1
                # Each op derived once, in the first build only.
                assert (exec_digests[0], file_keys[0]) == (3, 3)
                assert executed == [
                    1 + 3 + 3 + 1,  # source, copies, steps, merge
                    0,
                    1 + 1 + 1 + 1,  # source, copy and step of u1, merge
                ][build]
        # Another payload is another digest: derived anew.
        other = Definition.from_json(graph(tree, 4).definition().to_json())
        async with await solver.solve(other):
            pass
        assert (exec_digests[0], file_keys[0]) == (4, 4)


def context(payload: dict[str, Any]) -> OpContext:
    op = OpDef("exec", payload)

    class _Vertex:
        digest = op.digest
        inputs = ()
        name = "v"
        sys = op

    return OpContext("exec", op.payload, _Vertex(), None, 0)  # type: ignore[arg-type]


def test_an_error_is_raised_every_time_and_never_kept() -> None:
    made: list[str] = []

    def derive(ctx: OpContext) -> str:
        made.append(ctx.kind)
        raise DefinitionError("bad payload")

    memo: OpMemo[str] = OpMemo(derive)
    ctx = context({"args": []})
    for _ in range(2):
        with pytest.raises(DefinitionError, match="bad payload"):
            memo.get(ctx)
    assert len(made) == 2
    assert len(memo) == 0


def test_a_payload_that_is_not_the_ops_own_is_not_memoised() -> None:
    """A context whose payload is not its vertex's OpDef payload (a caller's
    own vertex) is derived every time: nothing content-addressed to key on."""
    memo: OpMemo[int] = OpMemo(lambda ctx: len(ctx.payload))
    ctx = context({"a": 1})
    stranger = OpContext("exec", {"a": 1, "b": 2}, ctx.vertex, ctx.builder, 0)
    assert memo.get(ctx) == 1
    assert memo.get(ctx) == 1
    assert memo.get(stranger) == 2
    assert memo.get(stranger) == 2
    assert memo.made == 1 + 2


def test_the_memo_is_bounded() -> None:
    memo: OpMemo[str] = OpMemo(lambda ctx: str(ctx.payload["n"]))
    for n in range(MAX_OPS + 5):
        memo.get(context({"n": n}))
    assert len(memo) <= MAX_OPS
    assert memo.made == MAX_OPS + 5


def test_exec_payload_errors_are_unchanged(tmp_path: Path) -> None:
    """The exec kind's factory still refuses a mount of an input the op lacks,
    with the same text (the check is part of what is derived)."""
    kinds = Worker(tmp_path / "store", sandbox="none").op_kinds
    payload = {"args": ["true"], "mounts": [{"dest": "src", "input": 1}]}
    ctx = context(payload)
    for _ in range(2):
        with pytest.raises(DefinitionError, match=r"mounts\[0\]\.input is 1, but the op has 0"):
            kinds.require("exec").factory(ctx)


def test_exec_payloads_read_again_from_json_are_validated_without_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation checks each exec payload of every definition read; one equal to
    a payload parsed before (new objects, same canonical text) takes the parsed
    form from before; a bad one fails with its error every time."""
    kinds = Worker(tmp_path / "store", sandbox="none").op_kinds
    tree = tmp_path / "tree"
    tree.mkdir()
    text = graph(tree, 3, "-v").definition().to_json()
    Definition.from_json(text).validate(kinds)  # parsed here
    parses = counting(monkeypatch, _exec, "_parse_payload")
    for _ in range(3):
        Definition.from_json(text).validate(kinds)
    assert parses[0] == 0
    # Another payload is parsed.
    Definition.from_json(graph(tree, 4, "-v").definition().to_json()).validate(kinds)
    assert parses[0] == 1
    op = OpDef("exec", {"args": "not a list"})
    bad = Definition({op.digest: op}, OutputRef(op.digest), {}, 1)
    for _ in range(2):
        with pytest.raises(DefinitionError, match="invalid payload"):
            bad.validate(kinds)
    assert parses[0] == 1 + 2


def test_the_op_check_is_kept_per_class() -> None:
    """``resolve_op`` accepts an Op's class after one check, and refuses what is
    not an Op every time."""

    class Step:
        async def cache_map(self, index: int) -> Any:
            raise AssertionError

        async def exec(self, inputs: Any) -> Any:
            raise AssertionError

    class NotAStep:
        async def cache_map(self, index: int) -> Any:
            raise AssertionError

    kinds = OpKindRegistry()
    kinds.register("t.step", lambda ctx: Step())  # type: ignore[arg-type,return-value]
    kinds.register("t.half", lambda ctx: NotAStep())  # type: ignore[arg-type,return-value]

    def vertex(kind: str) -> Any:
        op = OpDef(kind, {})

        class _Vertex:
            digest = op.digest
            inputs = ()
            name = "v"
            sys = op

        return _Vertex()

    for _ in range(2):
        assert isinstance(kinds.resolve_op(vertex("t.step"), None), Step)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="returned NotAStep, which is not an Op"):
            kinds.resolve_op(vertex("t.half"), None)  # type: ignore[arg-type]
    assert kinds._op_types == {Step}
