"""A frontend program for the gateway tests: ``program.py MODE [BACKEND]``.

Modes that use :func:`frontends.gateway.serve` (the normal way):
``duplicate`` (one reference under many keys and in attestations), ``print``
(the same after printing to stdout, which must not reach the protocol), ``fail``
(the build function raises), ``read`` (reads files of its input through the
gateway and returns what it read as metadata), ``exit_after_return`` (returns,
then exits with status 5).

Modes that misbehave below ``serve`` (they use the client's private stdio helpers):
``crash`` (dies with status 3 in the middle of a session), ``hang`` (writes its
pid to ``opts["pidfile"]`` if given, then waits forever on a ``test.gate`` op),
``no_return`` (closes the session and exits 0 without returning), ``junk``
(writes garbage into the protocol stream), ``close_stdout`` (closes its output
without returning, then keeps running), ``return_twice`` (returns a result, then
an error, which is refused, and exits 0).
"""

from __future__ import annotations

import os
import sys

import anyio

from frontends import BuildResult, Client
from frontends.gateway import GatewayClient, serve
from frontends.gateway.client import _FdStream, _take_stdio
from solver import SolveError, SolveRequest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import duplicate_build, failing_build, text


async def print_build(client: Client) -> BuildResult:
    print("a stray print to stdout")
    sys.stdout.flush()
    os.write(1, b"a stray write to descriptor 1\n")
    return await duplicate_build(client)


async def read_build(client: Client) -> BuildResult:
    source = client.build_opts().inputs["source"]
    ref = (await client.solve(SolveRequest(definition=source))).ref
    assert ref is not None
    result = BuildResult()
    result.set_ref(ref)
    result.add_ref("again", ref)
    result.add_meta("greeting", await ref.read_file("dir/greeting.txt"))
    result.add_meta("part", await ref.read_file("dir/greeting.txt", 6, 5))
    names = sorted(st.path for st in await ref.read_dir("dir"))
    result.add_meta("names", ",".join(names).encode())
    result.add_meta("size", str((await ref.stat_file("dir/greeting.txt")).size).encode())
    return result


async def misbehave(mode: str) -> None:
    proto_in, proto_out = _take_stdio()
    stream = _FdStream(proto_in, proto_out)
    async with GatewayClient(stream) as client:
        solved = await client.solve(SolveRequest(definition=text("a", "b")))
        if mode == "return_twice":
            await client.return_result(solved)
            try:
                await client.return_error("changed my mind")
            except SolveError as exc:
                sys.stderr.write(f"the second return was refused: {exc}\n")
            return
        if mode == "crash":
            sys.stderr.write("about to crash\n")
            sys.stderr.flush()
            os._exit(3)
        if mode == "junk":
            os.write(proto_out, b"\x00\x00\x00\x05junk!")
            await anyio.sleep_forever()
        if mode == "close_stdout":
            await stream.send_eof()
            await anyio.sleep_forever()
        if mode == "hang":
            pidfile = client.build_opts().opts.get("pidfile")
            if pidfile:
                await anyio.Path(pidfile).write_text(str(os.getpid()))
            sys.stderr.write("hanging now\n")
            sys.stderr.flush()
            # blocks in the solver, on a gate the test never opens
            gated = await client.solve(SolveRequest(definition=text("a", "g", kind="test.gate")))
            assert gated.ref is not None
            await gated.ref.evaluate()
        assert mode == "no_return"


def main() -> None:
    mode = sys.argv[1]
    backend = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    if mode == "duplicate":
        serve(duplicate_build, backend=backend)
    if mode == "print":
        serve(print_build, backend=backend)
    if mode == "fail":
        serve(failing_build, backend=backend)
    if mode == "read":
        serve(read_build, backend=backend)
    if mode == "exit_after_return":
        try:
            serve(duplicate_build, backend=backend)
        except SystemExit as exc:
            os._exit(5 if exc.code == 0 else 6)
    anyio.run(misbehave, mode, backend=backend)


if __name__ == "__main__":
    main()
