"""Ctrl-C is never swallowed by the code that logs metadata problems and goes on: an
import that an interrupt broke off comes back as an ImportError whose context is the
KeyboardInterrupt (found when Ctrl-C landed in a fresh kernel's first submit)."""

from __future__ import annotations

import pytest

from notebook_flow.errors import reraise_interrupt
from notebook_flow.storage import ResultStore
from notebook_flow.tasks import call


def broken_import() -> None:
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        raise ImportError("initialization of duckdb raised unreported exception") from exc


def test_an_error_hiding_an_interrupt_raises_keyboard_interrupt() -> None:
    with pytest.raises(ImportError) as info:
        broken_import()
    with pytest.raises(KeyboardInterrupt):
        reraise_interrupt(info.value)
    reraise_interrupt(ValueError("plain"))  # nothing to re-raise


def test_metadata_recording_lets_an_interrupt_through(tmp_path, caplog) -> None:
    store = ResultStore(str(tmp_path))

    def action(_meta: object) -> None:
        broken_import()

    with pytest.raises(KeyboardInterrupt):
        call._metadata_for(store, action)

    def plain(_meta: object) -> None:
        raise OSError("disk gone")

    call._metadata_for(store, plain)  # a plain metadata problem is logged, not raised
    assert "could not record metadata" in caplog.text
