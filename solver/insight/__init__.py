"""Build insight: what a build did, a history of builds, traces and comparisons.

:func:`summarize` folds a build's progress events into a :class:`BuildSummary`
(one :class:`OpRecord` per op; counts, cache hits by source, op and engine
time, the critical path). A :class:`BuildHistory` keeps one compact record per
build in a directory, pruned by a :class:`HistoryPolicy`; :func:`chrome_trace`
turns a record into Chrome trace-event JSON and :func:`compare_builds` says
what changed between two. See ``docs/insight.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._compare import (
        BuildComparison as BuildComparison,
        OpChange as OpChange,
        compare_builds as compare_builds,
    )
    from ._history import (
        BuildHistory as BuildHistory,
        BuildRecord as BuildRecord,
        HistoryEntry as HistoryEntry,
        HistoryError as HistoryError,
        HistoryPolicy as HistoryPolicy,
    )
    from ._otel import emit_spans as emit_spans, tracing_enabled as tracing_enabled
    from ._summary import (
        EXECUTED as EXECUTED,
        FAILED as FAILED,
        BuildSummary as BuildSummary,
        OpRecord as OpRecord,
        log_tail as log_tail,
        op_graph as op_graph,
        summarize as summarize,
    )
    from ._trace import chrome_trace as chrome_trace

_exports = LazyExports(
    globals(),
    {
        "._compare": ("BuildComparison", "OpChange", "compare_builds"),
        "._history": (
            "BuildHistory", "BuildRecord", "HistoryEntry", "HistoryError", "HistoryPolicy",
        ),
        "._otel": ("emit_spans", "tracing_enabled"),
        "._summary": (
            "EXECUTED", "FAILED", "BuildSummary", "OpRecord", "log_tail", "op_graph", "summarize",
        ),
        "._trace": ("chrome_trace",),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
