"""Checking options where they are given: ``@task``, ``with_options``, ``configure``, env vars.

A bad option fails when the task or setting is *defined*, never later inside a run (where
``timeout_seconds=nan`` used to replace the task's own error, and ``lock_lease=nan`` let
three processes run one SERIALIZABLE body). Every check raises ``ConfigurationError``
naming the option, the value and what is accepted; a value of the wrong *type* raises
``ConfigurationTypeError``, which is also a ``TypeError``.

What is accepted follows Prefect where the option comes from Prefect: ``tags`` any
iterable of str (not a bare str), ``result_storage`` a str, a ``pathlib.Path`` or a
store, ``retry_delay_seconds`` a number, a list of numbers or a callable.

>>> seconds("timeout_seconds", 2)
2.0
>>> seconds("timeout_seconds", float("nan"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
notebook_flow.errors.ConfigurationError: timeout_seconds=nan is not accepted: a finite number ...
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from .errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "boolean",
    "byte_size",
    "count",
    "duration",
    "env_count",
    "env_seconds",
    "env_size",
    "optional_str",
    "retry_delays",
    "seconds",
    "tag_tuple",
    "validate_task",
]

#: The longest wait a thread can be asked for (longer ones raise OverflowError in wait()).
MAX_SECONDS = float(threading.TIMEOUT_MAX)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(
    name: str, value: object, accepted: str, *, wrong_type: bool = False
) -> ConfigurationError:
    cls = ConfigurationTypeError if wrong_type else ConfigurationError
    return cls(f"{name}={_shown(value)} is not accepted: {accepted}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seconds(
    name: str, value: object, *, zero: bool = False, optional: bool = False
) -> float | None:
    """A finite number of seconds (> 0, or >= 0 with ``zero``), as float; None if allowed."""
    if value is None and optional:
        return None
    bound = ">= 0" if zero else "> 0"
    accepted = f"a finite number of seconds {bound} (int or float)" + (
        " or None" if optional else ""
    )
    if not _is_number(value):
        raise _refuse(name, value, accepted, wrong_type=True)
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        raise _refuse(name, value, accepted) from None
    if math.isnan(number) or number < 0 or (number == 0 and not zero):
        raise _refuse(name, value, accepted)
    if number > MAX_SECONDS:
        raise _refuse(name, value, f"{accepted}, at most {MAX_SECONDS:.3g}")
    return number


def count(name: str, value: object, *, minimum: int, optional: bool = False) -> int | None:
    """An int >= ``minimum`` (bool is not an int here); None if allowed."""
    if value is None and optional:
        return None
    accepted = f"an int >= {minimum}" + (" or None" if optional else "")
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse(name, value, accepted, wrong_type=True)
    if value < minimum:
        raise _refuse(name, value, accepted)
    return value


def boolean(name: str, value: object, *, optional: bool = False) -> bool | None:
    """True or False (not "no", not 0); None if allowed."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        accepted = "True or False" + (" or None" if optional else "")
        raise _refuse(name, value, accepted, wrong_type=True)
    return value


_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9,
}  # fmt: skip


def _amount(text: str, units: dict[str, int]) -> float | None:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in units:
        return None
    return float(match.group(1)) * units[match.group(2).lower()]


def _duration_text(text: str) -> float | None:
    from .cells.key import parse_duration  # the %%task --expire syntax (90s, 1h30m, 2w)

    try:
        return parse_duration(text)
    except ConfigurationError:
        return None


def byte_size(name: str, value: object, *, optional: bool = False) -> int | None:
    """A size in bytes > 0: an int, or a str such as ``"20GB"``, ``"500 MiB"``; None if
    allowed.

    >>> byte_size("max_size", "1.5GB"), byte_size("max_size", "2 KiB")
    (1500000000, 2048)
    """
    if value is None and optional:
        return None
    accepted = "a size in bytes > 0: an int or a str such as '20GB', '500MB', '2GiB'" + (
        " or None" if optional else ""
    )
    if isinstance(value, str):
        number = _amount(value, _SIZE_UNITS)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    else:
        raise _refuse(name, value, accepted, wrong_type=True)
    if number is None or not math.isfinite(number) or number < 1:
        raise _refuse(name, value, accepted)
    return int(number)


def duration(name: str, value: object) -> float:
    """A duration > 0 in seconds: a number of seconds, a timedelta, or a str such as
    ``"30d"``, ``"12h"``, ``"1h30m"``, ``"2w"`` (as ``%%task --expire``).

    >>> duration("older_than", "30d"), duration("unused_for", "1h30m")
    (2592000.0, 5400.0)
    """
    accepted = "a duration such as '30d', '12h', '10m', '2w' or a number of seconds > 0"
    if isinstance(value, timedelta):
        number: float | None = value.total_seconds()
    elif isinstance(value, str):
        number = _duration_text(value)
    elif _is_number(value):
        number = float(value)  # type: ignore[arg-type]
    else:
        raise _refuse(name, value, accepted, wrong_type=True)
    if number is None or not math.isfinite(number) or number <= 0:
        raise _refuse(name, value, accepted)
    return number


def optional_str(name: str, value: object) -> str | None:
    """None or a non-empty str."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _refuse(name, value, "a str or None", wrong_type=True)
    if not value:
        raise _refuse(name, value, "a non-empty str or None")
    return value


def tag_tuple(value: object) -> tuple[str, ...]:
    """``tags`` as a tuple (duplicates dropped, order kept): any iterable of str."""
    if value is None:
        return ()
    accepted = "an iterable of str, e.g. tags=['etl', 'daily'] (a bare str is not: wrap it)"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _refuse("tags", value, accepted, wrong_type=True)
    items = list(value)
    bad = [t for t in items if not isinstance(t, str)]
    if bad:
        raise _refuse("tags", value, f"{accepted}; {_shown(bad[0])} is not a str", wrong_type=True)
    return tuple(dict.fromkeys(items))


def retry_delays(value: object) -> None:
    """``retry_delay_seconds``: seconds >= 0, a list of them, or a callable (checked by the
    caller, which calls it once with ``retries``)."""
    if value is None or callable(value):  # None: Prefect's "the default" (no delay)
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            seconds("retry_delay_seconds", item, zero=True)
        return
    if not _is_number(value):
        raise _refuse(
            "retry_delay_seconds",
            value,
            "seconds >= 0, a list of them, or a callable(retries) returning one",
            wrong_type=True,
        )
    seconds("retry_delay_seconds", value, zero=True)


def expiration(value: object) -> None:
    """``cache_expiration``: a positive timedelta or finite seconds, or None."""
    if value is None:
        return
    if isinstance(value, timedelta):
        seconds("cache_expiration", value.total_seconds())
        return
    if not _is_number(value):
        raise _refuse(
            "cache_expiration",
            value,
            "a timedelta or a finite number of seconds > 0, or None",
            wrong_type=True,
        )
    number = seconds("cache_expiration", value)
    assert number is not None
    if number > timedelta.max.total_seconds():
        raise _refuse("cache_expiration", value, "at most timedelta.max")


def _result_storage(value: object) -> None:
    if value is None or isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and not value.strip():
            raise _refuse("result_storage", value, "a non-empty path or URL")
        return
    from .storage import ResultStore

    if not isinstance(value, ResultStore):
        raise _refuse(
            "result_storage",
            value,
            "a path or URL (str or pathlib.Path), a ResultStore, or None",
            wrong_type=True,
        )


def _result_serializer(value: object) -> None:
    if value is None:
        return
    from .serializers import Serializer, get_serializer

    if isinstance(value, str):
        get_serializer(value)  # an unknown name: a ConfigurationError naming the known ones
    elif not isinstance(value, Serializer):
        raise _refuse(
            "result_serializer",
            value,
            "a serializer name ('json', 'pickle', ...), a Serializer, or None",
            wrong_type=True,
        )


def _callable_or_none(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise _refuse(name, value, "a callable or None", wrong_type=True)


def validate_task(**options: Any) -> None:
    """Check the options of ``@task`` / ``Task.with_options`` (those given by name).

    >>> validate_task(retries=True)
    Traceback (most recent call last):
    ...
    notebook_flow.errors.ConfigurationTypeError: retries=True is not accepted: an int >= 0
    """
    checks: dict[str, Callable[[Any], object]] = {
        "name": lambda v: optional_str("name", v),
        "cache_expiration": expiration,
        "refresh_cache": lambda v: boolean("refresh_cache", v, optional=True),
        "persist_result": lambda v: boolean("persist_result", v, optional=True),
        "retries": lambda v: count("retries", v, minimum=0),
        "retry_delay_seconds": retry_delays,
        "retry_jitter_factor": lambda v: seconds(
            "retry_jitter_factor", v, zero=True, optional=True
        ),
        "retry_condition_fn": lambda v: _callable_or_none("retry_condition_fn", v),
        "timeout_seconds": lambda v: seconds("timeout_seconds", v, optional=True),
        "result_serializer": _result_serializer,
        "result_storage": _result_storage,
        "tags": tag_tuple,
        "cache_namespace": lambda v: optional_str("cache_namespace", v),
        "lock_timeout": lambda v: seconds("lock_timeout", v, zero=True, optional=True),
        "max_concurrency": lambda v: count("max_concurrency", v, minimum=1, optional=True),
        "cache_key_fn": lambda v: _callable_or_none("cache_key_fn", v),
        "result_storage_key": lambda v: optional_str("result_storage_key", v),
        "cache_result_in_memory": lambda v: boolean("cache_result_in_memory", v),
        "max_size": lambda v: byte_size("max_size", v, optional=True),
        "pin": lambda v: boolean("pin", v),
    }
    for name, value in options.items():
        check = checks.get(name)
        if check is not None:
            check(value)
    delays, retries = options.get("retry_delay_seconds"), options.get("retries")
    if callable(delays) and isinstance(retries, int):
        try:
            produced = delays(retries)
        except Exception as exc:
            raise ConfigurationError(
                f"retry_delay_seconds={_shown(delays)} failed when called with "
                f"retries={retries}: {type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(produced, (list, tuple)) or _is_number(produced)):
            raise _refuse(
                "retry_delay_seconds",
                delays,
                "a callable returning seconds >= 0 or a list of them",
                wrong_type=True,
            )
        for item in produced if isinstance(produced, (list, tuple)) else [produced]:
            seconds("retry_delay_seconds", item, zero=True)


# -- environment variables ---------------------------------------------------------------------


def env_seconds(name: str, default: float, *, zero: bool = False) -> float:
    """A number of seconds > 0 (``zero``: >= 0) from the environment variable ``name``
    (unset: ``default``)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    low_ok = value >= 0 if zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= MAX_SECONDS):
        raise ConfigurationError(
            f"environment variable {name}={raw!r} is not accepted: a finite number of "
            f"seconds {'>=' if zero else '>'} 0 such as {default!r}; fix or unset it"
        )
    return value


def env_size(name: str) -> int | None:
    """A size in bytes from the environment variable ``name`` (``20GB``; unset: None)."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return byte_size(name, raw)
    except ConfigurationError:
        raise ConfigurationError(
            f"environment variable {name}={raw!r} is not accepted: a size such as '20GB', "
            "'500MB' or a number of bytes; fix or unset it"
        ) from None


def env_count(name: str, default: int, *, minimum: int = 1) -> int:
    """An int >= ``minimum`` from the environment variable ``name`` (unset: ``default``)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigurationError(
            f"environment variable {name}={raw!r} is not accepted: an int >= {minimum} "
            f"such as {default!r}; fix or unset it"
        )
    return value
