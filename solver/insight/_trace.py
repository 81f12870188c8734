"""A build record as Chrome trace-event JSON (Perfetto, ``chrome://tracing``).

One complete event (``"ph": "X"``) per op. Ops that ran are laid out on
*slots*, one track each: an op goes on the lowest slot free when it starts (the
interval-partitioning greedy, which uses as many slots as ops ever ran at once),
so slices on one track never overlap and the tracks show how wide the build
ran. Ops that did not run (cached, not run) are instants (``dur`` 0) on a track
of their own, at the time their result was there (the build's end for an op
that never ran). Times are integer microseconds from the build's start, and an
op's ``dur`` is its end minus its start after rounding, so it is within 1 µs of
the record's duration and consecutive slices on a track stay ordered.
"""

from __future__ import annotations

import heapq
from typing import Any

from ._summary import BuildSummary

__all__ = ["chrome_trace"]

_PID = 1


def _us(t: float, origin: float) -> int:
    return round((t - origin) * 1_000_000)


def chrome_trace(summary: BuildSummary, *, title: str = "solver build") -> dict[str, Any]:
    """The trace of ``summary`` as a JSON-ready dict (``{"traceEvents": [...]}``).
    O(ops log ops)."""
    origin = summary.started
    end_us = _us(summary.ended, origin)
    ran = sorted(
        (op for op in summary.ops if op.started is not None and op.ended is not None),
        key=lambda op: (op.started, op.ended),
    )
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": _PID, "tid": 0, "args": {"name": title}},
    ]
    free: list[tuple[int, int]] = []  # (end in us, slot) of slots in use
    idle: list[int] = []  # slots free now, lowest first
    slots = 0
    for op in ran:
        assert op.started is not None
        assert op.ended is not None
        start = _us(op.started, origin)
        stop = max(start, _us(op.ended, origin))
        while free and free[0][0] <= start:
            heapq.heappush(idle, heapq.heappop(free)[1])
        if idle:
            slot = heapq.heappop(idle)
        else:
            slots += 1
            slot = slots
        heapq.heappush(free, (stop, slot))
        events.append(_slice(op, slot, start, stop - start))
    for slot in range(1, slots + 1):
        events.append(_track_name(slot, f"slot {slot}"))
    instants = slots + 1
    events.append(_track_name(instants, "cached / not run"))
    for op in summary.ops:
        if op.started is None:
            at = end_us if op.ended is None else _us(op.ended, origin)
            events.append(_slice(op, instants, at, 0))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"build": summary.build, "started": summary.started},
    }


def _track_name(tid: int, name: str) -> dict[str, Any]:
    return {"ph": "M", "name": "thread_name", "pid": _PID, "tid": tid, "args": {"name": name}}


def _slice(op: Any, tid: int, ts: int, dur: int) -> dict[str, Any]:
    args: dict[str, Any] = {"vertex": op.digest, "state": op.state}
    if op.cache_source is not None:
        args["cache_source"] = op.cache_source
    if op.error is not None:
        args["error"] = op.error
    if op.reason is not None:
        args["reason"] = op.reason
    return {
        "ph": "X",
        "name": op.name,
        "cat": op.state,
        "pid": _PID,
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "args": args,
    }
