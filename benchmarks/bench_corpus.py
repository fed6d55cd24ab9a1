"""The real-notebook corpus (tests/corpus): what ``--cache-all`` costs and saves.

Per notebook: two plain runs without the extension, a cold ``notebook-flow run
--cache-all`` on an empty store, and a second one on that store; the fraction of code cells
served from the cache on the second run. All wall-clock, kernel start included; each kind
run ``NF_BENCH_CORPUS_REPEATS`` times (default 3, plain and cold in turn), the fastest kept.

The plain runs: ``jupyter execute --inplace`` (nbclient's own command, in a subprocess: an
interpreter's start, reading and writing the notebook, as ``notebook-flow run`` pays; with
the RFC 3987 grammar import that ``notebook-flow run`` skips skipped too, or it would pay
~1.7 s more than we do for nothing of ours), and nbclient called in this process (no
interpreter start at all: the floor). Target: the cold
runs together cost at most 10 % more than the plain ``jupyter execute`` runs, the command
``notebook-flow run`` replaces; the overhead over the in-process floor is reported beside it.

    python benchmarks/run.py corpus
    python benchmarks/bench_corpus.py [name ...]     # some notebooks only
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "corpus"))

import harness  # noqa: E402

#: Overhead of the cold cached runs over the plain runs, all notebooks together.
TARGET = 0.10
#: Runs of each kind per notebook; the fastest counts (NF_BENCH_CORPUS_REPEATS).
REPEATS = max(1, int(os.environ.get("NF_BENCH_CORPUS_REPEATS", "3")))


def measure(names: list[str] | None = None) -> list[dict]:
    """One row per notebook, then the total."""
    rows: list[dict] = []
    totals = {"floor": 0.0, "plain": 0.0, "cold": 0.0, "second": 0.0, "hits": 0, "cells": 0}
    for nb in harness.load_corpus():
        if names and nb.name not in names:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"nf-bench-corpus-{nb.name}-"))
        try:
            env = harness.kernel_env(tmp)
            # What users get: cells faster than storing them run plain (the tests store
            # every cell instead, NOTEBOOK_FLOW_AUTO_MIN_SECONDS=0).
            env.pop("NOTEBOOK_FLOW_AUTO_MIN_SECONDS", None)
            # Each notebook's runs are repeated, plain and cold in turn (the order flipped
            # each round), and the fastest of each kind kept: this machine is a VM whose
            # single runs move by +-30 % at idle, more than the overhead measured.
            best: dict[str, Any] = {}
            for r in range(REPEATS):
                kinds = ["floor", "plain", "cold"]
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    if kind == "floor":
                        dest = harness.prepare(nb, tmp / f"plain{r}", edited=False, cached=False)
                        got = harness.run_plain(dest, env)
                    elif kind == "plain":
                        dest = harness.prepare(nb, tmp / f"cli{r}", edited=False, cached=False)
                        got = harness.run_plain_cli(dest, env)
                    else:
                        path = harness.prepare(nb, tmp / f"cached{r}", edited=False, cached=True)
                        got = harness.run_cached(path, tmp / f"store{r}", env)
                        store = tmp / f"store{r}"
                    if got.returncode:
                        raise RuntimeError(f"{nb.name}: the {kind} run failed:\n{got.log}")
                    if kind not in best or got.seconds < best[kind].seconds:
                        best[kind] = got
            floor, plain, cold = best["floor"], best["plain"], best["cold"]
            second = harness.run_cached(path, store, env)  # on the last cold run's store
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if second.returncode:
            raise RuntimeError(f"{nb.name}: the second cached run failed:\n{second.log}")
        hits, cells = harness.cached_fraction(second.notebook)
        overhead = cold.seconds / plain.seconds - 1
        rows.append(
            {
                "benchmark": f"corpus {nb.name}",
                "metric": "cold --cache-all overhead over jupyter execute",
                "ours": overhead,
                "peers": {
                    "nbclient in-process s": floor.seconds,
                    "jupyter execute s": plain.seconds,
                    "cold s": cold.seconds,
                    "second s": second.seconds,
                    "from cache": f"{hits}/{cells}",
                },
                "target": "(total ≤ 10 %)",
                "ok": True,  # judged on the total below; one notebook may be dearer
            }
        )
        totals["floor"] += floor.seconds
        totals["plain"] += plain.seconds
        totals["cold"] += cold.seconds
        totals["second"] += second.seconds
        totals["hits"] += hits
        totals["cells"] += cells
    if totals["plain"]:
        overhead = totals["cold"] / totals["plain"] - 1
        rows.append(
            {
                "benchmark": "corpus, all notebooks",
                "metric": "cold --cache-all overhead over jupyter execute",
                "ours": overhead,
                "peers": {
                    "nbclient in-process s": totals["floor"],
                    "over in-process": f"{totals['cold'] / totals['floor'] - 1:+.1%}",
                    "jupyter execute s": totals["plain"],
                    "cold s": totals["cold"],
                    "second s": totals["second"],
                    "from cache": f"{totals['hits']}/{totals['cells']}",
                },
                "target": f"≤ {TARGET:.0%}",
                "ok": overhead <= TARGET,
            }
        )
    return rows


def run() -> list[dict]:
    return measure()


if __name__ == "__main__":
    for row in measure(sys.argv[1:] or None):
        print(row)
