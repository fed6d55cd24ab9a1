"""DaskRunner on a real cluster — a ``dask scheduler`` and two ``dask worker`` processes on
loopback (4 threads each), moto's S3 server (its own process) as the store — beside plain
Dask in the same run:

* 2,000 no-op tasks through ``DaskRunner`` (uncached: every result committed to S3;
  cached: every run a hit) vs ``client.map`` of the same function (no keys, no store),
  and, for the uncached row, vs ``client.map`` of a function that makes the one S3 PUT a
  committed result needs at least (a manifest-sized object through s3fs, one filesystem
  per worker process): the floor any store of one object per result pays;
* a large array result committed to S3 by a worker and loaded by ``fut.result()`` vs a
  raw ``s3fs`` put / get of the same number of bytes from this process;
* Prefect's ``DaskTaskRunner`` on the same 2,000 no-ops, when ``/work/venv-prefect`` (a
  separate venv with prefect and prefect-dask) exists and Prefect runs offline there.

``NF_BENCH_DASK_N`` and ``NF_BENCH_DASK_MB`` override the sizes (default 2000 and 500);
``NF_BENCH_DASK_PARTS`` picks the parts (``throughput,large``, the default, or one of them);
``NF_BENCH_PREFECT_PYTHON`` names the Prefect venv's python. Each throughput row also
says where the CPU went (ms of CPU per run, per process kind: S3 server, scheduler,
nannies, workers, this client), since on a shared machine the peers' rates move with
the load; the load average is printed with the table.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

N = int(os.environ.get("NF_BENCH_DASK_N", "2000"))
# The size. A loaded box once made the client time out on moto's (slow) completion
# of a 500 MB multipart upload and retry it ("The specified upload does not exist"): the
# S3 client waits long enough here (read_timeout, below), for the peer's upload too.
MB = int(os.environ.get("NF_BENCH_DASK_MB", "500"))
PARTS = set(os.environ.get("NF_BENCH_DASK_PARTS", "throughput,large").split(","))
#: Bytes of the raw PUT peer's object: about a no-op's signed manifest with its inline result.
PUT_BYTES = 1200
PREFECT_PYTHON = Path(os.environ.get("NF_BENCH_PREFECT_PYTHON", "/work/venv-prefect/bin/python"))
BUCKET = "nf-bench"


def plain_noop(x):
    return x


_put_fs: dict[str, object] = {}


def plain_put(x, endpoint: str, prefix: str):
    """One S3 PUT of a manifest-sized object (on a worker; its s3fs filesystem reused)."""
    fs = _put_fs.get(endpoint)
    if fs is None:
        import s3fs

        fs = _put_fs[endpoint] = s3fs.S3FileSystem(skip_instance_cache=True, **_options(endpoint))
    fs.pipe_file(f"{prefix}/{x}.json", b"x" * PUT_BYTES)  # type: ignore[attr-defined]
    return x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(root / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    return proc, endpoint


def _options(endpoint: str) -> dict:
    return {
        "client_kwargs": {"endpoint_url": endpoint},
        "key": "x",
        "secret": "x",
        "config_kwargs": {"read_timeout": 1800, "connect_timeout": 60},
    }


class _CPU:
    """CPU seconds used by the benchmark's processes between two readings, by kind."""

    def __init__(self, moto: subprocess.Popen, cluster) -> None:
        import psutil

        kinds = [("s3 server", psutil.Process(moto.pid)), ("client", psutil.Process())]
        scheduler = psutil.Process(cluster.scheduler.pid)
        kinds.append(("scheduler", scheduler))
        for proc in cluster.workers:
            nanny = psutil.Process(proc.pid)
            kinds.append(("nannies", nanny))
            kinds += [("workers", child) for child in nanny.children(recursive=True)]
        self.kinds = kinds

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, proc in self.kinds:
            try:
                times = proc.cpu_times()
            except Exception:  # a restarted worker: its successor is not counted
                continue
            out[kind] = out.get(kind, 0.0) + times.user + times.system
        return out

    def per_run(self, before: dict[str, float], n: int) -> dict[str, float]:
        after = self.read()
        return {k: round(1000 * (after[k] - before.get(k, 0.0)) / n, 2) for k in after}


def _rate(n: int, fn) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def _prefect_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NOTEBOOK_FLOW"))}
    env["PREFECT_HOME"] = str(root / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _prefect_rate(n: int, root: Path) -> float | None:
    """Prefect's DaskTaskRunner in its own venv, against a local ``prefect server`` (the
    workers report to it; offline, SQLite) and a cluster of the same shape started from
    that venv (its workers need Prefect); None: not there or not runnable here."""
    if not PREFECT_PYTHON.exists():
        return None
    import urllib.request

    from _dask_cluster import Cluster

    port = _free_port()
    env = _prefect_env(root)
    log = open(root / "prefect-server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [str(PREFECT_PYTHON.with_name("prefect")), "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    cluster = None
    saved = os.environ.get("PREFECT_API_URL")
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    print("prefect server did not start", file=sys.stderr)
                    return None
                time.sleep(1)
        os.environ["PREFECT_API_URL"] = api  # the Prefect cluster's workers report there
        cluster = Cluster(root / "prefect-cluster", n_workers=2, nthreads=4,
                          dask=str(PREFECT_PYTHON.with_name("dask")))  # fmt: skip
        return _prefect_run(cluster.address, n, root, api)
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        if cluster is not None:
            cluster.close()
        server.terminate()
        server.wait()


def _prefect_run(scheduler: str, n: int, root: Path, api: str) -> float | None:
    code = f"""
import time
from prefect import flow, task
from prefect_dask import DaskTaskRunner

@task
def noop(x):
    return x

@flow(task_runner=DaskTaskRunner(address={scheduler!r}))
def many(n):
    futs = noop.map(range(n))
    return [f.result() for f in futs]

from distributed import Client
with Client({scheduler!r}) as c:
    c.wait_for_workers(2, timeout=120)
many(10)
t0 = time.perf_counter()
many({n})
print("RATE", {n} / (time.perf_counter() - t0))
"""
    env = _prefect_env(root)
    env["PREFECT_API_URL"] = api
    try:
        out = subprocess.run(
            [str(PREFECT_PYTHON), "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines():
        if line.startswith("RATE "):
            return float(line.split()[1])
    print(f"prefect peer failed:\n{out.stderr[-2000:]}", file=sys.stderr)
    return None


def run() -> list[dict]:
    import s3fs
    from _dask_cluster import Cluster
    from distributed import Client

    import notebook_flow as nf
    from notebook_flow import config
    from notebook_flow.runners import DaskRunner

    root = Path(tempfile.mkdtemp(prefix="nf-bench-dask-"))
    moto, endpoint = _moto(root)
    cluster = None
    os.environ["NOTEBOOK_FLOW_CACHE_DIR"] = str(root / "client-cache")
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **_options(endpoint))
        fs.mkdir(BUCKET)
        cluster = Cluster(root / "cluster", n_workers=2, nthreads=4)
        client = Client(cluster.address)
        cluster.wait_for_workers(client)
        config._reset_for_tests()
        runner = DaskRunner(client)
        rows: list[dict] = []
        if "throughput" in PARTS:
            rows += _throughput(root, endpoint, moto, cluster, client, runner)
        if "large" in PARTS:
            nf.configure(
                store=f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", storage_options=_options(endpoint)
            )
            rows += _large(fs, runner)
        runner.shutdown()
        client.close()
        return rows
    finally:
        if cluster is not None:
            cluster.close()
        moto.terminate()
        moto.wait()
        shutil.rmtree(root, ignore_errors=True)


def _throughput(root: Path, endpoint: str, moto, cluster, client, runner) -> list[dict]:
    import notebook_flow as nf
    from notebook_flow.cache_policies import INPUTS

    nf.configure(store=f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", storage_options=_options(endpoint))

    @nf.task(cache_policy=INPUTS)
    def noop(x):
        return x

    cpu = _CPU(moto, cluster)
    client.gather(client.map(plain_noop, range(50), pure=False))  # warm up
    before = cpu.read()
    plain = _rate(N, lambda: client.gather(client.map(plain_noop, range(N), pure=False)))
    cpu_plain = cpu.per_run(before, N)
    prefix = f"{BUCKET}/raw-puts-{uuid.uuid4().hex[:8]}"
    client.gather(client.map(plain_put, range(-50, 0), endpoint=endpoint, prefix=prefix))
    before = cpu.read()
    puts = _rate(
        N,
        lambda: client.gather(
            client.map(plain_put, range(N), endpoint=endpoint, prefix=prefix, pure=False)
        ),
    )
    cpu_puts = cpu.per_run(before, N)
    with runner:
        [f.result() for f in noop.map(range(10_000, 10_050))]  # warm up (plugin, imports)

    def through_runner():
        with runner:
            futs = noop.map(range(N))
        [f.result() for f in futs]

    before = cpu.read()
    miss = _rate(N, through_runner)
    cpu_miss = cpu.per_run(before, N)
    before = cpu.read()
    hit = _rate(N, through_runner)
    cpu_hit = cpu.per_run(before, N)
    print(f"[bench_dask] plain {plain:.1f}/s, plain + 1 PUT {puts:.1f}/s, S3 miss {miss:.1f}/s, "
          f"S3 hit {hit:.1f}/s; CPU ms per run: plain {cpu_plain}, plain + 1 PUT {cpu_puts}, "
          f"miss {cpu_miss}, hit {cpu_hit}; load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr, flush=True)  # fmt: skip
    # The same through a local folder (loopback workers share it): our own cost per
    # run, without the S3 server's (which on a loaded box is most of it).
    nf.configure(store=str(root / "local-store"), storage_options={})
    local_miss = _rate(N, through_runner)
    local_hit = _rate(N, through_runner)
    print(f"[bench_dask] local miss {local_miss:.1f}/s, local hit {local_hit:.1f}/s",
          file=sys.stderr, flush=True)  # fmt: skip
    prefect = (
        _prefect_rate(N, root) if os.environ.get("NF_BENCH_DASK_PREFECT", "1") == "1" else None
    )
    peers = {"plain client.map": plain}
    if prefect is not None:
        peers["prefect DaskTaskRunner"] = prefect
    note = "" if prefect is not None else " (prefect: no venv, or did not finish)"
    load = round(os.getloadavg()[0], 1)
    rows = [
        {
            "benchmark": f"dask: {N:,} no-op runs, uncached, committed to S3{note}",
            "metric": "runs/s",
            "ours": miss,
            "peers": {**peers, "client.map + one raw S3 PUT per task": puts},
            "target": ">= 0.25x plain client.map",
            "ok": miss >= 0.25 * plain,
            "cpu_ms_per_run": {
                "ours": cpu_miss,
                "plain client.map": cpu_plain,
                "client.map + one raw S3 PUT per task": cpu_puts,
            },
            "load_average": load,
        },
        {
            "benchmark": f"dask: {N:,} no-op runs, cached (S3 hits){note}",
            "metric": "runs/s",
            "ours": hit,
            "peers": dict(peers),
            "target": ">= 0.5x plain client.map",
            "ok": hit >= 0.5 * plain,
            "cpu_ms_per_run": {"ours": cpu_hit, "plain client.map": cpu_plain},
            "load_average": load,
        },
        {
            "benchmark": f"dask: {N:,} no-op runs, uncached, local folder store",
            "metric": "runs/s",
            "ours": local_miss,
            "peers": {"plain client.map": plain},
            "target": ">= 0.25x plain client.map",
            "ok": local_miss >= 0.25 * plain,
            "load_average": load,
        },
        {
            "benchmark": f"dask: {N:,} no-op runs, cached, local folder store",
            "metric": "runs/s",
            "ours": local_hit,
            "peers": {"plain client.map": plain},
            "target": ">= 0.5x plain client.map",
            "ok": local_hit >= 0.5 * plain,
            "load_average": load,
        },
    ]
    for row in rows:
        print(f"[bench_dask] {row}", file=sys.stderr, flush=True)
    return rows


def _large(fs, runner) -> list[dict]:
    """A ``MB`` MB array result: committed to S3 by a worker and loaded by ``result()``,
    beside a raw s3fs put and get of the same bytes from this process."""
    import numpy as np

    import notebook_flow as nf
    from notebook_flow import _localfs
    from notebook_flow.cache_policies import INPUTS

    @nf.task(cache_policy=INPUTS)
    def big(nbytes):
        return np.ones(nbytes // 8)

    nbytes = MB * 2**20
    t0 = time.perf_counter()
    with runner:
        fut = big.submit(nbytes)
    fut.wait()
    commit = time.perf_counter() - t0
    t0 = time.perf_counter()
    value = fut.result()
    load = time.perf_counter() - t0
    assert value.nbytes == nbytes, value.nbytes
    mapped = isinstance(value, np.memmap)
    del value
    # Another load of the same result (a second future, a direct call): the local copy
    # is mapped again, verified once more (another process would have to).
    _localfs._verified.clear()
    t0 = time.perf_counter()
    with runner:
        again = big.submit(nbytes)
    value = again.result()
    reload = time.perf_counter() - t0
    assert again.run_state.name == "CACHED" and value.nbytes == nbytes
    del value, fut, again
    data = np.ones(nbytes // 8).tobytes()
    path = f"{BUCKET}/raw-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    fs.pipe(path, data)
    raw_put = time.perf_counter() - t0
    del data
    t0 = time.perf_counter()
    got = fs.cat(path)
    raw_get = time.perf_counter() - t0
    assert len(got) == nbytes
    del got
    how = "memory-mapped" if mapped else "in memory: not memory-mapped at this size"
    avg = round(os.getloadavg()[0], 1)
    rows = [
        {
            "benchmark": f"dask: {MB} MB array result computed and committed to S3 by a worker",
            "metric": "s",
            "ours": commit,
            "peers": {"raw s3fs put": raw_put},
            "target": "<= 2x raw put (+ the 1-pass checksum)",
            "ok": commit <= 2 * raw_put + 1.0,
            "load_average": avg,
        },
        {
            "benchmark": f"dask: {MB} MB result loaded by fut.result() from S3 "
            f"(streamed to a local copy, verified, {how})",
            "metric": "s",
            "ours": load,
            "peers": {"raw s3fs get": raw_get},
            "target": "<= 1.5x raw get (+ checksum)",
            "ok": load <= 1.5 * raw_get + 1.0,
            "load_average": avg,
        },
        {
            "benchmark": f"dask: {MB} MB result, a cached submit and result() again "
            "(the local copy re-verified and mapped, no download)",
            "metric": "s",
            "ours": reload,
            "peers": {"raw s3fs get": raw_get},
            "target": "<= 0.5x raw get",
            "ok": reload <= 0.5 * raw_get,
            "load_average": avg,
        },
    ]
    for row in rows:
        print(f"[bench_dask] {row}", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    # Through the module, not __main__: its functions then travel to the workers by
    # reference (a __main__ function is pickled by value, with a fresh copy of the
    # PUT peer's filesystem cache each time).
    import bench_dask

    for row in bench_dask.run():
        peers = ", ".join(f"{k} {v:.4g}" for k, v in row["peers"].items())
        flag = "ok" if row["ok"] else "MISSED"
        print(f"{row['benchmark']}: {row['ours']:.4g} {row['metric']} [{peers}] {flag}")
