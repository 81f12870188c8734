"""Failed ``exec`` steps kept for debugging, and a shell in one.

When an ``exec`` step exits non-zero and the worker keeps failed steps
(``Worker(keep_failed=N)``; the command line keeps 5), the step's exec root ``R``
is copied, as the failure left it, to ``<store root>/failed/<vertex>/root``:
its read-only input mounts (copies, write bits dropped) and its writable mounts
with whatever the process wrote. Next to it, ``step.json`` records how the step
ran: its arguments, its declared environment, its ``cwd``, which mounts were
read-only, its system root, network and sandbox mode. Only the newest ``N``
steps are kept (the oldest are deleted as a new one is kept).

:func:`run_in_failed_step` re-creates that sandbox (the same ``bwrap`` command
line as the step's, :func:`~solver.worker._sandbox.bwrap_argv`) over a *fresh
copy* of the kept tree in a temporary directory outside the store, runs a shell
or a command in it, and deletes the copy: the kept tree stays as the failure
left it, and nothing done in the shell reaches the store or its cache. Secrets
are never recorded, so a step that used them runs without them here (the
report says so). The step's limits (time, memory, processes) are not applied:
a debugging session is the user's.

Why a copy at failure time rather than keeping the per-exec directory: the
directory's writable mounts are mutable snapshots that the exec discards on
every path, and the store empties ``tmp/`` when it opens; a copy in a
directory of its own survives both, and costs only on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._errors import SolveError
from ._sandbox import (
    BASE_ENV,
    SANDBOX_ROOT,
    Network,
    SandboxMode,
    SandboxSpec,
    bwrap_argv,
    find_bwrap,
    resolve_rootfs,
)
from ._snapshots import _remove_path

__all__ = [
    "FAILED_DIR",
    "FailedStep",
    "copy_failed_tree",
    "find_failed_step",
    "keep_failed_step",
    "run_in_failed_step",
]

#: The folder of the store root that holds kept failed steps.
FAILED_DIR: Final = "failed"
_STEP_FILE = "step.json"


@dataclass(frozen=True, slots=True)
class FailedStep:
    """How a failed ``exec`` step ran (see the module docstring); ``path`` is its
    folder, whose ``root`` holds the tree as the failure left it."""

    vertex: str
    name: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    cwd: tuple[str, ...]
    readonly: tuple[tuple[str, ...], ...]
    rootfs: tuple[str, ...]
    network: Network
    sandbox: SandboxMode
    secrets: tuple[str, ...]
    error: str
    failed_at: float
    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root"


def _folder(store_root: Path, vertex: str) -> Path:
    return store_root / FAILED_DIR / vertex.rpartition(":")[2]


def _force_remove(path: Path) -> None:
    """Remove ``path`` whatever the modes in it (read-only copies have no write
    bits); missing is fine: the store's own removal."""
    _remove_path(os.fspath(path))


def keep_failed_step(
    store_root: Path,
    tree: Path,
    step: FailedStep,
    keep: int,
    bound: Mapping[tuple[str, ...], str] | None = None,
) -> FailedStep:
    """Copy ``tree`` (the failed step's exec root) and the record of ``step`` into
    the store's failed-steps folder, then delete all but the ``keep`` newest kept
    steps. ``bound`` maps the read-only mounts the sandbox bound from their
    snapshots (not in ``tree``: only their mount points are) to those snapshot
    paths, which are copied into the kept tree at their places. Returns the step
    with its ``path``. Blocking: run it in a thread."""
    folder = _folder(store_root, step.vertex)
    staging = folder.with_name(folder.name + ".new")
    for stale in (staging, folder):
        _force_remove(stale)
    staging.mkdir(parents=True)
    shutil.copytree(tree, staging / "root", symlinks=True)
    for parts, source in sorted((bound or {}).items(), key=lambda item: len(item[0])):
        place = staging.joinpath("root", *parts)
        _force_remove(place)  # the empty mount point
        place.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(source):
            shutil.copytree(source, place, symlinks=True)
        else:
            shutil.copy2(source, place, follow_symlinks=False)
    doc = {
        "vertex": step.vertex,
        "name": step.name,
        "args": list(step.args),
        "env": dict(step.env),
        "cwd": list(step.cwd),
        "readonly": [list(p) for p in step.readonly],
        "rootfs": list(step.rootfs),
        "network": step.network,
        "sandbox": step.sandbox,
        "secrets": list(step.secrets),
        "error": step.error,
        "failed_at": step.failed_at,
    }
    (staging / _STEP_FILE).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    staging.rename(folder)
    kept = sorted(
        (p for p in folder.parent.iterdir() if (p / _STEP_FILE).is_file()),
        key=lambda p: (p / _STEP_FILE).stat().st_mtime,
    )
    for old in kept[: max(0, len(kept) - keep)]:
        _force_remove(old)
    return _load(folder)


def _load(folder: Path) -> FailedStep:
    doc = json.loads((folder / _STEP_FILE).read_text(encoding="utf-8"))
    return FailedStep(
        vertex=doc["vertex"],
        name=doc["name"],
        args=tuple(doc["args"]),
        env=dict(doc["env"]),
        cwd=tuple(doc["cwd"]),
        readonly=tuple(tuple(p) for p in doc["readonly"]),
        rootfs=tuple(doc["rootfs"]),
        network=doc["network"],
        sandbox=doc["sandbox"],
        secrets=tuple(doc["secrets"]),
        error=doc["error"],
        failed_at=doc["failed_at"],
        path=folder,
    )


def find_failed_step(store_root: Path, vertex: str) -> FailedStep | None:
    """The kept failed step of ``vertex`` (a vertex digest) in the store at
    ``store_root``, or ``None``."""
    folder = _folder(store_root, vertex)
    if not (folder / _STEP_FILE).is_file():
        return None
    try:
        return _load(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SolveError(f"the kept failed step in {folder} is damaged: {exc}") from exc


def copy_failed_tree(step: FailedStep, dest: Path) -> None:
    """Copy the step's tree, as the failure left it, to ``dest`` (which must not
    exist), with the owner's write bit added so that it can be edited and deleted."""
    shutil.copytree(step.root, dest, symlinks=True)
    for top, dirs, files in os.walk(dest):
        for name in (*dirs, *files):
            p = os.path.join(top, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)


def _command(
    step: FailedStep, root: Path, command: Sequence[str]
) -> tuple[list[str], Path, dict[str, str]]:
    """The command line, start directory and environment that run ``command`` in
    ``step``'s sandbox over ``root`` (a copy of its tree), as the step ran."""
    env = {**BASE_ENV, **step.env}
    if step.sandbox == "none":
        env["SOLVER_ROOT"] = os.fspath(root)
        if "HOME" not in step.env:
            home = root.parent / "home"
            home.mkdir(exist_ok=True)
            env["HOME"] = os.fspath(home)
        return list(command), root.joinpath(*step.cwd), env
    bwrap = find_bwrap()
    if bwrap is None:
        raise SolveError("the step ran in a bubblewrap sandbox, and 'bwrap' is not installed")
    env["SOLVER_ROOT"] = SANDBOX_ROOT
    spec = SandboxSpec(
        args=tuple(command),
        root=os.fspath(root),
        cwd=step.cwd,
        env=env,
        rootfs=resolve_rootfs(step.rootfs),
        readonly=step.readonly,
        network=step.network,
        as_root=os.geteuid() == 0,
    )
    return bwrap_argv(bwrap, spec), root.parent, {"PATH": BASE_ENV["PATH"]}


def run_in_failed_step(step: FailedStep, command: Sequence[str] = ("/bin/sh",)) -> int:
    """Run ``command`` (default: a shell) in a fresh copy of ``step``'s sandbox,
    with this process's standard streams; return its exit status. The copy is
    deleted after. Blocking: the caller waits for the user's session."""
    if not step.root.is_dir():
        raise SolveError(f"the failed step's tree is missing: {step.root}")
    scratch = Path(tempfile.mkdtemp(prefix="solver-debug-"))
    try:
        root = scratch / "root"
        shutil.copytree(step.root, root, symlinks=True)
        argv, cwd, env = _command(step, root, command)
        return subprocess.run(argv, cwd=cwd, env=env, check=False).returncode
    finally:
        _force_remove(scratch)

