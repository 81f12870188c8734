"""Op kinds and frontends for the frontend tests.

``test.text`` joins its inputs' text with its own ``text`` and returns a
:class:`~solver.testing.CountingResult`, recording each exec in ``Ops.execs``.
``test.gate`` does the same but first signals ``Ops.started[name]`` and waits for
``Ops.gates[name]`` to be set (so a test can cancel or release while it runs).
``test.fail`` raises ``RuntimeError(payload["message"])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from solver import (
    CacheMap,
    CacheMapDep,
    Definition,
    OpContext,
    OpKindRegistry,
    Result,
    digest_of,
    node,
)
from solver.testing import CountingResult


@dataclass
class Ops:
    """The op kinds of one test, and what they saw."""

    execs: list[str] = field(default_factory=list)
    results: list[CountingResult] = field(default_factory=list)
    started: dict[str, anyio.Event] = field(default_factory=dict)
    gates: dict[str, anyio.Event] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)

    def registry(self) -> OpKindRegistry:
        kinds = OpKindRegistry()
        kinds.register("test.text", lambda ctx: _TextOp(ctx, self))
        kinds.register("test.gate", lambda ctx: _GateOp(ctx, self))
        kinds.register("test.fail", lambda ctx: _FailOp(ctx))
        return kinds

    def gate(self, name: str) -> anyio.Event:
        """The event that lets gate ``name`` finish."""
        return self.gates.setdefault(name, anyio.Event())

    def start_signal(self, name: str) -> anyio.Event:
        """The event set when gate ``name`` starts."""
        return self.started.setdefault(name, anyio.Event())

    def underlying_releases(self) -> dict[str, int]:
        """Completed releases per produced value (each should end at its handle
        count, i.e. live 0)."""
        return {r.id: r.release_count for r in self.results}

    def live_values(self) -> list[str]:
        return [r.id for r in self.results if r.live_count]


class _TextOp:
    def __init__(self, ctx: OpContext, ops: Ops) -> None:
        self.text = str(ctx.payload["text"])
        self.inputs = ctx.inputs
        self.ops = ops

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        deps = [CacheMapDep() for _ in range(self.inputs)]
        return CacheMap(digest_of(f"{type(self).__name__}:{self.text}".encode()), deps), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self.before()
        self.ops.execs.append(self.text)
        joined = "".join(str(r.sys) for r in inputs) + self.text
        result = CountingResult(id=f"{joined}-{len(self.ops.execs)}", value=joined)
        self.ops.results.append(result)
        return [result]

    async def before(self) -> None:
        await anyio.lowlevel.checkpoint()


class _GateOp(_TextOp):
    async def before(self) -> None:
        self.ops.start_signal(self.text).set()
        try:
            await self.ops.gate(self.text).wait()
        except anyio.get_cancelled_exc_class():
            self.ops.cancelled.append(self.text)
            raise


class _FailOp:
    def __init__(self, ctx: OpContext) -> None:
        self.message = str(ctx.payload["message"])

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(f"fail:{self.message}".encode()), []), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        raise RuntimeError(self.message)


def text(*parts: str, kind: str = "test.text") -> Definition:
    """A chain of ``test.text`` ops (the last one of ``kind``): ``text("a", "b")``
    builds ``"ab"``."""
    prev = None
    for i, part in enumerate(parts):
        k = kind if i == len(parts) - 1 else "test.text"
        prev = node(k, {"text": part}, inputs=[prev] if prev is not None else [])
    assert prev is not None
    return Definition.of(prev)


def failing(message: str) -> Definition:
    return Definition.of(node("test.fail", {"message": message}))
