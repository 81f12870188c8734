"""The ``solver`` command line: ``solver build``, ``solver du`` and ``solver prune``.

Run it as ``python -m solver`` or through the ``solver`` console script; both
call :func:`main`. See ``solver --help`` and :mod:`solver.cli._main`.
"""

from ._main import main as main

__all__ = ["main"]
