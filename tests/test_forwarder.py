"""The in-process forwarder: duplicate refs, errors and cancellation at every step
of a frontend, and every underlying result released exactly once (PR #2929)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import pytest
from frontend_support import Ops, failing, text

from frontends import BuildResult, Client, Reference
from frontends.forwarder import ForwardedReference, Forwarder
from solver import Attestation, FrontendResult, SolveError, Solver, SolveRequest
from solver.testing import HandleTracker

pytestmark = pytest.mark.anyio

Build = Callable[[Client], Awaitable[BuildResult]]
FW = SolveRequest(frontend="fw")


def solver_with(ops: Ops, **frontends: object) -> Solver:
    return Solver(op_kinds=ops.registry(), frontends=frontends)  # type: ignore[arg-type]


def proxies_alive(tracker: HandleTracker) -> list[str]:
    """Live proxy handles: none may outlive the solve that made them."""
    return [line for line in tracker.live if "Proxy" in line]


async def solve_with(ops: Ops, build: Build, **opts: str) -> tuple[dict[str, object], list[str]]:
    """Run ``build`` through a forwarder; the values of the result by key (``""``
    for ``ref``, ``att:<key>`` for attestation refs) and the handles' ids."""
    request = SolveRequest(frontend="fw", frontend_opts=opts)
    async with solver_with(ops, fw=Forwarder(build)) as s, await s.solve(request) as res:
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
                assert att.ref is not None
                values[f"att:{key}:{att.kind}"] = att.ref.sys
                handles.append(att.ref)
        # one distinct handle per occurrence
        assert len({id(h) for h in handles}) == len(handles)
        ids = [h.id for h in handles]
    assert ops.live_values() == []
    return values, ids


# -- duplicate references -------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
async def test_same_reference_under_n_keys_and_in_attestations(
    handle_tracker: HandleTracker, n: int
) -> None:
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        res = await client.solve(SolveRequest(definition=text("a", "b")))
        ref = res.ref
        assert ref is not None
        out = BuildResult()
        out.set_ref(ref)
        for i in range(n):
            out.add_ref(f"platform{i}", ref)
            out.add_attestation(f"platform{i}", Attestation("provenance", ref, "/prov.json"))
        out.add_meta("platforms", str(n).encode())
        return out

    values, ids = await solve_with(ops, build)
    assert values[""] == "ab"
    assert all(values[f"platform{i}"] == "ab" for i in range(n))
    assert all(values[f"att:platform{i}:provenance"] == "ab" for i in range(n))
    assert len(ids) == 1 + 2 * n
    assert ops.execs == ["a", "b"]  # built once, whatever the number of occurrences
    # the underlying value: one release per handle ever made on it, none twice
    (produced,) = [r for r in ops.results if r.sys == "ab"]
    assert produced.live_count == 0


async def test_metadata_and_attestations_reach_the_solve_result(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        a = (await client.solve(SolveRequest(definition=text("a")))).ref
        out = BuildResult()
        assert a is not None
        out.add_ref("x", a)
        out.add_meta("k", b"v")
        out.add_attestation("x", Attestation("sbom", None, "", {"format": b"spdx"}))
        out.add_attestation("x", Attestation("provenance", a, "/p"))
        return out

    async with solver_with(ops, fw=Forwarder(build)) as s, await s.solve(FW) as res:
        assert res.ref is None
        assert res.metadata == {"k": b"v"}
        sbom, prov = res.attestations["x"]
        assert (sbom.kind, sbom.ref, sbom.metadata) == ("sbom", None, {"format": b"spdx"})
        assert prov.kind == "provenance"
        assert prov.path == "/p"
        assert prov.ref is not None
        assert prov.ref.sys == "a"
        assert prov.ref is not res.refs["x"]


async def test_nested_frontend_returning_duplicates_is_returned_again(
    handle_tracker: HandleTracker,
) -> None:
    """An inner frontend returns one value under two keys; the outer one returns
    both of its references (which share one id) several times more."""
    ops = Ops()

    async def inner(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("i")))).ref
        assert ref is not None
        out = BuildResult()
        out.add_ref("amd64", ref)
        out.add_ref("386", ref)
        return out

    async def outer(client: Client) -> BuildResult:
        got = await client.solve(SolveRequest(frontend="inner"))
        a, b = got.refs["amd64"], got.refs["386"]
        assert a is not b
        await a.evaluate()
        out = BuildResult()
        for key in ("p1", "p2"):
            out.add_ref(key, a)
        out.add_ref("p3", b)
        out.set_ref(b)
        return out

    frontends = {"inner": Forwarder(inner), "outer": Forwarder(outer)}
    outer_request = SolveRequest(frontend="outer")
    async with solver_with(ops, **frontends) as s, await s.solve(outer_request) as res:
        assert res.ref is not None
        assert {k: r.sys for k, r in res.refs.items()} == {"p1": "i", "p2": "i", "p3": "i"}
    assert ops.execs == ["i"]
    assert ops.live_values() == []


# -- errors -----------------------------------------------------------------------------


async def test_error_from_an_op_reaches_the_caller(handle_tracker: HandleTracker) -> None:
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        good = (await client.solve(SolveRequest(definition=text("a")))).ref
        bad = (await client.solve(SolveRequest(definition=failing("op broke")))).ref
        assert good is not None
        assert bad is not None
        out = BuildResult()
        out.add_ref("good", good)
        out.add_ref("good2", good)
        out.add_ref("bad", bad)
        return out

    async with Solver(op_kinds=ops.registry(), frontends={"fw": Forwarder(build)}) as s:
        with pytest.raises(SolveError, match="op broke") as info:
            await s.solve(SolveRequest(frontend="fw"))
        assert proxies_alive(handle_tracker) == []
    assert isinstance(info.value, SolveError)
    assert ops.live_values() == []


async def test_build_function_exception_becomes_a_solve_error(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a")))).ref
        assert ref is not None
        await ref.evaluate()
        raise ValueError("frontend broke")

    async with Solver(op_kinds=ops.registry(), frontends={"fw": Forwarder(build)}) as s:
        with pytest.raises(SolveError, match="frontend broke") as info:
            await s.solve(SolveRequest(frontend="fw"))
        assert isinstance(info.value.__cause__, ValueError)
        assert proxies_alive(handle_tracker) == []
    assert ops.execs == ["a"]


@pytest.mark.parametrize("bad", ["foreign", "released", "not-a-reference", "late"])
async def test_bad_reference_in_the_result_releases_the_halves_already_made(
    handle_tracker: HandleTracker, bad: str
) -> None:
    """The conversion fails part way: the halves put into the result before the
    bad entry are released with the session (BuildKit's gateway leaked them)."""
    ops = Ops()
    kept: list[Reference] = []

    async def first(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("f")))).ref
        assert ref is not None
        kept.append(ref)
        out = BuildResult()
        out.set_ref(ref)
        return out

    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a")))).ref
        other = (await client.solve(SolveRequest(definition=text("b")))).ref
        assert ref is not None
        assert other is not None
        out = BuildResult()
        out.add_ref("one", ref)
        out.add_ref("two", ref)
        out.add_attestation("one", Attestation("provenance", ref))
        if bad == "foreign":
            out.add_ref("zz", kept[0])
        elif bad == "released":
            await other.release()
            out.add_ref("zz", other)
        elif bad == "not-a-reference":
            out.refs["zz"] = "nope"  # type: ignore[assignment]
        return out

    messages = {
        "foreign": "belongs to another frontend session",
        "released": "which was released",
        "not-a-reference": "is a str, not a reference",
    }
    frontends = {"first": Forwarder(first), "fw": Forwarder(build)}
    async with Solver(op_kinds=ops.registry(), frontends=frontends) as s:
        async with await s.solve(SolveRequest(frontend="first")):
            pass
        if bad == "late":
            # a reference kept from a finished session cannot be used any more
            with pytest.raises(SolveError, match="session is over"):
                await kept[0].evaluate()
            return
        with pytest.raises(SolveError, match=messages[bad]):
            await s.solve(SolveRequest(frontend="fw"))
        assert proxies_alive(handle_tracker) == []
    assert ops.live_values() == []


async def test_build_function_must_return_a_build_result(handle_tracker: HandleTracker) -> None:
    async def build(client: Client) -> BuildResult:
        await client.solve(SolveRequest(definition=text("a")))
        return {"ref": None}  # type: ignore[return-value]

    async with Solver(op_kinds=Ops().registry(), frontends={"fw": Forwarder(build)}) as s:
        with pytest.raises(SolveError, match=r"returned a dict, not a frontends\.BuildResult"):
            await s.solve(SolveRequest(frontend="fw"))


async def test_frontend_calling_itself_fails_clearly(handle_tracker: HandleTracker) -> None:
    async def build(client: Client) -> BuildResult:
        return await client.solve(SolveRequest(frontend="fw"))

    async with Solver(op_kinds=Ops().registry(), frontends={"fw": Forwarder(build)}) as s:
        with pytest.raises(SolveError, match="nested 32 frontends deep"):
            await s.solve(SolveRequest(frontend="fw"))


async def test_results_that_are_not_snapshots_cannot_be_read(
    handle_tracker: HandleTracker,
) -> None:
    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("a")))).ref
        assert ref is not None
        await ref.read_file("x")
        return BuildResult()

    async with Solver(op_kinds=Ops().registry(), frontends={"fw": Forwarder(build)}) as s:
        with pytest.raises(SolveError, match="is a str, not a snapshot of the built-in worker"):
            await s.solve(SolveRequest(frontend="fw"))


async def test_invalid_definition_fails_at_solve(handle_tracker: HandleTracker) -> None:
    async def build(client: Client) -> BuildResult:
        await client.solve(SolveRequest(definition=text("a", kind="test.nope")))
        return BuildResult()

    async with Solver(op_kinds=Ops().registry(), frontends={"fw": Forwarder(build)}) as s:
        with pytest.raises(SolveError, match=r"unknown op kind 'test\.nope'"):
            await s.solve(SolveRequest(frontend="fw"))


# -- every step of a frontend: cancel it, or fail there -------------------------------

STEPS = ["start", "solved", "evaluated", "second", "released", "returning", "converting"]


def scripted(ops: Ops, hook: Callable[[str], Awaitable[None]]) -> Build:
    """A frontend with a hook between its steps; the second ref is a gate that
    the conversion waits on (the ``converting`` step)."""

    async def build(client: Client) -> BuildResult:
        await hook("start")
        a = (await client.solve(SolveRequest(definition=text("a", "b")))).ref
        assert a is not None
        await hook("solved")
        await a.evaluate()
        await hook("evaluated")
        g = (await client.solve(SolveRequest(definition=text("g", kind="test.gate")))).ref
        spare = (await client.solve(SolveRequest(definition=text("s")))).ref
        assert g is not None
        assert spare is not None
        await hook("second")
        await spare.release()
        await hook("released")
        out = BuildResult()
        out.set_ref(a)
        out.add_ref("amd64", a)
        out.add_ref("386", a)
        out.add_ref("arm64", g)
        out.add_attestation("amd64", Attestation("provenance", a, "/p"))
        out.add_attestation("arm64", Attestation("provenance", g, "/p"))
        await hook("returning")
        return out

    return build


@pytest.mark.parametrize("step", STEPS)
async def test_cancellation_at_each_step_releases_everything(
    handle_tracker: HandleTracker, step: str
) -> None:
    ops = Ops()
    reached: list[str] = []

    with anyio.fail_after(10):
        async with Solver(op_kinds=ops.registry()) as s:
            with anyio.CancelScope() as scope:

                async def hook(name: str) -> None:
                    reached.append(name)
                    if name == step:
                        scope.cancel()
                        await anyio.lowlevel.checkpoint()

                s.frontends["fw"] = Forwarder(scripted(ops, hook))
                if step == "converting":

                    async def cancel_when_gate_runs() -> None:
                        await ops.start_signal("g").wait()
                        reached.append("converting")
                        scope.cancel()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_when_gate_runs)
                        await s.solve(SolveRequest(frontend="fw"))
                else:
                    await s.solve(SolveRequest(frontend="fw"))
            assert scope.cancelled_caught
            assert reached[-1] == step
            assert proxies_alive(handle_tracker) == []
            if step == "converting":
                assert ops.cancelled == ["g"]  # the gate op was cancelled, not leaked
    assert ops.live_values() == []


@pytest.mark.parametrize("step", STEPS[:-1])
async def test_exception_at_each_step_releases_everything(
    handle_tracker: HandleTracker, step: str
) -> None:
    ops = Ops()
    ops.gate("g").set()

    async def hook(name: str) -> None:
        if name == step:
            raise RuntimeError(f"boom at {name}")

    with anyio.fail_after(10):
        async with Solver(op_kinds=ops.registry(), frontends={}) as s:
            s.frontends["fw"] = Forwarder(scripted(ops, hook))
            with pytest.raises(SolveError, match=f"boom at {step}") as info:
                await s.solve(SolveRequest(frontend="fw"))
            assert isinstance(info.value.__cause__, RuntimeError)
            assert proxies_alive(handle_tracker) == []
    assert ops.live_values() == []


async def test_scripted_frontend_succeeds_without_interference(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()
    ops.gate("g").set()

    async def hook(name: str) -> None:
        await anyio.lowlevel.checkpoint()

    values, ids = await solve_with(ops, scripted(ops, hook))
    assert values == {
        "": "ab",
        "amd64": "ab",
        "386": "ab",
        "arm64": "g",
        "att:amd64:provenance": "ab",
        "att:arm64:provenance": "g",
    }
    assert sorted(ops.execs) == ["a", "b", "g"]  # the released spare never ran
    assert len(ids) == 6


# -- many solves at once -----------------------------------------------------------------


async def test_fifty_concurrent_solves_share_vertices(handle_tracker: HandleTracker) -> None:
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        platforms = client.build_opts().opts["platforms"].split(",")
        base = (await client.solve(SolveRequest(definition=text("base", "lib")))).ref
        assert base is not None
        out = BuildResult()
        for platform in platforms:
            out.add_ref(platform, base)
            out.add_attestation(platform, Attestation("provenance", base))
        return out

    results: list[dict[str, object]] = []
    with anyio.fail_after(20):
        async with Solver(op_kinds=ops.registry(), frontends={"fw": Forwarder(build)}) as s:

            async def one() -> None:
                request = SolveRequest(
                    frontend="fw", frontend_opts={"platforms": "amd64,386,arm64"}
                )
                async with await s.solve(request) as res:
                    results.append({k: r.sys for k, r in res.refs.items()})
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
            assert proxies_alive(handle_tracker) == []
    assert results == [{"amd64": "baselib", "386": "baselib", "arm64": "baselib"}] * 50
    assert sorted(ops.execs) == ["base", "lib"]  # each op once for all 50 solves
    assert ops.live_values() == []


async def test_half_of_fifty_concurrent_solves_cancelled(handle_tracker: HandleTracker) -> None:
    """Shared work goes on for the solves that still want it."""
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        ref = (await client.solve(SolveRequest(definition=text("g", kind="test.gate")))).ref
        assert ref is not None
        out = BuildResult()
        out.add_ref("a", ref)
        out.add_ref("b", ref)
        return out

    done: list[str] = []
    with anyio.fail_after(20):
        async with Solver(op_kinds=ops.registry(), frontends={"fw": Forwarder(build)}) as s:
            scopes = [anyio.CancelScope() for _ in range(50)]

            async def one(i: int) -> None:
                with scopes[i]:
                    async with await s.solve(SolveRequest(frontend="fw")) as res:
                        done.append(str(res.refs["a"].sys))

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
                await ops.start_signal("g").wait()
                for scope in scopes[::2]:
                    scope.cancel()
                await anyio.lowlevel.checkpoint()
                ops.gate("g").set()
            assert proxies_alive(handle_tracker) == []
    assert done == ["g"] * 25
    assert ops.execs == ["g"]
    assert ops.cancelled == []
    assert ops.live_values() == []


# -- references ---------------------------------------------------------------------------


async def test_reference_api(handle_tracker: HandleTracker) -> None:
    ops = Ops()
    seen: dict[str, object] = {}

    async def build(client: Client) -> BuildResult:
        assert client.build_opts().opts == {"k": "v"}
        assert set(client.build_opts().inputs) == {"ctx"}
        res = await client.solve(SolveRequest(definition=client.build_opts().inputs["ctx"]))
        ref = res.ref
        assert isinstance(ref, ForwardedReference)
        assert isinstance(ref, Reference)
        seen["definition"] = ref.to_definition()
        seen["id"] = ref.id
        await ref.release()
        await ref.release()  # idempotent
        seen["repr"] = repr(ref)
        with pytest.raises(SolveError, match="was released"):
            await ref.evaluate()
        return BuildResult()

    ctx = text("c")
    async with Solver(op_kinds=ops.registry(), frontends={"fw": Forwarder(build)}) as s:
        request = SolveRequest(
            frontend="fw", frontend_opts={"k": "v"}, frontend_inputs={"ctx": ctx}
        )
        async with await s.solve(request) as res:
            assert res.ref is None
            assert res.refs == {}
    assert seen["definition"] == ctx
    assert str(seen["id"]).startswith("ref-")
    assert "released" in str(seen["repr"])
    assert ops.execs == []  # never evaluated: lazy


async def test_build_result_release_frees_references_early(
    handle_tracker: HandleTracker,
) -> None:
    ops = Ops()

    async def build(client: Client) -> BuildResult:
        res = await client.solve(SolveRequest(definition=text("a")))
        ref = res.ref
        assert ref is not None
        await ref.evaluate()
        dup = BuildResult()
        dup.add_ref("x", ref)
        dup.add_ref("y", ref)
        await dup.release()  # releases the one distinct reference once
        assert dup.refs == {}
        assert proxies_alive(handle_tracker) == []
        return BuildResult()

    async with solver_with(ops, fw=Forwarder(build)) as s, await s.solve(FW):
        pass


async def test_frontend_result_refuses_a_proxy_twice(handle_tracker: HandleTracker) -> None:
    ops = Ops()

    class Direct:
        async def solve(self, bridge, opts, inputs):  # type: ignore[no-untyped-def]
            res = await bridge.solve(SolveRequest(definition=text("a")))
            proxy = res.ref
            assert proxy is not None
            for add in (
                lambda: res.add_ref("k", proxy),
                lambda: res.add_attestation("k", Attestation("provenance", proxy)),
            ):
                with pytest.raises(SolveError, match="already stands in this FrontendResult"):
                    add()
            res.add_ref("z", _OtherProxy())
            with pytest.raises(SolveError, match="already has a ref under key"):
                res.add_ref("z", _OtherProxy())
            res.refs.pop("z")
            return res

    async with solver_with(ops, d=Direct()) as s, await s.solve(SolveRequest(frontend="d")) as out:
        assert out.ref is not None
        assert out.ref.sys == "a"


class _OtherProxy:
    id = "other"
    definition = None

    async def result(self):  # type: ignore[no-untyped-def]
        raise AssertionError

    async def release(self) -> None:
        raise AssertionError


async def test_frontend_result_release_is_idempotent_and_keeps_going(
    handle_tracker: HandleTracker,
) -> None:
    released: list[str] = []

    class P:
        definition = None

        def __init__(self, id: str, fail: bool) -> None:
            self.id = id
            self.fail = fail

        async def result(self):  # type: ignore[no-untyped-def]
            raise AssertionError

        async def release(self) -> None:
            released.append(self.id)
            if self.fail:
                raise SolveError(f"release of {self.id} failed")

    res = FrontendResult()
    res.set_ref(P("a", True))
    res.add_ref("b", P("b", False))
    res.add_attestation("b", Attestation("x", P("c", False)))
    with pytest.raises(SolveError, match="release of a failed"):
        await res.release()
    assert released == ["a", "b", "c"]
    await res.release()
    assert released == ["a", "b", "c"]
    assert res.released
    with pytest.raises(SolveError, match="released FrontendResult"):
        res.set_ref(P("d", False))
