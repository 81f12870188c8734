"""The ``file`` op kind, and the tree helpers every built-in op shares.

Payload (see :mod:`solver.worker.state` for the full reference)::

    {"base": 0 | null,
     "actions": [
        {"action": "mkdir", "path": "a/b", "mode": 493, "parents": false},
        {"action": "mkfile", "path": "a/b/c", "data": "...", "encoding": "utf-8",
         "mode": 420},
        {"action": "copy", "from": 1, "src": "dir", "dest": "out/",
         "include": ["*.py"], "exclude": ["test_*"]},
        {"action": "rm", "path": "a", "allow_not_found": false}]}

The output starts as a copy of input ``base`` (or empty when ``null``) and the
actions are applied in order. Every path is resolved with
:func:`solver.worker._paths.resolve_in` inside the snapshot it refers to.

Cache map: the digest of the canonical payload; an input used only as a copy source
gets a ``selector`` (the digest of its copy selections) and a ``compute_digest``
that hashes exactly the entries those copies take from it, so a change elsewhere
in that input is still a cache hit (BuildKit's content keys). The base input, and
an input that is both base and copy source, take part as a whole.

All file system work runs in worker threads; the mutable snapshot is discarded on
every error and on cancellation.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap, CacheMapDep, ComputeDigest
from .._result import Result
from ..definition import JSONValue, OpContext, OpHistory, OpKindRegistry, canonical_json
from ._digests import file_digest
from ._digesttables import DigestTable
from ._opmemo import OpMemo
from ._paths import check_regular_kind, resolve_in
from ._snapshots import SnapshotRef, SnapshotStore, SnapshotView, UnsafePathError
from ._storelinks import StoreLinks, carry_digests

_log = logging.getLogger("solver")

__all__ = [
    "Entry",
    "copy_entries",
    "decode_data",
    "hash_entries",
    "register_file",
    "select_tree",
    "selection_digest",
    "snapshot_view",
]

_WRITE_BITS: Final = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
DIR_MODE: Final = 0o755
FILE_MODE: Final = 0o644


# -- payload helpers ------------------------------------------------------------------


def _fail(kind: str, where: str, problem: str) -> ValueError:
    return ValueError(f"{kind} payload: {where}: {problem}")


def check_fields(
    kind: str, where: str, obj: object, required: Sequence[str], optional: Sequence[str] = ()
) -> Mapping[str, Any]:
    """``obj`` as a mapping holding ``required`` fields and nothing but ``optional``
    ones besides; ``ValueError`` naming the field otherwise."""
    if not isinstance(obj, Mapping):
        raise _fail(kind, where, f"must be an object, got {type(obj).__name__}")
    for name in required:
        if name not in obj:
            raise _fail(kind, where, f"missing field {name!r}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise _fail(kind, where, f"unknown field(s) {', '.join(map(repr, unknown))}")
    return obj


def check_type(kind: str, where: str, value: object, typ: type, label: str) -> None:
    if typ is int:
        ok = type(value) is int
    else:
        ok = (isinstance(value, typ) and not isinstance(value, bool)) or (
            typ is bool and isinstance(value, bool)
        )
    if not ok:
        raise _fail(kind, where, f"must be {label}, got {value!r}")


def check_globs(kind: str, where: str, value: object) -> None:
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
        isinstance(v, str) for v in value
    ):
        raise _fail(kind, where, f"must be a list of glob strings, got {value!r}")


def check_mode(kind: str, where: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= 0o7777:
        raise _fail(kind, where, f"must be a permission mode between 0 and 0o7777, got {value!r}")


def decode_data(data: str, encoding: str, what: str) -> bytes:
    """The bytes of a payload ``data`` field in ``encoding`` (utf-8 or base64)."""
    if encoding == "utf-8":
        return data.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError(f"{what}: data is not valid base64: {exc}") from None
    raise ValueError(f"{what}: encoding must be 'utf-8' or 'base64', got {encoding!r}")


def snapshot_view(result: Result, what: str) -> SnapshotView:
    """The :class:`SnapshotView` behind an input result, or a clear error."""
    view = result.sys
    if not isinstance(view, SnapshotView):
        raise SolveError(
            f"{what} is not a snapshot of the built-in worker (its sys is "
            f"{type(view).__name__})"
        )
    return view


# -- selecting, hashing and copying trees ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One selected entry: ``rel`` (``/``-separated, relative to the selection's
    top), its real ``path`` and its ``lstat`` mode."""

    rel: str
    path: str
    mode: int


@functools.lru_cache(maxsize=256)
def _glob_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex for a list of ``fnmatch`` patterns (what
    ``fnmatch.fnmatchcase`` would match with any of them)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


_GLOB_CHARS = frozenset("*?[")


@functools.lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a path matches one of ``patterns`` (``fnmatch``, case-sensitive,
    ``*`` also matches ``/``): a pattern without ``*``, ``?`` or ``[`` matches
    exactly itself, so those are a set; the others one regex, cached by the
    globs alone. A content key walks a whole tree against the same patterns, 59
    keys x 130 entries x 20 patterns in one benchmark build, each key's own
    (its unit's name, then ``*.h`` and the textual includes): one regex of all
    20 per key was 59 compilations, 0.6 s of a new process's CPU under the
    profiler (``docs/performance.md``, "Issue 21: the one-change build")."""
    stripped = [p.strip("/") for p in patterns]
    literal = frozenset(p for p in stripped if _GLOB_CHARS.isdisjoint(p))
    globs = tuple(p for p in stripped if not _GLOB_CHARS.isdisjoint(p))
    if not globs:
        return literal.__contains__
    match = _glob_regex(globs).match
    if not literal:
        return lambda rel: match(rel) is not None
    return lambda rel: rel in literal or match(rel) is not None


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    """True if ``rel`` or one of its parent directories matches a pattern
    (``fnmatch``, case-sensitive; ``*`` also matches ``/``)."""
    if not patterns:
        return False
    match = _matcher(tuple(patterns))
    if match(rel):
        return True
    parts = rel.split("/")
    return any(match("/".join(parts[:k])) for k in range(1, len(parts)))


def select_tree(
    top: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    *,
    what: str = "path",
) -> list[Entry]:
    """The entries below directory ``top`` selected by the globs, parents before
    their children, sorted by name within a directory; symlinks are listed, never
    followed. With ``include``, an entry is selected when it or a parent directory
    matches a pattern (directories on the way to a selected entry are listed too);
    an entry is left out when it or a parent matches ``exclude``. Device files,
    FIFOs and sockets raise :class:`UnsafePathError`. Runs in a worker thread."""
    out: list[Entry] = []

    def visit(directory: str, prefix: str) -> bool:
        selected_any = False
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            if exclude and _matches(rel, exclude):
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            check_regular_kind(mode, rel, what)
            wanted = not include or _matches(rel, include)
            if stat.S_ISDIR(mode):
                index = len(out)
                out.append(Entry(rel, entry.path, mode))
                below = visit(entry.path, rel)
                if wanted or below:
                    selected_any = True
                else:
                    del out[index:]
            elif wanted:
                out.append(Entry(rel, entry.path, mode))
                selected_any = True
        return selected_any

    visit(top, "")
    return out


FileDigest = Callable[[str], str]
"""The hex SHA-256 of the regular file at a path: :func:`file_digest`, or a
:meth:`DigestTable.file_digest` of the tree the path is in."""


def digest_of_files(table: DigestTable | None) -> FileDigest:
    """How to hash the files of a tree: through its stored digest table, if any."""
    return file_digest if table is None else table.file_digest


_RECORD_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def entry_record(rel: str, path: str, mode: int, digest: FileDigest = file_digest) -> bytes:
    """The canonical line an entry contributes to a content digest: its path, type,
    permission bits (write bits masked: committing drops them) and its content
    (SHA-256 of a file's bytes, from ``digest``; a symlink's target text)."""
    perm = stat.S_IMODE(mode) & ~0o222
    if stat.S_ISDIR(mode):
        body: list[JSONValue] = [rel, "dir", perm, ""]
    elif stat.S_ISLNK(mode):
        body = [rel, "symlink", 0, os.readlink(path)]
    else:
        body = [rel, "file", perm, digest(path)]
    try:
        # canonical_json's bytes for a flat list of strings and a small integer,
        # without its freezer (80 % of a record's time; a one-change C build
        # makes 3,000 records: docs/performance.md, "Issue 21: the one-change
        # build")
        return _RECORD_ENCODER.encode(body).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # a name with a lone surrogate: canonical_json's error
        return canonical_json(body) + b"\n"


def hash_entries(entries: Sequence[Entry], h: Any, digest: FileDigest = file_digest) -> None:
    """Feed each entry's :func:`entry_record` to the hash object ``h``."""
    for e in entries:
        h.update(entry_record(e.rel, e.path, e.mode, digest))


def _remove(path: str) -> None:
    """Remove whatever is at ``path`` (never following a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _make_writable_tree(path)
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _make_writable_tree(path: str) -> None:
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            os.chmod(sub, stat.S_IMODE(os.lstat(sub).st_mode) | stat.S_IRWXU)


def ensure_dir(path: str, mode: int = DIR_MODE) -> None:
    """Make ``path`` a real directory: keep one, replace anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return
        os.unlink(path)
    os.mkdir(path)
    os.chmod(path, mode | stat.S_IRWXU)


def copy_one(src: str, mode: int, dst: str, links: StoreLinks | None = None) -> None:
    """Copy one entry (not a directory's contents) to ``dst``, replacing what is
    there: a directory becomes a directory (an existing one is kept), a symlink is
    copied as a symlink, a file's bytes and mode are copied (owner write added).

    With ``links`` (``src`` is in a sealed snapshot of the store, ``dst`` in a
    working directory no process sees), a regular file without write bits is
    hard-linked instead, and recorded in ``links`` (for
    :meth:`MutableSnapshot.share_store_files` and the digests the link carries,
    :mod:`solver.worker._storelinks`); where linking fails (another file
    system, too many links) it is copied."""
    if stat.S_ISDIR(mode):
        ensure_dir(dst, stat.S_IMODE(mode))
        return
    _remove(dst)
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
        return
    check_regular_kind(mode, src, "copy source")
    if links is not None and not mode & _WRITE_BITS:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            pass
        else:
            links.record(src, dst, os.lstat(dst))
            return
    shutil.copy2(src, dst, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(mode) | stat.S_IWUSR)


def copy_entries(entries: Sequence[Entry], dest: str, links: StoreLinks | None = None) -> None:
    """Copy selected entries below the real directory ``dest`` (which exists);
    parents come before children, so each parent is a real directory by then.
    ``links``: see :func:`copy_one`."""
    for e in entries:
        copy_one(e.path, e.mode, os.path.join(dest, *e.rel.split("/")), links)


def make_parents(root: str, path: str) -> None:
    """Create the missing directories between ``root`` and ``path``'s parent."""
    parent = os.path.dirname(path)
    rel = os.path.relpath(parent, root)
    if rel == ".":
        return
    here = root
    for part in rel.split(os.sep):
        here = os.path.join(here, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            os.mkdir(here)
            os.chmod(here, DIR_MODE)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise SolveError(f"{os.path.relpath(here, root)!r} is not a directory")


# -- the file op -------------------------------------------------------------------------

_ACTION_FIELDS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "mkdir": (("action", "path"), ("mode", "parents")),
    "mkfile": (("action", "path", "data"), ("encoding", "mode")),
    "copy": (("action", "from", "src", "dest"), ("include", "exclude")),
    "rm": (("action", "path"), ("allow_not_found",)),
}


def validate_file(payload: Mapping[str, JSONValue]) -> None:
    """Check a ``file`` payload; ``ValueError`` naming the field."""
    k = "file"
    check_fields(k, "payload", payload, ("actions",), ("base",))
    base = payload.get("base")
    if base is not None and (type(base) is not int or base < 0):
        raise _fail(k, "base", f"must be an input index (int >= 0) or null, got {base!r}")
    actions = payload["actions"]
    if not isinstance(actions, Sequence) or isinstance(actions, str):
        raise _fail(k, "actions", "must be a list")
    for i, action in enumerate(actions):
        where = f"actions[{i}]"
        if not isinstance(action, Mapping):
            raise _fail(k, where, "must be an object")
        name = action.get("action")
        if name not in _ACTION_FIELDS:
            raise _fail(k, where, f"'action' must be one of {sorted(_ACTION_FIELDS)}, got {name!r}")
        required, optional = _ACTION_FIELDS[str(name)]
        check_fields(k, where, action, required, optional)
        for f in ("path", "src", "dest", "data"):
            if f in action and not isinstance(action[f], str):
                raise _fail(k, f"{where}.{f}", f"must be a string, got {action[f]!r}")
        if "mode" in action:
            check_mode(k, f"{where}.mode", action["mode"])
        for f in ("parents", "allow_not_found"):
            if f in action and not isinstance(action[f], bool):
                raise _fail(k, f"{where}.{f}", f"must be a boolean, got {action[f]!r}")
        for f in ("include", "exclude"):
            if f in action:
                check_globs(k, f"{where}.{f}", action[f])
        if name == "copy":
            src = action["from"]
            if type(src) is not int or src < 0:
                raise _fail(k, f"{where}.from", f"must be an input index (int >= 0), got {src!r}")
        if name == "mkfile":
            decode_data(str(action["data"]), str(action.get("encoding", "utf-8")),
                        f"file payload: {where}")


def _globs(action: Mapping[str, JSONValue], name: str) -> list[str]:
    value = action.get(name) or []
    assert isinstance(value, Sequence)
    return [str(v) for v in value]


def _copy_selection(root: str, action: Mapping[str, JSONValue]) -> tuple[str, list[Entry]]:
    """``(kind, entries)`` a copy action takes from the input at ``root``: kind is
    ``"dir"`` (entries relative to src), ``"file"`` (one entry named after src) or
    ``"missing"``."""
    src = str(action["src"])
    real = resolve_in(root, src, follow_final=True, what="copy source")
    try:
        st = os.lstat(real)
    except (FileNotFoundError, NotADirectoryError):
        return "missing", []
    if stat.S_ISDIR(st.st_mode):
        return "dir", select_tree(real, _globs(action, "include"), _globs(action, "exclude"),
                                  what="copy source")
    check_regular_kind(st.st_mode, src, "copy source")
    name = os.path.basename(real) or "file"
    return "file", [Entry(name, real, st.st_mode)]


def _content_walk(
    root: str,
    actions: Sequence[Mapping[str, JSONValue]],
    digest: FileDigest = file_digest,
    files: dict[str, str] | None = None,
) -> str:
    """The content digest of what the copy ``actions`` take from the input at
    ``root``, in one walk of each selection; when ``files`` is given, each entry
    is also put there, by its path in the input (``src`` for a file,
    ``src/<path below it>`` for a directory's entries) -> the digest of its
    :func:`entry_record` (what the op history keeps to name the files that
    changed, ``docs/explain.md``)."""
    h = hashlib.sha256()
    for action in actions:
        src = str(action["src"])
        try:
            kind, entries = _copy_selection(root, action)
        except (SolveError, OSError) as exc:
            # An unusable source (unsafe, unreadable) is the exec's error to report,
            # with its action named; the key just has to differ from any good one.
            h.update(canonical_json([src, "error", str(exc)]) + b"\n")
            if files is not None:
                files[src] = digest_of(str(exc).encode())
            continue
        h.update(canonical_json([src, kind]) + b"\n")
        if files is None:
            hash_entries(entries, h, digest)
            continue
        top = src.strip("/")
        for e in entries:
            record = entry_record(e.rel, e.path, e.mode, digest)
            h.update(record)
            name = top if kind != "dir" else f"{top}/{e.rel}" if top not in ("", ".") else e.rel
            files[name] = digest_of(record)
        if not entries:
            files[src] = digest_of(kind.encode())
    return "sha256:" + h.hexdigest()


def content_digest_kept(
    root: str,
    actions: Sequence[Mapping[str, JSONValue]],
    table: DigestTable | None,
    files: dict[str, str] | None = None,
) -> str:
    """:func:`_content_walk` of the snapshot at ``root`` through its digest
    ``table`` (files it knows are not read), which is then written if the key
    added digests to it. Runs in a thread."""
    try:
        return _content_walk(root, actions, digest_of_files(table), files)
    finally:
        if table is not None:
            table.save()


def selection_digest(
    root: str, paths: Sequence[str], table: DigestTable | None = None
) -> str:
    """The content digest of sub-paths of the snapshot at ``root`` (each a
    directory, hashed whole, or a file), as a ``copy`` of each would key it: an
    exec mount selector's content key; through the snapshot's digest ``table``
    when given (see :func:`content_digest_kept`). Runs in a thread."""
    return content_digest_kept(root, [{"src": path} for path in paths], table)


def _apply(
    out: str,
    inputs: Sequence[tuple[str, DigestTable | None]],
    actions: Sequence[Mapping[str, JSONValue]],
    table: DigestTable,
) -> StoreLinks:
    """Apply the actions to the working directory ``out``; ``inputs`` are the
    input snapshots' directories and digest tables. Runs in a thread. Returns
    the links made from the input snapshots (see :func:`copy_one`), whose
    digests are carried into ``table``, the new snapshot's."""
    roots = [root for root, _ in inputs]
    links = StoreLinks()
    for i, action in enumerate(actions):
        name = str(action["action"])
        try:
            _apply_one(out, roots, name, action, links)
        except UnsafePathError:
            raise
        except SolveError as exc:
            raise SolveError(f"file op: actions[{i}] ({name}): {exc}") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SolveError(f"file op: actions[{i}] ({name}): {reason}") from exc
    carry_digests(links, out, inputs, table)
    return links


def _apply_one(
    out: str,
    roots: Sequence[str],
    name: str,
    action: Mapping[str, JSONValue],
    links: StoreLinks,
) -> None:
    if name == "mkdir":
        path = str(action["path"])
        real = resolve_in(out, path, what="mkdir path")
        mode = int(action.get("mode", DIR_MODE))  # type: ignore[arg-type]
        exists = os.path.lexists(real)
        if exists:
            if not os.path.isdir(real) or os.path.islink(real):
                raise SolveError(f"{path!r} exists and is not a directory")
            if not action.get("parents", False):
                raise SolveError(f"{path!r} already exists")
            return
        if action.get("parents", False):
            make_parents(out, real)
        elif not os.path.isdir(os.path.dirname(real)):
            raise SolveError(f"parent directory of {path!r} does not exist (set parents)")
        os.mkdir(real)
        os.chmod(real, mode | stat.S_IRWXU)
    elif name == "mkfile":
        path = str(action["path"])
        real = resolve_in(out, path, what="mkfile path")
        if os.path.normpath(real) == os.path.normpath(out):
            raise SolveError("mkfile needs a file path, not the root")
        data = decode_data(str(action["data"]), str(action.get("encoding", "utf-8")), "mkfile")
        mode = int(action.get("mode", FILE_MODE))  # type: ignore[arg-type]
        write_file(out, real, data, mode, path)
    elif name == "rm":
        path = str(action["path"])
        real = resolve_in(out, path, what="rm path")
        if os.path.normpath(real) == os.path.normpath(out):
            raise UnsafePathError(f"rm path {path!r} is refused: it is the root directory")
        if not os.path.lexists(real):
            if action.get("allow_not_found", False):
                return
            raise SolveError(f"{path!r} not found")
        _remove(real)
    elif name == "copy":
        index = int(action["from"])  # type: ignore[arg-type]
        kind, entries = _copy_selection(roots[index], action)
        src, dest = str(action["src"]), str(action["dest"])
        if kind == "missing":
            raise SolveError(f"copy source {src!r} not found in input {index}")
        real_dest = resolve_in(out, dest, follow_final=True, what="copy dest")
        if kind == "dir":
            make_parents(out, os.path.join(real_dest, "x"))
            if os.path.normpath(real_dest) != os.path.normpath(out):
                ensure_dir(real_dest)
            copy_entries(entries, real_dest, links)
            return
        (entry,) = entries
        if dest.endswith("/") or (os.path.isdir(real_dest) and not os.path.islink(real_dest)):
            make_parents(out, os.path.join(real_dest, "x"))
            if os.path.normpath(real_dest) != os.path.normpath(out):
                ensure_dir(real_dest)
            target = os.path.join(real_dest, entry.rel)
        else:
            make_parents(out, real_dest)
            target = real_dest
        copy_one(entry.path, entry.mode, target, links)


def write_file(root: str, real: str, data: bytes, mode: int, path: str) -> None:
    """Write a new regular file at ``real`` (replacing a file or symlink there, never
    writing through one), creating missing parents."""
    make_parents(root, real)
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise SolveError(f"{path!r} is a directory")
        os.unlink(real)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(real, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode | stat.S_IWUSR)
    finally:
        os.close(fd)


FileKeys = tuple[str, tuple[str | None, ...]]
"""A ``file`` op's cache digest, and per input the selector of its copies'
selections (``None``: the input takes part as a whole)."""


def file_keys(payload: Mapping[str, JSONValue], inputs: int) -> FileKeys:
    """The cache digest of a ``file`` op with this payload and number of inputs,
    and each input's selector: the digest of its copy selections, or ``None``
    for the base and an input nothing is copied from (whole)."""
    digest = digest_of(b"solver.worker/file/v1\0" + canonical_json(payload))
    raw = payload.get("actions") or []
    actions = [a for a in raw if isinstance(a, Mapping)] if isinstance(raw, Sequence) else []
    base = payload.get("base")
    selectors: list[str | None] = []
    for i in range(inputs):
        copies = [a for a in actions if a.get("action") == "copy" and a.get("from") == i]
        if (type(base) is int and i == base) or not copies:
            selectors.append(None)
            continue
        selections: list[JSONValue] = [
            [str(a["src"]), _globs(a, "include"), _globs(a, "exclude")] for a in copies
        ]
        selectors.append(digest_of(canonical_json(selections)))
    return digest, tuple(selectors)


class FileOp:
    """The op of one ``file`` vertex."""

    def __init__(
        self,
        ctx: OpContext,
        store: SnapshotStore,
        history: Callable[[], OpHistory | None] | None = None,
        keys: FileKeys | None = None,
    ) -> None:
        self.store = store
        self.history = history
        self.keys = keys  # file_keys(payload, inputs), when already known
        self.payload = ctx.payload
        self.name = ctx.vertex.name
        self.vertex = ctx.vertex.digest
        self.inputs = ctx.inputs
        base = ctx.payload.get("base")
        self.base: int | None = base if type(base) is int else None
        raw = ctx.payload.get("actions") or []
        assert isinstance(raw, Sequence)
        self.actions: list[Mapping[str, JSONValue]] = [a for a in raw if isinstance(a, Mapping)]
        if self.base is not None and self.base >= ctx.inputs:
            raise SolveError(
                f"file op: base is input {self.base}, but the op has {ctx.inputs} input(s)"
            )
        for i, action in enumerate(self.actions):
            if action.get("action") == "copy":
                index = action.get("from")
                if type(index) is not int or index >= ctx.inputs:
                    raise SolveError(
                        f"file op: actions[{i}] copies from input {index}, but the op has "
                        f"{ctx.inputs} input(s)"
                    )

    def _copies(self, index: int) -> list[Mapping[str, JSONValue]]:
        return [a for a in self.actions if a.get("action") == "copy" and a.get("from") == index]

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        keys = self.keys if self.keys is not None else file_keys(self.payload, self.inputs)
        digest, selectors = keys
        deps: list[CacheMapDep] = []
        for i, selector in enumerate(selectors):
            if selector is None:
                deps.append(CacheMapDep())
                continue
            deps.append(CacheMapDep(
                selector=selector, compute_digest=self._content_key(i, self._copies(i))
            ))
        return CacheMap(digest, deps), True

    def _content_key(self, index: int, copies: list[Mapping[str, JSONValue]]) -> ComputeDigest:
        async def compute(result: Result) -> str:
            view = snapshot_view(result, f"input {index} of file op {self.name!r}")
            history = self.history() if self.history is not None else None
            # the op history's list of the files the key covers comes from the
            # same walk: one walk of the selection, not two
            files: dict[str, str] | None = {} if history is not None else None
            digest = await anyio.to_thread.run_sync(
                content_digest_kept,
                os.fspath(view.path),
                copies,
                self.store.digest_table(view),
                files,
            )
            if history is not None and files is not None:
                await self._record_content(history, index, digest, files)
            return digest

        return compute

    async def _record_content(
        self, history: OpHistory, index: int, digest: str, files: dict[str, str]
    ) -> None:
        """Tell the worker's op history which files the content key ``digest`` of
        input ``index`` covers (each with the digest of its entry), so that a
        miss can name the files that changed (``docs/explain.md``)."""
        try:
            slot = f"{digest_of(b'solver.worker/file/v1' + canonical_json(self.payload))}#{index}"
            await history.record_content(self.vertex, index, slot, digest, files)
        except Exception as exc:  # a help for explaining, never worth a failed build
            _log.warning("file op %r: recording its content key's files failed: %s",
                         self.name, exc)

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        views = [snapshot_view(r, f"input {i} of file op {self.name!r}")
                 for i, r in enumerate(inputs)]
        base = inputs[self.base] if self.base is not None else None
        mutable = await self.store.new_mutable(
            {"kind": "file", "vertex": self.vertex, "name": self.name}, base=base
        )
        try:
            sources = [(os.fspath(v.path), self.store.digest_table(v)) for v in views]
            links = await anyio.to_thread.run_sync(
                _apply,
                os.fspath(mutable.path),
                sources,
                self.actions,
                self.store.new_snapshot_table(mutable),
            )
            mutable.share_store_files(links.inodes)
            ref: SnapshotRef = await mutable.commit()
        finally:
            with anyio.CancelScope(shield=True):
                await mutable.discard()
        return [ref]


def register_file(
    registry: OpKindRegistry,
    store: SnapshotStore,
    history: Callable[[], OpHistory | None] | None = None,
) -> None:
    """Register the ``file`` kind, bound to ``store``; ``history()`` (when given)
    is the op history its content keys are recorded in, if any."""
    # The cache digest and selectors, once per op digest (_opmemo).
    memo: OpMemo[FileKeys] = OpMemo(lambda ctx: file_keys(ctx.payload, ctx.inputs))
    registry.register(
        "file", lambda ctx: FileOp(ctx, store, history, memo.get(ctx)), validate=validate_file
    )

