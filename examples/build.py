"""Compile, link and run a small C program with the system C compiler.

The sources (three ``.c`` files and a header) are written inline. Each ``.c`` file
is compiled by a step of its own (``cc -c``), the objects are merged and linked
into ``bin/app``, and a last step runs the program and captures what it prints
in ``table.txt``. The program prints a table whose columns come from different
translation units. The build runs twice in one process: the second build finds
every step in the solver's cache and runs nothing.

Every step calls its tools by absolute path (``/usr/bin/cc``, ``/bin/sh``): a step
sees the system's ``/usr`` and its own mounts, with a clean environment, not the
shell this script was started from.

Run: ``python examples/build.py [--progress plain|quiet]``, or through the
command line: ``solver build examples/build.py --output out/`` (writes
``out/bin/app`` and ``out/table.txt``). Snapshots live under
``$SOLVER_CACHE_DIR`` (default: the user cache directory,
``~/.cache/solver-engine`` on Linux); this script's solver
keeps its cache in memory, so every run builds once, then finds it all cached.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import anyio

from solver import Definition, Solver
from solver.worker import SnapshotView, State, merge, run

CC = "/usr/bin/cc"

HEADER = """\
/* What each translation unit offers the others. */
#ifndef TABLE_H
#define TABLE_H
long square(long n);
long cube(long n);
long fib(long n);
#endif
"""

SOURCES = {
    "main.c": """\
#include <stdio.h>

#include "table.h"

int main(void) {
    printf("%2s %4s %4s %4s\\n", "n", "n^2", "n^3", "fib");
    for (long n = 1; n <= 10; n++)
        printf("%2ld %4ld %4ld %4ld\\n", n, square(n), cube(n), fib(n));
    return 0;
}
""",
    "powers.c": """\
#include "table.h"

long square(long n) { return n * n; }

long cube(long n) { return n * square(n); }
""",
    "fib.c": """\
#include "table.h"

long fib(long n) {
    long a = 0, b = 1;
    while (n-- > 0) {
        long next = a + b;
        a = b;
        b = next;
    }
    return a;
}
""",
}

# What the program prints: the tests compare the build's table.txt with it.
EXPECTED_OUTPUT = "".join(
    [f"{'n':>2} {'n^2':>4} {'n^3':>4} {'fib':>4}\n"]
    + [f"{n:2} {n * n:4} {n**3:4} {f:4}\n"
       for n, f in zip(range(1, 11), [1, 1, 2, 3, 5, 8, 13, 21, 34, 55], strict=True)]
)


def graph() -> State:
    """The program's output next to the program: ``bin/app`` and ``table.txt``."""
    sources = State.inline({"table.h": HEADER, **SOURCES}, name="sources")
    objects = []
    for unit in sorted(SOURCES):
        stem = unit.removesuffix(".c")
        # One step per file, so changing one file recompiles only that file. The
        # sources are mounted read-only at src/; the step's root (which becomes its
        # result) holds only out/ and the object written into it.
        objects.append(
            run(
                [CC, "-c", "-O2", "-o", f"out/{stem}.o", f"src/{unit}"],
                root=State.scratch().mkdir("out").with_name("mkdir out"),
                mounts={"src": sources},
                readonly=["src"],
                name=f"compile {unit}",
            )
        )
    # merge() lays the three results over each other: one tree with out/*.o.
    objs = merge(objects, name="collect objects")
    linked = run(
        [CC, "-o", "bin/app", *(f"obj/out/{u.removesuffix('.c')}.o" for u in sorted(SOURCES))],
        root=State.scratch().mkdir("bin").with_name("mkdir bin"),
        mounts={"obj": objs},
        readonly=["obj"],
        name="link bin/app",
    )
    # A process's stdout goes to the progress log, not to a file; a shell
    # redirection makes it part of the result.
    return run(
        ["/bin/sh", "-c", "./bin/app > table.txt"],
        root=linked,
        name="run bin/app",
    )


def build() -> State:
    """The entry point ``solver build examples/build.py`` uses."""
    return graph()


async def build_once(solver: Solver, defn: Definition, label: str, show: bool) -> str:
    """Solve ``defn`` in a job whose progress is counted (and printed when
    ``show``); returns the program's output, read back from the result."""
    print(f"{label}:")
    start = time.perf_counter()
    # A job of our own, so that its progress events can be read while it builds.
    job = solver.new_job()
    counts: Counter[str] = Counter()

    async def progress() -> None:
        async for ev in job.status():
            if ev.status in ("completed", "cached", "error"):
                counts[ev.status] += 1
                if show:
                    mark = {"completed": "DONE  ", "cached": "CACHED", "error": "ERROR "}
                    error = f": {ev.error}" if ev.error else ""
                    print(f"  {mark[ev.status]} {ev.name}{error}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(progress)
        try:
            # Leaving the `async with` releases the result's handle.
            async with await solver.solve(defn, job=job) as result:
                assert result.ref is not None
                view = result.ref.sys  # a read-only view of the result's files
                assert isinstance(view, SnapshotView)
                output = (await view.read_bytes("table.txt")).decode()
        finally:
            await job.discard()  # ends the status stream, and so progress()
    elapsed = time.perf_counter() - start
    print(f"  {counts['completed']} steps ran, {counts['cached']} came from the cache "
          f"({elapsed:.2f}s)")
    return output


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--progress", choices=["plain", "quiet"], default="plain",
                    help="plain: a line per step (default); quiet: only the summaries")
    args = ap.parse_args()
    show = args.progress == "plain"
    defn = graph().definition()
    async with Solver() as solver:
        output = await build_once(solver, defn, "first build", show)
        print("bin/app printed:")
        print("".join(f"  {line}\n" for line in output.splitlines()), end="")
        await build_once(solver, defn, "second build (same definition)", show)


if __name__ == "__main__":
    anyio.run(main)
