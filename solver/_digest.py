"""Content digests: the identity of vertices, ops and cache keys."""

from __future__ import annotations

import hashlib

__all__ = ["digest_of", "is_digest"]

_PREFIX = "sha256:"


def digest_of(data: bytes) -> str:
    """Return ``"sha256:" + hex`` of *data*. Stable across processes and machines."""
    return _PREFIX + hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> bool:
    """Whether *value* is a string of the form ``sha256:<64 hex digits>``."""
    if not isinstance(value, str) or len(value) != 71 or not value.startswith(_PREFIX):
        return False
    try:
        int(value[7:], 16)
    except ValueError:
        return False
    return True
