"""A fluent builder of :class:`~solver.Definition`\\ s for the built-in worker, in
the manner of BuildKit's LLB states.

::

    from solver.worker.state import State, merge

    src = State.local("/home/me/project", include=["src", "pyproject.toml"])
    st = (State.scratch()
          .mkdir("app")
          .copy(src, "src", "app/src")
          .mkfile("app/VERSION", "1.0\\n")
          .with_name("assemble"))
    both = merge([st, State.inline({"README": "hi"})])
    defn = both.definition()

A :class:`State` is immutable; every method returns a new one. Consecutive file
actions (``mkdir``, ``mkfile``, ``copy``, ``rm``) on one state fold into one
``file`` op; :attr:`State.output` (or :meth:`State.definition`) makes the op.

Extension point: :meth:`State.from_node` wraps any node output (for instance an
``exec`` op an outside builder made from ``st.output``) as a state, so more kinds
(``st.run(...)``) can be written outside this module.

Payload reference of the built-in kinds
---------------------------------------

Paths in payloads are ``/``-separated and relative to the snapshot they refer to
(a leading ``/`` means its root). ``..`` may not leave the root, symlinks are
followed only inside it, and device files, FIFOs and sockets are refused
(:class:`~solver.worker.UnsafePathError`). Modes are integers (``0o644`` is
``420``); a committed snapshot has every write bit dropped, so a file made with
``0o644`` reads back as ``0o444``. Globs are ``fnmatch`` patterns (``*`` also
matches ``/``) matched against paths relative to the selection's top; an entry is
selected when it or a parent directory matches.

``source.inline`` (no inputs, one output)::

    {"files": [{"path": "dir/a.txt", "data": "text", "encoding": "utf-8",
                "mode": 420}]}

``encoding`` is ``"utf-8"`` (default) or ``"base64"``; ``mode`` defaults to
``0o644``; missing parent directories are made with ``0o755``. Cache key: the
payload.

``source.local`` (no inputs, one output)::

    {"path": "/absolute/dir", "include": ["src", "*.toml"], "exclude": ["*.pyc"]}

Copies the selected entries of a host directory (symlinks as symlinks). Cache key:
the content of exactly the selected entries (paths, types, permission bits,
bytes, symlink targets), so an unchanged directory is a cache hit. A missing
directory is a :class:`~solver.SolveError`.

``file`` (any inputs, one output)::

    {"base": 0,            # input to start from, or null for an empty tree
     "actions": [
       {"action": "mkdir", "path": "a/b", "mode": 493, "parents": true},
       {"action": "mkfile", "path": "a/b/f", "data": "...", "encoding": "utf-8",
        "mode": 420},
       {"action": "copy", "from": 1, "src": "dir", "dest": "out",
        "include": ["*.py"], "exclude": ["test_*"]},
       {"action": "rm", "path": "a", "allow_not_found": false}]}

``mkdir``: ``mode`` 0o755 by default; without ``parents`` the parent must exist
and the directory must not. ``mkfile``: creates missing parents; replaces a file
or symlink at the path (never writes through a symlink); a directory there is an
error. ``copy``: from input ``from``; a directory ``src`` has its (selected)
contents copied into directory ``dest``; a file ``src`` is copied to ``dest``, or
into it when ``dest`` ends with ``/`` or is an existing directory; a final
symlink in ``src`` is followed (inside the input); symlinks below it are copied as
symlinks; later entries replace earlier ones. ``rm``: removes a file, symlink or
whole directory; the root may not be removed. Cache key: the payload, plus, for
each input used only as a copy source, the content of exactly the copied entries.

``merge`` (one or more inputs, one output)::

    {}

The union of the inputs' trees in input order; a later input's entry replaces an
earlier one's at the same path (directories are merged).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping, Sequence

from ..definition import Definition, JSONValue, Node, NodeOutput, node

__all__ = ["State", "merge", "run"]


class State:
    """One tree the build will produce: a node output, plus file actions not yet
    folded into a ``file`` op. Immutable; build new states with the methods."""

    __slots__ = ("_actions", "_base", "_name", "_output", "_sources")

    def __init__(
        self,
        base: NodeOutput | None,
        actions: tuple[Mapping[str, JSONValue], ...] = (),
        sources: tuple[NodeOutput, ...] = (),
        name: str = "",
    ) -> None:
        """Prefer the constructors :meth:`scratch`, :meth:`inline`, :meth:`local`
        and :meth:`from_node`. ``base`` is the tree the pending ``actions`` apply to
        (``None``: empty); ``sources`` are the copy sources the actions' ``from``
        indexes refer to (index ``i`` is ``sources[i]``)."""
        self._base = base
        self._actions = actions
        self._sources = sources
        self._name = name
        self._output: NodeOutput | None = None

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def scratch(cls) -> State:
        """The empty tree."""
        return cls(None)

    @classmethod
    def from_node(cls, output: Node | NodeOutput) -> State:
        """The tree produced by ``output`` (a node means its output 0); the way
        builders of other kinds (such as ``exec``) hand their results back."""
        return cls(output if isinstance(output, NodeOutput) else NodeOutput(output, 0))

    @classmethod
    def inline(
        cls, files: Mapping[str, str | bytes], *, mode: int = 0o644, name: str = ""
    ) -> State:
        """A ``source.inline`` tree holding ``files`` (path -> text or bytes)."""
        entries: list[JSONValue] = []
        for path, data in sorted(files.items()):
            if isinstance(data, bytes):
                entry: dict[str, JSONValue] = {
                    "path": path,
                    "data": base64.b64encode(data).decode("ascii"),
                    "encoding": "base64",
                }
            else:
                entry = {"path": path, "data": data}
            if mode != 0o644:
                entry["mode"] = mode
            entries.append(entry)
        return cls.from_node(node("source.inline", {"files": entries}, name=name))

    @classmethod
    def local(
        cls,
        path: str | os.PathLike[str],
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        name: str = "",
    ) -> State:
        """A ``source.local`` tree: the selected entries of host directory ``path``
        (made absolute)."""
        payload: dict[str, JSONValue] = {"path": os.path.abspath(os.fspath(path))}
        if include:
            payload["include"] = list(include)
        if exclude:
            payload["exclude"] = list(exclude)
        return cls.from_node(node("source.local", payload, name=name))

    # -- file actions ------------------------------------------------------------------

    def _with(self, action: Mapping[str, JSONValue], source: NodeOutput | None = None) -> State:
        sources = self._sources
        if source is not None:
            action = dict(action)
            for i, known in enumerate(sources):
                if known.node.digest == source.node.digest and known.index == source.index:
                    action["from"] = i
                    break
            else:
                action["from"] = len(sources)
                sources = (*sources, source)
        return State(self._base, (*self._actions, action), sources, self._name)

    def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = True) -> State:
        """Make directory ``path`` (with missing parents unless ``parents=False``,
        in which case it must not exist yet)."""
        action: dict[str, JSONValue] = {"action": "mkdir", "path": path, "parents": parents}
        if mode != 0o755:
            action["mode"] = mode
        return self._with(action)

    def mkfile(self, path: str, data: str | bytes, *, mode: int = 0o644) -> State:
        """Write file ``path`` (text as UTF-8, or bytes)."""
        action: dict[str, JSONValue] = {"action": "mkfile", "path": path}
        if isinstance(data, bytes):
            action["data"] = base64.b64encode(data).decode("ascii")
            action["encoding"] = "base64"
        else:
            action["data"] = data
        if mode != 0o644:
            action["mode"] = mode
        return self._with(action)

    def copy(
        self,
        source: State,
        src: str,
        dest: str,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> State:
        """Copy ``src`` of ``source`` to ``dest`` in this tree (see the ``copy``
        action in the module docstring)."""
        action: dict[str, JSONValue] = {"action": "copy", "src": src, "dest": dest}
        if include:
            action["include"] = list(include)
        if exclude:
            action["exclude"] = list(exclude)
        return self._with(action, source.output)

    def rm(self, path: str, *, allow_not_found: bool = False) -> State:
        """Remove ``path`` (a whole directory, too)."""
        action: dict[str, JSONValue] = {"action": "rm", "path": path}
        if allow_not_found:
            action["allow_not_found"] = True
        return self._with(action)

    # -- naming and output -------------------------------------------------------------

    def with_name(self, name: str) -> State:
        """This state with the op that produces it named ``name`` (metadata only:
        the digest does not change). With pending file actions the name goes to the
        ``file`` op they fold into (and stays with it if more actions are added)."""
        if self._actions or self._base is None:
            return State(self._base, self._actions, self._sources, name)
        out = self._base
        n = out.node
        meta_desc: Mapping[str, str] = n.metadata.description if n.metadata else {}
        ignore = n.metadata.ignore_cache if n.metadata else False
        renamed = node(n.op.kind, n.op.payload, inputs=n.inputs, name=name,
                       description=meta_desc, ignore_cache=ignore)
        return State(NodeOutput(renamed, out.index))

    @property
    def output(self) -> NodeOutput:
        """The node output producing this tree; pending file actions (or the empty
        tree) become one ``file`` op here. The same state always gives the same
        node."""
        if self._output is None:
            if not self._actions and self._base is not None:
                self._output = self._base
            else:
                inputs: list[NodeOutput] = []
                base: JSONValue = None
                offset = 0
                if self._base is not None:
                    inputs.append(self._base)
                    base = 0
                    offset = 1
                inputs.extend(self._sources)
                actions: list[JSONValue] = []
                for action in self._actions:
                    if "from" in action:
                        moved = dict(action)
                        moved["from"] = int(action["from"]) + offset  # type: ignore[arg-type]
                        actions.append(moved)
                    else:
                        actions.append(action)
                n = node("file", {"base": base, "actions": actions}, inputs=inputs,
                         name=self._name)
                self._output = NodeOutput(n, 0)
        return self._output

    def definition(self) -> Definition:
        """The definition that builds this tree."""
        return Definition.of(self.output)

    def __repr__(self) -> str:
        base = "scratch" if self._base is None else repr(self._base.node)
        return f"<State {base} +{len(self._actions)} actions>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, State):
            return NotImplemented
        a, b = self.output, other.output
        return a.node.digest == b.node.digest and a.index == b.index

    def __hash__(self) -> int:
        out = self.output
        return hash((out.node.digest, out.index))


def merge(states: Iterable[State], *, name: str = "") -> State:
    """A ``merge`` of the states' trees in order (later ones win). Scratch states
    (the empty tree, with no actions) are left out; merging a single remaining state
    is that state."""
    outs = [s.output for s in states if not (s._base is None and not s._actions)]
    if not outs:
        return State.scratch()
    if len(outs) == 1 and not name:
        return State(outs[0])
    return State.from_node(node("merge", {}, inputs=outs, name=name))





def run(
    args: Sequence[str],
    *,
    root: State | None = None,
    mounts: Mapping[str, State] | None = None,
    readonly: Iterable[str] = (),
    selectors: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str = "",
    name: str = "",
    rootfs: Sequence[str] | None = None,
    network: str = "none",
    timeout: int | None = None,
    memory: int | None = None,
    processes: int | None = None,
    secrets: Sequence[str] = (),
    cpus: int | None = None,
) -> State:
    """An ``exec`` op: run ``args`` in a directory laid out from states, and return
    the state of that directory after the process exits 0.

    ``root`` (default: empty) is the writable tree the process runs in and the
    result; ``mounts`` maps further paths inside it to states, exposed read-only
    when listed in ``readonly`` (writable mounts are scratch copies whose changes
    are dropped). ``cwd`` is relative to the root. The process sees its root in
    ``$SOLVER_ROOT``. ``selectors`` maps a read-only mount to a sub-path of its
    state (a directory or a file): only that is mounted, and the step's cache
    key depends on that sub-path's content only, so a change elsewhere in the
    state does not run the step again (``docs/worker.md``, "Mount selectors").

    The step runs in the worker's sandbox (``docs/worker.md``, "Sandbox"):
    ``rootfs`` is its read-only system root (host paths; default
    :data:`~solver.worker.DEFAULT_ROOTFS`), ``network="host"`` gives it the host's
    network (default ``"none"``); ``timeout`` (whole seconds), ``memory`` (bytes of
    address space) and ``processes`` limit it; ``secrets`` are the ids of the
    worker's secrets it reads from ``/run/secrets/<id>``; ``cpus`` is a hint for a
    remote cluster (``docs/remote.md``; it limits nothing). Everything but the
    limits is part of the cache key; a secret's contents never are."""
    ro = set(readonly)
    inputs: list[NodeOutput] = []
    payload_mounts: list[JSONValue] = []

    chosen = dict(selectors or {})

    def add(state: State | None, dest: str, readonly: bool, output: int | None) -> None:
        index: JSONValue = None
        if state is not None and not (state._base is None and not state._actions):
            index = len(inputs)
            inputs.append(state.output)
        mount: dict[str, JSONValue] = {
            "input": index, "dest": dest, "readonly": readonly, "output": output
        }
        if dest in chosen:
            mount["selector"] = chosen[dest]
        payload_mounts.append(mount)

    add(root, "", False, 0)
    for dest, state in (mounts or {}).items():
        add(state, dest, dest in ro, None)
    unknown = ro - set(mounts or {})
    if unknown:
        raise ValueError(f"readonly names paths that are not mounts: {sorted(unknown)}")
    unselectable = sorted(set(chosen) - ro)
    if unselectable:
        raise ValueError(
            f"selectors name paths that are not read-only mounts: {unselectable}"
        )
    payload: dict[str, JSONValue] = {
        "args": list(args),
        "env": dict(env or {}),
        "cwd": cwd,
        "mounts": payload_mounts,
    }
    # Only what differs from the defaults, so that a plain step's payload (and
    # cache key) stays as it was before these options existed.
    if rootfs is not None:
        payload["rootfs"] = list(rootfs)
    if network != "none":
        payload["network"] = network
    limits: dict[str, JSONValue] = {}
    if timeout is not None:
        limits["timeout"] = timeout
    if memory is not None:
        limits["memory"] = memory
    if processes is not None:
        limits["processes"] = processes
    if cpus is not None:
        limits["cpus"] = cpus
    if limits:
        payload["limits"] = limits
    if secrets:
        payload["secrets"] = list(secrets)
    return State.from_node(NodeOutput(node("exec", payload, inputs=inputs, name=name), 0))
