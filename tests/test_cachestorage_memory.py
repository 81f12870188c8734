"""The in-memory key storage's compact layout: what it holds, what the cyclic
collector sees of it, and that its small and large forms behave as plain ordered
dicts would (a reference model, checked operation by operation)."""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc

import pytest

from solver._cache import CacheInfoLink, root_key
from solver._digest import digest_of
from solver.cache._storage import _SMALL, CacheResult, InMemoryCacheStorage


def dgst(s: str) -> str:
    return digest_of(s.encode())


class ModelStorage:
    """The key storage as dicts of ordered dicts: the order every walk must keep."""

    def __init__(self) -> None:
        self.keys: dict[str, None] = {}  # every key, in order of creation
        self.results: dict[str, dict[str, float]] = {}
        self.links: dict[str, dict[CacheInfoLink, dict[str, None]]] = {}
        self.backlinks: dict[str, dict[str, None]] = {}
        self.by_result: dict[str, dict[str, None]] = {}

    def _touch(self, id: str) -> None:
        self.keys.setdefault(id, None)
        self.results.setdefault(id, {})
        self.links.setdefault(id, {})
        self.backlinks.setdefault(id, {})

    def walk(self) -> list[str]:
        return [k for k in self.keys if self.results[k] or self.links[k]]

    def add_result(self, id: str, result_id: str, created_at: float) -> None:
        self._touch(id)
        self.results[id][result_id] = created_at
        self.by_result.setdefault(result_id, {})[id] = None

    def add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        self._touch(id)
        self._touch(target)
        self.links[id].setdefault(link, {})[target] = None
        self.backlinks[target][id] = None

    def release(self, result_id: str) -> None:
        pending: list[str] = []
        for id in self.by_result.pop(result_id, {}):
            del self.results[id][result_id]
            pending.append(id)
            while pending:
                k = pending.pop()
                if k not in self.keys or self.results[k] or self.links[k]:
                    continue
                del self.keys[k]
                for parent in self.backlinks[k]:
                    if parent not in self.keys:
                        continue
                    for link in list(self.links[parent]):
                        self.links[parent][link].pop(k, None)
                        if not self.links[parent][link]:
                            del self.links[parent][link]
                    pending.append(parent)
                del self.results[k], self.links[k], self.backlinks[k]

    def backlinks_of(self, id: str) -> list[tuple[str, CacheInfoLink]]:
        if id not in self.keys:
            return []
        return [
            (source, link._replace(output=0, digest=root_key(link.digest, link.output)))
            for source in self.backlinks[id]
            if source in self.keys
            for link, targets in self.links[source].items()
            if id in targets
        ]


async def assert_same(
    st: InMemoryCacheStorage,
    model: ModelStorage,
    links: list[CacheInfoLink],
    keys: list[str],
    result_ids: list[str],
) -> None:
    assert await st.walk() == model.walk()
    for id in keys:
        assert await st.exists(id) == (id in model.walk()), id
        expected = [CacheResult(r, t) for r, t in model.results.get(id, {}).items()]
        assert await st.walk_results(id) == expected, id
        assert await st.walk_backlinks(id) == model.backlinks_of(id), id
        for link in links:
            targets = list(model.links.get(id, {}).get(link, {}))
            assert await st.walk_links(id, link) == targets, (id, link)
    for result_id in result_ids:
        assert await st.walk_ids_by_result(result_id) == list(model.by_result.get(result_id, {}))


@pytest.mark.anyio
async def test_orders_match_ordered_dicts_across_the_small_and_large_forms() -> None:
    # Enough keys, labels and results that sets and maps grow past _SMALL and shrink
    # back, with every walk compared to the model's order as it goes.
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(3 * _SMALL)]
    result_ids = [f"r{i}" for i in range(2 * _SMALL)]
    links = [
        CacheInfoLink(i % 3, i % 2, dgst(f"op{i}"), "sel" if i % 4 == 0 else None)
        for i in range(_SMALL + 4)
    ]
    st = InMemoryCacheStorage()
    model = ModelStorage()
    largest = {"links": 0, "targets": 0, "backlinks": 0, "results": 0, "by_result": 0}
    hot = keys[:2]  # keys that most operations touch, so that their fields grow

    def key() -> str:
        return rng.choice(hot if rng.random() < 0.5 else keys)

    for step in range(700):
        op = rng.random()
        if op < 0.3:
            id, result_id = key(), rng.choice(result_ids)
            await st.add_result(id, CacheResult(result_id, float(step)))
            model.add_result(id, result_id, float(step))
            assert await st.load(id, result_id) == CacheResult(result_id, float(step))
        elif op < 0.9:
            id, target = key(), rng.choice(keys)
            link = links[0] if rng.random() < 0.5 else rng.choice(links)
            await st.add_link(id, link, target)
            model.add_link(id, link, target)
            assert await st.has_link(id, link, target)
        else:
            result_id = rng.choice(result_ids)
            await st.release(result_id)
            model.release(result_id)
        st._check()
        for id in model.keys:
            largest["links"] = max(largest["links"], len(model.links[id]))
            largest["results"] = max(largest["results"], len(model.results[id]))
            largest["backlinks"] = max(largest["backlinks"], len(model.backlinks[id]))
            for targets in model.links[id].values():
                largest["targets"] = max(largest["targets"], len(targets))
        for ids in model.by_result.values():
            largest["by_result"] = max(largest["by_result"], len(ids))
        if step % 25 == 0:
            await assert_same(st, model, links, keys, result_ids)
    await assert_same(st, model, links, keys, result_ids)
    # every field went through its dict form
    assert all(n > _SMALL for n in largest.values()), largest
    for result_id in result_ids:
        await st.release(result_id)
        model.release(result_id)
    st._check()
    await assert_same(st, model, links, keys, result_ids)


@pytest.mark.anyio
async def test_release_many_around_a_large_base_matches_the_model() -> None:
    # A base that many keys were built on (its links a dict, so indexed by target),
    # each key linked under a label of its own and under one shared label, with a
    # key on each holding a result: releasing a batch, then one at a time, deletes
    # what the model deletes and drops exactly the links to the deleted keys.
    n = 4 * _SMALL
    own = [CacheInfoLink(0, 0, dgst(f"op{i}")) for i in range(n)]
    shared = CacheInfoLink(1, 0, dgst("shared"))
    links = [*own, shared]
    keys = ["base", *(f"c{i}" for i in range(n)), *(f"g{i}" for i in range(n))]
    result_ids = ["base-r", *(f"r{i}" for i in range(n))]
    st, model = InMemoryCacheStorage(), ModelStorage()
    for i in range(n):
        for id, link, target in (
            ("base", own[i], f"c{i}"),
            ("base", shared, f"c{i}"),
            (f"c{i}", own[i], f"g{i}"),
        ):
            await st.add_link(id, link, target)
            model.add_link(id, link, target)
        await st.add_result(f"g{i}", CacheResult(f"r{i}", 1.0))
        model.add_result(f"g{i}", f"r{i}", 1.0)
    await st.add_result("base", CacheResult("base-r", 1.0))
    model.add_result("base", "base-r", 1.0)
    assert isinstance(st._by_id["base"][1], dict)
    st._check()

    batch = [f"r{i}" for i in range(0, n, 2)]
    await st.release_many(batch)
    for result_id in batch:
        model.release(result_id)
    st._check()
    await assert_same(st, model, links, keys, result_ids)
    assert len(await st.walk_links("base", shared)) == n // 2

    for i in range(1, n, 2):
        await st.release(f"r{i}")
        model.release(f"r{i}")
        st._check()
    await assert_same(st, model, links, keys, result_ids)
    assert await st.walk() == ["base"]  # it still holds its own result
    await st.release_many(["base-r", "unknown"])
    assert await st.walk() == []
    assert st._labels == {}
    st._check()


def reachable(roots: list[object]) -> list[object]:
    seen: dict[int, object] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        stack.extend(gc.get_referents(obj))
    return list(seen.values())


class Lattice:
    """The shape a build stores: layers of keys, each key with a result and linked
    from two keys of the layer below (so two links out and two backlinks in a key).
    The IDs and digests are made up front: they are the caller's strings."""

    def __init__(self, width: int, layers: int) -> None:
        self.width = width
        self.layers = [[root_key(dgst(f"leaf{i}"), 0) for i in range(width)]]
        self.layers += [[f"key-{n}-{i}" for i in range(width)] for n in range(1, layers)]
        self.digests = {id: dgst(f"op-{id}") for layer in self.layers for id in layer}
        self.result_ids = {id: f"res-{id}" for layer in self.layers for id in layer}
        self.created_at = 1.5

    async def store(self, st: InMemoryCacheStorage) -> None:
        for below, here in zip(self.layers, self.layers[1:], strict=False):
            for i, id in enumerate(here):
                digest = self.digests[id]
                await st.add_link(below[i], CacheInfoLink(0, 0, digest), id)
                await st.add_link(below[(i + 1) % self.width], CacheInfoLink(1, 0, digest), id)
        for layer in self.layers:
            for id in layer:
                await st.add_result(id, CacheResult(self.result_ids[id], self.created_at))


@pytest.mark.anyio
async def test_nothing_the_storage_holds_is_tracked_by_the_collector() -> None:
    st = InMemoryCacheStorage()
    await Lattice(width=5, layers=4).store(st)
    st._check()
    # A collection untracks a tuple only if what it holds was untracked before it got
    # to it: the records nest three deep (record, links, label).
    for _ in range(3):
        gc.collect()
    roots: list[object] = [st._by_id, st._by_result]
    held = [o for o in reachable(roots) if all(o is not r for r in roots)]
    assert held
    assert [o for o in held if gc.is_tracked(o)] == []
    assert {type(o) for o in held} <= {str, float, int, tuple, type(None)}


@pytest.mark.anyio
async def test_the_callers_link_and_result_objects_are_not_kept() -> None:
    st = InMemoryCacheStorage()
    link = CacheInfoLink(0, 0, dgst("op"))  # a named tuple: tracked as long as it lives
    result = CacheResult("r", 1.0)  # a class instance: tracked as long as it lives
    link_refs, result_refs = sys.getrefcount(link), sys.getrefcount(result)
    await st.add_link("a", link, "b")
    await st.add_result("b", result)
    assert sys.getrefcount(link) == link_refs
    assert sys.getrefcount(result) == result_refs
    # what is handed back is equal, and of the public types
    assert await st.walk_results("b") == [result]
    assert await st.load("b", "r") == result
    [(source, back)] = await st.walk_backlinks("b")
    assert source == "a"
    assert type(back) is CacheInfoLink
    assert back == CacheInfoLink(0, 0, root_key(link.digest, 0), None)


@pytest.mark.anyio
async def test_a_stored_key_costs_under_600_bytes() -> None:
    # 1,000 keys shaped as a build stores them: everything the storage keeps, the
    # link labels and results handed to it included, the caller's strings not
    # (the object-and-dicts-per-key layout took about 1,300 bytes a key here).
    lattice = Lattice(width=100, layers=10)
    gc.collect()
    tracemalloc.start()
    try:
        st = InMemoryCacheStorage()
        before = tracemalloc.get_traced_memory()[0]
        await lattice.store(st)
        gc.collect()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / 1000
    finally:
        tracemalloc.stop()
    assert len(st._by_id) == 1000
    st._check()
    assert per_key < 600, per_key
