"""A deterministic simulation of many nodes exchanging routes over in-memory links.

Every node is a :class:`~topology.table.RouteTable` with one
:class:`~topology.exchange.ExchangeSession` per neighbour; links are a shared queue of
payloads (JSON-encoded on the way, as on the wire) delivered after ``latency_s`` of a fake
clock. Used by the tests (convergence, loop freedom) and by ``bench/routes.py``.

The clock jumps from one event to the next (a delivery or a session deadline); a *round*
is one such instant, at which everything due is delivered and every due session ticks.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from topology.exchange import (
    AnnouncementRejected,
    CachedVerifier,
    ExchangeSession,
    PeerExpired,
)
from topology.messages import JSONDict, SignFn, VerifyFn
from topology.table import RouteTable


def node_name(index: int) -> str:
    """The simulated id of node ``index``."""
    return f"n{index:03d}"


def random_connected_graph(nodes: int, extra_links: int, rng: random.Random) -> dict[str, set[str]]:
    """A connected graph: a random tree over ``nodes`` plus ``extra_links`` random links."""
    if nodes < 1:
        raise ValueError("need at least one node")
    names = [node_name(index) for index in range(nodes)]
    graph: dict[str, set[str]] = {name: set() for name in names}
    for index in range(1, nodes):
        other = names[rng.randrange(index)]
        graph[names[index]].add(other)
        graph[other].add(names[index])
    possible = nodes * (nodes - 1) // 2 - (nodes - 1)
    added = 0
    while added < min(extra_links, possible):
        a, b = rng.sample(names, 2)
        if b not in graph[a]:
            graph[a].add(b)
            graph[b].add(a)
            added += 1
    return graph


@dataclass(slots=True)
class SimNode:
    """One simulated node: its table and one session per neighbour."""

    node_id: str
    table: RouteTable
    sessions: dict[str, ExchangeSession] = field(default_factory=dict)
    alive: bool = True


@dataclass(slots=True)
class Convergence:
    """What one run to quiescence cost."""

    rounds: int = 0
    messages: int = 0
    keepalives: int = 0
    routes_sent: int = 0
    withdrawals_sent: int = 0
    simulated_s: float = 0.0
    rejected: list[AnnouncementRejected] = field(default_factory=list)
    expired: list[PeerExpired] = field(default_factory=list)


def _hmac_signer(node_id: str, keys: Mapping[str, bytes]) -> SignFn:
    key = keys[node_id]

    def sign(data: bytes) -> dict[str, Any]:
        value = hmac.new(key, data, hashlib.sha256).hexdigest()
        return {"keyId": node_id, "value": value, "algorithm": "HMAC-SHA256", "timestamp": ""}

    return sign


def _hmac_verifier(keys: Mapping[str, bytes]) -> VerifyFn:
    def verify(origin: str, data: bytes, signature: Mapping[str, Any]) -> bool:
        key = keys.get(origin)
        if key is None:
            return False
        expected = hmac.new(key, data, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, str(signature.get("value", "")))

    return verify


class Simulation:
    """Nodes wired as ``graph`` through in-memory links and a fake clock.

    With ``signed``, each node signs its claims with an HMAC key and verifies every route
    against the keys of all nodes (a stand-in for real signatures, to exercise the path).
    """

    def __init__(
        self,
        graph: Mapping[str, Iterable[str]],
        *,
        seed: int = 0,
        latency_s: float = 0.01,
        batch_window_s: float = 0.2,
        hold_time_s: float = 90.0,
        keepalive_s: float = 30.0,
        signed: bool = False,
    ) -> None:
        self.graph: dict[str, set[str]] = {node: set(peers) for node, peers in graph.items()}
        self.latency_s = latency_s
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.links_up: set[frozenset[str]] = set()
        self._generation: dict[frozenset[str], int] = {}
        self._muted: set[frozenset[str]] = set()
        self._queue: list[tuple[float, int, str, str, int, str]] = []
        self._counter = itertools.count()
        self._non_keepalive_in_flight = 0
        # Counts since the last run()/advance() returned, so a run includes the full syncs
        # sent when links came up just before it.
        self._stats = Convergence()
        keys = {node: hashlib.sha256(f"key:{node}".encode()).digest() for node in self.graph}
        verify = _hmac_verifier(keys) if signed else None
        for index, node_id in enumerate(sorted(self.graph)):
            table = RouteTable(node_id, rng=random.Random(seed * 1_000_003 + index))
            node = SimNode(node_id, table)
            node_verify = CachedVerifier(verify) if verify is not None else None
            sign = _hmac_signer(node_id, keys) if signed else None
            for peer in sorted(self.graph[node_id]):
                node.sessions[peer] = ExchangeSession(
                    node_id, peer, table, hold_time_s=hold_time_s, keepalive_s=keepalive_s,
                    batch_window_s=batch_window_s, sign=sign, verify=node_verify)
            self.nodes[node_id] = node

    # -- set-up and failures -----------------------------------------------------------

    def originate(self, node: str, destination: str, *, priority: int = 0,
                  weight: int = 1) -> None:
        """Let ``node`` claim ``destination``."""
        self.nodes[node].table.originate(destination, priority=priority, weight=weight)

    def withdraw_local(self, node: str, destination: str) -> None:
        """Let ``node`` stop claiming ``destination``."""
        self.nodes[node].table.withdraw_local(destination)

    def start(self) -> None:
        """Bring every link up at the current time (cold start)."""
        for a in sorted(self.graph):
            for b in sorted(self.graph[a]):
                if a < b:
                    self.restore_link(a, b)

    def restore_link(self, a: str, b: str) -> None:
        """Bring the link a-b up: both sides send their full sync."""
        link = frozenset((a, b))
        if link in self.links_up or not (self.nodes[a].alive and self.nodes[b].alive):
            return
        self.links_up.add(link)
        self._muted.discard(link)
        self._generation[link] = self._generation.get(link, 0) + 1
        for src, dst in ((a, b), (b, a)):
            self._send(src, dst, self.nodes[src].sessions[dst].link_up(self.now))

    def fail_link(self, a: str, b: str) -> None:
        """Cut the link a-b: in-flight payloads are lost, both sides see the link go down."""
        link = frozenset((a, b))
        if link not in self.links_up:
            return
        self.links_up.discard(link)
        self._generation[link] += 1
        self.nodes[a].sessions[b].link_down(self.now)
        self.nodes[b].sessions[a].link_down(self.now)

    def mute_link(self, a: str, b: str) -> None:
        """Lose everything sent over a-b from now on without telling either side, so only
        the hold timers can notice (a link that hangs rather than closes)."""
        self._muted.add(frozenset((a, b)))

    def fail_node(self, node: str) -> None:
        """Stop ``node``: all its links go down and it stays silent."""
        for peer in sorted(self.graph[node]):
            self.fail_link(node, peer)
        self.nodes[node].alive = False

    # -- running -----------------------------------------------------------------------

    def quiet(self) -> bool:
        """No route-carrying payload in flight and no session with changes to send."""
        if self._non_keepalive_in_flight:
            return False
        return not any(
            session.has_pending_updates
            for node in self.nodes.values() if node.alive
            for session in node.sessions.values()
        )

    def run(self, *, max_rounds: int = 100_000) -> Convergence:
        """Advance the clock event by event until the network is quiet."""
        stats = self._stats
        started = self.now
        while not self.quiet():
            if stats.rounds >= max_rounds:
                raise RuntimeError(f"no convergence after {max_rounds} rounds")
            self._step(stats)
        stats.simulated_s = self.now - started
        self._stats = Convergence()
        return stats

    def advance(self, seconds: float) -> Convergence:
        """Advance the clock by ``seconds``, handling every event on the way (keepalives,
        hold timers), even when the network is quiet."""
        stats = self._stats
        until = self.now + seconds
        while True:
            upcoming = self._next_event()
            if upcoming is None or upcoming > until:
                break
            self._step(stats)
        self.now = until
        stats.simulated_s = seconds
        self._stats = Convergence()
        return stats

    def _next_event(self) -> float | None:
        times = [self._queue[0][0]] if self._queue else []
        for node in self.nodes.values():
            if not node.alive:
                continue
            for session in node.sessions.values():
                deadline = session.next_deadline()
                if deadline is not None:
                    times.append(deadline)
        return min(times) if times else None

    def _step(self, stats: Convergence) -> None:
        upcoming = self._next_event()
        if upcoming is None:
            return
        self.now = max(self.now, upcoming)
        stats.rounds += 1
        queue = self._queue
        while queue and queue[0][0] <= self.now:
            _, _, src, dst, generation, text = heapq.heappop(queue)
            payload = json.loads(text)
            if payload["networkTopologyInformation"]["kind"] != "keepalive":
                self._non_keepalive_in_flight -= 1
            link = frozenset((src, dst))
            if self._generation.get(link) != generation or link in self._muted:
                continue  # the link went down (or hangs) while the payload was in flight
            for event in self.nodes[dst].sessions[src].receive(payload, self.now):
                if isinstance(event, AnnouncementRejected):
                    stats.rejected.append(event)
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            if not node.alive:
                continue
            for peer, session in node.sessions.items():
                deadline = session.next_deadline()
                if deadline is None or deadline > self.now:
                    continue
                self._send(node_id, peer, session.tick(self.now))
                for event in session.take_events():
                    if isinstance(event, PeerExpired):
                        stats.expired.append(event)

    def _send(self, src: str, dst: str, payloads: list[JSONDict]) -> None:
        link = frozenset((src, dst))
        stats = self._stats
        for payload in payloads:
            info = payload["networkTopologyInformation"]
            stats.messages += 1
            if info["kind"] == "keepalive":
                stats.keepalives += 1
            else:
                self._non_keepalive_in_flight += 1
            stats.routes_sent += len(info["routes"])
            stats.withdrawals_sent += len(info.get("withdrawn", ()))
            heapq.heappush(self._queue, (self.now + self.latency_s, next(self._counter), src,
                                         dst, self._generation[link], json.dumps(payload)))

    # -- inspection --------------------------------------------------------------------

    def forwarding_path(self, node: str, destination: str) -> list[str] | None:
        """The nodes a frame for ``destination`` visits from ``node`` by following each
        node's best route, ending at the node that holds it locally; None if it is dropped
        or loops."""
        visited = [node]
        current = node
        while True:
            route = self.nodes[current].table.best(destination)
            if route is None:
                return None
            if route.is_local:
                return visited
            current = route.peer
            if current in visited:
                return None
            visited.append(current)
