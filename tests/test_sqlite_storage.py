"""SQLiteCacheStorage beyond the shared storage suite (which runs it from
test_cache_storage.py): persistence across opens, corrupt and unreadable files,
concurrency and cancellation, closing."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import anyio
import pytest

from solver import SolveError, SQLiteCacheStorage
from solver._cache import CacheInfoLink
from solver._digest import digest_of
from solver.cache import _sqlite as sqlitestorage
from solver.cache._storage import CacheResult

LINK = CacheInfoLink(0, 0, digest_of(b"op"), "sel")


async def fill(st: SQLiteCacheStorage) -> None:
    await st.add_result("a", CacheResult("ra", 1.5))
    await st.add_link("a", LINK, "b")
    await st.add_link("a", LINK._replace(selector=None), "c")
    await st.add_result("b", CacheResult("rb", 2.5))


@pytest.mark.anyio
async def test_the_graph_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    st = await SQLiteCacheStorage.open(path)
    await fill(st)
    cache_id = st.id
    await st.close()

    again = await SQLiteCacheStorage.open(path)
    try:
        assert again.id == cache_id
        assert again.path == path
        assert sorted(await again.walk()) == ["a", "b"]
        assert await again.walk_results("a") == [CacheResult("ra", 1.5)]
        assert await again.walk_links("a", LINK) == ["b"]
        assert await again.walk_links("a", LINK._replace(selector=None)) == ["c"]
        assert await again.walk_links("a", LINK._replace(selector="")) == []
        assert sorted(await again.result_ids()) == ["ra", "rb"]
        again._check()
        # the release cascade works on what an earlier process wrote
        await again.release_many(["ra", "rb"])
        assert await again.walk() == ["a"]  # a still links to c
        again._check()
    finally:
        await again.close()


@pytest.mark.anyio
async def test_a_result_stored_again_keeps_its_place(tmp_path: Path) -> None:
    st = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    try:
        await st.add_result("k", CacheResult("r1", 1.0))
        await st.add_result("k", CacheResult("r2", 2.0))
        await st.add_result("k", CacheResult("r1", 3.0))
        assert await st.walk_results("k") == [CacheResult("r1", 3.0), CacheResult("r2", 2.0)]
    finally:
        await st.close()


@pytest.mark.anyio
async def test_two_connections_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    one = await SQLiteCacheStorage.open(path)
    two = await SQLiteCacheStorage.open(path)
    try:
        assert one.id == two.id
        await fill(one)
        assert sorted(await two.walk()) == ["a", "b"]
        await two.release("rb")
        assert not await one.exists("b")
    finally:
        await one.close()
        await two.close()


@pytest.mark.anyio
async def test_concurrent_calls_are_serialised(tmp_path: Path) -> None:
    st = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    try:

        async def writer(n: int) -> None:
            for i in range(20):
                await st.add_link(f"w{n}", LINK, f"t{n}-{i}")
                await st.add_result(f"t{n}-{i}", CacheResult(f"r{n}-{i}", float(i)))

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(writer, n)
        assert len(await st.result_ids()) == 160
        assert len(await st.walk_links("w3", LINK)) == 20
        st._check()
    finally:
        await st.close()


@pytest.mark.anyio
async def test_a_cancelled_call_either_happened_or_did_not(tmp_path: Path) -> None:
    st = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await st.add_result("never", CacheResult("r", 1.0))
        assert scope.cancelled_caught
        assert not await st.exists("never")

        # cancelled at every moment of a burst of writes: each is whole or absent
        for delay in (0.0, 0.001, 0.003, 0.01):
            with anyio.move_on_after(delay):
                async with anyio.create_task_group() as tg:
                    for i in range(10):
                        tg.start_soon(st.add_link, f"src{delay}", LINK, f"t{i}")
            st._check()
            targets = await st.walk_links(f"src{delay}", LINK)
            assert len(targets) == len(set(targets)) <= 10
    finally:
        await st.close()


@pytest.mark.anyio
async def test_close(tmp_path: Path) -> None:
    st = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    assert "closed" not in repr(st)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await st.close()  # shielded: a cancelled caller still closes it
    assert st.closed
    await st.close()
    assert "closed" in repr(st)
    with pytest.raises(anyio.ClosedResourceError):
        await st.walk()
    with pytest.raises(anyio.ClosedResourceError):
        await st.add_result("k", CacheResult("r", 1.0))
    st._check()  # nothing to check once closed
    # closing folded the write-ahead log into the file
    assert not (tmp_path / "cache.db-wal").exists()


@pytest.mark.anyio
async def test_check_detects_a_bad_row(tmp_path: Path) -> None:
    st = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    try:
        st._check()
        conn = st._conn
        assert conn is not None
        conn.execute(
            "INSERT INTO links (source, input, output, digest, has_selector, selector, target) "
            "VALUES ('a', 0, 0, 'd', 0, 'stray', 'b')"
        )
        with pytest.raises(AssertionError, match="malformed links"):
            st._check()
    finally:
        await st.close()


# -- files that cannot be used ----------------------------------------------------------------


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


async def _reopen_fresh(path: Path, caplog: pytest.LogCaptureFixture) -> SQLiteCacheStorage:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="solver"):
        st = await SQLiteCacheStorage.open(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert f"the cache database {path} is unusable" in message
    assert "moved it to" in message
    assert "started an empty cache" in message
    assert await st.walk() == []
    st._check()
    await fill(st)  # and it works
    return st


@pytest.mark.anyio
async def test_garbage_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.db"
    garbage = b"this is not a database, it is garbage\n" * 200
    path.write_bytes(garbage)
    st = await _reopen_fresh(path, caplog)
    await st.close()
    (aside,) = _aside(path)
    assert aside.read_bytes() == garbage  # kept for whoever wants to look
    assert "not a database" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("keep", [0.5, 50])
async def test_a_truncated_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: float
) -> None:
    path = tmp_path / "cache.db"
    st = await SQLiteCacheStorage.open(path)
    for i in range(40):  # long IDs: many pages
        await st.add_link(f"source-{i}", LINK, f"target-{i}-" + "t" * 1500)
    await st.close()
    data = path.read_bytes()
    assert len(data) > 16 * 4096
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    st = await _reopen_fresh(path, caplog)
    await st.close()
    assert len(_aside(path)) == 1


@pytest.mark.anyio
async def test_a_database_of_a_newer_version_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.db"
    st = await SQLiteCacheStorage.open(path)
    await st.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    st = await _reopen_fresh(path, caplog)
    await st.close()
    assert "schema version 99" in caplog.text


@pytest.mark.anyio
async def test_a_stranger_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    st = await _reopen_fresh(path, caplog)
    await st.close()


@pytest.mark.anyio
async def test_an_empty_file_is_an_empty_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.db"
    path.write_bytes(b"")
    st = await SQLiteCacheStorage.open(path)
    await st.close()
    assert _aside(path) == []
    assert "unusable" not in caplog.text


@pytest.mark.anyio
async def test_a_busy_database_is_never_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cache.db"
    st = await SQLiteCacheStorage.open(path)
    await fill(st)
    await st.close()
    monkeypatch.setattr(sqlitestorage, "_BUSY_TIMEOUT_MS", 50)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
        with pytest.raises(SolveError, match=r"cannot open the cache database .* locked"):
            await SQLiteCacheStorage.open(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _aside(path) == []
    st = await SQLiteCacheStorage.open(path)
    assert sorted(await st.walk()) == ["a", "b"]
    await st.close()


@pytest.mark.anyio
async def test_a_directory_in_the_way_is_an_error_not_moved(tmp_path: Path) -> None:
    path = tmp_path / "cache.db"
    path.mkdir()
    with pytest.raises(SolveError, match="cannot open the cache database"):
        await SQLiteCacheStorage.open(path)
    assert path.is_dir()
    assert _aside(path) == []


@pytest.mark.anyio
async def test_the_wal_stays_small_while_the_store_is_open(tmp_path: Path) -> None:
    """Checkpointed every 256 pages and cut back after: SQLite's defaults left a
    4 MB WAL beside a 150 KB database after one cold build (issue 21)."""
    path = tmp_path / "cache.db"
    st = await SQLiteCacheStorage.open(path)
    try:
        wal = path.with_name("cache.db-wal")
        largest = 0
        for i in range(2000):  # one transaction each, as a build's saves are
            await st.add_result(f"key-{i}", CacheResult(f"result-{i}" * 20, float(i)))
            largest = max(largest, wal.stat().st_size)
        assert largest <= (256 + 16) * 4096
    finally:
        await st.close()


@pytest.mark.anyio
async def test_reads_with_the_connection_idle_still_checkpoint(tmp_path: Path) -> None:
    """A read that runs inline (the connection idle) is still a checkpoint: a
    cancelled caller sees the cancellation."""
    st = await SQLiteCacheStorage.open(tmp_path / "cache.db")
    try:
        await st.add_result("a", CacheResult("ra", 1.0))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await st.walk_results("a")
        assert scope.cancelled_caught
        assert await st.walk_results("a") == [CacheResult("ra", 1.0)]
    finally:
        await st.close()
