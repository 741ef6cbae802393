"""Drawing the overlay (pure: a Topology in, SVG and HTML text out).

The page carries no inline script: it loads ``/topology.js`` from the endpoint itself,
which polls ``/live`` and updates the numbers (the page works without it, as a snapshot).
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import time
from collections.abc import Mapping
from typing import Any

from router.admin.live import per_s, rate_labels
from router.admin.topology import Topology, TopoNode

_MAX_DRAWN_NODES = 120

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


def render_svg(topo: Topology, rates: Mapping[str, str] | None = None) -> str:
    """The overlay as an SVG document (nodes, links, backends, station counts); ``rates``
    (peer id -> text) labels this node's links with their frame rates."""
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
            if kind == "link" and topo.me in (a, b):
                # the frame rate goes under the encoding; the page's script keeps it current
                peer = b if a == topo.me else a
                out.append(f'<text class="rate" data-peer="{esc(peer)}" x="{tx:.1f}" '
                           f'y="{ty + 15:.1f}" font-size="12" fill="#0969da" '
                           f'text-anchor="start" {_HALO}>{esc((rates or {}).get(peer, ""))}'
                           "</text>")
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


PAGE_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #24292f; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
p.sub { color: #57606a; margin: 0 0 12px 0; }
p.stale { color: #cf222e; }
svg { border: 1px solid #d0d7de; max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 12px 24px 0 0; display: inline-table;
        vertical-align: top; }
caption { text-align: left; font-weight: bold; padding-bottom: 2px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; font-size: 13px; text-align: left; }
td.reject { color: #cf222e; font-weight: bold; }
td.drop { color: #9a6700; font-weight: bold; }
"""
STYLE_SOURCE = "'sha256-" + base64.b64encode(
    hashlib.sha256(PAGE_STYLE.encode()).digest()).decode() + "'"
"""The page's one style block as a Content-Security-Policy source (no inline styles else)."""

POLL_MS = 2000  # how often the page's script asks /live

_TABLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (tbody id, caption, column headings): /topology.js fills the same bodies
    ("peers", "peer links", ("peer", "state", "encoding", "in, frames/s", "out, frames/s")),
    ("traffic", "stations", ("local", "over the overlay", "to backends, frames/s",
                              "to stations, frames/s")),
    ("backends", "backends", ("name", "role", "target")),
    ("secondaries", "secondaries", ("name", "queued", "backlog", "copies/s", "dropped")),
    ("decisions", "recent firewall refusals and drops",
     ("time", "outcome", "rule", "action", "source")),
)


def _cells(live: Mapping[str, Any]) -> dict[str, list[list[tuple[str, str]]]]:
    """Every table's rows as (text, class) cells, from the ``/live`` view."""
    s = live["stations"]
    return {
        "peers": [[(p["id"], ""), (p["state"], ""), (p["encoding"], ""),
                   (per_s(p["in_per_s"]), "rate"), (per_s(p["out_per_s"]), "rate")]
                  for p in live["peers"]],
        "traffic": [[(str(s["local"]), ""), (str(s["overlay"]), ""),
                     (per_s(s["up_per_s"]), "rate"), (per_s(s["down_per_s"]), "rate")]],
        "backends": [[(b["name"], ""), (b["role"], ""), (b["target"], "")]
                     for b in live["backends"]],
        "secondaries": [[(c["name"], ""), (f"{c['queued']}/{c['queue_capacity']}", ""),
                         (str(c["backlog"]), "backlog"), (per_s(c["delivered_per_s"]), "rate"),
                         (str(c["dropped"]), "")] for c in live["secondaries"]],
        "decisions": [[(d["ts"] or "", ""), (d["outcome"] or "", d["outcome"] or ""),
                       (d["rule"] or "", ""), (d["action"] or "", ""), (d["source"] or "", "")]
                      for d in live["firewall"]["recent"]],
    }


def _table(body_id: str, caption: str, headings: tuple[str, ...],
           rows: list[list[tuple[str, str]]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f'<td class="{esc(cls)}">{esc(text)}</td>' if cls else
                                    f"<td>{esc(text)}</td>" for text, cls in row) + "</tr>"
                   for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headings)}">none</td></tr>'
    return (f'<table><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>'
            f'<tbody id="{body_id}">{body}</tbody></table>')


def render_page(topo: Topology, live: Mapping[str, Any], refresh_s: int | None = None) -> str:
    """The /topology page: the SVG and tables of links, traffic, secondaries and recent
    firewall refusals (``live`` is the ``/live`` view); ``/topology.js`` keeps it current."""
    svg = render_svg(topo, rate_labels(live))
    esc = html.escape
    cells = _cells(live)
    tables = "\n".join(_table(body_id, caption, headings, cells[body_id])
                        for body_id, caption, headings in _TABLES)
    meta = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{meta}
<title>{esc(topo.me)}: overlay topology</title>
<style>{PAGE_STYLE}</style>
<script src="/topology.js" defer></script>
</head>
<body data-live="/live" data-svg="/topology.svg" data-poll-ms="{POLL_MS}">
<h1>Overlay as seen by {esc(topo.me)}</h1>
<p class="sub" id="summary">{_summary(topo)}</p>
<p class="sub" id="live-status" data-updates="0">drawn {when}; without scripts this is a
snapshot</p>
<div id="picture">{svg}</div>
<div>
{tables}
</div>
</body></html>
"""


def _summary(topo: Topology) -> str:
    stations = sum(n.stations for n in topo.nodes.values())
    return (f"{len(topo.nodes)} node(s), {stations} station(s), {len(topo.edges)} link(s) "
            "known")
