"""Cache lifecycle (issue 17): the gc decision over 100,000 entries, eviction beside
``rm -rf``, and what recording last use adds to a cache hit (beside diskcache's memoize).

The decision is timed cold (no listing kept: every file is lstat-ed, like ``du``; the best
of three, each beside a ``du`` of the same store) and warm (the listings an earlier
decision kept in the store, read by a fresh process, with a few commits since), each with
its CPU time: on a shared machine the wall time follows the load average, which the table
states. Eviction is timed beside ``rm -rf`` of the
same number of files, wall and CPU (``rm``'s from ``RUSAGE_CHILDREN``).

The 100,000-entry store is written directly as files (valid manifests naming small
payloads): committing them one by one would measure commits, not the decision.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench_tasks import _best_per_call

N_ENTRIES = 100_000
N_EVICT = 1_000
COLD_TRIES = 3


def _fake_store(root: Path, n: int, *, start: int = 0) -> list[str]:
    """``n`` entries (manifest + 512-byte payload each) under ``root``; their keys."""
    keys = []
    payload = b"\0" * 512
    now = time.time()
    made: set[str] = set()
    for i in range(start, start + n):
        key = f"{i:032x}"[::-1]  # spread over the shards
        shard = key[:2]
        if shard not in made:
            (root / "manifests" / shard).mkdir(parents=True, exist_ok=True)
            (root / "results" / shard).mkdir(parents=True, exist_ok=True)
            made.add(shard)
        rel = f"results/{shard}/{key}-{'0' * 16}.bin"
        manifest = {
            "format_version": 1, "key": key, "task": f"m:t{i % 50}", "serializer": "pickle",
            "payload": rel, "size": 512, "checksum": "0" * 32, "signature": None,
            "created_at": now - i, "expires_at": None, "duration": 1.0, "components": {},
            "run_id": "r",
        }  # fmt: skip
        (root / rel).write_bytes(payload)
        (root / "manifests" / shard / f"{key}.json").write_bytes(json.dumps(manifest).encode())
        keys.append(key)
    return keys


def _timed(fn):  # noqa: ANN001, ANN202
    """(result, wall seconds, CPU seconds of this process) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _decide(store):  # noqa: ANN001, ANN202
    from notebook_flow.lifecycle import inventory
    from notebook_flow.lifecycle.rules import Rules, decide

    inv = inventory.scan(store)
    return inv, decide(inv, Rules(max_size=inv.total // 2))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def gc_decision() -> list[dict]:
    from notebook_flow.lifecycle import evict, shards, usage
    from notebook_flow.storage import ResultStore
    from notebook_flow.storage.pins import pin

    root = Path(tempfile.mkdtemp(prefix="nf-bench-gc-"))
    try:
        keys = _fake_store(root / "store", N_ENTRIES)
        store = ResultStore(str(root / "store"))
        for key in keys[::3]:  # a third were hit lately, from another process
            usage.touch(store, key)
        usage.flush(store)
        pin(store, keys[:1000])
        load = os.getloadavg()[0]
        # Cold: no listing kept yet (a store gc never saw): every file is lstat-ed. Best of
        # COLD_TRIES, each alternating with du (the floor on this machine now: it lists and
        # stats the same files, nothing more), so that both see the same moments of load.
        colds, dus = [], []
        for _ in range(COLD_TRIES):
            shards.forget()
            shutil.rmtree(root / "store" / shards.KEPT_DIR, ignore_errors=True)
            (inv, doomed), wall, cpu = _timed(lambda: _decide(store))
            assert len(inv.entries) == N_ENTRIES and doomed
            colds.append((wall, cpu))
            c0 = _children_cpu()
            t0 = time.perf_counter()
            subprocess.run(["du", "-sb", str(root / "store")], check=True, capture_output=True)
            dus.append((time.perf_counter() - t0, _children_cpu() - c0))
        (cold, cold_cpu), (du, du_cpu) = min(colds), min(dus)
        # Warm: the listings kept by an earlier decision, 10 entries committed since (in
        # up to 10 shards); a fresh process (nothing in memory) reads them from the store.
        time.sleep(shards.MARGIN_NS / 1e9 + 0.1)
        _decide(store)  # keeps the folders that were still settling during the cold one
        _fake_store(root / "store", 10, start=N_ENTRIES)
        shards.forget()
        (inv, doomed), warm, warm_cpu = _timed(lambda: _decide(store))
        assert len(inv.entries) == N_ENTRIES + 10 and doomed
        (_inv, _doomed), again, again_cpu = _timed(lambda: _decide(store))

        chosen = doomed[:N_EVICT]
        c0 = time.process_time()
        t0 = time.perf_counter()
        done = evict.remove_entries(store, ((d.key, d.committed, ()) for d in chosen))
        ours_wall, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        assert len(done) == N_EVICT
        # rm of the next 1,000 chosen entries' files: the same kind of files in the same
        # (large) folders, which make every rename and unlink dearer than in a small one.
        files = [
            str(root / "store" / rel)
            for d in doomed[N_EVICT : 2 * N_EVICT]
            for rel in (f"manifests/{d.key[:2]}/{d.key}.json",
                        *(f for f, _mtime in inv.entries[d.key].files))
        ]  # fmt: skip
        c0 = _children_cpu()
        t0 = time.perf_counter()
        subprocess.run(["xargs", "-0", "rm", "-f"], input="\0".join(files).encode(), check=True)
        same_wall, same_cpu = time.perf_counter() - t0, _children_cpu() - c0
        twin = root / "twin"  # the same number of files, removed by rm -rf
        _fake_store(twin, N_EVICT)
        c0 = _children_cpu()
        t0 = time.perf_counter()
        subprocess.run(["rm", "-rf", str(twin)], check=True)
        rm_wall, rm_cpu = time.perf_counter() - t0, _children_cpu() - c0
        ours, rm_rate = N_EVICT / ours_wall, N_EVICT / rm_wall
        where = {"load average (1 min) at start": load}
        return [
            {
                "benchmark": f"gc decision, {N_ENTRIES:,} entries, cold (scan + LRU to half)",
                "metric": "s",
                "ours": cold,
                "peers": {
                    **where, "ours CPU s": cold_cpu, "du -sb of the store s": du,
                    "du CPU s": du_cpu, "ratio ours/du": cold / du,
                },
                "target": "≤ 2 s",
                "ok": cold <= 2.0,
            },
            {
                "benchmark": "gc decision, same store, listings kept, 10 commits since",
                "metric": "s",
                "ours": warm,
                "peers": {
                    "ours CPU s": warm_cpu, "again in the same process s": again,
                    "its CPU s": again_cpu, "ratio ours/du": warm / du,
                },
                "target": "≤ 2 s",
                "ok": warm <= 2.0,
            },
            {
                "benchmark": "eviction throughput (claimed, manifest then payload)",
                "metric": "entries/s",
                "ours": ours,
                "peers": {
                    "rm -f of as many entries' files, same store, entries/s": N_EVICT / same_wall,
                    "ratio ours/rm same store": ours_wall and same_wall / ours_wall,
                    "rm CPU µs/entry same store": same_cpu / N_EVICT * 1e6,
                    "CPU ratio rm/ours same store": same_cpu / ours_cpu if ours_cpu else 0.0,
                    "rm -rf of a fresh copy entries/s": rm_rate,
                    "ratio ours/rm -rf": ours / rm_rate,
                    "ours CPU µs/entry": ours_cpu / N_EVICT * 1e6,
                    "rm -rf CPU µs/entry": rm_cpu / N_EVICT * 1e6,
                },
                "target": "reported",
                "ok": True,
            },
        ]  # fmt: skip
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)  # 200,000 files: not rmtree


def hit_with_last_use() -> dict:
    import diskcache

    import notebook_flow as nf
    from notebook_flow import config
    from notebook_flow.lifecycle import usage

    root = Path(tempfile.mkdtemp(prefix="nf-bench-"))
    try:
        config._reset_for_tests()
        nf.configure(store=str(root / "nf"), max_size="1GB")

        def plain(x, s):
            return x + len(s)

        cached = nf.task(plain)
        cached(42, "abc")
        dc = diskcache.Cache(str(root / "dc"))
        dmemo = dc.memoize()(plain)
        dmemo(42, "abc")
        with_touch = _best_per_call(lambda: cached(42, "abc"), 2000)
        real = usage.touch
        usage.touch = lambda store, key: None  # type: ignore[assignment]
        try:
            without = _best_per_call(lambda: cached(42, "abc"), 2000)
        finally:
            usage.touch = real
        disk = _best_per_call(lambda: dmemo(42, "abc"), 2000)
        store = config.get_store()
        key = "ab" * 16
        touch = _best_per_call(lambda: real(store, key), 20000)
        config.get_metadata().flush()
        dc.close()
        return {
            "benchmark": "cache hit with last-use recording, f(int, str)",
            "metric": "µs/call",
            "ours": with_touch * 1e6,
            "peers": {
                "ours without recording µs": without * 1e6,
                "diskcache memoize µs": disk * 1e6,
                "ratio ours/diskcache": with_touch / disk,
                "usage.touch alone µs": touch * 1e6,
            },
            "target": "touch ≤ 2% of a diskcache hit",
            "ok": touch <= 0.02 * disk,
        }
    finally:
        config._reset_for_tests()
        shutil.rmtree(root, ignore_errors=True)


def run() -> list[dict]:
    os.environ.setdefault("NOTEBOOK_FLOW_CONFIG_DIR", tempfile.mkdtemp(prefix="nf-bench-key-"))
    return [*gc_decision(), hit_with_last_use()]


if __name__ == "__main__":
    for row in run():
        print(row)
