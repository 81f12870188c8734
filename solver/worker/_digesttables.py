"""File digests kept on disk: one table per sealed snapshot, one per local source.

:mod:`solver.worker._digests` remembers each file's SHA-256 for the life of a
process; a new process (every ``solver build``) used to hash every file of every
content key again. A :class:`DigestTable` keeps ``path -> (stat key, digest)``
for the files below one directory in a small file, read the first time a content
key of this process needs it and written again, in the thread that hashed, when
a content key added digests to it:

* **a sealed snapshot** (``<root>/meta/<id>.digests``, beside its metadata):
  its files never change, so an entry is trusted for as long as the snapshot
  exists, and only for the file it was made from: the path in that snapshot,
  with the same inode, size and ``mtime_ns`` (not ``ctime``: a hard link into a
  new snapshot changes it, and the store links sealed files). Snapshot ids are
  never reused, so an entry can never describe another snapshot's file; the
  table is deleted with its snapshot (``_snapshots._delete_snapshots``) and a
  table without a snapshot is removed when the store opens.
* **a local source** (``<root>/local-digests/<key>.digests``; the key is a
  digest of the directory and its include/exclude globs): host files can
  change, so an entry is the per-process rule made persistent: trusted while
  the file's device, inode, size, ``mtime_ns``, ``ctime_ns`` and mode are
  unchanged, and made only for a file that had settled when it was hashed
  (``SETTLE_NS``: the racily-clean rule). The table holds the entries of the
  source's last walk; the store keeps the :data:`MAX_LOCAL_TABLES` most
  recently written tables.

File format (text)::

    solver-digests 1 <owner> <sha256 of the body, hex>\\n
    {"entries": {"<path>": [<stat key ints...>, "<hex digest>"], ...}}

``owner`` is the snapshot id or the local source's key. A file whose first line,
checksum, owner or entries do not check out (truncated, corrupt, another
version, another owner's) is never trusted: it is logged at WARNING on the
``solver`` logger, removed, and rebuilt as files are hashed again. A table is
written whole to a new temporary sibling and renamed over the old one, so a
process killed or a thread interrupted while writing leaves the old table or
the new one, never a mix; a leftover temporary file is removed when the store
opens.

Why a file per table and not a table in a SQLite database: the data is read a
snapshot at a time, by the process that holds the store's lock (no concurrent
writers), and deleted with the snapshot; a file needs no connection (opening a
database and its schema cost more than reading all the tables of a no-op build
of brotli, see ``docs/worker.md``, "A digest table per snapshot"), can be
checked whole by its checksum (SQLite would hand back a flipped digest without
a word), and goes with the snapshot's other files.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from . import _digests

__all__ = [
    "LOCAL_TABLES_DIR",
    "MAX_LOCAL_TABLES",
    "TABLE_SUFFIX",
    "DigestTable",
    "StoreDigests",
    "recover_local_tables",
]

_log = logging.getLogger("solver")

_MAGIC: Final = "solver-digests"
_VERSION: Final = 1
TABLE_SUFFIX: Final = ".digests"
LOCAL_TABLES_DIR: Final = "local-digests"
MAX_LOCAL_TABLES: Final = 256
"""Local sources whose tables the store keeps (the most recently written)."""
MAX_OPEN_TABLES: Final = 4096
"""Snapshot tables kept in memory by one store (least recently used dropped;
each is saved as soon as it changes, so dropping one loses nothing)."""

_HEX: Final = frozenset("0123456789abcdef")

_Entry = tuple[tuple[int, ...], str]  # stat key, hex digest


class _BadTableError(Exception):
    """A digest table file that cannot be trusted (the message says why)."""


def _sealed_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _host_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


class DigestTable:
    """The stored digests of the regular files below one directory, ``top``.

    ``sealed``: the files are a committed snapshot's (trusted by inode, size and
    mtime); else host files (trusted by the full stat key, and only once
    settled). Thread-safe; the file is read on first use."""

    __slots__ = (
        "_dead",
        "_dirty",
        "_entries",
        "_fed",
        "_key",
        "_lock",
        "_origins",
        "_prefix",
        "_save_lock",
        "_width",
        "file",
        "owner",
        "sealed",
    )

    def __init__(self, file: Path, owner: str, top: str, *, sealed: bool) -> None:
        self.file = file
        self.owner = owner
        self.sealed = sealed
        self._key = _sealed_key if sealed else _host_key
        self._width = 3 if sealed else 6  # the length of a stat key
        self._prefix = os.path.join(top, "")
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._entries: dict[str, _Entry] | None = None  # None: not read yet
        self._dirty = False
        self._dead = False
        # rel -> (the table of the sealed snapshot the file was hard-linked
        # from, its path there): told the digest when this table learns it.
        self._origins: dict[str, tuple[DigestTable, str]] = {}
        self._fed: set[DigestTable] = set()  # origins told a digest since the last save

    def file_digest(self, path: str) -> str:
        """The hex SHA-256 of the regular file ``path`` (below ``top``): from the
        table when its entry matches the file's stat data, else hashed
        (:func:`solver.worker._digests.hash_file`) and added to the table if it
        may be kept. Runs in a worker thread; :meth:`save` writes what it added."""
        if not path.startswith(self._prefix):
            return _digests.file_digest(path)
        rel = path[len(self._prefix):]
        key = self._key(os.lstat(path))
        with self._lock:
            entries = self._entries if self._entries is not None else self._load()
            known = entries.get(rel)
        if known is not None and known[0] == key:
            _digests.count_stored()
            return known[1]
        digest, st, keep = _digests.hash_file(path, sealed=self.sealed)
        if keep:
            self.add(rel, st, digest)
            with self._lock:
                origin = self._origins.pop(rel, None)
            if origin is not None and origin[0].add_linked(origin[1], st, digest):
                with self._lock:
                    self._fed.add(origin[0])
        return digest

    def carry(self, rel: str, st: os.stat_result, origin: DigestTable, origin_rel: str) -> bool:
        """``top/rel`` (lstat ``st``) was just hard-linked from ``origin_rel`` of
        the sealed snapshot whose table is ``origin``: one inode, so one content.
        Copy its digest from ``origin`` if known there (True); else remember the
        link, so that when this table hashes the file, ``origin`` learns the
        digest too (the next link from it then carries it). No file is read."""
        if not self.sealed or not origin.sealed:
            raise ValueError("digests are carried only between sealed snapshots' tables")
        digest = origin.lookup(origin_rel, st)
        if digest is not None:
            self.add(rel, st, digest)
            return True
        with self._lock:
            self._origins[rel] = (origin, origin_rel)
        return False

    def add_linked(self, rel: str, st: os.stat_result, digest: str) -> bool:
        """Add ``digest`` for ``top/rel`` if that file is the inode ``st``
        describes (a hard link of it: same device, inode, size, mtime); the
        caller vouches that ``digest`` is that inode's content. Returns whether
        it was added."""
        try:
            own = os.lstat(self._prefix + rel)
        except OSError:  # the snapshot is gone
            return False
        if (own.st_dev, own.st_ino) != (st.st_dev, st.st_ino) or self._key(own) != self._key(st):
            return False
        self.add(rel, own, digest)
        return True

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        """The stored digest of ``top/rel`` if its entry matches ``st``."""
        with self._lock:
            entries = self._entries if self._entries is not None else self._load()
            known = entries.get(rel)
        return known[1] if known is not None and known[0] == self._key(st) else None

    def add(self, rel: str, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` for ``top/rel`` as it is now (``st``); the caller
        vouches that it is the digest of those bytes."""
        if not (stat.S_ISREG(st.st_mode) and len(digest) == 64):
            return
        entry = (self._key(st), digest)
        with self._lock:
            entries = self._entries if self._entries is not None else self._load()
            if entries.get(rel) != entry:
                entries[rel] = entry
                self._dirty = True

    def keep_only(self, rels: set[str]) -> None:
        """Drop the entries of every path not in ``rels`` (a local source's last
        walk), so the table does not keep files that went away."""
        with self._lock:
            entries = self._entries if self._entries is not None else self._load()
            gone = [rel for rel in entries if rel not in rels]
            for rel in gone:
                del entries[rel]
            if gone:
                self._dirty = True

    def save(self) -> None:
        """Write the table if it changed since it was read or last written (whole,
        to a temporary sibling renamed over the file), and the tables of the
        snapshots its files were linked from that learned a digest from it (see
        :meth:`carry`). A failure is logged at WARNING: the digests are computed
        again next time."""
        with self._lock:
            fed, self._fed = self._fed, set()
        for origin in fed:
            origin.save()
        self._save_own()

    def _save_own(self) -> None:
        with self._save_lock:
            with self._lock:
                if not self._dirty or self._dead or self._entries is None:
                    return
                entries = dict(self._entries)
                self._dirty = False
            body = json.dumps(
                {"entries": {rel: [*key, digest] for rel, (key, digest) in entries.items()}},
                separators=(",", ":"),
                sort_keys=True,
            ).encode("ascii")
            head = f"{_MAGIC} {_VERSION} {self.owner} {hashlib.sha256(body).hexdigest()}\n"
            try:
                write_atomically(self.file, head.encode("ascii") + body)
            except OSError as exc:
                _log.warning("could not write the digest table %s: %s", self.file, exc)

    def forget(self) -> None:
        """The directory is gone (its snapshot deleted): never write the table again."""
        with self._lock:
            self._dead = True

    def _load(self) -> dict[str, _Entry]:
        """Read the file (under ``_lock``); a bad one is removed, with a warning."""
        entries: dict[str, _Entry] = {}
        try:
            data = self.file.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            _log.warning("ignoring the digest table %s: %s", self.file, exc)
            data = None
        if data is not None:
            try:
                entries = self._parse(data)
            except _BadTableError as exc:
                _log.warning(
                    "ignoring the digest table %s: %s; its files will be hashed again",
                    self.file, exc,
                )
                with contextlib.suppress(OSError):
                    self.file.unlink()
                entries = {}
                self._dirty = True  # written again, whole, at the next save
        self._entries = entries
        return entries

    def _parse(self, data: bytes) -> dict[str, _Entry]:
        head, newline, body = data.partition(b"\n")
        if not newline:
            raise _BadTableError("it is truncated (no header line)")
        fields = head.decode("ascii", "replace").split(" ")
        if len(fields) != 4 or fields[0] != _MAGIC:
            raise _BadTableError("it is not a digest table")
        if fields[1] != str(_VERSION):
            raise _BadTableError(f"its version {fields[1]!r} is not {_VERSION}")
        if fields[2] != self.owner:
            raise _BadTableError(f"it belongs to {fields[2]!r}, not {self.owner!r}")
        if hashlib.sha256(body).hexdigest() != fields[3]:
            raise _BadTableError("its checksum does not match (truncated or corrupt)")
        try:
            raw = json.loads(body)
        except ValueError:
            raise _BadTableError("its body is not JSON") from None
        table = raw.get("entries") if isinstance(raw, dict) else None
        if not isinstance(table, dict):
            raise _BadTableError("it has no entries")
        width = self._width
        entries: dict[str, _Entry] = {}
        for rel, value in table.items():
            if (
                not isinstance(value, list)
                or len(value) != width + 1
                or not all(type(v) is int for v in value[:width])
                or not isinstance(value[width], str)
                or len(value[width]) != 64
                or not set(value[width]) <= _HEX
            ):
                raise _BadTableError(f"its entry for {rel!r} is malformed")
            entries[rel] = (tuple(value[:width]), value[width])
        return entries

    def __repr__(self) -> str:
        count = "unread" if self._entries is None else f"{len(self._entries)} entries"
        return f"<DigestTable {self.owner} {count} at {self.file}>"


def write_atomically(file: Path, data: bytes) -> None:
    """Write ``data`` to a new temporary sibling of ``file`` and rename it over
    ``file``: a reader sees the old file or the new one, never part of one."""
    temporary = file.with_name(f"{file.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


class StoreDigests:
    """The digest tables of one store root, made on first use and kept in memory
    (a bounded number of snapshot tables, least recently used dropped)."""

    __slots__ = ("_local", "_lock", "_root", "_snapshots")

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._snapshots: collections.OrderedDict[str, DigestTable] = collections.OrderedDict()
        self._local: dict[str, DigestTable] = {}

    def snapshot_table(self, sid: str, path: Path) -> DigestTable:
        """The table of committed snapshot ``sid`` whose directory is ``path``."""
        with self._lock:
            table = self._snapshots.get(sid)
            if table is None:
                file = self._root / "meta" / f"{sid}{TABLE_SUFFIX}"
                table = self._snapshots[sid] = DigestTable(
                    file, sid, os.fspath(path), sealed=True
                )
                if len(self._snapshots) > MAX_OPEN_TABLES:
                    self._snapshots.popitem(last=False)
            else:
                self._snapshots.move_to_end(sid)
            return table

    def local_table(self, top: str, include: Sequence[str], exclude: Sequence[str]) -> DigestTable:
        """The table of the local source reading ``top`` with these globs."""
        identity = json.dumps([top, list(include), list(exclude)], separators=(",", ":"))
        key = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        with self._lock:
            table = self._local.get(key)
            if table is None:
                file = self._root / LOCAL_TABLES_DIR / f"{key}{TABLE_SUFFIX}"
                table = self._local[key] = DigestTable(file, key, top, sealed=False)
            return table

    def forget(self, ids: Sequence[str]) -> None:
        """The snapshots ``ids`` were deleted (their table files with them)."""
        with self._lock:
            for sid in ids:
                table = self._snapshots.pop(sid, None)
                if table is not None:
                    table.forget()


def recover_local_tables(root: Path) -> None:
    """At store open: make the local tables' directory, remove temporary files
    left by an interrupted write, and keep only the :data:`MAX_LOCAL_TABLES`
    most recently written tables."""
    where = root / LOCAL_TABLES_DIR
    where.mkdir(exist_ok=True)
    tables: list[tuple[int, str]] = []
    with os.scandir(where) as it:
        for entry in it:
            if entry.name.endswith(TABLE_SUFFIX) and entry.is_file(follow_symlinks=False):
                tables.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    tables.sort(reverse=True)
    for _, path in tables[MAX_LOCAL_TABLES:]:
        with contextlib.suppress(OSError):
            os.unlink(path)
