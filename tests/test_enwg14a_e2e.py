"""The §14a EnWG worked example (issue 14, item 6) with real processes: the ``ocpp``-package
CSMS sends a DSO-signed curtailment (``SetChargingProfile-Signed``, a
ChargingStationExternalConstraints profile) through a core node and an edge gateway
(msgpack peer link) to a 2.1 station; the edge runs ``examples/policies/enwg-14a.toml``
as shipped. The station answers signed, then reports the limit with a signed
``NotifyChargingLimit``, which the core copies to a "transparency platform" secondary.

The DSO and the operator sign with joserfc, the station by hand with ``cryptography``:
neither is the node's verifier."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from router.relay.gate import audit_lines
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import PeerLink, overlay_config, routes_to, wait_log
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.test_policies_jws import Signer

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "examples" / "policies" / "enwg-14a.toml"
CORE, EDGE, STATION = "core-14a", "edge-14a", "CS-14A-01"
CURTAIL_RULE = "curtailments only when DSO-signed"
OPERATOR_RULE = "charging profiles need the operator"
ANSWER_RULE = "profile answers signed by the station"


def curtailment(purpose: str = "ChargingStationExternalConstraints",
                limit_w: float = 4200.0) -> dict[str, Any]:
    """A §14a curtailment: the station may draw at most ``limit_w`` (4.2 kW: the floor)."""
    return {"evseId": 0, "chargingProfile": {
        "id": 14, "stackLevel": 0, "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [{"id": 1, "chargingRateUnit": "W",
                              "startSchedule": "2026-11-27T17:00:00Z",
                              "chargingSchedulePeriod": [{"startPeriod": 0,
                                                          "limit": limit_w}]}]}}


@dataclass
class Site:
    csms: Csms
    transparency: Csms
    core: NodeProcess
    edge: NodeProcess
    signers: dict[str, Signer]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    signers = {"dso": Signer("ES256", "dso", library="joserfc"),
               "cso-operations": Signer("RS256", "cso-operations", library="joserfc"),
               STATION: Signer("ES256", STATION)}
    edge_dir = tmp_path_factory.mktemp("edge")
    shutil.copy(POLICY, edge_dir / "enwg-14a.toml")  # the example as shipped
    (edge_dir / "certs").mkdir()
    for name, signer in signers.items():
        file = f"station-{name}" if name == STATION else name
        (edge_dir / "certs" / f"{file}.crt.pem").write_bytes(signer.pem)
    started: list[NodeProcess] = []
    with Csms() as csms, Csms() as transparency:
        try:
            core = start_node(overlay_config(CORE, backend_url=csms.url, accept=[EDGE]) + f'''
[[backends]]
name = "transparency"
role = "secondary"
url = "{transparency.url}"
subscribe = ["NotifyChargingLimit"]
''', tmp_path_factory.mktemp("core"), env=node_env())
            started.append(core)
            edge = start_node(overlay_config(EDGE, peers=[PeerLink.to(core, CORE, "msgpack")])
                              + '\n[policy]\nfile = "enwg-14a.toml"\n', edge_dir,
                              env=node_env())
            started.append(edge)
            wait_log(edge, "routes_changed", routes_to("CSMS"))
            yield Site(csms, transparency, core, edge, signers)
        finally:
            for node in reversed(started):
                node.stop()


def test_a_dso_signed_curtailment_crosses_two_nodes_and_its_confirmation_is_copied(
        site: Site) -> None:
    csms, dso, cso = site.csms, site.signers["dso"], site.signers["cso-operations"]
    station_signer = site.signers[STATION]

    def signed(by: Signer, payload: dict[str, Any], action: str = "SetChargingProfile",
               message_type: int = 2) -> dict[str, str]:
        return by.sign(json.dumps(payload).encode(), OCPPAction=action,
                       OCPPMessageTypedId=message_type)

    curtail = signed(dso, curtailment())
    accepted = {"status": "Accepted"}
    refused: dict[str, tuple[str, Any, str]] = {
        "unsigned": ("SetChargingProfile", curtailment(), CURTAIL_RULE),
        "operator-signed": ("SetChargingProfile-Signed", signed(cso, curtailment()),
                            CURTAIL_RULE),
        "replayed": ("SetChargingProfile-Signed", curtail, CURTAIL_RULE),
        "tampered-limit": ("SetChargingProfile-Signed",
                           dict(curtail, payload=signed(dso, curtailment(limit_w=0.0))[
                               "payload"]), CURTAIL_RULE),
        "unsigned-tx-default": ("SetChargingProfile", curtailment("TxDefaultProfile"),
                                OPERATOR_RULE),
    }
    received: list[list[Any]] = []
    unsigned_answer = {"unsigned-answer"}

    async def answer(ws: ClientConnection) -> None:
        async for text in ws:
            frame = json.loads(text)
            received.append(frame)
            if frame[0] != 2:
                continue
            if frame[1] in unsigned_answer:
                await ws.send(json.dumps([3, frame[1], accepted]))
            else:  # chapter 7: a signed request gets a signed answer
                await ws.send(json.dumps([3, frame[1], signed(
                    station_signer, accepted, "SetChargingProfile", 3)]))

    async def scenario() -> None:
        async with connect(site.edge.url(STATION),
                           subprotocols=[Subprotocol("ocpp2.1")]) as ws:
            reader = asyncio.ensure_future(answer(ws))
            send = asyncio.to_thread
            try:
                boot = {"chargingStation": {"model": "Wallbox-14a", "vendorName": "V"},
                        "reason": "PowerUp"}
                await ws.send(json.dumps([2, "boot-1", "BootNotification", boot]))
                await send(csms.wait_for_call, STATION, "BootNotification")
                # 1. the DSO's curtailment reaches the station unchanged; its signed answer
                #    comes back to the CSMS unchanged
                await send(csms.send_raw, STATION,
                           json.dumps([2, "curtail-1", "SetChargingProfile-Signed", curtail]))
                got = await send(csms.wait_for_answer, STATION, "curtail-1")
                assert got[:2] == [3, "curtail-1"] and got[2]["protected"], got
                # 2. what the edge refuses, each answered SecurityError naming its rule
                for what, (action, payload, rule) in refused.items():
                    await send(csms.send_raw, STATION, json.dumps([2, what, action, payload]))
                    got = await send(csms.wait_for_answer, STATION, what)
                    assert got[:3] == [4, what, "SecurityError"], (what, got)
                    assert rule in got[3], (what, got)
                # 3. an operator-signed TxDefaultProfile passes; an unsigned answer to a
                #    signed command does not reach the CSMS as an answer
                tx_default = signed(cso, curtailment("TxDefaultProfile", 11000.0))
                await send(csms.send_raw, STATION, json.dumps(
                    [2, "tx-default", "SetChargingProfile-Signed", tx_default]))
                got = await send(csms.wait_for_answer, STATION, "tx-default")
                assert got[0] == 3, got
                await send(csms.send_raw, STATION, json.dumps(
                    [2, "unsigned-answer", "SetChargingProfile-Signed",
                     signed(dso, curtailment(limit_w=5000.0))]))
                got = await send(csms.wait_for_answer, STATION, "unsigned-answer")
                assert got[:3] == [4, "unsigned-answer", "SecurityError"], got
                assert ANSWER_RULE in got[3], got
                # 4. the station reports the limit in force, signed: the CSMS gets it, and
                #    the transparency platform a copy, still verifiable end to end
                notice = {"chargingLimit": {"chargingLimitSource": "SO",
                                            "isGridCritical": True}, "evseId": 0}
                await ws.send(json.dumps([2, "ncl-1", "NotifyChargingLimit-Signed",
                                          signed(station_signer, notice,
                                                 "NotifyChargingLimit")]))
                await send(csms.wait_for_call, STATION, "NotifyChargingLimit-Signed")
            finally:
                reader.cancel()

    asyncio.run(scenario())

    # the station saw the curtailment and the two other signed commands, as the DSO and the
    # operator signed them, and nothing the edge refused
    calls = [f for f in received if f[0] == 2]
    assert [f[1] for f in calls] == ["curtail-1", "tx-default", "unsigned-answer"]
    assert calls[0] == [2, "curtail-1", "SetChargingProfile-Signed", curtail]
    copy = site.transparency.wait_for_call(STATION, "NotifyChargingLimit-Signed", timeout=20)
    assert copy.payload["protected"] and copy.payload["signature"]
    original = site.csms.calls(STATION, "NotifyChargingLimit-Signed")[0]
    assert copy.payload == original.payload  # the station's signature, untouched
    # every refusal is in the edge's audit log with its rule
    audit = audit_lines(site.edge.config_path.parent / "state" / "audit.jsonl")
    rejected = {(a["message_id"], a["rule"]) for a in audit if a["outcome"] == "reject"}
    assert {(what, rule) for what, (_, _, rule) in refused.items()} <= rejected
    assert ("unsigned-answer", ANSWER_RULE) in rejected
