"""``Solver``: the engine composed with definitions, frontends and the worker.

:class:`~solver.engine.Engine` knows vertices, ops, caches and results. The
``Solver`` users meet adds what turns a serialisable request into engine work
(after BuildKit's ``llbsolver``): an op-kind registry that resolves the vertices
of a :class:`~solver.Definition`, frontends by name, cache imports and exports
around a solve, and the built-in worker as the default when nothing else is
given. ``await solver.solve(request)`` is the high-level entry.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Self

import anyio
import anyio.lowlevel

from .._cache import CacheManager
from .._errors import SolveError
from .._graph import Edge, Vertex
from .._op import Builder, Op, ResolveOp
from ..definition import (
    Definition,
    InMemoryOpHistory,
    OpDef,
    OpHistory,
    OpKindRegistry,
    OutputRef,
    history_records,
)
from ..engine import Engine, Job
from ..insight import BuildHistory, tracing_enabled
from ..worker import Worker
from ._bridge import SolverBridge, to_solve_result
from ._caches import build_with_caches, opened_imports, run_exports
from ._frontend import Frontend
from ._request import SolveRequest, SolveResult
from ._summary import PendingSummary, pending_summary, record_build

if TYPE_CHECKING:
    from ..remote import DaskCluster

__all__ = ["Solver", "definitions_unrecorded"]

logger = logging.getLogger("solver")

#: How many recorded definitions (by output) a solver remembers not to record again.
_RECORDED_OUTPUTS: Final = 1_000

# False while a solve is made of a part of a graph (``check_determinism`` solves
# each op output alone): its ops would be recorded at places relative to that
# part, overwriting where they stand in the graph the user builds.
_recording: ContextVar[bool] = ContextVar("solver_recording_definitions", default=True)


@contextlib.contextmanager
def definitions_unrecorded() -> Iterator[None]:
    """Solves in this context (this task and what it awaits) leave the op history
    and the build history as they are (``check_determinism``'s rebuilds of one op
    each are not builds of their own)."""
    token = _recording.set(False)
    try:
        yield
    finally:
        _recording.reset(token)


class Solver(Engine):
    """The engine. Use it as an async context manager: it owns the task group in
    which shared work runs.

    ``Solver()`` with no arguments uses the built-in worker
    (:class:`solver.worker.Worker` on its default root, honouring
    ``SOLVER_CACHE_DIR``). ``resolve_op(vertex, builder)`` turns a vertex into its
    :class:`Op`.
    ``op_kinds``, a registry of op kinds, resolves the vertices made from a
    :class:`Definition` (and definitions are validated against it); without it,
    ``resolve_op`` resolves every vertex. ``default_cache`` is the main cache (an
    :class:`InMemoryCacheManager` the solver makes, and closes, when not given; one
    passed in is the caller's).
    ``worker``, an open :class:`solver.worker.Worker` (the caller's: the solver
    neither opens nor closes it), supplies ``op_kinds`` and ``default_cache`` when
    they are not given: its kinds and its persistent cache (:attr:`Worker.cache`);
    its ``after_solve()`` (automatic garbage collection) runs at the end of every
    :meth:`solve`.
    ``frontends`` maps names to frontends for :meth:`solve`.
    ``op_history`` keeps the op definitions of past solves, so that a cache miss
    can be explained (:func:`~solver.explain`): the worker's persistent one
    (:attr:`Worker.op_history <solver.worker.Worker.op_history>`) when the solver
    has a worker, else one in memory, unless given.
    ``cluster``, an open :class:`solver.remote.DaskCluster` (the caller's), runs
    the worker's ``exec`` and ``file`` ops on a Dask cluster: the solver uses a copy
    of the worker's kinds with those wrapped (``docs/remote.md``); it needs a
    built-in worker (``worker=`` or the one ``Solver()`` makes).
    ``history`` records every :meth:`solve` of a definition (done or failed) in a
    :class:`~solver.insight.BuildHistory`; ``True`` means the worker's, in
    ``<store root>/history`` (the command line's); off by default.
    """

    def __init__(
        self,
        resolve_op: ResolveOp | None = None,
        default_cache: CacheManager | None = None,
        frontends: Mapping[str, Frontend] | None = None,
        *,
        op_kinds: OpKindRegistry | None = None,
        worker: Worker | None = None,
        op_history: OpHistory | None = None,
        cluster: DaskCluster | None = None,
        history: BuildHistory | bool | None = None,
    ) -> None:
        # the worker this solver made (and opens and closes), if any
        self._worker: Worker | None = None
        # the worker whose after_solve() runs after each solve (the caller's or ours)
        self._solve_worker: Worker | None = worker
        if worker is not None:
            if op_kinds is None:
                op_kinds = worker.op_kinds
            if default_cache is None:
                default_cache = worker.cache
        if resolve_op is None and op_kinds is None:
            # the built-in worker, on the default root
            self._worker = self._solve_worker = Worker()
            op_kinds = self._worker.op_kinds
        if cluster is not None:
            op_kinds = _with_cluster(cluster, self._solve_worker, op_kinds)
        super().__init__(resolve_op, default_cache)
        self.op_kinds = op_kinds
        if history is True:
            if self._solve_worker is None:
                raise SolveError(
                    "history=True keeps the history in the worker's store, and this "
                    "solver has no worker: pass a BuildHistory"
                )
            history = BuildHistory(self._solve_worker.store.root / "history")
        self.history: BuildHistory | None = history or None
        self.frontends: dict[str, Frontend] = dict(frontends or {})
        self._op_history = op_history
        # the outputs of the definitions this solver recorded, most recent last
        self._recorded: OrderedDict[OutputRef, None] = OrderedDict()
        if op_history is None and self._solve_worker is None:
            self._op_history = InMemoryOpHistory()

    @property
    def op_history(self) -> OpHistory:
        """Where the op definitions of past solves are kept (see the class docs);
        the worker's is available once the worker is open."""
        if self._op_history is not None:
            return self._op_history
        assert self._solve_worker is not None
        return self._solve_worker.op_history

    async def record_definition(self, definition: Definition) -> None:
        """Record the ops of ``definition`` in :attr:`op_history`, as :meth:`solve`
        does after building one, so that a later miss can name what changed (for
        a build made some other way, such as ``Job.build``). A failure to write
        the history is logged at ERROR on the ``solver`` logger, never raised.
        O(ops); O(1) for a definition (the same output op) this solver recorded
        before, among its last 1,000, and inside :func:`definitions_unrecorded`
        (nothing is recorded). Always a checkpoint."""
        recorded = self._recorded
        if not _recording.get():
            await anyio.lowlevel.checkpoint()
            return
        if definition.output in recorded:
            # Solved again by this solver: its ops are kept already. Not writing
            # them again keeps a warm re-solve O(1) here (a 1,000-op chain costs
            # 3 to 7 ms to record in memory, 10 to 14 ms in SQLite); their "last
            # seen" time is that of this solver's first solve of them.
            recorded.move_to_end(definition.output)
            await anyio.lowlevel.checkpoint()
            return
        try:
            await self.op_history.record(history_records(definition))
        except Exception:
            logger.exception("recording the definition's ops in the op history failed")
            return
        recorded[definition.output] = None
        if len(recorded) > _RECORDED_OUTPUTS:
            recorded.popitem(last=False)

    def resolve_op(self, vertex: Vertex, builder: Builder) -> Op:
        """The op of ``vertex``: through ``op_kinds`` for definition vertices when
        the solver has a registry, through ``resolve_op`` otherwise."""
        if self.op_kinds is not None and isinstance(vertex.sys, OpDef):
            return self.op_kinds.resolve_op(vertex, builder)
        return super().resolve_op(vertex, builder)

    async def solve(
        self, request: Definition | SolveRequest, *, job: Job | None = None
    ) -> SolveResult:
        """Solve a definition, or a request naming one or naming a frontend.

        A definition is validated (against ``op_kinds`` when the solver has a
        registry) before anything runs, and its output is built. A frontend (one of
        ``frontends``, by name) is called with a bridge
        (:class:`~solver.Bridge`), its ``frontend_opts`` and ``frontend_inputs``;
        every ref it returns is evaluated, and the :class:`SolveResult` holds one
        new handle per occurrence (the frontend's own result is released).

        Everything is built in ``job`` when given (the caller keeps it, to read its
        :meth:`Job.status`, and discards it), else in a job of its own that is
        discarded before this returns. The returned :class:`SolveResult` owns the
        result handles; release it.
        """
        self._check_open()
        if isinstance(request, Definition):
            request = SolveRequest(definition=request)
        edge: Edge | None = None
        if request.frontend is not None:
            self._frontend(request.frontend)
        elif request.definition is None:
            raise SolveError("a SolveRequest needs a definition or a frontend")
        else:
            # validated once, by to_vertices, before a job is made (a no-op
            # build validated it twice: docs/performance.md, "The cached path")
            edge = request.definition.to_vertices(self.op_kinds)
        own_job = job is None
        if job is None:
            job = self.new_job()
        solved: SolveResult | None = None
        try:
            if request.frontend is not None:
                solved = await self._solve_frontend(request, job)
            else:
                assert edge is not None
                imports, exports = request.cache_imports, request.cache_exports
                started = time.time()
                try:
                    ref = await build_with_caches(job, edge, imports, exports, self.worker)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._summarize(job, edge, started)
                    raise
                try:
                    summary = await self._summarize(job, edge, started)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await ref.release()
                    raise
                solved = SolveResult(ref=ref, summary=summary)
        finally:
            # Once a SolveResult exists it either reaches the caller or is released
            # here: discarding the job is a cancel point, and a cancellation (or any
            # error) raised by it must not drop the handles the result holds.
            try:
                if own_job:
                    await job.discard()
                if solved is not None and request.definition is not None:
                    await self.record_definition(request.definition)
                await self._after_solve()
            except BaseException:
                if solved is not None:
                    with anyio.CancelScope(shield=True):
                        await solved.release()
                raise
        return solved

    async def _summarize(self, job: Job, edge: Edge, started: float) -> PendingSummary:
        """The summary of the build of ``edge`` in ``job``, folded when first read
        (``bridge/_summary.py``), or now to record it in the history when there
        is one (a failure to write it is logged, not raised) or send its spans."""
        ended = time.time()
        # Shielded: reading the job's buffered events never waits, and a caller
        # cancelled after its build ran still gets the build recorded (its next
        # checkpoint raises the cancellation, and the result is released then).
        history = self.history if _recording.get() else None
        with anyio.CancelScope(shield=True):
            summary = await pending_summary(job, edge, started=started, ended=ended)
            if history is not None:
                # files written and old records pruned: not on the event loop
                await anyio.to_thread.run_sync(record_build, summary(), history)
            elif tracing_enabled():
                record_build(summary(), None)
        return summary

    async def _solve_frontend(self, request: SolveRequest, job: Job) -> SolveResult:
        # Imports are cache sources of every definition the frontend solves; the
        # records of all its distinct results go into each export.
        solved: SolveResult | None = None
        try:
            async with opened_imports(request.cache_imports, self.worker) as sources:
                bridge = SolverBridge(self, job, cache_sources=sources)
                solved = await to_solve_result(await bridge.solve(request))
                if request.cache_exports:
                    handles = [solved.ref, *solved.refs.values()]
                    distinct = list({h.id: h for h in handles if h is not None}.values())
                    await run_exports(distinct, request.cache_exports, self.worker)
        except BaseException:
            # an export, or closing the imports, failed or was cancelled
            if solved is not None:
                await solved.release()  # shielded
            raise
        return solved

    async def _after_solve(self) -> None:
        worker = self._solve_worker
        if worker is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                await worker.after_solve()
            except Exception:
                logger.exception("after_solve() of %r failed", worker)

    def _frontend(self, name: str) -> Frontend:
        frontend = self.frontends.get(name)
        if frontend is None:
            known = ", ".join(sorted(self.frontends)) or "none"
            raise SolveError(
                f"unknown frontend {name!r}; frontends given to this solver: {known}"
            )
        return frontend

    @property
    def worker(self) -> Worker | None:
        """The built-in worker this solver uses (``worker=`` or the one it made for
        ``Solver()``), if any: local cache imports and exports use its store."""
        return self._solve_worker

    # -- lifetime --------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise SolveError("a Solver can be entered only once")
        if self._worker is not None:
            await self._worker.open()
        try:
            return await super().__aenter__()
        except BaseException:
            if self._worker is not None:
                with anyio.CancelScope(shield=True):
                    await self._worker.close()
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            if self._worker is not None:
                with anyio.CancelScope(shield=True):
                    await self._worker.close()


def _with_cluster(
    cluster: DaskCluster, worker: Worker | None, op_kinds: OpKindRegistry | None
) -> OpKindRegistry:
    """A copy of ``op_kinds`` whose remote kinds run on ``cluster``."""
    if worker is None or op_kinds is None:
        raise ValueError(
            "Solver(cluster=...) runs the built-in worker's ops remotely: give it a "
            "worker (Solver(worker=worker, cluster=cluster)) or no resolve_op"
        )
    from ..remote import attach_cluster  # imports the cluster code: only with a cluster

    kinds = op_kinds.copy()
    attach_cluster(kinds, cluster, worker.store, sandbox=worker.sandbox)
    return kinds
