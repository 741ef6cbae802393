"""SIGHUP reloads the policy without dropping stations; a broken policy keeps the old one."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from tests.nodeproc import start_node
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station

FORWARD_RESET = 'default = "forward"\n'
REJECT_RESET = """default = "forward"

[[rules]]
name = "no resets today"
actions = ["Reset"]
direction = "to-station"
then = "reject"
"""


def test_sighup_changes_the_next_decision_without_dropping_stations(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(FORWARD_RESET)
    identity = "RELOAD-1"
    with Csms() as csms:
        config = f"""
[node]
id = "reload"
[listen]
port = 0
security_profile = 0
[[stations]]
match = "*"
[[backends]]
name = "main"
url = "{csms.url}"
[policy]
file = "policy.toml"
"""
        node = start_node(config, tmp_path, env=node_env())
        try:
            async def scenario() -> None:
                async with open_station(node.url(identity), "2.0.1") as station:
                    await station.boot()
                    send = asyncio.to_thread
                    reset = json.dumps([2, "r-1", "Reset", {"type": "Immediate"}])
                    await send(csms.send_raw, identity, reset)
                    assert (await send(csms.wait_for_answer, identity, "r-1"))[0] == 3

                    policy.write_text(REJECT_RESET)
                    node.proc.send_signal(signal.SIGHUP)
                    await send(node.wait_for_event, "reloaded")
                    await send(csms.send_raw, identity, reset.replace("r-1", "r-2"))
                    refused = await send(csms.wait_for_answer, identity, "r-2")
                    assert refused[2] == "SecurityError" and "no resets today" in refused[3]

                    policy.write_text('default = "forward"\n[[rules]]\nname = 5\n')
                    node.proc.send_signal(signal.SIGHUP)
                    failed = await send(node.wait_for_event, "reload_refused")
                    assert "policy.toml" in failed["reason"]
                    await send(csms.send_raw, identity, reset.replace("r-1", "r-3"))
                    assert (await send(csms.wait_for_answer, identity, "r-3"))[2] == "SecurityError"
                    # the station stayed connected throughout, on its first link
                    assert (await station.heartbeat()) is not None
                    assert [c.action for c in station.commands] == ["Reset"]

            asyncio.run(scenario())
            # one link for the whole test, closed only by the station itself at the end
            assert len(csms.connections(identity)) == 1
            node.wait_for_event("station_disconnected")
            assert [(e["code"], e["reason"]) for e in node.events("station_disconnected")] == [
                (1000, "station link closed")]
        finally:
            node.stop()
