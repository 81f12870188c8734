"""``plan`` and ``solver graph``: the cache state of each op, found without
running anything, and the graph as DOT or Mermaid.

The DOT output is checked with a small strict parser of the DOT language
(below): what it accepts, Graphviz accepts."""

from __future__ import annotations

import argparse
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from frontend_support import Ops, text

from solver import (
    CacheMap,
    CacheMapDep,
    Definition,
    DefinitionError,
    OpContext,
    OpKindRegistry,
    Result,
    SolveError,
    Solver,
    digest_of,
    node,
)
from solver.bridge import OpState, Plan, plan
from solver.cli._graph import add_graph_command, graph_text
from solver.cli._main import _load_for_command, _report, load_definition, open_solver
from solver.testing import CountingResult, HandleTracker
from solver.worker import State, disk_usage

CACHED, WOULD_RUN, UNKNOWN = OpState.CACHED, OpState.WOULD_RUN, OpState.UNKNOWN


# -- a strict parser of the DOT language (the part of it a plan could use) -----------

_KEYWORDS = {"strict", "graph", "digraph", "node", "edge", "subgraph"}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<quoted>"(?:[^"\\]|\\.|\\\n)*")
      | (?P<name>[A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*)
      | (?P<number>-?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?))
      | (?P<punct>->|--|[{}\[\]=;,])
    )""",
    re.VERBOSE | re.DOTALL,
)


@dataclass
class DotGraph:
    """What :func:`parse_dot` read: the graph's ID, its node statements (ID ->
    attributes, in order), its edges (from, to, attributes) and its attribute
    statements."""

    name: str | None
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    defaults: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def _tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while src[pos:].strip():
        m = _TOKEN.match(src, pos)
        assert m is not None, f"bad DOT at {src[pos:pos + 40]!r}"
        assert m.lastgroup is not None
        kind, value = m.lastgroup, m.group(m.lastgroup)
        if kind == "quoted":
            # the DOT lexer: \" is a quote, a backslash-newline continues the line,
            # every other backslash stays (labels interpret \n, \\ and so on later)
            value = re.sub(r'\\(")|\\\n|(\\\\)', lambda g: g.group(1) or g.group(2) or "",
                           value[1:-1])
        elif kind == "name" and value.lower() in _KEYWORDS:
            kind = "keyword"
            value = value.lower()
        out.append((kind, value))
        pos = m.end()
    return out


def parse_dot(src: str) -> DotGraph:
    """Parse ``src`` as one DOT ``digraph`` or fail: ``[strict] digraph [ID] {
    stmt_list }`` with node, edge (``->`` only), attribute and ``ID = ID``
    statements; no ports, subgraphs, HTML strings or comments (a plan writes
    none); nothing after the closing brace."""
    toks = _tokens(src)
    pos = 0

    def peek() -> tuple[str, str]:
        return toks[pos] if pos < len(toks) else ("end", "")

    def take(kind: str, value: str | None = None) -> str:
        nonlocal pos
        k, v = peek()
        expected = (kind, v if value is None else value)
        assert (k, v) == expected, f"expected {value or kind} at token {pos}, got {k} {v!r}"
        pos += 1
        return v

    def is_id() -> bool:
        return peek()[0] in ("quoted", "name", "number")

    def attr_list() -> dict[str, str]:
        attrs: dict[str, str] = {}
        while peek() == ("punct", "["):
            take("punct", "[")
            while is_id():
                key = take(peek()[0])
                take("punct", "=")
                assert is_id(), f"attribute {key} has no value"
                attrs[key] = take(peek()[0])
                if peek() in (("punct", ","), ("punct", ";")):
                    take("punct")
            take("punct", "]")
        return attrs

    if peek() == ("keyword", "strict"):
        take("keyword")
    take("keyword", "digraph")
    graph = DotGraph(take(peek()[0]) if is_id() else None)
    take("punct", "{")
    while peek() != ("punct", "}"):
        if peek()[0] == "keyword":
            which = take("keyword")
            assert which in ("graph", "node", "edge"), f"unexpected keyword {which}"
            graph.defaults.append((which, attr_list()))
        else:
            assert is_id(), f"expected a statement, got {peek()}"
            first = take(peek()[0])
            if peek() == ("punct", "="):
                take("punct")
                graph.defaults.append(("graph", {first: take(peek()[0])}))
            elif peek() == ("punct", "->"):
                chain = [first]
                while peek() == ("punct", "->"):
                    take("punct")
                    assert is_id(), "an edge needs a node ID after ->"
                    chain.append(take(peek()[0]))
                attrs = attr_list()
                graph.edges.extend((a, b, attrs) for a, b in itertools.pairwise(chain))
            else:
                assert peek() != ("punct", "--"), "-- in a digraph"
                graph.nodes.setdefault(first, {}).update(attr_list())
        if peek() == ("punct", ";"):
            take("punct")
    take("punct", "}")
    assert peek() == ("end", ""), f"text after the graph: {toks[pos:]}"
    return graph


def label_text(label: str) -> str:
    """A DOT label as it shows: ``\\n``, ``\\l`` and ``\\r`` end lines, ``\\\\`` is
    one backslash."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nlr" else m.group(1), label)


def test_the_dot_parser_is_strict() -> None:
    assert parse_dot('digraph g { "a" -> b [label="x"]; b; }').edges == [("a", "b", {"label": "x"})]
    for bad in (
        'graph g { a -- b }',  # not a digraph
        'digraph { a -- b }',
        'digraph { a -> }',
        'digraph { "a [label=x] }',  # unterminated string
        'digraph { a [label=] }',
        'digraph { a:port -> b }',
        'digraph { a } b',
        'digraph { node -> a }',
        'digraph { a [label="x"] ',
    ):
        with pytest.raises(AssertionError):
            parse_dot(bad)


# -- the API --------------------------------------------------------------------------------

MERMAID_NODE = re.compile(r'^  (op\d+)\["(.*)"\]:::([a-z]+)$')
MERMAID_EDGE = re.compile(r"^  (op\d+) -->(?:\|\d+\|)? (op\d+)$")


def check_outputs(p: Plan) -> DotGraph:
    """The plan's DOT parses, with one node per op (labelled with its name and
    state) and one edge per input; its Mermaid has one node line per op and one
    edge line per input. Returns the parsed DOT."""
    dot = parse_dot(p.to_dot())
    assert list(dot.nodes) == [op.digest for op in p.ops]
    for op in p.ops:
        name, state = label_text(dot.nodes[op.digest]["label"]).rsplit("\n", 1)
        assert name == op.name
        assert state == (op.state if op.needed else f"{op.state}, not needed")
    expected = [(ref.digest, op.digest) for op in p.ops for ref in op.inputs]
    assert [(a, b) for a, b, _ in dot.edges] == expected

    lines = p.to_mermaid().splitlines()
    assert lines[0] == "flowchart TD"
    nodes = [m for m in map(MERMAID_NODE.match, lines) if m]
    edges = [m for m in map(MERMAID_EDGE.match, lines) if m]
    assert len(nodes) == len(p.ops)
    assert len(edges) == len(expected)
    ids = {op.digest: f"op{i}" for i, op in enumerate(p.ops, 1)}
    assert [(m[1], m[2]) for m in edges] == [(ids[a], ids[b]) for a, b in expected]
    for m, op in zip(nodes, p.ops, strict=True):
        assert m[3] == {CACHED: "cached", WOULD_RUN: "wouldrun",
                                      UNKNOWN: "unknown"}[op.state]
    spare = ",".join(ids[op.digest] for op in p.ops if not op.needed)
    assert [line for line in lines if line.startswith("  class ")] == (
        [f"  class {spare} notneeded"] if spare else []
    )
    return dot


def by_name(p: Plan) -> dict[str, tuple[OpState, bool]]:
    return {op.name: (op.state, op.needed) for op in p.ops}


def chain(*texts: str, ignore: str = "") -> Definition:
    """A chain of ``test.text`` ops, each named after its text; ``ignore`` names
    the one that ignores the cache."""
    prev = None
    for t in texts:
        prev = node("test.text", {"text": t}, inputs=[prev] if prev else [], name=t,
                    ignore_cache=t == ignore)
    assert prev is not None
    return Definition.of(prev)



@pytest.mark.anyio
async def test_a_chain_before_and_after_a_build(handle_tracker: HandleTracker) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        defn = chain("a", "b", "c")
        made = handle_tracker.created_count
        fresh = await plan(s, defn)
        assert [op.name for op in fresh.ops] == ["a", "b", "c"]  # inputs first
        assert by_name(fresh) == {n: (WOULD_RUN, True) for n in "abc"}
        assert ops.execs == []  # nothing ran
        assert ops.results == []
        assert handle_tracker.created_count == made  # and nothing was held
        check_outputs(fresh)

        async with await s.solve(defn) as result:
            assert result.ref is not None
            assert result.ref.sys == "abc"
        assert ops.execs == ["a", "b", "c"]

        made = handle_tracker.created_count
        built = await plan(s, defn)
        # every op has its record; only the output's would be loaded
        assert by_name(built) == {"a": (CACHED, False), "b": (CACHED, False), "c": (CACHED, True)}
        assert ops.execs == ["a", "b", "c"]
        assert len(ops.results) == 3
        assert handle_tracker.created_count == made
        check_outputs(built)

        changed = await plan(s, chain("a", "B", "c"))
        assert by_name(changed) == {"a": (CACHED, True), "B": (WOULD_RUN, True),
                                    "c": (WOULD_RUN, True)}
        check_outputs(changed)
        assert ops.execs == ["a", "b", "c"]

        # what the plan said is what a build does
        async with await s.solve(chain("a", "B", "c")):
            pass
        assert ops.execs == ["a", "b", "c", "B", "c"]


@pytest.mark.anyio
async def test_a_changed_leaf_reruns_everything_above_it() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        async with await s.solve(chain("a", "b", "c")):
            pass
        p = await plan(s, chain("A", "b", "c"))
        assert [op.state for op in p.ops] == [WOULD_RUN] * 3
        p = await plan(s, chain("a", "b", "C"))
        assert by_name(p) == {"a": (CACHED, False), "b": (CACHED, True), "C": (WOULD_RUN, True)}
        assert ops.execs == ["a", "b", "c"]


@pytest.mark.anyio
async def test_an_op_whose_record_is_gone_still_leads_to_the_keys_above() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        async with await s.solve(chain("a", "b", "c")):
            pass
        await s.default_cache.release("ab-2")  # b's result (its id: text, exec count)
        p = await plan(s, chain("a", "b", "c"))
        assert by_name(p) == {"a": (CACHED, False), "b": (WOULD_RUN, False),
                              "c": (CACHED, True)}
        p = await plan(s, chain("a", "b", "C"))
        assert by_name(p) == {"a": (CACHED, True), "b": (WOULD_RUN, True),
                              "C": (WOULD_RUN, True)}
        # as the engine does it
        async with await s.solve(chain("a", "b", "c")):
            pass
        assert ops.execs == ["a", "b", "c"]
        async with await s.solve(chain("a", "b", "C")):
            pass
        assert ops.execs == ["a", "b", "c", "b", "C"]


@pytest.mark.anyio
async def test_ignore_cache_would_run_and_so_would_its_consumers() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        async with await s.solve(chain("a", "b", "c")):
            pass
        p = await plan(s, chain("a", "b", "c", ignore="b"))
        assert by_name(p) == {"a": (CACHED, True), "b": (WOULD_RUN, True),
                              "c": (WOULD_RUN, True)}
        assert p.op(p.ops[1].digest).ignore_cache
        check_outputs(p)
        async with await s.solve(chain("a", "b", "c", ignore="b")):
            pass
        assert ops.execs == ["a", "b", "c", "b", "c"]


@dataclass
class SlowOps:
    """``test.slow``: like ``test.text``, but its inputs count by content: a dep
    with ``compute_digest`` (the input's text)."""

    execs: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)

    def register(self, kinds: OpKindRegistry) -> OpKindRegistry:
        kinds.register("test.slow", lambda ctx: _SlowOp(ctx, self))
        return kinds


class _SlowOp:
    def __init__(self, ctx: OpContext, ops: SlowOps) -> None:
        self.text = str(ctx.payload["text"])
        self.inputs = ctx.inputs
        self.ops = ops

    async def content(self, result: Result) -> str:
        self.ops.digests.append(self.text)
        return digest_of(str(result.sys).encode())

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        deps = [CacheMapDep(compute_digest=self.content) for _ in range(self.inputs)]
        return CacheMap(digest_of(f"slow:{self.text}".encode()), deps), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.ops.execs.append(self.text)
        joined = "".join(str(r.sys) for r in inputs) + self.text
        return [CountingResult(id=f"slow-{joined}", value=joined)]


@pytest.mark.anyio
async def test_a_content_key_makes_the_state_unknown() -> None:
    ops, slow = Ops(), SlowOps()
    kinds = slow.register(ops.registry())
    a = node("test.text", {"text": "a"}, name="a")
    s_node = node("test.slow", {"text": "s"}, inputs=[a], name="s")
    top = node("test.text", {"text": "t"}, inputs=[s_node], name="t")
    defn = Definition.of(top)
    async with Solver(op_kinds=kinds) as s:
        p = await plan(s, defn)
        # s takes a's content: known only once a has run; t depends on s
        assert by_name(p) == {"a": (WOULD_RUN, True), "s": (UNKNOWN, True),
                              "t": (UNKNOWN, True)}
        dot = check_outputs(p)
        assert "unknown (content key)" in label_text(dot.nodes[s_node.digest]["label"])
        assert (slow.digests, slow.execs, ops.execs) == ([], [], [])

        async with await s.solve(defn):
            pass
        seen = (list(slow.digests), list(slow.execs), list(ops.execs))
        assert by_name(await plan(s, defn)) == {"a": (CACHED, False), "s": (CACHED, False),
                                                "t": (CACHED, True)}
        # a new a: s's key through a's key is gone, but its content may match
        p = await plan(s, Definition.of(node("test.text", {"text": "t"}, name="t", inputs=[
            node("test.slow", {"text": "s"}, name="s",
                 inputs=[node("test.text", {"text": "a"}, name="a2",
                              ignore_cache=True)])])))
        assert by_name(p) == {"a2": (WOULD_RUN, True), "s": (UNKNOWN, True),
                              "t": (UNKNOWN, True)}
        assert (slow.digests, slow.execs, ops.execs) == seen  # the plans ran nothing


@pytest.mark.anyio
async def test_outputs_other_than_0_and_names_that_need_quoting() -> None:
    kinds = Ops().registry()

    class Split:
        def __init__(self, ctx: OpContext) -> None:
            self.ctx = ctx

        async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
            return CacheMap(digest_of(b"split")), True

        async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
            raise AssertionError("a plan runs nothing")

    kinds.register("test.split", Split, outputs=lambda payload: 2)
    name = 'we "quote" \\ back\\nslash # <b> {x}\nline 2'
    split = node("test.split", {}, name=name)
    use = node("test.text", {"text": "u"}, inputs=[split.output(1), split], name="use")
    async with Solver(op_kinds=kinds) as s:
        p = await plan(s, Definition.of(use))
    assert p.ops[0].name == name
    dot = check_outputs(p)
    assert [e[2] for e in dot.edges] == [{"label": "1"}, {}]
    assert dot.nodes[use.digest]["peripheries"] == "2"  # the output
    mermaid = p.to_mermaid()
    assert "  op1 -->|1| op2\n  op1 --> op2\n" in mermaid
    assert "we #quot;quote#quot; \\ back\\nslash #35; #lt;b#gt; {x}<br/>line 2" in mermaid


@pytest.mark.anyio
async def test_an_op_asking_for_a_nested_build_is_refused() -> None:
    kinds = OpKindRegistry()

    class Nested:
        def __init__(self, ctx: OpContext) -> None:
            self.ctx = ctx

        async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
            other = Definition.of(node("test.nested", {"x": 1})).to_vertices(None)
            await self.ctx.builder.build(other)
            raise AssertionError("unreachable")

        async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
            raise AssertionError("a plan runs nothing")

    kinds.register("test.nested", Nested)
    defn = Definition.of(node("test.nested", {}, name="nest"))
    async with Solver(op_kinds=kinds) as s:
        with pytest.raises(SolveError, match="asked for a nested build") as info:
            await plan(s, defn)
    assert info.value.vertex == defn.output.digest
    assert info.value.vertex_name == "nest"


@pytest.mark.anyio
async def test_failures_name_the_op() -> None:
    kinds = OpKindRegistry()

    class Broken:
        def __init__(self, ctx: OpContext) -> None:
            pass

        async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
            raise OSError("no such thing")

        async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
            raise AssertionError("a plan runs nothing")

    kinds.register("test.broken", Broken)
    async with Solver(op_kinds=kinds) as s:
        with pytest.raises(SolveError, match=r"op 'b' \(sha256:.*\): cannot compute its "
                           "cache key: OSError: no such thing"):
            await plan(s, Definition.of(node("test.broken", {}, name="b")))
        with pytest.raises(DefinitionError, match=r"unknown op kind 'test\.nope'"):
            await plan(s, Definition.of(node("test.nope", {})))
    with pytest.raises(SolveError, match="not running"):
        await plan(Solver(op_kinds=kinds), Definition.of(node("test.broken", {})))


# -- the command line -------------------------------------------------------------------


def worker_graph() -> Definition:
    src = State.inline({"a.txt": "hi\n"}, name="sources")
    made = src.mkfile("b.txt", "bee").with_name("made")
    return State.scratch().copy(made, "/b.txt", "/b.txt").with_name("copied").definition()


def graph_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="solver")
    sub = parser.add_subparsers(dest="command", required=True)
    add_graph_command(sub, open_solver=open_solver, load_definition=load_definition)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


async def snapshots(cache: Path) -> int:
    return (await disk_usage(cache / "snapshots")).snapshots


def test_graph_command_prints_dot_and_mermaid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    file = tmp_path / "graph.json"
    defn = worker_graph()
    file.write_text(defn.to_json())
    names = {d: m.name for d, m in defn.metadata.items()}

    assert graph_cli("graph", str(file), "--cache-dir", str(cache)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    dot = parse_dot(out)
    states = {names[d]: label_text(a["label"]).split("\n")[1] for d, a in dot.nodes.items()}
    # the copy takes its input by content: unknown until that input is built
    assert states == {"sources": "would run", "made": "would run",
                      "copied": "unknown (content key)"}
    assert len(dot.edges) == 2
    assert anyio.run(snapshots, cache) == 0  # nothing was made

    async def build() -> None:
        async with open_solver(str(cache), sandbox="none") as solver, await solver.solve(defn):
            pass

    anyio.run(build)
    made = anyio.run(snapshots, cache)
    assert made > 0

    assert graph_cli("graph", str(file), "--cache-dir", str(cache), "--format", "mermaid") == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "flowchart TD"
    node_lines = [m for m in map(MERMAID_NODE.match, lines) if m]
    assert len(node_lines) == 3
    assert len([m for m in map(MERMAID_EDGE.match, lines) if m]) == 2
    assert [m[2].split("<br/>") for m in node_lines] == [
        ["sources", "cached, not needed"], ["made", "cached, not needed"], ["copied", "cached"]
    ]
    assert anyio.run(snapshots, cache) == made


def test_graph_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="solver")
    sub = parser.add_subparsers(dest="command", required=True)
    add_graph_command(sub, open_solver=open_solver, load_definition=_load_for_command)
    missing = tmp_path / "missing.json"
    unknown = tmp_path / "unknown.json"
    unknown.write_text(Definition.of(node("myapp.nope", {})).to_json())
    cache = str(tmp_path / "cache")
    for file, message in (
        (missing, f"solver: error: {missing}: no such file\n"),
        (unknown, f"solver: error: {unknown}: op sha256:"),
    ):
        args = parser.parse_args(["graph", str(file), "--cache-dir", cache])
        with pytest.raises(Exception) as info:
            args.func(args)
        assert _report(info.value, False) == 1
        err = capsys.readouterr().err
        assert err.startswith(message), err
        assert err.count("\n") == 1, err
    assert "unknown op kind 'myapp.nope'" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["graph", str(unknown), "--format", "svg"])


@pytest.mark.anyio
async def test_graph_text() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        defn = text("a", "b")
        assert parse_dot(await graph_text(s, defn)).name == "plan"
        assert (await graph_text(s, defn, "mermaid")).startswith("flowchart TD\n")
        with pytest.raises(ValueError, match="unknown graph format 'svg'"):
            await graph_text(s, defn, "svg")
