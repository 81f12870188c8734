"""Cache export: walking the chain of cache records behind a result's keys.

After BuildKit's ``solver/exporter.go``. Every cache key a result carries
(``CachedResult.cache_keys``) has an exporter. Exporting sends a *target* one
``add(digest, links, results)`` call per record of the chain, inputs first:

- ``digest`` names the record: ``root_key(op cache digest, output)``, the same
  for every key of that op output whatever its inputs were;
- ``links[i]`` are the target's records for input ``i`` (each with the selector
  of the link), so a record is known by its digest *and* where it came from;
- ``results`` are the record's exported results (:class:`CacheExportResult`),
  each holding a *remote*: what ``options.resolve_remote`` made of the loaded
  result (for the local cache format, a blob), or what the result storage already
  had (:class:`RemoteResultStorage`, an imported cache).

What an exporter visits, for one key:

1. its own record: the first record that still exists, best first (newest, then
   lowest priority), among the one it was saved or loaded as and the ones found
   for it. Keys without deps (roots) export no result unless
   ``options.export_roots``. In mode ``"min"`` a key whose own result was
   exported walks its deps in *remote-only* mode: below it, only results that
   are remotes already are exported (none are, for a cache held in memory); mode
   ``"max"`` exports every result it reaches;
2. the exporters of the key's deps (every alternative of every input), and of
   the *secondary* deps of an edge that other edges were merged into (their
   inputs are alternative inputs of this one);
3. unless ``options.ignore_backlinks``, every chain the storage knows that leads
   to the key (its backlinks, recursively), so that a build whose inputs differ
   in definition but not in key still finds the record;
4. for a root key with a record, the other root keys that hold the same result
   (an op that answered several cache maps).

A record is dropped (``add`` is not called, the key's exporter returns no
records) when one of its inputs has no exported record: an importer could never
reach it. A record whose result disappeared from the storage is skipped, not an
error (BuildKit's TestCacheErrNotFound), and so is one of a closed cache. Any
other error propagates, from a dependency too (where BuildKit drops the
dependency): an export that cannot write a result should fail, not produce a
cache that silently lacks it.

Each exporter and each backlinked storage key is visited once per export run:
``add`` may still be called more than once for one digest (through different
paths), and the target deduplicates. The walk is a loop over an explicit stack of
generator frames, never Python recursion, so a chain of any depth exports.

Like BuildKit's exporter, and unlike the solver, the walk reads a record through
the storages of the manager that made it (``record.manager``): its key storage
(does the record still exist, backlinks) and its result storage (a new handle to
resolve, released at once). Records of managers of another kind are loaded with
their ``load(record)``; their backlinks are not walked.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio

from .._cache import (
    CacheExporter,
    CacheExportOptions,
    CacheExportResult,
    CacheExportTarget,
    CacheKeyWithSelector,
    CacheLink,
    CacheManager,
    CacheRecord,
    ExportableCacheKey,
    root_key,
)
from ._storage import NotFoundError

if TYPE_CHECKING:
    from .._cache import CacheKey
    from .._result import Result
    from ._manager import KeyedCacheManager  # see _keyed
    from ._storage import CacheKeyStorage, CacheResult

__all__ = [
    "FoundKeyExporter",
    "KeyExporter",
    "MergedExporter",
    "RemoteResultStorage",
    "SavedKeyExporter",
    "export_cache",
]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# The internal mode below a record whose result was exported in mode "min".
_REMOTE_ONLY = "remote-only"


@runtime_checkable
class RemoteResultStorage(Protocol):
    """A result storage that may hold results as remotes already (an imported
    cache holds blobs): the exporter asks it before loading anything."""

    async def load_remote(self, result: CacheResult) -> object | None:
        """The remote of ``result`` if the storage has one, else ``None``."""
        ...


@dataclass(frozen=True, slots=True)
class _Options:
    # CacheExportOptions with the internal "remote-only" mode
    mode: str
    resolve_remote: Callable[[Result], Awaitable[object | None]] | None
    export_roots: bool
    ignore_backlinks: bool


class KeyExporter:
    """The exporter of one key (BuildKit's ``exporter``).

    ``record`` is the record the key was saved or loaded as, ``records`` the ones
    found for it in a cache; ``secondary`` (set by the edge that produced the
    result, a live list it may still append to) the ``(input, key)`` pairs of
    edges merged into that edge. Making one costs one small object; all work
    happens in :meth:`export_to`.
    """

    __slots__ = ("_record", "key", "records", "secondary")

    def __init__(
        self,
        key: CacheKey,
        records: Sequence[CacheRecord] = (),
        record: CacheRecord | None = None,
    ) -> None:
        self.key = key
        self.records = records
        self._record = record
        self.secondary: Sequence[tuple[int, CacheKeyWithSelector]] = ()

    @property
    def record(self) -> CacheRecord | None:
        """The record the key was saved or loaded as, if any."""
        return self._record

    def __repr__(self) -> str:
        return f"<KeyExporter {self.key!r} records={len(self.records)} record={self.record!r}>"

    async def export_to(
        self, target: CacheExportTarget, options: CacheExportOptions
    ) -> list[object]:
        """Export the chain behind the key to ``target``; the target's records
        for the key. O(records and links reached) storage steps, plus
        ``resolve_remote`` once per exported result."""
        run = _Run(target)
        return await run.drive(run.exporter_frame(self, _options(options)))

    async def candidates(self) -> Sequence[CacheRecord]:
        """The records found for the key (what an export may choose from)."""
        return self.records


class FoundKeyExporter(KeyExporter):
    """The exporter of a key found in ``manager`` whose records were not read
    when it was found (the cached path, ``_cachedpath.py``, finds the keys of a
    whole graph and needs the records of its root only): they are asked for when
    an export reaches the key."""

    __slots__ = ("_manager",)

    def __init__(self, key: CacheKey, manager: CacheManager) -> None:
        self.key = key
        self.records = ()
        self._record = None
        self.secondary = ()
        self._manager = manager

    async def candidates(self) -> Sequence[CacheRecord]:
        try:
            return await self._manager.records(self.key)
        except anyio.ClosedResourceError:
            # as for a record of a closed cache: skipped, not an error
            return ()


class SavedKeyExporter(KeyExporter):
    """The exporter :meth:`KeyedCacheManager.save <solver.KeyedCacheManager.save>`
    returns: its record (the result just stored under the key) is made on first
    use, so that a save costs one small object and nothing more."""

    __slots__ = ("_manager", "_stored")

    def __init__(self, key: CacheKey, manager: CacheManager, stored: CacheResult) -> None:
        # no super().__init__(): a save is on the hot path
        self.key = key
        self.records = ()
        self._record = None
        self.secondary = ()
        self._manager = manager
        self._stored = stored

    @property
    def record(self) -> CacheRecord:
        """The saved record."""
        if self._record is None:
            stored = self._stored
            self._record = CacheRecord(stored.id, self._manager, self.key, stored.created_at)
        return self._record


class MergedExporter:
    """Several exporters seen as one (BuildKit's ``mergedExporter``): an exec
    result saved under several keys exports the chains of all of them."""

    __slots__ = ("exporters",)

    def __init__(self, exporters: Sequence[CacheExporter]) -> None:
        self.exporters = exporters

    def __repr__(self) -> str:
        return f"<MergedExporter of {len(self.exporters)}>"

    async def export_to(
        self, target: CacheExportTarget, options: CacheExportOptions
    ) -> list[object]:
        """Export every member to ``target`` in one run; their records, in order."""
        run = _Run(target)
        return await run.drive(run.merged_frame(self, _options(options)))


async def export_cache(
    keys: Sequence[ExportableCacheKey], target: CacheExportTarget, options: CacheExportOptions
) -> list[object]:
    """Export the chains behind ``keys`` to ``target`` in one run (each exporter
    and storage key is visited once however many keys reach it); the target's
    records for the keys. A key without an exporter exports its deps' chains and
    its own record without results."""
    run = _Run(target)
    opts = _options(options)
    out: list[object] = []
    for key in keys:
        out.extend(await run.drive(run.key_frame(key, opts)))
    return out


def _options(options: CacheExportOptions) -> _Options:
    return _Options(
        options.mode, options.resolve_remote, options.export_roots, options.ignore_backlinks
    )


def _is_digest(id: str) -> bool:
    return _DIGEST.fullmatch(id) is not None


def _keyed(manager: object) -> KeyedCacheManager | None:
    # Imported here: _manager builds on this module (a keyed manager makes
    # SavedKeyExporters); the exporter reads a keyed manager's storages directly.
    from ._manager import KeyedCacheManager

    return manager if isinstance(manager, KeyedCacheManager) else None


def _sort_key(record: CacheRecord) -> tuple[float, int]:
    return (-record.created_at, record.priority)


@dataclass(frozen=True, slots=True)
class _Done:
    # the last thing a frame yields: its records
    records: list[object]


# A frame yields either a child frame (and is sent the child's records back) or,
# last, a _Done with its own records.
_Frame = AsyncGenerator["_Frame | _Done", "list[object] | None"]


class _Run:
    """The state of one export: the target, and what was visited."""

    __slots__ = ("backlinks", "bare", "done", "target")

    def __init__(self, target: CacheExportTarget) -> None:
        self.target = target
        # exporter -> its records; None while it is being exported (a cycle guard)
        self.done: dict[KeyExporter, list[object] | None] = {}
        # (storage, key ID) -> records of the chains leading to it
        self.backlinks: dict[tuple[int, str], list[object] | None] = {}
        # exporters made for keys that have none, by key object (kept alive here)
        self.bare: dict[int, tuple[ExportableCacheKey, KeyExporter]] = {}

    async def drive(self, first: _Frame) -> list[object]:
        """Run ``first`` and every frame it asks for, depth first, on one stack."""
        stack: list[_Frame] = [first]
        sent: list[object] | None = None
        try:
            while True:
                step = await stack[-1].asend(sent)
                if isinstance(step, _Done):
                    await stack.pop().aclose()
                    if not stack:
                        return step.records
                    sent = step.records
                else:
                    stack.append(step)
                    sent = None
        finally:
            for frame in reversed(stack):
                await frame.aclose()

    # -- frames -------------------------------------------------------------------
    def key_frame(self, key: ExportableCacheKey, opts: _Options) -> _Frame:
        exporter = key.exporter
        if exporter is None:
            entry = self.bare.get(id(key))
            if entry is None:
                entry = self.bare[id(key)] = (key, KeyExporter(key.key))
            return self.exporter_frame(entry[1], opts)
        return self.frame_of(exporter, opts)

    def frame_of(self, exporter: CacheExporter, opts: _Options) -> _Frame:
        if isinstance(exporter, KeyExporter):
            return self.exporter_frame(exporter, opts)
        if isinstance(exporter, MergedExporter):
            return self.merged_frame(exporter, opts)
        return self.foreign_frame(exporter, opts)

    async def foreign_frame(self, exporter: CacheExporter, opts: _Options) -> _Frame:
        # an exporter of another kind runs on its own (without this run's memo)
        public = CacheExportOptions(
            "min" if opts.mode == "min" else "max",
            opts.resolve_remote if opts.mode != _REMOTE_ONLY else None,
            opts.export_roots,
            opts.ignore_backlinks,
        )
        yield _Done(await exporter.export_to(self.target, public))

    async def merged_frame(self, merged: MergedExporter, opts: _Options) -> _Frame:
        out: list[object] = []
        for exporter in merged.exporters:
            recs = yield self.frame_of(exporter, opts)
            assert recs is not None
            out.extend(recs)
        yield _Done(out)

    async def exporter_frame(self, exp: KeyExporter, opts: _Options) -> _Frame:
        if exp in self.done:
            yield _Done(self.done[exp] or [])
            return
        self.done[exp] = None
        key = exp.key
        deps = key.deps

        # 1. the key's own record and its result
        results: list[CacheExportResult] = []
        record = exp.record
        remote: object | None = None
        if opts.export_roots or deps:
            candidates = sorted(await exp.candidates(), key=_sort_key)
            i = 0
            while True:
                if record is None:
                    if i == len(candidates):
                        break
                    record = candidates[i]
                    i += 1
                found, remote = await self._record_remote(record, opts)
                if not found:
                    record = None
                    continue
                if remote is not None:
                    results.append(
                        CacheExportResult(record.created_at, remote, key.vertex, key.output)
                    )
                break
        if remote is not None and opts.mode == "min":
            opts = replace(opts, mode=_REMOTE_ONLY)

        # 2. deps, and the inputs of edges merged into the one that made this key
        srcs: list[list[CacheLink]] = [[] for _ in deps]
        for i, alternatives in enumerate(deps):
            for dep in alternatives:
                recs = yield self.key_frame(dep.key, opts)
                assert recs is not None
                srcs[i].extend(CacheLink(r, dep.selector) for r in recs)
        for index, dep in list(exp.secondary):
            recs = yield self.key_frame(dep.key, opts)
            assert recs is not None
            if index < len(srcs):
                srcs[index].extend(CacheLink(r, dep.selector) for r in recs)

        # 3. other chains that lead to this key
        if not opts.ignore_backlinks:
            for manager, key_id in list(key.ids.items()):
                keyed = _keyed(manager)
                if keyed is not None:
                    yield self.backlink_frame(keyed.storage, key_id)

        if any(not s for s in srcs):
            # an input without a record: nothing could ever reach this one
            self.done[exp] = []
            yield _Done([])
            return

        # 4. a root record's result held by other root keys of the same op
        if record is not None and not deps:
            await self._add_sibling_roots(record, results)

        rec = self.target.add(root_key(key.digest, key.output), srcs, results)
        out = [rec] if rec is not None else []
        self.done[exp] = out
        yield _Done(out)

    async def backlink_frame(self, storage: CacheKeyStorage, key_id: str) -> _Frame:
        memo = (id(storage), key_id)
        if memo in self.backlinks:
            yield _Done(self.backlinks[memo] or [])
            return
        self.backlinks[memo] = None
        try:
            backlinks = await storage.walk_backlinks(key_id)
        except anyio.ClosedResourceError:
            backlinks = []
        # record digest -> links per input
        by_digest: dict[str, list[list[CacheLink]]] = {}
        for source, link in backlinks:
            recs = yield self.backlink_frame(storage, source)
            assert recs is not None
            slots = by_digest.setdefault(link.digest, [])
            while len(slots) <= link.input:
                slots.append([])
            slots[link.input].extend(CacheLink(r, link.selector) for r in recs)
        out: list[object] = []
        if not backlinks and _is_digest(key_id):
            rec = self.target.add(key_id, [], [])
            if rec is not None:
                out.append(rec)
        for digest, slots in by_digest.items():
            if any(not s for s in slots):
                continue
            rec = self.target.add(digest, slots, [])
            if rec is not None:
                out.append(rec)
        self.backlinks[memo] = out
        yield _Done(out)

    # -- storage ------------------------------------------------------------------
    async def _record_remote(
        self, record: CacheRecord, opts: _Options
    ) -> tuple[bool, object | None]:
        """Whether ``record`` still exists, and its remote if one can be had."""
        keyed = _keyed(record.manager)
        try:
            if keyed is None:
                return await self._foreign_remote(record, opts)
            stored = await keyed.storage.load(await keyed.storage_id(record.key), record.id)
            results = keyed.results
            if isinstance(results, RemoteResultStorage):
                remote = await results.load_remote(stored)
                if remote is not None:
                    return True, remote
            if opts.mode == _REMOTE_ONLY or opts.resolve_remote is None:
                return True, None
            try:
                result = await results.load(stored)
            except NotFoundError:
                return True, None
            return True, await _resolve(result, opts.resolve_remote)
        except (NotFoundError, anyio.ClosedResourceError):
            return False, None

    async def _foreign_remote(
        self, record: CacheRecord, opts: _Options
    ) -> tuple[bool, object | None]:
        # A manager of another kind: all we can do is load through it.
        if opts.mode == _REMOTE_ONLY or opts.resolve_remote is None:
            return True, None
        result = await record.manager.load(record)
        return True, await _resolve(result, opts.resolve_remote)

    async def _add_sibling_roots(
        self, record: CacheRecord, results: list[CacheExportResult]
    ) -> None:
        keyed = _keyed(record.manager)
        if keyed is None:
            return
        storage = keyed.storage
        try:
            own = await keyed.storage_id(record.key)
            for other in await storage.walk_ids_by_result(record.id):
                if other == own or not _is_digest(other):
                    continue
                if await storage.walk_backlinks(other):
                    continue
                self.target.add(other, [], results)
        except anyio.ClosedResourceError:
            return


async def _resolve(
    result: Result, resolve: Callable[[Result], Awaitable[object | None]]
) -> object | None:
    try:
        return await resolve(result)
    finally:
        with anyio.CancelScope(shield=True):
            await result.release()
