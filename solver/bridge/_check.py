"""Checking that a build is deterministic: rebuild every op and compare outputs.

:func:`check_determinism` builds a definition in the caller's solver (what a
normal build gives: cached results, or the first build), rebuilds every op from
scratch in a temporary store, and compares each op output's tree by a content
digest. An op whose output differs is reported with the first file that differs
and why (its content, its mode, its type, or it is missing on one side), which is
usually enough to see the cause: a timestamp, an embedded path, random bytes.

Design notes
------------

*Why a scratch worker, not ``ignore_cache`` in the caller's solver.* Rebuilding in
the caller's store would leave a second snapshot of every op there, and the
rebuild's results would be saved in the caller's cache beside the cached ones.
The rebuild runs in a second :class:`Solver` over a :class:`Worker` whose store is
a temporary directory (deleted afterwards), with a fresh in-memory cache, so the
caller's store ends with exactly what a normal build leaves. Its op kinds must be
the scratch worker's own (kinds are bound to a store), so an op of a kind the
scratch worker lacks (an application's own kind) cannot be rebuilt; it and the
ops that consume it are reported as not compared rather than failing the check.

*Why ``ignore_cache`` as well.* The scratch cache starts empty, so nothing could
be found in it anyway; marking every op ignore-cache makes that explicit and keeps
it true should the scratch solver ever be given a cache source.

*Why one job per side.* Each op output is solved as the output of a
sub-definition (the same ops, another output). In one job, the states of what
was solved before stay active, so asking for an op the job already built hands
back its result instead of running it again (ignore-cache vertices are shared
within the engine too, keyed apart from normal ones). The whole definition is
solved first on each side, so independent ops build in parallel, as in a normal
build; the per-op solves then only collect results.

*The content digest.* ``sha256`` over the tree's entries in walk order (depth
first, sorted by name, which is the order of the paths' component tuples), each
entry as its type, path, permission bits and payload (a file's content digest, a
symlink's target), every field NUL-terminated (a path or link target cannot hold
a NUL). Modification times, owners and the root directory's own mode are left
out: they differ between any two builds and are not what a consumer reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import anyio
import anyio.to_thread

from .._errors import SolveError
from ..definition import Definition, OpDef, OpMetadata, OutputRef
from ..engine import Job
from ..worker import FileStat, SecretSource, SnapshotView, Worker
from ._solver import Solver, definitions_unrecorded

__all__ = [
    "CheckReport",
    "CheckStatus",
    "FileDifference",
    "OpCheck",
    "check_determinism",
    "tree_digest",
]

CheckStatus = Literal["same", "differs", "failed", "not compared"]
"""What the check found for one op output: ``same`` content digest; ``differs``;
``failed``, the rebuild of the op failed where the build had succeeded; ``not
compared``, the output could not be rebuilt or is not a snapshot."""

DifferenceReason = Literal["content", "mode", "type", "link target", "missing"]
"""Why a file differs between the two builds."""

_CHUNK: Final = 1 << 20
_EXCERPT: Final = 16


@dataclass(frozen=True, slots=True)
class FileDifference:
    """The first entry (in walk order) that differs between the cached output and
    the rebuild. ``path`` is relative to the output's root; ``reason`` says what
    differs; ``detail`` says how, in words (both modes, both types, which side
    lacks the entry, or the first differing byte and a few bytes from each side)."""

    path: str
    reason: DifferenceReason
    detail: str


@dataclass(frozen=True, slots=True)
class OpCheck:
    """The check of one op output (``digest``, ``index``).

    ``name`` is the op's name in the definition (its kind when it has none).
    ``cached`` and ``rebuilt`` are the content digests of the two trees (``None``
    when not computed). ``difference`` is set when ``status`` is ``differs``;
    ``reason`` explains a ``failed`` or ``not compared`` status.
    """

    digest: str
    index: int
    name: str
    kind: str
    status: CheckStatus
    cached: str | None = None
    rebuilt: str | None = None
    difference: FileDifference | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        """The op's name, with the output index for an output other than 0."""
        return self.name if self.index == 0 else f"{self.name}[{self.index}]"


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What :func:`check_determinism` found: one :class:`OpCheck` per op output the
    definition uses, inputs first."""

    outputs: tuple[OpCheck, ...]

    @property
    def ok(self) -> bool:
        """True when no output differs and no rebuild failed (outputs that were not
        compared do not count against it)."""
        return not self.problems

    @property
    def problems(self) -> tuple[OpCheck, ...]:
        """The outputs that differ or whose rebuild failed."""
        return tuple(c for c in self.outputs if c.status in ("differs", "failed"))

    def count(self, status: CheckStatus) -> int:
        """How many outputs have ``status``."""
        return sum(1 for c in self.outputs if c.status == status)


# -- the check ---------------------------------------------------------------------------


async def check_determinism(
    solver: Solver,
    definition: Definition,
    *,
    secrets: Mapping[str, SecretSource] | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Build ``definition`` in ``solver``, rebuild every op of it from scratch, and
    compare each op output's content digest (:func:`tree_digest`).

    ``solver`` must use the built-in worker (``Solver()`` or
    ``Solver(worker=...)``); its results are what a normal build gives (cached
    ones when its cache has them). The rebuild runs in a second solver over a
    :class:`~solver.worker.Worker` in a new temporary directory (under
    ``scratch_dir``, default the system's), with the same sandbox mode and a fresh
    in-memory cache, every op ignoring the cache; the directory is deleted before
    this returns. Its exec steps see ``secrets`` (a worker does not hand its own
    out, so a caller whose build reads secrets passes them again).

    Every op output the definition uses (the output, and every input of an op
    reachable from it) is checked, inputs first. The caller's store ends with
    what a normal build of ``definition`` leaves, and every handle taken is
    released. A failure of the build in ``solver`` raises
    :class:`~solver.SolveError` as the build would; a failed rebuild is reported
    (status ``failed``), and so are outputs that cannot be compared (``not
    compared``: an op of a kind the scratch worker lacks, a consumer of one, or a
    result that is not a snapshot).
    """
    worker = solver.worker
    if worker is None:
        raise SolveError(
            "checking a build needs a solver over the built-in worker "
            "(Solver() or Solver(worker=...)): the rebuild runs in a scratch worker"
        )
    definition.validate(solver.op_kinds)
    parent = None if scratch_dir is None else os.fspath(scratch_dir)
    tmp = await anyio.to_thread.run_sync(_make_scratch_dir, parent)
    try:
        scratch = Worker(Path(tmp) / "store", sandbox=worker.sandbox, secrets=secrets)
        async with scratch:
            try:
                async with Solver(op_kinds=scratch.op_kinds) as rebuilder:
                    return await _check(solver, rebuilder, scratch, definition)
            finally:
                # The scratch solver is closed, so no handle is left on its
                # snapshots; the store deletes them itself (they are read-only).
                with anyio.CancelScope(shield=True):
                    await scratch.store.prune()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_remove_tree, tmp)


async def _check(
    solver: Solver, rebuilder: Solver, scratch: Worker, definition: Definition
) -> CheckReport:
    ops = definition.ops
    order = _post_order(ops, definition.output.digest)
    wanted = _used_outputs(definition, order)
    fresh = _ignoring_cache(definition, order)
    # An op of a kind the scratch worker lacks cannot be rebuilt (kinds are bound
    # to their store), nor can the ops that consume it.
    unknown = {
        d: f"its kind {ops[d].kind!r} is not a built-in kind the rebuild has"
        for d in order
        if scratch.op_kinds.get(ops[d].kind) is None
    }
    job = solver.new_job()
    rejob = rebuilder.new_job()
    try:
        # The whole graph first on each side, so that independent ops run in
        # parallel; each op output is then solved alone from the same job, which
        # hands back what it built. A failed rebuild shows again op by op below.
        async with await solver.solve(definition, job=job):
            pass
        if definition.output.digest not in unknown:
            try:
                async with await rebuilder.solve(fresh, job=rejob):
                    pass
            except SolveError:
                pass
        checks: list[OpCheck] = []
        # why the consumers of an op cannot be compared
        downstream: dict[str, str] = {}
        for d in order:
            op = ops[d]
            name = _name(definition, d)
            why = unknown.get(d) or next(
                (downstream[i.digest] for i in op.inputs if i.digest in downstream), None
            )
            for index in wanted[d]:
                if why is not None:
                    checks.append(OpCheck(d, index, name, op.kind, "not compared", reason=why))
                    continue
                check = await _check_output(
                    solver, job, rebuilder, rejob, definition, fresh, d, index
                )
                checks.append(check)
                if check.status == "failed":
                    downstream[d] = f"its input {name} failed to rebuild"
            if why is not None:
                downstream[d] = f"its input {name} cannot be rebuilt"
        return CheckReport(tuple(checks))
    finally:
        with anyio.CancelScope(shield=True):
            await rejob.discard()
            await job.discard()


async def _check_output(
    solver: Solver,
    job: Job,
    rebuilder: Solver,
    rejob: Job,
    definition: Definition,
    fresh: Definition,
    d: str,
    index: int,
) -> OpCheck:
    op = definition.ops[d]
    name = _name(definition, d)
    out = OutputRef(d, index)
    # Only the ops the output needs: a definition keeps (and validates) every op
    # it is given, and one the rebuild lacks must not fail the outputs beside it.
    ops = {op: definition.ops[op] for op in _post_order(definition.ops, d)}
    cached_metadata = {op: m for op, m in definition.metadata.items() if op in ops}
    fresh_metadata = {op: m for op, m in fresh.metadata.items() if op in ops}
    # a part of the graph: its ops' places in the history stay those of the whole
    with definitions_unrecorded():
        part = await solver.solve(Definition(ops, out, cached_metadata), job=job)
    async with part as cached:
        try:
            rebuilt = await rebuilder.solve(Definition(ops, out, fresh_metadata), job=rejob)
        except SolveError as exc:
            return OpCheck(d, index, name, op.kind, "failed", reason=str(exc))
        async with rebuilt:
            a = None if cached.ref is None else cached.ref.sys
            b = None if rebuilt.ref is None else rebuilt.ref.sys
            if not isinstance(a, SnapshotView) or not isinstance(b, SnapshotView):
                kind = type(a if not isinstance(a, SnapshotView) else b).__name__
                return OpCheck(
                    d,
                    index,
                    name,
                    op.kind,
                    "not compared",
                    reason=f"its result is not a snapshot (a {kind})",
                )
            tree_a, tree_b = await _tree(a), await _tree(b)
            digest_a, digest_b = _digest(tree_a), _digest(tree_b)
            if digest_a == digest_b:
                return OpCheck(d, index, name, op.kind, "same", digest_a, digest_b)
            diff = await _first_difference(a, tree_a, b, tree_b)
            return OpCheck(d, index, name, op.kind, "differs", digest_a, digest_b, diff)


# -- the graph ---------------------------------------------------------------------------


def _name(definition: Definition, d: str) -> str:
    meta = definition.metadata.get(d)
    return meta.name if meta is not None and meta.name else definition.ops[d].kind


def _post_order(ops: Mapping[str, OpDef], root: str) -> list[str]:
    """The ops reachable from ``root``, each after its inputs (iterative: any depth)."""
    order: list[str] = []
    seen = {root}
    stack: list[tuple[str, int]] = [(root, 0)]
    while stack:
        d, i = stack[-1]
        inputs = ops[d].inputs
        if i < len(inputs):
            stack[-1] = (d, i + 1)
            child = inputs[i].digest
            if child not in seen:
                seen.add(child)
                stack.append((child, 0))
        else:
            stack.pop()
            order.append(d)
    return order


def _used_outputs(definition: Definition, order: Sequence[str]) -> dict[str, list[int]]:
    """For each op in ``order``, the outputs a build uses: the definition's output
    and the inputs of the ops it reaches (an output nothing reads is never built
    on its own, so it is not checked)."""
    used: dict[str, set[int]] = {d: set() for d in order}
    used[definition.output.digest].add(definition.output.index)
    for d in order:
        for ref in definition.ops[d].inputs:
            used[ref.digest].add(ref.index)
    return {d: sorted(indexes) for d, indexes in used.items()}


def _ignoring_cache(definition: Definition, order: Sequence[str]) -> Definition:
    """``definition`` with every op in ``order`` marked ignore-cache (names and
    descriptions kept, so that errors name the same ops)."""
    metadata = dict(definition.metadata)
    for d in order:
        meta = metadata.get(d)
        metadata[d] = (
            OpMetadata(ignore_cache=True)
            if meta is None
            else OpMetadata(meta.name, meta.description, ignore_cache=True)
        )
    return Definition(definition.ops, definition.output, metadata)


# -- trees -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str
    kind: str  # "file", "directory", "symlink" or "other"
    permissions: int
    payload: str  # a file's sha256 (hex), a symlink's target, "" otherwise

    @property
    def key(self) -> tuple[str, ...]:
        # Walk order (depth first, sorted by name) is the order of these tuples.
        return tuple(self.path.split("/"))


def _kind(st: FileStat) -> str:
    if st.is_file:
        return "file"
    if st.is_dir:
        return "directory"
    if st.is_symlink:
        return "symlink"
    return "other"


async def _tree(view: SnapshotView) -> list[_Entry]:
    stats = await view.walk()
    files = [st.path for st in stats if st.is_file]
    # One thread call hashes every file: a tree of many small files costs one hop.
    hashes = iter(await anyio.to_thread.run_sync(_hash_files, os.fspath(view.path), files))
    entries = [
        _Entry(
            st.path,
            _kind(st),
            st.permissions,
            next(hashes) if st.is_file else st.linkname,
        )
        for st in stats
    ]
    entries.sort(key=lambda e: e.key)
    return entries


def _digest(entries: Sequence[_Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(
            f"{e.kind}\0{e.path}\0{e.permissions:o}\0{e.payload}\0".encode(
                "utf-8", "surrogateescape"
            )
        )
    return f"sha256:{h.hexdigest()}"


async def tree_digest(view: SnapshotView) -> str:
    """The content digest of a snapshot's tree, as :func:`check_determinism`
    compares them: ``sha256:`` and the hex SHA-256 over every entry below the root,
    in walk order, of its type, path, permission bits and content (a file's
    SHA-256, a symlink's target). Modification times and owners are left out."""
    return _digest(await _tree(view))


async def _first_difference(
    a: SnapshotView, tree_a: Sequence[_Entry], b: SnapshotView, tree_b: Sequence[_Entry]
) -> FileDifference:
    for ea, eb in _merged(tree_a, tree_b):
        if eb is None:
            assert ea is not None
            return FileDifference(ea.path, "missing", "in the cached output, not in the rebuild")
        if ea is None:
            return FileDifference(eb.path, "missing", "in the rebuild, not in the cached output")
        if ea.kind != eb.kind:
            return FileDifference(
                ea.path, "type", f"a {ea.kind} in the cached output, a {eb.kind} in the rebuild"
            )
        if ea.kind == "symlink" and ea.payload != eb.payload:
            return FileDifference(
                ea.path,
                "link target",
                f"-> {ea.payload!r} in the cached output, -> {eb.payload!r} in the rebuild",
            )
        if ea.kind == "file" and ea.payload != eb.payload:
            detail = await anyio.to_thread.run_sync(
                _byte_difference,
                os.path.join(a.path, *ea.path.split("/")),
                os.path.join(b.path, *eb.path.split("/")),
            )
            return FileDifference(ea.path, "content", detail)
        if ea.permissions != eb.permissions:
            return FileDifference(
                ea.path,
                "mode",
                f"mode {ea.permissions:04o} in the cached output, "
                f"{eb.permissions:04o} in the rebuild",
            )
    # Equal entries give equal digests; only a hash collision gets here.
    raise AssertionError("the trees' digests differ but no entry does")


def _merged(
    tree_a: Sequence[_Entry], tree_b: Sequence[_Entry]
) -> Iterator[tuple[_Entry | None, _Entry | None]]:
    """Both sorted trees side by side: pairs of the entries of one path, ``None``
    for the side that lacks it."""
    i = j = 0
    while i < len(tree_a) or j < len(tree_b):
        ea = tree_a[i] if i < len(tree_a) else None
        eb = tree_b[j] if j < len(tree_b) else None
        if ea is not None and (eb is None or ea.key < eb.key):
            yield ea, None
            i += 1
        elif eb is not None and (ea is None or eb.key < ea.key):
            yield None, eb
            j += 1
        else:
            yield ea, eb
            i += 1
            j += 1


# -- file system work (in a worker thread) -------------------------------------------------


def _open_file(path: str) -> int:
    # The walk listed a regular file at a path made only of real directories; no
    # symlink is followed in case that changed (snapshots are immutable, but a
    # check never trusts a tree it reads).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SolveError(f"{path} is not a regular file")
    return fd


def _hash_files(root: str, paths: Sequence[str]) -> list[str]:
    hashes: list[str] = []
    for rel in paths:
        h = hashlib.sha256()
        with os.fdopen(_open_file(os.path.join(root, *rel.split("/"))), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        hashes.append(h.hexdigest())
    return hashes


def _byte_difference(path_a: str, path_b: str) -> str:
    """Where two files' contents first differ, with a few bytes of each from there."""
    with (
        os.fdopen(_open_file(path_a), "rb") as fa,
        os.fdopen(_open_file(path_b), "rb") as fb,
    ):
        offset = 0
        while True:
            ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
            if ca != cb:
                n = next(
                    (k for k, (x, y) in enumerate(zip(ca, cb, strict=False)) if x != y),
                    min(len(ca), len(cb)),
                )
                offset += n
                fa.seek(offset)
                fb.seek(offset)
                xa, xb = fa.read(_EXCERPT), fb.read(_EXCERPT)
                size_a, size_b = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
                sizes = "" if size_a == size_b else f"; {size_a} and {size_b} bytes"
                return (
                    f"from byte {offset}: {xa!r} in the cached output, {xb!r} in the rebuild{sizes}"
                )
            if not ca:
                return "the same bytes (read again)"
            offset += len(ca)


def _make_scratch_dir(parent: str | None) -> str:
    return tempfile.mkdtemp(prefix="solver-check-", dir=parent)


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except OSError:
        # What the store did not delete (it failed, or was cancelled) is read-only:
        # give every directory its write bit back and try once more.
        for dirpath, _, _ in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, stat.S_IRWXU)
        shutil.rmtree(path)
