"""An adversarial overlay peer, driven by hypothesis, against a node in this process.

A core node holds a CSMS (a raw backend) and two accept-only peers: an honest one,
whose routes and station are the victims, and Mallory, authenticated like any peer. The
core trusts each peer's key for its own routes ([trust]). Mallory sends random sequences
of valid and malformed frames: route announcements and withdrawals (forged origins and
paths, huge sequence numbers, out-of-range priorities, oversized ids), station attaches,
frames toward the CSMS for stations it does and does not hold, garbage, binary, frames
with duplicate keys or NaN. After every step (and a fence proving the core read it):

* the honest peer's link is the same open link;
* every route the honest peer holds still leads to it, from it;
* the honest station's session is the one it attached, and the CSMS has received, for
  every station Mallory does not hold, only what the honest peer sent;
* Mallory holds no more routes than the destinations it announced for itself, and the
  node answers on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import SigningKey
from router.config import parse
from router.net.handshake import HandshakeFailed, dial
from router.net.wslink import LinkClosed, WsLink
from router.node import Node
from router.overlay.codec import PeerCodec
from router.overlay.mesh import MODE_HEADER, MODE_OVERLAY, PEER_MAX_MESSAGE_BYTES
from router.wire.frames import CALL, CALLERROR, CALLRESULT, SEND, FrameError
from router.wire.overlay_frames import OverlayFrame
from tests.peers.overlay_peer import signed_route
from tests.raw_backend import RawBackend
from topology import ACTION
from topology.messages import build_payload

CORE, HONEST, MALLORY = "adv-core", "adv-h", "adv-m"
HONEST_DESTINATIONS = (HONEST, "H-1", "H-2")
HONEST_STATION = "H-ST"
STEP_S = 10.0


@dataclass
class Peer:
    """One overlay link opened by the test, with what the core sent on it."""

    node_id: str
    ws: WsLink
    codec: PeerCodec = field(default_factory=lambda: PeerCodec("json"))
    received: list[OverlayFrame] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)
    closed: bool = False

    async def read(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                try:
                    self.received.extend(self.codec.decode(message))
                except FrameError:
                    continue
                self.arrived.set()
                self.arrived = trio.Event()
        except LinkClosed:
            self.closed = True
            self.arrived.set()

    async def send(self, frame: OverlayFrame) -> None:
        for message in self.codec.encode([frame]):
            assert isinstance(message, str)
            await self.ws.send_message(message)

    async def answer_to(self, message_id: str) -> OverlayFrame:
        with trio.fail_after(STEP_S):
            while True:
                for frame in self.received:
                    if frame.id == message_id and frame.type in (CALLRESULT, CALLERROR):
                        return frame
                if self.closed:
                    raise LinkClosed(1006, "closed while waiting")
                await self.arrived.wait()


async def open_peer(port: int, node_id: str, nursery: trio.Nursery) -> Peer:
    ws = await dial(f"ws://127.0.0.1:{port}/ocpp/{node_id}", ["ocpp2.1"],
                    {MODE_HEADER: MODE_OVERLAY}, PEER_MAX_MESSAGE_BYTES)
    peer = Peer(node_id, ws)
    nursery.start_soon(peer.read)
    return peer


def announcement(routing_node: str, routes: list[dict[str, Any]],
                 withdrawn: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return build_payload(routing_node, "update", routes, list(withdrawn))


# --- what Mallory may do -----------------------------------------------------------------

DESTINATIONS = st.sampled_from([*HONEST_DESTINATIONS, HONEST_STATION, MALLORY, "M-1", "M-2",
                                "CSMS", "*", CORE, "x" * 5000])
PATHS = st.sampled_from([[MALLORY], [HONEST, MALLORY], [HONEST], [], [CORE, MALLORY],
                         ["y" * 2000, MALLORY]])
NUMBERS = st.sampled_from([0, 1, 2, 7, 10**30, -1, -(10**18), 65535, 70000])


@st.composite
def mallory_steps(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["announce", "withdraw", "attach", "to-csms", "garbage",
                                 "to-honest"]))
    if kind == "announce":
        routes = []
        for _ in range(draw(st.integers(1, 3))):
            routes.append((draw(DESTINATIONS), draw(PATHS), draw(NUMBERS), draw(NUMBERS),
                           draw(st.booleans())))
        return kind, routes
    if kind == "withdraw":
        return kind, draw(st.lists(DESTINATIONS, min_size=1, max_size=3))
    if kind in ("attach", "to-csms"):
        return kind, draw(st.sampled_from([HONEST_STATION, "M-1", "M-2", "H-1", "CSMS"]))
    if kind == "to-honest":
        return kind, draw(st.sampled_from([[MALLORY], [HONEST], [CORE]]))
    return kind, draw(st.sampled_from([
        "not json", "[]", '[2,"CSMS",["M-1"],"a","Heartbeat",{"k":1,"k":2}]',
        '[2,"CSMS",["M-1"],"b","Heartbeat",{"n":NaN}]', "[99]", '{"a":1}',
        '[6,"adv-core",[],"c","NotifyNetworkTopology",{"networkTopologyInformation":7}]',
        b"\x92\x01\x02", msgpack.packb([2, "CSMS", ["M-1"], "d", "Heartbeat",
                                        {"b": b"\x00"}], use_bin_type=True)]))


# --- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    with RawBackend() as server:
        yield server


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SigningKey, SigningKey]:
    directory = tmp_path_factory.mktemp("adv-keys")
    honest, mallory = SigningKey.generate("ed25519"), SigningKey.generate("ed25519")
    (directory / "h.pub.pem").write_bytes(honest.public_pem())
    (directory / "m.pub.pem").write_bytes(mallory.public_pem())
    return directory, honest, mallory


_examples = iter(range(10**6))


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(mallory_steps(), min_size=1, max_size=12))
def test_an_adversarial_peer_cannot_hurt_other_links_routes_or_stations(
    steps: list[tuple[str, Any]], backend: RawBackend,
    keys: tuple[Path, SigningKey, SigningKey], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    example = next(_examples)
    trio.run(_scenario, steps, backend, keys, tmp_path_factory.mktemp(f"adv-{example}"),
             f"E{example}")


async def _scenario(steps: list[tuple[str, Any]], backend: RawBackend,
                    keys: tuple[Path, SigningKey, SigningKey], state: Path, tag: str) -> None:
    key_dir, honest_key, mallory_key = keys
    config = parse(f"""
[node]
id = "{CORE}"
state_dir = "{state}"
shutdown_timeout_s = 0.2
[listen]
port = 0
security_profile = 0
[[stations]]
match = "*"
[[backends]]
name = "csms"
role = "primary"
url = "{backend.url}"
auth = "none"
[[peers]]
id = "{HONEST}"
[[peers]]
id = "{MALLORY}"
[trust]
nodes = {{ "{HONEST}" = "{key_dir / 'h.pub.pem'}", "{MALLORY}" = "{key_dir / 'm.pub.pem'}" }}
""")
    node = Node(config)
    station = f"{HONEST_STATION}-{tag}"  # one CSMS identity per example
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        table = node.overlay.table

        # the honest peer: its routes, its station, one frame of that station at the CSMS
        honest = await open_peer(node.port, HONEST, nursery)
        routes = [signed_route(d, [HONEST], sequence=1, key=honest_key)
                  for d in HONEST_DESTINATIONS]
        await honest.send(OverlayFrame(SEND, CORE, (), f"h-full-{tag}", ACTION,
                                       build_payload(HONEST, "full", routes, part=1, parts=1)))
        with trio.fail_after(STEP_S):
            while any(table.best(d) is None for d in HONEST_DESTINATIONS):
                await trio.sleep(0.01)
        await honest.send(OverlayFrame(CALL, "CSMS", (station,), f"h-att-{tag}",
                                       "OverlayStationConnect", {"subprotocols": ["ocpp1.6"]}))
        assert (await honest.answer_to(f"h-att-{tag}")).type == CALLRESULT
        honest_frames = ['[2,"h-1","StatusNotification",{"connectorId":1}]']
        await honest.send(OverlayFrame(CALL, "CSMS", (station,), "h-1", "StatusNotification",
                                       {"connectorId": 1}))
        await trio.to_thread.run_sync(backend.wait_frames, station, 1)
        honest_link = node.overlay.links[HONEST]
        before = {d: (table.best(d).origin, table.best(d).peer)  # type: ignore[union-attr]
                  for d in HONEST_DESTINATIONS}

        mallory = await open_peer(node.port, MALLORY, nursery)
        announced: set[str] = set()
        held: set[str] = set()
        for number, (kind, arg) in enumerate(steps):
            if mallory.closed:  # it broke its own link: it may dial again
                mallory = await open_peer(node.port, MALLORY, nursery)
            mid = f"m{number}-{tag}"
            target_station = f"{arg}-{tag}" if kind in ("attach", "to-csms") else ""
            try:
                if kind == "announce":
                    entries = []
                    for dest, path, sequence, priority, sign in arg:
                        entries.append(_route(dest, path, sequence, priority,
                                              mallory_key if sign else None))
                        if path == [MALLORY] and sign:
                            announced.add(dest)
                    await mallory.send(OverlayFrame(SEND, CORE, (), mid, ACTION,
                                                    announcement(MALLORY, entries)))
                elif kind == "withdraw":
                    await mallory.send(OverlayFrame(SEND, CORE, (), mid, ACTION,
                                                    announcement(MALLORY, [], arg)))
                elif kind == "attach":
                    await mallory.send(OverlayFrame(CALL, "CSMS", (target_station,), mid,
                                                    "OverlayStationConnect",
                                                    {"subprotocols": ["ocpp1.6"]}))
                    if (await mallory.answer_to(mid)).type == CALLRESULT:
                        held.add(target_station)
                elif kind == "to-csms":
                    await mallory.send(OverlayFrame(CALL, "CSMS", (target_station,), mid,
                                                    "StatusNotification", {"connectorId": 9}))
                elif kind == "to-honest":
                    await mallory.send(OverlayFrame(CALL, HONEST, tuple(arg), mid,
                                                    "DataTransfer", {"vendorId": "m"}))
                else:
                    if isinstance(arg, bytes):
                        await mallory.ws.send_bytes(arg)
                    else:
                        await mallory.ws.send_message(arg)
                # fence: an attach of a station of its own is answered once the core has
                # read everything before it on this link
                if not mallory.closed:
                    fence = f"f{number}-{tag}"
                    await mallory.send(OverlayFrame(CALL, "CSMS", (f"M-FENCE-{tag}",), fence,
                                                    "OverlayStationConnect",
                                                    {"subprotocols": ["ocpp1.6"]}))
                    await mallory.answer_to(fence)
            except (LinkClosed, HandshakeFailed):
                mallory.closed = True  # refused or closed by the core: allowed

            # the invariants
            assert node.overlay.links.get(HONEST) is honest_link and not honest.closed
            for dest, (origin, peer) in before.items():
                best = table.best(dest)
                assert best is not None and (best.origin, best.peer) == (origin, peer), (
                    f"route to {dest} changed after {kind} {arg!r}")
            held_here = node.overlay.state.held.get(station)
            assert held_here is not None and held_here.origin == HONEST, (
                f"the honest station's session was taken after {kind} {arg!r}")
            assert backend.received(station) == honest_frames, (
                f"{station} at the CSMS after {kind} {arg!r}")
            for other in (f"H-1-{tag}", f"CSMS-{tag}"):
                if other not in held:
                    assert backend.received(other) == [], other
            assert len(table.routes_via(MALLORY)) <= len(announced | {MALLORY})

        # and the node answers on: the honest station's next frame reaches the CSMS
        await honest.send(OverlayFrame(CALL, "CSMS", (station,), "h-2", "Heartbeat", {}))
        await trio.to_thread.run_sync(backend.wait_frames, station, 2)
        for peer in (honest, mallory):  # gone at once: the core need not wait for a close
            await trio.aclose_forcefully(peer.ws.stream)
        nursery.cancel_scope.cancel()


def _route(dest: str, path: list[str], sequence: int, priority: int,
           key: SigningKey | None) -> dict[str, Any]:
    """A routes[] entry as Mallory writes it: maybe signed (with its own key), maybe not
    well-formed at all (the core must refuse what it cannot take)."""
    try:
        return signed_route(dest, path or [MALLORY], sequence=sequence, key=key,
                            priority=priority) | ({"path": path} if not path else {})
    except (ValueError, TypeError, OverflowError):
        return {"destinationId": dest, "path": path, "sequence": sequence,
                "priority": priority, "weight": 1}

