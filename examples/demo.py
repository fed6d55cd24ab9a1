"""A small analysis that resumes: run it twice and the second run loads every result.

python examples/demo.py            # first run computes (a few seconds)
python examples/demo.py            # second run: every step is a cache hit
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

import notebook_flow as nf
from notebook_flow import task


@task
def make_sales(days: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic sales: one row per order (made locally, no downloads)."""
    time.sleep(1.0)  # stands in for a slow query
    rng = np.random.default_rng(seed)
    n = days * 2_000
    return pd.DataFrame(
        {
            "day": rng.integers(0, days, n),
            "store": rng.choice(["north", "south", "east", "west"], n),
            "amount": rng.gamma(2.0, 20.0, n).round(2),
        }
    )


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["amount"] > 1.0]


@task
def daily_totals(df: pd.DataFrame) -> pd.DataFrame:
    time.sleep(1.0)  # stands in for heavy work
    return _clean(df).groupby(["day", "store"], as_index=False)["amount"].sum()


@task
def summary(totals: pd.DataFrame) -> dict[str, float]:
    time.sleep(0.5)
    by_store = totals.groupby("store")["amount"].sum()
    return {str(k): round(float(v), 2) for k, v in by_store.items()}


def main() -> None:
    t0 = time.perf_counter()
    sales = make_sales(90)
    totals = daily_totals(sales)
    result = summary(totals)
    elapsed = time.perf_counter() - t0
    print(f"revenue by store: {result}")
    print(f"pipeline took {elapsed:.2f} s")
    from notebook_flow import config

    config.get_metadata().flush()
    h = nf.history(limit=3)
    states = ", ".join(f"{r.task}={r.state}" for r in h.itertuples())
    print(f"last runs: {states}")
    s = nf.stats()
    print(f"store: {s['hits']} hits, {s['misses']} misses, {s['time_saved']:.1f} s saved so far")


if __name__ == "__main__":
    main()
