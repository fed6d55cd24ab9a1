"""The dashboard's cache view shows the store against its quota, its pins and what
``gc --unreachable`` would free, and prunes on request (issue 17)."""

from __future__ import annotations

import pytest

import notebook_flow as nf
from notebook_flow import config, task
from notebook_flow.storage.pins import pin

pytestmark = [
    # Bokeh 3.9's ColumnDataSource.from_df calls reset_index(inplace=True), which pandas 3.1
    # deprecates; not ours to fix.
    pytest.mark.filterwarnings(
        "ignore:The inplace keyword in DataFrame.reset_index:DeprecationWarning"
    ),
]


def _shift_v1(x: int) -> int:
    return x + 1


def _shift_v2(x: int) -> int:
    return x + 2


def test_cache_view_shows_quota_pins_and_prunes_unreachable() -> None:
    from notebook_flow.dashboard import Dashboard

    nf.configure(max_size="1GB")
    old, new = task(name="shift")(_shift_v1), task(name="shift")(_shift_v2)
    assert (old(1), old(2)) == (2, 3)
    assert new(1) == 3  # the code changed: the results of the old version are unreachable
    store = config.get_store()
    config.get_metadata(store).flush(60)
    old_keys = sorted({old.cache_key(1), old.cache_key(2)})
    pin(store, [old_keys[0]])

    dash = Dashboard(refresh_seconds=0)
    dash.tabs.active = 3
    cache = dash.cache
    text = cache.lifecycle.object
    assert "of a 1.0 GB quota" in text and "3 entries" in text and "1 pinned" in text, text
    assert "would free" in text and "(1 entries)" in text, text
    pinned = dict(zip(cache.keys, cache.table.value["Pinned"], strict=True))
    assert pinned[old_keys[0]] == "📌 pinned" and pinned[old_keys[1]] == ""
    assert not cache.prune.disabled

    cache._ask_prune(None)
    assert cache.confirm.panel.visible
    cache.confirm._confirm()
    assert "Pruned 1 unreachable" in cache.message.object
    assert store.lookup(old_keys[1]) is None  # the unpinned result of old code is gone
    assert store.lookup(old_keys[0]) is not None  # the pinned one stays
    assert store.lookup(new.cache_key(1)) is not None  # the current code's result stays
    assert "would free nothing" in cache.lifecycle.object
    assert cache.prune.disabled
