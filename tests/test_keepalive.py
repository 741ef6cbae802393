"""The keepalive watcher (router/net/keepalive.py) on its own: looks come at the times
links ask for, a link that is gone is forgotten, and a look that fails costs only that
link (a system task that raised would end the whole run). MockClock, no sockets."""

from __future__ import annotations

import gc

import trio
import trio.testing

from router.net.keepalive import COALESCE_S, Spawner, watch


class Link:
    def __init__(self, every: float, looks: int = 3, fail: bool = False) -> None:
        self.every, self.left, self.fail = every, looks, fail
        self.looked_at: list[float] = []
        self.pinged = 0

    def keepalive_due(self, now: float, nursery: Spawner) -> float | None:
        self.looked_at.append(now)
        if self.fail:
            raise RuntimeError("a bug in one link's look")
        nursery.start_soon(self.ping)
        self.left -= 1
        return now + self.every if self.left else None

    async def ping(self) -> None:
        self.pinged += 1
        if self.fail:
            raise RuntimeError("never reached")


async def test_looks_come_when_asked_and_end_when_the_link_says(
        autojump_clock: trio.testing.MockClock) -> None:
    slow, fast = Link(10.0), Link(3.0)
    start = trio.current_time()
    watch(slow, start + 10)
    watch(fast, start + 3)  # earlier than the watcher sleeps until: it wakes for it
    await trio.sleep(100)
    assert [t - start for t in fast.looked_at] == [3, 6, 9]
    assert [t - start for t in slow.looked_at] == [10, 20, 30]
    assert fast.pinged == slow.pinged == 3


async def test_looks_due_close_together_share_a_wake_up(
        autojump_clock: trio.testing.MockClock) -> None:
    # 600 links due at their own moments within one second (backend links of a busy node,
    # each due a minute after its last read): a few dozen wake-ups, not 600, and no look
    # comes before its time or later than COALESCE_S after it
    start = trio.current_time()
    links = [Link(60.0, looks=1) for _ in range(600)]
    due = [start + 1 + i / 600 for i in range(600)]
    for link, at in zip(links, due, strict=True):
        watch(link, at)
    await trio.sleep(3)
    assert all(len(link.looked_at) == 1 and link.pinged == 1 for link in links)
    for link, at in zip(links, due, strict=True):
        assert at <= link.looked_at[0] <= at + COALESCE_S
    wake_ups = {link.looked_at[0] for link in links}
    assert len(wake_ups) <= 1 / COALESCE_S + 1


async def test_a_link_added_between_passes_is_looked_at_within_the_bound(
        autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    first, early, later = Link(60.0, looks=1), Link(60.0, looks=1), Link(60.0, looks=1)
    watch(first, start + 1)
    await trio.sleep(1.01)  # the watcher has just run a pass for ``first``
    watch(early, start + 1.02)  # the new head, due inside the window of that pass
    await trio.sleep(1)
    watch(later, start + 2.02)  # the new head, due after the window: on time
    await trio.sleep(1)
    assert [t - start for t in first.looked_at] == [1]
    assert start + 1.02 <= early.looked_at[0] <= start + 1 + COALESCE_S
    assert later.looked_at == [start + 2.02]


async def test_a_failing_look_costs_only_its_link(
        autojump_clock: trio.testing.MockClock) -> None:
    bad, good = Link(1.0, fail=True), Link(5.0)
    watch(bad, trio.current_time() + 1)
    watch(good, trio.current_time() + 2)
    await trio.sleep(30)
    assert len(bad.looked_at) == 1  # dropped after the failure
    assert len(good.looked_at) == 3 and good.pinged == 3  # the run and the others go on


async def test_a_link_that_is_gone_is_forgotten(
        autojump_clock: trio.testing.MockClock) -> None:
    looked: list[float] = []

    class Gone(Link):
        def keepalive_due(self, now: float, nursery: Spawner) -> float | None:
            looked.append(now)
            return now + 1

    watch(Gone(1.0), trio.current_time() + 5)  # held only by the watcher's weak reference
    gc.collect()
    await trio.sleep(20)
    assert looked == []

