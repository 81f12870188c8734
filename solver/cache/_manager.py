"""Cache managers: a manager over a key storage and a result storage, the in-memory
default cache, and the combination of a main cache with imported ones.

How a manager names keys. A root key (no deps) is stored under ``key.id``, the digest
of its op digest and output. A key with deps has no name of its own in storage: the
manager follows the links ``dep key --{input, output, digest, selector}--> ?`` from
the keys of its inputs. A stored ID that every input reaches (through at least one of
its alternative keys) is the key's ID; when there is none, the manager mints a random
ID, and :meth:`KeyedCacheManager.save` links every dep key to it so that the next
build with equal inputs finds it. The ID a manager settles on is memoized on the key
object (``key.ids[manager]``), so a key keeps one ID per manager for its lifetime.

BuildKit intersects, for inputs after the first, the links of *each* alternative key
(an input's alternatives must then all be linked); we take the union over an input's
alternatives for every input, and intersect across inputs. Alternatives are names
for one input value, so any of them reaching a stored key is enough; the result is
that fewer random IDs are minted for keys whose newest alternative (a slow key, say)
has not been linked yet.

Bounding the default cache. :class:`InMemoryCacheManager` keeps at most
``max_results`` results (10,000 unless told otherwise) and evicts the least recently
used one (saved or loaded) past that; see its docstring. Eviction is an ordinary
release, so the key storage's cascade drops the keys and links that led only to the
evicted result, and the key graph stays bounded along with the results.

Concurrency. Each storage call is atomic and the sequences a manager runs on top of
them only add links or results, so interleaved queries converge on the same graph.
``save`` holds a lock so that two saves of equal keys do not both mint an ID before
either has linked its one. The lock is taken without a checkpoint when it is free,
and over the in-memory storages nothing awaits while holding it (so it is never
contended), so the in-memory manager's ``query``, ``records``, ``load`` and ``save``
never checkpoint (a save that evicts yields only inside the shielded releases of
the evicted handles, so it is no cancel point either).
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .._cache import (
    CacheInfoLink,
    CacheKey,
    CacheKeyWithSelector,
    CacheManager,
    CacheRecord,
    ExportableCacheKey,
    new_link,
    root_key,
)
from .._digest import digest_of
from .._errors import SolveError
from ._export import SavedKeyExporter
from ._storage import (
    CacheKeyStorage,
    CacheResult,
    InMemoryCacheStorage,
    InMemoryResultStorage,
    NotFoundError,
    ResultStorage,
)

if TYPE_CHECKING:
    from .._result import Result

__all__ = [
    "CombinedCacheManager",
    "InMemoryCacheManager",
    "KeyedCacheManager",
    "best_record",
]

_logger = logging.getLogger("solver")


_EVICT_SLACK = 100
"""A full :class:`InMemoryCacheManager` evicts down to ``max_results - max_results //
_EVICT_SLACK`` results (99 % of its bound)."""


def _new_id() -> str:
    return secrets.token_hex(16)


def _dep_links(key: CacheKey) -> Iterator[tuple[CacheKey, CacheInfoLink]]:
    """Each alternative dep key of ``key`` with the link from it to ``key``."""
    output = key.output
    digest = key.digest
    return iter(
        [
            (dep.key.key, new_link(i, output, digest, dep.selector))
            for i, alternatives in enumerate(key.deps)
            for dep in alternatives
        ]
    )


@dataclass(slots=True, eq=False)
class _LinkFrame:
    # one key of the post-order walk in KeyedCacheManager._ensure_persistent_key
    id: str
    deps: Iterator[tuple[CacheKey, CacheInfoLink]]
    # the link from the dep being made persistent to this key, added once it is
    link_after: tuple[str, CacheInfoLink] | None = None


@dataclass(slots=True, eq=False)
class _BatchPlan:
    # what KeyedCacheManager.save_many works out before its first storage call
    mark: object  # the manager's _linked_mark then
    # every key's (dep ID, link to the key), the keys' in order
    links: list[tuple[str, CacheInfoLink]]
    # per key: its slice of links, and whether every dep was saved since the mark
    spans: list[tuple[int, int, bool]]


class KeyedCacheManager:
    """A :class:`~solver.CacheManager` over a :class:`CacheKeyStorage` (the key graph)
    and a :class:`ResultStorage` (the results), with BuildKit's semantics.

    The manager owns both storages: :meth:`close` closes them. The constructor does
    not look at the storages; a caller opening storages that outlive the process
    should use :meth:`open`, which also drops key records whose results are gone.

    ``query`` returns new keys whose ``id`` is this manager's storage ID and whose
    ``ids`` memo already holds it. In the complexities below, a *step* is one storage
    call.
    """

    def __init__(self, id: str, storage: CacheKeyStorage, results: ResultStorage) -> None:
        self._id = id
        self._storage = storage
        self._results = results
        self._save_lock = anyio.Lock()
        # What ``CacheKey.linked`` is set to by a save (see _ensure_persistent_key).
        # A release may delete keys and the links into them, so the "everything
        # below is linked" shortcut is only valid for keys saved since the last
        # release through this manager: each such release installs a new mark.
        self._linked_mark = object()

    @staticmethod
    async def open(id: str, storage: CacheKeyStorage, results: ResultStorage) -> KeyedCacheManager:
        """A manager over storages that may hold records from an earlier run.

        Runs :meth:`release_unreferenced` first, so that results deleted while no
        manager was running (a pruned worker cache) are no longer offered.
        O(keys + results) steps.
        """
        manager = KeyedCacheManager(id, storage, results)
        await manager.release_unreferenced()
        return manager

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self._id!r} storage={self._storage!r}>"

    @property
    def id(self) -> str:
        """The manager's ID; two managers with equal IDs are the same cache."""
        return self._id

    @property
    def storage(self) -> CacheKeyStorage:
        """The key storage (for inspection and tests)."""
        return self._storage

    @property
    def results(self) -> ResultStorage:
        """The result storage (for inspection and tests)."""
        return self._results

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        """The stored keys that an op with ``digest`` produced on output ``output``
        when fed any of ``deps`` (alternative keys of input ``input``); with no deps,
        the root key of ``digest``/``output`` if it is stored.

        Every dep key that does not yet link to a key found is linked to it, so all
        alternatives of an input lead to the same stored keys from then on.
        O(deps x keys found) steps.
        """
        mark = self._linked_mark
        links: list[tuple[str, CacheInfoLink, set[str]]] = []
        found: dict[str, CacheKey] = {}
        for dep in deps:
            dep_id = await self._get_id(dep.key.key)
            link = CacheInfoLink(input, output, digest, dep.selector)
            targets = await self._storage.walk_links(dep_id, link)
            links.append((dep_id, link, set(targets)))
            for target in targets:
                if target not in found:
                    found[target] = self._new_key(target, digest, output)
        for target in found:
            for dep_id, link, reached in links:
                if target not in reached:
                    await self._storage.add_link(dep_id, link, target)
        if not deps:
            id = root_key(digest, output)
            if not await self._storage.exists(id):
                return []
            return [self._new_key(id, digest, output)]
        keys = list(found.values())
        self._mark_found(keys, mark)
        return keys

    def _mark_found(self, keys: Iterable[CacheKey], mark: object) -> None:
        """Mark keys a query found as linked below (as a save marks its key):
        a stored key is reached only through links, and a save adds a link into
        a key only after every link below it, so everything below a found key
        is linked, unless a release since the query began cut some (then the
        mark is no longer current and they are left unmarked). A save over
        found keys then adds only its own links (a one-change C build's merge
        of 58 found objects walked 116 ``has_link`` reads below them)."""
        if self._linked_mark is mark:
            for k in keys:
                k.linked = mark

    async def query_many(
        self, requests: Sequence[tuple[Sequence[CacheKeyWithSelector], int, str, int]]
    ) -> list[list[CacheKey]]:
        """:meth:`query` of each ``(deps, input, digest, output)``, in order, with
        the links of all of them read in one storage call when the key storage
        has ``walk_links_many`` (the cached path asks a whole layer of a graph at
        once: one call and one checkpoint instead of one per input), and the root
        keys of the requests without deps in one more when it has
        ``exists_many``. The same
        keys are returned and the same links added as by one :meth:`query` per
        request. O(deps x keys found) steps, the reads in one."""
        mark = self._linked_mark  # before any await: see _mark_found
        pairs: list[tuple[str, CacheInfoLink]] = []
        for deps, input, digest, output in requests:
            for dep in deps:
                key = dep.key.key
                dep_id = key.ids.get(self) or await self._get_id(key)
                pairs.append((dep_id, new_link(input, output, digest, dep.selector)))
        storage = self._storage
        walk_many = getattr(storage, "walk_links_many", None)
        if walk_many is not None:
            walked: list[list[str]] = await walk_many(pairs)
        else:
            walked = [await storage.walk_links(dep_id, link) for dep_id, link in pairs]
        # the root keys of the requests without deps (a graph's leaves), read
        # together when the storage can (exists_many), else one query each
        roots = [root_key(digest, output) for deps, _, digest, output in requests if not deps]
        exists_many = getattr(storage, "exists_many", None) if roots else None
        stored: list[bool] = await exists_many(roots) if exists_many is not None else []
        out: list[list[CacheKey]] = []
        new_links: list[tuple[str, CacheInfoLink, str]] = []
        pos = 0
        leaf = 0
        for deps, input, digest, output in requests:
            if not deps:
                if exists_many is None:
                    out.append(await self.query((), input, digest, output))
                else:
                    id = roots[leaf]
                    out.append([self._new_key(id, digest, output)] if stored[leaf] else [])
                    leaf += 1
                continue
            found: dict[str, CacheKey] = {}
            first = pos
            for _ in deps:
                for target in walked[pos]:
                    if target not in found:
                        found[target] = self._new_key(target, digest, output)
                pos += 1
            if pos - first > 1:
                # as query does: every alternative links to every key found
                for target in found:
                    for i in range(first, pos):
                        if target not in walked[i]:
                            dep_id, link = pairs[i]
                            new_links.append((dep_id, link, target))
            out.append(list(found.values()))
        await self._add_links(new_links)
        for keys in out:
            self._mark_found(keys, mark)
        return out

    async def _add_links(self, links: Sequence[tuple[str, CacheInfoLink, str]]) -> None:
        """Store ``links`` (each ``(source, link, target)``, idempotent): in one
        write where the key storage has ``add_many`` (a one-change C build's
        cold path links 58 definition keys to what their content keys found:
        58 write transactions, each a worker thread's, became one), else one
        ``add_link`` each."""
        if not links:
            return
        storage = self._storage
        add_many = getattr(storage, "add_many", None)
        if add_many is not None and len(links) > 1:
            await add_many((), links)
            return
        for dep_id, link, target in links:
            await storage.add_link(dep_id, link, target)

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        """The results stored under ``key`` that the result storage still has, as
        records of this manager with priority 0. Results it no longer has are
        released from the key storage on the way. O(results) steps."""
        id = await self._get_id(key)
        records: list[CacheRecord] = []
        for result in await self._storage.walk_results(id):
            if await self._results.exists(result.id):
                records.append(CacheRecord(result.id, self, key, result.created_at))
            else:
                self._linked_mark = object()
                await self._storage.release(result.id)
        return records

    async def load(self, record: CacheRecord) -> Result:
        """A new handle on the record's result, which the caller owns.

        ``record`` must come from this manager's :meth:`records`. Raises
        :class:`NotFoundError` if the result was released since. O(1) steps.
        """
        stored = await self._storage.load(await self._get_id(record.key), record.id)
        return await self._results.load(stored)

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        """Store ``result`` under ``key`` and link every dep key to it, recursively,
        so that :meth:`query` finds it from the keys of its inputs.

        The result storage keeps its own handle; ``result`` is still the caller's.
        If the save fails or is cancelled before the result is stored under a key,
        the stored handle is released again. The returned key's exporter
        (:class:`~solver.cache._export.SavedKeyExporter`) exports the chain behind the
        new record; making it is all the export work a save does.
        O(keys of the dep graph not yet linked) steps.
        """
        try:
            # no checkpoint when the lock is free (anyio's acquire() always has one)
            self._save_lock.acquire_nowait()
        except anyio.WouldBlock:
            await self._save_lock.acquire()
        try:
            stored = await self._results.save(result, created_at)
            try:
                await self._storage.add_result(await self._get_id(key), stored)
                await self._ensure_persistent_key(key)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._forget_if_unreferenced(stored.id)
                raise
        finally:
            self._save_lock.release()
        return ExportableCacheKey(key, SavedKeyExporter(key, self, stored))

    async def save_many(
        self, saves: Sequence[tuple[CacheKey, Result, float]]
    ) -> list[ExportableCacheKey]:
        """:meth:`save` of each ``(key, result, created_at)``, in order, with the same
        keys, results and links stored and the same keys returned, in a few storage
        calls for the whole batch: the cold path saves every result one pass of a
        build finished together (``docs/performance.md``, "Issue 13: the cold
        build's cache save").

        When every dep of every key has this manager's ID already (a key made of its
        inputs' saved or found keys, the case in a build), the batch takes the lock
        once, stores the results in one call where the result storage has
        ``save_many``, reads the deps' links in one call where the key storage has
        ``walk_links_many``, and stores the results under their keys and the links
        to them in one call where it has ``add_many``; a key whose deps are not all
        saved since the last release is then linked as :meth:`save` links it. Two
        equal keys of one batch get one ID, as two saves in a row do. Otherwise
        (and for a batch of one) it is :meth:`save` of each.

        If it fails or is cancelled, what was stored under a key stays stored (as
        after the saves before a failing one), and every result it stored but put
        under no key is released again. O(keys + their deps) steps for the batch,
        plus the links :meth:`save` would walk for the keys it walks.
        """
        if len(saves) > 1:
            try:
                self._save_lock.acquire_nowait()
            except anyio.WouldBlock:
                await self._save_lock.acquire()
            try:
                plan = self._batch_plan(saves)
                if plan is not None:
                    return await self._save_batch(saves, plan)
            finally:
                self._save_lock.release()
        # KeyedCacheManager's own save: a subclass's save_many does its own
        # bookkeeping after this one returns
        return [await KeyedCacheManager.save(self, key, r, at) for key, r, at in saves]

    def _batch_plan(self, saves: Sequence[tuple[CacheKey, Result, float]]) -> _BatchPlan | None:
        """Each key's links from its deps, in one list, or None if a dep has no ID of
        this manager yet (the batch is then saved one key at a time)."""
        mark = self._linked_mark
        links: list[tuple[str, CacheInfoLink]] = []
        spans: list[tuple[int, int, bool]] = []
        for key, _, _ in saves:
            start = len(links)
            linked = True
            output, digest = key.output, key.digest
            for i, alternatives in enumerate(key.deps):
                for dep in alternatives:
                    dk = dep.key.key
                    dep_id = dk.ids.get(self)
                    if dep_id is None:
                        return None
                    links.append((dep_id, new_link(i, output, digest, dep.selector)))
                    if dk.linked is not mark:
                        linked = False
            spans.append((start, len(links), linked))
        return _BatchPlan(mark, links, spans)

    async def _save_batch(
        self, saves: Sequence[tuple[CacheKey, Result, float]], plan: _BatchPlan
    ) -> list[ExportableCacheKey]:
        storage = self._storage
        mark = plan.mark
        results_many = getattr(self._results, "save_many", None)
        if results_many is not None:
            stored: list[CacheResult] = await results_many([(r, at) for _, r, at in saves])
        else:
            stored = []
            try:
                for _, result, created_at in saves:
                    stored.append(await self._results.save(result, created_at))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    for s in stored:
                        await self._forget_if_unreferenced(s.id)
                raise
        try:
            ids = await self._batch_ids(saves, plan)
            # the links of the keys whose deps are all linked (saved since the last
            # release) are stored with the results; the others are walked after
            links: list[tuple[str, CacheInfoLink, str]] = []
            walked: list[CacheKey] = []
            quick: list[CacheKey] = []
            dep_links = plan.links
            for (key, _, _), key_id, (start, end, linked) in zip(
                saves, ids, plan.spans, strict=True
            ):
                if linked:
                    for i in range(start, end):
                        dep_id, link = dep_links[i]
                        links.append((dep_id, link, key_id))
                    quick.append(key)
                else:
                    walked.append(key)
            pairs = list(zip(ids, stored, strict=True))
            add_many = getattr(storage, "add_many", None)
            if add_many is not None:
                await add_many(pairs, links)
            else:
                for key_id, s in pairs:
                    await storage.add_result(key_id, s)
                for dep_id, link, key_id in links:
                    await storage.add_link(dep_id, link, key_id)
            if self._linked_mark is mark:
                for key in quick:
                    key.linked = mark
            else:
                # a release meanwhile may have cut below a dep: walk them all
                walked = [key for key, _, _ in saves]
            for key in walked:
                await self._ensure_persistent_key(key)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for s in stored:
                    await self._forget_if_unreferenced(s.id)
            raise
        return [
            ExportableCacheKey(key, SavedKeyExporter(key, self, s))
            for (key, _, _), s in zip(saves, stored, strict=True)
        ]

    async def _batch_ids(
        self, saves: Sequence[tuple[CacheKey, Result, float]], plan: _BatchPlan
    ) -> list[str]:
        """The storage ID of each key of ``saves``, memoized on it, as :meth:`_get_id`
        one save after the other gives them: the links of the keys not resolved yet
        read in one call, and a key equal to an earlier one of the batch (reached
        through the links that key's save adds) given that key's ID."""
        dep_links = plan.links
        requests: list[tuple[str, CacheInfoLink]] = []
        # which keys' links are read: decided once, here (a key saved twice in
        # the batch has its ID by its second entry, and the reads are taken
        # by position below)
        asked: list[bool] = []
        for (key, _, _), (start, end, _) in zip(saves, plan.spans, strict=True):
            ask = end > start and self not in key.ids
            asked.append(ask)
            if ask:
                requests.extend(dep_links[start:end])
        storage = self._storage
        walk_many = getattr(storage, "walk_links_many", None)
        if walk_many is not None:
            walked: list[list[str]] = await walk_many(requests)
        else:
            walked = [await storage.walk_links(dep_id, link) for dep_id, link in requests]
        # the links the batch's earlier keys add: (dep ID, link) -> their IDs
        added: dict[tuple[str, CacheInfoLink], list[str]] = {}
        out: list[str] = []
        pos = 0
        for (key, _, _), (start, end, _), ask in zip(saves, plan.spans, asked, strict=True):
            memo = key.ids.get(self)
            if memo is not None:
                if ask:
                    pos += end - start  # its reads, not needed now
                # its save links it from its deps too
                for i in range(start, end):
                    targets = added.setdefault(dep_links[i], [])
                    if memo not in targets:
                        targets.append(memo)
                out.append(memo)
                continue
            if not key.deps:
                out.append(key.ids.setdefault(self, key.id))
                continue
            # as _id_from_deps: an ID reached from every input through any of its
            # alternatives, the first found in link order
            first, at = pos, start
            matches: dict[str, None] | None = None
            for alternatives in key.deps:
                reached: dict[str, None] = {}
                for _ in alternatives:
                    for target in walked[pos]:
                        reached[target] = None
                    for target in added.get(dep_links[at], ()):
                        reached[target] = None
                    pos += 1
                    at += 1
                matches = reached if matches is None else {t: None for t in matches if t in reached}
            id = key.ids.setdefault(self, next(iter(matches)) if matches else _new_id())
            for i in range(first, pos):
                pair = requests[i]
                if id not in walked[i]:
                    targets = added.setdefault(pair, [])
                    if id not in targets:
                        targets.append(id)
            out.append(id)
        return out

    async def storage_id(self, key: CacheKey) -> str:
        """This manager's storage ID of ``key`` (found through links from its deps,
        or minted), memoized on the key. O(unresolved keys of its dep graph)
        steps."""
        return await self._get_id(key)

    async def _forget_if_unreferenced(self, result_id: str) -> None:
        try:
            if not await self._storage.walk_ids_by_result(result_id):
                await self._results.release(result_id)
        except Exception:
            # the save's own error is what the caller needs to see
            _logger.exception("cleaning up after a failed cache save of %s", result_id)

    async def release(self, result_id: str) -> None:
        """Forget ``result_id``: remove it from every key (deleting keys left empty,
        see :class:`CacheKeyStorage`) and release the stored handle. O(cascade)."""
        self._linked_mark = object()
        await self._storage.release(result_id)
        await self._results.release(result_id)

    async def release_unreferenced(self) -> None:
        """Release from the key storage every result the result storage no longer
        has (deleted by a prune, or while no manager was running). O(keys +
        results) steps."""
        seen: set[str] = set()
        for id in await self._storage.walk():
            for result in await self._storage.walk_results(id):
                if result.id in seen:
                    continue
                seen.add(result.id)
                if not await self._results.exists(result.id):
                    self._linked_mark = object()
                    await self._storage.release(result.id)

    async def close(self) -> None:
        """Release every stored handle and close both storages. Idempotent."""
        try:
            await self._results.close()
        finally:
            await self._storage.close()

    def _new_key(self, id: str, digest: str, output: int) -> CacheKey:
        key = CacheKey(digest, "", output, id=id)
        key.ids[self] = id
        return key

    async def _get_id(self, key: CacheKey) -> str:
        """This manager's storage ID of ``key``, memoized on the key."""
        memo = key.ids.get(self)
        if memo is not None:
            return memo
        if all(self in dep.key.key.ids for alternatives in key.deps for dep in alternatives):
            # every dep is resolved (the common case: a key made of its inputs' keys)
            id = await self._id_from_deps(key) if key.deps else key.id
            return key.ids.setdefault(self, id)
        # Resolve the unresolved part of the dep graph bottom-up, without recursion:
        # a key's ID needs the IDs of its deps.
        for k in self._unresolved_post_order(key):
            if self in k.ids:
                continue
            id = await self._id_from_deps(k) if k.deps else k.id
            # first writer wins, should two tasks resolve the same key at once
            k.ids.setdefault(self, id)
        return key.ids[self]

    def _unresolved_post_order(self, key: CacheKey) -> list[CacheKey]:
        order: list[CacheKey] = []
        seen = {id(key)}
        stack: list[tuple[CacheKey, Iterator[tuple[CacheKey, CacheInfoLink]]]] = [
            (key, _dep_links(key))
        ]
        while stack:
            k, deps = stack[-1]
            for dep, _ in deps:
                if self not in dep.ids and id(dep) not in seen:
                    seen.add(id(dep))
                    stack.append((dep, _dep_links(dep)))
                    break
            else:
                stack.pop()
                order.append(k)
        return order

    async def _id_from_deps(self, key: CacheKey) -> str:
        # A stored ID reached from every input, through any of its alternatives; the
        # first found, in link order, if several are. The deps are resolved already
        # (post-order), so the key.ids[self] lookups cannot fail.
        matches: dict[str, None] | None = None
        for i, alternatives in enumerate(key.deps):
            reached: dict[str, None] = {}
            for dep in alternatives:
                link = new_link(i, key.output, key.digest, dep.selector)
                for target in await self._storage.walk_links(dep.key.key.ids[self], link):
                    reached[target] = None
            matches = reached if matches is None else {t: None for t in matches if t in reached}
            if not matches:
                break
        return next(iter(matches)) if matches else _new_id()

    async def _ensure_persistent_key(self, key: CacheKey) -> None:
        # A post-order walk with an explicit stack (a deep chain of new keys must not
        # hit the recursion limit). The link dep -> key is added only after the dep's
        # own links exist: an existing link is taken to mean "everything below is
        # linked", so an interrupted save must never leave one too early. The links
        # are collected in that order and written together at the end (one write
        # where the storage has ``add_many``: all of them or none); one planned
        # already counts as existing.
        # The mark as the walk starts: a release during the walk (a persistent
        # storage awaits) leaves this key unmarked, as it may have cut below it.
        mark = self._linked_mark
        key_id = await self._get_id(key)
        deps = key.deps
        links: list[tuple[str, CacheInfoLink, str]] = []
        if deps and all(alt.key.key.linked is mark for alts in deps for alt in alts):
            # The common case in a build: every dep is a key this manager saved
            # since its last release (an input's key), so everything below it is
            # linked and it needs only its link to this key; no walk.
            output, digest = key.output, key.digest
            for i, alternatives in enumerate(deps):
                for alt in alternatives:
                    dk = alt.key.key
                    link = new_link(i, output, digest, alt.selector)
                    links.append((dk.ids.get(self) or await self._get_id(dk), link, key_id))
            await self._add_links(links)
            if self._linked_mark is mark:
                key.linked = mark
                return
            # a release meanwhile may have cut below a dep: walk (links are idempotent)
            links = []
        planned: set[tuple[str, CacheInfoLink, str]] = set()
        stack = [_LinkFrame(key_id, _dep_links(key))]
        while stack:
            frame = stack[-1]
            if frame.link_after is not None:
                dep_id, link = frame.link_after
                frame.link_after = None
                links.append((dep_id, link, frame.id))
                planned.add((dep_id, link, frame.id))
            step = next(frame.deps, None)
            if step is None:
                stack.pop()
                continue
            dep, link = step
            dep_id = dep.ids.get(self) or await self._get_id(dep)
            if dep.linked is self._linked_mark:
                # a key this manager saved since its last release (an input's
                # key, in a build): every key below it is linked already
                # (add_link is idempotent)
                links.append((dep_id, link, frame.id))
            elif (dep_id, link, frame.id) not in planned and not await self._storage.has_link(
                dep_id, link, frame.id
            ):
                frame.link_after = (dep_id, link)
                stack.append(_LinkFrame(dep_id, _dep_links(dep)))
        await self._add_links(links)
        key.linked = mark


class InMemoryCacheManager(KeyedCacheManager):
    """The solver's default cache: results kept in memory, the least recently used
    evicted past ``max_results``.

    ``InMemoryCacheManager()`` gets a random ID; pass ``id`` to name it. It behaves
    as any :class:`~solver.CacheManager`:

    - ``save(key, result, created_at)`` keeps its own handle (``result.clone()``, one
      per result ID) until the result is released, evicted, or the manager is
      closed;
    - ``load(record)`` returns a new handle that the caller owns;
    - ``close()`` releases every handle it keeps, exactly once; it is idempotent, and
      using the manager afterwards raises :class:`anyio.ClosedResourceError`.

    The bound. At most ``max_results`` results are kept (default
    :attr:`DEFAULT_MAX_RESULTS`, 10,000; ``None`` keeps every result for the
    manager's lifetime, as the cache did before it was bounded). A result is *used*
    when it is saved or loaded; a save that takes the count past the bound evicts
    the least recently used results, down to 99 % of the bound (1 % at once, so
    that a full cache does not pay an eviction on every save). Evicting a result
    is what :meth:`release` does: it leaves every key, the keys and links that led only
    to it are deleted (so the key graph shrinks with the results), and the cache's
    own handle is released once, shielded from cancellation. Handles that callers
    hold (loaded ones, and the result a job built) are their own clones and are
    never touched: a job keeps using its result after the record is evicted. An
    evicted record is a cache miss: the op runs again.

    Why 10,000: a long-lived solver must stay flat, and a kept result costs the
    cache about 0.75 KiB (traced; about 1 KiB of resident memory) besides what
    the result itself holds, so the default cache stays near 10 MiB however many
    solves it serves (docs/performance.md, "A long-lived solver"). It still holds
    a whole build of 10,000 vertices, the largest size of the benchmark suite's
    default run, and that run's rebuilds after a changed leaf load every unchanged
    input they need. A graph larger than the bound builds correctly, but a rebuild
    runs again the ops whose results were evicted: pass a larger bound, or
    ``None``, for such working sets.

    ``query``, ``records`` and ``load`` never checkpoint and cost dictionary
    operations only: O(deps x keys found), O(records) and O(1). ``save`` costs
    O(links added + evicted results x their cascades); it never checkpoints unless
    it evicts, and then only inside the shielded releases of the evicted handles,
    so it is never a cancel point.
    """

    DEFAULT_MAX_RESULTS = 10_000
    """The bound of ``InMemoryCacheManager()`` (see the class docstring)."""

    def __init__(
        self, id: str | None = None, *, max_results: int | None = DEFAULT_MAX_RESULTS
    ) -> None:
        if max_results is not None and max_results < 1:
            raise ValueError(f"max_results must be at least 1 or None, not {max_results}")
        self._memory_storage = InMemoryCacheStorage()
        self._memory_results = InMemoryResultStorage()
        super().__init__(
            id if id is not None else _new_id(), self._memory_storage, self._memory_results
        )
        self._max_results = max_results
        # Result IDs, least recently used first. An OrderedDict rather than a heap
        # or a sorted list of use times: a use is move_to_end and an eviction is
        # popitem(last=False), both O(1), where a sorted container costs O(log n)
        # per use and a heap cannot move an entry.
        self._lru: OrderedDict[str, None] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} id={self._id!r} results={len(self._lru)} "
            f"max_results={self._max_results}>"
        )

    @property
    def max_results(self) -> int | None:
        """The most results kept (``None``: no bound). O(1)."""
        return self._max_results

    @property
    def result_count(self) -> int:
        """How many results the cache keeps now (at most :attr:`max_results`).
        O(1)."""
        return len(self._lru)

    async def load(self, record: CacheRecord) -> Result:
        """A new handle on the record's result, which the caller owns; the result
        becomes the most recently used. :class:`NotFoundError` if it was released
        or evicted since. O(1)."""
        result = await super().load(record)
        if record.id in self._lru:
            self._lru.move_to_end(record.id)
        return result

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        """Store ``result`` under ``key`` (see :meth:`KeyedCacheManager.save`), make it
        the most recently used, and evict the least recently used results past the
        bound. O(links added + evicted results x their cascades)."""
        saved = await super().save(key, result, created_at)
        await self._used((result.id,))
        return saved

    async def _used(self, ids: Iterable[str]) -> None:
        """Make ``ids`` the most recently used, in order, then keep the bound.
        Nothing awaits between a store and here, nor in the bookkeeping of an
        eviction (the storages never checkpoint): the new results are at the end
        of the order before anything else runs, so they are not the ones evicted
        (a batch of at most 99 % of the bound)."""
        lru = self._lru
        for id in ids:
            lru[id] = None
            lru.move_to_end(id)
        bound = self._max_results
        if bound is not None and len(lru) > bound:
            # Down to 1 % under the bound, not just to it: one eviction per 1 %
            # of the bound's saves, so that its fixed costs (a shielded scope, a
            # pass over the links of each parent that loses some, and the linking
            # shortcut that a release turns off for the keys saved before it, see
            # _linked_mark) are not paid by every save of a full cache.
            await self._evict(len(lru) - bound + bound // _EVICT_SLACK)

    async def save_many(
        self, saves: Sequence[tuple[CacheKey, Result, float]]
    ) -> list[ExportableCacheKey]:
        """:meth:`save` of each ``(key, result, created_at)`` in one batch (see
        :meth:`KeyedCacheManager.save_many`): the results become the most recently
        used, in order, and the bound is enforced once, after the batch. A batch
        of at most 99 % of the bound is never evicted by its own eviction.
        O(keys + their deps + links added + evicted results x their cascades)."""
        saved = await super().save_many(saves)
        await self._used(result.id for _, result, _ in saves)
        return saved

    async def release(self, result_id: str) -> None:
        """Forget ``result_id`` (see :meth:`KeyedCacheManager.release`). O(cascade)."""
        self._lru.pop(result_id, None)
        await super().release(result_id)

    async def close(self) -> None:
        """Release every stored handle and close both storages. Idempotent.
        O(stored results)."""
        self._lru.clear()
        await super().close()

    async def _evict(self, count: int) -> None:
        # First take every victim out of both storages, without a checkpoint (the
        # graph and the count change at once), in one cascade (a base that many
        # evicted keys were built on is rewritten once, not once per key); then
        # release their handles, shielded: a save is never a cancel point, and a
        # handle the cache took must be released even if the saver is cancelled.
        self._linked_mark = object()
        victims = [self._lru.popitem(last=False)[0] for _ in range(count)]
        await self._memory_storage.release_many(victims)
        handles = [h for h in map(self._memory_results.take, victims) if h is not None]
        with anyio.CancelScope(shield=True):
            for handle in handles:
                try:
                    await handle.release()
                except Exception:
                    # The save succeeded; a handle that fails to release is the
                    # result's problem, reported here, not the saver's.
                    _logger.exception("releasing evicted cached result %s failed", handle.id)

    def _check(self) -> None:
        """Assert every invariant (for tests); holds while the storages are changed
        only through the manager. O(keys + links + results)."""
        if self._memory_storage._closed:
            assert not self._lru, "a closed manager tracks no result"
            return
        self._memory_storage._check(leads_to_results=True)
        bound = self._max_results
        assert bound is None or len(self._lru) <= bound, (len(self._lru), bound)
        stored = set(self._memory_results._ids())
        assert stored == set(self._lru), ("LRU order out of step", stored ^ set(self._lru))
        indexed = set(self._memory_storage._result_ids())
        assert indexed == stored, ("results and keys out of step", indexed ^ stored)


class CombinedCacheManager:
    """The main cache together with extra cache sources (imports), seen as one.

    - ``id`` is the digest of the members' IDs joined with commas.
    - ``query`` asks every member and merges the keys by ID, preferring the main
      cache's key object.
    - ``records(key)`` asks the members that have resolved ``key`` (those in
      ``key.ids``; none gives ``[]``) and gives the main cache's records
      priority 1, the others 0. A result ID known to several members is reported
      once, as the main cache's record if it has one.
    - ``load(record)`` loads through the member the record belongs to; a record from
      another member is saved into the main cache under the record's key, so that an
      imported result becomes local. For the main cache to find it again from the
      keys of its inputs, that key must carry its deps (as the keys the solver asks
      records for do); a key without deps is saved as a root key. A record whose
      result is gone raises :class:`~solver.SolveError` ("failed to load deleted
      cache").
    - ``save``, ``save_many`` and ``release`` go to the main cache only.
    - ``close()`` closes nothing: the members belong to whoever made them.

    Members with equal IDs are all asked: telling caches apart by ID is the solver's
    job, not this class's. Members are asked one after the other; the complexities
    are the sums of the members'.
    """

    def __init__(self, managers: Sequence[CacheManager], main: CacheManager) -> None:
        if not any(m is main for m in managers):
            raise ValueError("the main cache must be one of the managers")
        self._managers = tuple(managers)
        self._main = main
        self._id = digest_of(",".join(m.id for m in self._managers).encode())

    def __repr__(self) -> str:
        members = len(self._managers)
        return f"<CombinedCacheManager id={self._id!r} main={self._main.id!r} members={members}>"

    @property
    def id(self) -> str:
        return self._id

    @property
    def main(self) -> CacheManager:
        """The cache that ``save`` writes to and imports are copied into."""
        return self._main

    @property
    def managers(self) -> tuple[CacheManager, ...]:
        """Every member, the main cache included, in the order given."""
        return self._managers

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        """See the class docstring."""
        keys: dict[str, CacheKey] = {}
        for manager in self._managers:
            for key in await manager.query(deps, input, digest, output):
                if key.id not in keys or manager is self._main:
                    keys[key.id] = key
        return list(keys.values())

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        """See the class docstring."""
        records: dict[str, CacheRecord] = {}
        for manager in self._managers:
            if manager not in key.ids:
                continue
            is_main = manager is self._main
            for record in await manager.records(key):
                if is_main:
                    record.priority = 1
                if record.id not in records or is_main:
                    records[record.id] = record
        return list(records.values())

    async def load(self, record: CacheRecord) -> Result:
        """See the class docstring. The handle returned is the caller's; the main
        cache keeps its own when it imports the result."""
        manager = self._member(record.manager)
        try:
            result = await manager.load(record)
        except NotFoundError as exc:
            raise SolveError("failed to load deleted cache") from exc
        if manager is not self._main:
            try:
                await self._main.save(record.key, result, record.created_at)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await result.release()
                raise
        return result

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        """Saves into the main cache."""
        return await self._main.save(key, result, created_at)

    async def save_many(
        self, saves: Sequence[tuple[CacheKey, Result, float]]
    ) -> list[ExportableCacheKey]:
        """Saves into the main cache: its ``save_many`` if it has one, else one
        ``save`` each."""
        save_many = getattr(self._main, "save_many", None)
        if save_many is not None:
            return await save_many(saves)  # type: ignore[no-any-return]
        return [await self._main.save(key, result, at) for key, result, at in saves]

    async def release(self, result_id: str) -> None:
        """Releases from the main cache."""
        await self._main.release(result_id)

    async def close(self) -> None:
        """Does nothing: the members are not this object's to close."""

    def _member(self, manager: CacheManager) -> CacheManager:
        # Look the record's manager up among the members rather than calling through
        # the record: only the objects this cache was given are ever called.
        for member in self._managers:
            if member is manager:
                return member
        raise ValueError(f"record of {manager!r}, which is not a member of {self!r}")


def best_record(records: Iterable[CacheRecord]) -> CacheRecord | None:
    """The record to load among ``records``: the newest (``created_at``), and among
    equally new ones the lowest ``priority``, then the first given. ``None`` if
    there are none. O(n).

    As in BuildKit, equal timestamps put priority-0 (imported) records before the
    main cache's priority-1 records.
    """
    return min(records, key=lambda r: (-r.created_at, r.priority), default=None)
