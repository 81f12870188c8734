"""The sandbox of ``exec`` steps (``solver.worker._sandbox``, issue 16): what a step
can see and do, its limits, secrets, ``sandbox="none"``, and the ``bwrap`` command
line. The end-to-end tests need ``bwrap`` and are skipped without it (``.ci/run``
installs it)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from solver import ProgressEvent, SolveError, Solver
from solver.testing import HandleTracker
from solver.worker import (
    DEFAULT_ROOTFS,
    SANDBOX_ROOT,
    SandboxMode,
    SecretSource,
    State,
    Worker,
    _exec as exec_module,
    run,
)
from solver.worker._exec import _parse, cache_digest
from solver.worker._sandbox import RootfsEntry, SandboxSpec, bwrap_argv, limit_prefix

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed")

PY_ROOTFS = list(dict.fromkeys([*DEFAULT_ROOTFS, sys.prefix, sys.base_prefix]))


@asynccontextmanager
async def solver(
    tmp_path: Path,
    sandbox: SandboxMode = "bwrap",
    secrets: dict[str, SecretSource] | None = None,
) -> AsyncIterator[tuple[Worker, Solver]]:
    """A worker on ``tmp_path/w`` and a solver using it; on exit, nothing of an
    exec may be left in the store's ``tmp/``."""
    async with (
        Worker(tmp_path / "w", sandbox=sandbox, secrets=secrets) as worker,
        Solver(worker=worker) as s,
    ):
        yield worker, s
        assert os.listdir(worker.store.root / "tmp") == []


async def build(s: Solver, state: State) -> dict[str, str]:
    """Solve ``state``; its files as text (symlinks as ``-> target``)."""
    out: dict[str, str] = {}
    async with await s.solve(state.definition()) as res:
        view = res.ref.sys
        for st in await view.walk():
            if st.is_file:
                out[st.path] = (await view.read_bytes(st.path)).decode("utf-8", "replace")
            elif st.is_symlink:
                out[st.path] = f"-> {st.linkname}"
    return out


async def failure(s: Solver, state: State) -> str:
    with pytest.raises(SolveError) as info:
        await s.solve(state.definition())
    return str(info.value)


def sh(script: str, **kw: object) -> State:
    return run(["sh", "-c", script], **kw)  # type: ignore[arg-type]


def processes_with(token: str) -> list[int]:
    """Host processes whose command line contains ``token``."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


async def wait_until(predicate: object, timeout: float = 10) -> None:
    assert callable(predicate)
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


# -- the command line (pure) ------------------------------------------------------------------


def spec(**kw: object) -> SandboxSpec:
    base: dict[str, object] = {
        "args": ("cc", "-c", "a.c"),
        "root": "/store/tmp/exec-1/root",
        "cwd": ("src",),
        "env": {"PATH": "/usr/bin", "SOLVER_ROOT": SANDBOX_ROOT},
        "rootfs": (RootfsEntry("/usr"), RootfsEntry("/bin", "usr/bin")),
        "readonly": (("in",), ("deps", "lib")),
    }
    base.update(kw)
    return SandboxSpec(**base)  # type: ignore[arg-type]


def pairs(argv: Sequence[str], flag: str, n: int = 1) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + n]) for i, a in enumerate(argv) if a == flag]


def test_bwrap_argv_isolates_everything_by_default() -> None:
    argv = bwrap_argv("/usr/bin/bwrap", spec())
    sep = argv.index("--")
    opts, args = argv[:sep], argv[sep + 1 :]
    assert argv[0] == "/usr/bin/bwrap"
    assert args == ["cc", "-c", "a.c"]
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in opts
    assert "--share-net" not in opts
    assert pairs(opts, "--cap-drop") == [("ALL",)]
    assert pairs(opts, "--cap-add") == []  # not root
    assert pairs(opts, "--symlink", 2) == [("usr/bin", "/bin")]
    assert pairs(opts, "--ro-bind", 2) == [
        ("/usr", "/usr"),
        ("/store/tmp/exec-1/root/in", f"{SANDBOX_ROOT}/in"),
        ("/store/tmp/exec-1/root/deps/lib", f"{SANDBOX_ROOT}/deps/lib"),
    ]
    assert pairs(opts, "--bind", 2) == [("/store/tmp/exec-1/root", SANDBOX_ROOT)]
    assert pairs(opts, "--tmpfs") == [("/tmp",)]
    assert pairs(opts, "--proc") == [("/proc",)]
    assert pairs(opts, "--dev") == [("/dev",)]
    assert pairs(opts, "--chdir") == [(f"{SANDBOX_ROOT}/src",)]
    assert pairs(opts, "--setenv", 2) == [("PATH", "/usr/bin"), ("SOLVER_ROOT", SANDBOX_ROOT)]
    # the private /tmp comes before the system root (a tool below /tmp stays
    # visible); the read-only root is remounted after everything is in place
    assert opts.index("--tmpfs") < opts.index("--ro-bind")
    assert opts.index("--remount-ro") > max(i for i, a in enumerate(opts) if a == "--ro-bind")
    assert opts.index("--clearenv") < opts.index("--setenv")


def test_bwrap_argv_network_secrets_and_root() -> None:
    argv = bwrap_argv(
        "bwrap", spec(network="host", secrets={"tok": "/s/tok", "a": "/s/a"}, as_root=True)
    )
    opts = argv[: argv.index("--")]
    assert "--share-net" in opts
    assert ("/s/a", "/run/secrets/a") in pairs(opts, "--ro-bind", 2)
    assert ("/s/tok", "/run/secrets/tok") in pairs(opts, "--ro-bind", 2)
    caps = {c for (c,) in pairs(opts, "--cap-add")}
    assert "CAP_DAC_OVERRIDE" in caps
    assert not caps & {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"}
    # a read-only mount at the root itself
    argv = bwrap_argv("bwrap", spec(readonly=((),), cwd=()))
    assert ("/store/tmp/exec-1/root", SANDBOX_ROOT) in pairs(argv, "--ro-bind", 2)
    assert pairs(argv, "--chdir") == [(SANDBOX_ROOT,)]


def test_limit_prefix() -> None:
    assert limit_prefix("prlimit", memory=None, processes=None) == []
    assert limit_prefix("/p", memory=10, processes=5) == ["/p", "--as=10", "--nproc=5", "--"]


def test_cache_key_has_the_sandbox_root_and_network_but_not_limits() -> None:
    def key(sandbox: SandboxMode = "bwrap", **fields: object) -> str:
        payload = {"args": ["true"], **fields}
        return cache_digest(payload, _parse(payload), sandbox)  # type: ignore[arg-type]

    plain = key()
    assert key(rootfs=list(DEFAULT_ROOTFS)) != plain  # the payload differs...
    assert key(rootfs=["/usr"]) != key(rootfs=["/usr", "/etc/passwd"])
    assert key(network="host") != plain
    assert key(sandbox="none") != plain
    assert key(limits={"timeout": 5, "processes": 9}) == plain
    assert key(secrets=["tok"]) != plain  # the id is; a secret's contents never are
    digest = _parse({"args": ["true"]})
    assert digest.rootfs == DEFAULT_ROOTFS
    assert digest.network == "none"


def test_run_builder_writes_only_what_differs_from_the_defaults() -> None:
    plain = run(["true"]).output.node.op.payload
    assert set(plain) == {"args", "env", "cwd", "mounts"}
    full = run(
        ["true"], rootfs=["/usr"], network="host", timeout=5, memory=10**8, processes=9,
        secrets=["tok"],
    ).output.node.op.payload
    assert full["rootfs"] == ["/usr"]
    assert full["network"] == "host"
    assert full["limits"] == {"timeout": 5, "memory": 10**8, "processes": 9}
    assert full["secrets"] == ["tok"]


def test_worker_rejects_a_bad_sandbox_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sandbox must be 'bwrap' or 'none'"):
        Worker(tmp_path, sandbox="docker")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="secret 'x' must be bytes or a file path"):
        Worker(tmp_path, secrets={"x": 5})  # type: ignore[dict-item]


# -- what a step sees -------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_a_host_file_outside_the_mounts_is_not_visible(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host = tmp_path / "host-secret.txt"
    host.write_text("do not read")
    async with solver(tmp_path) as (_, s):
        msg = await failure(s, sh(f"cat '{host}'"))
        assert "No such file or directory" in msg
        # the caller's home, the store, and the rest of /etc are not there either
        seen = await build(s, sh(
            f"for p in '{tmp_path}' /root /etc/hostname /etc/shadow /home '{sys.prefix}'; do "
            'test -e "$p" && echo "$p"; done > seen.txt; ls / > root.txt; true'
        ))
        assert seen["seen.txt"] == ""
        top = set(seen["root.txt"].split())
        assert top <= {"bin", "build", "dev", "etc", "lib", "lib32", "lib64", "libx32",
                       "proc", "sbin", "tmp", "usr"}


@needs_bwrap
@pytest.mark.anyio
async def test_writes_reach_only_the_outputs(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    outside = tmp_path / "outside.txt"
    src = State.inline({"in.txt": "input"})
    async with solver(tmp_path) as (_, s):
        # a host path, the system root, the sandbox's own root directory
        for target in (outside, "/usr/owned.txt", "/owned.txt", "/etc/owned.txt"):
            msg = await failure(s, sh(f"echo x > '{target}'"))
            assert "exit code" in msg
        assert not outside.exists()
        assert not os.path.exists("/usr/owned.txt")  # noqa: ASYNC240
        # a read-only mount cannot be written, even by root (it is a read-only bind)
        step = run(
            ["sh", "-c", "chmod u+w in in/in.txt; echo x >> in/in.txt"],
            mounts={"in": src}, readonly=["in"],
        )
        assert "Read-only file system" in await failure(s, step)
        # /tmp and a scratch mount are writable, and nothing of them is kept
        out = await build(s, run(
            ["sh", "-c", "echo t > /tmp/t && echo s > scratch/s && cat /tmp/t scratch/s > r"],
            mounts={"scratch": State.scratch()},
        ))
        assert out == {"r": "t\ns\n"}
        async with await s.solve(src.definition()) as res:
            assert await res.ref.sys.read_bytes("in.txt") == b"input"


@needs_bwrap
@pytest.mark.anyio
async def test_no_network_unless_the_op_asks_for_host_network(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash (for /dev/tcp) is not installed")
    received: list[bytes] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            received.append(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    connect = ["bash", "-c", f"echo hello > /dev/tcp/127.0.0.1/{port} && echo sent > r"]
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with solver(tmp_path) as (_, s):
            msg = await failure(s, run(connect, name="no net"))
            assert "exit code 1" in msg
            assert received == []
            out = await build(s, run(connect, network="host", name="host net"))
            assert out == {"r": "sent\n"}
            await wait_until(lambda: received == [b"hello\n"])
        tg.cancel_scope.cancel()


@needs_bwrap
@pytest.mark.anyio
@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
async def test_only_declared_environment_variables(
    tmp_path: Path, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch,
    sandbox: SandboxMode,
) -> None:
    monkeypatch.setenv("SOLVER_TEST_LEAK", "leaked-value")
    async with solver(tmp_path, sandbox=sandbox) as (_, s):
        out = await build(s, run(
            ["sh", "-c", 'echo "[$SOLVER_TEST_LEAK]" > leak.txt; env > env.txt'],
            env={"DECLARED": "yes", "LANG": "C"},
        ))
    assert out["leak.txt"] == "[]\n"
    env = dict(line.split("=", 1) for line in out["env.txt"].splitlines())
    assert set(env) == {"DECLARED", "HOME", "LANG", "PATH", "PWD", "SOLVER_ROOT"}
    assert env["DECLARED"] == "yes"
    assert env["LANG"] == "C"  # the op's value wins over the fixed one
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if sandbox == "bwrap":
        assert env["SOLVER_ROOT"] == env["PWD"] == SANDBOX_ROOT
        assert env["HOME"] == "/tmp"
    else:
        assert env["HOME"] != os.environ.get("HOME")


# -- limits -------------------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_a_fork_bomb_is_bounded_by_the_process_limit(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    token = f"{os.getpid()}{time.monotonic_ns() % 10**6}"
    bomb = sh(
        f"n=0; while [ $n -lt 1000 ]; do sleep 3{token} & n=$((n+1)); done; echo $n",
        processes=64,
        name="bomb",
    )
    async with solver(tmp_path) as (_, s):
        start = time.monotonic()
        msg = await failure(s, bomb)
        if "cannot enforce the process limit" in msg:
            pytest.skip(msg)
        assert "it hit its process limit of 64 (a fork failed)" in msg
        assert time.monotonic() - start < 20
        # nothing of it is left running
        await wait_until(lambda: processes_with(f"sleep 3{token}") == [])
        # a step under the limit runs normally
        assert await build(s, sh("sleep 0 & sleep 0 & wait; echo ok > r", processes=64)) == {
            "r": "ok\n"
        }


@needs_bwrap
@pytest.mark.anyio
async def test_a_step_past_its_time_limit_is_killed(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    token = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
    async with solver(tmp_path) as (_, s):
        start = time.monotonic()
        msg = await failure(s, run(["sleep", f"1{token}"], timeout=1, name="slow"))
        assert "exec 'slow': process sleep" in msg
        assert "exceeded its time limit of 1s and was killed" in msg
        assert time.monotonic() - start < 10
        await wait_until(lambda: processes_with(f"1{token}") == [])


@needs_bwrap
@pytest.mark.anyio
async def test_a_memory_limit_fails_a_large_allocation(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    big = "dd if=/dev/zero of=/dev/null bs=256M count=1 && echo ok > r"
    async with solver(tmp_path) as (_, s):
        msg = await failure(s, sh(big, memory=64 * 2**20))
        assert f"it ran with a memory limit of {64 * 2**20} bytes" in msg
        assert "memory exhausted" in msg  # dd's own message
        assert await build(s, sh(big, memory=2**30)) == {"r": "ok\n"}


# -- a legitimate build -------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_a_c_compile_and_its_binary_run_in_the_sandbox(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = State.inline({
        "hello.c": '#include <stdio.h>\nint main(void) { puts("hello from C"); return 0; }\n',
    })
    built = run(["cc", "-O2", "-o", "hello", "hello.c"], root=src, name="compile", timeout=60)
    ran = run(["sh", "-c", "./hello > out.txt"], root=built, name="run")
    async with solver(tmp_path) as (_, s):
        out = await build(s, ran)
    assert out["out.txt"] == "hello from C\n"


@needs_bwrap
@pytest.mark.anyio
async def test_a_python_outside_the_system_root_runs_when_named_in_rootfs(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    code = ["-c", "import pathlib; pathlib.Path('v').write_text('py')"]
    async with solver(tmp_path) as (_, s):
        msg = await failure(s, run([sys.executable, *code]))
        assert f"cannot start {sys.executable}" in msg
        assert "'rootfs'" in msg
        assert await build(s, run([sys.executable, *code], rootfs=PY_ROOTFS)) == {"v": "py"}


# -- links -----------------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_links_made_in_the_sandbox_do_not_reach_outside(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (host_dir / "f").write_text("host")
    made = sh(
        f"ln -s '{host_dir}' escape; ln -s /etc/passwd pw; "
        "ln /etc/passwd hard 2>/dev/null || echo refused > hard.txt"
    )
    later = run(["sh", "-c", "echo owned > escape/owned"], root=made)
    copied = State.scratch().copy(made, "escape/f", "f")
    async with solver(tmp_path) as (_, s):
        out = await build(s, made)
        assert out == {"escape": f"-> {host_dir}", "pw": "-> /etc/passwd", "hard.txt": "refused\n"}
        await failure(s, later)
        await failure(s, copied)
    assert sorted(os.listdir(host_dir)) == ["f"]


# -- secrets ---------------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
async def test_secrets_are_files_and_never_recorded(
    tmp_path: Path, handle_tracker: HandleTracker, sandbox: SandboxMode
) -> None:
    value = "s3cr3t-" + "x" * 8
    file_secret = tmp_path / "token.txt"
    file_secret.write_text(value + "-file")
    # the step proves it read them without the test writing them into its script
    step = sh(
        "cd $SOLVER_SECRETS && sha256sum api tok > $SOLVER_ROOT/sums.txt",
        secrets=["api", "tok"],
        name="uses secrets",
    )
    sums = "".join(
        f"{hashlib.sha256(data.encode()).hexdigest()}  {name}\n"
        for name, data in (("api", value), ("tok", value + "-file"))
    )
    secrets: dict[str, SecretSource] = {"api": value.encode(), "tok": file_secret}
    events: list[ProgressEvent] = []
    async with solver(tmp_path, sandbox=sandbox, secrets=secrets) as (worker, s):
        job = s.new_job()
        res = await job.build(step.definition().to_vertices(s.op_kinds))
        await res.release()
        await job.discard()
        events = [ev async for ev in job.status()]
        out = await build(s, step)
        assert out == {"sums.txt": sums}
        root = worker.store.root
    assert value not in step.definition().to_json()
    assert all(value not in repr(ev) for ev in events)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            assert value.encode() not in (Path(dirpath) / name).read_bytes(), name
    async with solver(tmp_path / "other", sandbox=sandbox) as (_, s):
        msg = await failure(s, sh("true", secrets=["api"]))
        assert "secret 'api' is not provided" in msg


# -- sandbox="none" and a missing bwrap ------------------------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_sandbox_none_is_explicit_shows_in_progress_and_keys_apart(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host = tmp_path / "host.txt"
    host.write_text("visible")
    step = sh(f"cat '{host}' > r", name="unsandboxed")
    async with solver(tmp_path, sandbox="none") as (worker, s):
        assert "sandbox=none" in repr(worker)
        job = s.new_job()
        res = await job.build(step.definition().to_vertices(s.op_kinds))
        await res.release()
        await job.discard()
        logs = [ev.data async for ev in job.status() if ev.status == "log"]
        assert any(b"[sandbox=none]" in data for data in logs)
        assert await build(s, step) == {"r": "visible"}
    # the same worker root in the sandbox: a cache miss (different key), and it fails
    async with solver(tmp_path) as (_, s):
        assert "No such file or directory" in await failure(s, step)


@pytest.mark.anyio
async def test_a_missing_bwrap_fails_at_once_saying_how_to_install_it(
    tmp_path: Path, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exec_module, "find_bwrap", lambda: None)
    marker = tmp_path / "ran"
    async with solver(tmp_path) as (worker, s):
        msg = await failure(s, sh(f"touch '{marker}'", name="needs bwrap"))
        assert "exec 'needs bwrap': exec steps run in a sandbox" in msg
        assert "apt-get install bubblewrap" in msg
        assert 'Worker(sandbox="none")' in msg
        assert [i for i in await worker.store.usage() if i.description.get("kind") == "exec"] == []
    assert not marker.exists()


# -- cancellation and background processes in the sandbox ----------------------------------------


@needs_bwrap
@pytest.mark.anyio
async def test_cancelling_a_sandboxed_step_kills_all_of_it(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    token = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
    step = sh(f"sleep 2{token} & sleep 3{token} & echo started; wait")
    async with solver(tmp_path) as (_, s):
        with anyio.fail_after(20):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(s.solve, step.definition())
                    await wait_until(lambda: len(processes_with(token)) >= 2)
                    scope.cancel()
            await wait_until(lambda: processes_with(token) == [])
        # a background child does not keep a finished step alive
        with anyio.fail_after(10):
            assert await build(s, sh(f"sleep 4{token} & echo done > r")) == {"r": "done\n"}
        await wait_until(lambda: processes_with(token) == [])


@pytest.mark.anyio
async def test_a_sandbox_that_cannot_be_set_up_says_so(
    tmp_path: Path, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bwrap"  # what bwrap says where user namespaces are disabled
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(exec_module, "find_bwrap", lambda: str(fake))
    async with solver(tmp_path) as (_, s):
        msg = await failure(s, sh("true", name="step"))
    assert "exec 'step': the sandbox for sh -c true could not be set up: bwrap: No perm" in msg
    assert 'Worker(sandbox="none")' in msg
