"""The dashboard's tabs that change the store: cache (invalidate) and locks (break).

Both ask first (an inline confirmation bar) and say what happened afterwards.
"""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import json
import logging
import time
from html import escape
from typing import Any

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used
from panel.io import hold  # noqa: TID253

from .queries import Page, Source
from .views import worker
from .widgets import (
    ALL,
    Confirm,
    Pager,
    View,
    button,
    empty,
    empty_frame,
    fmt_age,
    fmt_bytes,
    fmt_seconds,
    fmt_time,
    frame,
    html,
    missing,
    note,
    relative_path,
    table,
)

__all__ = ["CacheView", "LocksView"]

logger = logging.getLogger("notebook_flow")

# -- cache ---------------------------------------------------------------------------------


class CacheView(View):
    """Stored results: what inputs made each, its size, age, last use, expiry, pin and
    where it was made; search; invalidate one entry or a whole task."""

    title = "Cache"
    columns = [
        "Task", "Inputs", "Size", "Created", "Last used", "Expires", "Pinned", "Made in",
        "Compute time", "Key",
    ]  # fmt: skip
    HINT_ENTRY = "Select an entry in the table to invalidate it."
    HINT_TASK = "Choose a task above to invalidate all of its entries."

    def __init__(self, source: Source, page_size: int = 50) -> None:
        super().__init__(source)
        self.page: Page | None = None
        self.keys: list[str] = []
        self.task = pn.widgets.Select(label="Task", options=[ALL], value=ALL, width=200)
        self.task.param.watch(self._task_changed, "value")
        self.search = pn.widgets.TextInput(
            label="Search", placeholder="task, inputs, notebook, cell, host or key", width=320
        )
        self.search.param.watch(self._task_changed, ["value", "value_input"])
        self.pager = Pager(self.load_page, page_size, "entries")
        self.table = table(value=empty_frame(self.columns), selectable=1, max_height=520)
        self.table.param.watch(self._selection_changed, "selection")
        self.delete_entry = button(
            "Invalidate entry", color="warning", disabled=True, description=self.HINT_ENTRY
        )
        self.delete_task = button(
            "Invalidate task", color="warning", disabled=True, description=self.HINT_TASK
        )
        self.hint = html(self._hint(), css_classes=["nf-hint"], margin=(14, 10))
        self.delete_entry.on_click(self._ask_entry)
        self.delete_task.on_click(self._ask_task)
        # The store against its quota, its pins, what gc would free (notebook_flow.lifecycle).
        self.pins: frozenset[str] = frozenset()
        self.lifecycle = html("", css_classes=["nf-lifecycle"], sizing_mode="stretch_width")
        self.prune = button(
            "Prune unreachable",
            color="warning",
            description="Remove the results of code no recent run uses (gc --unreachable)",
        )
        self.prune.on_click(self._ask_prune)
        self.confirm = Confirm()
        self.message = html("", sizing_mode="stretch_width")
        self.empty = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            pn.FlexBox(
                self.task,
                self.search,
                pn.Column(
                    pn.Spacer(height=18),
                    pn.Row(self.delete_entry, self.delete_task, self.prune, self.hint),
                ),
                flex_wrap="wrap",
                sizing_mode="stretch_width",
            ),
            self.lifecycle,
            self.confirm.panel,
            self.message,
            self.pager.panel,
            self.empty,
            self.table,
            sizing_mode="stretch_width",
        )

    def _search_text(self) -> str:
        typed = self.search.value_input
        return str(typed if typed is not None else self.search.value or "")

    def _query(self) -> dict[str, Any]:
        return {
            "task": None if self.task.value == ALL else self.task.value,
            "page": self.pager.page,
            "page_size": self.pager.page_size,
            "search": self._search_text(),
        }

    def load(self) -> dict[str, Any]:
        q = self._query()
        return {
            "tasks": self.source.cache_tasks(),
            "page": self.source.cache_page(q.pop("task"), **q),
            "lifecycle": self._summary(),
        }

    def _summary(self) -> Any:
        from notebook_flow.lifecycle.status import summary

        try:
            return summary(self.source.store) if self.source.store is not None else None
        except Exception:  # the table is still worth showing
            logger.warning("could not summarize the store's lifecycle", exc_info=True)
            return None

    def render(self, data: dict[str, Any]) -> None:
        self.task.options = [ALL, *data["tasks"]]
        status = data.get("lifecycle")
        if status is not None:
            self.pins = status.pinned
            self.lifecycle.object = note(status.line(), "info")
            self.prune.disabled = not status.unreachable_entries
        self.show_page(data["page"])

    def load_page(self) -> None:
        q = self._query()
        with hold():
            self.show_page(self.source.cache_page(q.pop("task"), **q))

    def show_page(self, page: Page) -> None:
        self.page = page
        self.pager.show(page)
        df = page.rows
        selected = self.selected_key()
        self.keys = [str(k) for k in df["key"]]
        now = time.time()
        base = self.source.project_dir
        self.table.value = frame(
            {
                "Task": df["task"].tolist(),
                "Inputs": [inputs_summary(x) for x in df["inputs"]],
                "Size": [fmt_bytes(s) for s in df["size"]],
                "Created": [fmt_age(c, now) for c in df["created_at"]],
                "Last used": [
                    "never hit" if missing(x) else fmt_age(x, now) for x in df["last_used"]
                ],
                "Expires": [
                    "never" if missing(x) else ("expired" if x <= now else fmt_age(x, now))
                    for x in df["expires_at"]
                ],
                "Pinned": [
                    "📌 pinned" if _truthy(p) or k in self.pins else ""
                    for p, k in zip(df["pinned"], self.keys, strict=True)
                ],
                "Made in": [
                    made_in(p, nb, cell, host, pid, base=base)
                    for p, nb, cell, host, pid in df[
                        ["provenance", "notebook", "cell", "host", "pid"]
                    ].itertuples(index=False)
                ],
                "Compute time": [fmt_seconds(d) for d in df["duration"]],
                "Key": [k[:12] + "…" for k in self.keys],
            },
            self.columns,
        )
        self.table.visible = bool(page.total)
        if page.total:
            self.empty.object = ""
        elif self._search_text() or self.task.value != ALL:
            self.empty.object = empty("No cached result matches this task or search.", "cache")
        else:
            self.empty.object = empty(
                "Nothing is cached yet: results appear here when a cached task or %%task "
                "cell completes.",
                "cache",
            )
        self.table.selection = [self.keys.index(selected)] if selected in self.keys else []
        self.delete_task.disabled = self.task.value == ALL
        self._selection_changed(None)

    def selected_key(self) -> str | None:
        sel = self.table.selection
        return self.keys[sel[0]] if sel and sel[0] < len(self.keys) else None

    def _task_changed(self, _: object) -> None:
        self.pager.page = 0
        self.confirm.cancel()
        self.load_page()

    def _selection_changed(self, _: object) -> None:
        self.delete_entry.disabled = self.selected_key() is None
        self.hint.object = self._hint()

    def _hint(self) -> str:
        """Why a button is disabled, next to it."""
        hints = []
        if self.selected_key() is None:
            hints.append(self.HINT_ENTRY)
        if self.task.value == ALL:
            hints.append(self.HINT_TASK)
        return escape(" ".join(hints))

    def _ask_entry(self, _: object) -> None:
        key = self.selected_key()
        if key is None:
            return
        self.confirm.ask(
            f"Delete the cached result {key}? The next call recomputes it.",
            lambda: self._invalidate([key]),
        )

    def _ask_task(self, _: object) -> None:
        task = self.task.value
        if task == ALL:
            return
        self.confirm.ask(
            f"Delete every cached result of task {task!r}? Its next calls recompute.",
            lambda: self._invalidate_task(task),
        )

    def _ask_prune(self, _: object) -> None:
        self.confirm.ask(
            "Delete every result of code that no recent run uses (gc --unreachable)? "
            "Pinned results stay.",
            self._prune,
        )

    def _prune(self) -> None:
        from notebook_flow.lifecycle.status import prune_unreachable

        assert self.source.store is not None
        n, size = prune_unreachable(self.source.store)
        self.message.object = note(
            f"Pruned {n} unreachable result(s), {fmt_bytes(size)}.", "success"
        )
        self.refresh()

    def _invalidate(self, keys: list[str]) -> None:
        n = self.source.invalidate(keys)
        self.message.object = note(f"Invalidated {n} cached result(s).", "success")
        self.refresh()

    def _invalidate_task(self, task: str) -> None:
        n = self.source.invalidate_task(task)
        self.message.object = note(f"Invalidated {n} cached result(s) of {task}.", "success")
        self.task.value = ALL
        self.refresh()


# -- locks ---------------------------------------------------------------------------------


class LocksView(View):
    """Locks held now (holder, age, lease), recent waits, and breaking a stale lock."""

    title = "Locks"
    columns = ["Key", "Task", "Holder", "Held for", "Lease", "Manager"]
    HINT = "Select a held lock above to break it."

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.rows: list[tuple[str, str | None]] = []  # (key, manager)
        self.table = table(value=empty_frame(self.columns), selectable=1, max_height=300)
        self.table.param.watch(self._selection_changed, "selection")
        self.waits = table(
            value=empty_frame(["When", "Key", "Task", "Waited", "Holder"]), max_height=300
        )
        self.break_button = button(
            "Break lock", color="danger", disabled=True, description=self.HINT
        )
        self.break_hint = html(escape(self.HINT), css_classes=["nf-hint"], margin=(14, 10))
        self.break_button.on_click(self._ask)
        self.confirm = Confirm()
        self.message = html("", sizing_mode="stretch_width")
        self.held_note = html("", sizing_mode="stretch_width")
        self.waits_note = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            html("<h3>Held now</h3>", margin=(0, 10)),
            self.held_note,
            self.table,
            pn.Row(self.break_button, self.break_hint),
            self.confirm.panel,
            self.message,
            html("<h3>Recent waits</h3>", margin=(0, 10)),
            self.waits_note,
            self.waits,
            sizing_mode="stretch_width",
        )

    def load(self) -> dict[str, Any]:
        return {"locks": self.source.locks(), "waits": self.source.lock_waits()}

    def render(self, data: dict[str, Any]) -> None:
        from notebook_flow.locks.base import LockInfo, describe_holder

        now = time.time()
        locks = data["locks"]
        selected = self.rows[self.table.selection[0]][0] if self.table.selection else None
        self.rows = [
            (str(k), m if isinstance(m, str) else None)
            for k, m in zip(locks["key"], locks["manager"], strict=True)
        ]
        holders = []
        for key, holder, acquired, lease, manager in locks[
            ["key", "holder", "acquired", "lease_expires", "manager"]
        ].itertuples(index=False):
            info = LockInfo(
                str(key), str(holder), float(acquired or now), float(lease or now), str(manager), 0
            )
            holders.append(describe_holder(info, now).split(", since")[0])
        self.table.value = frame(
            {
                "Key": [k for k, _ in self.rows],
                "Task": [t if isinstance(t, str) else "" for t in locks["task"]],
                "Holder": holders,
                "Held for": [fmt_seconds(now - a) for a in locks["acquired"]],
                "Lease": [_lease(x, now) for x in locks["lease_expires"]],
                "Manager": [m or "" for _, m in self.rows],
            },
            self.columns,
        )
        keys = [k for k, _ in self.rows]
        self.table.selection = [keys.index(selected)] if selected in keys else []
        self.held_note.object = (
            ""
            if self.rows
            else empty(
                "No lock is held right now: a lock shows here while a run computes a key "
                "other runs may want.",
                "locks",
            )
        )
        self.table.visible = bool(self.rows)  # an empty state, not bare headers
        self._selection_changed(None)
        waits = data["waits"]
        self.waits_note.object = (
            "" if len(waits) else empty("No run has waited for a lock yet.", "waits")
        )
        self.waits.visible = bool(len(waits))
        self.waits.value = frame(
            {
                "When": [fmt_time(t) for t in waits["time"]],
                "Key": [str(k) for k in waits["key"]],
                "Task": [t if isinstance(t, str) else "" for t in waits["task"]],
                "Waited": [fmt_seconds(w) for w in waits["waited"]],
                "Holder": [str(h) for h in waits["holder"]],
            },
            ["When", "Key", "Task", "Waited", "Holder"],
        )

    def _selection_changed(self, _: object) -> None:
        self.break_button.disabled = not self.table.selection
        self.break_hint.object = "" if self.table.selection else escape(self.HINT)

    def _ask(self, _: object) -> None:
        if not self.table.selection:
            return
        key, manager = self.rows[self.table.selection[0]]
        self.confirm.ask(
            f"Break the lock on {key}? If its holder is still running, another run may compute "
            "the same key at the same time.",
            lambda: self._break(key, manager),
        )

    def _break(self, key: str, manager: str | None) -> None:
        try:
            text = self.source.break_lock(key, manager)
        except Exception as exc:  # a lock backend that is down must not kill the dashboard
            logger.warning("breaking lock %s failed", key, exc_info=True)
            text = f"Could not break the lock on {key}: {exc}"
        self.message.object = note(text, "success" if text.startswith("Broke") else "warning")
        self.refresh()


def inputs_summary(inputs: Any, limit: int = 80) -> str:
    """``x=3, name='a'`` from a run's recorded inputs (JSON of name → repr), shortened."""
    if not isinstance(inputs, str) or not inputs:
        return ""
    try:
        parsed = json.loads(inputs)
    except ValueError:
        parsed = None
    pairs = parsed.items() if isinstance(parsed, dict) else None
    text = ", ".join(f"{k}={v}" for k, v in pairs) if pairs is not None else inputs
    return text if len(text) <= limit else text[: limit - 1] + "…"


def made_in(
    provenance: Any, notebook: Any, cell: Any, host: Any, pid: Any, *, base: str | None
) -> str:
    """Where an entry was made: its recorded provenance, else the notebook and cell (or the
    host and pid) of the run that computed it."""
    if isinstance(provenance, str) and provenance:
        try:
            parsed = json.loads(provenance)
        except ValueError:
            return provenance
        if isinstance(parsed, dict):
            from notebook_flow.provenance import format_provenance

            shown = {str(k): str(v) for k, v in parsed.items() if v}
            if shown.get("notebook"):
                shown["notebook"] = relative_path(shown["notebook"], base)
            if isinstance(cell, str) and cell and "cell" not in shown:
                shown["cell"] = cell
            text = format_provenance(shown)
            return text[:160]
        return str(parsed)[:120]
    where = relative_path(notebook, base)
    if isinstance(cell, str) and cell:
        where = f"{where} · {cell}" if where else cell
    return where or worker(host, pid)


def _truthy(value: Any) -> bool:
    return not missing(value) and bool(value)


def _lease(expires: Any, now: float) -> str:
    if missing(expires):
        return ""
    if float(expires) > now:
        return f"expires {fmt_age(expires, now)}"
    return f"expired {fmt_age(expires, now)} (stale)"
