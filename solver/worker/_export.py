"""Exporting a built-in worker result: copy a snapshot's files out of the store.

:func:`export_to_dir` copies a snapshot's tree into a directory,
:func:`export_parts_to_dir` copies several snapshots (and small files) into named
entries of one directory, and :func:`export_to_tar` writes a snapshot's tree as a
tar archive (to a file, or to stdout for ``"-"``). They run their file system
work in a worker thread.

One tree, one output, whichever the type. Both output types walk a snapshot with
the same walk (:func:`_output_entries`: depth first, sorted by name in each
directory) and give every entry the permission bits :func:`exported_mode`
computes from the snapshot's: the store seals its snapshots read-only, and an
output gets the owner's write bit back so that it can be edited and removed.
Symlinks stay symlinks (never followed); file contents and modification times
are copied; fifos, sockets and devices (which a committed snapshot cannot hold)
are left out of both.

Exporting into the same directory again. A directory export records what it
wrote in a manifest, :data:`MANIFEST_NAME` (``.solver-output.json``), in the
destination: every entry below it, with its type, and for a file its size and
modification time (nanoseconds) and the snapshot file it was copied from
(``source``: device, inode, ctime, size, mtime; ``source_path``: its path in the
store) and, when the store knows it, the SHA-256 of its bytes (``digest``), for
a symlink its target. The next export into that directory then

* leaves the directory alone when it holds exactly what it would write: every
  entry unchanged since the last export and holding what its new source holds,
  nothing else, and the same modes and directory times (a no-op ``solver build
  --output DIR`` writes nothing); otherwise it skips, one by one, the files that
  are in that state. A file holds what its new source holds when that source is
  the same snapshot file (same ``source``: a committed snapshot's files never
  change), or the same inode as the recorded ``source_path``, which still exists
  (a file hard-linked into a new snapshot: linking changed its ctime), or a file
  with the same size, time and ``digest`` (from the snapshot's digest table,
  :mod:`solver.worker._digesttables`, or hashed then: a read, never a write).
  Device and inode alone are never trusted: a deleted snapshot's inode number
  can be reused, but not while the recorded path still holds it (snapshot ids
  are random, so a path is never reused either);

* replaces the entries the manifest lists, and removes those the new tree no
  longer has;
* refuses, before it changes anything, when the directory holds an entry the
  manifest does not list (the user's own file, or the output of an older version)
  or a listed entry that was changed since (another type, size, modification time
  or link target: the user edited it). The error names the entries. With
  ``overwrite`` such entries are replaced where the new tree has an entry of the
  same name, and left alone otherwise;
* never follows a symlink in the destination: the destination is read with
  ``lstat`` and a walk that does not descend into symlinks, only entries that
  walk found are removed, a symlink in the way is replaced itself, and every file
  and symlink is written to a new temporary sibling (created exclusively) and
  renamed over its name, so that it replaces whatever was there, link or not,
  in one step.

The export is not atomic as a whole, but never leaves a file half written under
its name. While it runs the manifest lists both what the previous export wrote
and every path of the new tree (``"complete": false``, plus the suffix of its
temporary names), so an export that is interrupted leaves a directory the next
export replaces without complaint.

The manifest stays version 1: ``source_path`` and ``digest`` are optional
fields that the previous version ignores (it compares ``source``, which is
always the identity of the file the output now matches), and a manifest
without them is used as that version used it (a linked file is written again).

The caller keeps ownership of every ref: it must hold a live handle while the
export runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import sys
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import anyio

from .._errors import SolveError
from .._result import Result
from ._digesttables import DigestTable
from ._snapshots import SnapshotView

__all__ = [
    "MANIFEST_NAME",
    "export_parts_to_dir",
    "export_to_dir",
    "export_to_tar",
    "exported_mode",
]

#: The manifest a directory export writes in its destination (see the module docs).
MANIFEST_NAME: Final = ".solver-output.json"
_MANIFEST_VERSION: Final = 1
#: Every temporary name an export makes ends with this (after a random token).
_PARTIAL: Final = ".solver-partial"
#: How many offending entries an error names before it just counts the rest.
_SHOWN: Final = 5

_Kind = Literal["file", "dir", "symlink"]
_KINDS: Final[tuple[_Kind, ...]] = ("file", "dir", "symlink")


def exported_mode(mode: int) -> int:
    """The permission bits of an exported entry whose mode in the snapshot is
    ``mode``: the snapshot's bits plus the owner's write bit (the store drops the
    write bits when it seals a snapshot). Directory and tar exports both use this,
    so one tree gets the same modes whichever the output type."""
    return stat.S_IMODE(mode) | stat.S_IWUSR


#: One part of a directory export: its name in the destination (``""``: the
#: destination itself), its source (a snapshot's directory, or a file's bytes)
#: and the digest table of that snapshot (``None`` for bytes).
_Part = tuple[str, Path | bytes, DigestTable | None]


def _digest_table(view: SnapshotView) -> DigestTable | None:
    """The store's digest table of the snapshot ``view`` shows (nothing is read
    until it is used), or ``None`` when the store has none for it."""
    return view._record.store.digest_table(view)


def _view_of(ref: Result) -> SnapshotView:
    view = getattr(ref, "sys", None)
    if not isinstance(view, SnapshotView):
        raise SolveError(
            f"cannot export {ref!r}: it is not a snapshot of the built-in worker "
            f"(its sys is {type(view).__name__}, not SnapshotView)"
        )
    return view


async def export_to_dir(
    ref: Result, dest: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Copy the files of ``ref`` (a snapshot of the built-in worker) into ``dest``.

    ``dest`` is created (with its parents) if missing. An existing ``dest`` may
    hold what an earlier export wrote there (its manifest says so): that is
    replaced, and what the new tree lacks removed. Any other entry, or one changed
    since that export, is refused with :class:`~solver.SolveError` naming it,
    unless ``overwrite`` is true: then entries of the snapshot replace same-named
    entries in ``dest``, and other entries are left alone. See the module docs.
    ``dest`` gets the mode and modification time of the snapshot's root. Returns
    ``dest`` as an absolute path.
    """
    view = _view_of(ref)
    parts: list[_Part] = [("", view.path, _digest_table(view))]
    try:
        return await anyio.to_thread.run_sync(_export_dir, parts, Path(dest), overwrite)
    except OSError as exc:
        raise SolveError(f"exporting snapshot {view.id} to {dest} failed: {exc}") from exc


async def export_parts_to_dir(
    parts: Mapping[str, Result | bytes],
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Export several results into one directory as one export: ``dest/NAME`` is
    the tree of ``parts[NAME]`` (a snapshot of the built-in worker), or a file
    holding those bytes. Names are single path components. ``dest`` itself keeps
    its mode; otherwise as :func:`export_to_dir` (one manifest for everything).
    Returns ``dest`` as an absolute path."""
    layout: list[_Part] = []
    for name, part in parts.items():
        if name in ("", ".", "..", MANIFEST_NAME) or "/" in name or "\0" in name:
            raise SolveError(f"cannot export to {dest}: {name!r} is not usable as an entry name")
        if isinstance(part, bytes):
            layout.append((name, part, None))
        else:
            view = _view_of(part)
            layout.append((name, view.path, _digest_table(view)))
    try:
        return await anyio.to_thread.run_sync(_export_dir, layout, Path(dest), overwrite)
    except OSError as exc:
        raise SolveError(f"exporting to {dest} failed: {exc}") from exc


async def export_to_tar(ref: Result, dest: str | os.PathLike[str]) -> None:
    """Write the files of ``ref`` as an uncompressed tar archive to ``dest``
    (``"-"``: standard output). Entries are in sorted order with paths relative to
    the snapshot root, the modes a directory export gives them, owner ids 0 and no
    owner names, so the same snapshot gives the same archive. An existing file at
    ``dest`` is replaced."""
    view = _view_of(ref)
    src = view.path
    text = os.fspath(dest)
    try:
        if text == "-":
            await anyio.to_thread.run_sync(_tar_to_stdout, src)
        else:
            await anyio.to_thread.run_sync(_tar_to_file, src, Path(text))
    except OSError as exc:
        raise SolveError(f"exporting snapshot {view.id} to {text} failed: {exc}") from exc


# -- walking a tree (in worker threads) ------------------------------------------------


def _kind(mode: int) -> _Kind | None:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return None


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``top`` with its ``lstat``, depth first, sorted by name in
    each directory; paths relative to ``top`` with ``/``. Never descends into a
    symlink."""

    def children(rel: str) -> list[str]:
        with os.scandir(top / rel if rel else top) as it:
            names = sorted((e.name for e in it), reverse=True)
        return [f"{rel}/{name}" if rel else name for name in names]

    stack = children("")
    while stack:
        rel = stack.pop()
        st = os.lstat(top / rel)
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            stack.extend(children(rel))


@dataclass(frozen=True, slots=True)
class _OutEntry:
    """One entry of an exported tree: its path relative to the tree, its path in
    the snapshot, its type and its ``lstat`` in the snapshot."""

    rel: str
    path: str
    kind: _Kind
    st: os.stat_result

    @property
    def mode(self) -> int:
        """The permission bits every output type gives it."""
        return exported_mode(self.st.st_mode)


def _output_entries(src: Path) -> Iterator[_OutEntry]:
    """What an export of ``src`` writes, in order: the one walk both output types
    use."""
    for rel, st in _walk(src):
        kind = _kind(st.st_mode)
        if kind is not None:
            yield _OutEntry(rel, os.path.join(src, rel), kind, st)


# -- tar -------------------------------------------------------------------------------


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_tree(tar: tarfile.TarFile, src: Path) -> None:
    """Add every entry below ``src`` as it is in the store (modes included):
    the snapshot blobs of the local cache (``_cacheblobs``) are written this way,
    and their bytes, so their digests, must not change."""
    for rel, _st in _walk(src):
        tar.add(src / rel, arcname=rel, recursive=False, filter=_normalise)


def _add_output_tree(tar: tarfile.TarFile, src: Path) -> None:
    """Add the entries of an export of ``src`` (:func:`_output_entries`, with
    their exported modes)."""
    for entry in _output_entries(src):
        info = _normalise(tar.gettarinfo(entry.path, arcname=entry.rel))
        info.mode = entry.mode
        if info.isreg():
            with open(entry.path, "rb") as f:
                tar.addfile(info, f)
        else:  # a directory, a symlink, or a second name of a hard-linked file
            tar.addfile(info)


def _tar_to_file(src: Path, dest: Path) -> None:
    dest = dest.absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A new file (O_EXCL, O_NOFOLLOW) renamed over ``dest``: a symlink at either
    # name is replaced, never written through.
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with (
            open(os.open(tmp, flags, 0o666), "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_output_tree(tar, src)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _tar_to_stdout(src: Path) -> None:
    out = sys.stdout.buffer
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_output_tree(tar, src)
    out.flush()


# -- directory -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Planned:
    """An entry the export writes: its type, its source (a path in a snapshot, or
    the bytes of a file) and the source's ``lstat`` (None for bytes); for a file
    of a snapshot, that snapshot's digest table and the file's path in it."""

    kind: _Kind
    src: str | bytes
    st: os.stat_result | None
    table: DigestTable | None = None
    rel: str = ""


class _BadManifest(ValueError):
    """The manifest in the destination cannot be trusted; the message says why."""


@dataclass(frozen=True, slots=True)
class _Manifest:
    entries: dict[str, dict[str, object]]
    partial_suffix: str | None


def _plan(parts: list[_Part]) -> dict[str, _Planned]:
    """Every entry to write, parents before children (``""`` is the destination
    itself, when one part is the whole tree)."""
    new: dict[str, _Planned] = {}
    for name, source, table in parts:
        if isinstance(source, bytes):
            new[name] = _Planned("file", source, None)
            continue
        new[name] = _Planned("dir", os.fspath(source), os.lstat(source))
        for entry in _output_entries(source):
            new[f"{name}/{entry.rel}" if name else entry.rel] = _Planned(
                entry.kind, entry.path, entry.st, table, entry.rel
            )
    return new


def _valid_rel(rel: object) -> bool:
    return (
        isinstance(rel, str)
        and "\0" not in rel
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def _read_manifest(dest: Path) -> _Manifest:
    path = dest / MANIFEST_NAME
    try:
        # O_NOFOLLOW: a symlink in its place is not a manifest, wherever it points
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return _Manifest({}, None)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _BadManifest("it is a symlink") from None
        raise
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _BadManifest("it is not a regular file")
        data = f.read()
    try:
        doc = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise _BadManifest(f"it is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != _MANIFEST_VERSION:
        raise _BadManifest(f"it is not a version {_MANIFEST_VERSION} export manifest")
    entries = doc.get("entries")
    suffix = doc.get("partial_suffix")
    if not isinstance(entries, dict) or not (
        suffix is None
        or (isinstance(suffix, str) and suffix.endswith(_PARTIAL) and "/" not in suffix)
    ):
        raise _BadManifest("it is malformed")
    for rel, rec in entries.items():
        if not _valid_rel(rel) or not isinstance(rec, dict) or rec.get("type") not in _KINDS:
            raise _BadManifest(f"its entry {rel!r} is malformed")
    return _Manifest(entries, suffix)


def _tmp_name(name: str, suffix: str) -> str:
    """The temporary sibling an export writes ``name`` to before renaming it."""
    return f".{name}{suffix}"


def _is_partial(rel: str, suffix: str | None) -> bool:
    """A temporary name of an interrupted export: one its manifest announced, or
    a temporary manifest (at the top, written before any manifest names it)."""
    name = rel.rsplit("/", 1)[-1]
    if suffix is not None and name.endswith(suffix):
        return True
    return (
        rel == name and name.startswith(_tmp_name(MANIFEST_NAME, ".")) and name.endswith(_PARTIAL)
    )


def _unchanged(rec: Mapping[str, object] | None, path: Path, st: os.stat_result) -> bool:
    """Whether the entry at ``path`` is still what manifest record ``rec`` says an
    export wrote there."""
    if rec is None:
        return False
    if rec.get("pending") is True:
        return True  # an interrupted export was replacing it: any state is its doing
    kind = _kind(st.st_mode)
    if kind != rec.get("type"):
        return False
    if kind == "file":
        return rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
    if kind == "symlink":
        return rec.get("target") == os.readlink(path)
    return True


def _source_id(item: _Planned) -> list[int] | None:
    """What identifies the snapshot file an entry is copied from: its device,
    inode, ctime, size and mtime. A committed snapshot's files never change (its
    ctime is the seal's), and a new inode with the same number also has a new
    ctime; ``None`` for bytes and anything but a file. Linking the file into
    another snapshot changes its ctime too: :func:`_same_content` then decides."""
    st = item.st
    if item.kind != "file" or st is None or isinstance(item.src, bytes):
        return None
    return [st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns]


def _same_content(rec: Mapping[str, object], item: _Planned, found: dict[str, str]) -> bool:
    """Whether the file an export wrote (``rec``, unchanged since) holds the bytes
    and modification time of the snapshot file ``item`` would copy, when the
    recorded source identity no longer matches (a hard link into a new snapshot
    changed the ctime, or the new snapshot has a new copy of the same bytes).
    Puts the digest it vouches for in ``found[item.src]``. Either

    * the recorded source file (``source_path``) still exists and is ``item``'s
      inode (same device, inode, size and mtime): a sealed file never changes and
      a snapshot's path is never reused (random ids), so that inode has held those
      bytes since the export copied them, and no other file can have reused its
      number while it exists; or
    * the recorded ``digest`` is the content digest of ``item``'s file, from its
      snapshot's digest table (kept or carried through links by the store), or
      hashed now (a read, never a write) when the table does not know it.
    """
    st = item.st
    if st is None or isinstance(item.src, bytes):
        return False
    if rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
        return False  # the output would get other bytes or another time
    digest = rec.get("digest")
    source, path = rec.get("source"), rec.get("source_path")
    if isinstance(source, list) and len(source) == 5 and isinstance(path, str):
        mine = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if (source[0], source[1], source[3], source[4]) == mine:
            try:
                now = os.lstat(path)
            except (OSError, ValueError):  # gone (or a path no file can have)
                now = None
            if now is not None and stat.S_ISREG(now.st_mode) and (
                now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns
            ) == mine:
                if isinstance(digest, str):
                    found[item.src] = digest
                return True
    if not isinstance(digest, str) or item.table is None:
        return False
    if item.table.file_digest(item.src) != digest:
        return False
    found[item.src] = digest
    return True


def _up_to_date(
    rec: Mapping[str, object] | None,
    item: _Planned,
    st: os.stat_result | None,
    found: dict[str, str],
) -> bool:
    """Whether an entry an export wrote (``rec``, already checked unchanged since,
    now ``st``) is exactly what exporting ``item`` would write again, so that it
    can be left alone: a file with the bytes and time of the snapshot file it
    would be copied from (the same file, or :func:`_same_content`) and the mode
    the export gives it; a directory with its mode and time."""
    if rec is None or st is None or rec.get("pending") is True or item.st is None:
        return False
    if item.kind == "file":
        source = _source_id(item)
        if source is None or not (
            stat.S_ISREG(st.st_mode)
            and stat.S_IMODE(st.st_mode) == exported_mode(item.st.st_mode)
        ):
            return False
        if rec.get("source") == source:
            digest = rec.get("digest")
            if isinstance(digest, str) and isinstance(item.src, str):
                found[item.src] = digest
            return True
        return _same_content(rec, item, found)
    if item.kind == "dir":
        return (
            stat.S_ISDIR(st.st_mode)
            and stat.S_IMODE(st.st_mode) == exported_mode(item.st.st_mode)
            and st.st_mtime_ns == item.st.st_mtime_ns
        )
    return False


def _record(
    path: Path, kind: _Kind, item: _Planned | None = None, digest: str | None = None
) -> dict[str, object]:
    """The manifest record of the entry just written (or left alone) at ``path``;
    for a file copied from a snapshot, where from (``source``, ``source_path``)
    and, when known, the content digest of its bytes."""
    if kind == "file":
        st = os.lstat(path)
        rec: dict[str, object] = {"type": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        source = None if item is None else _source_id(item)
        if source is not None:
            assert item is not None
            assert isinstance(item.src, str)
            rec["source"] = source
            rec["source_path"] = os.path.abspath(item.src)
            if digest is None and item.table is not None and item.st is not None:
                digest = item.table.lookup(item.rel, item.st)
            if digest is not None:
                rec["digest"] = digest
        return rec
    if kind == "symlink":
        return {"type": kind, "target": os.readlink(path)}
    return {"type": kind}


def _new_suffix(taken: Iterable[str]) -> str:
    """A random ``.<token>.solver-partial`` that ends none of the names in
    ``taken`` (so a temporary name never is one the export writes or meets)."""
    while True:
        suffix = f".{secrets.token_hex(4)}{_PARTIAL}"
        if not any(name.endswith(suffix) for name in taken):
            return suffix


def _write_manifest(
    dest: Path, entries: Mapping[str, dict[str, object]], suffix: str, *, complete: bool
) -> None:
    doc: dict[str, object] = {
        "version": _MANIFEST_VERSION,
        "complete": complete,
        "entries": dict(sorted(entries.items())),
    }
    if not complete:
        doc["partial_suffix"] = suffix
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")
    _replace_with(dest / MANIFEST_NAME, suffix, data=data, mode=0o644)


def _replace_with(
    target: Path,
    suffix: str,
    *,
    data: bytes | None = None,
    src: str | None = None,
    link: str | None = None,
    mode: int = 0o644,
    st: os.stat_result | None = None,
) -> None:
    """Put a file (``data``, or the contents of ``src``) or a symlink (``link``)
    at ``target``: written to a new sibling, then renamed over ``target``, which
    replaces a file or a symlink there itself, never what a symlink points at."""
    tmp = target.with_name(_tmp_name(target.name, suffix))
    try:
        if link is not None:
            os.symlink(link, tmp)
        else:
            # O_EXCL (with O_NOFOLLOW): a new file, never one a link points at
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(tmp, flags, 0o600), "wb") as out:
                if data is not None:
                    out.write(data)
                elif src is not None:
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), mode)
                if st is not None:
                    os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _refusal(dest: Path, offending: list[tuple[str, str]]) -> SolveError:
    names = {rel for rel, _ in offending}
    # Name a directory, not everything in it as well.
    top = [(rel, why) for rel, why in offending if rel.rpartition("/")[0] not in names]
    shown = "; ".join(f"{rel!r} {why}" for rel, why in top[:_SHOWN])
    if len(top) > _SHOWN:
        shown += f"; and {len(top) - _SHOWN} more"
    return SolveError(
        f"cannot export to {dest}: it holds entries that an earlier export did not write "
        f"(as recorded in {MANIFEST_NAME}) or that were changed after it did: {shown}. "
        "Remove them, export elsewhere, or use overwrite=true to replace those in the way "
        "of the new files (the others are then left alone)"
    )


def _export_dir(parts: list[_Part], dest: Path, overwrite: bool) -> Path:
    dest = dest.absolute()
    if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
        raise SolveError(f"cannot export to {dest}: it exists and is not a directory")
    new = _plan(parts)
    if MANIFEST_NAME in new:
        raise SolveError(
            f"cannot export to {dest}: the result has an entry {MANIFEST_NAME!r} at its top, "
            "the name of the export manifest"
        )

    # 1. Look, change nothing: what is there, and is it ours (the manifest's)?
    existing: dict[str, os.stat_result] = {}
    manifest = _Manifest({}, None)
    if dest.is_dir():
        existing = {rel: st for rel, st in _walk(dest) if rel != MANIFEST_NAME}
        try:
            manifest = _read_manifest(dest)
        except _BadManifest as exc:
            if existing and not overwrite:
                raise SolveError(
                    f"cannot export to {dest}: its export manifest {MANIFEST_NAME} cannot be "
                    f"used ({exc}), so none of its entries can be replaced safely. Remove "
                    "them, export elsewhere, or use overwrite=true"
                ) from None
    ours: dict[str, dict[str, object]] = {}
    offending: list[tuple[str, str]] = []
    for rel, st in existing.items():
        rec = manifest.entries.get(rel)
        if _is_partial(rel, manifest.partial_suffix) or _unchanged(rec, dest / rel, st):
            kind = _kind(st.st_mode)
            ours[rel] = {"type": kind or "file", "pending": True}
        elif rec is None:
            offending.append((rel, "was not written by an export"))
        else:
            offending.append((rel, "was changed after an export wrote it"))
    if offending and not overwrite:
        raise _refusal(dest, offending)

    # An export of the same snapshot files into an untouched earlier export: every
    # entry is already what it would write, nothing is extra. Leave it alone.
    found: dict[str, str] = {}  # source path -> the digest its output was found to hold
    try:
        done_before = {
            rel for rel, item in new.items()
            if rel and rel in ours
            and _up_to_date(manifest.entries.get(rel), item, existing[rel], found)
        }
        if (
            manifest.partial_suffix is None
            and not offending
            and "" in new
            and set(ours) == done_before == set(new) - {""}
            and _up_to_date({"type": "dir"}, new[""], os.lstat(dest), found)
        ):
            return dest
        return _write_export(dest, new, existing, ours, done_before, found)
    finally:
        # digests the checks hashed are kept for the next export and content key
        for table in {id(t): t for _, _, t in parts if t is not None}.values():
            table.save()


def _write_export(
    dest: Path,
    new: dict[str, _Planned],
    existing: dict[str, os.stat_result],
    ours: dict[str, dict[str, object]],
    done_before: set[str],
    found: dict[str, str],
) -> Path:
    """Steps 2 to 5 of :func:`_export_dir`: write what is not ``done_before``."""
    suffix = _new_suffix([*new, *existing])
    dest.mkdir(parents=True, exist_ok=True)
    # 2. While the export runs, the manifest claims both the old and the new paths
    #    (as "pending": in any state), so an interrupted export blocks no later one.
    pending: dict[str, dict[str, object]] = dict(ours)
    pending.update((rel, {"type": p.kind, "pending": True}) for rel, p in new.items() if rel)
    _write_manifest(dest, pending, suffix, complete=False)

    # 3. Remove what an earlier export wrote and the new tree lacks, children first.
    #    Only entries the walk found (never below a symlink) are candidates.
    for rel in sorted(set(ours) - set(new), reverse=True):
        path = dest / rel
        if stat.S_ISDIR(existing[rel].st_mode):
            try:
                os.rmdir(path)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # it holds entries that are not ours (kept with overwrite): keep it too
        else:
            os.unlink(path)

    # 4. Write, parents first.
    for rel, item in new.items():
        if rel and (rel not in done_before or item.kind != "file"):
            _put(dest / rel, item, suffix)

    # 5. The manifest of what is there now, then directory modes and times (last:
    #    writing into a directory changes its modification time).
    done = {
        rel: _record(
            dest / rel, item.kind, item, found.get(item.src) if isinstance(item.src, str) else None
        )
        for rel, item in new.items() if rel
    }
    _write_manifest(dest, done, suffix, complete=True)
    #    A directory already so (nothing written in it) is left alone.
    for rel, item in reversed(new.items()):
        if item.kind == "dir" and item.st is not None:
            path = dest / rel if rel else dest
            mode = exported_mode(item.st.st_mode)
            now = os.lstat(path)
            if stat.S_IMODE(now.st_mode) != mode:
                os.chmod(path, mode)
            if now.st_mtime_ns != item.st.st_mtime_ns:
                os.utime(path, ns=(item.st.st_atime_ns, item.st.st_mtime_ns))
    return dest


def _put(target: Path, item: _Planned, suffix: str) -> None:
    """Write ``item`` at ``target``, replacing what is there (only the checks of
    :func:`_export_dir` let anything be there that is not ours)."""
    try:
        st: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        st = None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    if item.kind == "dir":
        if is_dir:
            return  # its mode is set at the end
        if st is not None:
            os.unlink(target)  # a file, or a symlink: the link itself, not its target
        os.mkdir(target, 0o700)
        return
    if is_dir:
        # Ours: emptied by step 3. Not ours: overwrite allows replacing it. rmtree
        # does not follow symlinks inside.
        shutil.rmtree(target)
    if item.kind == "symlink":
        assert isinstance(item.src, str)
        _replace_with(target, suffix, link=os.readlink(item.src))
    elif isinstance(item.src, bytes):
        _replace_with(target, suffix, data=item.src, mode=exported_mode(0o644))
    else:
        assert item.st is not None
        _replace_with(target, suffix, src=item.src, mode=exported_mode(item.st.st_mode),
                      st=item.st)
