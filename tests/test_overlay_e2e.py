"""Acceptance 3: stations behind chained overlay nodes reach the CSMS, and survive a core's death.

Node processes on loopback (``tests.nodeproc``) and ``ocpp``-package peers:

* chain: edge nodes A (peer link in JSON) and B (msgpack), no backends, each dial core
  node C, which has the CSMS as primary backend. A 1.6 station on A and a 2.0.1 station on
  B make every station CALL the CSMS answers and receive CSMS commands; the CSMS sees each
  station on its own socket at ``/ocpp/<identity>``, exactly as if it were connected
  directly.
* failover: edge A dials two cores C1 and C2 with the same CSMS. The core carrying A's
  stations is stopped (SIGKILL, and SIGTERM). Every CALL in flight is answered or refused with a
  CALLERROR, the stations' links are closed (1001), they reconnect to A, attach through
  the other core and carry on.

Every wait is on a condition (a log line, a record of the CSMS, a station event); no
fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import (
    PeerLink,
    ReconnectingStation,
    await_log,
    overlay_config,
    routes_to,
    stderr_tail,
    wait_log,
)
from tests.peers import node_env
from tests.peers.ocpp_csms import (
    Csms,
    group_id_token,
    identity_interval,
    identity_time,
    parent_id_tag,
)
from tests.peers.ocpp_station import open_station
from tests.peers.overlay_peer import open_fake_peer
from topology.messages import route_entry

STEP = 10.0  # upper bound for any one network step

CORE, EDGE_A, EDGE_B = "ov-core-c", "ov-edge-a", "ov-edge-b"
STATION_A, STATION_B = "OV-A-CP16", "OV-B-CS201"


@dataclass
class Chain:
    core: NodeProcess
    edge_a: NodeProcess
    edge_b: NodeProcess


def _stop_all(nodes: list[NodeProcess]) -> None:
    for node in reversed(nodes):
        node.stop()


@pytest.fixture(scope="module")
def chain(csms: Csms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    started: list[NodeProcess] = []
    try:
        core = start_node(overlay_config(CORE, backend_url=csms.url,
                                         accept=[EDGE_A, EDGE_B, "ov-big-edge"]),
                          tmp_path_factory.mktemp("core"), env=node_env())
        started.append(core)
        edge_a = start_node(overlay_config(EDGE_A, peers=[PeerLink.to(core, CORE, "json")]),
                            tmp_path_factory.mktemp("edge-a"), env=node_env())
        started.append(edge_a)
        edge_b = start_node(overlay_config(EDGE_B, peers=[PeerLink.to(core, CORE, "msgpack")]),
                            tmp_path_factory.mktemp("edge-b"), env=node_env())
        started.append(edge_b)
        # Links up with the negotiated encodings, and each edge knows a way to the CSMS.
        edge_a.wait_for_event("peer_connected", peer=CORE, encoding="json", direction="out")
        edge_b.wait_for_event("peer_connected", peer=CORE, encoding="msgpack", direction="out")
        core.wait_for_event("peer_connected", peer=EDGE_A, encoding="json", direction="in")
        core.wait_for_event("peer_connected", peer=EDGE_B, encoding="msgpack", direction="in")
        wait_log(edge_a, "routes_changed", routes_to("CSMS"))
        wait_log(edge_b, "routes_changed", routes_to("CSMS"))
        yield Chain(core, edge_a, edge_b)
    finally:
        _stop_all(started)


def _standard_frames(csms: Csms, identity: str) -> list[list[Any]]:
    """The CSMS's received frames of ``identity``, parsed; each must be plain OCPP-J."""
    frames = []
    for text in csms.frames(identity):
        assert isinstance(text, str), f"binary message reached the CSMS: {text!r}"
        frames.append(json.loads(text))
    return frames


# --- chain: station calls ----------------------------------------------------------------


async def _all_calls(station: Any, identity: str, version: str, token: str) -> None:
    boot = await station.boot(vendor="OverlayVendor", model=f"Model-{version}")
    assert boot.status == "Accepted"
    assert boot.current_time == identity_time(identity)
    assert boot.interval == identity_interval(identity)
    heartbeat = await station.heartbeat()
    assert heartbeat.current_time == identity_time(identity)
    await station.status(connector_id=1, status="Available")
    await station.meter(1234)
    auth = await station.authorize(token)
    if version == "1.6":
        assert auth.id_tag_info["parent_id_tag"] == parent_id_tag(token)
        assert auth.id_tag_info["expiry_date"] == identity_time(identity)
    else:
        assert auth.id_token_info["group_id_token"]["id_token"] == group_id_token(token)
        assert auth.id_token_info["cache_expiry_date_time"] == identity_time(identity)


def test_station_calls_through_chained_edges_reach_the_csms(chain: Chain, csms: Csms) -> None:
    async def scenario() -> None:
        async with (
            open_station(chain.edge_a.url(STATION_A), "1.6", open_timeout=STEP) as on_a,
            open_station(chain.edge_b.url(STATION_B), "2.0.1", open_timeout=STEP) as on_b,
        ):
            assert on_a.subprotocol == "ocpp1.6"
            assert on_b.subprotocol == "ocpp2.0.1"
            await asyncio.gather(_all_calls(on_a, STATION_A, "1.6", "OV-TAG-A"),
                                 _all_calls(on_b, STATION_B, "2.0.1", "OV-TAG-B"))
            # While they are connected, the core has learned a route to each of them.
            await await_log(chain.core, "routes_changed", routes_to(STATION_A))
            await await_log(chain.core, "routes_changed", routes_to(STATION_B))

    asyncio.run(scenario())

    actions = ["BootNotification", "Heartbeat", "StatusNotification", "MeterValues", "Authorize"]
    for identity, subprotocol in ((STATION_A, "ocpp1.6"), (STATION_B, "ocpp2.0.1")):
        # One socket of its own per station, at /ocpp/<identity>, with its subprotocol.
        records = csms.connections(identity)
        assert len(records) == 1, records
        assert records[0].path == f"/ocpp/{identity}"
        assert records[0].subprotocol == subprotocol
        assert [c.action for c in csms.calls(identity)] == actions
        assert all(c.subprotocol == subprotocol for c in csms.calls(identity))
        # What reached the CSMS is plain OCPP-J: no dest, no path.
        for frame in _standard_frames(csms, identity):
            assert frame[0] == 2 and len(frame) == 4, frame
    assert csms.calls(STATION_A, "Authorize")[0].payload == {"idTag": "OV-TAG-A"}
    assert csms.calls(STATION_B, "Authorize")[0].payload["idToken"]["idToken"] == "OV-TAG-B"

    # Each edge attached its station through the core.
    chain.edge_a.wait_for_event("overlay_attach", station=STATION_A, via=CORE,
                                subprotocol="ocpp1.6")
    chain.edge_b.wait_for_event("overlay_attach", station=STATION_B, via=CORE,
                                subprotocol="ocpp2.0.1")


# --- chain: CSMS commands ------------------------------------------------------------------


def test_csms_commands_reach_stations_on_both_edges(chain: Chain, csms: Csms) -> None:
    cp16, cs201 = "OV-A-CMD16", "OV-B-CMD201"

    async def scenario() -> None:
        async with (
            open_station(chain.edge_a.url(cp16), "1.6", start_status="Accepted",
                         reset_status="Rejected", open_timeout=STEP) as on_a,
            open_station(chain.edge_b.url(cs201), "2.0.1", start_status="Rejected",
                         reset_status="Accepted", open_timeout=STEP) as on_b,
        ):
            await asyncio.gather(on_a.boot(), on_b.boot())
            # The core must have the stations' routes before it can deliver commands.
            await await_log(chain.core, "routes_changed", routes_to(cp16))
            await await_log(chain.core, "routes_changed", routes_to(cs201))

            started, started2 = await asyncio.gather(
                asyncio.to_thread(csms.remote_start_transaction, cp16, "OV-RS-16", 2),
                asyncio.to_thread(csms.request_start_transaction, cs201, "OV-RS-201", 77, 1),
            )
            assert started.status == "Accepted"  # the station's own answer...
            assert started2.status == "Rejected"  # ...not one the node made up
            reset_a, reset_b = await asyncio.gather(
                asyncio.to_thread(csms.reset, cp16, "Soft"),
                asyncio.to_thread(csms.reset, cs201, "OnIdle"),
            )
            assert reset_a.status == "Rejected"
            assert reset_b.status == "Accepted"

            remote = await on_a.wait_for_command("RemoteStartTransaction")
            assert remote.fields["id_tag"] == "OV-RS-16"
            assert remote.fields["connector_id"] == 2
            assert (await on_a.wait_for_command("Reset")).fields == {"type": "Soft"}
            request = await on_b.wait_for_command("RequestStartTransaction")
            assert request.fields["remote_start_id"] == 77
            assert request.fields["id_token"] == {"id_token": "OV-RS-201", "type": "Central"}
            assert (await on_b.wait_for_command("Reset")).fields == {"type": "OnIdle"}

            # The answers the CSMS got are plain OCPP-J CALLRESULTs on the station's socket.
            answers = [f for f in _standard_frames(csms, cp16) if f[0] == 3]
            assert {"status": "Accepted"} in [a[2] for a in answers]
            assert {"status": "Rejected"} in [a[2] for a in answers]
            assert all(len(a) == 3 for a in answers)

    asyncio.run(scenario())


def test_station_and_csms_closes_cross_the_overlay(chain: Chain, csms: Csms) -> None:
    """A station that leaves closes its CSMS socket; a CSMS that closes ends the station's link."""
    leaver, dropped = "OV-A-LEAVE", "OV-B-DROPPED"

    async def scenario() -> None:
        async with open_station(chain.edge_a.url(leaver), "1.6", open_timeout=STEP) as st:
            await st.boot()
        record = await asyncio.to_thread(csms.wait_for_close, leaver, STEP)
        assert record.close_code in (1000, 1001), record

        async with open_station(chain.edge_b.url(dropped), "2.0.1", open_timeout=STEP) as st:
            await st.boot()
            await asyncio.to_thread(csms.close_station, dropped, 1000, "bye")
            code = await st.wait_closed(STEP)
            assert code in (1000, 1001), code

    asyncio.run(scenario())


def test_a_full_sync_larger_than_a_station_message_is_taken(chain: Chain) -> None:
    """An edge with many stations dials its core and sends them all in its full sync: a
    topology message larger than a station's max_message_bytes (64 KiB) must be taken
    (docs/protocol.md: peer links carry messages up to 16 x max_message_bytes)."""
    dialler = "ov-big-edge"
    routes = [route_entry(f"OV-BIG-{i:04d}", [dialler], 0, 1, i + 1) for i in range(1000)]

    async def scenario() -> None:
        base = f"ws://127.0.0.1:{chain.core.port}{chain.core.path}"
        async with open_fake_peer(base, dialler) as peer:
            await peer.wait_full_sync(STEP)
            await peer.announce(CORE, routes, kind="full")
            # Fence: a keepalive-sized update after it; its effect proves the sync was read.
            await peer.announce(CORE, [route_entry("OV-BIG-FENCE", [dialler], 0, 1, 5000)])
            try:
                await await_log(chain.core, "routes_changed", routes_to("OV-BIG-FENCE"),
                                peer=dialler, timeout=5.0)
            except TimeoutError:
                pytest.fail(f"the core dropped the link (close {peer.ws.close_code} "
                            f"{peer.ws.close_reason!r}) instead of taking a "
                            f"{len(json.dumps(routes)) // 1024} KiB full sync")
            taken = [line for line in chain.core.events("routes_changed")
                     if line.get("peer") == dialler]
            assert sum(line["count"] for line in taken) >= len(routes) + 1

    asyncio.run(scenario())


# --- failover ----------------------------------------------------------------------------

CORE_1, CORE_2, EDGE_F = "ov-core-1", "ov-core-2", "ov-edge-f"


@dataclass(frozen=True)
class FailoverIds:
    """Station identities of one failover run (the CSMS is shared by the module)."""

    tag: str

    @property
    def hold_call(self) -> str:  # 1.6: its BootNotification is in flight when the core dies
        return f"OV-F{self.tag}-HOLDCALL"

    @property
    def hold_cmd(self) -> str:  # 2.0.1: sits on a CSMS Reset when the core dies
        return f"OV-F{self.tag}-HOLDCMD"

    @property
    def idle_16(self) -> str:
        return f"OV-F{self.tag}-IDLE16"

    @property
    def idle_201(self) -> str:
        return f"OV-F{self.tag}-IDLE201"

    @property
    def raw(self) -> str:  # 2.0.1 raw client: one CALL in flight and one queued behind it
        return f"OV-F{self.tag}-RAW"


@dataclass
class Failover:
    cores: dict[str, NodeProcess]
    edge: NodeProcess


@pytest.fixture
def failover(csms: Csms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Failover]:
    started: list[NodeProcess] = []
    try:
        cores = {}
        for core_id in (CORE_1, CORE_2):
            cores[core_id] = start_node(overlay_config(core_id, backend_url=csms.url,
                                                       accept=[EDGE_F]),
                                        tmp_path_factory.mktemp(core_id), env=node_env())
            started.append(cores[core_id])
        edge = start_node(
            overlay_config(EDGE_F, call_timeout_s=30, peers=[
                PeerLink.to(cores[CORE_1], CORE_1, "json"),
                PeerLink.to(cores[CORE_2], CORE_2, "msgpack"),
            ]),
            tmp_path_factory.mktemp("edge-f"), env=node_env())
        started.append(edge)
        edge.wait_for_event("peer_connected", peer=CORE_1, direction="out")
        edge.wait_for_event("peer_connected", peer=CORE_2, direction="out")
        cores[CORE_1].wait_for_event("peer_connected", peer=EDGE_F, direction="in")
        cores[CORE_2].wait_for_event("peer_connected", peer=EDGE_F, direction="in")
        wait_log(edge, "routes_changed", routes_to("CSMS"))
        yield Failover(cores, edge)
    finally:
        _stop_all(started)


def _attached_via(edge: NodeProcess, identity: str, after: int = 0) -> str:
    lines = wait_log(edge, "overlay_attach", station=identity, count=after + 1)
    return str(lines[after]["via"])


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM],
                         ids=["SIGKILL", "SIGTERM"])
def test_stopping_a_core_moves_stations_to_the_other_core(
    failover: Failover, csms: Csms, stop_signal: signal.Signals
) -> None:
    edge = failover.edge
    ids = FailoverIds("K" if stop_signal == signal.SIGKILL else "T")
    hold_call, hold_cmd, idle_16, idle_201, raw_id = (
        ids.hold_call, ids.hold_cmd, ids.idle_16, ids.idle_201, ids.raw)
    csms.set_raw(hold_call)  # the CSMS will not answer its first link's calls
    csms.set_raw(raw_id)

    async def scenario() -> None:
        hold = asyncio.Event()
        stations = {
            hold_call: ReconnectingStation(edge.url(hold_call), "1.6"),
            hold_cmd: ReconnectingStation(edge.url(hold_cmd), "2.0.1", hold_reset=hold),
            idle_16: ReconnectingStation(edge.url(idle_16), "1.6"),
            idle_201: ReconnectingStation(edge.url(idle_201), "2.0.1"),
        }
        for station in stations.values():
            await station.__aenter__()
        try:
            await _failover(failover, csms, stations, hold, ids, stop_signal)
        finally:
            for station in stations.values():
                await station.__aexit__(None, None, None)

    asyncio.run(scenario())


async def _raw_station(url: str) -> Any:
    return await connect(url, subprotocols=[Subprotocol("ocpp2.0.1")], open_timeout=STEP,
                         close_timeout=2.0, ping_interval=None)


async def _failover(
    failover: Failover, csms: Csms, stations: dict[str, ReconnectingStation],
    hold: asyncio.Event, ids: FailoverIds, stop_signal: signal.Signals,
) -> None:
    edge = failover.edge
    hold_call, hold_cmd, idle_16, idle_201, raw_id = (
        ids.hold_call, ids.hold_cmd, ids.idle_16, ids.idle_201, ids.raw)
    for identity in (hold_cmd, idle_16, idle_201):
        await stations[identity].must("boot")
    via = {identity: await asyncio.to_thread(_attached_via, edge, identity)
           for identity in stations}
    victim = via[hold_call]
    survivor = CORE_2 if victim == CORE_1 else CORE_1
    on_victim = sorted(i for i, v in via.items() if v == victim)
    on_survivor = sorted(i for i, v in via.items() if v == survivor)

    # A raw station: one CALL in flight at the CSMS, one queued behind it at the edge.
    raw = await _raw_station(edge.url(raw_id))
    raw_via = await asyncio.to_thread(_attached_via, edge, raw_id)
    await raw.send('[2,"raw-1","Heartbeat",{}]')
    await raw.send('[2,"raw-2","Heartbeat",{}]')
    await asyncio.to_thread(csms.wait_for_frame, raw_id, '[2,"raw-1","Heartbeat",{}]', STEP)

    # hold_call: a BootNotification the CSMS has received and will never answer.
    boot_in_flight = asyncio.create_task(stations[hold_call].call("boot"))
    await asyncio.to_thread(
        csms.wait_for, lambda: csms.calls(hold_call, "BootNotification"), STEP,
        "the in-flight BootNotification")
    csms.set_raw(hold_call, False)  # its next link is answered normally

    # hold_cmd: the CSMS's Reset is at the station, which does not answer yet.
    command_in_flight = asyncio.create_task(asyncio.to_thread(csms.reset, hold_cmd))
    await asyncio.wait_for(stations[hold_cmd].station.reset_arrived.wait(), STEP)

    await asyncio.to_thread(failover.cores[victim].stop, stop_signal)
    await await_log(edge, "peer_disconnected", peer=victim, timeout=STEP)

    # 1. The in-flight station CALL is answered with a CALLERROR, not lost.
    outcome = await boot_in_flight
    assert outcome.kind == "callerror", (
        f"in-flight BootNotification of {hold_call}: {outcome.kind} ({outcome.detail}); "
        f"edge log:\n{stderr_tail(edge)}")
    assert "InternalError" in outcome.detail, outcome.detail

    # 2. The raw station's CALLs (the one in flight, the queued one) are answered too.
    if raw_via == victim:
        answers: dict[str, list[Any]] = {}
        try:
            async with asyncio.timeout(STEP):
                while set(answers) != {"raw-1", "raw-2"}:
                    frame = json.loads(await raw.recv())
                    answers[frame[1]] = frame
        except TimeoutError:
            pytest.fail(f"raw station: answers {answers} after the core died; edge log:\n"
                        f"{stderr_tail(edge)}")
        except Exception as exc:  # the link closed before both answers came
            pytest.fail(f"raw station: link ended ({exc!r}) with answers {answers}")
        assert all(frame[0] == 4 for frame in answers.values()), answers
        assert answers["raw-1"][2] == "InternalError", answers
        await asyncio.wait_for(raw.wait_closed(), STEP)
        assert raw.close_code == 1001, raw.close_code
    await raw.close()

    # 3. The CSMS's command in flight ends promptly: answered, refused or its link closed,
    #    never left waiting for its timeout.
    try:
        await asyncio.wait_for(command_in_flight, STEP)
    except (ConnectionError, OSError):
        pass  # the core's CSMS socket died with the core
    except TimeoutError:
        pytest.fail("the CSMS's Reset in flight was neither answered nor ended")
    except Exception as exc:  # a CALLERROR from the node is an answer too
        if type(exc).__module__.split(".")[0] != "ocpp":
            raise
    hold.set()

    # 4. Stations on the dead core: link closed with 1001, reconnected through the survivor.
    for identity in on_victim:
        station = stations[identity]
        assert await station.wait_closed(1, timeout=STEP) == 1001, station.closes
        await station.wait_generation(2, timeout=STEP)
        assert await asyncio.to_thread(_attached_via, edge, identity, 1) == survivor
        await asyncio.to_thread(csms.wait_for_connection, identity, STEP, 2)
    for identity in on_survivor:
        assert stations[identity].generation == 1, f"{identity} lost a link it did not need to"

    # 5. Everyone's calls are answered by the CSMS (identity-derived values prove it).
    for identity, station in stations.items():
        boot = await station.must("boot")
        assert boot.current_time == identity_time(identity)
        heartbeat = await station.must("heartbeat")
        assert heartbeat.current_time == identity_time(identity)
        await station.must("authorize", f"TAG-{identity}"[:20])
    for identity in on_victim:
        records = csms.connections(identity)
        assert len(records) >= 2 and records[-1].path == f"/ocpp/{identity}"
        assert not records[-1].closed

    # 6. CSMS commands reach the reconnected stations.
    assert (await asyncio.to_thread(csms.reset, hold_call, "Soft")).status == "Accepted"
    started = await asyncio.to_thread(csms.request_start_transaction, hold_cmd, "F-TAG", 5)
    assert started.status == "Accepted"

    # 7. No silent loss anywhere: every CALL any station made was answered or refused.
    lost = [(identity, o) for identity, s in stations.items() for o in s.outcomes
            if not o.answered]
    assert not lost, lost
