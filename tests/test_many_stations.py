"""50 stations (1.6 and 2.0.1 mixed) on one node at once; no answer reaches the wrong one.

Every value a station sends is its own (idTag, meter reading), and the CSMS puts values
derived from the station's identity and idTag into its answers (``identity_time``,
``parent_id_tag``, ``group_id_token``), so each station checks every answer it gets. CSMS
commands run concurrently with the stations' calls, and each station answers them with a
status of its own, so the CSMS checks the other direction the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ocpp.v16 import call as call16
from ocpp.v201 import call as call201

from tests.nodeproc import NodeProcess
from tests.peers.ocpp_csms import (
    Csms,
    group_id_token,
    identity_interval,
    identity_time,
    parent_id_tag,
)
from tests.peers.ocpp_station import open_station

STATIONS = 50
ROUNDS = 3


def plan(index: int) -> dict[str, Any]:
    """What station ``index`` is and sends; all values differ between stations."""
    version = "1.6" if index % 2 == 0 else "2.0.1"
    return {
        "identity": f"MANY-{index:02d}-{version}",
        "version": version,
        "tags": [f"T{index:02d}R{r}" for r in range(ROUNDS)],
        "meters": [100_000 * (index + 1) + r for r in range(ROUNDS)],
        "command_tag": f"CMD{index:02d}",
        # the station's own answer to the CSMS command
        "command_status": "Accepted" if index % 3 else "Rejected",
    }


def check_authorize(version: str, identity: str, token: str, answer: Any) -> None:
    if version == "1.6":
        info = answer.id_tag_info
        assert info["parent_id_tag"] == parent_id_tag(token), (identity, info)
        assert info["expiry_date"] == identity_time(identity), (identity, info)
    else:
        info = answer.id_token_info
        assert info["group_id_token"]["id_token"] == group_id_token(token), (identity, info)
        assert info["cache_expiry_date_time"] == identity_time(identity), (identity, info)


def command_for(version: str, tag: str, index: int) -> Any:
    if version == "1.6":
        return call16.RemoteStartTransaction(id_tag=tag, connector_id=1)
    return call201.RequestStartTransaction(
        id_token={"id_token": tag, "type": "Central"}, remote_start_id=index
    )


def test_fifty_stations_answers_never_cross(node: NodeProcess, csms: Csms) -> None:
    plans = [plan(i) for i in range(STATIONS)]
    all_connected: asyncio.Barrier | None = None
    command_results: dict[str, Any] = {}
    station_commands: dict[str, list[Any]] = {}

    async def run_station(index: int) -> None:
        p = plan(index)
        identity, version = p["identity"], p["version"]
        async with open_station(
            node.url(identity), version, start_status=p["command_status"]
        ) as station:
            # everybody is connected before anybody talks
            assert all_connected is not None
            await asyncio.wait_for(all_connected.wait(), 30)

            boot = await station.boot(model=f"M-{identity}")
            assert boot.current_time == identity_time(identity), identity
            assert boot.interval == identity_interval(identity), identity
            await station.status(connector_id=1, status="Available")

            async def calls() -> None:
                for r in range(ROUNDS):
                    answer = await station.authorize(p["tags"][r])
                    check_authorize(version, identity, p["tags"][r], answer)
                    await station.meter(p["meters"][r])
                    heartbeat = await station.heartbeat()
                    assert heartbeat.current_time == identity_time(identity), identity

            async def command() -> None:
                command_results[identity] = await csms.acall(
                    identity, command_for(version, p["command_tag"], index)
                )

            # station calls and the CSMS command travel at the same time
            await asyncio.gather(calls(), command())
            station_commands[identity] = list(station.commands)

    async def scenario() -> None:
        nonlocal all_connected
        all_connected = asyncio.Barrier(STATIONS)
        await asyncio.wait_for(
            asyncio.gather(*(run_station(i) for i in range(STATIONS))), timeout=45
        )

    asyncio.run(scenario())

    for index, p in enumerate(plans):
        identity, version = p["identity"], p["version"]
        # the CSMS command reached this station and its own answer came back
        assert command_results[identity].status == p["command_status"], identity
        [received] = station_commands[identity]
        if version == "1.6":
            assert received.fields == {"id_tag": p["command_tag"], "connector_id": 1}
        else:
            assert received.fields["id_token"]["id_token"] == p["command_tag"], identity
            assert received.fields["remote_start_id"] == index

        # what the CSMS got on this station's link is exactly this station's traffic
        calls = csms.calls(identity)
        expected = ["BootNotification", "StatusNotification"] + [
            "Authorize",
            "MeterValues",
            "Heartbeat",
        ] * ROUNDS
        assert [c.action for c in calls] == expected, identity
        assert all(c.subprotocol == f"ocpp{version}" for c in calls), identity
        tags = [
            c.payload["idTag"] if version == "1.6" else c.payload["idToken"]["idToken"]
            for c in calls
            if c.action == "Authorize"
        ]
        assert tags == p["tags"], identity
        meters = [
            c.payload["meterValue"][0]["sampledValue"][0]["value"]
            for c in calls
            if c.action == "MeterValues"
        ]
        expected_meters = [str(m) if version == "1.6" else m for m in p["meters"]]
        assert meters == expected_meters, identity
        assert len(csms.connections(identity)) == 1, identity
