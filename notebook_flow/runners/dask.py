"""A Dask distributed cluster as the runner.

>>> from notebook_flow.runners import DaskRunner
>>> with DaskRunner("tcp://scheduler:8786"):               # doctest: +SKIP
...     futs = crunch.map(chunks)
>>> with DaskRunner(n_workers=2):            # starts a LocalCluster  # doctest: +SKIP
...     ...

Each run goes through the full call path on a Dask worker against the same store, so the
store must be reachable from the workers (a shared folder or an object store such as S3);
its URL, options and signing key travel with the run. Upstream futures are resolved on
the client, so their values travel through it. Results come back to the client too.
"""

from __future__ import annotations

from typing import Any

from notebook_flow._extras import require
from notebook_flow.futures import TaskFuture

from .base import BaseRunner, send_remote

__all__ = ["DaskRunner"]


class DaskRunner(BaseRunner):
    """Submit runs to a Dask cluster: a ``distributed.Client``, a scheduler address, or
    nothing (a ``LocalCluster`` is started with ``cluster_kwargs`` and closed on
    ``shutdown()``)."""

    def __init__(self, client: Any = None, **cluster_kwargs: Any) -> None:
        require("distributed", "DaskRunner")
        from distributed import Client

        self._owned: list[Any] = []
        if client is None:
            from distributed import LocalCluster

            cluster = LocalCluster(**cluster_kwargs)  # type: ignore[no-untyped-call]
            client = Client(cluster)  # type: ignore[no-untyped-call]
            self._owned = [client, cluster]
        elif isinstance(client, str):
            client = Client(client)  # type: ignore[no-untyped-call]
            self._owned = [client]
        self.client = client

    def __repr__(self) -> str:
        return f"<DaskRunner {self.client!r}>"

    def _send(self, fut: TaskFuture[Any]) -> None:
        send_remote(
            fut,
            lambda fn, *args: self.client.submit(
                fn, *args, key=f"notebook_flow-{fut.task.name}-{fut.run_id}", pure=False
            ),
        )

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Wait for this runner's runs, then close the client/cluster it started."""
        super().shutdown(wait, cancel_pending=cancel_pending)
        for obj in self._owned:
            obj.close()
        self._owned = []
