"""Call timeouts for every lane of the node, in one task.

All CALLs share one timeout, so deadlines arrive in the order they are armed and a FIFO
is enough (no heap). An entry is only acted on if its lane still waits on the same
token; answered CALLs simply fall out when their deadline passes.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Protocol

import trio


class _Expires(Protocol):
    async def on_timeout(self, lane: Any, token: int) -> None: ...


class CallTimer:
    """Arms a deadline per CALL and fires ``owner.on_timeout(lane, token)`` when it passes."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._queue: deque[tuple[float, int, _Expires, Any]] = deque()
        self._tokens = itertools.count(1)
        self._wake = trio.Event()

    def arm(self, owner: _Expires, lane: Any) -> int:
        """Start the clock for the CALL now pending on ``lane``; returns its token."""
        token = next(self._tokens)
        self._queue.append((trio.current_time() + self.timeout_s, token, owner, lane))
        if len(self._queue) == 1:
            self._wake.set()
        return token

    async def run(self, nursery: trio.Nursery) -> None:
        """Fire expired deadlines; answers are sent from their own tasks so none blocks this."""
        queue = self._queue
        while True:
            if not queue:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            deadline, token, owner, lane = queue[0]
            if deadline > trio.current_time():
                await trio.sleep_until(deadline)
                continue
            queue.popleft()
            if getattr(lane, "pending_token", None) == token:
                nursery.start_soon(owner.on_timeout, lane, token)
