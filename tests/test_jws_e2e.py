"""OCPP 2.1 Signed Messages through a real node (issue 14, acceptance 1 and 2): the
``ocpp``-package CSMS sends ``Reset-Signed`` frames to a 2.1 station through the node,
whose policy requires an admin certificate for Reset. The JWS are made by hand with
``cryptography`` (tests/test_policies_jws.py), not by the node's JOSE library."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from router.relay.gate import audit_lines
from tests.nodeproc import NodeProcess, start_node
from tests.peers import edge_config, node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station
from tests.test_policies_jws import Signer

RULE = "resets need an admin certificate"
STATION = "JWS-CS-1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Csms, NodeProcess, Path,
                                                                      dict[str, Signer]]]:
    directory = tmp_path_factory.mktemp("jws")
    signers = {"ops-es": Signer("ES256", "ops-es"), "ops-rs256": Signer("RS256", "ops-rs256"),
               "ops-rs384": Signer("RS384", "ops-rs384"), "viewer": Signer("ES256", "viewer")}
    keys = ""
    for name, signer in signers.items():
        (directory / f"{name}.pem").write_bytes(signer.pem)
        role = "viewer" if name == "viewer" else "admin"
        keys += f'[[keys]]\nid = "{name}"\ncertificate = "{name}.pem"\nroles = ["{role}"]\n\n'
    (directory / "policy.toml").write_text(f'''default = "forward"

{keys}
[[rules]]
name = "{RULE}"
actions = ["Reset"]
direction = "to-station"
require = {{ roles = ["admin"] }}
then = "forward"
''')
    with Csms() as csms:
        config = edge_config(csms.url, node_id="jws-node", call_timeout_s=10) + (
            '\n[policy]\nfile = "policy.toml"\n')
        node = start_node(config, directory, env=node_env())
        try:
            yield csms, node, directory, signers
        finally:
            node.stop()


def test_signed_resets_end_to_end(
        site: tuple[Csms, NodeProcess, Path, dict[str, Signer]]) -> None:
    csms, node, directory, signers = site
    admin = signers["ops-es"]
    valid = admin.reset()
    tampered = dict(admin.reset())
    tampered["payload"] = base64.urlsafe_b64encode(b'{"type":"OnIdle"}').rstrip(b"=").decode()
    alg_none = dict(admin.reset())
    alg_none["protected"] = base64.urlsafe_b64encode(json.dumps({
        "alg": "none", "x5t#S256": admin.x5t, "OCPPAction": "Reset",
        "OCPPMessageTypedId": 2}).encode()).rstrip(b"=").decode()
    alg_none["signature"] = ""
    refused: dict[str, tuple[str, Any]] = {
        "unsigned": ("Reset", {"type": "Immediate"}),
        "tampered": ("Reset-Signed", tampered),
        "no-role": ("Reset-Signed", signers["viewer"].reset()),
        "alg-none": ("Reset-Signed", alg_none),
        "other-action": ("Reset-Signed", admin.reset(OCPPAction="UnlockConnector")),
        "replay": ("Reset-Signed", valid),  # sent after the valid one
    }
    received: list[list[Any]] = []

    async def station() -> None:
        async with connect(node.url(STATION), subprotocols=["ocpp2.1"]) as ws:  # type: ignore[list-item]
            await asyncio.to_thread(csms.wait_for, lambda: csms.is_connected(STATION) or None)
            send = asyncio.to_thread

            async def answer_calls() -> None:
                async for text in ws:
                    frame = json.loads(text)
                    received.append(frame)
                    await ws.send(json.dumps([3, frame[1], {"status": "Accepted"}]))

            reader = asyncio.ensure_future(answer_calls())
            try:
                for n, signer in enumerate(("ops-es", "ops-rs256", "ops-rs384")):
                    payload = valid if n == 0 else signers[signer].reset()
                    await send(csms.send_raw, STATION,
                               json.dumps([2, f"ok-{signer}", "Reset-Signed", payload]))
                    answer = await send(csms.wait_for_answer, STATION, f"ok-{signer}")
                    assert answer == [3, f"ok-{signer}", {"status": "Accepted"}], signer
                for what, (action, payload) in refused.items():
                    await send(csms.send_raw, STATION, json.dumps([2, what, action, payload]))
                    answer = await send(csms.wait_for_answer, STATION, what)
                    assert answer[:3] == [4, what, "SecurityError"], (what, answer)
                    assert RULE in answer[3], (what, answer)
            finally:
                reader.cancel()

    asyncio.run(station())
    # the station saw the three valid ones, unchanged (end-to-end verifiable), nothing else
    assert [f[1] for f in received] == ["ok-ops-es", "ok-ops-rs256", "ok-ops-rs384"]
    assert received[0] == [2, "ok-ops-es", "Reset-Signed", valid]
    audit = audit_lines(directory / "state" / "audit.jsonl")
    assert [(a["message_id"], a["outcome"], a["rule"]) for a in audit] == [
        (what, "reject", RULE) for what in refused]


def test_a_16_station_gets_the_plain_command_and_its_answer_goes_back(
        site: tuple[Csms, NodeProcess, Path, dict[str, Signer]]) -> None:
    """signed_messages defaults to unwrap for OCPP 1.6, which has no Signed Messages: the
    ``ocpp``-package station (it validates the schema) gets a plain Reset it can act on."""
    csms, node, _, signers = site
    signed = signers["ops-es"].sign(json.dumps({"type": "Hard"}).encode(), OCPPAction="Reset",
                                    OCPPMessageTypedId=2)

    async def scenario() -> list[str]:
        async with open_station(node.url("JWS-16"), "1.6") as station:
            await station.boot()
            await asyncio.to_thread(csms.send_raw, "JWS-16",
                                    json.dumps([2, "r16", "Reset-Signed", signed]))
            answer = await asyncio.to_thread(csms.wait_for_answer, "JWS-16", "r16")
            assert answer == [3, "r16", {"status": "Accepted"}]
            return [c.action for c in station.commands]

    assert asyncio.run(scenario()) == ["Reset"]
