"""Lazy re-exports for the packages' ``__init__`` modules (PEP 562).

Why: every ``solver`` process pays for the modules it imports, and a
command-line build is a process. When each package's ``__init__`` imported all
of its modules, ``import solver`` loaded every layer (the PostgreSQL store, the
Dask glue, explain, check, plan, the history reader, rich) and a no-op
``solver build`` spent most of its time importing code it never ran
(``docs/performance.md``, "CLI start-up", has the figures). Now a package's
``__init__`` names, for each public name, the module that defines it, and the
module is imported the first time the name is looked up: ``from solver.cache
import SQLiteCacheStorage`` imports ``solver.cache._sqlite`` and its imports,
never ``solver.cache._postgres``.

Every public name stays importable exactly as before (``from solver import
Solver``, ``solver.cache.KeyedCacheManager``, ``from solver import *``), and
``dir()`` and ``__all__`` list them all. For type checkers nothing changed: each
``__init__`` also imports every name under ``if TYPE_CHECKING:``, and defines
its ``__getattr__`` only at run time, so ``mypy --strict`` sees plain re-exports
(a misspelt name is still an error) while the interpreter runs none of them.
``tests/test_lazy_exports.py`` checks that the two lists agree.

A looked-up value is stored in the package's namespace, so the second lookup is
an ordinary attribute (the module ``__getattr__`` is called once per name).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


class LazyExports:
    """The public names of one package and the module each comes from.

    ``LazyExports(globals(), {"._module": ("Name", ...), ...})``; each module is a
    module of the package, named relative to it (one leading dot). :meth:`load` is
    the package's ``__getattr__`` and :meth:`dir` its ``__dir__``. A name given by
    two modules is a ``ValueError`` (the package would export whichever was looked
    up first).
    """

    __slots__ = ("_namespace", "_package", "_where", "names")

    def __init__(self, namespace: dict[str, Any], modules: Mapping[str, tuple[str, ...]]) -> None:
        self._namespace = namespace
        self._package: str = namespace["__name__"]
        self._where: dict[str, str] = {}
        for module, names in modules.items():
            if not module.startswith(".") or module.startswith(".."):
                raise ValueError(f"{module!r} is not a module of {self._package}")
            for name in names:
                if name in self._where:
                    raise ValueError(
                        f"{self._package}.{name} is exported by both "
                        f"{self._where[name]} and {module}"
                    )
                self._where[name] = module
        #: Every public name, sorted: the package's ``__all__``.
        self.names: list[str] = sorted(self._where)

    def module_of(self, name: str) -> str:
        """The absolute name of the module that defines the public ``name``.
        Raises ``KeyError`` for a name the package does not export."""
        return self._package + self._where[name]

    def load(self, name: str) -> object:
        """The public ``name``, its module imported on first use (O(1) after the
        import). Raises ``AttributeError`` for any other name, as an ordinary
        module does (``from package import name`` turns it into ``ImportError``)."""
        module = self._where.get(name)
        if module is None:
            raise AttributeError(f"module {self._package!r} has no attribute {name!r}")
        # __import__, not importlib.import_module: an import through the latter
        # is invisible to ``python -X importtime`` (its time would be counted as
        # this package's own), and start-up is what these imports are about.
        absolute = self._package + module
        __import__(absolute)
        value = getattr(sys.modules[absolute], name)
        self._namespace[name] = value
        return value

    def dir(self) -> list[str]:
        """What ``dir(package)`` lists: its own names and every public name."""
        return sorted({*self._namespace, *self.names})
