"""Digest tables kept with each sealed snapshot and each local source (issue 21):
a later process computes the same content keys without reading the files again,
a changed host file is read again, a bad table is never trusted, a table goes
with its snapshot, and an interrupted write leaves nothing that is trusted.

"A later process" is a new ``Worker`` on the same root after
``_digests.clear()`` (the per-process memory gone), and in one test a real
process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from digest_support import OLD, fresh_digests, past_ctime_of, settled  # noqa: F401 (fresh_digests: autouse)

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import State, Worker, _digests, _digesttables, merge, run

pytestmark = pytest.mark.anyio

UNITS = 3
HEADER = "#define X 1\n" * 500  # 6,000 bytes


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    top.mkdir()
    settled(top / "x.h", HEADER)
    for i in range(UNITS):
        settled(top / f"u{i}.c", f"int u{i};\n")
    return top


def graph(tree: Path, variant: str = "") -> State:
    """A local source; per unit a content-keyed copy of its file and the header;
    a step that mounts the header alone through a selector (its content key).
    Another ``variant`` is other copies and another step over the same source,
    whose content keys (over the same source snapshot) are new."""
    src = State.local(tree)
    copies = [
        State.scratch().copy(src, "/", f"/{variant}{i}", include=[f"u{i}.c", "*.h"])
        for i in range(UNITS)
    ]
    step = run(["/bin/sh", "-c", "wc -c < inc > size"], mounts={"inc": src},
               readonly=["inc"], selectors={"inc": "x.h"}, env={"V": variant},
               name="size of x.h")
    return merge([*copies, step], name="all")


def chain(tree: Path) -> State:
    """A copy of a copy: the second copy's content key is over the first copy's
    snapshot, whose table starts empty (its files are links)."""
    src = State.local(tree)
    first = State.scratch().copy(src, "/", "/a", include=["*.h"])
    return State.scratch().copy(first, "/a", "/b")


async def build(
    root: Path, tree: Path, variant: str = ""
) -> tuple[dict[str, int], int, bytes]:
    """One build in a fresh worker, as a new process would do it: the
    digests it read (statistics), how many ops ran, and the step's output."""
    _digests.clear()
    async with (
        Worker(root, sandbox="none") as worker,
        Solver(worker=worker) as solver,
        await solver.solve(graph(tree, variant).definition()) as result,
    ):
        assert result.ref is not None
        size = await result.ref.sys.read_bytes("size")  # type: ignore[attr-defined]
        executed = result.summary.executed if result.summary is not None else -1
    return _digests.statistics(), executed, size


SOURCES = 6000 + sum(len(f"int u{i};\n") for i in range(UNITS))  # bytes of the tree


def tables(root: Path) -> list[Path]:
    return sorted((root / "meta").glob("*.digests"))


def tables_of(root: Path, kind: str) -> list[Path]:
    """The tables of the snapshots made by ops of ``kind``."""
    return [
        t for t in tables(root)
        if json.loads(t.with_suffix(".json").read_text())["description"]["kind"] == kind
    ]


def source_table(root: Path) -> Path:
    """The table of the one source snapshot."""
    (table,) = tables_of(root, "source.local")
    return table


def snapshot_ids(root: Path) -> set[str]:
    return {p.name for p in (root / "snapshots").iterdir()}


async def test_a_later_process_reads_no_file_bytes(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    root = tmp_path / "store"
    first, executed, size = await build(root, tree)
    assert executed == 2 + UNITS + 1  # source, copies, step, merge
    assert size.strip() == b"6000"
    # Cold: the 4 host files are read for the source's key; the source snapshot
    # hashes its files as it copies them (its table is written then), so the
    # content keys over it read nothing.
    assert (first["hashed"], first["bytes"], first["copied"]) == (4, SOURCES, SOURCES)
    assert first["stored"] == 2 * UNITS + 1
    # One table for the source snapshot, one for the local source; and one for
    # each copy and the merge, their digests carried through the hard links
    # (none read).
    assert len(tables_of(root, "source.local")) == 1
    assert len(tables_of(root, "file")) == UNITS
    assert len(tables_of(root, "merge")) == 1
    assert len(list((root / "local-digests").glob("*.digests"))) == 1

    # A later process, other copies and another step over the same source: new
    # content keys over the same snapshot.
    again, executed, size = await build(root, tree, "v2-")
    assert executed == UNITS + 1 + 1  # copies, step, merge
    assert size.strip() == b"6000"
    assert (again["hashed"], again["bytes"], again["copied"]) == (0, 0, 0)
    # The host files from the source's table, the snapshot's from its own (the
    # copies' keys; the files they record for explaining, docs/explain.md, come
    # from the same walk).
    assert again["stored"] == 4 + 2 * UNITS + 1
    assert again["remembered"] == 0


async def test_a_changed_host_file_is_hashed_again(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    root = tmp_path / "store"
    await build(root, tree)
    past_ctime_of(tree / "u1.c")  # the rewrite below gives it a later ctime
    settled(tree / "u1.c", "int u1 = 1;\n")
    stats, executed, _ = await build(root, tree)
    # The source runs again (its key changed) and so does the copy of u1.c.
    assert executed == 1 + 1 + 1  # source, copy of unit 1, merge
    # Only u1.c is read; the new source snapshot hashes what it copies.
    assert (stats["hashed"], stats["bytes"]) == (1, len("int u1 = 1;\n"))
    assert stats["copied"] == SOURCES + len(" = 1")
    # The other host files came from the source's table; every key over the
    # new snapshot from its table.
    assert stats["stored"] == (4 - 1) + 2 * UNITS + 1


async def test_an_unsettled_host_file_is_not_kept(
    tmp_path: Path, tree: Path, monkeypatch: pytest.MonkeyPatch, handle_tracker: HandleTracker
) -> None:
    """The racily-clean rule across processes: a file written just before it was
    hashed is hashed again by the next process (its stat data may not show a
    write in the same clock tick)."""
    monkeypatch.setattr(_digests, "SETTLE_NS", 2_000_000_000)
    (tree / "u0.c").write_text("int u0 = 0;\n")  # fresh: mtime and ctime now
    root = tmp_path / "store"
    await build(root, tree)
    stats, _, _ = await build(root, tree)
    # u0.c is read again; every other host file (mtime set back, but its ctime
    # is as fresh: also unsettled) too. Nothing else runs.
    assert stats["hashed"] == 1 + UNITS
    assert stats["bytes"] == SOURCES + len(" = 0")


def corrupt(file: Path, how: str, other: Path | None = None) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "header only":
        file.write_bytes(data.partition(b"\n")[0])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "flipped digest":  # one digest character changed: the checksum fails
        head, _, body = data.partition(b"\n")
        at = body.rindex(b'"]') - 1
        flipped = b"0" if body[at : at + 1] != b"0" else b"1"
        file.write_bytes(head + b"\n" + body[:at] + flipped + body[at + 1 :])
    elif how == "another version":
        file.write_bytes(data.replace(b"solver-digests 1 ", b"solver-digests 9 ", 1))
    elif how == "garbage":
        file.write_bytes(os.urandom(300))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["truncated", "header only", "empty", "flipped digest", "another version", "garbage"],
)
async def test_a_bad_table_is_ignored_with_a_warning_and_rebuilt(
    tmp_path: Path,
    tree: Path,
    how: str,
    caplog: pytest.LogCaptureFixture,
    handle_tracker: HandleTracker,
) -> None:
    root = tmp_path / "store"
    await build(root, tree)
    table = source_table(root)
    good = table.read_bytes()
    corrupt(table, how)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="solver"):
        stats, _, size = await build(root, tree, "v2-")
    assert size.strip() == b"6000"
    warnings = [r.getMessage() for r in caplog.records if "digest table" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert str(table) in warnings[0]
    assert "ignoring" in warnings[0]
    # Not trusted: the snapshot's 4 files are read again, and the table rewritten.
    assert (stats["hashed"], stats["bytes"]) == (4, SOURCES)
    assert table.read_bytes() == good
    stats, _, _ = await build(root, tree, "v3-")
    assert stats["hashed"] == 0


async def test_another_snapshots_table_is_not_trusted(
    tmp_path: Path, tree: Path, caplog: pytest.LogCaptureFixture, handle_tracker: HandleTracker
) -> None:
    """A table copied over another snapshot's (valid checksum, another owner)
    is refused: its entries describe other files."""
    root = tmp_path / "store"
    await build(root, tree)
    table = source_table(root)
    stranger = table.with_name("0" * 32 + ".digests")
    stranger.write_bytes(table.read_bytes())
    # Claim it for the real snapshot: same bytes, wrong owner in the header.
    table.write_bytes(stranger.read_bytes().replace(table.stem.encode(), b"1" * 32, 1))
    with caplog.at_level(logging.WARNING, logger="solver"):
        stats, _, _ = await build(root, tree, "v2-")
    assert stats["hashed"] == 4
    assert any("belongs to" in r.getMessage() for r in caplog.records)
    # A table without a snapshot is removed when the store opens.
    assert not stranger.exists()


async def test_an_entry_for_another_file_is_not_trusted(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    """A well-formed table whose entry names another inode (a lie, or a file
    that is not the sealed one) is not used for that file: it is read."""
    root = tmp_path / "store"
    await build(root, tree)
    path = source_table(root)
    table = _digesttables.DigestTable(path, path.stem, "/nowhere", sealed=True)
    table.lookup("x.h", os.stat_result((0,) * 10))  # read it
    assert table._entries is not None
    key, digest = table._entries["x.h"]
    table._entries["x.h"] = ((key[0] + 1, *key[1:]), "f" * 64)
    table._dirty = True
    table.save()
    stats, _, size = await build(root, tree, "v2-")
    assert size.strip() == b"6000"
    assert (stats["hashed"], stats["bytes"]) == (1, 6000)
    # The table is right again.
    table = _digesttables.DigestTable(path, path.stem, "/nowhere", sealed=True)
    table.lookup("x.h", os.stat_result((0,) * 10))
    assert table._entries is not None
    assert table._entries["x.h"] == (key, digest)


async def test_pruning_a_snapshot_removes_its_table(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    root = tmp_path / "store"
    await build(root, tree)
    table = source_table(root)
    assert table.stem in snapshot_ids(root)
    async with Worker(root, sandbox="none") as worker:
        deleted = await worker.store.prune()
        assert table.stem in deleted
        assert tables(root) == []
        assert snapshot_ids(root) == set()
    # And a later build makes it again, reading the files once more.
    _, executed, _ = await build(root, tree)
    assert executed == 2 + UNITS + 1
    assert len(tables(root)) == 1 + UNITS + 1  # the source, each copy, the merge


async def test_debris_is_removed_when_the_store_opens(
    tmp_path: Path, tree: Path, handle_tracker: HandleTracker
) -> None:
    root = tmp_path / "store"
    await build(root, tree)
    table = source_table(root)
    whole = tables(root)
    orphan = table.with_name("a" * 32 + ".digests")
    orphan.write_bytes(table.read_bytes())
    partial = table.with_name(f"{table.name}.1234abcd.tmp")
    partial.write_bytes(table.read_bytes()[:40])
    local_partial = root / "local-digests" / "x.digests.99.tmp"
    local_partial.write_bytes(b"solver-digests 1 ")
    async with Worker(root, sandbox="none"):
        pass
    assert tables(root) == whole
    assert not orphan.exists()
    assert not partial.exists()
    assert not local_partial.exists()


async def test_only_the_newest_local_tables_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handle_tracker: HandleTracker
) -> None:
    monkeypatch.setattr(_digesttables, "MAX_LOCAL_TABLES", 2)
    root = tmp_path / "store"
    names = []
    for i in range(4):
        top = tmp_path / f"src{i}"
        top.mkdir()
        settled(top / "f", f"{i}")
        async with (
            Worker(root, sandbox="none") as worker,
            Solver(worker=worker) as solver,
            await solver.solve(State.local(top).definition()),
        ):
            pass
        new = {p.name for p in (root / "local-digests").iterdir()} - set(names)
        names.extend(new)
        os.utime(root / "local-digests" / new.pop(), ns=(OLD + i, OLD + i))
    async with Worker(root, sandbox="none"):
        pass
    assert sorted(p.name for p in (root / "local-digests").iterdir()) == sorted(names[2:])


def whole_tables(root: Path) -> dict[str, set[str]]:
    """Each snapshot table on disk (owner -> its paths), checking it is whole."""
    found = {}
    for path in tables(root):
        head, _, body = path.read_bytes().partition(b"\n")
        magic, version, owner, checksum = head.decode().split(" ")
        assert (magic, version, owner) == ("solver-digests", "1", path.stem)
        assert hashlib.sha256(body).hexdigest() == checksum
        found[owner] = set(json.loads(body)["entries"])
    return found


@pytest.mark.parametrize("which", ["seeding the source snapshot", "a content key's"])
async def test_cancelled_while_a_table_is_written(
    tmp_path: Path,
    tree: Path,
    which: str,
    monkeypatch: pytest.MonkeyPatch,
    handle_tracker: HandleTracker,
) -> None:
    """The solve is cancelled while a thread writes a snapshot's table (the
    source's, as it is copied; or the first copy's, for the second copy's
    content key): every handle is released, the thread finishes the write (it is
    not abandoned), so what is on disk is whole, no temporary file is left, and
    a later process builds the right result reading only what no whole table
    covers."""
    root = tmp_path / "store"
    writing = threading.Event()
    go_on = threading.Event()
    real = _digesttables.write_atomically
    writes = []
    target = 1 if which.startswith("seeding") else 2

    def slow_write(file: Path, data: bytes) -> None:
        if file.parent.name == "meta":
            writes.append(file)
            if len(writes) == target:
                writing.set()
                go_on.wait(30)
        real(file, data)

    monkeypatch.setattr(_digesttables, "write_atomically", slow_write)
    _digests.clear()
    with anyio.fail_after(60):
        async with Worker(root, sandbox="none") as worker, Solver(worker=worker) as solver:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def cancel_when_writing() -> None:
                        await anyio.to_thread.run_sync(writing.wait, 30)
                        scope.cancel()
                        go_on.set()

                    tg.start_soon(cancel_when_writing)
                    async with await solver.solve(chain(tree).definition()):
                        pass
            assert scope.cancelled_caught
    assert writing.is_set()
    assert not list((root / "meta").glob("*.tmp"))
    on_disk = whole_tables(root)  # every table whole (the one being written too)
    # none of a snapshot that was never committed (a discarded mutable's goes)
    assert set(on_disk) <= snapshot_ids(root)
    if which == "a content key's":
        assert on_disk  # the committed copy's, written whole
    monkeypatch.setattr(_digesttables, "write_atomically", real)
    _digests.clear()
    async with (
        Worker(root, sandbox="none") as worker,
        Solver(worker=worker) as solver,
        await solver.solve(chain(tree).definition()) as result,
    ):
        assert result.ref is not None
        assert await result.ref.sys.read_bytes("b/x.h") == HEADER.encode()  # type: ignore[attr-defined]
    # Only tables of committed snapshots remain; the first copy's holds x.h.
    assert set(whole_tables(root)) <= snapshot_ids(root)
    assert "x.h" in set().union(*whole_tables(root).values())
    assert _digests.statistics()["bytes"] <= 6000


CHILD = r"""
import sys, time, pathlib, anyio
from solver import Solver, Definition
from solver.worker import Worker, _digests, _digesttables
_digests.SETTLE_NS = -10**18
root, defn, marker = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
mode = sys.argv[4]
if mode == "die while writing":
    real = _digesttables.write_atomically
    writes = []
    def half_then_hang(file, data):
        if file.parent.name == "meta":
            writes.append(file)
            if len(writes) == 2:  # the first copy's table, for the second's key
                temporary = file.with_name(file.name + ".deadbeef.tmp")
                temporary.write_bytes(data[: len(data) // 2])
                marker.write_text("writing")
                time.sleep(60)
        return real(file, data)
    _digesttables.write_atomically = half_then_hang
async def main():
    async with Worker(root, sandbox="none") as worker, Solver(worker=worker) as solver:
        async with await solver.solve(Definition.from_json(pathlib.Path(defn).read_text())):
            pass
    s = _digests.statistics()
    marker.write_text(f"{s['hashed']} {s['bytes']}")
anyio.run(main)
"""


def child(
    tmp_path: Path, root: Path, defn: Path, mode: str
) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / f"marker-{mode.replace(' ', '-')}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(defn), str(marker), mode], env=env
    )
    return proc, marker


def wait_for(marker: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text():
            return marker.read_text()
        if proc.poll() is not None and not marker.exists():
            raise AssertionError(f"the child exited with {proc.returncode}")
        time.sleep(0.02)
    raise AssertionError("the child never got there")


def test_real_processes_and_one_killed_while_writing(tmp_path: Path, tree: Path) -> None:
    """Real processes: one killed (SIGKILL) while it writes the first copy's
    table (the digests its links carried, written before its commit) leaves half
    a temporary file, which the next process removes and never reads; that
    process makes the copy again, carrying the digests once more, and neither it
    nor the one after it reads a byte."""
    root = tmp_path / "store"
    defn = tmp_path / "defn.json"
    data = chain(tree).definition().to_json()
    defn.write_text(data if isinstance(data, str) else data.decode())

    proc, marker = child(tmp_path, root, defn, "die while writing")
    assert wait_for(marker, proc) == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert list((root / "meta").glob("*.tmp")), "the child left half a table"
    assert len(tables(root)) == 1  # the source snapshot's, whole

    proc, marker = child(tmp_path, root, defn, "build")
    assert wait_for(marker, proc) == "0 0"
    assert proc.wait(30) == 0
    assert not list((root / "meta").glob("*.tmp"))
    assert len(whole_tables(root)) == 3  # the source's and each copy's

    proc, marker = child(tmp_path, root, defn, "build")
    assert wait_for(marker, proc) == "0 0"
    assert proc.wait(30) == 0


def test_copy_hashing_copies_bytes_mode_and_times(tmp_path: Path) -> None:
    src = tmp_path / "src"
    settled(src, "payload\n")
    src.chmod(0o640)
    dst = tmp_path / "dst"
    digest = _digests.copy_hashing(os.fspath(src), os.fspath(dst))
    assert digest == hashlib.sha256(b"payload\n").hexdigest()
    assert dst.read_bytes() == b"payload\n"
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert dst.stat().st_mode == src.stat().st_mode
    assert _digests.statistics()["copied"] == len(b"payload\n")
    assert _digests.statistics()["hashed"] == 0


def test_copy_hashing_refuses_what_is_no_longer_a_regular_file(tmp_path: Path) -> None:
    """A FIFO or a symlink put in a listed file's place is refused at once (a
    FIFO would block a plain open forever)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="no longer a regular file"):
        _digests.copy_hashing(os.fspath(fifo), os.fspath(tmp_path / "a"))
    link = tmp_path / "link"
    link.symlink_to(fifo)
    with pytest.raises(OSError):
        _digests.copy_hashing(os.fspath(link), os.fspath(tmp_path / "b"))


async def test_a_discarded_mutable_takes_its_table_with_it(tmp_path: Path) -> None:
    """A table written for a new snapshot before its commit (as a local source
    writes its copy's) goes when the mutable is discarded instead, and a later
    save of that table object writes nothing: no table of a snapshot that never
    was, and none left for the next open to clean up."""
    async with Worker(tmp_path / "store", sandbox="none") as worker:
        store = worker.store
        mutable = await store.new_mutable({"kind": "test"})
        f = mutable.path / "f.txt"
        f.write_bytes(b"f\n")
        table = store.new_snapshot_table(mutable)
        table.add("f.txt", os.lstat(f), hashlib.sha256(b"f\n").hexdigest())
        table.save()
        file = tmp_path / "store" / "meta" / f"{mutable.id}.digests"
        assert file.exists()
        await mutable.discard()
        assert not file.exists()
        assert not mutable.path.exists()
        # whoever still holds the table object learns a digest and saves: nothing
        g = tmp_path / "g.txt"
        g.write_bytes(b"g\n")
        table.add("g.txt", os.lstat(g), hashlib.sha256(b"g\n").hexdigest())
        table.save()
        assert not file.exists()
