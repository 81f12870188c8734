"""Remote ops: the built-in kinds' ops, with ``exec`` run on a Dask worker.

:func:`attach_cluster` wraps the kinds a :class:`DaskCluster` runs in a registry.
The wrapper's factory makes the kind's own op first (so a bad payload fails the
same way) and returns a :class:`RemoteOp` around it: the same cache map (cache keys
are the same as a local build's, and results from both mix in every cache), and
an ``exec`` that ships the inputs by content, runs the op remotely, and unpacks the
outputs into the local store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap, Op
from .._progress import log_output
from ..definition import JSONValue, OpContext, OpFactory, OpKind, OpKindRegistry
from ..worker import SandboxMode, SnapshotBlobCodec, SnapshotStore
from ._cluster import DaskCluster
from ._task import RemoteTask, scratch_file

if TYPE_CHECKING:
    from .._result import Result

__all__ = ["RemoteOp", "attach_cluster"]


def _hints(payload: object) -> dict[str, float]:
    """Dask resource hints from an exec payload's ``limits``: ``cpus`` -> ``CPU``,
    ``memory`` (bytes) -> ``MEMORY``."""
    if not isinstance(payload, dict):
        return {}
    limits = payload.get("limits")
    if not isinstance(limits, dict):
        return {}
    hints: dict[str, float] = {}
    for name, resource in (("cpus", "CPU"), ("memory", "MEMORY")):
        value = limits.get(name)
        if isinstance(value, int) and value > 0:
            hints[resource] = float(value)
    return hints


class RemoteOp:
    """One op that runs on ``cluster`` (see the module docstring)."""

    __slots__ = ("_cluster", "_ctx", "_local", "_sandbox", "_store")

    def __init__(
        self,
        local: Op,
        ctx: OpContext,
        cluster: DaskCluster,
        store: SnapshotStore,
        sandbox: SandboxMode,
    ) -> None:
        self._local = local
        self._ctx = ctx
        self._cluster = cluster
        self._store = store
        self._sandbox: SandboxMode = sandbox

    def __repr__(self) -> str:
        return f"<RemoteOp {self._ctx.kind} {self._ctx.vertex.name!r} on {self._cluster.address}>"

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        """The local op's cache map: remote and local results share cache keys."""
        return await self._local.cache_map(index)

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        """Run the op on a Dask worker; its outputs as new snapshots of the local store."""
        cluster, store, ctx = self._cluster, self._store, self._ctx
        if store.closed:
            raise SolveError("cannot run a remote op: the snapshot store is closed")
        cache_map, _ = await self._local.cache_map(0)
        blobs = [await cluster.blob(inp, store) for inp in inputs]
        payload: dict[str, JSONValue] = dict(ctx.payload)
        task = RemoteTask(
            ctx.kind, payload, ctx.vertex.digest, ctx.vertex.name, ctx.inputs, self._sandbox
        )
        key = "solver-op-" + digest_of(
            "\n".join([cache_map.digest, self._sandbox, *(blob[0] for blob in blobs)]).encode()
        ).removeprefix("sha256:")
        outcome, future = await cluster.run(task, blobs, key, cluster.resources(_hints(payload)))
        if outcome.log:
            log_output(outcome.log)
        log_output(
            f"ran on Dask worker {outcome.worker} in {outcome.seconds:.3f}s\n".encode(), 2
        )
        codec = SnapshotBlobCodec(store)
        refs: list[Result] = []
        try:
            for index, (digest, data) in enumerate(outcome.outputs):
                with scratch_file(store.root / "tmp") as path:
                    await anyio.to_thread.run_sync(path.write_bytes, data)
                    snapshot = await codec.unpack(path)
                refs.append(snapshot)
                await cluster.adopt(snapshot, digest, future, index)
        except BaseException:
            for ref in refs:
                await ref.release()
            raise
        return refs


def attach_cluster(
    registry: OpKindRegistry,
    cluster: DaskCluster,
    store: SnapshotStore,
    *,
    sandbox: SandboxMode,
) -> None:
    """Wrap the kinds in ``cluster.kinds`` of ``registry`` (each must be registered)
    so that their ops run on ``cluster``; ``store`` is where inputs come from and
    outputs go, ``sandbox`` the mode the remote workers run ``exec`` steps in."""
    for name in cluster.kinds:
        kind = registry.require(name)
        if getattr(kind.factory, "remote_cluster", None) is cluster:
            continue  # attached already
        factory = _remote_factory(kind, cluster, store, sandbox)
        registry.add(OpKind(name, factory, kind.outputs, kind.validate), replace=True)


def _remote_factory(
    kind: OpKind, cluster: DaskCluster, store: SnapshotStore, sandbox: SandboxMode
) -> OpFactory:
    def factory(ctx: OpContext) -> Op:
        local = kind.factory(ctx)
        if ctx.payload.get("secrets"):
            return local  # secrets never leave this machine
        return RemoteOp(local, ctx, cluster, store, sandbox)

    factory.remote_cluster = cluster  # type: ignore[attr-defined]
    return factory
