"""The packages' lazy re-exports (``solver/_lazy.py``): every public name still
resolves, to the object its module defines; the table each ``__init__`` gives at
run time lists exactly the names it imports for type checkers; a name's module is
imported when the name is first used, not before."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from solver._lazy import LazyExports

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = (
    "solver",
    "solver.bridge",
    "solver.cache",
    "solver.definition",
    "solver.engine",
    "solver.insight",
    "solver.remote",
    "solver.worker",
)


def exports_of(package: ModuleType) -> LazyExports:
    table = vars(package)["_exports"]
    assert isinstance(table, LazyExports)
    return table


def type_checking_imports(package: str) -> dict[str, str]:
    """name -> absolute module, of the imports under ``if TYPE_CHECKING:`` in the
    package's ``__init__``."""
    path = ROOT / Path(*package.split(".")) / "__init__.py"
    found: dict[str, str] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.unparse(stmt)
                assert stmt.level == 1, ast.unparse(stmt)
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"{alias.name} is not re-exported"
                    found[alias.name] = f"{package}.{stmt.module}"
    return found


@pytest.mark.parametrize("name", PACKAGES)
def test_every_name_in_all_resolves_to_its_modules_object(name: str) -> None:
    package = importlib.import_module(name)
    table = exports_of(package)
    assert package.__all__, name
    for public in package.__all__:
        value = getattr(package, public)
        home = importlib.import_module(table.module_of(public))
        assert value is getattr(home, public), f"{name}.{public}"
        assert public in dir(package)
        assert vars(package)[public] is value  # stored: later lookups skip __getattr__


@pytest.mark.parametrize("name", PACKAGES)
def test_the_run_time_table_is_the_type_checking_imports(name: str) -> None:
    package = importlib.import_module(name)
    table = exports_of(package)
    typed = type_checking_imports(name)
    assert sorted(typed) == package.__all__
    assert {n: table.module_of(n) for n in package.__all__} == typed


def test_star_import_binds_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from solver import *", namespace)
    import solver

    assert set(solver.__all__) <= set(namespace)
    assert namespace["Solver"] is solver.Solver


def test_a_name_that_is_not_exported_is_an_error() -> None:
    import solver
    import solver.cache

    with pytest.raises(AttributeError, match=r"module 'solver\.cache' has no attribute 'Nope'"):
        _ = solver.cache.Nope  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match="cannot import name 'Nope' from 'solver'"):
        exec("from solver import Nope", {})
    # the private modules are no public names
    with pytest.raises(AttributeError):
        solver.cache.__getattr__("_postgres")


def test_a_table_refuses_a_name_given_twice_and_a_module_outside() -> None:
    with pytest.raises(ValueError, match=r"pkg\.A is exported by both \._a and \._b"):
        LazyExports({"__name__": "pkg"}, {"._a": ("A",), "._b": ("A", "B")})
    with pytest.raises(ValueError, match=r"'\.\.other' is not a module of pkg"):
        LazyExports({"__name__": "pkg"}, {"..other": ("A",)})
    with pytest.raises(ValueError, match="'os' is not a module of pkg"):
        LazyExports({"__name__": "pkg"}, {"os": ("A",)})


def test_a_names_module_is_imported_on_first_use() -> None:
    code = """
import json, sys
import solver.cache
seen = ["solver.cache._postgres" in sys.modules, "solver.cache._sqlite" in sys.modules]
solver.cache.SQLiteCacheStorage
seen += ["solver.cache._postgres" in sys.modules, "solver.cache._sqlite" in sys.modules]
from solver.cache import PostgresCacheStore
seen += ["solver.cache._postgres" in sys.modules]
print(json.dumps(seen))
"""
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
    assert json.loads(r.stdout) == [False, False, False, True, True]


FIRST_IMPORTS = """
import importlib, json, sys
targets = json.loads(sys.argv[1])
failures = []
for module, name in targets:
    for loaded in [k for k in sys.modules if k == "solver" or k.startswith("solver.")]:
        del sys.modules[loaded]
    try:
        value = importlib.import_module(module)
        if name:
            getattr(value, name)
    except Exception as exc:
        failures.append(f"{module} {name}: {type(exc).__name__}: {exc}")
print(json.dumps(failures))
"""


def test_each_module_and_name_imports_first(tmp_path: Path) -> None:
    """No import circle waits for a lazy import to go one way: each module of
    the package, and each public name's module reached through its package, is
    imported as the first ``solver`` import of a fresh module table."""
    targets: list[tuple[str, str]] = []
    for path in sorted((ROOT / "solver").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        targets.append((".".join(parts), ""))
    for name in PACKAGES:
        package = importlib.import_module(name)
        table = exports_of(package)
        first: dict[str, str] = {}
        for public in package.__all__:
            first.setdefault(table.module_of(public), public)
        targets.extend((name, public) for public in first.values())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")  # compiled once, not per round
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, json.dumps(targets)], env=env,
                       capture_output=True, text=True, timeout=300, check=True)
    assert len(targets) > 100
    assert json.loads(r.stdout) == []
