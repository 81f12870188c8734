"""What exporting a new result over an earlier export costs (issue 21: "an
``--output`` that is already up to date left alone").

Builds a synthetic tree of ``--files`` files (``--size`` bytes each) two ways,
exports it into a directory, changes one file, builds again and exports the new
result over the first export, and counts the files that export wrote (an
output file whose inode changed was written again) and times the export call:

* ``merge``: one ``mkfile`` op per file and a ``merge`` of them all, as a C
  build merges its objects: the new merge hard-links the unchanged files from
  the same input snapshots (the same inodes, new ctimes);
* ``local``: a copy of a ``source.local`` tree: the changed source is copied
  anew, so every file of the new result is a new inode with the old bytes and
  modification time (the store knows their digests: the local source hashes
  what it copies, and the copy carries the digests through its links).

* ``pycryptodome`` (or ``brotli``): the C build of ``benchmarks/cbuild.py``
  (its cached sdist; objects and archive), built with the embedded API, one
  ``.c`` file changed (a comment appended: its object is rebuilt with the same
  bytes, the archive is rebuilt).

Each scenario runs ``--repeat`` times in a new store; medians are printed, with
the time of a first (cold) export and of an export of the same result again
(no-op). Run: ``python benchmarks/export_update.py [--files 500] [--size 4096]
[--repeat 5] [--scenario merge|local|pycryptodome|brotli|both]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cbuild  # the benchmark's own directory

from solver import Definition, Solver
from solver.worker import State, Worker, export_to_dir, merge

VERBOSE = False


def cbuild_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "solver-engine-cbuild"


def inodes(top: Path) -> dict[str, int]:
    out = {}
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            path = Path(dirpath, name)
            out[path.relative_to(top).as_posix()] = os.lstat(path).st_ino
    return out


def body(i: int, size: int, version: int) -> bytes:
    line = f"file {i} version {version}\n".encode()
    return (line * (size // len(line) + 1))[:size]


async def one_run(
    scenario: str, files: int, size: int, work: Path
) -> tuple[float, float, float, int]:
    """(cold export s, same-result export s, new-result export s, files written)."""
    src = work / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:04d}.txt").write_bytes(body(i, size, 0))
    changed = [0]

    def graph() -> State:
        if scenario == "merge":
            return merge(
                [State.scratch().mkfile(f"/f{i:04d}.txt",
                                        body(i, size, changed[0] if i == 0 else 0))
                 for i in range(files)]
            )
        return State.scratch().copy(State.local(str(src)), "/", "/")

    dest = work / "out"
    library = cbuild.LIBRARIES.get(scenario)
    if library is not None:
        tree = work / "lib"
        shutil.copytree(cbuild.fetch_sources(library, cbuild_cache()), tree)
        names = cbuild.units(library, tree)
        textual = cbuild.textual_includes(tree)

        def c_build() -> Definition:
            return Definition.from_json(cbuild.definition_json(library, tree, names, textual))

    def definition() -> Definition:
        return c_build() if library is not None else graph().definition()

    async with Worker(work / "w", sandbox="none") as worker, Solver(worker=worker) as solver:
        async with await solver.solve(definition()) as r:
            assert r.ref is not None
            t0 = time.perf_counter()
            await export_to_dir(r.ref, dest)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            await export_to_dir(r.ref, dest)
            same = time.perf_counter() - t0
        before = inodes(dest)
        changed[0] = 1
        if library is not None:
            with (tree / names[0]).open("a") as f:
                f.write("/* changed */\n")
        else:
            (src / "f0000.txt").write_bytes(body(0, size, 1))
        async with await solver.solve(definition()) as r:
            assert r.ref is not None
            t0 = time.perf_counter()
            await export_to_dir(r.ref, dest)
            new = time.perf_counter() - t0
        after = inodes(dest)
    if library is None:
        assert (dest / "f0000.txt").read_bytes() == body(0, size, 1)
    written = sorted(rel for rel, ino in after.items() if before.get(rel) != ino)
    if VERBOSE:
        print(f"  written: {written[:5]}{' ...' if len(written) > 5 else ''}")
    return cold, same, new, len(written)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scenario", choices=["merge", "local", *cbuild.LIBRARIES, "both"],
                    default="both")
    ap.add_argument("--verbose", action="store_true", help="name the files each run wrote")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    scenarios = ["merge", "local"] if args.scenario == "both" else [args.scenario]

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:7.1f} ms"

    print(f"{args.files} files of {args.size} bytes, one changed; medians of {args.repeat}")
    for scenario in scenarios:
        colds, sames, news, written = [], [], [], []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                c, s, n, w = anyio.run(one_run, scenario, args.files, args.size, Path(tmp))
            colds.append(c)
            sames.append(s)
            news.append(n)
            written.append(w)
        print(f"{scenario:12s} first export {ms(colds)}, same result again {ms(sames)}, "
              f"new result {ms(news)}, files written by it: {sorted(set(written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
