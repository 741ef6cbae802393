"""Overlay forwarding and attach as plain objects (no sockets): a congested next hop,
attach answers per link, the HTTP status a peer may give, claims a peer may not make."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
import trio
import trio.testing

from router.config import NodeSection
from router.overlay.attach import AttachContext, Attacher, _Answer, _http_status, _Pending
from router.overlay.forwarding import Forwarder
from router.overlay.peer_link import PeerLink
from router.overlay.state import OverlayState
from router.overlay.virtual import VirtualLink
from router.relay.registry import SessionRegistry
from router.wire.frames import CALL, CALLERROR
from router.wire.overlay_frames import OverlayFrame
from topology import RouteTable


class FakeLink:
    """A peer link's sending side: a queue of ``room`` frames that nobody drains."""

    def __init__(self, peer_id: str, room: int) -> None:
        self.peer_id = peer_id
        self.room = room
        self.queued: list[OverlayFrame] = []
        self.bound: set[Any] = set()
        self.waited = False

    def send_nowait(self, frame: OverlayFrame) -> bool:
        if len(self.queued) >= self.room:
            return False
        self.queued.append(frame)
        return True

    async def send(self, frame: OverlayFrame) -> None:
        self.waited = True
        await trio.sleep_forever()  # a peer that never reads


def _state() -> OverlayState:
    table = RouteTable("me", rng=random.Random(1))
    return OverlayState("me", table)


class NoAttach:
    def answered(self, frame: OverlayFrame) -> bool:
        return False

    def serve(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        raise AssertionError("no attach expected")


async def test_a_congested_next_hop_is_counted_and_the_call_answered_not_awaited() -> None:
    state = _state()
    slow, back = FakeLink("slow", room=0), FakeLink("back", room=10)
    state.links.update({"slow": cast(PeerLink, slow), "back": cast(PeerLink, back)})
    state.table.learn("slow", "far", ("far", "slow"), 0, 1, "far", 1, float("inf"))
    state.table.learn("back", "origin", ("origin", "back"), 0, 1, "origin", 1, float("inf"))
    forwarder = Forwarder(state, lambda station: None, NoAttach())
    call = OverlayFrame(CALL, "far", ("origin", "back"), "m1", "Reset", {})
    with trio.fail_after(1):  # it must not wait for the slow link
        await forwarder.forward(call)
    assert not slow.waited
    assert state.counters["congested"] == 1
    [answer] = back.queued
    assert (answer.type, answer.dest, answer.id, answer.code) == (
        CALLERROR, "origin", "m1", "InternalError")


def _attacher(state: OverlayState) -> Attacher:
    context = AttachContext(settings=cast(Any, None), subprotocols=lambda: ("ocpp1.6",),
                            backend_for=lambda station: None, dial_backend=cast(Any, None),
                            sessions=SessionRegistry(), session_deps=cast(Any, None))
    return Attacher(state, context)


async def test_a_link_going_down_fails_only_the_attaches_sent_over_it() -> None:
    state = _state()
    attacher = _attacher(state)
    one, two = cast(PeerLink, FakeLink("one", 10)), cast(PeerLink, FakeLink("two", 10))
    send_one, recv_one = trio.open_memory_channel[_Answer](1)
    send_two, recv_two = trio.open_memory_channel[_Answer](1)
    attacher._pending["a"] = _Pending(send_one, one, "CS-1", ["x"])
    attacher._pending["b"] = _Pending(send_two, two, "CS-2", ["x"])
    attacher.link_gone(one)
    with pytest.raises(trio.EndOfChannel):  # the attach over the lost link fails now
        await recv_one.receive()
    assert attacher.answered(OverlayFrame(3, "me", (), "b", payload={"subprotocol": "x"}))
    answer, virtual = await recv_two.receive()
    assert answer.id == "b" and virtual is not None and state.edge["CS-2"] is virtual


def test_only_an_http_error_status_from_a_peer_is_used() -> None:
    assert _http_status({"status": 409}) == 409
    for bad in ({"status": "409"}, {"status": 200}, {"status": 700}, {"status": True},
                {"status": 10**30}, {}, None, [1]):
        assert _http_status(bad) == 502


def test_an_attach_claim_for_a_station_elsewhere_is_refused() -> None:
    state = _state()
    attacher = _attacher(state)
    link = cast(PeerLink, FakeLink("edge-1", 10))
    other = cast(PeerLink, FakeLink("edge-2", 10))
    assert attacher._refusal("CS-1", "edge-1", link) is None  # nobody holds it
    state.held["CS-1"] = VirtualLink(other, "CS-1", "CS-1", (), "ocpp1.6", origin="edge-2")
    assert attacher._refusal("CS-1", "edge-1", link) is not None  # held via edge-2
    assert attacher._refusal("CS-1", "edge-2", other) is None  # its own node reattaches
    state.table.learn("edge-2", "CS-3", ("edge-2",), 0, 1, "edge-2", 1, float("inf"))
    assert attacher._refusal("CS-3", "edge-1", link) is not None  # routed to edge-2


class Upgrade:
    """A station's upgrade at the edge: accepting it writes the 101, which takes a moment
    (or fails, when the station has gone)."""

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails

    def header(self, name: str) -> str | None:
        return None

    async def accept(self, chosen: str, keepalive: object = None) -> str:
        await trio.sleep(0.01)
        if self.fails:
            raise trio.BrokenResourceError("the station went away")
        return "station-ws"


class Uplink(FakeLink):
    """An edge's peer link to the core that takes every frame."""

    async def send(self, frame: OverlayFrame) -> None:
        self.queued.append(frame)
        await trio.lowlevel.checkpoint()


def _edge() -> tuple[OverlayState, FakeLink, Attacher, Forwarder]:
    state = OverlayState("edge", RouteTable("edge", rng=random.Random(1)))
    core = Uplink("core", 10)
    state.links["core"] = cast(PeerLink, core)
    for name in ("CSMS", "core"):
        state.table.learn("core", name, ("core",), 0, 1, "core", 1, float("inf"))
    context = AttachContext(settings=lambda: NodeSection(id="edge"),
                            subprotocols=lambda: ("ocpp1.6",), backend_for=lambda station: None,
                            dial_backend=cast(Any, None), sessions=SessionRegistry(),
                            session_deps=cast(Any, None))
    attacher = Attacher(state, context)
    return state, core, attacher, Forwarder(state, lambda station: None, attacher)


async def test_a_backend_call_sent_while_the_edge_accepts_the_station_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The core starts the session when it answers the attach, and the CSMS may send a
    CALL at once: read by the edge while it is still accepting the station, the CALL must
    wait for the station's session, not be answered 'no route' to the core (which drops
    such an answer, leaving the CSMS's CALL in flight until its timeout)."""
    _state, core, attacher, forwarder = _edge()
    attached: list[tuple[object, VirtualLink]] = []
    async with trio.open_nursery() as nursery:

        async def attach() -> None:
            attached.append(await attacher.attach(cast(Any, Upgrade()), "CS-1", ["ocpp1.6"]))

        nursery.start_soon(attach)
        await trio.testing.wait_all_tasks_blocked()
        [connect] = core.queued
        link = cast(PeerLink, core)
        # the answer and the CSMS's first CALL in one read: routed in one pass
        await forwarder.route(link, OverlayFrame(3, "edge", ("core",), connect.id,
                                                 payload={"subprotocol": "ocpp1.6"}))
        await forwarder.route(link, OverlayFrame(CALL, "CS-1", ("core",), "csms-1",
                                                 "GetConfiguration", {}))
    [(_station_ws, virtual)] = attached
    assert core.queued == [connect]  # nothing went back to the core
    assert (await virtual.get_message()).id == "csms-1"


async def test_a_station_gone_during_its_upgrade_ends_the_session_at_the_core(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state, core, attacher, forwarder = _edge()
    async with trio.open_nursery() as nursery:

        async def attach() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await attacher.attach(cast(Any, Upgrade(fails=True)), "CS-1", ["ocpp1.6"])

        nursery.start_soon(attach)
        await trio.testing.wait_all_tasks_blocked()
        [connect] = core.queued
        await forwarder.route(cast(PeerLink, core), OverlayFrame(
            3, "edge", ("core",), connect.id, payload={"subprotocol": "ocpp1.6"}))
    assert "CS-1" not in state.edge and not core.bound
    assert [(f.dest, f.action) for f in core.queued[1:]] == [("CSMS", "OverlayStationDisconnect")]
