"""Which blob each snapshot came from or went into, kept beside the snapshot store.

The shared cache names an input by the digest of its snapshot blob. A snapshot
made here from a blob, or packed into one, has that digest already; one loaded
from the local cache in a later process would have to be packed again to
measure it, and packing a restored snapshot does not always give back its blob's
bytes (tar extraction cannot set a symlink's modification time, so the tar of a
tree with symlinks differs), which would give its consumers action keys that no
other machine uses. So the digest each snapshot got is kept in
``<store root>/shared-digests.db`` (SQLite; the store's lock on its root makes
this process its only user) and outlives the process.

Writes are buffered and written in one transaction at :meth:`flush` (every
:data:`FLUSH_EVERY` new entries, and at close): a process that dies loses only
the latest entries, which costs a re-measure, never a wrong digest. Rows of
snapshots that were deleted are dropped at close.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

__all__ = ["FLUSH_EVERY", "SnapshotDigests"]

FILE_NAME: Final = "shared-digests.db"
FLUSH_EVERY: Final = 256


class SnapshotDigests:
    """Snapshot id -> blob digest, in memory and in ``<root>/shared-digests.db``."""

    __slots__ = ("_conn", "_known", "_lock", "_unsaved")

    def __init__(self, conn: sqlite3.Connection, known: dict[str, str]) -> None:
        """Use :meth:`open`."""
        self._conn: sqlite3.Connection | None = conn
        self._known = known
        self._unsaved: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, root: Path) -> SnapshotDigests:
        """Open (or create) the file in ``root`` and read it. O(entries)."""
        conn, known = await anyio.to_thread.run_sync(_open, root / FILE_NAME)
        return cls(conn, known)

    def get(self, snapshot_id: str) -> str | None:
        """The digest of ``snapshot_id``, if known. O(1)."""
        return self._known.get(snapshot_id)

    def put(self, snapshot_id: str, digest: str) -> bool:
        """Remember a digest; True when :meth:`flush` is due. O(1)."""
        if self._known.get(snapshot_id) != digest:
            self._known[snapshot_id] = digest
            self._unsaved[snapshot_id] = digest
        return len(self._unsaved) >= FLUSH_EVERY

    async def flush(self, live: Iterable[str] | None = None) -> None:
        """Write what is unsaved (one transaction); with ``live``, the ids of the
        snapshots that exist, also drop every other row."""
        unsaved, self._unsaved = self._unsaved, {}
        keep = None if live is None else set(live)
        if keep is not None:
            self._known = {k: v for k, v in self._known.items() if k in keep}
        if unsaved or keep is not None:
            await anyio.to_thread.run_sync(self._write, unsaved, keep)

    async def close(self) -> None:
        """Close the file (after a last :meth:`flush` by the caller). Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            await anyio.to_thread.run_sync(conn.close)

    def _write(self, unsaved: dict[str, str], keep: set[str] | None) -> None:
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            with conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO digests (snapshot, digest) VALUES (?, ?)",
                    unsaved.items(),
                )
                if keep is not None:
                    gone = [
                        (row[0],)
                        for row in conn.execute("SELECT snapshot FROM digests")
                        if row[0] not in keep
                    ]
                    conn.executemany("DELETE FROM digests WHERE snapshot = ?", gone)


_DDL = "CREATE TABLE IF NOT EXISTS digests (snapshot TEXT PRIMARY KEY, digest TEXT NOT NULL)"


def _open(path: Path) -> tuple[sqlite3.Connection, dict[str, str]]:
    conn = sqlite3.connect(path, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(_DDL)
        known = dict(conn.execute("SELECT snapshot, digest FROM digests").fetchall())
    except sqlite3.DatabaseError:
        # a damaged file only costs re-measuring: start it again, without the
        # old write-ahead log (replayed onto a new file of the same name)
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute(_DDL)
        known = {}
    return conn, known
