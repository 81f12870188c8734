"""Cache storage: the key graph (:class:`CacheKeyStorage`) and the results behind it
(:class:`ResultStorage`), with their in-memory implementations.

A cache manager splits what it remembers in two.

The *key storage* holds only identifiers. Each key ID (a root key's digest, or an ID
a manager found or minted for a key with deps) has

- *results*: result IDs stored under the key, each with its creation time;
- *links*: ``(CacheInfoLink, target key ID)`` pairs. A link from key ``a`` labelled
  ``{input i, output o, digest d, selector s}`` to key ``b`` says "an op with cache
  digest ``d``, fed ``a`` on input ``i`` through selector ``s``, produced ``b`` on
  output ``o``". Following links from the keys of an op's inputs is how a manager
  finds the stored key of the op's output;
- two reverse indexes: *backlinks* (target -> sources) and *by result* (result ID ->
  keys), so that releasing a result can find what it empties.

Releasing a result removes it from every key that holds it. A key left with neither
results nor outgoing links is useless (nothing can be loaded from it and nothing is
reached through it), so it is deleted, the links pointing at it are deleted from its
parents, and each parent that is left with neither results nor links is deleted in
turn, up the graph. A key without results but *with* links stays: it is still the
way to reach the keys below it ("releasing a result does not break the chain").

The *result storage* maps a result ID to a real result handle. It owns one handle per
stored result (``result.clone()`` at save) and hands out new handles on load.

Both protocols are async so that a persistent store (SQLite, run in a worker thread)
fits them without blocking the event loop. ``InMemoryCacheStorage`` never awaits:
its coroutines finish without a checkpoint, so a lookup costs a few dictionary
operations and cannot be cancelled halfway. ``InMemoryResultStorage`` awaits only
the stored handles' own ``release()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, runtime_checkable

import anyio

from .._cache import CacheInfoLink, root_key

if TYPE_CHECKING:
    from .._result import Result

__all__ = [
    "CacheKeyStorage",
    "CacheResult",
    "InMemoryCacheStorage",
    "InMemoryResultStorage",
    "NotFoundError",
    "ResultStorage",
]

_logger = logging.getLogger("solver")


class NotFoundError(KeyError):
    """A key or a result is not (or no longer) in a storage."""

    def __str__(self) -> str:
        # KeyError would show the repr of its argument; show the message itself.
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True, slots=True)
class CacheResult:
    """One result ID stored under a key, with the time it was created (``time.time()``
    seconds)."""

    id: str
    created_at: float


@runtime_checkable
class CacheKeyStorage(Protocol):
    """The graph of key IDs, the links between them and the result IDs under them.

    Every method is a coroutine. Lists returned are snapshots: changing the storage
    afterwards does not change them. A closed storage raises
    :class:`anyio.ClosedResourceError` on use; :meth:`close` itself is idempotent.
    """

    async def exists(self, id: str) -> bool:
        """Whether key ``id`` holds any result or outgoing link."""
        ...

    async def walk(self) -> list[str]:
        """Every key ID that holds a result or an outgoing link."""
        ...

    async def walk_results(self, id: str) -> list[CacheResult]:
        """The results stored under key ``id`` (empty for an unknown key)."""
        ...

    async def load(self, id: str, result_id: str) -> CacheResult:
        """The result ``result_id`` under key ``id``; :class:`NotFoundError` if the key
        or the result is missing."""
        ...

    async def add_result(self, id: str, result: CacheResult) -> None:
        """Store ``result`` under key ``id`` (creating the key; replacing a result
        with the same ID)."""
        ...

    async def walk_ids_by_result(self, result_id: str) -> list[str]:
        """The key IDs that hold ``result_id``."""
        ...

    async def release(self, result_id: str) -> None:
        """Remove ``result_id`` from every key, then delete every key left with
        neither results nor links, cascading to its parents. Unknown IDs are
        ignored."""
        ...

    async def add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        """Link key ``id`` to key ``target`` under ``link`` (idempotent)."""
        ...

    async def walk_links(self, id: str, link: CacheInfoLink) -> list[str]:
        """The targets linked from key ``id`` under exactly ``link``."""
        ...

    async def has_link(self, id: str, link: CacheInfoLink, target: str) -> bool:
        """Whether key ``id`` links to ``target`` under exactly ``link``."""
        ...

    async def walk_backlinks(self, id: str) -> list[tuple[str, CacheInfoLink]]:
        """``(source ID, link)`` for every link pointing at key ``id``.

        The link is given in root-key form, as exporters want it: its ``digest`` is
        ``root_key(link.digest, link.output)`` and its ``output`` is 0.
        """
        ...

    async def close(self) -> None:
        """Release what the storage holds (files, connections). Idempotent."""
        ...


@runtime_checkable
class ResultStorage(Protocol):
    """Turns stored result IDs into real results (BuildKit's ``CacheResultStorage``).

    The storage owns a handle per stored result from :meth:`save` until
    :meth:`release` or :meth:`close`; every :meth:`load` returns a new handle that the
    caller owns and must release.
    """

    async def save(self, result: Result, created_at: float) -> CacheResult:
        """Keep ``result`` (the storage takes its own handle; the caller keeps its
        one) and return the ID it is stored under."""
        ...

    async def load(self, cache_result: CacheResult) -> Result:
        """A new handle on a stored result; :class:`NotFoundError` if it is gone."""
        ...

    async def exists(self, result_id: str) -> bool:
        """Whether ``result_id`` can still be loaded."""
        ...

    async def release(self, result_id: str) -> None:
        """Drop the stored result (and release its handle). Unknown IDs are ignored."""
        ...

    async def close(self) -> None:
        """Release every stored handle exactly once. Idempotent."""
        ...


# How the in-memory key storage is laid out, and why.
#
# A build stores about one key per vertex, each with a result, a link or two out and a
# backlink or two in, and keeps them until they are released. Kept as an object per
# key with a dict per field (the obvious layout), that was about 1,100 bytes and four
# objects tracked by the cyclic garbage collector per vertex, and every full
# collection walks every tracked object the storage holds. So each key is one plain
# tuple of three fields and every field is built from strings, floats and exact
# tuples, which the collector stops tracking (CPython untracks a tuple during a
# collection once what it holds is untracked, so a record nested three deep is
# untracked by its third; a dict of strings and floats is never tracked, and a full
# collection untracks any other dict once what it holds is untracked).
# Only a field grown past ``_SMALL`` entries turns into a dict, for O(1) operations.
#
# - ``_by_id[id]`` is ``(results, links, backlinks)``; ``None`` stands for an empty
#   field, so an empty container costs nothing. A record is replaced, not mutated,
#   when a tuple field changes.
# - *results* is an ordered map result ID -> creation time (see below); the
#   :class:`CacheResult` handed to :meth:`add_result` is not kept, one is made per
#   read (a class instance is tracked for as long as it lives).
# - *links* is an ordered map label -> targets. A label is stored as an exact tuple
#   (a copy of the caller's :class:`CacheInfoLink`: a named tuple is never
#   untracked); it hashes and compares equal to the named tuple, so lookups take
#   either.
# - *targets*, *backlinks* and the by-result index's key sets are ordered ID sets:
#   a ``str`` for one ID (no container at all), a tuple of 2 to ``_SMALL`` distinct
#   IDs, or a ``dict[str, None]`` beyond.
# - An ordered map of at most ``_SMALL`` entries is a flat tuple
#   ``(k0, v0, k1, v1, ...)``, searched linearly; beyond, a dict.
#
# Every form keeps insertion order, and replacing an entry keeps its place, as the
# dicts did: walks return IDs and results in the order they were first added.
#
# - ``_labels[id]`` exists for a key whose links grew into a dict (more than
#   ``_SMALL`` labels: a base that many keys were built on) and maps each of its
#   targets to the labels that link to it. Deleting a key must drop the links to it
#   from its parents; the backlinks say which parents, and this index which of a
#   large parent's labels, so the cost is the links removed rather than a scan of
#   every label of the parent per key deleted (a bounded cache deletes keys all
#   the time, and a base with thousands of evicted children paid thousands of
#   label visits per eviction). A small parent is scanned: at most ``_SMALL``.

_SMALL = 8
"""The most entries an ID set or map keeps in tuple form."""

_K = TypeVar("_K")
_V = TypeVar("_V")

_Ids: TypeAlias = "str | tuple[str, ...] | dict[str, None]"
"""An ordered set of IDs, never empty (an empty set is ``None``)."""

_Map: TypeAlias = "tuple[Any, ...] | dict[_K, _V]"
"""An ordered map, never empty: a flat tuple ``(k0, v0, ...)`` or a dict."""

_Label: TypeAlias = "tuple[int, int, str, str | None]"
"""A :class:`CacheInfoLink` as an exact tuple."""

_Results: TypeAlias = "_Map[str, float]"
_Links: TypeAlias = "_Map[_Label, _Ids]"
_Record: TypeAlias = "tuple[_Results | None, _Links | None, _Ids | None]"


def _ids_iter(ids: _Ids) -> tuple[str, ...] | dict[str, None]:
    return (ids,) if isinstance(ids, str) else ids


def _ids_has(ids: _Ids, id: str) -> bool:
    return ids == id if isinstance(ids, str) else id in ids


def _ids_add(ids: _Ids | None, id: str) -> _Ids:
    """``ids`` with ``id`` added last, or ``ids`` itself if it has ``id`` (a dict is
    changed in place)."""
    if ids is None:
        return id
    if isinstance(ids, str):
        return ids if ids == id else (ids, id)
    if isinstance(ids, tuple):
        if id in ids:
            return ids
        if len(ids) < _SMALL:
            return (*ids, id)
        ids = dict.fromkeys(ids)
    ids[id] = None
    return ids


def _ids_remove(ids: _Ids, id: str) -> _Ids | None:
    """``ids`` without ``id`` (a dict is changed in place); ``None`` once empty."""
    if isinstance(ids, str):
        return None if ids == id else ids
    if isinstance(ids, tuple):
        if id not in ids:
            return ids
        rest = tuple(i for i in ids if i != id)
        return rest[0] if len(rest) == 1 else rest
    ids.pop(id, None)
    return ids or None


def _find(m: tuple[Any, ...], k: object) -> int:
    """The index of key ``k`` in flat map ``m``, or -1."""
    if m[0] == k:  # most maps hold one entry
        return 0
    keys = m[2::2]  # searched in C, not in a Python loop
    return 2 * keys.index(k) + 2 if k in keys else -1


def _map_get(m: _Map[_K, _V] | None, k: _K) -> _V | None:
    if m is None:
        return None
    if isinstance(m, dict):
        return m.get(k)
    if m[0] == k:  # as in _find, without the call
        value: _V = m[1]
        return value
    i = _find(m, k)
    if i < 0:
        return None
    value = m[i + 1]
    return value


def _map_set(m: _Map[_K, _V] | None, k: _K, v: _V) -> _Map[_K, _V]:
    """``m`` with ``k`` mapped to ``v``: an existing entry keeps its place and its key
    object, a new one goes last (a dict is changed in place)."""
    if m is None:
        return (k, v)
    if isinstance(m, tuple):
        i = _find(m, k)
        if i >= 0:
            return (*m[: i + 1], v, *m[i + 2 :])
        if len(m) < 2 * _SMALL:
            return (*m, k, v)
        m = dict(zip(m[::2], m[1::2], strict=True))
    m[k] = v
    return m


def _map_remove(m: _Map[_K, _V], k: _K) -> _Map[_K, _V] | None:
    """``m`` without ``k`` (a dict is changed in place); ``None`` once empty."""
    if isinstance(m, dict):
        m.pop(k, None)
        return m or None
    i = _find(m, k)
    if i < 0:
        return m
    return (m[:i] + m[i + 2 :]) or None


def _map_items(m: _Map[_K, _V]) -> Iterable[tuple[_K, _V]]:
    if isinstance(m, dict):
        return m.items()
    if len(m) == 2:  # the usual map: one entry, which is its own (key, value) pair
        return (m,)
    return zip(m[::2], m[1::2], strict=True)


_new_object = object.__new__
_set_result_id = CacheResult.__dict__["id"].__set__
_set_result_created_at = CacheResult.__dict__["created_at"].__set__


def _result(id: str, created_at: float) -> CacheResult:
    """``CacheResult(id, created_at)`` in half the time: its slots are set directly,
    not through the frozen dataclass's ``object.__setattr__`` calls (one is made per
    read)."""
    result: CacheResult = _new_object(CacheResult)
    _set_result_id(result, id)
    _set_result_created_at(result, created_at)
    return result


def _links_without_indexed(
    links: dict[_Label, _Ids], labels: dict[str, tuple[_Label, ...]], gone: set[str]
) -> _Links | None:
    """``links`` (changed in place) without the targets ``gone``, through the
    parent's label index ``labels`` (also changed); ``None`` once no label is left.
    O(links removed)."""
    for target in gone:
        for label in labels.pop(target, ()):
            targets = links.get(label)
            if targets is None:
                continue
            rest = _ids_remove(targets, target)
            if rest is None:
                del links[label]
            else:
                links[label] = rest
    return links or None


def _label_index(links: dict[_Label, _Ids]) -> dict[str, tuple[_Label, ...]]:
    """Target -> the labels of ``links`` that link to it. O(links)."""
    index: dict[str, tuple[_Label, ...]] = {}
    for label, targets in links.items():
        for target in _ids_iter(targets):
            index[target] = (*index.get(target, ()), label)
    return index


def _links_without(links: _Links, gone: str | set[str]) -> _Links | None:
    """``links`` with the target ``gone`` (or every target in the set ``gone``)
    removed from every label's targets, dropping the labels left with none;
    ``None`` once no label is left. O(labels + targets removed): one pass, however
    many targets go, which is why a batch of releases removes them together."""
    out: _Links | None = links
    for label, targets in list(_map_items(links)):
        if isinstance(gone, str):
            if not _ids_has(targets, gone):
                continue
            rest = _ids_remove(targets, gone)
        else:
            hit = [t for t in _ids_iter(targets) if t in gone]
            if not hit:
                continue
            rest = targets
            for t in hit:
                assert rest is not None  # only emptied by its last target
                rest = _ids_remove(rest, t)
        assert out is not None  # only emptied after its last label
        out = _map_remove(out, label) if rest is None else _map_set(out, label, rest)
    return out


class InMemoryCacheStorage:
    """A :class:`CacheKeyStorage` in plain dictionaries and tuples. Its coroutines
    never checkpoint.

    Besides the keys that hold results or links, it keeps keys that are only link
    targets (they carry the backlinks); those are not reported by :meth:`exists` or
    :meth:`walk`. Iteration order is insertion order. Beyond the protocol,
    :meth:`release_many` releases a batch in one cascade (what a bounded cache's
    eviction uses), :meth:`exists_many` and :meth:`walk_links_many` read a batch of
    keys and of links and
    :meth:`add_many` stores a batch of results and links, each in one call (what a
    manager's batched query and save use).
    """

    __slots__ = ("_by_id", "_by_result", "_closed", "_labels")

    def __init__(self) -> None:
        self._by_id: dict[str, _Record] = {}
        # result ID -> the keys that hold it
        self._by_result: dict[str, _Ids] = {}
        # key ID -> target -> labels, for keys with many labels (see the top)
        self._labels: dict[str, dict[str, tuple[_Label, ...]]] = {}
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"keys={len(self._by_id)}"
        return f"<InMemoryCacheStorage {state} results={len(self._by_result)}>"

    def _live(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the cache key storage is closed")

    async def exists(self, id: str) -> bool:
        """O(1)."""
        self._live()
        record = self._by_id.get(id)
        return record is not None and (record[0] is not None or record[1] is not None)

    async def walk(self) -> list[str]:
        """O(number of keys)."""
        self._live()
        return [
            id
            for id, (results, links, _) in self._by_id.items()
            if results is not None or links is not None
        ]

    async def walk_results(self, id: str) -> list[CacheResult]:
        """O(results of the key)."""
        self._live()
        record = self._by_id.get(id)
        if record is None or record[0] is None:
            return []
        return [_result(rid, created_at) for rid, created_at in _map_items(record[0])]

    async def load(self, id: str, result_id: str) -> CacheResult:
        """O(1)."""
        self._live()
        record = self._by_id.get(id)
        if record is None:
            raise NotFoundError(f"no such cache key {id}")
        created_at = _map_get(record[0], result_id)
        if created_at is None:
            raise NotFoundError(f"no result {result_id} under cache key {id}")
        return _result(result_id, created_at)

    async def add_result(self, id: str, result: CacheResult) -> None:
        """O(1)."""
        self._live()
        self._add_result(id, result)

    def _add_result(self, id: str, result: CacheResult) -> None:
        record = self._by_id.get(id)
        if record is None:
            self._by_id[id] = ((result.id, result.created_at), None, None)
        else:
            results, links, backlinks = record
            self._by_id[id] = (_map_set(results, result.id, result.created_at), links, backlinks)
        self._by_result[result.id] = _ids_add(self._by_result.get(result.id), id)

    async def walk_ids_by_result(self, result_id: str) -> list[str]:
        """O(keys holding the result)."""
        self._live()
        ids = self._by_result.get(result_id)
        return [] if ids is None else list(_ids_iter(ids))

    async def release(self, result_id: str) -> None:
        """O(keys holding the result + keys deleted x links of their parents)."""
        self._live()
        self._delete_empty(self._remove_result(result_id))

    async def release_many(self, result_ids: Iterable[str]) -> None:
        """:meth:`release` each of ``result_ids``, with one cascade for them all: a
        key that loses several links (a base that many released keys were built
        on) is rewritten once. O(keys holding the results + keys deleted + links
        of the keys that lose links), where releasing one at a time costs the
        links of a parent once per key deleted below it."""
        self._live()
        emptied: list[str] = []
        for result_id in result_ids:
            emptied.extend(self._remove_result(result_id))
        self._delete_empty(emptied)

    def _remove_result(self, result_id: str) -> list[str]:
        """Remove ``result_id`` from every key that holds it; return the keys it
        leaves with neither results nor links (not deleted yet)."""
        ids = self._by_result.pop(result_id, None)
        if ids is None:
            return []
        emptied = []
        for id in _ids_iter(ids):
            # Nothing is deleted before the caller's cascade, so every key that
            # holds the result is still there.
            results, links, backlinks = self._by_id[id]
            assert results is not None
            results = _map_remove(results, result_id)
            self._by_id[id] = (results, links, backlinks)
            if results is None and links is None:
                emptied.append(id)
        return emptied

    def _delete_empty(self, pending: list[str]) -> None:
        # Round by round rather than recursively (a long chain of keys that hold
        # only links is emptied in one go, whatever its length): delete the empty
        # keys of a round, then rewrite each of their parents once, without every
        # deleted target; the parents left empty are the next round.
        while pending:
            lost: dict[str, set[str]] = {}
            for id in pending:
                record = self._by_id.get(id)
                if record is None or record[0] is not None or record[1] is not None:
                    continue
                del self._by_id[id]
                # The key has no links, so it is nobody's backlink: only its
                # parents refer to it (and none of them goes in this round: each
                # has a link).
                if record[2] is not None:
                    for parent_id in _ids_iter(record[2]):
                        lost.setdefault(parent_id, set()).add(id)
            pending = []
            for parent_id, gone in lost.items():
                parent = self._by_id.get(parent_id)
                if parent is None:
                    continue
                results, links, backlinks = parent
                labels = self._labels.get(parent_id)
                if labels is not None:
                    assert isinstance(links, dict)  # indexed while a dict
                    links = _links_without_indexed(links, labels, gone)
                    if links is None:
                        del self._labels[parent_id]
                    self._by_id[parent_id] = (results, links, backlinks)
                elif links is not None:
                    one_or_all = next(iter(gone)) if len(gone) == 1 else gone
                    links = _links_without(links, one_or_all)
                    self._by_id[parent_id] = (results, links, backlinks)
                if results is None and links is None:
                    pending.append(parent_id)

    async def add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        """O(1)."""
        self._live()
        self._add_link(id, link, target)

    def _add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        record = self._by_id.get(id)
        results, links, backlinks = (None, None, None) if record is None else record
        targets = _map_get(links, link)
        if targets is None:
            label: _Label = (*link,)  # an exact tuple: see the top of the module
            links = _map_set(links, label, target)
        elif _ids_has(targets, target):
            return
        else:
            links = _map_set(links, link, _ids_add(targets, target))
        self._by_id[id] = (results, links, backlinks)
        if isinstance(links, dict):
            index = self._labels.get(id)
            if index is None:
                # the links just grew into a dict: index them all, this one included
                self._labels[id] = _label_index(links)
            else:
                index[target] = (*index.get(target, ()), (*link,))
        # read after the write: the target may be the source itself
        dest = self._by_id.get(target)
        if dest is None:
            self._by_id[target] = (None, None, id)
        else:
            self._by_id[target] = (dest[0], dest[1], _ids_add(dest[2], id))

    async def walk_links(self, id: str, link: CacheInfoLink) -> list[str]:
        """O(targets of the link)."""
        self._live()
        record = self._by_id.get(id)
        targets = None if record is None else _map_get(record[1], link)
        if targets is None:
            return []
        return [targets] if isinstance(targets, str) else list(targets)

    async def exists_many(self, ids: Sequence[str]) -> list[bool]:
        """:meth:`exists` of each ID, in order. O(len(ids))."""
        self._live()
        by_id = self._by_id
        out: list[bool] = []
        for id in ids:
            record = by_id.get(id)
            out.append(record is not None and (record[0] is not None or record[1] is not None))
        return out

    async def walk_links_many(
        self, requests: Sequence[tuple[str, CacheInfoLink]]
    ) -> list[list[str]]:
        """:meth:`walk_links` of each ``(id, link)``, in order. O(sum of targets)."""
        self._live()
        by_id = self._by_id
        out: list[list[str]] = []
        for id, link in requests:
            record = by_id.get(id)
            targets = None if record is None else _map_get(record[1], link)
            if targets is None:
                out.append([])
            else:
                out.append([targets] if isinstance(targets, str) else list(targets))
        return out

    async def add_many(
        self,
        results: Sequence[tuple[str, CacheResult]],
        links: Sequence[tuple[str, CacheInfoLink, str]],
    ) -> None:
        """:meth:`add_result` of each ``(id, result)``, then :meth:`add_link` of each
        ``(id, link, target)``, in order, in one call (what a manager's batched save
        uses: the results first, so that no key is linked before it leads to one).
        O(len(results) + len(links))."""
        self._live()
        add_link = self._add_link
        for id, result in results:
            self._add_result(id, result)
        for id, link, target in links:
            add_link(id, link, target)

    async def has_link(self, id: str, link: CacheInfoLink, target: str) -> bool:
        """O(1)."""
        self._live()
        record = self._by_id.get(id)
        targets = None if record is None else _map_get(record[1], link)
        return targets is not None and _ids_has(targets, target)

    async def walk_backlinks(self, id: str) -> list[tuple[str, CacheInfoLink]]:
        """O(sum over the sources of their links)."""
        self._live()
        record = self._by_id.get(id)
        if record is None or record[2] is None:
            return []
        out: list[tuple[str, CacheInfoLink]] = []
        for source_id in _ids_iter(record[2]):
            source = self._by_id.get(source_id)
            if source is None or source[1] is None:
                continue
            for (input, output, digest, selector), targets in _map_items(source[1]):
                if _ids_has(targets, id):
                    normalised = CacheInfoLink(
                        input=input,
                        output=0,
                        digest=root_key(digest, output),
                        selector=selector,
                    )
                    out.append((source_id, normalised))
        return out

    async def close(self) -> None:
        """Drop everything; later use raises :class:`anyio.ClosedResourceError`.
        O(1), idempotent."""
        self._closed = True
        self._by_id = {}
        self._by_result = {}
        self._labels = {}

    def _lose_result(self, id: str, result_id: str) -> None:
        """Remove ``result_id`` from key ``id`` alone, leaving the key and the
        by-result index as they were (for tests: a store that lost a result)."""
        results, links, backlinks = self._by_id[id]
        assert results is not None
        self._by_id[id] = (_map_remove(results, result_id), links, backlinks)

    def _result_ids(self) -> list[str]:
        """Every result ID stored under some key (for tests). O(results)."""
        return list(self._by_result)

    def _check(self, *, leads_to_results: bool = False) -> None:
        """Assert every internal invariant (for tests). O(size of the graph).

        With ``leads_to_results``, also that every key reaches a key with results
        through links (itself included): what a manager that saves through
        :meth:`add_result` before linking, and releases only through
        :meth:`release`, leaves behind. It is what bounds the key graph by the
        results: a key from which no result can be reached is never deleted.
        """
        if self._closed:
            assert not self._by_id, "a closed storage holds no key"
            assert not self._by_result, "a closed storage holds no result"
            return
        if leads_to_results:
            # Walk backlinks up from every key with results: what is not reached
            # leads to no result.
            pending = [id for id, record in self._by_id.items() if record[0] is not None]
            reached = set(pending)
            while pending:
                backlinks = self._by_id[pending.pop()][2]
                for parent in () if backlinks is None else _ids_iter(backlinks):
                    if parent not in reached:
                        reached.add(parent)
                        pending.append(parent)
            dead = [id for id in self._by_id if id not in reached]
            assert not dead, f"{len(dead)} keys lead to no result, e.g. {dead[:3]}"
        for id, (results, links, backlinks) in self._by_id.items():
            # a key is kept only while it is useful, or while something links to it
            assert results or links or backlinks, f"empty key {id} left behind"
            if results is not None:
                _check_map(results)
                for result_id, created_at in _map_items(results):
                    assert isinstance(result_id, str), (id, result_id)
                    assert isinstance(created_at, int | float), (id, result_id, created_at)
                    by_result = self._by_result.get(result_id)
                    assert by_result is not None, f"{result_id} not indexed"
                    assert _ids_has(by_result, id), f"{result_id} not indexed under {id}"
            if links is not None:
                _check_map(links)
                for label, targets in _map_items(links):
                    assert type(label) is tuple, f"label {label!r} of {id} not an exact tuple"
                    _check_ids(targets)
                    for target in _ids_iter(targets):
                        dest = self._by_id.get(target)
                        assert dest is not None, f"{id} links to missing {target}"
                        assert dest[2] is not None, f"no backlinks {target}"
                        assert _ids_has(dest[2], id), f"no backlink {target}->{id}"
            if backlinks is not None:
                _check_ids(backlinks)
                for source_id in _ids_iter(backlinks):
                    source = self._by_id.get(source_id)
                    assert source is not None, f"backlink of {id} to missing {source_id}"
                    assert source[1] is not None, f"stale backlink {id}->{source_id}"
                    assert any(_ids_has(ts, id) for _, ts in _map_items(source[1])), (
                        f"stale backlink {id}->{source_id}"
                    )
        for id, index in self._labels.items():
            record = self._by_id.get(id)
            assert record is not None, f"label index of missing key {id}"
            assert isinstance(record[1], dict), f"label index of {id}, whose links are small"
            assert {t: set(ls) for t, ls in index.items()} == {
                t: set(ls) for t, ls in _label_index(record[1]).items()
            }, f"label index of {id} out of step"
        for id, (_, links, _) in self._by_id.items():
            assert not isinstance(links, dict) or id in self._labels, f"{id} not indexed"
        for result_id, ids in self._by_result.items():
            _check_ids(ids)
            for id in _ids_iter(ids):
                record = self._by_id.get(id)
                assert record is not None, f"{result_id} indexed under missing key {id}"
                assert _map_get(record[0], result_id) is not None, f"stale index {result_id}@{id}"


def _check_ids(ids: _Ids) -> None:
    if isinstance(ids, tuple):
        assert 2 <= len(ids) <= _SMALL, ids
        assert len(set(ids)) == len(ids), ids
        assert all(isinstance(i, str) for i in ids), ids
    elif isinstance(ids, dict):
        assert ids, "empty ID set"
        assert all(v is None for v in ids.values()), ids
    else:
        assert isinstance(ids, str), ids


def _check_map(m: _Map[Any, Any]) -> None:
    if isinstance(m, tuple):
        assert 2 <= len(m) <= 2 * _SMALL, m
        assert len(m) % 2 == 0, m
        keys = m[::2]
        assert len(set(keys)) == len(keys), m
    else:
        assert isinstance(m, dict), m
        assert m, "empty map"


class InMemoryResultStorage:
    """A :class:`ResultStorage` that keeps result handles in a dictionary.

    :meth:`save` keeps ``result.clone()`` under ``result.id`` (a second save of the
    same ID keeps the first handle and takes no other); :meth:`load` returns
    ``stored.clone()``. Releasing the stored handles is shielded from cancellation:
    once a release has begun it finishes.
    """

    __slots__ = ("_closed", "_results")

    def __init__(self) -> None:
        self._results: dict[str, Result] = {}
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"results={len(self._results)}"
        return f"<InMemoryResultStorage {state}>"

    def _live(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the result storage is closed")

    async def save(self, result: Result, created_at: float) -> CacheResult:
        """O(1). Never checkpoints."""
        self._live()
        if result.id not in self._results:
            self._results[result.id] = result.clone()
        return CacheResult(result.id, created_at)

    async def save_many(self, saves: Sequence[tuple[Result, float]]) -> list[CacheResult]:
        """:meth:`save` of each ``(result, created_at)``, in order, in one call (a
        manager's batched save). O(len(saves)). Never checkpoints."""
        self._live()
        stored = self._results
        out: list[CacheResult] = []
        for result, created_at in saves:
            id = result.id
            if id not in stored:
                stored[id] = result.clone()
            out.append(CacheResult(id, created_at))
        return out

    async def load(self, cache_result: CacheResult) -> Result:
        """O(1). Never checkpoints."""
        self._live()
        stored = self._results.get(cache_result.id)
        if stored is None:
            raise NotFoundError(f"result {cache_result.id} is not stored")
        return stored.clone()

    async def exists(self, result_id: str) -> bool:
        """O(1). Never checkpoints."""
        self._live()
        return result_id in self._results

    async def release(self, result_id: str) -> None:
        """O(1) plus the handle's release."""
        self._live()
        stored = self._results.pop(result_id, None)
        if stored is not None:
            with anyio.CancelScope(shield=True):
                await stored.release()

    def take(self, result_id: str) -> Result | None:
        """Remove ``result_id`` and hand its stored handle to the caller, who must
        release it (``None`` if it is not stored). For a caller that removes several
        results at once and releases the handles afterwards. O(1), synchronous."""
        self._live()
        return self._results.pop(result_id, None)

    def _ids(self) -> list[str]:
        """The stored result IDs (for tests). O(results)."""
        return list(self._results)

    async def close(self) -> None:
        """Release every stored handle once. O(stored results). Idempotent.

        A handle whose release fails does not stop the others; the first failure is
        raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        stored, self._results = self._results, {}
        first_error: Exception | None = None
        with anyio.CancelScope(shield=True):
            for result in stored.values():
                try:
                    await result.release()
                except Exception as exc:
                    _logger.exception("releasing cached result %s failed", result.id)
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error
