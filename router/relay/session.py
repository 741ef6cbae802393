"""A station session: one station link paired with its backend link, and the CALLs between.

The session is the trio shell around a :class:`~router.relay.ledger.CallLedger` and the
per-frame rules of :mod:`router.relay.forwarding`. When both links are plain TCP
WebSockets, the node's forwarding loop (router/net/readloop.py) reads them and steps
each frame in a plain call; each side's task only does what must wait, handed to it in
order. Any other link (TLS, the overlay, a backend that fails over) is read by a pump
task per side. The firewall gate sees every frame where it enters, and the ledger says
where each CALL and answer goes. A link over the overlay hands over frames it has
decoded already, and takes frames, not text, so a frame is decoded once per node. Every
CALL ends in exactly one answer: the peer's, or a CALLERROR from the node (queue full,
timeout, link lost, shutdown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from time import perf_counter_ns
from typing import Any, cast

import trio

from router.logs import log_event
from router.net.readloop import ReadLoop, read_loop
from router.net.wslink import CLOSE_ABNORMAL, Link, LinkClosed, WsLink
from router.relay.forwarding import (
    Forwarding,
    Job,
    SessionDeps,
    Side,
)
from router.relay.ledger import Call, CallLedger, ReplyFn
from router.wire.frames import (
    CALL,
    MAX_MESSAGE_ID,
    Frame,
    Problem,
    Version,
    error_answer,
)

log = logging.getLogger("router.session")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003

class StationSession(Forwarding):
    """Forwards between one station and its backend until either side goes away."""

    def __init__(
        self, deps: SessionDeps, identity: str, version: Version, station_ws: Link,
        backend_ws: Link, backend_name: str, *, station_keeps_signatures: bool = False,
        backend_keeps_signatures: bool = False, station_unwraps_signed: bool = False,
        backend_unwraps_signed: bool = False,
    ) -> None:
        self.deps = deps
        self.identity = identity
        self.version = version
        self.backend_name = backend_name
        self.ledger = ledger = CallLedger()
        # the gate needs, per side: the policy direction, the source name, and whether
        # the *receiving* peer keeps signatures
        self.station = Side("station", station_ws, backend_ws, ledger.up, ledger.down,
                            "from-station", identity, backend_keeps_signatures,
                            peer_unwraps_signed=backend_unwraps_signed)
        self.backend = Side("backend", backend_ws, station_ws, ledger.down, ledger.up,
                            "to-station", backend_name, station_keeps_signatures,
                            peer_unwraps_signed=station_unwraps_signed)
        self._scope = trio.CancelScope()
        self.done = trio.Event()  # set by whoever ran it (the registry), once it has ended
        self._external = 0  # CALLs from other sources, for their rewritten ids
        self._why = ""  # set when the node ends the session (replaced, shutdown)
        self._ending = False  # the pumps have stopped: no new CALL can go out
        self._stopped = False  # a pump has stopped or the session was stopped: read no more
        self._debug = False  # frames are logged (read once per session)

    def stop(self, why: str) -> None:
        """Ask the session to wind down: pending CALLs are answered, links closed."""
        self._why = self._why or why
        self._stopped = True
        self._scope.cancel()

    async def run(self) -> None:
        """Forward until a link closes, then answer what is pending and close both links."""
        step = self.deps.step
        step()
        self._debug = log.isEnabledFor(logging.DEBUG)  # read once: frames are the hot path
        with self._scope:
            async with trio.open_nursery() as nursery:
                scope = nursery.cancel_scope
                if self._loopable():
                    # the forwarding loop reads both links; each side's task does only
                    # what the loop hands it (router/net/readloop.py)
                    loop = read_loop()
                    try:
                        for side in (self.station, self.backend):
                            side.reading = loop.add(cast("WsLink", side.ws), _Taker(self, side))
                            side.jobs = []  # none: the side's task resumes the link first
                        nursery.start_soon(self._work, loop, self.backend, scope)
                        await self._work(loop, self.station, scope)
                    finally:
                        self._stopped = True
                        for side in (self.station, self.backend):
                            if side.reading is not None:
                                loop.remove(side.reading)
                            # no cycles left through the loop's consumer and the jobs
                            side.reading = side.jobs = side.task = None
                else:
                    # the station side runs in this task: one task fewer per station
                    nursery.start_soon(self._pump, self.backend, scope)
                    await self._pump(self.station, scope)
        self._ending = True
        with trio.CancelScope(shield=True), trio.move_on_after(
            self.deps.settings.shutdown_timeout_s
        ):
            await self._wind_down()
        step()

    def idle(self) -> bool:
        """No CALL in flight either way: the backend link may be moved."""
        return self.ledger.idle()

    def _loopable(self) -> bool:
        """Whether the forwarding loop can read both links: plain TCP WebSockets both."""
        if not self.deps.settings.forwarding_loop:
            return False
        return all(type(side.ws) is WsLink and side.ws.sock is not None
                   for side in (self.station, self.backend))

    # --- the forwarding loop's side of a session ---------------------------------------------

    def _take(self, side: Side, message: str | bytes) -> bool:
        """The loop's message for ``side``: stepped now, or queued behind the side's task."""
        jobs = side.jobs
        if jobs is not None:  # the task is busy: keep the order
            jobs.append(partial(self._handle, side, message))
            return False
        if self._stopped:
            return False  # the session is ending: nothing more is read, as in a pump
        try:
            job = self._step(side, message)
        except LinkClosed:
            job = partial(self._closed_while_forwarding, side)
        if job is not None:
            self._hand(side, job)
        other: WsLink = side.other  # type: ignore[assignment]
        if other.backlog:
            # the kernel did not take the whole frame: the side waits for it, as a pump
            # would in its send, and the loop reads the side's link no more until then
            self._hand(side, other.flush)
        return side.jobs is None

    def _hand(self, side: Side, job: Job) -> None:
        """Give the side's task a job; it wakes if it waits."""
        if side.jobs is None:
            side.jobs = [job]
        else:
            side.jobs.append(job)
        task = side.task
        if task is not None:
            side.task = None
            trio.lowlevel.reschedule(task)

    async def _work(self, loop: ReadLoop, side: Side, scope: trio.CancelScope) -> None:
        """A side's task while the loop reads its link: the jobs the loop hands it, in
        order; between them, the link is the loop's again."""
        try:
            while True:
                jobs = side.jobs
                if jobs:
                    if await jobs.pop(0)() is False:
                        return
                elif jobs is not None:
                    side.jobs = None
                    assert side.reading is not None
                    loop.resume(side.reading)  # what arrived meanwhile, stepped here
                else:
                    await self._wait_for_job(side)
        except LinkClosed:
            self._note_closed(side)
        finally:
            self._stopped = True
            scope.cancel()
            self.deps.step()

    @staticmethod
    async def _wait_for_job(side: Side) -> None:
        side.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            side.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _lost(self, side: Side, code: int, reason: str) -> None:
        """The loop saw the side's link close: the side's task ends after its jobs."""
        self._hand(side, partial(self._link_closed, side, code, reason))

    async def _link_closed(self, side: Side, code: int, reason: str) -> bool:
        _note_end(side, code, reason)
        with contextlib.suppress(LinkClosed):
            await cast("WsLink", side.ws).flush()  # the reply to a close, the half-close
        return False

    async def _closed_while_forwarding(self, side: Side) -> bool:
        self._note_closed(side)
        return False

    # --- the general path: a task per side ------------------------------------------------

    async def _pump(self, side: Side, scope: trio.CancelScope) -> None:
        ws = side.ws
        message: str | bytes | Frame | None = None
        try:
            while True:
                # let go of the last message while waiting for the next one: a decoded
                # payload is kilobytes, and a station may be quiet for minutes
                message = None
                try:
                    message = await ws.get_message()
                except LinkClosed as exc:
                    _note_end(side, exc.code, exc.reason)
                    return
                if not await self._handle(side, message):
                    return
        finally:
            scope.cancel()
            self.deps.step()

    # --- the backend link moves, other sources ------------------------------------------

    async def backend_lost(self, reason: str) -> None:
        """The backend link is being replaced (SRV failover): answers owed by it are lost.

        The station's CALL in flight is answered with InternalError and the next queued one
        goes to the new target. CALLs toward the station are kept in order: the one in
        flight stays in flight until the station answers, since OCPP-J allows it one CALL
        at a time. The old backend's own CALLs are forgotten (its answer, when it comes,
        is discarded; queued ones are dropped); other sources' CALLs go on as they were.
        """
        finished = self.ledger.abandon(self.station.calls)
        if finished is not None:
            await self._complete(self.station, finished, problem=Problem.INTERNAL,
                                 description=reason)
        lane = self.backend.calls
        self.ledger.orphan(lane, _discard)
        if lane.current is None:
            self.deps.timer.disarm(lane)

    async def call_from(
        self, source: str, message_id: str, action: str, payload: Any, reply: ReplyFn
    ) -> None:
        """A CALL toward the station from another source (a secondary backend).

        Its id is rewritten so it cannot collide with the primary's, and mapped back on
        the answer; it passes the firewall with ``source`` like any other CALL.
        """
        if self._ending:
            self._count_error(Problem.INTERNAL)
            await reply(error_answer(Problem.INTERNAL, self.version, message_id,
                                     "the station is disconnecting"))
            return
        self._external += 1
        own_id = f"x{self._external}-{message_id}"[:MAX_MESSAGE_ID]
        frame = Frame(CALL, own_id, action=action, payload=payload)
        text: str | None = None
        gate = self.deps.gate
        if gate.firewall is not None or (isinstance(payload, dict) and "signatures" in payload):
            verdict = gate.check(frame, None, action, "to-station", source,
                                 self.version.value, self.backend.peer_keeps_signatures,
                                 self.backend.peer_unwraps_signed)
            if not verdict.forward:
                await reply(error_answer(Problem.SECURITY, self.version, message_id,
                                         verdict.refusal or "refused by policy"))
                return
            frame, text = verdict.frame, verdict.text
        # the CALL is in the ledger before the send: if the station link is gone, the
        # session's wind-down answers it through ``reply``; the source's own link is fine
        with contextlib.suppress(LinkClosed):
            await self._offer(self.backend, Call(frame, text, reply, message_id),
                              perf_counter_ns())

    # --- the end ------------------------------------------------------------------------

    async def _wind_down(self) -> None:
        """Answer every CALL still owed, then close both links (the Local Controller rule)."""
        station, backend = self.station, self.backend
        if self._why:
            station_code = backend_code = CLOSE_GOING_AWAY
            reason = self._why
        elif station.closed_code is not None:
            reason = "station link closed"
            station_code = station.closed_code
            backend_code = CLOSE_NORMAL if station.closed_code == CLOSE_NORMAL else CLOSE_GOING_AWAY
        else:
            reason = "backend link closed" + (f": {backend.lost}" if backend.lost else "")
            station_code = CLOSE_GOING_AWAY
            backend_code = backend.closed_code or CLOSE_GOING_AWAY
        for side in (station, backend):
            self.deps.timer.disarm(side.calls)
            for call in self.ledger.drain(side.calls):
                if call.reply is None and side.ws.closed is not None:
                    continue
                try:
                    await self._owe(side, call, Problem.INTERNAL, reason)
                except LinkClosed:
                    continue
        log_event(log, logging.INFO, "station_disconnected", station=self.identity,
                  code=station_code, reason=reason)
        await station.ws.aclose(station_code, reason)
        await backend.ws.aclose(backend_code, reason)


def _note_end(side: Side, code: int, reason: str) -> None:
    """The side's link closed with ``code``: what the wind-down tells of it."""
    side.closed_code = code
    if code == CLOSE_ABNORMAL:
        side.lost = reason[:80]  # why the node gave it up itself


async def _discard(_text: str) -> None:
    """Where the answer to a CALL of a backend that went away goes (see backend_lost)."""


class _Taker:
    """One side of a session as the forwarding loop's consumer."""

    __slots__ = ("_session", "_side", "take")

    def __init__(self, session: StationSession, side: Side) -> None:
        self._session = session
        self._side = side
        # the session's own method, bound to the side: no call of ours between the loop
        # and the step, for every message
        self.take: Callable[[str | bytes], bool] = partial(session._take, side)

    def lost(self, code: int, reason: str) -> None:
        self._session._lost(self._side, code, reason)

    def failed(self, error: Exception) -> None:
        self._session._hand(self._side, partial(_reraise, error))

    def backlogged(self) -> None:
        self._session._hand(self._side, cast("WsLink", self._side.ws).flush)


async def _reraise(error: Exception) -> None:
    raise error
