"""Op history: the definitions of ops built before, so that a miss can name a field.

A cache key holds an op's *cache digest*, never its definition: when an op
misses because its definition changed, the key walk (``solver.bridge``'s
``explain``) knows *that* it changed, not *how*. The history keeps, for each op
a solve saw, its :class:`OpDef` (kind, payload, inputs), its display name and
its *place* (below), so that the walk can find the op's earlier version and
compare the two field by field (as :func:`~solver.diff_definitions` does).

It also keeps, for ops whose cache key reads an input's content (a content or
"slow" key: the built-in ``file`` op copying from an input), the files that key
covered and their digests (:meth:`OpHistory.record_content`), so that when the
key changes the files that changed can be named (:meth:`OpHistory.changed_files`).

The earlier version of an op is, by :meth:`OpHistory.previous`:

* for an op with inputs, the most recently seen other op over exactly the same
  inputs (the same ``(digest, index)`` refs, in order): when the inputs' keys are
  unchanged and the op's own key is new, this is the op the last build ran there;
* else (a leaf, or nothing over those inputs) the most recently seen other op at
  the same place.

A *place* is where an op stands in its graph, independent of any op digest:
the path from the output op down to it, each step ``/<input index>:<kind>`` (the
output op is ``/0:<kind>``), along the shortest path, breadth first; it is
kept as a digest of that path, chained step by step (``digest_of(parent place +
"/1:file")``), so that it has the same size at any depth. Op digests change with
every edit below; places do not, so a leaf whose payload changed is found at the
place where its earlier version stood.

A history is bounded (:data:`DEFAULT_MAX_OPS` ops, least recently seen out
first), like the in-memory cache it explains. ``InMemoryOpHistory`` lives as long
as its solver; the built-in worker keeps a persistent one beside its cache
(``solver.worker``), so that a miss in one process is explained from the builds
of earlier ones.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import anyio.lowlevel

from .._digest import digest_of
from ._definition import Definition, OpDef, OutputRef

__all__ = [
    "DEFAULT_MAX_OPS",
    "InMemoryOpHistory",
    "OpHistory",
    "OpDefinitionRecord",
    "files_that_differ",
    "history_records",
    "inputs_key",
    "note_changed_files",
]

DEFAULT_MAX_OPS: Final = 10_000
"""How many ops a history keeps by default (the in-memory cache's default bound),
and how many content keys."""

MAX_CHANGED: Final = 10_000
"""How many ``(op, input)`` changed-file lists a history keeps for this process."""


@dataclass(frozen=True, slots=True)
class OpDefinitionRecord:
    """One op as a solve saw it: its definition, display name (the metadata name,
    else the kind), place in its graph (see the module docs) and when it was last
    seen (``time.time()``)."""

    op: OpDef
    name: str
    place: str
    seen_at: float

    @property
    def digest(self) -> str:
        return self.op.digest


def inputs_key(inputs: Sequence[OutputRef]) -> str:
    """The inputs of an op as one string (``digest@index`` joined by commas): how a
    history finds the ops over the same inputs. Empty for a leaf."""
    return ",".join(f"{r.digest}@{r.index}" for r in inputs)


def history_records(
    definition: Definition, seen_at: float | None = None
) -> list[OpDefinitionRecord]:
    """One :class:`OpDefinitionRecord` per op reachable from the output of ``definition``,
    output first, each with its place (the shortest path from the output,
    breadth first). O(ops + inputs)."""
    now = time.time() if seen_at is None else seen_at
    ops, meta = definition.ops, definition.metadata
    out = definition.output.digest
    places = {out: _place("", 0, ops[out].kind)}
    queue = deque([out])
    records: list[OpDefinitionRecord] = []
    while queue:
        digest = queue.popleft()
        op = ops[digest]
        m = meta.get(digest)
        records.append(OpDefinitionRecord(op, (m.name if m is not None else "") or op.kind,
                                places[digest], now))
        for i, ref in enumerate(op.inputs):
            if ref.digest not in places:
                places[ref.digest] = _place(places[digest], i, ops[ref.digest].kind)
                queue.append(ref.digest)
    return records


def _place(parent: str, index: int, kind: str) -> str:
    # a digest of the path, not the path: a place is O(1) in size at any depth
    return digest_of(f"{parent}/{index}:{kind}".encode())


@runtime_checkable
class OpHistory(Protocol):
    """Where the op definitions of past solves are kept (see the module docs)."""

    async def record(self, records: Iterable[OpDefinitionRecord]) -> None:
        """Keep ``records`` (an op seen again gets its new name, place and time),
        then forget the least recently seen ops beyond the bound."""
        ...

    async def get(self, digest: str) -> OpDefinitionRecord | None:
        """The record of the op ``digest``, if kept."""
        ...

    async def previous(self, op: OpDef, place: str) -> OpDefinitionRecord | None:
        """The earlier version of ``op`` (never ``op`` itself): the most recently
        seen op over the same inputs, else at ``place``; ``None`` if neither is
        kept."""
        ...

    async def record_content(
        self, vertex: str, input: int, slot: str, digest: str, files: Mapping[str, str]
    ) -> None:
        """Keep the content key ``digest`` that op ``vertex`` computed for its input
        ``input``, with ``files`` (each file the key covers -> its digest), under
        ``slot`` (what stays the same between builds of that op: its cache digest
        and the input's index). When ``slot`` held another content key, the files
        that differ from it (changed, added or removed; sorted) become what
        :meth:`changed_files` answers for ``(vertex, input)``."""
        ...

    def changed_files(self, vertex: str, input: int) -> tuple[str, ...] | None:
        """The files that made op ``vertex``'s content key for input ``input``
        differ from the one before, as :meth:`record_content` found them in this
        process; ``None`` if it found no earlier content key to compare with."""
        ...


class InMemoryOpHistory:
    """An :class:`OpHistory` in memory, bounded to ``max_ops`` ops (least recently
    seen out first). Every method is O(1) per op, plus O(ops over the same inputs
    or at the same place) for :meth:`previous`."""

    def __init__(self, max_ops: int = DEFAULT_MAX_OPS) -> None:
        if max_ops < 1:
            raise ValueError(f"an op history keeps at least 1 op, not {max_ops}")
        self.max_ops = max_ops
        self._ops: OrderedDict[str, OpDefinitionRecord] = OrderedDict()
        # the digests over each inputs key and at each place, least recently seen first
        self._by_inputs: dict[str, OrderedDict[str, None]] = {}
        self._by_place: dict[str, OrderedDict[str, None]] = {}
        # content keys by slot: (digest, files), least recently recorded first
        self._contents: OrderedDict[str, tuple[str, dict[str, str]]] = OrderedDict()
        self._changed: OrderedDict[tuple[str, int], tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        return f"<InMemoryOpHistory {len(self._ops)}/{self.max_ops} ops>"

    async def record(self, records: Iterable[OpDefinitionRecord]) -> None:
        for rec in records:
            self._forget(rec.digest)
            self._ops[rec.digest] = rec
            _index_add(self._by_inputs, inputs_key(rec.op.inputs), rec.digest)
            _index_add(self._by_place, rec.place, rec.digest)
        while len(self._ops) > self.max_ops:
            self._forget(next(iter(self._ops)))
        await anyio.lowlevel.checkpoint()

    async def get(self, digest: str) -> OpDefinitionRecord | None:
        await anyio.lowlevel.checkpoint()
        return self._ops.get(digest)

    async def previous(self, op: OpDef, place: str) -> OpDefinitionRecord | None:
        await anyio.lowlevel.checkpoint()
        candidates: list[str] = []
        if op.inputs:
            candidates.extend(reversed(self._by_inputs.get(inputs_key(op.inputs), {})))
        candidates.extend(reversed(self._by_place.get(place, {})))
        for digest in candidates:
            if digest != op.digest:
                return self._ops[digest]
        return None

    async def record_content(
        self, vertex: str, input: int, slot: str, digest: str, files: Mapping[str, str]
    ) -> None:
        before = self._contents.pop(slot, None)
        if before is not None and before[0] == digest:
            self._contents[slot] = before  # the same key: only its recency changes
            await anyio.lowlevel.checkpoint()
            return
        self._contents[slot] = (digest, dict(files))
        if len(self._contents) > self.max_ops:
            self._contents.popitem(last=False)
        if before is not None and before[0] != digest:
            note_changed_files(self._changed, vertex, input, files_that_differ(before[1], files))
        await anyio.lowlevel.checkpoint()

    def changed_files(self, vertex: str, input: int) -> tuple[str, ...] | None:
        return self._changed.get((vertex, input))

    def _forget(self, digest: str) -> None:
        rec = self._ops.pop(digest, None)
        if rec is not None:
            _index_remove(self._by_inputs, inputs_key(rec.op.inputs), digest)
            _index_remove(self._by_place, rec.place, digest)


def files_that_differ(before: Mapping[str, str], after: Mapping[str, str]) -> tuple[str, ...]:
    """The paths whose digests differ between ``before`` and ``after`` (each path
    -> digest), those on one side only included; sorted. O(files)."""
    return tuple(sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p)))


def note_changed_files(
    changed: OrderedDict[tuple[str, int], tuple[str, ...]],
    vertex: str,
    input: int,
    files: tuple[str, ...],
) -> None:
    """Remember ``files`` for ``(vertex, input)`` in ``changed``, the
    :data:`MAX_CHANGED` most recent kept."""
    changed.pop((vertex, input), None)
    changed[vertex, input] = files
    if len(changed) > MAX_CHANGED:
        changed.popitem(last=False)


def _index_add(index: dict[str, OrderedDict[str, None]], key: str, digest: str) -> None:
    if key:
        index.setdefault(key, OrderedDict())[digest] = None


def _index_remove(index: dict[str, OrderedDict[str, None]], key: str, digest: str) -> None:
    entries = index.get(key)
    if entries is not None:
        entries.pop(digest, None)
        if not entries:
            del index[key]
