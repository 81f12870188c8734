"""The ``merge`` kind: payload ``{}``; one or more inputs; one output holding the
union of the inputs' files, applied in input order (a later input wins: its entry
replaces whatever an earlier one had at that path; directories are merged).

Cache map: a fixed digest; every input takes part as a whole. The inputs are laid
into an empty working directory in a worker thread, their regular files
hard-linked (each sealed file is one inode however many snapshots name it) and
their digests carried into the new snapshot's table (:mod:`._storelinks`);
nothing is followed through a symlink.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence

import anyio
import anyio.to_thread

from .._digest import digest_of
from .._errors import SolveError
from .._op import CacheMap, CacheMapDep
from .._result import Result
from ..definition import JSONValue, OpContext, OpKindRegistry
from ._digesttables import DigestTable
from ._fileops import check_fields, copy_entries, select_tree, snapshot_view
from ._snapshots import SnapshotRef, SnapshotStore
from ._storelinks import StoreLinks, carry_digests

__all__ = ["register_merge"]


def validate_merge(payload: Mapping[str, JSONValue]) -> None:
    check_fields("merge", "payload", payload, ())


def _merge_into(
    out: str, inputs: list[tuple[str, DigestTable | None]], table: DigestTable
) -> StoreLinks:
    """Lay the input snapshots' trees (directory, digest table) over ``out`` in
    order, hard-linking their files (see :func:`copy_one`) and carrying their
    digests into ``table``; returns the links."""
    links = StoreLinks()
    for root, _ in inputs:
        copy_entries(select_tree(root, what="merge input entry"), out, links)
    carry_digests(links, out, inputs, table)
    if inputs:
        # the trees are laid over the first one's, root included (a walk lists
        # no root): its mode, writable by the owner until the commit seals it
        mode = stat.S_IMODE(os.stat(inputs[0][0]).st_mode)
        os.chmod(out, mode | stat.S_IRWXU)
    return links


class MergeOp:
    def __init__(self, ctx: OpContext, store: SnapshotStore) -> None:
        if ctx.inputs < 1:
            raise SolveError("merge op needs at least one input")
        self.store = store
        self.inputs = ctx.inputs
        self.vertex = ctx.vertex.digest
        self.name = ctx.vertex.name

    async def cache_map(self, index: int) -> tuple[CacheMap, bool]:
        deps = [CacheMapDep() for _ in range(self.inputs)]
        return CacheMap(digest_of(b"solver.worker/merge/v1"), deps), True

    async def exec(self, inputs: Sequence[Result]) -> Sequence[Result]:
        views = [snapshot_view(r, f"input {i} of merge op {self.name!r}")
                 for i, r in enumerate(inputs)]
        mutable = await self.store.new_mutable(
            {"kind": "merge", "vertex": self.vertex, "name": self.name}
        )
        try:
            sources = [(os.fspath(v.path), self.store.digest_table(v)) for v in views]
            links = await anyio.to_thread.run_sync(
                _merge_into,
                os.fspath(mutable.path),
                sources,
                self.store.new_snapshot_table(mutable),
            )
            mutable.share_store_files(links.inodes)
            ref: SnapshotRef = await mutable.commit()
        finally:
            with anyio.CancelScope(shield=True):
                await mutable.discard()
        return [ref]


def register_merge(registry: OpKindRegistry, store: SnapshotStore) -> None:
    """Register the ``merge`` kind, bound to ``store``."""
    registry.register("merge", lambda ctx: MergeOp(ctx, store), validate=validate_merge)
