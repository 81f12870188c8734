"""Tests of the built-in worker's snapshot store (solver.worker._snapshots)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

from solver import DoubleReleaseError, Result, SharedResult, SolveError
from solver.testing import CountingResult, HandleTracker, track_handles
from solver.worker import (
    FileStat,
    MutableSnapshot,
    SnapshotInfo,
    SnapshotInUseError,
    SnapshotNotFoundError,
    SnapshotRef,
    SnapshotStore,
    SnapshotView,
    UnsafePathError,
    _snapshots,
    default_root,
)

T = TypeVar("T")

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- helpers --------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[SnapshotStore]:
    async with SnapshotStore(tmp_path / "store") as opened:
        yield opened
        opened._check()


async def in_thread(fn: Callable[[Path], object], path: Path) -> None:
    await anyio.to_thread.run_sync(fn, path)


async def snapshot_of(
    store: SnapshotStore,
    build: Callable[[Path], None],
    description: dict[str, object] | None = None,
) -> SnapshotRef:
    """Commit a new snapshot whose tree ``build`` writes."""
    async with await store.new_mutable(description) as mutable:
        await in_thread(build, mutable.path)
        return await mutable.commit()


def write_sample(root: Path) -> None:
    """Files, an executable, nested and empty directories, and symlinks."""
    (root / "a.txt").write_bytes(b"hello")
    (root / "a.txt").chmod(0o644)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "file").write_bytes(b"nested")
    (root / "empty").mkdir()
    (root / "link").symlink_to("a.txt")
    (root / "dirlink").symlink_to("dir")
    (root / "dangling").symlink_to("nowhere")
    (root / "dir" / "up").symlink_to("../a.txt")


def write_hostile(root: Path) -> None:
    """Symlinks that leave the snapshot or loop."""
    (root / "a.txt").write_bytes(b"inside")
    (root / "escape").symlink_to("../../../../../../etc/passwd")
    (root / "absolute").symlink_to("/etc/passwd")
    (root / "parent").symlink_to("..")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "self").symlink_to("self")
    (root / "sub").mkdir()
    (root / "sub" / "sneaky").symlink_to("../../outside.txt")
    (root / "sub" / "fine").symlink_to("../a.txt")


def names(stats: list[FileStat]) -> list[str]:
    return [s.path for s in stats]


def solver_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "solver" and r.levelno == level]


async def info_of(store: SnapshotStore, sid: str) -> SnapshotInfo:
    (info,) = [i for i in await store.usage() if i.id == sid]
    return info


# -- commit and read back -------------------------------------------------------------


@pytest.mark.anyio
async def test_commit_reads_back_files_dirs_symlinks_and_modes(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    ref = await snapshot_of(store, write_sample, {"op": "sample", "n": [1, 2]})
    view = ref.sys
    assert isinstance(view, SnapshotView)
    assert view.id == ref.id
    assert len(ref.id) == 32
    assert view.path == store.root / "snapshots" / ref.id

    assert await view.read_bytes("a.txt") == b"hello"
    assert await view.read_bytes("./dir//sub/file") == b"nested"
    assert await view.read_bytes("a.txt", offset=1, length=3) == b"ell"
    assert await view.read_bytes("a.txt", offset=3) == b"lo"
    # Symlinks that stay inside are followed for reading...
    assert await view.read_bytes("link") == b"hello"
    assert await view.read_bytes("dir/up") == b"hello"
    assert await view.read_bytes("dirlink/sub/file") == b"nested"
    # ...and preserved as symlinks, never followed by stat or walk.
    link = await view.stat("link")
    assert link.is_symlink
    assert link.linkname == "a.txt"
    assert link.path == "link"
    dangling = await view.stat("dangling")
    assert dangling.is_symlink
    assert dangling.linkname == "nowhere"

    assert names(await view.read_dir("")) == [
        "a.txt", "bin", "dangling", "dir", "dirlink", "empty", "link"
    ]
    assert names(await view.read_dir("dirlink")) == ["sub", "up"]
    assert names(await view.read_dir(".", pattern="d*")) == ["dangling", "dir", "dirlink"]
    assert await view.read_dir("empty") == []
    assert names(await view.walk()) == [
        "a.txt",
        "bin",
        "bin/tool",
        "dangling",
        "dir",
        "dir/sub",
        "dir/sub/file",
        "dir/up",
        "dirlink",
        "empty",
        "link",
    ]
    assert names(await view.walk("dir")) == ["dir/sub", "dir/sub/file", "dir/up"]
    assert await view.resolve("dirlink/sub") == view.path / "dir" / "sub"

    # Modes: the write bits are dropped, everything else is kept.
    assert (await view.stat("bin/tool")).permissions == 0o555
    assert (await view.stat("a.txt")).permissions == 0o444
    root = await view.stat("")
    assert root.path == "."
    assert root.is_dir
    assert (await view.stat("dir/sub/file")).size == 6

    info = await info_of(store, ref.id)
    expected = sum(len(t) for t in (b"hello", b"#!/bin/sh\n", b"nested"))
    expected += sum(len(t) for t in ("a.txt", "dir", "nowhere", "../a.txt"))
    assert info.size == expected
    assert info.description == {"op": "sample", "n": [1, 2]}
    assert info.in_use
    assert info.handles == 1
    assert info.parents == ()
    await ref.release()


@pytest.mark.anyio
async def test_committed_files_are_read_only(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    ref = await snapshot_of(store, write_sample)
    view = ref.sys
    for entry in [await view.stat(""), *await view.walk()]:
        if not entry.is_symlink:
            assert entry.permissions & 0o222 == 0, entry
    if not IS_ROOT:  # root ignores permission bits
        with pytest.raises(PermissionError):
            await anyio.to_thread.run_sync((view.path / "a.txt").write_bytes, b"x")
        with pytest.raises(PermissionError):
            await anyio.to_thread.run_sync((view.path / "new").write_bytes, b"x")
    assert await view.read_bytes("a.txt") == b"hello"
    await ref.release()


@pytest.mark.anyio
async def test_mutable_copy_of_a_snapshot_is_independent(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    base = await snapshot_of(store, write_sample)
    copy = await store.new_mutable({"op": "edit"}, base=base)

    def edit(path: Path) -> None:
        assert (path / "link").is_symlink()
        assert os.readlink(path / "link") == "a.txt"
        mode = (path / "bin" / "tool").stat().st_mode
        assert stat.S_IMODE(mode) == 0o755  # the owner may write again
        (path / "a.txt").write_bytes(b"changed")
        (path / "dir" / "sub" / "added").write_bytes(b"new")
        (path / "bin" / "tool").unlink()

    await in_thread(edit, copy.path)
    edited = await copy.commit()
    assert await edited.sys.read_bytes("a.txt") == b"changed"
    assert await edited.sys.read_bytes("link") == b"changed"
    assert "bin/tool" not in names(await edited.sys.walk())
    # The base is untouched.
    assert await base.sys.read_bytes("a.txt") == b"hello"
    assert "dir/sub/added" not in names(await base.sys.walk())
    assert (await base.sys.stat("bin/tool")).permissions == 0o555
    assert (await info_of(store, edited.id)).parents == (base.id,)

    # Any Result whose sys is a view of this store may be the base (op inputs are
    # wrapped by the engine), and the caller keeps its handle.
    shared = SharedResult(edited)
    async with await store.new_mutable(base=shared) as again:
        assert await anyio.to_thread.run_sync((again.path / "a.txt").read_bytes) == b"changed"
    await shared.release()
    await base.release()


@pytest.mark.anyio
async def test_base_must_be_a_live_snapshot_of_this_store(
    store: SnapshotStore, tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    async with SnapshotStore(tmp_path / "other") as other:
        foreign = await snapshot_of(other, write_sample)
        with pytest.raises(SolveError, match="belongs to the store at"):
            await store.new_mutable(base=foreign)
        await foreign.release()
        with pytest.raises(SolveError, match="the handle was released"):
            await store.new_mutable(base=foreign)
    plain = CountingResult("plain", value=b"not a snapshot")
    with pytest.raises(SolveError, match="is not a snapshot of the built-in worker"):
        await store.new_mutable(base=plain)
    await plain.release()
    assert os.listdir(store.root / "tmp") == []


@pytest.mark.anyio
async def test_commit_refuses_special_files(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    mutable = await store.new_mutable()
    await in_thread(lambda p: os.mkfifo(p / "pipe"), mutable.path)
    with pytest.raises(SolveError, match=r"'pipe' is a FIFO; a snapshot holds only regular"):
        await mutable.commit()
    assert mutable.state == "discarded"
    assert not mutable.path.exists()
    assert await store.usage() == []


@pytest.mark.anyio
async def test_mutable_lifecycle(store: SnapshotStore, handle_tracker: HandleTracker) -> None:
    mutable = await store.new_mutable()
    assert mutable.path.parent == store.root / "tmp"
    assert mutable.path.is_dir()
    assert mutable.state == "open"
    await mutable.discard()
    await mutable.discard()  # idempotent
    assert not mutable.path.exists()
    with pytest.raises(SolveError, match="it is discarded"):
        await mutable.commit()

    async with await store.new_mutable() as scoped:
        await in_thread(lambda p: (p / "f").write_bytes(b"x"), scoped.path)
    assert scoped.state == "discarded"
    assert not scoped.path.exists()

    committed = await store.new_mutable()
    ref = await committed.commit()
    assert ref.id == committed.id
    assert committed.state == "committed"
    await committed.discard()  # a no-op after commit
    with pytest.raises(SolveError, match="it is committed"):
        await committed.commit()
    assert await ref.sys.walk() == []
    await ref.release()

    with pytest.raises(SolveError, match="JSON-serialisable"):
        await store.new_mutable({"bad": object()})
    assert os.listdir(store.root / "tmp") == []


# -- reference counting ---------------------------------------------------------------


@pytest.mark.anyio
async def test_clone_load_and_release_counts(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    ref = await snapshot_of(store, write_sample)
    assert isinstance(ref, Result)  # the engine's Result protocol
    clone = ref.clone()
    loaded = await store.load(ref.id)
    assert {clone.id, loaded.id} == {ref.id}
    assert clone.sys is ref.sys
    assert loaded.sys is ref.sys
    assert (await info_of(store, ref.id)).handles == 3
    assert handle_tracker.created_count == 3
    assert len(handle_tracker.live) == 3

    await ref.release()
    assert ref.released
    assert not clone.released
    info = await info_of(store, ref.id)
    assert info.handles == 2
    assert info.in_use
    await clone.release()
    await loaded.release()
    info = await info_of(store, ref.id)
    assert info.handles == 0
    assert not info.in_use
    assert handle_tracker.released_count == 3
    assert handle_tracker.live == []
    assert "live=0" in repr(ref)
    assert "released" in repr(ref)


@pytest.mark.anyio
async def test_double_release_raises_logs_and_counts_nothing(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="solver")
    with track_handles() as tracker:
        ref = await snapshot_of(store, write_sample)
        keeper = ref.clone()
        await ref.release()
        with pytest.raises(DoubleReleaseError, match="releasing already released snapshot"):
            await ref.release()
        with pytest.raises(DoubleReleaseError, match="cloning already released snapshot"):
            ref.clone()
        assert (await info_of(store, ref.id)).handles == 1
        errors = solver_records(caplog, logging.ERROR)
        assert len(errors) == 2
        assert ref.id in errors[0].getMessage()
        assert len(tracker.double_releases) == 2
        await keeper.release()
    assert tracker.live == []
    assert (await info_of(store, ref.id)).handles == 0


@pytest.mark.anyio
async def test_concurrent_releases_from_tasks_are_exactly_once(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="solver")
    with track_handles() as tracker:
        ref = await snapshot_of(store, write_sample)
        handles = [ref.clone() for _ in range(49)] + [ref]
        outcomes: list[str] = []

        async def release(handle: SnapshotRef) -> None:
            try:
                await handle.release()
                outcomes.append("ok")
            except DoubleReleaseError:
                outcomes.append("double")

        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(release, handle)
        assert outcomes == ["ok"] * 50
        assert (await info_of(store, ref.id)).handles == 0
        assert tracker.live == []
        assert tracker.released_count == 50

        # 50 tasks releasing one handle at once: exactly one succeeds.
        single = await store.load(ref.id)
        outcomes.clear()
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(release, single)
        assert sorted(outcomes) == ["double"] * 49 + ["ok"]
        assert (await info_of(store, ref.id)).handles == 0
        assert len(tracker.double_releases) == 49


@pytest.mark.anyio
async def test_concurrent_releases_from_threads_are_exactly_once(
    store: SnapshotStore, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="solver")
    with track_handles() as tracker:
        ref = await snapshot_of(store, write_sample)

        # Through anyio.from_thread, as the engine's worker threads do.
        handles = [ref.clone() for _ in range(49)] + [ref]
        limiter = anyio.CapacityLimiter(50)
        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(
                    lambda h: anyio.to_thread.run_sync(
                        anyio.from_thread.run, h.release, limiter=limiter
                    ),
                    handle,
                )
        assert (await info_of(store, ref.id)).handles == 0
        assert tracker.live == []

        # Plain threads, each with its own event loop, released at the same instant:
        # half on their own handles, half all on one handle.
        own = [await store.load(ref.id) for _ in range(25)]
        shared = await store.load(ref.id)
        barrier = threading.Barrier(50)
        outcomes: list[str] = []
        outcomes_lock = threading.Lock()

        def release_in_thread(handle: SnapshotRef) -> None:
            barrier.wait()
            try:
                anyio.run(handle.release, backend=anyio_backend)
                outcome = "ok"
            except DoubleReleaseError:
                outcome = "double"
            with outcomes_lock:
                outcomes.append(outcome)

        def run_threads() -> None:
            threads = [threading.Thread(target=release_in_thread, args=(h,)) for h in own]
            threads += [
                threading.Thread(target=release_in_thread, args=(shared,)) for _ in range(25)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        await anyio.to_thread.run_sync(run_threads)
        assert sorted(outcomes) == ["double"] * 24 + ["ok"] * 26
        assert (await info_of(store, ref.id)).handles == 0
        assert tracker.live == []
        assert len(tracker.double_releases) == 24
        store._check()


@pytest.mark.anyio
async def test_live_snapshot_is_never_deleted_and_unused_one_is_kept_until_pruned(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    ref = await snapshot_of(store, write_sample)
    sid, path = ref.id, ref.sys.path
    with pytest.raises(SnapshotInUseError, match=f"cannot delete snapshot {sid}: it has 1 live"):
        await store.delete(sid)
    assert await store.prune() == []
    assert await store.exists(sid)
    assert path.is_dir()

    before = (await info_of(store, sid)).last_used
    await ref.release()
    # The last release keeps the snapshot: it is a cache entry now.
    assert await store.exists(sid)
    assert path.is_dir()
    info = await info_of(store, sid)
    assert not info.in_use
    assert info.last_used >= before
    again = await store.load(sid)
    assert await again.sys.read_bytes("a.txt") == b"hello"
    assert await store.prune() == []
    await again.release()

    assert await store.prune() == [sid]
    assert not path.exists()
    assert not await store.exists(sid)
    assert not (store.root / "meta" / f"{sid}.json").exists()
    assert os.listdir(store.root / "tmp") == []
    with pytest.raises(SnapshotNotFoundError, match=f"snapshot '{sid}' not found"):
        await store.load(sid)
    with pytest.raises(SnapshotNotFoundError):
        await store.delete(sid)
    with pytest.raises(SnapshotNotFoundError, match="was deleted"):
        await again.sys.read_bytes("a.txt")


@pytest.mark.anyio
async def test_delete_and_prune_with_keep(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    kept = await snapshot_of(store, write_sample, {"keep": True})
    dropped = await snapshot_of(store, write_sample, {"keep": False})
    used = await snapshot_of(store, write_sample, {"keep": False})
    deleted = await snapshot_of(store, write_sample)
    for ref in (kept, dropped, deleted):
        await ref.release()

    await store.delete(deleted.id)
    assert not await store.exists(deleted.id)

    def explode(_: object) -> bool:
        raise RuntimeError("keep failed")

    with pytest.raises(RuntimeError, match="keep failed"):
        await store.prune(keep=explode)
    assert len(await store.usage()) == 3  # nothing was deleted

    seen: list[str] = []

    def keep(info: SnapshotInfo) -> bool:
        seen.append(info.id)
        return bool(info.description.get("keep"))

    assert await store.prune(keep=keep) == [dropped.id]
    assert sorted(seen) == sorted([kept.id, dropped.id])  # in-use ones are never asked
    assert [i.id for i in await store.usage()] == [kept.id, used.id]
    await used.release()
    assert sorted(await store.prune()) == sorted([kept.id, used.id])
    assert await store.usage() == []


# -- path safety ----------------------------------------------------------------------

REFUSED = [
    ("../x", "'..' is not allowed in a path"),
    ("a/../a.txt", "'..' is not allowed in a path"),
    ("/etc/passwd", "absolute paths are not allowed"),
    ("escape", "symlink 'escape' -> '../../../../../../etc/passwd' points outside"),
    ("absolute", "symlink 'absolute' -> '/etc/passwd' points outside the snapshot (absolute"),
    ("parent/etc/passwd", "symlink 'parent' -> '..' points outside the snapshot"),
    ("sub/sneaky", "symlink 'sub/sneaky' -> '../../outside.txt' points outside the snapshot"),
    ("loop1", "too many levels of symbolic links (a symlink loop?"),
    ("self/x", "too many levels of symbolic links"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("rel", "reason"), REFUSED)
async def test_paths_that_leave_the_snapshot_are_refused(
    store: SnapshotStore, handle_tracker: HandleTracker, rel: str, reason: str
) -> None:
    ref = await snapshot_of(store, write_hostile)
    view = ref.sys
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: view.read_bytes(rel),
        lambda: view.read_dir(rel),
        lambda: view.walk(rel),
        lambda: view.resolve(rel),
    ]
    for attempt in attempts:
        with pytest.raises(UnsafePathError) as info:
            await attempt()
        assert isinstance(info.value, SolveError)
        assert str(info.value).startswith(f"path {rel!r} in snapshot {ref.id} is refused: ")
        assert reason in str(info.value)
    await ref.release()


@pytest.mark.anyio
async def test_hostile_symlinks_can_be_inspected_but_not_followed(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    ref = await snapshot_of(store, write_hostile)
    view = ref.sys
    # stat does not follow the final component, so it may look at any symlink.
    escape = await view.stat("escape")
    assert escape.is_symlink
    assert escape.linkname == "../../../../../../etc/passwd"
    assert (await view.stat("loop1")).linkname == "loop2"
    # A symlink whose target stays inside is followed.
    assert await view.read_bytes("sub/fine") == b"inside"
    # walk lists symlinks without following them.
    assert "sub/sneaky" in names(await view.walk())
    with pytest.raises(UnsafePathError, match=r"'\.\.' is not allowed"):
        await view.stat("sub/..")
    await ref.release()


@pytest.mark.anyio
async def test_missing_and_wrong_kind_paths_raise_clear_errors(
    store: SnapshotStore, handle_tracker: HandleTracker
) -> None:
    ref = await snapshot_of(store, write_sample)
    view = ref.sys
    with pytest.raises(SolveError, match=rf"cannot read 'nope' in snapshot {ref.id}: no such"):
        await view.read_bytes("nope")
    with pytest.raises(SolveError, match=r"cannot read 'dangling'.*no such file"):
        await view.read_bytes("dangling")
    with pytest.raises(SolveError, match=r"cannot read 'dir'.*is a directory"):
        await view.read_bytes("dir")
    with pytest.raises(SolveError, match=r"cannot list 'a.txt'.*not a directory"):
        await view.read_dir("a.txt")
    with pytest.raises(SolveError, match=r"cannot stat 'a.txt/x'.*not a directory"):
        await view.stat("a.txt/x")
    with pytest.raises(SolveError, match=r"cannot walk 'a.txt'.*not a directory"):
        await view.walk("a.txt")
    with pytest.raises(ValueError, match="must not be negative"):
        await view.read_bytes("a.txt", offset=-1)
    await ref.release()


# -- persistence and recovery ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_second_store_on_the_root_sees_the_snapshots(
    tmp_path: Path, anyio_backend: str, handle_tracker: HandleTracker
) -> None:
    root = tmp_path / "store"
    async with SnapshotStore(root) as first:
        base = await snapshot_of(first, write_sample, {"op": "base"})
        derived_mutable = await first.new_mutable({"op": "derived"}, base=base)
        derived = await derived_mutable.commit()
        await base.release()
        released_at = (await info_of(first, base.id)).last_used
        before = {i.id: i for i in await first.usage()}
    # A handle outlives its store and is still released normally.
    assert first.closed
    assert await derived.sys.read_bytes("a.txt") == b"hello"
    await derived.release()

    async with SnapshotStore(root) as second:
        after = {i.id: i for i in await second.usage()}
        assert set(after) == {base.id, derived.id}
        for sid, info in after.items():
            old = before[sid]
            assert (info.size, info.created_at, info.description, info.parents) == (
                old.size, old.created_at, old.description, old.parents
            )
            assert not info.in_use
        assert after[base.id].last_used == released_at
        # derived was in use when the first store closed: its last_used is that moment.
        assert after[derived.id].last_used >= before[derived.id].last_used
        assert after[derived.id].parents == (base.id,)
        assert await second.exists(base.id)
        loaded = await second.load(derived.id)
        assert await loaded.sys.read_bytes("link") == b"hello"
        assert (await loaded.sys.stat("bin/tool")).permissions == 0o555
        await loaded.release()
        second._check()


@pytest.mark.anyio
async def test_a_root_is_open_in_one_store_at_a_time(
    tmp_path: Path, anyio_backend: str
) -> None:
    root = tmp_path / "store"
    async with SnapshotStore(root):
        rival = SnapshotStore(root)
        with pytest.raises(SolveError, match="is already open"):
            await rival.open()
        # It failed cleanly: it can open once the root is free.
    async with rival:
        assert await rival.usage() == []


@pytest.mark.anyio
async def test_crash_leftovers_are_removed_on_open(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="solver")
    root = tmp_path / "store"
    async with SnapshotStore(root) as store:
        good = await snapshot_of(store, write_sample)
        await good.release()
        # A crashed process leaves: a half-written mutable (sealed read-only, as a
        # commit interrupted before its rename leaves it), a half-deleted snapshot,
        # a metadata file whose snapshot never arrived, and a torn metadata write.
        crashed = await store.new_mutable()
    leftover = crashed.path  # close() removed it; recreate it as a crash would leave it

    def make_debris(root: Path) -> None:
        leftover.mkdir()
        (leftover / "deep" / "er").mkdir(parents=True)
        (leftover / "deep" / "er" / "f").write_bytes(b"x")
        _snapshots._seal_tree(os.fspath(leftover), "test")
        (root / "tmp" / f"{'a' * 32}.deleted-0000").mkdir()
        (root / "meta" / f"{'b' * 32}.json").write_text("{}")
        (root / "meta" / f"{'c' * 32}.1234.tmp").write_text("{")

    await in_thread(make_debris, root)
    async with SnapshotStore(root) as store:
        assert os.listdir(root / "tmp") == []
        assert sorted(os.listdir(root / "meta")) == [f"{good.id}.json"]
        assert [i.id for i in await store.usage()] == [good.id]
        store._check()
    messages = [r.getMessage() for r in solver_records(caplog, logging.INFO)]
    assert any("removing leftover" in m and crashed.id in m for m in messages)


@pytest.mark.anyio
async def test_snapshots_with_corrupt_or_missing_metadata_are_removed_on_open(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    async with SnapshotStore(root) as store:
        refs = [await snapshot_of(store, write_sample) for _ in range(4)]
        for ref in refs:
            await ref.release()
    corrupt, wrong_id, missing, intact = (ref.id for ref in refs)

    def damage(root: Path) -> None:
        (root / "meta" / f"{corrupt}.json").write_text("{not json")
        text = (root / "meta" / f"{wrong_id}.json").read_text()
        (root / "meta" / f"{wrong_id}.json").write_text(text.replace(wrong_id, intact))
        (root / "meta" / f"{missing}.json").unlink()
        (root / "snapshots" / "stranger").write_text("?")

    await in_thread(damage, root)
    caplog.set_level(logging.WARNING, logger="solver")
    async with SnapshotStore(root) as store:
        assert [i.id for i in await store.usage()] == [intact]
        ref = await store.load(intact)
        assert await ref.sys.read_bytes("a.txt") == b"hello"
        await ref.release()
    assert sorted(os.listdir(root / "snapshots")) == [intact]
    assert sorted(os.listdir(root / "meta")) == [f"{intact}.json"]
    warnings = {r.getMessage() for r in solver_records(caplog, logging.WARNING)}
    assert any(corrupt in m and "its metadata is corrupt" in m for m in warnings)
    assert any(wrong_id in m and "does not match the directory" in m for m in warnings)
    assert any(missing in m and "its metadata is missing" in m for m in warnings)
    assert any("stranger" in m and "not a snapshot directory" in m for m in warnings)


@pytest.mark.anyio
async def test_lifecycle_errors_and_idempotent_close(
    tmp_path: Path, anyio_backend: str, handle_tracker: HandleTracker
) -> None:
    store = SnapshotStore(tmp_path / "store")
    assert not (tmp_path / "store").exists()  # nothing happens before open
    with pytest.raises(SolveError, match="is not open"):
        await store.load("x")
    await store.open()
    assert (tmp_path / "store" / "snapshots").is_dir()
    with pytest.raises(SolveError, match="was already opened"):
        await store.open()
    ref = await snapshot_of(store, write_sample)
    open_mutable = await store.new_mutable()
    assert "snapshots=1 in_use=1 mutables=1" in repr(store)

    await store.close()
    await store.close()
    assert store.closed
    assert "closed" in repr(store)
    # Unfinished mutables are removed; snapshots persist.
    assert open_mutable.state == "discarded"
    assert not open_mutable.path.exists()
    await open_mutable.discard()
    assert ref.sys.path.is_dir()
    for attempt in (
        lambda: store.load(ref.id),
        lambda: store.new_mutable(),
        lambda: store.usage(),
        lambda: store.prune(),
        lambda: store.delete(ref.id),
        lambda: store.exists(ref.id),
        lambda: open_mutable.commit(),
    ):
        with pytest.raises(SolveError, match=f"the snapshot store at {store.root} is closed"):
            await attempt()
    with pytest.raises(SolveError, match="was already opened"):
        await store.open()
    await ref.release()


# -- cancellation ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_commit_leaks_no_handle(
    store: SnapshotStore, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, proceed = threading.Event(), threading.Event()
    seal = _snapshots._seal_tree

    def slow_seal(top: str, sid: str, store_links: frozenset[tuple[int, int]]) -> int:
        entered.set()
        proceed.wait()
        return seal(top, sid, store_links)

    monkeypatch.setattr(_snapshots, "_seal_tree", slow_seal)
    mutable = await store.new_mutable()
    await in_thread(write_sample, mutable.path)
    results: list[SnapshotRef] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(results, mutable.commit()))
            await anyio.to_thread.run_sync(entered.wait)
            scope.cancel()
            proceed.set()
    assert scope.cancelled_caught
    assert results == []
    # The commit finished (shielded) and its handle was released, not leaked.
    assert mutable.state == "committed"
    info = await info_of(store, mutable.id)
    assert not info.in_use
    ref = await store.load(mutable.id)
    assert await ref.sys.read_bytes("a.txt") == b"hello"
    await ref.release()


@pytest.mark.anyio
async def test_cancelled_new_mutable_leaves_nothing_behind(
    store: SnapshotStore, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.new_mutable()
    assert scope.cancelled_caught

    entered, proceed = threading.Event(), threading.Event()
    make_dir = _snapshots._make_dir

    def slow_make_dir(path: Path) -> None:
        entered.set()
        proceed.wait()
        make_dir(path)

    monkeypatch.setattr(_snapshots, "_make_dir", slow_make_dir)
    results: list[MutableSnapshot] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(results, store.new_mutable()))
            await anyio.to_thread.run_sync(entered.wait)
            scope.cancel()
            proceed.set()
    assert scope.cancelled_caught
    assert results == []
    assert os.listdir(store.root / "tmp") == []
    store._check()


async def _append(results: list[T], pending: Awaitable[T]) -> None:
    results.append(await pending)


# -- default root ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_default_root_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SOLVER_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_root() == tmp_path / "home" / ".cache" / "solver-engine" / "snapshots"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert default_root() == tmp_path / "home" / ".cache" / "solver-engine" / "snapshots"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "solver-engine" / "snapshots"

    monkeypatch.setenv("SOLVER_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_root() == tmp_path / "explicit" / "snapshots"
    store = SnapshotStore()
    assert store.root == tmp_path / "explicit" / "snapshots"
    async with store:
        assert (tmp_path / "explicit" / "snapshots" / "snapshots").is_dir()
        assert (tmp_path / "explicit" / "snapshots" / "tmp").is_dir()
    # An explicit argument wins over the environment.
    assert SnapshotStore(tmp_path / "arg").root == tmp_path / "arg"


@pytest.mark.anyio
async def test_delete_listeners_hear_every_deletion_once(
    store: SnapshotStore, handle_tracker: HandleTracker, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[list[str]] = []
    order: list[str] = []

    async def broken(ids: object) -> None:
        order.append("broken")
        raise RuntimeError("listener broke")

    async def recorder(ids: list[str]) -> None:
        order.append("recorder")
        await anyio.lowlevel.checkpoint()
        heard.append(sorted(ids))

    store.add_delete_listener(broken)
    store.add_delete_listener(recorder)
    a = await snapshot_of(store, write_sample)
    b = await snapshot_of(store, write_sample)
    c = await snapshot_of(store, write_sample)
    for ref in (a, b):
        await ref.release()
    await store.delete(a.id)
    assert await store.prune() == [b.id]  # c is in use
    assert await store.prune() == []  # nothing deleted: no call
    with pytest.raises(SnapshotInUseError):
        await store.delete(c.id)
    await c.release()
    assert heard == [[a.id], [b.id]]
    assert order == ["broken", "recorder"] * 2
    assert "a delete listener" in caplog.text
