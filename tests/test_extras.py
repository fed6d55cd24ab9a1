"""An optional backend used without its package says which extra installs it, in one line."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from notebook_flow._extras import EXTRAS, require
from notebook_flow.errors import MissingExtraError


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Modules to treat as not installed (the real ones are, in the test venv)."""
    absent: set[str] = set()
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in absent else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return absent


def test_backends_name_their_extra(missing: set[str]) -> None:
    from notebook_flow.locks import PostgresLockManager, RedisLockManager
    from notebook_flow.runners import DaskRunner

    missing.update({"redis", "psycopg", "distributed"})
    cases = [
        (RedisLockManager, (), "redis"),
        (PostgresLockManager, ("postgresql://localhost/test",), "postgres"),
        (DaskRunner, (), "dask"),
    ]
    for cls, args, extra in cases:
        with pytest.raises(MissingExtraError) as info:
            cls(*args)
        message = str(info.value)
        assert f"pip install 'notebook-flow[{extra}]'" in message and "\n" not in message
        assert cls.__name__ in message
        assert isinstance(info.value, ImportError)


def test_present_modules_pass_and_every_extra_is_declared() -> None:
    require("json", "the standard library")
    assert set(EXTRAS.values()) == {"redis", "postgres", "s3", "dask", "lab"}
