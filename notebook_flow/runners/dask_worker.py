"""What runs on a Dask worker for :class:`~notebook_flow.runners.DaskRunner`.

Per worker, once: :class:`WorkerSetup` — the store's URL and options and the signing key
— arrives inside a worker plugin (registered by the client, replayed by the scheduler to
workers that join later), so secrets cross the network once per worker, never per run.

Per run: :func:`run_on_worker` (or :func:`run_chunk`, which runs a chunk of a map's
misses one after the other in one Dask task) gets the token of that setup, the task
(unpickled once per worker), the arguments and a :class:`RunSpec`
whose cache key and components the *client* computed — source fingerprints are taken
where the source lives (a notebook cell exists only there), so client and worker agree on
the key by construction. The run goes through the usual call path (lookup → lock →
re-check → run with retries → commit) with two differences:

* nothing opens DuckDB: events are collected in the run's context (``tasks.call``'s
  event sink) and returned with the outcome, and also spooled to the store (see
  ``metadata/remote.py``) in case the client is gone; a miss is explained against the
  components the client sent;
* the result stays where it is: a hit or a commit returns its manifest (a few hundred
  bytes), and the client loads the value when ``result()`` asks. Only a value that was
  not stored (an uncached or ``persist_result=False`` task) travels back.

A chunk's runs are those the client's batched lookup found absent a moment ago: on its
first attempt, the lookup before a run's lock takes that answer (and the commit skips
reading the manifest it would replace), instead of two GETs per run; the re-check after
a lock reads the store as always. A chunk leaves a marker in the store while it runs
(``chunks/<id>``, one PUT and one DELETE): when Dask runs it again because its worker
died, the marker says so, and the chunk looks every key up first (``storage/batch.py``:
a listing and concurrent reads), so what its first attempt committed is a hit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import re
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin  # noqa: TID253  (imported with DaskRunner only)

from notebook_flow import _identity
from notebook_flow.metadata import RunEvent
from notebook_flow.metadata.remote import Op, encode, session_dir
from notebook_flow.states import RunState
from notebook_flow.storage import behind, files
from notebook_flow.storage.batch import lookup_many
from notebook_flow.storage.store import assumed_absent
from notebook_flow.tasks import _Call, _run_async, _run_sync
from notebook_flow.tasks import call as _callmod
from notebook_flow.tasks.explain import _expired_reason, diff_components

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore
    from notebook_flow.tasks import Task

__all__ = [
    "ChunkPayload",
    "Outcome",
    "RunPayload",
    "RunSpec",
    "WorkerSetup",
    "run_chunk",
    "run_on_worker",
]

logger = logging.getLogger("notebook_flow")

#: Seconds between two writes of a worker's spooled events to the store.
SPOOL_INTERVAL = 5.0


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """The settings a worker needs to reach the client's store (sent once per worker)."""

    token: str
    store: str
    storage_options: dict[str, Any]
    signing_key: bytes | None = dataclasses.field(repr=False)
    session: str  # the client session, which names its folder of spooled events
    client_id: str  # the Dask client's id: its runs are orphans once it disconnected

    def apply(self) -> ResultStore:
        """Make these the worker's settings (if another client changed them) → its store."""
        from notebook_flow.config import get_store, use_store

        use_store(self.store, self.storage_options, self.signing_key)
        return get_store()


class NotebookFlowPlugin(WorkerPlugin):
    """Installs one :class:`WorkerSetup` on every worker of the cluster, present and future."""

    def __init__(self, config: WorkerSetup) -> None:
        self.config = config
        self.name = f"notebook_flow-{config.token}"
        self.idempotent = True

    def setup(self, worker: Any) -> None:
        install(self.config)

    def teardown(self, worker: Any) -> None:
        _spool.flush()
        _setups.pop(self.config.token, None)  # the client is done: forget its secrets


def install(config: WorkerSetup) -> None:
    """Register ``config`` in this worker process; from now on nothing here opens DuckDB."""
    _setups[config.token] = config
    _callmod.process_sink[0] = _OrphanSink()  # e.g. lease renewals, outside a run's context


def flush_events() -> int:
    """Write this worker's spooled events to the store now; returns how many (client.run)."""
    return _spool.flush()


def worker_runs(dask_worker: Any) -> list[tuple[str, str, str | None]]:
    """``(Dask key, Dask state, client id)`` of the runs this worker holds to execute or
    is executing (client.run): also those whose function has not started yet, which
    only Dask's own state knows. The client id is known once the function runs."""
    by_run = dict(_executing)
    out = []
    for key, ts in list(dask_worker.state.tasks.items()):
        name = str(key)
        if name.startswith("notebook_flow-") and ts.state in (
            "executing",
            "long-running",
            "cancelled",
            "resumed",
        ):
            out.append((name, str(ts.state), by_run.get(name.rsplit("-", 1)[-1])))
    return out


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What the client decided about one run: id, key and components, and what it knows."""

    run_id: str
    key: str | None
    components: dict[str, str] | None
    reference: dict[str, str] | None  # components of the task's latest result (explain)
    notebook: str | None
    cell: str | None


class RunPayload:
    """One run as it travels (an opaque object: Dask does not look inside it for tasks
    or futures, as it would in tuples, lists and dicts)."""

    __slots__ = ("args", "kwargs", "spec", "task_ref", "token")

    def __init__(
        self,
        token: str,
        task_ref: tuple[str, bytes],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        spec: RunSpec,
    ) -> None:
        self.token = token
        self.task_ref = task_ref
        self.args = args
        self.kwargs = kwargs
        self.spec = spec

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunPayload, (self.token, self.task_ref, self.args, self.kwargs, self.spec))


class ChunkPayload:
    """Several runs in one Dask task (a chunk of a map's misses): one scheduler round trip
    for all of them. ``chunk_id`` (32 hex digits) ends the Dask key, as a run id does;
    ``absent`` holds the keys the client's lookup found without a manifest."""

    __slots__ = ("absent", "chunk_id", "runs", "token")

    def __init__(
        self, token: str, chunk_id: str, runs: list[RunPayload], absent: frozenset[str]
    ) -> None:
        self.token = token
        self.chunk_id = chunk_id
        self.runs = runs
        self.absent = absent

    def __reduce__(self) -> tuple[Any, ...]:
        return (ChunkPayload, (self.token, self.chunk_id, self.runs, self.absent))


@dataclasses.dataclass
class Outcome:
    """What a run sends back: its final state, its events, and where its result is."""

    state: str
    events: list[Op]
    saved: float | None = None
    manifest: bytes | None = None  # a hit or a commit: the manifest to load the value from
    stored: bool = False  # the value was committed under the run's key
    value: Any = None  # only for a value that was not stored
    error: BaseException | None = None


_UNKNOWN: Any = object()  # sentinel: no batched lookup was made for this run


class _InStore:
    """A hit whose value stays in the store (the client loads it from this manifest)."""

    __slots__ = ("manifest",)

    def __init__(self, manifest: Any) -> None:
        self.manifest = manifest


class _Events(list):  # type: ignore[type-arg]
    """A run's events on a worker: the sink ``tasks.call`` hands them to."""

    def record_run(self, event: RunEvent) -> None:
        self.append(event)

    def record_cache_entry(self, entry: Any, *, size: int | None = None) -> None:
        self.append(entry)

    def record_lock_event(self, event: Any) -> None:
        self.append(event)

    def remove_cache_entries(self, keys: Any = None, *, task: str | None = None) -> None:
        """Index removals are the client's business (the store is the truth)."""


class _OrphanSink(_Events):
    """Events outside any run's context on a worker: spooled to the store directly."""

    def append(self, op: Any) -> None:
        token = next(reversed(_setups), None) if _setups else None
        if token is not None:
            _spool.add(token, [op])


class RemoteCall(_Call):
    """A ``_Call`` whose key came from the client and whose events stay in memory."""

    __slots__ = ("committed", "events", "final", "prefetched", "saved", "spec")

    def __init__(
        self,
        t: Task[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        spec: RunSpec,
        prefetched: Any = _UNKNOWN,
    ) -> None:
        super().__init__(t, args, kwargs, run_id=spec.run_id)
        self.spec = spec
        self.events = _Events()
        self.saved: float | None = None  # what a hit saved
        self.final: RunState | None = None  # the last final state recorded
        self.committed: Any = None  # the manifest this run published
        # The chunk's batched lookup of this key (a Manifest, None: absent), used once: the
        # re-check after taking the key's lock reads the store.
        self.prefetched = prefetched

    def compute_key(self) -> str | None:
        self.key, self.components = self.spec.key, self.spec.components
        return self.key

    def record(self, state: RunState, **fields: Any) -> None:
        t = self.task
        if state.is_final:
            self.final = state
            if state is RunState.CACHED:
                self.saved = fields.get("saved")
        self.events.append(
            RunEvent(
                run_id=self.run_id,
                task=t.name,
                task_identity=t.identity,
                key=self.key,
                state=state,
                at=time.time(),
                notebook=self.spec.notebook,
                cell=self.spec.cell,
                tags=tuple(sorted(t.tags)),
                **fields,
            )
        )

    def explain_miss(self, reasons: list[str] | None = None) -> str:
        if reasons is None:
            from notebook_flow.config import settings

            if not settings().log_misses or self.components is None:
                return ""
            reasons = diff_components(self.spec.reference, self.components)
        text = "; ".join(reasons)
        logger.info("task `%s`: cache miss: %s", self.task.name, text)
        return text

    def lookup(self) -> Any:
        """A hit leaves the value in the store: only its manifest is read here."""
        t = self.task
        key = self.key
        if key is None or t.refresh_cache or not t.persist_result:
            return super().lookup()
        t0 = time.perf_counter()
        manifest, self.prefetched = self.prefetched, _UNKNOWN
        if manifest is _UNKNOWN:
            manifest = self.store.lookup(key)
        if manifest is None:
            return _callmod._MISS
        if manifest.expired():
            self.explain_miss([_expired_reason(manifest)])
            return _callmod._MISS
        elapsed = time.perf_counter() - t0
        self.record(
            RunState.CACHED,
            duration=elapsed,
            saved=max(manifest.duration - elapsed, 0.0),
            size=manifest.size,
        )
        return _InStore(manifest)

    def published(self, manifest: Any, value: Any, *, remember: bool = True) -> None:
        self.committed = manifest  # sent back: the client loads the value from it
        super().published(manifest, value, remember=remember)


# --------------------------------------------------------------------------- the run


_setups: dict[str, WorkerSetup] = {}
_executing: dict[str, str] = {}  # run id → Dask client id, while the run executes here
_tasks: dict[str, Task[..., Any]] = {}
_tasks_lock = threading.Lock()


def _task(ref: tuple[str, bytes]) -> Task[..., Any]:
    digest, blob = ref
    t = _tasks.get(digest)
    if t is None:
        with _tasks_lock:
            t = _tasks.get(digest)
            if t is None:
                if len(_tasks) > 256:
                    _tasks.clear()
                t = _tasks[digest] = pickle.loads(blob)
    return t


def _setup_for(token: str) -> WorkerSetup:
    config = _setups.get(token)
    if config is None:
        from notebook_flow.errors import ConfigurationError

        raise ConfigurationError(
            "this Dask worker has no notebook_flow setup for the run (the plugin that "
            "carries it did not reach it); restart the DaskRunner"
        )
    return config


def run_on_worker(payload: RunPayload) -> Outcome:
    """Run one call on this worker; never raises for the task's own failure (the
    exception travels in the outcome, with the events that describe it)."""
    config = _setup_for(payload.token)
    config.apply()
    _executing[payload.spec.run_id] = config.client_id
    try:
        outcome = _run_one(payload)
    finally:
        _executing.pop(payload.spec.run_id, None)
    _spool.add(payload.token, outcome.events)
    return outcome


#: Where a chunk's marker lives while it runs (``<store>/chunks/<chunk id>``).
CHUNKS_DIR = "chunks"


def run_chunk(chunk: ChunkPayload) -> list[Outcome]:
    """Run a chunk of runs one after the other on this worker (one Dask task); their
    outcomes in order."""
    config = _setup_for(chunk.token)
    store = config.apply()
    _executing[chunk.chunk_id] = config.client_id
    marker = f"{CHUNKS_DIR}/{chunk.chunk_id}" if _HEX32.match(chunk.chunk_id) else None
    try:
        found: dict[str, Any]
        if marker is not None and _first_attempt(store, marker):
            found = dict.fromkeys(chunk.absent)  # the client's answer: no manifest
        else:
            keys = [p.spec.key for p in chunk.runs if p.spec.key is not None]
            try:
                found = lookup_many(store, keys) if keys else {}
            except Exception as exc:  # the runs then look their keys up one by one
                logger.warning("batched lookup of %d keys failed (%s)", len(keys), exc)
                found = {}
        outcomes = []
        for payload in chunk.runs:
            key = payload.spec.key
            outcome = _run_one(payload, found.get(key, _UNKNOWN) if key else _UNKNOWN)
            _spool.add(chunk.token, outcome.events)
            outcomes.append(outcome)
        if marker is not None:
            files.remove_quietly(store, marker)
    finally:
        _executing.pop(chunk.chunk_id, None)
    return outcomes


_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def _first_attempt(store: ResultStore, marker: str) -> bool:
    """True when no worker started this chunk before (its marker is not in the store);
    the marker is left for a later attempt to find. False when unsure."""
    if store.is_local:
        return False  # local lookups cost microseconds: always look up
    try:
        files.read_small(store, marker)
        return False  # a worker started it and died before it finished
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        files.write_atomic(store, marker, lambda write: write(memoryview(b"")))
    except Exception as exc:  # unmarked, a rerun could not tell: look up every key
        logger.warning("could not mark a chunk as started in %s (%s)", store.url, exc)
        return False
    return True


def _run_one(payload: RunPayload, prefetched: Any = _UNKNOWN) -> Outcome:
    t = _task(payload.task_ref)
    spec = payload.spec
    call = RemoteCall(t, payload.args, payload.kwargs, spec, prefetched)
    sink_token = _callmod.event_sink.set(call.events)
    fg_token = behind.foreground.set(True)  # durable before we return
    absent_token = assumed_absent.set(
        frozenset((spec.key,)) if prefetched is None and spec.key else frozenset()
    )
    try:
        value = asyncio.run(_run_async(call)) if t.is_async else _run_sync(call)
    except BaseException as exc:
        if call.final not in (RunState.FAILED, RunState.CANCELLED):
            call.failed(1, exc)  # (a failure before the body: lock timeout, bad store)
        return Outcome(RunState.FAILED.value, list(call.events), error=_portable(exc))
    finally:
        assumed_absent.reset(absent_token)
        behind.foreground.reset(fg_token)
        _callmod.event_sink.reset(sink_token)
    if isinstance(value, _InStore):
        return Outcome(
            RunState.CACHED.value,
            list(call.events),
            saved=call.saved,
            manifest=value.manifest.to_json(),
        )
    cached = call.ctx is None and call.key is not None
    stored = not cached and call.key is not None and t.persist_result
    committed = call.committed
    return Outcome(
        (RunState.CACHED if cached else RunState.COMPLETED).value,
        list(call.events),
        stored=stored,
        value=None if stored else value,
        manifest=committed.to_json() if stored and committed is not None else None,
    )


class RemoteTaskError(Exception):
    """A task failed on a Dask worker with an exception that cannot travel (unpicklable);
    the message carries its type, text and traceback."""


def _portable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RemoteTaskError(f"{type(exc).__name__}: {exc}\n{text}")
    return exc


# --------------------------------------------------------------------------- the spool


class _Spool:
    """This worker's events, written to the store per client session every
    :data:`SPOOL_INTERVAL` seconds (one small file per session and write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[Op]] = {}
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add(self, token: str, ops: list[Op]) -> None:
        if not ops:
            return
        with self._lock:
            self._pending.setdefault(token, []).extend(ops)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="notebook_flow-event-spool", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(SPOOL_INTERVAL)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the spool thread die
                logger.warning("notebook_flow: could not spool run events", exc_info=True)

    def flush(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, {}
        written = 0
        for token, ops in pending.items():
            config = _setups.get(token)
            if config is None:
                continue
            try:
                self._write(config, ops)
                written += len(ops)
            except Exception as exc:
                logger.warning(
                    "could not write %d run events to %s (%s); the client has them if it "
                    "received its results",
                    len(ops),
                    config.store,
                    exc,
                )
        return written

    def _write(self, config: WorkerSetup, ops: list[Op]) -> None:
        from notebook_flow.config import get_store
        from notebook_flow.storage import files

        store = get_store(config.store) if config.store else get_store()
        p = _identity.process()
        self._seq += 1
        host = re.sub(r"[^A-Za-z0-9.-]", "-", p.host)[:40]
        name = f"{host}-{p.pid}-{p.start_time or 0}-{p.session}-{self._seq:08d}.json"
        rel = f"{session_dir(config.session)}/{name}"
        data = encode(ops, config.signing_key)
        files.write_atomic(store, rel, lambda write: write(memoryview(data)))


_spool = _Spool()
