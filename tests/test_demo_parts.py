"""The demo's sans-IO parts with plain calls: the narrator, the summary line, the configs."""

from __future__ import annotations

import time
from pathlib import Path

from policies import Firewall, Outcome, SigningKey, parse_policy, sign_payload
from router.config import parse
from router.demo.configs import (
    ADMIN_RULE,
    CORE,
    EDGE_A,
    EDGE_B,
    core_config,
    edge_config,
    policy_text,
    reset_payload,
    reset_target,
    station_plan,
)
from router.demo.narrator import (
    Event,
    Narrator,
    NodeSnapshot,
    PeerState,
    SecondaryState,
    summary_line,
)
from router.passwords import hash_password

TARGETS = {1: "csms-1", 2: "csms-2"}


# --- narrator ----------------------------------------------------------------------------


def test_a_peer_link_is_told_once_from_the_end_that_dialled() -> None:
    narrator = Narrator(TARGETS)
    dialled = narrator.feed(Event(0.4, EDGE_B, "peer_connected",
                                  {"peer": CORE, "encoding": "msgpack", "direction": "out"}))
    accepted = narrator.feed(Event(0.4, CORE, "peer_connected",
                                   {"peer": EDGE_B, "encoding": "msgpack", "direction": "in"}))
    assert dialled == ["[   0.4s] edge-b    OVERLAY  peer link to core up (msgpack, "
                       "dialled by edge-b)"]
    assert accepted == []


def test_a_refusal_names_its_rule_and_reason() -> None:
    [line] = Narrator(TARGETS).feed(Event(3.2, CORE, "policy_reject", {
        "rule": ADMIN_RULE, "reason": "the message is not signed", "source": "csms",
        "action": "Reset", "direction": "to-station"}))
    assert "FIREWALL refused Reset from csms (to-station)" in line
    assert f'rule "{ADMIN_RULE}": the message is not signed' in line


def test_failovers_in_a_burst_become_one_line_once_it_is_over() -> None:
    narrator = Narrator(TARGETS, quiet_s=0.5)
    for at, station in ((9.0, "CS-2"), (9.1, "CS-1"), (9.3, "CS-3")):
        assert narrator.feed(Event(at, CORE, "backend_failover",
                                   {"station": station, "priority": 2})) == []
    assert narrator.flush(9.5) == []  # the last one is only 0.2 s old
    [line] = narrator.flush(9.8)
    assert line == ("[   9.0s] core      FAILOVER 3 station links moved to SRV priority 2 "
                    "(csms-2) within 0.3 s: CS-1, CS-2, CS-3")
    assert narrator.flush(20.0) == []  # told once
    narrator.feed(Event(15.4, CORE, "backend_failback", {"station": "CS-1", "priority": 1}))
    [back] = narrator.flush(0.0, everything=True)
    assert "FAILBACK 1 station link back on SRV priority 1 (csms-1)" in back


def test_a_long_burst_is_told_after_a_second_and_goes_on_in_a_new_line() -> None:
    narrator = Narrator(TARGETS, quiet_s=0.5)
    for n in range(12):  # one every 0.1 s: never quiet
        narrator.feed(Event(20 + n / 10, CORE, "backend_failback",
                            {"station": f"CS-{n:02d}", "priority": 1}))
        if n == 10:
            [line] = narrator.flush(21.0)
            assert "11 station links back on" in line
    [rest] = narrator.flush(30.0)
    assert "1 station link back on" in rest and "CS-11" in rest


def test_routes_tell_only_destinations_reached_for_the_first_time() -> None:
    narrator = Narrator(TARGETS)
    [first] = narrator.feed(Event(0.5, EDGE_A, "routes_changed",
                                  {"peer": CORE, "reachable": ["core", "CSMS"]}))
    [then] = narrator.feed(Event(0.6, EDGE_A, "routes_changed",
                                 {"peer": CORE, "reachable": ["CSMS", "DEMO-B1"]}))
    assert first.endswith("ROUTES   routes exchanged with core: now reaches CSMS, core")
    assert then.endswith("now reaches DEMO-B1")
    assert narrator.feed(Event(3.0, EDGE_A, "routes_changed", {
        "peer": CORE, "reachable": ["CSMS"], "destinations": ["CSMS", "X"]})) == []


def test_stations_attached_again_say_so() -> None:
    narrator = Narrator(TARGETS)
    narrator.feed(Event(1.0, CORE, "overlay_station", {"station": "A1", "target": "csms-1"}))
    [first] = narrator.flush(5.0)
    narrator.feed(Event(9.5, CORE, "overlay_station", {"station": "A1", "target": "csms-2"}))
    [again] = narrator.flush(15.0)
    assert "1 station attached over the overlay, backend links on csms-1: A1" in first
    assert "attached again (redialled)" in again and "csms-2" in again


def test_resets_tell_what_the_csms_got_back() -> None:
    narrator = Narrator(TARGETS)
    [refused] = narrator.feed(Event(2.0, "csms-1", "reset_answer", {
        "csms": "csms-1", "station": "B2", "signed": False, "error": "SecurityError",
        "description": "refused by policy rule 'x'"}))
    [done] = narrator.feed(Event(2.5, "csms-1", "reset_answer", {
        "csms": "csms-1", "station": "B2", "signed": True, "error": None, "status": "Accepted",
        "version": "2.0.1", "node": EDGE_B, "station_saw": True}))
    assert "unsigned Reset to B2 came back SecurityError: refused by policy rule 'x'" in refused
    assert "signed Reset to B2 delivered: the station (2.0.1, on edge-b) received it and " \
           "answered Accepted" in done


def test_a_csms_coming_back_is_told_only_after_it_stopped() -> None:
    narrator = Narrator(TARGETS)
    listening = Event(0.1, "csms-1", "csms_listening", {"csms": "csms-1", "port": 9})
    assert narrator.feed(listening) == []
    assert "csms-1 stops" in narrator.feed(
        Event(9.0, "csms-1", "csms_stopping", {"csms": "csms-1", "port": 9}))[0]
    assert "csms-1 is back on port 9" in narrator.feed(
        Event(15.0, "csms-1", "csms_listening", {"csms": "csms-1", "port": 9}))[0]
    assert narrator.feed(Event(1.0, CORE, "station_connected", {})) == []  # not told


def test_summary_line_rates_and_links() -> None:
    before = NodeSnapshot(CORE, 1.0, stations=3, planned=3, frames=100)
    now = NodeSnapshot(CORE, 2.0, stations=3, planned=3, frames=124, held=6,
                       peers=(PeerState(EDGE_A, "json", "open", 4),),
                       backends=(("csms-1", 9), ("csms-2", 0)),
                       secondaries=(SecondaryState("analytics", 57, 0),), refused=1)
    assert summary_line(now, before) == (
        "[   2.0s] core      | stations 3/3 + 6 over the overlay |  24.0 frames/s "
        "| peers edge-a json open (4 routes) | csms-1 9, csms-2 0 "
        "| analytics 57 copies, backlog 0 | firewall refused 1")
    assert "  0.0 frames/s" in summary_line(before, None)


# --- configs -----------------------------------------------------------------------------


def test_the_plan_cycles_versions_at_every_node_and_resets_go_behind_edge_b() -> None:
    plan = station_plan(3)
    assert [(s.identity, s.version, s.node) for s in plan[:4]] == [
        ("DEMO-C1", "ocpp1.6", CORE), ("DEMO-C2", "ocpp2.0.1", CORE),
        ("DEMO-C3", "ocpp2.1", CORE), ("DEMO-A1", "ocpp1.6", EDGE_A)]
    assert reset_target(plan).identity == "DEMO-B2"  # the first 2.x station there
    assert reset_target(station_plan(1)).identity == "DEMO-B1"  # 1.6 when that is all
    assert reset_payload("ocpp1.6") == {"type": "Soft"}
    assert reset_payload("ocpp2.1") == {"type": "Immediate"}


def test_the_configs_pass_the_nodes_own_loader(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    for node in (CORE, EDGE_A, EDGE_B):
        key = SigningKey.generate()
        (tmp_path / "keys" / f"{node}.pem").write_bytes(key.private_pem())
        (tmp_path / "keys" / f"{node}.pub.pem").write_bytes(key.public_pem())
    (tmp_path / "core-policy.toml").write_text(policy_text(SigningKey.generate().key_id))
    station_hash = peer_hash = hash_password("pw")
    trust = {n: f"keys/{n}.pub.pem" for n in (CORE, EDGE_A, EDGE_B)}
    core = parse(core_config(nameserver="127.0.0.1:5353", secondary_url="ws://127.0.0.1:1/ocpp",
                             station_hash=station_hash, peer_hash=peer_hash, trust=trust),
                 "core.toml", tmp_path)
    assert [b.role for b in core.backends] == ["primary", "secondary"]
    assert core.backends[0].srv == "_ocpp._tcp.csms.demo"
    assert core.dns.ttl_floor_s == 1  # failback looks for a better target every second
    assert [p.id for p in core.peers] == [EDGE_A, EDGE_B]
    assert core.admin is not None and core.admin.port == 0
    edge = parse(edge_config(EDGE_B, encoding="msgpack", core_url="ws://127.0.0.1:2/ocpp",
                             station_hash=station_hash, peer_password="pw", trust=trust),
                 "edge-b.toml", tmp_path)
    assert edge.backends == () and edge.peers[0].encoding == "msgpack"
    assert edge.station_entry("DEMO-B1") is not None
    assert edge.station_entry("DEMO-A1") is None


def test_the_policy_refuses_an_unsigned_reset_and_forwards_an_admin_signed_one() -> None:
    ops = SigningKey.generate()
    firewall = Firewall(parse_policy(policy_text(ops.key_id)))
    now = time.time()
    unsigned = firewall.decide("Reset", "to-station", "csms", {"type": "Immediate"}, now)
    assert unsigned.outcome is Outcome.REJECT and unsigned.rule == ADMIN_RULE
    signed = sign_payload({"type": "Immediate"}, "Reset", "to-station", ops, now)
    passed = firewall.decide("Reset", "to-station", "csms", signed, now)
    assert passed.outcome is Outcome.FORWARD and passed.rule == ADMIN_RULE
    other = firewall.decide("Heartbeat", "from-station", "DEMO-A1", {}, now)
    assert other.outcome is Outcome.FORWARD
