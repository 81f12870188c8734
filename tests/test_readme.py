"""The README's first example runs and prints what the README says it prints, on
asyncio and on trio; the low-level example moved to docs/engine-api.md runs too;
the files the README names exist. So the first thing a new user reads cannot rot.

The examples run in a subprocess, as a user would run them (a fresh interpreter,
the example's own event loop), with ``SOLVER_CACHE_DIR`` in a temporary directory
so that nothing is written to the user's cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ENGINE_API = ROOT / "docs" / "engine-api.md"

# A fenced block: ```lang at the start of a line, up to the next ``` line.
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)

ASYNCIO_LAST_LINE = "asyncio.run(main())"


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced code blocks of ``path`` in language ``lang``, in order."""
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def first_example() -> tuple[str, str, str]:
    """The README's first example (asyncio), its trio ending, and the output the
    README shows for them (the first ``text`` block after the example)."""
    text = README.read_text()
    found = [(m.start(), m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    python = [(pos, body) for pos, kind, body in found if kind == "python"]
    assert len(python) >= 2, "README: the first example and its trio form are missing"
    (pos, program), (_, trio_form) = python[0], python[1]
    outputs = [body for p, kind, body in found if kind == "text" and p > pos]
    assert outputs, "README: no ```text block shows the first example's output"
    return program, trio_form, outputs[0]


def run_python(source: str, tmp_path: Path) -> str:
    """Run ``source`` as a program in a fresh interpreter; its stdout."""
    script = tmp_path / "example.py"
    script.write_text(source)
    # This tree's package first, whatever the interpreter has installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, SOLVER_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # as a user's own program, outside the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_first_example_is_a_state_definition_solved_with_solve() -> None:
    program, trio_form, _ = first_example()
    assert "from solver.worker import State" in program
    assert "await solver.solve(defn) as result" in program
    assert program.rstrip().splitlines()[-1] == ASYNCIO_LAST_LINE
    assert "trio.run(main)" in trio_form


def test_first_example_on_asyncio(tmp_path: Path) -> None:
    program, _, expected = first_example()
    assert run_python(program, tmp_path) == expected
    # Sanity check of the shown output itself, so a README whose example and
    # output drifted together into nonsense still fails.
    assert expected == "['count.txt', 'sorted.txt']\n3 unique words: apple fig pear\n"


def test_first_example_on_trio(tmp_path: Path) -> None:
    program, trio_form, expected = first_example()
    # The README says: the same program, ending with the trio form instead.
    head = program.rstrip().removesuffix(ASYNCIO_LAST_LINE)
    assert run_python(head + trio_form, tmp_path) == expected


def test_engine_api_example(tmp_path: Path) -> None:
    (example, *_) = blocks(ENGINE_API, "python")
    assert run_python(example, tmp_path) == "ba\n"


def test_readme_links_engine_api() -> None:
    text = README.read_text()
    assert "](docs/engine-api.md)" in text
    # The low-level API lives there now, not in the README's first example.
    program, _, _ = first_example()
    assert "resolve_op" not in program


@pytest.mark.parametrize("path", [README, ENGINE_API], ids=lambda p: p.name)
def test_named_files_exist(path: Path) -> None:
    """Every repository file a document names in backquotes exists."""
    named = set(re.findall(r"`((?:docs|examples|benchmarks|tests|solver|frontends|\.ci)"
                           r"/[\w./-]*\w)`", path.read_text()))
    # the set-up commands' files
    named |= set(re.findall(r"\.venv/bin/python ((?:examples|benchmarks)/\S+\.py)",
                            path.read_text()))
    assert named, f"{path.name} names no files: the pattern is wrong"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"
