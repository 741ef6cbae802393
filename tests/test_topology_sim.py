"""100 simulated nodes converge to loop-free shortest-path routes, also after failures."""

from __future__ import annotations

import random
from collections import deque
from itertools import pairwise

import pytest

from topology.sim import Convergence, Simulation, node_name, random_connected_graph

NODES = 100
EXTRA_LINKS = 60
STATIONS = 2
CSMS_AT = {node_name(7): 0, node_name(42): 0, node_name(93): 1}


def distances(sim: Simulation, source: str) -> dict[str, int]:
    """Hop counts from ``source`` over the links that are up (plain BFS)."""
    seen = {source: 0}
    queue = deque([source])
    while queue:
        current = queue.popleft()
        for neighbour in sim.graph[current]:
            if neighbour not in seen and frozenset((current, neighbour)) in sim.links_up:
                seen[neighbour] = seen[current] + 1
                queue.append(neighbour)
    return seen


def claims(sim: Simulation) -> dict[str, dict[str, int]]:
    """destination -> {origin: priority} for the nodes still alive."""
    result: dict[str, dict[str, int]] = {}
    for node_id, node in sim.nodes.items():
        if not node.alive:
            continue
        for route in node.table.routes_via(""):
            result.setdefault(route.destination, {})[node_id] = route.priority
    return result


def assert_converged_correctly(sim: Simulation) -> None:
    """Every live node routes every destination it can reach, along a loop-free path of
    shortest length to a right origin, and holds nothing it cannot reach."""
    expected = claims(sim)
    for node_id, node in sim.nodes.items():
        if not node.alive:
            continue
        hops = distances(sim, node_id)
        held = set(node.table.destinations())
        for destination, origins in expected.items():
            reachable = {origin: prio for origin, prio in origins.items() if origin in hops}
            route = node.table.best(destination)
            if not reachable:
                assert route is None, (node_id, destination, route)
                continue
            held.discard(destination)
            nearest = min(hops[origin] for origin in reachable)
            best_priority = min(prio for origin, prio in reachable.items()
                                if hops[origin] == nearest)
            right = {origin for origin, prio in reachable.items()
                     if hops[origin] == nearest and prio == best_priority}
            assert route is not None, (node_id, destination)
            assert route.distance == nearest, (node_id, destination, route)
            assert route.origin in right, (node_id, destination, route)
            if not route.is_local:
                walk = (*route.path, node_id)
                assert len(set(walk)) == len(walk), walk
                assert all(frozenset(pair) in sim.links_up for pair in pairwise(walk))
            forwarding = sim.forwarding_path(node_id, destination)
            assert forwarding is not None, (node_id, destination)
            assert len(forwarding) == nearest + 1 and forwarding[-1] in right
        assert not held, (node_id, held)  # nothing unreachable or withdrawn lingers


def build(seed: int = 1, **kwargs: bool) -> Simulation:
    graph = random_connected_graph(NODES, EXTRA_LINKS, random.Random(seed))
    sim = Simulation(graph, seed=seed, **kwargs)
    for node in sorted(graph):
        sim.originate(node, node)
        for index in range(STATIONS):
            sim.originate(node, f"cs-{node}-{index}")
    for node, priority in CSMS_AT.items():
        sim.originate(node, "CSMS", priority=priority)
    return sim


def connected_without(sim: Simulation, node: str | None = None,
                      link: frozenset[str] | None = None) -> bool:
    start = next(n for n in sorted(sim.graph) if n != node)
    seen = {start}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for neighbour in sim.graph[current]:
            if neighbour == node or frozenset((current, neighbour)) == link:
                continue
            if neighbour not in seen:
                seen.add(neighbour)
                queue.append(neighbour)
    return len(seen) == len(sim.graph) - (1 if node else 0)


@pytest.fixture(scope="module")
def cold() -> tuple[Simulation, Convergence]:
    sim = build()
    sim.start()
    return sim, sim.run()


def test_cold_start_converges_to_shortest_loop_free_routes(
    cold: tuple[Simulation, Convergence]
) -> None:
    sim, stats = cold
    assert_converged_correctly(sim)
    assert stats.rejected == [] and stats.expired == []
    destinations = NODES * (1 + STATIONS) + 1
    assert all(len(node.table) == destinations for node in sim.nodes.values())
    assert stats.simulated_s < 5.0


def test_link_failure_reroutes_and_recovery_restores(
    cold: tuple[Simulation, Convergence]
) -> None:
    sim, _ = cold
    rng = random.Random(5)
    links = sorted(tuple(sorted(link)) for link in sim.links_up)
    a, b = next(link for link in rng.sample(links, len(links))
                if connected_without(sim, link=frozenset(link)))
    sim.fail_link(a, b)
    stats = sim.run()
    assert stats.messages > 0
    assert_converged_correctly(sim)
    sim.restore_link(a, b)
    sim.run()
    assert_converged_correctly(sim)


def test_node_failure_withdraws_its_destinations_everywhere(
    cold: tuple[Simulation, Convergence]
) -> None:
    sim, _ = cold
    victim = next(node for node in sorted(sim.graph, key=lambda n: -len(sim.graph[n]))
                  if node not in CSMS_AT and connected_without(sim, node=node))
    sim.fail_node(victim)
    sim.run()
    assert_converged_correctly(sim)
    for node in sim.nodes.values():
        if node.alive:
            assert node.table.best(victim) is None
            assert node.table.best(f"cs-{victim}-0") is None


def test_a_partition_loses_exactly_the_other_side() -> None:
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"b", "d"}, "d": {"c"}}
    sim = Simulation(graph)
    for node in graph:
        sim.originate(node, node)
    sim.start()
    sim.run()
    sim.fail_link("b", "c")
    sim.run()
    assert_converged_correctly(sim)
    assert set(sim.nodes["a"].table.destinations()) == {"a", "b"}


def test_signed_simulation_converges_without_rejections() -> None:
    graph = random_connected_graph(30, 20, random.Random(3))
    sim = Simulation(graph, seed=3, signed=True)
    for node in graph:
        sim.originate(node, node)
        sim.originate(node, f"cs-{node}")
    sim.start()
    stats = sim.run()
    assert stats.rejected == []
    assert_converged_correctly(sim)
    route = sim.nodes[node_name(0)].table.best(node_name(29))
    assert route is not None and route.signatures


def test_the_simulation_is_repeatable() -> None:
    def run() -> tuple[int, int, int, float, list[tuple[str, ...]]]:
        graph = random_connected_graph(40, 30, random.Random(9))
        sim = Simulation(graph, seed=9)
        for node in graph:
            sim.originate(node, node)
            sim.originate(node, "CSMS")  # anycast everywhere: many ties to draw
        sim.start()
        stats = sim.run()
        paths = [sim.nodes[n].table.best("CSMS").path for n in sorted(graph)]  # type: ignore[union-attr]
        return stats.rounds, stats.messages, stats.routes_sent, stats.simulated_s, paths

    assert run() == run()


def test_silent_links_expire_by_hold_timer() -> None:
    graph = {"a": {"b"}, "b": {"a"}}
    sim = Simulation(graph, hold_time_s=9.0, keepalive_s=3.0)
    sim.originate("a", "a")
    sim.start()
    sim.run()
    stats = sim.advance(60.0)
    assert stats.expired == [] and stats.keepalives >= 30
    sim.mute_link("a", "b")
    stats = sim.advance(20.0)
    assert sorted(e.peer for e in stats.expired) == ["a", "b"]
    assert sim.nodes["b"].table.best("a") is None


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_changed_claims_reach_every_candidate_route(signed: bool) -> None:
    # Unsigned, a node no longer lets one peer's newer claim remove another peer's older
    # one (docs/protocol.md 5.3): each peer must bring its own update, and does.
    graph = random_connected_graph(40, 30, random.Random(4))
    sim = Simulation(graph, seed=4, signed=signed)
    for node in graph:
        sim.originate(node, node)
    for node, priority in ((node_name(3), 0), (node_name(30), 1)):
        sim.originate(node, "CSMS", priority=priority)
    sim.start()
    sim.run()
    sim.originate(node_name(3), "CSMS", priority=2)
    sim.originate(node_name(30), "CSMS", priority=1, weight=5)
    sim.originate(node_name(7), node_name(7), priority=4)
    stats = sim.run()
    assert stats.rejected == []
    assert_converged_correctly(sim)
    claims = {(route.origin, route.destination): (route.priority, route.weight, route.sequence)
              for node in sim.nodes.values() for route in node.table.routes_via("")}
    for node in sim.nodes.values():
        for destination in node.table.destinations():
            for route in node.table.candidates(destination):
                claim = (route.priority, route.weight, route.sequence)
                assert claim == claims[(route.origin, destination)], (node.node_id, route)
