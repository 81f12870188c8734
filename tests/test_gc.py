"""Garbage collection of the snapshot store: prune policies, the LRU index, and the
worker's automatic GC (solver.worker._gc, SnapshotStore.prune_by_policy,
Worker.after_solve)."""

from __future__ import annotations

import logging
import random
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import PrunePolicy, SnapshotInfo, SnapshotRef, SnapshotStore, State, Worker, run
from solver.worker._gc import snapshot_kind, snapshot_label

PY = sys.executable


class Clock:
    """A settable clock for the store's ``created_at`` and ``last_used``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Disk:
    """A settable free-space measure, counting how often it is asked."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, root: Path) -> int:
        self.calls += 1
        return self.free


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def disk() -> Disk:
    return Disk(10**12)


@pytest.fixture
async def store(
    tmp_path: Path, clock: Clock, disk: Disk, anyio_backend: str
) -> AsyncIterator[SnapshotStore]:
    async with SnapshotStore(tmp_path / "store", clock=clock, free_space=disk) as opened:
        yield opened
        opened._check()


async def make(
    store: SnapshotStore,
    clock: Clock,
    used_at: float,
    size: int = 100,
    kind: str = "exec",
    name: str = "",
    *,
    keep: bool = False,
) -> SnapshotRef:
    """Commit a snapshot of ``size`` bytes; unless ``keep``, release it at
    ``used_at`` (so its last use is then) and return the released handle."""
    clock.now = used_at
    description: dict[str, object] = {"kind": kind}
    if name:
        description["name"] = name
    async with await store.new_mutable(description) as mutable:
        await anyio.to_thread.run_sync((mutable.path / "data").write_bytes, b"x" * size)
        ref = await mutable.commit()
    if not keep:
        await ref.release()
    return ref


async def use(store: SnapshotStore, clock: Clock, ref: SnapshotRef, at: float) -> None:
    """Use a snapshot again at time ``at`` (load a handle, release it)."""
    clock.now = at
    again = await store.load(ref.id)
    await again.release()


async def ids_in_store(store: SnapshotStore) -> set[str]:
    return {info.id for info in await store.usage()}


def ids(infos: Sequence[SnapshotInfo]) -> list[str]:
    return [info.id for info in infos]


# -- the policy value ------------------------------------------------------------------


def test_policy_fields_are_validated() -> None:
    rule = PrunePolicy(keep_duration=3600, max_used_space=10, filters=["kind==exec"])  # type: ignore[arg-type]
    assert rule.keep_duration == 3600.0
    assert rule.filters == ("kind==exec",)
    assert rule == PrunePolicy(keep_duration=3600.0, max_used_space=10, filters=("kind==exec",))
    assert hash(rule) == hash(PrunePolicy(keep_duration=3600, max_used_space=10,
                                          filters=("kind==exec",)))
    assert "_conditions" not in repr(rule)
    with pytest.raises(ValueError, match="keep_duration must be a finite number >= 0"):
        PrunePolicy(keep_duration=-1)
    with pytest.raises(ValueError, match="finite"):
        PrunePolicy(keep_duration=float("inf"))
    with pytest.raises(TypeError, match="keep_duration must be a number of seconds"):
        PrunePolicy(keep_duration="1h")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_used_space must not be negative"):
        PrunePolicy(max_used_space=-5)
    with pytest.raises(TypeError, match=r"min_free_space must be an int \(bytes\)"):
        PrunePolicy(min_free_space=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reserved_space must be an int"):
        PrunePolicy(reserved_space=True)
    with pytest.raises(TypeError, match="sequence of filter strings"):
        PrunePolicy(filters="kind==exec")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a prune filter must be a string"):
        PrunePolicy(filters=(3,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown field 'type'"):
        PrunePolicy(filters=("type==exec",))
    with pytest.raises(ValueError, match="expected FIELD==VALUE"):
        PrunePolicy(filters=("kind",))
    with pytest.raises(ValueError, match="bad regular expression"):
        PrunePolicy(filters=("description~=(",))


def test_filters() -> None:
    compile_ = {"kind": "exec", "args": ["cc", "-c", "main.c"], "dest": ""}
    sources = {"kind": "source.local", "name": "vendor  tree", "path": "/src"}
    nameless = {"vertex": "sha256:..."}
    sid = "ab" * 16

    def matching(*filters: str) -> list[str]:
        rule = PrunePolicy(filters=filters)
        return [name for name, desc in (("compile", compile_), ("sources", sources),
                                        ("nameless", nameless)) if rule.matches(sid, desc)]

    assert matching() == ["compile", "sources", "nameless"]
    assert matching("kind==exec") == ["compile"]
    assert matching("kind=exec") == ["compile"]
    assert matching(" kind = exec ") == ["compile"]  # spaces around are ignored
    assert matching("kind!=exec") == ["sources", "nameless"]
    assert matching("kind==") == ["nameless"]  # no kind: the empty string
    assert matching("description==vendor tree") == ["sources"]  # whitespace collapsed
    assert matching("description~=^cc ") == ["compile"]
    assert matching("description~=tree$") == ["sources"]
    assert matching(f"id=={sid}") == ["compile", "sources", "nameless"]
    assert matching("id==other") == []
    # ',' joins conditions that must all hold; several filters are alternatives.
    assert matching("kind==exec,description~=main") == ["compile"]
    assert matching("kind==exec,description~=vendor") == []
    assert matching("kind==exec", "kind==source.local") == ["compile", "sources"]
    assert snapshot_kind(compile_) == "exec"
    assert snapshot_label(compile_) == "cc -c main.c"
    assert snapshot_kind(nameless) == ""
    assert snapshot_label(nameless) == ""


def test_space_limit() -> None:
    # No space field: no limit (every eligible snapshot goes).
    assert PrunePolicy().space_limit(500, None) is None
    assert PrunePolicy(keep_duration=60).space_limit(500, None) is None
    # max_used_space alone.
    assert PrunePolicy(max_used_space=300).space_limit(500, None) == 300
    # min_free_space: short by 150 bytes -> used must shrink by 150.
    assert PrunePolicy(min_free_space=1150).space_limit(500, 1000) == 350
    # ... enough free space: nothing to do.
    assert PrunePolicy(min_free_space=1000).space_limit(500, 1000) == 500
    # both: the smaller limit wins.
    assert PrunePolicy(max_used_space=300, min_free_space=1150).space_limit(500, 1000) == 300
    assert PrunePolicy(max_used_space=400, min_free_space=1300).space_limit(500, 1000) == 200
    assert PrunePolicy(max_used_space=300, min_free_space=10).space_limit(500, 1000) == 300
    # reserved_space is a floor...
    assert PrunePolicy(max_used_space=100, reserved_space=250).space_limit(500, None) == 250
    assert PrunePolicy(min_free_space=10**6, reserved_space=250).space_limit(500, 0) == 250
    # ... and alone a limit of its own.
    assert PrunePolicy(reserved_space=250).space_limit(500, None) == 250
    with pytest.raises(ValueError, match="free space is needed"):
        PrunePolicy(min_free_space=1).space_limit(500, None)


# -- each field, on a real store -----------------------------------------------------------


@pytest.mark.anyio
async def test_lru_order_older_use_goes_first(store: SnapshotStore, clock: Clock) -> None:
    a = await make(store, clock, 100)
    b = await make(store, clock, 200)
    c = await make(store, clock, 300)
    d = await make(store, clock, 400)
    # a was made first but is used again last: it is now the most recently used.
    await use(store, clock, a, 500)
    # b is loaded, copied from, and released at 450.
    clock.now = 450
    handle = await store.load(b.id)
    async with await store.new_mutable({"kind": "file"}, base=handle) as copy:
        pass
    assert copy.state == "discarded"
    await handle.release()
    clock.now = 600
    # 400 bytes, keep at most 200: the two least recently used go, c then d.
    deleted = await store.prune_by_policy(PrunePolicy(max_used_space=200))
    assert ids(deleted) == [c.id, d.id]
    assert [info.last_used for info in deleted] == [300, 400]
    assert await ids_in_store(store) == {a.id, b.id}
    assert store.used_space == 200
    # Then b (used at 450) before a (used at 500).
    assert ids(await store.prune_by_policy(PrunePolicy(max_used_space=100))) == [b.id]
    assert ids(await store.prune_by_policy(PrunePolicy(max_used_space=1))) == [a.id]
    assert store.used_space == 0


@pytest.mark.anyio
async def test_lru_order_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    root = tmp_path / "store"
    async with SnapshotStore(root, clock=clock) as first:
        old = await make(first, clock, 100)
        new = await make(first, clock, 200)
        await use(first, clock, old, 300)
    async with SnapshotStore(root, clock=clock) as second:
        assert second.used_space == 200
        assert ids(await second.prune_by_policy(PrunePolicy(max_used_space=100))) == [new.id]
        second._check()


@pytest.mark.anyio
async def test_keep_duration(store: SnapshotStore, clock: Clock) -> None:
    old = await make(store, clock, 100)
    edge = await make(store, clock, 250)
    recent = await make(store, clock, 300)
    clock.now = 350
    # Kept: used within the last 100 s (after 250). Exactly at the cut-off goes.
    deleted = await store.prune_by_policy(PrunePolicy(keep_duration=100))
    assert ids(deleted) == [old.id, edge.id]
    assert await ids_in_store(store) == {recent.id}
    clock.now = 1000
    assert ids(await store.prune_by_policy(PrunePolicy(keep_duration=100))) == [recent.id]


@pytest.mark.anyio
async def test_keep_duration_with_a_space_limit(store: SnapshotStore, clock: Clock) -> None:
    a = await make(store, clock, 100)
    b = await make(store, clock, 200)
    c = await make(store, clock, 300)
    clock.now = 400
    # Under the limit: old snapshots stay all the same.
    assert await store.prune_by_policy(PrunePolicy(keep_duration=50, max_used_space=300)) == []
    # Over it: only snapshots older than the keep duration may go, oldest first.
    rule = PrunePolicy(keep_duration=150, max_used_space=1)
    assert ids(await store.prune_by_policy(rule)) == [a.id, b.id]  # c is too recent
    assert await ids_in_store(store) == {c.id}


@pytest.mark.anyio
async def test_max_used_space(store: SnapshotStore, clock: Clock) -> None:
    refs = [await make(store, clock, t, size=100) for t in (10, 20, 30, 40, 50)]
    assert store.used_space == 500
    assert await store.prune_by_policy(PrunePolicy(max_used_space=500)) == []
    deleted = await store.prune_by_policy(PrunePolicy(max_used_space=250))
    assert ids(deleted) == [r.id for r in refs[:3]]
    assert [info.size for info in deleted] == [100, 100, 100]
    assert store.used_space == 200


@pytest.mark.anyio
async def test_min_free_space(store: SnapshotStore, clock: Clock, disk: Disk) -> None:
    refs = [await make(store, clock, t, size=100) for t in (10, 20, 30, 40)]
    disk.free = 1000
    # Enough free space: nothing is deleted (and the disk is asked once).
    assert await store.prune_by_policy(PrunePolicy(min_free_space=1000)) == []
    assert disk.calls == 1
    # 150 bytes short: two snapshots of 100 go.
    deleted = await store.prune_by_policy(PrunePolicy(min_free_space=1150))
    assert ids(deleted) == [refs[0].id, refs[1].id]
    assert disk.calls == 2
    # A rule without min_free_space never measures the disk.
    await store.prune_by_policy(PrunePolicy(max_used_space=10**9))
    assert disk.calls == 2


@pytest.mark.anyio
async def test_reserved_space(store: SnapshotStore, clock: Clock, disk: Disk) -> None:
    refs = [await make(store, clock, t, size=100) for t in (10, 20, 30, 40, 50)]
    disk.free = 0
    # The disk is full and wants a terabyte, but 300 bytes are reserved.
    rule = PrunePolicy(min_free_space=10**12, reserved_space=300)
    assert ids(await store.prune_by_policy(rule)) == [refs[0].id, refs[1].id]
    assert store.used_space == 300
    # Alone, reserved_space is a limit (as in BuildKit).
    assert ids(await store.prune_by_policy(PrunePolicy(reserved_space=150))) == [
        refs[2].id, refs[3].id
    ]
    assert await ids_in_store(store) == {refs[4].id}


@pytest.mark.anyio
async def test_filters_in_a_prune(store: SnapshotStore, clock: Clock) -> None:
    src = await make(store, clock, 10, kind="source.local", name="vendor")
    cc = await make(store, clock, 20, kind="exec", name="compile")
    ld = await make(store, clock, 30, kind="exec", name="link")
    inline = await make(store, clock, 40, kind="source.inline", name="config")
    bare = await make(store, clock, 50, kind="")
    rule = PrunePolicy(filters=("kind==exec,description~=^l",))
    assert ids(await store.prune_by_policy(rule)) == [ld.id]
    rule = PrunePolicy(filters=("kind==source.local", "kind==source.inline"))
    assert ids(await store.prune_by_policy(rule)) == [src.id, inline.id]
    # With a space limit, the filter is applied before the order: cc is not
    # eligible, so bare goes although cc is older.
    rule = PrunePolicy(max_used_space=100, filters=("kind!=exec",))
    assert ids(await store.prune_by_policy(rule)) == [bare.id]
    assert await ids_in_store(store) == {cc.id}


@pytest.mark.anyio
async def test_rules_apply_in_order(store: SnapshotStore, clock: Clock) -> None:
    async def scenario(rules: list[PrunePolicy]) -> list[str]:
        made = {
            "old exec": await make(store, clock, 10, kind="exec"),
            "mid source": await make(store, clock, 20, kind="source.local"),
            "new source": await make(store, clock, 30, kind="source.local"),
            "new exec": await make(store, clock, 40, kind="exec"),
        }
        names = {ref.id: name for name, ref in made.items()}
        deleted = await store.prune_by_policy(rules)
        await store.prune()  # start the next scenario empty
        return [names[sid] for sid in ids(deleted)]

    sources_first = PrunePolicy(max_used_space=200, filters=("kind==source.local",))
    anything = PrunePolicy(max_used_space=200)
    # Sources first: both sources go (the second rule then has nothing to do).
    assert await scenario([sources_first, anything]) == ["mid source", "new source"]
    # The general rule first: it takes the two least recently used.
    assert await scenario([anything, sources_first]) == ["old exec", "mid source"]
    # Each rule sees what the ones before left: the first one brings the store to
    # 300, the second one to 100.
    assert await scenario([PrunePolicy(max_used_space=300), PrunePolicy(max_used_space=100)]) == [
        "old exec", "mid source", "new source"
    ]
    # A single rule may be passed alone.
    assert await scenario(anything) == ["old exec", "mid source"]  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="made of PrunePolicy rules"):
        await store.prune_by_policy(["kind==exec"])  # type: ignore[list-item]


# -- what is never pruned, and who is told ---------------------------------------------------


@pytest.mark.anyio
async def test_live_handles_are_never_pruned(
    store: SnapshotStore, clock: Clock, handle_tracker: HandleTracker
) -> None:
    held = await make(store, clock, 10, keep=True)  # the oldest, in use
    loaded = await make(store, clock, 20)
    handle = await store.load(loaded.id)  # idle, then in use again
    free = await make(store, clock, 30)
    clock.now = 100
    # However strict the rule, only the idle snapshot goes.
    assert ids(await store.prune_by_policy(PrunePolicy(max_used_space=1))) == [free.id]
    assert await store.prune_by_policy(PrunePolicy()) == []
    assert await ids_in_store(store) == {held.id, loaded.id}
    # In use counts toward the used space, so a limit can stay unmet.
    assert store.used_space == 200
    assert await store.prune_by_policy(PrunePolicy(max_used_space=1)) == []
    assert await held.sys.read_bytes("data") == b"x" * 100
    # Once released, they go, least recently used first (released at 200, then 300).
    clock.now = 200
    await handle.release()
    clock.now = 300
    await held.release()
    assert ids(await store.prune_by_policy(PrunePolicy(max_used_space=1))) == [loaded.id, held.id]


@pytest.mark.anyio
async def test_delete_listeners_release_records_and_kept_records_keep_snapshots(
    store: SnapshotStore, clock: Clock
) -> None:
    """A persistent cache keeps records that name snapshots without holding a handle;
    it learns of deletions through the delete listener and drops those records. The
    records it keeps always name snapshots that exist."""
    refs = {name: await make(store, clock, t, kind=kind) for name, t, kind in (
        ("a", 10, "exec"), ("b", 20, "source.local"), ("c", 30, "exec"), ("d", 40, "file")
    )}
    # Two records per snapshot (say, two cache keys with the same result).
    records = {f"{name}{n}": ref.id for name, ref in refs.items() for n in (1, 2)}
    calls: list[list[str]] = []

    async def release_records(deleted: Sequence[str]) -> None:
        calls.append(list(deleted))
        for key in [key for key, sid in records.items() if sid in deleted]:
            del records[key]

    async def failing(deleted: Sequence[str]) -> None:
        raise RuntimeError("listener bug")

    store.add_delete_listener(failing)  # logged; the next one still runs
    store.add_delete_listener(release_records)
    clock.now = 100
    rules = [PrunePolicy(filters=("kind==source.local",)), PrunePolicy(max_used_space=200)]
    deleted = await store.prune_by_policy(rules)
    assert ids(deleted) == [refs["b"].id, refs["a"].id]
    assert calls == [[refs["b"].id], [refs["a"].id]]  # once per rule that deleted
    assert sorted(records) == ["c1", "c2", "d1", "d2"]
    for sid in records.values():
        assert await store.exists(sid)
        again = await store.load(sid)
        await again.release()
    # Nothing to delete: no call.
    assert await store.prune_by_policy(PrunePolicy(max_used_space=10**6)) == []
    assert len(calls) == 2


@pytest.mark.anyio
async def test_a_snapshot_that_cannot_be_removed_stays(
    store: SnapshotStore, clock: Clock, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from solver.worker import _snapshots

    a = await make(store, clock, 10)
    b = await make(store, clock, 20)
    real = _snapshots._delete_snapshots

    def refuse_a(root: Path, doomed: list[str]) -> dict[str, OSError]:
        failed = real(root, [sid for sid in doomed if sid != a.id])
        if a.id in doomed:
            failed[a.id] = PermissionError("read-only file system")
        return failed

    monkeypatch.setattr(_snapshots, "_delete_snapshots", refuse_a)
    with caplog.at_level(logging.ERROR, logger="solver"):
        deleted = await store.prune_by_policy(PrunePolicy())
    assert ids(deleted) == [b.id]
    assert "pruning snapshot" in caplog.text
    assert "read-only file system" in caplog.text
    assert await ids_in_store(store) == {a.id}
    assert store.used_space == 100
    store._check()  # back in the idle index, in its place
    monkeypatch.setattr(_snapshots, "_delete_snapshots", real)
    assert ids(await store.prune_by_policy(PrunePolicy())) == [a.id]


@pytest.mark.anyio
async def test_cancellation(
    store: SnapshotStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from solver.worker import _snapshots

    a = await make(store, clock, 10)
    b = await make(store, clock, 20)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.prune_by_policy(PrunePolicy())
    assert await ids_in_store(store) == {a.id, b.id}  # cancelled before it started
    # Cancelled while the first rule deletes: the whole prune still completes.
    real = _snapshots._delete_snapshots

    def cancel_then_delete(root: Path, doomed: list[str]) -> dict[str, OSError]:
        anyio.from_thread.run_sync(scope.cancel)
        return real(root, doomed)

    monkeypatch.setattr(_snapshots, "_delete_snapshots", cancel_then_delete)
    told: list[list[str]] = []

    async def listener(deleted: Sequence[str]) -> None:
        told.append(list(deleted))

    store.add_delete_listener(listener)
    rules = [PrunePolicy(max_used_space=100), PrunePolicy(max_used_space=1)]
    with anyio.CancelScope() as scope:
        deleted = await store.prune_by_policy(rules)
        await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert ids(deleted) == [a.id, b.id]
    assert told == [[a.id], [b.id]]
    assert await ids_in_store(store) == set()
    assert store.used_space == 0


@pytest.mark.anyio
async def test_releases_from_threads_while_pruning(
    store: SnapshotStore, clock: Clock, anyio_backend: str
) -> None:
    """Handles released by plain threads (each with its own event loop) while the
    loop prunes: each snapshot goes only once released, and the index stays right."""
    refs = [await make(store, clock, 10, keep=True) for _ in range(40)]
    start = threading.Barrier(len(refs) + 1)

    def release(ref: SnapshotRef) -> None:
        start.wait()
        anyio.run(ref.release, backend=anyio_backend)

    threads = [threading.Thread(target=release, args=(ref,)) for ref in refs]
    for thread in threads:
        thread.start()
    await anyio.to_thread.run_sync(start.wait)
    deleted: list[str] = []
    with anyio.fail_after(30):
        while len(deleted) < len(refs):
            found = ids(await store.prune_by_policy(PrunePolicy()))
            for sid in found:
                assert sid not in deleted
            deleted += found
            store._check()
    await anyio.to_thread.run_sync(lambda: [thread.join() for thread in threads])
    assert sorted(deleted) == sorted(ref.id for ref in refs)
    assert store.used_space == 0


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(8))
async def test_random_operations_match_a_sorting_model(
    tmp_path: Path, seed: int, anyio_backend: str
) -> None:
    """Random commits, uses, holds, releases and prunes; each prune deletes exactly
    what a naive model (sort every idle snapshot by last use, then apply the rule)
    says, in that order."""
    rng = random.Random(seed)
    clock = Clock()
    disk = Disk(0)
    held: list[SnapshotRef] = []
    async with SnapshotStore(tmp_path / "s", clock=clock, free_space=disk) as store:
        for _ in range(60):
            clock.now += rng.choice((0, 1, 1, 2))  # equal times happen: ids break ties
            infos = await store.usage()
            roll = rng.random()
            if roll < 0.35 or not infos:
                ref = await make(store, clock, clock.now, size=rng.randrange(0, 300),
                                 kind=rng.choice(("exec", "file", "merge")), keep=True)
                if rng.random() < 0.6:
                    await ref.release()
                else:
                    held.append(ref)
            elif roll < 0.55:
                info = rng.choice(infos)
                ref = await store.load(info.id)
                if rng.random() < 0.5:
                    await ref.release()
                else:
                    held.append(ref)
            elif roll < 0.75 and held:
                await held.pop(rng.randrange(len(held))).release()
            else:
                disk.free = rng.randrange(0, 2000)
                rule = PrunePolicy(
                    keep_duration=rng.choice((0, 0, 5, 20)),
                    max_used_space=rng.choice((0, 0, 100, 500, 1500)),
                    min_free_space=rng.choice((0, 0, 1000)),
                    reserved_space=rng.choice((0, 0, 200)),
                    filters=rng.choice(((), (), ("kind==exec",), ("kind!=merge",))),
                )
                expected = model_prune(infos, rule, clock.now, disk.free)
                assert ids(await store.prune_by_policy(rule)) == expected, rule
            store._check()
        for ref in held:
            await ref.release()
        store._check()


def model_prune(
    infos: Sequence[SnapshotInfo], rule: PrunePolicy, now: float, free: int
) -> list[str]:
    used = sum(info.size for info in infos)
    limit = rule.space_limit(used, free)
    order = sorted((i for i in infos if not i.in_use), key=lambda i: (i.last_used, i.id))
    deleted: list[str] = []
    for info in order:
        if limit is not None and used <= limit:
            break
        if rule.keep_duration and info.last_used > now - rule.keep_duration:
            continue
        if rule.matches(info.id, info.description):
            deleted.append(info.id)
            used -= info.size
    return deleted


# -- the worker: automatic GC ------------------------------------------------------------------


def graph() -> State:
    src = State.inline({"a.txt": "hello\n"}).with_name("sources")
    return run(["sh", "-c", "printf bee > b.txt"], root=src, name="make b")


@pytest.mark.anyio
async def test_after_solve_applies_the_policy(
    tmp_path: Path, anyio_backend: str, handle_tracker: HandleTracker
) -> None:
    policy = [PrunePolicy(filters=("kind==source.inline",))]
    with anyio.fail_after(30):
        async with Worker(tmp_path / "w", gc_policy=policy) as worker:
            assert worker.gc_policy == tuple(policy)
            async with Solver(op_kinds=worker.op_kinds) as solver:
                async with await solver.solve(graph().definition()) as result:
                    assert await result.ref.sys.read_bytes("b.txt") == b"bee"
                # The solver's in-memory cache holds clones of both results: they
                # are in use, so nothing is pruned.
                await worker.after_solve()
                usage = await worker.store.usage()
                assert len(usage) == 2
                assert all(info.in_use for info in usage)
            # The solver closed its cache: the source snapshot is idle and matches.
            await worker.after_solve()
            usage = await worker.store.usage()
            assert [snapshot_kind(info.description) for info in usage] == ["exec"]
            # Nothing more to do: a second call deletes nothing.
            await worker.after_solve()
            assert len(await worker.store.usage()) == 1


@pytest.mark.anyio
async def test_after_solve_without_policy_or_store_does_nothing(
    tmp_path: Path, anyio_backend: str
) -> None:
    worker = Worker(tmp_path / "w", gc_policy=[PrunePolicy()])
    await worker.after_solve()  # not open yet: no error
    async with worker:
        ref = await make(worker.store, Clock(), 0)
        assert worker.store.used_space == 100
    await worker.after_solve()  # closed: no error
    async with Worker(tmp_path / "w") as plain:
        assert plain.gc_policy == ()
        await plain.after_solve()
        assert await plain.store.exists(ref.id)
        # The explicit API prunes all the same.
        assert ids(await plain.prune(PrunePolicy())) == [ref.id]


@pytest.mark.anyio
async def test_after_solve_logs_errors_and_never_raises(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_disk(root: Path) -> int:
        raise OSError("statvfs failed")

    worker = Worker(tmp_path / "w", gc_policy=[PrunePolicy(min_free_space=10)])
    worker.store._free_space = broken_disk
    async with worker:
        await make(worker.store, Clock(), 0)
        with caplog.at_level(logging.ERROR, logger="solver"):
            await worker.after_solve()
        assert "automatic garbage collection" in caplog.text
        assert "statvfs failed" in caplog.text
        assert worker.store.used_space == 100
        # And the next one runs again (the in-progress flag was reset).
        worker.gc_policy = (PrunePolicy(),)
        await worker.after_solve()
        assert worker.store.used_space == 0


@pytest.mark.anyio
async def test_concurrent_after_solve_calls_prune_once(
    tmp_path: Path, anyio_backend: str
) -> None:
    calls: list[list[str]] = []

    async with Worker(tmp_path / "w", gc_policy=[PrunePolicy()]) as worker:
        async def listener(deleted: Sequence[str]) -> None:
            calls.append(list(deleted))

        worker.store.add_delete_listener(listener)
        clock = Clock()
        made = {(await make(worker.store, clock, t)).id for t in range(5)}
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker.after_solve)
        assert len(calls) == 1
        assert set(calls[0]) == made


@pytest.mark.anyio
async def test_solver_with_a_worker_collects_after_every_solve(
    tmp_path: Path, anyio_backend: str, handle_tracker: HandleTracker
) -> None:
    """``Solver(worker=...)`` runs the worker's policy at the end of each solve. Its
    persistent cache names snapshots without holding them, so what the policy
    deletes is gone at once, its records with it; what is in use stays."""
    runs = tmp_path / "runs.txt"
    make_b = (
        "import pathlib, sys; pathlib.Path(sys.argv[1]).open('a').write('run\\n'); "
        "pathlib.Path('b.txt').write_text('bee')"
    )
    src = State.inline({"a.txt": "hello\n"}).with_name("sources")
    defn = run([PY, "-c", make_b, str(runs)], root=src, name="make b").definition()

    def kinds(usage: Sequence[SnapshotInfo]) -> list[str]:
        return sorted(snapshot_kind(info.description) for info in usage)

    sources_only = [PrunePolicy(filters=("kind==source.inline",))]
    with anyio.fail_after(60):
        async with (
            Worker(tmp_path / "w", gc_policy=sources_only, sandbox="none") as worker,
            Solver(worker=worker) as solver,
        ):
            # 1: both steps run; the source's snapshot, idle once the job is
            # discarded, is pruned before solve() returns.
            async with await solver.solve(defn) as result:
                assert kinds(await worker.store.usage()) == ["exec"]
                assert await result.ref.sys.read_bytes("b.txt") == b"bee"
            assert runs.read_text() == "run\n"
            # 2: the exec's record and snapshot were kept: a cache hit, nothing
            # runs (the source's record went with its snapshot, and is not needed).
            async with await solver.solve(defn) as result:
                assert await result.ref.sys.read_bytes("b.txt") == b"bee"
                kept = result.ref.id
            assert runs.read_text() == "run\n"
            assert kinds(await worker.store.usage()) == ["exec"]
            # 3: a policy deleting everything unused: the result is in use while
            # the caller holds it, so it survives the solve's own GC.
            worker.gc_policy = (PrunePolicy(),)
            async with await solver.solve(defn) as result:
                assert result.ref.id == kept
                assert await result.ref.sys.read_bytes("b.txt") == b"bee"
            assert [info.id for info in await worker.store.usage()] == [kept]
            # Released, it goes at the next GC, and its record with it: the
            # next solve runs the exec again (and its GC cleans up after it).
            await worker.after_solve()
            assert await worker.store.usage() == []
            async with await solver.solve(defn) as result:
                assert result.ref.id != kept
                assert await result.ref.sys.read_bytes("b.txt") == b"bee"
                assert kinds(await worker.store.usage()) == ["exec"]
            assert runs.read_text() == "run\nrun\n"
