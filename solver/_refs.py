"""Reference counting: one value, many handles, released exactly once.

An op result is used by many consumers at once (the op's own bookkeeping, the edge
that stores it, every caller that asked for it), and a frontend's lazy result is
handed to several holders. Each consumer gets its own *handle*; the wrapped value
is released once, when the last handle goes.

Design
------

A *shared counter* (:class:`_RefCount`) holds the wrapped value and the number
of live handles on it (one :class:`threading.Lock` serves every counter). An owner
(:class:`SharedResult`, :class:`SharedCachedResult`) is its own counter, one
object rather than two; the halves of a split proxy share a counter of their
own. A *handle* (:class:`SharedResult`, :class:`SharedResultHandle`,
:class:`SharedCachedResult`, :class:`SharedCachedResultHandle`,
:class:`ResultProxyHalf`) holds a reference to its counter (an owner, none) and
a per-handle state (live, released, or consumed by a split). There
is no tree of wrappers: handing out one more handle (``SharedResult.clone()``,
``_share()``, splitting a half again) adds one to the same counter, so a release
costs the same however many handles exist.

The per-handle flag is what makes a double release harmless: a second
``release()`` of one handle finds the flag already set, logs at ERROR on the
``solver`` logger, raises :class:`~solver.DoubleReleaseError` and does not touch
the counter. A counter alone could not tell "the same handle twice" from "two
handles once each" and would release the value while another holder still uses
it.

The lock is a :class:`threading.Lock`, not an anyio lock, because releases come
from many places at once: tasks of one event loop, cancelled tasks, and worker
threads (through ``anyio.from_thread``), possibly of different event loops. The
critical section is a few attribute writes and never awaits: check and set the
handle's flag, decrement the counter, and decide "this was the last handle". That
decision is made under the lock, so exactly one release sees the counter reach
zero, and once at zero the counter can never be raised again (adding a handle
requires a live handle to add it from, checked under the same lock).

The value's own ``release()`` is awaited outside the lock, by the task whose
release was the last one, inside ``anyio.CancelScope(shield=True)``: a release that
has begun must finish even if its caller is cancelled, or the value would leak
with nobody left to release it. ``release()`` of a handle is therefore never a
cancel point; it always yields to the scheduler once (a cancel-shielded
checkpoint), so whether it yields does not depend on whether it was the last
handle.

``__del__`` never releases anything: releasing needs an event loop, and doing it
from the garbage collector would hide the bug that dropped the handle. When a
test installs a tracker (:mod:`solver.testing`), a handle collected without being
released emits a :class:`ResourceWarning`.

The tracker hook (``_tracker``) is a module global that is ``None`` outside tests.
Every handle creation, release and double release tests it once; when set it is
told ``created(handle)``, ``released(handle)`` (also for a half consumed by a
split) and ``double_released(handle)`` (any misuse that raises
``DoubleReleaseError``: a second release, or a split, clone or share of a released
handle). Handles use ``__slots__`` and allocate nothing besides themselves.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Protocol, TypeVar, cast

import anyio
import anyio.lowlevel

from ._errors import DoubleReleaseError, SolveError
from ._result import CachedResult, Result, ResultProxy

if TYPE_CHECKING:
    from ._cache import ExportableCacheKey

__all__ = [
    "CachedResultWithKeys",
    "ResultProxyHalf",
    "SharedCachedResult",
    "SharedCachedResultHandle",
    "SharedResult",
    "SharedResultHandle",
    "split_result_proxy",
]

_log = logging.getLogger("solver")


class _Value(Protocol):
    """What a counter can wrap: anything with an ``id`` and an async ``release()``."""

    @property
    def id(self) -> str: ...

    async def release(self) -> None: ...


class _TrackerHook(Protocol):
    """What ``_tracker`` is told; :class:`solver.testing.HandleTracker` implements it."""

    def created(self, handle: object) -> None: ...

    def released(self, handle: object) -> None: ...

    def double_released(self, handle: object) -> None: ...


_tracker: _TrackerHook | None = None


def _set_tracker(tracker: _TrackerHook | None) -> _TrackerHook | None:
    """Install ``tracker`` (or none) and return the one it replaces."""
    global _tracker
    previous, _tracker = _tracker, tracker
    return previous


V = TypeVar("V", bound=_Value)
R = TypeVar("R", bound=Result)

# Handle states. A consumed handle was given to split_result_proxy, which moved its
# count to the two new halves; it is "released" for every purpose but the message.
_LIVE: Final = 0
_RELEASED: Final = 1
_CONSUMED: Final = 2


class _RefCount(Generic[V]):
    """The counter shared by every handle on one value. ``live`` is only changed
    under ``lock``; when it reaches 0 the value is released and it stays 0.

    ``lock`` is one lock for every counter: its critical sections are a few
    attribute writes and never take another lock, so sharing it costs nothing,
    while a lock per counter was two GC-tracked objects per vertex of a build
    (of the 41 it leaves alive, each walked by every full collection).

    This base holds no fields: an owner (:class:`SharedResult`) is its own
    counter, so that an owner and its counter are one object (a build keeps
    two owners per vertex: the op's and the edge's); :class:`_Counter` is a
    counter alone (the halves of a split proxy share one)."""

    __slots__ = ()

    lock: ClassVar[threading.Lock] = threading.Lock()


class _Counter(_RefCount[V]):
    """A counter that is no handle (see :class:`_RefCount`)."""

    __slots__ = ("live", "value")

    def __init__(self, value: V, live: int) -> None:
        self.value = value
        self.live = live


class _Handle(Generic[V]):
    """One handle on a shared counter. The constructor does not count: whoever
    builds a handle has already added it to ``count.live``. ``count`` None: the
    handle is its own counter (an owner); it does not point at itself, which
    would be a reference cycle that only the cyclic collector could free."""

    __slots__ = ("_link", "_state")

    def __init__(self, count: _Counter[V] | None) -> None:
        self._link = count
        self._state: int = _LIVE
        if _tracker is not None:
            _tracker.created(self)

    @property
    def _count(self) -> _Counter[V]:
        """The counter this handle counts against (itself, for an owner, which
        has a counter's fields and is typed as one)."""
        link = self._link
        return link if link is not None else cast("_Counter[V]", self)

    @property
    def id(self) -> str:
        """The wrapped value's ``id``; every handle on one value reports the same."""
        return self._count.value.id

    @property
    def released(self) -> bool:
        """True once this handle was released (or consumed by a split). O(1)."""
        return self._state != _LIVE

    async def release(self) -> None:
        """Release this handle; the last one releases the wrapped value.

        Exactly once per handle: a second call logs at ERROR on the ``solver``
        logger and raises :class:`~solver.DoubleReleaseError`, changing no count.
        Never a cancel point: the wrapped value's release runs shielded, so it
        completes even if the caller is cancelled. Always yields to the scheduler
        once (except when it raises DoubleReleaseError). An exception from the
        wrapped value's release propagates; the handle stays released. O(1).
        """
        count = self._count
        last = False
        with count.lock:
            ok = self._state == _LIVE
            if ok:
                self._state = _RELEASED
                count.live -= 1
                last = count.live == 0
        if not ok:
            raise self._misuse("releasing")
        tracker = _tracker
        if tracker is not None:
            tracker.released(self)
        if last:
            with anyio.CancelScope(shield=True):
                await count.value.release()
        await anyio.lowlevel.cancel_shielded_checkpoint()

    def _attach(self, action: str) -> _Counter[V]:
        """Count one more handle on this handle's counter, which must be live."""
        count = self._count
        with count.lock:
            if self._state == _LIVE:
                count.live += 1
                return count
        raise self._misuse(action)

    def _check_live(self, action: str) -> None:
        if self._state != _LIVE:
            raise self._misuse(action)

    def _misuse(self, action: str) -> DoubleReleaseError:
        if self._state == _CONSUMED:
            message = f"{action} reference {self.id} that split_result_proxy consumed"
        else:
            message = f"{action} already released reference {self.id}"
        _log.error("%s: %r", message, self)
        tracker = _tracker
        if tracker is not None:
            tracker.double_released(self)
        return DoubleReleaseError(message)

    def __repr__(self) -> str:
        state = ("", " released", " consumed")[self._state]
        return f"<{type(self).__name__} {self.id}{state} live={self._count.live}>"

    def __del__(self) -> None:
        # Never release here (no event loop, and it would hide the leak); only warn,
        # and only while a test tracks handles, so that this stays a single check.
        if _tracker is not None and getattr(self, "_state", _RELEASED) == _LIVE:
            warnings.warn(
                f"{type(self).__name__} {self.id} was never released",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )


class SharedResult(_Handle[R], _RefCount[R]):
    """The owner of one result that many consumers share.

    ``SharedResult(result)`` takes over ``result``. The ``SharedResult`` is itself a
    handle (released by :meth:`release`); :meth:`clone` hands out more handles on
    the same counter. The wrapped result is released exactly once, after the owner
    and every handed-out handle have been released. ``id`` and ``sys`` are the
    wrapped result's.
    """

    __slots__ = ("live", "value")

    def __init__(self, result: R) -> None:
        self.value = result
        self.live = 1
        super().__init__(None)

    @property
    def sys(self) -> object:
        """The wrapped result's ``sys``."""
        return self._count.value.sys

    def clone(self) -> SharedResultHandle[R]:
        """A new handle that shares this owner's counter (unlike a handle's own
        ``clone()``). Raises DoubleReleaseError if the owner was released. O(1)."""
        return SharedResultHandle(self._attach("cloning"))

    def _share(self) -> SharedResultHandle[R]:
        return SharedResultHandle(self._attach("sharing"))


class SharedResultHandle(_Handle[R]):
    """A handle handed out by :meth:`SharedResult.clone`; a :class:`~solver.Result`.

    Its release counts against the owner's counter. ``id`` and ``sys`` are the
    wrapped result's. Its :meth:`clone` is the wrapped result's ``clone()``: a new,
    independent handle that keeps the value alive by itself and shares no counter.
    Not constructed directly.
    """

    __slots__ = ()

    @property
    def sys(self) -> object:
        """The wrapped result's ``sys``."""
        return self._count.value.sys

    def clone(self) -> Result:
        """The wrapped result's ``clone()``: an independent handle, not counted here.
        Raises DoubleReleaseError if this handle was released."""
        self._check_live("cloning")
        return self._count.value.clone()

    def _share(self) -> SharedResultHandle[R]:
        return SharedResultHandle(self._attach("sharing"))


class SharedCachedResultHandle(SharedResultHandle[CachedResult]):
    """A :class:`SharedResultHandle` that is also a :class:`~solver.CachedResult`.

    ``cache_keys`` are the wrapped cached result's. :meth:`clone` is the wrapped
    result's ``clone()`` paired with those keys (a :class:`CachedResultWithKeys`).
    """

    __slots__ = ()

    @property
    def cache_keys(self) -> Sequence[ExportableCacheKey]:
        """The wrapped cached result's ``cache_keys``."""
        return self._count.value.cache_keys

    def clone(self) -> CachedResultWithKeys:
        """An independent handle (the wrapped result's ``clone()``) with the same
        keys. Raises DoubleReleaseError if this handle was released."""
        self._check_live("cloning")
        value = self._count.value
        keys = value.cache_keys
        clone = value.clone()
        if isinstance(clone, CachedResultWithKeys) and clone.cache_keys is keys:
            return clone  # already the same pair: do not wrap it twice
        return CachedResultWithKeys(clone, keys)

    def _share(self) -> SharedCachedResultHandle:
        return SharedCachedResultHandle(self._attach("sharing"))


class SharedCachedResult(SharedResult[CachedResult]):
    """A :class:`SharedResult` over a cached result, itself a cached result.

    ``cache_keys`` are the wrapped result's. :meth:`clone` hands out a
    :class:`SharedCachedResultHandle`: counter-sharing, and also a cached result.
    """

    __slots__ = ()

    @property
    def cache_keys(self) -> Sequence[ExportableCacheKey]:
        """The wrapped cached result's ``cache_keys``."""
        return self._count.value.cache_keys

    def clone(self) -> SharedCachedResultHandle:
        """A new handle sharing this owner's counter, with the same ``cache_keys``.
        Raises DoubleReleaseError if the owner was released. O(1)."""
        return SharedCachedResultHandle(self._attach("cloning"))

    def _share(self) -> SharedCachedResultHandle:
        return SharedCachedResultHandle(self._attach("sharing"))


class CachedResultWithKeys:
    """A pair of a result and the cache keys it is stored under: one handle.

    It counts no other handles: ``release()`` releases the result, ``id`` and
    ``sys`` are the result's, and ``clone()`` pairs ``result.clone()`` with the same
    keys (the keys sequence is shared, not copied). It is a handle of its own all
    the same: every clone the engine makes of a caller's value for a cached result
    (a build's result, each handle of a :class:`~solver.SolveResult`) is one of
    these, so it reports to the handle tracker (:mod:`solver.testing`) even when
    the value's own type does not, and a second ``release()`` raises
    :class:`~solver.DoubleReleaseError` without touching the value.
    """

    __slots__ = ("__weakref__", "_keys", "_released", "_result")

    def __init__(self, result: Result, cache_keys: Sequence[ExportableCacheKey]) -> None:
        self._result = result
        self._keys = cache_keys
        self._released = False
        if _tracker is not None:
            _tracker.created(self)

    @property
    def result(self) -> Result:
        """The paired result."""
        return self._result

    @property
    def cache_keys(self) -> Sequence[ExportableCacheKey]:
        """The paired keys."""
        return self._keys

    @property
    def id(self) -> str:
        """The result's ``id``."""
        return self._result.id

    @property
    def sys(self) -> object:
        """The result's ``sys``."""
        return self._result.sys

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    async def release(self) -> None:
        """Release the result. A second call logs at ERROR on the ``solver`` logger
        and raises :class:`~solver.DoubleReleaseError`, releasing nothing."""
        if self._released:
            raise self._misuse("releasing")
        self._released = True
        if _tracker is not None:
            _tracker.released(self)
        with anyio.CancelScope(shield=True):
            await self._result.release()

    def clone(self) -> CachedResultWithKeys:
        """``result.clone()`` with the same keys. Raises DoubleReleaseError if this
        handle was released."""
        if self._released:
            raise self._misuse("cloning")
        return CachedResultWithKeys(self._result.clone(), self._keys)

    def _misuse(self, action: str) -> DoubleReleaseError:
        message = f"{action} already released reference {self.id}"
        _log.error("%s: %r", message, self)
        if _tracker is not None:
            _tracker.double_released(self)
        return DoubleReleaseError(message)

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<CachedResultWithKeys{state} keys={len(self._keys)} of {self._result!r}>"

    def __del__(self) -> None:
        if _tracker is not None and not getattr(self, "_released", True):
            warnings.warn(
                f"CachedResultWithKeys {self.id} was never released",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )


class ResultProxyHalf(_Handle[ResultProxy]):
    """One handle on a split :class:`~solver.ResultProxy`; itself a ResultProxy.

    ``id`` and ``definition`` are the wrapped proxy's; :meth:`result` returns what
    the wrapped proxy's ``result()`` returns (the proxy shares one evaluation). The
    wrapped proxy is released once, after every half on its counter is. Made by
    :func:`split_result_proxy`, never constructed directly.
    """

    __slots__ = ()

    @property
    def definition(self) -> Any:
        """The wrapped proxy's ``definition``."""
        return self._count.value.definition

    async def result(self) -> CachedResult:
        """The wrapped proxy's ``result()``, asked again on every call.

        Raises :class:`~solver.SolveError` ("accessing released result") once this
        half was released or consumed by a split.
        """
        if self._state != _LIVE:
            raise SolveError(f"accessing released result {self.id}")
        return await self._count.value.result()

    def _share(self) -> ResultProxyHalf:
        return ResultProxyHalf(self._attach("sharing"))


def split_result_proxy(proxy: ResultProxy) -> tuple[ResultProxyHalf, ResultProxyHalf]:
    """Two handles on one result proxy, with the same ``id`` and one evaluation.

    The split consumes ``proxy``: from then on only the halves are released. A
    proxy the engine made (a bridge's lazy result, or a half) is marked consumed: a
    later release of it logs at ERROR and raises
    :class:`~solver.DoubleReleaseError`, changing no count. If ``proxy`` is a half,
    the two new halves join its counter, so splitting again never builds a chain of
    wrappers. Splitting a released or consumed proxy raises DoubleReleaseError. The
    wrapped proxy is released exactly once, after every half has been released. O(1).
    """
    if isinstance(proxy, ResultProxyHalf):
        count = proxy._count
        with count.lock:
            ok = proxy._state == _LIVE
            if ok:
                proxy._state = _CONSUMED
                count.live += 1
        if not ok:
            raise proxy._misuse("splitting")
        tracker = _tracker
        if tracker is not None:
            tracker.released(proxy)
    else:
        # A proxy of the engine's own (DefinitionProxy) is marked consumed, so that
        # its own release() is refused from now on, and hands over the object
        # through which the halves evaluate and release it. A foreign proxy cannot
        # be marked: its holder must simply stop using it.
        consume = getattr(proxy, "_consume_for_split", None)
        inner: ResultProxy = consume() if consume is not None else proxy
        count = _Counter(inner, 2)
    return ResultProxyHalf(count), ResultProxyHalf(count)
