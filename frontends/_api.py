"""The API a build function programs against, whichever way it runs.

A build function is ``async def build(client: Client) -> BuildResult``. It asks
the engine to solve definitions (or other frontends) with ``client.solve``,
gets back a :class:`BuildResult` of :class:`Reference` objects, may read files
out of them, and returns a :class:`BuildResult` naming the references that make
up its output. The same function runs in process (``frontends.forwarder``) and in
a separate program over a pipe (``frontends.gateway``).

Ownership is the client's business, not the build function's: every reference a
client hands out is released when the frontend's session ends (on success, on
error, on cancellation), and each occurrence of a reference in the returned
result becomes a handle of its own. So a build function may put one reference
under any number of keys and attestations, and need never release anything;
:meth:`Reference.release` and :meth:`BuildResult.release` only let it free
intermediate results early.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, runtime_checkable

import anyio
import anyio.lowlevel

from solver import Definition, SolveRequest
from solver.bridge import ResultMap
from solver.worker import FileStat

__all__ = ["BuildFunction", "BuildOpts", "BuildResult", "Client", "Reference", "Stat"]

#: A file system entry of a result, as ``Reference.read_dir`` and
#: ``Reference.stat_file`` report it (the built-in worker's
#: :class:`solver.worker.FileStat`).
Stat = FileStat


@dataclass(frozen=True, slots=True)
class BuildOpts:
    """What the frontend was asked to build: ``opts`` (string options, such as
    ``{"platforms": "linux/amd64,linux/arm64"}``) and ``inputs`` (definitions by
    name, such as a build context)."""

    opts: Mapping[str, str] = field(default_factory=dict)
    inputs: Mapping[str, Definition] = field(default_factory=dict)


@runtime_checkable
class Reference(Protocol):
    """A result the engine solved for the frontend, lazily evaluated.

    ``id`` names it (unique per reference, stable for its life);
    ``to_definition()`` is the definition it stands for (``None`` when it came from
    another frontend without one); ``evaluate()`` builds it; ``read_file``,
    ``read_dir`` and ``stat_file`` build it if needed and read a path inside it
    (the result must be a snapshot of the built-in worker). ``release()`` lets it
    go early (idempotent); using it afterwards raises :class:`~solver.SolveError`.
    """

    @property
    def id(self) -> str: ...

    def to_definition(self) -> Definition | None: ...

    async def evaluate(self) -> None: ...

    async def read_file(self, path: str, offset: int = 0, length: int | None = None) -> bytes: ...

    async def read_dir(self, path: str, pattern: str | None = None) -> list[Stat]: ...

    async def stat_file(self, path: str) -> Stat: ...

    async def release(self) -> None: ...


class BuildResult(ResultMap[Reference]):
    """What a build function returns (and what ``client.solve`` gives it).

    The same shape as :class:`solver.FrontendResult` (``ref``, ``refs``,
    ``metadata``, ``attestations``; ``set_ref``, ``add_ref``, ``add_meta``,
    ``add_attestation``), holding :class:`Reference` objects; unlike a
    FrontendResult, one reference may stand in it any number of times. It owns
    nothing: :meth:`release` releases each distinct reference once (freeing it
    early) and empties the result.
    """

    __slots__ = ()

    async def release(self) -> None:
        """Release each distinct reference in the result once (those already
        released are skipped), then empty it. Never a cancel point."""
        refs = list({id(r): r for r in self.each_ref()}.values())
        self.ref = None
        self.refs.clear()
        self.attestations.clear()
        with anyio.CancelScope(shield=True):
            for ref in refs:
                await ref.release()  # idempotent: one already released is skipped
            await anyio.lowlevel.checkpoint()


class Client(Protocol):
    """What a build function calls: solve requests and read its options.

    ``solve(request)`` solves a :class:`~solver.SolveRequest` (a definition, or
    another frontend by name) and returns a :class:`BuildResult` of new
    references; the solve is lazy: nothing is built until a reference is
    evaluated or read, or returned and evaluated by the engine.
    """

    async def solve(self, request: SolveRequest) -> BuildResult: ...

    def build_opts(self) -> BuildOpts: ...


#: The signature of a build function: ``async def build(client) -> BuildResult``.
BuildFunction: TypeAlias = Callable[[Client], Awaitable[BuildResult]]
