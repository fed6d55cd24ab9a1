"""Optional backends and the extra that installs each: one clear line when one is missing.

A plain ``pip install notebook-flow`` runs everything the README shows with the default
backends (local store, file locks, the embedded worker). Redis and PostgreSQL locks, S3
stores and Dask clusters need a client library each, installed by an extra::

    pip install 'notebook-flow[redis]'

>>> require("json", "the standard library")  # present: returns quietly
"""

from __future__ import annotations

import importlib.util

from notebook_flow.errors import MissingExtraError

__all__ = ["EXTRAS", "require"]

#: The module a backend imports → the extra of ``notebook-flow`` that installs it.
EXTRAS: dict[str, str] = {
    "redis": "redis",
    "psycopg": "postgres",
    "s3fs": "s3",
    "distributed": "dask",
    "jupyter_server_proxy": "lab",
}


def require(module: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install if ``module`` is absent.

    ``what`` names the feature that needs it (``"RedisLockManager"``). Looks the module up
    without importing it, so the check is cheap and the import stays where it is used.
    """
    if importlib.util.find_spec(module) is not None:
        return
    extra = EXTRAS.get(module)
    fix = f"pip install 'notebook-flow[{extra}]'" if extra else f"pip install {module}"
    raise MissingExtraError(f"{what} needs the `{module}` package, which is not installed: {fix}")
