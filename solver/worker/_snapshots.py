"""The built-in worker's on-disk snapshot store.

An op of the built-in worker produces a directory tree. It writes into a *mutable*
snapshot (a fresh working directory, or a copy of an input snapshot), then
*commits* it: the tree becomes an immutable snapshot with a random id, and the op
returns a :class:`SnapshotRef`, a reference-counted handle that is the engine's
:class:`~solver.Result`. The tree stays on disk after its last handle is released
(it is a cache entry) until :meth:`SnapshotStore.prune`,
:meth:`SnapshotStore.prune_by_policy` (garbage collection, see ``_gc.py``) or
:meth:`SnapshotStore.delete` removes it; a snapshot with a live handle is never
removed. A later process opening the same root sees every committed snapshot, so a
persistent cache can hand results back with :meth:`SnapshotStore.load`.

Layout
------

::

    root/lock                 held with flock() while a store has the root open
    root/snapshots/<id>/      an immutable snapshot's files (write bits dropped)
    root/meta/<id>.json       its metadata: id, created_at, last_used, size,
                              description, parents
    root/meta/<id>.digests    the digests of its files that content keys
                              needed (``_digesttables``), when there are any
    root/local-digests/       the stat-checked digests of local sources' files
    root/tmp/<id>/            mutable working directories, and trees being deleted

Ids are ``secrets.token_hex(16)``. A mutable's working directory already has the id
its snapshot will get.

Crash safety without a journal
------------------------------

Every change of the set of snapshots is a single ``rename`` inside the root, and the
store's rule on open is "a snapshot is a directory in ``snapshots/`` with valid
metadata beside it; everything else is debris": ``tmp/`` is emptied, a snapshot
directory whose metadata is missing or unreadable is removed (with a warning), and
metadata without a directory is removed. So:

* commit seals the tree in ``tmp/`` (gives every file that is hard-linked to
  something outside the tree a private copy, except the store's own sealed files
  that the worker linked in, :meth:`MutableSnapshot.share_store_files`; drops
  write bits, refuses special
  files, measures it), writes the metadata (to a temporary name, then ``os.replace``), and
  renames the directory into ``snapshots/``. A crash before the rename leaves
  debris in ``tmp/`` and an orphan metadata file; after it, a whole snapshot.
* delete renames the directory out to ``tmp/`` first, then removes the metadata and
  the tree. A crash at any point leaves either the whole snapshot or debris.

Metadata is not fsync'ed: a torn metadata file after a power loss makes the
snapshot "corrupt", and the open removes it, which costs a cache miss and nothing
else. ``last_used`` changes (on the last release of a snapshot) are kept in memory
and written by :meth:`SnapshotStore.close`; after a crash they are older than they
should be, which only makes pruning by age a little eager.

The lock file makes the root single-owner: cleaning ``tmp/`` on open and pruning are
only safe when no other store (in this process or another) works in the same root.
A second open of a root that is open in this process fails at once (waiting could
never end); one that another process holds waits for it (polling ``flock`` with
``LOCK_NB``, so the wait is cancellable), logging once, for ``lock_timeout``
seconds (``None``: as long as it takes). The ``flock`` dies with its process, so a
crash never leaves the root locked.

Reference counting
------------------

Each snapshot has one in-memory record with the count of live handles (plus short
internal pins, e.g. while a copy reads it). A handle has its own released flag; both
are changed together under the store's :class:`threading.Lock` (one for all records:
the critical sections are a few statements, and one lock lets a record move in and
out of the idle index below in the same step), so a release from any task or thread
is exactly-once, and a second release of the same
handle logs at ERROR on the ``solver`` logger, raises
:class:`~solver.DoubleReleaseError` and changes no count (as in ``solver._refs``,
whose tracker hook these handles report to). Releasing the last handle only stamps
``last_used``: nothing is deleted, so the release never touches the disk and never
needs to be shielded. Deletion marks the record *dead* under the same lock only if
its count is zero, and a dead record can never be acquired again; that is the whole
protocol that keeps a snapshot with a live handle on disk.

The idle index
--------------

Garbage collection deletes the least recently used snapshots first. The store keeps
the *idle* records (count zero, not dead) in a ``SortedKeyList`` ordered by
``(last_used, id)``, changed incrementally under the lock: a record enters it when
its count drops to zero (the moment ``last_used`` is stamped, so its key never
changes while it is in the index), leaves it when it is acquired again (a
:meth:`SnapshotStore.load`, or a pin while a copy reads it) and when it is claimed for
deletion, and comes back if the deletion fails. A committed snapshot starts with
one handle, so it is not idle yet; on open every snapshot is. A prune walks the index
from the front and stops as soon as the rule is satisfied (or, for a rule with a
keep duration, at the first snapshot used too recently), so it never sorts and
never looks at snapshots in use. The store also keeps the sum of all sizes, so a
space rule with nothing to do costs O(1).

Everything else (the id -> record index, the set of open mutables) is changed only
on the event loop, between awaits, so it needs no lock. Filesystem work runs in a
worker thread (``anyio.to_thread.run_sync``). Work that changes the disk runs
shielded from cancellation, so the in-memory state always matches what the thread
did; such an operation checks for cancellation before it starts and once more after
it is done, and a cancellation at the end undoes the result (discards the new
mutable, releases the new handle) instead of leaking it.

Paths
-----

:class:`SnapshotView` resolves every path argument itself, one component at a time
with ``lstat``/``readlink``: ``..`` and absolute paths are refused outright, and a
symlink is followed only while its target stays inside the snapshot (an absolute
target, or one whose ``..`` climbs above the snapshot root, is refused), with the
usual limit of 40 links against loops. Snapshots are immutable, so what was
resolved cannot change before it is used.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar, TypeVarTuple

import anyio
import anyio.lowlevel
import anyio.to_thread
from sortedcontainers import SortedKeyList  # type: ignore[import-untyped, unused-ignore]

from .. import _refs
from .._errors import DoubleReleaseError, SolveError
from .._result import Result
from ._digesttables import TABLE_SUFFIX, DigestTable, StoreDigests, recover_local_tables
from ._gc import PrunePolicy, as_rules

if sys.platform != "win32":
    import fcntl

__all__ = [
    "FileStat",
    "MutableSnapshot",
    "SnapshotInUseError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "SnapshotRef",
    "SnapshotStore",
    "SnapshotView",
    "UnsafePathError",
    "default_root",
]

_log = logging.getLogger("solver")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_WRITE_BITS: Final = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
_MAX_SYMLINKS: Final = 40  # Linux's limit for one path lookup
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_META_VERSION: Final = 1
_ID_LENGTH: Final = 32


# -- errors -------------------------------------------------------------------------


class SnapshotNotFoundError(SolveError):
    """No snapshot with the given id exists in the store (never committed there, or
    deleted)."""


class SnapshotInUseError(SolveError):
    """The snapshot has live handles, so it may not be deleted."""


class UnsafePathError(SolveError):
    """A path given to a :class:`SnapshotView` would leave the snapshot: it is
    absolute, contains ``..``, or runs through a symlink that points outside the
    snapshot or loops."""


# -- value objects --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileStat:
    """One file system entry of a snapshot, as ``lstat`` sees it.

    ``path`` is relative to the snapshot root with ``/`` separators (``"."`` for the
    root itself), except in :meth:`SnapshotView.read_dir`, where it is the entry's
    name. ``linkname`` is a symlink's target, ``""`` for anything else. ``mode`` is
    the full ``st_mode`` (type and permission bits).
    """

    path: str
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    linkname: str = ""

    @property
    def is_dir(self) -> bool:
        """True for a directory (never for a symlink to one)."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        """True for a symlink."""
        return stat.S_ISLNK(self.mode)

    @property
    def permissions(self) -> int:
        """The permission bits of ``mode`` (``stat.S_IMODE``)."""
        return stat.S_IMODE(self.mode)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What :meth:`SnapshotStore.usage` reports about one snapshot.

    ``size`` is the apparent size in bytes of its regular files (a hard-linked file
    counted once) and symlinks, measured at commit. ``created_at`` and ``last_used``
    are Unix timestamps; ``last_used`` is the last time its last handle was
    released (``created_at`` until then). ``in_use`` is true while it has live
    handles, ``handles`` how many. ``description`` is a copy of what was given to
    :meth:`SnapshotStore.new_mutable`; ``parents`` are the ids of the snapshots it
    was copied from.
    """

    id: str
    size: int
    created_at: float
    last_used: float
    in_use: bool
    handles: int
    description: dict[str, Any]
    parents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Meta:
    """The persistent part of a snapshot's record (its metadata file)."""

    id: str
    created_at: float
    last_used: float
    size: int
    description: dict[str, Any]
    parents: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _META_VERSION,
                "id": self.id,
                "created_at": self.created_at,
                "last_used": self.last_used,
                "size": self.size,
                "description": self.description,
                "parents": list(self.parents),
            },
            indent=1,
            sort_keys=True,
        )

    @staticmethod
    def from_json(sid: str, text: str) -> _Meta:
        """Parse and validate; raises ValueError or TypeError saying what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("version") != _META_VERSION:
            raise ValueError(f"unknown version {data.get('version')!r}")
        if data.get("id") != sid:
            raise ValueError(f"id {data.get('id')!r} does not match the directory")
        created_at = data.get("created_at")
        last_used = data.get("last_used")
        size = data.get("size")
        description = data.get("description")
        parents = data.get("parents")
        if not isinstance(created_at, int | float) or not isinstance(last_used, int | float):
            raise TypeError("created_at and last_used must be numbers")
        if not isinstance(size, int) or size < 0:
            raise ValueError("size must be a non-negative integer")
        if not isinstance(description, dict):
            raise TypeError("description must be an object")
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise TypeError("parents must be a list of ids")
        return _Meta(sid, float(created_at), float(last_used), size, description, tuple(parents))


def default_root() -> Path:
    """The store root used when :class:`SnapshotStore` is given none.

    ``$SOLVER_CACHE_DIR/snapshots`` if that variable is set and not empty, else
    ``snapshots`` in the user's cache directory for ``solver-engine`` as
    :func:`platformdirs.user_cache_dir` names it: on Linux
    ``$XDG_CACHE_HOME/solver-engine`` (when ``XDG_CACHE_HOME`` is an absolute
    path, as the XDG spec requires) or ``~/.cache/solver-engine``; on macOS
    ``~/Library/Caches/solver-engine`` (recent platformdirs releases honour
    ``XDG_CACHE_HOME`` there too); on Windows under ``%LOCALAPPDATA%``. Read
    from the environment at each call.
    """
    # Imported here, where it is used: one function of the store needs it.
    import platformdirs

    explicit = os.environ.get("SOLVER_CACHE_DIR")
    if explicit:
        return Path(explicit) / "snapshots"
    cache = Path(platformdirs.user_cache_dir("solver-engine"))
    if not cache.is_absolute():
        # Older platformdirs releases take a relative XDG_CACHE_HOME as it is;
        # the spec says to ignore it, and a store root must not depend on the cwd.
        cache = Path.home() / ".cache" / "solver-engine"
    return cache / "snapshots"


# -- the record and its handles -------------------------------------------------------


class _IdleIndex(Protocol):
    """What the store uses of its ``SortedKeyList`` of idle records."""

    def add(self, record: _Record, /) -> None: ...
    def remove(self, record: _Record, /) -> None: ...
    def update(self, records: Iterable[_Record], /) -> None: ...
    def __iter__(self) -> Iterator[_Record]: ...
    def __len__(self) -> int: ...


def _idle_order(record: _Record) -> tuple[float, str]:
    # Only read while the record is in the index, where last_used does not change.
    return (record.last_used, record.id)


class _Record:
    """The in-memory state of one committed snapshot. ``live``, ``dead``,
    ``last_used`` and ``dirty`` are only changed under ``lock`` (the store's lock,
    shared by all its records), together with the store's idle index; ``dead``
    never goes back to False except to undo a deletion whose rename failed."""

    __slots__ = (
        "created_at",
        "dead",
        "description",
        "dirty",
        "id",
        "last_used",
        "live",
        "lock",
        "parents",
        "path",
        "size",
        "store",
        "view",
    )

    def __init__(self, store: SnapshotStore, meta: _Meta, path: Path) -> None:
        self.store = store
        self.id = meta.id
        self.path = path
        self.created_at = meta.created_at
        self.last_used = meta.last_used
        self.size = meta.size
        self.description = meta.description
        self.parents = meta.parents
        self.lock = store._lock
        self.live = 0
        self.dead = False
        self.dirty = False
        self.view = SnapshotView(self)

    def acquire(self) -> bool:
        """Count one more user; False if the snapshot is being or was deleted."""
        with self.lock:
            if self.dead:
                return False
            if self.live == 0:
                self.store._idle_index.remove(self)
            self.live += 1
            return True

    def drop(self) -> None:
        """Undo one :meth:`acquire` that was not a handle (a pin)."""
        with self.lock:
            self.live -= 1
            if self.live == 0:
                self.became_idle()

    def became_idle(self) -> None:
        """The last user let go (called under ``lock``): stamp ``last_used`` and
        enter the store's idle index, whose order it is."""
        self.last_used = self.store._clock()
        self.dirty = True
        self.store._idle_index.add(self)

    def meta(self) -> _Meta:
        with self.lock:
            last_used = self.last_used
        return _Meta(
            self.id, self.created_at, last_used, self.size, self.description, self.parents
        )

    def info(self) -> SnapshotInfo:
        with self.lock:
            live, last_used = self.live, self.last_used
        return SnapshotInfo(
            id=self.id,
            size=self.size,
            created_at=self.created_at,
            last_used=last_used,
            in_use=live > 0,
            handles=live,
            description=copy.deepcopy(self.description),
            parents=self.parents,
        )


class SnapshotRef:
    """A handle on one committed snapshot; a :class:`~solver.Result`.

    ``id`` is the snapshot id and ``sys`` its read-only :class:`SnapshotView`.
    :meth:`clone` returns a new, independent handle on the same snapshot. While any
    handle on a snapshot is live, the snapshot is not deleted. Releasing the last
    handle does not delete it either: it stays cached on disk until pruned.

    Each handle is released exactly once; thread-safe. Handles report to an
    installed :class:`solver.testing.HandleTracker`. Not constructed directly: get
    one from :meth:`MutableSnapshot.commit`, :meth:`SnapshotStore.load` or
    :meth:`clone`.
    """

    __slots__ = ("_record", "_released")

    def __init__(self, record: _Record) -> None:
        # The caller has already counted this handle in record.live.
        self._record = record
        self._released = False
        tracker = _refs._tracker
        if tracker is not None:
            tracker.created(self)

    @property
    def id(self) -> str:
        """The snapshot id (32 hex digits), the same for every handle on it."""
        return self._record.id

    @property
    def sys(self) -> SnapshotView:
        """The read-only view of the snapshot's files."""
        return self._record.view

    @property
    def released(self) -> bool:
        """True once this handle was released."""
        return self._released

    def clone(self) -> SnapshotRef:
        """A new, independent handle on the same snapshot. Raises
        :class:`~solver.DoubleReleaseError` if this handle was released. O(1)."""
        record = self._record
        with record.lock:
            ok = not self._released
            if ok:
                record.live += 1
        if not ok:
            raise self._misuse("cloning")
        return SnapshotRef(record)

    async def release(self) -> None:
        """Release this handle.

        Exactly once per handle: a second call logs at ERROR on the ``solver``
        logger and raises :class:`~solver.DoubleReleaseError`, changing no count.
        Safe from many tasks and threads at once. Never touches the disk and never
        a cancel point; always yields to the scheduler once (except when it raises).
        The last release of a snapshot only records ``last_used``. O(1).
        """
        record = self._record
        with record.lock:
            ok = not self._released
            if ok:
                self._released = True
                record.live -= 1
                if record.live == 0:
                    record.became_idle()
        if not ok:
            raise self._misuse("releasing")
        tracker = _refs._tracker
        if tracker is not None:
            tracker.released(self)
        await anyio.lowlevel.cancel_shielded_checkpoint()

    def _misuse(self, action: str) -> DoubleReleaseError:
        message = f"{action} already released snapshot reference {self.id}"
        _log.error("%s: %r", message, self)
        tracker = _refs._tracker
        if tracker is not None:
            tracker.double_released(self)
        return DoubleReleaseError(message)

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<SnapshotRef {self.id}{state} live={self._record.live}>"

    def __del__(self) -> None:
        # Never release here (it would hide the leak); only warn while tracking.
        if _refs._tracker is not None and not getattr(self, "_released", True):
            warnings.warn(
                f"SnapshotRef {self.id} was never released",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )


class SnapshotView:
    """A read-only view of one committed snapshot's files (``SnapshotRef.sys``).

    Every path argument is relative to the snapshot root, with ``/`` separators
    (``""`` or ``"."`` is the root). Absolute paths and ``..`` are refused, and
    symlinks are followed only while they stay inside the snapshot; anything else
    raises :class:`UnsafePathError`. Missing files and other I/O failures raise
    :class:`~solver.SolveError` naming the path. The file system work of each
    method runs in a worker thread.

    ``path`` is the snapshot's directory, for code that needs the real files (for
    example to run a process on them); going through it bypasses the checks above.
    A view is only guaranteed to work while its holder keeps a live handle; on a
    deleted snapshot, each method raises :class:`SnapshotNotFoundError`.
    """

    __slots__ = ("_record",)

    def __init__(self, record: _Record) -> None:
        self._record = record

    @property
    def id(self) -> str:
        """The snapshot id."""
        return self._record.id

    @property
    def path(self) -> Path:
        """The snapshot's directory (read-only files)."""
        return self._record.path

    async def resolve(self, rel: str | os.PathLike[str] = "") -> Path:
        """The real path of the existing entry ``rel``, with every symlink
        (including a final one) resolved inside the snapshot."""
        root, sid, text = self._args(rel)
        real = await anyio.to_thread.run_sync(_resolve_checked, root, sid, text, True, "resolve")
        return Path(real)

    async def read_bytes(
        self, rel: str | os.PathLike[str], offset: int = 0, length: int | None = None
    ) -> bytes:
        """The contents of the regular file ``rel`` (a symlink to one is followed),
        from ``offset``, at most ``length`` bytes (all by default)."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        root, sid, text = self._args(rel)
        return await anyio.to_thread.run_sync(_read_file, root, sid, text, offset, length)

    async def read_dir(
        self, rel: str | os.PathLike[str] = "", pattern: str | None = None
    ) -> list[FileStat]:
        """The entries of directory ``rel`` (a symlink to one is followed), sorted
        by name, each with ``path`` set to its name; only names matching the glob
        ``pattern`` (``fnmatch``, case-sensitive) when given."""
        root, sid, text = self._args(rel)
        return await anyio.to_thread.run_sync(_read_dir, root, sid, text, pattern)

    async def stat(self, rel: str | os.PathLike[str]) -> FileStat:
        """The entry ``rel`` itself (a final symlink is not followed: its
        ``linkname`` is reported, wherever it points)."""
        root, sid, text = self._args(rel)
        return await anyio.to_thread.run_sync(_stat_entry, root, sid, text)

    async def walk(self, rel: str | os.PathLike[str] = "") -> list[FileStat]:
        """Every entry below directory ``rel`` (not ``rel`` itself), depth first,
        sorted by name within each directory; ``path`` is relative to the snapshot
        root. Symlinks are listed, never followed."""
        root, sid, text = self._args(rel)
        return await anyio.to_thread.run_sync(_walk, root, sid, text)

    def _args(self, rel: str | os.PathLike[str]) -> tuple[str, str, str]:
        record = self._record
        if record.dead:
            raise SnapshotNotFoundError(f"snapshot {record.id} was deleted")
        return os.fspath(record.path), record.id, os.fspath(rel)

    def __repr__(self) -> str:
        return f"<SnapshotView {self.id} at {self.path}>"


# -- mutable snapshots ----------------------------------------------------------------

_OPEN: Final = "open"
_COMMITTING: Final = "committing"
_COMMITTED: Final = "committed"
_DISCARDED: Final = "discarded"


class MutableSnapshot:
    """A working directory that an op writes into, then commits or discards.

    ``path`` is the directory (writable, under the store's ``tmp/``); ``id`` is the
    id the snapshot will have once committed. :meth:`commit` turns it into an
    immutable snapshot; :meth:`discard` removes it. Using it as an async context
    manager discards it on exit unless it was committed. Use it from the event loop
    that owns the store (write its files from any thread).
    """

    __slots__ = ("_description", "_id", "_parents", "_path", "_state", "_store", "_store_links")

    def __init__(
        self,
        store: SnapshotStore,
        sid: str,
        path: Path,
        description: dict[str, Any],
        parents: tuple[str, ...],
    ) -> None:
        self._store = store
        self._id = sid
        self._path = path
        self._description = description
        self._parents = parents
        self._state: str = _OPEN
        self._store_links: frozenset[tuple[int, int]] = frozenset()

    @property
    def id(self) -> str:
        """The id the committed snapshot will have."""
        return self._id

    @property
    def path(self) -> Path:
        """The working directory to write into."""
        return self._path

    @property
    def state(self) -> str:
        """``"open"``, ``"committing"``, ``"committed"`` or ``"discarded"``."""
        return self._state

    def share_store_files(self, inodes: Iterable[tuple[int, int]]) -> None:
        """Declare files of the working directory (by ``(st_dev, st_ino)``) that
        the worker itself hard-linked from committed snapshots of this store, so
        that :meth:`commit` keeps them linked instead of giving them a private copy.
        Only for links the worker made from a sealed snapshot into a working
        directory no process sees (the ``file`` op's copies, ``merge``): such an
        inode is never written again, so sharing it is sharing nothing."""
        self._store_links = self._store_links | frozenset(inodes)

    async def commit(self) -> SnapshotRef:
        """Make the working directory an immutable snapshot and return the first
        handle on it, which the caller owns.

        Drops the write bits of every file and directory (symlinks are kept as they
        are, never followed), records the size and metadata, and renames the tree
        into the store in one step. A regular file with a hard link outside the
        tree (a host file, another mount's or snapshot's file) is first replaced by
        a private copy (same bytes, mode and times), so a snapshot never shares an
        inode with anything outside it and committing changes nothing outside the
        store; hard links between names inside the tree are kept, and so are the
        store's own sealed files declared with :meth:`share_store_files`. Refuses trees
        holding anything but regular files, directories and symlinks, and a shared
        file it cannot read. If it fails, the working directory is removed and a
        :class:`~solver.SolveError` is raised; the mutable is then discarded. If the
        caller is cancelled while it runs, the snapshot may still have been
        committed (and is kept as an unused cache entry) but no handle leaks. Raises
        :class:`~solver.SolveError` if already committed, discarded, or the store is
        closed.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        store = self._store
        store._check_open(f"commit mutable snapshot {self._id}")
        if self._state != _OPEN:
            raise SolveError(f"cannot commit mutable snapshot {self._id}: it is {self._state}")
        self._state = _COMMITTING
        with store._busy():
            now = store._clock()
            meta = _Meta(self._id, now, now, 0, self._description, self._parents)
            try:
                size = await _in_thread(_commit_tree, store._root, meta, self._store_links)
            except BaseException as exc:
                self._state = _DISCARDED
                store._mutables.pop(self._id, None)
                await _in_thread(_remove_quietly, self._path)
                if isinstance(exc, OSError):
                    raise SolveError(f"committing snapshot {self._id} failed: {exc}") from exc
                raise
            self._state = _COMMITTED
            store._mutables.pop(self._id, None)
            record = _Record(store, meta, store._root / "snapshots" / self._id)
            record.size = size
            record.live = 1  # in use, so not in the idle index
            store._records[self._id] = record
            store._used += size
            ref = SnapshotRef(record)
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await ref.release()
            raise
        return ref

    async def discard(self) -> None:
        """Remove the working directory. Idempotent, and a no-op after
        :meth:`commit` (so it can sit in a ``finally``); allowed after the store
        was closed. Never a cancel point. Raises :class:`~solver.SolveError` while
        a commit is in progress. A failure to remove files is logged; what is left
        is removed when the store is next opened."""
        if self._state == _COMMITTING:
            raise SolveError(f"cannot discard mutable snapshot {self._id}: it is being committed")
        if self._state != _OPEN:
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        self._state = _DISCARDED
        store = self._store
        store._mutables.pop(self._id, None)
        # a table written for it before a commit that never came goes with it,
        # and is never written again
        store._digests.forget([self._id])
        table = store._root / "meta" / f"{self._id}{TABLE_SUFFIX}"
        with store._busy():
            await _in_thread(_remove_quietly, self._path, table)

    async def __aenter__(self) -> MutableSnapshot:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.discard()

    def __repr__(self) -> str:
        return f"<MutableSnapshot {self._id} {self._state} at {self._path}>"


# -- the store ------------------------------------------------------------------------

_NEW: Final = "new"
_OPENING: Final = "opening"
_STORE_OPEN: Final = "open"
_CLOSED: Final = "closed"


class SnapshotStore:
    """The built-in worker's store of immutable directory snapshots.

    ``SnapshotStore(root)`` names the root directory (by default
    :func:`default_root`); nothing happens on disk until :meth:`open` (or
    ``async with``), which creates the root, takes an exclusive lock on it, removes
    leftovers of a crashed process and loads every snapshot's metadata. One store
    at a time may have a root open: a second open in this process fails with
    :class:`~solver.SolveError`; one in another process waits until the root is
    free, up to ``lock_timeout`` seconds (``None``, the default: no limit; ``0``:
    fail at once). :meth:`close` keeps every snapshot on disk for the next process.

    All methods run on the event loop that opened the store; their file system work
    runs in worker threads. Snapshot handles (:class:`SnapshotRef`) may be cloned
    and released from any thread, also after the store was closed. Operations other
    than releases and :meth:`MutableSnapshot.discard` raise
    :class:`~solver.SolveError` before :meth:`open` and after :meth:`close`.

    ``clock`` (default :func:`time.time`) stamps ``created_at`` and ``last_used``;
    ``free_space(root)`` (default: ``shutil.disk_usage(root).free``, run in a worker
    thread) measures the free bytes for prune rules with ``min_free_space``. Both
    are there for tests.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        free_space: Callable[[Path], int] | None = None,
        lock_timeout: float | None = None,
    ) -> None:
        self._root = (Path(root) if root is not None else default_root()).absolute()
        self._lock_timeout = lock_timeout
        self._state: str = _NEW
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._free_space: Callable[[Path], int] = (
            free_space if free_space is not None else _disk_free
        )
        # One lock for every record's count and for the idle index (see _Record).
        self._lock = threading.Lock()
        # The snapshots nobody uses (live == 0, not dead), least recently used first.
        self._idle_index: _IdleIndex = SortedKeyList(key=_idle_order)
        # The sum of every snapshot's size, in use or not (changed on the loop only).
        self._used = 0
        self._records: dict[str, _Record] = {}
        self._mutables: dict[str, MutableSnapshot] = {}
        self._lock_fd: int | None = None
        self._busy_count = 0
        self._idle: anyio.Event | None = None
        self._delete_listeners: list[Callable[[Sequence[str]], Awaitable[None]]] = []
        self._digests = StoreDigests(self._root)

    @property
    def root(self) -> Path:
        """The absolute root directory."""
        return self._root

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._state == _CLOSED

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._state == _STORE_OPEN

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Create and lock the root, clean up after a crashed process, and load the
        snapshots' metadata. Removes everything in ``tmp/``, and every snapshot
        whose metadata is missing or corrupt (logged at WARNING on the ``solver``
        logger). Waits while another process has the root open (see the class
        docstring). Raises :class:`~solver.SolveError` if the root is open in another
        store of this process, if the wait timed out, or if this store was opened
        before. O(number of snapshots)."""
        if self._state != _NEW:
            raise SolveError(f"snapshot store at {self._root} was already opened")
        self._state = _OPENING
        try:
            fd, metas = await self._open_root_when_free()
        except BaseException:
            self._state = _NEW
            raise
        self._lock_fd = fd
        snapshots = self._root / "snapshots"
        for meta in metas:
            self._records[meta.id] = _Record(self, meta, snapshots / meta.id)
        with self._lock:
            self._idle_index.update(self._records.values())
        self._used = sum(record.size for record in self._records.values())
        self._state = _STORE_OPEN
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            await self.close()
            raise

    async def _open_root_when_free(self) -> tuple[int | None, list[_Meta]]:
        timeout = self._lock_timeout
        deadline = None if timeout is None else anyio.current_time() + timeout
        delay = 0.01
        while True:
            try:
                return await _in_thread(_open_root, self._root)
            except _HeldElsewhereError as exc:
                now = anyio.current_time()
                if deadline is not None and now >= deadline:
                    if timeout:
                        raise SolveError(
                            f"gave up after {timeout:g} s waiting for the lock on the "
                            f"snapshot store at {self._root}, held by another process"
                        ) from None
                    raise SolveError(str(exc)) from None
                if delay == 0.01:
                    _log.warning(
                        "waiting for the cache lock on %s held by another process", self._root
                    )
                await anyio.sleep(delay if deadline is None else min(delay, deadline - now))
                delay = min(delay * 2, 0.5)

    async def close(self) -> None:
        """Close the store; idempotent, never a cancel point.

        Waits for operations in flight, removes the working directories of
        mutables that were neither committed nor discarded, writes the snapshots'
        ``last_used`` (now, for those still in use), and unlocks the root. Deletes
        no snapshot. Handles stay valid: they can be read and released, but another
        store opening the root may prune what they point at once they are unused
        there.
        """
        with anyio.CancelScope(shield=True):
            if self._state in (_NEW, _CLOSED):
                self._state = _CLOSED
                await anyio.lowlevel.checkpoint()
                return
            self._state = _CLOSED
            if self._busy_count:
                self._idle = anyio.Event()
                await self._idle.wait()
            leftovers = []
            for mutable in self._mutables.values():
                mutable._state = _DISCARDED
                leftovers.append(mutable.path)
            self._mutables.clear()
            now = self._clock()
            metas = []
            for record in self._records.values():
                with record.lock:
                    if record.live:
                        record.last_used = now
                        record.dirty = True
                    dirty, record.dirty = record.dirty, False
                if dirty:
                    metas.append(record.meta())
            fd, self._lock_fd = self._lock_fd, None
            await _in_thread(_close_root, self._root, leftovers, metas, fd)

    async def __aenter__(self) -> SnapshotStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def add_delete_listener(self, listener: Callable[[Sequence[str]], Awaitable[None]]) -> None:
        """Call ``await listener(ids)`` after :meth:`delete` or :meth:`prune` removed
        the snapshots ``ids`` (never with an empty list). A persistent cache uses it
        to release the records whose results were deleted. Listeners run shielded,
        in the order they were added; one that raises is logged at ERROR and the
        others still run."""
        self._delete_listeners.append(listener)

    async def _notify_deleted(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        self._digests.forget(ids)
        with anyio.CancelScope(shield=True):
            for listener in self._delete_listeners:
                try:
                    await listener(list(ids))
                except Exception:
                    _log.exception("a delete listener of %s failed", self._root)

    # -- digest tables ---------------------------------------------------------------

    def digest_table(self, view: SnapshotView) -> DigestTable | None:
        """The stored digests of the files of the snapshot ``view`` shows
        (:mod:`solver.worker._digesttables`), for content keys over it; ``None``
        for a view of another store. Use it in a worker thread while holding a
        handle on the snapshot. O(1)."""
        record = view._record
        if record.store is not self or record.dead:
            return None
        return self._digests.snapshot_table(record.id, record.path)

    def new_snapshot_table(self, mutable: MutableSnapshot) -> DigestTable:
        """The digest table of the snapshot ``mutable`` will be once committed,
        for an op that knows its files' digests as it writes them (keyed by
        inode, size and mtime, which committing keeps). O(1)."""
        return self._digests.snapshot_table(mutable.id, self._root / "snapshots" / mutable.id)

    def local_digest_table(
        self, top: str, include: Sequence[str], exclude: Sequence[str]
    ) -> DigestTable:
        """The stored, stat-checked digests of the host files a local source
        reads from directory ``top`` with these globs. O(1)."""
        return self._digests.local_table(top, include, exclude)

    # -- snapshots ------------------------------------------------------------------

    async def new_mutable(
        self, description: Mapping[str, Any] | None = None, *, base: Result | None = None
    ) -> MutableSnapshot:
        """A new mutable snapshot: an empty working directory, or with ``base`` a
        writable copy of that snapshot.

        ``description`` is any JSON-serialisable mapping, stored with the committed
        snapshot (copied now; :class:`~solver.SolveError` if it is not JSON). ``base``
        is a :class:`SnapshotRef` of this store, or any :class:`~solver.Result`
        whose ``sys`` is a :class:`SnapshotView` of this store; the caller keeps
        ownership of it. The copy preserves symlinks as symlinks, file contents,
        modes and times, and then adds the owner's write bit to every file and
        directory (committing dropped them). The copy is independent of the base.
        If the caller is cancelled, nothing is left behind.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_open("create a mutable snapshot")
        desc = _json_copy(description)
        record = self._base_record(base) if base is not None else None
        sid = secrets.token_hex(16)
        path = self._root / "tmp" / sid
        with self._busy():
            parents: tuple[str, ...] = ()
            try:
                if record is None:
                    await _in_thread(_make_dir, path)
                else:
                    if not record.acquire():
                        raise SnapshotNotFoundError(f"base snapshot {record.id} was deleted")
                    try:
                        await _in_thread(_copy_tree, record.path, path)
                    finally:
                        record.drop()
                    parents = (record.id,)
            except OSError as exc:
                raise SolveError(f"creating mutable snapshot {sid} failed: {exc}") from exc
            mutable = MutableSnapshot(self, sid, path, desc, parents)
            self._mutables[sid] = mutable
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await mutable.discard()
            raise
        return mutable

    async def load(self, id: str) -> SnapshotRef:
        """A new handle, owned by the caller, on the existing snapshot ``id``.
        Raises :class:`SnapshotNotFoundError` if there is none. O(1)."""
        await anyio.lowlevel.checkpoint()
        self._check_open("load a snapshot")
        record = self._records.get(id)
        if record is None or not record.acquire():
            raise SnapshotNotFoundError(f"snapshot {id!r} not found in {self._root}")
        return SnapshotRef(record)

    async def exists(self, id: str) -> bool:
        """Whether snapshot ``id`` is in the store (in use or not). O(1)."""
        await anyio.lowlevel.checkpoint()
        self._check_open("look up a snapshot")
        record = self._records.get(id)
        return record is not None and not record.dead

    async def usage(self) -> list[SnapshotInfo]:
        """One :class:`SnapshotInfo` per snapshot, oldest first. O(n)."""
        await anyio.lowlevel.checkpoint()
        self._check_open("list snapshots")
        infos = [record.info() for record in self._records.values()]
        infos.sort(key=lambda info: (info.created_at, info.id))
        return infos

    async def delete(self, id: str) -> None:
        """Delete snapshot ``id`` from disk.

        Raises :class:`SnapshotInUseError` (and changes nothing) if it has live
        handles, :class:`SnapshotNotFoundError` if there is no such snapshot. Once
        it returns, the snapshot is gone from the store; if it is cancelled, the
        deletion still completes.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_open("delete a snapshot")
        record = self._records.get(id)
        if record is None:
            raise SnapshotNotFoundError(f"snapshot {id!r} not found in {self._root}")
        with self._lock:
            live = record.live
            if not live:
                self._claim(record)
        if live:
            raise SnapshotInUseError(
                f"cannot delete snapshot {id}: it has {live} live handle(s)"
            )
        with self._busy():
            failed = await _in_thread(_delete_snapshots, self._root, [id])
        if failed:
            self._revive(record)
            error = failed[id]
            raise SolveError(f"deleting snapshot {id} failed: {error}") from error
        await self._notify_deleted([id])

    async def prune(self, keep: Callable[[SnapshotInfo], bool] | None = None) -> list[str]:
        """Delete every snapshot that is not in use and not kept; return their ids.

        ``keep(info)`` is called (on the event loop) for each unused snapshot and
        keeps it when it returns true; without ``keep`` every unused snapshot is
        deleted. If ``keep`` raises, nothing is deleted. A snapshot that cannot be
        removed is logged at ERROR, stays in the store and is not in the result.
        Like :meth:`delete`, it completes once started. O(n).
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_open("prune snapshots")
        candidates = [
            (record, record.info()) for record in self._records.values() if not record.live
        ]
        chosen = [record for record, info in candidates if keep is None or not keep(info)]
        doomed: list[_Record] = []
        with self._lock:
            for record in chosen:
                if not record.live and not record.dead:
                    self._claim(record)
                    doomed.append(record)
        if not doomed:
            return []
        with self._busy():
            return await self._remove(doomed)

    async def prune_by_policy(
        self, policy: PrunePolicy | Sequence[PrunePolicy]
    ) -> list[SnapshotInfo]:
        """Apply a prune policy: its rules in order, each to what the rules before
        it left (see :mod:`solver.worker._gc` and ``docs/worker.md`` for the
        semantics). Return what was deleted, in the order it was deleted.

        Only snapshots without a live handle are candidates, least recently used
        first (the store keeps them in that order as they are used and released,
        so a rule costs O(log n) per snapshot it deletes plus the idle snapshots it
        passes over; a rule with nothing to do costs O(1), plus one free-space
        measure in a worker thread when it has ``min_free_space``). Delete
        listeners are told after each rule. A snapshot that cannot be removed is
        logged at ERROR, stays in the store and is not in the result. Like
        :meth:`delete`, it completes once started.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._check_open("prune snapshots")
        rules = as_rules(policy)
        deleted: list[SnapshotInfo] = []
        with self._busy():
            for rule in rules:
                free: int | None = None
                if rule.min_free_space:
                    free = await _in_thread(self._free_space, self._root)
                doomed = self._select(rule, rule.space_limit(self._used, free))
                if not doomed:
                    continue
                infos = {record.id: record.info() for record in doomed}
                gone = set(await self._remove(doomed))
                deleted.extend(infos[sid] for sid in infos if sid in gone)
        return deleted

    @property
    def used_space(self) -> int:
        """The total size in bytes of every snapshot (in use or not). O(1)."""
        return self._used

    async def free_space(self) -> int:
        """The free bytes on the root's file system (``shutil.disk_usage``, or the
        store's ``free_space`` function), measured in a worker thread."""
        self._check_open("measure free space")
        return await anyio.to_thread.run_sync(self._free_space, self._root)

    # -- internals ----------------------------------------------------------------

    def _check_open(self, action: str) -> None:
        if self._state == _STORE_OPEN:
            return
        if self._state == _CLOSED:
            raise SolveError(f"cannot {action}: the snapshot store at {self._root} is closed")
        raise SolveError(
            f"cannot {action}: the snapshot store at {self._root} is not open "
            "(use 'async with SnapshotStore(...)' or 'await store.open()')"
        )

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Count an operation in flight, so that :meth:`close` waits for it."""
        self._busy_count += 1
        try:
            yield
        finally:
            self._busy_count -= 1
            if self._busy_count == 0 and self._idle is not None:
                self._idle.set()

    def _base_record(self, base: Result) -> _Record:
        if isinstance(base, SnapshotRef) and base.released:
            raise SolveError(f"cannot copy snapshot {base.id}: the handle was released")
        view = getattr(base, "sys", None)
        if not isinstance(view, SnapshotView):
            raise SolveError(f"cannot copy {base!r}: it is not a snapshot of the built-in worker")
        record = view._record
        if record.store is not self:
            raise SolveError(
                f"cannot copy snapshot {record.id}: it belongs to the store at "
                f"{record.store.root}, not to this one"
            )
        return record

    def _claim(self, record: _Record) -> None:
        """Take an idle snapshot out of the store for deletion (under ``_lock``,
        with ``record.live == 0``): mark it dead, so it can never be acquired
        again, and drop it from every index."""
        record.dead = True
        self._idle_index.remove(record)
        del self._records[record.id]
        self._used -= record.size

    def _revive(self, record: _Record) -> None:
        """Undo :meth:`_claim` for a snapshot whose deletion failed."""
        with self._lock:
            record.dead = False
            self._idle_index.add(record)
        self._records[record.id] = record
        self._used += record.size

    def _select(self, rule: PrunePolicy, limit: int | None) -> list[_Record]:
        """Claim what ``rule`` deletes: idle snapshots, least recently used first,
        that pass its filters and age, until the used space is within ``limit``
        (None: no limit)."""
        if limit is not None and self._used <= limit:
            return []
        cutoff = self._clock() - rule.keep_duration if rule.keep_duration else None
        used = self._used
        chosen: list[_Record] = []
        with self._lock:
            for record in self._idle_index:
                if limit is not None and used <= limit:
                    break
                if cutoff is not None and record.last_used > cutoff:
                    break  # this one and every later one were used too recently
                if rule.matches(record.id, record.description):
                    chosen.append(record)
                    used -= record.size
            for record in chosen:
                self._claim(record)
        if limit is not None and used > limit:
            _log.debug(
                "prune rule %r leaves %d bytes, over its limit of %d (the rest is in use, "
                "too recent, or filtered out)", rule, used, limit
            )
        return chosen

    async def _remove(self, doomed: list[_Record]) -> list[str]:
        """Delete claimed snapshots from disk, revive those that could not be
        removed, tell the delete listeners; return the ids deleted."""
        failed = await _in_thread(_delete_snapshots, self._root, [r.id for r in doomed])
        for record in doomed:
            error = failed.get(record.id)
            if error is not None:
                _log.error("pruning snapshot %s failed: %s", record.id, error)
                self._revive(record)
        deleted = [record.id for record in doomed if record.id not in failed]
        await self._notify_deleted(deleted)
        return deleted

    def _check(self) -> None:
        """Assert the store's invariants (for tests)."""
        for sid, record in self._records.items():
            assert record.id == sid, (sid, record)
            assert not record.dead, sid
            assert record.live >= 0, (sid, record.live)
            assert record.store is self
            assert record.lock is self._lock
        with self._lock:
            idle = list(self._idle_index)
            expected = {sid for sid, r in self._records.items() if r.live == 0}
        assert len(idle) == len(expected), (len(idle), len(expected))
        assert {record.id for record in idle} == expected
        keys = [_idle_order(record) for record in idle]
        assert keys == sorted(keys)
        assert self._used == sum(record.size for record in self._records.values())
        for sid, mutable in self._mutables.items():
            assert mutable.id == sid
            assert mutable.state in (_OPEN, _COMMITTING), mutable
            assert sid not in self._records
        if self._state == _STORE_OPEN:
            assert self._lock_fd is not None or sys.platform == "win32"

    def __repr__(self) -> str:
        in_use = sum(1 for record in self._records.values() if record.live)
        return (
            f"<SnapshotStore {self._root} {self._state} snapshots={len(self._records)} "
            f"in_use={in_use} mutables={len(self._mutables)}>"
        )


# -- helpers that run on the loop -----------------------------------------------------


async def _in_thread(func: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run ``func`` in a worker thread, shielded: work that changes the disk always
    finishes, so the in-memory state can follow what it did."""
    with anyio.CancelScope(shield=True):
        result = await anyio.to_thread.run_sync(func, *args)
    return result


def _json_copy(description: Mapping[str, Any] | None) -> dict[str, Any]:
    if description is None:
        return {}
    try:
        copied = json.loads(json.dumps(dict(description)))
    except (TypeError, ValueError) as exc:
        raise SolveError(f"a snapshot description must be JSON-serialisable: {exc}") from exc
    assert isinstance(copied, dict)
    return copied


# -- file system work (runs in worker threads) ----------------------------------------


def _is_id(name: str) -> bool:
    return len(name) == _ID_LENGTH and all(c in "0123456789abcdef" for c in name)


def _add_mode(path: str, bits: int) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode) | bits)


def _on_remove_error(func: Callable[..., object], path: str, exc: BaseException) -> None:
    """``rmtree`` error handler: committed trees are read-only, so a failure to
    unlink or rmdir is answered by making the parent writable and trying again."""
    if isinstance(exc, FileNotFoundError):
        return
    if not isinstance(exc, PermissionError):
        raise exc
    _add_mode(os.path.dirname(path), stat.S_IRWXU)
    if func in (os.unlink, os.remove, os.rmdir):
        func(path)
    else:
        # The directory itself could not be opened or listed: fix it, remove it whole.
        _add_mode(path, stat.S_IRWXU)
        _rmtree(path)


def _rmtree(path: str) -> None:
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=_on_remove_error)
    else:
        shutil.rmtree(path, onerror=lambda func, p, info: _on_remove_error(func, p, info[1]))


def _remove_path(path: str) -> None:
    """Remove a file, symlink or (read-only) tree; missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _rmtree(path)
    else:
        try:
            os.unlink(path)
        except PermissionError:
            _add_mode(os.path.dirname(path), stat.S_IRWXU)
            os.unlink(path)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            _remove_path(os.fspath(path))
        except OSError as exc:
            _log.error("could not remove %s (it is removed when the store is next opened): %s",
                       path, exc)


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _make_dir(path: Path) -> None:
    path.mkdir()


def _copy_tree(src: Path, dst: Path) -> None:
    try:
        shutil.copytree(src, dst, symlinks=True)
        # Committing dropped the write bits; the copy is for writing.
        _add_mode(os.fspath(dst), stat.S_IWUSR)
        for dirpath, dirnames, filenames in os.walk(dst):
            for name in (*dirnames, *filenames):
                _add_mode(os.path.join(dirpath, name), stat.S_IWUSR)
    except BaseException:
        _remove_quietly(dst)
        raise


def _seal_tree(
    top: str, sid: str, store_links: frozenset[tuple[int, int]] = frozenset()
) -> int:
    """Drop the write bits of everything below ``top`` (not ``top`` itself: it must
    stay writable to be renamed to another directory) and return the apparent size.
    Refuses special files, which a snapshot cannot hold (and a copy would hang on
    a FIFO).

    ``chmod`` changes an inode, not a name, and a process can hard-link anything it
    can reach into its output: a host file, a file of another mount, a committed
    snapshot's file. So a regular file with more links than the tree holds names
    for is first given an inode of its own (:func:`_unshare`); only then are its
    write bits dropped. Names that all live in this tree stay linked to each other.
    Symlinks are never followed (nor chmodded). The exception is ``store_links``:
    inodes the worker linked from this store's sealed snapshots
    (:meth:`MutableSnapshot.share_store_files`), kept shared when they have no
    write bit (so sealing changes nothing of them)."""
    size = 0
    # Regular files with st_nlink > 1: the names found here, and the link count.
    linked: dict[tuple[int, int], tuple[list[str], int]] = {}
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode):
        raise SolveError(f"cannot commit snapshot {sid}: its working directory {top} is gone")
    stack = [top]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISLNK(mode):
                    size += st.st_size
                    continue
                if stat.S_ISDIR(mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(mode):
                    if st.st_nlink <= 1:
                        size += st.st_size
                    else:
                        key = (st.st_dev, st.st_ino)
                        group = linked.get(key)
                        if group is None:
                            linked[key] = ([entry.path], st.st_nlink)
                            size += st.st_size  # a hard-linked file counts once
                        else:
                            group[0].append(entry.path)
                        continue  # its mode is dealt with below, once it is private
                else:
                    rel = os.path.relpath(entry.path, top)
                    raise SolveError(
                        f"cannot commit snapshot {sid}: {rel!r} is a {_kind(mode)}; a snapshot "
                        "holds only regular files, directories and symlinks"
                    )
                if stat.S_IMODE(mode) & _WRITE_BITS:
                    os.chmod(entry.path, stat.S_IMODE(mode) & ~_WRITE_BITS)
    for key, (paths, nlink) in linked.items():
        if key in store_links and not os.lstat(paths[0]).st_mode & _WRITE_BITS:
            continue  # a sealed file of the store: immutable wherever it is named
        if len(paths) < nlink:  # some name of this inode is outside the tree
            _unshare(top, sid, paths, key)
        else:
            mode = stat.S_IMODE(os.lstat(paths[0]).st_mode)
            if mode & _WRITE_BITS:
                os.chmod(paths[0], mode & ~_WRITE_BITS)
    return size


def _unshare(top: str, sid: str, paths: list[str], key: tuple[int, int]) -> None:
    """Give the names ``paths`` (every name inside the tree of the inode ``key``,
    which also has names outside it) a fresh inode of their own, with the same
    bytes, owner, permission bits (write bits dropped) and times, and keep them
    linked to each other. Only reads the shared inode: nothing outside the tree
    changes (its link count drops, as for any ``unlink``). Raises
    :class:`~solver.SolveError` if the file cannot be read without changing it."""
    first = paths[0]
    rel = os.path.relpath(first, top)
    try:
        src = os.open(first, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
    except OSError as exc:
        raise SolveError(
            f"cannot commit snapshot {sid}: {rel!r} is a hard link to a file outside the "
            f"snapshot, and no private copy of it can be made ({exc.strerror or exc}); "
            "a snapshot never shares a file with anything outside the store"
        ) from exc
    try:
        st = os.fstat(src)
        if (st.st_dev, st.st_ino) != key or not stat.S_ISREG(st.st_mode):
            raise SolveError(f"cannot commit snapshot {sid}: {rel!r} changed while committing")
        with _writable_dir(os.path.dirname(first)):
            fresh = _sibling(first)
            try:
                _copy_fd(src, fresh, st)
                os.replace(fresh, first)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(fresh)
                raise
    finally:
        os.close(src)
    # The other names in the tree follow the first one to the new inode, so the
    # tree's own hard links survive.
    for path in paths[1:]:
        with _writable_dir(os.path.dirname(path)):
            sibling = _sibling(path)
            os.link(first, sibling)
            try:
                os.replace(sibling, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(sibling)
                raise


def _sibling(path: str) -> str:
    """An unused name in ``path``'s directory (removed by the caller on failure, or
    with the working directory)."""
    return f"{path}.unshare-{secrets.token_hex(4)}"


def _copy_fd(src: int, dst: str, st: os.stat_result) -> None:
    """Write the bytes of the open file ``src`` into the new file ``dst``, with
    ``st``'s owner (when allowed), permission bits less the write bits, and times."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _NOFOLLOW, 0o600)
    try:
        with open(fd, "wb", closefd=False) as out, open(src, "rb", closefd=False) as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
        if hasattr(os, "fchown") and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            # Only root may give a file away; anyone else keeps the copy as their own.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, st.st_uid, st.st_gid)
        # After fchown, which clears set-id bits.
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_WRITE_BITS)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


@contextlib.contextmanager
def _writable_dir(path: str) -> Iterator[None]:
    """Let entries of directory ``path`` be replaced for a moment (the walk above,
    or the process, may have dropped its write bit), then restore its mode."""
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    needed = stat.S_IWUSR | stat.S_IXUSR
    if mode & needed == needed:
        yield
        return
    os.chmod(path, mode | needed)
    try:
        yield
    finally:
        os.chmod(path, mode)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _write_meta(root: Path, meta: _Meta) -> None:
    final = root / "meta" / f"{meta.id}.json"
    temporary = root / "meta" / f"{meta.id}.{secrets.token_hex(4)}.tmp"
    try:
        temporary.write_text(meta.to_json(), encoding="utf-8")
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _commit_tree(
    root: Path, meta: _Meta, store_links: frozenset[tuple[int, int]] = frozenset()
) -> int:
    """Seal the working directory, write the metadata, rename it into snapshots/.
    Returns the size. The rename is the commit point."""
    src = root / "tmp" / meta.id
    dst = root / "snapshots" / meta.id
    size = _seal_tree(os.fspath(src), meta.id, store_links)
    meta = _Meta(meta.id, meta.created_at, meta.last_used, size, meta.description, meta.parents)
    _write_meta(root, meta)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            (root / "meta" / f"{meta.id}.json").unlink()
        raise
    try:
        os.chmod(dst, stat.S_IMODE(os.lstat(dst).st_mode) & ~_WRITE_BITS)
    except OSError as exc:  # committed all the same; only the top stays writable
        _log.warning("could not make snapshot %s read-only: %s", meta.id, exc)
    return size


def _delete_snapshots(root: Path, ids: list[str]) -> dict[str, OSError]:
    """Delete each snapshot: rename it out to tmp/ (the commit point), then remove
    its metadata and files. Returns the ids whose rename failed, which are intact."""
    failed: dict[str, OSError] = {}
    for sid in ids:
        path = root / "snapshots" / sid
        doomed = root / "tmp" / f"{sid}.deleted-{secrets.token_hex(4)}"
        try:
            top = os.lstat(path)
        except FileNotFoundError:
            top = None
        except OSError as exc:
            failed[sid] = exc
            continue
        if top is not None:
            try:
                # Moving a directory to another parent needs write permission on it.
                os.chmod(path, stat.S_IMODE(top.st_mode) | stat.S_IWUSR)
                os.rename(path, doomed)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.chmod(path, stat.S_IMODE(top.st_mode))
                failed[sid] = exc
                continue
        try:
            (root / "meta" / f"{sid}.json").unlink(missing_ok=True)
        except OSError as exc:
            _log.error("could not remove the metadata of deleted snapshot %s: %s", sid, exc)
        try:
            (root / "meta" / f"{sid}{TABLE_SUFFIX}").unlink(missing_ok=True)
        except OSError as exc:  # the next open removes a table without a snapshot
            _log.error("could not remove the digest table of deleted snapshot %s: %s", sid, exc)
        if top is not None:
            _remove_quietly(doomed)
    return failed


class _HeldElsewhereError(SolveError):
    """Another process holds the root's lock."""


# The lock files (by device and inode) this process holds: a second open here is
# refused at once instead of waiting for a lock that only this process can free.
_held_roots: set[tuple[int, int]] = set()
_held_roots_lock = threading.Lock()


def _lock_root(root: Path) -> int | None:
    if sys.platform == "win32":  # no flock(); the root is not protected there
        return None
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        st = os.fstat(fd)
        with _held_roots_lock:
            if (st.st_dev, st.st_ino) in _held_roots:
                raise SolveError(f"the snapshot store at {root} is already open in this process")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _HeldElsewhereError(
                    f"the snapshot store at {root} is already open in another process"
                ) from None
            _held_roots.add((st.st_dev, st.st_ino))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock_root(fd: int | None) -> None:
    if fd is not None:
        st = os.fstat(fd)
        with _held_roots_lock:
            _held_roots.discard((st.st_dev, st.st_ino))
            os.close(fd)  # closing the only descriptor releases the flock


def _open_root(root: Path) -> tuple[int | None, list[_Meta]]:
    for sub in (root, root / "snapshots", root / "tmp", root / "meta"):
        sub.mkdir(parents=True, exist_ok=True)
    fd = _lock_root(root)
    try:
        return fd, _recover(root)
    except BaseException:
        _unlock_root(fd)
        raise


def _recover(root: Path) -> list[_Meta]:
    """Remove a crashed process's debris and return the valid snapshots' metadata."""
    with os.scandir(root / "tmp") as entries:
        leftovers = [entry.path for entry in entries]
    for path in leftovers:
        _log.info("removing leftover %s of an earlier process", path)
        _remove_path(path)
    meta_files: dict[str, str] = {}
    tables: dict[str, str] = {}
    with os.scandir(root / "meta") as entries:
        for entry in entries:
            sid, dot, ext = entry.name.partition(".")
            if dot and ext == "json" and _is_id(sid):
                meta_files[sid] = entry.path
            elif dot and f".{ext}" == TABLE_SUFFIX and _is_id(sid):
                tables[sid] = entry.path
            else:  # an interrupted metadata or digest table write, or a stranger
                _remove_path(entry.path)
    metas: list[_Meta] = []
    with os.scandir(root / "snapshots") as entries:
        found = [(entry.name, entry.path, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for sid, path, is_dir in found:
        meta_path = meta_files.pop(sid, None)
        problem: str | None = None
        if not _is_id(sid) or not is_dir:
            problem = "it is not a snapshot directory"
        elif meta_path is None:
            problem = "its metadata is missing"
        else:
            try:
                with open(meta_path, encoding="utf-8") as f:
                    metas.append(_Meta.from_json(sid, f.read()))
            except (OSError, ValueError, TypeError) as exc:
                problem = f"its metadata is corrupt ({exc})"
        if problem is not None:
            _log.warning("removing snapshot %s at %s: %s", sid, path, problem)
            _remove_path(path)
            if meta_path is not None:
                _remove_path(meta_path)
    for sid, meta_path in meta_files.items():
        _log.info("removing metadata of missing snapshot %s", sid)
        _remove_path(meta_path)
    kept = {meta.id for meta in metas}
    for sid, table_path in tables.items():
        if sid not in kept:  # its snapshot was deleted (or is debris)
            _remove_path(table_path)
    recover_local_tables(root)
    return metas


def _close_root(root: Path, leftovers: list[Path], metas: list[_Meta], fd: int | None) -> None:
    try:
        for path in leftovers:
            _remove_quietly(path)
        for meta in metas:
            try:
                _write_meta(root, meta)
            except OSError as exc:
                _log.error("could not write the metadata of snapshot %s: %s", meta.id, exc)
    finally:
        _unlock_root(fd)


# -- safe path resolution inside a snapshot -------------------------------------------


def _refused(rel: str, sid: str, reason: str) -> UnsafePathError:
    return UnsafePathError(f"path {rel!r} in snapshot {sid} is refused: {reason}")


def _split(rel: str, sid: str) -> list[str]:
    """The components of a path argument; refuses absolute paths and ``..``."""
    if "\0" in rel:
        raise _refused(rel, sid, "it contains a NUL byte")
    if rel.startswith("/") or os.path.isabs(rel):
        raise _refused(rel, sid, "absolute paths are not allowed (paths are relative to "
                       "the snapshot root)")
    parts = [part for part in rel.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refused(rel, sid, "'..' is not allowed in a path")
    return parts


def _resolve(root: str, sid: str, rel: str, follow_final: bool) -> str:
    """The real path of ``rel`` inside ``root``, following symlinks only while they
    stay inside; the last component is followed only if ``follow_final``."""
    pending: list[tuple[str, str | None]] = [(part, None) for part in reversed(_split(rel, sid))]
    resolved: list[str] = []
    links = 0
    while pending:
        name, via = pending.pop()
        if name == "..":  # only symlink targets get here
            if not resolved:
                raise _refused(rel, sid, f"symlink {via} points outside the snapshot")
            resolved.pop()
            continue
        if not pending and not follow_final:
            resolved.append(name)
            break
        here = os.path.join(root, *resolved, name)
        st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            target = os.readlink(here)
            link = f"{'/'.join([*resolved, name])!r} -> {target!r}"
            if links > _MAX_SYMLINKS:
                raise _refused(
                    rel, sid, f"too many levels of symbolic links (a symlink loop? at {link})"
                )
            if target.startswith("/") or os.path.isabs(target):
                raise _refused(rel, sid, f"symlink {link} points outside the snapshot "
                               "(absolute target)")
            for part in reversed(target.split("/")):
                if part not in ("", "."):
                    pending.append((part, link))
            continue
        resolved.append(name)
    return os.path.join(root, *resolved)


_REASONS: Final = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
}


def _path_error(sid: str, rel: str, action: str, exc: OSError) -> SolveError:
    reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    return SolveError(f"cannot {action} {rel or '.'!r} in snapshot {sid}: {reason}")


def _resolve_checked(root: str, sid: str, rel: str, follow_final: bool, action: str) -> str:
    try:
        return _resolve(root, sid, rel, follow_final)
    except OSError as exc:
        raise _path_error(sid, rel, action, exc) from exc


def _file_stat(path: str, name: str, st: os.stat_result) -> FileStat:
    linkname = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
    return FileStat(
        path=name,
        mode=st.st_mode,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
        linkname=linkname,
    )


def _read_file(root: str, sid: str, rel: str, offset: int, length: int | None) -> bytes:
    real = _resolve_checked(root, sid, rel, True, "read")
    try:
        with open(real, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SolveError(f"cannot read {rel!r} in snapshot {sid}: not a regular file")
            f.seek(offset)
            return f.read() if length is None else f.read(length)
    except OSError as exc:
        raise _path_error(sid, rel, "read", exc) from exc


def _read_dir(root: str, sid: str, rel: str, pattern: str | None) -> list[FileStat]:
    real = _resolve_checked(root, sid, rel, True, "list")
    try:
        with os.scandir(real) as entries:
            found = sorted(entries, key=lambda entry: entry.name)
        return [
            _file_stat(entry.path, entry.name, entry.stat(follow_symlinks=False))
            for entry in found
            if pattern is None or fnmatch.fnmatchcase(entry.name, pattern)
        ]
    except OSError as exc:
        raise _path_error(sid, rel, "list", exc) from exc


def _stat_entry(root: str, sid: str, rel: str) -> FileStat:
    real = _resolve_checked(root, sid, rel, False, "stat")
    try:
        return _file_stat(real, "/".join(_split(rel, sid)) or ".", os.lstat(real))
    except OSError as exc:
        raise _path_error(sid, rel, "stat", exc) from exc


def _walk(root: str, sid: str, rel: str) -> list[FileStat]:
    real = _resolve_checked(root, sid, rel, True, "walk")
    prefix = "/".join(_split(rel, sid))
    result: list[FileStat] = []
    try:
        if not stat.S_ISDIR(os.stat(real).st_mode):
            raise SolveError(f"cannot walk {rel!r} in snapshot {sid}: not a directory")
        # A stack of iterators gives depth-first, name-sorted order without recursion.
        stack: list[Iterator[os.DirEntry[str]]] = []
        prefixes: list[str] = []

        def enter(path: str, name_prefix: str) -> None:
            with os.scandir(path) as entries:
                stack.append(iter(sorted(entries, key=lambda entry: entry.name)))
            prefixes.append(name_prefix)

        enter(real, prefix)
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                prefixes.pop()
                continue
            name = f"{prefixes[-1]}/{entry.name}" if prefixes[-1] else entry.name
            st = entry.stat(follow_symlinks=False)
            result.append(_file_stat(entry.path, name, st))
            if stat.S_ISDIR(st.st_mode):
                enter(entry.path, name)
    except OSError as exc:
        raise _path_error(sid, rel, "walk", exc) from exc
    return result
