"""The build history: one compact record per build in a directory.

Layout. A record is one file, ``<started in µs, 16 digits>-<id>.json``, so that
the directory lists in build order (records of builds started in the same
microsecond in the order they were written) and an age policy needs no file
opened. The
file holds two JSON lines: a header (id, build digest, times, counts), which is
all ``ls`` reads, then the ops as arrays (one per op: digest, name, state,
started, ended, cache source, error, log tail, reason, input positions). Arrays
rather than objects, and inputs as positions rather than digests, keep a
10,000-op record at 1.6 MB instead of 2.5 MB. ``docs/insight.md`` has the
cost figures (``benchmarks/history_cost.py``).

Writes go to a temporary name and are renamed into place, so a reader never sees
half a record and a crashed build leaves at most a ``.tmp`` file, which
:meth:`BuildHistory.prune` removes.

Pruning follows the worker's garbage collection (``docs/worker.md``): a
:class:`HistoryPolicy` keeps at most ``keep_records`` records and none older than
``keep_duration``; :meth:`BuildHistory.add` applies the history's own policy
after every record it writes, so the directory stays small without a command.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .._errors import SolveError
from ._summary import BuildSummary, OpRecord

__all__ = ["BuildHistory", "BuildRecord", "HistoryEntry", "HistoryError", "HistoryPolicy"]

FORMAT_VERSION = 1
_SUFFIX = ".json"
# seconds after which a .tmp record is a crashed writer's
_STALE_TMP = 3600.0


class HistoryError(SolveError):
    """A history record that does not exist, is ambiguous or cannot be read."""


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """Which records to keep: at most ``keep_records`` (the newest; ``None``: no
    limit) and only those whose build started within ``keep_duration`` seconds
    (``None``: any age). The default keeps 100 records of the last 30 days."""

    keep_records: int | None = 100
    keep_duration: float | None = 30 * 86400.0

    def __post_init__(self) -> None:
        if self.keep_records is not None and (
            type(self.keep_records) is not int or self.keep_records < 0
        ):
            raise ValueError(f"keep_records must be an integer >= 0, not {self.keep_records!r}")
        if self.keep_duration is not None and not self.keep_duration >= 0:
            raise ValueError(f"keep_duration must be >= 0 seconds, not {self.keep_duration!r}")


@dataclass(frozen=True, slots=True)
class BuildRecord:
    """One build in the history: its ``id`` and its :class:`BuildSummary`."""

    id: str
    summary: BuildSummary


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """What ``ls`` shows of a record (its header): ``id``, ``build`` (the built
    vertex's digest), ``started``, ``ended``, and the op counts."""

    id: str
    build: str
    started: float
    ended: float
    ops: int
    executed: int
    cached: int
    failed: int


def _encode(record: BuildRecord) -> str:
    s = record.summary
    position = {op.digest: i for i, op in enumerate(s.ops)}
    header = {
        "version": FORMAT_VERSION,
        "id": record.id,
        "build": s.build,
        "started": s.started,
        "ended": s.ended,
        "ops": len(s.ops),
        "executed": s.executed,
        "cached": s.cached,
        "failed": s.failed,
    }
    # One string per op, written with f-strings and the C string encoder: no
    # list per op is made (10,000 lists alive at once are promoted through the
    # GC's generations and can set off a full collection, which at this heap
    # size costs more than the record), and at 10,000 ops it takes about 24 ms
    # against 34 ms for json.dumps of the arrays (medians of 9). Times are
    # finite floats, whose repr is valid JSON.
    esc = json.encoder.encode_basestring
    rows = [
        f"[{esc(op.digest)},{esc(op.name)},{esc(op.state)},"
        f"{'null' if op.started is None else repr(op.started)},"
        f"{'null' if op.ended is None else repr(op.ended)},"
        f"{'null' if op.cache_source is None else esc(op.cache_source)},"
        f"{'null' if op.error is None else esc(op.error)},{esc(op.log_tail)},"
        f"{'null' if op.reason is None else esc(op.reason)},"
        f"[{','.join([str(position[d]) for d in op.inputs if d in position])}]]"
        for op in s.ops
    ]
    return json.dumps(header) + "\n[" + ",".join(rows) + "]\n"


def _decode(text: str, where: Path) -> BuildRecord:
    try:
        head_line, _, ops_line = text.partition("\n")
        header = json.loads(head_line)
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown record version {header.get('version')!r}")
        rows = json.loads(ops_line)
        digests = [row[0] for row in rows]
        ops = tuple(
            OpRecord(
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                tuple(digests[i] for i in row[9]),
            )
            for row in rows
        )
        summary = BuildSummary(header["build"], header["started"], header["ended"], ops)
        return BuildRecord(header["id"], summary)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise HistoryError(f"history record {where} is damaged: {exc}") from exc


def _build_order(path: Path) -> tuple[str, int]:
    """A record file's place: its start time, then when it was written."""
    try:
        written = path.stat().st_mtime_ns
    except FileNotFoundError:  # pruned by another process meanwhile
        written = 0
    return path.name[:16], written


def _header(path: Path) -> HistoryEntry:
    with path.open(encoding="utf-8") as f:
        line = f.readline()
    try:
        h = json.loads(line)
        return HistoryEntry(
            h["id"], h["build"], h["started"], h["ended"], h["ops"], h["executed"],
            h["cached"], h["failed"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError(f"history record {path} is damaged: {exc}") from exc


class BuildHistory:
    """The build records in ``directory`` (made on the first record), pruned by
    ``policy`` after each :meth:`add`.

    ``Solver(history=...)`` records every solve in one; the command line keeps
    its history in ``<cache dir>/snapshots/history``. Methods are synchronous
    file operations: O(records) for listing and pruning (file names only,
    plus each header for :meth:`entries`), O(ops) to read or write a record.
    """

    def __init__(self, directory: str | os.PathLike[str], policy: HistoryPolicy | None = None):
        self.directory = Path(directory)
        self.policy = policy if policy is not None else HistoryPolicy()
        #: The record :meth:`add` wrote last through this object, if any.
        self.last: BuildRecord | None = None

    def __repr__(self) -> str:
        return f"<BuildHistory {self.directory}>"

    def _files(self) -> list[Path]:
        """Record files, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        paths = [self.directory / n for n in names if n.endswith(_SUFFIX)]
        return sorted(paths, key=_build_order)

    def add(self, summary: BuildSummary) -> BuildRecord:
        """Write a record of ``summary`` under a new id, then apply the policy."""
        record = BuildRecord(secrets.token_hex(6), summary)
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"{round(summary.started * 1_000_000):016d}-{record.id}"
        tmp = self.directory / f"{stem}.tmp"
        tmp.write_text(_encode(record), encoding="utf-8")
        os.replace(tmp, self.directory / f"{stem}{_SUFFIX}")
        self.last = record
        self.prune(self.policy)
        return record

    def entries(self) -> list[HistoryEntry]:
        """Every record's header, newest first. A damaged file raises
        :class:`HistoryError`."""
        return [_header(p) for p in reversed(self._files())]

    def _find(self, ref: str) -> Path:
        if not ref:
            raise HistoryError("a history record id is empty")
        files = self._files()
        if ref in ("last", "-1"):
            if not files:
                raise HistoryError(f"the history in {self.directory} is empty")
            return files[-1]
        found = [p for p in files if p.stem.partition("-")[2].startswith(ref)]
        if not found:
            raise HistoryError(f"no build {ref!r} in the history ({self.directory})")
        if len(found) > 1:
            ids = ", ".join(p.stem.partition("-")[2] for p in found)
            raise HistoryError(f"build id {ref!r} is ambiguous: {ids}")
        return found[0]

    def get(self, ref: str) -> BuildRecord:
        """The record whose id is or starts with ``ref`` (``"last"``: the newest).
        :class:`HistoryError` when there is none, or more than one."""
        path = self._find(ref)
        return _decode(path.read_text(encoding="utf-8"), path)

    def __iter__(self) -> Iterator[BuildRecord]:
        """Every record, newest first (each read in full)."""
        for path in reversed(self._files()):
            yield _decode(path.read_text(encoding="utf-8"), path)

    def prune(
        self, policy: HistoryPolicy | None = None, *, now: float | None = None
    ) -> list[str]:
        """Delete the records ``policy`` (default: the history's) does not keep,
        and any ``.tmp`` a crashed writer left (an hour old); return the deleted
        ids, oldest first."""
        policy = policy if policy is not None else self.policy
        now = time.time() if now is None else now
        files = self._files()
        doomed: list[Path] = []
        if policy.keep_records is not None and len(files) > policy.keep_records:
            cut = len(files) - policy.keep_records
            doomed, files = files[:cut], files[cut:]
        if policy.keep_duration is not None:
            oldest = (now - policy.keep_duration) * 1_000_000
            while files and int(files[0].name[:16]) < oldest:
                doomed.append(files.pop(0))
        for path in doomed:
            path.unlink(missing_ok=True)
        # a .tmp is another writer's record in progress unless it is old
        for name in os.listdir(self.directory) if self.directory.is_dir() else ():
            tmp = self.directory / name
            if name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if tmp.stat().st_mtime < now - _STALE_TMP:
                        tmp.unlink()
        return [p.stem.partition("-")[2] for p in doomed]
