"""Acceptance 4: a peer that forges paths or announces routes it has no right to changes nothing.

Topology: core node N (the CSMS as primary backend, ``[trust]`` with the keys of edge E and
of the fake peer F) and edge node E (signs its claims with its ``[node] key``, dials N).
Real ``ocpp`` stations sit on E. Fake peers (``tests.peers.overlay_peer``: a raw
``websockets`` client speaking JSON overlay frames) connect to N as overlay peers and send
NotifyNetworkTopology messages built with ``topology.messages``:

* forged paths (last hop not the authenticated peer, another ``routingNode``), alone or
  mixed with a valid route: the whole message is rejected;
* with ``[trust]``: no signature, a signature by an untrusted key, one over another
  claim, a broken value, a peer whose key N does not trust at all.

Each attempt announces a station that really sits on E, with a better priority than E's
route, so that believing it would divert the CSMS's commands to the fake peer. Checks: N
logs ``announcement_rejected`` once per message (counted), logs no route change for it,
and a CSMS command for the station still reaches the real station (and nothing reaches
the fake peer). Every negative check is fenced by a later message whose effect is
awaited (a valid route or another rejection), never by a sleep.

Last, a peer speaking for a station attached elsewhere (``path[0]`` a station not routed
via it) is refused with SecurityError, and its forged disconnect does not end the
station's session.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from policies import SigningKey
from router.wire import overlay_frames as overlay
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import (
    PeerLink,
    await_log,
    count_events,
    overlay_config,
    routes_to,
    wait_log,
    write_node_key,
)
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station
from tests.peers.overlay_peer import FakePeer, claim_signature, open_fake_peer, signed_route

STEP = 10.0
CORE, EDGE, FAKE, STRANGER = "tr-core", "tr-edge", "tr-fake", "tr-stranger"
BETTER = 0  # the best priority there is (0-65535): as good as the edge's honest route

_sequence = itertools.count(1)


@dataclass
class Trusted:
    core: NodeProcess
    edge: NodeProcess
    edge_key: SigningKey
    fake_key: SigningKey
    stranger_key: SigningKey  # signs well, but no node trusts it
    other_key: SigningKey  # an unrelated key

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.core.port}{self.core.path}"


@pytest.fixture(scope="module")
def trusted(csms: Csms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trusted]:
    keys_dir = tmp_path_factory.mktemp("keys")
    core_key, core_private, _ = write_node_key(keys_dir, CORE, "secp256r1")
    edge_key, edge_private, edge_public = write_node_key(keys_dir, EDGE, "ed25519")
    fake_key, _, fake_public = write_node_key(keys_dir, FAKE, "secp256r1")
    stranger_key, _, _ = write_node_key(keys_dir, STRANGER, "ed25519")
    other_key = SigningKey.generate("ed25519")
    del core_key
    started: list[NodeProcess] = []
    try:
        core = start_node(
            overlay_config(CORE, backend_url=csms.url, key=core_private,
                           trust={EDGE: edge_public, FAKE: fake_public},
                           accept=[EDGE, FAKE, STRANGER]),
            tmp_path_factory.mktemp("tr-core"), env=node_env())
        started.append(core)
        edge = start_node(overlay_config(EDGE, key=edge_private,
                                         peers=[PeerLink.to(core, CORE, "json")]),
                          tmp_path_factory.mktemp("tr-edge"), env=node_env())
        started.append(edge)
        core.wait_for_event("peer_connected", peer=EDGE, direction="in")
        wait_log(edge, "routes_changed", routes_to("CSMS"))
        # The edge's signed claims are believed: the trust setup itself works.
        wait_log(core, "routes_changed", routes_to(EDGE), peer=EDGE)
        yield Trusted(core, edge, edge_key, fake_key, stranger_key, other_key)
    finally:
        for node in reversed(started):
            node.stop()


def _rejections(node: NodeProcess, peer: str) -> int:
    return count_events(node, "announcement_rejected", peer=peer)


def _changes_via(node: NodeProcess, peer: str, destination: str) -> list[dict[str, Any]]:
    """routes_changed lines caused by ``peer`` that name ``destination``."""
    return [line for line in node.events("routes_changed")
            if line.get("peer") == peer and destination in (line.get("destinations") or [])]


async def _fence(t: Trusted, peer: FakePeer) -> None:
    """A valid, signed route from the fake peer; once N logs it, N has processed (and
    logged) everything the peer sent before it."""
    marker = f"TR-FENCE-{next(_sequence)}"
    await peer.announce(CORE, [signed_route(marker, [FAKE], sequence=next(_sequence),
                                            key=t.fake_key)])
    await await_log(t.core, "routes_changed", routes_to(marker), peer=FAKE, timeout=STEP)


async def _command_reaches_real_station(csms: Csms, station: Any, peer: FakePeer,
                                        identity: str) -> None:
    """A CSMS Reset for ``identity`` is answered by the real station (it answers Rejected,
    which the node would never make up) and nothing for it reached the fake peer."""
    before = len([c for c in station.commands if c.action == "Reset"])
    answer = await asyncio.to_thread(csms.reset, identity, "Soft")
    assert answer.status == "Rejected"
    assert len([c for c in station.commands if c.action == "Reset"]) == before + 1
    leaked = peer.received(lambda f: f.dest == identity or identity in f.path)
    assert not leaked, [f.as_list() for f in leaked]


async def _station_on_edge(t: Trusted, identity: str) -> Any:
    """Open a 1.6 station on the edge and wait until the core has its route via the edge."""
    cm = open_station(t.edge.url(identity), "1.6", reset_status="Rejected", open_timeout=STEP)
    station = await cm.__aenter__()
    await station.boot()
    await await_log(t.core, "routes_changed", routes_to(identity), peer=EDGE, timeout=STEP)
    return cm, station


# --- a fake peer that plays by the rules is believed (the control) -----------------------


def test_control_a_correctly_signed_announcement_is_taken(trusted: Trusted) -> None:
    t = trusted

    async def scenario() -> None:
        async with open_fake_peer(t.base_url, FAKE) as peer:
            await await_log(t.core, "peer_connected", peer=FAKE, direction="in", timeout=STEP)
            sync = await peer.wait_full_sync(STEP)
            assert sync, "the node sent no full sync on link up"
            assert {"CSMS", CORE, EDGE} <= peer.announced()
            before = _rejections(t.core, FAKE)
            await peer.announce(CORE, [signed_route("TR-OK-1", [FAKE], sequence=next(_sequence),
                                                    key=t.fake_key)])
            await await_log(t.core, "routes_changed", routes_to("TR-OK-1"), peer=FAKE,
                            timeout=STEP)
            # ...and passed on to the edge, with the fake peer's signature intact.
            await await_log(t.edge, "routes_changed", routes_to("TR-OK-1"), timeout=STEP)
            assert _rejections(t.core, FAKE) == before

    asyncio.run(scenario())


# --- forged paths ------------------------------------------------------------------------


def test_forged_paths_are_rejected_whole_and_change_nothing(
    trusted: Trusted, csms: Csms
) -> None:
    t = trusted
    victim = "TR-ST-FORGED"

    async def scenario() -> None:
        cm, station = await _station_on_edge(t, victim)
        try:
            async with open_fake_peer(t.base_url, FAKE) as peer:
                await peer.wait_full_sync(STEP)
                before = _rejections(t.core, FAKE)

                def edge_signed(path: list[str]) -> dict[str, Any]:
                    # Even the edge's own, valid signature does not make a forged path true.
                    return signed_route(victim, path, sequence=next(_sequence),
                                        key=t.edge_key, priority=BETTER)

                forged = [
                    # 1. the path ends at the edge, not at the peer that sent it
                    dict(routes=[edge_signed([EDGE])]),
                    # 2. a path through the peer that still does not end at it
                    dict(routes=[edge_signed([FAKE, EDGE])]),
                    # 3. the peer pretends to be the edge (routingNode) as well
                    dict(routes=[edge_signed([EDGE])], routing_node=EDGE),
                    # 4. a valid route mixed with a forged one: nothing of it is taken
                    dict(routes=[signed_route("TR-MIXED-OK", [FAKE], sequence=next(_sequence),
                                              key=t.fake_key),
                                 edge_signed([EDGE])]),
                    # 5. a forged full sync
                    dict(routes=[edge_signed([EDGE])], kind="full"),
                ]
                for message in forged:
                    await peer.announce(CORE, **message)
                await _fence(t, peer)

                assert _rejections(t.core, FAKE) - before == len(forged), (
                    t.core.events("announcement_rejected"))
                for line in t.core.events("announcement_rejected")[before:]:
                    assert line["peer"] == FAKE and line.get("reason"), line
                assert not _changes_via(t.core, FAKE, victim)
                assert not _changes_via(t.core, FAKE, "TR-MIXED-OK")
                await _command_reaches_real_station(csms, station, peer, victim)
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


# --- routes without a valid signature under [trust] --------------------------------------


def test_missing_or_bad_signatures_change_nothing(trusted: Trusted, csms: Csms) -> None:
    t = trusted
    victim = "TR-ST-UNSIGNED"

    def route(signatures: list[dict[str, Any]] | None, *, sequence: int,
              path: list[str] | None = None) -> dict[str, Any]:
        entry = signed_route(victim, path or [FAKE], sequence=sequence, key=None,
                             priority=BETTER)
        if signatures is not None:
            entry["signatures"] = signatures
        return entry

    def sig(key: SigningKey, sequence: int, origin: str = FAKE, **tamper: Any
            ) -> dict[str, Any]:
        entry = claim_signature(key, origin, victim, BETTER, 1, sequence)
        entry.update(tamper)
        return entry

    async def scenario() -> None:
        cm, station = await _station_on_edge(t, victim)
        try:
            async with open_fake_peer(t.base_url, FAKE) as peer:
                await peer.wait_full_sync(STEP)
                before = _rejections(t.core, FAKE)
                s = [next(_sequence) for _ in range(8)]
                good = sig(t.fake_key, s[4])
                flipped = ("A" if good["value"][0] != "A" else "B") + good["value"][1:]
                attempts = [
                    route(None, sequence=s[0]),  # no signatures at all
                    route([], sequence=s[1]),  # an empty list
                    route([sig(t.other_key, s[2])], sequence=s[2]),  # an untrusted key
                    # the trusted key id, but the value made with another key
                    route([sig(t.other_key, s[3], keyId=t.fake_key.key_id)], sequence=s[3]),
                    # the trusted key's signature, value tampered with
                    route([dict(good, value=flipped)], sequence=s[4]),
                    # a valid signature over another claim (older sequence number)
                    route([sig(t.fake_key, s[5] - 1)], sequence=s[5]),
                    # not base64 at all
                    route([sig(t.fake_key, s[6], value="%%% not base64 %%%")], sequence=s[6]),
                    # the peer signs a claim of the edge's (origin = edge) with its own key
                    route([sig(t.fake_key, s[7], origin=EDGE)], sequence=s[7],
                          path=[EDGE, FAKE]),
                ]
                for attempt in attempts:
                    await peer.announce(CORE, [attempt])
                await _fence(t, peer)

                assert _rejections(t.core, FAKE) - before == len(attempts), (
                    t.core.events("announcement_rejected")[before:])
                assert not _changes_via(t.core, FAKE, victim)
                await _command_reaches_real_station(csms, station, peer, victim)
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_a_peer_whose_key_is_not_trusted_changes_nothing(trusted: Trusted, csms: Csms) -> None:
    """[trust] holds other nodes' keys only: everything this peer originates is ignored,
    however well it signs, its own node id included."""
    t = trusted
    victim = "TR-ST-STRANGER"

    async def scenario() -> None:
        cm, station = await _station_on_edge(t, victim)
        try:
            async with open_fake_peer(t.base_url, STRANGER) as peer:
                await peer.wait_full_sync(STEP)
                before = _rejections(t.core, STRANGER)
                key = t.stranger_key
                await peer.announce(CORE, [
                    signed_route(STRANGER, [STRANGER], sequence=next(_sequence), key=key),
                    signed_route(victim, [STRANGER], sequence=next(_sequence), key=key,
                                 priority=BETTER),
                    signed_route("TR-GHOST", [STRANGER], sequence=next(_sequence), key=key),
                ], kind="full")
                # Fence: a malformed payload is rejected after the message above.
                await peer.notify({"networkTopologyInformation": {"routingNode": STRANGER,
                                                                  "kind": "bogus"}}, CORE)
                await await_log(t.core, "announcement_rejected", peer=STRANGER,
                                count=before + 2, timeout=STEP)
                assert _rejections(t.core, STRANGER) == before + 2
                for destination in (STRANGER, victim, "TR-GHOST"):
                    assert not _changes_via(t.core, STRANGER, destination), destination
                await _command_reaches_real_station(csms, station, peer, victim)
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


# --- speaking for someone else's station -------------------------------------------------


def test_a_peer_cannot_speak_for_a_station_attached_elsewhere(
    trusted: Trusted, csms: Csms
) -> None:
    """Frames whose path[0] is a station attached through another link are refused:
    not forwarded to the CSMS, logged (``overlay_refused``) and counted; the station's own
    session is untouched."""
    t = trusted
    victim = "TR-ST-SPOOFED"

    async def scenario() -> None:
        cm, station = await _station_on_edge(t, victim)
        try:
            async with open_fake_peer(t.base_url, FAKE) as peer:
                await peer.wait_full_sync(STEP)
                refused_before = count_events(t.core, "overlay_refused", peer=FAKE)
                calls_before = len(csms.calls(victim))

                # A CALL in the station's name.
                mid = await peer.call("CSMS", [victim], "Heartbeat", {})
                # Claiming to come from the edge does not help: the claimed hops are kept,
                # the authenticated one is appended, and path[0] is still the station.
                mid2 = await peer.call("CSMS", [victim, EDGE], "Authorize", {"idTag": "X"})
                # A forged disconnect for the station (a SEND, so no answer).
                await peer.send_frames([[overlay.SEND, "CSMS", [victim], "tr-spoof-dc",
                                         "OverlayStationDisconnect",
                                         {"code": 1000, "reason": "forged"}]])
                await await_log(t.core, "overlay_refused", peer=FAKE, station=victim,
                                count=refused_before + 3, timeout=STEP)
                assert count_events(t.core, "overlay_refused", peer=FAKE) - refused_before == 3

                # The real station's session is untouched: its calls are still answered,
                # on the CSMS socket it had, and the spoofed ones never reached the CSMS.
                heartbeat = await station.heartbeat()
                assert heartbeat.current_time
                received = [c.message_id for c in csms.calls(victim)]
                assert mid not in received and mid2 not in received, received
                assert len(received) == calls_before + 1
                assert len(csms.connections(victim)) == 1
                assert not csms.connections(victim)[0].closed
                await _command_reaches_real_station(csms, station, peer, victim)
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_a_refused_call_is_answered_to_the_peer_not_to_the_station(trusted: Trusted) -> None:
    """The SecurityError for a spoofed CALL goes back to the peer that sent it. Addressing
    it to path[0] would send it to the victim station's edge: the attacker could make the
    core emit frames at any station."""
    t = trusted
    victim = "TR-ST-SPOOFED-2"

    async def scenario() -> None:
        cm, _station = await _station_on_edge(t, victim)
        try:
            async with open_fake_peer(t.base_url, FAKE) as peer:
                await peer.wait_full_sync(STEP)
                mid = await peer.call("CSMS", [victim], "Heartbeat", {})
                try:
                    answer = await peer.wait_answer(mid, 5.0)
                except TimeoutError:
                    dropped = [line for line in t.edge.events("frame_dropped")
                               if line.get("message_id") == mid]
                    pytest.fail(f"no answer to the refused CALL {mid} reached the peer; the "
                                f"edge of the victim station logged: {dropped}")
                assert answer.type == overlay.CALLERROR, answer.as_list()
                assert answer.code == "SecurityError", answer.as_list()
                assert answer.dest == FAKE, answer.as_list()
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


@pytest.mark.parametrize("claimed", [[], [CORE], [CORE, "tr-relay"]],
                         ids=["no-claim", "claims-the-backend-node", "claims-a-relay-too"])
def test_a_peer_cannot_send_csms_commands_to_a_station(
    trusted: Trusted, csms: Csms, claimed: list[str]
) -> None:
    """Only the node holding the station's backend session (here the core) may address
    CSMS commands to it. A peer of the core sends one to a station on the edge, with no
    claimed path or claiming that it comes from the core itself: the station never gets it."""
    t = trusted
    victim = f"TR-ST-INJECTED-{len(claimed)}"

    async def scenario() -> None:
        cm, station = await _station_on_edge(t, victim)
        try:
            async with open_fake_peer(t.base_url, FAKE) as peer:
                await peer.wait_full_sync(STEP)
                await peer.send_frames([[overlay.CALL, victim, claimed, "tr-injected-1",
                                         "Reset", {"type": "Hard"}]])
                # Fence: a real CSMS command on the same path, after the injected one.
                answer = await asyncio.to_thread(csms.reset, victim, "Soft")
                assert answer.status == "Rejected"
                resets = [c.fields for c in station.commands if c.action == "Reset"]
                assert resets == [{"type": "Soft"}], resets
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(scenario())
