"""``solver build --export-cache`` and ``--import-cache``: cache directories on the
command line, in the manner of BuildKit's ``--export-cache``/``--import-cache``.

* ``--export-cache type=local,dest=DIR[,mode=min|max]``: after the build, write the
  result's cache to ``DIR`` (``mode`` defaults to ``min``: the result's own chain;
  ``max`` also every intermediate result). Repeatable.
* ``--import-cache type=local,src=DIR``: use the cache in ``DIR`` while building.
  Repeatable. A ``DIR`` that does not exist, or has no index (a first CI run, say),
  is skipped with a warning on stderr; a ``DIR`` that is a file, or a corrupt
  index, is an error (exit status 1).

``type`` may be left out (``local`` is the only type). See ``docs/cache-format.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

# The cache directory format is imported only when --export-cache or
# --import-cache is given (docs/performance.md, "CLI start-up").
if TYPE_CHECKING:
    from ..cache import LocalCacheExport, LocalCacheImport

__all__ = [
    "add_cache_arguments",
    "existing_imports",
    "parse_export_cache",
    "parse_import_cache",
]


def _fields(text: str, flag: str, allowed: Sequence[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"bad {flag} field {part!r}: expected key=value")
        if key in fields:
            raise ValueError(f"{flag} field {key!r} given twice")
        fields[key] = value
    kind = fields.get("type", "local")
    if kind != "local":
        raise ValueError(f"unknown {flag} type {kind!r} (only type=local is supported)")
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown {flag} field(s): {', '.join(unknown)} (expected {', '.join(allowed)})"
        )
    return fields


def parse_export_cache(text: str) -> LocalCacheExport:
    """``type=local,dest=DIR[,mode=min|max]``. Raises ValueError saying what is
    wrong."""
    from ..cache import LocalCacheExport

    fields = _fields(text, "--export-cache", ("type", "dest", "mode"))
    dest = fields.get("dest", "")
    if not dest:
        raise ValueError("--export-cache needs dest=DIR")
    mode = fields.get("mode", "min")
    if mode == "min":
        return LocalCacheExport(dest, "min")
    if mode == "max":
        return LocalCacheExport(dest, "max")
    raise ValueError(f"--export-cache mode must be min or max, not {mode!r}")


def parse_import_cache(text: str) -> LocalCacheImport:
    """``type=local,src=DIR``. Raises ValueError saying what is wrong."""
    from ..cache import LocalCacheImport

    fields = _fields(text, "--import-cache", ("type", "src"))
    src = fields.get("src", "")
    if not src:
        raise ValueError("--import-cache needs src=DIR")
    return LocalCacheImport(src)


def _export_arg(text: str) -> LocalCacheExport:
    try:
        return parse_export_cache(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _import_arg(text: str) -> LocalCacheImport:
    try:
        return parse_import_cache(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--export-cache`` and ``--import-cache`` (both repeatable) to the
    ``build`` parser; they land in ``args.export_cache`` and ``args.import_cache``."""
    parser.add_argument(
        "--export-cache",
        type=_export_arg,
        action="append",
        default=[],
        metavar="SPEC",
        help="write the result's cache to a directory: type=local,dest=DIR[,mode=min|max] "
        "(min: the result's own chain, the default; max: every intermediate result too)",
    )
    parser.add_argument(
        "--import-cache",
        type=_import_arg,
        action="append",
        default=[],
        metavar="SPEC",
        help="use the cache exported to a directory: type=local,src=DIR (a directory "
        "without a cache is skipped with a warning)",
    )


def existing_imports(
    imports: Sequence[LocalCacheImport], err: TextIO | None = None
) -> list[LocalCacheImport]:
    """The imports whose directory has an index; a warning on ``err`` (default
    stderr) for each other one. Whether an index that is there is valid is checked
    when it is opened (a :class:`~solver.CacheImportError`)."""
    out = err if err is not None else sys.stderr
    kept = []
    for spec in imports:
        from ..cache import INDEX_NAME

        src = Path(spec.src)
        if (src / INDEX_NAME).is_file():
            kept.append(spec)
            continue
        why = f"it has no {INDEX_NAME}" if src.is_dir() else "no such directory"
        out.write(
            f"solver: warning: no cache to import at {spec.src} ({why}); "
            "building without it\n"
        )
    return kept
