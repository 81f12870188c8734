"""The summary of one solve, from its job's progress events.

A job keeps every event of the vertices it uses (``Job.status()``), so what a
build did can be read back once it is over, without a task watching it while
it runs: :func:`build_summary` drains what the job has buffered and folds it
with the graph (:func:`solver.insight.summarize`).

:meth:`Solver.solve <solver.Solver.solve>` makes a summary for every solve, and
most callers never read it: it drains the events at once (what the job has
buffered then, and nothing later) but folds them only when
``SolveResult.summary`` is first read (:class:`PendingSummary`), or at once
when a history records the build or tracing is on. The fold is O(vertices):
about 30 ms of a warm 10k-op solve (``docs/insight.md``, "Folded when read").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

import anyio

from .._progress import ProgressEvent
from ..insight import BuildHistory, BuildSummary, emit_spans, op_graph, summarize

if TYPE_CHECKING:
    from .._graph import Edge
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


class PendingSummary:
    """The summary of one build, folded from the events read at its end the first
    time it is called (then kept); calling it again returns the same object.
    Holds the events and the build's root edge until then."""

    __slots__ = ("_build", "_edge", "_ended", "_events", "_started", "_summary")

    def __init__(
        self,
        events: list[ProgressEvent],
        edge: Edge,
        *,
        started: float,
        ended: float,
    ) -> None:
        self._events: list[ProgressEvent] | None = events
        self._edge: Edge | None = edge
        self._build: Final = edge.vertex.digest
        self._started: Final = started
        self._ended: Final = ended
        self._summary: BuildSummary | None = None

    def __call__(self) -> BuildSummary:
        summary = self._summary
        if summary is None:
            assert self._events is not None
            assert self._edge is not None
            summary = self._summary = summarize(
                self._events,
                op_graph(self._edge),
                build=self._build,
                started=self._started,
                ended=self._ended,
            )
            self._events = self._edge = None
        return summary

    @property
    def folded(self) -> bool:
        """Whether it was folded (called) yet."""
        return self._summary is not None

    def __repr__(self) -> str:
        state = "folded" if self._summary is not None else "not folded"
        return f"<PendingSummary {self._build[:19]} {state}>"


async def pending_summary(
    job: Job, edge: Edge, *, started: float, ended: float
) -> PendingSummary:
    """The summary of the build of ``edge`` that ``job`` ran between ``started``
    and ``ended``, to be folded when it is first read: the job's buffered events
    are read now (:func:`job_events`, O(events))."""
    return PendingSummary(await job_events(job), edge, started=started, ended=ended)


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
