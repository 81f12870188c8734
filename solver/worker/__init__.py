"""The built-in worker.

So far this is its on-disk snapshot store: ops write into a
:class:`MutableSnapshot`, commit it into an immutable snapshot, and hand out
reference-counted :class:`SnapshotRef` handles (the engine's ``Result``), whose
``sys`` is a read-only :class:`SnapshotView`.
"""

from ._snapshots import (
    FileStat as FileStat,
    MutableSnapshot as MutableSnapshot,
    SnapshotInfo as SnapshotInfo,
    SnapshotInUseError as SnapshotInUseError,
    SnapshotNotFoundError as SnapshotNotFoundError,
    SnapshotRef as SnapshotRef,
    SnapshotStore as SnapshotStore,
    SnapshotView as SnapshotView,
    UnsafePathError as UnsafePathError,
    default_root as default_root,
)
from ._worker import Worker as Worker, register_builtin_kinds as register_builtin_kinds
