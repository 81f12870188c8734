"""Progress renderers for the command line: ``plain``, ``json`` and ``tty``.

Each renderer takes the :class:`~solver.ProgressEvent` stream of a job
(``Job.status()``) and writes to a text stream (the CLI passes stderr, so that
stdout stays free for data):

* ``plain``: one line per event, for CI logs::

      #1 [sources] STARTED
      #1 [sources] DONE 0.3s
      #2 [link app] CACHED
      #3 [compile] ERROR exit status 1
      #3 [compile] | a line the process wrote

* ``json``: one JSON object per event per line, for tools: ``vertex``, ``name``,
  ``status``, ``timestamp`` and, when set, ``error``; log events add ``stream``
  and ``data`` (decoded as UTF-8, invalid bytes replaced).
* ``tty``: a live view redrawn in place with ANSI escape codes, at most 10 times a
  second: every vertex with its running timer or DONE/CACHED/ERROR mark, and the
  last few log lines of the vertices still running. :func:`render_frame` builds
  one frame as plain lines (no escape codes), for a given width and time.

Only the standard library is used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import anyio

from .._progress import ProgressEvent

__all__ = [
    "JsonRenderer",
    "PlainRenderer",
    "Renderer",
    "TtyRenderer",
    "VertexView",
    "make_renderer",
    "render_frame",
    "run_progress",
]

STARTED = "started"
COMPLETED = "completed"
CACHED = "cached"
ERROR = "error"
LOG = "log"

LOG_LINES = 5  # log lines kept per running vertex in the tty view
REDRAW_INTERVAL = 0.1  # seconds: at most ~10 frames a second


class Renderer(Protocol):
    def handle(self, event: ProgressEvent) -> None: ...

    def close(self) -> None: ...


class _LineBuffer:
    """Split log chunks into whole lines per (vertex, stream)."""

    def __init__(self) -> None:
        self._partial: dict[tuple[str, int], str] = {}

    def feed(self, key: tuple[str, int], data: bytes) -> list[str]:
        text = self._partial.pop(key, "") + data.decode("utf-8", "replace")
        *lines, rest = text.replace("\r\n", "\n").split("\n")
        if rest:
            self._partial[key] = rest
        return lines

    def flush(self, vertex: str | None = None) -> list[tuple[tuple[str, int], str]]:
        keys = [k for k in self._partial if vertex is None or k[0] == vertex]
        return [(k, self._partial.pop(k)) for k in keys]


class PlainRenderer:
    """One line per event: ``#N [name] STATUS``; log lines are ``#N [name] | text``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._numbers: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._lines = _LineBuffer()

    def _prefix(self, event: ProgressEvent) -> str:
        n = self._numbers.setdefault(event.vertex, len(self._numbers) + 1)
        return f"#{n} [{event.name}]"

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def _flush_logs(self, vertex: str | None = None) -> None:
        for (v, _), text in self._lines.flush(vertex):
            n = self._numbers.get(v, 0)
            self._write(f"#{n} | {text}")

    def handle(self, event: ProgressEvent) -> None:
        prefix = self._prefix(event)
        status = event.status
        if status == LOG:
            for line in self._lines.feed((event.vertex, event.stream), event.data):
                self._write(f"{prefix} | {line}")
            return
        if status == STARTED:
            self._started[event.vertex] = event.timestamp
            self._write(f"{prefix} STARTED")
            return
        self._flush_logs(event.vertex)
        start = self._started.get(event.vertex)
        took = "" if start is None else f" {max(0.0, event.timestamp - start):.1f}s"
        if status == COMPLETED:
            self._write(f"{prefix} DONE{took}")
        elif status == CACHED:
            self._write(f"{prefix} CACHED")
        elif status == ERROR:
            self._write(f"{prefix} ERROR {_one_line(event.error or 'failed')}")
        else:
            self._write(f"{prefix} {status.upper()}")

    def close(self) -> None:
        self._flush_logs()


class JsonRenderer:
    """One JSON object per event, one per line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def handle(self, event: ProgressEvent) -> None:
        obj: dict[str, object] = {
            "vertex": event.vertex,
            "name": event.name,
            "status": event.status,
            "timestamp": event.timestamp,
        }
        if event.error is not None:
            obj["error"] = event.error
        if event.status == LOG:
            obj["stream"] = event.stream
            obj["data"] = event.data.decode("utf-8", "replace")
        self.out.write(json.dumps(obj, sort_keys=True) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


@dataclass
class VertexView:
    """What the tty view knows about one vertex."""

    name: str
    status: str = STARTED
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    partial: str = ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fit(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _duration(v: VertexView, now: float) -> str:
    if v.started is None:
        return ""
    end = v.ended if v.ended is not None else now
    return f"{max(0.0, end - v.started):.1f}s"


def _vertex_line(name: str, mark: str, width: int) -> str:
    """`` => [name]  mark``, shortening the name first so that a short mark (a
    timer, DONE, CACHED) stays visible."""
    line = f" => [{name}]  {mark}"
    if len(line) <= width:
        return line
    room = width - len(f" => []  {mark}")
    if room >= 8:
        return f" => [{_fit(name, room)}]  {mark}"
    return line


def render_frame(
    vertices: list[VertexView], now: float, width: int, height: int = 0, started: float = 0.0
) -> list[str]:
    """The lines of one tty frame (no escape codes), each at most ``width - 1``
    characters (so that no line wraps). With ``height`` > 0, the frame has fewer
    than ``height`` lines: the oldest finished vertices are folded into one line."""
    done = sum(1 for v in vertices if v.status in (COMPLETED, CACHED))
    total_time = max(0.0, now - started) if started else 0.0
    header = f"[+] Building {total_time:.1f}s ({done}/{len(vertices)})"
    w = max(1, width - 1)
    body: list[list[str]] = []
    for v in vertices:
        logs: list[str] = []
        if v.status == COMPLETED:
            mark = f"DONE {_duration(v, now)}"
        elif v.status == CACHED:
            mark = "CACHED"
        elif v.status == ERROR:
            mark = f"ERROR {_one_line(v.error or 'failed')}"
        else:
            mark = _duration(v, now)
            tail = [*v.logs, v.partial] if v.partial else list(v.logs)
            logs = [f"    | {line}" for line in tail[-LOG_LINES:]]
        body.append([_vertex_line(v.name, mark, w), *logs])
    if height > 0:
        budget = height - 1 - 1  # the header, and room to keep the cursor on screen
        count = sum(len(b) for b in body)
        folded = 0
        i = 0
        while count > budget and i < len(body):
            if vertices[i].status in (COMPLETED, CACHED):
                count -= len(body[i])
                body[i] = []
                folded += 1
            i += 1
        if folded:
            count += 1
        while count > budget and body:  # still too tall: cut from the top
            for b in body:
                if b:
                    b.pop(0)
                    count -= 1
                    break
            else:
                break
        if folded:
            body.insert(0, [f" => ({folded} finished step(s) not shown)"])
    return [_fit(header, w)] + [_fit(line, w) for b in body for line in b]


class TtyRenderer:
    """A live view redrawn in place; :meth:`tick` redraws if something changed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.vertices: dict[str, VertexView] = {}
        self._lines_on_screen = 0
        self._dirty = True
        self._start = time.time()
        self._last_draw = 0.0

    def handle(self, event: ProgressEvent) -> None:
        v = self.vertices.get(event.vertex)
        if v is None:
            v = self.vertices[event.vertex] = VertexView(event.name)
        if event.status == LOG:
            text = v.partial + event.data.decode("utf-8", "replace").replace("\r\n", "\n")
            *lines, v.partial = text.split("\n")
            v.logs.extend(_one_line(line) for line in lines)
        elif event.status == STARTED:
            v.status, v.started = STARTED, event.timestamp
        else:
            v.status, v.ended, v.error = event.status, event.timestamp, event.error
        self._dirty = True

    def frame(self, now: float) -> list[str]:
        size = shutil.get_terminal_size()
        return render_frame(
            list(self.vertices.values()), now, size.columns, size.lines, self._start
        )

    def tick(self, force: bool = False) -> None:
        now = time.time()
        running = any(v.status == STARTED for v in self.vertices.values())
        if not (force or self._dirty or running):
            return
        if not force and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._draw(self.frame(now))
        self._last_draw = now
        self._dirty = False

    def _draw(self, lines: list[str]) -> None:
        parts = []
        if self._lines_on_screen:
            parts.append(f"\x1b[{self._lines_on_screen}F")  # to the start of the frame
        for line in lines:
            parts.append("\x1b[2K" + line + "\n")
        parts.append("\x1b[J")  # clear whatever the last frame left below
        self.out.write("".join(parts))
        self.out.flush()
        self._lines_on_screen = len(lines)

    def close(self) -> None:
        self.tick(force=True)
        # After the live view, the errors' logs in full (they were cut to fit).
        for v in self.vertices.values():
            if v.status == ERROR and (v.logs or v.partial):
                self.out.write(f"--- [{v.name}] last output:\n")
                for line in [*v.logs, v.partial] if v.partial else v.logs:
                    self.out.write(f"    {line}\n")
        self.out.flush()


def make_renderer(mode: str, out: TextIO) -> Renderer:
    """The renderer for ``mode`` (``auto``, ``tty``, ``plain`` or ``json``);
    ``auto`` is ``tty`` when ``out`` is a terminal (and ``TERM`` is not ``dumb``),
    else ``plain``."""
    if mode == "auto":
        is_tty = out.isatty() and os.environ.get("TERM", "") != "dumb"
        mode = "tty" if is_tty else "plain"
    if mode == "tty":
        return TtyRenderer(out)
    if mode == "plain":
        return PlainRenderer(out)
    if mode == "json":
        return JsonRenderer(out)
    raise ValueError(f"unknown progress mode {mode!r}")


async def run_progress(events: AsyncIterator[ProgressEvent], renderer: Renderer) -> None:
    """Feed ``events`` to ``renderer`` until they end, then close it; a tty
    renderer is also redrawn on a timer so that running timers move."""
    try:
        if isinstance(renderer, TtyRenderer):
            async with anyio.create_task_group() as tg:

                async def ticker() -> None:
                    while True:
                        renderer.tick()
                        await anyio.sleep(REDRAW_INTERVAL)

                tg.start_soon(ticker)
                async for event in events:
                    renderer.handle(event)
                tg.cancel_scope.cancel()
        else:
            async for event in events:
                renderer.handle(event)
    finally:
        renderer.close()
