"""The shared cache's store on PostgreSQL: action records, blobs and leases.

What is stored
--------------

An *action record* says "the op whose cache maps are M, fed inputs whose contents
are D1..Dn, produced outputs whose contents are B1..Bk" (Bazel's action cache). Its
key, the *action key*, is the digest of (op kind, M, D1..Dn); the outputs are
blobs (:mod:`solver.cache._blobs`), named by digest and stored once. The record
also names the definition vertex it was made for, so that a build can ask for the
records of every vertex of its graph at once (the round trips, below).

::

    solver_meta(name, value)                        schema version
    solver_blobs(digest, size, data, created_at)    blob bytes (bytea)
    solver_actions(action, vertex, kind,            one record per action key
                   created_at, last_used)
    solver_outputs(action, idx, blob)               its outputs, in order; blob is a
                                                    foreign key into solver_blobs

Crash safety. :meth:`PostgresCacheStore.publish` writes the missing blobs, then
the record and its output rows, in one transaction: a record and its blobs
appear together or not at all (a prune cannot take a blob between the two), and
the foreign key from ``solver_outputs.blob`` to ``solver_blobs`` makes a record
naming a missing blob impossible whatever writes it. A blob is read back through
:meth:`PostgresCacheStore.get_many`, which hashes it and refuses it when it does
not match.

Leases (cross-machine single-flight)
------------------------------------

:meth:`PostgresCacheStore.lease` takes a session-level advisory lock named by the
action key's first 64 bits, on a connection of its own held for the whole run of
the op. PostgreSQL drops a session's advisory locks the moment its connection ends,
so a holder killed with SIGKILL loses its lease at once (its server process reads
end-of-file on the socket); a holder on a machine that vanishes loses it when TCP
keepalives give up (set to about 30 s below). A waiter polls
``pg_try_advisory_lock`` (cancellable, no thread blocked in the server), then looks
the record up again before running anything. Why not a lease row with an expiry:
it must be renewed while the op runs and a dead holder blocks the key until the
expiry; the lock needs neither.

Round trips
-----------

:meth:`records_for` fetches the records of up to ``batch_size`` vertices in one
statement (and marks them used in the same statement); :meth:`get_many` fetches
blobs in batches bounded by count and bytes. :attr:`queries` counts statements
sent, for tests and ``docs/shared-cache.md``.

Threads. psycopg 3 is used synchronously in worker threads (``anyio.to_thread``),
which runs the same on asyncio and trio; the store's one main connection is used
by one thread at a time (a capacity limiter of one). Credentials come from the URL,
``PGPASSWORD`` or ``~/.pgpass`` (libpq's own rules); :func:`redact_url` is the only
form of the URL that appears in messages, and every error text is scrubbed of the
password before it leaves this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from ._blobs import BlobDigestError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "ActionRecord",
    "PostgresCacheStore",
    "SharedCacheError",
    "SharedPruneReport",
    "SharedUsage",
    "redact_url",
]

_log = logging.getLogger("solver")

T = TypeVar("T")

SCHEMA_VERSION: Final = 1
_SCHEMA_LOCK: Final = 0x736F6C766572  # "solver": serialises concurrent schema set-ups

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS solver_meta ("
    " name text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS solver_blobs ("
    " digest text PRIMARY KEY, size bigint NOT NULL, data bytea NOT NULL,"
    " created_at double precision NOT NULL)",
    "CREATE TABLE IF NOT EXISTS solver_actions ("
    " action text PRIMARY KEY, vertex text NOT NULL, kind text NOT NULL,"
    " created_at double precision NOT NULL, last_used double precision NOT NULL)",
    "CREATE INDEX IF NOT EXISTS solver_actions_vertex ON solver_actions (vertex)",
    "CREATE INDEX IF NOT EXISTS solver_actions_last_used ON solver_actions (last_used)",
    "CREATE TABLE IF NOT EXISTS solver_outputs ("
    " action text NOT NULL REFERENCES solver_actions ON DELETE CASCADE,"
    " idx integer NOT NULL, blob text NOT NULL REFERENCES solver_blobs,"
    " PRIMARY KEY (action, idx))",
    "CREATE INDEX IF NOT EXISTS solver_outputs_blob ON solver_outputs (blob)",
)

# A machine that vanishes (no FIN) loses its leases when keepalives give up.
_KEEPALIVES: Final[dict[str, Any]] = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "4",
}
CONNECT_TIMEOUT: Final = 5
LEASE_POLL: Final = 0.05
"""Seconds between two tries of a lease held elsewhere."""


class SharedCacheError(SolveError):
    """The shared cache's server cannot be reached or refused a statement. The text
    names the cache by :func:`redact_url` and never holds the password."""


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """One action: its key, the vertex it was made for, its op kind, and its
    outputs as ``(blob digest, size)`` in output order."""

    action: str
    vertex: str
    kind: str
    outputs: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SharedUsage:
    """What the shared store holds: ``records`` action records, ``blobs`` blobs of
    ``size`` bytes in all; ``oldest_use`` is the earliest ``last_used`` of a record
    (``None`` when there is none)."""

    records: int
    blobs: int
    size: int
    oldest_use: float | None


@dataclass(frozen=True, slots=True)
class SharedPruneReport:
    """What a prune of the shared store deleted and left."""

    records: int
    blobs: int
    freed: int
    remaining: int


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (a ``postgresql://`` URL or a
    ``key=value`` connection string); the only form of a URL that messages show."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme:
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if sep else netloc
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(k == "password" for k, _ in query):
            q = "&".join(
                f"{k}={'***' if k == 'password' else v}" for k, v in query
            )
        else:
            q = parts.query
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, q, parts.fragment))
    words = []
    for word in url.split():
        key, sep, _ = word.partition("=")
        words.append(f"{key}=***" if sep and key.strip() == "password" else word)
    return " ".join(words)


def _passwords(url: str) -> list[str]:
    """Every password the URL holds, raw and percent-decoded (to scrub from text)."""
    found: list[str] = []
    parts = urllib.parse.urlsplit(url)
    if parts.scheme:
        if parts.password:
            found.append(parts.password)
        for k, v in urllib.parse.parse_qsl(parts.query):
            if k == "password" and v:
                found.append(v)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
    else:
        for word in url.split():
            key, sep, value = word.partition("=")
            if sep and key.strip() == "password" and value:
                found.append(value)
    env = os.environ.get("PGPASSWORD")
    if env:
        found.append(env)
    found += [urllib.parse.unquote(p) for p in found]
    return sorted({p for p in found if p}, key=len, reverse=True)


def _lock_id(action: str) -> int:
    raw = bytes.fromhex(action.partition(":")[2][:16].ljust(16, "0"))
    return int.from_bytes(raw, "big", signed=True)


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class PostgresCacheStore:
    """Action records, blobs and leases in one PostgreSQL database.

    ``url`` is a libpq connection URL or string (credentials as libpq takes them:
    in the URL, ``PGPASSWORD``, ``~/.pgpass``). ``read_only`` stores nothing and
    touches nothing (no schema set-up: a read-only cache over an empty database
    finds nothing). ``batch_size`` is how many vertices one record query asks for;
    ``blob_batch_bytes`` and ``blob_batch_count`` bound one blob query.

    Every method raises :class:`SharedCacheError` when the server cannot be
    reached or refuses a statement. The store is also a
    :class:`~solver.cache._blobs.BlobStore`.
    """

    def __init__(
        self,
        url: str,
        *,
        read_only: bool = False,
        batch_size: int = 500,
        blob_batch_bytes: int = 32 << 20,
        blob_batch_count: int = 100,
    ) -> None:
        if batch_size < 1 or blob_batch_count < 1 or blob_batch_bytes < 1:
            raise ValueError("batch sizes must be positive")
        self._url = url
        self.display = redact_url(url)
        self._secrets = _passwords(url)
        self.read_only = read_only
        self.batch_size = batch_size
        self.blob_batch_bytes = blob_batch_bytes
        self.blob_batch_count = blob_batch_count
        self._conn: psycopg.Connection[Any] | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._lease_conn: psycopg.Connection[Any] | None = None
        self._lease_limiter = anyio.CapacityLimiter(1)
        self._mutex = threading.Lock()
        self._closed = False
        self.queries = 0
        """Statements sent to the server so far (lease polls included)."""

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._conn else "new")
        return f"<PostgresCacheStore {self.display} {state}>"

    # -- errors -------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` with every password the URL (or ``PGPASSWORD``) holds replaced."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: BaseException, doing: str) -> SharedCacheError:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return SharedCacheError(self.scrub(f"shared cache {self.display}: {doing}: {reason}"))

    # -- lifetime -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and set up the schema unless read-only (idempotent across
        machines: concurrent set-ups queue on an advisory lock)."""
        if self._closed:
            raise anyio.ClosedResourceError("the shared cache store is closed")
        conn = await self._thread(self._connect)
        self._conn = conn
        if not self.read_only:
            await self._call(_setup_schema, doing="setting up the schema")
        else:
            await self._call(_check_schema, doing="reading the schema")

    async def close(self) -> None:
        """Close the connection; idempotent, shielded."""
        with anyio.CancelScope(shield=True):
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                await anyio.to_thread.run_sync(_close_quietly, conn, limiter=self._limiter)
            else:
                await anyio.lowlevel.checkpoint()
            async with self._lease_limiter:
                lease_conn, self._lease_conn = self._lease_conn, None
            if lease_conn is not None:
                await anyio.to_thread.run_sync(_close_quietly, lease_conn)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            import psycopg
        except ImportError:
            raise SharedCacheError(
                f"shared cache {self.display}: the PostgreSQL driver is not installed "
                "(pip install 'solver-engine[shared]')"
            ) from None
        try:
            return psycopg.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **_KEEPALIVES
            )
        except psycopg.Error as exc:
            raise self._error(exc, "cannot connect") from None

    async def _thread(self, func: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(func, limiter=self._limiter)

    async def _call(self, func: Callable[..., T], *args: object, doing: str) -> T:
        """``func(conn, *args)`` in one transaction, in a worker thread."""
        if self._closed:
            raise anyio.ClosedResourceError("the shared cache store is closed")

        def run() -> T:
            import psycopg

            with self._mutex:
                conn = self._conn
                if conn is None:
                    raise SharedCacheError(f"shared cache {self.display}: not connected")
                counter = _Counter(conn)
                try:
                    with conn.transaction():
                        return func(counter, *args)
                except psycopg.Error as exc:
                    raise self._error(exc, doing) from None
                finally:
                    self.queries += counter.count

        return await self._thread(run)

    # -- records ----------------------------------------------------------------------------

    async def records_for(self, vertices: Sequence[str]) -> list[ActionRecord]:
        """Every record made for one of ``vertices`` (definition vertex digests), in
        ``ceil(len / batch_size)`` statements. Reading marks nothing used: a
        vertex collects a record per input change, and only the one a build
        restores is used (:meth:`mark_used`)."""
        found: list[ActionRecord] = []
        for chunk in _chunks(list(dict.fromkeys(vertices)), self.batch_size):
            found += await self._call(_records_for, list(chunk), doing="looking up records")
        return found

    async def mark_used(self, actions: Sequence[str]) -> None:
        """Mark the records of ``actions`` used now (what age-based pruning reads),
        in ``ceil(len / batch_size)`` statements; nothing when read-only."""
        if self.read_only:
            return
        now = time.time()
        for chunk in _chunks(list(dict.fromkeys(actions)), self.batch_size):
            await self._call(_mark_used, list(chunk), now, doing="marking records used")

    async def record(self, action: str) -> ActionRecord | None:
        """The record of ``action``, if any (one statement)."""
        return await self._call(_record, action, doing="looking up a record")

    async def add_record(self, record: ActionRecord) -> bool:
        """Store ``record`` (its blobs must be stored first: the foreign key refuses
        a record naming a missing blob). False when one was there already."""
        self._writable()
        return await self._call(_add_record, record, time.time(), doing="storing a record")

    async def publish(self, record: ActionRecord, files: Mapping[str, Path]) -> bool:
        """Store the blobs of ``record`` that are missing (``files`` maps each
        output digest to its file), then the record, in one transaction: a prune
        running at the same time cannot take a blob between the two. False when
        the record was there already. O(size of the missing blobs), held in
        memory while the transaction runs."""
        self._writable()
        datas: dict[str, bytes] = {}
        for digest, _size in record.outputs:
            if digest not in datas:
                data = await anyio.to_thread.run_sync(files[digest].read_bytes)
                actual = digest_of(data)
                if actual != digest:
                    raise BlobDigestError(digest, actual)
                datas[digest] = data
        return await self._call(_publish, record, datas, time.time(), doing="publishing")

    async def delete_record(self, action: str) -> None:
        """Forget ``action`` (a record whose blob was refused)."""
        self._writable()
        await self._call(_delete_record, action, doing="deleting a record")

    # -- blobs (the BlobStore protocol) -------------------------------------------------

    async def missing(self, digests: Sequence[str]) -> set[str]:
        """The digests of ``digests`` not stored (one statement per batch)."""
        out: set[str] = set()
        for chunk in _chunks(list(dict.fromkeys(digests)), self.batch_size):
            out |= await self._call(_missing, list(chunk), doing="looking up blobs")
        return out

    async def put(self, digest: str, path: Path) -> None:
        """Store the file at ``path`` as blob ``digest`` (whole, in one statement;
        nothing when it is stored). The file must hash to ``digest``."""
        self._writable()
        data = await anyio.to_thread.run_sync(path.read_bytes)
        actual = digest_of(data)
        if actual != digest:
            raise BlobDigestError(digest, actual)
        await self._call(_put_blob, digest, data, time.time(), doing="storing a blob")

    async def get_many(
        self, digests: Sequence[str], directory: Path
    ) -> tuple[dict[str, Path], list[BlobDigestError]]:
        """Write the stored blobs of ``digests`` into ``directory``, each checked
        against its digest (see :class:`~solver.cache._blobs.BlobStore`); one
        statement per :attr:`blob_batch_count` blobs."""
        written: dict[str, Path] = {}
        refused: list[BlobDigestError] = []
        for chunk in _chunks(list(dict.fromkeys(digests)), self.blob_batch_count):
            rows = await self._call(_get_blobs, list(chunk), doing="reading blobs")
            w, r = await anyio.to_thread.run_sync(_write_blobs, rows, directory)
            written.update(w)
            refused += r
        return written, refused

    # -- leases -------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self, action: str, on_wait: Callable[[], object] | None = None
    ) -> AsyncIterator[None]:
        """Hold the lease on ``action`` for the body: wait (polling every
        :data:`LEASE_POLL` seconds, cancellable) while another session holds it,
        calling ``on_wait()`` once when it starts waiting.

        Every lease of this store is a session advisory lock on one connection of
        its own (the main one stays free for lookups; one connection per lease
        would run a server out of connections on a wide graph), unlocked on exit;
        when the process dies, the connection and so every lease it held go."""
        key = _lock_id(action)
        # polled: the holder is another machine, no event can say it let go
        while not await self._lease_call(self._try_lock, key):
            if on_wait is not None:
                on_wait()
                on_wait = None
            await anyio.sleep(LEASE_POLL)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._lease_call(self._unlock, key)
                except SharedCacheError:
                    pass  # the connection is gone, and the lease with it

    async def _lease_call(self, func: Callable[[psycopg.Connection[Any], int], bool],
                          key: int) -> bool:
        if self._closed:
            raise anyio.ClosedResourceError("the shared cache store is closed")

        def run() -> bool:
            if self._lease_conn is None:
                self._lease_conn = self._connect()
            return func(self._lease_conn, key)

        return await anyio.to_thread.run_sync(run, limiter=self._lease_limiter)

    def _try_lock(self, conn: psycopg.Connection[Any], key: int) -> bool:
        import psycopg

        try:
            self.queries += 1
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        except psycopg.Error as exc:
            raise self._error(exc, "taking a lease") from None
        return bool(row and row[0])

    def _unlock(self, conn: psycopg.Connection[Any], key: int) -> bool:
        import psycopg

        try:
            self.queries += 1
            row = conn.execute("SELECT pg_advisory_unlock(%s)", (key,)).fetchone()
        except psycopg.Error as exc:
            raise self._error(exc, "releasing a lease") from None
        return bool(row and row[0])

    # -- usage and prune -----------------------------------------------------------------

    async def usage(self) -> SharedUsage:
        """How many records and blobs, and their bytes (one statement)."""
        return await self._call(_usage, doing="measuring usage")

    async def prune(
        self, *, keep_duration: float = 0.0, max_used_space: int = 0
    ) -> SharedPruneReport:
        """Delete records least recently used first, then every blob no record
        names. Without limits every record unused for ``keep_duration`` seconds
        goes; with ``max_used_space``, only as many of those as needed to bring the
        blobs' total down to it. One transaction."""
        self._writable()
        return await self._call(
            _prune, keep_duration, max_used_space, time.time(), doing="pruning"
        )

    async def collect(
        self, *, keep_duration: float = 0.0, max_used_space: int = 0, interval: float = 3600.0
    ) -> SharedPruneReport | None:
        """Garbage collection for a fleet: :meth:`prune` with these limits, unless
        another machine is collecting right now or one collected less than
        ``interval`` seconds ago (``None`` then). One transaction, which takes an
        advisory lock without waiting and keeps the last collection's time in
        ``solver_meta``, so many machines calling it after every build prune at
        most once per interval between them."""
        self._writable()
        return await self._call(
            _collect, keep_duration, max_used_space, interval, time.time(), doing="collecting"
        )

    def _writable(self) -> None:
        if self.read_only:
            raise SharedCacheError(f"shared cache {self.display} is read-only (mode=ro)")


# -- statements (run in a worker thread, inside a transaction) -----------------------------


class _Counter:
    """A connection that counts the statements it sends."""

    __slots__ = ("conn", "count")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.count = 0

    def execute(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> Any:
        self.count += 1
        return self.conn.execute(sql, params)


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.close()
    except Exception:
        _log.debug("closing a shared cache connection failed", exc_info=True)


def _setup_schema(c: _Counter) -> None:
    c.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
    for statement in _SCHEMA:
        c.execute(statement)
    c.execute(
        "INSERT INTO solver_meta (name, value) VALUES ('schema_version', %s) "
        "ON CONFLICT (name) DO NOTHING",
        (str(SCHEMA_VERSION),),
    )
    _check_schema(c)


def _check_schema(c: _Counter) -> None:
    row = c.execute(
        "SELECT to_regclass('solver_meta') IS NOT NULL"
    ).fetchone()
    if not row[0]:
        raise SharedCacheError("the database has no shared cache schema (open it once read-write)")
    row = c.execute("SELECT value FROM solver_meta WHERE name = 'schema_version'").fetchone()
    if row is None or row[0] != str(SCHEMA_VERSION):
        raise SharedCacheError(
            f"the shared cache schema is version {row[0] if row else 'unknown'}; "
            f"this version of the solver reads {SCHEMA_VERSION}"
        )


def _records(rows: Iterable[tuple[str, str, str, int, str, int]]) -> list[ActionRecord]:
    by_action: dict[str, tuple[str, str, list[tuple[str, int]]]] = {}
    for action, vertex, kind, _idx, blob, size in rows:
        by_action.setdefault(action, (vertex, kind, []))[2].append((blob, size))
    return [
        ActionRecord(action, vertex, kind, tuple(outputs))
        for action, (vertex, kind, outputs) in by_action.items()
    ]


_RECORD_COLUMNS: Final = (
    "SELECT a.action, a.vertex, a.kind, o.idx, o.blob, b.size FROM {source} a "
    "JOIN solver_outputs o ON o.action = a.action JOIN solver_blobs b ON b.digest = o.blob "
)


def _records_for(c: _Counter, vertices: list[str]) -> list[ActionRecord]:
    sql = _RECORD_COLUMNS.format(source="solver_actions") + (
        "WHERE a.vertex = ANY(%s) ORDER BY a.action, o.idx"
    )
    return _records(c.execute(sql, (vertices,)).fetchall())


def _mark_used(c: _Counter, actions: list[str], now: float) -> None:
    # SKIP LOCKED: builds marking the same records at once never wait on (or
    # deadlock with) each other; a record skipped is being marked by the other.
    c.execute(
        "UPDATE solver_actions SET last_used = %s WHERE action IN "
        "(SELECT action FROM solver_actions WHERE action = ANY(%s) FOR UPDATE SKIP LOCKED)",
        (now, actions),
    )


def _record(c: _Counter, action: str) -> ActionRecord | None:
    sql = _RECORD_COLUMNS.format(source="solver_actions") + "WHERE a.action = %s ORDER BY o.idx"
    found = _records(c.execute(sql, (action,)).fetchall())
    return found[0] if found else None


def _add_record(c: _Counter, record: ActionRecord, now: float) -> bool:
    row = c.execute(
        "INSERT INTO solver_actions (action, vertex, kind, created_at, last_used) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (action) DO NOTHING RETURNING 1",
        (record.action, record.vertex, record.kind, now, now),
    ).fetchone()
    if row is None:
        return False
    for idx, (blob, _size) in enumerate(record.outputs):
        c.execute(
            "INSERT INTO solver_outputs (action, idx, blob) VALUES (%s, %s, %s)",
            (record.action, idx, blob),
        )
    return True


def _publish(c: _Counter, record: ActionRecord, datas: dict[str, bytes], now: float) -> bool:
    for digest in _missing(c, list(datas)):
        _put_blob(c, digest, datas[digest], now)
    return _add_record(c, record, now)


def _delete_record(c: _Counter, action: str) -> None:
    c.execute("DELETE FROM solver_actions WHERE action = %s", (action,))


def _missing(c: _Counter, digests: list[str]) -> set[str]:
    rows = c.execute(
        "SELECT d FROM unnest(%s::text[]) AS d "
        "WHERE NOT EXISTS (SELECT 1 FROM solver_blobs b WHERE b.digest = d)",
        (digests,),
    ).fetchall()
    return {row[0] for row in rows}


def _put_blob(c: _Counter, digest: str, data: bytes, now: float) -> None:
    c.execute(
        "INSERT INTO solver_blobs (digest, size, data, created_at) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (digest) DO NOTHING",
        (digest, len(data), data, now),
    )


def _get_blobs(c: _Counter, digests: list[str]) -> list[tuple[str, bytes]]:
    rows = c.execute(
        "SELECT digest, data FROM solver_blobs WHERE digest = ANY(%s)", (digests,)
    ).fetchall()
    return [(digest, bytes(data)) for digest, data in rows]


def _write_blobs(
    rows: list[tuple[str, bytes]], directory: Path
) -> tuple[dict[str, Path], list[BlobDigestError]]:
    written: dict[str, Path] = {}
    refused: list[BlobDigestError] = []
    for digest, data in rows:
        actual = digest_of(data)
        if actual != digest:
            refused.append(BlobDigestError(digest, actual))
            continue
        path = directory / digest.partition(":")[2]
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written[digest] = path
    return written, refused


def _usage(c: _Counter) -> SharedUsage:
    records, oldest = c.execute("SELECT count(*), min(last_used) FROM solver_actions").fetchone()
    blobs, size = c.execute("SELECT count(*), coalesce(sum(size), 0) FROM solver_blobs").fetchone()
    return SharedUsage(int(records), int(blobs), int(size), oldest)


GC_LOCK: Final = _SCHEMA_LOCK + 1
"""The advisory lock a garbage collection of the shared store holds."""


def _collect(
    c: _Counter, keep_duration: float, max_used_space: int, interval: float, now: float
) -> SharedPruneReport | None:
    if not c.execute("SELECT pg_try_advisory_xact_lock(%s)", (GC_LOCK,)).fetchone()[0]:
        return None
    row = c.execute("SELECT value FROM solver_meta WHERE name = 'last_gc'").fetchone()
    if row is not None and now - float(row[0]) < interval:
        return None
    report = _prune(c, keep_duration, max_used_space, now)
    c.execute(
        "INSERT INTO solver_meta (name, value) VALUES ('last_gc', %s) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (repr(now),),
    )
    return report


def _prune(c: _Counter, keep_duration: float, max_used_space: int, now: float) -> SharedPruneReport:
    before = _usage(c)
    cutoff = now - keep_duration
    records = 0
    if max_used_space <= 0:
        records = len(
            c.execute(
                "DELETE FROM solver_actions WHERE last_used <= %s RETURNING 1", (cutoff,)
            ).fetchall()
        )
    else:
        # least recently used first, until the blobs left fit (a blob goes with the
        # last record that names it)
        size = before.size
        candidates = c.execute(
            "SELECT action FROM solver_actions WHERE last_used <= %s ORDER BY last_used",
            (cutoff,),
        ).fetchall()
        for (action,) in candidates:
            if size <= max_used_space:
                break
            freed = c.execute(
                "SELECT coalesce(sum(b.size), 0) FROM solver_outputs o "
                "JOIN solver_blobs b ON b.digest = o.blob WHERE o.action = %s "
                "AND NOT EXISTS (SELECT 1 FROM solver_outputs o2 "
                "WHERE o2.blob = o.blob AND o2.action <> o.action)",
                (action,),
            ).fetchone()[0]
            c.execute("DELETE FROM solver_actions WHERE action = %s", (action,))
            records += 1
            size -= int(freed)
    gone = c.execute(
        "DELETE FROM solver_blobs b WHERE NOT EXISTS "
        "(SELECT 1 FROM solver_outputs o WHERE o.blob = b.digest) RETURNING size"
    ).fetchall()
    freed = sum(int(row[0]) for row in gone)
    return SharedPruneReport(records, len(gone), freed, before.size - freed)
