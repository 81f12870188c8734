"""Jobs and active vertices: the :class:`Engine` at the core of ``Solver``.

After BuildKit's ``solver/jobs.go``.

* Loading a vertex for a job makes it *active*: one :class:`VertexState` per
  vertex digest, shared by every live job that loaded that digest. Loading visits
  inputs first and rewrites each vertex into a canonical :class:`LoadedVertex`
  whose inputs point at the shared states' vertices.
* Ignore-cache: an ignore-cache vertex never joins a normal run of its digest; it
  gets its own state under a derived key. A normal request may join an
  ignore-cache run.
* A state lives while any job or parent state (a nested build) refers to it;
  ``Job.discard`` removes the job everywhere and deletes what is left
  unreferenced, releasing the edges' results and the op's outputs.
* K jobs asking for one root share its graph as a whole: the first loads it,
  the second makes the root's hold (:class:`_Hold`, one holder and one shared
  event log for every job that joins that root), and every later fresh job
  joins the hold in O(1) (``Engine._join``).
* When the scheduler merges an edge into an equal one, the jobs of the merged
  state are added to the target, its ancestors and merged inputs, so the target
  outlives every job that reaches it (BuildKit's "inconsistent graph state" fix).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

import anyio
from anyio.abc import TaskGroup

from .._cache import CacheManager, ExportableCacheKey
from .._digest import digest_of
from .._errors import InternalError, SolveError
from .._graph import Edge, Vertex, VertexOptions
from .._op import Builder, CacheMap, Op, ResolveOp
from .._progress import CACHED, LOG, STARTED, ProgressEvent
from .._refs import SharedCachedResult
from ..cache import CombinedCacheManager, InMemoryCacheManager
from ._cachedpath import seed_cached_root
from ._edge import ActiveEdge
from ._index import EdgeIndex
from ._progress import EventRecord, JobProgress, event_record
from ._scheduler import Scheduler, hand_out
from ._sharedop import SharedOp
from ._workpool import WorkPool

if TYPE_CHECKING:
    from .._result import CachedResult

__all__ = ["Engine", "Job", "LoadedVertex", "VertexState"]

logger = logging.getLogger("solver")


class LoadedVertex:
    """The canonical vertex of an active state: inputs point at shared vertices."""

    __slots__ = ("_inputs", "digest", "orig")

    def __init__(self, orig: Vertex, digest: str, inputs: Sequence[Edge]) -> None:
        self.orig = orig
        self.digest = digest
        self._inputs = tuple(inputs)

    @property
    def inputs(self) -> Sequence[Edge]:
        return self._inputs

    @property
    def name(self) -> str:
        return self.orig.name

    @property
    def options(self) -> VertexOptions:
        return self.orig.options

    @property
    def sys(self) -> object:
        return self.orig.sys

    def __repr__(self) -> str:
        return f"<Vertex {self.name!r} {self.digest[:19]}>"


class _SubBuilder:
    """The builder an op gets: nested builds belong to the op's vertex."""

    __slots__ = ("state",)

    def __init__(self, state: VertexState) -> None:
        self.state = state

    async def build(self, edge: Edge) -> CachedResult:
        return await self.state.solver._sub_build(edge, self.state)


_NONE: frozenset[str] = frozenset()
# the longest history kept as a tuple (appending to one copies it)
_HISTORY_TUPLE = 8
_NO_SOURCES: dict[str, CacheManager] = {}  # never written to
_NO_EDGES: Mapping[int, ActiveEdge] = {}  # never written to


class VertexState:
    """One active vertex, shared by every job that loaded its digest."""

    __slots__ = (
        "_cold_keys",
        "_cold_loaded",
        "_cold_map",
        "_cold_out",
        "_cold_result",
        "_combined",
        "_edges",
        "_jobs",
        "_watchers",
        "children",
        "history",
        "key",
        "loading",
        "main_cache",
        "mark_deferred",
        "op",
        "orig_digest",
        "output0",
        "parents",
        "solver",
        "sources",
        "vtx",
        "watched",
    )

    def __init__(self, solver: Engine, key: str, vtx: LoadedVertex, orig_digest: str) -> None:
        self.solver = solver
        self.key = key
        self.vtx = vtx
        self.orig_digest = orig_digest
        # The jobs that keep the state active, and the jobs' progress buffers
        # that see its events: None, the one job (buffer), or a list of several
        # (not a set: a few, and an empty set alone costs 216 bytes). Most states
        # have one of each: a list would be two GC-tracked objects per vertex,
        # each walked by every full collection while the job lives.
        self._jobs: Job | list[Job] | None = None
        self._watchers: JobProgress | list[JobProgress] | None = None
        # Parents, children, sources and watchers start as shared empty values and
        # get their own container when first added to (most states never have
        # parents, children or sources; an empty set costs 216 bytes).
        self.parents: set[str] | frozenset[str] = _NONE
        self.children: set[str] | frozenset[str] = _NONE
        # the active edges by output: None, the one edge (most vertices have one
        # output; a dict per state was a GC-tracked object per vertex), or a dict
        self._edges: ActiveEdge | dict[int, ActiveEdge] | None = None
        # A result the cold path completed, held here until its edge is first
        # asked for (complete_later); most never are (a cold build is discarded
        # before another build looks), and an edge is ~0.3 KiB and one more
        # GC-tracked object per vertex.
        self._cold_result: SharedCachedResult | None = None
        self._cold_out = 0
        self._cold_map: CacheMap | None = None
        self._cold_keys: Sequence[ExportableCacheKey] = ()
        self._cold_loaded = False
        self.op: SharedOp | None = None
        # the Edge of output 0, made once and shared by the consumers' loaded
        # inputs and this state's ActiveEdge (three Edges per vertex of a
        # lattice were three GC-tracked objects)
        self.output0: Edge | None = None
        self.main_cache = solver._cache
        self.sources: dict[str, CacheManager] = _NO_SOURCES
        self._combined: CacheManager | None = None
        # progress: the records of the events so far (a tuple while short: see
        # _publish), and the jobs that see them
        self.history: tuple[EventRecord, ...] | list[EventRecord] = ()
        # loads of this vertex requested and not answered (SharedOp.request_load):
        # a consumer does not mark it cached meanwhile, since its load will say
        # where it came from; ``mark_deferred`` says a consumer would have, which
        # its load does if it fails or is cancelled (docs/insight.md)
        self.loading = 0
        self.mark_deferred = False
        # whether every job in ``jobs`` watches this state (true after a full
        # connect; a merge that adds jobs clears it)
        self.watched = False

    def __repr__(self) -> str:
        return f"<VertexState {self.vtx.name!r} jobs={len(self.jobs)}>"

    @property
    def jobs(self) -> Sequence[Job]:
        """The jobs that keep this state active. O(1)."""
        jobs = self._jobs
        if jobs is None:
            return ()
        return jobs if isinstance(jobs, list) else (jobs,)

    def add_job(self, job: Job) -> None:
        """Add ``job`` (the caller knows it is not there yet: ``job._states``)."""
        jobs = self._jobs
        if jobs is None:
            self._jobs = job
        elif isinstance(jobs, list):
            jobs.append(job)
        else:
            self._jobs = [jobs, job]

    def remove_job(self, job: Job) -> None:
        jobs = self._jobs
        if isinstance(jobs, list):
            jobs.remove(job)
            if len(jobs) == 1:
                self._jobs = jobs[0]
        elif jobs is job:
            self._jobs = None
        else:
            raise ValueError(f"{job!r} is not a job of {self!r}")

    @property
    def watchers(self) -> Sequence[JobProgress]:
        """The progress buffers that see this state's events. O(1)."""
        watchers = self._watchers
        if watchers is None:
            return ()
        return watchers if isinstance(watchers, list) else (watchers,)

    def remove_watcher(self, progress: JobProgress) -> None:
        watchers = self._watchers
        if isinstance(watchers, list):
            watchers.remove(progress)
            if len(watchers) == 1:
                self._watchers = watchers[0]
        elif watchers is progress:
            self._watchers = None
        else:
            raise ValueError(f"{progress!r} does not watch {self!r}")

    @property
    def edges(self) -> Mapping[int, ActiveEdge]:
        """The active edges of this state by output index (read-only; an edge
        the cold path completed later is made now). O(1)."""
        if self._cold_result is not None:
            self._complete_now()
        edges = self._edges
        if edges is None:
            return _NO_EDGES
        if isinstance(edges, dict):
            return edges
        return {edges.edge.index: edges}

    def _edge_at(self, index: int) -> ActiveEdge | None:
        if self._cold_result is not None and self._cold_out == index:
            return self._complete_now()
        edges = self._edges
        if edges is None:
            return None
        if isinstance(edges, dict):
            return edges.get(index)
        return edges if edges.edge.index == index else None

    def has_edge(self, index: int) -> bool:
        """Whether output ``index`` has an edge (or a completion held for one)."""
        if self._cold_result is not None and self._cold_out == index:
            return True
        edges = self._edges
        if edges is None:
            return False
        if isinstance(edges, dict):
            return index in edges
        return edges.edge.index == index

    def complete_later(
        self,
        index: int,
        cache_map: CacheMap,
        keys: Sequence[ExportableCacheKey],
        result: SharedCachedResult,
        loaded: bool,
    ) -> bool:
        """Hold what :meth:`ActiveEdge.complete` would be given for the edge of
        output ``index``, which has none yet; the edge is made and completed with
        it when first asked for (the state now owns ``result``). False, holding
        nothing, if a completion is held already (another output)."""
        if self._cold_result is not None:
            return False
        self._cold_result = result
        self._cold_out = index
        self._cold_map = cache_map
        self._cold_keys = keys
        self._cold_loaded = loaded
        return True

    def pending_edge(self) -> ActiveEdge:
        """The edge of the held completion (made now if it was not): what the
        live index stores for this state (``EdgeIndex.store_later``)."""
        edge = self._edge_at(self._cold_out)
        assert edge is not None
        return edge

    def _complete_now(self) -> ActiveEdge:
        result = self._cold_result
        cache_map = self._cold_map
        assert result is not None
        assert cache_map is not None
        self._cold_result = None
        self._cold_map = None
        keys, self._cold_keys = self._cold_keys, ()
        edge = self._new_edge(self._cold_out)
        edge.complete(cache_map, keys, result, self._cold_loaded)
        return edge

    def _new_edge(self, index: int) -> ActiveEdge:
        if self.op is None:
            self.op = SharedOp(self)
        e = ActiveEdge(self.output(index), self.op, self.solver._index)
        edges = self._edges
        if edges is None:
            self._edges = e
        elif isinstance(edges, dict):
            edges[index] = e
        else:
            self._edges = {edges.edge.index: edges, index: e}
        return e

    def output(self, index: int) -> Edge:
        """The edge of output ``index`` of this state's vertex (output 0's is
        shared: Edges are values)."""
        if index:
            return Edge(self.vtx, index)
        edge = self.output0
        if edge is None:
            edge = self.output0 = Edge(self.vtx, 0)
        return edge

    def sub_builder(self) -> Builder:
        """A builder for this vertex's op (made when its op is resolved: most
        ops never build)."""
        return _SubBuilder(self)

    def combined_cache(self) -> CacheManager:
        if self._combined is None:
            if not self.sources:
                self._combined = self.main_cache
            else:
                managers = [self.main_cache, *self.sources.values()]
                self._combined = CombinedCacheManager(managers, self.main_cache)
        return self._combined

    def add_source(self, cache: CacheManager) -> None:
        if cache.id != self.main_cache.id and cache.id not in self.sources:
            if self.sources is _NO_SOURCES:
                self.sources = {}
            self.sources[cache.id] = cache
            self._combined = None

    def get_edge(self, index: int) -> ActiveEdge:
        e = self._edge_at(index)
        if e is not None:
            while e.owner is not None:
                e = e.owner
            return e
        return self._new_edge(index)

    def set_edge(self, index: int, target: ActiveEdge, target_state: VertexState | None) -> None:
        e = self._edge_at(index)
        if e is not None:
            while e.owner is not None:
                e = e.owner
            if e is target:
                return
        else:
            e = self._new_edge(index)
        target.take_ownership(e)
        if target_state is not None:
            target_state.add_jobs(self)
            for w in self.watchers:
                target_state.watch(w)

    def add_jobs(self, src: VertexState) -> None:
        """Add ``src``'s jobs here, to every input, and to merged inputs."""
        actives = self.solver._actives
        seen: set[int] = set()
        stack: list[VertexState] = [self]
        while stack:
            st = stack.pop()
            if id(st) in seen:
                continue
            seen.add(id(st))
            key = st.key
            for j in src.jobs:
                if key not in j._states:
                    j._states.add(key)
                    st.add_job(j)
            st.watched = False
            for inp in st.vtx.inputs:
                inp_state = actives.get(inp.vertex.digest)
                if inp_state is None:
                    logger.error("input vertex not found while adding jobs")
                    continue
                stack.append(inp_state)
                merged = inp_state._edge_at(inp.index)
                if merged is None:
                    continue
                while merged.owner is not None:
                    merged = merged.owner
                mdigest = merged.edge.vertex.digest
                if mdigest != inp.vertex.digest:
                    mstate = actives.get(mdigest)
                    if mstate is None:
                        logger.error("merged input vertex not found while adding jobs")
                        continue
                    stack.append(mstate)

    # progress
    def watch(self, progress: JobProgress) -> None:
        # membership through the progress's own set: a watcher list may hold
        # K jobs, and K jobs loading one graph would make this O(K^2)
        watching = progress.watching
        key = self.key
        if key in watching:
            return
        if progress.shared and progress.sees(key):
            return  # its events reach the job through a hold's log already
        watching.add(key)
        watchers = self._watchers
        if watchers is None:
            self._watchers = progress
        elif isinstance(watchers, list):
            watchers.append(progress)
        else:
            self._watchers = [watchers, progress]
        if progress.shared:
            progress.watches_itself()  # a hold's member watching a vertex itself
        if progress.mixed:
            # a hold's log taking over a vertex a member watches itself (a merge
            # adds it to the hold): the member stops, and skips the history here
            mixed = progress.readers_watching(key)
            start = progress.kept()
            for ev in self.history:
                progress.put(ev)
            for reader in mixed:
                self.remove_watcher(reader)
                reader.take_over(key, progress, start, progress.kept())
            return
        for ev in self.history:
            progress.put(ev)

    def emit(
        self,
        status: str,
        error: BaseException | str | None = None,
        cache_source: str | None = None,
    ) -> None:
        """A status event of this vertex (``started``, ``completed``, ``error``,
        ``cached``); a start or a cached result marks the inputs that never ran
        as cached first. ``cache_source`` says where a loaded result came from."""
        if status == CACHED and self.history and self.history[-1][2] == CACHED:
            # Marked cached already, by a consumer that started (or was loaded)
            # before this load answered: the cold path loads what it needs all
            # at once, in any order. Once is what the edges show.
            return
        if status in (STARTED, CACHED):
            self._mark_inputs_cached()
        self._publish(status, error, cache_source=cache_source)

    def log(self, data: bytes, stream: int = 1) -> None:
        """A ``"log"`` event of this vertex (output of its running op)."""
        self._publish(LOG, None, data, stream)

    def _publish(
        self,
        status: str,
        error: BaseException | str | None = None,
        data: bytes = b"",
        stream: int = 0,
        cache_source: str | None = None,
    ) -> None:
        # The one place where the engine makes a progress event (of every kind,
        # on every path: edges, cached path, cold path), keeps it in the vertex's
        # history and hands it to the jobs that watch: a new field of the event
        # is filled here.
        rec = event_record(
            self.vtx.digest, self.vtx.name, status, error, data, stream, cache_source
        )
        # A vertex's few events are kept in a tuple of records, which the cyclic
        # collector stops tracking; an op that logs much gets a list.
        history = self.history
        if isinstance(history, list):
            history.append(rec)
        elif len(history) < _HISTORY_TUPLE:
            self.history = (*history, rec)
        else:
            self.history = [*history, rec]
        watchers = self._watchers
        if isinstance(watchers, list):
            JobProgress.fan_out(watchers, rec)
        elif watchers is not None:
            watchers.put(rec)

    def _mark_inputs_cached(self) -> None:
        # An input that never ran by the time its consumer starts was not needed:
        # its consumer's key matched. Show it as cached (BuildKit's vertexStream).
        actives = self.solver._actives
        stack = [inp.vertex.digest for inp in self.vtx.inputs]
        while stack:
            st = actives.get(stack.pop())
            if st is None or st.history:
                continue
            if st.loading:
                st.mark_deferred = True  # its load's event says where it came from
                continue
            st._publish(CACHED)
            stack.extend(inp.vertex.digest for inp in st.vtx.inputs)

    def release(self) -> None:
        result = self._cold_result
        if result is not None:
            self._cold_result = None
            self.solver.release_later(result)
        self.solver._index.forget(self)
        edges = self._edges
        for e in edges.values() if isinstance(edges, dict) else () if edges is None else (edges,):
            while e.owner is not None:
                e = e.owner
            e.release()
        if self.op is not None:
            self.op.release()


class _Pass:
    """The cached (and cold) path of one root, run in a task of the solver's and
    shared by every build that asks for that root while it runs: as shared op
    work is, it goes on while any of them waits, a caller that cancels returns
    at once, and the last one cancels it and returns once it has stopped."""

    __slots__ = ("done", "error", "scope", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: SolveError | None = None
        self.scope = anyio.CancelScope()
        self.waiters = 0

    async def run(self, solver: Engine, root: Edge) -> None:
        try:
            with self.scope:
                await seed_cached_root(solver, root)
        except SolveError as exc:
            self.error = exc
        except Exception as exc:  # a bug: fail the builds rather than the solver
            logger.exception("the cached path failed on %r", root)
            self.error = InternalError(f"unexpected error: {exc!r}")
        finally:
            if solver._passes.get(root.vertex.digest) is self:
                del solver._passes[root.vertex.digest]
            self.done.set()

    async def wait(self, scheduler: Scheduler) -> None:
        self.waiters += 1
        try:
            await self.done.wait()
        except BaseException:
            self.waiters -= 1
            if not self.waiters:
                self.scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.done.wait()
            if scheduler._closed:
                # the solver is closing (it cancels its task group): answered as
                # the scheduler answers the builds open then
                raise SolveError("the solver was closed") from None
            raise
        self.waiters -= 1
        if self.error is not None:
            raise hand_out(self.error)


class Job:
    """One client's build request. Create it with :meth:`Engine.new_job` (``Solver.new_job``).

    A job keeps every vertex it loaded active until :meth:`discard`. A discarded
    job can still build; it is discarded again by its next discard.
    """

    __slots__ = ("_holds", "_progress", "_states", "id", "solver")

    def __init__(self, solver: Engine, id: str) -> None:
        self.solver = solver
        self.id = id
        self._progress = JobProgress()
        # the keys of the states whose ``jobs`` hold this job (O(1) membership:
        # a state's job list may be long)
        self._states: set[str] = set()
        # the holds this job is a member of (a job joins at most one: see
        # Engine._join)
        self._holds: tuple[_Hold, ...] = ()

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    async def build(self, edge: Edge) -> CachedResult:
        """Solve ``edge`` and return a new handle on its result; the caller owns it.

        Raises :class:`SolveError` if any vertex fails. Cancelling the caller
        cancels only this caller; shared work goes on while another job waits.
        """
        s = self.solver
        s._check_open()
        await anyio.lowlevel.checkpoint_if_cancelled()
        s._register(self)
        if self._progress.closed:
            self._progress = JobProgress()
        v = s._load(edge.vertex, None, self)
        loaded = Edge(v, edge.index)
        passes = s._passes
        running = passes.get(v.digest)
        if running is None and not s._scheduler.building() and not passes:
            # No other build running: resolve the graph's keys in one pass and
            # load its root, or run it on the cold path (it also needs nothing
            # live to merge with: see seed_cached_root). Concurrent builds of
            # other graphs go to the edges, which share their work; K passes
            # over one graph would not.
            running = passes[v.digest] = _Pass()
            assert s._tg is not None
            s._tg.start_soon(running.run, s, loaded)
        if running is not None:
            # The root's edge is complete (or seeded) when the pass ends; a job
            # asking for the same root meanwhile waits for it too: through the
            # edges, it would only repeat what the pass does.
            await running.wait(s._scheduler)
        return await s._scheduler.build(loaded)

    async def discard(self) -> None:
        """Release every vertex this job keeps active (shared ones stay for others)
        and unregister the job (its ID may be given to a new job; as in BuildKit,
        a long-lived solver keeps nothing of a discarded job).

        A discarded job can still build: that registers it again (a SolveError if
        its ID was given to another job meanwhile), and its next discard releases
        what it built. When this returns, the results it released have been
        released (a release that has begun finishes even if the caller is
        cancelled)."""
        s = self.solver
        with s._collect_releases() as pending:
            s._discard(self)
        await s._release_all(pending)

    def status(self) -> AsyncIterator[ProgressEvent]:
        """Progress events of every vertex this job uses, until it is discarded."""
        return self._progress.events()


class _Hold(Job):
    """The jobs that joined one root's build as a whole, as one holder of it.

    K jobs asking for one root: the first loads its graph (a registration and a
    watch on every vertex state); the second makes a hold of the graph, which
    registers on and watches every state of the root's graph *once*, as a job
    would, and joins it; every later one joins the hold in O(1). A member holds
    every state the hold holds (they live while the hold has a member) and
    reads the hold's progress buffer (one shared log) with a cursor of its own
    (``JobProgress.shared``). Everything that adds a job to states (a merge's
    ``add_jobs``, a nested build's ``_connect_progress``) adds the hold like a
    job, so members keep what a job would. The last member's discard discards
    the hold: that releases what only it kept."""

    __slots__ = ("members", "root")

    def __init__(self, solver: Engine, root: Vertex) -> None:
        super().__init__(solver, f"hold:{secrets.token_hex(8)}")
        self.root = root
        self.members: list[Job] = []

    def __repr__(self) -> str:
        return f"<Hold {self.root.name!r} members={len(self.members)}>"

    def add(self, job: Job) -> None:
        self.members.append(job)
        job._holds = (*job._holds, self)
        job._progress.read_also(self._progress)


class Engine:
    """The core of a solver: jobs, active vertices, the scheduler and its work.

    Use it as an async context manager: it owns the task group in which shared
    work runs. ``resolve_op(vertex, builder)`` turns a vertex into its
    :class:`~solver.Op` (subclasses may override :meth:`resolve_op` instead);
    ``default_cache`` is the main cache (an :class:`~solver.InMemoryCacheManager`
    the engine makes, and closes, when not given; one passed in is the caller's).
    It knows vertices, ops, caches and results only: definitions, frontends and
    the built-in worker are :class:`~solver.Solver`'s (:mod:`solver.bridge`).
    """

    def __init__(
        self,
        resolve_op: ResolveOp | None = None,
        default_cache: CacheManager | None = None,
    ) -> None:
        self._user_resolve_op = resolve_op
        self._owns_cache = default_cache is None
        self._cache: CacheManager = (
            default_cache if default_cache is not None else InMemoryCacheManager()
        )
        self._actives: dict[str, VertexState] = {}
        # how many states are ignore-cache runs beside a normal state of their
        # digest (keyed by _ignore_key): none, and loading need not look for one
        self._ignore_states = 0
        self._jobs: dict[str, Job] = {}
        self._index = EdgeIndex()
        self._scheduler = Scheduler(self)
        self._tg: TaskGroup | None = None
        self._pool: WorkPool | None = None
        self._closed = False
        self._job_added = anyio.Event()
        self._collecting: list[Any] | None = None
        # the roots on the cached path now, each with its pass (see Job.build)
        self._passes: dict[str, _Pass] = {}
        # the holds of roots several jobs asked for, by root digest (see _join)
        self._holds: dict[str, _Hold] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} jobs={len(self._jobs)} active={len(self._actives)}>"

    def resolve_op(self, vertex: Vertex, builder: Builder) -> Op:
        """The op of ``vertex``, through the ``resolve_op`` the engine was given."""
        if self._user_resolve_op is None:
            raise SolveError(
                f"vertex {vertex.name!r} is not from a Definition and the solver was "
                "given no resolve_op"
            )
        return self._user_resolve_op(vertex, builder)

    @property
    def default_cache(self) -> CacheManager:
        return self._cache

    # -- lifetime --------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise SolveError("a Solver can be entered only once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._pool = WorkPool(tg, self._scheduler)
        self._scheduler.attach(self._pool)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        tg = self._tg
        assert tg is not None
        try:
            for job in list(self._jobs.values()):
                self._discard(job)
            self._jobs.clear()
            self._closed = True
            self._scheduler.close()
            tg.cancel_scope.cancel()
            if self._pool is not None:
                self._pool.close()
        finally:
            # The body's own exception (if any) propagates unchanged: it is not
            # handed to the task group, which would wrap it in an ExceptionGroup.
            try:
                await tg.__aexit__(None, None, None)
            finally:
                self._tg = None
                with anyio.CancelScope(shield=True):
                    if self._owns_cache:
                        await self._cache.close()

    def _check_open(self) -> None:
        if self._tg is None:
            raise SolveError("the Solver is not running: use it as `async with Solver(...)`")

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a unit of engine work (it handles its own errors and cancellation)."""
        assert self._pool is not None
        self._pool.submit(fn, *args)

    def release_later(self, result: Any) -> None:
        """Release a handle in the background; the release is shielded.

        Inside ``_collect_releases`` the handle is collected instead, for the
        caller to release inline (``Job.discard`` does this)."""
        if self._collecting is not None:
            self._collecting.append(result)
            return
        if self._tg is None:
            raise SolveError("release after the solver closed")
        self._tg.start_soon(_release, result)

    @contextlib.contextmanager
    def _collect_releases(self) -> Iterator[list[Any]]:
        outer = self._collecting
        pending: list[Any] = []
        self._collecting = pending
        try:
            yield pending
        finally:
            self._collecting = outer

    async def _release_all(self, pending: list[Any]) -> None:
        with anyio.CancelScope(shield=True):
            for result in pending:
                await _release(result)
        await anyio.lowlevel.checkpoint_if_cancelled()

    # -- jobs ------------------------------------------------------------------------
    def new_job(self, id: str | None = None) -> Job:
        """Start a job. ``id`` defaults to a random one; an ID in use is an error."""
        self._check_open()
        if id is None:
            id = secrets.token_hex(8)
        if id in self._jobs:
            raise SolveError(f"job ID {id} exists")
        job = Job(self, id)
        self._jobs[id] = job
        self._job_added.set()
        self._job_added = anyio.Event()
        return job

    async def get_job(self, id: str, timeout: float = 6.0) -> Job:
        """The job with ``id``, waiting up to ``timeout`` seconds for it to appear."""
        with anyio.move_on_after(timeout):
            while True:
                job = self._jobs.get(id)
                if job is not None:
                    await anyio.lowlevel.checkpoint()
                    return job
                await self._job_added.wait()
        raise SolveError(f"no such job {id}")

    def _discard(self, job: Job) -> None:
        states = job._states
        progress = job._progress
        watching = progress.watching
        if states or watching:
            # (a job that only joined a hold has neither: no walk over the states)
            for key, st in list(self._actives.items()):
                if key in states:
                    st.remove_job(job)
                    self._delete_if_unreferenced(key, st)
                if key in watching and self._actives.get(key) is st:
                    st.remove_watcher(progress)
        states.clear()
        watching.clear()
        progress.close()
        holds, job._holds = job._holds, ()
        for hold in holds:
            hold.members.remove(job)
            if not hold.members:
                if self._holds.get(hold.root.digest) is hold:
                    del self._holds[hold.root.digest]
                self._discard(hold)
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]

    def _register(self, job: Job) -> None:
        """Register ``job`` again if it was discarded (it is building again)."""
        current = self._jobs.get(job.id)
        if current is job:
            return
        if current is not None:
            raise SolveError(
                f"job ID {job.id} was given to a new job after this one was discarded"
            )
        self._jobs[job.id] = job

    def _delete_if_unreferenced(self, key: str, st: VertexState) -> None:
        stack = [(key, st)]
        while stack:
            k, s = stack.pop()
            if s._jobs is not None or s.parents or self._actives.get(k) is not s:
                continue
            for child_key in s.children:
                child = self._actives.get(child_key)
                if child is not None:
                    if k in child.parents:
                        child.parents.discard(k)  # type: ignore[union-attr]
                    stack.append((child_key, child))
            s.release()
            del self._actives[k]
            for w in s.watchers:
                w.watching.discard(k)
            if k != s.orig_digest:
                self._ignore_states -= 1

    # -- the edge factory (for the scheduler) ------------------------------------------
    def get_edge(self, edge: Edge) -> ActiveEdge | None:
        st = self._actives.get(edge.vertex.digest)
        if st is None:
            return None
        return st.get_edge(edge.index)

    def set_edge(self, edge: Edge, target: ActiveEdge) -> None:
        st = self._actives.get(edge.vertex.digest)
        if st is None:
            return
        target_state = self._actives.get(target.edge.vertex.digest)
        st.set_edge(edge.index, target, target_state)

    def has_owner(self, target: Edge, owner: Edge) -> bool:
        st = self._actives.get(target.vertex.digest)
        if st is None:
            return False
        owners = [e.owner.edge for e in st.edges.values() if e.owner is not None]
        seen: set[str] = set()
        while owners:
            nxt: list[Edge] = []
            for e in owners:
                d = e.vertex.digest
                if d in seen:
                    continue
                seen.add(d)
                s = self._actives.get(d)
                if s is None:
                    continue
                if s.vtx.digest == owner.vertex.digest:
                    return True
                nxt.extend(x.owner.edge for x in s.edges.values() if x.owner is not None)
            owners = nxt
        return False

    # -- loading -----------------------------------------------------------------------
    async def _sub_build(self, edge: Edge, parent: VertexState) -> CachedResult:
        v = self._load(edge.vertex, parent, None)
        return await self._scheduler.build(Edge(v, edge.index))

    def _load(self, root: Vertex, parent: VertexState | None, job: Job | None) -> LoadedVertex:
        """Make ``root`` and its inputs active for ``job`` (or as a nested build of
        ``parent``); inputs first, iteratively, so deep graphs never recurse."""
        if job is not None and parent is None and not self._ignore_states:
            loaded = self._join(root, job)
            if loaded is not None:
                return loaded
        # memo: id(vertex) -> its loaded vertex, or None while its inputs load
        memo: dict[int, LoadedVertex | None] = {}
        stack: list[Vertex] = [root]
        actives = self._actives
        # The common case is taken inline: a vertex whose normal state is active
        # already, loaded for a job with no nested-build parent or cache source
        # involved (K jobs building one graph load it K times).
        simple = job is not None and parent is None and not self._ignore_states
        while stack:
            v = stack[-1]
            k = id(v)
            if k not in memo:
                memo[k] = None
                for inp in reversed(v.inputs):
                    if id(inp.vertex) not in memo:
                        stack.append(inp.vertex)
                continue
            stack.pop()
            if memo[k] is not None:
                continue
            if simple:
                st = actives.get(v.digest)
                if st is not None and st.watched and not st.parents:
                    options = v.options
                    if not options.ignore_cache and not options.cache_sources:
                        assert job is not None
                        if st.key not in job._states:
                            job._states.add(st.key)
                            st.add_job(job)
                            st.watch(job._progress)
                        memo[k] = st.vtx
                        continue
            memo[k] = self._load_one(v, memo, parent, job)
        loaded = memo[id(root)]
        assert loaded is not None
        return loaded

    def _join(self, root: Vertex, job: Job) -> LoadedVertex | None:
        """Add ``job`` to a graph that is active already (K jobs building one
        graph). None if a vertex is not that simple (not active, not watched by
        all its jobs, part of a nested build, ignore-cache or with cache
        sources): ``_load`` then loads the graph.

        A job that holds and watches nothing yet joins the root's hold
        (:class:`_Hold`), made now if there is none: O(1) when the hold was
        made for this very root vertex (vertices are immutable, so the same
        object is the same graph with the same options), else one visit per
        vertex to check that the hold has them all. Any other job is added to
        every state itself: one visit per vertex."""
        actives = self._actives
        hold = self._holds.get(root.digest)
        # a member building that root again holds it all; a fresh job joins
        member = hold is not None and hold in job._holds
        fresh = not job._states and not job._holds and not job._progress.watching
        if (
            hold is not None
            and (member or fresh)
            and (hold.root is root or self._holds_all(hold, root))
        ):
            if not member:
                hold.add(job)
            return actives[root.digest].vtx
        found = self._simple_states(root)
        if found is None:
            return None
        if fresh:
            hold = _Hold(self, root)
            for st in found:
                hold._states.add(st.key)
                st.add_job(hold)
                st.watch(hold._progress)
            # (a hold of this digest made for another root object, which the
            # check above found not to hold it all, stays for its members)
            self._holds[root.digest] = hold
            hold.add(job)
        else:
            states = job._states
            progress = job._progress
            for st in found:
                if st.key not in states:
                    states.add(st.key)
                    st.add_job(job)
                    st.watch(progress)
        return actives[root.digest].vtx

    def _simple_states(self, root: Vertex) -> list[VertexState] | None:
        """The states of ``root``'s graph if each is active, watched by all its
        jobs, no part of a nested build, neither ignore-cache nor with cache
        sources (else None): one visit per vertex, in any order."""
        actives = self._actives
        found: list[VertexState] = []
        seen = {id(root)}
        stack = [root]
        while stack:
            v = stack.pop()
            st = actives.get(v.digest)
            if st is None or not st.watched or st.parents:
                return None
            options = v.options
            if options.ignore_cache or options.cache_sources:
                return None
            found.append(st)
            for inp in v.inputs:
                iv = inp.vertex
                if id(iv) not in seen:
                    seen.add(id(iv))
                    stack.append(iv)
        return found

    def _holds_all(self, hold: _Hold, root: Vertex) -> bool:
        """Whether ``hold`` holds every state of ``root``'s graph, each one a
        simple one (as :meth:`_simple_states` checks)."""
        found = self._simple_states(root)
        held = hold._states
        return found is not None and all(st.key in held for st in found)

    def _load_one(
        self,
        v: Vertex,
        memo: dict[int, LoadedVertex | None],
        parent: VertexState | None,
        job: Job | None,
    ) -> LoadedVertex:
        digest = v.digest
        options = v.options
        actives = self._actives
        st = actives.get(_ignore_key(digest)) if self._ignore_states else None
        if st is None:
            key = digest
            existing = actives.get(digest)
            if (
                existing is not None
                and not existing.vtx.options.ignore_cache
                and options.ignore_cache
            ):
                key = _ignore_key(digest)
            st = actives.get(key)
            if st is None:
                inputs: list[Edge] = []
                for e in v.inputs:
                    ist = actives[memo[id(e.vertex)].digest]  # type: ignore[union-attr]
                    shared = ist.output0
                    if shared is None or e.index:
                        shared = ist.output(e.index)
                    inputs.append(shared)
                st = VertexState(self, key, LoadedVertex(v, key, inputs), digest)
                actives[key] = st
                if key != digest:
                    self._ignore_states += 1
        for cache in options.cache_sources:
            st.add_source(cache)
        if job is not None and st.key not in job._states:
            job._states.add(st.key)
            st.add_job(job)
        if parent is not None and parent.key not in st.parents:
            if not st.parents:
                st.parents = set()
            st.parents.add(parent.key)  # type: ignore[union-attr]
            if not parent.children:
                parent.children = set()
            parent.children.add(st.key)  # type: ignore[union-attr]
            for cache in parent.sources.values():
                st.add_source(cache)
        self._connect_progress(st, job)
        return st.vtx

    def _connect_progress(self, st: VertexState, job: Job | None) -> None:
        if not st.parents:
            if st.watched and job is not None:
                # every other job watches already: K jobs loading one graph
                # connect in O(K), not O(K^2)
                st.watch(job._progress)
                return
            for j in st.jobs:
                st.watch(j._progress)
            st.watched = True
            return
        seen: set[str] = set()
        stack = [st]
        while stack:
            src = stack.pop()
            if src.key in seen:
                continue
            seen.add(src.key)
            for j in src.jobs:
                st.watch(j._progress)
            for p in src.parents:
                ps = self._actives.get(p)
                if ps is not None:
                    stack.append(ps)

    # -- introspection (tests and debugging) ---------------------------------------------
    def _state_jobs(self, digest: str) -> set[str] | None:
        st = self._actives.get(digest)
        if st is None:
            return None
        ids: set[str] = set()
        for j in st.jobs:
            if isinstance(j, _Hold):
                ids.update(m.id for m in j.members)
            else:
                ids.add(j.id)
        return ids


def _ignore_key(digest: str) -> str:
    """The key of an ignore-cache run of ``digest`` beside a normal one."""
    return digest_of(f"{digest}-ignorecache".encode())


async def _release(result: Any) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await result.release()
        except Exception:
            logger.exception("failed to release %r", result)
