"""The file digest cache: each file hashed once while its stat data is unchanged
(issue 21), and hashed again after any change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from digest_support import OLD, fresh_digests, past_ctime_of, settled  # noqa: F401 (fresh_digests: autouse)

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import State, Worker, _digests, merge

pytestmark = pytest.mark.anyio


def test_a_file_is_hashed_once_while_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "f"
    settled(f, "one")
    first = _digests.file_digest(os.fspath(f))
    assert _digests.file_digest(os.fspath(f)) == first
    assert _digests.statistics() == {
        "hashed": 1, "bytes": 3, "remembered": 1, "stored": 0, "copied": 0, "entries": 1
    }


@pytest.mark.parametrize("how", ["write", "same size, old mtime", "replace", "chmod"])
def test_any_change_is_hashed_again(tmp_path: Path, how: str) -> None:
    f = tmp_path / "f"
    settled(f, "one")
    first = _digests.file_digest(os.fspath(f))
    if how == "write":
        f.write_text("two!")
    elif how == "same size, old mtime":  # mtime put back: ctime still moves
        past_ctime_of(f)
        f.write_text("two")
        os.utime(f, ns=(OLD, OLD))
    elif how == "replace":
        new = tmp_path / "g"
        settled(new, "one")  # same bytes: the digest is the same, but read again
        os.replace(new, f)
    else:
        past_ctime_of(f)
        f.chmod(0o600)
    again = _digests.file_digest(os.fspath(f))
    assert _digests.statistics()["hashed"] == 2
    assert (again == first) == (how in ("replace", "chmod"))


def test_a_file_changed_just_before_it_was_hashed_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_digests, "SETTLE_NS", 2_000_000_000)
    f = tmp_path / "f"
    f.write_text("fresh")
    _digests.file_digest(os.fspath(f))
    _digests.file_digest(os.fspath(f))
    assert _digests.statistics() == {
        "hashed": 2, "bytes": 10, "remembered": 0, "stored": 0, "copied": 0, "entries": 0
    }


async def test_content_keys_hash_each_header_once(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """Ten content-keyed copies of one header and their own file: after an edit of
    one unit, only the changed file and the new source snapshot's files are read;
    the header, linked into every copy, is not read again per copy."""
    tree = tmp_path / "tree"
    tree.mkdir()
    settled(tree / "x.h", "#define X 1\n" * 1000)
    for i in range(10):
        settled(tree / f"u{i}.c", f"int u{i};\n")

    def graph() -> State:
        src = State.local(tree)
        return merge(
            [State.scratch().copy(src, "/", f"/{i}", include=[f"u{i}.c", "*.h"])
             for i in range(10)],
            name="all",
        )

    async with Worker(tmp_path / "w", sandbox="none") as worker, \
            Solver(worker=worker) as solver:
        async with await solver.solve(graph().definition()):
            pass
        settled(tree / "u3.c", "int u3 = 3;\n")
        before = _digests.statistics()
        async with await solver.solve(graph().definition()) as result:
            assert result.ref is not None
            assert await result.ref.sys.read_bytes("3/u3.c") == b"int u3 = 3;\n"  # type: ignore[attr-defined]
    after = _digests.statistics()
    hashed = after["hashed"] - before["hashed"]
    # Served from memory, or (first) from the source's and the snapshot's tables.
    remembered = after["remembered"] + after["stored"] - before["remembered"] - before["stored"]
    # The source's digest: u3.c changed (read), the other 10 host files from the
    # source's stored table. The new source snapshot hashed its files as it
    # copied them (its table), so the ten copies' keys over it (u<i>.c and x.h
    # each) read nothing; the files each copy records for explaining a later
    # miss (docs/explain.md) come from the same walk as its key: no lookup more.
    assert (hashed, remembered) == (1, 10 + 10 * 2)
    # Without the cache: 11 host files, and two files for each of the 10 copies,
    # once (the key and its file list in one walk).
    assert hashed + remembered == 11 + 10 * 2
