"""Progress shows a step that waits for a slot of ``Worker(max_parallelism=N)``
(``solver build -j N``) as waiting (issue 21): a ``waiting`` event before its
``started``, which comes once the other step has ended; the plain and json
modes print it, the tty view shows it below the running steps."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from solver import ProgressEvent, Solver
from solver._progress import WAITING, current_wait, report_waiting
from solver.cli import main
from solver.cli._progress import PlainRenderer, TtyRenderer
from solver.testing import HandleTracker
from solver.worker import State, StepSlots, Worker, merge, run

pytestmark = pytest.mark.anyio


def step(name: str, gate: Path | None = None, together: Path | None = None) -> State:
    """A step that writes ``name``; with ``gate``, only once that host file exists;
    with ``together``, it marks itself started in that host directory and ends
    only once two steps have (it waits a minute at most)."""
    if gate is not None:
        until = f"os.path.exists({str(gate)!r})"
    elif together is not None:
        until = f"len(os.listdir({str(together)!r})) >= 2"
    else:
        until = "True"
    mark = f"pathlib.Path({str(together)!r}, {name!r}).touch()\n" if together else ""
    code = (
        "import os, pathlib, time\n"
        f"{mark}"
        "deadline = time.monotonic() + 60\n"
        f"while not ({until}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        f"pathlib.Path('{name}').write_text('x')\n"
    )
    return run([sys.executable, "-c", code], name=name)


def two_steps(gate: Path | None = None, together: Path | None = None) -> State:
    return merge([step("one", gate, together), step("two", gate, together)], name="both")


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host file that appears when a step reports that it waits for a slot: the
    gated steps end only then, so the step holding the slot is still running when
    the other asks for it (a 0.3 s step was a bet that it asked sooner)."""
    from solver.worker import _slots

    path = tmp_path / "gate"
    real = _slots.report_waiting

    def report_and_open() -> None:
        real()
        path.touch()

    monkeypatch.setattr(_slots, "report_waiting", report_and_open)
    return path


async def test_one_slot_two_steps_one_is_waiting_until_the_other_ends(
    tmp_path: Path, gate: Path, handle_tracker: HandleTracker
) -> None:
    events: list[ProgressEvent] = []
    async with (
        Worker(tmp_path / "w", sandbox="none", max_parallelism=1) as worker,
        Solver(worker=worker) as solver,
    ):
        job = solver.new_job()

        async def watch() -> None:
            async for ev in job.status():
                if ev.name in ("one", "two") and ev.status != "log":
                    events.append(ev)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                try:
                    async with await solver.solve(two_steps(gate).definition(), job=job):
                        pass
                finally:
                    await job.discard()
    seen = [(ev.name, ev.status) for ev in events]
    waited = [name for name, status in seen if status == WAITING]
    assert len(waited) == 1, seen  # one ran at once, the other waited
    late = waited[0]
    first = "two" if late == "one" else "one"
    # The waiting step is shown waiting until the first one ended, then runs.
    assert seen.index((late, "waiting")) < seen.index((first, "completed"))
    assert seen.index((first, "completed")) < seen.index((late, "started"))
    assert [s for n, s in seen if n == late] == ["waiting", "started", "completed"]
    assert [s for n, s in seen if n == first] == ["started", "completed"]


async def test_enough_slots_nothing_waits(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    """Two slots: the two steps run at once (each ends only once both have
    started) and neither reports waiting."""
    together = tmp_path / "started"
    together.mkdir()
    events: list[str] = []
    async with (
        Worker(tmp_path / "w", sandbox="none", max_parallelism=2) as worker,
        Solver(worker=worker) as solver,
    ):
        job = solver.new_job()

        async def watch() -> None:
            async for ev in job.status():
                events.append(ev.status)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                try:
                    async with await solver.solve(
                        two_steps(together=together).definition(), job=job
                    ):
                        pass
                finally:
                    await job.discard()
    assert sorted(os.listdir(together)) == ["one", "two"]
    assert "started" in events
    assert WAITING not in events


async def test_a_slot_reports_waiting_only_when_all_are_taken() -> None:
    slots = StepSlots(1)
    said: list[str] = []
    token = current_wait.set(lambda: said.append("waiting"))
    try:
        let_go = anyio.Event()

        async def hold(until: anyio.Event | None) -> None:
            async with slots.slot():
                if until is not None:
                    await until.wait()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(hold, let_go)
                await anyio.wait_all_tasks_blocked()
                assert said == []  # it found a free slot: no waiting
                assert slots.running == 1
                tg.start_soon(hold, None)
                await anyio.wait_all_tasks_blocked()
                assert said == ["waiting"]  # the second one found the slot taken
                assert slots.waiting == 1
                let_go.set()
        assert slots.running == 0
    finally:
        current_wait.reset(token)
    report_waiting()  # outside an acquire(): nothing happens
    assert said == ["waiting"]


def cli_build(
    tmp_path: Path, gate: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> list[str]:
    defn = tmp_path / "defn.json"
    data = two_steps(gate).definition().to_json()
    defn.write_text(data if isinstance(data, str) else data.decode())
    code = main(["build", "-j", "1", "--progress", mode, "--sandbox", "none",
                 "--cache-dir", str(tmp_path / f"cache-{mode}"), str(defn)])
    assert code == 0
    return capsys.readouterr().err.splitlines()


def test_the_plain_cli_output_shows_the_waiting_step(
    tmp_path: Path, gate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = cli_build(tmp_path, gate, "plain", capsys)
    steps = [line for line in lines if re.match(r"#\d+ \[(one|two)\] [A-Z]+", line)]
    waiting = [line for line in steps if line.endswith("WAITING")]
    assert len(waiting) == 1, lines
    number = waiting[0].split(" ")[0]
    mine = [line.split(" ", 2)[2] for line in steps if line.startswith(number + " ")]
    assert mine[0] == "WAITING"
    assert mine[1] == "STARTED"
    assert mine[2].startswith("DONE")
    # The other step was done before the waiting one started.
    other_done = next(i for i, line in enumerate(steps)
                      if not line.startswith(number + " ") and " DONE" in line)
    assert steps.index(waiting[0]) < other_done < steps.index(f"{waiting[0][:-7]}STARTED")


def test_the_json_progress_carries_the_waiting_event(
    tmp_path: Path, gate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [json.loads(line) for line in cli_build(tmp_path, gate, "json", capsys)
              if line.startswith("{")]
    waiting = [ev for ev in events if ev.get("status") == "waiting"]
    assert len(waiting) == 1
    assert waiting[0]["name"] in ("one", "two")
    assert set(waiting[0]) == {"vertex", "name", "status", "timestamp"}


def test_plain_renderer_line() -> None:
    out = io.StringIO()
    r = PlainRenderer(out)
    r.handle(ProgressEvent("a", "cc a.c", "started", 1.0))
    r.handle(ProgressEvent("b", "cc b.c", "waiting", 1.0))
    r.handle(ProgressEvent("a", "cc a.c", "completed", 2.0))
    r.handle(ProgressEvent("b", "cc b.c", "started", 2.0))
    r.handle(ProgressEvent("b", "cc b.c", "completed", 2.5))
    assert out.getvalue().splitlines() == [
        "#1 [cc a.c] STARTED",
        "#2 [cc b.c] WAITING",
        "#1 [cc a.c] DONE 1.0s",
        "#2 [cc b.c] STARTED",
        "#2 [cc b.c] DONE 0.5s",
    ]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tty_shows_waiting_steps_below_the_running_ones() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=60, no_color=True)
    clock = Clock(100.0)
    r = TtyRenderer(console=console, clock=clock)
    r.handle(ProgressEvent("b", "cc b.c", "waiting", 100.0))
    r.handle(ProgressEvent("a", "cc a.c", "started", 100.0))
    clock.now = 101.0
    assert [t.plain for t in r.running_lines(60)] == ["#2 [cc a.c] 1.0s", "#1 [cc b.c] waiting"]
    r.handle(ProgressEvent("a", "cc a.c", "completed", 101.0))
    r.handle(ProgressEvent("b", "cc b.c", "started", 101.0))
    clock.now = 101.5
    assert [t.plain for t in r.running_lines(60)] == ["#1 [cc b.c] 0.5s"]
    r.handle(ProgressEvent("c", "cc c.c", "waiting", 101.5))
    r.close()  # the stream ended while c waited: it never ran
    text = out.getvalue()
    assert "#3 [cc c.c] CANCELED" in text
    assert "1 step run, 0 cached, 0 failed, 2 canceled" in text
