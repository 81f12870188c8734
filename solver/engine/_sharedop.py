"""One op per active vertex, with its async work run once and shared.

After BuildKit's ``sharedOp`` + ``util/flightcontrol``. The three kinds of work an
op does (``cache_map(i)``, ``exec``, and each input's ``compute_digest``) run at
most once per active vertex, whichever edges ask:

* A request is a :class:`~solver.engine._scheduler.Pipe`. The first request for a piece
  of work starts one task for it (a *call*); later requests join the call as
  waiters. No task exists per waiter.
* When a waiter cancels and other live waiters remain, it is answered
  "cancelled" at once and the work goes on. When the last live waiter cancels,
  the call's cancel scope is cancelled and that waiter is answered with whatever
  the work ends with, only once it has stopped.
* Outcomes are memoized for the life of the active vertex, so every edge and job
  sharing it sees the same result or the same error. An outcome caused by
  cancellation is never memoized: the next request runs the work again. A
  request that arrives while a cancelled call is still winding down waits for it
  to end and then asks again (BuildKit's flightcontrol retry, without the
  backoff: the call's end is an event, not a poll).

Exec outputs are kept as :class:`SharedResult` owners; every waiter receives its
own counter-sharing handles, so an output is released once, after the op's
owner and every consumer's handle are released.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._cache import CacheManager, CacheRecord, ExportableCacheKey
from .._errors import SlowCacheError, SolveError
from .._op import CacheMap, ComputeDigest, Op
from .._progress import (
    CACHED,
    COMPLETED,
    ERROR,
    STARTED,
    WAITING,
    current_cache_source,
    current_log,
    current_wait,
)
from .._refs import CachedResultWithKeys, SharedResult
from ..cache import InMemoryCacheManager, KeyExporter
from ._scheduler import CANCELED, Pipe

if TYPE_CHECKING:
    from .._result import Result

    # type-only: _jobs builds on this module (a state owns its shared op)
    from ._jobs import VertexState

__all__ = ["SharedOp"]


# kinds of shared work (a call is keyed by its kind and index)
_CACHE_MAP = 0
_EXEC = 1
_SLOW = 2


def _cache_source(record: CacheRecord, main: CacheManager) -> str:
    """Where a loaded record came from, for its ``"cached"`` event."""
    if isinstance(record.manager, InMemoryCacheManager):
        return "memory"
    return "local" if record.manager is main else "import"


class _Call:
    """One run of a piece of shared work and the pipes waiting for it."""

    __slots__ = ("args", "cancel_requested", "key", "op", "retry", "scope", "waiters")

    def __init__(self, op: SharedOp, key: tuple[int, int], args: tuple[Any, ...]) -> None:
        self.op = op
        self.key = key
        self.args = args
        self.waiters: list[Pipe] = []
        self.retry: list[_Retry] = []
        self.scope: anyio.CancelScope | None = None
        self.cancel_requested = False

    def drop(self, pipe: Pipe) -> None:
        """A waiter cancelled."""
        self.op._drop(self, pipe)


# shared empty containers (never written to; see SharedOp.__init__)
_NO_CALLS: dict[tuple[int, int], _Call] = {}
_NO_DIGESTS: dict[int, str] = {}
_NO_ERRORS: dict[int, SolveError] = {}

# the prefix of the error message of a failed call, by kind
_PREFIX = ("failed to load cache key", None, "failed to compute cache key")


class _ScopeWaiter:
    """A cache load's waiter: a cancelled pipe cancels the load."""

    __slots__ = ("scope",)

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope

    def drop(self, pipe: Pipe) -> None:
        self.scope.cancel()


class _Retry:
    """A request that arrived while a cancelled call was winding down: it asks
    again (with its own arguments) once the call has ended."""

    __slots__ = ("args", "call", "pipe")

    def __init__(self, call: _Call, pipe: Pipe, args: tuple[Any, ...]) -> None:
        self.call = call
        self.pipe = pipe
        self.args = args

    def drop(self, pipe: Pipe) -> None:
        call = self.call
        call.retry = [r for r in call.retry if r.pipe is not pipe]
        pipe.finalize(None, CANCELED)


class SharedOp:
    """The op of one active vertex and the memo of its work."""

    __slots__ = (
        "_calls",
        "_op",
        "_op_err",
        "cache_done",
        "cache_err",
        "cache_res",
        "exec_done",
        "exec_err",
        "exec_res",
        "released",
        "slow_err",
        "slow_res",
        "state",
    )

    def __init__(self, state: VertexState) -> None:
        self.state = state
        self._op: Op | None = None
        self._op_err: SolveError | None = None
        # Containers start as shared empty values and are made when first
        # written: most ops answer one cache map and compute no content key.
        self._calls: dict[tuple[int, int], _Call] = _NO_CALLS
        self.cache_res: Sequence[CacheMap] = ()
        self.cache_done = False
        self.cache_err: BaseException | None = None
        self.exec_res: list[SharedResult[Any]] | None = None
        self.exec_done = False
        self.exec_err: BaseException | None = None
        self.slow_res: dict[int, str] = _NO_DIGESTS
        self.slow_err: dict[int, SolveError] = _NO_ERRORS
        self.released = False

    # -- what edges use ------------------------------------------------------------
    def cache(self) -> CacheManager:
        return self.state.combined_cache()

    def release_later(self, result: Any) -> None:
        self.state.solver.release_later(result)

    def get_op(self) -> Op:
        if self._op is None:
            if self._op_err is not None:
                raise self._op_err
            st = self.state
            try:
                # the op's builder: its nested builds belong to this vertex
                self._op = st.solver.resolve_op(st.vtx, st.sub_builder())
            except Exception as exc:
                self._op_err = self.wrap_error(exc, "failed to resolve op")
                raise self._op_err from exc
        return self._op

    def wrap_error(self, exc: BaseException, prefix: str | None) -> SolveError:
        if isinstance(exc, SolveError):
            return exc
        v = self.state.vtx
        text = str(exc) or type(exc).__name__
        msg = f"{prefix}: {text}" if prefix else f"{v.name}: {text}"
        err = SolveError(msg, vertex=v.digest, vertex_name=v.name)
        err.__cause__ = exc
        return err

    # -- cache maps ---------------------------------------------------------------
    def request_cache_map(self, pipe: Pipe, index: int) -> None:
        memo = self.memoized_cache_map(index)
        if memo is not None:
            pipe.finalize(memo, None)
            return
        if self.cache_err is not None:
            pipe.finalize(None, self.cache_err)
            return
        if self.cache_done:
            pipe.finalize(None, SolveError(f"cache map {index} asked after the last one"))
            return
        self._join((_CACHE_MAP, index), pipe, (index,))

    def memoized_cache_map(self, index: int) -> tuple[CacheMap, bool] | None:
        """Cache map ``index`` and the done flag, as a request would be answered,
        if it is memoized already."""
        if index < len(self.cache_res):
            return self.cache_res[index], self.cache_done
        return None

    async def _cache_map_work(self, index: int) -> Callable[[Pipe], None]:
        op = self.get_op()
        cm, done = await op.cache_map(len(self.cache_res))
        if not isinstance(cm, CacheMap):
            raise SolveError(f"cache_map returned {type(cm).__name__}, not CacheMap")
        self.cache_res = (*self.cache_res, cm)
        self.cache_done = bool(done)
        value = (cm, self.cache_done)
        return lambda p: p.finalize(value, None)

    # -- exec ---------------------------------------------------------------------
    def request_exec(self, pipe: Pipe, inputs: Sequence[Result]) -> None:
        if self.exec_done:
            if self.exec_err is not None:
                pipe.finalize(None, self.exec_err)
            else:
                self._deliver_exec(pipe)
            return
        self._join((_EXEC, 0), pipe, (inputs,))

    def _deliver_exec(self, pipe: Pipe) -> None:
        assert self.exec_res is not None
        pipe.finalize([r.clone() for r in self.exec_res], None, owned=True)

    async def _exec_work(self, inputs: Sequence[Result]) -> Callable[[Pipe], None]:
        op = self.get_op()
        acquire = getattr(op, "acquire", None)
        if acquire is None:
            outputs = await self._exec_logged(op, inputs)
        else:
            cm: contextlib.AbstractAsyncContextManager[Any] = acquire()
            # An op whose resource is taken says so (report_waiting): "waiting".
            waiting = current_wait.set(functools.partial(self.state.emit, WAITING))
            try:
                await cm.__aenter__()
            except Exception as exc:
                raise self.wrap_error(exc, "acquire op resources") from None
            finally:
                current_wait.reset(waiting)
            try:
                outputs = await self._exec_logged(op, inputs)
            finally:
                with anyio.CancelScope(shield=True):
                    await cm.__aexit__(None, None, None)
        if self.released:
            for r in outputs:
                self.release_later(r)
            raise SolveError("the vertex was released while it ran")
        self.exec_res = [SharedResult(r) for r in outputs]
        self.exec_done = True
        return self._deliver_exec

    async def _exec_logged(self, op: Op, inputs: Sequence[Result]) -> list[Result]:
        st = self.state
        token = current_log.set(st.log)
        sources: list[str] = []  # what the op reports with report_cache_source
        source_token = current_cache_source.set(sources)
        try:
            st.emit(STARTED)
            try:
                outputs = list(await op.exec(inputs))
            except BaseException as exc:
                # A cancellation (no job wants the step any more, or the solver
                # is closing) says so, not the backend's text about cancel scopes.
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                st.emit(ERROR, "canceled" if cancelled else exc)
                raise
            st.emit(COMPLETED, cache_source=sources[-1] if sources else None)
        finally:
            current_cache_source.reset(source_token)
            current_log.reset(token)
        return outputs

    # -- content keys ---------------------------------------------------------------
    def request_slow_cache(
        self, pipe: Pipe, index: int, fn: ComputeDigest, res: SharedResult[Any]
    ) -> None:
        if index in self.slow_res:
            pipe.finalize(self.slow_res[index], None)
            return
        if index in self.slow_err:
            pipe.finalize(None, self.slow_err[index])
            return
        self._join((_SLOW, index), pipe, (index, fn, res))

    async def _slow_work(
        self, index: int, fn: ComputeDigest, res: SharedResult[Any]
    ) -> Callable[[Pipe], None]:
        # Hold the input for as long as its key is computed; on failure the
        # hold becomes the handle the error carries.
        held = res.clone()
        try:
            digest = await fn(held)
            if not isinstance(digest, str) or not digest:
                raise SolveError(f"compute_digest returned {digest!r}, not a digest")
        except BaseException as exc:
            if not isinstance(exc, Exception) or self.released:
                self.release_later(held)
                raise
            v = self.state.vtx
            err = SlowCacheError(
                f"failed to compute cache key: {exc}",
                index=index,
                result=held,
                vertex=v.digest,
                vertex_name=v.name,
            )
            err.__cause__ = exc
            self.state.emit(ERROR, err)
            if self.slow_err is _NO_ERRORS:
                self.slow_err = {}
            self.slow_err[index] = err
            raise err from exc
        self.release_later(held)
        if self.slow_res is _NO_DIGESTS:
            self.slow_res = {}
        self.slow_res[index] = digest
        return lambda p: p.finalize(digest, None)

    # -- cache loads ------------------------------------------------------------------
    def request_load(self, pipe: Pipe, record: CacheRecord) -> None:
        self.state.loading += 1  # answered in _load, whatever happens
        self.state.solver.spawn(self._load, pipe, record)

    async def _load(self, pipe: Pipe, record: CacheRecord) -> None:
        value: Any = None
        err: BaseException | None = None
        scope = self._unit_scope()
        pipe.waiter = _ScopeWaiter(scope)
        if pipe.canceled:
            scope.cancel()
        try:
            res = await self.cache().load(record)
            key = record.key
            value = CachedResultWithKeys(
                res, [ExportableCacheKey(key, KeyExporter(key, record=record))]
            )
            self.state.emit(CACHED, cache_source=_cache_source(record, self.state.main_cache))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            err = exc
        st = self.state
        st.loading -= 1
        if st.mark_deferred and not st.loading:
            st.mark_deferred = False
            if value is None and not st.history:
                st.emit(CACHED)  # a consumer's key matched: not needed after all
        pipe.waiter = None
        if value is not None:
            pipe.finalize(value, None, owned=True)
        elif scope.cancel_called or not isinstance(err, Exception):
            pipe.finalize(None, CANCELED)
        else:
            assert err is not None
            pipe.finalize(None, self.wrap_error(err, "failed to load cache"))

    def _unit_scope(self) -> anyio.CancelScope:
        """The cancel scope this unit of work runs in (the pool gives each unit a
        scope of its own); read before the unit's first await."""
        pool = self.state.solver._pool
        assert pool is not None
        scope = pool.unit_scope
        assert scope is not None
        return scope

    # -- the shared call ------------------------------------------------------------
    def _join(self, key: tuple[int, int], pipe: Pipe, args: tuple[Any, ...]) -> None:
        if self.released:
            pipe.finalize(None, SolveError("the vertex was released (its jobs were discarded)"))
            return
        call = self._calls.get(key)
        if call is not None and call.cancel_requested:
            retry = _Retry(call, pipe, args)
            call.retry.append(retry)
            pipe.waiter = retry
            return
        if call is None:
            if self._calls is _NO_CALLS:
                self._calls = {}
            call = self._calls[key] = _Call(self, key, args)
            self.state.solver.spawn(self._run, call)
        call.waiters.append(pipe)
        pipe.waiter = call

    def _work(self, call: _Call) -> Awaitable[Callable[[Pipe], None]]:
        kind = call.key[0]
        if kind == _CACHE_MAP:
            return self._cache_map_work(*call.args)
        if kind == _EXEC:
            return self._exec_work(*call.args)
        return self._slow_work(*call.args)

    def _reissue(self, kind: int, pipe: Pipe, args: tuple[Any, ...]) -> None:
        if kind == _CACHE_MAP:
            self.request_cache_map(pipe, *args)
        elif kind == _EXEC:
            self.request_exec(pipe, *args)
        else:
            self.request_slow_cache(pipe, *args)

    def _drop(self, call: _Call, pipe: Pipe) -> None:
        if any(not w.canceled for w in call.waiters):
            call.waiters.remove(pipe)
            pipe.waiter = None
            pipe.finalize(None, CANCELED)
            return
        # the last one: stop the work; this waiter is answered when it has stopped
        call.cancel_requested = True
        if call.scope is not None:
            call.scope.cancel()

    async def _run(self, call: _Call) -> None:
        deliver: Callable[[Pipe], None] | None = None
        err: BaseException | None = None
        cancelled = False
        scope = self._unit_scope()
        try:
            call.scope = scope
            if call.cancel_requested:
                scope.cancel()
            try:
                deliver = await self._work(call)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                err = exc
            # An outcome reached while cancellation was asked for is never kept.
            cancelled = err is not None and (scope.cancel_called or self.released)
            if err is not None and not cancelled and not isinstance(err, Exception):
                # A cancellation exception the op raised by itself is an ordinary
                # failure, unless the solver itself is being torn down.
                try:
                    await anyio.lowlevel.checkpoint_if_cancelled()
                except BaseException:
                    cancelled = True
                    raise
        finally:
            call.scope = None
            self._finish(call, deliver, err, cancelled)

    def _finish(
        self,
        call: _Call,
        deliver: Callable[[Pipe], None] | None,
        err: BaseException | None,
        cancelled: bool,
    ) -> None:
        key = call.key
        calls = self._calls
        if calls.get(key) is call:
            del calls[key]
            if not calls:
                self._calls = _NO_CALLS  # an emptied dict keeps its size
        failure: BaseException | None = None
        if cancelled or (deliver is None and err is None):
            failure = CANCELED
        elif err is not None:
            failure = self.wrap_error(err, _PREFIX[key[0]])
            self._memoize_error(key[0], failure)
        for w in call.waiters:
            w.waiter = None
            if failure is not None:
                w.finalize(None, failure)
            else:
                assert deliver is not None
                deliver(w)
        for r in call.retry:
            p = r.pipe
            p.waiter = None
            if p.canceled:
                p.finalize(None, CANCELED)
            else:
                self._reissue(key[0], p, r.args)

    def _memoize_error(self, kind: int, err: SolveError) -> None:
        if kind == _CACHE_MAP:
            self.cache_err = err
        elif kind == _EXEC:
            self.exec_done = True
            self.exec_err = err
        # content-key errors are memoized where they are made (they own a handle)

    # -- end of life ----------------------------------------------------------------
    def release(self) -> None:
        """Release the exec outputs and error handles; the vertex is gone."""
        self.released = True
        for call in list(self._calls.values()):
            if call.scope is not None:
                call.scope.cancel()
            call.cancel_requested = True
        if self.exec_res is not None:
            for r in self.exec_res:
                self.release_later(r)
            self.exec_res = None
        for err in self.slow_err.values():
            if isinstance(err, SlowCacheError):
                self.release_later(err.result)
        self.slow_err = _NO_ERRORS

