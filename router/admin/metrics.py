"""``/metrics``: the node's counters as Prometheus families, read at scrape time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import trio
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from router import __version__
from router.admin.view import PEER_STATES, NodeView
from router.stats import BOUNDS_NS, Histogram

# The exported residence buckets: every 5th bound of router/stats.py's from ~10 us (2.5x
# apart, like Prometheus' defaults, 18 of them up to ~57 s); being stats bounds, exact.
_EXPORTED_BOUNDS = frozenset(range(13, len(BOUNDS_NS), 5))



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

    def __init__(self, node: NodeView) -> None:
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
        if node.duplicator.secondaries:
            yield from self._fanout()
            yield PAUSE
        yield from self._overlay()
        yield PAUSE
        yield from self._channels()
        if any(b.srv for b in node.config.backends) or any(p.srv for p in node.config.peers):
            yield from self._srv()
            yield PAUSE
        yield self._residence()
        yield self._gc()

    def _stations(self) -> Iterator[Metric]:
        node = self.node
        connected = GaugeMetricFamily(
            "ocpp_router_stations_connected",
            "Station sessions held by this node: stations connected here (local) and stations "
            "on other nodes whose backend link this node holds (overlay).", labels=["where"])
        connected.add_metric(["local"], len(node.sessions.local))
        connected.add_metric(["overlay"], len(node.sessions.held))
        yield connected
        yield _counter("ocpp_router_stations_rejected",
                       "Station connections refused (authentication, backend, handshake).",
                       node.stats.stations_rejected)
        yield _counter("ocpp_router_stations_replaced",
                       "Station connections that replaced an older one of the same identity.",
                       node.stats.stations_replaced)
        yield _counter("ocpp_router_handshakes_shed",
                       "Connections answered 503 because max_handshakes were in progress.",
                       node.stats.handshakes_shed)
        yield _counter("ocpp_router_auth_limited",
                       "Upgrades answered 429: too many failed authentications from the "
                       "address (max_auth_failures a minute).", node.stats.auth_limited)

    def _links(self) -> Iterator[Metric | Pause]:
        node = self.node
        counts: Counter[tuple[str, str]] = Counter(
            {("station", "open"): 0, ("backend", "open"): 0, ("peer", "open"): 0,
             ("secondary", "open"): 0})
        local = len(node.sessions.local)
        for i, session in enumerate(node.sessions.all()):  # a copy: the node runs in pauses
            if i < local:
                counts["station", session.station.ws.info().state] += 1
            backend = session.backend.ws.info()
            if backend.via_peer is None:  # a backend link of this node, not one over a peer
                counts["backend", backend.state] += 1
            if i % _SESSIONS_PER_PAUSE == _SESSIONS_PER_PAUSE - 1:
                yield PAUSE
        for link in node.overlay.links.values():
            counts["peer", PEER_STATES.get(link.exchange.state, link.exchange.state)] += 1
        for entry in node.config.peers:
            if entry.id not in node.overlay.links:
                counts["peer", "down"] += 1
        for sub in node.duplicator.secondaries:
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
        subs = self.node.duplicator.secondaries
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
            ("dropped", "Copies lost to a full queue, the outbox's bounds or a failed "
                        "outbox write (disk full)."),
            ("refused_commands", "CALLs from a read-only secondary refused."),
        )
        for what, doc in counters:
            counter = CounterMetricFamily(f"ocpp_router_fanout_{what}", doc,
                                          labels=["subscriber"])
            for sub in subs:
                counter.add_metric([sub.name], getattr(sub.stats, what))
            yield counter

    def _channels(self) -> Iterator[Metric]:
        service = self.node.channels
        open_now = GaugeMetricFamily("ocpp_router_channels_open",
                                     "Binary channels open at this node (tunnels, both ends).")
        open_now.add_metric([], len(service.channels))
        yield open_now
        counters = service.counters
        for what, doc in (
            ("opened", "Channels opened (either end)."),
            ("refused", "Channel opens refused, here or by the far node."),
            ("closed", "Channels closed."),
            ("stalls", "Times a channel's sender waited for the far end's credit."),
            ("faults", "Channels closed for breaking the flow-control rules."),
            ("dropped", "Channel frames for no open channel, dropped."),
        ):
            counter = CounterMetricFamily(f"ocpp_router_channels_{what}", doc)
            counter.add_metric([], counters.get(what, 0))
            yield counter
        moved = CounterMetricFamily("ocpp_router_channel_bytes",
                                    "Bytes carried by channels: out = read from a TCP side "
                                    "and sent, in = received and written to it.",
                                    labels=["direction"])
        moved.add_metric(["out"], counters.get("bytes_out", 0))
        moved.add_metric(["in"], counters.get("bytes_in", 0))
        yield moved

    def _overlay(self) -> Iterator[Metric | Pause]:
        overlay = self.node.overlay
        table = overlay.table
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
                             ("refused_cap", ts.refused_cap), ("expired", ts.expired),
                             ("refused_table_cap", ts.refused_table_cap),
                             ("refused_sequence_jump", ts.refused_sequence_jump),
                             ("rejected_own", ts.rejected_own)):
            events.add_metric([event], count)
        yield events
        forwarding = CounterMetricFamily(
            "ocpp_router_overlay_events",
            "Overlay forwarding events (refused, no_route, dropped, flooded, bad_frames, ...).",
            labels=["event"])
        for event, count in sorted(overlay.counters.items()):
            forwarding.add_metric([event], count)
        yield forwarding
        messages = CounterMetricFamily("ocpp_router_route_messages",
                                       "Route-exchange messages per peer link.",
                                       labels=["peer", "direction"])
        advertised = GaugeMetricFamily("ocpp_router_routes_advertised",
                                       "Destinations a peer currently holds from this node.",
                                       labels=["peer"])
        learned = GaugeMetricFamily("ocpp_router_routes_learned",
                                    "Routes this node holds from a peer.", labels=["peer"])
        for peer_id, link in sorted(overlay.links.items()):
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
        for i, session in enumerate(node.sessions.all()):
            info = session.backend.ws.info()
            if info.srv_backend is not None:
                in_use[info.srv_backend, info.remote or "unknown", str(info.priority)] += 1
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
            until = node.dns.cached_until(name)
            if until is not None and math.isfinite(until):
                cached.add_metric([name], until - now)
        yield cached

    def _residence(self) -> Metric:
        family = HistogramMetricFamily(
            "ocpp_router_frame_residence_seconds",
            "Time a forwarded frame spends in the node, from arrival to sent on.")
        family.add_metric([], *_buckets(self.node.stats.residence))
        return family

    def _gc(self) -> Metric:
        family = HistogramMetricFamily(
            "ocpp_router_gc_pause_seconds",
            "How long each cyclic garbage collection stopped the node, by generation "
            "(2: a full collection).", labels=["generation"])
        for generation, hist in enumerate(self.node.gc.pauses):
            family.add_metric([str(generation)], *_buckets(hist))
        return family


def _buckets(hist: Histogram) -> tuple[list[tuple[str, float]], float]:
    """A histogram's exported cumulative buckets and its sum in seconds."""
    counts = hist.snapshot()
    buckets: list[tuple[str, float]] = []
    running = 0
    for i, count in enumerate(counts[:-1]):
        running += count
        if i in _EXPORTED_BOUNDS:
            buckets.append((_float_text(BOUNDS_NS[i] / 1e9), running))
    buckets.append(("+Inf", running + counts[-1]))
    return buckets, hist.sum_ns / 1e9


def _float_text(value: float) -> str:
    return repr(float(f"{value:.6g}"))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


