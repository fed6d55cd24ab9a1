"""``@task``: a function whose results are cached durably, and the call path that runs it.

>>> from notebook_flow import task
>>> @task
... def add(x, y):
...     return x + y
>>> add(1, 2)            # computed, committed to the store      # doctest: +SKIP
3
>>> add(1, 2)            # loaded from the store, also after a kernel restart  # doctest: +SKIP
3

The call path, top to bottom (:func:`_run_sync`):

1. bind the arguments (defaults applied);
2. ``key = policy.compute_key(...)`` — None means "run uncached";
3. look the key up in the store; a valid, unexpired manifest is a hit: load, record CACHED;
4. on a miss (SERIALIZABLE: under a lock with a lease, then look again) run the body with
   retries and timeout, commit payload then manifest, record COMPLETED, release.

The package follows that path: :mod:`.definition` (``Task``, ``@task``, the options),
:mod:`.call` (one call: key, lookup, lock, run with retries, commit, record),
:mod:`.retries` (retry delays), :mod:`.held` (a lock kept past the call), :mod:`.hooks`
(completion/failure hooks), :mod:`.keys` (``result_storage_key``, ``task_input_hash``),
:mod:`.hot` (the in-process hot cache a hit reads first), :mod:`.context` (run ids,
``current_run()``) and :mod:`.explain` (why a call hits or misses). What other modules use
is re-exported here: import it from ``notebook_flow.tasks``. Module state lives once, in
its own module: patch ``notebook_flow._crash.CRASH_AT`` or ``hot._hot``, not a name
re-exported here.
"""

from __future__ import annotations

from .call import _MISS as _MISS
from .call import _Call as _Call
from .call import _metadata_for as _metadata_for
from .call import _run_async as _run_async
from .call import _run_sync as _run_sync
from .call import _short_repr as _short_repr
from .call import _store_for as _store_for
from .context import RunContext, current_run
from .context import _current_run as _current_run
from .context import new_run_id as new_run_id
from .definition import _NOT_SET as _NOT_SET
from .definition import Task, task
from .definition import _as_timedelta as _as_timedelta
from .definition import _resolve as _resolve
from .definition import _task_by_reference as _task_by_reference
from .definition import _task_from_options as _task_from_options
from .explain import Explanation
from .explain import _expired_reason as _expired_reason
from .explain import diff_components as diff_components
from .hot import _hot as _hot
from .hot import _HotCache as _HotCache
from .hot import _immutable as _immutable
from .keys import task_input_hash
from .retries import RetryDelay as RetryDelay
from .retries import _delays as _delays
from .retries import exponential_backoff

__all__ = [
    "Explanation",
    "RunContext",
    "Task",
    "current_run",
    "exponential_backoff",
    "task",
    "task_input_hash",
]

# Pickles (worker payloads, the run journal) and cache keys that take one of these as an
# argument name them by module and qualified name: they keep the name they had when this
# package was the single module tasks.py, so old pickles load and no key changes.
for _obj in (Task, RunContext, Explanation, _task_by_reference, _task_from_options):
    _obj.__module__ = __name__
del _obj
