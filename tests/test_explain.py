"""``explain`` / ``solve_explained`` / ``solver build --explain``: why each op that
ran missed the cache, named from a walk of the cache and the op history.

Every reason of :class:`~solver.MissKind` is made to happen on a small graph and
checked by name, with the exec counts that show the ops really ran (or not)."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from frontend_support import Ops
from test_graph import SlowOps
from test_solve_checkpoints import MAX_SUSPENSIONS, assert_all_released, cancel_at_suspension

from solver import (
    CacheMap,
    Definition,
    Explanation,
    InMemoryOpHistory,
    MissKind,
    MissReason,
    OpContext,
    OpDef,
    OpDefinitionRecord,
    OpExplanation,
    OpHistory,
    OpKindRegistry,
    Result,
    Solver,
    SolveResult,
    digest_of,
    explain,
    history_records,
    node,
    solve_explained,
)
from solver.bridge import OpState
from solver.cli._main import main
from solver.testing import CountingResult, HandleTracker
from solver.worker import OP_HISTORY_DB_NAME, SQLiteOpHistory, State, Worker

pytestmark = pytest.mark.anyio

DEFINITION, INPUT, CONTENT = (
    MissKind.DEFINITION_CHANGED, MissKind.INPUT_CHANGED, MissKind.CONTENT_CHANGED
)


def chain(*texts: str, ignore: str = "") -> Definition:
    """A chain of ``test.text`` ops, each named after its text (the first is the
    leaf); ``ignore`` names the one that ignores the cache."""
    prev = None
    for t in texts:
        prev = node("test.text", {"text": t}, inputs=[prev] if prev else [], name=t,
                    ignore_cache=t == ignore)
    assert prev is not None
    return Definition.of(prev)


def why(ops: Sequence[OpExplanation]) -> dict[str, str]:
    return {op.name: op.describe().partition(": ")[2] for op in ops}


async def run(s: Solver, defn: Definition) -> tuple[OpExplanation, ...]:
    result, ran = await solve_explained(s, defn)
    await result.release()
    return ran


# -- each reason ---------------------------------------------------------------------------


async def test_a_field_changed_deep_in_a_chain_is_named_and_everything_above_follows(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        first = await run(s, chain("a", "b", "c", "d", "e"))
        assert why(first) == {
            "a": "new op: no record of its definition",
            "b": "input 0 changed, from a",
            "c": "input 0 changed, from a",
            "d": "input 0 changed, from a",
            "e": "input 0 changed, from a",
        }
        ran = await run(s, chain("a", "b", "C", "d", "e"))
        assert ops.execs == ["a", "b", "c", "d", "e", "C", "d", "e"]
        assert why(ran) == {
            "C": "definition changed: payload.text: 'c' -> 'C'",
            "d": "input 0 changed, from C",
            "e": "input 0 changed, from C",
        }
        c = ran[0].reason
        assert c is not None
        assert (c.kind, c.field, c.before, c.after) == (
            DEFINITION, "payload.text", "c", "C"
        )
        old_c = chain("a", "b", "c").output.digest
        assert c.previous == old_c
        new_c = chain("a", "b", "C").output.digest
        for op in ran[1:]:
            assert op.reason == MissReason(INPUT, input=0, cause=new_c, cause_name="C")
        # a build of the same graph runs nothing and explains nothing
        assert await run(s, chain("a", "b", "C", "d", "e")) == ()
        assert len(ops.execs) == 8
    handle_tracker.check()


async def test_a_changed_leaf_is_found_at_its_place() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, chain("a", "b", "c"))
        ran = await run(s, chain("A", "b", "c"))
        assert why(ran) == {
            "A": "definition changed: payload.text: 'a' -> 'A'",
            "b": "input 0 changed, from A",
            "c": "input 0 changed, from A",
        }
        assert ops.execs == ["a", "b", "c", "A", "b", "c"]


async def test_the_explanation_before_a_build_covers_cached_ops_too() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, chain("a", "b", "c"))
        e = await explain(s, chain("a", "B", "c"))
        assert isinstance(e, Explanation)
        assert [(op.name, op.state) for op in e.ops] == [
            ("a", OpState.CACHED), ("B", OpState.WOULD_RUN), ("c", OpState.WOULD_RUN)
        ]
        assert e.ops[0].reason is None
        assert e.ops[0].describe() == "a: cached"
        assert list(e.reasons()) == [e.ops[1].digest, e.ops[2].digest]
        assert e.op(e.ops[2].digest).reason == MissReason(
            INPUT, input=0, cause=e.ops[1].digest, cause_name="B"
        )
        with pytest.raises(KeyError):
            e.op(digest_of(b"nothing"))
        assert ops.execs == ["a", "b", "c"]  # explaining ran nothing


async def test_the_second_of_two_inputs() -> None:
    ops = Ops()

    def pair(left: str, right: str) -> Definition:
        a = node("test.text", {"text": left}, name=left)
        b = node("test.text", {"text": right}, inputs=[node("test.text", {"text": "x"},
                                                             name="x")], name=right)
        return Definition.of(node("test.text", {"text": "top"}, inputs=[a, b], name="top"))

    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, pair("l", "r"))
        ran = await run(s, pair("l", "R"))
        assert why(ran) == {
            "R": "definition changed: payload.text: 'r' -> 'R'",
            "top": "input 1 changed, from R",
        }
        assert ops.execs[-2:] == ["R", "top"]


async def test_ignore_cache_is_named_and_its_consumers_follow() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, chain("a", "b", "c"))
        ran = await run(s, chain("a", "b", "c", ignore="b"))
        assert why(ran) == {"b": "ignore-cache was set", "c": "input 0 changed, from b"}
        assert ran[0].reason == MissReason(MissKind.IGNORE_CACHE)
        assert ops.execs == ["a", "b", "c", "b", "c"]


async def test_a_pruned_record_is_named() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, chain("a", "b", "c"))
        await s.default_cache.release("ab-2")  # b's result (text, exec count)
        # b's key stays (it links to c's): b is pruned; C is needed, so b runs
        ran = await run(s, chain("a", "b", "C"))
        assert why(ran) == {
            "b": "its cache key is known but its record was pruned",
            "C": "definition changed: payload.text: 'c' -> 'C'",
        }
        assert ran[0].reason == MissReason(MissKind.PRUNED)
        assert ops.execs == ["a", "b", "c", "b", "C"]


async def test_a_whole_pruned_chain_keeps_no_key() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, chain("a", "b", "c"))
        # c's record, then b's: keys left with nothing go, down to a's
        await s.default_cache.release("abc-3")
        await s.default_cache.release("ab-2")
        ran = await run(s, chain("a", "b", "c"))
        # the same definition without a key: said so, pruning included
        assert why(ran) == {
            "b": "cache key changed, definition unchanged: what the key is computed "
                 "from (files it reads, worker settings) changed, or its records were "
                 "pruned",
            "c": "input 0 changed, from b",
        }
        assert ops.execs == ["a", "b", "c", "b", "c"]


async def test_a_record_lost_between_the_walk_and_the_build() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, chain("a", "b"))
        before = await explain(s, chain("a", "b"))
        assert [op.state for op in before.ops] == [OpState.CACHED, OpState.CACHED]
        await s.default_cache.release("ab-2")  # b's record goes after the walk
        job = s.new_job()
        async with await s.solve(chain("a", "b"), job=job):
            pass
        await job.discard()
        ran = before.executed([ev async for ev in job.status()], s.op_history)
        assert why(ran) == {
            "b": "it was cached before the build, but its record was gone or failed to "
                 "load when the build came to it"
        }
        assert ran[0].reason == MissReason(MissKind.RECORD_LOST)
        assert ops.execs == ["a", "b", "b"]


async def test_a_content_key_that_misses_and_one_that_matches() -> None:
    ops, slow = Ops(), SlowOps()
    kinds = slow.register(ops.registry())

    def graph(leaf: str, *, ignore: bool = False) -> Definition:
        a = node("test.text", {"text": leaf}, name="a", ignore_cache=ignore)
        s_node = node("test.slow", {"text": "s"}, inputs=[a], name="s")
        return Definition.of(node("test.text", {"text": "t"}, inputs=[s_node], name="t"))

    async with Solver(op_kinds=kinds) as s:
        await run(s, graph("a"))
        # a runs again (ignore-cache) and makes the same content: s and t are cached
        e = await explain(s, graph("a", ignore=True))
        assert e.ops[1].state is OpState.UNKNOWN
        assert e.ops[1].reason == MissReason(
            CONTENT, input=0, cause=graph("a", ignore=True).ops[e.ops[0].digest].digest,
            cause_name="a",
        )
        ran = await run(s, graph("a", ignore=True))
        assert why(ran) == {"a": "ignore-cache was set"}
        assert (ops.execs, slow.execs) == (["a", "t", "a"], ["s"])
        # a new text: the content s reads changed, and t follows from a
        ran = await run(s, graph("A"))
        assert why(ran) == {
            "a": "definition changed: payload.text: 'a' -> 'A'",
            "s": "input 0 changed, from a, and so did the content the op reads from "
                 "it (its content key)",
            "t": "input 0 changed, from a",
        }
        assert (ops.execs, slow.execs) == (["a", "t", "a", "A", "t"], ["s", "s"])


async def test_an_input_kept_by_its_content_key_leaves_the_op_its_own_reason() -> None:
    ops, slow = Ops(), SlowOps()
    kinds = slow.register(ops.registry())

    def graph(top: str, *, ignore: bool = False) -> Definition:
        a = node("test.text", {"text": "a"}, name="a", ignore_cache=ignore)
        s_node = node("test.slow", {"text": "s"}, inputs=[a], name="s")
        return Definition.of(node("test.text", {"text": top}, inputs=[s_node], name="top"))

    async with Solver(op_kinds=kinds) as s:
        await run(s, graph("t"))
        # a runs again and makes the same content: s is loaded, and top runs
        # only because its own text changed
        e = await explain(s, graph("T", ignore=True))
        assert e.ops[2].reason is not None
        assert e.ops[2].reason.kind is INPUT  # what the walk could tell
        assert e.ops[2].fallback is not None
        ran = await run(s, graph("T", ignore=True))
        assert why(ran) == {
            "a": "ignore-cache was set",
            "top": "definition changed: payload.text: 't' -> 'T'",
        }
        assert (ops.execs, slow.execs) == (["a", "t", "a", "T"], ["s"])


@dataclass
class EnvOps:
    """``test.env``: a leaf whose cache digest is read from ``values`` (the way
    ``source.local`` hashes files): its definition can stay while its key changes."""

    values: dict[str, str] = field(default_factory=dict)
    execs: list[str] = field(default_factory=list)

    def register(self, kinds: OpKindRegistry) -> OpKindRegistry:
        kinds.register("test.env", lambda ctx: _EnvOp(ctx, self))
        return kinds


class _EnvOp:
    def __init__(self, ctx: OpContext, env: EnvOps) -> None:
        self.name = str(ctx.payload["name"])
        self.env = env

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(f"env:{self.env.values[self.name]}".encode())), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.env.execs.append(self.name)
        return [CountingResult(id=f"env-{len(self.env.execs)}",
                               value=self.env.values[self.name])]


async def test_the_same_definition_under_a_new_cache_key() -> None:
    ops, env = Ops(), EnvOps({"x": "1"})
    kinds = env.register(ops.registry())
    defn = Definition.of(node("test.text", {"text": "t"}, name="t",
                              inputs=[node("test.env", {"name": "x"}, name="x")]))
    async with Solver(op_kinds=kinds) as s:
        await run(s, defn)
        env.values["x"] = "2"
        ran = await run(s, defn)
        assert [op.reason.kind if op.reason else None for op in ran] == [
            MissKind.CACHE_KEY_CHANGED, INPUT
        ]
        assert ran[0].reason is not None
        assert ran[0].reason.previous == ran[0].digest
        assert why(ran)["x"].startswith("cache key changed, definition unchanged")
        assert (env.execs, ops.execs) == (["x", "x"], ["t", "t"])


async def test_two_inputs_never_seen_together() -> None:
    ops = Ops()

    def pair(left: str, right: str) -> Definition:
        a = node("test.text", {"text": left}, name=left)
        b = node("test.text", {"text": right}, name=right)
        return Definition.of(node("test.text", {"text": "top"}, inputs=[a, b], name="top"))

    async with Solver(op_kinds=ops.registry()) as s:
        await run(s, pair("l", "r"))
        await run(s, pair("L", "R"))
        # l and R were both built, each under top, but never together
        ran = await run(s, pair("l", "R"))
        assert why(ran) == {"top": "input 1 changed, from R"}
        assert ops.execs[-1:] == ["top"]


async def test_a_failed_build_records_nothing() -> None:
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s:
        bad = Definition.of(node("test.text", {"text": "t"},
                                 inputs=[node("test.fail", {"message": "boom"})]))
        with pytest.raises(Exception, match="boom"):
            await solve_explained(s, bad)
        assert await s.op_history.get(bad.output.digest) is None
        await run(s, chain("a", "b"))
        assert await s.op_history.get(chain("a", "b").output.digest) is not None


async def test_a_frontend_request_is_refused() -> None:
    from solver import SolveRequest

    async with Solver(op_kinds=Ops().registry()) as s:
        with pytest.raises(ValueError, match="needs a definition"):
            await solve_explained(s, SolveRequest(frontend="x"))


def test_long_file_lists_are_cut_at_five() -> None:
    files = tuple(f"f{i}" for i in range(8))
    content = MissReason(CONTENT, input=1, cause="x", cause_name="gen", files=files)
    assert content.describe() == (
        "input 1 changed, from gen, and so did the files the op reads from it: "
        "f0, f1, f2, f3, f4 and 3 more"
    )
    local = MissReason(MissKind.CACHE_KEY_CHANGED, files=files[:5])
    assert local.describe() == (
        "cache key changed, definition unchanged: the files it reads changed: "
        "f0, f1, f2, f3, f4"
    )
    long_value = MissReason(DEFINITION, field="payload.data", before="x" * 100, after="y")
    assert long_value.describe() == (
        f"definition changed: payload.data: '{'x' * 56}... -> 'y'"
    )


# -- across processes: the worker's persistent history ---------------------------------


def files(data: str, top: str = "t") -> Definition:
    """sources (inline) -> mid (a file op) -> top (another file op)."""
    sources = State.inline({"src.txt": "hello"}).with_name("sources")
    mid = State.from_node(sources.mkfile("mid.txt", data).with_name("mid").output)
    return mid.mkfile("top.txt", top).with_name("top").definition()


async def test_a_later_process_names_the_field(tmp_path: Path) -> None:
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        await run(s, files("one"))
    assert (tmp_path / OP_HISTORY_DB_NAME).is_file()
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        assert isinstance(s.op_history, SQLiteOpHistory)
        ran = await run(s, files("two"))
    assert why(ran) == {
        "mid": "definition changed: payload.actions[0].data: 'one' -> 'two'",
        "top": "input 0 changed, from mid",
    }


def picked(version: str, util: str = "1", readme: str = "notes") -> Definition:
    """sources (inline) -> pick (a file op copying src/ and VERSION from it: a
    content key)."""
    sources = State.inline({
        "src/main.c": "int main(void) { return 0; }\n",
        "src/util.c": f"int util(void) {{ return {util}; }}\n",
        "VERSION": version,
        "README": readme,
    }).with_name("sources")
    pick = State.scratch().copy(sources, "src", "src").copy(sources, "VERSION", "VERSION")
    return pick.with_name("pick").definition()


async def test_a_content_key_names_the_files_that_changed(tmp_path: Path) -> None:
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        await run(s, picked("1.0"))
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        ran = await run(s, picked("1.1", util="2"))
        assert why(ran) == {
            "sources": "definition changed: payload.files[1].data: '1.0' -> '1.1'",
            "pick": "input 0 changed, from sources, and so did the files the op reads "
                    "from it: VERSION, src/util.c",
        }
        pick = ran[1].reason
        assert pick is not None
        assert (pick.kind, pick.files) == (CONTENT, ("VERSION", "src/util.c"))
        # a file the copies do not read: sources runs, pick is loaded
        ran = await run(s, picked("1.1", util="2", readme="more notes"))
        assert why(ran) == {
            "sources": "definition changed: payload.files[0].data: 'notes' -> 'more notes'"
        }


async def test_a_local_source_names_the_files_that_changed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.c", "b.c", "c.c"):
        (src / name).write_text(f"/* {name} */\n")
    defn = State.local(src, name="checkout").mkfile("built", "x").with_name("build").definition()
    store = tmp_path / "store"
    async with Worker(store, sandbox="none") as w, Solver(worker=w) as s:
        await run(s, defn)
    (src / "b.c").write_text("/* edited */\n")
    (src / "c.c").unlink()
    (src / "d.c").write_text("/* new */\n")
    async with Worker(store, sandbox="none") as w, Solver(worker=w) as s:
        ran = await run(s, defn)
        assert why(ran) == {
            "checkout": "cache key changed, definition unchanged: the files it reads "
                        "changed: b.c, c.c, d.c",
            "build": "input 0 changed, from checkout",
        }
        assert ran[0].reason is not None
        assert ran[0].reason.files == ("b.c", "c.c", "d.c")
        assert await run(s, defn) == ()  # unchanged: a hit, and nothing to say


async def test_a_history_that_fails_does_not_fail_the_content_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        await run(s, picked("1.0"))
        await w.op_history.close()  # SQLiteOpHistory: every call now raises
        async with await s.solve(picked("1.1")) as result:
            assert result.ref is not None
            assert await result.ref.sys.read_bytes("VERSION") == b"1.1"
    assert "recording its content key's files failed" in caplog.text
    assert "recording the definition's ops in the op history failed" in caplog.text


async def test_a_determinism_check_leaves_the_places_of_the_history(tmp_path: Path) -> None:
    from solver.bridge import check_determinism

    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        await run(s, files("one"))
        history = s.op_history
        leaf = next(d for d, op in files("one").ops.items() if op.kind == "source.inline")
        place = (await history.get(leaf)).place
        report = await check_determinism(s, files("one"), scratch_dir=tmp_path)
        assert report.ok
        # each op output was solved alone: the leaf as an output of its own
        assert (await history.get(leaf)).place == place
    # so a changed leaf is still found at its place
    changed = State.inline({"src.txt": "bye"}).with_name("sources")
    mid = State.from_node(changed.mkfile("mid.txt", "one").with_name("mid").output)
    defn = mid.mkfile("top.txt", "t").with_name("top").definition()
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        ran = await run(s, defn)
    assert why(ran)["sources"] == (
        "definition changed: payload.files[0].data: 'hello' -> 'bye'"
    )


async def test_a_corrupt_history_file_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / OP_HISTORY_DB_NAME).write_bytes(b"not a database" * 100)
    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        ran = await run(s, files("one"))
        assert why(ran)["sources"] == "new op: no record of its definition"
        assert await s.op_history.get(files("one").output.digest) is not None
    assert "op history" in caplog.text
    assert "unreadable" in caplog.text


async def test_a_history_of_another_schema_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with sqlite3.connect(tmp_path / "h.db") as conn:
        conn.execute("CREATE TABLE ops (digest TEXT PRIMARY KEY, other TEXT)")
    h = await SQLiteOpHistory.open(tmp_path / "h.db")
    try:
        a = op("a")
        await h.record([rec(a, "p", 1)])
        assert (await h.previous(op("b"), "p")).op == a
    finally:
        await h.close()
    assert "unreadable" in caplog.text


async def test_a_history_that_cannot_be_opened_is_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()  # a directory where the file should be
    with pytest.raises(sqlite3.OperationalError):
        await SQLiteOpHistory.open(tmp_path / "dir.db")
    assert (tmp_path / "dir.db").is_dir()


async def test_the_worker_history_needs_an_open_worker(tmp_path: Path) -> None:
    w = Worker(tmp_path)
    with pytest.raises(Exception, match="not open: its op history"):
        w.op_history  # noqa: B018


# -- the history itself: one contract over both implementations ----------------------


@pytest.fixture(params=["memory", "sqlite"])
async def history_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[int], Any]]:
    opened: list[SQLiteOpHistory] = []

    async def make(max_ops: int) -> OpHistory:
        if request.param == "memory":
            return InMemoryOpHistory(max_ops)
        h = await SQLiteOpHistory.open(tmp_path / f"h{len(opened)}.db", max_ops)
        opened.append(h)
        return h

    yield make
    for h in opened:
        await h.close()


def op(text: str, *inputs: OpDef) -> OpDef:
    from solver import OutputRef

    return OpDef("test.text", {"text": text}, tuple(OutputRef(i.digest) for i in inputs))


def rec(o: OpDef, place: str, at: float) -> OpDefinitionRecord:
    return OpDefinitionRecord(o, str(o.payload["text"]), place, at)


async def test_history_previous_prefers_the_same_inputs_then_the_place(
    history_factory: Callable[[int], Any],
) -> None:
    h: OpHistory = await history_factory(100)
    leaf, other = op("a"), op("z")
    b1, b2, b3 = op("b1", leaf), op("b2", leaf), op("b3", other)
    await h.record([rec(leaf, "p", 1), rec(b1, "p/0", 2), rec(b2, "p/0", 3),
                    rec(b3, "p/0", 4)])
    got = await h.get(b1.digest)
    assert got is not None
    assert (got.op, got.name, got.place, got.seen_at) == (b1, "b1", "p/0", 2)
    assert await h.get(op("nothing").digest) is None
    # over the same inputs: the most recent other than itself
    assert (await h.previous(op("b4", leaf), "q")).op == b2
    assert (await h.previous(b2, "q")).op == b1
    # nothing over those inputs: the most recent at the place
    assert (await h.previous(op("b5", op("new")), "p/0")).op == b3
    assert (await h.previous(op("leaf2"), "p")).op == leaf
    assert await h.previous(op("leaf3"), "elsewhere") is None
    # seen again: it moves to the front, with its new place
    await h.record([rec(b1, "p/1", 5)])
    assert (await h.previous(op("b6", leaf), "q")).op == b1
    assert (await h.previous(op("b7", op("new")), "p/1")).op == b1


async def test_history_is_bounded_least_recently_seen_out_first(
    history_factory: Callable[[int], Any],
) -> None:
    h: OpHistory = await history_factory(2)
    a, b, c = op("a"), op("b"), op("c")
    await h.record([rec(a, "p", 1), rec(b, "p", 2)])
    await h.record([rec(a, "p", 3)])  # a is seen again: b is now the oldest
    await h.record([rec(c, "p", 4)])
    assert [await h.get(x.digest) is not None for x in (a, b, c)] == [True, False, True]


async def test_history_content_keys_name_the_files_that_differ(
    history_factory: Callable[[int], Any],
) -> None:
    h: OpHistory = await history_factory(2)
    await h.record_content("v1", 0, "slot", "d1", {"a": "1", "b": "1", "gone": "1"})
    assert h.changed_files("v1", 0) is None  # nothing to compare with
    await h.record_content("v2", 0, "slot", "d2", {"a": "1", "b": "2", "new": "1"})
    assert h.changed_files("v2", 0) == ("b", "gone", "new")
    await h.record_content("v3", 1, "slot", "d2", {"a": "1", "b": "2", "new": "1"})
    assert h.changed_files("v3", 1) is None  # the same key: nothing changed
    assert h.changed_files("v2", 1) is None
    # bounded: two slots kept, least recently recorded out first
    await h.record_content("w", 0, "other", "x", {})
    await h.record_content("w", 0, "third", "y", {})
    await h.record_content("v4", 0, "slot", "d3", {"a": "9"})
    assert h.changed_files("v4", 0) is None


async def test_sqlite_history_writes_content_keys_recorded_together_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty content keys recorded side by side (as a build's file steps do) are
    written in a few transactions, not twenty; each slot's changed files are
    still named; a caller cancelled while it writes, or while it waits for the
    writer, leaves once it may, and its record is written all the same."""
    h = await SQLiteOpHistory.open(tmp_path / OP_HISTORY_DB_NAME)
    calls: list[int] = []
    real = SQLiteOpHistory._call

    async def counted(self: SQLiteOpHistory, func: Any, *args: Any) -> Any:
        calls.append(len(args[0]) if func.__name__ == "_record_contents" else 0)
        return await real(self, func, *args)

    monkeypatch.setattr(SQLiteOpHistory, "_call", counted)
    try:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(h.record_content, f"v{i}", 0, f"slot{i}", "d1", {"a": "1"})
        assert sum(calls) == 20
        assert len(calls) < 20
        calls.clear()
        # a caller cancelled as it writes: its batch is written, then it leaves
        with anyio.CancelScope() as scope:
            scope.cancel()
            await h.record_content("first", 0, "slot-first", "d8", {"y": "1"})
        assert scope.cancelled_caught
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(h.record_content, f"v{i}", 0, f"slot{i}", "d2", {"a": str(i)})
            while not h._writing:
                await anyio.lowlevel.checkpoint()
            # a caller that waits behind the writer: cancelled, it leaves at once
            with anyio.CancelScope() as scope:
                scope.cancel()
                await h.record_content("late", 0, "slot-late", "d9", {"z": "1"})
            assert scope.cancelled_caught
            assert h._writing
        assert [h.changed_files(f"v{i}", 0) for i in (0, 1)] == [("a",), ()]
        # both written although their callers were cancelled: each new key is
        # compared with them
        await h.record_content("again", 0, "slot-first", "d10", {"y": "2"})
        await h.record_content("again", 1, "slot-late", "d10", {"z": "2"})
        assert h.changed_files("again", 0) == ("y",)
        assert h.changed_files("again", 1) == ("z",)
    finally:
        await h.close()


def test_history_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1 op"):
        InMemoryOpHistory(0)


async def test_history_records_name_each_place() -> None:
    leaf = node("test.text", {"text": "a"}, name="src")
    mid = node("file", {"actions": []}, inputs=[leaf])
    top = node("test.text", {"text": "t"}, inputs=[mid, leaf], name="top")
    records = history_records(Definition.of(top), seen_at=7.0)

    def place(*steps: str) -> str:
        at = ""
        for step in steps:
            at = digest_of(f"{at}/{step}".encode())
        return at

    assert [(r.name, r.place, r.seen_at) for r in records] == [
        ("top", place("0:test.text"), 7.0),
        ("file", place("0:test.text", "0:file"), 7.0),
        ("src", place("0:test.text", "1:test.text"), 7.0),  # the shortest path
    ]
    # the same place at any depth is one digest long
    deep = history_records(chain(*(f"t{i}" for i in range(300))))
    assert {len(r.place) for r in deep} == {71}


async def test_a_solver_records_a_definition_once() -> None:
    class Counting(InMemoryOpHistory):
        calls: list[int] = []  # noqa: RUF012

        async def record(self, records: Any) -> None:
            records = list(records)
            self.calls.append(len(records))
            await super().record(records)

    history = Counting()
    async with Solver(op_kinds=Ops().registry(), op_history=history) as s:
        for defn in (chain("a", "b"), chain("a", "b"), chain("a", "c"), chain("a", "b")):
            async with await s.solve(defn):
                pass
        await s.record_definition(chain("a", "c"))
    assert history.calls == [2, 2]  # each definition once; the repeats cost nothing
    assert len(history) == 3


async def test_an_unreadable_row_is_no_earlier_version(tmp_path: Path) -> None:
    h = await SQLiteOpHistory.open(tmp_path / "h.db")
    try:
        a = op("a")
        await h.record([rec(a, "p", 1)])
        with sqlite3.connect(tmp_path / "h.db") as conn:
            conn.execute("UPDATE ops SET digest = ?", (op("other").digest,))
        assert await h.previous(op("b"), "p") is None
    finally:
        await h.close()
    with pytest.raises(RuntimeError, match="is closed"):
        await h.get(a.digest)


# -- cancellation: every await of solve_explained ---------------------------------------


async def test_cancelled_anywhere_in_solve_explained_nothing_leaks(
    handle_tracker: HandleTracker,
) -> None:
    completed = False
    for n in range(1, MAX_SUSPENSIONS):
        ops = Ops()
        async with Solver(op_kinds=ops.registry()) as s:
            await run(s, chain("a", "b"))
            outcome, _ = await cancel_at_suspension(
                n, lambda: solve_explained(s, chain("a", "B"))
            )
            if outcome is not None:
                result, ran = outcome
                assert isinstance(result, SolveResult)
                assert why(ran) == {"B": "definition changed: payload.text: 'b' -> 'B'"}
                await result.release()
                completed = True
        assert_all_released(ops)
        handle_tracker.check()
        if completed:
            break
    assert completed
    assert n > 3


class _BlockingHistory(InMemoryOpHistory):
    """Its ``record`` waits until cancelled (a slow disk, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = anyio.Event()

    async def record(self, records: Any) -> None:
        self.recording.set()
        await anyio.sleep_forever()


async def test_cancelled_while_recording_the_result_is_released(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()
    history = _BlockingHistory()
    async with Solver(op_kinds=ops.registry(), op_history=history) as s:
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.solve, chain("a", "b"))
            await history.recording.wait()
            tg.cancel_scope.cancel()
        assert ops.execs == ["a", "b"]
    assert ops.live_values() == []
    handle_tracker.check()


async def test_the_cli_build_cancelled_while_recording_releases_everything(
    handle_tracker: HandleTracker,
) -> None:
    import io

    from solver.cli._main import build_definition

    ops = Ops()
    history = _BlockingHistory()
    async with Solver(op_kinds=ops.registry(), op_history=history) as s:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(build_definition, s, chain("a", "b"), progress_out=io.StringIO())
            )
            await history.recording.wait()
            tg.cancel_scope.cancel()
        assert ops.execs == ["a", "b"]
    assert ops.live_values() == []
    handle_tracker.check()


class _BlockingContentHistory(InMemoryOpHistory):
    """Its ``record_content`` waits until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = anyio.Event()

    async def record_content(self, *args: Any) -> None:
        self.recording.set()
        await anyio.sleep_forever()


async def test_cancelled_while_a_content_key_is_recorded_nothing_stays_in_use(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    from solver.worker import disk_usage

    async with Worker(tmp_path, sandbox="none") as w, Solver(worker=w) as s:
        await run(s, picked("1.0"))
        blocking = _BlockingContentHistory()
        kept, w._op_history = w._op_history, blocking  # type: ignore[assignment]
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(s.solve, picked("1.1"))
                await blocking.recording.wait()  # pick's content key, sources built
                tg.cancel_scope.cancel()
        finally:
            w._op_history = kept
        usage = await disk_usage(w.store)
        assert usage.in_use == 0
    handle_tracker.check()


async def test_a_failing_history_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(InMemoryOpHistory):
        async def record(self, records: Any) -> None:
            raise OSError("disk full")

    async with (
        Solver(op_kinds=Ops().registry(), op_history=Broken()) as s,
        await s.solve(chain("a")) as result,
    ):
        assert result.ref is not None
    assert "recording the definition's ops in the op history failed" in caplog.text


# -- the command line -------------------------------------------------------------------


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_build_explain_prints_a_line_per_op_that_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(files("one").to_json())
    two.write_text(files("two").to_json())
    base = ["build", "--cache-dir", str(cache), "--sandbox", "none", "--progress", "plain"]
    code, _, err = _cli([*base, "--explain", str(one)], capsys)
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("explain: ")] == [
        "explain: sources: new op: no record of its definition",
        "explain: mid: input 0 changed, from sources",
        "explain: top: input 0 changed, from sources",
    ]
    code, _, err = _cli([*base, "--explain", str(one)], capsys)
    assert code == 0
    assert "explain:" not in err
    code, _, err = _cli([*base, "--explain", str(two)], capsys)
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("explain: ")] == [
        "explain: mid: definition changed: payload.actions[0].data: 'one' -> 'two'",
        "explain: top: input 0 changed, from mid",
    ]


def test_build_explain_json_carries_the_reason_in_the_started_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(files("one").to_json())
    two.write_text(files("one", top="T").to_json())
    base = ["build", "--cache-dir", str(cache), "--sandbox", "none", "--progress", "json"]
    assert _cli([*base, str(one)], capsys)[0] == 0  # no --explain: history still kept
    code, _, err = _cli([*base, "--explain", str(two)], capsys)
    assert code == 0
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    started = [e for e in events if e["status"] == "started"]
    assert [(e["name"], e["reason"]) for e in started] == [
        ("top", "definition changed: payload.actions[0].data: 't' -> 'T'")
    ]
    assert all("reason" not in e for e in events if e["status"] != "started")
    assert [line for line in err.splitlines() if line.startswith("explain: ")] == [
        "explain: top: definition changed: payload.actions[0].data: 't' -> 'T'"
    ]
    # the build's summary (the last event) and so its history record carry it too
    summary = events[-1]
    assert summary["status"] == "summary"
    assert [(r["name"], r["reason"]) for r in summary["summary"]["ran"]] == [
        ("top", "definition changed: payload.actions[0].data: 't' -> 'T'")
    ]
    # without --explain the events carry no reason
    code, _, err = _cli([*base, str(one)], capsys)
    assert code == 0
    assert '"reason"' not in err


def test_build_explain_json_names_the_files_of_a_content_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(picked("1.0").to_json())
    two.write_text(picked("1.0", util="2").to_json())
    base = ["build", "--cache-dir", str(cache), "--sandbox", "none", "--progress", "json"]
    assert _cli([*base, str(one)], capsys)[0] == 0
    code, _, err = _cli([*base, "--explain", str(two)], capsys)
    assert code == 0
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    reasons = {e["name"]: e["reason"] for e in events if e["status"] == "started"}
    assert reasons["pick"] == (
        "input 0 changed, from sources, and so did the files the op reads from it: "
        "src/util.c"
    )
    assert f"explain: pick: {reasons['pick']}" in err.splitlines()
    # every started event carries the reason of the line after the build
    lines = [line for line in err.splitlines() if line.startswith("explain: ")]
    assert lines == [f"explain: {name}: {why}" for name, why in reasons.items()]


def test_build_explain_with_a_frontend_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(["build", "--explain", "--frontend", "buildfile", str(tmp_path)],
                        capsys)
    assert code == 2
    assert "--explain builds a definition file" in err
