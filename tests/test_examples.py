"""The shipped examples run, and their second build comes from the cache."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from solver import Solver
from solver.testing import HandleTracker
from solver.worker import Worker

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_build_example(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    example = load("build")
    with anyio.fail_after(60):
        async with Worker(tmp_path / "w") as worker, Solver(op_kinds=worker.op_kinds) as s:
            first = await s.solve(example.graph().definition())
            assert first.ref is not None
            app = await first.ref.sys.read_bytes("bin/app")
            assert app == b"INT ANSWER() { RETURN 42; }\nINT GREET() { RETURN ANSWER(); }\n" \
                b"INT MAIN() { RETURN GREET(); }\n"
            job = s.new_job()
            res = await job.build(example.graph().definition().to_vertices(s.op_kinds))
            await job.discard()
            statuses = [ev.status async for ev in job.status()]
            assert set(statuses) == {"cached"}  # nothing ran
            assert res.id == first.ref.id  # the very same snapshot
            await res.release()
            await first.release()


async def test_quickstart_example(handle_tracker: HandleTracker) -> None:
    example = load("quickstart")
    with anyio.fail_after(20):
        async with Solver(resolve_op=example.resolve_op) as s:
            res = await s.new_job().build(example.Edge(example.graph()))
            assert res.sys == "word counts: 4, 8"
            await res.release()
