"""The shared cache in one process, on both backends, on a real PostgreSQL server:
workers with separate stores sharing a database, refused blobs, batched round
trips, read-only mode, prune and usage, credentials, and cancellation at every
suspension of a build that restores from the shared cache."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import anyio
import anyio.to_thread
import psycopg
import pytest
from shared_cache_support import PASSWORD, PgServer, pg_server, shared_url
from test_solve_checkpoints import cancel_at_suspension

from solver import (
    Definition,
    NodeOutput,
    SharedCache,
    SharedCacheError,
    SharedGCPolicy,
    SolveError,
    Solver,
    node,
)
from solver.cache import BlobDigestError, BlobStore, PostgresCacheStore, redact_url
from solver.cache._postgres import GC_LOCK
from solver.worker import State, Worker, merge, run

__all__ = ["pg_server", "shared_url"]  # fixtures, re-exported for pytest

pytestmark = pytest.mark.anyio


def uuid_graph() -> Definition:
    words = State.inline({"words.txt": "pear\nfig\napple\nfig\n"})
    unique = run(
        ["/bin/sh", "-c", "/usr/bin/sort -u in/words.txt > sorted.txt; "
         "cat /proc/sys/kernel/random/uuid > id.txt"],
        mounts={"in": words}, readonly=["in"], name="sort",
    )
    return run(["/bin/sh", "-c", "/usr/bin/wc -l < sorted.txt > count.txt"],
               root=unique, name="count").definition()


def wide_graph(n: int) -> Definition:
    """``n`` inline sources merged by one op: ``n + 1`` vertices, no exec."""
    return merge([State.inline({f"f{i}.txt": f"{i}\n"}) for i in range(n)],
                 name="all").definition()


async def build(
    root: Path, shared: SharedCache, defn: Definition, path: str = "id.txt"
) -> bytes:
    async with Worker(root) as worker:
        shared.attach(worker)
        try:
            async with Solver(worker=worker) as solver, await solver.solve(defn) as result:
                assert result.ref is not None
                return await result.ref.sys.read_bytes(path)
        finally:
            await shared.detach()


async def test_a_second_worker_restores_every_step(tmp_path: Path, shared_url: str) -> None:
    defn = uuid_graph()
    async with SharedCache(shared_url) as shared:
        first = await build(tmp_path / "a", shared, defn)
        st = shared.stats()
        assert (st.restored, st.executed, st.published) == (0, 3, 3)
    async with SharedCache(shared_url) as shared:
        second = await build(tmp_path / "b", shared, defn)
        st = shared.stats()
        assert (st.restored, st.executed, st.published) == (3, 0, 0)
    assert second == first


async def test_a_build_restored_from_the_shared_cache_counts_as_cached(
    tmp_path: Path, shared_url: str
) -> None:
    """Each restored step's completed event says cache_source="shared", and the
    build's summary counts it cached from there, not run."""
    defn = uuid_graph()
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "a", shared, defn)
    async with Worker(tmp_path / "b") as worker, SharedCache(shared_url) as shared:
        shared.attach(worker)
        try:
            async with Solver(worker=worker) as solver, await solver.solve(defn) as result:
                summary = result.summary
        finally:
            await shared.detach()
    assert summary is not None
    assert (summary.executed, summary.cached) == (0, 3)
    assert summary.cache_hits == {"shared": 3}
    assert {op.cache_source for op in summary.ops} == {"shared"}


async def test_a_blob_that_does_not_match_is_refused_reported_and_rebuilt(
    tmp_path: Path, shared_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    defn = uuid_graph()
    async with SharedCache(shared_url) as shared:
        first = await build(tmp_path / "a", shared, defn)
    # the sort step's output blob: flip its bytes behind the store's back
    with psycopg.connect(shared_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT o.blob FROM solver_outputs o JOIN solver_blobs b ON b.digest = o.blob "
            "JOIN solver_actions a ON a.action = o.action WHERE a.kind = 'exec' "
            "ORDER BY a.created_at LIMIT 1"
        ).fetchone()
        assert row is not None
        bad = row[0]
        conn.execute("UPDATE solver_blobs SET data = data || '\\x00'::bytea WHERE digest = %s",
                     (bad,))
    with caplog.at_level(logging.WARNING, logger="solver"):
        async with SharedCache(shared_url) as shared:
            second = await build(tmp_path / "b", shared, defn)
            st = shared.stats()
    # the source restored; sort's record refused, so sort ran here again, and
    # count above it (its input is a new tree: a new uuid); both published
    assert (st.restored, st.executed, st.published, st.refused) == (1, 2, 2, 1)
    assert second != first  # a new uuid: the refused output was not used
    messages = [r.getMessage() for r in caplog.records]
    refused = [m for m in messages if "does not match its digest" in m]
    assert len(refused) == 1
    assert bad in refused[0]
    with psycopg.connect(shared_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM solver_outputs WHERE blob = %s", (bad,)
        ).fetchone()
    assert left == (0,)  # the refused record is gone
    # a third machine gets the rebuilt, good record
    async with SharedCache(shared_url) as shared:
        third = await build(tmp_path / "c", shared, defn)
        assert shared.stats().refused == 0
        assert shared.stats().executed == 0
    assert third == second


async def test_a_warm_build_asks_in_batches(tmp_path: Path, shared_url: str) -> None:
    n = 200
    defn = wide_graph(n)
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "a", shared, defn, "f7.txt")
        assert shared.stats().published == n + 1
    async with SharedCache(shared_url, batch_size=50, blob_batch_count=50) as shared:
        opened = shared.store.queries
        assert await build(tmp_path / "b", shared, defn, "f7.txt") == b"7\n"
        st = shared.stats()
    assert (st.restored, st.executed) == (n + 1, 0)
    # ceil(201 / 50) record statements and ceil(201 / 50) blob statements
    assert st.queries - opened == 5 + 5, st


async def test_read_only_mode_publishes_nothing(tmp_path: Path, shared_url: str) -> None:
    defn = uuid_graph()
    async with SharedCache(shared_url) as shared:  # sets the schema up
        await build(tmp_path / "a", shared, wide_graph(2), "f1.txt")
    async with SharedCache(shared_url, mode="ro") as shared:
        await build(tmp_path / "b", shared, defn)
        st = shared.stats()
        assert (st.executed, st.published) == (3, 0)
    async with SharedCache(shared_url, mode="ro") as shared:
        await build(tmp_path / "c", shared, defn)
        assert shared.stats().restored == 0


async def test_prune_and_usage_of_the_shared_store(tmp_path: Path, shared_url: str) -> None:
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "a", shared, uuid_graph())
        usage = await shared.store.usage()
        assert (usage.records, usage.blobs) == (3, 3)
        assert usage.size > 0
        kept = await shared.store.prune(keep_duration=3600)
        assert (kept.records, kept.blobs, kept.freed) == (0, 0, 0)
        some = await shared.store.prune(max_used_space=usage.size - 1)
        assert some.records >= 1
        assert some.remaining <= usage.size - 1
        everything = await shared.store.prune()
        assert everything.remaining == 0
        assert (await shared.store.usage()).records == 0
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "b", shared, uuid_graph())
        assert shared.stats().executed == 3  # pruned: built again


async def test_credentials_never_appear(
    tmp_path: Path, pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = pg_server.url("no_such_database")
    assert PASSWORD in url
    assert PASSWORD not in redact_url(url)
    assert "solver:***@" in redact_url(url)
    assert redact_url("host=x password=hunter2 user=u") == "host=x password=*** user=u"
    with pytest.raises(SharedCacheError) as info:
        async with SharedCache(url, strict=True):
            pass
    assert PASSWORD not in str(info.value)
    assert "no_such_database" in str(info.value)
    with caplog.at_level(logging.DEBUG, logger="solver"):
        async with SharedCache(url) as shared:
            assert not shared.available
            assert PASSWORD not in repr(shared)
            await build(tmp_path / "a", shared, wide_graph(2), "f1.txt")
            assert shared.stats().executed == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    store = PostgresCacheStore(url)
    assert PASSWORD not in repr(store)


async def test_cancelled_anywhere_in_a_shared_restore_leaks_nothing(
    tmp_path: Path, shared_url: str
) -> None:
    defn = uuid_graph()
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "seed", shared, defn)

    async def attempt(n: int) -> bool:
        root = tmp_path / f"r{n}"
        async with Worker(root) as worker, SharedCache(shared_url) as shared:
            shared.attach(worker)
            async with Solver(worker=worker) as solver:

                async def solve() -> bytes:
                    async with await solver.solve(defn) as result:
                        assert result.ref is not None
                        return await result.ref.sys.read_bytes("count.txt")

                value, _ = await cancel_at_suspension(n, solve)
            infos = await worker.store.usage()
            assert [i.id for i in infos if i.in_use] == [], n
            return value is not None

    for n in range(1, 2000):
        if await attempt(n):
            assert n > 10  # the restore path really was cut at many points
            return
    raise AssertionError("the build never completed")




def advisory_locks(url: str) -> int:
    """The advisory locks (leases) of this test's database: the server's other
    databases belong to other tests, whose closed sessions the server may still
    be ending."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_cancelled_anywhere_in_a_cold_build_leaks_nothing(
    tmp_path: Path, shared_url: str
) -> None:
    """The lease, run and publish path: cancelled at every suspension in turn, no
    snapshot stays in use, no lease stays held, and every record in the store is
    whole (each names as many blobs as its op has outputs, all present)."""
    defn = wide_graph(2)

    async def attempt(n: int) -> bool:
        async with Worker(tmp_path / f"r{n}") as worker, SharedCache(shared_url) as shared:
            shared.attach(worker)
            async with Solver(worker=worker) as solver:

                async def solve() -> bytes:
                    async with await solver.solve(defn) as result:
                        assert result.ref is not None
                        return await result.ref.sys.read_bytes("f1.txt")

                value, _ = await cancel_at_suspension(n, solve)
            assert await anyio.to_thread.run_sync(advisory_locks, shared_url) == 0, n
            infos = await worker.store.usage()
            assert [i.id for i in infos if i.in_use] == [], n
        if value is None:
            # start the next attempt from an empty shared store: every attempt is cold
            with psycopg.connect(shared_url, autocommit=True) as conn:
                whole = conn.execute(
                    "SELECT count(*) FROM solver_actions a WHERE NOT EXISTS "
                    "(SELECT 1 FROM solver_outputs o WHERE o.action = a.action)"
                ).fetchone()
                assert whole == (0,), n
                conn.execute("DELETE FROM solver_actions")
                conn.execute("DELETE FROM solver_blobs")
        return value is not None

    for n in range(1, 2000):
        if await attempt(n):
            assert n > 10
            return
    raise AssertionError("the build never completed")


async def test_a_restored_input_keeps_its_blob_digest_in_a_later_process(
    tmp_path: Path, shared_url: str
) -> None:
    """A snapshot restored from a blob and loaded from the local cache by a later
    solver still counts as that blob (tar extraction cannot restore a symlink's
    mtime, so packing it again would give another digest and its consumers
    action keys no other machine uses)."""
    made = run(["/bin/sh", "-c", "echo hi > f; ln -s f link; "
                "cat /proc/sys/kernel/random/uuid > id.txt"],
               root=State.inline({"a.txt": "x"}), name="mk")
    first = run(["/bin/sh", "-c", "cat link > one.txt"], root=made, name="one").definition()
    second = run(["/bin/sh", "-c", "cat link > two.txt"], root=made, name="two").definition()
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "a", shared, first, "one.txt")
        await build(tmp_path / "a", shared, second, "two.txt")
        assert shared.stats().published == 4
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "b", shared, first, "one.txt")
        assert shared.stats().restored == 3
    assert (tmp_path / "b" / "shared-digests.db").is_file()
    async with SharedCache(shared_url) as shared:  # a later process on b
        assert await build(tmp_path / "b", shared, second, "two.txt") == b"hi\n"
        st = shared.stats()
    assert (st.restored, st.executed) == (1, 0)  # "two" from A; "mk" from b's local cache


def uuid_step(*, ignore_cache: bool = False) -> Definition:
    """One exec step writing a fresh uuid, optionally ignore-cache."""
    step = run(["/bin/sh", "-c", "cat /proc/sys/kernel/random/uuid > id.txt"],
               root=State.inline({"a.txt": "x"}), name="uuid")
    n = step.output.node
    flagged = node(n.op.kind, n.op.payload, inputs=n.inputs, name="uuid",
                   ignore_cache=ignore_cache)
    return State(NodeOutput(flagged, 0)).definition()


async def test_an_ignore_cache_step_bypasses_the_shared_cache(
    tmp_path: Path, shared_url: str
) -> None:
    async with SharedCache(shared_url) as shared:
        first = await build(tmp_path / "a", shared, uuid_step(ignore_cache=True))
        st = shared.stats()
        assert (st.executed, st.published) == (1, 1)  # only the inline source went through it
    async with SharedCache(shared_url) as shared:
        second = await build(tmp_path / "b", shared, uuid_step(ignore_cache=True))
        assert shared.stats().restored == 1
    assert second != first  # the step ran again


async def test_a_failing_step_publishes_nothing_and_lets_its_lease_go(
    tmp_path: Path, shared_url: str
) -> None:
    failing = run(["/bin/sh", "-c", "echo broken >&2; exit 3"],
                  root=State.inline({"a.txt": "x"}), name="broken").definition()
    for root in ("a", "b"):
        async with SharedCache(shared_url) as shared:
            with pytest.raises(SolveError, match="broken"):
                await build(tmp_path / root, shared, failing)
            st = shared.stats()
            assert st.executed == (2 if root == "a" else 1), st  # b restores the source
            assert st.published == (1 if root == "a" else 0), st
            assert await anyio.to_thread.run_sync(advisory_locks, shared_url) == 0
            assert (await shared.store.usage()).records == 1  # the source only


async def test_automatic_gc_runs_once_per_interval_across_machines(
    tmp_path: Path, shared_url: str
) -> None:
    with pytest.raises(ValueError, match="needs keep_duration or max_used_space"):
        SharedGCPolicy()
    policy = SharedGCPolicy(keep_duration=3600)
    async with SharedCache(shared_url, gc_policy=policy) as shared:
        await build(tmp_path / "a", shared, uuid_graph())
    assert shared.last_collection is not None  # the first collection ran: nothing old
    assert shared.last_collection.records == 0

    def age_records() -> None:
        with psycopg.connect(shared_url, autocommit=True) as conn:
            conn.execute("UPDATE solver_actions SET last_used = last_used - 7200")

    await anyio.to_thread.run_sync(age_records)
    async with SharedCache(shared_url, gc_policy=policy) as shared:
        pass
    assert shared.last_collection is None  # collected less than an hour ago
    with psycopg.connect(shared_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (GC_LOCK,))
        now = SharedGCPolicy(keep_duration=3600, interval=0)
        async with SharedCache(shared_url, gc_policy=now) as shared:
            pass
        assert shared.last_collection is None  # another machine is collecting
    async with SharedCache(shared_url, gc_policy=now) as shared:
        assert (await shared.store.usage()).records == 3
    assert shared.last_collection is not None
    assert (shared.last_collection.records, shared.last_collection.blobs) == (3, 3)
    async with SharedCache(shared_url, mode="ro", gc_policy=now) as shared:
        pass
    assert shared.last_collection is None  # read-only never collects


async def test_a_missing_driver_is_a_clear_shared_cache_error(
    monkeypatch: pytest.MonkeyPatch, pg_server: PgServer
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(SharedCacheError, match=r"pip install 'solver-engine\[shared\]'"):
        async with SharedCache(pg_server.url(), strict=True):
            pass


async def test_credentials_from_the_environment_or_a_password_file(
    tmp_path: Path, shared_url: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = shared_url.replace(f":{PASSWORD}@", "@")  # the server asks for a password
    assert PASSWORD not in url
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(SharedCacheError, match="password") as info:
        async with SharedCache(url, strict=True):
            pass
    assert PASSWORD not in str(info.value)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    async with SharedCache(url, strict=True) as shared:
        assert shared.available is False  # open, not attached
        assert (await shared.store.usage()).records >= 0
    monkeypatch.delenv("PGPASSWORD")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:solver:{PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    async with SharedCache(url, strict=True) as shared:
        await build(tmp_path / "a", shared, wide_graph(1), "f0.txt")
        assert shared.stats().published == 2
    # a wrong password in the environment: refused, and never shown
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.setenv("PGPASSWORD", "wrong-" + PASSWORD)
    with caplog.at_level(logging.DEBUG, logger="solver"):
        async with SharedCache(url) as shared:
            assert shared.store.display == url
        assert not shared.available
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "password authentication failed" in messages
    assert PASSWORD not in messages


async def test_two_builders_at_once_run_each_step_once(tmp_path: Path, shared_url: str) -> None:
    """Single-flight across two sessions of the server in one process (each
    ``SharedCache`` has its own connections, as two machines would)."""
    defn = uuid_graph()
    outputs: dict[str, bytes] = {}
    stats = []

    async def builder(name: str) -> None:
        async with SharedCache(shared_url) as shared:
            outputs[name] = await build(tmp_path / name, shared, defn)
            stats.append(shared.stats())

    async with anyio.create_task_group() as tg:
        tg.start_soon(builder, "a")
        tg.start_soon(builder, "b")
    assert outputs["a"] == outputs["b"]
    assert sum(st.executed for st in stats) == 3, stats
    assert sum(st.restored for st in stats) == 3, stats
    assert sum(st.published for st in stats) == 3, stats


async def test_the_postgres_store_is_a_blob_store(tmp_path: Path, shared_url: str) -> None:
    good, other = b"a blob\n", b"another blob\n"
    digests = {data: "sha256:" + hashlib.sha256(data).hexdigest() for data in (good, other)}
    (tmp_path / "good").write_bytes(good)
    store = PostgresCacheStore(shared_url)
    await store.open()
    try:
        assert isinstance(store, BlobStore)
        assert await store.missing([digests[good], digests[other]]) == set(digests.values())
        await store.put(digests[good], tmp_path / "good")
        await store.put(digests[good], tmp_path / "good")  # stored once
        assert await store.missing([digests[good], digests[other]]) == {digests[other]}
        with pytest.raises(BlobDigestError, match="does not match its digest"):
            await store.put(digests[other], tmp_path / "good")
        out = tmp_path / "out"
        out.mkdir()
        written, refused = await store.get_many([digests[good], digests[other]], out)
        assert refused == []
        assert list(written) == [digests[good]]
        assert written[digests[good]].read_bytes() == good
        assert (await store.usage()).blobs == 1
    finally:
        await store.close()


def test_expect_cached_passes_on_a_build_the_shared_cache_restored(
    tmp_path: Path, shared_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from solver.cli import main

    build_py = tmp_path / "build.py"
    build_py.write_text(
        "from solver.worker import State, run\n"
        "src = State.inline({'a.txt': 'hi\\n'})\n"
        "definition = run(['/bin/sh', '-c', 'cat a.txt a.txt > b.txt'], root=src, name='twice')\n"
    )
    common = ["build", str(build_py), "--progress", "plain", "--shared-cache", shared_url,
              "--expect-cached"]
    assert main([*common, "--cache-dir", str(tmp_path / "one")]) == 1  # cold: it ran
    capsys.readouterr()
    # another machine (an empty local cache): every step from the shared cache
    assert main([*common, "--cache-dir", str(tmp_path / "two")]) == 0
    err = capsys.readouterr().err
    assert "Summary: 2 ops: 0 run, 2 cached, 0 failed" in err.splitlines()
    assert "Cache hits: 2 shared" in err.splitlines()


async def test_only_the_restored_record_is_marked_used(tmp_path: Path, shared_url: str) -> None:
    """A vertex gathers a record per change of its inputs (a local source's
    files change, its definition does not); a warm build marks the one it
    restores used, not the stale ones, so that age-based pruning takes them."""
    tree = tmp_path / "tree"
    tree.mkdir()
    defn = run(["/bin/sh", "-c", "cat in/in.txt > out.txt"],
               mounts={"in": State.local(tree)}, readonly=["in"], name="cat").definition()
    async with SharedCache(shared_url) as shared:
        (tree / "in.txt").write_text("one\n")
        await build(tmp_path / "a", shared, defn, "out.txt")
        (tree / "in.txt").write_text("two\n")
        await build(tmp_path / "b", shared, defn, "out.txt")
    with psycopg.connect(shared_url, autocommit=True) as conn:
        conn.execute("UPDATE solver_actions SET last_used = 0")
        per_vertex = conn.execute(
            "SELECT kind, count(*) FROM solver_actions GROUP BY vertex, kind ORDER BY kind"
        ).fetchall()
    assert per_vertex == [("exec", 2), ("source.local", 2)]  # two records per vertex
    async with SharedCache(shared_url) as shared:
        assert await build(tmp_path / "c", shared, defn, "out.txt") == b"two\n"
        assert shared.stats().restored == 2
    with psycopg.connect(shared_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT last_used > 0, count(*) FROM solver_actions GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert rows == [(False, 2), (True, 2)]  # the two restored, not the two stale


async def test_fetched_and_packed_blobs_stay_inside_the_store(
    tmp_path: Path, shared_url: str
) -> None:
    """The blobs a build fetches or packs are written under the store's ``tmp/``
    (which the store empties when it opens, so a kill leaves nothing outside
    it), and removed when the cache detaches."""
    defn = uuid_graph()
    async with SharedCache(shared_url) as shared:
        await build(tmp_path / "a", shared, defn)
    async with Worker(tmp_path / "b") as worker, SharedCache(shared_url) as shared:
        shared.attach(worker)
        try:
            spool = shared._spool
            assert spool is not None
            assert spool.parent == worker.store.root / "tmp"
            async with Solver(worker=worker) as solver, await solver.solve(defn):
                assert shared.stats().restored == 3
        finally:
            await shared.detach()
        assert not spool.exists()
        assert os.listdir(worker.store.root / "tmp") == []


async def test_lease_waits_counts_only_a_lease_another_session_held(shared_url: str) -> None:
    """``lease_waits`` is the number of leases that had to wait for another
    session, not the number of second lookups that found a record."""
    action = "sha256:" + hashlib.sha256(b"lease-waits").hexdigest()
    async with SharedCache(shared_url) as holder, SharedCache(shared_url) as waiter:
        async with waiter.lease(action):
            pass  # free: no wait
        assert waiter.stats().lease_waits == 0
        took = anyio.Event()
        async with anyio.create_task_group() as tg:
            async with holder.lease(action):

                async def wait_for_it() -> None:
                    async with waiter.lease(action):
                        took.set()

                tg.start_soon(wait_for_it)
                # the waiter found the lease held (its on_wait ran) before the
                # holder lets go: a sleep here let a slow first try come after
                with anyio.fail_after(30):
                    while waiter.stats().lease_waits == 0:  # noqa: ASYNC110 - no event
                        await anyio.sleep(0.01)
                assert not took.is_set()
            await took.wait()
        assert waiter.stats().lease_waits == 1
        assert holder.stats().lease_waits == 0
