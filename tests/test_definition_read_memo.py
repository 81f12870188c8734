"""``Definition.from_json`` keeps the definitions it read by the digest of their
text (``solver/definition/_readmemo.py``): the same text again gives the same
object without reading it again; a bad text fails every time; the memo stays
within its bounds."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from solver.definition import _definition
from solver.definition._definition import (
    Definition,
    DefinitionError,
    OpDef,
    OpMetadata,
    OutputRef,
)
from solver.definition._readmemo import MAX_DEFINITIONS, MAX_TEXT_BYTES, ReadMemo, read_memo


@pytest.fixture(autouse=True)
def _empty_memo() -> Iterator[None]:
    read_memo.clear()
    yield
    read_memo.clear()


def _definition_text(n: int, name: str = "") -> str:
    """A chain of ``n`` ops (each payload names its place), as JSON."""
    prev: OpDef | None = None
    ops: dict[str, OpDef] = {}
    for i in range(n):
        op = OpDef("t.step", {"i": i, "argv": ["cc", "-c", f"f{i}.c"]},
                   () if prev is None else (OutputRef(prev.digest),))
        ops[op.digest] = op
        prev = op
    assert prev is not None
    meta = {prev.digest: OpMetadata(name=name)} if name else {}
    return Definition(ops, OutputRef(prev.digest), meta).to_json()


def _key(text: str) -> tuple[bytes, int]:
    key = ReadMemo.key(text)
    assert key is not None
    return key


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the JSON text was really read (parsed and checked)."""
    reads: list[int] = []
    real = _definition._parse

    def parse(text: object) -> object:
        reads.append(1)
        return real(text)

    monkeypatch.setattr(_definition, "_parse", parse)
    return reads


def test_the_same_text_gives_the_same_definition_read_once(counted_reads: list[int]) -> None:
    text = _definition_text(5)
    first = Definition.from_json(text)
    again = Definition.from_json(text)
    assert again is first
    assert len(counted_reads) == 1
    # its bytes (and a bytearray of them) are the same text: the same entry
    assert Definition.from_json(text.encode()) is first
    assert Definition.from_json(bytearray(text.encode())) is first
    assert len(counted_reads) == 1
    assert len(read_memo) == 1
    assert read_memo.text_bytes == len(text.encode())


def test_a_different_text_is_read_and_gives_an_equal_definition(
    counted_reads: list[int],
) -> None:
    text = _definition_text(5)
    first = Definition.from_json(text)
    spaced = Definition.from_json(text.replace(",", ", "))
    assert spaced is not first
    assert spaced == first
    assert len(counted_reads) == 2
    # metadata is outside the op digests but inside the text: a new name is read
    named = Definition.from_json(_definition_text(5, name="link"))
    assert named.metadata[named.output.digest].name == "link"
    assert first.metadata == {}
    assert len(counted_reads) == 3


def test_a_bad_text_fails_every_time_and_is_never_kept(counted_reads: list[int]) -> None:
    good = _definition_text(3)
    # a stated digest that does not match its op's content
    bad = good.replace('"i":0', '"i":7', 1)
    assert bad != good
    errors = []
    for _ in range(3):
        with pytest.raises(DefinitionError, match="stated digest does not match") as info:
            Definition.from_json(bad)
        errors.append(str(info.value))
    assert len(set(errors)) == 1
    assert len(counted_reads) == 3
    assert len(read_memo) == 0
    for text in ("{", b"\xff\xfe", "[]"):
        for _ in range(2):
            with pytest.raises(DefinitionError):
                Definition.from_json(text)
    assert len(read_memo) == 0


def test_a_str_without_utf8_is_read_every_time(counted_reads: list[int]) -> None:
    # a lone surrogate in a metadata name: the text has no UTF-8 bytes to key on
    text = _definition_text(2, name="x").replace('"name":"x"', '"name":"\ud800"')
    for _ in range(2):
        with pytest.raises(DefinitionError, match="valid Unicode text"):
            Definition.from_json(text)
    assert len(counted_reads) == 2
    assert ReadMemo.key(text) is None
    assert len(read_memo) == 0


def test_a_subclass_reads_its_own_class_and_is_not_kept() -> None:
    class Mine(Definition):
        __slots__ = ()

    text = _definition_text(2)
    mine = Mine.from_json(text)
    assert type(mine) is Mine
    assert len(read_memo) == 0
    plain = Definition.from_json(text)
    assert type(plain) is Definition
    assert type(Mine.from_json(text)) is Mine


def test_the_memo_keeps_the_most_recently_used_within_its_count() -> None:
    memo = ReadMemo(max_definitions=2, max_bytes=MAX_TEXT_BYTES)
    texts = [_definition_text(2 + i) for i in range(3)]
    keys = [_key(t) for t in texts]
    defs = [Definition.from_json(t) for t in texts]
    for (digest, size), d in zip(keys[:2], defs[:2], strict=True):
        memo.keep(digest, size, d)
    assert memo.get(keys[0][0]) is defs[0]  # now most recent
    memo.keep(keys[2][0], keys[2][1], defs[2])
    assert len(memo) == 2
    assert memo.get(keys[1][0]) is None  # the least recent went
    assert memo.get(keys[0][0]) is defs[0]
    assert memo.get(keys[2][0]) is defs[2]
    assert memo.text_bytes == keys[0][1] + keys[2][1]
    # keeping a key again replaces it without counting its text twice
    memo.keep(keys[2][0], keys[2][1], defs[2])
    assert memo.text_bytes == keys[0][1] + keys[2][1]


def test_the_memo_keeps_texts_within_its_byte_budget() -> None:
    texts = [_definition_text(4 + i) for i in range(3)]
    keys = [_key(t) for t in texts]
    sizes = [k[1] for k in keys]
    memo = ReadMemo(max_definitions=10, max_bytes=sizes[0] + sizes[1])
    defs = [Definition.from_json(t) for t in texts]
    for (digest, size), d in zip(keys, defs, strict=True):
        memo.keep(digest, size, d)
        assert memo.text_bytes <= memo.max_bytes
    # the third did not fit beside the first two: the first went, then the second
    assert memo.get(keys[0][0]) is None
    assert memo.get(keys[2][0]) is defs[2]
    # a text larger than the whole budget is never kept
    small = ReadMemo(max_definitions=10, max_bytes=sizes[0] - 1)
    small.keep(keys[0][0], sizes[0], defs[0])
    assert len(small) == 0
    assert small.text_bytes == 0
    assert "0/10 definitions" in repr(small)


def test_the_shared_memo_is_bounded_by_count(counted_reads: list[int]) -> None:
    texts = [_definition_text(1 + i) for i in range(MAX_DEFINITIONS + 3)]
    for t in texts:
        Definition.from_json(t)
    assert len(read_memo) == MAX_DEFINITIONS
    # the first three went; the last is kept
    Definition.from_json(texts[-1])
    assert len(counted_reads) == len(texts)
    Definition.from_json(texts[0])
    assert len(counted_reads) == len(texts) + 1


def test_threads_reading_one_text_get_equal_definitions() -> None:
    text = _definition_text(30)
    got: list[Definition] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def read() -> None:
        try:
            start.wait()
            for _ in range(20):
                got.append(Definition.from_json(text))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == 160
    assert all(d == got[0] for d in got)
    assert len(read_memo) == 1
    assert read_memo.text_bytes == len(text.encode())
