"""Runs pages read again with a bound on ``created`` (``Source._read_runs``) are the rows an
unbounded read returns: with ties on ``created``, runs added since, and runs gone since."""

from __future__ import annotations

import random
import time

import pytest

from notebook_flow import config
from notebook_flow.dashboard.queries import RunFilters, Source
from notebook_flow.metadata import RunEvent
from notebook_flow.states import RunState

N = 420
PAGE = 50


def _record(first: int, n: int, at: float) -> None:
    """``n`` runs; three share each creation time (ties the bound must keep)."""
    meta = config.get_metadata(config.get_store())
    rng = random.Random(first)
    for i in range(first, first + n):
        state = RunState.CACHED if i % 3 else RunState.COMPLETED
        meta.record_run(
            RunEvent(
                f"{i:032x}", f"task_{i % 2}", f"t:task_{i % 2}", f"{i:032x}", state,
                at + (i // 3), duration=rng.random(), host="h", pid=1, kernel="k",
            )
        )  # fmt: skip
    meta.flush(60)


def _ids(page) -> list[str]:  # type: ignore[no-untyped-def]
    return list(page.window["run_id"])


@pytest.fixture
def runs() -> float:
    at = time.time() - 10 * N
    _record(0, N, at)
    return at


@pytest.mark.parametrize("sort", ["newest", "oldest", "slowest"])
@pytest.mark.parametrize("task", [None, "task_1"])
def test_a_bounded_read_returns_the_rows_of_an_unbounded_one(runs: float, sort, task) -> None:
    filters = RunFilters(task=task)
    warm = Source(in_memory=False)
    for page in (0, 3, 8, 1, 0):  # each window once unbounded, then again bounded
        for _ in range(2):
            got = warm.runs_page(filters, page=page, page_size=PAGE, sort=sort, ahead=2, behind=1)
            fresh = Source(in_memory=False).runs_page(
                filters, page=page, page_size=PAGE, sort=sort, ahead=2, behind=1
            )
            assert _ids(got) == _ids(fresh) and got.total == fresh.total
    assert bool(warm._bounds) == (sort != "slowest")  # "slowest" starts on duration


def test_new_runs_and_removed_runs_after_a_bounded_read(runs: float) -> None:
    source = Source(in_memory=False)
    filters = RunFilters()
    first = source.runs_page(filters, page=0, page_size=PAGE, ahead=1)
    assert source._bounds
    _record(N, 7, time.time())  # newer runs: at the top of "newest"
    again = source.runs_page(filters, page=0, page_size=PAGE, ahead=1)
    assert _ids(again) == _ids(
        Source(in_memory=False).runs_page(filters, page=0, page_size=PAGE, ahead=1)
    )
    assert again.total == first.total + 7 and _ids(again)[7:] == _ids(first)[:-7]

    # Runs gone since the bound was taken: fewer rows than asked lie beyond it, so the
    # read is made again unbounded. (Stands for a clean-up of the index: the bound is
    # moved past rows that exist.)
    memo = next(iter(source._bounds))
    source._bounds[memo] = source._bounds[memo] + 30
    again = source.runs_page(filters, page=0, page_size=PAGE, ahead=1)
    assert _ids(again) == _ids(
        Source(in_memory=False).runs_page(filters, page=0, page_size=PAGE, ahead=1)
    )
    assert len(again.window) == 2 * PAGE
