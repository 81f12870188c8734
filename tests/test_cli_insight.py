"""The command line's build insight: the summary at the end of ``solver build``,
the CI gate (``--expect-cached``, ``--max-executed``) and ``solver history``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solver.cli import main

BUILD = """\
from solver.worker import State, run
src = State.inline({"a.txt": "hello\\n"}).with_name("sources")
definition = run(["sh", "-c", "echo made b; printf TEXT > b.txt"], root=src, name="make b")
"""


def build_file(tmp_path: Path, text: str = "bee") -> Path:
    path = tmp_path / f"build_{text}.py"
    path.write_text(BUILD.replace("TEXT", text))
    return path


def solver_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_expect_cached_fails_cold_and_passes_warm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f, cache = str(build_file(tmp_path)), str(tmp_path / "cache")
    status, _, err = solver_cli(
        capsys, "build", f, "--cache-dir", cache, "--progress", "plain", "--expect-cached"
    )
    assert status == 1
    lines = err.splitlines()
    ran = [line for line in lines if line.startswith("ran: ")]
    assert [r.split(" (")[0] for r in ran] == ["ran: sources", "ran: make b"]
    assert lines[-1] == "solver: error: --expect-cached: 2 ops ran (listed above)"
    assert "Summary: 2 ops: 2 run, 0 cached, 0 failed" in lines
    # the build itself succeeded and was cached: the same build now passes
    status, _, err = solver_cli(
        capsys, "build", f, "--cache-dir", cache, "--progress", "plain", "--expect-cached"
    )
    assert status == 0, err
    assert "Summary: 2 ops: 0 run, 2 cached, 0 failed" in err.splitlines()
    assert "Cache hits: 1 local, 1 unneeded" in err.splitlines()
    assert "ran: " not in err


def test_max_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(tmp_path / "cache")
    status, _, err = solver_cli(
        capsys, "build", str(build_file(tmp_path)), "--cache-dir", cache, "--max-executed", "2",
        "--progress", "plain",
    )
    assert status == 0, err
    # a changed step: one op runs again (its input comes from the cache)
    changed = str(build_file(tmp_path, "buzz"))
    status, _, err = solver_cli(
        capsys, "build", changed, "--cache-dir", cache, "--max-executed", "0",
        "--progress", "plain",
    )
    assert status == 1
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("ran: ")] == [
        "ran: make b"
    ]
    assert err.splitlines()[-1] == "solver: error: --max-executed 0: 1 op ran (listed above)"
    status, _, err = solver_cli(capsys, "build", changed, "--cache-dir", cache,
                                "--max-executed", "-1")
    assert status == 2
    assert "--max-executed takes a number >= 0, not '-1'" in err


def test_json_progress_ends_with_one_summary_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f, cache = str(build_file(tmp_path)), str(tmp_path / "cache")
    for expected in ((2, 0), (0, 2)):
        status, _, err = solver_cli(capsys, "build", f, "--cache-dir", cache, "--progress", "json")
        assert status == 0, err
        events = [json.loads(line) for line in err.splitlines()]
        assert [e["status"] for e in events].count("summary") == 1
        summary = events[-1]["summary"]
        assert (summary["executed"], summary["cached"], summary["failed"]) == (*expected, 0)
        executed = {e["vertex"] for e in events if e["status"] == "completed"}
        assert len(executed) == expected[0]
        assert {r["vertex"] for r in summary["ran"]} == executed
    assert summary["cache_hits"] == {"local": 1, "unneeded": 1}
    cached = [e for e in events if e.get("cache_source")]
    assert [(e["name"], e["cache_source"]) for e in cached] == [("make b", "local")]
