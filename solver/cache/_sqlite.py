"""A persistent :class:`~solver.cache._storage.CacheKeyStorage` in one SQLite file.

The key graph of :mod:`solver.cache._storage` (keys, their results, the links between
them) kept in a database that outlives the process, so that a second process finds
the keys the first one saved (BuildKit keeps the same graph in bbolt, reference §5).

Tables
------

::

    meta(name, value)                       the store's ID ('cache_id')
    results(key, result, created_at)        result IDs stored under a key
    links(source, input, output, digest,    a link source --label--> target
          has_selector, selector, target)

A key has no row of its own: it *exists* while it holds a result or an outgoing
link, exactly as in :class:`~solver.cache._storage.InMemoryCacheStorage` (a key that is
only a link target holds nothing). The two reverse indexes of the in-memory store are
SQL indexes here: ``results(result)`` is *by result* and ``links(target)`` is
*backlinks*; SQLite keeps them consistent with their tables, so they cannot drift.
A selector is ``(has_selector, selector)`` rather than a nullable column, because a
unique index treats NULLs as distinct and a link must be stored once. Rows come back
in insertion order (``ORDER BY rowid``); a result stored again keeps its row (an
upsert), as a dictionary keeps a replaced key's place.

Transactions and threads
------------------------

Every public coroutine is one transaction (``BEGIN IMMEDIATE`` when it writes, so two
writers never deadlock on a lock upgrade), run in a worker thread through
``anyio.to_thread.run_sync`` with a capacity limiter of one: callers queue on the
event loop, never in threads, and the one connection is used by one thread at a
time. The exception is a read that finds the connection idle (no call in a thread,
the lock free): it runs inline on the event loop, then checkpoints, because an
indexed read takes microseconds and the thread hop around it tens of them (a
no-op build of 35 files made 500 of them). The connection is still used by one thread at a
time (a :class:`threading.Lock` guards it too, for :meth:`SQLiteCacheStorage._check`
and :meth:`close`). A call that has reached its thread is not abandoned on
cancellation: its transaction commits or rolls back as a whole and the caller sees
the cancellation at its next checkpoint. So every coroutine always checkpoints.

The release cascade (:meth:`SQLiteCacheStorage.release`) runs in one transaction:
either every key it empties is gone, with the links pointing at it, or nothing
changed.

Durability and corruption
-------------------------

The database is in WAL mode with ``synchronous=NORMAL`` (checkpointed every 256
pages, the WAL file cut back to 256 KiB after a checkpoint): a committed transaction
survives the process being killed at any moment (the WAL is in the OS's page cache),
and a power loss may lose the last transactions but never leaves a torn database.
:meth:`SQLiteCacheStorage.open` runs ``PRAGMA quick_check``; a file that is not a
database, fails the check, or has a schema this version does not know is renamed to
``<name>.corrupt-<timestamp>`` (its ``-wal`` beside it) with a WARNING on the
``solver`` logger, and an empty database is made in its place: a cache that cannot
be read costs a rebuild, never a failed build. A database that is merely busy (held
by another process past the busy timeout) is never moved.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._cache import CacheInfoLink, root_key
from .._errors import SolveError
from ._storage import CacheResult, NotFoundError

__all__ = ["SQLiteCacheStorage"]

_log = logging.getLogger("solver")

_WAL_LIMIT: Final = 1 << 18  # bytes the WAL file is cut back to after a checkpoint

T = TypeVar("T")

_SCHEMA_VERSION: Final = 1
_BUSY_TIMEOUT_MS: Final = 30_000

_SCHEMA: Final = """
CREATE TABLE meta (
    name TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE results (
    key TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (key, result)
);
CREATE INDEX results_by_result ON results (result);
CREATE TABLE links (
    source TEXT NOT NULL,
    input INTEGER NOT NULL,
    output INTEGER NOT NULL,
    digest TEXT NOT NULL,
    has_selector INTEGER NOT NULL,
    selector TEXT NOT NULL,
    target TEXT NOT NULL,
    UNIQUE (source, input, output, digest, has_selector, selector, target)
);
CREATE INDEX links_by_target ON links (target);
"""

_TABLES: Final = frozenset({"meta", "results", "links"})

# SQLite's primary result codes that mean "this file is not a usable database".
_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# ... and those that mean "this file cannot be opened or read". Either way only a
# regular file is moved aside: a directory in the way, or a missing parent, is a
# configuration error, not a bad file.
_UNREADABLE_CODES: Final = frozenset({sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM})


class _UnusableDatabase(Exception):
    """The file opened but is not a cache database of this version."""


def _link_params(link: CacheInfoLink) -> tuple[int, int, str, int, str]:
    selector = link.selector
    return (
        link.input,
        link.output,
        link.digest,
        0 if selector is None else 1,
        "" if selector is None else selector,
    )


class SQLiteCacheStorage:
    """A :class:`~solver.cache._storage.CacheKeyStorage` in a SQLite database file.

    Open it with ``await SQLiteCacheStorage.open(path)`` (the file and its directory's
    missing parents are created). It has the semantics of
    :class:`~solver.cache._storage.InMemoryCacheStorage`, the release cascade
    included, and keeps them across processes. Every coroutine is one transaction
    in a worker thread and always checkpoints; ``n`` below is the number of rows the
    call reads or writes, each an indexed lookup (O(log size)).

    Use it from one event loop. A second process may open the same file (SQLite
    serialises the writers), but the built-in worker never does: the snapshot
    store's lock on its root covers ``cache.db`` too.
    """

    __slots__ = ("_closed", "_conn", "_id", "_limiter", "_mutex", "_path")

    def __init__(self, path: Path, conn: sqlite3.Connection, cache_id: str) -> None:
        """Use :meth:`open`."""
        self._path = path
        self._conn: sqlite3.Connection | None = conn
        self._id = cache_id
        self._mutex = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SQLiteCacheStorage:
        """Open (or create) the database at ``path``.

        A corrupt or unreadable file is moved aside and replaced by an empty
        database (see the module docstring); that is logged at WARNING on the
        ``solver`` logger. Raises :class:`~solver.SolveError` if no database can be
        opened at ``path`` at all. O(size of the file) for the integrity check.
        """
        with anyio.CancelScope(shield=True):
            target, conn, cache_id = await anyio.to_thread.run_sync(_open_or_replace, path)
        storage = cls(target, conn, cache_id)
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            await storage.close()
            raise
        return storage

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def id(self) -> str:
        """A random ID made with the database and kept in it: the same file has the
        same ID in every process (a cache manager over it can use it as its own)."""
        return self._id

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<SQLiteCacheStorage {self._path}{state}>"

    # -- the protocol -------------------------------------------------------------------

    async def exists(self, id: str) -> bool:
        """Whether key ``id`` holds any result or outgoing link. O(1) lookups."""
        return await self._call(_exists, id)

    async def walk(self) -> list[str]:
        """Every key ID that holds a result or an outgoing link. O(rows)."""
        return await self._call(_walk)

    async def walk_results(self, id: str) -> list[CacheResult]:
        """The results stored under key ``id``, oldest row first. O(n)."""
        return await self._call(_walk_results, id)

    async def load(self, id: str, result_id: str) -> CacheResult:
        """The result ``result_id`` under key ``id``;
        :class:`~solver.cache._storage.NotFoundError` if either is missing. O(1)."""
        return await self._call(_load, id, result_id)

    async def add_result(self, id: str, result: CacheResult) -> None:
        """Store ``result`` under key ``id`` (replacing the ``created_at`` of a
        result with the same ID). O(1)."""
        await self._call(_add_result, id, result, write=True)

    async def walk_ids_by_result(self, result_id: str) -> list[str]:
        """The key IDs that hold ``result_id``. O(n)."""
        return await self._call(_walk_ids_by_result, result_id)

    async def release(self, result_id: str) -> None:
        """Remove ``result_id`` from every key and run the release cascade, in one
        transaction. O(keys holding it + keys deleted x their parents)."""
        await self._call(_release_all, (result_id,), write=True)

    async def add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        """Link key ``id`` to ``target`` under ``link`` (idempotent). O(1)."""
        await self._call(_add_link, id, link, target, write=True)

    async def walk_links(self, id: str, link: CacheInfoLink) -> list[str]:
        """The targets linked from ``id`` under exactly ``link``. O(n)."""
        return await self._call(_walk_links, id, link)

    async def exists_many(self, ids: Sequence[str]) -> list[bool]:
        """:meth:`exists` of each ID, in order, in one read transaction: one
        storage call (and one checkpoint) for a batch (the root keys of a
        graph's leaves, which the cached path asks together). O(len(ids))."""
        if not ids:
            self._live()
            return []
        return await self._call(_exists_many, ids)

    async def walk_links_many(
        self, requests: Sequence[tuple[str, CacheInfoLink]]
    ) -> list[list[str]]:
        """:meth:`walk_links` of each ``(id, link)``, in order, in one read
        transaction: one storage call (and one checkpoint) for a batch of lookups
        (the cached path's key pass asks a whole layer of the graph at once).
        O(sum of n)."""
        if not requests:
            self._live()
            return []
        return await self._call(_walk_links_many, requests)

    async def add_many(
        self,
        results: Sequence[tuple[str, CacheResult]],
        links: Sequence[tuple[str, CacheInfoLink, str]],
    ) -> None:
        """:meth:`add_result` of each ``(id, result)``, then :meth:`add_link` of each
        ``(id, link, target)``, in one write transaction: one storage call (and one
        checkpoint) for a batch of saves, all of it stored or none. O(len(results)
        + len(links))."""
        if not results and not links:
            self._live()
            return
        await self._call(_add_many, results, links, write=True)

    async def has_link(self, id: str, link: CacheInfoLink, target: str) -> bool:
        """Whether ``id`` links to ``target`` under exactly ``link``. O(1)."""
        return await self._call(_has_link, id, link, target)

    async def walk_backlinks(self, id: str) -> list[tuple[str, CacheInfoLink]]:
        """``(source ID, link)`` for every link pointing at ``id``, the link in
        root-key form (see the protocol). O(n)."""
        return await self._call(_walk_backlinks, id)

    async def close(self) -> None:
        """Close the database (SQLite folds the WAL into the file). Idempotent and
        shielded; later use raises :class:`anyio.ClosedResourceError`."""
        with anyio.CancelScope(shield=True):
            if self._closed:
                await anyio.lowlevel.checkpoint()
                return
            self._closed = True
            async with self._limiter:
                await anyio.to_thread.run_sync(self._close_connection)

    # -- beyond the protocol --------------------------------------------------------------

    async def result_ids(self) -> list[str]:
        """Every result ID stored under some key, once each. O(results)."""
        return await self._call(_result_ids)

    async def release_many(self, result_ids: Iterable[str]) -> None:
        """:meth:`release` each of ``result_ids``, all in one transaction."""
        await self._call(_release_all, tuple(result_ids), write=True)

    def _check(self) -> None:
        """Assert every invariant (for tests; blocks the caller). O(size)."""
        with self._mutex:
            conn = self._conn
            if conn is None:
                return
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            assert problems == ["ok"], problems
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            assert version == _SCHEMA_VERSION, version
            stored_id = conn.execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()
            assert stored_id == (self._id,), stored_id
            bad_results = conn.execute(
                "SELECT key, result FROM results WHERE key = '' OR result = ''"
            ).fetchall()
            assert not bad_results, f"results with an empty ID: {bad_results}"
            bad_links = conn.execute(
                "SELECT source, target FROM links WHERE source = '' OR target = '' "
                "OR input < 0 OR output < 0 OR has_selector NOT IN (0, 1) "
                "OR (has_selector = 0 AND selector != '')"
            ).fetchall()
            assert not bad_links, f"malformed links: {bad_links}"

    # -- internals ------------------------------------------------------------------------

    def _live(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the cache key storage is closed")

    async def _call(self, func: Callable[..., T], *args: object, write: bool = False) -> T:
        self._live()
        if (
            not write
            and self._limiter.borrowed_tokens == 0
            and anyio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            and self._mutex.acquire(False)
        ):
            # A read with the connection idle runs here, on the event loop: a
            # lookup by index in a WAL database (readers never wait for a writer)
            # takes microseconds, where a hop to a worker thread and back costs
            # tens of them; a no-op build makes hundreds (docs/performance.md,
            # "Real builds"). Only while no worker thread is busy: sqlite3 lets
            # go of the GIL while it reads, and taking it back from a thread that
            # hashes files took 460 us a lookup. It still checkpoints.
            try:
                out = self._transaction_locked(func, args, write)
            finally:
                self._mutex.release()
            await anyio.lowlevel.checkpoint()
            return out
        return await anyio.to_thread.run_sync(
            self._transaction, func, args, write, limiter=self._limiter
        )

    def _transaction(self, func: Callable[..., T], args: tuple[object, ...], write: bool) -> T:
        with self._mutex:
            return self._transaction_locked(func, args, write)

    def _transaction_locked(
        self, func: Callable[..., T], args: tuple[object, ...], write: bool
    ) -> T:
        conn = self._conn
        if conn is None:  # closed while this call waited for the limiter
            raise anyio.ClosedResourceError("the cache key storage is closed")
        if not write and func in _ONE_STATEMENT_READS:
            # One SELECT is a transaction of its own (autocommit): the same snapshot,
            # without the BEGIN and COMMIT round trips (10 -> 5.6 us a lookup).
            return func(conn, *args)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            out = func(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return out

    def _close_connection(self) -> None:
        with self._mutex:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# -- the transactions' bodies (run in a worker thread) --------------------------------


def _key_exists(conn: sqlite3.Connection, id: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM results WHERE key = ?) "
        "OR EXISTS (SELECT 1 FROM links WHERE source = ?)",
        (id, id),
    ).fetchone()
    return bool(row[0])


def _exists(conn: sqlite3.Connection, id: str) -> bool:
    return _key_exists(conn, id)


def _exists_many(conn: sqlite3.Connection, ids: Sequence[str]) -> list[bool]:
    return [_key_exists(conn, id) for id in ids]


def _walk(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT key FROM results UNION SELECT source FROM links")
    return [row[0] for row in rows]


def _walk_results(conn: sqlite3.Connection, id: str) -> list[CacheResult]:
    rows = conn.execute(
        "SELECT result, created_at FROM results WHERE key = ? ORDER BY rowid", (id,)
    )
    return [CacheResult(result, created_at) for result, created_at in rows]


def _load(conn: sqlite3.Connection, id: str, result_id: str) -> CacheResult:
    row = conn.execute(
        "SELECT created_at FROM results WHERE key = ? AND result = ?", (id, result_id)
    ).fetchone()
    if row is not None:
        return CacheResult(result_id, row[0])
    if not _key_exists(conn, id):
        raise NotFoundError(f"no such cache key {id}")
    raise NotFoundError(f"no result {result_id} under cache key {id}")


def _add_result(conn: sqlite3.Connection, id: str, result: CacheResult) -> None:
    conn.execute(
        "INSERT INTO results (key, result, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key, result) DO UPDATE SET created_at = excluded.created_at",
        (id, result.id, result.created_at),
    )


def _walk_ids_by_result(conn: sqlite3.Connection, result_id: str) -> list[str]:
    rows = conn.execute("SELECT key FROM results WHERE result = ? ORDER BY rowid", (result_id,))
    return [row[0] for row in rows]


def _result_ids(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT DISTINCT result FROM results")]


def _release_all(conn: sqlite3.Connection, result_ids: tuple[str, ...]) -> None:
    for result_id in result_ids:
        ids = _walk_ids_by_result(conn, result_id)
        if not ids:
            continue
        conn.execute("DELETE FROM results WHERE result = ?", (result_id,))
        _delete_if_empty(conn, ids)


def _delete_if_empty(conn: sqlite3.Connection, pending: list[str]) -> None:
    # A worklist, as in the in-memory store: a key left with neither results nor
    # links is deleted, which means deleting the links that point at it (it has no
    # rows of its own), and each parent that lost a link is looked at in turn.
    while pending:
        id = pending.pop()
        if _key_exists(conn, id):
            continue
        parents = [
            row[0]
            for row in conn.execute("SELECT DISTINCT source FROM links WHERE target = ?", (id,))
        ]
        if not parents:
            continue
        conn.execute("DELETE FROM links WHERE target = ?", (id,))
        pending.extend(parents)


def _add_link(conn: sqlite3.Connection, id: str, link: CacheInfoLink, target: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO links "
        "(source, input, output, digest, has_selector, selector, target) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (id, *_link_params(link), target),
    )


def _walk_links(conn: sqlite3.Connection, id: str, link: CacheInfoLink) -> list[str]:
    rows = conn.execute(
        "SELECT target FROM links WHERE source = ? AND input = ? AND output = ? "
        "AND digest = ? AND has_selector = ? AND selector = ? ORDER BY rowid",
        (id, *_link_params(link)),
    )
    return [row[0] for row in rows]


def _walk_links_many(
    conn: sqlite3.Connection, requests: Sequence[tuple[str, CacheInfoLink]]
) -> list[list[str]]:
    return [_walk_links(conn, id, link) for id, link in requests]


def _add_many(
    conn: sqlite3.Connection,
    results: Sequence[tuple[str, CacheResult]],
    links: Sequence[tuple[str, CacheInfoLink, str]],
) -> None:
    for id, result in results:
        _add_result(conn, id, result)
    for id, link, target in links:
        _add_link(conn, id, link, target)


def _has_link(conn: sqlite3.Connection, id: str, link: CacheInfoLink, target: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM links WHERE source = ? AND input = ? AND output = ? AND digest = ? "
        "AND has_selector = ? AND selector = ? AND target = ?",
        (id, *_link_params(link), target),
    ).fetchone()
    return row is not None


def _walk_backlinks(conn: sqlite3.Connection, id: str) -> list[tuple[str, CacheInfoLink]]:
    rows = conn.execute(
        "SELECT source, input, output, digest, has_selector, selector FROM links "
        "WHERE target = ? ORDER BY rowid",
        (id,),
    )
    return [
        (
            source,
            CacheInfoLink(
                input=input,
                output=0,
                digest=root_key(digest, output),
                selector=selector if has_selector else None,
            ),
        )
        for source, input, output, digest, has_selector, selector in rows
    ]


# -- opening, and moving a bad file aside ---------------------------------------------


def _open_or_replace(
    name: str | os.PathLike[str],
) -> tuple[Path, sqlite3.Connection, str]:
    path = Path(name).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SolveError(
            f"cannot create the directory of the cache database {path}: {exc}"
        ) from exc
    try:
        return (path, *_open_database(path))
    except (sqlite3.DatabaseError, _UnusableDatabase) as exc:
        if not _is_bad_file(path, exc):
            raise SolveError(f"cannot open the cache database {path}: {exc}") from exc
        problem = exc
    aside = _move_aside(path)
    _log.warning(
        "the cache database %s is unusable (%s); moved it to %s and started an empty "
        "cache (cached results are rebuilt as needed)",
        path,
        problem,
        aside,
    )
    try:
        return (path, *_open_database(path))
    except (sqlite3.DatabaseError, _UnusableDatabase) as exc:
        raise SolveError(f"cannot create the cache database {path}: {exc}") from exc


def _is_bad_file(path: Path, exc: BaseException) -> bool:
    if not path.is_file():  # a directory in the way is the user's to sort out
        return False
    if isinstance(exc, _UnusableDatabase):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(code, int):
        return False
    primary = code & 0xFF
    return primary in _CORRUPT_CODES or primary in _UNREADABLE_CODES


def _open_database(path: Path) -> tuple[sqlite3.Connection, str]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _UnusableDatabase(f"cannot use write-ahead logging (journal mode {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoint the WAL every 256 pages (1 MiB) and cut the file back to 256 KiB
        # after a checkpoint: SQLite's defaults (1,000 pages, never truncated) left a
        # 4 MB WAL beside a 150 KB database after one cold build of 35 files.
        conn.execute("PRAGMA wal_autocheckpoint = 256")
        conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _UnusableDatabase("integrity check failed: " + "; ".join(problems[:3]))
        cache_id = _prepare_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn, cache_id


def _prepare_schema(conn: sqlite3.Connection) -> str:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if version == 0 and not tables:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            cache_id = secrets.token_hex(16)
            conn.execute("INSERT INTO meta (name, value) VALUES ('cache_id', ?)", (cache_id,))
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        elif version != _SCHEMA_VERSION:
            raise _UnusableDatabase(
                f"schema version {version}, this version of the solver reads {_SCHEMA_VERSION}"
            )
        elif not tables >= _TABLES:
            raise _UnusableDatabase(f"tables missing: {sorted(_TABLES - tables)}")
        else:
            row = conn.execute("SELECT value FROM meta WHERE name = 'cache_id'").fetchone()
            if row is None:
                raise _UnusableDatabase("the cache ID is missing")
            cache_id = str(row[0])
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return cache_id


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        raise SolveError(
            f"the cache database {path} is unusable and cannot be moved aside: {exc}"
        ) from exc
    # The WAL belongs to the file moved aside (keep it beside it, for whoever looks
    # into the old file); the shared-memory index is rebuilt from the WAL.
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        os.replace(wal, aside.with_name(aside.name + "-wal"))
    path.with_name(path.name + "-shm").unlink(missing_ok=True)
    return aside


# Reads made of a single SELECT, which need no explicit transaction.
_ONE_STATEMENT_READS: Final[frozenset[Callable[..., object]]] = frozenset(
    {_walk_links, _has_link, _walk_backlinks}
)
