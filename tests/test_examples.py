"""The ready-made examples under ``examples/`` work as their READMEs say.

* Every example directory has a README, a node config, and scripts that make its keys; in
  a temporary copy the scripts run and every node config (found by globbing) passes
  ``ocpp-router check``.
* ``chained/``: the core and the edge start as real processes from the example's configs
  (ports, CSMS URL and uplink rewritten for loopback), link, exchange signed routes, and a
  station on the edge reaches the CSMS through the core.
* ``edge-gateway/``: a station shakes hands over TLS with the certificate ``make-certs.sh``
  made, authenticates with the demo password and reaches the CSMS.
* ``firewall/``: with ``../policies/edge-gateway.toml`` the node refuses the CSMS's
  unsigned Reset, naming the rule, and audits it.
* ``high-availability/``: the zone file agrees with the config's SRV names and targets,
  and ``serve-zone.py`` answers with those records.

Waits are on log lines and server records, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.name
import dns.rdatatype
import dns.resolver
import dns.zone
import pytest

from router.config import load
from tests.example_dirs import EXAMPLES, node_configs, prepare_examples, set_key
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import routes_to, wait_log
from tests.peers import node_env
from tests.peers.ocpp_csms import Csms
from tests.peers.ocpp_station import open_station

STEP = 15.0  # upper bound for any one step (process start, link, route exchange)
PASSWORD = "demo-password"  # the stations' password in every example config

CONFIGS = [path.relative_to(EXAMPLES) for path in node_configs()]
ZONES = sorted(path.relative_to(EXAMPLES) for path in EXAMPLES.glob("*/*.zone"))


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ with every example's keys and certificates made."""
    return prepare_examples(tmp_path_factory.mktemp("examples"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **node_env()})


# --- every example ------------------------------------------------------------------------


def test_the_globs_find_the_examples() -> None:
    """The globs the tests rely on see every example directory, each with its README."""
    directories = {path.parts[0] for path in CONFIGS}
    assert {"edge-gateway", "chained", "firewall", "high-availability"} <= directories
    assert Path("high-availability/csms.example.zone") in ZONES
    for directory in sorted(EXAMPLES.iterdir()):
        if directory.is_dir() and directory.name != "policies":
            assert (directory / "README.md").is_file(), f"{directory.name}/ has no README.md"
            assert directory.name in directories, f"{directory.name}/ has no node config"
    assert not (EXAMPLES / "edge-gateway.toml").exists()


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_example_config_passes_check(examples: Path, config: Path) -> None:
    done = _cli("check", "--config", str(examples / config))
    assert done.returncode == 0, done.stderr
    assert ": ok" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr


def test_the_scripts_commit_no_secret() -> None:
    """What the scripts write (private keys, the test CA) is ignored by git, so a user who
    ran them in place cannot commit it by accident."""
    private = ["edge-gateway/pki/node-server.key", "edge-gateway/pki/site-ca.key",
               "chained/keys/core-1.pem", "chained/keys/edge-1.pem", "firewall/keys/site-fw-1.pem"]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    done = subprocess.run(["git", "check-ignore", *[f"examples/{p}" for p in private]],
                          cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=30)
    if done.returncode == 128:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    assert done.stdout.split() == [f"examples/{p}" for p in private]


# --- chained/ -------------------------------------------------------------------------------


def _admin_port(node: NodeProcess) -> int:
    return int(node.wait_for_event("admin_listening", timeout=STEP)["port"])


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=STEP) as answer:
        return json.load(answer)


def _on_loopback(text: str) -> str:
    """A node config bound to kernel-chosen loopback ports."""
    text = set_key(text, "listen", "host", '"127.0.0.1"')
    text = set_key(text, "listen", "port", "0")
    return set_key(text, "admin", "port", "0")


@pytest.fixture(scope="module")
def chained(examples: Path, csms: Csms) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """core.toml and edge.toml of chained/ running, the core in front of the test CSMS.

    The rewritten configs sit beside the originals (same relative key paths)."""
    directory = examples / "chained"
    core_text = _on_loopback((directory / "core.toml").read_text())
    core_text = set_key(core_text, "backends", "url", json.dumps(csms.url))
    started: list[NodeProcess] = []
    try:
        core = start_node(core_text, directory, env=node_env(), name="core.test.toml")
        started.append(core)
        edge_text = _on_loopback((directory / "edge.toml").read_text())
        edge_text = set_key(edge_text, "peers", "url",
                            json.dumps(f"ws://127.0.0.1:{core.port}/ocpp"))
        edge = start_node(edge_text, directory, env=node_env(), name="edge.test.toml")
        started.append(edge)
        yield core, edge
    finally:
        for node in reversed(started):
            node.stop()


def test_chained_nodes_link_and_exchange_routes(chained: tuple[NodeProcess, NodeProcess]) -> None:
    core, edge = chained
    edge.wait_for_event("peer_connected", timeout=STEP, peer="core-1", direction="out",
                        encoding="msgpack")
    core.wait_for_event("peer_connected", timeout=STEP, peer="edge-1", direction="in",
                        encoding="msgpack")
    wait_log(edge, "routes_changed", routes_to("CSMS"), timeout=STEP, peer="core-1")
    wait_log(core, "routes_changed", routes_to("edge-1"), timeout=STEP, peer="edge-1")

    # What an operator sees on the admin endpoints: each node's way to the other.
    edge_routes = {r["destination"]: r for r in _get_json(_admin_port(edge), "/routes")["routes"]}
    core_routes = {r["destination"]: r for r in _get_json(_admin_port(core), "/routes")["routes"]}
    assert edge_routes["CSMS"]["next_hop"] == "core-1"
    assert edge_routes["CSMS"]["origin"] == "core-1"
    assert core_routes["CSMS"]["local"] is True
    assert core_routes["edge-1"]["next_hop"] == "edge-1"
    # Both sides sign their routes and trust only the other's key (from make-keys.sh):
    # nothing was refused.
    assert not edge.events("announcement_rejected") and not core.events("announcement_rejected")


def test_a_station_on_the_chained_edge_reaches_the_csms(
    chained: tuple[NodeProcess, NodeProcess], csms: Csms
) -> None:
    core, edge = chained
    identity = "CS-EXAMPLE-CHAIN"
    wait_log(edge, "routes_changed", routes_to("CSMS"), timeout=STEP)

    async def scenario() -> None:
        async with open_station(edge.url(identity), "1.6", password=PASSWORD,
                                open_timeout=STEP) as station:
            boot = await station.boot(vendor="Example", model="Chained")
            assert boot.status == "Accepted"

    asyncio.run(scenario())
    edge.wait_for_event("overlay_attach", timeout=STEP, station=identity, via="core-1")
    [record] = csms.connections(identity)
    assert record.path == f"/ocpp/{identity}"
    assert [call.action for call in csms.calls(identity)] == ["BootNotification"]
    assert core.alive() and edge.alive()


# --- edge-gateway/ --------------------------------------------------------------------------


def test_edge_gateway_serves_tls_with_the_scripts_certificate(examples: Path, csms: Csms) -> None:
    """Profile 2 as the example sets it up: TLS with pki/node-server.pem, which a station
    trusting pki/site-ca.pem accepts, then Basic auth with the demo password."""
    directory = examples / "edge-gateway"
    text = _on_loopback((directory / "node.toml").read_text())
    # The example dials a wss:// CSMS on the internet; the test's CSMS is on loopback.
    text = set_key(text, "backends", "url", json.dumps(csms.url))
    node = start_node(text, directory, env=node_env(), name="node.test.toml")
    try:
        assert node.scheme == "wss"
        trust = ssl.create_default_context(cafile=str(directory / "pki" / "site-ca.pem"))
        identity = "CS-EXAMPLE-TLS"

        async def scenario() -> None:
            async with open_station(node.url(identity), "2.0.1", password=PASSWORD, ssl=trust,
                                    open_timeout=STEP) as station:
                boot = await station.boot(vendor="Example", model="Profile2")
                assert boot.status == "Accepted"

        asyncio.run(scenario())
        [record] = csms.connections(identity)
        assert record.authorization is not None and record.authorization.startswith("Basic ")
    finally:
        node.stop()


# --- firewall/ -------------------------------------------------------------------------------


def test_the_firewall_example_refuses_an_unsigned_reset(examples: Path, csms: Csms) -> None:
    """What firewall/README.md promises: the CSMS's unsigned Reset is answered with a
    SecurityError naming the rule, never reaches the station, and is audited."""
    directory = examples / "firewall"
    text = _on_loopback((directory / "node.toml").read_text())
    text = set_key(text, "backends", "url", json.dumps(csms.url))
    node = start_node(text, directory, env=node_env(), name="node.test.toml")
    identity, rule = "CS-EXAMPLE-FW", "admin commands need an admin signature"
    try:
        async def scenario() -> list[str]:
            async with open_station(node.url(identity), "2.0.1", password=PASSWORD,
                                    open_timeout=STEP) as station:
                boot = await station.boot(vendor="Example", model="Firewall")
                assert boot.status == "Accepted"
                reset = json.dumps([2, "reset-unsigned", "Reset", {"type": "Immediate"}])
                await asyncio.to_thread(csms.send_raw, identity, reset)
                answer = await asyncio.to_thread(csms.wait_for_answer, identity,
                                                 "reset-unsigned", STEP)
                assert answer[:3] == [4, "reset-unsigned", "SecurityError"], answer
                assert rule in answer[3]
                return [command.action for command in station.commands]

        assert asyncio.run(scenario()) == []
        audit = [json.loads(line) for line in
                 (directory / "state" / "audit.jsonl").read_text().splitlines()]
        assert [(a["message_id"], a["outcome"], a["rule"]) for a in audit] == [
            ("reset-unsigned", "reject", rule)]
    finally:
        node.stop()


# --- high-availability/ ---------------------------------------------------------------------


def _srv_names(config_path: Path) -> list[str]:
    cfg = load(config_path)
    return [b.srv for b in cfg.backends if b.srv] + [p.srv for p in cfg.peers if p.srv]


@pytest.mark.parametrize("zone_file", ZONES, ids=str)
def test_the_zone_file_serves_what_the_config_names(zone_file: Path) -> None:
    directory = EXAMPLES / zone_file.parent
    zone = dns.zone.from_file(str(EXAMPLES / zone_file), relativize=False)
    assert zone.origin is not None
    configs = [path for path in node_configs(directory) if _srv_names(path)]
    assert configs, f"no config in {directory.name}/ names an SRV record"
    for config_path in configs:
        cfg = load(config_path)
        # The node asks the local server that serves this zone, not the system resolver.
        assert cfg.dns.nameservers, f"{config_path.name}: no [dns] nameservers"
        for host, _port in cfg.dns.nameservers:
            assert ipaddress.ip_address(host).is_loopback, host
        for name in _srv_names(config_path):
            owner = dns.name.from_text(name)
            assert owner.is_subdomain(zone.origin), f"{name} is not in {zone.origin}"
            records = zone.get_rdataset(owner, dns.rdatatype.SRV)
            assert records is not None, f"{zone_file}: no SRV records for {name}"
            # Failover needs a second priority to go to.
            assert len({srv.priority for srv in records}) >= 2, records
            for srv in records:
                assert srv.target.is_subdomain(zone.origin), srv.target
                address = zone.get_rdataset(srv.target, dns.rdatatype.A)
                assert address is not None, f"{zone_file}: no A record for {srv.target}"


@pytest.mark.parametrize("zone_file", ZONES, ids=str)
def test_serve_zone_answers_the_srv_query(zone_file: Path) -> None:
    """The directory's serve-zone.py, on a kernel-chosen port, answers the config's SRV
    names with the zone's records and the targets' addresses."""
    directory = EXAMPLES / zone_file.parent
    server_script = directory / "serve-zone.py"
    if not server_script.exists():
        pytest.skip(f"{directory.name}/ has no serve-zone.py")
    zone = dns.zone.from_file(str(EXAMPLES / zone_file), relativize=False)
    server = subprocess.Popen(
        [sys.executable, str(server_script), "--zone", str(EXAMPLES / zone_file), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline()  # "serving <origin> from <file> on 127.0.0.1:<port>"
        assert "on 127.0.0.1:" in first, first + (server.stderr.read() if server.stderr else "")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = int(first.rsplit(":", 1)[1])
        resolver.lifetime = STEP
        for config_path in node_configs(directory):
            for name in _srv_names(config_path):
                answer = resolver.resolve(name, "SRV")
                expected = zone.get_rdataset(dns.name.from_text(name), dns.rdatatype.SRV)
                assert expected is not None
                assert {r.to_text() for r in answer} == {r.to_text() for r in expected}
                for srv in answer:
                    addresses = resolver.resolve(srv.target, "A")
                    assert {a.to_text() for a in addresses} == {
                        a.to_text() for a in zone.get_rdataset(srv.target, dns.rdatatype.A) or ()}
    finally:
        server.terminate()
        server.wait(timeout=STEP)
