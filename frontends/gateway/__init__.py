"""The gateway: frontends as separate programs, spoken to over a pipe.

On the solver side, :class:`Gateway` is a :class:`solver.Frontend` that runs the
program named by ``opts["source"]`` (a command line; an embedding application
lists the programs it allows in ``allowed_sources``) and serves its requests by
reference IDs over the program's stdin and stdout. In the program,
:func:`serve` is the whole ``main``: it runs a build function with a
:class:`~frontends.Client` (:class:`GatewayClient`) that speaks to the gateway.
The same build function runs unchanged in process
(:class:`frontends.forwarder.Forwarder`), and :class:`InProcessGateway` runs it
through the protocol without a subprocess.

The protocol is specified in ``docs/gateway-protocol.md`` (length-prefixed JSON
messages, version :data:`PROTOCOL_VERSION`). Ownership follows BuildKit's gateway
after PR #2929: the gateway holds every result the program solved, hands out one
split half per occurrence of an ID in the returned result, and releases
everything else when the session ends, on success, error and cancellation.
"""

from ._protocol import (
    MAX_MESSAGE_SIZE as MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION as PROTOCOL_VERSION,
    SUPPORTED_VERSIONS as SUPPORTED_VERSIONS,
    MemoryByteStream as MemoryByteStream,
    ProtocolError as ProtocolError,
    memory_byte_stream_pair as memory_byte_stream_pair,
)
from ._server import (
    MAX_IN_FLIGHT as MAX_IN_FLIGHT,
    Gateway as Gateway,
    GatewaySession as GatewaySession,
    InProcessGateway as InProcessGateway,
    Program as Program,
)
from .client import (
    GatewayClient as GatewayClient,
    RemoteReference as RemoteReference,
    run_build as run_build,
    serve as serve,
)
