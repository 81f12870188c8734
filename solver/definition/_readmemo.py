"""Definitions read from JSON, kept by the digest of the text they were read from.

An application that holds a definition as JSON (a file it writes once and
builds many times, a request body) reads it again before every build, and for
a no-op build the reading was the largest single cost: on a real C library
(issue 21, ``benchmarks/cbuild_noop.py``) 1.7 ms of a 7.3 ms brotli build (70
ops) and 3.2 ms of a 10 ms pycryptodome build (124 ops), which parsed the JSON,
checked and froze every payload and computed each op's digest to check the
stated one. A :class:`Definition` is an immutable value, and equal texts give
equal definitions, so :meth:`Definition.from_json` returns the one it read
before from the same text instead.

Keyed by the SHA-256 of the text's UTF-8 bytes (a ``str`` and its UTF-8
encoding are one entry; about 70 us for a 95 KB text, against the 3 ms of
reading it), never by the text itself, which the memo does not keep. Only a
definition read without error is kept: a bad text is read, and rejected with
its error, every time.

Bounded twice: at most :data:`MAX_DEFINITIONS` definitions, and at most
:data:`MAX_TEXT_BYTES` bytes of the texts they were read from (what a kept
definition costs in memory grows with its text: about ten times as much). The
least recently used goes first; a text larger than the whole budget is never
kept. A lock guards the few dict operations, since a definition may be read in
several threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._definition import Definition

__all__ = ["MAX_DEFINITIONS", "MAX_TEXT_BYTES", "ReadMemo", "read_memo"]

MAX_DEFINITIONS: Final = 16
"""Definitions the memo keeps at most."""

MAX_TEXT_BYTES: Final = 8 * 1024 * 1024
"""Bytes of JSON text the kept definitions were read from, at most, all together."""


class ReadMemo:
    """Definitions by the digest of their JSON text (see the module docstring)."""

    __slots__ = ("_bytes", "_kept", "_lock", "max_bytes", "max_definitions")

    def __init__(
        self, max_definitions: int = MAX_DEFINITIONS, max_bytes: int = MAX_TEXT_BYTES
    ) -> None:
        self.max_definitions = max_definitions
        self.max_bytes = max_bytes
        # digest -> (definition, size of its text), least recently used first
        self._kept: OrderedDict[bytes, tuple[Definition, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str | bytes | bytearray) -> tuple[bytes, int] | None:
        """The digest of ``text``'s UTF-8 bytes and their size; None when a ``str``
        has no UTF-8 encoding (a lone surrogate: nothing is kept for it)."""
        if isinstance(text, str):
            try:
                data: bytes | bytearray = text.encode("utf-8")
            except UnicodeEncodeError:
                return None
        else:
            data = text
        return hashlib.sha256(data).digest(), len(data)

    def get(self, key: bytes) -> Definition | None:
        """The definition kept for ``key``, now the most recently used; or None."""
        with self._lock:
            kept = self._kept.get(key)
            if kept is None:
                return None
            self._kept.move_to_end(key)
            return kept[0]

    def keep(self, key: bytes, size: int, definition: Definition) -> None:
        """Keep ``definition``, read from a text of ``size`` bytes whose digest is
        ``key``, dropping the least recently used to stay within both bounds."""
        if size > self.max_bytes or self.max_definitions < 1:
            return
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._kept[key] = (definition, size)
            self._bytes += size
            while len(self._kept) > self.max_definitions or self._bytes > self.max_bytes:
                _, (_, dropped) = self._kept.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        """Forget every kept definition."""
        with self._lock:
            self._kept.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def text_bytes(self) -> int:
        """The bytes of text the kept definitions were read from, all together."""
        return self._bytes

    def __repr__(self) -> str:
        return (
            f"<ReadMemo {len(self._kept)}/{self.max_definitions} definitions, "
            f"{self._bytes}/{self.max_bytes} bytes of text>"
        )


read_memo: Final = ReadMemo()
""":meth:`Definition.from_json`'s memo."""
