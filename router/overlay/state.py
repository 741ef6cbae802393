"""What the parts of the overlay share: the route table, the links, who is attached where."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from router.net.wslink import LinkClosed
from router.overlay.peer_link import PeerLink
from router.overlay.virtual import VirtualLink
from router.wire.overlay_frames import OverlayFrame
from topology import RouteTable


@dataclass(slots=True, eq=False)
class OverlayState:
    """The overlay's own state, read and changed by forwarding, attach and the peer links."""

    node_id: str
    table: RouteTable
    links: dict[str, PeerLink] = field(default_factory=dict)  # open peer links, by peer id
    # stations connected here whose backend session another node holds: their backend side
    edge: dict[str, VirtualLink] = field(default_factory=dict)
    # stations connected elsewhere whose backend session this node holds: their station side
    held: dict[str, VirtualLink] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def count(self, what: str) -> None:
        """One more overlay event of this kind (exported as a metric)."""
        self.counters[what] = self.counters.get(what, 0) + 1

    def wake(self) -> None:
        """The table changed: every exchange session re-checks what to send."""
        self.changed.set()
        self.changed = trio.Event()

    def link_toward(self, destination: str) -> PeerLink | None:
        """The open peer link of the best route to ``destination``, if any."""
        route = self.table.best(destination)
        if route is None or not route.peer:
            return None
        return self.links.get(route.peer)

    async def reply(self, link: PeerLink, frame: OverlayFrame) -> None:
        """Send an answer back on the link the request came by."""
        try:
            await link.send(frame)
        except LinkClosed:
            self.count("no_route")
