"""First contact (issue 18): every failure of the command line is one line on
stderr, ``solver: error: ...`` (``solver: interrupted`` for Ctrl-C), with a
non-zero exit status and never a traceback (unless ``--debug``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import solver.cli._main as cli_main
import solver.worker
from solver import SolveError
from solver.cli import main
from solver.definition import Definition, node
from solver.worker import State

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(PY).parent / "solver"  # the console script, when installed here


def inline_json(tmp_path: Path, name: str = "defn.json") -> Path:
    """A definition that runs no process (inline files only)."""
    path = tmp_path / name
    path.write_text(State.inline({"a.txt": "a\n"}).with_name("files").definition().to_json())
    return path


def one_error(err: str, message: str) -> str:
    """Assert ``err`` ends with exactly one error line holding ``message``, has no
    traceback, and return that line."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("solver: error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    assert message in errors[0], err
    return errors[0]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def env_for(cache: Path) -> dict[str, str]:
    env = {**os.environ, "SOLVER_CACHE_DIR": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# -- bad paths -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["build", "DEFN"], ["du"], ["prune"]])
def test_a_file_as_cache_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    defn = inline_json(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    args = [str(defn) if arg == "DEFN" else arg for arg in command]
    status, _, err = run_main(capsys, *args, "--cache-dir", str(afile))
    assert status == 1
    assert one_error(err, "") == f"solver: error: --cache-dir {afile} is a file, not a directory"
    assert afile.read_text() == "not a directory"


def test_a_cache_dir_below_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    cache = afile / "cache"
    defn = inline_json(tmp_path)
    status, _, err = run_main(capsys, "build", str(defn), "--cache-dir", str(cache))
    assert status == 1
    one_error(err, f"--cache-dir {cache} cannot be created: {afile} is a file, not a directory")


def test_the_default_cache_dir_is_named_where_it_comes_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("SOLVER_CACHE_DIR", str(afile))
    status, _, err = run_main(capsys, "du")
    assert status == 1
    one_error(err, f"the cache directory {afile} ($SOLVER_CACHE_DIR) is a file, not a directory")


def deny_writes_to(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Make ``os.access`` say ``denied`` cannot be written (so that the test does
    not depend on running as root, whom permission bits do not stop)."""
    real = os.access

    def access(path: str | os.PathLike[str], mode: int, **kwargs: object) -> bool:
        if Path(path) == denied and mode & os.W_OK:
            return False
        return real(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)


def test_unwritable_cache_dir_and_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    defn = inline_json(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_to(monkeypatch, locked)
    status, _, err = run_main(capsys, "build", str(defn), "--cache-dir", str(locked))
    assert status == 1
    one_error(err, f"--cache-dir {locked} is not writable")
    status, _, err = run_main(capsys, "du", "--cache-dir", str(locked / "cache"))
    assert status == 1
    one_error(err, f"--cache-dir {locked / 'cache'} cannot be created: {locked} is not writable")
    cache = tmp_path / "cache"
    status, _, err = run_main(capsys, "build", str(defn), "--cache-dir", str(cache),
                              "--output", str(locked / "out"))
    assert status == 1
    one_error(err, f"--output {locked / 'out'} cannot be created: {locked} is not writable")
    assert not cache.exists()  # checked before anything was opened or built


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="permission bits do not stop root"
)
def test_unwritable_cache_dir_for_real(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        status, _, err = run_main(capsys, "du", "--cache-dir", str(locked))
    finally:
        locked.chmod(0o755)
    assert status == 1
    one_error(err, f"--cache-dir {locked} is not writable")


def test_output_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    defn = inline_json(tmp_path)
    cache = tmp_path / "cache"
    afile = tmp_path / "afile"
    afile.write_text("")
    adir = tmp_path / "adir"
    adir.mkdir()
    for output, message in [
        (str(afile), f"--output {afile} is a file, not a directory"),
        (str(afile / "out"), f"--output {afile / 'out'} cannot be created: {afile} is a file"),
        (f"type=local,dest={afile / 'a' / 'b'}", f"{afile} is a file, not a directory"),
        (f"type=tar,dest={adir}", f"--output type=tar,dest={adir} is a directory, not a file"),
        (f"type=tar,dest={afile / 'x.tar'}",
         f"--output type=tar,dest={afile / 'x.tar'} cannot be created: {afile} is a file"),
    ]:
        status, _, err = run_main(
            capsys, "build", str(defn), "--cache-dir", str(cache), "--output", output
        )
        assert status == 1, output
        one_error(err, message)
    assert not cache.exists()


def test_missing_or_unusable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    missing = tmp_path / "missing.json"
    status, _, err = run_main(capsys, "build", str(missing), *cache)
    assert status == 1
    assert one_error(err, "") == f"solver: error: {missing}: no such file"
    status, _, err = run_main(capsys, "build", str(tmp_path), *cache)
    assert status == 1
    one_error(err, f"{tmp_path} is a directory, not a definition file")


def test_cache_import_and_export_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    defn = inline_json(tmp_path)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    afile = tmp_path / "afile"
    afile.write_text("")
    status, _, err = run_main(capsys, "build", str(defn), *cache, "--import-cache",
                              f"src={afile}")
    assert status == 1
    one_error(err, f"--import-cache src={afile} is a file, not a directory")
    status, _, err = run_main(capsys, "build", str(defn), *cache, "--export-cache",
                              f"dest={afile}")
    assert status == 1
    one_error(err, f"--export-cache dest={afile} is a file, not a directory")

    # A source that is not there yet (a first CI run) is a warning, not an error.
    nowhere = tmp_path / "nowhere"
    status, _, err = run_main(capsys, "build", str(defn), *cache, "--progress", "plain",
                              "--import-cache", f"src={nowhere}")
    assert status == 0, err
    assert (f"solver: warning: no cache to import at {nowhere} (no such directory); "
            "building without it") in err.splitlines()

    # A corrupt index is an error naming the file.
    exported = tmp_path / "exported"
    status, _, err = run_main(capsys, "build", str(defn), *cache, "--progress", "plain",
                              "--export-cache", f"dest={exported}")
    assert status == 0, err
    (exported / "index.json").write_text("{garbage")
    status, _, err = run_main(capsys, "build", str(defn), "--cache-dir", str(tmp_path / "c2"),
                              "--import-cache", f"src={exported}", "--progress", "plain")
    assert status == 1
    one_error(err, f"the cache index {exported / 'index.json'} is corrupt: it is not JSON")


# -- a corrupt cache directory -----------------------------------------------------------


def test_a_cache_dir_with_a_broken_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    defn = inline_json(tmp_path)
    cache = tmp_path / "cache"
    store = cache / "snapshots"
    store.mkdir(parents=True)
    (store / "meta").write_text("a file where the store keeps a directory")
    for command in (["build", str(defn), "--progress", "plain"], ["du"], ["prune"]):
        status, _, err = run_main(capsys, *command, "--cache-dir", str(cache))
        assert status == 1, command
        one_error(err, f"--cache-dir {cache} is not a usable cache directory: "
                       f"{store / 'meta'} is not a directory")
    (store / "meta").unlink()
    (store / "lock").mkdir()
    status, _, err = run_main(capsys, "du", "--cache-dir", str(cache))
    assert status == 1
    one_error(err, f"--cache-dir {cache} is not a usable cache directory: {store / 'lock'}: ")
    # the store root itself a file
    (store / "lock").rmdir()
    for child in store.iterdir():
        child.rmdir()
    store.rmdir()
    store.write_text("")
    status, _, err = run_main(capsys, "du", "--cache-dir", str(cache))
    assert status == 1
    one_error(err, f"--cache-dir {cache} is not a usable cache directory: {store} is a file")


def test_garbage_store_metadata_and_database_are_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    defn = inline_json(tmp_path)
    cache = tmp_path / "cache"
    build = ["build", str(defn), "--cache-dir", str(cache), "--progress", "plain"]
    assert run_main(capsys, *build)[0] == 0
    metas = list((cache / "snapshots" / "meta").iterdir())
    assert len(metas) == 1
    metas[0].write_text("garbage")
    status, _, err = run_main(capsys, *build)
    assert status == 0, err
    assert "Traceback" not in err
    warning = next(line for line in err.splitlines() if line.startswith("solver: warning:"))
    assert f"removing snapshot {metas[0].stem}" in warning
    assert "its metadata is corrupt" in warning

    (cache / "snapshots" / "cache.db").write_bytes(b"garbage" * 1000)
    status, _, err = run_main(capsys, *build)
    assert status == 0, err
    assert "Traceback" not in err
    warning = next(line for line in err.splitlines() if line.startswith("solver: warning:"))
    assert "cache.db is unusable" in warning
    status, out, err = run_main(capsys, "du", "--cache-dir", str(cache))
    assert status == 0, err
    assert out.splitlines()[-1].startswith("Total: ")


# -- bad options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "x.json", "--output", "type=zip,dest=a"], "unknown --output type 'zip'"),
        (["build", "x.json", "--output", "type=tar"], "--output type=tar needs dest=..."),
        (["build", "x.json", "--export-cache", "dest"],
         "bad --export-cache field 'dest': expected key=value"),
        (["build", "x.json", "--export-cache", "dest=x,mode=all"],
         "--export-cache mode must be min or max"),
        (["build", "x.json", "--import-cache", "type=local"], "--import-cache needs src=DIR"),
        (["build", "x.json", "--progress", "fancy"], "argument --progress: invalid choice"),
        (["build"], "the following arguments are required: FILE"),
        (["build", "x.json", "--opt", "a=b"], "--opt and --allow-frontend-source need --frontend"),
        (["prune", "--max-used-space", "10XB"], "invalid size '10XB'"),
        (["prune", "--keep-duration", "soon"], "invalid duration 'soon'"),
        (["prune", "--filter", "kin=exec"], "unknown field 'kin'"),
        (["prune", "--all", "--keep-duration", "1h"], "cannot be combined with --keep-duration"),
        (["du", "--format", "yaml"], "argument --format: invalid choice: 'yaml'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["du", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_options_are_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    cache = tmp_path / "cache"
    argv = [*args, "--cache-dir", str(cache)] if args and args[0] in ("du", "prune") else args
    status, out, err = run_main(capsys, *argv)
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err  # no usage block
    one_error(err, message)
    assert not cache.exists()


def test_help_points_at_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_main(capsys, "prune", "--keep-duration", "soon")
    assert status == 2
    assert err.rstrip().endswith("(see 'solver prune --help')")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import solver

    status, out, err = run_main(capsys, "--version")
    assert (status, out, err) == (0, f"solver {solver.__version__}\n", "")


# -- bad definitions --------------------------------------------------------------------


def test_bad_definition_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    good = json.loads(inline_json(tmp_path).read_text())
    (digest, op), = good["ops"].items()
    missing = "sha256:" + "0" * 64
    documents = {
        "malformed.json": ("{not json", "malformed definition JSON"),
        "cycle.json": (json.dumps({
            "version": 1, "metadata": {}, "output": [a, 0],
            "ops": {a: {"kind": "merge", "inputs": [[b, 0]], "payload": {}},
                    b: {"kind": "merge", "inputs": [[a, 0]], "payload": {}}},
        }), "the ops form a cycle of 2"),
        "missing.json": (json.dumps({
            **good, "ops": {digest: {**op, "inputs": [[missing, 0]]}},
        }), f"inputs[0] names op {missing}, which is not in the definition"),
        "kind.json": (Definition.of(node("frob", {})).to_json(), "unknown op kind 'frob'"),
    }
    for name, (text, message) in documents.items():
        path = tmp_path / name
        path.write_text(text)
        status, _, err = run_main(capsys, "build", str(path), *cache)
        assert status == 1, name
        line = one_error(err, message)
        assert line.startswith(f"solver: error: {path}: "), line  # which file


BUILD_FILES = {
    "raises.py": (
        """
        x = 1
        raise RuntimeError("kaboom")
        """,
        "{path}:3: RuntimeError: kaboom (re-run with --debug for the traceback)",
    ),
    "build_raises.py": (
        """
        def build():
            return {}["nope"]
        """,
        "{path}:3: build() raised KeyError: 'nope' (re-run with --debug",
    ),
    "syntax.py": ("x = 1\ny = (\n", "{path}:2: SyntaxError: '(' was never closed"),
    "exits.py": ("import sys\nsys.exit(3)\n", "{path} called sys.exit(3) instead of"),
    "nothing.py": ("x = 1\n", "{path} defines neither a top-level 'definition' nor a"),
    "wrong.py": ("definition = 42\n", "{path}: 'definition' is a int, not a solver.Definition"),
}


@pytest.mark.parametrize("name", sorted(BUILD_FILES))
def test_bad_python_build_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    text, message = BUILD_FILES[name]
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    status, _, err = run_main(capsys, "build", str(path), "--cache-dir", str(tmp_path / "c"))
    assert status == 1
    one_error(err, message.format(path=path))


def test_debug_shows_the_build_files_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "raises.py"
    path.write_text('raise RuntimeError("kaboom")\n')
    for argv in (["--debug", "build", str(path)], ["build", "--debug", str(path)]):
        status, _, err = run_main(capsys, *argv, "--cache-dir", str(tmp_path / "c"))
        assert status == 1
        assert err.startswith("Traceback (most recent call last):")
        assert f'File "{path}", line 1, in <module>' in err
        assert err.splitlines()[-1] == f"solver: error: {path}:1: RuntimeError: kaboom"


# -- internal errors and interrupts, in process -----------------------------------------


def fail_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise exc

    # _cmd_du imports disk_usage when it runs (docs/performance.md, "CLI start-up")
    monkeypatch.setattr(solver.worker, "disk_usage", broken)


def test_an_unexpected_exception_is_a_bug_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_with(monkeypatch, ZeroDivisionError("division by zero"))
    du = ["du", "--cache-dir", str(tmp_path / "cache")]
    status, _, err = run_main(capsys, *du)
    assert status == 1
    assert one_error(err, "") == (
        "solver: error: internal error: ZeroDivisionError: division by zero; this is a bug "
        "(re-run with --debug for the traceback)"
    )
    status, _, err = run_main(capsys, *du, "--debug")
    assert status == 1
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == (
        "solver: error: internal error: ZeroDivisionError: division by zero; this is a bug"
    )


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (KeyboardInterrupt(), 130, "solver: interrupted"),
        (SolveError("step failed", vertex_name="compile"),
         1, "solver: error: building 'compile' failed: step failed"),
        (ExceptionGroup("wrapped", [SolveError("inner\nfailure")]),
         1, "solver: error: inner failure"),
        # an OSError while the store is opened: it names the cache directory
        (PermissionError(13, "Permission denied", "/some/path"), 1,
         "solver: error: --cache-dir {cache} is not a usable cache directory: "
         "/some/path: Permission denied"),
    ],
)
def test_failures_map_to_one_line_and_a_status(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    status: int,
    line: str,
) -> None:
    fail_with(monkeypatch, exc)
    cache = tmp_path / "cache"
    got, out, err = run_main(capsys, "du", "--cache-dir", str(cache))
    assert (got, out, err) == (status, "", line.format(cache=cache) + "\n")


def test_an_os_error_elsewhere_names_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(file: str) -> None:
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr(cli_main, "load_definition", unreadable)
    defn = inline_json(tmp_path)
    status, out, err = run_main(capsys, "build", str(defn), "--cache-dir", str(tmp_path / "c"))
    assert (status, out, err) == (1, "", f"solver: error: {defn}: Permission denied\n")


def test_frontend_builds_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import solver.cli._frontends as cli_frontends

    context = tmp_path / "context"
    context.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("")
    build = ["build", "--frontend", "buildfile", str(context)]
    status, _, err = run_main(capsys, *build, "--cache-dir", str(afile))
    assert status == 1
    one_error(err, f"--cache-dir {afile} is a file, not a directory")

    def missing(name: str, allowed: object = ()) -> None:
        raise ModuleNotFoundError("No module named 'frontends'")

    monkeypatch.setattr(cli_frontends, "make_frontend", missing)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    status, _, err = run_main(capsys, *build, *cache)
    assert status == 1
    assert one_error(err, "") == (
        "solver: error: cannot load frontend 'buildfile': ModuleNotFoundError: No module "
        "named 'frontends' (re-run with --debug for the traceback)"
    )
    status, _, err = run_main(capsys, *build, *cache, "--debug")
    assert status == 1
    assert err.startswith("Traceback (most recent call last):")


def test_library_log_records_are_one_warning_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = solver.worker.disk_usage

    async def logging_usage(root: Path) -> object:
        try:
            raise ValueError("the disk said no")
        except ValueError:
            logging.getLogger("solver").exception("automatic garbage collection of %s failed",
                                                  root)
        return await real(root)

    monkeypatch.setattr(solver.worker, "disk_usage", logging_usage)
    cache = tmp_path / "cache"
    status, out, err = run_main(capsys, "du", "--cache-dir", str(cache))
    assert status == 0
    assert out.startswith("Total: 0B in 0 snapshot(s)")
    assert err == (f"solver: warning: automatic garbage collection of {cache / 'snapshots'} "
                   "failed: ValueError: the disk said no\n")
    status, _, err = run_main(capsys, "--debug", "du", "--cache-dir", str(cache))
    assert status == 0
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("solver: warning: automatic garbage collection")
    assert not logging.getLogger("solver").handlers  # removed when main returns


# -- subprocesses: the console script and python -m solver -----------------------------


def launchers() -> list[list[str]]:
    found = [[PY, "-m", "solver"]]
    if SCRIPT.exists():
        found.append([str(SCRIPT)])
    return found


@pytest.mark.parametrize("launcher", launchers(), ids=lambda argv: Path(argv[-1]).name)
def test_a_file_as_cache_dir_from_a_shell(tmp_path: Path, launcher: list[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    defn = inline_json(tmp_path)
    for args in (["build", str(defn)], ["du"], ["prune", "--all"]):
        r = subprocess.run([*launcher, *args, "--cache-dir", str(afile)], env=env_for(afile),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, args
        assert r.stderr == f"solver: error: --cache-dir {afile} is a file, not a directory\n"
        assert r.stdout == ""


def test_a_closed_stdout_is_not_a_traceback(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    try:
        r = subprocess.run([PY, "-m", "solver", "du", "--cache-dir", str(cache)],
                           env=env_for(cache), stdout=write, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 1
    assert r.stderr == ""


SLEEPER = """
import os
from solver.worker import State, run

base = State.inline({"in.txt": "in"}).with_name("base")
# The marker tells the test the step is running; SLEEP is 0 for the second build.
definition = run(
    ["/bin/sh", "-c", "echo started > started; exec sleep " + os.environ["SLEEP"]],
    root=base,
    name="sleeper",
).definition()
"""


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float) -> None:
    """Poll ``condition`` (what the child does is not ours to schedule) until it
    holds; fail if the child exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the build ended first ({proc.returncode}): {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the step did not start: {proc.communicate()[1]}")
        time.sleep(0.02)


def stderr_after_sigint(proc: subprocess.Popen[str]) -> str:
    """The build's stderr once it has ended after a SIGINT; a build that has not
    within 120 s is made to print its threads' stacks (PYTHONFAULTHANDLER, SIGABRT)
    and the test fails with them."""
    try:
        return proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        # Either the build still runs, or it ended and something it started
        # still holds its stderr open: say which.
        code = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGABRT)
        try:
            err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = "(its stderr is still open: a process it started holds it)"
        pytest.fail(f"no end of stderr within 120 s of SIGINT (exit status then: {code}); "
                    f"its stderr:\n{err}")


def start_sleeper(tmp_path: Path) -> tuple[subprocess.Popen[str], list[str], Path]:
    """A ``solver build`` whose step sleeps 600 s, once the step runs: the
    process, its argv and the store's tmp/ (where the step's directories are)."""
    build_py = tmp_path / "sleeper.py"
    build_py.write_text(SLEEPER)
    cache = tmp_path / "cache"
    argv = [PY, "-m", "solver", "build", str(build_py), "--cache-dir", str(cache),
            "--progress", "plain"]
    env = {**env_for(cache), "SLEEP": "600", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    # The exec step runs in a working directory below the store's tmp/.
    work = cache / "snapshots" / "tmp"

    def step_started() -> bool:
        # the build makes and removes directories under tmp/ meanwhile: one can go
        # between the walk's listing and its look inside (seen: FileNotFoundError)
        try:
            return work.is_dir() and any(work.rglob("started"))
        except FileNotFoundError:
            return False

    wait_for(step_started, proc, timeout=120)
    return proc, argv, work


def test_an_interruptible_run_returns_and_raises_as_anyio_run_does() -> None:
    """The build commands' loop (with its SIGINT receiver) gives back main's value
    and raises main's exception itself, not in a group (the commands catch
    DefinitionError and SolveError by type); off the main thread, where no signal
    receiver can be set up, it runs all the same."""
    import threading

    from solver.cli._interrupt import run_interruptible

    async def value() -> int:
        return 42

    async def failure() -> int:
        raise SolveError("it broke")

    def both() -> list[object]:
        got: list[object] = [run_interruptible(value)]
        try:
            run_interruptible(failure)
        except SolveError as exc:
            got.append(str(exc))
        return got

    assert both() == [42, "it broke"]
    off_main: list[object] = []
    thread = threading.Thread(target=lambda: off_main.extend(both()))
    thread.start()
    thread.join(timeout=60)
    assert off_main == [42, "it broke"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tgkill, /proc")
def test_ctrl_c_taken_by_another_thread_of_the_build_interrupts_it(tmp_path: Path) -> None:
    """The kernel hands a process's SIGINT to any thread that does not block it.
    One that lands on a thread other than the main one (a worker thread, a child
    watcher) must still stop the build: asyncio's own handler ran only when the
    main thread next woke, which a step quiet for minutes never made it do (a
    build outlived its SIGINT by 120 s in CI)."""
    import ctypes

    tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)
    if tgkill is None:
        pytest.skip("the C library has no tgkill")
    proc, _, work = start_sleeper(tmp_path)
    try:
        deadline = time.monotonic() + 30
        others: list[int] = []
        while not others and time.monotonic() < deadline:
            others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")
                      if int(t) != proc.pid]
            time.sleep(0.02)
        if not others:
            pytest.skip("the build runs no thread but its main one")
        assert tgkill(proc.pid, others[0], signal.SIGINT) == 0, ctypes.get_errno()
        err = stderr_after_sigint(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "solver: interrupted"
    assert list(work.iterdir()) == []  # the step was stopped and its directories removed


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_interrupts_the_build_and_the_cache_stays_usable(tmp_path: Path) -> None:
    proc, argv, work = start_sleeper(tmp_path)
    cache = tmp_path / "cache"
    proc.send_signal(signal.SIGINT)
    err = stderr_after_sigint(proc)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "solver: interrupted"
    assert "Traceback" not in err
    assert list(work.iterdir()) == []  # the step's directories were removed

    again = subprocess.run(argv, env={**env_for(cache), "SLEEP": "0"},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "[base] CACHED" in again.stderr  # what finished before the interrupt was kept
    assert "[sleeper] DONE" in again.stderr
