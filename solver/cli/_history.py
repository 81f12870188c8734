"""``solver history``: the records of past builds (``docs/insight.md``).

Every ``solver build`` of a definition leaves a record in
``<cache dir>/snapshots/history`` (:class:`~solver.insight.BuildHistory`).
``ls`` lists them, newest first; ``show ID`` prints one (its summary, then a
line per op); ``trace ID --format chrome`` writes its Chrome trace;
``compare A B`` says what ran in B that A had cached and where op time changed;
``prune`` deletes records by count and age. ``ID`` is a record id or a prefix
of one, or ``last``. Output goes to stdout; errors are the command line's one
``solver: error:`` line.

This module does not import ``_main`` (which adds the subcommand): what it needs
from there is handed to :func:`add_history_command`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..insight import BuildHistory, BuildRecord, HistoryPolicy
from ._summary import count_arg

__all__ = ["add_history_command", "format_entries", "format_record"]

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def format_entries(history: BuildHistory) -> list[str]:
    """The ``ls`` table."""
    entries = history.entries()
    if not entries:
        return [f"no builds recorded in {history.directory}"]
    rows = [["ID", "STARTED", "TIME", "OPS", "RUN", "CACHED", "FAILED", "BUILD"]]
    for e in entries:
        rows.append([
            e.id,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.started)),
            f"{max(0.0, e.ended - e.started):.3f}s",
            str(e.ops), str(e.executed), str(e.cached), str(e.failed),
            e.build[:19],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    ]


def format_record(record: BuildRecord) -> list[str]:
    """The ``show`` report: the summary, then one line per op (build order) with
    its state, time and cache source, and a failed op's error and log tail."""
    s = record.summary
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started))
    lines = [f"Build {record.id} of {s.build}, started {started}", *s.lines(), ""]
    for op in s.ops:
        detail = op.state
        if op.started is not None:
            detail += f" {op.duration:.3f}s"
        if op.cache_source == "unneeded":
            detail += " (not needed: a later op's result was loaded)"
        elif op.cache_source is not None:
            detail += f" from {op.cache_source}"
        if op.reason:
            detail += f" ({op.reason})"
        lines.append(f"{op.digest[:19]}  {op.name}: {detail}")
        if op.error:
            lines.append(f"    error: {' '.join(op.error.split())}")
        lines += [f"    | {line}" for line in op.log_tail.splitlines()]
    return lines


def _record_json(record: BuildRecord) -> str:
    s = record.summary
    doc = {
        "id": record.id,
        **s.to_json(),
        "ops": [
            {
                "vertex": op.digest, "name": op.name, "state": op.state,
                "started": op.started, "ended": op.ended, "duration": op.duration,
                "cache_source": op.cache_source, "error": op.error,
                "log_tail": op.log_tail, "reason": op.reason, "inputs": list(op.inputs),
            }
            for op in s.ops
        ],
    }
    return json.dumps(doc, indent=2, sort_keys=True)


def add_history_command(
    sub: argparse._SubParsersAction[_P],
    *,
    history_of: Callable[[str | None], BuildHistory],
    duration_arg: Callable[[str], float],
    add_debug: Callable[[argparse.ArgumentParser], None],
    cache_help: str,
) -> _P:
    """Add ``history`` and its subcommands to ``sub``. ``history_of(cache_dir)``
    is the command line's history in that cache directory; ``duration_arg``
    parses ``--keep-duration``; ``add_debug`` adds ``--debug``."""
    h = sub.add_parser(
        "history",
        help="list, show, trace, compare and prune the records of past builds",
        description="Every 'solver build' leaves a record of what it did. ID is a "
        "record id, a prefix of one, or 'last'.",
    )
    hsub = h.add_subparsers(dest="history_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
        add_debug(p)

    ls = hsub.add_parser("ls", help="list the recorded builds, newest first")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    common(ls)

    def cmd_ls(args: argparse.Namespace) -> int:
        history = history_of(args.cache_dir)
        if args.format == "json":
            doc = [dataclasses.asdict(e) for e in history.entries()]
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print("\n".join(format_entries(history)))
        return 0

    ls.set_defaults(func=cmd_ls)

    show = hsub.add_parser("show", help="show one build: its summary and every op")
    show.add_argument("id", metavar="ID")
    show.add_argument("--format", choices=("text", "json"), default="text")
    common(show)

    def cmd_show(args: argparse.Namespace) -> int:
        record = history_of(args.cache_dir).get(args.id)
        if args.format == "json":
            print(_record_json(record))
        else:
            print("\n".join(format_record(record)))
        return 0

    show.set_defaults(func=cmd_show)

    trace = hsub.add_parser(
        "trace",
        help="write a build's trace (Chrome trace-event JSON, for Perfetto)",
        description="Write the trace of build ID: one slice per op, a track per "
        "running slot. Open it in https://ui.perfetto.dev or chrome://tracing.",
    )
    trace.add_argument("id", metavar="ID")
    trace.add_argument("--format", choices=("chrome",), default="chrome")
    trace.add_argument("-o", "--output", metavar="FILE", default="-",
                       help="where to write it (default: stdout)")
    common(trace)

    def cmd_trace(args: argparse.Namespace) -> int:
        record = history_of(args.cache_dir).get(args.id)
        from ..insight import chrome_trace  # what only 'history trace' uses

        text = json.dumps(chrome_trace(record.summary, title=f"solver build {record.id}"))
        if args.output == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        return 0

    trace.set_defaults(func=cmd_trace)

    cmp = hsub.add_parser(
        "compare",
        help="what ran in build B that build A had cached, and op time changes",
    )
    cmp.add_argument("a", metavar="A")
    cmp.add_argument("b", metavar="B")
    cmp.add_argument("--limit", type=int, default=10, metavar="N",
                     help="show at most N op time changes (default 10)")
    common(cmp)

    def cmd_compare(args: argparse.Namespace) -> int:
        history = history_of(args.cache_dir)
        a, b = history.get(args.a), history.get(args.b)
        print(f"A: {a.id}  B: {b.id}")
        from ..insight import compare_builds  # what only 'history compare' uses

        print("\n".join(compare_builds(a.summary, b.summary).lines(args.limit)))
        return 0

    cmp.set_defaults(func=cmd_compare)

    prune = hsub.add_parser(
        "prune",
        help="delete build records by count and age",
        description="Delete the build records that the limits do not keep: beyond "
        "the newest --keep-records, or older than --keep-duration. Without limits, "
        "the default policy (100 records, 30 days), which every build also applies.",
    )
    prune.add_argument("--keep-records", type=count_arg, default=None, metavar="N",
                       help="keep at most the N newest records")
    prune.add_argument("--keep-duration", type=duration_arg, default=None,
                       metavar="DURATION", help="keep records of builds started within "
                       "DURATION (e.g. 24h, 7d)")
    prune.add_argument("--all", action="store_true", help="delete every record")
    common(prune)

    def cmd_prune(args: argparse.Namespace) -> int:
        history = history_of(args.cache_dir)
        if args.all:
            policy = HistoryPolicy(keep_records=0, keep_duration=None)
        elif args.keep_records is None and args.keep_duration is None:
            policy = HistoryPolicy()
        else:
            policy = HistoryPolicy(args.keep_records, args.keep_duration)
        deleted = history.prune(policy)
        for record_id in deleted:
            print(f"deleted {record_id}")
        print(f"Total: deleted {len(deleted)} record(s); {len(history.entries())} left")
        return 0

    prune.set_defaults(func=cmd_prune)
    return h


