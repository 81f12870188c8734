"""``solver debug ID OP``, ``solver build --on-error=shell`` and ``--keep-failed DIR``.

The command line's worker keeps the newest :data:`KEEP_FAILED` failed ``exec``
steps with their trees as the failure left them
(:mod:`solver.worker._failedsteps`). ``solver debug ID OP`` finds op ``OP`` (a
name, or a prefix of its digest) of build ``ID`` in the history, and runs a shell,
or the command given after it, in a fresh copy of that step's sandbox: its
inputs read-only, its working tree as it failed, its environment and ``cwd``.
Its exit status is the command's. Nothing done there reaches the cache.

``solver build --on-error=shell`` does the same for the step that failed, at
once, when stdin and stderr are a terminal (otherwise it says which ``solver
debug`` command to run); ``--keep-failed DIR`` copies each failed step's tree to
``DIR/<digest>`` (the first 12 hex digits of the op's digest).

This module does not import ``_main``; what it needs is handed in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from .._errors import SolveError
from ..insight import BuildHistory, BuildRecord, OpRecord
from ..worker import FailedStep, copy_failed_tree, find_failed_step, run_in_failed_step

__all__ = ["KEEP_FAILED", "add_debug_command", "add_failure_arguments", "after_failed_build"]

#: How many failed steps the command line's worker keeps.
KEEP_FAILED: Final = 5

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def _short(digest: str) -> str:
    return digest.rpartition(":")[2][:12]


def find_op(record: BuildRecord, ref: str) -> OpRecord:
    """The op of ``record`` named ``ref`` or whose digest starts with ``ref``
    (with or without ``sha256:``); :class:`SolveError` unless exactly one."""
    ops = record.summary.ops
    found = [op for op in ops if op.name == ref]
    if not found:
        found = [
            op for op in ops
            if op.digest.startswith(ref) or op.digest.rpartition(":")[2].startswith(ref)
        ]
    if not found:
        raise SolveError(f"build {record.id} has no op {ref!r}")
    if len(found) > 1:
        names = ", ".join(f"{op.name} ({_short(op.digest)})" for op in found)
        raise SolveError(f"op {ref!r} is ambiguous in build {record.id}: {names}")
    return found[0]


def failed_step_of(store_root: Path, record: BuildRecord, op: OpRecord) -> FailedStep:
    """The kept failed step of ``op``, or a :class:`SolveError` saying why there is none."""
    if op.state != "failed":
        raise SolveError(f"op {op.name!r} did not fail in build {record.id} (it was {op.state})")
    step = find_failed_step(store_root, op.digest)
    if step is None:
        raise SolveError(
            f"the failed step {op.name!r} of build {record.id} was not kept: only exec "
            f"steps are, and only the newest {KEEP_FAILED}"
        )
    return step


def add_failure_arguments(parser: argparse.ArgumentParser) -> None:
    """``--on-error`` and ``--keep-failed`` of ``solver build``."""
    parser.add_argument(
        "--on-error",
        choices=("fail", "shell"),
        default="fail",
        help="shell: when an exec step fails, open a shell in its sandbox as it failed "
        "(on a terminal; see 'solver debug')",
    )
    parser.add_argument(
        "--keep-failed",
        metavar="DIR",
        default=None,
        help="when an exec step fails, copy its working tree as it failed to DIR/<digest>",
    )


def after_failed_build(
    args: argparse.Namespace, history: BuildHistory, store_root: Path
) -> None:
    """``--keep-failed`` and ``--on-error=shell`` for the failed build that
    ``history`` recorded last (nothing if it recorded none). What goes wrong
    here is a warning: the build's own failure is the error to report."""
    try:
        _after_failed_build(args, history, store_root)
    except (SolveError, OSError) as exc:
        sys.stderr.write(f"solver: warning: {' '.join(str(exc).split())}\n")


def _after_failed_build(
    args: argparse.Namespace, history: BuildHistory, store_root: Path
) -> None:
    record = history.last
    if record is None or (args.keep_failed is None and args.on_error != "shell"):
        return
    steps: list[tuple[OpRecord, FailedStep]] = []
    for op in record.summary.ops:
        if op.state == "failed":
            step = find_failed_step(store_root, op.digest)
            if step is not None:
                steps.append((op, step))
    for op, step in steps:
        if args.keep_failed is not None:
            dest = Path(args.keep_failed) / _short(op.digest)
            if dest.exists():
                raise SolveError(f"--keep-failed: {dest} exists; remove it or choose another DIR")
            copy_failed_tree(step, dest)
            sys.stderr.write(f"solver: kept the tree of failed step {op.name!r} in {dest}\n")
    if args.on_error == "shell" and steps:
        op, step = steps[0]
        command = f"solver debug {record.id} {_short(op.digest)}"
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            sys.stderr.write(
                f"solver: --on-error=shell needs a terminal; to debug the step run: {command}\n"
            )
            return
        sys.stderr.write(
            f"solver: a shell in failed step {op.name!r} (exit to end it; nothing done "
            f"here is kept; again later: {command})\n"
        )
        sys.stderr.flush()
        run_in_failed_step(step)


def add_debug_command(
    sub: argparse._SubParsersAction[_P],
    *,
    history_of: Callable[[str | None], BuildHistory],
    store_root_of: Callable[[str | None], Path],
    add_debug: Callable[[argparse.ArgumentParser], None],
    cache_help: str,
) -> _P:
    """Add ``solver debug`` to ``sub``."""
    d = sub.add_parser(
        "debug",
        help="run a shell or a command in a failed exec step's sandbox, as it failed",
        description="Re-create the sandbox of op OP (a name or digest prefix) that failed "
        "in build ID (see 'solver history ls'; 'last' for the newest): its inputs "
        "read-only, its working tree as the failure left it, its environment and cwd. "
        "Run COMMAND there (default: a shell) and exit with its status. It runs in a "
        "copy: nothing done there reaches the cache.",
    )
    d.add_argument("id", metavar="ID")
    d.add_argument("op", metavar="OP")
    d.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="what to run (default: /bin/sh)")
    d.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    add_debug(d)
    # Options given after OP land in the remainder (argparse takes everything
    # after the last positional); they are read from the part before '--'.
    late = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    late.add_argument("--cache-dir", default=None)
    late.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    def cmd_debug(args: argparse.Namespace) -> int:
        rest = list(args.command)
        cut = rest.index("--") if "--" in rest else len(rest)
        try:
            _, unknown = late.parse_known_args(rest[:cut], namespace=args)
        except argparse.ArgumentError as exc:
            d.error(str(exc))
        if unknown:
            d.error(
                f"unrecognized arguments: {' '.join(unknown)} (the command to run "
                "goes after '--')"
            )
        args.command = rest[cut + 1 :]
        record = history_of(args.cache_dir).get(args.id)
        op = find_op(record, args.op)
        step = failed_step_of(store_root_of(args.cache_dir), record, op)
        command = args.command
        if step.secrets:
            sys.stderr.write(
                f"solver: warning: the step used secrets ({', '.join(step.secrets)}); "
                "they are never kept, so they are not available here\n"
            )
        return run_in_failed_step(step, command or ("/bin/sh",))

    d.set_defaults(func=cmd_debug)
    return d
