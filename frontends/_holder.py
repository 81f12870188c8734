"""Holding one lazy result across a frontend boundary, and handing out halves of it.

This is BuildKit's fix "Clone ResultProxy at gateway boundaries" (PR #2929) in
one object. A frontend session (the forwarder's client, the gateway's session)
keeps one :class:`ProxyHolder` per reference it gave the build function. The
holder owns one half of the proxy. Every time the reference is put into the
session's returned result, :meth:`ProxyHolder.hand_out` splits the held half
again: the holder keeps one new half, the result gets the other. So no proxy
object ever appears twice in a result, however many times the build function
used the reference, and the wrapped proxy is released once, after the holder and
every handed-out half have been.

When the session ends, the holder's own half is always released; the halves
handed out are the caller's on success (they are in the result it returns), and
are released by the session on failure (:meth:`ProxyHolder.release_handed`),
because a result that is never returned has nobody else to release it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from solver import CachedResult, ResultProxy, SolveError, split_result_proxy

from ._api import Stat

__all__ = ["ProxyHolder", "read_dir", "read_file", "release_all", "stat_file"]

_log = logging.getLogger("solver")


class ProxyHolder:
    """One reference's share of a lazy result (see the module docstring).

    ``proxy`` is the holder's current half (use it to evaluate or read). All
    methods run on the event loop of the session; ``hand_out`` never awaits, so
    concurrent tasks of one session cannot interleave inside it.
    """

    __slots__ = ("_handed", "_id", "_proxy")

    def __init__(self, proxy: ResultProxy) -> None:
        self._proxy: ResultProxy | None = proxy
        self._id = proxy.id
        self._handed: list[ResultProxy] = []

    @property
    def id(self) -> str:
        """The wrapped proxy's ``id``."""
        return self._id

    @property
    def released(self) -> bool:
        """True once the holder's own half was released."""
        return self._proxy is None

    @property
    def proxy(self) -> ResultProxy:
        """The holder's current half. Raises :class:`~solver.SolveError` after
        :meth:`release`."""
        if self._proxy is None:
            raise SolveError(f"reference to result {self._id} was released")
        return self._proxy

    @property
    def handed(self) -> Sequence[ResultProxy]:
        """The halves handed out so far (and not yet released here)."""
        return tuple(self._handed)

    def hand_out(self) -> ResultProxy:
        """Split the held half: keep one, return the other (remembered in
        :attr:`handed`). O(1)."""
        keep, out = split_result_proxy(self.proxy)
        self._proxy = keep
        self._handed.append(out)
        return out

    def forget_handed(self) -> None:
        """The halves handed out now belong to someone else (the session's result
        was returned)."""
        self._handed.clear()

    async def release(self) -> None:
        """Release the holder's own half; idempotent. Never a cancel point."""
        proxy, self._proxy = self._proxy, None
        if proxy is None:
            await anyio.lowlevel.checkpoint()
            return
        with anyio.CancelScope(shield=True):
            await proxy.release()

    async def release_handed(self) -> None:
        """Release every half handed out and not forgotten (the session failed, so
        its result will never be returned). Never a cancel point."""
        handed, self._handed = self._handed, []
        await release_all(handed)

    def __repr__(self) -> str:
        state = "released" if self._proxy is None else "held"
        return f"<ProxyHolder {self._id} {state} handed={len(self._handed)}>"


async def release_all(handles: Sequence[ResultProxy]) -> None:
    """Release each handle, shielded; log (at ERROR, on ``solver``) and go on when
    one fails, so that one bad handle never leaks the others."""
    with anyio.CancelScope(shield=True):
        for handle in handles:
            try:
                await handle.release()
            except Exception:
                _log.exception("releasing %r failed", handle)
        await anyio.lowlevel.checkpoint()


@runtime_checkable
class _Readable(Protocol):
    """What a result's ``sys`` must offer for its files to be read."""

    async def read_bytes(self, rel: str, offset: int = 0, length: int | None = None) -> bytes: ...

    async def read_dir(self, rel: str = "", pattern: str | None = None) -> list[Stat]: ...

    async def stat(self, rel: str) -> Stat: ...


def _view(value: CachedResult, ref_id: str) -> _Readable:
    view = value.sys
    if not isinstance(view, _Readable):
        raise SolveError(
            f"cannot read files of reference {ref_id}: its result is a "
            f"{type(view).__name__}, not a snapshot of the built-in worker"
        )
    return view


def _read_error(action: str, path: str, ref_id: str, exc: Exception) -> SolveError:
    error = SolveError(f"{action} {path!r} in reference {ref_id}: {exc}")
    error.__cause__ = exc
    return error


async def read_file(
    value: CachedResult, ref_id: str, path: str, offset: int, length: int | None
) -> bytes:
    """``length`` bytes (all by default) of file ``path`` from ``offset`` in
    ``value``; errors become :class:`~solver.SolveError` naming the reference."""
    view = _view(value, ref_id)
    try:
        return await view.read_bytes(path, offset, length)
    except (OSError, ValueError, SolveError) as exc:
        raise _read_error("reading", path, ref_id, exc) from exc


async def read_dir(value: CachedResult, ref_id: str, path: str, pattern: str | None) -> list[Stat]:
    """The entries of directory ``path`` in ``value`` (see ``Reference.read_dir``)."""
    view = _view(value, ref_id)
    try:
        return await view.read_dir(path, pattern)
    except (OSError, ValueError, SolveError) as exc:
        raise _read_error("listing", path, ref_id, exc) from exc


async def stat_file(value: CachedResult, ref_id: str, path: str) -> Stat:
    """The entry ``path`` in ``value`` (see ``Reference.stat_file``)."""
    view = _view(value, ref_id)
    try:
        return await view.stat(path)
    except (OSError, ValueError, SolveError) as exc:
        raise _read_error("reading the status of", path, ref_id, exc) from exc
