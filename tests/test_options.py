"""Every option is checked where it is given (issue 13, finding 6): ``@task``,
``with_options``, ``configure`` and the environment; bad ones raise ConfigurationError
(ConfigurationTypeError, also a TypeError, for a wrong type) naming the option and value."""

from __future__ import annotations

import math
import pathlib
from datetime import timedelta
from typing import Any

import pytest

import notebook_flow as nf
from notebook_flow import config
from notebook_flow.cache_policies import NONE
from notebook_flow.errors import ConfigurationError, ConfigurationTypeError
from notebook_flow.tasks import exponential_backoff

NAN, INF = float("nan"), float("inf")

# (option, bad value, error class) for @task and with_options.
TASK_BAD: list[tuple[str, Any, type[Exception]]] = [
    ("name", 123, ConfigurationTypeError),
    ("name", "", ConfigurationError),
    ("cache_policy", "INPUTS", ConfigurationError),
    ("cache_expiration", INF, ConfigurationError),
    ("cache_expiration", NAN, ConfigurationError),
    ("cache_expiration", -1, ConfigurationError),
    ("cache_expiration", "1h", ConfigurationTypeError),
    ("cache_expiration", timedelta(0), ConfigurationError),
    ("cache_expiration", 10**400, ConfigurationError),
    ("refresh_cache", "no", ConfigurationTypeError),
    ("refresh_cache", 1, ConfigurationTypeError),
    ("persist_result", "False", ConfigurationTypeError),
    ("retries", True, ConfigurationTypeError),
    ("retries", 1.5, ConfigurationTypeError),
    ("retries", -1, ConfigurationError),
    ("retry_delay_seconds", 1e12, ConfigurationError),
    ("retry_delay_seconds", NAN, ConfigurationError),
    ("retry_delay_seconds", -1, ConfigurationError),
    ("retry_delay_seconds", "1", ConfigurationTypeError),
    ("retry_delay_seconds", [1, NAN], ConfigurationError),
    ("retry_delay_seconds", lambda n: [INF] * n, ConfigurationError),
    ("retry_jitter_factor", NAN, ConfigurationError),
    ("retry_jitter_factor", -0.5, ConfigurationError),
    ("retry_jitter_factor", "x", ConfigurationTypeError),
    ("retry_condition_fn", "yes", ConfigurationTypeError),
    ("timeout_seconds", "5", ConfigurationTypeError),
    ("timeout_seconds", NAN, ConfigurationError),
    ("timeout_seconds", INF, ConfigurationError),
    ("timeout_seconds", 0, ConfigurationError),
    ("timeout_seconds", True, ConfigurationTypeError),
    ("result_serializer", "no-such-format", ConfigurationError),
    ("result_serializer", 3, ConfigurationTypeError),
    ("result_storage", 123, ConfigurationTypeError),
    ("result_storage", "  ", ConfigurationError),
    ("tags", "abc", ConfigurationTypeError),
    ("tags", [1, None], ConfigurationTypeError),
    ("tags", 5, ConfigurationTypeError),
    ("cache_namespace", 7, ConfigurationTypeError),
    ("lock_timeout", "x", ConfigurationTypeError),
    ("lock_timeout", NAN, ConfigurationError),
    ("lock_timeout", -1, ConfigurationError),
    ("max_concurrency", "3", ConfigurationTypeError),
    ("max_concurrency", 0, ConfigurationError),
    ("max_concurrency", True, ConfigurationTypeError),
    ("isolation_level", "EXCLUSIVE", ConfigurationError),
    ("lock_manager", object(), ConfigurationError),
    ("cache_key_fn", "key", ConfigurationTypeError),
    ("result_storage_key", 5, ConfigurationTypeError),
    ("result_storage_key", "", ConfigurationError),
    ("cache_result_in_memory", "yes", ConfigurationTypeError),
    ("max_size", "lots", ConfigurationError),
    ("max_size", "-3GB", ConfigurationError),
    ("max_size", 0, ConfigurationError),
    ("max_size", 1.5, ConfigurationTypeError),
    ("max_size", True, ConfigurationTypeError),
    ("pin", "yes", ConfigurationTypeError),
    ("pin", 1, ConfigurationTypeError),
    ("on_completion", print, ConfigurationError),  # Prefect: a list of hooks, not one
    ("on_failure", ["not callable"], ConfigurationError),
    ("on_commit", 3, ConfigurationError),
    ("on_rollback", "hook", ConfigurationError),
]

# What Prefect accepts is accepted here too.
TASK_GOOD: list[tuple[str, Any]] = [
    ("name", "load"),
    ("cache_expiration", timedelta(hours=1)),
    ("cache_expiration", 3600),
    ("cache_expiration", 0.5),
    ("refresh_cache", True),
    ("persist_result", False),
    ("retries", 3),
    ("retry_delay_seconds", 2),
    ("retry_delay_seconds", 0.5),
    ("retry_delay_seconds", [1, 10, 60]),
    ("retry_delay_seconds", exponential_backoff(2)),
    ("retry_delay_seconds", None),
    ("retry_delay_seconds", lambda n: 3),
    ("retry_jitter_factor", 0.5),
    ("retry_condition_fn", lambda task, run, exc: True),
    ("timeout_seconds", 5),
    ("timeout_seconds", 0.25),
    ("result_serializer", "json"),
    ("result_storage", "some/folder"),
    ("result_storage", pathlib.Path("some/folder")),
    ("tags", ["etl", "daily"]),
    ("tags", {"etl"}),
    ("tags", ("a", "b")),
    ("cache_namespace", "ns"),
    ("lock_timeout", 0),
    ("max_concurrency", 2),
    ("isolation_level", "SERIALIZABLE"),
    ("cache_key_fn", lambda context, parameters: "k"),
    ("result_storage_key", "{parameters[x]}"),
    ("cache_result_in_memory", False),
    ("max_size", "10GB"),
    ("max_size", "500 MiB"),
    ("max_size", 10_000),
    ("pin", True),
    ("on_completion", [lambda task, run, state: None]),
]


def body(x: int) -> int:
    return x


def test_every_task_option_is_covered() -> None:
    options = set(nf.task(body)._options()) | {"lock_manager", "isolation_level"}
    assert options <= {name for name, _, _ in TASK_BAD}


@pytest.mark.parametrize(("option", "value", "error"), TASK_BAD)
def test_bad_task_option_is_refused_at_definition(option: str, value: Any, error: type) -> None:
    options = {option: value}
    if option.startswith("retry_delay"):
        options["retries"] = 2
    with pytest.raises(error) as info:
        nf.task(**options)(body)
    message = str(info.value)
    assert option in message or "serializer" in message or "isolation" in message
    assert isinstance(info.value, ConfigurationError)
    with pytest.raises(error):  # the same through with_options
        nf.task(cache_policy=NONE)(body).with_options(**options)


@pytest.mark.parametrize(("option", "value"), TASK_GOOD)
def test_good_task_option_is_accepted(option: str, value: Any) -> None:
    options = {option: value}
    if option.startswith("retry_delay"):
        options["retries"] = 3
    t = nf.task(**options)(body)
    assert t.with_options(**options).name == t.name


def test_tags_are_a_set_as_in_prefect() -> None:
    assert nf.task(tags=["b", "a", "b"])(body).tags == {"a", "b"}


def test_timeout_nan_no_longer_replaces_the_tasks_own_error() -> None:
    with pytest.raises(ConfigurationError, match="timeout_seconds=nan"):
        nf.task(timeout_seconds=NAN)(body)


CONFIGURE_BAD: list[tuple[str, Any, type[Exception]]] = [
    ("refresh_cache", "no", ConfigurationTypeError),
    ("disable_caching", 1, ConfigurationTypeError),
    ("default_no_cache", "True", ConfigurationTypeError),
    ("store", 123, ConfigurationTypeError),
    ("store", " ", ConfigurationError),
    ("storage_options", ["anon"], ConfigurationTypeError),
    ("signing_key", "x", ConfigurationError),
    ("signing_key", b"0123456789abcde", ConfigurationError),  # 15 bytes
    ("signing_key", 12345, ConfigurationError),
    ("workers", "3", ConfigurationTypeError),
    ("workers", 0, ConfigurationError),
    ("workers", True, ConfigurationTypeError),
    ("lock_lease", NAN, ConfigurationError),
    ("lock_lease", INF, ConfigurationError),
    ("lock_lease", 0, ConfigurationError),
    ("lock_lease", "30", ConfigurationTypeError),
    ("lock_timeout", "x", ConfigurationTypeError),
    ("lock_timeout", NAN, ConfigurationError),
    ("lock_timeout", -1, ConfigurationError),
    ("log_misses", "yes", ConfigurationTypeError),
    ("background_commits", 1, ConfigurationTypeError),
    ("auto_cells", "yes", ConfigurationTypeError),
    ("max_size", "20 parsecs", ConfigurationError),
    ("max_size", -5, ConfigurationError),
    ("max_size", 2.5, ConfigurationTypeError),
]

CONFIGURE_GOOD: list[tuple[str, Any]] = [
    ("store", "elsewhere"),
    ("store", pathlib.Path("elsewhere")),
    ("storage_options", {"anon": True}),
    ("signing_key", "k" * 16),
    ("signing_key", b"k" * 32),
    ("workers", 2),
    ("lock_lease", 5),
    ("lock_lease", 2.5),
    ("lock_timeout", 0),
    ("log_misses", False),
    ("background_commits", False),
    ("auto_cells", True),
    ("refresh_cache", True),
    ("disable_caching", False),
    ("default_no_cache", False),
    ("max_size", "20GB"),
    ("max_size", 1 << 30),
]


def test_every_configure_option_is_covered() -> None:
    import inspect

    names = set(inspect.signature(nf.configure).parameters)
    assert names <= {name for name, _, _ in CONFIGURE_BAD}


@pytest.mark.parametrize(("option", "value", "error"), CONFIGURE_BAD)
def test_bad_configure_option_is_refused(option: str, value: Any, error: type) -> None:
    before = config.settings()
    with pytest.raises(error, match=option):
        nf.configure(**{option: value})
    assert config.settings() is before  # nothing half-applied


@pytest.mark.parametrize(("option", "value"), CONFIGURE_GOOD)
def test_good_configure_option_is_accepted(option: str, value: Any) -> None:
    nf.configure(**{option: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NOTEBOOK_FLOW_LOCK_LEASE", "nan"),
        ("NOTEBOOK_FLOW_LOCK_LEASE", "inf"),
        ("NOTEBOOK_FLOW_LOCK_LEASE", "-3"),
        ("NOTEBOOK_FLOW_LOCK_LEASE", "soon"),
        ("NOTEBOOK_FLOW_WORKERS", "0"),
        ("NOTEBOOK_FLOW_WORKERS", "2.5"),
        ("NOTEBOOK_FLOW_SIGNING_KEY", "x"),
        ("NOTEBOOK_FLOW_AUTO_CELLS", "maybe"),
        ("NOTEBOOK_FLOW_AUTO_MIN_SECONDS", "-1"),
        ("NOTEBOOK_FLOW_AUTO_MIN_SECONDS", "soon"),
        ("NOTEBOOK_FLOW_MAX_SIZE", "big"),
        ("NOTEBOOK_FLOW_MAX_SIZE", "0"),
    ],
)
def test_bad_environment_variable_is_refused(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    config._reset_for_tests()
    with pytest.raises(ConfigurationError, match=variable):
        config.settings()


def test_good_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTEBOOK_FLOW_LOCK_LEASE", "12.5")
    monkeypatch.setenv("NOTEBOOK_FLOW_WORKERS", "3")
    monkeypatch.setenv("NOTEBOOK_FLOW_MAX_SIZE", "1.5GB")
    config._reset_for_tests()
    s = config.settings()
    assert (s.lock_lease, s.workers) == (12.5, 3) and math.isfinite(s.lock_lease)
    assert s.max_size == 1_500_000_000


def test_history_limit_is_checked() -> None:
    with pytest.raises(ConfigurationTypeError, match="limit"):
        nf.history(limit="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="limit"):
        nf.history(limit=0)
