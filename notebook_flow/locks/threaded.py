"""Holding a lock from async code: a thread of its own acquires, holds and releases it.

``hold()`` blocks while it waits for a lock, so ``async def`` tasks cannot call it on the
event loop. Running it on the loop's default executor (``asyncio.to_thread``) deadlocked:
the waiters of a busy key filled that small pool (``min(32, cpus + 4)`` threads) while the
holder needed a pool thread to look up and commit, so nobody progressed until the lock
timeout, or forever without one (the heartbeat kept the holder's lease alive).

Here each lock gets a thread that lives exactly as long as the lock is held. That also
keeps ``MemoryLockManager`` right, which takes the thread that acquired a lock as its
holder and treats the lock as free once that thread has ended. A caller cancelled while
it waits leaves nothing behind: the thread gives the lock back as soon as it gets it.

>>> async def charge(manager, key, holder):                          # doctest: +SKIP
...     async with held_in_thread(hold(manager, key, holder)) as lease:
...         ...
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any, TypeVar

__all__ = ["HandOff", "held_in_thread"]

T = TypeVar("T")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Resolve ``future`` unless its waiter gave up (runs on the event loop)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class HandOff:
    """Lets the ``async with held_in_thread(...)`` body keep the lock past the block:
    :meth:`keep` returns the function that releases it later (from any thread; the
    holder thread exits ``cm``). A transaction keeps a task's key locked this way until
    its result is published."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.kept = False

    def keep(self) -> Any:
        self.kept = True
        return self.event.set


@contextlib.asynccontextmanager
async def held_in_thread(
    cm: contextlib.AbstractContextManager[T], hand_off: HandOff | None = None
) -> AsyncIterator[T | None]:
    """Enter ``cm`` in a new thread, yield what it returned, exit it in that same thread.

    A ``contextlib.nullcontext`` (no lock needed) is entered inline, without a thread.
    Exceptions of the ``async with`` body are not passed to ``cm.__exit__`` (``hold()``
    releases the same way whatever happened); an exception raised by entering or exiting
    ``cm`` propagates to the caller. When the body called ``hand_off.keep()`` (and ended
    without an error), the lock stays held until the function it returned is called.
    """
    if isinstance(cm, contextlib.nullcontext):
        with cm as value:
            yield value
        return
    loop = asyncio.get_running_loop()
    entered: asyncio.Future[T] = loop.create_future()
    exited: asyncio.Future[None] = loop.create_future()
    # Set once: the holder's work is over (or it gave up waiting).
    leave = hand_off.event if hand_off is not None else threading.Event()

    def report(future: asyncio.Future[Any], result: Any = None, error: Any = None) -> bool:
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the event loop is closed: nobody will use the lock
            return False
        return True

    def run() -> None:
        try:
            value = cm.__enter__()
        except BaseException as exc:
            report(entered, error=exc)
            return
        error: BaseException | None = None
        try:
            if report(entered, value):
                leave.wait()
        finally:
            try:
                cm.__exit__(None, None, None)
            except BaseException as exc:
                error = exc
            report(exited, error=error)

    threading.Thread(target=run, name="notebook_flow-lock-holder", daemon=True).start()
    try:
        value = await entered
    except BaseException:  # cancelled while waiting: release the lock once it is ours
        leave.set()
        raise
    try:
        yield value
    except BaseException:
        leave.set()
        await exited
        raise
    if hand_off is not None and hand_off.kept:
        return  # released later, by whoever holds the function keep() returned
    leave.set()
    await exited
