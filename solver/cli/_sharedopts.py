"""``--shared-cache URL`` on ``solver build``, ``du`` and ``prune``.

The URL is a ``postgresql://`` URL (``docs/shared-cache.md``); ``SOLVER_SHARED_CACHE``
gives it when the flag is not given (an empty value: none). Two query parameters
are the solver's, removed before the URL reaches libpq: ``mode=ro`` (read only:
for untrusted builds) and ``strict=true`` (a server fault fails the build instead
of a warning). Wherever a URL is shown, its password is ``***``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TextIO

# The shared cache's modules (and psycopg) are imported only when a URL is given.
if TYPE_CHECKING:
    from ..bridge import SharedCache
    from ..cache import SharedPruneReport, SharedUsage
    from ..worker import Worker

__all__ = [
    "ENV_SHARED_CACHE",
    "add_shared_cache_argument",
    "attached_shared_cache",
    "prune_shared",
    "shared_cache_spec",
    "shared_usage",
]

ENV_SHARED_CACHE = "SOLVER_SHARED_CACHE"

_HELP = (
    "a shared cache on PostgreSQL behind the local cache: postgresql://[user@]host/db"
    "[?mode=ro][&strict=true] (default: $SOLVER_SHARED_CACHE); see docs/shared-cache.md"
)


def _spec_arg(text: str) -> str:
    from ..bridge import parse_shared_cache_url
    from ..cache import redact_url

    try:
        parse_shared_cache_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{redact_url(text)}: {exc}") from None
    return text


def add_shared_cache_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--shared-cache URL`` to ``parser``."""
    parser.add_argument("--shared-cache", type=_spec_arg, default=None, metavar="URL",
                        help=_HELP)


def shared_cache_spec(args: argparse.Namespace) -> str | None:
    """The shared cache URL of a command: ``--shared-cache``, else
    ``$SOLVER_SHARED_CACHE``; ``ValueError`` (its text redacted) for a bad one."""
    spec: str | None = getattr(args, "shared_cache", None)
    if spec is None:
        spec = os.environ.get(ENV_SHARED_CACHE) or None
        if spec is not None:
            from ..bridge import parse_shared_cache_url
            from ..cache import redact_url

            try:
                parse_shared_cache_url(spec)
            except ValueError as exc:
                raise ValueError(f"${ENV_SHARED_CACHE}={redact_url(spec)}: {exc}") from None
    return spec


@contextlib.asynccontextmanager
async def attached_shared_cache(
    worker: Worker, spec: str | None, out: TextIO
) -> AsyncIterator[SharedCache | None]:
    """The shared cache ``spec`` attached to ``worker`` for the body (``None`` when
    there is none); a line on ``out`` says what it did at the end."""
    if spec is None:
        yield None
        return
    from ..bridge import SharedCache, parse_shared_cache_url

    url, mode, strict = parse_shared_cache_url(spec)
    async with SharedCache(url, mode=mode, strict=strict) as shared:
        shared.attach(worker)
        try:
            yield shared
        finally:
            st = shared.stats()
            state = "" if shared.available else " (unreachable: built locally)"
            refused = f", {st.refused} refused" if st.refused else ""
            out.write(
                f"shared cache {shared.display}{state}: {st.restored} from the shared "
                f"cache, {st.executed} run here, {st.published} published{refused}\n"
            )


async def shared_usage(spec: str) -> tuple[str, SharedUsage]:
    """(the redacted URL, what the shared store holds)."""
    from ..bridge import parse_shared_cache_url
    from ..cache import PostgresCacheStore

    url, _, _ = parse_shared_cache_url(spec)
    store = PostgresCacheStore(url, read_only=True)
    try:
        await store.open()
        return store.display, await store.usage()
    finally:
        await store.close()


async def prune_shared(
    spec: str, *, keep_duration: float, max_used_space: int
) -> tuple[str, SharedPruneReport]:
    """Prune the shared store (see :meth:`PostgresCacheStore.prune`)."""
    from ..bridge import parse_shared_cache_url
    from ..cache import PostgresCacheStore

    url, mode, _ = parse_shared_cache_url(spec)
    store = PostgresCacheStore(url, read_only=mode == "ro")
    try:
        await store.open()
        return store.display, await store.prune(
            keep_duration=keep_duration, max_used_space=max_used_space
        )
    finally:
        await store.close()
