"""``/routes`` and ``/links``: the route table and every link, as JSON-ready dicts."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import trio

from router.admin.view import PEER_STATES, NodeView, shown_url


def routes_view(node: NodeView) -> dict[str, Any]:
    """The route table: each destination's best route and how many others there are."""
    table = node.overlay.table
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


def links_view(node: NodeView) -> dict[str, Any]:
    """Stations (with subprotocol and backend), backends, peers and secondaries."""
    overlay = node.overlay
    stations = []
    for where, sessions in (("local", list(node.sessions.local.values())),
                            ("overlay", list(node.sessions.held.values()))):
        for session in sorted(sessions, key=lambda s: s.identity):
            station_link, backend_link = session.station.ws.info(), session.backend.ws.info()
            via = backend_link.via_peer
            if where == "overlay" and station_link.via_peer is not None:
                via = station_link.via_peer
            stations.append({
                "identity": session.identity,
                "where": where,
                "subprotocol": session.version.value,
                "backend": session.backend_name,
                "via_peer": via,
                "station_link": station_link.state,
                "backend_link": backend_link.state,
                "backend_target": backend_link.remote,
                # permessage-deflate per hop (None: the hop is carried over the overlay)
                "station_compressed": station_link.compressed,
                "backend_compressed": backend_link.compressed,
            })
    per_backend = Counter(s.backend_name for s in node.sessions.all())
    backends = [{
        "name": b.name,
        "role": b.role,
        "url": shown_url(b.url),
        "srv": b.srv,
        "stations": per_backend.get(b.name, 0) if b.role == "primary" else None,
    } for b in node.config.backends]
    peers = []
    configured = {p.id: p for p in node.config.peers}
    for peer_id, link in sorted(overlay.links.items()):
        stats = link.exchange.stats
        peers.append({
            "id": peer_id,
            "encoding": link.encoding,
            "compressed": link.ws.compressed,
            "state": PEER_STATES.get(link.exchange.state, link.exchange.state),
            "configured": peer_id in configured,
            "routes_learned": len(overlay.table.routes_via(peer_id)),
            "routes_advertised": link.exchange.advertised_count,
            "stations_bound": len(link.bound),
            "messages_sent": stats.messages_sent,
            "messages_received": stats.messages_received,
        })
    for peer_id, entry in sorted(configured.items()):
        if peer_id not in overlay.links:
            peers.append({"id": peer_id, "encoding": entry.encoding, "compressed": None,
                          "state": "down",
                          "configured": True, "routes_learned": 0, "routes_advertised": 0,
                          "stations_bound": 0, "messages_sent": 0, "messages_received": 0})
    secondaries = []
    for sub in node.duplicator.secondaries:
        s = sub.stats
        secondaries.append({
            "name": sub.name,
            "url": shown_url(sub.entry.url),
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


