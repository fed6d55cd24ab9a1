"""Keys of Prefect's task options: ``result_storage_key`` templates and
``task_input_hash`` (a ``cache_key_fn``).

>>> @task(result_storage_key="report-{parameters[day]}.json")   # doctest: +SKIP
... def report(day): ...
>>> @task(cache_key_fn=task_input_hash)                          # doctest: +SKIP
... def add(x, y): ...
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from notebook_flow.cache_policies import CachePolicy, KeyContext, _FunctionAsTask, _hash_text
from notebook_flow.errors import ConfigurationError, UnhashableError
from notebook_flow.hashing import fingerprint
from notebook_flow.sourcehash import source_components

__all__ = ["task_input_hash"]

logger = logging.getLogger("notebook_flow")


@dataclasses.dataclass
class _ResultStorageKey(CachePolicy):
    """The key of a task with Prefect's ``result_storage_key`` template, formatted per call
    with ``parameters`` (the bound arguments) and ``task_run`` (``.id``, ``.name``,
    ``.task_name``). Like every key it is namespaced by the task."""

    template: str = ""

    def compute_components(self, ctx: KeyContext) -> dict[str, str] | None:
        name = ctx.task.name if ctx.task is not None else "?"
        run = _RunFields(ctx.run_id or "", name, name)
        try:
            text = self.template.format(parameters=dict(ctx.arguments), task_run=run)
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise ConfigurationError(
                f"result_storage_key {self.template!r} of task `{name}` cannot be formatted "
                f"({type(exc).__name__}: {exc}); it may use {{parameters[name]}}, "
                "{task_run.id}, {task_run.name} and {task_run.task_name}"
            ) from None
        return {"result_storage_key": _hash_text(text)}

    def __repr__(self) -> str:
        return f"result_storage_key={self.template!r}"


@dataclasses.dataclass(frozen=True)
class _RunFields:
    id: str
    name: str
    task_name: str


def task_input_hash(context: Any, arguments: Mapping[str, Any]) -> str | None:
    """Prefect's ``task_input_hash`` key function: the task's identity, its normalized
    source and the arguments; None (the call runs uncached, with a log line saying why)
    when an argument has no stable fingerprint.

    >>> @task(cache_key_fn=task_input_hash)  # doctest: +SKIP
    ... def add(x, y): ...
    """
    task = getattr(context, "task", None)
    if task is not None and not hasattr(task, "identity") and callable(task):
        task = _FunctionAsTask(getattr(task, "fn", task))
    parts: dict[str, Any] = {"arguments": dict(arguments)}
    if task is not None:
        parts["task"] = task.identity
        parts["source"] = source_components(task.fn, label="source")
    try:
        return fingerprint(parts)
    except UnhashableError as exc:
        logger.info(
            "task_input_hash: an argument has no stable fingerprint (%s); running uncached", exc
        )
        return None
