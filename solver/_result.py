"""The result protocols: what an op returns and what callers hold.

Every object here is a *handle*: it is released exactly once, and a second
``release()`` of the same handle raises :class:`~solver.DoubleReleaseError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    # type-only: _cache names Result in CacheManager.save (protocols, no code)
    from ._cache import ExportableCacheKey

__all__ = ["CachedResult", "Result", "ResultProxy"]


@runtime_checkable
class Result(Protocol):
    """A handle on one output value of an op.

    ``clone()`` returns a new, independent handle on the same underlying value;
    ``sys`` is the underlying value itself.
    """

    @property
    def id(self) -> str: ...

    @property
    def sys(self) -> object: ...

    async def release(self) -> None: ...

    def clone(self) -> Result: ...


@runtime_checkable
class CachedResult(Result, Protocol):
    """A result together with the cache keys it is stored under."""

    @property
    def cache_keys(self) -> Sequence[ExportableCacheKey]: ...


@runtime_checkable
class ResultProxy(Protocol):
    """A lazy result as a frontend sees it: evaluated on the first ``result()``."""

    @property
    def id(self) -> str: ...

    @property
    def definition(self) -> Any: ...

    async def result(self) -> CachedResult: ...

    async def release(self) -> None: ...
