"""The overlay as this node sees it: nodes, links between them, backends, stations."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from router.admin.view import NodeView
from router.wire.overlay_frames import ANYCAST_CSMS


@dataclass(slots=True)
class TopoNode:
    """One node of the overlay picture."""

    id: str
    kind: str  # self | peer | down (a configured peer not connected) | remote
    stations: int = 0
    backends: list[tuple[str, str]] = field(default_factory=list)  # (name, role)
    hops: int = 0
    x: float = 0.0
    y: float = 0.0


@dataclass(slots=True)
class Topology:
    """The overlay as this node sees it: nodes, links between them, stations per node."""

    me: str
    nodes: dict[str, TopoNode]
    edges: dict[tuple[str, str], str]  # (a, b) sorted -> link | down | route
    encodings: dict[tuple[str, str], str]


def _edge(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def topology_model(node: NodeView) -> Topology:
    """Who is where: this node, its peers, nodes known from routes, backends, stations."""
    me = node.config.node.id
    overlay = node.overlay
    table = overlay.table
    nodes: dict[str, TopoNode] = {me: TopoNode(me, "self", stations=len(node.sessions.local),
                                               backends=[(b.name, b.role)
                                                         for b in node.config.backends])}
    edges: dict[tuple[str, str], str] = {}
    encodings: dict[tuple[str, str], str] = {}
    for peer_id, link in overlay.links.items():
        nodes[peer_id] = TopoNode(peer_id, "peer")
        edges[_edge(me, peer_id)] = "link"
        encodings[_edge(me, peer_id)] = link.encoding
    for entry in node.config.peers:
        if entry.id not in nodes:
            nodes[entry.id] = TopoNode(entry.id, "down")
            edges[_edge(me, entry.id)] = "down"
    routes = [route for destination in table.destinations()
              for route in table.candidates(destination)]
    for route in routes:
        if route.is_local:
            continue
        chain = [*route.path, me]
        for hop in route.path:
            nodes.setdefault(hop, TopoNode(hop, "remote"))
        for a, b in itertools.pairwise(chain):
            edges.setdefault(_edge(a, b), "route")
    node_ids = set(nodes) | {r.origin for r in routes if r.destination == r.origin}
    for node_id in node_ids:
        nodes.setdefault(node_id, TopoNode(node_id, "remote"))
    csms_at = {r.origin for r in table.candidates(ANYCAST_CSMS) if r.origin != me}
    for origin in sorted(csms_at):
        nodes.setdefault(origin, TopoNode(origin, "remote")).backends.append(
            (ANYCAST_CSMS, "primary"))
    for destination in table.destinations():
        best = table.best(destination)
        if (best is None or destination in node_ids or destination == ANYCAST_CSMS
                or best.origin == me):
            continue
        nodes.setdefault(best.origin, TopoNode(best.origin, "remote")).stations += 1
    _hops(me, nodes, edges)
    return Topology(me, nodes, edges, encodings)


def _hops(me: str, nodes: dict[str, TopoNode], edges: dict[tuple[str, str], str]) -> None:
    neighbours: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    seen = {me: 0}
    frontier = [me]
    while frontier:
        following = []
        for current in frontier:
            for other in sorted(neighbours.get(current, ())):
                if other not in seen:
                    seen[other] = seen[current] + 1
                    following.append(other)
        frontier = following
    deepest = max(seen.values(), default=0)
    for node_id, topo in nodes.items():
        topo.hops = seen.get(node_id, deepest + 1)


