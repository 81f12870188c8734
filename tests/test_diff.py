"""``diff_definitions`` and ``solver diff``: which ops differ, root cause first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solver import Definition, diff_definitions, node
from solver.cli import main


def chain(flag: str = "-O2", *, extra: dict[str, object] | None = None) -> Definition:
    src = node("source.inline", {"files": {"a.c": "int a;"}}, name="sources")
    compile_ = node(
        "exec",
        {"args": ["cc", "-c", flag, "a.c"], **(extra or {})},
        inputs=[src],
        name="compile",
    )
    link = node("exec", {"args": ["cc", "-o", "app", "a.o"]}, inputs=[compile_], name="link")
    test = node("exec", {"args": ["./app"]}, inputs=[link], name="test")
    return Definition.of(test)


def test_the_same_definition_has_no_changes() -> None:
    assert diff_definitions(chain(), chain()) == []


def test_a_field_deep_in_a_chain_is_the_root_cause_and_every_op_above_names_it() -> None:
    changes = diff_definitions(chain("-O2"), chain("-O3"))
    assert [(c.name, c.field, c.root_cause) for c in changes] == [
        ("compile", "payload.args[2]", True),
        ("link", "input 0", False),
        ("test", "input 0", False),
    ]
    first = changes[0]
    assert (first.before, first.after, first.cause) == ("-O2", "-O3", None)
    assert [c.cause for c in changes[1:]] == ["compile", "compile"]
    assert first.describe().startswith("compile (sha256:")
    assert first.describe().endswith(": payload.args[2]: '-O2' -> '-O3'")
    assert changes[1].describe() == "link: input 0 changed, from compile"


def test_first_differing_field_kind_payload_inputs() -> None:
    a = Definition.of(node("exec", {"args": ["x"], "env": {"A": "1", "B": "2"}}))
    b = Definition.of(node("exec", {"args": ["x"], "env": {"A": "1", "B": "3"}}))
    (change,) = diff_definitions(a, b)
    assert (change.field, change.before, change.after) == ("payload.env.B", "2", "3")
    # a key only one side has: None on the other
    c = Definition.of(node("exec", {"args": ["x"], "cwd": "sub"}))
    (change,) = diff_definitions(Definition.of(node("exec", {"args": ["x"]})), c)
    assert (change.field, change.before, change.after) == ("payload.cwd", None, "sub")
    # a longer list with the same start
    d = Definition.of(node("exec", {"args": ["x", "y"]}))
    (change,) = diff_definitions(Definition.of(node("exec", {"args": ["x"]})), d)
    assert (change.field, change.before, change.after) == ("payload.args (length)", 1, 2)
    # another kind wins over the payload
    e = Definition.of(node("file", {"args": ["x"]}))
    (change,) = diff_definitions(Definition.of(node("exec", {"args": ["y"]})), e)
    assert (change.field, change.before, change.after) == ("kind", "exec", "file")
    # another number of inputs
    s = node("source.inline", {"files": {}})
    one = Definition.of(node("merge", {}, inputs=[s]))
    two = Definition.of(node("merge", {}, inputs=[s, node("source.inline", {"files": {"b": ""}})]))
    (change,) = diff_definitions(one, two)
    assert (change.field, change.before, change.after) == ("inputs", 1, 2)
    # a bool is not an int, even where they compare equal
    t = Definition.of(node("exec", {"args": ["x"], "n": True}))
    (change,) = diff_definitions(Definition.of(node("exec", {"args": ["x"], "n": 1})), t)
    assert change.field == "payload.n"


def test_metadata_changes_are_listed_after_the_ops() -> None:
    plain = Definition.of(node("exec", {"args": ["x"]}, name="step"))
    ignored = Definition.of(node("exec", {"args": ["x"]}, name="step", ignore_cache=True))
    (change,) = diff_definitions(plain, ignored)
    assert change.a == change.b
    assert (change.field, change.before, change.after) == ("metadata.ignore_cache", False, True)
    assert not change.root_cause


def test_two_root_causes_deepest_first() -> None:
    a = chain("-O2")
    src = node("source.inline", {"files": {"a.c": "int b;"}}, name="sources")
    compile_ = node("exec", {"args": ["cc", "-c", "-O3", "a.c"]}, inputs=[src], name="compile")
    link = node("exec", {"args": ["cc", "-o", "app", "a.o"]}, inputs=[compile_], name="link")
    b = Definition.of(node("exec", {"args": ["./app"]}, inputs=[link], name="test"))
    changes = diff_definitions(a, b)
    # both changed their own fields: the deeper one comes first, and the ops
    # above them name the first root cause on their path
    assert [(c.name, c.field, c.cause) for c in changes] == [
        ("sources", "payload.files.a.c", None),
        ("compile", "payload.args[2]", None),
        ("link", "input 0", "compile"),
        ("test", "input 0", "compile"),
    ]


def test_cli_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(chain("-O2").to_json())
    b.write_text(chain("-O3").to_json())
    assert main(["diff", str(a), str(a)]) == 0
    assert capsys.readouterr().out == ""
    assert main(["diff", str(a), str(b)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("compile (")
    assert lines[1:] == [
        "link: input 0 changed, from compile",
        "test: input 0 changed, from compile",
    ]
    assert main(["diff", "--format", "json", str(a), str(b)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in doc] == ["compile", "link", "test"]
    assert doc[0]["root_cause"] is True
    assert doc[0]["before"] == "-O2"


def test_cli_diff_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "a.json"
    good.write_text(chain().to_json())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["diff", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"solver: error: {bad}")
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert main(["diff", str(good), str(tmp_path / "missing.json")]) != 0
    err = capsys.readouterr().err
    assert "missing.json" in err
    assert "Traceback" not in err


def test_another_output_of_the_same_op() -> None:
    two = node("exec", {"args": ["x"], "mounts": []}, name="two outputs")
    a = Definition.of(node("merge", {}, inputs=[two.output(0)], name="top"))
    b = Definition.of(node("merge", {}, inputs=[two.output(1)], name="top"))
    (change,) = diff_definitions(a, b)
    assert (change.name, change.field) == ("top", "input 0")
    assert change.cause == "two outputs (output 0 -> 1)"
    # the definitions' own output index
    (change,) = diff_definitions(Definition.of(two.output(0)), Definition.of(two.output(1)))
    assert (change.field, change.before, change.after) == ("output", 0, 1)
