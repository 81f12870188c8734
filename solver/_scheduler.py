"""The scheduler: one dispatcher that drives every active edge's state machine.

Design (after BuildKit's ``solver/scheduler.go``, rewritten for one event loop):

* An edge never waits. Everything it asks for (an input edge's state, a cache map,
  an exec, a content key, a cache load) is a :class:`Pipe`: a request object with a
  sender side that answers (``update`` / ``finalize``) and a receiver side that may
  ``cancel``. Answering or cancelling only *signals* the edge on the other end:
  it is put on a FIFO queue, at most once at a time.
* One dispatcher task pops edges from the queue and calls ``ActiveEdge.unpark``
  with the pipes that have news. ``unpark`` is a state machine step: it processes
  updates, answers incoming requests, and opens new outgoing ones. Only the
  dispatcher mutates edge state, so there are no locks. ``unpark`` may await cache
  queries (a persistent store answers off the loop); while it does, other tasks can
  only answer or cancel pipes and enqueue edges.
* No task exists per edge or per request. Work that really awaits runs in a task
  per unit of work: one per op call shared by every edge that asked for it (see
  ``_flight.py``) and one per cache load. A build caller waits on one event.
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

from ._errors import InternalError, SlowCacheError, SolveError

if TYPE_CHECKING:
    from ._cache import CacheKey
    from ._edge import ActiveEdge
    from ._graph import Edge
    from ._result import CachedResult

__all__ = ["Canceled", "EdgeRequest", "Pipe", "Scheduler"]

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


class EdgeRequest:
    """What a requester wants from an edge, and what it has already seen.

    ``current_keys`` is how many keys the requester knew when it asked (it never
    changes: an answer with more keys may complete the request early); ``seen`` is
    the (state, result, cache map, number of keys) it last received, so an update
    that would repeat it is not sent."""

    __slots__ = ("current_keys", "desired", "seen")

    def __init__(
        self,
        desired: int,
        current_state: int = INITIAL,
        current_result: object = None,
        current_cache_map: object = None,
        current_keys: int = 0,
    ) -> None:
        self.desired = desired
        self.current_keys = current_keys
        self.seen: tuple[int, object, object, int] = (
            current_state,
            current_result,
            current_cache_map,
            current_keys,
        )


class Pipe:
    """A request and its answer.

    The sender side (``send_*``) is written by whoever answers; the receiver sees
    it only after ``receive()``, so one dispatch works on a consistent snapshot.
    ``canceled`` is the receiver's cancellation, visible to the sender at once.
    """

    __slots__ = (
        "canceled",
        "canceled_status",
        "completed",
        "err",
        "on_cancel",
        "on_send",
        "owned",
        "recv_version",
        "request",
        "scheduler",
        "send_canceled",
        "send_completed",
        "send_err",
        "send_value",
        "send_version",
        "source",
        "target",
        "value",
    )

    def __init__(
        self,
        scheduler: Scheduler,
        request: EdgeRequest | None,
        source: ActiveEdge | None,
        target: ActiveEdge | None,
    ) -> None:
        self.scheduler = scheduler
        self.request = request
        self.canceled = False
        self.source = source
        self.target = target
        self.send_value: Any = None
        self.send_err: BaseException | None = None
        self.send_completed = False
        self.send_canceled = False
        self.send_version = 0
        self.value: Any = None
        self.err: BaseException | None = None
        self.completed = False
        self.canceled_status = False
        self.recv_version = 0
        self.on_cancel: Callable[[], None] | None = None
        self.on_send: Callable[[], None] | None = None
        # Whether ``value`` holds handles that whoever takes the value must release.
        self.owned = False

    # sender side
    def update(self, value: object) -> None:
        self.send_value = value
        self.send_version += 1
        self._notify_send()

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
        self.send_version += 1
        self._notify_send()

    def _notify_send(self) -> None:
        if self.source is not None:
            self.scheduler.signal(self.source)
        elif self.on_send is not None:
            self.on_send()

    # receiver side
    def receive(self) -> bool:
        if self.recv_version == self.send_version:
            return False
        self.recv_version = self.send_version
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
        elif self.on_cancel is not None:
            self.on_cancel()

    def take(self) -> Any:
        """Take the received value, and with it the duty to release its handles."""
        self.owned = False
        return self.value

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
        self.incoming: dict[ActiveEdge, list[Pipe]] = {}
        self.outgoing: dict[ActiveEdge, list[Pipe]] = {}
        self._queue: deque[ActiveEdge] = deque()
        self._queued: set[ActiveEdge] = set()
        self._wake = anyio.Event()
        self._sleeping = False
        self._closed = False

    # -- queue -------------------------------------------------------------------
    def signal(self, edge: ActiveEdge) -> None:
        if edge in self._queued:
            return
        self._queued.add(edge)
        self._queue.append(edge)
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    async def run(self) -> None:
        """The dispatcher loop; runs until cancelled (when the solver closes)."""
        queue = self._queue
        queued = self._queued
        while True:
            while queue:
                edge = queue.popleft()
                queued.discard(edge)
                try:
                    await self._dispatch(edge)
                except Exception as exc:  # a bug: fail the edge rather than the solver
                    logger.exception("scheduler error while dispatching %r", edge)
                    self._fail_open_requests(edge, exc)
            self._wake = anyio.Event()
            self._sleeping = True
            await self._wake.wait()

    def close(self) -> None:
        """Answer every open request with "cancelled" (the solver is closing)."""
        self._closed = True
        for pipes in list(self.incoming.values()):
            for p in pipes:
                if not p.send_completed:
                    p.finalize(None, SolveError("the solver was closed"))

    def _fail_open_requests(self, edge: ActiveEdge, exc: Exception) -> None:
        err = InternalError(f"scheduler error: {exc}")
        err.__cause__ = exc
        edge.err = edge.err or err
        for p in self.incoming.get(edge, ()):
            if not p.send_completed:
                p.finalize(None, edge.err)
        for p in self.outgoing.get(edge, ()):
            p.cancel()

    # -- dispatch ----------------------------------------------------------------
    async def _dispatch(self, e: ActiveEdge) -> None:
        inc = list(self.incoming.get(e, ()))
        out = list(self.outgoing.get(e, ()))
        e.has_active_outgoing = False
        updates: list[Pipe] = []
        for p in out:
            if p.receive():
                updates.append(p)
            if not p.completed:
                e.has_active_outgoing = True

        await e.unpark(inc, updates, out, self)

        # A finished request whose handles the edge did not take (it was merged
        # away, or the answer came after the edge moved on) is released here.
        for p in updates:
            if p.owned:
                p.owned = False
                self.factory.release_later(p.value)

        open_seen = any(not p.send_completed for p in inc)
        incoming = self.incoming.get(e)
        if incoming is not None:
            still = [p for p in incoming if not p.send_completed]
            if still:
                self.incoming[e] = still
            else:
                del self.incoming[e]
        open_out = False
        outgoing = self.outgoing.get(e)
        if outgoing is not None:
            still_out = [p for p in outgoing if not p.completed]
            if still_out:
                self.outgoing[e] = still_out
                open_out = True
            else:
                del self.outgoing[e]

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
        if open_out and e not in self.incoming:
            e.mark_failed(
                self,
                InternalError("scheduler error: return leaving outgoing open; please report it"),
            )

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
        for p in self.incoming.pop(src, ()):
            p.target = target
            self.incoming.setdefault(target, []).append(p)
        for p in self.outgoing.pop(src, ()):
            p.source = target
            self.outgoing.setdefault(target, []).append(p)
            p.cancel()
        self.signal(target)
        target.add_secondary_exporters(src)
        return True

    # -- pipes -------------------------------------------------------------------
    def new_pipe(self, target: ActiveEdge, source: ActiveEdge | None, req: EdgeRequest) -> Pipe:
        p = Pipe(self, req, source, target)
        self.signal(target)
        if source is not None:
            self.outgoing.setdefault(source, []).append(p)
        self.incoming.setdefault(target, []).append(p)
        return p

    def new_func_pipe(self, source: ActiveEdge) -> Pipe:
        """An outgoing request of ``source`` answered by async work, not an edge."""
        p = Pipe(self, None, source, None)
        self.outgoing.setdefault(source, []).append(p)
        return p

    def new_input_request(self, source: ActiveEdge, edge: Edge, req: EdgeRequest) -> Pipe:
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
        return self.new_pipe(target, source, req)

    def postpone(self, source: ActiveEdge) -> Pipe:
        """A request that is answered at once: it makes the edge dispatch again."""
        p = self.new_func_pipe(source)
        p.finalize(None, None)
        return p

    # -- the entry point of a build ---------------------------------------------
    async def build(self, edge: Edge) -> CachedResult:
        # A caller cancelled before it starts asks for nothing.
        await anyio.lowlevel.checkpoint_if_cancelled()
        e = self.factory.get_edge(edge)
        if e is None:
            raise InternalError(f"invalid request {edge!r} for build")
        if self._closed:
            raise SolveError("the solver was closed")
        done = anyio.Event()
        p = self.new_pipe(e, None, EdgeRequest(COMPLETE))

        def on_send() -> None:
            if p.send_completed:
                done.set()

        p.on_send = on_send
        try:
            await done.wait()
        except BaseException:
            p.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
            raise
        p.receive()
        if p.err is not None:
            err = p.err
            if isinstance(err, Canceled):
                raise SolveError("the build was cancelled by the engine") from None
            if isinstance(err, SolveError):
                raise _hand_out(err)
            raise InternalError(f"unexpected error: {err!r}") from err
        edge_state = p.value
        return edge_state.result.clone()  # type: ignore[no-any-return]


def _hand_out(err: SolveError) -> SolveError:
    copy = err._copy()
    if isinstance(err, SlowCacheError):
        assert isinstance(copy, SlowCacheError)
        copy.result = err.result._share()  # type: ignore[attr-defined]
    return copy
