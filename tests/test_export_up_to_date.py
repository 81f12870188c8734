"""An export into a directory that already holds the same files is left alone
(issue 21: a no-op ``solver build --output DIR`` copied the whole result again);
a new result rewrites the files that differ, and only those, even where the
store linked or copied the others into the new snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from digest_support import fresh_digests, settled  # noqa: F401 (fresh_digests: autouse)

from solver import SolveError, Solver
from solver.testing import HandleTracker
from solver.worker import (
    MANIFEST_NAME,
    SnapshotRef,
    SnapshotStore,
    State,
    Worker,
    _digests,
    export_to_dir,
    merge,
)

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


def rewritten(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
              top: Path) -> set[str]:
    """The files of ``top`` whose identity changed (written again, or chmod'ed);
    directories are left out: the export sets their times from the snapshot's."""
    return {rel for rel in after if after[rel] != before.get(rel) and (top / rel).is_file()}


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


def local_copy(src: Path) -> State:
    """A copy of the local tree ``src``: a changed file makes a new local
    snapshot, copied anew, so every file of the next result is a new inode
    holding the old bytes and time (its digest known to the store)."""
    return State.scratch().copy(State.local(str(src)), "/", "/")


def linked(a: str) -> State:
    """A merge of one op's file per path: the next merge hard-links the files
    of the unchanged ops (same inodes, new ctimes), as a C build's objects."""
    return merge([State.scratch().mkfile(f"/{name}", text) for name, text in
                  (("a.txt", a), ("b.txt", "b\n"), ("c.txt", "c\n"))])


def source_stat(ref: object, rel: str) -> os.stat_result:
    return os.lstat(ref.sys.path / rel)  # type: ignore[attr-defined]


def hashed() -> int:
    return _digests.statistics()["hashed"]


async def test_a_new_copy_of_the_same_bytes_is_left_alone(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """After a one-file change, an export of the new result writes the changed
    file and the manifest, nothing else: the other files are new inodes of the
    new snapshot, with the digests the store knows (no file is read to tell)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for rel, text in (("a.txt", "a\n"), ("d/b.txt", "b\n"), ("d/c.txt", "c\n")):
        settled(src / rel, text)
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, Solver(worker=worker) as solver:
        async with await solver.solve(local_copy(src).definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
            first = source_stat(r.ref, "d/b.txt")
        before = identities(dest)
        settled(src / "a.txt", "A!\n")
        async with await solver.solve(local_copy(src).definition()) as r:
            assert r.ref is not None
            second = source_stat(r.ref, "d/b.txt")
            reads = hashed()
            await export_to_dir(r.ref, dest)
            assert hashed() == reads
        after = identities(dest)
    assert first.st_ino != second.st_ino  # a new inode: the digest decided
    assert rewritten(before, after, dest) == {"a.txt", MANIFEST_NAME}
    assert (dest / "a.txt").read_text() == "A!\n"
    assert (dest / "d" / "b.txt").read_text() == "b\n"


async def test_files_linked_into_a_new_result_are_left_alone(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A merge links the unchanged files (new ctimes): the export writes only the
    changed file and the manifest, reading no file to decide (the earlier
    result's file is still that inode)."""
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, Solver(worker=worker) as solver:
        async with await solver.solve(linked("a\n").definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
            first = source_stat(r.ref, "b.txt")
        before = identities(dest)
        async with await solver.solve(linked("A!\n").definition()) as r:
            assert r.ref is not None
            second = source_stat(r.ref, "b.txt")
            reads = hashed()
            await export_to_dir(r.ref, dest)
            assert hashed() == reads
        after = identities(dest)
        assert first.st_ino == second.st_ino
        assert first.st_ctime_ns != second.st_ctime_ns  # the identity it had no longer holds
    assert rewritten(before, after, dest) == {"a.txt", MANIFEST_NAME}
    assert [(dest / n).read_text() for n in ("a.txt", "b.txt", "c.txt")] == ["A!\n", "b\n", "c\n"]


async def test_a_manifest_of_the_previous_version_rewrites_linked_files(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """A manifest without ``source_path`` or ``digest`` (what the previous version
    wrote) is still used as it was: the same snapshot file is left alone, a
    linked one written again. And what this version records stays what the
    previous one compares: ``source`` is the current source file's identity."""
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, Solver(worker=worker) as solver:
        async with await solver.solve(linked("a\n").definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
            doc = json.loads((dest / MANIFEST_NAME).read_text())
            for rec in doc["entries"].values():
                rec.pop("source_path", None)
                rec.pop("digest", None)
            (dest / MANIFEST_NAME).write_text(json.dumps(doc))
            before = identities(dest)
            await export_to_dir(r.ref, dest)  # the same snapshot: nothing written
            assert identities(dest) == before
        async with await solver.solve(linked("A!\n").definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
            after = identities(dest)
            assert rewritten(before, after, dest) == {"a.txt", "b.txt", "c.txt", MANIFEST_NAME}
            entries = json.loads((dest / MANIFEST_NAME).read_text())["entries"]
            for name in ("a.txt", "b.txt", "c.txt"):
                st = source_stat(r.ref, name)
                assert entries[name]["source"] == [
                    st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns
                ]
    assert [(dest / n).read_text() for n in ("a.txt", "b.txt", "c.txt")] == ["A!\n", "b\n", "c\n"]


async def test_an_edit_of_a_file_the_new_result_did_not_change_is_refused(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, Solver(worker=worker) as solver:
        async with await solver.solve(linked("a\n").definition()) as r:
            assert r.ref is not None
            await export_to_dir(r.ref, dest)
        (dest / "b.txt").write_text("mine\n")
        async with await solver.solve(linked("A!\n").definition()) as r:
            assert r.ref is not None
            with pytest.raises(SolveError, match=r"'b\.txt' was changed after an export wrote it"):
                await export_to_dir(r.ref, dest)
    assert (dest / "b.txt").read_text() == "mine\n"
    assert (dest / "a.txt").read_text() == "a\n"  # refused before anything changed


async def test_a_user_edit_is_still_refused(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    tree = State.inline({"a.txt": "a\n"})
    dest = tmp_path / "out"
    async with Worker(tmp_path / "w", sandbox="none") as worker, \
            Solver(worker=worker) as solver, await solver.solve(tree.definition()) as r:
        assert r.ref is not None
        await export_to_dir(r.ref, dest)
        (dest / "a.txt").write_text("mine, longer\n")
        with pytest.raises(SolveError, match="was changed after an export wrote it"):
            await export_to_dir(r.ref, dest)
        assert (dest / "a.txt").read_text() == "mine, longer\n"


def lexists(path: str) -> bool:
    return os.path.lexists(path)


async def one_file(store: SnapshotStore, text: str, mtime_ns: int) -> SnapshotRef:
    async with await store.new_mutable() as m:
        (m.path / "a.txt").write_text(text)
        os.utime(m.path / "a.txt", ns=(mtime_ns, mtime_ns))
        return await m.commit()


@pytest.mark.parametrize("digest_known", [True, False])
async def test_a_reused_inode_number_does_not_pass_for_the_file_it_was(
    tmp_path: Path, digest_known: bool
) -> None:
    """A deleted snapshot's inode number may be given to another file of the same
    size and time. The manifest below says the output was copied from that
    number (as the kernel's reuse would make it), from a source path that is
    gone: the file is written again, after reading it to compare digests when
    the manifest holds one, without reading anything when not."""
    dest = tmp_path / "out"
    when = 1_700_000_000_000_000_000
    async with SnapshotStore(tmp_path / "snapshots") as store:
        one = await one_file(store, "one\n", when)
        if digest_known:  # as a content key over it would have left it
            table = store.digest_table(one.sys)  # type: ignore[arg-type]
            assert table is not None
            table.file_digest(str(one.sys.path / "a.txt"))  # type: ignore[attr-defined]
        await export_to_dir(one, dest)
        await one.release()
        await store.delete(one.id)
        two = await one_file(store, "two\n", when)
        try:
            st = os.lstat(two.sys.path / "a.txt")  # type: ignore[attr-defined]
            doc = json.loads((dest / MANIFEST_NAME).read_text())
            rec = doc["entries"]["a.txt"]
            assert ("digest" in rec) is digest_known
            assert not lexists(rec["source_path"])
            rec["source"][:2] = [st.st_dev, st.st_ino]
            (dest / MANIFEST_NAME).write_text(json.dumps(doc))
            reads = hashed()
            await export_to_dir(two, dest)
            assert hashed() - reads == (1 if digest_known else 0)
            assert (dest / "a.txt").read_text() == "two\n"
            assert json.loads((dest / MANIFEST_NAME).read_text())["entries"]["a.txt"][
                "source_path"] == str(two.sys.path / "a.txt")  # type: ignore[attr-defined]
        finally:
            await two.release()


async def test_a_copy_whose_digest_the_store_does_not_know_is_read_not_written(
    tmp_path: Path,
) -> None:
    """The new result's file is another inode with the same bytes and time, and
    its snapshot's table does not know its digest: the export reads it once
    (hashing it into the table: the next export reads nothing) and leaves the
    output alone. A manifest whose ``source_path`` no file can have is no
    error."""
    dest = tmp_path / "out"
    when = 1_700_000_000_000_000_000
    async with SnapshotStore(tmp_path / "snapshots") as store:
        one = await one_file(store, "same\n", when)
        two = await one_file(store, "same\n", when)
        try:
            table = store.digest_table(one.sys)  # type: ignore[arg-type]
            assert table is not None
            table.file_digest(str(one.sys.path / "a.txt"))  # type: ignore[attr-defined]
            await export_to_dir(one, dest)
            doc = json.loads((dest / MANIFEST_NAME).read_text())
            doc["entries"]["a.txt"]["source_path"] = "no\0such"
            (dest / MANIFEST_NAME).write_text(json.dumps(doc))
            before = identities(dest)
            reads = hashed()
            await export_to_dir(two, dest)
            assert hashed() - reads == 1
            after = identities(dest)
            assert rewritten(before, after, dest) == {MANIFEST_NAME}
            rec = json.loads((dest / MANIFEST_NAME).read_text())["entries"]["a.txt"]
            assert rec["source_path"] == str(two.sys.path / "a.txt")  # type: ignore[attr-defined]
            assert rec["digest"] == doc["entries"]["a.txt"]["digest"]
            _digests.clear()  # a new process: only the store's tables remember
            await export_to_dir(one, dest)  # back: the first file is still there
            await export_to_dir(two, dest)
            assert hashed() == 0
            # the manifest names the other source each time; the file stays
            assert rewritten(after, identities(dest), dest) == {MANIFEST_NAME}
            assert (dest / "a.txt").read_text() == "same\n"
        finally:
            await one.release()
            await two.release()


def test_solver_build_output_writes_only_what_a_one_file_change_changed(tmp_path: Path) -> None:
    """``solver build --output DIR`` in a new process after one source file
    changed: only that file and the manifest are written (the store's digest
    tables and the recorded source paths tell, as the previous process left
    them)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        settled(src / f"f{i}.txt", f"file {i}\n")
    state = merge([local_copy(src), State.scratch().mkfile("/extra.txt", "x\n")])
    defn = tmp_path / "defn.json"
    defn.write_text(state.definition().to_json())
    out = tmp_path / "out"
    env = {**os.environ, "SOLVER_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "solver", "build", str(defn), "--progress", "plain",
            "--output", str(out)]

    def build() -> None:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()

    build()
    before = identities(out)
    settled(src / "f3.txt", "changed\n")
    build()
    after = identities(out)
    assert rewritten(before, after, out) == {"f3.txt", MANIFEST_NAME}
    assert (out / "f3.txt").read_text() == "changed\n"
    assert (out / "f4.txt").read_text() == "file 4\n"
