"""Many concurrent solves of one definition run each process once."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import State, Worker, run

pytestmark = pytest.mark.anyio


async def test_concurrent_solves_run_each_process_once(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()

    def step(name: str, root: State | None = None) -> State:
        code = (
            "import os, pathlib, sys, time\n"
            f"pathlib.Path({str(marks)!r}, {name!r} + '-' + str(os.getpid())).touch()\n"
            "time.sleep(0.2)\n"
            f"pathlib.Path('{name}.txt').write_text({name!r})\n"
        )
        return run([sys.executable, "-c", code], root=root, name=name)

    final = step("c", step("b", step("a", State.inline({"seed.txt": "x"}))))
    defn = final.definition()
    results: list[bytes] = []
    with anyio.fail_after(30):
        async with (
            Worker(tmp_path / "w", sandbox="none") as worker,
            Solver(op_kinds=worker.op_kinds) as s,
        ):

            async def solve_one() -> None:
                async with await s.solve(defn) as result:
                    assert result.ref is not None
                    results.append(await result.ref.sys.read_bytes("c.txt"))  # type: ignore[attr-defined]

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(solve_one)
    assert results == [b"c"] * 10
    ran = sorted(p.name.split("-")[0] for p in marks.iterdir())
    assert ran == ["a", "b", "c"]  # each process once, for ten concurrent solves
