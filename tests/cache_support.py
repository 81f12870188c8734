"""Test helpers for the cache layer's storages."""

from __future__ import annotations

from typing import Any

from solver.cache._storage import CacheKeyStorage


class CountingStorage:
    """A key storage that counts the calls made to it, by method (``calls``);
    everything else is the inner storage's."""

    def __init__(self, inner: CacheKeyStorage) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def count(self, name: str) -> int:
        return self.calls.get(name, 0)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if not callable(method) or name.startswith("_"):
            return method

        async def counted(*args: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return await method(*args)

        return counted
