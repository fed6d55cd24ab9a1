"""Resume after a kernel kill: the quickstart notebook cold vs resumed; ``%%task`` overheads.

* **resume**: run ``notebooks/quickstart.ipynb`` (full parameters) in a fresh kernel with an
  empty store (cold), SIGKILL the kernel, start a new one and run every cell again. Reported:
  the cold run, the resumed run (time after the kernel is ready), and how much of the
  resumed run is the notebook's own imports (numpy, pandas, matplotlib), which no cache
  can skip.
* **cached cell**: the time a ``%%task`` hit adds over running the same trivial cell plainly.
* **load_ext**: ``%load_ext notebook_flow`` in a fresh shell.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cells() -> list[str]:
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and c.source.strip()]


class _Kernel:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        from jupyter_client.manager import KernelManager

        t0 = time.perf_counter()
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=str(cwd), stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.started = time.perf_counter() - t0

    def run(self, code: str) -> float:
        t0 = time.perf_counter()
        reply = self.kc.execute_interactive(code, timeout=600, output_hook=lambda msg: None)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"cell failed: {reply['content'].get('evalue')}\n{code}")
        return time.perf_counter() - t0

    def kill(self) -> None:
        os.kill(self.km.provisioner.pid, signal.SIGKILL)
        while self.km.is_alive():
            time.sleep(0.05)
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def resume(resumes: int = 5) -> list[dict]:
    """One cold run, SIGKILL, then ``resumes`` resumed runs (each in a new kernel, each
    killed after it): the median is reported, the spread beside it."""
    cells = _cells()
    imports = next(i for i, c in enumerate(cells) if "import pandas" in c)
    root = Path(tempfile.mkdtemp(prefix="nf-bench-resume-"))
    env = dict(os.environ, NOTEBOOK_FLOW_STORE=str(root / "store"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs: list[list[float]] = []
    starts: list[float] = []
    try:
        kernel = _Kernel(env, ROOT / "notebooks")
        cold_start = kernel.started
        cold = sum(kernel.run(c) for c in cells)
        kernel.kill()  # the crash

        for _ in range(resumes):
            kernel = _Kernel(env, ROOT / "notebooks")
            starts.append(kernel.started)
            runs.append([kernel.run(c) for c in cells])
            kernel.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    totals = [sum(times) for times in runs]
    resumed = statistics.median(totals)
    warm_start = statistics.median(starts)
    own = statistics.median(sum(times) - times[imports] for times in runs)
    import_s = statistics.median(times[imports] for times in runs)
    return [
        {
            "benchmark": "resume quickstart after SIGKILL",
            "metric": "re-run all cells, s beyond kernel start (median)",
            "ours": resumed,
            "peers": {
                "cold run": cold,
                f"min/max of {resumes} resumes": f"{min(totals):.3f}/{max(totals):.3f}",
                "kernel start": warm_start,
                "cold kernel start": cold_start,
            },
            "target": "≤ 1 s (vs ≥ 20 s cold)",
            "ok": resumed <= 1.0 and cold >= 20.0,
        },
        {
            "benchmark": "resume quickstart after SIGKILL",
            "metric": "… without the notebook's own imports, s",
            "ours": own,
            "peers": {"import numpy/pandas/matplotlib": import_s},
            "target": "≤ 1 s",
            "ok": own <= 1.0,
        },
    ]


def cached_cell_overhead(n: int = 200, repeat: int = 5) -> list[dict]:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    import notebook_flow as nf
    from notebook_flow import config

    root = Path(tempfile.mkdtemp(prefix="nf-bench-cell-"))
    try:
        config._reset_for_tests()
        nf.configure(store=str(root / "store"))
        cfg = Config()
        cfg.HistoryManager.enabled = False
        shell = InteractiveShell.instance(config=cfg)
        shell.extension_manager.load_extension("notebook_flow")
        shell.user_ns["a"] = list(range(100))
        cached, plain = "%%task\nb = sum(a) + 1\n", "b = sum(a) + 1\n"
        shell.run_cell(cached)  # computed and stored once
        shell.run_cell(cached)  # first hit: imports

        def best(code: str) -> float:
            out = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(n):
                    shell.run_cell(code, silent=True)
                out = min(out, (time.perf_counter() - t0) / n)
            return out

        devnull = open(os.devnull, "w")  # noqa: SIM115 - the badge and replay go here
        saved, sys.stdout = sys.stdout, devnull
        try:
            hit, base = best(cached), best(plain)
        finally:
            sys.stdout = saved
            devnull.close()
        config.get_metadata(config.get_store()).flush()
    finally:
        config._reset_for_tests()
        shutil.rmtree(root, ignore_errors=True)
    overhead_ms = (hit - base) * 1000
    return [
        {
            "benchmark": "%%task cache hit",
            "metric": "overhead per cached cell, ms",
            "ours": overhead_ms,
            "peers": {"plain cell ms": base * 1000, "hit ms": hit * 1000},
            "target": "≤ 5 ms + load",
            "ok": overhead_ms <= 5.0,
        }
    ]


def load_ext_time() -> list[dict]:
    code = (
        "import time\nfrom IPython.core.interactiveshell import InteractiveShell\n"
        "sh = InteractiveShell.instance()\nt0 = time.perf_counter()\n"
        "sh.extension_manager.load_extension('notebook_flow')\n"
        "print(time.perf_counter() - t0)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    samples = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(3)
    ]
    return [
        {
            "benchmark": "%load_ext notebook_flow",
            "metric": "s (best of 3 fresh processes)",
            "ours": min(samples),
            "peers": {},
            "target": "≤ 0.3 s",
            "ok": min(samples) <= 0.3,
        }
    ]


def run() -> list[dict]:
    return load_ext_time() + cached_cell_overhead() + resume()


if __name__ == "__main__":
    for row in run():
        print(row)
