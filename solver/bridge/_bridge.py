"""The bridge: how frontends solve through a :class:`~solver.Solver`.

``Solver.solve(SolveRequest(frontend=...))`` makes one :class:`SolverBridge` per
request, bound to one job, and calls the named frontend with it. A frontend's
``bridge.solve(request)`` with a definition returns at once a
:class:`~solver.FrontendResult` whose ``ref`` is a :class:`DefinitionProxy`: a
lazy result, built in the bridge's job on its first ``result()``.

Evaluation. The first ``result()`` starts the build as a task of the solver's own
task group, and every caller (the first one too) waits for it; concurrent calls
share it, later calls get the stored value or a copy of the stored error. A
caller that is cancelled stops waiting; the build goes on (another holder of the
proxy may still want it) until it ends or the proxy is released. This is what
makes the proxy safe to split and hand to concurrent tasks: whichever of them
asks first, the work is done once, in a task that outlives none of them wrongly.

Release. The proxy owns the value its build produced (``result()`` returns that
value itself, as BuildKit's ``ResultProxy.Result`` does: callers that keep it
``clone()`` it). ``release()`` during an evaluation cancels the build, waits for
it to stop (shielded), releases anything it produced and makes every waiter fail
with "evaluating released result <id>"; ``result()`` after release fails with
"accessing released result <id>". A second ``release()`` raises
:class:`~solver.DoubleReleaseError`. Proxies report to the handle tracker
(:mod:`solver.testing`) like every other handle.

Converting a frontend's result into the caller's :class:`~solver.SolveResult`
(:func:`to_solve_result`) evaluates every proxy concurrently, clones each value
once per occurrence, and always releases the frontend's result; if anything
fails, the clones made so far are released too.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel

from .. import _refs
from .._errors import DoubleReleaseError, SolveError
from .._result import CachedResult, ResultProxy
from ._caches import with_cache_sources
from ._frontend import Attestation, FrontendResult
from ._request import SolveRequest, SolveResult

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._cache import CacheManager
    from .._graph import Edge
    from ..definition import Definition
    from ..engine import Job

    # type-only: _solver builds on this module (a bridge is handed the Solver)
    from ._solver import Solver

__all__ = ["MAX_FRONTEND_DEPTH", "DefinitionProxy", "SolverBridge", "to_solve_result"]

_log = logging.getLogger("solver")

#: How deeply frontends may call frontends through one bridge before the solve fails
#: (a frontend that calls itself would otherwise recurse until memory runs out).
MAX_FRONTEND_DEPTH: Final = 32


class SolverBridge:
    """The :class:`~solver.Bridge` a :class:`~solver.Solver` hands to frontends.

    Definitions are validated against the solver's op kinds when ``solve`` is
    called, built lazily in ``job``, with ``cache_sources`` (a request's cache
    imports) as extra caches of every vertex. A request naming a frontend calls it with a
    bridge one level deeper and returns its result as is.
    """

    __slots__ = ("_depth", "cache_sources", "job", "solver")

    def __init__(
        self,
        solver: Solver,
        job: Job,
        depth: int = 0,
        *,
        cache_sources: Sequence[CacheManager] = (),
    ) -> None:
        self.solver = solver
        self.job = job
        self.cache_sources = tuple(cache_sources)
        self._depth = depth

    def __repr__(self) -> str:
        return f"<SolverBridge job={self.job.id} depth={self._depth}>"

    async def solve(self, request: SolveRequest) -> FrontendResult:
        """See :class:`~solver.Bridge`. Raises :class:`~solver.SolveError` for an
        unknown frontend, a request with neither a definition nor a frontend, an
        invalid definition, or frontends nested deeper than
        :data:`MAX_FRONTEND_DEPTH`."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        solver = self.solver
        solver._check_open()
        if request.frontend is not None:
            frontend = solver._frontend(request.frontend)
            if self._depth >= MAX_FRONTEND_DEPTH:
                raise SolveError(
                    f"frontend {request.frontend!r} is nested {self._depth} frontends "
                    "deep: does a frontend call itself?"
                )
            child = SolverBridge(
                solver, self.job, self._depth + 1, cache_sources=self.cache_sources
            )
            result = await frontend.solve(child, request.frontend_opts, request.frontend_inputs)
            if not isinstance(result, FrontendResult):
                raise SolveError(
                    f"frontend {request.frontend!r} returned a {type(result).__name__}, "
                    "not a FrontendResult"
                )
            return result
        if request.definition is None:
            raise SolveError("a SolveRequest needs a definition or a frontend")
        definition = request.definition
        definition.validate(solver.op_kinds)
        edge = with_cache_sources(definition.to_vertices(solver.op_kinds), self.cache_sources)
        result = FrontendResult()
        result.set_ref(DefinitionProxy(self, definition, edge))
        return result


_NEW: Final = 0
_RUNNING: Final = 1
_DONE: Final = 2


class DefinitionProxy:
    """A lazy result: the output of ``definition``, built on the first
    :meth:`result` (see the module docstring for evaluation and release)."""

    __slots__ = (
        "__weakref__",
        "_bridge",
        "_consumed",
        "_definition",
        "_done",
        "_edge",
        "_error",
        "_id",
        "_released",
        "_scope",
        "_state",
        "_value",
    )

    def __init__(self, bridge: SolverBridge, definition: Definition, edge: Edge) -> None:
        self._bridge = bridge
        self._definition = definition
        self._edge = edge
        self._id = "proxy-" + secrets.token_hex(8)
        self._state = _NEW
        self._released = False
        self._consumed = False
        self._done: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._value: CachedResult | None = None
        self._error: SolveError | None = None
        tracker = _refs._tracker
        if tracker is not None:
            tracker.created(self)

    @property
    def id(self) -> str:
        """A random ID, unique to this proxy (its split halves share it)."""
        return self._id

    @property
    def definition(self) -> Definition:
        """The definition whose output this proxy stands for."""
        return self._definition

    @property
    def released(self) -> bool:
        """True once the proxy was released: by :meth:`release`, or by the last
        half of a :func:`~solver.split_result_proxy` of it."""
        return self._released

    async def result(self) -> CachedResult:
        """The built value, owned by this proxy (clone it to keep it).

        Builds it on the first call; concurrent calls share that build. Raises the
        build's :class:`~solver.SolveError` (a copy per caller), or a SolveError
        if the proxy was released (or consumed by a split) before or during the
        evaluation."""
        if self._consumed:
            raise SolveError(f"accessing released result {self._id}")
        return await self._result()

    def _consume_for_split(self) -> ResultProxy:
        """Hook of :func:`~solver.split_result_proxy`: this proxy is consumed (its
        own ``release()`` raises DoubleReleaseError from now on) and the returned
        object, which the halves share, releases it for them."""
        if self._released or self._consumed:
            raise self._misuse("splitting")
        self._consumed = True
        tracker = _refs._tracker
        if tracker is not None:
            tracker.released(self)
        return _SplitDefinitionProxy(self)

    def _misuse(self, action: str) -> DoubleReleaseError:
        if self._consumed:
            message = f"{action} reference {self._id} that split_result_proxy consumed"
        else:
            message = f"{action} already released reference {self._id}"
        _log.error("%s: %r", message, self)
        tracker = _refs._tracker
        if tracker is not None:
            tracker.double_released(self)
        return DoubleReleaseError(message)

    async def _result(self) -> CachedResult:
        if self._released:
            raise SolveError(f"accessing released result {self._id}")
        if self._state == _NEW:
            self._state = _RUNNING
            self._done = anyio.Event()
            solver = self._bridge.solver
            solver._check_open()
            assert solver._tg is not None
            solver._tg.start_soon(self._evaluate)
        if self._state == _RUNNING:
            assert self._done is not None
            await self._done.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if self._released:
            raise SolveError(f"evaluating released result {self._id}")
        if self._error is not None:
            raise self._error._copy()
        assert self._value is not None
        return self._value

    async def _evaluate(self) -> None:
        value: CachedResult | None = None
        error: SolveError | None = None
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._released:
                    scope.cancel()
                try:
                    value = await self._bridge.job.build(self._edge)
                except SolveError as exc:
                    error = exc
                except Exception as exc:
                    error = SolveError(f"evaluating result {self._id} failed: {exc}")
                    error.__cause__ = exc
        finally:
            # Runs also when the solver's task group is cancelled (it is closing).
            self._scope = None
            if value is not None and self._released:
                with anyio.CancelScope(shield=True):
                    await value.release()
                value = None
            if value is None and error is None:
                error = SolveError(
                    f"evaluating released result {self._id}"
                    if self._released
                    else f"evaluation of result {self._id} was cancelled: the solver is closing"
                )
            self._value, self._error = value, error
            self._state = _DONE
            assert self._done is not None
            self._done.set()

    async def release(self) -> None:
        """Release the proxy and what it built (see the module docstring).

        Never a cancel point: an evaluation in flight is cancelled and waited for
        under a shield. A second call, or a call after a split consumed the proxy,
        logs at ERROR and raises :class:`~solver.DoubleReleaseError`, changing
        nothing."""
        if self._released or self._consumed:
            raise self._misuse("releasing")
        tracker = _refs._tracker
        if tracker is not None:
            tracker.released(self)
        await self._release()

    async def _release(self) -> None:
        self._released = True
        with anyio.CancelScope(shield=True):
            if self._state == _RUNNING:
                if self._scope is not None:
                    self._scope.cancel()
                assert self._done is not None
                await self._done.wait()
            value, self._value = self._value, None
            if value is not None:
                await value.release()
            else:
                await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        state = ("new", "evaluating", "done")[self._state]
        if self._released:
            state = "released"
        elif self._consumed:
            state += " consumed"
        return f"<DefinitionProxy {self._id} {state}>"

    def __del__(self) -> None:
        if (
            _refs._tracker is not None
            and not getattr(self, "_released", True)
            and not getattr(self, "_consumed", True)
        ):
            warnings.warn(
                f"result proxy {self._id} was never released",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )


class _SplitDefinitionProxy:
    """What the halves of a split :class:`DefinitionProxy` share: the proxy's
    evaluation and release, reached past the proxy's own (consumed) handle."""

    __slots__ = ("_proxy",)

    def __init__(self, proxy: DefinitionProxy) -> None:
        self._proxy = proxy

    @property
    def id(self) -> str:
        return self._proxy.id

    @property
    def definition(self) -> Definition:
        return self._proxy.definition

    async def result(self) -> CachedResult:
        return await self._proxy._result()

    async def release(self) -> None:
        await self._proxy._release()

    def __repr__(self) -> str:
        return f"<split {self._proxy!r}>"


async def to_solve_result(result: FrontendResult) -> SolveResult:
    """Evaluate every proxy in ``result`` and return a :class:`~solver.SolveResult`
    holding one new handle per occurrence; ``result`` is always released.

    Proxies are evaluated concurrently; the first failure cancels the others and
    is raised (one :class:`~solver.SolveError`, never a group), after every handle
    cloned so far has been released."""
    clones: list[CachedResult] = []
    try:
        values = await _evaluate_all(list(result.each_ref()))

        def take(proxy: ResultProxy) -> CachedResult:
            clone = values[id(proxy)].clone()
            assert isinstance(clone, CachedResult)
            clones.append(clone)
            return clone

        ref = take(result.ref) if result.ref is not None else None
        refs = {key: take(proxy) for key, proxy in result.refs.items()}
        attestations = {
            key: [_attest(att, take(att.ref) if att.ref is not None else None) for att in atts]
            for key, atts in result.attestations.items()
        }
        solved = SolveResult(
            ref=ref, refs=refs, metadata=result.metadata, attestations=attestations
        )
        clones.clear()  # the SolveResult owns them now
        return solved
    finally:
        with anyio.CancelScope(shield=True):
            for clone in clones:
                await clone.release()
            await result.release()


def _attest(att: Attestation[Any], ref: CachedResult | None) -> Attestation[CachedResult]:
    return Attestation(att.kind, ref, att.path, att.metadata)


async def _evaluate_all(proxies: list[ResultProxy]) -> dict[int, CachedResult]:
    """``result()`` of every proxy, concurrently, by ``id(proxy)``."""
    values: dict[int, CachedResult] = {}
    failures: list[BaseException] = []
    if len(proxies) == 1:
        values[id(proxies[0])] = await proxies[0].result()
        return values

    async def one(proxy: ResultProxy, scope: anyio.CancelScope) -> None:
        try:
            values[id(proxy)] = await proxy.result()
        except Exception as exc:
            failures.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        for proxy in proxies:
            tg.start_soon(one, proxy, tg.cancel_scope)
    if failures:
        raise failures[0]
    await anyio.lowlevel.checkpoint_if_cancelled()
    return values
