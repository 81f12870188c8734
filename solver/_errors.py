"""The errors a solve can raise.

Every failure reaches the caller of ``Job.build`` (or ``Solver.solve``) as one
:class:`SolveError`, never as an ``ExceptionGroup``: the op's own exception is its
``__cause__`` and its text is part of the message, however deep in the graph the
failing vertex sits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._result import Result

__all__ = ["DoubleReleaseError", "InternalError", "SlowCacheError", "SolveError"]


class SolveError(Exception):
    """A solve failed.

    ``vertex`` is the digest of the vertex that failed and ``vertex_name`` its name,
    when the failure belongs to one vertex.
    """

    def __init__(
        self, message: str, *, vertex: str | None = None, vertex_name: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.vertex = vertex
        self.vertex_name = vertex_name

    def __str__(self) -> str:
        return self.message

    def _copy(self) -> SolveError:
        # Each caller that receives a shared failure gets its own exception object,
        # so tracebacks of concurrent raises do not step on each other.
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.args = self.args
        new.__cause__ = self.__cause__
        new.__suppress_context__ = True
        return new


class InternalError(SolveError):
    """The engine reached a state it should never reach. Please report it."""


class DoubleReleaseError(SolveError):
    """A handle was released twice (or used after it was released or split).

    The second release changes no count: the underlying value is still released
    exactly once.
    """


class SlowCacheError(SolveError):
    """Computing the content ("slow") cache key of an input failed.

    ``index`` is the input's index and ``result`` a handle on that input's result,
    which the caller owns and must release.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int,
        result: Result,
        vertex: str | None = None,
        vertex_name: str | None = None,
    ) -> None:
        super().__init__(message, vertex=vertex, vertex_name=vertex_name)
        self.index = index
        self.result = result
