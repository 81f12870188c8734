"""The built-in worker: a snapshot store and the op kinds bound to it.

::

    async with Worker(root) as worker, Solver(op_kinds=worker.op_kinds) as solver:
        async with await solver.solve(state.definition()) as result:
            data = await result.ref.sys.read_bytes("a.txt")

``Worker.op_kinds`` is a fresh :class:`~solver.OpKindRegistry` in which the built-in
kinds (``source.inline``, ``source.local``, ``file``, ``merge`` and ``exec``) are registered with
:meth:`~solver.OpKindRegistry.register`, exactly as an application registers its
own; an application may register more kinds into it.
"""

from __future__ import annotations

import os
from types import TracebackType

from .._opkind import OpKindRegistry
from ._exec import register_exec
from ._fileops import register_file
from ._merge import register_merge
from ._snapshots import SnapshotStore
from ._sources import register_sources

__all__ = ["Worker", "register_builtin_kinds"]


def register_builtin_kinds(registry: OpKindRegistry, store: SnapshotStore) -> None:
    """Register the built-in kinds (``source.inline``, ``source.local``, ``file``,
    ``merge``, ``exec``) into ``registry``, bound to ``store``."""
    register_sources(registry, store)
    register_file(registry, store)
    register_merge(registry, store)
    register_exec(registry, store)


class Worker:
    """A :class:`SnapshotStore` at ``root`` (default
    :func:`~solver.worker.default_root`) and the op kinds that use it.

    Open it (``await worker.open()`` or ``async with``) before solving; closing it
    closes the store (snapshots stay on disk for the next process).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.store = SnapshotStore(root)
        self.op_kinds = OpKindRegistry()
        register_builtin_kinds(self.op_kinds, self.store)

    async def open(self) -> None:
        """Open the store (see :meth:`SnapshotStore.open`)."""
        await self.store.open()

    async def close(self) -> None:
        """Close the store; idempotent."""
        await self.store.close()

    async def __aenter__(self) -> Worker:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Worker at {self.store.root} kinds={self.op_kinds.names()}>"
