"""``Definition.validate`` checks an op against its kind once per op digest and
registration: a registry remembers the ops it found valid (with their output
counts) until a kind is added or replaced. What fails is checked, and fails,
every time; what depends on the definition (which output an input names) is
checked on every call."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from solver import Op
from solver.definition import _opkind
from solver.definition._definition import Definition, DefinitionError, JSONValue, node
from solver.definition._opkind import OpContext, OpKindRegistry


def _factory(ctx: OpContext) -> Op:
    raise AssertionError("validation makes no op")


class Counted:
    """A kind's ``validate`` and ``outputs``, counting their calls."""

    def __init__(self) -> None:
        self.validated: list[JSONValue] = []
        self.counted: list[JSONValue] = []

    def validate(self, payload: Mapping[str, JSONValue]) -> None:
        self.validated.append(payload.get("n"))
        if not isinstance(payload.get("n"), int):
            raise TypeError("'n' must be an integer")

    def outputs(self, payload: Mapping[str, JSONValue]) -> int:
        self.counted.append(payload.get("n"))
        n = payload.get("n")
        assert isinstance(n, int)
        return n


def _registry(counted: Counted) -> OpKindRegistry:
    reg = OpKindRegistry()
    reg.register("k.split", _factory, validate=counted.validate, outputs=counted.outputs)
    reg.register("k.use", _factory)
    return reg


def test_each_op_is_checked_once_per_digest() -> None:
    counted = Counted()
    reg = _registry(counted)
    split = node("k.split", {"n": 2})
    defn = Definition.of(node("k.use", inputs=[split.output(1)]))
    for _ in range(3):
        defn.validate(reg)
        defn.to_vertices(reg)
    assert counted.validated == [2]
    assert counted.counted == [2]
    # another definition with the same op: not checked again; a new op is
    three = node("k.split", {"n": 3})
    other = Definition.of(node("k.use", {"x": 1}, inputs=[split.output(0), three]))
    other.validate(reg)
    assert counted.validated == [2, 3]
    assert len(reg._checked_outputs()[0]) == 4


def test_a_remembered_count_still_checks_each_input() -> None:
    counted = Counted()
    reg = _registry(counted)
    split = node("k.split", {"n": 2})
    Definition.of(split).validate(reg)
    use = node("k.use", inputs=[split.output(2)])
    for _ in range(2):
        with pytest.raises(DefinitionError) as info:
            Definition.of(use).validate(reg)
        assert str(info.value) == (
            f"op {use.digest} (kind 'k.use'): inputs[0] names output 2 of op {split.digest} "
            "(kind 'k.split'), which has 2 outputs"
        )
    with pytest.raises(DefinitionError, match="'output' names output 5 of op"):
        Definition.of(split.output(5)).validate(reg)
    assert counted.validated == [2]


def test_an_invalid_op_is_checked_and_fails_every_time() -> None:
    counted = Counted()
    reg = _registry(counted)
    bad = Definition.of(node("k.split", {"n": "two"}))
    for _ in range(3):
        with pytest.raises(DefinitionError, match="invalid payload: 'n' must be an integer"):
            bad.validate(reg)
    assert counted.validated == ["two", "two", "two"]
    unknown = Definition.of(node("k.nope"))
    for _ in range(2):
        with pytest.raises(DefinitionError, match=r"unknown op kind 'k\.nope'"):
            unknown.validate(reg)
    assert reg._checked_outputs()[0] == {}


def test_a_kind_registered_forgets_what_was_checked() -> None:
    counted = Counted()
    reg = _registry(counted)
    defn = Definition.of(node("k.split", {"n": 1}))
    defn.validate(reg)
    _, before = reg._checked_outputs()

    def reject(payload: Mapping[str, JSONValue]) -> None:
        raise ValueError("no longer accepted")

    reg.register("k.split", _factory, validate=reject, replace=True)
    checked, after = reg._checked_outputs()
    assert after == before + 1
    assert checked == {}
    with pytest.raises(DefinitionError, match="invalid payload: no longer accepted"):
        defn.validate(reg)
    # adding an unrelated kind forgets too (the registration changed)
    reg.register("k.split", _factory, validate=counted.validate, replace=True)
    defn.validate(reg)
    assert len(reg._checked_outputs()[0]) == 1
    reg.register("k.other", _factory)
    assert reg._checked_outputs()[0] == {}
    # a copy starts with nothing checked
    defn.validate(reg)
    assert reg.copy()._checked_outputs()[0] == {}


def test_a_check_made_before_a_registration_is_not_kept() -> None:
    reg = _registry(Counted())
    _, generation = reg._checked_outputs()
    reg.register("k.late", _factory)
    op = node("k.use").digest
    reg._note_checked(op, 1, generation)
    assert reg._checked_outputs()[0] == {}
    reg._note_checked(op, 1, generation + 1)
    assert reg._checked_outputs()[0] == {op: 1}


def test_the_remembered_ops_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_opkind, "MAX_CHECKED_OPS", 3)
    counted = Counted()
    reg = _registry(counted)
    for n in range(1, 8):
        Definition.of(node("k.split", {"n": n})).validate(reg)
        assert len(reg._checked_outputs()[0]) <= 3
    # emptied when full: the 7th op is kept, the first is checked again
    assert len(reg._checked_outputs()[0]) == 1
    Definition.of(node("k.split", {"n": 1})).validate(reg)
    assert counted.validated == [1, 2, 3, 4, 5, 6, 7, 1]
