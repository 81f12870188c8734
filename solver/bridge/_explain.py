"""``explain``: why each op of a definition misses the cache, found by walking it.

A build runs an op when none of its cache keys has a record. :func:`explain`
finds out, before a build, which part of the key had no match, by the walk
:func:`~solver.bridge.plan` makes (the engine's own lookups: an op's keys are
reached from its inputs' keys through links labelled with the op's cache digest;
nothing runs, nothing is loaded), and names the reason (:class:`MissKind`):

* ``ignore-cache``: the op's metadata says so; it is keyed apart and offers no
  key, so its consumers miss too (as *input changed, from* it);
* ``input changed``: input *i* has no key yet (it will run and make a new one);
  the reason names the op where the change started, following the inputs down
  to the first op that misses for a reason of its own;
* ``content changed``: as above, for an input the op reads through a content
  ("slow") key (``CacheMapDep.compute_digest``): once the input is built the
  engine asks for its content's key, and the op runs only if that misses too;
  the op history then knows which of the files the key covers changed (for the
  built-in ``file`` op, which records them: ``OpHistory.record_content``);
* ``pruned``: the key is known (the inputs' keys link to it, or a leaf's root
  key exists) but has no record left: it was pruned or evicted;
* ``definition changed``: every input's key is known but none links to this
  op's cache digest (for a leaf: its root key is unknown). The earlier version of
  the op is looked up in the solver's :class:`~solver.definition.OpHistory`
  (the op over the same inputs, or at the same place in the graph, that earlier
  solves recorded) and compared field by field
  (:func:`~solver.definition.op_difference`): the reason names the first field
  that differs, with both values;
* ``cache key changed``: as above, but the history holds this very op: its
  definition is the same and its cache key is not, because what the key is
  computed from besides the definition changed (the files a ``source.local``
  reads, named when the history recorded them; the worker's sandbox mode), or
  its whole chain of records was pruned;
* ``new op``: as above, with no earlier version in the history;
* ``record lost``: the walk found a record, but the op ran: the record was
  pruned, or failed to load, between the walk and the build's use of it.

Which ops *did* run is known only from the build (a content key decides during
it): :meth:`Explanation.executed` picks them from the build's progress events
(an exec emits ``started``), and :func:`solve_explained` does it all: explain,
build, and return the reasons of the ops that ran.

Cost: one ``cache_map`` per op (a ``source.local`` op hashes its directory again)
and the plan's O(ops + inputs) cache calls, plus one history lookup per op that
misses for a reason of its own. A solve records its definition's ops in the
history after it succeeds (:meth:`Solver.solve <solver.Solver.solve>`), so the
next miss can be explained.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

import anyio

from .._cache import CacheKey, CacheKeyWithSelector, CacheManager
from .._graph import Vertex, inputs_first
from .._op import CacheMap, CacheMapDep
from .._progress import STARTED, ProgressEvent
from ..definition import (
    Definition,
    JSONValue,
    OpDef,
    OpHistory,
    history_records,
    op_difference,
)
from ._plan import OpState, _cache_maps, _exportable
from ._request import SolveRequest, SolveResult
from ._solver import Solver

__all__ = [
    "Explanation",
    "MissKind",
    "MissReason",
    "OpExplanation",
    "explain",
    "solve_explained",
]


_FILES_SHOWN: Final = 5  # files named in a reason's line; the rest are counted


class MissKind(StrEnum):
    """Why an op misses the cache (see the module docs)."""

    DEFINITION_CHANGED = "definition changed"
    CACHE_KEY_CHANGED = "cache key changed"
    NEW_OP = "new op"
    INPUT_CHANGED = "input changed"
    CONTENT_CHANGED = "content changed"
    IGNORE_CACHE = "ignore-cache"
    PRUNED = "pruned"
    RECORD_LOST = "record lost"


@dataclass(frozen=True, slots=True)
class MissReason:
    """Why one op misses the cache.

    ``kind`` says which part of the key had no match. For
    ``DEFINITION_CHANGED``: ``field`` (as :class:`~solver.OpChange` names it:
    ``"payload.args[2]"``, ``"kind"``), ``before`` and ``after``, and
    ``previous``, the digest of the earlier version. For ``CACHE_KEY_CHANGED``,
    ``previous`` is the op's own digest. For ``INPUT_CHANGED`` and
    ``CONTENT_CHANGED``: ``input``, the index of the (first) input that changed,
    and ``cause`` / ``cause_name``, the digest and name of the op where the
    change started (the input itself, or the op its own reason names). For
    ``CONTENT_CHANGED``, ``files``: the files of the input the content key covers
    whose digests changed since that key was last computed (paths in the input;
    known once the build computed the key, see :meth:`Explanation.executed`),
    or ``None`` when not known; for ``CACHE_KEY_CHANGED``, the files of the op's
    own key that changed (a ``source.local`` directory's), when known.
    """

    kind: MissKind
    field: str | None = None
    before: JSONValue = None
    after: JSONValue = None
    previous: str | None = None
    input: int | None = None
    cause: str | None = None
    cause_name: str | None = None
    files: tuple[str, ...] | None = None

    def describe(self) -> str:
        """One short line: ``definition changed: payload.args[1]: 'a' -> 'b'``,
        ``input 0 changed, from compile``, ``ignore-cache was set``..."""
        kind = self.kind
        if kind is MissKind.DEFINITION_CHANGED:
            return f"definition changed: {self.field}: {_show(self.before)} -> {_show(self.after)}"
        if kind is MissKind.INPUT_CHANGED:
            return f"input {self.input} changed, from {self.cause_name}"
        if kind is MissKind.CONTENT_CHANGED:
            text = f"input {self.input} changed, from {self.cause_name}, and so did "
            if not self.files:
                return text + "the content the op reads from it (its content key)"
            return text + _files("the files the op reads from it: ", self.files)
        if kind is MissKind.CACHE_KEY_CHANGED:
            if self.files:
                return "cache key changed, definition unchanged: " + _files(
                    "the files it reads changed: ", self.files
                )
            return (
                "cache key changed, definition unchanged: what the key is computed "
                "from (files it reads, worker settings) changed, or its records were "
                "pruned"
            )
        if kind is MissKind.NEW_OP:
            return "new op: no record of its definition"
        if kind is MissKind.IGNORE_CACHE:
            return "ignore-cache was set"
        if kind is MissKind.RECORD_LOST:
            return (
                "it was cached before the build, but its record was gone or failed to "
                "load when the build came to it"
            )
        return "its cache key is known but its record was pruned"


@dataclass(frozen=True, slots=True)
class OpExplanation:
    """One op of an :class:`Explanation`: its ``digest``, display ``name``,
    ``kind``, cache ``state`` (as :func:`~solver.bridge.plan` gives it),
    ``reason`` (``None`` when the op is cached), ``inputs`` (the digests of its
    input ops, in order) and ``fallback``: for an op whose reason is a changed
    input that may yet be loaded through a content key (state ``unknown``), why
    it runs if that input does not (its own definition, from the op history)."""

    digest: str
    name: str
    kind: str
    state: OpState
    reason: MissReason | None
    inputs: tuple[str, ...] = ()
    fallback: MissReason | None = None

    def describe(self) -> str:
        """``name: <reason>`` (``name: cached`` for a cached op)."""
        return f"{self.name}: {self.reason.describe() if self.reason else 'cached'}"


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why each op of a definition would miss the cache: one :class:`OpExplanation`
    per op reachable from the output, every op after its inputs (so root causes
    come before what they cause)."""

    ops: tuple[OpExplanation, ...]

    def op(self, digest: str) -> OpExplanation:
        """The entry of the op ``digest``; ``KeyError`` if there is none."""
        for entry in self.ops:
            if entry.digest == digest:
                return entry
        raise KeyError(digest)

    def reasons(self) -> dict[str, MissReason]:
        """The reason of every op that would miss, by digest, inputs first."""
        return {e.digest: e.reason for e in self.ops if e.reason is not None}

    def executed(
        self, events: Iterable[ProgressEvent], history: OpHistory | None = None
    ) -> tuple[OpExplanation, ...]:
        """The entries of the ops that ran according to ``events`` (a build's
        progress: an op that executes emits ``started``), inputs first (an op the
        walk found cached that ran anyway gets ``RECORD_LOST``); with the
        ``history`` the build's content keys were recorded in (the solver's
        :attr:`~solver.Solver.op_history`), a ``CONTENT_CHANGED`` reason names the
        files that changed (:meth:`with_files`)."""
        ran = {ev.vertex for ev in events if ev.status == STARTED}
        return tuple(self.ran(e, ran, history) for e in self.ops if e.digest in ran)

    def ran(
        self, entry: OpExplanation, ran: Container[str], history: OpHistory | None = None
    ) -> OpExplanation:
        """``entry``, for an op that ran in a build in which the ops ``ran`` ran
        (those before it are enough: its inputs start before it), with its final
        reason: ``RECORD_LOST`` if the walk found it cached; its ``fallback`` if
        its reason is an input that did not run after all (kept by its content
        key); a content key's files from ``history`` (:meth:`with_files`)."""
        reason = entry.reason
        if reason is None:
            entry = replace(entry, reason=MissReason(MissKind.RECORD_LOST))
        elif (
            reason.input is not None
            and entry.fallback is not None
            and entry.inputs[reason.input] not in ran
        ):
            # the input matched through its content key after all: it kept its
            # key, so this op ran for a reason of its own
            entry = replace(entry, reason=entry.fallback)
        return self.with_files(entry, history)

    @staticmethod
    def with_files(entry: OpExplanation, history: OpHistory | None) -> OpExplanation:
        """``entry`` with the files its content key found changed, from
        ``history`` (:meth:`OpHistory.changed_files
        <solver.definition.OpHistory.changed_files>`), when its reason is
        ``CONTENT_CHANGED`` and the history knows them; else ``entry``."""
        reason = entry.reason
        if history is None or reason is None or reason.kind is not MissKind.CONTENT_CHANGED:
            return entry
        assert reason.input is not None
        files = history.changed_files(entry.digest, reason.input)
        if files is None:
            return entry
        return replace(entry, reason=replace(reason, files=files))


@dataclass(slots=True)
class _Output:
    """What the walk found for one op output: its stored keys, state and reason."""

    keys: list[CacheKey]
    state: OpState
    reason: MissReason | None


async def explain(solver: Solver, definition: Definition) -> Explanation:
    """Why each op of ``definition`` would miss ``solver``'s main cache, found
    without running anything (see the module docs). Call it before the build it
    explains: the build adds the records it looks for. ``solver`` must be open.
    Only the main cache is asked, not cache imports: an op the build then loads
    from an import does not run, so :meth:`Explanation.executed` leaves it out.

    Raises :class:`~solver.DefinitionError` for an invalid definition and
    :class:`~solver.SolveError` naming the op when an op's factory or cache map
    fails. O(ops + inputs) cache calls and history lookups.
    """
    solver._check_open()
    edge = definition.to_vertices(solver.op_kinds)  # validates first
    order, used = inputs_first(edge)
    places = {rec.digest: rec.place for rec in history_records(definition)}
    history = solver.op_history
    cache = solver.default_cache
    found: dict[tuple[str, int], _Output] = {}
    entries: list[OpExplanation] = []
    for v in order:
        maps = await _cache_maps(solver, v)
        op = v.sys
        assert isinstance(op, OpDef)  # to_vertices made every vertex from an OpDef
        outs = [
            await _resolve(cache, history, v, op, places[v.digest], out, maps, found)
            for out in used[v.digest]
        ]
        for out, result in zip(used[v.digest], outs, strict=True):
            found[v.digest, out] = result
        missing = [o for o in outs if o.state is not OpState.CACHED]
        state = (
            OpState.CACHED
            if not missing
            else OpState.WOULD_RUN
            if any(o.state is OpState.WOULD_RUN for o in missing)
            else OpState.UNKNOWN
        )
        reason = missing[0].reason if missing else None
        inputs = tuple(inp.vertex.digest for inp in v.inputs)
        fallback = None
        if (
            reason is not None
            and reason.input is not None
            and found[inputs[reason.input], v.inputs[reason.input].index].state
            is OpState.UNKNOWN
        ):
            fallback = await _own_reason(history, op, places[v.digest])
        entries.append(
            OpExplanation(v.digest, v.name, op.kind, state, reason, inputs, fallback)
        )
    return Explanation(tuple(entries))


async def solve_explained(
    solver: Solver, request: Definition | SolveRequest
) -> tuple[SolveResult, tuple[OpExplanation, ...]]:
    """Explain ``request``'s definition (:func:`explain`), solve it in a job of its
    own (:meth:`Solver.solve <solver.Solver.solve>`), and return the result (the
    caller's to release) with the reasons of the ops that ran, inputs first.
    Raises what :func:`explain` and ``solve`` raise; a frontend request is refused
    with :class:`ValueError` (its definitions are made while it runs)."""
    if isinstance(request, Definition):
        request = SolveRequest(definition=request)
    if request.definition is None:
        raise ValueError("solve_explained needs a definition; a frontend request has none")
    explanation = await explain(solver, request.definition)
    job = solver.new_job()
    result: SolveResult | None = None
    try:
        result = await solver.solve(request, job=job)
        await job.discard()  # ends the job's status stream: its events are all there
        events = [ev async for ev in job.status()]
        return result, explanation.executed(events, solver.op_history)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await job.discard()  # a second discard of a discarded job does nothing
            if result is not None:
                await result.release()
        raise


async def _resolve(
    cache: CacheManager,
    history: OpHistory,
    v: Vertex,
    op: OpDef,
    place: str,
    out: int,
    maps: Sequence[CacheMap],
    found: dict[tuple[str, int], _Output],
) -> _Output:
    """The stored keys, state and reason of output ``out`` of ``v``, its inputs'
    outputs already in ``found``."""
    if v.options.ignore_cache:
        # keyed apart, and publishes no key: its consumers miss through it
        return _Output([], OpState.WOULD_RUN, MissReason(MissKind.IGNORE_CACHE))
    keys: list[CacheKey] = []
    if not v.inputs:
        has_records = False
        for cache_map in maps:
            for k in await cache.query([], 0, cache_map.digest, out):
                k.vertex = v.digest
                keys.append(k)
                has_records = has_records or bool(await cache.records(k))
        if has_records:
            return _Output(keys, OpState.CACHED, None)
        if keys:
            return _Output(keys, OpState.WOULD_RUN, MissReason(MissKind.PRUNED))
        return _Output(keys, OpState.WOULD_RUN, await _own_reason(history, op, place))
    # An op with inputs has exactly one cache map; its last one is what its edge uses.
    cache_map = maps[-1]
    deps = [
        cache_map.deps[i] if i < len(cache_map.deps) else CacheMapDep()
        for i in range(len(v.inputs))
    ]
    changed = next(
        (i for i, inp in enumerate(v.inputs) if not found[inp.vertex.digest, inp.index].keys),
        None,
    )
    if changed is not None:
        # Input ``changed`` will run and make a key the cache has never seen.
        inp = v.inputs[changed]
        below = found[inp.vertex.digest, inp.index]
        cause, cause_name = _cause(inp.vertex, below.reason)
        content = any(d.compute_digest is not None for d in deps)
        unknown = content or any(
            found[i.vertex.digest, i.index].state is OpState.UNKNOWN for i in v.inputs
        )
        kind = (
            MissKind.CONTENT_CHANGED
            if deps[changed].compute_digest is not None
            else MissKind.INPUT_CHANGED
        )
        return _Output(
            [],
            OpState.UNKNOWN if unknown else OpState.WOULD_RUN,
            MissReason(kind, input=changed, cause=cause, cause_name=cause_name),
        )
    alternatives: list[list[CacheKeyWithSelector]] = []
    matched: dict[str, CacheKey] | None = None
    narrowed_by: int | None = None  # the input after which no key was left
    for i, inp in enumerate(v.inputs):
        input_keys = found[inp.vertex.digest, inp.index].keys
        alts = [CacheKeyWithSelector(_exportable(k), deps[i].selector) for k in input_keys]
        alternatives.append(alts)
        reached: dict[str, CacheKey] = {}
        for k in await cache.query(alts, i, cache_map.digest, out):
            k.vertex = v.digest
            reached.setdefault(k.id, k)
        matched = reached if matched is None else {
            kid: k for kid, k in matched.items() if kid in reached
        }
        if not matched:
            narrowed_by = i
            break
    has_records = False
    for k in (matched or {}).values():
        merged = k.clone()
        merged.deps = [list(alts) for alts in alternatives]
        keys.append(merged)
        has_records = has_records or bool(await cache.records(merged))
    if has_records:
        return _Output(keys, OpState.CACHED, None)
    if keys:
        return _Output(keys, OpState.WOULD_RUN, MissReason(MissKind.PRUNED))
    if narrowed_by:
        # Each input's key links to this op, but never together with the keys of
        # the inputs before it: input ``narrowed_by`` is not the one it had.
        inp = v.inputs[narrowed_by]
        return _Output(
            keys,
            OpState.WOULD_RUN,
            MissReason(MissKind.INPUT_CHANGED, input=narrowed_by, cause=inp.vertex.digest,
                       cause_name=inp.vertex.name),
        )
    # The inputs' keys are known and none links to this op's cache digest.
    return _Output(keys, OpState.WOULD_RUN, await _own_reason(history, op, place))


async def _own_reason(history: OpHistory, op: OpDef, place: str) -> MissReason:
    """Why an op whose key is unknown while its inputs' keys are known misses: how
    its definition differs from its earlier version in ``history``."""
    if await history.get(op.digest) is not None:
        # what its key covers besides the definition may be files (source.local's)
        return MissReason(
            MissKind.CACHE_KEY_CHANGED, previous=op.digest,
            files=history.changed_files(op.digest, -1),
        )
    previous = await history.previous(op, place)
    if previous is None:
        return MissReason(MissKind.NEW_OP)
    difference = op_difference(previous.op, op)
    if difference is None:
        # the same own fields over other inputs (an earlier version found by place)
        difference = ("inputs", _refs(previous.op), _refs(op))
    field, before, after = difference
    return MissReason(
        MissKind.DEFINITION_CHANGED, field=field, before=before, after=after,
        previous=previous.digest,
    )


def _cause(vertex: Vertex, reason: MissReason | None) -> tuple[str, str]:
    """The op where the change that ``vertex`` passes on started: the op its own
    reason names, or ``vertex`` itself."""
    if reason is not None and reason.cause is not None and reason.kind in (
        MissKind.INPUT_CHANGED, MissKind.CONTENT_CHANGED
    ):
        return reason.cause, reason.cause_name or reason.cause
    return vertex.digest, vertex.name


def _files(head: str, files: Sequence[str]) -> str:
    shown = ", ".join(files[:_FILES_SHOWN])
    more = len(files) - _FILES_SHOWN
    return head + shown + (f" and {more} more" if more > 0 else "")


def _refs(op: OpDef) -> JSONValue:
    return [f"{r.digest[:19]}@{r.index}" for r in op.inputs]


def _show(value: JSONValue) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
