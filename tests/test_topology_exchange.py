"""Route-exchange sessions between two or three nodes, wired by plain function calls."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from topology import (
    AnnouncementRejected,
    CachedVerifier,
    ExchangeSession,
    JSONDict,
    PeerExpired,
    RoutesChanged,
    RouteTable,
    build_payload,
    claim_bytes,
    route_entry,
)

KEYS = {node: hashlib.sha256(node.encode()).digest() for node in ("A", "B", "C", "M")}


def signer(node: str) -> Callable[[bytes], dict[str, Any]]:
    def sign(data: bytes) -> dict[str, Any]:
        value = hmac.new(KEYS[node], data, hashlib.sha256).hexdigest()
        return {"keyId": node, "value": value, "algorithm": "HMAC-SHA256",
                "timestamp": "2026-01-01T00:00:00Z"}
    return sign


def verifier(trusted: Mapping[str, bytes]) -> Callable[[str, bytes, Mapping[str, Any]], bool]:
    def verify(origin: str, data: bytes, signature: Mapping[str, Any]) -> bool:
        key = trusted.get(origin)
        if key is None:
            return False
        expected = hmac.new(key, data, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, str(signature.get("value")))
    return verify


class Node:
    """A table and its sessions, keyed by peer id."""

    def __init__(self, node_id: str, **session_args: Any) -> None:
        self.id = node_id
        self.table = RouteTable(node_id, rng=random.Random(hash(node_id) & 0xFFFF))
        self.session_args = session_args
        self.sessions: dict[str, ExchangeSession] = {}

    def session(self, peer: str) -> ExchangeSession:
        if peer not in self.sessions:
            self.sessions[peer] = ExchangeSession(self.id, peer, self.table,
                                                  **self.session_args)
        return self.sessions[peer]


def deliver(to: ExchangeSession, payloads: list[JSONDict], now: float) -> list[Any]:
    """Hand payloads over as the wire would: through JSON."""
    events: list[Any] = []
    for payload in payloads:
        events.extend(to.receive(json.loads(json.dumps(payload)), now))
    return events


def connect(a: Node, b: Node, now: float = 0.0) -> None:
    """Bring the link up on both sides and deliver both full syncs."""
    to_b = a.session(b.id).link_up(now)
    to_a = b.session(a.id).link_up(now)
    deliver(b.session(a.id), to_b, now)
    deliver(a.session(b.id), to_a, now)


def pump(nodes: list[Node], start: float, until: float, step: float = 0.05,
         log: list[tuple[str, str, JSONDict]] | None = None) -> None:
    """Tick every session every ``step`` seconds and deliver what they send at once."""
    now = start
    while now <= until + 1e-9:
        for node in nodes:
            for peer, session in node.sessions.items():
                payloads = session.tick(now)
                if log is not None:
                    log.extend((node.id, peer, payload) for payload in payloads)
                other = next(n for n in nodes if n.id == peer)
                deliver(other.session(node.id), payloads, now)
        now = round(now + step, 9)


def reachable(node: Node) -> dict[str, tuple[str, ...]]:
    return {route.destination: route.path for route in node.table}


# -- full sync ------------------------------------------------------------------------------


def test_link_up_exchanges_full_syncs() -> None:
    a, b = Node("A"), Node("B")
    a.table.originate("A")
    a.table.originate("st-a")
    b.table.originate("B")
    connect(a, b)
    assert reachable(b) == {"B": (), "A": ("A",), "st-a": ("A",)}
    assert reachable(a) == {"A": (), "st-a": (), "B": ("B",)}
    route = b.table.best("st-a")
    assert route is not None and route.peer == "A" and route.origin == "A"


def test_full_sync_is_chunked_and_complete() -> None:
    a, b = Node("A", max_routes_per_message=500), Node("B")
    for index in range(1_234):
        a.table.originate(f"st{index}")
    payloads = a.session("B").link_up(0.0)
    assert len(payloads) == 3
    infos = [p["networkTopologyInformation"] for p in payloads]
    assert [(i["kind"], i["part"], i["parts"]) for i in infos] == [
        ("full", 1, 3), ("full", 2, 3), ("full", 3, 3)]
    assert [len(i["routes"]) for i in infos] == [500, 500, 234]
    b.session("A").link_up(0.0)
    deliver(b.session("A"), payloads, 0.0)
    assert len(b.table) == 1_234


def test_an_empty_table_still_sends_one_full_sync_message() -> None:
    a = Node("A")
    payloads = a.session("B").link_up(0.0)
    assert payloads == [build_payload("A", "full", [], part=1, parts=1)]


def test_a_repeated_full_sync_removes_what_the_peer_no_longer_has() -> None:
    a, b = Node("A"), Node("B")
    for name in ("st1", "st2", "st3"):
        a.table.originate(name)
    connect(a, b)
    a.table.withdraw_local("st2")
    a.session("B").link_down(1.0)
    events = deliver(b.session("A"), a.session("B").link_up(1.0), 1.0)
    assert set(reachable(b)) == {"st1", "st3"}
    assert RoutesChanged(frozenset({"st2"})) in events


# -- incremental updates --------------------------------------------------------------------


def test_changes_are_batched_over_the_window() -> None:
    a, b = Node("A", batch_window_s=0.2), Node("B")
    connect(a, b)
    session = a.session("B")
    a.table.originate("st1")
    assert session.next_deadline() == 0.0  # tick now: the window opens
    assert session.tick(1.0) == []
    assert session.next_deadline() == pytest.approx(1.2)
    a.table.originate("st2")
    assert session.tick(1.1) == []
    payloads = session.tick(1.2)
    assert len(payloads) == 1
    info = payloads[0]["networkTopologyInformation"]
    assert info["kind"] == "update" and info["routingNode"] == "A"
    assert [r["destinationId"] for r in info["routes"]] == ["st1", "st2"]
    events = deliver(b.session("A"), payloads, 1.2)
    assert events == [RoutesChanged(frozenset({"st1", "st2"}))]
    assert session.tick(1.3) == []  # nothing new
    assert not session.has_pending_updates


def test_updates_are_chunked_too() -> None:
    a, b = Node("A", batch_window_s=0.0, max_routes_per_message=2), Node("B")
    connect(a, b)
    for name in ("s1", "s2", "s3"):
        a.table.originate(name)
    payloads = a.session("B").tick(1.0)
    assert [len(p["networkTopologyInformation"]["routes"]) for p in payloads] == [2, 1]


def test_routes_and_withdrawals_travel_along_a_chain() -> None:
    a, b, c = Node("A"), Node("B"), Node("C")
    a.table.originate("A")
    a.table.originate("st-a")
    c.table.originate("C")
    connect(a, b)
    connect(b, c)
    pump([a, b, c], 0.0, 1.0)
    assert reachable(c)["st-a"] == ("A", "B")
    assert reachable(a)["C"] == ("C", "B")
    route = c.table.best("st-a")
    assert route is not None and route.distance == 2 and route.origin == "A"
    a.table.withdraw_local("st-a")
    pump([a, b, c], 1.0, 2.0)
    assert "st-a" not in reachable(b) and "st-a" not in reachable(c)


def test_split_horizon_never_announces_a_route_back_to_its_peer() -> None:
    a, b, c = Node("A"), Node("B"), Node("C")
    a.table.originate("st-a")
    c.table.originate("st-c")
    connect(a, b)
    connect(b, c)
    log: list[tuple[str, str, JSONDict]] = []
    pump([a, b, c], 0.0, 1.0, log=log)
    to_a = {r["destinationId"] for src, dst, p in log if (src, dst) == ("B", "A")
            for r in p["networkTopologyInformation"]["routes"]}
    assert to_a == {"st-c"}
    assert b.session("A").advertised_count == 1
    assert b.session("C").advertised_count == 1


def test_a_route_that_moves_onto_the_peer_is_withdrawn_from_it() -> None:
    # B first reaches st via C, announces it to A; then A offers a shorter way.
    a, b, c = Node("A", batch_window_s=0.0), Node("B", batch_window_s=0.0), Node("C")
    c.table.originate("st", priority=1)
    connect(b, c)
    connect(a, b)
    assert reachable(a)["st"] == ("C", "B")
    # A now originates st itself (a second site): B prefers A's equally short route with
    # a better priority and must take back what it told A.
    a.table.originate("st")
    deliver(b.session("A"), a.session("B").tick(1.0), 1.0)
    payloads = b.session("A").tick(1.0)
    infos = [p["networkTopologyInformation"] for p in payloads]
    assert [i.get("withdrawn") for i in infos] == [["st"]]
    deliver(a.session("B"), payloads, 1.0)
    assert [r.peer for r in a.table.candidates("st")] == [""]
    assert [r.peer for r in b.table.candidates("st")] == ["A", "C"]


def test_a_worse_route_is_withdrawn_at_once_and_announced_after_the_window() -> None:
    b = Node("B", batch_window_s=0.2)
    for peer in ("A", "C", "D"):
        b.session(peer).link_up(0.0)
    b.session("A").receive(build_payload("A", "update", [route_entry("st", ["A"], 0, 1, 1)]),
                           0.0)
    b.session("C").receive(
        build_payload("C", "update", [route_entry("st", ["A", "C"], 0, 1, 1)]), 0.0)
    to_d = b.session("D")
    to_d.tick(0.0)
    [update] = to_d.tick(0.2)
    assert update["networkTopologyInformation"]["routes"][0]["path"] == ["A", "B"]
    b.session("A").link_down(1.0)  # B's best becomes the longer way through C
    [withdrawal] = to_d.tick(1.0)
    assert withdrawal["networkTopologyInformation"].get("withdrawn") == ["st"]
    assert withdrawal["networkTopologyInformation"]["routes"] == []
    [announcement] = to_d.tick(1.2)
    assert announcement["networkTopologyInformation"]["routes"][0]["path"] == ["A", "C", "B"]


def test_sequence_numbers_carry_a_new_claim_through() -> None:
    a, b, c = Node("A"), Node("B"), Node("C")
    a.table.originate("CSMS", priority=0)
    connect(a, b)
    connect(b, c)
    pump([a, b, c], 0.0, 1.0)
    old = c.table.best("CSMS")
    a.table.originate("CSMS", priority=3, weight=7)
    pump([a, b, c], 1.0, 2.0)
    new = c.table.best("CSMS")
    assert old is not None and new is not None
    assert new.sequence > old.sequence and (new.priority, new.weight) == (3, 7)


def test_route_timeouts_expire_on_tick() -> None:
    b = Node("B")
    b.session("A").link_up(0.0)
    entry = route_entry("st", ["A"], 0, 1, 1, timeout=5)
    events = b.session("A").receive(build_payload("A", "update", [entry]), 0.0)
    assert events == [RoutesChanged(frozenset({"st"}))]
    route = b.table.best("st")
    assert route is not None and route.expires_at == 5.0 and route.timeout == 5
    # The change opens a batch window, which flushes nothing: st is not for A.
    assert b.session("A").tick(0.0) == [] and b.session("A").tick(0.2) == []
    assert b.session("A").next_deadline() == 5.0
    b.session("A").tick(5.0)
    assert b.table.best("st") is None
    assert b.session("A").take_events() == [RoutesChanged(frozenset({"st"}))]


# -- timers ---------------------------------------------------------------------------------


def test_keepalives_keep_the_hold_timer_from_expiring() -> None:
    a = Node("A", keepalive_s=30.0, hold_time_s=90.0)
    b = Node("B", keepalive_s=30.0, hold_time_s=90.0)
    a.table.originate("st-a")
    connect(a, b)
    now = 0.0
    keepalives = 0
    while now < 300.0:
        deadline = min(d for d in (a.session("B").next_deadline(),
                                   b.session("A").next_deadline()) if d is not None)
        now = max(now, deadline)
        for src, dst in ((a, b), (b, a)):
            payloads = src.session(dst.id).tick(now)
            keepalives += sum(p["networkTopologyInformation"]["kind"] == "keepalive"
                              for p in payloads)
            deliver(dst.session(src.id), payloads, now)
    assert keepalives >= 18
    assert b.session("A").state == "up"
    assert b.session("A").take_events() == []
    assert b.table.best("st-a") is not None


def test_a_silent_peer_expires_and_its_routes_go() -> None:
    a, b = Node("A"), Node("B", hold_time_s=90.0, keepalive_s=30.0)
    a.table.originate("st-a")
    connect(a, b, now=0.0)
    session = b.session("A")
    assert session.tick(0.0) == [] and session.tick(0.2) == []  # st-a is not for A
    assert session.tick(30.0)  # B's own keepalive; nothing comes from A
    assert session.next_deadline() == 60.0
    session.tick(60.0)
    assert session.next_deadline() == 90.0
    assert session.tick(90.0) == []
    assert session.take_events() == [PeerExpired("A"), RoutesChanged(frozenset({"st-a"}))]
    assert session.state == "expired"
    assert b.table.best("st-a") is None
    assert session.next_deadline() is None
    late = session.receive(build_payload("A", "keepalive"), 91.0)
    assert [type(e) for e in late] == [AnnouncementRejected]
    # A new link starts over.
    connect(a, b, now=100.0)
    assert b.table.best("st-a") is not None and session.state == "up"


def test_link_down_drops_the_peers_routes() -> None:
    a, b = Node("A"), Node("B")
    a.table.originate("st-a")
    connect(a, b)
    assert b.session("A").link_down(5.0) == [RoutesChanged(frozenset({"st-a"}))]
    assert b.table.best("st-a") is None
    assert b.session("A").next_deadline() is None
    assert b.session("A").tick(6.0) == []


# -- what a peer cannot do ------------------------------------------------------------------


def _state(node: Node) -> list[Any]:
    return [(d, node.table.candidates(d)) for d in sorted(node.table.destinations())]


def test_a_forged_path_changes_nothing_and_is_reported() -> None:
    a, b = Node("A"), Node("B")
    a.table.originate("st-a")
    connect(a, b)
    before = _state(b)
    # The link authenticated A, but one of the paths A sends ends at C.
    forged = build_payload("A", "update", [
        route_entry("st-x", ["X", "A"], 0, 1, 1),
        route_entry("st-a", ["X", "C"], 0, 1, 9),
    ], ["st-a"])
    events = b.session("A").receive(forged, 1.0)
    assert len(events) == 1 and isinstance(events[0], AnnouncementRejected)
    assert events[0].peer == "A" and "authenticated peer 'A'" in events[0].reason
    assert _state(b) == before


def test_a_routing_node_other_than_the_authenticated_peer_is_rejected() -> None:
    b = Node("B")
    b.session("A").link_up(0.0)
    events = b.session("A").receive(
        build_payload("C", "update", [route_entry("st", ["C"], 0, 1, 1)]), 0.0)
    assert [type(e) for e in events] == [AnnouncementRejected]
    assert "routingNode 'C'" in events[0].reason  # type: ignore[union-attr]
    assert len(b.table) == 0


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"nope": 1}, "networkTopologyInformation"),
        ({"networkTopologyInformation": {"routingNode": "A", "kind": "gossip"}}, "kind"),
        ({"networkTopologyInformation": {"routingNode": "A", "routes": [
            {"destinationId": "s", "priority": 0, "weight": -1, "path": ["A"],
             "sequence": 1}]}}, "routes[0].weight"),
        ("not a dict", "payload"),
    ],
)
def test_a_malformed_payload_is_rejected_naming_the_field(payload: object, field: str) -> None:
    b = Node("B")
    b.session("A").link_up(0.0)
    events = b.session("A").receive(payload, 0.0)
    assert len(events) == 1 and isinstance(events[0], AnnouncementRejected)
    assert field in events[0].reason
    assert b.session("A").stats.rejected_messages == 1


def test_a_path_through_ourselves_is_quietly_ignored() -> None:
    b = Node("B")
    b.session("A").link_up(0.0)
    events = b.session("A").receive(
        build_payload("A", "update", [route_entry("st", ["X", "B", "A"], 0, 1, 1)]), 0.0)
    assert events == []
    assert b.table.stats.rejected_loop == 1


# -- signatures -----------------------------------------------------------------------------


def signed_nodes() -> tuple[Node, Node, Node]:
    trusted = verifier(KEYS)
    a = Node("A", sign=signer("A"))
    b = Node("B", sign=signer("B"))  # B relays without checking
    c = Node("C", sign=signer("C"), verify=CachedVerifier(trusted))
    return a, b, c


def test_signed_routes_are_relayed_and_verified_end_to_end() -> None:
    a, b, c = signed_nodes()
    a.table.originate("st-a")
    b.table.originate("st-b")
    connect(a, b)
    connect(b, c)
    pump([a, b, c], 0.0, 1.0)
    assert {"st-a", "st-b"} <= set(reachable(c))
    route = c.table.best("st-a")
    assert route is not None and route.path == ("A", "B")
    assert route.signatures and route.signatures[0]["keyId"] == "A"
    assert c.session("B").stats.rejected_routes == 0


def test_the_origin_signs_each_claim_once() -> None:
    calls: list[bytes] = []
    sign = signer("A")

    def counting(data: bytes) -> dict[str, Any]:
        calls.append(data)
        return sign(data)

    a = Node("A", sign=counting)
    a.table.originate("st-a")
    a.session("B").link_up(0.0)
    a.session("C").link_up(0.0)
    assert calls == [claim_bytes("A", "st-a", 0, 1, a.table.best("st-a").sequence)]  # type: ignore[union-attr]


def _signed_entry(origin: str, destination: str, path: list[str], *, key_of: str,
                  sequence: int = 1) -> JSONDict:
    signature = signer(key_of)(claim_bytes(origin, destination, 0, 1, sequence))
    return route_entry(destination, path, 0, 1, sequence, signatures=[signature])


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (route_entry("st-m", ["A"], 0, 1, 1), "no signature"),
        (_signed_entry("A", "st-m", ["A"], key_of="M"), "does not verify"),
        (_signed_entry("Q", "st-m", ["Q", "A"], key_of="M"), "origin 'Q'"),
    ],
    ids=["missing", "wrong key", "untrusted origin"],
)
def test_unverifiable_routes_change_nothing_and_are_reported(entry: JSONDict,
                                                            reason: str) -> None:
    _, _, c = signed_nodes()
    session = c.session("A")
    session.link_up(0.0)
    good = _signed_entry("A", "st-a", ["A"], key_of="A")
    deliver(session, [build_payload("A", "update", [good])], 0.0)
    before = _state(c)
    tampered = dict(entry)
    events = deliver(session, [build_payload("A", "update", [tampered])], 1.0)
    assert len(events) == 1 and isinstance(events[0], AnnouncementRejected)
    assert reason in events[0].reason and events[0].routes == 1
    assert _state(c) == before
    assert session.stats.rejected_routes == 1


def test_a_claim_altered_on_the_way_no_longer_verifies() -> None:
    _, _, c = signed_nodes()
    session = c.session("B")
    session.link_up(0.0)
    entry = _signed_entry("A", "st-a", ["A", "B"], key_of="A")
    entry["priority"] = -5  # a relay tries to make its path more attractive
    events = deliver(session, [build_payload("B", "update", [entry])], 0.0)
    assert [type(e) for e in events] == [AnnouncementRejected]
    assert len(c.table) == 0


def test_only_the_bad_routes_of_a_message_are_dropped() -> None:
    _, _, c = signed_nodes()
    session = c.session("A")
    session.link_up(0.0)
    entries = [_signed_entry("A", "good", ["A"], key_of="A"),
               route_entry("bad1", ["A"], 0, 1, 1),
               _signed_entry("A", "bad2", ["A"], key_of="B")]
    events = deliver(session, [build_payload("A", "update", entries)], 0.0)
    rejected = [e for e in events if isinstance(e, AnnouncementRejected)]
    assert len(rejected) == 1 and rejected[0].routes == 2 and "1 more" in rejected[0].reason
    assert set(c.table.destinations()) == {"good"}


def test_cached_verifier_verifies_each_claim_once() -> None:
    calls = 0
    inner = verifier(KEYS)

    def counting(origin: str, data: bytes, signature: Mapping[str, Any]) -> bool:
        nonlocal calls
        calls += 1
        return bool(inner(origin, data, signature))

    cached = CachedVerifier(counting, max_entries=1)
    data = claim_bytes("A", "st", 0, 1, 1)
    good = signer("A")(data)
    assert cached("A", data, good) and cached("A", data, good)
    assert calls == 1
    assert not cached("A", data, {"value": "00"}) and not cached("A", data, {"value": "00"})
    assert calls == 3  # failures are not remembered
    other = claim_bytes("A", "st2", 0, 1, 1)
    assert cached("A", other, signer("A")(other))
    assert cached("A", data, good) and calls == 5  # evicted by max_entries=1


def test_session_arguments_are_checked() -> None:
    table = RouteTable("A", rng=random.Random(1))
    with pytest.raises(ValueError):
        ExchangeSession("B", "C", table)
    with pytest.raises(ValueError):
        ExchangeSession("A", "A", table)
    with pytest.raises(ValueError):
        ExchangeSession("A", "B", table, keepalive_s=100.0, hold_time_s=90.0)
