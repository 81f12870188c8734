"""Turning a user path from an op payload into a real path inside one directory.

Every built-in op resolves every path of its payload with :func:`resolve_in` before
it touches the disk. The rules (BuildKit's "scoped" path resolution):

* A path is relative to the directory (the op's *root*: a mutable snapshot's
  working directory, or an input snapshot's directory). A leading ``/`` means the
  root, as inside a container: ``"/etc/x"`` is ``root/etc/x``.
* ``..`` may only climb inside the root: ``"a/../b"`` is fine, ``"../x"`` and
  ``"/../x"`` are refused.
* Existing components are looked at with ``lstat``. A symlink among them (and the
  final component when ``follow_final`` is true) is followed only while its target
  stays inside the root: an absolute target, or a relative one whose ``..`` climbs
  above the root, is refused, as are more than 40 links (a loop).
* An existing final entry that is a device file, FIFO or socket is refused.
* Components that do not exist yet are taken as written (the op creates them).

Refusals raise :class:`~solver.worker.UnsafePathError` (a
:class:`~solver.SolveError`) whose message names the path and the reason. The
functions here are synchronous and do file system work: call them in a worker
thread.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from ._snapshots import UnsafePathError

__all__ = ["check_regular_kind", "resolve_in", "special_kind"]

_MAX_SYMLINKS: Final = 40


def special_kind(mode: int) -> str | None:
    """``"device file"``, ``"FIFO"`` or ``"socket"`` for such a mode, else ``None``."""
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return None


def check_regular_kind(mode: int, path: str, what: str = "path") -> None:
    """Raise :class:`UnsafePathError` if ``mode`` is a device file, FIFO or socket."""
    kind = special_kind(mode)
    if kind is not None:
        raise UnsafePathError(
            f"{what} {path!r} is refused: it is a {kind} (only regular files, "
            "directories and symlinks are allowed)"
        )


def resolve_in(
    root: str | os.PathLike[str],
    path: str,
    *,
    follow_final: bool = False,
    what: str = "path",
) -> str:
    """The real path of ``path`` inside ``root`` (see the module docstring).

    ``what`` names the path in messages (``"mkfile path"``, ``"copy source"``).
    The result is ``root`` itself for ``""``, ``"."`` and ``"/"``.
    """
    top = os.fspath(root)

    def refuse(reason: str) -> UnsafePathError:
        return UnsafePathError(f"{what} {path!r} is refused: {reason}")

    if not isinstance(path, str):
        raise UnsafePathError(f"{what} must be a string, got {type(path).__name__}")
    if "\0" in path:
        raise refuse("it contains a NUL byte")
    pending: list[tuple[str, str | None]] = [
        (part, None) for part in reversed(path.split("/")) if part not in ("", ".")
    ]
    resolved: list[str] = []
    links = 0
    while pending:
        name, via = pending.pop()
        if name == "..":
            if not resolved:
                if via is None:
                    raise refuse("'..' would leave the root directory")
                raise refuse(f"symlink {via} points outside the root directory")
            resolved.pop()
            continue
        last = not pending
        here = os.path.join(top, *resolved, name)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            # Not there (yet): taken as written; the op creates it or fails.
            resolved.append(name)
            continue
        mode = st.st_mode
        if stat.S_ISLNK(mode) and (not last or follow_final):
            links += 1
            target = os.readlink(here)
            link = f"{'/'.join([*resolved, name])!r} -> {target!r}"
            if links > _MAX_SYMLINKS:
                raise refuse(f"too many levels of symbolic links (a loop? at {link})")
            if target.startswith("/"):
                raise refuse(f"symlink {link} points outside the root directory")
            pending.extend((part, link) for part in reversed(target.split("/"))
                           if part not in ("", "."))
            continue
        if last:
            kind = special_kind(mode)
            if kind is not None:
                raise refuse(
                    f"it is a {kind} (only regular files, directories and symlinks "
                    "are allowed)"
                )
        resolved.append(name)
    return os.path.join(top, *resolved)
