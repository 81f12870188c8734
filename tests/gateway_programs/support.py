"""Build functions shared by the gateway tests and the test frontend programs in
this directory, and the test op kinds of ``tests/frontend_support.py`` (``test.text``,
``test.gate``, ``test.fail``), re-exported for the programs, which run with this
directory on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frontend_support import Ops, failing, text

from frontends import BuildResult, Client
from solver import Attestation, SolveRequest

__all__ = ["Ops", "duplicate_build", "failing", "failing_build", "text"]


# -- build functions (run in process, through the in-process gateway and as programs) --


async def duplicate_build(client: Client) -> BuildResult:
    """One reference under ``n`` keys (opts["n"], default 3), as the main ref, and
    in two attestations; a second reference once; metadata."""
    n = int(client.build_opts().opts.get("n", "3"))
    shared = await client.solve(SolveRequest(definition=text("a", "b")))
    other = await client.solve(SolveRequest(definition=text("a", "c")))
    assert shared.ref is not None
    assert other.ref is not None
    result = BuildResult()
    result.set_ref(shared.ref)
    for i in range(n):
        result.add_ref(f"platform-{i}", shared.ref)
    result.add_ref("other", other.ref)
    result.add_attestation("platform-0", Attestation("provenance", shared.ref, "/prov.json"))
    result.add_attestation(
        "platform-0", Attestation("sbom", shared.ref, "/sbom", {"format": b"spdx"})
    )
    result.add_attestation("other", Attestation("note", None, "", {"text": b"no ref"}))
    result.add_meta("frontend", b"duplicate")
    return result


async def failing_build(client: Client) -> BuildResult:
    """Solves something (so there is a reference to release), then raises."""
    await client.solve(SolveRequest(definition=text("a", "b")))
    raise ValueError("the build function says no")
