"""The built-in worker's persistent cache: cache records in SQLite, results in the
snapshot store.

A result of the built-in kinds is a committed snapshot, and a committed snapshot
stays on disk after its last handle is released (until it is pruned). So the
persistent :class:`~solver.cache._storage.ResultStorage` of the worker,
:class:`SnapshotResultStorage`, keeps no handle at all: a saved result is
remembered by its snapshot id (the :class:`~solver.cache._storage.CacheResult` ID is
the snapshot id), and :meth:`~SnapshotResultStorage.load` asks the store for a new
handle. Holding no handle is what lets the garbage collector prune cached
snapshots; BuildKit's worker does the same (a retained ref, not a live one).

A record whose snapshot is gone is a clean miss, never an error:

* at open, :func:`open_worker_cache` releases (through the key store's release
  cascade) every result whose snapshot no longer exists, deleted while no process
  had the cache open; this is one bulk query and one transaction however many
  records there are;
* while open, a delete listener on the store releases the records of every
  snapshot that :meth:`~SnapshotStore.delete` or :meth:`~SnapshotStore.prune`
  removes, at once;
* in between, the manager's ``records()`` checks :meth:`exists` and releases what it
  finds missing, and a load that loses a race with a deletion fails as a cache
  miss (the solver then runs the step).

Results that are not snapshots of the store (an application's op kind returning
some other :class:`~solver.Result`) cannot outlive the process. They are kept in
memory, with a handle of their own, exactly as the in-memory cache keeps them; their
key records are written like any other and released at the next open, when their
results are found missing.

Crash safety. The order of a save is: the snapshot is committed (by the op), then
the record is added, then the links from the dep keys. The process may die between
any two steps. A snapshot without a record is an unused snapshot, which any prune
removes; a record without links is unreachable (a new one is made next time) and
goes when its snapshot is pruned; a record is never written before its snapshot
exists, and the open-time pass drops records whose snapshot is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import anyio
import anyio.lowlevel

from ..cache import (
    CacheResult,
    InMemoryResultStorage,
    KeyedCacheManager,
    NotFoundError,
    SQLiteCacheStorage,
)
from ._snapshots import SnapshotNotFoundError, SnapshotStore, SnapshotView

if TYPE_CHECKING:
    from .._result import Result

__all__ = ["CACHE_DB_NAME", "SnapshotResultStorage", "open_worker_cache"]

_log = logging.getLogger("solver")

CACHE_DB_NAME: Final = "cache.db"
"""The name of the cache database in a snapshot store's root."""


class SnapshotResultStorage:
    """A :class:`~solver.cache._storage.ResultStorage` whose results are the snapshots
    of ``store``, remembered by id (see the module docstring).

    It holds no handle on a snapshot. Results that are not snapshots of ``store``
    are kept in memory (with a handle) for the life of this object. :meth:`close`
    releases those and leaves the store open: the store is the worker's.
    """

    __slots__ = ("_closed", "_memory", "_store")

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store
        self._memory = InMemoryResultStorage()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SnapshotResultStorage {self._store.root} {state}>"

    def _live(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the result storage is closed")

    def _snapshot_id(self, result: Result) -> str | None:
        view = result.sys
        if isinstance(view, SnapshotView) and view._record.store is self._store:
            return view.id
        return None

    async def save(self, result: Result, created_at: float) -> CacheResult:
        """Remember ``result``: by its snapshot id when it is a snapshot of the
        store (no handle is taken), else in memory (a handle is taken). O(1);
        always checkpoints."""
        self._live()
        sid = self._snapshot_id(result)
        if sid is None:
            saved = await self._memory.save(result, created_at)
            await anyio.lowlevel.checkpoint()
            return saved
        # The caller's handle keeps the snapshot on disk while this runs.
        await anyio.lowlevel.checkpoint()
        return CacheResult(sid, created_at)

    async def load(self, cache_result: CacheResult) -> Result:
        """A new handle (the caller's) on the stored result:
        :meth:`SnapshotStore.load` for a snapshot.
        :class:`~solver.cache._storage.NotFoundError` if it is gone."""
        self._live()
        if await self._memory.exists(cache_result.id):
            result = await self._memory.load(cache_result)
            await anyio.lowlevel.checkpoint()
            return result
        try:
            return await self._store.load(cache_result.id)
        except SnapshotNotFoundError as exc:
            raise NotFoundError(f"cached snapshot {cache_result.id} is gone") from exc

    async def exists(self, result_id: str) -> bool:
        """Whether ``result_id`` can still be loaded. O(1); always checkpoints."""
        self._live()
        if await self._memory.exists(result_id):
            await anyio.lowlevel.checkpoint()
            return True
        return await self._store.exists(result_id)

    async def release(self, result_id: str) -> None:
        """Forget ``result_id``. A snapshot is left in the store (an unused snapshot
        that the garbage collector may prune); an in-memory result's handle is
        released. Shielded."""
        self._live()
        with anyio.CancelScope(shield=True):
            await self._memory.release(result_id)
            await anyio.lowlevel.checkpoint()

    async def close(self) -> None:
        """Release the in-memory results' handles; idempotent."""
        self._closed = True
        await self._memory.close()


async def open_worker_cache(
    store: SnapshotStore, path: str | os.PathLike[str] | None = None
) -> KeyedCacheManager:
    """The persistent cache of the worker whose snapshot store is ``store`` (open):
    a :class:`~solver.KeyedCacheManager` over a :class:`SQLiteCacheStorage` at
    ``path`` (default ``<store root>/cache.db``) and a :class:`SnapshotResultStorage`.

    Releases the records of snapshots that are gone, and registers a delete
    listener on ``store`` that releases the records of snapshots deleted later.
    The manager's ID is the database's ID. The caller closes the manager (before
    the store). O(records) at open.
    """
    storage = await SQLiteCacheStorage.open(
        path if path is not None else store.root / CACHE_DB_NAME
    )
    results = SnapshotResultStorage(store)
    manager = KeyedCacheManager(storage.id, storage, results)
    try:
        await release_missing(storage, results)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await manager.close()
        raise

    async def on_deleted(ids: Sequence[str]) -> None:
        # The store outlives the manager (the worker closes the cache first): a
        # deletion after the close has no records left to update.
        if storage.closed:
            return
        try:
            await storage.release_many(ids)
        except anyio.ClosedResourceError:
            pass

    store.add_delete_listener(on_deleted)
    return manager


async def release_missing(storage: SQLiteCacheStorage, results: SnapshotResultStorage) -> int:
    """Release every result of ``storage`` that ``results`` cannot load any more (one
    transaction); return how many. O(results)."""
    missing = [rid for rid in await storage.result_ids() if not await results.exists(rid)]
    if missing:
        await storage.release_many(missing)
        _log.info(
            "released %d cache record(s) whose snapshots are gone from %s",
            len(missing),
            storage.path.parent,
        )
    return len(missing)
