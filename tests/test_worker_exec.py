"""The built-in ``exec`` op kind (``solver.worker._exec``): processes over snapshot
mounts, outputs, caching, failures, cancellation and payload validation."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from solver import (
    CacheMap,
    Definition,
    DefinitionError,
    JSONValue,
    Node,
    OpContext,
    OpKindRegistry,
    Result,
    SolveError,
    Solver,
    canonical_json,
    digest_of,
    node,
)
from solver.testing import HandleTracker
from solver.worker import DEFAULT_ROOTFS, SandboxMode, SnapshotStore, SnapshotView
from solver.worker._exec import STDERR_TAIL, OutputHook, register_exec

pytestmark = pytest.mark.anyio


# -- helpers ----------------------------------------------------------------------------


class FilesOp:
    """``test.files``: a source op committing a snapshot with ``payload["files"]``
    (relative path -> text)."""

    def __init__(self, ctx: OpContext, store: SnapshotStore, execs: list[str]) -> None:
        files = ctx.payload["files"]
        assert isinstance(files, Mapping)
        self.files = {str(k): str(v) for k, v in files.items()}
        self.digest = digest_of(canonical_json({"kind": "test.files", "payload": ctx.payload}))
        self.store = store
        self.execs = execs

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(self.digest), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        self.execs.append("files")
        mutable = await self.store.new_mutable({"test": "files"})
        try:
            for rel, text in self.files.items():
                path = mutable.path / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            return [await mutable.commit()]
        finally:
            await mutable.discard()


@asynccontextmanager
async def solving(
    tmp_path: Path,
    on_output: OutputHook | None = None,
    execs: list[str] | None = None,
    sandbox: SandboxMode = "bwrap",
) -> AsyncIterator[tuple[SnapshotStore, Solver]]:
    """An open store, a registry with ``exec`` and ``test.files``, and a Solver.
    On exit, checks that the exec left nothing in the store's tmp/ and that no
    snapshot is still in use once the Solver is gone. Steps run in the sandbox
    unless ``sandbox="none"`` (tests that watch the process from the host)."""
    log = execs if execs is not None else []
    async with SnapshotStore(tmp_path / "store") as store:
        reg = OpKindRegistry()
        register_exec(reg, store, on_output=on_output, sandbox=sandbox)
        reg.register("test.files", lambda ctx: FilesOp(ctx, store, log))
        async with Solver(op_kinds=reg) as s:
            yield store, s
        assert os.listdir(store.root / "tmp") == []
        assert [i.id for i in await store.usage() if i.in_use] == []


def py(code: str) -> list[JSONValue]:
    return [sys.executable, "-c", code]


# The test's Python is outside the default system root: a sandboxed step that runs
# it names its installation (the virtual environment and the base one).
PY_ROOTFS: list[JSONValue] = list(dict.fromkeys([*DEFAULT_ROOTFS, sys.prefix, sys.base_prefix]))


class Runs:
    """Counts the runs of a step that prints ``RAN`` (the ``on_output`` hook): how a
    test sees from outside the sandbox that a cached step did not run again."""

    def __init__(self) -> None:
        self.out = b""

    def __call__(self, fd: int, chunk: bytes) -> None:
        if fd == 1:
            self.out += chunk

    @property
    def count(self) -> int:
        return self.out.count(b"RAN")


def files(contents: dict[str, str]) -> Node:
    return node("test.files", {"files": dict(contents)})


async def read(ref: object, rel: str) -> str:
    view = getattr(ref, "sys", None)
    assert isinstance(view, SnapshotView)
    return (await view.read_bytes(rel)).decode()


async def listing(ref: object) -> list[str]:
    view = getattr(ref, "sys", None)
    assert isinstance(view, SnapshotView)
    return [st.path for st in await view.walk()]


async def wait_until(predicate: Callable[[], bool], timeout: float = 30) -> None:
    """Poll a condition another process makes true (no event to wait on)."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie (killed, waiting for its parent or, as an
    orphan, for init to reap it: some container inits are slow) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        # gone since os.kill, or no /proc at all (not Linux: trust os.kill)
        return not os.path.isdir("/proc/self")
    except IndexError:
        return True
    return state not in ("Z", "X")


def described(pid: int) -> str:
    """What /proc says of ``pid`` (for a failed ``not alive`` assertion)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError as exc:
        return f"pid {pid}: {exc}"
    fields = stat.rsplit(")", 1)[1].split()
    return f"pid {pid}: state {fields[0]}, parent {fields[1]}, command {cmdline!r}"


# -- running ----------------------------------------------------------------------------


async def test_reads_input_writes_output_runs_once(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    runs = Runs()
    script = """
import os, pathlib
root = pathlib.Path(os.environ["SOLVER_ROOT"])
assert pathlib.Path.cwd() == root / "out", pathlib.Path.cwd()
assert os.environ["GREETING"] == "hi" and "PATH" in os.environ
text = (root / "in/a.txt").read_text() + (root / "in/sub/b.txt").read_text()
pathlib.Path("r.txt").write_text(os.environ["GREETING"] + " " + text.upper())
# a read-only mount is a private copy: even if writing succeeds (root), the input
# snapshot must not change
for name in ("in/a.txt", "in/new.txt"):
    try:
        os.chmod(root / "in", 0o755)
        os.chmod(root / name, 0o644) if (root / name).exists() else None
        (root / name).write_text("clobbered")
    except OSError:
        pass
print("RAN")
"""
    src = files({"a.txt": "hello ", "sub/b.txt": "world"})
    run = node(
        "exec",
        {
            "args": py(script),
            "rootfs": PY_ROOTFS,
            "env": {"GREETING": "hi"},
            "cwd": "out",
            "mounts": [
                {"input": 0, "dest": "in", "readonly": True},
                {"input": None, "dest": "out", "output": 0},
            ],
        },
        inputs=[src],
    )
    with anyio.fail_after(30):
        async with solving(tmp_path, on_output=runs) as (store, s):
            async with await s.solve(Definition.of(run)) as res:
                assert await read(res.ref, "r.txt") == "hi HELLO WORLD"
                assert await listing(res.ref) == ["r.txt"]
            async with await s.solve(Definition.of(run)) as res:
                assert await read(res.ref, "r.txt") == "hi HELLO WORLD"
            assert runs.count == 1
            async with await s.solve(Definition.of(src)) as res:
                assert await read(res.ref, "a.txt") == "hello "
                assert await listing(res.ref) == ["a.txt", "sub", "sub/b.txt"]
            assert len(await store.usage()) == 2


async def test_two_outputs_and_writable_copy_of_input(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    runs = Runs()
    src = files({"a.txt": "A"})
    run = node(
        "exec",
        {
            "args": [
                "/bin/sh",
                "-c",
                "echo new > work/new.txt && echo B >> work/a.txt && echo log > logs/l.txt "
                "&& echo RAN && sleep 0.5",
            ],
            "mounts": [
                {"input": None, "dest": "logs", "output": 0},
                {"input": 0, "dest": "work", "output": 1},
                {"input": None, "dest": "scratch"},
            ],
        },
        inputs=[src],
    )
    with anyio.fail_after(30):
        async with solving(tmp_path, on_output=runs) as (_store, s):
            # Both outputs asked for at once: one active vertex, one process.
            seen: dict[int, list[str]] = {}

            async def solve(index: int) -> None:
                async with await s.solve(Definition.of(run.output(index))) as res:
                    seen[index] = await listing(res.ref)
                    if index == 1:
                        assert await read(res.ref, "a.txt") == "AB\n"

            async with anyio.create_task_group() as tg:
                tg.start_soon(solve, 0)
                tg.start_soon(solve, 1)
            assert seen == {0: ["l.txt"], 1: ["a.txt", "new.txt"]}
            assert runs.count == 1
            async with await s.solve(Definition.of(run.output(0))) as res:
                assert await listing(res.ref) == ["l.txt"]
            assert runs.count == 1
            async with await s.solve(Definition.of(src)) as res:
                assert await listing(res.ref) == ["a.txt"]
                assert await read(res.ref, "a.txt") == "A"


async def test_root_mount_with_nested_mount_restores_hidden_content(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    base = files({"top.txt": "top", "sub/orig": "hidden"})
    other = files({"o.txt": "other"})
    run = node(
        "exec",
        {
            "args": [
                "/bin/sh",
                "-c",
                "ls sub > seen.txt && mkdir -p deep/er && ls deep/er/x > seen2.txt",
            ],
            "mounts": [
                {"input": 0, "dest": ".", "output": 0},
                {"input": 1, "dest": "sub", "readonly": True},
                {"input": 1, "dest": "deep/er/x"},
            ],
        },
        inputs=[base, other],
    )
    with anyio.fail_after(30):
        async with solving(tmp_path) as (_store, s), await s.solve(Definition.of(run)) as res:
            assert await read(res.ref, "seen.txt") == "o.txt\n"
            assert await read(res.ref, "seen2.txt") == "o.txt\n"
            assert await read(res.ref, "sub/orig") == "hidden"
            names = await listing(res.ref)
            assert "sub/o.txt" not in names
            assert "deep/er/x" not in names
            assert "deep/er" in names


async def test_on_output_receives_stdout_and_stderr(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    chunks: list[tuple[int, bytes]] = []
    script = (
        "import sys\nfor i in range(3):\n"
        "    sys.stdout.write(f'out{i};'); sys.stdout.flush()\n"
        "    sys.stderr.write(f'err{i};'); sys.stderr.flush()\n"
    )
    run = node(
        "exec",
        {
            "args": py(script),
            "rootfs": PY_ROOTFS,
            "mounts": [{"input": None, "dest": "o", "output": 0}],
        },
    )
    with anyio.fail_after(30):
        hook = solving(tmp_path, on_output=lambda fd, b: chunks.append((fd, b)))
        async with hook as (_, s), await s.solve(Definition.of(run)):
            pass
    assert b"".join(b for fd, b in chunks if fd == 1) == b"out0;out1;out2;"
    assert b"".join(b for fd, b in chunks if fd == 2) == b"err0;err1;err2;"


async def test_background_child_does_not_keep_the_op_alive(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    pidfile = tmp_path / "bgpid"
    run = node(
        "exec",
        {
            # it would outlive wait_until's 30 s if the op left it running
            "args": ["/bin/sh", "-c", f'sleep 300 & echo $! > "{pidfile}"; echo started'],
            "mounts": [{"input": None, "dest": "o", "output": 0}],
        },
    )
    with anyio.fail_after(15):
        # The pid file is on the host: no sandbox (test_sandbox.py has the sandboxed case).
        async with solving(tmp_path, sandbox="none") as (_, s), await s.solve(Definition.of(run)):
            pass
    pid = int(pidfile.read_text())
    await wait_until(lambda: not alive(pid))


# -- failures ---------------------------------------------------------------------------


async def test_failing_process_reports_code_and_stderr_tail(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = files({"a.txt": "A"})
    run = node(
        "exec",
        {
            "args": [
                "/bin/sh",
                "-c",
                "echo on-stdout; head -c 10000 /dev/zero | tr '\\0' z >&2; "
                "echo oops-on-stderr >&2; touch w/partial; exit 3",
            ],
            "mounts": [
                {"input": 0, "dest": "w", "output": 0},
                {"input": 0, "dest": "r", "readonly": True},
            ],
        },
        inputs=[src],
    )
    with anyio.fail_after(30):
        async with solving(tmp_path) as (store, s):
            with pytest.raises(SolveError) as info:
                await s.solve(Definition.of(run))
            msg = str(info.value)
            assert "exit code 3" in msg
            assert "oops-on-stderr" in msg
            assert "/bin/sh -c" in msg
            tail = msg.split("stderr (last", 1)[1]
            assert "on-stdout" not in tail  # stdout is not quoted
            assert tail.count("z") == STDERR_TAIL - len("oops-on-stderr\n")
            assert len(await store.usage()) == 1  # only the source snapshot


async def test_missing_program_is_a_solve_error(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    run = node(
        "exec",
        {
            "args": ["definitely-not-a-program-xyz"],
            "mounts": [{"input": None, "dest": "o", "output": 0}],
        },
    )
    with anyio.fail_after(30):
        async with solving(tmp_path) as (store, s):
            with pytest.raises(SolveError, match="cannot start definitely-not-a-program-xyz"):
                await s.solve(Definition.of(run))
            assert await store.usage() == []


async def test_process_removing_its_output_mount_fails(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    run = node(
        "exec",
        {
            "args": ["/bin/sh", "-c", "rm -rf o"],
            "mounts": [{"input": None, "dest": "o", "output": 0}],
        },
    )
    with anyio.fail_after(30):
        async with solving(tmp_path) as (store, s):
            with pytest.raises(SolveError, match="removed its output mount 'o'"):
                await s.solve(Definition.of(run))
            assert await store.usage() == []


async def test_input_index_out_of_range(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    execs: list[str] = []
    run = node(
        "exec",
        {"args": ["true"], "mounts": [{"input": 1, "dest": "o", "output": 0}]},
        inputs=[files({"a": "a"})],
    )
    with anyio.fail_after(30):
        async with solving(tmp_path, execs=execs) as (_, s):
            with pytest.raises(
                SolveError, match=r"mounts\[0\]\.input is 1, but the op has 1 input"
            ):
                await s.solve(Definition.of(run))


# -- cancellation -----------------------------------------------------------------------


async def test_cancellation_kills_the_process_group_and_cleans_up(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    pids = tmp_path / "pids"
    run = node(
        "exec",
        {
            "args": [
                "/bin/sh",
                "-c",
                f'sleep 30 & echo "$$ $!" > "{pids}.tmp"; mv "{pids}.tmp" "{pids}"; wait',
            ],
            "mounts": [
                {"input": 0, "dest": "w", "output": 0},
                {"input": 0, "dest": "r", "readonly": True},
            ],
        },
        inputs=[files({"a": "a"})],
    )
    again = node(
        "exec",
        {
            "args": ["/bin/sh", "-c", "echo ok > o/ok"],
            "mounts": [{"input": None, "dest": "o", "output": 0}],
        },
    )
    with anyio.fail_after(20):
        # The pid file is on the host: no sandbox (test_sandbox.py has the sandboxed case).
        async with solving(tmp_path, sandbox="none") as (store, s):
            scope = anyio.CancelScope()

            async def solve() -> None:
                with scope:
                    res = await s.solve(Definition.of(run))
                    await res.release()  # pragma: no cover - never reached

            async with anyio.create_task_group() as tg:
                tg.start_soon(solve)
                await wait_until(pids.exists)
                assert len(os.listdir(store.root / "tmp")) > 0
                scope.cancel()
            assert scope.cancelled_caught
            shell, child = (int(p) for p in pids.read_text().split())
            assert not alive(shell), described(shell)
            await wait_until(lambda: not alive(child))  # an orphan: reaped by init
            assert os.listdir(store.root / "tmp") == []
            assert len(await store.usage()) == 1  # the source only
            async with await s.solve(Definition.of(again)) as res:
                assert await read(res.ref, "ok") == "ok\n"


# -- validation -------------------------------------------------------------------------

_M: dict[str, JSONValue] = {"input": None, "dest": "o", "output": 0}

INVALID: list[tuple[dict[str, JSONValue], str]] = [
    ({"mounts": [_M]}, "'args' is missing"),
    ({"args": [], "mounts": [_M]}, "'args' must be a non-empty list"),
    ({"args": "ls", "mounts": [_M]}, "'args' must be a non-empty list"),
    ({"args": ["ls", 1]}, r"args\[1\] must be a string"),
    ({"args": [""]}, r"args\[0\] \(the program\) is empty"),
    ({"args": ["ls"], "bogus": 1}, "unknown field"),
    ({"args": ["ls"], "env": {"A": 1}}, r"env\['A'\] must be a string"),
    ({"args": ["ls"], "env": {"SOLVER_ROOT": "/x"}}, "may not set SOLVER_ROOT"),
    ({"args": ["ls"], "cwd": "../x"}, "'cwd' '../x' contains '..'"),
    ({"args": ["ls"], "cwd": "/tmp"}, "'cwd' '/tmp' is absolute"),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "a/../../b"}]},
        r"mounts\[0\]\.dest 'a/../../b' contains '..'",
    ),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "/etc"}]},
        r"mounts\[0\]\.dest '/etc' is absolute",
    ),
    ({"args": ["ls"], "mounts": [{"input": None}]}, r"mounts\[0\]: 'dest' is missing"),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "a"}, {"input": None, "dest": "./a/"}]},
        r"mounts\[1\]\.dest './a/' is the same destination as mounts\[0\]\.dest",
    ),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "a", "output": 1}]},
        r"output indexes must be 0\.\.0 without gaps, got \[1\]",
    ),
    (
        {
            "args": ["ls"],
            "mounts": [
                {"input": None, "dest": "a", "output": 0},
                {"input": None, "dest": "b", "output": 0},
            ],
        },
        r"output index\(es\) \[0\] are used by more than one mount",
    ),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "a", "output": -1}]},
        r"mounts\[0\]\.output must be null or an integer >= 0",
    ),
    (
        {"args": ["ls"], "mounts": [{"input": "0", "dest": "a"}]},
        r"mounts\[0\]\.input must be null or an integer >= 0",
    ),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "a", "readonly": True, "output": 0}]},
        "read-only, so it cannot be an output",
    ),
    (
        {
            "args": ["ls"],
            "mounts": [
                {"input": None, "dest": "a", "readonly": True},
                {"input": None, "dest": "a/b"},
            ],
        },
        r"mounts\[1\]\.dest 'a/b' is inside the read-only mounts\[0\]",
    ),
    (
        {"args": ["ls"], "mounts": [{"input": None, "dest": "a", "readonly": "yes"}]},
        r"mounts\[0\]\.readonly must be true or false",
    ),
    ({"args": ["ls"], "env": {"SOLVER_SECRETS": "/x"}}, "may not set SOLVER_SECRETS"),
    ({"args": ["ls"], "rootfs": "/usr"}, "'rootfs' must be a list of absolute host paths"),
    ({"args": ["ls"], "rootfs": ["usr"]}, r"rootfs\[0\] must be an absolute host path"),
    ({"args": ["ls"], "rootfs": ["/usr/../etc"]}, r"rootfs\[0\] '/usr/\.\./etc' is not a normal"),
    ({"args": ["ls"], "rootfs": ["/usr/"]}, r"rootfs\[0\] '/usr/' is not a normalised"),
    ({"args": ["ls"], "rootfs": ["/"]}, r"rootfs\[0\] '/' is not a normalised"),
    ({"args": ["ls"], "rootfs": ["/proc/1"]}, r"rootfs\[0\] '/proc/1' overlaps '/proc'"),
    ({"args": ["ls"], "rootfs": ["/build"]}, r"rootfs\[0\] '/build' overlaps '/build'"),
    ({"args": ["ls"], "rootfs": ["/run"]}, r"rootfs\[0\] '/run' overlaps '/run/secrets'"),
    ({"args": ["ls"], "rootfs": ["/tmp"]}, r"rootfs\[0\] '/tmp' would replace"),
    ({"args": ["ls"], "rootfs": ["/usr", "/usr"]}, r"rootfs\[1\] '/usr' is listed twice"),
    ({"args": ["ls"], "network": "bridge"}, "'network' must be \"none\" or \"host\""),
    ({"args": ["ls"], "limits": 5}, "'limits' must be an object"),
    ({"args": ["ls"], "limits": {"cpu": 1}}, r"limits: unknown field\(s\) 'cpu'"),
    ({"args": ["ls"], "limits": {"timeout": 0}}, r"limits\.timeout must be an integer > 0"),
    ({"args": ["ls"], "limits": {"memory": "1G"}}, r"limits\.memory must be an integer > 0"),
    ({"args": ["ls"], "limits": {"processes": True}}, r"limits\.processes must be an integer"),
    ({"args": ["ls"], "secrets": "tok"}, "'secrets' must be a list of secret ids"),
    ({"args": ["ls"], "secrets": ["../x"]}, r"secrets\[0\] must be a secret id"),
    ({"args": ["ls"], "secrets": ["a", "a"]}, r"secrets\[1\] 'a' is listed twice"),
]


@pytest.mark.parametrize(("payload", "message"), INVALID)
async def test_invalid_payload_is_rejected_before_anything_runs(
    tmp_path: Path, handle_tracker: HandleTracker, payload: dict[str, JSONValue], message: str
) -> None:
    execs: list[str] = []
    run = node("exec", payload, inputs=[files({"a": "a"})])
    with anyio.fail_after(30):
        async with solving(tmp_path, execs=execs) as (_, s):
            with pytest.raises(DefinitionError, match=message) as info:
                await s.solve(Definition.of(run))
            assert "invalid payload" in str(info.value)
    assert execs == []


def test_validate_hook_and_output_count(tmp_path: Path) -> None:
    reg = OpKindRegistry()
    register_exec(reg, SnapshotStore(tmp_path))
    kind = reg.require("exec")
    assert kind.validate is not None
    assert kind.outputs is not None
    for payload, message in INVALID:
        with pytest.raises(ValueError, match=message):
            kind.validate(payload)
    two: dict[str, JSONValue] = {
        "args": ["ls"],
        "mounts": [
            {"input": None, "dest": "a", "output": 1},
            {"input": 0, "dest": "b", "readonly": True},
            {"input": None, "dest": "c", "output": 0},
            {"input": None, "dest": "d"},
        ],
    }
    kind.validate(two)
    assert kind.outputs(two) == 2
    assert kind.outputs({"args": ["true"]}) == 0
    with pytest.raises(ValueError, match="already registered"):
        register_exec(reg, SnapshotStore(tmp_path))


async def test_cancellation_kills_a_process_ignoring_sigterm(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    pidfile = tmp_path / "pid"
    script = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(pidfile) + '.tmp'!r}, 'w').write(str(os.getpid()))\n"
        f"os.rename({str(pidfile) + '.tmp'!r}, {str(pidfile)!r})\n"
        "time.sleep(30)\n"
    )
    run = node("exec", {"args": py(script), "mounts": [{"input": None, "dest": "o", "output": 0}]})
    with anyio.fail_after(20):
        async with solving(tmp_path, sandbox="none") as (store, s):  # a host pid file
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(s.solve, Definition.of(run))
                    await wait_until(pidfile.exists)
                    scope.cancel()
            pid = int(pidfile.read_text())
            assert not alive(pid), described(pid)
            assert await store.usage() == []


async def test_a_cancel_while_the_process_is_being_opened_kills_its_group(
    tmp_path: Path, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation that lands while the process is being opened (asyncio
    awaits its pipes after the fork, and then kills only the process it forked)
    still kills the step's whole group: here a background child (seen under
    load: the orphan outlived the cancelled build)."""
    pids = tmp_path / "pids"
    run = node("exec", {
        "args": ["/bin/sh", "-c",
                 f'sleep 300 & echo "$$ $!" > "{pids}.tmp"; mv "{pids}.tmp" "{pids}"; wait'],
        "mounts": [{"input": None, "dest": "o", "output": 0}],
    })
    real_open = anyio.open_process
    let_go = anyio.Event()

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        process = await real_open(*args, **kwargs)
        try:
            await let_go.wait()  # the caller has not got the process yet
        except BaseException:
            # what asyncio does when the open is cancelled: kill the process only
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.aclose()
            raise
        return process

    monkeypatch.setattr(anyio, "open_process", slow_open)
    with anyio.fail_after(30):
        async with solving(tmp_path, sandbox="none") as (store, s):  # host pid files
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(s.solve, Definition.of(run))
                    await wait_until(pids.exists)
                    scope.cancel()
                    with anyio.CancelScope(shield=True):
                        # the cancellation reaches every task before the open ends
                        await anyio.wait_all_tasks_blocked()
                        let_go.set()
            assert scope.cancelled_caught
            shell, child = (int(p) for p in pids.read_text().split())
            await wait_until(lambda: not alive(shell))
            await wait_until(lambda: not alive(child), timeout=10)  # it sleeps 300 s
            assert os.listdir(store.root / "tmp") == []


@pytest.mark.anyio
async def test_process_output_is_progress_of_its_vertex(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    """stdout and stderr chunks reach every watching job as "log" events."""
    from solver.worker import Worker, run

    state = run(
        [sys.executable, "-c", "import sys; print('to out'); print('to err', file=sys.stderr)"],
        name="talk",
        rootfs=[str(p) for p in PY_ROOTFS],
    )
    with anyio.fail_after(20):
        async with Worker(tmp_path / "w") as worker, Solver(op_kinds=worker.op_kinds) as s:
            job = s.new_job()
            res = await job.build(state.definition().to_vertices(s.op_kinds))
            await res.release()
            await job.discard()
            logs = [
                (ev.name, ev.stream, ev.data) async for ev in job.status() if ev.status == "log"
            ]
    assert ("talk", 1, b"to out\n") in logs
    assert ("talk", 2, b"to err\n") in logs


@pytest.mark.anyio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_killing_a_step_kills_children_that_left_its_session() -> None:
    """A step's child in a session of its own (as a sandbox's processes are, by
    bubblewrap's --new-session) is out of reach of the group signal; the kill
    takes the process tree first and kills what is left of it."""
    import subprocess

    from solver.worker._exec import _kill, _start_time

    token = f"{os.getpid()}{anyio.current_time():.0f}"
    process = await anyio.open_process(
        ["/bin/sh", "-c", f"setsid sleep 7{token} & sleep 8{token}; wait"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def sleepers() -> list[int]:
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f"sleep\0007{token}".encode() in f.read():
                            found.append(int(pid))
                except OSError:
                    pass
        return found

    with anyio.fail_after(10):
        while not sleepers():  # noqa: ASYNC110
            await anyio.sleep(0.01)
    (escaped,) = sleepers()
    assert os.getsid(escaped) != os.getsid(process.pid)  # out of the group's reach
    with anyio.CancelScope(shield=True):
        await _kill(process)
    await process.aclose()
    with anyio.fail_after(10):
        while _start_time(escaped) is not None and sleepers():  # noqa: ASYNC110
            await anyio.sleep(0.01)
    assert sleepers() == []
