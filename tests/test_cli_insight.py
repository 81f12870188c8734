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


def test_the_gate_lists_why_each_op_ran_with_explain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = str(tmp_path / "cache")
    base = ["build", "--cache-dir", cache, "--progress", "plain"]
    assert solver_cli(capsys, *base, str(build_file(tmp_path)))[0] == 0
    status, _, err = solver_cli(
        capsys, *base, str(build_file(tmp_path, "wasp")), "--expect-cached", "--explain"
    )
    assert status == 1
    ran = [line for line in err.splitlines() if line.startswith("ran: ")]
    assert len(ran) == 1
    assert ran[0].startswith("ran: make b (sha256:")
    assert ran[0].endswith(
        "): definition changed: payload.args[2]: "
        "'echo made b; printf bee > b.txt' -> 'echo made b; printf wasp > b.txt'"
    )


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
    assert "argument --max-executed: expected a number >= 0, not '-1'" in err


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


FAILING = """\
from solver.worker import State, run
src = State.inline({"a.txt": "hello\\n"}).with_name("sources")
definition = run(["sh", "-c", "echo about to fail; echo oops >&2; exit 3"], root=src,
                 name="fails")
"""


def test_history_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(tmp_path / "cache")
    f = str(build_file(tmp_path))
    assert solver_cli(capsys, "build", f, "--cache-dir", cache, "--progress", "plain")[0] == 0
    assert solver_cli(capsys, "build", f, "--cache-dir", cache, "--progress", "plain")[0] == 0
    bad = tmp_path / "bad.py"
    bad.write_text(FAILING)
    status, _, _ = solver_cli(capsys, "build", str(bad), "--cache-dir", cache)
    assert status == 1

    status, out, _ = solver_cli(capsys, "history", "ls", "--cache-dir", cache, "--format", "json")
    assert status == 0
    entries = json.loads(out)  # one record per build, newest first
    assert [(e["ops"], e["executed"], e["cached"], e["failed"]) for e in entries] == [
        (2, 0, 1, 1), (2, 0, 2, 0), (2, 2, 0, 0),
    ]
    failed_id, warm_id, cold_id = (e["id"] for e in entries)
    status, out, _ = solver_cli(capsys, "history", "ls", "--cache-dir", cache)
    assert out.splitlines()[0].split() == [
        "ID", "STARTED", "TIME", "OPS", "RUN", "CACHED", "FAILED", "BUILD"
    ]
    assert [line.split()[0] for line in out.splitlines()[1:]] == [failed_id, warm_id, cold_id]

    status, out, _ = solver_cli(capsys, "history", "show", failed_id[:6], "--cache-dir", cache)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"Build {failed_id} of sha256:")
    assert "Summary: 2 ops: 0 run, 1 cached, 1 failed" in lines
    fails = next(i for i, line in enumerate(lines) if "  fails: failed" in line)
    assert "exit" in lines[fails + 1]
    assert lines[fails + 1].startswith("    error: ")
    assert lines[fails + 2 :] == ["    | about to fail", "    | oops"]

    status, out, _ = solver_cli(capsys, "history", "show", cold_id, "--format", "json",
                                "--cache-dir", cache)
    doc = json.loads(out)
    durations = {op["name"]: op["duration"] for op in doc["ops"]}
    assert [op["state"] for op in doc["ops"]] == ["executed", "executed"]

    trace_file = tmp_path / "trace.json"
    status, _, _ = solver_cli(capsys, "history", "trace", cold_id, "--format", "chrome",
                              "-o", str(trace_file), "--cache-dir", cache)
    assert status == 0
    slices = [e for e in json.loads(trace_file.read_text())["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in slices) == ["make b", "sources"]
    for e in slices:  # the trace agrees with the record
        assert e["dur"] == pytest.approx(durations[e["name"]] * 1e6, abs=1)

    status, out, _ = solver_cli(capsys, "history", "compare", warm_id, cold_id,
                                "--cache-dir", cache)
    assert status == 0
    lines = out.splitlines()
    assert lines[1] == "Ran in B, cached in A: 2"
    assert [line.split(" (")[0] for line in lines[2:4]] == ["  sources", "  make b"]

    status, out, err = solver_cli(capsys, "history", "show", "nope", "--cache-dir", cache)
    assert status == 1
    assert err.startswith("solver: error: no build 'nope' in the history")

    status, out, _ = solver_cli(capsys, "history", "prune", "--keep-records", "1",
                                "--cache-dir", cache)
    assert status == 0
    assert out.splitlines() == [
        f"deleted {cold_id}", f"deleted {warm_id}", "Total: deleted 2 record(s); 1 left"
    ]
    status, out, _ = solver_cli(capsys, "history", "prune", "--all", "--cache-dir", cache)
    assert out.splitlines() == [f"deleted {failed_id}", "Total: deleted 1 record(s); 0 left"]


def test_frontend_builds_have_a_summary_a_record_and_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    example = tmp_path / "example"
    shutil.copytree(Path(__file__).resolve().parent.parent / "examples" / "buildfile", example)
    cache = str(tmp_path / "cache")
    args = ["build", "--frontend", "buildfile", "--opt", "platforms=linux/amd64",
            str(example), "--progress", "json", "--cache-dir", cache, "--expect-cached"]
    status, _, err = solver_cli(capsys, *args)
    assert status == 1  # cold: ops ran
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    summary = events[-1]["summary"]
    executed = {e["vertex"] for e in events if e.get("status") == "completed"}
    assert summary["executed"] == len(executed) > 0
    assert summary["build"] == "frontend:buildfile"
    ran = [line for line in err.splitlines() if line.startswith("ran: ")]
    assert len(ran) == len(executed)
    assert err.splitlines()[-1] == (
        f"solver: error: --expect-cached: {len(executed)} ops ran (listed above)"
    )
    status, _, err = solver_cli(capsys, *args)
    assert status == 0, err
    summary = json.loads(err.splitlines()[-1])["summary"]
    assert summary["executed"] == 0
    status, out, _ = solver_cli(capsys, "history", "ls", "--cache-dir", cache, "--format", "json")
    assert [(e["build"], e["executed"]) for e in json.loads(out)] == [
        ("frontend:buildfile", 0), ("frontend:buildfile", len(executed)),
    ]
