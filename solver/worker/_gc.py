"""Garbage collection of the snapshot store: prune policies.

A *prune policy* is an ordered list of :class:`PrunePolicy` rules, in the manner of
BuildKit's GC policies. :meth:`SnapshotStore.prune_by_policy` applies the rules one
after the other, each to what the rules before it left; a :class:`Worker` given
``gc_policy=`` applies its rules after every solve (:meth:`Worker.after_solve`).

One rule
--------

A rule picks the snapshots it *may* delete (the eligible ones) and says how many
bytes should remain (its space limit); it deletes eligible snapshots, least recently
used first, until the store's used space is within the limit.

Eligible: not in use (no live handle: a cache holding a clone of a result keeps it
in use), matching at least one of ``filters`` (any snapshot when there are none),
and not used within ``keep_duration``.

The limit, from the store's used space ``used`` (every snapshot's size, in use or
not) and the free space ``free`` on the root's file system (measured only for a
rule with ``min_free_space``):

* no ``max_used_space``, ``min_free_space`` or ``reserved_space``: no limit, every
  eligible snapshot is deleted;
* ``max_used_space``: at most that many bytes;
* ``min_free_space``: when ``free`` is below it, ``used`` must shrink by the
  difference (the smaller limit wins with ``max_used_space``); when there is enough
  free space, this part asks for nothing;
* ``reserved_space`` is a floor: the rule never deletes below it (alone, it works as
  a limit of that many bytes, as in BuildKit).

So ``PrunePolicy(keep_duration=48 * 3600)`` deletes everything unused for two days;
``PrunePolicy(max_used_space=10 * 10**9)`` keeps the store under 10 GB by dropping
the least recently used snapshots; with both, snapshots used within two days survive
even when the store is over 10 GB. Snapshots in use count toward ``used`` but are
never deleted, so a rule may end above its limit.

Unlike BuildKit, a rule whose ``min_free_space`` is met (and that sets no other
limit) deletes nothing at all.

Filters
-------

A filter is ``field OP value``, several joined by ``,`` must all hold; a rule's
``filters`` are alternatives (a snapshot matches when any one of them holds), as in
BuildKit's ``--filter``. Fields:

* ``kind``: the op kind that made the snapshot (the ``"kind"`` of its description:
  ``source.inline``, ``source.local``, ``file``, ``merge``, ``exec``, or an
  application's own), ``""`` when it has none;
* ``description``: its label as ``solver du`` shows it (the vertex name, or an exec's
  command line);
* ``id``: the snapshot id.

Operators: ``==`` (or ``=``) equal, ``!=`` not equal, ``~=`` the regular expression
matches somewhere in the value (``re.search``). A value cannot contain ``,``;
spaces around a value are ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "PrunePolicy",
    "snapshot_kind",
    "snapshot_label",
]

_FIELDS: Final = ("kind", "description", "id")
# Longest operators first, so that "==" is not read as "=" followed by "=value".
_FILTER: Final = re.compile(r"^\s*([A-Za-z_]+)\s*(==|!=|~=|=)(.*)$", re.DOTALL)


def snapshot_kind(description: Mapping[str, Any]) -> str:
    """The op kind recorded in a snapshot's description, ``""`` when none."""
    kind = description.get("kind")
    return kind if isinstance(kind, str) else ""


def snapshot_label(description: Mapping[str, Any]) -> str:
    """A one-line label from a snapshot's description: its ``"name"``, else an
    exec's command line (``"args"``), else ``""``; runs of whitespace become one
    space."""
    name = description.get("name")
    text = name if isinstance(name, str) else ""
    if not text:
        args = description.get("args")
        if isinstance(args, list):
            text = " ".join(str(arg) for arg in args)
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class _Condition:
    field: str
    op: str
    value: str
    pattern: re.Pattern[str] | None

    def holds(self, values: Mapping[str, str]) -> bool:
        actual = values[self.field]
        if self.pattern is not None:
            return self.pattern.search(actual) is not None
        return (actual == self.value) == (self.op == "==")


def _parse_filter(text: str) -> tuple[_Condition, ...]:
    if not isinstance(text, str):
        raise TypeError(f"a prune filter must be a string, not {type(text).__name__}")
    conditions: list[_Condition] = []
    for part in text.split(","):
        m = _FILTER.match(part)
        if m is None:
            raise ValueError(
                f"invalid prune filter {text!r}: expected FIELD==VALUE, FIELD!=VALUE or "
                f"FIELD~=REGEX (fields: {', '.join(_FIELDS)}), several joined by ','"
            )
        name, op, value = m.group(1).lower(), m.group(2), m.group(3).strip()
        if name not in _FIELDS:
            raise ValueError(
                f"invalid prune filter {text!r}: unknown field {m.group(1)!r} "
                f"(expected one of {', '.join(_FIELDS)})"
            )
        pattern: re.Pattern[str] | None = None
        if op == "~=":
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise ValueError(
                    f"invalid prune filter {text!r}: bad regular expression {value!r}: {exc}"
                ) from None
        conditions.append(_Condition(name, "==" if op == "=" else op, value, pattern))
    return tuple(conditions)


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PrunePolicy.{name} must be an int (bytes), not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"PrunePolicy.{name} must not be negative (got {value})")


@dataclass(frozen=True, slots=True)
class PrunePolicy:
    """One rule of a prune policy (see the module documentation for the semantics).

    ``keep_duration`` is in seconds; the spaces are in bytes; ``0`` means "not set"
    for each. ``filters`` are strings such as ``"kind==exec"`` or
    ``"kind==source.local,description~=^vendor"``; they are parsed when the rule is
    made, so a bad one raises :class:`ValueError` (or :class:`TypeError`) at once.
    Rules compare and hash by their fields.
    """

    keep_duration: float = 0.0
    reserved_space: int = 0
    max_used_space: int = 0
    min_free_space: int = 0
    filters: tuple[str, ...] = ()
    _conditions: tuple[tuple[_Condition, ...], ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        duration = self.keep_duration
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            raise TypeError(
                f"PrunePolicy.keep_duration must be a number of seconds, not "
                f"{type(duration).__name__}"
            )
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(
                f"PrunePolicy.keep_duration must be a finite number >= 0 (got {duration})"
            )
        for name in ("reserved_space", "max_used_space", "min_free_space"):
            _check_size(name, getattr(self, name))
        filters: object = self.filters
        if isinstance(filters, str) or not isinstance(filters, Sequence):
            raise TypeError(
                "PrunePolicy.filters must be a sequence of filter strings "
                f"(got {type(filters).__name__})"
            )
        object.__setattr__(self, "keep_duration", float(duration))
        object.__setattr__(self, "filters", tuple(filters))
        object.__setattr__(self, "_conditions", tuple(_parse_filter(f) for f in self.filters))

    @property
    def has_space_limit(self) -> bool:
        """True when the rule sets any of the three spaces."""
        return bool(self.max_used_space or self.min_free_space or self.reserved_space)

    def matches(self, id: str, description: Mapping[str, Any]) -> bool:
        """Whether a snapshot with this id and description passes the filters."""
        if not self._conditions:
            return True
        values = {
            "kind": snapshot_kind(description),
            "description": snapshot_label(description),
            "id": id,
        }
        return any(
            all(condition.holds(values) for condition in alternative)
            for alternative in self._conditions
        )

    def space_limit(self, used: int, free: int | None) -> int | None:
        """The most bytes the store may use once the rule has run, given the used
        space and the free space (needed only when ``min_free_space`` is set); None
        when the rule sets no space limit (every eligible snapshot goes). O(1)."""
        if not self.has_space_limit:
            return None
        limit: int | None = self.max_used_space or None
        if self.min_free_space:
            if free is None:
                raise ValueError("the free space is needed for a rule with min_free_space")
            shortfall = self.min_free_space - free
            if shortfall > 0:
                target = used - shortfall
                limit = target if limit is None else min(limit, target)
            elif limit is None:
                limit = used  # enough free space and no other cap: nothing to do
        if limit is None:
            return self.reserved_space  # only reserved_space: a cap, as in BuildKit
        return max(limit, self.reserved_space)


def as_rules(policy: PrunePolicy | Sequence[PrunePolicy]) -> tuple[PrunePolicy, ...]:
    """One rule, or a sequence of them, as a tuple; TypeError for anything else."""
    rules = (policy,) if isinstance(policy, PrunePolicy) else tuple(policy)
    for rule in rules:
        if not isinstance(rule, PrunePolicy):
            raise TypeError(f"a prune policy is made of PrunePolicy rules, not {rule!r}")
    return rules
