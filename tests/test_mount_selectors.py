"""Exec mount selectors: a read-only mount of a sub-path of an input, keyed on that
sub-path's content only (issue 21), so a compile step that mounts its own source
file runs again only when that file (or a header it mounts) changes."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from solver import DefinitionError, SolveError, Solver
from solver.testing import HandleTracker
from solver.worker import SandboxMode, SnapshotView, State, Worker, merge, run

pytestmark = pytest.mark.anyio

SH = "/bin/sh"
UNITS = ("a", "b", "c")
SANDBOXES = [
    "none",
    pytest.param(
        "bwrap",
        marks=pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
    ),
]


def write_tree(top: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def graph(src_dir: Path) -> State:
    """One "compile" per unit: it mounts only src/<unit>.c and include/, and
    writes out/<unit>.o from them; then a merge of the outputs."""
    src = State.local(src_dir, name="sources")
    steps = []
    for u in UNITS:
        steps.append(
            run(
                [SH, "-c", f"mkdir -p out && cat {u}.c inc/*.h > out/{u}.o"],
                mounts={f"{u}.c": src, "inc": src},
                readonly=[f"{u}.c", "inc"],
                selectors={f"{u}.c": f"src/{u}.c", "inc": "include"},
                name=f"cc {u}",
            )
        )
    return merge(steps, name="objects")


async def build(solver: Solver, state: State) -> tuple[dict[str, bytes], set[str]]:
    """The merged outputs, and the names of the steps that ran."""
    job = solver.new_job()
    ran: set[str] = set()
    try:
        async with await solver.solve(state.definition(), job=job) as result:
            assert result.ref is not None
            view = result.ref.sys
            assert isinstance(view, SnapshotView)
            out = {u: await view.read_bytes(f"out/{u}.o") for u in UNITS}
    finally:
        async for ev in _drain(job):
            if ev.status == "completed" and ev.name.startswith("cc "):
                ran.add(ev.name[3:])
    return out, ran


async def _drain(job):  # type: ignore[no-untyped-def]
    await job.discard()
    async for ev in job.status():
        yield ev


@pytest.mark.parametrize("sandbox", SANDBOXES)
async def test_a_selector_keyed_mount_reruns_only_the_steps_whose_files_changed(
    tmp_path: Path, handle_tracker: HandleTracker, sandbox: SandboxMode
) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, {"src/a.c": "A1\n", "src/b.c": "B1\n", "src/c.c": "C1\n",
                      "include/x.h": "X1\n", "README": "r1\n"})
    async with Worker(tmp_path / "w", sandbox=sandbox) as worker, \
            Solver(worker=worker) as solver:
        out, ran = await build(solver, graph(tree))
        assert ran == set(UNITS)
        assert out["b"] == b"B1\nX1\n"
        # A file no step mounts: nothing runs.
        write_tree(tree, {"README": "r2\n"})
        _, ran = await build(solver, graph(tree))
        assert ran == set()
        # One unit's file: only its step runs.
        write_tree(tree, {"src/b.c": "B2\n"})
        out, ran = await build(solver, graph(tree))
        assert ran == {"b"}
        assert out == {"a": b"A1\nX1\n", "b": b"B2\nX1\n", "c": b"C1\nX1\n"}
        # A header every step mounts: every step runs.
        write_tree(tree, {"include/x.h": "X2\n"})
        out, ran = await build(solver, graph(tree))
        assert ran == set(UNITS)
        assert out["a"] == b"A1\nX2\n"


async def test_without_selectors_every_step_reruns(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """The control: the same steps mounting the whole tree all run after an edit of
    one file, so the test above sees the selectors' effect."""
    tree = tmp_path / "tree"
    write_tree(tree, {"src/a.c": "A1\n", "src/b.c": "B1\n", "src/c.c": "C1\n",
                      "include/x.h": "X1\n"})

    def whole(src_dir: Path) -> State:
        src = State.local(src_dir, name="sources")
        return merge([
            run([SH, "-c", f"mkdir -p out && cat t/src/{u}.c t/include/*.h > out/{u}.o"],
                mounts={"t": src}, readonly=["t"], name=f"cc {u}")
            for u in UNITS
        ], name="objects")

    async with Worker(tmp_path / "w", sandbox="none") as worker, \
            Solver(worker=worker) as solver:
        await build(solver, whole(tree))
        write_tree(tree, {"src/b.c": "B2\n"})
        _, ran = await build(solver, whole(tree))
        assert ran == set(UNITS)


async def test_a_missing_selected_path_fails_the_step(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = State.inline({"a.txt": "a"}, name="src")
    step = run([SH, "-c", "true"], mounts={"m": src}, readonly=["m"],
               selectors={"m": "nope/x.c"}, name="step")
    async with Worker(tmp_path / "w", sandbox="none") as worker, \
            Solver(worker=worker) as solver:
        with pytest.raises(SolveError, match=r"selector 'nope/x\.c' is not in input 0"):
            await solver.solve(step.definition())


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ({"input": 0, "dest": "m", "selector": "a"}, "only a read-only mount of an input"),
        ({"input": None, "dest": "m", "readonly": True, "selector": "a"},
         "only a read-only mount of an input"),
        ({"input": 0, "dest": "m", "readonly": True, "selector": "../a"}, "contains '..'"),
        ({"input": 0, "dest": "m", "readonly": True, "selector": "/a"}, "is absolute"),
        ({"input": 0, "dest": "m", "readonly": True, "selector": "."}, "names the input's root"),
        ({"input": 0, "dest": "m", "readonly": True, "selector": 3}, "must be a string"),
    ],
)
async def test_bad_selectors_are_refused_before_anything_runs(
    tmp_path: Path, mount: dict[str, object], message: str
) -> None:
    from solver import Definition, node

    src = State.inline({"a": "a"}).output
    exec_node = node("exec", {"args": ["true"], "mounts": [mount]}, inputs=[src])
    defn = Definition.of(exec_node)
    async with Worker(tmp_path / "w", sandbox="none") as worker:
        with pytest.raises(DefinitionError, match=message):
            defn.validate(worker.op_kinds)


def test_selectors_must_name_read_only_mounts() -> None:
    with pytest.raises(ValueError, match="not read-only mounts: \\['m'\\]"):
        run(["true"], mounts={"m": State.inline({"a": "a"})}, selectors={"m": "a"})


async def test_cancelled_while_a_selector_key_is_computed_leaks_nothing(
    tmp_path: Path, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build is cancelled while a step's selector content key is being
    computed (the await on the thread that hashes the selected paths): every
    handle is released once (the tracker), no snapshot stays in use, and a
    later build finishes with the right outputs."""
    from solver.worker import _exec

    hashing = anyio.Event()
    cancelled = threading.Event()
    real = _exec.selection_digest

    def slow(*args: Any) -> str:  # runs in the worker thread of the key's await
        anyio.from_thread.run_sync(hashing.set)
        # the hash ends only once the build is cancelled (a 0.2 s sleep bet the
        # cancelling task ran within it)
        assert cancelled.wait(30)
        return real(*args)

    monkeypatch.setattr(_exec, "selection_digest", slow)
    tree = tmp_path / "tree"
    write_tree(tree, {"src/a.c": "A1\n", "src/b.c": "B1\n", "src/c.c": "C1\n",
                      "include/x.h": "X1\n"})
    finished = False
    async with Worker(tmp_path / "w") as worker, Solver(worker=worker) as solver:
        async with anyio.create_task_group() as tg:

            async def cancel_once_hashing() -> None:
                await hashing.wait()
                tg.cancel_scope.cancel()
                cancelled.set()

            tg.start_soon(cancel_once_hashing)
            await build(solver, graph(tree))
            finished = True
            tg.cancel_scope.cancel()
        assert hashing.is_set()
        assert not finished  # cancelled while the key was being computed
        assert not [i.id for i in await worker.store.usage() if i.in_use]
        monkeypatch.setattr(_exec, "selection_digest", real)
        out, ran = await build(solver, graph(tree))
        assert out == {"a": b"A1\nX1\n", "b": b"B1\nX1\n", "c": b"C1\nX1\n"}
        assert ran <= set(UNITS)
