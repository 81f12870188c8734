"""The high-level entry: solve a request and hold its results.

``Solver.solve`` takes a :class:`~solver.Definition` (or a :class:`SolveRequest`
naming one), turns it into engine vertices through the solver's op-kind
registry, builds its output in a job of its own, and hands back a
:class:`SolveResult` that owns the result handles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from .._result import CachedResult
from ..definition import Definition
from ..insight import BuildSummary
from ._frontend import Attestation

if TYPE_CHECKING:
    from .._cache import CacheManager
    from ..cache import LocalCacheExport, LocalCacheImport

__all__ = ["SolveRequest", "SolveResult"]


@dataclass(frozen=True, slots=True)
class SolveRequest:
    """What to solve: a ``definition``, or a ``frontend`` by name with its options
    (``frontend_opts``) and input definitions (``frontend_inputs``).

    For a definition, ``cache_imports`` are extra caches to look results up in:
    :class:`~solver.LocalCacheImport` (a cache directory, opened for this solve
    and closed after it) or any :class:`~solver.CacheManager` (the caller's);
    ``cache_exports`` (:class:`~solver.LocalCacheExport`) write the result's cache
    to directories once it is built. See ``docs/cache-format.md``.
    """

    definition: Definition | None = None
    frontend: str | None = None
    frontend_opts: Mapping[str, str] = field(default_factory=dict)
    frontend_inputs: Mapping[str, Definition] = field(default_factory=dict)
    cache_imports: Sequence[LocalCacheImport | CacheManager] = ()
    cache_exports: Sequence[LocalCacheExport] = ()


class SolveResult:
    """The results of one solve; it owns their handles.

    ``ref`` is the main result (or ``None``), ``refs`` named results (such as one
    per platform), ``metadata`` free-form bytes by key, ``attestations`` what a
    frontend attested about its outputs (by output key; an attestation's ``ref`` is
    a handle of its own). ``summary`` (a :class:`~solver.insight.BuildSummary`)
    says what the solve of a definition did: ops run, cached (by cache source)
    and failed, time in ops and in the engine, the critical path (``None`` for a
    frontend solve). It may be given as a function of no arguments that makes
    it: that is called the first time ``summary`` is read, and only then
    (:meth:`Solver.solve` folds a build's events into its summary so, lazily).
    Every handle in it is distinct, even where a frontend
    returned one value several times. ``release()`` releases every handle it holds
    exactly once; calling it again does nothing. Use it as an async context manager
    to release on exit.
    """

    __slots__ = (
        "_make_summary", "_released", "_summary", "attestations", "metadata", "ref", "refs"
    )

    def __init__(
        self,
        ref: CachedResult | None = None,
        refs: Mapping[str, CachedResult] | None = None,
        metadata: Mapping[str, bytes] | None = None,
        attestations: Mapping[str, list[Attestation[CachedResult]]] | None = None,
        summary: BuildSummary | Callable[[], BuildSummary] | None = None,
    ) -> None:
        self.ref = ref
        self._summary: BuildSummary | None = None
        self._make_summary: Callable[[], BuildSummary] | None = None
        if callable(summary):
            self._make_summary = summary
        else:
            self._summary = summary
        self.refs: dict[str, CachedResult] = dict(refs or {})
        self.metadata: dict[str, bytes] = dict(metadata or {})
        self.attestations: dict[str, list[Attestation[CachedResult]]] = {
            key: list(atts) for key, atts in (attestations or {}).items()
        }
        self._released = False

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<SolveResult ref={self.ref!r} refs={sorted(self.refs)}{state}>"

    @property
    def summary(self) -> BuildSummary | None:
        """What the solve did (see the class docs); made on first read when it
        was given as a function."""
        make = self._make_summary
        if make is not None:
            self._summary = make()
            self._make_summary = None
        return self._summary

    @summary.setter
    def summary(self, value: BuildSummary | None) -> None:
        self._summary = value
        self._make_summary = None

    @property
    def released(self) -> bool:
        return self._released

    async def release(self) -> None:
        """Release every handle this result holds (shielded); idempotent."""
        if self._released:
            await anyio.lowlevel.checkpoint()
            return
        self._released = True
        handles = [self.ref, *self.refs.values()]
        handles.extend(att.ref for atts in self.attestations.values() for att in atts)
        with anyio.CancelScope(shield=True):
            errors: list[BaseException] = []
            for h in handles:
                if h is None:
                    continue
                try:
                    await h.release()
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    async def __aenter__(self) -> SolveResult:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()
