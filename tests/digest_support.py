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


def past_ctime_of(path: Path) -> None:
    """Return once the file system's clock has moved past ``path``'s ctime, so the
    next change to ``path`` gives it a different ctime (the kernel stamps files
    from a clock that ticks every few milliseconds; a fixed sleep bets on the
    tick): a probe file beside it is written until its ctime is later."""
    probe = path.with_name(path.name + ".clock-probe")
    before = path.stat().st_ctime_ns
    deadline = time.monotonic() + 10
    try:
        while True:
            probe.write_bytes(b"")
            if probe.stat().st_ctime_ns > before:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the ctime clock did not move past {before} in 10 s")
            time.sleep(0.001)
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def fresh_digests(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with an empty digest memory; ctime cannot be
    set back from user space, so "settled" means "not in the future"."""
    _digests.clear()
    monkeypatch.setattr(_digests, "SETTLE_NS", -(10**18))
    yield
    _digests.clear()
