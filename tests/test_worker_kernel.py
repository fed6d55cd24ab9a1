"""The embedded worker in a real ipykernel, driven through jupyter_client: live status
messages, prints routed to the submitting cell, interrupts, and SIGKILL in the middle of a
map (re-run the cell, or resume() without re-running it). Executions are counted with
O_EXCL marker files; nothing here asserts a duration."""

from __future__ import annotations

import os
import queue
import re
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import _kernels
import pytest
from _marks import MARK, count_marks, wait_for

pytestmark = pytest.mark.kernel

pytest.importorskip("jupyter_client")

# numpy / pandas are imported up front: hashing and serializers read sys.modules and can
# see a half-imported module while another thread (DuckDB's startup chore) imports it.
HELPERS = (
    textwrap.dedent(
        """
        import os, time
        import numpy, pandas
        import notebook_flow as nf
        """
    )
    + MARK
    + textwrap.dedent(
        """
        def gate_open():
            return os.path.exists(os.environ["GATE"])
        """
    )
)

WORK_CELL = textwrap.dedent(
    """
    @nf.task
    def work(i):
        mark(f"work-{i}")
        if os.environ.get("BLOCK") and i >= 30:
            while True:
                time.sleep(0.05)
        return i * 2

    futs = work.map(range(100))
    """
)


class Kernel(_kernels.Kernel):
    """A kernel and its client; ``run`` executes a cell and returns its iopub messages."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        super().__init__(env, cwd, ready_timeout=120)
        self.extra: list[dict[str, Any]] = []  # iopub messages seen outside run()

    def run(self, code: str, timeout: float = 120, allow_error: bool = False) -> tuple[str, list]:
        msg_id = self.kc.execute(code)
        msgs = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
            if msg["parent_header"].get("msg_id") != msg_id:
                self.extra.append(msg)
                continue
            msgs.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = self.reply(msg_id, timeout)
        if not allow_error:
            errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
            assert reply["content"]["status"] == "ok", errors
        return msg_id, msgs

    def reply(self, msg_id: str, timeout: float = 120) -> dict[str, Any]:
        """The shell reply to request ``msg_id``, skipping replies to other requests.

        The shell channel can hold replies nobody waits for: on a loaded machine
        ``wait_for_ready`` sends a ``kernel_info_request`` every second until one is
        answered, and the answers to the others arrive later. Taking the next reply
        whatever it answers shifts every later one by a request (the flake of issue 14:
        a cell's reply was its predecessor's).
        """
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.1))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def drain(self, until, timeout: float = 120) -> list[dict[str, Any]]:
        """Collect iopub messages until ``until(msg)`` is true for one (maybe seen already)."""
        if any(until(m) for m in self.extra):
            return self.extra
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                seen = [
                    (m["msg_type"], m["content"].get("data", {}).get("text/plain"))
                    for m in self.extra[-8:]
                ]
                raise AssertionError(
                    f"the expected iopub message never came; last: {seen}"
                ) from None
            self.extra.append(msg)
            if until(msg):
                return self.extra

    def kill(self) -> None:
        self.km.signal_kernel(signal.SIGKILL)
        wait_for(lambda: not self.km.is_alive(), "the kernel to die", timeout=120)


def _value(msgs: list) -> str:
    [result] = [m for m in msgs if m["msg_type"] == "execute_result"]
    return result["content"]["data"]["text/plain"]


@pytest.fixture
def kernel_env(python_env, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(python_env, MARKS=str(marks), GATE=str(tmp_path / "gate"), NOTEBOOK_FLOW_WORKERS="4")
    env.pop("BLOCK", None)
    return env


def test_status_display_prints_and_interrupts(kernel_env, tmp_path):
    k = Kernel(kernel_env, tmp_path)
    try:
        k.run(HELPERS)
        submit_id, msgs = k.run(
            textwrap.dedent(
                """
                from notebook_flow.cache_policies import NONE

                @nf.task(cache_policy=NONE)
                def slow(i):
                    while not gate_open():
                        time.sleep(0.01)
                    print(f"task-print-{i}\\n", end="")  # one write: lines from threads stay whole
                    mark(f"slow-{i}")
                    return i

                futs = slow.map(range(50))
                futs
                """
            )
        )
        # The cell is done while every task still waits for the gate: none has finished.
        assert not (tmp_path / "gate").exists() and not list((tmp_path / "marks").iterdir())
        [shown] = [m for m in msgs if m["msg_type"] == "display_data"]
        display_id = shown["content"]["transient"]["display_id"]
        assert 'class="notebook-flow-map"' in shown["content"]["data"]["text/html"]
        assert "0/50 done" in shown["content"]["data"]["text/plain"]

        waiter_id, msgs = k.run("open(os.environ['GATE'], 'w').close()\nsum(futs.result())")
        assert _value(msgs) == str(sum(range(50)))

        def prints() -> list[dict[str, Any]]:
            return [
                m
                for m in msgs + k.extra
                if m["msg_type"] == "stream" and "task-print-" in m["content"]["text"]
            ]

        def printed() -> list[str]:
            return sorted(
                re.findall(r"task-print-\d+", "".join(m["content"]["text"] for m in prints()))
            )

        def finished(m: dict[str, Any]) -> bool:
            final = any(
                x["msg_type"] == "update_display_data"
                and "50/50 done" in x["content"]["data"]["text/plain"]
                for x in k.extra
            )
            return final and len(printed()) == 50

        k.drain(finished)
        updates = [m for m in k.extra if m["msg_type"] == "update_display_data"]
        assert all(m["content"]["transient"]["display_id"] == display_id for m in updates)
        # Every print of a task lands in the cell that submitted it, not the one running.
        assert printed() == sorted(f"task-print-{i}" for i in range(50))
        assert {m["parent_header"]["msg_id"] for m in prints()} == {submit_id}

        # One future shown: a live line that ends completed.
        _, msgs = k.run("one = slow.submit(99)\none")
        [line] = [m for m in msgs if m["msg_type"] == "display_data"]
        k.extra.extend(msgs)  # an update may come before the cell's idle status
        k.drain(
            lambda m: (
                m["msg_type"] in ("display_data", "update_display_data")
                and m["content"]["transient"]["display_id"]
                == line["content"]["transient"]["display_id"]
                and "completed" in m["content"]["data"]["text/plain"]
            )
        )

        # An interrupt stops the waiting cell, not the worker; the result is not lost.
        os.unlink(tmp_path / "gate")
        k.run("held = slow.submit(100)")
        # The cell says when it is about to wait, and only then comes the interrupt: sent
        # at its execute_input, it could land in the submit (no `held`) or in IPython's
        # code around the cell (ipykernel then sends no reply at all).
        waiting = k.kc.execute("print('waiting', flush=True)\nheld.result()")
        k.drain(lambda m: _of(m, waiting, "stream") and "waiting" in m["content"]["text"])
        k.km.interrupt_kernel()
        k.drain(lambda m: _of(m, waiting, "error") and m["content"]["ename"] == "KeyboardInterrupt")
        assert k.reply(waiting)["content"]["ename"] == "KeyboardInterrupt"
        # After an error, ipykernel aborts the execute requests queued behind it until it
        # reaches its "stop aborting" marker; it is past it once the cell's idle status is
        # out. A cell sent earlier could be answered "aborted".
        k.drain(lambda m: _of(m, waiting, "status") and m["content"]["execution_state"] == "idle")
        _, msgs = k.run("open(os.environ['GATE'], 'w').close()\nheld.result(timeout=60)")
        assert _value(msgs) == "100"
    finally:
        k.close()


def _of(msg: dict[str, Any], msg_id: str, msg_type: str) -> bool:
    """Whether ``msg`` is a ``msg_type`` message of the request ``msg_id``."""
    return msg["msg_type"] == msg_type and msg["parent_header"].get("msg_id") == msg_id


def test_concurrent_task_prints_reach_the_cell_whole(kernel_env, tmp_path):
    """Four workers print piece by piece at once: the cell gets whole lines (issue 14:
    ``'working onworking on 10\\n'`` then ``' 7\\n'``)."""
    k = Kernel(kernel_env, tmp_path)
    try:
        k.run(HELPERS)
        cell, msgs = k.run(
            textwrap.dedent(
                """
                import sys
                from notebook_flow.cache_policies import NONE

                @nf.task(cache_policy=NONE)
                def chatty(i):
                    for j in range(15):
                        sys.stdout.write(f"task {i} ")
                        time.sleep(0.001)
                        print("line", j)
                    sys.stdout.write(f"tail of {i}")  # no line break: written at the end
                    return i

                futs = chatty.map(range(8))
                sum(futs.result())
                """
            )
        )
        assert _value(msgs) == str(sum(range(8)))
        text = "".join(
            m["content"]["text"]
            for m in msgs + k.extra
            if _of(m, cell, "stream") and m["content"]["name"] == "stdout"
        )
        # Nothing but whole lines and whole tails, each exactly once.
        assert re.fullmatch(r"(task \d line \d+\n|tail of \d)+", text), text
        for i in range(8):
            assert re.findall(rf"task {i} line (\d+)", text) == [str(j) for j in range(15)]
            assert text.count(f"tail of {i}") == 1
    finally:
        k.close()


def _kill_in_the_middle(kernel_env, tmp_path) -> Path:
    """Run the map of 100 in a kernel and SIGKILL it with runs 30..33 in flight."""
    k = Kernel(dict(kernel_env, BLOCK="1"), tmp_path)
    marks = tmp_path / "marks"
    try:
        k.run(HELPERS)
        k.run(WORK_CELL)
        from notebook_flow import config
        from notebook_flow.runners.resume import read_journal

        wait_for(
            lambda: sum(1 for p in marks.iterdir() if p.name.startswith("work-3")) >= 4,
            "4 blocked runs",
            timeout=120,
        )
        folder = Path(config.get_store().local_dir("journal"))
        pid = k.km.provisioner.process.pid
        [journal] = [p for p in folder.iterdir() if f"_{pid}_" in p.name]
        wait_for(
            lambda: len(read_journal(str(journal)).done) >= 30,
            "30 finished runs journaled",
            timeout=120,
        )
        k.kill()
    finally:
        k.close()
    before = count_marks(marks)
    assert sum(before.values()) == 34 and all(before[f"work-{i}"] == 1 for i in range(34))
    return marks


def test_sigkill_mid_map_then_rerun_the_cell(kernel_env, tmp_path):
    marks = _kill_in_the_middle(kernel_env, tmp_path)
    k = Kernel(kernel_env, tmp_path)
    try:
        k.run(HELPERS)
        k.run(WORK_CELL)
        _, msgs = k.run("r = futs.result(timeout=300); sum(r), futs.counts()['cached']")
        assert _value(msgs) == f"({sum(i * 2 for i in range(100))}, 30)"
    finally:
        k.close()
    after = count_marks(marks)
    assert [after[f"work-{i}"] for i in range(100)] == [
        2 if 30 <= i < 34 else 1 for i in range(100)
    ]


def test_sigkill_mid_map_then_resume_without_rerunning(kernel_env, tmp_path):
    marks = _kill_in_the_middle(kernel_env, tmp_path)
    k = Kernel(kernel_env, tmp_path)
    try:
        k.run("from notebook_flow.runners import resume\nfuts = resume()")
        _, msgs = k.run("r = futs.result(timeout=300); len(r), sum(r), futs.skipped")
        assert _value(msgs) == f"(70, {sum(i * 2 for i in range(30, 100))}, [])"
        # Resumed runs keyed exactly as the cell would: re-running it now is all hits.
        k.run(HELPERS)
        k.run(WORK_CELL)
        _, msgs = k.run("futs.result(timeout=300); futs.counts()['cached']")
        assert _value(msgs) == "100"
    finally:
        k.close()
    after = count_marks(marks)
    assert [after[f"work-{i}"] for i in range(100)] == [
        2 if 30 <= i < 34 else 1 for i in range(100)
    ]
