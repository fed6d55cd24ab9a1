"""A Dask distributed cluster as the runner.

>>> from notebook_flow.runners import DaskRunner
>>> with DaskRunner("tcp://scheduler:8786"):               # doctest: +SKIP
...     futs = crunch.map(chunks)
>>> with DaskRunner(n_workers=2):            # starts a LocalCluster  # doctest: +SKIP
...     ...

How a run travels (``docs/dask.md`` is the deployment guide):

* **Keys are computed here**, on the client, where the task's source lives (a notebook
  cell exists only in this kernel): the key and its components travel with the run, so a
  task defined in a cell gets the same key on the cluster as in a direct call.
* **Secrets travel once per worker**: the store's URL, options (S3 credentials) and the
  signing key go in a worker plugin (``dask_worker.NotebookFlowPlugin``), not in each run.
* **Nothing per run opens DuckDB on a worker**: its events come back with the outcome and
  land in this process's index (queued, as local runs' are), and are also spooled to the
  store (``<store>/events/``) for the case this process dies first — a later ``DaskRunner``
  or ``notebook_flow.rebuild_index()`` ingests them (``metadata/remote.py``).
* **Results stay where they are**: a run that committed or hit returns its manifest, not
  its value; the future loads the value from the store when ``result()`` asks
  (memory-mapped where the format and store allow). Values that were not stored
  (uncached tasks) come back in-band.
* **Hits never reach the cluster**: the runs of a burst (a map) are looked up here in one
  batch (``storage/batch.py``: a listing and concurrent reads instead of a GET per run),
  and only the misses are sent, in chunks of several runs per Dask task when there are
  many (:data:`RUNS_PER_THREAD`), so the scheduler's per-task cost is paid per chunk.
* **What cannot work is refused** (``ConfigurationError``): a ``memory://`` store, a
  ``MemoryLockManager``, and a local-folder store while workers run on other hosts (pass
  ``shared_filesystem=True`` when that folder is a shared mount on every host).

Upstream futures are resolved here (their values are loaded and sent with the run).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity, config
from notebook_flow._extras import require
from notebook_flow.errors import ConfigurationError, MetadataError, StorageError
from notebook_flow.futures import TaskFuture
from notebook_flow.states import Deferred, RunState

from .base import BaseRunner, WorkerCall, resolve_arguments

if TYPE_CHECKING:
    from notebook_flow.storage import Manifest, ResultStore
    from notebook_flow.tasks import Task

    from .dask_worker import Outcome

__all__ = ["DaskRunner"]

logger = logging.getLogger("notebook_flow")

#: Seconds the client trusts its list of worker hosts before asking the scheduler again.
HOSTS_RECHECK = 5.0
#: A burst of misses is cut into about this many chunks per worker thread (each chunk one
#: Dask task), so that threads which finish early find more work.
RUNS_PER_THREAD = 4
#: At most this many runs in one chunk (a chunk's results come back together).
MAX_CHUNK = 64
#: A map holds its runs back until it has submitted them all, or this many.
MAP_BURST = 4096


class DaskRunner(BaseRunner):
    """Submit runs to a Dask cluster: a ``distributed.Client``, a scheduler address, or
    nothing (a ``LocalCluster`` is started with ``cluster_kwargs`` and closed on
    ``shutdown()``).

    ``shared_filesystem=True`` declares that a local-folder store is mounted at the same
    path on every worker host (NFS, a cluster file system); without it a local store is
    refused as soon as a worker runs on another host.

    Runs of a client that died keep executing on the workers (Dask cannot stop a running
    function). Before its first run, a runner waits up to ``orphan_wait`` seconds for
    them, then ingests their events: so ``resume()`` finds their results committed
    instead of starting them a second time (with a lock manager, twice cannot happen at
    all; see docs/dask.md).
    """

    def __init__(
        self,
        client: Any = None,
        *,
        shared_filesystem: bool = False,
        orphan_wait: float = 60.0,
        **cluster_kwargs: Any,
    ) -> None:
        require("distributed", "DaskRunner")
        from distributed import Client

        self._owned: list[Any] = []
        if client is None:
            from distributed import LocalCluster

            cluster = LocalCluster(**cluster_kwargs)  # type: ignore[no-untyped-call]
            client = Client(cluster)  # type: ignore[no-untyped-call]
            self._owned = [client, cluster]
        elif isinstance(client, str):
            client = Client(client)  # type: ignore[no-untyped-call]
            self._owned = [client]
        self.client = client
        self.shared_filesystem = bool(shared_filesystem)
        self.orphan_wait = float(orphan_wait)
        p = _identity.process()
        host = re.sub(r"[^A-Za-z0-9.-]", "-", p.host)[:40]
        self.session = f"{host}_{p.pid}_{p.start_time or 0}_{p.session}"
        self._lock = threading.Lock()
        self._setup: tuple[int, str, ResultStore] | None = None  # generation, token, store
        self._accepted: weakref.WeakKeyDictionary[Task[..., Any], int] = weakref.WeakKeyDictionary()
        self._references: dict[str, dict[str, str] | None] = {}
        self._hosts: tuple[float, list[str]] = (0.0, [])
        self._threads: tuple[float, int] = (0.0, 1)
        self._holding = 0  # maps submitting right now (their runs leave as one burst)
        # Per thread, while it submits a map: each task pickled once (see _task_ref).
        self._pickles = threading.local()
        self._outbox: collections.deque[tuple[TaskFuture[Any], WorkerCall, Any]] = (
            collections.deque()
        )
        self._wake = threading.Event()
        self._poked = False
        self._sender: threading.Thread | None = None
        self._ingested_others = False
        self._ingesting: threading.Thread | None = None
        self._tokens: list[str] = []  # of the plugins registered (unregistered on shutdown)

    def __repr__(self) -> str:
        return f"<DaskRunner {self.client!r}>"

    # -- what this runner refuses -------------------------------------------------------

    def _accept(self, task: Task[..., Any]) -> None:
        from notebook_flow.tasks.call import _store_for

        generation = config.generation
        if self._accepted.get(task) == generation:
            if _store_for(task).is_local:
                self._check_hosts(_store_for(task))
            return
        store = _store_for(task)
        check_store(store)
        if store.is_local:
            self._check_hosts(store)
        check_lock_manager(task, store)
        self._accepted[task] = generation

    def _check_hosts(self, store: ResultStore) -> None:
        if self.shared_filesystem:
            return
        remote = self.worker_hosts_elsewhere()
        if remote:
            raise ConfigurationError(
                f"the store {store.url!r} is a local folder, but Dask workers run on other "
                f"hosts ({', '.join(remote[:3])}), which cannot see it. Use an object store "
                "every worker reaches (configure(store='s3://bucket/prefix', "
                "storage_options={...})), or, if that folder is a shared mount at the same "
                "path on every host, say so: DaskRunner(..., shared_filesystem=True)"
            )

    def worker_hosts_elsewhere(self) -> list[str]:
        """The hosts of this cluster's workers that are not this machine (cached a few s)."""
        checked, hosts = self._hosts
        if time.monotonic() - checked < HOSTS_RECHECK:
            return hosts
        try:
            info = self.client.scheduler_info(n_workers=-1)
        except TypeError:  # older distributed: every worker is listed
            info = self.client.scheduler_info()
        workers = info.get("workers", {})
        hosts = sorted(
            {str(w.get("host") or "") for w in workers.values()} - {""} - local_addresses()
        )
        now = time.monotonic()
        self._hosts = (now, hosts)
        self._threads = (now, max(1, sum(int(w.get("nthreads") or 1) for w in workers.values())))
        return hosts

    def worker_threads(self) -> int:
        """The threads of all workers of the cluster (cached a few s)."""
        if time.monotonic() - self._threads[0] >= HOSTS_RECHECK:
            self._hosts = (0.0, [])
            self.worker_hosts_elsewhere()
        return self._threads[1]

    @contextlib.contextmanager
    def _burst(self) -> Iterator[None]:
        """The runs of one map leave for the cluster together once it has submitted them
        all (or :data:`MAP_BURST` of them): one batched lookup, then chunks of misses."""
        with self._lock:
            self._holding += 1
        outer = getattr(self._pickles, "by_task", None) is None
        if outer:
            self._pickles.by_task = {}
        try:
            yield
        finally:
            if outer:
                self._pickles.by_task = None
            with self._lock:
                self._holding -= 1
            self._poke()

    def _task_ref(self, task: Task[..., Any]) -> tuple[str, bytes]:
        """``(digest, pickle)`` of ``task`` as it is now. Pickled for every submit (a cell's
        function captures its globals by value, and a global may change between two
        submits), except within one map: its runs are submitted at one moment, so they
        share one pickle, which also travels once per chunk (pickle writes an object
        that a chunk holds many times once)."""
        import cloudpickle
        import xxhash

        by_task: dict[int, tuple[Task[..., Any], tuple[str, bytes]]] | None = getattr(
            self._pickles, "by_task", None
        )
        known = by_task.get(id(task)) if by_task is not None else None
        if known is not None and known[0] is task:
            return known[1]
        blob = cloudpickle.dumps(task)
        ref = (xxhash.xxh3_128_hexdigest(blob), blob)
        if by_task is not None:
            by_task[id(task)] = (task, ref)
        return ref

    # -- sending a run ----------------------------------------------------------------------

    def _worker_setup(self) -> tuple[str, ResultStore]:
        """The token of the plugin carrying this process's settings (registered once per
        settings generation; the scheduler gives it to workers that join later)."""
        setup = self._setup
        if setup is not None and setup[0] == config.generation:
            return setup[1], setup[2]
        with self._lock:
            setup = self._setup
            if setup is not None and setup[0] == config.generation:
                return setup[1], setup[2]
            from .dask_worker import NotebookFlowPlugin, WorkerSetup

            generation = config.generation
            s = config.settings()
            store = config.get_store()
            check_store(store)
            token = secrets.token_hex(8)
            plugin = NotebookFlowPlugin(
                WorkerSetup(
                    token,
                    store.url,
                    dict(s.storage_options),
                    # The key in use here, also a default one (a worker's own would differ).
                    s.signing_key or store._signing_key(),
                    self.session,
                    str(self.client.id),
                )
            )
            self.client.register_plugin(plugin)
            self._tokens.append(token)
            if not self._ingested_others:
                self._ingested_others = True
                self._ingest_dead_sessions(store)
            self._setup = (generation, token, store)
            return token, store

    def _reference(self, task: Task[..., Any], store: ResultStore) -> dict[str, str] | None:
        """The components of the task's latest result, to explain a miss on the worker:
        this process's memory, else (once per task) the index."""
        if task._last_components is not None:
            return task._last_components
        ident = task.identity
        if ident not in self._references:
            from notebook_flow.tasks.explain import EXPLAIN_WAIT

            try:
                self._references[ident] = task._reference_components(store, timeout=EXPLAIN_WAIT)
            except MetadataError:
                self._references[ident] = None
        return self._references[ident]

    def _send(self, fut: TaskFuture[Any]) -> None:
        """Prepare a run here (key, spec) and queue it for the sender thread, which hands
        each burst of runs to the scheduler in one ``client.map`` (one graph update
        instead of one per run: the scheduler round trip is most of a no-op's cost)."""
        if not fut._claim():
            return
        call = fut._call
        assert isinstance(call, WorkerCall)
        try:
            from .dask_worker import RunPayload, RunSpec

            token, _ = self._worker_setup()
            if fut._upstream:
                resolve_arguments(fut)
            call.compute_key()  # here, where the task's source lives
            task = fut.task
            spec = RunSpec(
                fut.run_id,
                call.key,
                call.components,
                self._reference(task, call.store) if call.key is not None else None,
                call._notebook,
                call._cell,
            )
            # The worker unpickles each distinct pickle once.
            payload = RunPayload(token, self._task_ref(task), call.args, call.kwargs, spec)
        except Exception as exc:
            call.failed(1, exc)
            fut._finish(RunState.FAILED, None, exc)
            return
        self._outbox.append((fut, call, payload))
        if self._holding and len(self._outbox) < MAP_BURST:
            return  # the map pokes the sender when it has submitted all its runs
        self._poke()

    def _poke(self) -> None:
        if not self._poked and self._outbox:
            self._poked = True
            if self._sender is None:
                self._start_sender()
            self._wake.set()

    def _start_sender(self) -> None:
        with self._lock:
            if self._sender is None:
                t = threading.Thread(target=self._send_loop, name="notebook_flow-dask", daemon=True)
                t.start()
                self._sender = t

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(0.002)  # let a burst of submissions gather into one graph update
            self._poked = False
            batch = []
            try:
                while True:
                    batch.append(self._outbox.popleft())
            except IndexError:
                pass
            if batch:
                self._submit_batch(batch)

    def _submit_batch(self, batch: list[tuple[TaskFuture[Any], WorkerCall, Any]]) -> None:
        """Send a burst (in the sender thread, which must survive anything: a run it
        could not send fails, the next burst is sent as usual)."""
        try:
            self._send_batch(batch)
        except Exception as exc:  # e.g. the scheduler is gone (scheduler_info)
            logger.warning("could not send %d runs to the cluster", len(batch), exc_info=True)
            for fut, call, _ in batch:
                if not fut.done():
                    call.failed(1, exc)
                    fut._finish(RunState.FAILED, None, exc)

    def _send_batch(self, batch: list[tuple[TaskFuture[Any], WorkerCall, Any]]) -> None:
        from .dask_worker import ChunkPayload, run_chunk, run_on_worker

        batch, absent = self._hits_here(batch)
        if not batch:
            return
        size = min(MAX_CHUNK, len(batch) // (self.worker_threads() * RUNS_PER_THREAD))
        try:
            if size <= 1:
                pendings = self.client.map(
                    run_on_worker,
                    [payload for _, _, payload in batch],
                    key=[f"notebook_flow-{fut.task.name}-{fut.run_id}" for fut, _, _ in batch],
                    pure=False,
                )
                for (fut, call, _), pending in zip(batch, pendings, strict=True):
                    pending.add_done_callback(
                        lambda done, fut=fut, call=call: self._complete(fut, call, done)
                    )
                return
            chunks = [batch[i : i + size] for i in range(0, len(batch), size)]
            ids = [secrets.token_hex(16) for _ in chunks]
            pendings = self.client.map(
                run_chunk,
                [
                    ChunkPayload(
                        chunk[0][2].token,
                        chunk_id,
                        [p for _, _, p in chunk],
                        frozenset(c.key for _, c, _ in chunk if c.key in absent),
                    )
                    for chunk, chunk_id in zip(chunks, ids, strict=True)
                ],
                key=[f"notebook_flow-chunk-{chunk_id}" for chunk_id in ids],
                pure=False,
            )
        except Exception as exc:  # the cluster is gone: every run of the burst fails
            for fut, call, _ in batch:
                call.failed(1, exc)
                fut._finish(RunState.FAILED, None, exc)
            return
        for chunk, pending in zip(chunks, pendings, strict=True):
            pending.add_done_callback(lambda done, chunk=chunk: self._complete_chunk(chunk, done))

    def _hits_here(
        self, batch: list[tuple[TaskFuture[Any], WorkerCall, Any]]
    ) -> tuple[list[tuple[TaskFuture[Any], WorkerCall, Any]], set[str]]:
        """Finish the runs whose keys are hits (one batched lookup per store); the rest,
        and the keys found without a manifest."""
        from notebook_flow.storage.batch import lookup_many

        by_store: dict[int, list[tuple[TaskFuture[Any], WorkerCall, Any]]] = {}
        rest = []
        absent: set[str] = set()
        for item in batch:
            if _lookup_here(item[0].task, item[1]):
                by_store.setdefault(id(item[1].store), []).append(item)
            else:
                rest.append(item)
        for items in by_store.values():
            store = items[0][1].store
            t0 = time.perf_counter()
            try:
                found = lookup_many(store, [call.key for _, call, _ in items if call.key])
            except Exception as exc:  # the workers look them up instead
                logger.warning("batched lookup in %s failed (%s)", store.url, exc)
                found = {}
            elapsed = (time.perf_counter() - t0) / len(items)  # each run's share
            now = time.time()
            for fut, call, payload in items:
                manifest = found.get(call.key) if call.key else None
                if manifest is None and call.key in found:
                    absent.add(call.key)
                if manifest is None or manifest.expired(now):
                    rest.append((fut, call, payload))  # (an expiry is explained there)
                    continue
                call.record(
                    RunState.CACHED,
                    duration=elapsed,
                    saved=max(manifest.duration - elapsed, 0.0),
                    size=manifest.size,
                )
                fut.task._last_components = call.components
                fut._finish(RunState.CACHED, Deferred(_loader(store, call.key, manifest)), None)
        return rest, absent

    def _complete_chunk(
        self, chunk: list[tuple[TaskFuture[Any], WorkerCall, Any]], pending: Any
    ) -> None:
        """Finish every run of a chunk (in Dask's callback thread)."""
        try:
            outcomes: list[Outcome] = pending.result()
        except BaseException as exc:  # the cluster gave up on it (KilledWorker, cancelled)
            for fut, call, _ in chunk:
                self._complete(fut, call, None, exc)
            return
        for (fut, call, _), outcome in zip(chunk, outcomes, strict=True):
            self._complete(fut, call, outcome)

    def _complete(
        self,
        fut: TaskFuture[Any],
        call: WorkerCall,
        pending: Any,
        error: BaseException | None = None,
    ) -> None:
        """Record the run's events here and finish its future (in Dask's callback thread).
        ``pending``: the run's Dask future, or its outcome (from a chunk's)."""
        outcome: Outcome
        try:
            if error is not None:
                raise error
            outcome = pending.result() if hasattr(pending, "add_done_callback") else pending
        except BaseException as exc:  # the cluster gave up on it (KilledWorker, cancelled)
            call.record(
                RunState.FAILED,
                error=f"{type(exc).__name__}: {exc}",
                duration=time.time() - call.started,
            )
            fut._finish(RunState.FAILED, None, exc)
            return
        store = call.store
        try:
            meta = config.get_metadata(store)
            for op in outcome.events:
                if type(op).__name__ == "RunEvent":
                    meta.record_run(op)  # type: ignore[arg-type]
                elif type(op).__name__ == "CacheEntry":
                    meta.record_cache_entry(op)
                else:
                    meta.record_lock_event(op)  # type: ignore[arg-type]
        except Exception:  # a metadata problem never fails a task
            logger.warning("could not record the events of run %s", fut.run_id, exc_info=True)
        state = RunState(outcome.state)
        if outcome.error is not None:
            fut._finish(state, None, outcome.error)
            return
        if call.key is not None and call.components is not None:
            fut.task._last_components = call.components
        fut.saved = outcome.saved
        value: Any = outcome.value
        if outcome.manifest is not None:
            if call.key is not None:  # known here: a later batched lookup need not read it
                from notebook_flow.storage.batch import remember

                remember(store, call.key, outcome.manifest)
            value = Deferred(_loader(store, call.key, outcome.manifest))
        elif outcome.stored:
            value = Deferred(_loader(store, call.key, None))
        fut._finish(state, value, None)

    # -- events and shutdown -----------------------------------------------------------------

    def _ingest_dead_sessions(self, store: ResultStore) -> None:
        """Events that workers spooled for clients that died before their results came
        back: into this process's index (runs they left PENDING stop showing CRASHED)."""
        from notebook_flow.metadata.remote import EVENTS_DIR, ingest_store_events
        from notebook_flow.storage import files

        from .dask_worker import flush_events

        try:
            # Before our first run: resume() must find what the dead client's runs commit.
            self._wait_for_orphans()
            self.client.run(flush_events)  # what the workers still hold, to the store first
        except Exception:
            logger.warning("could not wait for a dead client's runs", exc_info=True)

        def ingest() -> None:  # in the background: it waits for the metadata lock
            try:
                listed = files.list_files(store, EVENTS_DIR)
                sessions = {rel.split("/")[1] for rel, _ in listed if rel.count("/") >= 2}
                meta = config.get_metadata(store)
                for session in sorted(sessions - {self.session}):
                    if not _session_alive(session):
                        ingest_store_events(store, meta, session=session)
            except Exception:
                logger.warning(
                    "could not ingest spooled run events of %s", store.url, exc_info=True
                )

        self._ingesting = threading.Thread(target=ingest, name="notebook_flow-ingest", daemon=True)
        self._ingesting.start()

    def _wait_for_orphans(self) -> None:
        """Wait (up to ``orphan_wait`` s) for runs whose client disconnected to end.

        An orphan is a run a worker still holds (Dask state executing, or cancelled: its
        requester left while it ran, and Dask cannot stop a running function) whose key
        the scheduler no longer knows, or that a worker is running for a client that is
        no longer connected."""
        from .dask_worker import worker_runs

        deadline = time.monotonic() + self.orphan_wait
        told = False
        while True:
            held = [run for runs in self.client.run(worker_runs).values() for run in runs]
            if not held:
                return
            # A lambda travels by value: the scheduler need not have this package.
            keys, clients = self.client.run_on_scheduler(  # type: ignore[no-untyped-call]
                lambda dask_scheduler: (
                    [str(k) for k in dask_scheduler.tasks if str(k).startswith("notebook_flow-")],
                    [str(c) for c in dask_scheduler.clients],
                )
            )
            known, connected = set(keys), set(clients)
            orphans = [
                key
                for key, state, client_id in held
                if state == "cancelled"
                or key not in known
                or (client_id is not None and client_id not in connected)
            ]
            if not orphans:
                return
            if time.monotonic() > deadline:
                logger.warning(
                    "%d runs of a disconnected client still execute on the cluster; not "
                    "waiting longer (orphan_wait=%gs): resuming them may run them again",
                    len(orphans),
                    self.orphan_wait,
                )
                return
            if not told:
                told = True
                logger.info(
                    "waiting for %d runs of a disconnected client to end on the cluster",
                    len(orphans),
                )
            time.sleep(0.2)

    def collect_events(self) -> int:
        """Have every worker write its spooled events now, and ingest this session's from
        the store (runs whose results never came back); returns the events read. Also
        waits for the ingestion of dead sessions' events that the first run started."""
        from notebook_flow.metadata.remote import ingest_store_events

        from .dask_worker import flush_events

        if self._ingesting is not None:
            self._ingesting.join()  # (other sessions' events, started by the first run)
        setup = self._setup
        if setup is None:
            return 0
        self.client.run(flush_events)
        store = setup[2]
        meta = config.get_metadata(store)
        meta.flush(timeout=60)  # our own queue first: ingesting skips what is there
        return ingest_store_events(store, meta, session=self.session, remove=True)

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Wait for this runner's runs, collect their spooled events, then close the
        client/cluster it started."""
        super().shutdown(wait, cancel_pending=cancel_pending)
        if wait:
            try:
                self.collect_events()
            except Exception:
                logger.warning("could not collect the spooled run events", exc_info=True)
        if wait:
            for token in self._tokens:
                try:  # the workers forget this session's settings (and signing key)
                    self.client.unregister_worker_plugin(f"notebook_flow-{token}")
                except Exception:
                    logger.debug("could not unregister a worker plugin", exc_info=True)
            self._tokens = []
            self._setup = None
        for obj in self._owned:
            obj.close()
        self._owned = []


# --------------------------------------------------------------------------- helpers


def _lookup_here(task: Task[..., Any], call: WorkerCall) -> bool:
    """Whether the client may decide a hit for this run itself: a stored result to look
    for, and nothing that must run on a hit (hooks run where the run runs)."""
    return (
        call.key is not None
        and task.persist_result is not False
        and not task._refreshing()
        and not (
            task.on_completion_hooks
            or task.on_failure_hooks
            or task.on_commit_hooks
            or task.on_rollback_hooks
        )
    )


def _loader(store: ResultStore, key: str | None, manifest_json: bytes | Manifest | None) -> Any:
    def load() -> Any:
        from notebook_flow.storage import Manifest

        assert key is not None
        if isinstance(manifest_json, Manifest):
            manifest = manifest_json
        elif manifest_json is not None:
            manifest = Manifest.from_json(manifest_json, key=key)
        else:
            found = store.lookup(key)
            if found is None:
                raise StorageError(
                    f"the result for key {key} was committed by a Dask worker but is no "
                    f"longer in {store.url} (deleted since?); run the task again"
                )
            manifest = found
        return store.load(manifest)

    return load


def check_store(store: ResultStore) -> None:
    """Refuse a store that Dask workers (other processes) cannot share."""
    if store.url.startswith("memory:"):
        raise ConfigurationError(
            f"the store {store.url!r} lives in this process's memory; Dask workers cannot "
            "see it (a repeat would recompute, results would not come back). Use an object "
            "store (configure(store='s3://bucket/prefix')) or a local folder on a "
            "single-host cluster"
        )


def check_lock_manager(task: Task[..., Any], store: ResultStore) -> None:
    """Refuse a lock manager that cannot span processes (exactly-once would not hold)."""
    from notebook_flow.locks.memory import MemoryLockManager

    policy = task._policy  # the policy the call path keys and locks with
    manager = policy.lock_manager
    if isinstance(manager, MemoryLockManager):
        raise ConfigurationError(
            f"task `{task.name}` locks with a MemoryLockManager, which only serializes the "
            "threads of one process: on Dask workers the same key would run more than "
            "once. Use RedisLockManager(host=...) or PostgresLockManager(dsn) (or a "
            "FileLockManager beside a local store on a single-host cluster)"
        )
    if policy.isolation_level == "SERIALIZABLE" and manager is None:
        from notebook_flow.locks import default_lock_manager_for

        default_lock_manager_for(store)  # raises for a remote store, naming the choices


def local_addresses() -> set[str]:
    """The names and addresses of this machine (loopback included)."""
    out = {"127.0.0.1", "::1", "localhost", "0.0.0.0"}
    name = socket.gethostname()
    out.add(name)
    try:
        out.update(socket.gethostbyname_ex(name)[2])
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]

        for addrs in psutil.net_if_addrs().values():
            out.update(a.address.split("%")[0] for a in addrs if a.address)
    except Exception:  # psutil comes with distributed; without it, names are enough
        pass
    out.update(a for a in list(out) if a.startswith("127."))
    return out


def _session_alive(session: str) -> bool:
    """A session on this host whose process still runs (it ingests its own events)."""
    parts = session.split("_")
    if len(parts) < 4:
        return False
    host = re.sub(r"[^A-Za-z0-9.-]", "-", _identity.process().host)[:40]
    if parts[0] != host:
        return False  # another host: ingesting is idempotent, so read them now
    try:
        pid, start = int(parts[1]), int(parts[2])
    except ValueError:
        return False
    return pid == os.getpid() or _identity.pid_alive(pid, start or None)
