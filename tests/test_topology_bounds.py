"""What a peer cannot make a node hold or believe: field bounds, caps, unsigned-mode rules.

Tests named ``test_item4_*`` cover item 4 of the route-exchange security issue (a peer
taking another node's routes for good with huge sequence numbers or priorities; what
unsigned mode refuses), ``test_item6_*`` item 6 (unbounded route fields, route caps).
Last, a hypothesis state machine puts a lying peer M next to an honest peer H.
"""

from __future__ import annotations

import json
import random
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router.config.model import MAX_ID, RESERVED_IDS
from router.wire import overlay_frames
from topology import (
    AnnouncementRejected,
    ExchangeSession,
    JSONDict,
    RoutesChanged,
    RouteTable,
    TopologyMessageError,
    Verdict,
    bounds,
    build_payload,
    parse_payload,
    route_entry,
)
from topology.exchange import DEFAULT_MAX_ROUTES_PER_MESSAGE

BASE = 1_763_776_800_000  # origins number their claims from wall-clock milliseconds


def session(peer: str = "M", table: RouteTable | None = None, local: str = "N",
            **kwargs: Any) -> ExchangeSession:
    if table is None:
        table = RouteTable(local, rng=random.Random(1))
    s = ExchangeSession(local, peer, table, **kwargs)
    s.link_up(0.0)
    return s


def send(to: ExchangeSession, routes: list[JSONDict],
         withdrawn: list[str] | None = None) -> list[Any]:
    """Deliver an update from the session's peer, through JSON as on the wire."""
    payload = build_payload(to.peer_id, "update", routes, withdrawn or [])
    return to.receive(json.loads(json.dumps(payload)), 0.0)


def rejections(events: list[Any]) -> list[AnnouncementRejected]:
    return [event for event in events if isinstance(event, AnnouncementRejected)]


def pair(**table_args: Any) -> tuple[RouteTable, ExchangeSession, ExchangeSession]:
    """Node N with an honest peer H and a lying peer M on one table."""
    table = RouteTable("N", rng=random.Random(3), **table_args)
    return table, session("H", table), session("M", table)


# -- item 4: a peer cannot take another origin's routes for good ------------------------------


def test_item4_a_liars_huge_sequence_does_not_take_the_origins_route() -> None:
    table, h, m = pair()
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE)])
    events = send(m, [route_entry("st", ["O", "M"], 0, 1, 10**30)])
    [rejected] = rejections(events)
    assert "sequence" in rejected.reason and rejected.peer == "M"
    assert [r.peer for r in table.candidates("st")] == ["H"]
    # The origin's next claim still gets through: it is not "stale".
    send(h, [route_entry("st", ["O", "H"], 3, 1, BASE + 1)])
    best = table.best("st")
    assert best is not None and (best.peer, best.priority, best.sequence) == ("H", 3, BASE + 1)


def test_item4_an_in_range_but_far_ahead_sequence_from_a_liar_changes_only_its_route() -> None:
    # 2**62 is a valid number; unsigned, it still may not outdate what H told us.
    table, h, m = pair()
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE)])
    assert send(m, [route_entry("st", ["O", "X", "M"], 0, 1, 2**62)]) == []
    assert {r.peer for r in table.candidates("st")} == {"H", "M"}
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE + 1)])
    held = {r.peer: r.sequence for r in table.candidates("st")}
    assert held == {"H": BASE + 1, "M": 2**62}
    best = table.best("st")
    assert best is not None and best.peer == "H"  # shorter, so chosen; no number wins it
    assert table.stats.ignored_stale == 0


def test_item4_a_liars_newer_looking_claim_first_does_not_block_the_origin() -> None:
    # M speaks first: its number must not make the origin's real claim "stale" later.
    table, h, m = pair()
    send(m, [route_entry("st", ["O", "M"], 0, 1, 2**63 - 1)])
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE)])
    assert {r.peer for r in table.candidates("st")} == {"H", "M"}
    # When M goes, H's route is there, untouched.
    m.link_down(1.0)
    assert [r.peer for r in table.candidates("st")] == ["H"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", -10**18), ("priority", -1), ("priority", 65_536),
     ("weight", 65_536), ("weight", 10**18), ("sequence", 2**63), ("sequence", -1)],
)
def test_item4_priority_weight_and_sequence_out_of_range_are_rejected(field: str,
                                                                     value: int) -> None:
    table, h, m = pair()
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE)])
    entry = route_entry("st", ["O", "M"], 0, 1, BASE)
    entry[field] = value
    [rejected] = rejections(send(m, [entry]))
    assert f"routes[0].{field}" in rejected.reason
    assert [r.peer for r in table.candidates("st")] == ["H"]
    assert m.stats.rejected_messages == 1


def test_item4_bounds_at_the_edge_are_accepted() -> None:
    table, _, m = pair()
    assert send(m, [route_entry("a", ["M"], 65_535, 65_535, 2**63 - 1),
                    route_entry("b", ["M"], 0, 0, 0)]) != []
    assert len(table.routes_via("M")) == 2


def test_item4_an_unsigned_sequence_may_not_jump_far_past_the_peers_last_claim() -> None:
    table, h, m = pair()
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE)])
    send(m, [route_entry("st", ["O", "M"], 0, 1, BASE)])
    # Within the bound: an origin that restarted and took a new wall-clock start.
    assert not rejections(send(m, [route_entry("st", ["O", "M"], 0, 1,
                                               BASE + bounds.MAX_SEQUENCE_JUMP)]))
    jump = BASE + 2 * bounds.MAX_SEQUENCE_JUMP + 1
    [rejected] = rejections(send(m, [route_entry("st", ["O", "M"], 0, 1, jump)]))
    assert "jumps" in rejected.reason and str(jump) in rejected.reason
    # The peer no longer uses its earlier route, so that goes; H's route stays.
    assert [r.peer for r in table.candidates("st")] == ["H"]
    assert table.stats.refused_sequence_jump == 1 and m.stats.refused_sequence_jump == 1
    # Another origin's claim is not measured against O's numbers.
    assert not rejections(send(m, [route_entry("st", ["P", "M"], 0, 1, 2**62)]))


def test_item4_a_signed_claim_may_jump_and_outdates_older_signed_claims() -> None:
    def verify(origin: str, data: bytes, signature: Any) -> bool:
        return bool(signature.get("value") == f"by-{origin}")

    table = RouteTable("N", rng=random.Random(3))
    h, m = session("H", table, verify=verify), session("M", table, verify=verify)
    sig = [{"keyId": "O", "value": "by-O"}]
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE, signatures=sig)])
    send(m, [route_entry("st", ["O", "X", "M"], 0, 1, BASE + 10**15, signatures=sig)])
    # The origin proved the newer claim: the older one H carries is superseded.
    assert [(r.peer, r.verified) for r in table.candidates("st")] == [("M", True)]


def test_item4_a_route_originated_by_this_node_is_never_learned_and_is_reported() -> None:
    table, _, m = pair()
    table.originate("st-n")
    send(m, [route_entry("st-x", ["X", "M"], 0, 1, 1)])
    events = send(m, [route_entry("st-x", ["N", "M"], 0, 1, 2),
                      route_entry("st-n", ["N", "X", "M"], 0, 1, BASE)])
    [rejected] = rejections(events)
    assert "claims this node as its origin" in rejected.reason and rejected.routes == 2
    assert table.best("st-x") is None  # M's earlier route to st-x went with it
    assert [r.peer for r in table.candidates("st-n")] == [""]
    assert table.stats.rejected_own == 2 and m.stats.refused_own == 2


def test_item4_a_route_to_this_nodes_own_id_is_refused() -> None:
    table, _, m = pair()
    [rejected] = rejections(send(m, [route_entry("N", ["X", "M"], 0, 1, 1)]))
    assert "this node's own id" in rejected.reason
    assert table.candidates("N") == []


def test_item4_a_path_must_end_at_the_announcing_peer() -> None:
    # (Held before this change too: the message is a forgery and is rejected whole.)
    table, h, m = pair()
    send(h, [route_entry("st", ["O", "H"], 0, 1, BASE)])
    [rejected] = rejections(send(m, [route_entry("a", ["M"], 0, 1, 1),
                                     route_entry("st", ["O", "H"], 0, 1, BASE + 1)]))
    assert "does not end at the authenticated peer 'M'" in rejected.reason
    assert table.routes_via("M") == [] and table.stats.learned == 1


# -- item 6: every field bounded, routes capped -----------------------------------------------


def test_item6_bounds_equal_the_limits_of_frames_and_config() -> None:
    assert bounds.MAX_PATH_LENGTH == overlay_frames.MAX_HOPS
    assert bounds.MAX_ID_LENGTH == overlay_frames.MAX_NODE_ID == MAX_ID
    assert set(bounds.RESERVED_IDS) == set(RESERVED_IDS)
    assert set(bounds.RESERVED_IDS) == {overlay_frames.ANYCAST_CSMS, overlay_frames.BROADCAST}
    assert DEFAULT_MAX_ROUTES_PER_MESSAGE <= bounds.MAX_ENTRIES_PER_MESSAGE
    # bench/routes.py syncs 100,000 routes from one peer by default: within both caps.
    assert bounds.DEFAULT_MAX_ROUTES_PER_PEER >= 100_000
    assert bounds.DEFAULT_MAX_ROUTES >= bounds.DEFAULT_MAX_ROUTES_PER_PEER


def _info(routes: list[Any] | None = None, **fields: Any) -> JSONDict:
    return {"networkTopologyInformation": {"routingNode": "M", "routes": routes or [],
                                           **fields}}


def _entry(**fields: Any) -> JSONDict:
    entry = route_entry("st", ["M"], 0, 1, 1)
    entry.update(fields)
    return entry


FIVE_MB = "d" * 5_000_000
ONE_MB = "h" * 1_000_000


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (_info([_entry(destinationId=FIVE_MB)]), "routes[0].destinationId"),
        (_info([_entry(destinationId="d" * 49)]), "routes[0].destinationId"),
        (_info([_entry(destinationId="*")]), "routes[0].destinationId"),
        (_info([_entry(destinationId="\ud800")]), "routes[0].destinationId"),
        (_info([_entry(path=[ONE_MB, "M"])]), "routes[0].path"),
        (_info([_entry(path=["h" * 49, "M"])]), "routes[0].path"),
        (_info([_entry(path=["CSMS", "M"])]), "routes[0].path"),
        (_info([_entry(path=["\udfff", "M"])]), "routes[0].path"),
        (_info([_entry(path=[f"n{i}" for i in range(16)] + ["M"])]), "routes[0].path"),
        (_info([_entry(timeout=2**31)]), "routes[0].timeout"),
        (_info([_entry(timeout=float("nan"))]), "routes[0].timeout"),
        (_info([_entry(signatures=[{"value": "v"}] * 5)]), "routes[0].signatures"),
        (_info([_entry(signatures=[{"value": "v", "extra": "x"}])]), "routes[0].signatures"),
        (_info([_entry(signatures=[{"value": "v" * 1025}])]), "routes[0].signatures"),
        (_info([_entry(signatures=[{"value": "v", "keyId": 7}])]), "routes[0].signatures"),
        (_info([_entry(signatures=[{"keyId": "k"}])]), "routes[0].signatures"),
        (_info([_entry(signatures=[{"value": "v", "algorithm": {"x": ONE_MB}}])]),
         "routes[0].signatures"),
        (_info([_entry()] * 6_000, withdrawn=["x"] * 4_001), "routes"),
        (_info(withdrawn=[FIVE_MB]), "withdrawn"),
        (_info(routingNode="m" * 49), "routingNode"),
        (_info(kind="full", part=1, parts=10**7), "parts"),
        (_info(notBefore="yesterday"), "notBefore"),
        (_info(notAfter="2026-13-01T00:00:00Z"), "notAfter"),
        (_info(notAfter="2026-11-22T10:00:00Z" + "0" * 1000), "notAfter"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else "",
)
def test_item6_oversized_or_unknown_fields_make_the_message_malformed(
    payload: JSONDict, field: str
) -> None:
    with pytest.raises(TopologyMessageError) as caught:
        parse_payload(payload)
    assert field in caught.value.field
    assert len(str(caught.value)) < 400  # the error does not echo megabytes into the log
    table, _, m = pair()
    [rejected] = rejections(m.receive(payload, 0.0))
    assert field in rejected.reason
    assert table.routes_via("M") == []


def test_item6_fields_at_their_bounds_are_accepted() -> None:
    parsed = parse_payload(_info(
        [_entry(destinationId="d" * 48, path=[f"n{i}" for i in range(15)] + ["M"],
                timeout=2**31 - 1, signatures=[{"keyId": "k" * 1024, "value": "v",
                                                "algorithm": "ed25519", "timestamp": ""}] * 4)],
        withdrawn=["w" * 48], notBefore="2026-11-22T10:00:00.123456789+01:00",
        notAfter="2026-11-23T10:00:00Z"))
    assert len(parsed.routes[0].path) == 16 and len(parsed.routes[0].signatures) == 4


def test_item6_a_lone_surrogate_in_a_signed_route_is_rejected_not_raised() -> None:
    # Before, claim_bytes could not encode it and UnicodeEncodeError escaped receive().
    m = session(verify=lambda origin, data, signature: False)
    payload = '{"networkTopologyInformation": {"routingNode": "M", "routes": [' \
              '{"destinationId": "\\ud800", "priority": 0, "weight": 1, "path": ["M"], ' \
              '"sequence": 1, "signatures": [{"value": "x"}]}]}}'
    [rejected] = rejections(m.receive(json.loads(payload), 0.0))
    assert "destinationId" in rejected.reason


def test_item6_the_per_peer_cap_is_reported_and_keeps_what_was_learned() -> None:
    table, h, m = pair(max_routes_per_peer=3)
    send(h, [route_entry(f"h{i}", ["H"], 0, 1, 1) for i in range(3)])
    events = send(m, [route_entry(f"m{i}", ["M"], 0, 1, 1) for i in range(5)])
    [rejected] = rejections(events)
    assert "per-peer route cap" in rejected.reason and rejected.routes == 2
    assert "'m3'" in rejected.reason and "routes already learned are kept" in rejected.reason
    assert sorted(r.destination for r in table.routes_via("M")) == ["m0", "m1", "m2"]
    assert m.stats.refused_cap == 2 and table.stats.refused_by_peer == {"M": 2}
    # Held destinations can still be updated; H is not affected by M's cap.
    assert not rejections(send(m, [route_entry("m0", ["X", "M"], 0, 1, 2)]))
    assert len(table.routes_via("H")) == 3


def test_item6_the_table_cap_refuses_new_routes_counts_and_drops_nothing() -> None:
    table, h, m = pair(max_routes=4)
    table.originate("N")
    table.originate("st-n")  # local routes do not count against the cap
    send(h, [route_entry(f"h{i}", ["H"], 0, 1, 1) for i in range(3)])
    events = send(m, [route_entry(f"m{i}", ["M"], 0, 1, 1) for i in range(3)])
    [rejected] = rejections(events)
    assert "table's route cap" in rejected.reason and "(4 learned routes)" in rejected.reason
    assert rejected.routes == 2
    assert table.route_count == 2 + 4
    assert table.stats.refused_table_cap == 2 and table.stats.refused_cap == 2
    # A second peer's route to a destination already held is still a new route: refused.
    assert table.learn("M", "h0", ("M",), 0, 1, "M", 1, float("inf")) is Verdict.TABLE_CAP
    # Once a route goes, there is room again.
    send(h, [], ["h0"])
    assert send(m, [route_entry("m1", ["M"], 0, 1, 1)]) == [RoutesChanged(frozenset({"m1"}))]
    assert table.route_count == 2 + 4


def test_item6_caps_and_ranges_are_checked_at_construction_and_origination() -> None:
    with pytest.raises(ValueError):
        RouteTable("N", rng=random.Random(1), max_path_length=bounds.MAX_PATH_LENGTH + 1)
    with pytest.raises(ValueError):
        RouteTable("N", rng=random.Random(1), max_routes=-1)
    with pytest.raises(ValueError):
        RouteTable("N", rng=random.Random(1), first_sequence=2**63)
    table = RouteTable("N", rng=random.Random(1))
    for kwargs in ({"priority": 65_536}, {"priority": -1}, {"weight": 65_536}):
        with pytest.raises(ValueError):
            table.originate("st", **kwargs)
    with pytest.raises(ValueError):
        table.originate("s" * 49)
    with pytest.raises(ValueError):
        ExchangeSession("N", "M", table,
                        max_routes_per_message=bounds.MAX_ENTRIES_PER_MESSAGE + 1)
    assert table.learn("M", "st", ("M",), 65_536, 1, "M", 1, 0.0) is Verdict.INVALID


def test_item6_a_full_sync_of_the_default_chunk_size_fits_the_message_bound() -> None:
    table = RouteTable("A", rng=random.Random(1))
    for index in range(DEFAULT_MAX_ROUTES_PER_MESSAGE + 1):
        table.originate(f"station-{index:06d}")
    payloads = ExchangeSession("A", "B", table).link_up(0.0)
    assert len(payloads) == 2
    received = RouteTable("B", rng=random.Random(2))
    receiver = session("A", received, local="B")
    for payload in payloads:
        assert not rejections(receiver.receive(payload, 0.0))
    assert len(received) == DEFAULT_MAX_ROUTES_PER_MESSAGE + 1


# -- the adversarial state machine ------------------------------------------------------------

CAP_M = 8
H_DESTINATIONS = ("d0", "d1", "d2", "d3", "d4", "CSMS", "st-n")
M_DESTINATIONS = (*H_DESTINATIONS, "N", *(f"m{i}" for i in range(12)))
# One more than H can hold plus M's cap: M alone can never fill the table against H.
MAX_ROUTES = len(H_DESTINATIONS) + CAP_M
H_PATHS = {"H": ["H"], "O1": ["O1", "H"], "O2": ["O2", "X", "H"]}
M_ORIGINS = ("M", "O1", "O2", "H", "N", "X")
# In range, but as far ahead as a liar likes (and past the jump bound from its last claim).
SEQUENCES = (0, 1, BASE, BASE + 1, BASE + 2**32, BASE + 2**32 + 1, 2**62, 2**63 - 1)
VALUES = (0, 1, 65_535)

forged_route = st.fixed_dictionaries({
    # Half of the time one of H's destinations: those are what a liar is after.
    "destinationId": st.sampled_from(H_DESTINATIONS) | st.sampled_from(M_DESTINATIONS),
    "origin": st.sampled_from(M_ORIGINS),
    "via_h": st.booleans(),
    "sequence": st.sampled_from(SEQUENCES),
    "priority": st.sampled_from(VALUES),
    "weight": st.sampled_from(VALUES),
    "timeout": st.none() | st.sampled_from([0.5, 30]),
    "signatures": st.none() | st.sampled_from([[], [{"value": "v", "keyId": "O1"}]]),
})
# One way each to break a bound or a rule: (where, key, value); a callable value is made
# when used, so that hypothesis does not print megabytes in its statistics.
BREAKAGES: list[tuple[str, str, Any]] = [
    ("routes", "sequence", 2**63), ("routes", "sequence", 10**30), ("routes", "sequence", -1),
    ("routes", "priority", -10**18), ("routes", "priority", 65_536),
    ("routes", "weight", 10**18), ("routes", "weight", -1),
    ("routes", "destinationId", lambda: "d" * 100_000), ("routes", "destinationId", ""),
    ("routes", "destinationId", "*"), ("routes", "destinationId", 7),
    ("routes", "path", ["O1", "H"]),  # does not end at M: a forgery
    ("routes", "path", ["H", "M", "H"]), ("routes", "path", lambda: ["h" * 10_000, "M"]),
    ("routes", "path", lambda: [*(f"x{i}" for i in range(bounds.MAX_PATH_LENGTH)), "M"]),
    ("routes", "path", []), ("routes", "path", ["CSMS", "M"]),
    ("routes", "timeout", 0), ("routes", "timeout", 2**31), ("routes", "timeout", "5"),
    ("routes", "signatures", [{"value": "v"}] * 5), ("routes", "signatures", [{"x": "v"}]),
    ("routes", "signatures", lambda: [{"value": "v" * 5_000}]), ("routes", "signatures", {}),
    ("info", "routingNode", "H"), ("info", "notBefore", "soon"),
    ("info", "withdrawn", lambda: ["w" * 1_000]), ("info", "kind", "gossip"),
    ("info", "routes", lambda: [route_entry("m0", ["M"], 0, 1, 1)] * 10_001),
]
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["networkTopologyInformation", "routingNode", "routes",
                                       "kind", "withdrawn", "destinationId", "path"]),
                      children, max_size=3),
    max_leaves=10,
)


def _forged(fields: dict[str, Any]) -> JSONDict:
    """A well-formed route entry from M, claiming whatever ``fields`` say."""
    origin = fields["origin"]
    path = [origin] if origin != "M" else []
    if fields["via_h"] and origin != "H":
        path.append("H")
    path.append("M")
    entry = route_entry(fields["destinationId"], path, fields["priority"], fields["weight"],
                        fields["sequence"], timeout=fields["timeout"])
    if fields["signatures"] is not None:
        entry["signatures"] = fields["signatures"]
    return entry


class LyingPeerMachine(RuleBasedStateMachine):
    """Node N, an honest peer H and a lying peer M, one table, two sessions.

    What unsigned mode guarantees (docs/protocol.md 5.10), and the invariants assert
    exactly: (1) the routes N holds from H are exactly those H announced and did not
    withdraw or leave out of a full sync, whatever M sends; (2) where M's route is N's
    best for a destination H also reaches, it is at least as good as H's by (distance,
    priority), compared in that order: it won by the selection rule, never by a sequence
    number; (3) N's own destinations stay local, and no route to N's own id is held;
    (4) M never holds more than its cap, and only routes within every bound that end at
    M and do not pass N. Also, receive() raises nothing, whatever M sends: it documents no
    exception for what a peer sends.
    """

    @initialize(origins=st.lists(st.sampled_from(sorted(H_PATHS)), min_size=len(H_DESTINATIONS),
                                 max_size=len(H_DESTINATIONS)))
    def start(self, origins: list[str]) -> None:
        self.table = RouteTable("N", rng=random.Random(5), max_routes_per_peer=CAP_M,
                                max_routes=MAX_ROUTES)
        self.table.originate("N")
        self.table.originate("st-n")
        self.h = ExchangeSession("N", "H", self.table)
        self.m = ExchangeSession("N", "M", self.table)
        self.now = 0.0
        self.h.link_up(self.now)
        self.m.link_up(self.now)
        # What H announced: destination -> (path, priority, weight, sequence).
        self.h_routes: dict[str, tuple[tuple[str, ...], int, int, int]] = {}
        self.h_sequence: dict[tuple[str, str], int] = {}
        # H starts out reaching all its destinations: that is what M is after.
        for destination, origin in zip(H_DESTINATIONS, origins, strict=True):
            self.h_announces(destination, origin, 0, 1, new_claim=False)

    def deliver(self, to: ExchangeSession, payload: object) -> list[Any]:
        self.now += 0.1
        return to.receive(json.loads(json.dumps(payload)), self.now)

    # -- the honest peer --------------------------------------------------------------------

    @rule(destination=st.sampled_from(H_DESTINATIONS), origin=st.sampled_from(sorted(H_PATHS)),
          priority=st.integers(0, 2), weight=st.integers(0, 3), new_claim=st.booleans())
    def h_announces(self, destination: str, origin: str, priority: int, weight: int,
                    new_claim: bool) -> None:
        key = (origin, destination)
        sequence = self.h_sequence.get(key, BASE) + (1 if new_claim else 0)
        self.h_sequence[key] = sequence
        path = H_PATHS[origin]
        events = self.deliver(self.h, build_payload("H", "update", [
            route_entry(destination, path, priority, weight, sequence)]))
        assert not rejections(events)
        self.h_routes[destination] = (tuple(path), priority, weight, sequence)

    @rule(destination=st.sampled_from(H_DESTINATIONS))
    def h_withdraws(self, destination: str) -> None:
        self.deliver(self.h, build_payload("H", "update", [], [destination]))
        self.h_routes.pop(destination, None)

    @rule(keep=st.sets(st.sampled_from(H_DESTINATIONS)), restart=st.booleans())
    def h_full_sync(self, keep: set[str], restart: bool) -> None:
        """H sends a full sync (after its link came up again, or not) of part of its
        routes; the sync removes the others."""
        if restart:
            self.h.link_down(self.now)
            self.h.link_up(self.now)
        kept = {d: r for d, r in self.h_routes.items() if d in keep}
        entries = [route_entry(d, list(path), prio, weight, seq)
                   for d, (path, prio, weight, seq) in sorted(kept.items())]
        half = len(entries) // 2
        for part, chunk in ((1, entries[:half]), (2, entries[half:])):
            events = self.deliver(self.h, build_payload("H", "full", chunk, part=part, parts=2))
            assert not rejections(events)
        self.h_routes = kept

    # -- the lying peer ---------------------------------------------------------------------

    @rule(entries=st.lists(forged_route, min_size=1, max_size=4),
          withdrawn=st.lists(st.sampled_from(M_DESTINATIONS), max_size=2),
          full=st.booleans())
    def m_forges(self, entries: list[dict[str, Any]], withdrawn: list[str],
                 full: bool) -> None:
        routes = [_forged(fields) for fields in entries]
        if full:
            payload = build_payload("M", "full", routes, withdrawn, part=1, parts=1)
        else:
            payload = build_payload("M", "update", routes, withdrawn)
        for event in self.deliver(self.m, payload):
            if isinstance(event, AnnouncementRejected):
                hypothesis.event(f"forgery refused: {event.reason.split(' refused: ')[-1][:30]}")

    @rule(entries=st.lists(forged_route, min_size=1, max_size=3), which=st.integers(0, 2),
          breakage=st.sampled_from(BREAKAGES))
    def m_breaks_a_bound(self, entries: list[dict[str, Any]], which: int,
                         breakage: tuple[str, str, Any]) -> None:
        payload = build_payload("M", "update", [_forged(fields) for fields in entries])
        info = payload["networkTopologyInformation"]
        where, key, value = breakage
        target = info if where == "info" else info["routes"][which % len(entries)]
        target[key] = value() if callable(value) else value
        before = self.table.routes_via("M")
        events = self.deliver(self.m, payload)
        assert len(rejections(events)) == 1 and len(events) == 1, (breakage, events)
        assert self.table.routes_via("M") == before

    @rule(index=st.integers(0, CAP_M - 1), beyond=st.booleans())
    def m_raises_a_sequence(self, index: int, beyond: bool) -> None:
        held = self.table.routes_via("M")
        if not held:
            return
        route = held[index % len(held)]
        sequence = route.sequence + bounds.MAX_SEQUENCE_JUMP + (1 if beyond else 0)
        if sequence > bounds.MAX_SEQUENCE:
            return
        events = self.deliver(self.m, build_payload("M", "update", [route_entry(
            route.destination, list(route.path), route.priority, route.weight, sequence)]))
        after = [r for r in self.table.routes_via("M") if r.destination == route.destination]
        hypothesis.event(f"M raises a sequence {'beyond' if beyond else 'up to'} the bound")
        if beyond:
            [rejected] = rejections(events)
            assert "jumps too far" in rejected.reason and after == []
        else:
            assert not rejections(events) and after[0].sequence == sequence

    @rule(count=st.integers(1, 3 * CAP_M))
    def m_floods(self, count: int) -> None:
        self.deliver(self.m, build_payload("M", "update", [
            route_entry(f"m{i % 12}" if i < 12 else f"flood-{i}", ["M"], 0, 1, i)
            for i in range(count)]))

    @rule(junk=json_junk)
    def m_sends_junk(self, junk: object) -> None:
        events = self.m.receive(junk, self.now)
        assert len(rejections(events)) == 1

    @rule()
    def m_link_flaps(self) -> None:
        self.m.link_down(self.now)
        self.m.link_up(self.now)
        assert self.table.routes_via("M") == []

    @rule()
    def time_passes(self) -> None:
        self.now += 1.0
        for s in (self.h, self.m):
            s.tick(self.now)
            s.take_events()

    # -- what holds ---------------------------------------------------------------------------

    @invariant()
    def routes_from_h_are_exactly_what_h_announced(self) -> None:
        held = {route.destination: (route.path, route.priority, route.weight, route.sequence)
                for route in self.table.routes_via("H")}
        assert held == self.h_routes

    @invariant()
    def m_displaces_h_only_by_the_selection_rule(self) -> None:
        for route in self.table.routes_via("H"):
            best = self.table.best(route.destination)
            assert best is not None
            if best.peer == "M":
                hypothesis.event("a forged route is chosen over H's, by the selection rule")
                assert (best.distance, best.priority) <= (route.distance, route.priority)

    @invariant()
    def own_destinations_stay_local(self) -> None:
        for destination in ("N", "st-n"):
            best = self.table.best(destination)
            assert best is not None and best.is_local
        assert self.table.candidates("N") == [self.table.best("N")]

    @invariant()
    def m_stays_within_its_cap_and_the_bounds(self) -> None:
        from_m = self.table.routes_via("M")
        assert len(from_m) <= CAP_M
        for route in from_m:
            assert route.path[-1] == "M" and "N" not in route.path
            assert len(route.path) <= bounds.MAX_PATH_LENGTH
            assert 0 <= route.priority <= bounds.MAX_PRIORITY
            assert 0 <= route.weight <= bounds.MAX_WEIGHT
            assert 0 <= route.sequence <= bounds.MAX_SEQUENCE
            assert 0 < len(route.destination) <= bounds.MAX_ID_LENGTH


LyingPeerMachine.TestCase.settings = settings(
    derandomize=True, database=None, max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLyingPeer = LyingPeerMachine.TestCase
