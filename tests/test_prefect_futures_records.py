"""Futures inside dataclasses and pydantic models passed to a task are resolved, as
Prefect 3's ``visit_collection`` resolves them (its tests/test_tasks.py,
tests/test_futures.py and tests/utilities/test_collections.py cover dataclasses, pydantic
models with extra fields and private attributes), rewritten for notebook_flow: in direct
calls, in ``submit`` and in ``wait_for``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
import pytest

from notebook_flow import task
from notebook_flow.cache_policies import NONE
from notebook_flow.errors import UpstreamFailedError
from notebook_flow.futures import TaskFuture, allow_failure, collect_futures, resolve_futures
from notebook_flow.runners import shutdown


@pytest.fixture(autouse=True)
def _clean():
    yield
    shutdown(wait=True)


@dataclasses.dataclass
class Pair:
    x: Any
    y: Any = 0


@dataclasses.dataclass(frozen=True)
class FrozenPair:
    x: Any
    y: Any = 0


@dataclasses.dataclass
class Counted:
    """``__post_init__`` counts constructions: resolving must not run it again."""

    x: Any
    built: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        self.built += 1


class Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    x: Any
    y: int = 0


class ExtraModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True, extra="allow")
    x: Any


class PrivateModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True, frozen=True)
    x: Any
    _secret: int = pydantic.PrivateAttr(default=0)


@task(cache_policy=NONE)
def identity(x: Any) -> Any:
    return x


@task(cache_policy=NONE)
def fail() -> None:
    raise ValueError("upstream broke")


@task(cache_policy=NONE)
def fields_of(obj: Any) -> Any:
    """What the body received: the record's field values (a future would show as one)."""
    if isinstance(obj, pydantic.BaseModel):
        return {**dict(obj), **(obj.model_extra or {})}
    return dataclasses.asdict(obj)


# -- direct calls ----------------------------------------------------------------------------


def test_direct_call_resolves_a_future_in_a_dataclass() -> None:
    fut = identity.submit(5)
    assert fields_of(Pair(fut, 1)) == {"x": 5, "y": 1}


def test_direct_call_resolves_a_future_in_a_frozen_dataclass() -> None:
    fut = identity.submit("a")
    assert fields_of(FrozenPair(fut)) == {"x": "a", "y": 0}


def test_direct_call_resolves_futures_in_nested_records() -> None:
    inner = identity.submit(1)
    outer = identity.submit(2)
    value = Pair([Pair(inner)], {"k": Model(x=outer)})

    @task(cache_policy=NONE)
    def unpack(p: Pair) -> tuple[Any, Any]:
        return p.x[0].x, p.y["k"].x

    assert unpack(value) == (1, 2)


def test_a_dataclass_is_copied_not_rebuilt() -> None:
    """The original keeps its future; the body's copy has the result; ``__post_init__``
    ran once (when the caller built it)."""
    fut = identity.submit(3)
    original = Counted(fut)
    received = identity(original)
    assert received is not original
    assert received.x == 3 and received.built == 1
    assert original.x is fut


def test_a_record_without_futures_is_passed_as_it_is() -> None:
    value = Pair([1, 2], Model(x="no future"))
    assert resolve_futures(value) is value
    assert identity.fn(value) is value


def test_direct_call_resolves_a_future_in_a_pydantic_model() -> None:
    fut = identity.submit(7)
    assert fields_of(Model(x=fut, y=2)) == {"x": 7, "y": 2}


def test_pydantic_extra_fields_are_resolved() -> None:
    a, b = identity.submit(1), identity.submit(2)
    assert fields_of(ExtraModel(x=a, z=b)) == {"x": 1, "z": 2}


def test_pydantic_private_attributes_are_kept() -> None:
    fut = identity.submit(4)
    model = PrivateModel(x=fut)
    object.__setattr__(model, "__pydantic_private__", {"_secret": 42})
    received = identity(model)
    assert received.x == 4
    assert received._secret == 42


def test_a_failed_future_in_a_dataclass_fails_the_call() -> None:
    broken = fail.submit()

    @task(cache_policy=NONE)
    def never(p: Pair) -> None:
        raise AssertionError("must not run")

    with pytest.raises(UpstreamFailedError, match="upstream broke"):
        never(Pair(broken))


def test_allow_failure_in_a_dataclass_passes_the_exception() -> None:
    broken = fail.submit()
    received = identity(Pair(allow_failure(broken)))
    assert isinstance(received.x, ValueError)


def test_a_cycle_through_a_dataclass_ends() -> None:
    node = Pair(None)
    node.x = node  # refers to itself
    fut = identity.submit(1)
    node.y = fut
    found: dict[int, TaskFuture[Any]] = {}
    collect_futures(node, found)
    assert list(found.values()) == [fut]
    assert resolve_futures(node).y == 1


# -- submit and wait_for -------------------------------------------------------------------------


def test_submit_resolves_futures_in_records() -> None:
    a = identity.submit(1)
    b = identity.submit(2)
    assert fields_of.submit(Pair(a, b)).result() == {"x": 1, "y": 2}
    assert fields_of.submit(Model(x=a, y=3)).result() == {"x": 1, "y": 3}


def test_submit_waits_for_futures_in_records_in_wait_for() -> None:
    class Log(list):  # opts out of keys
        def __notebook_flow_fingerprint__(self) -> str:
            return "records-log"

    log = Log()

    @task(cache_policy=NONE)
    def first() -> int:
        log.append("first")
        return 1

    @task(cache_policy=NONE)
    def second() -> int:
        log.append("second")
        return 2

    up = first.submit()
    assert second.submit(wait_for=[Pair(up)]).result() == 2
    assert log == ["first", "second"]
    assert second(wait_for=[Model(x=up)]) == 2


def test_wait_for_a_failed_future_in_a_record_fails_the_call() -> None:
    broken = fail.submit()
    with pytest.raises(UpstreamFailedError):
        identity.submit(1, wait_for=[Pair(broken)]).result()
    with pytest.raises(UpstreamFailedError):
        identity(1, wait_for=[Model(x=broken)])
