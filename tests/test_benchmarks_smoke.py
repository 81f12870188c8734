"""The benchmark suite still runs and still counts right (never its timings).

``benchmarks/suite.py --quick`` runs in-process on both backends; every count it
records must be what the engine promises: each op executed once per cold solve
and per K concurrent solves, exactly one cache load per warm re-solve, only the
dirty vertices after a leaf change. The graph builders are checked against the
test harness they port.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks import memory_longlived, suite
from benchmarks.graphs import SHAPES, chain, random_graph, with_leaf_changed
from tests.harness import generate_sub_graph


def _input_counts_post_order(top: Any) -> list[int]:
    out: list[int] = []
    stack: list[tuple[Any, bool]] = [(top, False)]
    while stack:
        v, expanded = stack.pop()
        if expanded:
            out.append(len(v.inputs))
            continue
        stack.append((v, True))
        stack.extend((e.vertex, False) for e in reversed(v.inputs))
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 100, 333])
def test_random_graph_is_buildkits_generate_sub_graph(n: int) -> None:
    for seed in range(3):
        edge, _ = generate_sub_graph(n, random.Random(seed))
        graph = random_graph(n, seed)
        assert [len(v.inputs) for v in graph.vertices] == _input_counts_post_order(edge.vertex)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shapes_have_n_distinct_vertices_inputs_first(shape: str) -> None:
    for n in (3, 101, 250):
        graph = SHAPES[shape](n)
        assert len(graph.vertices) == n
        assert len({v.digest for v in graph.vertices}) == n
        seen: set[int] = set()
        for v in graph.vertices:
            assert all(id(e.vertex) in seen for e in v.inputs)
            seen.add(id(v))
        assert graph.vertices[-1] is graph.top


def test_leaf_change_counts() -> None:
    changed = with_leaf_changed(chain(50))
    assert (changed.dirty, changed.clean_inputs) == (50, 0)
    assert changed.graph.vertices[0] is changed.leaf
    tree = random_graph(300, seed=1)
    changed = with_leaf_changed(tree)
    kept = {id(v) for v in tree.vertices}
    assert sum(id(v) not in kept for v in changed.graph.vertices) == changed.dirty
    assert 1 < changed.dirty < 300


def test_deep_graphs_build_without_recursion() -> None:
    # deeper than the default recursion limit: the builders must not recurse
    graph = chain(5_000)
    assert with_leaf_changed(graph).dirty == 5_000
    assert len(random_graph(5_000).vertices) == 5_000


@pytest.mark.slow
def test_quick_suite_counts_on_both_backends(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    status = suite.main(["--quick", "--backend", "both", "--out", str(out)])
    results = json.loads(out.read_text())

    assert results["problems"] == []
    assert status == 0
    assert {"python", "platform", "cpu_count"} <= results["machine"].keys()
    assert set(results["backends"]) == {"asyncio", "trio"}
    for backend, res in results["backends"].items():
        assert len(res["shapes"]) == len(SHAPES) * 2, backend
        for r in res["shapes"]:
            n = r["vertices"]
            assert r["error"] is None
            assert (r["cold"]["execs"], r["cold"]["max_execs"], r["cold"]["loads"]) == (n, 1, 0)
            assert (r["warm"]["execs"], r["warm"]["loads"]) == (0, 1)
            assert min(r["naive_us"], r["cold_us"], r["warm_us"]) > 0
            if r["leaf"] is not None:
                assert r["leaf"]["execs"] == r["leaf_dirty"]
                assert r["leaf"]["max_execs"] == 1
        assert [c["k"] for c in res["concurrency"]] == [1, 8, 64, 128]
        for c in res["concurrency"]:
            assert (c["counts"]["execs"], c["counts"]["max_execs"]) == (c["vertices"], 1)
            assert c["same_result"] is True
        for m in res["memory"]:
            assert m["error"] is None
            assert m["peak_per_vertex"] > 0
    names = {t["name"] for t in results["targets"]}
    assert "warm: exactly 1 cache load" in names
    assert all(isinstance(t["passed"], bool) for t in results["targets"])


def test_memory_longlived_runs_on_both_backends(tmp_path: Path) -> None:
    """The long-lived solver benchmark, small: one subprocess per backend, every
    solve runs its 3 new ops, the default cache is the bounded one (its RSS
    verdict needs the full run, so the exit status is not checked)."""
    out = tmp_path / "longlived.json"
    memory_longlived.main(["--solves", "100", "--json", str(out)])
    results = json.loads(out.read_text())
    assert [r["backend"] for r in results["backends"]] == ["asyncio", "trio"]
    for r in results["backends"]:
        assert (r["solves"], r["half"], r["execs"]) == (100, 50, 300)
        assert (r["cache_results"], r["cache_max_results"]) == (300, 10_000)
        assert r["cache_keys"] == 300
        assert min(r["rss_start"], r["rss_half"], r["rss_end"], r["ratio"]) > 0


def test_the_default_run_includes_the_large_sizes(tmp_path: Path) -> None:
    """The large sizes (100,000 in the default run, which the README's one command
    runs) come after the others, for chain, lattice and random only, once and
    without the leaf change, and the growth target compares them with the next
    size down; ``--quick``, ``--sizes`` alone and ``--large-sizes ''`` leave them
    out."""
    cfg, _, _ = suite.parse_args([])
    assert (cfg.sizes, cfg.large_sizes) == ((1_000, 10_000), (100_000,))
    assert cfg.large_shapes == ("chain", "lattice", "random")
    for argv in (["--quick"], ["--sizes", "1000"], ["--large-sizes", ""]):
        assert suite.parse_args(argv)[0].large_sizes == (), argv

    out = tmp_path / "large.json"
    status = suite.main([
        "--quick", "--backend", "asyncio", "--large-sizes", "300", "--shapes", "chain,fan,lattice",
        "--concurrency", "", "--memory-shapes", "", "--no-dask", "--out", str(out),
        "--repeat", "2", "--once-above", "250",
    ])
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert status == 0
    shapes = [(r["shape"], r["vertices"]) for r in results["backends"]["asyncio"]["shapes"]]
    assert shapes[-2:] == [("chain", 300), ("lattice", 300)]
    assert results["backends"]["asyncio"]["shapes"][0]["repeats"] == 2
    for r in results["backends"]["asyncio"]["shapes"][-2:]:
        assert r["repeats"] == 1
        assert r["leaf"] is None
        assert (r["cold"]["execs"], r["cold"]["saves"]) == (300, 300)
    growth = {t["case"] for t in results["targets"] if t["name"].startswith("linear growth")}
    assert growth == {"chain 200→300", "fan 20→200", "lattice 200→300"}
