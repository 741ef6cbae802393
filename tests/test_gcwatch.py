"""router/gcwatch.py: every collection timed by generation while installed; long ones logged."""

from __future__ import annotations

import gc
import itertools

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


class _FakeGc:
    """Stands in for the gc module's freeze/unfreeze/collect (a test must not freeze the
    test process)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.found = 5000  # objects each collect finds (a sweep worth its pause)

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def collect(self, generation: int = 2) -> int:
        self.calls.append("collect")
        return self.found


@pytest.fixture
def fake_gc(monkeypatch: pytest.MonkeyPatch) -> _FakeGc:
    fake = _FakeGc()
    for name in ("freeze", "unfreeze", "collect"):
        monkeypatch.setattr(gcwatch.gc, name, getattr(fake, name))
    return fake


def test_each_tick_freezes_the_survivors(fake_gc: _FakeGc) -> None:
    keeper = gcwatch.GcHousekeeper(sweep_min=1000)
    assert keeper.tick(1.0, arrivals=300, population=300) == "freeze"
    assert keeper.tick(2.0, arrivals=300, population=300) == "freeze"
    assert fake_gc.calls == ["freeze", "freeze"]


def test_a_sweep_waits_for_enough_departures_and_a_quiet_spell(fake_gc: _FakeGc) -> None:
    keeper = gcwatch.GcHousekeeper(sweep_min=100, sweep_fraction=0.5, quiet_s=30.0,
                                   max_wait_s=3600.0)
    keeper.tick(0.0, arrivals=1000, population=1000)  # arrivals alone never sweep
    assert keeper.tick(100.0, arrivals=1000, population=1000) == "freeze"
    keeper.tick(101.0, arrivals=1000, population=400)  # 600 left: due, not quiet
    with events_of("router.gc") as events:
        assert keeper.tick(130.0, arrivals=1000, population=400) == "freeze"
        assert keeper.tick(131.0, arrivals=1000, population=400) == "sweep"
    assert fake_gc.calls[-3:] == ["unfreeze", "collect", "freeze"]
    [sweep] = events.named("gc_sweep")
    assert sweep["collected"] == 5000 and sweep["sessions_ended"] == 600
    assert keeper.tick(200.0, arrivals=1000, population=400) == "freeze"  # counted afresh


def test_constant_churn_still_gets_a_sweep_after_max_delay(fake_gc: _FakeGc) -> None:
    keeper = gcwatch.GcHousekeeper(sweep_min=100, sweep_fraction=0.5, quiet_s=30.0,
                                   max_delay_s=600.0)
    keeper.tick(0.0, arrivals=1000, population=1000)
    arrivals, results = 1000, []
    for second in range(1, 1401):
        arrivals += 5  # five stations leave and five others come every second: never quiet
        results.append(keeper.tick(float(second), arrivals=arrivals, population=1000))
    # due once 500 sessions ended (second 100), forced 600 s later (second 700); due again
    # 100 s after that, forced at second 1400
    assert [i + 1 for i, r in enumerate(results) if r == "sweep"] == [700, 1400]


def test_the_default_delay_bounds_frozen_garbage_under_churn(fake_gc: _FakeGc) -> None:
    """Defaults, 2,000 stations each leaving and dialling again every 300 s on average
    (bench/soak.py): a sweep every 143 + 300 s or so, not once an hour."""
    keeper = gcwatch.GcHousekeeper()
    keeper.tick(0.0, arrivals=2000, population=2000)
    arrivals, sweeps = 2000, [0]
    for second in range(1, 3601):
        arrivals += 7
        if keeper.tick(float(second), arrivals=arrivals, population=2000) == "sweep":
            sweeps.append(second)
    assert len(sweeps) > 7 and max(b - a for a, b in itertools.pairwise(sweeps)) <= 450


def test_a_steady_node_is_swept_once_an_hour_when_quiet(fake_gc: _FakeGc) -> None:
    """No one leaves, yet traffic makes cycles a rarely collected young generation hands
    to the freezer: they are collected at the latest an hour after the last sweep."""
    keeper = gcwatch.GcHousekeeper(sweep_min=1000, quiet_s=30.0, max_wait_s=3600.0)
    results = [keeper.tick(float(second), arrivals=10, population=10)
               for second in range(0, 7201)]
    assert [i for i, r in enumerate(results) if r == "sweep"] == [3600, 7200]


def test_fruitless_sweeps_back_off_and_a_fruitful_one_starts_over(fake_gc: _FakeGc) -> None:
    """Sessions leave no cycles now: a sweep that finds almost nothing doubles what the
    next one waits for (departures and time), up to 16 times; garbage found resets it."""
    fake_gc.found = 0
    keeper = gcwatch.GcHousekeeper(sweep_min=100, sweep_fraction=0.5, quiet_s=30.0,
                                   max_delay_s=600.0)
    keeper.tick(0.0, arrivals=1000, population=1000)
    arrivals, sweeps = 1000, []
    for second in range(1, 20_001):
        arrivals += 5
        if keeper.tick(float(second), arrivals=arrivals, population=1000) == "sweep":
            sweeps.append(second)
            if len(sweeps) == 4:
                fake_gc.found = 5000  # garbage again: the next wait is the first one's
    gaps = [b - a for a, b in itertools.pairwise([0, *sweeps])]
    # due after 500 x backoff departures (100 s x backoff at 5 a second), forced 600 s
    # later; the fifth sweep (backoff 16) finds garbage, so the sixth waits as the first
    assert gaps[:6] == [700, 800, 1000, 1400, 2200, 700]


class _Switch:
    """Stands in for gc.enable/disable/isenabled (the test process keeps its collector)."""

    def __init__(self) -> None:
        self.enabled = True

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch, fake_gc: _FakeGc) -> _Switch:
    fake = _Switch()
    monkeypatch.setattr(gcwatch.gc, "enable", fake.enable)
    monkeypatch.setattr(gcwatch.gc, "disable", fake.disable)
    return fake


def test_a_burst_of_session_steps_holds_automatic_collections_until_a_quiet_tick(
        switch: _Switch) -> None:
    keeper = gcwatch.GcHousekeeper(busy_steps=100)
    with keeper:
        keeper.tick(0.0, arrivals=0, population=0)
        for _ in range(99):
            keeper.step()
        assert switch.enabled  # 99 steps within a tick: no burst
        keeper.tick(1.0, arrivals=0, population=0)
        for _ in range(99):
            keeper.step()
        assert switch.enabled  # counted afresh from the tick
        keeper.step()
        assert not switch.enabled  # the 100th step within one tick: held at once
        for _ in range(150):
            keeper.step()
        keeper.tick(2.0, arrivals=0, population=0)
        assert not switch.enabled  # a busy second: still held
        assert keeper.held_seconds == 1
        for _ in range(10):
            keeper.step()
        keeper.tick(3.0, arrivals=0, population=0)
        assert switch.enabled  # a quiet second: collections resume
        for _ in range(100):
            keeper.step()
        assert not switch.enabled
    assert switch.enabled  # leaving the housekeeper never leaves the collector off

