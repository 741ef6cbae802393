"""The route table: validation, selection, withdrawal, expiry, caps and change feeds."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from topology import LOCAL, Route, RouteTable, weighted_choice

INF = math.inf


def table(node: str = "me", seed: int = 7, **kwargs: int) -> RouteTable:
    return RouteTable(node, rng=random.Random(seed), **kwargs)


def learn(t: RouteTable, peer: str, destination: str, path: tuple[str, ...], *,
          priority: int = 0, weight: int = 1, sequence: int = 1,
          expires_at: float = INF, verified: bool = False) -> bool:
    return bool(t.learn(peer, destination, path, priority, weight, path[0], sequence,
                        expires_at, verified=verified))


# -- local routes ---------------------------------------------------------------------------


def test_local_route_wins_over_any_learned_route() -> None:
    t = table()
    learn(t, "a", "st1", ("a",))
    t.originate("st1")
    best = t.best("st1")
    assert best is not None and best.is_local and best.peer == LOCAL
    assert best.path == () and best.distance == 0 and best.origin == "me"
    assert best.expires_at == INF
    assert t.withdraw_local("st1")
    best = t.best("st1")
    assert best is not None and best.peer == "a"
    assert not t.withdraw_local("st1")


def test_reoriginating_with_new_attributes_takes_a_new_sequence() -> None:
    t = table()
    first = t.originate("CSMS")
    assert t.originate("CSMS") is first
    second = t.originate("CSMS", priority=2, weight=5)
    assert second.sequence > first.sequence
    assert t.best("CSMS") == second


def test_first_sequence_lets_a_restarted_node_start_higher() -> None:
    t = RouteTable("me", rng=random.Random(1), first_sequence=1_700_000_000_000)
    assert t.originate("me").sequence == 1_700_000_000_000


# -- learning and path-vector checks --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "origin", "why"),
    [
        ((), "a", "empty path"),
        (("x", "b"), "x", "last hop is not the peer"),
        (("x", "a"), "y", "origin is not first on the path"),
        (("x", "y", "x", "a"), "x", "path repeats a node"),
    ],
)
def test_invalid_paths_are_refused_and_change_nothing(
    path: tuple[str, ...], origin: str, why: str
) -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"))
    before = t.candidates("st1")
    assert not t.learn("a", "st1", path, 0, 1, origin, 5, INF), why
    assert t.candidates("st1") == before
    assert t.stats.rejected_invalid == 1


def test_a_path_through_this_node_is_a_loop_and_replaces_the_peers_old_route() -> None:
    t = table()
    assert learn(t, "a", "st1", ("x", "a"))
    assert not learn(t, "a", "st1", ("x", "me", "a"), sequence=2)
    # The peer now routes through us, so its previous route is gone too.
    assert t.best("st1") is None
    assert t.stats.rejected_loop == 1
    assert t.take_changes() == {"st1"}


def test_paths_longer_than_the_limit_are_refused() -> None:
    t = table(max_path_length=3)
    assert learn(t, "a", "d", ("x", "y", "a"))
    assert not learn(t, "a", "e", ("w", "x", "y", "a"))
    assert t.best("e") is None


def test_a_new_announcement_replaces_the_peers_previous_route() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "y", "a"))
    learn(t, "a", "st1", ("x", "a"))
    assert [r.path for r in t.candidates("st1")] == [("x", "a")]
    assert t.route_count == 1


def test_older_verified_sequence_of_the_same_origin_is_ignored() -> None:
    t = table()
    assert learn(t, "a", "st1", ("x", "a"), sequence=5, verified=True)
    assert not learn(t, "b", "st1", ("x", "b"), sequence=4, verified=True)
    assert [r.peer for r in t.candidates("st1")] == ["a"]
    assert t.stats.ignored_stale == 1
    # Another origin's claim is not compared with x's sequence numbers.
    assert learn(t, "b", "st1", ("z", "b"), sequence=1, verified=True)


def test_newer_verified_claim_supersedes_older_verified_claims_of_the_same_origin() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"), sequence=5, priority=3, verified=True)
    learn(t, "b", "st1", ("x", "y", "b"), sequence=6, priority=0, verified=True)
    assert [(r.peer, r.sequence) for r in t.candidates("st1")] == [("b", 6)]


def test_unverified_claims_are_not_compared_across_peers() -> None:
    # Unsigned, a sequence number proves nothing: each peer's claim stands on its own.
    t = table()
    assert learn(t, "a", "st1", ("x", "a"), sequence=5, verified=True)
    assert learn(t, "b", "st1", ("x", "b"), sequence=4)
    assert learn(t, "c", "st1", ("x", "c"), sequence=6)
    assert [(r.peer, r.sequence) for r in t.candidates("st1")] == [
        ("a", 5), ("b", 4), ("c", 6)]
    # ...and neither does a verified claim remove or outdate an unverified one.
    assert learn(t, "a", "st1", ("x", "a"), sequence=9, verified=True)
    assert len(t.candidates("st1")) == 3
    assert t.stats.ignored_stale == 0


def test_equal_routes_learned_twice_are_no_change() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"))
    t.take_changes()
    learn(t, "a", "st1", ("x", "a"))
    assert t.take_changes() == set()


# -- selection ------------------------------------------------------------------------------


def test_selection_prefers_distance_then_priority() -> None:
    t = table()
    learn(t, "a", "CSMS", ("c1", "x", "a"), priority=0)
    learn(t, "b", "CSMS", ("c2", "b"), priority=5)
    best = t.best("CSMS")
    assert best is not None and best.peer == "b"  # shorter beats better priority
    learn(t, "c", "CSMS", ("c3", "c"), priority=1)
    best = t.best("CSMS")
    assert best is not None and best.peer == "c"
    assert [r.peer for r in t.candidates("CSMS")] == ["c", "b", "a"]


def test_weight_zero_is_chosen_only_when_no_positive_weight_is_left() -> None:
    for seed in range(50):
        t = table(seed=seed)
        learn(t, "a", "CSMS", ("c1", "a"), weight=0)
        learn(t, "b", "CSMS", ("c2", "b"), weight=1)
        best = t.best("CSMS")
        assert best is not None and best.peer == "b"
        t.withdraw("b", "CSMS")
        best = t.best("CSMS")
        assert best is not None and best.peer == "a"


def test_a_tied_best_route_is_kept_when_another_equal_one_appears() -> None:
    t = table()
    learn(t, "a", "CSMS", ("c1", "a"))
    learn(t, "b", "CSMS", ("c2", "b"), weight=1000)
    best = t.best("CSMS")
    assert best is not None and best.peer == "a"  # no flap: frames keep one path


def _tied_table(seed: int) -> RouteTable:
    t = table(seed=seed)
    for index in range(200):
        for peer, weight in (("a", 1), ("b", 2), ("c", 3)):
            learn(t, peer, f"st{index}", (f"o{peer}", peer), weight=weight)
        learn(t, "near", f"st{index}", ("near",))
    # Losing the shorter route makes every destination draw among the three tied ones.
    t.drop_peer("near")
    return t


def test_best_is_repeatable_with_the_same_seed() -> None:
    first = _tied_table(seed=11)
    second = _tied_table(seed=11)
    other = _tied_table(seed=12)
    picks = [first.best(f"st{i}") for i in range(200)]
    assert picks == [second.best(f"st{i}") for i in range(200)]
    assert picks != [other.best(f"st{i}") for i in range(200)]


def _route(peer: str, weight: int) -> Route:
    return Route("d", peer, (peer,), 1, 0, weight, peer, 1, INF)


def test_weighted_choice_gives_shares_in_proportion_to_weight() -> None:
    rng = random.Random(2024)
    routes = [_route("a", 1), _route("b", 3), _route("c", 6), _route("z", 0)]
    draws = 30_000
    counts = Counter(weighted_choice(routes, rng).peer for _ in range(draws))
    assert counts["z"] == 0
    for peer, share in (("a", 0.1), ("b", 0.3), ("c", 0.6)):
        # Five standard deviations of a binomial: a fixed seed never flakes, and a biased
        # draw (e.g. uniform, or off by one weight) would still fail by far.
        sigma = math.sqrt(draws * share * (1 - share))
        assert abs(counts[peer] - draws * share) < 5 * sigma, (peer, counts)


def test_weighted_choice_among_zero_weights_is_uniform() -> None:
    rng = random.Random(5)
    routes = [_route("a", 0), _route("b", 0)]
    counts = Counter(weighted_choice(routes, rng).peer for _ in range(10_000))
    assert abs(counts["a"] - 5_000) < 5 * 50


def test_table_draws_among_tied_routes_in_proportion_to_weight() -> None:
    # A draw happens when the held best route goes and several equal ones remain: here a
    # shorter route is withdrawn, leaving a (weight 1) and b (weight 3) tied.
    t = table(seed=3)
    n = 4_000
    for index in range(n):
        learn(t, "a", f"s{index}", ("x", "a"), weight=1)
        learn(t, "b", f"s{index}", ("y", "b"), weight=3)
        learn(t, "c", f"s{index}", ("c",))
    assert {r.peer for r in t} == {"c"}
    t.drop_peer("c")
    counts = Counter(r.peer for r in t)
    sigma = math.sqrt(n * 0.25 * 0.75)
    assert abs(counts["b"] - 0.75 * n) < 5 * sigma, counts


# -- withdrawal, expiry, caps ---------------------------------------------------------------


def test_withdraw_removes_only_that_peers_route() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"))
    learn(t, "b", "st1", ("x", "y", "b"))
    assert t.withdraw("a", "st1")
    assert [r.peer for r in t.candidates("st1")] == ["b"]
    assert not t.withdraw("a", "st1")
    assert not t.withdraw("", "st1")  # local routes go through withdraw_local


def test_drop_peer_withdraws_everything_and_reports_changed_bests() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"))
    learn(t, "a", "st2", ("x", "a"))
    learn(t, "b", "st2", ("x", "y", "b"))
    learn(t, "b", "st3", ("b",))
    t.take_changes()
    assert t.drop_peer("a") == {"st1", "st2"}
    assert t.routes_via("a") == []
    assert t.best("st1") is None
    best = t.best("st2")
    assert best is not None and best.peer == "b"
    assert t.take_changes() == {"st1", "st2"}
    assert t.drop_peer("a") == set()
    assert t.peers() == ["b"]


def test_expire_removes_routes_at_their_time() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"), expires_at=10.0)
    learn(t, "b", "st1", ("x", "y", "b"), expires_at=20.0)
    learn(t, "b", "st2", ("b",), expires_at=INF)
    assert t.next_expiry() == 10.0
    assert t.expire(9.9) == set()
    assert t.expire(10.0) == {"st1"}
    best = t.best("st1")
    assert best is not None and best.peer == "b"
    assert t.expire(25.0) == {"st1"}
    assert t.best("st1") is None
    assert t.next_expiry() is None
    assert t.stats.expired == 2
    assert len(t) == 1


def test_a_refreshed_route_does_not_expire_at_its_old_time() -> None:
    t = table()
    learn(t, "a", "st1", ("x", "a"), expires_at=10.0)
    learn(t, "a", "st1", ("x", "a"), expires_at=30.0)
    t.take_changes()
    assert t.next_expiry() == 30.0
    assert t.expire(15.0) == set()
    assert t.best("st1") is not None
    assert t.take_changes() == set()  # a later expiry alone is no change to announce


def test_per_peer_cap_refuses_new_destinations_and_counts() -> None:
    t = table(max_routes_per_peer=2)
    assert learn(t, "a", "d1", ("a",))
    assert learn(t, "a", "d2", ("a",))
    assert not learn(t, "a", "d3", ("a",))
    assert not learn(t, "a", "d4", ("a",))
    assert learn(t, "a", "d1", ("x", "a"))  # updating a held destination is fine
    assert learn(t, "b", "d3", ("b",))  # the cap is per peer
    assert t.stats.refused_cap == 2
    assert t.stats.refused_by_peer == {"a": 2}
    assert len(t.routes_via("a")) == 2


def test_every_watcher_sees_each_change() -> None:
    t = table()
    first, second = t.watch(), t.watch()
    learn(t, "a", "st1", ("a",))
    assert first.take() == {"st1"}
    learn(t, "a", "st2", ("a",))
    assert first.take() == {"st2"}
    assert second.take() == {"st1", "st2"}
    t.unwatch(second)
    learn(t, "a", "st3", ("a",))
    assert not second
    assert t.take_changes() == {"st1", "st2", "st3"}


def test_attach_signatures_keeps_the_route_and_its_place() -> None:
    t = table()
    route = t.originate("st1")
    t.take_changes()
    signed = t.attach_signatures(route, ({"value": "sig"},))
    assert signed == route and signed.signatures == ({"value": "sig"},)
    best = t.best("st1")
    assert best is not None and best.signatures == ({"value": "sig"},)
    assert t.take_changes() == set()
    stale = t.originate("st1", priority=1)
    assert t.attach_signatures(route, ({"value": "old"},)) is route
    assert t.best("st1") is stale


def test_lookups_on_an_unknown_destination() -> None:
    t = table()
    assert t.best("nope") is None
    assert t.candidates("nope") == []
    assert "nope" not in t
    assert t.destinations() == []
    assert list(t) == []


def test_bad_construction_is_refused() -> None:
    with pytest.raises(ValueError):
        RouteTable("", rng=random.Random(1))
    with pytest.raises(ValueError):
        table().originate("")
    with pytest.raises(ValueError):
        table().originate("x", weight=-1)


# -- the state machine ----------------------------------------------------------------------

NODE = "me"
PEERS = ("a", "b", "c")
OTHERS = ("x", "y", "z", "a", "b", "c", NODE)
DESTINATIONS = ("d1", "d2", "d3", "CSMS")
CAP = 3


class RouteTableMachine(RuleBasedStateMachine):
    """Random operations on two tables with the same seed, checked against what may exist."""

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        self.tables = [RouteTable(NODE, rng=random.Random(seed), max_routes_per_peer=CAP,
                                  max_path_length=5) for _ in range(2)]
        self.now = 0.0
        self.expired_until = -INF
        # (destination, peer) pairs that may hold a route: added when learned, removed by
        # withdrawal, drop or expiry. The table must never hold a pair outside it.
        self.allowed: set[tuple[str, str]] = set()

    def each(self, method: str, *args: object, **kwargs: object) -> list[object]:
        results = [getattr(t, method)(*args, **kwargs) for t in self.tables]
        assert results[0] == results[1], (method, args, results)
        return results

    @rule(peer=st.sampled_from(PEERS), destination=st.sampled_from(DESTINATIONS),
          middle=st.lists(st.sampled_from(OTHERS), max_size=5, unique=True),
          priority=st.integers(0, 2), weight=st.integers(0, 3), sequence=st.integers(0, 4),
          ttl=st.none() | st.floats(0.5, 20.0), forge=st.booleans(), verified=st.booleans())
    def learn(self, peer: str, destination: str, middle: list[str], priority: int,
              weight: int, sequence: int, ttl: float | None, forge: bool,
              verified: bool) -> None:
        hops = [hop for hop in middle if hop != peer]
        path = (*hops, "z" if forge and peer != "z" else peer)
        expires_at = INF if ttl is None else self.now + ttl
        accepted = self.each("learn", peer, destination, path, priority, weight, path[0],
                             sequence, expires_at, verified=verified)[0]
        event("learn accepted" if accepted else "learn refused")
        if accepted:
            self.allowed.add((destination, peer))

    @rule(peer=st.sampled_from(PEERS), destination=st.sampled_from(DESTINATIONS))
    def withdraw(self, peer: str, destination: str) -> None:
        self.each("withdraw", peer, destination)
        self.allowed.discard((destination, peer))
        for t in self.tables:
            assert all(r.peer != peer for r in t.candidates(destination))

    @rule(peer=st.sampled_from(PEERS))
    def drop_peer(self, peer: str) -> None:
        self.each("drop_peer", peer)
        self.allowed = {pair for pair in self.allowed if pair[1] != peer}
        for t in self.tables:
            assert t.routes_via(peer) == []

    @rule(destination=st.sampled_from(DESTINATIONS), priority=st.integers(0, 2),
          weight=st.integers(0, 3))
    def originate(self, destination: str, priority: int, weight: int) -> None:
        self.each("originate", destination, priority=priority, weight=weight)
        self.allowed.add((destination, LOCAL))

    @rule(destination=st.sampled_from(DESTINATIONS))
    def withdraw_local(self, destination: str) -> None:
        self.each("withdraw_local", destination)
        self.allowed.discard((destination, LOCAL))

    @rule(seconds=st.floats(0.0, 10.0))
    def advance_and_expire(self, seconds: float) -> None:
        self.now += seconds
        self.each("expire", self.now)
        self.expired_until = self.now

    @precondition(lambda self: hasattr(self, "tables"))
    @invariant()
    def routes_are_loop_free_and_consistent(self) -> None:
        for t in self.tables:
            for destination in DESTINATIONS:
                for route in t.candidates(destination):
                    assert (destination, route.peer) in self.allowed
                    assert route.expires_at > self.expired_until
                    if route.is_local:
                        assert route.path == () and route.origin == NODE
                        continue
                    assert NODE not in route.path
                    assert len(set(route.path)) == len(route.path)
                    assert route.path[-1] == route.peer and route.path[0] == route.origin
                    assert route.distance == len(route.path) <= t.max_path_length

    @precondition(lambda self: hasattr(self, "tables"))
    @invariant()
    def best_is_among_the_top_candidates_and_repeatable(self) -> None:
        for destination in DESTINATIONS:
            bests = [t.best(destination) for t in self.tables]
            assert bests[0] == bests[1]
            candidates = self.tables[0].candidates(destination)
            best = bests[0]
            if best is None:
                assert candidates == []
                continue
            assert candidates[0] == best
            if any(r.is_local for r in candidates):
                assert best.is_local
            else:
                top = min((r.distance, r.priority) for r in candidates)
                assert (best.distance, best.priority) == top
                tier = [r for r in candidates if (r.distance, r.priority) == top]
                if any(r.weight > 0 for r in tier):
                    assert best.weight > 0

    @precondition(lambda self: hasattr(self, "tables"))
    @invariant()
    def caps_hold_and_one_verified_claim_per_origin_sequence(self) -> None:
        for t in self.tables:
            for peer in PEERS:
                assert len(t.routes_via(peer)) <= CAP
            for destination in DESTINATIONS:
                # Only verified claims are ordered across peers; unverified ones stand alone.
                verified = [r for r in t.candidates(destination) if r.verified]
                newest: dict[str, int] = {}
                for route in verified:
                    newest[route.origin] = max(newest.get(route.origin, -1), route.sequence)
                for route in verified:
                    assert route.sequence == newest[route.origin]
            assert t.route_count == sum(len(t.candidates(d)) for d in DESTINATIONS)
            assert len(t) == sum(1 for d in DESTINATIONS if t.best(d) is not None)


RouteTableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                               deadline=None)
TestRouteTable = RouteTableMachine.TestCase
