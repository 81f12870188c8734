"""The shipped examples run: examples/build.py compiles, links and runs its C
program (in process, as ``python examples/build.py`` and through ``solver build
--output``), and its second build comes from the cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import SnapshotView, Worker

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# What examples/build.py's program prints, written out here rather than taken
# from the example, so that a wrong program cannot agree with itself.
TABLE = """\
 n  n^2  n^3  fib
 1    1    1    1
 2    4    8    1
 3    9   27    2
 4   16   64    3
 5   25  125    5
 6   36  216    8
 7   49  343   13
 8   64  512   21
 9   81  729   34
10  100 1000   55
"""

# sources, mkdir out, mkdir bin, three compiles, collect objects, link, run
BUILD_STEPS = 9

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None, reason="examples/build.py needs a C compiler: no cc on PATH"
)


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_in_tree(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the repository root, as the README does, with the
    snapshot store in ``tmp_path`` and this tree's package first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, SOLVER_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=180, check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@needs_cc
@pytest.mark.anyio
async def test_build_example(
    tmp_path: Path, handle_tracker: HandleTracker, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load("build")
    assert example.EXPECTED_OUTPUT == TABLE
    defn = example.graph().definition()
    with anyio.fail_after(120):
        async with Worker(tmp_path / "w") as worker, Solver(op_kinds=worker.op_kinds) as s:
            first = await s.solve(defn)
            assert first.ref is not None
            view = first.ref.sys
            assert isinstance(view, SnapshotView)
            assert (await view.read_bytes("table.txt")).decode() == TABLE
            binary = await view.stat("bin/app")
            assert binary.is_file
            assert binary.mode & 0o111  # executable
            assert [e.path for e in await view.read_dir()] == ["bin", "table.txt"]

            # Built again in a job of our own to see its progress: nothing runs,
            # every step is reported as cached, and the result is the same snapshot.
            job = s.new_job()
            again = await s.solve(defn, job=job)
            await job.discard()
            statuses = [ev.status async for ev in job.status()]
            assert "completed" not in statuses
            assert statuses.count("cached") == BUILD_STEPS
            assert again.ref is not None
            assert again.ref.id == first.ref.id
            await again.release()
            await first.release()

            # The example's own counting, from the same progress events.
            assert await example.build_once(s, defn, "third", False) == TABLE
    out = capsys.readouterr().out
    assert f"0 steps ran, {BUILD_STEPS} came from the cache" in out


@needs_cc
def test_build_example_script(tmp_path: Path) -> None:
    """``python examples/build.py``, the README's main command: the program's
    table, a first build that runs every step and a second that runs none."""
    out = run_in_tree(["examples/build.py"], tmp_path).stdout
    assert "".join(f"  {line}\n" for line in TABLE.splitlines()) in out
    assert f"{BUILD_STEPS} steps ran, 0 came from the cache" in out
    assert f"0 steps ran, {BUILD_STEPS} came from the cache" in out
    assert out.count("DONE   compile") == 3
    assert "CACHED run bin/app" in out

    quiet = run_in_tree(["examples/build.py", "--progress", "quiet"], tmp_path).stdout
    assert "DONE" not in quiet
    assert "CACHED" not in quiet
    assert f"0 steps ran, {BUILD_STEPS} came from the cache" in quiet


@needs_cc
def test_build_example_output_dir(tmp_path: Path) -> None:
    """``solver build examples/build.py --output DIR`` writes a binary that runs."""
    dest = tmp_path / "out"
    run_in_tree(
        ["-m", "solver", "build", "examples/build.py", "--output", str(dest),
         "--cache-dir", str(tmp_path / "cli-cache"), "--progress", "plain"],
        tmp_path,
    )
    binary = dest / "bin" / "app"
    assert os.access(binary, os.X_OK)
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30,
                         check=True)
    assert ran.stdout == TABLE
    assert (dest / "table.txt").read_text() == TABLE


@pytest.mark.anyio
async def test_quickstart_example(handle_tracker: HandleTracker) -> None:
    example = load("quickstart")
    with anyio.fail_after(20):
        async with Solver(resolve_op=example.resolve_op) as s:
            res = await s.new_job().build(example.Edge(example.graph()))
            assert res.sys == "word counts: 4, 8"
            await res.release()
