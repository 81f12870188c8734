"""Definitions: the serialisable form of a graph, and the op kinds it names.

Data only: a :class:`Definition` is ops by digest plus an output edge, validated
and turned into engine vertices (:meth:`Definition.to_vertices`); an
:class:`OpKindRegistry` maps each kind to the factory that makes its
:class:`~solver.Op`. Kinds are registered, never imported: this package imports
no engine and no worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import LazyExports

if TYPE_CHECKING:
    from ._definition import (
        DEFINITION_VERSION as DEFINITION_VERSION,
        MAX_PAYLOAD_DEPTH as MAX_PAYLOAD_DEPTH,
        Definition as Definition,
        DefinitionError as DefinitionError,
        DefinitionVertex as DefinitionVertex,
        JSONValue as JSONValue,
        Node as Node,
        NodeOutput as NodeOutput,
        OpDef as OpDef,
        OpMetadata as OpMetadata,
        OutputRef as OutputRef,
        canonical_json as canonical_json,
        node as node,
        op_digest as op_digest,
    )
    from ._diff import (
        OpChange as OpChange,
        diff_definitions as diff_definitions,
        op_difference as op_difference,
    )
    from ._history import (
        DEFAULT_MAX_OPS as DEFAULT_MAX_OPS,
        InMemoryOpHistory as InMemoryOpHistory,
        OpDefinitionRecord as OpDefinitionRecord,
        OpHistory as OpHistory,
        files_that_differ as files_that_differ,
        history_records as history_records,
        inputs_key as inputs_key,
        note_changed_files as note_changed_files,
    )
    from ._opkind import (
        OpContext as OpContext,
        OpFactory as OpFactory,
        OpKind as OpKind,
        OpKindRegistry as OpKindRegistry,
        OutputCount as OutputCount,
        PayloadCheck as PayloadCheck,
        default_op_kinds as default_op_kinds,
    )

_exports = LazyExports(
    globals(),
    {
        "._definition": (
            "DEFINITION_VERSION", "MAX_PAYLOAD_DEPTH", "Definition", "DefinitionError",
            "DefinitionVertex", "JSONValue", "Node", "NodeOutput", "OpDef", "OpMetadata",
            "OutputRef", "canonical_json", "node", "op_digest",
        ),
        "._diff": ("OpChange", "diff_definitions", "op_difference"),
        "._history": (
            "DEFAULT_MAX_OPS", "InMemoryOpHistory", "OpDefinitionRecord", "OpHistory",
            "files_that_differ", "history_records", "inputs_key", "note_changed_files",
        ),
        "._opkind": (
            "OpContext", "OpFactory", "OpKind", "OpKindRegistry", "OutputCount", "PayloadCheck",
            "default_op_kinds",
        ),
    },
)
__all__ = _exports.names
if not TYPE_CHECKING:
    __getattr__ = _exports.load
    __dir__ = _exports.dir
