"""The built-in worker's op kinds, solved end to end through a real snapshot store."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from solver import Definition, Op, OpContext, OpFactory, Result, SolveError, Solver, node
from solver.testing import HandleTracker
from solver.worker import SnapshotView, UnsafePathError, Worker
from solver.worker._paths import resolve_in
from solver.worker.state import State, merge

pytestmark = pytest.mark.anyio


class Counting:
    """Wraps every registered kind's factory to count execs per kind."""

    def __init__(self, worker: Worker) -> None:
        self.execs: list[str] = []
        registry = worker.op_kinds
        for name in list(registry):
            kind = registry.get(name)
            assert kind is not None
            registry.register(name, self._wrap(kind.factory), outputs=kind.outputs,
                              validate=kind.validate, replace=True)

    def _wrap(self, factory: OpFactory) -> OpFactory:
        execs = self.execs

        def make(ctx: OpContext) -> Op:
            op = factory(ctx)
            inner = op.exec

            async def exec(inputs: Sequence[Result]) -> Sequence[Result]:
                execs.append(ctx.vertex.name or ctx.kind)
                return await inner(inputs)

            op.exec = exec  # type: ignore[method-assign]
            return op

        return make


@asynccontextmanager
async def env(tmp_path: Path) -> AsyncIterator[tuple[Worker, Solver, Counting]]:
    with anyio.fail_after(30):
        async with Worker(tmp_path / "w") as w:
            counting = Counting(w)
            async with Solver(op_kinds=w.op_kinds) as s:
                yield w, s, counting
            tmp = w.store.root / "tmp"
            assert list(tmp.iterdir()) == [], "a temp dir was left behind"


async def solve_files(s: Solver, defn: Definition) -> dict[str, bytes | str]:
    """Every entry of the result: files as bytes, dirs as "dir", links as "-> t"."""
    async with await s.solve(defn) as result:
        assert result.ref is not None
        view = result.ref.sys
        assert isinstance(view, SnapshotView)
        out: dict[str, bytes | str] = {}
        for st in await view.walk():
            if st.is_dir:
                out[st.path] = "dir"
            elif st.is_symlink:
                out[st.path] = f"-> {st.linkname}"
            else:
                out[st.path] = await view.read_bytes(st.path)
        return out


async def solve_id(s: Solver, defn: Definition) -> str:
    async with await s.solve(defn) as result:
        assert result.ref is not None
        return result.ref.sys.id  # type: ignore[attr-defined, no-any-return]


# -- source.inline ---------------------------------------------------------------------------


async def test_inline_files_read_back(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    defn = Definition.of(node("source.inline", {"files": [
        {"path": "dir/a.txt", "data": "hello"},
        {"path": "b.bin", "data": "AAEC", "encoding": "base64", "mode": 0o755},
    ]}))
    async with env(tmp_path) as (_, s, counting):
        async with await s.solve(defn) as result:
            assert result.ref is not None
            view = result.ref.sys
            assert isinstance(view, SnapshotView)
            assert await view.read_bytes("dir/a.txt") == b"hello"
            assert await view.read_bytes("b.bin") == b"\x00\x01\x02"
            st = await view.stat("b.bin")
            assert st.permissions == 0o555  # write bits dropped on commit
            assert (await view.stat("dir")).is_dir
            first = view.id
        # a second solve executes nothing and gives the same snapshot
        assert await solve_id(s, defn) == first
        assert counting.execs == ["source.inline"]


async def test_invalid_payload_is_refused_before_running(tmp_path: Path) -> None:
    defn = Definition.of(node("source.inline", {"files": [{"path": "a", "data": 3}]}))
    async with env(tmp_path) as (_, s, counting):
        with pytest.raises(SolveError, match=r"files\[0\]\.data: must be a string"):
            await s.solve(defn)
        assert counting.execs == []


# -- file ------------------------------------------------------------------------------------


async def test_file_actions(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    src = State.inline({"lib/a.py": "A", "lib/b.txt": "B", "top": "T"})
    st = (State.scratch()
          .mkdir("x/y")
          .mkfile("x/y/f", "data")
          .mkfile("gone", "bye")
          .copy(src, "lib", "out", include=["*.py"])
          .copy(src, "top", "x/")
          .copy(src, "top", "renamed")
          .rm("gone"))
    async with env(tmp_path) as (_, s, counting):
        files = await solve_files(s, st.definition())
        assert files == {
            "out": "dir", "out/a.py": b"A",
            "renamed": b"T",
            "x": "dir", "x/top": b"T", "x/y": "dir", "x/y/f": b"data",
        }
        assert sorted(counting.execs) == ["file", "source.inline"]
        await solve_files(s, st.definition())
        assert len(counting.execs) == 2


async def test_file_action_errors(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    async with env(tmp_path) as (_, s, _c):
        with pytest.raises(SolveError, match=r"'nope' not found"):
            await s.solve(State.scratch().rm("nope").definition())
        await solve_files(s, State.scratch().rm("nope", allow_not_found=True).definition())
        with pytest.raises(SolveError, match=r"'d' already exists"):
            await s.solve(State.scratch().mkdir("d").mkdir("d", parents=False).definition())
        with pytest.raises(SolveError, match=r"copy source 'missing' not found in input 0"):
            await s.solve(
                State.scratch().mkdir("d").copy(State.inline({"a": "1"}), "missing", "x")
                .definition()
            )


async def test_merge_order(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    a = State.inline({"same": "a", "only_a": "a", "d/x": "a"})
    b = State.inline({"same": "b", "d/y": "b"})
    c = State.scratch().mkfile("d", "now a file").mkfile("same", "c")
    async with env(tmp_path) as (_, s, counting):
        assert await solve_files(s, merge([a, b]).definition()) == {
            "same": b"b", "only_a": b"a", "d": "dir", "d/x": b"a", "d/y": b"b",
        }
        assert await solve_files(s, merge([b, a, c]).definition()) == {
            "same": b"c", "only_a": b"a", "d": b"now a file",
        }
        n = len(counting.execs)
        await solve_files(s, merge([a, b]).definition())
        assert len(counting.execs) == n


# -- source.local ----------------------------------------------------------------------------


async def test_local_source_cache(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    (src / "skip.log").write_text("log")
    os.symlink("a.txt", src / "link")
    local = State.local(src, exclude=["*.log"]).with_name("local")
    built = State.scratch().copy(local, ".", "app").with_name("build")
    async with env(tmp_path) as (_, s, counting):
        files = await solve_files(s, built.definition())
        assert files == {"app": "dir", "app/a.txt": b"a", "app/link": "-> a.txt",
                         "app/sub": "dir", "app/sub/b.txt": b"b"}
        assert sorted(counting.execs) == ["build", "local"]
        # unchanged directory (and a change to an excluded file): all hits
        (src / "skip.log").write_text("more log")
        await solve_files(s, built.definition())
        assert sorted(counting.execs) == ["build", "local"]
        # one changed file: the source and what depends on it run again
        (src / "sub" / "b.txt").write_text("b2")
        files = await solve_files(s, built.definition())
        assert files["app/sub/b.txt"] == b"b2"
        assert sorted(counting.execs) == ["build", "build", "local", "local"]


async def test_local_missing_dir(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    async with env(tmp_path) as (_, s, _c):
        with pytest.raises(SolveError, match=r"source.local: directory .*nope.* does not exist"):
            await s.solve(State.local(tmp_path / "nope").definition())


async def test_copy_content_key(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    """Changing a file outside the copied paths re-runs the source but not the copy."""
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "k.txt").write_text("k")
    (src / "other.txt").write_text("1")
    local = State.local(src).with_name("local")
    built = State.scratch().mkfile("marker", "m").copy(local, "keep", "k").with_name("copy")
    async with env(tmp_path) as (_, s, counting):
        first = await solve_id(s, built.definition())
        assert sorted(counting.execs) == ["copy", "local"]
        (src / "other.txt").write_text("2")
        assert await solve_id(s, built.definition()) == first
        assert sorted(counting.execs) == ["copy", "local", "local"]
        (src / "keep" / "k.txt").write_text("k2")
        second = await solve_id(s, built.definition())
        assert second != first
        assert sorted(counting.execs) == ["copy", "copy", "local", "local", "local"]


# -- unsafe paths ----------------------------------------------------------------------------


async def test_unsafe_paths_refused(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    linked = State.inline({"f": "x"}).with_name("links")
    # a tree with escaping symlinks, made through a local source
    src = tmp_path / "links"
    src.mkdir()
    os.symlink("/etc", src / "abs")
    os.symlink("../../..", src / "up")
    os.symlink("/dev/null", src / "null")
    links = State.local(src)
    cases: list[tuple[State, str]] = [
        (State.scratch().mkfile("../evil", "x"), r"mkfile path '\.\./evil' is refused: '\.\.'"),
        (State.scratch().mkfile("/../../evil", "x"), r"'/\.\./\.\./evil' is refused"),
        (State.scratch().mkdir("a/../../b"), r"mkdir path 'a/\.\./\.\./b' is refused"),
        (State.scratch().copy(linked, "../f", "x"), r"copy source '\.\./f' is refused"),
        (links.mkfile("abs/passwd", "x"),
         r"mkfile path 'abs/passwd' is refused: symlink 'abs' -> '/etc' points outside"),
        (links.mkfile("up/x", "x"), r"'up/x' is refused: symlink 'up' -> '\.\./\.\./\.\.' "
         r"points outside"),
        (links.rm("up/x"), r"rm path 'up/x' is refused"),
        (State.scratch().copy(links, "null", "n"),
         r"copy source 'null' is refused: symlink 'null' -> '/dev/null' points outside"),
    ]
    async with env(tmp_path) as (_, s, _c):
        for state, message in cases:
            with pytest.raises(SolveError, match=message) as info:
                await s.solve(state.definition())
            assert isinstance(info.value.__cause__, UnsafePathError) or isinstance(
                info.value, UnsafePathError
            )
        # an absolute path means the root of the snapshot, not the host
        files = await solve_files(s, State.scratch().mkfile("/abs/file", "x").definition())
        assert files == {"abs": "dir", "abs/file": b"x"}
        # a symlink at the final component is replaced, never written through
        files = await solve_files(s, links.mkfile("null", "safe").definition())
        assert files["null"] == b"safe"


async def test_fifo_in_local_source_refused(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = tmp_path / "fifo"
    src.mkdir()
    (src / "ok").write_text("ok")
    os.mkfifo(src / "pipe")
    async with env(tmp_path) as (_, s, _c):
        with pytest.raises(SolveError, match=r"'pipe' is refused: it is a FIFO"):
            await s.solve(State.local(src).definition())
        files = await solve_files(s, State.local(src, exclude=["pipe"]).definition())
        assert files == {"ok": b"ok"}


def test_resolve_in_rules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    os.symlink("d", root / "inside")
    os.symlink("/dev/null", root / "devlink")
    os.mkfifo(root / "fifo")
    assert resolve_in(root, "inside/x") == str(root / "d" / "x")
    assert resolve_in(root, "/d/../d/x") == str(root / "d" / "x")
    assert resolve_in(root, "") == str(root)
    assert resolve_in(root, "inside") == str(root / "inside")
    assert resolve_in(root, "inside", follow_final=True) == str(root / "d")
    with pytest.raises(UnsafePathError, match="'fifo' is refused: it is a FIFO"):
        resolve_in(root, "fifo")
    with pytest.raises(UnsafePathError, match="points outside"):
        resolve_in(root, "devlink", follow_final=True)
    with pytest.raises(UnsafePathError, match="NUL"):
        resolve_in(root, "a\0b")
    os.symlink("loop", root / "loop")
    with pytest.raises(UnsafePathError, match="too many levels"):
        resolve_in(root, "loop/x")
    assert stat.S_ISDIR(os.lstat(root / "d").st_mode)


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelled_solve_leaves_nothing(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(200):
        (src / f"f{i}").write_bytes(b"x" * 10000)
    async with env(tmp_path) as (w, s, counting):
        # Growing delays, until one lets an exec start (how long that takes
        # depends on the machine's load): each solve is cancelled part way.
        for delay in (0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
            with anyio.move_on_after(delay):
                async with await s.solve(State.local(src).mkfile("m", "m").definition()):
                    pass
            if counting.execs:
                break
        assert counting.execs, "no exec started within 2 s"
        assert not w.store._mutables
