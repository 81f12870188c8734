"""Op kinds, build functions and helpers shared by the gateway tests and the test
frontend programs in this directory.

``gw.text`` joins its inputs' text with its own ``text`` and returns a
:class:`~solver.testing.CountingResult` (recorded in ``Ops.results``, each exec in
``Ops.execs``). ``gw.gate`` does the same but first sets ``Ops.started[text]`` and
waits for ``Ops.gates[text]``. ``gw.fail`` raises ``RuntimeError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from frontends import BuildResult, Client
from solver import (
    Attestation,
    CacheMap,
    CacheMapDep,
    Definition,
    OpContext,
    OpKindRegistry,
    Result,
    SolveRequest,
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

    def registry(self) -> OpKindRegistry:
        kinds = OpKindRegistry()
        kinds.register("gw.text", lambda ctx: _TextOp(ctx, self))
        kinds.register("gw.gate", lambda ctx: _GateOp(ctx, self))
        kinds.register("gw.fail", lambda ctx: _FailOp(ctx))
        return kinds

    def gate(self, name: str) -> anyio.Event:
        return self.gates.setdefault(name, anyio.Event())

    def start_signal(self, name: str) -> anyio.Event:
        return self.started.setdefault(name, anyio.Event())

    def live_values(self) -> list[str]:
        """Values some handle of which is still unreleased."""
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
        await self.ops.gate(self.text).wait()


class _FailOp:
    def __init__(self, ctx: OpContext) -> None:
        self.message = str(ctx.payload["message"])

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(f"fail:{self.message}".encode()), []), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        raise RuntimeError(self.message)


def text(*parts: str, kind: str = "gw.text") -> Definition:
    """A chain of ``gw.text`` ops (the last one of ``kind``): ``text("a", "b")``
    builds ``"ab"``."""
    prev = None
    for i, part in enumerate(parts):
        k = kind if i == len(parts) - 1 else "gw.text"
        prev = node(k, {"text": part}, inputs=[prev] if prev is not None else [])
    assert prev is not None
    return Definition.of(prev)


def failing(message: str) -> Definition:
    return Definition.of(node("gw.fail", {"message": message}))


# -- build functions (run in process, through the in-process gateway and as programs) --


async def duplicate_build(client: Client) -> BuildResult:
    """One reference under ``n`` keys (opts["n"], default 3), as the main ref, and
    in two attestations; a second reference once; metadata."""
    n = int(client.build_opts().opts.get("n", "3"))
    shared = await client.solve(SolveRequest(definition=text("a", "b")))
    other = await client.solve(SolveRequest(definition=text("a", "c")))
    assert shared.ref is not None
    assert other.ref is not None
    result = BuildResult()
    result.set_ref(shared.ref)
    for i in range(n):
        result.add_ref(f"platform-{i}", shared.ref)
    result.add_ref("other", other.ref)
    result.add_attestation("platform-0", Attestation("provenance", shared.ref, "/prov.json"))
    result.add_attestation(
        "platform-0", Attestation("sbom", shared.ref, "/sbom", {"format": b"spdx"})
    )
    result.add_attestation("other", Attestation("note", None, "", {"text": b"no ref"}))
    result.add_meta("frontend", b"duplicate")
    return result


async def failing_build(client: Client) -> BuildResult:
    """Solves something (so there is a reference to release), then raises."""
    await client.solve(SolveRequest(definition=text("a", "b")))
    raise ValueError("the build function says no")
