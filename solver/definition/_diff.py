"""Comparing two definitions: which ops differ, and the first field that does.

Two definitions are walked together from their outputs: the ops at the same
place in both graphs (the outputs, then input ``i`` of a pair, then its inputs)
form a pair. Content addressing makes the walk short: a pair with equal digests
is the same op over the same inputs, so nothing below it can differ and the walk
stops there. A pair with different digests differs in its own fields (its kind,
a payload field, its number of inputs: a *root cause*), or only because an
input's digest differs (the change came from below). The walk goes on below a
root cause too (its inputs may have changed as well), unless its number of
inputs changed: then they no longer pair up. Metadata (name,
description, ``ignore_cache``) is outside the digests, so it is compared for
every op both definitions share.

The changes come out root causes first, deepest first, then the ops that differ
only through their inputs, inputs first, each naming the root cause it comes
from: the first line is where to look. O(ops of both definitions + payload size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._definition import Definition, JSONValue, OpDef, OpMetadata

__all__ = ["OpChange", "diff_definitions", "op_difference"]


@dataclass(frozen=True, slots=True)
class OpChange:
    """One op that differs between definitions ``a`` and ``b``.

    ``a`` and ``b`` are its digests in each (equal for a metadata change; ``None``
    where one side has no op at that place). ``name`` is how the op is shown (its
    metadata name in ``b``, else in ``a``, else its kind). ``field`` is the first
    field that differs: ``"kind"``, ``"payload.<path>"`` (``payload.args[3]``),
    ``"inputs"`` (their number), ``"input <i>"`` (only that input's digest or
    output index changed), ``"output"`` (the definitions' output index), or
    ``"metadata.<name|description|ignore_cache>"``; ``before`` and ``after`` are
    the values on each side (for an input: the input ops' names). ``cause`` is,
    for an op that differs only through its inputs, the name of the op whose own
    fields started the change (``None`` for a root cause). ``root_cause`` says
    whether the op's own definition changed.
    """

    a: str | None
    b: str | None
    name: str
    field: str
    before: JSONValue
    after: JSONValue
    cause: str | None = None

    @property
    def root_cause(self) -> bool:
        """True when the op's own fields differ (not only its inputs)."""
        return self.cause is None and not self.field.startswith(("input ", "metadata."))

    def describe(self) -> str:
        """One line: ``name (digests): field: before -> after`` or, for an op that
        changed through an input, ``name: input i changed, from <cause>``."""
        if self.field.startswith("input "):
            return f"{self.name}: {self.field} changed, from {self.cause}"
        digests = _short(self.a) + (
            "" if self.a == self.b else f" -> {_short(self.b)}"
        )
        return (
            f"{self.name} ({digests}): {self.field}: "
            f"{_show(self.before)} -> {_show(self.after)}"
        )


def diff_definitions(a: Definition, b: Definition) -> list[OpChange]:
    """The ops that differ between ``a`` and ``b`` (see the module docstring for
    the pairing and the order); empty when they build the same output with the
    same metadata."""
    root: list[tuple[int, OpChange]] = []  # (depth, change)
    through: list[tuple[int, str, str]] = []  # (depth, digest in a, in b), inputs first
    seen: set[tuple[str, str]] = set()
    # the root causes each differing pair leads to, found once the walk is done
    below: dict[tuple[str, str], list[tuple[str, str]]] = {}
    changes: list[OpChange] = []
    if a.output.index != b.output.index:
        changes.append(
            OpChange(
                a.output.digest,
                b.output.digest,
                _name(b, b.output.digest),
                "output",
                a.output.index,
                b.output.index,
            )
        )
    stack: list[tuple[str, str, int]] = [(a.output.digest, b.output.digest, 0)]
    while stack:
        da, db, depth = stack.pop()
        if da == db or (da, db) in seen:
            continue
        seen.add((da, db))
        opa, opb = a.ops[da], b.ops[db]
        own = _own_difference(opa, opb)
        if own is not None:
            name = _name(b, db) if db in b.metadata else _name(a, da)
            root.append((depth, OpChange(da, db, name, *own)))
        if len(opa.inputs) != len(opb.inputs):
            continue  # inputs no longer pair up: the op itself is the change
        pairs = below.setdefault((da, db), [])
        for ia, ib in zip(opa.inputs, opb.inputs, strict=True):
            if ia.digest != ib.digest:
                pairs.append((ia.digest, ib.digest))
                stack.append((ia.digest, ib.digest, depth + 1))
            elif ia.index != ib.index:
                pairs.append((ia.digest, ib.digest))
        if own is None:
            through.append((depth, da, db))
    root.sort(key=lambda item: -item[0])
    changes.extend(change for _, change in root)
    names = {(c.a, c.b): c.name for c in changes if c.a is not None and c.b is not None}
    for _, da, db in sorted(through, key=lambda item: -item[0]):
        opa, opb = a.ops[da], b.ops[db]
        name = _name(b, db)
        for i, (ia, ib) in enumerate(zip(opa.inputs, opb.inputs, strict=True)):
            if ia == ib:
                continue
            cause = _first_cause((ia.digest, ib.digest), below, names) or _name(b, ib.digest)
            if ia.digest == ib.digest:  # the same op, another of its outputs
                cause = f"{cause} (output {ia.index} -> {ib.index})"
            changes.append(
                OpChange(da, db, name, f"input {i}", _name(a, ia.digest), _name(b, ib.digest),
                         cause)
            )
            break  # the first differing input is the one a user follows
    changes.extend(_metadata_changes(a, b))
    return changes


def op_difference(a: OpDef, b: OpDef) -> tuple[str, JSONValue, JSONValue] | None:
    """The first of ``a``'s own fields that differs in ``b``, as ``(field, value in
    a, value in b)``: ``"kind"``, then ``"payload.<path>"`` (sorted keys, depth
    first), then ``"inputs"`` (their number); ``None`` when only the inputs'
    digests differ, or nothing does. O(payload size)."""
    return _own_difference(a, b)


def _own_difference(a: OpDef, b: OpDef) -> tuple[str, JSONValue, JSONValue] | None:
    if a.kind != b.kind:
        return "kind", a.kind, b.kind
    found = _first_difference(a.payload, b.payload, "payload")
    if found is not None:
        return found
    if len(a.inputs) != len(b.inputs):
        return "inputs", len(a.inputs), len(b.inputs)
    return None


def _first_difference(
    a: JSONValue, b: JSONValue, path: str
) -> tuple[str, JSONValue, JSONValue] | None:
    """The first place (in sorted key order, depth first) where ``a`` and ``b``
    differ, with both values there; iterative. A missing key is ``None`` on its
    side; lists of different lengths with an equal common part differ in
    ``<path> (length)``."""
    stack: list[tuple[JSONValue, JSONValue, str]] = [(a, b, path)]
    while stack:
        x, y, where = stack.pop()
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            # pushed in reverse, so that the smallest key is looked at first
            for key in sorted(set(x) | set(y), reverse=True):
                stack.append((x.get(key), y.get(key), f"{where}.{key}"))
        elif _is_list(x) and _is_list(y):
            assert isinstance(x, Sequence)
            assert isinstance(y, Sequence)
            n = min(len(x), len(y))
            if len(x) != len(y) and x[:n] == y[:n]:
                return f"{where} (length)", len(x), len(y)
            for i in reversed(range(n)):
                stack.append((x[i], y[i], f"{where}[{i}]"))
        elif type(x) is not type(y) or x != y:
            return where, x, y
    return None


def _metadata_changes(a: Definition, b: Definition) -> list[OpChange]:
    changes = []
    for digest in sorted(set(a.ops) & set(b.ops)):
        ma = a.metadata.get(digest, OpMetadata())
        mb = b.metadata.get(digest, OpMetadata())
        if ma == mb:
            continue
        name = _name(b, digest)
        for field in ("name", "ignore_cache", "description"):
            va, vb = getattr(ma, field), getattr(mb, field)
            if va != vb:
                before = dict(va) if field == "description" else va
                after = dict(vb) if field == "description" else vb
                changes.append(OpChange(digest, digest, name, f"metadata.{field}", before, after))
                break
    return changes


def _first_cause(
    start: tuple[str, str],
    below: Mapping[tuple[str, str], Sequence[tuple[str, str]]],
    names: Mapping[tuple[str, str], str],
) -> str | None:
    """The name of the first root cause reached from the pair ``start``."""
    stack = [start]
    seen: set[tuple[str, str]] = set()
    while stack:
        pair = stack.pop()
        if pair in names:
            return names[pair]
        if pair in seen:
            continue
        seen.add(pair)
        stack.extend(reversed(below.get(pair, ())))
    return None


def _name(defn: Definition, digest: str) -> str:
    meta = defn.metadata.get(digest)
    if meta is not None and meta.name:
        return meta.name
    return f"{defn.ops[digest].kind} {_short(digest)}"


def _short(digest: str | None) -> str:
    return "-" if digest is None else digest[:19]


def _show(value: JSONValue) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)
