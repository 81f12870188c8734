"""Debugging a failed step: its tree is kept as the failure left it, ``solver
debug`` runs a command in its re-created sandbox (inputs read-only, its files,
environment and cwd) and nothing done there reaches the store."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import anyio
import pytest

from solver import SolveError, Solver
from solver.cli import main
from solver.testing import HandleTracker
from solver.worker import State, Worker, find_failed_step, run

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed")

FAILING = """\
from solver.worker import State, run
src = State.inline({"in.txt": "input\\n"}).with_name("sources")
definition = run(
    ["sh", "-c", "mkdir -p out; echo partial > out/x.txt; echo failing >&2; exit 4"],
    root=State.inline({"w.txt": "w"}), mounts={"src": src}, readonly=["src"],
    env={"MYVAR": "hello"}, cwd="work", name="fails",
)
"""

PROBE = (
    'echo "cwd=$(pwd) var=$MYVAR root=$SOLVER_ROOT"; cat /build/src/in.txt '
    "/build/work/out/x.txt /build/w.txt; echo; "
    "if touch /build/src/new 2>/dev/null; then echo input-writable; else echo input-readonly; fi; "
    "echo more > /build/work/out/y.txt && echo wrote; exit 7"
)


def fingerprint(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root`` with its mode and content digest."""
    found: dict[str, tuple[int, str]] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top) / name
            digest = ""
            if p.is_file() and not p.is_symlink():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            found[str(p.relative_to(root))] = (p.lstat().st_mode, digest)
    return found


def failed_build(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    f = tmp_path / "fails.py"
    f.write_text(FAILING)
    cache = str(tmp_path / "cache")
    assert main(["build", str(f), "--cache-dir", cache, "--progress", "plain", *extra]) == 1
    return cache


def test_debug_sees_what_the_failed_step_saw_and_changes_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cache = failed_build(tmp_path, capfd)
    capfd.readouterr()
    store = tmp_path / "cache" / "snapshots"
    before = fingerprint(store)
    assert any(path.startswith("failed/") for path in before)
    status = main(["debug", "last", "fails", "--cache-dir", cache, "--", "sh", "-c", PROBE])
    out = capfd.readouterr().out.splitlines()
    assert status == 7  # the command's own status
    assert out == [
        "cwd=/build/work var=hello root=/build",
        "input",
        "partial",
        "w",
        "input-readonly",
        "wrote",
    ]
    # the store, its cache and the kept tree are exactly as before
    assert fingerprint(store) == before
    # and again from the same state: what the first session wrote is gone
    status = main(["debug", "last", "fails", "--cache-dir", cache, "--",
                   "sh", "-c", "ls /build/work/out"])
    assert status == 0
    assert capfd.readouterr().out.splitlines() == ["x.txt"]


def test_debug_errors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cache = failed_build(tmp_path, capfd)
    capfd.readouterr()
    assert main(["debug", "last", "sources", "--cache-dir", cache]) == 1
    assert capfd.readouterr().err.strip() == (
        "solver: error: op 'sources' did not fail in build "
        f"{main_history_id(cache)} (it was executed)"
    )
    assert main(["debug", "last", "nosuchop", "--cache-dir", cache]) == 1
    assert "has no op 'nosuchop'" in capfd.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["debug", "last", "fails", "--cache-dir", cache, "--bogus", "--", "true"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capfd.readouterr().err


def main_history_id(cache: str) -> str:
    from solver.insight import BuildHistory

    return BuildHistory(Path(cache) / "snapshots" / "history").get("last").id


def test_keep_failed_copies_the_tree_and_on_error_shell_needs_a_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    kept = tmp_path / "kept"
    failed_build(tmp_path, capfd, "--keep-failed", str(kept), "--on-error", "shell")
    err = capfd.readouterr().err
    (step,) = kept.iterdir()
    assert (step / "work" / "out" / "x.txt").read_text() == "partial\n"
    assert (step / "src" / "in.txt").read_text() == "input\n"
    assert (step / "w.txt").read_text() == "w"
    assert f"solver: kept the tree of failed step 'fails' in {step}" in err
    hint = "solver: --on-error=shell needs a terminal; to debug the step run: solver debug "
    assert hint in err
    assert err.splitlines()[-1].startswith("solver: error: exec 'fails'")


@pytest.mark.anyio
async def test_worker_keeps_the_newest_failed_steps(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    def failing(text: str) -> State:
        return run(["sh", "-c", f"echo {text} > f.txt; exit 1"], name=text)

    async with Worker(tmp_path / "store", keep_failed=1) as worker, Solver(worker=worker) as s:
        digests = []
        for text in ("one", "two"):
            defn = failing(text).definition()
            digests.append(defn.to_vertices(None).vertex.digest)
            with pytest.raises(SolveError, match="exited with exit code 1"):
                await s.solve(defn)
    assert find_failed_step(tmp_path / "store", digests[0]) is None
    step = find_failed_step(tmp_path / "store", digests[1])
    assert step is not None
    assert (step.name, step.args[:2], step.cwd) == ("two", ("sh", "-c"), ())
    assert (step.root / "f.txt").read_text() == "two\n"
    assert "exit code 1" in step.error
    # off by default: nothing kept
    async with Worker(tmp_path / "other") as worker, Solver(worker=worker) as s:
        with pytest.raises(SolveError):
            await s.solve(failing("three").definition())
    assert not (tmp_path / "other" / "failed").exists()


def test_debug_without_a_sandbox(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cache = failed_build(tmp_path, capfd, "--sandbox", "none")
    capfd.readouterr()
    status = main(["debug", "last", "fails", "--cache-dir", cache, "--", "sh", "-c",
                   'echo "$MYVAR $(basename $(pwd))"; cat "$SOLVER_ROOT/work/out/x.txt"'])
    assert status == 0
    assert capfd.readouterr().out.splitlines() == ["hello work", "partial"]


def test_keep_failed_into_an_existing_dir_is_a_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    kept = tmp_path / "kept"
    failed_build(tmp_path, capfd, "--keep-failed", str(kept))
    (step,) = kept.iterdir()
    capfd.readouterr()
    failed_build(tmp_path, capfd, "--keep-failed", str(kept))
    err = capfd.readouterr().err.splitlines()
    assert err[-2] == (
        f"solver: warning: --keep-failed: {step} exists; remove it or choose another DIR"
    )
    assert err[-1].startswith("solver: error: exec 'fails'")


@pytest.mark.anyio
async def test_cancelled_while_the_failed_step_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handle_tracker: HandleTracker
) -> None:
    """The keep is an await on the exec's failure path: cancelling the solve
    there leaves no exec directory or mutable snapshot behind, and the store
    usable."""
    import threading

    from solver.worker import _exec

    started, release = threading.Event(), threading.Event()
    original = _exec.keep_failed_step

    def slow_keep(*args: object) -> object:
        started.set()
        release.wait(10)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_exec, "keep_failed_step", slow_keep)
    store = tmp_path / "store"
    defn = run(["sh", "-c", "echo x > f.txt; exit 1"], name="fails").definition()
    async with Worker(store, keep_failed=1) as worker, Solver(worker=worker) as s:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_when_keeping() -> None:
                    await anyio.to_thread.run_sync(started.wait, 10)
                    scope.cancel()
                    release.set()

                tg.start_soon(cancel_when_keeping)
                await s.solve(defn)
        assert scope.cancelled_caught
        assert list((store / "tmp").iterdir()) == []  # the exec directory is gone
        # the store still builds (and the step still fails the same way)
        with pytest.raises(SolveError, match="exit code 1"):
            await s.solve(defn)
    step = find_failed_step(store, defn.to_vertices(None).vertex.digest)
    assert step is not None
    assert (step.root / "f.txt").read_text() == "x\n"


@pytest.mark.skipif(sys.platform != "linux", reason="a pseudo-terminal")
def test_on_error_shell_opens_a_shell_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, the failed build opens a shell in the step's sandbox: what
    is typed runs there, and the build still exits 1 once the shell ends."""
    import pty
    import select
    import subprocess

    f = tmp_path / "fails.py"
    f.write_text(FAILING)
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
    ), "TERM": "dumb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "solver", "build", str(f), "--cache-dir", str(tmp_path / "c"),
         "--progress", "plain", "--on-error", "shell"],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0, seen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the other side closed
                    break
                if not chunk:
                    break
                seen += chunk

    read_until(b"a shell in failed step 'fails'")
    os.write(master, b'echo "got:$MYVAR:$(cat out/x.txt)"; exit 3\n')
    read_until(b"solver: error: exec 'fails'")
    assert proc.wait(30) == 1
    os.close(master)
    text = seen.decode(errors="replace")
    assert "got:hello:partial" in text
