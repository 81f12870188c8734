"""A snapshot never shares an inode with anything outside the store, and committing
one never changes a file outside it (issue 20, point 5).

A process may hard-link a host file, a file of one of its other mounts, or even a
file of a committed snapshot into its output. Committing drops the write bits of
what it seals, and ``chmod`` acts on the inode, not on the name: without care the
host file's mode changes, and the cached snapshot keeps sharing the inode, so a
later edit of the host file silently changes what the cache returns. Likewise a
process that swaps a parent of a nested mount point for a symlink must not make
the exec op move host directories when it collects its mounts."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

import anyio
import pytest

from solver import Definition, JSONValue, SolveError, Solver, node
from solver.testing import HandleTracker
from solver.worker import SnapshotStore, SnapshotView, State, Worker, run

pytestmark = pytest.mark.anyio

ORIGINAL = b"original host bytes\n"
EDITED = b"EDITED!! host bytes\n"  # the same length: an in-place edit


def host_file(tmp_path: Path) -> Path:
    """A 0644 file outside the store, as a user's source file would be."""
    host = tmp_path / "host" / "file.txt"
    host.parent.mkdir()
    host.write_bytes(ORIGINAL)
    os.chmod(host, 0o644)
    return host


def inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def edit_in_place(path: Path) -> None:
    """What an editor that rewrites the file (not a rename) does: same inode."""
    with open(path, "r+b") as f:
        f.write(EDITED)


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def view_of(result: object) -> SnapshotView:
    """The snapshot view of a solve result (its ``ref`` is a shared handle)."""
    view = getattr(getattr(result, "ref", None), "sys", None)
    assert isinstance(view, SnapshotView)
    return view


# -- through exec steps -------------------------------------------------------------------


async def test_hard_link_to_a_host_file_leaves_it_alone_and_keeps_the_cache_intact(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host = host_file(tmp_path)
    before = os.lstat(host)
    counter = tmp_path / "counter"
    step = run(
        sh(f"ln {shlex.quote(str(host))} hard && printf x >> {shlex.quote(str(counter))}"),
        name="link a host file",
    )
    root = tmp_path / "store"
    with anyio.fail_after(30):
        async with Worker(root, sandbox="none") as worker, Solver(worker=worker) as solver:
            async with await solver.solve(step.definition()) as result:
                view = view_of(result)
                assert await view.read_bytes("hard") == ORIGINAL
                copy = view.path / "hard"
                assert inode(copy) != inode(host)
                assert os.lstat(copy).st_nlink == 1
                assert stat.S_IMODE(os.lstat(copy).st_mode) == 0o444
                # the snapshot's file keeps the host file's times, as a copy would
                assert os.lstat(copy).st_mtime_ns == before.st_mtime_ns
            after = os.lstat(host)
            assert stat.S_IMODE(after.st_mode) == 0o644
            assert after.st_nlink == 1
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

            edit_in_place(host)
            async with await solver.solve(step.definition()) as result:
                assert await view_of(result).read_bytes("hard") == ORIGINAL
        # a fully cached rebuild after reopening the store (the persistent cache)
        async with (
            Worker(root, sandbox="none") as worker,
            Solver(worker=worker) as solver,
            await solver.solve(step.definition()) as result,
        ):
            assert await view_of(result).read_bytes("hard") == ORIGINAL
    assert counter.read_text() == "x"  # both rebuilds were cache hits
    assert host.read_bytes() == EDITED
    assert stat.S_IMODE(os.lstat(host).st_mode) == 0o644


async def test_hard_links_into_the_output_from_other_mounts_and_snapshots_are_broken(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    source = State.inline({"a.txt": "input bytes\n"}, mode=0o640)
    root = tmp_path / "store"
    with anyio.fail_after(30):
        async with (
            Worker(root, sandbox="none") as worker,
            Solver(worker=worker) as solver,
            await solver.solve(source.definition()) as src_result,
        ):
            src = view_of(src_result)
            committed = src.path / "a.txt"
            src_before = os.lstat(committed)
            # One link from each kind of neighbour: the read-only mount (a private
            # copy), a writable scratch mount, a writable output mount of the same
            # input, and the committed input snapshot itself, in the store.
            script = (
                "ln ro/a.txt out/from_ro && ln scratch/a.txt out/from_scratch && "
                "ln work/a.txt out/from_work && "
                f"ln {shlex.quote(str(committed))} out/from_store"
            )
            step = node(
                "exec",
                {
                    "args": sh(script),
                    "mounts": [
                        {"input": None, "dest": "out", "output": 0},
                        {"input": 0, "dest": "work", "output": 1},
                        {"input": 0, "dest": "ro", "readonly": True},
                        {"input": 0, "dest": "scratch"},
                    ],
                },
                inputs=[source.output],
            )
            async with (
                await solver.solve(Definition.of(step.output(0))) as out_result,
                await solver.solve(Definition.of(step.output(1))) as work_result,
            ):
                out = view_of(out_result)
                work = view_of(work_result)
                names = ["from_ro", "from_scratch", "from_work", "from_store"]
                assert [st.path for st in await out.walk()] == sorted(names)
                inodes = set()
                for name in names:
                    path = out.path / name
                    assert await out.read_bytes(name) == b"input bytes\n", name
                    st = os.lstat(path)
                    assert st.st_nlink == 1, name
                    assert stat.S_IMODE(st.st_mode) == 0o440, name
                    inodes.add(inode(path))
                work_file = work.path / "a.txt"
                assert os.lstat(work_file).st_nlink == 1
                inodes.add(inode(work_file))
                assert inode(committed) not in inodes
                assert len(inodes) == len(names) + 1
            src_after = os.lstat(committed)
            assert src_after.st_nlink == 1
            assert src_after.st_mode == src_before.st_mode
            assert await src.read_bytes("a.txt") == b"input bytes\n"


async def test_hard_links_inside_one_output_stay_linked_to_each_other_only(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host = host_file(tmp_path)
    other = tmp_path / "host" / "other.txt"
    other.write_bytes(b"other")
    os.chmod(other, 0o600)
    script = (
        "printf data > a && chmod 0755 a && mkdir d && ln a b && ln a d/c && "
        f"ln {shlex.quote(str(host))} h1 && ln h1 d/h2 && "
        # a read-only directory holding a shared name: it must be replaced all the same
        f"mkdir ro && ln {shlex.quote(str(other))} ro/o && chmod 0555 ro"
    )
    with anyio.fail_after(30):
        async with (
            Worker(tmp_path / "store", sandbox="none") as worker,
            Solver(worker=worker) as solver,
            await solver.solve(run(sh(script)).definition()) as result,
        ):
            view = view_of(result)
            top = view.path
            # all names of a tree-only inode: one inode, read-only, same bytes
            group = [top / "a", top / "b", top / "d" / "c"]
            assert {inode(p) for p in group} == {inode(group[0])}
            assert os.lstat(group[0]).st_nlink == 3
            assert stat.S_IMODE(os.lstat(group[0]).st_mode) == 0o555
            for rel in ("a", "b", "d/c"):
                assert await view.read_bytes(rel) == b"data"
            # the names of the host's inode: linked to each other, not to the host
            pair = [top / "h1", top / "d" / "h2"]
            assert inode(pair[0]) == inode(pair[1]) != inode(host)
            assert os.lstat(pair[0]).st_nlink == 2
            for rel in ("h1", "d/h2"):
                assert await view.read_bytes(rel) == ORIGINAL
                assert stat.S_IMODE(os.lstat(top / rel).st_mode) == 0o444
            assert inode(top / "ro" / "o") != inode(other)
            assert os.lstat(top / "ro" / "o").st_nlink == 1
            assert stat.S_IMODE(os.lstat(top / "ro" / "o").st_mode) == 0o400
            assert stat.S_IMODE(os.lstat(top / "ro").st_mode) == 0o555
            assert await view.read_bytes("ro/o") == b"other"
            names = [st.path for st in await view.walk()]
            assert names == ["a", "b", "d", "d/c", "d/h2", "h1", "ro", "ro/o"]
            size = {info.id: info.size for info in await worker.store.usage()}[view.id]
            assert size == len(b"data") + len(ORIGINAL) + len(b"other")
    for path, mode in ((host, 0o644), (other, 0o600)):
        assert stat.S_IMODE(os.lstat(path).st_mode) == mode
        assert os.lstat(path).st_nlink == 1


def precious_host_dir(tmp_path: Path) -> Path:
    """A host directory holding ``b/precious.txt``: where a redirected nested mount
    ``a/b`` would land."""
    host = tmp_path / "hostdir"
    (host / "b").mkdir(parents=True)
    (host / "b" / "precious.txt").write_text("keep me")
    return host


def redirect_a_to(host: Path) -> list[str]:
    """A process that moves the mount point's parent ``a`` away and puts a symlink
    to ``host`` in its place, so that ``a/b`` now names ``host/b``."""
    return sh(f"mv a a.real && ln -s {shlex.quote(str(host))} a")


@pytest.mark.parametrize("output", [False, True], ids=["scratch", "output"])
async def test_a_symlinked_parent_of_a_nested_mount_never_reaches_the_host(
    tmp_path: Path, handle_tracker: HandleTracker, output: bool
) -> None:
    host = precious_host_dir(tmp_path)
    nested: dict[str, JSONValue] = {"input": None, "dest": "a/b"}
    if output:
        nested["output"] = 1
    step = node(
        "exec",
        {
            "args": redirect_a_to(host),
            "mounts": [{"input": None, "dest": "", "output": 0}, nested],
        },
    )
    with anyio.fail_after(30):
        async with (
            Worker(tmp_path / "store", sandbox="none") as worker,
            Solver(worker=worker) as solver,
        ):
            if output:
                # the output mount is out of reach: an error, not the host's b/
                with pytest.raises(SolveError, match="replaced a parent directory of"):
                    await solver.solve(Definition.of(step.output(1)))
            else:
                # the scratch mount stays where the process moved it, in the output
                async with await solver.solve(Definition.of(step.output(0))) as result:
                    names = [st.path for st in await view_of(result).walk()]
                    assert names == ["a", "a.real", "a.real/b"]
    assert sorted(os.listdir(host)) == ["b"]
    assert (host / "b" / "precious.txt").read_text() == "keep me"


async def test_hidden_content_is_never_restored_through_a_symlinked_parent(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host = tmp_path / "hostdir"
    host.mkdir()
    base = State.inline({"a/b/hidden.txt": "hidden"})
    step = node(
        "exec",
        {
            "args": redirect_a_to(host),
            "mounts": [
                {"input": 0, "dest": "", "output": 0},
                {"input": None, "dest": "a/b"},
            ],
        },
        inputs=[base.output],
    )
    with anyio.fail_after(30):
        async with (
            Worker(tmp_path / "store", sandbox="none") as worker,
            Solver(worker=worker) as solver,
        ):
            with pytest.raises(SolveError, match="cannot restore what mount 'a/b' was hiding"):
                await solver.solve(Definition.of(step))
    assert os.listdir(host) == []


# -- the store itself --------------------------------------------------------------------


async def test_commit_never_changes_a_file_outside_the_store(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    host = host_file(tmp_path)
    os.chmod(host, 0o664)
    outside_dir = tmp_path / "host" / "dir"
    outside_dir.mkdir()
    os.chmod(outside_dir, 0o775)
    async with SnapshotStore(tmp_path / "store") as store:
        mutable = await store.new_mutable()
        os.link(host, mutable.path / "hard")
        os.symlink(host, mutable.path / "link")  # symlinks are never followed
        os.symlink(outside_dir, mutable.path / "dirlink")
        ref = await mutable.commit()
        try:
            assert await ref.sys.read_bytes("hard") == ORIGINAL
            assert inode(ref.sys.path / "hard") != inode(host)
            assert stat.S_IMODE(os.lstat(ref.sys.path / "hard").st_mode) == 0o444
            assert (await ref.sys.stat("link")).linkname == str(host)
        finally:
            await ref.release()
    assert stat.S_IMODE(os.lstat(host).st_mode) == 0o664
    assert stat.S_IMODE(os.lstat(outside_dir).st_mode) == 0o775
    assert os.lstat(host).st_nlink == 1
    assert host.read_bytes() == ORIGINAL


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
async def test_an_unreadable_shared_file_fails_the_commit_without_touching_it(
    tmp_path: Path, handle_tracker: HandleTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = host_file(tmp_path)
    os.chmod(host, 0o200)  # write-only: no private copy can be made without chmod
    if os.geteuid() == 0:
        # root reads it all the same: refuse that one open as the kernel would
        real_open = os.open

        def refusing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
            if isinstance(path, str) and path.endswith(f"{os.sep}hard"):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", refusing_open)
    async with SnapshotStore(tmp_path / "store") as store:
        mutable = await store.new_mutable()
        os.link(host, mutable.path / "hard")
        with pytest.raises(SolveError, match="'hard' is a hard link to a file outside"):
            await mutable.commit()
        assert await store.usage() == []
        assert mutable.state == "discarded"
    assert stat.S_IMODE(os.lstat(host).st_mode) == 0o200
    assert os.lstat(host).st_nlink == 1
