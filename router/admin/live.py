"""``/live``: the overlay picture's moving parts as JSON, read when asked for.

Links count frames with a plain integer each (``PeerLink.frames_in`` / ``frames_out``,
``Stats.frames_up`` / ``frames_down``, a secondary's ``delivered``); a rate is the
difference of two readings over the time between them, worked out here, so the
forwarding path does nothing for the picture beyond those increments.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.admin.topology import Topology
from router.admin.view import PEER_STATES, NodeView, shown_url

WINDOW_S = 10.0
"""Rates span about this long: the baseline is the newest reading at least this old."""

_READINGS = 64  # readings kept; many pollers at once shorten the window, never grow memory

Key = tuple[str, str, str]  # (kind, name, what): ("peer", "edge-a", "in")


@dataclass(frozen=True, slots=True)
class Reading:
    """Every counter's value at one moment (``at``: seconds on the node's clock)."""

    at: float
    counts: Mapping[Key, int]


class RateMeter:
    """Turns counters that only grow into rates per second over a sliding window.

    Pure: the caller passes the time and the counters. A counter lower than at the
    baseline was restarted (a peer link came back) and counts from zero; a counter the
    baseline lacks is new and counts from zero too.
    """

    def __init__(self, window_s: float = WINDOW_S, keep: int = _READINGS) -> None:
        self.window_s = window_s
        self._readings: deque[Reading] = deque(maxlen=max(2, keep))

    def read(self, now: float, counts: Mapping[Key, int]) -> tuple[dict[Key, float | None],
                                                                   float | None]:
        """Record a reading; the rate of every counter since the baseline, and the seconds
        that spans (rates are None, and so is the span, before a second reading)."""
        readings = self._readings
        readings.append(Reading(now, dict(counts)))
        while len(readings) > 1 and readings[1].at <= now - self.window_s:
            readings.popleft()
        base = readings[0]
        span = now - base.at
        if span <= 0:
            return dict.fromkeys(counts), None
        rates: dict[Key, float | None] = {}
        for key, value in counts.items():
            before = base.counts.get(key, 0)
            rates[key] = (value - before if value >= before else value) / span
        return rates, span


def counters(node: NodeView) -> dict[Key, int]:
    """The frame counters the live picture turns into rates, read now."""
    counts: dict[Key, int] = {}
    for peer_id, link in node.overlay.links.items():
        counts[("peer", peer_id, "in")] = link.frames_in
        counts[("peer", peer_id, "out")] = link.frames_out
    stats = node.stats
    counts[("stations", "", "up")] = stats.frames_up
    counts[("stations", "", "down")] = stats.frames_down
    for sub in node.duplicator.secondaries:
        counts[("secondary", sub.name, "delivered")] = sub.stats.delivered
    return counts


def _rate(rates: Mapping[Key, float | None], key: Key) -> float | None:
    value = rates.get(key)
    return None if value is None else round(value, 2)


def live_view(node: NodeView, topo: Topology, meter: RateMeter, now: float) -> dict[str, Any]:
    """The JSON of ``GET /live``: the topology, rates per peer link and for stations and
    secondaries, each secondary's backlog, and the firewall's recent refusals and drops."""
    counts = counters(node)
    rates, span = meter.read(now, counts)
    overlay = node.overlay
    peers = []
    for peer_id, link in sorted(overlay.links.items()):
        peers.append({
            "id": peer_id, "encoding": link.encoding,
            "state": PEER_STATES.get(link.exchange.state, link.exchange.state),
            "frames_in": link.frames_in, "frames_out": link.frames_out,
            "in_per_s": _rate(rates, ("peer", peer_id, "in")),
            "out_per_s": _rate(rates, ("peer", peer_id, "out")),
        })
    for entry in node.config.peers:
        if entry.id not in overlay.links:
            peers.append({"id": entry.id, "encoding": entry.encoding, "state": "down",
                          "frames_in": 0, "frames_out": 0, "in_per_s": None,
                          "out_per_s": None})
    stats = node.stats
    stations = {
        "local": len(node.sessions.local), "overlay": len(node.sessions.held),
        "frames_up": stats.frames_up, "frames_down": stats.frames_down,
        "up_per_s": _rate(rates, ("stations", "", "up")),
        "down_per_s": _rate(rates, ("stations", "", "down")),
    }
    secondaries = [{
        "name": sub.name, "queued": sub.queued, "queue_capacity": sub.entry.queue,
        "backlog": sub.backlog, "delivered": sub.stats.delivered,
        "delivered_per_s": _rate(rates, ("secondary", sub.name, "delivered")),
        "dropped": sub.stats.dropped,
    } for sub in node.duplicator.secondaries]
    gate = node.gate
    recent = [{key: entry.get(key) for key in ("ts", "outcome", "rule", "action", "source",
                                               "direction", "reason")}
              for entry in reversed(gate.recent)]
    totals = [{"rule": rule, "outcome": outcome, "count": count}
              for (rule, outcome), count in sorted(gate.decisions.items())]
    return {
        "node": node.config.node.id,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rate_window_s": None if span is None else round(span, 2),
        "topology": topology_json(topo),
        "peers": peers,
        "stations": stations,
        "backends": [{"name": b.name, "role": b.role, "target": shown_url(b.url) or f"SRV {b.srv}"}
                     for b in node.config.backends],
        "secondaries": secondaries,
        "firewall": {"policy": gate.firewall is not None, "recent": recent,
                     "decisions": totals},
    }


def topology_json(topo: Topology) -> dict[str, Any]:
    """Nodes and edges of the model as JSON (the page redraws when these change)."""
    return {
        "nodes": [{"id": n.id, "kind": n.kind, "stations": n.stations, "hops": n.hops,
                   "backends": [{"name": name, "role": role} for name, role in n.backends]}
                  for _, n in sorted(topo.nodes.items())],
        "edges": [{"a": a, "b": b, "kind": kind, "encoding": topo.encodings.get((a, b))}
                  for (a, b), kind in sorted(topo.edges.items())],
    }


def rate_labels(live: Mapping[str, Any]) -> dict[str, str]:
    """The text drawn beside each peer link of this node: peer id -> "in x/s, out y/s"."""
    return {p["id"]: f"in {per_s(p['in_per_s'])}, out {per_s(p['out_per_s'])}"
            for p in live["peers"] if p["state"] != "down"}


def per_s(value: float | None) -> str:
    """A rate as the page shows it (the script formats the same way)."""
    if value is None:
        return "–/s"
    return f"{value:.1f}/s" if value < 100 else f"{value:.0f}/s"
