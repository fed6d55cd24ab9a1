"""export / import of 1 GB of results between a local store and S3 (moto's server, its own
process), beside a raw ``s3fs`` put / get of the same bytes in the same run.

* **export**: ``transfer(local, s3)`` — every payload read, verified (size, xxh3-128,
  HMAC with the source's key), re-signed with the destination's key (another key, so the
  second HMAC is paid), PUT, its manifest written and read back — vs ``fs.put`` of the
  same payload files (s3fs's own concurrent bulk upload, no verification);
* **import**: ``transfer(s3, local)`` vs ``fs.get`` of the same objects into a folder.

The figure is our throughput as a fraction of the raw transfer's (the issue asks ≥ 50 %).
``NF_BENCH_TRANSFER_MB`` (default 1024) and ``NF_BENCH_TRANSFER_ENTRY_MB`` (default 16)
set the sizes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dask import _moto, _options  # noqa: E402  (one way to start moto's server)

TOTAL_MB = int(os.environ.get("NF_BENCH_TRANSFER_MB", "1024"))
ENTRY_MB = int(os.environ.get("NF_BENCH_TRANSFER_ENTRY_MB", "16"))
BUCKET = "nf-bench-transfer"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run() -> list[dict]:
    import numpy as np
    import s3fs

    from notebook_flow.lifecycle.transfer import transfer
    from notebook_flow.storage import ResultStore

    root = Path(tempfile.mkdtemp(prefix="nf-bench-transfer-"))
    proc, endpoint = _moto(root)
    try:
        options = _options(endpoint)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        fs.mkdir(BUCKET)
        local = ResultStore(str(root / "local"), signing_key=b"a" * 32)
        n = max(1, TOTAL_MB // ENTRY_MB)
        rng = np.random.default_rng(0)
        for i in range(n):  # incompressible bytes, as a real result would mostly be
            value = rng.integers(0, 2**63, ENTRY_MB * (1 << 20) // 8, dtype=np.int64)
            local.commit(f"{i:032x}", value, task="bench:make", components={}, run_id="r",
                         duration=1.0, expires_at=None)  # fmt: skip
        payloads = sorted(str(p) for p in (root / "local" / "results").rglob("*.npy"))
        nbytes = sum(os.path.getsize(p) for p in payloads)

        # export: raw put of the same files first (then removed, so moto holds 1 GB at a time)
        raw_keys = [f"{BUCKET}/raw/{os.path.basename(p)}" for p in payloads]
        raw_put = _timed(lambda: fs.put(payloads, raw_keys))
        fs.rm(f"{BUCKET}/raw", recursive=True)
        remote = ResultStore(f"s3://{BUCKET}/store", signing_key=b"b" * 32,
                             storage_options=options)  # fmt: skip
        report = None

        def export() -> None:
            nonlocal report
            report = transfer(local, remote, index=False)

        ours_put = _timed(export)
        assert report is not None and len(report.copied) == n, report

        # import: raw get of the exported payload objects vs our import of the entries
        objects = sorted(p for p in fs.find(f"{BUCKET}/store/results"))
        got = root / "raw-get"
        got.mkdir()
        raw_get = _timed(lambda: fs.get(objects, [str(got / os.path.basename(o)) for o in objects]))
        shutil.rmtree(got)
        back = ResultStore(str(root / "back"), signing_key=b"c" * 32)
        report = None

        def import_() -> None:
            nonlocal report
            report = transfer(remote, back, index=False)

        ours_get = _timed(import_)
        assert report is not None and len(report.copied) == n, report
        load = os.getloadavg()[0]
        mb = nbytes / 1e6
        rows = []
        for name, ours, raw in (("export", ours_put, raw_put), ("import", ours_get, raw_get)):
            ratio = raw / ours
            rows.append(
                {
                    "benchmark": f"{name} {mb:,.0f} MB ({n} entries) local ↔ S3 (moto)",
                    "metric": "× raw s3fs throughput",
                    "ours": ratio,
                    "peers": {
                        "ours MB/s": mb / ours,
                        f"raw s3fs {'put' if name == 'export' else 'get'} MB/s": mb / raw,
                        "load average": load,
                    },
                    "target": "≥ 0.5×",
                    "ok": ratio >= 0.5,
                }
            )
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for row in run():
        print(row)
