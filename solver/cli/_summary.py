"""The end of ``solver build``: its summary, its history record, and the CI gate.

Every build ends its progress output with the build's summary
(:class:`~solver.insight.BuildSummary`): text lines after the ``plain`` and
``tty`` output (the tty view's own closing line has the counts), one last JSON
object ``{"status": "summary", "summary": {...}}`` in ``json`` mode. It is
recorded in the history (``<cache dir>/snapshots/history``) whether the build
succeeded or failed. ``--expect-cached`` and ``--max-executed N`` then turn ops
that ran into a failure that lists them (see ``docs/insight.md``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from .._graph import Edge
from ..bridge import build_summary, record_build
from ..insight import EXECUTED, FAILED, BuildHistory, BuildSummary, op_graph
from ._progress import JsonRenderer, Renderer, TtyRenderer

if TYPE_CHECKING:
    from ..engine import Job

__all__ = ["add_gate_arguments", "finish_build", "gate_failures", "write_summary"]



def write_summary(renderer: Renderer, out: TextIO, summary: BuildSummary) -> None:
    """The summary, in the form of ``renderer``'s output, on ``out``."""
    if isinstance(renderer, JsonRenderer):
        doc = {"status": "summary", "timestamp": summary.ended, "summary": summary.to_json()}
        out.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        lines = summary.lines()
        if isinstance(renderer, TtyRenderer):
            lines = lines[1:]  # its own closing line has the counts
        out.writelines(line + "\n" for line in lines)
    out.flush()


async def finish_build(
    job: Job,
    edge: Edge | str,
    started: float,
    renderer: Renderer,
    out: TextIO,
    history: BuildHistory | None,
    reasons: Callable[[str], str | None] | None = None,
) -> BuildSummary:
    """Summarize the build of ``edge`` that ``job`` (discarded) ran since
    ``started``, write the summary after the progress output and record it in
    ``history`` (its :attr:`~solver.insight.BuildHistory.last`); a history that
    cannot be written is a warning, not a failed build. For a frontend's build,
    ``edge`` is a name for it: its ops are those of the job's events, without
    their inputs (the frontend's graphs are its own). ``reasons(digest)``, with
    ``--explain``, says why an op ran (``docs/explain.md``): every op that ran
    or failed gets it in its record, so the history and the CI gate show it."""
    ended = time.time()
    if isinstance(edge, str):
        graph, build = {}, edge
    else:
        graph, build = op_graph(edge), edge.vertex.digest
    summary = await build_summary(job, graph, build=build, started=started, ended=ended)
    if reasons is not None:
        summary = with_reasons(summary, reasons)
    write_summary(renderer, out, summary)
    record_build(summary, history)
    return summary


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--expect-cached`` and ``--max-executed N``."""
    parser.add_argument(
        "--expect-cached",
        action="store_true",
        help="fail (exit 1, listing them) if any op ran instead of coming from a cache",
    )
    parser.add_argument(
        "--max-executed",
        type=count_arg,
        default=None,
        metavar="N",
        help="fail (exit 1, listing them) if more than N ops ran",
    )


def count_arg(text: str) -> int:
    """An argparse type: a whole number >= 0 (argparse names the option)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {text!r}")
    return n


def gate_failures(
    summary: BuildSummary, *, expect_cached: bool, max_executed: int | None
) -> tuple[str, list[str]] | None:
    """``None`` when the gate passes, else (the one-line error, one line per op
    that ran: its name, digest and, when known, why it ran)."""
    limit = 0 if expect_cached else max_executed
    if limit is None:
        return None
    ran = summary.ran()
    if len(ran) <= limit:
        return None
    lines = [
        f"ran: {op.name} ({op.digest[:19]})" + (f": {op.reason}" if op.reason else "")
        for op in ran
    ]
    what = "--expect-cached" if expect_cached else f"--max-executed {limit}"
    noun = "op" if len(ran) == 1 else "ops"
    return f"{what}: {len(ran)} {noun} ran (listed above)", lines


def with_reasons(summary: BuildSummary, reasons: Callable[[str], str | None]) -> BuildSummary:
    """``summary`` with ``reasons(digest)`` as the reason of every op that ran
    (executed or failed); the others keep theirs."""
    ops = tuple(
        op._replace(reason=reasons(op.digest)) if op.state in (EXECUTED, FAILED) else op
        for op in summary.ops
    )
    return BuildSummary(summary.build, summary.started, summary.ended, ops)
