"""The scheduler: one dispatcher that drives every active edge's state machine.

Design (after BuildKit's ``solver/scheduler.go``, rewritten for one event loop):

* An edge never waits. Everything it asks for (an input edge's state, a cache map,
  an exec, a content key, a cache load) is a :class:`Pipe`: a request object with a
  sender side that answers (``update`` / ``finalize``) and a receiver side that may
  ``cancel``. Answering or cancelling only *signals* the edge on the other end:
  it is put on a FIFO queue, at most once at a time (a flag on the edge).
* The dispatcher (:meth:`Scheduler.drain`, run by whichever worker of the solver's
  ``WorkPool`` holds the dispatcher's role) pops edges from the queue and calls
  ``ActiveEdge.unpark`` with the pipes that have news. ``unpark`` is a state
  machine step: it processes updates, answers incoming requests, and opens new
  outgoing ones. Only the dispatcher mutates edge state, so there are no locks.
  ``unpark`` may await cache queries (a persistent store answers off the loop);
  while it does, other tasks can only answer or cancel pipes and enqueue edges.
* No task exists per edge or per request. Work that really awaits (an op call
  shared by every edge that asked for it, see ``_sharedop.py``, or a cache load)
  is a unit of work on the pool, run in the dispatcher's own task when it does
  not block. A build caller waits on one event.
* Each edge keeps its own lists of incoming and outgoing pipes, so a dispatch
  looks nothing up. A request pipe carries what the requester wants (``desired``)
  and what it last received, so an update that would repeat it is not sent.
* After ``unpark``, two invariants are checked (an edge with open incoming requests
  must have open outgoing work, and one with none must have no open outgoing
  work); a violation fails the edge with an internal error instead of hanging.
* After ``unpark``, if the edge's keys changed, the live edge index is asked
  whether another edge already owns an equal key; if so the two are merged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio

from .._errors import InternalError, SlowCacheError, SolveError

if TYPE_CHECKING:
    from .._cache import CacheKey
    from .._graph import Edge
    from .._result import CachedResult

    # type-only: _edge builds on this module (the scheduler drives edges)
    from ._edge import ActiveEdge
    from ._workpool import WorkPool

__all__ = ["Canceled", "Pipe", "Scheduler"]

logger = logging.getLogger("solver")

# Edge states, in order.
INITIAL: Final = 0
CACHE_FAST: Final = 1
CACHE_SLOW: Final = 2
COMPLETE: Final = 3
STATE_NAMES: Final = ("initial", "cache-fast", "cache-slow", "complete")


class Canceled(Exception):
    """A request was answered with "cancelled" (internal; never reaches users)."""


CANCELED: Final = Canceled("canceled")


class Waiter(Protocol):
    """What a pipe answered by a unit of work tells when its receiver cancels."""

    def drop(self, pipe: Pipe) -> None: ...


class Pipe:
    """A request and its answer.

    The sender side (``send_*``) is written by whoever answers; the receiver sees
    it only after ``receive()``, so one dispatch works on a consistent snapshot.
    ``canceled`` is the receiver's cancellation, visible to the sender at once.

    A request to an edge also says what the requester wants (``desired``), how
    many keys it knew when it asked (``current_keys``: an answer with more keys
    may complete it early) and the (state, result, cache map, number of keys) it
    last received (``seen_*``: its state, result and number of keys), so that an
    update repeating them is not sent.
    """

    __slots__ = (
        "canceled",
        "canceled_status",
        "completed",
        "current_keys",
        "dep",
        "desired",
        "err",
        "news",
        "on_send",
        "owned",
        "scheduler",
        "seen_keys",
        "seen_result",
        "seen_state",
        "send_canceled",
        "send_completed",
        "send_err",
        "send_value",
        "source",
        "target",
        "value",
        "waiter",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        source: ActiveEdge | None,
        target: ActiveEdge | None,
        desired: int = INITIAL,
        current_state: int = INITIAL,
        current_result: object = None,
        current_keys: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.source = source
        self.target = target
        self.desired = desired
        self.current_keys = current_keys
        self.seen_state = current_state
        self.seen_result = current_result
        self.seen_keys = current_keys
        self.canceled = False
        self.send_value: Any = None
        self.send_err: BaseException | None = None
        self.send_completed = False
        self.send_canceled = False
        self.news = False
        self.value: Any = None
        self.err: BaseException | None = None
        self.completed = False
        self.canceled_status = False
        # who answers a pipe that has no target edge, told when it is cancelled
        self.waiter: Waiter | None = None
        self.on_send: Callable[[], None] | None = None
        # Whether ``value`` holds handles that whoever takes the value must release.
        self.owned = False
        # for a request to an input edge: the requester's record of that input
        # (``_edge._Dep``), until the answer is complete
        self.dep: Any = None

    # sender side
    def update(self, value: object) -> None:
        self.send_value = value
        self.news = True
        if self.source is not None:
            self.scheduler.signal(self.source)
        elif self.on_send is not None:
            self.on_send()

    def finalize(self, value: object, err: BaseException | None, *, owned: bool = False) -> None:
        if self.send_completed:
            if self.scheduler._closed:
                # Closing answered every open request; an edge that answers its
                # request later (its work ended with the solver) is too late.
                if owned and err is None:
                    self.scheduler.factory.release_later(value)
                return
            raise InternalError("a request was answered twice")
        self.send_value = value
        self.send_err = err
        self.send_completed = True
        self.owned = owned and err is None
        if self.canceled and isinstance(err, Canceled):
            self.send_canceled = True
        self.news = True
        if self.source is not None:
            self.scheduler.signal(self.source)
        elif self.on_send is not None:
            self.on_send()

    # receiver side
    def receive(self) -> bool:
        if not self.news:
            return False
        self.news = False
        self.value = self.send_value
        self.err = self.send_err
        self.completed = self.send_completed
        self.canceled_status = self.send_canceled
        return True

    def cancel(self) -> None:
        if self.canceled:
            return
        self.canceled = True
        if self.target is not None:
            self.scheduler.signal(self.target)
        elif self.waiter is not None:
            self.waiter.drop(self)

    def take(self) -> Any:
        """Take the received value, and with it the duty to release its handles
        (the pipe lets go of it)."""
        self.owned = False
        value = self.value
        self.value = self.send_value = None
        return value

    def __repr__(self) -> str:
        return (
            f"<Pipe {self.source!r} -> {self.target!r} canceled={self.canceled} "
            f"completed={self.send_completed}>"
        )


class EdgeFactory(Protocol):
    def get_edge(self, edge: Edge) -> ActiveEdge | None: ...
    def set_edge(self, edge: Edge, target: ActiveEdge) -> None: ...
    def has_owner(self, target: Edge, owner: Edge) -> bool: ...
    def release_later(self, result: object) -> None: ...


class Scheduler:
    """Runs the dispatcher. ``signal`` is cheap and synchronous; ``build`` waits."""

    def __init__(self, factory: EdgeFactory) -> None:
        self.factory = factory
        self._queue: deque[ActiveEdge] = deque()
        # the open requests of build callers (answered when the solver closes)
        self._builds: set[Pipe] = set()
        self._pool: WorkPool | None = None
        self._closed = False
        # the edge being dispatched, and whether it was signalled meanwhile
        self._current: ActiveEdge | None = None
        self._again = False

    # -- queue -------------------------------------------------------------------
    def attach(self, pool: WorkPool) -> None:
        """Run the dispatcher on ``pool`` (the solver does this when it starts)."""
        self._pool = pool

    def signal(self, edge: ActiveEdge) -> None:
        if edge.queued:
            return
        if edge is self._current:
            # the edge being dispatched signalled itself (an answer it got at
            # once, a postponement): it runs again as soon as this dispatch ends
            self._again = True
            return
        edge.queued = True
        self._queue.append(edge)
        pool = self._pool
        if pool is not None and not pool.dispatching:
            pool.notify()

    def building(self) -> bool:
        """Whether a build caller is waiting for an answer."""
        return bool(self._builds)

    def pending(self) -> bool:
        """Whether an edge is waiting to be dispatched."""
        return bool(self._queue)

    async def drain(self) -> None:
        """Dispatch signalled edges until none is left (the pool calls this in the
        one worker that holds the dispatcher's role)."""
        queue = self._queue
        while queue:
            await self._dispatch_next(queue.popleft())

    async def _dispatch_next(self, edge: ActiveEdge) -> None:
        # a frame of its own: the last edge dispatched must not stay referenced
        # by the drain loop (it holds a whole graph)
        edge.queued = False
        self._current = edge
        try:
            while True:
                self._again = False
                await self._dispatch(edge)
                if not self._again:
                    break
        except Exception as exc:  # a bug: fail the edge rather than the solver
            logger.exception("scheduler error while dispatching %r", edge)
            self._fail_open_requests(edge, exc)
        finally:
            self._current = None

    def close(self) -> None:
        """Answer every open build request with an error (the solver is closing)."""
        self._closed = True
        for p in list(self._builds):
            if not p.send_completed:
                p.finalize(None, SolveError("the solver was closed"))
                # no dispatch may answer it again
                target = p.target
                if target is not None:
                    target.incoming = [q for q in target.incoming if q is not p] or ()

    def _fail_open_requests(self, edge: ActiveEdge, exc: Exception) -> None:
        err = InternalError(f"scheduler error: {exc}")
        err.__cause__ = exc
        edge.err = edge.err or err
        for p in edge.incoming:
            if not p.send_completed:
                p.finalize(None, edge.err)
        for p in edge.outgoing:
            p.cancel()

    # -- dispatch ----------------------------------------------------------------
    async def _dispatch(self, e: ActiveEdge) -> None:
        inc = e.incoming
        out = e.outgoing
        if inc:
            inc = inc[:]
        has_active = False
        updates: list[Pipe] = []
        if out:
            out = out[:]
            for p in out:
                if p.news:
                    p.receive()
                    updates.append(p)
                if not p.completed:
                    has_active = True
        e.has_active_outgoing = has_active

        await e.unpark(inc, updates, out, self)

        # A finished request whose handles the edge did not take (it was merged
        # away, or the answer came after the edge moved on) is released here.
        for p in updates:
            if p.owned:
                p.owned = False
                self.factory.release_later(p.value)

        open_seen = False
        for p in inc:
            if not p.send_completed:
                open_seen = True
                break
        # (an edge with no open pipe holds no list)
        incoming = e.incoming
        if incoming:
            for p in incoming:
                if p.send_completed:
                    e.incoming = [p for p in incoming if not p.send_completed] or ()
                    break
        open_out = False
        outgoing = e.outgoing
        if outgoing:
            for p in outgoing:
                if p.completed:
                    outgoing = e.outgoing = [p for p in outgoing if not p.completed] or ()
                    break
            open_out = bool(outgoing)
        if not open_out and (e.result is not None or not e.incoming):
            e.settle()

        if e.keys_did_change:
            k = e.current_index_key()
            if k is not None:
                self._try_merge(e, k)
            e.keys_did_change = False

        if open_seen and not open_out:
            e.mark_failed(
                self,
                InternalError("scheduler error: return leaving incoming open; please report it"),
            )
        if open_out and not e.incoming:
            e.mark_failed(
                self,
                InternalError("scheduler error: return leaving outgoing open; please report it"),
            )

    def index_now(self, e: ActiveEdge) -> bool:
        """Index ``e``'s changed keys now, during its dispatch, before it starts
        work (a load or an exec): an equal live edge found here merges with it
        first. False if ``e`` was merged away (its requesters moved to the other
        edge, which does the work); it must then not start any.

        This is the end-of-dispatch index step, brought forward: the edge need
        not postpone itself and dispatch again only to be indexed."""
        e.keys_did_change = False
        k = e.current_index_key()
        if k is not None:
            self._try_merge(e, k)
        return e.owner is None

    def _try_merge(self, e: ActiveEdge, key: CacheKey) -> None:
        orig = e.index.load_or_store(key, e)
        if orig is None:
            return
        if e.is_dep(orig) or orig.is_dep(e):
            return
        dest, src = orig, e
        if self.factory.has_owner(orig.edge, e.edge):
            dest, src = src, dest
        if self._merge_to(dest, src):
            self.factory.set_edge(src.edge, dest)

    def _merge_to(self, target: ActiveEdge, src: ActiveEdge) -> bool:
        if not target.ignore_cache and src.ignore_cache:
            return False
        # Only open pipes move: a merge found by index_now happens during the
        # source's dispatch, before its answered pipes are dropped.
        moved, src.incoming = src.incoming, ()
        for p in moved:
            if not p.send_completed:
                p.target = target
                _add_incoming(target, p)
        moved, src.outgoing = src.outgoing, ()
        for p in moved:
            if not p.completed:
                p.source = target
                _add_outgoing(target, p)
                p.cancel()
        self.signal(target)
        target.add_secondary_exporters(src)
        return True

    # -- pipes -------------------------------------------------------------------
    def new_func_pipe(self, source: ActiveEdge) -> Pipe:
        """An outgoing request of ``source`` answered by async work, not an edge."""
        p = Pipe(self, source, None)
        _add_outgoing(source, p)
        return p

    def new_input_request(
        self,
        source: ActiveEdge,
        edge: Edge,
        desired: int,
        current_state: int,
        current_result: object,
        current_keys: int,
    ) -> Pipe:
        """A request of ``source`` to the active edge of its input ``edge``."""
        target = self.factory.get_edge(edge)
        if target is None:
            p = self.new_func_pipe(source)
            p.finalize(
                None,
                InternalError(
                    f"failed to get edge: inconsistent graph state in edge "
                    f"{edge.vertex.name} {edge.vertex.digest} {edge.index}"
                ),
            )
            return p
        p = Pipe(
            self,
            source,
            target,
            desired,
            current_state,
            current_result,
            current_keys,
        )
        self.signal(target)
        _add_outgoing(source, p)
        _add_incoming(target, p)
        return p

    def postpone(self, source: ActiveEdge) -> Pipe:
        """A request that is answered at once: it makes the edge dispatch again."""
        p = self.new_func_pipe(source)
        p.finalize(None, None)
        return p

    # -- the entry point of a build ---------------------------------------------
    async def build(self, edge: Edge) -> CachedResult:
        # A caller cancelled before it starts asks for nothing.
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            # (a build the closing solver answered on the cold path gets here
            # with its states discarded already)
            raise SolveError("the solver was closed")
        e = self.factory.get_edge(edge)
        if e is None:
            raise InternalError(f"invalid request {edge!r} for build")
        done = anyio.Event()
        p = Pipe(self, None, e, COMPLETE)

        def on_send() -> None:
            if p.send_completed:
                done.set()

        p.on_send = on_send
        builds = self._builds
        builds.add(p)
        _add_incoming(e, p)
        self.signal(e)
        try:
            try:
                await done.wait()
            except BaseException:
                p.cancel()
                with anyio.CancelScope(shield=True):
                    await done.wait()
                raise
        finally:
            builds.discard(p)
        p.receive()
        if p.err is not None:
            err = p.err
            if isinstance(err, Canceled):
                raise SolveError("the build was cancelled by the engine") from None
            if isinstance(err, SolveError):
                raise hand_out(err)
            raise InternalError(f"unexpected error: {err!r}") from err
        edge_state = p.value
        return edge_state.result.clone()  # type: ignore[no-any-return]


def _add_incoming(edge: ActiveEdge, p: Pipe) -> None:
    if edge.incoming:
        edge.incoming.append(p)
    else:
        edge.incoming = [p]


def _add_outgoing(edge: ActiveEdge, p: Pipe) -> None:
    if edge.outgoing:
        edge.outgoing.append(p)
    else:
        edge.outgoing = [p]


def hand_out(err: SolveError) -> SolveError:
    copy = err._copy()
    if isinstance(err, SlowCacheError):
        assert isinstance(copy, SlowCacheError)
        copy.result = err.result._share()  # type: ignore[attr-defined]
    return copy
