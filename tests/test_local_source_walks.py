"""A local source's last walk, kept per digest table (``_LastWalks`` in
``solver/worker/_sources.py``): a tree whose every entry has the stat data of
the last walk, all settled then, gives that walk's digest and file list
without encoding or hashing a record; any change to an entry's stat data, an
entry added or removed, another table, or an entry that had not settled makes
the walk in full, with the same answer a fresh walk gives."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from digest_support import OLD, fresh_digests, settled  # noqa: F401 (fresh_digests: autouse)

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import State, Worker, _digests, _fileops, _sources, run
from solver.worker._digesttables import DigestTable

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _no_walks_kept() -> Iterator[None]:
    _digests.clear()
    _sources._last_walks.clear()
    yield
    _sources._last_walks.clear()
    _digests.clear()


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The entries whose record a walk encoded and hashed."""
    made: list[str] = []
    real = _fileops.entry_record

    def counted(rel: str, *args: object) -> bytes:
        made.append(rel)
        return real(rel, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_sources, "entry_record", counted)
    return made


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    (top / "sub").mkdir(parents=True)
    settled(top / "a.c", "int a;\n")
    settled(top / "sub" / "b.h", "#define B 1\n")
    os.symlink("a.c", top / "link")
    for path in (top / "link", top / "sub", top):
        os.utime(path, ns=(OLD, OLD), follow_symlinks=False)
    return top


def _table(tmp_path: Path, name: str = "t") -> DigestTable:
    """A host-file table for the tree at ``tmp_path / "tree"``."""
    return DigestTable(tmp_path / f"{name}.digests", "test", str(tmp_path / "tree"),
                       sealed=False)


def _walk(top: Path, table: DigestTable | None) -> tuple[str, dict[str, str]]:
    return _sources._local_digest_and_files(str(top), [], [], table)


def _fresh(top: Path) -> tuple[str, dict[str, str]]:
    """What a walk with no kept walk and no stored digests gives."""
    _digests.clear()
    return _walk(top, None)


def test_an_unchanged_settled_tree_gives_the_last_walk(
    tmp_path: Path, tree: Path, records: list[str]
) -> None:
    table = _table(tmp_path)
    first = _walk(tree, table)
    assert sorted(records) == ["a.c", "link", "sub", "sub/b.h"]
    records.clear()
    again = _walk(tree, table)
    assert records == []
    assert again == first
    # the file list is the caller's to keep: a copy each time
    again[1]["a.c"] = "changed"
    assert _walk(tree, table) == first
    assert _fresh(tree) == first


@pytest.mark.parametrize(
    "change",
    ["content", "added", "removed", "mode", "symlink", "touched"],
)
def test_a_changed_entry_walks_in_full(
    tmp_path: Path, tree: Path, records: list[str], change: str
) -> None:
    table = _table(tmp_path)
    first = _walk(tree, table)
    time.sleep(0.01)  # a later ctime
    if change == "content":
        settled(tree / "a.c", "int a = 1;\n")
    elif change == "added":
        settled(tree / "sub" / "c.h", "")
    elif change == "removed":
        (tree / "sub" / "b.h").unlink()
    elif change == "mode":
        os.chmod(tree / "a.c", 0o755)
    elif change == "symlink":
        (tree / "link").unlink()
        os.symlink("sub/b.h", tree / "link")
    else:
        # the same bytes written again: the stat data changed, the digest not
        settled(tree / "a.c", "int a;\n")
    records.clear()
    after = _walk(tree, table)
    assert records, "the walk was not made again"
    assert after == _fresh(tree)
    if change == "touched":
        assert after == first
    else:
        assert after[0] != first[0]


def test_another_table_walks_in_full(tmp_path: Path, tree: Path, records: list[str]) -> None:
    first = _walk(tree, _table(tmp_path, "one"))
    records.clear()
    assert _walk(tree, _table(tmp_path, "two")) == first
    assert records, "a walk through another table was not made"
    records.clear()
    assert _walk(tree, None) == first
    assert records, "a walk without a table was not made"


def test_an_unsettled_entry_is_never_kept(
    tmp_path: Path, tree: Path, records: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The racily-clean rule: an entry written less than SETTLE_NS before the
    walk might be written again with the same stat data, so nothing is kept."""
    monkeypatch.setattr(_digests, "SETTLE_NS", 2_000_000_000)
    table = _table(tmp_path)
    (tree / "new.c").write_text("int n;\n")  # now: not settled
    _walk(tree, table)
    records.clear()
    _walk(tree, table)
    assert "new.c" in records
    # once every entry is older than the settle time, the walk is kept
    os.utime(tree / "new.c", ns=(OLD, OLD))
    os.utime(tree, ns=(OLD, OLD))
    monkeypatch.setattr(_digests, "SETTLE_NS", -(10**18))  # ctime: see digest_support
    _walk(tree, table)
    records.clear()
    _walk(tree, table)
    assert records == []


def test_the_kept_walks_are_bounded(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sources, "_MAX_WALKS", 3)
    for i in range(7):
        _walk(tree, _table(tmp_path, f"t{i}"))
        assert len(_sources._last_walks._known) <= 3
    assert len(_sources._last_walks._known) == 1


async def test_no_op_builds_in_one_worker_walk_once(
    tmp_path: Path, tree: Path, records: list[str], handle_tracker: HandleTracker
) -> None:
    """Three builds in one worker: the second walks nothing but the stats and
    runs nothing; after an edit the third walks in full and runs the step."""

    def graph() -> State:
        src = State.local(tree)
        return run(["/bin/sh", "-c", "cat src/a.c > out"], mounts={"src": src},
                   readonly=["src"], name="cat")

    async with Worker(tmp_path / "store", sandbox="none") as worker, \
            Solver(worker=worker) as solver:
        async with await solver.solve(graph().definition()) as result:
            assert result.summary is not None
            assert result.summary.executed == 2
        assert records
        records.clear()
        async with await solver.solve(graph().definition()) as result:
            assert result.summary is not None
            assert result.summary.executed == 0
        assert records == []
        await anyio.sleep(0.01)  # a later ctime
        settled(tree / "a.c", "int a = 2;\n")
        async with await solver.solve(graph().definition()) as result:
            assert result.summary is not None
            assert result.summary.executed == 2
            assert result.ref is not None
            assert await result.ref.sys.read_bytes("out") == b"int a = 2;\n"  # type: ignore[attr-defined]
        assert "a.c" in records
