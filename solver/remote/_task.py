"""What runs on a Dask worker: one built-in op, in a snapshot store of that process.

The client (:mod:`solver.remote._ops`) submits :func:`run_op` with a
:class:`RemoteTask` (the op's kind, payload and digest) and one
:class:`BlobInput` per input. Dask moves the input blobs (snapshot tars, see
:mod:`solver.worker._cacheblobs`) to the worker, or finds them there already (the
output of an earlier op on that worker). The function:

1. starts, once per process, a :class:`_Host`: an event loop in a thread of its
   own (an anyio blocking portal) holding an open :class:`~solver.worker.SnapshotStore`
   under the Dask worker's local directory, the built-in op kinds bound to it, and
   a bounded cache of the snapshots it holds, by blob digest;
2. unpacks each input blob into that store unless a snapshot with its digest is
   held already (so an input it has never needs unpacking again);
3. makes the op with the kind's own factory and runs its ``exec`` there, watching
   the Dask task: when the client cancels it (no job wants the op any more), the
   ``exec`` is cancelled, which stops its process;
4. packs each output into a blob and returns a :class:`RemoteOutcome` (the blobs,
   the worker's address, the output the op printed).

A failed op raises :class:`RemoteOpError` with the op's own message. Everything in
this module is picklable by reference, so the worker needs the ``solver-engine``
package installed (the same version as the client).
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.from_thread

from .._errors import SolveError
from .._graph import Edge, VertexOptions
from .._op import Op
from .._progress import current_log
from .._result import CachedResult
from ..definition import JSONValue, OpContext, OpKindRegistry
from ..worker import (
    SandboxMode,
    SnapshotBlobCodec,
    SnapshotRef,
    SnapshotStore,
    register_builtin_kinds as _register_builtin_kinds,
)

__all__ = [
    "HELD_SNAPSHOTS",
    "LOG_TAIL",
    "BlobInput",
    "RemoteOpError",
    "RemoteOutcome",
    "RemoteTask",
    "run_op",
    "scratch_file",
    "worker_stats",
]

HELD_SNAPSHOTS: Final = 256
"""How many snapshots (inputs and outputs, by blob digest) a worker process keeps
for later ops; the least recently used is released beyond it."""

LOG_TAIL: Final = 64 * 1024
"""How many bytes of an op's output travel back to the client (the last ones)."""

_CANCEL_POLL: Final = 0.2
"""Seconds between two looks at whether Dask still wants the task."""


class RemoteOpError(Exception):
    """An op failed on a Dask worker; the text is the op's own error message."""


@dataclass(frozen=True, slots=True)
class RemoteTask:
    """One op to run remotely: what its kind's factory needs."""

    kind: str
    payload: Mapping[str, JSONValue]
    digest: str
    name: str
    inputs: int
    sandbox: SandboxMode


BlobInput = tuple[str, "bytes | RemoteOutcome", int]
"""One input, as a plain tuple so that Dask finds and resolves the future in it:
the blob digest of its snapshot, then the blob itself, either as bytes (scattered
by the client) or as output ``index`` of an earlier :class:`RemoteOutcome`."""


def _blob_data(blob: BlobInput) -> bytes:
    _, source, index = blob
    if isinstance(source, bytes):
        return source
    return source.outputs[index][1]


@dataclass(frozen=True, slots=True)
class RemoteOutcome:
    """What :func:`run_op` returns: ``(blob digest, blob)`` per output, the address
    of the worker that ran it, its output's tail and how long ``exec`` took."""

    outputs: tuple[tuple[str, bytes], ...]
    worker: str
    log: bytes = b""
    seconds: float = 0.0


@dataclass(slots=True)
class _Stats:
    executed: int = 0
    unpacked: int = 0
    reused: int = 0
    cancelled: int = 0


class _RemoteVertex:
    """The vertex a factory is given on the worker: the op's digest and name."""

    __slots__ = ("_digest", "_name")

    def __init__(self, digest: str, name: str) -> None:
        self._digest = digest
        self._name = name

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def inputs(self) -> Sequence[Edge]:
        return ()

    @property
    def name(self) -> str:
        return self._name

    @property
    def options(self) -> VertexOptions:
        return VertexOptions()

    @property
    def sys(self) -> object:
        return None


class _NoNestedBuilds:
    """The builder of a remote op: the built-in kinds never build nested edges, and a
    remote worker has no engine to build them with."""

    async def build(self, edge: Edge) -> CachedResult:
        raise SolveError(
            f"op {edge.vertex.name!r} asked for a nested build on a Dask worker; only "
            "the built-in kinds that build nothing run remotely"
        )


class _Host:
    """The per-process state: an event loop thread, a store and its op kinds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.portal = _start_portal()
        self.store = SnapshotStore(root)
        self.portal.call(self.store.open)
        self.codec = SnapshotBlobCodec(self.store)
        self.registries: dict[SandboxMode, OpKindRegistry] = {}
        self.held: OrderedDict[str, SnapshotRef] = OrderedDict()
        self.stats = _Stats()

    def registry(self, sandbox: SandboxMode) -> OpKindRegistry:
        registry = self.registries.get(sandbox)
        if registry is None:
            registry = OpKindRegistry()
            _register_builtin_kinds(registry, self.store, sandbox=sandbox)
            self.registries[sandbox] = registry
        return registry

    async def hold(self, digest: str, ref: SnapshotRef) -> None:
        """Keep ``ref`` (ours now) as the snapshot of blob ``digest``."""
        old = self.held.pop(digest, None)
        self.held[digest] = ref
        evicted: list[SnapshotRef] = [] if old is None else [old]
        while len(self.held) > HELD_SNAPSHOTS:
            evicted.append(self.held.popitem(last=False)[1])
        for ref_ in evicted:
            await ref_.release()

    async def input(self, blob: BlobInput) -> SnapshotRef:
        """A handle (the caller's) on the snapshot of ``blob``."""
        digest = blob[0]
        held = self.held.get(digest)
        if held is not None:
            self.held.move_to_end(digest)
            self.stats.reused += 1
            return held.clone()
        with scratch_file(self.store.root / "tmp") as path:
            await anyio.to_thread.run_sync(path.write_bytes, _blob_data(blob))
            ref = await self.codec.unpack(path)
        self.stats.unpacked += 1
        await self.hold(digest, ref.clone())
        return ref

    async def pack(self, result: object) -> tuple[str, bytes]:
        if not isinstance(result, SnapshotRef):
            raise RemoteOpError(
                f"a remote op returned {type(result).__name__}, not a snapshot"
            )
        with scratch_file(self.store.root / "tmp") as path:
            digest = await self.codec.pack(result, path)
            if digest is None:  # pragma: no cover - a SnapshotRef always packs
                raise RemoteOpError("a remote op's output is not a snapshot")
            data = await anyio.to_thread.run_sync(path.read_bytes)
        await self.hold(digest, result.clone())
        return digest, data

    async def run(
        self, task: RemoteTask, blobs: Sequence[BlobInput], wanted: _Wanted
    ) -> RemoteOutcome:
        registry = self.registry(task.sandbox)
        kind = registry.require(task.kind)
        log = bytearray()

        def collect(data: bytes, stream: int) -> None:
            log.extend(data)
            if len(log) > 2 * LOG_TAIL:
                del log[: len(log) - LOG_TAIL]

        inputs: list[SnapshotRef] = []
        outputs: Sequence[object] = ()
        try:
            for blob in blobs:
                inputs.append(await self.input(blob))
            op: Op = kind.factory(
                OpContext(
                    task.kind,
                    task.payload,
                    _RemoteVertex(task.digest, task.name),
                    _NoNestedBuilds(),
                    task.inputs,
                )
            )
            started = time.perf_counter()
            token = current_log.set(collect)
            failure: Exception | None = None
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_watch, wanted, tg.cancel_scope)
                    try:
                        outputs = await op.exec(inputs)
                    except Exception as exc:  # reported below, outside the group
                        failure = exc
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                current_log.reset(token)
            if failure is not None:
                if isinstance(failure, SolveError):
                    raise RemoteOpError(str(failure))
                raise RemoteOpError(f"{type(failure).__name__}: {failure}")
            if wanted.cancelled:
                self.stats.cancelled += 1
                raise RemoteOpError("cancelled: Dask no longer wants this op")
            seconds = time.perf_counter() - started
            self.stats.executed += 1
            packed = tuple([await self.pack(out) for out in outputs])
            return RemoteOutcome(packed, wanted.address, bytes(log[-LOG_TAIL:]), seconds)
        except SolveError as exc:
            raise RemoteOpError(str(exc)) from None
        finally:
            with anyio.CancelScope(shield=True):
                for ref in inputs:
                    await ref.release()
                for out in outputs:
                    if isinstance(out, SnapshotRef) and not out.released:
                        await out.release()


def _start_portal() -> anyio.from_thread.BlockingPortal:
    """An event loop in a daemon thread, for the life of the process (a worker
    process that exits does not wait for it), and the portal into it."""
    ready: queue.SimpleQueue[anyio.from_thread.BlockingPortal] = queue.SimpleQueue()

    async def serve() -> None:
        async with anyio.from_thread.BlockingPortal() as portal:
            ready.put(portal)
            await portal.sleep_until_stopped()

    threading.Thread(target=anyio.run, args=(serve,), name="solver-remote", daemon=True).start()
    return ready.get()


class _Wanted:
    """Whether Dask still wants the task this thread runs."""

    def __init__(self) -> None:
        self.cancelled = False
        self.address = ""
        self._worker: Any = None
        self._key: Any = None
        with contextlib.suppress(ImportError, ValueError):
            import distributed.worker as dask_worker

            self._worker = dask_worker.get_worker()
            self._key = getattr(getattr(dask_worker, "thread_state", None), "key", None)
            self.address = str(self._worker.address)

    def still(self) -> bool:
        if self._worker is None or self._key is None:
            return True
        state = self._worker.state.tasks.get(self._key)
        return state is not None and state.state not in ("cancelled", "released", "forgotten")


async def _watch(wanted: _Wanted, scope: anyio.CancelScope) -> None:
    # Dask sets no event we could wait on from this loop: look now and then.
    while wanted.still():  # noqa: ASYNC110
        await anyio.sleep(_CANCEL_POLL)
    wanted.cancelled = True
    scope.cancel()


@contextlib.contextmanager
def scratch_file(directory: Path) -> Iterator[Path]:
    """A free file name in ``directory`` for a blob, removed after (if made)."""
    fd, name = tempfile.mkstemp(prefix="blob-", dir=directory)
    os.close(fd)
    os.unlink(name)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


_host: _Host | None = None
_host_lock = threading.Lock()


def _the_host() -> _Host:
    global _host
    with _host_lock:
        if _host is None:
            base = None
            with contextlib.suppress(ImportError, ValueError):
                from distributed import get_worker

                base = Path(get_worker().local_directory)
            if base is None:
                base = Path(tempfile.gettempdir()) / f"solver-remote-{os.getpid()}"
            base.mkdir(parents=True, exist_ok=True)
            _host = _Host(base / "solver-store")
        return _host


def run_op(task: RemoteTask, blobs: Sequence[BlobInput]) -> RemoteOutcome:
    """Run ``task`` on this worker (see the module docstring). Called by Dask in a
    worker thread; the ops of one process share its event loop and store, so a
    worker with several threads runs several ops at once."""
    host = _the_host()
    return host.portal.call(host.run, task, blobs, _Wanted())


def worker_stats() -> dict[str, int]:
    """This process's counts: ops ``executed``, input blobs ``unpacked``, inputs
    ``reused`` from the snapshots it held, ops ``cancelled`` while running, and
    snapshots ``held`` now. Run it on every worker with ``client.run``."""
    host = _host
    if host is None:
        return {"executed": 0, "unpacked": 0, "reused": 0, "cancelled": 0, "held": 0}
    s = host.stats
    return {
        "executed": s.executed,
        "unpacked": s.unpacked,
        "reused": s.reused,
        "cancelled": s.cancelled,
        "held": len(host.held),
    }


