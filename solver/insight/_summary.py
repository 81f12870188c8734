"""What one build did: a record per op and the figures of the whole build.

A build's progress events (:class:`~solver.ProgressEvent`, what a job's
``status()`` yields) say, per vertex, when its op started and ended, whether its
result came from a cache (and which) and what it logged. :func:`summarize` folds
them, with the build's op graph, into a :class:`BuildSummary`: one
:class:`OpRecord` per op, and the counts, times and critical path derived from
them on demand.

Why the figures are computed on demand rather than when the summary is made:
the summary is made at the end of every solve (and recorded in the history),
while most callers never read the critical path: at 10,000 ops the fold costs
about 30 ms, the critical path (a topological sort and a longest-path pass)
about 60 ms more, and the cache hits and busy time about 20 ms (one build of
``benchmarks/history_cost.py``'s lattice).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .._graph import Edge
from .._progress import CACHED, COMPLETED, ERROR, LOG, STARTED, ProgressEvent

__all__ = [
    "CANCELED",
    "CACHED_OP",
    "EXECUTED",
    "FAILED",
    "NOT_RUN",
    "BuildSummary",
    "OpRecord",
    "op_graph",
    "summarize",
]

#: Op states in a :class:`OpRecord`.
EXECUTED = "executed"
CACHED_OP = "cached"
FAILED = "failed"
CANCELED = "canceled"
NOT_RUN = "not run"

#: The ``cache_source`` of an op shown as cached without a load of its own: a
#: later op's result came from a cache, so this one was not needed.
UNNEEDED = "unneeded"
#: The ``cache_source`` of an op whose events all predate the build: another
#: build of the same solver had it active, and this build shared it.
ACTIVE = "active"

#: How much of a failed op's output a record keeps (its last lines).
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 4096


class OpRecord(NamedTuple):
    """One op of a build (a named tuple: 10,000 of them are made per build of
    10,000 ops, and a tuple is made several times faster than a frozen
    dataclass).

    ``digest`` is its vertex digest, ``name`` its display name, ``state`` one of
    ``"executed"``, ``"cached"``, ``"failed"``, ``"canceled"`` or ``"not run"``.
    ``started`` and ``ended`` (``time.time()``) bound its execution (``None``
    when it did not run; a cached op has only ``ended``, when its result was
    there; one the shared cache restored has both). ``cache_source`` (cached
    ops) is where the result came from: ``"memory"``, ``"local"``, ``"import"``,
    ``"shared"`` (see :class:`~solver.ProgressEvent`), ``"unneeded"`` (not
    loaded: a later op's result was) or ``"active"`` (shared with another build
    of the same solver). ``error`` and ``log_tail``
    (the last lines it wrote) are kept for a failed op. ``reason`` says why an
    executed op ran, when the build was explained (``solver build --explain``,
    :func:`solver.explain`; ``None`` otherwise). ``inputs`` are
    the digests of the ops it depends on.
    """

    digest: str
    name: str
    state: str
    started: float | None = None
    ended: float | None = None
    cache_source: str | None = None
    error: str | None = None
    log_tail: str = ""
    reason: str | None = None
    inputs: tuple[str, ...] = ()

    @property
    def ran(self) -> bool:
        """Whether it ran (executed, failed or cancelled); a step the shared cache
        restored did not (its exec fetched the outputs)."""
        return self.started is not None and self.state != CACHED_OP

    @property
    def duration(self) -> float:
        """Seconds its execution took (0 for an op that did not run)."""
        if self.started is None or self.ended is None:
            return 0.0
        return max(0.0, self.ended - self.started)


@dataclass(eq=False)
class BuildSummary:
    """What one build did. ``build`` is the digest of the vertex it built (it
    covers the whole graph: the same definition gives the same digest);
    ``started`` and ``ended`` (``time.time()``) bound the build; ``ops`` has one
    :class:`OpRecord` per op, in the order they first had an event (the
    build's order), then the ops that had none.

    The figures (:attr:`executed`, :attr:`cache_hits`, :attr:`critical_path`,
    ...) are derived from ``ops`` when first read, each O(ops + inputs).
    """

    build: str
    started: float
    ended: float
    ops: tuple[OpRecord, ...]
    _counts: dict[str, int] | None = field(default=None, repr=False)
    _path: tuple[OpRecord, ...] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"<BuildSummary {self.executed} run, {self.cached} cached, "
            f"{self.failed} failed in {self.wall_time:.3f}s>"
        )

    # -- counts ------------------------------------------------------------------------
    def _state_counts(self) -> dict[str, int]:
        if self._counts is None:
            counts = dict.fromkeys((EXECUTED, CACHED_OP, FAILED, CANCELED, NOT_RUN), 0)
            for op in self.ops:
                counts[op.state] += 1
            self._counts = counts
        return self._counts

    @property
    def executed(self) -> int:
        """How many ops ran to completion."""
        return self._state_counts()[EXECUTED]

    @property
    def cached(self) -> int:
        """How many ops' results came from a cache (or were not needed)."""
        return self._state_counts()[CACHED_OP]

    @property
    def failed(self) -> int:
        """How many ops failed."""
        return self._state_counts()[FAILED]

    @property
    def canceled(self) -> int:
        """How many ops were cancelled while they ran."""
        return self._state_counts()[CANCELED]

    @property
    def not_run(self) -> int:
        """How many ops never started (a failure ended the build first)."""
        return self._state_counts()[NOT_RUN]

    @property
    def cache_hits(self) -> dict[str, int]:
        """Cached ops by ``cache_source``, largest first."""
        hits: dict[str, int] = {}
        for op in self.ops:
            if op.state == CACHED_OP:
                source = op.cache_source or UNNEEDED
                hits[source] = hits.get(source, 0) + 1
        return dict(sorted(hits.items(), key=lambda kv: (-kv[1], kv[0])))

    def ran(self) -> list[OpRecord]:
        """The ops that ran (executed, failed or cancelled), in build order; a
        step the shared cache restored did not (its exec fetched, not ran)."""
        return [op for op in self.ops if op.ran]

    # -- time --------------------------------------------------------------------------
    @property
    def wall_time(self) -> float:
        """Seconds from the build's start to its end."""
        return max(0.0, self.ended - self.started)

    @property
    def op_time(self) -> float:
        """Seconds spent in ops, summed over ops (more than :attr:`wall_time` when
        ops ran in parallel)."""
        return sum(op.duration for op in self.ops)

    @property
    def busy_time(self) -> float:
        """Seconds during which at least one op was running."""
        spans = sorted(
            (op.started, op.ended)
            for op in self.ops
            if op.started is not None and op.ended is not None
        )
        total, end = 0.0, float("-inf")
        for start, stop in spans:
            if stop <= end:
                continue
            total += stop - max(start, end)
            end = stop
        return total

    @property
    def engine_time(self) -> float:
        """Seconds of the build during which no op ran: the engine's own work
        (loading the graph, cache lookups and loads, scheduling)."""
        return max(0.0, self.wall_time - self.busy_time)

    @property
    def critical_path(self) -> tuple[OpRecord, ...]:
        """The chain of dependent ops (each an input of the next) with the most op
        time, first op first; empty when no op ran. O(ops + inputs)."""
        if self._path is None:
            self._path = _longest_chain(self.ops)
        return self._path

    @property
    def critical_path_time(self) -> float:
        """The op time of :attr:`critical_path`."""
        return sum(op.duration for op in self.critical_path)

    # -- forms ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, object]:
        """The figures as a JSON-ready dict (the ``summary`` event of ``solver build
        --progress json``; see ``docs/insight.md``)."""
        return {
            "build": self.build,
            "started": self.started,
            "ended": self.ended,
            "ops": len(self.ops),
            "executed": self.executed,
            "cached": self.cached,
            "failed": self.failed,
            "canceled": self.canceled,
            "not_run": self.not_run,
            "cache_hits": self.cache_hits,
            "wall_time": round(self.wall_time, 6),
            "op_time": round(self.op_time, 6),
            "engine_time": round(self.engine_time, 6),
            "critical_path": [
                {"vertex": op.digest, "name": op.name, "duration": round(op.duration, 6)}
                for op in self.critical_path
            ],
            "ran": [
                {"vertex": op.digest, "name": op.name, "state": op.state, "reason": op.reason}
                for op in self.ran()
            ],
        }

    def lines(self) -> list[str]:
        """The summary as text lines (what ``solver build`` prints at the end)."""
        parts = [f"{self.executed} run", f"{self.cached} cached", f"{self.failed} failed"]
        if self.canceled:
            parts.append(f"{self.canceled} canceled")
        if self.not_run:
            parts.append(f"{self.not_run} not run")
        lines = [f"Summary: {len(self.ops)} ops: {', '.join(parts)}"]
        hits = ", ".join(f"{n} {source}" for source, n in self.cache_hits.items())
        lines.append(f"Cache hits: {hits or 'none'}")
        lines.append(
            f"Time: {self.wall_time:.3f}s wall, {self.op_time:.3f}s in ops, "
            f"{self.engine_time:.3f}s in the engine"
        )
        path = self.critical_path
        if path:
            chain = " -> ".join(f"{op.name} ({op.duration:.3f}s)" for op in path)
            lines.append(f"Critical path ({self.critical_path_time:.3f}s): {chain}")
        return lines


def _inputs_first(ops: Sequence[OpRecord]) -> list[OpRecord]:
    """``ops`` ordered so that every op comes after its inputs (iterative DFS)."""
    by_digest = {op.digest: op for op in ops}
    done: set[str] = set()
    order: list[OpRecord] = []
    for root in ops:
        if root.digest in done:
            continue
        stack: list[tuple[OpRecord, int]] = [(root, 0)]
        while stack:
            op, i = stack.pop()
            if i < len(op.inputs):
                stack.append((op, i + 1))
                dep = by_digest.get(op.inputs[i])
                if dep is not None and dep.digest not in done:
                    stack.append((dep, 0))
            elif op.digest not in done:
                done.add(op.digest)
                order.append(op)
    return order


def _longest_chain(ops: Sequence[OpRecord]) -> tuple[OpRecord, ...]:
    by_digest = {op.digest: op for op in ops}
    best: dict[str, float] = {}
    prev: dict[str, str | None] = {}
    top: str | None = None
    top_time = 0.0
    for op in _inputs_first(ops):
        before, via = 0.0, None
        for dep in op.inputs:
            t = best.get(dep)
            if t is not None and t > before:
                before, via = t, dep
        total = before + op.duration
        best[op.digest] = total
        prev[op.digest] = via
        if total > top_time:
            top, top_time = op.digest, total
    chain: list[OpRecord] = []
    cur = top
    while cur is not None:
        chain.append(by_digest[cur])
        cur = prev[cur]
    chain.reverse()
    return tuple(op for op in chain if op.duration > 0)


def op_graph(edge: Edge) -> dict[str, tuple[str, ...]]:
    """The ops under ``edge`` as vertex digest -> its inputs' digests (in no
    particular order). O(vertices + inputs), no recursion."""
    graph: dict[str, tuple[str, ...]] = {}
    stack = [edge.vertex]
    while stack:
        vertex = stack.pop()
        digest = vertex.digest
        if digest in graph:
            continue
        inputs = vertex.inputs
        graph[digest] = tuple([e.vertex.digest for e in inputs])
        stack.extend([e.vertex for e in inputs])
    return graph


class _OpEvents:
    __slots__ = ("cache_source", "ended", "error", "logs", "name", "started", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = NOT_RUN
        self.started: float | None = None
        self.ended: float | None = None
        self.cache_source: str | None = None
        self.error: str | None = None
        self.logs: list[bytes] | None = None


def summarize(
    events: Iterable[ProgressEvent],
    graph: Mapping[str, Sequence[str]],
    *,
    build: str,
    started: float,
    ended: float,
    names: Mapping[str, str] | None = None,
) -> BuildSummary:
    """Fold a build's ``events`` into a :class:`BuildSummary`. ``graph`` maps each
    op's digest to its inputs' (:func:`op_graph`). Ops come in the order of
    their first event, then those with none, which are ``"not run"`` (named by
    ``names``, else by their digest); an op with events but not in ``graph``
    (built by a nested build) has no inputs.
    Events from before ``started`` belong to another build that had the vertex
    active: such an op is ``"cached"`` from ``"active"``. O(events + ops)."""
    seen: dict[str, _OpEvents] = {}
    stale: set[str] = set()
    for ev in events:
        rec = seen.get(ev.vertex)
        if rec is None:
            rec = seen[ev.vertex] = _OpEvents(ev.name)
        if ev.timestamp < started:
            stale.add(ev.vertex)
            continue
        status = ev.status
        if status == LOG:
            if rec.logs is None:
                rec.logs = []
            rec.logs.append(ev.data)
        elif status == STARTED:
            rec.started = ev.timestamp
            rec.state = CANCELED  # until it says how it ended
        elif status == COMPLETED:
            rec.ended = ev.timestamp
            if ev.cache_source is not None:
                # its exec restored the outputs from a cache (the shared one)
                rec.cache_source = ev.cache_source
                rec.state = CACHED_OP
            else:
                rec.state = EXECUTED
        elif status == CACHED:
            rec.ended = ev.timestamp
            rec.cache_source = ev.cache_source or UNNEEDED
            if rec.state == NOT_RUN:
                rec.state = CACHED_OP
        elif status == ERROR:
            rec.ended = ev.timestamp
            rec.error = ev.error
            rec.state = CANCELED if ev.error == "canceled" else FAILED
    names = names or {}
    ops = [
        _record(digest, rec, digest in stale, tuple(graph.get(digest, ())), names)
        for digest, rec in seen.items()
        # an op only an earlier build of the same job had is not this build's
        if not (graph and digest in stale and rec.state == NOT_RUN and digest not in graph)
    ]
    ops += [
        _record(digest, None, False, tuple(inputs), names)
        for digest, inputs in graph.items()
        if digest not in seen
    ]
    return BuildSummary(build, started, ended, tuple(ops))


def _record(
    digest: str,
    rec: _OpEvents | None,
    stale: bool,
    inputs: tuple[str, ...],
    names: Mapping[str, str],
) -> OpRecord:
    if rec is None:
        return OpRecord(digest, names.get(digest, digest), NOT_RUN, inputs=inputs)
    if stale and rec.state == NOT_RUN:
        return OpRecord(digest, rec.name, CACHED_OP, cache_source=ACTIVE, inputs=inputs)
    tail = ""
    if rec.logs is not None and rec.state in (FAILED, CANCELED):
        tail = log_tail(b"".join(rec.logs))
    return OpRecord(
        digest,
        rec.name,
        rec.state,
        rec.started,
        rec.ended,
        rec.cache_source,
        rec.error,
        tail,
        None,
        inputs,
    )


def log_tail(data: bytes) -> str:
    """The last :data:`LOG_TAIL_LINES` lines of ``data`` (at most
    :data:`LOG_TAIL_BYTES`), decoded."""
    data = data[-LOG_TAIL_BYTES:]
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])
