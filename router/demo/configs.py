"""The demo's node configs and firewall policy, as the TOML an operator would write.

Plain functions from ports, paths and hashes to text (no I/O): the scene writes the text
into its temporary directory and loads it with the node's own config loader, so the demo
runs exactly what ``ocpp-router run --config`` would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CORE, EDGE_A, EDGE_B = "core", "edge-a", "edge-b"
EDGES = ((EDGE_A, "json"), (EDGE_B, "msgpack"))  # each edge's peer link encoding
SITES = (CORE, EDGE_A, EDGE_B)  # nodes with stations of their own
SRV_NAME = "_ocpp._tcp.csms.demo"
CSMS_HOSTS = {1: "csms-1.demo", 2: "csms-2.demo"}  # SRV priority -> target host name
SECONDARY = "analytics"
PRIMARY = "csms"
ADMIN_ROLE_KEY = "ops"
ADMIN_RULE = "resets need an admin signature"
SRV_TTL_S = 2  # short, so the demo's DNS changes would show quickly
VERSION_CYCLE = ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")


def _s(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


@dataclass(frozen=True, slots=True)
class PlannedStation:
    """One simulated station: its identity, OCPP version and the node it connects to."""

    identity: str
    version: str
    node: str


def station_plan(per_site: int) -> list[PlannedStation]:
    """``per_site`` stations at each node (the core serves a site of its own too), their
    versions cycling 1.6, 2.0.1, 2.1."""
    plan = []
    for node in SITES:
        letter = node[-1].upper() if node != CORE else "C"
        for i in range(per_site):
            plan.append(PlannedStation(f"DEMO-{letter}{i + 1}", VERSION_CYCLE[i % 3], node))
    return plan


def reset_target(plan: Sequence[PlannedStation]) -> PlannedStation:
    """The station the CSMS sends its Resets to: the first 2.x station behind the msgpack
    edge (two hops and both encodings' worth of overlay away), else the first there."""
    behind_b = [s for s in plan if s.node == EDGE_B] or list(plan)
    return next((s for s in behind_b if s.version != "ocpp1.6"), behind_b[0])


def reset_payload(version: str) -> dict[str, str]:
    """A Reset's payload in the station's OCPP version."""
    return {"type": "Soft"} if version == "ocpp1.6" else {"type": "Immediate"}


def policy_text(ops_public_key: str) -> str:
    """The core's firewall: everything flows, except a Reset without an admin signature."""
    return f"""# The demo core's firewall: everything is forwarded except a Reset toward a station,
# which needs a signature by a key with the role "admin".
default = "forward"

[[keys]]
id = {_s(ADMIN_ROLE_KEY)}
public_key = {_s(ops_public_key)}
roles = ["admin"]

[[rules]]
name = {_s(ADMIN_RULE)}
actions = ["Reset"]
direction = "to-station"
require = {{ roles = ["admin"], count = 1, max_age_s = 300 }}
then = "forward"
"""


def _trust(keys: Mapping[str, str]) -> list[str]:
    table = ", ".join(f"{_s(node)} = {_s(path)}" for node, path in sorted(keys.items()))
    return ["", "[trust]", f"nodes = {{ {table} }}"]


def core_config(*, nameserver: str, secondary_url: str, station_hash: str, peer_hash: str,
                trust: Mapping[str, str]) -> str:
    """The core: its own stations connect to it and the edges' attach over the overlay;
    it dials the CSMS found by SRV for all of them, copies status and meter values to the
    secondary, and runs the firewall."""
    lines = [
        f"# {CORE}: holds the CSMS connection for the whole overlay",
        "[node]", f"id = {_s(CORE)}", f'key = "keys/{CORE}.pem"', f'state_dir = "{CORE}-state"',
        "call_timeout_s = 10", "connect_timeout_s = 3", "shutdown_timeout_s = 2",
        "failover_grace_s = 5",
        "", "[listen]", 'host = "127.0.0.1"', "port = 0", "security_profile = 1",
        "", "[[stations]]", 'match = "DEMO-*"', f"password_hash = {_s(station_hash)}",
        "", "[[backends]]", f"name = {_s(PRIMARY)}", 'role = "primary"',
        f"srv = {_s(SRV_NAME)}", 'scheme = "ws"', 'path = "/ocpp"', 'auth = "none"',
        "", "[[backends]]", f"name = {_s(SECONDARY)}", 'role = "secondary"',
        f"url = {_s(secondary_url)}", 'auth = "none"',
        'subscribe = ["StatusNotification", "MeterValues"]', "answer_timeout_s = 5",
    ]
    for edge, _encoding in EDGES:  # accept-only: the edges dial the core
        lines += ["", "[[peers]]", f"id = {_s(edge)}", f"password_hash = {_s(peer_hash)}"]
    lines += _trust(trust)
    lines += ["", "[dns]", f"nameservers = [{_s(nameserver)}]",
              "ttl_floor_s = 1  # also how often idle links look for a better target",
              "timeout_s = 1",
              "", "[policy]", 'file = "core-policy.toml"',
              "", "[admin]", 'host = "127.0.0.1"', "port = 0"]
    return "\n".join(lines) + "\n"


def edge_config(node_id: str, *, encoding: str, core_url: str, station_hash: str,
                peer_password: str, trust: Mapping[str, str]) -> str:
    """An edge: its stations connect with Basic auth; it has no backend of its own and
    sends their traffic up its peer link to the core."""
    letter = node_id[-1].upper()
    lines = [
        f"# {node_id}: a site's gateway, chained under the core by a {encoding} peer link",
        "[node]", f"id = {_s(node_id)}", f'key = "keys/{node_id}.pem"',
        f'state_dir = "{node_id}-state"', "call_timeout_s = 10", "shutdown_timeout_s = 2",
        "", "[listen]", 'host = "127.0.0.1"', "port = 0", "security_profile = 1",
        "", "[[stations]]", f"match = {_s(f'DEMO-{letter}*')}",
        f"password_hash = {_s(station_hash)}",
        "", "[[peers]]", f"id = {_s(CORE)}", f"url = {_s(core_url)}",
        f"encoding = {_s(encoding)}", f"password = {_s(peer_password)}",
    ]
    lines += _trust(trust)
    return "\n".join(lines) + "\n"


__all__ = [
    "ADMIN_RULE", "CORE", "CSMS_HOSTS", "EDGES", "EDGE_A", "EDGE_B", "PRIMARY", "SECONDARY",
    "SITES", "SRV_NAME", "SRV_TTL_S", "PlannedStation", "core_config", "edge_config",
    "policy_text", "reset_payload", "reset_target", "station_plan",
]
