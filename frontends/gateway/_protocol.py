"""The gateway protocol: framing, the message schema, and in-memory byte streams.

Both ends use this module: the solver side (:mod:`frontends.gateway._server`) and
the program side (:mod:`frontends.gateway.client`). ``docs/gateway-protocol.md``
is the specification; this module is its one implementation.

Framing. A message is a 4-byte big-endian unsigned length ``n`` and then ``n``
bytes of UTF-8 JSON, one object with a string ``"type"``. A reader refuses a
length above its limit as soon as it has the 4 bytes (it never allocates for it),
an empty message, and a stream that ends inside a frame. Writers emit ASCII-only
JSON (everything else escaped), readers accept any UTF-8. Duplicate keys,
``NaN``/``Infinity`` and nesting deeper than the decoder allows are errors.

Schema. The program sends requests (:data:`Request`), each with an integer ``id``
it chooses, unique among its requests still unanswered; the gateway answers each
with one ``reply`` or ``error`` carrying the same ``id``, in any order. An
``error`` with ``"id": null`` ends the session (the gateway saw a protocol
error). Unknown fields are ignored; a known field of the wrong type is a protocol
error. Every violation raises :class:`ProtocolError`, a
:class:`~solver.SolveError` whose text names the message type and field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import ByteReceiveStream, ByteSendStream, ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from solver import Attestation, SolveError
from solver.bridge import ResultMap
from solver.worker import FileStat

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "ErrorReply",
    "Evaluate",
    "FrameReader",
    "FrameWriter",
    "Hello",
    "HelloReply",
    "MemoryByteStream",
    "ProtocolError",
    "ReadDir",
    "ReadFile",
    "Release",
    "Reply",
    "Request",
    "Return",
    "Solve",
    "StatFile",
    "WireRef",
    "data_from_wire",
    "data_to_wire",
    "decode_message",
    "encode_frame",
    "error_reply",
    "memory_byte_stream_pair",
    "parse_hello_reply",
    "parse_reply",
    "parse_request",
    "reply",
    "request_to_wire",
    "result_from_wire",
    "result_to_wire",
    "stat_from_wire",
    "stat_to_wire",
    "stats_from_wire",
]

#: The protocol version this module speaks (``docs/gateway-protocol.md``).
PROTOCOL_VERSION: Final = 1
#: Every version this module can speak; ``hello`` picks the highest both sides know.
SUPPORTED_VERSIONS: Final = (1,)
#: The default limit on one message's JSON body, in bytes (16 MiB).
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: The length prefix: 4 bytes, big-endian, unsigned.
HEADER_SIZE: Final = 4
#: Request ids are integers in ``[0, MAX_REQUEST_ID]`` (exact in any JSON reader).
MAX_REQUEST_ID: Final = 2**53 - 1

_READ_CHUNK: Final = 65536

JSON: TypeAlias = Any
R = TypeVar("R")


class ProtocolError(SolveError):
    """A frame or message that breaks the gateway protocol (see the module
    docstring); the session that reads one ends."""


# -- framing -----------------------------------------------------------------------------


def _preview(data: bytes, limit: int = 32) -> str:
    shown = data[:limit]
    return repr(shown) + ("..." if len(data) > limit else "")


def encode_frame(message: Mapping[str, JSON], max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """The frame of ``message``: length prefix and ASCII-only JSON.

    Raises :class:`ProtocolError` if the body would exceed ``max_size`` bytes or
    the message is not JSON-serialisable. O(size)."""
    try:
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"cannot encode a {message.get('type')!r} message as JSON: {exc}"
        ) from exc
    if len(body) > max_size:
        raise ProtocolError(
            f"a {message.get('type')!r} message of {len(body)} bytes exceeds the "
            f"limit of {max_size} bytes"
        )
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def _no_duplicates(pairs: list[tuple[str, JSON]]) -> dict[str, JSON]:
    out: dict[str, JSON] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> JSON:
    raise ValueError(f"{name} is not JSON")


def decode_message(body: bytes) -> dict[str, JSON]:
    """The message in a frame's body: a JSON object with a string ``type``.

    Raises :class:`ProtocolError` (quoting the start of the body) for anything
    else."""
    try:
        doc = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(
            f"a message is not valid UTF-8 JSON ({exc}); it starts {_preview(body)}"
        ) from exc
    if not isinstance(doc, dict):
        raise ProtocolError(
            f"a message must be a JSON object, got {_describe(doc)}; it starts {_preview(body)}"
        )
    kind = doc.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            f"a message has no string 'type' field; it starts {_preview(body)}"
        )
    return doc


class FrameReader:
    """Reads messages from a byte stream, one frame at a time.

    Not safe for concurrent use (one reading task per stream)."""

    __slots__ = ("_buffer", "_max", "_stream")

    def __init__(self, stream: ByteReceiveStream, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._stream = stream
        self._max = max_size
        self._buffer = bytearray()

    async def receive(self) -> dict[str, JSON] | None:
        """The next message, or ``None`` when the stream ends between frames.

        Raises :class:`ProtocolError` for an oversized length (before reading the
        body), an empty message, a stream that ends inside a frame, or a body that
        is not a message (:func:`decode_message`). A broken stream counts as its
        end. O(message size)."""
        header = await self._take(HEADER_SIZE, boundary=True)
        if header is None:
            return None
        size = int.from_bytes(header, "big")
        if size > self._max:
            raise ProtocolError(
                f"a message of {size} bytes exceeds the limit of {self._max} bytes "
                f"(its length prefix was {header!r}: is something else writing to the "
                "stream?)"
            )
        if size == 0:
            raise ProtocolError("an empty message (length prefix 0)")
        body = await self._take(size, boundary=False)
        assert body is not None
        return decode_message(body)

    async def _take(self, n: int, *, boundary: bool) -> bytes | None:
        buffer = self._buffer
        while len(buffer) < n:
            try:
                chunk = await self._stream.receive(_READ_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                if boundary and not buffer:
                    return None
                what = "length prefix" if boundary else "message"
                raise ProtocolError(
                    f"the stream ended inside a {what}: got {len(buffer)} of {n} bytes"
                ) from None
            buffer += chunk
        out = bytes(buffer[:n])
        del buffer[:n]
        return out


class FrameWriter:
    """Writes messages to a byte stream; concurrent senders never interleave
    frames (a lock orders them)."""

    __slots__ = ("_lock", "_max", "_stream")

    def __init__(self, stream: ByteSendStream, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._stream = stream
        self._max = max_size
        self._lock = anyio.Lock()

    async def send(self, message: Mapping[str, JSON]) -> None:
        """Encode ``message`` (:func:`encode_frame`; too large raises
        :class:`ProtocolError` and sends nothing) and write its frame whole."""
        frame = encode_frame(message, self._max)
        async with self._lock:
            await self._stream.send(frame)


# -- field access ------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bad(where: str, key: str, wanted: str, value: object) -> ProtocolError:
    return ProtocolError(f"{key!r} of {where} must be {wanted}, got {_describe(value)}")


def _str(msg: Mapping[str, JSON], key: str, where: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str):
        raise _bad(where, key, "a string", value)
    return value


def _opt_str(
    msg: Mapping[str, JSON], key: str, where: str, default: str | None = None
) -> str | None:
    value = msg.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _bad(where, key, "a string or null", value)
    return value


def _int(msg: Mapping[str, JSON], key: str, where: str, *, default: int | None = None) -> int:
    value = msg.get(key, default)
    if type(value) is not int or not 0 <= value <= MAX_REQUEST_ID:
        raise _bad(where, key, f"an integer from 0 to {MAX_REQUEST_ID}", value)
    return value


def _opt_int(msg: Mapping[str, JSON], key: str, where: str) -> int | None:
    if msg.get(key) is None:
        return None
    return _int(msg, key, where)


def _str_map(msg: Mapping[str, JSON], key: str, where: str) -> dict[str, str]:
    value = msg.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad(where, key, "an object of strings", value)
    return dict(value)


def _obj(value: JSON, where: str, key: str) -> dict[str, JSON]:
    if not isinstance(value, dict):
        raise _bad(where, key, "an object", value)
    return value


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(f"{where} is not valid base64: {exc}") from exc


def _b64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes_map(value: JSON, where: str, key: str) -> dict[str, bytes]:
    if value is None:
        return {}
    obj = _obj(value, where, key)
    out: dict[str, bytes] = {}
    for k, v in obj.items():
        if not isinstance(v, str):
            raise _bad(where, f"{key}[{k!r}]", "a base64 string", v)
        out[k] = _b64(v, f"{key}[{k!r}] of {where}")
    return out


# -- result maps ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireRef:
    """A reference in a ``solve`` reply: its session ``id`` and the JSON text of
    the definition it stands for (``None`` when it has none)."""

    id: str
    definition: str | None = None

    def to_wire(self) -> JSON:
        """``{"id": ..., "definition": ...}``."""
        return {"id": self.id, "definition": self.definition}

    @staticmethod
    def from_wire(value: JSON, where: str) -> WireRef:
        """Read one; :class:`ProtocolError` if malformed."""
        obj = _obj(value, where, "ref")
        return WireRef(_str(obj, "id", where), _opt_str(obj, "definition", where))


def _id_from_wire(value: JSON, where: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"a reference in {where} must be an ID string, got {_describe(value)}")
    return value


def _id_to_wire(ref_id: str) -> JSON:
    return ref_id


def result_to_wire(result: ResultMap[R], ref_to_wire: Callable[[R], JSON]) -> dict[str, JSON]:
    """A result map as JSON: ``ref``, ``refs``, ``metadata`` (base64) and
    ``attestations`` (each ``kind``, ``ref``, ``path``, ``metadata``), with each
    reference written by ``ref_to_wire``. O(size)."""
    return {
        "ref": ref_to_wire(result.ref) if result.ref is not None else None,
        "refs": {key: ref_to_wire(ref) for key, ref in result.refs.items()},
        "metadata": {key: _b64_text(value) for key, value in result.metadata.items()},
        "attestations": {
            key: [
                {
                    "kind": att.kind,
                    "ref": ref_to_wire(att.ref) if att.ref is not None else None,
                    "path": att.path,
                    "metadata": {k: _b64_text(v) for k, v in att.metadata.items()},
                }
                for att in atts
            ]
            for key, atts in result.attestations.items()
        },
    }


def result_from_wire(
    value: JSON, ref_from_wire: Callable[[JSON, str], R], where: str
) -> ResultMap[R]:
    """Read what :func:`result_to_wire` wrote (each field may be missing: empty),
    each reference by ``ref_from_wire(value, where)``. :class:`ProtocolError` if
    malformed. O(size)."""
    obj = _obj(value, where, "result")
    out: ResultMap[R] = ResultMap()
    ref = obj.get("ref")
    if ref is not None:
        out.set_ref(ref_from_wire(ref, f"'ref' of {where}"))
    for key, item in _obj(obj.get("refs", {}), where, "refs").items():
        out.add_ref(key, ref_from_wire(item, f"refs[{key!r}] of {where}"))
    for key, data in _bytes_map(obj.get("metadata"), where, "metadata").items():
        out.add_meta(key, data)
    for key, atts in _obj(obj.get("attestations", {}), where, "attestations").items():
        if not isinstance(atts, list):
            raise _bad(where, f"attestations[{key!r}]", "an array", atts)
        for i, att in enumerate(atts):
            at = f"attestations[{key!r}][{i}] of {where}"
            att_obj = _obj(att, at, "attestation")
            att_ref = att_obj.get("ref")
            out.add_attestation(
                key,
                Attestation(
                    _str(att_obj, "kind", at),
                    ref_from_wire(att_ref, at) if att_ref is not None else None,
                    _opt_str(att_obj, "path", at, "") or "",
                    _bytes_map(att_obj.get("metadata"), at, "metadata"),
                ),
            )
    return out


# -- file stats ----------------------------------------------------------------------------


_STAT_INTS: Final = ("mode", "size", "mtime_ns", "uid", "gid")


def stat_to_wire(stat: FileStat) -> dict[str, JSON]:
    """A :class:`~solver.worker.FileStat` as a JSON object of its fields."""
    return {
        "path": stat.path,
        "mode": stat.mode,
        "size": stat.size,
        "mtime_ns": stat.mtime_ns,
        "uid": stat.uid,
        "gid": stat.gid,
        "linkname": stat.linkname,
    }


def stat_from_wire(value: JSON, where: str) -> FileStat:
    """Read what :func:`stat_to_wire` wrote; :class:`ProtocolError` if malformed."""
    obj = _obj(value, where, "stat")
    ints = {}
    for key in _STAT_INTS:
        item = obj.get(key)
        if type(item) is not int:
            raise _bad(where, key, "an integer", item)
        ints[key] = item
    return FileStat(
        path=_str(obj, "path", where),
        linkname=_opt_str(obj, "linkname", where, "") or "",
        **ints,
    )


# -- requests (program -> gateway) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The program's first message: the protocol versions it speaks."""

    id: int
    versions: tuple[int, ...] = SUPPORTED_VERSIONS
    type: str = field(default="hello", init=False)


@dataclass(frozen=True, slots=True)
class Solve:
    """Solve a definition (JSON text) or a frontend by name, with options and
    input definitions (JSON texts)."""

    id: int
    definition: str | None = None
    frontend: str | None = None
    frontend_opts: Mapping[str, str] = field(default_factory=dict)
    frontend_inputs: Mapping[str, str] = field(default_factory=dict)
    type: str = field(default="solve", init=False)


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Build reference ``ref``."""

    id: int
    ref: str
    type: str = field(default="evaluate", init=False)


@dataclass(frozen=True, slots=True)
class ReadFile:
    """Read ``length`` bytes (``None``: to the end) of file ``path`` in ``ref``
    from ``offset``."""

    id: int
    ref: str
    path: str
    offset: int = 0
    length: int | None = None
    type: str = field(default="read_file", init=False)


@dataclass(frozen=True, slots=True)
class ReadDir:
    """List directory ``path`` in ``ref`` (names matching ``pattern``)."""

    id: int
    ref: str
    path: str
    pattern: str | None = None
    type: str = field(default="read_dir", init=False)


@dataclass(frozen=True, slots=True)
class StatFile:
    """The entry ``path`` in ``ref``."""

    id: int
    ref: str
    path: str
    type: str = field(default="stat_file", init=False)


@dataclass(frozen=True, slots=True)
class Release:
    """Let references go early."""

    id: int
    refs: tuple[str, ...]
    type: str = field(default="release", init=False)


@dataclass(frozen=True, slots=True, eq=False)
class Return:
    """The program's outcome: a result of reference IDs, or an error message
    (exactly one of them)."""

    id: int
    result: ResultMap[str] | None = None
    error: str | None = None
    type: str = field(default="return", init=False)


#: Any request a program sends.
Request: TypeAlias = Hello | Solve | Evaluate | ReadFile | ReadDir | StatFile | Release | Return


def request_to_wire(request: Request) -> dict[str, JSON]:
    """The JSON message of ``request``."""
    msg: dict[str, JSON] = {"type": request.type, "id": request.id}
    if isinstance(request, Hello):
        msg["versions"] = list(request.versions)
    elif isinstance(request, Solve):
        msg["definition"] = request.definition
        msg["frontend"] = request.frontend
        msg["frontend_opts"] = dict(request.frontend_opts)
        msg["frontend_inputs"] = dict(request.frontend_inputs)
    elif isinstance(request, Evaluate):
        msg["ref"] = request.ref
    elif isinstance(request, ReadFile):
        msg.update(ref=request.ref, path=request.path, offset=request.offset,
                   length=request.length)
    elif isinstance(request, ReadDir):
        msg.update(ref=request.ref, path=request.path, pattern=request.pattern)
    elif isinstance(request, StatFile):
        msg.update(ref=request.ref, path=request.path)
    elif isinstance(request, Release):
        msg["refs"] = list(request.refs)
    else:
        if request.result is not None:
            msg["result"] = result_to_wire(request.result, _id_to_wire)
        else:
            msg["error"] = request.error
    return msg


def parse_request(msg: Mapping[str, JSON]) -> Request:
    """The request in ``msg`` (a decoded message); :class:`ProtocolError` for an
    unknown type or a malformed field."""
    kind = msg.get("type")
    where = f"a {kind!r} message"
    if kind not in _REQUEST_TYPES:
        raise ProtocolError(
            f"unknown message type {kind!r}; requests are {', '.join(_REQUEST_TYPES)}"
        )
    rid = _int(msg, "id", where)
    if kind == "hello":
        versions = msg.get("versions")
        if (
            not isinstance(versions, list)
            or not versions
            or not all(type(v) is int for v in versions)
        ):
            raise _bad(where, "versions", "a non-empty array of integers", versions)
        return Hello(rid, tuple(versions))
    if kind == "solve":
        definition = _opt_str(msg, "definition", where)
        frontend = _opt_str(msg, "frontend", where)
        if (definition is None) == (frontend is None):
            raise ProtocolError(f"{where} needs exactly one of 'definition' and 'frontend'")
        return Solve(
            rid,
            definition,
            frontend,
            _str_map(msg, "frontend_opts", where),
            _str_map(msg, "frontend_inputs", where),
        )
    if kind == "evaluate":
        return Evaluate(rid, _str(msg, "ref", where))
    if kind == "read_file":
        return ReadFile(
            rid,
            _str(msg, "ref", where),
            _str(msg, "path", where),
            _int(msg, "offset", where, default=0),
            _opt_int(msg, "length", where),
        )
    if kind == "read_dir":
        return ReadDir(
            rid, _str(msg, "ref", where), _str(msg, "path", where), _opt_str(msg, "pattern", where)
        )
    if kind == "stat_file":
        return StatFile(rid, _str(msg, "ref", where), _str(msg, "path", where))
    if kind == "release":
        refs = msg.get("refs")
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise _bad(where, "refs", "an array of strings", refs)
        return Release(rid, tuple(refs))
    # return
    has_result = msg.get("result") is not None
    has_error = msg.get("error") is not None
    if has_result == has_error:
        raise ProtocolError(f"{where} needs exactly one of 'result' and 'error'")
    if has_error:
        return Return(rid, error=_str(msg, "error", where))
    return Return(rid, result=result_from_wire(msg["result"], _id_from_wire, where))


_REQUEST_TYPES: Final = (
    "hello", "solve", "evaluate", "read_file", "read_dir", "stat_file", "release", "return",
)


# -- replies (gateway -> program) ----------------------------------------------------------


def reply(request_id: int, **fields: JSON) -> dict[str, JSON]:
    """A successful answer to request ``request_id``."""
    return {"type": "reply", "id": request_id, **fields}


def error_reply(request_id: int | None, message: str) -> dict[str, JSON]:
    """A failed answer to request ``request_id``; ``None``: the session is over."""
    return {"type": "error", "id": request_id, "message": message}


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: the request's ``id`` and the other fields."""

    id: int
    fields: Mapping[str, JSON]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed answer to request ``id``, or (``id`` ``None``) the end of the
    session."""

    id: int | None
    message: str


def parse_reply(msg: Mapping[str, JSON]) -> Reply | ErrorReply:
    """The answer in ``msg``; :class:`ProtocolError` if it is none."""
    kind = msg.get("type")
    where = f"a {kind!r} message"
    if kind == "reply":
        rid = _int(msg, "id", where)
        return Reply(rid, {k: v for k, v in msg.items() if k not in ("type", "id")})
    if kind == "error":
        message = _str(msg, "message", where)
        if msg.get("id") is None:
            return ErrorReply(None, message)
        return ErrorReply(_int(msg, "id", where), message)
    raise ProtocolError(f"unknown message type {kind!r}; the gateway sends 'reply' and 'error'")


@dataclass(frozen=True, slots=True)
class HelloReply:
    """The gateway's answer to ``hello``: the version chosen, the build options,
    the input definitions (JSON texts) and the message size limit."""

    version: int
    opts: Mapping[str, str]
    inputs: Mapping[str, str]
    max_message_size: int


def parse_hello_reply(fields: Mapping[str, JSON]) -> HelloReply:
    """Read the fields of the ``hello`` reply; :class:`ProtocolError` if malformed."""
    where = "the 'hello' reply"
    return HelloReply(
        _int(fields, "version", where),
        _str_map(fields, "opts", where),
        _str_map(fields, "inputs", where),
        _int(fields, "max_message_size", where),
    )


def data_from_wire(fields: Mapping[str, JSON], where: str) -> bytes:
    """The base64 ``data`` field of a ``read_file`` reply."""
    return _b64(_str(fields, "data", where), f"'data' of {where}")


def data_to_wire(data: bytes) -> str:
    """Bytes as the base64 text the protocol carries."""
    return _b64_text(data)


def stats_from_wire(fields: Mapping[str, JSON], where: str) -> list[FileStat]:
    """The ``entries`` field of a ``read_dir`` reply."""
    entries = fields.get("entries")
    if not isinstance(entries, list):
        raise _bad(where, "entries", "an array", entries)
    return [stat_from_wire(e, f"entries[{i}] of {where}") for i, e in enumerate(entries)]


# -- in-memory byte streams ----------------------------------------------------------------


class MemoryByteStream(ByteStream):
    """One end of an in-process byte pipe (:func:`memory_byte_stream_pair`).

    ``send`` never blocks (the buffer is unbounded); ``receive`` returns at most
    ``max_bytes`` and keeps the rest for the next call. ``send_eof`` ends what
    this end sends; ``aclose`` closes both directions."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._pending = b""

    async def receive(self, max_bytes: int = _READ_CHUNK) -> bytes:
        """Up to ``max_bytes`` bytes; :class:`anyio.EndOfStream` once the other end
        sent EOF or closed."""
        if self._pending:
            await anyio.lowlevel.checkpoint()
            data = self._pending
        else:
            data = await self._receive.receive()
        self._pending = data[max_bytes:]
        return data[:max_bytes]

    async def send(self, item: bytes) -> None:
        """Send ``item``; :class:`anyio.BrokenResourceError` if the other end closed."""
        if not item:
            await anyio.lowlevel.checkpoint()
            return
        await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        """Send no more (the other end's ``receive`` then ends)."""
        await self._send.aclose()

    async def aclose(self) -> None:
        """Close both directions."""
        await self._send.aclose()
        await self._receive.aclose()


def memory_byte_stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    """Two connected in-process byte streams: what one sends, the other receives."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](math.inf)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](math.inf)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)
