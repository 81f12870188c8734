"""``benchmarks/cbuild.py`` still runs end to end (never its timings): on a tiny
C library written here (so no download), make, ninja, the CLI and the embedded
API build identical objects, and every ratio and the store growth are reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import cbuild

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("make", "ninja", "cc", "ar", "bwrap")),
    reason="needs make, ninja, cc, ar and bwrap",
)

SOURCES = {
    "inc/t.h": "int f(int);\nint g(int);\n",
    "lib/f.c": '#include "t.h"\nint f(int x) { return x * 2; }\n',
    "lib/g.c": '#include "t.h"\nint g(int x) { return f(x) + 1; }\n',
    "lib/skip.c": "this is not C\n",
}


def test_cbuild_runs_and_compares_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib = cbuild.Library("tiny", "tiny", "1.0", "tiny-1.0.tar.gz", "tiny-1.0", ("lib",),
                         ("-O1", "-Isrc/inc"), frozenset({"skip.c"}))
    src = tmp_path / "src" / "tiny-1.0"  # where fetch_sources extracts: nothing to fetch
    for rel, text in SOURCES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    report = cbuild.bench(lib, tmp_path, repeat=1, jobs=2)
    assert report["units"] == 2
    verdicts = report["verdicts"]
    assert isinstance(verdicts, list)
    assert {(v["phase"], v["contender"]) for v in verdicts} == {
        *cbuild.TARGETS, ("cold", "store")
    }
    out = capsys.readouterr().out
    assert "cold     cli" in out
    assert "store growth of a cold build" in out
    for contender in cbuild.CONTENDERS:  # each built the archive from the edited source
        tree = tmp_path / "work" / "tiny" / contender
        top = tree / "out" if contender in ("cli", "embedded") else tree
        assert (top / "libtiny.a").stat().st_size > 0
