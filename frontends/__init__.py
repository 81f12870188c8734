"""The frontend side of the engine.

A frontend turns build options into solve requests and returns references to
results. It is written as one build function against :class:`Client`::

    async def build(client: Client) -> BuildResult:
        base = await client.solve(SolveRequest(definition=...))
        result = BuildResult()
        for platform in ("linux/amd64", "linux/arm64"):
            result.add_ref(platform, base.ref)     # one reference, several keys
        return result

and runs in process (:class:`frontends.forwarder.Forwarder`) or as a separate
program over a pipe (:class:`frontends.gateway.Gateway` on the solver side,
:func:`frontends.gateway.serve` as the program's ``main``). Either way the client
owns every reference and each underlying result is released exactly once.
"""

from solver import Attestation as Attestation

from ._api import (
    BuildFunction as BuildFunction,
    BuildOpts as BuildOpts,
    BuildResult as BuildResult,
    Client as Client,
    Reference as Reference,
    Stat as Stat,
)
