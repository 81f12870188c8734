"""An async solver engine for content-addressed build graphs.

Describe work as vertices (each with a digest covering its whole input
subgraph), let ``resolve_op`` turn each vertex into an :class:`Op`, and build
edges with a :class:`Job` of a :class:`Solver`. Identical work runs once however
many jobs ask for it; results are cached by key and reference-counted.
"""

from ._cache import (
    CacheExporter as CacheExporter,
    CacheInfoLink as CacheInfoLink,
    CacheKey as CacheKey,
    CacheKeyWithSelector as CacheKeyWithSelector,
    CacheManager as CacheManager,
    CacheRecord as CacheRecord,
    ExportableCacheKey as ExportableCacheKey,
)
from ._cacheexport import (
    CacheExportOptions as CacheExportOptions,
    CacheExportResult as CacheExportResult,
    CacheExportTarget as CacheExportTarget,
    CacheLink as CacheLink,
    KeyExporter as KeyExporter,
    MergedExporter as MergedExporter,
    export_cache as export_cache,
)
from ._cachemanager import (
    CombinedCacheManager as CombinedCacheManager,
    InMemoryCacheManager as InMemoryCacheManager,
    KeyedCacheManager as KeyedCacheManager,
)
from ._definition import (
    DEFINITION_VERSION as DEFINITION_VERSION,
    Definition as Definition,
    DefinitionError as DefinitionError,
    DefinitionVertex as DefinitionVertex,
    JSONValue as JSONValue,
    Node as Node,
    NodeOutput as NodeOutput,
    OpDef as OpDef,
    OpMetadata as OpMetadata,
    OutputRef as OutputRef,
    canonical_json as canonical_json,
    node as node,
    op_digest as op_digest,
)
from ._digest import digest_of as digest_of
from ._errors import (
    DoubleReleaseError as DoubleReleaseError,
    InternalError as InternalError,
    SlowCacheError as SlowCacheError,
    SolveError as SolveError,
)
from ._frontend import (
    Attestation as Attestation,
    Bridge as Bridge,
    Frontend as Frontend,
    FrontendResult as FrontendResult,
)
from ._graph import Edge as Edge, Vertex as Vertex, VertexOptions as VertexOptions
from ._localcache import (
    CacheBlob as CacheBlob,
    CacheBlobCodec as CacheBlobCodec,
    CacheExportError as CacheExportError,
    CacheImportError as CacheImportError,
    LocalCacheExport as LocalCacheExport,
    LocalCacheExportStats as LocalCacheExportStats,
    LocalCacheImport as LocalCacheImport,
    LocalCacheSource as LocalCacheSource,
    export_local_cache as export_local_cache,
    open_local_cache as open_local_cache,
)
from ._op import (
    Builder as Builder,
    CacheMap as CacheMap,
    CacheMapDep as CacheMapDep,
    ComputeDigest as ComputeDigest,
    Op as Op,
    ResolveOp as ResolveOp,
)
from ._opkind import (
    OpContext as OpContext,
    OpFactory as OpFactory,
    OpKind as OpKind,
    OpKindRegistry as OpKindRegistry,
    default_op_kinds as default_op_kinds,
)
from ._progress import ProgressEvent as ProgressEvent, log_output as log_output
from ._refs import (
    CachedResultWithKeys as CachedResultWithKeys,
    SharedCachedResult as SharedCachedResult,
    SharedResult as SharedResult,
    split_result_proxy as split_result_proxy,
)
from ._result import CachedResult as CachedResult, Result as Result, ResultProxy as ResultProxy
from ._solve import SolveRequest as SolveRequest, SolveResult as SolveResult
from ._solver import Job as Job, Solver as Solver
from ._sqlitestorage import SQLiteCacheStorage as SQLiteCacheStorage

__version__ = "0.1.0"
