"""What the demo prints: events in, terminal lines out (sans-IO, time passed in).

The scene feeds :class:`Narrator` the events the nodes logged (``peer_connected``,
``policy_reject``, ``backend_failover``, ...) and what the demo's CSMS, secondary and
stations observed, each stamped with the seconds since the demo began and the node or
peer it came from. The narrator turns the ones that matter into one line each; events
that come in bursts (forty stations failing over at once) become one line once the burst
is over. :func:`summary_line` formats a node's once-a-second line from two snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

QUIET_S = 0.3  # a burst of failovers is over after this long without another...
MAX_BURST_S = 1.0  # ...or this long after it began (the rest make a line of their own)
SHOWN = 6  # names listed in one line before "+n more"


@dataclass(frozen=True, slots=True)
class Event:
    """Something a node logged or a demo peer observed, ``at`` seconds into the demo."""

    at: float
    source: str  # node id, or the demo peer that saw it ("csms-1", "analytics")
    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)


def stamp(at: float, source: str, tag: str, text: str) -> str:
    """One terminal line: time, who, what kind, what."""
    return f"[{at:6.1f}s] {source:<9} {tag:<8} {text}"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    more = len(names) - SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


@dataclass(slots=True)
class _Burst:
    first_at: float
    last_at: float
    names: list[str]  # the stations in it


class Narrator:
    """Turns events into lines. ``targets`` names the SRV targets by priority."""

    def __init__(self, targets: Mapping[int, str], quiet_s: float = QUIET_S) -> None:
        self.targets = dict(targets)
        self.quiet_s = quiet_s
        self._reachable: dict[str, set[str]] = {}  # node -> destinations it ever reached
        # (source, event, SRV priority or CSMS) -> a burst being gathered
        self._bursts: dict[tuple[str, str, str], _Burst] = {}
        self._stopped: set[str] = set()  # demo CSMSs stopped and not yet back
        self._attached: set[str] = set()  # stations ever attached over the overlay
        self.counts: dict[str, int] = {}  # tag -> lines printed, for the closing summary

    def _line(self, at: float, source: str, tag: str, text: str) -> str:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        return stamp(at, source, tag, text)

    def _target(self, priority: int) -> str:
        name = self.targets.get(priority)
        return f"SRV priority {priority}" + (f" ({name})" if name else "")

    def feed(self, event: Event) -> list[str]:
        """Lines for one event (none for events told only in a burst's line, or not told)."""
        f, at, src = event.fields, event.at, event.source
        name = event.name
        if name == "peer_connected" and f.get("direction") == "out":
            return [self._line(at, src, "OVERLAY", f"peer link to {f.get('peer')} up "
                               f"({f.get('encoding')}, dialled by {src})")]
        if name == "peer_disconnected":
            return [self._line(at, src, "OVERLAY", f"peer link to {f.get('peer')} down")]
        if name in ("peer_expired", "announcement_rejected"):
            return [self._line(at, src, "OVERLAY", f"{name.replace('_', ' ')}: "
                               f"{f.get('peer')} {f.get('reason', '')}".rstrip())]
        if name == "routes_changed":
            return self._routes(event)
        if name == "srv_resolved" and src not in self._reachable.get("#dns", set()):
            self._reachable.setdefault("#dns", set()).add(src)
            return [self._line(at, src, "DNS", f"{f.get('name')} -> "
                               f"{'; '.join(f.get('targets') or [])}")]
        if name in ("policy_reject", "policy_drop"):
            verb = "refused" if name == "policy_reject" else "dropped"
            return [self._line(at, src, "FIREWALL", f"{verb} {f.get('action')} from "
                               f"{f.get('source')} ({f.get('direction')}): rule "
                               f"\"{f.get('rule')}\": {f.get('reason')}")]
        if name == "firewall_forward":
            return [self._line(at, src, "FIREWALL", f"forwarded {f.get('action')}: rule "
                               f"\"{f.get('rule')}\" satisfied by a valid admin signature")]
        if name == "reset_answer":
            return [self._reset(event)]
        if name == "secondary_copy":
            return [self._line(at, src, "COPIES", f"first {f.get('action')} copy arrived "
                               f"(station {f.get('station')}, copied by {f.get('via')})")]
        if name in ("backend_failover", "backend_failback"):
            self._gather(event, str(f.get("priority", 0)), [str(f.get("station"))])
            return []
        if name == "overlay_station":
            self._gather(event, str(f.get("target") or "?"), [str(f.get("station"))])
            return []
        if name == "backend_failover_failed":
            return [self._line(at, src, "FAILOVER", f"{f.get('station')}: no target took its "
                               f"link within {f.get('grace_s')} s; the station reconnects")]
        if name == "csms_stopping":
            self._stopped.add(str(f.get("csms")))
            return [self._line(at, "scene", "SCENE", f"{f.get('csms')} stops (port "
                               f"{f.get('port')}): its station links drop")]
        if name == "csms_listening" and f.get("csms") in self._stopped:
            self._stopped.discard(str(f.get("csms")))
            return [self._line(at, "scene", "SCENE", f"{f.get('csms')} is back on port "
                               f"{f.get('port')}")]
        return []

    def _gather(self, event: Event, detail: str, names: list[str]) -> None:
        burst = self._bursts.setdefault((event.source, event.name, detail),
                                        _Burst(event.at, event.at, []))
        burst.last_at = event.at
        burst.names.extend(names)

    def _routes(self, event: Event) -> list[str]:
        """Destinations a node reaches for the first time (withdrawals are not told)."""
        seen = self._reachable.setdefault(event.source, set())
        new = [str(d) for d in event.fields.get("reachable", ()) if d not in seen]
        if not new:
            return []
        seen.update(new)
        return [self._line(event.at, event.source, "ROUTES",
                           f"routes exchanged with {event.fields.get('peer')}: now reaches "
                           f"{_names(sorted(new))}")]

    def _reset(self, event: Event) -> str:
        f = event.fields
        kind = "signed" if f.get("signed") else "unsigned"
        head = f"{kind} Reset to {f.get('station')}"
        if f.get("error"):
            return self._line(event.at, str(f.get("csms")), "RESET",
                              f"{head} came back {f.get('error')}: {f.get('description')}")
        seen = "received it and " if f.get("station_saw") else ""
        return self._line(event.at, str(f.get("csms")), "RESET",
                          f"{head} delivered: the station ({f.get('version')}, on "
                          f"{f.get('node')}) {seen}answered {f.get('status')}")

    def flush(self, now: float, *, everything: bool = False) -> list[str]:
        """Lines for the bursts that are over by ``now`` (or all of them): quiet for
    ``quiet_s``, or begun ``MAX_BURST_S`` ago."""
        lines = []
        for key, burst in sorted(self._bursts.items(), key=lambda kv: kv[1].first_at):
            over = now - burst.last_at >= self.quiet_s or now - burst.first_at >= MAX_BURST_S
            if not (over or everything):
                continue
            del self._bursts[key]
            source, name, detail = key
            lines.append(self._burst_line(source, name, detail, burst))
        return lines

    def _burst_line(self, source: str, name: str, detail: str, burst: _Burst) -> str:
        names = _names(sorted(burst.names))
        if name == "overlay_station":
            again = [n for n in burst.names if n in self._attached]
            self._attached.update(burst.names)
            count = len(burst.names)
            how = "attached again (redialled)" if again else "attached"
            return self._line(burst.first_at, source, "ATTACH",
                              f"{count} station{'s' if count != 1 else ''} {how} over the "
                              f"overlay, backend links on {detail}: {names}")
        count = len(burst.names)
        links = f"{count} station link{'s' if count != 1 else ''}"
        took = f"within {burst.last_at - burst.first_at:.1f} s"
        if name == "backend_failover":
            return self._line(burst.first_at, source, "FAILOVER",
                              f"{links} moved to {self._target(int(detail))} {took}: {names}")
        return self._line(burst.first_at, source, "FAILBACK",
                          f"{links} back on {self._target(int(detail))} {took}: {names}")


# --- the once-a-second line --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerState:
    """One peer link as the summary shows it."""

    peer: str
    encoding: str
    state: str  # open | syncing | down | ...
    routes: int  # routes learned over it


@dataclass(frozen=True, slots=True)
class SecondaryState:
    """One secondary backend as the summary shows it."""

    name: str
    delivered: int
    backlog: int


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """What one node looks like at ``at`` seconds, read by the scene from the live node."""

    node: str
    at: float
    stations: int  # connected to this node
    planned: int  # stations the scene connects to this node
    frames: int  # frames forwarded so far
    peers: tuple[PeerState, ...] = ()
    backends: tuple[tuple[str, int], ...] = ()  # (SRV target label, station links on it)
    secondaries: tuple[SecondaryState, ...] = ()
    refused: int = 0  # firewall refusals and drops so far
    held: int = 0  # stations of other nodes whose backend links this node holds


def summary_line(now: NodeSnapshot, before: NodeSnapshot | None) -> str:
    """``stations | frames/s | links`` of one node, the rate taken since ``before``."""
    rate = 0.0
    if before is not None and now.at > before.at:
        rate = (now.frames - before.frames) / (now.at - before.at)
    stations = f"stations {now.stations}/{now.planned}"
    if now.held:
        stations += f" + {now.held} over the overlay"
    parts = [stations, f"{rate:5.1f} frames/s"]
    if now.peers:
        parts.append("peers " + ", ".join(
            f"{p.peer} {p.encoding} {p.state} ({p.routes} routes)" for p in now.peers))
    if now.backends:
        parts.append(", ".join(f"{label} {count}" for label, count in now.backends))
    for s in now.secondaries:
        parts.append(f"{s.name} {s.delivered} copies, backlog {s.backlog}")
    if now.refused:
        parts.append(f"firewall refused {now.refused}")
    return f"[{now.at:6.1f}s] {now.node:<9} | " + " | ".join(parts)


__all__ = ["Event", "Narrator", "NodeSnapshot", "PeerState", "SecondaryState", "stamp",
           "summary_line"]
