"""Tunnels end to end with real processes: a pymodbus client reads and writes a site
meter's holding registers through a tunnel listener on a core node, the core, and an edge
node that dialled it (a msgpack link and a JSON link); an edge refuses a target it does
not allow and an unsigned open its policy guards (issue 16)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from router.relay.gate import audit_lines
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import PeerLink, overlay_config, routes_to, wait_log, write_node_key
from tests.peers import node_env
from tests.peers.modbus_meter import INITIAL, ModbusMeter, modbus_meter

CORE = "core-1"
EDGE_MSGPACK = "edge-7"
EDGE_JSON = "edge-8"
EDGE_GUARDED = "edge-9"

GUARD_POLICY = """\
default = "forward"

[[keys]]
id = "ops"
public_key = "{public}"
roles = ["admin"]

[[keys]]
id = "core"
public_key = "{core_public}"
roles = ["admin"]

[[rules]]
name = "channel opens need an admin signature"
actions = ["ChannelOpen"]
direction = "to-station"
require = {{ roles = ["admin"], count = 1, max_age_s = 300 }}
then = "forward"
"""


# the core signs the opens of one tunnel with its node key
CORE_POLICY = """\
default = "forward"

[[rules]]
name = "signed tunnel"
actions = ["ChannelOpen"]
direction = "to-station"
sources = ["signed-9"]
sign = true
then = "forward"
"""


def _tunnel(name: str, node: str, target: str) -> str:
    return (f'\n[[tunnels]]\nname = "{name}"\nlisten = "127.0.0.1:0"\n'
            f'node = "{node}"\ntarget = "{target}"\n')


def _allow(*targets: str) -> str:
    listed = ", ".join(f'"{t}"' for t in targets)
    return f"\n[channels]\nallow_targets = [{listed}]\n"


@dataclass
class Site:
    core: NodeProcess
    edges: dict[str, NodeProcess]
    meter: ModbusMeter
    ports: dict[str, int]  # tunnel name -> port on the core
    audit: Path  # the core's audit log
    edge_audit: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    started: list[NodeProcess] = []
    with modbus_meter() as meter:
        try:
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))  # bound, never listening: nothing answers there
            not_allowed = f"127.0.0.1:{closed.getsockname()[1]}"
            core_dir = tmp_path_factory.mktemp("core")
            _core_key, core_private, core_public = write_node_key(core_dir, CORE)
            (core_dir / "policy.toml").write_text(CORE_POLICY)
            core = start_node(
                overlay_config(CORE, accept=[EDGE_MSGPACK, EDGE_JSON, EDGE_GUARDED],
                               key=core_private)
                + '\n[policy]\nfile = "policy.toml"\n'
                + '\n[admin]\nhost = "127.0.0.1"\nport = 0\n'
                + _tunnel("meter-7", EDGE_MSGPACK, meter.target)
                + _tunnel("meter-8", EDGE_JSON, meter.target)
                + _tunnel("forbidden-7", EDGE_MSGPACK, not_allowed)
                + _tunnel("guarded-9", EDGE_GUARDED, meter.target)
                + _tunnel("signed-9", EDGE_GUARDED, meter.target),
                core_dir, env=node_env())
            started.append(core)
            edges = {}
            for node_id, encoding in ((EDGE_MSGPACK, "msgpack"), (EDGE_JSON, "json")):
                edges[node_id] = start_node(
                    overlay_config(node_id, peers=[PeerLink.to(core, CORE, encoding)])
                    + _allow(meter.target)
                    + ("idle_timeout_s = 2\n" if node_id == EDGE_JSON else ""),
                    tmp_path_factory.mktemp(node_id), env=node_env())
                started.append(edges[node_id])
            guarded_dir = tmp_path_factory.mktemp(EDGE_GUARDED)
            _key, _private, public = write_node_key(guarded_dir, "ops")
            (guarded_dir / "policy.toml").write_text(
                GUARD_POLICY.format(public=public, core_public=core_public))
            edges[EDGE_GUARDED] = start_node(
                overlay_config(EDGE_GUARDED, peers=[PeerLink.to(core, CORE, "json")])
                + _allow(meter.target) + '\n[policy]\nfile = "policy.toml"\n',
                guarded_dir, env=node_env())
            started.append(edges[EDGE_GUARDED])
            for node_id in edges:
                wait_log(core, "routes_changed", routes_to(node_id), timeout=20)
            ports = {line["tunnel"]: line["port"] for line in core.events("tunnel_listening")}
            yield Site(core, edges, meter, ports, core_dir / "state" / "audit.jsonl",
                       guarded_dir / "state" / "audit.jsonl")
        finally:
            for node in reversed(started):
                node.stop()
            closed.close()


@pytest.mark.parametrize(("tunnel", "edge", "encoding"), [
    ("meter-7", EDGE_MSGPACK, "msgpack"), ("meter-8", EDGE_JSON, "json")])
def test_modbus_reads_and_writes_cross_the_overlay(site: Site, tunnel: str, edge: str,
                                                   encoding: str) -> None:
    register = 10 if encoding == "msgpack" else 20
    client = ModbusTcpClient("127.0.0.1", port=site.ports[tunnel], timeout=10, retries=0)
    assert client.connect()
    try:
        first = client.read_holding_registers(register, count=3, device_id=1)
        assert not first.isError() and first.registers == [INITIAL] * 3
        written = client.write_registers(register, [1234, 5678], device_id=1)
        assert not written.isError()
        again = client.read_holding_registers(register, count=3, device_id=1)
        assert again.registers == [1234, 5678, INITIAL]
    finally:
        client.close()
    opened = wait_log(site.edges[edge], "channel_opened", far_node=CORE, target=site.meter.target)
    assert opened
    [closed] = wait_log(site.core, "channel_closed", channel=tunnel)
    # a read request is 12 bytes, its answer 15; a write of two registers 17, its answer 12
    assert closed["bytes_out"] == 12 + 17 + 12 and closed["bytes_in"] == 15 + 12 + 15
    entries = [e for e in audit_lines(site.audit) if e.get("channel") == tunnel]
    assert [e["event"] for e in entries] == ["channel_opened", "channel_closed"]
    assert entries[1]["bytes_out"] == closed["bytes_out"]


def _closed_by_far_end(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01")
        return client.recv(100)


def test_a_target_the_edge_does_not_allow_is_refused(site: Site) -> None:
    assert _closed_by_far_end(site.ports["forbidden-7"]) == b""
    [refusal] = wait_log(site.core, "channel_refused", channel="forbidden-7")
    assert refusal["refused_by"] == EDGE_MSGPACK
    assert "allow_targets" in refusal["reason"]
    [served] = wait_log(site.edges[EDGE_MSGPACK], "channel_refused", far_node=CORE)
    assert "allow_targets" in served["reason"]


def test_a_policy_requiring_a_role_signature_refuses_an_unsigned_open(site: Site) -> None:
    assert _closed_by_far_end(site.ports["guarded-9"]) == b""
    [refusal] = wait_log(site.core, "channel_refused", channel="guarded-9")
    assert refusal["refused_by"] == EDGE_GUARDED
    assert "channel opens need an admin signature" in refusal["reason"]
    [decision] = wait_log(site.edges[EDGE_GUARDED], "policy_reject", action="ChannelOpen")
    assert decision["source"] == CORE and decision["direction"] == "to-station"
    assert any(e.get("event") == "channel_refused" for e in audit_lines(site.edge_audit))


def test_metrics_count_channels_and_their_bytes(site: Site) -> None:
    client = ModbusTcpClient("127.0.0.1", port=site.ports["meter-7"], timeout=10, retries=0)
    assert client.connect()
    try:
        assert client.read_holding_registers(0, count=1, device_id=1).registers == [INITIAL]
        port = site.core.wait_for_event("admin_listening")["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        client.close()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("ocpp_router_channel")}
    assert values["ocpp_router_channels_open"] >= 1  # the one this test holds
    assert values["ocpp_router_channels_opened_total"] >= 1
    assert values['ocpp_router_channel_bytes_total{direction="out"}'] >= 12
    assert values['ocpp_router_channel_bytes_total{direction="in"}'] >= 15


def test_an_open_signed_by_a_key_with_the_role_is_let_through(site: Site) -> None:
    client = ModbusTcpClient("127.0.0.1", port=site.ports["signed-9"], timeout=10, retries=0)
    assert client.connect()
    try:
        answer = client.read_holding_registers(30, count=1, device_id=1)
        assert not answer.isError() and answer.registers == [INITIAL]
    finally:
        client.close()
    [decision] = wait_log(site.edges[EDGE_GUARDED], "channel_opened", far_node=CORE)
    assert decision["target"] == site.meter.target


def test_an_idle_channel_is_closed_at_both_ends_with_the_reason(site: Site) -> None:
    """edge-8 closes channels idle for 2 s; the tool sees its connection end."""
    with socket.create_connection(("127.0.0.1", site.ports["meter-8"]), timeout=30) as tool:
        assert tool.recv(100) == b""  # nothing sent, nothing received: closed for idling
    [edge_side] = wait_log(site.edges[EDGE_JSON], "channel_closed",
                           lambda line: line["reason"].startswith("idle"))
    assert edge_side["reason"] == "idle for 2 s"
    [core_side] = wait_log(site.core, "channel_closed",
                           lambda line: "idle" in line["reason"], channel="meter-8")
    assert core_side["reason"] == f"closed by {EDGE_JSON}: idle for 2 s"
