"""Real C builds: the solver against ``make -jN`` and ``ninja -jN`` (issue 21).

The benchmark downloads a real C library's sdist from PyPI (``pip download
--no-binary :all: --no-deps NAME==VERSION``: the package registry is the only
network it needs) into a cache directory, and builds its C sources four ways,
each in a tree of its own:

* ``make -jN`` from a generated ``Makefile``;
* ``ninja -jN`` from a generated ``build.ninja``;
* ``solver build -j N defn.json --output out`` (the command line, a new process,
  byte-compiled as on a user's machine: see below);
* the embedded API: ``Solver(worker=Worker(root)).solve(defn)`` in this process.

Every contender runs the same commands: one ``cc -c`` per ``.c`` file, then one
``ar rcsD`` of all the objects. In the solver's graph each compile is an
``exec`` step that mounts, read-only, a content-keyed ``file`` copy of its
``.c`` file and every header (so a change to another ``.c`` file is a cache hit
for it), the objects are merged, and an ``ar`` step makes the archive (the
shape of issue 21's measurements).

Three phases, each a median over ``--repeat`` rounds with the contenders
alternating inside a round: *cold* (no objects, an empty solver cache), *nothing
changed* (build again), *one .c changed* (a comment appended to one file, a
new one each round, then build). After the cold phase the objects and archives
of every contender are compared byte for byte; compiles are deterministic here
because every contender compiles the same relative path (``src/x.c``) with the
same flags and no debug information, and ``ar`` runs in deterministic mode.

The command line runs the way it does on a user's machine, where every module
the command imports has its ``.pyc``: a process that recompiles every module
(``PYTHONDONTWRITEBYTECODE=1``, as in some CI and development environments)
spends most of a no-op build compiling. So the CLI's processes run without
``PYTHONDONTWRITEBYTECODE`` and with ``PYTHONPYCACHEPREFIX`` set to a directory
of the benchmark's cache, which is warmed before the clock starts: ``compileall``
of the ``solver`` package, then one tiny build (an ``exec`` step over a
read-only mount, exported with ``--output``), which byte-compiles every other
module a build imports. The output's first line says so.

The nothing-changed phase is short, so each round runs it ``--noop-runs`` times
(default 5), the contenders alternating, and its median is over all of them.

It prints each ratio against issue 21's targets (cold: CLI <= 1.10x ninja,
embedded <= 1.05x; one .c changed: both <= 1.3x ninja; nothing changed:
embedded <= 2x make, CLI <= 10x make; store growth of a cold build <= 2x the
sources plus the outputs).

Run: ``python benchmarks/cbuild.py [--library brotli|pycryptodome|all]
[--repeat 3] [--noop-runs 5] [--jobs N] [--cache-dir DIR] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

CC = "/usr/bin/cc"
AR = "/usr/bin/ar"


@dataclass(frozen=True)
class Library:
    """A C library in a PyPI sdist: where its sources are and how to compile them."""

    name: str
    package: str
    version: str
    archive: str  # the sdist's file name
    top: str  # the source directory inside the archive
    dirs: tuple[str, ...]  # directories (relative to top) whose .c files are built
    cflags: tuple[str, ...]
    skip: frozenset[str] = field(default_factory=frozenset)  # not standalone units


LIBRARIES: dict[str, Library] = {
    lib.name: lib
    for lib in (
        Library(
            "brotli", "brotli", "1.1.0", "Brotli-1.1.0.tar.gz", "Brotli-1.1.0/c",
            ("common", "dec", "enc"), ("-O2", "-Isrc/include"),
        ),
        Library(
            "pycryptodome", "pycryptodome", "3.21.0", "pycryptodome-3.21.0.tar.gz",
            "pycryptodome-3.21.0/src", ("",),
            ("-O2", "-Isrc", "-DHAVE_STDINT_H", "-DNO_CPYTHON_MODULE", "-DHAVE_UINT128",
             "-DHAVE_POSIX_MEMALIGN", "-DHAVE_X86INTRIN_H", "-DHAVE_WMMINTRIN_H",
             "-DHAVE_TMMINTRIN_H", "-maes", "-msse2", "-mpclmul"),
            # Templates included by other units, or units needing generated code.
            frozenset({"DES.c", "DES3.c", "blake2.c", "block_common.c",
                       "blowfish_init.c", "ghash_clmul.c", "hash_SHA2_template.c",
                       "mont.c", "mont1.c", "mont2.c", "mont3.c"}),
        ),
    )
}

TARGETS = {
    ("cold", "cli"): ("ninja", 1.10),
    ("cold", "embedded"): ("ninja", 1.05),
    ("changed", "cli"): ("ninja", 1.3),
    ("changed", "embedded"): ("ninja", 1.3),
    ("noop", "cli"): ("make", 10.0),
    ("noop", "embedded"): ("make", 2.0),
}

CONTENDERS = ("make", "ninja", "cli", "embedded")


# -- sources ------------------------------------------------------------------------------


def fetch_sources(lib: Library, cache: Path) -> Path:
    """The library's extracted source directory, downloading the sdist once."""
    extracted = cache / "src" / f"{lib.name}-{lib.version}"
    if extracted.exists():
        return extracted
    downloads = cache / "downloads"
    archive = downloads / lib.archive
    if not archive.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--quiet", "-d", str(downloads), f"{lib.package}=={lib.version}"],
            check=True,
        )
    tmp = extracted.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(lib.top + "/")]
        tar.extractall(tmp, members, filter="data")
    os.rename(tmp / lib.top, extracted)
    shutil.rmtree(tmp)
    return extracted


def units(lib: Library, src: Path) -> list[str]:
    """The ``.c`` files to compile, relative to ``src``, sorted."""
    found: list[str] = []
    for d in lib.dirs:
        for path in sorted((src / d).glob("*.c")):
            if path.name not in lib.skip:
                found.append(path.relative_to(src).as_posix())
    return found


_TEXTUAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+\.c)"', re.MULTILINE)


def textual_includes(src: Path) -> list[str]:
    """The ``.c`` files some source includes (templates, shared code):
    headers in all but name, so every compile depends on them as on the headers."""
    found: set[str] = set()
    for path in src.rglob("*"):
        if path.suffix in (".c", ".h") and path.is_file():
            for name in _TEXTUAL_INCLUDE.findall(path.read_bytes()):
                target = (path.parent / name.decode()).resolve()
                if target.is_file() and target.is_relative_to(src.resolve()):
                    found.add(target.relative_to(src.resolve()).as_posix())
    return sorted(found)


def obj_of(unit: str) -> str:
    return unit.removesuffix(".c") + ".o"


def compile_args(lib: Library, unit: str, out: str) -> list[str]:
    return [CC, *lib.cflags, "-c", f"src/{unit}", "-o", out]


# -- the generated build files ---------------------------------------------------------


def write_makefile(lib: Library, tree: Path, names: list[str], textual: list[str]) -> None:
    objs = [f"obj/{obj_of(u)}" for u in names]
    extra = "".join(f" src/{t}" for t in textual)
    lines = [f"all: lib{lib.name}.a", "", f"lib{lib.name}.a: {' '.join(objs)}",
             f"\t{AR} rcsD $@ {' '.join(objs)}", ""]
    for u, o in zip(names, objs, strict=True):
        lines += [f"{o}: src/{u} $(wildcard src/*.h src/*/*.h src/*/*/*.h){extra}",
                  f"\t@mkdir -p {os.path.dirname(o)}",
                  f"\t{' '.join(compile_args(lib, u, o))}", ""]
    (tree / "Makefile").write_text("\n".join(lines))


def write_ninja(lib: Library, tree: Path, names: list[str]) -> None:
    objs = [f"obj/{obj_of(u)}" for u in names]
    flags = " ".join(lib.cflags)
    lines = [f"rule cc\n  command = {CC} {flags} -MMD -MF $out.d -c $in -o $out\n"
             "  deps = gcc\n  depfile = $out.d",
             f"rule ar\n  command = rm -f $out && {AR} rcsD $out $in"]
    for u, o in zip(names, objs, strict=True):
        lines.append(f"build {o}: cc src/{u}")
    lines.append(f"build lib{lib.name}.a: ar {' '.join(objs)}")
    lines.append(f"default lib{lib.name}.a")
    (tree / "build.ninja").write_text("\n".join(lines) + "\n")


def definition_json(lib: Library, src: Path, names: list[str], textual: list[str]) -> bytes:
    """The solver's graph for the sources at ``src`` (see the module docstring)."""
    from solver.worker import State, merge, run

    source = State.local(src, name="sources")
    objects = []
    for u in names:
        o = obj_of(u)
        inputs = State.scratch().copy(
            source, "/", "/", include=[u, "*.h", *textual]
        ).with_name(
            f"sources of {u}"
        )
        objects.append(
            run(
                compile_args(lib, u, f"out/{o}"),
                root=State.scratch().mkdir(os.path.dirname(f"out/{o}")),
                mounts={"src": inputs},
                readonly=["src"],
                name=f"cc {u}",
            )
        )
    objs = merge(objects, name="objects")
    archive = run(
        [AR, "rcsD", f"lib{lib.name}.a", *(f"obj/out/{obj_of(u)}" for u in names)],
        mounts={"obj": objs},
        readonly=["obj"],
        name=f"ar lib{lib.name}.a",
    )
    # The result holds the objects (obj/...) and the archive, as make's tree does.
    result = merge([State.scratch().copy(objs, "out", "obj"), archive], name="result")
    data = result.definition().to_json()
    return data.encode() if isinstance(data, str) else data


# -- contenders ------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    tree: Path  # holds src/ and what the contender writes
    cache: Path  # the solver's cache dir (for the CLI and embedded)

    @property
    def out(self) -> Path:
        """Where the objects and the archive end up."""
        return self.tree / "out" if self.name in ("cli", "embedded") else self.tree


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_quiet(argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {cwd}:\n{proc.stderr.decode()[-3000:]}")


class Embedded:
    """The embedded API, in this process: an application that keeps one worker and
    solver open and solves a definition when asked. They live on an event loop in a
    thread of their own (an anyio blocking portal); a cold build starts from a new
    worker on an empty store, opened before the clock starts."""

    def __init__(self, contender: Contender, jobs: int) -> None:
        self.c = contender
        self.jobs = jobs
        self._stack = contextlib.ExitStack()
        self.portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        self._open: contextlib.ExitStack | None = None
        self.solver: Any = None

    def shut(self) -> None:
        """Close the worker and solver, if open."""
        if self._open is not None:
            self._open.close()
            self._open = None

    def reopen(self) -> None:
        """Close the worker and solver (if open), then open new ones on the store."""
        self.shut()
        self._open = contextlib.ExitStack()
        self.solver = self._open.enter_context(
            self.portal.wrap_async_context_manager(self._opened())
        )

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[Any]:
        from solver import Solver
        from solver.worker import Worker

        async with Worker(self.c.cache / "snapshots", max_parallelism=self.jobs) as worker, \
                Solver(worker=worker) as solver:
            yield solver

    def build(self, defn_bytes: bytes, export: bool) -> None:
        self.portal.call(self._build, defn_bytes, export)

    async def _build(self, defn_bytes: bytes, export: bool) -> None:
        from solver import Definition
        from solver.worker import export_to_dir

        defn = Definition.from_json(defn_bytes)
        async with await self.solver.solve(defn) as result:
            if export:
                assert result.ref is not None
                await export_to_dir(result.ref, self.c.out, overwrite=True)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
        self._stack.close()


def cli_argv(jobs: int, cache: Path, defn: str) -> list[str]:
    """The command line of a CLI build of ``defn`` into ``out`` (relative to its cwd)."""
    return [sys.executable, "-m", "solver", "build", "-j", str(jobs), "--progress", "plain",
            "--cache-dir", str(cache), "--output", "out", defn]


def byte_compiled_env(cache: Path, jobs: int) -> dict[str, str]:
    """The environment of the CLI's processes: bytecode written and read in a
    ``PYTHONPYCACHEPREFIX`` under ``cache``, warmed here (see the module docs)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache / "pycache")
    import solver

    package = Path(solver.__file__).parent
    run_quiet([sys.executable, "-m", "compileall", "-q", str(package)], cache, env)
    from solver.worker import State, run

    warm = cache / "warm-up"
    shutil.rmtree(warm, ignore_errors=True)
    (warm / "src").mkdir(parents=True)
    (warm / "src" / "a.txt").write_text("warm-up\n")
    step = run(["/bin/cp", "src/a.txt", "b.txt"], mounts={"src": State.local(warm / "src")},
               readonly=["src"], name="warm-up")
    data = step.definition().to_json()
    (warm / "defn.json").write_bytes(data.encode() if isinstance(data, str) else data)
    for _ in range(2):  # cold, then nothing changed
        run_quiet(cli_argv(jobs, warm / "cache", "defn.json"), warm, env)
    shutil.rmtree(warm)
    return env


def build(
    c: Contender, lib: Library, jobs: int, embedded: Embedded, export: bool,
    cli_env: dict[str, str] | None = None,
) -> None:
    if c.name == "make":
        run_quiet(["make", f"-j{jobs}", "-s"], c.tree)
    elif c.name == "ninja":
        run_quiet(["ninja", f"-j{jobs}"], c.tree)
    elif c.name == "cli":
        run_quiet(cli_argv(jobs, c.cache, "defn.json"), c.tree, cli_env)
    else:
        embedded.build((c.tree / "defn.json").read_bytes(), export)


def clean(c: Contender, lib: Library, embedded: Embedded | None) -> None:
    """Back to a cold start: no objects, no archive, an empty solver cache."""
    for name in ("obj", "out", f"lib{lib.name}.a", ".ninja_log", ".ninja_deps"):
        path = c.tree / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if embedded is not None:
        embedded.shut()  # before its store goes
    shutil.rmtree(c.cache, ignore_errors=True)
    if embedded is not None:
        embedded.reopen()


def tree_size(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def slowest_units(ninja_tree: Path, names: list[str]) -> list[str]:
    """The units, slowest compile first, from ninja's log of its cold build: the
    edited file of each round is one of the slowest, so that the compile, not the
    bookkeeping around it, is most of what make and ninja do."""
    cost: dict[str, int] = {}
    for line in (ninja_tree / ".ninja_log").read_text().splitlines()[1:]:
        start, end, _, target, _ = line.split("\t")
        cost[target] = int(end) - int(start)
    return sorted(names, key=lambda u: -cost.get(f"obj/{obj_of(u)}", 0))


def compare_outputs(lib: Library, contenders: list[Contender], names: list[str]) -> None:
    ref = contenders[0]
    for c in contenders[1:]:
        for rel in [f"obj/{obj_of(u)}" for u in names] + [f"lib{lib.name}.a"]:
            a, b = ref.out / rel, c.out / rel
            if not filecmp.cmp(a, b, shallow=False):
                raise SystemExit(f"{rel} differs between {ref.name} and {c.name}")


# -- the benchmark ----------------------------------------------------------------------


def bench(
    lib: Library, cache: Path, repeat: int, jobs: int, noop_runs: int = 5
) -> dict[str, object]:
    pristine = fetch_sources(lib, cache)
    names = units(lib, pristine)
    work = cache / "work" / lib.name
    shutil.rmtree(work, ignore_errors=True)
    contenders = [Contender(n, work / n, work / n / "cache") for n in CONTENDERS]
    textual = textual_includes(pristine)
    for c in contenders:
        shutil.copytree(pristine, c.tree / "src", symlinks=True)
        write_makefile(lib, c.tree, names, textual)
        write_ninja(lib, c.tree, names)
        (c.tree / "defn.json").write_bytes(
            definition_json(lib, c.tree / "src", names, textual)
        )
    embedded = Embedded(contenders[3], jobs)
    cli_env = byte_compiled_env(cache, jobs)
    by_cost: list[str] = []
    src_bytes = tree_size(pristine)
    print(f"{lib.name} {lib.version}: {len(names)} .c files, {src_bytes / 1e6:.1f} MB of "
          f"sources, -j{jobs}, {repeat} round(s), {noop_runs} no-op run(s) a round; "
          f"the CLI byte-compiled (PYTHONPYCACHEPREFIX={cli_env['PYTHONPYCACHEPREFIX']}, "
          "warmed)", flush=True)

    times: dict[str, dict[str, list[float]]] = {
        phase: {c.name: [] for c in contenders} for phase in ("cold", "noop", "changed")
    }
    growth: list[float] = []
    for rnd in range(repeat):
        order = contenders[rnd % 4:] + contenders[: rnd % 4]
        for c in order:
            clean(c, lib, embedded if c.name == "embedded" else None)
            times["cold"][c.name].append(
                timed(lambda c=c: build(c, lib, jobs, embedded, False, cli_env))
            )
            if c.name in ("cli", "embedded"):
                store = tree_size(c.cache)
                if c.name == "embedded":
                    embedded.build((c.tree / "defn.json").read_bytes(), True)
                outputs = tree_size(c.out)
                growth.append(store / (src_bytes + outputs))
        if rnd == 0:
            compare_outputs(lib, contenders, names)
            by_cost = slowest_units(contenders[1].tree, names)
        for _ in range(noop_runs):
            for c in order:
                times["noop"][c.name].append(
                    timed(lambda c=c: build(c, lib, jobs, embedded, False, cli_env))
                )
        edited = by_cost[rnd % len(by_cost)]
        for c in order:
            with open(c.tree / "src" / edited, "a") as f:
                f.write(f"\n/* edit {rnd} at {time.time_ns()} */\n")
            times["changed"][c.name].append(
                timed(lambda c=c: build(c, lib, jobs, embedded, False, cli_env))
            )
    medians = {ph: {n: statistics.median(v) for n, v in d.items()} for ph, d in times.items()}
    report: dict[str, object] = {"library": f"{lib.name}-{lib.version}", "units": len(names),
                                 "jobs": jobs, "repeat": repeat, "noop_runs": noop_runs,
                                 "cli_byte_compiled": True, "times": times,
                                 "medians": medians, "store_growth": growth}
    print(f"  {'':10}" + "".join(f"{n:>10}" for n in CONTENDERS))
    for ph in ("cold", "noop", "changed"):
        print(f"  {ph:10}" + "".join(f"{medians[ph][n]:10.3f}" for n in CONTENDERS))
    verdicts = []
    for (ph, who), (against, target) in TARGETS.items():
        ratio = medians[ph][who] / medians[ph][against]
        ok = ratio <= target
        verdicts.append({"phase": ph, "contender": who, "against": against, "ratio": ratio,
                         "target": target, "met": ok})
        print(f"  {ph:8} {who:9} {ratio:6.2f}x {against:5} (target <= {target}x) "
              f"{'met' if ok else 'NOT MET'}")
    worst = max(growth)
    verdicts.append({"phase": "cold", "contender": "store", "ratio": worst, "target": 2.0,
                     "met": worst <= 2.0})
    print(f"  store growth of a cold build: {worst:.2f}x sources+outputs (target <= 2x) "
          f"{'met' if worst <= 2.0 else 'NOT MET'}", flush=True)
    report["verdicts"] = verdicts
    embedded.close()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--library", choices=[*LIBRARIES, "all"], default="all")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--noop-runs", type=int, default=5,
                    help="no-op builds per contender per round (the median is over all)")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "solver-engine-cbuild")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    args = ap.parse_args(argv)
    libs = list(LIBRARIES.values()) if args.library == "all" else [LIBRARIES[args.library]]
    reports = [bench(lib, args.cache_dir, args.repeat, args.jobs, args.noop_runs)
               for lib in libs]
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
