"""Route-exchange benchmark: convergence of a 100-node overlay and a 100k-route full sync.

    .venv/bin/python bench/routes.py                  # everything, ~15 s
    .venv/bin/python bench/routes.py --routes 200000  # a bigger full sync
    .venv/bin/python bench/routes.py --signed 0       # skip the Ed25519 figures

Part 1 runs ``topology.sim`` (the sans-IO sessions over in-memory links, a fake clock,
payloads JSON-encoded on the way): a seeded random connected graph of 100 nodes, each
originating its id and a few stations, three of them "CSMS". It prints rounds (clock
instants at which something was delivered or a timer fired), messages, route entries and
withdrawals sent, and simulated seconds to converge from cold start, after a link failure
and after a node failure, plus the wall-clock time of each run.

Part 2 times a full sync of N station routes between two sessions: node A's table holds
N local routes; A's session builds the full-sync payloads on link up, B's session
receives them into B's table. Printed with and without a JSON round trip (what the wire
adds), against the aim of <= 2 s for 100,000 routes, once with Python's default garbage
collector settings and once with the node's (``router/cli/main.py``: ``gc.freeze()`` and
thresholds 20,000/20/20), which is what a running node pays. Part 3 does the same with Ed25519
signatures per route (signed once at the origin, verified at the receiver).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from topology import ExchangeSession, RouteTable
from topology.sim import (
    Convergence,
    Simulation,
    node_name,
    random_connected_graph,
)

AIM_SYNC_S = 2.0


def build_sim(nodes: int, extra_links: int, stations: int, seed: int) -> Simulation:
    graph = random_connected_graph(nodes, extra_links, random.Random(seed))
    sim = Simulation(graph, seed=seed)
    for node in sorted(graph):
        sim.originate(node, node)
        for index in range(stations):
            sim.originate(node, f"cs-{node}-{index}")
    for index, priority in ((7, 0), (nodes // 2, 0), (nodes - 7, 1)):
        sim.originate(node_name(index), "CSMS", priority=priority)
    return sim


def connected_without(graph: Mapping[str, set[str]], skip_node: str | None = None,
                      skip_link: frozenset[str] | None = None) -> bool:
    start = next(node for node in sorted(graph) if node != skip_node)
    seen = {start}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for neighbour in graph[current]:
            if neighbour == skip_node or frozenset((current, neighbour)) == skip_link:
                continue
            if neighbour not in seen:
                seen.add(neighbour)
                queue.append(neighbour)
    return len(seen) == len(graph) - (1 if skip_node else 0)


def timed_run(sim: Simulation) -> tuple[Convergence, float]:
    started = time.perf_counter()
    stats = sim.run()
    return stats, time.perf_counter() - started


def print_convergence(label: str, stats: Convergence, wall_s: float) -> None:
    print(f"  {label:<14} {stats.rounds:>7} {stats.messages:>9} {stats.routes_sent:>9} "
          f"{stats.withdrawals_sent:>9} {stats.simulated_s:>9.2f} {wall_s:>8.2f}")


def convergence(nodes: int, extra_links: int, stations: int, seed: int) -> bool:
    sim = build_sim(nodes, extra_links, stations, seed)
    destinations = nodes * (1 + stations) + 1
    links = sum(len(peers) for peers in sim.graph.values()) // 2
    print(f"overlay: {nodes} nodes, {links} links, {destinations} destinations, seed {seed}, "
          f"link latency {sim.latency_s * 1000:.0f} ms, batch window 200 ms")
    print(f"  {'scenario':<14} {'rounds':>7} {'messages':>9} {'routes':>9} {'withdrawn':>9} "
          f"{'sim s':>9} {'wall s':>8}")
    sim.start()
    stats, wall = timed_run(sim)
    print_convergence("cold start", stats, wall)
    ok = all(len(node.table) == destinations for node in sim.nodes.values())

    rng = random.Random(seed)
    links_sorted = sorted(tuple(sorted(link)) for link in sim.links_up)
    a, b = next(link for link in rng.sample(links_sorted, len(links_sorted))
                if connected_without(sim.graph, skip_link=frozenset(link)))
    sim.fail_link(a, b)
    stats, wall = timed_run(sim)
    print_convergence(f"link {a}-{b}", stats, wall)
    ok = ok and all(len(node.table) == destinations for node in sim.nodes.values())

    csms_origins = {route.peer or node for node, held in sim.nodes.items()
                    for route in held.table.routes_via("") if route.destination == "CSMS"}
    victim = next(node for node in sorted(sim.graph, key=lambda n: (-len(sim.graph[n]), n))
                  if node not in csms_origins and connected_without(sim.graph, skip_node=node))
    sim.fail_node(victim)
    stats, wall = timed_run(sim)
    print_convergence(f"node {victim}", stats, wall)
    alive = [node for node in sim.nodes.values() if node.alive]
    ok = ok and all(len(node.table) == destinations - 1 - stations for node in alive)
    print(f"  tables complete and consistent in size: {'yes' if ok else 'NO'}")
    return ok


def full_sync(count: int, sign: Callable[[bytes], dict[str, Any]] | None = None,
              verify: Callable[[str, bytes, Mapping[str, Any]], bool] | None = None,
              wire: bool = False) -> dict[str, float]:
    """Time one full sync of ``count`` station routes from A to B."""
    table_a = RouteTable("A", rng=random.Random(1))
    table_b = RouteTable("B", rng=random.Random(2))
    for index in range(count):
        table_a.originate(f"station-{index:06d}")
    sender = ExchangeSession("A", "B", table_a, sign=sign)
    receiver = ExchangeSession("B", "A", table_b, verify=verify)
    receiver.link_up(0.0)
    started = time.perf_counter()
    payloads = sender.link_up(0.0)
    built = time.perf_counter()
    if wire:
        texts = [json.dumps(payload) for payload in payloads]
        encoded = time.perf_counter()
        payloads = [json.loads(text) for text in texts]
        decoded = time.perf_counter()
    else:
        encoded = decoded = built
    for payload in payloads:
        events = receiver.receive(payload, 0.0)
        assert not any(type(event).__name__ == "AnnouncementRejected" for event in events)
    done = time.perf_counter()
    assert len(table_b) == count, (len(table_b), count)
    return {"build": built - started, "encode": encoded - built, "decode": decoded - encoded,
            "receive": done - decoded, "total": done - started, "messages": len(payloads)}


def print_sync(label: str, count: int, figures: dict[str, float]) -> None:
    total = figures["total"]
    print(f"  {label:<26} {count:>8,} routes {int(figures['messages']):>4} msgs  "
          f"build {figures['build']:.3f}  encode {figures['encode']:.3f}  "
          f"decode {figures['decode']:.3f}  receive {figures['receive']:.3f}  "
          f"total {total:.3f} s  ({total / count * 1e6:.1f} us/route)")


def ed25519_pair() -> tuple[Callable[[bytes], dict[str, Any]],
                            Callable[[str, bytes, Mapping[str, Any]], bool]]:
    import base64

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = key.public_key()

    def sign(data: bytes) -> dict[str, Any]:
        return {"keyId": "A", "algorithm": "Ed25519", "timestamp": "2026-01-01T00:00:00Z",
                "value": base64.b64encode(key.sign(data)).decode()}

    def verify(origin: str, data: bytes, signature: Mapping[str, Any]) -> bool:
        if origin != "A":
            return False
        try:
            public.verify(base64.b64decode(str(signature["value"])), data)
        except (InvalidSignature, ValueError):
            return False
        return True

    return sign, verify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--extra-links", type=int, default=60)
    parser.add_argument("--stations", type=int, default=2, help="stations per node")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--signed", type=int, default=20_000,
                        help="routes for the Ed25519 full sync (0: skip)")
    args = parser.parse_args()

    ok = convergence(args.nodes, args.extra_links, args.stations, args.seed)
    print()
    print("full sync between two sessions (one core, wall clock):")
    plain = full_sync(args.routes)
    print_sync("dicts in, dicts out", args.routes, plain)
    wire = full_sync(args.routes, wire=True)
    print_sync("with JSON on the wire", args.routes, wire)
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        tuned = full_sync(args.routes, wire=True)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    print_sync("JSON, node's GC settings", args.routes, tuned)
    for label, figures in (("default GC", wire), ("node's GC", tuned)):
        verdict = "within" if figures["total"] <= AIM_SYNC_S else "ABOVE"
        print(f"  aim <= {AIM_SYNC_S:.0f} s for 100,000 routes, {label}: {verdict} "
              f"({figures['total'] * 100_000 / args.routes:.2f} s scaled to 100,000, "
              f"with JSON)")
    if args.signed:
        sign, verify = ed25519_pair()
        signed = full_sync(args.signed, sign=sign, verify=verify, wire=True)
        print_sync("Ed25519 per route, JSON", args.signed, signed)
        print(f"  scaled to 100,000 routes: {signed['total'] * 100_000 / args.signed:.1f} s "
              f"(signing happens once per claim at the origin; verification once per "
              f"claim and peer, or once per node with a shared CachedVerifier)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
