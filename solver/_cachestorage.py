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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio

from ._cache import CacheInfoLink, root_key

if TYPE_CHECKING:
    from ._result import Result

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


@dataclass(slots=True, eq=False)
class _Key:
    id: str
    # result ID -> result
    results: dict[str, CacheResult] = field(default_factory=dict)
    # link -> ordered set of target key IDs; never an empty set
    links: dict[CacheInfoLink, dict[str, None]] = field(default_factory=dict)
    # ordered set of the key IDs that link to this one
    backlinks: dict[str, None] = field(default_factory=dict)


class InMemoryCacheStorage:
    """A :class:`CacheKeyStorage` in plain dictionaries. Its coroutines never
    checkpoint.

    Besides the keys that hold results or links, it keeps keys that are only link
    targets (they carry the backlinks); those are not reported by :meth:`exists` or
    :meth:`walk`. Iteration order is insertion order.
    """

    __slots__ = ("_by_id", "_by_result", "_closed")

    def __init__(self) -> None:
        self._by_id: dict[str, _Key] = {}
        # result ID -> ordered set of key IDs that hold it; never an empty set
        self._by_result: dict[str, dict[str, None]] = {}
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
        key = self._by_id.get(id)
        return key is not None and bool(key.results or key.links)

    async def walk(self) -> list[str]:
        """O(number of keys)."""
        self._live()
        return [id for id, key in self._by_id.items() if key.results or key.links]

    async def walk_results(self, id: str) -> list[CacheResult]:
        """O(results of the key)."""
        self._live()
        key = self._by_id.get(id)
        return [] if key is None else list(key.results.values())

    async def load(self, id: str, result_id: str) -> CacheResult:
        """O(1)."""
        self._live()
        key = self._by_id.get(id)
        if key is None:
            raise NotFoundError(f"no such cache key {id}")
        result = key.results.get(result_id)
        if result is None:
            raise NotFoundError(f"no result {result_id} under cache key {id}")
        return result

    async def add_result(self, id: str, result: CacheResult) -> None:
        """O(1)."""
        self._live()
        key = self._by_id.get(id)
        if key is None:
            key = self._by_id[id] = _Key(id)
        key.results[result.id] = result
        self._by_result.setdefault(result.id, {})[id] = None

    async def walk_ids_by_result(self, result_id: str) -> list[str]:
        """O(keys holding the result)."""
        self._live()
        return list(self._by_result.get(result_id, ()))

    async def release(self, result_id: str) -> None:
        """O(keys holding the result + keys deleted x links of their parents)."""
        self._live()
        ids = self._by_result.pop(result_id, None)
        if ids is None:
            return
        for id in ids:
            # A key holding the result is not empty, so no earlier cascade of this
            # loop can have deleted it.
            key = self._by_id[id]
            del key.results[result_id]
            self._delete_if_empty(key)

    def _delete_if_empty(self, key: _Key) -> None:
        # A worklist rather than recursion: a long chain of keys that hold only links
        # is emptied in one go, whatever its length.
        pending = [key]
        while pending:
            key = pending.pop()
            if key.results or key.links or self._by_id.get(key.id) is not key:
                continue
            del self._by_id[key.id]
            # The key has no links, so it is nobody's backlink: only its parents
            # refer to it.
            for parent_id in key.backlinks:
                parent = self._by_id.get(parent_id)
                if parent is None:
                    continue
                for link in [link for link, ts in parent.links.items() if key.id in ts]:
                    targets = parent.links[link]
                    del targets[key.id]
                    if not targets:
                        del parent.links[link]
                pending.append(parent)

    async def add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        """O(1)."""
        self._live()
        source = self._by_id.get(id)
        if source is None:
            source = self._by_id[id] = _Key(id)
        dest = self._by_id.get(target)
        if dest is None:
            dest = self._by_id[target] = _Key(target)
        source.links.setdefault(link, {})[target] = None
        dest.backlinks[id] = None

    async def walk_links(self, id: str, link: CacheInfoLink) -> list[str]:
        """O(targets of the link)."""
        self._live()
        key = self._by_id.get(id)
        if key is None:
            return []
        return list(key.links.get(link, ()))

    async def has_link(self, id: str, link: CacheInfoLink, target: str) -> bool:
        """O(1)."""
        self._live()
        key = self._by_id.get(id)
        return key is not None and target in key.links.get(link, ())

    async def walk_backlinks(self, id: str) -> list[tuple[str, CacheInfoLink]]:
        """O(sum over the sources of their links)."""
        self._live()
        key = self._by_id.get(id)
        if key is None:
            return []
        out: list[tuple[str, CacheInfoLink]] = []
        for source_id in key.backlinks:
            source = self._by_id.get(source_id)
            if source is None:
                continue
            for link, targets in source.links.items():
                if id in targets:
                    normalised = CacheInfoLink(
                        input=link.input,
                        output=0,
                        digest=root_key(link.digest, link.output),
                        selector=link.selector,
                    )
                    out.append((source_id, normalised))
        return out

    async def close(self) -> None:
        """Drop everything; later use raises :class:`anyio.ClosedResourceError`.
        O(1), idempotent."""
        self._closed = True
        self._by_id = {}
        self._by_result = {}

    def _check(self) -> None:
        """Assert every internal invariant (for tests). O(size of the graph)."""
        for id, key in self._by_id.items():
            assert key.id == id, (id, key.id)
            # a key is kept only while it is useful, or while something links to it
            assert key.results or key.links or key.backlinks, f"empty key {id} left behind"
            for result_id, result in key.results.items():
                assert result.id == result_id, (result_id, result)
                assert id in self._by_result.get(result_id, ()), f"{result_id} not indexed"
            for link, targets in key.links.items():
                assert targets, f"empty link bucket {link} in {id}"
                for target in targets:
                    assert target in self._by_id, f"{id} links to missing {target}"
                    assert id in self._by_id[target].backlinks, f"no backlink {target}->{id}"
            for source_id in key.backlinks:
                source = self._by_id.get(source_id)
                assert source is not None, f"backlink of {id} to missing {source_id}"
                assert any(id in ts for ts in source.links.values()), (
                    f"stale backlink {id}->{source_id}"
                )
        for result_id, ids in self._by_result.items():
            assert ids, f"empty by-result bucket {result_id}"
            for id in ids:
                assert id in self._by_id, f"{result_id} indexed under missing key {id}"
                assert result_id in self._by_id[id].results, f"stale index {result_id}@{id}"


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
