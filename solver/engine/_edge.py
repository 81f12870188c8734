"""The state machine of one active edge (one output of one active vertex).

After BuildKit's ``solver/edge.go``. An edge moves through four states:

``initial`` -> ``cache-fast`` -> ``cache-slow`` -> ``complete``

* cache-fast: the keys computed from definitions (cache maps) are known;
* cache-slow: content ("slow") keys of the inputs have been considered too, so
  every key this edge can have is known;
* complete: a result exists, loaded from a cache record or executed.

A failure is kept apart in ``err``. Requesters (build callers and parent edges)
ask for a desired state; the edge asks its inputs only for as much as it needs:
an input is asked for cache-fast first, pushed further only when its keys could
still lead to a match, and inputs whose definition keys already matched compute
their content keys last (the "two-phase" order). A record found for a key is
loaded only when a requester wants ``complete``, and then the inputs are not
needed at all, which is why a cached 1000-vertex graph loads a single record.

Every method runs on the dispatcher (see ``_scheduler.py``); only the cache calls
await.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._cache import CacheExporter, CacheKey, CacheKeyWithSelector, CacheRecord, ExportableCacheKey
from .._errors import SolveError
from .._graph import Edge, Vertex
from .._refs import CachedResultWithKeys, SharedCachedResult
from ..cache import KeyExporter, MergedExporter, best_record
from ._scheduler import (
    CACHE_FAST,
    CACHE_SLOW,
    COMPLETE,
    INITIAL,
    STATE_NAMES,
    Canceled,
    Pipe,
    Scheduler,
    logger,
)

if TYPE_CHECKING:
    from .._cache import CacheManager
    from .._op import CacheMap
    from .._result import Result

    # type-only: the index and the shared op hold edges and are handed to them
    from ._index import EdgeIndex
    from ._sharedop import SharedOp

__all__ = ["ActiveEdge"]


# Shared empty containers for the fields most edges never fill: a field starts
# as one of these and gets its own container on its first write, so an edge
# costs a few pointers where it would cost a few empty dicts and sets. Never
# write to them.
_NO_KEY_MAP: dict[str, CacheKey] = {}
_NO_RECORDS: dict[str, CacheRecord] = {}
_NO_IDS: frozenset[str] = frozenset()
_NO_MATCHED: dict[str, None] = {}
# What ``cache_map_req`` and ``exec_req`` hold once answered for good (only its
# identity is ever used): the answered pipe itself need not be kept.
_ANSWERED: Pipe = Pipe.__new__(Pipe)


class _Dep:
    """What an edge knows about one of its inputs."""

    __slots__ = (
        "err",
        "index",
        "key_map",
        "keys",
        "nkeys",
        "req",
        "result",
        "selector",
        "slow_cache_complete",
        "slow_cache_found_key",
        "slow_cache_key",
        "slow_cache_req",
        "slow_fn",
        "state",
    )

    def __init__(self, index: int, cache_map: CacheMap | None) -> None:
        self.index = index
        self.req: Pipe | None = None
        self.state = INITIAL
        self.result: SharedCachedResult | None = None
        # The input's keys this edge has seen: the first ``nkeys`` of the input
        # edge's own key list (which only grows), shared rather than copied.
        self.keys: Sequence[ExportableCacheKey] = ()
        self.nkeys = 0
        # candidate keys of the parent reachable from this input, by ID
        self.key_map: dict[str, CacheKey] = _NO_KEY_MAP
        self.slow_cache_req: Pipe | None = None
        self.slow_cache_complete = False
        self.slow_cache_found_key = False
        self.slow_cache_key: ExportableCacheKey | None = None
        self.err: BaseException | None = None
        # from the edge's cache map (None while it has none): the selector of
        # the link from this input and its content-key function
        self.selector: str | None = None
        self.slow_fn: Any = None
        if cache_map is not None:
            dep = cache_map.deps[index]
            self.selector = dep.selector
            self.slow_fn = dep.compute_digest


def _seen_keys(d: _Dep) -> Sequence[ExportableCacheKey]:
    keys = d.keys
    return keys if len(keys) == d.nkeys else keys[: d.nkeys]


def _with_selector(
    keys: Sequence[ExportableCacheKey], selector: str | None
) -> list[CacheKeyWithSelector]:
    return [CacheKeyWithSelector(k, selector) for k in keys]


def _slow_incomplete(d: _Dep) -> bool:
    """Whether an input still owes its content key."""
    return d.slow_fn is not None and (
        d.state == CACHE_SLOW or (d.state == COMPLETE and not d.slow_cache_complete)
    )


class ActiveEdge:
    """One output of one active vertex, shared by every job that loaded it."""

    __slots__ = (
        "all_deps_completed",
        "all_deps_completed_cache_fast",
        "all_deps_completed_cache_slow",
        "all_deps_state_cache_slow",
        "cache_map",
        "cache_map_digests",
        "cache_map_done",
        "cache_map_index",
        "cache_map_req",
        "cache_records",
        "cache_records_loaded",
        "commit_keys",
        "deps",
        "edge",
        "err",
        "exec_cache_load",
        "exec_req",
        "failed",
        "has_active_outgoing",
        "ignore_cache",
        "incoming",
        "index",
        "key_map",
        "keys",
        "keys_cursor",
        "keys_did_change",
        "loading_record",
        "no_cache_match_possible",
        "op",
        "outgoing",
        "owner",
        "queued",
        "releaser_count",
        "result",
        "secondary_exporters",
        "secondary_keys",
        "state",
    )

    def __init__(self, edge: Edge, op: SharedOp, index: EdgeIndex) -> None:
        self.edge = edge
        self.op = op
        self.index = index
        self.ignore_cache = edge.vertex.options.ignore_cache
        # the state every requester sees
        self.state = INITIAL
        self.result: SharedCachedResult | None = None
        self.cache_map: CacheMap | None = None
        self.keys: list[ExportableCacheKey] = []

        self.deps: list[_Dep] | None = None
        self.cache_map_req: Pipe | None = None
        self.cache_map_done = False
        self.cache_map_index = 0
        self.cache_map_digests: list[str] | None = None  # root edges only
        self.exec_req: Pipe | None = None
        self.exec_cache_load = False
        self.commit_keys: Sequence[CacheKey] = ()
        self.err: BaseException | None = None
        self.cache_records: dict[str, CacheRecord] = _NO_RECORDS
        self.cache_records_loaded: set[str] | frozenset[str] = _NO_IDS
        self.loading_record = ""
        # IDs of the stored keys every input leads to (a dict of strings, which
        # the cyclic GC does not track, rather than a set, which it does)
        self.key_map: dict[str, None] = _NO_MATCHED

        self.no_cache_match_possible = False
        self.all_deps_completed_cache_fast = False
        self.all_deps_completed_cache_slow = False
        self.all_deps_state_cache_slow = False
        self.all_deps_completed = False
        self.has_active_outgoing = False
        # the scheduler's bookkeeping: open requests to and from this edge, and
        # whether it is waiting to be dispatched
        self.incoming: list[Pipe] | tuple[()] = ()
        self.outgoing: list[Pipe] | tuple[()] = ()
        self.queued = False

        self.releaser_count = 0
        self.owner: ActiveEdge | None = None
        self.keys_did_change = False
        # all_deps_have_keys(False), all_deps_have_keys(True): every dep before
        # these indexes is known to have keys (see all_deps_have_keys)
        # (made on the first scan: an edge completed by the cold path never scans)
        self.keys_cursor: list[int] | None = None
        # made when first needed: a merge adds to it, a result's exporters read it
        self.secondary_exporters: list[tuple[int, CacheKeyWithSelector]] | None = None
        # how many of the first ``keys`` have exporters that read that list, bound
        # when it is made (see complete)
        self.secondary_keys = 0
        self.failed = False

    def __repr__(self) -> str:
        return (
            f"<ActiveEdge {self.edge.vertex.name!r}[{self.edge.index}] "
            f"{STATE_NAMES[self.state]}{' failed' if self.err else ''}>"
        )

    def pending_edge(self) -> ActiveEdge:
        """This edge (for :meth:`EdgeIndex.store_later`)."""
        return self

    # -- ownership ---------------------------------------------------------------
    def take_ownership(self, old: ActiveEdge) -> None:
        """Called when ``old`` is merged into this edge."""
        self.releaser_count += old.releaser_count + 1
        old.owner = self
        old.release_result()

    def release(self) -> None:
        if self.releaser_count > 0:
            self.releaser_count -= 1
            return
        self.release_result()

    def release_result(self) -> None:
        self.index.release(self)
        if self.result is not None:
            result, self.result = self.result, None
            self.op.release_later(result)

    def _secondary(self) -> list[tuple[int, CacheKeyWithSelector]]:
        secondary = self.secondary_exporters
        if secondary is None:
            secondary = self.secondary_exporters = []
            for i in range(self.secondary_keys):
                _bind_secondary(self.keys[i].exporter, secondary)
        return secondary

    def add_secondary_exporters(self, src: ActiveEdge) -> None:
        if src.deps is None or src.cache_map is None:
            return
        secondary = self._secondary()
        for i, d in enumerate(src.deps):
            sel = src.cache_map.deps[i].selector if i < len(src.cache_map.deps) else None
            for k in _seen_keys(d):
                secondary.append((i, CacheKeyWithSelector(k, sel)))
            if d.slow_cache_key is not None:
                secondary.append((i, CacheKeyWithSelector(d.slow_cache_key)))
            if d.result is not None:
                for dk in d.result.cache_keys:
                    secondary.append((i, CacheKeyWithSelector(dk, sel)))

    # -- helpers -----------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.err is not None or self.result is not None

    def is_dep(self, other: ActiveEdge) -> bool:
        return _is_dep(self.edge.vertex, other.edge.vertex.digest, {})

    def _cache(self) -> CacheManager:
        return self.op.cache()

    def _set_cache_map(self, cache_map: CacheMap | None) -> None:
        self.cache_map = cache_map
        for d in self.deps or ():
            if cache_map is None:
                d.selector = d.slow_fn = None
            else:
                dep = cache_map.deps[d.index]
                d.selector = dep.selector
                d.slow_fn = dep.compute_digest

    def commit_options(self) -> tuple[list[CacheKey], list[Result]]:
        """The keys an exec result is saved under, and the inputs it is given."""
        assert self.cache_map is not None
        vtx = self.edge.vertex.digest
        out = self.edge.index
        if not self.deps:
            return [CacheKey(d, vtx, out) for d in self.cache_map_digests or ()], []
        inputs: list[list[CacheKeyWithSelector]] = []
        results: list[Result] = []
        for d in self.deps:
            result = d.result
            assert result is not None
            sel = d.selector
            alts = [CacheKeyWithSelector(k, sel) for k in result.cache_keys]
            if d.slow_cache_key is not None:
                alts.append(CacheKeyWithSelector(d.slow_cache_key))
            inputs.append(alts)
            results.append(result)
        return [CacheKey(self.cache_map.digest, vtx, out, inputs)], results

    def finish_incoming(self, req: Pipe) -> None:
        err = self.err
        if req.canceled and err is None:
            err = Canceled("canceled")
        req.finalize(self, err)

    async def probe_cache(self, d: _Dep, dep_keys: list[CacheKeyWithSelector]) -> bool:
        """Ask the cache which keys of this edge ``dep_keys`` lead to."""
        if not dep_keys or self.ignore_cache:
            return False
        assert self.cache_map is not None
        try:
            keys = await self._cache().query(
                dep_keys, d.index, self.cache_map.digest, self.edge.index
            )
        except Exception as exc:
            self.err = self.err or self.op.wrap_error(exc, "error on cache query")
            return False
        if not keys:
            return False
        found = False
        vertex = self.edge.vertex.digest
        key_map = d.key_map
        for k in keys:
            k.vertex = vertex
            if k.id not in key_map:
                if key_map is _NO_KEY_MAP:
                    key_map = d.key_map = {}
                key_map[k.id] = k
                found = True
        return found

    def check_dep_match_possible(self, d: _Dep) -> None:
        if self.no_cache_match_possible or d.key_map:
            return
        if d.slow_fn is not None:
            if not d.slow_cache_found_key and d.slow_cache_complete:
                self.no_cache_match_possible = True
        elif d.state >= CACHE_SLOW:
            self.no_cache_match_possible = True

    def all_deps_have_keys(self, matching: bool) -> bool:
        """Whether every input has a key (``matching``: a key that leads to a
        stored key of this edge), a content key or a result.

        Amortized O(1): inputs only gain keys, so the scan resumes where the last
        one stopped (process_dep_req moves the cursor back in the rare case an
        input's visible state loses its keys or result). An edge with n inputs
        asks once per input update: without the cursor that is O(n^2)."""
        if self.cache_map is None:
            return False
        deps = self.deps
        assert deps is not None
        cursors = self.keys_cursor
        if cursors is None:
            cursors = self.keys_cursor = [0, 0]
        i = cursors[matching]
        n = len(deps)
        while i < n:
            d = deps[i]
            empty = not d.key_map if matching else not d.nkeys
            if empty and d.slow_cache_key is None and d.result is None:
                cursors[matching] = i
                return False
            i += 1
        cursors[matching] = n
        return True

    def current_index_key(self) -> CacheKey | None:
        """The key used to find an equal live edge, once every input has a key."""
        if self.cache_map is None:
            return None
        keys: list[list[CacheKeyWithSelector]] = []
        for d in self.deps or ():
            result = d.result
            if not d.nkeys and result is None:
                return None
            sel = d.selector
            alts = [CacheKeyWithSelector(k, sel) for k in _seen_keys(d)]
            if result is not None:
                alts.extend([CacheKeyWithSelector(rk, sel) for rk in result.cache_keys])
                if d.slow_cache_key is not None:
                    alts.append(CacheKeyWithSelector(ExportableCacheKey(d.slow_cache_key.key)))
            keys.append(alts)
        return CacheKey(
            self.cache_map.digest, self.edge.vertex.digest, self.edge.index, keys
        )

    def skip_phase2_slow_cache(self, dep: _Dep) -> bool:
        if dep.slow_cache_complete or dep.slow_fn is None or not dep.key_map:
            return False
        assert self.deps is not None
        for d in self.deps:
            if (
                (not d.slow_cache_complete and d.slow_fn is not None) or d.state < CACHE_SLOW
            ) and not d.key_map:
                return True
        return False

    def skip_phase2_fast_cache(self, dep: _Dep) -> bool:
        if not dep.key_map:
            return False
        if self.cache_map is None:
            return True
        assert self.deps is not None
        for d in self.deps:
            if not d.key_map and (
                (d.state < COMPLETE and d.slow_fn is None)
                or (not d.slow_cache_complete and d.slow_fn is not None)
            ):
                return True
        return False

    async def seed(
        self,
        cache_map: CacheMap,
        by_input: Sequence[dict[str, CacheKey]],
        input_keys: Sequence[list[ExportableCacheKey]],
        leaf_inputs: Sequence[bool],
        keys: Sequence[ExportableCacheKey],
        records: Sequence[CacheRecord],
    ) -> None:
        """Start this fresh edge from what the cached path found (``_cachedpath.py``):
        its only cache map, its inputs' keys and the stored keys they lead to, its
        own keys and their records. This is the state the edge would be in had it
        asked its inputs for cache-fast keys and they had answered (a leaf input
        answers cache-slow), except that no input edge exists and nothing is
        indexed. Its first dispatch then loads the best record; should the load
        fail, it asks its inputs as usual."""
        assert self.state == INITIAL
        assert self.cache_map is None
        assert not self.incoming
        self.cache_map_done = True
        self.cache_map_index = 1
        self.cache_map_req = _ANSWERED
        self._set_cache_map(cache_map)
        if not self.edge.vertex.inputs:
            self.cache_map_digests = [cache_map.digest]
            self.state = CACHE_SLOW
        self.ensure_deps_initialized()
        assert self.deps is not None
        for d, reached, dep_keys, leaf in zip(
            self.deps, by_input, input_keys, leaf_inputs, strict=True
        ):
            d.key_map = reached
            d.keys = dep_keys
            d.nkeys = len(dep_keys)
            d.state = CACHE_SLOW if leaf else CACHE_FAST
        if self.deps:
            # the stored keys every input leads to: the ones ``keys`` were made from
            self.key_map = dict.fromkeys(k.key.id for k in keys)
        self.keys.extend(keys)
        self._add_records(records)
        await self.recalc_current_state()

    def complete(
        self,
        cache_map: CacheMap,
        keys: Sequence[ExportableCacheKey],
        result: SharedCachedResult,
        loaded: bool,
    ) -> None:
        """Complete this fresh edge with what the cold path (``_coldpath.py``) made:
        its only cache map, its keys (the found ones, then an exec's commit keys)
        and its result, which the edge now owns (``loaded``: from a cache record).
        A requester is answered at its first dispatch; the edge never asks its
        inputs, so it keeps no record of them."""
        assert self.state == INITIAL
        assert not self.incoming
        self.cache_map_done = True
        self.cache_map_index = 1
        self.cache_map_req = _ANSWERED
        self.cache_map = cache_map
        if not self.edge.vertex.inputs:
            self.cache_map_digests = [cache_map.digest]
        self.keys.extend(keys)
        self.exec_req = _ANSWERED
        self.exec_cache_load = loaded
        self.result = result
        self.state = COMPLETE
        # As a commit or a load through the edge does, these keys' exporters read
        # the edge's secondary list (a later merge into this edge adds its inputs
        # to the records they export). Most completed edges never see a merge, so
        # the list is made, and the exporters bound to it, only when first needed
        # (_secondary): one GC-tracked object fewer per vertex of a cold build.
        self.secondary_keys = len(self.keys)

    # -- the step ----------------------------------------------------------------
    async def unpark(
        self,
        incoming: Sequence[Pipe],
        updates: Sequence[Pipe],
        all_pipes: Sequence[Pipe],
        s: Scheduler,
    ) -> None:
        """One state-machine step. It must leave an open outgoing request while any
        incoming request is open, and none once every incoming request is done."""
        if updates:
            await self.process_updates(updates)

        desired, done = self.respond_to_incoming(incoming, all_pipes)
        if done:
            return

        cache_map_req = False
        while self.cache_map_req is None and (self.cache_map is None or not self.cache_records):
            memo = self.op.memoized_cache_map(self.cache_map_index)
            if memo is None:
                self.cache_map_req = s.new_func_pipe(self)
                self.op.request_cache_map(self.cache_map_req, self.cache_map_index)
                cache_map_req = True
                break
            # Answered already (asked by the cached path or another edge of this
            # vertex): taken here, not through a pipe and one more dispatch.
            self.cache_map_req = _ANSWERED
            await self._take_cache_map(*memo)
            await self.recalc_current_state()
            desired, done = self.respond_to_incoming(incoming, all_pipes)
            if done or self.err is not None:
                return

        if self.exec_req is None and desired == COMPLETE and self.exec_if_possible(s):
            return

        if self.exec_req is None:
            added = self.create_input_requests(desired, s, False)
            if not added and not self.has_active_outgoing and not cache_map_req:
                logger.error(
                    "scheduling error: leaving incoming open, forcing solve of %r", self
                )
                self.create_input_requests(desired, s, True)

    def settle(self) -> None:
        """The edge has no open request to its inputs, and has its result or no
        requester: its inputs' answered requests need not be kept (what they said
        is in the deps; a new request to the edge asks its inputs anew)."""
        for d in self.deps or ():
            d.req = None

    def mark_failed(self, s: Scheduler, err: BaseException) -> None:
        self.err = err
        if not self.failed:
            self.failed = True
            s.postpone(self)

    async def process_updates(self, updates: Sequence[Pipe]) -> None:
        dep_changed = False
        for upt in updates:
            if await self.process_update(upt):
                dep_changed = True
        if dep_changed:
            await self.recalc_current_state()

    async def process_update(self, upt: Pipe) -> bool:
        d = upt.dep
        if d is not None:
            deps = self.deps
            # a request this edge made (not one it inherited in a merge)
            if deps is not None and d.index < len(deps) and deps[d.index] is d:
                if upt.completed:
                    # a finished request sends nothing more
                    upt.dep = None
                return await self.process_dep_req(d)
            return False
        if not upt.completed:
            return False
        if upt is self.cache_map_req:
            await self.process_cache_map_req()
            return True
        if upt is self.exec_req:
            await self.process_exec_req()
            return True
        if self.deps is not None:
            for d in self.deps:
                if upt is d.slow_cache_req:
                    await self.process_dep_slow_cache_req(d)
                    return True
        return False

    async def recalc_current_state(self) -> None:
        deps = self.deps or ()
        key_map = self.key_map
        new_keys: dict[str, CacheKey] | None = None
        first = True
        for d in deps:
            dep_keys = d.key_map
            if first:
                first = False
                if not dep_keys:
                    break
                new_keys = {kid: k for kid, k in dep_keys.items() if kid not in key_map}
            else:
                assert new_keys is not None
                for kid in [kid for kid in new_keys if kid not in dep_keys]:
                    del new_keys[kid]
            if not new_keys:
                break

        if new_keys:
            if key_map is _NO_MATCHED:
                key_map = self.key_map = {}
            key_map.update(dict.fromkeys(new_keys))
            await self._add_matched_keys(new_keys, deps)

        if self.cache_map is None:
            return
        all_fast = True
        all_slow = True
        all_state_slow = True
        all_completed = True
        st_low = INITIAL
        st_high = CACHE_SLOW
        for d in deps:
            state = d.state
            slow_incomplete = _slow_incomplete(d)
            if state > st_low and not d.key_map and not slow_incomplete:
                st_low = state if state < CACHE_SLOW else CACHE_SLOW
            effective = CACHE_FAST if slow_incomplete else state
            if effective < st_high:
                st_high = effective
            if slow_incomplete or state < COMPLETE:
                all_completed = False
            if state < CACHE_FAST:
                all_fast = False
            if slow_incomplete or state < CACHE_SLOW:
                all_slow = False
            if state < CACHE_SLOW and not d.key_map:
                all_state_slow = False
        self.state = max(self.state, st_low, st_high)
        if not self.cache_map_done and not self.keys:
            self.state = INITIAL

        done = self.cache_map_done
        self.all_deps_completed_cache_fast = done and all_fast
        self.all_deps_completed_cache_slow = done and all_slow
        self.all_deps_state_cache_slow = done and all_state_slow
        self.all_deps_completed = done and all_completed

        if self.all_deps_state_cache_slow and self.cache_records and self.state == CACHE_FAST:
            open_keys: set[str] = set()
            for d in deps:
                if not _slow_incomplete(d):
                    open_dep_keys = {k for k in d.key_map if k not in self.key_map}
                    if open_keys:
                        open_keys &= open_dep_keys
                    else:
                        open_keys = open_dep_keys
                    if not open_keys:
                        self.state = CACHE_SLOW

    async def _add_matched_keys(
        self, new_keys: dict[str, CacheKey], deps: Sequence[_Dep]
    ) -> None:
        """Every input leads to these stored keys: make them this edge's keys, with
        the inputs' keys as deps, and take their records as candidates."""
        for r in new_keys.values():
            merged = r.clone()
            alternatives: list[list[CacheKeyWithSelector]] = []
            for d in deps:
                sel = d.selector
                if d.result is not None:
                    alts = [CacheKeyWithSelector(dk, sel) for dk in d.result.cache_keys]
                    if d.slow_cache_key is not None:
                        alts.append(CacheKeyWithSelector(d.slow_cache_key))
                else:
                    alts = [CacheKeyWithSelector(k, sel) for k in _seen_keys(d)]
                alternatives.append(alts)
            merged.deps = alternatives
            try:
                records = await self._cache().records(merged)
            except Exception:
                logger.exception("error receiving cache records")
                continue
            self._add_records(records)
            self.keys.append(ExportableCacheKey(merged, KeyExporter(merged, records)))

    def _add_records(self, records: Sequence[CacheRecord]) -> None:
        if not records:
            return
        if self.cache_records is _NO_RECORDS:
            self.cache_records = {}
        loaded = self.cache_records_loaded
        for rec in records:
            if rec.id not in loaded:
                self.cache_records[rec.id] = rec

    async def process_cache_map_req(self) -> None:
        upt = self.cache_map_req
        assert upt is not None
        if upt.err is not None:
            self.cache_map_req = None
            if not upt.canceled_status and self.err is None:
                self.err = upt.err
            return
        await self._take_cache_map(*upt.value)

    async def _take_cache_map(self, cache_map: CacheMap, done: bool) -> None:
        self.cache_map_done = done
        self.cache_map_index += 1
        vertex = self.edge.vertex
        inputs = vertex.inputs
        if len(cache_map.deps) != len(inputs):
            self.err = self.err or SolveError(
                f"invalid cache map of {vertex.name!r}: {len(cache_map.deps)} deps "
                f"for {len(inputs)} inputs",
                vertex=vertex.digest,
                vertex_name=vertex.name,
            )
            self._set_cache_map(None)
            self.cache_map_req = None
            return
        self._set_cache_map(cache_map)
        if not inputs:
            if self.cache_map_digests is None:
                self.cache_map_digests = []
            self.cache_map_digests.append(cache_map.digest)
            if not self.ignore_cache:
                await self._root_keys(cache_map.digest)
            self.state = CACHE_SLOW
        self.ensure_deps_initialized()
        if self.all_deps_have_keys(False):
            self.keys_did_change = True
        assert self.deps is not None
        for d in self.deps:
            if d.nkeys:
                await self.probe_cache(d, _with_selector(_seen_keys(d), d.selector))
            self.check_dep_match_possible(d)
        # done: the answered pipe is not kept, only the fact that there was one
        self.cache_map_req = _ANSWERED if self.cache_map_done else None

    async def _root_keys(self, digest: str) -> None:
        """The keys (and records) the cache has for this root edge's cache map."""
        cache = self._cache()
        try:
            keys = await cache.query([], 0, digest, self.edge.index)
        except Exception:
            logger.exception("invalid query response")
            return
        vertex = self.edge.vertex.digest
        for k in keys:
            k.vertex = vertex
            try:
                records = await cache.records(k)
            except Exception:
                logger.exception("error receiving cache records")
                continue
            if records:
                if self.cache_records is _NO_RECORDS:
                    self.cache_records = {}
                for rec in records:
                    self.cache_records[rec.id] = rec
            self.keys.append(ExportableCacheKey(k, KeyExporter(k, records)))

    async def process_exec_req(self) -> None:
        upt = self.exec_req
        assert upt is not None
        if upt.err is not None:
            self.exec_req = None
            if self.exec_cache_load:
                if isinstance(upt.err, Canceled):
                    # A cancelled load is not a failed one: the record stays a
                    # candidate, or the cancellation would be remembered.
                    loaded = self.cache_records_loaded
                    assert isinstance(loaded, set)
                    loaded.discard(self.loading_record)
                elif self.cache_records:
                    for rid in self.cache_records_loaded:
                        self.cache_records.pop(rid, None)
            elif not upt.canceled_status and self.err is None:
                self.err = upt.err
            return
        value = upt.take()
        if self.exec_cache_load:
            cached = value
            for k in cached.cache_keys:
                if isinstance(k.exporter, KeyExporter):
                    k.exporter.secondary = self._secondary()
        else:
            try:
                cached = await self._commit(value)
            except Exception as exc:
                self.exec_req = None
                if self.err is None:
                    self.err = self.op.wrap_error(exc, "failed to save the result")
                return
        self.result = SharedCachedResult(cached)
        self.state = COMPLETE
        self.exec_req = _ANSWERED
        # Publish the committed keys in the advertised key list too: a consumer
        # that subscribes after this edge completed must see them, or it would
        # find no match and run again (BuildKit #4674). Not for cache loads (the
        # record's key is there already) nor for ignore-cache edges (consumers
        # must not match through an input that was forced to run).
        if not self.exec_cache_load and not self.ignore_cache:
            self.keys.extend(self.result.cache_keys)

    async def _commit(self, outputs: Sequence[Result]) -> CachedResultWithKeys:
        """Save this edge's output under its commit keys; release the other outputs."""
        index = self.edge.index
        if len(outputs) <= index:
            for r in outputs:
                self.op.release_later(r)
            raise SolveError(
                f"invalid response from exec: need output {index} but "
                f"{len(outputs)} results received",
                vertex=self.edge.vertex.digest,
                vertex_name=self.edge.vertex.name,
            )
        res = outputs[index]
        if len(outputs) > 1:
            for i, r in enumerate(outputs):
                if i != index:
                    self.op.release_later(r)
        cache = self._cache()
        now = time.time()
        exporters: list[CacheExporter] = []
        try:
            for key in self.commit_keys:
                exporter = (await cache.save(key, res, now)).exporter
                if isinstance(exporter, KeyExporter):
                    # merges into this edge add inputs to the record (read at export)
                    exporter.secondary = self._secondary()
                if exporter is not None:
                    exporters.append(exporter)
        except BaseException:
            self.op.release_later(res)
            raise
        merged = MergedExporter(exporters)
        keys = [ExportableCacheKey(k, merged) for k in self.commit_keys]
        return CachedResultWithKeys(res, keys)

    async def process_dep_req(self, d: _Dep) -> bool:
        # As BuildKit does: an update on any of this input's requests (a stale one
        # included) is read through the input's current request.
        upt = d.req
        if upt is None:  # let go of (see settle)
            return False
        dep_changed = False
        if upt.err is not None and upt.completed and not upt.canceled_status:
            if self.err is None:
                self.err = upt.err
            d.err = upt.err
        st = upt.value
        if st is None:
            return False
        assert isinstance(st, ActiveEdge)
        st_keys = st.keys
        if d.nkeys < len(st_keys):
            if self.cache_map is not None:
                new_keys = st_keys[d.nkeys :]
                await self.probe_cache(d, _with_selector(new_keys, d.selector))
                d.keys = st_keys
                d.nkeys = len(st_keys)
                if self.all_deps_have_keys(False):
                    self.keys_did_change = True
            dep_changed = True
        state = st.state
        if state == COMPLETE and d.state != COMPLETE:
            self.keys_did_change = True
        recheck = state != d.state
        # take the input's whole visible state, as it is now
        d.state = state
        if (st.result is None and d.result is not None) or len(st_keys) < d.nkeys:
            # it can lose keys (a merge moved the request): rescan from it
            cursors = self.keys_cursor
            if cursors is not None:
                cursors[0] = min(cursors[0], d.index)
                cursors[1] = min(cursors[1], d.index)
        d.result = st.result
        if d.nkeys != len(st_keys):
            d.keys = st_keys
            d.nkeys = len(st_keys)
        if recheck and self.cache_map is not None:
            self.check_dep_match_possible(d)
            dep_changed = True
        return dep_changed

    async def process_dep_slow_cache_req(self, d: _Dep) -> None:
        upt = d.slow_cache_req
        assert upt is not None
        if upt.err is not None:
            d.slow_cache_req = None
            if not upt.canceled_status and self.err is None:
                self.err = upt.err
            return
        if d.slow_cache_complete:
            return
        digest = upt.value
        assert self.cache_map is not None
        if d.slow_fn is not None and digest:
            k = CacheKey(digest, "", -1)
            d.slow_cache_key = ExportableCacheKey(k)
            slow = CacheKeyWithSelector(d.slow_cache_key)
            assert d.result is not None
            sel = d.selector
            def_keys = [CacheKeyWithSelector(dk, sel) for dk in d.result.cache_keys]
            d.slow_cache_found_key = await self.probe_cache(d, [slow])
            # link the definition keys to the content key
            if not self.ignore_cache:
                try:
                    await self._cache().query(
                        [*def_keys, slow], d.index, self.cache_map.digest, self.edge.index
                    )
                except Exception:
                    logger.exception("error linking a content key")
        d.slow_cache_complete = True
        self.keys_did_change = True
        self.check_dep_match_possible(d)

    def respond_to_incoming(
        self, incoming: Sequence[Pipe], all_pipes: Sequence[Pipe]
    ) -> tuple[int, bool]:
        all_can_complete = True
        state = self.state
        desired = state
        all_canceled = True
        has_active_outgoing = self.has_active_outgoing
        if self.err is None and self.result is None:
            nkeys = len(self.keys)
            for req in incoming:
                if not req.canceled:
                    all_canceled = False
                    if desired < req.desired:
                        desired = req.desired
                        if (
                            has_active_outgoing
                            or req.desired == COMPLETE
                            or req.current_keys == nkeys
                        ):
                            all_can_complete = False
        if not all_canceled and state < COMPLETE and not self.keys and has_active_outgoing:
            all_can_complete = False

        if all_can_complete:
            if has_active_outgoing:
                for p in all_pipes:
                    p.cancel()
                leave_open: Pipe | None = None
                for req in incoming:
                    if not req.canceled:
                        leave_open = req
                        break
                for req in incoming:
                    if leave_open is None or leave_open is req:
                        leave_open = req
                        continue
                    self.finish_incoming(req)
            else:
                for req in incoming:
                    self.finish_incoming(req)
            return desired, True

        # A requester acts on the state, result and keys of its input only, so a
        # change of the cache map alone is not worth an update (and a dispatch).
        result = self.result
        nkeys = len(self.keys)
        for req in incoming:
            if req.canceled or (not has_active_outgoing and state >= req.desired):
                self.finish_incoming(req)
            elif (
                req.seen_state != state
                or req.seen_result is not result
                or req.seen_keys != nkeys
            ):
                req.seen_state = state
                req.seen_result = result
                req.seen_keys = nkeys
                req.update(self)
        return desired, False

    def create_input_requests(self, desired: int, s: Scheduler, force: bool) -> bool:
        self.ensure_deps_initialized()
        assert self.deps is not None
        added = False
        cache_map = self.cache_map
        for d in self.deps:
            want = self.desired_state_dep(d, desired, force)
            if d.state < want and self.create_outgoing_request(d, want, s):
                added = True
            if (
                d.state == COMPLETE
                and d.slow_fn is not None
                and d.slow_cache_req is None
                and cache_map is not None
            ):
                self.compute_cache_key_from_dep(d, s)
                added = True
        return added

    def ensure_deps_initialized(self) -> None:
        if self.deps is None:
            cache_map = self.cache_map
            self.deps = [_Dep(i, cache_map) for i in range(len(self.edge.vertex.inputs))]

    def desired_state_dep(self, d: _Dep, desired: int, force: bool) -> int:
        if self.no_cache_match_possible or force:
            return COMPLETE
        state = d.state
        if state == INITIAL:
            return CACHE_FAST if desired > state else state
        if state == CACHE_FAST and desired > state:
            if (
                (self.all_deps_completed_cache_fast and not self.keys)
                or not d.key_map
                or self.all_deps_have_keys(True)
            ) and (not self.skip_phase2_fast_cache(d) and self.cache_map is not None):
                return CACHE_SLOW
            return state
        if self.cache_map is not None and state == CACHE_SLOW and desired == COMPLETE:
            if (
                not d.key_map
                or self.all_deps_completed_cache_slow
                or (not self.skip_phase2_fast_cache(d) and d.slow_fn is not None)
            ) and not self.cache_records and (not d.key_map or not self.skip_phase2_slow_cache(d)):
                return COMPLETE
            return state
        if (
            self.cache_map is not None
            and state == CACHE_SLOW
            and d.slow_fn is not None
            and desired == CACHE_SLOW
        ):
            if not d.key_map or not self.skip_phase2_slow_cache(d):
                return COMPLETE
            return state
        return state

    def create_outgoing_request(self, d: _Dep, want: int, s: Scheduler) -> bool:
        req = d.req
        if req is not None and not req.completed:
            if req.desired == want:
                return False
            req.cancel()
        req = s.new_input_request(
            self,
            self.edge.vertex.inputs[d.index],
            want,
            d.state,
            d.result,
            d.nkeys,
        )
        req.dep = d
        d.req = req
        return True

    def compute_cache_key_from_dep(self, d: _Dep, s: Scheduler) -> None:
        assert d.result is not None
        d.slow_cache_req = s.new_func_pipe(self)
        self.op.request_slow_cache(d.slow_cache_req, d.index, d.slow_fn, d.result)

    def exec_if_possible(self, s: Scheduler) -> bool:
        if self.cache_records:
            if self.keys_did_change and not s.index_now(self):
                return True
            rec = best_record(self.cache_records.values())
            assert rec is not None
            if self.cache_records_loaded is _NO_IDS:
                self.cache_records_loaded = set()
            assert isinstance(self.cache_records_loaded, set)
            self.cache_records_loaded.add(rec.id)
            self.loading_record = rec.id
            self.exec_req = s.new_func_pipe(self)
            self.exec_cache_load = True
            self.op.request_load(self.exec_req, rec)
            # the inputs are not needed: cancel what this edge asked them for
            deps = self.deps
            for p in self.outgoing:
                d = p.dep
                if (
                    d is not None
                    and not p.completed
                    and deps is not None
                    and d.index < len(deps)
                    and deps[d.index] is d
                ):
                    p.cancel()
            return True
        if self.all_deps_completed:
            if self.keys_did_change and not s.index_now(self):
                return True
            self.commit_keys, inputs = self.commit_options()
            self.exec_req = s.new_func_pipe(self)
            self.exec_cache_load = False
            self.op.request_exec(self.exec_req, inputs)
            return True
        return False


def _is_dep(vertex: Vertex, digest: str, seen: dict[int, bool]) -> bool:
    """Whether the vertex with ``digest`` is ``vertex`` or one of its ancestors.

    Iterative with a memo, so deep chains neither recurse nor revisit."""
    stack = [vertex]
    while stack:
        v = stack.pop()
        if v.digest == digest:
            return True
        for inp in v.inputs:
            key = id(inp.vertex)
            if key not in seen:
                seen[key] = True
                stack.append(inp.vertex)
    return False


def _bind_secondary(
    exporter: CacheExporter | None, secondary: list[tuple[int, CacheKeyWithSelector]]
) -> None:
    """Make ``exporter`` (or each member of a merged one) read ``secondary``."""
    parts = exporter.exporters if isinstance(exporter, MergedExporter) else (exporter,)
    for part in parts:
        if isinstance(part, KeyExporter):
            part.secondary = secondary
