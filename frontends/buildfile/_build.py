"""The buildfile frontend's build function (see :mod:`frontends.buildfile`)."""

from __future__ import annotations

import json
import platform as _host
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from frontends import BuildResult, Client, Reference
from solver import Attestation, Definition, SolveError, SolveRequest

from ._compile import PROVENANCE_PATH, compile_build, state_of
from ._parse import Buildfile, BuildfileError, parse
from ._platforms import Platform, group_platforms, parse_platforms

__all__ = ["DEFAULT_FILENAME", "OPTIONS", "build", "host_platform"]

#: The build file's name in its input when the ``filename`` option is not given.
DEFAULT_FILENAME: Final = "Buildfile.toml"

#: The options the frontend reads (besides ``build-arg:NAME``); ``source`` is the
#: gateway's own option (the program to run) and is ignored.
OPTIONS: Final = ("filename", "platforms", "source")

_BUILD_ARG: Final = "build-arg:"
_VERSION: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,127}")
_MACHINES: Final = {
    "x86_64": "linux/amd64", "amd64": "linux/amd64", "i386": "linux/386",
    "i686": "linux/386", "aarch64": "linux/arm64", "arm64": "linux/arm64",
    "armv7l": "linux/arm/v7", "armv6l": "linux/arm/v6", "ppc64le": "linux/ppc64le",
    "riscv64": "linux/riscv64", "s390x": "linux/s390x",
}


def host_platform() -> Platform:
    """The platform of this machine (``linux/amd64`` when it is not in the table)."""
    return Platform.parse(_MACHINES.get(_host.machine().lower(), "linux/amd64"))


@dataclass(frozen=True, slots=True)
class _Options:
    filename: str
    platforms: tuple[Platform, ...]
    build_args: Mapping[str, str]


def _options(opts: Mapping[str, str]) -> _Options:
    build_args: dict[str, str] = {}
    for key, value in opts.items():
        if key.startswith(_BUILD_ARG):
            build_args[key[len(_BUILD_ARG):]] = value
        elif key not in OPTIONS:
            raise BuildfileError(
                f"unknown option {key!r} for the buildfile frontend; it takes "
                f"{', '.join(o for o in OPTIONS if o != 'source')} and build-arg:NAME"
            )
    filename = opts.get("filename", DEFAULT_FILENAME)
    if not filename or filename.startswith("/") or ".." in filename.split("/"):
        raise BuildfileError(
            f"option 'filename' must be a path inside the build file's input, got {filename!r}"
        )
    platforms: tuple[Platform, ...] = ()
    if "platforms" in opts:
        platforms = tuple(parse_platforms(opts["platforms"].split(","), "option 'platforms'"))
    return _Options(filename, platforms, build_args)


def _effective_args(buildfile: Buildfile, given: Mapping[str, str]) -> dict[str, str]:
    args = dict(buildfile.args)
    for name, value in given.items():
        if name not in args:
            declared = ", ".join(sorted(args)) or "none"
            raise BuildfileError(
                f"option 'build-arg:{name}': {buildfile.filename} declares no argument "
                f"{name!r} in [args] (declared: {declared})"
            )
        if "\0" in value:
            raise BuildfileError(f"option 'build-arg:{name}' must not contain a NUL character")
        args[name] = value
    return args


async def _solve_ref(client: Client, definition: Definition) -> Reference:
    solved = await client.solve(SolveRequest(definition=definition))
    assert solved.ref is not None, "a definition always solves to a ref"
    return solved.ref


async def _read(ref: Reference, path: str, what: str) -> bytes:
    try:
        return await ref.read_file(path)
    except SolveError as exc:
        raise BuildfileError(f"cannot read {what}: {exc}") from exc


async def build(client: Client) -> BuildResult:
    """Build the build file for each platform asked for (see the package docs).

    Options: ``platforms`` (comma-separated; default: the file's
    ``[build] platforms``, else this machine's platform), ``filename`` (default
    ``Buildfile.toml``) and ``build-arg:NAME=value``. Inputs: ``context`` (the
    build context) and ``buildfile`` (holding the build file; default: the
    context). Returns one ref per platform under its name (binary-compatible
    platforms share one), the main ref when there is one platform, a
    ``provenance`` attestation per platform pointing into its ref, and metadata.
    """
    opts = client.build_opts()
    options = _options(opts.opts)
    context = opts.inputs.get("context")
    source = opts.inputs.get("buildfile", context)
    if source is None:
        raise BuildfileError(
            "the buildfile frontend needs an input 'context' (the build context) or "
            "'buildfile' (a tree holding the build file)"
        )

    source_ref = await _solve_ref(client, source)
    data = await _read(source_ref, options.filename, f"the build file {options.filename!r}")
    buildfile = parse(data, options.filename)
    if source is not context:
        await source_ref.release()  # an intermediate result: let it go early

    platforms = options.platforms or buildfile.platforms or (host_platform(),)
    args = _effective_args(buildfile, options.build_args)

    version: str | None = None
    if buildfile.version_file:
        if context is None:
            raise BuildfileError(
                f"{buildfile.filename}: [build] version-file needs a build context, and the "
                "frontend was given none"
            )
        context_ref = source_ref if source is context else await _solve_ref(client, context)
        raw = await _read(context_ref, buildfile.version_file,
                          f"version-file {buildfile.version_file!r} from the build context")
        version = raw.decode("utf-8", errors="replace").strip()
        if not _VERSION.fullmatch(version):
            raise BuildfileError(
                f"version-file {buildfile.version_file!r} holds {version[:40]!r}; a version "
                "is 1 to 128 letters, digits, '.', '+', '_' or '-', starting with a letter "
                "or digit"
            )

    context_state = state_of(context) if context is not None and buildfile.copies else None
    result = BuildResult()
    builds = group_platforms(platforms)
    refs: dict[Platform, Reference] = {}
    targets: dict[str, str] = {}
    for one in builds:
        definition = compile_build(
            buildfile, one, context=context_state, version=version, args=args
        )
        ref = await _solve_ref(client, definition)
        for platform in one.serves:
            refs[platform] = ref
            targets[platform.name] = one.target.name

    for platform in platforms:
        ref = refs[platform]
        result.add_ref(platform.name, ref)
        result.add_attestation(
            platform.name,
            Attestation(
                "provenance",
                ref,
                PROVENANCE_PATH,
                {
                    "platform": platform.name.encode(),
                    "build-platform": targets[platform.name].encode(),
                    "buildfile.digest": buildfile.digest.encode(),
                },
            ),
        )
    if len(platforms) == 1:
        result.set_ref(refs[platforms[0]])
    result.add_meta("buildfile.digest", buildfile.digest.encode())
    result.add_meta("buildfile.platforms", json.dumps([p.name for p in platforms]).encode())
    result.add_meta("buildfile.builds", json.dumps(targets).encode())
    if version is not None:
        result.add_meta("buildfile.version", version.encode())
    return result
