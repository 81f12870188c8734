"""The worker's persistent cache: reuse across restarts, snapshots deleted while
down or while open, results that cannot persist, crash safety (SIGKILL), and
several processes sharing one cache directory."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from persistence_support import SnapOps, chain, solve_text

from solver import Definition, InMemoryCacheManager, KeyedCacheManager, SolveError, Solver, node
from solver.cache._sqlite import SQLiteCacheStorage
from solver.worker import SnapshotStore, State, Worker, run
from solver.worker._cacheresults import CACHE_DB_NAME, SnapshotResultStorage

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "persistence_support.py"


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def storage_of(worker: Worker) -> SQLiteCacheStorage:
    storage = worker.cache.storage
    assert isinstance(storage, SQLiteCacheStorage)
    return storage


async def referenced(worker: Worker) -> set[str]:
    """The snapshot ids the worker's cache records point at."""
    return set(await storage_of(worker).result_ids())


class Sighting(logging.Handler):
    """Sets an event when a record containing ``text`` is logged (and counts them)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.count = 0
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.count += 1
            self.seen.set()


@pytest.fixture
def sighting() -> Iterator[Sighting]:
    handler = Sighting("waiting for the cache lock")
    logger = logging.getLogger("solver")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# -- the wiring ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_worker_opens_its_cache_beside_the_store(tmp_path: Path) -> None:
    worker = Worker(tmp_path / "root")
    with pytest.raises(SolveError, match="is not open"):
        worker.cache  # noqa: B018
    async with worker:
        cache = worker.cache
        assert isinstance(cache, KeyedCacheManager)
        assert isinstance(cache.results, SnapshotResultStorage)
        assert storage_of(worker).path == tmp_path / "root" / CACHE_DB_NAME
        first_id = cache.id
    assert storage_of(worker).closed
    async with Worker(tmp_path / "root") as again:
        assert again.cache.id == first_id  # the same cache in every process


@pytest.mark.anyio
async def test_solver_with_a_worker_uses_its_cache_and_leaves_it_open(tmp_path: Path) -> None:
    async with Worker(tmp_path / "root") as worker:
        ops = SnapOps()
        ops.register(worker)
        async with Solver(worker=worker) as solver:
            assert solver.default_cache is worker.cache
            assert solver.op_kinds is worker.op_kinds
            assert await solve_text(solver, chain("a", "b")) == "ab"
        # the worker and its cache are the caller's: still usable
        assert worker.store.is_open
        assert len(await referenced(worker)) == 2
        async with Solver(worker=worker) as solver:
            assert await solve_text(solver, chain("a", "b")) == "ab"
        assert ops.execs == ["a", "b"]


@pytest.mark.anyio
async def test_bare_solver_keeps_an_in_memory_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOLVER_CACHE_DIR", str(tmp_path / "cache"))
    async with Solver() as solver:
        assert isinstance(solver.default_cache, InMemoryCacheManager)


@pytest.mark.anyio
async def test_solver_needs_an_open_worker(tmp_path: Path) -> None:
    with pytest.raises(SolveError, match="is not open"):
        Solver(worker=Worker(tmp_path / "root"))


@pytest.mark.anyio
async def test_after_solve_runs_after_every_solve_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    class Probe(Worker):
        async def after_solve(self) -> None:
            calls.append("after")
            if len(calls) == 2:
                raise RuntimeError("gc broke")
            await super().after_solve()

    async with Probe(tmp_path / "root") as worker:
        SnapOps().register(worker)
        async with Solver(worker=worker) as solver:
            assert await solve_text(solver, chain("a")) == "a"
            assert await solve_text(solver, chain("a")) == "a"  # after_solve raises
            with pytest.raises(SolveError):
                await solver.solve(Definition.of(node("no.such.kind", {})))
            assert calls == ["after", "after"]  # a request refused before solving
            with pytest.raises(SolveError, match="told to fail"):
                await solver.solve(Definition.of(node("test.fail", {"text": "told to fail"})))
    assert calls == ["after", "after", "after"]
    assert "gc broke" in caplog.text


# -- restarts ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_restart_executes_nothing_that_was_built(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ops = SnapOps()
    async with Worker(root) as worker, Solver(worker=worker) as solver:
        ops.register(worker)
        assert await solve_text(solver, chain("a", "b", "c")) == "abc"
    assert ops.execs == ["a", "b", "c"]

    ops2 = SnapOps()
    async with Worker(root) as worker, Solver(worker=worker) as solver:
        ops2.register(worker)
        job = solver.new_job()
        try:
            async with await solver.solve(chain("a", "b", "c"), job=job) as result:
                assert result.ref is not None
                assert await result.ref.sys.read_bytes("out.txt") == b"abc"
        finally:
            await job.discard()  # ends the status stream
        statuses = [ev.status async for ev in job.status()]
        # a longer chain reuses the prefix
        assert await solve_text(solver, chain("a", "b", "c", "d")) == "abcd"
    assert ops2.execs == ["d"]
    assert statuses == ["cached"] * 3, statuses


def test_a_second_process_executes_nothing(tmp_path: Path) -> None:
    root, marker = tmp_path / "root", tmp_path / "marker"
    for _ in range(2):
        r = subprocess.run(
            [PY, str(SUPPORT), "build", str(root), str(marker), "x", "y"],
            env=child_env(),
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().strip() == "xy"
    assert marker.read_text().split() == ["x", "y"]  # executed once, by the first


def test_cli_build_twice_runs_every_step_once(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    src = State.inline({"a.txt": "hello"}).with_name("src")
    step = run(["sh", "-c", f"echo x >> '{marker}'; echo b > b.txt"], root=src, name="step")
    defn = tmp_path / "graph.json"
    defn.write_text(step.definition().to_json())
    # the step counts its runs in a host file: run it on the host
    cmd = [PY, "-m", "solver", "build", str(defn), "--progress", "plain", "--sandbox", "none",
           "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    first = subprocess.run(cmd, env=child_env(), capture_output=True, timeout=60)
    assert first.returncode == 0, first.stderr.decode()
    second = subprocess.run(cmd, env=child_env(), capture_output=True, timeout=60)
    assert second.returncode == 0, second.stderr.decode()
    assert marker.read_text() == "x\n"
    lines = [line for line in second.stderr.decode().splitlines() if line.startswith("#")]
    assert lines
    assert all(line.endswith("CACHED") for line in lines), lines


# -- snapshots that go away ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_snapshot_deleted_while_down_is_a_clean_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    async with Worker(root) as worker, Solver(worker=worker) as solver:
        SnapOps().register(worker)
        assert await solve_text(solver, chain("a", "b")) == "ab"
        before = await referenced(worker)
    # while no worker runs, the final snapshot goes (someone prunes the store)
    async with SnapshotStore(root) as store:
        infos = {info.description.get("text"): info.id for info in await store.usage()}
        await store.delete(infos["b"])
    caplog.set_level(logging.INFO, logger="solver")
    ops = SnapOps()
    async with Worker(root) as worker:
        # released at open, through the cascade
        assert await referenced(worker) == before - {infos["b"]}
        assert "released 1 cache record(s)" in caplog.text
        storage_of(worker)._check()
        ops.register(worker)
        async with Solver(worker=worker) as solver:
            assert await solve_text(solver, chain("a", "b")) == "ab"
    assert ops.execs == ["b"]  # only the missing step ran again


@pytest.mark.anyio
async def test_records_of_snapshots_pruned_while_open_go_at_once(tmp_path: Path) -> None:
    ops = SnapOps()
    async with Worker(tmp_path / "root") as worker, Solver(worker=worker) as solver:
        ops.register(worker)
        assert await solve_text(solver, chain("a", "b")) == "ab"
        assert len(await referenced(worker)) == 2
        deleted = await worker.store.prune()
        assert len(deleted) == 2
        assert await referenced(worker) == set()
        assert await storage_of(worker).walk() == []  # the cascade emptied every key
        assert await solve_text(solver, chain("a", "b")) == "ab"
        assert ops.execs == ["a", "b", "a", "b"]


@pytest.mark.anyio
async def test_a_load_racing_a_deletion_is_a_miss(tmp_path: Path) -> None:
    async with Worker(tmp_path / "root") as worker:
        SnapOps().register(worker)
        results = worker.cache.results
        async with Solver(worker=worker) as solver:
            assert await solve_text(solver, chain("a")) == "a"
        (sid,) = await referenced(worker)
        # the snapshot vanishes behind the listener's back: a load is a NotFoundError
        # (a cache miss for the solver), never another error
        from solver.cache._storage import CacheResult, NotFoundError

        await worker.store.delete(sid)
        with pytest.raises(NotFoundError):
            await results.load(CacheResult(sid, 1.0))
        assert not await results.exists(sid)


@pytest.mark.anyio
async def test_results_that_are_not_snapshots_live_for_the_process(tmp_path: Path) -> None:
    root = tmp_path / "root"
    defn = Definition.of(node("test.value", {"text": "v"}))
    ops = SnapOps()
    async with Worker(root) as worker, Solver(worker=worker) as solver:
        ops.register(worker)
        for _ in range(2):
            async with await solver.solve(defn) as result:
                assert result.ref is not None
                assert result.ref.sys == "v"
        assert ops.execs == ["v"]  # the second solve hit the in-memory result
        assert len(await referenced(worker)) == 1
    ops2 = SnapOps()
    async with Worker(root) as worker, Solver(worker=worker) as solver:
        assert await referenced(worker) == set()  # released at open
        ops2.register(worker)
        async with await solver.solve(defn) as result:
            assert result.ref is not None
            assert result.ref.sys == "v"
    assert ops2.execs == ["v"]


# -- sharing one cache directory ------------------------------------------------------------


def _hold_lock(root: Path) -> subprocess.Popen[str]:
    """A child that holds the root's lock until a line arrives on its stdin."""
    root.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(root / 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "locked\n"
    return child


def _let_go(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    child.wait(timeout=30)


@pytest.mark.anyio
async def test_a_root_held_by_another_process_is_waited_for(
    tmp_path: Path, sighting: Sighting
) -> None:
    root = tmp_path / "root"
    child = _hold_lock(root)
    try:
        with pytest.raises(SolveError, match="already open in another process"):
            await Worker(root, lock_timeout=0).open()
        with pytest.raises(SolveError, match=r"gave up after 0.05 s waiting for the lock"):
            await Worker(root, lock_timeout=0.05).open()
        # without a timeout the wait is cancellable, and leaves the worker unopened
        waiting = Worker(root)
        with anyio.move_on_after(0.05) as scope:
            await waiting.open()
        assert scope.cancelled_caught
        assert not waiting.store.is_open
        # ... and ends when the other process lets go (a fresh event: the waits
        # above already set the first one, and letting go before this worker
        # has tried would make it open without waiting)
        sighting.count = 0
        sighting.seen = anyio.Event()
        worker = Worker(root)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.open)
            await sighting.seen.wait()
            await anyio.to_thread.run_sync(_let_go, child)
        try:
            SnapOps().register(worker)
            async with Solver(worker=worker) as solver:
                assert await solve_text(solver, chain("a")) == "a"
        finally:
            await worker.close()
        assert sighting.count == 1  # logged once, however long the wait
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.anyio
async def test_a_second_open_in_this_process_fails_at_once(tmp_path: Path) -> None:
    async with Worker(tmp_path / "root"):
        with pytest.raises(SolveError, match="already open in this process"):
            await Worker(tmp_path / "root").open()


@pytest.mark.slow
def test_two_processes_sharing_a_cache_directory(tmp_path: Path) -> None:
    root, marker = tmp_path / "root", tmp_path / "marker"
    texts = [f"s{i}" for i in range(6)]
    children = [
        subprocess.Popen(
            [PY, str(SUPPORT), "build", str(root), str(marker), *texts],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()
        assert out.decode().strip() == "".join(texts)
    # one of them built everything, the others waited for the lock and hit the cache
    assert sorted(marker.read_text().split()) == texts


# -- crash safety -----------------------------------------------------------------------------

CRASH_ROUNDS = 30


@pytest.mark.slow
@pytest.mark.anyio
async def test_sigkill_while_writing_never_breaks_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    rng = random.Random(20240607)
    caplog.set_level(logging.INFO, logger="solver")
    orphans_seen = released_at_open = 0
    for round in range(CRASH_ROUNDS):
        async with await anyio.open_process(
            [PY, str(SUPPORT), "crash-loop", str(root), str(round)],
            env=child_env(),
            stderr=subprocess.DEVNULL,
        ) as child:
            assert child.stdout is not None
            seen = b""
            while b"tick" not in seen:
                seen += await child.stdout.receive()
            # kill it at a random moment of its next solves
            await anyio.sleep(rng.uniform(0, 0.25))
            child.send_signal(signal.SIGKILL)
            assert await child.wait() == -signal.SIGKILL

        caplog.clear()
        async with Worker(root) as worker:
            assert "unusable" not in caplog.text  # the database was never corrupted
            if "cache record(s) whose snapshots are gone" in caplog.text:
                released_at_open += 1
            storage = storage_of(worker)
            storage._check()
            worker.store._check()
            records = await referenced(worker)
            usage = await worker.store.usage()
            on_disk = {info.id for info in usage}
            assert records <= on_disk, "a record points at a missing snapshot"
            assert not any(info.in_use for info in usage)
            # a snapshot no record holds is unused, so a prune takes it
            orphans = on_disk - records
            orphans_seen += len(orphans)
            if orphans:
                pruned = await worker.store.prune(keep=lambda info, kept=records: info.id in kept)
                assert set(pruned) == orphans
            SnapOps().register(worker)
            async with Solver(worker=worker) as solver:
                assert await solve_text(solver, chain("base", "mid")) == "basemid"
                assert await solve_text(solver, chain("base", "mid", "x")) == "basemidx"
            storage._check()
            assert await referenced(worker) <= {info.id for info in await worker.store.usage()}
    print(
        f"{CRASH_ROUNDS} SIGKILL rounds: {orphans_seen} orphan snapshots pruned, "
        f"records released at open in {released_at_open} rounds"
    )
