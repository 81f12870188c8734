"""An async solver engine for content-addressed build graphs.

Describe work as vertices (each with a digest covering its whole input
subgraph), let ``resolve_op`` turn each vertex into an :class:`Op`, and build
edges with a :class:`Job` of a :class:`Solver`. Identical work runs once however
many jobs ask for it; results are cached by key and reference-counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import LazyExports

if TYPE_CHECKING:
    from ._cache import (
        CacheExporter as CacheExporter,
        CacheExportOptions as CacheExportOptions,
        CacheExportResult as CacheExportResult,
        CacheExportTarget as CacheExportTarget,
        CacheInfoLink as CacheInfoLink,
        CacheKey as CacheKey,
        CacheKeyWithSelector as CacheKeyWithSelector,
        CacheLink as CacheLink,
        CacheManager as CacheManager,
        CacheRecord as CacheRecord,
        ExportableCacheKey as ExportableCacheKey,
    )
    from ._digest import digest_of as digest_of
    from ._errors import (
        DoubleReleaseError as DoubleReleaseError,
        InternalError as InternalError,
        SlowCacheError as SlowCacheError,
        SolveError as SolveError,
    )
    from ._graph import Edge as Edge, Vertex as Vertex, VertexOptions as VertexOptions
    from ._op import (
        Builder as Builder,
        CacheMap as CacheMap,
        CacheMapDep as CacheMapDep,
        ComputeDigest as ComputeDigest,
        Op as Op,
        ResolveOp as ResolveOp,
    )
    from ._progress import (
        ProgressEvent as ProgressEvent,
        log_output as log_output,
        report_cache_source as report_cache_source,
        report_waiting as report_waiting,
    )
    from ._refs import (
        CachedResultWithKeys as CachedResultWithKeys,
        SharedCachedResult as SharedCachedResult,
        SharedResult as SharedResult,
        split_result_proxy as split_result_proxy,
    )
    from ._result import CachedResult as CachedResult, Result as Result, ResultProxy as ResultProxy
    from .bridge import (
        Attestation as Attestation,
        Bridge as Bridge,
        Explanation as Explanation,
        Frontend as Frontend,
        FrontendResult as FrontendResult,
        MissKind as MissKind,
        MissReason as MissReason,
        OpExplanation as OpExplanation,
        OpState as OpState,
        Plan as Plan,
        PlanOp as PlanOp,
        SharedCache as SharedCache,
        SharedCacheStats as SharedCacheStats,
        SharedGCPolicy as SharedGCPolicy,
        Solver as Solver,
        SolveRequest as SolveRequest,
        SolveResult as SolveResult,
        explain as explain,
        plan as plan,
        solve_explained as solve_explained,
    )
    from .cache import (
        ActionRecord as ActionRecord,
        BlobDigestError as BlobDigestError,
        BlobStore as BlobStore,
        CacheBlob as CacheBlob,
        CacheBlobCodec as CacheBlobCodec,
        CacheExportError as CacheExportError,
        CacheImportError as CacheImportError,
        CombinedCacheManager as CombinedCacheManager,
        InMemoryCacheManager as InMemoryCacheManager,
        KeyedCacheManager as KeyedCacheManager,
        KeyExporter as KeyExporter,
        LocalCacheExport as LocalCacheExport,
        LocalCacheExportStats as LocalCacheExportStats,
        LocalCacheImport as LocalCacheImport,
        LocalCacheSource as LocalCacheSource,
        MergedExporter as MergedExporter,
        PostgresCacheStore as PostgresCacheStore,
        SharedCacheError as SharedCacheError,
        SharedPruneReport as SharedPruneReport,
        SharedUsage as SharedUsage,
        SQLiteCacheStorage as SQLiteCacheStorage,
        export_cache as export_cache,
        export_local_cache as export_local_cache,
        open_local_cache as open_local_cache,
    )
    from .definition import (
        DEFINITION_VERSION as DEFINITION_VERSION,
        Definition as Definition,
        DefinitionError as DefinitionError,
        DefinitionVertex as DefinitionVertex,
        InMemoryOpHistory as InMemoryOpHistory,
        JSONValue as JSONValue,
        Node as Node,
        NodeOutput as NodeOutput,
        OpChange as OpChange,
        OpContext as OpContext,
        OpDef as OpDef,
        OpDefinitionRecord as OpDefinitionRecord,
        OpFactory as OpFactory,
        OpHistory as OpHistory,
        OpKind as OpKind,
        OpKindRegistry as OpKindRegistry,
        OpMetadata as OpMetadata,
        OutputRef as OutputRef,
        canonical_json as canonical_json,
        default_op_kinds as default_op_kinds,
        diff_definitions as diff_definitions,
        history_records as history_records,
        node as node,
        op_digest as op_digest,
    )
    from .engine import Job as Job
    from .insight import (
        BuildHistory as BuildHistory,
        BuildRecord as BuildRecord,
        BuildSummary as BuildSummary,
        HistoryPolicy as HistoryPolicy,
        OpRecord as OpRecord,
    )

_exports = LazyExports(
    globals(),
    {
        "._cache": (
            "CacheExporter", "CacheExportOptions", "CacheExportResult", "CacheExportTarget",
            "CacheInfoLink", "CacheKey", "CacheKeyWithSelector", "CacheLink", "CacheManager",
            "CacheRecord", "ExportableCacheKey",
        ),
        "._digest": ("digest_of",),
        "._errors": ("DoubleReleaseError", "InternalError", "SlowCacheError", "SolveError"),
        "._graph": ("Edge", "Vertex", "VertexOptions"),
        "._op": ("Builder", "CacheMap", "CacheMapDep", "ComputeDigest", "Op", "ResolveOp"),
        "._progress": ("ProgressEvent", "log_output", "report_cache_source", "report_waiting"),
        "._refs": (
            "CachedResultWithKeys", "SharedCachedResult", "SharedResult", "split_result_proxy",
        ),
        "._result": ("CachedResult", "Result", "ResultProxy"),
        ".bridge": (
            "Attestation", "Bridge", "Explanation", "Frontend", "FrontendResult", "MissKind",
            "MissReason", "OpExplanation", "OpState", "Plan", "PlanOp", "SharedCache",
            "SharedCacheStats", "SharedGCPolicy", "Solver", "SolveRequest", "SolveResult",
            "explain", "plan", "solve_explained",
        ),
        ".cache": (
            "ActionRecord", "BlobDigestError", "BlobStore", "CacheBlob", "CacheBlobCodec",
            "CacheExportError", "CacheImportError", "CombinedCacheManager", "InMemoryCacheManager",
            "KeyedCacheManager", "KeyExporter", "LocalCacheExport", "LocalCacheExportStats",
            "LocalCacheImport", "LocalCacheSource", "MergedExporter", "PostgresCacheStore",
            "SharedCacheError", "SharedPruneReport", "SharedUsage", "SQLiteCacheStorage",
            "export_cache", "export_local_cache", "open_local_cache",
        ),
        ".definition": (
            "DEFINITION_VERSION", "Definition", "DefinitionError", "DefinitionVertex",
            "InMemoryOpHistory", "JSONValue", "Node", "NodeOutput", "OpChange", "OpContext",
            "OpDef", "OpDefinitionRecord", "OpFactory", "OpHistory", "OpKind", "OpKindRegistry",
            "OpMetadata", "OutputRef", "canonical_json", "default_op_kinds", "diff_definitions",
            "history_records", "node", "op_digest",
        ),
        ".engine": ("Job",),
        ".insight": ("BuildHistory", "BuildRecord", "BuildSummary", "HistoryPolicy", "OpRecord"),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir

__version__ = "0.1.0"
