"""The dashboard's tabs that change the store: cache (invalidate) and locks (break).

Both ask first (an inline confirmation bar) and say what happened afterwards.
"""

from __future__ import annotations

# Panel's widget and layout constructors take **params and are untyped.
# mypy: disable-error-code="no-untyped-call"
import logging
import time
from typing import Any

import panel as pn  # noqa: TID253 - the dashboard package is imported only when used
from panel.io import hold  # noqa: TID253

from .queries import Page, Source
from .widgets import (
    ALL,
    Confirm,
    Pager,
    View,
    empty_frame,
    fmt_age,
    fmt_bytes,
    fmt_seconds,
    fmt_time,
    frame,
    html,
    missing,
    note,
    table,
)

__all__ = ["CacheView", "LocksView"]

logger = logging.getLogger("notebook_flow")

# -- cache ---------------------------------------------------------------------------------


class CacheView(View):
    """Stored results with size, age and expiry; invalidate one entry or a whole task."""

    title = "Cache"
    columns = ["Task", "Key", "Size", "Created", "Age", "Expires", "Compute time", "Format"]

    def __init__(self, source: Source, page_size: int = 50) -> None:
        super().__init__(source)
        self.page: Page | None = None
        self.keys: list[str] = []
        self.task = pn.widgets.Select(label="Task", options=[ALL], value=ALL, width=200)
        self.task.param.watch(self._task_changed, "value")
        self.pager = Pager(self.load_page, page_size, "entries")
        self.table = table(value=empty_frame(self.columns), selectable=1, max_height=600)
        self.table.param.watch(self._selection_changed, "selection")
        self.delete_entry = pn.widgets.Button(
            label="Invalidate entry", color="warning", disabled=True
        )
        self.delete_task = pn.widgets.Button(
            label="Invalidate task", color="warning", disabled=True
        )
        self.delete_entry.on_click(self._ask_entry)
        self.delete_task.on_click(self._ask_task)
        self.confirm = Confirm()
        self.message = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            pn.Row(
                self.task,
                pn.Column(pn.Spacer(height=18), pn.Row(self.delete_entry, self.delete_task)),
            ),
            self.confirm.panel,
            self.message,
            self.pager.panel,
            self.table,
            sizing_mode="stretch_width",
        )

    def load(self) -> dict[str, Any]:
        task = None if self.task.value == ALL else self.task.value
        return {
            "tasks": self.source.cache_tasks(),
            "page": self.source.cache_page(
                task, page=self.pager.page, page_size=self.pager.page_size
            ),
        }

    def render(self, data: dict[str, Any]) -> None:
        self.task.options = [ALL, *data["tasks"]]
        self.show_page(data["page"])

    def load_page(self) -> None:
        task = None if self.task.value == ALL else self.task.value
        with hold():
            self.show_page(
                self.source.cache_page(task, page=self.pager.page, page_size=self.pager.page_size)
            )

    def show_page(self, page: Page) -> None:
        self.page = page
        self.pager.show(page)
        df = page.rows
        selected = self.selected_key()
        self.keys = [str(k) for k in df["key"]]
        now = time.time()
        self.table.value = frame(
            {
                "Task": df["task"].tolist(),
                "Key": self.keys,
                "Size": [fmt_bytes(s) for s in df["size"]],
                "Created": [fmt_time(c) for c in df["created_at"]],
                "Age": [fmt_seconds(now - c) for c in df["created_at"]],
                "Expires": [
                    "never" if missing(x) else ("expired" if x <= now else fmt_age(x, now))
                    for x in df["expires_at"]
                ],
                "Compute time": [fmt_seconds(d) for d in df["duration"]],
                "Format": df["serializer"].tolist(),
            },
            self.columns,
        )
        self.table.selection = [self.keys.index(selected)] if selected in self.keys else []
        self.delete_task.disabled = self.task.value == ALL

    def selected_key(self) -> str | None:
        sel = self.table.selection
        return self.keys[sel[0]] if sel and sel[0] < len(self.keys) else None

    def _task_changed(self, _: object) -> None:
        self.pager.page = 0
        self.confirm.cancel()
        self.load_page()

    def _selection_changed(self, _: object) -> None:
        self.delete_entry.disabled = self.selected_key() is None

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

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.rows: list[tuple[str, str | None]] = []  # (key, manager)
        self.table = table(value=empty_frame(self.columns), selectable=1, max_height=300)
        self.table.param.watch(self._selection_changed, "selection")
        self.waits = table(
            value=empty_frame(["When", "Key", "Task", "Waited", "Holder"]), max_height=300
        )
        self.break_button = pn.widgets.Button(label="Break lock", color="danger", disabled=True)
        self.break_button.on_click(self._ask)
        self.confirm = Confirm()
        self.message = html("", sizing_mode="stretch_width")
        self.held_note = html("", sizing_mode="stretch_width")
        self.waits_note = html("", sizing_mode="stretch_width")
        self.panel = pn.Column(
            html("<h3>Held now</h3>", margin=(0, 10)),
            self.held_note,
            self.table,
            pn.Row(self.break_button),
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
        self.held_note.object = "" if self.rows else note("No lock is held right now.")
        waits = data["waits"]
        self.waits_note.object = "" if len(waits) else note("No run has waited for a lock yet.")
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


def _lease(expires: Any, now: float) -> str:
    if missing(expires):
        return ""
    if float(expires) > now:
        return f"expires {fmt_age(expires, now)}"
    return f"expired {fmt_age(expires, now)} (stale)"
