"""The shared cache across real ``solver build`` processes and a real PostgreSQL
server (issue 14's "done when"): separate local cache directories, one database.

Each process prints one summary line (``N from the shared cache, M run here, K
published``); the steps that write ``/proc/sys/kernel/random/uuid`` into their
output make "ran again" visible in the bytes too. Processes are killed by PID only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from shared_cache_support import PASSWORD, PgServer, pg_server, shared_url, start_server
from test_readme import ASYNCIO_LAST_LINE, first_example

__all__ = ["pg_server", "shared_url"]  # fixtures, re-exported for pytest

ROOT = Path(__file__).resolve().parent.parent

SUMMARY = re.compile(
    r"^shared cache (\S+)( \(unreachable: built locally\))?: (\d+) from the shared cache, "
    r"(\d+) run here, (\d+) published",
    re.MULTILINE,
)

UUID_GRAPH = """\
from solver.worker import State, run

words = State.inline({"words.txt": "pear\\nfig\\napple\\nfig\\n"})
unique = run(
    ["/bin/sh", "-c", "/usr/bin/sort -u in/words.txt > sorted.txt; "
     "cat /proc/sys/kernel/random/uuid > id.txt"],
    mounts={"in": words}, readonly=["in"], name="sort",
)
definition = run(["/bin/sh", "-c", "/usr/bin/wc -l < sorted.txt > count.txt"],
                 root=unique, name="count")
"""

# A step that runs until the test opens its gate (a host file: these builds run
# with --sandbox none), so a build is still inside the step, holding its lease,
# for as long as the test needs; a sleep of a few seconds was a bet that the
# test's next move came first. It gives up waiting after a minute, so a step
# orphaned by a killed build never outlives the test by long.
GATED_GRAPH = """\
from solver.worker import State, run

seed = State.inline({{"seed.txt": "slow"}})
definition = run(
    ["/bin/sh", "-c", "i=0; while [ ! -e {gate} ] && [ $i -lt 1200 ]; do "
     "/bin/sleep 0.05; i=$((i+1)); done; cat /proc/sys/kernel/random/uuid > id.txt"],
    mounts={{"in": seed}}, readonly=["in"], name="slow",
)
"""
ON_HOST = ("--sandbox", "none")  # the gated step sees the host's gate file


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("SOLVER_SHARED_CACHE", None)
    return env


def _build_argv(
    defn: Path, cache: Path, url: str | None, out: Path | None, extra: Sequence[str] = ()
) -> list[str]:
    argv = [sys.executable, "-m", "solver", "build", str(defn), "--cache-dir", str(cache),
            "--progress", "plain", *extra]
    if url is not None:
        argv += ["--shared-cache", url]
    if out is not None:
        argv += ["-o", str(out)]
    return argv


def build(
    defn: Path, cache: Path, url: str | None, out: Path | None = None, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(_build_argv(defn, cache, url, out, extra), env=_env(),
                          capture_output=True, text=True, timeout=180, check=False)
    assert PASSWORD not in proc.stdout + proc.stderr
    return proc


def summary(stderr: str) -> tuple[int, int, int]:
    """(from the shared cache, run here, published) of a build's summary line."""
    found = SUMMARY.findall(stderr)
    assert len(found) == 1, stderr
    _url, _down, restored, ran, published = found[0]
    return int(restored), int(ran), int(published)


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".solver")
    }


def readme_definition(tmp_path: Path) -> Path:
    """The README's first example as a definition file for ``solver build``."""
    program, _, _ = first_example()
    assert ASYNCIO_LAST_LINE in program
    head = program.split("async def main", 1)[0]
    path = tmp_path / "readme_defn.py"
    path.write_text(head + "\ndefinition = defn\n")
    return path


def advisory_locks(url: str) -> int:
    """The granted advisory locks (leases) of this test's database (the server's
    other databases belong to other tests)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
            "database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for_no_lease(url: str, timeout: float = 30) -> None:
    """Wait until no lease is held: a process that exited closed its connection,
    but the server ends that session (and frees its locks) on its own time."""
    deadline = time.monotonic() + timeout
    while advisory_locks(url):
        if time.monotonic() > deadline:
            raise AssertionError(f"a lease is still held {timeout} s after the builds ended")
        time.sleep(0.05)


WAITING = "[slow] | waiting for another machine that runs this step"


def wait_for_lease(url: str, proc: subprocess.Popen[str], *, hold: float = 0.5) -> None:
    """Wait until an advisory lock (a lease) has been held for ``hold`` seconds."""
    deadline = time.monotonic() + 60
    since: float | None = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the build ended before it took a lease"
        if advisory_locks(url):
            since = since or time.monotonic()
            if time.monotonic() - since >= hold:
                return
        else:
            since = None
        time.sleep(0.05)
    raise AssertionError("no lease was taken")


def test_second_process_builds_the_readme_example_from_the_shared_cache(
    tmp_path: Path, shared_url: str
) -> None:
    defn = readme_definition(tmp_path)
    first = build(defn, tmp_path / "a", shared_url, tmp_path / "out-a")
    assert first.returncode == 0, first.stderr
    assert summary(first.stderr) == (0, 3, 3)
    second = build(defn, tmp_path / "b", shared_url, tmp_path / "out-b")
    assert second.returncode == 0, second.stderr
    assert summary(second.stderr) == (3, 0, 0)  # 0 execs
    assert second.stderr.count("| restored from the shared cache") == 3
    assert tree(tmp_path / "out-b") == tree(tmp_path / "out-a")
    assert tree(tmp_path / "out-a")["count.txt"].strip() == b"3"
    # the second machine's local cache now has it: no shared lookup answers again
    third = build(defn, tmp_path / "b", shared_url, None)
    assert summary(third.stderr) == (0, 0, 0)
    assert third.stderr.count("CACHED") == 3


def test_four_processes_at_once_run_each_op_once(tmp_path: Path, shared_url: str) -> None:
    defn = tmp_path / "uuid_defn.py"
    defn.write_text(UUID_GRAPH)
    procs = [
        subprocess.Popen(
            _build_argv(defn, tmp_path / f"c{i}", shared_url, tmp_path / f"out{i}"),
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(4)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert PASSWORD not in out + err
    counts = [summary(err) for _, err in results]
    assert sum(ran for _, ran, _ in counts) == 3, counts  # each op once in total
    assert sum(published for _, _, published in counts) == 3, counts
    assert sum(restored for restored, _, _ in counts) == 9, counts
    outputs = [tree(tmp_path / f"out{i}") for i in range(4)]
    assert all(o == outputs[0] for o in outputs), "the 4 builds differ"


class StderrLines:
    """A child's stderr, read line by line by a thread: wait for a line that
    holds some text, and the whole text once the child has closed it."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        with self._changed:
            if not self._changed.wait_for(
                lambda: any(text in line for line in self._lines), timeout
            ):
                raise AssertionError(f"no line with {text!r}: {''.join(self._lines)}")

    def text(self) -> str:
        self._thread.join(timeout=120)
        with self._changed:
            return "".join(self._lines)


def test_a_killed_holder_loses_its_lease_and_another_takes_over(
    tmp_path: Path, shared_url: str
) -> None:
    defn = tmp_path / "slow.py"
    gate = tmp_path / "gate"
    defn.write_text(GATED_GRAPH.format(gate=gate))
    holder = subprocess.Popen(_build_argv(defn, tmp_path / "a", shared_url, None, ON_HOST),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              text=True)
    waiter: subprocess.Popen[str] | None = None
    try:
        wait_for_lease(shared_url, holder)
        waiter = subprocess.Popen(
            _build_argv(defn, tmp_path / "b", shared_url, tmp_path / "o", ON_HOST),
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        lines = StderrLines(waiter)
        # the waiter has found the lease held (the holder is still in its step,
        # which waits for the gate) before the holder dies
        lines.wait_for(WAITING)
        assert waiter.poll() is None
        holder.kill()  # SIGKILL, by PID
        holder.wait(timeout=30)
        gate.touch()  # the waiter's own run of the step, and the orphaned step, end
        waiter.wait(timeout=120)
        err = lines.text()
    finally:
        gate.touch()
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert waiter.returncode == 0, err
    _restored, ran, published = summary(err)
    assert ran == 1  # the slow step, which the killed holder never published
    assert WAITING in err
    assert published == 1
    assert (tmp_path / "o" / "id.txt").read_bytes().strip()
    wait_for_no_lease(shared_url)


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of the test's own, which the test may stop."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.base, ignore_errors=True)


def _build_with_server_stopped_mid_step(
    tmp_path: Path, own_server: PgServer, url_suffix: str, out: Path | None
) -> tuple[int, str, str]:
    """A CLI build of a slow step whose server is stopped (immediate) while the
    step holds its lease: the exit status, stdout and stderr."""
    url = own_server.new_database()
    defn = tmp_path / "slow.py"
    gate = tmp_path / "gate"
    defn.write_text(GATED_GRAPH.format(gate=gate))
    proc = subprocess.Popen(_build_argv(defn, tmp_path / "a", url + url_suffix, out, ON_HOST),
                            env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lease(url, proc, hold=0.2)
        # the step cannot end before the server is down: it waits for the gate
        own_server.stop("immediate")
        gate.touch()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


def test_server_stopped_mid_build_goes_on_locally(tmp_path: Path, own_server: PgServer) -> None:
    returncode, out, err = _build_with_server_stopped_mid_step(
        tmp_path, own_server, "", tmp_path / "o"
    )
    assert returncode == 0, err
    assert PASSWORD not in out + err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1, err
    assert "building on with the local cache only" in warnings[0]
    assert "(unreachable: built locally)" in err
    assert (tmp_path / "o" / "id.txt").is_file()
    # nothing local was lost: the same cache directory has every step
    again = build(tmp_path / "slow.py", tmp_path / "a", None, None, ON_HOST)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("CACHED") == 2, again.stderr


def test_strict_fails_with_a_clear_error_when_the_server_is_down(
    tmp_path: Path, own_server: PgServer
) -> None:
    url = own_server.new_database()
    own_server.stop("immediate")
    defn = tmp_path / "uuid_defn.py"
    defn.write_text(UUID_GRAPH)
    proc = build(defn, tmp_path / "a", url + "&strict=true", None)
    assert proc.returncode == 1, proc.stderr
    assert "solver: error: shared cache postgresql://solver:***@/" in proc.stderr
    assert "cannot connect" in proc.stderr


def solver_cmd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "solver", *argv], env=env or _env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert PASSWORD not in proc.stdout + proc.stderr
    return proc


def test_du_and_prune_show_and_prune_the_shared_store(tmp_path: Path, shared_url: str) -> None:
    defn = tmp_path / "uuid_defn.py"
    defn.write_text(UUID_GRAPH)
    # the URL from the environment this time
    env = dict(_env(), SOLVER_SHARED_CACHE=shared_url)
    built = subprocess.run(_build_argv(defn, tmp_path / "a", None, None), env=env,
                           capture_output=True, text=True, timeout=180, check=False)
    assert built.returncode == 0, built.stderr
    assert summary(built.stderr) == (0, 3, 3)
    du = solver_cmd("du", "--cache-dir", str(tmp_path / "a"), "--shared-cache", shared_url)
    assert du.returncode == 0, du.stderr
    assert re.search(r"^Shared cache postgresql://solver:\*\*\*@/\S+: 3 records, 3 blobs, ",
                     du.stdout, re.MULTILINE), du.stdout
    du_json = solver_cmd("du", "--cache-dir", str(tmp_path / "a"), "--format", "json", env=env)
    doc = json.loads(du_json.stdout)
    assert doc["shared"]["records"] == 3
    assert doc["shared"]["blobs"] == 3
    assert "***" in doc["shared"]["url"]
    kept = solver_cmd("prune", "--cache-dir", str(tmp_path / "a"), "--keep-duration", "1h",
                      "--shared-cache", shared_url)
    assert kept.returncode == 0, kept.stderr
    assert "deleted 0 records and 0 blobs" in kept.stdout
    gone = solver_cmd("prune", "--cache-dir", str(tmp_path / "a"), "--shared-cache", shared_url)
    assert gone.returncode == 0, gone.stderr
    assert "deleted 3 records and 3 blobs" in gone.stdout
    assert "; 0B left" in gone.stdout
    ro = solver_cmd("prune", "--cache-dir", str(tmp_path / "a"),
                    "--shared-cache", shared_url + "&mode=ro")
    assert ro.returncode == 1
    assert "is read-only (mode=ro)" in ro.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"postgresql://solver:{PASSWORD}@/db?mode=rx",
         "mode=rx: the shared cache mode is rw or ro"),
        (f"postgresql://solver:{PASSWORD}@/db?strict=yes", "strict=yes: strict is true or false"),
        (f"mysql://solver:{PASSWORD}@/db", "a shared cache URL starts with postgresql://"),
    ],
)
def test_a_bad_shared_cache_url_is_refused_without_its_password(
    tmp_path: Path, spec: str, message: str
) -> None:
    flag = solver_cmd("du", "--cache-dir", str(tmp_path / "a"), "--shared-cache", spec)
    assert flag.returncode == 2
    assert message in flag.stderr
    env = dict(_env(), SOLVER_SHARED_CACHE=spec)
    from_env = solver_cmd("du", "--cache-dir", str(tmp_path / "a"), env=env)
    assert from_env.returncode == 2
    assert "$SOLVER_SHARED_CACHE=" in from_env.stderr
    assert message in from_env.stderr


def test_strict_fails_when_the_server_stops_mid_build(
    tmp_path: Path, own_server: PgServer
) -> None:
    returncode, out, err = _build_with_server_stopped_mid_step(
        tmp_path, own_server, "&strict=true", None
    )
    assert returncode == 1, err
    assert PASSWORD not in out + err
    assert re.search(r"solver: error: .*shared cache postgresql://solver:\*\*\*@/", err), err
