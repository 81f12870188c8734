"""Progress renderers for the command line: ``plain``, ``json`` and ``tty``.

Each renderer takes the :class:`~solver.ProgressEvent` stream of a job
(``Job.status()``) and writes to a text stream (the CLI passes stderr, so that
stdout stays free for data):

* ``plain``: one line per event, for CI logs::

      #1 [sources] STARTED
      #1 [sources] DONE 0.3s
      #4 [cc b.c] WAITING
      #4 [cc b.c] STARTED
      #2 [link app] CACHED
      #3 [compile] ERROR exit status 1
      #3 [compile] | a line the process wrote

* ``json``: one JSON object per event per line, for tools: ``vertex``, ``name``,
  ``status``, ``timestamp`` and, when set, ``error`` and ``cache_source``
  (where a loaded result came from); log events add ``stream`` and ``data``
  (decoded as UTF-8, invalid bytes replaced); with ``solver build --explain``,
  the ``started`` event of an op (it runs) adds ``reason``, why it missed the
  cache (``docs/explain.md``). A step waiting for a slot of ``-j N`` has a
  ``waiting`` event before its ``started``.
* ``tty``: drawn with `rich <https://rich.readthedocs.io>`_. At the bottom, one
  live line per running step with its elapsed time and, under it, the last line
  the step wrote (if any), then one per step waiting for a slot of ``-j N``
  (``#4 [cc b.c] waiting``), redrawn at most 10 times a second. Above it, each step
  that ends is printed once and stays: ``DONE``/``CACHED``/``ERROR`` with its
  duration; a failed step is followed by the last lines it wrote. :meth:`close`
  ends with a summary (steps run, cached, failed, total time, and where the
  output went when the caller names it)::

      #1 [sources] DONE 0.3s
      #2 [link app] CACHED
      #3 [compile] ERROR 1.2s exit status 1
          | cc: error: main.c: no such file
      Finished in 1.6s: 1 step run, 1 cached, 1 failed

  Colour is used only on a terminal and never when ``NO_COLOR`` is set (to any
  value, even empty: https://no-color.org); without colour no style codes are
  written at all, only the cursor movements that redraw the live lines on a
  terminal. On a stream that is not a terminal there are no live lines: only the
  finished steps and the summary.

``make_renderer`` picks one (``auto``: ``tty`` when the stream is a terminal
whose ``TERM`` is not ``dumb``, else ``plain``); ``run_progress`` feeds one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

import anyio

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.live import Live
    from rich.text import Text

from .._progress import CACHED, COMPLETED, ERROR, LOG, STARTED, WAITING, ProgressEvent

__all__ = [
    "JsonRenderer",
    "PlainRenderer",
    "Renderer",
    "TtyRenderer",
    "describe_output",
    "make_console",
    "make_renderer",
    "run_progress",
]

CANCELED = "canceled"  # the tty renderer's own: still running when the stream ended

LOG_LINES = 5  # log lines kept per step, printed under it if it fails
REDRAW_INTERVAL = 0.1  # seconds: at most ~10 frames a second
PARTIAL_LIMIT = 4096  # characters kept of a line not yet ended (a progress bar may never end one)


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
        if status == WAITING:
            self._write(f"{prefix} WAITING")
            return
        self._flush_logs(event.vertex)
        start = self._started.get(event.vertex)
        took = "" if start is None else f" {max(0.0, event.timestamp - start):.1f}s"
        if status == COMPLETED:
            self._write(f"{prefix} DONE{took}")
        elif status == CACHED:
            self._write(f"{prefix} CACHED")
        elif status == ERROR:
            self._write(f"{prefix} ERROR {one_line(event.error or 'failed')}")
        else:
            self._write(f"{prefix} {status.upper()}")

    def close(self) -> None:
        self._flush_logs()


class JsonRenderer:
    """One JSON object per event, one per line; ``reasons`` (vertex digest ->
    why it missed the cache, or ``None``; asked when the vertex starts) adds
    ``reason`` to the ``started`` events."""

    def __init__(self, out: TextIO, reasons: Callable[[str], str | None] | None = None) -> None:
        self.out = out
        self.reasons = reasons

    def handle(self, event: ProgressEvent) -> None:
        obj: dict[str, object] = {
            "vertex": event.vertex,
            "name": event.name,
            "status": event.status,
            "timestamp": event.timestamp,
        }
        if event.error is not None:
            obj["error"] = event.error
        if event.status == STARTED and self.reasons is not None:
            reason = self.reasons(event.vertex)
            if reason is not None:
                obj["reason"] = reason
        if event.cache_source is not None:
            obj["cache_source"] = event.cache_source
        if event.status == LOG:
            obj["stream"] = event.stream
            obj["data"] = event.data.decode("utf-8", "replace")
        self.out.write(json.dumps(obj, sort_keys=True) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


def one_line(text: str) -> str:
    """``text`` on one line: runs of whitespace, newlines included, become one
    space (a message may hold a failing step's output)."""
    return " ".join(text.split())


def _last_segment(line: str) -> str:
    """What a terminal would show of ``line``: a carriage return (a progress bar
    redrawing itself) starts the line over, so the last non-blank segment wins."""
    return next((s for s in reversed(line.split("\r")) if s.strip()), "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_output(kind: str, dest: str) -> str:
    """How the tty summary names where ``--output`` went: ``DIR`` for a local
    directory, ``FILE (tar)`` for a tar file, ``stdout (tar)`` for ``dest=-``."""
    if kind == "tar":
        return "stdout (tar)" if dest == "-" else f"{dest} (tar)"
    return dest


def _no_color_env() -> bool:
    # https://no-color.org asks for any value to count; rich ignores an empty one.
    return "NO_COLOR" in os.environ


def _import_rich() -> None:
    """Bind rich's names in this module, the first time the ``tty`` renderer
    needs them: rich is ~25 ms of imports that ``plain`` and ``json`` never use
    (``docs/performance.md``, "CLI start-up")."""
    if "Text" not in globals():
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        globals().update(Console=Console, Live=Live, Text=Text)


def make_console(out: TextIO) -> Console:
    """A rich console on ``out`` for the ``tty`` renderer: terminal detection is
    rich's (``out.isatty()``, ``FORCE_COLOR``, ``TTY_COMPATIBLE``), colour is off
    when ``NO_COLOR`` is set to any value, and nothing in a step's name or output
    is read as markup, emoji codes or highlighted."""
    _import_rich()
    return Console(file=out, no_color=_no_color_env(), highlight=False, markup=False, emoji=False)


# Styles by role; all dropped (not just the colours) when colour is off, so that
# no SGR escape code at all is written then.
_STYLES = {
    "number": "dim",
    "timer": "yellow",
    WAITING: "dim",
    "log": "dim",
    COMPLETED: "green",
    CACHED: "cyan",
    ERROR: "bold red",
    CANCELED: "yellow",
    "summary": "bold green",
    "summary-failed": "bold red",
    "output": "bold",
}


@dataclass
class _Step:
    """What the tty renderer knows about one vertex."""

    number: int
    name: str
    status: str = ""  # "" until its first started/completed/cached/error event
    started: float | None = None
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    partial: dict[int, str] = field(default_factory=dict)  # per stream, a line not yet ended
    last: str = ""  # the line shown under the running step


class _RunningView:
    """The live part of the tty view, rendered from the renderer's state each
    time rich draws it (so that a line printed above it never redraws stale
    timers)."""

    def __init__(self, renderer: TtyRenderer) -> None:
        self._renderer = renderer

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self._renderer.running_lines(options.max_width)


class TtyRenderer:
    """A rich view: live lines for the running steps, a printed line for each
    step that ends and a summary on :meth:`close` (see the module docstring).

    ``out`` is wrapped in a console made by :func:`make_console` unless
    ``console`` is given (tests pass one with ``force_terminal`` and a fixed
    width). ``output`` names where the result went (see
    :func:`describe_output`); the summary says so unless a step failed.
    ``clock`` gives the time of the live timers and of the total, in the unit of
    the events' timestamps (``time.time``). :meth:`tick` redraws the live lines.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        console: Console | None = None,
        output: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _import_rich()
        if console is None:
            console = make_console(out if out is not None else sys.stderr)
        self.console = console
        self.output = output
        self._clock = clock
        self._colour = (
            not console.no_color and not _no_color_env() and console.color_system is not None
        )
        self._steps: dict[str, _Step] = {}
        self._start = clock()
        # No refresh thread (tick() redraws, on the caller's thread, so the state
        # needs no lock) and no redirection of sys.stdout: stdout may carry a tar.
        # Transient: the running lines are gone once the build is over.
        self._live = Live(
            _RunningView(self),
            console=console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._dirty = True
        self._last_draw: float | None = None
        self._closed = False

    def _style(self, role: str) -> str:
        return _STYLES.get(role, "") if self._colour else ""

    def _head(self, step: _Step) -> Text:
        return Text.assemble(
            (f"#{step.number}", self._style("number")), f" [{one_line(step.name)}] "
        )

    def handle(self, event: ProgressEvent) -> None:
        """Take one event; an ended step is printed at once, the live lines
        change at the next :meth:`tick`. Ignored after :meth:`close`."""
        if self._closed:
            return
        step = self._steps.get(event.vertex)
        if step is None:
            step = self._steps[event.vertex] = _Step(len(self._steps) + 1, event.name)
        if event.status == LOG:
            if self._log(step, event) and step.status == STARTED:
                self._dirty = True
            return
        if event.status == STARTED:
            step.status, step.started = STARTED, event.timestamp
        elif event.status == WAITING:
            if step.status == "":
                step.status = WAITING
        else:
            step.status = event.status
            self._print_end(step, event.timestamp, event.error)
        self._dirty = True

    def _log(self, step: _Step, event: ProgressEvent) -> bool:
        """Keep the lines of a log chunk; True if the line shown changed."""
        text = step.partial.pop(event.stream, "") + event.data.decode("utf-8", "replace")
        *lines, rest = text.replace("\r\n", "\n").split("\n")
        before = step.last
        for line in lines:
            shown = one_line(_last_segment(line))
            if shown:
                step.logs.append(shown)
                step.last = shown
        if rest:
            step.partial[event.stream] = rest[-PARTIAL_LIMIT:]
            step.last = one_line(_last_segment(rest)) or step.last
        return step.last != before

    def _print_end(self, step: _Step, timestamp: float, error: str | None) -> None:
        line = self._head(step)
        took = "" if step.started is None else f" {max(0.0, timestamp - step.started):.1f}s"
        if step.status == COMPLETED:
            line.append("DONE", self._style(COMPLETED)).append(took)
        elif step.status == CACHED:
            line.append("CACHED", self._style(CACHED)).append(took)
        elif step.status == ERROR:
            line.append("ERROR", self._style(ERROR)).append(took)
            line.append(f" {one_line(error or 'failed')}")
        else:
            line.append(step.status.upper()).append(took)
        lines = [line]
        if step.status == ERROR:
            # What the step wrote last: a failed step's own explanation.
            for rest in step.partial.values():
                shown = one_line(_last_segment(rest))
                if shown:
                    step.logs.append(shown)
            lines += [Text(f"    | {text}", self._style("log")) for text in step.logs]
        step.partial.clear()
        step.logs.clear()
        step.last = ""
        self._print(lines)

    def _print(self, lines: list[Text]) -> None:
        # One print, so that rich redraws the live lines below it once; soft
        # wrap: a finished line is never cut, the terminal wraps it.
        self.console.print(Text("\n").join(lines), soft_wrap=True)

    def running_lines(self, width: int) -> list[Text]:
        """The live lines at the clock's time: per running step ``#N [name]
        1.2s``, the name shortened so that the timer stays visible, and the last
        line it wrote (``    | text``) under it; none wraps at ``width``."""
        now = self._clock()
        lines: list[Text] = []
        waiting: list[Text] = []
        for step in self._steps.values():
            if step.status == WAITING:
                waiting.append(Text.assemble(
                    (f"#{step.number}", self._style("number")),
                    f" [{one_line(step.name)}] ",
                    ("waiting", self._style(WAITING)),
                ))
                continue
            if step.status != STARTED:
                continue
            timer = "" if step.started is None else f"{max(0.0, now - step.started):.1f}s"
            name = Text(one_line(step.name))
            room = width - len(f"#{step.number} [] {timer}")
            if room >= 8 and name.cell_len > room:
                name.truncate(room, overflow="ellipsis")
            line = Text.assemble(
                (f"#{step.number}", self._style("number")),
                " [",
                name,
                "] ",
                (timer, self._style("timer")),
            )
            lines.append(line)
            if step.last:
                lines.append(Text(f"    | {step.last}", self._style("log")))
        lines += waiting  # below the running ones: they start as slots free up
        for line in lines:
            line.truncate(width, overflow="ellipsis")
            line.no_wrap = True
        return lines

    def tick(self, force: bool = False) -> None:
        """Redraw the live lines if a step is running (its timer moves) or
        something changed, at most every ``REDRAW_INTERVAL`` unless ``force``."""
        if self._closed:
            return
        now = self._clock()
        if not force and self._last_draw is not None and now - self._last_draw < REDRAW_INTERVAL:
            return
        running = any(s.status == STARTED for s in self._steps.values())
        if not (force or self._dirty or running):
            return
        if not self._live.is_started:
            self._live.start()
        self._live.refresh()
        self._last_draw = now
        self._dirty = False

    def summary(self) -> list[Text]:
        """The closing lines: counts and total time, then the output's place."""
        counts = {status: 0 for status in (COMPLETED, CACHED, ERROR, CANCELED)}
        for step in self._steps.values():
            if step.status in counts:
                counts[step.status] += 1
        total = max(0.0, self._clock() - self._start)
        parts = [
            f"{_plural(counts[COMPLETED], 'step')} run",
            f"{counts[CACHED]} cached",
            f"{counts[ERROR]} failed",
        ]
        if counts[CANCELED]:
            parts.append(f"{counts[CANCELED]} canceled")
        failed = counts[ERROR] > 0
        head = f"Failed after {total:.1f}s" if failed else f"Finished in {total:.1f}s"
        lines = [
            Text(
                f"{head}: {', '.join(parts)}",
                self._style("summary-failed" if failed else "summary"),
            )
        ]
        if self.output is not None and not failed:
            lines.append(Text.assemble("Output: ", (self.output, self._style("output"))))
        return lines

    def close(self) -> None:
        """Mark steps still running as canceled (the job ended under them), take
        the live lines away and print the summary. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            now = self._clock()
            for step in self._steps.values():
                if step.status in (STARTED, WAITING):
                    step.status = CANCELED
                    line = self._head(step).append("CANCELED", self._style(CANCELED))
                    if step.started is not None:
                        line.append(f" {max(0.0, now - step.started):.1f}s")
                    self._print([line])
        finally:
            # Whatever happened, give the terminal its cursor back.
            if self._live.is_started:
                self._live.stop()
        self._print(self.summary())
        self.console.file.flush()


def make_renderer(
    mode: str,
    out: TextIO,
    *,
    output: str | None = None,
    reasons: Callable[[str], str | None] | None = None,
) -> Renderer:
    """The renderer for ``mode`` (``auto``, ``tty``, ``plain`` or ``json``);
    ``auto`` is ``tty`` when ``out`` is a terminal (and ``TERM`` is not ``dumb``),
    else ``plain``. ``output`` (see :func:`describe_output`) is named in the tty
    summary; ``plain`` and ``json`` keep their formats and ignore it. ``reasons``
    (vertex digest -> why it missed the cache, or ``None``) go into ``json``'s
    ``started`` events; the other modes ignore them."""
    if mode == "auto":
        is_tty = out.isatty() and os.environ.get("TERM", "") != "dumb"
        mode = "tty" if is_tty else "plain"
    if mode == "tty":
        return TtyRenderer(out, output=output)
    if mode == "plain":
        return PlainRenderer(out)
    if mode == "json":
        return JsonRenderer(out, reasons)
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
