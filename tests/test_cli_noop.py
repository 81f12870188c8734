"""What a ``solver build`` does once, however many ops the definition has: read
and check the definition once (``docs/performance.md``, "CLI start-up")."""

from __future__ import annotations

from pathlib import Path

import pytest

from solver.cli import main
from solver.definition import Definition
from solver.worker import State, run


def test_a_build_reads_and_validates_its_definition_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base = State.inline({"a.txt": "a\n"}).with_name("base")
    step = run(["/bin/cp", "a.txt", "b0.txt"], root=base, name="copy")
    defn = tmp_path / "defn.json"
    data = State.scratch().copy(step, "b0.txt", "b0.txt").definition().to_json()
    defn.write_bytes(data.encode() if isinstance(data, str) else data)
    calls = {"validate": 0, "from_json": 0}
    validate, from_json = Definition.validate, Definition.from_json.__func__

    def counting_validate(self: Definition, *args: object, **kwargs: object) -> None:
        calls["validate"] += 1
        validate(self, *args, **kwargs)  # type: ignore[arg-type]

    def counting_from_json(cls: type[Definition], text: str | bytes) -> Definition:
        calls["from_json"] += 1
        return from_json(cls, text)  # type: ignore[no-any-return]

    monkeypatch.setattr(Definition, "validate", counting_validate)
    monkeypatch.setattr(Definition, "from_json", classmethod(counting_from_json))
    args = ["build", str(defn), "--sandbox", "none", "--progress", "plain",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")]
    for build, ran in (("cold", 3), ("nothing changed", 0)):
        calls.update(validate=0, from_json=0)
        status = main(args)
        err = capsys.readouterr().err
        assert status == 0, err
        assert calls == {"validate": 1, "from_json": 1}, build
        summary = next(line for line in err.splitlines() if line.startswith("Summary:"))
        assert f" {ran} run," in summary, summary
        assert (tmp_path / "out" / "b0.txt").read_text() == "a\n"
