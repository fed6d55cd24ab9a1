"""Real Jupyter kernels for the kernel tests: start one with an env and a cwd, connect a
client, run a cell and collect its iopub messages, shut it down.

How a test kills its kernel (which signal, to what, how long it waits) stays in the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Seconds to wait for a kernel to be ready, and the default for one cell.
TIMEOUT = 60


def start_kernel(env: dict[str, str], cwd: Path, **kwargs: Any) -> Any:
    """A started ``python3`` kernel (its ``KernelManager``) with ``env``, in ``cwd``."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(cwd), **kwargs)
    return km


def connect(km: Any, timeout: float = TIMEOUT) -> Any:
    """A client of ``km`` with its channels started, once the kernel answers."""
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
    except RuntimeError:
        kc.stop_channels()
        raise
    return kc


def execute(kc: Any, code: str, timeout: float = TIMEOUT) -> tuple[dict[str, Any], list[Any]]:
    """Run ``code``: the reply's content and every iopub message of that execution."""
    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, output_hook=outputs.append, timeout=timeout)
    return reply["content"], outputs


def execute_ok(kc: Any, code: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Run ``code``, assert that it succeeded (tracebacks in the message), its messages."""
    content, outputs = execute(kc, code, timeout)
    errors = ["\n".join(m["content"]["traceback"]) for m in outputs if m["msg_type"] == "error"]
    assert content["status"] == "ok", errors
    return outputs


def run_cell(kc: Any, code: str, timeout: float = TIMEOUT) -> str:
    """Run ``code`` successfully and return what it printed (its streams, in order)."""
    outputs = execute_ok(kc, code, timeout)
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


def last_json_line(kc: Any, code: str) -> Any:
    """Run ``code`` and parse the last line it printed as JSON."""
    import json

    return json.loads(run_cell(kc, code).strip().splitlines()[-1])


class Kernel:
    """A started kernel and its ready client; ``close`` stops both (a dead kernel too: that
    removes its connection file)."""

    def __init__(
        self, env: dict[str, str], cwd: Path, ready_timeout: float = TIMEOUT, **kwargs: Any
    ) -> None:
        self.km = start_kernel(env, cwd, **kwargs)
        try:
            self.kc = connect(self.km, ready_timeout)
        except RuntimeError:
            self.km.shutdown_kernel()
            raise

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
