"""A station session: one station link paired with its backend link, and the CALLs between.

The session is the trio shell around a :class:`~router.relay.ledger.CallLedger`: two
pumps read the two links, the firewall gate sees every frame where it enters, and the
ledger says where each CALL and answer goes. Frames are forwarded as the text they
arrived in; decoding only checks them and reads what correlation needs. A link over the
overlay hands over frames it has decoded already, and takes frames, not text, so a frame
is decoded once per node. Every CALL ends in exactly one answer: the peer's, or a
CALLERROR from the node (queue full, timeout, link lost, shutdown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

import trio

from policies import Outcome
from router.config import NodeSection
from router.logs import log_event
from router.net.wslink import CLOSE_ABNORMAL, Link, LinkClosed
from router.relay.gate import Gate
from router.relay.ledger import Call, CallLedger, Finished, Lane, Offer, ReplyFn
from router.relay.timer import CallTimer
from router.stats import Stats
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
    check_version,
    decode,
    encode_frame,
    error_answer,
    error_code,
    error_frame,
)

log = logging.getLogger("router.session")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003

DuplicateFn = Callable[[str, str, str, Any, "tuple[str, Any] | None"], None]
"""``(station, subprotocol, action, payload, signed)``: a station's CALL as it goes to the
primary, for the secondaries; ``signed`` is the ``(action, payload)`` of the Signed Message
it was before the gate unwrapped it for the primary, else None."""


@dataclass(slots=True, eq=False)
class SessionDeps:
    """What every station session of a node shares. The node keeps it current: a reload
    replaces ``settings`` and ``gate``, and sessions read them per frame."""

    settings: NodeSection
    gate: Gate
    stats: Stats
    timer: CallTimer
    duplicate: DuplicateFn | None = None
    # called as a session starts, as each pump stops and as the session ends: the GC
    # housekeeper's ``step`` (router/gcwatch.py) when the node tuned the collector
    step: Callable[[], None] = lambda: None


@dataclass(slots=True, eq=False)
class Side:
    """One end of the session, as its pump sees it."""

    name: str  # "station" or "backend"
    ws: Link
    other: Link  # the other side's link
    calls: Lane  # CALLs this side makes
    answers: Lane  # CALLs this side must answer
    direction: str  # policy direction of what this side sends
    source: str  # policy source name: the station identity or the backend name
    peer_keeps_signatures: bool  # whether the other side is given signatures
    closed_code: int | None = None
    peer_unwraps_signed: bool = False  # the other side gets Signed Messages unwrapped
    lost: str = ""  # why the node gave this link up itself (no pong, connection lost)


class StationSession:
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

    def stop(self, why: str) -> None:
        """Ask the session to wind down: pending CALLs are answered, links closed."""
        self._why = self._why or why
        self._scope.cancel()

    async def run(self) -> None:
        """Forward until a link closes, then answer what is pending and close both links."""
        step = self.deps.step
        step()
        with self._scope:
            async with trio.open_nursery() as nursery:
                # the station side runs in this task: one task fewer per station
                nursery.start_soon(self._pump, self.backend, nursery.cancel_scope)
                await self._pump(self.station, nursery.cancel_scope)
        self._ending = True
        with trio.CancelScope(shield=True), trio.move_on_after(
            self.deps.settings.shutdown_timeout_s
        ):
            await self._wind_down()
        step()

    def idle(self) -> bool:
        """No CALL in flight either way: the backend link may be moved."""
        return self.ledger.idle()

    # --- the hot path -------------------------------------------------------------------

    async def _pump(self, side: Side, scope: trio.CancelScope) -> None:
        ws, other = side.ws, side.other
        deps = self.deps
        stats = deps.stats
        version = self.version
        debug = log.isEnabledFor(logging.DEBUG)  # read once: frames are the hot path
        duplicate = deps.duplicate if side is self.station else None
        ledger = self.ledger
        # the side whose CALLs this side answers
        asker = self.backend if side is self.station else self.station
        message: str | bytes | Frame | None = None
        frame: Frame | None = None
        text: str | None = None
        finished: Finished | None = None
        passed: tuple[Frame, str | None] | None = None
        try:
            while True:
                # let go of the last frame while waiting for the next one: a decoded
                # payload is kilobytes, and a station may be quiet for minutes
                message = frame = text = finished = passed = None
                try:
                    message = await ws.get_message()
                except LinkClosed as exc:
                    side.closed_code = exc.code
                    if exc.code == CLOSE_ABNORMAL:
                        side.lost = exc.reason[:80]
                    return
                t0 = perf_counter_ns()
                if type(message) is str:
                    text = message
                    if debug:
                        log_event(log, logging.DEBUG, "frame", station=self.identity,
                                  side=side.name, text=text[:2000])
                    try:
                        frame = decode(text, version)
                    except FrameError as err:
                        await self._bad_frame(side, err)
                        continue
                elif type(message) is Frame:
                    # decoded already where it entered the node (an overlay peer link)
                    frame, text = message, None
                    if debug:
                        log_event(log, logging.DEBUG, "frame", station=self.identity,
                                  side=side.name, text=encode_frame(frame)[:2000])
                    try:
                        check_version(frame, version)
                    except FrameError as err:
                        await self._bad_frame(side, err)
                        continue
                else:
                    await self._refuse_binary(side)
                    return
                mtype = frame.type
                # read per frame: a reload may add or replace the policy
                gate = deps.gate
                received = frame
                if gate.firewall is not None or _signed(frame) or (
                        side.peer_unwraps_signed and _signed_message(frame, side)):
                    passed = await self._through_gate(gate, side, asker, frame, text)
                    if passed is None:
                        continue
                    frame, text = passed
                if mtype == CALL:
                    if duplicate is not None:
                        unwrapped = frame.action != received.action
                        duplicate(self.identity, version.value, frame.action or "",
                                  frame.payload,
                                  (received.action or "", received.payload) if unwrapped
                                  else None)
                    await self._offer(side, Call(frame, text), t0)
                elif mtype == SEND:
                    # not answered
                    stats.frames_by_action[(side.direction, frame.action or "")] += 1
                    await other.send_frame(frame, text)
                    self._count(side, t0)
                elif mtype == CALLRESULTERROR:
                    # not answered; it refers to the CALLRESULT this side got last, and
                    # to nothing else (the gate, if it ran, checked already)
                    lane = side.calls
                    if lane.result_id != frame.id:
                        self._drop_unmatched(side, frame.id)
                        continue
                    lane.result_id = None
                    await other.send_frame(frame, text)
                    self._count(side, t0)
                else:
                    finished = ledger.finish(side.answers, frame.id)
                    if finished is None:  # the gate, if it ran, checked already
                        self._drop_unmatched(side, frame.id)
                        continue
                    stats.frames_by_action[(side.direction, finished[0].action)] += 1
                    await self._complete(asker, finished, answer=(frame, text), t0=t0)
        except LinkClosed:
            # a send failed: on the other link, or on this side's own (the node answering
            # its caller). Record whichever closed, so the wind-down says who went away.
            for s in (side, asker):
                if s.closed_code is None and s.ws.closed is not None:
                    s.closed_code = s.ws.closed
            return
        finally:
            scope.cancel()
            deps.step()

    async def _through_gate(self, gate: Gate, side: Side, asker: Side, frame: Frame,
                            text: str | None) -> tuple[Frame, str | None] | None:
        """The frame to forward after the firewall, or None when it must not go on.

        ``side`` sent the frame; ``asker`` is the side whose CALL an answer would answer.
        """
        mtype = frame.type
        action: str | None = frame.action
        if mtype in (CALLRESULT, CALLERROR):
            current = side.answers.current
            if current is None or current.frame.id != frame.id:
                self._drop_unmatched(side, frame.id)
                return None
            action = current.action
        elif mtype == CALLRESULTERROR:
            if side.calls.result_id != frame.id:
                self._drop_unmatched(side, frame.id)
                return None
            action = side.calls.result_action
        verdict = gate.check(frame, text, action, side.direction, side.source,
                             self.version.value, side.peer_keeps_signatures,
                             side.peer_unwraps_signed)
        if verdict.forward:
            return verdict.frame, verdict.text
        decision = verdict.decision
        assert decision is not None and verdict.refusal is not None
        rejected = decision.outcome is Outcome.REJECT
        stats = self.deps.stats
        if mtype == CALL:
            if rejected:
                await self._answer_caller(side, frame.id, Problem.SECURITY, verdict.refusal)
            else:
                stats.dropped += 1
        elif mtype in (CALLRESULT, CALLERROR):
            if rejected:
                # the caller still gets exactly one answer: ours, instead of the refused one
                finished = self.ledger.finish(side.answers, frame.id)
                assert finished is not None  # matched above, and nothing awaited since
                await self._complete(asker, finished, problem=Problem.SECURITY,
                                     description=verdict.refusal)
            else:
                # dropped: the CALL stays pending and the node answers it on timeout
                stats.dropped += 1
        else:
            stats.dropped += 1  # SEND and CALLRESULTERROR have no answer to give
        return None

    async def _offer(self, caller: Side, call: Call, t0: int) -> None:
        """A CALL from ``caller``: send it now, queue it, or refuse it (busy)."""
        offer = self.ledger.offer(caller.calls, call, self.deps.settings.max_queued_calls)
        if offer is Offer.SEND:
            self._started(caller, call)
            await caller.other.send_frame(call.frame, call.text)
            self._count(caller, t0)
        elif offer is Offer.BUSY:
            await self._owe(
                caller, call, Problem.BUSY,
                "too many CALLs waiting: OCPP-J allows one outstanding CALL per direction",
            )

    def _started(self, caller: Side, call: Call) -> None:
        """A CALL of ``caller`` went into flight: count it and start its clock."""
        deps = self.deps
        deps.stats.frames_by_action[(caller.direction, call.action)] += 1
        deps.timer.arm(self, caller.calls)

    async def _complete(
        self, caller: Side, finished: Finished, *,
        answer: tuple[Frame, str | None] | None = None, t0: int = 0,
        problem: Problem = Problem.INTERNAL, description: str = "",
    ) -> None:
        """The one place a finished CALL of ``caller`` is settled: it gets ``answer`` (the
        callee's) or else the node's CALLERROR, then the next queued CALL goes out."""
        done, following = finished
        if following is not None:
            self._started(caller, following)  # before any await: nothing may overtake it
        else:
            self.deps.timer.disarm(caller.calls)
        if answer is None:
            await self._owe(caller, done, problem, description)
        else:
            frame, text = answer
            if done.reply is None:
                if frame.type == CALLRESULT:
                    lane = caller.calls
                    lane.result_id, lane.result_action = frame.id, done.action
                await caller.ws.send_frame(frame, text)
            else:
                await done.reply(_with_id(frame, done.origin_id))
            self.deps.stats.answers_forwarded += 1
            self._count(self.backend if caller is self.station else self.station, t0)
        if following is not None:
            await caller.other.send_frame(following.frame, following.text)
            stats = self.deps.stats
            if caller is self.station:
                stats.frames_up += 1
            else:
                stats.frames_down += 1

    def _drop_unmatched(self, side: Side, message_id: str) -> None:
        self.deps.stats.dropped += 1
        log_event(log, logging.INFO, "frame_dropped", station=self.identity, side=side.name,
                  message_id=message_id, reason="unmatched answer")

    def _count(self, side: Side, t0: int) -> None:
        """One frame from ``side`` forwarded: count it and how long it took."""
        stats = self.deps.stats
        if side is self.station:
            stats.frames_up += 1
        else:
            stats.frames_down += 1
        stats.residence.record(perf_counter_ns() - t0)

    async def _owe(self, caller: Side, call: Call, problem: Problem, description: str) -> None:
        """The node's CALLERROR for a CALL, to whoever made it."""
        if call.reply is None:
            await self._answer_caller(caller, call.frame.id, problem, description)
        else:
            self._count_error(problem)
            await call.reply(error_answer(problem, self.version, call.origin_id, description))

    async def _answer_caller(self, caller: Side, message_id: str | None, problem: Problem,
                             description: str) -> None:
        """The node's CALLERROR on the caller's own link (the station's or the backend's)."""
        self._count_error(problem)
        version = self.version
        await caller.ws.send_frame(error_frame(problem, version, message_id, description),
                                   error_answer(problem, version, message_id, description))

    def _count_error(self, problem: Problem) -> None:
        stats = self.deps.stats
        stats.node_errors += 1
        stats.node_errors_by_code[error_code(problem, self.version)] += 1

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

    # --- faults -------------------------------------------------------------------------

    async def _bad_frame(self, side: Side, err: FrameError) -> None:
        log_event(log, logging.WARNING, "frame_error", station=self.identity, side=side.name,
                  problem=err.problem.value, reason=err.description, message_id=err.message_id)
        if err.wants_answer:
            await self._answer_caller(side, err.message_id, err.problem, err.description)
        else:
            self.deps.stats.dropped += 1
            log_event(log, logging.INFO, "frame_dropped", station=self.identity, side=side.name,
                      message_id=err.message_id, reason=err.description)

    async def _refuse_binary(self, side: Side) -> None:
        log_event(log, logging.WARNING, "frame_error", station=self.identity, side=side.name,
                  problem="binary", reason="binary message on a standard OCPP-J link")
        side.closed_code = CLOSE_UNSUPPORTED_DATA
        await side.ws.aclose(CLOSE_UNSUPPORTED_DATA, "OCPP-J uses text messages")

    async def on_timeout(self, lane: Lane, token: int) -> None:
        """The lane's CALL went unanswered for ``call_timeout_s``: answer it ourselves."""
        finished = self.ledger.expire(lane, token)
        if finished is None:
            return
        self.deps.stats.timeouts += 1
        log_event(log, logging.WARNING, "call_timeout", station=self.identity,
                  direction=lane.name, message_id=finished[0].frame.id)
        caller = self.station if lane is self.station.calls else self.backend
        with contextlib.suppress(LinkClosed):
            await self._complete(
                caller, finished, problem=Problem.INTERNAL,
                description=f"no answer within {self.deps.timer.timeout_s:g} s")

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


def _signed_message(frame: Frame, side: Side) -> bool:
    """Whether a frame is an OCPP 2.1 Signed Message, or an answer to one."""
    action = frame.action
    if action is None:
        current = side.answers.current
        action = current.action if current is not None else ""
    return action.endswith("-Signed")


def _signed(frame: Frame) -> bool:
    """Whether a frame carries end-to-end signatures (in its payload, or an error's details)."""
    body = frame.payload if frame.payload is not None else frame.details
    return type(body) is dict and "signatures" in body


async def _discard(_text: str) -> None:
    """Where the answer to a CALL of a backend that went away goes (see backend_lost)."""


def _with_id(frame: Frame, message_id: str) -> str:
    """An answer frame's text with another message id (mapping a rewritten id back)."""
    return encode_frame(frame._replace(id=message_id))
