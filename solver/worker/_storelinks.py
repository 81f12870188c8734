"""The hard links a ``file`` copy or a ``merge`` makes from sealed snapshots of the
store into its new snapshot, and the file digests they carry.

A regular file of a sealed snapshot never changes, and a hard link of it is the
same inode: the same bytes. So when an op links ``src`` (a file of an input
snapshot) to ``dst`` (in its working directory), the digest the input's table
(:mod:`solver.worker._digesttables`) holds for ``src`` is the digest of ``dst``
too, and is copied into the new snapshot's table before it is committed: a
content key over the new snapshot then reads none of the linked files (issue 21:
the merge of a C build's objects used to hash all 31 objects after a one-line
edit, its table starting empty). Where the input's table does not know the file
yet, the new table remembers the link, and tells the input's table the digest
when it hashes the file (:meth:`DigestTable.carry`), so the next link from that
input carries it.

Nothing is trusted by name alone: an entry is copied only while the linked name
is still the inode that was linked (a later action of the same op may have
replaced it), and the table entries themselves are keyed by inode, size and
``mtime_ns`` (:meth:`DigestTable.lookup`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._digesttables import DigestTable

__all__ = ["StoreLinks", "carry_digests"]


@dataclass(slots=True)
class StoreLinks:
    """What one op linked: ``inodes`` for
    :meth:`~solver.worker.MutableSnapshot.share_store_files`, and each link made
    as ``(src, dst, device, inode)``, in order."""

    inodes: set[tuple[int, int]] = field(default_factory=set)
    made: list[tuple[str, str, int, int]] = field(default_factory=list)

    def record(self, src: str, dst: str, st: os.stat_result) -> None:
        """``dst`` was just made a hard link of ``src``; ``st`` is its lstat."""
        self.inodes.add((st.st_dev, st.st_ino))
        self.made.append((src, dst, st.st_dev, st.st_ino))


def carry_digests(
    links: StoreLinks,
    out: str,
    inputs: Sequence[tuple[str, DigestTable | None]],
    table: DigestTable,
) -> int:
    """Copy into ``table`` (the table of the snapshot the working directory
    ``out`` becomes) the digests the input snapshots' tables hold for the files
    linked from them; ``inputs`` are each input's directory and table (``None``:
    not a snapshot of this store). Runs in a worker thread, after every action,
    before the commit; writes the table if it gained entries. Returns how many
    digests were carried; no file is read."""
    prefixes = [(os.path.join(root, ""), origin) for root, origin in inputs]
    out_prefix = os.path.join(out, "")
    carried = 0
    for src, dst, dev, ino in links.made:
        if not dst.startswith(out_prefix):
            continue
        found = next(((p, o) for p, o in prefixes if o is not None and src.startswith(p)), None)
        if found is None:
            continue
        prefix, origin = found
        assert origin is not None
        try:
            st = os.lstat(dst)
        except OSError:  # removed by a later action
            continue
        if (st.st_dev, st.st_ino) != (dev, ino):  # replaced by a later action
            continue
        if table.carry(dst[len(out_prefix):], st, origin, src[len(prefix):]):
            carried += 1
    if carried:
        table.save()
    return carried
