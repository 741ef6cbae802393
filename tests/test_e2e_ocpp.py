"""Acceptance: real OCPP stations and a real CSMS talk through the node (security profile 0).

The node runs as a subprocess (``tests.nodeproc.start_node``) in front of the ``ocpp``-package
CSMS of ``tests.peers.ocpp_csms``. Stations are ``ocpp`` ChargePoints (1.6, 2.0.1) or bare
WebSocket clients for frame-level checks (2.1 CALLRESULTERROR / SEND, verbatim forwarding).
Every test uses its own station identity, so one node and one CSMS serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.nodeproc import NodeProcess
from tests.peers.ocpp_csms import (
    Csms,
    group_id_token,
    identity_interval,
    identity_time,
    parent_id_tag,
)
from tests.peers.ocpp_station import handshake_status, open_raw, open_station

STEP = 10.0  # upper bound for any single network step in these tests


async def recv_text(ws: Any, timeout: float = STEP) -> str:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str), f"expected a text message, got {message!r}"
    return message


async def in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking CSMS helper without blocking the stations' event loop."""
    return await asyncio.to_thread(func, *args, **kwargs)


# --- station-initiated calls -----------------------------------------------------------


@pytest.mark.parametrize(("version", "subprotocol"), [("1.6", "ocpp1.6"), ("2.0.1", "ocpp2.0.1")])
def test_station_calls_reach_csms_and_answers_reach_station(
    node: NodeProcess, csms: Csms, version: str, subprotocol: str
) -> None:
    identity = f"E2E-CALLS-{version}"
    token = f"TAG-{version}"
    wh = 4711 if version == "1.6" else 815

    async def scenario() -> None:
        async with open_station(node.url(identity), version) as station:
            assert station.subprotocol == subprotocol

            boot = await station.boot(vendor="AcmeVendor", model=f"Model-{version}")
            assert boot.status == "Accepted"
            assert boot.current_time == identity_time(identity)
            assert boot.interval == identity_interval(identity)

            heartbeat = await station.heartbeat()
            assert heartbeat.current_time == identity_time(identity)

            await station.status(connector_id=1, status="Available")
            await station.meter(wh)

            auth = await station.authorize(token)
            if version == "1.6":
                assert auth.id_tag_info == {
                    "status": "Accepted",
                    "expiry_date": identity_time(identity),
                    "parent_id_tag": parent_id_tag(token),
                }
            else:
                assert auth.id_token_info == {
                    "status": "Accepted",
                    "cache_expiry_date_time": identity_time(identity),
                    "group_id_token": {"id_token": group_id_token(token), "type": "Central"},
                }

    asyncio.run(scenario())

    calls = csms.calls(identity)
    assert [c.action for c in calls] == [
        "BootNotification",
        "Heartbeat",
        "StatusNotification",
        "MeterValues",
        "Authorize",
    ]
    assert all(c.subprotocol == subprotocol for c in calls)
    boot, _, status, meter, auth = (c.payload for c in calls)
    sample = meter["meterValue"][0]["sampledValue"][0]
    if version == "1.6":
        assert boot["chargePointVendor"] == "AcmeVendor"
        assert boot["chargePointModel"] == "Model-1.6"
        assert status["connectorId"] == 1 and status["status"] == "Available"
        assert sample["value"] == str(wh)
        assert auth == {"idTag": token}
    else:
        assert boot["chargingStation"] == {"model": "Model-2.0.1", "vendorName": "AcmeVendor"}
        assert status["connectorStatus"] == "Available" and status["evseId"] == 1
        assert sample["value"] == wh
        assert auth["idToken"] == {"idToken": token, "type": "ISO14443"}


# --- CSMS-initiated commands -----------------------------------------------------------


def test_csms_commands_reach_station_ocpp16(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-CMD-16"

    async def scenario() -> None:
        async with open_station(
            node.url(identity), "1.6", start_status="Accepted", reset_status="Rejected"
        ) as station:
            await station.boot()  # the CSMS has the link once it answered a call on it

            started = await in_thread(csms.remote_start_transaction, identity, "RS-TAG-16", 2)
            assert started.status == "Accepted"
            command = await station.wait_for_command("RemoteStartTransaction")
            assert command.fields == {"id_tag": "RS-TAG-16", "connector_id": 2}

            reset = await in_thread(csms.reset, identity, "Soft")
            assert reset.status == "Rejected"  # the station's own answer, not a default
            command = await station.wait_for_command("Reset")
            assert command.fields == {"type": "Soft"}

            # the link still carries station calls afterwards
            heartbeat = await station.heartbeat()
            assert heartbeat.current_time == identity_time(identity)

    asyncio.run(scenario())


def test_csms_commands_reach_station_ocpp201(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-CMD-201"

    async def scenario() -> None:
        async with open_station(
            node.url(identity), "2.0.1", start_status="Rejected", reset_status="Scheduled"
        ) as station:
            await station.boot()

            started = await in_thread(csms.request_start_transaction, identity, "RS-TOK-201", 77)
            assert started.status == "Rejected"
            command = await station.wait_for_command("RequestStartTransaction")
            assert command.fields == {
                "id_token": {"id_token": "RS-TOK-201", "type": "Central"},
                "remote_start_id": 77,
                "evse_id": 1,
            }

            reset = await in_thread(csms.reset, identity, "OnIdle")
            assert reset.status == "Scheduled"
            command = await station.wait_for_command("Reset")
            assert command.fields == {"type": "OnIdle"}

            heartbeat = await station.heartbeat()
            assert heartbeat.current_time == identity_time(identity)

    asyncio.run(scenario())


# --- verbatim forwarding ---------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ["ocpp1.6", "ocpp2.0.1", "ocpp2.1"])
def test_frames_are_forwarded_as_the_same_text(
    node: NodeProcess, csms: Csms, subprotocol: str
) -> None:
    identity = f"E2E-VERBATIM-{subprotocol}"
    # unusual but valid JSON spacing and key order: a re-encoding node would change it
    call = '[2 ,  "vb-1", "Heartbeat" ,{ }]'

    async def scenario() -> None:
        async with open_raw(node.url(identity), [subprotocol]) as ws:
            assert ws.subprotocol == subprotocol
            await ws.send(call)
            answer = await recv_text(ws)
            assert json.loads(answer) == [3, "vb-1", {"currentTime": identity_time(identity)}]
            assert answer in csms.sent_frames(identity)

    asyncio.run(scenario())
    assert csms.frames(identity) == [call]


# --- ocpp2.1 message types 5 (CALLRESULTERROR) and 6 (SEND) ------------------------------


def test_ocpp21_send_frames_pass_both_ways(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-21-SEND"
    reset = '[2,"rst-after-send","Reset",{"type":"OnIdle"}]'
    reset_answer = '[3,"rst-after-send",{"status":"Accepted"}]'
    up = '[6,"snd-up-1","NotifyPeriodicEventStream",{"id":3,"pending":0,"basetime":"2024-01-01T00:00:00Z","data":[{"t":0,"v":"1"}]}]'  # noqa: E501
    down = '[6, "snd-down-1", "NotifyPeriodicEventStream", {"id": 4, "pending": 1, "basetime": "2024-01-01T00:00:00Z", "data": []}]'  # noqa: E501

    async def scenario() -> None:
        async with open_raw(node.url(identity), ["ocpp2.1"]) as ws:
            assert ws.subprotocol == "ocpp2.1"
            # station -> CSMS: the SEND arrives as is and nobody answers it; the next frame
            # the station sees is the answer to its following CALL
            await ws.send(up)
            await ws.send('[2,"hb-after-send","Heartbeat",{}]')
            answer = json.loads(await recv_text(ws))
            assert answer == [3, "hb-after-send", {"currentTime": identity_time(identity)}]
            await in_thread(csms.wait_for_frame, identity, up)

            # CSMS -> station: same in the other direction
            await in_thread(csms.send_raw, identity, down)
            assert await recv_text(ws) == down
            await in_thread(csms.send_raw, identity, reset)
            assert await recv_text(ws) == reset
            await ws.send(reset_answer)
            await in_thread(csms.wait_for_frame, identity, reset_answer)

    asyncio.run(scenario())
    # the CSMS got exactly the station's frames: no CALLERROR made up for the SEND
    assert csms.frames(identity) == [
        up,
        '[2,"hb-after-send","Heartbeat",{}]',
        reset_answer,
    ]


def test_ocpp21_callresulterror_station_to_csms(node: NodeProcess, csms: Csms) -> None:
    """Station CALL, CSMS CALLRESULT, then the station rejects that result with a
    CALLRESULTERROR: the type-5 frame reaches the CSMS as is and nothing answers it."""
    identity = "E2E-21-CRE-UP"
    up_error = '[5,"hb-1","FormatViolation","currentTime is not what we expected",{"seen":"x"}]'

    async def scenario() -> None:
        async with open_raw(node.url(identity), ["ocpp2.1"]) as ws:
            await ws.send('[2,"hb-1","Heartbeat",{}]')
            assert json.loads(await recv_text(ws))[:2] == [3, "hb-1"]
            await ws.send(up_error)
            await in_thread(csms.wait_for_frame, identity, up_error)
            # nothing was produced for the type-5 frame: the next frame is this answer
            await ws.send('[2,"hb-2","Heartbeat",{}]')
            assert json.loads(await recv_text(ws)) == [
                3, "hb-2", {"currentTime": identity_time(identity)}
            ]

    asyncio.run(scenario())
    assert csms.frames(identity) == [
        '[2,"hb-1","Heartbeat",{}]',
        up_error,
        '[2,"hb-2","Heartbeat",{}]',
    ]


def test_ocpp21_callresulterror_csms_to_station(node: NodeProcess, csms: Csms) -> None:
    """CSMS CALL, station CALLRESULT, then the CSMS rejects that result with a
    CALLRESULTERROR: the type-5 frame reaches the station as is."""
    identity = "E2E-21-CRE-DOWN"
    down_call = '[2,"rst-1","Reset",{"type":"Immediate"}]'
    down_answer = '[3,"rst-1",{"status":"Accepted"}]'
    down_error = '[5, "rst-1", "PropertyConstraintViolation", "status unexpected", {}]'

    async def scenario() -> None:
        async with open_raw(node.url(identity), ["ocpp2.1"]) as ws:
            await ws.send('[2,"hb-1","Heartbeat",{}]')  # the CSMS has the link once it answers
            assert json.loads(await recv_text(ws))[:2] == [3, "hb-1"]
            await in_thread(csms.send_raw, identity, down_call)
            assert await recv_text(ws) == down_call
            await ws.send(down_answer)
            await in_thread(csms.wait_for_frame, identity, down_answer)
            await in_thread(csms.send_raw, identity, down_error)
            assert await recv_text(ws) == down_error
            # and the link goes on normally
            await ws.send('[2,"hb-2","Heartbeat",{}]')
            assert json.loads(await recv_text(ws))[:2] == [3, "hb-2"]

    asyncio.run(scenario())
    assert csms.frames(identity) == [
        '[2,"hb-1","Heartbeat",{}]',
        down_answer,
        '[2,"hb-2","Heartbeat",{}]',
    ]


# --- the backend link ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "backend_offered", "chosen"),
    [
        (["ocpp1.6"], ("ocpp1.6",), "ocpp1.6"),
        (["ocpp2.0.1", "ocpp1.6"], ("ocpp2.0.1", "ocpp1.6"), "ocpp2.0.1"),
        (["ocpp1.6", "ocpp2.1", "ocpp2.0.1"], ("ocpp1.6", "ocpp2.1", "ocpp2.0.1"), "ocpp1.6"),
        # a subprotocol the node does not support is not offered to the backend
        (["ocpp1.2", "ocpp2.0.1"], ("ocpp2.0.1",), "ocpp2.0.1"),
    ],
)
def test_backend_dialled_at_url_identity_with_station_subprotocols(
    node: NodeProcess,
    csms: Csms,
    offered: list[str],
    backend_offered: tuple[str, ...],
    chosen: str,
) -> None:
    identity = "E2E-DIAL-" + "-".join(p.removeprefix("ocpp") for p in offered)

    async def scenario() -> None:
        async with open_raw(node.url(identity), offered) as ws:
            assert ws.subprotocol == chosen
            await ws.send('[2,"dial-1","Heartbeat",{}]')
            assert json.loads(await recv_text(ws))[:2] == [3, "dial-1"]

    asyncio.run(scenario())
    [link] = csms.connections(identity)
    assert link.path == f"/ocpp/{identity}"
    assert link.offered_subprotocols == backend_offered
    assert link.subprotocol == chosen
    assert link.authorization is None  # profile 0: the station sent no credentials


def test_station_gets_the_subprotocol_the_backend_chose(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-BACKEND-CHOICE"
    csms.set_subprotocols(identity, ["ocpp1.6"])  # station prefers 2.0.1, backend only 1.6

    async def scenario() -> None:
        async with open_station(
            node.url(identity), "1.6", subprotocols=["ocpp2.0.1", "ocpp1.6"]
        ) as station:
            assert station.subprotocol == "ocpp1.6"
            boot = await station.boot()
            assert boot.current_time == identity_time(identity)

    asyncio.run(scenario())
    [link] = csms.connections(identity)
    assert link.offered_subprotocols == ("ocpp2.0.1", "ocpp1.6")
    assert link.subprotocol == "ocpp1.6"


def test_backend_refusal_status_reaches_station(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-BACKEND-REFUSES"
    csms.reject(identity, 403)
    status, _ = asyncio.run(handshake_status(node.url(identity), ["ocpp1.6"]))
    assert status == 403
    assert csms.connections(identity) == []


def test_backend_choosing_no_subprotocol_gives_502(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-BACKEND-NO-SUBPROTOCOL"
    csms.set_subprotocols(identity, None)
    status, _ = asyncio.run(handshake_status(node.url(identity), ["ocpp1.6"]))
    assert status == 502


def test_csms_closing_the_link_closes_the_station_link(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-CSMS-CLOSES"

    async def scenario() -> None:
        async with open_station(node.url(identity), "2.0.1") as station:
            await station.boot()
            await in_thread(csms.close_station, identity, 1000, "bye")
            code = await station.wait_closed(STEP)
            assert code == 1001, f"station link closed with {code}, contract says 1001"

    asyncio.run(scenario())
    node.wait_for_event("station_disconnected", timeout=STEP, station=identity)


def test_station_disconnect_closes_the_backend_link(node: NodeProcess, csms: Csms) -> None:
    identity = "E2E-STATION-LEAVES"

    async def scenario() -> None:
        async with open_station(node.url(identity), "1.6") as station:
            await station.boot()
            assert csms.is_connected(identity)
        # leaving the block closed the station's socket (code 1000)

    asyncio.run(scenario())
    link = csms.wait_for_close(identity, timeout=STEP)
    assert link.closed
    node.wait_for_event("station_disconnected", timeout=STEP, station=identity)


@pytest.mark.parametrize(("station_code", "backend_code"), [(1000, 1000), (1001, 1001),
                                                             (4000, 1001)])
def test_backend_link_close_code_follows_the_station(
    node: NodeProcess, csms: Csms, station_code: int, backend_code: int
) -> None:
    """Contract: a station that leaves normally (1000) is seen by the CSMS leaving normally;
    any other close code reaches the CSMS as 1001 (going away)."""
    identity = f"E2E-STATION-LEAVES-{station_code}"

    async def scenario() -> None:
        async with open_station(node.url(identity), "1.6") as station:
            await station.boot()
            await station.ws.close(station_code)

    asyncio.run(scenario())
    link = csms.wait_for_close(identity, timeout=STEP)
    assert link.close_code == backend_code, (
        f"backend link closed with {link.close_code} {link.close_reason!r}, "
        f"expected {backend_code}"
    )
