"""Content-addressed blobs for a shared cache: the interface a blob store implements.

A blob is a byte string named by its digest (``"sha256:" + 64 hex digits``): the
worker's packed snapshots (:class:`solver.worker.SnapshotBlobCodec`), stored once
however many records name them. The shared cache (``docs/shared-cache.md``) keeps
its action records in PostgreSQL and its blobs behind this small protocol, so that
a blob store on S3 or a file server can replace the PostgreSQL one without touching
the records, the leases or the glue around the worker.

A store never hands out a blob whose bytes do not hash to its name: :meth:`get_many`
hashes what it reads and reports every mismatch as a :class:`BlobDigestError`
instead of writing the file (a torn upload, a disk error, a tampered row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .._errors import SolveError

__all__ = ["BlobDigestError", "BlobStore"]


class BlobDigestError(SolveError):
    """A blob's bytes do not hash to the digest it is stored under; it was refused."""

    def __init__(self, digest: str, actual: str) -> None:
        super().__init__(
            f"blob {digest} does not match its digest (its content hashes to {actual}); refused"
        )
        self.digest = digest
        self.actual = actual


@runtime_checkable
class BlobStore(Protocol):
    """Blobs by digest. Every method is a coroutine; a blob, once put, is whole or
    absent (never half written) and never changes."""

    async def missing(self, digests: Sequence[str]) -> set[str]:
        """The digests of ``digests`` the store does not hold (one round trip)."""
        ...

    async def put(self, digest: str, path: Path) -> None:
        """Store the file at ``path`` as blob ``digest`` (nothing if it is there)."""
        ...

    async def get_many(
        self, digests: Sequence[str], directory: Path
    ) -> tuple[Mapping[str, Path], Sequence[BlobDigestError]]:
        """Write each blob of ``digests`` the store holds to a new file in
        ``directory``: ``(digest -> file, refused)``. A blob whose bytes do not
        match its digest is not written and is reported in ``refused``; an absent
        one is in neither. One round trip per batch the store chooses."""
        ...
