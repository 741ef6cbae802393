"""The operator's admin HTTP endpoint: health, Prometheus metrics, routes, links, topology.

A plain ASGI application served by hypercorn on the node's own trio loop (``[admin]`` in
the config). Every view reads the node's live structures when it is asked for; nothing
is added to the forwarding path. The endpoint has no authentication of its own: bind it
to loopback or a management network (see docs/operations.md).

=================  ==========================================================
``GET /healthz``   200 ``ok``, or 503 with the reason (listener down, no backend)
``GET /metrics``   Prometheus text (or OpenMetrics when asked), ``ocpp_router_*``
``GET /routes``    the route table as JSON
``GET /links``     stations, backends, peers and secondaries as JSON
``GET /topology``  an HTML page with the overlay drawn as inline SVG (no scripts);
                   ``GET /topology.svg`` the drawing alone
``POST /reload``   ``node.reload()`` where the node has it (policy, credentials, ...)
=================  ==========================================================
"""

from __future__ import annotations

import html
import inspect
import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from router import __version__
from router.config import BackendEntry
from router.failover import FailoverLink
from router.logs import log_event
from router.mesh import VirtualLink
from router.net.dns import SrvUnavailable
from router.net.wslink import Link, WsLink
from router.stats import BOUNDS_NS
from router.wire.overlay_frames import ANYCAST_CSMS

if TYPE_CHECKING:
    from router.node import Node
    from router.session import StationSession

log = logging.getLogger("router.admin")

PROBE_TIMEOUT_S = 0.5  # one TCP connect to a backend target, for /healthz
HEALTH_TTL_S = 1.0  # a probed verdict is reused this long: scrapes never hammer a backend
# The exported residence buckets: every 5th bound of router/stats.py's from ~10 us (2.5x
# apart, like Prometheus' defaults, 18 of them up to ~57 s); being stats bounds, exact.
_EXPORTED_BOUNDS = frozenset(range(13, len(BOUNDS_NS), 5))
_MAX_DRAWN_NODES = 120


# --- health ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """The verdict of ``/healthz``: healthy, or the reason it is not."""

    ok: bool
    reason: str = ""


class HealthCheck:
    """Whether the node can serve stations: its listener is up and a backend is reachable.

    An open backend link is proof enough. Without one, every primary backend is probed
    with a TCP connect (targets in SRV order, ``PROBE_TIMEOUT_S`` each), and the verdict
    is kept for ``HEALTH_TTL_S`` so that frequent checks cost a backend nothing. A node
    without primaries (chained) is healthy while a connected peer offers a route to
    ``"CSMS"``.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self._cached: tuple[float, Health] | None = None
        self._lock = trio.Lock()

    async def check(self) -> Health:
        problem = listener_problem(self.node)
        if problem is not None:
            return Health(False, problem)
        if any(_is_open(s.backend.ws) for s in all_sessions(self.node)):
            return Health(True)
        async with self._lock:  # concurrent checks share one probe
            cached = self._cached
            if cached is not None and cached[0] > trio.current_time():
                return cached[1]
            health = await self._probe()
            self._cached = (trio.current_time() + HEALTH_TTL_S, health)
            return health

    async def _probe(self) -> Health:
        config = self.node.config
        primaries = [b for b in config.backends if b.role == "primary"]
        if primaries:
            problems: dict[str, str | None] = {}

            async def probe(backend: BackendEntry) -> None:
                problems[backend.name] = await self._probe_backend(backend)

            async with trio.open_nursery() as nursery:
                for backend in primaries:
                    nursery.start_soon(probe, backend)
            if any(problem is None for problem in problems.values()):
                return Health(True)
            return Health(False, "no backend reachable: " + "; ".join(
                f"{b.name}: {problems[b.name]}" for b in primaries))
        mesh = self.node.mesh
        if config.peers or mesh.links:
            route = mesh.table.best(ANYCAST_CSMS)
            if route is not None and route.peer in mesh.links:
                return Health(True)
            return Health(False, "no backend reachable: no connected peer offers a route "
                                 f"to {ANYCAST_CSMS}")
        return Health(False, "no backend reachable: no primary backend and no peer configured")

    async def _probe_backend(self, backend: BackendEntry) -> str | None:
        """None when a target of the backend accepts a TCP connection, else why not."""
        if backend.srv is None:
            parts = urlsplit(backend.url)
            port = parts.port or (443 if parts.scheme == "wss" else 80)
            addresses = [(parts.hostname or "", port)]
        else:
            try:
                with trio.fail_after(self.node.config.dns.timeout_s + 0.5):
                    targets = await self.node.srv.targets(backend.srv)
            except SrvUnavailable as exc:
                return f"SRV {backend.srv}: {exc.reason}"
            except trio.TooSlowError:
                return f"SRV {backend.srv}: no DNS answer in time"
            addresses = [(t.host, t.port) for t in targets[:4]]
        problem = "no target"
        for host, port in addresses:
            with trio.move_on_after(PROBE_TIMEOUT_S):
                try:
                    connect_to = await self.node.address_of(host) or host
                    stream = await trio.open_tcp_stream(connect_to, port)
                except OSError as exc:
                    problem = f"{host}:{port}: {_connect_error(exc)}"
                    continue
                await trio.aclose_forcefully(stream)
                return None
            problem = f"{host}:{port}: no answer within {PROBE_TIMEOUT_S:g} s"
        return problem


def _connect_error(exc: OSError) -> str:
    """The first underlying reason of a failed connect (trio groups one per address)."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError):
        exc = cause
    return (exc.strerror or str(exc)).lower()


def listener_problem(node: Node) -> str | None:
    """Why the station listener is not accepting, or None while it is."""
    if not node.port:
        return "listener down: the station listener is not bound"
    scope = getattr(node, "_listen_scope", None)
    if isinstance(scope, trio.CancelScope) and scope.cancel_called:
        return "listener down: the station listener is closed (node shutting down)"
    return None


# --- what the views read ----------------------------------------------------------------


def all_sessions(node: Node) -> list[StationSession]:
    """Station sessions held here: stations connected here and those attached over peers."""
    return [*node.sessions.values(), *(session for _, session in node.mesh.remote.values())]


def _is_open(link: Link) -> bool:
    return link.closed is None


def link_state(link: Link) -> str:
    """``open``, ``failing_over`` (a backend link moving to another SRV target) or
    ``closing``."""
    if isinstance(link, FailoverLink) and link.moving:
        return "failing_over"
    return "open" if link.closed is None else "closing"


def remote_address(link: Link) -> str | None:
    """``host:port`` of the far end of a real WebSocket (the target in use), else None."""
    ws = link.current if isinstance(link, FailoverLink) else link
    if not isinstance(ws, WsLink):
        return None
    stream: Any = ws.stream
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else (None, 0)
    except OSError:
        return None
    if host is None:
        return None
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


_PEER_STATES = {"up": "open", "down": "syncing", "expired": "expired"}


# --- metrics --------------------------------------------------------------------------


class Pause:
    """A point in a scrape where the node's other tasks may run (see :func:`render_metrics`)."""


PAUSE = Pause()
_SESSIONS_PER_PAUSE = 500


class _Families:
    """Already collected families, for prometheus_client's encoders."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


async def render_metrics(collector: NodeCollector, accept: str) -> tuple[bytes, str]:
    """The exposition (text, or OpenMetrics when ``accept`` asks), encoded a few families
    at a time with a checkpoint in between, so a scrape never holds the node's loop for
    long: the stations' frames go on between the slices."""
    encoder, content_type = choose_encoder(accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    out: list[bytes] = []
    batch: list[Metric] = []

    def flush() -> None:
        if batch:
            text = encoder(_Families(batch))
            out.append(text.removesuffix(b"# EOF\n") if openmetrics else text)
            batch.clear()

    for part in collector.parts():
        if isinstance(part, Pause):
            flush()
            await trio.sleep(0)
        else:
            batch.append(part)
    flush()
    if openmetrics:
        out.append(b"# EOF\n")
    return b"".join(out), content_type


class NodeCollector:
    """A prometheus_client collector that reads the node's counters at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """Every metric family (prometheus_client's collector interface)."""
        for part in self.parts():
            if not isinstance(part, Pause):
                yield part

    def parts(self) -> Iterator[Metric | Pause]:
        """The families, with a :data:`PAUSE` wherever a scrape may let the node run."""
        node = self.node
        stats = node.stats
        info = GaugeMetricFamily("ocpp_router_info", "This node: its id and software version.",
                                 labels=["node", "version"])
        info.add_metric([node.config.node.id, __version__], 1)
        yield info
        frames = CounterMetricFamily(
            "ocpp_router_frames_forwarded",
            "Frames forwarded between stations and backends, by direction (from-station: "
            "station to backend; to-station: backend to station).", labels=["direction"])
        frames.add_metric(["from-station"], stats.frames_up)
        frames.add_metric(["to-station"], stats.frames_down)
        yield frames
        by_action = CounterMetricFamily(
            "ocpp_router_frames_by_action",
            "Frames forwarded by direction and OCPP action (answers count under the action "
            "of the CALL they answer).", labels=["direction", "action"])
        for (direction, action), count in sorted(stats.frames_by_action.items()):
            by_action.add_metric([direction, action], count)
        yield by_action
        by_code = CounterMetricFamily(
            "ocpp_router_node_callerrors_by_code",
            "CALLERRORs the node made itself, by OCPP error code.", labels=["code"])
        for code, count in sorted(stats.node_errors_by_code.items()):
            by_code.add_metric([code], count)
        yield by_code
        yield _counter("ocpp_router_answers_forwarded",
                       "CALLRESULTs and CALLERRORs forwarded to the CALL they answer.",
                       stats.answers_forwarded)
        yield _counter("ocpp_router_node_callerrors",
                       "CALLERRORs the node made itself (queue full, timeout, link lost, "
                       "policy reject, shutdown).", stats.node_errors)
        yield _counter("ocpp_router_frames_dropped",
                       "Frames dropped (unmatched or malformed answers, policy drops).",
                       stats.dropped)
        yield _counter("ocpp_router_call_timeouts",
                       "CALLs whose answer did not come within call_timeout_s.", stats.timeouts)
        yield from self._stations()
        yield PAUSE
        yield from self._links()
        yield PAUSE
        decisions = CounterMetricFamily("ocpp_router_policy_decisions",
                                        "Firewall decisions, by rule and outcome.",
                                        labels=["rule", "outcome"])
        for (rule, outcome), count in sorted(node.gate.decisions.items()):
            decisions.add_metric([rule, outcome], count)
        yield decisions
        if node.fanout.subscribers:
            yield from self._fanout()
            yield PAUSE
        yield from self._overlay()
        yield PAUSE
        if any(b.srv for b in node.config.backends) or any(p.srv for p in node.config.peers):
            yield from self._srv()
            yield PAUSE
        yield self._residence()

    def _stations(self) -> Iterator[Metric]:
        node = self.node
        connected = GaugeMetricFamily(
            "ocpp_router_stations_connected",
            "Station sessions held by this node: stations connected here (local) and stations "
            "on other nodes whose backend link this node holds (overlay).", labels=["where"])
        connected.add_metric(["local"], len(node.sessions))
        connected.add_metric(["overlay"], len(node.mesh.remote))
        yield connected
        yield _counter("ocpp_router_stations_rejected",
                       "Station connections refused (authentication, backend, handshake).",
                       node.stats.stations_rejected)
        yield _counter("ocpp_router_stations_replaced",
                       "Station connections that replaced an older one of the same identity.",
                       node.stats.stations_replaced)

    def _links(self) -> Iterator[Metric | Pause]:
        node = self.node
        counts: Counter[tuple[str, str]] = Counter(
            {("station", "open"): 0, ("backend", "open"): 0, ("peer", "open"): 0,
             ("secondary", "open"): 0})
        local = len(node.sessions)
        for i, session in enumerate(all_sessions(node)):  # a copy: the node runs in pauses
            if i < local:
                counts["station", link_state(session.station.ws)] += 1
            if not isinstance(session.backend.ws, VirtualLink):
                counts["backend", link_state(session.backend.ws)] += 1
            if i % _SESSIONS_PER_PAUSE == _SESSIONS_PER_PAUSE - 1:
                yield PAUSE
        for link in node.mesh.links.values():
            counts["peer", _PEER_STATES.get(link.exchange.state, link.exchange.state)] += 1
        for entry in node.config.peers:
            if entry.id not in node.mesh.links:
                counts["peer", "down"] += 1
        for sub in node.fanout.subscribers:
            for secondary in sub.links.values():
                counts["secondary", "closing" if secondary.closed else "open"] += 1
        links = GaugeMetricFamily(
            "ocpp_router_links",
            "WebSocket links by kind (station, backend, peer, secondary) and state (open, "
            "closing, failing_over; peers also syncing, expired, down).",
            labels=["kind", "state"])
        for (kind, state), count in sorted(counts.items()):
            links.add_metric([kind, state], count)
        yield links

    def _fanout(self) -> Iterator[Metric]:
        subs = self.node.fanout.subscribers
        depth = GaugeMetricFamily("ocpp_router_fanout_queue_depth",
                                  "Copies waiting in a secondary's memory queue.",
                                  labels=["subscriber"])
        capacity = GaugeMetricFamily("ocpp_router_fanout_queue_capacity",
                                     "Size of a secondary's memory queue.", labels=["subscriber"])
        backlog = GaugeMetricFamily("ocpp_router_fanout_backlog",
                                    "Copies waiting in a secondary's durable outbox.",
                                    labels=["subscriber"])
        for sub in subs:
            depth.add_metric([sub.name], sub.queued)
            capacity.add_metric([sub.name], sub.entry.queue)
            backlog.add_metric([sub.name], sub.backlog)
        yield depth
        yield capacity
        yield backlog
        counters = (
            ("offered", "Copies offered to a secondary by the primary path."),
            ("delivered", "Copies a secondary received over its WebSocket."),
            ("answered", "Copies a secondary answered (CALLRESULT or CALLERROR)."),
            ("spilled", "Copies written to the outbox (secondary down or behind)."),
            ("replayed", "Copies replayed from the outbox."),
            ("dropped", "Copies lost to a full queue or the outbox's bounds."),
            ("refused_commands", "CALLs from a read-only secondary refused."),
        )
        for what, doc in counters:
            counter = CounterMetricFamily(f"ocpp_router_fanout_{what}", doc,
                                          labels=["subscriber"])
            for sub in subs:
                counter.add_metric([sub.name], getattr(sub.stats, what))
            yield counter

    def _overlay(self) -> Iterator[Metric | Pause]:
        mesh = self.node.mesh
        table = mesh.table
        yield _gauge("ocpp_router_routes", "Destinations in the route table (best routes).",
                     len(table))
        yield _gauge("ocpp_router_route_candidates",
                     "Candidate routes held, over all destinations and peers.", table.route_count)
        events = CounterMetricFamily("ocpp_router_route_table_events",
                                     "What the route table did with announcements.",
                                     labels=["event"])
        ts = table.stats
        for event, count in (("learned", ts.learned), ("rejected_invalid", ts.rejected_invalid),
                             ("rejected_loop", ts.rejected_loop),
                             ("ignored_stale", ts.ignored_stale),
                             ("refused_cap", ts.refused_cap), ("expired", ts.expired)):
            events.add_metric([event], count)
        yield events
        overlay = CounterMetricFamily(
            "ocpp_router_overlay_events",
            "Overlay forwarding events (refused, no_route, dropped, flooded, bad_frames, ...).",
            labels=["event"])
        for event, count in sorted(mesh.counters.items()):
            overlay.add_metric([event], count)
        yield overlay
        messages = CounterMetricFamily("ocpp_router_route_messages",
                                       "Route-exchange messages per peer link.",
                                       labels=["peer", "direction"])
        advertised = GaugeMetricFamily("ocpp_router_routes_advertised",
                                       "Destinations a peer currently holds from this node.",
                                       labels=["peer"])
        learned = GaugeMetricFamily("ocpp_router_routes_learned",
                                    "Routes this node holds from a peer.", labels=["peer"])
        for peer_id, link in sorted(mesh.links.items()):
            messages.add_metric([peer_id, "sent"], link.exchange.stats.messages_sent)
            messages.add_metric([peer_id, "received"], link.exchange.stats.messages_received)
            advertised.add_metric([peer_id], link.exchange.advertised_count)
            learned.add_metric([peer_id], len(table.routes_via(peer_id)))
            yield PAUSE  # a big table makes routes_via a long list
        yield messages
        yield advertised
        yield learned

    def _srv(self) -> Iterator[Metric | Pause]:
        node = self.node
        in_use: Counter[tuple[str, str, str]] = Counter()
        for i, session in enumerate(all_sessions(node)):
            link = session.backend.ws
            if isinstance(link, FailoverLink):
                target = remote_address(link) or "unknown"
                in_use[link.backend.name, target, str(link.priority)] += 1
            if i % _SESSIONS_PER_PAUSE == _SESSIONS_PER_PAUSE - 1:
                yield PAUSE
        family = GaugeMetricFamily(
            "ocpp_router_srv_target_in_use",
            "Station backend links per SRV target (address) and its priority.",
            labels=["backend", "target", "priority"])
        for (backend, target, priority), count in sorted(in_use.items()):
            family.add_metric([backend, target, priority], count)
        yield family
        names = sorted({b.srv for b in node.config.backends if b.srv}
                       | {p.srv for p in node.config.peers if p.srv})
        cached = GaugeMetricFamily(
            "ocpp_router_srv_answer_valid_seconds",
            "Seconds the cached SRV answer of a name is still used without asking DNS "
            "(negative: stale, a refresh is due).", labels=["name"])
        now = trio.current_time()
        for name in names:
            until = node.srv.cached_until(name)
            if until is not None and math.isfinite(until):
                cached.add_metric([name], until - now)
        yield cached

    def _residence(self) -> Metric:
        hist = self.node.stats.residence
        counts = hist.snapshot()
        buckets: list[tuple[str, float]] = []
        running = 0
        for i, count in enumerate(counts[:-1]):
            running += count
            if i in _EXPORTED_BOUNDS:
                buckets.append((_float_text(BOUNDS_NS[i] / 1e9), running))
        buckets.append(("+Inf", running + counts[-1]))
        family = HistogramMetricFamily(
            "ocpp_router_frame_residence_seconds",
            "Time a forwarded frame spends in the node, from arrival to sent on.",
            buckets=buckets, sum_value=hist.sum_ns / 1e9)
        return family


def _float_text(value: float) -> str:
    return repr(float(f"{value:.6g}"))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


# --- JSON views -------------------------------------------------------------------------


def routes_view(node: Node) -> dict[str, Any]:
    """The route table: each destination's best route and how many others there are."""
    table = node.mesh.table
    now = trio.current_time()
    rows = []
    for destination in sorted(table.destinations()):
        candidates = table.candidates(destination)
        if not candidates:
            continue
        best = candidates[0]
        expires = best.expires_at - now if math.isfinite(best.expires_at) else None
        rows.append({
            "destination": destination,
            "next_hop": None if best.is_local else best.peer,
            "local": best.is_local,
            "path": list(best.path),
            "distance": best.distance,
            "priority": best.priority,
            "weight": best.weight,
            "origin": best.origin,
            "expires_in_s": None if expires is None else round(expires, 1),
            "alternatives": len(candidates) - 1,
        })
    return {"node": node.config.node.id, "routes": rows}


def links_view(node: Node) -> dict[str, Any]:
    """Stations (with subprotocol and backend), backends, peers and secondaries."""
    mesh = node.mesh
    stations = []
    for where, sessions in (("local", list(node.sessions.values())),
                            ("overlay", [s for _, s in mesh.remote.values()])):
        for session in sorted(sessions, key=lambda s: s.identity):
            backend_ws = session.backend.ws
            via = backend_ws.link.peer_id if isinstance(backend_ws, VirtualLink) else None
            if where == "overlay" and isinstance(session.station.ws, VirtualLink):
                via = session.station.ws.link.peer_id
            stations.append({
                "identity": session.identity,
                "where": where,
                "subprotocol": session.version.value,
                "backend": session.backend_name,
                "via_peer": via,
                "station_link": link_state(session.station.ws),
                "backend_link": link_state(backend_ws),
                "backend_target": remote_address(backend_ws),
            })
    per_backend = Counter(s.backend_name for s in all_sessions(node))
    backends = [{
        "name": b.name,
        "role": b.role,
        "url": b.url or None,
        "srv": b.srv,
        "stations": per_backend.get(b.name, 0) if b.role == "primary" else None,
    } for b in node.config.backends]
    peers = []
    configured = {p.id: p for p in node.config.peers}
    for peer_id, link in sorted(mesh.links.items()):
        stats = link.exchange.stats
        peers.append({
            "id": peer_id,
            "encoding": link.encoding,
            "state": _PEER_STATES.get(link.exchange.state, link.exchange.state),
            "configured": peer_id in configured,
            "routes_learned": len(mesh.table.routes_via(peer_id)),
            "routes_advertised": link.exchange.advertised_count,
            "stations_bound": len(link.bound),
            "messages_sent": stats.messages_sent,
            "messages_received": stats.messages_received,
        })
    for peer_id, entry in sorted(configured.items()):
        if peer_id not in mesh.links:
            peers.append({"id": peer_id, "encoding": entry.encoding, "state": "down",
                          "configured": True, "routes_learned": 0, "routes_advertised": 0,
                          "stations_bound": 0, "messages_sent": 0, "messages_received": 0})
    secondaries = []
    for sub in node.fanout.subscribers:
        s = sub.stats
        secondaries.append({
            "name": sub.name,
            "url": sub.entry.url,
            "queued": sub.queued,
            "queue_capacity": sub.entry.queue,
            "backlog": sub.backlog,
            "links": sum(1 for link in sub.links.values() if not link.closed),
            "offered": s.offered, "delivered": s.delivered, "answered": s.answered,
            "spilled": s.spilled, "replayed": s.replayed, "dropped": s.dropped,
            "refused_commands": s.refused_commands,
        })
    return {"node": node.config.node.id, "stations": stations, "backends": backends,
            "peers": peers, "secondaries": secondaries}


# --- topology ---------------------------------------------------------------------------


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


def topology_model(node: Node) -> Topology:
    """Who is where: this node, its peers, nodes known from routes, backends, stations."""
    me = node.config.node.id
    mesh = node.mesh
    table = mesh.table
    nodes: dict[str, TopoNode] = {me: TopoNode(me, "self", stations=len(node.sessions),
                                               backends=[(b.name, b.role)
                                                         for b in node.config.backends])}
    edges: dict[tuple[str, str], str] = {}
    encodings: dict[tuple[str, str], str] = {}
    for peer_id, link in mesh.links.items():
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


MIN_WIDTH, MIN_HEIGHT = 1000.0, 640.0  # the picture grows (and is shown smaller) beyond
RING = 150.0  # pixels between two rings, vertically; 1.5 times that horizontally
_LEGEND = 64.0
_HALO = 'stroke="#ffffff" stroke-width="3" paint-order="stroke"'  # text stays readable on lines
_FILL = {"self": "#1f6feb", "peer": "#2da44e", "remote": "#8250df", "down": "#cf222e"}


def _layout(topo: Topology) -> None:
    """Rings around this node (at 0, 0), one per hop; a node sits near its parents' angle."""
    levels: dict[int, list[TopoNode]] = {}
    for n in topo.nodes.values():
        levels.setdefault(n.hops, []).append(n)
    neighbours: dict[str, list[str]] = {}
    for one, other in topo.edges:
        neighbours.setdefault(one, []).append(other)
        neighbours.setdefault(other, []).append(one)
    angle: dict[str, float] = {}
    me = topo.nodes[topo.me]
    me.x, me.y = 0.0, 0.0
    radius = 0.0
    for level in sorted(levels):
        if level == 0:
            continue
        members = levels[level]
        wanted = {n.id: _mean_angle([angle[o] for o in neighbours.get(n.id, ())
                                     if o in angle and topo.nodes[o].hops == level - 1])
                  for n in members}
        members.sort(key=lambda n: (wanted[n.id], n.id))
        count = len(members)
        radius = max(radius + RING, count * 120.0 / (2 * math.pi * 1.25))  # ~120 px a node
        if level == 1:
            # the first peer at the top, the others evenly round the ring
            placed = [-math.pi / 2 + 2 * math.pi * i / count for i in range(count)]
        else:
            # as near the parents as the spacing allows, then centred on them
            step = min(2 * math.pi / count, 0.6 * RING / radius * level)
            placed = []
            for n in members:
                a = wanted[n.id]
                placed.append(a if not placed else max(a, placed[-1] + step))
            shift = sum(wanted[n.id] - a for n, a in zip(members, placed, strict=True)) / count
            placed = [a + shift for a in placed]
        for n, a in zip(members, placed, strict=True):
            angle[n.id] = a
            n.x, n.y = math.cos(a) * radius * 1.5, math.sin(a) * radius


def _mean_angle(angles: list[float]) -> float:
    if not angles:
        return -math.pi / 2
    return math.atan2(sum(math.sin(a) for a in angles), sum(math.cos(a) for a in angles))


def _radius(n: TopoNode) -> int:
    return 34 if n.kind == "self" else 26


def render_svg(topo: Topology) -> str:
    """The overlay as an SVG document (nodes, links, backends, station counts)."""
    _layout(topo)
    esc = html.escape
    drawn = dict(sorted(topo.nodes.items(), key=lambda kv: (kv[1].hops, kv[0]))
                 [:_MAX_DRAWN_NODES])
    boxes: list[tuple[TopoNode, str, str, float, float]] = []
    for n in drawn.values():
        toward = [math.atan2(drawn[o].y - n.y, drawn[o].x - n.x)
                  for edge in topo.edges if n.id in edge
                  for o in edge if o != n.id and o in drawn]
        spots = _backend_spots(n, toward, len(n.backends))
        boxes += [(n, name, role, bx, by)
                  for (name, role), (bx, by) in zip(n.backends, spots, strict=True)]

    # the picture: everything drawn, with a margin, centred; at least MIN_WIDTH x MIN_HEIGHT
    xs = [v for n in drawn.values() for v in (n.x - max(_radius(n), 4.3 * len(_short(n.id, 24))),
                                               n.x + max(_radius(n), 4.3 * len(_short(n.id, 24))))]
    ys = [v for n in drawn.values() for v in (n.y - _radius(n), n.y + _radius(n) + 36)]
    xs += [v for _, _, _, bx, _ in boxes for v in (bx - 55, bx + 55)]
    ys += [v for _, _, _, _, by in boxes for v in (by - 14, by + 14)]
    width = max(max(xs) - min(xs) + 60, MIN_WIDTH)
    height = max(max(ys) - min(ys) + 60 + _LEGEND, MIN_HEIGHT)
    left = (max(xs) + min(xs)) / 2 - width / 2
    top = (max(ys) + min(ys)) / 2 - (height - _LEGEND) / 2
    bottom = top + height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="overlay" '
           f'viewBox="{left:.0f} {top:.0f} {width:.0f} {height:.0f}" width="{MIN_WIDTH:.0f}" '
           f'height="{MIN_WIDTH * height / width:.0f}" role="img" '
           f'aria-label="overlay seen from {esc(topo.me)}" font-family="sans-serif">',
           f"<title>Overlay as seen by {esc(topo.me)}</title>",
           f'<rect x="{left:.0f}" y="{top:.0f}" width="{width:.0f}" height="{height:.0f}" '
           'fill="#ffffff"/>']

    out.append('<g class="edges">')
    for (a, b), kind in sorted(topo.edges.items()):
        if a not in drawn or b not in drawn:
            continue
        na, nb = drawn[a], drawn[b]
        style = {"link": 'stroke="#57606a" stroke-width="3"',
                 "down": 'stroke="#cf222e" stroke-width="2" stroke-dasharray="6 4"',
                 "route": 'stroke="#8c959f" stroke-width="1.5" stroke-dasharray="4 4"'}[kind]
        out.append(f'<line class="edge {kind}" data-from="{esc(a)}" data-to="{esc(b)}" '
                   f'x1="{na.x:.1f}" y1="{na.y:.1f}" x2="{nb.x:.1f}" y2="{nb.y:.1f}" {style}/>')
        encoding = topo.encodings.get((a, b))
        if encoding:
            # beside the line's middle, on its right-hand side
            length = math.hypot(nb.x - na.x, nb.y - na.y) or 1.0
            px, py = (nb.y - na.y) / length, (na.x - nb.x) / length
            if px < 0 or (px == 0 and py > 0):
                px, py = -px, -py
            tx, ty = (na.x + nb.x) / 2 + px * 10, (na.y + nb.y) / 2 + py * 10 + 4
            out.append(f'<text class="encoding" x="{tx:.1f}" y="{ty:.1f}" font-size="12" '
                       f'fill="#57606a" text-anchor="start" {_HALO}>{esc(encoding)}</text>')
    out.append("</g>")

    out.append('<g class="backends">')
    previous: dict[str, tuple[float, float]] = {}
    for n, _, _, bx, by in boxes:
        # each box's line starts where the one before it ended: no line crosses a box
        x0, y0 = previous.get(n.id, (n.x, n.y))
        previous[n.id] = (bx, by)
        out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{bx:.1f}" y2="{by:.1f}" '
                   'stroke="#bf8700" stroke-width="2"/>')
    for n, name, role, bx, by in boxes:
        fill = "#fff8c5" if role == "primary" else "#f6f8fa"
        out.append(f'<g class="backend" data-backend="{esc(name)}" data-node="{esc(n.id)}" '
                   f'data-role="{esc(role)}"><rect x="{bx - 55:.1f}" y="{by - 14:.1f}" '
                   f'width="110" height="28" rx="4" fill="{fill}" stroke="#bf8700"/>'
                   f'<text x="{bx:.1f}" y="{by + 5:.1f}" font-size="12" '
                   f'text-anchor="middle">{esc(_short(name, 14))} ({esc(role[:3])})'
                   "</text></g>")
    out.append("</g>")

    out.append('<g class="nodes">')
    for n in drawn.values():
        radius = _radius(n)
        label = "station" if n.stations == 1 else "stations"
        out.append(
            f'<g class="node {n.kind}" data-node="{esc(n.id)}" data-kind="{n.kind}" '
            f'data-stations="{n.stations}" data-hops="{n.hops}">'
            f"<title>{esc(n.id)}: {n.kind}, {n.hops} hop(s), {n.stations} {label}</title>"
            f'<circle cx="{n.x:.1f}" cy="{n.y:.1f}" r="{radius}" fill="{_FILL[n.kind]}" '
            'stroke="#24292f" stroke-width="1.5"/>'
            f'<text x="{n.x:.1f}" y="{n.y + 5:.1f}" font-size="13" fill="#ffffff" '
            f'text-anchor="middle">{n.stations}</text>'
            f'<text class="label" x="{n.x:.1f}" y="{n.y + radius + 16:.1f}" font-size="14" '
            f'text-anchor="middle" font-weight="bold" {_HALO}>{esc(_short(n.id, 24))}</text>'
            f'<text x="{n.x:.1f}" y="{n.y + radius + 31:.1f}" font-size="11" fill="#57606a" '
            f'text-anchor="middle" {_HALO}>{n.stations} {label}</text></g>')
    out.append("</g>")

    hidden = len(topo.nodes) - len(drawn)
    legend = [("self", "this node"), ("peer", "peer (linked)"), ("remote", "known from routes"),
              ("down", "configured peer, down")]
    out.append('<g class="legend" font-size="12">')
    for i, (kind, text) in enumerate(legend):
        x = left + 20 + i * 170
        out.append(f'<circle cx="{x + 8:.0f}" cy="{bottom - 38:.0f}" r="7" '
                   f'fill="{_FILL[kind]}"/><text x="{x + 20:.0f}" y="{bottom - 34:.0f}">{text}'
                   "</text>")
    out.append(f'<text x="{left + 20:.0f}" y="{bottom - 12:.0f}" fill="#57606a">'
               "number in a node: its stations; solid line: a link of this node, dashed: a "
               "path learned from routes; boxes: backends"
               + (f"; {hidden} more nodes not drawn" if hidden > 0 else "") + "</text>")
    out.append("</g></svg>")
    return "\n".join(out)


def _backend_spots(n: TopoNode, toward: list[float], count: int) -> list[tuple[float, float]]:
    """Where a node's backend boxes go: in the widest gap between its links, stacked
    outward so that neither the boxes nor the node's labels overlap."""
    if not toward:
        direction = math.pi / 2 if n.kind == "self" else math.atan2(n.y, n.x)
    else:
        ordered = sorted(toward)
        gaps = [(ordered[(i + 1) % len(ordered)] - a) % (2 * math.pi) or 2 * math.pi
                for i, a in enumerate(ordered)]
        widest = max(range(len(gaps)), key=lambda i: (round(gaps[i], 6), -i))
        direction = ordered[widest] + gaps[widest] / 2
    ux, uy = math.cos(direction), math.sin(direction)
    radius = _radius(n)

    def reach(half_w: float, half_h: float) -> float:
        # how far along (ux, uy) a box centre must be to clear a half_w x half_h box
        return min(half_w / abs(ux) if abs(ux) > 1e-9 else math.inf,
                   half_h / abs(uy) if abs(uy) > 1e-9 else math.inf)

    first = reach(55 + radius + 12, 14 + radius + 12) + (36 if uy > 0.3 else 0)
    step = reach(120, 36)
    return [(n.x + ux * (first + i * step), n.y + uy * (first + i * step)) for i in range(count)]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_page(node: Node, refresh_s: int | None = None) -> str:
    """The /topology page: the SVG and tables of peers and backends, no scripts."""
    topo = topology_model(node)
    svg = render_svg(topo)
    links = links_view(node)
    esc = html.escape
    peers = "".join(
        f"<tr><td>{esc(p['id'])}</td><td>{esc(p['state'])}</td><td>{esc(p['encoding'])}</td>"
        f"<td>{p['routes_learned']}</td><td>{p['stations_bound']}</td></tr>"
        for p in links["peers"]) or '<tr><td colspan="5">no peers</td></tr>'
    backends = "".join(
        f"<tr><td>{esc(b['name'])}</td><td>{esc(b['role'])}</td>"
        f"<td>{esc(b['url'] or 'SRV ' + str(b['srv']))}</td>"
        f"<td>{'' if b['stations'] is None else b['stations']}</td></tr>"
        for b in links["backends"]) or '<tr><td colspan="4">no backends</td></tr>'
    meta = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    known = len(topo.nodes)
    stations = sum(n.stations for n in topo.nodes.values())
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{meta}
<title>{esc(topo.me)}: overlay topology</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #24292f; }}
h1 {{ font-size: 20px; margin: 0 0 4px 0; }}
p.sub {{ color: #57606a; margin: 0 0 12px 0; }}
svg {{ border: 1px solid #d0d7de; max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; margin: 12px 24px 0 0; display: inline-table;
         vertical-align: top; }}
th, td {{ border: 1px solid #d0d7de; padding: 3px 8px; font-size: 13px; text-align: left; }}
</style></head>
<body>
<h1>Overlay as seen by {esc(topo.me)}</h1>
<p class="sub">{known} node(s), {stations} station(s), {len(topo.edges)} link(s) known;
drawn {when}</p>
{svg}
<div>
<table><caption>peers</caption><tr><th>peer</th><th>state</th><th>encoding</th>
<th>routes learned</th><th>stations bound</th></tr>{peers}</table>
<table><caption>backends of {esc(topo.me)}</caption><tr><th>name</th><th>role</th>
<th>target</th><th>stations</th></tr>{backends}</table>
</div>
</body></html>
"""


# --- the ASGI application ---------------------------------------------------------------


_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
_SVG = b"image/svg+xml"
_GET_PATHS = ("/healthz", "/metrics", "/routes", "/links", "/topology", "/topology.svg")


class AdminApp:
    """The admin endpoint as an ASGI 3 application (no framework: six routes)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.health = HealthCheck(node)
        self.collector = NodeCollector(node)
        self.registry = CollectorRegistry()  # for prometheus_client's own tools
        self.registry.register(self.collector)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # hypercorn answers a WebSocket upgrade the app ignores with 403/500
        await _drain(receive)
        try:
            status, content_type, body, extra = await self._route(scope)
        except Exception as exc:
            log.exception("admin request failed",
                          extra={"fields": {"path": scope["path"], "error": repr(exc)}})
            status, content_type, body, extra = (500, _TEXT, b"internal error: see the node "
                                                 b"log (admin request failed)\n", [])
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body, "more_body": False})

    async def _route(self, scope: HTTPScope) -> tuple[int, bytes, bytes, list[tuple[bytes,
                                                                                     bytes]]]:
        path, method = scope["path"], scope["method"]
        if path == "/reload":
            if method != "POST":
                return 405, _TEXT, b"use POST\n", [(b"allow", b"POST")]
            return await self._reload(scope)
        if path not in _GET_PATHS:
            return 404, _TEXT, b"not found; try /healthz /metrics /routes /links /topology\n", []
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"use GET\n", [(b"allow", b"GET, HEAD")]
        if path == "/healthz":
            health = await self.health.check()
            if health.ok:
                return 200, _TEXT, b"ok\n", []
            return 503, _TEXT, f"unhealthy: {health.reason}\n".encode(), []
        if path == "/metrics":
            body, content_type = await render_metrics(self.collector,
                                                      _header(scope, b"accept"))
            return 200, content_type.encode(), body, []
        if path == "/routes":
            return 200, _JSON, _json(routes_view(self.node)), []
        if path == "/links":
            return 200, _JSON, _json(links_view(self.node)), []
        if path == "/topology.svg":
            return 200, _SVG, render_svg(topology_model(self.node)).encode(), []
        query = parse_qs(scope["query_string"].decode("latin-1"))
        refresh = query.get("refresh", [""])[0]
        refresh_s = int(refresh) if refresh.isdigit() and 0 < int(refresh) <= 3600 else None
        return 200, _HTML, render_page(self.node, refresh_s).encode(), []

    async def _reload(self, scope: HTTPScope) -> tuple[int, bytes, bytes,
                                                       list[tuple[bytes, bytes]]]:
        origin = _header(scope, b"origin")
        if origin and urlsplit(origin).netloc != _header(scope, b"host"):
            # a web page elsewhere must not make an operator's browser reload the node
            return 403, _TEXT, b"cross-origin reload refused\n", []
        reload = getattr(self.node, "reload", None)
        if reload is None or not callable(reload):
            return 501, _TEXT, b"this node cannot reload its configuration\n", []
        log_event(log, logging.INFO, "admin_reload", client=_client(scope))
        result = reload()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
            result = {"ok": result[0], "message": str(result[1])}  # Node.reload's (ok, why)
        elif result is None or isinstance(result, bool):
            result = {"ok": result is not False}
        elif isinstance(result, str):
            result = {"ok": True, "message": result}
        # 422: the files were read and refused; the node keeps what it had
        status = 422 if isinstance(result, dict) and result.get("ok") is False else 200
        return status, _JSON, _json(result), []


async def _drain(receive: ASGIReceiveCallable) -> None:
    """Read the request body (the endpoint takes none) so the connection stays usable."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _header(scope: HTTPScope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _client(scope: HTTPScope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1, default=str) + "\n").encode()


# --- serving ----------------------------------------------------------------------------


class _QuietLogger(HypercornLogger):
    """hypercorn's logger without its "Running on ..." line (admin_listening says it)."""

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        return None


async def serve_admin(node: Node, *,
                      task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
    """Serve the admin endpoint of ``[admin]`` until cancelled; ``nursery.start`` returns
    the bound port once it listens (None, at once, when the config has no ``[admin]``)."""
    admin = node.config.admin
    if admin is None:
        task_status.started(None)
        return
    config = HypercornConfig()
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    config.bind = [f"{host}:{admin.port}"]
    config.errorlog = logging.getLogger("router.admin.http")
    config.accesslog = None
    config.logger_class = _QuietLogger
    config.include_server_header = False
    config.graceful_timeout = 1.0

    listening = False
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, AdminApp(node), config)
            port = int(binds[0].rsplit(":", 1)[1])
            listening = True
            log_event(log, logging.INFO, "admin_listening", host=admin.host, port=port,
                      url=f"http://{host}:{port}", node=node.config.node.id)
            task_status.started(port)
    except BaseException as exc:
        bind_error = None if listening else _os_error(exc)
        if bind_error is None:
            raise
        reason = bind_error.strerror or str(bind_error)
        log_event(log, logging.ERROR, "admin_failed", host=admin.host, port=admin.port,
                  reason=reason)
        raise AdminBindError(bind_error.errno or 0,
                             f"admin endpoint {host}:{admin.port}: {reason}") from exc


class AdminBindError(OSError):
    """The admin endpoint cannot listen where ``[admin]`` says (port in use, bad host)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside (possibly nested) exception groups, from hypercorn's bind."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None

