"""The package layout of docs/architecture.md, enforced: each folder imports only
the layers below it, and other folders only through their public ``__init__``.

Every module's imports are read with ``ast`` (type-only imports under
``TYPE_CHECKING`` included: a name in an annotation is a dependency too), so a
forbidden import fails here before it tangles the layers again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "cache": frozenset({"base"}),
    "definition": frozenset({"base"}),
    "engine": frozenset({"base", "cache"}),
    "worker": frozenset({"base", "cache", "definition"}),
    "remote": frozenset({"base", "cache", "definition", "worker"}),
    "insight": frozenset({"base"}),
    "bridge": frozenset(
        {"base", "cache", "definition", "engine", "worker", "remote", "insight"}
    ),
    "cli": frozenset(
        {"base", "cache", "definition", "engine", "worker", "remote", "insight", "bridge",
         "api"}
    ),
    # solver/__init__.py, __main__.py, testing.py: the public surface
    "api": frozenset(
        {"base", "cache", "definition", "engine", "worker", "remote", "insight", "bridge",
         "cli"}
    ),
}
FOLDERS = frozenset(
    {"cache", "definition", "engine", "worker", "remote", "insight", "bridge", "cli"}
)


def layer_of(module: str) -> str:
    """The layer of a module of the ``solver`` package (dotted name)."""
    parts = module.split(".")
    assert parts[0] == "solver"
    if len(parts) == 1 or parts[1] in {"__main__", "testing"}:
        return "api"
    if parts[1] in FOLDERS:
        return parts[1]
    assert parts[1].startswith("_"), f"{module}: a module at solver/ must be private (base)"
    return "base"


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import of ``path`` from solver/frontends."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if node.level and not node.module:
                # ``from . import x``: x may be a submodule
                found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return sorted((line, t) for line, t in found if t.split(".")[0] in {"solver", "frontends"})


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_layout_has_every_folder() -> None:
    for folder in FOLDERS:
        assert (ROOT / "solver" / folder / "__init__.py").is_file(), folder


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the imports of the solver module at ``path``."""
    mine = layer_of(module_name(path, root))
    bad = []
    for line, target in imports_of(path, root):
        if target.startswith("frontends"):
            bad.append(f"line {line}: {target} (solver never imports frontends)")
            continue
        theirs = layer_of(target)
        if theirs == mine:
            continue
        if theirs not in ALLOWED[mine]:
            bad.append(f"line {line}: {target} ({mine} may not import {theirs})")
        elif theirs in FOLDERS and len(target.split(".")) > 2:
            bad.append(
                f"line {line}: {target} (import {theirs} through solver.{theirs}, "
                "its public __init__)"
            )
    return bad


@pytest.mark.parametrize("path", sources("solver"), ids=lambda p: str(p.relative_to(ROOT)))
def test_solver_modules_import_only_layers_below(path: Path) -> None:
    bad = violations(path)
    assert bad == [], f"{module_name(path)} ({layer_of(module_name(path))}):\n" + "\n".join(bad)


@pytest.mark.parametrize("path", sources("frontends"), ids=lambda p: str(p.relative_to(ROOT)))
def test_frontends_use_only_public_solver_packages(path: Path) -> None:
    bad = [
        f"line {line}: {target}"
        for line, target in imports_of(path)
        if target.startswith("solver") and any(p.startswith("_") for p in target.split("."))
    ]
    assert bad == [], f"{module_name(path)} imports private solver modules:\n" + "\n".join(bad)


def test_no_import_circle_between_folders() -> None:
    edges: dict[str, set[str]] = {}
    for path in sources("solver"):
        mine = layer_of(module_name(path))
        for _, target in imports_of(path):
            if target.startswith("solver"):
                theirs = layer_of(target)
                if theirs != mine:
                    edges.setdefault(mine, set()).add(theirs)
    # depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The rules above are not vacuous: in a copy of the layout, an engine module
    importing the bridge, and one climbing into a private worker module, are
    reported; importing the cache through its package is not."""
    probe = tmp_path / "solver" / "engine" / "_probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from ..cache import InMemoryCacheManager\n"
        "if TYPE_CHECKING:\n"
        "    from ..bridge import SolveRequest\n"
        "from ..cache._manager import KeyedCacheManager\n"
    )
    assert imports_of(probe, tmp_path) == [
        (3, "solver.cache"),
        (5, "solver.bridge"),
        (6, "solver.cache._manager"),
    ]
    assert violations(probe, tmp_path) == [
        "line 5: solver.bridge (engine may not import bridge)",
        "line 6: solver.cache._manager (import cache through solver.cache, its public __init__)",
    ]
