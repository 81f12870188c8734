"""The cache: managers, the stores behind them, and exports and imports of records.

A :class:`~solver.CacheManager` (the protocol, in ``solver._cache`` with the key
and record types every layer shares) looks results up by cache key and keeps
them. This package holds everything that implements it: the keyed manager over a
key storage and a result storage (:class:`KeyedCacheManager`, the in-memory
default :class:`InMemoryCacheManager`), the stores (in memory, SQLite), the
export walk over the records behind a key, and the directory format of
``--export-cache``/``--import-cache``. It knows nothing of the engine, the solve
layer or the worker: a codec that packs results into blobs is handed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._blobs import (
        BlobDigestError as BlobDigestError,
        BlobStore as BlobStore,
    )
    from ._directory import (
        INDEX_NAME as INDEX_NAME,
        INDEX_VERSION as INDEX_VERSION,
        CacheBlob as CacheBlob,
        CacheBlobCodec as CacheBlobCodec,
        CacheExportError as CacheExportError,
        CacheImportError as CacheImportError,
        LocalCacheExport as LocalCacheExport,
        LocalCacheExportStats as LocalCacheExportStats,
        LocalCacheImport as LocalCacheImport,
        LocalCacheSource as LocalCacheSource,
        LocalCacheTarget as LocalCacheTarget,
        export_local_cache as export_local_cache,
        open_local_cache as open_local_cache,
    )
    from ._export import (
        FoundKeyExporter as FoundKeyExporter,
        KeyExporter as KeyExporter,
        MergedExporter as MergedExporter,
        RemoteResultStorage as RemoteResultStorage,
        SavedKeyExporter as SavedKeyExporter,
        export_cache as export_cache,
    )
    from ._manager import (
        CombinedCacheManager as CombinedCacheManager,
        InMemoryCacheManager as InMemoryCacheManager,
        KeyedCacheManager as KeyedCacheManager,
        best_record as best_record,
    )
    from ._postgres import (
        ActionRecord as ActionRecord,
        PostgresCacheStore as PostgresCacheStore,
        SharedCacheError as SharedCacheError,
        SharedPruneReport as SharedPruneReport,
        SharedUsage as SharedUsage,
        redact_url as redact_url,
    )
    from ._sqlite import (
        SQLiteCacheStorage as SQLiteCacheStorage,
    )
    from ._storage import (
        CacheKeyStorage as CacheKeyStorage,
        CacheResult as CacheResult,
        InMemoryCacheStorage as InMemoryCacheStorage,
        InMemoryResultStorage as InMemoryResultStorage,
        NotFoundError as NotFoundError,
        ResultStorage as ResultStorage,
    )

_exports = LazyExports(
    globals(),
    {
        "._blobs": ("BlobDigestError", "BlobStore"),
        "._directory": (
            "INDEX_NAME", "INDEX_VERSION", "CacheBlob", "CacheBlobCodec", "CacheExportError",
            "CacheImportError", "LocalCacheExport", "LocalCacheExportStats", "LocalCacheImport",
            "LocalCacheSource", "LocalCacheTarget", "export_local_cache", "open_local_cache",
        ),
        "._export": (
            "FoundKeyExporter", "KeyExporter", "MergedExporter", "RemoteResultStorage",
            "SavedKeyExporter", "export_cache",
        ),
        "._manager": (
            "CombinedCacheManager", "InMemoryCacheManager", "KeyedCacheManager", "best_record",
        ),
        "._postgres": (
            "ActionRecord", "PostgresCacheStore", "SharedCacheError", "SharedPruneReport",
            "SharedUsage", "redact_url",
        ),
        "._sqlite": ("SQLiteCacheStorage",),
        "._storage": (
            "CacheKeyStorage", "CacheResult", "InMemoryCacheStorage", "InMemoryResultStorage",
            "NotFoundError", "ResultStorage",
        ),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
