"""The call ledger of one station session: who owes whom an answer (sans-IO).

OCPP-J allows one outstanding CALL per direction, so a session has two lanes: ``up``
(the station's CALLs to its backend) and ``down`` (CALLs toward the station, from its
backend or from another source such as a secondary backend). A lane holds the CALL in
flight and a bounded queue of CALLs waiting behind it.

The ledger only decides, in the manner of h11's state machine: no I/O, no clock, no
tasks. The session (:mod:`router.relay.session`) performs what it returns: it sends the
CALL :meth:`CallLedger.offer` puts in flight, and for each finished CALL it answers the
caller, then sends the ``following`` CALL the ledger has already moved into flight.
Moving the next CALL in before any await is what keeps a CALL that arrives meanwhile
from overtaking the queue.

The contract, checked by a hypothesis state machine in ``tests/test_ledger.py``: every
CALL offered comes back out exactly once (refused as BUSY, or as the ``done`` CALL of
:meth:`~CallLedger.finish`, :meth:`~CallLedger.expire`, :meth:`~CallLedger.abandon`,
or in :meth:`~CallLedger.drain`), on the lane it was offered to, in queue order.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from router.wire.frames import Frame

ReplyFn = Callable[[str], Awaitable[None]]
"""Where the answer to another source's CALL goes (its own link), as frame text."""


@dataclass(slots=True, eq=False)
class Call:
    """One CALL the ledger holds until it is answered."""

    frame: Frame  # as it goes to the callee (the message id may be rewritten)
    text: str | None  # its text when already encoded, else None (the link encodes it)
    reply: ReplyFn | None = None  # None: the lane's own caller; else another source
    origin_id: str = ""  # that source's message id: its answer is mapped back to it

    @property
    def message_id(self) -> str:
        return self.frame.id

    @property
    def action(self) -> str:
        return self.frame.action or ""


@dataclass(slots=True, eq=False)
class Lane:
    """CALLs in one direction: the one in flight and those queued behind it."""

    name: str  # "up" (station -> backend) or "down" (toward the station)
    current: Call | None = None
    # made on first use: most lanes never queue, and a session lives for days
    queue: deque[Call] | None = None
    token: int = 0  # names the CALL in flight, so a stale timeout is recognised
    deadline: float = 0.0  # written by the call timer (router/relay/timer.py)
    # the lane's last CALL that its caller got a CALLRESULT for: the one CALL a
    # CALLRESULTERROR (OCPP 2.1) from that caller may refer to (set by the session)
    result_id: str | None = None
    result_action: str = ""


class Offer(enum.Enum):
    """What :meth:`CallLedger.offer` decided for a CALL."""

    SEND = "send"  # now in flight: send it to the callee
    QUEUED = "queued"  # waits behind the CALL in flight
    BUSY = "busy"  # the queue is full: answer the caller with a CALLERROR


Finished = tuple[Call, Call | None]
"""A CALL that needs its answer now, and the next CALL already moved into flight."""


class CallLedger:
    """The two lanes of one station session and the rules that move CALLs along them."""

    __slots__ = ("down", "up")

    _tokens = itertools.count(1)  # shared: a token never repeats within the process

    def __init__(self) -> None:
        self.up = Lane("up")
        self.down = Lane("down")

    def offer(self, lane: Lane, call: Call, limit: int) -> Offer:
        """A CALL for the lane's callee; at most ``limit`` may wait behind the one in flight."""
        # invariant: a lane with no CALL in flight has an empty queue (see _next)
        if lane.current is None:
            lane.current = call
            lane.token = next(self._tokens)
            return Offer.SEND
        queue = lane.queue
        if queue is None:
            if limit <= 0:
                return Offer.BUSY
            lane.queue = queue = deque()
        elif len(queue) >= limit:
            return Offer.BUSY
        queue.append(call)
        return Offer.QUEUED

    def finish(self, lane: Lane, message_id: str) -> Finished | None:
        """An answer with this id came back on the lane; None if it answers nothing here."""
        current = lane.current
        if current is None or current.frame.id != message_id:
            return None
        return current, self._next(lane)

    def expire(self, lane: Lane, token: int) -> Finished | None:
        """The CALL armed with ``token`` ran out of time; None if it was answered already."""
        current = lane.current
        if current is None or lane.token != token:
            return None
        return current, self._next(lane)

    def abandon(self, lane: Lane) -> Finished | None:
        """The callee is gone but the lane goes on (a backend failover): end the CALL in
        flight, which the node answers; the next one goes to the new callee."""
        current = lane.current
        if current is None:
            return None
        return current, self._next(lane)

    def orphan(self, lane: Lane, discard: ReplyFn) -> None:
        """The lane's own caller is gone but its callee is not (the backend of a station
        that stays connected moved): the caller's queued CALLs are dropped; its CALL in
        flight stays in flight, its answer going to ``discard``, so the callee is still
        asked one CALL at a time; other sources' CALLs are kept as they are."""
        current = lane.current
        if current is not None and current.reply is None:
            current.reply = discard
        if lane.queue:
            lane.queue = deque(call for call in lane.queue if call.reply is not None) or None

    def drain(self, lane: Lane) -> list[Call]:
        """Everything the lane still owes, oldest first; the lane is left empty."""
        owed = [] if lane.current is None else [lane.current]
        if lane.queue:
            owed.extend(lane.queue)
        lane.current = None
        lane.queue = None
        return owed

    def idle(self) -> bool:
        """No CALL in flight either way."""
        return self.up.current is None and self.down.current is None

    def _next(self, lane: Lane) -> Call | None:
        queue = lane.queue
        if not queue:  # None or empty
            lane.current = None
            return None
        following = lane.current = queue.popleft()
        lane.token = next(self._tokens)
        return following
