"""Running a StationSession and its call timer in a unit test, under virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from router.relay.session import StationSession
from router.relay.timer import CallTimer


@asynccontextmanager
async def running(session: StationSession, timer: CallTimer) -> AsyncIterator[trio.Event]:
    """The session and the timer run until the block ends; the event is set once
    ``session.run()`` has returned. A hang fails (after a virtual day) instead of looping."""
    ended = trio.Event()

    async def run() -> None:
        await session.run()
        ended.set()

    with trio.fail_after(24 * 3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer.run, nursery)
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            yield ended
            nursery.cancel_scope.cancel()
