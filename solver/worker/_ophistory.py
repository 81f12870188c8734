"""The worker's persistent op history: ``ophistory.db`` in the store's root.

The :class:`~solver.definition.OpHistory` of a solver that uses the built-in
worker (see :mod:`solver.definition._history` for what it is for), kept in its
own SQLite file beside ``cache.db`` so that a cache miss in one process is
explained from the builds of earlier ones. One table::

    ops(digest PRIMARY KEY, op, name, place, inputs, seen_at)

``op`` is the op's canonical encoding (:meth:`OpDef.canonical_bytes`, as text),
``inputs`` its inputs as :func:`~solver.definition.inputs_key` gives them
(indexed, as is ``place``). A second table keeps the last content key of each
slot (:meth:`~solver.definition.OpHistory.record_content`), bounded the same way::

    contents(slot PRIMARY KEY, digest, files, seen_at)      files: JSON {path: digest}
 Each :meth:`SQLiteOpHistory.record` is one
transaction that upserts the rows and then deletes the least recently seen rows
beyond ``max_ops``; each call runs in a worker thread, one at a time (a capacity
limiter of one), and always checkpoints. The store's lock on its root covers this
file too, so one process writes it at a time.

A file that cannot be read as this table (corrupt, another schema) is deleted and
made again, with a WARNING on the ``solver`` logger: the history is a help for
explaining misses, never worth a failed build.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ..definition import (
    DEFAULT_MAX_OPS,
    OpDef,
    OpDefinitionRecord,
    OutputRef,
    files_that_differ,
    inputs_key,
    note_changed_files,
)

__all__ = ["OP_HISTORY_DB_NAME", "SQLiteOpHistory"]

_log = logging.getLogger("solver")

T = TypeVar("T")

OP_HISTORY_DB_NAME: Final = "ophistory.db"
"""The name of the op history database in a snapshot store's root."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ops (
    digest TEXT PRIMARY KEY NOT NULL,
    op TEXT NOT NULL,
    name TEXT NOT NULL,
    place TEXT NOT NULL,
    inputs TEXT NOT NULL,
    seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ops_by_inputs ON ops (inputs, seen_at);
CREATE INDEX IF NOT EXISTS ops_by_place ON ops (place, seen_at);
CREATE INDEX IF NOT EXISTS ops_by_seen ON ops (seen_at);
CREATE TABLE IF NOT EXISTS contents (
    slot TEXT PRIMARY KEY NOT NULL,
    digest TEXT NOT NULL,
    files TEXT NOT NULL,
    seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS contents_by_seen ON contents (seen_at);
"""

_COLUMNS: Final = "digest, op, name, place, seen_at"


class SQLiteOpHistory:
    """An :class:`~solver.definition.OpHistory` in a SQLite file, bounded to
    ``max_ops`` ops. Open it with ``await SQLiteOpHistory.open(path)``; close it
    with :meth:`close` (idempotent)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, max_ops: int) -> None:
        self.path = path
        self.max_ops = max_ops
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._changed: OrderedDict[tuple[str, int], tuple[str, ...]] = OrderedDict()

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], max_ops: int = DEFAULT_MAX_OPS
    ) -> SQLiteOpHistory:
        """Open (or make) the history at ``path``; an unreadable file is replaced."""
        if max_ops < 1:
            raise ValueError(f"an op history keeps at least 1 op, not {max_ops}")
        where = Path(path)
        conn = await anyio.to_thread.run_sync(_connect, where)
        return cls(where, conn, max_ops)

    def __repr__(self) -> str:
        return f"<SQLiteOpHistory {self.path}>"

    async def record(self, records: Iterable[OpDefinitionRecord]) -> None:
        rows = [
            (r.digest, r.op.canonical_bytes().decode("utf-8"), r.name, r.place,
             inputs_key(r.op.inputs), r.seen_at)
            for r in records
        ]
        await self._call(_record, rows, self.max_ops)

    async def get(self, digest: str) -> OpDefinitionRecord | None:
        return await self._call(_get, digest)

    async def previous(self, op: OpDef, place: str) -> OpDefinitionRecord | None:
        return await self._call(_previous, op.digest, inputs_key(op.inputs), place)

    async def record_content(
        self, vertex: str, input: int, slot: str, digest: str, files: Mapping[str, str]
    ) -> None:
        before = await self._call(
            _record_content, slot, digest, files, time.time(), self.max_ops
        )
        if before is not None:
            note_changed_files(self._changed, vertex, input, files_that_differ(before[1], files))

    def changed_files(self, vertex: str, input: int) -> tuple[str, ...] | None:
        return self._changed.get((vertex, input))

    async def close(self) -> None:
        """Close the database; idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        await anyio.lowlevel.checkpoint()

    async def _call(self, func: Callable[..., T], *args: object) -> T:
        return await anyio.to_thread.run_sync(self._run, func, args, limiter=self._limiter)

    def _run(self, func: Callable[..., T], args: tuple[object, ...]) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError(f"the op history {self.path} is closed")
            with conn:  # one transaction: committed, or rolled back on an error
                return func(conn, *args)


# Errors that say the file is in use or out of reach, not that it is bad: never
# a reason to delete it.
_NOT_THE_FILE: Final = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
})


def _connect(path: Path) -> sqlite3.Connection:
    try:
        return _prepare(path)
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _NOT_THE_FILE:  # primary code
            raise
        _log.warning("the op history %s is unreadable (%s); starting a new one", path, exc)
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        return _prepare(path)


def _prepare(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        conn.execute(f"SELECT {_COLUMNS}, inputs FROM ops LIMIT 1").fetchall()
        conn.isolation_level = "DEFERRED"
    except BaseException:
        conn.close()
        raise
    return conn


def _record(conn: sqlite3.Connection, rows: list[tuple[object, ...]], max_ops: int) -> None:
    conn.executemany(
        "INSERT INTO ops (digest, op, name, place, inputs, seen_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (digest) DO UPDATE SET name = excluded.name, place = excluded.place, "
        "seen_at = excluded.seen_at",
        rows,
    )
    conn.execute(
        "DELETE FROM ops WHERE digest IN "
        "(SELECT digest FROM ops ORDER BY seen_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
        (max_ops,),
    )


def _record_content(
    conn: sqlite3.Connection,
    slot: str,
    digest: str,
    files: Mapping[str, str],
    now: float,
    max_ops: int,
) -> tuple[str, dict[str, str]] | None:
    """Store the content key of ``slot``; return the one it replaces (its digest
    and files) when that one differs. The same key again only refreshes its
    time: a warm build of a large ``source.local`` tree writes no file list."""
    row = conn.execute("SELECT digest, files FROM contents WHERE slot = ?", (slot,)).fetchone()
    if row is not None and row[0] == digest:
        conn.execute("UPDATE contents SET seen_at = ? WHERE slot = ?", (now, slot))
        return None
    conn.execute(
        "INSERT INTO contents (slot, digest, files, seen_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (slot) DO UPDATE SET digest = excluded.digest, files = excluded.files, "
        "seen_at = excluded.seen_at",
        (slot, digest, json.dumps(dict(files), sort_keys=True), now),
    )
    conn.execute(
        "DELETE FROM contents WHERE slot IN "
        "(SELECT slot FROM contents ORDER BY seen_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
        (max_ops,),
    )
    if row is None:
        return None
    before = json.loads(row[1])
    return row[0], before if isinstance(before, dict) else {}


def _get(conn: sqlite3.Connection, digest: str) -> OpDefinitionRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM ops WHERE digest = ?", (digest,)).fetchone()
    return None if row is None else _from_row(row)


def _previous(
    conn: sqlite3.Connection, digest: str, inputs: str, place: str
) -> OpDefinitionRecord | None:
    if inputs:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM ops WHERE inputs = ? AND digest != ? "
            "ORDER BY seen_at DESC, rowid DESC LIMIT 1",
            (inputs, digest),
        ).fetchone()
        found = None if row is None else _from_row(row)
        if found is not None:
            return found
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM ops WHERE place = ? AND digest != ? "
        "ORDER BY seen_at DESC, rowid DESC LIMIT 1",
        (place, digest),
    ).fetchone()
    return None if row is None else _from_row(row)


def _from_row(row: tuple[str, str, str, str, float]) -> OpDefinitionRecord | None:
    digest, text, name, place, seen_at = row
    body = json.loads(text)
    op = OpDef(
        body["kind"], body["payload"], tuple(OutputRef(d, i) for d, i in body["inputs"])
    )
    if op.digest != digest:  # not written by this code: no earlier version to show
        _log.warning("the op history row %s holds op %s; ignored", digest, op.digest)
        return None
    return OpDefinitionRecord(op, name, place, seen_at)
