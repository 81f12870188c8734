"""What a ``solver`` process imports: only what its command needs.

A no-op ``solver build`` is mostly the interpreter starting and importing
(``docs/performance.md``, "CLI start-up"), so the shared cache (psycopg), the
cluster code (dask, distributed), OpenTelemetry, rich, explain, check and plan
are imported only by the commands and flags that use them. Each test runs a
fresh interpreter and reads its ``sys.modules`` at the end; the controls show
the same probe seeing those modules when a flag does need them, so a test here
fails as soon as someone adds an eager import back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from solver.worker import State, run

ROOT = Path(__file__).resolve().parent.parent

#: Never imported by ``import solver`` nor by a plain ``solver build``.
NOT_FOR_A_BUILD = (
    "psycopg",
    "distributed",
    "dask",
    "opentelemetry",
    "solver.remote._task",
    "solver.remote._cluster",
    "solver.remote._ops",
    "solver.cache._postgres",
    "solver.bridge._shared",
    "solver.bridge._explain",
    "solver.bridge._check",
    "solver.bridge._plan",
    "solver.cli._check",
    "rich",
    "importlib.metadata",
)

# Runs the command line in process, then writes the modules it imported.
PROBE = """
import json, sys
from solver.cli import main
status = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(status)
"""


def env() -> dict[str, str]:
    out = {**os.environ}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


def imported(found: list[str], names: tuple[str, ...]) -> list[str]:
    """The modules of ``found`` that are one of ``names`` or inside one."""
    return [m for m in found if any(m == n or m.startswith(n + ".") for n in names)]


def modules_after(tmp_path: Path, *args: str) -> list[str]:
    """``sys.modules`` of a new process that ran ``solver ARGS`` (exit status 0)."""
    out = tmp_path / "modules.json"
    r = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found: list[str] = json.loads(out.read_text())
    return found


@pytest.fixture
def small_build(tmp_path: Path) -> list[str]:
    """``build`` arguments of a small definition: an inline source and an exec step
    (no sandbox, so no bwrap needed), exported to a directory."""
    base = State.inline({"a.txt": "a\n"}).with_name("base")
    step = run(["/bin/cp", "a.txt", "b.txt"], root=base, name="copy")
    defn = tmp_path / "defn.json"
    data = step.definition().to_json()
    defn.write_bytes(data.encode() if isinstance(data, str) else data)
    return ["build", str(defn), "--sandbox", "none", "--progress", "plain",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")]


def test_import_solver_imports_no_layer(tmp_path: Path) -> None:
    out = tmp_path / "modules.json"
    code = f"import json, sys, solver; json.dump(sorted(sys.modules), open({str(out)!r}, 'w'))"
    subprocess.run([sys.executable, "-c", code], env=env(), check=True, timeout=120)
    found: list[str] = json.loads(out.read_text())
    assert imported(found, NOT_FOR_A_BUILD) == []
    # the package itself and its lazy table, nothing of the layers
    assert [m for m in found if m.startswith("solver")] == ["solver", "solver._lazy"]


def test_a_build_imports_only_what_it_needs(tmp_path: Path, small_build: list[str]) -> None:
    cold = modules_after(tmp_path, *small_build)
    assert (tmp_path / "out" / "b.txt").read_text() == "a\n"  # it did build
    assert imported(cold, NOT_FOR_A_BUILD) == []
    nothing_changed = modules_after(tmp_path, *small_build)
    assert imported(nothing_changed, NOT_FOR_A_BUILD) == []
    assert "solver.engine._jobs" in nothing_changed  # the probe does see the build's modules


@pytest.mark.parametrize(
    ("flags", "needs"),
    [
        (["--explain"], ("solver.bridge._explain", "solver.bridge._plan")),
        (["--progress", "tty"], ("rich",)),
    ],
    ids=["explain", "tty"],
)
def test_a_flag_imports_what_it_uses(
    tmp_path: Path, small_build: list[str], flags: list[str], needs: tuple[str, ...]
) -> None:
    """The control: the probe sees these modules when the build asks for them."""
    found = modules_after(tmp_path, *small_build, *flags)
    assert [n for n in needs if imported(found, (n,))] == list(needs)


def test_version_reads_the_installed_metadata(tmp_path: Path) -> None:
    """``importlib.metadata`` (what a build must not import) is ``--version``'s."""
    assert "importlib.metadata" in modules_after(tmp_path, "--version")


def test_the_program_freezes_what_it_imported(tmp_path: Path) -> None:
    """``python -m solver`` and the console script (``solver.__main__:run``) import
    the command line with the collector off and freeze what it made; importing
    ``solver.cli`` from a program leaves its collector alone."""
    code = ("import gc, json, sys, {module}; "
            "print(json.dumps([gc.get_freeze_count(), gc.isenabled()]))")
    frozen = {}
    for module in ("solver.__main__", "solver.cli"):
        r = subprocess.run([sys.executable, "-c", code.format(module=module)], env=env(),
                           capture_output=True, text=True, timeout=120, check=True)
        frozen[module] = json.loads(r.stdout)
    assert frozen["solver.cli"] == [0, True]
    count, enabled = frozen["solver.__main__"]
    assert enabled
    assert count > 10_000  # the modules' objects: ~35,000
    script = "import sys; from solver.__main__ import run; sys.argv[1:] = ['--version']; run()"
    r = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stdout.split()[0]) == (0, "solver")
