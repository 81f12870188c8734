"""The built-in worker: an on-disk snapshot store and the built-in op kinds.

Ops write into a :class:`MutableSnapshot`, commit it into an immutable snapshot,
and hand out reference-counted :class:`SnapshotRef` handles (the engine's
``Result``), whose ``sys`` is a read-only :class:`SnapshotView`. A
:class:`Worker` owns a store and an op-kind registry with the built-in kinds
(``source.inline``, ``source.local``, ``file``, ``merge``, ``exec``);
:class:`State` (in :mod:`solver.worker.state`) writes definitions that use them.
`Solver()` with no arguments uses a :class:`Worker` on the default root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._cacheblobs import (
        SNAPSHOT_BLOB_MEDIA_TYPE as SNAPSHOT_BLOB_MEDIA_TYPE,
        SnapshotBlobCodec as SnapshotBlobCodec,
    )
    from ._exec import SecretSource as SecretSource, register_exec as register_exec
    from ._export import (
        MANIFEST_NAME as MANIFEST_NAME,
        export_parts_to_dir as export_parts_to_dir,
        export_to_dir as export_to_dir,
        export_to_tar as export_to_tar,
        exported_mode as exported_mode,
    )
    from ._failedsteps import (
        FAILED_DIR as FAILED_DIR,
        FailedStep as FailedStep,
        copy_failed_tree as copy_failed_tree,
        find_failed_step as find_failed_step,
        run_in_failed_step as run_in_failed_step,
    )
    from ._gc import (
        PrunePolicy as PrunePolicy,
        snapshot_kind as snapshot_kind,
        snapshot_label as snapshot_label,
    )
    from ._ophistory import (
        OP_HISTORY_DB_NAME as OP_HISTORY_DB_NAME,
        SQLiteOpHistory as SQLiteOpHistory,
    )
    from ._sandbox import (
        DEFAULT_ROOTFS as DEFAULT_ROOTFS,
        SANDBOX_ROOT as SANDBOX_ROOT,
        SECRETS_DIR as SECRETS_DIR,
        Network as Network,
        SandboxMode as SandboxMode,
    )
    from ._slots import StepSlots as StepSlots, default_parallelism as default_parallelism
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
    from ._usage import (
        DiskUsage as DiskUsage,
        KindUsage as KindUsage,
        PruneReport as PruneReport,
        StoreTarget as StoreTarget,
        disk_usage as disk_usage,
        prune as prune,
    )
    from ._worker import Worker as Worker, register_builtin_kinds as register_builtin_kinds
    from .state import State as State, merge as merge, run as run

_exports = LazyExports(
    globals(),
    {
        "._cacheblobs": ("SNAPSHOT_BLOB_MEDIA_TYPE", "SnapshotBlobCodec"),
        "._exec": ("SecretSource", "register_exec"),
        "._export": (
            "MANIFEST_NAME", "export_parts_to_dir", "export_to_dir", "export_to_tar",
            "exported_mode",
        ),
        "._failedsteps": (
            "FAILED_DIR", "FailedStep", "copy_failed_tree", "find_failed_step",
            "run_in_failed_step",
        ),
        "._gc": ("PrunePolicy", "snapshot_kind", "snapshot_label"),
        "._ophistory": ("OP_HISTORY_DB_NAME", "SQLiteOpHistory"),
        "._sandbox": ("DEFAULT_ROOTFS", "SANDBOX_ROOT", "SECRETS_DIR", "Network", "SandboxMode"),
        "._slots": ("StepSlots", "default_parallelism"),
        "._snapshots": (
            "FileStat", "MutableSnapshot", "SnapshotInfo", "SnapshotInUseError",
            "SnapshotNotFoundError", "SnapshotRef", "SnapshotStore", "SnapshotView",
            "UnsafePathError", "default_root",
        ),
        "._usage": (
            "DiskUsage", "KindUsage", "PruneReport", "StoreTarget", "disk_usage", "prune",
        ),
        "._worker": ("Worker", "register_builtin_kinds"),
        ".state": ("State", "merge", "run"),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
