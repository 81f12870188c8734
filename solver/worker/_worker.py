"""The built-in worker: a snapshot store and the op kinds bound to it.

::

    async with Worker(root) as worker, Solver(worker=worker) as solver:
        async with await solver.solve(state.definition()) as result:
            data = await result.ref.sys.read_bytes("a.txt")

``Solver(worker=worker)`` uses the worker's op kinds and its persistent cache
(:attr:`Worker.cache`), so a later process opening the same root executes nothing it
has built before.

``Worker.op_kinds`` is a fresh :class:`~solver.OpKindRegistry` in which the built-in
kinds (``source.inline``, ``source.local``, ``file``, ``merge`` and ``exec``) are registered with
:meth:`~solver.OpKindRegistry.register`, exactly as an application registers its
own; an application may register more kinds into it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import anyio
import anyio.lowlevel

from .._errors import SolveError
from ..cache import KeyedCacheManager
from ..definition import OpHistory, OpKindRegistry
from ._cacheresults import open_worker_cache
from ._exec import SecretSource, register_exec
from ._fileops import register_file
from ._gc import PrunePolicy, as_rules
from ._merge import register_merge
from ._ophistory import OP_HISTORY_DB_NAME, SQLiteOpHistory
from ._sandbox import SandboxMode
from ._slots import StepSlots, default_parallelism
from ._snapshots import SnapshotInfo, SnapshotStore
from ._sources import register_sources

__all__ = ["Worker", "register_builtin_kinds"]

_log = logging.getLogger("solver")


def register_builtin_kinds(
    registry: OpKindRegistry,
    store: SnapshotStore,
    *,
    sandbox: SandboxMode = "bwrap",
    secrets: Mapping[str, SecretSource] | None = None,
    history: Callable[[], OpHistory | None] | None = None,
    keep_failed: int = 0,
    slots: StepSlots | None = None,
) -> None:
    """Register the built-in kinds (``source.inline``, ``source.local``, ``file``,
    ``merge``, ``exec``) into ``registry``, bound to ``store``; ``sandbox``,
    ``secrets``, ``keep_failed`` and ``slots`` are :func:`register_exec`'s;
    ``history()`` is the op history the ``file`` op records its content keys in
    and ``source.local`` the files of its cache digest (:func:`register_file`,
    :func:`register_sources`)."""
    register_sources(registry, store, history)
    register_file(registry, store, history)
    register_merge(registry, store)
    register_exec(
        registry, store, sandbox=sandbox, secrets=secrets, keep_failed=keep_failed,
        slots=slots,
    )


class Worker:
    """A :class:`SnapshotStore` at ``root`` (default
    :func:`~solver.worker.default_root`) and the op kinds that use it.

    Open it (``await worker.open()`` or ``async with``) before solving; closing it
    closes the store (snapshots stay on disk for the next process). Opening also
    opens the worker's persistent cache, :attr:`cache` (``cache.db`` in the store's
    root) and its op history, :attr:`op_history` (``ophistory.db``); closing closes
    them.

    ``lock_timeout`` is how long :meth:`open` waits while another process has the
    root open (``None``: as long as it takes; see :class:`SnapshotStore`).

    ``gc_policy`` is the prune policy (ordered :class:`PrunePolicy` rules) that
    :meth:`after_solve` applies; without one there is no automatic garbage
    collection.

    ``sandbox`` is how ``exec`` steps run: ``"bwrap"`` (the default) in a
    bubblewrap sandbox that sees only its mounts and a read-only system root
    (``docs/worker.md``, "Sandbox"); ``"none"`` as plain host processes, which only
    this explicit option gives (each such step says so in its progress, and the
    mode is part of the cache keys, so results never mix). ``secrets`` maps the
    secret ids ``exec`` ops may name (payload ``"secrets"``) to their contents
    (``bytes``) or to a host file (a path); a step sees them as read-only files in
    ``/run/secrets``, and they are never part of a cache key, a record, progress
    or an export.

    ``keep_failed`` is how many failed ``exec`` steps to keep, newest first, with
    their trees as the failure left them, for ``solver debug``
    (``<root>/failed``; ``docs/insight.md``); 0, the default, keeps none.
    ``max_parallelism`` bounds how many ``exec`` steps run at once (``make
    -jN``; default ``os.cpu_count()``): a step waits for a free slot before it
    starts, so progress shows it started only once it runs (``docs/worker.md``,
    "Running steps in parallel"). :attr:`slots` shows the bound in use.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        gc_policy: PrunePolicy | Sequence[PrunePolicy] | None = None,
        lock_timeout: float | None = None,
        sandbox: SandboxMode = "bwrap",
        secrets: Mapping[str, SecretSource] | None = None,
        keep_failed: int = 0,
        max_parallelism: int | None = None,
    ) -> None:
        self.slots = StepSlots(
            default_parallelism() if max_parallelism is None else max_parallelism
        )
        self.store = SnapshotStore(root, lock_timeout=lock_timeout)
        self.op_kinds = OpKindRegistry()
        self.sandbox: SandboxMode = sandbox
        register_builtin_kinds(
            self.op_kinds, self.store, sandbox=sandbox, secrets=secrets,
            history=lambda: self._op_history, keep_failed=keep_failed, slots=self.slots,
        )
        self.gc_policy: tuple[PrunePolicy, ...] = (
            as_rules(gc_policy) if gc_policy is not None else ()
        )
        self._collecting = False
        self._cache: KeyedCacheManager | None = None
        self._op_history: SQLiteOpHistory | None = None

    @property
    def cache(self) -> KeyedCacheManager:
        """The persistent cache: cache records in ``<store root>/cache.db``, results
        in the store (see :mod:`solver.worker._cacheresults`). Available once the
        worker is open; it is the worker's (closed by :meth:`close`). Pass the worker
        to :class:`~solver.Solver` (``Solver(worker=worker)``) to use it."""
        if self._cache is None:
            raise SolveError(
                f"the worker at {self.store.root} is not open: its cache is opened with it "
                "('async with Worker(...)' or 'await worker.open()')"
            )
        return self._cache

    @property
    def op_history(self) -> OpHistory:
        """The persistent op history (``<store root>/ophistory.db``, see
        :mod:`solver.worker._ophistory`): the op definitions of past solves, which
        explain a later cache miss. Available once the worker is open."""
        if self._op_history is None:
            raise SolveError(
                f"the worker at {self.store.root} is not open: its op history is opened "
                "with it ('async with Worker(...)' or 'await worker.open()')"
            )
        return self._op_history

    async def prune(self, policy: PrunePolicy | Sequence[PrunePolicy]) -> list[SnapshotInfo]:
        """Apply ``policy`` to the store now (:meth:`SnapshotStore.prune_by_policy`);
        return what was deleted."""
        return await self.store.prune_by_policy(policy)

    async def after_solve(self) -> None:
        """Automatic garbage collection: apply :attr:`gc_policy` (nothing when it is
        empty or the store is not open). Meant to be awaited after each solve; it
        never raises an error into the caller (a failure is logged at ERROR on the
        ``solver`` logger), only cancellation. A call while another one is still
        pruning returns at once. Cheap when nothing needs pruning (see
        :meth:`SnapshotStore.prune_by_policy`). Always a checkpoint."""
        if self.gc_policy and not self._collecting and self.store.is_open:
            self._collecting = True
            try:
                deleted = await self.store.prune_by_policy(self.gc_policy)
            except Exception:
                _log.exception("automatic garbage collection of %s failed", self.store.root)
            else:
                if deleted:
                    _log.info(
                        "garbage collection deleted %d snapshot(s), %d bytes, from %s",
                        len(deleted), sum(info.size for info in deleted), self.store.root,
                    )
            finally:
                self._collecting = False
        await anyio.lowlevel.checkpoint()

    async def open(self) -> None:
        """Open the store (see :meth:`SnapshotStore.open`), then the persistent cache
        beside it, releasing the records of snapshots deleted since it was last
        open."""
        self.slots.reset()
        await self.store.open()
        try:
            self._cache = await open_worker_cache(self.store)
            self._op_history = await SQLiteOpHistory.open(self.store.root / OP_HISTORY_DB_NAME)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if self._cache is not None:
                    await self._cache.close()
                    self._cache = None
                await self.store.close()
            raise

    async def close(self) -> None:
        """Close the cache, then the store; idempotent."""
        try:
            if self._op_history is not None:
                await self._op_history.close()
            if self._cache is not None:
                await self._cache.close()
        finally:
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
        return (
            f"<Worker at {self.store.root} kinds={self.op_kinds.names()} "
            f"sandbox={self.sandbox} max_parallelism={self.slots.total}>"
        )
