"""Who draws the inline dashboard's refresh: the refresher thread while a cell runs, the
kernel's event loop while it is idle, and never an older read over a newer one.

The kernel's parts are real: an IPython shell whose ``run_cell`` fires the cell hooks, and
a tornado loop on its own thread standing for the kernel's main loop. What the view looks
like in a browser while a cell runs is tested in ``test_dashboard_lab.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from notebook_flow import config, task

pytestmark = [
    # Bokeh 3.9's ColumnDataSource.from_df calls reset_index(inplace=True), which pandas 3.1
    # deprecates; not ours to fix.
    pytest.mark.filterwarnings(
        "ignore:The inplace keyword in DataFrame.reset_index:DeprecationWarning"
    ),
]


@pytest.fixture
def loop() -> Iterator[Any]:
    """A tornado IOLoop running on its own thread (the kernel's main loop)."""
    from tornado.ioloop import IOLoop

    ready = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        import asyncio

        asyncio.set_event_loop(asyncio.new_event_loop())
        holder["loop"] = IOLoop.current()
        holder["thread"] = threading.current_thread()
        ready.set()
        holder["loop"].start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield holder["loop"]
    holder["loop"].add_callback(holder["loop"].stop)
    thread.join(30)


@pytest.fixture
def view(shell: Any, loop: Any) -> Iterator[Any]:
    """An inline dashboard over a store with 3 runs, wired to ``shell`` and ``loop`` as
    ``%flow dashboard`` wires it to its kernel, with every draw recorded."""
    from notebook_flow.dashboard import InlineDashboard

    @task(name="inline_square")
    def square(x: int) -> int:
        return x * x

    for i in (1, 2, 2):
        square(i)
    config.get_metadata(config.get_store()).flush(60)
    view = InlineDashboard(refresh_seconds=0)
    view._loop, view._shell = loop, shell
    view._hook()
    assert view._cell_running  # no kernel to ask: hooked by the user's code, in a cell
    view._cell_running = False  # the cell that built it has ended
    view.draws = []  # (thread, runs shown)
    show = view.dashboard._show

    def recorded(tab: Any, data: Any) -> None:
        view.draws.append((threading.current_thread(), data.totals["runs"]))
        gate = getattr(view, "gate", None)
        if gate is not None:
            gate.wait(30)
        show(tab, data)

    view.dashboard._show = recorded
    yield view
    view.stop()


def _on_loop(loop: Any, fn: Any) -> Any:
    """Run ``fn`` on the loop's thread and return its result."""
    done = threading.Event()
    out: dict[str, Any] = {}

    def call() -> None:
        out["value"] = fn()
        done.set()

    loop.add_callback(call)
    assert done.wait(30)
    return out.get("value")


def test_idle_kernel_draws_on_its_loop(view: Any, loop: Any) -> None:
    view.tick()
    _on_loop(loop, lambda: None)  # the draw was queued before this
    ((thread, runs),) = view.draws
    assert thread is not threading.current_thread() and runs == 3
    assert view.dashboard.overview.totals["runs"] == 3


def test_a_running_cell_is_drawn_by_the_refresher_and_its_end_waits_for_the_draw(
    view: Any, shell: Any
) -> None:
    # The cell asks the refresher to tick from another thread while the cell runs; the
    # cell's end (post_run_cell) then has to wait for the draw the refresher is making.
    view.gate = threading.Event()
    shell.user_ns["_view"] = view
    ticker: dict[str, Any] = {}
    shell.user_ns["_ticker"] = ticker
    code = (
        "import threading\n"
        "_t = threading.Thread(target=_view.tick, daemon=True)\n"
        "_t.start()\n"
        "_ticker['thread'] = _t\n"
        "import time\n"
        "_deadline = time.monotonic() + 60\n"
        "while not _view.draws and time.monotonic() < _deadline:\n"
        "    time.sleep(0.01)\n"
        "_ticker['cell_done'] = True\n"
    )
    ran = threading.Thread(target=shell.run_cell, args=(code,), daemon=True)
    ran.start()
    deadline = time.monotonic() + 60
    while "cell_done" not in ticker and time.monotonic() < deadline:
        time.sleep(0.01)
    # The draw started on the refresher's thread while the cell ran, and holds the cell's
    # end until it is complete.
    assert view.draws and view.draws[0][0] is ticker["thread"]
    ran.join(1)
    assert ran.is_alive() and view._cell_running, "the cell's end did not wait for the draw"
    view.gate.set()
    ran.join(30)
    assert not ran.is_alive() and not view._cell_running


def test_a_stale_draw_queued_on_a_busy_loop_never_covers_a_newer_one(view: Any, loop: Any) -> None:
    blocked, release = threading.Event(), threading.Event()

    def busy() -> None:  # the loop handles a long browser event
        blocked.set()
        release.wait(30)

    loop.add_callback(busy)
    assert blocked.wait(30)
    view.tick()  # idle kernel: handed to the (busy) loop
    assert view._pending.is_set() and not view.draws
    view.tick()  # still waiting: skipped, not queued twice
    assert view._read_seq == 1

    @task(name="inline_square")
    def square(x: int) -> int:
        return x * x

    square(5)
    config.get_metadata(config.get_store()).flush(60)
    view._cell_started()  # a cell starts: the refresher draws the newer read itself
    view.tick()
    assert [runs for _, runs in view.draws] == [4]
    release.set()
    _on_loop(loop, lambda: None)
    assert [runs for _, runs in view.draws] == [4]  # the older read (3) was dropped
    assert not view._pending.is_set()
    assert view.dashboard.overview.totals["runs"] == 4


def _browser_msg(*events: tuple[str, str]) -> dict[str, Any]:
    """A PATCH-DOC message from the page, as Panel's comm hands it to the kernel."""
    return {
        "header": {"msgtype": "PATCH-DOC"},
        "metadata": {},
        "content": {
            "events": [
                {"kind": "ModelChanged", "model": {"id": f"p{i}"}, "attr": attr, "new": new}
                for i, (attr, new) in enumerate(events)
            ]
        },
        "_buffers": {},
    }


@pytest.fixture
def applied(view: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], bool]]:
    """What reaches Panel's handler of the layout's messages: (attributes, draw lock held)."""
    seen: list[tuple[list[str], bool]] = []

    def on_msg(layout: Any, ref: str, manager: Any, msg: dict[str, Any]) -> None:
        attrs = [e["attr"] for e in msg["content"]["events"]]
        seen.append((attrs, view._draw_lock._is_owned()))

    monkeypatch.setattr(type(view.layout), "_on_msg", on_msg)
    return seen


def _wait_for(condition: Any, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def test_the_pages_echo_of_a_draw_never_reaches_the_document(view: Any, applied: Any) -> None:
    # Panel's page sends back every change the kernel made: rows, cell styles, HTML.
    echo = _browser_msg(("data", {}), ("cell_styles", {}), ("text", "<b>3</b>"))
    view.layout._on_msg("ref", None, echo)
    # What a person does still goes through (a tab, a filter), without the echo beside it.
    view.layout._on_msg("ref", None, _browser_msg(("data", {}), ("active", 1), ("value", "x")))
    assert _wait_for(lambda: applied)
    assert applied == [(["active", "value"], True)]


def test_a_browser_message_waits_for_a_draw_in_progress(view: Any, applied: Any) -> None:
    # ipykernel 7 hands JupyterLab's comm messages to a subshell thread, which runs beside
    # a cell and the refresher: a click must not be applied in the middle of a draw, and
    # the comm's handler must not wait for it either (the comm swaps sys.stdout meanwhile).
    view._cell_started()
    view.gate = threading.Event()
    drawing = threading.Thread(target=view.tick, daemon=True)
    drawing.start()
    assert _wait_for(lambda: view.draws), "the refresher did not start drawing"
    click = threading.Thread(
        target=view.layout._on_msg, args=("ref", None, _browser_msg(("active", 2))), daemon=True
    )
    click.start()
    click.join(30)
    assert not click.is_alive(), "the comm's handler waited for the draw"
    view.layout._on_msg("ref", None, _browser_msg(("value", "square")))
    time.sleep(0.3)
    assert applied == [], "a click was applied during the draw"
    view.gate.set()
    drawing.join(30)
    assert _wait_for(lambda: len(applied) == 2)
    assert applied == [(["active"], True), (["value"], True)]  # in the order they came
