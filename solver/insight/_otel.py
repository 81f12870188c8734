"""OpenTelemetry spans for a build: one per solve, one per op under it.

Off unless the application has configured OpenTelemetry: the optional extra
(``pip install solver-engine[otel]``, which brings ``opentelemetry-api``) is
installed, ``opentelemetry.trace`` has been imported, and a tracer provider of
its own is set (``trace.set_tracer_provider(...)``, or the
``opentelemetry-instrument`` wrapper, with an exporter). The spans are made from
the build's summary once the build is over, with the ops' own start and end
times, so the build itself never calls OpenTelemetry. When it is off, the check
is one dictionary look-up in ``sys.modules``: nothing is imported.

Span names: ``solver.build`` for the solve, the op's name for each op; attributes
``solver.vertex``, ``solver.state``, ``solver.cache_source``, ``solver.error``
(op spans) and the build's counts (the solve span). An op that did not run (cached
or not run) is a zero-length span at the time its result was there.
"""

from __future__ import annotations

import sys
from typing import Any

from ._summary import BuildSummary

__all__ = ["emit_spans", "tracing_enabled"]

_TRACER_NAME = "solver-engine"


def _trace_module() -> Any:
    """``opentelemetry.trace`` if the application imported it, else ``None``."""
    return sys.modules.get("opentelemetry.trace")


def tracing_enabled() -> bool:
    """Whether a tracer provider is configured (see the module docstring)."""
    trace = _trace_module()
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _ns(t: float) -> int:
    return int(t * 1_000_000_000)


def emit_spans(summary: BuildSummary, provider: Any = None) -> bool:
    """Send the spans of ``summary`` to ``provider`` (a ``TracerProvider``;
    default: the configured one); ``False`` (and nothing done) when no provider
    is given and tracing is off. O(ops)."""
    if provider is None and not tracing_enabled():
        return False
    trace = _trace_module()
    if trace is None:  # a provider was given: OpenTelemetry is installed
        import opentelemetry.trace as trace
    tracer = trace.get_tracer(_TRACER_NAME, tracer_provider=provider)
    root = tracer.start_span(
        "solver.build",
        start_time=_ns(summary.started),
        attributes={
            "solver.build": summary.build,
            "solver.ops": len(summary.ops),
            "solver.executed": summary.executed,
            "solver.cached": summary.cached,
            "solver.failed": summary.failed,
        },
    )
    context = trace.set_span_in_context(root)
    for op in summary.ops:
        end = op.ended if op.ended is not None else summary.ended
        start = op.started if op.started is not None else end
        attributes = {"solver.vertex": op.digest, "solver.state": op.state}
        if op.cache_source is not None:
            attributes["solver.cache_source"] = op.cache_source
        if op.error is not None:
            attributes["solver.error"] = op.error
        span = tracer.start_span(
            op.name or op.digest, context=context, start_time=_ns(start), attributes=attributes
        )
        if op.state == "failed":
            span.set_status(trace.Status(trace.StatusCode.ERROR, op.error or "failed"))
        span.end(end_time=_ns(end))
    if summary.failed:
        root.set_status(trace.Status(trace.StatusCode.ERROR, f"{summary.failed} op(s) failed"))
    root.end(end_time=_ns(summary.ended))
    return True
