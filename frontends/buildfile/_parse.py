"""Reading a build file: TOML text to a checked :class:`Buildfile`.

Everything is checked before anything is built: the TOML syntax, every key at
every level (an unknown key is an error, so a typo never silently does
nothing), every value's type, the platform names and the environment variable
names. Errors are :class:`BuildfileError` naming the file, the table and the
key. The format is documented in ``docs/buildfile.md``.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import BuildfileError
from ._platforms import Platform, parse_platforms

__all__ = [
    "RESERVED_ENV",
    "Buildfile",
    "BuildfileError",
    "CopySpec",
    "FileSpec",
    "MAX_BUILDFILE_SIZE",
    "StepSpec",
    "parse",
]

#: The largest build file read, in bytes.
MAX_BUILDFILE_SIZE: Final = 1 << 20

#: Variables the frontend sets itself; a build file may not set or declare them.
RESERVED_ENV: Final = frozenset(
    {"TARGETPLATFORM", "TARGETOS", "TARGETARCH", "TARGETVARIANT", "VERSION", "SOLVER_ROOT"}
)

_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class CopySpec:
    """A ``[[copy]]``: ``src`` of the build context to ``dest`` in the tree."""

    src: str
    dest: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A ``[[file]]``: write ``content`` to ``path`` in the tree."""

    path: str
    content: str
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class StepSpec:
    """A ``[[step]]``: run ``args`` in the tree (``workdir`` relative to it)."""

    name: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""


@dataclass(frozen=True, slots=True)
class Buildfile:
    """A checked build file. ``digest`` is ``sha256:`` and the hex SHA-256 of the
    file's bytes; ``platforms`` the default platform list (may be empty);
    ``output`` the paths of the tree in the result (``None``: all of it)."""

    filename: str
    digest: str
    name: str = ""
    platforms: tuple[Platform, ...] = ()
    version_file: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    copies: tuple[CopySpec, ...] = ()
    files: tuple[FileSpec, ...] = ()
    steps: tuple[StepSpec, ...] = ()
    output: tuple[str, ...] | None = None


def _type_name(value: object) -> str:
    return {
        str: "a string", int: "an integer", float: "a float", bool: "a boolean",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


class _Reader:
    """Checks one table: known keys, typed values; errors name ``where``."""

    def __init__(
        self, filename: str, where: str, table: object, known: tuple[str, ...] | None
    ) -> None:
        """``known`` None: any key (a table of names)."""
        self.filename = filename
        self.where = where
        if not isinstance(table, dict):
            raise self.error(f"must be a table, got {_type_name(table)}")
        self.table: dict[str, Any] = table
        unknown = [key for key in table if known is not None and key not in known]
        if known is not None and unknown:
            raise self.error(
                f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            )

    def error(self, message: str, key: str | None = None) -> BuildfileError:
        where = self.where if key is None else f"{self.where} key {key!r}"
        return BuildfileError(f"{self.filename}: {where}: {message}")

    def string(self, key: str, default: str | None = None, *, empty: bool = False) -> str:
        value = self.table.get(key, default)
        if value is None:
            raise self.error("is required", key)
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {_type_name(value)}", key)
        if not value and not empty:
            raise self.error("must not be empty", key)
        if "\0" in value:
            raise self.error("must not contain a NUL character", key)
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error("must be an array of non-empty strings", key)
        return tuple(value)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.table.get(key, default)
        if type(value) is not int:
            raise self.error(f"must be an integer, got {_type_name(value)}", key)
        if not low <= value <= high:
            raise self.error(f"must be from {low:#o} to {high:#o}, got {value:#o}", key)
        return value

    def env(self, key: str | None, what: str) -> dict[str, str]:
        """A table of environment variables (``key`` None: this whole table)."""
        table = self.table if key is None else self.table.get(key, {})
        if not isinstance(table, dict):
            raise self.error(f"must be a table, got {_type_name(table)}", key)
        out: dict[str, str] = {}
        for name, value in table.items():
            if not _ENV_NAME.fullmatch(name):
                raise self.error(
                    f"{name!r} is not a valid {what} name (letters, digits and _, not "
                    "starting with a digit)",
                    key,
                )
            if name in RESERVED_ENV:
                raise self.error(f"{name!r} is set by the frontend and cannot be set here", key)
            if not isinstance(value, str):
                raise self.error(f"{name!r} must be a string, got {_type_name(value)}", key)
            if "\0" in value:
                raise self.error(f"{name!r} must not contain a NUL character", key)
            out[name] = value
        return out


def _array_of_tables(filename: str, doc: dict[str, Any], key: str) -> list[object]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise BuildfileError(
            f"{filename}: {key!r} must be an array of tables ([[{key}]]), got "
            f"{_type_name(value)}"
        )
    return value


def parse(data: bytes, filename: str = "Buildfile.toml") -> Buildfile:
    """The :class:`Buildfile` in ``data`` (UTF-8 TOML). Raises
    :class:`BuildfileError`."""
    if len(data) > MAX_BUILDFILE_SIZE:
        raise BuildfileError(
            f"{filename}: the file is {len(data)} bytes; a build file may have at most "
            f"{MAX_BUILDFILE_SIZE}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BuildfileError(f"{filename}: not UTF-8 text: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BuildfileError(f"{filename}: invalid TOML: {exc}") from None
    top = _Reader(filename, "the file", doc, ("build", "args", "env", "copy", "file", "step",
                                            "output"))

    build = _Reader(filename, "[build]", doc.get("build", {}),
                    ("name", "platforms", "version-file"))
    name = build.string("name", "", empty=True)
    platform_names = build.strings("platforms")
    platforms: tuple[Platform, ...] = ()
    if platform_names is not None:
        platforms = tuple(parse_platforms(platform_names, f"{filename}: [build] key 'platforms'"))
    version_file = build.string("version-file", "", empty=True)

    arg_values = _Reader(filename, "[args]", doc.get("args", {}), None).env(
        None, "build argument"
    )
    env = _Reader(filename, "[env]", doc.get("env", {}), None).env(None, "environment variable")

    copies: list[CopySpec] = []
    for i, item in enumerate(_array_of_tables(filename, top.table, "copy"), 1):
        r = _Reader(filename, f"[[copy]] #{i}", item, ("src", "dest", "include", "exclude"))
        copies.append(
            CopySpec(
                r.string("src"),
                r.string("dest", "."),
                r.strings("include") or (),
                r.strings("exclude") or (),
            )
        )

    files: list[FileSpec] = []
    for i, item in enumerate(_array_of_tables(filename, top.table, "file"), 1):
        r = _Reader(filename, f"[[file]] #{i}", item, ("path", "content", "mode"))
        files.append(
            FileSpec(r.string("path"), r.string("content", empty=True),
                     r.integer("mode", 0o644, 0, 0o7777))
        )

    steps: list[StepSpec] = []
    for i, item in enumerate(_array_of_tables(filename, top.table, "step"), 1):
        r = _Reader(filename, f"[[step]] #{i}", item, ("name", "run", "env", "workdir"))
        run = r.table.get("run")
        if isinstance(run, str) and run.strip():
            argv: tuple[str, ...] = ("sh", "-c", run)
        elif isinstance(run, list) and run and all(isinstance(a, str) for a in run) and run[0]:
            argv = tuple(run)
        elif run is None:
            raise r.error("is required", "run")
        else:
            raise r.error(
                "must be a command line (a string, run with sh -c) or a non-empty array of "
                f"strings (the program and its arguments), got {_type_name(run)}",
                "run",
            )
        if any("\0" in a for a in argv):
            raise r.error("must not contain a NUL character", "run")
        steps.append(
            StepSpec(r.string("name", f"step {i}"), argv, r.env("env", "environment variable"),
                     r.string("workdir", "", empty=True))
        )

    output: tuple[str, ...] | None = None
    if "output" in doc:
        r = _Reader(filename, "[output]", doc["output"], ("paths",))
        output = r.strings("paths")
        if output == ():
            raise r.error("must name at least one path (leave [output] out for the whole "
                          "tree)", "paths")

    return Buildfile(
        filename=filename,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        name=name,
        platforms=platforms,
        version_file=version_file,
        args=arg_values,
        env=env,
        copies=tuple(copies),
        files=tuple(files),
        steps=tuple(steps),
        output=output,
    )
