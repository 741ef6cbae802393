"""A station's backend link that survives the loss of one backend target (DNS SRV).

When the WebSocket to the current target drops, the link does not report the loss to
the session at once: it asks the session to answer the CALLs whose answers were lost,
holds the station's further frames in a small buffer, and dials the next target in RFC
2782 order for up to ``failover_grace_s``. If one accepts, the buffer is sent there and
the session carries on; otherwise the session sees the link closed and closes the
station's link, as OCPP expects. :meth:`move_to_better` moves an idle link back to a
preferred target (failback).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from router.logs import log_event
from router.net.wslink import LinkClosed, WsLink

if TYPE_CHECKING:
    from router.config import BackendEntry
    from router.node import Node
    from router.session import StationSession

log = logging.getLogger("router.failover")
BUFFER = 32  # frames held while moving; a station sends one CALL at a time


class FailoverLink:
    """Stands in for a backend WebSocket in a StationSession (the ``Link`` protocol)."""

    def __init__(self, node: Node, identity: str, backend: BackendEntry, offered: list[str],
                 authorization: str | None, ws: WsLink, priority: int) -> None:
        self.node = node
        self.identity = identity
        self.backend = backend
        self.offered = offered
        self.authorization = authorization
        self.current = ws
        self.priority = priority
        self.subprotocol: str | None = ws.subprotocol
        self.session: StationSession | None = None
        self._buffer: list[str] = []
        self._moving = False
        self._stopping = False

    @property
    def closed(self) -> int | None:
        return None if self._moving else self.current.closed

    @property
    def moving(self) -> bool:
        return self._moving

    async def get_message(self) -> str | bytes:
        while True:
            link = self.current
            try:
                return await link.get_message()
            except LinkClosed:
                if link is not self.current:
                    continue  # we moved to another target on purpose
                if self._stopping or not await self._fail_over():
                    raise

    async def send_message(self, message: str) -> None:
        if self._moving:
            if len(self._buffer) >= BUFFER:
                raise LinkClosed(1001, "too many frames while moving to another backend")
            self._buffer.append(message)
            return
        try:
            await self.current.send_message(message)
        except LinkClosed:
            if self._stopping:
                raise
            # the reader will notice the loss and move; this frame goes to the next target
            self._buffer.append(message)

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None:
        self._stopping = True
        await self.current.aclose(code, reason, wait_s)

    async def _fail_over(self) -> bool:
        from router.node import Refused

        self._moving = True
        try:
            # finish with the old target at once: a CSMS that is stopping waits for us
            await trio.aclose_forcefully(self.current.stream)
            if self.session is not None:
                await self.session.backend_lost("backend link lost; moving to another target")
            deadline = trio.current_time() + self.node.config.node.failover_grace_s
            with trio.move_on_at(deadline):
                while True:
                    try:
                        ws, priority = await self.node.dial_backend(
                            self.identity, self.backend, self.offered, self.authorization)
                    except Refused:
                        await trio.sleep(0.2)
                        continue
                    if ws.subprotocol != self.subprotocol:
                        await ws.aclose(1002, "the station's subprotocol is fixed")
                        await trio.sleep(0.2)
                        continue
                    await self._switch(ws, priority, "backend_failover")
                    return True
            log_event(log, logging.WARNING, "backend_failover_failed", station=self.identity,
                      backend=self.backend.name,
                      grace_s=self.node.config.node.failover_grace_s)
            return False
        finally:
            self._moving = False

    async def _switch(self, ws: WsLink, priority: int, event: str) -> None:
        old = self.current
        self.current, self.priority = ws, priority
        await old.close_now(1000, "moving to another backend target")
        log_event(log, logging.INFO, event, station=self.identity, backend=self.backend.name,
                  priority=priority)
        while self._buffer:
            await ws.send_message(self._buffer.pop(0))

    async def move_to_better(self) -> bool:
        """Failback: move to a target of better priority if one answers (call when idle)."""
        from router.node import Refused

        if self._moving or self._stopping:
            return False
        self._moving = True
        try:
            ws, priority = await self.node.dial_backend(
                self.identity, self.backend, self.offered, self.authorization,
                better_than=self.priority)
            if ws.subprotocol != self.subprotocol:
                await ws.aclose(1002, "the station's subprotocol is fixed")
                return False
            await self._switch(ws, priority, "backend_failback")
            return True
        except Refused:
            return False
        finally:
            self._moving = False
