"""Prefect 3's cache policy tests (tests/test_cache_policies.py), rewritten for
notebook_flow: the same behaviours, checked against our policies.

Where we deliberately differ the test says so and cites the README's "Coming from
Prefect" section: DEFAULT has no RUN_ID; TASK_SOURCE keys on the normalized source of the
task and the helpers it calls (not its raw lines); a key is namespaced by the task;
``configure(lock_manager=...)`` checks that it is given a lock manager.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest

from notebook_flow import task
from notebook_flow.cache_policies import (
    DEFAULT,
    INPUTS,
    NO_CACHE,
    NONE,
    RUN_ID,
    TASK_SOURCE,
    CachePolicy,
    CompoundCachePolicy,
    Inputs,
    KeyContext,
    RunId,
    TaskSource,
    _None,
)
from notebook_flow.errors import ConfigurationError
from notebook_flow.locks import MemoryLockManager


def key_of(policy: CachePolicy, inputs: Any = None, task_ctx: Any = None) -> str | None:
    return policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=None)


class TestBase:
    def test_a_bare_policy_can_be_made(self) -> None:
        assert isinstance(CachePolicy(), CachePolicy)

    def test_a_bare_policy_computes_nothing(self) -> None:
        with pytest.raises(NotImplementedError):
            key_of(CachePolicy())


class TestNone:
    def test_is_a_policy_without_keys(self) -> None:
        assert isinstance(_None(), CachePolicy)
        assert key_of(_None(), {"x": 1}) is None
        assert NONE == NO_CACHE

    @pytest.mark.parametrize("kind", [Inputs, TaskSource, RunId, CompoundCachePolicy])
    def test_adding_none_changes_nothing(self, kind: type[CachePolicy]) -> None:
        other = kind()
        assert _None() + other == other
        assert other + _None() == other


class TestInputs:
    def test_key_follows_the_inputs(self) -> None:
        policy = Inputs()
        nothing = key_of(policy)
        x, y, z = key_of(policy, {"x": 42}), key_of(policy, {"y": 42}), key_of(policy, {"z": "a"})
        # Deliberate difference: no inputs is a key too (Prefect: None, so a task without
        # parameters and cache_policy=INPUTS would never be reused; README).
        assert nothing is not None
        assert len({nothing, x, y, z}) == 4

    def test_key_ignores_the_other_arguments(self) -> None:
        policy = Inputs()
        key = key_of(policy, {"x": 42})
        for values in itertools.permutations([None, 1, "foo", {}]):
            extra = dict(zip(["task_ctx", "flow_parameters", "other"], values, strict=False))
            assert policy.compute_key(inputs={"x": 42}, **extra) == key

    def test_excluded_inputs_do_not_count(self) -> None:
        policy = Inputs(exclude=["y"])
        key = key_of(policy, {"x": 42})
        for value in (42, "foo", None):
            assert key_of(policy, {"x": 42, "y": value}) == key

    def test_subtraction_makes_a_new_policy(self) -> None:
        policy = Inputs()
        smaller = policy - "foo"
        assert smaller != policy and smaller.exclude != policy.exclude
        assert policy.exclude == []
        assert (Inputs() - "y").exclude == ["y"]

    @pytest.mark.parametrize("policy", [RunId(), RunId() + TaskSource(), TASK_SOURCE])
    def test_subtraction_is_a_no_op_without_inputs(self, policy: CachePolicy) -> None:
        assert policy - "foo" is policy

    def test_only_names_can_be_subtracted(self) -> None:
        with pytest.raises(TypeError):
            INPUTS - 3  # type: ignore[operator]
        with pytest.raises(TypeError):
            TASK_SOURCE - 3  # type: ignore[operator]


class TestCompound:
    def test_addition_builds_one(self) -> None:
        assert isinstance(CompoundCachePolicy(), CachePolicy)
        assert isinstance(Inputs() + TaskSource(), CompoundCachePolicy)
        two = CompoundCachePolicy()
        added = Inputs() + two
        assert isinstance(added, CompoundCachePolicy) and added.policies != two.policies

    def test_subtraction_with_inputs_makes_a_new_one(self) -> None:
        policy = CompoundCachePolicy(policies=[Inputs()])
        smaller = policy - "foo"
        assert isinstance(smaller, CompoundCachePolicy) and smaller.policies != policy.policies

    def test_subtraction_from_default(self) -> None:
        policy = DEFAULT - "y"
        assert isinstance(policy, CompoundCachePolicy)
        inputs = {"x": 42, "y": "foo"}
        # Without a task the source adds nothing: the key is the inputs' minus y.
        assert key_of(policy, inputs) == key_of(RunId() + Inputs(exclude=["y"]), inputs)

    def test_nones_are_ignored(self) -> None:
        policy = CompoundCachePolicy(policies=[_None(), _None()])
        assert key_of(policy, {"z": [1, 2]}) is None

    def test_adding_compounds_merges_them(self) -> None:
        one = CompoundCachePolicy(policies=[Inputs(), TaskSource()])
        two = CompoundCachePolicy(policies=[RunId()])
        merged = one + two
        assert len(merged.policies) == 3
        assert Inputs() in merged.policies and RunId() in merged.policies
        assert TaskSource() in merged.policies

    def test_nested_compounds_are_flattened(self) -> None:
        policy = CompoundCachePolicy(
            policies=[
                CompoundCachePolicy(policies=[Inputs(), TaskSource()]),
                CompoundCachePolicy(policies=[RunId()]),
            ]
        )
        assert len(policy.policies) == 3
        assert not any(isinstance(p, CompoundCachePolicy) for p in policy.policies)

    def test_inputs_policies_merge_with_their_exclusions(self) -> None:
        policy = CompoundCachePolicy(
            policies=[Inputs(), TaskSource(), Inputs(exclude=["x"]), Inputs(exclude=["y"])]
        )
        assert len(policy.policies) == 2
        smaller = policy - "z"
        inputs = [p for p in smaller.policies if isinstance(p, Inputs)]
        assert len(inputs) == 1 and sorted(inputs[0].exclude) == ["x", "y", "z"]
        assert len(smaller.policies) == 2

    def test_inputs_plus_inputs_minus_x_ignores_x(self) -> None:
        policy = INPUTS + (INPUTS - "x")
        assert key_of(policy, {"x": 1, "y": 2}) == key_of(policy, {"x": 99, "y": 2})


class TestTaskSource:
    def test_a_changed_definition_changes_the_key(self) -> None:
        class Ctx:
            task: Any

        ctx = Ctx()

        def my_func() -> None:
            pass

        ctx.task = my_func
        before = key_of(TaskSource(), task_ctx=ctx)

        def my_func(x: int) -> None:  # type: ignore[no-redef]  # noqa: F811
            pass

        ctx.task = my_func
        assert key_of(TaskSource(), task_ctx=ctx) != before

    def test_no_task_no_key(self) -> None:
        assert key_of(TaskSource()) is None


class TestDefault:
    def test_changing_the_inputs_busts_the_cache(self) -> None:
        assert key_of(DEFAULT, {"x": 42}) != key_of(DEFAULT, {"x": 43})

    def test_changing_the_source_busts_the_cache(self) -> None:
        @dataclasses.dataclass
        class Ctx:
            task: Any

        assert key_of(DEFAULT, task_ctx=Ctx(lambda: "foo")) != key_of(
            DEFAULT, task_ctx=Ctx(lambda: "bar")
        )

    def test_the_run_id_does_not_count(self) -> None:
        # Deliberate difference (README, "Coming from Prefect"): Prefect's DEFAULT includes
        # RUN_ID, so nothing hits across runs; ours hits across processes and restarts.
        # RUN_ID is there to add: DEFAULT + RUN_ID is Prefect's default.
        @dataclasses.dataclass
        class Run:
            id: str

        @dataclasses.dataclass
        class Ctx:
            task_run: Run
            task: Any = None

        def my_task() -> None:
            pass

        a, b = Ctx(Run("a"), my_task), Ctx(Run("b"), my_task)
        assert key_of(DEFAULT, task_ctx=a) == key_of(DEFAULT, task_ctx=b)
        assert key_of(DEFAULT + RUN_ID, task_ctx=a) != key_of(DEFAULT + RUN_ID, task_ctx=b)


class TestConfiguration:
    def test_configure_sets_storage_locks_and_isolation(self, tmp_path: Path) -> None:
        manager = MemoryLockManager()
        policy = Inputs().configure(
            key_storage="/path/to/storage", lock_manager=manager, isolation_level="SERIALIZABLE"
        )
        assert policy.key_storage == "/path/to/storage"
        assert policy.lock_manager is manager
        assert policy.isolation_level == "SERIALIZABLE"

    def test_a_path_is_a_storage_location(self, tmp_path: Path) -> None:
        policy = INPUTS.configure(key_storage=tmp_path / "keys")
        assert policy.key_storage == str(tmp_path / "keys")

        @task(cache_policy=policy, result_storage=tmp_path / "results")
        def add(x: int) -> int:
            return x + 1

        assert add(1) == 2
        assert list((tmp_path / "keys" / "manifests").rglob("*.json"))

    def test_a_lock_manager_must_be_one(self) -> None:
        # Deliberate difference: Prefect stores any object; we say what is wrong at once.
        with pytest.raises(ConfigurationError, match="lock manager|LockManager"):
            Inputs().configure(lock_manager="/path/to/locks")

    def test_configure_with_nothing_changes_nothing(self) -> None:
        assert Inputs().configure(None, None, None) == Inputs()

    def test_configure_returns_a_new_policy(self) -> None:
        policy = Inputs()
        assert policy.configure(key_storage="new") is not policy

    def test_settings_survive_addition(self) -> None:
        manager = MemoryLockManager()
        policy = Inputs() + TaskSource().configure(
            lock_manager=manager, isolation_level="SERIALIZABLE", key_storage="/path"
        )
        assert policy.lock_manager is manager
        assert policy.isolation_level == "SERIALIZABLE"
        assert policy.key_storage == "/path"

    def test_conflicting_settings_cannot_be_added(self) -> None:
        policy = Inputs() + TaskSource().configure(
            lock_manager=MemoryLockManager(),
            key_storage="original_storage",
            isolation_level="SERIALIZABLE",
        )
        with pytest.raises(ValueError, match="different lock implementations"):
            policy + TaskSource().configure(lock_manager=MemoryLockManager("other"))
        with pytest.raises(ValueError, match="different storage locations"):
            policy + TaskSource().configure(key_storage="other_storage")
        with pytest.raises(ValueError, match="different isolation levels"):
            policy + TaskSource().configure(isolation_level="READ_COMMITTED")


class TestCustomPolicies:
    """A policy written for Prefect plugs in unchanged."""

    def test_a_dataclass_policy_keys_a_task(self) -> None:
        seen: list[Any] = []

        @dataclasses.dataclass
        class ByUser(CachePolicy):
            field_name: str = "user"

            def compute_key(
                self,
                task_ctx: Any,
                inputs: dict[str, Any],
                flow_parameters: dict[str, Any],
                **kwargs: Any,
            ) -> str | None:
                seen.append((task_ctx.task.name, dict(inputs), task_ctx.parameters))
                return str(inputs[self.field_name])

        runs: list[int] = []

        @task(cache_policy=ByUser())
        def charge(user: str, amount: int) -> int:
            runs.append(amount)
            return amount

        assert charge("ann", 5) == 5
        assert charge("ann", 7) == 5  # keyed on the user only
        assert charge("bob", 7) == 7
        assert runs == [5, 7]
        name, inputs, parameters = seen[0]
        assert name.endswith("charge")
        assert inputs == parameters == {"user": "ann", "amount": 5}

        # Composes like any policy, and can be configured.
        composed = ByUser() + INPUTS
        assert isinstance(composed, CompoundCachePolicy)
        assert ByUser().configure(isolation_level="SERIALIZABLE").isolation_level == "SERIALIZABLE"

    def test_returning_none_runs_uncached(self) -> None:
        @dataclasses.dataclass
        class Never(CachePolicy):
            def compute_key(
                self, task_ctx: Any, inputs: Any, flow_parameters: Any, **kw: Any
            ) -> None:
                return None

        runs: list[int] = []

        @task(cache_policy=Never())
        def f(x: int) -> int:
            runs.append(x)
            return x

        f(1), f(1)
        assert runs == [1, 1]

    def test_from_cache_key_fn(self) -> None:
        policy = CachePolicy.from_cache_key_fn(lambda ctx, params: str(params["x"] % 2))
        ctx = KeyContext(None, {"x": 1})
        assert key_of(policy, {"x": 1}, ctx) == key_of(policy, {"x": 3}, ctx)
        assert key_of(policy, {"x": 1}, ctx) != key_of(policy, {"x": 2}, ctx)
