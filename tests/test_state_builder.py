"""The State builder: what definitions it makes, and that they solve."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from solver import Definition, OpKindRegistry, Solver, node
from solver.testing import HandleTracker
from solver.worker import SnapshotView, Worker
from solver.worker.state import State, merge


def kinds(defn: Definition) -> list[str]:
    return sorted(op.kind for op in defn.ops.values())


def output_op(defn: Definition):  # type: ignore[no-untyped-def]
    return defn.ops[defn.output.digest]


def test_file_actions_fold_into_one_op() -> None:
    src = State.inline({"a": "1"})
    st = State.scratch().mkdir("d").mkfile("d/f", "x").copy(src, "a", "d/a").rm("d/f")
    defn = st.definition()
    assert kinds(defn) == ["file", "source.inline"]
    op = output_op(defn)
    assert op.payload == {
        "base": None,
        "actions": [
            {"action": "mkdir", "path": "d", "parents": True},
            {"action": "mkfile", "path": "d/f", "data": "x"},
            {"action": "copy", "from": 0, "src": "a", "dest": "d/a"},
            {"action": "rm", "path": "d/f"},
        ],
    }
    assert op.inputs[0].digest == src.output.node.digest


def test_base_and_copy_sources_are_numbered() -> None:
    a, b = State.inline({"a": "1"}), State.inline({"b": "2"})
    st = a.copy(b, "b", "b2").copy(a, "a", "a2").copy(b, "b", "b3")
    op = output_op(st.definition())
    assert op.payload["base"] == 0
    assert [r.digest for r in op.inputs] == [
        a.output.node.digest, b.output.node.digest, a.output.node.digest
    ]
    assert [x["from"] for x in op.payload["actions"]] == [1, 2, 1]


def test_digests_are_stable_and_names_do_not_change_them() -> None:
    def build(name: str) -> Definition:
        return (State.inline({"x": "1", "y": b"\x00"})
                .mkfile("z", "2").with_name(name).definition())

    one, two = build("one"), build("two")
    assert one.output == two.output
    assert Definition.from_json(one.to_json()) == one
    assert output_op(one).kind == "file"
    assert one.metadata[one.output.digest].name == "one"
    # a state with no pending actions is renamed by re-noding its op
    named = State.inline({"x": "1"}).with_name("src").definition()
    assert named.metadata[named.output.digest].name == "src"
    assert named.output.digest == State.inline({"x": "1"}).output.node.digest


def test_a_new_step_after_an_op_starts_a_new_file_op() -> None:
    st = State.scratch().mkfile("a", "1")
    merged = merge([st, State.inline({"b": "2"})]).mkfile("c", "3")
    defn = merged.definition()
    assert kinds(defn) == ["file", "file", "merge", "source.inline"]
    assert merge([State.scratch(), st]).output == st.output


def test_from_node_is_the_extension_point() -> None:
    n = node("myapp.thing", {"x": 1})
    st = State.from_node(n).mkfile("f", "1")
    defn = st.definition()
    assert output_op(defn).inputs[0].digest == n.digest
    assert State.from_node(n).output.node is n


@pytest.mark.anyio
async def test_multi_step_build_solves(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    src = tmp_path / "project"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("print(1)\n")
    (src / "pkg" / "mod.pyc").write_bytes(b"junk")
    (src / "README").write_text("readme")
    local = State.local(src, exclude=["*.pyc"])
    app = (State.scratch()
           .mkdir("app")
           .copy(local, "pkg", "app/pkg")
           .mkfile("app/VERSION", "1.0\n")
           .with_name("assemble"))
    docs = State.scratch().copy(local, "README", "docs/")
    final = merge([app, docs, State.inline({"app/VERSION": "2.0\n"})]).rm("app/pkg/mod.py")
    registry_names: list[str]
    with anyio.fail_after(30):
        async with Worker(tmp_path / "w") as w, Solver(op_kinds=w.op_kinds) as s:
            registry: OpKindRegistry = w.op_kinds
            registry_names = registry.names()
            async with await s.solve(final.definition()) as result:
                assert result.ref is not None
                view = result.ref.sys
                assert isinstance(view, SnapshotView)
                paths = [st.path for st in await view.walk()]
                assert paths == ["app", "app/VERSION", "app/pkg", "docs", "docs/README"]
                assert await view.read_bytes("app/VERSION") == b"2.0\n"
                assert await view.read_bytes("docs/README") == b"readme"
        assert list((w.store.root / "tmp").iterdir()) == []
    assert {"file", "merge", "source.inline", "source.local"} <= set(registry_names)
