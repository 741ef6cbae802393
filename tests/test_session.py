"""StationSession over in-memory links (no sockets): routing, the call ledger, timeouts,
faults and the end. Every test runs under trio's MockClock with autojump: call timeouts
pass in virtual time."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from policies import Firewall, load_policy
from router.config import NodeSection
from router.net.wslink import LinkClosed, LinkInfo
from router.relay.forwarding import DuplicateFn, SessionDeps
from router.relay.gate import Gate
from router.relay.session import StationSession
from router.relay.timer import CallTimer
from router.stats import Stats
from router.wire.frames import CALL, CALLERROR, CALLRESULT, SEND, Frame, Version, encode_frame
from tests.session_rig import running

settle = trio.testing.wait_all_tasks_blocked
Clock = trio.testing.MockClock


class FakeLink:
    """The ``Link`` protocol in memory."""

    def __init__(self, subprotocol: str) -> None:
        self.subprotocol: str | None = subprotocol
        self._push, self._inbox = trio.open_memory_channel[str | bytes | Frame | LinkClosed](
            math.inf)  # a LinkClosed in the inbox: the close, after what came first
        self.sent: list[tuple[Frame, str | None]] = []
        self.closes: list[tuple[int, str]] = []  # every aclose call, in order
        self._code: int | None = None
        self._reason = ""
        self._ended = False  # get_message raises from now on
        self._read = 0

    @property
    def closed(self) -> int | None:
        return self._code

    def push(self, *messages: str | bytes | Frame) -> None:
        """The peer sends messages."""
        for message in messages:
            self._push.send_nowait(message)

    def peer_close(self, code: int, *, at_once: bool = False) -> None:
        """The peer closes the link; its earlier messages are still read first. ``at_once``:
        the close arrived with them (as in one TCP read), so sends fail from now on."""
        if at_once:
            self._code = code
        self._push.send_nowait(LinkClosed(code, "peer closed"))

    async def get_message(self) -> str | bytes | Frame:
        if self._ended:
            raise LinkClosed(self._code or 1006, self._reason)
        message = await self._inbox.receive()
        if isinstance(message, LinkClosed):
            self._ended = True
            if self._code is None:
                self._code, self._reason = message.code, message.reason
            raise LinkClosed(self._code, self._reason)
        return message

    async def send_frame(self, frame: Frame, text: str | None) -> None:
        await trio.lowlevel.checkpoint()
        if self._code is not None:
            raise LinkClosed(self._code, self._reason)
        self.sent.append((frame, text))

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None:
        self.closes.append((code, reason))
        if self._code is None:
            self._code, self._reason = code, reason
        self._ended = True
        self._push.send_nowait(LinkClosed(code, reason))  # wakes a waiting reader
        await trio.lowlevel.checkpoint()

    def info(self) -> LinkInfo:
        return LinkInfo("open" if self._code is None else "closing")

    def texts(self) -> list[str]:
        """Everything sent, as the peer would receive it."""
        return [text if text is not None else encode_frame(frame) for frame, text in self.sent]

    def take(self) -> list[list[Any]]:
        """The frames sent since the last take, decoded."""
        out = [json.loads(text) for text in self.texts()[self._read:]]
        self._read = len(self.sent)
        return out


@dataclass
class Rig:
    session: StationSession
    station: FakeLink
    backend: FakeLink
    stats: Stats
    timer: CallTimer
    ended: trio.Event  # session.run() returned


@asynccontextmanager
async def rig(version: Version = Version.V201, *, max_queued: int = 16, timeout_s: float = 30.0,
              duplicate: DuplicateFn | None = None,
              step: Callable[[], None] | None = None) -> AsyncIterator[Rig]:
    assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
    station, backend = FakeLink(version.value), FakeLink(version.value)
    stats, timer = Stats(), CallTimer(timeout_s)
    settings = NodeSection(id="n1", call_timeout_s=timeout_s, max_queued_calls=max_queued)
    deps = SessionDeps(settings=settings, gate=Gate(None, None, None), stats=stats,
                       timer=timer, duplicate=duplicate)
    if step is not None:
        deps.step = step
    session = StationSession(deps, "CS-1", version, station, backend, "csms")
    async with running(session, timer) as ended:
        yield Rig(session, station, backend, stats, timer, ended)


@pytest.fixture
def autojump_clock() -> Clock:
    return trio.testing.MockClock(autojump_threshold=0)


def call(mid: str, action: str = "Heartbeat", payload: dict[str, Any] | None = None) -> str:
    return json.dumps([CALL, mid, action, payload or {}])


def result(mid: str, payload: dict[str, Any] | None = None) -> str:
    return json.dumps([CALLRESULT, mid, payload or {}])


def error(mid: str, code: str = "NotImplemented") -> str:
    return json.dumps([CALLERROR, mid, code, "", {}])


class Replies(list[str]):
    """The ``reply`` callback of another source: what it was answered, in order."""

    async def __call__(self, text: str) -> None:
        self.append(text)

    def frames(self) -> list[list[Any]]:
        return [json.loads(text) for text in self]


def codes(frames: list[list[Any]]) -> list[tuple[int, str, str]]:
    """(type, id, action or error code) of each frame; the result's payload left out."""
    return [(f[0], f[1], f[2] if f[0] in (CALL, CALLERROR) else "") for f in frames]


# --- routing --------------------------------------------------------------------------


async def test_station_call_and_answer_forwarded_as_exact_text(autojump_clock: Clock) -> None:
    async with rig() as r:
        text = '[2,  "c1", "Heartbeat",{ }]'  # odd spacing: forwarded untouched
        r.station.push(text)
        await settle()
        assert [t for _, t in r.backend.sent] == [text]
        assert r.backend.sent[0][0] == Frame(CALL, "c1", action="Heartbeat", payload={})
        answer = '[3, "c1", {"currentTime": "2025-01-01T00:00:00Z"}]'
        r.backend.push(answer)
        await settle()
        assert r.station.texts() == [answer]
        assert r.session.idle()
        assert len(r.timer) == 0  # an answered CALL leaves nothing for the sweep to walk
    assert (r.stats.frames_up, r.stats.frames_down, r.stats.answers_forwarded) == (1, 1, 1)
    assert r.stats.frames_by_action[("from-station", "Heartbeat")] == 1
    assert r.stats.frames_by_action[("to-station", "Heartbeat")] == 1


async def test_backend_call_reaches_station_and_its_error_goes_back(autojump_clock: Clock) -> None:
    async with rig() as r:
        r.backend.push(call("b1", "Reset", {"type": "Immediate"}))
        await settle()
        assert r.station.texts() == [call("b1", "Reset", {"type": "Immediate"})]
        assert not r.session.idle()
        r.station.push(error("b1", "NotSupported"))
        await settle()
        assert r.backend.texts() == [error("b1", "NotSupported")]
        assert r.session.idle()
        assert r.stats.node_errors == 0


async def test_one_outstanding_call_per_direction_keeps_order(autojump_clock: Clock) -> None:
    async with rig() as r:
        r.station.push(call("c1"), call("c2"), call("c3"))
        r.backend.push(call("b1", "Reset"), call("b2", "Reset"))
        await settle()
        assert codes(r.backend.take()) == [(CALL, "c1", "Heartbeat")]
        assert codes(r.station.take()) == [(CALL, "b1", "Reset")]
        r.backend.push(result("c1"))
        r.station.push(result("b1"))
        await settle()
        # the two pumps interleave: within a link, only what goes out matters
        assert sorted(codes(r.station.take())) == [(CALL, "b2", "Reset"),
                                                   (CALLRESULT, "c1", "")]
        assert sorted(codes(r.backend.take())) == [(CALL, "c2", "Heartbeat"),
                                                   (CALLRESULT, "b1", "")]
        r.backend.push(result("c2"))
        await settle()
        assert codes(r.backend.take()) == [(CALL, "c3", "Heartbeat")]
        r.backend.push(result("c3"))
        await settle()
        assert codes(r.station.take()) == [(CALLRESULT, "c2", ""), (CALLRESULT, "c3", "")]


async def test_calls_beyond_the_queue_limit_get_generic_error(autojump_clock: Clock) -> None:
    async with rig(max_queued=1) as r:
        r.station.push(call("c1"), call("c2"), call("c3"), call("c4"))
        await settle()
        assert codes(r.station.take()) == [(CALLERROR, "c3", "GenericError"),
                                           (CALLERROR, "c4", "GenericError")]
        assert codes(r.backend.take()) == [(CALL, "c1", "Heartbeat")]
        r.backend.push(result("c1"))
        await settle()
        assert codes(r.backend.take()) == [(CALL, "c2", "Heartbeat")]
        r.backend.push(result("c2"))
        await settle()
        assert r.backend.take() == []  # the refused CALLs never go out
        assert codes(r.station.take()) == [(CALLRESULT, "c1", ""), (CALLRESULT, "c2", "")]
    assert r.stats.node_errors_by_code == Counter({"GenericError": 2})


async def test_unmatched_answers_are_dropped_and_counted(autojump_clock: Clock) -> None:
    async with rig() as r:
        r.backend.push(result("nobody"))
        r.station.push(error("nobody"), call("c1"))
        await settle()
        r.backend.take()
        r.backend.push(result("c2"))  # a wrong id while c1 is pending
        await settle()
        assert r.station.take() == []
        assert r.stats.dropped == 3
        r.backend.push(result("c1"))  # c1 still pending: the right answer passes
        await settle()
        assert codes(r.station.take()) == [(CALLRESULT, "c1", "")]
        assert r.backend.take() == []
        assert r.stats.answers_forwarded == 1


# --- timeouts ---------------------------------------------------------------------------


async def test_timeout_answers_once_and_the_late_answer_is_dropped(autojump_clock: Clock) -> None:
    async with rig(timeout_s=10.0) as r:
        start = trio.current_time()
        r.station.push(call("c1"), call("c2"))
        await settle()
        assert codes(r.backend.take()) == [(CALL, "c1", "Heartbeat")]
        await trio.sleep_until(start + 9.9)
        assert r.station.take() == []
        await trio.sleep_until(start + 10 + r.timer.tick_s + 0.01)
        timed_out = r.station.take()
        assert codes(timed_out) == [(CALLERROR, "c1", "InternalError")]
        assert timed_out[0][3] == "no answer within 10 s"
        assert codes(r.backend.take()) == [(CALL, "c2", "Heartbeat")]  # next one went out
        r.backend.push(result("c1"))  # too late
        await settle()
        assert r.station.take() == []
        assert r.stats.dropped == 1
        r.backend.push(result("c2"))
        await settle()
        await trio.sleep(300)
        assert codes(r.station.take()) == [(CALLRESULT, "c2", "")]
    assert r.stats.timeouts == 1
    assert r.stats.node_errors_by_code == Counter({"InternalError": 1})


async def test_backend_call_unanswered_by_station_times_out(autojump_clock: Clock) -> None:
    async with rig(timeout_s=5.0) as r:
        r.backend.push(call("b1", "Reset"))
        await trio.sleep(60)
        assert codes(r.backend.take()) == [(CALLERROR, "b1", "InternalError")]
        r.station.push(result("b1"))
        await settle()
        assert r.backend.take() == []
        assert r.stats.dropped == 1


# --- malformed frames -------------------------------------------------------------------


async def test_malformed_frames_v201(autojump_clock: Clock) -> None:
    async with rig() as r:
        r.station.push("{not json", '[2, "c1", "Heartbeat"]',
                       '[6, "s1", "Notice", {}]', '[2, "c2", "Heartbeat", []]')  # SEND: 2.1 only
        await settle()
        assert codes(r.station.take()) == [
            (CALLERROR, "-1", "RpcFrameworkError"), (CALLERROR, "c1", "FormatViolation"),
            (CALLERROR, "s1", "MessageTypeNotSupported"), (CALLERROR, "c2", "FormatViolation")]
        r.station.push(call("c3"))
        await settle()
        r.backend.push('[3, "c3"]')  # a broken answer: dropped, never answered
        await settle()
        assert r.backend.take() == [[CALL, "c3", "Heartbeat", {}]]
        assert r.station.take() == []
        assert r.stats.dropped == 1
        r.backend.push(result("c3"))  # c3 is still pending
        await settle()
        assert codes(r.station.take()) == [(CALLRESULT, "c3", "")]
        assert r.ended.is_set() is False


async def test_binary_message_on_station_link_closes_it_with_1003(autojump_clock: Clock) -> None:
    async with rig() as r:
        r.station.push(b"\x00\x01")
        await r.ended.wait()
        assert r.station.closes[0][0] == 1003
        assert r.station.closed == 1003
        assert r.backend.closes == [(1001, "station link closed")]
        assert r.backend.sent == []


async def test_a_session_tells_its_steps_to_the_gc_housekeeper(autojump_clock: Clock) -> None:
    """Its start, each pump's end and its own end (router/gcwatch.GcHousekeeper.step)."""
    steps: list[bool] = []
    async with rig(step=lambda: steps.append(True)) as r:
        assert len(steps) == 1
        r.station.push(b"\x00\x01")
        await r.ended.wait()
        assert len(steps) == 4


async def test_ocpp16_uses_its_own_error_codes(autojump_clock: Clock) -> None:
    async with rig(Version.V16, max_queued=0, timeout_s=10.0) as r:
        # CALLRESULTERROR is OCPP 2.1 only; with no queue at all, c3 finds the lane busy
        r.station.push("[", '[2, "c1", "Heartbeat", {}, 5]', '[5, "r1", "X", "", {}]',
                       call("c2"), call("c3"))
        await settle()
        assert codes(r.station.take()) == [
            (CALLERROR, "-1", "FormationViolation"), (CALLERROR, "c1", "FormationViolation"),
            (CALLERROR, "r1", "FormationViolation"), (CALLERROR, "c3", "GenericError")]
        await trio.sleep(20)
        assert codes(r.station.take()) == [(CALLERROR, "c2", "InternalError")]


# --- frames from a virtual link ---------------------------------------------------------


async def test_frame_from_a_link_is_forwarded_as_a_frame(autojump_clock: Clock) -> None:
    async with rig() as r:
        frame = Frame(CALL, "f1", action="Authorize", payload={"idToken": {"idToken": "x"}})
        r.station.push(frame)
        await settle()
        assert r.backend.sent == [(frame, None)]
        r.backend.push(Frame(CALLRESULT, "f1", payload={"idTokenInfo": {}}))
        await settle()
        assert r.station.sent == [(Frame(CALLRESULT, "f1", payload={"idTokenInfo": {}}), None)]
        r.station.push(Frame(SEND, "s1", action="Notice", payload={}))
        await settle()
        assert codes(r.station.take()) == [(CALLRESULT, "f1", ""),
                                           (CALLERROR, "s1", "MessageTypeNotSupported")]
        assert len(r.backend.sent) == 1


async def test_send_frame_on_ocpp21_is_forwarded_unanswered(autojump_clock: Clock) -> None:
    async with rig(Version.V21) as r:
        frame = Frame(SEND, "s1", action="NotifyPeriodicEventStream", payload={"data": []})
        r.station.push(frame)
        await settle()
        assert r.backend.sent == [(frame, None)]
        assert r.station.sent == []
        assert r.session.idle()


# --- the end ----------------------------------------------------------------------------


@pytest.mark.parametrize(("station_code", "backend_code"),
                         [(1000, 1000), (1001, 1001), (1006, 1001)])
async def test_station_close_answers_backend_calls_and_closes_backend(
    autojump_clock: Clock, station_code: int, backend_code: int,
) -> None:
    async with rig() as r:
        r.station.push(call("c1"))
        r.backend.push(call("b1", "Reset"), call("b2", "Reset"))  # b2 queued behind b1
        await settle()
        r.backend.take()
        r.station.take()
        r.station.peer_close(station_code)
        await r.ended.wait()
        # the backend's CALLs (in flight and queued) get InternalError on the backend link;
        # the station's own CALL c1 is not answered: its link is gone
        assert r.backend.take() == [
            [CALLERROR, "b1", "InternalError", "station link closed", {}],
            [CALLERROR, "b2", "InternalError", "station link closed", {}]]
        assert r.backend.closes == [(backend_code, "station link closed")]
        assert r.station.closes == [(station_code, "station link closed")]
        assert r.station.take() == []
        assert r.session.idle()
        assert not r.session.done.is_set()  # the registry sets it, not run()


async def test_backend_close_answers_station_call_and_closes_station(autojump_clock: Clock) -> None:
    async with rig() as r:
        r.station.push(call("c1"), call("c2"))
        r.backend.push(call("b1", "Reset"))
        await settle()
        r.station.take()
        r.backend.take()
        r.backend.peer_close(1011)
        await r.ended.wait()
        assert r.station.take() == [
            [CALLERROR, "c1", "InternalError", "backend link closed", {}],
            [CALLERROR, "c2", "InternalError", "backend link closed", {}]]
        assert r.station.closes == [(1001, "backend link closed")]
        assert r.backend.closes == [(1011, "backend link closed")]
        assert r.backend.take() == []  # b1's caller is gone


async def test_stop_answers_every_pending_call_and_closes_both(autojump_clock: Clock) -> None:
    replies = Replies()
    async with rig() as r:
        r.station.push(call("c1"), call("c2"))
        r.backend.push(call("b1", "Reset"))
        await settle()
        await r.session.call_from("sec", "m1", "GetVariables", {}, replies)
        r.station.take()
        r.backend.take()
        r.session.stop("replaced by a newer connection")
        r.session.stop("second reason is ignored")
        await r.ended.wait()
        why = "replaced by a newer connection"
        assert codes(r.station.take()) == [(CALLERROR, "c1", "InternalError"),
                                           (CALLERROR, "c2", "InternalError")]
        assert r.backend.take() == [[CALLERROR, "b1", "InternalError", why, {}]]
        assert replies.frames() == [[CALLERROR, "m1", "InternalError", why, {}]]
        assert r.station.closes == [(1001, why)]
        assert r.backend.closes == [(1001, why)]
        assert r.session.idle()


# --- other sources, failover ------------------------------------------------------------


async def test_call_from_another_source_rewrites_id_and_queues(autojump_clock: Clock) -> None:
    replies = Replies()
    async with rig() as r:
        r.backend.push(call("b1", "Reset"))
        await settle()
        await r.session.call_from("sec", "m7", "GetVariables", {"k": 1}, replies)
        assert codes(r.station.take()) == [(CALL, "b1", "Reset")]  # m7 waits behind b1
        r.station.push(result("b1"))
        await settle()
        assert r.station.take() == [[CALL, "x1-m7", "GetVariables", {"k": 1}]]
        assert codes(r.backend.take()) == [(CALLRESULT, "b1", "")]
        r.station.push(result("x1-m7", {"v": 2}))
        await settle()
        assert replies == ['[3,"m7",{"v":2}]']
        assert r.backend.take() == []
        await r.session.call_from("sec", "m8", "Reset", {}, replies)
        assert codes(r.station.take()) == [(CALL, "x2-m8", "Reset")]
        await trio.sleep(100)  # unanswered: the source's reply gets the timeout, its own id
        assert codes(replies.frames()[1:]) == [(CALLERROR, "m8", "InternalError")]
        assert r.backend.take() == []


async def test_backend_lost_settles_calls_and_moves_on(autojump_clock: Clock) -> None:
    replies = Replies()
    async with rig() as r:
        r.station.push(call("c1"), call("c2"))
        r.backend.push(call("b1", "Reset"))
        await settle()
        await r.session.call_from("sec", "m1", "GetVariables", {}, replies)  # behind b1
        assert codes(r.station.take()) == [(CALL, "b1", "Reset")]
        assert codes(r.backend.take()) == [(CALL, "c1", "Heartbeat")]
        # the backend link now stands for a new target (a FailoverLink keeps its object)
        await r.session.backend_lost("moving to another target")
        assert r.station.take() == [
            [CALLERROR, "c1", "InternalError", "moving to another target", {}]]
        assert codes(r.backend.take()) == [(CALL, "c2", "Heartbeat")]
        # b1 stays in flight at the station (one CALL at a time), m1 waits behind it
        assert replies.frames() == []
        r.station.push(result("b1"))  # the old backend's CALL: its answer goes nowhere
        r.backend.push(result("c2"))
        await settle()
        assert r.backend.take() == []
        assert sorted(codes(r.station.take())) == [
            (CALL, "x1-m1", "GetVariables"), (CALLRESULT, "c2", "")]
        r.station.push(result("x1-m1"))
        await settle()
        assert replies.frames() == [[CALLRESULT, "m1", {}]]
        assert r.stats.dropped == 0
        assert r.session.idle()
        await trio.sleep(100)  # nothing left to time out
        assert r.station.take() == [] and r.backend.take() == [] and len(replies) == 1


async def test_backend_lost_keeps_another_sources_call_in_flight_at_the_station(
    autojump_clock: Clock,
) -> None:
    """A secondary's CALL the station is running when the primary's target goes: the
    station's answer still reaches the secondary, and the new primary's CALL waits for
    it instead of being put to a station that has a CALL outstanding."""
    replies = Replies()
    async with rig() as r:
        await r.session.call_from("sec", "s1", "RequestStartTransaction", {}, replies)
        assert codes(r.station.take()) == [(CALL, "x1-s1", "RequestStartTransaction")]
        await r.session.backend_lost("moving to another target")
        r.backend.push(call("n1", "GetVariables"))  # the new target asks at once
        await settle()
        assert r.station.take() == []  # not while x1-s1 is outstanding
        r.station.push(result("x1-s1", {"status": "Accepted"}))
        await settle()
        assert replies.frames() == [[CALLRESULT, "s1", {"status": "Accepted"}]]
        assert codes(r.station.take()) == [(CALL, "n1", "GetVariables")]


# --- every CALL gets exactly one answer -------------------------------------------------


@pytest.mark.parametrize("seed", range(15))
async def test_every_call_gets_exactly_one_answer(
    autojump_clock: Clock, seed: int,
) -> None:
    rng = random.Random(seed)
    ending = ("stop", "station", "backend")[seed % 3]
    station_calls: list[str] = []  # ids the station sent
    backend_calls: list[str] = []
    source_calls: list[str] = []  # ids a secondary sent through call_from
    to_station: Counter[str] = Counter()  # answers the station received, by id
    to_backend: Counter[str] = Counter()
    forwarded_up: list[str] = []  # station CALLs as the backend saw them
    station_owes: list[str] = []  # CALL ids the station received, not answered yet
    backend_owes: list[str] = []
    replies = Replies()

    def collect(r: Rig) -> None:
        for f in r.station.take():
            if f[0] == CALL:
                station_owes.append(f[1])
            else:
                to_station[f[1]] += 1
        for f in r.backend.take():
            if f[0] == CALL:
                backend_owes.append(f[1])
                forwarded_up.append(f[1])
            else:
                to_backend[f[1]] += 1

    def answer(link: FakeLink, owes: list[str]) -> None:
        mid = "bogus" if rng.random() < 0.1 else owes.pop(rng.randrange(len(owes)))
        link.push(result(mid) if rng.random() < 0.7 else error(mid))

    async with rig(max_queued=2, timeout_s=10.0) as r:
        for step in range(80):
            op = rng.random()
            if op < 0.2:
                station_calls.append(f"s{step}")
                r.station.push(call(f"s{step}"))
            elif op < 0.4:
                backend_calls.append(f"b{step}")
                r.backend.push(call(f"b{step}", "GetVariables"))
            elif op < 0.47:
                source_calls.append(f"e{step}")
                await r.session.call_from("sec", f"e{step}", "Reset", {}, replies)
            elif op < 0.65 and station_owes:
                answer(r.station, station_owes)
            elif op < 0.83 and backend_owes:
                answer(r.backend, backend_owes)
            else:
                await trio.sleep(rng.uniform(0.0, 15.0))
            if rng.random() < 0.7:  # else the next frames pile up behind this one
                await settle()
            collect(r)
        if ending == "stop":
            r.session.stop("shutdown")
        else:
            (r.station if ending == "station" else r.backend).peer_close(1000)
        await r.ended.wait()
        collect(r)
    # a peer whose link closed cannot be answered: at most once; everyone else exactly once
    for sent, got, closed in ((station_calls, to_station, "station"),
                              (backend_calls, to_backend, "backend")):
        if ending == closed:
            assert set(got) <= set(sent) and max(got.values(), default=1) == 1
        else:
            assert got == Counter(sent)
    assert Counter(json.loads(t)[1] for t in replies) == Counter(source_calls)
    assert all(json.loads(t)[0] in (CALLRESULT, CALLERROR) for t in replies)
    # station CALLs reached the backend in the order sent (some refused or ended unsent)
    sent_up = set(forwarded_up)
    assert forwarded_up == [mid for mid in station_calls if mid in sent_up]
    assert station_calls and backend_calls  # the seed exercised both directions


# --- other details --------------------------------------------------------------------


async def test_call_from_refused_when_queue_full_keeps_its_id(autojump_clock: Clock) -> None:
    replies = Replies()
    async with rig(max_queued=0) as r:
        r.backend.push(call("b1", "Reset"))
        await settle()
        await r.session.call_from("sec", "m1", "Reset", {}, replies)
        assert codes(replies.frames()) == [(CALLERROR, "m1", "GenericError")]
        assert codes(r.station.take()) == [(CALL, "b1", "Reset")]


async def test_duplicate_sees_station_calls_and_signatures_are_stripped(
    autojump_clock: Clock,
) -> None:
    copies: list[tuple[str, str, str, Any]] = []
    async with rig(duplicate=lambda *copy: copies.append(copy)) as r:
        signed = {"vendorId": "v", "signatures": [{"keyId": "k", "signature": "s"}]}
        r.station.push(call("c1", "DataTransfer", signed))
        r.backend.push(call("b1", "Reset"))  # the backend's CALLs are not duplicated
        await settle()
        frame, text = r.backend.sent[0]
        assert (frame.payload, text) == ({"vendorId": "v"}, None)  # re-encoded by the link
        assert copies == [("CS-1", "ocpp2.0.1", "DataTransfer", {"vendorId": "v"}, None)]  # as sent
        r.backend.push(result("zzz", {"signatures": []}))  # signed and unmatched: dropped
        await settle()
        assert r.station.take() == [[CALL, "b1", "Reset", {}]]
        assert r.stats.dropped == 1


# --- bugs -------------------------------------------------------------------------------


async def test_call_from_does_not_raise_the_station_links_close(autojump_clock: Clock) -> None:
    """A secondary's CALL meets a station link that has just gone and the session has not
    noticed yet (a VirtualLink ended, a WsLink whose write failed): the source should get
    its one InternalError through ``reply``, not also the station link's LinkClosed."""
    replies = Replies()
    async with rig() as r:
        r.station.peer_close(1006, at_once=True)
        raised = None
        try:
            await r.session.call_from("sec", "m1", "Reset", {}, replies)
        except LinkClosed as exc:
            raised = exc
        await r.ended.wait()
        assert codes(replies.frames()) == [(CALLERROR, "m1", "InternalError")]
        assert raised is None, "call_from raised the station link's LinkClosed"


async def test_station_closing_after_a_refused_frame_is_a_station_close(
    autojump_clock: Clock,
) -> None:
    """A station over the overlay sends a SEND (not OCPP 2.0.1) and disconnects normally:
    its VirtualLink ends at once (sends raise LinkClosed(1000), queued frames are still
    read). The node's CALLERROR cannot go out; the session must still end as a station
    close, and close the backend with 1000."""
    async with rig() as r:
        r.station.push(Frame(SEND, "s1", action="Notice", payload={}))
        r.station.peer_close(1000, at_once=True)
        await r.ended.wait()
        assert r.backend.closes == [(1000, "station link closed")]


async def test_a_call_from_another_source_after_the_end_is_answered_at_once(
    autojump_clock: Clock,
) -> None:
    """Once the session is winding down, a secondary's CALL gets its InternalError now,
    not after call_timeout_s."""
    replies = Replies()
    async with rig() as r:
        r.station.peer_close(1000)
        await r.ended.wait()
        before = trio.current_time()
        await r.session.call_from("sec", "m9", "Reset", {}, replies)
        assert trio.current_time() == before
        assert codes(replies.frames()) == [(CALLERROR, "m9", "InternalError")]
        assert all(frame.id != "x1-m9" for frame, _ in r.station.sent)


# --- CALLRESULTERROR (OCPP 2.1, type 5) ----------------------------------------------------


async def test_a_callresulterror_must_refer_to_the_last_callresult(
    autojump_clock: Clock,
) -> None:
    """A type-5 frame is the caller's complaint about the CALLRESULT it just got: it is
    forwarded once for that CALLRESULT, and one about anything else is dropped."""
    async with rig(Version.V21) as r:
        r.station.push('[5,"nobody","GenericError","",{}]')  # no CALLRESULT yet
        r.station.push('[2,"c1","Heartbeat",{}]')
        await settle()
        assert [f[1] for f in r.backend.take()] == ["c1"]
        assert r.stats.dropped == 1
        r.backend.push('[3,"c1",{"currentTime":"2026-01-01T00:00:00Z"}]')
        await settle()
        r.station.push('[5,"c1","FormatViolation","bad time",{}]',
                       '[5,"c1","FormatViolation","again",{}]')
        await settle()
        assert r.backend.take() == [[5, "c1", "FormatViolation", "bad time", {}]]
        assert r.stats.dropped == 2


async def test_a_callresulterror_passes_the_firewall(autojump_clock: Clock,
                                                     tmp_path: Path) -> None:
    """Under a policy, a type-5 frame is decided like an error answer to its CALL's
    action: a rule on error messages refuses it (before, it skipped the firewall)."""
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "reject"\n\n[[rules]]\nname = "station calls"\n'
                      'direction = "from-station"\nactions = ["*"]\nthen = "forward"\n\n'
                      '[[rules]]\nname = "no complaints"\nmessages = ["error"]\n'
                      'direction = "from-station"\nactions = ["Heartbeat"]\nthen = "drop"\n')
    async with rig(Version.V21) as r:
        r.session.deps.gate = Gate(Firewall(load_policy(policy)), None, None)
        r.station.push('[2,"c1","Heartbeat",{}]')
        await settle()
        r.backend.take()
        r.backend.push('[3,"c1",{"currentTime":"2026-01-01T00:00:00Z"}]')
        await settle()
        r.station.push('[5,"c1","FormatViolation","bad time",{}]', '[2,"c2","Heartbeat",{}]')
        await settle()
        assert [f[1] for f in r.backend.take()] == ["c2"]
        assert r.session.deps.gate.decisions[("no complaints", "drop")] == 1
