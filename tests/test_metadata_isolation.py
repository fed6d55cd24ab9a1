"""One bad event never costs another: odd strings are stored escaped, a record that cannot
be stored at all is dropped alone (issue 13, finding 4: a lone surrogate in one error
message emptied ``history()`` of 41 runs)."""

from __future__ import annotations

import logging
import os

import pytest

from notebook_flow.errors import MetadataError
from notebook_flow.metadata import CacheEntry, MetadataStore, RunEvent
from notebook_flow.metadata.records import storable, storable_text
from notebook_flow.states import RunState

T0 = 1_700_000_000.0
SURROGATE = os.fsdecode(b"data_\xff.csv")  # 'data_\udcff.csv': what a raised message holds


@pytest.fixture
def store(tmp_path):
    s = MetadataStore(str(tmp_path / "meta" / "metadata.duckdb"), auto_mark_crashed=False)
    yield s
    s.close()


def ev(i: int, **kw: object) -> RunEvent:
    fields: dict = {"task": "load", "task_identity": "load-id", "key": None}
    fields.update({"state": RunState.COMPLETED, **kw})
    return RunEvent(run_id=f"r{i}", at=T0 + i, **fields)


def entry(key: str, **kw: object) -> CacheEntry:
    fields: dict = dict(
        key=key, task="load", task_identity="load-id", size=10, created_at=T0,
        expires_at=None, duration=1.0, serializer="json", payload=f"p/{key}.json",
        components={"source": "aa"}, run_id="r",
    )  # fmt: skip
    fields.update(kw)
    return CacheEntry(**fields)


def test_surrogates_and_non_str_values_are_stored_escaped(store: MetadataStore) -> None:
    store.record_run(ev(0, error=f"FileNotFoundError: {SURROGATE}", state=RunState.FAILED))
    store.record_run(ev(1, task=f"load {SURROGATE}", tags=("ok", SURROGATE)))
    store.record_run(ev(2, tags=(1, None)))  # type: ignore[arg-type]
    for i in range(3, 41):
        store.record_run(ev(i, task="other"))
    store.record_cache_entry(entry("a" * 32, task=SURROGATE, components={SURROGATE: "x"}))
    store.record_cache_entry(entry("b" * 32))
    df = store.history(limit=100)
    assert len(df) == 41  # every run kept, the odd ones with them
    rows = df.set_index("run_id")
    assert rows.loc["r0", "error"] == "FileNotFoundError: data_\\udcff.csv"
    assert rows.loc["r1", "task"] == "load data_\\udcff.csv"
    assert list(rows.loc["r1", "tags"]) == ["ok", "data_\\udcff.csv"]
    assert list(rows.loc["r2", "tags"]) == ["1", "None"]
    entries = store.cache_entries()
    assert sorted(entries.key) == ["a" * 32, "b" * 32]


def test_a_record_no_fix_can_store_is_dropped_alone(
    store: MetadataStore, caplog: pytest.LogCaptureFixture
) -> None:
    bad = ev(5)
    bad.at = "not a time"  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="notebook_flow"):
        for i in range(5):
            store.record_run(ev(i))
        store.record_run(bad)
        for i in range(6, 12):
            store.record_run(ev(i))
        df = store.history(limit=100)
    assert sorted(df.run_id) == sorted(f"r{i}" for i in range(12) if i != 5)
    assert "Dropped one metadata record" in caplog.text


def test_a_record_the_database_refuses_is_isolated_and_dropped_alone(
    store: MetadataStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="notebook_flow"):
        for i in range(20):
            store.record_run(ev(i))
        store.record_cache_entry(entry("c" * 32, size=2**70))  # no BIGINT holds it
        store.record_cache_entry(entry("d" * 32))
        for i in range(20, 40):
            store.record_run(ev(i))
        with pytest.raises(MetadataError, match="1 metadata events were lost"):
            store.flush()
    df = store.history(limit=100)
    assert len(df) == 40
    assert list(store.cache_entries().key) == ["d" * 32]
    assert "Dropped one metadata record (CacheEntry" in caplog.text


def test_storable_returns_clean_records_unchanged() -> None:
    e = ev(1, tags=("a", "b"))
    assert storable(e) is e
    assert storable_text("plain") == "plain" and storable_text("é") == "é"


def test_task_history_is_complete_with_surrogates_in_names_tags_and_errors() -> None:
    import notebook_flow as nf
    from notebook_flow.cache_policies import NONE
    from notebook_flow.errors import ConfigurationTypeError

    @nf.task(name=f"load {SURROGATE}", tags=[SURROGATE, "ok"], cache_policy=NONE)
    def odd(x: int) -> int:
        return x

    @nf.task(name="fails", cache_policy=NONE)
    def fails(x: int) -> int:
        raise FileNotFoundError(f"no such file: {SURROGATE}")

    @nf.task(name="plain", cache_policy=NONE)
    def plain(x: int) -> int:
        return x

    for i in range(13):
        assert odd(i) == plain(i) == i
        with pytest.raises(FileNotFoundError):
            fails(i)
    df = nf.history(limit=1000)
    assert len(df) == 39  # nobody's runs lost (was 0 of 41)
    assert set(df.task) == {"load data_\\udcff.csv", "fails", "plain"}
    assert df[df.task == "fails"].error.str.contains("data_\\udcff", regex=False).all()
    with pytest.raises(ConfigurationTypeError, match="tags"):
        nf.task(tags=[1, None])(plain.fn)
    with pytest.raises(ConfigurationTypeError, match="name"):
        nf.task(name=123)(plain.fn)  # type: ignore[call-overload]
