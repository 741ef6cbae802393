"""The live topology page (issue 17, part 2) with node processes on loopback.

A core holds the ``ocpp`` CSMS, a secondary that is down (its copies pile up in the
outbox: a backlog) and a policy that refuses Resets toward stations; two edges dial it,
one over a msgpack peer link and one over JSON. An ``ocpp`` station on each edge keeps
talking while headless Chromium opens the core's ``/topology`` with a virtual-time
budget, so the page's script (``/topology.js``) polls ``/live`` and rewrites the page.
The DOM Chromium serialises must show the three nodes, both encodings, non-zero frame
rates on both links, the refusal with its rule and the secondary's backlog; a screenshot
is saved under the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ocpp.exceptions import OCPPError

from tests.browser import chromium_binary, parse, png_size, rate_pair, run_chromium
from tests.overlay_support import PeerLink, await_log, overlay_config, routes_to, wait_log
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station
from tests.test_admin import ADMIN, AdminNode, fetch, start_admin_node

CORE, EDGE_JSON, EDGE_MSGPACK = "live-core", "live-edge-json", "live-edge-mp"
ST_JSON, ST_MSGPACK = "LIVE-J1", "LIVE-M1"
RULE = "the CSMS may not reset stations"
POLICY = f"""\
default = "forward"

[[rules]]
name = "{RULE}"
actions = ["Reset"]
direction = "to-station"
then = "reject"
"""
SECONDARY = """
[[backends]]
name = "copies"
role = "secondary"
url = "ws://127.0.0.1:1/ocpp"
subscribe = ["StatusNotification", "Heartbeat"]
"""
PACE_S = 0.1  # between one station's CALLs while the browser looks: a steady trickle
BUDGET_MS = 7000  # the page's virtual time in Chromium: several polls of /live


@dataclass
class Overlay:
    core: AdminNode
    edge_json: AdminNode
    edge_msgpack: AdminNode


@pytest.fixture(scope="module")
def overlay(csms: Csms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Overlay]:
    started: list[AdminNode] = []
    try:
        directory = tmp_path_factory.mktemp("core")
        (directory / "policy.toml").write_text(POLICY)
        core_config = (overlay_config(CORE, backend_url=csms.url,
                                      accept=[EDGE_JSON, EDGE_MSGPACK])
                       + SECONDARY + f'\n[policy]\nfile = "{directory / "policy.toml"}"\n'
                       + ADMIN)
        core = start_admin_node(core_config, directory)
        started.append(core)
        for node_id, encoding in ((EDGE_JSON, "json"), (EDGE_MSGPACK, "msgpack")):
            config = overlay_config(node_id, peers=[PeerLink.to(core.proc, CORE, encoding)])
            started.append(start_admin_node(config + ADMIN, tmp_path_factory.mktemp(node_id)))
        for edge in started[1:]:
            wait_log(edge.proc, "routes_changed", routes_to("CSMS"))
        yield Overlay(core, started[1], started[2])
    finally:
        for node in reversed(started):
            node.stop()


def test_the_live_page_in_chromium(overlay: Overlay, csms: Csms, tmp_path: Path) -> None:
    chromium = chromium_binary()  # installs Debian's chromium when missing, or skips
    asyncio.run(_live(overlay, csms, chromium, tmp_path))


async def _live(overlay: Overlay, csms: Csms, chromium: str, tmp_path: Path) -> None:
    core = overlay.core
    async with open_station(overlay.edge_json.url(ST_JSON), "1.6") as st_json, \
            open_station(overlay.edge_msgpack.url(ST_MSGPACK), "2.0.1") as st_msgpack:
        for station in (st_json, st_msgpack):
            await station.boot()
        for identity in (ST_JSON, ST_MSGPACK):
            await await_log(core.proc, "routes_changed", routes_to(identity))

        # the core's firewall refuses the CSMS's Reset, naming the rule
        with pytest.raises(OCPPError):
            await asyncio.to_thread(csms.reset, ST_JSON)
        await await_log(core.proc, "policy_reject", rule=RULE)
        # the secondary is down: its copies go to the outbox
        await st_msgpack.status(connector_id=1, status="Available")
        await await_log(core.proc, "fanout_spill", subscriber="copies")

        live = json.loads((await asyncio.to_thread(fetch, core.admin + "/live")).text)
        assert {p["id"]: p["encoding"] for p in live["peers"]} == {
            EDGE_JSON: "json", EDGE_MSGPACK: "msgpack"}
        assert all(p["frames_in"] > 0 and p["frames_out"] > 0 for p in live["peers"])

        done = asyncio.Event()

        async def chatter(station: Any) -> None:
            while not done.is_set():
                await station.heartbeat()
                await station.status(connector_id=1, status="Available")
                await asyncio.sleep(PACE_S)  # sets the pace; nothing waits on it

        talking = [asyncio.create_task(chatter(s)) for s in (st_json, st_msgpack)]
        url = core.admin + "/topology"
        budget = f"--virtual-time-budget={BUDGET_MS}"
        shot = tmp_path / "live.png"
        try:
            page = await asyncio.to_thread(run_chromium, chromium, tmp_path,
                                           [budget, "--dump-dom", url])
            await asyncio.to_thread(run_chromium, chromium, tmp_path,
                                    [budget, f"--screenshot={shot}", url])
        finally:
            done.set()
            await asyncio.gather(*talking)

    (tmp_path / "live.html").write_text(page)  # beside the screenshot, for a look
    dom = parse(page)
    # the page's script ran: it polled /live and said so
    [(status, status_text)] = dom.find("p", id="live-status")
    assert int(status["data-updates"]) >= 1, status_text
    assert status_text.startswith("live: updated ")

    nodes = {a["data-node"]: a["data-kind"] for a, _ in dom.find("g")
             if "node" in a.get("class", "").split()}
    assert nodes == {CORE: "self", EDGE_JSON: "peer", EDGE_MSGPACK: "peer"}
    assert sorted(text for _, text in dom.find("text", **{"class": "encoding"})) == [
        "json", "msgpack"]
    peers = {row[0]: row for row in dom.rows("peers")}
    assert {k: row[2] for k, row in peers.items()} == {EDGE_JSON: "json",
                                                       EDGE_MSGPACK: "msgpack"}
    assert {row[1] for row in peers.values()} == {"open"}
    # each link carries the stations' traffic: a non-zero rate both ways, on the drawing
    rates = {a["data-peer"]: rate_pair(text) for a, text in dom.find("text", **{"class": "rate"})}
    assert set(rates) == {EDGE_JSON, EDGE_MSGPACK}
    for peer, (frames_in, frames_out) in rates.items():
        assert frames_in > 0 and frames_out > 0, (peer, rates)
    [traffic] = dom.rows("traffic")
    assert traffic[1] == "2" and float(traffic[2].removesuffix("/s")) > 0

    decisions = dom.rows("decisions")
    assert [row[1:5] for row in decisions] == [["reject", RULE, "Reset", "csms"]]
    [copies] = dom.rows("secondaries")
    assert copies[0] == "copies" and int(copies[2]) > 0  # the backlog

    width, height = png_size(shot.read_bytes())
    assert (width, height) == (1200, 800)
    assert shot.stat().st_size > 10_000  # a drawing, not a blank page
