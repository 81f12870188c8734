"""Helpers for testing code that holds solver handles (like ``trio.testing``).

Every handle the engine makes (:class:`~solver.SharedResult` and its handles,
split :class:`~solver.ResultProxy` halves) and every :class:`CountingResult`
reports itself to an installed :class:`HandleTracker`. A tracker counts the
handles created and released during a test, remembers which are still live and
which were released twice, and :meth:`HandleTracker.check` fails the test if
either list is not empty.

Using it from another test suite
--------------------------------

With pytest, load this module as a plugin, which provides the ``handle_tracker``
fixture: it installs a fresh tracker for the test and calls ``check()`` at
teardown. In the suite's top-level ``conftest.py``::

    pytest_plugins = ["solver.testing"]

(or import the fixture there: ``from solver.testing import handle_tracker``, or
run ``pytest -p solver.testing``). Then::

    @pytest.mark.anyio
    async def test_build_releases_everything(handle_tracker):
        res = await job.build(edge)
        await res.release()
        await job.discard()
        # teardown fails if a handle leaked or was released twice

Without pytest, use the context manager::

    with track_handles() as tracker:
        ...
    tracker.check()

Handles are counted whatever the type of the value they stand for: every clone
the engine makes of a caller's value on a caller's behalf (a build's result, each
handle of a :class:`~solver.SolveResult`) is an engine handle that reports here,
so a leak is seen even for a ``Result`` class that knows nothing of tracking.

For each live handle a tracker keeps its type and id and where it was made: the
engine function that made it and the first frame of the calling program (test
code, say) on the stack at that moment, found by a short walk up the frames.
``check()`` names both for each leak. Set the environment variable
``SOLVER_TRACK_STACKS=1`` to record the whole creation stack instead, and the
stack of each double release. While a tracker is installed, a handle garbage-collected without being
released also emits a :class:`ResourceWarning`.

pytest is not a dependency of the ``solver`` package: the fixture is defined only
when pytest can be imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import traceback
import types
from collections.abc import Iterator

import anyio
import anyio.lowlevel

from . import _refs
from ._errors import DoubleReleaseError

__all__ = ["CountingResult", "HandleTracker", "track_handles"]

_log = logging.getLogger("solver")

# (type and id, where it was made in one line, the creation stack if tracked)
_Origin = tuple[str, str, list[traceback.FrameSummary] | None]

_SOLVER_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TRACKING_FILES = frozenset(os.path.join(_SOLVER_DIR, name) for name in ("_refs.py", "testing.py"))
# Frames of the handle types themselves; the site is the engine code that called them.
_HANDLE_METHODS = frozenset({"__init__", "clone", "_share", "_attach", "_consume_for_split"})
# Frames of the libraries a program runs on, skipped when looking for its own code.
_LIBRARY_DIRS = tuple(
    {
        os.path.dirname(os.path.abspath(os.__file__)) + os.sep,
        os.path.dirname(os.path.dirname(os.path.abspath(anyio.__file__))) + os.sep,
    }
)


def _describe(handle: object) -> str:
    return f"{type(handle).__name__} {getattr(handle, 'id', '?')}"


def _where(frame: types.FrameType) -> str:
    code = frame.f_code
    return f"{code.co_name} ({os.path.relpath(code.co_filename)}:{frame.f_lineno})"


def _made_at(frame: types.FrameType | None) -> str:
    """'made in <engine function>, from <program's frame>' for a handle created
    with ``frame`` as the caller of the tracker's hook. A walk of at most a few
    dozen frames: cheap enough to run for every handle while a test tracks."""
    engine = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_SOLVER_DIR):
            if (
                engine is None
                and filename not in _TRACKING_FILES
                and frame.f_code.co_name not in _HANDLE_METHODS
            ):
                engine = _where(frame)
        elif not filename.startswith(_LIBRARY_DIRS) and not filename.startswith("<"):
            caller = _where(frame)
            if engine is None:
                return f"made in {caller}"
            return f"made in {engine}, from {caller}"
        frame = frame.f_back
    return f"made in {engine}" if engine is not None else "made outside any visible caller"


def _format(origin: _Origin, *, site: bool) -> str:
    text, where, stack = origin
    if stack is not None:
        return text + ", created at:\n" + "".join(traceback.format_list(stack)).rstrip()
    return f"{text}, {where}" if site else text


class HandleTracker:
    """Counts handles created, released and released twice while it is installed.

    Install it with :func:`track_handles` (or the ``handle_tracker`` fixture).
    Thread-safe: handles may be created and released from any thread. While
    installed, it also forwards every event to the tracker it replaced, so nested
    trackers each see the whole picture of their own span.

    Handles created before the tracker was installed and released while it is are
    counted in ``released_count`` but never reported as live.
    """

    def __init__(self, *, track_stacks: bool | None = None) -> None:
        """``track_stacks`` records creation stacks; by default it is on when the
        environment variable ``SOLVER_TRACK_STACKS`` is ``1``."""
        if track_stacks is None:
            track_stacks = os.environ.get("SOLVER_TRACK_STACKS") == "1"
        self._track_stacks = track_stacks
        self._lock = threading.Lock()
        # Keyed by id(handle) so that a leaked handle can still be collected (and
        # warn). A key reused by a new handle means its previous owner was collected
        # unreleased: its origin moves to _lost.
        self._live: dict[int, _Origin] = {}
        self._lost: list[_Origin] = []
        self._double: list[str] = []
        self._created = 0
        self._released = 0
        self._outer: _refs._TrackerHook | None = None

    # -- the hooks solver._refs calls -------------------------------------------

    def created(self, handle: object) -> None:
        """Hook: ``handle`` was just created."""
        stack = traceback.extract_stack()[:-2] if self._track_stacks else None
        origin = (_describe(handle), _made_at(sys._getframe(1)), stack)
        with self._lock:
            self._created += 1
            previous = self._live.get(id(handle))
            if previous is not None:
                self._lost.append(previous)
            self._live[id(handle)] = origin
        if self._outer is not None:
            self._outer.created(handle)

    def released(self, handle: object) -> None:
        """Hook: ``handle`` was released (or consumed by a split)."""
        with self._lock:
            self._released += 1
            self._live.pop(id(handle), None)
        if self._outer is not None:
            self._outer.released(handle)

    def double_released(self, handle: object) -> None:
        """Hook: ``handle`` was released, split or cloned after being released."""
        text = repr(handle)
        if self._track_stacks:
            text += ", at:\n" + "".join(traceback.format_stack()[:-2]).rstrip()
        with self._lock:
            self._double.append(text)
        if self._outer is not None:
            self._outer.double_released(handle)

    # -- what a test reads --------------------------------------------------------

    @property
    def live(self) -> list[str]:
        """One line per handle created and not yet released (type and id; with the
        creation stack when stacks are tracked)."""
        with self._lock:
            origins = [*self._lost, *self._live.values()]
        return [_format(o, site=False) for o in origins]

    @property
    def leaks(self) -> list[str]:
        """Like :attr:`live`, each line also saying where the handle was made (the
        engine function, and the first frame of the calling program)."""
        with self._lock:
            origins = [*self._lost, *self._live.values()]
        return [_format(o, site=True) for o in origins]

    @property
    def double_releases(self) -> list[str]:
        """One entry per misuse that raised DoubleReleaseError, in order."""
        with self._lock:
            return list(self._double)

    @property
    def created_count(self) -> int:
        """Handles created while installed."""
        return self._created

    @property
    def released_count(self) -> int:
        """Successful releases (and split consumptions) while installed."""
        return self._released

    def check(self) -> None:
        """Raise AssertionError listing every live handle (with where it was made)
        and every double release."""
        live = self.leaks
        double = self.double_releases
        if not live and not double:
            return
        lines = []
        if live:
            lines.append(f"{len(live)} handle(s) never released:")
            lines.extend(f"  {line}" for line in live)
        if double:
            lines.append(f"{len(double)} double release(s):")
            lines.extend(f"  {line}" for line in double)
        raise AssertionError("\n".join(lines))

    def __repr__(self) -> str:
        with self._lock:
            live = len(self._live) + len(self._lost)
        return (
            f"<HandleTracker live={live} created={self._created} "
            f"released={self._released} double={len(self._double)}>"
        )


@contextlib.contextmanager
def track_handles(tracker: HandleTracker | None = None) -> Iterator[HandleTracker]:
    """Install ``tracker`` (a new one by default) for the ``with`` block and yield it.

    The previously installed tracker (if any) is restored on exit; while the block
    runs it still receives every event. Does not call ``check()``.
    """
    if tracker is None:
        tracker = HandleTracker()
    previous = _refs._set_tracker(tracker)
    tracker._outer = previous
    try:
        yield tracker
    finally:
        tracker._outer = None
        _refs._set_tracker(previous)


def _handle_tracker() -> Iterator[HandleTracker]:
    with track_handles() as tracker:
        yield tracker
    tracker.check()


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed to run tests
    pass
else:
    handle_tracker = pytest.fixture(name="handle_tracker")(_handle_tracker)
    """Fixture: a :class:`HandleTracker` installed for the test; ``check()`` at
    teardown."""
    __all__ += ["handle_tracker"]


class _Shared:
    __slots__ = ("handles", "lock", "releases")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handles = 1
        self.releases = 0


class CountingResult:
    """A :class:`~solver.Result` for tests that counts how often it is released.

    ``CountingResult(id, value)`` is one handle; :meth:`clone` makes another handle
    on the same value. All clones share ``release_count`` (handles whose release
    completed) and ``live_count`` (handles not yet released). ``sys`` is ``value``.
    Releasing one handle twice raises :class:`~solver.DoubleReleaseError` (logged at
    ERROR on the ``solver`` logger) and counts nothing.

    ``release()`` marks the handle released, then waits (``anyio.sleep`` of
    ``release_delay`` seconds, or one checkpoint) and only then counts: it is a
    cancel point, so a caller that does not shield its release loses the count,
    which is what tests of shielding need to see. Reports to an installed
    :class:`HandleTracker` like the engine's handles do.
    """

    __slots__ = ("_delay", "_id", "_released", "_shared", "_value")

    def __init__(
        self, id: str = "result", value: object = None, *, release_delay: float = 0.0
    ) -> None:
        self._id = id
        self._value = value
        self._delay = release_delay
        self._released = False
        self._shared = _Shared()
        if _refs._tracker is not None:
            _refs._tracker.created(self)

    @property
    def id(self) -> str:
        """The id given at construction, shared by clones."""
        return self._id

    @property
    def sys(self) -> object:
        """The value given at construction, shared by clones."""
        return self._value

    @property
    def released(self) -> bool:
        """True once this handle's ``release()`` was called."""
        return self._released

    @property
    def release_count(self) -> int:
        """Completed releases of this value, over all its handles."""
        return self._shared.releases

    @property
    def live_count(self) -> int:
        """Handles on this value whose release has not completed."""
        with self._shared.lock:
            return self._shared.handles - self._shared.releases

    def clone(self) -> CountingResult:
        """A new handle on the same value and counters. Raises DoubleReleaseError
        if this handle was released."""
        shared = self._shared
        with shared.lock:
            ok = not self._released
            if ok:
                shared.handles += 1
        if not ok:
            raise self._misuse("cloning")
        new = CountingResult.__new__(CountingResult)
        new._id = self._id
        new._value = self._value
        new._delay = self._delay
        new._released = False
        new._shared = shared
        if _refs._tracker is not None:
            _refs._tracker.created(new)
        return new

    async def release(self) -> None:
        """Release this handle (see the class docstring for what is counted)."""
        shared = self._shared
        with shared.lock:
            ok = not self._released
            self._released = True
        if not ok:
            raise self._misuse("releasing")
        if _refs._tracker is not None:
            _refs._tracker.released(self)
        if self._delay:
            await anyio.sleep(self._delay)
        else:
            await anyio.lowlevel.checkpoint()
        with shared.lock:
            shared.releases += 1

    def _misuse(self, action: str) -> DoubleReleaseError:
        message = f"{action} already released reference {self._id}"
        _log.error("%s: %r", message, self)
        if _refs._tracker is not None:
            _refs._tracker.double_released(self)
        return DoubleReleaseError(message)

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return (
            f"<CountingResult {self._id}{state} live={self.live_count} "
            f"releases={self.release_count}>"
        )
