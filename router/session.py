"""A station session: one station link paired with its backend link, and the CALLs between.

Each direction is a :class:`Lane`: OCPP-J allows one outstanding CALL per direction, so
a lane holds the CALL in flight and a bounded queue of those waiting behind it. Frames
are forwarded as the text they arrived in; decoding only checks them and reads the
type and id that correlation needs. Every CALL ends in exactly one answer: the peer's,
or a CALLERROR from the node (queue full, timeout, link lost, shutdown).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import trio

from policies import Outcome
from router.logs import log_event
from router.net.wslink import Link, LinkClosed
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    MAX_MESSAGE_ID,
    SEND,
    Frame,
    FrameError,
    Problem,
    Version,
    decode,
    encode_call,
    encode_parts,
    error_answer,
    error_code,
)

if TYPE_CHECKING:
    from router.node import Node

log = logging.getLogger("router.session")

ReplyFn = Callable[[str], Awaitable[None]]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003


@dataclass(slots=True, eq=False)
class Lane:
    """CALLs from ``caller`` to ``callee``: the one in flight and those queued behind it."""

    name: str  # "up" (station -> backend) or "down" (backend -> station)
    caller: Link
    callee: Link
    pending_id: str | None = None
    pending_action: str = ""
    # a CALL from another source (a secondary backend): where its answer goes, and the
    # message id it had there (ours was rewritten so two sources never collide)
    pending_reply: ReplyFn | None = None
    pending_origin: str = ""
    pending_token: int = 0
    deadline: float = 0.0  # when the CALL in flight times out (trio clock)
    # (message id, action, text, reply, origin id); made on first use: most lanes never queue
    queue: deque[tuple[str, str, str, ReplyFn | None, str]] | None = None


@dataclass(slots=True, eq=False)
class Side:
    """One end of the session, as its pump sees it."""

    name: str  # "station" or "backend"
    ws: Link
    other: Link  # the other side's WebSocket
    calls: Lane  # CALLs this side makes
    answers: Lane  # CALLs this side must answer
    direction: str  # policy direction of what this side sends
    source: str  # policy source name: the station identity or the backend name
    peer_keeps_signatures: bool  # whether the other side is given signatures
    closed_code: int | None = None


class StationSession:
    """Forwards between one station and its backend until either side goes away."""

    def __init__(
        self, node: Node, identity: str, version: Version, station_ws: Link, backend_ws: Link,
        backend_name: str, *, station_keeps_signatures: bool = False,
        backend_keeps_signatures: bool = False,
    ) -> None:
        self.node = node
        self.identity = identity
        self.version = version
        self.backend_name = backend_name
        self.up = Lane("up", station_ws, backend_ws)
        self.down = Lane("down", backend_ws, station_ws)
        # the gate needs, per side: the policy direction, the source name, and whether
        # the *receiving* peer keeps signatures
        self.station = Side("station", station_ws, backend_ws, self.up, self.down,
                            "from-station", identity, backend_keeps_signatures)
        self.backend = Side("backend", backend_ws, station_ws, self.down, self.up,
                            "to-station", backend_name, station_keeps_signatures)
        self._scope = trio.CancelScope()
        self.done = trio.Event()  # set by the node once the session has fully ended
        self._external = 0  # CALLs from other sources, for their rewritten ids
        self._why = ""  # set when the node ends the session (replaced, shutdown)

    def stop(self, why: str) -> None:
        """Ask the session to wind down: pending CALLs are answered, links closed."""
        self._why = self._why or why
        self._scope.cancel()

    async def run(self) -> None:
        """Forward until a link closes, then answer what is pending and close both links."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                # the station side runs in this task: one task fewer per station
                nursery.start_soon(self._pump, self.backend, nursery.cancel_scope)
                await self._pump(self.station, nursery.cancel_scope)
        with trio.CancelScope(shield=True), trio.move_on_after(
            self.node.config.node.shutdown_timeout_s
        ):
            await self._wind_down()

    # --- the hot path -------------------------------------------------------------------

    async def _pump(self, side: Side, scope: trio.CancelScope) -> None:
        ws, other = side.ws, side.other
        stats = self.node.stats
        version = self.version
        debug = log.isEnabledFor(logging.DEBUG)  # read once: frames are the hot path
        node = self.node
        fanout = node.fanout
        fanout_on = fanout.active
        station_side = self.station
        try:
            while True:
                try:
                    text = await ws.get_message()
                except LinkClosed as exc:
                    side.closed_code = exc.code
                    return
                t0 = perf_counter_ns()
                if debug:
                    log_event(log, logging.DEBUG, "frame", station=self.identity,
                              side=side.name, text=text[:2000])
                if type(text) is not str:
                    await self._refuse_binary(side)
                    return
                try:
                    frame = decode(text, version)
                except FrameError as err:
                    await self._bad_frame(side, err)
                    continue
                mtype = frame.type
                # read per frame: a reload may add or replace the policy
                if node.gate.firewall is not None or _signed(frame):
                    text = await self._through_gate(side, frame, text)
                    if not text:
                        continue
                if mtype == CALL:
                    if fanout_on and side is station_side:
                        fanout.offer(self.identity, version.value, frame.action or "",
                                     frame.payload)
                    await self._offer_call(side.calls, frame.id, frame.action or "", text, t0)
                elif mtype in (SEND, CALLRESULTERROR):
                    # neither is answered; a CALLRESULTERROR refers to a CALL already done
                    if frame.action is not None:
                        stats.frames_by_action[(side.direction, frame.action)] += 1
                    await other.send_message(text)
                    self._count(side, t0)
                else:
                    lane = side.answers
                    if lane.pending_id != frame.id:  # the gate, if it ran, checked already
                        self._drop_unmatched(side, frame.id)
                        continue
                    reply, origin = lane.pending_reply, lane.pending_origin
                    stats.frames_by_action[(side.direction, lane.pending_action)] += 1
                    following = self._advance(lane)
                    if reply is None:
                        await other.send_message(text)
                    else:
                        await reply(_with_id(frame, origin))
                    stats.answers_forwarded += 1
                    self._count(side, t0)
                    if following is not None:
                        await self._send_call(lane, following)
        except LinkClosed:
            # the other link closed under a send; its own pump records how
            return
        finally:
            scope.cancel()

    async def _through_gate(self, side: Side, frame: Frame, text: str) -> str:
        """The frame's text to forward after the firewall, or "" when it must not go on."""
        mtype = frame.type
        action: str | None = frame.action
        lane = side.answers
        if mtype in (CALLRESULT, CALLERROR):
            if lane.pending_id != frame.id:
                self._drop_unmatched(side, frame.id)
                return ""
            action = lane.pending_action
        verdict = self.node.gate.check(frame, text, action, side.direction, side.source,
                                       self.version.value, side.peer_keeps_signatures)
        if verdict.forward:
            return verdict.text
        decision = verdict.decision
        assert decision is not None and verdict.refusal is not None
        rejected = decision.outcome is Outcome.REJECT
        if mtype == CALL:
            if rejected:
                await self._answer_node_error(side.calls, frame.id, Problem.SECURITY,
                                              verdict.refusal)
            else:
                self.node.stats.dropped += 1
        elif mtype in (CALLRESULT, CALLERROR):
            if rejected:
                # the caller still gets exactly one answer: ours, instead of the refused one
                reply, origin = lane.pending_reply, lane.pending_origin
                following = self._advance(lane)
                await self._owe(lane, frame.id, reply, origin, Problem.SECURITY,
                                verdict.refusal)
                if following is not None:
                    await self._send_call(lane, following)
            else:
                # dropped: the CALL stays pending and the node answers it on timeout
                self.node.stats.dropped += 1
        else:
            self.node.stats.dropped += 1  # SEND and CALLRESULTERROR have no answer to give
        return ""

    def _drop_unmatched(self, side: Side, message_id: str) -> None:
        self.node.stats.dropped += 1
        log_event(log, logging.INFO, "frame_dropped", station=self.identity, side=side.name,
                  message_id=message_id, reason="unmatched answer")

    def _count(self, side: Side, t0: int) -> None:
        stats = self.node.stats
        if side is self.station:
            stats.frames_up += 1
        else:
            stats.frames_down += 1
        stats.residence.record(perf_counter_ns() - t0)

    async def _offer_call(
        self, lane: Lane, message_id: str, action: str, text: str, t0: int,
        reply: ReplyFn | None = None, origin: str = "",
    ) -> None:
        # invariant: a lane with no CALL in flight has an empty queue (see _advance)
        if lane.pending_id is None:
            self._set_pending(lane, message_id, action, reply, origin)
            await lane.callee.send_message(text)
            self._count(self.station if lane is self.up else self.backend, t0)
        elif (len(lane.queue) if lane.queue else 0) < self.node.config.node.max_queued_calls:
            if lane.queue is None:
                lane.queue = deque()
            lane.queue.append((message_id, action, text, reply, origin))
        else:
            await self._owe(
                lane, message_id, reply, origin, Problem.BUSY,
                "too many CALLs waiting: OCPP-J allows one outstanding CALL per direction",
            )

    def _set_pending(self, lane: Lane, message_id: str, action: str,
                     reply: ReplyFn | None = None, origin: str = "") -> None:
        self.node.stats.frames_by_action[
            ("from-station" if lane is self.up else "to-station", action)] += 1
        lane.pending_id = message_id
        lane.pending_action = action
        lane.pending_reply = reply
        lane.pending_origin = origin
        lane.pending_token = self.node.timer.arm(self, lane)

    def _advance(self, lane: Lane) -> str | None:
        """End the lane's CALL in flight and claim the next queued one, returning its text.

        Claiming happens before any await, so a CALL arriving meanwhile queues behind it
        instead of overtaking it.
        """
        lane.pending_id = None
        lane.pending_reply = None
        if not lane.queue:  # None or empty
            return None
        message_id, action, text, reply, origin = lane.queue.popleft()
        self._set_pending(lane, message_id, action, reply, origin)
        return text

    async def _send_call(self, lane: Lane, text: str) -> None:
        await lane.callee.send_message(text)
        if lane is self.up:
            self.node.stats.frames_up += 1
        else:
            self.node.stats.frames_down += 1

    async def _owe(
        self, lane: Lane, message_id: str, reply: ReplyFn | None, origin: str,
        problem: Problem, description: str,
    ) -> None:
        """The node's CALLERROR for a CALL, to whoever made it."""
        if reply is None:
            await self._answer_node_error(lane, message_id, problem, description)
        else:
            self.node.stats.node_errors += 1
            self.node.stats.node_errors_by_code[error_code(problem, self.version)] += 1
            await reply(error_answer(problem, self.version, origin, description))

    async def backend_lost(self, reason: str) -> None:
        """The backend link is being replaced (SRV failover): answers owed by it are lost.

        The station's CALL in flight is answered with InternalError and the next queued one
        goes to the new target; CALLs the old backend made toward the station are
        forgotten (the backend that made them is gone), except other sources', answered.
        """
        up = self.up
        if up.pending_id is not None:
            message_id, reply, origin = up.pending_id, up.pending_reply, up.pending_origin
            following = self._advance(up)
            await self._owe(up, message_id, reply, origin, Problem.INTERNAL, reason)
            if following is not None:
                await self._send_call(up, following)
        down = self.down
        owed = ([(down.pending_id, down.pending_reply, down.pending_origin)]
                if down.pending_id is not None else []) + [
            (mid, reply, origin) for mid, _, _, reply, origin in down.queue or ()
        ]
        down.pending_id, down.pending_reply, down.queue = None, None, None
        for message_id, reply, origin in owed:
            if reply is not None:
                await self._owe(down, message_id, reply, origin, Problem.INTERNAL, reason)

    def idle(self) -> bool:
        """No CALL in flight either way: the backend link may be moved."""
        return self.up.pending_id is None and self.down.pending_id is None

    async def call_from(
        self, source: str, message_id: str, action: str, payload: Any, reply: ReplyFn
    ) -> None:
        """A CALL toward the station from another source (a secondary backend).

        Its id is rewritten so it cannot collide with the primary's, and mapped back on
        the answer; it passes the firewall with ``source`` like any other CALL.
        """
        self._external += 1
        own_id = f"x{self._external}-{message_id}"[:MAX_MESSAGE_ID]
        text = encode_call(own_id, action, payload)
        gate = self.node.gate
        if gate.firewall is not None or (isinstance(payload, dict) and "signatures" in payload):
            verdict = gate.check(Frame(CALL, own_id, action=action, payload=payload), text,
                                 action, "to-station", source, self.version.value,
                                 self.backend.peer_keeps_signatures)
            if not verdict.forward:
                await reply(error_answer(Problem.SECURITY, self.version, message_id,
                                         verdict.refusal or "refused by policy"))
                return
            text = verdict.text
        await self._offer_call(self.down, own_id, action, text, perf_counter_ns(), reply,
                               message_id)

    async def _answer_node_error(
        self, lane: Lane, message_id: str | None, problem: Problem, description: str
    ) -> None:
        self.node.stats.node_errors += 1
        self.node.stats.node_errors_by_code[error_code(problem, self.version)] += 1
        await lane.caller.send_message(error_answer(problem, self.version, message_id, description))

    # --- faults -------------------------------------------------------------------------

    async def _bad_frame(self, side: Side, err: FrameError) -> None:
        log_event(log, logging.WARNING, "frame_error", station=self.identity, side=side.name,
                  problem=err.problem.value, reason=err.description, message_id=err.message_id)
        if err.wants_answer:
            await self._answer_node_error(side.calls, err.message_id, err.problem, err.description)
        else:
            self.node.stats.dropped += 1
            log_event(log, logging.INFO, "frame_dropped", station=self.identity, side=side.name,
                      message_id=err.message_id, reason=err.description)

    async def _refuse_binary(self, side: Side) -> None:
        log_event(log, logging.WARNING, "frame_error", station=self.identity, side=side.name,
                  problem="binary", reason="binary message on a standard OCPP-J link")
        side.closed_code = CLOSE_UNSUPPORTED_DATA
        await side.ws.aclose(CLOSE_UNSUPPORTED_DATA, "OCPP-J uses text messages")

    async def on_timeout(self, lane: Lane, token: int) -> None:
        """The lane's CALL went unanswered for ``call_timeout_s``: answer it ourselves."""
        if lane.pending_token != token or lane.pending_id is None:
            return
        message_id = lane.pending_id
        reply, origin = lane.pending_reply, lane.pending_origin
        following = self._advance(lane)
        self.node.stats.timeouts += 1
        log_event(log, logging.WARNING, "call_timeout", station=self.identity,
                  direction=lane.name, message_id=message_id)
        try:
            await self._owe(
                lane, message_id, reply, origin, Problem.INTERNAL,
                f"no answer within {self.node.config.node.call_timeout_s:g} s",
            )
            if following is not None:
                await self._send_call(lane, following)
        except LinkClosed:
            pass

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
            reason = "backend link closed"
            station_code = CLOSE_GOING_AWAY
            backend_code = backend.closed_code or CLOSE_GOING_AWAY
        for lane in (self.up, self.down):
            self.node.timer.disarm(lane)
            owed = ([(lane.pending_id, lane.pending_reply, lane.pending_origin)]
                    if lane.pending_id is not None else []) + [
                (mid, reply, origin) for mid, _, _, reply, origin in lane.queue or ()
            ]
            lane.pending_id = None
            lane.queue = None
            for message_id, reply, origin in owed:
                if reply is None and lane.caller.closed is not None:
                    continue
                try:
                    await self._owe(lane, message_id, reply, origin, Problem.INTERNAL, reason)
                except LinkClosed:
                    continue
        log_event(log, logging.INFO, "station_disconnected", station=self.identity,
                  code=station_code, reason=reason)
        await station.ws.aclose(station_code, reason)
        await backend.ws.aclose(backend_code, reason)


def _signed(frame: Frame) -> bool:
    """Whether a frame carries end-to-end signatures (in its payload, or an error's details)."""
    body = frame.payload if frame.payload is not None else frame.details
    return type(body) is dict and "signatures" in body


def _with_id(frame: Frame, message_id: str) -> str:
    """An answer frame with another message id (mapping a rewritten id back)."""
    return encode_parts(frame.type, message_id, payload=frame.payload, code=frame.code,
                        description=frame.description, details=frame.details)
