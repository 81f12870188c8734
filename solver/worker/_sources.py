"""The source kinds: ``source.inline`` and ``source.local``.

``source.inline``: ``{"files": [{"path": "dir/a.txt", "data": "...",
"encoding": "utf-8" | "base64", "mode": 420}, ...]}``. No inputs; one output
holding those files (missing parent directories are created with mode 0o755; a
later entry for the same path wins). Cache map digest: the digest of the canonical
payload, since the content is in the definition.

``source.local``: ``{"path": "/abs/dir", "include": [globs], "exclude": [globs]}``.
No inputs; one output holding a copy of the selected entries of the host
directory (symlinks copied as symlinks, never followed; device files, FIFOs and
sockets refused). Cache map digest: a content digest of exactly the selected
entries (relative paths, types, permission bits without write bits, file bytes,
symlink targets), computed in a worker thread, so an unchanged directory is a
cache hit and a changed file a miss.

Globs are ``fnmatch`` patterns (case-sensitive; ``*`` also matches ``/``) matched
against each entry's path relative to the directory; an entry is selected when it
or one of its parent directories matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import anyio
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap
from .._result import Result
from ..definition import JSONValue, OpContext, OpHistory, OpKindRegistry, canonical_json
from . import _digests
from ._digests import copy_hashing
from ._digesttables import DigestTable
from ._fileops import (
    FILE_MODE,
    Entry,
    check_fields,
    check_globs,
    check_mode,
    copy_one,
    decode_data,
    digest_of_files,
    entry_record,
    select_tree,
    write_file,
)
from ._paths import resolve_in
from ._snapshots import SnapshotRef, SnapshotStore

__all__ = ["register_sources"]

_log = logging.getLogger("solver")

_INLINE: Final = "source.inline"
_LOCAL: Final = "source.local"


# -- source.inline ----------------------------------------------------------------------


def validate_inline(payload: Mapping[str, JSONValue]) -> None:
    check_fields(_INLINE, "payload", payload, ("files",))
    files = payload["files"]
    if not isinstance(files, Sequence) or isinstance(files, str):
        raise TypeError(f"{_INLINE} payload: files: must be a list")
    for i, f in enumerate(files):
        where = f"files[{i}]"
        entry = check_fields(_INLINE, where, f, ("path", "data"), ("encoding", "mode"))
        for name in ("path", "data", "encoding"):
            if name in entry and not isinstance(entry[name], str):
                raise ValueError(f"{_INLINE} payload: {where}.{name}: must be a string")
        if "mode" in entry:
            check_mode(_INLINE, f"{where}.mode", entry["mode"])
        decode_data(entry["data"], entry.get("encoding", "utf-8"), f"{_INLINE} payload: {where}")


def _write_inline(out: str, files: list[tuple[str, bytes, int]]) -> None:
    for path, data, mode in files:
        real = resolve_in(out, path, what=f"{_INLINE} path")
        if os.path.normpath(real) == os.path.normpath(out):
            raise SolveError(f"{_INLINE}: {path!r} names the root, not a file")
        write_file(out, real, data, mode, path)


class InlineOp:
    def __init__(self, ctx: OpContext, store: SnapshotStore) -> None:
        self.store = store
        self.payload = ctx.payload
        self.vertex = ctx.vertex.digest
        self.name = ctx.vertex.name

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        return CacheMap(digest_of(b"solver.worker/source.inline/v1\0" +
                                  canonical_json(self.payload))), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        files: list[tuple[str, bytes, int]] = []
        raw = self.payload.get("files") or []
        assert isinstance(raw, Sequence)
        for entry in raw:
            assert isinstance(entry, Mapping)
            data = decode_data(str(entry["data"]), str(entry.get("encoding", "utf-8")), _INLINE)
            mode = entry.get("mode", FILE_MODE)
            files.append((str(entry["path"]), data, mode if type(mode) is int else FILE_MODE))
        mutable = await self.store.new_mutable(
            {"kind": _INLINE, "vertex": self.vertex, "name": self.name}
        )
        try:
            await anyio.to_thread.run_sync(_write_inline, os.fspath(mutable.path), files)
            ref: SnapshotRef = await mutable.commit()
        finally:
            with anyio.CancelScope(shield=True):
                await mutable.discard()
        return [ref]


# -- source.local --------------------------------------------------------------------------


def validate_local(payload: Mapping[str, JSONValue]) -> None:
    check_fields(_LOCAL, "payload", payload, ("path",), ("include", "exclude"))
    path = payload["path"]
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ValueError(f"{_LOCAL} payload: path: must be an absolute path, got {path!r}")
    for name in ("include", "exclude"):
        if name in payload:
            check_globs(_LOCAL, name, payload[name])


def _local_top(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SolveError(f"{_LOCAL}: directory {path!r} does not exist") from None
    except OSError as exc:
        raise SolveError(f"{_LOCAL}: cannot read {path!r}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SolveError(f"{_LOCAL}: {path!r} is not a directory")
    return path


def _local_digest(
    path: str, include: list[str], exclude: list[str], table: DigestTable | None = None
) -> str:
    """The cache digest of the selected entries of the host directory ``path``;
    with ``table`` (the source's stored digests), a file whose stat data is as
    the table has it is not read, and the table is written after. Runs in a
    thread."""
    return _local_digest_and_files(path, include, exclude, table)[0]


def _local_digest_and_files(
    path: str, include: list[str], exclude: list[str], table: DigestTable | None = None
) -> tuple[str, dict[str, str]]:
    """:func:`_local_digest`, and each selected entry's path -> the digest of its
    :func:`~solver.worker._fileops.entry_record`, in the same pass (for the op
    history: which files changed when the digest does). With ``table``, a tree
    whose every entry has the stat data of the last walk through that table,
    all settled then, gives that walk's answer (see :class:`_LastWalks`)."""
    top = _local_top(path)
    started = time.time_ns()
    entries = select_tree(top, include, exclude, what=f"{_LOCAL} entry")
    seen = None if table is None else _stat_data(entries)
    if seen is not None:
        assert table is not None
        known = _last_walks.get(table, seen)
        if known is not None:
            return known[0], dict(known[1])
    h = hashlib.sha256(b"solver.worker/source.local/v1\n")
    files: dict[str, str] = {}
    digest = digest_of_files(table)
    for e in entries:
        record = entry_record(e.rel, e.path, e.mode, digest)
        h.update(record)
        files[e.rel] = digest_of(record)
    answer = "sha256:" + h.hexdigest()
    if table is not None:
        table.keep_only(set(files))
        table.save()
        if seen is not None and _all_settled(seen, started):
            _last_walks.keep(table, seen, answer, dict(files))
    return answer, files


_StatData = list[tuple[object, ...]]


def _stat_data(entries: Sequence[Entry]) -> _StatData | None:
    """Each entry's path and stat data (device, inode, size, mtime, ctime,
    mode: what a host file's digest-table key holds); None if one is gone."""
    out: _StatData = []
    try:
        for e in entries:
            st = os.lstat(e.path)
            out.append((e.rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                        st.st_ctime_ns, st.st_mode))
    except OSError:
        return None
    return out


def _all_settled(seen: _StatData, walked_at: int) -> bool:
    """Whether every entry's mtime and ctime were :data:`SETTLE_NS
    <solver.worker._digests.SETTLE_NS>` older than the walk: a later write then
    changes its stat data."""
    settled = walked_at - _digests.SETTLE_NS
    return all(e[4] < settled and e[5] < settled for e in seen)  # type: ignore[operator]


class _LastWalks:
    """The last walk of each local source tree, per digest table.

    A no-op build walks every local source's tree to find its cache digest: a
    stat per entry, then each entry's record encoded and hashed into the
    digest and hashed again for the op history's file list, about 1 ms of
    Python in a thread for 128 entries and the largest step left of a no-op
    build of a C library (``docs/performance.md``, "The no-op build read once,
    checked once"). When every selected entry has the stat data it had at the
    last walk through the same table (one per store, tree and globs), and all of
    them had settled then (a write after that changes the stat data, as the
    digest tables' racily-clean rule has it), the selected contents are those of
    that walk, and so are its digest and file list: only the stats are made
    again (0.42 ms against 1.10 ms for pycryptodome's 128 entries). Holds at
    most :data:`_MAX_WALKS` tables, emptied when full; thread-safe."""

    __slots__ = ("_known", "_lock")

    def __init__(self) -> None:
        # id(table) -> (table, stat data, digest, files); the table is held so
        # that its id is not reused while it is here
        self._known: dict[int, tuple[DigestTable, _StatData, str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def get(self, table: DigestTable, seen: _StatData) -> tuple[str, dict[str, str]] | None:
        known = self._known.get(id(table))
        if known is None or known[0] is not table or known[1] != seen:
            return None
        return known[2], known[3]

    def keep(self, table: DigestTable, seen: _StatData, digest: str, files: dict[str, str]) -> None:
        with self._lock:
            if len(self._known) >= _MAX_WALKS:
                self._known.clear()
            self._known[id(table)] = (table, seen, digest, files)

    def clear(self) -> None:
        with self._lock:
            self._known.clear()


_MAX_WALKS: Final = 64
_last_walks: Final = _LastWalks()


def _copy_local(
    path: str, include: list[str], exclude: list[str], out: str, table: DigestTable
) -> None:
    """Copy the selected entries of the host directory into the working directory
    ``out``, hashing each file's bytes as they are copied, and write ``table``
    (the table of the snapshot ``out`` becomes) with those digests: a content
    key over the new snapshot then reads none of its files. Runs in a thread."""
    top = _local_top(path)
    seeds: list[tuple[str, str, str]] = []
    for e in select_tree(top, include, exclude, what=f"{_LOCAL} entry"):
        dst = os.path.join(out, *e.rel.split("/"))
        if stat.S_ISREG(e.mode):
            seeds.append((e.rel, dst, copy_hashing(e.path, dst)))
            os.chmod(dst, stat.S_IMODE(e.mode) | stat.S_IWUSR)
        else:
            copy_one(e.path, e.mode, dst)
    # Sealing keeps each file's inode, size and mtime (the table's key): it only
    # drops write bits. A table whose snapshot is never committed is removed
    # when the store next opens.
    for rel, dst, digest in seeds:
        table.add(rel, os.lstat(dst), digest)
    table.save()


class LocalOp:
    def __init__(
        self,
        ctx: OpContext,
        store: SnapshotStore,
        history: Callable[[], OpHistory | None] | None = None,
    ) -> None:
        self.store = store
        self.history = history
        self.vertex = ctx.vertex.digest
        self.name = ctx.vertex.name
        self.path = str(ctx.payload["path"])
        self.include = _strings(ctx.payload.get("include"))
        self.exclude = _strings(ctx.payload.get("exclude"))

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        history = self.history() if self.history is not None else None
        if history is not None:
            return CacheMap(await self._digest_recorded(history)), True
        digest = await anyio.to_thread.run_sync(
            _local_digest, self.path, self.include, self.exclude, self._table()
        )
        return CacheMap(digest), True

    def _table(self) -> DigestTable:
        return self.store.local_digest_table(self.path, self.include, self.exclude)

    async def _digest_recorded(self, history: OpHistory) -> str:
        """The cache digest, with the digest of each file it covers recorded in the
        op history (as input ``-1``: the op's own key), so that a miss can name
        the files that changed (``docs/explain.md``)."""
        digest, files = await anyio.to_thread.run_sync(
            _local_digest_and_files, self.path, self.include, self.exclude, self._table()
        )
        try:
            await history.record_content(self.vertex, -1, f"{self.vertex}#local", digest, files)
        except Exception as exc:  # a help for explaining, never worth a failed build
            _log.warning("%s %r: recording its files failed: %s", _LOCAL, self.name, exc)
        return digest

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        mutable = await self.store.new_mutable(
            {"kind": _LOCAL, "vertex": self.vertex, "name": self.name, "path": self.path}
        )
        try:
            await anyio.to_thread.run_sync(
                _copy_local,
                self.path,
                self.include,
                self.exclude,
                os.fspath(mutable.path),
                self.store.new_snapshot_table(mutable),
            )
            ref: SnapshotRef = await mutable.commit()
        finally:
            with anyio.CancelScope(shield=True):
                await mutable.discard()
        return [ref]


def _strings(value: JSONValue) -> list[str]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        return []
    return [str(v) for v in value]


def register_sources(
    registry: OpKindRegistry,
    store: SnapshotStore,
    history: Callable[[], OpHistory | None] | None = None,
) -> None:
    """Register ``source.inline`` and ``source.local``, bound to ``store``;
    ``history()`` (when given) is the op history ``source.local`` records the
    files of its cache digest in, if any."""
    registry.register(_INLINE, lambda ctx: InlineOp(ctx, store), validate=validate_inline)
    registry.register(_LOCAL, lambda ctx: LocalOp(ctx, store, history), validate=validate_local)
