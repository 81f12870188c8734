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


class _ContentRecord:
    """One queued :meth:`SQLiteOpHistory.record_content` call."""

    __slots__ = ("digest", "done", "error", "files", "input", "slot", "vertex")

    def __init__(
        self, vertex: str, input: int, slot: str, digest: str, files: Mapping[str, str]
    ) -> None:
        self.vertex = vertex
        self.input = input
        self.slot = slot
        self.digest = digest
        self.files = files
        self.done = anyio.Event()
        self.error: Exception | None = None


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
        # record_content calls waiting to be written, and whether one writes them
        self._queue: list[_ContentRecord] = []
        self._writing = False

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
        """Record the content key ``digest`` of ``slot`` and the files it covers.

        The content keys of a build's ``file`` steps are computed side by side
        and recorded at about the same time (59 in a one-change pycryptodome
        build), so the calls are written together: the first caller writes
        every one queued while it writes, each batch one transaction in one
        worker thread, and the others wait for theirs (``docs/performance.md``,
        "Issue 21: the one-change build"). The writing is shielded, so a
        cancelled caller never leaves the others waiting; a cancelled waiter
        leaves, and its record is written all the same."""
        entry = _ContentRecord(vertex, input, slot, digest, files)
        self._queue.append(entry)
        if not self._writing:
            self._writing = True
            try:
                with anyio.CancelScope(shield=True):
                    await self._write_queued()
            finally:
                self._writing = False
            # a caller's cancellation takes effect here, once the batch is written
            await anyio.lowlevel.checkpoint()
        else:
            await entry.done.wait()
        if entry.error is not None:
            raise entry.error

    async def _write_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            rows = [(e.slot, e.digest, e.files) for e in batch]
            try:
                befores = await self._call(_record_contents, rows, time.time(), self.max_ops)
            except Exception as exc:
                for e in batch:
                    e.error = exc
                    e.done.set()
                continue
            for e, before in zip(batch, befores, strict=True):
                if before is not None:
                    note_changed_files(
                        self._changed, e.vertex, e.input, files_that_differ(before[1], e.files)
                    )
                e.done.set()

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


def _record_contents(
    conn: sqlite3.Connection,
    rows: list[tuple[str, str, Mapping[str, str]]],
    now: float,
    max_ops: int,
) -> list[tuple[str, dict[str, str]] | None]:
    """:func:`_record_content` of each ``(slot, digest, files)``, in one
    transaction."""
    return [_record_content(conn, slot, digest, files, now, max_ops)
            for slot, digest, files in rows]


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
