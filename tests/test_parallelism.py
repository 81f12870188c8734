"""``Worker(max_parallelism=N)`` and ``solver build -j N``: at most N exec steps at once.

Each step records, in its output, the wall-clock time it started and ended (read
from the host clock by the process itself), so the tests observe the overlap of
real processes; the steps are independent, so without a bound they all run at
once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from solver import Solver
from solver.cli._main import make_parser
from solver.testing import HandleTracker
from solver.worker import State, StepSlots, Worker, merge, run

pytestmark = pytest.mark.anyio

STEPS = 3


def timed_step(
    name: str, marks: Path | None = None, seconds: float = 0.3, together: int = 0
) -> State:
    """A step that writes ``<name>.t`` holding its start and end times (ns); with
    ``marks``, it also touches ``marks/<name>`` on the host when it starts, and
    with ``together`` it then waits (a minute at most) until ``together`` steps
    have started before it sleeps and ends."""
    touch = f"pathlib.Path({str(marks)!r}, {name!r}).touch()\n" if marks else ""
    wait = (
        "deadline = time.monotonic() + 60\n"
        f"while len(os.listdir({str(marks)!r})) < {together} and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
    ) if marks and together else ""
    code = (
        "import os, pathlib, time\n"
        "start = time.time_ns()\n"
        f"{touch}"
        f"{wait}"
        f"time.sleep({seconds})\n"
        f"pathlib.Path('{name}.t').write_text(f'{{start}} {{time.time_ns()}}')\n"
    )
    return run([sys.executable, "-c", code], name=name)


async def intervals(
    tmp_path: Path, jobs: int, seconds: float = 0.3, together: bool = False
) -> tuple[list[tuple[int, int]], list[str]]:
    """Build STEPS independent timed steps with ``max_parallelism=jobs``; their
    (start, end) times, and the job's started/completed events in order. With
    ``together``, no step ends before all have started."""
    marks = tmp_path / f"marks{jobs}" if together else None
    if marks is not None:
        marks.mkdir()
    defn = merge(
        [timed_step(f"s{i}", marks, seconds, STEPS if together else 0) for i in range(STEPS)],
        name="all",
    ).definition()
    events: list[str] = []
    async with (
        Worker(tmp_path / f"w{jobs}", sandbox="none", max_parallelism=jobs) as worker,
        Solver(worker=worker) as solver,
    ):
        job = solver.new_job()

        async def watch() -> None:
            async for ev in job.status():
                if ev.status in ("started", "completed") and ev.name.startswith("s"):
                    events.append(ev.status)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                async with await solver.solve(defn, job=job) as result:
                    assert result.ref is not None
                    view = result.ref.sys
                    times = []
                    for i in range(STEPS):
                        start, end = (await view.read_bytes(f"s{i}.t")).split()  # type: ignore[attr-defined]
                        times.append((int(start), int(end)))
            finally:
                await job.discard()
        assert worker.slots.running == 0
        assert worker.slots.waiting == 0
    return sorted(times), events


def overlapping(times: list[tuple[int, int]]) -> int:
    """The most intervals that hold one instant."""
    edges = sorted([(s, 1) for s, _ in times] + [(e, -1) for _, e in times])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def test_one_slot_runs_one_step_at_a_time(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    with anyio.fail_after(60):
        times, events = await intervals(tmp_path, 1)
    assert overlapping(times) == 1
    # A step waiting for the slot has not started: progress never shows two running.
    assert events == ["started", "completed"] * STEPS


async def test_without_a_tight_bound_the_steps_overlap(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """The same build with a slot per step: the steps do run at once (so the test
    above would see it if the bound did not hold). Each step waits until all have
    started (a 1 s sleep was a bet that a loaded machine started them within it),
    so a bound that let fewer run would keep the build waiting until the steps
    give up, and the times would not overlap."""
    with anyio.fail_after(60):
        times, events = await intervals(tmp_path, STEPS, seconds=0.1, together=True)
    assert overlapping(times) == STEPS
    assert events[:STEPS] == ["started"] * STEPS  # all started before one completed


async def test_two_slots_never_run_three(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    with anyio.fail_after(60):
        times, _ = await intervals(tmp_path, 2)
    assert overlapping(times) <= 2


async def test_cancel_while_waiting_for_a_slot_releases_everything(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """One slot: the first step runs (it signals the host when it starts), the
    second waits for the slot; cancelling the solve then releases every handle and
    every slot, and leaves no working directory behind."""
    marks = tmp_path / "marks"
    marks.mkdir()
    defn = merge(
        [timed_step(f"s{i}", marks, seconds=30) for i in range(2)], name="both"
    ).definition()
    async with (
        Worker(tmp_path / "w", sandbox="none", max_parallelism=1) as worker,
        Solver(worker=worker) as solver,
    ):
        with anyio.fail_after(30):
            with anyio.CancelScope() as scope:

                async def cancel_when_one_runs() -> None:
                    # A host process and a thread-made limiter state: nothing to
                    # wait on but their effects.
                    while not any(marks.iterdir()) or worker.slots.waiting == 0:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    assert worker.slots.running == 1
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_when_one_runs)
                    await solver.solve(defn)
            assert scope.cancelled_caught
        assert len(list(marks.iterdir())) == 1  # the waiting step never ran
        assert worker.slots.running == 0
        assert worker.slots.waiting == 0
        assert not any((worker.store.root / "tmp").iterdir())


def test_bad_bounds_are_refused() -> None:
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="max_parallelism must be an integer >= 1"):
            Worker(max_parallelism=bad)  # type: ignore[arg-type]
    assert StepSlots(3).total == 3
    assert repr(StepSlots(2)) == "<StepSlots 0/2 running, 0 waiting>"


def test_default_bound_is_the_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 7)
    assert Worker().slots.total == 7
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert Worker().slots.total == 1


def test_cli_jobs_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser()
    assert parser.parse_args(["build", "-j", "3", "f.json"]).jobs == 3
    assert parser.parse_args(["build", "--jobs", "1", "f.json"]).jobs == 1
    assert parser.parse_args(["build", "f.json"]).jobs is None  # the worker's default
    for bad in ("0", "x", "-2"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["build", "-j", bad, "f.json"])
        assert exc.value.code == 2
        assert f"must be a whole number >= 1, got {bad!r}" in capsys.readouterr().err
