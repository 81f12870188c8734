"""Op kinds: how the ops of a :class:`~solver.Definition` become engine ops.

Each op of a definition names a kind (``"myapp.fetch"``). A kind is registered by
name in an :class:`OpKindRegistry` with a factory that turns the op's payload into an
:class:`~solver.Op`; ``registry.resolve_op`` is then the ``resolve_op`` a
:class:`~solver.Solver` takes. The built-in worker registers its kinds in
:data:`default_op_kinds` exactly as an application registers its own, so nothing
here knows any payload format.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar, overload

from .._graph import Vertex
from .._op import Builder, Op
from ._definition import _KIND_RE, DefinitionError, JSONValue, OpDef, _names

__all__ = [
    "OpContext",
    "OpFactory",
    "OpKind",
    "OpKindRegistry",
    "OutputCount",
    "PayloadCheck",
    "default_op_kinds",
]


@dataclass(frozen=True, slots=True)
class OpContext:
    """What a kind's factory is given to make the op of one vertex.

    ``kind`` and ``payload`` are the op's (the payload is read-only: changing it
    raises ``TypeError``); ``vertex`` is the engine's vertex (its ``sys`` is the
    :class:`~solver.OpDef`); ``builder`` solves nested edges on behalf of this
    vertex; ``inputs`` is the number of inputs the op has, whose results ``exec``
    receives in order.
    """

    kind: str
    payload: Mapping[str, JSONValue]
    vertex: Vertex
    builder: Builder
    inputs: int


OpFactory = Callable[[OpContext], Op]
"""Makes the op of one vertex. Called once per active vertex, from the engine's
task, synchronously; it should not block."""

OutputCount = Callable[[Mapping[str, JSONValue]], int]
"""The number of outputs an op with this payload has."""

PayloadCheck = Callable[[Mapping[str, JSONValue]], None]
"""Raises (any ``Exception``, whose text is reported) to reject a payload."""

_F = TypeVar("_F", bound=OpFactory)


@dataclass(frozen=True, slots=True)
class OpKind:
    """A registered op kind.

    ``factory(context)`` makes the :class:`~solver.Op`. ``outputs(payload)`` gives
    the number of outputs (1 when ``None``). ``validate(payload)`` raises to reject a
    payload; :meth:`Definition.validate <solver.Definition.validate>` calls it before
    anything runs (the engine does not call it again).
    """

    name: str
    factory: OpFactory
    outputs: OutputCount | None = None
    validate: PayloadCheck | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _KIND_RE.fullmatch(self.name):
            raise ValueError(
                f"{self.name!r} is not a valid op kind name (a letter, then up to 127 "
                "letters, digits, '.', '_' or '-')"
            )
        if not callable(self.factory):
            raise TypeError(f"the factory of op kind {self.name!r} is not callable")
        for attr in ("outputs", "validate"):
            fn = getattr(self, attr)
            if fn is not None and not callable(fn):
                raise TypeError(f"{attr} of op kind {self.name!r} is not callable")


class OpKindRegistry:
    """Op kinds by name, and the ``resolve_op`` that uses them.

    Register kinds once (typically at import time), then solve with
    ``Solver(resolve_op=registry.resolve_op)``. Registration is thread-safe; lookups
    take no lock and are O(1).
    """

    __slots__ = ("_checked", "_generation", "_kinds", "_lock", "_op_types")

    def __init__(self, kinds: Iterable[OpKind] = ()) -> None:
        """A registry holding ``kinds`` (an error if two share a name)."""
        self._kinds: dict[str, OpKind] = {}
        self._lock = threading.Lock()
        # Classes whose instances are Ops by their class alone (see _is_op).
        self._op_types: set[type] = set()
        # The ops Definition.validate found valid against these kinds, by op
        # digest, with the number of outputs each has (see _checked_outputs);
        # emptied whenever a kind is added or replaced, which bumps the
        # generation.
        self._checked: dict[str, int] = {}
        self._generation = 0
        for kind in kinds:
            self.add(kind)

    def __repr__(self) -> str:
        return f"<OpKindRegistry {len(self._kinds)} kinds: {_names(self.names())}>"

    # -- registration ------------------------------------------------------------------

    def add(self, kind: OpKind, *, replace: bool = False) -> OpKind:
        """Register ``kind`` and return it. A name already registered raises
        ``ValueError`` unless ``replace`` is true."""
        with self._lock:
            if not replace and kind.name in self._kinds:
                raise ValueError(
                    f"op kind {kind.name!r} is already registered; pass replace=True to replace it"
                )
            self._kinds[kind.name] = kind
            self._generation += 1
            self._checked = {}
        return kind

    @overload
    def register(
        self,
        name: str,
        factory: None = None,
        *,
        outputs: OutputCount | None = None,
        validate: PayloadCheck | None = None,
        replace: bool = False,
    ) -> Callable[[_F], _F]: ...

    @overload
    def register(
        self,
        name: str,
        factory: OpFactory,
        *,
        outputs: OutputCount | None = None,
        validate: PayloadCheck | None = None,
        replace: bool = False,
    ) -> OpKind: ...

    def register(
        self,
        name: str,
        factory: OpFactory | None = None,
        *,
        outputs: OutputCount | None = None,
        validate: PayloadCheck | None = None,
        replace: bool = False,
    ) -> OpKind | Callable[[_F], _F]:
        """Register the kind ``name``.

        ``registry.register("myapp.fetch", make_fetch)`` returns the :class:`OpKind`.
        Without a factory it is a decorator that registers the function and returns
        it unchanged::

            @registry.register("myapp.fetch", validate=check_fetch)
            def make_fetch(ctx: OpContext) -> Op: ...

        A name already registered raises ``ValueError`` unless ``replace`` is true;
        an invalid name raises ``ValueError``.
        """
        if factory is not None:
            return self.add(OpKind(name, factory, outputs, validate), replace=replace)

        def decorate(fn: _F) -> _F:
            self.add(OpKind(name, fn, outputs, validate), replace=replace)
            return fn

        return decorate

    def copy(self) -> OpKindRegistry:
        """A new registry with the same kinds, to extend without touching this one."""
        with self._lock:
            return OpKindRegistry(self._kinds.values())

    # -- lookup ------------------------------------------------------------------------

    def get(self, name: str) -> OpKind | None:
        """The kind registered as ``name``, or ``None``."""
        return self._kinds.get(name)

    def require(self, name: str) -> OpKind:
        """The kind registered as ``name``; :class:`~solver.DefinitionError` listing the
        registered kinds when there is none."""
        kind = self._kinds.get(name)
        if kind is None:
            raise DefinitionError(
                f"unknown op kind {name!r}; registered kinds: {_names(self.names())}",
                kind=name,
            )
        return kind

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted."""
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._kinds)

    # -- what Definition.validate found ------------------------------------------------

    def _checked_outputs(self) -> tuple[Mapping[str, int], int]:
        """The ops found valid against the kinds registered now (by op digest,
        each with its number of outputs), and the generation of the registration
        they belong to; for :meth:`Definition.validate
        <solver.Definition.validate>`, which checks an op once per op digest
        (its kind and payload are part of the digest, and a kind's ``validate``
        and ``outputs`` depend on the payload alone)."""
        return self._checked, self._generation

    def _note_checked(self, digest: str, outputs: int, generation: int) -> None:
        """Remember that the op ``digest`` passed its kind's checks with
        ``outputs`` outputs, unless a kind was registered since ``generation``.
        At most :data:`MAX_CHECKED_OPS` ops, emptied when full."""
        with self._lock:
            if generation != self._generation:
                return
            checked = self._checked
            if len(checked) >= MAX_CHECKED_OPS:
                checked.clear()
            checked[digest] = outputs

    # -- the engine's entry ---------------------------------------------------------------

    def resolve_op(self, vertex: Vertex, builder: Builder) -> Op:
        """The ``resolve_op`` for a :class:`~solver.Solver`: the op of a vertex made by
        :meth:`Definition.to_vertices <solver.Definition.to_vertices>`.

        Looks up ``vertex.sys.kind`` and calls its factory with an
        :class:`OpContext`. Raises :class:`~solver.DefinitionError` when ``sys`` is
        not an :class:`~solver.OpDef` or its kind is not registered ("unknown op
        kind 'x'; registered kinds: ..."), and ``TypeError`` when the factory returns
        something that is not an :class:`~solver.Op`; the engine reports any of them,
        and any exception from the factory, as the vertex's failure.
        """
        op = vertex.sys
        if not isinstance(op, OpDef):
            raise DefinitionError(
                f"vertex {vertex.name!r} ({vertex.digest}) is not an op of a Definition "
                f"(its sys is {type(op).__name__}); make vertices with "
                "Definition.to_vertices",
                op=vertex.digest,
            )
        kind = self._kinds.get(op.kind)
        if kind is None:
            raise DefinitionError(
                f"unknown op kind {op.kind!r}; registered kinds: {_names(self.names())}",
                op=vertex.digest,
                kind=op.kind,
            )
        made = kind.factory(OpContext(op.kind, op.payload, vertex, builder, len(vertex.inputs)))
        if not self._is_op(made):
            raise TypeError(
                f"the factory of op kind {op.kind!r} returned {type(made).__name__}, "
                "which is not an Op (it needs async cache_map and exec methods)"
            )
        return made


    def _is_op(self, made: object) -> bool:
        """``isinstance(made, Op)``, which for a runtime-checkable protocol looks
        up each member on every call (~10 us; once per active vertex on every
        build). A class that itself defines callable ``cache_map`` and ``exec``
        makes every instance an Op, unless the instance shadows one of them: it is
        checked once, then by a set lookup."""
        cls = type(made)
        shadows = _OP_MEMBERS & getattr(made, "__dict__", {}).keys()
        if cls in self._op_types and not shadows:
            return True
        if not isinstance(made, Op):
            return False
        if not shadows and all(callable(getattr(cls, m, None)) for m in _OP_MEMBERS):
            self._op_types.add(cls)
        return True


_OP_MEMBERS: Final = frozenset(("cache_map", "exec"))

MAX_CHECKED_OPS: Final = 65_536
"""Op digests a registry remembers as valid (emptied when full; about 150 bytes
each)."""

default_op_kinds: Final = OpKindRegistry()
"""The registry applications and the built-in worker register their kinds in."""
