"""Compiling a checked build file to one definition per platform build.

The build is a single working tree, as in a Dockerfile: it starts empty, the
``[[copy]]`` entries copy parts of the build context into it, the ``[[file]]``
entries write files, and each ``[[step]]`` runs a process in it (an ``exec`` op
whose root is the tree so far and whose output is the tree afterwards). The
result is the tree (or the ``[output]`` paths of it), plus a provenance record at
:data:`PROVENANCE_PATH`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from solver import Definition, Node, NodeOutput
from solver.worker import State, run

from ._parse import Buildfile, BuildfileError
from ._platforms import PlatformBuild

__all__ = ["PROVENANCE_PATH", "compile_build", "provenance", "state_of"]

#: Where the provenance record lives in each result.
PROVENANCE_PATH: Final = ".buildfile/provenance.json"


def state_of(definition: Definition) -> State:
    """The output of ``definition`` as a :class:`~solver.worker.State`, so that it
    can be built upon (its ops and metadata are kept). Iterative: any depth."""
    nodes: dict[str, Node] = {}
    stack: list[tuple[str, bool]] = [(definition.output.digest, False)]
    while stack:
        digest, ready = stack.pop()
        if digest in nodes:
            continue
        op = definition.ops[digest]
        if not ready:
            stack.append((digest, True))
            stack.extend((ref.digest, False) for ref in op.inputs if ref.digest not in nodes)
            continue
        inputs = tuple(NodeOutput(nodes[ref.digest], ref.index) for ref in op.inputs)
        nodes[digest] = Node(op, inputs, definition.metadata.get(digest))
    out = definition.output
    return State.from_node(NodeOutput(nodes[out.digest], out.index))


def provenance(
    buildfile: Buildfile,
    build: PlatformBuild,
    version: str | None,
    args: Mapping[str, str],
) -> str:
    """The provenance record of one platform build (JSON text, deterministic, so
    that an unchanged build stays cached)."""
    doc = {
        "builder": "frontends.buildfile",
        "buildfile": {"filename": buildfile.filename, "digest": buildfile.digest},
        "name": buildfile.name,
        "platform": build.target.name,
        "serves": [p.name for p in build.serves],
        "version": version,
        "args": dict(sorted(args.items())),
        "steps": [{"name": s.name, "args": list(s.args)} for s in buildfile.steps],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def compile_build(
    buildfile: Buildfile,
    build: PlatformBuild,
    *,
    context: State | None,
    version: str | None = None,
    args: Mapping[str, str] | None = None,
) -> Definition:
    """The definition of one platform build: the tree made by ``buildfile`` for
    ``build.target``, with the provenance record. ``context`` is the build context
    (needed when the file has ``[[copy]]`` entries); ``version`` becomes
    ``$VERSION`` of every step when given; ``args`` are the effective build
    arguments (default: the file's defaults)."""
    effective = dict(buildfile.args if args is None else args)
    target = build.target
    prefix = f"{buildfile.name} {target.name}: " if buildfile.name else f"{target.name}: "
    tree = State.scratch()
    if buildfile.copies and context is None:
        raise BuildfileError(
            f"{buildfile.filename}: [[copy]] needs a build context, and the frontend was "
            "given none"
        )
    for copy in buildfile.copies:
        assert context is not None
        tree = tree.copy(context, copy.src, copy.dest, include=copy.include,
                         exclude=copy.exclude)
    for file in buildfile.files:
        tree = tree.mkfile(file.path, file.content, mode=file.mode)
    if buildfile.copies or buildfile.files:
        tree = tree.with_name(prefix + "sources")
    base_env = target.env()
    if version is not None:
        base_env["VERSION"] = version
    base_env.update(effective)
    base_env.update(buildfile.env)
    for step in buildfile.steps:
        tree = run(
            step.args,
            root=tree,
            env={**base_env, **step.env},
            cwd=step.workdir,
            name=prefix + step.name,
        )
    if buildfile.output is not None:
        out = State.scratch()
        for path in buildfile.output:
            out = out.copy(tree, path, path)
    else:
        out = tree
    record = provenance(buildfile, build, version, effective)
    out = out.mkfile(PROVENANCE_PATH, record).with_name(prefix + "result")
    return out.definition()
