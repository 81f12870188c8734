"""``check_determinism`` and ``solver build --check``'s report: every op is rebuilt
from scratch in a temporary store and its output compared with the build's.

Steps that must behave differently on their second run (to make each kind of
difference happen on purpose, deterministically) count their runs in a host file,
so they run with ``sandbox="none"``; the others run in the default sandbox.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from solver import SolveError
from solver.bridge import CheckReport, OpCheck, Solver, check_determinism, tree_digest
from solver.cli._check import format_report, run_check
from solver.definition import node
from solver.insight import BuildHistory
from solver.testing import HandleTracker
from solver.worker import SandboxMode, SnapshotView, State, Worker, merge, run

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def solving(tmp_path: Path, sandbox: SandboxMode = "bwrap") -> AsyncIterator[Solver]:
    """A solver over a worker (with its persistent cache) in ``tmp_path``/store, as
    ``solver build`` makes."""
    async with (
        Worker(tmp_path / "store", sandbox=sandbox) as worker,
        Solver(worker=worker) as solver,
    ):
        yield solver


def readme_example() -> State:
    """The README's first example: inline words, ``sort -u``, ``wc -l``."""
    words = State.inline({"words.txt": "pear\nfig\napple\nfig\n"})
    unique = run(
        ["/bin/sh", "-c", "/usr/bin/sort -u in/words.txt > sorted.txt"],
        mounts={"in": words},
        readonly=["in"],
        name="sort",
    )
    return run(
        ["/bin/sh", "-c", "/usr/bin/wc -l < sorted.txt > count.txt"], root=unique, name="count"
    )


def sh(script: str, *, root: State | None = None, name: str = "") -> State:
    return run(["/bin/sh", "-c", "PATH=/usr/bin:/bin; " + script], root=root, name=name)


def second_run_differs(counter: Path, first: str, later: str, name: str = "flaky") -> State:
    """A step that runs ``first`` on its first run and ``later`` on every other one
    (it counts its runs in the host file ``counter``: ``sandbox="none"`` only)."""
    counter.touch()
    script = (
        f'n=$(wc -l < "{counter}"); echo run >> "{counter}"; '
        f'if [ "$n" -eq 0 ]; then {first}; else {later}; fi'
    )
    return sh(script, name=name)


def statuses(report: CheckReport) -> list[tuple[str, str]]:
    return [(c.label, c.status) for c in report.outputs]


def snapshot_ids(store: Path) -> set[str]:
    return {p.name for p in (store / "snapshots").iterdir()}


# -- the done-when cases ---------------------------------------------------------------


async def test_an_op_that_writes_a_timestamp_is_caught(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    stamped = sh("date +%s%N > t.txt; echo fixed > same.txt", root=readme_example(), name="stamp")
    async with solving(tmp_path) as solver:
        report = await check_determinism(solver, stamped.definition())
        out = io.StringIO()
        status = await run_check(solver, stamped.definition(), out)
    assert statuses(report) == [
        ("source.inline", "same"),
        ("sort", "same"),
        ("count", "same"),
        ("stamp", "differs"),
    ]
    assert not report.ok
    (stamp,) = report.problems
    assert stamp.difference is not None
    assert (stamp.difference.path, stamp.difference.reason) == ("t.txt", "content")
    assert "in the cached output" in stamp.difference.detail
    assert stamp.cached != stamp.rebuilt
    assert status == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "check: rebuilding every op in a scratch store"
    assert lines[1].startswith("stamp: differs at t.txt (content): from byte ")
    assert lines[2:] == ["check: 1 of 4 op outputs differs, 3 are the same"]


async def test_the_readme_example_passes(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    defn = readme_example().definition()
    async with solving(tmp_path) as solver:
        report = await check_determinism(solver, defn)
        out = io.StringIO()
        status = await run_check(solver, defn, out)
        async with await solver.solve(defn) as result:
            assert result.ref is not None
            assert isinstance(result.ref.sys, SnapshotView)
            built = await tree_digest(result.ref.sys)
    assert statuses(report) == [("source.inline", "same"), ("sort", "same"), ("count", "same")]
    assert report.ok
    assert report.problems == ()
    assert report.outputs[-1].cached == report.outputs[-1].rebuilt == built
    assert status == 0
    assert out.getvalue().splitlines()[1:] == ["check: all 3 op outputs are the same"]


async def test_a_deterministic_two_step_build_passes(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    # files, a directory, modes and a symlink: everything the digest covers
    first = sh(
        "mkdir -p out/sub; printf 'a\\n' > out/a.txt; printf 'b' > out/sub/b.bin; "
        "chmod 755 out/a.txt; ln -s a.txt out/link",
        name="write",
    )
    second = sh("cat out/a.txt out/sub/b.bin > out/both; rm out/sub/b.bin", root=first, name="join")
    async with solving(tmp_path) as solver:
        report = await check_determinism(solver, second.definition())
    assert statuses(report) == [("write", "same"), ("join", "same")]
    assert report.ok


async def test_a_check_adds_no_build_of_one_op_to_the_history(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """The check's rebuilds of one op each are not builds: a solver with a build
    history records the builds of the whole definition (the user's, then the
    check's own, cached) and none of the check's solves of one op."""
    first = sh("mkdir -p out; printf 'a\\n' > out/a.txt", name="write")
    second = sh("cat out/a.txt > out/b.txt", root=first, name="join")
    history = BuildHistory(tmp_path / "history")
    async with (
        Worker(tmp_path / "store") as worker,
        Solver(worker=worker, history=history) as solver,
    ):
        async with await solver.solve(second.definition()):
            pass
        [built] = history.entries()
        report = await check_determinism(solver, second.definition())
        assert report.ok
        entries = history.entries()
    assert len(entries) == 2
    assert {e.build for e in entries} == {built.build}
    assert sorted(e.executed for e in entries) == [0, 2]  # the build, then the cached one


# -- the store and the handles ---------------------------------------------------------


async def test_a_warm_store_gains_nothing_and_the_scratch_area_is_removed(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    defn = readme_example().definition()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    async with solving(tmp_path) as solver:
        async with await solver.solve(defn):
            pass
        before = snapshot_ids(tmp_path / "store")
        report = await check_determinism(solver, defn, scratch_dir=scratch)
        assert report.ok
        assert snapshot_ids(tmp_path / "store") == before
        assert list(scratch.iterdir()) == []


async def test_a_cold_check_leaves_what_a_normal_build_leaves(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    defn = readme_example().definition()
    async with solving(tmp_path / "checked") as solver:
        assert (await check_determinism(solver, defn)).ok
    async with solving(tmp_path / "built") as solver, await solver.solve(defn):
        pass
    built = snapshot_ids(tmp_path / "built" / "store")
    assert len(snapshot_ids(tmp_path / "checked" / "store")) == len(built) == 3


async def test_each_op_runs_once_on_each_side(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    counter = tmp_path / "runs"
    counter.touch()
    base = sh(f'echo run >> "{counter}"; echo x > f', name="base")
    left = sh("cp f left", root=base, name="left")
    right = sh("cp f right", root=base, name="right")
    both = merge([left, right], name="both")
    async with solving(tmp_path, sandbox="none") as solver:
        report = await check_determinism(solver, both.definition())
    assert report.ok
    assert [c.label for c in report.outputs] == ["base", "left", "right", "both"]
    # once for the build, once for the rebuild, though three ops read it
    assert counter.read_text() == "run\nrun\n"


# -- what differs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "later", "path", "reason", "detail"),
    [
        ("echo one > f", "echo two > f", "f", "content", "from byte 0: b'one\\n' in the cached"),
        (
            "echo x > f; chmod 644 f",
            "echo x > f; chmod 755 f",
            "f",
            "mode",
            "mode 0444 in the cached output, 0555 in the rebuild",
        ),
        ("echo x > f; echo y > g", "echo x > f", "g", "missing", "in the cached output, not in"),
        ("echo x > f", "echo x > f; echo y > g", "g", "missing", "in the rebuild, not in"),
        ("mkdir f", "echo x > f", "f", "type", "a directory in the cached output, a file in"),
        ("ln -s a f", "ln -s b f", "f", "link target", "-> 'a' in the cached output, -> 'b'"),
        (
            "mkdir d; echo 1 > d/z; echo 1 > e",
            "mkdir d; echo 2 > d/z; echo 2 > e",
            "d/z",
            "content",
            "from byte 0",
        ),
    ],
    ids=["content", "mode", "missing-in-rebuild", "missing-in-cached", "type", "link", "first"],
)
async def test_the_first_difference_is_named(
    tmp_path: Path,
    handle_tracker: HandleTracker,
    first: str,
    later: str,
    path: str,
    reason: str,
    detail: str,
) -> None:
    flaky = second_run_differs(tmp_path / "runs", first, later)
    async with solving(tmp_path, sandbox="none") as solver:
        report = await check_determinism(solver, flaky.definition())
    (check,) = report.outputs
    assert check.status == "differs"
    assert check.difference is not None
    assert (check.difference.path, check.difference.reason) == (path, reason)
    assert detail in check.difference.detail


async def test_a_failed_rebuild_is_reported_and_its_consumers_not_compared(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    flaky = second_run_differs(tmp_path / "runs", "echo ok > f", "exit 3")
    after = sh("cat f > g", root=flaky, name="after")
    async with solving(tmp_path, sandbox="none") as solver:
        out = io.StringIO()
        status = await run_check(solver, after.definition(), out)
    assert status == 1
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("flaky: the rebuild failed: ")
    assert "exit" in lines[1]
    assert lines[2:] == [
        "after: not compared: its input flaky failed to rebuild",
        "check: 1 failed to rebuild, 0 are the same, 1 not compared",
    ]


async def test_an_op_of_a_kind_the_rebuild_lacks_is_not_compared(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    async with Worker(tmp_path / "store") as worker, Solver(worker=worker) as solver:
        inline = worker.op_kinds.get("source.inline")
        assert inline is not None
        worker.op_kinds.register(
            "app.inline", inline.factory, outputs=inline.outputs, validate=inline.validate
        )
        app = State.from_node(node("app.inline", {"files": [{"path": "a", "data": "x"}]}))
        other = State.inline({"b": "y"})
        both = merge([app, sh("cp a c", root=app, name="copy"), other], name="both")
        report = await check_determinism(solver, both.definition())
    by_label = {c.label: c for c in report.outputs}
    assert by_label["app.inline"].status == "not compared"
    assert "'app.inline'" in by_label["app.inline"].reason
    assert by_label["copy"].reason == "its input app.inline cannot be rebuilt"
    assert by_label["both"].status == "not compared"
    assert by_label["source.inline"].status == "same"
    assert report.ok  # nothing says the build is not deterministic


async def test_a_solver_without_the_built_in_worker_is_refused(tmp_path: Path) -> None:
    async with Worker(tmp_path / "store") as worker, Solver(op_kinds=worker.op_kinds) as solver:
        with pytest.raises(SolveError, match="built-in worker"):
            await check_determinism(solver, State.inline({"a": "x"}).definition())


# -- the report's lines ------------------------------------------------------------------


def test_format_report_lines() -> None:
    d = "sha256:" + "0" * 64
    one = OpCheck(d, 0, "one", "exec", "same")
    multi = OpCheck(d, 2, "multi", "exec", "not compared", reason="why\nnot")
    assert format_report(CheckReport((one,))) == ["check: the op output is the same\n"]
    assert format_report(CheckReport((one, multi))) == [
        "multi[2]: not compared: why not\n",
        "check: 1 is the same, 1 not compared\n",
    ]


def test_cli_build_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``solver build --check``: exit 1 and the differing file for a timestamp, 0
    for a deterministic step; --check with --frontend is a usage error."""
    from solver.cli import main

    stamp = tmp_path / "stamp.py"
    stamp.write_text(
        "from solver.worker import State, run\n"
        'definition = run(["/bin/sh", "-c", "/bin/date +%s%N > t.txt"], '
        'root=State.scratch(), name="stamp")\n'
    )
    steady = tmp_path / "steady.py"
    steady.write_text(
        "from solver.worker import State, run\n"
        'definition = run(["/bin/sh", "-c", "echo same > t.txt"], '
        'root=State.scratch(), name="steady")\n'
    )
    cache = ["--cache-dir", str(tmp_path / "cache"), "--progress", "plain"]
    assert main(["build", str(stamp), "--check", *cache]) == 1
    out = capsys.readouterr().out
    assert "stamp: differs at t.txt (content)" in out
    assert main(["build", str(steady), "--check", *cache]) == 0
    assert "differs" not in capsys.readouterr().out
    assert main(["build", str(steady), "--check", "--frontend", "buildfile", *cache]) == 2
    assert "does not take --frontend" in capsys.readouterr().err


async def test_a_check_cancelled_while_it_rebuilds_releases_everything(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """Cancelled while the scratch rebuild runs a step: the step is stopped, every
    handle is released (the tracker checks at teardown), the scratch store is gone
    and the user's store gained nothing but the build's own snapshots."""
    marker = tmp_path / "started"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # the step signals through a host file that the rebuild (its second run) began
    step = run(
        ["/bin/sh", "-c", f'echo x >> "{marker}"; n=$(wc -l < "{marker}"); '
         'if [ "$n" -gt 1 ]; then /bin/sleep 30; fi; echo done > out.txt'],
        root=State.scratch(),
        name="slow on rebuild",
    )
    async with solving(tmp_path, sandbox="none") as solver:
        async with await solver.solve(step.definition()):
            pass
        before = snapshot_ids(tmp_path / "store")
        with anyio.fail_after(20):
            with anyio.CancelScope() as scope:

                async def cancel_when_rebuilding() -> None:
                    while len(marker.read_text().splitlines()) < 2:  # noqa: ASYNC110 - a host file
                        await anyio.sleep(0.01)
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_when_rebuilding)
                    await check_determinism(solver, step.definition(), scratch_dir=scratch)
            assert scope.cancelled_caught
        assert list(scratch.iterdir()) == []
        assert snapshot_ids(tmp_path / "store") == before
