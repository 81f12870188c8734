"""An export into a directory that already holds the same files is left alone
(issue 21: a no-op ``solver build --output DIR`` copied the whole result again);
a new result rewrites the files that differ."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import MANIFEST_NAME, State, Worker, export_to_dir

pytestmark = pytest.mark.anyio


def identities(top: Path) -> dict[str, tuple[int, int]]:
    """Each entry's (inode, ctime_ns): any rewrite or chmod changes it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = os.lstat(path)
            out[path.relative_to(top).as_posix()] = (st.st_ino, st.st_ctime_ns)
    return out


async def test_exporting_the_same_snapshot_again_changes_nothing(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    tree = State.inline({"a.txt": "a\n", "d/b.txt": "b\n"})
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, \
            Solver(worker=worker) as solver, await solver.solve(tree.definition()) as r:
        assert r.ref is not None
        await export_to_dir(r.ref, dest)
        before = identities(dest)
        await export_to_dir(r.ref, dest)
        assert identities(dest) == before  # the manifest included
        assert (dest / "d" / "b.txt").read_text() == "b\n"


async def test_a_new_result_rewrites_what_differs_and_refuses_nothing(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A new result over an earlier export: the changed file and the manifest are
    rewritten, the rest is right. What is left alone is only what the same
    snapshot file backs (the test above): a file hard-linked into a new snapshot
    has a new ctime (linking changes it), which the export's source identity
    includes against inode reuse, so it is written again."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")
    (src / "d" / "b.txt").write_text("b\n")
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, Solver(worker=worker) as solver:
        # Copies of the local tree, so each build's files are store files that the
        # next result links (unchanged ones keep their inode).
        def graph() -> State:
            return State.scratch().copy(State.local(src), "/", "/")

        async with await solver.solve(graph().definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
        before = identities(dest)
        (src / "a.txt").write_text("A!\n")
        async with await solver.solve(graph().definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
        after = identities(dest)
    assert (dest / "a.txt").read_text() == "A!\n"
    assert after["a.txt"] != before["a.txt"]
    assert after[MANIFEST_NAME] != before[MANIFEST_NAME]
    # b.txt came from a new snapshot file (the local source is copied anew), so it
    # is written again; what is left alone is what the same snapshot file backs.
    assert (dest / "d" / "b.txt").read_text() == "b\n"


async def test_a_user_edit_is_still_refused(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    tree = State.inline({"a.txt": "a\n"})
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, \
            Solver(worker=worker) as solver, await solver.solve(tree.definition()) as r:
        assert r.ref is not None
        await export_to_dir(r.ref, dest)
        (dest / "a.txt").write_text("mine, longer\n")
        from solver import SolveError

        with pytest.raises(SolveError, match="was changed after an export wrote it"):
            await export_to_dir(r.ref, dest)
        assert (dest / "a.txt").read_text() == "mine, longer\n"
