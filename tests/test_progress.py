"""Issue 18, first contact: the ``tty`` progress renderer (rich) and the default
cache directory (platformdirs).

Deterministic: events carry chosen timestamps and the renderer reads an injected
clock; a terminal is a ``Console(file=StringIO(), force_terminal=True,
width=...)`` whose output :func:`screen` replays to what a terminal would show.
The ``plain`` and ``json`` formats are pinned in ``tests/test_cli.py``.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import platformdirs
import pytest
from rich.console import Console

from solver import ProgressEvent, Solver
from solver.cli._main import build_definition
from solver.cli._progress import (
    REDRAW_INTERVAL,
    JsonRenderer,
    PlainRenderer,
    TtyRenderer,
    describe_output,
    make_console,
    make_renderer,
    run_progress,
)
from solver.worker import State, Worker, default_root

SGR = re.compile(r"\x1b\[[0-9;]*m")  # a style (colour, bold, dim) code
TOKEN = re.compile(r"\x1b\[\??[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]+")


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: styles dropped, the cursor movements
    rich uses to redraw its live lines applied (any other control fails)."""
    lines = [""]
    row = col = 0
    for token in TOKEN.findall(raw):
        if token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b["):
            arg, final = token[2:-1], token[-1]
            if final == "m" or arg == "?25":
                continue  # a style, or hiding/showing the cursor
            if final == "K" and arg == "2":
                lines[row] = ""
            elif final == "A":
                row = max(0, row - int(arg or 1))
            else:
                raise AssertionError(f"unexpected control sequence {token!r}")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    while lines and not lines[-1]:
        lines.pop()
    return lines


class Clock:
    """A settable clock for the renderer's timers."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ev(vertex: str, name: str, status: str, t: float, **kw: object) -> ProgressEvent:
    return ProgressEvent(vertex, name, status, t, **kw)  # type: ignore[arg-type]


@pytest.fixture
def terminal_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment in which rich sees a capable terminal and no colour opinion."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLORTERM"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def terminal(width: int = 100) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=width), out


def run_build(renderer: TtyRenderer, clock: Clock, out: io.StringIO) -> list[list[str]]:
    """Two steps run (one fails after writing output), one comes from the cache;
    the screens seen while running, then the final one."""
    seen = []
    renderer.handle(ev("a", "sources", "started", 100.0))
    renderer.handle(ev("b", "compile", "started", 100.0))
    renderer.handle(ev("b", "compile", "log", 100.2, data=b"cc -c main.c\nwarn", stream=2))
    clock.now = 101.0
    renderer.tick(force=True)
    seen.append(screen(out.getvalue()))
    renderer.handle(ev("a", "sources", "completed", 101.3))
    renderer.handle(ev("c", "base", "cached", 101.3))
    clock.now = 102.0
    renderer.tick()
    seen.append(screen(out.getvalue()))
    renderer.handle(ev("b", "compile", "log", 102.1, data=b"ing: x\n", stream=2))
    renderer.handle(ev("b", "compile", "error", 102.5, error="exit status 1"))
    clock.now = 103.0
    renderer.close()
    seen.append(screen(out.getvalue()))
    return seen


EXPECTED_SCREENS = [
    ["#1 [sources] 1.0s", "#2 [compile] 1.0s", "    | warn"],
    ["#1 [sources] DONE 1.3s", "#3 [base] CACHED", "#2 [compile] 2.0s", "    | warn"],
    [
        "#1 [sources] DONE 1.3s",
        "#3 [base] CACHED",
        "#2 [compile] ERROR 2.5s exit status 1",
        "    | cc -c main.c",
        "    | warning: x",
        "Failed after 3.0s: 1 step run, 1 cached, 1 failed",
    ],
]


def test_tty_on_a_terminal_in_colour(terminal_env: pytest.MonkeyPatch) -> None:
    console, out = terminal()
    clock = Clock(100.0)
    assert run_build(TtyRenderer(console=console, clock=clock), clock, out) == EXPECTED_SCREENS
    raw = out.getvalue()
    assert "\x1b[32mDONE\x1b[0m" in raw  # green
    assert "\x1b[1;31mERROR\x1b[0m" in raw  # bold red
    assert "\x1b[1A" in raw  # the live lines are redrawn in place


@pytest.mark.parametrize("value", ["1", ""])
def test_tty_without_colour_when_no_color_is_set(
    terminal_env: pytest.MonkeyPatch, value: str
) -> None:
    # Any value counts, even an empty one (rich itself ignores an empty NO_COLOR).
    terminal_env.setenv("NO_COLOR", value)
    console, out = terminal()
    clock = Clock(100.0)
    assert run_build(TtyRenderer(console=console, clock=clock), clock, out) == EXPECTED_SCREENS
    raw = out.getvalue()
    assert not SGR.search(raw)  # no colour, nor bold or dim
    # What is left is the cursor movement that redraws the live lines.
    assert set(re.findall(r"\x1b\[\??[0-9;]*[A-Za-z]", raw)) <= {
        "\x1b[?25l",
        "\x1b[?25h",
        "\x1b[2K",
        "\x1b[1A",
    }
    # make_console sees it too
    assert make_console(io.StringIO()).no_color


def test_tty_on_a_stream_that_is_not_a_terminal(terminal_env: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    clock = Clock(100.0)
    renderer = TtyRenderer(out, clock=clock)  # the console make_console builds
    run_build(renderer, clock, out)
    # No escape codes at all and no live lines: what ended, and the summary.
    assert out.getvalue() == "\n".join([*EXPECTED_SCREENS[-1], ""])


def test_live_lines_fit_the_width_and_show_the_last_line_written(
    terminal_env: pytest.MonkeyPatch,
) -> None:
    console, out = terminal(width=40)
    clock = Clock(10.0)
    r = TtyRenderer(console=console, clock=clock)
    r.handle(ev("v", "compile a very long vertex name indeed", "started", 10.0))
    r.handle(ev("w", "x" * 60, "started", 10.0))
    clock.now = 12.25
    # a progress bar redraws its line: what follows the last carriage return shows
    r.handle(ev("v", "", "log", 11.0, data=b"first\n\n   \n10%\r20%\r", stream=1))
    r.tick(force=True)
    assert screen(out.getvalue()) == [
        "#1 [compile a very long vertex na…] 2.2s",
        "    | 20%",
        "#2 [" + "x" * 29 + "…] 2.2s",
    ]
    # a long log line is cut at the width; the next chunk ends the partial line
    r.handle(ev("v", "", "log", 12.0, data=b"30%\n" + b"y" * 80, stream=1))
    r.tick(force=True)
    assert screen(out.getvalue())[1] == "    | " + "y" * 33 + "…"
    r.handle(ev("v", "", "error", 12.5, error="boom"))
    clock.now = 13.0
    r.close()
    shown = screen(out.getvalue())
    # blank lines are skipped; the failed step's last lines are printed in full
    assert shown[0] == "#1 [compile a very long vertex name indeed] ERROR 2.5s boom"
    assert shown[1:4] == ["    | first", "    | 30%", "    | " + "y" * 80]
    # a step still running when the stream ends was cancelled under it
    assert shown[4] == f"#2 [{'x' * 60}] CANCELED 3.0s"
    assert shown[5] == "Failed after 3.0s: 0 steps run, 0 cached, 1 failed, 1 canceled"


def test_tick_redraws_at_most_every_interval(terminal_env: pytest.MonkeyPatch) -> None:
    console, out = terminal()
    clock = Clock(0.0)
    r = TtyRenderer(console=console, clock=clock)
    r.handle(ev("v", "step", "started", 0.0))
    r.tick()
    drawn = len(out.getvalue())
    assert drawn
    clock.now = REDRAW_INTERVAL / 2
    r.tick()
    assert len(out.getvalue()) == drawn  # too soon
    clock.now = REDRAW_INTERVAL * 1.5
    r.tick()
    assert len(out.getvalue()) > drawn  # the running timer moved
    r.handle(ev("v", "step", "completed", 1.0))
    clock.now = 1.0
    r.tick()
    drawn = len(out.getvalue())
    clock.now = 2.0
    r.tick()
    assert len(out.getvalue()) == drawn  # nothing runs, nothing changed
    r.close()
    r.close()  # idempotent
    r.handle(ev("v", "step", "started", 3.0))  # ignored once closed
    r.tick(force=True)
    assert screen(out.getvalue()) == [
        "#1 [step] DONE 1.0s",
        "Finished in 2.0s: 1 step run, 0 cached, 0 failed",
    ]


def test_summary_names_the_output_unless_a_step_failed() -> None:
    out = io.StringIO()
    clock = Clock(5.0)
    r = TtyRenderer(out, clock=clock, output=describe_output("tar", "app.tar"))
    for step in ("a", "b"):
        r.handle(ev(step, step, "started", 5.0))
        r.handle(ev(step, step, "completed", 6.0))
    r.handle(ev("c", "c", "started", 6.0))
    r.handle(ev("c", "c", "cached", 6.5))  # a step loaded from the cache shows how long
    clock.now = 7.0
    r.close()
    assert out.getvalue().splitlines() == [
        "#1 [a] DONE 1.0s",
        "#2 [b] DONE 1.0s",
        "#3 [c] CACHED 0.5s",
        "Finished in 2.0s: 2 steps run, 1 cached, 0 failed",
        "Output: app.tar (tar)",
    ]
    out = io.StringIO()
    r = TtyRenderer(out, clock=clock, output="out")
    r.handle(ev("a", "a", "error", 7.0))  # no message, no start
    r.close()
    assert out.getvalue().splitlines() == [
        "#1 [a] ERROR failed",
        "Failed after 0.0s: 0 steps run, 0 cached, 1 failed",
    ]


def test_describe_output() -> None:
    assert describe_output("local", "out") == "out"
    assert describe_output("tar", "app.tar") == "app.tar (tar)"
    assert describe_output("tar", "-") == "stdout (tar)"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_renderer_keeps_its_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    tty = make_renderer("auto", FakeTerminal())
    assert isinstance(tty, TtyRenderer)
    assert tty.output is None
    named = make_renderer("tty", io.StringIO(), output="out")
    assert isinstance(named, TtyRenderer)
    assert named.output == "out"
    assert isinstance(make_renderer("auto", io.StringIO()), PlainRenderer)
    assert isinstance(make_renderer("plain", FakeTerminal(), output="out"), PlainRenderer)
    assert isinstance(make_renderer("json", FakeTerminal()), JsonRenderer)
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(make_renderer("auto", FakeTerminal()), PlainRenderer)
    with pytest.raises(ValueError, match="unknown progress mode"):
        make_renderer("fancy", io.StringIO())


@pytest.mark.anyio
async def test_run_progress_feeds_and_closes_the_tty_renderer(
    anyio_backend: str, terminal_env: pytest.MonkeyPatch
) -> None:
    console, out = terminal()
    clock = Clock(1.0)

    async def events() -> AsyncIterator[ProgressEvent]:
        yield ev("v", "step", "started", 1.0)
        yield ev("v", "step", "log", 1.1, data=b"hi\n", stream=1)
        clock.now = 1.5
        yield ev("v", "step", "completed", 1.5)

    await run_progress(events(), TtyRenderer(console=console, clock=clock, output="out"))
    assert screen(out.getvalue()) == [
        "#1 [step] DONE 0.5s",
        "Finished in 0.5s: 1 step run, 0 cached, 0 failed",
        "Output: out",
    ]


@pytest.mark.anyio
async def test_build_definition_with_tty_progress(
    anyio_backend: str, tmp_path: Path, terminal_env: pytest.MonkeyPatch
) -> None:
    # The CLI's call, unchanged: make_renderer("tty", stream) and run_progress.
    out = io.StringIO()
    defn = State.inline({"a.txt": "a"}).with_name("sources").definition()
    async with Worker(tmp_path / "snapshots") as worker, Solver(worker=worker) as s:
        await build_definition(s, defn, progress="tty", progress_out=out)
        await build_definition(s, defn, progress="tty", progress_out=out)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # not a terminal
    assert re.fullmatch(r"#1 \[sources\] DONE \d+\.\ds", lines[0])
    assert re.fullmatch(r"Finished in \d+\.\ds: 1 step run, 0 cached, 0 failed", lines[1])
    # then the build summary's figures (the counts are the line above)
    assert lines[2] == "Cache hits: none"
    assert re.fullmatch(r"Time: \d+\.\d{3}s wall, .*", lines[3])
    assert re.fullmatch(r"Critical path \(\d+\.\d{3}s\): sources \(\d+\.\d{3}s\)", lines[4])
    assert lines[5] == "#1 [sources] CACHED"
    assert re.fullmatch(r"Finished in \d+\.\ds: 0 steps run, 1 cached, 0 failed", lines[6])
    assert lines[7] == "Cache hits: 1 local"


# -- the default cache directory -------------------------------------------------------


def test_default_root_is_the_platform_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SOLVER_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    expected = Path(platformdirs.user_cache_dir("solver-engine")) / "snapshots"
    assert default_root() == expected
    assert expected.is_relative_to(tmp_path / "home")  # read from the environment now
    monkeypatch.setenv("SOLVER_CACHE_DIR", "")  # empty: not set
    assert default_root() == expected
    monkeypatch.setenv("SOLVER_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_root() == tmp_path / "explicit" / "snapshots"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "explicit" / "snapshots"  # SOLVER_CACHE_DIR wins


@pytest.mark.skipif(sys.platform != "linux", reason="the XDG layout is Linux's")
def test_default_root_honours_xdg_cache_home_on_linux(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SOLVER_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home_cache = tmp_path / "home" / ".cache" / "solver-engine" / "snapshots"
    assert default_root() == home_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "solver-engine" / "snapshots"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")  # as the XDG spec says
    assert default_root() == home_cache
    # even with a platformdirs release that returns the relative path as it is
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: f"relative/{app}")
    assert default_root() == home_cache
