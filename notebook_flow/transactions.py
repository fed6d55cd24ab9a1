"""Transactions, as in Prefect 3: task results committed together, or none of them.

>>> from notebook_flow.transactions import transaction
>>> with transaction():                      # doctest: +SKIP
...     rows = extract(day)
...     load(rows)                           # raises: extract's result is rolled back too

Inside ``with transaction():`` each task call that computes a result *stages* it: its
payload is written, its manifest is not. When the outermost transaction ends without an
error, every staged result is published (manifests written, ``on_commit`` hooks run);
when it ends with an error, or any task inside fails, they are all discarded and the
tasks' ``on_rollback`` hooks run. Until the commit no other process (and no later call)
sees any of them; a process killed before the commit leaves only unreferenced payloads,
which ``ResultStore.remove_orphans`` collects. The commit itself is atomic per store: the
results' manifests are written naming the transaction, and are misses until one signed
commit record makes them all visible at once (``storage/group.py``). A SIGKILL at any
instant of it leaves all of a store's results of the transaction visible, or none;
``remove_orphans`` finishes what a dead committer left (forward or back).

A task call gets a transaction of its own (``get_transaction()`` in its body returns it;
its ``on_commit``/``on_rollback`` hooks receive it) when it runs inside a transaction or
has commit/rollback hooks. A SERIALIZABLE task (sync or async) keeps its key locked until
its result is published or discarded.

``commit_mode`` (``CommitMode.LAZY`` by default: the outermost transaction commits;
``EAGER``: each transaction commits as it ends; ``OFF``: nothing commits unless
``txn.commit()`` is called) and ``isolation_level`` (inherited by the tasks inside) work as
in Prefect. ``transaction(key=...)`` also records a value of its own: ``txn.stage(value)``
is written under ``key`` at commit, ``txn.read()`` reads it back, and a transaction whose
key is already stored starts out committed (``overwrite=True`` to write it again).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import enum
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import xxhash

from ._crash import crash_point as _crash_point
from ._staged import StagedResult as _StagedResult
from ._staged import publish_all as _publish_all
from .cache_policies import IsolationLevel, isolation_level_name
from .errors import ConfigurationError, SerializationError

if TYPE_CHECKING:
    from .storage import Manifest, ResultStore
    from .tasks.call import _Call

__all__ = [
    "CommitMode",
    "IsolationLevel",
    "Transaction",
    "TransactionRecord",
    "TransactionState",
    "atransaction",
    "get_transaction",
    "transaction",
]

logger = logging.getLogger("notebook_flow")

_NOT_SET: Any = object()


class CommitMode(str, enum.Enum):
    """When a transaction commits (Prefect's ``CommitMode``)."""

    EAGER = "EAGER"
    LAZY = "LAZY"
    OFF = "OFF"


class TransactionState(str, enum.Enum):
    """Where a transaction is in its life (Prefect's ``TransactionState``)."""

    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    STAGED = "STAGED"
    COMMITTED = "COMMITTED"
    ROLLED_BACK = "ROLLED_BACK"


class TransactionRecord:
    """What :meth:`Transaction.read` returns: the stored value as ``.result``."""

    __slots__ = ("key", "result")

    def __init__(self, key: str, result: Any) -> None:
        self.key = key
        self.result = result

    def __repr__(self) -> str:
        return f"TransactionRecord(key={self.key!r})"


# Submitted tasks carry the submitter's context, so a child may finish on a worker thread
# while its parent commits or rolls back on another: the tree changes under one lock.
_tree_lock = threading.RLock()

_active: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "notebook_flow_transaction", default=None
)


def get_transaction() -> Transaction | None:
    """The transaction active in this context (a task's own inside its body), or None."""
    return _active.get()


def _store_key(key: str) -> str:
    """The store key (32 hex) under which ``transaction(key=...)`` records its value."""
    return xxhash.xxh3_128_hexdigest(f"notebook_flow-transaction\0{key}".encode())


class Transaction:
    """One transaction; use :func:`transaction` to open one.

    ``set(name, value)``/``get(name)`` keep values for the code inside (a child sees its
    parent's); ``stage``, ``commit``, ``rollback`` and the ``is_*`` checks are Prefect's.
    """

    def __init__(
        self,
        key: str | None = None,
        store: ResultStore | None = None,
        *,
        commit_mode: CommitMode | str | None = None,
        isolation_level: IsolationLevel | str | None = None,
        overwrite: bool = False,
        write_on_commit: bool = True,
        lock_manager: Any = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        if key is not None and not isinstance(key, str):
            raise ConfigurationError(f"transaction key must be a str, got {key!r}")
        self.key = key
        self.store = store
        self.commit_mode = CommitMode(commit_mode) if commit_mode is not None else None
        self.isolation_level = (
            IsolationLevel(isolation_level_name(isolation_level))
            if isolation_level is not None
            else None
        )
        self.overwrite = overwrite
        self.write_on_commit = write_on_commit
        self.lock_manager = lock_manager
        self.logger = logger or logging.getLogger("notebook_flow")
        self.state = TransactionState.PENDING
        self.children: list[Transaction] = []
        self.on_commit_hooks: list[Callable[..., Any]] = []
        self.on_rollback_hooks: list[Callable[..., Any]] = []
        self._values: dict[str, Any] = {}
        self._staged: Any = _NOT_SET
        self._token: contextvars.Token[Transaction | None] | None = None
        self._parent: Transaction | None = None
        self._holder = f"transaction-{uuid.uuid4().hex}"
        self._for_task = False  # a task call's own transaction: its call path locks
        self._finish = contextlib.ExitStack()  # what commit/rollback release (locks)

    def __repr__(self) -> str:
        return f"<Transaction key={self.key!r} state={self.state.value}>"

    # -- values ------------------------------------------------------------------------------

    def set(self, name: str, value: Any) -> None:
        """Keep ``value`` under ``name`` for the code in this transaction."""
        self._values[name] = value

    def get(self, name: str, default: Any = _NOT_SET) -> Any:
        """A copy of the value set under ``name`` here or in a parent; ``default`` (or
        ``ValueError``) when none was set."""
        if name in self._values:
            return copy.deepcopy(self._values[name])
        parent = self.get_parent()
        if parent is not None:
            return parent.get(name, default)
        if default is not _NOT_SET:
            return default
        raise ValueError(f"Could not retrieve value for unknown key: {name}")

    # -- state -------------------------------------------------------------------------------

    def is_committed(self) -> bool:
        return self.state is TransactionState.COMMITTED

    def is_rolled_back(self) -> bool:
        return self.state is TransactionState.ROLLED_BACK

    def is_staged(self) -> bool:
        return self.state is TransactionState.STAGED

    def is_pending(self) -> bool:
        return self.state is TransactionState.PENDING

    def is_active(self) -> bool:
        return self.state is TransactionState.ACTIVE

    def get_parent(self) -> Transaction | None:
        """The transaction this one is nested in (None for the outermost)."""
        if self._token is not None:
            return self._parent
        return get_transaction()

    def add_child(self, child: Transaction) -> None:
        """Take responsibility for a finished child (committed or rolled back with us).

        A child that ends after this transaction did is settled at once: committed if we
        committed, rolled back if we rolled back."""
        with _tree_lock:
            self._add_child(child)

    def _add_child(self, child: Transaction) -> None:
        if self.state is TransactionState.COMMITTED:
            child.commit()
        elif self.state is TransactionState.ROLLED_BACK:
            child.rollback()
        else:
            self.children.append(child)

    # -- the context manager -----------------------------------------------------------------

    def _prepare(self) -> None:
        if self._token is not None:
            raise RuntimeError("Context already entered. Context enter calls cannot be nested.")
        parent = get_transaction()
        self._parent = parent
        if self.commit_mode is None:
            self.commit_mode = parent.commit_mode if parent is not None else CommitMode.LAZY
        if self.isolation_level is None:
            self.isolation_level = (
                parent.isolation_level
                if parent is not None and parent.isolation_level is not None
                else IsolationLevel.READ_COMMITTED
            )
        self.state = TransactionState.ACTIVE

    def __enter__(self) -> Transaction:
        self._prepare()
        try:
            self.begin()
        except BaseException:
            self._finish.close()
            raise
        self._token = _active.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._token is None:
            raise RuntimeError("Asymmetric use of context. Context exit called without an enter.")
        if exc_type is not None:
            self.rollback()
            self.reset()
            return  # the exception propagates
        if self.commit_mode is CommitMode.EAGER:
            self.commit()
        if self._parent is not None:  # the parent takes responsibility
            self.reset()
            return
        if self.commit_mode is CommitMode.OFF:
            self.rollback()  # nobody committed: roll back (a no-op once committed)
        else:
            self.commit()
        self.reset()

    def reset(self) -> None:
        """Leave the context: hand this transaction to its parent (which rolls back with
        it if it rolled back)."""
        parent = self._parent if self._token is not None else None
        if self._token is not None:
            _active.reset(self._token)
            self._token = None
        if parent is not None:
            parent.add_child(self)
            if self.state is TransactionState.ROLLED_BACK:
                parent.rollback()

    # -- the record of a keyed transaction ---------------------------------------------------

    def _keyed_store(self) -> ResultStore | None:
        if self.key is None or self._for_task:
            return None
        if self.store is None:
            from .config import get_store

            self.store = get_store()
        return self.store

    def begin(self) -> None:
        """Lock the key (SERIALIZABLE) and start out committed when its record exists."""
        store = self._keyed_store()
        if store is None or self.key is None:
            return
        if self.isolation_level is IsolationLevel.SERIALIZABLE:
            from .locks import default_lock_manager_for, hold

            manager = self.lock_manager or default_lock_manager_for(store)
            if self.lock_manager is not None:  # eviction in this process skips its locks
                from .lifecycle.evict import note_lock_manager

                note_lock_manager(store, manager)
            self._finish.enter_context(hold(manager, _store_key(self.key), self._holder))
        if not self.overwrite and store.lookup(_store_key(self.key)) is not None:
            self.state = TransactionState.COMMITTED

    def read(self) -> TransactionRecord | None:
        """The value stored under this transaction's key, or None."""
        store = self._keyed_store()
        if store is None or self.key is None:
            return None
        manifest = store.lookup(_store_key(self.key))
        if manifest is None or manifest.expired():
            return None
        return TransactionRecord(self.key, store.load(manifest))

    def _to_write(self) -> _StagedResult | None:
        """What this transaction writes at commit: a task's staged result, or the value
        staged under its key (its payload written now)."""
        staged = self._staged
        if isinstance(staged, _StagedResult):
            return staged
        store = self._keyed_store()
        if store is None or self.key is None or not self.write_on_commit or staged is _NOT_SET:
            return None
        from .tasks.context import new_run_id

        manifest = store.stage(
            _store_key(self.key),
            staged,
            task="notebook_flow.transactions",
            components={"transaction key": xxhash.xxh3_128_hexdigest(self.key.encode())},
            run_id=new_run_id(),
            duration=0.0,
            expires_at=None,
        )
        result = _StagedResult(store, manifest, staged)
        self._staged = result  # (its payload is discarded on a rollback)
        return result

    # -- staging, committing, rolling back ---------------------------------------------------

    def stage(
        self,
        value: Any,
        on_rollback_hooks: list[Callable[..., Any]] | None = None,
        on_commit_hooks: list[Callable[..., Any]] | None = None,
    ) -> None:
        """Stage a value (and hooks) to be written when the transaction commits."""
        if self.state is TransactionState.COMMITTED:
            return
        self._staged = value
        self.on_rollback_hooks += list(on_rollback_hooks or [])
        self.on_commit_hooks += list(on_commit_hooks or [])
        self.state = TransactionState.STAGED

    def commit(self) -> bool:
        """Run the commit hooks (children's first), then write what was staged (children's
        first); False when there was nothing to commit or committing failed (then what
        was not yet written rolls back).

        Every commit hook of the tree runs before anything is written, so a failing hook
        rolls the whole transaction back with nothing published."""
        with _tree_lock:
            return self._commit()

    def _commit(self) -> bool:
        if self.state in (TransactionState.ROLLED_BACK, TransactionState.COMMITTED):
            self._finish.close()
            return False
        try:
            if self._parent is None:
                _crash_point("transaction_commit")
            self._run_commit_hooks()
            self._publish()
            return True
        except SerializationError as exc:
            self.logger.warning(
                "could not serialize the value of transaction %r (%s); the code goes on, "
                "but the transaction is not committed",
                self.key,
                exc,
            )
            self.rollback()
            return False
        except Exception:
            self.logger.exception("committing transaction %r failed; rolling back", self.key)
            self.rollback()
            return False

    def _settled(self) -> bool:
        return self.state in (TransactionState.ROLLED_BACK, TransactionState.COMMITTED)

    def _run_commit_hooks(self) -> None:
        for child in self.children:
            if not child._settled():
                child._run_commit_hooks()
        for hook in self.on_commit_hooks:
            self._run_hook(hook, "commit")

    def _publish(self) -> None:
        results: list[_StagedResult] = []
        self._collect(results)
        _publish_all(results)
        self._committed()

    def _collect(self, results: list[_StagedResult]) -> None:
        for child in self.children:
            if not child._settled():
                child._collect(results)
        result = self._to_write()
        if result is not None:
            results.append(result)

    def _committed(self) -> None:
        for child in self.children:
            if not child._settled():
                child._committed()
        self.state = TransactionState.COMMITTED
        self._finish.close()

    def rollback(self) -> bool:
        """Discard what was staged, run the rollback hooks (last staged first) and roll the
        children back; False when already committed or rolled back."""
        with _tree_lock:
            return self._rollback()

    def _rollback(self) -> bool:
        if self.state in (TransactionState.ROLLED_BACK, TransactionState.COMMITTED):
            return False
        try:
            for hook in reversed(self.on_rollback_hooks):
                self._run_hook(hook, "rollback")
            self.state = TransactionState.ROLLED_BACK
            for child in reversed(self.children):
                child.rollback()
            return True
        except Exception:
            self.logger.exception("rolling back transaction %r failed", self.key)
            return False
        finally:
            self.state = TransactionState.ROLLED_BACK
            staged, self._staged = self._staged, _NOT_SET
            try:
                if isinstance(staged, _StagedResult):
                    staged.discard()
            finally:
                self._finish.close()

    def _run_hook(self, hook: Callable[..., Any], kind: str) -> None:
        from .tasks.hooks import hook_name, run_to_end

        name = hook_name(hook)
        self.logger.info("running %s hook %r", kind, name)
        try:
            run_to_end(hook(self))
        except Exception:
            self.logger.error("the %s hook %r raised", kind, name)
            raise


@contextlib.contextmanager
def transaction(  # noqa: PLR0917 (Prefect's signature, positional parameters included)
    key: str | None = None,
    store: ResultStore | None = None,
    commit_mode: CommitMode | str | None = None,
    isolation_level: IsolationLevel | str | None = None,
    overwrite: bool = False,
    write_on_commit: bool = True,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    *,
    lock_manager: Any = None,
) -> Iterator[Transaction]:
    """Open a transaction: the task results computed inside commit together, or none.

    >>> with transaction() as txn:               # doctest: +SKIP
    ...     a = extract(day)
    ...     b = load(a)
    >>> txn.is_committed()                       # doctest: +SKIP
    True
    """
    with Transaction(
        key=key,
        store=store,
        commit_mode=commit_mode,
        isolation_level=isolation_level,
        overwrite=overwrite,
        write_on_commit=write_on_commit,
        lock_manager=lock_manager,
        logger=logger,
    ) as txn:
        yield txn


@contextlib.asynccontextmanager
async def atransaction(  # noqa: PLR0917 (Prefect's signature)
    key: str | None = None,
    store: ResultStore | None = None,
    commit_mode: CommitMode | str | None = None,
    isolation_level: IsolationLevel | str | None = None,
    overwrite: bool = False,
    write_on_commit: bool = True,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    *,
    lock_manager: Any = None,
) -> AsyncIterator[Transaction]:
    """:func:`transaction` for ``async with`` (the same transaction object)."""
    with transaction(
        key,
        store,
        commit_mode,
        isolation_level,
        overwrite,
        write_on_commit,
        logger,
        lock_manager=lock_manager,
    ) as txn:
        yield txn


# -- the task call path's side -------------------------------------------------------------


def isolation_level_here() -> str | None:
    """The isolation level the active transaction asks of the tasks inside, or None."""
    txn = _active.get()
    if txn is None or txn.isolation_level is None:
        return None
    return txn.isolation_level.value


def lock_manager_here() -> Any:
    """The lock manager the active transactions give their tasks (innermost first)."""
    txn = _active.get()
    while txn is not None:
        if txn.lock_manager is not None:
            return txn.lock_manager
        txn = txn._parent
    return None


def active() -> bool:
    """True inside a transaction (results are staged, not committed in the background)."""
    return _active.get() is not None


@contextlib.contextmanager
def for_call(call: _Call) -> Iterator[Transaction | None]:
    """The transaction of one task call that runs its body: a child of the active
    transaction, or its own when the task has commit/rollback hooks; None otherwise
    (the call commits as usual)."""
    t = call.task
    parent = _active.get()
    if parent is None and not (t.on_commit_hooks or t.on_rollback_hooks):
        yield None
        return
    policy_level = getattr(t._policy, "isolation_level", None)
    txn = Transaction(
        key=call.key,
        store=call.store,
        isolation_level=policy_level,
        write_on_commit=bool(t.persist_result),
    )
    txn._for_task = True
    with txn:
        yield txn


def staged(store: ResultStore, key: str) -> _StagedResult | None:
    """The result for ``key`` staged earlier in the active transaction tree, if any: a
    transaction reads its own writes (and a SERIALIZABLE key it holds is not locked
    again, which would wait for itself)."""
    txn = _active.get()
    if txn is None:
        return None
    while txn._parent is not None:
        txn = txn._parent
    with _tree_lock:
        return _find_staged(txn, store.url, key)


def _find_staged(txn: Transaction, url: str, key: str) -> _StagedResult | None:
    value = txn._staged
    if (
        isinstance(value, _StagedResult)
        and value.manifest.key == key
        and value.store.url == url
        and not txn._settled()
    ):
        return value
    for child in reversed(txn.children):  # the latest first
        found = _find_staged(child, url, key)
        if found is not None:
            return found
    return None


def stage_call(
    txn: Transaction,
    call: _Call,
    manifest: Manifest | None,
    value: Any,
    *,
    lease: Any,
    release: Callable[[], None] | None,
) -> None:
    """Stage a task call's result (``manifest`` None: nothing to write, hooks only)."""
    t = call.task
    if release is not None:  # the key stays locked until the result is published or discarded
        txn._finish.callback(release)
    staged = (
        _StagedResult(call.store, manifest, value, lease, call) if manifest is not None else None
    )
    txn.stage(staged, on_rollback_hooks=t.on_rollback_hooks, on_commit_hooks=t.on_commit_hooks)
    _crash_point("after_stage")
