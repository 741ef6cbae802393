"""router/gcwatch.py: every collection timed by generation while installed; long ones logged."""

from __future__ import annotations

import gc

import pytest

from router import gcwatch
from router.gcwatch import GcWatch
from tests.log_events import events_of


def test_collections_are_timed_by_generation_while_installed() -> None:
    with GcWatch() as watch:
        gc.collect(0)
        gc.collect(2)
        assert watch.pauses[0].total >= 1 and watch.pauses[2].total >= 1
        assert watch.pauses[2].sum_ns > 0
    counted = sum(h.total for h in watch.pauses)
    gc.collect()
    assert sum(h.total for h in watch.pauses) == counted  # removed on exit
    assert watch._callback not in gc.callbacks


def test_a_long_pause_is_logged_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcwatch, "LONG_PAUSE_NS", 0)
    with events_of("router.gc") as events, GcWatch() as watch:
        for _ in range(3):
            gc.collect(2)
    assert watch.long_pauses >= 3
    lines = events.named("gc_pause")
    assert len(lines) == 1  # rate-limited
    assert lines[0]["generation"] == 2 and lines[0]["ms"] >= 0
