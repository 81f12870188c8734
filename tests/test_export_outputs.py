"""Exports of the built-in worker (``solver/worker/_export.py``): the modes both
output types give a tree, and exporting into a directory an earlier export wrote
(its manifest, what is refused, symlinks in the destination, interruptions)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from solver import SolveError
from solver.worker import SnapshotRef, SnapshotStore, _export
from solver.worker._export import MANIFEST_NAME, export_parts_to_dir, export_to_dir, export_to_tar

pytestmark = pytest.mark.anyio

File = str | tuple[str, int]  # text, or (text, mode)


async def snapshot(
    store: SnapshotStore,
    files: dict[str, File],
    *,
    dirs: dict[str, int] | None = None,
    links: dict[str, str] | None = None,
) -> SnapshotRef:
    """Commit a snapshot holding ``files`` (path -> text or (text, mode)),
    directories ``dirs`` (path -> mode) and symlinks ``links`` (path -> target)."""
    async with await store.new_mutable() as m:
        for rel, mode in (dirs or {}).items():
            (m.path / rel).mkdir(parents=True, exist_ok=True)
            os.chmod(m.path / rel, mode)
        for rel, spec in files.items():
            text, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
            path = m.path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            os.chmod(path, mode)
        for rel, target in (links or {}).items():
            (m.path / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, m.path / rel)
        return await m.commit()


def listing(root: Path) -> dict[str, str]:
    """rel -> ``"dir"``, ``"-> TARGET"`` or the file's text, below ``root``, never
    following a symlink; the manifest left out."""
    out: dict[str, str] = {}

    def visit(directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_symlink():
                out[rel] = "-> " + os.readlink(entry.path)
            elif entry.is_dir():
                out[rel] = "dir"
                visit(Path(entry.path), rel + "/")
            else:
                out[rel] = Path(entry.path).read_text()

    visit(root, "")
    out.pop(MANIFEST_NAME, None)
    return out


def manifest(dest: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((dest / MANIFEST_NAME).read_text())
    return doc


# -- modes: one tree, the same modes, whichever output type ------------------------------


async def test_tar_and_directory_exports_give_every_entry_the_same_mode(tmp_path: Path) -> None:
    async with SnapshotStore(tmp_path / "snapshots") as store:
        ref = await snapshot(
            store,
            {
                "plain.txt": ("p", 0o644),
                "tool": ("#!/bin/sh\n", 0o755),
                "private": ("s", 0o600),
                "bin/run": ("r", 0o750),
                "locked/inner.txt": ("i", 0o640),
            },
            dirs={"bin": 0o755, "locked": 0o700, "empty": 0o750},
            links={"bin/link": "run"},
        )
        try:
            # the store seals the tree read-only: the exports must not copy that
            assert stat.S_IMODE(os.lstat(ref.sys.path / "plain.txt").st_mode) == 0o444
            out = await export_to_dir(ref, tmp_path / "out")
            await export_to_tar(ref, tmp_path / "out.tar")
        finally:
            await ref.release()
    with tarfile.open(tmp_path / "out.tar") as tar:
        from_tar = {m.name: stat.S_IMODE(m.mode) for m in tar.getmembers()}
    from_dir = {
        rel: stat.S_IMODE(os.lstat(out / rel).st_mode) for rel in listing(out)
    }
    assert from_tar == from_dir  # entry by entry, and the same entries
    assert {rel: mode for rel, mode in from_dir.items() if rel != "bin/link"} == {
        "bin": 0o755,
        "bin/run": 0o750,
        "empty": 0o750,
        "locked": 0o700,
        "locked/inner.txt": 0o640,
        "plain.txt": 0o644,
        "private": 0o600,
        "tool": 0o755,
    }
    assert _export.exported_mode(0o444) == 0o644
    assert _export.exported_mode(0o555 | stat.S_IFDIR) == 0o755


# -- exporting into the same directory again ---------------------------------------------


async def test_exporting_again_replaces_the_earlier_output_and_removes_what_is_gone(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "out"
    async with SnapshotStore(tmp_path / "snapshots") as store:
        one = await snapshot(
            store,
            {"a.txt": "one", "gone/deep/x.txt": "x", "keep/y.txt": "y", "becomes-dir": "f"},
            links={"l": "a.txt"},
        )
        two = await snapshot(
            store,
            {"a.txt": "two, longer", "keep/y.txt": "why", "new.txt": "n", "becomes-dir/z": "z",
             "l": "now a file"},
            links={"keep/l": "y.txt"},
        )
        try:
            await export_to_dir(one, dest)
            await export_to_dir(two, dest)  # no flag: it is our own earlier output
            assert listing(dest) == {
                "a.txt": "two, longer",
                "becomes-dir": "dir",
                "becomes-dir/z": "z",
                "keep": "dir",
                "keep/l": "-> y.txt",
                "keep/y.txt": "why",
                "l": "now a file",
                "new.txt": "n",
            }
            doc = manifest(dest)
            assert doc["complete"] is True
            entries = doc["entries"]
            assert isinstance(entries, dict)
            assert sorted(entries) == sorted(listing(dest))
            assert entries["keep/l"] == {"type": "symlink", "target": "y.txt"}
            assert entries["keep"] == {"type": "dir"}
            st = os.lstat(dest / "a.txt")
            src = os.lstat(two.sys.path / "a.txt")  # type: ignore[attr-defined]
            assert entries["a.txt"] == {
                "type": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                # the snapshot file it was copied from, to leave it alone next time
                "source": [src.st_dev, src.st_ino, src.st_ctime_ns, src.st_size,
                           src.st_mtime_ns],
                "source_path": str(two.sys.path / "a.txt"),  # type: ignore[attr-defined]
            }
            await export_to_dir(one, dest)  # and back
            assert listing(dest) == {
                "a.txt": "one",
                "becomes-dir": "f",
                "gone": "dir",
                "gone/deep": "dir",
                "gone/deep/x.txt": "x",
                "keep": "dir",
                "keep/y.txt": "y",
                "l": "-> a.txt",
            }
        finally:
            await one.release()
            await two.release()


async def test_entries_an_export_did_not_write_are_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "out"
    async with SnapshotStore(tmp_path / "snapshots") as store:
        one = await snapshot(store, {"a.txt": "one", "sub/b.txt": "b"})
        two = await snapshot(store, {"a.txt": "two", "c.txt": "c"})
        try:
            await export_to_dir(one, dest)
            (dest / "mine.txt").write_text("my notes")
            (dest / "sub" / "mine").mkdir()
            (dest / "sub" / "mine" / "deep.txt").write_text("deep")
            before = listing(dest)
            with pytest.raises(SolveError) as info:
                await export_to_dir(two, dest)
            message = str(info.value)
            assert "'mine.txt' was not written by an export" in message
            assert "'sub/mine' was not written by an export" in message
            assert "sub/mine/deep.txt" not in message  # its directory is named instead
            assert "overwrite=true" in message
            assert listing(dest) == before  # refused before anything changed

            # a file the export wrote and the user changed since is refused too
            (dest / "mine.txt").unlink()
            shutil.rmtree(dest / "sub" / "mine")
            (dest / "a.txt").write_text("edited by hand")
            before = listing(dest)
            changed = re.escape("'a.txt' was changed after an export wrote it")
            with pytest.raises(SolveError, match=changed):
                await export_to_dir(two, dest)
            assert listing(dest) == before

            # overwrite: what is in the way is replaced, other entries are left alone
            (dest / "mine.txt").write_text("my notes")
            (dest / "sub" / "theirs.txt").write_text("t")
            await export_to_dir(two, dest, overwrite=True)
            assert listing(dest) == {
                "a.txt": "two",
                "c.txt": "c",
                "mine.txt": "my notes",
                "sub": "dir",  # ours, but it holds an entry that is not
                "sub/theirs.txt": "t",
            }
            # and they stay the user's: the next export without the flag refuses them
            with pytest.raises(SolveError, match=re.escape("'mine.txt' was not written")):
                await export_to_dir(one, dest)
        finally:
            await one.release()
            await two.release()


async def test_a_directory_without_a_manifest_is_refused_unless_overwrite(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("from an older solver, or the user")
    async with SnapshotStore(tmp_path / "snapshots") as store:
        ref = await snapshot(store, {"a.txt": "a", MANIFEST_NAME: "not ours"})
        plain = await snapshot(store, {"a.txt": "a"})
        try:
            unlisted = re.escape("'old.txt' was not written by an export")
            with pytest.raises(SolveError, match=unlisted):
                await export_to_dir(plain, dest)
            await export_to_dir(plain, dest, overwrite=True)
            assert listing(dest) == {"a.txt": "a", "old.txt": "from an older solver, or the user"}
            # a result may not hold the manifest's name at its top
            with pytest.raises(SolveError, match="name of the export manifest"):
                await export_to_dir(ref, tmp_path / "elsewhere")
            # a manifest that cannot be read protects nothing: refused, naming it
            (dest / MANIFEST_NAME).write_text("{not json")
            with pytest.raises(SolveError, match=r"manifest \.solver-output\.json cannot be used"):
                await export_to_dir(plain, dest)
            (dest / MANIFEST_NAME).unlink()
            os.symlink(tmp_path / "fake.json", dest / MANIFEST_NAME)
            with pytest.raises(SolveError, match="it is a symlink"):
                await export_to_dir(plain, dest)
            await export_to_dir(plain, dest, overwrite=True)
            assert (dest / MANIFEST_NAME).is_file()
            assert not (dest / MANIFEST_NAME).is_symlink()
            assert not (tmp_path / "fake.json").exists()  # replaced the link, not written through
            # an empty directory (say, made by the user beforehand) is fine
            (tmp_path / "empty").mkdir()
            await export_to_dir(plain, tmp_path / "empty")
            assert listing(tmp_path / "empty") == {"a.txt": "a"}
        finally:
            await ref.release()
            await plain.release()


async def test_exporting_again_never_writes_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("precious")
    outside_file = tmp_path / "outside.txt"
    outside_file.write_text("precious too")
    untouched = {"outside": listing(outside), "file": outside_file.read_text()}

    def intact() -> bool:
        return {"outside": listing(outside), "file": outside_file.read_text()} == untouched

    dest = tmp_path / "out"
    async with SnapshotStore(tmp_path / "snapshots") as store:
        # symlinks out of the destination, as a result may hold them
        links = await snapshot(
            store, {"a.txt": "a"}, links={"link": str(outside), "file": str(outside_file)}
        )
        # the same names as a directory and a file
        real = await snapshot(store, {"link/f.txt": "new", "file": "new file", "a.txt": "a"})
        bare = await snapshot(store, {"a.txt": "a"})
        try:
            await export_to_dir(links, dest)
            assert (dest / "link").is_symlink()
            await export_to_dir(real, dest)
            assert intact()
            assert listing(dest) == {
                "a.txt": "a", "file": "new file", "link": "dir", "link/f.txt": "new"
            }
            await export_to_dir(links, dest)  # the directory goes, the link comes back
            assert intact()
            assert listing(dest) == {
                "a.txt": "a", "file": f"-> {outside_file}", "link": f"-> {outside}"
            }
            # Even a manifest that lists a path below the link (hand-edited, say)
            # does not make the removal of what is gone follow it.
            doc = manifest(dest)
            entries = doc["entries"]
            assert isinstance(entries, dict)
            st = os.lstat(outside / "f.txt")
            entries["link/f.txt"] = {"type": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            (dest / MANIFEST_NAME).write_text(json.dumps(doc))
            await export_to_dir(bare, dest)
            assert intact()
            assert listing(dest) == {"a.txt": "a"}

            # a symlink the user put in place of an exported file: refused, and
            # with overwrite the link itself is replaced
            (dest / "a.txt").unlink()
            os.symlink(outside_file, dest / "a.txt")
            with pytest.raises(SolveError, match=re.escape("'a.txt' was changed after an export")):
                await export_to_dir(bare, dest)
            await export_to_dir(bare, dest, overwrite=True)
            assert intact()
            assert listing(dest) == {"a.txt": "a"}
            # the same for a directory the user replaced with a link to a directory
            # that holds a file of the same name as the exported one
            sub = await snapshot(store, {"a.txt": "a", "link/f.txt": "new"})
            try:
                await export_to_dir(sub, dest)
                shutil.rmtree(dest / "link")
                os.symlink(outside, dest / "link")
                with pytest.raises(SolveError, match="'link' was changed after an export"):
                    await export_to_dir(bare, dest)
                with pytest.raises(SolveError, match="'link' was changed after an export"):
                    await export_to_dir(sub, dest)
                assert intact()
                await export_to_dir(sub, dest, overwrite=True)
                assert intact()
                assert listing(dest) == {"a.txt": "a", "link": "dir", "link/f.txt": "new"}
            finally:
                await sub.release()
            # a tar replaces a symlink at its name, too
            os.symlink(outside_file, tmp_path / "t.tar")
            await export_to_tar(bare, tmp_path / "t.tar")
            assert not (tmp_path / "t.tar").is_symlink()
            assert intact()
            # and the destination itself may not be a symlink
            os.symlink(outside, tmp_path / "dest-link")
            with pytest.raises(SolveError, match="is not a directory"):
                await export_to_dir(bare, tmp_path / "dest-link")
            assert intact()
        finally:
            for ref in (links, real, bare):
                await ref.release()


async def test_an_interrupted_export_blocks_no_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out"
    real_put = _export._put
    calls = 0

    def put_then_fail(target: Path, item: _export._Planned, suffix: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_put(target, item, suffix)

    async with SnapshotStore(tmp_path / "snapshots") as store:
        one = await snapshot(store, {"a.txt": "one", "b.txt": "b", "old/x.txt": "x"})
        two = await snapshot(store, {"a.txt": "two", "c.txt": "c", "d/e.txt": "e"})
        try:
            await export_to_dir(one, dest)
            with monkeypatch.context() as patch:
                patch.setattr(_export, "_put", put_then_fail)
                with pytest.raises(SolveError, match="No space left on device"):
                    await export_to_dir(two, dest)
            doc = manifest(dest)
            assert doc["complete"] is False
            suffix = doc["partial_suffix"]
            assert isinstance(suffix, str)
            # what a process killed while writing would leave: a temporary file
            (dest / f".c.txt{suffix}").write_text("half")
            (dest / "d").mkdir()
            (dest / "d" / f".e.txt{suffix}").write_text("half")
            # and a temporary manifest (killed while writing one)
            (dest / f".{MANIFEST_NAME}.0badc0de.solver-partial").write_text("{")
            await export_to_dir(two, dest)  # no flag needed
            assert listing(dest) == {"a.txt": "two", "c.txt": "c", "d": "dir", "d/e.txt": "e"}
            assert manifest(dest)["complete"] is True
        finally:
            await one.release()
            await two.release()


async def test_parts_are_one_export_with_one_manifest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    async with SnapshotStore(tmp_path / "snapshots") as store:
        a = await snapshot(store, {"bin/a": ("a", 0o755)})
        b = await snapshot(store, {"bin/b": "b"})
        try:
            await export_parts_to_dir({"x": a, "y": b, "x.json": b"{}\n"}, dest)
            await export_parts_to_dir({"x": b, "x.json": b"[]\n"}, dest)
            assert listing(dest) == {"x": "dir", "x/bin": "dir", "x/bin/b": "b", "x.json": "[]\n"}
            assert sorted(os.listdir(dest)) == [MANIFEST_NAME, "x", "x.json"]
            assert stat.S_IMODE(os.lstat(dest / "x.json").st_mode) == 0o644
            for bad in ("", "..", "a/b", MANIFEST_NAME):
                with pytest.raises(SolveError, match="not usable as an entry name"):
                    await export_parts_to_dir({bad: a}, dest)
        finally:
            await a.release()
            await b.release()
