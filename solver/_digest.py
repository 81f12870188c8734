"""Content digests: the identity of vertices, ops and cache keys."""

from __future__ import annotations

import hashlib

__all__ = ["digest_of"]

_PREFIX = "sha256:"


def digest_of(data: bytes) -> str:
    """Return ``"sha256:" + hex`` of *data*. Stable across processes and machines."""
    return _PREFIX + hashlib.sha256(data).hexdigest()

