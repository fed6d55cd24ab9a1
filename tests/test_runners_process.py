"""The process (loky) and Dask runners: the call path runs in other processes against the
same store — a shared local folder, and S3 (moto server) for Dask."""

from __future__ import annotations

import os

import pytest
from conftest_s3 import s3_options, s3_server, unique_s3_url  # noqa: F401

import notebook_flow as nf
from notebook_flow import task
from notebook_flow.cache_policies import INPUTS
from notebook_flow.errors import UpstreamFailedError
from notebook_flow.runners import shutdown
from notebook_flow.states import RunState


@task(cache_policy=INPUTS)
def crunch(x):
    return x * x, os.getpid()


@task(cache_policy=INPUTS)
def plus(pair, n):
    return pair[0] + n


@task(cache_policy=INPUTS)
def fails(x):
    raise ArithmeticError(f"cannot {x}")


@pytest.fixture(autouse=True)
def _shutdown_worker():
    yield
    shutdown(wait=True)


def _check_runs_in_other_processes(runner) -> None:
    with runner:
        futs = crunch.map([1, 2, 3])
        chained = plus.submit(futs[2], 1)  # resolved here, run there
        failed = plus.submit(fails.submit(1), 1)
    assert [value for value, _ in futs.result(timeout=300)] == [1, 4, 9]
    assert {pid for _, pid in futs.result()} - {os.getpid()}, "ran in this process"
    assert all(f.run_state is RunState.COMPLETED for f in futs)
    assert chained.result(timeout=300) == 10
    with pytest.raises(UpstreamFailedError, match="fails"):
        failed.result(timeout=300)
    with pytest.raises(ArithmeticError, match="cannot 1"):
        failed._upstream[0].result()
    # Committed to the same store: the embedded worker here gets cache hits.
    again = crunch.submit(2)
    assert again.result(timeout=60)[0] == 4 and again.run_state is RunState.CACHED
    with runner:  # and so does the pool
        hit = crunch.submit(3)
    assert hit.result(timeout=300)[0] == 9 and hit.run_state is RunState.CACHED


def test_process_runner_with_a_shared_local_store():
    from notebook_flow.runners import ProcessRunner

    runner = ProcessRunner(max_workers=2)
    _check_runs_in_other_processes(runner)
    runner.shutdown()


@pytest.fixture(scope="module")
def dask_runner():
    pytest.importorskip("distributed")
    from notebook_flow.runners import DaskRunner

    runner = DaskRunner(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=":0")
    yield runner
    runner.shutdown()


def test_dask_runner_with_a_shared_local_store(dask_runner):
    _check_runs_in_other_processes(dask_runner)


def test_dask_runner_with_an_s3_store(dask_runner, s3_server):  # noqa: F811
    nf.configure(store=unique_s3_url(), storage_options=s3_options(s3_server))
    with dask_runner:
        futs = crunch.map([5, 6])
    assert [v for v, _ in futs.result(timeout=300)] == [25, 36]
    from notebook_flow.config import get_store

    store = get_store()
    assert store.url.startswith("s3://")
    committed = {m.run_id for m in store.iter_manifests()}
    assert {f.run_id for f in futs} <= committed
