"""The built-in ``exec`` op kind: run a process over snapshot mounts.

``register_exec(registry, store)`` registers the kind ``exec`` in an
:class:`~solver.OpKindRegistry`. An ``exec`` op runs one process in a fresh per-exec
directory ``R`` in which each of its mounts is materialised, and turns some of
those mounts into output snapshots. The process runs in a bubblewrap sandbox
(:mod:`solver.worker._sandbox`: it sees ``R`` at ``/build``, a read-only system
root, a private ``/tmp``, no network, only its declared environment), or, with
``register_exec(..., sandbox="none")``, as a plain host process.

Payload
-------

::

    {
      "args":   ["prog", "arg", ...],          # required, non-empty list of strings
      "env":    {"NAME": "value", ...},        # optional, default {}
      "cwd":    "rel/path",                    # optional, default "" (R itself)
      "mounts": [                              # optional, default []
        {"input": 0 | null,                    # which op input to start from
         "dest": "rel/path",                   # where, relative to R ("" or "." = R)
         "readonly": false,                    # optional, default false
         "output": 0 | null,                   # optional: becomes that output
         "selector": "sub/path"},              # optional, read-only mounts only
        ...
      ],
      "rootfs":  ["/usr", "/bin", ...],        # optional, default DEFAULT_ROOTFS
      "network": "none" | "host",              # optional, default "none"
      "limits":  {"timeout": 600,              # optional: seconds of wall clock,
                  "memory": 2**32,             #   bytes of address space,
                  "processes": 512},           #   processes at once (integers > 0)
      "secrets": ["id", ...]                   # optional: worker secrets to expose
    }

* A **read-only** mount of input ``i`` is, in the sandbox, that input snapshot
  itself, bound read-only by bwrap (``--ro-bind``) on an empty mount point: no
  copy, and no process (not even root in its user namespace) can change it.
  Without a sandbox it is a private copy with every write bit dropped, so that
  nothing the host process does to it can reach the input snapshot (write bits
  do not stop a process running as root; the copy does). ``input: null`` gives
  an empty read-only directory. A read-only mount has no ``output`` and may not
  contain other mounts.
* A **writable** mount starts as a writable copy of input ``i``
  (:meth:`SnapshotStore.new_mutable` with ``base=``) or empty (``input: null``).
  If it has an ``output`` index, it is committed as that output snapshot when the
  process exits with status 0; otherwise it is thrown away.
* Mounts may nest inside writable mounts (``"src"`` and ``"src/vendor"``): they are
  materialised shallowest first; whatever the enclosing mount held at the nested
  destination is hidden while the process runs and put back before the enclosing
  mount is committed. Directories created to hold a nested mount point stay (empty)
  in the enclosing mount, as with container mounts.
* The number of outputs is the number of mounts with an ``output`` index; the
  indexes are ``0..n-1``, each used once.
* ``cwd`` is relative to ``R``; it is created (as plain directories) if missing.
* The environment is exactly :data:`~solver.worker._sandbox.BASE_ENV` (a fixed
  ``PATH``, ``HOME``, ``LANG=C.UTF-8``) updated with ``env``, plus
  ``SOLVER_ROOT`` = the path of ``R`` as the process sees it (``/build`` in the
  sandbox) and, when the op names secrets, ``SOLVER_SECRETS`` = their directory
  (``env`` may set neither); nothing of the worker's own environment. ``args[0]``
  is looked up on that ``PATH`` (or relative to ``cwd`` when it contains a ``/``).
* ``rootfs``, ``network``, ``secrets``: see :mod:`solver.worker._sandbox` and
  ``docs/worker.md`` ("Sandbox"). A secret is a worker secret
  (``register_exec(..., secrets={id: bytes or path})``) exposed as a read-only
  file ``$SOLVER_SECRETS/<id>``; its contents are never part of anything recorded.
* ``limits``: ``timeout`` kills the step (its process group; in the sandbox its
  PID namespace) and fails it with "exceeded its time limit"; ``memory`` is
  ``RLIMIT_AS``; ``processes`` is ``RLIMIT_NPROC``, or for a root worker (which
  the kernel exempts from it) a pids cgroup.

Paths (``dest``, ``cwd``) are relative with ``/`` separators; absolute paths,
``..``, NUL bytes and two mounts at the same destination are refused by the kind's
``validate`` hook, so :meth:`Definition.validate <solver.Definition.validate>` (and
so :meth:`Solver.solve <solver.Solver.solve>`) rejects them with a
:class:`~solver.DefinitionError` before anything runs. Input indexes are checked
against the op's inputs when the op is made. While mounts are placed, and when
they are collected after the process exits, no symlink inside a mount is ever
followed, so neither an input's symlinks nor ones the process makes can redirect
a mount (or what a nested mount hid) outside ``R``.

Running
-------

The process is started with :func:`anyio.open_process` in a new session (its own
process group), stdin from ``/dev/null``, and its stdout and stderr read as they
come: each chunk goes to the optional ``on_output(fd, chunk)`` hook (``fd`` 1 for
stdout, 2 for stderr), and the last :data:`STDERR_TAIL` bytes of stderr are kept.
A non-zero exit raises :class:`~solver.SolveError` naming the command, the exit
code (or signal) and the stderr tail. When the process exits, whatever is left in
its process group is killed (so a background child cannot keep the op alive).
On cancellation the process group gets ``SIGTERM``, then ``SIGKILL`` after
:data:`KILL_GRACE` seconds, and the process is awaited, all shielded.

On every path (success, failure, cancellation) the per-exec directory is removed,
every mutable snapshot not committed is discarded, and output handles made before a
failure are released. The per-exec directory lives under the store's ``tmp/``
(``tmp/exec-<random>/``), which the store empties when it is next opened, so even
a crash leaves nothing behind for long.

Cache map: :func:`cache_digest` (the payload without ``limits``, the sandbox mode,
and in the sandbox the system root and network, defaults filled in) and one
:class:`~solver.CacheMapDep` per input: a plain one, or, for an input whose
every mount has a ``selector`` (a sub-path of the input, a directory or a file,
mounted alone), one keyed on the content of the selected paths (a ``selector``
digest and a ``compute_digest``), so the step depends on those files only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap, CacheMapDep, ComputeDigest, Op
from .._progress import log_output
from .._result import Result
from ..definition import DefinitionError, JSONValue, OpContext, OpKindRegistry, canonical_json
from ._failedsteps import FailedStep, keep_failed_step
from ._fileops import selection_digest
from ._opmemo import OpMemo
from ._paths import check_regular_kind, resolve_in
from ._sandbox import (
    BASE_ENV,
    DEFAULT_ROOTFS,
    INSTALL_HINT,
    SANDBOX_ROOT,
    SECRETS_DIR,
    Network,
    PidsCgroup,
    SandboxMode,
    SandboxSpec,
    bwrap_argv,
    find_bwrap,
    limit_prefix,
    resolve_rootfs,
)
from ._slots import StepSlots
from ._snapshots import MutableSnapshot, SnapshotRef, SnapshotStore, SnapshotView

_log = logging.getLogger("solver")

__all__ = [
    "KILL_GRACE",
    "STDERR_TAIL",
    "ExecOp",
    "ExecPayloadError",
    "OutputHook",
    "SecretSource",
    "cache_digest",
    "register_exec",
]

OutputHook = Callable[[int, bytes], None]
"""``on_output(fd, chunk)``: called on the event loop for each chunk the process
writes, ``fd`` 1 for stdout and 2 for stderr. It should not block; an exception
from it fails the op (and kills the process)."""

STDERR_TAIL: Final = 4096
"""How many trailing bytes of stderr a failure message quotes."""

KILL_GRACE: Final = 2.0
"""Seconds between ``SIGTERM`` and ``SIGKILL`` when an exec is cancelled."""

SecretSource = bytes | str | os.PathLike[str]
"""A secret: its contents (``bytes``), or the path of a host file holding them."""


@dataclass(frozen=True, slots=True)
class _Tools:
    bwrap: str | None  # None: sandbox="none"
    prlimit: str | None  # None: no rlimit to set


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0

_KIND: Final = "exec"
_KEYS: Final = frozenset(
    {"args", "env", "cwd", "mounts", "rootfs", "network", "limits", "secrets"}
)
_LIMIT_KEYS: Final = frozenset({"timeout", "memory", "processes", "cpus"})
_RESERVED_ENV: Final = frozenset({"SOLVER_ROOT", "SOLVER_SECRETS"})
# System-root paths that would hide what the sandbox itself puts there.
# (A path below /tmp is fine: it is bound on top of the private /tmp.)
_SANDBOX_PATHS: Final = ("/proc", "/dev", SANDBOX_ROOT, SECRETS_DIR)
_MOUNT_KEYS: Final = frozenset({"input", "dest", "readonly", "output", "selector"})
_WRITE_BITS: Final = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)


# -- payload ----------------------------------------------------------------------------


class ExecPayloadError(ValueError):
    """An ``exec`` payload is malformed; the message says which field and why.
    Raised by the kind's ``validate`` hook, which reports it as a
    :class:`~solver.DefinitionError` ("invalid payload: ...")."""


@dataclass(frozen=True, slots=True)
class _Mount:
    input: int | None
    dest: str  # as given, for messages
    parts: tuple[str, ...]  # normalised components; () is R itself
    readonly: bool
    output: int | None
    selector: str | None = None  # a sub-path of the input, normalised ("a/b")


@dataclass(frozen=True, slots=True)
class _Spec:
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: tuple[str, ...]
    mounts: tuple[_Mount, ...]
    outputs: int
    rootfs: tuple[str, ...] = DEFAULT_ROOTFS
    network: Network = "none"
    timeout: int | None = None
    memory: int | None = None
    processes: int | None = None
    secrets: tuple[str, ...] = ()


def _rel_parts(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise ExecPayloadError(
            f"{where} must be a string (a path relative to the exec root), got {_describe(value)}"
        )
    if "\0" in value:
        raise ExecPayloadError(f"{where} {value!r} contains a NUL byte")
    if value.startswith("/") or os.path.isabs(value):
        raise ExecPayloadError(
            f"{where} {value!r} is absolute; paths are relative to the exec root"
        )
    parts = tuple(p for p in value.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ExecPayloadError(
            f"{where} {value!r} contains '..'; paths must stay inside the exec root"
        )
    return parts


def _index(value: object, where: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ExecPayloadError(f"{where} must be null or an integer >= 0, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


# The parsed form of recent payloads, by identity (the entry keeps its payload
# alive, so an id is not reused while it is here). A definition's payloads are
# immutable, and one solve parses each exec payload three times (its validation,
# its output count, its op); parsing a step's payload takes ~0.1 ms.
_PARSED: Final[dict[int, tuple[Mapping[str, JSONValue], _Spec]]] = {}
_PARSED_MAX: Final = 4096
# And by content: the canonical encoding of an immutable payload -> its parsed
# form. A definition read again from JSON (every build of a caller that keeps
# JSON, every ``solver build``) has new payload objects, equal to the old ones:
# encoding one (~5 us for a compile step's, C encoder) is a tenth of parsing it
# (~50 us), measured on brotli's definition (docs/worker.md). The encoding is
# canonical, so equal texts are equal JSON values, and the parse depends on
# nothing else. A payload that fails to parse is never kept: its error is
# raised again each time.
_PARSED_BY_TEXT: Final[dict[bytes, _Spec]] = {}


def _parse(payload: Mapping[str, JSONValue]) -> _Spec:
    """The checked form of a payload; :class:`ExecPayloadError` saying what is wrong."""
    known = _PARSED.get(id(payload))
    if known is not None and known[0] is payload:
        return known[1]
    # Only an immutable payload (a definition's: it deep-copies to itself) is
    # remembered; a caller's own dict may change after this call.
    frozen = copy.deepcopy(payload) is payload
    text = canonical_json(payload) if frozen else b""
    spec = _PARSED_BY_TEXT.get(text) if frozen else None
    if spec is None:
        spec = _parse_payload(payload)
        if frozen:
            if len(_PARSED_BY_TEXT) >= _PARSED_MAX:
                _PARSED_BY_TEXT.clear()
            _PARSED_BY_TEXT[text] = spec
    if frozen:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[id(payload)] = (payload, spec)
    return spec


def _parse_payload(payload: Mapping[str, JSONValue]) -> _Spec:
    if not isinstance(payload, Mapping):
        raise ExecPayloadError(f"the payload must be an object, got {_describe(payload)}")
    unknown = sorted(set(payload) - _KEYS)
    if unknown:
        raise ExecPayloadError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_KEYS))}"
        )
    if "args" not in payload:
        raise ExecPayloadError("'args' is missing: give the command as a non-empty list of strings")
    args = payload["args"]
    if isinstance(args, str | bytes) or not isinstance(args, Sequence) or not args:
        raise ExecPayloadError(f"'args' must be a non-empty list of strings, got {_describe(args)}")
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            raise ExecPayloadError(f"args[{i}] must be a string, got {_describe(arg)}")
        if "\0" in arg:
            raise ExecPayloadError(f"args[{i}] contains a NUL byte")
    if not args[0]:
        raise ExecPayloadError("args[0] (the program) is empty")

    env_value = payload.get("env", {})
    if not isinstance(env_value, Mapping):
        raise ExecPayloadError(f"'env' must be an object of strings, got {_describe(env_value)}")
    env: dict[str, str] = {}
    for name, value in env_value.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ExecPayloadError(f"env name {name!r} is invalid (non-empty, no '=' or NUL)")
        if name in _RESERVED_ENV:
            raise ExecPayloadError(
                f"env may not set {name}: the exec op sets it (SOLVER_ROOT: the exec "
                "root; SOLVER_SECRETS: the directory of the secrets)"
            )
        if not isinstance(value, str) or "\0" in value:
            raise ExecPayloadError(
                f"env[{name!r}] must be a string without NUL, got {_describe(value)}"
            )
        env[name] = value

    cwd = _rel_parts(payload.get("cwd", ""), "'cwd'")

    mounts_value = payload.get("mounts", [])
    if isinstance(mounts_value, str | bytes) or not isinstance(mounts_value, Sequence):
        raise ExecPayloadError(f"'mounts' must be a list of objects, got {_describe(mounts_value)}")
    mounts: list[_Mount] = []
    seen: dict[tuple[str, ...], int] = {}
    for i, m in enumerate(mounts_value):
        where = f"mounts[{i}]"
        if not isinstance(m, Mapping):
            raise ExecPayloadError(f"{where} must be an object, got {_describe(m)}")
        unknown = sorted(set(m) - _MOUNT_KEYS)
        if unknown:
            raise ExecPayloadError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(_MOUNT_KEYS))}"
            )
        if "dest" not in m:
            raise ExecPayloadError(f"{where}: 'dest' is missing")
        parts = _rel_parts(m["dest"], f"{where}.dest")
        if parts in seen:
            raise ExecPayloadError(
                f"{where}.dest {m['dest']!r} is the same destination as "
                f"mounts[{seen[parts]}].dest; two mounts cannot share one"
            )
        seen[parts] = i
        readonly = m.get("readonly", False)
        if not isinstance(readonly, bool):
            raise ExecPayloadError(
                f"{where}.readonly must be true or false, got {_describe(readonly)}"
            )
        inp = _index(m.get("input"), f"{where}.input")
        out = _index(m.get("output"), f"{where}.output")
        if readonly and out is not None:
            raise ExecPayloadError(
                f"{where} is read-only, so it cannot be an output "
                "(make it writable or drop 'output')"
            )
        selector: str | None = None
        if "selector" in m:
            selector = "/".join(_rel_parts(m["selector"], f"{where}.selector"))
            if not readonly or inp is None:
                raise ExecPayloadError(
                    f"{where}.selector: only a read-only mount of an input can select a "
                    "sub-path of it (make the mount read-only, with an input)"
                )
            if not selector:
                raise ExecPayloadError(
                    f"{where}.selector {m['selector']!r} names the input's root; "
                    "leave 'selector' out to mount the whole input"
                )
        mounts.append(_Mount(inp, str(m["dest"]), parts, readonly, out, selector))

    for i, outer in enumerate(mounts):
        if not outer.readonly:
            continue
        for j, inner in enumerate(mounts):
            depth = len(outer.parts)
            if len(inner.parts) > depth and inner.parts[:depth] == outer.parts:
                raise ExecPayloadError(
                    f"mounts[{j}].dest {inner.dest!r} is inside the read-only "
                    f"mounts[{i}] ({outer.dest!r}); a read-only mount cannot "
                    "contain other mounts"
                )

    outs = sorted(m.output for m in mounts if m.output is not None)
    if outs != list(range(len(outs))):
        dup = sorted({o for o in outs if outs.count(o) > 1})
        if dup:
            raise ExecPayloadError(f"output index(es) {dup} are used by more than one mount")
        raise ExecPayloadError(
            f"output indexes must be 0..{len(outs) - 1} without gaps, got {outs}"
        )
    timeout, memory, processes = _parse_limits(payload.get("limits", {}))
    return _Spec(
        tuple(str(a) for a in args),
        env,
        cwd,
        tuple(mounts),
        len(outs),
        rootfs=_parse_rootfs(payload["rootfs"]) if "rootfs" in payload else DEFAULT_ROOTFS,
        network=_parse_network(payload.get("network", "none")),
        timeout=timeout,
        memory=memory,
        processes=processes,
        secrets=_parse_secrets(payload.get("secrets", [])),
    )


def _parse_rootfs(value: object) -> tuple[str, ...]:
    """The system root: absolute, normalised host paths, each once."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ExecPayloadError(
            f"'rootfs' must be a list of absolute host paths, got {_describe(value)}"
        )
    paths: list[str] = []
    for i, path in enumerate(value):
        where = f"rootfs[{i}]"
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ExecPayloadError(
                f"{where} must be an absolute host path (a string starting with '/'), "
                f"got {_describe(path)}"
            )
        parts = path.split("/")[1:]
        if any(p in ("", ".", "..") for p in parts) or path == "/":
            raise ExecPayloadError(
                f"{where} {path!r} is not a normalised path below '/' (no '.', '..', "
                "empty components, trailing '/', and not '/' itself)"
            )
        if path == "/tmp":
            raise ExecPayloadError(
                f"{where} '/tmp' would replace the step's private /tmp; name paths below it"
            )
        for taken in _SANDBOX_PATHS:
            if path == taken or path.startswith(taken + "/") or taken.startswith(path + "/"):
                raise ExecPayloadError(
                    f"{where} {path!r} overlaps {taken!r}, which the sandbox provides itself"
                )
        if path in paths:
            raise ExecPayloadError(f"{where} {path!r} is listed twice")
        paths.append(path)
    return tuple(paths)


def _parse_network(value: object) -> Network:
    if value == "none":
        return "none"
    if value == "host":
        return "host"
    raise ExecPayloadError(f"'network' must be \"none\" or \"host\", got {_describe(value)}")


def _parse_limits(value: object) -> tuple[int | None, int | None, int | None]:
    """``timeout`` (seconds), ``memory`` (bytes), ``processes``: integers > 0.
    ``cpus`` (an integer > 0) is a scheduling hint only: a remote cluster asks for
    that many ``CPU`` (``docs/remote.md``); it limits nothing locally."""
    if not isinstance(value, Mapping):
        raise ExecPayloadError(
            "'limits' must be an object with 'timeout' (seconds), 'memory' (bytes) "
            f"and/or 'processes', got {_describe(value)}"
        )
    unknown = sorted(set(value) - _LIMIT_KEYS)
    if unknown:
        raise ExecPayloadError(
            f"limits: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_LIMIT_KEYS))}"
        )
    # Integers only: payloads are canonical JSON, which has no floats.
    ints: list[int | None] = []
    for name, unit in (
        ("timeout", " (seconds)"), ("memory", " (bytes)"), ("processes", ""), ("cpus", "")
    ):
        n = value.get(name)
        if n is not None and (type(n) is not int or n <= 0):
            raise ExecPayloadError(
                f"limits.{name} must be an integer > 0{unit}, got {_describe(n)}"
            )
        ints.append(n)
    return ints[0], ints[1], ints[2]  # ints[3], cpus, is a hint for remote clusters


def _parse_secrets(value: object) -> tuple[str, ...]:
    """Secret ids: file names in the secrets directory, each once."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ExecPayloadError(f"'secrets' must be a list of secret ids, got {_describe(value)}")
    ids: list[str] = []
    for i, name in enumerate(value):
        if (
            not isinstance(name, str)
            or not name
            or name in (".", "..")
            or any(c not in _SECRET_ID_CHARS for c in name)
        ):
            raise ExecPayloadError(
                f"secrets[{i}] must be a secret id (letters, digits, '.', '_', '-'), "
                f"got {_describe(name)}"
            )
        if name in ids:
            raise ExecPayloadError(f"secrets[{i}] {name!r} is listed twice")
        ids.append(name)
    return tuple(ids)


_SECRET_ID_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
)


def _validate(payload: Mapping[str, JSONValue]) -> None:
    _parse(payload)


def _count_outputs(payload: Mapping[str, JSONValue]) -> int:
    return _parse(payload).outputs


# -- the op -----------------------------------------------------------------------------


class ExecOp:
    """The op of one ``exec`` vertex (see the module docstring). Made by the factory
    that :func:`register_exec` registers; ``exec`` runs the process once."""

    __slots__ = (
        "_digest",
        "_inputs",
        "_keep_failed",
        "_name",
        "_on_output",
        "_sandbox",
        "_secrets",
        "_slots",
        "_spec",
        "_store",
        "_vertex",
    )

    def __init__(
        self,
        spec: _Spec,
        payload: Mapping[str, JSONValue],
        inputs: int,
        store: SnapshotStore,
        on_output: OutputHook | None,
        name: str = "",
        *,
        sandbox: SandboxMode = "bwrap",
        secrets: Mapping[str, SecretSource] | None = None,
        keep_failed: int = 0,
        vertex: str = "",
        slots: StepSlots | None = None,
        cache_key: str | None = None,
    ) -> None:
        self._keep_failed = keep_failed
        self._vertex = vertex
        self._spec = spec
        self._slots = slots
        self._inputs = inputs
        self._store = store
        self._on_output = on_output
        self._name = name
        self._sandbox: SandboxMode = sandbox
        self._secrets: Mapping[str, SecretSource] = secrets or {}
        # ``cache_key``: :func:`cache_digest` of this payload, spec and sandbox,
        # already computed (the factory keeps it per op digest).
        self._digest = cache_key if cache_key is not None else cache_digest(payload, spec, sandbox)

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        """The payload's digest and one dependency per input: keyed on the content
        of the sub-paths its mounts select when every mount of it has a selector,
        on the whole input otherwise."""
        deps: list[CacheMapDep] = []
        for i in range(self._inputs):
            uses = [m for m in self._spec.mounts if m.input == i]
            selected = sorted({m.selector for m in uses if m.selector is not None})
            if not uses or any(m.selector is None for m in uses):
                deps.append(CacheMapDep())
                continue
            deps.append(CacheMapDep(
                selector=digest_of(canonical_json(["exec-mount-selectors", list(selected)])),
                compute_digest=self._selection_key(i, selected),
            ))
        return CacheMap(self._digest, tuple(deps)), True

    def _selection_key(self, index: int, paths: list[str]) -> ComputeDigest:
        async def compute(result: Result) -> str:
            view = result.sys
            if not isinstance(view, SnapshotView):
                raise SolveError(
                    f"{self._label()}: input {index} is not a snapshot of the built-in "
                    f"worker (its sys is {type(view).__name__})"
                )
            return await anyio.to_thread.run_sync(
                selection_digest, os.fspath(view.path), paths, self._store.digest_table(view)
            )

        return compute

    def acquire(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One of the worker's step slots (``Worker(max_parallelism=N)``), which the
        engine holds around :meth:`exec`; no bound without slots."""
        if self._slots is None:
            return contextlib.nullcontext()
        return self._slots.slot()

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        """Materialise the mounts, run the process, commit the output mounts."""
        spec = self._spec
        store = self._store
        if store.closed:
            raise SolveError("cannot run exec: the snapshot store is closed")
        tools = self._tools()  # before any work: a missing bwrap fails at once
        for name in spec.secrets:
            if name not in self._secrets:
                raise SolveError(
                    f"{self._label()}: secret {name!r} is not provided; give it to the "
                    "worker: Worker(secrets={" + repr(name) + ": b'...' or a file path})"
                )
        work = store.root / "tmp" / f"exec-{secrets.token_hex(8)}"
        root = work / "root"
        mutables: dict[int, MutableSnapshot] = {}
        refs: list[SnapshotRef | None] = [None] * spec.outputs
        order = sorted(range(len(spec.mounts)), key=lambda i: len(spec.mounts[i].parts))
        try:
            try:
                await anyio.to_thread.run_sync(os.mkdir, work)
            except OSError as exc:
                raise SolveError(f"cannot create the exec directory {work}: {exc}") from exc
            bound: dict[tuple[str, ...], str] = {}
            stashes = await self._materialise(inputs, work, root, order, mutables, bound)
            cwd = await anyio.to_thread.run_sync(_ensure_dir, root, spec.cwd, "cwd")
            code, tail, pids_hit = await self._run(work, root, cwd, tools, bound)
            if code != 0:
                message = self._failure(code, tail, pids_hit)
                if self._keep_failed:
                    await self._keep_failed_step(root, message, bound)
                raise SolveError(message)
            await anyio.to_thread.run_sync(
                _unmount, spec.mounts, order, root, work, mutables, stashes
            )
            for i in order:
                out = spec.mounts[i].output
                if out is not None:
                    refs[out] = await mutables[i].commit()
            done = [ref for ref in refs if ref is not None]
            return done
        except BaseException:
            with anyio.CancelScope(shield=True):
                for ref in refs:
                    if ref is not None and not ref.released:
                        await ref.release()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                for mutable in mutables.values():
                    with contextlib.suppress(SolveError):
                        await mutable.discard()  # a no-op for committed ones
                await anyio.to_thread.run_sync(_force_remove, work)

    # -- steps ----------------------------------------------------------------------------

    async def _materialise(
        self,
        inputs: Sequence[Result],
        work: Path,
        root: Path,
        order: list[int],
        mutables: dict[int, MutableSnapshot],
        bound: dict[tuple[str, ...], str],
    ) -> dict[int, Path]:
        """Place every mount under ``root``, shallowest first. Returns where the
        content hidden by each nested mount was put aside; fills ``bound`` with the
        snapshot directories the sandbox binds read-only (no copy)."""
        spec = self._spec
        stashes: dict[int, Path] = {}
        if not any(not m.parts for m in spec.mounts):
            await anyio.to_thread.run_sync(os.mkdir, root)
        for i in order:
            m = spec.mounts[i]
            base = inputs[m.input] if m.input is not None else None
            if m.readonly:
                source: Path | None = None
                if base is not None:
                    view = base.sys
                    if not isinstance(view, SnapshotView):
                        raise SolveError(
                            f"exec mount {m.dest!r}: input {m.input} is not a snapshot of the "
                            f"built-in worker (its sys is {type(view).__name__})"
                        )
                    source = view.path
                if source is not None and m.selector is not None:
                    source = await anyio.to_thread.run_sync(_selected, source, m)
                if source is not None and self._sandbox == "bwrap":
                    # Bound read-only by bwrap as it is: an empty mount point here.
                    stash = await anyio.to_thread.run_sync(
                        _place_mount_point, root, m, work / f"stash-{i}", source
                    )
                    bound[m.parts] = os.fspath(source)
                else:
                    stash = await anyio.to_thread.run_sync(
                        _place_copy, source, root, m, work / f"stash-{i}"
                    )
            else:
                description = {"kind": _KIND, "args": list(spec.args), "dest": m.dest}
                mutable = await self._store.new_mutable(description, base=base)
                mutables[i] = mutable
                stash = await anyio.to_thread.run_sync(
                    _place_move, mutable.path, root, m, work / f"stash-{i}"
                )
            if stash is not None:
                stashes[i] = stash
        return stashes

    async def _keep_failed_step(
        self, root: Path, error: str, bound: dict[tuple[str, ...], str]
    ) -> None:
        """Keep the tree of this failed step for ``solver debug``
        (:mod:`solver.worker._failedsteps`), with the read-only mounts the sandbox
        bound (``bound``) copied in; a failure to keep it is logged."""
        spec = self._spec
        step = FailedStep(
            self._vertex or self._digest, self._name, spec.args, spec.env, spec.cwd,
            tuple(m.parts for m in sorted(spec.mounts, key=lambda m: len(m.parts))
                  if m.readonly),
            spec.rootfs, spec.network, self._sandbox, spec.secrets, error, time.time(),
            root,
        )
        try:
            await anyio.to_thread.run_sync(
                keep_failed_step, self._store.root, root, step, self._keep_failed, bound
            )
        except OSError:
            _log.exception("could not keep the failed step %s for debugging", self._label())

    def _tools(self) -> _Tools:
        """The host programs this step needs, or a :class:`SolveError` saying how
        to get them."""
        spec = self._spec
        bwrap = None
        if self._sandbox == "bwrap":
            bwrap = find_bwrap()
            if bwrap is None:
                raise SolveError(
                    f"{self._label()}: exec steps run in a sandbox, which needs "
                    f"bubblewrap ('bwrap'), but it is not installed: {INSTALL_HINT}"
                )
        prlimit = None
        if spec.memory is not None or spec.processes is not None:
            prlimit = shutil.which("prlimit") or shutil.which("prlimit", path="/usr/bin:/bin")
            if prlimit is None:
                raise SolveError(
                    f"{self._label()}: the step has limits, which need 'prlimit' "
                    "(util-linux), but it is not installed"
                )
        return _Tools(bwrap, prlimit)

    async def _command_line(
        self, work: Path, root: Path, cwd: Path, tools: _Tools, bound: dict[tuple[str, ...], str]
    ) -> tuple[list[str], Path, dict[str, str]]:
        """The command line to start, its working directory and environment."""
        spec = self._spec
        env = {**BASE_ENV, **spec.env}
        secrets = await anyio.to_thread.run_sync(self._write_secrets, work)
        if tools.bwrap is None:
            # sandbox="none": a plain host process, with the same environment rules.
            env["SOLVER_ROOT"] = os.fspath(root)
            if "HOME" not in spec.env:
                home = work / "home"
                await anyio.to_thread.run_sync(os.mkdir, home)
                env["HOME"] = os.fspath(home)
            if secrets:
                env["SOLVER_SECRETS"] = os.fspath(work / "secrets")
            return list(spec.args), cwd, env
        env["SOLVER_ROOT"] = SANDBOX_ROOT
        if secrets:
            env["SOLVER_SECRETS"] = SECRETS_DIR
        rootfs = await anyio.to_thread.run_sync(resolve_rootfs, spec.rootfs)
        readonly = tuple(
            m.parts for m in sorted(spec.mounts, key=lambda m: len(m.parts)) if m.readonly
        )
        sandbox = SandboxSpec(
            args=spec.args,
            root=os.fspath(root),
            cwd=spec.cwd,
            env=env,
            rootfs=rootfs,
            readonly=readonly,
            network=spec.network,
            secrets=secrets,
            as_root=_is_root(),
            bound=bound,
        )
        # bwrap itself gets an almost empty environment; the step's is set by
        # --clearenv/--setenv.
        return bwrap_argv(tools.bwrap, sandbox), work, {"PATH": BASE_ENV["PATH"]}

    def _write_secrets(self, work: Path) -> dict[str, str]:
        """The host file of each secret the step names. A secret given as bytes is
        written, readable by its owner only, into the per-exec directory (removed
        with it); without a sandbox a file secret is copied there too, so that all
        of them are in one directory."""
        spec = self._spec
        if not spec.secrets:
            return {}
        folder = work / "secrets"
        os.mkdir(folder, 0o700)
        files: dict[str, str] = {}
        for name in spec.secrets:
            source = self._secrets[name]
            path = folder / name
            if isinstance(source, bytes):
                data = source
            elif self._sandbox == "bwrap":
                if not os.path.isfile(source):
                    raise SolveError(
                        f"{self._label()}: secret {name!r}: {os.fspath(source)!r} is not a file"
                    )
                files[name] = os.fspath(source)
                continue
            else:
                try:
                    data = Path(source).read_bytes()
                except OSError as exc:
                    raise SolveError(f"{self._label()}: secret {name!r}: {exc}") from exc
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            files[name] = os.fspath(path)
        return files

    async def _run(
        self, work: Path, root: Path, cwd: Path, tools: _Tools, bound: dict[tuple[str, ...], str]
    ) -> tuple[int, bytes, bool]:
        """Run the process to its end; its exit code, its stderr tail, and whether
        a fork failed on the process limit."""
        spec = self._spec
        argv, start_dir, env = await self._command_line(work, root, cwd, tools, bound)
        if tools.bwrap is None:
            # An explicit choice; it still shows, in the vertex's progress.
            log_output(
                b"[sandbox=none] this step runs on the host, without a sandbox\n", 2
            )
        cgroup: PidsCgroup | None = None
        rlimit_procs = spec.processes
        if spec.processes is not None and _is_root():
            # The kernel does not apply RLIMIT_NPROC to root: use a pids cgroup.
            cgroup = await anyio.to_thread.run_sync(
                PidsCgroup.create, f"solver-{work.name}", spec.processes
            )
            if cgroup is None:
                raise SolveError(
                    f"{self._label()}: cannot enforce the process limit "
                    f"({spec.processes}): the worker runs as root, for which the kernel "
                    "ignores RLIMIT_NPROC, and no writable pids cgroup was found "
                    "under /sys/fs/cgroup"
                )
            rlimit_procs = None
        prefix: list[str] = []
        if cgroup is not None:
            prefix += cgroup.join_prefix()
        if tools.prlimit is not None:
            prefix += limit_prefix(tools.prlimit, memory=spec.memory, processes=rlimit_procs)
        try:
            return await self._spawn([*prefix, *argv], start_dir, env, cgroup)
        finally:
            if cgroup is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(cgroup.remove)

    async def _spawn(
        self, argv: list[str], cwd: Path, env: dict[str, str], cgroup: PidsCgroup | None
    ) -> tuple[int, bytes, bool]:
        spec = self._spec
        posix = sys.platform != "win32"
        try:
            # Shielded: a cancellation that landed while the process was being
            # set up (asyncio awaits its pipes after the fork) would leave it to
            # the event loop, which kills the process only, not its group: a
            # background child of the step outlived the cancelled build (seen
            # under load). Once opened, the kill below takes the whole group.
            with anyio.CancelScope(shield=True):
                process = await anyio.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=cwd,
                    env=env,
                    start_new_session=posix,
                )
        except OSError as exc:
            raise SolveError(f"cannot start {self._command()}: {exc}") from exc
        tail = bytearray()
        timed_out = False
        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None
                assert process.stderr is not None
                tg.start_soon(self._pump, process.stdout, 1, None)
                tg.start_soon(self._pump, process.stderr, 2, tail)
                with anyio.move_on_after(spec.timeout) as limit:
                    code = await process.wait()
                if limit.cancelled_caught:
                    timed_out = True
                    # Killed outright: a step that overran gets no grace period.
                    # In the sandbox, bwrap's death takes its PID namespace with it.
                    _signal_group(process, signal.SIGKILL if posix else signal.SIGTERM)
                    code = await process.wait()
                pids_hit = cgroup is not None and cgroup.hit_limit()
                # The process is gone; anything left in its group (or cgroup) would
                # hold the pipes open (and the op) forever.
                _signal_group(process, signal.SIGKILL if posix else signal.SIGTERM)
                if cgroup is not None:
                    await anyio.to_thread.run_sync(cgroup.remove)
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    await _kill(process)
                await process.aclose()
        if timed_out:
            raise SolveError(
                f"{self._label()}: process {self._command()} exceeded its time limit of "
                f"{spec.timeout}s and was killed"
            )
        return code, bytes(tail), pids_hit

    async def _pump(
        self, stream: anyio.abc.ByteReceiveStream, fd: int, tail: bytearray | None
    ) -> None:
        hook = self._on_output
        async for chunk in stream:
            if tail is not None:
                tail += chunk
                if len(tail) > STDERR_TAIL:
                    del tail[:-STDERR_TAIL]
            log_output(chunk, fd)
            if hook is not None:
                hook(fd, chunk)

    def _command(self) -> str:
        return shlex.join(self._spec.args)

    def _label(self) -> str:
        label = f" {self._name!r}" if self._name and self._name != _KIND else ""
        return f"exec{label}"

    def _failure(self, code: int, tail: bytes, pids_hit: bool = False) -> str:
        spec = self._spec
        text = tail.decode("utf-8", "replace").rstrip()
        # bwrap (or prlimit) reports a program it cannot start on stderr, exit 1.
        for marker in ("bwrap: execvp ", "prlimit: failed to execute "):
            if code == 1 and text.startswith(marker) and "\n" not in text:
                where = " in the sandbox" if self._sandbox == "bwrap" else ""
                hint = (
                    " (only the system root and the mounts are visible; a tool "
                    "elsewhere needs its directories in the op's 'rootfs')"
                    if self._sandbox == "bwrap"
                    else ""
                )
                return (
                    f"{self._label()}: cannot start {self._command()}{where}: "
                    f"{text.rsplit(': ', 1)[-1]}{hint}"
                )
        if self._sandbox == "bwrap" and code == 1 and text.startswith("bwrap: "):
            # bwrap's own failure (no user namespaces, a mount refused), not the step's.
            return (
                f"{self._label()}: the sandbox for {self._command()} could not be set up: "
                f"{text}; if this host cannot run bubblewrap, run steps without a sandbox "
                'explicitly with Worker(sandbox="none")'
            )
        if code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            how += f" (exit code {code})"
        else:
            how = f"exited with exit code {code}"
        msg = f"{self._label()}: process {self._command()} {how}"
        if pids_hit:
            msg += f"; it hit its process limit of {spec.processes} (a fork failed)"
        elif spec.processes is not None:
            msg += f"; it ran with a process limit of {spec.processes}"
        if spec.memory is not None:
            msg += (
                f"; it ran with a memory limit of {spec.memory} bytes (address space), "
                "so a failed allocation may be the cause"
            )
        if text:
            return f"{msg}; stderr (last {STDERR_TAIL} bytes at most):\n{text}"
        return f"{msg}; it wrote nothing to stderr"

    def __repr__(self) -> str:
        return f"<ExecOp {self._command()} mounts={len(self._spec.mounts)}>"


def cache_digest(
    payload: Mapping[str, JSONValue], spec: _Spec, sandbox: SandboxMode
) -> str:
    """The cache key of an exec op: its payload without ``limits`` (a limit does not
    change what a successful step makes), the sandbox mode, and, in the sandbox,
    the system root and the network it gets (defaults filled in, so changing
    :data:`DEFAULT_ROOTFS` changes the keys of ops that rely on it). Secrets are
    named by id only; their contents are never part of it."""
    keyed: dict[str, JSONValue] = {k: v for k, v in payload.items() if k != "limits"}
    key: dict[str, JSONValue] = {"kind": _KIND, "payload": keyed, "sandbox": sandbox}
    if sandbox == "bwrap":
        key["rootfs"] = list(spec.rootfs)
        key["network"] = spec.network
    return digest_of(canonical_json(key))


def register_exec(
    registry: OpKindRegistry,
    store: SnapshotStore,
    *,
    on_output: OutputHook | None = None,
    replace: bool = False,
    sandbox: SandboxMode = "bwrap",
    secrets: Mapping[str, SecretSource] | None = None,
    keep_failed: int = 0,
    slots: StepSlots | None = None,
) -> None:
    """Register the op kind ``exec`` in ``registry``, running over ``store``.

    ``store`` must be open while ops run; outputs are snapshots of it, and inputs of
    mounts must be snapshots of it too. ``on_output(fd, chunk)``, when given,
    receives every chunk the processes write (``fd`` 1: stdout, 2: stderr), for all
    ``exec`` ops of this registry, on the event loop; it is how progress logs will be
    wired in (there is no per-vertex log API yet). ``replace`` is passed to
    :meth:`OpKindRegistry.register`. Payloads are checked by the kind's ``validate``
    hook, and ``outputs`` gives the number of output mounts.

    ``sandbox`` is ``"bwrap"`` (every step in a bubblewrap sandbox; see
    :mod:`solver.worker._sandbox`) or ``"none"`` (host processes: an explicit
    choice, logged in each step's progress and part of its cache key).
    ``secrets`` maps the secret ids ops may name to their contents (``bytes``) or
    to a host file that holds them (a path). ``keep_failed``: how many failed
    steps to keep for debugging (:mod:`solver.worker._failedsteps`; 0: none).
    ``slots``, when given, bounds how many of these ops run at once (each holds
    one slot around its ``exec``).
    """
    if sandbox not in ("bwrap", "none"):
        raise ValueError(f"sandbox must be 'bwrap' or 'none', got {sandbox!r}")
    secret_map = dict(secrets or {})
    for name, source in secret_map.items():
        if not isinstance(source, bytes | str | os.PathLike):
            raise TypeError(f"secret {name!r} must be bytes or a file path, got {source!r}")

    def derive(ctx: OpContext) -> tuple[_Spec, str]:
        spec = _parse(ctx.payload)
        for i, m in enumerate(spec.mounts):
            if m.input is not None and m.input >= ctx.inputs:
                raise DefinitionError(
                    f"exec op {ctx.vertex.digest}: mounts[{i}].input is {m.input}, but the op "
                    f"has {ctx.inputs} input(s)",
                    op=ctx.vertex.digest,
                    kind=ctx.kind,
                )
        return spec, cache_digest(ctx.payload, spec, sandbox)

    # The parsed payload and the cache digest, once per op digest (_opmemo).
    memo: OpMemo[tuple[_Spec, str]] = OpMemo(derive)

    def factory(ctx: OpContext) -> Op:
        spec, digest = memo.get(ctx)
        return ExecOp(
            spec,
            ctx.payload,
            ctx.inputs,
            store,
            on_output,
            ctx.vertex.name,
            sandbox=sandbox,
            secrets=secret_map,
            keep_failed=keep_failed,
            vertex=ctx.vertex.digest,
            slots=slots,
            cache_key=digest,
        )

    registry.register(_KIND, factory, outputs=_count_outputs, validate=_validate, replace=replace)


# -- file system work (in worker threads) -----------------------------------------------


def _ensure_dir(root: Path, parts: tuple[str, ...], what: str) -> Path:
    """``root/parts`` as a directory, creating missing ones, never following a
    symlink (so nothing is created outside ``root``)."""
    here = root
    for i, part in enumerate(parts):
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            try:
                os.mkdir(here)
            except OSError as exc:
                raise SolveError(f"cannot create {what} {'/'.join(parts)!r}: {exc}") from exc
            continue
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise SolveError(
                f"cannot use {what} {'/'.join(parts)!r}: {'/'.join(parts[: i + 1])!r} is {kind}"
            )
    return here


def _prepare_dest(root: Path, m: _Mount, stash: Path) -> tuple[Path, Path | None]:
    """Make the parents of a mount's destination, and move aside what the enclosing
    mount has there. Returns the destination and the stash (or ``None``)."""
    if not m.parts:
        return root, None
    parent = _ensure_dir(root, m.parts[:-1], f"the parent of mount {m.dest!r}")
    dest = parent / m.parts[-1]
    if os.path.lexists(dest):
        try:
            if stat.S_ISDIR(os.lstat(dest).st_mode):
                _add_mode(dest, stat.S_IWUSR)  # renaming a directory away needs it
            os.rename(dest, stash)
        except OSError as exc:
            raise SolveError(f"cannot mount at {m.dest!r}: {exc}") from exc
        return dest, stash
    return dest, None


def _selected(top: Path, m: _Mount) -> Path:
    """The real path of a mount's selector inside the input snapshot at ``top``
    (symlinks followed only inside it): a directory or a regular file."""
    assert m.selector is not None
    where = f"mount {m.dest!r}: selector {m.selector!r}"
    try:
        real = resolve_in(os.fspath(top), m.selector, follow_final=True, what=where)
        st = os.lstat(real)
    except FileNotFoundError:
        raise SolveError(f"{where} is not in input {m.input}") from None
    except OSError as exc:
        raise SolveError(f"{where}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        check_regular_kind(st.st_mode, m.selector, where)
    return Path(real)


def _place_copy(source: Path | None, root: Path, m: _Mount, stash: Path) -> Path | None:
    """A read-only mount: a private copy of ``source`` (a directory or, for a
    selector, a file), or an empty directory."""
    dest, stashed = _prepare_dest(root, m, stash)
    try:
        if source is None:
            os.mkdir(dest)
        elif os.path.isdir(source):
            shutil.copytree(source, dest, symlinks=True)
        else:
            shutil.copy2(source, dest)
        _drop_write_bits(dest)
    except OSError as exc:
        raise SolveError(f"cannot make the read-only mount {m.dest!r}: {exc}") from exc
    return stashed


def _place_mount_point(root: Path, m: _Mount, stash: Path, source: Path) -> Path | None:
    """A read-only mount the sandbox binds from its snapshot: an empty directory
    (or, for a file, an empty file) where it goes, read-only as a copy would be."""
    dest, stashed = _prepare_dest(root, m, stash)
    try:
        if os.path.isdir(source):
            os.mkdir(dest)
        else:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o444))
        _drop_write_bits(dest)
    except OSError as exc:
        raise SolveError(f"cannot make the read-only mount {m.dest!r}: {exc}") from exc
    return stashed


def _place_move(source: Path, root: Path, m: _Mount, stash: Path) -> Path | None:
    """A writable mount: move the mutable's working directory to its destination."""
    dest, stashed = _prepare_dest(root, m, stash)
    try:
        os.rename(source, dest)
    except OSError as exc:
        raise SolveError(f"cannot mount at {m.dest!r}: {exc}") from exc
    return stashed


def _unmount(
    mounts: tuple[_Mount, ...],
    order: list[int],
    root: Path,
    work: Path,
    mutables: dict[int, MutableSnapshot],
    stashes: dict[int, Path],
) -> None:
    """After a successful run, deepest first: move each output mount back to its
    mutable's working directory and every other mount out of the way, and put back
    what nested mounts hid.

    The process may have replaced a parent of a mount point with a symlink (to a
    host directory, say); a destination is therefore looked up without following
    any symlink, and one that is no longer reached through real directories counts
    as gone, like one the process removed. Otherwise the renames below would move a
    host directory into the exec directory (which is then deleted), or the hidden
    content out to the host."""
    for i in reversed(order):
        m = mounts[i]
        dest = root.joinpath(*m.parts)
        reachable = _real_parent(root, m.parts)
        st: os.stat_result | None = None
        if reachable:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(dest)
        if m.output is not None:
            if st is None or not stat.S_ISDIR(st.st_mode):
                what = "removed" if st is None else "replaced with something not a directory"
                if not reachable:
                    what = "replaced a parent directory of"
                raise SolveError(f"exec: the process {what} its output mount {m.dest or '.'!r}")
            try:
                _add_mode(dest, stat.S_IWUSR)
                os.rename(dest, mutables[i].path)
            except OSError as exc:
                raise SolveError(f"exec: cannot collect output mount {m.dest!r}: {exc}") from exc
        elif st is not None and m.parts:
            try:
                if stat.S_ISDIR(st.st_mode):
                    _add_mode(dest, stat.S_IWUSR)
                os.rename(dest, work / f"unmounted-{i}")
            except OSError as exc:
                raise SolveError(f"exec: cannot unmount {m.dest!r}: {exc}") from exc
        stash = stashes.get(i)
        if stash is not None:
            try:
                if not reachable:
                    raise NotADirectoryError(
                        f"a parent of {m.dest!r} is no longer a directory (the process "
                        "removed it or replaced it, e.g. with a symlink)"
                    )
                os.rename(stash, dest)
            except OSError as exc:
                raise SolveError(
                    f"exec: cannot restore what mount {m.dest!r} was hiding: {exc}"
                ) from exc


def _real_parent(root: Path, parts: tuple[str, ...]) -> bool:
    """Whether every parent of ``root/parts`` below ``root`` is a real directory
    (not a symlink, not missing), so that the path stays inside ``root``."""
    here = root
    for part in parts[:-1]:
        here = here / part
        try:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                return False
        except FileNotFoundError:
            return False
    return True


def _add_mode(path: Path | str, bits: int) -> None:
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & bits != bits:
        os.chmod(path, mode | bits)


def _drop_write_bits(top: Path) -> None:
    """Drop the write bits of every directory and file below and at ``top``."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & _WRITE_BITS:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~_WRITE_BITS)
    st = os.lstat(top)
    os.chmod(top, stat.S_IMODE(st.st_mode) & ~_WRITE_BITS)


def _force_remove(path: Path) -> None:
    """Remove a tree whatever the permissions the process left in it; missing is fine."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if not os.path.islink(sub):
                    _add_mode(sub, stat.S_IRWXU)
    with contextlib.suppress(OSError):
        _add_mode(path, stat.S_IRWXU)

    def retry(func: Callable[..., object], p: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            _add_mode(os.path.dirname(p), stat.S_IRWXU)
        with contextlib.suppress(OSError):
            func(p)

    shutil.rmtree(path, onerror=lambda func, p, info: retry(func, p, info))


# -- processes --------------------------------------------------------------------------


def _signal_group(process: anyio.abc.Process, sig: signal.Signals) -> None:
    """Send ``sig`` to the process's group (POSIX; the process itself elsewhere)."""
    if sys.platform != "win32":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
    elif process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()


async def _kill(process: anyio.abc.Process) -> None:
    """Terminate, then kill after :data:`KILL_GRACE`, and await; then kill what
    is left of the process's tree. Call shielded.

    The tree is taken before any signal: a sandbox's processes are in a session
    of their own (``--new-session``), out of reach of the group signal, and rely
    on bubblewrap's ``--die-with-parent`` to go with it, which a kill racing
    bubblewrap's own start-up can beat (seen: the sandbox's PID 1 and a
    background child outlived a cancelled step). Killing the sandbox's PID 1
    takes its whole PID namespace with it."""
    tree = await anyio.to_thread.run_sync(_descendants, process.pid)
    try:
        _signal_group(process, signal.SIGTERM)
        with anyio.move_on_after(KILL_GRACE):
            await process.wait()
            return
        if sys.platform != "win32":
            _signal_group(process, signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
    finally:
        _kill_still_running(tree)


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), or ``None``
    when it is gone; with the PID it names one process, whatever PID reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])  # field 22 of proc(5), counted after the command


def _descendants(pid: int) -> list[tuple[int, int]]:
    """Every process below ``pid`` now, as (pid, start time). Linux only (an
    empty list elsewhere, where the group signal is all there is)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(name))
    found: list[tuple[int, int]] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        started = _start_time(child)
        if started is not None:
            found.append((child, started))
        todo.extend(children.get(child, ()))
    return found


def _kill_still_running(tree: list[tuple[int, int]]) -> None:
    """SIGKILL each process of ``tree`` that is still the same process."""
    for pid, started in tree:
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
