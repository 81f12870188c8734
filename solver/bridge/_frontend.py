"""What frontends and the solver hand each other: results of lazy refs, attestations,
and the two protocols on either side of the boundary.

A frontend (``Frontend``) is called by the solver with a :class:`Bridge` and
returns a :class:`FrontendResult`. The result *owns* the proxies in it: it is the
caller's to release, and releasing it releases each proxy once. That only works
if no proxy object appears twice in one result, so :class:`FrontendResult`
refuses a proxy it already holds, whichever slot (``ref``, a key of ``refs``, an
attestation) it comes in through. A frontend that wants the same value under
several keys hands out one split half per occurrence
(:func:`~solver.split_result_proxy`); ``frontends.forwarder`` and
``frontends.gateway`` do that for every build function.

The frontend side (``frontends.BuildResult``) has the same shape over
``frontends.Reference`` objects, where one reference may stand any number of
times; both share :class:`ResultMap`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
import anyio.lowlevel

from .._errors import SolveError
from .._result import ResultProxy

if TYPE_CHECKING:
    from ..definition import Definition

    # type-only: _request builds on this module (SolveResult holds Attestations)
    from ._request import SolveRequest

__all__ = ["Attestation", "Bridge", "Frontend", "FrontendResult", "ResultMap"]

R = TypeVar("R")
S = TypeVar("S")
M = TypeVar("M", bound="ResultMap[Any]")


@dataclass(frozen=True, slots=True, eq=False)
class Attestation(Generic[R]):
    """A statement about a build output (a provenance record, an SBOM, ...).

    ``kind`` names what it is; ``ref``, when set, is the result that holds its
    content, at ``path`` inside it; ``metadata`` is free-form bytes by key. The
    ``ref`` may be a result that is also returned as an output (an attestation
    that *points at* an output). Compared by identity.
    """

    kind: str
    ref: R | None = None
    path: str = ""
    metadata: Mapping[str, bytes] = field(default_factory=dict)

    def with_ref(self, ref: R | None) -> Attestation[R]:
        """A copy of this attestation pointing at ``ref`` instead."""
        return replace(self, ref=ref)


class ResultMap(Generic[R]):
    """The shape shared by :class:`FrontendResult` and ``frontends.BuildResult``.

    ``ref`` is the main result (or ``None``), ``refs`` named results (such as one
    per platform), ``metadata`` bytes by key, ``attestations`` lists of
    :class:`Attestation` by the key of the output they describe.
    """

    __slots__ = ("attestations", "metadata", "ref", "refs")

    def __init__(self) -> None:
        self.ref: R | None = None
        self.refs: dict[str, R] = {}
        self.metadata: dict[str, bytes] = {}
        self.attestations: dict[str, list[Attestation[R]]] = {}

    def set_ref(self, ref: R | None) -> None:
        """Set the main result."""
        if ref is not None:
            self._admit(ref)
        self.ref = ref

    def add_ref(self, key: str, ref: R) -> None:
        """Add ``ref`` under ``key`` (a key may be set once)."""
        if key in self.refs:
            raise SolveError(f"result already has a ref under key {key!r}")
        self._admit(ref)
        self.refs[key] = ref

    def add_meta(self, key: str, value: bytes) -> None:
        """Set metadata ``key`` to ``value`` (bytes)."""
        if not isinstance(value, bytes):
            raise TypeError(f"metadata {key!r} must be bytes, not {type(value).__name__}")
        self.metadata[key] = value

    def add_attestation(self, key: str, attestation: Attestation[R]) -> None:
        """Append ``attestation`` to the list for output ``key``."""
        if attestation.ref is not None:
            self._admit(attestation.ref)
        self.attestations.setdefault(key, []).append(attestation)

    def each_ref(self) -> Iterator[R]:
        """Every ref in the result, once per occurrence: ``ref``, then ``refs`` in
        insertion order, then attestation refs."""
        if self.ref is not None:
            yield self.ref
        yield from self.refs.values()
        for atts in self.attestations.values():
            for att in atts:
                if att.ref is not None:
                    yield att.ref

    def convert_into(self, target: M, convert: Callable[[R, str], Any]) -> M:
        """Fill ``target`` with this result's shape: every ref replaced by
        ``convert(ref, where)``, called once per occurrence in :meth:`each_ref`
        order (``where`` names the slot for error messages: ``"ref"``,
        ``"refs['k']"``, ``"attestations['k'][0] (provenance)"``); metadata is
        copied. Returns ``target``. If ``convert`` raises, ``target`` holds what
        was converted before."""
        if self.ref is not None:
            target.set_ref(convert(self.ref, "ref"))
        for key, value in self.refs.items():
            target.add_ref(key, convert(value, f"refs[{key!r}]"))
        for key, atts in self.attestations.items():
            for i, att in enumerate(atts):
                where = f"attestations[{key!r}][{i}] ({att.kind})"
                ref = convert(att.ref, where) if att.ref is not None else None
                target.add_attestation(key, Attestation(att.kind, ref, att.path, att.metadata))
        for key, data in self.metadata.items():
            target.add_meta(key, data)
        return target

    def _admit(self, ref: R) -> None:
        """Check ``ref`` may be added (subclasses refuse some)."""

    def __repr__(self) -> str:
        atts = sum(len(a) for a in self.attestations.values())
        return (
            f"<{type(self).__name__} ref={self.ref!r} refs={sorted(self.refs)} "
            f"metadata={sorted(self.metadata)} attestations={atts}>"
        )


class FrontendResult(ResultMap[ResultProxy]):
    """What a :class:`Frontend` returns: lazy results it owns.

    No proxy object ever appears twice in one result: adding one that is already
    there (in any slot) raises :class:`~solver.SolveError`, so that
    :meth:`release` releases each proxy exactly once. To return the same value
    twice, add two halves of :func:`~solver.split_result_proxy`.
    """

    __slots__ = ("_released",)

    def __init__(self) -> None:
        super().__init__()
        self._released = False

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    def _admit(self, ref: ResultProxy) -> None:
        if self._released:
            raise SolveError("cannot add to a released FrontendResult")
        if any(held is ref for held in self.each_ref()):
            raise SolveError(
                f"result proxy {ref.id} already stands in this FrontendResult; add a "
                "split half (solver.split_result_proxy) for each further occurrence"
            )

    async def release(self) -> None:
        """Release every proxy in the result once (shielded: a release that has
        begun finishes even if the caller is cancelled), then empty it.

        Idempotent. If some releases fail, the others still happen and the first
        error is raised."""
        if self._released:
            await anyio.lowlevel.checkpoint()
            return
        self._released = True
        proxies = list(self.each_ref())
        self.ref = None
        self.refs.clear()
        self.attestations.clear()
        errors: list[Exception] = []
        with anyio.CancelScope(shield=True):
            for proxy in proxies:
                try:
                    await proxy.release()
                except Exception as exc:
                    errors.append(exc)
            await anyio.lowlevel.checkpoint()
        if errors:
            raise errors[0]


class Bridge(Protocol):
    """What a frontend calls to solve: the solver side of the boundary.

    ``solve`` takes a :class:`~solver.SolveRequest` with a ``definition`` (whose
    output becomes the result's lazy ``ref``, evaluated on its first
    ``result()``) or naming another frontend (whose result is returned as is).
    The returned :class:`FrontendResult` is the caller's to release.
    """

    async def solve(self, request: SolveRequest) -> FrontendResult: ...


class Frontend(Protocol):
    """A build frontend: turns options and input definitions into results.

    ``solve`` returns a :class:`FrontendResult` the caller owns; on any error or
    cancellation it must release everything it solved itself.
    """

    async def solve(
        self,
        bridge: Bridge,
        opts: Mapping[str, str],
        inputs: Mapping[str, Definition],
    ) -> FrontendResult: ...
