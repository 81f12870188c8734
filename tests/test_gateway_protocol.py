"""The gateway protocol on its own: framing, the message schema, the in-memory
byte streams. No solver involved."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from frontends.gateway._protocol import (
    HEADER_SIZE,
    ErrorReply,
    Evaluate,
    FrameReader,
    FrameWriter,
    Hello,
    ProtocolError,
    ReadDir,
    ReadFile,
    Release,
    Reply,
    Request,
    Return,
    Solve,
    StatFile,
    WireRef,
    decode_message,
    encode_frame,
    error_reply,
    memory_byte_stream_pair,
    parse_hello_reply,
    parse_reply,
    parse_request,
    reply,
    request_to_wire,
    result_from_wire,
    result_to_wire,
    stat_from_wire,
    stat_to_wire,
)
from solver import Attestation, SolveError
from solver.bridge._frontend import ResultMap
from solver.worker import FileStat


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(HEADER_SIZE, "big") + body


class Chunks(anyio.abc.ByteReceiveStream):
    """Hands out the given chunks, then ends; fails the test if read past
    ``stop_after`` chunks (proves a reader stopped early)."""

    def __init__(self, *chunks: bytes, stop_after: int | None = None) -> None:
        self.chunks = list(chunks)
        self.reads = 0
        self.stop_after = stop_after

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        self.reads += 1
        if self.stop_after is not None and self.reads > self.stop_after:
            raise AssertionError("the reader read past what it needed")
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        pass


async def read_all(*chunks: bytes, max_size: int = 1 << 20) -> list[dict[str, Any]]:
    reader = FrameReader(Chunks(*chunks), max_size)
    out = []
    while (msg := await reader.receive()) is not None:
        out.append(msg)
    return out


# -- framing ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_frames_round_trip_across_any_chunking() -> None:
    messages = [{"type": "reply", "id": i, "text": "é" * i} for i in range(20)]
    data = b"".join(encode_frame(m) for m in messages)
    # one chunk, byte by byte, and uneven chunks
    for size in (len(data), 1, 7):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert await read_all(*chunks) == messages


def test_frames_are_ascii_json_with_a_big_endian_length() -> None:
    data = encode_frame({"type": "x", "text": "é\u2028"})
    body = data[HEADER_SIZE:]
    assert int.from_bytes(data[:HEADER_SIZE], "big") == len(body)
    assert body.isascii()
    assert json.loads(body) == {"type": "x", "text": "é\u2028"}


@pytest.mark.anyio
async def test_a_clean_end_between_frames_is_the_end() -> None:
    assert await read_all() == []
    assert await read_all(encode_frame({"type": "a"})) == [{"type": "a"}]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ((b"\x00\x00",), r"ended inside a length prefix: got 2 of 4 bytes"),
        ((frame(b'{"type":"a"}')[:-3],), r"ended inside a message: got 9 of 12 bytes"),
        ((encode_frame({"type": "a"}), b"\x00"), r"inside a length prefix: got 1 of 4"),
    ],
)
async def test_a_truncated_frame_is_a_protocol_error(chunks: tuple[bytes, ...], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        await read_all(*chunks)


@pytest.mark.anyio
async def test_an_oversized_length_fails_before_reading_the_body() -> None:
    # 2 GiB announced; the reader must stop after the 4 header bytes.
    stream = Chunks(b"\x7f\xff\xff\xff", b"x" * 100, stop_after=1)
    with pytest.raises(ProtocolError, match=r"of 2147483647 bytes exceeds the limit of 1024"):
        await FrameReader(stream, 1024).receive()
    # text written to stdout by mistake reads as a huge length, and says so
    stream = Chunks(b"hello world\n", stop_after=1)
    with pytest.raises(ProtocolError, match=r"length prefix was b'hell'"):
        await FrameReader(stream, 1024).receive()


@pytest.mark.anyio
async def test_the_limit_is_inclusive() -> None:
    body = b'{"type":"' + b"a" * 89 + b'"}'
    assert len(body) == 100
    assert await read_all(frame(body), max_size=100) == [{"type": "a" * 89}]
    with pytest.raises(ProtocolError, match="exceeds the limit of 99"):
        await read_all(frame(body), max_size=99)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", r"an empty message"),
        (b"\xff\xfe", r"not valid UTF-8 JSON"),
        (b"{not json", r"not valid UTF-8 JSON"),
        (b"[1, 2]", r"must be a JSON object, got an array"),
        (b'"text"', r"must be a JSON object, got a string"),
        (b'{"id": 1}', r"no string 'type' field"),
        (b'{"type": 3}', r"no string 'type' field"),
        (b'{"type": "a", "type": "b"}', r"duplicate key 'type'"),
        (b'{"type": "a", "x": NaN}', r"NaN is not JSON"),
        (b'{"type": "a", "x": Infinity}', r"Infinity is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, r"not valid UTF-8 JSON"),
    ],
)
async def test_garbage_bodies_are_protocol_errors(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        await read_all(frame(body), max_size=1 << 20)


def test_encoding_refuses_oversized_and_non_json_messages() -> None:
    too_large = r"'reply' message of \d+ bytes exceeds the limit of 50"
    with pytest.raises(ProtocolError, match=too_large):
        encode_frame({"type": "reply", "data": "x" * 100}, 50)
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode_frame({"type": "reply", "x": float("nan")})
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode_frame({"type": "reply", "x": object()})


def test_protocol_errors_are_solve_errors() -> None:
    assert issubclass(ProtocolError, SolveError)


@pytest.mark.anyio
async def test_concurrent_writers_never_interleave_frames() -> None:
    a, b = memory_byte_stream_pair()
    writer = FrameWriter(a)
    messages = [{"type": "reply", "id": i, "pad": "x" * (i * 37)} for i in range(50)]
    async with anyio.create_task_group() as tg:
        for m in messages:
            tg.start_soon(writer.send, m)
    await a.send_eof()
    reader = FrameReader(b)
    got = []
    while (msg := await reader.receive()) is not None:
        got.append(msg)
    assert sorted(got, key=lambda m: m["id"]) == messages


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=64), cut=st.integers(min_value=1, max_value=8))
def test_random_bytes_only_ever_raise_protocol_errors(data: bytes, cut: int) -> None:
    async def main() -> None:
        chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
        try:
            messages = await read_all(*chunks, max_size=64)
        except ProtocolError:
            return
        for msg in messages:
            try:
                parse_request(msg)
            except ProtocolError:
                pass

    anyio.run(main)


# -- the in-memory byte streams -------------------------------------------------------------


@pytest.mark.anyio
async def test_memory_byte_streams() -> None:
    a, b = memory_byte_stream_pair()
    await a.send(b"hello world")
    await a.send(b"")  # nothing
    assert await b.receive(5) == b"hello"
    assert await b.receive() == b" world"
    await b.send(b"back")
    assert await a.receive() == b"back"
    await a.send_eof()
    with pytest.raises(anyio.EndOfStream):
        await b.receive()
    await a.aclose()
    with pytest.raises(anyio.BrokenResourceError):
        await b.send(b"to nobody")
    await b.aclose()


# -- the schema ------------------------------------------------------------------------------


def sample_result() -> ResultMap[str]:
    result: ResultMap[str] = ResultMap()
    result.set_ref("r1")
    result.add_ref("linux/amd64", "r1")
    result.add_ref("linux/386", "r1")
    result.add_ref("linux/arm64", "r2")
    result.add_meta("digest", b"\x00\xffbinary")
    result.add_attestation("linux/amd64", Attestation("provenance", "r1", "/p.json", {"k": b"v"}))
    result.add_attestation("linux/amd64", Attestation("note", None))
    return result


def assert_same_result(a: ResultMap[Any], b: ResultMap[Any]) -> None:
    assert a.ref == b.ref
    assert a.refs == b.refs
    assert a.metadata == b.metadata
    assert {k: [(x.kind, x.ref, x.path, dict(x.metadata)) for x in v]
            for k, v in a.attestations.items()} == {
        k: [(x.kind, x.ref, x.path, dict(x.metadata)) for x in v]
        for k, v in b.attestations.items()
    }


REQUESTS: list[Request] = [
    Hello(0, (1, 2)),
    Solve(1, definition='{"x": 1}'),
    Solve(2, frontend="other", frontend_opts={"a": "b"}, frontend_inputs={"ctx": "{}"}),
    Evaluate(3, "ref-a"),
    ReadFile(4, "ref-a", "dir/f", 10, 20),
    ReadFile(5, "ref-a", "dir/f"),
    ReadDir(6, "ref-a", "dir", "*.txt"),
    ReadDir(7, "ref-a", "dir"),
    StatFile(8, "ref-a", "dir/f"),
    Release(9, ("ref-a", "ref-b")),
    Return(10, error="it failed"),
    Return(11, result=sample_result()),
]


@pytest.mark.anyio
@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.type}-{r.id}")
async def test_requests_round_trip(request_: Request) -> None:
    (msg,) = await read_all(encode_frame(request_to_wire(request_)))
    parsed = parse_request(msg)
    if isinstance(request_, Return):
        assert isinstance(parsed, Return)
        assert (parsed.id, parsed.error) == (request_.id, request_.error)
        if request_.result is not None:
            assert parsed.result is not None
            assert_same_result(parsed.result, request_.result)
    else:
        assert parsed == request_


def test_results_with_wire_refs_round_trip() -> None:
    result: ResultMap[WireRef] = ResultMap()
    a, b = WireRef("ref-a", '{"d": 1}'), WireRef("ref-b")
    result.set_ref(a)
    result.add_ref("k", b)
    result.add_attestation("k", Attestation("sbom", a, "/sbom"))
    wire = json.loads(json.dumps(result_to_wire(result, WireRef.to_wire)))
    assert_same_result(result_from_wire(wire, WireRef.from_wire, "test"), result)
    # every field may be missing
    empty = result_from_wire({}, WireRef.from_wire, "test")
    assert (empty.ref, empty.refs, empty.metadata, empty.attestations) == (None, {}, {}, {})


def test_stats_round_trip() -> None:
    stat = FileStat("dir/a", 0o100644, 12, 1_700_000_000_000_000_000, 1000, 1000, "")
    assert stat_from_wire(json.loads(json.dumps(stat_to_wire(stat))), "t") == stat
    link = FileStat("l", 0o120777, 1, 0, 0, 0, "target")
    assert stat_from_wire(stat_to_wire(link), "t") == link
    with pytest.raises(ProtocolError, match="'size' of t must be an integer, got a string"):
        stat_from_wire({**stat_to_wire(stat), "size": "12"}, "t")


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        ({"type": "bogus", "id": 1}, r"unknown message type 'bogus'; requests are hello, solve"),
        ({"type": "reply", "id": 1}, r"unknown message type 'reply'"),
        ({"type": "evaluate"}, r"'id' of a 'evaluate' message must be an integer"),
        ({"type": "evaluate", "id": True, "ref": "r"}, r"'id' .* got a boolean"),
        ({"type": "evaluate", "id": -1, "ref": "r"}, r"'id' .* from 0 to"),
        ({"type": "evaluate", "id": 2**53, "ref": "r"}, r"'id' .* from 0 to"),
        ({"type": "evaluate", "id": 1.0, "ref": "r"}, r"'id' .* got a number"),
        ({"type": "evaluate", "id": 1}, r"'ref' of a 'evaluate' message must be a string, got nu"),
        ({"type": "hello", "id": 0, "versions": []}, r"'versions' .* non-empty array"),
        ({"type": "hello", "id": 0, "versions": ["1"]}, r"'versions' .* array of integers"),
        ({"type": "solve", "id": 1}, r"exactly one of 'definition' and 'frontend'"),
        ({"type": "solve", "id": 1, "definition": "{}", "frontend": "f"}, r"exactly one of"),
        ({"type": "solve", "id": 1, "frontend": "f", "frontend_opts": {"a": 1}},
         r"'frontend_opts' .* must be an object of strings"),
        ({"type": "read_file", "id": 1, "ref": "r", "path": "p", "offset": -5},
         r"'offset' .* from 0 to"),
        ({"type": "read_file", "id": 1, "ref": "r", "path": "p", "length": "5"},
         r"'length' .* got a string"),
        ({"type": "release", "id": 1, "refs": "r"}, r"'refs' .* array of strings"),
        ({"type": "return", "id": 1}, r"exactly one of 'result' and 'error'"),
        ({"type": "return", "id": 1, "error": "x", "result": {}}, r"exactly one of"),
        ({"type": "return", "id": 1, "result": {"ref": 5}}, r"must be an ID string, got a number"),
        ({"type": "return", "id": 1, "result": {"refs": []}}, r"'refs' .* must be an object"),
        ({"type": "return", "id": 1, "result": {"metadata": {"k": "not base64!"}}},
         r"not valid base64"),
        ({"type": "return", "id": 1, "result": {"attestations": {"k": {}}}},
         r"attestations\['k'\].* must be an array"),
        ({"type": "return", "id": 1, "result": {"attestations": {"k": [{"ref": "r"}]}}},
         r"'kind' of attestations\['k'\]\[0\]"),
    ],
)
def test_malformed_requests_name_the_field(msg: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_request(msg)


def test_unknown_fields_are_ignored() -> None:
    assert parse_request({"type": "evaluate", "id": 1, "ref": "r", "future": [1]}) == Evaluate(
        1, "r"
    )


def test_replies() -> None:
    assert parse_reply(reply(3, data="x")) == Reply(3, {"data": "x"})
    assert parse_reply(error_reply(3, "no")) == ErrorReply(3, "no")
    assert parse_reply(error_reply(None, "over")) == ErrorReply(None, "over")
    with pytest.raises(ProtocolError, match="unknown message type 'solve'"):
        parse_reply({"type": "solve", "id": 1})
    with pytest.raises(ProtocolError, match="'message' of a 'error' message"):
        parse_reply({"type": "error", "id": 1})
    hello = parse_hello_reply(
        {"version": 1, "opts": {"a": "b"}, "inputs": {"c": "{}"}, "max_message_size": 100}
    )
    assert (hello.version, dict(hello.opts), dict(hello.inputs), hello.max_message_size) == (
        1, {"a": "b"}, {"c": "{}"}, 100,
    )
    with pytest.raises(ProtocolError, match="'max_message_size' of the 'hello' reply"):
        parse_hello_reply({"version": 1, "opts": {}, "inputs": {}})


def test_decode_message_quotes_the_start_of_garbage() -> None:
    with pytest.raises(ProtocolError, match=r"it starts b'garbage garbage garbage garbage '\.\.\."):
        decode_message(b"garbage " * 10)
