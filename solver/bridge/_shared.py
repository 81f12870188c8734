"""``SharedCache``: a cache shared by many machines, behind a worker's local cache.

How it fits without changing the engine: the local cache (the worker's SQLite
records, :mod:`solver.worker._cacheresults`) stays the solver's cache, so a lookup
asks it first and a local hit never reaches the shared cache. What the local cache
misses, the engine runs: it calls the op's ``exec``. :meth:`SharedCache.attach`
replaces each built-in kind of the worker's registry by the same kind whose op
wraps ``exec`` (Bazel's remote action cache):

1. the *action key* is the digest of the op kind, the op's cache maps and the
   content digest of each input (the digest of its snapshot blob);
2. if the shared store has a record under that key, its output blobs are
   fetched, checked against their digests and unpacked into new snapshots, which
   ``exec`` returns (nothing runs); the engine then saves them in the local cache
   as it saves anything ``exec`` returns, so the next build is a local hit;
3. otherwise the op takes the key's lease (an advisory lock, see
   :mod:`solver.cache._postgres`), looks again (another machine may have finished
   it while this one waited), runs the op, packs each output into a blob, stores
   the blobs and then the record, and lets the lease go.

So a result built here is written to both stores, a result built elsewhere is
fetched once, and two machines asking for the same action at once run it once.

Round trips. Every wrapped op's factory notes its vertex digest; the first lookup
fetches the records of every vertex noted so far in batches
(:attr:`PostgresCacheStore.batch_size` vertices a statement), and a blob fetch
takes along the blobs of other records fetched so far, up to the store's blob
batch bounds. The engine asks every op's cache map before it runs one, so a
warm build of N vertices makes about ``N / batch_size`` record statements and
``N / blob_batch_count`` blob statements (``docs/shared-cache.md`` has the
measured counts).

Faults. The shared cache is an accelerator: when its server cannot be reached
(at open or at any later call) one WARNING on the ``solver`` logger says so and
every op runs locally from then on (``strict=True`` raises the error instead).
A blob whose bytes do not match its digest is refused with a WARNING, its record
is deleted, and the op runs here. Nothing local is ever touched by a shared-cache
fault.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap, Op
from .._progress import log_output, report_cache_source
from .._result import Result
from ..cache import (
    ActionRecord,
    BlobDigestError,
    PostgresCacheStore,
    SharedCacheError,
    SharedPruneReport,
)
from ..definition import OpContext, OpKind, OpKindRegistry
from ..worker import SnapshotBlobCodec, SnapshotStore, SnapshotView, Worker
from ._shareddigests import SnapshotDigests

__all__ = [
    "SHARED_KINDS",
    "SharedCache",
    "SharedCacheStats",
    "SharedGCPolicy",
    "parse_shared_cache_url",
]

_log = logging.getLogger("solver")

SHARED_KINDS: Final = ("source.inline", "source.local", "file", "merge", "exec")
"""The built-in kinds whose results :meth:`SharedCache.attach` shares."""

_ACTION_VERSION: Final = "solver-engine/action/v1"

RESTORED_LINE: Final = b"restored from the shared cache\n"
"""What a step restored from the shared cache logs in its progress."""

SHARED_SOURCE: Final = "shared"
"""The ``cache_source`` of a step the shared cache restored (its ``completed``
event says so, and a build's summary counts it as cached from there)."""

SharedCacheMode = Literal["rw", "ro"]


@dataclass(frozen=True, slots=True)
class SharedCacheStats:
    """What a :class:`SharedCache` did: ops ``restored`` from it, ops ``executed``
    here while it was in use (or down), records ``published``, blobs ``refused``
    (digest mismatch), ``lease_waits`` (ops that found their lease held), and
    ``queries`` (statements sent to the server)."""

    restored: int
    executed: int
    published: int
    refused: int
    lease_waits: int
    queries: int


def parse_shared_cache_url(spec: str) -> tuple[str, SharedCacheMode, bool]:
    """Split ``URL[?...&mode=ro&strict=true]`` into the libpq URL (``mode`` and
    ``strict`` removed) and the two options. ``ValueError`` for bad values."""
    parts = urllib.parse.urlsplit(spec)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("a shared cache URL starts with postgresql:// (e.g. postgresql://host/db)")
    mode: SharedCacheMode = "rw"
    strict = False
    kept: list[tuple[str, str]] = []
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "mode":
            if value not in ("rw", "ro"):
                raise ValueError(f"mode={value}: the shared cache mode is rw or ro")
            mode = "ro" if value == "ro" else "rw"
        elif key == "strict":
            if value not in ("true", "false"):
                raise ValueError(f"strict={value}: strict is true or false")
            strict = value == "true"
        else:
            kept.append((key, value))
    query = urllib.parse.urlencode(kept, safe="/:")
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    return url, mode, strict


@dataclass(frozen=True, slots=True)
class SharedGCPolicy:
    """Automatic garbage collection of the shared store, run by
    :meth:`SharedCache.close` (read-write mode) at most once per ``interval``
    seconds across every machine: records unused for ``keep_duration`` seconds
    go, least recently used first, and with ``max_used_space`` only until the
    blobs left fit (:meth:`~solver.cache.PostgresCacheStore.prune`)."""

    keep_duration: float = 0.0
    max_used_space: int = 0
    interval: float = 3600.0

    def __post_init__(self) -> None:
        if self.keep_duration < 0 or self.max_used_space < 0 or self.interval < 0:
            raise ValueError("a shared GC policy's durations and sizes are not negative")
        if not self.keep_duration and not self.max_used_space:
            raise ValueError(
                "a shared GC policy needs keep_duration or max_used_space "
                "(without either it would delete everything)"
            )


class SharedCache:
    """A shared cache on PostgreSQL for a :class:`~solver.worker.Worker`.

    ::

        async with Worker(root) as worker, SharedCache(url) as shared:
            shared.attach(worker)
            async with Solver(worker=worker) as solver:
                ...

    ``url`` is a ``postgresql://`` URL (libpq's; credentials in it, in
    ``PGPASSWORD`` or ``~/.pgpass``). ``mode="ro"`` only reads (for untrusted
    builds: nothing they make reaches other machines). ``strict=True`` turns a
    server fault into a failed build instead of a warning. The other arguments
    are :class:`~solver.cache.PostgresCacheStore`'s batch bounds.
    """

    def __init__(
        self,
        url: str,
        *,
        mode: SharedCacheMode = "rw",
        strict: bool = False,
        batch_size: int = 500,
        blob_batch_bytes: int = 32 << 20,
        blob_batch_count: int = 100,
        gc_policy: SharedGCPolicy | None = None,
    ) -> None:
        if mode not in ("rw", "ro"):
            raise ValueError(f"mode {mode!r}: the shared cache mode is 'rw' or 'ro'")
        self.store = PostgresCacheStore(
            url,
            read_only=mode == "ro",
            batch_size=batch_size,
            blob_batch_bytes=blob_batch_bytes,
            blob_batch_count=blob_batch_count,
        )
        self.mode: SharedCacheMode = mode
        self.strict = strict
        self.gc_policy = gc_policy
        self.last_collection: SharedPruneReport | None = None
        """What the automatic collection at :meth:`close` deleted, if it ran."""
        self._down = False
        self._open = False
        self._codec: SnapshotBlobCodec | None = None
        self._registry: OpKindRegistry | None = None
        self._originals: list[OpKind] = []
        self._spool: Path | None = None
        self._prefetch_lock: anyio.Lock | None = None
        self._fetch_lock: anyio.Lock | None = None
        self._using: dict[str, int] = {}
        # actions restored since open: marked used in batches at close
        self._used: list[str] = []
        # vertex digests whose records were not asked for yet / were
        self._pending: dict[str, None] = {}
        self._looked_up: set[str] = set()
        self._records: dict[str, ActionRecord] = {}
        # blobs fetched ahead (digest -> file), blobs refused, blobs to fetch ahead
        self._fetched: dict[str, Path] = {}
        self._refused: set[str] = set()
        self._ahead: dict[str, int] = {}
        # snapshot id -> the digest of its blob (known when made from or into one),
        # kept beside the attached worker's store
        self._store: SnapshotStore | None = None
        self._index: SnapshotDigests | None = None
        self._index_lock: anyio.Lock | None = None
        self._restored = self._executed = self._published = 0
        self._refused_count = self._lease_waits = 0

    def __repr__(self) -> str:
        state = "down" if self._down else ("open" if self._open else "closed")
        return f"<SharedCache {self.store.display} mode={self.mode} {state}>"

    @property
    def display(self) -> str:
        """The URL with its password replaced by ``***``."""
        return self.store.display

    @property
    def available(self) -> bool:
        """True while open, attached to a worker and the server reachable; False
        once the server could not be reached (everything runs locally from then
        on), and after :meth:`detach` (an op made before it runs locally)."""
        return self._open and not self._down and self._store is not None

    def stats(self) -> SharedCacheStats:
        """What the cache did so far (a frozen value)."""
        return SharedCacheStats(
            self._restored,
            self._executed,
            self._published,
            self._refused_count,
            self._lease_waits,
            self.store.queries,
        )

    # -- lifetime ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect. A server that cannot be reached is one WARNING and a cache that
        runs everything locally (``strict``: :class:`SharedCacheError`)."""
        self._prefetch_lock = anyio.Lock()
        self._fetch_lock = anyio.Lock()
        self._index_lock = anyio.Lock()
        self._open = True
        try:
            await self.store.open()
        except SharedCacheError as exc:
            try:
                self._fail(exc)
            except BaseException:
                await self.close()
                raise
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Put the worker's kinds back (deleting the blobs fetched and packed) and
        close the connection. Idempotent, shielded."""
        with anyio.CancelScope(shield=True):
            await self.detach()
            await self._mark_used()
            await self._collect()
            self._open = False
            await self.store.close()

    async def _mark_used(self) -> None:
        """Mark the records this cache restored used (what age-based pruning
        reads): only those, not every record of their vertices."""
        used, self._used = self._used, []
        if not used or self._down or not self._open:
            return
        try:
            await self.store.mark_used(used)
        except SharedCacheError as exc:  # never fails a build that is over
            _log.warning("%s (marking restored records used)", exc)

    async def _collect(self) -> None:
        policy = self.gc_policy
        if policy is None or self.mode == "ro" or self._down or not self._open:
            return
        try:
            report = await self.store.collect(
                keep_duration=policy.keep_duration,
                max_used_space=policy.max_used_space,
                interval=policy.interval,
            )
        except SharedCacheError as exc:  # never fails a build that is over
            _log.warning("%s (automatic garbage collection)", exc)
            return
        self.last_collection = report
        if report is not None and report.records:
            _log.info(
                "shared cache %s: garbage collection deleted %d record(s) and %d blob(s), "
                "%d bytes",
                self.display, report.records, report.blobs, report.freed,
            )

    async def __aenter__(self) -> SharedCache:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- wiring ---------------------------------------------------------------------

    def attach(self, worker: Worker) -> None:
        """Share the results of ``worker``'s built-in kinds (:data:`SHARED_KINDS`):
        each is replaced in ``worker.op_kinds`` by the same kind with its ``exec``
        wrapped (see the module docstring). :meth:`close` puts them back."""
        if not self._open:
            raise SolveError("open the SharedCache before attaching it to a worker")
        if self._registry is not None:
            raise SolveError("this SharedCache is already attached to a worker")
        self._codec = SnapshotBlobCodec(worker.store)
        self._store = worker.store
        # Blobs fetched and packed go in the store's own scratch area, which the
        # store empties when it opens: nothing is left outside the store, even
        # after a kill.
        self._spool = Path(tempfile.mkdtemp(prefix="shared-", dir=worker.store.root / "tmp"))
        self._registry = worker.op_kinds
        for name in SHARED_KINDS:
            kind = worker.op_kinds.get(name)
            if kind is None:
                continue
            self._originals.append(kind)
            wrapped = OpKind(name, self._factory(kind), kind.outputs, kind.validate)
            worker.op_kinds.add(wrapped, replace=True)

    async def detach(self) -> None:
        """Put the original kinds back and save the snapshot digests learnt
        (nothing when not attached). Shielded."""
        registry, self._registry = self._registry, None
        if registry is not None:
            for kind in self._originals:
                registry.add(kind, replace=True)
        self._originals = []
        index, self._index = self._index, None
        store, self._store = self._store, None
        spool, self._spool = self._spool, None
        self._fetched.clear()  # files in the spool, which goes
        with anyio.CancelScope(shield=True):
            if spool is not None:
                await anyio.to_thread.run_sync(shutil.rmtree, spool, True)
            if index is not None:
                try:
                    live = None
                    if store is not None and store.is_open:
                        live = [info.id for info in await store.usage()]
                    await index.flush(live)
                except Exception:
                    _log.exception("saving the shared cache's snapshot digests failed")
                finally:
                    await index.close()
            else:
                await anyio.lowlevel.checkpoint()

    async def _digests(self) -> SnapshotDigests:
        assert self._index_lock is not None
        async with self._index_lock:
            if self._index is None:
                assert self._store is not None
                self._index = await SnapshotDigests.open(self._store.root)
            return self._index

    async def _remember(self, snapshot_id: str, digest: str) -> None:
        index = await self._digests()
        if index.put(snapshot_id, digest):
            with anyio.CancelScope(shield=True):
                await index.flush()

    def _factory(self, kind: OpKind) -> Callable[[OpContext], Op]:
        inner_factory = kind.factory

        def make(ctx: OpContext) -> Op:
            inner = inner_factory(ctx)
            if ctx.vertex.options.ignore_cache:
                return inner
            digest = ctx.vertex.digest
            if digest not in self._looked_up:
                self._pending[digest] = None
            return _SharedOp(self, inner, ctx.kind, digest)

        return make

    # -- faults -------------------------------------------------------------------------

    def _fail(self, exc: SharedCacheError) -> None:
        if self.strict:
            raise exc
        if not self._down:
            self._down = True
            _log.warning("%s; building on with the local cache only", exc)

    # -- the action path ------------------------------------------------------------------

    async def content_digest(self, result: Result) -> str | None:
        """The blob digest of a snapshot result (packed once to measure it when it
        was not made from or into a blob here); ``None`` for other results."""
        view = result.sys
        if not isinstance(view, SnapshotView):
            return None
        known = (await self._digests()).get(view.id)
        if known is not None:
            return known
        assert self._codec is not None
        assert self._spool is not None
        path = self._spool / f"measure-{secrets.token_hex(8)}"
        try:
            digest = await self._codec.pack(result, path)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_unlink, path)
        if digest is not None:
            await self._remember(view.id, digest)
        return digest

    async def find(self, action: str, vertex: str) -> ActionRecord | None:
        """The record of ``action`` from what was fetched, fetching the records of
        every pending vertex first when ``vertex``'s were not fetched yet."""
        if action in self._records or self._down:
            return self._records.get(action)
        assert self._prefetch_lock is not None
        async with self._prefetch_lock:
            if vertex not in self._looked_up:
                self._pending[vertex] = None
                batch = [*self._pending]
                self._pending.clear()
                self._looked_up.update(batch)
                try:
                    records = await self.store.records_for(batch)
                except SharedCacheError as exc:
                    self._fail(exc)
                    return None
                for record in records:
                    self._records[record.action] = record
                    for digest, size in record.outputs:
                        if digest not in self._fetched:
                            self._ahead[digest] = size
        return self._records.get(action)

    async def lookup(self, action: str) -> ActionRecord | None:
        """The record of ``action`` from the server now (after a lease)."""
        if self._down:
            return None
        try:
            record = await self.store.record(action)
        except SharedCacheError as exc:
            self._fail(exc)
            return None
        if record is not None:
            self._records[action] = record
        return record

    async def restore(self, record: ActionRecord) -> list[Result] | None:
        """New snapshots (the caller's handles) made from the record's blobs;
        ``None`` when a blob is refused or cannot be had (the record is then
        deleted when it was refused)."""
        assert self._codec is not None
        assert self._fetch_lock is not None
        wanted = [d for d, _ in record.outputs]
        async with self._fetch_lock:  # one blob batch in flight; the next may be served by it
            paths = await self._blobs(record)
            if paths is None:
                return None
            for digest in wanted:  # a file in use by a restore is not deleted under it
                self._using[digest] = self._using.get(digest, 0) + 1
        outs: list[Result] = []
        try:
            for digest in wanted:
                ref = await self._codec.unpack(paths[digest])
                outs.append(ref)
                await self._remember(ref.sys.id, digest)
            self._used.append(record.action)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for out in outs:
                    await out.release()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                for digest in wanted:
                    self._using[digest] -= 1
                    if self._using[digest]:
                        continue
                    del self._using[digest]
                    path = self._fetched.pop(digest, None)
                    if path is not None:
                        await anyio.to_thread.run_sync(_unlink, path)
        self._restored += 1
        return outs

    async def _blobs(self, record: ActionRecord) -> dict[str, Path] | None:
        wanted = [d for d, _ in record.outputs]
        need = [d for d in wanted if d not in self._fetched and d not in self._refused]
        if need and not self._down:
            # take along the blobs of other records fetched so far, within bounds
            extra: list[str] = []
            count, size = len(need), sum(s for d, s in record.outputs if d in need)
            for digest, blob_size in self._ahead.items():
                if count >= self.store.blob_batch_count:
                    break
                if digest in need or size + blob_size > self.store.blob_batch_bytes:
                    continue
                extra.append(digest)
                count += 1
                size += blob_size
            assert self._spool is not None
            try:
                written, refused = await self.store.get_many([*need, *extra], self._spool)
            except SharedCacheError as exc:
                self._fail(exc)
                return None
            for digest in (*need, *extra):
                self._ahead.pop(digest, None)
            self._fetched.update(written)
            for error in refused:
                self._refused.add(error.digest)
                _log.warning("shared cache %s: %s", self.display, error)
        bad = [d for d in wanted if d in self._refused]
        if bad:
            self._refused_count += 1
            _log.warning(
                "shared cache %s: the record of action %s names a refused blob; "
                "deleting the record and running the step here",
                self.display,
                record.action,
            )
            self._records.pop(record.action, None)
            if self.mode == "rw" and not self._down:
                try:
                    await self.store.delete_record(record.action)
                except SharedCacheError as exc:
                    self._fail(exc)
            return None
        if any(d not in self._fetched for d in wanted):
            return None  # pruned meanwhile, or the server went away
        return {d: self._fetched[d] for d in wanted}

    async def publish(self, action: str, vertex: str, kind: str, outs: Sequence[Result]) -> None:
        """Store the outputs' blobs, then the record (read-write mode only)."""
        if self.mode == "ro" or self._down:
            return
        assert self._codec is not None
        assert self._spool is not None
        files: list[Path] = []
        try:
            outputs: list[tuple[str, int]] = []
            for out in outs:
                path = self._spool / f"publish-{secrets.token_hex(8)}"
                files.append(path)
                digest = await self._codec.pack(out, path)
                if digest is None:
                    return  # not a snapshot: nothing to share
                outputs.append((digest, path.stat().st_size))
            record = ActionRecord(action, vertex, kind, tuple(outputs))
            by_digest = {digest: path for (digest, _), path in zip(outputs, files, strict=True)}
            try:
                await self.store.publish(record, by_digest)
            except SharedCacheError as exc:
                self._fail(exc)
                return
            except BlobDigestError as exc:  # the packed file changed under us
                _log.warning("shared cache %s: not published: %s", self.display, exc)
                return
            for out, (digest, _size) in zip(outs, outputs, strict=True):
                assert isinstance(out.sys, SnapshotView)
                await self._remember(out.sys.id, digest)
            self._published += 1
        finally:
            with anyio.CancelScope(shield=True):
                for path in files:
                    await anyio.to_thread.run_sync(_unlink, path)

    def lease(self, action: str) -> Any:
        """The store's lease on ``action`` (an async context manager); the step's
        progress says so when another machine holds it."""
        return self.store.lease(action, on_wait=self._lease_waited)

    def _lease_waited(self) -> None:
        self._lease_waits += 1
        _say_waiting()


class _SharedOp:
    """An op of a built-in kind whose ``exec`` goes through the shared cache."""

    __slots__ = ("_inner", "_kind", "_maps", "_shared", "_vertex", "acquire")

    def __init__(self, shared: SharedCache, inner: Op, kind: str, vertex: str) -> None:
        self._shared = shared
        self._inner = inner
        self._kind = kind
        self._vertex = vertex
        self._maps: dict[int, str] = {}
        acquire = getattr(inner, "acquire", None)
        if acquire is not None:
            self.acquire = acquire

    def __repr__(self) -> str:
        return f"<shared {self._inner!r}>"

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        cache_map, done = await self._inner.cache_map(index)
        self._maps[index] = cache_map.digest
        return cache_map, done

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        shared = self._shared
        if not shared.available:
            return await self._run_here(inputs)
        digests: list[str] = []
        for result in inputs:
            digest = await shared.content_digest(result)
            if digest is None:  # not a snapshot: this op cannot be shared
                return await self._run_here(inputs)
            digests.append(digest)
        action = digest_of(
            json.dumps(
                [_ACTION_VERSION, self._kind, [self._maps[i] for i in sorted(self._maps)],
                 digests],
                separators=(",", ":"),
            ).encode()
        )
        outs = await self._restored(await shared.find(action, self._vertex))
        if outs is not None:
            return outs
        if shared.mode == "ro" or not shared.available:
            return await self._run_here(inputs)
        return await self._exec_leased(action, inputs)

    async def _exec_leased(self, action: str, inputs: Sequence[Result]) -> Sequence[Result]:
        shared = self._shared
        try:
            async with shared.lease(action):
                outs = await self._restored(await shared.lookup(action))
                if outs is not None:
                    return outs
                shared._executed += 1
                outs = list(await self._inner.exec(inputs))
                try:
                    await shared.publish(action, self._vertex, self._kind, outs)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        for out in outs:
                            await out.release()
                    raise
                return outs
        except SharedCacheError as exc:
            # the lease could not be taken or kept: run here, without it
            shared._fail(exc)
        return await self._run_here(inputs)

    async def _restored(self, record: ActionRecord | None) -> Sequence[Result] | None:
        """The outputs of ``record`` (if any) restored from the shared cache, the
        step's progress saying so; ``None`` when there is nothing to restore."""
        if record is None:
            return None
        outs = await self._shared.restore(record)
        if outs is not None:
            log_output(RESTORED_LINE, 2)
            report_cache_source(SHARED_SOURCE)
        return outs

    async def _run_here(self, inputs: Sequence[Result]) -> Sequence[Result]:
        """Run the op on this machine, without the shared cache."""
        self._shared._executed += 1
        return await self._inner.exec(inputs)


def _say_waiting() -> None:
    log_output(b"waiting for another machine that runs this step (shared cache lease)\n", 2)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
