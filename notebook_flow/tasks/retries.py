"""Retry delays: what ``retry_delay_seconds`` accepts (seconds, a list, a function such as
:func:`exponential_backoff`), checked when a task is defined."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from notebook_flow.errors import ConfigurationError

RetryDelay = float | int | Sequence[float | int] | Callable[[int], Sequence[float | int]]


def exponential_backoff(backoff_factor: float) -> Callable[[int], list[float]]:
    """Retry delays ``factor * 2**n`` for ``retry_delay_seconds`` (as in Prefect).

    >>> exponential_backoff(10)(3)
    [10.0, 20.0, 40.0]
    """
    if backoff_factor < 0:
        raise ConfigurationError("backoff_factor must be >= 0")
    # A lambda named by the package, as when this was tasks.py: a task passed as an argument
    # is keyed with its options, this function's result among them.
    delays = lambda retries: [float(backoff_factor) * 2**n for n in range(retries)]  # noqa: E731
    delays.__module__ = "notebook_flow.tasks"
    return delays


def _is_seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _delays(retries: int, spec: RetryDelay | None) -> list[float]:
    """The delay before each retry; a ``retry_delay_seconds`` of a wrong type or sign is a
    ``ConfigurationError`` naming what was given and what is accepted."""
    what = "retry_delay_seconds"
    if spec is None:  # Prefect's "use the default": no delay
        spec = 0
    if callable(spec):
        what = f"retry_delay_seconds({retries})"
        spec = spec(retries)
    if _is_seconds(spec):
        values = [float(spec)] * retries  # type: ignore[arg-type]
    elif isinstance(spec, (list, tuple)) and all(_is_seconds(v) for v in spec):
        values = [float(v) for v in spec]
        if not values:
            values = [0.0]
        values += [values[-1]] * (retries - len(values))  # last delay repeats
    else:
        raise ConfigurationError(
            f"{what} must be seconds (an int or float), a list of seconds, or a function "
            f"of the number of retries that returns such a list (e.g. "
            f"exponential_backoff(10)); got {type(spec).__name__} {spec!r}"
        )
    if any(v < 0 for v in values):
        raise ConfigurationError(f"retry delays must be >= 0, got {values!r}")
    return values
