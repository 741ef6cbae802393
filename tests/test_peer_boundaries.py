"""Trust boundaries of the overlay, end to end: who may open a peer link, who may speak
for a station, and what a peer's claims can and cannot do (a node process on loopback,
a real ``ocpp`` CSMS, raw WebSocket clients and a scripted overlay peer).

The contract (docs/protocol.md): a node accepts an overlay link only from a node id in a
``[[peers]]`` entry, authenticated on that entry; ``[[stations]]`` entries never
authenticate a peer; an attach for a station that is connected elsewhere is refused,
and an existing session is never stopped before its replacement is authorised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from router.wire.frames import CALLERROR, CALLRESULT
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import PeerLink, overlay_config
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import basic_auth, handshake_status, open_station
from tests.peers.overlay_peer import open_fake_peer

STEP = 10.0
NODE, PEER, OTHER_PEER = "bnd-core", "bnd-edge", "bnd-other"
STATION_PASSWORD, PEER_PASSWORD = "station-secret-1", "peer-secret-1"
MODE = {"X-OCPP-NetworkingMode": "OverlayNetwork"}


def _hash(password: str) -> str:
    from router.passwords import hash_password

    return hash_password(password)


@dataclass
class Site:
    node: NodeProcess
    csms: Csms

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.node.port}/ocpp"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A node with a CSMS (which it dials with its own password), stations CS-* with
    passwords, and one accept-only peer with its own password."""
    station_hash, peer_hash = _hash(STATION_PASSWORD), _hash(PEER_PASSWORD)
    with Csms() as csms:
        config = f"""
[node]
id = "{NODE}"

[listen]
host = "127.0.0.1"
port = 0
security_profile = 1

[[stations]]
match = "*"
password_hash = "{station_hash}"

[[backends]]
name = "csms"
role = "primary"
url = "{csms.url}"
auth = {{ password = "the-nodes-own-csms-password" }}

[[peers]]
id = "{PEER}"
password_hash = "{peer_hash}"
"""
        node = start_node(config, tmp_path_factory.mktemp("bnd"), env=node_env())
        try:
            yield Site(node, csms)
        finally:
            node.stop()


def _status(url: str, **kwargs: object) -> int:
    return asyncio.run(handshake_status(url, ("ocpp2.1",), **kwargs))[0]  # type: ignore[arg-type]


# --- who may open a peer link -------------------------------------------------------------


def test_a_stations_own_password_does_not_open_a_peer_link(site: Site) -> None:
    """The attack of the issue: CS-1's credentials plus the overlay header made a peer."""
    status = _status(f"{site.base}/CS-1", headers={**MODE,
                                                  "Authorization": basic_auth("CS-1",
                                                                              STATION_PASSWORD)})
    assert status == 403
    site.node.wait_for_event("station_rejected", timeout=STEP, station="CS-1", status=403)


def test_a_listed_peer_opens_a_link_only_with_its_own_password(site: Site) -> None:
    url = f"{site.base}/{PEER}"
    assert _status(url, headers={**MODE, "Authorization": basic_auth(PEER, "wrong")}) == 401
    # a station password does not help a peer either
    assert _status(url, headers={**MODE,
                                 "Authorization": basic_auth(PEER, STATION_PASSWORD)}) == 401
    assert _status(url, headers=MODE) == 401
    assert _status(url, headers={**MODE, "Authorization": basic_auth(PEER, PEER_PASSWORD)}) == 101


def test_an_unlisted_node_asking_for_overlay_mode_is_refused(site: Site) -> None:
    status = _status(f"{site.base}/{OTHER_PEER}",
                     headers={**MODE, "Authorization": basic_auth(OTHER_PEER, PEER_PASSWORD)})
    assert status == 403


@pytest.mark.parametrize("identity", ["CSMS", "*", NODE, PEER, ".", ".."])
def test_reserved_identities_cannot_connect_as_stations(site: Site, identity: str) -> None:
    status = _status(f"{site.base}/{identity}", identity=identity, password=STATION_PASSWORD)
    assert status in (400, 403), status
    assert site.csms.connections(identity) == []


# --- who may speak for a station ----------------------------------------------------------


def test_a_peer_cannot_attach_a_station_connected_elsewhere(site: Site) -> None:
    """A listed peer claims CS-2, which is connected to the node itself: the attach is
    refused, CS-2's session goes on, and the CSMS never sees a second CS-2."""

    async def scenario() -> None:
        async with open_station(site.node.url("CS-2"), "1.6", identity="CS-2",
                                password=STATION_PASSWORD) as station:
            await station.boot()
            before = len(site.csms.connections("CS-2"))
            async with open_fake_peer(site.base, PEER, headers={
                    "Authorization": basic_auth(PEER, PEER_PASSWORD)}) as peer:
                mid = await peer.call("CSMS", ["CS-2"], "OverlayStationConnect",
                                      {"subprotocols": ["ocpp1.6"]})
                answer = await peer.wait_answer(mid, STEP)
                assert answer.type == CALLERROR
                assert answer.details == {"status": 409}, answer
            # the station is still served, on its one CSMS connection
            await station.heartbeat()
            assert len(site.csms.connections("CS-2")) == before

    asyncio.run(scenario())


def test_an_attach_that_takes_a_station_is_refused_before_anything_is_stopped(
    site: Site,
) -> None:
    """An attach for a station nobody holds is served (the peer may hold it); the CSMS
    is dialled as the station only then (CALLRESULT with the subprotocol)."""

    async def scenario() -> None:
        async with open_fake_peer(site.base, PEER, headers={
                "Authorization": basic_auth(PEER, PEER_PASSWORD)}) as peer:
            mid = await peer.call("CSMS", ["CS-9"], "OverlayStationConnect",
                                  {"subprotocols": ["ocpp1.6"]})
            answer = await peer.wait_answer(mid, STEP)
            assert answer.type == CALLRESULT and answer.payload == {"subprotocol": "ocpp1.6"}
            site.csms.wait_for_connection("CS-9", timeout=STEP)

    asyncio.run(scenario())


# --- peer links replaced, peers dialled ---------------------------------------------------


def test_a_peer_that_dials_again_replaces_its_link_cleanly(site: Site) -> None:
    """The second link of one peer id replaces the first without breaking either in the
    wrong way: the old one is closed by the node (1001), the new one stays up."""
    auth = {"Authorization": basic_auth(PEER, PEER_PASSWORD)}

    async def scenario() -> None:
        async with open_fake_peer(site.base, PEER, headers=auth) as first:
            await first.wait_full_sync(STEP)
            async with open_fake_peer(site.base, PEER, headers=auth) as second:
                await second.wait_full_sync(STEP)
                await asyncio.wait_for(first.ws.wait_closed(), STEP)
                assert first.ws.close_code == 1001, first.ws.close_code
                # the new link works: an attach over it is answered
                mid = await second.call("CSMS", ["CS-10"], "OverlayStationConnect",
                                        {"subprotocols": ["ocpp1.6"]})
                assert (await second.wait_answer(mid, STEP)).type == CALLRESULT
                assert second.ws.close_code is None

    asyncio.run(scenario())


def test_a_dialled_node_cannot_claim_another_id(
    site: Site, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An edge (authenticating as the listed peer) whose [[peers]] entry says
    "bnd-elsewhere" reaches the node above, which names itself bnd-core: the edge refuses
    the link instead of taking the claimed id."""
    edge = start_node(overlay_config(PEER, peers=[
        PeerLink("bnd-elsewhere", site.base, password=PEER_PASSWORD)]),
        tmp_path_factory.mktemp("bnd-dialler"), env=node_env())
    try:
        line = edge.wait_for_event("peer_dial_failed", timeout=STEP, peer="bnd-elsewhere")
        assert NODE in line["reason"]
        assert not edge.events("peer_connected")
    finally:
        edge.stop()
