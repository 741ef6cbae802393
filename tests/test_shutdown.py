"""Clean shutdown of a real node process: pending CALLs answered, close frames, exit 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.nodeproc import start_node
from tests.raw_backend import RawBackend

CONFIG = """
[node]
id = "shutdown"
call_timeout_s = 60
[listen]
port = 0
security_profile = 0
[[stations]]
match = "*"
[[backends]]
name = "main"
url = "{url}"
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_answers_pending_calls_and_closes_both_links(
    tmp_path: Path, sig: signal.Signals
) -> None:
    identity = f"SHUT-{sig.name}"
    with RawBackend() as backend:
        backend.set_answer("DataTransfer", never=True)
        node = start_node(CONFIG.format(url=backend.url), tmp_path)
        try:
            with connect(node.url(identity), subprotocols=["ocpp2.0.1"]) as station:
                # a station CALL the backend never answers, a backend CALL the station holds
                station.send('[2,"up-1","DataTransfer",{"vendorId":"x"}]')
                backend.wait_frames(identity, 1)
                backend.send(identity, '[2,"down-1","GetBaseReport",{"requestId":1,'
                                       '"reportBase":"FullInventory"}]')
                assert json.loads(station.recv(timeout=10))[1] == "down-1"
                assert node.stop(sig) == 0
                answer = json.loads(station.recv(timeout=10))
                assert answer[:3] == [4, "up-1", "InternalError"]
                assert "shutting down" in answer[3]
                with pytest.raises(ConnectionClosed):
                    station.recv(timeout=10)
                assert station.close_code == 1001
            frames = [json.loads(f) for f in backend.wait_frames(identity, 2)]
            assert frames[1][:3] == [4, "down-1", "InternalError"]
            assert backend.wait_close_frame(identity)[0] == 1001
        finally:
            node.stop(signal.SIGKILL)
    assert node.events("shutdown")
