"""FailoverLink without sockets: real WsLinks over trio memory streams, virtual time.

Each backend target is a pair of WsLinks joined by ``trio.testing.memory_stream_pair``
after an opening handshake done in memory between websockets' sans-IO ClientProtocol
(the node's side, wrapped by the FailoverLink) and ServerProtocol (the fake CSMS the
test drives). ``redial`` is a scripted fake; the grace period and the retry delays run
on trio's MockClock.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from router.config import BackendEntry, NodeSection
from router.net.handshake import DialFailed
from router.net.wslink import LinkClosed, WsLink
from router.relay.failover import BUFFER, RETRY_S, FailoverLink
from router.relay.forwarding import SessionDeps
from router.relay.gate import Gate
from router.relay.session import StationSession
from router.relay.timer import CallTimer
from router.stats import Stats
from router.wire.frames import CALL, CALLRESULT, SEND, Frame, Version, encode_frame
from tests.log_events import Events, events_of
from tests.memory_ws import ws_pair
from tests.test_session import FakeLink
from tests.test_session import call as call_text

BACKEND = BackendEntry(name="csms", role="primary", url="", srv="_ocpp._tcp.csms.test")
LOST = "backend link lost; moving to another target"


@pytest.fixture
def events() -> Iterator[Events]:
    with events_of("router.failover") as handler:
        yield handler


FAIL = None  # a scripted dial that fails with DialFailed(502)
Step = tuple[WsLink, int] | None


class ScriptedRedial:
    """The ``redial`` callable: fails or hands out links as scripted, then always fails.

    With ``hold``, a successful dial waits for that event before returning (``holding``
    is set meanwhile), so a test can look at the link while it is moving.
    """

    def __init__(self, *steps: Step, hold: trio.Event | None = None,
                 delay_s: float = 0.0) -> None:
        self.steps = list(steps)
        self.delay_s = delay_s  # how long each dial takes
        self.calls: list[tuple[int | None, float]] = []
        self.hold = hold
        self.holding = trio.Event()

    async def __call__(self, better_than: int | None) -> tuple[WsLink, int]:
        self.calls.append((better_than, trio.current_time()))
        await trio.sleep(self.delay_s)
        step = self.steps.pop(0) if self.steps else FAIL
        if step is None:
            raise DialFailed(502, "no SRV target answers")
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        return step


class Session:
    """The session's side: ``on_lost`` records what the link looked like when called."""

    def __init__(self, link: FailoverLink) -> None:
        self.link = link
        self.lost: list[tuple[str, int | None, str]] = []
        link.on_lost = self.on_lost

    async def on_lost(self, reason: str) -> None:
        self.lost.append((reason, self.link.closed, self.link.info().state))


def failover_link(ws: WsLink, priority: int, redial: ScriptedRedial,
                  grace_s: float = 5.0) -> FailoverLink:
    return FailoverLink("CS-1", BACKEND, ws, priority, redial, lambda: grace_s)


async def drop(backend: WsLink) -> None:
    """The backend target goes away without a close handshake."""
    await trio.aclose_forcefully(backend.stream)


async def read_all(link: FailoverLink, out: trio.MemorySendChannel[object]) -> None:
    """The session's reader: every message, then the LinkClosed that ends it."""
    async with out:
        while True:
            try:
                message = await link.get_message()
            except LinkClosed as exc:
                await out.send(exc)
                return
            await out.send(message)


def start_failback(nursery: trio.Nursery, link: FailoverLink,
                   idle: Callable[[], bool] = lambda: True) -> list[bool]:
    """Runs ``link.move_to_better(idle)`` in ``nursery``; the list gets what it returns."""
    moved: list[bool] = []

    async def fail_back() -> None:
        moved.append(await link.move_to_better(idle))

    nursery.start_soon(fail_back)
    return moved


def heartbeat(number: int) -> Frame:
    return Frame(CALL, f"hb-{number}", action="Heartbeat", payload={})


def periodic(number: int) -> Frame:
    """An OCPP 2.1 SEND: no answer expected."""
    return Frame(SEND, f"ev-{number}", action="NotifyPeriodicEventStream",
                 payload={"id": 1, "pending": 0, "basetime": "2026-01-01T00:00:00Z",
                          "data": []})


# --- the link in use ----------------------------------------------------------------------


async def test_messages_flow_through_the_current_link(autojump_clock: trio.testing.MockClock,
                                                      ) -> None:
    node, backend = ws_pair()
    redial = ScriptedRedial()
    link = failover_link(node, 10, redial)
    assert link.subprotocol == "ocpp2.0.1"
    assert link.closed is None and not link.moving

    await backend.send_message('[2,"c-1","Reset",{"type":"Immediate"}]')
    assert await link.get_message() == '[2,"c-1","Reset",{"type":"Immediate"}]'

    answer = Frame(CALLRESULT, "c-1", payload={"status": "Accepted"})
    await link.send_frame(answer, None)  # no text: the frame is encoded
    assert await backend.get_message() == encode_frame(answer)
    await link.send_frame(answer, '[3, "c-1", {"status": "Accepted"}]')  # text as given
    assert await backend.get_message() == '[3, "c-1", {"status": "Accepted"}]'

    info = link.info()
    assert (info.state, info.srv_backend, info.priority, info.remote) == (
        "open", "csms", 10, None)
    assert redial.calls == []


async def test_close_stream_drops_the_connection_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node, backend = ws_pair()
    link = failover_link(node, 1, ScriptedRedial())
    await link.close_stream()
    with pytest.raises(LinkClosed) as info:
        await backend.get_message()
    assert info.value.code == 1006  # no close handshake: the stream just ended


# --- failing over -------------------------------------------------------------------------


async def test_a_lost_target_is_replaced_and_buffered_frames_follow_in_order(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    old_node, old_backend = ws_pair()
    new_node, new_backend = ws_pair()
    release = trio.Event()
    redial = ScriptedRedial(FAIL, FAIL, (new_node, 20), hold=release)
    link = failover_link(old_node, 10, redial)
    session = Session(link)
    out, messages = trio.open_memory_channel[object](64)
    frames = [heartbeat(1), Frame(CALLRESULT, "c-9", payload={"status": "Accepted"}),
              heartbeat(2)]
    texts = [None, '[3,"c-9",{"status":"Accepted"}]', None]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, link, out)
        await old_backend.send_message("before")
        assert await messages.receive() == "before"

        lost_at = trio.current_time()
        await drop(old_backend)
        await redial.holding.wait()  # the third dial succeeded; the link is not up yet

        assert session.lost == [(LOST, None, "failing_over")]
        assert link.moving
        assert link.closed is None  # the session must not see the loss
        info = link.info()
        assert (info.state, info.srv_backend, info.priority) == ("failing_over", "csms", 10)
        for frame, text in zip(frames, texts, strict=True):
            await link.send_frame(frame, text)  # held: nothing is lost, nothing raised
        with trio.move_on_after(1.0) as waiting:
            await new_backend.get_message()
        assert waiting.cancelled_caught  # nothing reaches the new target before it is up

        release.set()
        for frame, text in zip(frames, texts, strict=True):
            assert await new_backend.get_message() == (text or encode_frame(frame))

        await new_backend.send_message("after")
        assert await messages.receive() == "after"  # the reader carries on, on the new link
        info = link.info()
        assert (info.state, info.srv_backend, info.priority) == ("open", "csms", 20)
        assert link.closed is None and not link.moving
        assert link.current is new_node
        assert old_node.closed is not None

        # frames now go straight to the new target
        await link.send_frame(heartbeat(3), None)
        assert await new_backend.get_message() == encode_frame(heartbeat(3))
        nursery.cancel_scope.cancel()

    assert len(session.lost) == 1
    assert [better for better, _ in redial.calls] == [None, None, None]
    offsets = [at - lost_at for _, at in redial.calls]
    assert offsets[0] < RETRY_S
    assert all(later - earlier >= RETRY_S for earlier, later in itertools.pairwise(offsets))
    assert events.named("backend_failover") == [
        {"station": "CS-1", "backend": "csms", "priority": 20}]
    assert events.named("backend_failover_failed") == []


async def test_frames_sent_on_the_dead_link_go_to_the_next_target_unless_settled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Frames whose send failed on the lost link are held for the next target, except
    what the session settles when it hears of the loss: its CALL in flight, which it
    answers with an error (the lost target may have run it, so a copy must not run
    again), and answers to the lost target's CALLs. A SEND, which nobody answers, goes."""
    old_node, old_backend = ws_pair("ocpp2.1")
    new_node, new_backend = ws_pair("ocpp2.1")
    link = failover_link(old_node, 1, ScriptedRedial((new_node, 2)))
    session = Session(link)
    await drop(old_backend)
    # the loss is not noticed yet: no error for any of them
    await link.send_frame(heartbeat(1), None)
    await link.send_frame(Frame(CALLRESULT, "c-9", payload={}), None)
    await link.send_frame(periodic(1), None)
    await new_backend.send_message("hello from the new target")
    with trio.fail_after(5):
        assert await link.get_message() == "hello from the new target"
        assert await new_backend.get_message() == encode_frame(periodic(1))
    with trio.move_on_after(1) as waiting:
        await new_backend.get_message()
    assert waiting.cancelled_caught  # neither the CALL nor the answer followed
    assert [reason for reason, _, _ in session.lost] == [LOST]


async def test_redial_is_retried_until_the_grace_period_ends(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    node, backend = ws_pair()
    redial = ScriptedRedial()  # every dial fails
    grace = [30.0]
    link = FailoverLink("CS-1", BACKEND, node, 10, redial, lambda: grace[0])
    session = Session(link)
    grace[0] = 1.1  # read when the loss happens (a reload may have changed it)

    await drop(backend)
    start = trio.current_time()
    with pytest.raises(LinkClosed) as info:
        await link.get_message()
    elapsed = trio.current_time() - start

    assert info.value.code == 1006  # the old link's own ending
    assert 1.1 <= elapsed < 1.1 + RETRY_S
    assert session.lost == [(LOST, None, "failing_over")]
    # dials at 0, 0.2, ... 1.0 s, then the grace period ends during the pause
    assert len(redial.calls) == 6
    assert all(better is None for better, _ in redial.calls)
    assert not link.moving
    assert link.closed == 1006  # now the session sees the link closed
    assert link.info().state == "closing"
    assert events.named("backend_failover_failed") == [
        {"station": "CS-1", "backend": "csms", "grace_s": 1.1}]
    assert events.named("backend_failover") == []


async def test_a_zero_grace_period_gives_up_at_once(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    node, backend = ws_pair()
    spare, _ = ws_pair()
    redial = ScriptedRedial((spare, 2))
    link = failover_link(node, 1, redial, grace_s=0.0)
    await drop(backend)
    start = trio.current_time()
    with pytest.raises(LinkClosed):
        await link.get_message()
    assert trio.current_time() == start
    assert link.current is node
    assert len(events.named("backend_failover_failed")) == 1


async def test_a_target_with_another_subprotocol_is_refused_and_the_next_tried(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    old_node, old_backend = ws_pair("ocpp2.0.1")
    wrong_node, wrong_backend = ws_pair("ocpp1.6")
    right_node, right_backend = ws_pair("ocpp2.0.1")
    redial = ScriptedRedial((wrong_node, 20), (right_node, 30))
    link = failover_link(old_node, 10, redial)
    session = Session(link)
    async with trio.open_nursery() as nursery:

        async def wrong_target() -> None:
            with pytest.raises(LinkClosed):
                await wrong_backend.get_message()  # answers the node's close

        nursery.start_soon(wrong_target)
        await drop(old_backend)
        await right_backend.send_message("from the right target")
        assert await link.get_message() == "from the right target"

    assert wrong_node.closed == 1002
    assert wrong_backend.closed == 1002
    assert wrong_backend.protocol.close_rcvd is not None
    assert wrong_backend.protocol.close_rcvd.reason == "the station's subprotocol is fixed"
    assert link.current is right_node
    assert link.subprotocol == "ocpp2.0.1"
    assert link.info().priority == 30
    assert len(redial.calls) == 2
    assert redial.calls[1][1] - redial.calls[0][1] >= RETRY_S
    assert len(session.lost) == 1
    assert [e["priority"] for e in events.named("backend_failover")] == [30]


async def test_too_many_frames_while_moving_close_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old_node, old_backend = ws_pair()
    new_node, new_backend = ws_pair()
    release = trio.Event()
    redial = ScriptedRedial((new_node, 2), hold=release)
    link = failover_link(old_node, 1, redial)
    out, _messages = trio.open_memory_channel[object](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, link, out)
        await drop(old_backend)
        await redial.holding.wait()
        for number in range(BUFFER):
            await link.send_frame(heartbeat(number), None)
        with pytest.raises(LinkClosed) as info:
            await link.send_frame(heartbeat(BUFFER), None)
        assert info.value.code == 1001
        release.set()
        # the frames held before the overflow still go, in order
        for number in range(BUFFER):
            assert await new_backend.get_message() == encode_frame(heartbeat(number))
        nursery.cancel_scope.cancel()


async def test_running_out_of_grace_while_switching_leaves_a_consistent_link(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    # The new target accepts 0.5 s into a 1 s grace period but reads nothing until 2 s, so
    # handing it the buffered frame outlasts the grace period. Either the move completes
    # (the frame arrives, the reader carries on) or it is given up; when given up, the
    # link must say it is closed, as the Link protocol's ``closed`` promises.
    old_node, old_backend = ws_pair()
    new_node, new_backend = ws_pair(lockstep=True)
    redial = ScriptedRedial((new_node, 2), delay_s=0.5)
    link = failover_link(old_node, 1, redial, grace_s=1.0)
    await drop(old_backend)
    await link.send_frame(periodic(1), None)  # held for the next target (a SEND)
    received: list[str | bytes] = []
    outcome: object = None
    async with trio.open_nursery() as nursery:

        async def busy_backend() -> None:
            await trio.sleep(2.0)
            with trio.move_on_after(5.0):
                received.append(await new_backend.get_message())
                await new_backend.send_message("hello")

        nursery.start_soon(busy_backend)
        try:
            outcome = await link.get_message()
        except LinkClosed as exc:
            outcome = exc
    if isinstance(outcome, LinkClosed):  # given up
        assert (link.closed, link.info().state) != (None, "open"), (
            "get_message raised LinkClosed but the link still reports itself open "
            f"(current is the new target: {link.current is new_node})")
        assert events.named("backend_failover") == []
    else:
        assert outcome == "hello"
        assert received == [encode_frame(periodic(1))]
        assert events.named("backend_failover_failed") == []


# --- closing on purpose -------------------------------------------------------------------


async def test_aclose_stops_the_link_from_failing_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node, backend = ws_pair()
    spare, _ = ws_pair()
    redial = ScriptedRedial((spare, 2))
    link = failover_link(node, 1, redial)
    session = Session(link)
    async with trio.open_nursery() as nursery:

        async def backend_reads() -> None:
            with pytest.raises(LinkClosed):
                await backend.get_message()  # answers the close

        nursery.start_soon(backend_reads)
        await link.aclose(1000, "station went away")

    assert backend.closed == 1000
    with pytest.raises(LinkClosed) as info:
        await link.get_message()
    assert info.value.code == 1000
    with pytest.raises(LinkClosed):
        await link.send_frame(heartbeat(1), None)  # not buffered for a next target
    assert not await link.move_to_better()
    assert redial.calls == []
    assert session.lost == []
    assert link.closed == 1000
    assert link.current is node


# --- failback -----------------------------------------------------------------------------


async def test_move_to_better_switches_to_a_better_target(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    old_node, old_backend = ws_pair()
    better_node, better_backend = ws_pair()
    redial = ScriptedRedial((better_node, 1))
    link = failover_link(old_node, 5, redial)
    session = Session(link)
    out, messages = trio.open_memory_channel[object](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, link, out)
        await trio.testing.wait_all_tasks_blocked()  # the reader waits on the old link
        assert await link.move_to_better()
        assert redial.calls[0][0] == 5  # better than the priority in use
        assert link.current is better_node
        info = link.info()
        assert (info.state, info.priority, info.srv_backend) == ("open", 1, "csms")

        # the reader moved along with the link: no failover, no loss reported
        await better_backend.send_message("from the better target")
        assert await messages.receive() == "from the better target"
        await link.send_frame(heartbeat(1), None)
        assert await better_backend.get_message() == encode_frame(heartbeat(1))
        nursery.cancel_scope.cancel()

    assert len(redial.calls) == 1
    assert session.lost == []
    assert old_node.closed == 1000
    with pytest.raises(LinkClosed):
        await old_backend.get_message()
    assert old_backend.closed == 1000
    assert old_backend.protocol.close_rcvd is not None
    assert old_backend.protocol.close_rcvd.reason == "moving to another backend target"
    assert events.named("backend_failback") == [
        {"station": "CS-1", "backend": "csms", "priority": 1}]


async def test_frames_sent_while_a_failback_dials_go_out_on_the_link_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A dial may take its whole open timeout: the station's frames are not held for it.
    Frames go to the better target once the link has moved."""
    old_node, old_backend = ws_pair()
    better_node, better_backend = ws_pair()
    release = trio.Event()
    redial = ScriptedRedial((better_node, 1), hold=release)
    link = failover_link(old_node, 5, redial)
    async with trio.open_nursery() as nursery:
        moved = start_failback(nursery, link)
        await redial.holding.wait()
        assert not link.moving and link.closed is None
        assert link.info().state == "open"
        await link.send_frame(heartbeat(1), None)
        await link.send_frame(heartbeat(2), "[2,\"hb-2\",\"Heartbeat\",{}]")
        assert await old_backend.get_message() == encode_frame(heartbeat(1))
        assert await old_backend.get_message() == '[2,"hb-2","Heartbeat",{}]'
        release.set()
    assert moved == [True]
    await link.send_frame(heartbeat(3), None)
    assert await better_backend.get_message() == encode_frame(heartbeat(3))


async def test_a_frame_sent_while_a_failback_dial_fails_is_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The better target does not answer, slowly: a CALL the station sent meanwhile still
    reaches the target in use (seen in CI: a CALL held for the failback and left behind
    when the dial failed, unanswered until the station's own timeout)."""
    node, backend = ws_pair()
    redial = ScriptedRedial(FAIL, delay_s=3.0)
    link = failover_link(node, 5, redial)
    async with trio.open_nursery() as nursery:
        moved = start_failback(nursery, link)
        await trio.testing.wait_all_tasks_blocked()
        assert redial.calls  # dialling the better target
        await link.send_frame(heartbeat(1), None)
    assert moved == [False]
    with trio.fail_after(1):
        assert await backend.get_message() == encode_frame(heartbeat(1))
    assert link.current is node and not link.moving


async def test_a_call_answered_soon_after_the_failback_dial_lets_the_link_move(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A CALL went out on the old link during the dial and is answered half a second
    later: the failback waits for that instead of dropping a link that is up (a busy
    link given up would only be tried again a round later)."""
    old_node, _old_backend = ws_pair()
    better_node, _better_backend = ws_pair()
    release = trio.Event()
    redial = ScriptedRedial((better_node, 1), hold=release)
    link = failover_link(old_node, 5, redial)
    in_flight = [False]
    async with trio.open_nursery() as nursery:
        moved = start_failback(nursery, link, lambda: not in_flight[0])
        await redial.holding.wait()
        in_flight[0] = True
        release.set()
        await trio.sleep(0.5)
        in_flight[0] = False  # answered
    assert moved == [True] and link.current is better_node


async def test_a_call_sent_during_the_failback_dial_keeps_the_link_in_use(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    """A CALL went out on the old link while the better target was dialled: moving now
    would lose its answer, so the new link is closed and the old one kept."""
    old_node, old_backend = ws_pair()
    better_node, better_backend = ws_pair()
    release = trio.Event()
    redial = ScriptedRedial((better_node, 1), hold=release)
    link = failover_link(old_node, 5, redial)
    in_flight = [False]
    async with trio.open_nursery() as nursery:
        async def better_target_answers_the_close() -> None:
            with contextlib.suppress(LinkClosed):
                await better_backend.get_message()

        moved = start_failback(nursery, link, lambda: not in_flight[0])
        nursery.start_soon(better_target_answers_the_close)
        await redial.holding.wait()
        await link.send_frame(heartbeat(1), None)
        in_flight[0] = True
        release.set()
    assert moved == [False]
    assert link.current is old_node and link.priority == 5 and not link.moving
    assert await old_backend.get_message() == encode_frame(heartbeat(1))
    assert better_node.closed == 1000
    assert events.named("backend_failback") == []


async def test_move_to_better_does_not_move_a_link_with_a_call_in_flight(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    """The failback task checked the session idle, then let other tasks run (DNS, the
    move lock); a CALL that went out on the old link meanwhile keeps its link, or its
    answer would be lost with the old link (seen in CI: a CALL unanswered for 10 s)."""
    node, _backend = ws_pair()
    better_node, _better_backend = ws_pair()
    redial = ScriptedRedial((better_node, 1))
    link = failover_link(node, 5, redial)
    assert not await link.move_to_better(lambda: False)
    assert redial.calls == []  # nothing dialled
    assert link.current is node and link.priority == 5 and not link.moving
    await link.send_frame(heartbeat(1), None)  # and it still carries frames
    assert await link.move_to_better(lambda: True)  # once idle, the failback goes ahead
    assert link.current is better_node


async def test_move_to_better_keeps_the_link_when_no_better_target_answers(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    node, backend = ws_pair()
    redial = ScriptedRedial(FAIL)
    link = failover_link(node, 5, redial)
    assert not await link.move_to_better()
    assert [better for better, _ in redial.calls] == [5]
    assert link.current is node and link.priority == 5
    assert not link.moving and link.closed is None
    await link.send_frame(heartbeat(1), None)
    assert await backend.get_message() == encode_frame(heartbeat(1))
    assert events.named("backend_failback") == []


async def test_move_to_better_refuses_a_target_with_another_subprotocol(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node, backend = ws_pair("ocpp2.0.1")
    other_node, other_backend = ws_pair("ocpp2.1")
    link = failover_link(node, 5, ScriptedRedial((other_node, 1)))
    async with trio.open_nursery() as nursery:

        async def other_target() -> None:
            with pytest.raises(LinkClosed):
                await other_backend.get_message()

        nursery.start_soon(other_target)
        assert not await link.move_to_better()
    assert other_node.closed == 1002
    assert link.current is node and link.priority == 5
    assert link.closed is None and not link.moving
    await backend.send_message("still here")
    assert await link.get_message() == "still here"


async def test_move_to_better_does_nothing_while_failing_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old_node, old_backend = ws_pair()
    new_node, new_backend = ws_pair()
    release = trio.Event()
    redial = ScriptedRedial((new_node, 7), hold=release)
    link = failover_link(old_node, 3, redial)
    out, messages = trio.open_memory_channel[object](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, link, out)
        await drop(old_backend)
        await redial.holding.wait()
        assert not await link.move_to_better()
        assert len(redial.calls) == 1  # only the failover dialled
        release.set()
        await new_backend.send_message("up")
        assert await messages.receive() == "up"
        nursery.cancel_scope.cancel()
    assert link.current is new_node and link.priority == 7


async def test_a_target_lost_during_a_failback_dial_fails_over_at_once(
    autojump_clock: trio.testing.MockClock, events: Events,
) -> None:
    """The link in use dies while a failback dials a slow better target: the failover
    does not wait for that dial (it may take its whole open timeout, with the station's
    CALL unanswered meanwhile). It moves the link at once; the failback's link, when it
    comes, is dropped."""
    old_node, old_backend = ws_pair()
    better_node, better_backend = ws_pair()
    failover_node, failover_backend = ws_pair()
    release = trio.Event()
    calls: list[int | None] = []

    async def redial(better_than: int | None) -> tuple[WsLink, int]:
        calls.append(better_than)
        if better_than is not None:  # the failback's dial: slow
            await release.wait()
            return better_node, 1
        return failover_node, 2

    link = FailoverLink("CS-1", BACKEND, old_node, 5, redial, lambda: 5.0)
    session = Session(link)
    out, messages = trio.open_memory_channel[object](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, link, out)
        moved = start_failback(nursery, link)
        await trio.testing.wait_all_tasks_blocked()
        await drop(old_backend)  # the target in use goes away during the dial
        await failover_backend.send_message("from the failover target")
        with trio.fail_after(3):  # well before the dial ends (never, here)
            assert await messages.receive() == "from the failover target"
        assert link.current is failover_node and link.priority == 2
        assert [reason for reason, _, _ in session.lost] == [LOST]

        async def better_target_answers_the_close() -> None:
            with contextlib.suppress(LinkClosed):
                await better_backend.get_message()

        nursery.start_soon(better_target_answers_the_close)
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert moved == [False]
    assert better_node.closed == 1000  # dialled, then dropped
    assert link.current is failover_node and link.priority == 2
    assert calls == [5, None]
    assert len(events.named("backend_failover")) == 1
    assert events.named("backend_failback") == []


async def test_a_failback_dialling_while_the_session_ends_drops_the_new_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old_node, old_backend = ws_pair()
    new_node, _new_backend = ws_pair()
    hold = trio.Event()
    redial = ScriptedRedial((new_node, 1), hold=hold)
    link = failover_link(old_node, 5, redial)

    async def old_target_answers_the_close() -> None:
        with contextlib.suppress(LinkClosed):
            await old_backend.get_message()

    async with trio.open_nursery() as nursery:
        moved = start_failback(nursery, link)
        await redial.holding.wait()  # the better target is being dialled...
        nursery.start_soon(old_target_answers_the_close)
        await link.aclose(1001, "station link closed", wait_s=0.5)  # ...as the session ends
        await link.close_stream()
        hold.set()
    assert moved == [False] and link.current is old_node
    with pytest.raises(trio.ClosedResourceError):
        await new_node.stream.send_all(b"x")  # the dialled link was dropped, not kept


async def test_no_failback_once_the_stream_is_closed() -> None:
    old_node, _ = ws_pair()
    new_node, _ = ws_pair()
    redial = ScriptedRedial((new_node, 1))
    link = failover_link(old_node, 5, redial)
    await link.close_stream()  # the session ended without closing its links first
    assert not await link.move_to_better(lambda: True)
    assert redial.calls == []


# --- frames around a move (red-team findings, 2026-11-28) ------------------------------------


async def test_a_new_target_lost_during_the_failback_flush_raises_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The old target is slow to take the close, a frame is held meanwhile, and the new
    target goes away before the held frame is sent: the failback must not raise (it runs
    in the node's own nursery, where an exception ends the node). The frame stays held
    for the reader's failover."""
    old_node, _old_backend = ws_pair(lockstep=True)  # alive, not reading: the close waits
    better_node, better_backend = ws_pair()
    link = failover_link(old_node, 5, ScriptedRedial((better_node, 1)))
    async with trio.open_nursery() as nursery:
        moved = start_failback(nursery, link)
        await trio.testing.wait_all_tasks_blocked()
        assert link.moving  # switching: waiting for the old target to take the close
        await link.send_frame(heartbeat(1), None)  # held
        await drop(better_backend)
    assert moved == [True]
    assert link.current is better_node
    assert [frame for frame, _ in link._buffer] == [heartbeat(1)]


async def test_a_call_held_at_a_failover_is_answered_once_and_not_run_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The station's CALL was sent as the target died: the session answers it with an
    error when it hears of the loss (the target may have run it), so the copy held for
    the next target must not go there too (a TransactionEvent would be run twice)."""
    old_node, old_backend = ws_pair()
    new_node, new_backend = ws_pair()
    link = failover_link(old_node, 1, ScriptedRedial((new_node, 2), delay_s=0.5))
    station = FakeLink("ocpp2.0.1")
    timer = CallTimer(30)
    deps = SessionDeps(settings=NodeSection(id="n1", call_timeout_s=30),
                       gate=Gate(None, None, None), stats=Stats(), timer=timer)
    session = StationSession(deps, "CS-1", Version.V201, station, link, "csms")
    link.on_lost = session.backend_lost
    at_new: list[str | bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run, nursery)
        nursery.start_soon(session.run)
        await drop(old_backend)
        station.push(call_text("tx-1", "TransactionEvent"))

        async def new_target() -> None:
            while True:
                at_new.append(await new_backend.get_message())

        nursery.start_soon(new_target)
        await trio.sleep(5)
        assert link.current is new_node
        station.push(call_text("hb-2"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    answers = [json.loads(text) for text in station.texts()]
    assert [(a[0], a[1]) for a in answers] == [(4, "tx-1")]  # one answer: the error
    assert [json.loads(text)[1] for text in at_new] == ["hb-2"]  # tx-1 never went there


async def test_a_frame_that_failed_on_the_old_link_after_a_failback_goes_to_the_new(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A frame was blocked on the old target when the failback gave up waiting for it
    to take the close: it fails once the old socket is closed, after the switch, and
    goes to the target in use instead of waiting in the buffer for the next move."""
    old_node, _old_backend = ws_pair(sockets=True)  # alive, not reading
    better_node, better_backend = ws_pair()
    link = failover_link(old_node, 5, ScriptedRedial((better_node, 1)))
    big = Frame(SEND, "ev-big", action="NotifyPeriodicEventStream",
                payload={"id": 1, "pending": 0, "basetime": "2026-01-01T00:00:00Z",
                         "data": ["x" * 900_000]})  # more than the socket buffers take
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.send_frame, big, None)  # blocks on the old target
        await trio.testing.wait_all_tasks_blocked()
        assert await link.move_to_better()
        assert link.current is better_node and not link.moving
    assert link._buffer == []
    with trio.fail_after(1):
        assert await better_backend.get_message() == encode_frame(big)


async def test_frames_that_failed_on_a_lost_link_are_held_up_to_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old_node, old_backend = ws_pair()
    link = failover_link(old_node, 1, ScriptedRedial())
    await drop(old_backend)
    for number in range(BUFFER):
        await link.send_frame(periodic(number), None)  # held: the loss is not noticed yet
    with pytest.raises(LinkClosed) as closed:
        await link.send_frame(periodic(BUFFER), None)
    assert closed.value.code == 1001
