"""What the gc decision reads (issue 17): shard folders are listed again only when their
stamp changed, a listing taken right after a change is not reused, the listings kept in
the store serve the next process; the hits the local DuckDB index recorded count as use
when a touch file is missing; eviction leaves no payload of an entry behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from notebook_flow.lifecycle import inventory, quota, usage
from notebook_flow.storage import ResultStore

KEY_A, KEY_B = "ab" + "0" * 30, "ab" + "1" * 30  # one shard


def _commit(store: ResultStore, key: str, value: Any) -> None:
    store.commit(
        key, value, task="t", components={}, run_id="r", duration=0.1, expires_at=None
    )  # fmt: skip


def _settle(store: ResultStore, shard: str, when: float) -> None:
    """Give the shard's two folders the modification time ``when`` (a past write)."""
    for top in ("manifests", "results"):
        os.utime(store._path(f"{top}/{shard}"), (when, when))


def _plant(store: ResultStore, key: str, size: int) -> None:
    """A file that appears without its folder's stamp changing (no real write does that:
    it shows what the scan believes without looking)."""
    folder = store._path("manifests/ab")
    stamp = os.stat(folder).st_mtime_ns
    Path(folder, f"{key}.json").write_bytes(b"{}" + b" " * size)
    os.utime(folder, ns=(stamp, stamp))


def _scan_elsewhere(store: ResultStore) -> dict[str, int]:
    code = (
        "import json, sys; from notebook_flow.storage import ResultStore;"
        "from notebook_flow.lifecycle import inventory;"
        "inv = inventory.scan(ResultStore(sys.argv[1]));"
        "print(json.dumps({k: e.size for k, e in inv.entries.items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, store.url], check=True, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout))


def test_unchanged_folders_are_not_listed_again_changed_ones_are(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    _commit(store, KEY_A, np.arange(5000))
    _settle(store, "ab", time.time() - 60)
    assert set(inventory.scan(store).entries) == {KEY_A}  # listed, and kept
    _plant(store, KEY_B, 10)
    assert set(inventory.scan(store).entries) == {KEY_A}  # the kept listing, not a listing
    assert set(_scan_elsewhere(store)) == {KEY_A}  # another process reads it from the store
    # Any real write sets the folder's time: the folder is listed again, here and there.
    Path(store._path(f"manifests/ab/{KEY_B}.json")).unlink()
    _commit(store, KEY_B, np.arange(6000))
    assert set(inventory.scan(store).entries) == {KEY_A, KEY_B}
    assert set(_scan_elsewhere(store)) == {KEY_A, KEY_B}


def test_a_listing_taken_just_after_a_change_is_not_reused(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    _commit(store, KEY_A, np.arange(5000))  # the folder changed just now
    assert set(inventory.scan(store).entries) == {KEY_A}
    # A write in the same clock tick as the change seen leaves the stamp as it was: the
    # listing must not be believed until the folder's time is safely in the past.
    _plant(store, KEY_B, 10)
    assert set(inventory.scan(store).entries) == {KEY_A, KEY_B}
    assert set(_scan_elsewhere(store)) == {KEY_A, KEY_B}


def test_kept_listings_that_do_not_parse_are_ignored(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    _commit(store, KEY_A, np.arange(5000))
    _settle(store, "ab", time.time() - 60)
    sizes = _scan_elsewhere(store)
    kept = Path(store.local_dir("listing"))
    for path in kept.iterdir():
        path.write_bytes(b'{"v": 1, "stamp": [1, 2], "names": "x", "sizes": [1]}')
    assert _scan_elsewhere(store) == sizes


def test_a_hit_recorded_only_in_the_index_counts_as_use() -> None:
    from notebook_flow import config, task

    @task(name="lu")
    def f(i: int) -> Any:
        return np.full(20_000, float(i))

    f(1)
    f(2)
    store = config.get_store()
    k1, k2 = f.cache_key(1), f.cache_key(2)
    old = time.time() - 3600
    for key, when in ((k1, old - 60), (k2, old)):  # by commit time k1 would go first
        path = store._path(store._manifest_rel(key))
        os.utime(path, (when, when))
    assert f(1)[0] == 1.0  # a hit: its run event reaches the DuckDB index...
    usage._pending.clear()  # ...its touch file is never written (the process dies first)
    config.get_metadata(store).flush()
    inv = inventory.scan(store)
    assert inv.entries[k1].last_used > old and inv.entries[k2].last_used == old
    size = inv.entries[k1].size
    quota.enforce(store, max_size=size + size // 2)
    assert set(inventory.scan(store).entries) == {k1}
    payloads = [rel for rel, _size, _mtime in inventory.listing(store, "results")]
    assert all(rel.split("/")[-1].startswith(k1) for rel in payloads), payloads


def test_a_kept_listing_round_trips_and_any_damage_to_it_is_refused(tmp_path: Path) -> None:
    from notebook_flow.lifecycle import shards

    odd = os.fsdecode(b"\xff\xfe-not-utf8")  # a name as os.scandir gives it
    kept = [
        shards.Shard(
            "ab", (123, 7), ["x.json", odd, "y"], [1, 2, 3], [1.5, 2.5, 3.5], trusted=True
        ),
        shards.Shard("cd", (456, 8), [], [], [], trusted=True),
    ]
    store = ResultStore(str(tmp_path / "lc"))
    shards._keep(store, "manifests", kept)
    path = Path(store.local_dir("listing"), "manifests.bin")
    data = path.read_bytes()
    got = shards._parse_kept(data)
    assert sorted(got) == ["ab", "cd"]
    assert list(got["ab"].rows) == [("x.json", 1, 1.5), (odd, 2, 2.5), ("y", 3, 3.5)]
    assert got["ab"].stamp == (123, 7) and got["cd"].names == [] and got["cd"].trusted
    assert shards._load_kept(store, "manifests").keys() == got.keys()
    head, body = data.split(b"\n", 2)[:2], data.split(b"\n", 2)[2]

    def forged(header: object, tail: bytes = body) -> bytes:
        return head[0] + b"\n" + json.dumps(header).encode() + b"\n" + tail

    from array import array

    def tail_with(sizes: list[int], mtimes: list[float]) -> bytes:
        names = body[: len(body) - 48]
        return names + array("q", sizes).tobytes() + array("d", mtimes).tobytes()

    rows = [["ab", 123, 7, 3, len(body) - 48], ["cd", 456, 8, 0, 0]]
    damaged = [
        data[:-1],  # torn
        data + b"\0",  # padded
        b"x" + data[1:],  # not ours
        forged([["ab", 123, 7, 4, len(body) - 48], rows[1]]),  # a count the names deny
        forged([["ab", -1, 7, 3, len(body) - 48], rows[1]]),  # a negative stamp
        forged([["ab", 123, 7, 3, len(body) - 49], ["cd", 456, 8, 0, 1]]),  # names moved
        forged({"ab": rows[0]}),  # not a list
        head[0] + b"\n" + b"[" * 100_000 + b"\n" + body,  # nested past the recursion limit
        forged(rows, tail_with([1, -2, 3], [1.5, 2.5, 3.5])),  # a negative size
        forged(rows, tail_with([1, 2, 3], [1.5, float("nan"), 3.5])),  # a time that is none
    ]
    for bad in damaged:
        try:
            shards._parse_kept(bad)
        except (ValueError, TypeError, RecursionError):
            pass
        else:  # pragma: no cover - the assertion names the case
            raise AssertionError(f"accepted a damaged listing: {bad[:80]!r}")
        path.write_bytes(bad)
        assert shards._load_kept(store, "manifests") == {}


def test_listings_kept_one_file_per_shard_by_an_older_version_are_removed(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "lc"))
    _commit(store, KEY_A, np.arange(5000))
    _settle(store, "ab", time.time() - 60)
    kept = Path(store.local_dir("listing"))
    (kept / "manifests-ab.json").write_bytes(b'{"v": 1}')
    inventory.scan(store)
    assert sorted(p.name for p in kept.iterdir()) == ["manifests.bin", "results.bin"]
    assert set(_scan_elsewhere(store)) == {KEY_A}
