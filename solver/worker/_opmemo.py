"""What the worker's op kinds derive from an op's payload, kept per op digest.

The engine resolves the op of every active vertex on every build, a no-op build
included, and a kind's factory used to parse its payload again each time and
compute its cache digest from a fresh canonical encoding (issue 21: 70 ops of a
C build, 5.7 ms of a 12.5 ms no-op build, the exec kind's ``cache_digest`` 3.2
ms of it). Those results depend on nothing but the op's payload and inputs and
the kind's registration (its sandbox mode), and an op of a
:class:`~solver.Definition` is content-addressed: its digest
(:attr:`OpDef.digest <solver.OpDef.digest>`, computed from its canonical
encoding when the op is made) names exactly one payload and one list of inputs.
So a registration keeps them in an :class:`OpMemo` keyed by that digest, and a
later build, or a later process's build of the same op in the same process,
takes them from there.

What is never kept: anything that depends on the files (a local source's stat
check, content keys) or on the vertex's metadata (its name, which is outside the
digest): those stay per build and per vertex.

Bounded by :data:`MAX_OPS` entries, emptied when full (an entry is a few hundred
bytes). Reads and writes are single dict operations, atomic in CPython, so the
memo needs no lock when several solvers share a registration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Generic, TypeVar

from ..definition import OpContext, OpDef

__all__ = ["MAX_OPS", "OpMemo"]

MAX_OPS: Final = 4096
"""Op digests one memo keeps (emptied when full)."""

T = TypeVar("T")


class OpMemo(Generic[T]):
    """``derive(context)`` once per op digest (see the module docstring)."""

    __slots__ = ("_derive", "_known", "made")

    def __init__(self, derive: Callable[[OpContext], T]) -> None:
        self._derive = derive
        self._known: dict[str, T] = {}
        self.made = 0  # how many times ``derive`` ran (for tests and benchmarks)

    def get(self, ctx: OpContext) -> T:
        """What ``derive`` makes of the op ``ctx`` describes, derived on the first
        call for the op's digest when the vertex's ``sys`` is the
        :class:`~solver.OpDef` whose payload ``ctx`` holds (else every time:
        nothing content-addressed to key on). An exception from ``derive`` is
        raised and nothing is kept."""
        op = ctx.vertex.sys
        if not isinstance(op, OpDef) or op.payload is not ctx.payload:
            return self._derive_counted(ctx)
        known = self._known.get(op.digest)
        if known is None:
            known = self._derive_counted(ctx)
            if len(self._known) >= MAX_OPS:
                self._known.clear()
            self._known[op.digest] = known
        return known

    def _derive_counted(self, ctx: OpContext) -> T:
        self.made += 1
        return self._derive(ctx)

    def __len__(self) -> int:
        return len(self._known)
