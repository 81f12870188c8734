"""K jobs asking for one root share its build as a whole (issue 13, ``docs/performance.md``,
"Issue 13: K identical solves (session 6)").

What is proved here: K jobs building one graph at once leave two registrations
and two progress buffers' worth of records per vertex (the first job's, and one
hold's that every later job reads with a cursor), not K; each op runs once;
every job still sees every vertex's events, once each and in order, buffered or
live; a job cancelled among K leaves the others' build running (the first job as
well as a later one) and the last discard releases everything exactly once; K
cancelled jobs stop the work; a vertex object other than the hold's joins only
after a check that the hold has its whole graph (an ignore-cache root does not
join); a member that then builds an overlapping graph sees each event once;
K ``Solver.solve`` calls of one definition (new vertices each) share the hold
and each gets a summary of every op; a merge into another graph keeps the merge
target for a hold's members as for a job; a member's solve cancelled before each of
its suspensions in turn leaves the first solve's build and leaks nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
from harness import TestVertex, resolve_op, unwrap, vtx

from solver import Edge, Job, Solver
from solver.bridge._summary import job_events
from solver.testing import HandleTracker

pytestmark = pytest.mark.anyio

TIMEOUT = 10


def _graph(gate: anyio.Event | None = None, prefix: str = "g") -> list[TestVertex]:
    """A small lattice: two leaves, two middles each on both leaves, a root on
    both middles (the leaves wait for ``gate``); the root last."""

    async def wait() -> None:
        if gate is not None:
            await gate.wait()

    a = vtx(name=f"{prefix}-a", value="a", exec_pre_func=wait)
    b = vtx(name=f"{prefix}-b", value="b", exec_pre_func=wait)
    c = vtx(name=f"{prefix}-c", value="c", inputs=[Edge(a), Edge(b)])
    d = vtx(name=f"{prefix}-d", value="d", inputs=[Edge(a), Edge(b)])
    root = vtx(name=f"{prefix}-root", value="root", inputs=[Edge(c), Edge(d)])
    return [a, b, c, d, root]


def _registrations(s: Solver) -> int:
    return sum(len(st.jobs) for st in s._actives.values())


def _records(jobs: list[Job]) -> int:
    logs: dict[int, Any] = {}
    for job in jobs:
        logs[id(job._progress)] = job._progress
        for log in job._progress.shared:
            logs[id(log)] = log
    return sum(log.kept() for log in logs.values())


def _statuses(events: list[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ev in events:
        out.setdefault(ev.name, []).append(ev.status)
    return out


async def _build(job: Job, v: TestVertex, out: list[str]) -> None:
    res = await job.build(Edge(v))
    try:
        out.append(unwrap(res))
    finally:
        await res.release()


async def test_k_jobs_keep_one_hold_not_k_registrations(handle_tracker: HandleTracker) -> None:
    k = 16
    gate = anyio.Event()
    graph = _graph(gate)
    root = graph[-1]
    counters = root.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            jobs = [s.new_job() for _ in range(k)]
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(_build, job, root, out)
                await anyio.wait_all_tasks_blocked()
                # the first job and one hold: two registrations per vertex
                assert _registrations(s) == 2 * len(graph)
                members = [job for job in jobs if job._holds]
                assert len(members) == k - 1
                assert len({job._holds for job in members}) == 1
                assert not any(job._states for job in members)
                gate.set()
            assert out == ["root"] * k
            assert counters.exec == len(graph)
            one_job = 2 * len(graph)  # started and completed, each vertex
            assert _records(jobs) == 2 * one_job
            for job in jobs:
                statuses = _statuses(await job_events(job))
                assert statuses == {v.name: ["started", "completed"] for v in graph}
                assert s._state_jobs(root.digest) is not None
            assert s._state_jobs(root.digest) == {job.id for job in jobs}
            # a reader that stopped waiting (job_events cancels its wait) left
            # no wake-up in the shared log
            (log,) = {job._progress.shared for job in jobs if job._holds}
            assert not log[0]._waiters
            for job in jobs:
                await job.discard()
            assert not s._actives
            assert not s._holds
        assert not handle_tracker.live


async def test_a_job_that_comes_after_the_build_joins_the_hold(
    handle_tracker: HandleTracker,
) -> None:
    graph = _graph()
    root = graph[-1]
    counters = root.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            jobs = [s.new_job() for _ in range(4)]
            for job in jobs:
                await _build(job, root, out)
            assert counters.exec == len(graph)
            assert _registrations(s) == 2 * len(graph)
            assert out == ["root"] * 4
            for job in jobs:
                statuses = _statuses(await job_events(job))
                assert statuses == {v.name: ["started", "completed"] for v in graph}
            # a member building the root again adds nothing: it holds it all
            await _build(jobs[-1], root, out)
            assert _registrations(s) == 2 * len(graph)
            assert not jobs[-1]._states
            assert not jobs[-1]._progress.watching
            assert counters.exec == len(graph)
            # the first job and then every member but the last leave: all stays
            for job in jobs[:-1]:
                await job.discard()
                assert len(s._actives) == len(graph)
            assert s._state_jobs(root.digest) == {jobs[-1].id}
            await jobs[-1].discard()
            assert not s._actives
            assert not s._holds
        assert not handle_tracker.live


@pytest.mark.parametrize("which", ["first", "member"])
async def test_cancelling_one_of_k_leaves_the_others_build(
    handle_tracker: HandleTracker, which: str
) -> None:
    k = 6
    gate = anyio.Event()
    cancelled_work: list[str] = []

    async def wait() -> None:
        try:
            await gate.wait()
        except BaseException:
            cancelled_work.append("leaf")
            raise

    leaf = vtx(name="leaf", value="leaf", exec_pre_func=wait)
    root = vtx(name="root", value="root", inputs=[Edge(leaf)])
    counters = root.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            jobs = [s.new_job() for _ in range(k)]
            scopes = {job.id: anyio.CancelScope() for job in jobs}

            async def build(job: Job) -> None:
                with scopes[job.id]:
                    await _build(job, root, out)

            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(build, job)
                await anyio.wait_all_tasks_blocked()
                # (the backend picks the order the jobs start in)
                (first,) = (job for job in jobs if job._states)
                assert all(job._holds for job in jobs if job is not first)
                victim = first if which == "first" else next(j for j in jobs if j._holds)
                scope = scopes[victim.id]
                scope.cancel()
                await anyio.wait_all_tasks_blocked()
                await victim.discard()
                assert not victim._holds
                assert not victim._states
                assert s._state_jobs(root.digest) == {j.id for j in jobs if j is not victim}
                assert not cancelled_work
                gate.set()
            assert scope.cancelled_caught
            assert out == ["root"] * (k - 1)
            assert counters.exec == 2
            for job in jobs:
                if job is not victim:
                    statuses = _statuses(await job_events(job))
                    assert statuses == {"leaf": ["started", "completed"],
                                        "root": ["started", "completed"]}
                    await job.discard()
            assert not s._actives
            assert not s._holds
        assert not handle_tracker.live


async def test_cancelling_all_k_stops_the_work(handle_tracker: HandleTracker) -> None:
    k = 5
    cancelled_work: list[str] = []

    async def wait() -> None:
        try:
            await anyio.sleep_forever()
        except BaseException:
            cancelled_work.append("leaf")
            raise

    leaf = vtx(name="leaf", value="leaf", exec_pre_func=wait)
    root = vtx(name="root", value="root", inputs=[Edge(leaf)])
    counters = root.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            jobs = [s.new_job() for _ in range(k)]
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(_build, job, root, out)
                await anyio.wait_all_tasks_blocked()
                assert sum(1 for job in jobs if job._holds) == k - 1
                tg.cancel_scope.cancel()
            assert out == []
            assert cancelled_work == ["leaf"]
            assert counters.exec == 0
            for job in jobs:
                await job.discard()
            assert not s._actives
            assert not s._holds
        assert not handle_tracker.live


async def test_a_member_reads_live_events_from_the_shared_log(
    handle_tracker: HandleTracker,
) -> None:
    gate = anyio.Event()
    graph = _graph(gate)
    root = graph[-1]
    out: list[str] = []
    seen: dict[str, list[Any]] = {}

    async def read(job: Job) -> None:
        seen[job.id] = [ev async for ev in job.status()]

    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            jobs = [s.new_job() for _ in range(3)]
            async with anyio.create_task_group() as readers:
                for job in jobs:
                    readers.start_soon(read, job)
                async with anyio.create_task_group() as tg:
                    for job in jobs:
                        tg.start_soon(_build, job, root, out)
                    await anyio.wait_all_tasks_blocked()
                    assert sum(1 for job in jobs if job._holds) == 2
                    gate.set()
                assert out == ["root"] * 3
                await anyio.wait_all_tasks_blocked()
                for job in jobs:  # ends the readers
                    await job.discard()
            assert not s._actives
        for job in jobs:
            statuses = _statuses(seen[job.id])
            assert statuses == {v.name: ["started", "completed"] for v in graph}
            # inputs complete before their consumers start, in each job's stream
            names = [(ev.name, ev.status) for ev in seen[job.id]]
            assert names.index(("g-c", "completed")) < names.index(("g-root", "started"))
        assert not handle_tracker.live


async def test_another_object_of_the_root_joins_after_a_check(
    handle_tracker: HandleTracker,
) -> None:
    graph = _graph()
    root = graph[-1]
    counters = root.setup_call_counters()
    # the same vertices again as new objects (same names: the same digests)
    again = _graph()[-1]
    ignoring = vtx(name="g-root", value="root", inputs=list(again.inputs), ignore_cache=True)
    again_counters = again.setup_call_counters()
    out: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j1, j2, j3, j4 = (s.new_job() for _ in range(4))
            await _build(j1, root, out)
            await _build(j2, root, out)
            await _build(j3, again, out)
            assert j2._holds
            assert j3._holds == j2._holds
            assert counters.exec == len(graph)
            assert again_counters.exec == 0
            # an ignore-cache root is no part of the hold's graph: loaded apart,
            # and only it runs again
            ignoring_counters = ignoring.setup_call_counters()
            await _build(j4, ignoring, out)
            assert not j4._holds
            assert ignoring_counters.exec == 1
            assert out == ["root"] * 4
            for job in (j1, j2, j3, j4):
                await job.discard()
            assert not s._actives
            assert not s._holds
        assert not handle_tracker.live


async def test_a_member_building_an_overlapping_graph_sees_each_event_once(
    handle_tracker: HandleTracker,
) -> None:
    graph = _graph()
    root = graph[-1]
    other = vtx(name="other", value="other", inputs=[Edge(graph[2])])
    out: list[str] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j1, j2 = s.new_job(), s.new_job()
            await _build(j1, root, out)
            await _build(j2, root, out)
            assert j2._holds
            await _build(j2, other, out)
            events = await job_events(j2)
            counts = Counter((ev.name, ev.status) for ev in events)
            assert set(counts.values()) == {1}
            assert _statuses(events) == {
                **{v.name: ["started", "completed"] for v in graph},
                "other": ["started", "completed"],
            }
            # the member holds the new vertex itself, and the shared ones stay
            # with the hold: the first job's discard drops none of them
            await j1.discard()
            assert s._state_jobs(other.digest) == {j2.id}
            assert s._state_jobs(root.digest) == {j2.id}
            await j2.discard()
            assert not s._actives
        assert not handle_tracker.live


async def test_k_solves_of_one_definition_share_the_hold_and_each_gets_its_summary(
    handle_tracker: HandleTracker,
) -> None:
    """``Solver.solve`` makes new vertices for each solve: later jobs join the
    hold after the check, and each solve's summary (made from its job's events,
    the shared log's included) lists every op."""
    from frontend_support import Ops, text

    k = 4
    ops = Ops()
    defn = text("a", "b", "c", kind="test.gate")
    states: list[tuple[str, ...]] = []
    with anyio.fail_after(TIMEOUT):
        async with Solver(op_kinds=ops.registry()) as s:
            jobs = [s.new_job() for _ in range(k)]

            async def solve(job: Job) -> None:
                async with await s.solve(defn, job=job) as res:
                    assert res.summary is not None
                    assert res.ref is not None
                    assert str(res.ref.sys) == "abc"
                    states.append(tuple(op.state for op in res.summary.ops))

            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(solve, job)
                await ops.start_signal("c").wait()
                await anyio.wait_all_tasks_blocked()
                assert sum(1 for job in jobs if job._holds) == k - 1
                assert _registrations(s) == 2 * 3
                ops.gate("c").set()
            assert ops.execs == ["a", "b", "c"]
            assert len(states) == k
            assert all(len(st) == 3 for st in states)
            assert set(states) == {("executed", "executed", "executed")}
            for job in jobs:
                await job.discard()
            assert not s._actives
        assert not handle_tracker.live
        assert not ops.live_values()


async def test_a_member_solve_cancelled_at_each_suspension_leaves_the_build(
    handle_tracker: HandleTracker,
) -> None:
    """A second solve of one definition (it makes the hold and joins it) while the
    first runs, cancelled before each of its suspensions in turn: the first
    solve gets its result, each op runs once, and every value ends released
    exactly once."""
    from frontend_support import Ops, text
    from test_solve_checkpoints import assert_all_released, cancel_at_suspension, every_suspension

    joined: list[bool] = []

    async def run(n: int) -> bool:
        ops = Ops()
        with anyio.fail_after(TIMEOUT):
            async with Solver(op_kinds=ops.registry()) as s:
                first, member = s.new_job(), s.new_job()
                got: list[str] = []

                async def first_solve() -> None:
                    async with await s.solve(text("a", "b"), job=first) as res:
                        assert res.ref is not None
                        got.append(str(res.ref.sys))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(first_solve)
                    while not first._states:  # the first job loads first
                        await anyio.lowlevel.checkpoint()
                    result, count = await cancel_at_suspension(
                        n, lambda: s.solve(text("a", "b"), job=member)
                    )
                    joined.append(bool(member._holds))
                    if result is not None:
                        assert result.ref is not None
                        assert result.ref.sys == "ab"
                        await result.release()
                assert got == ["ab"]
                assert ops.execs == ["a", "b"]
                for job in (member, first):
                    await job.discard()
                assert not s._actives
                assert not s._holds
        assert_all_released(ops)
        return count < n

    last = await every_suspension(run)
    assert last > 3
    assert all(joined)  # the member joined the hold on every path tried


async def test_a_merge_target_stays_for_the_members_of_a_hold(
    handle_tracker: HandleTracker,
) -> None:
    """BuildKit's stale-edge merge with a hold: two jobs build v1 at once (the
    second makes the hold of v1's graph) and v1's edge merges into v0's, an
    equal key another job built: the hold is added to v0's graph as a job
    would be, so v0 outlives the job that built it and the first job, for the
    member; the member reads v0's events through the hold's log, as the first
    job reads them in its own buffer."""
    from harness import vtx_add, vtx_const

    dep0 = vtx_const(1, name="depV0")
    dep1 = vtx_const(1, name="depV1")
    v0 = vtx_add(2, name="v0", inputs=[Edge(dep0)])
    v1 = vtx_add(2, name="v1", inputs=[Edge(dep1)])
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j0 = s.new_job("job0")
            res = await j0.build(Edge(v0))
            await res.release()
            j1, j2 = s.new_job("job1"), s.new_job("job2")
            async with anyio.create_task_group() as tg:
                for job in (j1, j2):
                    tg.start_soon(_build, job, v1, [])
            (member,) = (job for job in (j1, j2) if job._holds)
            assert s._state_jobs(v0.digest) == {"job0", "job1", "job2"}
            assert s._state_jobs(dep0.digest) == {"job0", "job1", "job2"}
            # the member sees what the job that loaded v1 itself sees: the
            # merge target's events (v1 never ran)
            (direct,) = (job for job in (j1, j2) if job is not member)
            seen = [
                [(ev.name, ev.status) for ev in await job_events(job)] for job in (direct, member)
            ]
            assert seen[0] == seen[1]
            assert ("v0", "completed") in seen[1]
            for job in (j0, j1, j2):
                if job is not member:
                    await job.discard()
            assert s._state_jobs(v0.digest) == {member.id}
            assert s._state_jobs(dep0.digest) == {member.id}
            assert s._state_jobs(v1.digest) == {member.id}
            await member.discard()
            assert not s._actives
            assert not s._holds
        assert not handle_tracker.live


async def test_a_vertex_a_member_watches_itself_is_read_once_when_a_merge_adds_it(
    handle_tracker: HandleTracker,
) -> None:
    """A member builds another graph itself (v0) while its hold's graph (v1) is
    still in flight; v1's edge then merges into v0's (equal keys), which adds
    v0 to the hold and its log: the member stops watching v0 itself and skips
    the history the log replays, so it reads each of v0's events once, as the
    job that loaded v1 itself does."""
    from harness import vtx_add, vtx_const

    gate = anyio.Event()

    async def wait() -> None:
        await gate.wait()

    dep0 = vtx_const(1, name="depV0")
    dep1 = vtx_const(1, name="depV1", cache_pre_func=wait)
    v0 = vtx_add(2, name="v0", inputs=[Edge(dep0)])
    v1 = vtx_add(2, name="v1", inputs=[Edge(dep1)])
    with anyio.fail_after(TIMEOUT):
        async with Solver(resolve_op=resolve_op) as s:
            j1, member = s.new_job("job1"), s.new_job("member")
            async with anyio.create_task_group() as tg:
                tg.start_soon(_build, j1, v1, [])
                while not j1._states:  # j1 loads v1 first
                    await anyio.lowlevel.checkpoint()
                tg.start_soon(_build, member, v1, [])
                while not member._holds:
                    await anyio.lowlevel.checkpoint()
                await _build(member, v0, [])  # v1 waits for the gate meanwhile
                assert s._state_jobs(v0.digest) == {"member"}
                assert member._progress.watching == {v0.digest, dep0.digest}
                gate.set()
            # the merge added the hold (and j1) to v0's graph
            assert s._state_jobs(v0.digest) == {"job1", "member"}
            assert not member._progress.watching
            seen = {
                job.id: Counter((ev.name, ev.status) for ev in await job_events(job))
                for job in (j1, member)
            }
            assert seen["member"] == seen["job1"]
            assert seen["member"][("v0", "completed")] == 1
            assert set(seen["member"].values()) == {1}
            for job in (j1, member):
                await job.discard()
            assert not s._actives
            (log,) = {*member._progress.shared}
            assert not log.mixed
        assert not handle_tracker.live
