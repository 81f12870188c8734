"""Definitions (SPEC §7): the canonical op encoding and its digests, the JSON
document, validation before anything runs, op kinds, and solving a definition
with the engine."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from solver import (
    CachedResult,
    CacheMap,
    CacheMapDep,
    Edge,
    Op,
    Result,
    SolveError,
    Solver,
    Vertex,
    VertexOptions,
    digest_of,
)
from solver.definition._definition import (
    DEFINITION_VERSION,
    MAX_PAYLOAD_DEPTH,
    Definition,
    DefinitionError,
    DefinitionVertex,
    JSONValue,
    Node,
    NodeOutput,
    OpDef,
    OpMetadata,
    OutputRef,
    canonical_json,
    node,
    op_digest,
)
from solver.definition._opkind import OpContext, OpKind, OpKindRegistry, default_op_kinds
from solver.testing import CountingResult, HandleTracker

ROOT = Path(__file__).resolve().parent.parent

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


# -- the golden definition -----------------------------------------------------------------

# Computed once; they must never change (a change breaks every stored definition
# and every cache keyed by op digests).
GOLDEN_SOURCE_BYTES = (
    b'{"inputs":[],"kind":"test.const","payload":{"flag":true,"n":-42,'
    b'"nested":{"a":[{}],"z":1},"opt":null,"tags":["b","a"],"value":"hello"}}'
)
GOLDEN_SOURCE = "sha256:69733692af0e8615a541081492e26bdb561f6f2d87b5d30b828bc9bdeb4ea346"
GOLDEN_OUTPUT = "sha256:8203d75e1e86c1b825f1ba0475c5f0e150f9dcbe7bc9072a0a6e661278fe08fe"
GOLDEN_TEXT = 'h\u00e9llo \u2603 \U0001d11e "q" \\ \n\t\x01'

GOLDEN_SCRIPT = """
from solver.definition import Definition, node
src = node("test.const", {"value": "hello", "n": -42, "tags": ["b", "a"], "opt": None,
                          "flag": True, "nested": {"z": 1, "a": [{}]}}, name="source")
out = node("test.concat", {"sep": "-", "text": GOLDEN_TEXT}, inputs=[src, src.output(0)])
d = Definition.of(out)
print(src.digest, out.digest, hash("x") % 1000)
""".replace("GOLDEN_TEXT", repr(GOLDEN_TEXT))


def golden() -> Definition:
    # Keys deliberately out of order: the encoding sorts them.
    src = node(
        "test.const",
        {
            "value": "hello",
            "n": -42,
            "tags": ["b", "a"],
            "opt": None,
            "flag": True,
            "nested": {"z": 1, "a": [{}]},
        },
        name="source",
    )
    out = node("test.concat", {"sep": "-", "text": GOLDEN_TEXT}, inputs=[src, src.output(0)])
    return Definition.of(out)


def test_golden_digests() -> None:
    d = golden()
    src = d.ops[GOLDEN_SOURCE]
    assert src.canonical_bytes() == GOLDEN_SOURCE_BYTES
    assert hashlib.sha256(GOLDEN_SOURCE_BYTES).hexdigest() == GOLDEN_SOURCE[7:]
    assert d.output == OutputRef(GOLDEN_OUTPUT, 0)
    assert set(d.ops) == {GOLDEN_SOURCE, GOLDEN_OUTPUT}
    out = d.ops[GOLDEN_OUTPUT]
    assert out.digest == digest_of(out.canonical_bytes())
    assert out.inputs == (OutputRef(GOLDEN_SOURCE, 0), OutputRef(GOLDEN_SOURCE, 0))
    assert d.metadata == {GOLDEN_SOURCE: OpMetadata(name="source")}


def test_golden_digests_in_other_processes() -> None:
    """The digests do not depend on the hash seed (or anything else per process)."""
    seen = set()
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", GOLDEN_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        assert out[:2] == [GOLDEN_SOURCE, GOLDEN_OUTPUT]
        seen.add(out[2])
    assert len(seen) > 1  # the seeds really changed str hashing


def test_unicode_is_written_as_utf8_and_controls_escaped() -> None:
    text = canonical_json({"s": "é☃𝄞\x7f\u2028", "c": '\x00\x1f\b\f\n\r\t"\\/'})
    assert text == (
        b'{"c":"\\u0000\\u001f\\b\\f\\n\\r\\t\\"\\\\/","s":"' + "é☃𝄞\x7f\u2028".encode() + b'"}'
    )


def test_keys_sort_by_code_point() -> None:
    keys = ["z", "a", "Z", "é", "\uffff", "😀", "", "aa", "a\x00"]
    text = canonical_json(dict.fromkeys(keys, 0)).decode()
    assert list(json.loads(text)) == sorted(keys)
    # code point order, not UTF-16 order: U+1F600 comes after U+FFFF
    assert text.index("😀") > text.index("\uffff")


def test_digest_ignores_key_order_and_container_types() -> None:
    a = OpDef("k.x", {"a": 1, "b": {"y": [1, 2], "x": None}})
    b = OpDef("k.x", {"b": {"x": None, "y": (1, 2)}, "a": 1})
    assert a == b
    assert hash(a) == hash(b)
    assert a.digest == b.digest == op_digest("k.x", {"b": {"x": None, "y": [1, 2]}, "a": 1})
    assert (
        a.canonical_bytes()
        == b'{"inputs":[],"kind":"k.x","payload":{"a":1,"b":{"x":null,"y":[1,2]}}}'
    )


def test_digest_tells_apart_what_python_equality_does_not() -> None:
    one = OpDef("k.x", {"v": 1})
    true = OpDef("k.x", {"v": True})
    assert one.payload == true.payload  # True == 1 in Python...
    assert one != true  # ...but they are different ops
    assert one.digest != true.digest


def test_digest_covers_kind_payload_and_inputs() -> None:
    base = OpDef("k.x", {"v": 1}, (OutputRef(D1, 0),))
    assert base.digest != OpDef("k.y", {"v": 1}, (OutputRef(D1, 0),)).digest
    assert base.digest != OpDef("k.x", {"v": 2}, (OutputRef(D1, 0),)).digest
    assert base.digest != OpDef("k.x", {"v": 1}, (OutputRef(D1, 1),)).digest
    assert base.digest != OpDef("k.x", {"v": 1}, (OutputRef(D2, 0),)).digest
    assert base.digest != OpDef("k.x", {"v": 1}, (OutputRef(D1, 0), OutputRef(D1, 0))).digest


def test_metadata_is_outside_the_digest() -> None:
    plain = node("k.x", {"v": 1})
    named = node("k.x", {"v": 1}, name="n", description={"a": "b"}, ignore_cache=True)
    assert plain.digest == named.digest
    assert Definition.of(plain).output == Definition.of(named).output
    assert Definition.of(plain) != Definition.of(named)


def test_payload_is_a_frozen_copy() -> None:
    payload: dict[str, JSONValue] = {"list": [1, 2], "obj": {"k": "v"}}
    op = OpDef("k.x", payload)
    before = op.digest
    payload["list"] = [3]
    assert op.payload == {"list": [1, 2], "obj": {"k": "v"}}
    assert op.digest == before == OpDef("k.x", {"list": [1, 2], "obj": {"k": "v"}}).digest
    with pytest.raises(TypeError):
        op.payload["new"] = 1  # type: ignore[index]
    obj = op.payload["obj"]
    assert isinstance(obj, Mapping)
    with pytest.raises(TypeError):
        obj.clear()  # type: ignore[attr-defined]
    items = op.payload["list"]
    assert isinstance(items, list)
    with pytest.raises(TypeError):
        items.append(3)
    with pytest.raises(TypeError):
        items += [3]
    assert pickle.loads(pickle.dumps(op)) == op


def test_str_and_int_subclasses_become_plain_values() -> None:
    class Name(str):
        pass

    class Count(int):
        pass

    op = OpDef("k.x", {Name("a"): Name("b"), "n": Count(3)})
    assert op.payload == {"a": "b", "n": 3}
    assert type(op.payload["a"]) is str
    assert type(op.payload["n"]) is int


# -- the JSON document -------------------------------------------------------------------------


def test_document_shape() -> None:
    d = golden()
    doc = json.loads(d.to_json())
    assert doc["version"] == 1
    assert doc["output"] == [GOLDEN_OUTPUT, 0]
    assert doc["ops"][GOLDEN_SOURCE] == json.loads(GOLDEN_SOURCE_BYTES)
    assert doc["metadata"] == {
        GOLDEN_SOURCE: {"name": "source", "description": {}, "ignore_cache": False}
    }
    # each op object in the document is exactly the text its digest covers
    assert GOLDEN_SOURCE_BYTES.decode() in d.to_json()
    assert Definition.from_json(d.to_json()) == d
    assert Definition.from_json(d.to_json().encode()) == d


def test_reader_ignores_layout_key_order_and_escapes() -> None:
    d = golden()
    doc = json.loads(d.to_json())
    pretty = json.dumps(
        {k: doc[k] for k in ("output", "ops", "version", "metadata")}, indent=3, ensure_ascii=True
    )
    back = Definition.from_json(pretty)
    assert back == d
    assert back.to_json() == d.to_json()


def test_metadata_fields_are_optional_when_reading() -> None:
    op = OpDef("k.x", {})
    text = json.dumps(
        {
            "version": 1,
            "ops": {op.digest: {"kind": "k.x", "payload": {}, "inputs": []}},
            "metadata": {op.digest: {"ignore_cache": True}},
            "output": [op.digest, 0],
        }
    )
    d = Definition.from_json(text)
    assert d.metadata[op.digest] == OpMetadata(ignore_cache=True)
    no_meta = json.loads(text)
    del no_meta["metadata"]
    assert Definition.from_json(json.dumps(no_meta)).metadata == {}


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)
_payloads = st.dictionaries(st.text(max_size=8), _json_values, max_size=5)
_kinds = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,12}", fullmatch=True)


@st.composite
def definitions(draw: st.DrawFn) -> Definition:
    """A random DAG: each op takes inputs from ops made before it."""
    ops: list[OpDef] = []
    for i in range(draw(st.integers(1, 10))):
        picks = draw(st.lists(st.tuples(st.integers(0, 99), st.integers(0, 3)), max_size=3))
        refs = tuple(OutputRef(ops[j % i].digest, k) for j, k in picks) if i else ()
        ops.append(OpDef(draw(_kinds), draw(_payloads), refs))
    metadata = {}
    for op in draw(st.lists(st.sampled_from(ops), max_size=3)):
        metadata[op.digest] = OpMetadata(
            draw(st.text(max_size=8)),
            draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
            draw(st.booleans()),
        )
    out = draw(st.sampled_from(ops))
    shuffled = draw(st.permutations(ops))
    return Definition(
        {op.digest: op for op in shuffled}, OutputRef(out.digest, draw(st.integers(0, 2))), metadata
    )


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(definitions())
def test_round_trip(d: Definition) -> None:
    text = d.to_json()
    back = Definition.from_json(text)
    assert back == d
    assert back.to_json() == text  # deterministic, whatever order the ops were given in
    assert Definition(dict(reversed(list(d.ops.items()))), d.output, d.metadata).to_json() == text
    # The canonical text is what the standard encoder writes for the decoded document,
    # and each digest is recomputable from the decoded op alone.
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for digest, op_doc in doc["ops"].items():
        assert digest == digest_of(canonical_json(op_doc))
        assert digest == d.ops[digest].digest


@settings(deadline=None, max_examples=100)
@given(_payloads)
def test_canonical_json_is_the_standard_sorted_encoding(payload: dict[str, JSONValue]) -> None:
    expected = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical_json(payload) == expected.encode()
    assert OpDef("k.x", payload).payload == json.loads(expected)


# -- building in code ----------------------------------------------------------------------


def test_node_builder_and_definition_of() -> None:
    fetch = node("myapp.fetch", {"url": "https://example.com"}, name="fetch")
    split = node("myapp.split", {}, inputs=[fetch])
    parse = node(
        "myapp.parse",
        {"strict": True},
        inputs=[split.output(1), fetch],
        description={"why": "test"},
        ignore_cache=True,
    )
    d = Definition.of(parse)
    assert set(d.ops) == {fetch.digest, split.digest, parse.digest}
    assert d.output == OutputRef(parse.digest, 0)
    assert d.ops[parse.digest].inputs == (OutputRef(split.digest, 1), OutputRef(fetch.digest, 0))
    assert d.metadata == {
        fetch.digest: OpMetadata(name="fetch"),
        parse.digest: OpMetadata(description={"why": "test"}, ignore_cache=True),
    }
    assert Definition.of(split.output(1)).output == OutputRef(split.digest, 1)
    assert Definition.of(split).ops.keys() == {fetch.digest, split.digest}


def test_equal_ops_from_different_nodes_are_one_op() -> None:
    a1 = node("k.a", {"v": 1}, name="a")
    a2 = node("k.a", {"v": 1})
    top = node("k.top", inputs=[a1, a2])
    d = Definition.of(top)
    assert len(d.ops) == 2
    assert d.metadata == {a1.digest: OpMetadata(name="a")}


def test_conflicting_metadata_for_one_op() -> None:
    a1 = node("k.a", {"v": 1}, name="first")
    a2 = node("k.a", {"v": 1}, name="second")
    with pytest.raises(DefinitionError, match=r"kind 'k.a'\) is given two different metadata"):
        Definition.of(node("k.top", inputs=[a1, a2]))


def test_node_checks_its_inputs() -> None:
    a = node("k.a")
    with pytest.raises(DefinitionError, match=r"the input nodes do not match op\.inputs"):
        Node(OpDef("k.b", {}, (OutputRef(a.digest, 1),)), (NodeOutput(a, 0),))
    with pytest.raises(DefinitionError, match="an input must be a Node or NodeOutput, got str"):
        node("k.b", inputs=[NodeOutput("nope", 0)])  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="output index must be an int >= 0, got -1"):
        a.output(-1)


def test_the_documented_example_stays_true() -> None:
    """docs/definition-format.md shows a document, its ops' canonical bytes and the
    code that builds it: all three must agree with the implementation."""
    text = (ROOT / "docs" / "definition-format.md").read_text(encoding="utf-8")
    example = text.split("<!-- example-definition -->\n```json\n", 1)[1].split("```", 1)[0]
    d = Definition.from_json(example)  # checks every stated digest
    fetch = node(
        "myapp.fetch", {"url": "https://example.com/data.csv", "retries": 3}, name="fetch data"
    )
    parse = node(
        "myapp.parse",
        {"header": True, "columns": ["id", "name"]},
        inputs=[fetch],
        description={"owner": "team-data"},
    )
    assert Definition.of(parse) == d
    for op in d.ops.values():
        assert f"\n{op.canonical_bytes().decode()}\n" in text
    assert f"these {len(fetch.op.canonical_bytes())} bytes" in text
    schema = text.split("### Schema", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(schema)["required"] == ["version", "ops", "output"]


def test_reprs_are_short() -> None:
    d = golden()
    assert repr(d) == f"<Definition v1 ops=2 output={GOLDEN_OUTPUT[:19]}[0]>"
    assert repr(d.ops[GOLDEN_SOURCE]) == f"<OpDef test.const {GOLDEN_SOURCE[:19]} inputs=0>"


# -- validation: the document --------------------------------------------------------------


def doc_with(**changes: object) -> str:
    """A valid one-op document with top-level fields replaced (None deletes)."""
    op = OpDef("k.x", {"v": 1})
    doc: dict[str, object] = {
        "version": 1,
        "ops": {op.digest: {"kind": "k.x", "payload": {"v": 1}, "inputs": []}},
        "metadata": {},
        "output": [op.digest, 0],
    }
    for key, value in changes.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc)


def op_doc(
    kind: str = "k.x", payload: object = None, inputs: object = None, **extra: object
) -> dict[str, object]:
    body: dict[str, object] = {
        "kind": kind,
        "payload": {} if payload is None else payload,
        "inputs": [] if inputs is None else inputs,
    }
    body.update(extra)
    return body


def read_ops(ops: Mapping[str, object], output: object = None) -> Definition:
    first = next(iter(ops))
    return Definition.from_json(
        json.dumps({"version": 1, "ops": ops, "output": output or [first, 0]})
    )


def test_malformed_json_gives_the_position() -> None:
    with pytest.raises(DefinitionError) as info:
        Definition.from_json('{"version": 1,\n  "ops": {,}}')
    assert str(info.value) == (
        "malformed definition JSON: Expecting property name enclosed in double quotes: "
        "line 2 column 11 (char 25)"
    )
    assert isinstance(info.value, SolveError)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"version": 1, "x": "\xff"}', "not UTF-8 (invalid byte at position 21)"),
        ('{"version": 1, "version": 1}', "duplicate key 'version' in an object"),
        ("[1]", "a definition must be a JSON object, got array"),
        ("{}", "the definition has no 'version'; this library reads version 1"),
        (doc_with(version=2), "unsupported definition version 2; this library reads version 1"),
        (doc_with(version="1"), "definition version must be an integer, got string '1'"),
        (doc_with(version=1.0), "definition version must be an integer, got float 1.0"),
        (doc_with(ops=None), "the definition: missing field 'ops'"),
        (doc_with(output=None), "the definition: missing field 'output'"),
        (doc_with(extra=1), "the definition: unknown field 'extra'"),
        (doc_with(ops=[]), "'ops' must be a JSON object, got array"),
        (doc_with(metadata=[]), "'metadata' must be a JSON object, got array"),
        (doc_with(output="x"), "'output': expected [digest, index], got string 'x'"),
        (doc_with(output=[D1]), "'output': expected [digest, index], got array"),
        (doc_with(output=["sha256:AB", 0]), "'output': 'sha256:AB' is not an op digest"),
        (doc_with(output=[D1, 0]), f"'output' names op {D1}, which is not in the definition"),
        ('{"version": 1, "ops": {"a": NaN}, "output": []}', "op key 'a' is not a digest"),
    ],
)
def test_document_errors(text: str | bytes, message: str) -> None:
    with pytest.raises(DefinitionError) as info:
        Definition.from_json(text)
    assert message in str(info.value)


def test_output_index_must_be_a_non_negative_int() -> None:
    op = OpDef("k.x", {"v": 1})
    with pytest.raises(DefinitionError, match=r"'output': output index -1 is out of range"):
        Definition.from_json(doc_with(output=[op.digest, -1]))
    with pytest.raises(
        DefinitionError, match="'output': output index must be an integer, got boolean true"
    ):
        Definition.from_json(doc_with(output=[op.digest, True]))


def test_nesting_too_deep_for_the_reader() -> None:
    with pytest.raises(DefinitionError, match="nested too deeply"):
        Definition.from_json("[" * 100_000 + "]" * 100_000)


def test_from_json_takes_text_only() -> None:
    with pytest.raises(DefinitionError, match="read from str or bytes, got dict"):
        Definition.from_json({})  # type: ignore[arg-type]


# -- validation: ops -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x", "op {d}: expected an object, got string 'x'"),
        ({"payload": {}, "inputs": []}, "op {d}: missing field 'kind'"),
        (op_doc(extra=1), "op {d} (kind 'k.x'): unknown field 'extra'"),
        (
            {"kind": 7, "payload": {}, "inputs": []},
            "op {d}: 'kind' must be a string, got integer 7",
        ),
        (
            op_doc(kind="not a kind"),
            "op {d} (kind 'not a kind'): kind: 'not a kind' is not a valid op kind",
        ),
        (op_doc(payload=[1]), "op {d} (kind 'k.x'): 'payload' must be an object, got array"),
        (
            op_doc(inputs={}),
            "op {d} (kind 'k.x'): 'inputs' must be an array of [digest, index], got object",
        ),
        (
            op_doc(inputs=[D2]),
            "op {d} (kind 'k.x'): inputs[0]: expected [digest, index], got string",
        ),
        (
            op_doc(inputs=[[D2, -2]]),
            "op {d} (kind 'k.x'): inputs[0]: output index -2 is out of range",
        ),
        (
            op_doc(inputs=[[D2, 0], [D2, "1"]]),
            "op {d} (kind 'k.x'): inputs[1]: output index must be an integer, got string '1'",
        ),
        (
            op_doc(payload={"a": [0, {"b": 1.5}]}),
            'op {d} (kind \'k.x\'): payload["a"][1]["b"]: floats are not allowed (got 1.5)',
        ),
        (op_doc(payload={"a": 1e400}), 'payload["a"]: floats are not allowed (got inf)'),
        (
            op_doc(payload={"n": 2**63}),
            'payload["n"]: integer 9223372036854775808 is outside the signed 64-bit range',
        ),
        (
            op_doc(payload={"s": "\ud800"}),
            "op {d} (kind 'k.x'): payload: strings must be valid Unicode text "
            "(found the lone surrogate U+D800)",
        ),
    ],
)
def test_op_errors(body: object, message: str) -> None:
    with pytest.raises(DefinitionError) as info:
        read_ops({D1: body})
    assert message.format(d=D1) in str(info.value)
    assert info.value.vertex == D1


def test_nan_is_a_float() -> None:
    text = doc_with(ops={D1: op_doc()}).replace('"payload": {}', '"payload": {"x": NaN}')
    with pytest.raises(
        DefinitionError, match=r"payload\[\"x\"\]: floats are not allowed \(got nan\)"
    ):
        Definition.from_json(text)


def test_payload_nesting_limit() -> None:
    deep: JSONValue = 1
    for _ in range(MAX_PAYLOAD_DEPTH - 1):
        deep = [deep]
    OpDef("k.x", {"d": deep})  # the payload object is level 1
    with pytest.raises(DefinitionError, match=f"nested deeper than {MAX_PAYLOAD_DEPTH} levels"):
        OpDef("k.x", {"d": [deep]})


def test_stated_digest_must_match_content() -> None:
    real = OpDef("k.x", {"v": 1}).digest
    with pytest.raises(DefinitionError) as info:
        read_ops({D1: op_doc(payload={"v": 1})})
    assert str(info.value) == (
        f"op {D1} (kind 'k.x'): the stated digest does not match the op's content, "
        f"whose digest is {real}"
    )
    assert info.value.vertex == D1
    assert info.value.kind == "k.x"


def test_input_names_a_missing_op() -> None:
    a = OpDef("k.a", {})
    b = OpDef("k.b", {}, (OutputRef(a.digest, 0),))
    with pytest.raises(DefinitionError) as info:
        read_ops({b.digest: op_doc("k.b", inputs=[[a.digest, 0]])})
    assert str(info.value) == (
        f"op {b.digest} (kind 'k.b'): inputs[0] names op {a.digest}, which is not in the definition"
    )


def test_cycle_is_reported_with_its_ops() -> None:
    ops = {
        D1: op_doc("k.one", inputs=[[D2, 0]]),
        D2: op_doc("k.two", inputs=[[D3, 0]]),
        D3: op_doc("k.three", inputs=[[D1, 0]]),
    }
    with pytest.raises(DefinitionError) as info:
        read_ops(ops)
    assert str(info.value) == (
        f"the ops form a cycle of 3: {D1} (kind 'k.one') -> {D2} (kind 'k.two') -> "
        f"{D3} (kind 'k.three') -> {D1} (each op takes the next as an input)"
    )


def test_self_loop_is_a_cycle() -> None:
    with pytest.raises(DefinitionError, match=rf"cycle of 1: {D1} \(kind 'k.x'\) -> {D1} "):
        read_ops({D1: op_doc(inputs=[[D1, 0]])})


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ([], "metadata for op {d}: expected an object, got array"),
        ({"name": 1}, "metadata for op {d}: 'name' must be a string, got integer 1"),
        (
            {"description": {"a": 1}},
            "metadata for op {d}: 'description' must map strings to strings",
        ),
        (
            {"ignore_cache": 0},
            "metadata for op {d}: 'ignore_cache' must be a boolean, got integer 0",
        ),
        ({"color": "red"}, "metadata for op {d}: unknown field 'color'"),
    ],
)
def test_metadata_errors(meta: object, message: str) -> None:
    op = OpDef("k.x", {"v": 1})
    with pytest.raises(DefinitionError) as info:
        Definition.from_json(doc_with(metadata={op.digest: meta}))
    assert message.format(d=op.digest) in str(info.value)


def test_metadata_names_a_missing_op() -> None:
    with pytest.raises(
        DefinitionError, match=f"'metadata' names op {D1}, which is not in the definition"
    ):
        Definition.from_json(doc_with(metadata={D1: {}}))


# -- validation: values made in code -------------------------------------------------------


def test_constructor_checks() -> None:
    op = OpDef("k.x", {})
    out = OutputRef(op.digest)
    with pytest.raises(
        DefinitionError, match="unsupported definition version 2; this library reads version 1"
    ):
        Definition({op.digest: op}, out, version=2)
    with pytest.raises(
        DefinitionError, match=f"op {D1} \\(kind 'k.x'\\): the stated digest does not match"
    ):
        Definition({D1: op}, OutputRef(D1))
    with pytest.raises(DefinitionError, match="op key 'x' is not a digest"):
        Definition({"x": op}, out)
    with pytest.raises(DefinitionError, match=f"op {D1}: must be an OpDef, got dict"):
        Definition({D1: {}}, out)  # type: ignore[dict-item]
    with pytest.raises(DefinitionError, match="'output' must be an OutputRef, got list"):
        Definition({op.digest: op}, [op.digest, 0])  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match=f"'output' names op {D1}"):
        Definition({op.digest: op}, OutputRef(D1))
    with pytest.raises(
        DefinitionError, match=f"metadata for op {op.digest}: must be an OpMetadata"
    ):
        Definition({op.digest: op}, out, {op.digest: {"name": "x"}})  # type: ignore[dict-item]
    assert Definition({op.digest: op}, out).version == DEFINITION_VERSION


def test_opdef_checks() -> None:
    with pytest.raises(
        DefinitionError,
        match=r"op of kind 'k.x': payload\[\"k\"\]: object keys must be strings, got int 1",
    ):
        OpDef("k.x", {"k": {1: 2}})  # type: ignore[dict-item]
    with pytest.raises(
        DefinitionError, match=r"op of kind 'k.x': payload\[\"b\"\]: bytes is not a JSON value"
    ):
        OpDef("k.x", {"b": b"raw"})  # bytes is a Sequence[int] to a type checker
    with pytest.raises(
        DefinitionError,
        match=r"op of kind 'k.x': payload: must be a JSON object \(a mapping\), got list",
    ):
        OpDef("k.x", [])  # type: ignore[arg-type]
    with pytest.raises(
        DefinitionError, match=r"op of kind 'k.x': inputs\[1\]: an input must be an OutputRef"
    ):
        OpDef("k.x", {}, (OutputRef(D1), (D2, 0)))  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="'' is not a valid op kind"):
        OpDef("", {})
    with pytest.raises(DefinitionError, match="'sha256:1' is not an op digest"):
        OutputRef("sha256:1")
    with pytest.raises(DefinitionError, match="output index must be an integer, got boolean false"):
        OutputRef(D1, False)
    with pytest.raises(DefinitionError, match="value: floats are not allowed"):
        canonical_json(0.5)  # type: ignore[arg-type]
    with pytest.raises(
        DefinitionError, match=r"op metadata: 'description' must map strings to strings"
    ):
        OpMetadata(description={"a": 1})  # type: ignore[dict-item]


# -- op kinds ------------------------------------------------------------------------------


def dummy_factory(ctx: OpContext) -> Op:
    raise AssertionError("not called")


def test_registry_registration() -> None:
    reg = OpKindRegistry()
    kind = reg.register("k.a", dummy_factory)
    assert isinstance(kind, OpKind)
    assert reg.get("k.a") is kind
    assert reg.require("k.a") is kind

    @reg.register("k.b", outputs=lambda p: 2)
    def make_b(ctx: OpContext) -> Op:
        raise AssertionError("not called")

    assert make_b.__name__ == "make_b"  # the decorator returns the function
    assert reg.require("k.b").factory is make_b
    assert "k.a" in reg
    assert "k.c" not in reg
    assert reg.names() == ["k.a", "k.b"] == list(reg)
    assert len(reg) == 2
    assert repr(reg) == "<OpKindRegistry 2 kinds: k.a, k.b>"

    with pytest.raises(ValueError, match=r"op kind 'k.a' is already registered; pass replace=True"):
        reg.register("k.a", dummy_factory)
    replaced = reg.register("k.a", dummy_factory, replace=True)
    assert reg.get("k.a") is replaced
    with pytest.raises(ValueError, match="'bad name' is not a valid op kind name"):
        reg.register("bad name", dummy_factory)
    with pytest.raises(TypeError, match=r"the factory of op kind 'k\.z' is not callable"):
        reg.register("k.z", 3)  # type: ignore[call-overload]
    with pytest.raises(DefinitionError, match=r"unknown op kind 'k.z'; registered kinds: k.a, k.b"):
        reg.require("k.z")

    other = reg.copy()
    other.register("k.c", dummy_factory)
    assert "k.c" not in reg
    assert OpKindRegistry([OpKind("k.x", dummy_factory)]).names() == ["k.x"]
    assert isinstance(default_op_kinds, OpKindRegistry)


def kinds_for_validation() -> OpKindRegistry:
    def check_src(payload: Mapping[str, JSONValue]) -> None:
        if not isinstance(payload.get("n"), int):
            raise TypeError("'n' must be an integer")

    reg = OpKindRegistry()
    reg.register("k.src", dummy_factory, validate=check_src)
    reg.register("k.split", dummy_factory, outputs=lambda p: len(p["parts"]))  # type: ignore[arg-type]
    reg.register("k.use", dummy_factory)
    return reg


def test_validate_against_kinds() -> None:
    reg = kinds_for_validation()
    src = node("k.src", {"n": 1})
    split = node("k.split", {"parts": ["a", "b"]}, inputs=[src])
    ok = Definition.of(node("k.use", inputs=[split.output(1), src]))
    ok.validate(reg)
    ok.validate()  # no registry: nothing to check

    unknown = Definition.of(node("k.nope", inputs=[src]))
    with pytest.raises(DefinitionError) as info:
        unknown.validate(reg)
    assert str(info.value) == (
        f"op {unknown.output.digest}: unknown op kind 'k.nope'; "
        "registered kinds: k.split, k.src, k.use"
    )
    assert info.value.kind == "k.nope"

    bad = Definition.of(node("k.src", {"n": "one"}))
    with pytest.raises(DefinitionError) as info:
        bad.validate(reg)
    assert str(info.value) == (
        f"op {bad.output.digest} (kind 'k.src'): invalid payload: 'n' must be an integer"
    )
    assert isinstance(info.value.__cause__, TypeError)

    use = node("k.use", inputs=[split.output(2)])
    with pytest.raises(DefinitionError) as info:
        Definition.of(use).validate(reg)
    assert str(info.value) == (
        f"op {use.digest} (kind 'k.use'): inputs[0] names output 2 of op {split.digest} "
        "(kind 'k.split'), which has 2 outputs"
    )

    with pytest.raises(DefinitionError) as info:
        Definition.of(src.output(1)).validate(reg)
    assert str(info.value) == (
        f"'output' names output 1 of op {src.digest} (kind 'k.src'), which has 1 output"
    )
    with pytest.raises(DefinitionError, match="which has 1 output"):
        Definition.of(src.output(1)).to_vertices(reg)


def test_outputs_callable_failures() -> None:
    reg = OpKindRegistry()
    reg.register("k.raise", dummy_factory, outputs=lambda p: 1 // 0)
    reg.register("k.neg", dummy_factory, outputs=lambda p: -1)
    with pytest.raises(
        DefinitionError, match=r"\(kind 'k.raise'\): counting its outputs failed: integer division"
    ):
        Definition.of(node("k.raise")).validate(reg)
    with pytest.raises(
        DefinitionError, match=r"\(kind 'k.neg'\): the kind's outputs\(\) returned -1"
    ):
        Definition.of(node("k.neg")).validate(reg)


# -- vertices ------------------------------------------------------------------------------


def test_to_vertices_shares_vertices_and_carries_metadata() -> None:
    reg = kinds_for_validation()
    src = node("k.src", {"n": 1}, name="source", description={"a": "b"})
    split = node("k.split", {"parts": ["a", "b"]}, inputs=[src], ignore_cache=True)
    top = node("k.use", inputs=[split.output(1), src, split])
    unreachable = OpDef("k.use", {"unused": True})
    d = Definition.of(top)
    d = Definition({**d.ops, unreachable.digest: unreachable}, d.output, d.metadata)
    edge = d.to_vertices(reg)

    assert edge.index == 0
    v = edge.vertex
    assert isinstance(v, DefinitionVertex)
    assert isinstance(v, Vertex)
    assert v.digest == top.digest
    assert v.name == "k.use"
    assert v.sys == top.op
    assert not v.options.ignore_cache
    e_split, e_src, e_split0 = v.inputs
    assert (e_split.index, e_src.index, e_split0.index) == (1, 0, 0)
    assert e_split.vertex is e_split0.vertex  # one vertex per op
    assert e_split.vertex.inputs[0].vertex is e_src.vertex
    assert e_split.vertex.options.ignore_cache
    assert e_src.vertex.name == "source"
    assert e_src.vertex.options.description == {"a": "b"}
    assert repr(e_src.vertex) == f"<DefinitionVertex 'source' {src.digest[:19]}>"


# -- solving a definition with the engine --------------------------------------------------


class KindOp:
    """The op of the test kinds: cache map from kind and payload, exec by kind."""

    def __init__(self, ctx: OpContext, execs: dict[str, int], kinds: OpKindRegistry) -> None:
        self.ctx = ctx
        self.execs = execs
        self.kinds = kinds

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        ctx = self.ctx
        own = digest_of(canonical_json({"kind": ctx.kind, "payload": ctx.payload}))
        return CacheMap(own, tuple(CacheMapDep() for _ in range(ctx.inputs))), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        ctx = self.ctx
        self.execs[ctx.kind] = self.execs.get(ctx.kind, 0) + 1
        await anyio.lowlevel.checkpoint()
        p = ctx.payload
        if ctx.kind == "test.const":
            values = [str(p["value"])]
        elif ctx.kind == "test.split":
            values = str(p["value"]).split(str(p["sep"]))
        elif ctx.kind == "test.concat":
            values = [str(p["sep"]).join(str(r.sys) for r in inputs)]
        else:  # test.nested: solve the definition in the payload, inside this op
            inner = Definition.from_json(str(p["definition"])).to_vertices(self.kinds)
            res: CachedResult = await ctx.builder.build(inner)
            values = [f"[{res.sys}]"]
            await res.release()
        return [CountingResult(f"{ctx.vertex.digest[7:15]}-{i}", v) for i, v in enumerate(values)]


def check_split(payload: Mapping[str, JSONValue]) -> None:
    if not isinstance(payload.get("sep"), str):
        raise TypeError("'sep' must be a string")


def make_kinds() -> tuple[OpKindRegistry, dict[str, int]]:
    execs: dict[str, int] = {}
    reg = OpKindRegistry()

    def factory(ctx: OpContext) -> KindOp:
        return KindOp(ctx, execs, reg)

    reg.register("test.const", factory)
    reg.register("test.concat", factory)
    reg.register("test.nested", factory)
    reg.register(
        "test.split",
        factory,
        outputs=lambda p: len(str(p["value"]).split(str(p["sep"]))),
        validate=check_split,
    )
    return reg, execs


def sample_definition(*, ignore_cache: bool = False) -> Definition:
    a = node("test.const", {"value": "a"}, name="a")
    parts = node("test.split", {"value": "b,c", "sep": ","})
    top = node(
        "test.concat", {"sep": "+"}, inputs=[a, parts.output(1), a], ignore_cache=ignore_cache
    )
    # through JSON, as a definition arrives from elsewhere
    return Definition.from_json(Definition.of(top).to_json())


async def build_value(s: Solver, edge: Edge) -> object:
    job = s.new_job()
    try:
        res = await job.build(edge)
        try:
            return res.sys
        finally:
            await res.release()
    finally:
        await job.discard()


@pytest.mark.anyio
async def test_solve_a_definition(handle_tracker: HandleTracker) -> None:
    reg, execs = make_kinds()
    defn = sample_definition()
    with anyio.fail_after(20):
        async with Solver(resolve_op=reg.resolve_op) as s:
            assert await build_value(s, defn.to_vertices(reg)) == "a+c+a"
            assert execs == {"test.const": 1, "test.split": 1, "test.concat": 1}
            # a new job, new vertices for the same definition: all from the cache
            again = Definition.from_json(defn.to_json()).to_vertices(reg)
            assert await build_value(s, again) == "a+c+a"
            assert execs == {"test.const": 1, "test.split": 1, "test.concat": 1}
            # output 1 of the split op, as its own definition: from the cache too
            split = next(op for op in defn.ops.values() if op.kind == "test.split")
            part = Definition(defn.ops, OutputRef(split.digest, 1))
            assert await build_value(s, part.to_vertices(reg)) == "c"
            assert execs["test.split"] == 1


@pytest.mark.anyio
async def test_ignore_cache_op_runs_again(handle_tracker: HandleTracker) -> None:
    reg, execs = make_kinds()
    defn = sample_definition(ignore_cache=True)
    with anyio.fail_after(20):
        async with Solver(resolve_op=reg.resolve_op) as s:
            assert await build_value(s, defn.to_vertices(reg)) == "a+c+a"
            assert await build_value(s, defn.to_vertices(reg)) == "a+c+a"
    assert execs == {"test.const": 1, "test.split": 1, "test.concat": 2}


@pytest.mark.anyio
async def test_nested_build_through_the_op_context(handle_tracker: HandleTracker) -> None:
    reg, execs = make_kinds()
    inner = Definition.of(node("test.const", {"value": "inner"}))
    outer = Definition.of(node("test.nested", {"definition": inner.to_json()}))
    with anyio.fail_after(20):
        async with Solver(resolve_op=reg.resolve_op) as s:
            assert await build_value(s, outer.to_vertices(reg)) == "[inner]"
    assert execs == {"test.nested": 1, "test.const": 1}


@pytest.mark.anyio
async def test_unknown_kind_fails_the_build(handle_tracker: HandleTracker) -> None:
    reg, execs = make_kinds()
    defn = Definition.of(node("test.concat", {"sep": ""}, inputs=[node("test.missing")]))
    with pytest.raises(DefinitionError, match=r"unknown op kind 'test\.missing'"):
        defn.to_vertices(reg)  # caught before anything runs
    edge = defn.to_vertices(None)  # no checks: the engine meets the unknown kind
    with anyio.fail_after(20):
        async with Solver(resolve_op=reg.resolve_op) as s:
            with pytest.raises(DefinitionError) as info:
                await build_value(s, edge)
    assert "unknown op kind 'test.missing'; registered kinds: test.concat, test.const" in str(
        info.value
    )
    assert execs == {}


def test_resolve_op_needs_a_definition_vertex() -> None:
    reg, _ = make_kinds()

    class Plain:
        digest = D1
        inputs: Sequence[Edge] = ()
        name = "plain"
        options = VertexOptions()
        sys = object()

    with pytest.raises(DefinitionError, match=r"vertex 'plain' .* is not an op of a Definition"):
        reg.resolve_op(Plain(), None)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_factory_must_return_an_op(handle_tracker: HandleTracker) -> None:
    reg = OpKindRegistry()
    reg.register("k.bad", lambda ctx: "not an op")  # type: ignore[arg-type,return-value]
    edge = Definition.of(node("k.bad")).to_vertices(reg)
    with anyio.fail_after(20):
        async with Solver(resolve_op=reg.resolve_op) as s:
            with pytest.raises(SolveError) as info:
                await build_value(s, edge)
    assert "the factory of op kind 'k.bad' returned str, which is not an Op" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)


# -- big graphs ----------------------------------------------------------------------------


@pytest.mark.slow
def test_100k_chain_without_recursion() -> None:
    """A 100k-deep chain (100k ops) is built, written, read, validated and turned
    into vertices without recursing."""
    n = 100_000
    reg = OpKindRegistry()
    reg.register("chain.start", dummy_factory)
    reg.register("chain.step", dummy_factory)
    top = node("chain.start", {"i": 0})
    for i in range(1, n):
        top = node("chain.step", {"i": i}, inputs=[top])
    d = Definition.from_json(Definition.of(top).to_json())
    assert len(d.ops) == n
    d.validate(reg)
    edge = d.to_vertices(reg)
    depth = 1
    v = edge.vertex
    while v.inputs:
        v = v.inputs[0].vertex
        depth += 1
    assert depth == n

    # and a 100k-op cycle is found, and reported briefly
    fake = [f"sha256:{i:064x}" for i in range(n)]
    ops = {
        fake[i]: {"kind": "chain.step", "payload": {}, "inputs": [[fake[(i + 1) % n], 0]]}
        for i in range(n)
    }
    with pytest.raises(DefinitionError) as info:
        Definition.from_json(json.dumps({"version": 1, "ops": ops, "output": [fake[0], 0]}))
    assert str(info.value).startswith(f"the ops form a cycle of {n}: {fake[0]} (kind 'chain.step')")
    assert "... (99992 more)" in str(info.value)
    assert len(str(info.value)) < 2000


def test_a_frozen_payload_is_encoded_without_a_second_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An op's payload is frozen (checked, read-only) when the op is made;
    encoding it again (an op kind's cache digest does, per build) gives the
    same text without walking it again: one ``_freeze`` call, not one per
    container. A plain mapping with the same content is walked container by
    container."""
    from solver.definition import _definition

    payload: dict[str, JSONValue] = {"args": ["cc", "-c", "x.c"], "env": {"A": "1"}, "n": 3}
    op = OpDef("exec", payload)
    calls = [0]
    freeze = _definition._freeze

    def counted(value: object, depth: int) -> JSONValue:
        calls[0] += 1
        return freeze(value, depth)

    monkeypatch.setattr(_definition, "_freeze", counted)
    assert canonical_json(op.payload) == canonical_json(payload)
    # the frozen payload: 1 call; the plain one 3: the dict, the list and the
    # nested dict (strings and in-range ints are kept in place without a call)
    assert calls[0] == 1 + 3


def test_an_array_of_plain_leaves_and_ints_is_encoded_and_frozen() -> None:
    """A content digest's entry record (path, type, mode, digest) takes the
    one-pass path of plain leaves with in-range ints: the same canonical text
    as the general path, frozen, and the edges of the int range kept."""
    record: list[JSONValue] = [
        "src/a.c", "file", 0o444, "ab" * 32, True, None, 2**63 - 1, -(2**63)
    ]
    assert canonical_json(record) == json.dumps(
        record, separators=(",", ":"), ensure_ascii=False
    ).encode()
    op = OpDef("k.x", {"xs": record})
    assert op.payload["xs"] == record
    xs = op.payload["xs"]
    assert isinstance(xs, list)
    with pytest.raises(TypeError, match="read-only"):
        xs.append(1)
    # a bool is not an int here: True stays true, 1 stays 1
    assert canonical_json([1, True]) == b"[1,true]"


@pytest.mark.parametrize(
    ("value", "where", "problem"),
    [
        (["a", True, None, 2**63], '["xs"][3]', "integer 9223372036854775808 is outside"),
        (["a", 1, -(2**63) - 1, 2], '["xs"][2]', "integer -9223372036854775809 is outside"),
        (["a", 1.5], '["xs"][1]', "floats are not allowed (got 1.5)"),
        ([["a", [0.5]]], '["xs"][0][1][0]', "floats are not allowed (got 0.5)"),
    ],
)
def test_a_bad_leaf_in_an_array_read_from_json_is_named(
    value: object, where: str, problem: str
) -> None:
    """Arrays of plain leaves are kept without a call per leaf; one bad leaf
    among them is still named by its place."""
    d = "sha256:" + "0" * 64
    doc = json.dumps({"version": 1, "output": [d, 0],
                      "ops": {d: {"kind": "k.x", "payload": {"xs": value}, "inputs": []}}})
    with pytest.raises(DefinitionError) as info:
        Definition.from_json(doc)
    assert f"payload{where}: {problem}" in str(info.value)
