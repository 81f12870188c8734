"""OpenTelemetry spans: one per solve and one per op under it when a tracer
provider is configured; nothing (not even an import) when it is not."""

from __future__ import annotations

import sys

import pytest
from frontend_support import Ops, text

from solver import Solver
from solver.insight import BuildSummary, OpRecord, emit_spans, tracing_enabled

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> object:
    """A configured provider (as the application's ``set_tracer_provider`` would
    make it), recording spans in memory; restored after the test."""
    spans = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(spans))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    return spans


@pytest.mark.anyio
async def test_one_span_per_solve_and_per_op(exporter: object) -> None:
    assert tracing_enabled()
    ops = Ops()
    async with Solver(op_kinds=ops.registry()) as s, await s.solve(text("a", "b")) as res:
        summary = res.summary
    assert summary is not None
    spans = exporter.get_finished_spans()  # type: ignore[attr-defined]
    (root,) = [sp for sp in spans if sp.name == "solver.build"]
    children = [sp for sp in spans if sp is not root]
    assert len(children) == len(summary.ops) == len(ops.execs) == 2
    assert all(sp.parent.span_id == root.context.span_id for sp in children)
    assert root.attributes["solver.executed"] == 2
    for sp, op in zip(children, summary.ops, strict=True):
        assert sp.attributes["solver.vertex"] == op.digest
        assert sp.attributes["solver.state"] == "executed"
        assert sp.end_time - sp.start_time == pytest.approx(op.duration * 1e9, abs=1000)
    assert root.start_time <= min(sp.start_time for sp in children)


def test_failed_and_cached_ops(exporter: object) -> None:
    summary = BuildSummary("x", 1.0, 4.0, (
        OpRecord("a", "a", "cached", None, 2.0, "local"),
        OpRecord("b", "b", "failed", 2.0, 3.0, None, "boom", inputs=("a",)),
    ))
    assert emit_spans(summary)
    spans = {sp.name: sp for sp in exporter.get_finished_spans()}  # type: ignore[attr-defined]
    assert spans["a"].start_time == spans["a"].end_time == 2_000_000_000
    assert spans["a"].attributes["solver.cache_source"] == "local"
    assert spans["b"].status.status_code == trace.StatusCode.ERROR
    assert spans["solver.build"].status.status_code == trace.StatusCode.ERROR


def test_off_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    summary = BuildSummary("x", 1.0, 2.0, (OpRecord("a", "a", "executed", 1.0, 2.0),))
    # imported but no provider set: off
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    assert not tracing_enabled()
    assert emit_spans(summary) is False
    # never imported by the application: off, and nothing is imported
    monkeypatch.delitem(sys.modules, "opentelemetry.trace")
    assert not tracing_enabled()
    assert emit_spans(summary) is False
    assert "opentelemetry.trace" not in sys.modules
