"""Lineage fingerprints: values with no content fingerprint, known by the key that made them."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest

from notebook_flow import task
from notebook_flow.errors import UnhashableError, UnhashableInputError
from notebook_flow.hashing import fingerprint, lineage

KEY = "ab" * 16


class Handle:
    """Data plus a lock: no content fingerprint (the lock), but a value all the same."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.lock = threading.Lock()


class Blob:
    """Picklable, but with a part the walk refuses (an iterator over a list)."""

    def __init__(self, values: list[int]) -> None:
        self.values = values
        self.cursor = iter(values)


@pytest.fixture(autouse=True)
def _clean_registry() -> Any:
    lineage._reset_for_tests()
    yield
    lineage._reset_for_tests()


def test_unhashable_value_is_fingerprinted_by_its_lineage() -> None:
    h = Handle([1, 2, 3])
    with pytest.raises(UnhashableError):
        fingerprint(h)
    assert lineage.record(KEY, "h", h)
    assert fingerprint(h) == fingerprint(h)
    assert lineage.lineage_of(h) == f"{KEY}:h"
    # Another name or key is another fingerprint.
    other = Handle([1, 2, 3])
    lineage.record(KEY, "other", other)
    assert fingerprint(other) != fingerprint(h)


def test_lineage_fingerprint_is_the_same_in_another_process() -> None:
    h = Handle({"a": np.arange(5000.0)})  # big enough to go past the staging buffer
    lineage.record(KEY, "h", h)
    here = fingerprint([np.arange(3000.0), h, "tail"])
    code = (
        "import numpy as np, threading\n"
        "from notebook_flow.hashing import fingerprint, lineage\n"
        "class Handle:\n"
        "    def __init__(self, data):\n"
        "        self.data = data; self.lock = threading.Lock()\n"
        "h = Handle({'a': np.arange(5000.0)})\n"
        f"lineage.record({KEY!r}, 'h', h)\n"
        "print(fingerprint([np.arange(3000.0), h, 'tail']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == here


def test_undone_walk_leaves_the_surrounding_stream_intact() -> None:
    # The lineage object is walked (writing big buffers) before its lock fails the walk:
    # the bytes it wrote must vanish, whatever sits before and after it.
    h = Handle(np.arange(10000.0))
    lineage.record(KEY, "h", h)
    base = fingerprint([np.arange(3000.0), h, np.arange(7000.0)])
    h2 = Handle(np.zeros(3))  # same token, other content: lineage alone decides
    lineage.record(KEY, "h", h2)
    assert fingerprint([np.arange(3000.0), h2, np.arange(7000.0)]) == base
    assert fingerprint([np.arange(3001.0), h2, np.arange(7000.0)]) != base
    assert fingerprint([np.arange(3000.0), h2, np.arange(7001.0)]) != base


def test_change_after_recording_drops_the_lineage() -> None:
    h = Handle({"a": [1, 2]})
    lineage.record(KEY, "h", h)
    fingerprint(h)
    h.data["a"].append(3)  # in place, deep inside
    with pytest.raises(UnhashableError):
        fingerprint(h)
    h.data["a"].pop()  # back to the recorded state: the lineage is gone for good
    with pytest.raises(UnhashableError):
        fingerprint(h)


def test_rebinding_an_opaque_part_drops_the_lineage() -> None:
    h = Handle(1)
    lineage.record(KEY, "h", h)
    h.lock = threading.Lock()
    with pytest.raises(UnhashableError):
        fingerprint(h)


def test_opaque_part_changed_in_its_pickled_state_drops_the_lineage() -> None:
    b = Blob([1, 2, 3])
    lineage.record(KEY, "b", b)
    fingerprint(b)
    next(b.cursor)  # the iterator's position is in its pickled state
    with pytest.raises(UnhashableError):
        fingerprint(b)


def test_content_hashable_values_are_not_recorded() -> None:
    assert not lineage.record(KEY, "x", {"a": [1, 2]})
    assert not lineage.record(KEY, "arr", np.arange(3))
    assert not lineage.active()


def test_collected_object_leaves_no_entry_and_no_alias() -> None:
    h = Handle(1)
    lineage.record(KEY, "h", h)
    ident = id(h)
    del h
    gc.collect()
    assert not lineage.active()
    # Whatever object now gets that id has no lineage.
    for _ in range(1000):
        fresh = Handle(2)
        if id(fresh) == ident:
            break
    with pytest.raises(UnhashableError):
        fingerprint(fresh)


def test_object_without_weakref_support_is_held_and_checked() -> None:
    box = [Handle(1)]  # a list takes no weak reference: the entry holds it
    lineage.record(KEY, "box", box)
    assert fingerprint(box) == fingerprint(box)
    box.append(2)
    with pytest.raises(UnhashableError):
        fingerprint(box)


def test_items_of_a_recorded_tuple_keep_lineage_when_unpacked() -> None:
    pair = (Handle(1), 5)
    lineage.record_outputs(KEY, [("return", pair)])
    first, _ = pair
    assert lineage.lineage_of(first) == f"{KEY}:return[0]"


def test_forget_drops_the_entry() -> None:
    h = Handle(1)
    lineage.record(KEY, "h", h)
    lineage.forget(h)
    with pytest.raises(UnhashableError):
        fingerprint(h)


class Opaque:
    """Content hashes, but (say) not stably: registered lineage-only below."""

    def __init__(self) -> None:
        self.x = 1


def test_lineage_only_class() -> None:
    lineage.register_lineage_only(Opaque)
    try:
        o = Opaque()
        with pytest.raises(UnhashableError, match="lineage-only"):
            fingerprint(o)
        assert lineage.record(KEY, "o", o)
        assert lineage.lineage_of(o) == f"{KEY}:o"
        fingerprint(o)
    finally:
        lineage._lineage_only.discard(Opaque)
        from notebook_flow.hashing.core import _RESOLVED

        _RESOLVED.clear()


# --------------------------------------------------------------------------- tasks


calls: list[str] = []


class Calls(list):
    def __notebook_flow_fingerprint__(self) -> str:
        return "calls"


tcalls = Calls()


@task
def make_handle(n: int) -> Blob:
    tcalls.append("make")
    return Blob(list(range(n)))


@task
def total(b: Blob) -> int:
    tcalls.append("total")
    return sum(b.values)


def test_task_result_without_content_fingerprint_keys_the_next_task() -> None:
    tcalls.clear()
    b = make_handle(4)
    assert total(b) == 6
    assert total(b) == 6  # hit: keyed by make_handle's key
    assert tcalls == ["make", "total"]
    lineage._reset_for_tests()  # a new process: the hit restores it and records it again
    b2 = make_handle(4)
    assert total(b2) == 6
    assert tcalls == ["make", "total"]
    next(b2.cursor)  # changed since: not what make_handle produced any more
    with pytest.raises(UnhashableInputError):
        total(b2)
    # The producer's entry is gone and it runs again: its new result (which a
    # nondeterministic producer could make differently) does not inherit the old one's
    # dependants.
    from notebook_flow.config import get_store

    assert get_store().clear() > 0
    lineage._reset_for_tests()
    tcalls.clear()
    assert total(make_handle(4)) == 6
    assert tcalls == ["make", "total"]


# --------------------------------------------------------------------------- cells


def _run(sh: Any, code: str) -> None:
    result = sh.run_cell(code)
    if result.error_before_exec or result.error_in_exec:
        raise AssertionError(f"cell failed: {result.error_before_exec or result.error_in_exec!r}")


def _status(sh: Any) -> str:
    return str(sh.magics_manager.registry["FlowMagics"].runner.last.status)


def test_cell_reading_a_statsmodels_state_space_result_is_cached(shell: Any) -> None:
    pytest.importorskip("statsmodels")
    fit = (
        "%%task\n"
        "import numpy as np\n"
        "from statsmodels.tsa.statespace.sarimax import SARIMAX\n"
        "res = SARIMAX(np.sin(np.arange(60) / 4.0), order=(1, 0, 0)).fit(disp=False)\n"
    )
    use = "%%task\naic = round(float(res.aic), 6)\n"
    _run(shell, fit)
    _run(shell, use)
    assert _status(shell) == "computed"
    first = shell.user_ns["aic"]
    # As after a restart: an empty namespace, no lineage; the store has both cells.
    shell.reset(new_session=False)
    lineage._reset_for_tests()
    _run(shell, fit)
    assert _status(shell) == "cached"
    _run(shell, use)
    assert _status(shell) == "cached"
    assert shell.user_ns["aic"] == first
    # A plain cell changing the result: the next read is not served from the cache.
    _run(shell, "res.model.endog[0, 0] += 1.0")
    _run(shell, use)
    assert _status(shell) == "uncached"
