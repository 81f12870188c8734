"""The built-in ``exec`` op kind: run a process over snapshot mounts.

``register_exec(registry, store)`` registers the kind ``exec`` in an
:class:`~solver.OpKindRegistry`. An ``exec`` op runs one process on the host (no
container, no user namespace) in a fresh per-exec directory ``R`` in which each of
its mounts is materialised, and turns some of those mounts into output snapshots.

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
         "output": 0 | null},                  # optional: becomes that output
        ...
      ]
    }

* A **read-only** mount of input ``i`` is a private copy of that input snapshot,
  with every write bit dropped; ``input: null`` gives an empty read-only
  directory. Being a copy, nothing the process does to it can reach the input
  snapshot (write bits do not stop a process running as root; the copy does). A
  read-only mount has no ``output`` and may not contain other mounts.
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
* The environment is exactly ``env``, plus ``PATH`` from the host when ``env``
  has none, plus ``SOLVER_ROOT`` = the absolute path of ``R`` (``env`` may not set
  it). ``args[0]`` is looked up on that ``PATH`` (or relative to ``cwd`` when it
  contains a ``/``).

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

Cache map: the digest of the canonical JSON of ``{"kind": "exec", "payload": ...}``
and one :class:`~solver.CacheMapDep` per input (no selector, no content key).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap, CacheMapDep, Op
from .._progress import log_output
from .._result import Result
from ..definition import DefinitionError, JSONValue, OpContext, OpKindRegistry, canonical_json
from ._snapshots import MutableSnapshot, SnapshotRef, SnapshotStore, SnapshotView

__all__ = [
    "KILL_GRACE",
    "STDERR_TAIL",
    "ExecOp",
    "ExecPayloadError",
    "OutputHook",
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

_KIND: Final = "exec"
_KEYS: Final = frozenset({"args", "env", "cwd", "mounts"})
_MOUNT_KEYS: Final = frozenset({"input", "dest", "readonly", "output"})
_WRITE_BITS: Final = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


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


@dataclass(frozen=True, slots=True)
class _Spec:
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: tuple[str, ...]
    mounts: tuple[_Mount, ...]
    outputs: int


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


def _parse(payload: Mapping[str, JSONValue]) -> _Spec:
    """The checked form of a payload; :class:`ExecPayloadError` saying what is wrong."""
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
        if name == "SOLVER_ROOT":
            raise ExecPayloadError(
                "env may not set SOLVER_ROOT: the exec op sets it to the exec root"
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
        mounts.append(_Mount(inp, str(m["dest"]), parts, readonly, out))

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
    return _Spec(tuple(str(a) for a in args), env, cwd, tuple(mounts), len(outs))


def _validate(payload: Mapping[str, JSONValue]) -> None:
    _parse(payload)


def _count_outputs(payload: Mapping[str, JSONValue]) -> int:
    return _parse(payload).outputs


# -- the op -----------------------------------------------------------------------------


class ExecOp:
    """The op of one ``exec`` vertex (see the module docstring). Made by the factory
    that :func:`register_exec` registers; ``exec`` runs the process once."""

    __slots__ = ("_digest", "_inputs", "_name", "_on_output", "_spec", "_store")

    def __init__(
        self,
        spec: _Spec,
        payload: Mapping[str, JSONValue],
        inputs: int,
        store: SnapshotStore,
        on_output: OutputHook | None,
        name: str = "",
    ) -> None:
        self._spec = spec
        self._inputs = inputs
        self._store = store
        self._on_output = on_output
        self._name = name
        self._digest = digest_of(canonical_json({"kind": _KIND, "payload": payload}))

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        """The payload's digest and one plain dependency per input."""
        return CacheMap(self._digest, tuple(CacheMapDep() for _ in range(self._inputs))), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        """Materialise the mounts, run the process, commit the output mounts."""
        spec = self._spec
        store = self._store
        if store.closed:
            raise SolveError("cannot run exec: the snapshot store is closed")
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
            stashes = await self._materialise(inputs, work, root, order, mutables)
            cwd = await anyio.to_thread.run_sync(_ensure_dir, root, spec.cwd, "cwd")
            code, tail = await self._run(root, cwd)
            if code != 0:
                raise SolveError(self._failure(code, tail))
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
    ) -> dict[int, Path]:
        """Place every mount under ``root``, shallowest first. Returns where the
        content hidden by each nested mount was put aside."""
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

    async def _run(self, root: Path, cwd: Path) -> tuple[int, bytes]:
        """Run the process to its end; its exit code and stderr tail."""
        spec = self._spec
        env = dict(spec.env)
        if "PATH" not in env:
            env["PATH"] = os.environ.get("PATH", os.defpath)
        env["SOLVER_ROOT"] = os.fspath(root)
        posix = sys.platform != "win32"
        try:
            process = await anyio.open_process(
                list(spec.args),
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
        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None
                assert process.stderr is not None
                tg.start_soon(self._pump, process.stdout, 1, None)
                tg.start_soon(self._pump, process.stderr, 2, tail)
                code = await process.wait()
                # The process is gone; anything left in its group would hold the
                # pipes open (and the op) forever.
                _signal_group(process, signal.SIGKILL if posix else signal.SIGTERM)
            return code, bytes(tail)
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    await _kill(process)
                await process.aclose()

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

    def _failure(self, code: int, tail: bytes) -> str:
        if code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            how += f" (exit code {code})"
        else:
            how = f"exited with exit code {code}"
        text = tail.decode("utf-8", "replace").rstrip()
        label = f" {self._name!r}" if self._name and self._name != _KIND else ""
        msg = f"exec{label}: process {self._command()} {how}"
        if text:
            return f"{msg}; stderr (last {STDERR_TAIL} bytes at most):\n{text}"
        return f"{msg}; it wrote nothing to stderr"

    def __repr__(self) -> str:
        return f"<ExecOp {self._command()} mounts={len(self._spec.mounts)}>"


def register_exec(
    registry: OpKindRegistry,
    store: SnapshotStore,
    *,
    on_output: OutputHook | None = None,
    replace: bool = False,
) -> None:
    """Register the op kind ``exec`` in ``registry``, running over ``store``.

    ``store`` must be open while ops run; outputs are snapshots of it, and inputs of
    mounts must be snapshots of it too. ``on_output(fd, chunk)``, when given,
    receives every chunk the processes write (``fd`` 1: stdout, 2: stderr), for all
    ``exec`` ops of this registry, on the event loop; it is how progress logs will be
    wired in (there is no per-vertex log API yet). ``replace`` is passed to
    :meth:`OpKindRegistry.register`. Payloads are checked by the kind's ``validate``
    hook, and ``outputs`` gives the number of output mounts.
    """

    def factory(ctx: OpContext) -> Op:
        spec = _parse(ctx.payload)
        for i, m in enumerate(spec.mounts):
            if m.input is not None and m.input >= ctx.inputs:
                raise DefinitionError(
                    f"exec op {ctx.vertex.digest}: mounts[{i}].input is {m.input}, but the op "
                    f"has {ctx.inputs} input(s)",
                    op=ctx.vertex.digest,
                    kind=ctx.kind,
                )
        return ExecOp(spec, ctx.payload, ctx.inputs, store, on_output, ctx.vertex.name)

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


def _place_copy(source: Path | None, root: Path, m: _Mount, stash: Path) -> Path | None:
    """A read-only mount: a private copy of ``source`` (or an empty directory)."""
    dest, stashed = _prepare_dest(root, m, stash)
    try:
        if source is None:
            os.mkdir(dest)
        else:
            shutil.copytree(source, dest, symlinks=True)
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
    """Terminate, then kill after :data:`KILL_GRACE`, and await. Call shielded."""
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
