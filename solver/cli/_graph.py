"""``solver graph FILE``: the op graph of a definition, with the cache state of
each op, as Graphviz DOT or a Mermaid flowchart, without running anything.

``FILE`` is read as by ``solver build`` (a definition JSON document, ``-`` for
stdin, or a Python build file). The cache is the one ``solver build`` uses
(``--cache-dir DIR``, else the default); each op is ``cached``, ``would run``
or ``unknown (content key)`` as :func:`solver.bridge.plan` finds it, and ops a
build would not need (below a cached op) are marked ``not needed``. The graph
goes to stdout, nothing else does; exit status 0. A failure raises for the
command line to report as its one ``solver: error:`` line.

This module does not import ``_main`` (which adds the subcommand): what it needs
from there is handed to :func:`add_graph_command`, so no import circle forms.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Final, TypeVar

import anyio

from .._errors import SolveError
from ..bridge import Solver
from ..definition import Definition, DefinitionError

__all__ = ["GRAPH_FORMATS", "OpenSolver", "add_graph_command", "graph_text"]

#: The formats ``--format`` accepts; the first is the default.
GRAPH_FORMATS: Final = ("dot", "mermaid")

OpenSolver = Callable[[str | None], contextlib.AbstractAsyncContextManager[Solver]]
"""Opens a solver over the cache directory given (``None``: the default)."""

_P = TypeVar("_P", bound=argparse.ArgumentParser)

_CACHE_HELP = "the cache directory to look results up in (as for 'solver build')"


async def graph_text(solver: Solver, definition: Definition, fmt: str = "dot") -> str:
    """The plan of ``definition`` in ``solver`` as ``fmt`` (``dot`` or
    ``mermaid``) text. Runs nothing (see :func:`solver.bridge.plan`)."""
    if fmt not in GRAPH_FORMATS:
        raise ValueError(f"unknown graph format {fmt!r} (expected dot or mermaid)")
    from ..bridge import plan  # what only 'graph' uses is imported by it

    found = await plan(solver, definition)
    return found.to_dot() if fmt == "dot" else found.to_mermaid()


def add_graph_command(
    sub: argparse._SubParsersAction[_P],
    *,
    open_solver: OpenSolver,
    load_definition: Callable[[str], Definition],
    check_cache_dir: Callable[[str | None], None] | None = None,
    add_debug: Callable[[argparse.ArgumentParser], None] | None = None,
    cache_help: str = _CACHE_HELP,
) -> _P:
    """Add the ``graph`` subcommand to ``sub`` and return its parser.

    ``open_solver(cache_dir)`` opens the solver whose cache is asked;
    ``load_definition(file)`` reads ``FILE`` (raising what the command line
    reports as one line); ``check_cache_dir(cache_dir)``, if given, checks the
    directory before it is opened; ``add_debug(parser)`` adds ``--debug``.
    The parser's ``func(args)`` runs the command and returns the exit status.
    """
    g = sub.add_parser(
        "graph",
        help="print the op graph with the cache state of each op, running nothing",
        description=(
            "Print the op graph of FILE (read as by 'build') as Graphviz DOT or a "
            "Mermaid flowchart: one node per op with its name and cache state "
            "(cached, would run, unknown (content key); 'not needed' below a cached "
            "op), one edge per input, from the input to the op that consumes it. "
            "Nothing is run and no result is added to the cache."
        ),
    )
    g.add_argument("file", metavar="FILE")
    g.add_argument("--format", choices=GRAPH_FORMATS, default=GRAPH_FORMATS[0],
                   help="dot (default: Graphviz, e.g. '| dot -Tsvg') or mermaid")
    g.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    if add_debug is not None:
        add_debug(g)

    def cmd_graph(args: argparse.Namespace) -> int:
        definition = load_definition(args.file)
        if check_cache_dir is not None:
            check_cache_dir(args.cache_dir)

        async def run() -> str:
            async with open_solver(args.cache_dir) as solver:
                return await graph_text(solver, definition, args.format)

        try:
            text = anyio.run(run)
        except DefinitionError as exc:  # checked against the op kinds: which file
            # A plain SolveError: the command line prints its text as it is.
            raise SolveError(f"{args.file}: {exc}") from exc
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0

    g.set_defaults(func=cmd_graph)
    return g
