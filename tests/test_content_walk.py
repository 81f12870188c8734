"""The pieces of a ``file`` step's content key made faster for issue 21's
one-change build (``docs/performance.md``, "Issue 21: the one-change build"):
an entry's record is canonical JSON's bytes without the definition freezer, and
a selection's patterns match as ``fnmatch`` does with the literal ones kept in
a set. Both are checked against the slow, obvious form."""

from __future__ import annotations

import fnmatch
import random
import stat

import pytest

from solver import DefinitionError
from solver.definition import canonical_json
from solver.worker import _fileops


@pytest.mark.parametrize(
    "rel",
    ["a.c", "dir/x y.h", 'quote"and\\back', "tab\there", "\x01ctl", "é/ü.c", "日本.h", "emoji😀"],
)
@pytest.mark.parametrize("mode", [stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755])
def test_an_entry_record_is_canonical_json(rel: str, mode: int) -> None:
    got = _fileops.entry_record(rel, "/nonexistent", mode, lambda path: "ab" * 32)
    perm = stat.S_IMODE(mode) & ~0o222
    kind, body = ("dir", "") if stat.S_ISDIR(mode) else ("file", "ab" * 32)
    assert got == canonical_json([rel, kind, perm, body]) + b"\n"


def test_an_entry_with_a_lone_surrogate_fails_as_canonical_json_does() -> None:
    with pytest.raises(DefinitionError, match="lone surrogate U\\+DCFF"):
        _fileops.entry_record("bad\udcff.c", "/x", stat.S_IFREG | 0o644, lambda p: "0" * 64)


def test_patterns_match_as_fnmatch_does() -> None:
    """Random paths against random mixes of literal patterns (some with regex
    metacharacters) and globs: ``_matches`` is ``fnmatchcase`` of the path or
    one of its parents against any pattern (``/`` stripped from patterns)."""
    rng = random.Random(21)
    names = ["a.c", "b.h", "x+y.c", "p(1).h", "dir", "sub", "A.C", "a.cc", "^$.h", "{x}.c"]
    globs = ["*.h", "*.c", "s?b", "[ab].c", "dir/*", "*/b.h", "a.[ch]"]
    for _ in range(400):
        patterns = [rng.choice(names + globs) for _ in range(rng.randrange(1, 5))]
        patterns = [f"/{p}" if rng.random() < 0.2 else p for p in patterns]
        rel = "/".join(rng.choice(names) for _ in range(rng.randrange(1, 4)))
        parts = rel.split("/")
        candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        want = any(
            fnmatch.fnmatchcase(c, p.strip("/")) for c in candidates for p in patterns
        )
        assert _fileops._matches(rel, patterns) == want, (rel, patterns)
