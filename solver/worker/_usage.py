"""Disk usage and pruning of a snapshot store, as functions: what ``solver du`` and
``solver prune`` do, for programs.

::

    usage = await disk_usage(root)                   # a DiskUsage
    report = await prune(root, PrunePolicy(keep_duration=48 * 3600))
    print(f"freed {report.freed} bytes in {len(report.deleted)} snapshot(s)")

Both take the store as an open :class:`SnapshotStore` or :class:`Worker` (used as
it is: nothing is opened or closed), or as a store root (a path, or ``None`` for
:func:`default_root`), which they open for the duration of the call and close
again. A root is what ``Worker(root)`` takes: ``<cache dir>/snapshots`` for the
command line's ``--cache-dir``. Opening a root waits while another process has it
open, for ``lock_timeout`` seconds (``None``: as long as it takes), as
:class:`SnapshotStore` does.

:func:`prune` opens a root as a whole :class:`Worker`, not only its store, so that
the worker's persistent cache drops the records of what is deleted at once (its
delete listener) instead of at its next open. Given a store or a worker, the
listeners already registered on the store are told, as by any prune.

Only the reports are here; how they are printed is the command line's
(:mod:`solver.cli._main`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from ._gc import PrunePolicy, as_rules, snapshot_kind
from ._snapshots import SnapshotInfo, SnapshotStore
from ._worker import Worker

__all__ = [
    "DiskUsage",
    "KindUsage",
    "PruneReport",
    "StoreTarget",
    "disk_usage",
    "prune",
]

StoreTarget: TypeAlias = SnapshotStore | Worker | str | os.PathLike[str] | None
"""What :func:`disk_usage` and :func:`prune` work on: an open store or worker, or
a store root to open (``None``: :func:`default_root`)."""


@dataclass(frozen=True, slots=True)
class KindUsage:
    """The snapshots one op kind made: how many, their bytes, and the bytes of
    those in use."""

    snapshots: int
    size: int
    in_use: int


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """What a snapshot store holds (:func:`disk_usage`).

    ``entries`` are every snapshot, least recently used first: the order in which
    pruning deletes (ties by id). ``kinds`` maps each op kind (``snapshot_kind`` of
    the description, ``""`` for a snapshot without one) to its totals, kinds in
    name order. ``size`` is the bytes of every snapshot, ``in_use`` those of the
    snapshots with live handles (never pruned). ``free`` is the free bytes on the
    store's file system, ``None`` when it could not be measured.
    """

    entries: tuple[SnapshotInfo, ...]
    kinds: Mapping[str, KindUsage]
    size: int
    in_use: int
    free: int | None

    @property
    def snapshots(self) -> int:
        """How many snapshots the store holds."""
        return len(self.entries)


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What :func:`prune` did: ``deleted`` in the order they were deleted (least
    recently used first within each rule), ``freed`` their bytes, ``remaining``
    the bytes the store still uses (in use or not)."""

    deleted: tuple[SnapshotInfo, ...]
    freed: int
    remaining: int


def usage_of(infos: Sequence[SnapshotInfo], free: int | None = None) -> DiskUsage:
    """The :class:`DiskUsage` of these snapshots (in any order), with ``free``
    bytes free. O(n log n)."""
    entries = tuple(sorted(infos, key=lambda info: (info.last_used, info.id)))
    kinds: dict[str, KindUsage] = {}
    for info in entries:
        kind = snapshot_kind(info.description)
        old = kinds.get(kind, KindUsage(0, 0, 0))
        kinds[kind] = KindUsage(
            old.snapshots + 1,
            old.size + info.size,
            old.in_use + (info.size if info.in_use else 0),
        )
    return DiskUsage(
        entries=entries,
        # read-only, so that the frozen report cannot be changed through it
        kinds=MappingProxyType(dict(sorted(kinds.items()))),
        size=sum(info.size for info in entries),
        in_use=sum(info.size for info in entries if info.in_use),
        free=free,
    )


@contextlib.asynccontextmanager
async def _opened(
    target: StoreTarget, lock_timeout: float | None, *, worker: bool
) -> AsyncIterator[SnapshotStore]:
    """The store of ``target``; a root is opened for the block, as a whole
    :class:`Worker` when ``worker`` (so that its persistent cache hears of
    deletions), else as a bare store (nothing but the metadata is read)."""
    if isinstance(target, Worker):
        yield target.store
    elif isinstance(target, SnapshotStore):
        yield target
    elif worker:
        async with Worker(target, lock_timeout=lock_timeout) as opened:
            yield opened.store
    else:
        async with SnapshotStore(target, lock_timeout=lock_timeout) as store:
            yield store


async def disk_usage(
    target: StoreTarget = None, *, lock_timeout: float | None = None
) -> DiskUsage:
    """The snapshots of a store (see the module docs for ``target``), their totals
    per op kind, and the free space on its file system (``None`` when measuring it
    fails). Reads the store's in-memory index, so it is O(n log n) in the snapshots
    plus one free-space measure in a worker thread.

    Raises :class:`~solver.SolveError` for a store that is not open or a root that
    is open in this process (or, with ``lock_timeout``, in another one), and
    :class:`OSError` when a root cannot be created or read (a file where a
    directory should be, no permission)."""
    async with _opened(target, lock_timeout, worker=False) as store:
        infos = await store.usage()
        try:
            free: int | None = await store.free_space()
        except OSError:  # a report without the free space beats no report
            free = None
        return usage_of(infos, free)


async def prune(
    target: StoreTarget = None,
    policy: PrunePolicy | Sequence[PrunePolicy] | None = None,
    *,
    lock_timeout: float | None = None,
) -> PruneReport:
    """Apply a prune policy to a store now (see the module docs for ``target``):
    one :class:`PrunePolicy` rule or an ordered sequence of them, with the
    semantics of :meth:`SnapshotStore.prune_by_policy` (``docs/worker.md``,
    "Garbage collection"); ``None``, the default, deletes every snapshot that is
    not in use. Snapshots in use are never deleted.

    Raises :class:`TypeError` for a policy that is not made of rules (before
    anything is opened), and what :func:`disk_usage` raises."""
    rules = as_rules(policy if policy is not None else PrunePolicy())
    async with _opened(target, lock_timeout, worker=True) as store:
        deleted = await store.prune_by_policy(rules)
        return PruneReport(
            deleted=tuple(deleted),
            freed=sum(info.size for info in deleted),
            remaining=store.used_space,
        )
