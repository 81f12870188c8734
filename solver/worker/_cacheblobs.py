"""Snapshots as cache blobs: the built-in worker's codec for the local cache format.

A blob is an uncompressed tar of the snapshot's tree, written the way
:func:`~solver.worker.export_to_tar` writes one (entries depth first in sorted
order, owner ids 0, no owner names, modes and modification times kept), so one
snapshot always gives the same bytes and the same digest. Unpacking extracts the
tar into a new mutable snapshot of the store and commits it.

Extraction trusts nothing in the blob: only regular files, directories, symlinks
and hard links are accepted (anything else fails the unpack), member names may not
be absolute or leave the snapshot, nothing is written through a symlink, and the
setuid/setgid/sticky and group/other write bits are cleared (Python's ``tar``
extraction filter, plus the type check). Symlink targets are kept as they are: a
snapshot may hold a symlink to an absolute path, and :class:`SnapshotView` never
follows one out of the snapshot.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, cast

import anyio.to_thread

from .._errors import SolveError
from ._export import _add_tree
from ._snapshots import SnapshotRef, SnapshotStore, SnapshotView

if TYPE_CHECKING:
    from .._result import Result

__all__ = ["SNAPSHOT_BLOB_MEDIA_TYPE", "SnapshotBlobCodec"]

SNAPSHOT_BLOB_MEDIA_TYPE: Final = "application/vnd.solver-engine.snapshot.v1.tar"
"""The media type of a snapshot blob in a cache index."""


class SnapshotBlobCodec:
    """A :class:`~solver.CacheBlobCodec` for the snapshots of ``store``: packs a
    snapshot into a tar blob and unpacks a blob into a new snapshot of ``store``."""

    __slots__ = ("_store",)

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    def __repr__(self) -> str:
        return f"<SnapshotBlobCodec {self._store.root}>"

    @property
    def media_type(self) -> str:
        """:data:`SNAPSHOT_BLOB_MEDIA_TYPE`."""
        return SNAPSHOT_BLOB_MEDIA_TYPE

    async def pack(self, result: Result, path: Path) -> str | None:
        """Write the snapshot behind ``result`` as a tar at ``path`` (a new file) and
        return its digest; ``None`` for a result that is not a snapshot (of any
        store). The caller keeps ``result`` alive while this runs. O(size of the
        snapshot), in a worker thread."""
        view = result.sys
        if not isinstance(view, SnapshotView):
            return None
        try:
            return await anyio.to_thread.run_sync(_pack, view.path, path)
        except OSError as exc:
            raise SolveError(f"packing snapshot {view.id} into {path} failed: {exc}") from exc

    async def unpack(self, path: Path) -> SnapshotRef:
        """A new snapshot of the store holding the tree of the tar at ``path``; the
        handle is the caller's. :class:`~solver.SolveError` if the tar is not a
        snapshot (see the module docstring); nothing is left behind then."""
        mutable = await self._store.new_mutable(
            {"kind": "cache-import", "name": f"imported {path.name[:12]}"}
        )
        try:
            try:
                await anyio.to_thread.run_sync(_unpack, path, mutable.path)
            except (OSError, tarfile.TarError) as exc:
                raise SolveError(f"unpacking {path} failed: {exc}") from exc
            return await mutable.commit()
        finally:
            await mutable.discard()  # nothing to do once committed


class _HashingWriter:
    """A write-only file object that hashes what goes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self._out.write(data)


def _pack(src: Path, dest: Path) -> str:
    with open(dest, "xb") as f:
        writer = _HashingWriter(f)
        stream = cast(IO[bytes], writer)
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_tree(tar, src)
    return "sha256:" + writer.sha.hexdigest()


_ACCEPTED: Final = (
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
)


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    if member.type not in _ACCEPTED:
        raise SolveError(
            f"{member.name!r} is not a file, directory or link; a snapshot cannot hold it"
        )
    if member.name.strip("/") in ("", "."):
        return None  # the snapshot's root: the store owns its mode
    return tarfile.tar_filter(member, dest)


def _unpack(blob: Path, dest: Path) -> None:
    with tarfile.open(blob, mode="r:") as tar:
        tar.extractall(dest, filter=_member_filter)
