"""The local cache format: a cache exported to a directory, and imported from one.

See ``docs/cache-format.md`` for the format itself. A directory holds::

    DIR/index.json             the records: keys, links, results (versioned JSON)
    DIR/blobs/sha256/<hex>     one file per result, named by the SHA-256 of its bytes

*Export* (:func:`export_local_cache`) walks the exporters of a result's cache keys
(:mod:`solver.cache._export`) into a :class:`LocalCacheTarget`, packing each
exported result into a blob with a :class:`CacheBlobCodec` (the built-in worker's
:class:`~solver.worker.SnapshotBlobCodec` writes a snapshot as a tar), then writes
the index. The index is replaced in one rename, and blobs it does not name are
removed afterwards, so the directory always holds one whole cache.

*Import* (:func:`open_local_cache`) reads the index into an in-memory key storage
and gives a :class:`LocalCacheSource`: a :class:`~solver.KeyedCacheManager` to use
as an extra cache source (``VertexOptions.cache_sources``, or
``SolveRequest(cache_imports=...)``). Nothing is unpacked until the solver loads a
record: then the codec unpacks that one blob (a snapshot in the worker's store),
after checking its digest. A blob missing from the directory is a clean miss (its
records are dropped when the cache is opened, and the step runs); a blob whose
bytes do not match its name fails its load with a warning on the ``solver``
logger, and the solver runs the step instead. A missing or malformed index is a
:class:`CacheImportError`.

Why a normalising key storage. The records of an index are named by
``root_key(op cache digest, output)`` and so are the links between them, as in
BuildKit's cache-chain format: a link says "input ``i`` of the op whose record
digest is ``D``", not the op digest and output separately. A manager looks links
up by the full ``CacheInfoLink(input, output, digest, selector)``, so the imported
storage keeps every link in the root-key form and turns each lookup into that form
(:class:`_ImportedKeyStorage`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._cache import (
    CacheExportOptions,
    CacheExportResult,
    CacheInfoLink,
    CacheKey,
    CacheLink,
    CacheRecord,
    root_key,
)
from .._digest import digest_of
from .._errors import SolveError
from ._export import export_cache
from ._manager import KeyedCacheManager
from ._storage import CacheResult, InMemoryCacheStorage, NotFoundError

if TYPE_CHECKING:
    from .._cache import CacheKeyWithSelector, ExportableCacheKey
    from .._result import CachedResult, Result

__all__ = [
    "INDEX_NAME",
    "INDEX_VERSION",
    "CacheBlob",
    "CacheBlobCodec",
    "CacheExportError",
    "CacheImportError",
    "LocalCacheExport",
    "LocalCacheExportStats",
    "LocalCacheImport",
    "LocalCacheSource",
    "LocalCacheTarget",
    "export_local_cache",
    "open_local_cache",
]

_logger = logging.getLogger("solver")

INDEX_NAME: Final = "index.json"
"""The name of the index file in a cache directory."""

INDEX_VERSION: Final = 1
"""The index format version this library writes and reads."""

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TMP_PREFIX: Final = ".tmp-"


class CacheImportError(SolveError):
    """A cache directory cannot be imported: its index is missing or malformed, or
    a blob does not match its digest."""


class CacheExportError(SolveError):
    """A cache could not be exported to a directory."""


@dataclass(frozen=True, slots=True)
class CacheBlob:
    """A blob of a cache directory: its digest (``sha256:<hex>`` of its bytes),
    size, media type, and the file that holds its bytes now (in the directory it
    was exported to or imported from)."""

    digest: str
    size: int
    media_type: str
    path: Path


@runtime_checkable
class CacheBlobCodec(Protocol):
    """Turns results into blobs and back. The built-in worker's is
    :class:`solver.worker.SnapshotBlobCodec`."""

    @property
    def media_type(self) -> str:
        """The media type of the blobs it writes (recorded in the index)."""
        ...

    async def pack(self, result: Result, path: Path) -> str | None:
        """Write ``result`` as a new file at ``path`` and return the
        ``sha256:<hex>`` digest of the bytes written; or return ``None`` (writing
        nothing) for a result it cannot pack. ``result`` stays the caller's."""
        ...

    async def unpack(self, path: Path) -> Result:
        """A new result (a handle the caller owns) from the blob at ``path``, whose
        digest has been checked."""
        ...


# -- export target ------------------------------------------------------------------


class _Item:
    """One record of the chains being exported."""

    __slots__ = ("children", "digest", "inputs", "results")

    def __init__(self, digest: str, inputs: int) -> None:
        self.digest = digest
        # per input: ordered set of (source item, selector)
        self.inputs: list[dict[tuple[_Item, str | None], None]] = [{} for _ in range(inputs)]
        # blob digest -> result
        self.results: dict[str, CacheExportResult] = {}
        # (input, digest of the child, selector) -> ordered set of child items
        self.children: dict[tuple[int, str, str | None], dict[_Item, None]] = {}


class LocalCacheTarget:
    """A :class:`~solver.cache._export.CacheExportTarget` that builds the records of
    an index, merging repeated adds of one record (BuildKit's cache chains).

    A record without inputs is identified by its digest; a record with inputs by
    its digest and its inputs: an ``add`` whose every input slot reaches an
    existing record with that digest (through a link with the same input and
    selector) merges into it. Results must be :class:`CacheBlob` remotes.
    """

    __slots__ = ("_ids", "_items", "_roots")

    def __init__(self) -> None:
        self._roots: dict[str, _Item] = {}
        self._items: list[_Item] = []
        self._ids: set[int] = set()  # id() of every item (all kept alive in _items)

    def add(
        self,
        digest: str,
        links: Sequence[Sequence[CacheLink]],
        results: Sequence[CacheExportResult],
    ) -> object | None:
        """See :class:`~solver.cache._export.CacheExportTarget`. Session-local
        (``random:``) digests are not kept. O(links + results), plus the
        descendants of a record that an existing record merges into."""
        if digest.startswith("random:"):
            return None
        for r in results:
            if not isinstance(r.remote, CacheBlob):
                raise CacheExportError(
                    f"cannot write a result of {type(r.remote).__name__} to a cache "
                    "directory: a local cache holds blobs"
                )
        if not links:
            item = self._roots.get(digest)
            if item is None:
                item = self._roots[digest] = self._new(digest, 0)
            self._add_results(item, results)
            return item
        sources: list[list[tuple[_Item, str | None]]] = []
        for i, slot in enumerate(links):
            if not slot:
                raise CacheExportError(f"record {digest} has no source for input {i}")
            entries: list[tuple[_Item, str | None]] = []
            for link in slot:
                if not isinstance(link.src, _Item) or id(link.src) not in self._ids:
                    raise CacheExportError(f"record {digest}: a link to another target's record")
                entries.append((link.src, link.selector))
            sources.append(entries)
        item = self._existing(digest, sources)
        if item is None:
            item = self._new(digest, len(links))
            below: set[int] = set()
        else:
            below = self._descendants(item)
        while len(item.inputs) < len(links):
            item.inputs.append({})
        self._add_results(item, results)
        for i, entries in enumerate(sources):
            for src, selector in entries:
                if src is item or id(src) in below:
                    continue  # a link that would make a cycle
                item.inputs[i][(src, selector)] = None
                src.children.setdefault((i, digest, selector), {})[item] = None
        return item

    def _new(self, digest: str, inputs: int) -> _Item:
        item = _Item(digest, inputs)
        self._items.append(item)
        self._ids.add(id(item))
        return item

    def _existing(
        self, digest: str, sources: list[list[tuple[_Item, str | None]]]
    ) -> _Item | None:
        found: dict[_Item, None] | None = None
        for i, entries in enumerate(sources):
            reached: dict[_Item, None] = {}
            for src, selector in entries:
                reached.update(src.children.get((i, digest, selector), {}))
            found = reached if found is None else {c: None for c in found if c in reached}
            if not found:
                return None
        return next(iter(found)) if found else None

    @staticmethod
    def _descendants(item: _Item) -> set[int]:
        seen: set[int] = set()
        stack = [item]
        while stack:
            for children in stack.pop().children.values():
                for child in children:
                    if id(child) not in seen:
                        seen.add(id(child))
                        stack.append(child)
        return seen

    @staticmethod
    def _add_results(item: _Item, results: Sequence[CacheExportResult]) -> None:
        for r in results:
            assert isinstance(r.remote, CacheBlob)
            if r.remote.digest not in item.results:
                item.results[r.remote.digest] = r

    def blobs(self) -> dict[str, CacheBlob]:
        """Every blob a record's result names, by digest."""
        out: dict[str, CacheBlob] = {}
        for item in self._items:
            for r in item.results.values():
                assert isinstance(r.remote, CacheBlob)
                out.setdefault(r.remote.digest, r.remote)
        return out

    def index(self) -> dict[str, Any]:
        """The index document (see ``docs/cache-format.md``): records inputs
        first, each input naming earlier records by position. O(records +
        links)."""
        order = self._topological()
        position = {id(item): n for n, item in enumerate(order)}
        records: list[dict[str, Any]] = []
        for item in order:
            record: dict[str, Any] = {"digest": item.digest}
            if item.inputs:
                record["inputs"] = [
                    [_link_json(position[id(src)], selector) for src, selector in slot]
                    for slot in item.inputs
                ]
            if item.results:
                record["results"] = [
                    {"blob": digest, "created_at": r.created_at}
                    for digest, r in sorted(item.results.items())
                ]
            records.append(record)
        blobs = [
            {"digest": b.digest, "size": b.size, "media_type": b.media_type}
            for _, b in sorted(self.blobs().items())
        ]
        return {"version": INDEX_VERSION, "blobs": blobs, "records": records}

    def _topological(self) -> list[_Item]:
        # Inputs first, without recursion; ties in the order the records were added.
        order: list[_Item] = []
        state: dict[int, bool] = {}  # False: on the stack, True: placed
        for start in self._items:
            if id(start) in state:
                continue
            state[id(start)] = False
            stack = [(start, iter([src for slot in start.inputs for src, _ in slot]))]
            while stack:
                item, pending = stack[-1]
                for src in pending:
                    if id(src) not in state:
                        state[id(src)] = False
                        stack.append((src, iter([s for slot in src.inputs for s, _ in slot])))
                        break
                else:
                    stack.pop()
                    state[id(item)] = True
                    order.append(item)
        return order

    def __len__(self) -> int:
        return len(self._items)


def _link_json(record: int, selector: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"record": record}
    if selector is not None:
        out["selector"] = selector
    return out


# -- export -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalCacheExportStats:
    """What an export wrote: ``records`` and ``results`` in the index, ``blobs``
    it names, how many blobs were ``packed`` from results, ``copied`` from
    another cache directory, or already there (``reused``), and how many blobs
    no longer named were ``removed``."""

    records: int
    results: int
    blobs: int
    packed: int
    copied: int
    reused: int
    removed: int


async def export_local_cache(
    source: CachedResult | Sequence[ExportableCacheKey],
    dest: str | os.PathLike[str],
    codec: CacheBlobCodec,
    *,
    mode: Literal["min", "max"] = "min",
    export_roots: bool = False,
) -> LocalCacheExportStats:
    """Export the cache records behind ``source`` (a result, through its
    ``cache_keys``, or keys) to the directory ``dest``.

    ``mode="min"`` writes the result's own chain: its keys and links down to the
    roots, and its result; ``"max"`` also the result of every intermediate
    record it reaches. Roots' results are written only with ``export_roots``.
    Results are loaded from the caches they are in and packed by ``codec``; a
    result that is gone from its cache is left out. ``dest`` is created if
    missing; an index already there is replaced (in one rename), and blobs it
    named that the new one does not are removed. The caller must keep ``source``
    alive while this runs. Raises :class:`CacheExportError` on a file system error.
    """
    keys = list(source) if isinstance(source, Sequence) else list(source.cache_keys)
    try:
        root = await anyio.to_thread.run_sync(_make_export_dirs, Path(dest))
    except OSError as exc:
        raise CacheExportError(f"cannot export the cache to {dest}: {exc}") from exc
    blob_dir = root / "blobs" / "sha256"
    packer = _Packer(codec, blob_dir)
    target = LocalCacheTarget()
    try:
        await export_cache(
            keys,
            target,
            CacheExportOptions(mode, resolve_remote=packer.pack, export_roots=export_roots),
        )
        index = target.index()
        blobs = target.blobs()
        copied, reused, removed = await anyio.to_thread.run_sync(
            _finish_export, root, index, blobs, packer.written
        )
    except OSError as exc:
        raise CacheExportError(f"exporting the cache to {root} failed: {exc}") from exc
    return LocalCacheExportStats(
        records=len(index["records"]),
        results=sum(len(r.get("results", ())) for r in index["records"]),
        blobs=len(blobs),
        packed=len(packer.written),
        copied=copied,
        reused=reused,
        removed=removed,
    )


class _Packer:
    """``resolve_remote`` of a local export: each result packed once per export."""

    __slots__ = ("_blob_dir", "_codec", "_done", "written")

    def __init__(self, codec: CacheBlobCodec, blob_dir: Path) -> None:
        self._codec = codec
        self._blob_dir = blob_dir
        self._done: dict[str, CacheBlob | None] = {}
        self.written: set[str] = set()

    async def pack(self, result: Result) -> CacheBlob | None:
        if result.id in self._done:
            await anyio.lowlevel.checkpoint()
            return self._done[result.id]
        tmp = self._blob_dir / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            digest = await self._codec.pack(result, tmp)
            blob: CacheBlob | None = None
            if digest is not None:
                if _DIGEST.fullmatch(digest) is None:
                    raise CacheExportError(f"the codec returned {digest!r}, not a sha256 digest")
                final = self._blob_dir / digest.removeprefix("sha256:")
                size = await anyio.to_thread.run_sync(_place_blob, tmp, final)
                blob = CacheBlob(digest, size, self._codec.media_type, final)
                self.written.add(digest)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_unlink_quietly, tmp)
            raise
        self._done[result.id] = blob
        return blob


def _make_export_dirs(dest: Path) -> Path:
    root = dest.absolute()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    return root


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _place_blob(tmp: Path, final: Path) -> int:
    # A blob with that digest has these bytes already (content addressing).
    if final.exists():
        tmp.unlink()
        return final.stat().st_size
    size = tmp.stat().st_size
    os.replace(tmp, final)
    return size


def _finish_export(
    root: Path, index: dict[str, Any], blobs: dict[str, CacheBlob], packed: set[str]
) -> tuple[int, int, int]:
    blob_dir = root / "blobs" / "sha256"
    copied = reused = 0
    for digest, blob in blobs.items():
        final = blob_dir / digest.removeprefix("sha256:")
        if digest in packed:
            continue
        if final.exists():
            reused += 1
            continue
        tmp = blob_dir / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            shutil.copyfile(blob.path, tmp)
            os.replace(tmp, final)
        finally:
            _unlink_quietly(tmp)
        copied += 1
    data = json.dumps(index, indent=1, sort_keys=True).encode() + b"\n"
    tmp = root / f"{_TMP_PREFIX}{INDEX_NAME}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / INDEX_NAME)
    # Blobs the new index does not name (and debris of an interrupted export).
    removed = 0
    keep = {d.removeprefix("sha256:") for d in blobs}
    for entry in os.scandir(blob_dir):
        if entry.name in keep:
            continue
        if entry.name.startswith(_TMP_PREFIX) or re.fullmatch(r"[0-9a-f]{64}", entry.name):
            _unlink_quietly(Path(entry.path))
            removed += 1
    return copied, reused, removed


# -- import -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Record:
    digest: str
    inputs: tuple[tuple[tuple[int, str | None], ...], ...]
    results: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class _Index:
    blobs: dict[str, tuple[int, str]]
    records: tuple[_Record, ...]
    digest: str


class _IndexError(ValueError):
    pass


def _parse_index(data: bytes) -> _Index:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _IndexError(f"it is not JSON ({exc})") from exc
    _fields(doc, "the index", {"version", "blobs", "records"}, {"version", "blobs", "records"})
    version = doc["version"]
    if version != INDEX_VERSION or type(version) is not int:
        raise _IndexError(
            f"it has version {version!r}; this library reads version {INDEX_VERSION}"
        )
    blobs: dict[str, tuple[int, str]] = {}
    if not isinstance(doc["blobs"], list):
        raise _IndexError("'blobs' must be a list")
    for n, b in enumerate(doc["blobs"]):
        where = f"blobs[{n}]"
        _fields(b, where, {"digest", "size", "media_type"}, {"digest", "size", "media_type"})
        digest = _digest_field(b, "digest", where)
        size = b["size"]
        if type(size) is not int or size < 0:
            raise _IndexError(f"{where}.size must be an integer >= 0")
        if not isinstance(b["media_type"], str):
            raise _IndexError(f"{where}.media_type must be a string")
        if digest in blobs:
            raise _IndexError(f"{where}: blob {digest} is listed twice")
        blobs[digest] = (size, b["media_type"])
    if not isinstance(doc["records"], list):
        raise _IndexError("'records' must be a list")
    records: list[_Record] = []
    for n, r in enumerate(doc["records"]):
        where = f"records[{n}]"
        _fields(r, where, {"digest", "inputs", "results"}, {"digest"})
        digest = _digest_field(r, "digest", where)
        inputs: list[tuple[tuple[int, str | None], ...]] = []
        raw_inputs = r.get("inputs", [])
        if not isinstance(raw_inputs, list):
            raise _IndexError(f"{where}.inputs must be a list")
        for i, slot in enumerate(raw_inputs):
            if not isinstance(slot, list) or not slot:
                raise _IndexError(f"{where}.inputs[{i}] must be a non-empty list")
            links: list[tuple[int, str | None]] = []
            for j, link in enumerate(slot):
                at = f"{where}.inputs[{i}][{j}]"
                _fields(link, at, {"record", "selector"}, {"record"})
                src = link["record"]
                if type(src) is not int or not 0 <= src < n:
                    raise _IndexError(
                        f"{at}.record must be the position of an earlier record "
                        f"(0 to {n - 1}), got {src!r}"
                    )
                selector = link.get("selector")
                if selector is not None and not isinstance(selector, str):
                    raise _IndexError(f"{at}.selector must be a string")
                links.append((src, selector))
            inputs.append(tuple(links))
        results: list[tuple[str, float]] = []
        raw_results = r.get("results", [])
        if not isinstance(raw_results, list):
            raise _IndexError(f"{where}.results must be a list")
        for k, res in enumerate(raw_results):
            at = f"{where}.results[{k}]"
            _fields(res, at, {"blob", "created_at"}, {"blob", "created_at"})
            blob = _digest_field(res, "blob", at)
            if blob not in blobs:
                raise _IndexError(f"{at}.blob {blob} is not in 'blobs'")
            created = res["created_at"]
            if type(created) not in (int, float) or not math.isfinite(created):
                raise _IndexError(f"{at}.created_at must be a number")
            results.append((blob, float(created)))
        records.append(_Record(digest, tuple(inputs), tuple(results)))
    return _Index(blobs, tuple(records), digest_of(data))


def _fields(value: object, where: str, allowed: set[str], required: set[str]) -> None:
    if not isinstance(value, dict):
        raise _IndexError(f"{where} must be an object")
    unknown = set(value) - allowed
    if unknown:
        raise _IndexError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
    missing = required - set(value)
    if missing:
        raise _IndexError(f"{where} lacks field(s) {', '.join(sorted(missing))}")


def _digest_field(value: Mapping[str, object], name: str, where: str) -> str:
    digest = value[name]
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise _IndexError(f"{where}.{name} must be 'sha256:' and 64 lowercase hex digits")
    return digest


def _read_cache_dir(src: Path) -> tuple[Path, bytes | None, set[str]]:
    root = src.absolute()
    present: set[str] = set()
    try:
        data = (root / INDEX_NAME).read_bytes()
    except FileNotFoundError:
        return root, None, present
    blob_dir = root / "blobs" / "sha256"
    if blob_dir.is_dir():
        for entry in os.scandir(blob_dir):
            if re.fullmatch(r"[0-9a-f]{64}", entry.name) and entry.is_file():
                present.add("sha256:" + entry.name)
    return root, data, present


def _normalised(link: CacheInfoLink) -> CacheInfoLink:
    return CacheInfoLink(link.input, 0, root_key(link.digest, link.output), link.selector)


class _ImportedKeyStorage:
    """A :class:`~solver.cache._storage.CacheKeyStorage` whose links are kept in
    root-key form (see the module docstring), over an
    :class:`~solver.cache._storage.InMemoryCacheStorage`. Lookups and links added by
    a manager (``query`` links alternatives) are turned into that form."""

    __slots__ = ("_inner", "_raw")

    def __init__(self) -> None:
        self._inner = InMemoryCacheStorage()
        # root_key(D, 0) -> D for every record digest D a link is stored under: the
        # inner storage reports backlinks through root_key(), which we undo
        self._raw: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<_ImportedKeyStorage {self._inner!r}>"

    async def add_record_link(
        self, id: str, input: int, digest: str, selector: str | None, target: str
    ) -> None:
        """Link ``id`` to ``target`` as input ``input`` of the record ``digest``."""
        self._raw[root_key(digest, 0)] = digest
        await self._inner.add_link(id, CacheInfoLink(input, 0, digest, selector), target)

    async def exists(self, id: str) -> bool:
        return await self._inner.exists(id)

    async def walk(self) -> list[str]:
        return await self._inner.walk()

    async def walk_results(self, id: str) -> list[CacheResult]:
        return await self._inner.walk_results(id)

    async def load(self, id: str, result_id: str) -> CacheResult:
        return await self._inner.load(id, result_id)

    async def add_result(self, id: str, result: CacheResult) -> None:
        await self._inner.add_result(id, result)

    async def walk_ids_by_result(self, result_id: str) -> list[str]:
        return await self._inner.walk_ids_by_result(result_id)

    async def release(self, result_id: str) -> None:
        await self._inner.release(result_id)

    async def add_link(self, id: str, link: CacheInfoLink, target: str) -> None:
        norm = _normalised(link)
        self._raw[root_key(norm.digest, 0)] = norm.digest
        await self._inner.add_link(id, norm, target)

    async def walk_links(self, id: str, link: CacheInfoLink) -> list[str]:
        return await self._inner.walk_links(id, _normalised(link))

    async def has_link(self, id: str, link: CacheInfoLink, target: str) -> bool:
        return await self._inner.has_link(id, _normalised(link), target)

    async def walk_backlinks(self, id: str) -> list[tuple[str, CacheInfoLink]]:
        out = []
        for source, link in await self._inner.walk_backlinks(id):
            out.append((source, link._replace(digest=self._raw.get(link.digest, link.digest))))
        return out

    async def close(self) -> None:
        await self._inner.close()


class _BlobResults:
    """The :class:`~solver.cache._storage.ResultStorage` of an imported cache: result
    IDs are blob digests; a load unpacks the blob once (the storage keeps that
    handle until it is closed) and hands out clones."""

    __slots__ = ("_blobs", "_closed", "_codec", "_held", "_locks", "_present", "_root", "unpacked")

    def __init__(
        self,
        root: Path,
        codec: CacheBlobCodec,
        blobs: dict[str, tuple[int, str]],
        present: set[str],
    ) -> None:
        self._root = root
        self._codec = codec
        self._blobs = blobs
        self._present = present
        self._held: dict[str, Result] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._closed = False
        self.unpacked = 0

    def __repr__(self) -> str:
        return f"<_BlobResults {self._root} blobs={len(self._present)} held={len(self._held)}>"

    def _live(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the imported cache is closed")

    def _path(self, digest: str) -> Path:
        return self._root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    async def save(self, result: Result, created_at: float) -> CacheResult:
        """Refused: an imported cache is read-only."""
        raise CacheImportError(f"the cache imported from {self._root} is read-only")

    async def exists(self, result_id: str) -> bool:
        """Whether the blob was in the directory when the cache was opened (and has
        not failed a load since). O(1), never checkpoints."""
        self._live()
        return result_id in self._present

    async def load(self, cache_result: CacheResult) -> Result:
        """A new handle on the blob's result, unpacking it on first use (after
        checking its digest). :class:`NotFoundError` if the blob is not there;
        :class:`CacheImportError` (logged) if it is corrupt or cannot be unpacked."""
        self._live()
        digest = cache_result.id
        if digest not in self._present:
            raise NotFoundError(f"blob {digest} is not in {self._root}")
        lock = self._locks.setdefault(digest, anyio.Lock())
        async with lock:
            self._live()
            held = self._held.get(digest)
            if held is None:
                held = await self._unpack(digest)
                if self._closed:
                    with anyio.CancelScope(shield=True):
                        await held.release()
                    raise anyio.ClosedResourceError("the imported cache is closed")
                self._held[digest] = held
            return held.clone()

    async def _unpack(self, digest: str) -> Result:
        path = self._path(digest)
        try:
            actual = await anyio.to_thread.run_sync(_file_digest, path)
        except OSError as exc:
            self._present.discard(digest)
            raise self._corrupt(digest, f"it cannot be read ({exc})") from exc
        if actual != digest:
            self._present.discard(digest)
            raise self._corrupt(digest, f"its content has digest {actual}")
        try:
            result = await self._codec.unpack(path)
        except Exception as exc:
            self._present.discard(digest)
            raise self._corrupt(digest, f"it cannot be unpacked ({exc})") from exc
        self.unpacked += 1
        return result

    def _corrupt(self, digest: str, why: str) -> CacheImportError:
        message = (
            f"cache import from {self._root}: blob {digest} is corrupt: {why}; "
            "the step that needs it runs instead"
        )
        _logger.warning("%s", message)
        return CacheImportError(message)

    async def load_remote(self, cache_result: CacheResult) -> CacheBlob | None:
        """The blob itself (exporting an imported result copies it; nothing is
        unpacked). O(1)."""
        self._live()
        digest = cache_result.id
        if digest not in self._present:
            return None
        size, media_type = self._blobs[digest]
        return CacheBlob(digest, size, media_type, self._path(digest))

    async def release(self, result_id: str) -> None:
        """Forget the blob (its records are gone) and release its unpacked handle."""
        self._live()
        self._present.discard(result_id)
        held = self._held.pop(result_id, None)
        if held is not None:
            with anyio.CancelScope(shield=True):
                await held.release()

    async def close(self) -> None:
        """Release every unpacked handle once. Idempotent."""
        if self._closed:
            return
        self._closed = True
        held, self._held = self._held, {}
        with anyio.CancelScope(shield=True):
            for result in held.values():
                try:
                    await result.release()
                except Exception:
                    _logger.exception("releasing imported result %s failed", result.id)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class LocalCacheSource(KeyedCacheManager):
    """A cache directory opened for import (:func:`open_local_cache`): a
    :class:`~solver.KeyedCacheManager` to pass as a cache source.

    Once closed it answers queries with nothing and fails loads with
    :class:`~solver.cache._storage.NotFoundError` (a cache miss), so a vertex that
    still lists it as a source goes on working. ``unpacked`` counts the blobs
    unpacked so far; ``src`` is the directory.
    """

    def __init__(self, id: str, src: Path, storage: _ImportedKeyStorage, results: _BlobResults):
        super().__init__(id, storage, results)
        self._src = src
        self._blob_results = results
        self._closed = False

    def __repr__(self) -> str:
        return f"<LocalCacheSource {self._src} id={self.id!r}>"

    @property
    def src(self) -> Path:
        """The cache directory."""
        return self._src

    @property
    def unpacked(self) -> int:
        """How many blobs have been unpacked (loaded) so far."""
        return self._blob_results.unpacked

    async def query(
        self, deps: Sequence[CacheKeyWithSelector], input: int, digest: str, output: int
    ) -> list[CacheKey]:
        """See :meth:`KeyedCacheManager.query`; nothing once closed."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return []
        return await super().query(deps, input, digest, output)

    async def records(self, key: CacheKey) -> list[CacheRecord]:
        """See :meth:`KeyedCacheManager.records`; nothing once closed."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return []
        return await super().records(key)

    async def load(self, record: CacheRecord) -> Result:
        """See :meth:`KeyedCacheManager.load`; a miss once closed."""
        if self._closed:
            raise NotFoundError(f"the cache imported from {self._src} is closed")
        return await super().load(record)

    async def close(self) -> None:
        """Release the unpacked handles (the snapshots stay in the worker's store,
        and in any cache they were copied into). Idempotent."""
        self._closed = True
        await super().close()


async def open_local_cache(
    src: str | os.PathLike[str], codec: CacheBlobCodec, *, id: str | None = None
) -> LocalCacheSource:
    """Open the cache directory ``src`` for import. The caller closes it.

    Reads and checks the index (a missing or malformed one raises
    :class:`CacheImportError`), and drops the records whose blob is missing
    (logged at WARNING: those steps will run). Unpacks nothing. ``id`` defaults
    to one derived from the index's content, so opening the same cache twice as
    sources of one solve uses it once. O(records + links + blobs).
    """
    try:
        root, data, present = await anyio.to_thread.run_sync(_read_cache_dir, Path(src))
    except OSError as exc:
        raise CacheImportError(f"cannot read the cache index in {src}: {exc}") from exc
    if data is None:
        raise CacheImportError(f"no cache to import at {root}: it has no {INDEX_NAME}")
    try:
        index = _parse_index(data)
    except _IndexError as exc:
        raise CacheImportError(f"the cache index {root / INDEX_NAME} is corrupt: {exc}") from exc
    storage = _ImportedKeyStorage()
    ids: list[str] = []
    for record in index.records:
        if not record.inputs:
            rid = record.digest
        else:
            rid = digest_of(
                json.dumps(
                    [record.digest, [[[ids[s], sel] for s, sel in slot] for slot in record.inputs]]
                ).encode()
            )
        ids.append(rid)
        for i, slot in enumerate(record.inputs):
            for s, selector in slot:
                await storage.add_record_link(ids[s], i, record.digest, selector, rid)
        for blob, created_at in record.results:
            await storage.add_result(rid, CacheResult(blob, created_at))
    missing = {b for r in index.records for b, _ in r.results} - present
    if missing:
        _logger.warning(
            "cache import from %s: %d blob(s) named by the index are missing; the steps "
            "that need them will run",
            root,
            len(missing),
        )
    results = _BlobResults(root, codec, index.blobs, present & set(index.blobs))
    manager = LocalCacheSource(id or f"local:{index.digest}", root, storage, results)
    await manager.release_unreferenced()
    return manager


# -- solve requests -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalCacheImport:
    """Import the cache directory ``src`` for one solve
    (``SolveRequest(cache_imports=[LocalCacheImport(src)])``). ``codec`` defaults
    to the solver's built-in worker's."""

    src: str | os.PathLike[str]
    codec: CacheBlobCodec | None = None


@dataclass(frozen=True, slots=True)
class LocalCacheExport:
    """Export the result's cache to the directory ``dest`` after the solve
    (``SolveRequest(cache_exports=[LocalCacheExport(dest, "max")])``); see
    :func:`export_local_cache`. ``codec`` defaults to the solver's built-in
    worker's."""

    dest: str | os.PathLike[str]
    mode: Literal["min", "max"] = "min"
    codec: CacheBlobCodec | None = None
    export_roots: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"cache export mode must be 'min' or 'max', not {self.mode!r}")
