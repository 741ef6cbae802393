"""Acceptance of the admin endpoint (issue 7: 1, 2, 3) with node processes on loopback.

* metrics: two ``ocpp`` stations (1.6 and 2.0.1) talk to the ``ocpp`` CSMS through a
  node with a policy; ``/metrics`` is parsed with prometheus_client's text parser and its
  counters are compared with the traffic (and with what the CSMS recorded).
* health: ``/healthz`` is 200 with the CSMS up, 503 naming the backend once the only
  backend is stopped, 200 again when it returns.
* topology: a three-node overlay (core with the CSMS, edges A and B); the ``/topology``
  page of two nodes is checked (SVG content) and rendered by headless Chromium, which
  saves a screenshot under the test's temporary directory.

Nodes find their admin port in the ``admin_listening`` log line (``[admin] port = 0``).
Every wait is on a condition (a log line, a record, an answer), with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser import chromium_binary, png_size, run_chromium
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import PeerLink, await_log, overlay_config, routes_to, wait_log
from tests.peers import edge_config, node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station

STEP = 10.0
ADMIN = '\n[admin]\nhost = "127.0.0.1"\nport = 0\n'
SVG = "{http://www.w3.org/2000/svg}"



@dataclass
class AdminNode:
    """A node process and the base URL of its admin endpoint."""

    proc: NodeProcess
    admin: str

    def url(self, identity: str) -> str:
        return self.proc.url(identity)

    def stop(self) -> None:
        self.proc.stop()


def start_admin_node(config_text: str, directory: Path, name: str = "node.toml") -> AdminNode:
    """Start a node whose config has ``[admin]``; wait until the endpoint listens."""
    proc = start_node(config_text, directory, env=node_env(), name=name)
    try:
        line = proc.wait_for_event("admin_listening", timeout=STEP)
    except TimeoutError:
        proc.stop()
        raise
    return AdminNode(proc, f"http://127.0.0.1:{int(line['port'])}")


@dataclass
class Reply:
    status: int
    text: str


def fetch(url: str) -> Reply:
    try:
        with urllib.request.urlopen(url, timeout=STEP) as response:
            return Reply(response.status, response.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read().decode())


async def poll(url: str, done: Callable[[Reply], bool], timeout: float = 2 * STEP) -> Reply:
    """Fetch until ``done`` holds: the health verdict is re-probed once a second."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await asyncio.to_thread(fetch, url)
        if done(reply):
            return reply
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: still {reply.status} {reply.text!r}")
        await asyncio.sleep(0.1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# --- acceptance 1: metrics after real traffic -----------------------------------------------

POLICY = """\
default = "forward"

[[rules]]
name = "ADM-201 may not authorize"
actions = ["Authorize"]
direction = "from-station"
sources = ["ADM-201"]
then = "reject"
"""


def test_metrics_match_the_traffic(csms: Csms, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    config = (edge_config(csms.url, node_id="adm-metrics")
              + f'\n[policy]\nfile = "{policy}"\n' + ADMIN)
    node = start_admin_node(config, tmp_path)
    try:
        text, refused = asyncio.run(_traffic(node, csms))
    finally:
        node.stop()
    assert refused.startswith("SecurityError")
    m = samples(text)

    # what the CSMS saw: 5 CALLs from ADM-16, 4 from ADM-201 (its Authorize was refused)
    assert len(csms.calls("ADM-16")) == 5 and len(csms.calls("ADM-201")) == 4
    from_station = 9 + 1  # station CALLs + the answer to the CSMS's Reset
    to_station = 9 + 1  # the CSMS's answers + its Reset
    assert m[("ocpp_router_frames_forwarded_total", (("direction", "from-station"),))] \
        == from_station
    assert m[("ocpp_router_frames_forwarded_total", (("direction", "to-station"),))] == to_station
    assert m[("ocpp_router_answers_forwarded_total", ())] == 10
    assert m[("ocpp_router_frame_residence_seconds_count", ())] == from_station + to_station
    assert m[("ocpp_router_node_callerrors_total", ())] == 1  # the refused Authorize
    assert m[("ocpp_router_node_callerrors_by_code_total", (("code", "SecurityError"),))] == 1
    by_action = {(dict(labels)["direction"], dict(labels)["action"]): value
                 for (name, labels), value in m.items()
                 if name == "ocpp_router_frames_by_action_total"}
    # by action, both ways add up to the totals, and the CSMS's Reset went down and back up
    assert sum(v for (d, _), v in by_action.items() if d == "from-station") == from_station
    assert sum(v for (d, _), v in by_action.items() if d == "to-station") == to_station
    assert by_action[("to-station", "Reset")] == 1 and by_action[("from-station", "Reset")] == 1
    assert m[("ocpp_router_frames_dropped_total", ())] == 0
    assert m[("ocpp_router_call_timeouts_total", ())] == 0
    assert m[("ocpp_router_stations_connected", (("where", "local"),))] == 2
    assert m[("ocpp_router_stations_rejected_total", ())] == 0
    assert m[("ocpp_router_links", (("kind", "station"), ("state", "open")))] == 2
    assert m[("ocpp_router_links", (("kind", "backend"), ("state", "open")))] == 2
    # every frame entering the node passed the firewall once: 10 + 10 + the refused CALL
    decisions = {dict(labels)["rule"] + "/" + dict(labels)["outcome"]: value
                 for (name, labels), value in m.items()
                 if name == "ocpp_router_policy_decisions_total"}
    assert decisions == {"default/forward": 20, "ADM-201 may not authorize/reject": 1}


async def _traffic(node: AdminNode, csms: Csms) -> tuple[str, str]:
    refused = ""
    async with open_station(node.url("ADM-16"), "1.6") as st16, \
            open_station(node.url("ADM-201"), "2.0.1") as st201:
        for station in (st16, st201):
            await station.boot()
            await station.heartbeat()
            await station.status(connector_id=1, status="Available")
            await station.meter(1200)
            try:
                await station.authorize("TAG-1")
            except Exception as exc:  # the ocpp package raises the CALLERROR as OCPPError
                refused = f"{type(exc).__name__}: {exc}"
        reset = await asyncio.to_thread(csms.reset, "ADM-16")
        assert reset.status == "Accepted"
        text = (await asyncio.to_thread(fetch, node.admin + "/metrics")).text
    return text, refused


# --- acceptance 2: health follows the only backend ----------------------------------------


def test_healthz_follows_the_only_backend(tmp_path: Path) -> None:
    with Csms() as backend:
        node = start_admin_node(edge_config(backend.url, node_id="adm-health") + ADMIN, tmp_path)
        try:
            asyncio.run(_health(node, backend))
        finally:
            node.stop()


async def _health(node: AdminNode, backend: Csms) -> None:
    healthz = node.admin + "/healthz"
    first = await asyncio.to_thread(fetch, healthz)  # no station yet: the CSMS is probed
    assert (first.status, first.text) == (200, "ok\n")
    async with open_station(node.url("ADM-H1"), "1.6") as station:
        await station.boot()
        assert (await asyncio.to_thread(fetch, healthz)).status == 200
        await asyncio.to_thread(backend.stop)
        await station.wait_closed(timeout=STEP)
    down = await poll(healthz, lambda r: r.status == 503)
    assert down.text.startswith("unhealthy: no backend reachable: main: 127.0.0.1:")
    await asyncio.to_thread(backend.start)  # same port
    up = await poll(healthz, lambda r: r.status == 200)
    assert up.text == "ok\n"
    async with open_station(node.url("ADM-H1"), "1.6") as station:
        assert (await station.boot()).status == "Accepted"


# --- acceptance 3: the topology page of a three-node overlay ------------------------------

CORE, EDGE_A, EDGE_B = "adm-core", "adm-edge-a", "adm-edge-b"
STATION = "ADM-OV-1"


@dataclass
class Overlay:
    core: AdminNode
    edge_a: AdminNode
    edge_b: AdminNode


@pytest.fixture(scope="module")
def overlay(csms: Csms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Overlay]:
    started: list[AdminNode] = []
    try:
        core = start_admin_node(overlay_config(CORE, backend_url=csms.url,
                                               accept=[EDGE_A, EDGE_B]) + ADMIN,
                                tmp_path_factory.mktemp("core"))
        started.append(core)
        for node_id, encoding in ((EDGE_A, "json"), (EDGE_B, "msgpack")):
            config = overlay_config(node_id, peers=[PeerLink.to(core.proc, CORE, encoding)])
            started.append(start_admin_node(config + ADMIN, tmp_path_factory.mktemp(node_id)))
        edge_a, edge_b = started[1], started[2]
        for edge in (edge_a, edge_b):
            wait_log(edge.proc, "routes_changed", routes_to("CSMS"))
        wait_log(edge_b.proc, "routes_changed", routes_to(EDGE_A))
        wait_log(edge_a.proc, "routes_changed", routes_to(EDGE_B))
        yield Overlay(core, edge_a, edge_b)
    finally:
        for node in reversed(started):
            node.stop()


def svg_of(page: str) -> ET.Element:
    start, end = page.index("<svg"), page.index("</svg>") + len("</svg>")
    return ET.fromstring(page[start:end])


def drawn_nodes(svg: ET.Element) -> dict[str, dict[str, str]]:
    return {g.attrib["data-node"]: dict(g.attrib) for g in svg.iter(f"{SVG}g")
            if "node" in g.attrib.get("class", "").split()}


def drawn_edges(svg: ET.Element) -> dict[tuple[str, str], str]:
    return {(e.attrib["data-from"], e.attrib["data-to"]): e.attrib["class"]
            for e in svg.iter(f"{SVG}line") if "data-from" in e.attrib}


def test_topology_renders_in_chromium(overlay: Overlay, tmp_path: Path) -> None:
    chromium = chromium_binary()  # installs Debian's chromium when missing, or skips
    asyncio.run(_topology(overlay, chromium, tmp_path))


async def _topology(overlay: Overlay, chromium: str, tmp_path: Path) -> None:
    async with open_station(overlay.edge_a.url(STATION), "1.6") as station:
        await station.boot()
        await await_log(overlay.core.proc, "routes_changed", routes_to(STATION))
        await await_log(overlay.edge_b.proc, "routes_changed", routes_to(STATION))

        core_page = (await asyncio.to_thread(fetch, overlay.core.admin + "/topology")).text
        core = svg_of(core_page)
        nodes = drawn_nodes(core)
        assert {k: v["data-kind"] for k, v in nodes.items()} == {
            CORE: "self", EDGE_A: "peer", EDGE_B: "peer"}
        assert nodes[EDGE_A]["data-stations"] == "1"
        assert drawn_edges(core) == {(CORE, EDGE_A): "edge link", (CORE, EDGE_B): "edge link"}
        backends = {(b.attrib["data-node"], b.attrib["data-backend"])
                    for b in core.iter(f"{SVG}g") if b.attrib.get("class") == "backend"}
        assert backends == {(CORE, "csms")}

        page = await asyncio.to_thread(fetch, overlay.edge_b.admin + "/topology")
        # no inline script: the one script element loads /topology.js from the endpoint
        assert page.status == 200 and page.text.lower().count("<script") == 1
        assert '<script src="/topology.js" defer></script>' in page.text
        edge_b = svg_of(page.text)
        nodes = drawn_nodes(edge_b)
        assert {k: v["data-kind"] for k, v in nodes.items()} == {
            EDGE_B: "self", CORE: "peer", EDGE_A: "remote"}
        assert nodes[EDGE_A]["data-stations"] == "1" and nodes[EDGE_A]["data-hops"] == "2"
        assert drawn_edges(edge_b) == {(CORE, EDGE_B): "edge link", (CORE, EDGE_A): "edge route"}
        backends = {(b.attrib["data-node"], b.attrib["data-backend"])
                    for b in edge_b.iter(f"{SVG}g") if b.attrib.get("class") == "backend"}
        assert backends == {(CORE, "CSMS")}

        url = overlay.edge_b.admin + "/topology"
        dom = await asyncio.to_thread(run_chromium, chromium, tmp_path, ["--dump-dom", url])
        shot = tmp_path / "topology.png"
        await asyncio.to_thread(run_chromium, chromium, tmp_path, [f"--screenshot={shot}", url])

    # the browser built the page's SVG: the nodes are in the DOM it serialised
    assert "<svg" in dom
    for node_id in (CORE, EDGE_A, EDGE_B):
        assert f'data-node="{node_id}"' in dom
    width, height = png_size(shot.read_bytes())
    assert (width, height) == (1200, 800)
    assert shot.stat().st_size > 10_000  # a drawing, not a blank page


def test_routes_and_links_of_a_running_node(overlay: Overlay) -> None:
    routes = json.loads(fetch(overlay.edge_b.admin + "/routes").text)["routes"]
    by = {r["destination"]: r for r in routes}
    assert by["CSMS"]["next_hop"] == CORE and by["CSMS"]["path"] == [CORE]
    assert by[EDGE_A]["path"] == [EDGE_A, CORE] and by[EDGE_A]["distance"] == 2
    assert by[EDGE_B]["local"] is True
    links = json.loads(fetch(overlay.edge_b.admin + "/links").text)
    assert [(p["id"], p["encoding"], p["state"]) for p in links["peers"]] == [
        (CORE, "msgpack", "open")]

    for command in ("routes", "links"):
        done = subprocess.run([sys.executable, "-m", "router", command, "--admin",
                               overlay.edge_b.admin], capture_output=True, text=True,
                              timeout=STEP, env={**os.environ, **node_env()}, check=False)
        assert done.returncode == 0, done.stderr
        if command == "routes":
            line = next(x for x in done.stdout.splitlines() if x.startswith("CSMS "))
            assert line.split()[:3] == ["CSMS", CORE, "1"]
        else:
            assert any(x.split()[:3] == [CORE, "open", "msgpack"]
                       for x in done.stdout.splitlines())
