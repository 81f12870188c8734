"""The command line: ``solver build``, ``solver du``, ``solver prune``.

``solver build FILE`` solves a build graph with the built-in worker and can export
the result. ``FILE`` is either

* a definition JSON document (``Definition.to_json()``; see
  ``docs/definition-format.md``), read from standard input when ``FILE`` is ``-``;
* or a Python file (name ending in ``.py``). It is run with ``runpy.run_path``
  (with ``__name__`` set to ``"__solver_build__"``, so an
  ``if __name__ == "__main__":`` block does not run) and must define either a
  top-level ``definition`` (a :class:`~solver.Definition` or a
  :class:`solver.worker.State`) or a function ``build()`` taking no arguments and
  returning one of those.

With ``--frontend buildfile`` (in process) or ``--frontend gateway --opt
source=CMD`` (a frontend program), ``FILE`` is a build context directory or a
build file in one, built by that frontend with its ``--opt KEY=VALUE`` options
(see :mod:`solver.cli._frontends` and ``docs/buildfile.md``).

Exit status: 0 on success, 1 when the build (or reading ``FILE``, or an export)
fails, with a one-paragraph message on stderr and no traceback (the traceback of
an exception raised by a Python build file is shown, as it is the file's bug),
2 for bad arguments, 130 when interrupted.

The snapshot store is ``--cache-dir DIR``/snapshots when given, else the worker's
default (``$SOLVER_CACHE_DIR``/snapshots, else ``~/.cache/solver-engine/snapshots``).
Progress goes to stderr; stdout carries only data (a tar for ``--output
type=tar,dest=-``, the tables of ``du`` and ``prune``). ``--output DIR`` may name
a directory an earlier build exported to: its output is replaced (see
:mod:`solver.worker._export` for what is refused and why). ``solver --version``
prints ``solver VERSION``.

``solver du`` lists the snapshots (least recently used first), their totals per op
kind and the free space; ``solver prune`` applies one prune rule built from its
flags (see ``docs/worker.md``, "Garbage collection").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import re
import runpy
import sys
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import anyio

from .._errors import SolveError
from ..bridge import Solver, opened_imports, run_exports, with_cache_sources
from ..cache import LocalCacheExport, LocalCacheImport
from ..definition import Definition
from ..worker import (
    PrunePolicy,
    SnapshotInfo,
    SnapshotStore,
    State,
    Worker,
    default_root,
    export_to_dir,
    export_to_tar,
    snapshot_kind,
    snapshot_label,
)
from ._cacheopts import add_cache_arguments, existing_imports
from ._frontends import add_frontend_arguments, cmd_build_frontend
from ._progress import make_renderer, run_progress

__all__ = [
    "BuildFileError",
    "OutputSpec",
    "build_definition",
    "load_definition",
    "main",
    "parse_duration",
    "parse_output",
    "parse_size",
    "version_text",
]

PROGRESS_MODES = ("auto", "tty", "plain", "json")


class BuildFileError(Exception):
    """``FILE`` could not be read or did not produce a definition."""


class _UserCodeError(Exception):
    """The Python build file raised; ``__cause__`` is its exception."""


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """Where ``--output`` sends the result: ``type`` is ``local`` or ``tar``."""

    type: str
    dest: str
    overwrite: bool = False


def parse_output(text: str) -> OutputSpec:
    """``DIR``, ``type=local,dest=DIR[,overwrite=true]`` or ``type=tar,dest=FILE``
    (``dest=-``: stdout). Raises ValueError saying what is wrong."""
    if "=" not in text:
        if not text:
            raise ValueError("--output needs a directory or type=...,dest=...")
        return OutputSpec("local", text)
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"bad --output field {part!r}: expected key=value")
        if key in fields:
            raise ValueError(f"--output field {key!r} given twice")
        fields[key] = value
    unknown = set(fields) - {"type", "dest", "overwrite"}
    if unknown:
        raise ValueError(f"unknown --output field(s): {', '.join(sorted(unknown))}")
    kind = fields.get("type", "local")
    if kind not in ("local", "tar"):
        raise ValueError(f"unknown --output type {kind!r} (expected local or tar)")
    dest = fields.get("dest", "")
    if not dest:
        raise ValueError(f"--output type={kind} needs dest=...")
    if dest == "-" and kind == "local":
        raise ValueError("--output type=local cannot write to stdout; use type=tar,dest=-")
    overwrite_text = fields.get("overwrite", "false").lower()
    if overwrite_text not in ("true", "false", "1", "0"):
        raise ValueError(f"--output overwrite must be true or false, not {overwrite_text!r}")
    if kind == "tar" and "overwrite" in fields:
        raise ValueError("--output overwrite applies to type=local only")
    return OutputSpec(kind, dest, overwrite_text in ("true", "1"))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text`` such as ``24h``, ``1h30m``, ``90s``, ``7d``, ``0``.
    Raises ValueError."""
    text = text.strip()
    if text in ("0", "0.0"):
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if m is None:
            raise ValueError(
                f"invalid duration {text!r} (expected e.g. 24h, 1h30m, 90s, 7d)"
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("empty duration")
    return total


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
    "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes in ``text`` such as ``10GB``, ``512MiB``, ``1.5G``, ``4096``: SI units
    (``kB``, ``MB``, ``GB``, ``TB``, or just ``k``, ``M``, ``G``, ``T``) are powers
    of 1000, IEC units (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024; case does
    not matter. Raises ValueError."""
    m = _SIZE.fullmatch(text.strip())
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m is not None else None
    if m is None or unit is None:
        raise ValueError(
            f"invalid size {text!r} (expected e.g. 10GB, 512MiB, 1.5G or a number of bytes)"
        )
    return round(float(m.group(1)) * unit)


def _as_definition(value: object, what: str) -> Definition:
    if isinstance(value, Definition):
        return value
    if isinstance(value, State):
        return value.definition()
    raise BuildFileError(
        f"{what} is a {type(value).__name__}, not a solver.Definition or solver.worker.State"
    )


def load_definition(file: str) -> Definition:
    """The definition in ``file`` (see the module docs). Raises
    :class:`BuildFileError`, :class:`~solver.DefinitionError` (a malformed
    document), or ``_UserCodeError`` (a Python file raised)."""
    if file == "-":
        return Definition.from_json(sys.stdin.buffer.read())
    path = Path(file)
    if not path.is_file():
        raise BuildFileError(f"{file}: no such file")
    if path.suffix == ".py":
        try:
            namespace = runpy.run_path(str(path), run_name="__solver_build__")
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise _UserCodeError(f"{file} raised {type(exc).__name__}") from exc
        if "definition" in namespace:
            return _as_definition(namespace["definition"], f"{file}: 'definition'")
        build = namespace.get("build")
        if callable(build):
            try:
                value = build()
            except Exception as exc:
                raise _UserCodeError(f"{file}: build() raised {type(exc).__name__}") from exc
            return _as_definition(value, f"{file}: the value build() returned")
        raise BuildFileError(
            f"{file} defines neither a top-level 'definition' nor a function 'build()' "
            "returning a solver.Definition or solver.worker.State"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BuildFileError(f"cannot read {file}: {exc.strerror or exc}") from exc
    return Definition.from_json(data)


@contextlib.asynccontextmanager
async def open_solver(cache_dir: str | None) -> AsyncIterator[Solver]:
    """A solver over the built-in worker on ``cache_dir``/snapshots (default: the
    worker's default root) and its persistent cache, so that building again
    executes nothing that was built before. Waits while another process has the
    cache directory open."""
    root = Path(cache_dir) / "snapshots" if cache_dir is not None else None
    async with Worker(root) as worker, Solver(worker=worker) as solver:
        yield solver


async def build_definition(
    solver: Solver,
    defn: Definition,
    *,
    progress: str = "plain",
    progress_out: TextIO | None = None,
    output: OutputSpec | None = None,
    cache_imports: Sequence[LocalCacheImport] = (),
    cache_exports: Sequence[LocalCacheExport] = (),
) -> None:
    """Solve ``defn`` in a new job of ``solver``, rendering its progress to
    ``progress_out`` (default stderr), export the result to ``output`` if given,
    and release everything. ``cache_imports`` are used while building and
    ``cache_exports`` written after (a line each on ``progress_out``). Raises
    :class:`~solver.SolveError` on failure."""
    defn.validate(solver.op_kinds)
    out = progress_out if progress_out is not None else sys.stderr
    renderer = make_renderer(progress, out)
    job = solver.new_job()
    failure: BaseException | None = None
    exported: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_progress, job.status(), renderer)
        try:
            edge = defn.to_vertices(solver.op_kinds)
            async with opened_imports(cache_imports, solver.worker) as sources:
                result = await job.build(with_cache_sources(edge, sources))
                try:
                    stats = await run_exports(result, cache_exports, solver.worker)
                    for spec, st in zip(cache_exports, stats, strict=True):
                        exported.append(
                            f"exported the cache to {spec.dest} (mode={spec.mode}): "
                            f"{st.records} records, {st.results} results, {st.blobs} blobs\n"
                        )
                    if output is not None and output.type == "local":
                        await export_to_dir(result, output.dest, overwrite=output.overwrite)
                    elif output is not None:
                        await export_to_tar(result, output.dest)
                finally:
                    await result.release()
        except Exception as exc:  # re-raised below, outside the task group
            failure = exc
        finally:
            await job.discard()  # ends the status stream, and so the renderer
    out.writelines(exported)
    if failure is not None:
        raise failure


def _error(message: str) -> None:
    text = " ".join(message.split())
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def _cmd_build(args: argparse.Namespace) -> int:
    if args.frontend is not None or args.opt or args.allow_frontend_source:
        return cmd_build_frontend(args, open_solver)
    try:
        defn = load_definition(args.file)
    except _UserCodeError as exc:
        cause = exc.__cause__
        sys.stderr.write(f"error: {exc}:\n")
        if cause is not None:
            traceback.print_exception(cause, file=sys.stderr)
        return 1
    except (BuildFileError, SolveError) as exc:
        _error(f"{args.file}: {exc}" if isinstance(exc, SolveError) else str(exc))
        return 1

    imports = existing_imports(args.import_cache)

    async def run() -> None:
        async with open_solver(args.cache_dir) as solver:
            await build_definition(
                solver,
                defn,
                progress=args.progress,
                output=args.output,
                cache_imports=imports,
                cache_exports=args.export_cache,
            )

    try:
        anyio.run(run)
    except SolveError as exc:
        name = exc.vertex_name
        if name and name not in str(exc):
            _error(f"building {name!r} failed: {exc}")
        else:
            _error(str(exc))
        return 1
    return 0


def _store_root(cache_dir: str | None) -> Path:
    return Path(cache_dir) / "snapshots" if cache_dir is not None else default_root()


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _describe(info: SnapshotInfo, width: int | None = 60) -> str:
    kind = snapshot_kind(info.description)
    name = snapshot_label(info.description)
    if width is not None and len(name) > width:
        name = name[: width - 1] + "…"
    if kind and name and name != kind:
        return f"{kind}: {name}"
    return kind or name or "-"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
        + "  " + row[-1]
        for row in rows
    ]


def _lru_order(infos: Sequence[SnapshotInfo]) -> list[SnapshotInfo]:
    return sorted(infos, key=lambda info: (info.last_used, info.id))


def _per_kind(infos: Sequence[SnapshotInfo]) -> dict[str, tuple[int, int, int]]:
    """Kind -> (snapshots, bytes, bytes in use), kinds sorted by name."""
    kinds: dict[str, tuple[int, int, int]] = {}
    for info in infos:
        kind = snapshot_kind(info.description) or "-"
        count, size, in_use = kinds.get(kind, (0, 0, 0))
        kinds[kind] = (count + 1, size + info.size, in_use + (info.size if info.in_use else 0))
    return dict(sorted(kinds.items()))


def format_usage(
    infos: Sequence[SnapshotInfo], now: float, *, free: int | None = None, verbose: bool = False
) -> list[str]:
    """The ``du`` report: one row per snapshot, least recently used first (the
    order in which pruning deletes), then the totals per op kind and overall."""
    lines: list[str] = []
    if infos:
        head = ["ID", "SIZE", "LAST USED", "IN USE", "DESCRIPTION"]
        if verbose:
            head.insert(3, "CREATED")
        rows = [head]
        for info in _lru_order(infos):
            row = [
                info.id if verbose else info.id[:12],
                human_size(info.size),
                human_age(now - info.last_used),
                "yes" if info.in_use else "no",
                _describe(info, None if verbose else 60),
            ]
            if verbose:
                row.insert(3, human_age(now - info.created_at))
            rows.append(row)
        lines += _table(rows)
        lines.append("")
        kinds = [["KIND", "SNAPSHOTS", "SIZE", "IN USE"]]
        for kind, (count, size, in_use) in _per_kind(infos).items():
            kinds.append([kind, str(count), human_size(size), human_size(in_use)])
        lines += _table(kinds)
    total = sum(info.size for info in infos)
    in_use_total = sum(info.size for info in infos if info.in_use)
    summary = f"Total: {human_size(total)} in {len(infos)} snapshot(s)"
    if in_use_total:
        summary += f", {human_size(in_use_total)} in use"
    if free is not None:
        summary += f"; {human_size(free)} free on the cache's file system"
    lines.append(summary)
    return lines


def usage_json(infos: Sequence[SnapshotInfo], *, free: int | None = None) -> str:
    """The ``du --format json`` document (see ``docs/worker.md``)."""
    doc = {
        "snapshots": [
            {
                "id": info.id,
                "size": info.size,
                "created_at": info.created_at,
                "last_used": info.last_used,
                "in_use": info.in_use,
                "kind": snapshot_kind(info.description),
                "label": snapshot_label(info.description),
                "description": info.description,
                "parents": list(info.parents),
            }
            for info in _lru_order(infos)
        ],
        "kinds": {
            kind: {"snapshots": count, "size": size, "in_use": in_use}
            for kind, (count, size, in_use) in _per_kind(infos).items()
        },
        "total": {
            "snapshots": len(infos),
            "size": sum(info.size for info in infos),
            "in_use": sum(info.size for info in infos if info.in_use),
        },
        "free": free,
    }
    return json.dumps(doc, indent=2, sort_keys=True)


def _cmd_du(args: argparse.Namespace) -> int:
    async def run() -> tuple[list[SnapshotInfo], int | None]:
        async with SnapshotStore(_store_root(args.cache_dir)) as store:
            infos = await store.usage()
            try:
                free: int | None = await store.free_space()
            except OSError:
                free = None
            return infos, free

    try:
        infos, free = anyio.run(run)
    except SolveError as exc:
        _error(str(exc))
        return 1
    if args.format == "json":
        print(usage_json(infos, free=free))
        return 0
    for line in format_usage(infos, time.time(), free=free, verbose=args.verbose):
        print(line)
    return 0


_LIMIT_FLAGS = ("keep_duration", "max_used_space", "min_free_space", "reserved_space")


def _cmd_prune(args: argparse.Namespace) -> int:
    limits = [name for name in _LIMIT_FLAGS if getattr(args, name) is not None]
    if args.all and limits:
        given = ", ".join("--" + name.replace("_", "-") for name in limits)
        _error(f"--all deletes every unused snapshot; it cannot be combined with {given}")
        return 2
    try:
        policy = PrunePolicy(
            keep_duration=args.keep_duration or 0.0,
            max_used_space=args.max_used_space or 0,
            min_free_space=args.min_free_space or 0,
            reserved_space=args.reserved_space or 0,
            filters=tuple(args.filter),
        )
    except (TypeError, ValueError) as exc:
        _error(str(exc))
        return 2

    async def run() -> tuple[list[SnapshotInfo], int]:
        # The whole worker, so that its persistent cache drops the records of what
        # is deleted at once (its delete listener), not at its next open.
        async with Worker(_store_root(args.cache_dir)) as worker:
            deleted = await worker.prune(policy)
            return deleted, worker.store.used_space

    try:
        freed, left = anyio.run(run)
    except (SolveError, OSError) as exc:
        _error(str(exc))
        return 1
    for info in freed:
        print(f"deleted {info.id[:12]}  {human_size(info.size)}  {_describe(info)}")
    total = sum(info.size for info in freed)
    print(f"Total: freed {human_size(total)} in {len(freed)} snapshot(s); "
          f"{human_size(left)} left")
    return 0


def _output_arg(text: str) -> OutputSpec:
    try:
        return parse_output(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _filter_arg(text: str) -> str:
    try:
        PrunePolicy(filters=(text,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def version_text() -> str:
    """``solver VERSION``, what ``solver --version`` prints: the installed
    distribution's version (``solver-engine``), else, when the package runs from
    a source tree that is not installed, ``solver.__version__``."""
    try:
        version = importlib.metadata.version("solver-engine")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        version = __version__
    return f"solver {version}"


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line (its subcommands and flags)."""
    parser = argparse.ArgumentParser(
        prog="solver", description="Build graphs with the solver engine's built-in worker."
    )
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_help = (
        "snapshot cache directory (snapshots live in DIR/snapshots); default "
        "$SOLVER_CACHE_DIR, else ~/.cache/solver-engine"
    )

    b = sub.add_parser(
        "build",
        help="solve a definition and optionally export the result",
        description=(
            "Solve FILE: a definition JSON file ('-' for stdin), or a Python file (.py) "
            "defining a top-level 'definition' (a solver.Definition or "
            "solver.worker.State) or a function build() returning one."
        ),
    )
    b.add_argument("file", metavar="FILE")
    b.add_argument(
        "-o",
        "--output",
        type=_output_arg,
        default=None,
        metavar="SPEC",
        help="export the result: DIR, type=local,dest=DIR[,overwrite=true] or "
        "type=tar,dest=FILE (dest=- writes the tar to stdout). Building into a DIR an "
        "earlier build wrote replaces its output; anything else in DIR is refused "
        "unless overwrite=true",
    )
    b.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="progress output on stderr (auto: tty on a terminal, else plain)",
    )
    b.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    add_frontend_arguments(b)
    add_cache_arguments(b)
    b.set_defaults(func=_cmd_build)

    d = sub.add_parser(
        "du",
        help="list the snapshots in the cache, their sizes and totals per op kind",
        description="List the snapshots in the cache, least recently used (first to be "
        "pruned) first, with totals per op kind.",
    )
    d.add_argument("-v", "--verbose", action="store_true",
                   help="full ids and descriptions, and when each snapshot was made")
    d.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or a JSON document")
    d.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    d.set_defaults(func=_cmd_du)

    p = sub.add_parser(
        "prune",
        help="delete unused snapshots",
        description="Delete unused snapshots, least recently used first. Without limits, "
        "every unused snapshot that passes the filters is deleted; with space limits, "
        "only as many as needed. SIZE: 10GB, 512MiB, 1.5G or bytes.",
    )
    p.add_argument(
        "--keep-duration",
        type=_duration_arg,
        default=None,
        metavar="DURATION",
        help="keep snapshots used within DURATION (e.g. 24h, 1h30m, 7d)",
    )
    p.add_argument("--max-used-space", type=_size_arg, default=None, metavar="SIZE",
                   help="delete until the cache uses at most SIZE")
    p.add_argument("--min-free-space", type=_size_arg, default=None, metavar="SIZE",
                   help="delete until SIZE is free on the cache's file system")
    p.add_argument("--reserved-space", type=_size_arg, default=None, metavar="SIZE",
                   help="never delete below SIZE used (alone: delete down to SIZE)")
    p.add_argument(
        "--filter",
        type=_filter_arg,
        action="append",
        default=[],
        metavar="FILTER",
        help="only snapshots matching FILTER: kind=exec, kind!=source.local, "
        "description~=REGEX, id=ID; ',' joins conditions that must all hold; "
        "repeated --filter: any may match",
    )
    p.add_argument("--all", action="store_true",
                   help="delete every unused snapshot (that passes --filter); the default "
                   "when no limit is given; not with --keep-duration or space limits")
    p.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    p.set_defaults(func=_cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the
    exit status (argument errors return 2 after printing usage)."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad arguments (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
