"""The client end of a Dask distributed cluster: connect, move blobs, run ops.

:class:`DaskCluster` wraps one ``distributed.Client`` in its synchronous form: the
client runs its own asyncio loop in a thread of its own, and every call into it
from the solver's loop goes through a worker thread (``anyio.to_thread``). So the
cluster works the same under asyncio and trio, and a slow scheduler never blocks
the solver's event loop (``docs/remote.md``, "Why a thread bridge").

Data moves by content: a local snapshot is packed into a blob
(:class:`~solver.worker.SnapshotBlobCodec`) and scattered with a key derived from
its bytes, so two clients sending the same snapshot make one copy on the cluster;
an op's outputs stay on the worker that made them, held by their future, and a
later op that takes them as inputs names that future, so Dask prefers that worker
and moves nothing (data locality).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread

from .._errors import SolveError
from ..definition import OpKind, OpKindRegistry
from ..worker import SnapshotBlobCodec, SnapshotRef, SnapshotStore, SnapshotView, Worker
from ._env import CLUSTER_ENV
from ._task import BlobInput, RemoteOpError, RemoteOutcome, RemoteTask, run_op, scratch_file

if TYPE_CHECKING:
    from .._result import Result

__all__ = ["CLUSTER_ENV", "DaskCluster", "RemoteClusterError"]

_log = logging.getLogger("solver")

HELD_FUTURES: Final = 1024
"""How many blobs (scattered inputs and op outputs) a client keeps on the cluster
for later ops; the least recently used is let go beyond it."""

_WAITERS: Final = 10_000
"""Threads that may wait for remote ops at once (one per op in flight)."""


class RemoteClusterError(SolveError):
    """The cluster could not be reached, went away, or lost an op for good."""


class DaskCluster:
    """The ops of the built-in worker, run on a Dask distributed cluster.

    ``address`` is the scheduler's (``tcp://host:8786``); or hand in a connected
    synchronous ``distributed.Client`` as ``client`` (the cluster then leaves it
    open). Open the cluster (``async with`` or :meth:`open`) before solving, and
    hand it to the solver: ``Solver(worker=worker, cluster=cluster)``. The engine
    keeps scheduling, cache keys and single-flight; each op of a kind in ``kinds``
    (default ``exec`` and ``file``) runs on a Dask worker. Sources and merges stay
    local (they read host files or only link snapshots), and so does an ``exec``
    that names secrets: secrets never leave this machine.

    The Dask key of an op is ``solver-op-<digest>``, the digest of the op's cache
    digest and its inputs' blob digests, so two clients that submit the same op at
    once run it once. When no job wants an op any more its future is cancelled,
    and the worker stops the op's process. A worker killed mid-op has the op
    retried by Dask on another worker. Per-op hints (``limits.memory``,
    ``limits.cpus`` of an ``exec``) become Dask worker resources ``MEMORY`` and
    ``CPU`` when the cluster's workers declare them (``dask worker --resources
    "CPU=4,MEMORY=8e9"``); otherwise they are not asked for.

    ``timeout`` bounds connecting (seconds). Needs the ``cluster`` extra
    (``pip install 'solver-engine[cluster]'``); every Dask worker needs
    ``solver-engine`` installed too.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        client: Any = None,
        kinds: tuple[str, ...] = ("exec", "file"),
        timeout: float = 10.0,
    ) -> None:
        if (address is None) == (client is None):
            raise ValueError("give DaskCluster a scheduler address or a client (one of them)")
        self.address: str = address if address is not None else str(client.scheduler.address)
        self.kinds = tuple(kinds)
        self._timeout = timeout
        self._client: Any = client
        self._own_client = client is None
        self._limiter = anyio.CapacityLimiter(_WAITERS)
        # snapshot id -> (blob digest, future holding the blob or the outcome, index)
        self._blobs: OrderedDict[str, tuple[str, Any, int]] = OrderedDict()
        self._resources: frozenset[str] = frozenset()
        self._errors: tuple[type[BaseException], ...] = ()
        # registries attach() changed, and the kinds they held before
        self._attached: list[tuple[OpKindRegistry, list[OpKind]]] = []

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        return f"<DaskCluster {self.address} {state}>"

    # -- life ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._client is not None

    async def open(self) -> None:
        """Connect to the scheduler (unless a client was handed in).
        :class:`RemoteClusterError` when it cannot be reached within ``timeout``."""
        try:
            import distributed
            from distributed.comm.core import CommClosedError
        except ImportError as exc:
            raise RemoteClusterError(
                "running ops on a Dask cluster needs the 'cluster' extra: "
                "pip install 'solver-engine[cluster]'"
            ) from exc
        self._errors = (
            distributed.client.FutureCancelledError,
            CommClosedError,
            OSError,
            TimeoutError,
            distributed.KilledWorker,
        )
        if self._client is None:
            address, timeout = self.address, self._timeout

            def connect() -> Any:
                return distributed.Client(  # type: ignore[no-untyped-call]
                    address, timeout=timeout, set_as_default=False
                )

            try:
                self._client = await anyio.to_thread.run_sync(connect, abandon_on_cancel=True)
            except (OSError, TimeoutError) as exc:
                raise RemoteClusterError(
                    f"cannot reach the Dask scheduler at {self.address}: {exc}"
                ) from None
        info = await self._call(self._client.scheduler_info)
        names: set[str] = set()
        for worker in info.get("workers", {}).values():
            names.update(worker.get("resources", {}) or {})
        self._resources = frozenset(names)

    def attach(self, worker: Worker) -> None:
        """Run ``worker``'s kinds in :attr:`kinds` on this cluster, in place: every
        solver using ``worker.op_kinds`` (``Solver(worker=worker)``) runs them here
        from now on; :meth:`close` puts the kinds back. ``Solver(worker=worker,
        cluster=cluster)`` does the same on a copy of the kinds, for that solver
        only. Attach the cluster before a :class:`~solver.SharedCache`, so that the
        shared cache's lookup wraps the remote run (``docs/remote.md``)."""
        from ._ops import attach_cluster  # _ops builds on this module

        registry = worker.op_kinds
        originals = [registry.require(name) for name in self.kinds]
        attach_cluster(registry, self, worker.store, sandbox=worker.sandbox)
        self._attached.append((registry, originals))

    async def close(self) -> None:
        """Put back the kinds :meth:`attach` replaced, let go of every blob held on
        the cluster and, if this object connected, disconnect. Idempotent."""
        for registry, originals in reversed(self._attached):
            for kind in originals:
                registry.add(kind, replace=True)
        self._attached.clear()
        client, self._client = self._client, None
        futures = [entry[1] for entry in self._blobs.values()]
        self._blobs.clear()
        if client is None:
            return
        with anyio.CancelScope(shield=True):

            def let_go() -> None:
                for future in futures:
                    with contextlib.suppress(Exception):
                        future.release()
                if self._own_client:
                    with contextlib.suppress(Exception):
                        client.close(timeout=self._timeout)

            await anyio.to_thread.run_sync(let_go)

    async def __aenter__(self) -> DaskCluster:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- used by the remote ops ----------------------------------------------------------

    def resources(self, hints: Mapping[str, float]) -> dict[str, float]:
        """The hints the cluster's workers declare, as Dask resources."""
        return {name: value for name, value in hints.items() if name in self._resources}

    async def blob(self, result: Result, store: SnapshotStore) -> BlobInput:
        """``result`` (a snapshot) as an input of a remote op: the future of the op
        that made it when it came from the cluster, else its blob, scattered once."""
        view = result.sys
        if not isinstance(view, SnapshotView):
            raise SolveError(
                f"a remote op's input is not a snapshot of the built-in worker "
                f"(its sys is {type(view).__name__})"
            )
        held = self._blobs.get(view.id)
        if held is not None:
            self._blobs.move_to_end(view.id)
            return held
        codec = SnapshotBlobCodec(store)
        with scratch_file(store.root / "tmp") as path:
            digest = await codec.pack(result, path)
            if digest is None:  # pragma: no cover - a SnapshotView always packs
                raise SolveError("a remote op's input is not a snapshot")
            data = await anyio.to_thread.run_sync(path.read_bytes)
        client = self._open_client()
        future = await self._call(client.scatter, data, hash=True)
        entry: BlobInput = (digest, future, 0)
        await self._keep(view.id, entry)
        return entry

    async def run(
        self, task: RemoteTask, blobs: list[BlobInput], key: str, resources: dict[str, float]
    ) -> tuple[RemoteOutcome, Any]:
        """Run ``task`` as Dask task ``key``; its outcome and its future (which holds
        the outputs on the worker). Cancelling the caller cancels the future."""
        client = self._open_client()

        def submit() -> Any:
            return client.submit(
                run_op, task, blobs, key=key, pure=False, resources=resources or None
            )

        future = await self._call(submit)
        try:
            outcome = await anyio.to_thread.run_sync(
                future.result, abandon_on_cancel=True, limiter=self._limiter
            )
        except RemoteOpError as exc:
            await self._let_go(future)
            raise SolveError(str(exc)) from None
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._let_go(future, cancel=True)
            if isinstance(exc, self._errors):
                raise RemoteClusterError(
                    f"the Dask cluster at {self.address} lost op {task.name or task.digest}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            raise
        if not isinstance(outcome, RemoteOutcome):  # pragma: no cover - Dask contract
            raise RemoteClusterError(f"Dask task {key} returned {type(outcome).__name__}")
        return outcome, future

    async def adopt(self, ref: SnapshotRef, digest: str, future: Any, index: int) -> None:
        """Remember that snapshot ``ref`` is output ``index`` of the task ``future``."""
        await self._keep(ref.id, (digest, future, index))

    # -- helpers -------------------------------------------------------------------------

    def _open_client(self) -> Any:
        client = self._client
        if client is None:
            raise RemoteClusterError(
                f"the Dask cluster at {self.address} is not open "
                "('async with DaskCluster(...)' or 'await cluster.open()')"
            )
        return client

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # Not abandoned on cancellation: a scatter or submit that went through
        # while its caller was cancelled would leave a future nobody holds, whose
        # release races the next call for the same key (the scheduler then
        # forgets a blob the next op needs: "lost dependencies"). These calls are
        # short; the caller sees its cancellation once the future is kept.
        def call() -> Any:
            return fn(*args, **kwargs)

        try:
            return await anyio.to_thread.run_sync(call)
        except self._errors as exc:
            raise RemoteClusterError(
                f"the Dask cluster at {self.address} is unreachable: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    async def _keep(self, snapshot_id: str, entry: BlobInput) -> None:
        self._blobs[snapshot_id] = entry
        self._blobs.move_to_end(snapshot_id)
        dropped = []
        while len(self._blobs) > HELD_FUTURES:
            dropped.append(self._blobs.popitem(last=False)[1][1])
        if dropped:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_release_all, dropped)

    async def _let_go(self, future: Any, *, cancel: bool = False) -> None:
        def drop() -> None:
            with contextlib.suppress(Exception):
                if cancel:
                    future.cancel()
                future.release()

        await anyio.to_thread.run_sync(drop)


def _release_all(futures: list[Any]) -> None:
    for future in futures:
        with contextlib.suppress(Exception):
            future.release()
