"""The admin endpoint in-process: a real Node (run in the test's trio loop or not run at
all) with ``serve_admin``, a raw backend and stations dialled with the node's own client.

The end-to-end acceptance tests (node subprocesses, the ``ocpp`` package, Chromium) are
in tests/test_admin.py.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import re
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from router.admin import (
    AdminApp,
    AdminBindError,
    RateMeter,
    listener_problem,
    render_svg,
    serve_admin,
    topology_model,
)
from router.admin.view import shown_url
from router.cli import admin_views as admin_cli
from router.config import parse
from router.net.dns import SrvTarget
from router.net.handshake import dial
from router.net.wslink import WsLink
from router.node import Node
from router.overlay.peer_link import PeerLink
from router.wire.frames import CALL, Frame
from tests.raw_backend import RawBackend

STEP = 10.0

CONFIG = """\
[node]
id = "adm-unit"
state_dir = "{state}"
call_timeout_s = 5

[listen]
host = "127.0.0.1"
port = 0
path = "/ocpp"
security_profile = 0

[[stations]]
match = "*"

[[backends]]
name = "main"
role = "primary"
url = "{backend}"
auth = "none"

[[backends]]
name = "copies"
role = "secondary"
url = "ws://127.0.0.1:1/ocpp"
subscribe = ["Heartbeat"]
{extra}
[admin]
host = "127.0.0.1"
port = 0
"""

# a peer link in these tests has no socket; the page asks only whether it compresses
NO_SOCKET: Any = SimpleNamespace(compressed=False)


def make_node(tmp_path: Path, backend_url: str = "ws://127.0.0.1:1/ocpp", extra: str = "") -> Node:
    text = CONFIG.format(state=tmp_path / "state", backend=backend_url, extra=extra)
    return Node(parse(text, str(tmp_path / "node.toml"), tmp_path))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str


def _fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=STEP) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                     exc.read().decode())


async def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    return await trio.to_thread.run_sync(_fetch, url, method, headers)


async def poll(url: str, done: Callable[[Reply], bool], timeout: float = STEP) -> Reply:
    """Fetch until ``done`` holds (the health verdict is cached for a second)."""
    with trio.fail_after(timeout):
        while True:
            reply = await fetch(url)
            if done(reply):
                return reply
            await trio.sleep(0.05)


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, sorted labels), parsed with prometheus_client's text parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@dataclass
class Running:
    node: Node
    backend: RawBackend
    admin: str

    def station_url(self, identity: str) -> str:
        return f"ws://127.0.0.1:{self.node.port}/ocpp/{identity}"


@pytest.fixture
async def running(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Running]:
    backend = RawBackend().start()
    try:
        node = make_node(tmp_path, backend.url)
        await nursery.start(node.run)
        port = await nursery.start(serve_admin, node)
        yield Running(node, backend, f"http://127.0.0.1:{port}")
    finally:
        await trio.to_thread.run_sync(backend.stop)


async def call(ws: WsLink, message_id: str, action: str = "Heartbeat") -> str:
    await ws.send_message(f'[2,"{message_id}","{action}",{{}}]')
    answer = await ws.get_message()
    assert isinstance(answer, str)
    return answer


# --- metrics ------------------------------------------------------------------------------


async def test_metrics_count_the_frames_stations_and_copies(running: Running) -> None:
    ws = await dial(running.station_url("CP-M1"), ["ocpp1.6"], {}, 65536)
    calls = 7
    for i in range(calls):
        assert json.loads(await call(ws, f"m{i}"))[:2] == [3, f"m{i}"]

    reply = await fetch(running.admin + "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    m = metrics(reply.text)
    assert m[("ocpp_router_frames_forwarded_total", (("direction", "from-station"),))] == calls
    assert m[("ocpp_router_frames_forwarded_total", (("direction", "to-station"),))] == calls
    assert m[("ocpp_router_answers_forwarded_total", ())] == calls
    assert m[("ocpp_router_stations_connected", (("where", "local"),))] == 1
    assert m[("ocpp_router_links", (("kind", "station"), ("state", "open")))] == 1
    assert m[("ocpp_router_links", (("kind", "backend"), ("state", "open")))] == 1
    assert m[("ocpp_router_fanout_offered_total", (("subscriber", "copies"),))] == calls
    assert m[("ocpp_router_fanout_queue_capacity", (("subscriber", "copies"),))] == 10_000
    assert m[("ocpp_router_node_callerrors_total", ())] == 0
    assert m[("ocpp_router_routes", ())] == 2  # the node's own id and "CSMS"
    assert m[("ocpp_router_info", (("node", "adm-unit"), ("version", "0.1.0")))] == 1

    # the residence histogram: one observation per forwarded frame, buckets cumulative
    assert m[("ocpp_router_frame_residence_seconds_count", ())] == 2 * calls
    assert m[("ocpp_router_frame_residence_seconds_sum", ())] > 0
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in m.items()
                     if name == "ocpp_router_frame_residence_seconds_bucket")
    assert buckets[-1] == (float("inf"), 2 * calls)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert 15 <= len(buckets) <= 40
    # the collector's pauses, by generation (a full collection surely ran by now)
    assert {dict(labels)["generation"] for (name, labels) in m
            if name == "ocpp_router_gc_pause_seconds_count"} == {"0", "1", "2"}

    await ws.aclose()
    # openmetrics for a Prometheus server that asks for it
    om = await fetch(running.admin + "/metrics",
                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


async def test_policy_decisions_are_counted_by_rule_and_outcome(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "forward"\n\n[[rules]]\nname = "no resets"\n'
                      'actions = ["Reset"]\ndirection = "to-station"\nthen = "reject"\n')
    node = make_node(tmp_path, extra=f'\n[policy]\nfile = "{policy}"\n')
    node.gate.decisions["no resets", "reject"] += 2
    node.gate.decisions["default", "forward"] += 5
    m = metrics(await asgi_text(node, "/metrics"))
    assert m[("ocpp_router_policy_decisions_total",
              (("outcome", "reject"), ("rule", "no resets")))] == 2
    assert m[("ocpp_router_policy_decisions_total",
              (("outcome", "forward"), ("rule", "default")))] == 5


# --- JSON views and the command line ------------------------------------------------------


async def test_links_and_routes_describe_the_node(running: Running) -> None:
    ws = await dial(running.station_url("CP-L1"), ["ocpp2.0.1"], {}, 65536)
    await call(ws, "l1")
    data = json.loads((await fetch(running.admin + "/links")).text)
    assert data["node"] == "adm-unit"
    [station] = data["stations"]
    assert station["identity"] == "CP-L1"
    assert station["subprotocol"] == "ocpp2.0.1"
    assert station["backend"] == "main"
    assert station["station_link"] == station["backend_link"] == "open"
    assert station["backend_target"] == f"127.0.0.1:{running.backend.port}"
    assert {b["name"]: b["stations"] for b in data["backends"]} == {"main": 1, "copies": None}
    [secondary] = data["secondaries"]
    assert secondary["name"] == "copies" and secondary["queue_capacity"] == 10_000
    assert secondary["offered"] == 1

    routes = json.loads((await fetch(running.admin + "/routes")).text)
    assert {r["destination"]: r["local"] for r in routes["routes"]} == {"CSMS": True,
                                                                      "adm-unit": True}
    await ws.aclose()


async def test_routes_and_links_commands_print_tables(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = await dial(running.station_url("CP-T1"), ["ocpp1.6"], {}, 65536)
    await call(ws, "t1")
    code = await trio.to_thread.run_sync(admin_cli.main, ["routes", "--admin", running.admin])
    out = capsys.readouterr().out
    assert code == 0
    assert "routes of adm-unit: 2 destination(s)" in out
    assert "DESTINATION" in out and "NEXT HOP" in out
    assert any(line.split()[:2] == ["CSMS", "(local)"] for line in out.splitlines())

    code = await trio.to_thread.run_sync(admin_cli.main, ["links", "--admin",
                                                          running.admin.removeprefix("http://")])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("CP-T1"))
    assert row.split()[:4] == ["CP-T1", "local", "ocpp1.6", "main"]
    assert "secondaries (1)" in out
    await ws.aclose()


def test_commands_say_what_went_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    assert admin_cli.main(["routes", "--admin", "http://127.0.0.1:1", "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ocpp-router: cannot reach the admin endpoint at http://127.0.0.1:1/")
    assert "\n" not in err
    assert admin_cli.main(["links", "--admin", "ftp://example.org"]) == 2
    assert "expected a URL like http://" in capsys.readouterr().err


def test_table_aligns_columns() -> None:
    text = admin_cli.table(["A", "NUMBER"], [["x", 5], ["longer", 1234]])
    assert text.splitlines() == ["A       NUMBER", "------  ------", "x            5",
                                 "longer    1234"]


# --- health -------------------------------------------------------------------------------


async def test_healthz_follows_the_backend(running: Running) -> None:
    ws = await dial(running.station_url("CP-H1"), ["ocpp1.6"], {}, 65536)
    await call(ws, "h1")
    reply = await fetch(running.admin + "/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")

    # closes the station's backend link, so the node closes the station
    await trio.to_thread.run_sync(running.backend.stop)
    with trio.fail_after(STEP):
        while running.node.sessions.local:
            await trio.sleep(0.02)
    down = await poll(running.admin + "/healthz", lambda r: r.status == 503)
    assert down.text.startswith("unhealthy: no backend reachable: main: 127.0.0.1:")
    assert "refused" in down.text

    head = await fetch(running.admin + "/healthz", method="HEAD")
    assert head.status == 503 and head.text == ""


async def test_healthz_without_a_listener(tmp_path: Path) -> None:
    node = make_node(tmp_path)  # never run: nothing bound
    assert listener_problem(node) == "listener down: the station listener is not bound"
    status, body = await asgi(node, "/healthz")
    assert status == 503
    assert body.decode() == "unhealthy: listener down: the station listener is not bound\n"


async def test_a_chained_node_is_healthy_while_a_peer_offers_csms(tmp_path: Path) -> None:
    text = CONFIG.format(state=tmp_path / "s", backend="x", extra="").split("[[backends]]")[0]
    text += '[[peers]]\nid = "core"\nurl = "ws://127.0.0.1:1/ocpp"\n'
    node = Node(parse(text, "chained.toml", tmp_path))
    node.listener.port = 1  # as if bound
    status, body = await asgi(node, "/healthz")
    assert status == 503
    assert b"no connected peer offers a route to CSMS" in body
    node.overlay.links["core"] = PeerLink(node.overlay, "core", NO_SOCKET, "json",
                                          node.overlay.new_exchange("core"))
    node.overlay.table.learn("core", "CSMS", ("core",), 0, 1, "core", 1, float("inf"))
    app = AdminApp(node)  # a new app: the verdict above is cached for a second
    assert (await asgi(node, "/healthz", app=app))[0] == 200


async def test_srv_backends_are_probed_at_their_targets(tmp_path: Path) -> None:
    backend = RawBackend().start()
    try:
        text = CONFIG.format(state=tmp_path / "s", backend="x", extra="").replace(
            'url = "x"\n', 'srv = "_ocpp._tcp.csms.test"\n')
        node = Node(parse(text, "srv.toml", tmp_path))
        node.listener.port = 1  # as if bound
        targets = [SrvTarget(0, 0, "127.0.0.1", 1), SrvTarget(1, 0, "127.0.0.1", backend.port)]

        async def resolve(name: str) -> list[SrvTarget]:
            assert name == "_ocpp._tcp.csms.test"
            return targets

        node.dns.targets = resolve  # type: ignore[method-assign]
        node.dns.cached_until = lambda name: trio.current_time() + 30  # type: ignore[method-assign]
        assert (await asgi(node, "/healthz"))[0] == 200  # the second target answers
        m = metrics(await asgi_text(node, "/metrics"))
        valid = m[("ocpp_router_srv_answer_valid_seconds", (("name", "_ocpp._tcp.csms.test"),))]
        assert 29 < valid < 31

        targets = targets[:1]
        status, body = await asgi(node, "/healthz", app=AdminApp(node))
        assert status == 503
        assert body.decode().startswith("unhealthy: no backend reachable: main: 127.0.0.1:1: ")
    finally:
        await trio.to_thread.run_sync(backend.stop)


# --- topology -----------------------------------------------------------------------------


def _overlay_node(tmp_path: Path, extra: str = "") -> Node:
    node = make_node(tmp_path, extra='\n[[peers]]\nid = "core"\nurl = "ws://127.0.0.1:1/ocpp"\n'
                                     '\n[[peers]]\nid = "spare"\n'
                                     'url = "ws://127.0.0.1:1/ocpp"\n' + extra)
    overlay = node.overlay
    overlay.links["core"] = PeerLink(overlay, "core", NO_SOCKET, "msgpack",
                                     overlay.new_exchange("core"))
    inf = float("inf")
    table = overlay.table
    table.learn("core", "core", ("core",), 0, 1, "core", 1, inf)
    table.learn("core", "CSMS", ("core",), 0, 1, "core", 1, inf)
    table.learn("core", "edge-b", ("edge-b", "core"), 0, 1, "edge-b", 1, inf)
    table.learn("core", "ST-1", ("edge-b", "core"), 0, 1, "edge-b", 1, inf)
    table.learn("core", "ST-2", ("edge-b", "core"), 0, 1, "edge-b", 1, inf)
    return node


def test_topology_draws_nodes_links_backends_and_stations(tmp_path: Path) -> None:
    node = _overlay_node(tmp_path)
    svg = ET.fromstring(render_svg(topology_model(node)))
    ns = "{http://www.w3.org/2000/svg}"
    nodes = {g.get("data-node"): g for g in svg.iter(f"{ns}g")
             if "node" in (g.get("class") or "").split()}
    assert set(nodes) == {"adm-unit", "core", "spare", "edge-b"}
    assert {k: g.get("data-kind") for k, g in nodes.items()} == {
        "adm-unit": "self", "core": "peer", "spare": "down", "edge-b": "remote"}
    assert nodes["edge-b"].get("data-stations") == "2"
    assert nodes["edge-b"].get("data-hops") == "2"
    edges = {(e.get("data-from"), e.get("data-to")): e.get("class") for e in svg.iter(f"{ns}line")
             if e.get("data-from")}
    assert edges == {("adm-unit", "core"): "edge link", ("adm-unit", "spare"): "edge down",
                     ("core", "edge-b"): "edge route"}
    backends = {(b.get("data-node"), b.get("data-backend")) for b in svg.iter(f"{ns}g")
                if b.get("class") == "backend"}
    assert backends == {("adm-unit", "main"), ("adm-unit", "copies"), ("core", "CSMS")}
    texts = "".join(svg.itertext())
    assert "msgpack" in texts


async def test_topology_page_loads_only_its_own_script_and_escapes_names(
    tmp_path: Path,
) -> None:
    node = _overlay_node(tmp_path)
    node.overlay.table.learn("core", "<b>x</b>", ("<b>x</b>", "core"), 0, 1, "<b>x</b>", 1,
                          float("inf"))
    status, body = await asgi(node, "/topology")
    page = body.decode()
    assert status == 200
    # one script element, empty, loaded from the endpoint itself: nothing inline
    assert re.findall(r"<script[^>]*>.*?</script>", page, re.S | re.I) == [
        '<script src="/topology.js" defer></script>']
    assert page.lower().count("<script") == 1
    assert re.search(r"\son[a-z]+\s*=", page, re.I) is None  # no event handler attributes
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    start, end = page.index("<svg"), page.index("</svg>") + len("</svg>")
    ET.fromstring(page[start:end])  # well-formed
    status, body = await asgi(node, "/topology.svg")
    assert status == 200 and body.startswith(b"<svg")


async def test_every_answer_forbids_inline_scripts_framing_and_sniffing(tmp_path: Path) -> None:
    node = _overlay_node(tmp_path)
    app = AdminApp(node)
    for path in ("/topology", "/topology.js", "/topology.svg", "/live", "/links", "/nope"):
        _, headers, _ = await asgi_reply(node, path, app=app)
        policy = dict(part.strip().split(" ", 1)
                      for part in headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
        assert "unsafe" not in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
    # the page's one style block is admitted by its hash, and only it
    _, headers, body = await asgi_reply(node, "/topology", app=app)
    [style] = re.findall(r"<style>(.*?)</style>", body.decode(), re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}';" in headers["content-security-policy"]


async def test_the_page_script_is_served_and_writes_text_only(tmp_path: Path) -> None:
    status, headers, body = await asgi_reply(make_node(tmp_path), "/topology.js")
    assert status == 200
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    script = body.decode()
    assert 'fetch(liveUrl' in script and "textContent" in script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in script, sink


# --- the live picture ---------------------------------------------------------------------


def test_rates_are_counter_differences_over_a_sliding_window() -> None:
    meter = RateMeter(window_s=10.0)
    key, other = ("peer", "a", "in"), ("peer", "b", "in")
    rates, span = meter.read(100.0, {key: 5})
    assert (rates, span) == ({key: None}, None)  # one reading: no rate yet
    rates, span = meter.read(102.0, {key: 25})
    assert (rates, span) == ({key: 10.0}, 2.0)
    rates, span = meter.read(104.0, {key: 45, other: 8})  # a link that came up meanwhile
    assert (rates, span) == ({key: 10.0, other: 2.0}, 4.0)
    # after the window, the baseline is the newest reading at least 10 s old (t=102)
    rates, span = meter.read(113.0, {key: 70, other: 8})
    assert span == 11.0 and rates[key] == 45 / 11
    rates, span = meter.read(115.0, {key: 3, other: 8})  # restarted: counts from zero
    assert span == 11.0 and rates[key] == 3 / 11 and rates[other] == 0.0


def test_rate_readings_are_bounded() -> None:
    meter = RateMeter(window_s=10.0, keep=4)
    for tick in range(100):  # many lookers at once: the window shrinks, memory does not grow
        rates, span = meter.read(tick * 0.01, {("stations", "", "up"): tick})
    assert span == pytest.approx(0.03)
    assert rates[("stations", "", "up")] == pytest.approx(100.0)


async def test_live_shows_rates_encodings_backlogs_and_refusals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "forward"\n\n[[rules]]\nname = "no resets"\n'
                      'actions = ["Reset"]\ndirection = "to-station"\nthen = "reject"\n')
    node = _overlay_node(tmp_path, extra=f'\n[policy]\nfile = "{policy}"\n')
    app = AdminApp(node)
    link = node.overlay.links["core"]
    first = json.loads((await asgi(node, "/live", app=app))[1])
    assert first["rate_window_s"] is None
    assert first["peers"][0]["in_per_s"] is None

    link.frames_in, link.frames_out = 30, 12
    node.stats.frames_up, node.stats.frames_down = 8, 4
    [copies] = node.duplicator.secondaries
    copies.backlog = 17
    for number in range(3):
        frame = Frame(CALL, f"rs-{number}", action="Reset", payload={"type": "Hard"})
        verdict = node.gate.check(frame, None, "Reset", "to-station", "main", "ocpp1.6", True)
        assert not verdict.forward
    await trio.sleep(2.0)  # the mock clock jumps
    live = json.loads((await asgi(node, "/live", app=app))[1])

    assert live["node"] == "adm-unit" and live["rate_window_s"] == 2.0
    assert live["time"].endswith("Z")
    peers = {p["id"]: p for p in live["peers"]}
    assert peers["core"] == {"id": "core", "encoding": "msgpack", "state": "syncing",
                             "frames_in": 30, "frames_out": 12, "in_per_s": 15.0,
                             "out_per_s": 6.0}
    assert peers["spare"]["state"] == "down" and peers["spare"]["in_per_s"] is None
    assert live["stations"] == {"local": 0, "overlay": 0, "frames_up": 8, "frames_down": 4,
                                "up_per_s": 4.0, "down_per_s": 2.0}
    assert live["secondaries"] == [{"name": "copies", "queued": 0, "queue_capacity": 10_000,
                                    "backlog": 17, "delivered": 0, "delivered_per_s": 0.0,
                                    "dropped": 0}]
    assert {b["name"]: b["role"] for b in live["backends"]} == {"main": "primary",
                                                                "copies": "secondary"}
    firewall = live["firewall"]
    assert firewall["policy"] is True
    assert [d["rule"] for d in firewall["recent"]] == ["no resets"] * 3
    newest = firewall["recent"][0]
    assert set(newest) == {"ts", "outcome", "rule", "action", "source", "direction", "reason"}
    assert (newest["outcome"], newest["action"], newest["source"]) == ("reject", "Reset", "main")
    assert firewall["decisions"] == [{"rule": "no resets", "outcome": "reject", "count": 3}]
    topology = live["topology"]
    assert {n["id"]: n["kind"] for n in topology["nodes"]} == {
        "adm-unit": "self", "core": "peer", "spare": "down", "edge-b": "remote"}
    assert {(e["a"], e["b"]): (e["kind"], e["encoding"]) for e in topology["edges"]} == {
        ("adm-unit", "core"): ("link", "msgpack"), ("adm-unit", "spare"): ("down", None),
        ("core", "edge-b"): ("route", None)}

    # the page shows the same numbers before its script first runs
    page = (await asgi(node, "/topology", app=app))[1].decode()
    svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + len("</svg>")])
    ns = "{http://www.w3.org/2000/svg}"
    [rate] = [t for t in svg.iter(f"{ns}text") if t.get("class") == "rate"]
    assert rate.get("data-peer") == "core" and rate.text == "in 15.0/s, out 6.0/s"
    assert '<tbody id="decisions"><tr><td>' in page and '<td class="reject">reject</td>' in page


async def test_live_from_the_served_endpoint_counts_the_traffic(running: Running) -> None:
    ws = await dial(running.station_url("CP-LIVE"), ["ocpp1.6"], {}, 65536)
    for number in range(3):
        await call(ws, f"lv-{number}")
    reply = await fetch(running.admin + "/live")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    live = json.loads(reply.text)
    assert live["stations"]["local"] == 1
    assert (live["stations"]["frames_up"], live["stations"]["frames_down"]) == (3, 3)
    # serve_admin took a reading when it started, so the first look has a rate already
    assert live["rate_window_s"] is not None and live["stations"]["up_per_s"] is not None
    assert live["firewall"] == {"policy": False, "recent": [], "decisions": []}
    await ws.aclose()


# --- the HTTP surface ---------------------------------------------------------------------


async def asgi(node: Node, path: str, method: str = "GET",
               headers: list[tuple[bytes, bytes]] | None = None,
               app: AdminApp | None = None) -> tuple[int, bytes]:
    """One request straight into the ASGI app (no sockets)."""
    status, _, body = await asgi_reply(node, path, method, headers, app)
    return status, body


async def asgi_reply(node: Node, path: str, method: str = "GET",
                     headers: list[tuple[bytes, bytes]] | None = None,
                     app: AdminApp | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request into the ASGI app: status, headers (names in lower case) and body."""
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    path, _, query = path.partition("?")
    scope: Any = {"type": "http", "method": method, "path": path, "query_string": query.encode(),
                  "headers": headers or [(b"host", b"127.0.0.1:9090")],
                  "client": ("127.0.0.1", 5555)}
    await (app or AdminApp(node))(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    reply_headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], reply_headers, b"".join(m.get("body", b"") for m in sent[1:])


async def asgi_text(node: Node, path: str) -> str:
    status, body = await asgi(node, path)
    assert status == 200, body
    return body.decode()


async def test_a_refresh_that_is_not_a_plain_number_is_ignored(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    for query in ("refresh=%C2%B2", "refresh=-1", "refresh=99999", "refresh=x"):
        page = await asgi_text(node, "/topology?" + query)  # 200, not an internal error
        assert 'http-equiv="refresh"' not in page, query
    assert 'http-equiv="refresh" content="5"' in await asgi_text(node, "/topology?refresh=5")


async def test_unknown_paths_and_methods(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    status, body = await asgi(node, "/nope")
    assert status == 404 and b" /live " in body and b" /topology" in body
    assert (await asgi(node, "/live", "POST"))[0] == 405
    assert (await asgi(node, "/metrics", "POST"))[0] == 405
    assert (await asgi(node, "/reload", "GET"))[0] == 405


async def test_reload_calls_the_node_when_it_can(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    if not hasattr(Node, "reload"):
        status, body = await asgi(node, "/reload", "POST")
        assert status == 501 and b"cannot reload" in body
    calls: list[str] = []

    async def reload_ok() -> dict[str, Any]:
        calls.append("ok")
        return {"ok": True, "policy": "reloaded"}

    node.reload = reload_ok  # type: ignore[attr-defined]
    status, body = await asgi(node, "/reload", "POST")
    assert (status, calls) == (200, ["ok"])
    assert b'"policy": "reloaded"' in body

    node.reload = lambda: {"ok": False, "error": "policy.toml:3: bad"}  # type: ignore[attr-defined]
    status, body = await asgi(node, "/reload", "POST")
    assert status == 422 and b"policy.toml:3: bad" in body

    node.reload = reload_ok  # type: ignore[attr-defined]
    status, _ = await asgi(node, "/reload", "POST",
                           [(b"host", b"127.0.0.1:9090"), (b"origin", b"http://evil.example")])
    assert status == 403
    status, _ = await asgi(node, "/reload", "POST",
                           [(b"host", b"127.0.0.1:9090"), (b"origin", b"http://127.0.0.1:9090")])
    assert status == 200


async def test_reload_answers_what_the_node_did(tmp_path: Path) -> None:
    if not hasattr(Node, "reload"):
        pytest.skip("Node.reload is not there yet")
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "forward"\n')
    text = CONFIG.format(state=tmp_path / "state", backend="ws://127.0.0.1:1/ocpp",
                         extra=f'\n[policy]\nfile = "{policy}"\n')
    source = tmp_path / "node.toml"
    source.write_text(text)
    node = Node(parse(text, str(source), tmp_path))
    status, body = await asgi(node, "/reload", "POST")
    assert status == 200
    assert json.loads(body)["ok"] is True

    policy.write_text("default = \"sometimes\"\n")
    status, body = await asgi(node, "/reload", "POST")
    answer = json.loads(body)
    assert status == 422 and answer["ok"] is False
    assert "policy.toml" in answer["message"]


async def test_recent_refusals_survive_a_reload(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "forward"\n\n[[rules]]\nname = "no resets"\n'
                      'actions = ["Reset"]\ndirection = "to-station"\nthen = "reject"\n')
    text = CONFIG.format(state=tmp_path / "state", backend="ws://127.0.0.1:1/ocpp",
                         extra=f'\n[policy]\nfile = "{policy}"\n')
    source = tmp_path / "node.toml"
    source.write_text(text)
    node = Node(parse(text, str(source), tmp_path))
    frame = Frame(CALL, "rs-1", action="Reset", payload={"type": "Hard"})
    assert not node.gate.check(frame, None, "Reset", "to-station", "main", "ocpp1.6",
                               True).forward
    before = node.gate
    assert (await asgi(node, "/reload", "POST"))[0] == 200
    assert node.gate is not before
    live = json.loads((await asgi(node, "/live"))[1])
    assert [(d["rule"], d["outcome"]) for d in live["firewall"]["recent"]] == [
        ("no resets", "reject")]


async def test_serve_admin_logs_where_it_listens(tmp_path: Path, nursery: trio.Nursery) -> None:
    node = make_node(tmp_path)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("router.admin")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        port = await nursery.start(serve_admin, node)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    [record] = [r for r in seen if r.getMessage() == "admin_listening"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["host"] == "127.0.0.1" and fields["port"] == port > 0
    reply = await fetch(f"http://127.0.0.1:{port}/routes")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"


async def test_no_admin_section_serves_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    text = CONFIG.format(state=tmp_path / "s", backend="ws://127.0.0.1:1/ocpp", extra="")
    node = Node(parse(text.split("[admin]")[0], "plain.toml", tmp_path))
    assert await nursery.start(serve_admin, node) is None


async def test_a_busy_admin_port_is_reported(tmp_path: Path, nursery: trio.Nursery) -> None:
    node = make_node(tmp_path)
    port = await nursery.start(serve_admin, node)
    text = CONFIG.format(state=tmp_path / "s2", backend="ws://127.0.0.1:1/ocpp", extra="")
    other = Node(parse(text.replace("port = 0\n", f"port = {port}\n"), "busy.toml", tmp_path))
    assert other.config.admin is not None and other.config.admin.port == port
    with pytest.raises(AdminBindError) as refused:
        await nursery.start(serve_admin, other)
    assert str(refused.value).startswith(f"admin endpoint 127.0.0.1:{port}: ")



# --- Host and Origin: a DNS-rebinding page must not read or reload the node ---------------

REBOUND = [(b"host", b"attacker.example:9090")]


def allowed_node(tmp_path: Path) -> Node:
    """A node whose ``[admin]`` (the config's last section) lists ops.example.net."""
    text = CONFIG.format(state=tmp_path / "state", backend="ws://127.0.0.1:1/ocpp", extra="")
    text += 'allowed_hosts = ["ops.example.net"]\n'
    return Node(parse(text, str(tmp_path / "node.toml"), tmp_path))


@pytest.mark.parametrize("path", ["/links", "/routes", "/topology", "/metrics", "/healthz",
                                  "/live", "/topology.js", "/nope"])
async def test_a_rebound_host_is_misdirected(tmp_path: Path, path: str) -> None:
    node = make_node(tmp_path)
    status, body = await asgi(node, path, headers=REBOUND)
    assert status == 421 and body == b"misdirected request: this Host is not served here\n"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.0.0.1:9090", "10.1.2.3:80", "[::1]", "[::1]:9090", "[2001:db8::7]:9090",
    "localhost", "LocalHost:9090", "ops.example.net", "OPS.example.NET:8443"])
async def test_ip_literals_localhost_and_allowed_names_are_served(tmp_path: Path,
                                                                  host: str) -> None:
    node = allowed_node(tmp_path)
    status, body = await asgi(node, "/routes", headers=[(b"host", host.encode())])
    assert status == 200, body


@pytest.mark.parametrize("host", [
    "attacker.example", "127.0.0.1.nip.io", "localhost.attacker.example",
    "ops.example.net.attacker.example", "example.net", "evil@127.0.0.1", "127.0.0.1:9090@evil",
    "127.0.0.1/x", "[::1", "::1", "[attacker.example]", "127.1", "0x7f000001", "", " "])
async def test_other_hosts_are_misdirected(tmp_path: Path, host: str) -> None:
    node = allowed_node(tmp_path)
    status, _ = await asgi(node, "/routes", headers=[(b"host", host.encode())])
    assert status == 421


async def test_a_missing_or_repeated_host_is_misdirected(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    assert (await asgi(node, "/links", headers=[(b"accept", b"*/*")]))[0] == 421
    twice = [(b"host", b"127.0.0.1:9090"), (b"host", b"attacker.example:9090")]
    assert (await asgi(node, "/links", headers=twice))[0] == 421


async def test_a_refused_host_is_counted_and_logged_with_the_client(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    app = AdminApp(node)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("router.admin")
    logger.addHandler(handler)
    try:
        await asgi(node, "/links", headers=REBOUND, app=app)
        await asgi(node, "/routes", headers=REBOUND, app=app)
        await asgi(node, "/routes", app=app)  # served: neither counted nor logged
    finally:
        logger.removeHandler(handler)
    records = [r for r in seen if r.getMessage() == "admin_host_refused"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    fields = records[-1].fields  # type: ignore[attr-defined]
    assert fields["client"] == "127.0.0.1:5555" and fields["host"] == "attacker.example:9090"
    assert fields["path"] == "/routes" and fields["refused"] == 2
    assert app.refused["host"] == 2


async def test_reload_needs_our_host_and_a_same_origin(tmp_path: Path) -> None:
    node = allowed_node(tmp_path)
    calls: list[str] = []

    async def reload_ok() -> dict[str, Any]:
        calls.append("ok")
        return {"ok": True}

    node.reload = reload_ok  # type: ignore[attr-defined]

    async def reload(host: bytes, *origins: bytes) -> int:
        headers = [(b"host", host), *((b"origin", origin) for origin in origins)]
        return (await asgi(node, "/reload", "POST", headers))[0]

    # the rebinding page: its Origin equals the (rebound) Host, which is not ours
    assert await reload(b"attacker.example:9090", b"http://attacker.example:9090") == 421
    assert await reload(b"127.0.0.1:9090", b"null") == 403
    assert await reload(b"127.0.0.1:9090", b"http://attacker.example:9090") == 403
    assert await reload(b"127.0.0.1:9090", b"http://ops.example.net") == 403  # not this Host
    assert await reload(b"127.0.0.1:9090", b"http://127.0.0.1:9091") == 403
    assert await reload(b"127.0.0.1:9090", b"http://evil@127.0.0.1:9090") == 403
    assert await reload(b"127.0.0.1:9090", b"http://127.0.0.1:9090/") == 403
    assert await reload(b"127.0.0.1:9090", b"ftp://127.0.0.1:9090") == 403
    assert await reload(b"127.0.0.1:9090", b"") == 403
    assert await reload(b"127.0.0.1:9090", b"http://127.0.0.1:9090",
                        b"http://attacker.example") == 403
    assert calls == []
    # an operator's own browser, and scripts that send no Origin
    assert await reload(b"127.0.0.1:9090", b"http://127.0.0.1:9090") == 200
    assert await reload(b"[::1]:9090", b"http://[::1]:9090") == 200
    assert await reload(b"ops.example.net", b"https://OPS.example.net") == 200
    assert await reload(b"localhost:9090") == 200
    assert calls == ["ok"] * 4


async def test_the_served_endpoint_refuses_a_rebound_host(tmp_path: Path,
                                                         nursery: trio.Nursery) -> None:
    node = make_node(tmp_path)
    port = await nursery.start(serve_admin, node)
    base = f"http://127.0.0.1:{port}"
    reply = await fetch(base + "/links", headers={"Host": f"attacker.example:{port}"})
    assert reply.status == 421 and "misdirected" in reply.text
    reply = await fetch(base + "/reload", "POST", headers={
        "Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"})
    assert reply.status == 421
    assert (await fetch(base + "/links", headers={"Host": f"localhost:{port}"})).status == 200


async def test_fetch_needs_post_a_same_origin_and_its_parameters(tmp_path: Path) -> None:
    """``POST /fetch`` (router/channels/): a web page cannot make the node fetch files."""
    node = allowed_node(tmp_path)
    assert (await asgi(node, "/fetch", "GET"))[0] == 405
    cross = [(b"host", b"127.0.0.1:9090"), (b"origin", b"http://attacker.example")]
    assert (await asgi(node, "/fetch", "POST", cross))[0] == 403
    status, body = await asgi(node, "/fetch", "POST")
    assert status == 400 and b"node, path and out" in body


def test_urls_are_shown_without_their_credentials() -> None:
    assert shown_url("ws://user:secret@csms.example:9000/ocpp") == "ws://csms.example:9000/ocpp"
    assert shown_url("wss://csms.example/ocpp") == "wss://csms.example/ocpp"
    assert shown_url(None) is None
