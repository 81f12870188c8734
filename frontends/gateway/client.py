"""The frontend-program side of the gateway: the :class:`~frontends.Client` a build
function sees when it runs as a separate program.

A frontend program's whole ``main`` is one call::

    from frontends.gateway import serve

    async def build(client):
        ...
        return result

    if __name__ == "__main__":
        serve(build)

:func:`serve` keeps the process's stdout for the protocol only: it moves the real
stdin and stdout to private descriptors, points descriptor 1 (and so ``print``
and child processes) at stderr and descriptor 0 at ``/dev/null``, runs ``build``
with a :class:`GatewayClient` speaking to the gateway over the private ones, and
exits with status 0 after a successful return, 1 otherwise (after returning the
build function's error as its message).

:class:`GatewayClient` works over any anyio byte stream, so the same build
function also runs in process through the protocol
(:class:`frontends.gateway.InProcessGateway`), and, unchanged, through the
forwarder. Requests may be sent from many tasks at once: each carries its own
id and waits for its own answer. References are :class:`RemoteReference`\\ s: the
gateway holds the result, the program holds an ID; reads go over the wire, and
one reference may stand in the returned result any number of times (the gateway
splits it once per occurrence).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Final, NoReturn

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import ByteStream

from solver import Definition, SolveError, SolveRequest
from solver.bridge import ResultMap

from .._api import BuildFunction, BuildOpts, BuildResult, Stat
from ._protocol import (
    JSON,
    MAX_MESSAGE_SIZE,
    SUPPORTED_VERSIONS,
    ErrorReply,
    Evaluate,
    FrameReader,
    FrameWriter,
    Hello,
    ProtocolError,
    ReadDir,
    ReadFile,
    Release,
    Request,
    Return,
    Solve,
    StatFile,
    WireRef,
    data_from_wire,
    parse_hello_reply,
    parse_reply,
    request_to_wire,
    result_from_wire,
    stat_from_wire,
    stats_from_wire,
)

__all__ = ["GatewayClient", "RemoteReference", "run_build", "serve"]

_log = logging.getLogger("frontends.gateway")

#: Room left in a message for everything around the base64 data of a read.
_ENVELOPE: Final = 4096

_CONNECTION_LOST = (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError)


class RemoteReference:
    """A :class:`~frontends.Reference` held by the gateway, named here by its ID.

    ``id`` is the gateway's random ID for it (valid only in this session).
    ``evaluate``, ``read_file``, ``read_dir`` and ``stat_file`` are requests to the
    gateway; ``read_file`` reads in chunks that fit one message, so any size works.
    ``release`` asks the gateway to let its half go (a result it was already
    returned in keeps its own); afterwards the reference raises
    :class:`~solver.SolveError` when used.
    """

    __slots__ = ("_client", "_definition", "_definition_text", "_id", "_released")

    def __init__(self, client: GatewayClient, ref_id: str, definition: str | None) -> None:
        self._client = client
        self._id = ref_id
        self._definition_text = definition
        self._definition: Definition | None = None
        self._released = False

    @property
    def id(self) -> str:
        """The gateway's ID for this reference."""
        return self._id

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<RemoteReference {self._id}{state}>"

    def to_definition(self) -> Definition | None:
        """The definition this reference stands for (read from the gateway's answer
        on first use), or ``None``."""
        if self._definition is None and self._definition_text is not None:
            self._definition = Definition.from_json(self._definition_text)
        return self._definition

    async def evaluate(self) -> None:
        """Have the gateway build the result if it is not built yet."""
        self._check_live()
        await self._client._call(Evaluate(0, self._id))

    async def read_file(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of file ``path`` in the result, from ``offset``, at most ``length``
        (all by default)."""
        self._check_live()
        if offset < 0 or (length is not None and length < 0):
            raise SolveError(f"reading {path!r}: offset and length must not be negative")
        chunk = self._client._chunk_size
        out = bytearray()
        position, remaining = offset, length
        while True:
            want = chunk if remaining is None else min(chunk, remaining)
            fields = await self._client._call(ReadFile(0, self._id, path, position, want))
            data = data_from_wire(fields, "the 'read_file' reply")
            out += data
            position += len(data)
            if remaining is not None:
                remaining -= len(data)
            if len(data) < want or remaining == 0:
                return bytes(out)

    async def read_dir(self, path: str, pattern: str | None = None) -> list[Stat]:
        """Entries of directory ``path`` in the result (names matching ``pattern``)."""
        self._check_live()
        fields = await self._client._call(ReadDir(0, self._id, path, pattern))
        return stats_from_wire(fields, "the 'read_dir' reply")

    async def stat_file(self, path: str) -> Stat:
        """The entry ``path`` in the result."""
        self._check_live()
        fields = await self._client._call(StatFile(0, self._id, path))
        return stat_from_wire(fields.get("stat"), "the 'stat_file' reply")

    async def release(self) -> None:
        """Let the result go early; idempotent, never a cancel point. Does nothing
        once the session is over (the gateway released everything then)."""
        if self._released or not self._client._usable:
            self._released = True
            await anyio.lowlevel.checkpoint()
            return
        self._released = True
        with anyio.CancelScope(shield=True):
            try:
                await self._client._call(Release(0, (self._id,)))
            except SolveError:
                if self._client._usable:
                    raise

    def _check_live(self) -> None:
        if self._released:
            raise SolveError(f"reference {self._id} was released")


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("error", "event", "fields")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.fields: Mapping[str, JSON] = {}
        self.error: str | None = None

    def answer(self, fields: Mapping[str, JSON]) -> None:
        self.fields = fields
        self.event.set()

    def fail(self, message: str) -> None:
        if not self.event.is_set():
            self.error = message
            self.event.set()


class GatewayClient:
    """The :class:`~frontends.Client` of a frontend program, over a byte stream
    connected to a gateway.

    Use it as an async context manager: entering says ``hello`` (and reads the
    build options and inputs), leaving closes the stream. In between,
    :meth:`solve` and the references' reads are requests, which many tasks may
    send at once; :meth:`return_result` or :meth:`return_error` ends the build
    (once). A request fails with :class:`~solver.SolveError` carrying the
    gateway's message, or saying the connection was lost.
    """

    __slots__ = (
        "_broken",
        "_closed",
        "_max",
        "_next_id",
        "_opts",
        "_pending",
        "_reader",
        "_stream",
        "_tg",
        "_version",
        "_writer",
    )

    def __init__(self, stream: ByteStream, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._stream = stream
        self._max = max_message_size
        self._reader = FrameReader(stream, max_message_size)
        self._writer = FrameWriter(stream, max_message_size)
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._broken: str | None = None
        self._closed = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._opts = BuildOpts()
        self._version: int | None = None

    def __repr__(self) -> str:
        state = " closed" if self._closed else " broken" if self._broken else ""
        return f"<GatewayClient pending={len(self._pending)}{state}>"

    @property
    def version(self) -> int | None:
        """The protocol version agreed with the gateway."""
        return self._version

    @property
    def _usable(self) -> bool:
        return not self._closed and self._broken is None

    @property
    def _chunk_size(self) -> int:
        return max(1, (self._max - _ENVELOPE) * 3 // 4)

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> GatewayClient:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._read_loop, name="gateway client reader")
        try:
            fields = await self._call(Hello(0, SUPPORTED_VERSIONS))
            hello = parse_hello_reply(fields)
            if hello.version not in SUPPORTED_VERSIONS:
                raise ProtocolError(
                    f"the gateway chose protocol version {hello.version}, which this "
                    f"client does not speak ({list(SUPPORTED_VERSIONS)})"
                )
            inputs = {name: Definition.from_json(text) for name, text in hello.inputs.items()}
            self._version = hello.version
            self._opts = BuildOpts(dict(hello.opts), inputs)
            if hello.max_message_size < self._max:
                # never send what the gateway would refuse
                self._max = hello.max_message_size
                self._writer = FrameWriter(self._stream, self._max)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading and close the stream (the gateway sees the end of the
        session). Idempotent; never a cancel point."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                # Exited where it was entered (no scope of ours around it): the
                # reader is cancelled and waited for.
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._stream.aclose()
                except (*_CONNECTION_LOST, OSError):
                    pass

    async def _read_loop(self) -> None:
        reason = "the gateway closed the connection"
        try:
            while True:
                message = await self._reader.receive()
                if message is None:
                    break
                answer = parse_reply(message)
                if isinstance(answer, ErrorReply) and answer.id is None:
                    reason = f"the gateway ended the session: {answer.message}"
                    break
                assert answer.id is not None
                pending = self._pending.get(answer.id)
                if pending is None:
                    continue  # its requester was cancelled
                if isinstance(answer, ErrorReply):
                    pending.fail(answer.message)
                else:
                    pending.answer(answer.fields)
        except ProtocolError as exc:
            reason = f"the gateway sent something that is not a gateway message: {exc}"
        except (*_CONNECTION_LOST, OSError) as exc:
            reason = f"the connection to the gateway was lost: {exc!r}"
        finally:
            if self._closed:
                reason = "the gateway session is over: its client can no longer be used"
            self._broken = reason
            for pending in self._pending.values():
                pending.fail(reason)

    async def _call(self, request: Request) -> Mapping[str, JSON]:
        """Send ``request`` (under a fresh id: its own is ignored) and wait for its
        answer's fields."""
        if self._closed:
            raise SolveError("the gateway session is over: its client can no longer be used")
        if self._broken is not None:
            raise SolveError(self._broken)
        rid = self._next_id
        self._next_id += 1
        pending = _Pending()
        self._pending[rid] = pending
        try:
            message = request_to_wire(request)
            message["id"] = rid
            # A frame is written whole or not at all: half a frame would break the
            # stream for every other task.
            with anyio.CancelScope(shield=True):
                await self._writer.send(message)
            await pending.event.wait()
        except (*_CONNECTION_LOST, OSError) as exc:
            raise SolveError(f"the connection to the gateway was lost: {exc!r}") from exc
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise SolveError(pending.error)
        return pending.fields

    # -- the Client API ----------------------------------------------------------------------

    def build_opts(self) -> BuildOpts:
        """The options and inputs the gateway was called with."""
        return self._opts

    async def solve(self, request: SolveRequest) -> BuildResult:
        """Have the gateway solve ``request``; each result in the answer is a new
        :class:`RemoteReference`."""
        if request.frontend is not None:
            definition = None
        elif request.definition is not None:
            definition = request.definition.to_json()
        else:
            raise SolveError("a SolveRequest needs a definition or a frontend")
        inputs = {name: d.to_json() for name, d in request.frontend_inputs.items()}
        fields = await self._call(
            Solve(0, definition, request.frontend, dict(request.frontend_opts), inputs)
        )
        wire = result_from_wire(fields.get("result"), WireRef.from_wire, "the 'solve' reply")
        made: dict[str, RemoteReference] = {}

        def ref(w: WireRef) -> RemoteReference:
            found = made.get(w.id)
            if found is None:
                found = made[w.id] = RemoteReference(self, w.id, w.definition)
            return found

        return wire.convert_into(BuildResult(), lambda w, _: ref(w))

    def result_to_wire(self, result: BuildResult) -> ResultMap[str]:
        """``result`` by reference IDs, one per occurrence. Raises
        :class:`~solver.SolveError` for anything that is not a BuildResult of
        :class:`RemoteReference`\\ s."""
        if not isinstance(result, BuildResult):
            raise SolveError(
                f"the build function returned a {type(result).__name__}, not a "
                "frontends.BuildResult"
            )

        def ref_id(ref: object, where: str) -> str:
            if not isinstance(ref, RemoteReference):
                raise SolveError(
                    f"{where} of the returned result is a {type(ref).__name__}, not a "
                    "reference from a gateway client"
                )
            return ref.id

        wire: ResultMap[str] = ResultMap()
        return result.convert_into(wire, ref_id)

    async def return_result(self, result: BuildResult | ResultMap[str]) -> None:
        """Return ``result`` (a BuildResult, or one already by IDs) as the build's
        outcome. Raises :class:`~solver.SolveError` if the gateway refuses it (an
        unknown or released reference, a second return)."""
        wire = self.result_to_wire(result) if isinstance(result, BuildResult) else result
        await self._call(Return(0, result=wire))

    async def return_error(self, message: str) -> None:
        """Return an error as the build's outcome (the solve fails with
        ``message``)."""
        await self._call(Return(0, error=message or "the frontend failed"))


def _error_message(exc: BaseException) -> str:
    """What the gateway reports for a build function's exception: a SolveError's
    text, ``Type: text`` for others, and the leaves of an exception group."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        else:
            leaves.append(e)
    return "; ".join(
        str(leaf) if isinstance(leaf, SolveError) and str(leaf)
        else f"{type(leaf).__name__}: {leaf}" if str(leaf)
        else type(leaf).__name__
        for leaf in leaves
    )


async def run_build(
    build: BuildFunction, stream: ByteStream, *, max_message_size: int = MAX_MESSAGE_SIZE
) -> int:
    """Run ``build`` as a frontend program speaking over ``stream``: say hello,
    call ``build(client)``, return its result (or its error), close. The exit
    status: 0 after a successful return, 1 otherwise (the error is logged on the
    ``frontends.gateway`` logger)."""
    try:
        async with GatewayClient(stream, max_message_size=max_message_size) as client:
            try:
                built = await build(client)
                wire = client.result_to_wire(built)
            except Exception as exc:
                message = _error_message(exc)
                _log.error("the build function failed: %s", message, exc_info=exc)
                await client.return_error(message)
                return 1
            await client.return_result(wire)
            return 0
    except SolveError as exc:
        _log.error("the frontend could not finish: %s", exc)
        return 1


# -- stdio -----------------------------------------------------------------------------------


def _pollable(fd: int) -> bool:
    """Whether ``fd`` can be waited on for readiness (a pipe or a socket on POSIX);
    anything else is read and written in a worker thread."""
    if os.name != "posix":
        return False
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _FdStream(ByteStream):
    """A byte stream over a file descriptor to read and one to write, which it
    owns. Pipes and sockets are made non-blocking and waited on with
    :func:`anyio.wait_readable` / :func:`anyio.wait_writable` (cancellable, no
    thread); other files use worker threads."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd: int | None = read_fd
        self._write_fd: int | None = write_fd
        self._poll_read = _pollable(read_fd)
        self._poll_write = _pollable(write_fd)
        for fd, poll in ((read_fd, self._poll_read), (write_fd, self._poll_write)):
            if poll:
                os.set_blocking(fd, False)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; :class:`anyio.EndOfStream` at the end."""
        fd = self._read_fd
        if fd is None:
            raise anyio.ClosedResourceError
        if self._poll_read:
            await anyio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    data = os.read(fd, max_bytes)
                    break
                except BlockingIOError:
                    await anyio.wait_readable(fd)
        else:
            data = await anyio.to_thread.run_sync(os.read, fd, max_bytes, abandon_on_cancel=True)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        """Write all of ``item``; :class:`anyio.BrokenResourceError` if the reader
        has gone."""
        fd = self._write_fd
        if fd is None:
            raise anyio.ClosedResourceError
        await anyio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(item)
        while view:
            try:
                if self._poll_write:
                    written = os.write(fd, view)
                else:
                    written = await anyio.to_thread.run_sync(os.write, fd, view)
            except BlockingIOError:
                await anyio.wait_writable(fd)
                continue
            except BrokenPipeError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[written:]

    async def send_eof(self) -> None:
        """Close the write side."""
        self._close_write()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close both sides."""
        self._close_write()
        fd, self._read_fd = self._read_fd, None
        if fd is not None:
            _close_fd(fd, self._poll_read)
        await anyio.lowlevel.checkpoint()

    def _close_write(self) -> None:
        fd, self._write_fd = self._write_fd, None
        if fd is not None:
            _close_fd(fd, self._poll_write)


def _close_fd(fd: int, polled: bool) -> None:
    if polled:
        anyio.notify_closing(fd)
        try:
            os.set_blocking(fd, True)
        except OSError:
            pass
    os.close(fd)


def _take_stdio() -> tuple[int, int]:
    """Move stdin and stdout to private descriptors for the protocol; point
    descriptor 1 at stderr and descriptor 0 at ``/dev/null``."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        proto_in = os.dup(0)
        proto_out = os.dup(1)
    except OSError as exc:
        raise SystemExit(
            f"a frontend program needs stdin and stdout connected to a gateway: {exc}"
        ) from exc
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return proto_in, proto_out


def serve(
    build: BuildFunction, *, backend: str = "asyncio", max_message_size: int = MAX_MESSAGE_SIZE
) -> NoReturn:
    """The whole ``main`` of a frontend program: run ``build`` with a
    :class:`GatewayClient` speaking to the gateway over stdin and stdout, then exit
    (status 0 after a successful return, 1 otherwise). ``backend`` is the anyio
    backend to run on (``"asyncio"`` or ``"trio"``). See the module docstring for
    what happens to stdin, stdout and ``print``."""
    proto_in, proto_out = _take_stdio()

    async def main() -> int:
        return await run_build(build, _FdStream(proto_in, proto_out),
                               max_message_size=max_message_size)

    status = anyio.run(main, backend=backend)
    sys.exit(status)
