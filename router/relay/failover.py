"""A station's backend link that survives the loss of one backend target (DNS SRV).

When the WebSocket to the current target drops, the link does not report the loss to
the session at once: it asks the session to answer the CALLs whose answers were lost
(``on_lost``), holds the station's further frames in a small buffer, and redials the
next target in RFC 2782 order for up to the failover grace period. If one accepts, the
buffer is sent there and the session carries on; otherwise the session sees the link
closed and closes the station's link, as OCPP expects. :meth:`move_to_better` moves an
idle link back to a preferred target (failback).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from router.config import BackendEntry
from router.logs import log_event
from router.net.handshake import DialFailed
from router.net.wslink import LinkClosed, LinkInfo, WsLink
from router.wire.frames import CALL, SEND, Frame

log = logging.getLogger("router.failover")
BUFFER = 32  # frames held while moving; a station sends one CALL at a time
RETRY_S = 0.2  # between two rounds of dialling while the grace period lasts
IDLE_WAIT_S = 1.0  # a failback waits this long for a busy link's CALL to be answered
IDLE_POLL_S = 0.01

Redial = Callable[[int | None], Awaitable[tuple[WsLink, int]]]
"""Opens the station's backend link again: ``better_than`` a priority, or any target
(None); returns the link and its target's priority, or raises DialFailed."""


class FailoverLink:
    """Stands in for a backend WebSocket in a StationSession (the ``Link`` protocol)."""

    def __init__(self, identity: str, backend: BackendEntry, ws: WsLink, priority: int,
                 redial: Redial, grace_s: Callable[[], float]) -> None:
        self.identity = identity
        self.backend = backend
        self.current = ws
        self.priority = priority
        self.subprotocol: str | None = ws.subprotocol
        self.on_lost: Callable[[str], Awaitable[None]] | None = None  # the session's
        self._redial = redial
        self._grace_s = grace_s
        self._buffer: list[tuple[Frame, str | None]] = []
        self._reported: WsLink | None = None  # the last link whose loss went to on_lost
        self._moving = False
        self._dialing = False  # a failback is dialling a better target
        self._stopping = False
        self._move_lock = trio.Lock()  # a failover and a failback never run together

    @property
    def closed(self) -> int | None:
        return None if self._moving else self.current.closed

    @property
    def moving(self) -> bool:
        return self._moving

    def info(self) -> LinkInfo:
        state = "failing_over" if self._moving else (
            "open" if self.current.closed is None else "closing")
        return LinkInfo(state, self.current.remote_address(), srv_backend=self.backend.name,
                        priority=self.priority, compressed=self.current.compressed)

    async def get_message(self) -> str | bytes | Frame:
        while True:
            link = self.current
            try:
                return await link.get_message()
            except LinkClosed:
                if link is not self.current:
                    continue  # we moved to another target on purpose
                if self._stopping or not await self._fail_over(link):
                    raise

    async def send_frame(self, frame: Frame, text: str | None) -> None:
        if self._moving:
            self._hold(frame, text)
            return
        link = self.current
        try:
            await link.send_frame(frame, text)
        except LinkClosed:
            if self._stopping:
                raise
            settled = link is self._reported  # its loss was reported: on_lost answered
            if link is self.current and not settled:
                # the reader will notice the loss and move; held for the next target
                self._hold(frame, text)
            elif frame.type == SEND or (frame.type == CALL and not settled):
                if link is self.current and not self._moving:
                    raise  # the failover gave up on this link: the session ends
                # the link moved on (or is moving) while this frame waited on it
                await self.send_frame(frame, text)
            # else a CALL that on_lost answered already, or an answer to the old target's
            # CALL, which no other target asked for: dropped

    def _hold(self, frame: Frame, text: str | None) -> None:
        if len(self._buffer) >= BUFFER:
            raise LinkClosed(1001, "too many frames while moving to another backend")
        self._buffer.append((frame, text))

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None:
        self._stopping = True
        await self.current.aclose(code, reason, wait_s)

    async def close_stream(self) -> None:
        """Drop the connection in use without a close handshake (the session has ended).
        No move starts after this, and one under way drops the link it dialled."""
        self._stopping = True
        await trio.aclose_forcefully(self.current.stream)

    async def _fail_over(self, lost: WsLink) -> bool:
        # one move at a time: a failback in progress finishes (or gives up) first
        async with self._move_lock:
            if self.current is not lost:
                return True  # a failback moved the link meanwhile: read from the new one
            self._moving = True
            try:
                found = await self._find_target(lost)
                if found is None:
                    return False
                # outside the grace period's scope: a switch that has begun completes
                await self._switch(*found, "backend_failover")
                return True
            finally:
                self._moving = False

    async def _find_target(self, lost: WsLink) -> tuple[WsLink, int] | None:
        """Dial targets until one takes the station, for up to the grace period."""
        self._reported = lost
        # finish with the old target at once: a CSMS that is stopping waits for us
        await trio.aclose_forcefully(lost.stream)
        # What the session settles now must not reach the next target as well: on_lost
        # answers the station's CALL in flight with an error (it may have been carried
        # out), so a held copy would be run twice; answers owed to the lost target's
        # CALLs are void. SEND frames expect no answer and still go.
        self._buffer[:] = [(frame, text) for frame, text in self._buffer
                           if frame.type == SEND]
        if self.on_lost is not None:
            await self.on_lost("backend link lost; moving to another target")
        grace_s = self._grace_s()
        with trio.move_on_at(trio.current_time() + grace_s):
            while True:
                try:
                    ws, priority = await self._redial(None)
                except DialFailed:
                    await trio.sleep(RETRY_S)
                    continue
                if ws.subprotocol == self.subprotocol:
                    return ws, priority
                await ws.aclose(1002, "the station's subprotocol is fixed")
                await trio.sleep(RETRY_S)
        log_event(log, logging.WARNING, "backend_failover_failed", station=self.identity,
                  backend=self.backend.name, grace_s=grace_s)
        return None

    async def _switch(self, ws: WsLink, priority: int, event: str) -> None:
        old = self.current
        self.current, self.priority = ws, priority
        await old.close_now(1000, "moving to another backend target")
        log_event(log, logging.INFO, event, station=self.identity, backend=self.backend.name,
                  priority=priority)
        while self._buffer:
            frame, text = self._buffer[0]
            try:
                await ws.send_frame(frame, text)
            except LinkClosed:
                # the new target went at once (or the session ended and closed it): the
                # frames stay held, and the reader, finding the link closed, moves again
                return
            del self._buffer[0]

    async def move_to_better(self, idle: Callable[[], bool] = lambda: True) -> bool:
        """Failback: move to a target of better priority if one answers.

        The better target is dialled without holding anything: the station's frames keep
        going out on the link in use, and a failover that starts meanwhile (the target in
        use lost) goes ahead at once rather than waiting for a dial that may take its
        whole open timeout. Only the switch itself holds frames, and excludes a failover.
        ``idle`` says whether no CALL is in flight either way; it is asked again once the
        new link is up, just before the switch: a CALL that went out on the old link
        during the dial would lose its answer when that link closes, so the failback
        waits up to ``IDLE_WAIT_S`` for that answer, then drops the new link instead (as
        when a failover ran meanwhile) and a later round tries again."""
        if self._moving or self._stopping or self._dialing or self._move_lock.locked():
            return False
        if not idle():
            return False
        start = self.current
        self._dialing = True
        try:
            ws, priority = await self._redial(self.priority)
        except DialFailed:
            return False
        finally:
            self._dialing = False
        if ws.subprotocol != self.subprotocol and not self._stopping:
            await ws.aclose(1002, "the station's subprotocol is fixed")
            return False
        # a CALL that went out on the link in use during the dial is usually answered
        # within moments: wait for that rather than drop a link that is up
        with trio.move_on_after(IDLE_WAIT_S):
            while (not idle() and not self._stopping and self.current is start
                   and not self._move_lock.locked()):
                await trio.sleep(IDLE_POLL_S)
        if self._stopping:
            # the session ended while the better target was dialled: nobody would read
            # the new link, and it would stand in for the station at the CSMS
            await trio.aclose_forcefully(ws.stream)
            return False
        if self._move_lock.locked() or self.current is not start or not idle():
            await ws.aclose(1000, "the station's link is busy; not moving now")
            return False
        # taken without a checkpoint: no frame or failover gets in between these checks
        # and the switch
        self._move_lock.acquire_nowait()
        try:
            self._moving = True
            try:
                await self._switch(ws, priority, "backend_failback")
            finally:
                self._moving = False
        finally:
            self._move_lock.release()
        return True
