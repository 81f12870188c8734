"""The Python API behind ``solver du`` and ``solver prune``: ``disk_usage`` and
``prune`` in :mod:`solver.worker` (``docs/worker.md``, "Garbage collection")."""

from __future__ import annotations

from pathlib import Path

import pytest

from solver import SolveError
from solver.cache import CacheResult, SQLiteCacheStorage
from solver.worker import (
    DiskUsage,
    KindUsage,
    PrunePolicy,
    PruneReport,
    SnapshotRef,
    SnapshotStore,
    Worker,
    disk_usage,
    prune,
)

pytestmark = pytest.mark.anyio

NOW = 1_000_000.0
HOUR = 3600.0


class Clock:
    """The store's clock, set by the test (so that ages are exact)."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


async def commit(
    store: SnapshotStore, clock: Clock, kind: str | None, name: str, size: int, age: float
) -> SnapshotRef:
    """A snapshot of ``size`` bytes, last used ``age`` seconds before NOW; the
    caller owns the handle."""
    clock.now = NOW - age
    description = {"name": name} if kind is None else {"kind": kind, "name": name}
    async with await store.new_mutable(description) as mutable:
        (mutable.path / "data").write_bytes(b"x" * size)
        return await mutable.commit()


async def seed(root: Path) -> dict[str, str]:
    """Four snapshots under ``root``, one still in use while the store is open:
    returns name -> id. Least recently used first: src, compile, link, loose."""
    clock = Clock()
    async with SnapshotStore(root, clock=clock) as store:
        ids = {}
        for kind, name, size, age in [
            ("source.local", "src", 100, 24 * HOUR),
            ("exec", "compile", 300, 3 * HOUR),
            ("exec", "link", 200, 2 * HOUR),
            (None, "loose", 50, 1 * HOUR),
        ]:
            ref = await commit(store, clock, kind, name, size, age)
            ids[name] = ref.id
            await ref.release()
    return ids


async def test_disk_usage_of_a_root(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    ids = await seed(root)
    usage = await disk_usage(root)
    assert isinstance(usage, DiskUsage)
    assert [info.id for info in usage.entries] == [
        ids["src"], ids["compile"], ids["link"], ids["loose"]
    ]
    assert usage.snapshots == 4
    assert (usage.size, usage.in_use) == (650, 0)
    assert dict(usage.kinds) == {
        "": KindUsage(snapshots=1, size=50, in_use=0),
        "exec": KindUsage(snapshots=2, size=500, in_use=0),
        "source.local": KindUsage(snapshots=1, size=100, in_use=0),
    }
    assert list(usage.kinds) == ["", "exec", "source.local"]  # in name order
    assert isinstance(usage.free, int)
    with pytest.raises(TypeError):
        usage.kinds["x"] = KindUsage(0, 0, 0)  # type: ignore[index]
    # The root was opened for the call and closed again: it can be opened now.
    async with SnapshotStore(root) as store:
        assert len(await store.usage()) == 4


async def test_disk_usage_of_an_open_store_counts_what_is_in_use(tmp_path: Path) -> None:
    clock = Clock()
    free = 12345
    async with SnapshotStore(tmp_path / "s", clock=clock, free_space=lambda _: free) as store:
        held = await commit(store, clock, "exec", "held", 70, 0.0)
        loose = await commit(store, clock, "exec", "loose", 30, 0.0)
        await loose.release()
        usage = await disk_usage(store)
        assert (usage.size, usage.in_use, usage.free) == (100, 70, 12345)
        assert usage.kinds == {"exec": KindUsage(snapshots=2, size=100, in_use=70)}
        assert [info.in_use for info in usage.entries if info.id == held.id] == [True]
        # A store or worker is used as it is: still open afterwards.
        assert store.is_open
        await held.release()


async def test_free_space_that_cannot_be_measured_is_none(tmp_path: Path) -> None:
    def broken(_: Path) -> int:
        raise OSError("no statvfs here")

    async with SnapshotStore(tmp_path / "s", free_space=broken) as store:
        assert (await disk_usage(store)).free is None


async def test_prune_a_root_with_a_policy(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    ids = await seed(root)
    report = await prune(root, PrunePolicy(max_used_space=300))
    assert isinstance(report, PruneReport)
    # least recently used first, until at most 300 bytes are left
    assert [info.id for info in report.deleted] == [ids["src"], ids["compile"]]
    assert (report.freed, report.remaining) == (400, 250)
    report = await prune(root, [PrunePolicy(filters=("kind==exec",))])
    assert [info.id for info in report.deleted] == [ids["link"]]
    assert (report.freed, report.remaining) == (200, 50)
    usage = await disk_usage(root)
    assert [info.id for info in usage.entries] == [ids["loose"]]


async def test_prune_without_a_policy_deletes_every_unused_snapshot(tmp_path: Path) -> None:
    clock = Clock()
    async with Worker(tmp_path / "snapshots") as worker:
        held = await commit(worker.store, clock, "exec", "held", 70, 0.0)
        loose = await commit(worker.store, clock, "exec", "loose", 30, 0.0)
        await loose.release()
        report = await prune(worker)
        assert [info.id for info in report.deleted] == [loose.id]
        assert (report.freed, report.remaining) == (30, 70)
        assert worker.store.is_open
        await held.release()
        assert [info.id for info in (await prune(worker.store)).deleted] == [held.id]


async def test_prune_of_a_root_drops_the_persistent_cache_records(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    ids = await seed(root)
    storage = await SQLiteCacheStorage.open(root / "cache.db")
    try:
        # a record naming the snapshot, as a build would leave it
        await storage.add_result("key", CacheResult(ids["src"], NOW))
        assert await storage.result_ids() == [ids["src"]]
    finally:
        await storage.close()
    await prune(root, PrunePolicy(filters=(f"id=={ids['src']}",)))
    storage = await SQLiteCacheStorage.open(root / "cache.db")
    try:
        assert await storage.result_ids() == []
    finally:
        await storage.close()


async def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="made of PrunePolicy rules"):
        await prune(tmp_path / "never-opened", ["kind==exec"])  # type: ignore[list-item]
    assert not (tmp_path / "never-opened").exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(OSError):
        await disk_usage(afile / "snapshots")
    with pytest.raises(SolveError, match="not open"):
        await disk_usage(SnapshotStore(tmp_path / "closed"))
    async with SnapshotStore(tmp_path / "busy") as store:
        with pytest.raises(SolveError, match="already open in this process"):
            await disk_usage(store.root)
