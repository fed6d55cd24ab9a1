"""Task output is line-atomic (runners/output.py): concurrent runs that print piece by piece
leave whole lines in a kernel's stream, and the part after a run's last line break is
written in one piece when the run ends. The kernel itself is in test_worker_kernel.py;
here a stand-in for ipykernel's stream records every write."""

from __future__ import annotations

import re
import sys
import threading
import time

import pytest

from notebook_flow.runners import output
from notebook_flow.runners.output import task_output


class Recorder:
    """Records each write, like ipykernel's OutStream appends to its buffer."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


class FakeOutStream(Recorder):
    """A kernel's stream, as task_output recognises one."""


FakeOutStream.__module__ = "ipykernel.iostream"


class TerminalStream(Recorder):
    """Any other stream."""


def printing_run(i: int, barrier: threading.Barrier) -> None:
    with task_output():
        barrier.wait()
        for j in range(20):
            sys.stdout.write(f"task {i} ")
            time.sleep(0.0005)
            print("line", j)
        sys.stdout.write(f"tail of {i}")  # no line break: written when the run ends


def test_concurrent_runs_write_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = FakeOutStream()
    monkeypatch.setattr(sys, "stdout", stream)
    barrier = threading.Barrier(6)
    threads = [threading.Thread(target=printing_run, args=(i, barrier)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every write the stream got is whole lines of one run, or one run's tail.
    for text in stream.writes:
        assert re.fullmatch(r"(task (\d) line \d+\n)+|tail of \d", text), text
        assert len(set(re.findall(r"task (\d)", text))) <= 1, text
    joined = "".join(stream.writes)
    for i in range(6):
        assert [int(j) for j in re.findall(rf"task {i} line (\d+)", joined)] == list(range(20))
        assert joined.count(f"tail of {i}") == 1
        # the tail comes after the run's last line
        assert joined.index(f"tail of {i}") > joined.index(f"task {i} line 19")
    assert isinstance(sys.stdout, FakeOutStream)  # still the same object and class family
    # Outside a run, writes go through as they come.
    stream.writes.clear()
    sys.stdout.write("cell ")
    sys.stdout.write("output")
    assert stream.writes == ["cell ", "output"]


def test_carriage_returns_and_long_lines_are_not_held_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = FakeOutStream()
    monkeypatch.setattr(sys, "stdout", stream)
    with task_output():
        sys.stdout.write("progress 10%\r")
        assert stream.writes == ["progress 10%\r"]  # a progress bar still moves
        sys.stdout.write("x" * (output.MAX_HELD + 1))
        assert len(stream.writes) == 2  # past MAX_HELD a line without a break goes out
        sys.stdout.write("partial")
        assert len(stream.writes) == 2
    assert stream.writes[-1] == "partial"


def test_other_streams_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = TerminalStream()
    monkeypatch.setattr(sys, "stdout", stream)
    with task_output():
        sys.stdout.write("not ")
        sys.stdout.write("held\n")
    assert type(stream) is TerminalStream
    assert stream.writes == ["not ", "held\n"]


def ipython_tee(stream: Recorder, seen: list[str]):
    """What IPython 9 does around every cell: shadow ``write`` on the instance, then set
    the saved value back (the saved bound method stays on the instance)."""
    original = stream.write

    def write(text: str) -> int:
        seen.append(text)
        return original(text)

    stream.write = write  # type: ignore[method-assign]
    return lambda: setattr(stream, "write", original)


def test_tees_set_on_the_instance_see_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    from notebook_flow.cells.capture import _patch_instance

    stream = FakeOutStream()
    monkeypatch.setattr(sys, "stdout", stream)
    history: list[str] = []
    end_first_cell = ipython_tee(stream, history)  # before any task ran: pins `write`
    end_first_cell()
    history.clear()

    end_cell = ipython_tee(stream, history)
    captured: list[str] = []
    below = stream.write

    def capture(text: str) -> int:  # as the %%task capture tees: record, pass on
        captured.append(text)
        return below(text)

    undo: list = []
    assert _patch_instance(stream, "write", capture, undo)
    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=printing_run, args=(i, barrier)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for restore in reversed(undo):
        restore()
    end_cell()
    expected = sorted(
        [f"task {i} line {j}\n" for i in range(4) for j in range(20)]
        + [f"tail of {i}" for i in range(4)]
    )
    # The capture on top, IPython's history below it and the stream itself: whole lines.
    for seen in (captured, history, stream.writes):
        for text in seen:
            assert re.fullmatch(r"(task (\d) line \d+\n)+|tail of \d", text), text
        assert sorted(re.findall(r"task \d line \d+\n|tail of \d", "".join(seen))) == expected
    # Setting the saved writes back did not stack routing layers: a plain write is one call.
    stream.writes.clear()
    history.clear()
    sys.stdout.write("after")
    assert stream.writes == ["after"] and history == []
