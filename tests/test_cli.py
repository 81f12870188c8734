"""The command line (``python -m solver``), its progress renderers and exports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from solver import Definition, DefinitionError, SolveError, Solver
from solver.cli import main
from solver.cli._main import build_definition, parse_duration, parse_output, parse_size
from solver.cli._progress import JsonRenderer, PlainRenderer, make_renderer
from solver.worker import SnapshotStore, State, Worker, run
from solver.worker._export import export_to_dir, export_to_tar

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def graph() -> State:
    src = State.inline({"a.txt": "hello\n", "sub/c.txt": "sea\n"}).with_name("sources")
    return run(["sh", "-c", "echo made b; printf bee > b.txt"], root=src, name="make b")


def cli(*args: str, cache: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SOLVER_CACHE_DIR": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [PY, "-m", "solver", *args], env=env, input=stdin, capture_output=True, timeout=60
    )


@pytest.fixture
def defn_file(tmp_path: Path) -> Path:
    path = tmp_path / "graph.json"
    path.write_text(graph().definition().to_json())
    return path


def test_build_json_definition_to_dir(tmp_path: Path, defn_file: Path) -> None:
    out = tmp_path / "out"
    r = cli("build", str(defn_file), "--progress", "plain", "--output", str(out),
            cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert (out / "a.txt").read_text() == "hello\n"
    assert (out / "b.txt").read_text() == "bee"
    assert (out / "sub" / "c.txt").read_text() == "sea\n"
    assert os.access(out / "b.txt", os.W_OK)  # the exported files are writable
    assert r.stdout == b""
    err = r.stderr.decode()
    assert "#1 [sources] DONE" in err
    assert "#2 [make b] | made b" in err
    assert "#2 [make b] DONE" in err
    # building into it again replaces the earlier output; an entry the export did
    # not write is refused, unless overwrite=true
    r = cli("build", str(defn_file), "--progress", "plain", "--output", f"type=local,dest={out}",
            cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    (out / "mine.txt").write_text("mine")
    r = cli("build", str(defn_file), "--progress", "plain", "--output", f"type=local,dest={out}",
            cache=tmp_path / "cache")
    assert r.returncode == 1
    assert "'mine.txt' was not written by an export" in r.stderr.decode()
    r = cli("build", str(defn_file), "--progress", "plain",
            "--output", f"type=local,dest={out},overwrite=true", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert (out / "mine.txt").read_text() == "mine"


def test_build_python_file_to_tar(tmp_path: Path) -> None:
    build_py = tmp_path / "build.py"
    build_py.write_text(textwrap.dedent("""
        import sys
        from solver.worker import State, run

        def build():
            return State.inline({"x.txt": "ex"}).mkfile("y.txt", "why").with_name("files")

        if __name__ == "__main__":
            raise SystemExit("must not run")
    """))
    tar_path = tmp_path / "out.tar"
    r = cli("build", str(build_py), "--progress", "plain", "-o", f"type=tar,dest={tar_path}",
            "--cache-dir", str(tmp_path / "other"), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    with tarfile.open(tar_path) as tar:
        names = sorted(tar.getnames())
        assert names == ["x.txt", "y.txt"]
        member = tar.extractfile("y.txt")
        assert member is not None
        assert member.read() == b"why"
    assert (tmp_path / "other" / "snapshots").is_dir()
    assert not (tmp_path / "cache").exists()
    # the tar to stdout, and a top-level 'definition'
    build_py.write_text("from solver.worker import State\n"
                        "definition = State.inline({'z': 'zed'}).definition()\n")
    r = cli("build", str(build_py), "--progress", "json", "-o", "type=tar,dest=-",
            cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        assert tar.getnames() == ["z"]


def test_json_progress(tmp_path: Path, defn_file: Path) -> None:
    r = cli("build", str(defn_file), "--progress", "json", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    *events, summary = [json.loads(line) for line in r.stderr.decode().splitlines()]
    # one final event: the build's summary (docs/insight.md)
    assert summary["status"] == "summary"
    assert summary["summary"]["executed"] == summary["summary"]["ops"] > 0
    by_name: dict[str, list[str]] = {}
    for ev in events:
        assert {"vertex", "name", "status", "timestamp"} <= set(ev)
        by_name.setdefault(ev["name"], []).append(ev["status"])
    assert by_name["sources"] == ["started", "completed"]
    assert by_name["make b"][0] == "started"
    assert by_name["make b"][-1] == "completed"
    logs = [ev for ev in events if ev["status"] == "log"]
    assert logs
    assert logs[0]["data"] == "made b\n"
    assert logs[0]["stream"] == 1


@pytest.mark.anyio
async def test_second_build_is_cached(tmp_path: Path) -> None:
    # The cache is in memory: a second build in the same solver is fully cached.
    defn = graph().definition()
    async with Worker(tmp_path / "snapshots") as worker, Solver(op_kinds=worker.op_kinds) as s:
        first, second = io.StringIO(), io.StringIO()
        await build_definition(s, defn, progress="json", progress_out=first)
        await build_definition(s, defn, progress="json", progress_out=second,
                               output=parse_output(str(tmp_path / "out")))
    statuses = [json.loads(line)["status"] for line in second.getvalue().splitlines()]
    assert statuses == ["cached", "cached", "summary"]
    assert "completed" in first.getvalue()
    assert (tmp_path / "out" / "b.txt").read_text() == "bee"


def test_failing_exec(tmp_path: Path) -> None:
    build_py = tmp_path / "fail.py"
    build_py.write_text(textwrap.dedent("""
        from solver.worker import State, run
        definition = run(["sh", "-c", "echo boom >&2; exit 3"], root=State.scratch(),
                         name="fail step")
    """))
    r = cli("build", str(build_py), "--progress", "plain", "-o", str(tmp_path / "o"),
            cache=tmp_path / "cache")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "#1 [fail step] ERROR" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("solver: error: ")
    assert "exit code 3" in last
    assert "boom" in last
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_malformed_definition(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "ops": {}, "output": ["nope", 0]}')
    with pytest.raises(DefinitionError) as info:
        Definition.from_json(bad.read_text())
    r = cli("build", str(bad), cache=tmp_path / "cache")
    assert r.returncode == 1
    assert str(info.value) in r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()
    # also from stdin, and a Python file without a definition
    r = cli("build", "-", cache=tmp_path / "cache", stdin=b"[1]")
    assert r.returncode == 1
    assert b"must be a JSON object" in r.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    r = cli("build", str(empty), cache=tmp_path / "cache")
    assert r.returncode == 1
    assert b"neither a top-level 'definition'" in r.stderr


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("frobnicate", cache=tmp_path).returncode == 2
    assert main(["build"]) == 2
    assert main(["build", "x.json", "--progress", "fancy"]) == 2
    assert main(["build", "x.json", "--output", "type=zip,dest=a"]) == 2
    assert main(["build", "x.json", "--output", "type=tar"]) == 2
    assert main(["prune", "--keep-duration", "soon"]) == 2
    assert main(["build", str(tmp_path / "missing.json")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_du_and_prune(tmp_path: Path, defn_file: Path) -> None:
    cache = tmp_path / "cache"
    assert cli("build", str(defn_file), "--progress", "plain", cache=cache).returncode == 0
    r = cli("du", cache=cache)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["ID", "SIZE"]
    assert len(lines) == 8  # header, two snapshots, blank, kinds header, two kinds, total
    assert "source.inline: sources" in lines[1] + lines[2]
    assert lines[5].split()[:2] == ["exec", "1"]
    assert lines[6].split()[:2] == ["source.inline", "1"]
    assert lines[-1].startswith("Total:")
    assert "2 snapshot(s)" in lines[-1]
    r = cli("prune", "--keep-duration", "1h", cache=cache)
    assert r.returncode == 0
    assert "freed 0B in 0 snapshot(s)" in r.stdout.decode()
    r = cli("prune", cache=cache)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.count("deleted ") == 2
    assert "in 2 snapshot(s)" in out
    r = cli("du", "--cache-dir", str(cache), cache=tmp_path / "elsewhere")
    assert r.stdout.decode().splitlines()[-1].startswith("Total: 0B in 0 snapshot(s); ")


def seed_cache(cache: Path, specs: list[tuple[str, str, int, float]]) -> dict[str, str]:
    """Commit one snapshot per (kind, name, size, age in seconds) into the cache at
    ``cache``, each last used ``age`` seconds ago; return name -> id."""

    async def seed() -> dict[str, str]:
        now = time.time()
        clock = [now]
        made: dict[str, str] = {}
        async with SnapshotStore(cache / "snapshots", clock=lambda: clock[0]) as store:
            for kind, name, size, age in specs:
                clock[0] = now - age
                async with await store.new_mutable({"kind": kind, "name": name}) as m:
                    (m.path / "data").write_bytes(b"x" * size)
                    ref = await m.commit()
                await ref.release()
                made[name] = ref.id
        return made

    return anyio.run(seed)


SEED = [
    ("source.local", "src", 100, 86400.0),  # a day ago: the least recently used
    ("exec", "compile", 300, 3 * 3600.0),
    ("exec", "link", 200, 2 * 3600.0),
]


def test_du_shows_lru_order_kinds_and_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    made = seed_cache(cache, SEED)
    assert main(["du", "--cache-dir", str(cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == [
        made["src"][:12], made["compile"][:12], made["link"][:12]
    ]
    assert lines[1].split()[1:5] == ["100B", "1d", "ago", "no"]
    assert lines[1].endswith("source.local: src")
    assert lines[2].split()[1:4] == ["300B", "3h", "ago"]
    assert lines[4] == ""
    assert lines[5].split() == ["KIND", "SNAPSHOTS", "SIZE", "IN", "USE"]
    assert lines[6].split() == ["exec", "2", "500B", "0B"]
    assert lines[7].split() == ["source.local", "1", "100B", "0B"]
    assert lines[8].startswith("Total: 600B in 3 snapshot(s); ")
    assert lines[8].endswith(" free on the cache's file system")

    assert main(["du", "--verbose", "--cache-dir", str(cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ID", "SIZE", "LAST", "USED"]
    assert "CREATED" in lines[0]
    assert lines[1].split()[0] == made["src"]  # the full id

    assert main(["du", "--format", "json", "--cache-dir", str(cache)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in doc["snapshots"]] == [made["src"], made["compile"], made["link"]]
    assert doc["snapshots"][0]["kind"] == "source.local"
    assert doc["snapshots"][1]["label"] == "compile"
    assert doc["snapshots"][1]["in_use"] is False
    assert doc["kinds"] == {
        "exec": {"snapshots": 2, "size": 500, "in_use": 0},
        "source.local": {"snapshots": 1, "size": 100, "in_use": 0},
    }
    assert doc["total"] == {"snapshots": 3, "size": 600, "in_use": 0}
    assert isinstance(doc["free"], int)
    assert main(["du", "--format", "yaml"]) == 2


@pytest.mark.parametrize(
    ("flags", "deleted"),
    [
        ([], ["src", "compile", "link"]),
        (["--all"], ["src", "compile", "link"]),
        (["--keep-duration", "150m"], ["src", "compile"]),
        (["--keep-duration", "2d"], []),
        (["--max-used-space", "0.5kB"], ["src"]),
        (["--max-used-space", "200"], ["src", "compile"]),
        (["--max-used-space", "1GiB"], []),
        (["--filter", "kind=exec"], ["compile", "link"]),
        (["--filter", "description~=^li"], ["link"]),
        (["--filter", "kind==exec,description==compile", "--filter", "kind=source.local"],
         ["src", "compile"]),
        (["--all", "--filter", "kind!=exec"], ["src"]),
        (["--min-free-space", "1000000TB", "--reserved-space", "200B"], ["src", "compile"]),
        (["--min-free-space", "1B"], []),
        (["--reserved-space", "300"], ["src", "compile"]),
        (["--keep-duration", "150m", "--max-used-space", "1"], ["src", "compile"]),
    ],
)
def test_prune_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], deleted: list[str]
) -> None:
    cache = tmp_path / "cache"
    made = seed_cache(cache, SEED)
    assert main(["prune", *flags, "--cache-dir", str(cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == [made[name][:12] for name in deleted]
    assert all(line.startswith("deleted ") for line in lines[:-1])
    sizes = {"src": 100, "compile": 300, "link": 200}
    freed = sum(sizes[name] for name in deleted)
    assert lines[-1] == (
        f"Total: freed {freed}B in {len(deleted)} snapshot(s); {600 - freed}B left"
    )


def test_prune_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(tmp_path / "cache")
    for flags, message in [
        (["--max-used-space", "10XB"], "invalid size '10XB'"),
        (["--min-free-space=-1GB"], "invalid size '-1GB'"),
        (["--reserved-space", ""], "invalid size ''"),
        (["--keep-duration", "soon"], "invalid duration 'soon'"),
        (["--filter", "kin=exec"], "unknown field 'kin'"),
        (["--filter", "kind"], "expected FIELD==VALUE"),
        (["--filter", "description~=("], "bad regular expression"),
        (["--all", "--max-used-space", "1GB"], "cannot be combined with --max-used-space"),
        (["--all", "--keep-duration", "1h", "--reserved-space", "1"],
         "cannot be combined with --keep-duration, --reserved-space"),
    ]:
        assert main(["prune", *flags, "--cache-dir", cache]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "cache").exists()  # nothing was opened


# -- units -----------------------------------------------------------------------------


def test_parse_output_and_duration() -> None:
    assert parse_output("dir") == parse_output("type=local,dest=dir")
    assert parse_output("type=tar,dest=-").type == "tar"
    assert parse_output("type=local,dest=d,overwrite=true").overwrite
    for bad in ("type=tar", "type=local,dest=-", "dest=a,dest=b", "foo=1,dest=a", "x,dest=a"):
        with pytest.raises(ValueError):
            parse_output(bad)
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("0") == 0
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("1x")
    assert parse_size("4096") == 4096
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("10gb") == parse_size("10G") == parse_size(" 10 GB ") == 10**10
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5k") == 1500
    assert parse_size("2KiB") == 2048
    assert parse_size("1TiB") == 2**40
    assert parse_size("0") == 0
    for bad in ("", "GB", "-1GB", "10XB", "1e3", "1,5G", "1.2.3"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def _ev(vertex: str, name: str, status: str, t: float, **kw: object) -> object:
    from solver import ProgressEvent

    return ProgressEvent(vertex, name, status, t, **kw)  # type: ignore[arg-type]


def test_plain_and_json_renderers() -> None:
    out = io.StringIO()
    r = PlainRenderer(out)
    for ev in [
        _ev("v1", "one", "started", 10.0),
        _ev("v1", "one", "log", 10.1, data=b"par", stream=1),
        _ev("v1", "one", "log", 10.2, data=b"tial\nnext", stream=1),
        _ev("v1", "one", "completed", 10.3),
        _ev("v2", "two", "cached", 10.4),
        _ev("v3", "three", "error", 10.5, error="it\nbroke"),
    ]:
        r.handle(ev)  # type: ignore[arg-type]
    r.close()
    assert out.getvalue().splitlines() == [
        "#1 [one] STARTED",
        "#1 [one] | partial",
        "#1 | next",
        "#1 [one] DONE 0.3s",
        "#2 [two] CACHED",
        "#3 [three] ERROR it broke",
    ]
    out = io.StringIO()
    JsonRenderer(out).handle(_ev("v", "n", "log", 1.0, data=b"\xffx", stream=2))  # type: ignore[arg-type]
    assert json.loads(out.getvalue()) == {
        "vertex": "v", "name": "n", "status": "log", "timestamp": 1.0,
        "stream": 2, "data": "\ufffdx",
    }
    assert isinstance(make_renderer("auto", io.StringIO()), PlainRenderer)  # not a tty


@pytest.mark.anyio
async def test_export_functions(tmp_path: Path) -> None:
    state = State.inline({"d/f.txt": "f"}).mkdir("e")
    async with (
        Worker(tmp_path / "snapshots") as worker,
        Solver(op_kinds=worker.op_kinds) as s,
        await s.solve(state.definition()) as res,
    ):
        ref = res.ref
        assert ref is not None
        # the State builder makes no symlinks: add one to a copy of the snapshot
        mutable = await worker.store.new_mutable(base=ref)
        os.symlink("d/f.txt", mutable.path / "link")
        linked = await mutable.commit()
        try:
            dest = await export_to_dir(linked, tmp_path / "x" / "y")
            assert (dest / "link").is_symlink()
            assert os.readlink(dest / "link") == "d/f.txt"
            assert (dest / "e").is_dir()
            assert (dest / "d" / "f.txt").read_text() == "f"
            await export_to_dir(linked, dest)  # again: it replaces its own output
            (dest / "theirs").write_text("t")
            with pytest.raises(SolveError, match="'theirs' was not written by an export"):
                await export_to_dir(linked, dest)
            await export_to_dir(linked, dest, overwrite=True)
            await export_to_tar(linked, tmp_path / "t.tar")
            with tarfile.open(tmp_path / "t.tar") as tar:
                assert tar.getnames() == ["d", "d/f.txt", "e", "link"]
                assert tar.getmember("link").issym()
        finally:
            await linked.release()

    class NotASnapshot:
        id = "x"
        sys = "just a string"

        async def release(self) -> None: ...

        def clone(self) -> NotASnapshot:
            return self

    with pytest.raises(SolveError, match="not a snapshot of the built-in worker"):
        await export_to_dir(NotASnapshot(), tmp_path / "z")


def test_prune_releases_the_cache_records_of_what_it_deletes(
    tmp_path: Path, defn_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from solver.cache._sqlite import SQLiteCacheStorage

    cache = tmp_path / "cache"
    assert cli("build", str(defn_file), "--progress", "plain", cache=cache).returncode == 0

    async def result_ids() -> set[str]:
        storage = await SQLiteCacheStorage.open(cache / "snapshots" / "cache.db")
        try:
            return set(await storage.result_ids())
        finally:
            await storage.close()

    before = anyio.run(result_ids)
    assert len(before) == 2  # the source's and the exec's records
    assert main(["prune", "--filter", "kind=source.inline", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "in 1 snapshot(s)" in out
    after = anyio.run(result_ids)
    assert len(after) == 1
    assert after < before
    assert next(iter(before - after))[:12] in out  # the record of the deleted snapshot


# -- building into the same directory again (issue 20) ---------------------------------


def files_below(root: Path) -> dict[str, str]:
    """rel -> text of every file below ``root`` (the export manifest left out)."""
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".solver-output.json"
    }


def test_building_the_example_twice_into_one_directory(tmp_path: Path) -> None:
    # the report, word for word: the second run failed with "not empty"
    out = tmp_path / "out"
    runs = [
        cli("build", str(ROOT / "examples" / "build.py"), "--output", str(out),
            cache=tmp_path / "cache")
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert (out / "bin" / "app").is_file()


def test_a_rebuild_replaces_its_output_and_removes_what_is_gone(tmp_path: Path) -> None:
    build_py = tmp_path / "build.py"
    out = tmp_path / "out"

    def build(files: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        build_py.write_text(
            "from solver.worker import State\n"
            f"definition = State.inline({files!r}).definition()\n"
        )
        return cli("build", str(build_py), "--progress", "plain", "--output", str(out),
                   cache=tmp_path / "cache")

    r = build({"a.txt": "one\n", "old/x.txt": "x"})
    assert r.returncode == 0, r.stderr
    r = build({"a.txt": "two\n", "new/n.txt": "n"})
    assert r.returncode == 0, r.stderr
    assert files_below(out) == {"a.txt": "two\n", "new/n.txt": "n"}
    assert not (out / "old").exists()
    (out / "new" / "notes.txt").write_text("the user's")
    r = build({"a.txt": "three\n"})
    assert r.returncode == 1
    assert "'new/notes.txt' was not written by an export" in r.stderr.decode()
    assert files_below(out) == {"a.txt": "two\n", "new/n.txt": "n", "new/notes.txt": "the user's"}


def test_a_frontend_build_into_the_same_directory_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    example = tmp_path / "example"
    shutil.copytree(ROOT / "examples" / "buildfile", example)
    out = tmp_path / "out"
    args = ["build", "--frontend", "buildfile", "--opt", "platforms=linux/amd64", str(example),
            "--output", str(out), "--progress", "plain", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0, capsys.readouterr().err
    assert main([*args, "--opt", "build-arg:GREETING=Hi"]) == 0, capsys.readouterr().err
    assert "Hi from hello" in (out / "linux_amd64" / "bin" / "hello").read_text()
    assert (out / "linux_amd64.attestations.json").is_file()
    (out / "linux_amd64" / "extra").write_text("x")
    assert main(args) == 1
    assert "'linux_amd64/extra' was not written by an export" in capsys.readouterr().err
    assert "Hi from hello" in (out / "linux_amd64" / "bin" / "hello").read_text()


# -- --version -------------------------------------------------------------------------


def test_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import solver

    expected = f"solver {solver.__version__}\n"
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == expected
    r = cli("--version", cache=tmp_path / "cache")  # python -m solver
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == expected
    script = Path(PY).parent / "solver"  # the console script, when installed here
    if script.exists():
        r = subprocess.run([str(script), "--version"], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == expected


def test_version_without_installed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import solver
    from solver.cli._main import version_text

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version_text() == f"solver {solver.__version__}"


def test_sandbox_none_is_explicit_and_shown(tmp_path: Path) -> None:
    """``--sandbox none`` runs exec steps on the host: it must be asked for, and
    progress says so; the default runs them in the sandbox (a host path outside
    the system root is not visible there)."""
    outside = tmp_path / "host-only.txt"
    outside.write_text("on the host")
    build_py = tmp_path / "peek.py"
    build_py.write_text(textwrap.dedent(f"""
        from solver.worker import State, run
        definition = run(["sh", "-c", "cat {outside} > seen.txt"], root=State.scratch(),
                         name="peek")
    """))
    sandboxed = cli("build", str(build_py), "--progress", "plain", "-o", str(tmp_path / "a"),
                    cache=tmp_path / "cache")
    assert sandboxed.returncode == 1
    assert "No such file or directory" in sandboxed.stderr.decode()
    host = cli("build", str(build_py), "--progress", "plain", "--sandbox", "none",
               "-o", str(tmp_path / "b"), cache=tmp_path / "cache")
    assert host.returncode == 0, host.stderr.decode()
    assert "[sandbox=none]" in host.stderr.decode()
    assert (tmp_path / "b" / "seen.txt").read_text() == "on the host"


def test_secret_option(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-value")
    build_py = tmp_path / "secret.py"
    build_py.write_text(textwrap.dedent("""
        from solver.worker import State, run
        definition = run(["sh", "-c", "wc -c < /run/secrets/tok > n.txt"],
                         root=State.scratch(), secrets=["tok"], name="count")
    """))
    r = cli("build", str(build_py), "--progress", "plain", "--secret", f"id=tok,src={token}",
            "-o", str(tmp_path / "out"), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "out" / "n.txt").read_text().strip() == "12"
    assert "s3cr3t" not in r.stderr.decode()
    missing = tmp_path / "missing"
    for spec, message in [
        ("tok", "--secret takes id=ID,src=PATH, not 'tok'"),
        (f"id=tok,src={missing}", f"--secret tok: {missing} is not a file"),
    ]:
        bad = cli("build", str(build_py), "--secret", spec, cache=tmp_path / "cache")
        assert bad.returncode == 2
        assert message in bad.stderr.decode()
        assert "Traceback" not in bad.stderr.decode()
