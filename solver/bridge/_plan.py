"""``plan``: what a solve of a definition would do, without doing any of it.

For each op of a definition, inputs first, :func:`plan` computes the op's cache
keys the way the engine does and looks them up in the solver's main cache
(:attr:`Solver.default_cache <solver.engine.Engine.default_cache>`). Nothing is
executed, no result is loaded, no snapshot is made and no handle is taken: the
only calls are the op kinds' factories, each op's ``cache_map`` and the cache's
``query`` and ``records``, which are exactly the questions an edge asks before it
decides to load or to run (``query`` may add links between keys the cache
already has, and ``records`` drops records whose results are gone, as they do
during a build).

How a key is found (as in ``engine/_cachedpath.py``, the engine's cached path):

* an op without inputs: for each of its cache maps, the root key of
  ``(cache_map.digest, output)`` if the cache has it (``query([], ...)``);
* an op with inputs: for input *i*, the keys the cache links from the keys of
  that input's output (``query(input_keys, i, ...)``), then the keys reached from
  every input (the intersection).

An op output is **cached** when one of its keys has records; the op is cached
when every output the graph uses is. Otherwise it **would run**, except that the
answer is **unknown** when a content ("slow") key could still match: one of its
deps has ``CacheMapDep.compute_digest`` (that key is computed from the input's
result, so it cannot be known without building or loading the input), or one of
its inputs is itself unknown. An ignore-cache op always would run and offers no
key, so its consumers would run too (unknown with a content key). An input that
would run but whose keys the cache knows (its records were pruned) still leads
to its consumers' keys, as it does in the engine.

Separately, an op is **needed** when a build would use its result: the output op
is, and so is every input of a needed op that is not cached (a cached op's result
is loaded, and its inputs are never asked for). ``needed`` is False for ops below
a cached op.

The cache maps are asked one op at a time (a plan is for showing, not for speed).
An op whose factory or cache map asks for a nested build gets an error: a plan
builds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from .._cache import CacheKey, CacheKeyWithSelector, CacheManager, ExportableCacheKey
from .._errors import SolveError
from .._graph import Edge, Vertex, inputs_first
from .._op import CacheMap, CacheMapDep, Op
from .._result import CachedResult
from ..definition import Definition, OpDef, OutputRef
from ._solver import Solver

__all__ = ["OpState", "Plan", "PlanOp", "plan"]


class OpState(StrEnum):
    """The cache state of an op in a :class:`Plan`."""

    CACHED = "cached"
    """The cache has a record for every output of the op that the graph uses."""

    WOULD_RUN = "would run"
    """No record, and none can appear before the op runs."""

    UNKNOWN = "unknown (content key)"
    """No record under the keys known now, but a content key (computed from an
    input's result once it is built or loaded) could still find one."""


@dataclass(frozen=True, slots=True)
class PlanOp:
    """One op of a :class:`Plan`.

    ``digest`` is the op digest, ``name`` its display name (the metadata name, or
    the kind), ``kind`` its kind, ``inputs`` the outputs it consumes (in order),
    ``state`` its cache state, ``needed`` whether a build would use its result
    (False below a cached op), and ``ignore_cache`` the metadata flag.
    """

    digest: str
    name: str
    kind: str
    inputs: tuple[OutputRef, ...]
    state: OpState
    needed: bool = True
    ignore_cache: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """What a solve of a definition would do: one :class:`PlanOp` per op reachable
    from ``output``, every op after its inputs."""

    ops: tuple[PlanOp, ...]
    output: OutputRef

    def op(self, digest: str) -> PlanOp:
        """The entry of the op ``digest``; ``KeyError`` if the plan has none."""
        for entry in self.ops:
            if entry.digest == digest:
                return entry
        raise KeyError(digest)

    def states(self) -> dict[str, OpState]:
        """Each op's state, by digest, inputs first."""
        return {entry.digest: entry.state for entry in self.ops}

    def to_dot(self) -> str:
        """The graph in Graphviz DOT: a ``digraph``, one box per op labelled with
        its name and state and filled by state (green cached, orange would run,
        yellow unknown), dashed when not needed, doubled for the output; one edge
        per input, from the input to its consumer (labelled with the output index
        when it is not 0). Node IDs are the op digests, quoted."""
        lines = [
            "digraph plan {",
            '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
        ]
        for entry in self.ops:
            style = _DOT_STYLE[entry.state]
            attrs = [
                f"label={_dot_quote(_label(entry))}",
                f'fillcolor="{style[0]}"',
                f'color="{style[1]}"',
                f"tooltip={_dot_quote(f'{entry.kind} {entry.digest}')}",
            ]
            if not entry.needed:
                attrs.append('style="rounded,filled,dashed"')
            if entry.digest == self.output.digest:
                attrs.append("peripheries=2")
            lines.append(f"  {_dot_quote(entry.digest)} [{', '.join(attrs)}];")
        for entry in self.ops:
            for ref in entry.inputs:
                edge = f"  {_dot_quote(ref.digest)} -> {_dot_quote(entry.digest)}"
                if ref.index:
                    edge += f' [label="{ref.index}"]'
                lines.append(edge + ";")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart: one node line per op (``opN`` in plan
        order, labelled with its name and state, classed by state), one ``-->``
        line per input (labelled with the output index when it is not 0), then
        the class definitions (the colours of :meth:`to_dot`) and one ``class``
        line giving the ops that are not needed a dashed border."""
        ids = {entry.digest: f"op{i}" for i, entry in enumerate(self.ops, 1)}
        lines = ["flowchart TD"]
        for entry in self.ops:
            label = _mermaid_text(_label(entry))
            lines.append(f'  {ids[entry.digest]}["{label}"]:::{_MERMAID_CLASS[entry.state]}')
        for entry in self.ops:
            for ref in entry.inputs:
                arrow = f"-->|{ref.index}|" if ref.index else "-->"
                lines.append(f"  {ids[ref.digest]} {arrow} {ids[entry.digest]}")
        for state, cls in _MERMAID_CLASS.items():
            fill, stroke = _DOT_STYLE[state]
            lines.append(f"  classDef {cls} fill:{fill},stroke:{stroke}")
        # ``:::`` takes one class; a second one is given by a ``class`` statement
        spare = [ids[entry.digest] for entry in self.ops if not entry.needed]
        if spare:
            lines.append("  classDef notneeded stroke-dasharray:5 3")
            lines.append(f"  class {','.join(spare)} notneeded")
        return "\n".join(lines) + "\n"


# fill, border
_DOT_STYLE = {
    OpState.CACHED: ("#c8e6c9", "#2e7d32"),
    OpState.WOULD_RUN: ("#ffe0b2", "#ef6c00"),
    OpState.UNKNOWN: ("#fff9c4", "#f9a825"),
}
_MERMAID_CLASS = {
    OpState.CACHED: "cached",
    OpState.WOULD_RUN: "wouldrun",
    OpState.UNKNOWN: "unknown",
}


def _label(entry: PlanOp) -> str:
    state = str(entry.state) if entry.needed else f"{entry.state}, not needed"
    return f"{entry.name}\n{state}"


def _dot_quote(text: str) -> str:
    """``text`` as a DOT quoted string. Backslashes are doubled too: in a label DOT
    reads ``\\n``, ``\\l``... as escapes, and a name should show as written."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "").replace("\n", "\\n") + '"'


def _mermaid_text(text: str) -> str:
    """``text`` inside a quoted Mermaid label: entity codes for what Mermaid would
    read as markup or as the end of the label, ``<br/>`` for line breaks."""
    text = text.replace("#", "#35;").replace('"', "#quot;")
    text = text.replace("<", "#lt;").replace(">", "#gt;").replace("\r", "")
    return text.replace("\n", "<br/>")


class _NoBuilds:
    """The builder a plan hands to op factories: it refuses every nested build."""

    def __init__(self, vertex: Vertex) -> None:
        self.vertex = vertex

    async def build(self, edge: Edge) -> CachedResult:
        raise SolveError(
            f"op {self.vertex.name!r} ({self.vertex.digest}) asked for a nested build; "
            "a plan builds nothing",
            vertex=self.vertex.digest,
            vertex_name=self.vertex.name,
        )


@dataclass(slots=True)
class _Output:
    """What the plan found for one op output: its stored keys and state."""

    keys: list[CacheKey]
    state: OpState


async def plan(solver: Solver, definition: Definition) -> Plan:
    """The cache state of every op of ``definition`` in ``solver``, without running
    anything (see the module docs for how keys are found and what each state
    means).

    ``solver`` must be open; its ``op_kinds`` make the ops (the definition is
    validated against them first) and its ``default_cache`` is asked. Cache
    imports are not consulted. Raises :class:`~solver.DefinitionError` for an
    invalid definition and :class:`~solver.SolveError` naming the op when an op's
    factory or cache map fails. O(ops + inputs) cache calls.
    """
    solver._check_open()
    edge = definition.to_vertices(solver.op_kinds)  # validates first
    order, used = inputs_first(edge)
    cache = solver.default_cache
    found: dict[tuple[str, int], _Output] = {}
    states: dict[str, OpState] = {}
    for v in order:
        maps = await _cache_maps(solver, v)
        outs: list[OpState] = []
        for out in used[v.digest]:
            result = await _resolve(cache, v, out, maps, found)
            found[v.digest, out] = result
            outs.append(result.state)
        states[v.digest] = (
            OpState.WOULD_RUN
            if OpState.WOULD_RUN in outs
            else OpState.UNKNOWN
            if OpState.UNKNOWN in outs
            else OpState.CACHED
        )
    # A build loads a cached op's result and never asks for its inputs: walk
    # down from the output through the ops that are not cached.
    needed = {edge.vertex.digest}
    for v in reversed(order):
        if v.digest in needed and states[v.digest] is not OpState.CACHED:
            needed.update(inp.vertex.digest for inp in v.inputs)
    entries: list[PlanOp] = []
    for v in order:
        op = v.sys
        assert isinstance(op, OpDef)  # to_vertices made every vertex from an OpDef
        entries.append(
            PlanOp(
                digest=v.digest,
                name=v.name,
                kind=op.kind,
                inputs=tuple(op.inputs),
                state=states[v.digest],
                needed=v.digest in needed,
                ignore_cache=v.options.ignore_cache,
            )
        )
    return Plan(tuple(entries), OutputRef(edge.vertex.digest, edge.index))


async def _cache_maps(solver: Solver, v: Vertex) -> list[CacheMap]:
    """Every cache map of ``v``'s op (asked with 0, 1, ... until one says done),
    the op made by the solver's op kinds as for a build."""
    try:
        op: Op = solver.resolve_op(v, _NoBuilds(v))
        maps: list[CacheMap] = []
        while True:
            cache_map, done = await op.cache_map(len(maps))
            maps.append(cache_map)
            if done:
                return maps
    except SolveError as exc:
        if exc.vertex is None:
            exc.vertex, exc.vertex_name = v.digest, v.name
        raise
    except Exception as exc:
        raise SolveError(
            f"op {v.name!r} ({v.digest}): cannot compute its cache key: "
            f"{type(exc).__name__}: {exc}",
            vertex=v.digest,
            vertex_name=v.name,
        ) from exc


async def _resolve(
    cache: CacheManager,
    v: Vertex,
    out: int,
    maps: Sequence[CacheMap],
    found: dict[tuple[str, int], _Output],
) -> _Output:
    """The stored keys and the state of output ``out`` of ``v``, its inputs'
    outputs already in ``found``."""
    if v.options.ignore_cache:
        # The engine keys an ignore-cache vertex apart and publishes no key for it,
        # not even after it ran: nothing above can match through it.
        return _Output([], OpState.WOULD_RUN)
    keys: list[CacheKey] = []
    has_records = False
    if not v.inputs:
        for cache_map in maps:
            for k in await cache.query([], 0, cache_map.digest, out):
                k.vertex = v.digest
                keys.append(k)
                has_records = has_records or bool(await cache.records(k))
        return _Output(keys, OpState.CACHED if has_records else OpState.WOULD_RUN)
    # An op with inputs has exactly one cache map (the Op protocol); the last one
    # is the one its edge would use.
    cache_map = maps[-1]
    deps = [
        cache_map.deps[i] if i < len(cache_map.deps) else CacheMapDep()
        for i in range(len(v.inputs))
    ]
    alternatives: list[list[CacheKeyWithSelector]] = []
    matched: dict[str, CacheKey] | None = None
    for i, inp in enumerate(v.inputs):
        input_keys = found[inp.vertex.digest, inp.index].keys
        alts = [CacheKeyWithSelector(_exportable(k), deps[i].selector) for k in input_keys]
        alternatives.append(alts)
        if not alts:
            matched = {}
            break
        reached: dict[str, CacheKey] = {}
        for k in await cache.query(alts, i, cache_map.digest, out):
            k.vertex = v.digest
            reached.setdefault(k.id, k)
        matched = reached if matched is None else {
            kid: k for kid, k in matched.items() if kid in reached
        }
        if not matched:
            break
    for k in (matched or {}).values():
        merged = k.clone()
        merged.deps = [list(alts) for alts in alternatives]
        keys.append(merged)
        has_records = has_records or bool(await cache.records(merged))
    if has_records:
        return _Output(keys, OpState.CACHED)
    content_key = any(d.compute_digest is not None for d in deps)
    unknown_input = any(
        found[inp.vertex.digest, inp.index].state is OpState.UNKNOWN for inp in v.inputs
    )
    # A content key, this op's or an input's, is known only once the input has
    # been built or loaded, and may then find a record: the answer is unknown.
    state = OpState.UNKNOWN if content_key or unknown_input else OpState.WOULD_RUN
    return _Output(keys, state)


def _exportable(key: CacheKey) -> ExportableCacheKey:
    # Queries take keys with exporters; a plan exports nothing, so none is made.
    return ExportableCacheKey(key)
