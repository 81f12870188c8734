"""The high-level solve: requests, results, frontends and the ``Solver`` users meet.

After BuildKit's ``llbsolver``. :class:`Solver` composes the engine
(:mod:`solver.engine`) with definitions, the built-in worker as default, cache
imports and exports around a solve, and frontends handed in by name (never
imported): a frontend gets a :class:`Bridge` whose ``solve`` returns lazy
:class:`~solver.ResultProxy` objects in a :class:`FrontendResult`, and the
caller gets a :class:`SolveResult` that owns one handle per occurrence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._bridge import (
        MAX_FRONTEND_DEPTH as MAX_FRONTEND_DEPTH,
        DefinitionProxy as DefinitionProxy,
        SolverBridge as SolverBridge,
        to_solve_result as to_solve_result,
    )
    from ._caches import (
        build_with_caches as build_with_caches,
        default_codec as default_codec,
        opened_imports as opened_imports,
        run_exports as run_exports,
        with_cache_sources as with_cache_sources,
    )
    from ._check import (
        CheckReport as CheckReport,
        CheckStatus as CheckStatus,
        FileDifference as FileDifference,
        OpCheck as OpCheck,
        check_determinism as check_determinism,
        tree_digest as tree_digest,
    )
    from ._explain import (
        Explanation as Explanation,
        MissKind as MissKind,
        MissReason as MissReason,
        OpExplanation as OpExplanation,
        explain as explain,
        solve_explained as solve_explained,
    )
    from ._frontend import (
        Attestation as Attestation,
        Bridge as Bridge,
        Frontend as Frontend,
        FrontendResult as FrontendResult,
        ResultMap as ResultMap,
    )
    from ._plan import (
        OpState as OpState,
        Plan as Plan,
        PlanOp as PlanOp,
        plan as plan,
    )
    from ._request import (
        SolveRequest as SolveRequest,
        SolveResult as SolveResult,
    )
    from ._shared import (
        SHARED_KINDS as SHARED_KINDS,
        SharedCache as SharedCache,
        SharedCacheStats as SharedCacheStats,
        SharedGCPolicy as SharedGCPolicy,
        parse_shared_cache_url as parse_shared_cache_url,
    )
    from ._solver import (
        Solver as Solver,
        definitions_unrecorded as definitions_unrecorded,
    )
    from ._summary import (
        build_summary as build_summary,
        job_events as job_events,
        record_build as record_build,
    )

_exports = LazyExports(
    globals(),
    {
        "._bridge": ("MAX_FRONTEND_DEPTH", "DefinitionProxy", "SolverBridge", "to_solve_result"),
        "._caches": (
            "build_with_caches", "default_codec", "opened_imports", "run_exports",
            "with_cache_sources",
        ),
        "._check": (
            "CheckReport", "CheckStatus", "FileDifference", "OpCheck", "check_determinism",
            "tree_digest",
        ),
        "._explain": (
            "Explanation", "MissKind", "MissReason", "OpExplanation", "explain", "solve_explained",
        ),
        "._frontend": ("Attestation", "Bridge", "Frontend", "FrontendResult", "ResultMap"),
        "._plan": ("OpState", "Plan", "PlanOp", "plan"),
        "._request": ("SolveRequest", "SolveResult"),
        "._shared": (
            "SHARED_KINDS", "SharedCache", "SharedCacheStats", "SharedGCPolicy",
            "parse_shared_cache_url",
        ),
        "._solver": ("Solver", "definitions_unrecorded"),
        "._summary": ("build_summary", "job_events", "record_build"),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
