"""``file`` copies and ``merge`` hard-link files from sealed snapshots of the store
instead of copying their bytes (issue 21: store growth); what a process can
write stays a private copy, and deleting the source keeps the linked copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import PrunePolicy, SnapshotView, State, Worker, merge, run

pytestmark = pytest.mark.anyio


def inode(view: SnapshotView, rel: str) -> int:
    return os.lstat(view.path / rel).st_ino


async def test_copy_and_merge_link_sealed_files(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = State.inline({"a.c": "int a;\n", "h/x.h": "#define X\n"}, name="src")
    copied = State.scratch().copy(src, "/", "/", include=["a.c", "*.h"]).with_name("copy")
    other = State.inline({"b.txt": "b\n"}, name="other")
    merged = merge([other, copied], name="merged")
    async with Worker(tmp_path / "w", sandbox="none") as worker, Solver(worker=worker) as s:
        a = await s.solve(src.definition())
        async with (
            await s.solve(copied.definition()) as b,
            await s.solve(merged.definition()) as c,
        ):
            assert a.ref is not None
            assert b.ref is not None
            assert c.ref is not None
            va, vb, vc = a.ref.sys, b.ref.sys, c.ref.sys
            assert isinstance(va, SnapshotView)
            assert isinstance(vb, SnapshotView)
            assert isinstance(vc, SnapshotView)
            for rel in ("a.c", "h/x.h"):
                assert inode(vb, rel) == inode(va, rel)
                assert inode(vc, rel) == inode(va, rel)
                assert not os.lstat(va.path / rel).st_mode & 0o222  # still sealed
            assert await vc.read_bytes("h/x.h") == b"#define X\n"
            source_id = a.ref.id
            ino = inode(vb, "a.c")
            await a.release()
            # The source goes while the copy is held; the copy keeps its bytes,
            # the same inode.
            deleted = {info.id for info in await worker.prune(PrunePolicy())}
            assert source_id in deleted
            assert b.ref.id not in deleted
            assert inode(vb, "a.c") == ino
            assert await vb.read_bytes("a.c") == b"int a;\n"


async def test_a_writable_mount_of_a_linked_file_is_a_private_copy(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A process writing a file it got through a linked snapshot changes its own
    copy, never the snapshots that share the inode."""
    src = State.inline({"a.txt": "one\n"}, name="src")
    copied = State.scratch().copy(src, "a.txt", "a.txt").with_name("copy")
    edit = run(["/bin/sh", "-c", "chmod u+w a.txt; echo two > a.txt"], root=copied,
               name="edit")
    async with (
        Worker(tmp_path / "w", sandbox="none") as worker,
        Solver(worker=worker) as s,
        await s.solve(src.definition()) as a,
        await s.solve(copied.definition()) as b,
        await s.solve(edit.definition()) as c,
    ):
        assert a.ref is not None
        assert b.ref is not None
        assert c.ref is not None
        assert await c.ref.sys.read_bytes("a.txt") == b"two\n"  # type: ignore[attr-defined]
        assert await b.ref.sys.read_bytes("a.txt") == b"one\n"  # type: ignore[attr-defined]
        assert await a.ref.sys.read_bytes("a.txt") == b"one\n"  # type: ignore[attr-defined]


async def test_host_files_are_never_linked(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    """``source.local`` copies: a host file is not the store's to share."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "f.txt").write_text("f\n")
    os.chmod(host / "f.txt", 0o444)  # read-only on the host, still not linked
    async with (
        Worker(tmp_path / "w", sandbox="none") as worker,
        Solver(worker=worker) as s,
        await s.solve(State.local(host).definition()) as r,
    ):
        assert r.ref is not None
        view = r.ref.sys
        assert isinstance(view, SnapshotView)
        assert inode(view, "f.txt") != os.lstat(host / "f.txt").st_ino


async def test_a_merge_keeps_its_first_inputs_root_mode(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A merge lays its inputs over the first one's tree, root included: its root
    has the first input's mode (a merge that copied the first input had it; one
    that links every input into a new directory must set it)."""
    first = run(["/bin/sh", "-c", "echo a > a.txt; chmod 750 ."], root=State.scratch(),
                name="first")
    second = State.inline({"b.txt": "b\n"}, name="second")
    merged = merge([first, second], name="merged")
    async with (
        Worker(tmp_path / "w", sandbox="none") as worker,
        Solver(worker=worker) as s,
        await s.solve(first.definition()) as a,
        await s.solve(merged.definition()) as c,
    ):
        assert a.ref is not None
        assert c.ref is not None
        va, vc = a.ref.sys, c.ref.sys
        assert isinstance(va, SnapshotView)
        assert isinstance(vc, SnapshotView)
        mode_a = os.stat(va.path).st_mode & 0o7777
        assert mode_a & 0o077 == 0o050  # the step's chmod, as sealed
        assert os.stat(vc.path).st_mode & 0o7777 == mode_a
        assert await vc.read_bytes("b.txt") == b"b\n"
