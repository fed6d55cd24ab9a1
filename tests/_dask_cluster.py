"""A real Dask cluster on loopback for the cluster tests and the benchmark.

``dask scheduler`` and ``dask worker`` processes (the CLI users run), each worker with its
own HOME, working directory and cache folder, as workers on other hosts would have: only
what travels through Dask or the store is shared. Workers import the package,
``tests/_dask_tasks.py`` and the benchmarks from PYTHONPATH, as a deployed worker imports
its code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).with_name("dask"))


class Cluster:
    """A scheduler and ``n_workers`` workers (``nthreads`` each) under ``root``."""

    def __init__(self, root: Path, n_workers: int = 2, nthreads: int = 2, dask: str = DASK) -> None:
        self.root = root
        self.n_workers = n_workers
        self.scheduler_file = root / "scheduler.json"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        root.mkdir(parents=True, exist_ok=True)
        env = self._env(root / "scheduler")
        self.scheduler = self._spawn(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.scheduler_file)],
            env, root / "scheduler",
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not self._address():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the dask scheduler did not start: {self.logs()}")
            time.sleep(0.1)
        for i in range(n_workers):
            home = root / f"w{i}"
            self.workers.append(
                self._spawn(
                    [
                        dask,
                        "worker",
                        "--scheduler-file",
                        str(self.scheduler_file),
                        "--nthreads",
                        str(nthreads),
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--name",
                        f"w{i}",
                        "--local-directory",
                        str(home / "dask"),
                    ],
                    self._env(home),
                    home,
                )  # fmt: skip
            )

    def _address(self) -> str | None:
        try:
            return str(json.loads(self.scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            return None

    @property
    def address(self) -> str:
        address = self._address()
        assert address is not None
        return address

    def _env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTEBOOK_FLOW_")}
        env.update(
            HOME=str(home),
            NOTEBOOK_FLOW_CACHE_DIR=str(home / "cache"),
            PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]),
            DASK_DISTRIBUTED__WORKER__DAEMON="False",
        )
        return env

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(cwd / "log.txt", "ab")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=log)
        log.close()
        self.procs.append(proc)
        return proc

    def wait_for_workers(self, client: Any, timeout: float = 120.0) -> None:
        """Until ``n_workers`` workers are connected (after a start or a restart)."""
        client.wait_for_workers(self.n_workers, timeout=timeout)

    def worker_pids(self, client: Any) -> dict[str, int]:
        """Worker name → pid of the worker process (the nanny's child)."""
        pids = client.run(os.getpid)
        info = client.scheduler_info(n_workers=-1)["workers"]
        return {str(info[addr]["name"]): int(pid) for addr, pid in pids.items()}

    def logs(self) -> str:
        out = []
        for log in sorted(self.root.glob("*/log.txt")):
            out.append(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
