"""File content digests, each file hashed once while it does not change.

Every content key the worker computes (a ``source.local`` directory, a ``file``
copy's selection, an exec mount selector) hashes the files it covers. Issue 21
measured 35 compile steps hashing 53 MB to find one changed file: each step's
content key re-read every header. :func:`file_digest` remembers the SHA-256 of
each file it hashed, keyed by its identity and stat data, and hands it back
while the file's stat data is unchanged, as git's index and BuildKit's
per-snapshot content hash cache do.

This module is the per-process memory and the one place that reads a file to
hash it; :mod:`solver.worker._digesttables` keeps digests across processes (a
table per sealed snapshot, one per local source), in front of it.

What identifies an unchanged file: the same device and inode, size,
``mtime_ns``, ``ctime_ns`` and mode. Any write changes ``mtime`` and ``ctime``;
replacing the file (an editor's save by rename) changes the inode; ``touch``-ing
back an old ``mtime`` still changes ``ctime``, which no user call can set. A
snapshot's files never change at all, and a file the store hard-links into
several snapshots (``file`` copies, ``merge``) is one inode, so it is hashed once
for all of them (while no new link changes its ``ctime``).

The one hole is a write within the timestamp granularity of the hash itself
(git's "racily clean" entries): a file changed in the same clock tick as it was
hashed keeps its stat data on a file system with coarse timestamps. So a digest
is remembered only for a file whose ``mtime`` and ``ctime`` are at least
:data:`SETTLE_NS` older than the moment it was hashed; a file modified just
before a build is hashed again next time, until it has settled. A file of a
sealed snapshot (``sealed=True``) is remembered at once: nothing writes it after
its seal.

The cache is per process (shared by every worker in it), bounded by
:data:`MAX_ENTRIES` (emptied when full: an entry costs ~200 bytes), and
thread-safe (content keys run in worker threads).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import time
from typing import Final

__all__ = [
    "MAX_ENTRIES",
    "SETTLE_NS",
    "clear",
    "copy_hashing",
    "count_stored",
    "file_digest",
    "hash_file",
    "is_settled",
    "statistics",
]

SETTLE_NS: Final = 2_000_000_000
"""A file is remembered only once its mtime and ctime are this much older (ns)
than its hashing: coarser than any file system's timestamps (FAT: 2 s)."""

MAX_ENTRIES: Final = 1_000_000

_CHUNK: Final = 1 << 20
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)

_Key = tuple[int, int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns, mode

_known: dict[tuple[int, int], tuple[_Key, str]] = {}
_reading: dict[tuple[int, int], threading.Event] = {}  # inodes being read now
_lock = threading.Lock()
_counts = {"hashed": 0, "bytes": 0, "remembered": 0, "stored": 0, "copied": 0}


def _key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def is_settled(st: os.stat_result, hashed_at: int) -> bool:
    """Whether a regular file with stat data ``st``, hashed at ``hashed_at``
    (``time.time_ns()``), had settled: its mtime and ctime are at least
    :data:`SETTLE_NS` older, so a later write cannot leave them unchanged."""
    settled = hashed_at - SETTLE_NS
    return stat.S_ISREG(st.st_mode) and st.st_mtime_ns < settled and st.st_ctime_ns < settled


def file_digest(path: str) -> str:
    """The hex SHA-256 of the regular file at ``path`` (never following a
    symlink); read from the cache while the file's stat data is unchanged. Threads
    asking for one file at once read it once: the others wait for that read."""
    return hash_file(path)[0]


def hash_file(path: str, *, sealed: bool = False) -> tuple[str, os.stat_result, bool]:
    """:func:`file_digest`, with the ``fstat`` of the file it describes and
    whether the digest may be kept for later (``sealed``, or the file had
    settled when it was read; a digest from this process's memory was). With
    ``sealed`` (a file of a committed snapshot, never written again) it is
    remembered whatever its age."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        st = os.fstat(fd)
        key = _key(st)
        inode = (st.st_dev, st.st_ino)
        while True:
            with _lock:
                known = _known.get(inode)
                if known is not None and known[0] == key:
                    _counts["remembered"] += 1
                    return known[1], st, True
                reading = _reading.get(inode)
                if reading is None:
                    _reading[inode] = threading.Event()
                    break
            reading.wait()  # another thread is reading it: its digest, then
        try:
            hashed_at = time.time_ns()
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "rb") as f:
                fd = -1
                while chunk := f.read(_CHUNK):
                    size += len(chunk)
                    h.update(chunk)
            digest = h.hexdigest()
            keep = (sealed and stat.S_ISREG(st.st_mode)) or is_settled(st, hashed_at)
            with _lock:
                _counts["hashed"] += 1
                _counts["bytes"] += size
                if keep:
                    if len(_known) >= MAX_ENTRIES:
                        _known.clear()
                    _known[inode] = (key, digest)
        finally:
            with _lock:
                _reading.pop(inode).set()
    finally:
        if fd >= 0:
            os.close(fd)
    return digest, st, keep


def copy_hashing(src: str, dst: str) -> str:
    """Copy the regular file ``src`` to the new file ``dst`` (which must not
    exist; never following a symlink) and return the hex SHA-256 of the bytes
    copied: a snapshot made from host files knows its files' digests without
    reading them again. Copies the mode and times as ``shutil.copy2`` does;
    counted as ``copied`` bytes, not as reads."""
    h = hashlib.sha256()
    size = 0
    # Non-blocking: a FIFO put in the file's place since it was listed must not
    # hang the copy (it is refused below, as a symlink is by O_NOFOLLOW).
    fd_in = os.open(src, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd_in).st_mode):
            raise OSError(f"{src!r} is no longer a regular file")
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        try:
            while chunk := os.read(fd_in, _CHUNK):
                size += len(chunk)
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd_out, view):]
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    shutil.copystat(src, dst, follow_symlinks=False)
    with _lock:
        _counts["copied"] += size
    return h.hexdigest()


def count_stored(n: int = 1) -> None:
    """Count ``n`` digests served from a stored table
    (:mod:`solver.worker._digesttables`) without opening the file."""
    with _lock:
        _counts["stored"] += n


def statistics() -> dict[str, int]:
    """``hashed`` (files read), ``bytes`` (bytes read to hash them),
    ``remembered`` (digests served from this process's memory), ``stored``
    (digests served from a snapshot's or a local source's stored table),
    ``copied`` (bytes hashed while copying host files into a snapshot, read once
    for both) and ``entries`` (files remembered in memory now), since the
    process started or :func:`clear`."""
    with _lock:
        return {**_counts, "entries": len(_known)}


def clear() -> None:
    """Forget every digest and reset the counts (for tests and benchmarks)."""
    with _lock:
        _known.clear()
        for name in _counts:
            _counts[name] = 0
