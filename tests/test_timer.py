"""The call timer under trio's MockClock: no real waiting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
import trio.testing

from router.relay.timer import CallTimer


@dataclass(eq=False)
class FakeLane:
    current: str | None = None  # the CALL in flight
    token: int = 0
    deadline: float = 0.0


class Owner:
    def __init__(self) -> None:
        self.fired: list[tuple[FakeLane, int, float]] = []

    async def on_timeout(self, lane: FakeLane, token: int) -> None:
        self.fired.append((lane, token, trio.current_time()))


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_unanswered_call_fires_once_within_a_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer, owner = CallTimer(30.0), Owner()
    waiting, answered = FakeLane("a"), FakeLane("b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run, nursery)
        start = trio.current_time()
        waiting.token += 1
        timer.arm(owner, waiting)
        answered.token += 1
        timer.arm(owner, answered)
        answered.current = None  # its answer arrived
        await trio.sleep(120)
        nursery.cancel_scope.cancel()
    assert [(lane.current, token) for lane, token, _ in owner.fired] == [
        ("a", waiting.token)]
    fired_at = owner.fired[0][2] - start
    assert 30.0 <= fired_at <= 30.0 + timer.tick_s


async def test_rearming_moves_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    timer, owner = CallTimer(10.0), Owner()
    lane = FakeLane("first")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run, nursery)
        start = trio.current_time()
        lane.token += 1
        timer.arm(owner, lane)
        await trio.sleep(8)
        lane.current = "second"  # first answered, the next CALL went out
        lane.token += 1
        timer.arm(owner, lane)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert [(token, round(at - start)) for _, token, at in owner.fired] == [
        (lane.token, 18)]


async def test_disarmed_lane_never_fires(autojump_clock: trio.testing.MockClock) -> None:
    timer, owner = CallTimer(5.0), Owner()
    lane = FakeLane("x")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run, nursery)
        lane.token += 1
        timer.arm(owner, lane)
        timer.disarm(lane)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert owner.fired == []
