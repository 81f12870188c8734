"""The in-process frontend: run a build function against the solver's bridge.

``Forwarder(build)`` is a :class:`solver.Frontend`. For each solve it makes a
:class:`ForwarderClient` (the :class:`~frontends.Client` the build function
sees), runs ``build(client)``, and converts the :class:`~frontends.BuildResult`
it returns into a :class:`solver.FrontendResult`.

Ownership (BuildKit's forwarder after PR #2929). Each :class:`~frontends.Reference`
the client hands out holds its own half of the proxy it stands for
(:class:`frontends._holder.ProxyHolder`). Converting the result splits that half
again for every occurrence of the reference (the main ref, each key, each
attestation), so the returned FrontendResult never holds one proxy object twice.
When the session ends, every reference's own half is released. If the session
failed (the build function raised, the conversion failed, or the solve was
cancelled), the halves already put into the result are released too: that
result is never returned, so nobody else would. Each underlying result is
therefore released exactly once on every path.

A client is good for one session: once ``Forwarder.solve`` has returned or
raised, its ``solve`` and its references' reads raise
:class:`~solver.SolveError`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import anyio
import anyio.lowlevel

from solver import Bridge, Definition, FrontendResult, ResultProxy, SolveError, SolveRequest

from ._api import BuildFunction, BuildOpts, BuildResult, Stat
from ._holder import ProxyHolder, read_dir, read_file, release_all, stat_file

__all__ = ["Forwarder", "ForwarderClient", "ForwardedReference"]


class ForwardedReference:
    """A :class:`~frontends.Reference` handed out by a :class:`ForwarderClient`.

    ``id`` is random, unique to this reference. Reads evaluate the result (once,
    shared with every other holder of it) and read from it.
    """

    __slots__ = ("_client", "_holder", "_id")

    def __init__(self, client: ForwarderClient, proxy: ResultProxy) -> None:
        self._client = client
        self._holder = ProxyHolder(proxy)
        self._id = "ref-" + secrets.token_hex(8)

    @property
    def id(self) -> str:
        """This reference's ID."""
        return self._id

    @property
    def released(self) -> bool:
        """True once this reference was released (or its session ended)."""
        return self._holder.released

    def to_definition(self) -> Definition | None:
        """The definition this reference stands for, if it has one."""
        definition = self._proxy().definition
        return definition if isinstance(definition, Definition) else None

    async def evaluate(self) -> None:
        """Build the result if it is not built yet."""
        await self._proxy().result()

    async def read_file(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of file ``path`` in the result, from ``offset``, at most ``length``."""
        value = await self._proxy().result()
        return await read_file(value, self._id, path, offset, length)

    async def read_dir(self, path: str, pattern: str | None = None) -> list[Stat]:
        """Entries of directory ``path`` in the result (names matching ``pattern``)."""
        value = await self._proxy().result()
        return await read_dir(value, self._id, path, pattern)

    async def stat_file(self, path: str) -> Stat:
        """The entry ``path`` in the result."""
        value = await self._proxy().result()
        return await stat_file(value, self._id, path)

    async def release(self) -> None:
        """Let the result go early (the session's own half); idempotent. A result
        this reference was already returned in keeps its own halves."""
        await self._holder.release()

    def _proxy(self) -> ResultProxy:
        self._client._check_live()
        if self._holder.released:
            raise SolveError(f"reference {self._id} was released")
        return self._holder.proxy

    def __repr__(self) -> str:
        state = " released" if self._holder.released else ""
        return f"<ForwardedReference {self._id} of {self._holder.id}{state}>"


class ForwarderClient:
    """The :class:`~frontends.Client` of one in-process frontend session."""

    __slots__ = ("_bridge", "_done", "_opts", "_refs")

    def __init__(
        self, bridge: Bridge, opts: Mapping[str, str], inputs: Mapping[str, Definition]
    ) -> None:
        self._bridge = bridge
        self._opts = BuildOpts(dict(opts), dict(inputs))
        self._refs: list[ForwardedReference] = []
        self._done = False

    def __repr__(self) -> str:
        state = " done" if self._done else ""
        return f"<ForwarderClient refs={len(self._refs)}{state}>"

    def build_opts(self) -> BuildOpts:
        """The options and inputs the frontend was called with."""
        return self._opts

    async def solve(self, request: SolveRequest) -> BuildResult:
        """Solve ``request`` through the bridge; each result in the answer becomes
        a new :class:`ForwardedReference` owned by this session."""
        self._check_live()
        answer = await self._bridge.solve(request)
        if self._done:
            # The session ended while the bridge was answering (a task the build
            # function left running): nobody will release what it gave us.
            await answer.release()
            self._check_live()
        wrapped: dict[int, ForwardedReference] = {}

        def wrap(proxy: ResultProxy) -> ForwardedReference:
            ref = wrapped.get(id(proxy))
            if ref is None:
                ref = wrapped[id(proxy)] = ForwardedReference(self, proxy)
                self._refs.append(ref)
            return ref

        return answer.convert_into(BuildResult(), lambda proxy, _: wrap(proxy))

    def to_frontend_result(self, result: BuildResult) -> FrontendResult:
        """Convert the build function's result: one new half per occurrence of each
        reference. On error the halves made so far stay recorded in their
        references, for :meth:`discard` to release."""
        self._check_live()
        if not isinstance(result, BuildResult):
            raise SolveError(
                f"the build function returned a {type(result).__name__}, not a "
                "frontends.BuildResult"
            )
        return result.convert_into(FrontendResult(), self._hand_out)

    def _hand_out(self, ref: object, where: str) -> ResultProxy:
        if not isinstance(ref, ForwardedReference):
            raise SolveError(
                f"{where} of the returned result is a {type(ref).__name__}, not a "
                "reference from this client"
            )
        if ref._client is not self:
            raise SolveError(
                f"{where} of the returned result is reference {ref.id}, which belongs to "
                "another frontend session"
            )
        if ref.released:
            raise SolveError(
                f"{where} of the returned result is reference {ref.id}, which was released"
            )
        return ref._holder.hand_out()

    async def discard(self, failed: bool) -> None:
        """End the session: release every reference's own half, and when ``failed``
        also every half handed out to the (unreturned) result. Never a cancel
        point; idempotent."""
        self._done = True
        refs, self._refs = self._refs, []
        with anyio.CancelScope(shield=True):
            handed: list[ResultProxy] = []
            for ref in refs:
                if failed:
                    handed.extend(ref._holder.handed)
                ref._holder.forget_handed()
                await ref._holder.release()
            await release_all(handed)

    def _check_live(self) -> None:
        if self._done:
            raise SolveError("the frontend session is over: its client can no longer be used")


def build_function_error(exc: Exception) -> SolveError:
    """The :class:`~solver.SolveError` for an exception a build function raised.

    An exception group (from the function's own task group) is described by its
    leaves, so the caller reads the real failures, never a nested group."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        stack: list[BaseException] = [exc]
        while stack:
            e = stack.pop()
            if isinstance(e, BaseExceptionGroup):
                stack.extend(reversed(e.exceptions))
            else:
                leaves.append(e)
        detail = "; ".join(str(leaf) or type(leaf).__name__ for leaf in leaves)
    else:
        detail = str(exc) or type(exc).__name__
    return SolveError(f"frontend build function failed: {detail}")


class Forwarder:
    """A :class:`solver.Frontend` that runs ``build(client)`` in process.

    Errors from the build function reach the caller as a
    :class:`~solver.SolveError` (the function's own exception as ``__cause__`` when
    it was not one already); cancellation propagates. Either way, nothing the
    session solved is left unreleased.
    """

    __slots__ = ("_build",)

    def __init__(self, build: BuildFunction) -> None:
        self._build = build

    def __repr__(self) -> str:
        name = getattr(self._build, "__qualname__", repr(self._build))
        return f"<Forwarder {name}>"

    async def solve(
        self,
        bridge: Bridge,
        opts: Mapping[str, str],
        inputs: Mapping[str, Definition],
    ) -> FrontendResult:
        """Run the build function in a new session and return its result."""
        client = ForwarderClient(bridge, opts, inputs)
        failed = True
        try:
            try:
                built = await self._build(client)
            except SolveError:
                raise
            except Exception as exc:
                raise build_function_error(exc) from exc
            result = client.to_frontend_result(built)
            failed = False
            return result
        finally:
            await client.discard(failed)

