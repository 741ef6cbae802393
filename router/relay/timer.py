"""Call timeouts for every lane of the node, in one task.

Arming a CALL writes a deadline on its lane and puts the lane in a set: memory grows
with the lanes that have a CALL in flight, not with the call rate. A sweep runs every
``tick`` seconds (a tenth of the timeout, at most one second), so a CALL is answered by
the node between ``timeout`` and ``timeout + tick`` after it was sent.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio


class _Expires(Protocol):
    async def on_timeout(self, lane: Any, token: int) -> None: ...


class _Timed(Protocol):
    """A lane as the call ledger keeps it (router/relay/ledger.py)."""

    @property
    def current(self) -> object | None: ...  # the CALL in flight, if any

    token: int  # names the CALL in flight
    deadline: float


class CallTimer:
    """Arms a deadline per CALL and fires ``owner.on_timeout(lane, token)`` when it passes."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._armed: dict[Any, _Expires] = {}

    @property
    def tick_s(self) -> float:
        """How often the sweep runs."""
        return min(1.0, self.timeout_s / 10)

    def arm(self, owner: _Expires, lane: _Timed) -> None:
        """Start the clock for the CALL now in flight on ``lane``."""
        lane.deadline = trio.current_time() + self.timeout_s
        self._armed[lane] = owner

    def disarm(self, lane: _Timed) -> None:
        """Forget a lane: its CALL was answered with none queued behind it, or its session
        ended. The sweep walks only lanes with a CALL in flight, a few dozen at any moment
        on a busy node, not every lane that ever had one (two per station)."""
        self._armed.pop(lane, None)

    def __len__(self) -> int:
        """How many lanes have a CALL in flight under this timer."""
        return len(self._armed)

    async def run(self, nursery: trio.Nursery) -> None:
        """Sweep for expired CALLs; answers are sent from their own tasks so none blocks this."""
        while True:
            await trio.sleep(self.tick_s)
            now = trio.current_time()
            expired = [(lane, owner) for lane, owner in self._armed.items()
                       if lane.deadline <= now]
            for lane, owner in expired:
                del self._armed[lane]
                if lane.current is not None:
                    nursery.start_soon(_guarded, owner.on_timeout, lane, lane.token)


async def _guarded(fn: Any, *args: Any) -> None:
    """Run a timeout handler; its failure is logged, never fatal to the node."""
    try:
        await fn(*args)
    except Exception:
        logging.getLogger("router.timer").exception("timeout handler failed")
