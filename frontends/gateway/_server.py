"""The solver side of the gateway: one session per frontend program.

A :class:`GatewaySession` speaks the protocol (``docs/gateway-protocol.md``) over
any byte stream. :class:`Gateway` runs a program as a subprocess and connects a
session to its stdin and stdout; :class:`InProcessGateway` runs a build function
(or a raw protocol program) in this process over an in-memory pipe, which is how
tests and users check a frontend program quickly.

Ownership (BuildKit's ``llbBridgeForwarder`` after PR #2929, without its weak
spots). The session keeps a table ``ID -> ProxyHolder``; IDs are random and
unguessable (``secrets.token_urlsafe``), so an ID from another session is simply
unknown here. Every proxy in a ``solve`` answer is adopted into the table, under
a new ID, before the first await after the bridge answered, so a cancellation
can never drop one. ``return`` hands out one new half per *occurrence* of an ID
(``ProxyHolder.hand_out``), so a result never holds one proxy object twice; if
an ID is unknown or released, every half that return had already split is
released at once and the return fails naming the ID (BuildKit left those halves
in a discarded local result). A return is accepted once; a failed one is final.
A second ``return`` breaks the one-outcome rule, so it is refused (an error
answer, without looking at the IDs it names, so it splits nothing) and fails the
solve; the first result, which can no longer be the outcome, is released at once.
BuildKit keeps the first result instead, which hides a program whose two code
paths both think they decide the build.
:meth:`GatewaySession.discard`, which always runs, releases every holder's own
half and the returned result unless the caller took it; so a failure *after* a
successful return (a non-zero exit, a timeout, a protocol error) releases that
result before reporting the error (BuildKit replaced it with ``nil`` first and
leaked it).

Requests are served concurrently, each in a task of the session's task group;
they are cancelled when the program closes its output or breaks the protocol.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import signal
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import ByteStream
from anyio.streams.stapled import StapledByteStream

from solver import (
    Bridge,
    CachedResult,
    Definition,
    FrontendResult,
    ResultProxy,
    SolveError,
    SolveRequest,
)
from solver.bridge import ResultMap

from .._api import BuildFunction
from .._holder import ProxyHolder, read_dir, read_file, release_all, stat_file
from ._protocol import (
    JSON,
    MAX_MESSAGE_SIZE,
    SUPPORTED_VERSIONS,
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
    data_to_wire,
    error_reply,
    memory_byte_stream_pair,
    parse_request,
    reply,
    result_to_wire,
    stat_to_wire,
)
from .client import run_build

__all__ = ["MAX_IN_FLIGHT", "Gateway", "GatewaySession", "InProcessGateway", "Program"]

_log = logging.getLogger("frontends.gateway")

#: How many requests a program may have unanswered at once before the session
#: fails (a program flooding the gateway with requests is broken).
MAX_IN_FLIGHT: Final = 1024

#: How much of a program's stderr is kept for error messages.
_TAIL_BYTES: Final = 8192
_TAIL_LINES: Final = 25

#: A raw protocol program run in process: it speaks over the stream it is given
#: and returns its exit status.
Program = Callable[[ByteStream], Awaitable[int]]

_CONNECTION_LOST = (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError)


class GatewaySession:
    """One frontend program's session: its reference table and its requests.

    Call :meth:`run` with a byte stream connected to the program, then decide the
    outcome (:attr:`protocol_error`, :attr:`error`, :attr:`returned`, then
    :meth:`take_result`), and always :meth:`discard`. ``opts`` and ``inputs`` are
    what the ``hello`` reply tells the program.
    """

    __slots__ = (
        "_bridge",
        "_discarded",
        "_error",
        "_in_flight",
        "_inputs",
        "_max",
        "_max_in_flight",
        "_opts",
        "_protocol_error",
        "_refs",
        "_result",
        "_returns",
        "_version",
    )

    def __init__(
        self,
        bridge: Bridge,
        opts: Mapping[str, str],
        inputs: Mapping[str, Definition],
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._bridge = bridge
        self._opts = dict(opts)
        self._inputs = dict(inputs)
        self._max = max_message_size
        self._max_in_flight = max_in_flight
        self._refs: dict[str, ProxyHolder] = {}
        self._in_flight: set[int] = set()
        self._result: FrontendResult | None = None
        self._error: SolveError | None = None
        self._protocol_error: ProtocolError | None = None
        self._returns = 0
        self._discarded = False
        self._version: int | None = None

    def __repr__(self) -> str:
        state = (
            "discarded" if self._discarded
            else "broken" if self._protocol_error is not None
            else "failed" if self._error is not None
            else "returned" if self._returns
            else "open"
        )
        return f"<GatewaySession {state} refs={len(self._refs)} in_flight={len(self._in_flight)}>"

    # -- what the caller reads ------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The protocol version agreed in ``hello`` (``None`` before it)."""
        return self._version

    @property
    def protocol_error(self) -> ProtocolError | None:
        """Why the session broke, if the program broke the protocol."""
        return self._protocol_error

    @property
    def returned(self) -> bool:
        """True once the program sent a ``return`` (accepted or not)."""
        return self._returns > 0

    @property
    def error(self) -> SolveError | None:
        """The error the program returned, why its return was refused, or that it
        returned twice."""
        return self._error

    @property
    def has_result(self) -> bool:
        """True while a successfully returned result is held by the session."""
        return self._result is not None

    @property
    def ref_ids(self) -> list[str]:
        """The IDs handed out so far (for tests and debugging)."""
        return list(self._refs)

    def take_result(self) -> FrontendResult:
        """Hand the returned result to the caller, who then owns it. Raises
        :class:`~solver.SolveError` if there is none."""
        result, self._result = self._result, None
        if result is None:
            raise SolveError("the frontend session holds no returned result")
        return result

    async def discard(self) -> None:
        """End the session: release every reference's own half, and the returned
        result unless :meth:`take_result` took it. Idempotent; never a cancel
        point; a release that fails is logged and the others still happen."""
        self._discarded = True
        holders = list(self._refs.values())
        self._refs.clear()
        result, self._result = self._result, None
        with anyio.CancelScope(shield=True):
            for holder in holders:
                holder.forget_handed()  # the result (if any) owns them
                try:
                    await holder.release()
                except Exception:
                    _log.exception("releasing %r failed", holder)
            if result is not None:
                await _release_result(result)
            await anyio.lowlevel.checkpoint()

    # -- speaking ---------------------------------------------------------------------------

    async def run(self, stream: ByteStream) -> None:
        """Serve the program on ``stream`` until it closes its side or breaks the
        protocol (then :attr:`protocol_error` is set and the program is told so,
        best effort); requests still running are cancelled and ``stream`` is
        closed. Never raises for what the program does; cancellation propagates.
        """
        reader = FrameReader(stream, self._max)
        writer = FrameWriter(stream, self._max)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    await self._serve(reader, writer, tg)
                except ProtocolError as exc:
                    self._protocol_error = exc
                tg.cancel_scope.cancel()
            if self._protocol_error is not None:
                with anyio.move_on_after(1.0):
                    try:
                        await writer.send(error_reply(None, str(self._protocol_error)))
                    except (*_CONNECTION_LOST, OSError, ProtocolError):
                        pass
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except (*_CONNECTION_LOST, OSError):
                    pass

    async def _serve(
        self, reader: FrameReader, writer: FrameWriter, tg: anyio.abc.TaskGroup
    ) -> None:
        message = await reader.receive()
        if message is None:
            return  # closed before saying hello: "exited without returning"
        first = parse_request(message)
        if not isinstance(first, Hello):
            raise ProtocolError(f"the first message must be 'hello', got {first.type!r}")
        await self._hello(first, writer)
        while True:
            message = await reader.receive()
            if message is None:
                return
            request = parse_request(message)
            if isinstance(request, Hello):
                raise ProtocolError("a second 'hello' message")
            if request.id in self._in_flight:
                raise ProtocolError(
                    f"request id {request.id} is already in use by an unanswered request"
                )
            if len(self._in_flight) >= self._max_in_flight:
                raise ProtocolError(
                    f"more than {self._max_in_flight} requests unanswered at once"
                )
            self._in_flight.add(request.id)
            tg.start_soon(self._handle, request, writer, name=f"gateway {request.type}")

    async def _hello(self, hello: Hello, writer: FrameWriter) -> None:
        common = [v for v in hello.versions if v in SUPPORTED_VERSIONS]
        if not common:
            raise ProtocolError(
                f"no common protocol version: the program speaks {list(hello.versions)}, "
                f"this gateway speaks {list(SUPPORTED_VERSIONS)}"
            )
        self._version = max(common)
        answer = reply(
            hello.id,
            version=self._version,
            opts=self._opts,
            inputs={name: d.to_json() for name, d in self._inputs.items()},
            max_message_size=self._max,
        )
        try:
            await writer.send(answer)
        except ProtocolError as exc:
            raise ProtocolError(f"cannot send the build options and inputs: {exc}") from exc
        except _CONNECTION_LOST:
            return  # the reader sees the end of the stream next

    async def _handle(self, request: Request, writer: FrameWriter) -> None:
        try:
            fields = await self._dispatch(request)
        except SolveError as exc:
            answer = error_reply(request.id, str(exc))
        except Exception as exc:
            _log.exception("gateway request %s failed", request.type)
            answer = error_reply(request.id, f"{request.type} failed: {exc!r}")
        except BaseException as exc:
            if not _error_leaves(exc):
                raise
            # Errors raised while this request was being cancelled (a nested
            # frontend's task group): nobody will read the answer, and letting them
            # out would turn the session's end into an exception group.
            _log.debug("gateway request %s failed while cancelled", request.type, exc_info=exc)
            return
        else:
            answer = reply(request.id, **fields)
        # Free the id first: the program may reuse it as soon as it reads the answer.
        self._in_flight.discard(request.id)
        try:
            try:
                await writer.send(answer)
            except ProtocolError as exc:  # the answer is too large for one message
                await writer.send(error_reply(request.id, str(exc)))
        except (*_CONNECTION_LOST, OSError):
            pass  # the program is gone; the reader sees the end of the stream

    async def _dispatch(self, request: Request) -> dict[str, JSON]:
        if isinstance(request, Solve):
            return await self._solve(request)
        if isinstance(request, Evaluate):
            await self._holder(request.ref).proxy.result()
            return {}
        if isinstance(request, ReadFile):
            value = await self._value(request.ref)
            try:
                data = await read_file(
                    value, request.ref, request.path, request.offset, request.length
                )
            finally:
                await _release(value)
            return {"data": data_to_wire(data)}
        if isinstance(request, ReadDir):
            value = await self._value(request.ref)
            try:
                entries = await read_dir(value, request.ref, request.path, request.pattern)
            finally:
                await _release(value)
            return {"entries": [stat_to_wire(e) for e in entries]}
        if isinstance(request, StatFile):
            value = await self._value(request.ref)
            try:
                stat = await stat_file(value, request.ref, request.path)
            finally:
                await _release(value)
            return {"stat": stat_to_wire(stat)}
        if isinstance(request, Release):
            return await self._release(request)
        assert isinstance(request, Return)
        return await self._return(request)

    # -- the reference table ------------------------------------------------------------------

    def _holder(self, ref_id: str) -> ProxyHolder:
        holder = self._refs.get(ref_id)
        if holder is None:
            raise SolveError(_unknown(ref_id))
        if holder.released:
            raise SolveError(f"reference {ref_id} was released")
        return holder

    async def _value(self, ref_id: str) -> CachedResult:
        """A handle of its own on the built value of ``ref_id`` (the caller releases
        it), so a release of the reference during a read cannot pull the value away."""
        value = await self._holder(ref_id).proxy.result()
        clone = value.clone()
        assert isinstance(clone, CachedResult)
        return clone

    def _new_id(self) -> str:
        while True:
            ref_id = "ref-" + secrets.token_urlsafe(18)
            if ref_id not in self._refs:
                return ref_id

    async def _solve(self, request: Solve) -> dict[str, JSON]:
        solve_request = SolveRequest(
            definition=(
                Definition.from_json(request.definition)
                if request.definition is not None
                else None
            ),
            frontend=request.frontend,
            frontend_opts=dict(request.frontend_opts),
            frontend_inputs={
                name: Definition.from_json(text)
                for name, text in request.frontend_inputs.items()
            },
        )
        answer = await self._bridge.solve(solve_request)
        if not isinstance(answer, FrontendResult):
            raise SolveError(
                f"the bridge answered a solve with a {type(answer).__name__}, "
                "not a FrontendResult"
            )
        if self._discarded:
            # A request that outlived its session (it never should): nobody else
            # would release what the bridge gave it.
            await answer.release()
            raise SolveError("the frontend session is over")
        return {"result": result_to_wire(self._adopt(answer), WireRef.to_wire)}

    def _adopt(self, answer: FrontendResult) -> ResultMap[WireRef]:
        """Store every proxy of ``answer`` under a new ID (synchronously: nothing can
        interrupt it) and describe the answer by those IDs."""
        wire_refs: dict[int, WireRef] = {}
        for proxy in answer.each_ref():
            ref_id = self._new_id()
            self._refs[ref_id] = ProxyHolder(proxy)
            definition = proxy.definition
            wire_refs[id(proxy)] = WireRef(
                ref_id, definition.to_json() if isinstance(definition, Definition) else None
            )
        wire: ResultMap[WireRef] = ResultMap()
        return answer.convert_into(wire, lambda proxy, _: wire_refs[id(proxy)])

    async def _release(self, request: Release) -> dict[str, JSON]:
        unknown = [ref_id for ref_id in request.refs if ref_id not in self._refs]
        for ref_id in request.refs:
            holder = self._refs.get(ref_id)
            if holder is not None:
                await holder.release()
        if unknown:
            raise SolveError(
                "cannot release " + ", ".join(_unknown(ref_id) for ref_id in unknown)
            )
        return {}

    async def _return(self, request: Return) -> dict[str, JSON]:
        # Nothing awaits before the outcome is recorded (here and in _handle and
        # _dispatch), and a task runs up to its first checkpoint even when its scope
        # is already cancelled: so a return the session has read counts even if the
        # program closes its output at once, which cancels the requests in flight.
        self._returns += 1
        if self._returns > 1:
            await self._refuse_another_return()
            raise SolveError(
                "the frontend already returned: a result may be set only once "
                "(the solve fails)"
            )
        if request.result is None:
            assert request.error is not None
            self._error = SolveError(request.error)
            return {}
        handed: list[ResultProxy] = []
        try:
            result = self._build_result(request.result, handed)
        except SolveError as exc:
            self._error = SolveError(f"its result was refused: {exc}")
            # Nobody else will ever see these halves: without this, each wrapped
            # proxy would wait forever for its last release.
            await release_all(handed)
            raise
        self._result = result
        return {}

    async def _refuse_another_return(self) -> None:
        """A second (or later) return: the solve fails, and the first result, which
        can never be the outcome now, is released at once. The refused return is not
        looked at, so whatever it names (IDs of the first result, others, forged or
        released ones) splits nothing; the table's own halves go when the session
        ends, as always."""
        if self._returns == 2:  # a third return changes nothing
            first = self._error
            why = "it returned twice (a result may be set only once)"
            # The program's own first outcome, when it was a failure, is kept: it is
            # usually the more useful half of the story.
            self._error = SolveError(
                why if first is None else f"{why}; its first return failed: {first}"
            )
        result, self._result = self._result, None
        if result is not None:
            await _release_result(result)

    def _build_result(self, wire: ResultMap[str], handed: list[ResultProxy]) -> FrontendResult:
        """One new half per occurrence of each ID (recorded in ``handed`` as it is
        made). Synchronous, so no other request interleaves."""

        def take(ref_id: str, where: str) -> ResultProxy:
            holder = self._refs.get(ref_id)
            if holder is None:
                raise SolveError(f"{where}: {_unknown(ref_id)}")
            if holder.released:
                raise SolveError(f"{where}: reference {ref_id} was released")
            half = holder.hand_out()
            handed.append(half)
            holder.forget_handed()  # the result owns it (or the failure path releases it)
            return half

        return wire.convert_into(FrontendResult(), take)


def _unknown(ref_id: str) -> str:
    shown = ref_id if len(ref_id) <= 64 else ref_id[:64] + "..."
    return (
        f"unknown reference {shown!r} (not an ID this frontend session handed out; "
        "IDs are valid only in their own session)"
    )


def _error_leaves(exc: BaseException) -> list[Exception]:
    """The leaves of ``exc`` (flattening exception groups) that are errors, not
    cancellations; empty when ``exc`` is (only) a cancellation, or holds something
    that must propagate (``KeyboardInterrupt``, ``SystemExit``)."""
    cancelled = anyio.get_cancelled_exc_class()
    errors: list[Exception] = []
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        elif isinstance(e, Exception):
            errors.append(e)
        elif not isinstance(e, cancelled):
            return []
    return errors


async def _release(value: CachedResult) -> None:
    with anyio.CancelScope(shield=True):
        await value.release()


async def _release_result(result: FrontendResult) -> None:
    """Release a returned result that will never be the solve's; shielded, and a
    failure is logged (the caller goes on releasing the rest)."""
    with anyio.CancelScope(shield=True):
        try:
            await result.release()
        except Exception:
            _log.exception("releasing the returned result failed")


# -- deciding the outcome ----------------------------------------------------------------------


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "was still running"
    if status >= 0:
        return f"exited with code {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = str(-status)
    return f"was killed by signal {name}"


def _with_tail(message: str, tail: str) -> str:
    if not tail:
        return message
    return f"{message}\n--- its stderr ends with ---\n{tail}"


def _conclude(
    session: GatewaySession, who: str, status: int | None, problem: str | None, tail: str
) -> FrontendResult:
    """The session's outcome once its program is gone: the result (taken from the
    session) or a :class:`~solver.SolveError`. Precedence: a protocol error, then
    what the program returned as an error (or a refused return), then a problem the
    runner saw (timeout, no exit), then the exit status."""
    if session.protocol_error is not None:
        raise SolveError(
            _with_tail(f"{who} broke the gateway protocol: {session.protocol_error}", tail)
        )
    if session.error is not None:
        raise SolveError(f"{who} failed: {session.error}")
    if problem is not None:
        raise SolveError(_with_tail(f"{who} {problem}", tail))
    if session.has_result:
        if status != 0:
            raise SolveError(
                _with_tail(f"{who} {_describe_exit(status)} after returning its result", tail)
            )
        return session.take_result()
    raise SolveError(_with_tail(f"{who} exited without returning ({_describe_exit(status)})", tail))


class _Tail:
    """The last bytes a program wrote to stderr."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > 2 * _TAIL_BYTES:
            del self._data[:-_TAIL_BYTES]

    def text(self) -> str:
        data = bytes(self._data[-_TAIL_BYTES:])
        lines = data.decode("utf-8", "replace").rstrip().splitlines()
        return "\n".join(lines[-_TAIL_LINES:])


# -- the subprocess gateway ---------------------------------------------------------------------


class Gateway:
    """A :class:`solver.Frontend` that runs a frontend program and speaks the
    gateway protocol with it over the program's stdin and stdout.

    The program is ``opts["source"]``, a command line (split with
    :func:`shlex.split`, run without a shell, in a new process group). When
    ``allowed_sources`` is given, a source that is not exactly one of its strings
    is refused before anything runs. The program is handed every option (``source``
    included) and the input definitions in the ``hello`` reply.

    The solve fails with a :class:`~solver.SolveError` when the program returns an
    error (its message), returns an unknown or released reference, returns twice,
    breaks the protocol (garbage, a truncated or oversized message, an unknown
    message type), exits without returning (exit code and the end of its stderr),
    exits non-zero after returning, runs longer than ``timeout`` seconds (when
    given), or does not exit within ``exit_grace`` seconds of closing its stdout.
    It is killed (its whole process group) whenever it is still running at that
    point and when the solve is cancelled. Every reference the session handed out
    is released on every path; the result is the caller's only on success.
    """

    __slots__ = ("_allowed", "_exit_grace", "_max", "_timeout")

    def __init__(
        self,
        allowed_sources: Collection[str] | None = None,
        *,
        timeout: float | None = None,
        exit_grace: float = 5.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self._allowed = frozenset(allowed_sources) if allowed_sources is not None else None
        self._timeout = timeout
        self._exit_grace = exit_grace
        self._max = max_message_size

    def __repr__(self) -> str:
        allowed = "any" if self._allowed is None else str(len(self._allowed))
        return f"<Gateway allowed_sources={allowed} timeout={self._timeout}>"

    async def solve(
        self,
        bridge: Bridge,
        opts: Mapping[str, str],
        inputs: Mapping[str, Definition],
    ) -> FrontendResult:
        """Run the program of ``opts["source"]`` in a new session (see the class)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        source = opts.get("source")
        if not source:
            raise SolveError(
                "the gateway frontend needs opts['source']: the command line of a "
                "frontend program"
            )
        if self._allowed is not None and source not in self._allowed:
            allowed = ", ".join(repr(s) for s in sorted(self._allowed)) or "none"
            raise SolveError(
                f"frontend source {source!r} is not allowed; allowed sources: {allowed}"
            )
        try:
            argv = shlex.split(source)
        except ValueError as exc:
            raise SolveError(f"frontend source {source!r} is not a command line: {exc}") from exc
        if not argv:
            raise SolveError(f"frontend source {source!r} is an empty command line")
        who = f"frontend program {source!r}"
        session = GatewaySession(bridge, opts, inputs, max_message_size=self._max)
        try:
            status, problem, tail = await self._run(session, argv, who)
            return _conclude(session, who, status, problem, tail)
        finally:
            await session.discard()

    async def _run(
        self, session: GatewaySession, argv: list[str], who: str
    ) -> tuple[int | None, str | None, str]:
        """Run the program with ``session`` on its stdio; its exit status, a
        problem the runner saw (or ``None``) and the end of its stderr."""
        tail = _Tail()
        try:
            process = await anyio.open_process(argv, start_new_session=True)
        except OSError as exc:
            raise SolveError(f"cannot start {who}: {exc}") from exc
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        stream = StapledByteStream(process.stdin, process.stdout)
        stderr = process.stderr
        problem: str | None = None
        spoken = anyio.Event()
        exited = anyio.Event()
        stderr_done = anyio.Event()
        changed = anyio.Event()

        async def speak() -> None:
            try:
                await session.run(stream)
            finally:
                spoken.set()
                changed.set()

        async def wait_exit() -> None:
            await process.wait()
            exited.set()
            changed.set()

        async def drain_stderr() -> None:
            try:
                while True:
                    tail.add(await stderr.receive())
            except (anyio.EndOfStream, *_CONNECTION_LOST, OSError):
                pass
            finally:
                stderr_done.set()

        try:
            with anyio.move_on_after(self._timeout) as deadline:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain_stderr)
                    tg.start_soon(speak)
                    tg.start_soon(wait_exit)
                    await changed.wait()
                    if session.protocol_error is not None:
                        _kill(process)
                    with anyio.move_on_after(self._exit_grace):
                        await spoken.wait()
                        await exited.wait()
                    if not exited.is_set():
                        problem = (
                            f"did not exit within {self._exit_grace:g}s of closing its "
                            "output; it was killed"
                        )
                        _kill(process)
                        await exited.wait()
                    if not spoken.is_set():
                        # Exited, but something it started still holds its stdout.
                        _kill(process)
                        tg.cancel_scope.cancel()
                    with anyio.move_on_after(min(self._exit_grace, 1.0)):
                        await stderr_done.wait()
                    tg.cancel_scope.cancel()
            if deadline.cancelled_caught:
                problem = f"timed out after {self._timeout:g}s; it was killed"
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    _kill(process)
                await process.wait()
                await process.aclose()
        return process.returncode, problem, tail.text()


def _kill(process: anyio.abc.Process) -> None:
    """Kill the program's whole process group (it leads one: ``start_new_session``)."""
    if process.returncode is not None:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # pragma: no cover - not POSIX
            process.kill()
    except ProcessLookupError:
        pass


# -- the in-process gateway ---------------------------------------------------------------------


class InProcessGateway:
    """A :class:`solver.Frontend` that runs a build function in this process, but
    through the gateway protocol over an in-memory pipe: the same session, table
    and checks as :class:`Gateway`, without a subprocess. Use it to test a
    frontend program's build function, or the protocol itself
    (:meth:`for_program`).

    ``build`` sees a :class:`~frontends.gateway.client.GatewayClient`; its outcome
    is decided as for a program whose exit status is what
    :func:`~frontends.gateway.client.run_build` returns.
    """

    __slots__ = ("_max", "_name", "_program")

    def __init__(self, build: BuildFunction, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        async def program(stream: ByteStream) -> int:
            return await run_build(build, stream, max_message_size=max_message_size)

        self._program: Program = program
        self._name = getattr(build, "__qualname__", repr(build))
        self._max = max_message_size

    @classmethod
    def for_program(
        cls, program: Program, *, name: str | None = None, max_message_size: int = MAX_MESSAGE_SIZE
    ) -> InProcessGateway:
        """A gateway whose program is ``program(stream) -> exit status``, speaking
        raw protocol over ``stream`` (an exception counts as a crash, exit 1)."""
        self = cls.__new__(cls)
        self._program = program
        self._name = name or getattr(program, "__qualname__", repr(program))
        self._max = max_message_size
        return self

    def __repr__(self) -> str:
        return f"<InProcessGateway {self._name}>"

    async def solve(
        self,
        bridge: Bridge,
        opts: Mapping[str, str],
        inputs: Mapping[str, Definition],
    ) -> FrontendResult:
        """Run the program in a new session (see :class:`Gateway` for the outcome)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        who = f"in-process frontend {self._name!r}"
        session = GatewaySession(bridge, opts, inputs, max_message_size=self._max)
        server_end, program_end = memory_byte_stream_pair()
        status: list[int | None] = [None]
        crash: list[str] = []

        async def program() -> None:
            try:
                status[0] = await self._program(program_end)
            except BaseException as exc:
                errors = _error_leaves(exc)
                if not errors:
                    raise
                # A crash, perhaps while being cancelled (errors from the program's
                # own task group): it is the program's outcome, never an exception
                # group escaping the session.
                _log.debug("%s crashed", who, exc_info=exc)
                crash.append("; ".join(f"{type(e).__name__}: {e}" for e in errors))
                status[0] = 1
            finally:
                with anyio.CancelScope(shield=True):
                    await program_end.aclose()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(program)
                await session.run(server_end)
                if session.protocol_error is not None:
                    tg.cancel_scope.cancel()
            return _conclude(session, who, status[0], None, "\n".join(crash))
        finally:
            await session.discard()
