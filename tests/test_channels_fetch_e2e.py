"""A 20 MiB file crosses two overlay hops (a JSON link and a msgpack link) with its
SHA-256 checked; the node in the middle is killed mid-transfer and started again, and
the fetch resumes where it stopped instead of starting over (issue 16). Real processes;
the fetch is asked for with ``ocpp-router fetch`` against the edge's admin endpoint."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import PeerLink, overlay_config, routes_to, wait_log
from tests.peers import node_env

CORE, MIDDLE, EDGE = "core-1", "middle-1", "edge-1"
SIZE = 20 * 2**20
WINDOW = 256 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_file_resumes_after_the_route_breaks(tmp_path: Path) -> None:
    served = tmp_path / "core-files"
    served.mkdir()
    content = random.Random(16).randbytes(SIZE)
    (served / "firmware").mkdir()
    (served / "firmware" / "fw-1.2.bin").write_bytes(content)
    fetched = tmp_path / "edge-files"
    middle_port = _free_port()
    nodes: list[NodeProcess] = []
    try:
        for name in ("core", "middle", "middle-again", "edge"):
            (tmp_path / name).mkdir()
        core = start_node(overlay_config(CORE, accept=[MIDDLE])
                          + f'\n[channels]\nfiles_dir = "{served}"\n',
                          tmp_path / "core", env=node_env())
        nodes.append(core)
        middle_config = overlay_config(MIDDLE, peers=[PeerLink.to(core, CORE, "json")],
                                       accept=[EDGE]).replace("port = 0",
                                                              f"port = {middle_port}")
        middle = start_node(middle_config, tmp_path / "middle", env=node_env())
        nodes.append(middle)
        edge = start_node(
            overlay_config(EDGE, peers=[PeerLink(MIDDLE, f"ws://127.0.0.1:{middle_port}/ocpp",
                                                 "msgpack")])
            + f'\n[channels]\nfiles_dir = "{fetched}"\n'
            + '\n[admin]\nhost = "127.0.0.1"\nport = 0\n',
            tmp_path / "edge", env=node_env())
        nodes.append(edge)
        wait_log(edge, "routes_changed", routes_to(CORE), timeout=20)
        wait_log(core, "routes_changed", routes_to(EDGE), timeout=20)
        admin_port = edge.wait_for_event("admin_listening")["port"]
        fetch = subprocess.Popen(
            [sys.executable, "-m", "router", "fetch",
             "--admin", f"http://127.0.0.1:{admin_port}", "--node", CORE,
             "--path", "firmware/fw-1.2.bin", "--out", "fw.bin", "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **node_env()})
        part = fetched / "fw.bin.part"
        # mid-transfer: a few MiB are on the edge's disk
        _wait_for(lambda: part.exists() and part.stat().st_size >= 3 * 2**20,
                  "3 MiB to arrive")
        middle.proc.kill()
        middle.proc.wait(10)
        [lost] = wait_log(edge, "channel_closed", far_node=CORE, timeout=20)
        assert "route to core-1 lost" in lost["reason"]
        before = part.stat().st_size
        assert 0 < before < SIZE
        nodes.append(start_node(middle_config, tmp_path / "middle-again", env=node_env()))
        out, err = fetch.communicate(timeout=120)
        assert fetch.returncode == 0, err
        # one attempt cut short, then the ones asking while the middle node restarted
        assert int(out.split(" attempt(s)")[0].rsplit(" ", 1)[1]) >= 2, out
        data = (fetched / "fw.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(content).hexdigest()
        assert not part.exists()
        [done] = wait_log(edge, "fetch_done")
        assert done["received"] == SIZE  # every byte written once: none fetched twice
        closes = wait_log(core, "channel_closed", far_node=EDGE, count=2, timeout=20)
        sent = [line["bytes_out"] for line in closes]
        # the second channel started where the first one's bytes stopped arriving: what the
        # core sent in all is the file plus at most what was in flight when the route broke
        assert sent[1] == SIZE - before
        assert SIZE <= sum(sent) <= SIZE + WINDOW
        assert closes[1]["reason"] == "end of file"
        assert closes[0]["reason"] == f"route to {EDGE} lost"  # both ends saw the loss
        # a file the core does not offer: refused by it once, not asked for again
        missing = subprocess.run(
            [sys.executable, "-m", "router", "fetch",
             "--admin", f"http://127.0.0.1:{admin_port}", "--node", CORE,
             "--path", "../etc/passwd", "--out", "x.bin", "--timeout", "120"],
            capture_output=True, text=True, env={**os.environ, **node_env()}, timeout=60)
        assert missing.returncode == 1
        assert f"refused by {CORE}" in missing.stderr and "files_dir" in missing.stderr
        [failed] = wait_log(edge, "fetch_failed")
        assert failed["attempts"] == 1
    finally:
        for node in reversed(nodes):
            if node.proc.poll() is None:
                node.stop()


def test_a_fetch_outside_the_files_dir_is_refused(tmp_path: Path) -> None:
    from router.channels.files import FileProblem, resolve

    (tmp_path / "files").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "files" / "ok.bin").write_text("y")
    (tmp_path / "files" / "link").symlink_to(tmp_path / "secret")
    assert resolve(tmp_path / "files", "ok.bin").name == "ok.bin"
    for name in ("../secret", "/etc/passwd", "link", "", "missing.bin", "."):
        with pytest.raises(FileProblem):
            resolve(tmp_path / "files", name)
