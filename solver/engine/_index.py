"""The live edge index: which active edge owns which cache key right now.

It mirrors the key/link graph of the cache (see ``_cache.py``) for *live* edges
only, so that two edges whose keys turn out equal find each other and merge, and
equal work behind different vertex digests runs once. Root keys use their
``root_key`` as item ID; a deeper key is found by intersecting the links from
every input's index IDs, exactly as a cache manager matches stored keys.

Items are garbage-collected when they have no edge and no links. All methods run
on the event loop from the scheduler, so there is no lock.

The index is on the hot path (every edge is indexed once its inputs have keys,
and again when they complete), so it is kept lean: item IDs of keys with deps
are small integers from a counter (never equal to a root key's digest string),
a link is a plain tuple ``(input, output, digest, selector)`` (equal to, and
hashed as, the ``CacheInfoLink`` with those fields), and the targets of a link
and the deps of an item are short tuples rather than sets (a tuple of strings
and integers is not tracked by the cyclic garbage collector, and a large build
keeps many of them alive).

An edge the cold path completes is stored *later* (:meth:`EdgeIndex.store_later`):
nothing else is live while the cold path runs (it runs only then), so nobody
can look an equal key up until another build starts, and most cold builds are
discarded before one does. Its key waits in a dict of pending edges (one object
for the whole build, instead of an item, links and tuples per vertex: about 0.65
KiB and two GC-tracked objects per vertex of a cold lattice, and about a tenth of
its time); the first ``load_or_store`` indexes every pending key, in the order
they were stored, exactly as storing each at once would have; releasing a pending
edge only forgets it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol

from .._cache import CacheKey, root_key

if TYPE_CHECKING:
    # type-only: _edge builds on this module (the index holds edges)
    from ._edge import ActiveEdge

__all__ = ["EdgeIndex"]

# An item ID: a root key's digest string, or an integer for a key with deps.
ItemID = str | int
_Link = tuple[int, int, str, "str | None"]


class PendingEdge(Protocol):
    """What :meth:`EdgeIndex.store_later` keeps: an edge, or what makes one (a
    vertex state whose completed edge is made when first asked for)."""

    def pending_edge(self) -> ActiveEdge: ...


class _Item:
    __slots__ = ("deps", "edge", "links")

    def __init__(self) -> None:
        self.edge: ActiveEdge | None = None
        self.links: dict[_Link, tuple[ItemID, ...]] = {}
        # (item, link) of every link to this one, to drop them when this one goes
        # (only those: an item may have many other links)
        self.deps: tuple[tuple[ItemID, _Link], ...] = ()


class EdgeIndex:
    """Index of live edges by cache key. ``load_or_store`` is O(links of the key)."""

    __slots__ = ("_back_refs", "_ids", "_items", "_pending")

    def __init__(self) -> None:
        self._items: dict[ItemID, _Item] = {}
        self._back_refs: dict[ActiveEdge, tuple[ItemID, ...]] = {}
        self._ids = itertools.count(1)
        # edges stored later (see the module's docstring), in order, with their keys
        self._pending: dict[PendingEdge, CacheKey] = {}

    def __len__(self) -> int:
        """Items and pending edges: 0 only when no edge is (to be) indexed."""
        return len(self._items) + len(self._pending)

    def store_later(self, key: CacheKey, edge: PendingEdge) -> None:
        """Store ``edge.pending_edge()`` as the owner of ``key`` before the next
        ``load_or_store`` (which can then find it), as ``load_or_store`` would
        now; for an edge completed while no other edge is live. O(1)."""
        self._pending[edge] = key

    def forget(self, edge: PendingEdge) -> None:
        """Drop a pending ``edge`` (released before it was stored). O(1)."""
        if self._pending:
            self._pending.pop(edge, None)

    def _store_pending(self) -> None:
        pending = self._pending
        self._pending = {}
        for edge, key in pending.items():
            self.load_or_store(key, edge.pending_edge())

    def release(self, edge: ActiveEdge) -> None:
        """Drop every slot ``edge`` owns; items left with no edge and no links go,
        and so, in turn, do the items only they linked to (iteratively)."""
        if self._pending and self._pending.pop(edge, None) is not None:
            return
        for item_id in self._back_refs.pop(edge, ()):
            item = self._items.get(item_id)
            if item is None:
                continue
            item.edge = None
            if not item.links:
                self._drop(item_id, item)

    def _drop(self, item_id: ItemID, item: _Item) -> None:
        items = self._items
        stack = [(item_id, item)]
        while stack:
            iid, it = stack.pop()
            if items.get(iid) is not it:
                continue
            del items[iid]
            for dep_id, link in it.deps:
                dep = items.get(dep_id)
                if dep is None:
                    continue
                links = dep.links
                targets = links.get(link)
                if targets is not None and iid in targets:
                    targets = tuple([t for t in targets if t != iid])
                    if targets:
                        links[link] = targets
                    else:
                        del links[link]
                if dep.edge is None and not links:
                    stack.append((dep_id, dep))

    def load_or_store(self, key: CacheKey, edge: ActiveEdge) -> ActiveEdge | None:
        """Return another live edge that owns ``key``, or store ``edge`` as its owner.

        An ignore-cache edge takes over the slot of a normal one instead of joining it.
        """
        if self._pending:
            self._store_pending()
        self._index_deps(key)
        plan = self._plan(key)
        ids = self._matches(key, plan)
        items = self._items
        old_id: ItemID | None = None
        old: ActiveEdge | None = None
        for item_id in ids:
            item = items.get(item_id)
            if item is not None and item.edge is not edge and item.edge is not None:
                old_id, old = item_id, item.edge
        if old is not None and old_id is not None and (old.ignore_cache or not edge.ignore_cache):
            self._link(old_id, plan)
            return old

        item_id = ids[0] if ids else next(self._ids)
        main = self._link(item_id, plan)
        main.edge = edge
        if not key.index_ids:
            # A key saved under (the cold path indexes its commit key) is the
            # dep of its consumers' keys: indexed here, _index_deps need not
            # walk it again for each of them.
            key.index_ids = (item_id,)
        refs = self._back_refs.get(edge, ())
        if item_id not in refs:
            self._back_refs[edge] = (*refs, item_id)
        return None

    def _index_deps(self, key: CacheKey) -> None:
        """Give every key below ``key`` its index IDs, deepest first (iteratively, so
        a deep chain of keys never recurses)."""
        # The common case: every dep key is indexed already (it is another live
        # edge's key, or a key found for it).
        for alternatives in key.deps:
            for dep in alternatives:
                if not dep.key.key.index_ids:
                    break
            else:
                continue
            break
        else:
            return
        order: list[CacheKey] = []
        seen: set[int] = {id(key)}
        stack: list[tuple[CacheKey, bool]] = [(key, False)]
        while stack:
            k, expanded = stack.pop()
            if expanded:
                order.append(k)
                continue
            stack.append((k, True))
            for alternatives in k.deps:
                for dep in alternatives:
                    dk = dep.key.key
                    if not dk.index_ids and id(dk) not in seen:
                        seen.add(id(dk))
                        stack.append((dk, False))
        for k in order:
            if k is key or k.index_ids:
                continue
            plan = self._plan(k)
            matches = self._matches(k, plan)
            k.index_ids = matches if matches else (next(self._ids),)
            for item_id in k.index_ids:
                self._link(item_id, plan)

    def _plan(self, key: CacheKey) -> list[list[tuple[_Link, ItemID, _Item]]]:
        """For each input of ``key``: the link from it to ``key`` through each of its
        alternatives, with each live item of that alternative (dep keys have their
        index IDs already). Made once, read by _matches and _link."""
        items = self._items
        output = key.output
        digest = key.digest
        plan: list[list[tuple[_Link, ItemID, _Item]]] = []
        for i, alternatives in enumerate(key.deps):
            entries: list[tuple[_Link, ItemID, _Item]] = []
            for dep in alternatives:
                link = (i, output, digest, dep.selector)
                for dep_id in dep.key.key.index_ids:
                    item = items.get(dep_id)
                    if item is not None:
                        entries.append((link, dep_id, item))
            plan.append(entries)
        return plan

    def _link(self, item_id: ItemID, plan: list[list[tuple[_Link, ItemID, _Item]]]) -> _Item:
        """Make ``item_id`` the target of the links of ``plan`` (see _plan); return
        its item."""
        items = self._items
        main = items.get(item_id)
        if main is None:
            main = items[item_id] = _Item()
        known: dict[tuple[ItemID, _Link], None] = dict.fromkeys(main.deps)
        for entries in plan:
            for link, dep_id, item in entries:
                links = item.links
                targets = links.get(link)
                if targets is None:
                    links[link] = (item_id,)
                elif item_id not in targets:
                    links[link] = (*targets, item_id)
                known[dep_id, link] = None
        if len(known) != len(main.deps):
            main.deps = tuple(known)
        return main

    def _matches(
        self, key: CacheKey, plan: list[list[tuple[_Link, ItemID, _Item]]]
    ) -> tuple[ItemID, ...]:
        """IDs of items reachable by links from every input of ``key``, through any
        of its alternatives (``plan``, see _plan), in the order the first input
        reaches them."""
        if not key.deps:
            return (root_key(key.digest, key.output),)
        matches: dict[ItemID, None] | None = None
        for entries in plan:
            reached: dict[ItemID, None] = {}
            for link, _, item in entries:
                targets = item.links.get(link)
                if targets:
                    reached.update(dict.fromkeys(targets))
            matches = reached if matches is None else {m: None for m in matches if m in reached}
            if not matches:
                return ()
        assert matches is not None
        return tuple(matches)

    def _check(self) -> None:
        """Assert the internal invariants (tests call this)."""
        for edge in self._pending:
            assert edge not in self._back_refs, "a pending edge is indexed"
        for edge, ids in self._back_refs.items():
            for item_id in ids:
                item = self._items.get(item_id)
                assert item is None or item.edge is None or item.edge is edge
        for item_id, item in self._items.items():
            for targets in item.links.values():
                assert targets, f"empty link set left on {item_id}"
                assert len(set(targets)) == len(targets), f"duplicate link on {item_id}"
