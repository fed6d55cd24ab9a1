"""Resuming what a dead session left unfinished: :func:`resume`.

Reads the journals (``journal.py``) of this store's dead sessions on this host, and
re-submits their unfinished runs — plus any upstream run they need, which is a cache hit
when its result was committed — without re-running a cell. See ``journal.py`` for what
is journaled and which runs cannot be resumed.

>>> futs = notebook_flow.resume()                           # doctest: +SKIP
>>> futs.result(); futs.skipped                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import linecache
import logging
import os
import pickle
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from notebook_flow import _identity
from notebook_flow.futures import FutureList, TaskFuture, allow_failure, unmapped
from notebook_flow.futures.arguments import _rebuild
from notebook_flow.runners.journal import (
    _DONE,
    _FRAME,
    _HEADER,
    _LINES,
    _MAGIC,
    _SUBMIT,
    _SUFFIX,
    _TASK,
    _UNRESUMABLE,
    flush,
)

if TYPE_CHECKING:
    from notebook_flow.storage import ResultStore

__all__ = ["Resumed", "Unresumable", "read_journal", "resume"]

logger = logging.getLogger("notebook_flow")


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A journaled reference to the future of another run (by its old run id)."""

    run_id: str


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        kind, run_id = pid
        if kind != "run":
            raise pickle.UnpicklingError(f"unknown journal reference {pid!r}")
        return _Ref(run_id)


@dataclasses.dataclass(frozen=True)
class Unresumable:
    """A run that ``resume()`` could not re-submit, and why."""

    run_id: str
    task: str
    reason: str


@dataclasses.dataclass
class _Contents:
    header: dict[str, Any] = dataclasses.field(default_factory=dict)
    tasks: dict[int, tuple[str, str, bytes | None, str | None]] = dataclasses.field(
        default_factory=dict
    )
    lines: dict[str, Any] = dataclasses.field(default_factory=dict)
    batches: list[tuple[list[tuple[str, int, str]], bytes]] = dataclasses.field(
        default_factory=list
    )
    done: set[str] = dataclasses.field(default_factory=set)
    unresumable: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


def read_journal(path: str) -> _Contents:
    """Parse a journal; a torn last frame (the process died mid-write) is ignored."""
    with open(path, "rb") as f:
        data = f.read()
    out = _Contents()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path} is not a notebook_flow journal")
    pos = len(_MAGIC)
    while pos + _FRAME.size <= len(data):
        kind, size = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        if start + size > len(data):
            break
        payload = data[start : start + size]
        pos = start + size
        if kind == _DONE:
            out.done.update(payload[i : i + 16].hex() for i in range(0, len(payload), 16))
        elif kind == _SUBMIT:
            meta, blob = pickle.loads(payload)
            out.batches.append((meta, blob))
        elif kind == _TASK:
            index, name, identity, blob, error = pickle.loads(payload)
            out.tasks[index] = (name, identity, blob, error)
        elif kind == _LINES:
            out.lines.update(pickle.loads(payload))
        elif kind == _UNRESUMABLE:
            run_id, name, reason = pickle.loads(payload)
            out.unresumable[run_id] = (name, reason)
        elif kind == _HEADER:
            out.header = pickle.loads(payload)
    return out


class Resumed(FutureList):
    """The futures of resumed runs; ``.skipped`` lists the runs that could not be resumed,
    ``.resumed_from`` maps each new run id to the old one."""

    skipped: list[Unresumable]
    resumed_from: dict[str, str]
    sessions: list[dict[str, Any]]


def _dead_journals(folder: str) -> list[str]:
    me = _identity.process()
    host = re.sub(r"[^A-Za-z0-9.-]", "-", me.host)
    found = []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    for name in names:
        _, _, claimer = name.partition(f"{_SUFFIX}.resuming-")
        if claimer:  # claimed by a resume() that may have died before finishing
            if claimer.isdigit() and not _identity.pid_alive(int(claimer)):
                found.append(name)
            continue
        if not name.endswith(_SUFFIX):
            continue
        parts = name[: -len(_SUFFIX)].split("_")
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue
        pid, start = int(parts[1]), int(parts[2]) if parts[2].isdigit() else 0
        if pid == me.pid or _identity.pid_alive(pid, start or None):
            continue
        found.append(name)
    return [os.path.join(folder, n) for n in found]


def resume(store: str | ResultStore | None = None) -> Resumed:
    """Re-submit the runs that dead sessions (kernels, scripts) of this store left
    unfinished, without re-running their cells; returns their futures.

    >>> futs = notebook_flow.resume()                       # doctest: +SKIP
    >>> futs.skipped                      # the runs that cannot be resumed  # doctest: +SKIP

    Runs whose results were committed are not repeated; an upstream that a resumed run
    needs is re-submitted too (a cache hit when its result was committed). See this
    module's docstring for which runs cannot be resumed and why.
    """
    from notebook_flow.config import get_store

    from .base import current_runner

    s = get_store(store)
    result = Resumed()
    result.skipped, result.resumed_from, result.sessions = [], {}, []
    claimed = []
    for path in _dead_journals(s.local_dir("journal")):
        base = path.split(f"{_SUFFIX}.resuming-")[0] + _SUFFIX
        mine = f"{base}.resuming-{os.getpid()}"
        try:
            os.rename(path, mine)  # atomic claim: two resumers never both take a journal
        except FileNotFoundError:
            continue
        claimed.append(mine)
        try:
            contents = read_journal(mine)
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            logger.warning("cannot read the journal %s (%s); skipped", mine, exc)
            continue
        result.sessions.append(contents.header)
        _resubmit(contents, current_runner().submit, result)
    flush()  # our own journal now holds the re-submitted runs
    for path in claimed:
        try:
            os.unlink(path)
        except OSError:
            pass
    if result or result.skipped:
        logger.info(
            "resumed %d run(s) from %d dead session(s); %d could not be resumed",
            len(result),
            len(result.sessions),
            len(result.skipped),
        )
    for item in result.skipped:
        logger.warning(
            "run %s of task `%s` was not resumed: %s", item.run_id[:8], item.task, item.reason
        )
    return result


def _resubmit(contents: _Contents, submit: Callable[..., TaskFuture[Any]], result: Resumed) -> None:
    for name, entry in contents.lines.items():
        linecache.cache.setdefault(name, entry)
    order: list[str] = []
    where: dict[str, tuple[int, int, str]] = {}  # run id -> (batch, position, task name)
    for b, (meta, _) in enumerate(contents.batches):
        for i, (run_id, _index, name) in enumerate(meta):
            order.append(run_id)
            where[run_id] = (b, i, name)
    records: dict[str, tuple[Any, ...]] = {}
    bad: dict[str, str] = {}
    loaded: dict[int, list[Any] | str] = {}

    def record(run_id: str) -> tuple[Any, ...] | None:
        if run_id in records:
            return records[run_id]
        b, i, _ = where[run_id]
        if b not in loaded:
            try:
                loaded[b] = _Unpickler(io.BytesIO(contents.batches[b][1])).load()
            except Exception as exc:
                loaded[b] = f"its arguments cannot be unpickled here ({type(exc).__name__}: {exc})"
        batch = loaded[b]
        if isinstance(batch, str):
            bad[run_id] = batch
            return None
        rec: tuple[Any, ...] = batch[i]
        records[run_id] = rec
        return rec

    # Which runs to re-submit: the unfinished ones, plus the upstream runs they need.
    need: set[str] = set()
    stack = [r for r in order if r not in contents.done]
    while stack:
        run_id = stack.pop()
        if run_id in need:
            continue
        need.add(run_id)
        rec = record(run_id)
        if rec is None:
            continue
        refs: list[_Ref] = []
        _find_refs(rec[:3], refs)
        for ref in refs:
            if ref.run_id in where:
                stack.append(ref.run_id)
            elif ref.run_id not in bad:
                up_name, up_reason = contents.unresumable.get(
                    ref.run_id, ("?", "it is not in the journal")
                )
                bad[ref.run_id] = f"upstream run of `{up_name}` cannot be resumed: {up_reason}"
    tasks: dict[int, Any] = {}
    new: dict[str, TaskFuture[Any]] = {}
    for run_id in order:
        if run_id not in need:
            continue
        b, i, name = where[run_id]
        index = contents.batches[b][0][i][1]
        if index not in tasks:
            _, _, blob, error = contents.tasks.get(index, ("", "", None, "the task is missing"))
            try:
                tasks[index] = (
                    pickle.loads(blob)
                    if blob is not None
                    else f"the task could not be pickled ({error})"
                )
            except Exception as exc:
                tasks[index] = f"the task cannot be loaded here ({type(exc).__name__}: {exc})"
        task = tasks[index]
        rec = records.get(run_id)
        reason = bad.get(run_id) or (task if isinstance(task, str) else None)
        if reason is None and rec is not None:
            refs = []
            _find_refs(rec[:3], refs)
            missing = [r.run_id for r in refs if r.run_id not in new]
            if missing:
                reason = f"it depends on run {missing[0][:8]}, which cannot be resumed"
        if reason is not None or rec is None:
            bad[run_id] = reason or "unknown"
            result.skipped.append(Unresumable(run_id, name, bad[run_id]))
            continue
        args, kwargs, wait_for = (_replace_refs(x, new) for x in rec[:3])
        fut = submit(task, *args, wait_for=wait_for, **kwargs)
        new[run_id] = fut
        result.resumed_from[fut.run_id] = run_id
        if run_id not in contents.done:
            result.append(fut)
    for run_id, (name, reason) in contents.unresumable.items():
        if run_id not in contents.done:
            result.skipped.append(Unresumable(run_id, name, reason))


def _find_refs(obj: Any, out: list[_Ref]) -> None:
    if isinstance(obj, _Ref):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _find_refs(v, out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _find_refs(v, out)
    elif isinstance(obj, (allow_failure, unmapped)):
        _find_refs(obj.value, out)


def _replace_refs(obj: Any, new: dict[str, TaskFuture[Any]]) -> Any:
    if isinstance(obj, _Ref):
        return new[obj.run_id]
    if isinstance(obj, allow_failure):
        return allow_failure(_replace_refs(obj.value, new))
    if isinstance(obj, dict):
        return _rebuild(obj, {k: _replace_refs(v, new) for k, v in obj.items()})
    if isinstance(obj, (list, tuple, set, frozenset)):
        return _rebuild(obj, [_replace_refs(v, new) for v in obj])
    return obj
