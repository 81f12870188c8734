"""Shared fixtures. Async tests are marked ``@pytest.mark.anyio`` and run on both
backends; neither anyio's nor pytest-trio's auto mode is enabled."""

from __future__ import annotations

import pytest

from solver.testing import handle_tracker as handle_tracker


@pytest.fixture(scope="session", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every ``anyio``-marked test runs once on asyncio and once on trio."""
    backend: str = request.param
    return backend
