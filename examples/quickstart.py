"""Solve a small in-memory graph twice: the first solve runs every op, the
second finds everything in the cache.

The graph: two "source" ops produce text, a "count" op counts the words of each,
and a "report" op combines the counts. Each op is a plain Python class; the
vertex digests cover the op's parameters and its inputs, so equal work has equal
digests.

Run: ``python examples/quickstart.py``
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from solver import (
    Builder,
    CacheMap,
    CacheMapDep,
    Edge,
    Job,
    Result,
    Solver,
    VertexOptions,
    digest_of,
)


class Value:
    """A result holding a plain Python value."""

    def __init__(self, value: object) -> None:
        self.value = value
        self._id = digest_of(repr(value).encode())

    @property
    def id(self) -> str:
        return self._id

    @property
    def sys(self) -> object:
        return self.value

    async def release(self) -> None:
        pass

    def clone(self) -> Value:
        return self


class Step:
    """A vertex and its op: ``kind`` with ``param``, fed by ``inputs``."""

    def __init__(self, kind: str, param: str, inputs: Sequence[Step] = ()) -> None:
        self.kind = kind
        self.param = param
        self._inputs = [Edge(i) for i in inputs]
        self.name = f"{kind} {param}"
        self.digest = digest_of(
            "|".join([kind, param, *(i.digest for i in inputs)]).encode()
        )

    @property
    def inputs(self) -> Sequence[Edge]:
        return self._inputs

    @property
    def options(self) -> VertexOptions:
        return VertexOptions()

    @property
    def sys(self) -> Step:
        return self

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        own = digest_of(f"{self.kind}:{self.param}".encode())
        return CacheMap(own, [CacheMapDep() for _ in self._inputs]), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await anyio.sleep(0.2)  # pretend this is real work
        values = [r.sys for r in inputs]
        if self.kind == "source":
            out: object = self.param
        elif self.kind == "count":
            out = len(str(values[0]).split())
        else:
            out = f"{self.param}: " + ", ".join(str(v) for v in values)
        return [Value(out)]


def resolve_op(vertex: object, builder: Builder) -> Step:
    op = vertex.sys  # type: ignore[attr-defined]
    assert isinstance(op, Step)
    return op


def graph() -> Step:
    a = Step("source", "the quick brown fox")
    b = Step("source", "jumps over the lazy dog and runs away")
    return Step("report", "word counts", [Step("count", "words", [a]), Step("count", "words", [b])])


async def show_progress(job: Job) -> None:
    async for ev in job.status():
        if ev.status in ("completed", "cached", "error"):
            mark = {"completed": "DONE  ", "cached": "CACHED", "error": "ERROR "}[ev.status]
            print(f"  {mark} {ev.name}")


async def solve_once(solver: Solver, label: str) -> None:
    print(f"{label}:")
    job = solver.new_job()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(show_progress, job)
        result = await job.build(Edge(graph()))
        print(f"  result: {result.sys!r} in {time.perf_counter() - start:.2f}s")
        await result.release()
        await job.discard()  # ends the progress stream


async def main() -> None:
    async with Solver(resolve_op=resolve_op) as solver:
        await solve_once(solver, "first solve (runs every op)")
        await solve_once(solver, "second solve (from cache)")


if __name__ == "__main__":
    anyio.run(main)
