"""The key's lock of one call, when it must outlive the call: a body that
``timeout_seconds`` abandoned still runs, or a large array result commits in the
background (``storage/behind.py``) and releases the lock when it is stored."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from notebook_flow import config, transactions
from notebook_flow._crash import crash_point as _crash_point
from notebook_flow._imports import loaded
from notebook_flow.storage import behind

if TYPE_CHECKING:
    from .call import _Call
    from .definition import Task

logger = logging.getLogger("notebook_flow")


class _Held:
    """The key's lock for one call (``lease`` None when the policy takes none), which the
    call may hand to a background commit (``hand_off``) instead of releasing it itself."""

    __slots__ = ("handed_off", "lease", "stack")

    def __init__(self, lease: Any, stack: contextlib.ExitStack) -> None:
        self.lease = lease
        self.stack = stack
        self.handed_off = False

    def hand_off(self) -> contextlib.ExitStack:
        """The lock, to be released by whoever closes the returned stack."""
        self.handed_off = True
        return self.stack.pop_all()


@contextlib.contextmanager
def _locked_past_abandoned(call: _Call) -> Iterator[_Held]:
    """``call.locked()``, released only once no body this call abandoned still runs.

    ``timeout_seconds`` stops waiting for a body it cannot stop; while that body runs, no
    one else may start the same key (SERIALIZABLE). A daemon thread waits for it and then
    releases (the lease is renewed meanwhile); if the process dies first, the lock goes
    with it as usual."""
    with contextlib.ExitStack() as stack:
        held = _Held(stack.enter_context(call.locked()), stack)
        try:
            yield held
        finally:
            if not held.handed_off and held.lease is not None and (alive := _still_running(call)):
                _release_after(alive, stack.pop_all(), call)


def _still_running(call: _Call) -> list[threading.Thread]:
    """The bodies this call abandoned (``timeout_seconds``) that have not ended yet."""
    return [t for t in call.abandoned or () if t.is_alive()]


def _release_when_done(call: _Call, lease: Any, held: contextlib.ExitStack) -> None:
    """Release a handed-off lock now, or (on a thread) once the bodies this call abandoned
    end."""
    alive = _still_running(call)
    if lease is not None and alive:
        _release_after(alive, held, call)
    else:
        held.close()


def _release_after(bodies: list[threading.Thread], held: contextlib.ExitStack, call: _Call) -> None:
    def release() -> None:
        for thread in bodies:
            thread.join()
        try:
            held.close()
        except Exception:
            logger.warning("releasing the lock of `%s` failed", call.task.name, exc_info=True)

    logger.info(
        "task `%s`: its timed-out body still runs; key %s stays locked until it ends",
        call.task.name,
        call.key,
    )
    threading.Thread(
        target=release, name=f"notebook_flow-release-{call.task.name}", daemon=True
    ).start()


def _background_eligible(t: Task[Any, Any], value: Any) -> bool:
    """A large array of plain values, stored as ``npy``: a copy snapshots it exactly."""
    np = loaded("numpy")
    if np is None or type(value) is not np.ndarray:
        return False
    if value.dtype.hasobject or value.nbytes < behind.MIN_BYTES:
        return False
    serializer = t.result_serializer
    name = serializer if serializer is None or isinstance(serializer, str) else serializer.name
    return name in (None, "npy")


def _commit_in_background(
    call: _Call, value: Any, duration: float, attempt: int, held: _Held
) -> bool:
    """Hand the commit of a large array result to the committer thread, with the key's
    lock and what follows the commit (see ``storage/behind.py``); False when the caller
    must commit it: not such a result, background commits off, in a worker process, or
    over the memory budget. The committed bytes are a snapshot taken here, so the caller
    may change its array at once."""
    t = call.task
    key = call.key
    if key is None or not t.persist_result or not _background_eligible(t, value):
        return False
    if transactions.active():  # staged in the transaction, in the foreground
        return False
    if behind.foreground.get() or not config.settings().background_commits:
        return False
    job = behind.reserve(call.store.url, key, value.nbytes)
    if job is None:
        return False
    try:
        snapshot = value.copy(order="K")
    except BaseException as exc:  # (a reservation must never be left behind: waiters)
        behind.cancel(job)
        if isinstance(exc, MemoryError):
            return False
        raise
    lease = held.lease
    context = contextvars.copy_context()  # the run's notebook, cell and context vars

    def commit() -> None:
        try:
            context.run(call.commit, snapshot, duration, attempt, lease)
            _crash_point("before_release")
        except Exception as exc:  # recorded FAILED by commit(); the caller has its value
            logger.warning(
                "task `%s` returned its result, but storing it failed (%s: %s); "
                "the next call with the same key computes it again",
                t.name,
                type(exc).__name__,
                exc,
            )
        finally:
            try:
                _release_when_done(call, lease, lock)
            except Exception:  # (its lease then expires, as for a dead holder)
                logger.warning("releasing the lock of `%s` failed", t.name, exc_info=True)

    lock = held.hand_off()
    try:
        behind.start(job, commit)
    except BaseException as exc:
        behind.cancel(job)
        commit()  # in the foreground after all (it also releases the lock)
        if not isinstance(exc, Exception):
            raise
    return True
