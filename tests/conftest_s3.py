"""An S3 server for tests: moto in server mode, one per test session.

Not a conftest (tests/conftest.py belongs to the whole suite): import the fixture where it
is needed::

    from conftest_s3 import s3_server  # noqa: F401  (pytest finds the fixture by name)

and build stores with ``s3_options(endpoint)``. Server mode (a real HTTP endpoint) is used
instead of moto's in-process mock so that subprocesses, which cannot share a mock, see the
same bucket, and so the whole s3fs/aiobotocore stack is exercised.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

BUCKET = "notebook-flow-tests"


def s3_options(endpoint: str) -> dict[str, Any]:
    """storage_options for an s3:// store on the test server."""
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "x", "secret": "x"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server with the bucket ``BUCKET`` created."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    # werkzeug logs every request at INFO; keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import s3fs

        # skip_instance_cache: s3fs caches filesystems by options, and every test module
        # that imports this fixture starts its own server; exist_ok-style creation keeps a
        # second server (or a rerun) from failing on a bucket that is already there.
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))
        try:
            fs.mkdir(BUCKET)
        except FileExistsError:
            pass
        yield endpoint
    finally:
        server.stop()


def unique_s3_url() -> str:
    """A fresh prefix in the test bucket, so tests never see each other's files."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
