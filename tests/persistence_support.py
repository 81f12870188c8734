"""Op kinds and child programs for the persistent-cache tests.

``test.snap`` writes ``out.txt``, the concatenation of its inputs' ``out.txt`` and
its own ``text``, into a new snapshot of the worker's store, and counts each exec
(in :attr:`SnapOps.execs`, and as a line appended to ``marker`` when given, so that
executions in other processes can be counted). ``test.value`` returns a plain
:class:`~solver.testing.CountingResult` (a result that is not a snapshot);
``test.fail`` raises ``RuntimeError(text)``.

Run as a program, it is a child process of the tests::

    python persistence_support.py build ROOT MARKER TEXT...     # solve chain(TEXT...)
    python persistence_support.py crash-loop ROOT SEED           # solve until killed

``build`` prints the result's ``out.txt``. ``crash-loop`` solves, in a loop, a chain
that hits the cache and chains that do not, prunes now and then, and prints
``tick`` after every solve; the tests kill it with SIGKILL.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from solver import CacheMap, CacheMapDep, Definition, OpContext, Result, Solver, digest_of, node
from solver.testing import CountingResult
from solver.worker import SnapshotRef, SnapshotStore, Worker


@dataclass
class SnapOps:
    """What the test kinds executed."""

    marker: Path | None = None
    execs: list[str] = field(default_factory=list)

    def register(self, worker: Worker) -> None:
        store = worker.store
        worker.op_kinds.register("test.snap", lambda ctx: _SnapOp(ctx, store, self))
        worker.op_kinds.register("test.value", lambda ctx: _ValueOp(ctx, self))
        worker.op_kinds.register("test.fail", lambda ctx: _FailOp(ctx))

    def record(self, text: str) -> None:
        self.execs.append(text)
        if self.marker is not None:
            with self.marker.open("a") as f:
                f.write(text + "\n")


class _SnapOp:
    def __init__(self, ctx: OpContext, store: SnapshotStore, ops: SnapOps) -> None:
        self.text = str(ctx.payload["text"])
        self.inputs = ctx.inputs
        self.store = store
        self.ops = ops

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        deps = [CacheMapDep() for _ in range(self.inputs)]
        return CacheMap(digest_of(f"test.snap:{self.text}".encode()), deps), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.ops.record(self.text)
        parts = [await r.sys.read_bytes("out.txt") for r in inputs]  # type: ignore[attr-defined]
        data = b"".join(parts) + self.text.encode()
        mutable = await self.store.new_mutable({"kind": "test.snap", "text": self.text})
        async with mutable:
            await anyio.Path(mutable.path / "out.txt").write_bytes(data)
            ref: SnapshotRef = await mutable.commit()
        return [ref]


class _ValueOp:
    def __init__(self, ctx: OpContext, ops: SnapOps) -> None:
        self.text = str(ctx.payload["text"])
        self.ops = ops

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(f"test.value:{self.text}".encode())), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.ops.record(self.text)
        return [CountingResult(f"value-{self.text}-{len(self.ops.execs)}", self.text)]


class _FailOp(_ValueOp):
    def __init__(self, ctx: OpContext) -> None:
        super().__init__(ctx, SnapOps())

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        raise RuntimeError(self.text)


def chain(*texts: str) -> Definition:
    """``test.snap`` ops in a chain: ``chain("a", "b")`` builds ``out.txt == "ab"``."""
    prev = None
    for text in texts:
        prev = node("test.snap", {"text": text}, inputs=[prev] if prev is not None else [])
    assert prev is not None
    return Definition.of(prev)


async def solve_text(solver: Solver, defn: Definition) -> str:
    """Solve ``defn`` and return its ``out.txt``."""
    async with await solver.solve(defn) as result:
        assert result.ref is not None
        data: bytes = await result.ref.sys.read_bytes("out.txt")
    return data.decode()


# -- child programs -------------------------------------------------------------------


async def _build(root: str, marker: str, texts: Sequence[str]) -> None:
    ops = SnapOps(Path(marker))
    async with Worker(root) as worker:
        ops.register(worker)
        async with Solver(worker=worker) as solver:
            print(await solve_text(solver, chain(*texts)), flush=True)


async def _crash_loop(root: str, seed: int) -> None:
    rng = random.Random(seed)
    ops = SnapOps()
    async with Worker(root) as worker:
        ops.register(worker)
        async with Solver(worker=worker) as solver:
            i = 0
            while True:
                i += 1
                assert await solve_text(solver, chain("base", "mid")) == "basemid"
                leaf = f"leaf-{seed}-{i}"
                expected = "base" + "mid" + leaf
                assert await solve_text(solver, chain("base", "mid", leaf)) == expected
                if rng.random() < 0.2:
                    # drop some of what is unused, running the delete listener
                    await worker.store.prune(keep=lambda info: rng.random() < 0.5)
                print("tick", flush=True)


def main(argv: Sequence[str]) -> None:
    mode, root, *rest = argv
    if mode == "build":
        marker, *texts = rest
        anyio.run(_build, root, marker, texts)
    elif mode == "crash-loop":
        anyio.run(_crash_loop, root, int(rest[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
