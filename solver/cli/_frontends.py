"""``solver build --frontend NAME``: build through a frontend, and export its
results.

Frontends. ``buildfile`` runs the example frontend (``frontends.buildfile``) in
this process, through a :class:`frontends.forwarder.Forwarder`; ``gateway``
runs the frontend program named by ``--opt source=CMD`` as a subprocess through
a :class:`frontends.gateway.Gateway`. The gateway runs only the built-in
program, :data:`BUILTIN_SOURCES` (the buildfile frontend as a program, run with
the Python that runs the CLI), and the command lines given with
``--allow-frontend-source``. The CLI is an application
of both packages: it loads ``frontends`` when a frontend is asked for, so the
library ``solver`` itself never imports it.

Inputs. ``FILE`` is a build context directory, or a file in one. A directory
is the input ``context``; a file adds the input ``buildfile`` (a tree holding
that file alone) and the option ``filename`` (its name). Both are
``source.local`` trees, so an unchanged directory is a cache hit.

Export (``--output``). A result with named refs (``refs``, such as one per
platform) is exported to a directory, one subdirectory per key (``/`` in a key
becomes ``_``: ``out/linux_amd64/``), and the attestations of each key to
``DIR/<subdirectory>.attestations.json`` (see ``docs/buildfile.md``,
"Command line"); the main ``ref`` is then not exported again. All of that is one
directory export (:func:`~solver.worker._export.export_parts_to_dir`, one
manifest), so building into the same directory again replaces all of it and
refuses entries no export wrote. A result with only a main ref is exported as by
a plain build (a directory or a tar). A tar takes one result: a result with
several named refs must go to a directory.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import importlib
import json
import shlex
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio

from .._errors import SolveError
from .._result import CachedResult
from ..bridge import Attestation, Frontend, Solver, SolveRequest, SolveResult
from ..definition import Definition
from ..insight import BuildHistory, BuildSummary
from ..worker import State, export_parts_to_dir, export_to_dir, export_to_tar
from ._cacheopts import existing_imports
from ._interrupt import run_interruptible
from ._progress import describe_output, make_renderer, run_progress
from ._summary import finish_build, gate_failures

if TYPE_CHECKING:
    # type-only: _main dispatches to this module
    from ._main import OutputSpec

__all__ = [
    "BUILTIN_SOURCES",
    "FRONTENDS",
    "add_frontend_arguments",
    "build_with_frontend",
    "builtin_source",
    "cmd_build_frontend",
    "export_frontend_result",
    "frontend_request_parts",
    "make_frontend",
    "output_dir_name",
]

#: The frontends ``--frontend`` accepts.
FRONTENDS: Final = ("buildfile", "gateway")

#: The frontend programs the gateway runs without ``--allow-frontend-source``.
#: ``python`` in them means the Python that runs the command line.
BUILTIN_SOURCES: Final = ("python -m frontends.buildfile",)


def builtin_source(source: str) -> str:
    """The command line the gateway runs for ``source``: a built-in program with
    ``python`` replaced by this interpreter (``sys.executable``); any other
    source as it is."""
    if source in BUILTIN_SOURCES:
        return shlex.join([sys.executable, *shlex.split(source)[1:]])
    return source

OpenSolver = Callable[[str | None], contextlib.AbstractAsyncContextManager[Solver]]


def add_frontend_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``build`` flags of this module: ``--frontend``, ``--opt``,
    ``--allow-frontend-source``."""
    parser.add_argument(
        "--frontend",
        choices=FRONTENDS,
        default=None,
        help="build FILE (a build context directory, or a build file in one) with a "
        "frontend: buildfile (in process) or gateway (the program --opt source=CMD)",
    )
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a frontend option, e.g. platforms=linux/amd64,linux/arm64 or "
        "build-arg:NAME=VALUE (repeatable)",
    )
    parser.add_argument(
        "--allow-frontend-source",
        action="append",
        default=[],
        metavar="CMD",
        help="let the gateway run frontend program CMD too (repeatable; built in: "
        + ", ".join(repr(s) for s in BUILTIN_SOURCES) + ")",
    )


def parse_opts(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict. Raises ValueError for an item without ``=``,
    an empty key, or a key given twice."""
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt {item!r}: expected KEY=VALUE")
        if key in opts:
            raise ValueError(f"--opt {key!r} is given twice")
        opts[key] = value
    return opts


def frontend_request_parts(
    path: str, opts: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, Definition]]:
    """The options and inputs for building ``path`` (see the module docs): ``opts``
    plus ``filename`` for a file. Raises ValueError when ``path`` does not exist,
    or is a file while ``opts`` names another ``filename``."""
    p = Path(path).absolute()
    out = dict(opts)
    if p.is_dir():
        return out, {"context": State.local(p, name="build context").definition()}
    if not p.is_file():
        raise ValueError(f"{path}: no such file or directory")
    if out.setdefault("filename", p.name) != p.name:
        raise ValueError(
            f"{path} is a file, and --opt filename={out['filename']} names another; give "
            "the directory instead"
        )
    inputs = {
        "context": State.local(p.parent, name="build context").definition(),
        "buildfile": State.local(
            p.parent, include=[glob.escape(p.name)], name="build file"
        ).definition(),
    }
    return out, inputs


def make_frontend(name: str, allowed_sources: Sequence[str] = ()) -> Frontend:
    """The frontend ``--frontend name`` runs (``frontends`` is imported here)."""
    if name == "buildfile":
        forwarder: Any = importlib.import_module("frontends.forwarder")
        buildfile: Any = importlib.import_module("frontends.buildfile")
        frontend: Frontend = forwarder.Forwarder(buildfile.build)
        return frontend
    if name == "gateway":
        gateway: Any = importlib.import_module("frontends.gateway")
        allowed = [builtin_source(s) for s in BUILTIN_SOURCES]
        frontend = gateway.Gateway(allowed_sources=[*allowed, *allowed_sources])
        return frontend
    raise ValueError(f"unknown frontend {name!r}; known: {', '.join(FRONTENDS)}")


def output_dir_name(key: str) -> str:
    """The subdirectory a ref under ``key`` is exported to: ``/`` (and ``\\``)
    become ``_``. Raises :class:`~solver.SolveError` for a key that would not be
    a plain name."""
    name = key.replace("/", "_").replace("\\", "_")
    if name in ("", ".", "..") or "\0" in name:
        raise SolveError(f"cannot export the ref under key {key!r}: not usable as a directory")
    return name


def _meta_text(value: bytes) -> str | dict[str, str]:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}


def _snapshot_id(ref: CachedResult) -> object:
    return getattr(ref.sys, "id", None)


async def export_frontend_result(
    result: SolveResult, dest: str, *, tar: bool = False, overwrite: bool = False
) -> None:
    """Export ``result`` (see the module docs) to directory ``dest``, or as a tar
    to ``dest`` when ``tar``. Raises :class:`~solver.SolveError`."""
    if not result.refs:
        if result.ref is None:
            raise SolveError("the frontend returned no result to export")
        if tar:
            await export_to_tar(result.ref, dest)
        else:
            await export_to_dir(result.ref, dest, overwrite=overwrite)
        return
    if tar:
        if len(result.refs) != 1:
            keys = ", ".join(result.refs)
            raise SolveError(
                f"the frontend returned {len(result.refs)} refs ({keys}); a tar holds one: "
                "export them to a directory (one subdirectory per key)"
            )
        await export_to_tar(next(iter(result.refs.values())), dest)
        return
    names: dict[str, str] = {}
    for key in result.refs:
        name = output_dir_name(key)
        if name in names.values():
            raise SolveError(f"refs {key!r} and another key would both be exported to {name!r}")
        names[key] = name
    # Everything goes into one export (one manifest in dest), so that building
    # into the same directory again replaces all of it, attestations included.
    parts: dict[str, CachedResult | bytes] = {}
    by_snapshot: dict[object, str] = {}
    for key, ref in result.refs.items():
        _add_part(parts, names[key], ref)
        by_snapshot.setdefault(_snapshot_id(ref), names[key])
    for key, atts in result.attestations.items():
        name = names.get(key) or output_dir_name(key)
        docs = [
            _attestation_doc(att, i, name, result.refs.get(key), by_snapshot, parts)
            for i, att in enumerate(atts)
        ]
        text = json.dumps(docs, indent=2, sort_keys=True) + "\n"
        _add_part(parts, f"{name}.attestations.json", text.encode("utf-8"))
    await export_parts_to_dir(parts, dest, overwrite=overwrite)


def _add_part(
    parts: dict[str, CachedResult | bytes], name: str, part: CachedResult | bytes
) -> None:
    if name in parts:
        raise SolveError(f"two outputs of the frontend would both be exported to {name!r}")
    parts[name] = part


def _attestation_doc(
    att: Attestation[CachedResult],
    index: int,
    name: str,
    own: CachedResult | None,
    by_snapshot: Mapping[object, str],
    parts: dict[str, CachedResult | bytes],
) -> dict[str, object]:
    ref_dir: str | None = None
    if att.ref is not None:
        snapshot = _snapshot_id(att.ref)
        if own is not None and snapshot == _snapshot_id(own):
            ref_dir = name
        elif snapshot is not None and snapshot in by_snapshot:
            ref_dir = by_snapshot[snapshot]
        else:  # points at a result that is not an output: export it next to them
            ref_dir = f"{name}.attestation-{index}"
            _add_part(parts, ref_dir, att.ref)
    return {
        "kind": att.kind,
        "ref": ref_dir,
        "path": att.path,
        "file": f"{ref_dir}/{att.path.lstrip('/')}" if ref_dir is not None and att.path else None,
        "metadata": {k: _meta_text(v) for k, v in sorted(att.metadata.items())},
    }


async def build_with_frontend(
    solver: Solver,
    request: SolveRequest,
    *,
    progress: str = "plain",
    output: OutputSpec | None = None,
    history: BuildHistory | None = None,
) -> BuildSummary:
    """Solve ``request`` (naming a frontend of ``solver``) in a new job whose
    progress is rendered to stderr, export the result to ``output`` if given,
    and release everything. The build's summary ends the progress output, is
    recorded in ``history`` and returned. Raises :class:`~solver.SolveError`."""
    if output is not None and output.type not in ("local", "tar"):
        raise SolveError(f"--output type={output.type} is not supported with --frontend")
    shown = None if output is None else describe_output(output.type, output.dest)
    renderer = make_renderer(progress, sys.stderr, output=shown)
    job = solver.new_job()
    failure: BaseException | None = None
    started = time.time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_progress, job.status(), renderer)
        try:
            async with await solver.solve(request, job=job) as result:
                if output is not None:
                    await export_frontend_result(
                        result, output.dest, tar=output.type == "tar", overwrite=output.overwrite
                    )
        except Exception as exc:  # re-raised below, outside the task group
            failure = exc
        finally:
            await job.discard()  # ends the status stream, and so the renderer
    name = f"frontend:{request.frontend}"
    summary = await finish_build(job, name, started, renderer, sys.stderr, history)
    if failure is not None:
        raise failure
    return summary


def _error(message: str) -> None:
    # The command line's one-line form (solver.cli._main reports the rest).
    sys.stderr.write(f"solver: error: {' '.join(message.split())}\n")
    sys.stderr.flush()


def cmd_build_frontend(args: argparse.Namespace, open_solver: OpenSolver) -> int:
    """``solver build --frontend ...``: the exit status (see ``solver.cli``). A
    failed build raises :class:`~solver.SolveError` (and Ctrl-C
    ``KeyboardInterrupt``), which :func:`solver.cli.main` reports as one line."""
    if args.frontend is None:
        _error("--opt and --allow-frontend-source need --frontend")
        return 2
    try:
        opts, inputs = frontend_request_parts(args.file, parse_opts(args.opt))
    except ValueError as exc:
        _error(str(exc))
        return 1
    if args.frontend == "gateway" and "source" in opts:
        opts["source"] = builtin_source(opts["source"])
    try:
        frontend = make_frontend(args.frontend, args.allow_frontend_source)
    except ImportError as exc:
        # Not found or broken: one line saying which, the traceback with --debug.
        if getattr(args, "debug", False):
            traceback.print_exception(exc, file=sys.stderr)
            _error(f"cannot load frontend {args.frontend!r}: {type(exc).__name__}: {exc}")
        else:
            _error(f"cannot load frontend {args.frontend!r}: {type(exc).__name__}: {exc} "
                   "(re-run with --debug for the traceback)")
        return 1
    request = SolveRequest(
        frontend=args.frontend,
        frontend_opts=opts,
        frontend_inputs=inputs,
        cache_imports=existing_imports(args.import_cache),
        cache_exports=args.export_cache,
    )

    async def run() -> BuildSummary:
        async with _solver_with(open_solver(args.cache_dir), args.frontend, frontend) as solver:
            return await build_with_frontend(solver, request, progress=args.progress,
                                             output=args.output, history=args.history)

    summary = run_interruptible(run)
    gate = gate_failures(summary, expect_cached=args.expect_cached,
                         max_executed=args.max_executed)
    if gate is not None:
        sys.stderr.writelines(line + "\n" for line in gate[1])
        _error(gate[0])
        return 1
    return 0


@contextlib.asynccontextmanager
async def _solver_with(
    opened: contextlib.AbstractAsyncContextManager[Solver], name: str, frontend: Frontend
) -> AsyncIterator[Solver]:
    async with opened as solver:
        solver.frontends[name] = frontend
        yield solver
