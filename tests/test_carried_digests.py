"""Digests carried through the hard links of ``file`` copies and merges (issue 21):
a content key over a merge of unchanged compile outputs reads none of them in a
later process, and a file that was replaced is hashed again (a digest is never
trusted for other content).

"A later process" is a new ``Worker`` on the same root after
``_digests.clear()`` (the per-process memory gone), as in
``tests/test_digest_tables.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from digest_support import OLD, fresh_digests, settled  # noqa: F401 (fresh_digests: autouse)

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import State, Worker, _digests, merge, run
from solver.worker._digesttables import DigestTable

pytestmark = pytest.mark.anyio

UNITS = 4
OBJECT = 5000  # bytes each "object" a step writes adds to its source's


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    top.mkdir()
    for i in range(UNITS):
        settled(top / f"u{i}.c", f"unit {i}\n")
    return top


def graph(tree: Path) -> State:
    """cbuild's shape: per unit a content-keyed copy of its file, a step that
    writes an object from it, a merge of the objects, and a copy of the merged
    objects (its content key covers every object of the merge)."""
    src = State.local(tree)
    objects = [
        run(
            ["/bin/sh", "-c", f"{{ cat src/u{i}.c; head -c {OBJECT} /dev/zero; }} > out/u{i}.o"],
            root=State.scratch().mkdir("out"),
            mounts={"src": State.scratch().copy(src, "/", "/", include=[f"u{i}.c"])},
            readonly=["src"],
            name=f"cc u{i}",
        )
        for i in range(UNITS)
    ]
    objs = merge(objects, name="objects")
    return State.scratch().copy(objs, "out", "obj")


async def build(root: Path, tree: Path) -> tuple[dict[str, int], int, dict[str, bytes]]:
    """One build in a fresh worker, as a new process would do it: the digests
    it read, how many ops ran, and the objects it made."""
    _digests.clear()
    async with (
        Worker(root, sandbox="none") as worker,
        Solver(worker=worker) as solver,
        await solver.solve(graph(tree).definition()) as result,
    ):
        assert result.ref is not None
        view = result.ref.sys
        objects = {
            f"u{i}.o": await view.read_bytes(f"obj/u{i}.o")  # type: ignore[attr-defined]
            for i in range(UNITS)
        }
        executed = result.summary.executed if result.summary is not None else -1
    return _digests.statistics(), executed, objects


async def test_a_merge_of_unchanged_objects_is_not_read_again(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    root = tmp_path / "store"
    cold, executed, objects = await build(root, tree)
    assert executed == 1 + 1 + 2 * UNITS + 1 + 1  # source, mkdir; copy, step per unit; merge; copy
    size = sum(len(f"unit {i}\n") for i in range(UNITS))
    assert sum(len(o) for o in objects.values()) == size + UNITS * OBJECT
    # Cold: the host files for the source's key, then the objects once, for the
    # last copy's key over the merge (nothing had hashed them).
    assert cold["hashed"] == UNITS + UNITS
    assert cold["bytes"] == size + size + UNITS * OBJECT

    # One unit's source changed: its copy, step, the merge and the last copy run.
    settled(tree / "u1.c", "UNIT 1!\n")
    again, executed, objects = await build(root, tree)
    assert executed == 1 + 2 + 1 + 1  # source; copy and step of u1; merge; copy
    assert objects["u1.o"].startswith(b"UNIT 1!\n")
    assert objects["u0.o"].startswith(b"unit 0\n")
    # Read: the edited host file and the new object, nothing else. The merge's
    # unchanged objects came with their digests, carried through the links from
    # the steps' snapshots (which learned them when the first merge hashed them).
    assert again["hashed"] == 2
    assert again["bytes"] == 2 * len("UNIT 1!\n") + OBJECT

    # Nothing changed: nothing read.
    noop, executed, _ = await build(root, tree)
    assert executed == 0
    assert (noop["hashed"], noop["bytes"]) == (0, 0)


async def test_a_replaced_object_of_the_same_size_and_time_is_hashed_again(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    """An edit that keeps the object's size: its digest is not carried from the
    old one (another inode), so the merge's key sees the new content and the
    copy after it runs again with the new bytes."""
    root = tmp_path / "store"
    await build(root, tree)
    settled(tree / "u2.c", "unit X\n")  # same length as "unit 2\n"
    again, executed, objects = await build(root, tree)
    assert executed == 1 + 2 + 1 + 1
    assert objects["u2.o"].startswith(b"unit X\n")
    assert again["hashed"] == 2
    assert again["bytes"] == 2 * len("unit X\n") + OBJECT


def sealed_file(path: Path, data: bytes) -> os.stat_result:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(OLD, OLD))
    path.chmod(0o444)
    return os.lstat(path)


def test_carry_copies_a_digest_only_for_the_same_inode(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    origin = DigestTable(tmp_path / "a.digests", "a", os.fspath(a), sealed=True)
    table = DigestTable(tmp_path / "b.digests", "b", os.fspath(b), sealed=True)
    st = sealed_file(a / "f.o", b"object one")
    digest = origin.file_digest(os.fspath(a / "f.o"))
    assert _digests.statistics()["hashed"] == 1

    # A hard link: the digest is carried, no byte read.
    b.mkdir()
    os.link(a / "f.o", b / "f.o")
    assert table.carry("f.o", os.lstat(b / "f.o"), origin, "f.o")
    assert table.file_digest(os.fspath(b / "f.o")) == digest
    assert _digests.statistics()["hashed"] == 1

    # Another inode with the same size and times (a copy of other bytes): not
    # carried, and hashed for what it holds.
    other = sealed_file(b / "g.o", b"object two")
    assert (other.st_size, other.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert not table.carry("g.o", other, origin, "f.o")
    assert table.lookup("g.o", other) is None
    assert table.file_digest(os.fspath(b / "g.o")) != digest
    assert _digests.statistics()["hashed"] == 2


def test_an_origin_learns_a_digest_only_for_its_own_inode(tmp_path: Path) -> None:
    """A link whose origin did not know the digest: when the new table hashes
    the file, the origin learns it, unless the origin's name is another inode
    by then (it is never told a digest for other content)."""
    a, b = tmp_path / "a", tmp_path / "b"
    origin = DigestTable(tmp_path / "a.digests", "a", os.fspath(a), sealed=True)
    table = DigestTable(tmp_path / "b.digests", "b", os.fspath(b), sealed=True)
    sealed_file(a / "f.o", b"object one")
    sealed_file(a / "g.o", b"object two")
    b.mkdir()
    os.link(a / "f.o", b / "f.o")
    os.link(a / "g.o", b / "g.o")
    assert not table.carry("f.o", os.lstat(b / "f.o"), origin, "f.o")
    assert not table.carry("g.o", os.lstat(b / "g.o"), origin, "g.o")
    # The origin's g.o is replaced by other bytes before the new table hashes it.
    (a / "g.o").unlink()
    shutil.copy2(b / "f.o", a / "g.o")
    table.file_digest(os.fspath(b / "f.o"))
    table.file_digest(os.fspath(b / "g.o"))
    table.save()
    assert origin.lookup("f.o", os.lstat(a / "f.o")) is not None
    assert origin.lookup("g.o", os.lstat(a / "g.o")) is None
    # And the origin's table was written: a new process reads it.
    reread = DigestTable(tmp_path / "a.digests", "a", os.fspath(a), sealed=True)
    assert reread.lookup("f.o", os.lstat(a / "f.o")) == origin.lookup("f.o", os.lstat(a / "f.o"))


def test_carrying_between_host_tables_is_refused(tmp_path: Path) -> None:
    host = DigestTable(tmp_path / "h.digests", "h", os.fspath(tmp_path), sealed=False)
    sealed = DigestTable(tmp_path / "s.digests", "s", os.fspath(tmp_path), sealed=True)
    st = sealed_file(tmp_path / "f", b"x")
    with pytest.raises(ValueError, match="only between sealed snapshots' tables"):
        sealed.carry("f", st, host, "f")
