"""Test vertices and helpers: a Python port of BuildKit's scheduler test harness.

``vtx(...)`` makes a vertex that is its own op: its digest is the hash of its
name, its cache map digest the hash of ``"seed:" + cache_key_seed``, and exec
returns a :class:`DummyResult`. ``vtx_const``, ``vtx_sum``, ``vtx_add`` and
``vtx_sub_build`` are the arithmetic vertices of BuildKit's tests. Call counters
are shared by the whole subgraph reached from the vertex ``setup_call_counters``
is called on.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from solver import (
    Builder,
    CacheKey,
    CacheKeyWithSelector,
    CacheManager,
    CacheMap,
    CacheMapDep,
    CacheRecord,
    Edge,
    ExportableCacheKey,
    Job,
    Result,
    Solver,
    VertexOptions,
    digest_of,
)

Hook = Callable[[], Awaitable[None]]


def new_id() -> str:
    return secrets.token_hex(8)


class DummyResult:
    """A result whose release and clone do nothing (clone returns itself)."""

    def __init__(self, value: str = "", int_value: int = 0, id: str | None = None) -> None:
        self._id = id or new_id()
        self.value = value
        self.int_value = int_value

    @property
    def id(self) -> str:
        return self._id

    @property
    def sys(self) -> DummyResult:
        return self

    async def release(self) -> None:
        pass

    def clone(self) -> DummyResult:
        return self

    def __repr__(self) -> str:
        return f"DummyResult({self.value!r}, {self.int_value})"


class CountedResult:
    """Counts releases; its clones share the counter (BuildKit's countedResult)."""

    def __init__(self, value: str, counter: list[int] | None = None, id: str | None = None):
        self._id = id or new_id()
        self.value = value
        self.counter = counter if counter is not None else [0]

    @property
    def id(self) -> str:
        return self._id

    @property
    def sys(self) -> DummyResult:
        return DummyResult(self.value, id=self._id)

    @property
    def release_count(self) -> int:
        return self.counter[0]

    async def release(self) -> None:
        self.counter[0] += 1

    def clone(self) -> CountedResult:
        return CountedResult(self.value, self.counter, self._id)


def unwrap(res: Result) -> str:
    sys = res.sys
    return sys.value if isinstance(sys, DummyResult) else "unwrap-error"


def unwrap_int(res: Result) -> int:
    sys = res.sys
    return sys.int_value if isinstance(sys, DummyResult) else -1_000_000


async def build_value(job: Job, edge: Edge) -> str:
    """Build ``edge`` on ``job``, release the handle and return its string value."""
    res = await job.build(edge)
    try:
        return unwrap(res)
    finally:
        await res.release()


async def build_and_discard(s: Solver, edge: Edge) -> None:
    """Build ``edge`` in a job of its own and discard it: the result stays cached."""
    job = s.new_job()
    await build_value(job, edge)
    await job.discard()


async def digest_from_result(res: Result) -> str:
    return digest_of(unwrap(res).encode())


@dataclass
class Counters:
    cache: int = 0
    exec: int = 0


@dataclass
class VtxOpt:
    name: str = ""
    cache_key_seed: str = ""
    cache_key_seeds: Sequence[Callable[[], str]] = ()
    exec_delay: float = 0.0
    cache_delay: float = 0.0
    cache_pre_func: Hook | None = None
    exec_pre_func: Hook | None = None
    inputs: Sequence[Edge] = ()
    value: str = ""
    result: Result | None = None
    slow_cache_compute: Mapping[int, Callable[[Result], Awaitable[str]]] = field(
        default_factory=dict
    )
    selectors: Mapping[int, str] = field(default_factory=dict)
    cache_source: CacheManager | None = None
    ignore_cache: bool = False


class TestVertex:
    """A vertex that is also its own op."""

    __test__ = False

    def __init__(self, opt: VtxOpt) -> None:
        if not opt.name:
            opt.name = new_id()
        if not opt.cache_key_seed:
            opt.cache_key_seed = new_id()
        self.opt = opt
        self.counters: Counters | None = None
        self.builder: Builder | None = None
        self._digest = digest_of(opt.name.encode())
        self._options = VertexOptions(
            ignore_cache=opt.ignore_cache,
            cache_sources=(opt.cache_source,) if opt.cache_source is not None else (),
        )

    # Vertex
    @property
    def digest(self) -> str:
        return self._digest

    @property
    def inputs(self) -> Sequence[Edge]:
        return self.opt.inputs

    @property
    def name(self) -> str:
        return self.opt.name

    @property
    def options(self) -> VertexOptions:
        return self._options

    @property
    def sys(self) -> TestVertex:
        return self

    # counters
    def setup_call_counters(self) -> Counters:
        c = Counters()
        self._set_counters(c)
        return c

    def _set_counters(self, c: Counters) -> None:
        stack: list[TestVertex] = [self]
        while stack:
            v = stack.pop()
            v.counters = c
            for inp in v.opt.inputs:
                assert isinstance(inp.vertex, TestVertex)
                stack.append(inp.vertex)

    # Op
    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        if index == 0:
            if self.opt.cache_pre_func is not None:
                await self.opt.cache_pre_func()
            if self.counters is not None:
                self.counters.cache += 1
            await anyio.sleep(self.opt.cache_delay)
            return self.make_cache_map(), len(self.opt.cache_key_seeds) == index
        seed = self.opt.cache_key_seeds[index - 1]()
        return (
            CacheMap(digest_of(f"seed:{seed}".encode()), ()),
            len(self.opt.cache_key_seeds) == index,
        )

    def make_cache_map(self) -> CacheMap:
        deps = [
            CacheMapDep(self.opt.selectors.get(i), self.opt.slow_cache_compute.get(i))
            for i in range(len(self.inputs))
        ]
        return CacheMap(digest_of(f"seed:{self.opt.cache_key_seed}".encode()), deps)

    async def _exec(self, inputs: Sequence[Result]) -> None:
        if len(inputs) != len(self.inputs):
            raise RuntimeError("invalid number of inputs")
        if self.opt.exec_pre_func is not None:
            await self.opt.exec_pre_func()
        if self.counters is not None:
            self.counters.exec += 1
        await anyio.sleep(self.opt.exec_delay)

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        if self.opt.result is not None:
            return [self.opt.result]
        return [DummyResult(self.opt.value)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def vtx(**kw: Any) -> TestVertex:
    return TestVertex(VtxOpt(**kw))


class ConstVertex(TestVertex):
    def __init__(self, value: int, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.value = value

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        return [DummyResult(int_value=self.value)]


class SumVertex(TestVertex):
    def __init__(self, value: int, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.value = value

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        s = self.value
        for inp in inputs:
            r = inp.sys
            if not isinstance(r, DummyResult):
                raise TypeError(f"invalid input type: {type(r).__name__}")
            s += r.int_value
        return [DummyResult(int_value=s)]


class AddVertex(TestVertex):
    def __init__(self, value: int, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.value = value

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        out: list[Result] = []
        for inp in inputs:
            r = inp.sys
            if not isinstance(r, DummyResult):
                raise TypeError(f"invalid input type: {type(r).__name__}")
            out.append(DummyResult(int_value=r.int_value + self.value))
        return out


class SubBuildVertex(TestVertex):
    def __init__(self, g: Edge, opt: VtxOpt) -> None:
        super().__init__(opt)
        self.g = g

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        await self._exec(inputs)
        assert self.builder is not None
        res = await self.builder.build(self.g)
        return [res]


def _named(opt: VtxOpt, seed: str) -> VtxOpt:
    if not opt.cache_key_seed:
        opt.cache_key_seed = seed
    if not opt.name:
        opt.name = opt.cache_key_seed + "-" + new_id()
    return opt


def vtx_const(v: int, **kw: Any) -> ConstVertex:
    return ConstVertex(v, _named(VtxOpt(**kw), f"const-{v}"))


def vtx_sum(v: int, **kw: Any) -> SumVertex:
    opt = VtxOpt(**kw)
    return SumVertex(v, _named(opt, f"sum-{v}-{len(opt.inputs)}"))


def vtx_add(v: int, **kw: Any) -> AddVertex:
    opt = VtxOpt(**kw)
    return AddVertex(v, _named(opt, f"add-{v}-{len(opt.inputs)}"))


def vtx_sub_build(g: Edge, **kw: Any) -> SubBuildVertex:
    return SubBuildVertex(g, _named(VtxOpt(**kw), f"sub-{new_id()}"))


def resolve_op(v: Any, b: Builder) -> TestVertex:
    op = v.sys
    if not isinstance(op, TestVertex):
        raise TypeError("invalid vertex")
    if isinstance(op, SubBuildVertex):
        op.builder = b
    return op


def blocking_function(n: int) -> Hook:
    """A barrier: every caller waits until ``n`` callers have arrived."""
    remaining = [n]
    event = anyio.Event()

    async def wait() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            event.set()
        await event.wait()

    return wait


class TrackingCacheManager:
    """Wraps a cache manager and counts ``load`` calls, saved results and batched
    saves; can force loads to fail."""

    def __init__(self, inner: CacheManager) -> None:
        self.inner = inner
        self.load_counter = 0
        # results saved (one per save, one per result of a batch) and batches
        self.save_counter = 0
        self.save_many_counter = 0
        self.force_fail = False

    @property
    def id(self) -> str:
        return self.inner.id

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        return await self.inner.query(deps, input, digest, output)

    async def query_many(
        self, requests: Sequence[tuple[Sequence[CacheKeyWithSelector], int, str, int]]
    ) -> list[list[CacheKey]]:
        # the cached path's batched queries (KeyedCacheManager.query_many)
        query_many = getattr(self.inner, "query_many", None)
        if query_many is None:
            return [await self.inner.query(*r) for r in requests]
        return await query_many(requests)  # type: ignore[no-any-return]

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        return await self.inner.records(key)

    async def load(self, record: CacheRecord) -> Result:
        self.load_counter += 1
        if self.force_fail:
            raise RuntimeError("force fail")
        return await self.inner.load(record)

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        self.save_counter += 1
        return await self.inner.save(key, result, created_at)

    async def save_many(
        self, saves: Sequence[tuple[CacheKey, Result, float]]
    ) -> list[ExportableCacheKey]:
        # the cold path's batched saves (KeyedCacheManager.save_many)
        self.save_many_counter += 1
        self.save_counter += len(saves)
        save_many = getattr(self.inner, "save_many", None)
        if save_many is None:
            return [await self.inner.save(*s) for s in saves]
        return await save_many(saves)  # type: ignore[no-any-return]

    async def release(self, result_id: str) -> None:
        await self.inner.release(result_id)

    async def close(self) -> None:
        await self.inner.close()


def generate_sub_graph(nodes: int, rng: Any) -> tuple[Edge, int]:
    """BuildKit's random sum/const graph: returns the edge and its expected value."""
    if nodes == 1:
        value = rng.randrange(500)
        return Edge(vtx_const(value)), value
    spread = rng.randrange(5) + 2
    inc = min(-(-nodes // spread), nodes)
    added = 1
    value = 0
    inputs: list[Edge] = []
    while added < nodes:
        if added + inc > nodes:
            inc = nodes - added
        e, v = generate_sub_graph(inc, rng)
        inputs.append(e)
        value += v
        added += inc
    extra = rng.randrange(500)
    value += extra
    return Edge(vtx_sum(extra, inputs=inputs)), value


@dataclass
class Gate:
    """A hook that blocks until opened and records how its calls ended."""

    entered: anyio.Event = field(default_factory=anyio.Event)
    opened: anyio.Event = field(default_factory=anyio.Event)
    calls: int = 0
    cancelled: int = 0
    running: int = 0

    async def wait(self) -> None:
        self.calls += 1
        self.running += 1
        self.entered.set()
        try:
            await self.opened.wait()
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
