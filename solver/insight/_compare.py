"""Two builds side by side: what ran in the second that the first had cached,
and where op time changed most.

Ops are matched by digest first: the same digest is the same work with the same
inputs. An op whose input changed has a new digest, so the ops left are then
matched by name when the name is unique in both builds (the same step, built on
something else); ops still unmatched are new in B, or gone from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._summary import CACHED_OP, BuildSummary, OpRecord

__all__ = ["BuildComparison", "OpChange", "compare_builds"]


@dataclass(frozen=True, slots=True)
class OpChange:
    """One op in both builds: ``a`` and ``b`` its records; ``same_digest`` whether
    it is the same work (else matched by name: an input or the op changed)."""

    a: OpRecord
    b: OpRecord

    @property
    def same_digest(self) -> bool:
        return self.a.digest == self.b.digest

    @property
    def time_change(self) -> float:
        """Seconds more (or less, negative) the op ran in B than in A."""
        return self.b.duration - self.a.duration


@dataclass(frozen=True, slots=True)
class BuildComparison:
    """What changed from build A to build B.

    ``ran_instead_of_cached``: ops that ran in B and came from a cache in A;
    ``new``: ops of B that ran and have no counterpart in A; ``gone``: ops of A
    with no counterpart in B; ``time_changes``: ops that ran in both, largest
    change in op time first."""

    ran_instead_of_cached: tuple[OpChange, ...]
    new: tuple[OpRecord, ...]
    gone: tuple[OpRecord, ...]
    time_changes: tuple[OpChange, ...]

    def lines(self, limit: int = 10) -> list[str]:
        """The comparison as text (``solver history compare``); at most ``limit``
        time changes."""
        out = [f"Ran in B, cached in A: {len(self.ran_instead_of_cached)}"]
        for c in self.ran_instead_of_cached:
            how = "same op" if c.same_digest else "changed"
            reason = f": {c.b.reason}" if c.b.reason else ""
            out.append(f"  {c.b.name} ({how}, {c.b.duration:.3f}s){reason}")
        if self.new:
            out.append(f"Ran in B, not in A: {len(self.new)}")
            out += [f"  {op.name} ({op.duration:.3f}s)" for op in self.new]
        if self.gone:
            out.append(f"In A, not in B: {len(self.gone)}")
            out += [f"  {op.name}" for op in self.gone]
        shown = self.time_changes[:limit]
        out.append(f"Largest changes in op time: {len(shown)} of {len(self.time_changes)}")
        out += [
            f"  {c.b.name}: {c.a.duration:.3f}s -> {c.b.duration:.3f}s "
            f"({c.time_change:+.3f}s)"
            for c in shown
        ]
        return out


def compare_builds(a: BuildSummary, b: BuildSummary) -> BuildComparison:
    """Compare build ``a`` with build ``b``. O(ops log ops)."""
    a_by_digest = {op.digest: op for op in a.ops}
    pairs: list[OpChange] = []
    left_b: list[OpRecord] = []
    for op in b.ops:
        other = a_by_digest.pop(op.digest, None)
        if other is None:
            left_b.append(op)
        else:
            pairs.append(OpChange(other, op))
    a_names: dict[str, list[OpRecord]] = {}
    for op in a_by_digest.values():
        a_names.setdefault(op.name, []).append(op)
    b_names: dict[str, int] = {}
    for op in left_b:
        b_names[op.name] = b_names.get(op.name, 0) + 1
    new: list[OpRecord] = []
    for op in left_b:
        match = a_names.get(op.name)
        if match is not None and len(match) == 1 and b_names[op.name] == 1 and op.name:
            pairs.append(OpChange(match.pop(), op))
        elif op.ran:
            new.append(op)
    gone = tuple(op for ops in a_names.values() for op in ops)
    order = {id(op): i for i, op in enumerate(b.ops)}
    pairs.sort(key=lambda p: order[id(p.b)])
    ran_instead = tuple(p for p in pairs if p.a.state == CACHED_OP and p.b.ran)
    both = [p for p in pairs if p.a.ran and p.b.ran]
    both.sort(key=lambda p: -abs(p.time_change))
    return BuildComparison(ran_instead, tuple(new), gone, tuple(both))
