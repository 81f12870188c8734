"""The buildfile frontend: a declarative TOML build file, built for several
platforms.

A build file (``Buildfile.toml``; the format is in ``docs/buildfile.md``)
describes one working tree: parts of the build context copied in, files
written, and commands run in it, in order. :func:`build` is the frontend's
build function. It reads the build file out of its input, reads the version
file out of the build context (both through :class:`~frontends.Reference`
reads), compiles one definition per platform build (:func:`compile_build`) and
returns:

* ``refs``: one reference per platform asked for, under the platform's name.
  Binary-compatible platforms (one family of :data:`FAMILIES`) are built once,
  for the most portable of them, and share that one reference;
* ``ref``: the same reference again when one platform was asked for;
* ``attestations``: per platform, a ``provenance`` attestation pointing at the
  platform's reference, at :data:`PROVENANCE_PATH` inside it;
* ``metadata``: ``buildfile.digest``, ``buildfile.platforms`` (JSON list),
  ``buildfile.builds`` (JSON: platform -> platform built for) and
  ``buildfile.version``.

The same function runs in process and as a program::

    from frontends.buildfile import build, inputs_for
    from frontends.forwarder import Forwarder

    async with Solver(frontends={"buildfile": Forwarder(build)}) as solver:
        opts, inputs = inputs_for("examples/buildfile")
        opts["platforms"] = "linux/amd64,linux/386,linux/arm64"
        request = SolveRequest(frontend="buildfile", frontend_opts=opts,
                               frontend_inputs=inputs)
        async with await solver.solve(request) as result:
            ...

or through the gateway, which runs ``python -m frontends.buildfile``
(``opts["source"]``).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from solver import Definition
from solver.worker import State

from ._build import (
    DEFAULT_FILENAME as DEFAULT_FILENAME,
    OPTIONS as OPTIONS,
    build as build,
    host_platform as host_platform,
)
from ._compile import (
    PROVENANCE_PATH as PROVENANCE_PATH,
    compile_build as compile_build,
    provenance as provenance,
    state_of as state_of,
)
from ._parse import (
    RESERVED_ENV as RESERVED_ENV,
    Buildfile as Buildfile,
    BuildfileError as BuildfileError,
    CopySpec as CopySpec,
    FileSpec as FileSpec,
    StepSpec as StepSpec,
    parse as parse,
)
from ._platforms import (
    ALIASES as ALIASES,
    FAMILIES as FAMILIES,
    Platform as Platform,
    PlatformBuild as PlatformBuild,
    group_platforms as group_platforms,
    parse_platforms as parse_platforms,
)

#: The command line that runs this frontend as a gateway program.
PROGRAM = "python -m frontends.buildfile"


def inputs_for(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, Definition]]:
    """The options and inputs that build the build file at ``path`` (a file, or a
    directory holding ``Buildfile.toml``) with its directory as the build context:
    ``({"filename": name}, {"context": ..., "buildfile": ...})``, both
    ``source.local`` definitions. Raises :class:`BuildfileError` when there is no
    such file."""
    p = Path(path).absolute()
    if p.is_dir():
        directory, name = p, DEFAULT_FILENAME
    else:
        directory, name = p.parent, p.name
    if not (directory / name).is_file():
        raise BuildfileError(f"{directory / name}: no such build file")
    inputs = {
        "context": State.local(directory, name="build context").definition(),
        "buildfile": State.local(
            directory, include=[glob.escape(name)], name="build file"
        ).definition(),
    }
    return {"filename": name}, inputs


__all__ = [
    "ALIASES",
    "DEFAULT_FILENAME",
    "FAMILIES",
    "OPTIONS",
    "PROGRAM",
    "PROVENANCE_PATH",
    "RESERVED_ENV",
    "Buildfile",
    "BuildfileError",
    "CopySpec",
    "FileSpec",
    "Platform",
    "PlatformBuild",
    "StepSpec",
    "build",
    "compile_build",
    "group_platforms",
    "host_platform",
    "inputs_for",
    "parse",
    "parse_platforms",
    "provenance",
    "state_of",
]
