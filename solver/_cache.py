"""Cache keys, records and the ``CacheManager`` protocol.

A cache key names "the output ``output`` of an op whose cache digest is ``digest``,
fed by inputs whose keys are ``deps``". A key without deps is a *root key*: its
storage ID is derived from its digest alone (:func:`root_key`). A key with deps has
no intrinsic ID: each cache manager discovers it by following links from the
dependency keys (two builds whose inputs' keys are linked converge on the same
stored ID), or mints a random one when it saves a result. That per-manager ID is
memoized on the key (``CacheKey.ids``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from ._digest import digest_of

if TYPE_CHECKING:
    # type-only: _result names ExportableCacheKey in CachedResult (protocols, no code)
    from ._result import Result

__all__ = [
    "CacheExportOptions",
    "CacheExportResult",
    "CacheExportTarget",
    "CacheInfoLink",
    "CacheLink",
    "CacheKey",
    "CacheKeyWithSelector",
    "CacheExporter",
    "CacheManager",
    "CacheRecord",
    "ExportableCacheKey",
    "root_key",
]

_RANDOM_PREFIX = "random:"


@lru_cache(maxsize=4096)
def root_key(digest: str, output: int) -> str:
    """The storage ID of a key without deps: a digest of ``"<digest>@<output>"``.

    A digest with a ``random:`` prefix names a session-local source; its key keeps
    the prefix so that it can be recognised and never exported. The last 4,096
    are memoized (the engine asks for a root key several times in a row: when it
    queries the cache, names the key and indexes it).
    """
    out = digest_of(f"{digest}@{output}".encode())
    if digest.startswith(_RANDOM_PREFIX):
        return _RANDOM_PREFIX + out.removeprefix("sha256:")
    return out


class CacheKey:
    """A cache key. ``id`` is the root-key ID for keys without deps; for keys with
    deps it is only a label and each manager finds the storage ID through links.

    ``vertex`` is the digest of the vertex that produced the key (for debugging and
    export), ``deps[i]`` the alternative keys of input *i*, each with its selector.

    The root-key ID is computed when ``id`` is first read: the engine makes many
    keys with deps whose label nobody reads.
    """

    __slots__ = ("_id", "deps", "digest", "ids", "index_ids", "linked", "output", "vertex")

    def __init__(
        self,
        digest: str,
        vertex: str,
        output: int,
        deps: list[list[CacheKeyWithSelector]] | None = None,
        *,
        id: str | None = None,
    ) -> None:
        self._id = id
        self.digest = digest
        self.vertex = vertex
        self.output = output
        self.deps: list[list[CacheKeyWithSelector]] = deps if deps is not None else []
        # storage ID of this key in each manager that resolved it, keyed by manager
        self.ids: dict[object, str] = {}
        # IDs of this key in the solver's live edge index (set by the index)
        self.index_ids: Sequence[str | int] = ()
        # the mark of the manager that saved this key and linked every key below
        # it (a save whose deps carry the same manager's current mark need not
        # walk below them; a release installs a new mark, see KeyedCacheManager)
        self.linked: object | None = None

    @property
    def id(self) -> str:
        """The root-key ID (for keys with deps, a label only)."""
        id = self._id
        if id is None:
            id = self._id = root_key(self.digest, self.output)
        return id

    def clone(self) -> CacheKey:
        """A copy with the same ID, digest and manager IDs, and no deps."""
        k = CacheKey(self.digest, self.vertex, self.output, id=self._id)
        k.ids = dict(self.ids)
        return k

    def __repr__(self) -> str:
        return f"CacheKey({self.id[:19]}, digest={self.digest[:19]}, output={self.output})"


@dataclass(frozen=True, slots=True)
class CacheLink:
    """One source of an input of a record: the target's record ``src`` (what its
    ``add`` returned), reached through ``selector``."""

    src: object
    selector: str | None = None


@dataclass(frozen=True, slots=True)
class CacheExportResult:
    """One exported result of a record: ``remote`` (what ``resolve_remote``
    returned, or the result storage's remote), when it was created, and the vertex
    digest and output it came from (for debugging; empty for a record found
    through storage alone)."""

    created_at: float
    remote: object
    vertex: str
    output: int


@runtime_checkable
class CacheExportTarget(Protocol):
    """Receives the records of an export (BuildKit's ``CacheExporterTarget``)."""

    def add(
        self,
        digest: str,
        links: Sequence[Sequence[CacheLink]],
        results: Sequence[CacheExportResult],
    ) -> object | None:
        """Add (or merge into an equal one) the record ``digest`` whose input ``i``
        is any of ``links[i]``, with ``results``; return the target's record, or
        ``None`` if the target does not keep it (a session-local ``random:``
        digest, say). Called inputs first; may be called again for one record."""
        ...


@dataclass(frozen=True, slots=True)
class CacheExportOptions:
    """How to export.

    ``mode``: ``"min"`` exports the result of the key exported and, below it, only
    results that are remotes already; ``"max"`` every result the walk reaches.
    ``resolve_remote(result)`` turns a loaded result (a handle it must not
    release) into a remote, or ``None`` to leave it out; without it only existing
    remotes are exported. ``export_roots`` also exports the results of keys
    without deps (BuildKit leaves them out: a root op is cheap to run again).
    ``ignore_backlinks`` skips step 3 of the walk (other chains to the same key).
    """

    mode: Literal["min", "max"] = "min"
    resolve_remote: Callable[[Result], Awaitable[object | None]] | None = None
    export_roots: bool = False
    ignore_backlinks: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"cache export mode must be 'min' or 'max', not {self.mode!r}")


class CacheExporter(Protocol):
    """What can export the chain of cache records behind a key (BuildKit's
    ``CacheExporter``); see :mod:`solver.cache` (the export walk)."""

    async def export_to(
        self, target: CacheExportTarget, options: CacheExportOptions
    ) -> list[object]:
        """Add the records behind the key to ``target``; return the target's
        records for the key itself (empty if it was not exported)."""
        ...


class ExportableCacheKey:
    """A cache key together with what can export the records behind it.

    ``exporter`` is ``None`` for a key that has no records of its own yet (an
    exporter then walks its deps only)."""

    __slots__ = ("exporter", "key")

    def __init__(self, key: CacheKey, exporter: CacheExporter | None = None) -> None:
        self.key = key
        self.exporter = exporter

    @property
    def id(self) -> str:
        return self.key.id

    @property
    def digest(self) -> str:
        return self.key.digest

    @property
    def output(self) -> int:
        return self.key.output

    def __repr__(self) -> str:
        return f"Exportable{self.key!r}"


@dataclass(frozen=True, slots=True)
class CacheKeyWithSelector:
    """One alternative key of an input, with the selector of the link it takes."""

    key: ExportableCacheKey
    selector: str | None = None


class CacheInfoLink(NamedTuple):
    """The label of a link between two keys: input ``input`` of an op with cache
    digest ``digest`` and output ``output``, reached through ``selector``.

    A named tuple: links are made and hashed on the hot path."""

    input: int
    output: int
    digest: str
    selector: str | None = None


_tuple_new = tuple.__new__


def new_link(input: int, output: int, digest: str, selector: str | None) -> CacheInfoLink:
    """``CacheInfoLink(input, output, digest, selector)``, made without the named
    tuple's Python-level constructor (half the cost; links are made per save and
    per query)."""
    return _tuple_new(CacheInfoLink, (input, output, digest, selector))


@dataclass(slots=True, eq=False)
class CacheRecord:
    """One stored result for a key, in one manager."""

    id: str
    manager: CacheManager
    key: CacheKey
    created_at: float
    priority: int = 0


@runtime_checkable
class CacheManager(Protocol):
    """A cache of results by key.

    ``save`` keeps its own handle (``result.clone()``) until the record is released
    (by a caller, or by the manager itself: a bounded cache evicts) or the manager
    is closed; ``load`` returns a new handle that the caller owns.
    Managers are told apart by ``id``.

    Two optional batched methods, looked up with ``getattr`` (a manager without
    them is called one request at a time, as before): ``query_many(requests)``,
    ``query`` of each ``(deps, input, digest, output)`` in order, which the cached
    path uses for a layer of a graph; and ``save_many(saves)``, ``save`` of each
    ``(key, result, created_at)`` in order, returning the saved keys in order,
    which the cold path uses for the results one pass finished together
    (``KeyedCacheManager`` has both).
    """

    @property
    def id(self) -> str: ...

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        """Keys linked from any of ``deps`` (keys of input ``input``) by an op with
        ``digest``/``output``. With no deps, the root key if it is known. Also links
        every given dep key to every key found, so alternatives stay connected."""
        ...

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        """The stored results of ``key`` whose values still exist."""
        ...

    async def load(self, record: CacheRecord) -> Result:
        """A new handle on the record's result; the caller owns it."""
        ...

    async def save(self, key: CacheKey, result: Result, created_at: float) -> ExportableCacheKey:
        """Store ``result`` under ``key`` (and link the key to its deps)."""
        ...

    async def release(self, result_id: str) -> None:
        """Forget a stored result everywhere, cascading to keys left empty."""
        ...

    async def close(self) -> None:
        """Release every handle the manager holds. Idempotent."""
        ...
