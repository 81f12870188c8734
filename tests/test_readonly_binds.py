"""Read-only exec mounts in the sandbox are the input snapshot itself, bound
read-only by bwrap, not a copy (issue 21: a copy per mount left 60 MB in the store
for a 2.1 MB tree); without a sandbox they stay private copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from solver import SolveError, Solver
from solver.testing import HandleTracker
from solver.worker import SandboxMode, SnapshotView, State, Worker, run

pytestmark = pytest.mark.anyio
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed")

SH = "/bin/sh"


async def inode_seen_by_step(tmp_path: Path, sandbox: SandboxMode) -> tuple[int, int]:
    """(the inode of src/a.txt in the input snapshot, the one the step saw)."""
    src = State.inline({"a.txt": "hello\n", "d/b.txt": "b\n"}, name="src")
    step = run(
        [SH, "-c", "stat -c %i src/a.txt > ino; cat src/a.txt src/d/b.txt > both"],
        mounts={"src": src},
        readonly=["src"],
        name="look",
    )
    async with (
        Worker(tmp_path / sandbox, sandbox=sandbox) as worker,
        Solver(worker=worker) as solver,
        await solver.solve(src.definition()) as source,
        await solver.solve(step.definition()) as result,
    ):
        assert source.ref is not None
        assert result.ref is not None
        view = result.ref.sys
        assert isinstance(view, SnapshotView)
        assert await view.read_bytes("both") == b"hello\nb\n"
        seen = int(await view.read_bytes("ino"))
        source_view = source.ref.sys
        assert isinstance(source_view, SnapshotView)
        return os.lstat(source_view.path / "a.txt").st_ino, seen


@needs_bwrap
async def test_sandboxed_readonly_mount_is_the_snapshot_itself(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    snapshot_inode, seen = await inode_seen_by_step(tmp_path, "bwrap")
    assert seen == snapshot_inode


async def test_unsandboxed_readonly_mount_is_a_private_copy(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    snapshot_inode, seen = await inode_seen_by_step(tmp_path, "none")
    assert seen != snapshot_inode


@needs_bwrap
async def test_a_bound_snapshot_cannot_be_changed_by_the_step(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """Not even by chmod, nor root in the step's user namespace: the bind is read-only,
    and the snapshot reads the same after the attempt."""
    src = State.inline({"a.txt": "hello\n"}, name="src")
    attempt = run(
        [SH, "-c", "chmod u+w src/a.txt; echo changed > src/a.txt; "
         "touch src/new; rm -f src/a.txt; exit 0"],
        mounts={"src": src},
        readonly=["src"],
        name="try to write",
    )
    after = run([SH, "-c", "cat src/a.txt > copy; ls src > names"],
                mounts={"src": src, "x": attempt}, readonly=["src", "x"], name="after")
    async with (
        Worker(tmp_path / "w") as worker,
        Solver(worker=worker) as solver,
        await solver.solve(after.definition()) as result,
    ):
        assert result.ref is not None
        view = result.ref.sys
        assert isinstance(view, SnapshotView)
        assert await view.read_bytes("copy") == b"hello\n"
        assert await view.read_bytes("names") == b"a.txt\n"


@needs_bwrap
async def test_nested_readonly_bind_in_a_writable_root(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A read-only mount nested in the output mount: the output holds what the
    step wrote and the directories around the mount point, and nothing of the
    input (as with a copy)."""
    src = State.inline({"a.txt": "a\n"}, name="src")
    step = run([SH, "-c", "cp in/src/a.txt out.txt"], root=State.scratch().mkdir("in"),
               mounts={"in/src": src}, readonly=["in/src"], name="nested")
    async with (
        Worker(tmp_path / "w") as worker,
        Solver(worker=worker) as solver,
        await solver.solve(step.definition()) as result,
    ):
        assert result.ref is not None
        view = result.ref.sys
        assert isinstance(view, SnapshotView)
        assert await view.read_bytes("out.txt") == b"a\n"
        assert [e.path for e in await view.walk()] == ["in", "out.txt"]


@needs_bwrap
async def test_writing_into_a_bound_mount_fails_the_step(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = State.inline({"a.txt": "a\n"}, name="src")
    step = run([SH, "-c", "echo x > src/a.txt"], mounts={"src": src}, readonly=["src"],
               name="write")
    async with Worker(tmp_path / "w") as worker, Solver(worker=worker) as solver:
        with pytest.raises(SolveError, match="Read-only file system"):
            await solver.solve(step.definition())
