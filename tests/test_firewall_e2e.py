"""The OCPP firewall end to end: a real node process between ocpp-package peers.

Keys are made with ``ocpp-router keys new`` and payloads signed with ``ocpp-router
sign``, as an operator would. The CSMS is the ``ocpp`` package; it sends the Resets as
raw frames because the package (rightly) refuses to send a payload with a member its
schema does not know.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from policies import VerifiedSignature, verify_signatures
from router.relay.gate import audit_lines
from tests.nodeproc import NodeProcess, start_node
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station

ROOT = Path(__file__).resolve().parent.parent
ADMIN_RULE = "admin commands need an admin signature"


def cli(*args: str, stdin: str = "", cwd: Path = ROOT) -> str:
    done = subprocess.run([sys.executable, "-m", "router", *args], input=stdin,
                          capture_output=True, text=True, cwd=cwd, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Csms, NodeProcess, Path]]:
    directory = tmp_path_factory.mktemp("firewall")
    admin = cli("keys", "new", "--out", str(directory / "admin.pem")).strip()
    viewer = cli("keys", "new", "--out", str(directory / "viewer.pem")).strip()
    node_kid = cli("keys", "new", "--out", str(directory / "node.pem")).strip()
    (directory / "node.kid").write_text(node_kid)
    (directory / "policy.toml").write_text(f"""
default = "forward"

[[keys]]
id = "ops"
public_key = "{admin}"
roles = ["admin"]

[[keys]]
id = "viewer"
public_key = "{viewer}"
roles = ["viewer"]

[[rules]]
name = "{ADMIN_RULE}"
actions = ["Reset", "RequestStartTransaction"]
direction = "to-station"
sources = ["*"]
require = {{ roles = ["admin"], count = 1, max_age_s = 300 }}
then = "forward"

[[rules]]
name = "data transfers need a signature"
actions = ["DataTransfer"]
direction = "from-station"
require = {{ roles = ["admin"], count = 1, max_age_s = 300 }}
then = "forward"

[[rules]]
name = "meter values are countersigned"
actions = ["MeterValues"]
direction = "from-station"
then = "forward"
sign = true
""")
    with Csms(accept_signatures=True) as csms:
        config = f"""
[node]
id = "firewall"
key = "node.pem"
call_timeout_s = 10

[listen]
port = 0
security_profile = 0

[[stations]]
match = "*"

[[backends]]
name = "main"
url = "{csms.url}"
keep_signatures = true

[policy]
file = "policy.toml"
"""
        (directory / "node.toml").write_text(config)
        node = start_node(config, directory, env=node_env())
        try:
            yield csms, node, directory
        finally:
            node.stop()


def signed(directory: Path, key: str, payload: dict[str, Any]) -> dict[str, Any]:
    out = cli("sign", "--key", str(directory / key), "--action", "Reset",
              "--direction", "to-station", stdin=json.dumps(payload))
    result: dict[str, Any] = json.loads(out)
    return result


def test_signature_policy_end_to_end(setup: tuple[Csms, NodeProcess, Path]) -> None:
    csms, node, directory = setup
    identity = "FW-STATION-1"
    reset = {"type": "Immediate"}
    admin_reset = signed(directory, "admin.pem", reset)
    viewer_reset = signed(directory, "viewer.pem", reset)

    async def scenario() -> list[str]:
        async with open_station(node.url(identity), "2.0.1") as station:
            await station.boot()
            send = asyncio.to_thread

            # unsigned: refused at the node, the station never sees it
            await send(csms.send_raw, identity, json.dumps([2, "r-unsigned", "Reset", reset]))
            refused = await send(csms.wait_for_answer, identity, "r-unsigned")
            assert refused[:3] == [4, "r-unsigned", "SecurityError"]
            assert ADMIN_RULE in refused[3]

            # signed by an admin key: delivered (signatures removed for the standard
            # station, which validates the schema), and the station's answer comes back
            await send(csms.send_raw, identity, json.dumps([2, "r-admin", "Reset", admin_reset]))
            delivered = await send(csms.wait_for_answer, identity, "r-admin")
            assert delivered == [3, "r-admin", {"status": "Accepted"}]

            # signed by a key without the admin role: refused
            await send(csms.send_raw, identity, json.dumps([2, "r-viewer", "Reset", viewer_reset]))
            assert (await send(csms.wait_for_answer, identity, "r-viewer"))[2] == "SecurityError"

            # the admin-signed payload again: a replay, refused
            await send(csms.send_raw, identity, json.dumps([2, "r-replay", "Reset", admin_reset]))
            replay = await send(csms.wait_for_answer, identity, "r-replay")
            assert replay[2] == "SecurityError" and "replay" in replay[3].lower()

            # station MeterValues pass and reach the CSMS counter-signed by the node
            result = await station.meter(4321)
            assert result is not None
            return [c.action for c in station.commands]

    commands = asyncio.run(scenario())
    assert commands == ["Reset"]  # only the admin-signed one reached the station

    meter_frames = [json.loads(t) for t in csms.frames(identity)
                    if json.loads(t)[0] == 2 and json.loads(t)[2] == "MeterValues"]
    assert len(meter_frames) == 1
    payload = meter_frames[0][3]
    results = verify_signatures(payload, "MeterValues", "from-station", time.time())
    assert [type(r) for r in results] == [VerifiedSignature]
    assert results[0].key_id == (directory / "node.kid").read_text()

    audit = audit_lines(directory / "state" / "audit.jsonl")
    assert [(a["message_id"], a["outcome"], a["rule"]) for a in audit] == [
        ("r-unsigned", "reject", ADMIN_RULE),
        ("r-viewer", "reject", ADMIN_RULE),
        ("r-replay", "reject", ADMIN_RULE),
    ]
    assert all(a["source"] == "main" and a["action"] == "Reset" for a in audit)


garbage_signature = st.one_of(
    st.none(), st.integers(), st.text(max_size=30), st.lists(st.integers(), max_size=3),
    st.fixed_dictionaries({
        "keyId": st.one_of(st.text(max_size=40), st.binary(max_size=40).map(
            lambda b: base64.b64encode(b).decode())),
        "value": st.one_of(st.text(max_size=40), st.binary(max_size=80).map(
            lambda b: base64.b64encode(b).decode())),
        "algorithm": st.sampled_from(["secp256r1", "secp384r1", "ed25519", "rsa", ""]),
        "timestamp": st.sampled_from(["2026-11-22T10:00:00Z", "yesterday", ""]),
    }),
)


def test_garbage_signatures_are_refused_and_others_keep_being_served(
    setup: tuple[Csms, NodeProcess, Path],
) -> None:
    _, node, _ = setup
    with connect(node.url("FW-GARBAGE"), subprotocols=["ocpp2.0.1"]) as bad, \
            connect(node.url("FW-NEIGHBOUR"), subprotocols=["ocpp2.0.1"]) as good:
        counter = iter(range(10**6))

        @settings(max_examples=60, derandomize=True, deadline=None)
        @given(signatures=st.one_of(garbage_signature,
                                    st.lists(garbage_signature, max_size=4),
                                    st.just([{"keyId": "x"}] * 2000)))
        def check(signatures: Any) -> None:
            n = next(counter)
            payload = {"vendorId": "fuzz", "data": str(n), "signatures": signatures}
            bad.send(json.dumps([2, f"g{n}", "DataTransfer", payload]))
            answer = json.loads(bad.recv(timeout=10))
            assert answer[:3] == [4, f"g{n}", "SecurityError"]
            good.send(json.dumps([2, f"h{n}", "Heartbeat", {}]))
            assert json.loads(good.recv(timeout=10))[:2] == [3, f"h{n}"]

        check()
    assert node.alive()


def test_broken_policy_fails_check_with_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('default = "forward"\n\n[[rules]]\nname = "x"\n'
                                       'then = "explode"\n')
    (tmp_path / "node.toml").write_text("""
[node]
id = "n"
[listen]
security_profile = 0
[[stations]]
match = "*"
[[backends]]
name = "main"
url = "ws://127.0.0.1:9/ocpp"
[policy]
file = "bad.toml"
""")
    done = subprocess.run([sys.executable, "-m", "router", "check", "--config",
                           str(tmp_path / "node.toml")], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "bad.toml:5" in done.stderr and "then" in done.stderr
    assert "Traceback" not in done.stderr
