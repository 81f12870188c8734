"""What the file-digest tests share: files aged past the settle time, and a
fresh in-process digest memory for every test."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from solver.worker import _digests

OLD = time.time_ns() - 10 * _digests.SETTLE_NS


def settled(path: Path, text: str) -> None:
    """Write ``path`` and age it past the settle time (mtime; ctime is set by the
    kernel, so :func:`fresh_digests` lets "settled" mean "not in the future")."""
    path.write_text(text)
    os.utime(path, ns=(OLD, OLD))


@pytest.fixture(autouse=True)
def fresh_digests(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with an empty digest memory; ctime cannot be
    set back from user space, so "settled" means "not in the future"."""
    _digests.clear()
    monkeypatch.setattr(_digests, "SETTLE_NS", -(10**18))
    yield
    _digests.clear()
