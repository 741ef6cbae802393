"""What a station session does with each frame: check it, correlate it, forward it.

:class:`Forwarding` holds the per-frame rules of :class:`~router.relay.session.StationSession`,
which adds the links' lifecycle around them. A frame reaches the rules one of two ways:

* :meth:`Forwarding._step`, the forwarding loop's path (router/net/readloop.py): a plain
  call with writes that do not wait, for the frames that need nothing else (nearly all);
  anything that must wait goes to the side's task as a job before it happens;
* :meth:`Forwarding._handle`, a side's task's path: every frame of a link the loop does not
  read (TLS, the overlay, a backend that fails over), and the jobs the loop hands over.

Frames are forwarded as the text they arrived in; decoding only checks them and reads
what correlation needs. Every CALL ends in exactly one answer: the peer's, or a CALLERROR
from the node (queue full, timeout, link lost, shutdown).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from time import perf_counter_ns
from typing import Any

import trio

from policies import Outcome
from router.config import NodeSection
from router.logs import log_event
from router.net.compression import CompressedText
from router.net.readloop import Reading
from router.net.wslink import Link, LinkClosed, WsLink
from router.relay.gate import Gate, Verdict
from router.relay.ledger import Call, CallLedger, Finished, Lane, Offer
from router.relay.timer import CallTimer
from router.stats import Stats
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
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

CLOSE_UNSUPPORTED_DATA = 1003

BUSY = "too many CALLs waiting: OCPP-J allows one outstanding CALL per direction"
Job = Callable[[], Awaitable[object]]
"""Work the forwarding loop hands a side's task; a job returning False ends the session."""

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
    # while the forwarding loop reads the link (router/net/readloop.py):
    reading: Reading | None = None
    # work handed to the side's task, in order; None while the loop steps frames itself
    jobs: list[Job] | None = None
    task: trio.lowlevel.Task | None = None  # the side's task, while it waits for a job


class Forwarding:
    """The per-frame rules of a station session (see the module)."""

    deps: SessionDeps
    identity: str
    version: Version
    ledger: CallLedger
    station: Side
    backend: Side
    _debug: bool

    # --- the hot path: the forwarding loop's step ------------------------------------------

    def _step(self, side: Side, message: str | bytes) -> Job | None:
        """Forward one message the loop read, with no await: None when done, else the job
        the side's task must do instead. Anything that must wait goes to the task before
        it happens: nothing was done, or the job finishes what was."""
        if (type(message) is not str and type(message) is not CompressedText) or self._debug:
            return partial(self._handle, side, message)
        t0 = perf_counter_ns()
        try:
            frame = decode(message, self.version)
        except FrameError:
            return partial(self._handle, side, message)  # decoded again there, answered
        text: str | None = message
        mtype = frame.type
        if mtype in (CALLRESULT, CALLERROR):
            current = side.answers.current
            if current is not None and current.reply is not None:
                # an answer to another source's CALL: its reply is sent by a task
                return partial(self._handle, side, message)
        deps = self.deps
        stats = deps.stats
        received = frame
        checked = self._check(side, frame, text)
        if checked is None:
            return None  # an unmatched answer, dropped
        if isinstance(checked, Verdict):
            return partial(self._refused, side, frame, checked)
        frame, text = checked
        # the loop's sessions have a WsLink on both sides (see _loopable); no cast(): that
        # is a call, and this runs for every frame
        other: WsLink = side.other  # type: ignore[assignment]
        if mtype == CALL:
            if side is self.station and deps.duplicate is not None:
                self._duplicate(deps.duplicate, frame, received)
            call = Call(frame, text)
            offer = self.ledger.offer(side.calls, call, deps.settings.max_queued_calls)
            if offer is Offer.SEND:
                self._started(side, call)
                other.put_frame(frame, text)
                self._count(side, t0)
            elif offer is Offer.BUSY:
                return partial(self._busy, side, call)
        elif mtype == SEND:
            stats.frames_by_action[(side.direction, frame.action or "")] += 1
            other.put_frame(frame, text)
            self._count(side, t0)
        elif mtype == CALLRESULTERROR:
            lane = side.calls
            if lane.result_id != frame.id:
                self._drop_unmatched(side, frame.id)
                return None
            lane.result_id = None
            other.put_frame(frame, text)
            self._count(side, t0)
        else:
            finished = self.ledger.finish(side.answers, frame.id)
            if finished is None:
                self._drop_unmatched(side, frame.id)
                return None
            done, following = finished
            stats.frames_by_action[(side.direction, done.action)] += 1
            asker = self.backend if side is self.station else self.station
            self._advance(asker, following)
            self._note_result(asker, done, frame)
            asker.ws.put_frame(frame, text)  # type: ignore[attr-defined]
            stats.answers_forwarded += 1
            self._count(side, t0)
            if following is not None:
                # the asker's next CALL, to the side that just answered: the side waits
                # if its own link cannot take it, as a pump would in its send
                own: WsLink = side.ws  # type: ignore[assignment]
                own.put_frame(following.frame, following.text)
                self._count_sent(asker)
                if own.backlog:
                    return own.flush
        return None

    # --- the general path ---------------------------------------------------------------

    async def _handle(self, side: Side, message: str | bytes | Frame) -> bool:
        """One message from ``side``, whatever it needs; False when the session must end."""
        try:
            await self._forward(side, message)
        except LinkClosed:
            self._note_closed(side)
            return False
        except _EndSession:
            return False
        return True

    async def _forward(self, side: Side, message: str | bytes | Frame) -> None:
        deps = self.deps
        stats = deps.stats
        version = self.version
        t0 = perf_counter_ns()
        frame: Frame
        text: str | None
        if type(message) is str or type(message) is CompressedText:
            text = message
            if self._debug:
                log_event(log, logging.DEBUG, "frame", station=self.identity,
                          side=side.name, text=text[:2000])
            try:
                frame = decode(text, version)
            except FrameError as err:
                await self._bad_frame(side, err)
                return
        elif type(message) is Frame:
            # decoded already where it entered the node (an overlay peer link)
            frame, text = message, None
            if self._debug:
                log_event(log, logging.DEBUG, "frame", station=self.identity,
                          side=side.name, text=encode_frame(frame)[:2000])
            try:
                check_version(frame, version)
            except FrameError as err:
                await self._bad_frame(side, err)
                return
        else:
            await self._refuse_binary(side)
            raise _EndSession
        mtype = frame.type
        # the side whose CALLs this side answers
        asker = self.backend if side is self.station else self.station
        received = frame
        checked = self._check(side, frame, text)
        if checked is None:
            return
        if isinstance(checked, Verdict):
            await self._refused(side, frame, checked)
            return
        frame, text = checked
        if mtype == CALL:
            if side is self.station and deps.duplicate is not None:
                self._duplicate(deps.duplicate, frame, received)
            await self._offer(side, Call(frame, text), t0)
        elif mtype == SEND:
            # not answered
            stats.frames_by_action[(side.direction, frame.action or "")] += 1
            await side.other.send_frame(frame, text)
            self._count(side, t0)
        elif mtype == CALLRESULTERROR:
            # not answered; it refers to the CALLRESULT this side got last, and
            # to nothing else (the gate, if it ran, checked already)
            lane = side.calls
            if lane.result_id != frame.id:
                self._drop_unmatched(side, frame.id)
                return
            lane.result_id = None
            await side.other.send_frame(frame, text)
            self._count(side, t0)
        else:
            finished = self.ledger.finish(side.answers, frame.id)
            if finished is None:  # the gate, if it ran, checked already
                self._drop_unmatched(side, frame.id)
                return
            stats.frames_by_action[(side.direction, finished[0].action)] += 1
            await self._complete(asker, finished, answer=(frame, text), t0=t0)

    def _duplicate(self, duplicate: DuplicateFn, frame: Frame, received: Frame) -> None:
        """A station's CALL, as it goes to the primary, for the secondaries."""
        unwrapped = frame.action != received.action
        duplicate(self.identity, self.version.value, frame.action or "", frame.payload,
                  (received.action or "", received.payload) if unwrapped else None)

    def _check(self, side: Side, frame: Frame,
               text: str | None) -> tuple[Frame, str | None] | Verdict | None:
        """The firewall's look at a frame where it enters, when it needs one: the frame
        and text to forward, the Verdict that refuses it, or None for an answer that
        answers nothing here (dropped and counted)."""
        gate = self.deps.gate  # read per frame: a reload may add or replace the policy
        if gate.firewall is None and not _signed(frame) and not (
                side.peer_unwraps_signed and _signed_message(frame, side)):
            return frame, text
        action = self._gate_action(side, frame)
        if action is None:
            return None
        verdict = gate.check(frame, text, action, side.direction, side.source,
                             self.version.value, side.peer_keeps_signatures,
                             side.peer_unwraps_signed)
        if not verdict.forward:
            return verdict
        return verdict.frame, verdict.text

    def _gate_action(self, side: Side, frame: Frame) -> str | None:
        """The action the firewall decides a frame by, or None for an answer that answers
        nothing here (dropped and counted)."""
        mtype = frame.type
        if mtype in (CALLRESULT, CALLERROR):
            current = side.answers.current
            if current is None or current.frame.id != frame.id:
                self._drop_unmatched(side, frame.id)
                return None
            return current.action
        if mtype == CALLRESULTERROR:
            if side.calls.result_id != frame.id:
                self._drop_unmatched(side, frame.id)
                return None
            return side.calls.result_action
        return frame.action or ""

    async def _refused(self, side: Side, frame: Frame, verdict: Verdict) -> bool:
        """The firewall's refusal of a frame ``side`` sent: the answer it owes, if any."""
        decision = verdict.decision
        assert decision is not None and verdict.refusal is not None
        rejected = decision.outcome is Outcome.REJECT
        stats = self.deps.stats
        mtype = frame.type
        if mtype == CALL:
            if rejected:
                await self._answer_caller(side, frame.id, Problem.SECURITY, verdict.refusal)
            else:
                stats.dropped += 1
        elif mtype in (CALLRESULT, CALLERROR):
            if rejected:
                # the caller still gets exactly one answer: ours, instead of the refused one
                # (unless its CALL was settled since the check: timed out, say)
                finished = self.ledger.finish(side.answers, frame.id)
                if finished is not None:
                    asker = self.backend if side is self.station else self.station
                    await self._complete(asker, finished, problem=Problem.SECURITY,
                                         description=verdict.refusal)
            else:
                # dropped: the CALL stays pending and the node answers it on timeout
                stats.dropped += 1
        else:
            stats.dropped += 1  # SEND and CALLRESULTERROR have no answer to give
        return True

    async def _busy(self, caller: Side, call: Call) -> bool:
        await self._owe(caller, call, Problem.BUSY, BUSY)
        return True

    async def _offer(self, caller: Side, call: Call, t0: int) -> None:
        """A CALL from ``caller``: send it now, queue it, or refuse it (busy)."""
        offer = self.ledger.offer(caller.calls, call, self.deps.settings.max_queued_calls)
        if offer is Offer.SEND:
            self._started(caller, call)
            await caller.other.send_frame(call.frame, call.text)
            self._count(caller, t0)
        elif offer is Offer.BUSY:
            await self._owe(caller, call, Problem.BUSY, BUSY)

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
        """Where a finished CALL of ``caller`` is settled (the loop's :meth:`_step` does the
        same for an answer it forwards at once): it gets ``answer`` (the callee's) or else
        the node's CALLERROR, then the next queued CALL goes out."""
        done, following = finished
        self._advance(caller, following)
        if answer is None:
            await self._owe(caller, done, problem, description)
        else:
            frame, text = answer
            if done.reply is None:
                self._note_result(caller, done, frame)
                await caller.ws.send_frame(frame, text)
            else:
                await done.reply(_with_id(frame, done.origin_id))
            self.deps.stats.answers_forwarded += 1
            self._count(self.backend if caller is self.station else self.station, t0)
        if following is not None:
            await caller.other.send_frame(following.frame, following.text)
            self._count_sent(caller)

    def _advance(self, caller: Side, following: Call | None) -> None:
        """The lane's next CALL is in flight (before any await: nothing may overtake it)."""
        if following is not None:
            self._started(caller, following)
        else:
            self.deps.timer.disarm(caller.calls)

    @staticmethod
    def _note_result(caller: Side, done: Call, answer: Frame) -> None:
        """A CALLRESULT for the caller: the one CALL a CALLRESULTERROR may refer to."""
        if answer.type == CALLRESULT:
            lane = caller.calls
            lane.result_id, lane.result_action = answer.id, done.action

    def _count_sent(self, caller: Side) -> None:
        """A queued CALL of ``caller`` went out."""
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

    # --- timeouts -----------------------------------------------------------------------

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

    def _note_closed(self, side: Side) -> None:
        """A send failed: on the other link, or on this side's own (the node answering
        its caller). Record whichever closed, so the wind-down says who went away."""
        asker = self.backend if side is self.station else self.station
        for s in (side, asker):
            if s.closed_code is None and s.ws.closed is not None:
                s.closed_code = s.ws.closed


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


def _with_id(frame: Frame, message_id: str) -> str:
    """An answer frame's text with another message id (mapping a rewritten id back)."""
    return encode_frame(frame._replace(id=message_id))


class _EndSession(Exception):
    """A message that ends the session (a binary one on an OCPP-J link)."""
