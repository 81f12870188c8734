"""The gateway: duplicate refs, concurrency, cancellation and errors at every step of
a frontend session, misbehaving programs, and every underlying result released
exactly once (BuildKit PR #2929 and the weak spots after it).

Most tests run the session in process (:class:`InProcessGateway`, the protocol over
an in-memory pipe); the tests marked ``subprocess`` run real programs
(``tests/gateway_programs/program.py``) through :class:`Gateway`.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from gateway_programs.support import Ops, duplicate_build, failing, failing_build, text

from frontends import BuildResult, Client
from frontends.forwarder import Forwarder
from frontends.gateway import (
    Gateway,
    GatewayClient,
    InProcessGateway,
    RemoteReference,
)
from frontends.gateway._protocol import (
    HEADER_SIZE,
    FrameReader,
    FrameWriter,
    encode_frame,
)
from solver import Attestation, Frontend, SolveError, Solver, SolveRequest, SolveResult
from solver.testing import HandleTracker
from solver.worker import State, Worker

pytestmark = pytest.mark.anyio

PROGRAM = Path(__file__).parent / "gateway_programs" / "program.py"


def program_source(mode: str, backend: str) -> str:
    return shlex.join([sys.executable, str(PROGRAM), mode, backend])


def values_of(res: SolveResult) -> dict[str, object]:
    """Values of a result by key (``""`` for ``ref``, ``att:<key>:<kind>`` for
    attestation refs); asserts each occurrence is a handle of its own."""
    values: dict[str, object] = {}
    handles = []
    if res.ref is not None:
        values[""] = res.ref.sys
        handles.append(res.ref)
    for key, ref in res.refs.items():
        values[key] = ref.sys
        handles.append(ref)
    for key, atts in res.attestations.items():
        for att in atts:
            if att.ref is not None:
                values[f"att:{key}:{att.kind}"] = att.ref.sys
                handles.append(att.ref)
    assert len({id(h) for h in handles}) == len(handles)
    return values


async def solve_with(
    ops: Ops, frontend: Frontend, others: dict[str, Frontend] | None = None, **opts: str
) -> tuple[dict[str, object], dict[str, bytes]]:
    """Solve through ``frontend``; the values and metadata of its result."""
    frontends = {"fe": frontend, **(others or {})}
    with anyio.fail_after(20):
        async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:
            request = SolveRequest(frontend="fe", frontend_opts=opts)
            async with await s.solve(request) as res:
                values = values_of(res)
                metadata = dict(res.metadata)
    assert ops.live_values() == []
    return values, metadata


async def solve_and_release(s: Solver, request: SolveRequest) -> None:
    """Solve and release the result (for solves that are expected to fail)."""
    res = await s.solve(request)
    await res.release()


async def solve_fails(
    ops: Ops, frontend: Frontend, match: str, others: dict[str, Frontend] | None = None,
    **opts: str,
) -> SolveError:
    frontends = {"fe": frontend, **(others or {})}
    with anyio.fail_after(20):
        async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:
            with pytest.raises(SolveError, match=match) as info:
                await solve_and_release(s, SolveRequest(frontend="fe", frontend_opts=opts))
    assert ops.live_values() == []
    return info.value


def halves_alive(tracker: HandleTracker) -> int:
    return sum(1 for line in tracker.live if line.startswith("ResultProxyHalf"))


class Raw:
    """A hand-written program speaking raw protocol (to break it on purpose)."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.reader = FrameReader(stream)
        self.writer = FrameWriter(stream)
        self.next_id = 100

    async def send(self, msg: dict[str, Any]) -> None:
        await self.writer.send(msg)

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        msg = {"id": self.next_id, **msg}
        self.next_id += 1
        await self.send(msg)
        answer = await self.reader.receive()
        assert answer is not None
        assert answer["id"] == msg["id"], answer
        return answer

    async def hello(self) -> dict[str, Any]:
        answer = await self.call({"type": "hello", "versions": [1]})
        assert answer["type"] == "reply", answer
        return answer

    async def solve(self, *parts: str, kind: str = "test.text") -> str:
        answer = await self.call({"type": "solve", "definition": text(*parts, kind=kind).to_json()})
        assert answer["type"] == "reply", answer
        ref_id: str = answer["result"]["ref"]["id"]
        return ref_id


# -- duplicate references -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5])
async def test_same_reference_under_n_keys_and_in_attestations(
    n: int, handle_tracker: HandleTracker
) -> None:
    ops = Ops()
    values, metadata = await solve_with(ops, InProcessGateway(duplicate_build), n=str(n))
    expected: dict[str, object] = {"": "ab", "other": "ac"}
    expected |= {f"platform-{i}": "ab" for i in range(n)}
    expected |= {"att:platform-0:provenance": "ab", "att:platform-0:sbom": "ab"}
    assert values == expected
    assert metadata == {"frontend": b"duplicate"}
    assert sorted(ops.execs) == ["a", "b", "c"]  # each value built once


async def test_one_build_function_runs_unchanged_in_process_and_through_the_gateway(
    handle_tracker: HandleTracker,
) -> None:
    forwarded = await solve_with(Ops(), Forwarder(duplicate_build), n="3")
    gatewayed = await solve_with(Ops(), InProcessGateway(duplicate_build), n="3")
    assert forwarded == gatewayed


async def test_a_reference_from_a_nested_frontend_is_adopted_and_returned_twice(
    handle_tracker: HandleTracker,
) -> None:
    async def build(client: Client) -> BuildResult:
        nested = await client.solve(SolveRequest(frontend="nested", frontend_opts={"n": "2"}))
        assert nested.ref is not None
        assert nested.refs["platform-1"] is not nested.ref
        assert nested.metadata == {"frontend": b"duplicate"}
        assert [a.kind for a in nested.attestations["platform-0"]] == ["provenance", "sbom"]
        result = BuildResult()
        result.add_ref("x", nested.ref)
        result.add_ref("y", nested.ref)
        result.add_ref("other", nested.refs["other"])
        return result

    # the nested frontend is itself a gateway, and a forwarder
    for nested in (InProcessGateway(duplicate_build), Forwarder(duplicate_build)):
        ops = Ops()
        values, _ = await solve_with(ops, InProcessGateway(build), {"nested": nested})
        assert values == {"x": "ab", "y": "ab", "other": "ac"}


async def test_definitions_and_build_options_cross_the_wire(
    handle_tracker: HandleTracker,
) -> None:
    seen: dict[str, object] = {}

    async def build(client: Client) -> BuildResult:
        opts = client.build_opts()
        seen["opts"] = dict(opts.opts)
        seen["inputs"] = dict(opts.inputs)
        res = await client.solve(SolveRequest(definition=opts.inputs["src"]))
        assert res.ref is not None
        seen["definition"] = res.ref.to_definition()
        result = BuildResult()
        result.set_ref(res.ref)
        return result

    ops = Ops()
    src = text("x", "y")
    frontends = {"fe": InProcessGateway(build)}
    async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:
        request = SolveRequest(
            frontend="fe", frontend_opts={"k": "v"}, frontend_inputs={"src": src}
        )
        async with await s.solve(request) as res:
            assert res.ref is not None
            assert res.ref.sys == "xy"
    assert seen == {"opts": {"k": "v"}, "inputs": {"src": src}, "definition": src}


# -- concurrency ---------------------------------------------------------------------------


async def test_fifty_concurrent_solves_sharing_vertices(handle_tracker: HandleTracker) -> None:
    async def build(client: Client) -> BuildResult:
        i = int(client.build_opts().opts["i"])
        shared = (await client.solve(SolveRequest(definition=text("a", "b")))).ref
        own = (await client.solve(SolveRequest(definition=text("a", "b", f"c{i % 5}")))).ref
        assert shared is not None
        assert own is not None
        await own.evaluate()
        result = BuildResult()
        result.set_ref(own)
        result.add_ref("x", shared)
        result.add_ref("y", shared)
        result.add_attestation("x", Attestation("provenance", own))
        return result

    ops = Ops()
    outcomes: dict[int, dict[str, object]] = {}
    with anyio.fail_after(60):
        async with Solver(op_kinds=ops.registry(), frontends={"gw": InProcessGateway(build)}) as s:

            async def one(i: int) -> None:
                request = SolveRequest(frontend="gw", frontend_opts={"i": str(i)})
                async with await s.solve(request) as res:
                    outcomes[i] = values_of(res)

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
    for i, values in outcomes.items():
        own = f"abc{i % 5}"
        assert values == {"": own, "x": "ab", "y": "ab", "att:x:provenance": own}
    assert len(outcomes) == 50
    assert Counter(ops.execs) == dict.fromkeys(["a", "b", "c0", "c1", "c2", "c3", "c4"], 1)
    assert ops.live_values() == []


async def test_one_program_sends_concurrent_requests_from_many_tasks(
    handle_tracker: HandleTracker,
) -> None:
    async def build(client: Client) -> BuildResult:
        refs: dict[int, Any] = {}

        async def one(i: int) -> None:
            res = await client.solve(SolveRequest(definition=text("a", f"t{i % 7}")))
            assert res.ref is not None
            await res.ref.evaluate()
            refs[i] = res.ref
            if i % 3 == 0:
                await res.ref.release()

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
        result = BuildResult()
        for i, ref in refs.items():
            if i % 3:
                result.add_ref(str(i), ref)
        return result

    ops = Ops()
    values, _ = await solve_with(ops, InProcessGateway(build))
    assert values == {str(i): f"at{i % 7}" for i in range(40) if i % 3}


# -- reading files (the built-in worker) ---------------------------------------------------


async def test_reads_go_over_the_wire_in_chunks(
    tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    big = bytes(range(256)) * 200  # 51200 bytes: 9 reads in messages of 8 KiB
    ctx = tmp_path / "ctx"
    (ctx / "dir").mkdir(parents=True)
    (ctx / "dir" / "greeting.txt").write_text("hello world")
    (ctx / "dir" / "big.bin").write_bytes(big)
    (ctx / "dir" / "b").write_text("b")
    src = State.local(ctx)  # a small definition: the data stays on disk

    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=client.build_opts().inputs["src"]))).ref
        assert ref is not None
        assert await ref.read_file("dir/greeting.txt") == b"hello world"
        assert await ref.read_file("dir/greeting.txt", 6, 3) == b"wor"
        assert await ref.read_file("dir/greeting.txt", 6, 0) == b""
        assert await ref.read_file("dir/greeting.txt", 100) == b""
        assert await ref.read_file("dir/big.bin") == big
        assert await ref.read_file("dir/big.bin", 1000, 20000) == big[1000:21000]
        assert [st.path for st in await ref.read_dir("dir")] == ["b", "big.bin", "greeting.txt"]
        assert [st.path for st in await ref.read_dir("dir", "*.txt")] == ["greeting.txt"]
        stat = await ref.stat_file("dir/big.bin")
        assert stat.size == len(big)
        assert stat.is_file
        with pytest.raises(SolveError, match=r"reading 'dir/missing' in reference ref-"):
            await ref.read_file("dir/missing")
        with pytest.raises(SolveError, match=r"unknown reference 'ref-nope'"):
            await RemoteReference(client, "ref-nope", None).read_file("dir/b")  # type: ignore[arg-type]
        result = BuildResult()
        result.set_ref(ref)
        result.add_ref("again", ref)
        return result

    with anyio.fail_after(30):
        async with Worker(tmp_path / "w") as worker:
            frontends = {"gw": InProcessGateway(build, max_message_size=8192)}
            async with Solver(op_kinds=worker.op_kinds, frontends=frontends) as s:
                request = SolveRequest(frontend="gw", frontend_inputs={"src": src.definition()})
                async with await s.solve(request) as res:
                    assert res.ref is not None
                    assert res.refs["again"] is not res.ref
                    assert await res.refs["again"].sys.read_bytes("dir/b") == b"b"  # type: ignore[attr-defined]
            assert [info.handles for info in await worker.store.usage()] == [0]


async def test_the_client_keeps_to_the_gateway_s_message_limit(
    handle_tracker: HandleTracker,
) -> None:
    async def program(stream: anyio.abc.ByteStream) -> int:
        async with GatewayClient(stream) as client:  # its own limit is 16 MiB
            big = text("x" * 5000)
            with pytest.raises(SolveError, match="exceeds the limit of 4096 bytes"):
                await client.solve(SolveRequest(definition=big))
            res = await client.solve(SolveRequest(definition=text("a")))
            await client.return_result(res)
        return 0

    gateway = InProcessGateway.for_program(program, max_message_size=4096)
    values, _ = await solve_with(Ops(), gateway)
    assert values == {"": "a"}


async def test_reading_a_result_that_is_not_a_snapshot_is_a_clear_error(
    handle_tracker: HandleTracker,
) -> None:
    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a")))).ref
        assert ref is not None
        await ref.read_dir("")
        return BuildResult()

    await solve_fails(
        Ops(), InProcessGateway(build),
        r"failed: cannot read files of reference ref-\S+: its result is a str, not a snapshot",
    )


# -- errors at each step ------------------------------------------------------------------------


async def test_the_program_s_error_is_the_solve_s_error(handle_tracker: HandleTracker) -> None:
    await solve_fails(
        Ops(), InProcessGateway(failing_build),
        r"^in-process frontend 'failing_build' failed: ValueError: the build function says no$",
    )


ERROR_STEPS = {
    "start": r"failed: RuntimeError: at start$",
    "after_solve": r"failed: RuntimeError: after solve$",
    "evaluate_fails": r"failed: evaluating result .* boom|failed: .*boom",
    "bad_definition": r"failed: .*unknown op kind 'test\.nope'",
    "unknown_frontend": r"failed: unknown frontend 'nope'",
    "nested_frontend_fails": r"failed: frontend build function failed: .*the build function says",
    "not_a_build_result": r"failed: the build function returned a dict, not a frontends\.Build",
    "not_a_reference": r"failed: refs\['k'\] of the returned result is a str, not a reference",
    "task_group": r"failed: RuntimeError: (one; RuntimeError: two|two; RuntimeError: one)$",
}


@pytest.mark.parametrize("step", list(ERROR_STEPS))
async def test_an_exception_at_each_step_releases_everything(
    step: str, handle_tracker: HandleTracker
) -> None:
    from solver import Definition, node

    async def build(client: Client) -> Any:
        if step == "start":
            raise RuntimeError("at start")
        res = await client.solve(SolveRequest(definition=text("a", "b")))
        assert res.ref is not None
        await res.ref.evaluate()
        if step == "after_solve":
            raise RuntimeError("after solve")
        if step == "evaluate_fails":
            bad = await client.solve(SolveRequest(definition=failing("boom")))
            assert bad.ref is not None
            await bad.ref.evaluate()
        if step == "bad_definition":
            await client.solve(SolveRequest(definition=Definition.of(node("test.nope", {}))))
        if step == "unknown_frontend":
            await client.solve(SolveRequest(frontend="nope"))
        if step == "nested_frontend_fails":
            await client.solve(SolveRequest(frontend="failing"))
        if step == "not_a_build_result":
            return {"ref": res.ref}
        result = BuildResult()
        result.set_ref(res.ref)
        if step == "not_a_reference":
            result.add_ref("k", "ref-pretend")  # type: ignore[arg-type]
        if step == "task_group":

            async def fail(message: str) -> None:
                raise RuntimeError(message)  # no checkpoint: both fail whoever runs first

            async with anyio.create_task_group() as tg:
                tg.start_soon(fail, "one")
                tg.start_soon(fail, "two")
        return result

    await solve_fails(
        Ops(), InProcessGateway(build), ERROR_STEPS[step],
        {"failing": Forwarder(failing_build)},
    )


async def test_an_error_from_the_bridge_can_be_caught_by_the_build_function(
    handle_tracker: HandleTracker,
) -> None:
    async def build(client: Client) -> BuildResult:
        bad = await client.solve(SolveRequest(definition=failing("boom")))
        assert bad.ref is not None
        with pytest.raises(SolveError, match="boom"):
            await bad.ref.evaluate()
        with pytest.raises(SolveError, match="unknown frontend"):
            await client.solve(SolveRequest(frontend="nope"))
        good = await client.solve(SolveRequest(definition=text("a")))
        result = BuildResult()
        result.set_ref(good.ref)
        return result

    values, _ = await solve_with(Ops(), InProcessGateway(build))
    assert values == {"": "a"}


# -- returns the gateway must refuse ----------------------------------------------------------


async def test_an_unknown_id_in_return_releases_the_halves_split_before_it(
    handle_tracker: HandleTracker,
) -> None:
    seen: dict[str, object] = {}

    async def program(stream: anyio.abc.ByteStream) -> int:
        async with GatewayClient(stream) as client:
            a = (await client.solve(SolveRequest(definition=text("a", "b")))).ref
            b = (await client.solve(SolveRequest(definition=text("a", "c")))).ref
            assert a is not None
            assert b is not None
            await a.evaluate()
            await b.evaluate()
            result = BuildResult()
            result.set_ref(a)
            result.add_ref("x", a)
            result.add_ref("y", b)
            result.add_attestation("x", Attestation("provenance", a))
            result.add_ref("z", RemoteReference(client, "ref-forged", None))
            with pytest.raises(SolveError, match=r"refs\['z'\]: unknown reference 'ref-forged'"):
                await client.return_result(result)
            # The three halves split for ref, x and y are released already: only the
            # two references' own halves are alive (the return never got to the
            # attestation).
            seen["halves"] = halves_alive(handle_tracker)
            with pytest.raises(SolveError, match="a result may be set only once"):
                await client.return_error("too late")
        return 1

    ops = Ops()
    await solve_fails(
        ops, InProcessGateway.for_program(program),
        r"failed: it returned twice \(a result may be set only once\); its first return "
        r"failed: its result was refused: refs\['z'\]: unknown reference 'ref-forged' "
        r"\(not an ID this frontend session handed out",
    )
    assert seen == {"halves": 2}


async def test_an_id_from_another_session_is_unknown(handle_tracker: HandleTracker) -> None:
    passed: dict[str, Any] = {}
    handed = anyio.Event()
    b_done = anyio.Event()

    async def build_a(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a", "b")))).ref
        assert ref is not None
        passed["ref"] = ref
        handed.set()
        await b_done.wait()
        result = BuildResult()
        result.add_ref("mine", ref)
        result.add_ref("again", ref)
        return result

    async def build_b(client: Client) -> BuildResult:
        await handed.wait()
        own = (await client.solve(SolveRequest(definition=text("a", "b")))).ref
        result = BuildResult()
        result.add_ref("own", own)  # type: ignore[arg-type]
        result.add_ref("stolen", passed["ref"])
        try:
            return result
        finally:
            b_done.set()

    ops = Ops()
    frontends = {"a": InProcessGateway(build_a), "b": InProcessGateway(build_b)}
    with anyio.fail_after(20):
        async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:

            async def run_a() -> None:
                async with await s.solve(SolveRequest(frontend="a")) as res:
                    assert values_of(res) == {"mine": "ab", "again": "ab"}

            async def run_b() -> None:
                stolen = passed.get("ref")
                stolen_id = r"refs\['stolen'\]: unknown reference"
                with pytest.raises(SolveError, match=stolen_id) as info:
                    await solve_and_release(s, SolveRequest(frontend="b"))
                assert passed["ref"].id in str(info.value)
                assert stolen is None  # only looked up once b ran

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_a)
                tg.start_soon(run_b)
    assert ops.live_values() == []


async def test_returning_or_reading_a_released_reference_fails(
    handle_tracker: HandleTracker,
) -> None:
    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a")))).ref
        assert ref is not None
        await ref.release()
        await ref.release()  # idempotent
        with pytest.raises(SolveError, match="was released"):
            await ref.evaluate()
        result = BuildResult()
        result.set_ref(ref)
        return result

    await solve_fails(Ops(), InProcessGateway(build), r"failed: its result was refused: ref: "
                      r"reference ref-\S+ was released")


async def test_releasing_early_and_returning_the_rest(handle_tracker: HandleTracker) -> None:
    async def build(client: Client) -> BuildResult:
        tmp = (await client.solve(SolveRequest(definition=text("t")))).ref
        keep = (await client.solve(SolveRequest(definition=text("k")))).ref
        assert tmp is not None
        assert keep is not None
        await tmp.evaluate()
        await tmp.release()
        # its proxy is gone at once (the solver's cache keeps its own handle on "t")
        proxies = [line for line in handle_tracker.live if line.startswith("DefinitionProxy")]
        assert len(proxies) == 1
        result = BuildResult()
        result.add_ref("a", keep)
        result.add_ref("b", keep)
        await result.release()  # release() of a BuildResult only frees early...
        assert keep.released
        return result  # ...and empties it

    ops = Ops()
    values, _ = await solve_with(ops, InProcessGateway(build))
    assert values == {}


# -- a second return: the solve fails, and both returns leave nothing behind --------------------


SECOND_RETURNS = ["error", "same_refs", "other_refs", "forged_refs", "released_ref"]


@pytest.mark.parametrize("second", SECOND_RETURNS)
@pytest.mark.parametrize("first", ["result", "error"])
async def test_a_second_return_fails_the_solve_and_releases_both(
    first: str, second: str, handle_tracker: HandleTracker
) -> None:
    """Whatever the second return names (the first's IDs, others, forged ones, a
    released one), it is refused without looking at them and the solve fails; the
    first result is released at once, the second splits nothing, and the table's
    halves go when the session ends."""
    seen: dict[str, object] = {}

    async def program(stream: anyio.abc.ByteStream) -> int:
        raw = Raw(stream)
        await raw.hello()
        a = await raw.solve("a", "b")
        b = await raw.solve("a", "c")
        for ref in (a, b):
            assert (await raw.call({"type": "evaluate", "ref": ref}))["type"] == "reply"
        if first == "result":
            body: dict[str, Any] = {"result": {"ref": a, "refs": {"k": a, "l": b}}}
        else:
            body = {"error": "first thoughts"}
        ok = await raw.call({"type": "return", **body})
        assert ok["type"] == "reply", ok
        if second == "error":
            body = {"error": "changed my mind"}
        elif second == "same_refs":
            body = {"result": {"ref": a, "refs": {"k": a, "l": b}}}
        elif second == "other_refs":
            body = {"result": {"ref": b, "refs": {"m": b, "n": b}}}
        elif second == "forged_refs":
            body = {"result": {"ref": "ref-forged", "refs": {"k": a, "x": "ref-x" * 40}}}
        else:
            assert (await raw.call({"type": "release", "refs": [b]}))["type"] == "reply"
            body = {"result": {"ref": b}}
        before = halves_alive(handle_tracker)
        again = await raw.call({"type": "return", **body})
        assert again["type"] == "error", again
        assert "a result may be set only once" in again["message"]
        assert "forged" not in again["message"]  # refused before its IDs are looked at
        seen["released by the second"] = before - halves_alive(handle_tracker)
        seen["left"] = halves_alive(handle_tracker)
        # The session goes on (an error answer fails that request only)...
        assert (await raw.call({"type": "evaluate", "ref": a}))["type"] == "reply"
        # ...and a third return changes nothing.
        third = await raw.call({"type": "return", "error": "third time"})
        assert third["type"] == "error", third
        return 0

    ops = Ops()
    first_failed = "" if first == "result" else r"; its first return failed: first thoughts"
    await solve_fails(
        ops, InProcessGateway.for_program(program, name="p"),
        r"^in-process frontend 'p' failed: it returned twice \(a result may be set only "
        r"once\)" + first_failed + "$",
    )
    # The first result's halves (one per occurrence: ref, k, l) go at once, and
    # the second return split none: only the table's own halves are left (a
    # reference keeps a half once it was split for a result; b's went with its
    # release).
    if first == "result":
        left = 1 if second == "released_ref" else 2
        assert seen == {"released by the second": 3, "left": left}
    else:
        assert seen == {"released by the second": 0, "left": 0}
    assert sorted(ops.execs) == ["a", "b", "c"]  # each value built once, all released


@pytest.mark.parametrize("case", ["one_unanswered", "two_unanswered", "second_unanswered"])
async def test_returns_count_when_read_even_if_the_program_closes_before_the_answer(
    case: str, handle_tracker: HandleTracker
) -> None:
    """The gateway stops serving (and cancels what it is still serving) when the
    program closes its output; a return it has read counts all the same, so a
    second return sent just before closing fails the solve on every scheduling."""

    async def program(stream: anyio.abc.ByteStream) -> int:
        raw = Raw(stream)
        await raw.hello()
        ref = await raw.solve("a", "b")
        result = {"ref": ref, "refs": {"k": ref}}
        if case == "second_unanswered":
            assert (await raw.call({"type": "return", "result": result}))["type"] == "reply"
        else:
            await raw.send({"type": "return", "id": 1, "result": result})
        if case != "one_unanswered":
            await raw.send({"type": "return", "id": 2, "error": "changed my mind"})
        return 0  # closes the stream without reading any answer

    ops = Ops()
    gateway = InProcessGateway.for_program(program, name="p")
    if case == "one_unanswered":
        values, _ = await solve_with(ops, gateway)
        assert values == {"": "ab", "k": "ab"}
    else:
        await solve_fails(
            ops, gateway,
            r"^in-process frontend 'p' failed: it returned twice \(a result may be set only "
            r"once\)$",
        )


# -- the program's exit ---------------------------------------------------------------------


async def test_a_failure_after_a_successful_return_releases_the_result(
    handle_tracker: HandleTracker,
) -> None:
    async def program(stream: anyio.abc.ByteStream) -> int:
        async with GatewayClient(stream) as client:
            res = await client.solve(SolveRequest(definition=text("a", "b")))
            assert res.ref is not None
            await res.ref.evaluate()
            result = BuildResult()
            result.add_ref("x", res.ref)
            result.add_ref("y", res.ref)
            await client.return_result(result)
        return 3

    await solve_fails(
        Ops(), InProcessGateway.for_program(program, name="p"),
        r"^in-process frontend 'p' exited with code 3 after returning its result$",
    )


async def test_a_crash_after_a_successful_return_releases_the_result(
    handle_tracker: HandleTracker,
) -> None:
    async def program(stream: anyio.abc.ByteStream) -> int:
        async with GatewayClient(stream) as client:
            res = await client.solve(SolveRequest(definition=text("a")))
            result = BuildResult()
            result.set_ref(res.ref)
            await client.return_result(result)
            raise OSError("disk on fire")

    await solve_fails(
        Ops(), InProcessGateway.for_program(program, name="p"),
        r"exited with code 1 after returning its result\n--- its stderr ends with ---\n"
        r"OSError: disk on fire",
    )


@pytest.mark.parametrize("when", ["before_hello", "after_solve"])
async def test_exiting_without_returning(when: str, handle_tracker: HandleTracker) -> None:
    async def program(stream: anyio.abc.ByteStream) -> int:
        if when == "after_solve":
            raw = Raw(stream)
            await raw.hello()
            await raw.solve("a")
        return 0

    await solve_fails(
        Ops(), InProcessGateway.for_program(program, name="p"),
        r"^in-process frontend 'p' exited without returning \(exited with code 0\)$",
    )


# -- protocol violations -------------------------------------------------------------------------


VIOLATIONS = {
    "garbage": r"not valid UTF-8 JSON .* it starts b'junk'",
    "truncated": r"the stream ended inside a message: got 10 of 100 bytes",
    "oversized": r"a message of 4294967295 bytes exceeds the limit of 16777216 bytes",
    "unknown_type": r"unknown message type 'launch'",
    "bad_field": r"'ref' of a 'evaluate' message must be a string",
    "second_hello": r"a second 'hello' message",
    "id_in_use": r"request id 7 is already in use by an unanswered request",
    "no_hello": r"the first message must be 'hello', got 'solve'",
    "bad_version": r"no common protocol version: the program speaks \[99\], this gateway",
}


@pytest.mark.parametrize("violation", list(VIOLATIONS))
async def test_a_protocol_violation_ends_the_session_and_leaks_nothing(
    violation: str, handle_tracker: HandleTracker
) -> None:
    told: list[str] = []

    async def program(stream: anyio.abc.ByteStream) -> int:
        raw = Raw(stream)
        if violation == "no_hello":
            await raw.send({"type": "solve", "id": 1, "definition": text("a").to_json()})
        elif violation == "bad_version":
            await raw.send({"type": "hello", "id": 1, "versions": [99]})
        else:
            await raw.hello()
            ref = await raw.solve("a", "b")
            gated = await raw.solve("a", "g", kind="test.gate")
            evaluate = {"type": "evaluate", "id": 7, "ref": gated}
            await raw.send(evaluate)  # stays unanswered: the gate never opens
            await raw.call({"type": "evaluate", "ref": ref})
            if violation == "garbage":
                await stream.send(b"\x00\x00\x00\x04junk")
            elif violation == "truncated":
                await stream.send((100).to_bytes(HEADER_SIZE, "big") + b"x" * 10)
                await stream.send_eof()
            elif violation == "oversized":
                await stream.send(b"\xff\xff\xff\xff")
            elif violation == "unknown_type":
                await raw.send({"type": "launch", "id": 8})
            elif violation == "bad_field":
                await raw.send({"type": "evaluate", "id": 8})
            elif violation == "second_hello":
                await raw.send({"type": "hello", "id": 8, "versions": [1]})
            elif violation == "id_in_use":
                await raw.send(evaluate)
        # the gateway says why, with id null, and closes
        while (msg := await raw.reader.receive()) is not None:
            if msg["type"] == "error" and msg["id"] is None:
                told.append(msg["message"])
        await anyio.sleep_forever()  # the gateway cancels a program that broke the protocol
        return 0

    ops = Ops()
    await solve_fails(
        ops, InProcessGateway.for_program(program, name="p"),
        r"^in-process frontend 'p' broke the gateway protocol: .*" + VIOLATIONS[violation],
    )
    if violation != "truncated":  # a program that sent EOF is no longer read from
        assert len(told) == 1
        assert re.search(VIOLATIONS[violation], told[0])


async def test_the_client_reports_a_gateway_that_talks_garbage(
    handle_tracker: HandleTracker,
) -> None:
    from frontends.gateway import memory_byte_stream_pair

    server, program = memory_byte_stream_pair()

    async def fake_gateway() -> None:
        reader = FrameReader(server)
        hello = await reader.receive()
        assert hello is not None
        assert hello["type"] == "hello"
        await server.send(encode_frame({"type": "reply", "id": hello["id"], "version": 1,
                                        "opts": {}, "inputs": {}, "max_message_size": 1000}))
        assert (await reader.receive() or {})["type"] == "solve"
        await server.send(b"\x00\x00\x00\x02{}")

    errors: list[str] = []

    async def build(client: Client) -> BuildResult:
        try:
            await client.solve(SolveRequest(definition=text("a")))
        except SolveError as exc:
            errors.append(str(exc))
            raise
        return BuildResult()

    from frontends.gateway import run_build

    async with anyio.create_task_group() as tg:
        tg.start_soon(fake_gateway)
        assert await run_build(build, program) == 1
    assert len(errors) == 1
    assert "the gateway sent something that is not a gateway message" in errors[0]
    assert "no string 'type' field" in errors[0]


# -- cancellation at each step --------------------------------------------------------------------


CANCEL_STEPS = [
    "before_hello", "in_solve", "after_solve", "in_evaluate", "in_read", "in_return",
    "after_return", "after_close",
]


@pytest.mark.parametrize("step", CANCEL_STEPS)
async def test_cancellation_at_each_step_releases_everything(
    step: str, handle_tracker: HandleTracker
) -> None:
    ops = Ops()
    reached = anyio.Event()
    gate = "g"

    async def blocking_build(client: Client) -> BuildResult:
        res = await client.solve(SolveRequest(definition=text("a", gate, kind="test.gate")))
        assert res.ref is not None
        await res.ref.evaluate()
        raise AssertionError("the gate never opens")

    async def program(stream: anyio.abc.ByteStream) -> int:
        if step == "before_hello":
            reached.set()
            await anyio.sleep_forever()
        async with GatewayClient(stream) as client:
            if step == "in_solve":
                await client.solve(SolveRequest(frontend="blocking"))
            res = await client.solve(SolveRequest(definition=text("a", "b")))
            assert res.ref is not None
            await res.ref.evaluate()
            if step == "after_solve":
                reached.set()
                await anyio.sleep_forever()
            if step in ("in_evaluate", "in_read"):
                gated_def = text("a", gate, kind="test.gate")
                gated = (await client.solve(SolveRequest(definition=gated_def))).ref
                assert gated is not None
                if step == "in_evaluate":
                    await gated.evaluate()
                else:
                    await gated.read_file("f")
            result = BuildResult()
            result.set_ref(res.ref)
            result.add_ref("k", res.ref)
            result.add_attestation("k", Attestation("provenance", res.ref))
            if step == "in_return":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.return_result, result)
                    reached.set()
                    await anyio.sleep_forever()
            await client.return_result(result)
            if step == "after_return":
                reached.set()
                await anyio.sleep_forever()
        reached.set()
        await anyio.sleep_forever()
        return 0

    frontends: dict[str, Frontend] = {
        "gw": InProcessGateway.for_program(program), "blocking": Forwarder(blocking_build)
    }
    with anyio.fail_after(20):
        async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def run() -> None:
                        res = await s.solve(SolveRequest(frontend="gw"))
                        await res.release()
                        raise AssertionError("the solve should have been cancelled")

                    tg.start_soon(run)
                    if step in ("in_solve", "in_evaluate", "in_read"):
                        await ops.start_signal(gate).wait()
                    else:
                        await reached.wait()
                    scope.cancel()
            assert scope.cancelled_caught
    assert ops.live_values() == []
    assert gate not in ops.execs


# -- real programs ---------------------------------------------------------------------------------


async def test_program_returns_duplicates_and_its_prints_do_not_reach_the_protocol(
    anyio_backend: str, handle_tracker: HandleTracker
) -> None:
    ops = Ops()
    values, metadata = await solve_with(
        ops, Gateway(), source=program_source("print", anyio_backend), n="4"
    )
    assert values == {
        "": "ab", "other": "ac", "att:platform-0:provenance": "ab", "att:platform-0:sbom": "ab",
    } | {f"platform-{i}": "ab" for i in range(4)}
    assert metadata == {"frontend": b"duplicate"}


async def test_program_reads_files_of_its_input(
    anyio_backend: str, tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    src = State.inline({"dir/greeting.txt": "hello world", "dir/z": "z"})
    source = program_source("read", anyio_backend)
    with anyio.fail_after(30):
        async with Worker(tmp_path / "w") as worker:
            frontends = {"gw": Gateway(allowed_sources=[source])}
            async with Solver(op_kinds=worker.op_kinds, frontends=frontends) as s:
                request = SolveRequest(
                    frontend="gw", frontend_opts={"source": source},
                    frontend_inputs={"source": src.definition()},
                )
                async with await s.solve(request) as res:
                    assert res.metadata == {
                        "greeting": b"hello world", "part": b"world",
                        "names": b"greeting.txt,z", "size": b"11",
                    }
                    assert res.ref is not None
                    assert res.refs["again"] is not res.ref
            assert [info.handles for info in await worker.store.usage()] == [0]


MISBEHAVIOUR = {
    "fail": r"failed: ValueError: the build function says no$",
    "crash": r"exited without returning \(exited with code 3\)\n--- its stderr ends with ---\n"
             r"about to crash$",
    "no_return": r"exited without returning \(exited with code 0\)$",
    "exit_after_return": r"exited with code 5 after returning its result$",
    "return_twice": r"failed: it returned twice \(a result may be set only once\)$",
    "junk": r"broke the gateway protocol: a message is not valid UTF-8 JSON .* b'junk!'",
    "close_stdout": r"did not exit within 0\.5s of closing its output; it was killed$",
}


@pytest.mark.slow
async def test_misbehaving_programs_fail_clearly_and_leak_nothing(
    anyio_backend: str, handle_tracker: HandleTracker
) -> None:
    """Each program runs as its own solve, all at once (to keep the test short)."""
    ops = Ops()
    errors: dict[str, str] = {}
    frontends: dict[str, Frontend] = {
        "gw": Gateway(timeout=60), "impatient": Gateway(exit_grace=0.5, timeout=60)
    }
    with anyio.fail_after(90):
        async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:

            async def one(mode: str) -> None:
                request = SolveRequest(
                    frontend="impatient" if mode == "close_stdout" else "gw",
                    frontend_opts={"source": program_source(mode, anyio_backend)},
                )
                with pytest.raises(SolveError) as info:
                    await solve_and_release(s, request)
                errors[mode] = str(info.value)

            async with anyio.create_task_group() as tg:
                for mode in MISBEHAVIOUR:
                    tg.start_soon(one, mode)
    for mode, pattern in MISBEHAVIOUR.items():
        prefix = f"frontend program {program_source(mode, anyio_backend)!r} "
        assert errors[mode].startswith(prefix), errors[mode]
        assert re.search(pattern, errors[mode]), errors[mode]
    assert ops.live_values() == []


async def test_a_hanging_program_is_killed_on_cancellation_and_on_timeout(
    anyio_backend: str, tmp_path: Path, handle_tracker: HandleTracker
) -> None:
    ops = Ops()
    pidfile = tmp_path / "pid"
    source = program_source("hang", anyio_backend)
    with anyio.fail_after(60):
        async with Solver(op_kinds=ops.registry(), frontends={"gw": Gateway(),
                                                              "timed": Gateway(timeout=0.5)}) as s:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def run() -> None:
                        request = SolveRequest(
                            frontend="gw",
                            frontend_opts={"source": source, "pidfile": str(pidfile)},
                        )
                        await (await s.solve(request)).release()

                    tg.start_soon(run)
                    await ops.start_signal("g").wait()  # the program waits on the gate
                    scope.cancel()
            assert scope.cancelled_caught
            pid = int(pidfile.read_text())
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # killed and reaped
            # the same program with a timeout (it may time out before or after hello)
            request = SolveRequest(frontend="timed", frontend_opts={"source": source})
            with pytest.raises(SolveError, match=r"timed out after 0\.5s; it was killed"):
                await solve_and_release(s, request)
    assert ops.live_values() == []
    assert "g" not in ops.execs


async def test_sources_are_checked_before_anything_runs(handle_tracker: HandleTracker) -> None:
    ops = Ops()
    allowed = program_source("duplicate", "asyncio")
    cases: list[tuple[Gateway, dict[str, str], str]] = [
        (Gateway(allowed_sources=[allowed]), {"source": allowed + " x"},
         r"frontend source .* is not allowed; allowed sources: '.*program\.py duplicate asyncio'$"),
        (Gateway(allowed_sources=[]), {"source": allowed},
         r"is not allowed; allowed sources: none"),
        (Gateway(), {}, r"needs opts\['source'\]"),
        (Gateway(), {"source": "'unclosed"}, r"is not a command line: No closing quotation"),
        (Gateway(), {"source": "   "}, r"is an empty command line"),
        (Gateway(), {"source": "/nonexistent/frontend-program --x"},
         r"cannot start frontend program '/nonexistent/frontend-program --x': .*No such file"),
    ]
    for gateway, opts, pattern in cases:
        await solve_fails(ops, gateway, pattern, **opts)

