"""Exporting a built-in worker result: copy a snapshot's files out of the store.

:func:`export_to_dir` copies the snapshot's tree into a directory and
:func:`export_to_tar` writes it as a tar archive (to a file, or to stdout for
``"-"``). Both keep symlinks as symlinks (never followed), copy file contents,
modes and modification times, and run their file system work in a worker
thread. The exported files get the owner's write bit back (the store seals its
snapshots read-only), so that the output can be edited and removed.

The caller keeps ownership of ``ref``: it must hold a live handle while the
export runs.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path

import anyio

from .._errors import SolveError
from .._result import Result
from ._snapshots import SnapshotView

__all__ = ["export_to_dir", "export_to_tar"]


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

    ``dest`` is created (with its parents) if missing. An existing non-empty
    ``dest`` is refused with :class:`~solver.SolveError` unless ``overwrite`` is
    true; then entries of the snapshot replace same-named entries in ``dest``, and
    other entries of ``dest`` are left alone. Returns ``dest`` as an absolute path.
    """
    view = _view_of(ref)
    src = view.path
    try:
        return await anyio.to_thread.run_sync(_copy_out, src, Path(dest), overwrite)
    except OSError as exc:
        raise SolveError(f"exporting snapshot {view.id} to {dest} failed: {exc}") from exc


async def export_to_tar(ref: Result, dest: str | os.PathLike[str]) -> None:
    """Write the files of ``ref`` as an uncompressed tar archive to ``dest``
    (``"-"``: standard output). Entries are in sorted order with paths relative to
    the snapshot root, owner ids 0 and no owner names, so the same snapshot gives
    the same archive. An existing file at ``dest`` is replaced."""
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


# -- file system work (in worker threads) -----------------------------------------------


def _add_write(path: Path | str) -> None:
    st = os.lstat(path)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _copy_out(src: Path, dest: Path, overwrite: bool) -> Path:
    dest = dest.absolute()
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise SolveError(f"cannot export to {dest}: it exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise SolveError(
            f"cannot export to {dest}: the directory is not empty (use overwrite to "
            "replace its entries)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[Path, Path]] = [(src, dest)]
    stack: list[tuple[Path, Path]] = [(src, dest)]
    while stack:
        s, d = stack.pop()
        with os.scandir(s) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            target = d / entry.name
            if entry.is_symlink():
                if target.is_symlink() or target.exists():
                    _remove(target)
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir(follow_symlinks=False):
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    _remove(target)
                target.mkdir(exist_ok=True)
                _add_write(target)
                dirs.append((Path(entry.path), target))
                stack.append((Path(entry.path), target))
            elif entry.is_file(follow_symlinks=False):
                if target.is_symlink() or target.exists():
                    _remove(target)
                shutil.copy2(entry.path, target, follow_symlinks=False)
                _add_write(target)
            # other kinds (fifos, sockets, devices) are not exported
    # Directory modes and times last, once nothing more is written into them.
    for s, d in reversed(dirs):
        shutil.copystat(s, d, follow_symlinks=False)
        _add_write(d)
    return dest


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_tree(tar: tarfile.TarFile, src: Path) -> None:
    """Add every entry below ``src``, depth first, sorted by name in each directory."""

    def children(rel: str) -> list[str]:
        with os.scandir(src / rel if rel else src) as it:
            names = sorted((e.name for e in it), reverse=True)
        return [f"{rel}/{name}" if rel else name for name in names]

    stack = children("")
    while stack:
        arc = stack.pop()
        full = src / arc
        tar.add(full, arcname=arc, recursive=False, filter=_normalise)
        if full.is_dir() and not full.is_symlink():
            stack.extend(children(arc))


def _tar_to_file(src: Path, dest: Path) -> None:
    dest = dest.absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_tree(tar, src)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tar_to_stdout(src: Path) -> None:
    out = sys.stdout.buffer
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_tree(tar, src)
    out.flush()
