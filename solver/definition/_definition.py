"""The serialisable graph: :class:`Definition`, its ops, and their canonical digests.

A definition is what crosses a process boundary (a frontend's request, a file on
disk, a message between machines) and what a :class:`~solver.Solver` turns into
vertices. It is a set of ops keyed by digest plus one output edge, in the manner of
BuildKit's LLB ``pb.Definition``; docs/definition-format.md is the format's
reference.

Design notes
------------

*Why JSON with a canonical encoding, not protobuf.* LLB digests the marshalled
protobuf bytes of each op; protobuf gives no canonical form across implementations,
so BuildKit digests whatever bytes the client happened to write and keeps them
verbatim. We have no schema per op kind (payloads belong to the kinds), so an op is
a JSON value, and its digest is the SHA-256 of one canonical encoding: sorted keys,
no whitespace, UTF-8, integers only. Any implementation in any language can
recompute a digest from the decoded value alone, which is why a document may be
re-encoded, pretty-printed or reordered without changing what it means, and why a
reader can check each stated digest. Floats are refused rather than canonicalised:
shortest-round-trip float printing differs between languages, and no op needs it.

*Why equality is by digest.* The digest covers kind, payload and inputs exactly;
Python's ``==`` does not (``True == 1``, ``1 == 1.0``), so two ``OpDef`` that
compare equal under dataclass equality could digest differently. ``OpDef.__eq__``
compares digests instead, so equal always means "the same work".

*Why payloads are frozen.* The digest is computed once, at construction; a payload
the caller could mutate afterwards would make it lie. Payloads are deep-copied into
read-only ``dict`` and ``list`` subclasses (keys in code point order): subclasses
rather than ``MappingProxyType`` and tuples, so that a payload still compares equal
to the plain JSON value it came from and the C JSON encoder takes it as it is.

*Order of the structural checks.* A definition is checked when it is made (by the
constructor, :meth:`Definition.of` or :meth:`Definition.from_json`): types and
fields, then that every input and the output name ops that are present, then that
the ops form no cycle, then that each op's stated digest is its content's. A cycle is
reported before the digest mismatch that must come with it (honest digests cannot
form a cycle: each names its inputs' digests, which would have to exist first),
because the cycle is the more useful thing to hear about. All graph walks use
explicit stacks, so a 100k-deep chain is as safe as a wide graph.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias

from .._digest import digest_of
from .._errors import SolveError
from .._graph import Edge, VertexOptions
from ._readmemo import read_memo

if TYPE_CHECKING:
    # type-only: _opkind builds on this module (kinds resolve OpDefs)
    from ._opkind import OpKindRegistry

__all__ = [
    "DEFINITION_VERSION",
    "MAX_PAYLOAD_DEPTH",
    "Definition",
    "DefinitionError",
    "DefinitionVertex",
    "JSONValue",
    "Node",
    "NodeOutput",
    "OpDef",
    "OpMetadata",
    "OutputRef",
    "canonical_json",
    "node",
    "op_digest",
]

JSONValue: TypeAlias = bool | int | str | Sequence["JSONValue"] | Mapping[str, "JSONValue"] | None
"""A value an op payload may hold: ``None``, ``bool``, ``int`` (signed 64-bit),
``str``, arrays (list or tuple) and objects (mappings with ``str`` keys). No floats."""

DEFINITION_VERSION: Final = 1
"""The format version this library writes and the only one it reads."""

MAX_PAYLOAD_DEPTH: Final = 64
"""How deeply arrays and objects may nest in a payload, the payload object included."""

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1
_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")
_KIND_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")
_CYCLE_SHOWN: Final = 8


class DefinitionError(SolveError):
    """A definition (or an op in it) is malformed, or does not fit the op kinds.

    Raised before anything runs. The message names the offending op (its digest
    and kind) and field. ``vertex`` is the op's digest and ``kind`` its kind, when
    the error belongs to one op.
    """

    def __init__(self, message: str, *, op: str | None = None, kind: str | None = None) -> None:
        super().__init__(message, vertex=op)
        self.kind = kind


# -- canonical encoding ------------------------------------------------------------------


class _FieldError(Exception):
    """A field of an op is invalid. ``field`` names it (``payload``, ``inputs``,
    ``kind``) and ``path`` the place inside it, built while unwinding."""

    def __init__(self, reason: str, field: str = "payload") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.path: list[str] = []

    def where(self, root: str | None = None) -> str:
        return (self.field if root is None else root) + "".join(reversed(self.path))


def _freeze(value: object, depth: int) -> JSONValue:
    """A read-only deep copy of ``value`` (objects with sorted keys),
    or ``_FieldError``. Recursion is bounded by ``MAX_PAYLOAD_DEPTH``."""
    if value is None or value is True or value is False:
        return value
    cls = type(value)
    if cls is str:
        return value  # type: ignore[return-value]
    if cls is dict or cls is list:
        # What ``json.loads`` makes (a definition read from JSON): one pass with
        # the common leaves (str, bool, None, in-range int) kept in place, no
        # call per leaf; anything else goes through the general path below.
        if depth > MAX_PAYLOAD_DEPTH:
            raise _FieldError(f"nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        if cls is dict:
            return _freeze_dict(value, depth)  # type: ignore[arg-type]
        return _freeze_list(value, depth)  # type: ignore[arg-type]
    if cls is int:
        if not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            raise _FieldError(f"integer {value} is outside the signed 64-bit range")
        return value  # type: ignore[return-value]
    if depth == 1 and (cls is _FrozenDict or cls is _FrozenList):
        # Made by this function, so checked and read-only: a payload encoded
        # again (an op's cache digest, validation) is not copied again. Only at
        # the top, where its own depth was checked from the same start.
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        raise _FieldError(
            f"floats are not allowed (got {value!r}); encode the number as a string "
            "or a scaled integer"
        )
    if isinstance(value, int):
        return _freeze(int(value), depth)
    if isinstance(value, Mapping):
        if depth > MAX_PAYLOAD_DEPTH:
            raise _FieldError(f"nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        items: list[tuple[str, JSONValue]] = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise _FieldError(
                    f"object keys must be strings, got {type(key).__name__} {key!r}"
                )
            key = key if type(key) is str else str.__str__(key)
            try:
                items.append((key, _freeze(item, depth + 1)))
            except _FieldError as exc:
                exc.path.append(f"[{json.dumps(key, ensure_ascii=False)}]")
                raise
        items.sort(key=_first)
        return _FrozenDict(items)
    if isinstance(value, list | tuple):
        if depth > MAX_PAYLOAD_DEPTH:
            raise _FieldError(f"nested deeper than {MAX_PAYLOAD_DEPTH} levels")
        out: list[JSONValue] = []
        for i, item in enumerate(value):
            try:
                out.append(_freeze(item, depth + 1))
            except _FieldError as exc:
                exc.path.append(f"[{i}]")
                raise
        return _FrozenList(out)
    raise _FieldError(
        f"{type(value).__name__} is not a JSON value (use None, bool, int, str, "
        "list, tuple or a mapping with str keys)"
    )


_PLAIN_LEAVES: Final = frozenset((str, bool, type(None)))
"""The types ``_freeze`` keeps as they are without a check (an ``int`` has its
range checked)."""


_PLAIN_LEAVES_AND_INT: Final = _PLAIN_LEAVES | {int}


def _ints_in_range(value: list[object]) -> bool:
    return all(type(i) is not int or _INT_MIN <= i <= _INT_MAX for i in value)


def _freeze_dict(value: dict[object, object], depth: int) -> _FrozenDict:
    items: list[tuple[str, JSONValue]] = []
    append = items.append
    for key, item in value.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise _FieldError(
                    f"object keys must be strings, got {type(key).__name__} {key!r}"
                )
            key = str.__str__(key)
        t = type(item)
        if t is str or t is bool or item is None or (
            t is int and _INT_MIN <= item <= _INT_MAX  # type: ignore[operator]
        ):
            append((key, item))  # type: ignore[arg-type]
            continue
        try:
            append((key, _freeze(item, depth + 1)))
        except _FieldError as exc:
            exc.path.append(f"[{json.dumps(key, ensure_ascii=False)}]")
            raise
    items.sort(key=_first)
    return _FrozenDict(items)


def _freeze_list(value: list[object], depth: int) -> _FrozenList:
    types = set(map(type, value))  # one C-level pass
    if types <= _PLAIN_LEAVES:  # an argv, globs
        return _FrozenList(value)
    if types <= _PLAIN_LEAVES_AND_INT and _ints_in_range(value):
        # a content digest's entry record: [path, "file", mode, digest]
        return _FrozenList(value)
    out: list[JSONValue] = []
    for i, item in enumerate(value):
        try:
            out.append(_freeze(item, depth + 1))
        except _FieldError as exc:
            exc.path.append(f"[{i}]")
            raise
    return _FrozenList(out)


def _first(item: tuple[str, JSONValue]) -> str:
    return item[0]


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError("a payload (or description) of a definition is read-only")


class _FrozenDict(dict[str, Any]):
    """A read-only dict: what payload objects and descriptions are frozen into."""

    __slots__ = ()

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __reduce__(self) -> tuple[type[_FrozenDict], tuple[dict[str, Any]]]:
        return (_FrozenDict, (dict(self),))

    def __copy__(self) -> _FrozenDict:
        return self

    def __deepcopy__(self, memo: object) -> _FrozenDict:
        return self


class _FrozenList(list[Any]):
    """A read-only list: what payload arrays are frozen into."""

    __slots__ = ()

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __reduce__(self) -> tuple[type[_FrozenList], tuple[list[Any]]]:
        return (_FrozenList, (list(self),))

    def __copy__(self) -> _FrozenList:
        return self

    def __deepcopy__(self, memo: object) -> _FrozenList:
        return self


# One encoder for every canonical text: sorted keys (code point order), no
# whitespace, non-ASCII written as itself, no NaN. Frozen values are dicts and
# lists, which it encodes natively.
_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _op_text(kind: str, payload: Mapping[str, JSONValue], refs: Sequence[OutputRef]) -> str:
    """The canonical encoding of an op, as text.

    Assembled by hand around the encoded payload, which is what the encoder would
    write for ``{"inputs": ..., "kind": ..., "payload": ...}`` (keys already in
    order): kinds and digests are checked to be ASCII letters, digits and
    ``.:_-``, which JSON writes without escapes."""
    inputs = ",".join([f'["{r.digest}",{r.index}]' for r in refs])
    return f'{{"inputs":[{inputs}],"kind":"{kind}","payload":{_ENCODER.encode(payload)}}}'


def _utf8(text: str) -> bytes:
    """UTF-8 of ``text``, or ``_FieldError`` naming the lone surrogate in it."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(exc.object[exc.start])
        raise _FieldError(
            f"strings must be valid Unicode text (found the lone surrogate U+{bad:04X})"
        ) from None


def canonical_json(value: JSONValue) -> bytes:
    """The canonical encoding of a JSON value, as op digests use it.

    Sorted object keys (by code point), no whitespace, UTF-8, integers in decimal;
    see docs/definition-format.md for the exact rules. The result is the same in
    every process and on every machine. Raises :class:`DefinitionError` for a value
    that is not canonical JSON (floats, non-``str`` keys, integers outside 64 bits,
    lone surrogates, nesting deeper than :data:`MAX_PAYLOAD_DEPTH`).
    O(size of the value).
    """
    try:
        return _utf8(_ENCODER.encode(_freeze(value, 1)))
    except _FieldError as exc:
        raise DefinitionError(f"{exc.where('value')}: {exc.reason}") from None


# -- output references ---------------------------------------------------------------------


def _ref_problem(digest: object, index: object) -> str | None:
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        return f"{digest!r} is not an op digest (sha256:<64 lowercase hex digits>)"
    if type(index) is not int:
        return f"output index must be an integer, got {_describe(index)}"
    if index < 0:
        return f"output index {index} is out of range: indexes start at 0"
    if index > _INT_MAX:
        return f"output index {index} is out of range: larger than 2**63 - 1"
    return None


@dataclass(frozen=True, slots=True)
class OutputRef:
    """One output (``index``, from 0) of the op whose digest is ``digest``.

    Construction checks that ``digest`` is ``sha256:`` and 64 lowercase hex digits
    and that ``index`` is a non-negative ``int``, raising :class:`DefinitionError`.
    In JSON it is the array ``[digest, index]``.
    """

    digest: str
    index: int = 0

    def __post_init__(self) -> None:
        problem = _ref_problem(self.digest, self.index)
        if problem is not None:
            raise DefinitionError(problem)


# -- ops -------------------------------------------------------------------------------------


def _op_fields(
    kind: object, payload: object, inputs: Iterable[object]
) -> tuple[str, Mapping[str, JSONValue], tuple[OutputRef, ...], str]:
    """Check and freeze an op's fields and compute its digest.

    Raises ``_FieldError`` whose ``where`` names the field (``payload``,
    ``inputs[2]``, ``kind``)."""
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise _FieldError(
            f"{kind!r} is not a valid op kind (a letter, then up to 127 letters, "
            "digits, '.', '_' or '-')",
            "kind",
        )
    if not isinstance(payload, Mapping):
        raise _FieldError(f"must be a JSON object (a mapping), got {type(payload).__name__}")
    frozen = _freeze(payload, 1)
    assert isinstance(frozen, _FrozenDict)
    refs = tuple(inputs)
    for i, ref in enumerate(refs):
        if not isinstance(ref, OutputRef):
            err = _FieldError(
                f"an input must be an OutputRef, got {type(ref).__name__}", "inputs"
            )
            err.path.append(f"[{i}]")
            raise err
    checked: tuple[OutputRef, ...] = refs  # type: ignore[assignment]
    digest = digest_of(_utf8(_op_text(kind, frozen, checked)))
    return kind, frozen, checked, digest


@dataclass(frozen=True, slots=True, eq=False)
class OpDef:
    """One op of a definition: its ``kind``, JSON ``payload`` and ``inputs``.

    ``kind`` names an :class:`~solver.OpKind` (``"myapp.fetch"``): a letter, then
    up to 127 letters, digits, ``.``, ``_`` or ``-``. ``payload`` is a JSON object
    (see :data:`JSONValue`); it is deep-copied at construction into read-only
    ``dict`` and ``list`` subclasses (keys sorted; tuples become lists), so it
    compares equal to the JSON value it encodes and later changes to the value
    passed in do not affect the op; changing it raises ``TypeError``. ``inputs``
    are the outputs of other ops this op consumes.

    ``digest`` is the SHA-256 of the op's canonical encoding (see
    :meth:`canonical_bytes`), computed once at construction; since inputs are named
    by digest, it covers the op's whole input subgraph. Two ops are equal, and hash
    alike, exactly when their digests are equal. Invalid fields raise
    :class:`DefinitionError`. Construction is O(size of the payload).
    """

    kind: str
    payload: Mapping[str, JSONValue] = field(default_factory=dict)
    inputs: tuple[OutputRef, ...] = ()
    _digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            _, payload, inputs, digest = _op_fields(self.kind, self.payload, self.inputs)
        except _FieldError as exc:
            where = exc.where()
            raise DefinitionError(
                f"op of kind {self.kind!r}: {where}: {exc.reason}",
                kind=self.kind if isinstance(self.kind, str) else None,
            ) from None
        object.__setattr__(self, "payload", payload)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "_digest", digest)

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of :meth:`canonical_bytes`; stable across processes and
        machines. O(1): computed at construction."""
        return self._digest

    def canonical_bytes(self) -> bytes:
        """The exact bytes :attr:`digest` is computed over: the canonical encoding
        of ``{"inputs": [[digest, index], ...], "kind": ..., "payload": ...}``.
        Recomputed on each call, O(size of the payload)."""
        return _op_text(self.kind, self.payload, self.inputs).encode("utf-8")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpDef):
            return NotImplemented
        return self._digest == other._digest

    def __hash__(self) -> int:
        return hash(self._digest)

    def __repr__(self) -> str:
        return f"<OpDef {self.kind} {self._digest[:19]} inputs={len(self.inputs)}>"


def _new_op(kind: object, payload: object, inputs: Iterable[object]) -> OpDef:
    """An OpDef without the dataclass ``__init__`` (for the reader: errors stay
    ``_FieldError`` so the caller can name the op they belong to)."""
    kind, payload, refs, digest = _op_fields(kind, payload, inputs)
    op = object.__new__(OpDef)
    object.__setattr__(op, "kind", kind)
    object.__setattr__(op, "payload", payload)
    object.__setattr__(op, "inputs", refs)
    object.__setattr__(op, "_digest", digest)
    return op


def op_digest(kind: str, payload: Mapping[str, JSONValue], inputs: Sequence[OutputRef] = ()) -> str:
    """The digest an op with these fields has: ``OpDef(kind, payload, inputs).digest``.

    Raises :class:`DefinitionError` for invalid fields. O(size of the payload).
    """
    return OpDef(kind, payload, tuple(inputs)).digest


# -- metadata ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpMetadata:
    """What a definition says about one op outside its digest.

    ``name`` is shown in progress and errors (the vertex name; the op's kind when
    empty), ``description`` is free-form text for tools, ``ignore_cache`` makes the
    op run even when a cached result exists. Changing any of them never changes a
    digest. ``description`` is copied into a read-only mapping with sorted keys.
    Invalid types raise :class:`DefinitionError`.
    """

    name: str = ""
    description: Mapping[str, str] = field(default_factory=dict)
    ignore_cache: bool = False

    def __post_init__(self) -> None:
        problem = _metadata_problem(self.name, self.description, self.ignore_cache)
        if problem is not None:
            raise DefinitionError(f"op metadata: {problem}")
        frozen = _FrozenDict(
            sorted((str.__str__(k), str.__str__(v)) for k, v in self.description.items())
        )
        object.__setattr__(self, "name", str.__str__(self.name))
        object.__setattr__(self, "description", frozen)

    def __hash__(self) -> int:
        # Consistent with the generated __eq__; the description mapping is unhashable.
        return hash((self.name, self.ignore_cache, len(self.description)))

    @property
    def is_default(self) -> bool:
        """True when every field has its default value (no metadata at all)."""
        return not self.name and not self.description and not self.ignore_cache


def _metadata_problem(name: object, description: object, ignore_cache: object) -> str | None:
    if not isinstance(name, str):
        return f"'name' must be a string, got {_describe(name)}"
    if not _valid_text(name):
        return "'name' must be valid Unicode text"
    if not isinstance(description, Mapping):
        return f"'description' must be an object of strings, got {_describe(description)}"
    for key, value in description.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"'description' must map strings to strings, got {key!r}: {value!r}"
        if not (_valid_text(key) and _valid_text(value)):
            return f"'description' entry {key!r} must be valid Unicode text"
    if type(ignore_cache) is not bool:
        return f"'ignore_cache' must be a boolean, got {_describe(ignore_cache)}"
    return None


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NO_METADATA: Final = OpMetadata()
_NO_OPTIONS: Final = VertexOptions()


# -- building in code ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeOutput:
    """Output ``index`` of a :class:`Node`, as an input of another node."""

    node: Node
    index: int = 0

    def __post_init__(self) -> None:
        if type(self.index) is not int or self.index < 0:
            raise DefinitionError(f"output index must be an int >= 0, got {self.index!r}")


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """An op together with the nodes it consumes and its metadata: a graph under
    construction in code. Make one with :func:`node`; turn it into a definition
    with :meth:`Definition.of`.

    ``inputs`` must be the nodes behind ``op.inputs``, in order (checked,
    :class:`DefinitionError`). A node is an identity object: two nodes with equal
    ops are still different nodes (and the same op in the definition).
    """

    op: OpDef
    inputs: tuple[NodeOutput, ...] = ()
    metadata: OpMetadata | None = None

    def __post_init__(self) -> None:
        refs = self.op.inputs
        if len(refs) != len(self.inputs) or any(
            i.node.op.digest != r.digest or i.index != r.index
            for i, r in zip(self.inputs, refs, strict=True)
        ):
            raise DefinitionError(
                f"op of kind {self.op.kind!r}: the input nodes do not match op.inputs"
            )

    @property
    def digest(self) -> str:
        """The op's digest."""
        return self.op.digest

    def output(self, index: int) -> NodeOutput:
        """Output ``index`` of this node, to pass as another node's input (a node
        passed directly means its output 0)."""
        return NodeOutput(self, index)

    def __repr__(self) -> str:
        return f"<Node {self.op.kind} {self.op.digest[:19]}>"


def node(
    kind: str,
    payload: Mapping[str, JSONValue] | None = None,
    *,
    inputs: Iterable[Node | NodeOutput] = (),
    name: str = "",
    description: Mapping[str, str] | None = None,
    ignore_cache: bool = False,
) -> Node:
    """A new :class:`Node`: an op of ``kind`` with ``payload`` (default ``{}``)
    consuming ``inputs`` (a node stands for its output 0; ``n.output(i)`` for
    another), with optional metadata.

    ``node("myapp.parse", {"strict": True}, inputs=[fetched], name="parse")``.
    Invalid arguments raise :class:`DefinitionError`. O(size of the payload +
    number of inputs).
    """
    outs = tuple(i if isinstance(i, NodeOutput) else NodeOutput(i, 0) for i in inputs)
    for out in outs:
        if not isinstance(out.node, Node):
            raise DefinitionError(
                f"op of kind {kind!r}: an input must be a Node or NodeOutput, "
                f"got {type(out.node).__name__}"
            )
    op = OpDef(
        kind,
        {} if payload is None else payload,
        tuple(OutputRef(o.node.op.digest, o.index) for o in outs),
    )
    if not name and not description and ignore_cache is False:
        return Node(op, outs)
    meta = OpMetadata(name, {} if description is None else description, ignore_cache)
    return Node(op, outs, None if meta.is_default else meta)


# -- vertices -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class DefinitionVertex:
    """The engine vertex of one op of a definition (see :meth:`Definition.to_vertices`).

    ``digest`` is the op's digest, ``inputs`` edges to the vertices of its inputs,
    ``name`` the metadata name (or the kind), ``options`` the metadata's
    ``ignore_cache`` and ``description``, and ``sys`` the :class:`OpDef`, which
    :meth:`OpKindRegistry.resolve_op <solver.OpKindRegistry.resolve_op>` reads.
    """

    digest: str
    inputs: tuple[Edge, ...]
    name: str
    options: VertexOptions
    sys: OpDef

    def __repr__(self) -> str:
        return f"<DefinitionVertex {self.name!r} {self.digest[:19]}>"


# -- the definition -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Definition:
    """A serialisable build graph: ops by digest and one output edge (SPEC §7).

    ``ops`` maps each op's digest to the op; ``metadata`` maps some of those
    digests to :class:`OpMetadata` (outside the digests); ``output`` is the edge
    the definition builds; ``version`` is the format version
    (:data:`DEFINITION_VERSION`).

    A ``Definition`` is always structurally valid: construction (directly, by
    :meth:`of` or by :meth:`from_json`) checks that every key is its op's digest,
    that every input, the output and every metadata key name an op that is present,
    and that the ops form no cycle, raising :class:`DefinitionError` otherwise; the
    mappings are copied into read-only ones. Ops not reachable from the output are
    allowed (they are kept, serialised and checked, but never become vertices).
    What needs the op kinds (known kind, payload accepted, output indexes in range)
    is checked by :meth:`validate`. Construction is O(ops + inputs + payload size).

    Equality compares the ops (by digest), metadata, output and version.
    """

    ops: Mapping[str, OpDef]
    output: OutputRef
    metadata: Mapping[str, OpMetadata] = field(default_factory=dict)
    version: int = DEFINITION_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int:
            raise DefinitionError(
                f"definition version must be an integer, got {type(self.version).__name__}"
            )
        if self.version != DEFINITION_VERSION:
            raise DefinitionError(
                f"unsupported definition version {self.version}; "
                f"this library reads version {DEFINITION_VERSION}"
            )
        if not isinstance(self.ops, Mapping):
            raise DefinitionError(f"'ops' must be a mapping, got {type(self.ops).__name__}")
        if not isinstance(self.metadata, Mapping):
            raise DefinitionError(
                f"'metadata' must be a mapping, got {type(self.metadata).__name__}"
            )
        if not isinstance(self.output, OutputRef):
            raise DefinitionError(
                f"'output' must be an OutputRef, got {type(self.output).__name__}"
            )
        ops = dict(self.ops)
        metadata = dict(self.metadata)
        for key, op in ops.items():
            if not isinstance(key, str) or not _DIGEST_RE.fullmatch(key):
                raise DefinitionError(
                    f"op key {key!r} is not a digest (sha256:<64 lowercase hex digits>)"
                )
            if not isinstance(op, OpDef):
                raise DefinitionError(
                    f"op {key}: must be an OpDef, got {type(op).__name__}", op=key
                )
        for key, meta in metadata.items():
            if not isinstance(meta, OpMetadata):
                raise DefinitionError(
                    f"metadata for op {key}: must be an OpMetadata, got {type(meta).__name__}",
                    op=key if isinstance(key, str) else None,
                )
        _check_structure(ops, metadata, self.output)
        object.__setattr__(self, "ops", MappingProxyType(ops))
        object.__setattr__(self, "metadata", MappingProxyType(metadata))

    def __hash__(self) -> int:
        # Consistent with the generated __eq__ and O(1); the mappings are unhashable.
        return hash((self.version, self.output, len(self.ops), len(self.metadata)))

    def __repr__(self) -> str:
        out = self.output
        return (
            f"<Definition v{self.version} ops={len(self.ops)} "
            f"output={out.digest[:19]}[{out.index}]>"
        )

    # -- building ------------------------------------------------------------------------

    @classmethod
    def of(cls, output: Node | NodeOutput) -> Definition:
        """The definition whose output is ``output`` (a node means its output 0):
        every node reachable from it, and their metadata.

        The same op reached through several nodes is one op. Its metadata is that of
        the nodes that carry any; two nodes of one op with different (non-default)
        metadata raise :class:`DefinitionError`. Iterative: O(nodes + inputs), any
        depth.
        """
        out = output if isinstance(output, NodeOutput) else NodeOutput(output, 0)
        ops: dict[str, OpDef] = {}
        metadata: dict[str, OpMetadata] = {}
        seen: set[int] = set()
        stack: list[Node] = [out.node]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            op = n.op
            ops[op.digest] = op
            meta = n.metadata
            if meta is not None and not meta.is_default:
                known = metadata.setdefault(op.digest, meta)
                if known != meta:
                    raise DefinitionError(
                        f"op {op.digest} (kind {op.kind!r}) is given two different "
                        f"metadata: {known} and {meta}; give every node of one op the "
                        "same metadata, or none",
                        op=op.digest,
                        kind=op.kind,
                    )
            stack.extend(i.node for i in n.inputs)
        return cls(ops, OutputRef(out.node.op.digest, out.index), metadata)

    # -- JSON ----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The definition as a JSON document (docs/definition-format.md).

        Deterministic: the canonical encoding (sorted keys, no whitespace), so equal
        definitions give equal text, and ``Definition.from_json(d.to_json()) == d``.
        Every field is written, metadata fields included. O(size + ops log ops).
        """
        # The same text as encoding the whole document canonically, assembled from
        # the ops' canonical texts: digests are ASCII, so sorting them as Python
        # strings is the encoder's key order.
        metadata = _ENCODER.encode(
            {
                d: {"description": m.description, "ignore_cache": m.ignore_cache, "name": m.name}
                for d, m in self.metadata.items()
            }
        )
        ops = ",".join(
            [
                f'"{d}":{_op_text(op.kind, op.payload, op.inputs)}'
                for d, op in sorted(self.ops.items())
            ]
        )
        out = self.output
        return (
            f'{{"metadata":{metadata},"ops":{{{ops}}},'
            f'"output":["{out.digest}",{out.index}],"version":{self.version}}}'
        )

    @classmethod
    def from_json(cls, text: str | bytes | bytearray) -> Definition:
        """Read a definition written by :meth:`to_json` (or by hand, or elsewhere).

        ``bytes`` must be UTF-8. The document is checked completely before it is
        returned: JSON syntax (the error gives line, column and character
        position), duplicate object keys, the version, required and unknown fields
        and their types, payloads (see :class:`OpDef`), and then everything the
        constructor checks, including each stated op digest. Errors raise
        :class:`DefinitionError` naming the op and field. Whitespace, key order and
        string escapes in the document do not matter. O(size); no recursion over the
        graph.

        The same text read again gives the same object, without reading it again:
        the definitions read are kept by the SHA-256 of their text (a few, bounded;
        a text that fails is read every time: ``_readmemo.py``).
        """
        if cls is not Definition or not isinstance(text, str | bytes | bytearray):
            return cls._read_json(text)
        key = read_memo.key(text)
        if key is None:
            return cls._read_json(text)
        digest, size = key
        kept = read_memo.get(digest)
        if kept is None:
            kept = cls._read_json(text)
            read_memo.keep(digest, size, kept)
        return kept

    @classmethod
    def _read_json(cls, text: str | bytes | bytearray) -> Definition:
        doc = _parse(text)
        if not isinstance(doc, dict):
            raise DefinitionError(f"a definition must be a JSON object, got {_describe(doc)}")
        if "version" not in doc:
            raise DefinitionError(
                f"the definition has no 'version'; this library reads version {DEFINITION_VERSION}"
            )
        version = doc["version"]
        if type(version) is not int:
            raise DefinitionError(
                f"definition version must be an integer, got {_describe(version)}"
            )
        if version != DEFINITION_VERSION:
            raise DefinitionError(
                f"unsupported definition version {version}; "
                f"this library reads version {DEFINITION_VERSION}"
            )
        _check_fields(
            doc, "the definition", required=("version", "ops", "output"), optional=("metadata",)
        )
        ops_doc = doc["ops"]
        if not isinstance(ops_doc, dict):
            raise DefinitionError(f"'ops' must be a JSON object, got {_describe(ops_doc)}")
        ops = {key: _read_op(key, body) for key, body in ops_doc.items()}
        output = _read_ref(doc["output"], "'output'")
        metadata_doc = doc.get("metadata", {})
        if not isinstance(metadata_doc, dict):
            raise DefinitionError(
                f"'metadata' must be a JSON object, got {_describe(metadata_doc)}"
            )
        metadata = {key: _read_metadata(key, body) for key, body in metadata_doc.items()}
        return cls(ops, output, metadata, version)

    # -- checking and loading -------------------------------------------------------------

    def validate(self, kinds: OpKindRegistry | None = None) -> None:
        """Check the definition against ``kinds``; raise :class:`DefinitionError`.

        With no registry there is nothing left to check (structure is checked at
        construction). With one: every op's kind is registered, every payload passes
        its kind's ``validate``, and every input and the output name an output index
        below the count the kind's ``outputs`` gives. Calls each kind's ``validate``
        and ``outputs`` once per op, and not again for an op (by digest) the
        registry found valid before, until a kind is registered. O(ops + inputs).
        """
        if kinds is None:
            return
        checked, generation = kinds._checked_outputs()
        counts: dict[str, int] = {}
        for d, op in self.ops.items():
            n = checked.get(d)
            if n is not None:
                counts[d] = n
                continue
            kind = kinds.get(op.kind)
            if kind is None:
                raise DefinitionError(
                    f"op {d}: unknown op kind {op.kind!r}; registered kinds: "
                    f"{_names(kinds.names())}",
                    op=d,
                    kind=op.kind,
                )
            if kind.validate is not None:
                try:
                    kind.validate(op.payload)
                except Exception as exc:
                    raise DefinitionError(
                        f"op {d} (kind {op.kind!r}): invalid payload: {exc}",
                        op=d,
                        kind=op.kind,
                    ) from exc
            counts[d] = n = _output_count(kind.outputs, op, d)
            kinds._note_checked(d, n, generation)
        for d, op in self.ops.items():
            for i, ref in enumerate(op.inputs):
                n = counts[ref.digest]
                if ref.index >= n:
                    src = self.ops[ref.digest]
                    raise DefinitionError(
                        f"op {d} (kind {op.kind!r}): inputs[{i}] names output {ref.index} "
                        f"of op {ref.digest} (kind {src.kind!r}), which has "
                        f"{_outputs(n)}",
                        op=d,
                        kind=op.kind,
                    )
        out = self.output
        n = counts[out.digest]
        if out.index >= n:
            src = self.ops[out.digest]
            raise DefinitionError(
                f"'output' names output {out.index} of op {out.digest} (kind {src.kind!r}), "
                f"which has {_outputs(n)}",
                op=out.digest,
                kind=src.kind,
            )

    def to_vertices(self, kinds: OpKindRegistry | None) -> Edge:
        """The output as an engine :class:`~solver.Edge`, ready for ``Job.build``.

        Validates against ``kinds`` first (``None`` skips the kind checks). Makes
        one :class:`DefinitionVertex` per op reachable from the output, shared by
        every op that consumes it, inputs first without recursion. Solve it with
        ``Solver(resolve_op=kinds.resolve_op)``. Each call makes new vertices.
        O(reachable ops + inputs).
        """
        self.validate(kinds)
        vertices: dict[str, DefinitionVertex] = {}
        for d in _post_order(self.ops, (self.output.digest,)):
            op = self.ops[d]
            meta = self.metadata.get(d, _NO_METADATA)
            options = (
                _NO_OPTIONS
                if meta is _NO_METADATA or (not meta.ignore_cache and not meta.description)
                else VertexOptions(ignore_cache=meta.ignore_cache, description=meta.description)
            )
            vertices[d] = DefinitionVertex(
                digest=d,
                inputs=tuple(Edge(vertices[r.digest], r.index) for r in op.inputs),
                name=meta.name or op.kind,
                options=options,
                sys=op,
            )
        return Edge(vertices[self.output.digest], self.output.index)


# -- structure ----------------------------------------------------------------------------------


def _check_structure(
    ops: dict[str, OpDef], metadata: dict[str, OpMetadata], output: OutputRef
) -> None:
    for d, op in ops.items():
        for i, ref in enumerate(op.inputs):
            if ref.digest not in ops:
                raise DefinitionError(
                    f"op {d} (kind {op.kind!r}): inputs[{i}] names op {ref.digest}, "
                    "which is not in the definition",
                    op=d,
                    kind=op.kind,
                )
    if output.digest not in ops:
        raise DefinitionError(
            f"'output' names op {output.digest}, which is not in the definition",
            op=output.digest,
        )
    for d in metadata:
        if d not in ops:
            raise DefinitionError(f"'metadata' names op {d}, which is not in the definition", op=d)
    _post_order(ops, ops.keys())
    for d, op in ops.items():
        if op.digest != d:
            raise DefinitionError(
                f"op {d} (kind {op.kind!r}): the stated digest does not match the op's "
                f"content, whose digest is {op.digest}",
                op=d,
                kind=op.kind,
            )


def _post_order(ops: Mapping[str, OpDef], roots: Iterable[str]) -> list[str]:
    """The ops reachable from ``roots``, each after all its inputs (iterative DFS).

    Raises DefinitionError naming the ops of the first cycle found. Every input must
    name an op in ``ops``."""
    order: list[str] = []
    done: set[str] = set()
    for root in roots:
        if root in done:
            continue
        # path[i] is an op on the current walk; nxt[i] the next of its inputs to visit.
        path = [root]
        nxt = [0]
        on_path = {root: 0}
        while path:
            d = path[-1]
            inputs = ops[d].inputs
            i = nxt[-1]
            if i < len(inputs):
                nxt[-1] = i + 1
                child = inputs[i].digest
                if child in done:
                    continue
                if child in on_path:
                    _raise_cycle(ops, path[on_path[child] :])
                on_path[child] = len(path)
                path.append(child)
                nxt.append(0)
            else:
                path.pop()
                nxt.pop()
                del on_path[d]
                done.add(d)
                order.append(d)
    return order


def _raise_cycle(ops: Mapping[str, OpDef], cycle: list[str]) -> None:
    # ``cycle[0]`` consumes ``cycle[1]``, ..., and the last consumes ``cycle[0]``.
    shown = [f"{d} (kind {ops[d].kind!r})" for d in cycle[:_CYCLE_SHOWN]]
    if len(cycle) > _CYCLE_SHOWN:
        shown.append(f"... ({len(cycle) - _CYCLE_SHOWN} more)")
    shown.append(cycle[0])
    raise DefinitionError(
        f"the ops form a cycle of {len(cycle)}: "
        + " -> ".join(shown)
        + " (each op takes the next as an input)",
        op=cycle[0],
        kind=ops[cycle[0]].kind,
    )


def _output_count(outputs: Any, op: OpDef, d: str) -> int:
    if outputs is None:
        return 1
    try:
        n = outputs(op.payload)
    except Exception as exc:
        raise DefinitionError(
            f"op {d} (kind {op.kind!r}): counting its outputs failed: {exc}", op=d, kind=op.kind
        ) from exc
    if type(n) is not int or n < 0:
        raise DefinitionError(
            f"op {d} (kind {op.kind!r}): the kind's outputs() returned {n!r}, not an int >= 0",
            op=d,
            kind=op.kind,
        )
    return n


def _outputs(n: int) -> str:
    return "1 output" if n == 1 else f"{n} outputs"


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "(none)"


# -- reading --------------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _parse(text: object) -> object:
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DefinitionError(
                f"malformed definition: not UTF-8 (invalid byte at position {exc.start})"
            ) from exc
    if not isinstance(text, str):
        raise DefinitionError(f"a definition is read from str or bytes, got {type(text).__name__}")
    try:
        return json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        raise DefinitionError(
            f"malformed definition JSON: {exc.msg}: line {exc.lineno} column {exc.colno} "
            f"(char {exc.pos})"
        ) from exc
    except _DuplicateKeyError as exc:
        raise DefinitionError(
            f"malformed definition JSON: duplicate key {exc.args[0]!r} in an object"
        ) from exc
    except RecursionError as exc:
        raise DefinitionError("malformed definition JSON: nested too deeply") from exc
    except ValueError as exc:
        raise DefinitionError(f"malformed definition JSON: {exc}") from exc


def _check_fields(
    obj: dict[str, Any], where: str, *, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    if not optional and obj.keys() == set(required):
        return
    for key in required:
        if key not in obj:
            raise DefinitionError(f"{where}: missing field {key!r}")
    allowed = set(required) | set(optional)
    for key in obj:
        if key not in allowed:
            raise DefinitionError(f"{where}: unknown field {key!r}")


def _read_ref(value: object, where: str, i: int | None = None) -> OutputRef:
    """The OutputRef of ``[digest, index]`` at ``where`` (``inputs[i]`` of it when
    ``i`` is given)."""
    problem = None
    if isinstance(value, list) and len(value) == 2:
        digest, index = value
        problem = _ref_problem(digest, index)
        if problem is None:
            ref = object.__new__(OutputRef)
            object.__setattr__(ref, "digest", digest)
            object.__setattr__(ref, "index", index)
            return ref
    else:
        problem = f"expected [digest, index], got {_describe(value)}"
    if i is not None:
        where = f"{where}: inputs[{i}]"
    raise DefinitionError(f"{where}: {problem}")


def _read_op(key: str, body: object) -> OpDef:
    if not _DIGEST_RE.fullmatch(key):
        raise DefinitionError(f"op key {key!r} is not a digest (sha256:<64 lowercase hex digits>)")
    if not isinstance(body, dict):
        raise DefinitionError(f"op {key}: expected an object, got {_describe(body)}", op=key)
    kind = body.get("kind")
    where = f"op {key}" if not isinstance(kind, str) else f"op {key} (kind {kind!r})"
    try:
        _check_fields(body, where, required=("kind", "payload", "inputs"))
        if not isinstance(kind, str):
            raise DefinitionError(f"{where}: 'kind' must be a string, got {_describe(kind)}")
        payload = body["payload"]
        if not isinstance(payload, dict):
            raise DefinitionError(f"{where}: 'payload' must be an object, got {_describe(payload)}")
        inputs = body["inputs"]
        if not isinstance(inputs, list):
            raise DefinitionError(
                f"{where}: 'inputs' must be an array of [digest, index], got {_describe(inputs)}"
            )
        refs = [_read_ref(v, where, i) for i, v in enumerate(inputs)]
        try:
            return _new_op(kind, payload, refs)
        except _FieldError as exc:
            raise DefinitionError(f"{where}: {exc.where()}: {exc.reason}") from None
    except DefinitionError as exc:
        exc.vertex = key
        exc.kind = kind if isinstance(kind, str) else None
        raise


def _read_metadata(key: str, body: object) -> OpMetadata:
    where = f"metadata for op {key}"
    if not isinstance(body, dict):
        raise DefinitionError(f"{where}: expected an object, got {_describe(body)}", op=key)
    _check_fields(body, where, required=(), optional=("name", "description", "ignore_cache"))
    name = body.get("name", "")
    description = body.get("description", {})
    ignore_cache = body.get("ignore_cache", False)
    problem = _metadata_problem(name, description, ignore_cache)
    if problem is not None:
        raise DefinitionError(f"{where}: {problem}", op=key)
    return OpMetadata(name, description, ignore_cache)


def _describe(value: object) -> str:
    """A value as a JSON reader would name it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 80 else value[:77] + "..."
        return f"string {text!r}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
