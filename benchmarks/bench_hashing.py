"""Benchmarks for notebook_flow.hashing.fingerprint against peers measured in the same run.

    python benchmarks/bench_hashing.py

Timings are best-of-N wall clock (time.perf_counter) on whatever machine runs this; the
ratios against joblib.hash (md5 over a pickle stream) and raw xxh3-128 (the ceiling for
buffers) measured in the same run are what to compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import xxhash

from notebook_flow.hashing import fingerprint


def best(fn: Callable[[], object], repeat: int, number: int = 1, warmup: bool = True) -> float:
    """Best-of-``repeat`` seconds per call, each sample averaging ``number`` calls."""
    if warmup:  # lazy imports, caches
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return min(samples)


def xxh3_stream(buffer: memoryview) -> bytes:
    """Raw streaming xxh3-128 over one buffer: the ceiling for hashing an array."""
    hasher = xxhash.xxh3_128()
    hasher.update(buffer)
    return hasher.digest()


def row(
    benchmark: str, metric: str, ours: float, peers: dict[str, float], target: str, ok: bool
) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "metric": metric,
        "ours": ours,
        "peers": peers,
        "target": target,
        "ok": ok,
    }


def bench_array() -> list[dict[str, Any]]:
    a = np.random.default_rng(0).random(100_000_000 // 8)  # 100 MB float64
    gbps = a.nbytes / 1e9
    view = memoryview(a).cast("B")
    ours = gbps / best(lambda: fingerprint(a), repeat=7)
    raw = gbps / best(lambda: xxh3_stream(view), repeat=7)
    jl = gbps / best(lambda: joblib.hash(a), repeat=3, warmup=False)
    strided = a.reshape(-1, 2)[:, 0]  # 50 MB of data, every other element
    ours_strided = (strided.nbytes / 1e9) / best(lambda: fingerprint(strided), repeat=5)
    jl_strided = (strided.nbytes / 1e9) / best(lambda: joblib.hash(strided), repeat=2, warmup=False)
    return [
        row(
            "100 MB float64 array",
            "GB/s",
            ours,
            {"joblib.hash": jl, "raw xxh3_128 (ceiling)": raw},
            ">= 8 GB/s",
            ours >= 8,
        ),
        row(
            "50 MB strided float64 view (copied in 8 MB slabs)",
            "GB/s",
            ours_strided,
            {"joblib.hash": jl_strided},
            "> joblib",
            ours_strided > jl_strided,
        ),
    ]


def bench_frames() -> list[dict[str, Any]]:
    n = 1_000_000
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        {
            "i": np.arange(n, dtype=np.int64),
            "f": rng.random(n),
            "s": pd.Series([f"user-{i % 50_000}" for i in range(n)]),  # pyarrow-backed str
        }
    )
    ours = best(lambda: fingerprint(df), repeat=9) * 1e3
    jl = best(lambda: joblib.hash(df), repeat=3, warmup=False) * 1e3
    hpo = best(lambda: pd.util.hash_pandas_object(df, index=True).to_numpy(), repeat=3) * 1e3
    rows = [
        row(
            "1M-row DataFrame (int64, float64, str)",
            "ms",
            ours,
            {"joblib.hash": jl, "pandas.hash_pandas_object": hpo},
            "<= 10 ms",
            ours <= 10,
        )
    ]
    obj = df.astype({"s": object})
    ours_obj = best(lambda: fingerprint(obj), repeat=3) * 1e3
    jl_obj = best(lambda: joblib.hash(obj), repeat=2, warmup=False) * 1e3
    rows.append(
        row(
            "1M-row DataFrame, str column as object dtype",
            "ms",
            ours_obj,
            {"joblib.hash": jl_obj},
            "< joblib",
            ours_obj < jl_obj,
        )
    )
    table = pa.Table.from_pandas(df, preserve_index=False)
    chunked = pa.concat_tables([table.slice(i, 100_000) for i in range(0, n, 100_000)])
    ours_pa = best(lambda: fingerprint(chunked), repeat=9) * 1e3
    jl_pa = best(lambda: joblib.hash(chunked), repeat=2, warmup=False) * 1e3
    rows.append(
        row(
            "1M-row Arrow table in 10 chunks",
            "ms",
            ours_pa,
            {"joblib.hash": jl_pa},
            "<= 10 ms",
            ours_pa <= 10,
        )
    )
    return rows


def bench_small() -> list[dict[str, Any]]:
    args = (42, "abc")
    ours = best(lambda: fingerprint(args), repeat=7, number=20_000) * 1e6
    jl = best(lambda: joblib.hash(args), repeat=5, number=2_000) * 1e6
    config = {f"key{i}": [i, float(i), str(i)] for i in range(100)}
    ours_cfg = best(lambda: fingerprint(config), repeat=7, number=200) * 1e6
    jl_cfg = best(lambda: joblib.hash(config), repeat=5, number=200) * 1e6
    return [
        row(
            "small arguments (42, 'abc')",
            "µs/call",
            ours,
            {"joblib.hash": jl},
            "<= 5 µs",
            ours <= 5,
        ),
        row(
            "dict of 100 keys -> [int, float, str]",
            "µs/call",
            ours_cfg,
            {"joblib.hash": jl_cfg},
            "< joblib",
            ours_cfg < jl_cfg,
        ),
    ]


def run() -> list[dict[str, Any]]:
    """Run every benchmark; one row per measurement."""
    return [*bench_small(), *bench_array(), *bench_frames()]


def _format(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'benchmark':<48} {'ours':>12}  {'target':<10} ok  peers (ratio ours/peer)"]
    for r in rows:
        peers = ", ".join(
            f"{name} {value:.3g} ({r['ours'] / value:.2g}x)" for name, value in r["peers"].items()
        )
        ours = f"{r['ours']:.3g} {r['metric']}"
        mark = "yes" if r["ok"] else "NO"
        lines.append(f"{r['benchmark']:<48} {ours:>12}  {r['target']:<10} {mark:<3} {peers}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_format(run()))
