"""The summary of one solve, from its job's progress events.

A job keeps every event of the vertices it uses (``Job.status()``), so what a
build did can be read back once it is over, without a task watching it while
it runs: :func:`build_summary` drains what the job has buffered and folds it
with the graph (:func:`solver.insight.summarize`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anyio

from .._progress import ProgressEvent
from ..insight import BuildHistory, BuildSummary, emit_spans, summarize

if TYPE_CHECKING:
    from ..engine import Job

__all__ = ["build_summary", "job_events", "record_build"]

logger = logging.getLogger("solver")


async def job_events(job: Job) -> list[ProgressEvent]:
    """Every event ``job`` has buffered so far; never waits for more. O(events).

    ``Job.status()`` yields buffered events without suspending and waits only
    once it has none left (never, for a discarded job); that wait is cut short
    by a cancelled scope of its own, so the loop ends exactly at the end of the
    buffer. It always reaches one checkpoint: a caller whose own scope is
    cancelled gets its cancellation there, so shield the call to read the events
    regardless (:meth:`Solver.solve` does, to record a cancelled build)."""
    events: list[ProgressEvent] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        async for event in job.status():
            events.append(event)
        await anyio.lowlevel.checkpoint()  # a discarded job's stream ends without one
    return events


async def build_summary(
    job: Job,
    graph: Mapping[str, Sequence[str]],
    *,
    build: str,
    started: float,
    ended: float,
) -> BuildSummary:
    """The :class:`~solver.insight.BuildSummary` of the build ``job`` ran over
    ``graph`` (:func:`~solver.insight.op_graph`) between ``started`` and
    ``ended``."""
    events = await job_events(job)
    return summarize(events, graph, build=build, started=started, ended=ended)


def record_build(summary: BuildSummary, history: BuildHistory | None) -> None:
    """Record ``summary`` in ``history`` (if any) and send its OpenTelemetry
    spans (when tracing is configured). Never raises: a build that is over is
    not failed by its record; a failure is logged."""
    if history is not None:
        try:
            history.add(summary)
        except Exception:
            logger.exception("recording the build in %s failed", history.directory)
    try:
        emit_spans(summary)
    except Exception:
        logger.exception("sending the build's OpenTelemetry spans failed")
