"""The buildfile frontend (frontends.buildfile): the build file format, platforms
that share one reference, attestations that point at outputs, and the same
build function through the forwarder, the gateway and the command line."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import anyio
import pytest

from frontends import BuildResult, Client
from frontends.buildfile import (
    PROVENANCE_PATH,
    BuildfileError,
    Platform,
    build,
    group_platforms,
    inputs_for,
    parse,
    parse_platforms,
)
from frontends.forwarder import Forwarder
from frontends.gateway import Gateway, InProcessGateway
from solver import Definition, Frontend, Result, SolveError, Solver, SolveRequest, SolveResult
from solver.cli import main
from solver.testing import HandleTracker
from solver.worker import SnapshotView, State, Worker

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "buildfile"

DEMO = """
[build]
name = "demo"
version-file = "VERSION"

[args]
WHO = "world"

[[copy]]
src = "src"
dest = "src"

[[file]]
path = "notes.txt"
content = "notes\\n"

[[step]]
name = "make info"
run = '''
mkdir -p out
echo "$WHO $VERSION $TARGETPLATFORM $TARGETARCH" > out/info.txt
cat src/a.txt >> out/info.txt
echo "$TARGETPLATFORM" >> {log}
'''

[output]
paths = ["out", "notes.txt"]
"""


def demo_context(log: Path, text: str = DEMO, version: str = "2.0.1\n") -> Definition:
    files = {"Buildfile.toml": text.replace("{log}", str(log)), "src/a.txt": "alpha\n"}
    if version:
        files["VERSION"] = version
    return State.inline(files, name="context").definition()


@contextlib.asynccontextmanager
async def open_solver(tmp_path: Path, **frontends: Frontend) -> AsyncIterator[Solver]:
    async with (
        Worker(tmp_path / "snapshots", sandbox="none") as worker,
        Solver(op_kinds=worker.op_kinds, frontends=frontends) as solver,
    ):
        yield solver


def request(
    context: Definition, frontend: str = "buildfile", **opts: str
) -> SolveRequest:
    return SolveRequest(
        frontend=frontend, frontend_opts=opts, frontend_inputs={"context": context}
    )


def view(ref: Result) -> SnapshotView:
    files = ref.sys
    assert isinstance(files, SnapshotView)
    return files


async def text_of(result: SolveResult, key: str, path: str) -> str:
    return (await view(result.refs[key]).read_bytes(path)).decode()


def snapshot(ref: Result) -> str:
    return view(ref).id


# -- the build file --------------------------------------------------------------------------


def test_parse_reads_every_section() -> None:
    bf = parse(DEMO.encode())
    assert bf.name == "demo"
    assert bf.version_file == "VERSION"
    assert bf.args == {"WHO": "world"}
    assert [c.src for c in bf.copies] == ["src"]
    assert [(f.path, f.mode) for f in bf.files] == [("notes.txt", 0o644)]
    assert bf.steps[0].name == "make info"
    assert bf.steps[0].args[:2] == ("sh", "-c")
    assert bf.output == ("out", "notes.txt")
    assert bf.digest.startswith("sha256:")
    assert len(bf.digest) == 71
    assert parse(b'[[step]]\nrun = ["echo", "hi"]\n').steps[0].args == ("echo", "hi")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[build\nname = 'x'\n", r"Buildfile.toml: invalid TOML: .*\(at line 1, column 7\)"),
        ("[bulid]\n", r"the file: unknown key 'bulid'; known keys: args, build, copy, env, "
         r"file, output, step"),
        ("[build]\nplatform = ['linux/amd64']\n",
         r"\[build\]: unknown key 'platform'; known keys: name, platforms, version-file"),
        ("[[step]]\nrun = 'true'\n[[step]]\ncomand = 'x'\n",
         r"\[\[step\]\] #2: unknown key 'comand'; known keys: env, name, run, workdir"),
        ("[build]\nplatforms = ['linux/amd46']\n",
         r"\[build\] key 'platforms': unknown platform 'linux/amd46' \(did you mean "
         r"'linux/amd64'\?\); known platforms: linux/386, "),
        ("[build]\nplatforms = ['linux/amd64', 'linux/x86_64']\n",
         r"platform 'linux/amd64' is given twice"),
        ("[build]\nname = 3\n", r"\[build\] key 'name': must be a string, got an integer"),
        ("[[step]]\nrun = 5\n",
         r"\[\[step\]\] #1 key 'run': must be a command line \(a string, run with sh -c\) or"),
        ("[[step]]\nname = 'x'\n", r"\[\[step\]\] #1 key 'run': is required"),
        ("[env]\nTARGETPLATFORM = 'x'\n",
         r"\[env\]: 'TARGETPLATFORM' is set by the frontend and cannot be set here"),
        ("[args]\n'2X' = 'x'\n", r"\[args\]: '2X' is not a valid build argument name"),
        ("[[copy]]\ndest = 'a'\n", r"\[\[copy\]\] #1 key 'src': is required"),
        ("[[file]]\npath = 'a'\ncontent = ''\nmode = 0o17777\n",
         r"\[\[file\]\] #1 key 'mode': must be from 0o0 to 0o7777, got 0o17777"),
        ("copy = 1\n", r"'copy' must be an array of tables \(\[\[copy\]\]\), got an integer"),
        ("args = 1\n", r"Buildfile\.toml: \[args\]: must be a table, got an integer"),
        ("[output]\npaths = []\n", r"\[output\] key 'paths': must name at least one path"),
    ],
)
def test_parse_errors_name_the_table_and_key(text: str, message: str) -> None:
    with pytest.raises(BuildfileError, match=message):
        parse(text.encode())


def test_parse_refuses_non_utf8_and_huge_files() -> None:
    with pytest.raises(BuildfileError, match=r"Buildfile\.toml: not UTF-8 text"):
        parse(b"\xff\xfe")
    with pytest.raises(BuildfileError, match="a build file may have at most 1048576"):
        parse(b"#" * (1 << 20 + 1))


def test_platforms_group_by_binary_compatibility() -> None:
    asked = parse_platforms(
        ["linux/amd64", "linux/arm64", "linux/i386", "linux/arm/v7", "linux/arm/v6"], "test"
    )
    builds = group_platforms(asked)
    assert [(b.target.name, [p.name for p in b.serves]) for b in builds] == [
        ("linux/386", ["linux/amd64", "linux/386"]),
        ("linux/arm64", ["linux/arm64"]),
        ("linux/arm/v6", ["linux/arm/v7", "linux/arm/v6"]),
    ]
    assert Platform.parse("linux/arm").env() == {
        "TARGETPLATFORM": "linux/arm/v7",
        "TARGETOS": "linux",
        "TARGETARCH": "arm",
        "TARGETVARIANT": "v7",
    }
    with pytest.raises(SolveError, match="test: no platforms given"):
        parse_platforms([" ", ""], "test")


# -- through the forwarder -------------------------------------------------------------------


@pytest.mark.anyio
async def test_compatible_platforms_share_one_reference(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    log = tmp_path / "runs.log"
    returned: list[BuildResult] = []

    async def spy(client: Client) -> BuildResult:
        result = await build(client)
        returned.append(result)
        return result

    async with open_solver(tmp_path, buildfile=Forwarder(spy)) as solver:
        req = request(demo_context(log), platforms="linux/amd64,linux/386,linux/arm64")
        async with await solver.solve(req) as result:
            # the frontend returned one reference under both x86 keys
            (built,) = returned
            assert built.refs["linux/amd64"] is built.refs["linux/386"]
            assert built.refs["linux/arm64"] is not built.refs["linux/386"]
            assert built.ref is None
            # the solver gave one handle per occurrence, on the same snapshot
            assert list(result.refs) == ["linux/amd64", "linux/386", "linux/arm64"]
            amd64, i386, arm64 = result.refs.values()
            assert amd64 is not i386
            assert snapshot(amd64) == snapshot(i386) != snapshot(arm64)
            assert await text_of(result, "linux/amd64", "out/info.txt") == (
                "world 2.0.1 linux/386 386\nalpha\n"
            )
            assert await text_of(result, "linux/arm64", "out/info.txt") == (
                "world 2.0.1 linux/arm64 arm64\nalpha\n"
            )
            assert await text_of(result, "linux/386", "notes.txt") == "notes\n"
            assert json.loads(result.metadata["buildfile.builds"]) == {
                "linux/amd64": "linux/386", "linux/386": "linux/386", "linux/arm64": "linux/arm64"
            }
            assert json.loads(result.metadata["buildfile.platforms"]) == [
                "linux/amd64", "linux/386", "linux/arm64"
            ]
            assert result.metadata["buildfile.version"] == b"2.0.1"
            assert result.metadata["buildfile.digest"] == parse(
                DEMO.replace("{log}", str(log)).encode()
            ).digest.encode()
    # the shared build ran once; the other family once
    assert sorted((await anyio.Path(log).read_text()).split()) == ["linux/386", "linux/arm64"]
    # every handle (refs, attestation refs, proxies and their halves, the cache's
    # copies) was released, once
    assert handle_tracker.live == []
    assert handle_tracker.double_releases == []
    assert handle_tracker.released_count == handle_tracker.created_count >= 6


@pytest.mark.anyio
async def test_attestation_points_at_the_output(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    returned: list[BuildResult] = []

    async def spy(client: Client) -> BuildResult:
        result = await build(client)
        returned.append(result)
        return result

    async with open_solver(tmp_path, buildfile=Forwarder(spy)) as solver:
        req = request(demo_context(tmp_path / "log"), platforms="linux/386,linux/amd64/v2")
        async with await solver.solve(req) as result:
            (built,) = returned
            for key in ("linux/386", "linux/amd64/v2"):
                (frontend_att,) = built.attestations[key]
                assert frontend_att.ref is built.refs[key]  # the same reference again
                (att,) = result.attestations[key]
                assert att.kind == "provenance"
                assert att.path == PROVENANCE_PATH
                assert att.ref is not None
                assert att.ref is not result.refs[key]
                assert snapshot(att.ref) == snapshot(result.refs[key])
                assert att.metadata["platform"] == key.encode()
                assert att.metadata["build-platform"] == b"linux/386"
                record = json.loads(await view(att.ref).read_bytes(att.path))
                assert record["platform"] == "linux/386"
                assert record["serves"] == ["linux/386", "linux/amd64/v2"]
                assert record["version"] == "2.0.1"
                assert record["args"] == {"WHO": "world"}
                assert record["steps"][0]["name"] == "make info"
    assert handle_tracker.live == []


@pytest.mark.anyio
async def test_one_platform_is_also_the_main_ref(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    text = DEMO.replace('name = "demo"', 'name = "demo"\nplatforms = ["linux/riscv64"]')
    async with open_solver(tmp_path, buildfile=Forwarder(build)) as solver:
        # the file's default platforms, and a build argument
        req = request(demo_context(tmp_path / "log", text), **{"build-arg:WHO": "you"})
        async with await solver.solve(req) as result:
            assert list(result.refs) == ["linux/riscv64"]
            assert result.ref is not None
            assert snapshot(result.ref) == snapshot(result.refs["linux/riscv64"])
            info = await text_of(result, "linux/riscv64", "out/info.txt")
            assert info.startswith("you 2.0.1 linux/riscv64 riscv64\n")


@pytest.mark.anyio
async def test_buildfile_input_and_filename_option(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    (tmp_path / "ctx" / "sub").mkdir(parents=True)
    (tmp_path / "ctx" / "VERSION").write_text("0.1\n")
    (tmp_path / "ctx" / "src").mkdir()
    (tmp_path / "ctx" / "src" / "a.txt").write_text("from disk\n")
    path = tmp_path / "ctx" / "sub" / "other.toml"
    path.write_text(DEMO.replace("{log}", str(tmp_path / "log")))
    opts, inputs = inputs_for(path)
    assert opts == {"filename": "other.toml"}
    assert set(inputs) == {"context", "buildfile"}
    async with open_solver(tmp_path, buildfile=Forwarder(build)) as solver:
        # the context is the file's directory: it has no VERSION there
        req = SolveRequest(frontend="buildfile", frontend_opts={**opts, "platforms": "linux/s390x"},
                           frontend_inputs=inputs)
        with pytest.raises(BuildfileError, match="cannot read version-file 'VERSION' from the "
                           "build context: reading 'VERSION' in reference"):
            await solver.solve(req)
        inputs["context"] = State.local(tmp_path / "ctx").definition()
        async with await solver.solve(req) as result:
            info = await text_of(result, "linux/s390x", "out/info.txt")
            assert info == "world 0.1 linux/s390x s390x\nfrom disk\n"
    with pytest.raises(BuildfileError, match="no such build file"):
        inputs_for(tmp_path)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("opts", "version", "message"),
    [
        ({"platforms": "linux/amd64,linux/sparc"}, "1",
         r"option 'platforms': unknown platform 'linux/sparc'; known platforms: "),
        ({"platform": "linux/amd64"}, "1",
         r"unknown option 'platform' for the buildfile frontend; it takes filename, platforms "
         r"and build-arg:NAME"),
        ({"build-arg:WHOM": "x"}, "1",
         r"option 'build-arg:WHOM': Buildfile.toml declares no argument 'WHOM' in \[args\] "
         r"\(declared: WHO\)"),
        ({"filename": "../x"}, "1", r"option 'filename' must be a path inside"),
        ({"filename": "nope.toml"}, "1",
         r"cannot read the build file 'nope.toml': reading 'nope.toml' in reference"),
        ({}, "two words\n", r"version-file 'VERSION' holds 'two words'; a version is 1 to 128"),
        ({}, "", r"cannot read version-file 'VERSION' from the build context"),
    ],
)
async def test_option_and_input_errors(
    tmp_path: Path,
    handle_tracker: HandleTracker,
    opts: Mapping[str, str],
    version: str,
    message: str,
) -> None:
    async with open_solver(tmp_path, buildfile=Forwarder(build)) as solver:
        context = demo_context(tmp_path / "log", version=version)
        with pytest.raises(BuildfileError, match=message):
            await solver.solve(request(context, **opts))


@pytest.mark.anyio
async def test_no_input_is_an_error(tmp_path: Path, handle_tracker: HandleTracker) -> None:
    async with open_solver(tmp_path, buildfile=Forwarder(build)) as solver:
        with pytest.raises(BuildfileError, match=r"needs an input 'context' .* or 'buildfile'"):
            await solver.solve(SolveRequest(frontend="buildfile"))


@pytest.mark.anyio
async def test_a_failing_step_fails_the_build_and_releases_everything(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    text = DEMO + "\n[[step]]\nname = \"check\"\nrun = \"echo broken >&2; exit 3\"\n"
    async with open_solver(tmp_path, buildfile=Forwarder(build)) as solver:
        req = request(demo_context(tmp_path / "log", text), platforms="linux/amd64,linux/arm64")
        failure = r"(?s)exec 'demo linux/\w+: check': process sh -c .* exit code 3.*broken"
        with pytest.raises(SolveError, match=failure):
            await solver.solve(req)
    assert handle_tracker.live == []
    assert handle_tracker.double_releases == []


@pytest.mark.anyio
@pytest.mark.parametrize("through", ["forwarder", "gateway protocol"])
async def test_cancelled_while_a_step_runs_releases_everything(
    tmp_path: Path, handle_tracker: HandleTracker, through: str
) -> None:
    text = DEMO + '\n[[step]]\nname = "wait"\nrun = "echo ready; sleep 60"\n'
    frontend = Forwarder(build) if through == "forwarder" else InProcessGateway(build)
    async with open_solver(tmp_path, buildfile=frontend) as solver:
        job = solver.new_job()
        req = request(demo_context(tmp_path / "log", text), platforms="linux/amd64,linux/arm64")
        outcome: list[object] = []

        async def solve(scope: anyio.CancelScope) -> None:
            with scope:
                outcome.append(await solver.solve(req, job=job))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()
                tg.start_soon(solve, scope)
                async for event in job.status():
                    if event.status == "log" and event.data.startswith(b"ready"):
                        assert event.name.endswith(": wait")
                        scope.cancel()  # one step is running: cancel the whole solve
                        break
        assert outcome == []
        assert scope.cancelled_caught
        await job.discard()
    assert handle_tracker.live == []
    assert handle_tracker.double_releases == []


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of examples/buildfile (so that the test owns the build context)."""
    path = tmp_path / "example"
    shutil.copytree(EXAMPLE, path)
    return path


def test_cli_builds_in_process(
    tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = main([
        "build", "--frontend", "buildfile", "--opt", "platforms=linux/amd64,linux/386,linux/arm64",
        "--opt", "build-arg:GREETING=Hi", str(example), "--output", str(out),
        "--progress", "plain", "--cache-dir", str(tmp_path / "cache"),
    ])
    err = capsys.readouterr().err
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        ".solver-output.json",  # what the export wrote, for the next build into out
        "linux_386", "linux_386.attestations.json", "linux_amd64",
        "linux_amd64.attestations.json", "linux_arm64", "linux_arm64.attestations.json",
    ]
    assert (out / "linux_amd64" / "bin" / "hello").read_text() == (
        out / "linux_386" / "bin" / "hello"
    ).read_text()
    assert 'echo "Hi from hello 1.4.2 (linux/386)"' in (out / "linux_amd64/bin/hello").read_text()
    assert "(linux/arm64)" in (out / "linux_arm64" / "bin" / "hello").read_text()
    (att,) = json.loads((out / "linux_amd64.attestations.json").read_text())
    assert att["kind"] == "provenance"
    assert att["ref"] == "linux_amd64"
    assert att["file"] == "linux_amd64/.buildfile/provenance.json"
    assert att["metadata"]["build-platform"] == "linux/386"
    record = json.loads((out / att["file"]).read_text())
    assert record["serves"] == ["linux/amd64", "linux/386"]
    assert "hello linux/386: configure] DONE" in err
    assert "hello linux/arm64: test] | Hi from hello 1.4.2 (linux/arm64)" in err


def test_cli_frontend_errors(
    tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache"), "--progress", "plain"]
    assert main(["build", "--opt", "platforms=linux/amd64", str(example), *cache]) == 2
    assert "--opt and --allow-frontend-source need --frontend" in capsys.readouterr().err
    assert main(["build", "--frontend", "buildfile", "--opt", "platforms", str(example),
                 *cache]) == 1
    assert "--opt 'platforms': expected KEY=VALUE" in capsys.readouterr().err
    assert main(["build", "--frontend", "buildfile", str(tmp_path / "missing"), *cache]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    status = main(["build", "--frontend", "buildfile", "--opt", "platforms=linux/amd64,linux/arm64",
                   str(example / "Buildfile.toml"), "--output",
                   f"type=tar,dest={tmp_path / 'x.tar'}", *cache])
    assert status == 1
    assert "a tar holds one: export them to a directory" in capsys.readouterr().err
    (example / "Buildfile.toml").write_text("[build\n")
    assert main(["build", "--frontend", "buildfile", str(example), *cache]) == 1
    assert "error: Buildfile.toml: invalid TOML" in capsys.readouterr().err


def test_cli_one_platform_to_a_tar(
    tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tarfile

    dest = tmp_path / "hello.tar"
    status = main(["build", "--frontend", "buildfile", "--opt", "platforms=linux/arm64",
                   str(example / "Buildfile.toml"), "--output", f"type=tar,dest={dest}",
                   "--cache-dir", str(tmp_path / "cache"), "--progress", "plain"])
    assert status == 0, capsys.readouterr().err
    with tarfile.open(dest) as tar:
        assert "bin/hello" in tar.getnames()



# -- through the gateway ---------------------------------------------------------------------

PROGRAM = shlex.join([sys.executable, "-m", "frontends.buildfile"])


async def check_three_platforms(result: SolveResult, log: Path) -> None:
    assert list(result.refs) == ["linux/amd64", "linux/386", "linux/arm64"]
    amd64, i386, arm64 = result.refs.values()
    assert snapshot(amd64) == snapshot(i386) != snapshot(arm64)
    assert await text_of(result, "linux/amd64", "out/info.txt") == (
        "world 2.0.1 linux/386 386\nalpha\n"
    )
    for key, ref in result.refs.items():
        (att,) = result.attestations[key]
        assert att.ref is not None
        assert snapshot(att.ref) == snapshot(ref)
        record = json.loads(await view(att.ref).read_bytes(att.path))
        assert record["platform"] == ("linux/arm64" if key == "linux/arm64" else "linux/386")
    assert result.metadata["buildfile.version"] == b"2.0.1"
    assert sorted((await anyio.Path(log).read_text()).split()) == ["linux/386", "linux/arm64"]


@pytest.mark.anyio
async def test_through_the_gateway_protocol_in_process(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    log = tmp_path / "runs.log"
    async with open_solver(tmp_path, buildfile=InProcessGateway(build)) as solver:
        req = request(demo_context(log), platforms="linux/amd64,linux/386,linux/arm64")
        async with await solver.solve(req) as result:
            await check_three_platforms(result, log)
    assert handle_tracker.live == []
    assert handle_tracker.released_count == handle_tracker.created_count


@pytest.mark.anyio
async def test_through_the_gateway_program(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    log = tmp_path / "runs.log"
    gateway = Gateway(allowed_sources=[PROGRAM])
    async with open_solver(tmp_path, gateway=gateway) as solver:
        req = request(demo_context(log), "gateway", source=PROGRAM,
                      platforms="linux/amd64,linux/386,linux/arm64")
        async with await solver.solve(req) as result:
            await check_three_platforms(result, log)
        # the program's own errors come back with their message
        bad = request(demo_context(log, "[[step]]\ncomand = 'x'\n"), "gateway", source=PROGRAM)
        with pytest.raises(SolveError, match=r"\[\[step\]\] #1: unknown key 'comand'"):
            await solver.solve(bad)
    assert handle_tracker.live == []
    assert handle_tracker.released_count == handle_tracker.created_count


def test_cli_builds_through_the_gateway(
    tmp_path: Path, example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["build", "--frontend", "gateway", "--opt", "platforms=linux/amd64,linux/386",
            str(example), "--progress", "plain", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--opt", "source=python -m frontends.buildfile",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        ".solver-output.json",
        "linux_386", "linux_386.attestations.json", "linux_amd64",
        "linux_amd64.attestations.json",
    ]
    assert "(linux/386)" in (out / "linux_amd64" / "bin" / "hello").read_text()
    assert "hello linux/386: test] | Hello from hello 1.4.2 (linux/386)" in err
    # only the built-in program, and those allowed on the command line
    assert main([*args, "--opt", f"source={PROGRAM} --x"]) == 1
    assert "is not allowed; allowed sources: " in capsys.readouterr().err
    assert main([*args, "--opt", f"source={PROGRAM} --x",
                 "--allow-frontend-source", f"{PROGRAM} --x"]) == 0, capsys.readouterr().err
