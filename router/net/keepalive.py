"""The node's own WebSocket pings, for every link that asks, from one task.

A link with a :class:`~router.net.wslink.Keepalive` notes the time of every read (one
clock call); nothing else happens per frame. One watcher per trio run keeps a heap of
links by the moment each next needs a look: a link quiet for ``interval_s`` gets a ping,
and one still silent ``timeout_s`` later is declared dead, its socket closed under the
reader, which then sees the link closed (1006) with the reason. Each link costs the
watcher one heap entry per interval, not per frame; a cancel scope around every read
cost about 20% of the forwarding CPU (measured with ``bench/forwarding.py``).

Looks that come due close together are taken in one pass: the watcher runs at most one
pass every ``COALESCE_S``, so a link may be looked at up to that much after its time. With
9,000 stations' backend links each due once a minute, at their own moments, the watcher
woke 150 times a second for one look each (2.4% of the node's samples in
``bench/fleet.py``); now it runs at most 20 passes a second.

The watcher is a trio system task started by the first link that needs it, so links made
anywhere (dialled, accepted, in tests) need no plumbing; it ends with the run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

import trio
from trio.lowlevel import RunVar, spawn_system_task

log = logging.getLogger("router.net")

# the shortest time between two wake-ups of the watcher (the smallest ping interval a
# config may set is 0.1 s)
COALESCE_S = 0.05


class Keepalive(NamedTuple):
    """The node's own pings on a link: one after ``interval_s`` without a byte from the far
    end, and the link is dead when nothing comes back within ``timeout_s`` of it."""

    interval_s: float
    timeout_s: float

    @classmethod
    def every(cls, interval_s: float, timeout_s: float) -> Keepalive | None:
        """None for an interval of 0: no pings of our own."""
        return cls(interval_s, timeout_s) if interval_s > 0 else None

    @classmethod
    def of(cls, settings: PingSettings) -> Keepalive | None:
        """From a config section's ``ping_interval_s`` and ``ping_timeout_s``."""
        return cls.every(settings.ping_interval_s, settings.ping_timeout_s)


class PingSettings(Protocol):
    """``[listen]``, or a backend's or peer's dial settings."""

    @property
    def ping_interval_s(self) -> float: ...

    @property
    def ping_timeout_s(self) -> float: ...


class Spawner(Protocol):
    """Where a link starts its ping or its closing (errors there are logged)."""

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None: ...


class Watched(Protocol):
    """What the watcher asks of a link."""

    def keepalive_due(self, now: float, nursery: Spawner) -> float | None:
        """Look at the link now (ping it, or call it dead, in ``nursery``); the time of
        the next look, or None when the link needs no more."""
        ...


class _Watcher:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[Watched]]] = []
        self._order = itertools.count()  # ties in the heap never compare links
        self._wake = trio.Event()

    def add(self, link: Watched, at: float) -> None:
        self._push(at, link)
        if self._heap[0][0] == at:
            self._wake.set()  # earlier than the watcher sleeps until

    def _push(self, at: float, link: Watched) -> None:
        heapq.heappush(self._heap, (at, next(self._order), weakref.ref(link)))

    async def run(self) -> None:
        not_before = -math.inf
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                due = self._heap[0][0] if self._heap else math.inf
                with trio.move_on_at(max(due, not_before)):
                    await self._wake.wait()
                now = trio.current_time()
                heap = self._heap
                if now < not_before or not heap or heap[0][0] > now:
                    continue  # woken by a link added: nothing due yet, or in the window
                not_before = now + COALESCE_S
                while heap and heap[0][0] <= now:
                    _, _, ref = heapq.heappop(heap)
                    link = ref()
                    if link is None:
                        continue  # gone: nothing to ping
                    try:
                        at = link.keepalive_due(now, _Guarded(nursery))
                    except Exception:
                        # a system task that raises ends the whole run: a bug here may
                        # cost this link its pings, never the node
                        log.exception("keepalive look failed")
                        continue
                    if at is not None:
                        self._push(at, link)


class _Guarded:
    """The watcher's nursery, handing out tasks whose errors are logged, not raised."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(_logged, fn, *args)


async def _logged(fn: Callable[..., Awaitable[object]], *args: object) -> None:
    try:
        await fn(*args)
    except Exception:
        log.exception("keepalive task failed")


_WATCHER: RunVar[_Watcher] = RunVar("keepalive_watcher")


def watch(link: Watched, first_look: float) -> None:
    """Have the run's watcher look at ``link`` at ``first_look`` (trio time)."""
    try:
        watcher = _WATCHER.get()
    except LookupError:
        watcher = _Watcher()
        _WATCHER.set(watcher)
        spawn_system_task(watcher.run, name="keepalive watcher")
    watcher.add(link, first_look)
