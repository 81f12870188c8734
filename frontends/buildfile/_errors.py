"""The buildfile frontend's error."""

from __future__ import annotations

from solver import SolveError

__all__ = ["BuildfileError"]


class BuildfileError(SolveError):
    """The build file, an option or an input given to the buildfile frontend is not
    valid (a :class:`~solver.SolveError`, so it reaches the caller as it is)."""
