"""Remote workers: ops run on a real Dask ``LocalCluster`` with worker processes.

One cluster (two worker processes, one thread each, on loopback) serves the module;
the tests that kill a worker or the whole cluster make their own. Each op counts
its runs in its worker process (:func:`solver.remote.worker_stats`), read with
``client.run``; a fault test kills a worker process by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from shared_cache_support import pg_server, shared_url

from solver import ProgressEvent, SharedCache, SolveError, Solver
from solver.remote import DaskCluster, RemoteClusterError, RemoteOp, worker_stats
from solver.testing import HandleTracker
from solver.worker import State, Worker, export_to_dir, run

__all__ = ["pg_server", "shared_url"]  # fixtures, re-exported for pytest

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _local_cluster(n: int = 2, **kwargs: Any) -> Any:
    return distributed.LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=40,
        **kwargs,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with _local_cluster(resources={"CPU": 2}) as c:
        yield c


@pytest.fixture
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


def executed(client: Any) -> int:
    return sum(stats["executed"] for stats in client.run(worker_stats).values())


def stats(client: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in client.run(worker_stats).values():
        for name, n in one.items():
            total[name] = total.get(name, 0) + n
    return total


@asynccontextmanager
async def remote_solver(
    root: Path, address: str, **worker_kwargs: Any
) -> AsyncIterator[tuple[Worker, DaskCluster, Solver]]:
    async with (
        Worker(root, **worker_kwargs) as worker,
        DaskCluster(address) as dask,
        Solver(worker=worker, cluster=dask) as s,
    ):
        yield worker, dask, s


async def files_of(s: Solver, state: State) -> dict[str, bytes]:
    async with await s.solve(state.definition()) as res:
        view = res.ref.sys
        return {st.path: await view.read_bytes(st.path) for st in await view.walk() if st.is_file}


def sh(script: str, *, root: State | None = None, name: str = "", **kw: Any) -> State:
    return run(["/bin/sh", "-c", script], root=root, name=name or script[:40], **kw)


def gated(gate: Path, script: str, **kw: Any) -> State:
    """A step that runs ``script`` once the host file ``gate`` exists (it waits a
    minute at most): the test decides when it ends, where a sleep of a second or
    two bet that the test's look came first. The workers must run it on the host
    (``sandbox="none"``)."""
    wait = (f"i=0; while [ ! -e {gate} ] && [ $i -lt 1200 ]; do sleep 0.05; "
            "i=$((i+1)); done; ")
    return sh(wait + script, **kw)


def wanted_twice(dask_scheduler: Any) -> list[str]:
    """The op tasks not yet done that two clients want."""
    return [
        str(key)
        for key, ts in dask_scheduler.tasks.items()
        if str(key).startswith("solver-op-") and ts.state != "memory" and len(ts.who_wants) >= 2
    ]


def example() -> State:
    words = State.inline({"words.txt": "pear\nfig\napple\nfig\n"})
    unique = run(
        ["/bin/sh", "-c", "/usr/bin/sort -u in/words.txt > sorted.txt"],
        mounts={"in": words},
        readonly=["in"],
        name="sort",
    )
    return run(["/bin/sh", "-c", "/usr/bin/wc -l < sorted.txt > count.txt"], root=unique,
               name="count")


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await anyio.to_thread.run_sync(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await anyio.sleep(0.05)


def processing(client: Any) -> dict[str, list[str]]:
    return {addr: [str(k) for k in keys] for addr, keys in client.processing().items()}


def running_op(client: Any) -> tuple[str, str] | None:
    for addr, keys in processing(client).items():
        for key in keys:
            if key.startswith("solver-op-"):
                return addr, key
    return None


# -- results --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_remote_build_matches_local_and_shares_cache_keys(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    state = example()
    async with Worker(tmp_path / "local") as w, Solver(worker=w) as s:
        local = await files_of(s, state)
    before = executed(client)
    async with remote_solver(tmp_path / "remote", cluster.scheduler_address) as (w, _, s):
        remote = await files_of(s, state)
        assert executed(client) - before == 2  # sort and count, on the cluster
        # exported trees are byte-identical too
        async with await s.solve(state.definition()) as res:
            await export_to_dir(res.ref, tmp_path / "out")
    assert remote == local == {"count.txt": b"3\n", "sorted.txt": b"apple\nfig\npear\n"}
    # the same store later, without the cluster: same cache keys, nothing runs
    async with Worker(tmp_path / "remote") as w, Solver(worker=w) as s:
        job = s.new_job()
        res = await job.build(state.definition().to_vertices(s.op_kinds))
        await res.release()
        await job.discard()
        statuses = [ev.status async for ev in job.status()]
        assert "started" not in statuses
        assert "cached" in statuses
        assert (tmp_path / "out" / "count.txt").read_bytes() == b"3\n"
    assert executed(client) - before == 2


@pytest.mark.anyio
async def test_progress_names_the_worker_and_op_output_comes_back(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    step = sh("echo hello from the step; echo made > out.txt", name="greet")
    addresses = set(client.run(os.getpid))
    async with remote_solver(tmp_path, cluster.scheduler_address) as (_, _, s):
        job = s.new_job()
        res = await job.build(step.definition().to_vertices(s.op_kinds))
        assert await res.sys.read_bytes("out.txt") == b"made\n"
        await res.release()
        await job.discard()
        events: list[ProgressEvent] = [ev async for ev in job.status()]
    logs = b"".join(ev.data for ev in events if ev.status == "log" and ev.name == "greet")
    assert b"hello from the step" in logs
    ran_on = [a for a in addresses if f"ran on Dask worker {a}".encode() in logs]
    assert len(ran_on) == 1


@pytest.mark.anyio
async def test_a_failing_step_fails_the_build_with_its_message(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    async with remote_solver(tmp_path, cluster.scheduler_address) as (_, _, s):
        with pytest.raises(SolveError) as info:
            await s.solve(sh("echo nope >&2; exit 3", name="fails").definition())
    assert "exit code 3" in str(info.value)
    assert "nope" in str(info.value)


@pytest.mark.anyio
async def test_inputs_an_op_made_stay_on_its_worker(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    # a 2 MB tree, then two steps over it: the second finds the first's output on
    # the worker that made it (Dask's locality) and unpacks nothing
    big = sh("head -c 2000000 /dev/zero > big.bin", name="big")
    mid = sh("wc -c < big.bin > size.txt", root=big, name="size")
    top = sh("cat size.txt > again.txt", root=mid, name="again")
    before = stats(client)
    async with remote_solver(tmp_path, cluster.scheduler_address) as (_, _, s):
        files = await files_of(s, top)
    after = stats(client)
    assert files["again.txt"] == b"2000000\n"
    assert after["executed"] - before["executed"] == 3
    assert after["unpacked"] - before["unpacked"] == 0
    assert after["reused"] - before["reused"] == 2


@pytest.mark.anyio
async def test_ops_with_secrets_run_locally(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    step = sh("cat /run/secrets/tok > out.txt", secrets=["tok"], name="secret")
    before = executed(client)
    async with remote_solver(
        tmp_path, cluster.scheduler_address, secrets={"tok": b"abc"}
    ) as (_, _, s):
        vertex = step.definition().to_vertices(s.op_kinds).vertex
        assert not isinstance(s.resolve_op(vertex, None), RemoteOp)  # type: ignore[arg-type]
        assert await files_of(s, step) == {"out.txt": b"abc"}
    assert executed(client) == before


# -- single-flight across clients ------------------------------------------------------


@pytest.mark.anyio
async def test_two_clients_asking_at_once_run_each_op_once(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    # Each op ends only once both clients want it: one client finishing an op
    # before the other asked for it would make the second run it again.
    gates = [tmp_path / "slow-gate", tmp_path / "top-gate"]
    slow = gated(gates[0], "echo one > one.txt", name="slow")
    top = gated(gates[1], "cat one.txt > two.txt", root=slow, name="top")
    before = executed(client)
    results: list[dict[str, bytes]] = []

    async def one(i: int) -> None:
        async with remote_solver(
            tmp_path / f"w{i}", cluster.scheduler_address, sandbox="none"
        ) as (_, _, s):
            results.append(await files_of(s, top))

    async def open_each_gate_when_both_want_it() -> None:
        seen: set[str] = set()
        for gate in gates:  # top is asked for only once slow is done
            await wait_until(lambda: bool(
                set(client.run_on_scheduler(wanted_twice)) - seen))
            seen.update(await anyio.to_thread.run_sync(client.run_on_scheduler, wanted_twice))
            gate.touch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_each_gate_when_both_want_it)
        tg.start_soon(one, 1)
        tg.start_soon(one, 2)
    assert results[0] == results[1] == {"one.txt": b"one\n", "two.txt": b"one\n"}
    assert executed(client) - before == 2


# -- cancellation and faults ----------------------------------------------------------


@pytest.mark.anyio
async def test_cancelling_the_build_cancels_the_dask_future(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    step = sh("sleep 60; echo late > late.txt", name="long")
    before = stats(client)
    async with remote_solver(tmp_path, cluster.scheduler_address) as (_, _, s):
        with anyio.CancelScope() as scope:

            async def cancel_when_running() -> None:
                await wait_until(lambda: running_op(client) is not None)
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_running)
                await s.solve(step.definition())
        assert scope.cancelled_caught

    def gone() -> bool:
        return running_op(client) is None and not any(
            str(k).startswith("solver-op-") for k in client.run_on_scheduler(_scheduler_keys)
        )

    await wait_until(gone)
    await wait_until(lambda: stats(client)["cancelled"] - before["cancelled"] == 1)
    assert stats(client)["executed"] == before["executed"]


def _scheduler_keys(dask_scheduler: Any) -> list[str]:
    return [str(k) for k in dask_scheduler.tasks]


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_worker_killed_mid_op_has_the_op_retried_elsewhere(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    gate = tmp_path / "gate"
    step = gated(gate, "echo survived > out.txt", name="victim")
    with _local_cluster() as c, distributed.Client(c.scheduler_address,
                                                   set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        pids: dict[str, int] = client.run(os.getpid)
        killed: list[int] = []

        async def kill_its_worker() -> None:
            await wait_until(lambda: running_op(client) is not None)
            found = running_op(client)
            assert found is not None
            killed.append(pids[found[0]])
            os.kill(pids[found[0]], signal.SIGKILL)
            gate.touch()  # the retried op (and the killed worker's orphaned step) end

        async with (
            remote_solver(tmp_path / "w", c.scheduler_address, sandbox="none") as (_, _, s),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(kill_its_worker)
            files = await files_of(s, step)
        assert files == {"out.txt": b"survived\n"}
        assert len(killed) == 1
        assert killed[0] not in client.run(os.getpid).values()  # it did die
        # the op ran to the end once, on a worker that lived (the killed one's
        # count died with it, and its nanny's new process ran nothing)
        assert executed(client) == 1


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_cluster_that_goes_away_gives_a_clear_error_and_leaks_nothing(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    step = sh("sleep 30; echo x > x.txt", name="orphan")
    c = _local_cluster(n=1)
    try:
        async with remote_solver(tmp_path, c.scheduler_address) as (worker, _, s):
            with distributed.Client(c.scheduler_address, set_as_default=False) as client:

                async def close_cluster() -> None:
                    await wait_until(lambda: running_op(client) is not None)
                    await anyio.to_thread.run_sync(c.close)

                failure: SolveError | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(close_cluster)
                    try:
                        await s.solve(step.definition())
                    except SolveError as exc:
                        failure = exc
            # nothing left in use, no blob left in the store's scratch area
            assert not [i.id for i in await worker.store.usage() if i.in_use]
            assert [p for p in os.listdir(worker.store.root / "tmp")
                    if p.startswith("blob-")] == []
    finally:
        c.close()
    assert failure is not None
    assert f"the Dask cluster at {c.scheduler_address} lost op orphan" in str(failure)


@pytest.mark.anyio
async def test_an_unreachable_scheduler_is_a_clear_error() -> None:
    with pytest.raises(RemoteClusterError, match="cannot reach the Dask scheduler at"):
        async with DaskCluster("tcp://127.0.0.1:9", timeout=1):
            pass


# -- resources --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cpu_hints_become_dask_resources(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    gate = tmp_path / "gate"
    step = gated(gate, "echo x > x.txt", cpus=2, memory=1 << 30, name="hinted")
    seen: list[dict[str, float] | None] = []

    def restrictions(dask_scheduler: Any) -> list[dict[str, float] | None]:
        return [
            ts.resource_restrictions
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith("solver-op-")
        ]

    async def look() -> None:
        await wait_until(lambda: running_op(client) is not None)
        seen.extend(client.run_on_scheduler(restrictions))
        gate.touch()

    async with remote_solver(
        tmp_path / "w", cluster.scheduler_address, sandbox="none"
    ) as (_, dask, s):
        # the workers declare CPU but not MEMORY: only CPU is asked for
        assert dask.resources({"CPU": 2.0, "MEMORY": 1.0}) == {"CPU": 2.0}
        async with anyio.create_task_group() as tg:
            tg.start_soon(look)
            assert await files_of(s, step) == {"x.txt": b"x\n"}
    assert seen == [{"CPU": 2.0}]


def test_cpus_is_validated() -> None:
    from solver.worker._exec import ExecPayloadError, _parse

    with pytest.raises(ExecPayloadError, match=r"limits\.cpus must be an integer > 0"):
        _parse(
            {"args": ["true"], "env": {}, "cwd": "", "mounts": [
                {"input": None, "dest": "", "readonly": False, "output": 0}],
             "limits": {"cpus": 0}}
        )


# -- the command line -------------------------------------------------------------------


def test_cli_build_on_a_cluster(tmp_path: Path, cluster: Any, client: Any) -> None:
    build = tmp_path / "build.py"
    build.write_text(
        "from solver.worker import run\n"
        "definition = run(['/bin/sh', '-c', 'echo remote > r.txt'], name='cli-step')\n"
    )
    before = executed(client)
    env = {**os.environ, "SOLVER_CLUSTER": cluster.scheduler_address}
    done = subprocess.run(
        [sys.executable, "-m", "solver", "build", str(build), "--cache-dir",
         str(tmp_path / "cache"), "-o", str(tmp_path / "out"), "--progress", "plain"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "r.txt").read_text() == "remote\n"
    assert "ran on Dask worker tcp://127.0.0.1:" in done.stderr
    assert executed(client) - before == 1
    bad = subprocess.run(
        [sys.executable, "-m", "solver", "build", str(build), "--cache-dir",
         str(tmp_path / "cache2"), "--cluster", "tcp://127.0.0.1:9"],
        env={k: v for k, v in os.environ.items() if k != "SOLVER_CLUSTER"},
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.anyio
async def test_attach_runs_a_workers_kinds_remotely_until_close(
    tmp_path: Path, cluster: Any, client: Any, handle_tracker: HandleTracker
) -> None:
    step = sh("echo attached > a.txt", name="attached")
    before = executed(client)
    async with Worker(tmp_path / "w") as worker:
        plain = worker.op_kinds.require("exec")
        async with DaskCluster(cluster.scheduler_address) as dask:
            dask.attach(worker)
            assert worker.op_kinds.require("exec") is not plain
            async with Solver(worker=worker) as s:
                assert await files_of(s, step) == {"a.txt": b"attached\n"}
        assert worker.op_kinds.require("exec") is plain  # put back at close
    assert executed(client) - before == 1


@pytest.mark.anyio
async def test_a_remote_build_publishes_to_the_shared_cache_for_another_machine(
    tmp_path: Path, cluster: Any, client: Any, shared_url: str, handle_tracker: HandleTracker
) -> None:
    """Cluster attached first, shared cache second: the shared lookup and lease wrap
    the remote run; a second machine without the cluster restores every step."""
    state = example()
    before = executed(client)
    async with (
        Worker(tmp_path / "a") as worker,
        DaskCluster(cluster.scheduler_address) as dask,
        SharedCache(shared_url) as shared,
    ):
        dask.attach(worker)
        shared.attach(worker)
        try:
            async with Solver(worker=worker) as s:
                first = await files_of(s, state)
        finally:
            await shared.detach()
        assert (shared.stats().executed, shared.stats().published) == (3, 3)  # with the source
    assert executed(client) - before == 2  # the two exec steps ran on the cluster
    async with Worker(tmp_path / "b") as worker, SharedCache(shared_url) as shared:
        shared.attach(worker)
        try:
            async with Solver(worker=worker) as s:
                second = await files_of(s, state)
        finally:
            await shared.detach()
        assert (shared.stats().restored, shared.stats().executed) == (3, 0)
    assert second == first
    assert executed(client) - before == 2


@pytest.mark.anyio
async def test_a_remote_op_cancelled_at_each_suspension_releases_everything(
    tmp_path: Path,
    cluster: Any,
    client: Any,
    handle_tracker: HandleTracker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every await of RemoteOp.exec (packing and scattering the input, submitting,
    waiting, unpacking the outputs): cancelled just before it, the build fails,
    no snapshot stays in use, no blob file is left, and every handle is released
    once (the tracker checks at teardown)."""
    from test_solve_checkpoints import MAX_SUSPENSIONS, cancel_at_suspension

    real = RemoteOp.exec
    at = {"n": 0}

    async def exec_cancelled_at(self: RemoteOp, inputs: Any) -> Any:
        value, _ = await cancel_at_suspension(at["n"], lambda: real(self, inputs))
        if value is None:
            raise SolveError(f"cancelled at suspension {at['n']}")
        return value

    monkeypatch.setattr(RemoteOp, "exec", exec_cancelled_at)
    step = run(
        ["/bin/sh", "-c", "cat in/in.txt > out.txt"],
        mounts={"in": State.inline({"in.txt": "input\n"})},
        readonly=["in"],
        name="cancelled",
    )
    async with remote_solver(tmp_path, cluster.scheduler_address) as (worker, _, s):
        for n in range(1, MAX_SUSPENSIONS):
            at["n"] = n
            try:
                files = await files_of(s, step)
            except SolveError as exc:
                assert f"cancelled at suspension {n}" in str(exc)  # noqa: PT017
                assert not [i.id for i in await worker.store.usage() if i.in_use]
                assert [p for p in os.listdir(worker.store.root / "tmp")
                        if p.startswith("blob-")] == []
                continue
            assert files == {"out.txt": b"input\n"}
            break
        else:
            raise AssertionError("the remote op never completed")
    assert n > 3  # it did suspend (pack, scatter, submit, wait, unpack)
