"""The command line: ``solver build``, ``du``, ``prune``, ``diff``, ``graph``,
``history`` and ``debug``.

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

Errors. Every failure ends with one line on stderr, ``solver: error: MESSAGE``
(``solver: interrupted`` for Ctrl-C), and no traceback: the message names what was
wrong (the path, the option, the definition file and line). ``--debug`` (before or
after the subcommand) also prints the traceback, for a failure that is a bug (an
unexpected exception, reported as ``internal error``) or an exception raised by a
Python build file. Library warnings (the ``solver`` logger) are one line each,
``solver: warning: MESSAGE``.

Exit status: 0 on success; 1 when the build fails, or reading ``FILE``, a path
given on the command line (``--cache-dir``, ``--output``, ``--export-cache``,
``--import-cache``), the cache, or an export; 2 when the command line itself is
wrong (as argparse: an unknown flag or option value, a malformed spec, conflicting
flags); 130 when interrupted (the cache stays usable: what was running is
cancelled, and the store is closed as on any exit).

Paths are checked before anything is built: a ``--cache-dir``, ``--output`` or
``--export-cache`` directory must be a directory, or creatable, and writable; a
tar ``--output`` must not be a directory; an ``--import-cache`` source that exists
must be a directory (one that does not exist is skipped with a warning, as a
first CI run has none).

The snapshot store is ``--cache-dir DIR``/snapshots when given, else the worker's
default (``$SOLVER_CACHE_DIR``/snapshots, else snapshots in the platform's user
cache directory, e.g. ``~/.cache/solver-engine/snapshots`` on Linux).
Progress goes to stderr; stdout carries only data (a tar for ``--output
type=tar,dest=-``, the tables of ``du`` and ``prune``). ``--output DIR`` may name
a directory an earlier build exported to: its output is replaced (see
:mod:`solver.worker._export` for what is refused and why). ``solver --version``
prints ``solver VERSION``.

``solver du`` lists the snapshots (least recently used first), their totals per op
kind and the free space; ``solver prune`` applies one prune rule built from its
flags (see ``docs/worker.md``, "Garbage collection"). ``solver build --check``
rebuilds every op in a scratch store after the build and exits 1 when an output
differs or a rebuild fails; ``solver build --explain`` says after the build why
each op that ran missed the cache (``docs/explain.md``). ``solver diff A B`` lists
the ops that differ between two definitions, root cause first, and exits 1 when
they differ; ``solver graph FILE`` prints the op graph as DOT or Mermaid with
each op's cache state, running nothing (all four: ``docs/explain.md``).

Every build ends with its summary and leaves a record in the history
(``<cache dir>/snapshots/history``); ``--expect-cached`` and ``--max-executed N``
fail a build in which ops ran; ``solver history ls|show|trace|compare|prune``
reads the records and ``solver debug ID OP`` runs a shell in a failed step's
sandbox (``docs/insight.md``; :mod:`solver.cli._summary`, ``_history``,
``_debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import runpy
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

import anyio

# What only some commands use is imported where they use it (``--explain``,
# ``--check``, ``--frontend``, ``diff``, ``du``, ``prune``, ``--version``): a
# process pays for every module it imports, and a no-op build is mostly that
# (docs/performance.md, "CLI start-up"). tests/test_cli_imports.py keeps it so.
from .._errors import InternalError, SolveError
from .._progress import STARTED, ProgressEvent
from ..bridge import Solver, opened_imports, run_exports, with_cache_sources
from ..definition import Definition, DefinitionError
from ..insight import BuildHistory
from ..worker import State, Worker, default_root, export_to_dir, export_to_tar
from ._cacheopts import add_cache_arguments, existing_imports
from ._cluster import add_cluster_argument, attached_cluster, cluster_address
from ._debug import KEEP_FAILED, add_debug_command, add_failure_arguments, after_failed_build
from ._frontends import add_frontend_arguments
from ._graph import add_graph_command
from ._history import add_history_command
from ._interrupt import run_interruptible
from ._progress import describe_output, make_renderer, one_line, run_progress
from ._sharedopts import (
    add_shared_cache_argument,
    attached_shared_cache,
    prune_shared,
    shared_cache_spec,
    shared_usage,
)
from ._summary import add_gate_arguments, finish_build, gate_failures

if TYPE_CHECKING:
    from ..bridge import Explanation
    from ..cache import LocalCacheExport, LocalCacheImport
    from ..definition import OpHistory
    from ..insight import BuildSummary
    from ..worker import DiskUsage, SandboxMode, SecretSource, SnapshotInfo

__all__ = [
    "BuildFileError",
    "CommandError",
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


#: Appended to the one line of a failure whose traceback would help.
DEBUG_HINT = "re-run with --debug for the traceback"


class CommandError(Exception):
    """A failure the command line reports as ``solver: error: MESSAGE`` and exits
    with ``status`` (1: the build or its inputs failed; 2: the command line is
    wrong). The message says what was wrong and where; the traceback of its
    ``__cause__``, if any, is what ``--debug`` shows."""

    def __init__(self, message: str, status: int = 1, *, hint: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        #: Whether the line ends with :data:`DEBUG_HINT` (when ``--debug`` is off).
        self.hint = hint

    def __str__(self) -> str:
        return self.message


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
    if path.is_dir():
        raise BuildFileError(
            f"{file} is a directory, not a definition file (a build context directory "
            "is built with --frontend buildfile)"
        )
    if not path.is_file():
        raise BuildFileError(f"{file}: no such file")
    if path.suffix == ".py":
        try:
            with path.open("rb"):  # unreadable is a path problem, not the file's bug
                pass
        except OSError as exc:
            raise BuildFileError(f"cannot read {file}: {exc.strerror or exc}") from exc
        try:
            namespace = runpy.run_path(str(path), run_name="__solver_build__")
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:
            raise _UserCodeError(
                f"{file} called sys.exit({exc.code!r}) instead of defining a definition"
            ) from exc
        except BaseException as exc:
            raise _UserCodeError(_user_code_problem(file, exc, "")) from exc
        if "definition" in namespace:
            return _as_definition(namespace["definition"], f"{file}: 'definition'")
        build = namespace.get("build")
        if callable(build):
            try:
                value = build()
            except Exception as exc:
                raise _UserCodeError(_user_code_problem(file, exc, "build() raised ")) from exc
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


def _user_code_problem(file: str, exc: BaseException, what: str) -> str:
    """One line for an exception a Python build file raised: where in the file
    (its innermost line in the traceback, which is what the user needs to look
    at), then what was raised."""
    where = file
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        where = f"{file}:{exc.lineno}"
        text = exc.msg
    else:
        target = os.path.realpath(file)
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.lineno is not None and os.path.realpath(frame.filename) == target:
                where = f"{file}:{frame.lineno}"
                break
        text = str(exc)
    name = type(exc).__name__
    return f"{where}: {what}{name}: {text}" if text else f"{where}: {what}{name}"


@contextlib.asynccontextmanager
async def open_solver(
    cache_dir: str | None,
    *,
    sandbox: SandboxMode = "bwrap",
    secrets: Mapping[str, SecretSource] | None = None,
    shared_cache: str | None = None,
    cluster: str | None = None,
    max_parallelism: int | None = None,
) -> AsyncIterator[Solver]:
    """A solver over the built-in worker on ``cache_dir``/snapshots (default: the
    worker's default root) and its persistent cache, so that building again
    executes nothing that was built before; its exec steps run in ``sandbox`` with
    ``secrets`` available to the steps that name them. Waits while another process
    has the cache directory open. Raises :class:`CommandError` naming the cache
    directory when its store cannot be opened (a file where a directory should
    be, no permission). ``shared_cache`` is a shared cache URL
    (``docs/shared-cache.md``) put behind the worker's cache; ``cluster`` the
    address of a Dask scheduler whose workers run the exec and file steps
    (``docs/remote.md``; attached before the shared cache, which wraps it). At
    most ``max_parallelism`` exec steps run at once here (default: the number
    of CPUs)."""
    root = _store_root(cache_dir)
    worker = Worker(
        root, sandbox=sandbox, secrets=secrets, keep_failed=KEEP_FAILED,
        max_parallelism=max_parallelism,
    )
    with _opening_cache(cache_dir):
        await worker.open()
    try:
        async with (
            attached_cluster(worker, cluster),
            attached_shared_cache(worker, shared_cache, sys.stderr),
            Solver(worker=worker) as solver,
        ):
            yield solver
    finally:
        await worker.close()


async def build_definition(
    solver: Solver,
    defn: Definition,
    *,
    progress: str = "plain",
    progress_out: TextIO | None = None,
    output: OutputSpec | None = None,
    cache_imports: Sequence[LocalCacheImport] = (),
    cache_exports: Sequence[LocalCacheExport] = (),
    explanation: Explanation | None = None,
    history: BuildHistory | None = None,
) -> BuildSummary:
    """Solve ``defn`` in a new job of ``solver``, rendering its progress to
    ``progress_out`` (default stderr), export the result to ``output`` if given,
    and release everything. ``cache_imports`` are used while building and
    ``cache_exports`` written after (a line each on ``progress_out``). With an
    ``explanation`` (:func:`~solver.explain` of ``defn``, made before), the
    ``json`` progress gives each op's ``started`` event its ``reason``, and one
    line per op that ran says why, after the build (also when it fails). The
    ops of a successful build are recorded in the solver's op history. The
    build's summary ends the progress output and is returned; it is recorded in
    ``history`` when given (also on failure). Raises :class:`~solver.SolveError`
    on failure."""
    # Validated here, once (to_vertices validates), before anything is started.
    edge = defn.to_vertices(solver.op_kinds)
    out = progress_out if progress_out is not None else sys.stderr
    shown = None if output is None else describe_output(output.type, output.dest)
    reasons = None if explanation is None else _reason_lookup(explanation, solver)
    renderer = make_renderer(progress, out, output=shown, reasons=reasons)
    job = solver.new_job()
    failure: BaseException | None = None
    exported: list[str] = []
    started = time.time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_progress, job.status(), renderer)
        try:
            async with opened_imports(cache_imports, solver.worker) as sources:
                result = await job.build(with_cache_sources(edge, sources))
                try:
                    await solver.record_definition(defn)
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
    if explanation is not None:
        out.writelines(await explain_lines(explanation, job.status(), solver.op_history))
    summary = await finish_build(job, edge, started, renderer, out, history, reasons)
    if failure is not None:
        raise failure
    return summary


async def explain_lines(
    explanation: Explanation,
    events: AsyncIterator[ProgressEvent],
    history: OpHistory | None = None,
) -> list[str]:
    """``explain: NAME: REASON``, one line per op that ran according to
    ``events`` (a discarded job's status: they end), inputs first; ``history``
    names the files of a content key that changed."""
    ran = [ev async for ev in events if ev.status == STARTED]
    return [f"explain: {op.describe()}\n" for op in explanation.executed(ran, history)]


def _reason_lookup(explanation: Explanation, solver: Solver) -> Callable[[str], str | None]:
    """Why the op ``vertex`` runs, asked when it starts: by then its inputs that
    ran have started (they were asked before it) and its content keys have been
    computed, so the reason is the one the line after the build gives."""
    entries = {e.digest: e for e in explanation.ops}
    started: set[str] = set()

    def reason(vertex: str) -> str | None:
        started.add(vertex)
        entry = entries.get(vertex)
        if entry is None:
            return None
        final = explanation.ran(entry, started, solver.op_history).reason
        return None if final is None else final.describe()

    return reason


def _error(message: str) -> None:
    sys.stderr.write(f"solver: error: {one_line(message)}\n")
    sys.stderr.flush()


def _warning(message: str) -> None:
    sys.stderr.write(f"solver: warning: {one_line(message)}\n")
    sys.stderr.flush()


# -- paths given on the command line ---------------------------------------------------


def _os_reason(exc: OSError) -> str:
    """What an OSError says, with its path: ``PATH: Permission denied``."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    return f"{exc.filename}: {reason}"


def _not_a_dir(path: Path) -> str:
    """``is a file, not a directory`` and the like, for a path that exists (or is
    a dangling link) and is not a directory."""
    if path.is_symlink() and not path.exists():
        return "is a dangling symbolic link, not a directory"
    return "is a file, not a directory" if path.is_file() else "is not a directory"


def _check_creatable(path: Path, what: str) -> None:
    """Raise :class:`CommandError` unless ``path``, which does not exist, can be
    made: its nearest existing ancestor is a directory that can be written."""
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CommandError(f"{what} cannot be created: {parent} {_not_a_dir(parent)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"{what} cannot be created: {parent} is not writable")


def _check_dir_arg(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`CommandError` (status 1) unless ``path`` is a writable
    directory or can be created as one; ``what`` names it in the message, e.g.
    ``--cache-dir /x``: ``--cache-dir /x is a file, not a directory``. Checked
    before a build starts, so that a bad path fails at once, not after the build."""
    p = Path(path)
    try:
        if p.is_dir():
            if not os.access(p, os.W_OK | os.X_OK):
                raise CommandError(f"{what} is not writable")
        elif p.exists() or p.is_symlink():
            raise CommandError(f"{what} {_not_a_dir(p)}")
        else:
            _check_creatable(p, what)
    except OSError as exc:  # e.g. a search permission missing on the way
        raise CommandError(f"{what}: {_os_reason(exc)}") from exc


def _check_file_arg(path: str | os.PathLike[str], what: str) -> None:
    """Raise :class:`CommandError` unless ``path`` can be written as a file: an
    existing writable file, or a new one in a directory that is (or can be) made."""
    p = Path(path)
    try:
        if p.is_dir():
            raise CommandError(f"{what} is a directory, not a file")
        if p.exists():
            if not os.access(p, os.W_OK):
                raise CommandError(f"{what} is not writable")
        else:
            _check_creatable(p, what)
    except OSError as exc:
        raise CommandError(f"{what}: {_os_reason(exc)}") from exc


def _cache_dir_name(cache_dir: str | None) -> str:
    """How messages name the cache directory: the flag when it was given, else
    where the default came from."""
    if cache_dir is not None:
        return f"--cache-dir {cache_dir}"
    where = default_root().parent
    if os.environ.get("SOLVER_CACHE_DIR"):
        return f"the cache directory {where} ($SOLVER_CACHE_DIR)"
    return f"the default cache directory {where}"


def _check_cache_dir(cache_dir: str | None) -> None:
    """:func:`_check_dir_arg` for the cache directory and its ``snapshots`` store
    root (a file there is as fatal as the directory being one)."""
    what = _cache_dir_name(cache_dir)
    root = _store_root(cache_dir)
    _check_dir_arg(root.parent, what)
    if root.exists() or root.is_symlink():
        _check_dir_arg(root, f"{what} is not a usable cache directory: {root}")


@contextlib.contextmanager
def _opening_cache(cache_dir: str | None) -> Iterator[None]:
    """Turn an OSError from opening the store in ``cache_dir`` into one line that
    names the cache directory: the store's layout inside it is not what it should
    be (``meta`` is a file, ``lock`` a directory...), or a permission is missing."""
    try:
        yield
    except OSError as exc:
        what = _cache_dir_name(cache_dir)
        if exc.errno == errno.EEXIST and exc.filename is not None:
            # what mkdir(exist_ok=True) raises for a path that is not a directory
            reason = f"{exc.filename} is not a directory"
        else:
            reason = _os_reason(exc)
        raise CommandError(f"{what} is not a usable cache directory: {reason}") from exc


def _check_build_paths(args: argparse.Namespace) -> None:
    """Every path ``build`` writes or reads besides ``FILE``, before anything is
    built (a bad ``--output`` would otherwise fail only after the whole build)."""
    _check_cache_dir(args.cache_dir)
    output: OutputSpec | None = args.output
    if output is not None and output.type == "local":
        _check_dir_arg(output.dest, f"--output {output.dest}")
    elif output is not None and output.dest != "-":
        _check_file_arg(output.dest, f"--output type=tar,dest={output.dest}")
    for spec in args.export_cache:
        _check_dir_arg(spec.dest, f"--export-cache dest={spec.dest}")
    for spec in args.import_cache:
        src = Path(spec.src)
        if (src.exists() or src.is_symlink()) and not src.is_dir():
            raise CommandError(f"--import-cache src={spec.src} {_not_a_dir(src)}")


# -- build -------------------------------------------------------------------------------


def _secret_arg(spec: str) -> tuple[str, Path]:
    """``id=ID,src=PATH`` as (ID, PATH); the file must exist."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq or key not in ("id", "src") or key in fields or not value:
            raise argparse.ArgumentTypeError(
                f"--secret takes id=ID,src=PATH, not {spec!r}"
            )
        fields[key] = value
    if set(fields) != {"id", "src"}:
        raise argparse.ArgumentTypeError(f"--secret takes id=ID,src=PATH, not {spec!r}")
    src = Path(fields["src"])
    if not src.is_file():
        raise argparse.ArgumentTypeError(f"--secret {fields['id']}: {src} is not a file")
    return fields["id"], src


class _MergeSecrets(argparse.Action):
    """``--secret`` given several times: one mapping of id to file."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, tuple)
        secrets = dict(getattr(namespace, self.dest) or {})
        if values[0] in secrets:
            parser.error(f"--secret {values[0]} is given twice")
        secrets[values[0]] = values[1]
        setattr(namespace, self.dest, secrets)


def _cmd_build(args: argparse.Namespace) -> int:
    if args.frontend is None and (args.opt or args.allow_frontend_source):
        raise CommandError("--opt and --allow-frontend-source need --frontend", 2)
    if args.check and args.frontend is not None:
        raise CommandError("--check builds a definition file; it does not take --frontend", 2)
    if args.explain and args.frontend is not None:
        raise CommandError(
            "--explain builds a definition file; it does not take --frontend", 2
        )
    _check_build_paths(args)
    shared = _shared_spec(args)
    history = args.history = command_history(args.cache_dir)
    if args.frontend is not None:
        from ._frontends import cmd_build_frontend

        return cmd_build_frontend(
            args,
            functools.partial(
                open_solver, sandbox=args.sandbox, secrets=args.secrets, shared_cache=shared,
                cluster=cluster_address(args.cluster), max_parallelism=args.jobs,
            ),
        )
    defn = _load_for_command(args.file)

    imports = existing_imports(args.import_cache)

    async def run() -> int:
        async with open_solver(
            args.cache_dir, sandbox=args.sandbox, secrets=args.secrets, shared_cache=shared,
            cluster=cluster_address(args.cluster), max_parallelism=args.jobs,
        ) as solver:
            explanation = None
            if args.explain:
                from ..bridge import explain

                explanation = await explain(solver, defn)
            summary = await build_definition(
                solver,
                defn,
                progress=args.progress,
                output=args.output,
                cache_imports=imports,
                cache_exports=args.export_cache,
                explanation=explanation,
                history=history,
            )
            gate = gate_failures(
                summary, expect_cached=args.expect_cached, max_executed=args.max_executed
            )
            if gate is not None:
                sys.stderr.writelines(line + "\n" for line in gate[1])
                raise CommandError(gate[0])
            if not args.check:
                return 0
            # stdout carries only data: a tar when --output type=tar,dest=-
            tar_out = args.output is not None and args.output.dest == "-"
            out = sys.stderr if tar_out else sys.stdout
            from ._check import run_check

            return await run_check(solver, defn, out, secrets=args.secrets)

    try:
        return run_interruptible(run)
    except DefinitionError as exc:  # checked against the op kinds: which file
        raise CommandError(f"{args.file}: {exc}") from exc
    except SolveError:
        after_failed_build(args, history, _store_root(args.cache_dir))
        raise


def _shared_spec(args: argparse.Namespace) -> str | None:
    try:
        return shared_cache_spec(args)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from exc


def _store_root(cache_dir: str | None) -> Path:
    return Path(cache_dir) / "snapshots" if cache_dir is not None else default_root()


def command_history(cache_dir: str | None) -> BuildHistory:
    """The build history of the command line: ``history`` in the store root."""
    return BuildHistory(_store_root(cache_dir) / "history")


# -- du and prune ------------------------------------------------------------------------


def human_size(n: float) -> str:
    """``n`` bytes as ``512B``, ``1.5kB``, ``10.0GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """``seconds`` ago as ``5s ago``, ``3m ago``, ``2h ago``, ``4d ago``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _describe(info: SnapshotInfo, width: int | None = 60) -> str:
    from ..worker import snapshot_kind, snapshot_label

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


def format_usage(usage: DiskUsage, now: float, *, verbose: bool = False) -> list[str]:
    """The ``du`` report: one row per snapshot, least recently used first (the
    order in which pruning deletes), then the totals per op kind and overall."""
    lines: list[str] = []
    if usage.entries:
        head = ["ID", "SIZE", "LAST USED", "IN USE", "DESCRIPTION"]
        if verbose:
            head.insert(3, "CREATED")
        rows = [head]
        for info in usage.entries:
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
        for kind, totals in usage.kinds.items():
            kinds.append([kind or "-", str(totals.snapshots), human_size(totals.size),
                          human_size(totals.in_use)])
        lines += _table(kinds)
    summary = f"Total: {human_size(usage.size)} in {usage.snapshots} snapshot(s)"
    if usage.in_use:
        summary += f", {human_size(usage.in_use)} in use"
    if usage.free is not None:
        summary += f"; {human_size(usage.free)} free on the cache's file system"
    lines.append(summary)
    return lines


def usage_json(usage: DiskUsage) -> str:
    """The ``du --format json`` document (see ``docs/worker.md``)."""
    from ..worker import snapshot_kind, snapshot_label

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
            for info in usage.entries
        ],
        "kinds": {
            kind or "-": {"snapshots": t.snapshots, "size": t.size, "in_use": t.in_use}
            for kind, t in usage.kinds.items()
        },
        "total": {"snapshots": usage.snapshots, "size": usage.size, "in_use": usage.in_use},
        "free": usage.free,
    }
    return json.dumps(doc, indent=2, sort_keys=True)


def _load_for_command(file: str) -> Definition:
    """:func:`load_definition` with its failures as :class:`CommandError` (the
    file's own bug: one line saying where, its traceback with ``--debug``)."""
    try:
        return load_definition(file)
    except _UserCodeError as exc:
        raise CommandError(str(exc), hint=True) from exc.__cause__
    except BuildFileError as exc:
        raise CommandError(str(exc)) from exc
    except DefinitionError as exc:
        raise CommandError(f"{file}: {exc}") from exc


def _cmd_diff(args: argparse.Namespace) -> int:
    from ..definition import diff_definitions

    changes = diff_definitions(_load_for_command(args.a), _load_for_command(args.b))
    if args.format == "json":
        doc = [
            {
                "a": c.a,
                "b": c.b,
                "name": c.name,
                "field": c.field,
                "before": c.before,
                "after": c.after,
                "cause": c.cause,
                "root_cause": c.root_cause,
            }
            for c in changes
        ]
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.writelines(c.describe() + "\n" for c in changes)
    return 1 if changes else 0


def _cmd_du(args: argparse.Namespace) -> int:
    from ..worker import disk_usage

    _check_cache_dir(args.cache_dir)
    with _opening_cache(args.cache_dir):
        usage = anyio.run(disk_usage, _store_root(args.cache_dir))
    shared = _shared_spec(args)
    shown = None if shared is None else anyio.run(shared_usage, shared)
    if args.format == "json":
        if shown is None:
            print(usage_json(usage))
        else:
            doc = json.loads(usage_json(usage))
            doc["shared"] = {"url": shown[0], **dataclasses.asdict(shown[1])}
            print(json.dumps(doc, indent=2))
        return 0
    for line in format_usage(usage, time.time(), verbose=args.verbose):
        print(line)
    if shown is not None:
        url, su = shown
        print(f"Shared cache {url}: {su.records} records, {su.blobs} blobs, "
              f"{human_size(su.size)}")
    return 0


_LIMIT_FLAGS = ("keep_duration", "max_used_space", "min_free_space", "reserved_space")


def _cmd_prune(args: argparse.Namespace) -> int:
    from ..worker import PrunePolicy, prune

    limits = [name for name in _LIMIT_FLAGS if getattr(args, name) is not None]
    if args.all and limits:
        given = ", ".join("--" + name.replace("_", "-") for name in limits)
        raise CommandError(
            f"--all deletes every unused snapshot; it cannot be combined with {given}", 2
        )
    try:
        policy = PrunePolicy(
            keep_duration=args.keep_duration or 0.0,
            max_used_space=args.max_used_space or 0,
            min_free_space=args.min_free_space or 0,
            reserved_space=args.reserved_space or 0,
            filters=tuple(args.filter),
        )
    except (TypeError, ValueError) as exc:
        raise CommandError(str(exc), 2) from exc
    _check_cache_dir(args.cache_dir)
    shared = _shared_spec(args)
    with _opening_cache(args.cache_dir):
        report = anyio.run(prune, _store_root(args.cache_dir), policy)
    for info in report.deleted:
        print(f"deleted {info.id[:12]}  {human_size(info.size)}  {_describe(info)}")
    print(f"Total: freed {human_size(report.freed)} in {len(report.deleted)} snapshot(s); "
          f"{human_size(report.remaining)} left")
    if shared is not None:
        url, sp = anyio.run(functools.partial(
            prune_shared, shared, keep_duration=args.keep_duration or 0.0,
            max_used_space=args.max_used_space or 0,
        ))
        print(f"Shared cache {url}: deleted {sp.records} records and {sp.blobs} blobs, "
              f"freed {human_size(sp.freed)}; {human_size(sp.remaining)} left")
    return 0


def _output_arg(text: str) -> OutputSpec:
    try:
        return parse_output(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _jobs_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


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
    from ..worker import PrunePolicy

    try:
        PrunePolicy(filters=(text,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def version_text() -> str:
    """``solver VERSION``, what ``solver --version`` prints: the installed
    distribution's version (``solver-engine``), else, when the package runs from
    a source tree that is not installed, ``solver.__version__``."""
    import importlib.metadata  # ~10 ms that only --version needs

    try:
        version = importlib.metadata.version("solver-engine")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        version = __version__
    return f"solver {version}"


class _Version(argparse.Action):
    """``--version``: print :func:`version_text` and exit, looked up only then."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(version_text() + "\n")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as every other failure of the
    command line (argparse prints the whole usage first), naming where the help is.
    Subcommand parsers are made of this class too (``add_subparsers`` uses the
    parent's class)."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see '{self.prog} --help')")
        self.exit(2)


_DEBUG_HELP = "on failure, also print the traceback (for bug reports)"


def _add_debug(subcommand: argparse.ArgumentParser) -> None:
    # Accepted after the subcommand too. SUPPRESS: when it is not given there,
    # the namespace keeps the value the top-level parser set.
    subcommand.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help=_DEBUG_HELP)


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line (its subcommands and flags)."""
    parser = _Parser(
        prog="solver", description="Build graphs with the solver engine's built-in worker."
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_help = (
        "snapshot cache directory (snapshots live in DIR/snapshots); default "
        "$SOLVER_CACHE_DIR, else the user cache directory (e.g. ~/.cache/solver-engine)"
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
        help="progress output on stderr (auto: tty on a terminal, else plain; "
        "NO_COLOR turns colour off)",
    )
    b.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    b.add_argument("-j", "--jobs", type=_jobs_arg, default=None, metavar="N",
                   help="run at most N exec steps at once (default: the number of CPUs)")
    b.add_argument(
        "--sandbox",
        choices=("bwrap", "none"),
        default="bwrap",
        help="how exec steps run: bwrap (default: in a bubblewrap sandbox that sees "
        "only its mounts and the system root) or none (on the host, no isolation)",
    )
    b.add_argument(
        "--secret",
        dest="secrets",
        type=_secret_arg,
        action=_MergeSecrets,
        default={},
        metavar="id=ID,src=PATH",
        help="a file exec steps may mount as secret ID (repeatable); never part of "
        "a cache key, record or exported cache",
    )
    b.add_argument(
        "--check",
        action="store_true",
        help="after the build, rebuild every op from scratch in a temporary store and "
        "compare each output with the build's: list the ops whose outputs differ and "
        "exit 1 if one does (docs/explain.md)",
    )
    b.add_argument(
        "--explain",
        action="store_true",
        help="say why each op that ran missed the cache: one line per op after the "
        "build, and a 'reason' in its started event with --progress json "
        "(docs/explain.md)",
    )
    add_cluster_argument(b)
    add_gate_arguments(b)
    add_failure_arguments(b)
    add_frontend_arguments(b)
    add_cache_arguments(b)
    add_shared_cache_argument(b)
    _add_debug(b)
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
    add_shared_cache_argument(d)
    _add_debug(d)
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
    add_shared_cache_argument(p)
    _add_debug(p)
    p.set_defaults(func=_cmd_prune)

    f = sub.add_parser(
        "diff",
        help="list the ops that differ between two definitions",
        description="Compare definitions A and B (JSON files, or Python files as for "
        "build): the ops whose own fields differ first (the root causes, deepest "
        "first, each with its first differing field), then the ops that differ only "
        "through an input. Exit status 0 when they are the same, 1 when they differ.",
    )
    f.add_argument("a", metavar="A")
    f.add_argument("b", metavar="B")
    f.add_argument("--format", choices=("text", "json"), default="text",
                   help="one line per op (default) or a JSON list")
    _add_debug(f)
    f.set_defaults(func=_cmd_diff)

    add_history_command(
        sub,
        history_of=command_history,
        duration_arg=_duration_arg,
        add_debug=_add_debug,
        cache_help=cache_help,
    )
    add_debug_command(
        sub,
        history_of=command_history,
        store_root_of=_store_root,
        add_debug=_add_debug,
        cache_help=cache_help,
    )
    add_graph_command(
        sub,
        open_solver=open_solver,
        load_definition=_load_for_command,
        check_cache_dir=_check_cache_dir,
        add_debug=_add_debug,
        cache_help=cache_help,
    )
    return parser


class _LogLines(logging.Handler):
    """The ``solver`` logger's warnings and errors as one ``solver: warning:``
    line each on stderr (looked up at each record, so that a replaced
    ``sys.stderr`` is used): a logged exception adds its type and message, its
    traceback only with ``--debug``. All are warnings, errors included: what is
    logged did not stop the command (a failed automatic GC, a metadata file that
    could not be written), and ``solver: error:`` is kept for the one line that
    says why the command failed."""

    def __init__(self, debug: bool) -> None:
        super().__init__(logging.WARNING)
        self.debug = debug

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                text += f": {type(exc).__name__}: {exc}"
                if self.debug:
                    traceback.print_exception(exc, file=sys.stderr)
            _warning(text)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _log_lines(debug: bool) -> Iterator[None]:
    logger = logging.getLogger("solver")
    handler = _LogLines(debug)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (a task
    group wraps what it re-raises); ``exc`` itself otherwise."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _silence_stdout() -> None:
    # stdout's reader went away (`solver du | head -1`): point stdout at
    # /dev/null so that the interpreter's final flush does not fail again.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _report(exc: BaseException, debug: bool) -> int:
    """Print the one line for a failure (after its traceback with ``debug``) and
    return the exit status."""
    exc = _single(exc)
    if debug:
        # A CommandError is the message; what went wrong is its cause.
        shown = exc.__cause__ if isinstance(exc, CommandError) else None
        traceback.print_exception(shown or exc, file=sys.stderr)
    hint = "" if debug else f" ({DEBUG_HINT})"
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("solver: interrupted\n")
        sys.stderr.flush()
        return 130
    if isinstance(exc, CommandError):
        _error(exc.message + (hint if exc.hint else ""))
        return exc.status
    if isinstance(exc, InternalError):
        _error(f"internal error: {exc}; this is a bug{hint}")
        return 1
    if isinstance(exc, SolveError):
        name = exc.vertex_name
        text = str(exc)
        _error(f"building {name!r} failed: {text}" if name and name not in text else text)
        return 1
    if isinstance(exc, BrokenPipeError) and exc.filename is None:
        _silence_stdout()
        return 1
    if isinstance(exc, OSError):
        _error(_os_reason(exc))
        return 1
    # Anything else is a bug of this program, not of the input: say so, and
    # where to get the traceback.
    text = str(exc)
    _error(f"internal error: {type(exc).__name__}{': ' + text if text else ''}; "
           f"this is a bug{hint}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the
    exit status (see the module docs). Every failure is reported as one line on
    stderr, never as a traceback (unless ``--debug`` is given)."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or bad arguments (2)
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    with _log_lines(debug):
        try:
            status: int = args.func(args)
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # every failure is one line
            return _report(exc, debug)
    return status


if __name__ == "__main__":
    sys.exit(main())
